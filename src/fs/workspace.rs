//! One pod's working tree in a mount: the [`Overlay`] of staged changes on its base version,
//! the identity of every object in it (an inode follows a file through renames), the staging dir
//! on disk, and what a save needs: snapshots of the staged changes and the bookkeeping after a
//! commit.
//!
//! Every change takes the workspace's lock, is appended to the journal, then applied in memory;
//! file data is written to the data file under the same lock (a few microseconds to the page
//! cache), so a snapshot never sees half of a write. While a save zips the data files it
//! snapshotted, writes to those files wait ([`Workspace::wait_unfrozen`]): a version never holds
//! half of a write, and writes after the snapshot go into the next version.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use tokio::sync::{Notify, watch};

use super::overlay::{Item, Op, Overlay, within};
use super::staging::{Staging, StagingError};
use super::{FsError, FsResult};
use crate::name::PodName;
use crate::pod::PodResult;
use crate::pod::manifest::{Entry, Kind, VersionObject};
use crate::pod::save::Changes;

/// Object ids, unique over the process: part of every live inode.
static NEXT_OBJ: AtomicU64 = AtomicU64::new(1);

/// An object of the working tree: where it is, and, once unlinked while open, what it was.
#[derive(Debug)]
struct Obj {
    /// `None`: unlinked; `orphan` holds it until its last handle goes.
    path: Option<String>,
    orphan: Option<Item>,
    /// Open handles, and those of them open for writing.
    open: u32,
    writers: u32,
    /// Changes made to it through the mount (not those of a newer base).
    changes: u64,
}

#[derive(Debug)]
struct Inner {
    overlay: Overlay,
    staging: Option<Staging>,
    ids: BTreeMap<String, u64>,
    objs: HashMap<u64, Obj>,
    /// Open data files, by staged id.
    files: HashMap<u64, Arc<File>>,
    /// Staged ids a save is zipping: writes to them wait.
    frozen: HashSet<u64>,
    /// Writes to each staged id, so a commit knows what changed after its snapshot.
    writes: HashMap<u64, u64>,
    /// Changes made (every operation and write counts one).
    seq: u64,
    last_change: Instant,
    /// Handles open for writing.
    writers: usize,
    /// Data files kept after a commit for files still open for writing: path to the data file
    /// and the committed item it holds the bytes of ([`Workspace::restage`]).
    clean: HashMap<String, (u64, Item)>,
}

/// What a save stores: the staged changes as they were at one instant.
#[derive(Debug)]
pub struct Snapshot {
    delta: BTreeMap<String, Option<Item>>,
    /// Writes of each staged id at the snapshot.
    writes: HashMap<u64, u64>,
    seq: u64,
    data_dir: PathBuf,
    ws: Arc<Workspace>,
}

/// One pod's working tree; see the module documentation.
#[derive(Debug)]
pub struct Workspace {
    pub remote: usize,
    pub pod: PodName,
    dir: PathBuf,
    inner: Mutex<Inner>,
    /// Sends the `seq` the last commit covers.
    saved: watch::Sender<u64>,
    /// Woken when a frozen file thaws, and when a save is asked for.
    pub(super) thawed: Notify,
    pub(super) wake: Notify,
    /// Bumped by every failed save: fsync waits for its own save's outcome.
    failures: watch::Sender<u64>,
    /// An fsync waits for a save.
    asked: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn staging_err(e: StagingError) -> FsError {
    match e {
        StagingError::Io { path, source } => FsError::Io { path, source },
        other => FsError::Staging(other.to_string()),
    }
}

/// The mtime of `file` (what a recovery finds), or now.
fn mtime_of(file: &File) -> (i64, u32) {
    file.metadata()
        .and_then(|m| m.modified())
        .map_or_else(|_| now_parts(), split_time)
}

fn now_parts() -> (i64, u32) {
    match SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_nanos(),
        ),
        Err(_) => (0, 0),
    }
}

/// What an open for writing must do first.
#[derive(Debug)]
pub enum WriteReady {
    /// The file's bytes are staged.
    Staged,
    /// The file's bytes are in a committed version: copy them to a data file first.
    CopyUp(Item),
}

impl Workspace {
    /// The working tree of `pod` on `base`, with the staged changes `dir` holds, if any.
    /// `fetch` gives the version a recovered journal starts from.
    pub fn open(
        remote: usize,
        pod: PodName,
        dir: PathBuf,
        base: Option<Arc<VersionObject>>,
        recovered_base: Option<Arc<VersionObject>>,
    ) -> FsResult<Arc<Self>> {
        let mut overlay = Overlay::new(base.clone());
        let mut staging = None;
        if dir.join("journal").exists() {
            let (s, rec) =
                Staging::open(&dir, base.as_ref().map(|b| b.info.version)).map_err(staging_err)?;
            if let Some(rec) = rec {
                if rec.base != overlay.base_version() {
                    overlay = Overlay::new(recovered_base.clone());
                }
                for op in &rec.ops {
                    overlay.apply(op);
                }
                if !rec.ops.is_empty() {
                    tracing::info!(
                        pod = %pod,
                        "recovered {} staged changes of pod {pod} from {}",
                        rec.ops.len(),
                        dir.display()
                    );
                }
            }
            staging = Some(s);
        }
        let ws = Arc::new(Self {
            remote,
            pod,
            dir,
            inner: Mutex::new(Inner {
                overlay,
                staging,
                ids: BTreeMap::new(),
                objs: HashMap::new(),
                files: HashMap::new(),
                frozen: HashSet::new(),
                writes: HashMap::new(),
                seq: 0,
                last_change: Instant::now(),
                writers: 0,
                clean: HashMap::new(),
            }),
            saved: watch::channel(0).0,
            thawed: Notify::new(),
            wake: Notify::new(),
            failures: watch::channel(0).0,
            asked: std::sync::atomic::AtomicBool::new(false),
        });
        ws.settle_recovered();
        Ok(ws)
    }

    /// After a replay: sizes and mtimes of staged files from their data files, data files no
    /// change refers to removed; anything recovered counts as unsaved.
    fn settle_recovered(&self) {
        let mut g = lock(&self.inner);
        let inner = &mut *g;
        let Some(staging) = &inner.staging else {
            return;
        };
        let mut used = HashSet::new();
        let mut fixes = Vec::new();
        for item in inner.overlay.delta().values().flatten() {
            if let Some(id) = item.staged {
                used.insert(id);
                if let Ok(md) = std::fs::metadata(staging.data_path(id)) {
                    let mut item = item.clone();
                    item.entry.size = md.len();
                    if let Ok(m) = md.modified() {
                        let (s, n) = split_time(m);
                        item.entry.mtime = s;
                        item.entry.mtime_nsec = n;
                    }
                    fixes.push(item);
                }
            }
        }
        for item in fixes {
            inner.overlay.apply(&Op::Put(item));
        }
        if let Ok(rd) = std::fs::read_dir(staging.dir().join("data")) {
            for e in rd.flatten() {
                let id = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok());
                if id.is_some_and(|id| !used.contains(&id)) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        if !inner.overlay.is_clean() {
            inner.seq = 1;
        }
    }

    /// The version the staged changes are on.
    pub fn base_version(&self) -> Option<u64> {
        lock(&self.inner).overlay.base_version()
    }

    /// Whether changes wait to be saved.
    pub fn dirty(&self) -> bool {
        !lock(&self.inner).overlay.is_clean()
    }

    /// Whether a save has something to commit: changes, or a new pod with no version yet.
    pub fn pending(&self) -> bool {
        let g = lock(&self.inner);
        !g.overlay.is_clean() || (g.overlay.base().is_none() && g.staging.is_some())
    }

    /// Opens the staging dir now (a new pod exists from its `mkdir` on).
    pub fn start(&self) -> FsResult<()> {
        let mut g = lock(&self.inner);
        if g.staging.is_none() {
            let base = g.overlay.base_version();
            let (s, _) = Staging::open(&self.dir, base).map_err(staging_err)?;
            g.staging = Some(s);
            g.seq += 1;
        }
        Ok(())
    }

    /// Removes data file `id`, which nothing refers to (a copy-up that failed).
    pub fn discard_data(&self, id: u64) {
        let mut g = lock(&self.inner);
        drop_data(&mut g, id);
    }

    /// Whether an fsync asked for a save (cleared by asking).
    pub fn take_asked(&self) -> bool {
        self.asked.swap(false, Ordering::Relaxed)
    }

    /// Whether the pod has anything: a version, or staged changes.
    pub fn exists(&self) -> bool {
        let g = lock(&self.inner);
        g.overlay.base().is_some() || g.staging.is_some()
    }

    /// When nothing was changed for `delay` and no handle is open for writing.
    pub fn quiet_for(&self) -> Option<std::time::Duration> {
        let g = lock(&self.inner);
        (g.writers == 0).then(|| g.last_change.elapsed())
    }

    /// A newer base with nothing staged (another writer saved the pod); `false` if it is the
    /// base already. A file or symlink it changed becomes a new object, as if replaced by a rename: handles open on the old one
    /// keep reading what they opened, and the kernel's page cache of it stays right.
    pub fn rebase(&self, obj: Arc<VersionObject>) -> bool {
        let mut g = lock(&self.inner);
        if !g.overlay.is_clean() || g.overlay.base().is_some_and(|b| Arc::ptr_eq(b, &obj)) {
            return false;
        }
        let old: Vec<(String, u64, Option<Item>)> = g
            .ids
            .iter()
            .filter(|(p, _)| !p.is_empty())
            .map(|(p, &id)| (p.clone(), id, g.overlay.get(p)))
            .collect();
        g.overlay.rebase(obj);
        for (path, id, was) in old {
            let now = g.overlay.get(&path);
            let same_dir = |i: &Option<Item>| i.as_ref().is_some_and(|i| i.entry.kind == Kind::Dir);
            if now == was || (same_dir(&now) && same_dir(&was)) {
                continue;
            }
            g.ids.remove(&path);
            let open = g.objs.get(&id).is_some_and(|o| o.open > 0);
            match (open, g.objs.get_mut(&id)) {
                (true, Some(o)) => {
                    o.path = None;
                    o.orphan = was;
                }
                _ => {
                    g.objs.remove(&id);
                }
            }
        }
        true
    }

    /// The object at `path` (`""`: the root), given an id on first sight.
    pub fn obj_at(&self, path: &str) -> u64 {
        let mut g = lock(&self.inner);
        obj_at(&mut g, path)
    }

    /// What object `obj` is now.
    pub fn item_of(&self, obj: u64) -> FsResult<Item> {
        let g = lock(&self.inner);
        item_of(&g, obj)
    }

    /// What object `obj` is now, and how many changes were made to it through the mount.
    pub fn item_and_changes(&self, obj: u64) -> FsResult<(Item, u64)> {
        let g = lock(&self.inner);
        let changes = g.objs.get(&obj).map_or(0, |o| o.changes);
        Ok((item_of(&g, obj)?, changes))
    }

    /// The subdirectories of directory `item` (0 for anything else), for its `nlink`.
    pub fn subdirs(&self, item: &Item) -> usize {
        if item.entry.kind != Kind::Dir {
            return 0;
        }
        let g = lock(&self.inner);
        match (g.overlay.is_clean(), g.overlay.base()) {
            // The base's own index: no items built.
            (true, Some(b)) => b
                .manifest
                .children(item.path())
                .filter(|e| e.kind == Kind::Dir)
                .count(),
            _ => g
                .overlay
                .children(item.path())
                .iter()
                .filter(|i| i.entry.kind == Kind::Dir)
                .count(),
        }
    }

    /// What `path` is (`""`: the root, which has no item).
    pub fn get(&self, path: &str) -> Option<Item> {
        lock(&self.inner).overlay.get(path)
    }

    /// The items in directory `dir`, each with its object.
    pub fn children(&self, dir: &str) -> Vec<(u64, Item)> {
        let mut g = lock(&self.inner);
        let items = g.overlay.children(dir);
        items
            .into_iter()
            .map(|i| (obj_at(&mut g, i.path()), i))
            .collect()
    }

    /// Appends `op` to the journal (opening the staging dir on the first change) and applies it.
    fn change(&self, g: &mut Inner, op: Op) -> FsResult<()> {
        if g.staging.is_none() {
            let base = g.overlay.base_version();
            let (s, _) = Staging::open(&self.dir, base).map_err(staging_err)?;
            g.staging = Some(s);
        }
        if let Some(s) = g.staging.as_mut() {
            s.append(&op).map_err(staging_err)?;
        }
        g.overlay.apply(&op);
        g.seq += 1;
        g.last_change = Instant::now();
        self.wake.notify_one();
        Ok(())
    }

    fn check_dir(g: &Inner, dir: &str) -> FsResult<()> {
        if dir.is_empty() {
            return Ok(());
        }
        match g.overlay.get(dir) {
            Some(i) if i.entry.kind == Kind::Dir => Ok(()),
            Some(_) => Err(FsError::NotADirectory),
            None => Err(FsError::NotFound),
        }
    }

    /// Creates `path`: a file (with an empty data file), a directory or a symlink.
    pub fn create(
        &self,
        path: &str,
        kind: Kind,
        mode: u32,
        target: Option<String>,
    ) -> FsResult<(u64, Item)> {
        let mut g = lock(&self.inner);
        Self::check_dir(&g, parent_of(path))?;
        if g.overlay.get(path).is_some() {
            return Err(FsError::Exists);
        }
        let (s, n) = now_parts();
        let mut item = Item {
            entry: Entry {
                path: path.to_owned(),
                kind,
                mode: mode & 0o7777,
                mtime: s,
                mtime_nsec: n,
                size: target.as_ref().map_or(0, |t| t.len() as u64),
                target,
                data: None,
            },
            staged: None,
            version: None,
            state_id: None,
        };
        if kind == Kind::Symlink {
            item.entry.size = 0;
        }
        if kind == Kind::File {
            let (id, file) = self.new_data(&mut g)?;
            (item.entry.mtime, item.entry.mtime_nsec) = mtime_of(&file);
            g.files.insert(id, Arc::new(file));
            g.writes.insert(id, 0);
            item.staged = Some(id);
        }
        self.change(&mut g, Op::Put(item.clone()))?;
        let obj = obj_at(&mut g, path);
        Ok((obj, item))
    }

    fn new_data(&self, g: &mut Inner) -> FsResult<(u64, File)> {
        if g.staging.is_none() {
            let base = g.overlay.base_version();
            let (s, _) = Staging::open(&self.dir, base).map_err(staging_err)?;
            g.staging = Some(s);
        }
        let Some(s) = g.staging.as_mut() else {
            return Err(FsError::NotFound);
        };
        s.new_data().map_err(staging_err)
    }

    /// Removes file or symlink `path` (`dir`: an empty directory). An object open there lives on
    /// unlinked until its last handle goes.
    pub fn remove(&self, path: &str, dir: bool) -> FsResult<()> {
        let mut g = lock(&self.inner);
        let item = g.overlay.get(path).ok_or(FsError::NotFound)?;
        match (dir, item.entry.kind == Kind::Dir) {
            (true, false) => return Err(FsError::NotADirectory),
            (false, true) => return Err(FsError::IsADirectory),
            (true, true) if !g.overlay.children(path).is_empty() => {
                return Err(FsError::NotEmpty);
            }
            _ => {}
        }
        self.change(&mut g, Op::Remove(path.to_owned()))?;
        if let Some(obj) = g.ids.remove(path) {
            let keep = g.objs.get(&obj).is_some_and(|o| o.open > 0);
            if keep {
                if let Some(o) = g.objs.get_mut(&obj) {
                    o.path = None;
                    o.orphan = Some(item);
                }
            } else {
                g.objs.remove(&obj);
                if let Some(id) = item.staged {
                    drop_data(&mut g, id);
                }
            }
        } else if let Some(id) = item.staged {
            drop_data(&mut g, id);
        }
        Ok(())
    }

    /// Renames `from` to `to`. `noreplace`: fail if `to` exists; `exchange`: swap them.
    pub fn rename(&self, from: &str, to: &str, noreplace: bool, exchange: bool) -> FsResult<()> {
        let mut g = lock(&self.inner);
        let src = g.overlay.get(from).ok_or(FsError::NotFound)?;
        Self::check_dir(&g, parent_of(to))?;
        if within(to, from) && to != from {
            return Err(FsError::Invalid("moving a directory into itself"));
        }
        let dst = g.overlay.get(to);
        if exchange {
            let _ = dst.ok_or(FsError::NotFound)?;
            if within(from, to) {
                return Err(FsError::Invalid(
                    "exchanging a directory with one inside it",
                ));
            }
            self.change(
                &mut g,
                Op::Exchange {
                    a: from.to_owned(),
                    b: to.to_owned(),
                },
            )?;
            swap_ids(&mut g, from, to);
            return Ok(());
        }
        let mut replaced = None;
        if let Some(d) = dst {
            if noreplace {
                return Err(FsError::Exists);
            }
            if from == to {
                return Ok(());
            }
            match (src.entry.kind == Kind::Dir, d.entry.kind == Kind::Dir) {
                (true, false) => return Err(FsError::NotADirectory),
                (false, true) => return Err(FsError::IsADirectory),
                (true, true) if !g.overlay.children(to).is_empty() => {
                    return Err(FsError::NotEmpty);
                }
                _ => {}
            }
            replaced = Some(d);
        }
        self.change(
            &mut g,
            Op::Rename {
                from: from.to_owned(),
                to: to.to_owned(),
            },
        )?;
        if let Some(d) = replaced {
            let gone = g.ids.remove(to);
            let open = gone.is_some_and(|o| g.objs.get(&o).is_some_and(|o| o.open > 0));
            match gone {
                Some(obj) if open => {
                    if let Some(o) = g.objs.get_mut(&obj) {
                        o.path = None;
                        o.orphan = Some(d);
                    }
                }
                _ => {
                    if let Some(obj) = gone {
                        g.objs.remove(&obj);
                    }
                    if let Some(id) = d.staged {
                        drop_data(&mut g, id);
                    }
                }
            }
        }
        move_ids(&mut g, from, to);
        Ok(())
    }

    /// Changes the metadata of `obj`: permission bits, size, mtime.
    pub fn set_attr(
        &self,
        obj: u64,
        mode: Option<u32>,
        size: Option<u64>,
        mtime: Option<SystemTime>,
    ) -> FsResult<Item> {
        let mut g = lock(&self.inner);
        let mut item = item_of(&g, obj)?;
        if let Some(size) = size {
            let id = item.staged.ok_or(FsError::NotStaged)?;
            if g.frozen.contains(&id) {
                return Err(FsError::Busy);
            }
            let file = data_file(&mut g, id)?;
            file.set_len(size).map_err(|source| FsError::Io {
                path: self.dir.join("data").join(id.to_string()),
                source,
            })?;
            *g.writes.entry(id).or_default() += 1;
            item.entry.size = size;
            (item.entry.mtime, item.entry.mtime_nsec) = mtime_of(&file);
        }
        if let Some(mode) = mode {
            item.entry.mode = mode & 0o7777;
        }
        if let Some(t) = mtime {
            let (s, n) = split_time(t);
            (item.entry.mtime, item.entry.mtime_nsec) = (s, n);
            if let Some(id) = item.staged {
                let path = self.dir.join("data").join(id.to_string());
                let _ = filetime::set_file_mtime(&path, filetime::FileTime::from_system_time(t));
            }
        }
        self.put(&mut g, obj, item.clone())?;
        Ok(item)
    }

    /// Records `item` as what `obj` is now (journaled unless the object is unlinked).
    fn put(&self, g: &mut Inner, obj: u64, item: Item) -> FsResult<()> {
        if let Some(o) = g.objs.get_mut(&obj) {
            o.changes += 1;
        }
        let orphan = g.objs.get(&obj).is_some_and(|o| o.path.is_none());
        if orphan {
            if let Some(o) = g.objs.get_mut(&obj) {
                o.orphan = Some(item);
            }
            g.seq += 1;
            return Ok(());
        }
        self.change(g, Op::Put(item))
    }

    /// Stages `obj` again from the data file kept at its last commit for its writers
    /// (`clean`), if that still holds what `item` says: no copy-up for a file written on after
    /// its `fsync`.
    fn restage(&self, g: &mut Inner, obj: u64, item: &Item) -> FsResult<Option<Item>> {
        let Some(path) = g.objs.get(&obj).and_then(|o| o.path.clone()) else {
            return Ok(None);
        };
        let Some((id, was)) = g.clean.remove(&path) else {
            return Ok(None);
        };
        if &was != item {
            drop_data(g, id);
            return Ok(None);
        }
        let mut now = item.clone();
        now.staged = Some(id);
        now.entry.data = None;
        now.version = None;
        now.state_id = None;
        g.writes.insert(id, 0);
        self.put(g, obj, now.clone())?;
        Ok(Some(now))
    }

    /// Whether `obj` can be written now, or needs its bytes copied up first; `truncate` gives
    /// it an empty data file instead.
    pub fn ready_to_write(&self, obj: u64, truncate: bool) -> FsResult<WriteReady> {
        let mut g = lock(&self.inner);
        let mut item = item_of(&g, obj)?;
        if item.staged.is_none()
            && !truncate
            && let Some(again) = self.restage(&mut g, obj, &item)?
        {
            item = again;
        }
        if item.entry.kind != Kind::File {
            return Err(FsError::IsADirectory);
        }
        if item.staged.is_some() && !truncate {
            return Ok(WriteReady::Staged);
        }
        if item.staged.is_some() || item.entry.data.is_none() || truncate {
            let (id, file) = self.new_data(&mut g)?;
            let mtime = mtime_of(&file);
            g.files.insert(id, Arc::new(file));
            let old = item.staged;
            let mut now = item;
            (now.entry.mtime, now.entry.mtime_nsec) = mtime;
            now.staged = Some(id);
            now.entry.data = None;
            now.entry.size = 0;
            now.version = None;
            now.state_id = None;
            self.put(&mut g, obj, now)?;
            if let Some(old) = old {
                drop_data(&mut g, old);
            }
            return Ok(WriteReady::Staged);
        }
        Ok(WriteReady::CopyUp(item))
    }

    /// A data file for the copy-up of a committed file.
    pub fn copy_up_file(&self) -> FsResult<(u64, File)> {
        let mut g = lock(&self.inner);
        self.new_data(&mut g)
    }

    /// The copy-up of `was` (as [`WriteReady::CopyUp`] gave it) is in data file `id`: `obj`
    /// now reads and writes it, unless it changed meanwhile (then the copy is dropped).
    pub fn copied_up(&self, obj: u64, was: &Item, id: u64, file: File) -> FsResult<()> {
        let mut g = lock(&self.inner);
        let now = item_of(&g, obj)?;
        if &now != was {
            drop_data(&mut g, id);
            return Ok(());
        }
        // The bytes are the committed ones, and so is their mtime (as a recovery will find it).
        let t = to_file_time(item_mtime(&now));
        let _ = filetime::set_file_handle_times(&file, None, Some(t));
        g.files.insert(id, Arc::new(file));
        let mut item = now;
        item.staged = Some(id);
        item.entry.data = None;
        item.version = None;
        item.state_id = None;
        self.put(&mut g, obj, item)
    }

    /// A handle of `obj` was opened.
    pub fn opened(&self, obj: u64, write: bool) {
        let mut g = lock(&self.inner);
        if let Some(o) = g.objs.get_mut(&obj) {
            o.open += 1;
            o.writers += u32::from(write);
        }
        if write {
            g.writers += 1;
        }
    }

    /// A handle of `obj` was released; an unlinked object goes with its last one.
    pub fn released(&self, obj: u64, write: bool) {
        let mut g = lock(&self.inner);
        if write {
            g.writers = g.writers.saturating_sub(1);
            g.last_change = Instant::now();
            self.wake.notify_one();
        }
        let (gone, unwritten) = match g.objs.get_mut(&obj) {
            Some(o) => {
                o.open = o.open.saturating_sub(1);
                o.writers = o.writers.saturating_sub(u32::from(write));
                (o.open == 0 && o.path.is_none(), o.writers == 0)
            }
            None => (false, false),
        };
        // The data file kept for its writers after a commit is not needed any more.
        if write
            && unwritten
            && let Some(path) = g.objs.get(&obj).and_then(|o| o.path.clone())
            && let Some((id, _)) = g.clean.remove(&path)
        {
            drop_data(&mut g, id);
            tidy(&mut g);
        }
        if gone
            && let Some(o) = g.objs.remove(&obj)
            && let Some(id) = o.orphan.and_then(|i| i.staged)
        {
            drop_data(&mut g, id);
        }
    }

    /// Writes `data` at `offset` of `obj`'s data file. `Ok(None)`: the file is being zipped by a
    /// save; wait for [`Workspace::thawed`] and try again.
    pub fn write(&self, obj: u64, offset: u64, data: &[u8]) -> FsResult<Option<u64>> {
        let mut g = lock(&self.inner);
        let mut item = item_of(&g, obj)?;
        if item.staged.is_none()
            && let Some(again) = self.restage(&mut g, obj, &item)?
        {
            item = again;
        }
        // Committed since it was opened, with no data file kept: copied up again first.
        let id = item.staged.ok_or(FsError::NotStaged)?;
        if g.frozen.contains(&id) {
            return Ok(None);
        }
        let file = data_file(&mut g, id)?;
        file.write_all_at(data, offset)
            .map_err(|source| FsError::Io {
                path: self.dir.join("data").join(id.to_string()),
                source,
            })?;
        *g.writes.entry(id).or_default() += 1;
        if let Some(o) = g.objs.get_mut(&obj) {
            o.changes += 1;
        }
        let end = offset + data.len() as u64;
        item.entry.size = item.entry.size.max(end);
        // As a recovery will find it.
        (item.entry.mtime, item.entry.mtime_nsec) = mtime_of(&file);
        // Not journaled: the data file holds size and mtime (settle_recovered).
        match g.objs.get(&obj).and_then(|o| o.path.clone()) {
            Some(_) => g.overlay.apply(&Op::Put(item.clone())),
            None => {
                if let Some(o) = g.objs.get_mut(&obj) {
                    o.orphan = Some(item.clone());
                }
            }
        }
        g.seq += 1;
        g.last_change = Instant::now();
        Ok(Some(item.entry.size))
    }

    /// The data file of staged `id`, to read.
    pub fn data(&self, id: u64) -> FsResult<Arc<File>> {
        let mut g = lock(&self.inner);
        data_file(&mut g, id)
    }

    /// The staged changes now, for a save; `None` if there are none. Their data files are
    /// frozen until [`Snapshot::zipped`].
    pub fn snapshot(self: &Arc<Self>, force: bool) -> Option<Snapshot> {
        let mut g = lock(&self.inner);
        let new_pod = g.overlay.base().is_none() && g.staging.is_some();
        if g.overlay.is_clean() && !(force && new_pod) {
            return None;
        }
        let delta = g.overlay.delta().clone();
        let ids: Vec<u64> = delta.values().flatten().filter_map(|i| i.staged).collect();
        // Every id counted from here on: a commit tells a file written since from one not.
        let writes = ids
            .iter()
            .map(|id| (*id, *g.writes.entry(*id).or_insert(0)))
            .collect();
        g.frozen.extend(ids);
        let data_dir = self.dir.join("data");
        Some(Snapshot {
            delta,
            writes,
            seq: g.seq,
            data_dir,
            ws: Arc::clone(self),
        })
    }

    fn thaw(&self, snap: &Snapshot) {
        let mut g = lock(&self.inner);
        for id in snap.writes.keys() {
            g.frozen.remove(id);
        }
        drop(g);
        self.thawed.notify_waiters();
    }

    /// `snap` is committed as `obj`: the new base. What changed since the snapshot stays staged
    /// (the journal is rewritten to hold just that). Returns the data files no longer needed
    /// that still hold exactly what was saved under their path (the caller keeps them as cache
    /// copies, or removes them with [`Workspace::discard_data`]); the others are removed.
    pub fn committed(
        &self,
        snap: &Snapshot,
        obj: Arc<VersionObject>,
    ) -> FsResult<Vec<(String, u64, PathBuf)>> {
        let mut g = lock(&self.inner);
        let inner = &mut *g;
        // A file written after the snapshot is not what was saved, even with the same item.
        let saved: BTreeMap<String, Option<Item>> = snap
            .delta
            .iter()
            .filter(|(_, item)| {
                item.as_ref().and_then(|i| i.staged).is_none_or(|id| {
                    inner.writes.get(&id).copied().unwrap_or(0)
                        == snap.writes.get(&id).copied().unwrap_or(0)
                })
            })
            .map(|(p, i)| (p.clone(), i.clone()))
            .collect();
        inner.overlay.committed(obj, &saved);
        let mut used: HashSet<u64> = inner
            .overlay
            .delta()
            .values()
            .flatten()
            .filter_map(|i| i.staged)
            .collect();
        used.extend(
            inner
                .objs
                .values()
                .filter_map(|o| o.orphan.as_ref().and_then(|i| i.staged)),
        );
        let mut kept = Vec::new();
        for (path, item) in &snap.delta {
            let Some(id) = item.as_ref().and_then(|i| i.staged) else {
                continue;
            };
            if used.contains(&id) {
                continue;
            }
            let unchanged =
                inner.writes.contains_key(&id) && inner.writes.get(&id) == snap.writes.get(&id);
            let writing = inner
                .ids
                .get(path)
                .and_then(|o| inner.objs.get(o))
                .is_some_and(|o| o.writers > 0);
            if writing
                && unchanged
                && let Some(now) = inner.overlay.get(path)
            {
                // Its writers go on writing it: kept for them (restage), not copied up again.
                inner.writes.remove(&id);
                if let Some((old, _)) = inner.clean.insert(path.clone(), (id, now)) {
                    drop_data(inner, old);
                }
                continue;
            }
            match (&inner.staging, unchanged) {
                (Some(s), true) => {
                    inner.files.remove(&id);
                    inner.writes.remove(&id);
                    kept.push((path.clone(), id, s.data_path(id)));
                }
                _ => drop_data(inner, id),
            }
        }
        let base = inner.overlay.base_version();
        let ops: Vec<Op> = inner
            .overlay
            .delta()
            .iter()
            .map(|(p, i)| match i {
                Some(item) => Op::Put(item.clone()),
                None => Op::Remove(p.clone()),
            })
            .collect();
        if let Some(s) = inner.staging.as_mut() {
            let end = s.len();
            s.restart(base, end).map_err(staging_err)?;
            for op in &ops {
                s.append(op).map_err(staging_err)?;
            }
        }
        drop(g);
        self.saved.send_replace(snap.seq);
        Ok(kept)
    }

    /// A save failed: fsyncs waiting for it get EIO.
    pub fn save_failed(&self) {
        self.failures.send_modify(|n| *n += 1);
    }

    /// Waits until everything changed before this call is committed; an error if a save that
    /// started after this call failed.
    pub async fn synced(&self) -> FsResult<()> {
        let target = lock(&self.inner).seq;
        let mut saved = self.saved.subscribe();
        let mut failures = self.failures.subscribe();
        failures.mark_unchanged();
        if !self.pending() || *saved.borrow() >= target {
            return Ok(());
        }
        self.asked.store(true, Ordering::Relaxed);
        self.wake.notify_one();
        tokio::select! {
            r = saved.wait_for(|s| *s >= target) => r.map(|_| ()).map_err(|_| FsError::SaveFailed),
            r = failures.changed() => {
                r.map_err(|_| FsError::SaveFailed)?;
                Err(FsError::SaveFailed)
            }
        }
    }

    /// The staging dir (for messages).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Nothing staged any more: removes the staging dir.
    pub fn tidy(&self) {
        tidy(&mut lock(&self.inner));
    }
}

impl Changes for Snapshot {
    fn on_top_of(
        &self,
        parent: Option<&VersionObject>,
    ) -> PodResult<Vec<(Entry, Option<PathBuf>)>> {
        let mut o = Overlay::new(parent.map(|p| Arc::new(p.clone())));
        for (path, item) in &self.delta {
            match item {
                Some(i) => o.apply(&Op::Put(i.clone())),
                None => o.apply(&Op::Remove(path.clone())),
            }
        }
        Ok(o.items()
            .into_iter()
            .map(|i| {
                let source = i.staged.map(|id| self.data_dir.join(id.to_string()));
                (i.entry, source)
            })
            .collect())
    }

    fn merges(&self) -> bool {
        true
    }

    fn state_id(&self, state: u64) -> Option<String> {
        self.delta
            .values()
            .flatten()
            .find(|i| i.entry.data.as_ref().is_some_and(|d| d.state == state))
            .and_then(|i| i.state_id.clone())
    }

    fn zipped(&self) {
        self.ws.thaw(self);
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        self.ws.thaw(self);
    }
}

/// Removes the staging dir if it holds nothing any more: no change, no unlinked open file, no
/// data file being zipped or kept for writers. A new pod keeps it until its first version.
fn tidy(g: &mut Inner) {
    if g.overlay.is_clean()
        && g.overlay.base().is_some()
        && g.objs.values().all(|o| o.orphan.is_none())
        && g.frozen.is_empty()
        && g.clean.is_empty()
    {
        g.files.clear();
        if let Some(s) = g.staging.take() {
            s.remove();
        }
    }
}

fn item_of(g: &Inner, obj: u64) -> FsResult<Item> {
    let o = g.objs.get(&obj).ok_or(FsError::Stale)?;
    match &o.path {
        Some(p) => g.overlay.get(p).ok_or(FsError::NotFound),
        None => o.orphan.clone().ok_or(FsError::NotFound),
    }
}

fn obj_at(g: &mut Inner, path: &str) -> u64 {
    if let Some(&id) = g.ids.get(path) {
        return id;
    }
    let id = NEXT_OBJ.fetch_add(1, Ordering::Relaxed);
    g.ids.insert(path.to_owned(), id);
    g.objs.insert(
        id,
        Obj {
            path: Some(path.to_owned()),
            orphan: None,
            open: 0,
            writers: 0,
            changes: 0,
        },
    );
    id
}

fn data_file(g: &mut Inner, id: u64) -> FsResult<Arc<File>> {
    if let Some(f) = g.files.get(&id) {
        return Ok(Arc::clone(f));
    }
    let s = g.staging.as_ref().ok_or(FsError::NotFound)?;
    let path = s.data_path(id);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|source| FsError::Io { path, source })?;
    let f = Arc::new(f);
    g.files.insert(id, Arc::clone(&f));
    Ok(f)
}

/// Removes data file `id` unless a save is zipping it (then the next commit's tidy-up does).
fn drop_data(g: &mut Inner, id: u64) {
    g.files.remove(&id);
    g.writes.remove(&id);
    if g.frozen.contains(&id) {
        return;
    }
    if let Some(s) = &g.staging {
        s.remove_data(id);
    }
}

/// Object ids below `from` now name the same objects below `to`.
fn move_ids(g: &mut Inner, from: &str, to: &str) {
    let moving: Vec<(String, u64)> = g
        .ids
        .range(from.to_owned()..)
        .take_while(|(p, _)| p.starts_with(from))
        .filter(|(p, _)| within(p, from))
        .map(|(p, id)| (p.clone(), *id))
        .collect();
    for (p, _) in &moving {
        g.ids.remove(p);
    }
    for (p, id) in moving {
        let np = format!("{to}{}", &p[from.len()..]);
        g.ids.insert(np.clone(), id);
        if let Some(o) = g.objs.get_mut(&id) {
            o.path = Some(np);
        }
    }
}

fn swap_ids(g: &mut Inner, a: &str, b: &str) {
    let tmp = "\u{0}swap";
    move_ids(g, a, tmp);
    move_ids(g, b, a);
    move_ids(g, tmp, b);
}

/// The directory `path` is in (`""`: the root).
pub fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(d, _)| d)
}

fn item_mtime(item: &Item) -> (i64, u32) {
    (item.entry.mtime, item.entry.mtime_nsec)
}

fn to_file_time((s, n): (i64, u32)) -> filetime::FileTime {
    filetime::FileTime::from_unix_time(s, n)
}

fn split_time(t: SystemTime) -> (i64, u32) {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_nanos(),
        ),
        Err(e) => {
            let d = e.duration();
            let (s, n) = (
                i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                d.subsec_nanos(),
            );
            if n == 0 {
                (-s, 0)
            } else {
                (-s - 1, 1_000_000_000 - n)
            }
        }
    }
}
