//! FUSE passthrough: opens of a file with a verified whole-file copy (src/cache/copies.rs) hand
//! that copy to the kernel, which then reads it as it reads a local file, without asking the
//! mount (Linux 6.9 or later, and root: the kernel only takes backing files from
//! `CAP_SYS_ADMIN`).
//!
//! The kernel refuses (EIO to the opener) to mix the two ways on one inode: while a handle
//! reads it through the mount (with the page cache), no open may pass through, and while one
//! passes through, every open must, with the same backing file. [`Passthrough`] keeps, per
//! inode, which way its open handles go and decides each open under one lock.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use fuser::{BackingId, FileHandle, FopenFlags, ReplyOpen};

/// How the open handles of one inode read it.
enum Io {
    /// Through the mount: this many handles.
    Mount(usize),
    /// From this backing file: this many handles.
    Backing(Arc<BackingId>, usize),
}

/// Per-inode open modes of a mount; see the module documentation.
///
/// It also says when to drop an inode's page cache once its file has a whole-file copy
/// ([`Passthrough::copied`]): the first open passing through would drop it anyway (about
/// 0.15 s per GiB, in that open), but dropping it while a handle still reads through the mount
/// would make that handle fetch it all again.
#[derive(Default)]
pub struct Passthrough {
    /// Set when the kernel agreed to passthrough at init; cleared if it refuses a backing file.
    enabled: AtomicBool,
    inodes: Mutex<HashMap<u64, Io>>,
    /// Inodes with a new copy, whose page cache is dropped when their last handle goes.
    copied: Mutex<HashSet<u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Passthrough {
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Relaxed)
    }

    /// Answers the open of `ino` as handle `fh`: from `copy` (or the inode's backing file) when
    /// the kernel may read it directly (then calls `direct` first, so that whoever counts it
    /// has counted it when the opener returns), else through the mount, keeping the page cache
    /// (an inode is one path of one version: its bytes never change). Returns the kernel's
    /// refusal of `copy`, if it refused it (passthrough is then off).
    pub fn open(
        &self,
        ino: u64,
        fh: u64,
        copy: Option<File>,
        reply: ReplyOpen,
        direct: impl FnOnce(),
    ) -> Option<std::io::Error> {
        let mut inodes = lock(&self.inodes);
        let io = inodes.entry(ino).or_insert(Io::Mount(0));
        let mut refused = None;
        if let (Io::Mount(0), Some(file), true) = (&*io, &copy, self.enabled()) {
            match reply.open_backing(file) {
                Ok(id) => *io = Io::Backing(Arc::new(id), 0),
                Err(e) => {
                    self.enabled.store(false, Relaxed);
                    refused = Some(e);
                }
            }
        }
        match io {
            Io::Backing(id, n) => {
                *n += 1;
                direct();
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), id);
            }
            Io::Mount(n) => {
                *n += 1;
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
            }
        }
        refused
    }

    /// Answers the open of `ino` for writing as handle `fh`, through the mount. Refused
    /// (`ETXTBSY`, returns false) while the kernel reads the inode from a backing file: writes
    /// would bypass the mount.
    pub fn open_for_writing(&self, ino: u64, fh: u64, reply: ReplyOpen) -> bool {
        if !self.note_writing(ino) {
            reply.error(fuser::Errno::from_i32(libc::ETXTBSY));
            return false;
        }
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
        true
    }

    /// Counts a handle of `ino` that writes through the mount, unless the kernel reads `ino`
    /// from a backing file (then returns false).
    pub fn note_writing(&self, ino: u64) -> bool {
        let mut inodes = lock(&self.inodes);
        match inodes.entry(ino).or_insert(Io::Mount(0)) {
            Io::Backing(..) => false,
            Io::Mount(n) => {
                *n += 1;
                true
            }
        }
    }

    /// A whole-file copy of `ino`'s file is complete: whether to drop its page cache now (no
    /// handle open); else that happens when its last handle is released.
    pub fn copied(&self, ino: u64) -> bool {
        let inodes = lock(&self.inodes);
        if inodes.contains_key(&ino) {
            lock(&self.copied).insert(ino);
            false
        } else {
            true
        }
    }

    /// A handle of `ino` was released (the kernel has already counted it out); the backing
    /// file is closed with the inode's last handle. Returns whether to drop the inode's page
    /// cache now (see [`Passthrough::copied`]).
    pub fn release(&self, ino: u64) -> bool {
        let mut inodes = lock(&self.inodes);
        let last = match inodes.get_mut(&ino) {
            Some(Io::Mount(n) | Io::Backing(_, n)) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        };
        if !last {
            return false;
        }
        // An open passing through has dropped the page cache already.
        let through_mount = matches!(inodes.remove(&ino), Some(Io::Mount(_)));
        lock(&self.copied).remove(&ino) && through_mount
    }
}
