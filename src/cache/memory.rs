//! The memory tier: an LRU of blocks bounded in bytes, not in entries.
//!
//! Each entry is charged its block's length plus its key ([`charge`]), so many tiny blocks
//! cannot hold more memory than the bound. A block larger than the whole bound is not kept.

use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use lru::LruCache;

use super::{BlockKey, Counters};
use std::sync::atomic::Ordering::Relaxed;

/// Bytes an entry costs: its data, its key and the LRU's own bookkeeping (about 64 bytes).
fn charge(key: &BlockKey, bytes: &Bytes) -> u64 {
    let key_bytes = size_of::<BlockKey>() + key.remote.len() + key.pod.as_str().len();
    (bytes.len() + key_bytes + key.state_id.len() + 64) as u64
}

pub(super) struct MemoryTier {
    max_bytes: u64,
    /// The LRU and the bytes it holds. Never held while another lock is taken.
    inner: Mutex<Inner>,
}

struct Inner {
    lru: LruCache<BlockKey, Bytes>,
    bytes: u64,
}

impl MemoryTier {
    pub(super) fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a consistent LRU (its methods do not unwind
        // half-way through), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The block, marked as most recently used.
    pub(super) fn get(&self, key: &BlockKey) -> Option<Bytes> {
        self.lock().lru.get(key).cloned()
    }

    /// Keeps `bytes` under `key`, evicting the least recently used blocks to stay in bounds.
    pub(super) fn insert(&self, key: BlockKey, bytes: Bytes, counters: &Counters) {
        let cost = charge(&key, &bytes);
        if cost > self.max_bytes {
            return;
        }
        let mut inner = self.lock();
        let new_cost = cost;
        if let Some((old_key, old)) = inner.lru.push(key, bytes) {
            // `push` hands back the entry it replaced (same key) or nothing: it never evicts
            // from an unbounded LRU.
            inner.bytes -= charge(&old_key, &old);
        }
        inner.bytes += new_cost;
        let mut evicted = 0;
        while inner.bytes > self.max_bytes {
            let Some((k, v)) = inner.lru.pop_lru() else {
                break;
            };
            inner.bytes -= charge(&k, &v);
            evicted += 1;
        }
        let held = inner.bytes;
        drop(inner);
        counters.memory_evictions.fetch_add(evicted, Relaxed);
        counters.memory_bytes.store(held, Relaxed);
    }
}
