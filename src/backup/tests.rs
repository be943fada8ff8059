use super::*;
use crate::crypto::Key;
use crate::crypto::Sha256;
use crate::pack::{self, Compression};
use crate::snapshot::Source as SourceRecord;
use crate::source::NamedStream;
use std::sync::mpsc::{self, sync_channel};
use std::time::Duration;

#[test]
fn a_blob_that_would_not_restore_is_caught_before_upload() {
    let (key, repo) = (Key::random(), ObjectId::random());
    let keys = || pack::BlobKeys {
        epoch_key: &key,
        repo_id: &repo,
    };
    let data = b"INSERT INTO t VALUES (1, 'x');\n".repeat(500);
    let other = b"INSERT INTO t VALUES (2, 'y');\n".repeat(500);
    let compressed = zstd::bulk::compress(&data, 1).unwrap();
    let mut decompressor = zstd::bulk::Decompressor::new().unwrap();
    let (mut scratch, mut check) = (Vec::new(), Vec::new());
    let id = BlobId([5; 32]);
    for (compression, payload) in [
        (Compression::Zstd, &compressed[..]),
        (Compression::None, &data[..]),
    ] {
        let mut sealed = Vec::new();
        pack::seal_blob(
            &key,
            &repo,
            id,
            BlobKind::Data,
            compression,
            data.len() as u32,
            payload,
            &mut sealed,
        );
        let entry = pack::BlobEntry {
            id,
            kind: BlobKind::Data,
            compression,
            offset: 0,
            length: sealed.len() as u32,
            raw_length: data.len() as u32,
        };
        let mut verify = |sealed: &[u8], data: &[u8]| {
            verify_sealed(
                keys(),
                &entry,
                sealed,
                data,
                &mut scratch,
                &mut check,
                &mut decompressor,
            )
        };
        verify(&sealed, &data).unwrap();
        // Other plaintext than the id was hashed from: a compressor that got it wrong.
        let err = verify(&sealed, &other).unwrap_err().to_string();
        assert!(
            err.contains("does not decrypt and decompress to its input"),
            "{err}"
        );
        assert!(err.contains("nothing was written"), "{err}");
        // Sealed bytes damaged after sealing.
        let mut bad = sealed.clone();
        let last = bad.len() - 20;
        bad[last] ^= 1;
        let err = verify(&bad, &data).unwrap_err().to_string();
        assert!(
            err.contains("does not decrypt (authentication failed)"),
            "{err}"
        );
    }
}

/// Three streams read two at a time; the first one's data only arrives once the third
/// stream has been opened (or after 10 s).
struct Staggered {
    next: usize,
    third_opened: Option<mpsc::Sender<()>>,
    wait: Option<mpsc::Receiver<()>>,
    in_time: Arc<AtomicBool>,
}

/// Yields `data` once `gate` fires; records whether it fired in time.
struct Gated {
    gate: Option<mpsc::Receiver<()>>,
    data: std::io::Cursor<Vec<u8>>,
    in_time: Arc<AtomicBool>,
}

impl Read for Gated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(gate) = self.gate.take() {
            let fired = gate.recv_timeout(Duration::from_secs(10)).is_ok();
            self.in_time
                .store(fired, std::sync::atomic::Ordering::SeqCst);
        }
        self.data.read(buf)
    }
}

fn data(i: usize) -> Vec<u8> {
    format!("stream {i}\n")
        .repeat(10_000 * (i + 1))
        .into_bytes()
}

impl StreamSet for Staggered {
    fn next_stream(&mut self) -> Result<Option<NamedStream>> {
        let i = self.next;
        self.next += 1;
        let reader: Box<dyn Read + Send> = match i {
            0 => Box::new(Gated {
                gate: self.wait.take(),
                data: std::io::Cursor::new(data(0)),
                in_time: self.in_time.clone(),
            }),
            1 => Box::new(std::io::Cursor::new(data(1))),
            2 => {
                let _ = self.third_opened.take().expect("opened once").send(());
                Box::new(std::io::Cursor::new(data(2)))
            }
            _ => return Ok(None),
        };
        // Not in name order: the snapshot sorts them.
        Ok(Some(NamedStream {
            name: ["a.txt", "c.txt", "b.txt"][i].into(),
            reader,
        }))
    }

    fn finish(&mut self) -> Result<SourceRecord> {
        Ok(SourceRecord::Command {
            command: "staggered".into(),
        })
    }

    fn parallel_streams(&self) -> usize {
        2
    }
}

#[test]
fn a_batch_going_out_of_scope_unsent_still_reaches_the_workers() {
    // As when a file's read fails half-way: its first chunks are in `seen` already.
    let (tx, rx) = sync_channel(4);
    let cancel = Cancel::new();
    {
        let mut batch = Batch::new(&tx, &cancel);
        batch.push(test_job()).unwrap();
    }
    let sent = rx.try_recv().expect("the batch was sent as it was dropped");
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].id, BlobId([7; 32]));
}

fn test_job() -> Job {
    Job {
        id: BlobId([7; 32]),
        kind: BlobKind::Data,
        data: Bytes::from_static(b"read before the error"),
    }
}

#[test]
fn a_cancelled_batch_is_dropped_without_waiting_on_a_full_channel() {
    // The workers have stopped reading; the channel is full.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (tx, _rx) = sync_channel(1);
        tx.send(vec![test_job()]).unwrap();
        let cancel = Cancel::new();
        cancel.cancel();
        {
            let mut batch = Batch::new(&tx, &cancel);
            batch.push(test_job()).unwrap();
        }
        done_tx.send(()).unwrap();
    });
    done_rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("dropping the batch blocked");
}

/// A stream that finishes early hands its slot to the next stream while an earlier,
/// slower one is still being read; the snapshot lists the streams by name.
#[tokio::test]
async fn a_finished_stream_frees_its_slot_at_once() {
    let repo = crate::repository::for_tests("memory://").await;
    let (tx, rx) = mpsc::channel();
    let in_time = Arc::new(AtomicBool::new(false));
    let set = Staggered {
        next: 0,
        third_opened: Some(tx),
        wait: Some(rx),
        in_time: in_time.clone(),
    };
    let report = backup(
        &repo,
        Source::Streams(Box::new(set)),
        BackupOptions::new("staggered"),
    )
    .await
    .unwrap();
    assert!(
        in_time.load(std::sync::atomic::Ordering::SeqCst),
        "stream 2 was not opened while stream 0 was still being read"
    );
    let streams = &report.snapshot.streams;
    let names: Vec<&str> = streams.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(names, ["a.txt", "b.txt", "c.txt"]);
    for (s, i) in streams.iter().zip([0, 2, 1]) {
        assert_eq!(s.size, data(i).len() as u64);
        assert_eq!(s.sha256, Sha256::digest(&data(i)));
    }
}
