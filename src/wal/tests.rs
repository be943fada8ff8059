use super::*;

#[test]
fn wal_file_names() {
    let cases: &[(&str, Option<WalKind>)] = &[
        (
            "000000010000000000000001",
            Some(WalKind::Segment {
                timeline: 1,
                number: 1,
            }),
        ),
        (
            "00000002000000A1000000FF",
            Some(WalKind::Segment {
                timeline: 2,
                number: (0xA1 << 32) | 0xFF,
            }),
        ),
        ("00000002.history", Some(WalKind::History { timeline: 2 })),
        (
            "000000010000000000000002.00000028.backup",
            Some(WalKind::Backup),
        ),
        ("000000010000000000000002.partial", Some(WalKind::Partial)),
        ("00000001000000000000000a", None),
        ("00000001000000000000001", None),
        ("0000000100000000000000011", None),
        ("2.history", None),
        ("000000010000000000000002.backup", None),
        ("../../etc/passwd", None),
        ("", None),
    ];
    for (name, want) in cases {
        let got = WalFile::parse(name).ok().map(|f| f.kind());
        assert_eq!(got, *want, "{name:?}");
    }
    for ok in ["main", "db-1.prod_eu"] {
        parse_cluster(ok).unwrap();
    }
    for bad in ["", ".x", "a/b", "a b", &"x".repeat(65)] {
        assert!(parse_cluster(bad).is_err(), "{bad:?}");
    }
}

/// A 16 MiB segment whose first page has a long header with `system`.
fn segment(seed: u8, system: u64) -> Vec<u8> {
    let mut raw = vec![0u8; 16 << 20];
    raw[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
    raw[2..4].copy_from_slice(&0x0002u16.to_le_bytes());
    raw[24..32].copy_from_slice(&system.to_le_bytes());
    for (i, b) in raw.iter_mut().enumerate().skip(64).step_by(4096) {
        *b = seed.wrapping_add(i as u8);
    }
    raw
}

#[tokio::test]
async fn push_fetch_list_and_the_checks_on_the_way() {
    let repo = crate::repository::for_tests("memory://").await;
    let dir = tempfile::tempdir().unwrap();
    let name = "000000010000000000000003";
    let path = dir.path().join(name);
    let raw = segment(1, 7_000_000_000_000_000_001);
    std::fs::write(&path, &raw).unwrap();

    let pushed = push(&repo, "main", &path).await.unwrap();
    assert!(
        !pushed.already && pushed.stored < pushed.bytes / 10,
        "{pushed:?}"
    );
    // Again (PostgreSQL retrying after a crash): accepted, nothing uploaded.
    let again = push(&repo, "main", &path).await.unwrap();
    assert!(again.already && again.stored == 0);
    // Other content under the same name: refused, the archive unchanged.
    std::fs::write(&path, segment(2, 1)).unwrap();
    let e = push(&repo, "main", &path).await.unwrap_err();
    assert!(matches!(e, Error::Conflict(_)), "{e}");
    assert!(e.to_string().contains("other content"), "{e}");
    // Another cluster's namespace is its own.
    push(&repo, "other", &path).await.unwrap();

    let out = dir.path().join("restored");
    let fetched = fetch(&repo, "main", name, &out).await.unwrap().unwrap();
    assert_eq!(fetched.system, 7_000_000_000_000_000_001);
    assert!(std::fs::read(&out).unwrap() == raw);
    assert!(
        fetch(&repo, "main", "000000010000000000000004", &out)
            .await
            .unwrap()
            .is_none(),
        "a file the archive does not hold is reported missing, not an error"
    );
    let listed = list(&repo, "main").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].file, name);
    assert_eq!(
        system_identifier(&repo, &listed[0].object).await.unwrap(),
        7_000_000_000_000_000_001
    );

    // Wrong sizes and names are refused before anything is read from the archive.
    let short = dir.path().join("000000010000000000000009");
    std::fs::write(&short, vec![0u8; 1000]).unwrap();
    assert!(push(&repo, "main", &short).await.is_err());
    let junk = dir.path().join("notes.txt");
    std::fs::write(&junk, b"x").unwrap();
    assert!(push(&repo, "main", &junk).await.is_err());

    // A flipped byte in the archive is named, and nothing is written.
    let object = listed[0].object.clone();
    let mut bytes = repo
        .store()
        .get_bounded(&object, 1 << 30)
        .await
        .unwrap()
        .to_vec();
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    repo.store().put(&object, Bytes::from(bytes)).await.unwrap();
    let dest = dir.path().join("tampered");
    let e = fetch(&repo, "main", name, &dest).await.unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains(&object), "{e}");
    assert!(!dest.exists());
}
