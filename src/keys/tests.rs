use super::*;

const FAST: KdfParams = KdfParams {
    memory_kib: 64,
    iterations: 1,
    parallelism: 1,
};

fn here() -> Creator {
    Creator {
        host: "h".into(),
        user: Some("someone".into()),
    }
}

#[test]
fn passphrase_slot_round_trip() {
    let keys = SlotKeys::new();
    let repo = ObjectId::random();
    let secret = Secret::passphrase("correct horse");
    let slot = KeySlot::create(&keys, repo, &secret, FAST, here(), None).unwrap();
    let decoded = KeySlot::decode(&slot.name(), &slot.encode()).unwrap();
    assert_eq!(
        decoded.unwrap_keys(&secret).unwrap(),
        Some(Unlocked::Full(keys.clone()))
    );
    assert_eq!(decoded.user.as_deref(), Some("someone"));
    assert_eq!(
        decoded.unwrap_keys(&Secret::passphrase("wrong")).unwrap(),
        None
    );
    assert_eq!(
        decoded
            .unwrap_keys(&Secret::KeyFile(Key::random()))
            .unwrap(),
        None
    );
    // The generation is bound to the wrapped keys: a slot that claims another one opens
    // nothing.
    let mut moved = decoded.clone();
    moved.generation = Some(ObjectId::random());
    assert_eq!(moved.unwrap_keys(&secret).unwrap(), None);
    let mut legacy = decoded;
    legacy.generation = None;
    assert_eq!(legacy.unwrap_keys(&secret).unwrap(), None);
}

#[test]
fn a_slot_made_before_key_generations_holds_one_master_key() {
    let master = Key::random();
    let keys = SlotKeys {
        records: master.clone(),
        epochs: master.clone(),
        generation: None,
    };
    let secret = Secret::passphrase("p");
    let slot = KeySlot::create(&keys, ObjectId::random(), &secret, FAST, here(), None).unwrap();
    assert_eq!(slot.wrapped.len(), 32 + 16);
    let Some(Unlocked::Full(got)) = slot.unwrap_keys(&secret).unwrap() else {
        panic!("a full slot")
    };
    assert_eq!(
        (got.records, got.epochs, got.generation),
        (master.clone(), master, None)
    );
    let next = keys.next_generation();
    assert_eq!(next.records, keys.records);
    assert!(next.epochs != keys.epochs && next.generation.is_some());
}

#[test]
fn key_file_slot_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k");
    generate_key_file(&path).unwrap();
    assert!(
        generate_key_file(&path).is_err(),
        "never overwrites a key file"
    );
    let secret = Secret::from_key_file(&path).unwrap();
    let keys = SlotKeys::new();
    let slot = KeySlot::create(&keys, ObjectId::random(), &secret, FAST, here(), None).unwrap();
    assert_eq!(
        slot.unwrap_keys(&secret).unwrap(),
        Some(Unlocked::Full(keys))
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert!(matches!(
        Secret::from_key_file(&path),
        Err(Error::InsecureSecretFile { mode: 0o640, .. })
    ));
    // Private, but another user's: that user can replace the secret (issue 18, defect 7).
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    if rustix::process::geteuid().is_root() {
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let e = Secret::from_key_file(&path).err().unwrap();
        assert!(
            matches!(e, Error::SecretFileOwner { owner: 65534, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("belongs to uid 65534"), "{e}");
    }
}

#[test]
fn corruption_is_named_not_mistaken_for_a_wrong_password() {
    let slot = KeySlot::create(
        &SlotKeys::new(),
        ObjectId::random(),
        &Secret::passphrase("p"),
        FAST,
        here(),
        None,
    )
    .unwrap();
    let bytes = slot.encode();
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x20;
        match KeySlot::decode(&slot.name(), &b) {
            Err(Error::Corrupt { object, .. }) | Err(Error::NewerFormat { object, .. }) => {
                assert_eq!(object, slot.name())
            }
            other => panic!("byte {i}: {other:?}"),
        }
    }
}

#[test]
fn a_write_only_slot_holds_the_records_key_and_its_writer_key_only() {
    let keys = WriterKeys {
        prune: Key::random(),
        writer: Key::random(),
    };
    let secret = Secret::passphrase("host");
    let slot =
        KeySlot::create_write_only(&keys, ObjectId::random(), &secret, FAST, here(), None).unwrap();
    let decoded = KeySlot::decode(&slot.name(), &slot.encode()).unwrap();
    assert!(decoded.write_only() && decoded.generation.is_none());
    assert_eq!(
        decoded.unwrap_keys(&secret).unwrap(),
        Some(Unlocked::WriteOnly(keys))
    );
    // The role is bound to the wrapped keys: a slot that drops it (to pass its writer key
    // off as an epoch-wrapping key) opens nothing, nor one that claims a generation.
    let mut full = decoded.clone();
    full.role = None;
    assert_eq!(full.unwrap_keys(&secret).unwrap(), None);
    let mut generation = decoded;
    generation.generation = Some(ObjectId::random());
    assert_eq!(generation.unwrap_keys(&secret).unwrap(), None);
}
