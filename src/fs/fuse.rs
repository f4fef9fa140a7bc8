//! The thin `fuser` adapter: each kernel request is handed to [`PodFs`] on the tokio runtime and
//! answered from the spawned task, so no FUSE thread ever waits on the network. Every failed
//! operation logs one line with its errno ([`failed`]); every change answers `EROFS` for now.
//!
//! [`mount`] starts a session (mount options: `nosuid`, `nodev`, `default_permissions`, source
//! and subtype `podfs`) on its own threads; [`Mounted::serve`] runs until the shutdown token is
//! cancelled (then unmounts) or the file system is unmounted from outside (`umount`,
//! `fusermount3 -u`, `podfs unmount`).

use std::ffi::OsStr;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, Session, SessionACL, SessionUnmounter, TimeOrNow,
    WriteFlags,
};
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::error::{FsError, MountError};
use super::write::SetAttr;
use super::{Attr, FileKind, Forget, PodFs, mountpoint};
use crate::metrics::Metrics;

/// `st_blksize` of every file: the kernel sends up to 1 MiB per read or write request.
const BLKSIZE: u32 = 1 << 20;

/// Background requests the kernel may have outstanding (its default is 12 to 16).
const MAX_BACKGROUND: u16 = 128;

/// Entries prepared for one `readdirplus` reply (a reply holds about 4 KiB, ~40 entries).
const READDIRPLUS_BATCH: usize = 64;

/// How long an unmount on shutdown waits for the session to end before giving up on it.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// Logs a failed operation (one line, with its errno) and returns the errno for the reply.
fn failed(op: &str, ino: u64, e: &FsError) -> Errno {
    let errno = e.errno();
    let what = std::io::Error::from_raw_os_error(errno);
    let chain = crate::term::error_chain(e);
    if matches!(e, FsError::NotFound | FsError::NoXattr) {
        // Shells and file managers probe for names all the time: not worth a warning.
        tracing::debug!(op, ino, errno, "{op} failed: {what}: {chain}");
    } else {
        tracing::warn!(op, ino, errno, "{op} failed: {what}: {chain}");
    }
    Errno::from_i32(errno)
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        // The I/O size programs use (cp, cat, rsync: `st_blksize`): 1 MiB requests cost the
        // mount a quarter of what 128 KiB ones do, for the same bytes.
        blksize: BLKSIZE,
        flags: 0,
    }
}

/// The `fuser::Filesystem` of a mount: [`PodFs`] plus the runtime its work runs on.
struct Adapter {
    fs: Arc<PodFs>,
    rt: Handle,
    metrics: Option<Arc<Metrics>>,
}

impl Adapter {
    /// Runs `work` (which replies) on the runtime, in a span naming the operation.
    fn spawn(
        &self,
        op: &'static str,
        req: &Request,
        ino: u64,
        work: impl Future<Output = ()> + Send + 'static,
    ) {
        let span = tracing::debug_span!("fuse", op, req = u64::from(req.unique()), ino);
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let timed = async move {
            work.await;
            if let Some(m) = metrics {
                m.fuse_op(op, started.elapsed());
            }
        };
        self.rt.spawn(timed.instrument(span));
    }
}

impl Adapter {
    /// Asks the kernel for passthrough (see src/fs/passthrough.rs) when it can be had: only
    /// root may hand the kernel backing files.
    fn init_passthrough(&self, config: &mut KernelConfig) {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            tracing::info!(
                "files read again are served through the mount: the kernel reads cached files \
                 directly (FUSE passthrough) only for a mount run by root"
            );
            return;
        }
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
            tracing::info!(
                "the kernel lacks {missing:?} (Linux 6.9 or later has it): files read again \
                 are served through the mount"
            );
            return;
        }
        // Backing files on a file system stacked once (the cache dir on overlayfs) need depth 2;
        // depth 1 keeps podfs itself usable as a lower layer of overlayfs.
        let _ = config.set_max_stack_depth(1);
        self.fs.set_passthrough(true);
    }
}

#[allow(clippy::too_many_arguments)] // the signatures are fuser's
impl Filesystem for Adapter {
    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let fs = Arc::clone(&self.fs);
        let name = name.to_owned();
        self.spawn("lookup", req, parent.0, async move {
            match fs.lookup(parent.0, &name).await {
                Ok(f) => reply.entry_with_ttls(
                    &f.attr.ttl,
                    &f.entry_ttl,
                    &file_attr(&f.attr),
                    Generation(0),
                ),
                Err(e) => reply.error(failed("lookup", parent.0, &e)),
            }
        });
    }

    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Listings come with attributes (from the manifest, in memory), so that `ls -l`,
        // `find` and `rsync` cost no lookup per entry.
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS) {
            tracing::info!(
                "the kernel lacks {missing:?}: directories are listed without attributes"
            );
        }
        // Lookups in one directory in parallel: a first lookup waiting on a slow remote must
        // not hold up the root or the other remotes.
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS) {
            tracing::info!("the kernel lacks {missing:?}: lookups in a directory are serialized");
        }
        // Reads the kernel sends in the background (read-ahead, page cache fills) at once:
        // room for many readers of a slow remote before readers of the others wait.
        if let Err(max) = config.set_max_background(MAX_BACKGROUND) {
            tracing::info!("the kernel allows {max} background requests at most");
            let _ = config.set_max_background(max);
        }
        self.init_passthrough(config);
        Ok(())
    }

    // fuser's default `batch_forget` calls this once per inode.
    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let fs = Arc::clone(&self.fs);
        self.spawn("getattr", req, ino.0, async move {
            match fs.getattr(ino.0).await {
                Ok(a) => reply.attr(&a.ttl, &file_attr(&a)),
                Err(e) => reply.error(failed("getattr", ino.0, &e)),
            }
        });
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let fs = Arc::clone(&self.fs);
        self.spawn("readlink", req, ino.0, async move {
            match fs.readlink(ino.0).await {
                Ok(target) => reply.data(target.as_bytes()),
                Err(e) => reply.error(failed("readlink", ino.0, &e)),
            }
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let fs = Arc::clone(&self.fs);
        let metrics = self.metrics.clone();
        self.spawn("open", req, ino.0, async move {
            let opened = match fs.open(ino.0, flags.0).await {
                Ok(o) => o,
                Err(e) => return reply.error(failed("open", ino.0, &e)),
            };
            answer_open(&fs, metrics.as_deref(), ino.0, opened, reply);
        });
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let fs = Arc::clone(&self.fs);
        self.spawn("read", req, ino.0, async move {
            match fs.read(fh.0, offset, size).await {
                Ok(bytes) => reply.data(&bytes),
                Err(e) => reply.error(failed("read", ino.0, &e)),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let fs = Arc::clone(&self.fs);
        self.spawn("fsync", req, ino.0, async move {
            match fs.fsync(ino.0).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(failed("fsync", ino.0, &e)),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // It may start a blocking task: this thread is fuser's, not the runtime's.
        let _runtime = self.rt.enter();
        self.fs.release(ino.0, fh.0);
        if let Some(m) = &self.metrics {
            m.open_files.dec();
        }
        reply.ok();
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fs = Arc::clone(&self.fs);
        self.spawn("opendir", req, ino.0, async move {
            match fs.opendir(ino.0).await {
                // A version's directory never changes: the kernel may keep its listing.
                Ok((fh, true)) => reply.opened(
                    FileHandle(fh),
                    FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
                ),
                Ok((fh, false)) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply.error(failed("opendir", ino.0, &e)),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        // From the listing taken at opendir: memory only, answered here.
        match self.fs.readdir(fh.0, offset) {
            Ok(entries) => {
                for (next, e) in entries {
                    if reply.add(INodeNo(e.ino), next, file_type(e.kind), &e.name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(failed("readdir", ino.0, &e)),
        }
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let fs = Arc::clone(&self.fs);
        self.spawn("readdirplus", req, ino.0, async move {
            match fs.readdirplus(ino.0, fh.0, offset, READDIRPLUS_BATCH).await {
                Ok(entries) => {
                    let mut sent = true;
                    for (next, name, f) in entries {
                        let dots = name == "." || name == "..";
                        if sent {
                            let attr = file_attr(&f.attr);
                            let ttl = f.entry_ttl.min(f.attr.ttl);
                            sent = !reply.add(
                                INodeNo(f.attr.ino),
                                next,
                                &name,
                                &ttl,
                                &attr,
                                Generation(0),
                            );
                        }
                        if !sent && !dots {
                            // Not sent: the kernel holds no reference to it.
                            fs.forget(f.attr.ino, 1);
                        }
                    }
                    reply.ok();
                }
                Err(e) => reply.error(failed("readdirplus", ino.0, &e)),
            }
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let fs = Arc::clone(&self.fs);
        self.spawn("fsyncdir", req, ino.0, async move {
            match fs.fsync(ino.0).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(failed("fsyncdir", ino.0, &e)),
            }
        });
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        // The disk changes are staged on.
        match self.fs.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                u32::try_from(s.f_bsize).unwrap_or(4096),
                255,
                u32::try_from(s.f_frsize).unwrap_or(4096),
            ),
            Err(e) => reply.error(failed("statfs", ino.0, &e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        // Pods store no extended attributes.
        reply.error(failed("getxattr", ino.0, &FsError::NoXattr));
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    // Changes: below `POD/` they are staged (src/fs/write.rs); elsewhere they are EROFS.

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let fs = Arc::clone(&self.fs);
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            mtime: mtime.map(|t| match t {
                TimeOrNow::SpecificTime(t) => t,
                TimeOrNow::Now => SystemTime::now(),
            }),
        };
        self.spawn("setattr", req, ino.0, async move {
            match fs.setattr(ino.0, set).await {
                Ok(a) => reply.attr(&a.ttl, &file_attr(&a)),
                Err(e) => reply.error(failed("setattr", ino.0, &e)),
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            let e = FsError::NotPermitted(
                "special files (a pod holds files, directories and symlinks)",
            );
            return reply.error(failed("mknod", parent.0, &e));
        }
        let fs = Arc::clone(&self.fs);
        let name = name.to_owned();
        self.spawn("mknod", req, parent.0, async move {
            match fs
                .create(
                    parent.0,
                    &name,
                    mode & !umask,
                    libc::O_WRONLY | libc::O_EXCL,
                )
                .await
            {
                Ok((found, opened)) => {
                    fs.release(found.attr.ino, opened.fh);
                    entry(reply, &found);
                }
                Err(e) => reply.error(failed("mknod", parent.0, &e)),
            }
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let fs = Arc::clone(&self.fs);
        let name = name.to_owned();
        self.spawn("mkdir", req, parent.0, async move {
            match fs.mkdir(parent.0, &name, mode & !umask & 0o7777).await {
                Ok(found) => entry(reply, &found),
                Err(e) => reply.error(failed("mkdir", parent.0, &e)),
            }
        });
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let fs = Arc::clone(&self.fs);
        let name = name.to_owned();
        self.spawn("unlink", req, parent.0, async move {
            match fs.unlink(parent.0, &name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(failed("unlink", parent.0, &e)),
            }
        });
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let fs = Arc::clone(&self.fs);
        let name = name.to_owned();
        self.spawn("rmdir", req, parent.0, async move {
            match fs.rmdir(parent.0, &name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(failed("rmdir", parent.0, &e)),
            }
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let fs = Arc::clone(&self.fs);
        let (name, target) = (link_name.to_owned(), target.to_owned());
        self.spawn("symlink", req, parent.0, async move {
            match fs.symlink(parent.0, &name, &target).await {
                Ok(found) => entry(reply, &found),
                Err(e) => reply.error(failed("symlink", parent.0, &e)),
            }
        });
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let fs = Arc::clone(&self.fs);
        let (name, newname) = (name.to_owned(), newname.to_owned());
        self.spawn("rename", req, parent.0, async move {
            match fs
                .rename(parent.0, &name, newparent.0, &newname, flags.bits())
                .await
            {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(failed("rename", parent.0, &e)),
            }
        });
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let e = FsError::NotPermitted("hard links (a pod stores each path once)");
        reply.error(failed("link", ino.0, &e));
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // Staged at once from this thread (the page cache of the staging disk) unless a save is
        // reading the file: no copy of the bytes, no hop to the runtime.
        let started = Instant::now();
        match self.fs.write_now(fh.0, offset, data) {
            Some(Ok(n)) => {
                reply.written(n);
                if let Some(m) = &self.metrics {
                    m.fuse_op("write", started.elapsed());
                }
                return;
            }
            Some(Err(e)) => return reply.error(failed("write", ino.0, &e)),
            None => {}
        }
        let fs = Arc::clone(&self.fs);
        let data = data.to_vec();
        self.spawn("write", req, ino.0, async move {
            match fs.write(fh.0, offset, &data).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(failed("write", ino.0, &e)),
            }
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let fs = Arc::clone(&self.fs);
        let metrics = self.metrics.clone();
        let name = name.to_owned();
        self.spawn("create", req, parent.0, async move {
            match fs
                .create(parent.0, &name, mode & !umask & 0o7777, flags)
                .await
            {
                Ok((found, opened)) => {
                    if !fs.passthrough.note_writing(found.attr.ino) {
                        fs.release(found.attr.ino, opened.fh);
                        let e = FsError::Busy;
                        return reply.error(failed("create", parent.0, &e));
                    }
                    if let Some(m) = &metrics {
                        m.open_files.inc();
                    }
                    reply.created(
                        &found.entry_ttl,
                        &file_attr(&found.attr),
                        Generation(0),
                        FileHandle(opened.fh),
                        FopenFlags::FOPEN_KEEP_CACHE,
                    );
                }
                Err(e) => reply.error(failed("create", parent.0, &e)),
            }
        });
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(failed("setxattr", ino.0, &FsError::NotSupported));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(failed("removexattr", ino.0, &FsError::NotSupported));
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(failed("fallocate", ino.0, &FsError::NotSupported));
    }
}

/// Answers a lookup-like request with a new entry.
fn entry(reply: ReplyEntry, found: &super::Found) {
    reply.entry_with_ttls(
        &found.attr.ttl,
        &found.entry_ttl,
        &file_attr(&found.attr),
        Generation(0),
    );
}

/// Answers an open: a handle for writing reads and writes through the mount; one for reading
/// may pass through to a whole-file copy.
fn answer_open(
    fs: &PodFs,
    metrics: Option<&Metrics>,
    ino: u64,
    opened: super::Opened,
    reply: ReplyOpen,
) {
    if opened.write {
        if !fs.passthrough.open_for_writing(ino, opened.fh, reply) {
            // The kernel reads this inode from a backing file: writes would bypass the mount.
            fs.release_unanswered(opened.fh);
            return;
        }
        if let Some(m) = metrics {
            m.open_files.inc();
        }
        return;
    }
    if let Some(m) = metrics {
        m.open_files.inc();
    }
    let counted = || {
        if let Some(m) = metrics {
            m.passthrough_opens.inc();
        }
    };
    let refused = fs
        .passthrough
        .open(ino, opened.fh, opened.copy, reply, counted);
    // Passthrough has turned itself off.
    if let Some(e) = refused {
        tracing::warn!(
            error = %e,
            "the kernel refuses to read cached files directly (FUSE passthrough): \
             reads go through the mount from now on"
        );
    }
}

/// Settings of the FUSE session.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// Let other users in (`allow_other`).
    pub allow_other: bool,
    /// Threads reading requests from the kernel (each with its own `/dev/fuse` clone when more
    /// than one). They only dispatch: the work runs on the tokio runtime.
    pub threads: usize,
    /// Where operation latencies are recorded, if anywhere.
    pub metrics: Option<Arc<Metrics>>,
}

impl Default for MountConfig {
    /// Only the mounting user; two request threads.
    fn default() -> Self {
        Self {
            allow_other: false,
            threads: 2,
            metrics: None,
        }
    }
}

/// A live mount: its session runs on its own threads until unmounted.
pub struct Mounted {
    point: PathBuf,
    unmounter: SessionUnmounter,
    done: oneshot::Receiver<std::io::Result<()>>,
}

/// Mounts `fs` at `point` (from [`mountpoint::prepare`]). Blocking: it waits for the kernel's
/// first request; call it from `spawn_blocking`. `rt` runs the operations.
pub fn mount(
    fs: Arc<PodFs>,
    rt: Handle,
    point: &Path,
    config: &MountConfig,
) -> Result<Mounted, MountError> {
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        MountOption::FSName("podfs".into()),
        MountOption::Subtype("podfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoSuid,
        MountOption::NoDev,
    ];
    cfg.acl = if config.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    cfg.n_threads = Some(config.threads.max(1));
    cfg.clone_fd = config.threads > 1;
    let adapter = Adapter {
        fs: Arc::clone(&fs),
        rt,
        metrics: config.metrics.clone(),
    };
    let mut session = Session::new(adapter, point, &cfg).map_err(MountError::io(point))?;
    let notifier = session.notifier();
    fs.set_invalidator(move |forget| match forget {
        Forget::Entry { parent, name } => {
            // ENOENT: the kernel had already dropped the name.
            if let Err(e) = notifier.inval_entry(INodeNo(parent), OsStr::new(name)) {
                tracing::debug!("dropping the kernel's entry {name:?} in inode {parent}: {e}");
            }
        }
        Forget::Data { ino } => {
            if let Err(e) = notifier.inval_inode(INodeNo(ino), 0, 0) {
                tracing::debug!("dropping the kernel's cached bytes of inode {ino}: {e}");
            }
        }
    });
    if let Err(why) = mountpoint::raise_read_ahead(point) {
        tracing::info!("{why}");
    }
    let unmounter = session.unmount_callable();
    let (tx, done) = oneshot::channel();
    std::thread::Builder::new()
        .name("podfs-session".into())
        .spawn(move || {
            // The receiver is gone only when nobody waits for the end any more.
            let _ = tx.send(session.run());
        })
        .map_err(MountError::io(point))?;
    Ok(Mounted {
        point: point.to_owned(),
        unmounter,
        done,
    })
}

impl Mounted {
    /// Serves until `shutdown` is cancelled (then unmounts: lazily if files are still open) or
    /// until the mount is unmounted from outside.
    pub async fn serve(mut self, shutdown: CancellationToken) -> Result<(), MountError> {
        let point = self.point.clone();
        let ended = |r: Result<std::io::Result<()>, oneshot::error::RecvError>| match r {
            Ok(Ok(())) | Err(_) => Ok(()),
            Ok(Err(e)) => Err(MountError::io(&point)(e)),
        };
        tokio::select! {
            r = &mut self.done => return ended(r),
            () = shutdown.cancelled() => {}
        }
        let mut unmounter = self.unmounter;
        let p = self.point.clone();
        let unmounted = tokio::task::spawn_blocking(move || match unmounter.unmount() {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!("{}: {e}; detaching it instead", p.display());
                mountpoint::detach(&p)
            }
        })
        .await
        .map_err(|e| MountError::io(&self.point)(std::io::Error::other(e)))?;
        unmounted?;
        match tokio::time::timeout(STOP_WAIT, self.done).await {
            Ok(r) => ended(r),
            Err(_) => {
                tracing::warn!(
                    "{}: detached; files still open there fail from now on",
                    self.point.display()
                );
                Ok(())
            }
        }
    }
}
