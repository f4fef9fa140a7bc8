//! The file system a mount shows, as a plain async type with no fuser in it: [`PodFs`] owns the
//! inode table, the cached listings and manifests, and the open handles; `fuse.rs` is the thin
//! adapter that hands each kernel request to it on the tokio runtime.
//!
//! Layout (read-only for now):
//!
//! ```text
//! ROOT/REMOTE/POD/               the latest version's tree
//! ROOT/REMOTE/POD/.versions/     not listed by readdir, but resolves by name
//! ROOT/REMOTE/POD/.versions/N/   the tree of version N
//! ROOT/REMOTE/POD/.versions/latest -> N
//! ```
//!
//! Guarantees:
//! - Metadata comes from manifests only: no file data is fetched for `lookup`, `getattr`,
//!   `readdir` or `readlink`.
//! - An inode below a pod stands for one path of one *version*, so its attributes and bytes never
//!   change: `POD/x` resolves to the inode of `x` in the latest version at lookup time. A handle
//!   keeps reading the version it was opened on, whatever `POD/` shows later.
//! - Pod and version listings are fetched at most once per [`FsConfig::refresh`]; a manifest is
//!   fetched once per (remote, pod, version) and kept (decoded, behind an `Arc`).
//!
//! Locks: every `Mutex` here guards a map and is held only for a lookup or an insert, never
//! across an `.await`; no two are held at once.

pub mod error;
pub mod fuse;
pub mod mountpoint;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::OnceCell;

use bytes::BytesMut;

use crate::cache::{BlockCache, BlockKey};
use crate::name::PodName;
use crate::pod::PodError;
use crate::pod::blocks::{block_checked, block_range, block_size, verify_block};
use crate::pod::manifest::{Entry, Kind, Method, VersionObject};
use crate::pod::read::{read_range, read_stored, read_version};
use crate::remote::Remote;
pub use error::{FsError, FsResult};

/// The inode of the mount's root directory.
pub const ROOT_INO: u64 = 1;

/// Name of the hidden directory of every version of a pod.
pub const VERSIONS_DIR: &str = ".versions";
/// Name of the symlink to the newest version inside [`VERSIONS_DIR`].
pub const LATEST_LINK: &str = "latest";

/// How long the kernel may keep what never changes (a path of a version) without asking again.
const IMMUTABLE_TTL: Duration = Duration::from_secs(3600);

/// Settings of a mount's file system.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// Pods and versions are listed again at most this often; also the kernel's cache time for
    /// anything that can change (the root, remote and pod directories, `.versions`).
    pub refresh: Duration,
    /// Owner shown for every file: the mounting user.
    pub uid: u32,
    pub gid: u32,
}

impl Default for FsConfig {
    /// Refresh every 10 s; owned by root (callers set the mounting user).
    fn default() -> Self {
        Self {
            refresh: Duration::from_secs(10),
            uid: 0,
            gid: 0,
        }
    }
}

/// The kind of an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
}

/// The attributes of an inode, as `stat` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (`0o7777` at most).
    pub perm: u16,
    pub nlink: u32,
    pub mtime: SystemTime,
    pub uid: u32,
    pub gid: u32,
    /// How long the kernel may cache these attributes and the name that led to them.
    pub ttl: Duration,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: FileKind,
    pub name: String,
}

/// What an open file handle reads: one file of one version, fixed at `open`.
#[derive(Debug)]
pub struct OpenFile {
    remote: Arc<dyn Remote>,
    /// The remote's configured name: part of every cache key.
    remote_name: String,
    pod: PodName,
    version: u64,
    entry: Entry,
    /// The identity of the state object holding the file's bytes (none: never cached).
    state_id: Option<String>,
}

/// What an inode stands for. Remotes are indexes into [`PodFs::remotes`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Node {
    Root,
    Remote(usize),
    /// `REMOTE/POD/`: the latest version's root, whichever that is now.
    Pod(usize, PodName),
    /// `POD/.versions/`.
    Versions(usize, PodName),
    /// `POD/.versions/latest`.
    LatestLink(usize, PodName),
    /// `path` of `version` (`""`: the version's root, `.versions/N/`).
    Path {
        remote: usize,
        pod: PodName,
        version: u64,
        path: String,
    },
}

/// Inode numbers for nodes, handed out on first sight and kept for the life of the mount (the
/// kernel's `forget` is not tracked yet: the table grows with the paths visited).
#[derive(Debug, Default)]
struct InodeTable {
    /// `nodes[i]` has inode `i + 1`.
    nodes: Vec<Node>,
    by_node: HashMap<Node, u64>,
}

impl InodeTable {
    fn new() -> Self {
        let mut t = Self::default();
        t.ino(Node::Root);
        t
    }

    fn ino(&mut self, node: Node) -> u64 {
        if let Some(&ino) = self.by_node.get(&node) {
            return ino;
        }
        self.nodes.push(node.clone());
        let ino = self.nodes.len() as u64;
        self.by_node.insert(node, ino);
        ino
    }

    fn node(&self, ino: u64) -> Option<Node> {
        let i = usize::try_from(ino.checked_sub(1)?).ok()?;
        self.nodes.get(i).cloned()
    }
}

/// A listing fetched at `at`.
#[derive(Debug)]
struct Listing<T> {
    at: Instant,
    value: Arc<T>,
}

type ManifestKey = (usize, PodName, u64);
type VersionList = Listing<Vec<u64>>;
/// The pods of a remote with their latest version.
type PodList = Vec<(PodName, u64)>;

/// The file system of one mount. Cheap to share: hold it in an `Arc`.
#[derive(Debug)]
pub struct PodFs {
    config: FsConfig,
    /// The remotes shown at the root, in this order, by name.
    remotes: Vec<(String, Arc<dyn Remote>)>,
    /// Shown as the mtime of the synthetic directories.
    started: SystemTime,
    inodes: Mutex<InodeTable>,
    pods: Mutex<HashMap<usize, Listing<PodList>>>,
    versions: Mutex<HashMap<(usize, PodName), VersionList>>,
    /// One cell per version: concurrent first readers wait for one fetch.
    manifests: Mutex<HashMap<ManifestKey, Arc<OnceCell<Arc<VersionObject>>>>>,
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_handle: AtomicU64,
    /// Fetched blocks (memory and disk), if the mount has a cache.
    cache: Option<Arc<BlockCache>>,
}

/// Locks `m`; a poisoned lock only means another operation panicked while holding it, and every
/// map here stays consistent at every instruction, so its content is still good.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PodFs {
    pub fn new(remotes: Vec<(String, Arc<dyn Remote>)>, config: FsConfig) -> Self {
        Self {
            config,
            remotes,
            started: SystemTime::now(),
            inodes: Mutex::new(InodeTable::new()),
            pods: Mutex::default(),
            versions: Mutex::default(),
            manifests: Mutex::default(),
            files: Mutex::default(),
            dirs: Mutex::default(),
            next_handle: AtomicU64::new(1),
            cache: None,
        }
    }

    /// Reads file bytes through `cache` (memory and disk), verified on the way in and out.
    pub fn with_cache(mut self, cache: Arc<BlockCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    fn ino(&self, node: Node) -> u64 {
        lock(&self.inodes).ino(node)
    }

    fn node(&self, ino: u64) -> FsResult<Node> {
        lock(&self.inodes).node(ino).ok_or(FsError::NotFound)
    }

    fn remote(&self, r: usize) -> FsResult<&Arc<dyn Remote>> {
        self.remotes.get(r).map(|(_, x)| x).ok_or(FsError::NotFound)
    }

    fn remote_name(&self, r: usize) -> FsResult<&str> {
        self.remotes
            .get(r)
            .map(|(n, _)| n.as_str())
            .ok_or(FsError::NotFound)
    }

    /// The pods of remote `r` with their latest version, listed at most once per refresh.
    async fn pods(&self, r: usize) -> FsResult<Arc<PodList>> {
        if let Some(l) = lock(&self.pods).get(&r)
            && l.at.elapsed() < self.config.refresh
        {
            return Ok(Arc::clone(&l.value));
        }
        let value = Arc::new(self.remote(r)?.list_pods().await?);
        let at = Instant::now();
        lock(&self.pods).insert(
            r,
            Listing {
                at,
                value: Arc::clone(&value),
            },
        );
        Ok(value)
    }

    /// The latest version of `pod` on remote `r`, as last listed.
    async fn latest(&self, r: usize, pod: &PodName) -> FsResult<u64> {
        let pods = self.pods(r).await?;
        pods.iter()
            .find(|(p, _)| p == pod)
            .map(|&(_, v)| v)
            .ok_or(FsError::NotFound)
    }

    /// The versions of `pod` on remote `r`, ascending, listed at most once per refresh.
    async fn versions(&self, r: usize, pod: &PodName) -> FsResult<Arc<Vec<u64>>> {
        let key = (r, pod.clone());
        if let Some(l) = lock(&self.versions).get(&key)
            && l.at.elapsed() < self.config.refresh
        {
            return Ok(Arc::clone(&l.value));
        }
        let value = Arc::new(self.remote(r)?.list_versions(pod).await?);
        let at = Instant::now();
        lock(&self.versions).insert(
            key,
            Listing {
                at,
                value: Arc::clone(&value),
            },
        );
        Ok(value)
    }

    /// The decoded version object of `version`, fetched once and kept.
    async fn manifest(
        &self,
        r: usize,
        pod: &PodName,
        version: u64,
    ) -> FsResult<Arc<VersionObject>> {
        let cell = Arc::clone(
            lock(&self.manifests)
                .entry((r, pod.clone(), version))
                .or_default(),
        );
        let remote = self.remote(r)?;
        let obj = cell
            .get_or_try_init(|| async { read_version(&**remote, pod, version).await.map(Arc::new) })
            .await?;
        Ok(Arc::clone(obj))
    }

    fn dir_attr(
        &self,
        ino: u64,
        perm: u16,
        subdirs: usize,
        mtime: SystemTime,
        ttl: Duration,
    ) -> Attr {
        Attr {
            ino,
            kind: FileKind::Dir,
            size: 0,
            perm,
            nlink: u32::try_from(subdirs.saturating_add(2)).unwrap_or(u32::MAX),
            mtime,
            uid: self.config.uid,
            gid: self.config.gid,
            ttl,
        }
    }

    /// The attributes of inode `ino`.
    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let node = self.node(ino)?;
        self.attr_of(ino, &node).await
    }

    async fn attr_of(&self, ino: u64, node: &Node) -> FsResult<Attr> {
        let refresh = self.config.refresh;
        match node {
            Node::Root => Ok(self.dir_attr(ino, 0o555, self.remotes.len(), self.started, refresh)),
            Node::Remote(r) => {
                let pods = self.pods(*r).await?;
                Ok(self.dir_attr(ino, 0o555, pods.len(), self.started, refresh))
            }
            Node::Pod(r, pod) => {
                let version = self.latest(*r, pod).await?;
                let obj = self.manifest(*r, pod, version).await?;
                let subdirs = subdirs(&obj, "");
                Ok(self.dir_attr(ino, 0o755, subdirs, self.started, refresh))
            }
            Node::Versions(r, pod) => {
                let versions = self.versions(*r, pod).await?;
                Ok(self.dir_attr(ino, 0o555, versions.len(), self.started, refresh))
            }
            Node::LatestLink(r, pod) => {
                let target = self.latest_target(*r, pod).await?;
                Ok(Attr {
                    ino,
                    kind: FileKind::Symlink,
                    size: target.len() as u64,
                    perm: 0o777,
                    nlink: 1,
                    mtime: self.started,
                    uid: self.config.uid,
                    gid: self.config.gid,
                    ttl: refresh,
                })
            }
            Node::Path {
                remote,
                pod,
                version,
                path,
            } => {
                let obj = self.manifest(*remote, pod, *version).await?;
                if path.is_empty() {
                    let subdirs = subdirs(&obj, "");
                    return Ok(self.dir_attr(ino, 0o755, subdirs, self.started, IMMUTABLE_TTL));
                }
                let entry = obj.manifest.get(path).ok_or(FsError::NotFound)?;
                Ok(self.entry_attr(ino, &obj, entry))
            }
        }
    }

    fn entry_attr(&self, ino: u64, obj: &VersionObject, e: &Entry) -> Attr {
        let mtime = to_system_time(e.mtime, e.mtime_nsec);
        let perm = (e.mode & 0o7777) as u16;
        match e.kind {
            Kind::Dir => self.dir_attr(ino, perm, subdirs(obj, &e.path), mtime, IMMUTABLE_TTL),
            Kind::File | Kind::Symlink => Attr {
                ino,
                kind: kind_of(e.kind),
                size: match e.kind {
                    Kind::Symlink => e.target.as_deref().map_or(0, str::len) as u64,
                    Kind::File | Kind::Dir => e.size,
                },
                perm,
                nlink: 1,
                mtime,
                uid: self.config.uid,
                gid: self.config.gid,
                ttl: IMMUTABLE_TTL,
            },
        }
    }

    async fn latest_target(&self, r: usize, pod: &PodName) -> FsResult<String> {
        let versions = self.versions(r, pod).await?;
        versions.last().map(u64::to_string).ok_or(FsError::NotFound)
    }

    /// Looks `name` up in directory `parent`: the child's attributes (its inode is `attr.ino`).
    pub async fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let name = name.to_str().ok_or(FsError::NotFound)?;
        let parent = self.node(parent)?;
        let node = self.child(&parent, name).await?;
        let ino = self.ino(node.clone());
        let mut attr = self.attr_of(ino, &node).await?;
        if matches!(parent, Node::Pod(..)) {
            // The name below `POD/` leads to another version's inode once POD/ moves on.
            attr.ttl = attr.ttl.min(self.config.refresh);
        }
        Ok(attr)
    }

    /// The node `name` stands for in directory `parent`.
    async fn child(&self, parent: &Node, name: &str) -> FsResult<Node> {
        match parent {
            Node::Root => self
                .remotes
                .iter()
                .position(|(n, _)| n == name)
                .map(Node::Remote)
                .ok_or(FsError::NotFound),
            Node::Remote(r) => {
                let pod = PodName::new(name).map_err(|_| FsError::NotFound)?;
                self.latest(*r, &pod).await?;
                Ok(Node::Pod(*r, pod))
            }
            Node::Pod(r, pod) => {
                if name == VERSIONS_DIR {
                    return Ok(Node::Versions(*r, pod.clone()));
                }
                let version = self.latest(*r, pod).await?;
                self.path_child(*r, pod, version, "", name).await
            }
            Node::Versions(r, pod) => {
                if name == LATEST_LINK {
                    self.latest_target(*r, pod).await?;
                    return Ok(Node::LatestLink(*r, pod.clone()));
                }
                let version = parse_version(name).ok_or(FsError::NotFound)?;
                if !self.versions(*r, pod).await?.contains(&version) {
                    return Err(FsError::NotFound);
                }
                Ok(Node::Path {
                    remote: *r,
                    pod: pod.clone(),
                    version,
                    path: String::new(),
                })
            }
            Node::LatestLink(..) => Err(FsError::NotADirectory),
            Node::Path {
                remote,
                pod,
                version,
                path,
            } => self.path_child(*remote, pod, *version, path, name).await,
        }
    }

    async fn path_child(
        &self,
        r: usize,
        pod: &PodName,
        version: u64,
        dir: &str,
        name: &str,
    ) -> FsResult<Node> {
        let obj = self.manifest(r, pod, version).await?;
        if !dir.is_empty() {
            let e = obj.manifest.get(dir).ok_or(FsError::NotFound)?;
            if e.kind != Kind::Dir {
                return Err(FsError::NotADirectory);
            }
        }
        let path = join(dir, name);
        obj.manifest.get(&path).ok_or(FsError::NotFound)?;
        Ok(Node::Path {
            remote: r,
            pod: pod.clone(),
            version,
            path,
        })
    }

    /// The target of symlink `ino`.
    pub async fn readlink(&self, ino: u64) -> FsResult<String> {
        match self.node(ino)? {
            Node::LatestLink(r, pod) => self.latest_target(r, &pod).await,
            Node::Path {
                remote,
                pod,
                version,
                path,
            } => {
                let obj = self.manifest(remote, &pod, version).await?;
                let e = obj.manifest.get(&path).ok_or(FsError::NotFound)?;
                e.target.clone().ok_or(FsError::NotASymlink)
            }
            Node::Root | Node::Remote(_) | Node::Pod(..) | Node::Versions(..) => {
                Err(FsError::NotASymlink)
            }
        }
    }

    /// The entries of directory `ino` (with `.` and `..`), as one snapshot.
    async fn list(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
        let node = self.node(ino)?;
        let mut out = vec![
            DirEntry {
                ino,
                kind: FileKind::Dir,
                name: ".".into(),
            },
            DirEntry {
                // The kernel answers `..` itself; the number here is not used.
                ino,
                kind: FileKind::Dir,
                name: "..".into(),
            },
        ];
        let dir = |ino, name: &str| DirEntry {
            ino,
            kind: FileKind::Dir,
            name: name.to_owned(),
        };
        match node {
            Node::Root => {
                for (r, (name, _)) in self.remotes.iter().enumerate() {
                    out.push(dir(self.ino(Node::Remote(r)), name));
                }
            }
            Node::Remote(r) => {
                for (pod, _) in self.pods(r).await?.iter() {
                    out.push(dir(self.ino(Node::Pod(r, pod.clone())), pod.as_str()));
                }
            }
            Node::Versions(r, pod) => {
                let versions = self.versions(r, &pod).await?;
                for v in versions.iter() {
                    let node = Node::Path {
                        remote: r,
                        pod: pod.clone(),
                        version: *v,
                        path: String::new(),
                    };
                    out.push(dir(self.ino(node), &v.to_string()));
                }
                if !versions.is_empty() {
                    out.push(DirEntry {
                        ino: self.ino(Node::LatestLink(r, pod.clone())),
                        kind: FileKind::Symlink,
                        name: LATEST_LINK.into(),
                    });
                }
            }
            Node::LatestLink(..) => return Err(FsError::NotADirectory),
            Node::Pod(r, pod) => {
                let version = self.latest(r, &pod).await?;
                self.list_path(r, &pod, version, "", &mut out).await?;
            }
            Node::Path {
                remote,
                pod,
                version,
                path,
            } => {
                self.list_path(remote, &pod, version, &path, &mut out)
                    .await?
            }
        }
        Ok(out)
    }

    async fn list_path(
        &self,
        r: usize,
        pod: &PodName,
        version: u64,
        dir: &str,
        out: &mut Vec<DirEntry>,
    ) -> FsResult<()> {
        let obj = self.manifest(r, pod, version).await?;
        if !dir.is_empty() && obj.manifest.get(dir).map(|e| e.kind) != Some(Kind::Dir) {
            return Err(FsError::NotADirectory);
        }
        for e in obj.manifest.children(dir) {
            let name = e.path.rsplit('/').next().unwrap_or(&e.path);
            // The virtual `.versions` shadows a real one at a pod's root (docs/SEMANTICS.md).
            if dir.is_empty() && name == VERSIONS_DIR {
                continue;
            }
            let node = Node::Path {
                remote: r,
                pod: pod.clone(),
                version,
                path: e.path.clone(),
            };
            out.push(DirEntry {
                ino: self.ino(node),
                kind: kind_of(e.kind),
                name: name.to_owned(),
            });
        }
        Ok(())
    }

    fn handle(&self) -> u64 {
        self.next_handle.fetch_add(1, Ordering::Relaxed)
    }

    /// Opens directory `ino`: its listing is taken now and served by [`PodFs::readdir`].
    pub async fn opendir(&self, ino: u64) -> FsResult<u64> {
        let entries = self.list(ino).await?;
        let fh = self.handle();
        lock(&self.dirs).insert(fh, Arc::new(entries));
        Ok(fh)
    }

    /// The entries of open directory `fh` from `offset` on, each with the offset of the next.
    pub fn readdir(&self, fh: u64, offset: u64) -> FsResult<Vec<(u64, DirEntry)>> {
        let entries = lock(&self.dirs)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle(fh))?;
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        Ok(entries
            .iter()
            .enumerate()
            .skip(skip)
            .map(|(i, e)| (i as u64 + 1, e.clone()))
            .collect())
    }

    pub fn releasedir(&self, fh: u64) {
        lock(&self.dirs).remove(&fh);
    }

    /// Opens file `ino` for reading; pins the version it belongs to.
    pub async fn open(&self, ino: u64, write: bool) -> FsResult<u64> {
        if write {
            return Err(FsError::ReadOnly("opening for writing"));
        }
        let Node::Path {
            remote,
            pod,
            version,
            path,
        } = self.node(ino)?
        else {
            return Err(FsError::ReadOnly("opening this node"));
        };
        let obj = self.manifest(remote, &pod, version).await?;
        let entry = obj.manifest.get(&path).ok_or(FsError::NotFound)?;
        if entry.kind != Kind::File {
            return Err(FsError::NotFound);
        }
        let state_id = entry
            .data
            .as_ref()
            .and_then(|d| obj.state_id(d.state))
            .map(str::to_owned);
        let file = OpenFile {
            remote: Arc::clone(self.remote(remote)?),
            remote_name: self.remote_name(remote)?.to_owned(),
            pod,
            version,
            entry: entry.clone(),
            state_id,
        };
        let fh = self.handle();
        lock(&self.files).insert(fh, Arc::new(file));
        Ok(fh)
    }

    /// Up to `size` bytes of open file `fh` from `offset` (fewer at the end of the file).
    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let file = lock(&self.files)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle(fh))?;
        let end = offset.saturating_add(u64::from(size));
        self.fetch_range(&file, offset..end).await
    }

    /// Where every file byte comes from. With a block cache (and a state identity to key it
    /// on), a stored file is read in whole blocks and a deflated one whole, each through the
    /// cache and checked against the manifest on the way in and on the way back from disk.
    async fn fetch_range(&self, file: &OpenFile, range: Range<u64>) -> FsResult<Bytes> {
        let entry = &file.entry;
        let (Some(cache), Some(data), Some(state_id)) =
            (&self.cache, &entry.data, file.state_id.as_deref())
        else {
            return Ok(read_range(&*file.remote, &file.pod, file.version, entry, range).await?);
        };
        let end = range.end.min(entry.size);
        if range.start >= end {
            return Ok(Bytes::new());
        }
        let key = |offset: u64, len: u64| {
            BlockKey::new(&file.remote_name, &file.pod, Some(state_id), offset, len)
        };
        if data.method == Method::Deflate {
            // Small files: fetched and inflated (which checks them) once, kept whole.
            let fetch = read_range(&*file.remote, &file.pod, file.version, entry, 0..entry.size);
            let whole = match key(data.offset, data.csize) {
                Some(k) => {
                    let check = |b: &[u8]| self.check_whole(file, b);
                    cache.get_or_fetch(&k, fetch, check).await?
                }
                None => fetch.await?,
            };
            return Ok(whole.slice(range.start as usize..end as usize));
        }
        // Blocks come unchecked from the remote: the cache runs `check_block` on each once,
        // whether it came from the remote or from disk.
        let fetch = |r: Range<u64>| read_stored(&*file.remote, &file.pod, file.version, entry, r);
        let b = block_size(entry);
        let mut out = BytesMut::with_capacity((end - range.start) as usize);
        for i in range.start / b..end.div_ceil(b) {
            let r = (i * b)..((i + 1) * b).min(entry.size);
            let bytes = match key(data.offset + r.start, r.end - r.start) {
                Some(k) => {
                    let check = |bytes: &[u8]| self.check_block(file, i, bytes);
                    cache.get_or_fetch(&k, fetch(r.clone()), check).await?
                }
                None => {
                    let bytes = fetch(r.clone()).await?;
                    self.check_block(file, i, &bytes)?;
                    bytes
                }
            };
            let from = range.start.max(r.start) - r.start;
            let to = end.min(r.end) - r.start;
            out.extend_from_slice(&bytes[from as usize..to as usize]);
        }
        Ok(out.freeze())
    }

    /// Checks block `i` of an open file: its CRC-32C where the manifest has one, else its length.
    fn check_block(&self, file: &OpenFile, i: u64, bytes: &[u8]) -> Result<(), PodError> {
        let entry = &file.entry;
        let r = block_range(entry, i);
        let ok = if block_checked(entry) {
            verify_block(entry, i, bytes).is_ok()
        } else {
            bytes.len() as u64 == r.end - r.start
        };
        ok.then_some(()).ok_or_else(|| PodError::Corrupt {
            pod: file.pod.to_string(),
            version: file.version,
            reason: format!("{:?}: bytes {}..{} are damaged", entry.path, r.start, r.end),
        })
    }

    /// Checks a whole (deflated, small) file against its size and CRC-32.
    fn check_whole(&self, file: &OpenFile, bytes: &[u8]) -> Result<(), PodError> {
        let entry = &file.entry;
        let crc = entry.data.as_ref().map(|d| d.crc32);
        (bytes.len() as u64 == entry.size && Some(crc32fast::hash(bytes)) == crc)
            .then_some(())
            .ok_or_else(|| PodError::Corrupt {
                pod: file.pod.to_string(),
                version: file.version,
                reason: format!("{:?}: the data is damaged (CRC-32 mismatch)", entry.path),
            })
    }

    pub fn release(&self, fh: u64) {
        lock(&self.files).remove(&fh);
    }
}

/// The subdirectories of `dir` in a version (`""`: its root), for `nlink`.
fn subdirs(obj: &VersionObject, dir: &str) -> usize {
    obj.manifest
        .children(dir)
        .filter(|e| e.kind == Kind::Dir && !(dir.is_empty() && e.path == VERSIONS_DIR))
        .count()
}

fn kind_of(k: Kind) -> FileKind {
    match k {
        Kind::File => FileKind::File,
        Kind::Dir => FileKind::Dir,
        Kind::Symlink => FileKind::Symlink,
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

/// A version number as `.versions/` names it: decimal, no sign, no leading zero.
fn parse_version(name: &str) -> Option<u64> {
    if name.starts_with('0') || !name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    name.parse().ok().filter(|&v| v > 0)
}

fn to_system_time(secs: i64, nsec: u32) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(nsec.min(999_999_999)));
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs()) + nanos
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nanos
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::save::{SaveParams, save};
    use crate::progress::{NoProgress, Progress};
    use crate::remote::memory::MemoryRemote;

    async fn save_tree(remote: &dyn Remote, pod: &PodName, files: &[(&str, &[u8])]) {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        for (path, data) in files {
            let p = src.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        }
        std::os::unix::fs::symlink("a.txt", src.join("link")).unwrap();
        let params = SaveParams {
            staging_dir: tmp.path().join("staging"),
            ..SaveParams::default()
        };
        let progress: Arc<dyn Progress> = Arc::new(NoProgress);
        save(remote, pod, &src, &params, &progress).await.unwrap();
    }

    async fn names(fs: &PodFs, ino: u64) -> Vec<String> {
        let fh = fs.opendir(ino).await.unwrap();
        let out = fs.readdir(fh, 0).unwrap();
        fs.releasedir(fh);
        out.into_iter().map(|(_, e)| e.name).collect()
    }

    #[tokio::test]
    async fn the_core_serves_versions_without_a_kernel() {
        let remote = MemoryRemote::new();
        let pod = PodName::new("p").unwrap();
        save_tree(&remote, &pod, &[("a.txt", b"one"), ("d/b.txt", b"bee")]).await;
        let remote: Arc<dyn Remote> = Arc::new(remote);
        let fs = PodFs::new(
            vec![("mem".into(), Arc::clone(&remote))],
            FsConfig {
                refresh: Duration::ZERO,
                ..FsConfig::default()
            },
        );
        assert_eq!(names(&fs, ROOT_INO).await, [".", "..", "mem"]);
        let r = fs.lookup(ROOT_INO, OsStr::new("mem")).await.unwrap();
        let p = fs.lookup(r.ino, OsStr::new("p")).await.unwrap();
        assert_eq!(names(&fs, p.ino).await, [".", "..", "a.txt", "d", "link"]);
        let a = fs.lookup(p.ino, OsStr::new("a.txt")).await.unwrap();
        assert_eq!((a.kind, a.size), (FileKind::File, 3));
        let l = fs.lookup(p.ino, OsStr::new("link")).await.unwrap();
        assert_eq!(fs.readlink(l.ino).await.unwrap(), "a.txt");
        let d = fs.lookup(p.ino, OsStr::new("d")).await.unwrap();
        assert_eq!((d.kind, d.nlink), (FileKind::Dir, 2));
        assert!(matches!(
            fs.lookup(a.ino, OsStr::new("x")).await,
            Err(FsError::NotADirectory)
        ));
        assert!(matches!(
            fs.open(a.ino, true).await,
            Err(FsError::ReadOnly(_))
        ));

        // A handle keeps its version once POD/ moves on.
        let fh = fs.open(a.ino, false).await.unwrap();
        save_tree(&*remote, &pod, &[("a.txt", b"two!"), ("d/b.txt", b"bee")]).await;
        let a2 = fs.lookup(p.ino, OsStr::new("a.txt")).await.unwrap();
        assert_ne!(a.ino, a2.ino, "a new version is a new inode");
        assert_eq!(&fs.read(fh, 0, 100).await.unwrap()[..], b"one");
        let fh2 = fs.open(a2.ino, false).await.unwrap();
        assert_eq!(&fs.read(fh2, 1, 2).await.unwrap()[..], b"wo");

        let v = fs.lookup(p.ino, OsStr::new(VERSIONS_DIR)).await.unwrap();
        assert!(!names(&fs, p.ino).await.contains(&VERSIONS_DIR.to_owned()));
        assert_eq!(names(&fs, v.ino).await, [".", "..", "1", "2", "latest"]);
        let latest = fs.lookup(v.ino, OsStr::new(LATEST_LINK)).await.unwrap();
        assert_eq!(fs.readlink(latest.ino).await.unwrap(), "2");
        let v1 = fs.lookup(v.ino, OsStr::new("1")).await.unwrap();
        let a1 = fs.lookup(v1.ino, OsStr::new("a.txt")).await.unwrap();
        assert_eq!(a1.ino, a.ino, "one inode per path of a version");
        for missing in ["3", "01", "0", "x"] {
            assert!(matches!(
                fs.lookup(v.ino, OsStr::new(missing)).await,
                Err(FsError::NotFound)
            ));
        }
    }

    #[test]
    fn version_names() {
        assert_eq!(parse_version("12"), Some(12));
        for bad in ["", "0", "012", "+1", "1a", "latest"] {
            assert_eq!(parse_version(bad), None, "{bad}");
        }
    }
}
