use super::*;
use crate::crypto::ChunkHasher;

struct Built {
    pack: FinishedPack,
    pack_key: Key,
    epoch_key: Key,
    repo: ObjectId,
}

impl Built {
    fn keys(&self) -> BlobKeys<'_> {
        BlobKeys {
            epoch_key: &self.epoch_key,
            repo_id: &self.repo,
        }
    }
}

fn build(blobs: &[&[u8]]) -> Built {
    let epoch_key = Key::random();
    let repo = ObjectId::random();
    let epoch = Epoch::parse("2026-11").unwrap();
    let hasher = ChunkHasher::new(&Key::random());
    let mut w = PackWriter::new(epoch, ObjectId::random(), &epoch_key, repo, 1 << 20);
    let mut sealed = Vec::new();
    for (i, b) in blobs.iter().enumerate() {
        let id = BlobId(hasher.hash(b));
        let (kind, compression, payload) = if i % 2 == 0 {
            (
                BlobKind::Data,
                Compression::Zstd,
                zstd::bulk::compress(b, 1).unwrap(),
            )
        } else {
            (BlobKind::Tree, Compression::None, b.to_vec())
        };
        let raw = b.len() as u32;
        seal_blob(
            &epoch_key,
            &repo,
            id,
            kind,
            compression,
            raw,
            &payload,
            &mut sealed,
        );
        w.add_sealed(id, kind, compression, raw, &sealed);
    }
    let pack = w.finish(epoch);
    let pack_key = pack_key(&epoch_key, &repo, &pack.name);
    Built {
        pack,
        pack_key,
        epoch_key,
        repo,
    }
}

#[test]
fn round_trip_and_verify() {
    let blobs: [&[u8]; 3] = [b"first blob first blob first blob", b"second", b""];
    let b = build(&blobs);
    verify_sealed(&b.pack, &b.pack_key, b.keys(), &mut Vec::new()).unwrap();
    let toc = read_toc(&b.pack.name, &b.pack.bytes, &b.pack_key, &b.repo).unwrap();
    let mut dec = zstd::bulk::Decompressor::new().unwrap();
    for (e, want) in toc.iter().zip(blobs) {
        let range = e.offset as usize..(e.offset + e.length) as usize;
        let mut stored = b.pack.bytes[range].to_vec();
        let plain = open_blob(&b.pack.name, b.keys(), e, &mut stored, &mut dec).unwrap();
        assert_eq!(plain, want);
    }
}

#[test]
fn the_table_of_contents_reads_from_the_packs_two_ends() {
    let b = build(&[b"first blob first blob", b"second", b"third"]);
    let bytes = &b.pack.bytes[..];
    let len = bytes.len() as u64;
    let whole = read_toc(&b.pack.name, bytes, &b.pack_key, &b.repo).unwrap();
    let toc_len = u32::from_le_bytes(bytes[bytes.len() - 4..].try_into().unwrap()) as usize;
    let head = &bytes[..crate::object::HEADER_LEN];
    // The tail exactly, or with some blob bytes before it.
    for extra in [0, 5] {
        let tail = &bytes[bytes.len() - toc_len - 4 - extra..];
        let parts = read_toc_parts(&b.pack.name, head, tail, len, &b.pack_key, &b.repo).unwrap();
        assert_eq!(parts, whole);
    }
    // A tail that does not reach back to the TOC's start is refused, not misread.
    let short = &bytes[bytes.len() - toc_len..];
    let err = read_toc_parts(&b.pack.name, head, short, len, &b.pack_key, &b.repo)
        .unwrap_err()
        .to_string();
    assert!(err.contains("begins before"), "{err}");
    // Any flipped byte of the header or of the tail fails, naming the pack.
    let tail = &bytes[bytes.len() - toc_len - 4..];
    for i in 0..head.len() + tail.len() {
        let (mut h, mut t) = (head.to_vec(), tail.to_vec());
        if i < h.len() {
            h[i] ^= 1;
        } else {
            t[i - h.len()] ^= 1;
        }
        let err = read_toc_parts(&b.pack.name, &h, &t, len, &b.pack_key, &b.repo)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&b.pack.name), "byte {i}: {err}");
    }
}

#[test]
fn every_flipped_byte_is_detected() {
    let b = build(&[b"aaaaaaaaaaaaaaaaaaaaaaaaa", b"bbbb"]);
    for i in 0..b.pack.bytes.len() {
        let mut bytes = b.pack.bytes.to_vec();
        bytes[i] ^= 0x01;
        let tampered = FinishedPack {
            bytes: bytes.into(),
            entries: b.pack.entries.clone(),
            name: b.pack.name.clone(),
            id: b.pack.id,
            epoch: b.pack.epoch,
        };
        let err = verify_sealed(&tampered, &b.pack_key, b.keys(), &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains(&b.pack.name), "byte {i}: {err}");
    }
}

#[test]
fn a_blob_moved_to_another_id_or_repository_does_not_open() {
    let b = build(&[b"payload one", b"payload two"]);
    let toc = read_toc(&b.pack.name, &b.pack.bytes, &b.pack_key, &b.repo).unwrap();
    let mut dec = zstd::bulk::Decompressor::new().unwrap();
    let stored =
        |e: &BlobEntry| b.pack.bytes[e.offset as usize..(e.offset + e.length) as usize].to_vec();
    // The first blob's bytes under the second blob's entry (id, kind, lengths).
    let mut swapped = toc[1];
    swapped.length = toc[0].length;
    assert!(
        open_blob(
            &b.pack.name,
            b.keys(),
            &swapped,
            &mut stored(&toc[0]),
            &mut dec
        )
        .is_err()
    );
    let other_repo = ObjectId::random();
    let keys = BlobKeys {
        epoch_key: &b.epoch_key,
        repo_id: &other_repo,
    };
    assert!(open_blob(&b.pack.name, keys, &toc[0], &mut stored(&toc[0]), &mut dec).is_err());
    assert!(
        open_blob(
            &b.pack.name,
            b.keys(),
            &toc[0],
            &mut stored(&toc[0]),
            &mut dec
        )
        .is_ok()
    );
}

#[test]
fn the_same_blob_sealed_twice_uses_fresh_nonces() {
    let (key, repo) = (Key::random(), ObjectId::random());
    let id = BlobId([7; 32]);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    seal_blob(
        &key,
        &repo,
        id,
        BlobKind::Data,
        Compression::None,
        3,
        b"abc",
        &mut a,
    );
    seal_blob(
        &key,
        &repo,
        id,
        BlobKind::Data,
        Compression::None,
        3,
        b"abc",
        &mut b,
    );
    assert_ne!(a[..NONCE_LEN], b[..NONCE_LEN]);
    assert_ne!(a, b);
}
