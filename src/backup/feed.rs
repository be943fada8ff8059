//! What a copy feeds the backup pipeline ([`super::Source::Copy`]): the source repository's
//! snapshot, walked depth first by [`crate::copy`], its blobs with their boundaries kept. It
//! lives here, with the pipeline that reads it, so that the pipeline does not depend on the
//! copy that drives it.

use std::sync::Arc;

use bytes::Bytes;

use crate::snapshot::Snapshot;
use crate::tree::Node;

/// What the source walk tells the destination's backup pipeline, depth first.
pub(crate) enum CopyEvent {
    /// A directory: its entries follow, then [`CopyEvent::EndDir`].
    Dir(Node),
    EndDir,
    /// A file: its content's blobs follow, in order, then [`CopyEvent::EndFile`].
    File(Node),
    Blob(Bytes),
    EndFile,
    Symlink(Node),
    /// The whole root was walked.
    Done,
}

/// Plaintext bytes of blobs on their way from the walk to the pipeline, at most.
pub(crate) const IN_FLIGHT_BYTES: usize = 16 << 20;

/// The destination side of a copy: the walk's events and the snapshot being copied.
pub struct CopyFeed {
    pub(crate) events: tokio::sync::mpsc::Receiver<CopyEvent>,
    pub(crate) snapshot: Snapshot,
    /// Bounds the bytes of blobs in `events`: the walk takes [`kib`] permits per blob, the
    /// pipeline gives them back as it takes the blob.
    pub(crate) budget: Arc<tokio::sync::Semaphore>,
}

impl Drop for CopyFeed {
    /// However the pipeline ends (done, failed, never started), a walk waiting for budget
    /// must not wait forever: closing the semaphore fails its wait, and it stops.
    fn drop(&mut self) {
        self.budget.close();
    }
}

/// A blob's share of [`IN_FLIGHT_BYTES`], in KiB permits.
pub(crate) fn kib(len: usize) -> u32 {
    (len.div_ceil(1024).clamp(1, IN_FLIGHT_BYTES / 1024)) as u32
}
