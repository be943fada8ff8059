//! The uploader: sealed packs to storage, a bounded number at once, and the index checkpoints
//! (each checked against prune's marks before it is written).

use futures::StreamExt;
use futures::stream::FuturesUnordered;

use crate::buffer::BufferPool;
use crate::error::{Error, Result};
use crate::index::{IdSet, IndexSegment, IndexedPack};
use crate::progress::{Cancel, Progress};

use super::*;

pub(super) async fn upload_packs(
    to: UploadTo<'_>,
    mut rx: tokio::sync::mpsc::Receiver<SealedPack>,
    uploads: usize,
    buffers: &BufferPool,
    cancel: &Cancel,
    progress: &Progress,
) -> Result<Uploaded> {
    let UploadTo {
        repo,
        key,
        prune_view,
    } = to;
    let mut done = Uploaded {
        pending: IndexSegment::default(),
        bytes: 0,
        packs: IdSet::default(),
    };
    let mut inflight = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            next = rx.recv(), if open && inflight.len() < uploads => match next {
                Some(sealed) => inflight.push(async move {
                    let SealedPack { pack, _token } = sealed;
                    let len = pack.bytes.len();
                    repo.store().put(&pack.name, pack.bytes.clone()).await?;
                    buffers.give_bytes(pack.bytes);
                    Ok::<_, Error>(IndexedPack { id: pack.id, length: len as u32, blobs: pack.entries })
                }),
                None => open = false,
            },
            Some(result) = inflight.next(), if !inflight.is_empty() => {
                let indexed = match result {
                    Ok(p) => p,
                    Err(e) => {
                        cancel.cancel();
                        return Err(e);
                    }
                };
                done.bytes += u64::from(indexed.length);
                done.packs.insert(indexed.id);
                Progress::add(&progress.stored_bytes, u64::from(indexed.length));
                done.pending.packs.push(indexed);
                if done.pending.blob_count() >= SEGMENT_BLOBS
                    || done.pending.packs.len() >= SEGMENT_PACKS
                {
                    let segment = std::mem::take(&mut done.pending);
                    // A checkpoint must not list a pack a prune swept meanwhile: later
                    // backups would deduplicate against data that is gone.
                    let packs = segment.packs.iter().map(|p| p.id).collect();
                    if let Err(e) = prune_view.check_commit(repo, &packs, (key.epoch, key.id)).await {
                        cancel.cancel();
                        return Err(e);
                    }
                    let (_, size) = repo.save_index(key, &segment).await?;
                    done.bytes += size;
                }
            },
            else => break,
        }
    }
    Ok(done)
}
