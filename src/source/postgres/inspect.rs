//! What a restore drill asks of a PostgreSQL database and of a scratch server.

use super::*;
use crate::source::database::{Inspect, ScratchServer, count_by_subqueries};

impl Inspect for PgConn {
    fn verdict(&self, _tables: &[TableRecord]) -> std::result::Result<String, String> {
        // psql ran every stream with ON_ERROR_STOP: a load that got here had no error.
        Ok("psql loaded every stream with ON_ERROR_STOP: no error".into())
    }

    fn count_rows(&self, tables: &[TableRecord]) -> Result<Vec<u64>> {
        let subqueries: Vec<String> = tables
            .iter()
            .map(|t| {
                format!(
                    "(SELECT count(*) FROM ONLY {}.{})",
                    ident(&t.schema),
                    ident(&t.name)
                )
            })
            .collect();
        count_by_subqueries(&subqueries, |sql| self.query_one(sql))
    }

    fn value(&self, sql: &str) -> Result<String> {
        self.query_one(sql)
    }

    fn time_literal(&self, t: jiff::Timestamp) -> String {
        let utc = t.to_zoned_datetime(jiff::tz::TimeZone::UTC);
        format!("'{}'::timestamptz", utc.strftime("%Y-%m-%dT%H:%M:%S%.6fZ"))
    }
}

impl ScratchServer for PgConn {
    fn databases_named(&self, prefix: &str) -> Result<Vec<String>> {
        let like = prefix.replace('_', "\\_") + "%";
        let rows = self.query_one(&format!(
            "SELECT coalesce(string_agg(datname, E'\\n'), '') FROM pg_database \
             WHERE datname LIKE {}",
            literal(&like)
        ))?;
        Ok(rows.lines().map(String::from).collect())
    }

    fn drop_database(&self, name: &str) -> Result<()> {
        self.query_one(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            ident(name)
        ))
        .map(drop)
    }
}
