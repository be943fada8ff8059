//! Loading a dump into a database: the target checked (empty, or emptied with force) and created, and the psql that loads it.

use super::*;

/// What makes a database "not empty" for a restore: anything a user created in it. Schemas
/// (but `public`), relations, functions, types that are not a relation's row type or an array,
/// extensions (but `plpgsql`, which every database has) and large objects.
const NON_EMPTY: &str = "WITH user_ns AS (SELECT oid, nspname FROM pg_namespace \
       WHERE nspname <> 'information_schema' AND nspname NOT LIKE 'pg\\_%') \
     SELECT (SELECT count(*) FROM user_ns WHERE nspname <> 'public') \
     + (SELECT count(*) FROM pg_class c JOIN user_ns n ON n.oid = c.relnamespace) \
     + (SELECT count(*) FROM pg_proc p JOIN user_ns n ON n.oid = p.pronamespace) \
     + (SELECT count(*) FROM pg_type t JOIN user_ns n ON n.oid = t.typnamespace \
          WHERE t.typrelid = 0 AND t.typcategory <> 'A') \
     + (SELECT count(*) FROM pg_extension WHERE extname <> 'plpgsql') \
     + (SELECT count(*) FROM pg_largeobject_metadata)";

/// Makes the restore target ready: creates the database (from template0, in the snapshot's
/// encoding), or accepts an existing empty one (see `NON_EMPTY`); any other is refused unless
/// `force`, which drops and recreates it.
pub fn prepare_target(target: &PgConn, encoding: &str, force: bool) -> Result<()> {
    let fail = Error::on_target;
    let maintenance = target.with_database("postgres");
    let db = &target.database;
    let exists = maintenance
        .query_one(&format!(
            "SELECT count(*) FROM pg_database WHERE datname = {}",
            literal(db)
        ))
        .map_err(fail)?
        == "1";
    if exists {
        let objects: u64 = target
            .query_one(NON_EMPTY)
            .map_err(fail)?
            .parse()
            .unwrap_or(u64::MAX);
        if objects == 0 {
            return Ok(());
        }
        if !force {
            return Err(Error::invalid(format!(
                "database {db:?} on {} is not empty ({objects} schemas, relations, functions, \
                 types, extensions or large objects); restore into a new database, or pass \
                 --force to drop and recreate it",
                target.display
            )));
        }
        maintenance
            .query_one(&format!("DROP DATABASE {} WITH (FORCE)", ident(db)))
            .map_err(fail)?;
    }
    maintenance
        .query_one(&format!(
            "CREATE DATABASE {} TEMPLATE template0 ENCODING {}",
            ident(db),
            literal(encoding)
        ))
        .map_err(fail)?;
    Ok(())
}

impl crate::source::database::Load for PgConn {
    const CLIENT: &'static str = "psql";

    fn shown(&self) -> String {
        self.display.clone()
    }

    fn prepare(&self, record: &crate::snapshot::DatabaseRecord, force: bool) -> Result<()> {
        prepare_target(self, &record.encoding, force)
    }

    fn loader(&self) -> Result<Command> {
        loader(self)
    }
}

/// A `psql` that reads a dump stream on its standard input and stops at the first error.
pub fn loader(target: &PgConn) -> Result<Command> {
    let mut c = target.psql()?;
    c.args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Ok(c)
}
