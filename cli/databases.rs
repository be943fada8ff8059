//! Database URLs and the database password, shared by `backup` and `restore`.

use std::path::PathBuf;

pub use kluis::source::database::{Engine, engine_of};
use kluis::source::postgres::{self, PgConn};

use crate::Global;

/// The database password: --db-password-file, or the systemd credential `kluis-db-password`.
pub fn db_password(g: &Global) -> anyhow::Result<Option<zeroize::Zeroizing<String>>> {
    Ok(kluis::secrets::db_password(g.db_password_file.as_deref())?)
}

pub fn pg_conn(g: &Global, url: &str) -> anyhow::Result<PgConn> {
    let conn = PgConn::parse(url, db_password(g)?)?;
    Ok(conn.with_bin_dir(postgres::tools_dir(g.pg_bin_dir.as_deref())))
}

/// A database URL given where paths go.
pub fn database_url(paths: &[PathBuf]) -> Option<(Engine, String)> {
    match paths {
        [p] => {
            let s = p.to_str()?;
            engine_of(s).map(|e| (e, s.to_string()))
        }
        _ => None,
    }
}
