//! Mount points: the checks before a mount (with a one-line error for each problem), clearing a
//! dead podfs mount, and unmounting.
//!
//! A podfs mount whose daemon died answers `ENOTCONN` (the kernel's doing): podfs never unmounts
//! it by itself, so that a program walking the mount point sees an error rather than an empty
//! directory. `podfs unmount` or the next `podfs mount` clears it.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::error::{IoKind, MountError, io_kind};
use crate::pod::fence;

/// The FUSE device a mount needs.
pub const DEV_FUSE: &str = "/dev/fuse";

fn shown(p: &Path) -> String {
    p.display().to_string()
}

/// The podfs mount at exactly `point` (absolute), if any.
pub fn podfs_mount_at(point: &Path) -> Option<fence::Mount> {
    fence::mounts()
        .into_iter()
        .rfind(|m| m.is_podfs() && m.point == point)
}

/// The kernel's read-ahead for a podfs mount, in KiB: as large as one FUSE read may be (fuser
/// offers the kernel's limit of 256 pages). The kernel starts every FUSE mount at 128 KiB, and
/// each read request costs two thread hand-offs in the daemon: at 1 MiB, a 1 GiB file served
/// from memory reads 4x faster with a third of the daemon's CPU (docs/BENCHMARKS.md).
pub const READ_AHEAD_KB: u32 = 1024;

/// Sets the kernel's read-ahead of the mount at `point` to [`READ_AHEAD_KB`], through its
/// backing device in `/sys/class/bdi` (as gcsfuse's documentation advises), which only root may
/// write. Returns why not otherwise, with the command that does it.
pub fn raise_read_ahead(point: &Path) -> Result<(), String> {
    let dev = podfs_mount_at(point)
        .ok_or_else(|| format!("cannot find {} in /proc/self/mountinfo", point.display()))?
        .dev;
    let file = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    std::fs::write(&file, format!("{READ_AHEAD_KB}\n")).map_err(|e| {
        format!(
            "the kernel reads ahead 128 KiB at a time on this mount: cannot write {file} ({e}); \
             as root: echo {READ_AHEAD_KB} > {file}"
        )
    })
}

/// Checks that `point` can be mounted on and returns it absolute: `/dev/fuse` exists, `point` is
/// an empty directory and not a live podfs mount. A dead podfs mount there is cleared first.
pub fn prepare(point: &Path) -> Result<PathBuf, MountError> {
    if !Path::new(DEV_FUSE).exists() {
        return Err(MountError::NoDevFuse);
    }
    let abs = fence::absolute(point).map_err(MountError::io(point))?;
    match std::fs::metadata(&abs) {
        Err(e) if io_kind(&e) == IoKind::NotConnected && podfs_mount_at(&abs).is_some() => {
            tracing::warn!("{}: clearing a dead podfs mount", abs.display());
            detach(&abs)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(MountError::Missing(shown(point)));
        }
        Err(e) => return Err(MountError::io(point)(e)),
        Ok(md) if !md.is_dir() => return Err(MountError::NotADirectory(shown(point))),
        Ok(_) => {
            if podfs_mount_at(&abs).is_some() {
                return Err(MountError::AlreadyMounted(shown(point)));
            }
        }
    }
    let mut entries = std::fs::read_dir(&abs).map_err(MountError::io(point))?;
    if entries.next().is_some() {
        return Err(MountError::NotEmpty(shown(point)));
    }
    Ok(abs)
}

/// Unmounts the podfs mount at `point`: a live one normally (failing if busy), a dead one
/// (`ENOTCONN`) lazily. Without the privilege to unmount, goes through `fusermount3 -u`.
pub fn unmount(point: &Path) -> Result<(), MountError> {
    let abs = fence::absolute(point).map_err(MountError::io(point))?;
    if podfs_mount_at(&abs).is_none() {
        return Err(MountError::NotMounted(shown(point)));
    }
    let dead = matches!(std::fs::metadata(&abs), Err(e) if io_kind(&e) == IoKind::NotConnected);
    let result = if dead { detach(&abs) } else { umount(&abs, 0) };
    match result {
        Err(MountError::Io { source, .. }) if io_kind(&source) == IoKind::Busy => {
            Err(MountError::Busy(shown(point)))
        }
        other => other,
    }
}

/// Detaches the mount at `point` now (`umount -l`); it goes away once nothing uses it.
pub fn detach(point: &Path) -> Result<(), MountError> {
    umount(point, libc::MNT_DETACH)
}

fn umount(point: &Path, flags: libc::c_int) -> Result<(), MountError> {
    let c = CString::new(point.as_os_str().as_bytes()).map_err(|e| MountError::Io {
        path: shown(point),
        source: std::io::Error::other(e),
    })?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call; umount2 only reads it.
    let rc = unsafe { libc::umount2(c.as_ptr(), flags) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if io_kind(&e) != IoKind::NotPermitted {
        return Err(MountError::io(point)(e));
    }
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-u");
    if flags & libc::MNT_DETACH != 0 {
        cmd.arg("-z");
    }
    let out = cmd.arg(point).output().map_err(MountError::io(point))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(MountError::Io {
            path: shown(point),
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        })
    }
}
