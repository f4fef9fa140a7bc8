//! The version object: `version.json` (what the version is) and `manifest.json` (the whole tree,
//! with where each file's bytes live). See docs/FORMAT.md; this module is its reference.
//!
//! [`VersionObject::decode`] validates everything a loader relies on, so code that holds a decoded
//! manifest may trust it: every path is relative, normalized and free of NUL; every entry's parent
//! is a directory of the manifest; entries are sorted and unique; every file points into a state
//! object the version lists, and every state identity is well-formed and names a listed state.

use std::collections::{BTreeMap, HashSet};
use std::io::{Cursor, Read, Write};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use zip::write::SimpleFileOptions;

use super::{PodError, PodName, PodResult};

/// The format version written into `version.json` and `manifest.json`.
pub const FORMAT: u32 = 1;

/// Entry names inside the version zip.
pub const VERSION_JSON: &str = "version.json";
pub const MANIFEST_JSON: &str = "manifest.json";

/// Limits on what a reader accepts (docs/FORMAT.md, *Limits*). They are set from what a real pod
/// needs, about 10 million entries, and keep memory proportional to real content: the manifest is
/// parsed streaming, so whitespace or padding in the JSON costs no memory.
pub mod limits {
    /// `version.json`, uncompressed.
    pub const VERSION_JSON: u64 = 1 << 20;
    /// `manifest.json`, uncompressed (about 226 bytes per entry measured: room for 18 million).
    pub const MANIFEST_JSON: u64 = 4 << 30;
    /// Entries in one manifest.
    pub const ENTRIES: usize = 10_000_000;
    /// Any one JSON string (a path or symlink target is at most 4096 bytes; escapes take up to
    /// six bytes per byte).
    pub const JSON_STRING: usize = 32 << 10;
    /// A path or symlink target, in bytes (Linux's PATH_MAX).
    pub const PATH: usize = 4096;
    /// The whole version object (about 45 bytes per entry deflated, measured): the object is held
    /// in memory while it is decoded. Backends refuse a larger object before reading it.
    pub use crate::remote::MAX_VERSION_OBJECT as VERSION_OBJECT;
    /// Block checksums in one manifest, all files together (4 bytes of memory each). A checksum
    /// carries 32 bits of entropy, so it deflates to no less than 4 bytes (5.5 measured): a
    /// version object within [`VERSION_OBJECT`] never holds more than this many honestly, and a
    /// hostile one (`0,0,0,…` deflates 1000:1) costs at most 512 MiB.
    pub const BLOCK_CHECKSUMS: usize = 1 << 27;
    /// Smallest and largest block size of a file's block checksums.
    pub const MIN_BLOCK: u64 = 64 << 10;
    pub const MAX_BLOCK: u64 = 64 << 20;
}

/// `version.json`: what a version is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub format: u32,
    pub pod: String,
    pub version: u64,
    pub parent: Option<u64>,
    /// RFC 3339, UTC.
    pub created_at: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub creator: String,
    pub tool_version: String,
    /// Regular files in the tree.
    pub file_count: u64,
    /// Sum of the sizes of the regular files in the tree.
    pub logical_bytes: u64,
    /// Size of this version's own state object (0 when it stored no new bytes).
    pub stored_bytes: u64,
    /// State objects the manifest refers to, ascending.
    pub states: Vec<u64>,
    /// The identity of state objects in `states` ([`new_state_id`]; docs/FORMAT.md, *State
    /// identity*): made when the object was created, copied by every later version that uses
    /// it. Absent (empty) in pods written before identities; such states have no identity.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "unique_state_ids"
    )]
    pub state_ids: BTreeMap<u64, String>,
}

impl VersionInfo {
    /// The identity of state object `state`, or `None` when the version records none (a pod
    /// written before identities): then nothing may be cached under its name.
    pub fn state_id(&self, state: u64) -> Option<&str> {
        self.state_ids.get(&state).map(String::as_str)
    }
}

/// Hex digits in a state identity: 128 bits.
pub const STATE_ID_LEN: usize = 32;

/// A new state identity: 128 bits from the system's random number generator, as
/// [`STATE_ID_LEN`] lowercase hex digits. A state object's name (`state-K`) is reused after its
/// pod is deleted and saved again; its identity never is, so a cache keyed by identity is never
/// stale.
pub fn new_state_id() -> PodResult<String> {
    let mut bits = [0u8; STATE_ID_LEN / 2];
    getrandom::fill(&mut bits).map_err(|e| PodError::Io {
        path: "<system random number generator>".into(),
        source: std::io::Error::other(format!(
            "{e}: podfs needs random numbers to name a new state object (check that the \
             getrandom system call or /dev/urandom is available)"
        )),
    })?;
    Ok(hex::encode(bits))
}

/// Whether `id` is a well-formed state identity: exactly [`STATE_ID_LEN`] lowercase hex digits.
pub fn is_state_id(id: &str) -> bool {
    id.len() == STATE_ID_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `manifest.json`: the whole tree, with lookups by path and by directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// Sorted by the bytes of `path`, unique (checked by [`VersionObject::decode`]).
    #[serde(deserialize_with = "bounded_entries")]
    pub entries: Vec<Entry>,
    /// Children of each directory, built on first use.
    #[serde(skip)]
    children: std::sync::OnceLock<ChildIndex>,
}

impl PartialEq for Manifest {
    fn eq(&self, other: &Self) -> bool {
        self.format == other.format && self.entries == other.entries
    }
}

impl Eq for Manifest {}

impl Manifest {
    pub fn new(entries: Vec<Entry>) -> Self {
        Self {
            format: FORMAT,
            entries,
            children: std::sync::OnceLock::new(),
        }
    }

    /// The entry at `path` (binary search: entries are sorted).
    pub fn get(&self, path: &str) -> Option<&Entry> {
        find(&self.entries, path)
    }

    /// The entries directly inside directory `dir` (`""`: the root), sorted by path.
    pub fn children(&self, dir: &str) -> impl Iterator<Item = &Entry> {
        let index = self.children.get_or_init(|| ChildIndex::new(&self.entries));
        index.of(&self.entries, dir)
    }
}

/// The entry at `path` among `entries` sorted by the bytes of their paths.
pub fn find<'a>(entries: &'a [Entry], path: &str) -> Option<&'a Entry> {
    entries
        .binary_search_by(|e| e.path.as_str().cmp(path))
        .ok()
        .map(|i| &entries[i])
}

/// Children of every directory, in compressed rows: the children of the directory at entry `i`
/// are `kids[start[i + 1]..start[i + 2]]`, those of the root `kids[start[0]..start[1]]`. Three
/// `u32`s per entry, whatever the tree's shape.
#[derive(Debug, Clone, Default)]
struct ChildIndex {
    start: Vec<u32>,
    kids: Vec<u32>,
}

impl ChildIndex {
    fn new(entries: &[Entry]) -> Self {
        // Row of each entry's parent: 0 for the root, i + 1 for entry i.
        let parent: Vec<usize> = entries
            .iter()
            .map(|e| match e.path.rsplit_once('/') {
                None => 0,
                Some((dir, _)) => entries
                    .binary_search_by(|x| x.path.as_str().cmp(dir))
                    .map_or(0, |i| i + 1),
            })
            .collect();
        let rows = entries.len() + 1;
        let mut start = vec![0u32; rows + 1];
        for &p in &parent {
            start[p + 1] += 1;
        }
        for r in 0..rows {
            start[r + 1] += start[r];
        }
        let mut next = start.clone();
        let mut kids = vec![0u32; entries.len()];
        for (i, &p) in parent.iter().enumerate() {
            kids[next[p] as usize] = i as u32;
            next[p] += 1;
        }
        Self { start, kids }
    }

    fn of<'a>(&'a self, entries: &'a [Entry], dir: &str) -> impl Iterator<Item = &'a Entry> {
        let row = if dir.is_empty() {
            Some(0)
        } else {
            entries
                .binary_search_by(|x| x.path.as_str().cmp(dir))
                .ok()
                .filter(|&i| entries[i].kind == Kind::Dir)
                .map(|i| i + 1)
        };
        let kids = match row {
            Some(r) => &self.kids[self.start[r] as usize..self.start[r + 1] as usize],
            None => &[][..],
        };
        kids.iter().map(move |&i| &entries[i as usize])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

/// One path of the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative, '/'-separated, no `.`/`..`/empty components, no NUL.
    pub path: String,
    pub kind: Kind,
    /// Permission bits (`0o7777` at most).
    pub mode: u32,
    /// Modification time: seconds since the epoch and nanoseconds.
    pub mtime: i64,
    #[serde(default)]
    pub mtime_nsec: u32,
    /// File size in bytes (0 for directories and symlinks).
    #[serde(default)]
    pub size: u64,
    /// Symlink target, stored verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Where a file's bytes live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataRef>,
}

impl DataRef {
    /// The bytes of the state object that hold this file's (compressed) data.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + self.csize
    }
}

/// Where a file's bytes live: a range of a state object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataRef {
    /// The state object: `localstack-pod-P-state-{state}.zip`.
    pub state: u64,
    /// Offset of the entry's (compressed) data inside the state object.
    pub offset: u64,
    /// Length of the (compressed) data.
    pub csize: u64,
    pub method: Method,
    /// CRC-32 of the uncompressed bytes.
    pub crc32: u32,
    /// CRC-32C of each block of the uncompressed bytes, so one block can be checked on its own.
    /// Written for files larger than one block; absent in pods saved before it existed. Boxed:
    /// most entries have none, and an entry stays small.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<Box<Blocks>>,
}

/// Per-block checksums of a file (docs/FORMAT.md, *Block checksums*).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocks {
    /// Block size in bytes: a power of two, [`limits::MIN_BLOCK`] to [`limits::MAX_BLOCK`].
    pub size: u64,
    /// CRC-32C (Castagnoli) of block `i`, bytes `i * size ..` of the file, for every block:
    /// `ceil(file size / size)` values, the last block possibly short.
    #[serde(deserialize_with = "bounded_checksums")]
    pub crc32c: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Stored,
    Deflate,
}

/// A decoded, validated version object.
#[derive(Debug, Clone)]
pub struct VersionObject {
    pub info: VersionInfo,
    pub manifest: Manifest,
}

/// Why a path is unsafe, or `None` if it is fine.
pub fn unsafe_path_reason(path: &str) -> Option<&'static str> {
    if path.is_empty() {
        Some("empty path")
    } else if path.contains('\0') {
        Some("contains NUL")
    } else if path.starts_with('/') {
        Some("absolute path")
    } else if path.contains('\\') {
        Some("contains a backslash")
    } else if path.split('/').any(|c| c == "..") {
        Some("contains '..'")
    } else if path.split('/').any(|c| c.is_empty() || c == ".") {
        Some("empty or '.' component")
    } else {
        None
    }
}

impl VersionObject {
    /// The identity of state object `state` of this version (see [`VersionInfo::state_id`]).
    pub fn state_id(&self, state: u64) -> Option<&str> {
        self.info.state_id(state)
    }

    /// Encodes the version zip: `version.json` first, then `manifest.json`, both deflated.
    pub fn encode(&self) -> PodResult<Bytes> {
        let corrupt = |reason: String| PodError::Corrupt {
            pod: self.info.pod.clone(),
            version: self.info.version,
            reason,
        };
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .unix_permissions(0o644);
        let info = serde_json::to_vec_pretty(&self.info).map_err(|e| corrupt(e.to_string()))?;
        let manifest = serde_json::to_vec(&self.manifest).map_err(|e| corrupt(e.to_string()))?;
        let large = opts.large_file(manifest.len() as u64 >= u32::MAX as u64);
        let write = |zip: &mut zip::ZipWriter<_>, name: &str, o, data: &[u8]| {
            zip.start_file(name, o)
                .map_err(|e| corrupt(format!("writing {name}: {e}")))?;
            zip.write_all(data)
                .map_err(|e| corrupt(format!("writing {name}: {e}")))
        };
        write(&mut zip, VERSION_JSON, opts, &info)?;
        write(&mut zip, MANIFEST_JSON, large, &manifest)?;
        let cursor = zip
            .finish()
            .map_err(|e| corrupt(format!("finishing the version zip: {e}")))?;
        Ok(Bytes::from(cursor.into_inner()))
    }

    /// Decodes and validates a version zip that should hold version `version` of `pod`.
    pub fn decode(pod: &PodName, version: u64, bytes: Bytes) -> PodResult<Self> {
        let corrupt = corrupt_fn(pod, version);
        let mut zip = open_zip(pod, version, bytes)?;
        let info: VersionInfo =
            parse_entry(&mut zip, VERSION_JSON, limits::VERSION_JSON).map_err(&corrupt)?;
        let manifest: Manifest =
            parse_entry(&mut zip, MANIFEST_JSON, limits::MANIFEST_JSON).map_err(&corrupt)?;
        let obj = Self { info, manifest };
        obj.validate(pod, version)?;
        Ok(obj)
    }

    fn validate(&self, pod: &PodName, version: u64) -> PodResult<()> {
        let corrupt = corrupt_fn(pod, version);
        let info = &self.info;
        check_info(info, pod, version).map_err(&corrupt)?;
        if self.manifest.format != FORMAT {
            return Err(corrupt(format!(
                "manifest format {} is not supported by this podfs (it reads format {FORMAT}): upgrade podfs",
                self.manifest.format
            )));
        }
        if info.parent.is_some_and(|p| p >= version) {
            return Err(corrupt("its parent is not an earlier version".into()));
        }
        let states: HashSet<u64> = info.states.iter().copied().collect();
        if states.iter().any(|&s| s == 0 || s > version) {
            return Err(corrupt("it lists a state object that cannot exist".into()));
        }
        let mut dirs: HashSet<&str> = HashSet::new();
        let mut prev: Option<&str> = None;
        let (mut files, mut bytes) = (0u64, 0u64);
        for e in &self.manifest.entries {
            let unsafe_path = |reason: &str| PodError::UnsafePath {
                pod: pod.to_string(),
                version,
                path: e.path.clone(),
                reason: reason.to_owned(),
            };
            if let Some(reason) = unsafe_path_reason(&e.path) {
                return Err(unsafe_path(reason));
            }
            if prev.is_some_and(|p| p >= e.path.as_str()) {
                return Err(corrupt(format!(
                    "manifest entries are not sorted and unique at {:?}",
                    e.path
                )));
            }
            prev = Some(&e.path);
            if let Some((parent, _)) = e.path.rsplit_once('/')
                && !dirs.contains(parent)
            {
                return Err(unsafe_path("its parent is not a directory of the pod"));
            }
            if e.mode > 0o7777 {
                return Err(corrupt(format!("{:?} has mode {:o}", e.path, e.mode)));
            }
            if e.mtime_nsec > 999_999_999 {
                return Err(corrupt(format!(
                    "{:?} has mtime_nsec {} (at most 999999999)",
                    e.path, e.mtime_nsec
                )));
            }
            if e.path.len() > limits::PATH
                || e.target.as_ref().is_some_and(|t| t.len() > limits::PATH)
            {
                return Err(corrupt(format!(
                    "{:?} has a path or symlink target longer than {} bytes",
                    e.path,
                    limits::PATH
                )));
            }
            match (e.kind, &e.target, &e.data) {
                (Kind::Dir, None, None) => {
                    dirs.insert(&e.path);
                }
                (Kind::Symlink, Some(t), None) if !t.is_empty() && !t.contains('\0') => {}
                (Kind::File, None, Some(d)) => {
                    files += 1;
                    bytes = bytes.saturating_add(e.size);
                    if !states.contains(&d.state) {
                        return Err(corrupt(format!(
                            "{:?} points into state object {} which the version does not list",
                            e.path, d.state
                        )));
                    }
                    if d.offset.checked_add(d.csize).is_none()
                        || (d.method == Method::Stored && d.csize != e.size)
                    {
                        return Err(corrupt(format!(
                            "{:?} points outside its state object",
                            e.path
                        )));
                    }
                    if let Some(b) = &d.blocks {
                        check_blocks(b, e.size)
                            .map_err(|why| corrupt(format!("{:?}: {why}", e.path)))?;
                    }
                }
                _ => {
                    return Err(corrupt(format!(
                        "{:?} is a {:?} with the wrong fields",
                        e.path, e.kind
                    )));
                }
            }
        }
        if files != info.file_count || bytes != info.logical_bytes {
            return Err(corrupt(
                "version.json's file count or size does not match the manifest".into(),
            ));
        }
        Ok(())
    }
}

/// What a file's block checksums must be: a sane power-of-two block size and one checksum per
/// block of a file of `size` bytes.
fn check_blocks(b: &Blocks, size: u64) -> Result<(), String> {
    if !b.size.is_power_of_two() || !(limits::MIN_BLOCK..=limits::MAX_BLOCK).contains(&b.size) {
        return Err(format!(
            "block size {} is not a power of two from {} to {}",
            b.size,
            limits::MIN_BLOCK,
            limits::MAX_BLOCK
        ));
    }
    let want = size.div_ceil(b.size);
    if b.crc32c.len() as u64 != want {
        return Err(format!(
            "{} block checksums for {want} blocks of {} bytes",
            b.crc32c.len(),
            b.size
        ));
    }
    Ok(())
}

/// Reads only `version.json` from a version zip (cheaper than a full decode for listings), with
/// the same checks and limits as [`VersionObject::decode`].
pub fn decode_info(pod: &PodName, version: u64, bytes: Bytes) -> PodResult<VersionInfo> {
    let corrupt = corrupt_fn(pod, version);
    let mut zip = open_zip(pod, version, bytes)?;
    let info: VersionInfo =
        parse_entry(&mut zip, VERSION_JSON, limits::VERSION_JSON).map_err(&corrupt)?;
    check_info(&info, pod, version).map_err(corrupt)?;
    Ok(info)
}

fn corrupt_fn(pod: &PodName, version: u64) -> impl Fn(String) -> PodError {
    let pod = pod.to_string();
    move |reason| PodError::Corrupt {
        pod: pod.clone(),
        version,
        reason,
    }
}

/// What `version.json` must say of itself: format 1, this pod, this version; identities only
/// for listed states, well-formed, and no two states with the same one.
fn check_info(info: &VersionInfo, pod: &PodName, version: u64) -> Result<(), String> {
    if info.format != FORMAT {
        return Err(format!(
            "format {} is not supported by this podfs (it reads format {FORMAT}): upgrade podfs",
            info.format
        ));
    }
    if info.pod != pod.as_str() || info.version != version {
        return Err(format!(
            "the object says it is version {} of pod {:?}",
            info.version, info.pod
        ));
    }
    let mut seen = HashSet::new();
    for (state, id) in &info.state_ids {
        if !info.states.contains(state) {
            return Err(format!(
                "state_ids names state object {state}, which the version does not list"
            ));
        }
        if !is_state_id(id) {
            return Err(format!(
                "the identity of state object {state} is not {} lowercase hex digits",
                STATE_ID_LEN
            ));
        }
        if !seen.insert(id.as_str()) {
            return Err(format!(
                "two state objects have the identity {id} (each identity names one object)"
            ));
        }
    }
    Ok(())
}

/// Opens a version zip, refusing one that is too large, unreadable, or has an unsafe or repeated
/// entry name (a second `manifest.json` must not silently win).
fn open_zip(
    pod: &PodName,
    version: u64,
    bytes: Bytes,
) -> PodResult<zip::ZipArchive<Cursor<Bytes>>> {
    let corrupt = corrupt_fn(pod, version);
    if bytes.len() as u64 > limits::VERSION_OBJECT {
        return Err(corrupt(format!(
            "the version object is larger than {} bytes",
            limits::VERSION_OBJECT
        )));
    }
    let zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| corrupt(format!("the version object is not a readable zip: {e}")))?;
    if zip.has_duplicate_names() {
        return Err(corrupt(
            "the version zip has two entries with the same name (which one counts would be a guess)"
                .into(),
        ));
    }
    for name in zip.file_names() {
        let name = name.map_err(|e| corrupt(format!("an entry name is unreadable: {e}")))?;
        if let Some(reason) = unsafe_path_reason(&name) {
            return Err(PodError::UnsafePath {
                pod: pod.to_string(),
                version,
                path: name.into_owned(),
                reason: reason.to_owned(),
            });
        }
    }
    Ok(zip)
}

/// Parses zip entry `name` as JSON while it is inflated, so the JSON text is never held whole:
/// at most `limit` bytes, no string longer than [`limits::JSON_STRING`].
fn parse_entry<T: serde::de::DeserializeOwned>(
    zip: &mut zip::ZipArchive<Cursor<Bytes>>,
    name: &str,
    limit: u64,
) -> Result<T, String> {
    let file = zip.by_name(name).map_err(|e| {
        format!("{name}: {e} (is this a podfs pod? it needs {VERSION_JSON} and {MANIFEST_JSON})")
    })?;
    // The guard sees the inflated text in large pieces; the parser reads it byte by byte from
    // the buffer in front.
    let mut reader = std::io::BufReader::with_capacity(64 << 10, JsonGuard::new(file, limit));
    let parsed = serde_json::from_reader(&mut reader);
    match (parsed, reader.into_inner().broken) {
        (Ok(v), None) => Ok(v),
        (_, Some(why)) => Err(format!("{name} {why}")),
        (Err(e), None) => Err(format!("{name}: {e}")),
    }
}

/// A reader that passes JSON text through and fails once it is longer than its limit or holds a
/// string longer than [`limits::JSON_STRING`] (the parser would buffer such a string whole).
struct JsonGuard<R> {
    inner: R,
    left: u64,
    limit: u64,
    in_string: bool,
    escaped: bool,
    string_len: usize,
    broken: Option<String>,
}

impl<R: Read> JsonGuard<R> {
    fn new(inner: R, limit: u64) -> Self {
        Self {
            inner,
            left: limit,
            limit,
            in_string: false,
            escaped: false,
            string_len: 0,
            broken: None,
        }
    }

    fn fail(&mut self, why: String) -> std::io::Error {
        let e = std::io::Error::other(why.clone());
        self.broken = Some(why);
        e
    }
}

impl<R: Read> Read for JsonGuard<R> {
    /// Passes the text on without the whitespace between tokens (insignificant in JSON), so
    /// padding costs the parser nothing; checks the limits as it goes.
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.inner.read(buf)?;
            if n as u64 > self.left {
                let limit = self.limit;
                return Err(self.fail(format!("is larger than {limit} bytes")));
            }
            self.left -= n as u64;
            let mut kept = 0;
            for i in 0..n {
                let b = buf[i];
                if !self.in_string {
                    if matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
                        continue;
                    }
                    if b == b'"' {
                        self.in_string = true;
                        self.string_len = 0;
                    }
                } else {
                    self.string_len += 1;
                    if self.escaped {
                        self.escaped = false;
                    } else if b == b'\\' {
                        self.escaped = true;
                    } else if b == b'"' {
                        self.in_string = false;
                    }
                    if self.string_len > limits::JSON_STRING {
                        return Err(self.fail(format!(
                            "holds a string longer than {} bytes",
                            limits::JSON_STRING
                        )));
                    }
                }
                buf[kept] = b;
                kept += 1;
            }
            // Only whitespace came: read on (0 would mean the end of the text).
            if kept > 0 || n == 0 {
                return Ok(kept);
            }
        }
    }
}

/// Deserializes `state_ids`, refusing a state named twice (`"1"` and `"01"` included): which of
/// two identities counts would be a guess.
fn unique_state_ids<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<u64, String>, D::Error> {
    struct Unique;
    impl<'de> serde::de::Visitor<'de> for Unique {
        type Value = BTreeMap<u64, String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a map from state numbers to identities")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<BTreeMap<u64, String>, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((state, id)) = map.next_entry::<u64, String>()? {
                if out.insert(state, id).is_some() {
                    return Err(serde::de::Error::custom(format!(
                        "state object {state} has two identities"
                    )));
                }
            }
            Ok(out)
        }
    }
    d.deserialize_map(Unique)
}

/// Deserializes `entries`, refusing more than [`limits::ENTRIES`] before allocating them.
fn bounded_entries<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Entry>, D::Error> {
    struct Bounded;
    impl<'de> serde::de::Visitor<'de> for Bounded {
        type Value = Vec<Entry>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a list of at most {} entries", limits::ENTRIES)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<Entry>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            let mut checksums = 0usize;
            while let Some(e) = seq.next_element::<Entry>()? {
                if out.len() == limits::ENTRIES {
                    return Err(serde::de::Error::custom(format!(
                        "more than {} entries",
                        limits::ENTRIES
                    )));
                }
                count_checksums(&mut checksums, &e, limits::BLOCK_CHECKSUMS)
                    .map_err(too_many_checksums)?;
                out.push(e);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Bounded)
}

fn too_many_checksums<E: serde::de::Error>(limit: usize) -> E {
    E::custom(format!("more than {limit} block checksums"))
}

/// Adds `entry`'s block checksums to a manifest's `total`, failing past `limit`.
fn count_checksums(total: &mut usize, entry: &Entry, limit: usize) -> Result<(), usize> {
    *total = total.saturating_add(
        entry
            .data
            .as_ref()
            .and_then(|d| d.blocks.as_ref())
            .map_or(0, |b| b.crc32c.len()),
    );
    if *total > limit { Err(limit) } else { Ok(()) }
}

/// Deserializes one file's block checksums, refusing more than [`limits::BLOCK_CHECKSUMS`]
/// before allocating them (the manifest's total is checked by `bounded_entries`).
fn bounded_checksums<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    checksums_at_most(d, limits::BLOCK_CHECKSUMS)
}

fn checksums_at_most<'de, D: serde::Deserializer<'de>>(
    d: D,
    limit: usize,
) -> Result<Vec<u32>, D::Error> {
    struct Bounded(usize);
    impl<'de> serde::de::Visitor<'de> for Bounded {
        type Value = Vec<u32>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a list of at most {} CRC-32C values", self.0)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u32>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(c) = seq.next_element()? {
                if out.len() == self.0 {
                    return Err(too_many_checksums(self.0));
                }
                out.push(c);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Bounded(limit))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID_A: &str = "0123456789abcdef0123456789abcdef";
    const ID_B: &str = "fedcba9876543210fedcba9876543210";

    pub(crate) fn sample(pod: &str, version: u64) -> VersionObject {
        let file = |path: &str, size: u64, state: u64| Entry {
            path: path.into(),
            kind: Kind::File,
            mode: 0o644,
            mtime: 1_700_000_000,
            mtime_nsec: 123_456_789,
            size,
            target: None,
            data: Some(DataRef {
                state,
                offset: 40,
                csize: size,
                method: Method::Stored,
                crc32: 7,
                blocks: None,
            }),
        };
        let dir = |path: &str| Entry {
            path: path.into(),
            kind: Kind::Dir,
            mode: 0o755,
            mtime: 1,
            mtime_nsec: 0,
            size: 0,
            target: None,
            data: None,
        };
        VersionObject {
            info: VersionInfo {
                format: FORMAT,
                pod: pod.into(),
                version,
                parent: version.checked_sub(1).filter(|&p| p > 0),
                created_at: "2026-11-28T00:00:00Z".into(),
                message: "m".into(),
                creator: "me".into(),
                tool_version: "podfs test".into(),
                file_count: 2,
                logical_bytes: 15,
                stored_bytes: 100,
                states: vec![1, version],
                state_ids: [(1, ID_A.to_owned()), (version, ID_B.to_owned())].into(),
            },
            manifest: Manifest::new(vec![
                dir("a"),
                file("a/x", 5, 1),
                Entry {
                    path: "a/y".into(),
                    kind: Kind::Symlink,
                    mode: 0o777,
                    mtime: 1,
                    mtime_nsec: 0,
                    size: 0,
                    target: Some("../../etc/passwd".into()),
                    data: None,
                },
                file("b", 10, version),
                dir("empty"),
            ]),
        }
    }

    #[test]
    fn the_json_guard_drops_only_insignificant_whitespace() {
        let text = "{ \"a b\" :\n [ \"x\\\"  y\\\\\" , 1 ]\t}   ";
        let mut out = String::new();
        // One byte at a time too: state carries across reads.
        for step in [1, 3, 64] {
            out.clear();
            let mut guard = JsonGuard::new(text.as_bytes(), 1 << 20);
            let mut buf = vec![0u8; step];
            loop {
                let n = guard.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                out.push_str(std::str::from_utf8(&buf[..n]).unwrap());
            }
            assert_eq!(out, "{\"a b\":[\"x\\\"  y\\\\\",1]}", "reads of {step}");
        }
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["a b"][0], "x\"  y\\");
    }

    #[test]
    fn children_are_found_whatever_sorts_between_them() {
        let dir = |p: &str| Entry {
            path: p.into(),
            kind: Kind::Dir,
            mode: 0o755,
            mtime: 0,
            mtime_nsec: 0,
            size: 0,
            target: None,
            data: None,
        };
        // '-' sorts before '/': "a-b" lies between "a" and "a/x", "a/x-y" before "a/x/z".
        let m = Manifest::new(
            ["a", "a-b", "a/x", "a/x-y", "a/x/z", "b"]
                .iter()
                .map(|p| dir(p))
                .collect(),
        );
        let names = |d: &str| m.children(d).map(|e| e.path.as_str()).collect::<Vec<_>>();
        assert_eq!(names(""), ["a", "a-b", "b"]);
        assert_eq!(names("a"), ["a/x", "a/x-y"]);
        assert_eq!(names("a/x"), ["a/x/z"]);
        assert!(names("a/x/z").is_empty());
        assert_eq!(m.get("a/x-y").map(|e| e.kind), Some(Kind::Dir));
    }

    /// The examples in docs/FORMAT.md parse as the types they document.
    #[test]
    fn format_doc_examples_parse() {
        let doc = include_str!("../../docs/FORMAT.md");
        let blocks: Vec<&str> = doc
            .split("```json\n")
            .skip(1)
            .map(|b| b.split("```").next().unwrap())
            .collect();
        assert_eq!(blocks.len(), 2);
        let info: VersionInfo = serde_json::from_str(blocks[0]).unwrap();
        assert_eq!((info.version, info.states.clone()), (3, vec![1, 3]));
        assert_eq!(info.state_id(1), Some("5f0c2a9e4b7d4e1c9a3f6b8d2e0c7a14"));
        assert_eq!(info.state_id(3), Some("c41e9b07d2a54f3e8b6a1d9c0f2e7b35"));
        assert_eq!(info.state_id(2), None);
        check_info(&info, &pod("my-pod"), 3).unwrap();
        let manifest: Manifest = serde_json::from_str(blocks[1]).unwrap();
        let data = |i: usize| manifest.entries[i].data.as_ref().unwrap();
        assert_eq!(data(1).method, Method::Deflate);
        assert_eq!(manifest.entries[2].target.as_deref(), Some("config.json"));
        let big = &manifest.entries[3];
        let blocks = data(3).blocks.as_ref().unwrap();
        assert_eq!((blocks.size, blocks.crc32c.len()), (256 << 10, 3));
        check_blocks(blocks, big.size).unwrap();
    }

    /// A list of checksums longer than the limit is refused while it is parsed, and so is a
    /// manifest whose lists together pass it.
    #[test]
    fn block_checksums_are_limited() {
        #[derive(Debug, Deserialize)]
        struct Ten {
            #[serde(deserialize_with = "ten")]
            _v: Vec<u32>,
        }
        fn ten<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
            checksums_at_most(d, 10)
        }
        let list = |n: usize| format!("{{\"_v\":[{}]}}", vec!["7"; n].join(","));
        serde_json::from_str::<Ten>(&list(10)).unwrap();
        let err = serde_json::from_str::<Ten>(&list(11)).unwrap_err();
        assert!(
            err.to_string().contains("more than 10 block checksums"),
            "{err}"
        );

        let mut e = sample("p", 1).manifest.entries[1].clone();
        e.data.as_mut().unwrap().blocks = Some(Box::new(Blocks {
            size: 1 << 20,
            crc32c: vec![0; 6],
        }));
        let mut total = 0;
        assert_eq!(count_checksums(&mut total, &e, 10), Ok(()));
        assert_eq!(count_checksums(&mut total, &e, 10), Err(10));
    }

    fn pod(s: &str) -> PodName {
        PodName::new(s).unwrap()
    }

    #[test]
    fn round_trip() {
        let obj = sample("p", 2);
        let bytes = obj.encode().unwrap();
        let back = VersionObject::decode(&pod("p"), 2, bytes.clone()).unwrap();
        assert_eq!(back.info, obj.info);
        assert_eq!(back.manifest, obj.manifest);
        assert_eq!(decode_info(&pod("p"), 2, bytes).unwrap(), obj.info);
    }

    /// A `version.json` written before state identities (no `state_ids`) still reads; its
    /// states have no identity, and writing it back leaves the field out.
    #[test]
    fn version_json_without_state_ids_still_reads() {
        let mut obj = sample("p", 2);
        obj.info.state_ids.clear();
        let bytes = obj.encode().unwrap();
        let text = {
            let mut zip = zip::ZipArchive::new(Cursor::new(bytes.clone())).unwrap();
            let mut s = String::new();
            zip.by_name(VERSION_JSON)
                .unwrap()
                .read_to_string(&mut s)
                .unwrap();
            s
        };
        assert!(!text.contains("state_ids"), "{text}");
        let back = VersionObject::decode(&pod("p"), 2, bytes).unwrap();
        assert_eq!((back.state_id(1), back.state_id(2)), (None, None));
        let old = r#"{"format": 1, "pod": "p", "version": 1, "parent": null,
            "created_at": "2025-01-01T00:00:00Z", "tool_version": "podfs 0.0.9",
            "file_count": 0, "logical_bytes": 0, "stored_bytes": 0, "states": []}"#;
        let info: VersionInfo = serde_json::from_str(old).unwrap();
        assert!(info.state_ids.is_empty());
    }

    #[test]
    fn state_ids_round_trip_and_are_checked() {
        let obj = sample("p", 2);
        let back = VersionObject::decode(&pod("p"), 2, obj.encode().unwrap()).unwrap();
        assert_eq!(
            (back.state_id(1), back.state_id(2)),
            (Some(ID_A), Some(ID_B))
        );
        assert_eq!(back.state_id(3), None);

        let with = |f: fn(&mut VersionInfo)| {
            let mut obj = sample("p", 2);
            f(&mut obj.info);
            decode_err(&obj)
        };
        let msg = with(|i| {
            i.state_ids.insert(3, ID_A.replace('0', "1"));
        });
        assert!(msg.contains("does not list"), "{msg}");
        for bad in [
            "",
            "0123",
            "0123456789ABCDEF0123456789ABCDEF",
            "g123456789abcdef0123456789abcdef",
        ] {
            let mut obj = sample("p", 2);
            obj.info.state_ids.insert(1, bad.into());
            let msg = decode_err(&obj);
            assert!(msg.contains("lowercase hex"), "{bad}: {msg}");
        }
        let msg = with(|i| {
            i.state_ids.insert(2, ID_A.into());
        });
        assert!(msg.contains("two state objects"), "{msg}");
        // The listing parser refuses what a load refuses.
        let mut obj = sample("p", 2);
        obj.info.state_ids.insert(2, "x".into());
        assert!(decode_info(&pod("p"), 2, obj.encode().unwrap()).is_err());

        // A state named twice in the JSON is refused, not resolved by a guess.
        let twice = format!(r#"{{"1": "{ID_A}", "1": "{ID_B}"}}"#);
        let mut de = serde_json::Deserializer::from_str(&twice);
        let err = unique_state_ids(&mut de).unwrap_err();
        assert!(err.to_string().contains("two identities"), "{err}");
        let padded = format!(r#"{{"1": "{ID_A}", "01": "{ID_B}"}}"#);
        let mut de = serde_json::Deserializer::from_str(&padded);
        assert!(unique_state_ids(&mut de).is_err());
    }

    #[test]
    fn new_state_ids_are_well_formed_and_differ() {
        let a = new_state_id().unwrap();
        let b = new_state_id().unwrap();
        assert!(is_state_id(&a) && is_state_id(&b), "{a} {b}");
        assert_ne!(a, b);
    }

    #[test]
    fn version_json_is_the_first_entry() {
        let bytes = sample("p", 1).encode().unwrap();
        let zip = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
        let names: Vec<_> = zip.file_names().map(|n| n.unwrap().into_owned()).collect();
        assert_eq!(names, [VERSION_JSON, MANIFEST_JSON]);
    }

    fn decode_err(obj: &VersionObject) -> String {
        let bytes = obj.encode().unwrap();
        VersionObject::decode(&pod(&obj.info.pod), obj.info.version, bytes)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn unsafe_paths_are_refused() {
        for (bad, reason) in [
            ("../x", "'..'"),
            ("/etc/x", "absolute"),
            ("a/../../x", "'..'"),
            ("a\0b", "NUL"),
            ("a//b", "empty"),
            ("./a", "'.'"),
        ] {
            let mut obj = sample("p", 1);
            obj.manifest.entries[1].path = bad.into();
            let msg = decode_err(&obj);
            assert!(
                msg.contains("unsafe path") && msg.contains(reason),
                "{bad}: {msg}"
            );
        }
    }

    #[test]
    fn entries_under_a_symlink_are_refused() {
        // a/y is a symlink; a file "a/y/z" would be written through it.
        let mut obj = sample("p", 1);
        let mut e = obj.manifest.entries[1].clone();
        e.path = "a/y/z".into();
        obj.manifest.entries.insert(3, e);
        obj.info.file_count += 1;
        obj.info.logical_bytes += 5;
        let msg = decode_err(&obj);
        assert!(msg.contains("parent is not a directory"), "{msg}");
    }

    #[test]
    fn inconsistent_objects_are_corrupt() {
        let mut obj = sample("p", 1);
        obj.manifest.entries[1].data.as_mut().unwrap().state = 5;
        assert!(decode_err(&obj).contains("does not list"));

        let mut obj = sample("p", 1);
        obj.manifest.entries[1].data.as_mut().unwrap().offset = u64::MAX;
        assert!(decode_err(&obj).contains("outside"));

        let mut obj = sample("p", 1);
        obj.manifest.entries.swap(0, 1);
        assert!(decode_err(&obj).contains("sorted") || decode_err(&obj).contains("parent"));

        let with_blocks = |size: u64, crc32c: Vec<u32>| {
            let mut obj = sample("p", 1);
            obj.manifest.entries[1].data.as_mut().unwrap().blocks =
                Some(Box::new(Blocks { size, crc32c }));
            obj
        };
        // The sample's a/x has 5 bytes: one block.
        let obj = with_blocks(1 << 20, vec![1]);
        VersionObject::decode(&pod("p"), 1, obj.encode().unwrap()).unwrap();
        assert!(decode_err(&with_blocks(1 << 20, vec![1, 2])).contains("2 block checksums for 1"));
        assert!(decode_err(&with_blocks(1 << 20, vec![])).contains("0 block checksums"));
        for size in [0, 1000, 3 << 20, 32 << 10, 128 << 20] {
            let msg = decode_err(&with_blocks(size, vec![1]));
            assert!(msg.contains("is not a power of two from"), "{size}: {msg}");
        }

        let obj = sample("p", 1);
        let bytes = obj.encode().unwrap();
        let err = VersionObject::decode(&pod("q"), 1, bytes.clone()).unwrap_err();
        assert!(err.to_string().contains("says it is"), "{err}");
        let truncated = bytes.slice(..bytes.len() - 10);
        let err = VersionObject::decode(&pod("p"), 1, truncated).unwrap_err();
        assert!(err.to_string().contains("not a readable zip"), "{err}");
    }
}
