//! Database URLs and the database password, shared by `backup` and `restore`.

use std::path::PathBuf;

pub use kluis::source::database::{Engine, engine_of};

use crate::Global;

/// The database password: --db-password-file, or the systemd credential `kluis-db-password`.
pub fn db_password(g: &Global) -> anyhow::Result<Option<zeroize::Zeroizing<String>>> {
    Ok(kluis::secrets::db_password(g.db_password_file.as_deref())?)
}

/// Where database tools are found (--pg-bin-dir).
pub fn places(g: &Global) -> kluis::source::database::Places {
    kluis::source::database::Places {
        pg_bin_dir: g.pg_bin_dir.clone(),
        temp_dir: None,
    }
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
