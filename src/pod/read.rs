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

use super::blocks::{block_checked, block_range, block_size, verify_block};
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
    let bytes = version_bytes(remote, pod, version).await?;
    decode_version(pod, version, bytes).await
}

/// The raw version object of `version` (a missing one is [`PodError::NoSuchVersion`]).
pub async fn version_bytes(remote: &dyn Remote, pod: &PodName, version: u64) -> PodResult<Bytes> {
    remote
        .read_version(pod, version)
        .await
        .map_err(|e| map_missing(remote, pod, version, e))
}

/// Decodes (and so checks) a raw version object.
pub async fn decode_version(pod: &PodName, version: u64, bytes: Bytes) -> PodResult<VersionObject> {
    // Inflating and parsing a large manifest takes seconds: off the async threads (the mount's
    // other operations go on meanwhile).
    let pod = pod.clone();
    super::blocking(move || VersionObject::decode(&pod, version, bytes)).await
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
    let &DataRef {
        state,
        offset,
        csize,
        ..
    } = data_of(pod, via, entry)?;
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
/// the end gives fewer bytes, as `pread` does), checked wherever the manifest allows:
///
/// - a stored file whose blocks can be checked ([`block_checked`]: it has block checksums, or is
///   at most one block) is read as the whole blocks that hold the range, each verified;
/// - a deflated file is fetched whole, inflated and checked (size and CRC-32);
/// - a stored file larger than one block saved before block checksums existed is read as
///   exactly those bytes, unchecked: only a reader of the whole file can check it
///   ([`WholeFileCheck`](super::blocks::WholeFileCheck)).
pub async fn read_range(
    remote: &dyn Remote,
    pod: &PodName,
    via: u64,
    entry: &Entry,
    range: Range<u64>,
) -> PodResult<Bytes> {
    let data = data_of(pod, via, entry)?;
    let end = range.end.min(entry.size);
    if range.start >= end {
        return Ok(Bytes::new());
    }
    if data.method == Method::Stored && !block_checked(entry) {
        return read_stored(remote, pod, via, entry, range.start..end).await;
    }
    let b = block_size(entry);
    let first = range.start / b;
    let bytes = read_blocks(remote, pod, via, entry, first..end.div_ceil(b)).await?;
    let at = first * b;
    Ok(bytes.slice((range.start - at) as usize..(end - at) as usize))
}

/// The bytes of blocks `blocks` of file `entry` of version `via` (see
/// [`block_range`](super::blocks::block_range); blocks past the end are left out), each verified
/// against its checksum when [`block_checked`] says it can be: a damaged block is a
/// [`PodError::Corrupt`] that names the file and the offset of the block. A stored file is one
/// range read of those blocks; a deflated one is fetched whole, inflated and checked.
pub async fn read_blocks(
    remote: &dyn Remote,
    pod: &PodName,
    via: u64,
    entry: &Entry,
    blocks: Range<u64>,
) -> PodResult<Bytes> {
    let data = data_of(pod, via, entry)?;
    let b = block_size(entry);
    let start = blocks.start.saturating_mul(b).min(entry.size);
    let end = blocks.end.saturating_mul(b).min(entry.size);
    if start >= end {
        return Ok(Bytes::new());
    }
    let bytes = match data.method {
        Method::Stored => read_stored(remote, pod, via, entry, start..end).await?,
        Method::Deflate => {
            let stored = remote
                .read_state(pod, via, data.state, data.range())
                .await
                .map_err(|e| missing(pod, via, entry, e))?;
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
            Bytes::from(plain).slice(start as usize..end as usize)
        }
    };
    // A deflated file was checked whole (size and CRC-32) as it was inflated.
    if data.method == Method::Stored && block_checked(entry) {
        for i in blocks.start..end.div_ceil(b) {
            let r = block_range(entry, i);
            let block = &bytes[(r.start - start) as usize..(r.end - start) as usize];
            verify_block(entry, i, block).map_err(|e| {
                corrupt(
                    pod,
                    via,
                    entry,
                    format!("bytes {}..{} are damaged ({e})", e.offset(entry), r.end),
                )
            })?;
        }
    }
    Ok(bytes)
}

/// Exactly bytes `range` (within the file) of stored file `entry`, unchecked: for a caller that
/// checks the blocks itself (the mount's cache checks each block once, from the remote or disk).
pub async fn read_stored(
    remote: &dyn Remote,
    pod: &PodName,
    via: u64,
    entry: &Entry,
    range: Range<u64>,
) -> PodResult<Bytes> {
    let data = data_of(pod, via, entry)?;
    let bytes = remote
        .read_state(
            pod,
            via,
            data.state,
            data.offset + range.start..data.offset + range.end,
        )
        .await
        .map_err(|e| missing(pod, via, entry, e))?;
    if bytes.len() as u64 != range.end - range.start {
        return Err(corrupt(
            pod,
            via,
            entry,
            "its state object is truncated".into(),
        ));
    }
    Ok(bytes)
}

/// Where file `entry`'s bytes live; a file without them is a corrupt version.
fn data_of<'a>(pod: &PodName, via: u64, entry: &'a Entry) -> PodResult<&'a DataRef> {
    entry
        .data
        .as_ref()
        .ok_or_else(|| corrupt(pod, via, entry, "a file without data".into()))
}

fn missing(pod: &PodName, via: u64, entry: &Entry, e: RemoteError) -> PodError {
    match e {
        RemoteError::NotFound(what) => corrupt(
            pod,
            via,
            entry,
            format!("its state object is missing ({what})"),
        ),
        e => e.into(),
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
    let data = data_of(pod, via, entry)?;
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

    /// Replaces state object `state` (`len` bytes) of `pod` by a copy with byte `at` flipped.
    async fn damage(remote: &MemoryRemote, pod: &PodName, state: u64, len: u64, at: u64) {
        let mut bytes = remote
            .read_state(pod, state, state, 0..len)
            .await
            .unwrap()
            .to_vec();
        bytes[at as usize] ^= 0x01;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("state.zip");
        std::fs::write(&path, &bytes).unwrap();
        remote.delete_state(pod, state).await.unwrap();
        let progress: Arc<dyn Progress> = Arc::new(NoProgress);
        remote.put_state(pod, state, &path, progress).await.unwrap();
    }

    #[tokio::test]
    async fn saves_write_block_checksums_for_files_larger_than_a_block() {
        let (_remote, _pod, obj, big, _) = pod_with_files().await;
        let blocks = obj
            .manifest
            .get("big")
            .unwrap()
            .data
            .as_ref()
            .unwrap()
            .blocks
            .clone();
        let want: Vec<u32> = big
            .chunks(256 << 10)
            .map(crate::pod::blocks::crc32c)
            .collect();
        assert_eq!(blocks.map(|b| (b.size, b.crc32c)), Some((256 << 10, want)));
        for small in ["small", "dir/x"] {
            let e = obj.manifest.get(small).unwrap();
            assert!(e.data.as_ref().unwrap().blocks.is_none(), "{small}");
            assert!(block_checked(e));
        }
    }

    #[tokio::test]
    async fn damaged_blocks_are_errors_naming_the_file_and_offset() {
        let (remote, pod, obj, big, _) = pod_with_files().await;
        let e = obj.manifest.get("big").unwrap();
        let offset = e.data.as_ref().unwrap().offset;
        // Flip a byte in the seventh 256 KiB block (file offset 1.5 MiB + 10).
        damage(
            &remote,
            &pod,
            1,
            obj.info.stored_bytes,
            offset + (3 << 19) + 10,
        )
        .await;
        for range in [
            (3 << 19)..(3 << 19) + 1,
            (3 << 19) + 10..(3 << 19) + 11,
            (7 << 18) - 1..(7 << 18),
            0..(3 << 20),
        ] {
            let err = read_range(&remote, &pod, 1, e, range.clone())
                .await
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("version 1 of pod \"p\"")
                    && err.contains("\"big\"")
                    && err.contains("bytes 1572864..1835008 are damaged"),
                "{range:?}: {err}"
            );
        }
        let err = read_blocks(&remote, &pod, 1, e, 6..7).await.unwrap_err();
        assert!(err.to_string().contains("CRC-32C"), "{err}");
        // The other blocks still read, the neighbours too, the last one short.
        let got = read_range(&remote, &pod, 1, e, 10..(3 << 19))
            .await
            .unwrap();
        assert_eq!(&got[..], &big[10..3 << 19]);
        let got = read_blocks(&remote, &pod, 1, e, 7..20).await.unwrap();
        assert_eq!(&got[..], &big[7 << 18..]);
    }

    #[tokio::test]
    async fn files_saved_without_block_checksums_read_unchecked() {
        let (remote, pod, mut obj, big, _) = pod_with_files().await;
        // Version 1 as a podfs from before block checksums would have written it.
        for e in &mut obj.manifest.entries {
            if let Some(d) = e.data.as_mut() {
                d.blocks = None;
            }
        }
        let name = crate::remote::object_name(&pod, crate::remote::ObjectKind::Version, 1);
        remote.put_raw(&name, obj.encode().unwrap());
        let obj = read_version(&remote, &pod, 1).await.unwrap();
        let e = obj.manifest.get("big").unwrap();
        assert!(!block_checked(e));
        let offset = e.data.as_ref().unwrap().offset;
        damage(&remote, &pod, 1, obj.info.stored_bytes, offset + 5).await;
        // A range is read unchecked; only a reader of the whole file notices.
        let got = read_range(&remote, &pod, 1, e, 0..10).await.unwrap();
        assert_ne!(&got[..], &big[..10]);
        let mut check = crate::pod::blocks::WholeFileCheck::new(e).unwrap();
        let mut result = Ok(crate::pod::blocks::WholeFile::Reading);
        for i in 0..3u64 {
            let r = i << 20..(i + 1) << 20;
            let bytes = read_range(&remote, &pod, 1, e, r.clone()).await.unwrap();
            result = check.update(r.start, &bytes);
        }
        assert!(result.is_err(), "{result:?}");
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
