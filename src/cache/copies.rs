//! Whole-file copies: a large file that a handle has read from start to end is also kept in the
//! disk tier as one plain file holding its bytes, so that later opens can hand it to the kernel
//! (FUSE passthrough, src/fs/passthrough.rs), which then reads it as it reads a local file.
//!
//! - **Names.** A copy's key is that of the file's bytes in its state object (offset and size);
//!   it is named like a block, by the SHA-256 of its encoded key, with a suffix no block key has.
//!   It holds no header: the kernel reads it from offset 0.
//! - **Writing.** Each verified block a handle gets (by a read or by read-ahead) is written at its
//!   offset into a temp file beside the copy's name; once every block is in, the temp file is
//!   renamed to the name. Handles of one file share one writer. The copy replaces the blocks:
//!   blocks fetched for it are not also written to disk as blocks (one disk write per byte, not
//!   two). If the last handle is released before the copy is whole, or the writer falls
//!   [`QUEUE`] blocks behind, the blocks written so far become block files and the temp file is
//!   removed.
//! - **Reading.** A read whose blocks are not on disk as blocks reads them from the file's copy,
//!   checked against the manifest like any disk block ([`BlockCache::read_copy`]); a copy that
//!   fails is removed.
//! - **Trust.** Only copies this process verified are handed to the kernel: one it wrote (from
//!   verified blocks), or one found on disk (written by an earlier or another mount) and then
//!   checked block by block in the background, removed if damaged.
//! - **Bound.** Copies count towards the disk tier's bound and are evicted with the blocks, by
//!   mtime (set when a copy is opened).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::disk::{DiskTier, TMP_PREFIX};
use super::{BlockCache, BlockKey, Counters, bump};

/// Blocks waiting for a copy's writer, at most: a writer further behind gives the copy up (the
/// disk is slower than the remote), so a slow disk never holds many blocks in memory.
const QUEUE: usize = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The copies a cache is writing and those it has verified.
pub(super) struct Copies {
    /// Copy jobs running.
    jobs: watch::Sender<usize>,
    /// Copies being written, shared by the handles reading their file.
    writing: Mutex<HashMap<BlockKey, Weak<CopyWriter>>>,
    /// Copies this process wrote or checked (and found whole).
    verified: Mutex<HashSet<BlockKey>>,
    /// Copies being checked.
    checking: Mutex<HashSet<BlockKey>>,
}

impl Default for Copies {
    fn default() -> Self {
        Self {
            jobs: watch::Sender::new(0),
            writing: Mutex::default(),
            verified: Mutex::default(),
            checking: Mutex::default(),
        }
    }
}

impl Copies {
    /// Stops every copy being written from taking more blocks, and waits until each has
    /// written the blocks it was given (and is in place, if that made it whole).
    pub(super) async fn finish(&self) {
        for writer in lock(&self.writing).values().filter_map(Weak::upgrade) {
            lock(&writer.tx).take();
        }
        let _ = self.jobs.subscribe().wait_for(|n| *n == 0).await;
    }
}

/// Where the copy of a file stands, from [`BlockCache::copy_status`].
#[derive(Debug)]
pub enum CopyStatus {
    /// On disk and verified by this process: open, ready to hand to the kernel.
    Ready(File),
    /// On disk, not yet verified by this process: open, for reads that check what they read.
    Unverified(File),
    /// Not on disk (or no disk tier).
    Missing,
}

/// Takes the blocks of one copy being written; see [`BlockCache::start_copy`].
pub struct CopyWriter {
    /// Blocks already handed to the writer.
    sent: Mutex<Vec<bool>>,
    /// Gone once the copy is given up or [`Copies::finish`]ed.
    tx: Mutex<Option<mpsc::Sender<(u64, Bytes)>>>,
    block_size: u64,
    /// Becomes `true` once the copy is whole and in place.
    finished: watch::Receiver<bool>,
}

impl std::fmt::Debug for CopyWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyWriter").finish_non_exhaustive()
    }
}

impl CopyWriter {
    /// Hands block `index` (verified: `block_size` bytes, fewer for the last) to the copy, once.
    pub fn add(&self, index: u64, bytes: &Bytes) {
        {
            let mut sent = lock(&self.sent);
            match usize::try_from(index).ok().and_then(|i| sent.get_mut(i)) {
                Some(s) if !*s => *s = true,
                _ => return,
            }
        }
        let mut tx = lock(&self.tx);
        let Some(t) = tx.as_ref() else {
            return;
        };
        if t.try_send((index, bytes.clone())).is_err() {
            tracing::debug!("a whole-file copy is given up: its writer is behind");
            // The writer ends once it has written what it was given.
            tx.take();
        }
    }

    /// Whether the copy still takes blocks (a block given to it now will be on disk).
    pub fn taking(&self) -> bool {
        lock(&self.tx).is_some()
    }

    /// What says when the copy is whole and in place (`true`); closed if it never will be.
    pub fn finished(&self) -> watch::Receiver<bool> {
        self.finished.clone()
    }
}

impl BlockCache {
    /// Where the copy of the file whose bytes are `key` stands. A copy of the wrong length is
    /// removed; an evicted one is forgotten.
    pub async fn copy_status(&self, key: &BlockKey) -> CopyStatus {
        let Some(disk) = self.enabled_disk().map(Arc::clone) else {
            return CopyStatus::Missing;
        };
        if !key.cacheable() {
            return CopyStatus::Missing;
        }
        let (k, copies) = (key.clone(), Arc::clone(&self.copies));
        tokio::task::spawn_blocking(move || {
            let path = disk.copy_path(&k);
            let opened = File::open(&path).and_then(|f| Ok((f.metadata()?.len(), f)));
            match opened {
                Ok((len, file)) if len == k.len => {
                    // Recency, for eviction; failing to set it is harmless.
                    let _ = filetime::set_file_handle_times(
                        &file,
                        None,
                        Some(filetime::FileTime::now()),
                    );
                    if lock(&copies.verified).contains(&k) {
                        CopyStatus::Ready(file)
                    } else {
                        CopyStatus::Unverified(file)
                    }
                }
                Ok((len, _)) => {
                    tracing::warn!(key = ?k, len, "dropping a whole-file copy of the wrong length");
                    lock(&copies.verified).remove(&k);
                    disk.remove_file(&path, len);
                    CopyStatus::Missing
                }
                Err(_) => {
                    lock(&copies.verified).remove(&k);
                    CopyStatus::Missing
                }
            }
        })
        .await
        .unwrap_or(CopyStatus::Missing)
    }

    /// A writer for the copy of the file whose bytes are `key`, in blocks of `block_size`
    /// (the one already under way for it, if any); `None` without a disk tier. Feed it every
    /// verified block: the copy appears once it has them all.
    pub fn start_copy(&self, key: &BlockKey, block_size: u64) -> Option<Arc<CopyWriter>> {
        let disk = Arc::clone(self.enabled_disk()?);
        if !key.cacheable() || block_size == 0 {
            return None;
        }
        let mut writing = lock(&self.copies.writing);
        writing.retain(|_, w| w.strong_count() > 0);
        if let Some(w) = writing.get(key).and_then(Weak::upgrade)
            && w.block_size == block_size
        {
            return Some(w);
        }
        let blocks = usize::try_from(key.len.div_ceil(block_size)).ok()?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let (done, finished) = watch::channel(false);
        let writer = Arc::new(CopyWriter {
            sent: Mutex::new(vec![false; blocks]),
            tx: Mutex::new(Some(tx)),
            block_size,
            finished,
        });
        writing.insert(key.clone(), Arc::downgrade(&writer));
        let job = CopyJob {
            disk,
            copies: Arc::clone(&self.copies),
            counters: Arc::clone(&self.counters),
            key: key.clone(),
            block_size,
            blocks: blocks as u64,
        };
        self.copies.jobs.send_modify(|n| *n += 1);
        tokio::spawn(job.run(rx, done));
        Some(writer)
    }

    /// Checks, in the background, the copy of the file whose bytes are `key`, found on disk:
    /// `check(index, bytes)` on each block of `block_size`. A whole copy becomes ready; a
    /// damaged one is removed, logged and counted.
    pub fn check_copy<C>(&self, key: &BlockKey, block_size: u64, check: C)
    where
        C: Fn(u64, &[u8]) -> bool + Send + 'static,
    {
        let Some(disk) = self.enabled_disk().map(Arc::clone) else {
            return;
        };
        if block_size == 0 || !lock(&self.copies.checking).insert(key.clone()) {
            return;
        }
        let (key, copies, counters) = (
            key.clone(),
            Arc::clone(&self.copies),
            Arc::clone(&self.counters),
        );
        tokio::task::spawn_blocking(move || {
            let path = disk.copy_path(&key);
            match check_file(&path, key.len, block_size, &check) {
                Ok(true) => {
                    lock(&copies.verified).insert(key.clone());
                }
                Ok(false) => discard(&disk, &copies, &counters, &key),
                Err(e) => tracing::debug!(?key, error = %e, "cannot check a whole-file copy"),
            }
            lock(&copies.checking).remove(&key);
        });
    }
}

impl BlockCache {
    /// Takes the local file at `path`, which holds exactly the bytes `key` names (a file a mount
    /// wrote and has just saved), as their whole-file copy: moved into the disk tier (a rename:
    /// only on the same file system) and trusted, as a copy this process wrote. `false` (the
    /// file is left where it is) without a disk tier, for a file over a quarter of it, or if
    /// it cannot be moved.
    pub async fn adopt_copy(&self, key: &BlockKey, path: std::path::PathBuf) -> bool {
        let Some(disk) = self.enabled_disk().map(Arc::clone) else {
            return false;
        };
        if !key.cacheable() || key.len > self.config().disk_bytes / 4 {
            return false;
        }
        let (k, copies, counters) = (
            key.clone(),
            Arc::clone(&self.copies),
            Arc::clone(&self.counters),
        );
        tokio::task::spawn_blocking(move || {
            let dest = disk.copy_path(&k);
            let moved = fs::metadata(&path)
                .ok()
                .filter(|m| m.len() == k.len)
                .and_then(|_| fs::create_dir_all(dest.parent()?).ok())
                .and_then(|()| fs::rename(&path, &dest).ok());
            if moved.is_none() {
                return false;
            }
            // Recency, for eviction.
            let _ = filetime::set_file_mtime(&dest, filetime::FileTime::now());
            lock(&copies.verified).insert(k.clone());
            disk.added(k.len, &counters);
            true
        })
        .await
        .unwrap_or(false)
    }

    /// Bytes `range` of an open whole-file copy (`None` if it cannot be read: a read error is
    /// a miss). The caller checks them, and calls [`BlockCache::discard_copy`] if they fail.
    pub async fn read_copy(&self, copy: &Arc<File>, range: Range<u64>) -> Option<Bytes> {
        let copy = Arc::clone(copy);
        let len = usize::try_from(range.end.checked_sub(range.start)?).ok()?;
        tokio::task::spawn_blocking(move || {
            let mut buf = crate::buffers::take(len);
            buf.resize(len, 0);
            copy.read_exact_at(&mut buf, range.start).ok()?;
            Some(crate::buffers::share(buf))
        })
        .await
        .ok()
        .flatten()
    }

    /// Removes the copy of the file whose bytes are `key`: it failed a check.
    pub async fn discard_copy(&self, key: &BlockKey) {
        let Some(disk) = self.disk.as_ref().map(Arc::clone) else {
            return;
        };
        let (key, copies, counters) = (
            key.clone(),
            Arc::clone(&self.copies),
            Arc::clone(&self.counters),
        );
        let _ = tokio::task::spawn_blocking(move || discard(&disk, &copies, &counters, &key)).await;
    }
}

/// Removes a damaged copy: logged and counted. Blocking.
fn discard(disk: &DiskTier, copies: &Copies, counters: &Counters, key: &BlockKey) {
    let path = disk.copy_path(key);
    tracing::warn!(?key, path = %path.display(), "dropping a whole-file copy that fails verification");
    lock(&copies.verified).remove(key);
    bump(&counters.copies_damaged);
    disk.remove_file(&path, key.len);
}

/// Whether every block of the file at `path` (`len` bytes, blocks of `block_size`) passes
/// `check`. Blocking.
fn check_file(
    path: &std::path::Path,
    len: u64,
    block_size: u64,
    check: &dyn Fn(u64, &[u8]) -> bool,
) -> io::Result<bool> {
    let file = File::open(path)?;
    if file.metadata()?.len() != len {
        return Ok(false);
    }
    let mut buf = vec![0; usize::try_from(block_size.min(len)).map_err(io::Error::other)?];
    let mut index = 0;
    while index * block_size < len {
        let n =
            usize::try_from(block_size.min(len - index * block_size)).map_err(io::Error::other)?;
        file.read_exact_at(&mut buf[..n], index * block_size)?;
        if !check(index, &buf[..n]) {
            return Ok(false);
        }
        index += 1;
    }
    Ok(true)
}

/// The task that writes one copy: it waits for blocks without holding a thread (a handle may
/// stay open, half read, for hours) and writes each on the blocking pool.
struct CopyJob {
    disk: Arc<DiskTier>,
    copies: Arc<Copies>,
    counters: Arc<Counters>,
    key: BlockKey,
    block_size: u64,
    blocks: u64,
}

impl CopyJob {
    async fn run(self, rx: mpsc::Receiver<(u64, Bytes)>, done: watch::Sender<bool>) {
        match self.write(rx).await {
            Ok(true) => {
                let (disk, len, counters) = (
                    Arc::clone(&self.disk),
                    self.key.len,
                    Arc::clone(&self.counters),
                );
                // May scan the directory and evict.
                let _ = tokio::task::spawn_blocking(move || disk.added(len, &counters)).await;
                // Ready before it is counted: whoever waits on the count may open it at once.
                lock(&self.copies.verified).insert(self.key);
                bump(&self.counters.copies_written);
                done.send_replace(true);
            }
            // Given up, or every handle released first: the temp file is gone.
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(key = ?self.key, error = %e, "cannot write a whole-file copy");
            }
        }
        self.copies.jobs.send_modify(|n| *n -= 1);
    }

    /// Writes the blocks as they come; `true` once the copy is whole and in place.
    async fn write(&self, mut rx: mpsc::Receiver<(u64, Bytes)>) -> io::Result<bool> {
        let path = self.disk.copy_path(&self.key);
        let len = self.key.len;
        let blocking = |f: Box<dyn FnOnce() -> io::Result<()> + Send>| async move {
            tokio::task::spawn_blocking(f)
                .await
                .map_err(io::Error::other)?
        };
        let (tmp_path, dir) = (path.clone(), path.parent().map(ToOwned::to_owned));
        let tmp = tokio::task::spawn_blocking(move || {
            let dir = dir.ok_or_else(|| io::Error::other("no directory"))?;
            fs::create_dir_all(&dir)?;
            let tmp = tempfile::Builder::new()
                .prefix(TMP_PREFIX)
                .tempfile_in(&dir)?;
            tmp.as_file().set_len(len)?;
            Ok::<_, io::Error>(tmp)
        })
        .await
        .map_err(io::Error::other)??;
        let tmp = Arc::new(tmp);
        let mut written = Vec::new();
        // Each block comes once (CopyWriter::add).
        while let Some((index, bytes)) = rx.recv().await {
            let (t, at) = (Arc::clone(&tmp), index * self.block_size);
            blocking(Box::new(move || t.as_file().write_all_at(&bytes, at))).await?;
            written.push(index);
            if written.len() as u64 == self.blocks {
                let tmp = Arc::into_inner(tmp).ok_or_else(|| io::Error::other("still shared"))?;
                blocking(Box::new(move || {
                    tmp.persist(&tmp_path).map(drop).map_err(|e| e.error)
                }))
                .await?;
                return Ok(true);
            }
        }
        // Given up: what the copy took was not written as blocks; it is, now.
        let (disk, counters, key, bs) = (
            Arc::clone(&self.disk),
            Arc::clone(&self.counters),
            self.key.clone(),
            self.block_size,
        );
        blocking(Box::new(move || {
            let mut buf = Vec::new();
            for index in written {
                let at = index * bs;
                let n = bs.min(key.len - at);
                buf.resize(usize::try_from(n).map_err(io::Error::other)?, 0);
                tmp.as_file().read_exact_at(&mut buf, at)?;
                let block = BlockKey {
                    offset: key.offset + at,
                    len: n,
                    ..key.clone()
                };
                disk.put(&block, &buf, &counters);
            }
            Ok(())
        }))
        .await?;
        Ok(false)
    }
}
