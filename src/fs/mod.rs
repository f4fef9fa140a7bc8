//! The file system a mount shows, as a plain async type with no fuser in it: [`PodFs`] owns the
//! inode table, the cached listings and manifests, and the open handles; `fuse.rs` is the thin
//! adapter that hands each kernel request to it on the tokio runtime.
//!
//! Layout:
//!
//! ```text
//! ROOT/REMOTE/POD/               the working tree: the latest version and the changes staged
//!                                on it (src/fs/write.rs, workspace.rs, saver.rs)
//! ROOT/REMOTE/POD/.versions/     not listed by readdir, but resolves by name
//! ROOT/REMOTE/POD/.versions/N/   the tree of version N
//! ROOT/REMOTE/POD/.versions/latest -> N
//! ```
//!
//! Guarantees:
//! - Metadata comes from manifests only: no file data is fetched for `lookup`, `getattr`,
//!   `readdir` or `readlink`; the root, remote, pod and version directories need no manifest.
//! - An inode below `.versions/N/` stands for one path of one version of one *generation* of the
//!   pod, so its attributes and bytes never change.
//! - An inode below `POD/` stands for an object of the working tree: it keeps its number through
//!   renames and writes made here; a file another writer's save changed is a new object (as if
//!   replaced by a rename), so a handle keeps reading what it opened.
//! - A pod's versions are listed at most once per [`FsConfig::refresh`]; each listing also
//!   checks that a version this mount read is still the same object ([`Remote::version_id`]).
//!   If not, the pod was deleted and saved again: it becomes a new generation (new inodes, its
//!   manifests fetched again) and the kernel is told to drop its cached names
//!   ([`PodFs::set_invalidator`]). A manifest is fetched once per generation and version.
//!
//! Locks: every `Mutex` here guards a map and is held only for a lookup or an insert, never
//! across an `.await`; no two are held at once.

pub mod error;
pub mod fuse;
mod inodes;
pub mod mountpoint;
mod overlay;
pub mod passthrough;
mod read;
mod remotes;
mod saver;
mod staging;
mod workspace;
mod write;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::{OnceCell, watch};

use crate::cache::BlockCache;
use crate::cache::BlockKey;
use crate::name::PodName;
use crate::pod::manifest::{Entry, Kind, VersionObject};
use crate::pod::read::{decode_version, read_version, version_bytes};
use crate::remote::{Remote, VersionId};
pub use error::{FsError, FsResult};
pub use inodes::ROOT_INO;
use inodes::{InodeTable, Node};
use passthrough::Passthrough;
use read::{OpenFile, Reader};
pub use remotes::RemoteSource;
use remotes::RemoteTable;
pub use staging::staged_pods;

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
    /// Where changes are staged (`staging/` of the volume dir); `None`: pods are read-only.
    pub staging: Option<std::path::PathBuf>,
    /// A pod is saved once nothing changed in it for this long and no file in it is open for
    /// writing.
    pub save_delay: Duration,
    /// `creator` of the versions a mount saves (`user@host`).
    pub creator: String,
}

impl Default for FsConfig {
    /// Refresh every 10 s; owned by root (callers set the mounting user); read-only.
    fn default() -> Self {
        Self {
            refresh: Duration::from_secs(10),
            uid: 0,
            gid: 0,
            staging: None,
            save_delay: Duration::from_secs(2),
            creator: String::new(),
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
    /// How long the kernel may cache these attributes.
    pub ttl: Duration,
}

/// A name found in a directory: its attributes, and how long the kernel may keep the name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub attr: Attr,
    pub entry_ttl: Duration,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: FileKind,
    pub name: String,
}

/// One entry of an open directory's snapshot: numbered only when it is sent.
#[derive(Debug, Clone)]
struct Listed {
    node: Node,
    kind: FileKind,
    name: String,
}

/// The pods of a remote with their latest version, listed at `at`.
#[derive(Debug)]
struct PodList {
    at: Instant,
    pods: Arc<Vec<(PodName, u64)>>,
}

/// What the mount knows of one pod.
#[derive(Debug)]
struct PodState {
    /// When `versions` was listed.
    at: Instant,
    /// Changes when the pod is found replaced (deleted and saved again); part of every inode
    /// and manifest key below the pod.
    generation: u64,
    /// Committed versions, ascending.
    versions: Arc<Vec<u64>>,
    /// A version whose manifest this generation holds, with the object identity it had.
    known: Option<(u64, String)>,
}

type ManifestKey = (usize, PodName, u64, u64);
/// Tells the kernel to forget the name `.1` in directory inode `.0` (and all below it).
type Invalidator = Arc<dyn Fn(Forget<'_>) + Send + Sync>;

/// What the kernel should forget, through [`PodFs::set_invalidator`].
#[derive(Debug, Clone, Copy)]
pub enum Forget<'a> {
    /// Name `name` in directory `parent`, and everything below it.
    Entry { parent: u64, name: &'a str },
    /// The page cache of file `ino` (its bytes stay the same: they are now read elsewhere).
    Data { ino: u64 },
}

/// The file system of one mount. Cheap to share: hold it in an `Arc`.
pub struct PodFs {
    config: FsConfig,
    /// The remotes shown at the root.
    remotes: RemoteTable,
    /// Shown as the mtime of the synthetic directories.
    started: SystemTime,
    inodes: Mutex<InodeTable>,
    pod_lists: Mutex<HashMap<usize, PodList>>,
    pods: Mutex<HashMap<(usize, PodName), PodState>>,
    /// Source of generations: unique over the mount's life.
    generations: AtomicU64,
    /// One cell per version: concurrent first readers wait for one fetch.
    manifests: Mutex<HashMap<ManifestKey, Arc<OnceCell<Arc<VersionObject>>>>>,
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<Listed>>>>,
    next_handle: AtomicU64,
    reader: Reader,
    invalidate: OnceLock<Invalidator>,
    /// Whether and how opens hand whole-file copies to the kernel (FUSE passthrough).
    pub(super) passthrough: Passthrough,
    /// Inodes whose page cache is being dropped ([`PodFs::forget_data`]): the end of each.
    dropping: Mutex<HashMap<u64, watch::Receiver<bool>>>,
    /// The working tree of every pod looked into (`POD/`), with its staged changes.
    workspaces: Mutex<HashMap<(usize, PodName), Arc<workspace::Workspace>>>,
    /// Open handles of files of working trees.
    live: Mutex<HashMap<u64, Arc<write::LiveFile>>>,
    /// Stops the savers (at unmount, once pending changes are saved).
    savers: tokio_util::sync::CancellationToken,
    /// Hands each new working tree to the task that starts its saver ([`PodFs::start_saving`]).
    saver_tx: OnceLock<tokio::sync::mpsc::UnboundedSender<Arc<workspace::Workspace>>>,
}

/// An open file handle, and the file's verified whole-file copy when the kernel may read that
/// instead (FUSE passthrough; see [`PodFs::set_passthrough`]).
#[derive(Debug)]
pub struct Opened {
    pub fh: u64,
    pub copy: Option<std::fs::File>,
    /// Opened for writing: never passed through.
    pub write: bool,
}

impl std::fmt::Debug for PodFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodFs")
            .field("config", &self.config)
            .field("remotes", &self.remotes)
            .finish_non_exhaustive()
    }
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
            remotes: RemoteTable::fixed(remotes),
            started: SystemTime::now(),
            inodes: Mutex::new(InodeTable::new()),
            pod_lists: Mutex::default(),
            pods: Mutex::default(),
            generations: AtomicU64::new(1),
            manifests: Mutex::default(),
            files: Mutex::default(),
            dirs: Mutex::default(),
            next_handle: AtomicU64::new(1),
            reader: Reader::new(None),
            invalidate: OnceLock::new(),
            passthrough: Passthrough::default(),
            dropping: Mutex::default(),
            workspaces: Mutex::default(),
            live: Mutex::default(),
            savers: tokio_util::sync::CancellationToken::new(),
            saver_tx: OnceLock::new(),
        }
    }

    /// Tells the kernel, from a blocking task, to drop the listings (and attributes) it keeps of
    /// the directories of `ws`'s working tree: a save or a newer version changed them.
    fn forget_listings(&self, ws: &workspace::Workspace) {
        let Some(f) = self.invalidate.get() else {
            return;
        };
        let dirs: Vec<u64> = lock(&self.inodes)
            .of_working_tree(ws.remote, &ws.pod)
            .into_iter()
            .filter(|(_, obj)| {
                obj.is_none_or(|o| ws.item_of(o).is_ok_and(|i| i.entry.kind == Kind::Dir))
            })
            .map(|(ino, _)| ino)
            .collect();
        if dirs.is_empty() {
            return;
        }
        let f = Arc::clone(f);
        tokio::task::spawn_blocking(move || {
            for ino in dirs {
                f(Forget::Data { ino });
            }
        });
    }

    /// Shows the remotes `source` configures instead of a fixed list, following changes within
    /// [`FsConfig::refresh`].
    pub fn following(mut self, source: Arc<dyn RemoteSource>) -> Self {
        self.remotes = RemoteTable::following(source);
        self
    }

    /// Reads the configuration of remotes again if it is older than the refresh time, and
    /// tells the kernel to forget the names of remotes no longer shown as they were.
    pub async fn refresh_remotes(&self) {
        for name in self.remotes.refresh(self.config.refresh).await {
            self.invalidate_later(ROOT_INO, name);
        }
    }

    /// Tells the kernel to forget `name` in directory `parent` (and everything below it), from
    /// a blocking task: the kernel may hold the directory's lock until the operation that
    /// found the change is answered.
    fn invalidate_later(&self, parent: u64, name: String) {
        if let Some(f) = self.invalidate.get() {
            let f = Arc::clone(f);
            tokio::task::spawn_blocking(move || {
                f(Forget::Entry {
                    parent,
                    name: &name,
                })
            });
        }
    }

    /// Once the whole-file copy that `file`'s handle started is complete, drops the kernel's
    /// page cache of `file`'s inode in the background: from then on opens pass through to the
    /// copy, and the first one would otherwise drop it (about 0.15 s per GiB), while the same
    /// bytes sat twice in memory until then.
    fn forget_data_when_copied(self: &Arc<Self>, file: &OpenFile) {
        let Some(mut done) = file.copy_started() else {
            return;
        };
        let (fs, ino) = (Arc::clone(self), file.ino);
        tokio::spawn(async move {
            if done.wait_for(|copied| *copied).await.is_ok() && fs.passthrough.copied(ino) {
                fs.forget_data(ino);
            }
        });
    }

    /// Tells the kernel, from a blocking task, to drop the page cache of `ino`. Opens of
    /// `ino` meanwhile wait for it ([`PodFs::open`]).
    fn forget_data(self: &Arc<Self>, ino: u64) {
        let Some(f) = self.invalidate.get().map(Arc::clone) else {
            return;
        };
        let (done, until) = watch::channel(false);
        lock(&self.dropping).insert(ino, until);
        let fs = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            f(Forget::Data { ino });
            done.send_replace(true);
            lock(&fs.dropping).remove(&ino);
        });
    }

    /// Reads file bytes through `cache` (memory and disk), verified on the way in and out.
    pub fn with_cache(mut self, cache: Arc<BlockCache>) -> Self {
        self.reader = Reader::new(Some(cache));
        self
    }

    /// Sets how to tell the kernel to forget a name or a file's cached bytes (the FUSE
    /// session's notifier). It is called from a blocking task, never from inside an operation.
    pub fn set_invalidator(&self, f: impl Fn(Forget<'_>) + Send + Sync + 'static) {
        // Set once, when the session starts; a second session of one PodFs does not happen.
        let _ = self.invalidate.set(Arc::new(f));
    }

    fn ino(&self, node: Node) -> u64 {
        lock(&self.inodes).ino(node)
    }

    fn node(&self, ino: u64) -> FsResult<Node> {
        lock(&self.inodes).node(ino).ok_or(FsError::NotFound)
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        lock(&self.inodes).forget(ino, n);
    }

    /// Inodes the mount keeps now.
    pub fn inode_count(&self) -> usize {
        lock(&self.inodes).len()
    }

    fn remote(&self, r: usize) -> FsResult<Arc<dyn Remote>> {
        self.remotes.get(r).map(|(_, x)| x).ok_or(FsError::NotFound)
    }

    fn remote_name(&self, r: usize) -> FsResult<String> {
        self.remotes.get(r).map(|(n, _)| n).ok_or(FsError::NotFound)
    }

    /// The pods of remote `r`, listed at most once per refresh (only to list the remote's
    /// directory: a pod itself is found through [`PodFs::pod`]).
    async fn pod_list(&self, r: usize) -> FsResult<Arc<Vec<(PodName, u64)>>> {
        if let Some(l) = lock(&self.pod_lists).get(&r)
            && l.at.elapsed() < self.config.refresh
        {
            return Ok(Arc::clone(&l.pods));
        }
        let pods = Arc::new(self.remote(r)?.list_pods().await?);
        let at = Instant::now();
        let list = PodList {
            at,
            pods: Arc::clone(&pods),
        };
        lock(&self.pod_lists).insert(r, list);
        Ok(pods)
    }

    /// The generation and versions (ascending) of `pod` on remote `r`, listed at most once per
    /// refresh. A listing also checks the identity of the version this generation knows: if
    /// that version is gone or is another object now, the pod was replaced and gets a new
    /// generation.
    async fn pod(&self, r: usize, pod: &PodName) -> FsResult<(u64, Arc<Vec<u64>>)> {
        let key = (r, pod.clone());
        let known = match lock(&self.pods).get(&key) {
            Some(s) if s.at.elapsed() < self.config.refresh => {
                return Ok((s.generation, Arc::clone(&s.versions)));
            }
            Some(s) => s.known.clone(),
            None => None,
        };
        let remote = self.remote(r)?;
        let versions = Arc::new(remote.list_versions(pod).await?);
        let replaced = match &known {
            Some((v, id)) if versions.contains(v) => {
                remote.version_id(pod, *v).await?.map(|x| x.id).as_ref() != Some(id)
            }
            Some(_) => true,
            None => false,
        };
        let at = Instant::now();
        let mut pods = lock(&self.pods);
        let state = pods.entry(key).or_insert_with(|| PodState {
            at,
            generation: self.generations.fetch_add(1, Ordering::Relaxed),
            versions: Arc::clone(&versions),
            known: None,
        });
        // Unless another listing found the replacement first.
        let replaced = replaced && state.known == known;
        let old = state.generation;
        if replaced {
            state.generation = self.generations.fetch_add(1, Ordering::Relaxed);
            state.known = None;
        }
        state.at = at;
        state.versions = Arc::clone(&versions);
        let generation = state.generation;
        drop(pods);
        if replaced {
            self.replaced(r, pod, old);
        }
        Ok((generation, versions))
    }

    /// Forgets generation `old` of `pod`: its manifests, and the kernel's names below the pod.
    fn replaced(&self, r: usize, pod: &PodName, old: u64) {
        let remote = self.remote_name(r).unwrap_or_default();
        tracing::info!(
            remote = %remote,
            pod = %pod,
            "pod {pod} was deleted and saved again: showing the new one"
        );
        lock(&self.manifests).retain(|(mr, mp, mg, _), _| !(*mr == r && mp == pod && *mg == old));
        if let Some(parent) = lock(&self.inodes).find(&Node::Remote(r)) {
            self.invalidate_later(parent, pod.as_str().to_owned());
        }
    }

    /// The generation and latest version of `pod` on remote `r`.
    async fn latest(&self, r: usize, pod: &PodName) -> FsResult<(u64, u64)> {
        let (generation, versions) = self.pod(r, pod).await?;
        let latest = versions.last().copied().ok_or(FsError::NotFound)?;
        Ok((generation, latest))
    }

    /// The decoded version object of `version` of generation `generation` of `pod`, fetched
    /// once and kept. An older generation's inodes get [`FsError::Stale`].
    async fn manifest(
        &self,
        r: usize,
        pod: &PodName,
        generation: u64,
        version: u64,
    ) -> FsResult<Arc<VersionObject>> {
        let current = lock(&self.pods)
            .get(&(r, pod.clone()))
            .map(|s| s.generation);
        if current != Some(generation) {
            return Err(FsError::Stale);
        }
        let cell = Arc::clone(
            lock(&self.manifests)
                .entry((r, pod.clone(), generation, version))
                .or_default(),
        );
        let obj = cell
            .get_or_try_init(|| async {
                // The identity first: a replacement between the two reads is then noticed by
                // the next listing (as a spurious one at worst), never missed.
                let id = self.remote(r)?.version_id(pod, version).await?;
                let obj = self.fetch_version(r, pod, version, id.as_ref()).await?;
                if let Some(id) = id
                    && let Some(s) = lock(&self.pods).get_mut(&(r, pod.clone()))
                    && s.generation == generation
                {
                    s.known = Some((version, id.id));
                }
                Ok::<_, FsError>(Arc::new(obj))
            })
            .await?;
        Ok(Arc::clone(obj))
    }

    /// Version `version` of `pod`, decoded: from the disk cache when a copy of this very
    /// object (`id`) is there, else from the remote (then kept on disk for the next mount).
    async fn fetch_version(
        &self,
        r: usize,
        pod: &PodName,
        version: u64,
        id: Option<&VersionId>,
    ) -> FsResult<VersionObject> {
        let remote = self.remote(r)?;
        let (Some(cache), Some(id)) = (&self.reader.cache, id) else {
            return Ok(read_version(&*remote, pod, version).await?);
        };
        let key = BlockKey::version_object(remote.name(), pod, version, id);
        if let Some(bytes) = cache.disk_object(&key).await {
            match decode_version(pod, version, bytes).await {
                Ok(obj) => return Ok(obj),
                Err(e) => {
                    tracing::warn!(pod = %pod, version, "dropping a cached version object: {e}");
                    cache.drop_on_disk(&key).await;
                }
            }
        }
        let bytes = version_bytes(&*remote, pod, version).await?;
        // Decoding checks it: only a good object is kept.
        let obj = decode_version(pod, version, bytes.clone()).await?;
        cache.keep_on_disk(&key, &bytes);
        Ok(obj)
    }

    fn dir_attr(
        &self,
        ino: u64,
        perm: u16,
        nlink: usize,
        mtime: SystemTime,
        ttl: Duration,
    ) -> Attr {
        Attr {
            ino,
            kind: FileKind::Dir,
            size: 0,
            perm,
            nlink: u32::try_from(nlink).unwrap_or(u32::MAX),
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

    /// The attributes of `node`. Only paths inside a version read a manifest; the directories
    /// above them (root, remotes, pods, `.versions`, version roots) have `nlink` 1, "not
    /// counted", as on btrfs, so that listing them fetches nothing.
    async fn attr_of(&self, ino: u64, node: &Node) -> FsResult<Attr> {
        let refresh = self.config.refresh;
        let started = self.started;
        match node {
            Node::Root => {
                self.refresh_remotes().await;
                let nlink = self.remotes.live().len() + 2;
                Ok(self.dir_attr(ino, 0o555, nlink, started, refresh))
            }
            // Writable: `mkdir REMOTE/NEW` starts a pod.
            Node::Remote(r) => {
                self.remote(*r)?;
                Ok(self.dir_attr(ino, 0o755, 1, started, refresh))
            }
            Node::Versions(..) => Ok(self.dir_attr(ino, 0o555, 1, started, refresh)),
            Node::Pod(..) => Ok(self.dir_attr(ino, 0o755, 1, started, refresh)),
            Node::LatestLink(r, pod) => {
                let target = self.latest_target(*r, pod).await?;
                Ok(Attr {
                    ino,
                    kind: FileKind::Symlink,
                    size: target.len() as u64,
                    perm: 0o777,
                    nlink: 1,
                    mtime: started,
                    uid: self.config.uid,
                    gid: self.config.gid,
                    ttl: refresh,
                })
            }
            Node::Live { remote, pod, obj } => self.live_attr(ino, *remote, pod, *obj).await,
            Node::Path { path, .. } if path.is_empty() => {
                Ok(self.dir_attr(ino, 0o755, 1, started, IMMUTABLE_TTL))
            }
            Node::Path {
                remote,
                pod,
                generation,
                version,
                path,
            } => {
                let obj = self.manifest(*remote, pod, *generation, *version).await?;
                let entry = obj.manifest.get(path).ok_or(FsError::NotFound)?;
                Ok(self.entry_attr(ino, &obj, entry))
            }
        }
    }

    fn entry_attr(&self, ino: u64, obj: &VersionObject, e: &Entry) -> Attr {
        let mtime = to_system_time(e.mtime, e.mtime_nsec);
        let perm = (e.mode & 0o7777) as u16;
        match e.kind {
            Kind::Dir => {
                let nlink = subdirs(obj, &e.path) + 2;
                self.dir_attr(ino, perm, nlink, mtime, IMMUTABLE_TTL)
            }
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
        let (_, latest) = self.latest(r, pod).await?;
        Ok(latest.to_string())
    }

    /// How long the kernel may keep a name found in `parent`: a name below `POD/` leads to
    /// another version's inode once `POD/` moves on; a path of a version is kept long (and
    /// dropped by the invalidator if its pod is replaced).
    fn entry_ttl(&self, parent: &Node, attr: &Attr) -> Duration {
        match parent {
            Node::Pod(..) | Node::Live { .. } => attr.ttl.min(self.config.refresh),
            _ => attr.ttl,
        }
    }

    /// Looks `name` up in directory `parent`: the child's attributes, with one more kernel
    /// reference to its inode (`attr.ino`).
    pub async fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Found> {
        let name = name.to_str().ok_or(FsError::NotFound)?;
        let parent = self.node(parent)?;
        let node = self.child(&parent, name).await?;
        let ino = self.ino(node.clone());
        let attr = self.attr_of(ino, &node).await?;
        lock(&self.inodes).looked_up(node);
        let entry_ttl = self.entry_ttl(&parent, &attr);
        Ok(Found { attr, entry_ttl })
    }

    /// The node `name` stands for in directory `parent`.
    async fn child(&self, parent: &Node, name: &str) -> FsResult<Node> {
        match parent {
            Node::Root => {
                self.refresh_remotes().await;
                self.remotes
                    .find(name)
                    .map(Node::Remote)
                    .ok_or(FsError::NotFound)
            }
            Node::Remote(r) => {
                let pod = PodName::new(name).map_err(|_| FsError::NotFound)?;
                self.workspace(*r, &pod).await?;
                Ok(Node::Pod(*r, pod))
            }
            Node::Pod(r, pod) => {
                if name == VERSIONS_DIR {
                    return Ok(Node::Versions(*r, pod.clone()));
                }
                self.live_child(*r, pod, None, name).await
            }
            Node::Live { remote, pod, obj } => {
                self.live_child(*remote, pod, Some(*obj), name).await
            }
            Node::Versions(r, pod) => {
                if name == LATEST_LINK {
                    self.latest(*r, pod).await?;
                    return Ok(Node::LatestLink(*r, pod.clone()));
                }
                let version = parse_version(name).ok_or(FsError::NotFound)?;
                let (generation, versions) = self.pod(*r, pod).await?;
                if !versions.contains(&version) {
                    return Err(FsError::NotFound);
                }
                Ok(Node::Path {
                    remote: *r,
                    pod: pod.clone(),
                    generation,
                    version,
                    path: String::new(),
                })
            }
            Node::LatestLink(..) => Err(FsError::NotADirectory),
            Node::Path {
                remote,
                pod,
                generation,
                version,
                path,
            } => {
                self.path_child(*remote, pod, *generation, *version, path, name)
                    .await
            }
        }
    }

    async fn path_child(
        &self,
        r: usize,
        pod: &PodName,
        generation: u64,
        version: u64,
        dir: &str,
        name: &str,
    ) -> FsResult<Node> {
        let obj = self.manifest(r, pod, generation, version).await?;
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
            generation,
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
                generation,
                version,
                path,
            } => {
                let obj = self.manifest(remote, &pod, generation, version).await?;
                let e = obj.manifest.get(&path).ok_or(FsError::NotFound)?;
                e.target.clone().ok_or(FsError::NotASymlink)
            }
            Node::Live { remote, pod, obj } => {
                let item = self.workspace(remote, &pod).await?.item_of(obj)?;
                item.entry.target.ok_or(FsError::NotASymlink)
            }
            Node::Root | Node::Remote(_) | Node::Pod(..) | Node::Versions(..) => {
                Err(FsError::NotASymlink)
            }
        }
    }

    /// The entries of directory `ino` (with `.` and `..`), as one snapshot.
    async fn list(&self, ino: u64) -> FsResult<Vec<Listed>> {
        let node = self.node(ino)?;
        let dir = |node: Node, name: &str| Listed {
            node,
            kind: FileKind::Dir,
            name: name.to_owned(),
        };
        // The kernel answers `..` itself: the node given for it is not used.
        let mut out = vec![dir(node.clone(), "."), dir(node.clone(), "..")];
        match node {
            Node::Root => {
                self.refresh_remotes().await;
                for (r, name) in self.remotes.live() {
                    out.push(dir(Node::Remote(r), &name));
                }
            }
            Node::Remote(r) => {
                let mut pods: Vec<PodName> = self
                    .pod_list(r)
                    .await?
                    .iter()
                    .map(|(p, _)| p.clone())
                    .collect();
                pods.extend(self.new_pods(r));
                pods.sort();
                pods.dedup();
                for pod in pods {
                    let name = pod.as_str().to_owned();
                    out.push(dir(Node::Pod(r, pod), &name));
                }
            }
            Node::Versions(r, pod) => {
                let (generation, versions) = self.pod(r, &pod).await?;
                for &version in versions.iter() {
                    let node = Node::Path {
                        remote: r,
                        pod: pod.clone(),
                        generation,
                        version,
                        path: String::new(),
                    };
                    out.push(dir(node, &version.to_string()));
                }
                if !versions.is_empty() {
                    out.push(Listed {
                        node: Node::LatestLink(r, pod.clone()),
                        kind: FileKind::Symlink,
                        name: LATEST_LINK.into(),
                    });
                }
            }
            Node::LatestLink(..) => return Err(FsError::NotADirectory),
            Node::Pod(r, pod) => self.live_list(r, &pod, None, &mut out).await?,
            Node::Live { remote, pod, obj } => {
                self.live_list(remote, &pod, Some(obj), &mut out).await?;
            }
            Node::Path {
                remote,
                pod,
                generation,
                version,
                path,
            } => {
                self.list_path(remote, &pod, generation, version, &path, &mut out)
                    .await?;
            }
        }
        Ok(out)
    }

    async fn list_path(
        &self,
        r: usize,
        pod: &PodName,
        generation: u64,
        version: u64,
        dir: &str,
        out: &mut Vec<Listed>,
    ) -> FsResult<()> {
        let obj = self.manifest(r, pod, generation, version).await?;
        if !dir.is_empty() && obj.manifest.get(dir).map(|e| e.kind) != Some(Kind::Dir) {
            return Err(FsError::NotADirectory);
        }
        for e in obj.manifest.children(dir) {
            let name = e.path.rsplit('/').next().unwrap_or(&e.path);
            // The virtual `.versions` shadows a real one at a pod's root (docs/SEMANTICS.md).
            if dir.is_empty() && name == VERSIONS_DIR {
                continue;
            }
            out.push(Listed {
                node: Node::Path {
                    remote: r,
                    pod: pod.clone(),
                    generation,
                    version,
                    path: e.path.clone(),
                },
                kind: kind_of(e.kind),
                name: name.to_owned(),
            });
        }
        Ok(())
    }

    fn handle(&self) -> u64 {
        self.next_handle.fetch_add(1, Ordering::Relaxed)
    }

    /// Opens directory `ino`: its listing is taken now and served by [`PodFs::readdir`] and
    /// [`PodFs::readdirplus`]. Also says whether the listing can never change (a directory of
    /// a version), so that the kernel may keep it.
    pub async fn opendir(&self, ino: u64) -> FsResult<(u64, bool)> {
        let entries = self.list(ino).await?;
        // A version's directory never changes; one of a working tree changes through the kernel
        // (which then drops its copy), or by a save or another writer's version (then the mount
        // tells it to: `PodFs::forget_listings`).
        let keep = matches!(
            self.node(ino)?,
            Node::Path { .. } | Node::Pod(..) | Node::Live { .. }
        );
        let fh = self.handle();
        lock(&self.dirs).insert(fh, Arc::new(entries));
        Ok((fh, keep))
    }

    fn listing(&self, fh: u64) -> FsResult<Arc<Vec<Listed>>> {
        lock(&self.dirs)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle(fh))
    }

    /// The entries of open directory `fh` from `offset` on, each with the offset of the next.
    pub fn readdir(&self, fh: u64, offset: u64) -> FsResult<Vec<(u64, DirEntry)>> {
        let entries = self.listing(fh)?;
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        Ok(entries
            .iter()
            .enumerate()
            .skip(skip)
            .map(|(i, e)| {
                let entry = DirEntry {
                    ino: self.ino(e.node.clone()),
                    kind: e.kind,
                    name: e.name.clone(),
                };
                (i as u64 + 1, entry)
            })
            .collect())
    }

    /// Up to `max` entries of open directory `fh` from `offset` on, with their attributes,
    /// each with the offset of the next. Each entry but `.` and `..` is a kernel reference
    /// (as a lookup): the caller must [`forget`](PodFs::forget) those it does not send.
    pub async fn readdirplus(
        &self,
        dir: u64,
        fh: u64,
        offset: u64,
        max: usize,
    ) -> FsResult<Vec<(u64, String, Found)>> {
        let entries = self.listing(fh)?;
        let parent = self.node(dir)?;
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        let mut out = Vec::new();
        for (i, e) in entries.iter().enumerate().skip(skip).take(max) {
            let dots = e.name == "." || e.name == "..";
            let ino = if dots { dir } else { self.ino(e.node.clone()) };
            let node = if dots { &parent } else { &e.node };
            let attr = match self.attr_of(ino, node).await {
                Ok(a) => a,
                // Gone since the listing (a pod replaced): left out, as a name gone since.
                Err(FsError::Stale | FsError::NotFound) if !dots => continue,
                Err(e) => return Err(e),
            };
            if !dots {
                lock(&self.inodes).looked_up(e.node.clone());
            }
            let entry_ttl = self.entry_ttl(&parent, &attr);
            out.push((i as u64 + 1, e.name.clone(), Found { attr, entry_ttl }));
        }
        Ok(out)
    }

    pub fn releasedir(&self, fh: u64) {
        lock(&self.dirs).remove(&fh);
    }

    /// Whether opens look for whole-file copies for the kernel to read directly (the FUSE
    /// session turns it on when the kernel supports passthrough, and off when it refuses).
    /// Copies are only written while it is on.
    pub fn set_passthrough(&self, on: bool) {
        self.passthrough.set_enabled(on);
    }

    /// Opens file `ino` for reading; pins the version it belongs to.
    pub async fn open(&self, ino: u64, flags: i32) -> FsResult<Opened> {
        let node = self.node(ino)?;
        if let Node::Live { remote, pod, obj } = &node {
            return self.live_open(ino, *remote, pod, *obj, flags).await;
        }
        if write::writes(flags) {
            return Err(FsError::ReadOnly("opening for writing"));
        }
        let Node::Path {
            remote,
            pod,
            generation,
            version,
            path,
        } = node
        else {
            return Err(FsError::ReadOnly("opening this node"));
        };
        let obj = self.manifest(remote, &pod, generation, version).await?;
        let entry = obj.manifest.get(&path).ok_or(FsError::NotFound)?;
        if entry.kind != Kind::File {
            return Err(FsError::NotFound);
        }
        let state_id = entry
            .data
            .as_ref()
            .and_then(|d| obj.state_id(d.state))
            .map(str::to_owned);
        // An open passing through drops the page cache itself: two drops of one inode at
        // once take three times as long as one.
        let dropping = lock(&self.dropping).get(&ino).cloned();
        if let Some(mut done) = dropping {
            let _ = done.wait_for(|d| *d).await;
        }
        let file = OpenFile::new(
            ino,
            self.remote(remote)?,
            pod,
            version,
            entry.clone(),
            state_id,
        );
        let copy = if self.passthrough.enabled() {
            file.ready_copy(&self.reader).await
        } else {
            None
        };
        let fh = self.handle();
        lock(&self.files).insert(fh, Arc::new(file));
        Ok(Opened {
            fh,
            copy,
            write: false,
        })
    }

    /// Up to `size` bytes of open file `fh` from `offset` (fewer at the end of the file).
    pub async fn read(self: &Arc<Self>, fh: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let live = lock(&self.live).get(&fh).cloned();
        if let Some(live) = live {
            return self.live_read(&live, offset, size).await;
        }
        let file = lock(&self.files)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle(fh))?;
        let end = offset.saturating_add(u64::from(size));
        let got = file.read(&self.reader, offset..end).await;
        self.forget_data_when_copied(&file);
        got
    }

    /// Releases handle `fh` of inode `ino`.
    pub fn release(self: &Arc<Self>, ino: u64, fh: u64) {
        if let Some(live) = lock(&self.live).remove(&fh) {
            live.released(&self.reader);
        }
        if let Some(file) = lock(&self.files).remove(&fh) {
            file.released(&self.reader);
        }
        if self.passthrough.release(ino) {
            self.forget_data(ino);
        }
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
        let (fh, _) = fs.opendir(ino).await.unwrap();
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
        let fs = Arc::new(PodFs::new(
            vec![("mem".into(), Arc::clone(&remote))],
            FsConfig {
                refresh: Duration::ZERO,
                ..FsConfig::default()
            },
        ));
        assert_eq!(names(&fs, ROOT_INO).await, [".", "..", "mem"]);
        let r = fs.lookup(ROOT_INO, OsStr::new("mem")).await.unwrap().attr;
        let p = fs.lookup(r.ino, OsStr::new("p")).await.unwrap().attr;
        assert_eq!(names(&fs, p.ino).await, [".", "..", "a.txt", "d", "link"]);
        let a = fs.lookup(p.ino, OsStr::new("a.txt")).await.unwrap().attr;
        assert_eq!((a.kind, a.size), (FileKind::File, 3));
        let l = fs.lookup(p.ino, OsStr::new("link")).await.unwrap().attr;
        assert_eq!(fs.readlink(l.ino).await.unwrap(), "a.txt");
        let d = fs.lookup(p.ino, OsStr::new("d")).await.unwrap().attr;
        assert_eq!((d.kind, d.nlink), (FileKind::Dir, 2));
        assert!(matches!(
            fs.lookup(a.ino, OsStr::new("x")).await,
            Err(FsError::NotADirectory)
        ));
        assert!(matches!(
            fs.open(a.ino, libc::O_WRONLY).await,
            Err(FsError::ReadOnly(_))
        ));

        // A handle keeps its version once POD/ moves on; the path shows the new one.
        let fh = fs.open(a.ino, libc::O_RDONLY).await.unwrap().fh;
        save_tree(&*remote, &pod, &[("a.txt", b"two!"), ("d/b.txt", b"bee")]).await;
        let a2 = fs.lookup(p.ino, OsStr::new("a.txt")).await.unwrap().attr;
        assert_eq!(a2.size, 4);
        assert_ne!(
            a.ino, a2.ino,
            "a file another writer changed is a new inode"
        );
        assert_eq!(&fs.read(fh, 0, 100).await.unwrap()[..], b"one");
        let fh2 = fs.open(a2.ino, libc::O_RDONLY).await.unwrap().fh;
        assert_eq!(&fs.read(fh2, 1, 2).await.unwrap()[..], b"wo");

        let v = fs
            .lookup(p.ino, OsStr::new(VERSIONS_DIR))
            .await
            .unwrap()
            .attr;
        assert!(!names(&fs, p.ino).await.contains(&VERSIONS_DIR.to_owned()));
        assert_eq!(names(&fs, v.ino).await, [".", "..", "1", "2", "latest"]);
        let latest = fs
            .lookup(v.ino, OsStr::new(LATEST_LINK))
            .await
            .unwrap()
            .attr;
        assert_eq!(fs.readlink(latest.ino).await.unwrap(), "2");
        let v1 = fs.lookup(v.ino, OsStr::new("1")).await.unwrap().attr;
        let a1 = fs.lookup(v1.ino, OsStr::new("a.txt")).await.unwrap().attr;
        let a1b = fs.lookup(v1.ino, OsStr::new("a.txt")).await.unwrap().attr;
        assert_eq!(a1.ino, a1b.ino, "one inode per path of a version");
        assert_ne!(a1.ino, a.ino, "POD/ is the working tree, not a version");
        for missing in ["3", "01", "0", "x"] {
            assert!(matches!(
                fs.lookup(v.ino, OsStr::new(missing)).await,
                Err(FsError::NotFound)
            ));
        }
    }

    #[tokio::test]
    async fn a_pod_deleted_and_saved_again_is_a_new_generation() {
        let remote: Arc<dyn Remote> = Arc::new(MemoryRemote::new());
        let pod = PodName::new("p").unwrap();
        save_tree(&*remote, &pod, &[("a.txt", b"one")]).await;
        let config = FsConfig {
            refresh: Duration::ZERO,
            ..FsConfig::default()
        };
        let fs = Arc::new(PodFs::new(
            vec![("mem".into(), Arc::clone(&remote))],
            config,
        ));
        let r = fs.lookup(ROOT_INO, OsStr::new("mem")).await.unwrap().attr;
        let p = fs.lookup(r.ino, OsStr::new("p")).await.unwrap().attr;
        let a = fs.lookup(p.ino, OsStr::new("a.txt")).await.unwrap().attr;
        let v = fs
            .lookup(p.ino, OsStr::new(VERSIONS_DIR))
            .await
            .unwrap()
            .attr;
        let v1 = fs.lookup(v.ino, OsStr::new("1")).await.unwrap().attr;
        let fh = fs.open(a.ino, libc::O_RDONLY).await.unwrap().fh;
        assert_eq!(&fs.read(fh, 0, 100).await.unwrap()[..], b"one");

        crate::pod::delete::delete(&*remote, &pod, None)
            .await
            .unwrap();
        save_tree(&*remote, &pod, &[("a.txt", b"other")]).await;
        assert_eq!(
            remote.list_versions(&pod).await.unwrap(),
            [1],
            "the number is reused"
        );

        let a2 = fs.lookup(p.ino, OsStr::new("a.txt")).await.unwrap().attr;
        assert_ne!(a2.ino, a.ino);
        assert_eq!(a2.size, 5);
        let fh2 = fs.open(a2.ino, libc::O_RDONLY).await.unwrap().fh;
        assert_eq!(&fs.read(fh2, 0, 100).await.unwrap()[..], b"other");
        let v1b = fs.lookup(v.ino, OsStr::new("1")).await.unwrap().attr;
        assert_ne!(v1b.ino, v1.ino, ".versions/1 is another directory now");
        let a1 = fs.lookup(v1b.ino, OsStr::new("a.txt")).await.unwrap().attr;
        assert_eq!(a1.size, 5);
        assert!(matches!(
            fs.lookup(v1.ino, OsStr::new("a.txt")).await,
            Err(FsError::Stale)
        ));
    }

    #[test]
    fn version_names() {
        assert_eq!(parse_version("12"), Some(12));
        for bad in ["", "0", "012", "+1", "1a", "latest"] {
            assert_eq!(parse_version(bad), None, "{bad}");
        }
    }
}
