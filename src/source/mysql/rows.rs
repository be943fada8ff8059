//! Counts each table's rows in `mariadb-dump`/`mysqldump` output as it streams past.
//!
//! The dump's own comments mark its sections: `-- Table structure for table `t`` starts a table,
//! `-- Dumping data for table `t`` its data, `UNLOCK TABLES;` (or the next section) ends it.
//! Only inside a data section does an `INSERT INTO `t` VALUES` line of that very table count,
//! so SQL inside trigger, routine and event bodies (printed as written) is never mistaken for
//! data. Each top-level parenthesised tuple of the INSERT is a row: strings are single-quoted
//! with backslash escapes and never hold a raw newline, binary columns are hex outside quotes,
//! and MariaDB starts each row on its own line. Anything else means the counter lost its
//! place: it leaves the INSERT and reads lines again rather than count wrong for the rest of
//! the dump.

use std::io::Write;
use std::sync::Arc;

use crate::progress::Progress;

/// One table's name, rows, and the key the dump ordered them by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRows {
    pub name: String,
    pub rows: u64,
    pub key: Option<String>,
}

/// Bytes of a line kept to recognise it.
const LINE_HEAD: usize = 512;

#[derive(Debug, Default)]
pub struct RowCounter {
    pub tables: Vec<TableRows>,
    /// The start of the current line, up to [`LINE_HEAD`] bytes, outside an INSERT.
    line: Vec<u8>,
    /// Whether `line` began at the start of a line (not after a statement's `;`).
    line_start: bool,
    /// The table whose data section this is.
    data_table: Option<String>,
    insert: Option<Insert>,
    started: bool,
}

#[derive(Debug, Default)]
struct Insert {
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// Just after a newline between rows: the next byte must open a row.
    after_newline: bool,
}

impl RowCounter {
    pub fn feed(&mut self, bytes: &[u8]) {
        if !self.started {
            self.started = true;
            self.line_start = true;
        }
        for &b in bytes {
            if self.insert.is_some() {
                self.insert_byte(b);
            } else {
                self.line_byte(b);
            }
        }
    }

    fn insert_byte(&mut self, b: u8) {
        let ins = self.insert.as_mut().expect("in an INSERT");
        if ins.in_string {
            if ins.escaped {
                ins.escaped = false;
            } else if b == b'\\' {
                ins.escaped = true;
            } else if b == b'\'' {
                ins.in_string = false;
            } else if b == b'\n' {
                self.lose_sync();
            }
            return;
        }
        if ins.after_newline {
            ins.after_newline = false;
            if b != b'(' {
                self.lose_sync();
                self.line_byte(b);
                return;
            }
        }
        match b {
            b'\'' => ins.in_string = true,
            b'(' => {
                if ins.depth == 0 {
                    self.count_row();
                }
                let ins = self.insert.as_mut().expect("in an INSERT");
                ins.depth += 1;
            }
            b')' => ins.depth = ins.depth.saturating_sub(1),
            b';' if ins.depth == 0 => {
                self.insert = None;
                self.line.clear();
                self.line_start = false;
            }
            b'\n' if ins.depth == 0 => ins.after_newline = true,
            b'\n' => self.lose_sync(),
            _ => {}
        }
    }

    /// Leaves the INSERT at a newline: the next byte starts a line.
    fn lose_sync(&mut self) {
        self.insert = None;
        self.data_table = None;
        self.line.clear();
        self.line_start = true;
    }

    fn count_row(&mut self) {
        let Some(name) = &self.data_table else { return };
        if let Some(t) = self.tables.iter_mut().rev().find(|t| &t.name == name) {
            t.rows += 1;
        }
    }

    fn line_byte(&mut self, b: u8) {
        if b == b'\n' {
            self.end_line();
            self.line.clear();
            self.line_start = true;
            return;
        }
        if self.line.len() >= LINE_HEAD {
            return;
        }
        self.line.push(b);
        if b == b'S' && self.line_start && self.data_table.is_some() {
            if let Some(rest) = self.line.strip_prefix(b"INSERT INTO `") {
                if let Some((name, after)) = backquoted(rest) {
                    let values = after == b" VALUES"
                        || (after.starts_with(b" (") && after.ends_with(b") VALUES"));
                    if values && self.data_table.as_deref() == Some(name.as_str()) {
                        self.insert = Some(Insert::default());
                    }
                }
            }
        }
    }

    fn end_line(&mut self) {
        if !self.line_start {
            return;
        }
        let line = self.line.as_slice();
        if let Some(rest) = line.strip_prefix(b"-- Table structure for table `") {
            self.data_table = None;
            if let Some((name, _)) = backquoted(rest) {
                self.tables.push(TableRows {
                    name,
                    rows: 0,
                    key: None,
                });
            }
        } else if let Some(rest) = line.strip_prefix(b"-- Dumping data for table `") {
            if let Some((name, _)) = backquoted(rest) {
                if self.tables.last().is_none_or(|t| t.name != name) {
                    self.tables.push(TableRows {
                        name: name.clone(),
                        rows: 0,
                        key: None,
                    });
                }
                self.data_table = Some(name);
            }
        } else if let Some(rest) = line.strip_prefix(b"-- ORDER BY:") {
            let key = String::from_utf8_lossy(rest).trim().to_string();
            if let (Some(t), false) = (self.tables.last_mut(), key.is_empty()) {
                t.key = Some(key);
            }
        } else if line == b"UNLOCK TABLES;"
            || line.starts_with(b"-- Dumping events")
            || line.starts_with(b"-- Dumping routines")
            || line.starts_with(b"-- Temporary table structure")
            || line.starts_with(b"-- Final view structure")
        {
            self.data_table = None;
        }
    }
}

/// The name up to the closing backquote (a doubled backquote is one), and what follows it.
fn backquoted(b: &[u8]) -> Option<(String, &[u8])> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'`' {
            if b.get(i + 1) == Some(&b'`') {
                out.push(b'`');
                i += 2;
                continue;
            }
            return Some((String::from_utf8_lossy(&out).into_owned(), &b[i + 1..]));
        }
        out.push(b[i]);
        i += 1;
    }
    None
}

/// Counts the tables of a dump as it is written through to a database client, for a restore's
/// progress: a table is done when the next one's `-- Table structure for table` section starts
/// (the last one when the whole dump is through; the caller settles that).
pub struct TableSections<W> {
    inner: W,
    progress: Arc<Progress>,
    /// The end of what was written before, for a marker cut between two writes.
    tail: Vec<u8>,
    seen: u64,
}

const TABLE_MARK: &[u8] = b"\n-- Table structure for table `";

impl<W: Write> TableSections<W> {
    pub fn new(inner: W, progress: Arc<Progress>) -> Self {
        TableSections {
            inner,
            progress,
            // A dump that begins with the marker has it at the start of a line too.
            tail: b"\n".to_vec(),
            seen: 0,
        }
    }

    fn count(&mut self, buf: &[u8]) {
        let mut marks = 0;
        // Markers that straddle the previous write and this one.
        let head = &buf[..buf.len().min(TABLE_MARK.len() - 1)];
        let mut seam = std::mem::take(&mut self.tail);
        let seam_start = seam.len();
        seam.extend_from_slice(head);
        marks += memchr::memmem::find_iter(&seam, TABLE_MARK)
            .filter(|&at| at < seam_start)
            .count();
        marks += memchr::memmem::find_iter(buf, TABLE_MARK).count();
        let keep = (TABLE_MARK.len() - 1).min(seam.len());
        self.tail = seam.split_off(seam.len() - keep);
        if buf.len() >= TABLE_MARK.len() - 1 {
            self.tail = buf[buf.len() - (TABLE_MARK.len() - 1)..].to_vec();
        }
        for _ in 0..marks {
            if self.seen > 0 {
                Progress::add(&self.progress.files, 1);
            }
            self.seen += 1;
        }
    }
}

impl<W: Write> Write for TableSections<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(dump: &str, piece: usize) -> Vec<TableRows> {
        let mut c = RowCounter::default();
        for p in dump.as_bytes().chunks(piece) {
            c.feed(p);
        }
        c.tables
    }

    fn t(name: &str, rows: u64, key: Option<&str>) -> TableRows {
        TableRows {
            name: name.into(),
            rows,
            key: key.map(String::from),
        }
    }

    #[test]
    fn counts_rows_of_both_insert_styles() {
        let dump = "-- MariaDB dump\n\
            --\n-- Table structure for table `a`\n--\n\n\
            CREATE TABLE `a` (\n  `id` int\n);\n\
            --\n-- Dumping data for table `a`\n--\n-- ORDER BY:  `id`\n\n\
            LOCK TABLES `a` WRITE;\n\
            INSERT INTO `a` VALUES\n(1,'x'),\n(2,'it''s (not) a row'),\n(3,'\\'),(\\n');\n\
            UNLOCK TABLES;\n\
            --\n-- Table structure for table `b``q`\n--\n\n\
            --\n-- Dumping data for table `b``q`\n--\n\n\
            INSERT INTO `b``q` VALUES (1,0x28),(2,NULL),(3,'('),(4,'a;b');\n\
            INSERT INTO `b``q` (`x`, `y`) VALUES (5,'');\n\
            UNLOCK TABLES;\n\
            --\n-- Table structure for table `empty`\n--\n\n\
            CREATE TABLE `empty` (`x` int);\n\
            -- Dump completed\n";
        let want = vec![
            t("a", 3, Some("`id`")),
            t("b`q", 5, None),
            t("empty", 0, None),
        ];
        // Fed in awkward pieces: state carries across reads.
        for piece in [1, 3, 7, 4096] {
            assert_eq!(count(dump, piece), want, "pieces of {piece}");
        }
    }

    #[test]
    fn sql_in_bodies_is_not_data() {
        let dump = "--\n-- Table structure for table `log`\n--\n\n\
            --\n-- Dumping data for table `log`\n--\n\n\
            INSERT INTO `log` VALUES\n(1,'a');\n\
            UNLOCK TABLES;\n\
            DELIMITER ;;\n\
            /*!50003 CREATE*/ /*!50003 TRIGGER t AFTER INSERT ON log FOR EACH ROW BEGIN\n\
            INSERT INTO `log` VALUES (NEW.id, 'it's broken (really');\n\
            END */;;\n\
            --\n-- Dumping routines for database 'x'\n--\n\
            CREATE TABLE `fake` (x int);\n\
            --\n-- Table structure for table `after`\n--\n\n\
            --\n-- Dumping data for table `after`\n--\n\n\
            INSERT INTO `after` VALUES\n(1),\n(2);\n\
            UNLOCK TABLES;\n";
        assert_eq!(count(dump, 5), vec![t("log", 1, None), t("after", 2, None)]);
    }

    #[test]
    fn a_lost_place_is_regained_at_the_next_line() {
        // A row line that does not open a row, and a raw newline inside a string: neither
        // happens in a real dump; the counter must not stay stuck in the INSERT.
        let dump = "--\n-- Table structure for table `a`\n--\n\n\
            --\n-- Dumping data for table `a`\n--\n\n\
            INSERT INTO `a` VALUES\n(1,'x'),\nnot a row '\n\
            --\n-- Table structure for table `b`\n--\n\n\
            --\n-- Dumping data for table `b`\n--\n\n\
            INSERT INTO `b` VALUES\n(1,'open\n\
            --\n-- Table structure for table `c`\n--\n\n\
            --\n-- Dumping data for table `c`\n--\n\n\
            INSERT INTO `c` VALUES\n(1),\n(2);\n";
        assert_eq!(
            count(dump, 2),
            vec![t("a", 1, None), t("b", 1, None), t("c", 2, None)]
        );
    }

    #[test]
    fn table_sections_count_each_table_once_however_the_dump_is_cut() {
        let dump = "-- MariaDB dump\n--\n-- Table structure for table `a`\n--\n\nCREATE TABLE `a` (x int);\n\
            INSERT INTO `a` VALUES (1,'-- Table structure for table `no`');\n\
            --\n-- Table structure for table `b`\n--\n\n--\n-- Temporary table structure for view `v`\n--\n\
            --\n-- Table structure for table `c`\n--\n-- Dump completed\n";
        for piece in 1..dump.len() {
            let progress = Progress::new();
            let mut out = TableSections::new(Vec::new(), progress.clone());
            for p in dump.as_bytes().chunks(piece) {
                out.write_all(p).unwrap();
            }
            // a and b are done when the next table starts; c when the dump is through.
            assert_eq!(Progress::get(&progress.files), 2, "pieces of {piece}");
            assert_eq!(out.inner, dump.as_bytes());
        }
        // The first line of a dump counts too.
        let progress = Progress::new();
        let mut out = TableSections::new(Vec::new(), progress.clone());
        out.write_all(b"-- Table structure for table `a`\n\n-- Table structure for table `b`\n")
            .unwrap();
        assert_eq!(Progress::get(&progress.files), 1);
    }
}
