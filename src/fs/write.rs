//! `POD/` as a working tree: lookups, listings and reads of its objects, and every change made
//! through the mount (staged by src/fs/workspace.rs, saved by src/fs/saver.rs). Changes
//! anywhere else (the root, a remote's directory but for `mkdir`, `.versions/`) are `EROFS`.

use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;

use super::overlay::Item;
use super::read::{OpenFile, Reader};
use super::workspace::{Workspace, WriteReady};
use super::{
    Attr, Found, FsError, FsResult, Listed, Node, Opened, PodFs, VERSIONS_DIR, join, kind_of, lock,
    to_system_time,
};
use crate::name::PodName;
use crate::pod::manifest::Kind;

/// Bytes read at a time when a committed file is copied up to be written.
const COPY_UP_CHUNK: u64 = 8 << 20;

/// Whether open flags ask to change the file.
pub(super) fn writes(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
}

/// An open handle of a file of a working tree.
#[derive(Debug)]
pub struct LiveFile {
    ws: Arc<Workspace>,
    obj: u64,
    ino: u64,
    write: bool,
    /// Reads of the file's committed bytes, made on first need, with the object's changes
    /// through the mount then: a handle keeps reading what it read while only a newer base (another
    /// writer's save) changed the file.
    stored: Mutex<Option<(Arc<OpenFile>, u64)>>,
}

impl LiveFile {
    pub(super) fn released(&self, reader: &Reader) {
        self.ws.released(self.obj, self.write);
        if let Some((f, _)) = lock(&self.stored).take() {
            f.released(reader);
        }
    }
}

/// What `setattr` changes.
#[derive(Debug, Default, Clone, Copy)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub mtime: Option<SystemTime>,
}

/// A checked name for a new entry: one a pod can hold.
fn new_name(name: &OsStr) -> FsResult<&str> {
    let name = name.to_str().ok_or(FsError::Invalid(
        "file names must be UTF-8 to be saved in a pod",
    ))?;
    if name.contains('\\') {
        return Err(FsError::Invalid(
            "file names with '\\' cannot be saved in a pod",
        ));
    }
    Ok(name)
}

impl PodFs {
    /// Changes can be staged (the mount has a staging dir).
    fn writable(&self) -> FsResult<&std::path::Path> {
        self.config
            .staging
            .as_deref()
            .ok_or(FsError::ReadOnly("a change on a mount without staging"))
    }

    /// `staging/mount/REMOTE/POD` of the volume dir.
    fn staging_dir_of(&self, r: usize, pod: &PodName) -> PathBuf {
        match (&self.config.staging, self.remote_name(r)) {
            (Some(root), Ok(remote)) => super::staging::pod_dir(root, &remote, pod.as_str()),
            _ => PathBuf::new(),
        }
    }

    /// The working tree of `pod`, made on first use (recovering what its staging dir holds).
    /// One with nothing staged follows the pod's latest version, within the refresh time.
    pub(super) async fn workspace(&self, r: usize, pod: &PodName) -> FsResult<Arc<Workspace>> {
        let existing = lock(&self.workspaces).get(&(r, pod.clone())).cloned();
        if let Some(ws) = existing {
            // The pod's latest version (fetched once per generation and version), unless this
            // one is it already.
            if !ws.pending()
                && let Ok((generation, versions)) = self.pod(r, pod).await
                && let Some(&latest) = versions.last()
                && let Ok(obj) = self.manifest(r, pod, generation, latest).await
                && ws.rebase(obj)
            {
                self.forget_listings(&ws);
            }
            return Ok(ws);
        }
        let (generation, versions) = self.pod(r, pod).await?;
        let dir = self.staging_dir_of(r, pod);
        let journal_base = if self.config.staging.is_some() {
            super::staging::journal_base(&dir)
        } else {
            None
        };
        let latest = versions.last().copied();
        if latest.is_none() && journal_base.is_none() {
            return Err(FsError::NotFound);
        }
        let base = match latest {
            Some(v) => Some(self.manifest(r, pod, generation, v).await?),
            None => None,
        };
        let recovered_base = match journal_base {
            Some(Some(v)) if Some(v) != latest && versions.contains(&v) => {
                Some(self.manifest(r, pod, generation, v).await?)
            }
            _ => None,
        };
        // Opened under the map's lock: two first lookups must not both open (and lock) the
        // staging dir.
        let mut all = lock(&self.workspaces);
        if let Some(other) = all.get(&(r, pod.clone())) {
            return Ok(Arc::clone(other));
        }
        let ws = Workspace::open(r, pod.clone(), dir, base, recovered_base)?;
        all.insert((r, pod.clone()), Arc::clone(&ws));
        drop(all);
        self.saver_for(&ws);
        Ok(ws)
    }

    /// Pods of remote `r` started in this mount and not yet saved.
    pub(super) fn new_pods(&self, r: usize) -> Vec<PodName> {
        lock(&self.workspaces)
            .iter()
            .filter(|((wr, _), ws)| *wr == r && ws.base_version().is_none() && ws.exists())
            .map(|((_, p), _)| p.clone())
            .collect()
    }

    /// The path of the directory object `dir` (`None`: the pod's root) in `ws`.
    fn dir_path(ws: &Workspace, dir: Option<u64>) -> FsResult<String> {
        let Some(obj) = dir else {
            return Ok(String::new());
        };
        let item = ws.item_of(obj)?;
        if item.entry.kind != Kind::Dir {
            return Err(FsError::NotADirectory);
        }
        Ok(item.entry.path)
    }

    pub(super) async fn live_child(
        &self,
        r: usize,
        pod: &PodName,
        dir: Option<u64>,
        name: &str,
    ) -> FsResult<Node> {
        let ws = self.workspace(r, pod).await?;
        let path = join(&Self::dir_path(&ws, dir)?, name);
        ws.get(&path).ok_or(FsError::NotFound)?;
        Ok(Node::Live {
            remote: r,
            pod: pod.clone(),
            obj: ws.obj_at(&path),
        })
    }

    pub(super) async fn live_list(
        &self,
        r: usize,
        pod: &PodName,
        dir: Option<u64>,
        out: &mut Vec<Listed>,
    ) -> FsResult<()> {
        let ws = self.workspace(r, pod).await?;
        let path = Self::dir_path(&ws, dir)?;
        for (obj, item) in ws.children(&path) {
            let name = item.entry.path.rsplit('/').next().unwrap_or_default();
            // The virtual `.versions` shadows a real one at a pod's root (docs/SEMANTICS.md).
            if path.is_empty() && name == VERSIONS_DIR {
                continue;
            }
            out.push(Listed {
                name: name.to_owned(),
                kind: kind_of(item.entry.kind),
                node: Node::Live {
                    remote: r,
                    pod: pod.clone(),
                    obj,
                },
            });
        }
        Ok(())
    }

    /// The attributes of `item`; `subdirs`: a directory's, for `nlink`.
    fn item_attr(&self, ino: u64, item: &Item, subdirs: usize) -> Attr {
        let e = &item.entry;
        Attr {
            ino,
            kind: kind_of(e.kind),
            size: match e.kind {
                Kind::Symlink => e.target.as_deref().map_or(0, str::len) as u64,
                Kind::File => e.size,
                Kind::Dir => 0,
            },
            perm: (e.mode & 0o7777) as u16,
            nlink: match e.kind {
                Kind::Dir => u32::try_from(subdirs + 2).unwrap_or(u32::MAX),
                Kind::File | Kind::Symlink => 1,
            },
            mtime: to_system_time(e.mtime, e.mtime_nsec),
            uid: self.config.uid,
            gid: self.config.gid,
            ttl: self.config.refresh,
        }
    }

    pub(super) async fn live_attr(
        &self,
        ino: u64,
        r: usize,
        pod: &PodName,
        obj: u64,
    ) -> FsResult<Attr> {
        let ws = self.workspace(r, pod).await?;
        let item = ws.item_of(obj)?;
        Ok(self.item_attr(ino, &item, ws.subdirs(&item)))
    }

    /// The working tree and directory path `parent` stands for, to change something in it.
    async fn live_dir(&self, parent: u64) -> FsResult<(Arc<Workspace>, Node, String)> {
        let node = self.node(parent)?;
        let (r, pod, dir) = match &node {
            Node::Pod(r, pod) => (*r, pod.clone(), None),
            Node::Live { remote, pod, obj } => (*remote, pod.clone(), Some(*obj)),
            Node::Versions(..) | Node::LatestLink(..) | Node::Path { .. } => {
                return Err(FsError::ReadOnly("a change below .versions"));
            }
            Node::Root | Node::Remote(_) => {
                return Err(FsError::ReadOnly("a change outside a pod"));
            }
        };
        self.writable()?;
        let ws = self.workspace(r, &pod).await?;
        let path = Self::dir_path(&ws, dir)?;
        Ok((ws, node, path))
    }

    /// The new entry `name` at `path` in the pod's root must not take the name of `.versions`.
    fn check_new(dir: &str, name: &str) -> FsResult<()> {
        if dir.is_empty() && name == VERSIONS_DIR {
            return Err(FsError::NotPermitted(
                "`.versions` at a pod's root is podfs's directory of versions",
            ));
        }
        Ok(())
    }

    /// A new object of `ws`, looked up for the kernel.
    fn found(&self, ws: &Workspace, obj: u64, item: &Item) -> Found {
        let node = Node::Live {
            remote: ws.remote,
            pod: ws.pod.clone(),
            obj,
        };
        let ino = lock(&self.inodes).looked_up(node);
        let attr = self.item_attr(ino, item, ws.subdirs(item));
        Found {
            entry_ttl: attr.ttl,
            attr,
        }
    }

    pub(super) async fn live_open(
        &self,
        ino: u64,
        r: usize,
        pod: &PodName,
        obj: u64,
        flags: i32,
    ) -> FsResult<Opened> {
        let ws = self.workspace(r, pod).await?;
        let write = writes(flags);
        if write {
            self.writable()?;
            if let WriteReady::CopyUp(item) = ws.ready_to_write(obj, flags & libc::O_TRUNC != 0)? {
                self.copy_up(&ws, ino, obj, item).await?;
            }
        }
        let (item, changes) = ws.item_and_changes(obj)?;
        if item.entry.kind != Kind::File {
            return Err(FsError::IsADirectory);
        }
        let live = LiveFile {
            ws: Arc::clone(&ws),
            obj,
            ino,
            write,
            stored: Mutex::new(None),
        };
        // The committed bytes it opened on, if they are: read on, whatever another writer saves.
        let stored = self.stored_of(&live, &item, changes)?;
        let mut copy = None;
        if !write
            && self.passthrough.enabled()
            && let Some(file) = stored
        {
            copy = file.ready_copy(&self.reader).await;
        }
        ws.opened(obj, write);
        let fh = self.handle();
        lock(&self.live).insert(fh, Arc::new(live));
        Ok(Opened { fh, copy, write })
    }

    /// The reader of `item`'s committed bytes for handle `live` (none if they are staged);
    /// `changes`: the object's changes through the mount.
    fn stored_of(
        &self,
        live: &LiveFile,
        item: &Item,
        changes: u64,
    ) -> FsResult<Option<Arc<OpenFile>>> {
        let mut stored = lock(&live.stored);
        if let Some((f, at)) = stored.as_ref()
            && *at == changes
        {
            return Ok(Some(Arc::clone(f)));
        }
        if item.staged.is_some() || item.entry.data.is_none() {
            return Ok(None);
        }
        let file = Arc::new(OpenFile::new(
            live.ino,
            self.remote(live.ws.remote)?,
            live.ws.pod.clone(),
            item.version.unwrap_or_default(),
            item.entry.clone(),
            item.state_id.clone(),
        ));
        *stored = Some((Arc::clone(&file), changes));
        Ok(Some(file))
    }

    /// Copies the committed bytes of `item` into a data file, through the read cache, so that
    /// `obj` can be written.
    async fn copy_up(&self, ws: &Workspace, ino: u64, obj: u64, item: Item) -> FsResult<()> {
        let (id, file) = ws.copy_up_file()?;
        let reader = OpenFile::new(
            ino,
            self.remote(ws.remote)?,
            ws.pod.clone(),
            item.version.unwrap_or_default(),
            item.entry.clone(),
            item.state_id.clone(),
        );
        let reader = Arc::new(reader);
        let size = item.entry.size;
        let mut at = 0;
        let copied: FsResult<()> = async {
            while at < size {
                let end = (at + COPY_UP_CHUNK).min(size);
                let bytes = reader.read(&self.reader, at..end).await?;
                if bytes.is_empty() {
                    break;
                }
                file.write_all_at(&bytes, at)
                    .map_err(|source| FsError::Io {
                        path: ws.dir().join("data").join(id.to_string()),
                        source,
                    })?;
                at += bytes.len() as u64;
            }
            Ok(())
        }
        .await;
        reader.released(&self.reader);
        match copied {
            Ok(()) => ws.copied_up(obj, &item, id, file),
            Err(e) => {
                ws.discard_data(id);
                Err(e)
            }
        }
    }

    pub(super) async fn live_read(
        &self,
        live: &Arc<LiveFile>,
        offset: u64,
        size: u32,
    ) -> FsResult<Bytes> {
        let (item, changes) = live.ws.item_and_changes(live.obj)?;
        if let Some(id) = item.staged {
            let file = live.ws.data(id)?;
            let path = live.ws.dir().join("data").join(id.to_string());
            let mut buf = vec![0u8; size as usize];
            let mut got = 0;
            while got < buf.len() {
                match file.read_at(&mut buf[got..], offset + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(source) => return Err(FsError::Io { path, source }),
                }
            }
            buf.truncate(got);
            return Ok(Bytes::from(buf));
        }
        match self.stored_of(live, &item, changes)? {
            Some(file) => {
                let end = offset.saturating_add(u64::from(size));
                file.read(&self.reader, offset..end).await
            }
            None => Ok(Bytes::new()),
        }
    }

    /// Drops handle `fh` of `ino`, which the kernel never got.
    pub(super) fn release_unanswered(&self, fh: u64) {
        if let Some(live) = lock(&self.live).remove(&fh) {
            live.released(&self.reader);
        }
    }

    /// Writes `data` at `offset` of open file `fh` at once (a write to the page cache of the
    /// staging disk), unless a save is zipping the file: then `None`, and [`PodFs::write`] waits.
    pub fn write_now(&self, fh: u64, offset: u64, data: &[u8]) -> Option<FsResult<u32>> {
        let live = match lock(&self.live).get(&fh) {
            Some(l) if l.write => Arc::clone(l),
            _ => return Some(Err(FsError::BadHandle(fh))),
        };
        match live.ws.write(live.obj, offset, data) {
            Ok(Some(_)) => Some(Ok(u32::try_from(data.len()).unwrap_or(u32::MAX))),
            // Frozen, or to be copied up again: on the runtime.
            Ok(None) | Err(FsError::NotStaged) => None,
            Err(e) => Some(Err(e)),
        }
    }

    /// Writes `data` at `offset` of open file `fh`; a write to a file a save is zipping waits
    /// for the zip.
    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let live = lock(&self.live)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle(fh))?;
        if !live.write {
            return Err(FsError::BadHandle(fh));
        }
        loop {
            let thawed = live.ws.thawed.notified();
            tokio::pin!(thawed);
            thawed.as_mut().enable();
            match live.ws.write(live.obj, offset, data) {
                Ok(Some(_)) => return Ok(u32::try_from(data.len()).unwrap_or(u32::MAX)),
                Ok(None) => thawed.await,
                Err(FsError::NotStaged) => {
                    if let WriteReady::CopyUp(item) = live.ws.ready_to_write(live.obj, false)? {
                        self.copy_up(&live.ws, live.ino, live.obj, item).await?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Creates and opens file `name` in `parent` (an existing one is opened, unless `O_EXCL`).
    pub async fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> FsResult<(Found, Opened)> {
        let (ws, _, dir) = self.live_dir(parent).await?;
        let name = new_name(name)?;
        Self::check_new(&dir, name)?;
        let path = join(&dir, name);
        let (obj, flags) = match ws.create(&path, Kind::File, mode, None) {
            Ok((obj, _)) => (obj, flags & !libc::O_TRUNC),
            Err(FsError::Exists) if flags & libc::O_EXCL == 0 => (ws.obj_at(&path), flags),
            Err(e) => return Err(e),
        };
        let item = ws.item_of(obj)?;
        let found = self.found(&ws, obj, &item);
        let opened = self
            .live_open(found.attr.ino, ws.remote, &ws.pod.clone(), obj, flags)
            .await?;
        let item = ws.item_of(obj)?;
        let found = Found {
            attr: self.item_attr(found.attr.ino, &item, 0),
            entry_ttl: found.entry_ttl,
        };
        Ok((found, opened))
    }

    /// `mkdir`: a directory in a pod, or in a remote's directory a new pod (saved once it has
    /// content, or on `fsync`).
    pub async fn mkdir(&self, parent: u64, name: &OsStr, mode: u32) -> FsResult<Found> {
        if let Node::Remote(r) = self.node(parent)? {
            self.writable()?;
            let name = name
                .to_str()
                .ok_or(FsError::Invalid("pod names are UTF-8"))?;
            let pod = PodName::new(name)
                .map_err(|_| FsError::Invalid("not a pod name (see `podfs save --help`)"))?;
            if self.workspace(r, &pod).await.is_ok() {
                return Err(FsError::Exists);
            }
            let dir = self.staging_dir_of(r, &pod);
            let ws = {
                let mut all = lock(&self.workspaces);
                if all.contains_key(&(r, pod.clone())) {
                    return Err(FsError::Exists);
                }
                let ws = Workspace::open(r, pod.clone(), dir, None, None)?;
                ws.start()?;
                all.insert((r, pod.clone()), Arc::clone(&ws));
                ws
            };
            self.saver_for(&ws);
            lock(&self.pod_lists).remove(&r);
            tracing::info!(pod = %pod, "new pod {pod}: its first version is saved once it has content");
            let node = Node::Pod(r, pod);
            let ino = lock(&self.inodes).looked_up(node.clone());
            let attr = self.attr_of(ino, &node).await?;
            return Ok(Found {
                entry_ttl: attr.ttl,
                attr,
            });
        }
        let (ws, _, dir) = self.live_dir(parent).await?;
        let name = new_name(name)?;
        Self::check_new(&dir, name)?;
        let (obj, item) = ws.create(&join(&dir, name), Kind::Dir, mode, None)?;
        Ok(self.found(&ws, obj, &item))
    }

    pub async fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &std::path::Path,
    ) -> FsResult<Found> {
        let (ws, _, dir) = self.live_dir(parent).await?;
        let name = new_name(name)?;
        Self::check_new(&dir, name)?;
        let target = target.to_str().ok_or(FsError::Invalid(
            "symlink targets must be UTF-8 to be saved in a pod",
        ))?;
        let (obj, item) = ws.create(
            &join(&dir, name),
            Kind::Symlink,
            0o777,
            Some(target.to_owned()),
        )?;
        Ok(self.found(&ws, obj, &item))
    }

    pub async fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let (ws, _, dir) = self.live_dir(parent).await?;
        let name = name.to_str().ok_or(FsError::NotFound)?;
        ws.remove(&join(&dir, name), false)
    }

    /// `rmdir`; a pod's own directory is never removed this way.
    pub async fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        if let Node::Remote(r) = self.node(parent)? {
            let remote = self.remote_name(r).unwrap_or_default();
            tracing::warn!(
                "refusing to remove the directory of pod {}: `podfs delete {} {remote}` deletes a pod",
                name.to_string_lossy(),
                name.to_string_lossy()
            );
            return Err(FsError::NotPermitted("removing a pod (use `podfs delete`)"));
        }
        let (ws, _, dir) = self.live_dir(parent).await?;
        let name = name.to_str().ok_or(FsError::NotFound)?;
        ws.remove(&join(&dir, name), true)
    }

    /// `rename` within one pod; `flags`: `RENAME_NOREPLACE`, `RENAME_EXCHANGE`.
    pub async fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name_: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 || (noreplace && exchange)
        {
            return Err(FsError::Invalid(
                "rename flags other than RENAME_NOREPLACE or RENAME_EXCHANGE",
            ));
        }
        let (ws, _, from_dir) = self.live_dir(parent).await?;
        let (ws2, _, to_dir) = self.live_dir(new_parent).await?;
        if !Arc::ptr_eq(&ws, &ws2) {
            return Err(FsError::CrossDevice);
        }
        let name = name.to_str().ok_or(FsError::NotFound)?;
        let to_name = new_name(new_name_)?;
        Self::check_new(&to_dir, to_name)?;
        ws.rename(
            &join(&from_dir, name),
            &join(&to_dir, to_name),
            noreplace,
            exchange,
        )
    }

    /// `setattr`: permission bits, size, mtime; an owner other than the mounting user is
    /// refused (a pod stores no owners).
    pub async fn setattr(&self, ino: u64, set: SetAttr) -> FsResult<Attr> {
        if set.uid.is_some_and(|u| u != self.config.uid)
            || set.gid.is_some_and(|g| g != self.config.gid)
        {
            return Err(FsError::NotPermitted(
                "changing the owner (a pod stores no owners)",
            ));
        }
        let node = self.node(ino)?;
        let Node::Live { remote, pod, obj } = &node else {
            if let Node::Pod(..) = node
                && set.mode.is_none()
                && set.size.is_none()
            {
                // `touch POD`: the root of a pod has no stored metadata.
                return self.attr_of(ino, &node).await;
            }
            return Err(FsError::ReadOnly("changing this"));
        };
        self.writable()?;
        let ws = self.workspace(*remote, pod).await?;
        if let Some(size) = set.size
            && let WriteReady::CopyUp(item) = ws.ready_to_write(*obj, size == 0)?
        {
            self.copy_up(&ws, ino, *obj, item).await?;
        }
        loop {
            let thawed = ws.thawed.notified();
            tokio::pin!(thawed);
            thawed.as_mut().enable();
            match ws.set_attr(*obj, set.mode, set.size, set.mtime) {
                Ok(item) => return Ok(self.item_attr(ino, &item, ws.subdirs(&item))),
                Err(FsError::Busy) => thawed.await,
                Err(FsError::NotStaged) => {
                    if let WriteReady::CopyUp(item) = ws.ready_to_write(*obj, false)? {
                        self.copy_up(&ws, ino, *obj, item).await?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `fsync` of anything in a pod: returns once its changes are committed (`EIO` if the save
    /// fails). `fsyncdir` of a remote's directory or of the root syncs every pod below it.
    pub async fn fsync(&self, ino: u64) -> FsResult<()> {
        let wss: Vec<Arc<Workspace>> = match self.node(ino)? {
            Node::Pod(r, pod) | Node::Live { remote: r, pod, .. } => {
                vec![self.workspace(r, &pod).await?]
            }
            Node::Root => lock(&self.workspaces).values().cloned().collect(),
            Node::Remote(r) => lock(&self.workspaces)
                .iter()
                .filter(|((wr, _), _)| *wr == r)
                .map(|(_, ws)| Arc::clone(ws))
                .collect(),
            Node::Versions(..) | Node::LatestLink(..) | Node::Path { .. } => Vec::new(),
        };
        let mut failed = None;
        for ws in wss {
            if let Err(e) = ws.synced().await {
                failed = Some(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Figures of the disk that holds the staging dir, for `statfs`.
    pub fn statfs(&self) -> FsResult<libc::statvfs> {
        let path = match &self.config.staging {
            Some(p) => {
                std::fs::create_dir_all(p).map_err(|source| FsError::Io {
                    path: p.clone(),
                    source,
                })?;
                p.clone()
            }
            None => PathBuf::from("/"),
        };
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| FsError::Invalid("a staging path with NUL"))?;
        // SAFETY: `c` is a valid C string and `out` a valid statvfs to fill.
        let mut out: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::statvfs(c.as_ptr(), &mut out) } != 0 {
            return Err(FsError::Io {
                path,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(out)
    }
}
