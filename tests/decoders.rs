//! Every decoder of the repository format fed random and mutated input (the reliability suite
//! of issue 18): object headers, key slots, pack tables of contents, index segments, trees and
//! content lists, snapshot manifests, drill reports, prune and forget records, the config.
//! None may panic, and none may allocate far beyond its input (a length field claiming 4 GiB
//! must not become a 4 GiB allocation).
//!
//! CI runs each decoder for a share of `KLUIS_FUZZ_SECONDS` (default 4 s in all);
//! `benches/fuzz.sh` runs it for minutes and records the figures in docs/RELIABILITY.md.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use kluis::crypto::Key;
use kluis::id::{BlobId, ObjectId};
use kluis::index::{IndexSegment, IndexedPack};
use kluis::keys::{Creator, KdfParams, KeySlot, Secret, SlotKeys};
use kluis::object::{Epoch, Kind};
use kluis::pack::{self, BlobEntry, BlobKind, Compression, PackWriter};
use kluis::tree::{self, NameBytes, Node, NodeType, Tree};

/// Counts the bytes this test allocates, to bound what a decoder allocates.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: implementing `GlobalAlloc` needs `unsafe`; this one only delegates to the system
// allocator with the caller's layout and pointer, and keeps two counters on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Relaxed) + layout.size();
        PEAK.fetch_max(live, Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A mutation of `seed`: bit flips, a field set to an extreme, bytes cut, inserted or
/// repeated, or random bytes outright.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(8) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if v.len() >= 4 => {
                let i = rng.below(v.len() - 3);
                let extreme = [u32::MAX, u32::MAX / 46, 0x8000_0000, 0, 1][rng.below(5)];
                v[i..i + 4].copy_from_slice(&extreme.to_le_bytes());
            }
            2 if !v.is_empty() => v.truncate(rng.below(v.len())),
            3 => {
                let i = rng.below(v.len() + 1);
                let n = 1 + rng.below(64);
                let extra = rng.bytes(n);
                v.splice(i..i, extra);
            }
            4 if !v.is_empty() => {
                let (a, b) = (rng.below(v.len()), rng.below(v.len()));
                let (a, b) = (a.min(b), a.max(b));
                let piece = v[a..b].to_vec();
                v.extend_from_slice(&piece);
            }
            5 if !v.is_empty() => {
                // JSON and text fields: a digit, quote or bracket somewhere else.
                let i = rng.below(v.len());
                v[i] = b"0123456789\"{}[],:-e"[rng.below(19)];
            }
            6 => {
                let n = rng.below(2048);
                return rng.bytes(n);
            }
            _ => {}
        }
    }
    v
}

/// Runs `decode` on mutations of `seeds` for `budget`; a panic or an allocation above
/// `32 * input + 1 MiB` fails. Returns the inputs tried.
fn fuzz(
    what: &str,
    seeds: &[Vec<u8>],
    budget: Duration,
    rng: &mut Rng,
    decode: &dyn Fn(&[u8]),
) -> usize {
    let started = Instant::now();
    let mut tried = 0;
    while started.elapsed() < budget || tried < 100 {
        let pick = rng.below(seeds.len());
        let input = mutate(rng, &seeds[pick]);
        let base = LIVE.load(Relaxed);
        PEAK.store(base, Relaxed);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode(&input)));
        let peak = PEAK.load(Relaxed).saturating_sub(base);
        assert!(
            result.is_ok(),
            "{what}: the decoder panicked on {} bytes: {}",
            input.len(),
            hex::encode(&input[..input.len().min(256)])
        );
        let bound = 32 * input.len() + (1 << 20);
        assert!(
            peak <= bound,
            "{what}: decoding {} bytes allocated {peak} bytes at once (bound {bound}): {}",
            input.len(),
            hex::encode(&input[..input.len().min(256)])
        );
        tried += 1;
    }
    tried
}

fn node(name: &str, node_type: NodeType) -> Node {
    Node {
        name: NameBytes(name.as_bytes().to_vec()),
        node_type,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_ns: 1_700_000_000_000_000_000,
        size: (node_type == NodeType::File).then_some(3),
        sha256: (node_type == NodeType::File).then_some([7; 32]),
        content: if node_type == NodeType::File {
            vec![BlobId([1; 32])]
        } else {
            vec![]
        },
        content_lists: vec![],
        subtree: (node_type == NodeType::Dir).then_some(BlobId([2; 32])),
        target: (node_type == NodeType::Symlink).then(|| NameBytes(b"../x".to_vec())),
    }
}

#[test]
fn no_decoder_panics_or_over_allocates_on_random_and_mutated_input() {
    let total: f64 = std::env::var("KLUIS_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4.0);
    let seed: u64 = std::env::var("KLUIS_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x006b_6c75_6973);
    let budget = Duration::from_secs_f64(total / 10.0);
    let mut rng = Rng(seed | 1);
    let mut counts: Vec<(&str, usize)> = Vec::new();

    // Object headers, checked before anything is decrypted.
    let header = kluis::object::Header {
        kind: Kind::Snapshot,
        key_id: ObjectId::random(),
    }
    .encode()
    .to_vec();
    counts.push((
        "header",
        fuzz("header", &[header], budget, &mut rng, &|b| {
            let _ = kluis::object::Header::decode("x", b, Kind::Snapshot);
        }),
    ));

    // Key slots: checked by an unkeyed checksum only, so anyone can write a valid one.
    let keys = SlotKeys::new();
    let creator = || Creator {
        host: "h".into(),
        user: Some("u".into()),
    };
    let repo_id = ObjectId::random();
    let fast = KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };
    let slots = vec![
        KeySlot::create(
            &keys,
            repo_id,
            &Secret::passphrase("pw"),
            fast,
            creator(),
            None,
        )
        .unwrap()
        .encode(),
        KeySlot::create(
            &keys,
            repo_id,
            &Secret::KeyFile(Key::random()),
            fast,
            creator(),
            Some("label".into()),
        )
        .unwrap()
        .encode(),
    ];
    counts.push((
        "key slot",
        fuzz("key slot", &slots, budget, &mut rng, &|b| {
            if let Ok(slot) = KeySlot::decode("keys/x", b) {
                // A slot that decodes is tried: bounded parameters, no panic.
                if slot.kdf.is_some_and(|k| k.cost() <= 64 * 4) {
                    let _ = slot.unwrap_keys(&Secret::passphrase("pw"));
                }
            }
        }),
    ));

    // Packs: the table of contents is parsed after it authenticates, but lengths and offsets
    // around it are read before.
    let epoch = Epoch::parse("2026-12").unwrap();
    let epoch_key = Key::random();
    let key_id = ObjectId::random();
    let mut writer = PackWriter::new(epoch, key_id, &epoch_key, repo_id, 1 << 20);
    let mut sealed = Vec::new();
    for i in 0..5u8 {
        let payload = vec![i; 100 + usize::from(i) * 10];
        let id = BlobId([i; 32]);
        pack::seal_blob(
            &epoch_key,
            &repo_id,
            id,
            BlobKind::Data,
            Compression::None,
            payload.len() as u32,
            &payload,
            &mut sealed,
        );
        writer.add_sealed(
            id,
            BlobKind::Data,
            Compression::None,
            payload.len() as u32,
            &sealed,
        );
    }
    let finished = writer.finish(epoch);
    let pack_key = pack::pack_key(&epoch_key, &repo_id, &finished.name);
    let name = finished.name.clone();
    counts.push((
        "pack",
        fuzz("pack", &[finished.bytes.to_vec()], budget, &mut rng, &|b| {
            let _ = pack::read_toc(&name, b, &pack_key, &repo_id);
        }),
    ));

    // Index segments (after authentication: a key holder's mistakes must not crash readers).
    let segment = IndexSegment {
        supersedes: vec![ObjectId::random()],
        packs: vec![IndexedPack {
            id: ObjectId::random(),
            length: 10_000,
            blobs: (0..4u8)
                .map(|i| BlobEntry {
                    id: BlobId([i; 32]),
                    kind: BlobKind::Data,
                    compression: Compression::Zstd,
                    offset: 24 + u32::from(i) * 100,
                    length: 100,
                    raw_length: 300,
                })
                .collect(),
        }],
    };
    counts.push((
        "index segment",
        fuzz(
            "index segment",
            &[segment.encode()],
            budget,
            &mut rng,
            &|b| {
                let _ = IndexSegment::decode("index/x", b);
            },
        ),
    ));

    // Trees and content lists.
    let trees = vec![
        Tree {
            nodes: vec![
                node("a", NodeType::Dir),
                node("b", NodeType::File),
                node("c", NodeType::Symlink),
            ],
        }
        .encode(),
        Tree::default().encode(),
    ];
    counts.push((
        "tree",
        fuzz("tree", &trees, budget, &mut rng, &|b| {
            let _ = Tree::decode("tree", b);
        }),
    ));
    let list = tree::encode_list(&[BlobId([3; 32]), BlobId([4; 32])]);
    counts.push((
        "content list",
        fuzz("content list", &[list], budget, &mut rng, &|b| {
            let _ = tree::decode_list("list", b);
        }),
    ));

    // JSON records: a manifest, a drill report, prune's and the ledger's records, the config.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (config, snapshot, mark) = rt.block_on(async {
        let store = kluis::store::Store::open("memory://", true).unwrap();
        let repo = kluis::repository::Repository::init(
            store,
            &Secret::passphrase("pw"),
            kluis::repository::InitOptions {
                kdf: fast,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let source = kluis::backup::Source::Stream(Box::new(std::io::Cursor::new(
            b"INSERT INTO t VALUES (1);\n".repeat(100),
        )));
        let report = kluis::backup::backup(&repo, source, kluis::backup::BackupOptions::new("db"))
            .await
            .unwrap();
        let mark = kluis::prune::Mark {
            id: ObjectId::random(),
            created: jiff::Timestamp::now(),
            host: "h".into(),
            grace_seconds: 3600,
            packs: vec![format!("data/2026-12/ab/ab{}", "0".repeat(30))],
            segments: vec![],
            keys: vec![format!("epochs/2026-12/{}", "0".repeat(32))],
        };
        (
            serde_json::to_vec(repo.config()).unwrap(),
            report.snapshot.encode(),
            serde_json::to_vec(&mark).unwrap(),
        )
    });
    let snapshot_id = serde_json::from_slice::<kluis::snapshot::Snapshot>(&snapshot)
        .unwrap()
        .id;
    counts.push((
        "snapshot manifest",
        fuzz("snapshot manifest", &[snapshot], budget, &mut rng, &|b| {
            let _ = kluis::snapshot::Snapshot::decode("snapshots/x", snapshot_id, b);
        }),
    ));
    counts.push((
        "config",
        fuzz("config", &[config], budget, &mut rng, &|b| {
            if let Ok(c) = serde_json::from_slice::<kluis::repository::RepoConfig>(b) {
                let _ = c.chunker.validate();
            }
        }),
    ));
    let forgotten = serde_json::to_vec(&kluis::ledger::Forgotten {
        id: ObjectId::random(),
        time: jiff::Timestamp::now(),
        host: "h".into(),
        chain: Some(kluis::ledger::Chain {
            id: ObjectId::random(),
            seq: 3,
            previous: Some("snapshots/2026-12/00".into()),
        }),
        records: vec!["snapshots/2026-12/11".into()],
    })
    .unwrap();
    counts.push((
        "prune and ledger records",
        fuzz(
            "prune and ledger records",
            &[mark, forgotten],
            budget,
            &mut rng,
            &|b| {
                let _ = serde_json::from_slice::<kluis::prune::Mark>(b);
                let _ = serde_json::from_slice::<kluis::prune::Lease>(b);
                let _ = serde_json::from_slice::<kluis::ledger::Forgotten>(b);
            },
        ),
    ));
    let report = br#"{"id":"00112233445566778899aabbccddeeff","drill":"d","job":"j","repository":"r","host":"h","snapshot":"00112233445566778899aabbccddeeff","snapshot_time":"2026-12-01T00:00:00Z","snapshot_name":"db","pick":"newest","kind":"stream","target":"t","started":"2026-12-01T00:00:00Z","finished":"2026-12-01T00:00:01Z","restore_seconds":1.5,"checks":[{"name":"hash","ok":true,"detail":""}],"passed":true,"cleaned_up":true,"program":"kluis 0.1.0"}"#;
    assert!(serde_json::from_slice::<kluis::drill::DrillReport>(report).is_ok());
    counts.push((
        "drill report",
        fuzz("drill report", &[report.to_vec()], budget, &mut rng, &|b| {
            let _ = serde_json::from_slice::<kluis::drill::DrillReport>(b);
        }),
    ));

    let all: usize = counts.iter().map(|(_, n)| n).sum();
    eprintln!(
        "decoders: {all} inputs in {:.0} s (seed {seed}): {}",
        total,
        counts
            .iter()
            .map(|(w, n)| format!("{w} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
