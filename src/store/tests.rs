use super::*;

#[tokio::test]
async fn memory_store_basics() {
    let s = Store::open("memory://", false).unwrap();
    s.put("a/b/c", Bytes::from_static(b"hello")).await.unwrap();
    assert_eq!(
        s.get_bounded("a/b/c", 5).await.unwrap(),
        Bytes::from_static(b"hello")
    );
    // Larger than the format allows: refused, naming the object and the bound.
    let err = s.get_bounded("a/b/c", 4).await.unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("a/b/c") && err.to_string().contains("allows"));
    assert_eq!(
        s.get_range("a/b/c", 1..3).await.unwrap(),
        Bytes::from_static(b"el")
    );
    // Past the end, or running over it: the object is damaged (shorter than expected).
    for range in [7..9, 3..9] {
        let err = s.get_range("a/b/c", range.clone()).await.unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{range:?}: {err}");
        assert!(err.to_string().contains("a/b/c"), "{err}");
    }
    assert!(matches!(
        s.get_range("nope", 0..1).await,
        Err(Error::MissingObject { .. })
    ));
    assert_eq!(s.list("a").await.unwrap().len(), 1);
    assert!(s.list("b").await.unwrap().is_empty());
    assert!(matches!(
        s.get_bounded("nope", 10).await,
        Err(Error::MissingObject { .. })
    ));
    assert!(s.exists("a/b/c").await.unwrap());
    s.delete("a/b/c").await.unwrap();
    assert!(!s.exists("a/b/c").await.unwrap());
}

#[tokio::test]
async fn only_old_staging_files_are_stale() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path().to_str().unwrap(), false).unwrap();
    s.put("data/2026-11/ab/abcd", Bytes::from_static(b"object"))
        .await
        .unwrap();
    let at = |name: &str| dir.path().join(name);
    for name in [
        "data/2026-11/ab/old#1",
        "data/2026-11/ab/young#2",
        "index/x#",
    ] {
        std::fs::create_dir_all(at(name).parent().unwrap()).unwrap();
        std::fs::write(at(name), b"half").unwrap();
    }
    let hour_ago = filetime::FileTime::from_system_time(
        std::time::SystemTime::now() - std::time::Duration::from_secs(3600),
    );
    filetime::set_file_mtime(at("data/2026-11/ab/old#1"), hour_ago).unwrap();
    let before = std::time::SystemTime::now() - std::time::Duration::from_secs(600);
    // Only the staging file older than the cutoff: not the young one, not an object, not a
    // name that merely has a '#'.
    let stale = s.stale_staging(before).unwrap();
    assert_eq!(stale, vec![("data/2026-11/ab/old#1".to_string(), 4)]);
    s.remove_staging(&stale[0].0).unwrap();
    assert!(!at("data/2026-11/ab/old#1").exists());
    assert!(at("data/2026-11/ab/young#2").exists());
    assert!(at("data/2026-11/ab/abcd").exists());
    let memory = Store::open("memory://", false).unwrap();
    assert!(memory.stale_staging(before).unwrap().is_empty());
}

#[tokio::test]
async fn local_store_is_refused_when_missing_and_created_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("repo");
    let url = path.to_str().unwrap();
    assert!(matches!(
        Store::open(url, false),
        Err(Error::RepositoryNotFound { .. })
    ));
    let s = Store::open(&format!("file://{url}"), true).unwrap();
    s.put("x/y", Bytes::from_static(b"1")).await.unwrap();
    assert!(path.join("x/y").exists());
}

#[test]
fn bad_urls_name_the_problem() {
    assert!(
        Store::open("ftp://x", false)
            .unwrap_err()
            .to_string()
            .contains("unsupported")
    );
    assert!(
        Store::open("s3:///p", false)
            .unwrap_err()
            .to_string()
            .contains("bucket")
    );
    assert!(
        Store::open("s3://b/p?colour=red", false)
            .unwrap_err()
            .to_string()
            .contains("colour")
    );
}
