//! Reading pods from a remote: a version's manifest, and a file's bytes by their data offset.
//!
//! A file's bytes are fetched as range reads of at most [`CHUNK`] bytes, a few in flight at once,
//! decompressed as they arrive, and checked against the manifest's size and CRC-32, so memory stays
//! bounded whatever the file size.

use std::io::Write;
use std::sync::Arc;

use std::ops::Range;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;

use super::manifest::{DataRef, Entry, Method, VersionInfo, VersionObject, decode_info};
use super::{PodError, PodName, PodResult};
use crate::remote::{Remote, RemoteError};

/// Largest single range read.
pub const CHUNK: u64 = 8 << 20;
/// Range reads in flight per file.
const CHUNKS_IN_FLIGHT: usize = 4;
/// Compressed bytes fed to the inflater at a time (deflate expands at most ~1032:1).
const INFLATE_STEP: usize = 8 << 10;
/// Unit of [`ReadBudget`] permits.
const BUDGET_UNIT: u64 = 64 << 10;

/// Bounds the file data held in memory by all reads that share it (fetched but not yet
/// written), whatever the number of files and chunks in flight.
#[derive(Debug, Clone)]
pub struct ReadBudget(Arc<tokio::sync::Semaphore>);

impl ReadBudget {
    /// A budget of `bytes` (at least one chunk).
    pub fn new(bytes: u64) -> Self {
        let units = bytes.max(CHUNK) / BUDGET_UNIT;
        Self(Arc::new(tokio::sync::Semaphore::new(
            usize::try_from(units).unwrap_or(usize::MAX >> 4),
        )))
    }
}

impl Default for ReadBudget {
    /// 64 MiB.
    fn default() -> Self {
        Self::new(64 << 20)
    }
}

/// The versions of `pod`, failing with a clear error if it has none.
pub async fn versions_of(remote: &dyn Remote, pod: &PodName) -> PodResult<Vec<u64>> {
    let versions = remote.list_versions(pod).await?;
    if versions.is_empty() {
        return Err(PodError::NoSuchPod {
            pod: pod.to_string(),
            remote: remote.name().to_owned(),
        });
    }
    Ok(versions)
}

/// Picks `wanted` (or the latest) among the pod's versions.
pub async fn resolve_version(
    remote: &dyn Remote,
    pod: &PodName,
    wanted: Option<u64>,
) -> PodResult<u64> {
    let versions = versions_of(remote, pod).await?;
    pick_version(remote, pod, &versions, wanted)
}

/// Picks `wanted` (or the latest) among `versions`, the pod's listed versions.
pub fn pick_version(
    remote: &dyn Remote,
    pod: &PodName,
    versions: &[u64],
    wanted: Option<u64>,
) -> PodResult<u64> {
    match wanted {
        None => Ok(*versions.last().unwrap_or(&0)),
        Some(v) if versions.contains(&v) => Ok(v),
        Some(v) => Err(PodError::NoSuchVersion {
            pod: pod.to_string(),
            version: v,
            remote: remote.name().to_owned(),
        }),
    }
}

fn map_missing(remote: &dyn Remote, pod: &PodName, version: u64, e: RemoteError) -> PodError {
    match e {
        RemoteError::NotFound(_) => PodError::NoSuchVersion {
            pod: pod.to_string(),
            version,
            remote: remote.name().to_owned(),
        },
        e => e.into(),
    }
}

/// Reads and validates a whole version object.
pub async fn read_version(
    remote: &dyn Remote,
    pod: &PodName,
    version: u64,
) -> PodResult<VersionObject> {
    let bytes = remote
        .read_version(pod, version)
        .await
        .map_err(|e| map_missing(remote, pod, version, e))?;
    VersionObject::decode(pod, version, bytes)
}

/// Reads only a version's `version.json`.
pub async fn read_info(remote: &dyn Remote, pod: &PodName, version: u64) -> PodResult<VersionInfo> {
    let bytes = remote
        .read_version(pod, version)
        .await
        .map_err(|e| map_missing(remote, pod, version, e))?;
    decode_info(pod, version, bytes)
}

/// A piece of a file's stored bytes, holding its share of the [`ReadBudget`] until written.
pub struct Chunk {
    pub bytes: Bytes,
    /// Bytes asked for (a shorter `bytes` means the state object is truncated).
    pub want: u64,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Chunk {
    /// `len` bytes from `start` of this chunk, for one file of a coalesced read (fewer if the
    /// chunk came back short). The budget stays with this chunk.
    pub fn part(&self, start: u64, len: u64) -> Chunk {
        let have = self.bytes.len() as u64;
        let (a, b) = (start.min(have), start.saturating_add(len).min(have));
        Chunk {
            bytes: self.bytes.slice(a as usize..b as usize),
            want: len,
            _permit: None,
        }
    }
}

/// Reads bytes `range` of state object `state` (via version `via`) as one request, holding
/// budget for them until the returned chunk is dropped.
pub async fn fetch(
    remote: &dyn Remote,
    pod: &PodName,
    via: u64,
    state: u64,
    range: Range<u64>,
    budget: &ReadBudget,
) -> Result<Chunk, RemoteError> {
    let want = range.end - range.start;
    let units = u32::try_from(want.div_ceil(BUDGET_UNIT)).unwrap_or(u32::MAX);
    let permit = Arc::clone(&budget.0)
        .acquire_many_owned(units)
        .await
        .map_err(|_| RemoteError::io("read budget")(std::io::Error::other("closed")))?;
    let bytes = remote.read_state(pod, via, state, range).await?;
    Ok(Chunk {
        bytes,
        want,
        _permit: Some(permit),
    })
}

/// Streams the bytes of file `entry` of version `via` into `out`, checking size and CRC-32:
/// range reads of at most [`CHUNK`] bytes, a few in flight. Returns the bytes written.
pub async fn copy_file<W: AsyncWrite + Unpin + Send>(
    remote: &dyn Remote,
    pod: &PodName,
    via: u64,
    entry: &Entry,
    out: &mut W,
    budget: &ReadBudget,
) -> PodResult<u64> {
    let Some(&DataRef {
        state,
        offset,
        csize,
        ..
    }) = entry.data.as_ref()
    else {
        return Err(corrupt(pod, via, entry, "a file without data".into()));
    };
    let ranges = (0..csize.div_ceil(CHUNK)).map(move |i| {
        let start = offset + i * CHUNK;
        start..(start + CHUNK).min(offset + csize)
    });
    // Chunks of one file queue for budget in order, so the chunk being written always holds
    // its permits (no deadlock between files).
    let chunks = futures::stream::iter(ranges)
        .map(|r| fetch(remote, pod, via, state, r, budget))
        .buffered(CHUNKS_IN_FLIGHT);
    decode_into(pod, via, entry, chunks, out).await
}

/// Bytes `range` of file `entry` of version `via`, clipped to the file's size (a range past
/// the end gives fewer bytes, as `pread` does). A stored file is read as exactly those bytes of
/// its state object, unchecked (one block of a file cannot be checked against a CRC-32 of the
/// whole file); a deflated one is fetched whole, inflated and checked (size and CRC-32), and the
/// range cut from it.
pub async fn read_range(
    remote: &dyn Remote,
    pod: &PodName,
    via: u64,
    entry: &Entry,
    range: Range<u64>,
) -> PodResult<Bytes> {
    let Some(data) = &entry.data else {
        return Err(corrupt(pod, via, entry, "a file without data".into()));
    };
    let end = range.end.min(entry.size);
    if range.start >= end {
        return Ok(Bytes::new());
    }
    let missing = |e: RemoteError| match e {
        RemoteError::NotFound(what) => corrupt(
            pod,
            via,
            entry,
            format!("its state object is missing ({what})"),
        ),
        e => e.into(),
    };
    match data.method {
        Method::Stored => {
            let at = data.offset + range.start;
            let bytes = remote
                .read_state(pod, via, data.state, at..data.offset + end)
                .await
                .map_err(missing)?;
            if bytes.len() as u64 != end - range.start {
                return Err(corrupt(
                    pod,
                    via,
                    entry,
                    "its state object is truncated".into(),
                ));
            }
            Ok(bytes)
        }
        Method::Deflate => {
            let stored = remote
                .read_state(pod, via, data.state, data.range())
                .await
                .map_err(missing)?;
            let want = data.csize;
            let one = futures::stream::once(std::future::ready(Ok(Chunk {
                bytes: stored,
                want,
                _permit: None,
            })));
            // Saves deflate only small files; the size is the manifest's word, so the hint is capped.
            let hint = entry.size.min(CHUNK);
            let mut plain = Vec::with_capacity(usize::try_from(hint).unwrap_or(0));
            decode_into(pod, via, entry, one, &mut plain).await?;
            Ok(Bytes::from(plain).slice(range.start as usize..end as usize))
        }
    }
}

fn corrupt(pod: &PodName, via: u64, entry: &Entry, reason: String) -> PodError {
    PodError::Corrupt {
        pod: pod.to_string(),
        version: via,
        reason: format!("{:?}: {reason}", entry.path),
    }
}

/// Decodes a file's stored bytes, arriving as `chunks` in order, into `out`: inflates them if
/// needed and checks the manifest's size and CRC-32. Returns the bytes written.
pub async fn decode_into<W: AsyncWrite + Unpin + Send>(
    pod: &PodName,
    via: u64,
    entry: &Entry,
    chunks: impl Stream<Item = Result<Chunk, RemoteError>>,
    out: &mut W,
) -> PodResult<u64> {
    let corrupt = |reason: String| corrupt(pod, via, entry, reason);
    let Some(data) = &entry.data else {
        return Err(corrupt("a file without data".into()));
    };
    let mut chunks = std::pin::pin!(chunks);
    let mut hasher = crc32fast::Hasher::new();
    let mut written = 0u64;
    let mut inflate = (data.method == Method::Deflate)
        .then(|| flate2::write::DeflateDecoder::new(Vec::with_capacity(64 << 10)));
    let io_err = |e: std::io::Error| corrupt(format!("cannot decompress: {e}"));
    let mut plain_buf = Vec::new();
    while let Some(chunk) = chunks.try_next().await.map_err(|e| match e {
        RemoteError::NotFound(what) => corrupt(format!("its state object is missing ({what})")),
        e => e.into(),
    })? {
        let bytes = &chunk.bytes;
        if bytes.len() as u64 != chunk.want {
            return Err(corrupt(format!(
                "the state object is truncated (got {} of {} bytes)",
                bytes.len(),
                chunk.want
            )));
        }
        let Some(dec) = inflate.as_mut() else {
            written += bytes.len() as u64;
            if written > entry.size {
                return Err(corrupt("more data than its size".into()));
            }
            hasher.update(bytes);
            out.write_all(bytes)
                .await
                .map_err(|e| PodError::io(&entry.path)(e))?;
            continue;
        };
        for step in bytes.chunks(INFLATE_STEP) {
            dec.get_mut().clear();
            dec.write_all(step).map_err(io_err)?;
            dec.flush().map_err(io_err)?;
            std::mem::swap(&mut plain_buf, dec.get_mut());
            written += plain_buf.len() as u64;
            if written > entry.size {
                return Err(corrupt("more data than its size".into()));
            }
            hasher.update(&plain_buf);
            out.write_all(&plain_buf)
                .await
                .map_err(|e| PodError::io(&entry.path)(e))?;
        }
    }
    if let Some(mut dec) = inflate {
        dec.get_mut().clear();
        dec.try_finish().map_err(io_err)?;
        let rest = dec.get_ref();
        written += rest.len() as u64;
        hasher.update(rest);
        out.write_all(rest)
            .await
            .map_err(|e| PodError::io(&entry.path)(e))?;
    }
    if written != entry.size {
        return Err(corrupt(format!(
            "{written} bytes where the manifest says {}",
            entry.size
        )));
    }
    if hasher.finalize() != data.crc32 {
        return Err(corrupt("CRC-32 mismatch: the data is damaged".into()));
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::save::{SaveParams, save};
    use crate::progress::{NoProgress, Progress};
    use crate::remote::memory::MemoryRemote;

    /// A pod on a memory remote: `big` (3 MiB, stored), `small` (deflated), `dir/x`.
    async fn pod_with_files() -> (MemoryRemote, PodName, VersionObject, Vec<u8>, Vec<u8>) {
        let tmp = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..3u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
        let small = b"small file, deflated ".repeat(50);
        std::fs::write(tmp.path().join("big"), &big).unwrap();
        std::fs::write(tmp.path().join("small"), &small).unwrap();
        std::fs::create_dir(tmp.path().join("dir")).unwrap();
        std::fs::write(tmp.path().join("dir/x"), b"x").unwrap();
        let remote = MemoryRemote::new();
        let pod = PodName::new("p").unwrap();
        let params = SaveParams {
            staging_dir: tmp.path().join(".staging"),
            exclude: vec![tmp.path().join(".staging")],
            ..SaveParams::default()
        };
        let progress: Arc<dyn Progress> = Arc::new(NoProgress);
        save(&remote, &pod, tmp.path(), &params, &progress)
            .await
            .unwrap();
        let obj = read_version(&remote, &pod, 1).await.unwrap();
        (remote, pod, obj, big, small)
    }

    #[tokio::test]
    async fn read_range_reads_stored_and_deflated_files() {
        let (remote, pod, obj, big, small) = pod_with_files().await;
        let big_e = obj.manifest.get("big").unwrap();
        let small_e = obj.manifest.get("small").unwrap();
        assert_eq!(big_e.data.as_ref().unwrap().method, Method::Stored);
        assert_eq!(small_e.data.as_ref().unwrap().method, Method::Deflate);
        for range in [0..10, 1_000_000..1_048_576, 3_145_000..3_145_728, 5..5] {
            let got = read_range(&remote, &pod, 1, big_e, range.clone())
                .await
                .unwrap();
            assert_eq!(&got[..], &big[range.start as usize..range.end as usize]);
        }
        let got = read_range(&remote, &pod, 1, small_e, 3..40).await.unwrap();
        assert_eq!(&got[..], &small[3..40]);
        // Past the end: fewer bytes, as pread gives.
        let got = read_range(&remote, &pod, 1, big_e, 3_145_700..4_000_000)
            .await
            .unwrap();
        assert_eq!(got.len(), 28);
        let got = read_range(&remote, &pod, 1, small_e, 10_000..10_010)
            .await
            .unwrap();
        assert!(got.is_empty());
    }

    #[tokio::test]
    async fn manifests_look_up_paths_and_children() {
        let (_remote, _pod, obj, _, _) = pod_with_files().await;
        let m = &obj.manifest;
        assert_eq!(m.get("dir/x").map(|e| e.size), Some(1));
        assert!(m.get("dir/y").is_none() && m.get("").is_none());
        let names = |dir: &str| m.children(dir).map(|e| e.path.clone()).collect::<Vec<_>>();
        assert_eq!(names(""), ["big", "dir", "small"]);
        assert_eq!(names("dir"), ["dir/x"]);
        assert!(names("big").is_empty(), "a file has no children");
        assert!(names("nowhere").is_empty());
    }
}
