use super::conn::is_pg_wrapper;
use super::*;

#[test]
fn debian_pg_wrapper_is_recognised_through_its_links() {
    let dir = tempfile::tempdir().unwrap();
    let wrapper = dir.path().join("pg_wrapper");
    std::fs::write(&wrapper, "#!/usr/bin/perl\n").unwrap();
    let link = dir.path().join("pg_dump");
    std::os::unix::fs::symlink(&wrapper, &link).unwrap();
    assert!(is_pg_wrapper(&link));
    let real = dir.path().join("psql");
    std::fs::write(&real, "").unwrap();
    assert!(!is_pg_wrapper(&real));
}

#[test]
fn urls_become_libpq_environment() {
    let c = PgConn::parse(
        "postgres://app%40x@db.example:6543/shop%20db?sslmode=require",
        None,
    )
    .unwrap();
    assert_eq!(c.database, "shop db");
    let get = |k: &str| c.env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get("PGHOST"), Some("db.example"));
    assert_eq!(get("PGPORT"), Some("6543"));
    assert_eq!(get("PGUSER"), Some("app@x"));
    assert_eq!(get("PGSSLMODE"), Some("require"));
    let e = PgConn::parse("postgres://u:secret@h/db", None).unwrap_err();
    assert!(!e.to_string().contains("secret"), "{e}");
    assert!(e.to_string().contains("password"), "{e}");
    assert!(PgConn::parse("postgres://h/db?bogus=1", None).is_err());
    assert!(PgConn::parse("mysql://h/db", None).is_err());
    let socket = PgConn::parse("postgres:///db?host=/run/postgresql&port=5433", None).unwrap();
    assert_eq!(socket.database, "db");
}

fn table(s: &str, n: &str, bytes: i64) -> Table {
    Table {
        schema: s.into(),
        name: n.into(),
        qualified: String::new(),
        pattern: String::new(),
        columns: None,
        key: None,
        bytes,
    }
}

#[test]
fn largest_tables_are_read_first() {
    let tables = [
        table("public", "a", 10),
        table("public", "b", 3000),
        table("public", "c", 0),
        table("public", "d", 200),
    ];
    assert_eq!(
        plan(&tables),
        [
            Step::PreData,
            Step::Table(1),
            Step::Table(3),
            Step::Table(0),
            Step::Table(2),
            Step::OtherData,
            Step::PostData
        ]
    );
}

#[test]
fn stream_names_sort_in_restore_order() {
    let t = |s: &str, n: &str| table(s, n, 0);
    let mut names = [
        "4-post-data.sql".to_string(),
        data_stream_name(9, &t("public", "a/b")),
        "3-data-other.sql".to_string(),
        data_stream_name(0, &t("x", "z")),
        "1-pre-data.sql".to_string(),
    ];
    names.sort();
    assert_eq!(names[0], "1-pre-data.sql");
    assert_eq!(names[1], "2-data-000001-x.z.sql");
    assert_eq!(names[2], "2-data-000010-public.a_b.sql");
    assert_eq!(names[4], "4-post-data.sql");
}
