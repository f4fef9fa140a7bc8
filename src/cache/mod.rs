//! The block cache of the mount's read path: byte ranges ("blocks") of state objects, kept in a
//! memory LRU and in a disk directory shared by mounts and kept across remounts.
//!
//! What it guarantees (docs/CACHE.md):
//! - **Never stale.** A block is keyed by ([`BlockKey`]) remote, pod, state identity (128
//!   random bits, never reused: docs/FORMAT.md, *State identity*), offset and length: an exact
//!   byte range of an immutable object. A state without an identity is never cached.
//! - **Never wrong.** Every block returned has passed the caller's verifier, whether it came
//!   from the remote or from disk; a disk block that fails is removed, logged and fetched again.
//!   A remote block that fails is the caller's error and is never cached.
//! - **Never fails a read.** Disk trouble is a miss (a full or unwritable disk switches the disk
//!   tier off with one warning); only the caller's fetch or verifier can fail
//!   [`BlockCache::get_or_fetch`].
//! - **One fetch per block.** Concurrent gets of one key wait for a single fetch; a failed fetch
//!   is not remembered (the next waiter fetches).
//!
//! Locks: the in-flight map and the memory LRU are `std::sync::Mutex`es, each held for a few
//! map operations, never across `.await` and never together, so there is no lock order. Disk
//! I/O runs on `spawn_blocking`; across processes, only eviction scans take a lock (an
//! advisory file lock, never waited for).

mod copies;
mod disk;
mod memory;
pub mod metrics;

use std::collections::HashMap;
use std::fmt::Display;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tokio::sync::{OnceCell, Semaphore};

use copies::Copies;
pub use copies::{CopyStatus, CopyWriter};
pub use disk::CACHE_FORMAT;
use disk::DiskTier;
use memory::MemoryTier;

use crate::name::PodName;
use crate::pod::manifest::is_state_id;
use crate::remote::VersionId;

/// Disk writes in flight at once; a block arriving while all are busy is not written to disk
/// (a slow disk never holds an unbounded queue of blocks in memory, and never slows a read).
const MAX_DISK_WRITES: u32 = 16;
const MIB: u64 = 1 << 20;

/// Which bytes a block holds: bytes `offset .. offset + len` of the state object with identity
/// `state_id`, of pod `pod` on remote `remote`. Offsets are in the state object (the zip), not
/// in a file, so blocks of different files in one state object never collide, and the length is
/// part of the key, so blocks cut with another block size never mix. The caller chooses the
/// ranges (e.g. a file's bytes in [`CacheConfig::block_size`] pieces, or a deflated file whole).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BlockKey {
    /// The remote's name, as configured.
    pub remote: String,
    pub pod: PodName,
    /// The state object's identity, `VersionObject::state_id(k)`: 32 lowercase hex digits.
    /// Any other value (a state without identity) makes [`BlockCache::get_or_fetch`] fetch
    /// without caching.
    pub state_id: String,
    /// Offset of the block's first byte in the state object.
    pub offset: u64,
    /// Length of the block: the fetch must return exactly this many bytes.
    pub len: u64,
}

impl BlockKey {
    /// The key of bytes `offset .. offset + len` of a state object whose identity is
    /// `state_id` (`VersionObject::state_id(k)`); `None` when it has none: such bytes must not
    /// be cached (docs/FORMAT.md), so read them straight from the remote.
    pub fn new(
        remote: &str,
        pod: &PodName,
        state_id: Option<&str>,
        offset: u64,
        len: u64,
    ) -> Option<Self> {
        let state_id = state_id.filter(|id| is_state_id(id))?;
        Some(Self {
            remote: remote.to_owned(),
            pod: pod.clone(),
            state_id: state_id.to_owned(),
            offset,
            len,
        })
    }

    /// The key of a whole version object (`id` from [`Remote::version_id`]): kept on disk only,
    /// beside the blocks, under a made-up identity no state object can have (a hash of the
    /// version's number and object identity in its own domain).
    ///
    /// [`Remote::version_id`]: crate::remote::Remote::version_id
    pub fn version_object(remote: &str, pod: &PodName, version: u64, id: &VersionId) -> Self {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"podfs version object\0");
        h.update(version.to_le_bytes());
        h.update(id.id.as_bytes());
        let digest = h.finalize();
        Self {
            remote: remote.to_owned(),
            pod: pod.clone(),
            state_id: hex::encode(&digest[..16]),
            offset: 0,
            len: id.size,
        }
    }

    fn cacheable(&self) -> bool {
        is_state_id(&self.state_id)
    }
}

/// Where the bytes of a fetch given to [`BlockCache::get_or_load`] came from, which says whether
/// the disk tier should keep them as a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fetched {
    /// From the remote: kept on disk as a block.
    Remote,
    /// From the remote, for a file whose whole-file copy is being written: the copy keeps them
    /// on disk (one write, not two).
    RemoteForCopy,
    /// From the file's whole-file copy on disk, checked by the fetch (against the same
    /// checksums as the verifier's): on disk already.
    Copy,
}

/// How the block cache is sized and where it keeps blocks on disk.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Bound of the memory tier, in bytes (data plus a small charge per key).
    pub memory_bytes: u64,
    /// Directory of the disk tier (the mount uses `VOLUME/cache`); `None`: memory only. Mounts
    /// may share it, also at the same time.
    pub disk_dir: Option<PathBuf>,
    /// Bound of the disk tier, in bytes (`--cache-size`), counting whole block files.
    pub disk_bytes: u64,
    /// The block size callers should cut reads into: a power of two from 4 KiB to 64 MiB. The
    /// cache itself keys by exact ranges and only checks this value.
    pub block_size: u64,
}

impl Default for CacheConfig {
    /// 64 MiB of memory: 64 blocks, enough for the read-ahead windows of a few sequential
    /// readers, small beside a desktop's page cache (which holds the same bytes again while
    /// the kernel keeps them). 1 GiB of disk, no directory (the caller names it): enough to
    /// keep a working set across remounts without surprising a laptop's home directory;
    /// `--cache-size` raises it. 1 MiB blocks: one range request costs about 8 ms whatever its
    /// size, and 1 MiB keeps random reads of large files from fetching much they do not need.
    fn default() -> Self {
        Self {
            memory_bytes: 64 * MIB,
            disk_dir: None,
            disk_bytes: 1024 * MIB,
            block_size: MIB,
        }
    }
}

/// A setup problem the user must fix; the messages say how.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(
        "cannot use {} as the block cache directory: {source}; fix its permissions or free \
         space, or choose another with --cache-dir",
        dir.display()
    )]
    DiskDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "block size {0} is not a power of two from 4 KiB to 64 MiB: choose one that is (the \
         default is 1 MiB)"
    )]
    BlockSize(u64),
    #[error(
        "a cache size of {disk_bytes} bytes holds less than one block of {block_size}: raise \
         --cache-size"
    )]
    DiskTooSmall { disk_bytes: u64, block_size: u64 },
}

/// Counters since the cache was built: what a metrics endpoint exports (all monotonic but the
/// two `*_bytes` gauges).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub memory_hits: u64,
    pub memory_misses: u64,
    pub disk_hits: u64,
    pub disk_misses: u64,
    /// Gets served by another get's fetch of the same key (single-flight).
    pub coalesced: u64,
    /// Blocks fetched from the remote (and passed verification), and their bytes.
    pub fetches: u64,
    pub fetched_bytes: u64,
    /// Fetches that failed, and fetched blocks the verifier refused (never cached).
    pub fetch_errors: u64,
    pub remote_verify_failures: u64,
    /// Gets of states without an identity: fetched, verified, not cached.
    pub uncached: u64,
    /// Disk blocks dropped: damaged or foreign files, or refused by the verifier.
    pub disk_damaged: u64,
    pub disk_verify_failures: u64,
    pub memory_evictions: u64,
    pub disk_evictions: u64,
    pub disk_writes: u64,
    /// Disk writes skipped because [`MAX_DISK_WRITES`] were in flight.
    pub disk_writes_skipped: u64,
    pub disk_write_errors: u64,
    /// Whole-file copies written (src/cache/copies.rs), and copies found on disk that failed
    /// their check (removed).
    pub copies_written: u64,
    pub copies_damaged: u64,
    /// Blocks read from a whole-file copy (and verified): a disk block file missed, the copy
    /// had them.
    pub copy_hits: u64,
    /// Bytes charged to the memory tier now.
    pub memory_bytes: u64,
    /// This process's estimate of the disk tier's bytes now.
    pub disk_bytes: u64,
    /// Whether the disk tier is configured and still on.
    pub disk_enabled: bool,
}

#[derive(Default)]
struct Counters {
    memory_hits: AtomicU64,
    memory_misses: AtomicU64,
    disk_hits: AtomicU64,
    disk_misses: AtomicU64,
    coalesced: AtomicU64,
    fetches: AtomicU64,
    fetched_bytes: AtomicU64,
    fetch_errors: AtomicU64,
    remote_verify_failures: AtomicU64,
    uncached: AtomicU64,
    disk_damaged: AtomicU64,
    disk_verify_failures: AtomicU64,
    memory_evictions: AtomicU64,
    disk_evictions: AtomicU64,
    disk_writes: AtomicU64,
    disk_writes_skipped: AtomicU64,
    disk_write_errors: AtomicU64,
    copies_written: AtomicU64,
    copies_damaged: AtomicU64,
    copy_hits: AtomicU64,
    memory_bytes: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

impl std::fmt::Debug for BlockCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCache")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The block cache: memory LRU, then disk, then the caller's fetch. Share it as
/// `Arc<BlockCache>` between all reads of a mount.
pub struct BlockCache {
    config: CacheConfig,
    memory: MemoryTier,
    disk: Option<Arc<DiskTier>>,
    /// One cell per key being looked up beyond memory: the single flight.
    in_flight: Mutex<HashMap<BlockKey, Arc<OnceCell<Bytes>>>>,
    disk_writes: Arc<Semaphore>,
    counters: Arc<Counters>,
    copies: Arc<Copies>,
}

impl BlockCache {
    /// Builds the cache. With a `disk_dir`, creates `disk_dir/v1`, checks that it can write
    /// there and scans it once to learn its size (evicting if it is over `disk_bytes`): blocking
    /// I/O, so call it at setup, or from `spawn_blocking`.
    pub fn new(config: CacheConfig) -> Result<Self, CacheError> {
        let bs = config.block_size;
        if !bs.is_power_of_two() || !(4 << 10..=64 * MIB).contains(&bs) {
            return Err(CacheError::BlockSize(bs));
        }
        let counters = Arc::new(Counters::default());
        let disk = match &config.disk_dir {
            None => None,
            Some(_) if config.disk_bytes < bs => {
                return Err(CacheError::DiskTooSmall {
                    disk_bytes: config.disk_bytes,
                    block_size: bs,
                });
            }
            Some(dir) => Some(Arc::new(DiskTier::open(dir, config.disk_bytes, &counters)?)),
        };
        Ok(Self {
            memory: MemoryTier::new(config.memory_bytes),
            config,
            disk,
            in_flight: Mutex::new(HashMap::new()),
            disk_writes: Arc::new(Semaphore::new(MAX_DISK_WRITES as usize)),
            counters,
            copies: Arc::default(),
        })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// The block `key`: from memory, else from disk, else from `fetch`; every block that did
    /// not come from memory must pass `verify` (e.g. the manifest's checksum of the block)
    /// before it is returned or kept.
    ///
    /// - `fetch` reads exactly `key.len` bytes from the remote; it is only polled on a miss,
    ///   and not at all when a concurrent get of the same key fetches for this one. Its error,
    ///   or `verify`'s on fetched bytes, is returned and nothing is cached.
    /// - `verify` runs on this task: keep it cheap (a CRC or hash of one block). On a disk
    ///   block, its error is logged and the block is fetched again.
    /// - A key whose `state_id` is not an identity is fetched and verified, never cached.
    pub async fn get_or_fetch<E, F, V>(
        &self,
        key: &BlockKey,
        fetch: F,
        verify: V,
    ) -> Result<Bytes, E>
    where
        E: Display,
        F: Future<Output = Result<Bytes, E>>,
        V: Fn(&[u8]) -> Result<(), E>,
    {
        let fetch = async { fetch.await.map(|b| (b, Fetched::Remote)) };
        self.get_or_load(key, fetch, verify).await
    }

    /// [`BlockCache::get_or_fetch`] with a fetch that says where its bytes came from
    /// ([`Fetched`]), and so whether the disk tier keeps them as a block. Bytes from a
    /// whole-file copy ([`Fetched::Copy`]) were checked by the fetch, and are not checked
    /// again.
    pub async fn get_or_load<E, F, V>(
        &self,
        key: &BlockKey,
        fetch: F,
        verify: V,
    ) -> Result<Bytes, E>
    where
        E: Display,
        F: Future<Output = Result<(Bytes, Fetched), E>>,
        V: Fn(&[u8]) -> Result<(), E>,
    {
        if !key.cacheable() {
            bump(&self.counters.uncached);
            let (bytes, _) = fetch.await?;
            verify(&bytes)?;
            return Ok(bytes);
        }
        if let Some(bytes) = self.memory.get(key) {
            bump(&self.counters.memory_hits);
            return Ok(bytes);
        }
        bump(&self.counters.memory_misses);
        let flight = Flight::join(self, key);
        let mut led = false;
        let got = flight
            .cell
            .get_or_try_init(|| {
                led = true;
                self.load(key, fetch, &verify)
            })
            .await;
        if !led && got.is_ok() {
            bump(&self.counters.coalesced);
        }
        got.cloned()
    }

    /// The miss path of one flight: disk, then the remote.
    async fn load<E: Display, F, V>(&self, key: &BlockKey, fetch: F, verify: &V) -> Result<Bytes, E>
    where
        F: Future<Output = Result<(Bytes, Fetched), E>>,
        V: Fn(&[u8]) -> Result<(), E>,
    {
        // A flight for this key may have finished between our memory lookup and joining.
        if let Some(bytes) = self.memory.get(key) {
            return Ok(bytes);
        }
        if let Some(bytes) = self.disk_get(key, verify).await {
            self.memory
                .insert(key.clone(), bytes.clone(), &self.counters);
            return Ok(bytes);
        }
        let (bytes, from) = fetch
            .await
            .inspect_err(|_| bump(&self.counters.fetch_errors))?;
        if from != Fetched::Copy
            && let Err(e) = verify(&bytes)
        {
            bump(&self.counters.remote_verify_failures);
            tracing::debug!(?key, error = %e, "a fetched block fails verification");
            return Err(e);
        }
        if from == Fetched::Copy {
            bump(&self.counters.copy_hits);
        } else {
            bump(&self.counters.fetches);
            self.counters
                .fetched_bytes
                .fetch_add(bytes.len() as u64, Relaxed);
        }
        if bytes.len() as u64 == key.len {
            self.memory
                .insert(key.clone(), bytes.clone(), &self.counters);
            if from == Fetched::Remote {
                self.spawn_disk_write(key, &bytes);
            }
        } else {
            // The verifier let through a block of another length than its key says: return
            // it, but keep nothing under a key it does not match.
            tracing::debug!(
                ?key,
                got = bytes.len(),
                "not caching a block of the wrong length"
            );
        }
        Ok(bytes)
    }

    fn enabled_disk(&self) -> Option<&Arc<DiskTier>> {
        self.disk.as_ref().filter(|d| d.enabled())
    }

    /// The verified disk block, if any; a block the verifier refuses is removed.
    async fn disk_get<E: Display, V>(&self, key: &BlockKey, verify: &V) -> Option<Bytes>
    where
        V: Fn(&[u8]) -> Result<(), E>,
    {
        let disk = Arc::clone(self.enabled_disk()?);
        let (k, counters) = (key.clone(), Arc::clone(&self.counters));
        let found = tokio::task::spawn_blocking(move || disk.get(&k, &counters))
            .await
            .ok()
            .flatten();
        let Some(bytes) = found else {
            bump(&self.counters.disk_misses);
            return None;
        };
        match verify(&bytes) {
            Ok(()) => {
                bump(&self.counters.disk_hits);
                Some(bytes)
            }
            Err(e) => {
                tracing::warn!(?key, error = %e, "dropping a cached block that fails verification");
                bump(&self.counters.disk_verify_failures);
                bump(&self.counters.disk_misses);
                let disk = Arc::clone(self.disk.as_ref()?);
                let k = key.clone();
                let _ = tokio::task::spawn_blocking(move || disk.remove(&k)).await;
                None
            }
        }
    }

    /// Writes the block to disk in the background, unless the disk is off or busy.
    fn spawn_disk_write(&self, key: &BlockKey, bytes: &Bytes) {
        let Some(disk) = self.enabled_disk().map(Arc::clone) else {
            return;
        };
        let Ok(permit) = Arc::clone(&self.disk_writes).try_acquire_owned() else {
            bump(&self.counters.disk_writes_skipped);
            return;
        };
        let (key, bytes, counters) = (key.clone(), bytes.clone(), Arc::clone(&self.counters));
        tokio::task::spawn_blocking(move || {
            disk.put(&key, &bytes, &counters);
            drop(permit);
        });
    }

    /// The object under `key` from the disk tier only (its file's own checks passed), for
    /// objects the caller keeps decoded in memory ([`BlockKey::version_object`]).
    pub async fn disk_object(&self, key: &BlockKey) -> Option<Bytes> {
        self.disk_get(key, &|_: &[u8]| Ok::<(), String>(())).await
    }

    /// Keeps `bytes` under `key` on disk only (in the background), if it has the key's length.
    pub fn keep_on_disk(&self, key: &BlockKey, bytes: &Bytes) {
        if bytes.len() as u64 == key.len {
            self.spawn_disk_write(key, bytes);
        }
    }

    /// Removes `key` from the disk tier (an object that turned out unusable).
    pub async fn drop_on_disk(&self, key: &BlockKey) {
        if let Some(disk) = self.disk.as_ref().map(Arc::clone) {
            let k = key.clone();
            let _ = tokio::task::spawn_blocking(move || disk.remove(&k)).await;
        }
    }

    /// Waits for the disk writes started so far (e.g. before unmounting, so the next mount
    /// finds them). Blocks fetched meanwhile may skip the disk. Whole-file copies being
    /// written take no more blocks: each writes what it has, and is kept if that is all.
    pub async fn flush(&self) {
        // The semaphore is never closed, so this only waits.
        let _all = self.disk_writes.acquire_many(MAX_DISK_WRITES).await;
        self.copies.finish().await;
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CacheStats {
        let c = &*self.counters;
        let get = |a: &AtomicU64| a.load(Relaxed);
        CacheStats {
            memory_hits: get(&c.memory_hits),
            memory_misses: get(&c.memory_misses),
            disk_hits: get(&c.disk_hits),
            disk_misses: get(&c.disk_misses),
            coalesced: get(&c.coalesced),
            fetches: get(&c.fetches),
            fetched_bytes: get(&c.fetched_bytes),
            fetch_errors: get(&c.fetch_errors),
            remote_verify_failures: get(&c.remote_verify_failures),
            uncached: get(&c.uncached),
            disk_damaged: get(&c.disk_damaged),
            disk_verify_failures: get(&c.disk_verify_failures),
            memory_evictions: get(&c.memory_evictions),
            disk_evictions: get(&c.disk_evictions),
            disk_writes: get(&c.disk_writes),
            disk_writes_skipped: get(&c.disk_writes_skipped),
            disk_write_errors: get(&c.disk_write_errors),
            copies_written: get(&c.copies_written),
            copies_damaged: get(&c.copies_damaged),
            copy_hits: get(&c.copy_hits),
            memory_bytes: get(&c.memory_bytes),
            disk_bytes: self.disk.as_ref().map_or(0, |d| d.size()),
            disk_enabled: self.enabled_disk().is_some(),
        }
    }
}

/// A get's membership in the single flight of its key. Leaving (done, failed or cancelled)
/// removes the key's cell once it holds a block, or once no other get waits on it, so a failed
/// fetch is never remembered and the map only holds keys being fetched.
struct Flight<'a> {
    cache: &'a BlockCache,
    key: &'a BlockKey,
    cell: Arc<OnceCell<Bytes>>,
}

impl<'a> Flight<'a> {
    fn join(cache: &'a BlockCache, key: &'a BlockKey) -> Self {
        let mut map = cache
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let cell = Arc::clone(map.entry(key.clone()).or_default());
        Self { cache, key, cell }
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut map = self
            .cache
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let ours = map
            .get(self.key)
            .is_some_and(|c| Arc::ptr_eq(c, &self.cell));
        // Joins happen under this lock, so the count is exact: the map's Arc and ours.
        if ours && (self.cell.initialized() || Arc::strong_count(&self.cell) <= 2) {
            map.remove(self.key);
        }
    }
}

#[cfg(test)]
mod tests;
