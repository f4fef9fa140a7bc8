//! Reused buffers for the bytes of range reads (remote bodies, disk reads), handed out as
//! [`Bytes`].
//!
//! Large allocations are served by `mmap` (src/main.rs, `tune_allocator`, so that freed memory
//! goes back to the system), and a fresh mapping costs a page fault per 4 KiB on first touch:
//! measured, 280,000 faults for a cold sequential read of 1 GiB through the mount. A buffer
//! whose last [`Bytes`] view is dropped comes back here instead, up to [`KEPT_BYTES`], and the
//! next read of about its size fills it again: 48,000 faults, and the daemon's CPU time for
//! that read went from 2.2 s to 1.6 s (docker-registry, 2 cores).

use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

/// Free buffers kept, in bytes of capacity at most: two of the largest read-ahead requests
/// (8 MiB). Beyond that, the buffers kept longest are freed.
const KEPT_BYTES: usize = 16 << 20;
/// Buffers smaller than this are not worth keeping (malloc reuses them well: they are not
/// served by `mmap`).
const MIN_KEPT: usize = 128 << 10;

/// The buffers of this process.
static POOL: Pool = Pool::new(KEPT_BYTES);

/// An empty buffer with room for `len` bytes; see [`Pool::take`].
pub fn take(len: usize) -> Vec<u8> {
    POOL.take(len)
}

/// `buf` as [`Bytes`], its memory reused once dropped; see [`Pool::share`].
pub fn share(buf: Vec<u8>) -> Bytes {
    POOL.share(buf)
}

/// Free buffers, up to a total capacity.
pub struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
    max_bytes: usize,
}

impl Pool {
    pub const fn new(max_bytes: usize) -> Self {
        Self {
            free: Mutex::new(Vec::new()),
            max_bytes,
        }
    }

    fn free(&self) -> MutexGuard<'_, Vec<Vec<u8>>> {
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An empty buffer with room for `len` bytes: a kept one of `len` to `2 * len` bytes of
    /// capacity if there is one (the smallest), else a new one.
    pub fn take(&self, len: usize) -> Vec<u8> {
        if len >= MIN_KEPT {
            let mut free = self.free();
            let fits = (0..free.len())
                .filter(|&i| (len..=len.saturating_mul(2)).contains(&free[i].capacity()))
                .min_by_key(|&i| free[i].capacity());
            if let Some(i) = fits {
                let mut buf = free.swap_remove(i);
                buf.clear();
                return buf;
            }
        }
        let mut buf = Vec::new();
        // A length no allocation can hold (a bad size from a server) is not an abort: the
        // buffer grows as bytes arrive instead.
        let _ = buf.try_reserve_exact(len);
        buf
    }

    /// `buf` as [`Bytes`]; its memory comes back to this pool when the last view of it is
    /// dropped.
    pub fn share(&'static self, buf: Vec<u8>) -> Bytes {
        if buf.capacity() < MIN_KEPT {
            return Bytes::from(buf);
        }
        Bytes::from_owner(Returned(buf, self))
    }

    /// Keeps `buf`, freeing the buffers kept longest if that passes the bound: the latest
    /// ones fit the reads going on now.
    fn give_back(&self, buf: Vec<u8>) {
        if buf.capacity() > self.max_bytes {
            return;
        }
        let mut free = self.free();
        free.push(buf);
        let mut kept: usize = free.iter().map(Vec::capacity).sum();
        while kept > self.max_bytes {
            kept -= free.remove(0).capacity();
        }
    }
}

/// A buffer that goes back to its pool when dropped.
struct Returned(Vec<u8>, &'static Pool);

impl AsRef<[u8]> for Returned {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Returned {
    fn drop(&mut self) {
        self.1.give_back(std::mem::take(&mut self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_dropped_is_reused_by_the_next_take_of_its_size() {
        static POOL: Pool = Pool::new(16 << 20);
        let (take, share) = (|n| POOL.take(n), |b| POOL.share(b));
        let len = 3 << 20;
        let mut buf = take(len);
        buf.extend(std::iter::repeat_n(7u8, len));
        let at = buf.as_ptr();
        let shared = share(buf);
        let view = shared.slice(10..20);
        drop(shared);
        assert_eq!(&view[..], &[7u8; 10], "a view keeps the buffer alive");
        drop(view);
        let again = take(len - 5);
        assert_eq!(again.as_ptr(), at, "the same memory, reused");
        assert!(again.is_empty());
        // Too large a buffer for a small read is not handed out.
        let small = take(len / 4);
        assert_ne!(small.as_ptr(), at);
        drop(small);
        let shared = share(again);
        drop(shared);
        // No more than the bound is kept: the buffers given back last.
        let many: Vec<Bytes> = (0..8).map(|_| share(take(4 << 20))).collect();
        let last: Vec<*const u8> = many[4..].iter().map(|b| b.as_ptr()).collect();
        drop(many);
        let kept: usize = POOL.free().iter().map(Vec::capacity).sum();
        assert!(kept <= 16 << 20, "{kept}");
        assert!(last.contains(&take(4 << 20).as_ptr()));
    }
}
