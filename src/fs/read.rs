//! Reading an open file: whole blocks through the block cache, each checked before it is
//! returned, and a read-ahead window that grows while a handle reads in order.
//!
//! - A stored (large) file read in order is read in units of its manifest's block size, at
//!   least [`BLOCK_SIZE`] (1 MiB; a unit of a file saved with 256 KiB checksum blocks is checked
//!   block by block). Sequential reads of one handle start a read-ahead of [`FIRST_WINDOW`] past
//!   the read, doubling with each sequential read up to [`MAX_WINDOW`]; its units are fetched in
//!   parallel, in range requests of up to [`READ_AHEAD_CHUNK`] units, through the cache (a read
//!   that needs a unit being read ahead waits for that fetch instead of starting another). A
//!   read starting within [`OUT_OF_ORDER_BLOCKS`] units of where the handle's reads have got to
//!   is sequential (the kernel's reads may be answered out of order); a read elsewhere in the
//!   file resets the window and reads ahead nothing, and fetches only the checksum blocks it
//!   needs (256 KiB for files podfs saves now; a unit for older ones).
//! - A deflated (small) file is fetched and inflated once, then served from the cache.
//! - Pods saved before block checksums: a large file's blocks are checked for length only, and
//!   the whole-file CRC-32 when one handle has read it from start to end in order.

use std::ops::Range;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use tokio::sync::{Semaphore, watch};

use super::FsResult;
use super::lock;
use crate::cache::{BlockCache, BlockKey, CopyStatus, CopyWriter, Fetched};
use crate::name::PodName;
use crate::pod::PodError;
use crate::pod::blocks::{BLOCK_SIZE, WholeFileCheck, block_checked, block_size, verify_span};
use crate::pod::manifest::{Entry, Method};
use crate::pod::read::{read_range, read_stored};
use crate::remote::Remote;

/// The read-ahead window after the first sequential read.
pub const FIRST_WINDOW: u64 = 1 << 20;
/// The read-ahead window's cap.
pub const MAX_WINDOW: u64 = 16 << 20;
/// Blocks read ahead by one range request, at most.
pub const READ_AHEAD_CHUNK: u64 = 8;
/// How far (in blocks) from where a handle's reads have got to a read may start and still
/// count as sequential.
pub const OUT_OF_ORDER_BLOCKS: u64 = 4;
/// Read-ahead range requests in flight at once, over all files of a mount.
pub const MAX_READ_AHEAD_REQUESTS: usize = 16;

/// What an open file handle reads: one file of one version, fixed at `open`.
#[derive(Debug)]
pub struct OpenFile {
    /// The inode it was opened as.
    pub(super) ino: u64,
    /// Its configured name (`Remote::name`) is part of every cache key.
    pub(super) remote: Arc<dyn Remote>,
    pub(super) pod: PodName,
    pub(super) version: u64,
    pub(super) entry: Entry,
    /// The identity of the state object holding the file's bytes (none: never cached).
    pub(super) state_id: Option<String>,
    stream: Mutex<Stream>,
    /// The whole-file CRC-32 check of a large file without block checksums.
    whole: Mutex<Option<WholeFileCheck>>,
    /// Whether a read from offset 0 should start a whole-file copy (none on disk at open).
    wants_copy: AtomicBool,
    /// The copy this handle feeds, once started.
    copy: Mutex<Option<Arc<CopyWriter>>>,
    /// Whether this handle started it and [`OpenFile::copy_started`] has not yet said so.
    copy_news: AtomicBool,
    /// Whether a copy on disk awaits checking when this handle is released.
    check_copy_later: AtomicBool,
    /// The file's whole-file copy found on disk at open: reads of blocks not on disk as blocks
    /// come from it (checked), since a copy replaces its file's blocks.
    on_disk: Mutex<Option<Arc<std::fs::File>>>,
}

/// Where a handle's reads stand, for read-ahead.
#[derive(Debug)]
struct Stream {
    /// Where the last read ended: a read starting about here is sequential.
    next: u64,
    /// How far past a sequential read to read ahead.
    window: u64,
    /// Blocks before this offset are read, or being read, ahead.
    ahead_to: u64,
}

/// The reading side shared by every handle of a mount.
#[derive(Debug, Clone)]
pub struct Reader {
    /// Fetched blocks (memory and disk), if the mount has a cache.
    pub cache: Option<Arc<BlockCache>>,
    /// Bounds read-ahead requests in flight.
    pub read_ahead: Arc<Semaphore>,
}

impl Reader {
    pub fn new(cache: Option<Arc<BlockCache>>) -> Self {
        Self {
            cache,
            read_ahead: Arc::new(Semaphore::new(MAX_READ_AHEAD_REQUESTS)),
        }
    }
}

impl OpenFile {
    pub(super) fn new(
        ino: u64,
        remote: Arc<dyn Remote>,
        pod: PodName,
        version: u64,
        entry: Entry,
        state_id: Option<String>,
    ) -> Self {
        let stored = entry
            .data
            .as_ref()
            .is_some_and(|d| d.method == Method::Stored);
        let whole = (stored && !block_checked(&entry))
            .then(|| WholeFileCheck::new(&entry))
            .flatten();
        Self {
            ino,
            remote,
            pod,
            version,
            entry,
            state_id,
            stream: Mutex::new(Stream {
                next: 0,
                window: FIRST_WINDOW,
                ahead_to: 0,
            }),
            whole: Mutex::new(whole),
            wants_copy: AtomicBool::new(false),
            copy: Mutex::new(None),
            copy_news: AtomicBool::new(false),
            check_copy_later: AtomicBool::new(false),
            on_disk: Mutex::new(None),
        }
    }

    /// Once, after a read of this handle started a whole-file copy: what says when the copy
    /// is complete (`true`).
    pub(super) fn copy_started(&self) -> Option<watch::Receiver<bool>> {
        if !self.copy_news.swap(false, Relaxed) {
            return None;
        }
        lock(&self.copy).as_ref().map(|c| c.finished())
    }

    /// The key of the file's whole bytes, for a whole-file copy (src/cache/copies.rs): only
    /// stored files with block checksums have one (every block of the copy can be checked).
    fn copy_key(&self) -> Option<BlockKey> {
        let data = self.entry.data.as_ref()?;
        (data.method == Method::Stored && data.blocks.is_some())
            .then(|| self.key(data.offset, self.entry.size))
            .flatten()
    }

    /// The file's verified whole-file copy, ready for the kernel to read directly. A copy on
    /// disk, verified or not, is kept for this handle's reads. Also, when there is none
    /// verified: notes that one found on disk is to be checked once this handle is released
    /// ([`OpenFile::released`]), or lets a read from offset 0 write one. Only files of at most
    /// a quarter of the disk cache get copies, so that one large file cannot push everything
    /// else out.
    pub(super) async fn ready_copy(&self, reader: &Reader) -> Option<std::fs::File> {
        let (cache, key) = (reader.cache.as_ref()?, self.copy_key()?);
        if key.len > cache.config().disk_bytes / 4 {
            return None;
        }
        match cache.copy_status(&key).await {
            CopyStatus::Ready(file) => {
                let direct = file.try_clone().ok();
                *lock(&self.on_disk) = Some(Arc::new(file));
                return direct;
            }
            CopyStatus::Unverified(file) => {
                *lock(&self.on_disk) = Some(Arc::new(file));
                self.check_copy_later.store(true, Relaxed);
            }
            CopyStatus::Missing => self.wants_copy.store(true, Relaxed),
        }
        None
    }

    /// Bytes `span` of the file for the cache: from the copy on disk if there is one and they
    /// pass their checksums (a copy that fails is removed), else from the remote. `for_copy`:
    /// the caller hands them to the copy being written, if any, which then keeps them on disk.
    async fn load(
        &self,
        cache: &BlockCache,
        span: Range<u64>,
        for_copy: bool,
    ) -> Result<(Bytes, Fetched), PodError> {
        if let Some(bytes) = self.read_copy(cache, span.clone()).await {
            return Ok((bytes, Fetched::Copy));
        }
        let entry = &self.entry;
        let bytes = read_stored(&*self.remote, &self.pod, self.version, entry, span).await?;
        let copying = for_copy && lock(&self.copy).as_ref().is_some_and(|c| c.taking());
        Ok((
            bytes,
            if copying {
                Fetched::RemoteForCopy
            } else {
                Fetched::Remote
            },
        ))
    }

    /// Bytes `span` from the copy found on disk at open, if they are there and pass their
    /// checksums; a copy that fails is removed (and read no more).
    async fn read_copy(&self, cache: &BlockCache, span: Range<u64>) -> Option<Bytes> {
        let copy = lock(&self.on_disk).clone()?;
        let bytes = cache.read_copy(&copy, span.clone()).await?;
        if verify_span(&self.entry, span, &bytes).is_ok() {
            return Some(bytes);
        }
        lock(&self.on_disk).take();
        if let Some(key) = self.copy_key() {
            cache.discard_copy(&key).await;
        }
        None
    }

    /// The handle is released: checks the copy found on disk at open, if any, now that this
    /// handle's reads (from the blocks) are over, rather than competing with them for the disk.
    pub(super) fn released(&self, reader: &Reader) {
        let (Some(cache), Some(key)) = (reader.cache.as_ref(), self.copy_key()) else {
            return;
        };
        if self.check_copy_later.swap(false, Relaxed) {
            let entry = self.entry.clone();
            let check =
                move |i, bytes: &[u8]| verify_span(&entry, unit_range(&entry, i), bytes).is_ok();
            cache.check_copy(&key, unit(&self.entry), check);
        }
    }

    /// Hands verified block `i` to the whole-file copy being written, if any.
    fn copy_block(&self, i: u64, bytes: &Bytes) {
        if let Some(copy) = lock(&self.copy).as_ref() {
            copy.add(i, bytes);
        }
    }

    /// The cache key of `len` bytes at `offset` of this file's state object.
    fn key(&self, offset: u64, len: u64) -> Option<BlockKey> {
        let state_id = self.state_id.as_deref()?;
        BlockKey::new(self.remote.name(), &self.pod, Some(state_id), offset, len)
    }

    /// Bytes `range` of the file (fewer at its end), checked.
    pub async fn read(self: &Arc<Self>, reader: &Reader, range: Range<u64>) -> FsResult<Bytes> {
        let entry = &self.entry;
        let end = range.end.min(entry.size);
        if range.start >= end {
            return Ok(Bytes::new());
        }
        let (Some(cache), Some(data)) = (&reader.cache, &entry.data) else {
            return Ok(read_range(&*self.remote, &self.pod, self.version, entry, range).await?);
        };
        if data.method == Method::Deflate {
            // Small files: fetched and inflated (which checks them) once, kept whole.
            let fetch = read_range(&*self.remote, &self.pod, self.version, entry, 0..entry.size);
            let whole = match self.key(data.offset, data.csize) {
                Some(k) => {
                    let check = |b: &[u8]| self.check_whole(b);
                    cache.get_or_fetch(&k, fetch, check).await?
                }
                None => fetch.await?,
            };
            return Ok(whole.slice(range.start as usize..end as usize));
        }
        if range.start == 0 && self.wants_copy.swap(false, Relaxed) {
            let copy = self
                .copy_key()
                .and_then(|k| cache.start_copy(&k, unit(entry)));
            self.copy_news.store(copy.is_some(), Relaxed);
            *lock(&self.copy) = copy;
        }
        let sequential = self.read_ahead(reader, cache, range.start..end);
        if !sequential && block_size(entry) < unit(entry) && block_checked(entry) {
            return self.read_checked_blocks(cache, range.start..end).await;
        }
        let b = unit(entry);
        let blocks = range.start / b..end.div_ceil(b);
        // Unit `i`'s share of the read, as a view of the cached unit (no copy).
        let part = |i: u64, bytes: &Bytes| {
            let r = unit_range(entry, i);
            let from = range.start.max(r.start) - r.start;
            let to = end.min(r.end) - r.start;
            bytes.slice(from as usize..to as usize)
        };
        let out = if blocks.end - blocks.start == 1 {
            // Most reads fall inside one block (the kernel asks for at most 1 MiB at a time).
            part(blocks.start, &self.block(cache, blocks.start).await?)
        } else {
            let mut out = BytesMut::with_capacity((end - range.start) as usize);
            for i in blocks {
                out.extend_from_slice(&part(i, &self.block(cache, i).await?));
            }
            out.freeze()
        };
        if let Some(check) = lock(&self.whole).as_mut() {
            check
                .update(range.start, &out)
                .map_err(|m| self.damaged(m.offset(entry)..end))?;
        }
        Ok(out)
    }

    /// Bytes `range` of a random read: only the checksum blocks around them, in one range
    /// request, checked and cached as one piece (a random read costs a range request of the
    /// file's block size, 256 KiB for files podfs saves, not of a whole unit).
    async fn read_checked_blocks(&self, cache: &BlockCache, range: Range<u64>) -> FsResult<Bytes> {
        let entry = &self.entry;
        let b = block_size(entry);
        let span = range.start / b * b..(range.end.div_ceil(b) * b).min(entry.size);
        let check = |bytes: &[u8]| {
            verify_span(entry, span.clone(), bytes)
                .map_err(|m| self.damaged(m.offset(entry)..span.end))
        };
        let bytes = self
            .through_cache(cache, span.clone(), false, check)
            .await?;
        let at = (range.start - span.start) as usize..(range.end - span.start) as usize;
        Ok(bytes.slice(at))
    }

    /// Bytes `span` of the file through the cache (or straight from the remote when the state
    /// has no identity), checked by `check` whether they came from the remote or from disk.
    async fn through_cache(
        &self,
        cache: &BlockCache,
        span: Range<u64>,
        for_copy: bool,
        check: impl Fn(&[u8]) -> Result<(), PodError>,
    ) -> FsResult<Bytes> {
        let entry = &self.entry;
        let offset = entry.data.as_ref().map_or(0, |d| d.offset);
        Ok(match self.key(offset + span.start, span.end - span.start) {
            Some(k) => {
                let load = self.load(cache, span, for_copy);
                cache.get_or_load(&k, load, check).await?
            }
            None => {
                let bytes =
                    read_stored(&*self.remote, &self.pod, self.version, entry, span).await?;
                check(&bytes)?;
                bytes
            }
        })
    }

    /// Unit `i`, through the cache: fetched unchecked from the remote, checked by the cache
    /// once, whether it came from the remote or from disk.
    async fn block(&self, cache: &BlockCache, i: u64) -> FsResult<Bytes> {
        let check = |bytes: &[u8]| self.check_block(i, bytes);
        let bytes = self
            .through_cache(cache, unit_range(&self.entry, i), true, check)
            .await?;
        self.copy_block(i, &bytes);
        Ok(bytes)
    }

    /// Starts reading ahead of `range` if it continues the handle's last read; returns whether
    /// it does (the read is sequential).
    fn read_ahead(
        self: &Arc<Self>,
        reader: &Reader,
        cache: &Arc<BlockCache>,
        range: Range<u64>,
    ) -> bool {
        let b = unit(&self.entry);
        let blocks = {
            let mut s = lock(&self.stream);
            // The kernel sends a file's reads a few at a time (its own read-ahead, 1 MiB each),
            // and the session's threads may answer them out of order: a read starting within a
            // few blocks of where the furthest one ended is still in order.
            let sequential = range.start.abs_diff(s.next) <= OUT_OF_ORDER_BLOCKS * b;
            s.next = if sequential {
                s.next.max(range.end)
            } else {
                range.end
            };
            if !sequential {
                s.window = FIRST_WINDOW;
                s.ahead_to = 0;
                return false;
            }
            // Only when less than half a window is left ahead: then read ahead a whole window
            // or so at once, in few large requests, rather than a block per read.
            if s.ahead_to.saturating_sub(range.end) > s.window / 2 {
                return true;
            }
            let to = range.end.saturating_add(s.window).min(self.entry.size);
            let from = s.ahead_to.max(range.end);
            s.window = (s.window * 2).min(MAX_WINDOW);
            if to <= from {
                return true;
            }
            s.ahead_to = to;
            // Whole blocks past the one the read itself ends in.
            from.div_ceil(b)..to.div_ceil(b)
        };
        let mut start = blocks.start;
        while start < blocks.end {
            let chunk = start..(start + READ_AHEAD_CHUNK).min(blocks.end);
            start = chunk.end;
            let file = Arc::clone(self);
            let cache = Arc::clone(cache);
            let permits = Arc::clone(&reader.read_ahead);
            tokio::spawn(async move {
                let Ok(_permit) = permits.acquire_owned().await else {
                    return;
                };
                file.read_ahead_chunk(&cache, chunk).await;
            });
        }
        true
    }

    /// Reads blocks `chunk` ahead, into the cache: those not cached nor being fetched already
    /// come from one range request for the whole chunk (fewer, larger requests: a remote's cost
    /// per request is what limits a sequential read).
    async fn read_ahead_chunk(&self, cache: &BlockCache, chunk: Range<u64>) {
        let entry = &self.entry;
        let span = unit_range(entry, chunk.start).start..unit_range(entry, chunk.end - 1).end;
        let whole = self
            .load(cache, span.clone(), true)
            .map(|r| r.map_err(|e| e.to_string()))
            .shared();
        let offset = entry.data.as_ref().map_or(0, |d| d.offset);
        let gets = chunk.map(|i| {
            let r = unit_range(entry, i);
            let whole = whole.clone();
            let fetch = async move {
                let (bytes, from) = whole.await.map_err(|detail| {
                    PodError::Remote(crate::remote::RemoteError::Other {
                        remote: self.remote.name().to_owned(),
                        detail,
                    })
                })?;
                let at = (r.start - span.start) as usize..(r.end - span.start) as usize;
                Ok::<_, PodError>((bytes.slice(at), from))
            };
            let key = self.key(offset + r.start, r.end - r.start);
            async move {
                let check = |bytes: &[u8]| self.check_block(i, bytes);
                let got = match key {
                    Some(k) => cache
                        .get_or_load(&k, fetch, check)
                        .await
                        .map(|bytes| self.copy_block(i, &bytes)),
                    None => Ok(()),
                };
                // A failed read-ahead is retried by the read that needs the block, which
                // reports the error.
                if let Err(e) = got {
                    tracing::debug!(pod = %self.pod, version = self.version, "read-ahead of block {i} of {:?} failed: {e}", entry.path);
                }
            }
        });
        futures::future::join_all(gets).await;
    }

    fn damaged(&self, r: Range<u64>) -> PodError {
        PodError::Corrupt {
            pod: self.pod.to_string(),
            version: self.version,
            reason: format!(
                "{:?}: bytes {}..{} are damaged",
                self.entry.path, r.start, r.end
            ),
        }
    }

    /// Checks unit `i`: the CRC-32C of each block in it where the manifest has them, else its
    /// length.
    fn check_block(&self, i: u64, bytes: &[u8]) -> Result<(), PodError> {
        let entry = &self.entry;
        let r = unit_range(entry, i);
        let ok = if block_checked(entry) {
            verify_span(entry, r.clone(), bytes).is_ok()
        } else {
            bytes.len() as u64 == r.end - r.start
        };
        ok.then_some(()).ok_or_else(|| self.damaged(r))
    }

    /// Checks a whole (deflated, small) file against its size and CRC-32.
    fn check_whole(&self, bytes: &[u8]) -> Result<(), PodError> {
        let entry = &self.entry;
        let crc = entry.data.as_ref().map(|d| d.crc32);
        (bytes.len() as u64 == entry.size && Some(crc32fast::hash(bytes)) == crc)
            .then_some(())
            .ok_or_else(|| PodError::Corrupt {
                pod: self.pod.to_string(),
                version: self.version,
                reason: format!("{:?}: the data is damaged (CRC-32 mismatch)", entry.path),
            })
    }
}

/// The unit a handle fetches and caches while reading in order: the file's block size, at least
/// [`BLOCK_SIZE`] (a whole number of blocks: both are powers of two). A range request costs
/// about the same for 256 KiB as for 1 MiB, so reading in order fetches the larger.
fn unit(entry: &Entry) -> u64 {
    block_size(entry).max(BLOCK_SIZE)
}

/// The file offsets of unit `i` of `entry` (the last may be short; past the end, empty).
fn unit_range(entry: &Entry, i: u64) -> Range<u64> {
    let u = unit(entry);
    let start = i.saturating_mul(u).min(entry.size);
    start..start.saturating_add(u).min(entry.size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheConfig;
    use crate::pod::manifest::{DataRef, Kind};
    use crate::remote::memory::MemoryRemote;

    /// A large stored file of a pod saved before block checksums, in state object 1 of pod
    /// `p` on a memory remote, whose whole-file CRC-32 is that of `claimed`.
    fn old_file(data: &[u8], claimed: &[u8]) -> (Arc<OpenFile>, Reader) {
        let remote = MemoryRemote::new();
        remote.put_raw("localstack-pod-p-state-1.zip", Bytes::copy_from_slice(data));
        let entry = Entry {
            path: "big".into(),
            kind: Kind::File,
            mode: 0o644,
            mtime: 0,
            mtime_nsec: 0,
            size: data.len() as u64,
            target: None,
            data: Some(DataRef {
                state: 1,
                offset: 0,
                csize: data.len() as u64,
                method: Method::Stored,
                crc32: crc32fast::hash(claimed),
                blocks: None,
            }),
        };
        let file = OpenFile::new(
            2,
            Arc::new(remote),
            PodName::new("p").unwrap(),
            1,
            entry,
            Some("0123456789abcdef0123456789abcdef".into()),
        );
        let cache = BlockCache::new(CacheConfig::default()).unwrap();
        (Arc::new(file), Reader::new(Some(Arc::new(cache))))
    }

    async fn read_in_order(
        file: &Arc<OpenFile>,
        reader: &Reader,
        len: u64,
    ) -> Vec<FsResult<Bytes>> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < len {
            out.push(file.read(reader, at..at + (128 << 10)).await);
            at += 128 << 10;
        }
        out
    }

    #[tokio::test]
    async fn an_old_pods_large_file_is_checked_whole_when_one_handle_reads_it_in_order() {
        let data: Vec<u8> = (0..(3 << 20) + 5).map(|i| (i % 251) as u8).collect();
        let (good, reader) = old_file(&data, &data);
        let reads = read_in_order(&good, &reader, data.len() as u64).await;
        assert!(
            reads.iter().all(Result::is_ok),
            "a matching file reads whole"
        );

        let mut other = data.clone();
        other[(2 << 20) + 9] ^= 1;
        let (bad, reader) = old_file(&data, &other);
        let mut reads = read_in_order(&bad, &reader, data.len() as u64).await;
        let last = reads.pop().unwrap();
        assert!(
            reads.iter().all(Result::is_ok),
            "bytes before the end cannot be checked yet"
        );
        let e = last.unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");

        // A handle that skips ahead checks nothing (it cannot).
        let (bad, reader) = old_file(&data, &other);
        assert!(bad.read(&reader, (1 << 20)..(2 << 20)).await.is_ok());
        assert!(bad.read(&reader, 0..data.len() as u64).await.is_ok());
    }

    /// Reads that arrive a little out of order (the kernel sends a few at once and the
    /// session's threads answer them in any order) still count as sequential: the read-ahead
    /// window keeps growing instead of starting again at its first size.
    #[tokio::test]
    async fn reads_a_little_out_of_order_keep_the_read_ahead_window() {
        let data: Vec<u8> = (0..(12 << 20)).map(|i| (i % 249) as u8).collect();
        let (file, reader) = old_file(&data, &data);
        for i in [0u64, 2, 1, 3, 5, 4, 6, 8, 7, 9] {
            let got = file
                .read(&reader, (i << 20)..((i + 1) << 20))
                .await
                .unwrap();
            assert!(got == data[(i << 20) as usize..((i + 1) << 20) as usize]);
        }
        let window = lock(&file.stream).window;
        assert_eq!(window, MAX_WINDOW, "the window was reset on the way");
    }
}
