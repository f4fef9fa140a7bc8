//! The disk tier: one file per block under `DIR/v1/ab/cdef…`, shared by every mount that uses
//! `DIR`, bounded in bytes with least-recently-used eviction, kept across remounts.
//!
//! - **Names.** A block's file is named by the SHA-256 of its encoded key ([`encode_key`]),
//!   which starts with [`CACHE_FORMAT`]; the first two hex digits are a directory, so no
//!   directory holds more than 1/256 of the blocks.
//! - **Content.** [`MAGIC`], the encoded key (length-prefixed), the data length, a CRC-32 of the
//!   data, then the data. A read checks all of them before the caller's verifier sees the bytes:
//!   a hash collision, a foreign or truncated file, or a flipped bit is a miss, and the file is
//!   removed.
//! - **Writes** go to a temp file (`.tmp*`) in the block's directory, then are renamed over the
//!   name, so a reader never sees half a block, and two mounts writing one block both leave a
//!   whole one. There is no fsync: a block torn by a crash fails its CRC and is fetched again.
//! - **Recency** is the file's mtime, set on write and on every hit.
//! - **Bound.** Each process keeps an estimate of the directory's size (a full scan when it
//!   opens, plus what it writes). When the estimate passes the bound, it scans the directory,
//!   learns the true size (other mounts' writes too) and deletes the oldest files until under
//!   90% of the bound. One process scans at a time (an advisory lock on `v1/.lock`); files
//!   that another process deleted first are simply gone. With `n` mounts sharing a directory it
//!   can exceed the bound by about `n` × 10% between scans.
//! - **Failures** (disk full, directory removed or unwritable) switch the tier off for the rest
//!   of the process, with one warning: the cache never fails a read.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::{BlockKey, CacheError, Counters};

/// Version of the key encoding and file layout, and the name of its directory (`v1`). A change
/// to either takes a new number, so old blocks are never misread (they are simply not found).
pub const CACHE_FORMAT: u32 = 1;
/// First bytes of every block file.
const MAGIC: &[u8; 8] = b"PODFSBLK";
/// Prefix of files being written.
pub(super) const TMP_PREFIX: &str = ".tmp";
/// Ends the encoded key of a whole-file copy (src/cache/copies.rs): a block's encoding ends with
/// its fixed-size offset and length, so no block key encodes to a copy's.
const COPY_SUFFIX: &[u8] = b"whole file";
/// A temp file older than this was left by a crash and is removed by the next scan.
const TMP_MAX_AGE: Duration = Duration::from_secs(3600);
/// Eviction stops once the directory is under this share of the bound (in percent).
const EVICT_TO_PERCENT: u64 = 90;

/// The key as bytes, unambiguous (strings are length-prefixed): hashed for the file name and
/// stored in the file to be compared on read.
fn encode_key(key: &BlockKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    out.extend_from_slice(&CACHE_FORMAT.to_le_bytes());
    for s in [key.remote.as_str(), key.pod.as_str(), key.state_id.as_str()] {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    out.extend_from_slice(&key.offset.to_le_bytes());
    out.extend_from_slice(&key.len.to_le_bytes());
    out
}

/// The file header for a block with encoded key `enc` and `data`.
fn header(enc: &[u8], data: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(header_len(enc));
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&(enc.len() as u32).to_le_bytes());
    h.extend_from_slice(enc);
    h.extend_from_slice(&(data.len() as u64).to_le_bytes());
    h.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    h
}

fn header_len(enc: &[u8]) -> usize {
    MAGIC.len() + 4 + enc.len() + 8 + 4
}

/// Checks a whole block file against the key it should hold; returns its data, or why not.
fn parse(file: Bytes, enc: &[u8], want_len: u64) -> Result<Bytes, &'static str> {
    let hl = header_len(enc);
    if file.len() as u64 != hl as u64 + want_len {
        return Err("wrong length");
    }
    let (magic, rest) = file.split_at(MAGIC.len());
    if magic != MAGIC {
        return Err("not a podfs block");
    }
    let (key_len, rest) = rest.split_at(4);
    if key_len != (enc.len() as u32).to_le_bytes() || !rest.starts_with(enc) {
        return Err("holds another key");
    }
    let rest = &rest[enc.len()..];
    let (data_len, rest) = rest.split_at(8);
    if data_len != want_len.to_le_bytes() {
        return Err("wrong data length");
    }
    let crc = &rest[..4];
    let data = file.slice(hl..);
    if crc != crc32fast::hash(&data).to_le_bytes() {
        return Err("CRC-32 mismatch");
    }
    Ok(data)
}

fn warn_io(what: &str, key: Option<&BlockKey>, path: &Path, e: &io::Error) {
    let path = path.display();
    tracing::warn!(?key, %path, error = %e, "cannot {what} a cached block");
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

pub(super) struct DiskTier {
    /// `DIR/v1`.
    root: PathBuf,
    max_bytes: u64,
    /// This process's estimate of the bytes under `root`.
    size: AtomicU64,
    /// A scan is running in this process.
    scanning: AtomicBool,
    /// Switched off after a write failed.
    disabled: AtomicBool,
}

impl DiskTier {
    /// Opens (creating it) the tier under `dir`, checks that it can write there, and scans it
    /// once to learn its size, evicting if it is over `max_bytes`. Blocking.
    pub(super) fn open(
        dir: &Path,
        max_bytes: u64,
        counters: &Counters,
    ) -> Result<Self, CacheError> {
        let root = dir.join(format!("v{CACHE_FORMAT}"));
        let unusable = |source| CacheError::DiskDir {
            dir: dir.to_owned(),
            source,
        };
        fs::create_dir_all(&root).map_err(unusable)?;
        // A probe, so a read-only or foreign-owned directory is reported now, not as a
        // warning at the first read.
        let mut probe = tempfile::Builder::new()
            .prefix(TMP_PREFIX)
            .tempfile_in(&root)
            .map_err(unusable)?;
        probe.write_all(b"probe").map_err(unusable)?;
        drop(probe);
        let tier = Self {
            root,
            max_bytes,
            size: AtomicU64::new(0),
            scanning: AtomicBool::new(false),
            disabled: AtomicBool::new(false),
        };
        // Learn the size even if another mount holds the scan lock; evict if over.
        let size = tier.scan().iter().map(|b| b.1).sum();
        tier.size.store(size, Relaxed);
        if size > max_bytes {
            tier.rescan(counters);
        }
        Ok(tier)
    }

    pub(super) fn enabled(&self) -> bool {
        !self.disabled.load(Relaxed)
    }

    /// This process's estimate of the bytes in the directory.
    pub(super) fn size(&self) -> u64 {
        self.size.load(Relaxed)
    }

    /// Where `key`'s block lives.
    #[cfg(test)]
    pub(super) fn block_path(&self, key: &BlockKey) -> PathBuf {
        self.path(&encode_key(key))
    }

    /// Where the whole-file copy of the bytes `key` names lives (no header: the file's bytes).
    pub(super) fn copy_path(&self, key: &BlockKey) -> PathBuf {
        let mut enc = encode_key(key);
        enc.extend_from_slice(COPY_SUFFIX);
        self.path(&enc)
    }

    /// Counts `len` bytes just written under the root, evicting if that passes the bound.
    /// Blocking.
    pub(super) fn added(&self, len: u64, counters: &Counters) {
        let size = self.size.fetch_add(len, Relaxed) + len;
        if size > self.max_bytes {
            self.rescan(counters);
        }
    }

    /// Removes the file at `path`, of `len` bytes, if it is there. Blocking.
    pub(super) fn remove_file(&self, path: &Path, len: u64) {
        match fs::remove_file(path) {
            Ok(()) => {
                let _ = self
                    .size
                    .fetch_update(Relaxed, Relaxed, |s| Some(s.saturating_sub(len)));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn_io("remove", None, path, &e),
        }
    }

    fn path(&self, enc: &[u8]) -> PathBuf {
        let name = hex::encode(Sha256::digest(enc));
        self.root.join(&name[..2]).join(&name[2..])
    }

    /// The block's data if the file exists and is whole and for `key` (not yet checked by the
    /// caller's verifier). A damaged or foreign file is removed and counted. Blocking.
    pub(super) fn get(&self, key: &BlockKey, counters: &Counters) -> Option<Bytes> {
        let enc = encode_key(key);
        let path = self.path(&enc);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                warn_io("read", Some(key), &path, &e);
                return None;
            }
        };
        let want = header_len(&enc) as u64 + key.len;
        let mut buf = crate::buffers::take(usize::try_from(want + 1).unwrap_or(usize::MAX));
        // Read at most one byte past the expected size, whatever sits at this name.
        let read = (&mut file).take(want + 1).read_to_end(&mut buf);
        if let Err(e) = read {
            warn_io("read", Some(key), &path, &e);
            return None;
        }
        match parse(crate::buffers::share(buf), &enc, key.len) {
            Ok(data) => {
                // Mark as recently used: eviction goes by mtime. Failing to is harmless.
                let _ =
                    filetime::set_file_handle_times(&file, None, Some(filetime::FileTime::now()));
                Some(data)
            }
            Err(why) => {
                let path = path.display();
                tracing::warn!(?key, %path, why, "dropping a damaged cached block");
                counters.disk_damaged.fetch_add(1, Relaxed);
                self.remove(key);
                None
            }
        }
    }

    /// Removes `key`'s block, if there is one. Blocking.
    pub(super) fn remove(&self, key: &BlockKey) {
        let enc = encode_key(key);
        self.remove_file(&self.path(&enc), header_len(&enc) as u64 + key.len);
    }

    /// Stores `data` as `key`'s block (temp file, then rename), evicting if over the bound.
    /// A failure switches the tier off. Blocking.
    pub(super) fn put(&self, key: &BlockKey, data: &[u8], counters: &Counters) {
        if !self.enabled() {
            return;
        }
        let enc = encode_key(key);
        let path = self.path(&enc);
        let write = || -> io::Result<u64> {
            let dir = path.parent().unwrap_or(&self.root);
            fs::create_dir_all(dir)?;
            let mut tmp = tempfile::Builder::new()
                .prefix(TMP_PREFIX)
                .tempfile_in(dir)?;
            let head = header(&enc, data);
            tmp.write_all(&head)?;
            tmp.write_all(data)?;
            tmp.persist(&path).map_err(|e| e.error)?;
            Ok((head.len() + data.len()) as u64)
        };
        match write() {
            Ok(len) => {
                counters.disk_writes.fetch_add(1, Relaxed);
                self.added(len, counters);
            }
            Err(e) => {
                if !self.disabled.swap(true, Relaxed) {
                    tracing::warn!(
                        dir = %self.root.display(),
                        error = %e,
                        "the disk block cache stops here: it cannot write; reads go on from \
                         memory and the remote"
                    );
                }
                counters.disk_write_errors.fetch_add(1, Relaxed);
            }
        }
    }

    /// Learns the directory's true size and, if it is over the bound, deletes the least
    /// recently used blocks down to [`EVICT_TO_PERCENT`]. Skipped if this process or another
    /// is already scanning. Blocking.
    fn rescan(&self, counters: &Counters) {
        if self.scanning.swap(true, Relaxed) {
            return;
        }
        let lock = File::create(self.root.join(".lock"));
        // Held until the end of the scan; dropping the file releases it.
        let locked = lock.as_ref().map(|f| f.try_lock());
        match locked {
            Ok(Ok(())) => self.scan_and_evict(counters),
            // Another mount is scanning; our estimate stays high, so the next write retries.
            Ok(Err(fs::TryLockError::WouldBlock)) => {}
            Ok(Err(fs::TryLockError::Error(e))) => self.scan_unlocked(&e, counters),
            Err(e) => self.scan_unlocked(e, counters),
        }
        drop(lock);
        self.scanning.store(false, Relaxed);
    }

    fn scan_unlocked(&self, e: &io::Error, counters: &Counters) {
        tracing::debug!(error = %e, "no scan lock on the disk block cache; scanning anyway");
        self.scan_and_evict(counters);
    }

    fn scan_and_evict(&self, counters: &Counters) {
        let mut blocks = self.scan();
        let mut total: u64 = blocks.iter().map(|b| b.1).sum();
        if total > self.max_bytes {
            let target = self.max_bytes / 100 * EVICT_TO_PERCENT;
            blocks.sort_unstable_by_key(|b| b.0);
            for (_, len, path) in blocks {
                if total <= target {
                    break;
                }
                match fs::remove_file(&path) {
                    Ok(()) => {
                        counters.disk_evictions.fetch_add(1, Relaxed);
                        total -= len;
                    }
                    // Another mount evicted it first.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => total -= len,
                    Err(e) => warn_io("evict", None, &path, &e),
                }
            }
        }
        self.size.store(total, Relaxed);
    }

    /// Every block file under `root`: (mtime, length, path). Files that do not follow the
    /// layout are left alone; temp files left by a crash are removed.
    fn scan(&self) -> Vec<(SystemTime, u64, PathBuf)> {
        let mut out = Vec::new();
        let Ok(dirs) = fs::read_dir(&self.root) else {
            return out;
        };
        for dir in dirs.flatten() {
            if !dir.file_name().to_str().is_some_and(|n| is_hex(n, 2)) {
                continue;
            }
            let Ok(files) = fs::read_dir(dir.path()) else {
                continue;
            };
            for file in files.flatten() {
                let name = file.file_name();
                let Some(name) = name.to_str() else { continue };
                // Vanished under us (another mount evicted it): skip.
                let Ok(meta) = file.metadata() else { continue };
                let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                if name.starts_with(TMP_PREFIX) {
                    let age = SystemTime::now().duration_since(mtime).unwrap_or_default();
                    if age > TMP_MAX_AGE {
                        let _ = fs::remove_file(file.path());
                    }
                } else if meta.is_file() && is_hex(name, 62) {
                    out.push((mtime, meta.len(), file.path()));
                }
            }
        }
        out
    }
}
