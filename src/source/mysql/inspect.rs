//! What a restore drill asks of a MySQL or MariaDB database and of a scratch server.

use super::*;
use crate::source::database::{Inspect, ScratchServer, count_by_subqueries};

impl Inspect for MyConn {
    fn verdict(&self, tables: &[TableRecord]) -> std::result::Result<String, String> {
        if tables.is_empty() {
            return Ok("no tables to check".into());
        }
        let list: Vec<String> = tables.iter().map(|t| ident(&t.name)).collect();
        let rows = self
            .query_in(&format!("CHECK TABLE {}", list.join(", ")))
            .map_err(|e| format!("CHECK TABLE failed: {e}"))?;
        // Table, Op, Msg_type, Msg_text: any error, or a status other than OK.
        let bad: Vec<String> = rows
            .iter()
            .filter(|r| {
                let f: Vec<&str> = r.split('\t').collect();
                f.len() >= 4
                    && (f[2].eq_ignore_ascii_case("error")
                        || (f[2].eq_ignore_ascii_case("status")
                            && !f[3].eq_ignore_ascii_case("ok")))
            })
            .map(|s| s.replace('\t', " "))
            .collect();
        if bad.is_empty() {
            Ok(format!("CHECK TABLE: all {} table(s) OK", list.len()))
        } else {
            Err(format!("CHECK TABLE: {}", bad.join("; ")))
        }
    }

    fn count_rows(&self, tables: &[TableRecord]) -> Result<Vec<u64>> {
        let subqueries: Vec<String> = tables
            .iter()
            .map(|t| format!("(SELECT COUNT(*) FROM {})", ident(&t.name)))
            .collect();
        count_by_subqueries(&subqueries, |sql| self.value(sql))
    }

    fn value(&self, sql: &str) -> Result<String> {
        self.query_in(sql).map(|r| r.join("\n"))
    }

    fn time_literal(&self, t: jiff::Timestamp) -> String {
        let utc = t.to_zoned_datetime(jiff::tz::TimeZone::UTC);
        format!("'{}'", utc.strftime("%Y-%m-%d %H:%M:%S%.6f"))
    }
}

impl ScratchServer for MyConn {
    fn databases_named(&self, prefix: &str) -> Result<Vec<String>> {
        let like = prefix.replace('_', "\\_") + "%";
        self.query(&format!(
            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE {}",
            sql_literal(&like)
        ))
    }

    fn drop_database(&self, name: &str) -> Result<()> {
        self.query(&format!("DROP DATABASE IF EXISTS {}", ident(name)))
            .map(drop)
    }
}
