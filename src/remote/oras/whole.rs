//! Whole-blob copies, for registries that ignore `Range` (they answer a ranged blob read with
//! `200` and the whole blob).
//!
//! Without them, every 8 MiB range a load wants would stream the blob from its start: a 1 GiB
//! file would cost about 64 GiB of transfer. [`WholeBlobs`] instead downloads a blob once into a
//! temporary file and serves that range and every later one with `pread`.
//!
//! Guarantees:
//! - **Once per blob.** Concurrent reads of one blob wait for the one download (single flight);
//!   a failed download is shared by its waiters, and the next read tries again.
//! - **Never more than the descriptor says.** [`fill`] stops as soon as the answer runs past the
//!   layer's size, and checks the sha256 digest while writing (other digest algorithms are
//!   checked by oci-client's verifying stream): a hostile or broken registry cannot make podfs
//!   write more than the manifest's size, nor serve bytes that do not match it.
//! - **No leftovers.** The files are unnamed temporary files (`tempfile::tempfile_in`, mode
//!   0600) in the staging directory: the kernel removes them when they are closed, when the
//!   remote is dropped or the process dies, even by `SIGKILL`.
//! - **Bounded disk use.** The files kept add up to at most `max(keep, 2 × the largest kept
//!   blob)`; beyond that the least recently used ones are dropped (readers still holding one
//!   finish with it). `keep` is [`KEEP_AT_LEAST`] for real remotes: a load whose state blobs
//!   add up to more than that may download an evicted blob again.
//!
//! Lock: `blobs` is a `std::sync::Mutex` held for short sections only, never across `.await`.

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio::sync::OnceCell;

use super::client::lock;
use crate::remote::{RemoteError, RemoteResult};

/// Whole-blob files kept at least, in bytes, before the least recently used are dropped: 4 GiB.
pub const KEEP_AT_LEAST: u64 = 4 << 30;

/// The result of one blob's download, shared by everyone who waited for it.
type Download = Result<Arc<std::fs::File>, Arc<RemoteError>>;

struct Slot {
    cell: Arc<OnceCell<Download>>,
    size: u64,
    /// Tick of the last read, for least-recently-used eviction.
    used: u64,
}

/// Downloaded blobs by digest, each in its own temporary file.
pub struct WholeBlobs {
    dir: PathBuf,
    keep: u64,
    blobs: Mutex<HashMap<String, Slot>>,
    clock: AtomicU64,
}

impl std::fmt::Debug for WholeBlobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WholeBlobs")
            .field("dir", &self.dir)
            .field("keep", &self.keep)
            .finish_non_exhaustive()
    }
}

impl WholeBlobs {
    /// Files go in `dir` (created when first needed); `keep` bytes are kept at least.
    pub fn new(dir: PathBuf, keep: u64) -> Self {
        Self {
            dir,
            keep,
            blobs: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(0),
        }
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Bytes `range` of blob `digest` (`size` bytes), from its whole copy. Unless a copy is
    /// already here or being made, `download` is called with an empty temporary file to fill
    /// (see [`fill`]) and return; every other read of the blob waits for that one. `first` is an
    /// answer already received with the whole blob, handed to `download`; when another read
    /// already has the blob in hand it is dropped at once, which closes its connection.
    pub async fn read<T, F, Fut>(
        &self,
        digest: &str,
        size: u64,
        range: Range<u64>,
        first: Option<T>,
        download: F,
    ) -> RemoteResult<Bytes>
    where
        F: FnOnce(std::fs::File, Option<T>) -> Fut,
        Fut: Future<Output = RemoteResult<std::fs::File>>,
    {
        let (cell, created) = self.slot(digest, size);
        let first = if created { first } else { None };
        let done = cell
            .get_or_init(|| async {
                let file = self.create().await.map_err(Arc::new)?;
                download(file, first).await.map(Arc::new).map_err(Arc::new)
            })
            .await;
        let file = match done {
            Ok(f) => Arc::clone(f),
            Err(e) => {
                self.forget(digest, &cell);
                return Err(copy_error(e));
            }
        };
        self.evict(digest);
        pread(file, range).await
    }

    /// The slot of `digest`, marked as just used, and whether this call created it.
    fn slot(&self, digest: &str, size: u64) -> (Arc<OnceCell<Download>>, bool) {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut blobs = lock(&self.blobs);
        let mut created = false;
        let slot = blobs.entry(digest.to_owned()).or_insert_with(|| {
            created = true;
            Slot {
                cell: Arc::new(OnceCell::new()),
                size,
                used: tick,
            }
        });
        slot.used = tick;
        (Arc::clone(&slot.cell), created)
    }

    /// Drops a failed download so that the next read tries again.
    fn forget(&self, digest: &str, cell: &Arc<OnceCell<Download>>) {
        let mut blobs = lock(&self.blobs);
        if blobs
            .get(digest)
            .is_some_and(|s| Arc::ptr_eq(&s.cell, cell))
        {
            blobs.remove(digest);
        }
    }

    /// Drops the least recently used copies (never `current`) beyond the bound.
    fn evict(&self, current: &str) {
        let mut blobs = lock(&self.blobs);
        let ready = |s: &Slot| matches!(s.cell.get(), Some(Ok(_)));
        let mut kept: Vec<(u64, u64, String)> = blobs
            .iter()
            .filter(|(_, s)| ready(s))
            .map(|(d, s)| (s.used, s.size, d.clone()))
            .collect();
        let mut total: u64 = kept.iter().map(|k| k.1).sum();
        let largest = kept.iter().map(|k| k.1).max().unwrap_or(0);
        let bound = self.keep.max(largest.saturating_mul(2));
        if total <= bound {
            return;
        }
        kept.sort_unstable();
        for (_, size, digest) in kept {
            if total <= bound {
                break;
            }
            if digest != current {
                tracing::debug!(digest, size, "dropping the whole copy of a blob");
                blobs.remove(&digest);
                total -= size;
            }
        }
    }

    /// An empty unnamed temporary file (mode 0600) in the directory.
    async fn create(&self) -> RemoteResult<std::fs::File> {
        let dir = self.dir.clone();
        let made = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            let file = tempfile::tempfile_in(&dir)?;
            // O_TMPFILE files get 0666 minus the umask.
            file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            Ok(file)
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|r| r);
        made.map_err(RemoteError::io(format!(
            "creating a temporary file for a whole blob in {} (it needs room for the blob)",
            self.dir.display()
        )))
    }

    #[cfg(test)]
    fn kept(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.blobs).keys().cloned().collect();
        v.sort();
        v
    }
}

/// `range` of `file`, read in a blocking task.
async fn pread(file: Arc<std::fs::File>, range: Range<u64>) -> RemoteResult<Bytes> {
    let context = format!(
        "reading bytes {}..{} of a temporary blob copy",
        range.start, range.end
    );
    let len = usize::try_from(range.end.saturating_sub(range.start))
        .map_err(|_| RemoteError::io(context.clone())(std::io::Error::other("range too large")))?;
    let read = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, range.start)?;
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))
    .and_then(|r| r);
    read.map_err(RemoteError::io(context))
}

/// Why [`fill`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    /// Receiving the blob failed (broken connection, short answer): worth another attempt.
    #[error("receiving the blob: {0}")]
    Transfer(std::io::Error),
    #[error("writing the temporary copy: {0}")]
    Write(std::io::Error),
    #[error(
        "the registry sent more than the {size} bytes the manifest gives for this blob; stopped \
         (the registry, or a proxy in between, is misbehaving)"
    )]
    TooLong { size: u64 },
    #[error(
        "the blob's digest is {actual}, not {expected} as the manifest says (the registry, or a \
         proxy in between, corrupted it)"
    )]
    Digest { expected: String, actual: String },
}

/// Writes the blob `stream` into `file` from its start, stopping at once if it runs past `size`
/// bytes, and checks that it is exactly `size` bytes with digest `digest` (sha256 here; others
/// are left to oci-client's verifying stream).
pub async fn fill<S>(
    file: &std::fs::File,
    mut stream: S,
    digest: &str,
    size: u64,
) -> Result<(), FillError>
where
    S: Stream<Item = std::io::Result<Bytes>> + Unpin,
{
    let mut f = tokio::fs::File::from_std(file.try_clone().map_err(FillError::Write)?);
    f.set_len(0).await.map_err(FillError::Write)?;
    f.seek(std::io::SeekFrom::Start(0))
        .await
        .map_err(FillError::Write)?;
    let mut out = tokio::io::BufWriter::with_capacity(1 << 20, f);
    let expected = digest.strip_prefix("sha256:");
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let check = |hasher: Sha256| match expected {
        Some(want) => {
            let actual = hex::encode(hasher.finalize());
            if actual == want {
                Ok(())
            } else {
                Err(FillError::Digest {
                    expected: digest.to_owned(),
                    actual: format!("sha256:{actual}"),
                })
            }
        }
        None => Ok(()),
    };
    loop {
        match stream.next().await {
            Some(Ok(chunk)) => {
                if written + chunk.len() as u64 > size {
                    return Err(FillError::TooLong { size });
                }
                hasher.update(&chunk);
                out.write_all(&chunk).await.map_err(FillError::Write)?;
                written += chunk.len() as u64;
            }
            // All bytes arrived but a check of the sender failed: ours decides.
            Some(Err(e)) if written == size => {
                check(hasher)?;
                return Err(FillError::Transfer(e));
            }
            Some(Err(e)) => return Err(FillError::Transfer(e)),
            None if written < size => {
                return Err(FillError::Transfer(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the answer ended after {written} of {size} bytes"),
                )));
            }
            None => break,
        }
    }
    check(hasher)?;
    // No fsync: the copy is read back through the page cache and never outlives the process.
    out.flush().await.map_err(FillError::Write)
}

/// A copy of `e` for each reader that waited on the same failed download.
fn copy_error(e: &RemoteError) -> RemoteError {
    match e {
        RemoteError::NotFound(s) => RemoteError::NotFound(s.clone()),
        RemoteError::AlreadyExists(s) => RemoteError::AlreadyExists(s.clone()),
        RemoteError::Cancelled => RemoteError::Cancelled,
        RemoteError::Denied { remote, detail } => RemoteError::Denied {
            remote: remote.clone(),
            detail: detail.clone(),
        },
        RemoteError::Unavailable { remote, detail } => RemoteError::Unavailable {
            remote: remote.clone(),
            detail: detail.clone(),
        },
        RemoteError::Other { remote, detail } => RemoteError::Other {
            remote: remote.clone(),
            detail: detail.clone(),
        },
        RemoteError::Io { context, source } => RemoteError::Io {
            context: context.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn digest_of(bytes: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
    }

    fn chunks(bytes: &[u8]) -> impl Stream<Item = std::io::Result<Bytes>> + Unpin {
        let pieces: Vec<std::io::Result<Bytes>> = bytes
            .chunks(1000)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        futures::stream::iter(pieces)
    }

    fn contents(file: &std::fs::File) -> Vec<u8> {
        let mut v = vec![0; file.metadata().unwrap().len() as usize];
        file.read_exact_at(&mut v, 0).unwrap();
        v
    }

    #[tokio::test]
    async fn fill_writes_exactly_the_blob_and_starts_over_on_a_retry() {
        let blob: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        let file = WholeBlobs::new(dir.path().to_owned(), 0)
            .create()
            .await
            .unwrap();
        let d = digest_of(&blob);
        fill(&file, chunks(&blob), &d, blob.len() as u64)
            .await
            .unwrap();
        fill(&file, chunks(&blob), &d, blob.len() as u64)
            .await
            .unwrap();
        assert_eq!(contents(&file), blob);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(file.metadata().unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[tokio::test]
    async fn fill_stops_at_the_descriptor_size_and_checks_the_digest() {
        let blob = vec![7u8; 5000];
        let file = tempfile::tempfile().unwrap();
        let d = digest_of(&blob);
        // A registry that keeps sending: stopped at the declared size, nothing past it written.
        let endless = futures::stream::repeat_with(|| Ok(Bytes::from_static(&[1u8; 1000])));
        let err = fill(&file, endless, &d, 5000).await.unwrap_err();
        assert!(matches!(err, FillError::TooLong { size: 5000 }), "{err}");
        assert!(file.metadata().unwrap().len() <= 5000);
        // Same size, other bytes.
        let err = fill(&file, chunks(&[8u8; 5000]), &d, 5000)
            .await
            .unwrap_err();
        assert!(matches!(err, FillError::Digest { .. }), "{err}");
        assert!(err.to_string().contains(&d), "{err}");
        // Short: worth another attempt.
        let err = fill(&file, chunks(&blob[..100]), &d, 5000)
            .await
            .unwrap_err();
        assert!(matches!(err, FillError::Transfer(_)), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reads_of_a_blob_share_one_download() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Arc::new(WholeBlobs::new(dir.path().join("staging"), 1 << 30));
        let blob: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let d = digest_of(&blob);
        let downloads = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut reads = Vec::new();
        for i in 0..16u64 {
            let (blobs, blob, d) = (Arc::clone(&blobs), blob.clone(), d.clone());
            let (downloads, gate) = (Arc::clone(&downloads), Arc::clone(&gate));
            let range = i * 6000..i * 6000 + 5000;
            let key = d.clone();
            reads.push(tokio::spawn(async move {
                blobs
                    .read(
                        &key,
                        blob.len() as u64,
                        range,
                        None::<()>,
                        |file, _| async move {
                            downloads.fetch_add(1, Ordering::SeqCst);
                            gate.notified().await; // all reads queue up meanwhile
                            fill(&file, chunks(&blob), &d, blob.len() as u64)
                                .await
                                .map_err(|e| RemoteError::io("test")(std::io::Error::other(e)))?;
                            Ok(file)
                        },
                    )
                    .await
            }));
        }
        // The download waits until every read has found the blob's slot.
        let waiting = || {
            lock(&blobs.blobs)
                .get(&d)
                .map_or(0, |s| Arc::strong_count(&s.cell))
        };
        while waiting() < 17 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        for (i, r) in reads.into_iter().enumerate() {
            let start = i * 6000;
            assert_eq!(r.await.unwrap().unwrap(), blob[start..start + 5000]);
        }
        assert_eq!(downloads.load(Ordering::SeqCst), 1);
        // The unnamed files leave nothing in the directory.
        assert_eq!(
            std::fs::read_dir(dir.path().join("staging"))
                .unwrap()
                .count(),
            0
        );
    }

    #[tokio::test]
    async fn a_failed_download_is_tried_again_by_the_next_read() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = WholeBlobs::new(dir.path().to_owned(), 1 << 30);
        let blob = vec![3u8; 4000];
        let d = digest_of(&blob);
        let err = blobs
            .read(&d, 4000, 0..10, None::<()>, |_, _| async {
                Err::<std::fs::File, _>(RemoteError::NotFound("blob".into()))
            })
            .await
            .unwrap_err();
        assert!(matches!(err, RemoteError::NotFound(_)));
        assert!(blobs.kept().is_empty());
        let (b, digest) = (&blob, &d);
        let got = blobs
            .read(&d, 4000, 10..20, None::<()>, |file, _| async move {
                fill(&file, chunks(b), digest, 4000).await.unwrap();
                Ok(file)
            })
            .await
            .unwrap();
        assert_eq!(got, blob[10..20]);
    }

    #[tokio::test]
    async fn least_recently_used_copies_are_dropped_beyond_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        // Bound: max(1000, 2 × the largest blob) = 1000 bytes for three 400-byte blobs.
        let blobs = WholeBlobs::new(dir.path().to_owned(), 1000);
        let all: Vec<(Vec<u8>, String)> = (0..3u8)
            .map(|i| {
                let b = vec![i; 400];
                let d = digest_of(&b);
                (b, d)
            })
            .collect();
        for i in [0, 1, 0, 2] {
            let (b, d) = &all[i];
            blobs
                .read(d, 400, 0..1, None::<()>, |file, _| async move {
                    fill(&file, chunks(b), d, 400).await.unwrap();
                    Ok(file)
                })
                .await
                .unwrap();
        }
        let mut want = vec![all[0].1.clone(), all[2].1.clone()];
        want.sort();
        assert_eq!(blobs.kept(), want, "blob 1 was the least recently used");
    }
}
