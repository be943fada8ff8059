//! A pool of large byte buffers, so a long backup or restore reuses the same few allocations.
//!
//! Why: glibc raises its mmap and trim thresholds each time a large buffer is freed, after which
//! every thread's arena keeps freed 16 MiB pack buffers instead of returning them: a 370 MB
//! backup peaked at 145 MB RSS, and the peak grew with the input. Recycling bounds the peak by
//! the pipeline's depth, whatever the input size (docs/BENCHMARKS.md has the figures).

use std::sync::Mutex;

use bytes::Bytes;

/// At most `keep` idle buffers; more are freed on return.
pub struct BufferPool {
    idle: Mutex<Vec<Vec<u8>>>,
    keep: usize,
    capacity: usize,
}

impl BufferPool {
    /// A pool whose new buffers have room for `capacity` bytes.
    pub fn new(keep: usize, capacity: usize) -> BufferPool {
        BufferPool {
            idle: Mutex::new(Vec::new()),
            keep,
            capacity,
        }
    }

    /// A buffer, recycled when one is idle; empty unless it was handed back with
    /// [`BufferPool::give_initialized`].
    pub fn take(&self) -> Vec<u8> {
        let recycled = self.idle.lock().expect("not poisoned").pop();
        recycled.unwrap_or_else(|| Vec::with_capacity(self.capacity))
    }

    /// Hands a buffer back for reuse.
    pub fn give(&self, mut buf: Vec<u8>) {
        buf.clear();
        self.give_initialized(buf);
    }

    /// A buffer of at least `len` initialized bytes (their contents are left over from its
    /// last use), for readers that fill a slice: only growth is zeroed, not every reuse.
    /// Buffers taken this way go back with [`BufferPool::give_initialized`].
    pub fn take_initialized(&self, len: usize) -> Vec<u8> {
        let mut buf = self.take();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        buf
    }

    /// Hands back a buffer from [`BufferPool::take_initialized`], keeping its length.
    pub fn give_initialized(&self, buf: Vec<u8>) {
        let mut idle = self.idle.lock().expect("not poisoned");
        if idle.len() < self.keep {
            idle.push(buf);
        }
    }

    /// Hands back the buffer behind `bytes` if nothing else still refers to it.
    pub fn give_bytes(&self, bytes: Bytes) {
        if let Ok(b) = bytes.try_into_mut() {
            self.give(b.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_bounded() {
        let pool = BufferPool::new(1, 1024);
        let mut a = pool.take();
        a.extend_from_slice(b"hello");
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take();
        assert!(b.is_empty());
        assert_eq!(b.as_ptr(), ptr, "the idle buffer is handed out again");
        pool.give(b);
        pool.give(Vec::with_capacity(10)); // over `keep`: dropped
        assert_eq!(pool.idle.lock().unwrap().len(), 1);
        let shared = Bytes::from(pool.take());
        let other = shared.clone();
        pool.give_bytes(shared); // still referenced: not recycled
        assert_eq!(pool.idle.lock().unwrap().len(), 0);
        drop(other);
    }
}
