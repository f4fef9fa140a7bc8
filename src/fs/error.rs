//! The errors of file system operations, and the only place where they become an errno.
//!
//! Every match here is exhaustive, with no catch-all arm: a new error variant (here, in
//! [`PodError`] or in [`RemoteError`]) does not compile until someone decides its errno.

use crate::pod::PodError;
use crate::remote::RemoteError;

/// Why one file system operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// No such remote, pod, version or path (or a name that cannot exist, like a non-UTF-8 one).
    #[error("no such file or directory")]
    NotFound,
    /// `getxattr`: pods store no extended attributes. Answered `ENOSYS`, which the kernel
    /// remembers for the life of the mount (programs then get `EOPNOTSUPP` without asking the
    /// daemon: `ls -l` asks for two attributes per file otherwise).
    #[error("extended attributes are not supported")]
    NoXattr,
    /// A path component below a file or a symlink.
    #[error("not a directory")]
    NotADirectory,
    /// `readlink` of something that is not a symlink.
    #[error("not a symlink")]
    NotASymlink,
    /// An inode of a pod that was deleted and saved again since it was looked up.
    #[error("stale file handle: the pod was deleted and saved again")]
    Stale,
    /// A file handle the kernel never got from us (or already released).
    #[error("unknown file handle {0}")]
    BadHandle(u64),
    /// A change where nothing can change: `.versions/`, the root, a remote's directory.
    #[error("read-only file system: {0} is not possible here")]
    ReadOnly(&'static str),
    /// A name that is already taken (`O_EXCL`, `mkdir`, `RENAME_NOREPLACE`).
    #[error("file exists")]
    Exists,
    #[error("is a directory")]
    IsADirectory,
    /// A rename from one pod to another (each pod saves on its own).
    #[error("renaming across pods is a copy: the kernel's EXDEV makes mv copy")]
    CrossDevice,
    #[error("directory not empty")]
    NotEmpty,
    /// An operation that makes no sense here (moving a directory into itself, …).
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// Refused on purpose (hard links, special files, removing a pod's directory, chown).
    #[error("operation not permitted: {0}")]
    NotPermitted(&'static str),
    /// Extended attributes cannot be written: pods store none.
    #[error("extended attributes cannot be stored in a pod")]
    NotSupported,
    /// A write to a file that was committed since it was opened and has no data file any more:
    /// the caller copies it up again. Never reaches the kernel but as EIO.
    #[error("the file must be copied to staging again before it is written")]
    NotStaged,
    /// A file being saved cannot be truncated this instant; the caller may retry.
    #[error("the file is being saved: try again")]
    Busy,
    /// Staging on local disk failed (a full disk is `ENOSPC`).
    #[error("staging {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The staging dir cannot be used (another mount holds it, or its journal is damaged).
    #[error("{0}")]
    Staging(String),
    /// `fsync`: the save that would commit the data failed (the data stays staged).
    #[error(
        "the pod could not be saved (the changes stay staged and are saved again later; see the log)"
    )]
    SaveFailed,
    /// Reading a manifest or file data failed.
    #[error(transparent)]
    Pod(#[from] PodError),
    /// Listing pods or versions failed.
    #[error(transparent)]
    Remote(#[from] RemoteError),
}

pub type FsResult<T> = Result<T, FsError>;

impl FsError {
    /// The errno the kernel gets for this error.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NoXattr => libc::ENOSYS,
            FsError::NotADirectory => libc::ENOTDIR,
            FsError::NotASymlink => libc::EINVAL,
            FsError::Stale => libc::ESTALE,
            FsError::BadHandle(_) => libc::EBADF,
            FsError::ReadOnly(_) => libc::EROFS,
            FsError::Exists => libc::EEXIST,
            FsError::IsADirectory => libc::EISDIR,
            FsError::CrossDevice => libc::EXDEV,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::NotPermitted(_) => libc::EPERM,
            FsError::NotSupported => libc::EOPNOTSUPP,
            FsError::Busy => libc::EBUSY,
            FsError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            FsError::Staging(_) | FsError::SaveFailed | FsError::NotStaged => libc::EIO,
            FsError::Pod(e) => pod_errno(e),
            FsError::Remote(e) => remote_errno(e),
        }
    }
}

fn pod_errno(e: &PodError) -> i32 {
    match e {
        // A pod or version deleted since it was listed.
        PodError::NoSuchPod { .. } | PodError::NoSuchVersion { .. } => libc::ENOENT,
        PodError::Remote(e) => remote_errno(e),
        PodError::Cancelled(_) => libc::EINTR,
        PodError::Name(_)
        | PodError::Corrupt { .. }
        | PodError::UnsafePath { .. }
        | PodError::Unsupported { .. }
        | PodError::Refused { .. }
        | PodError::Io { .. }
        | PodError::TooManyConflicts(_)
        | PodError::NoVersionNumberLeft { .. } => libc::EIO,
    }
}

fn remote_errno(e: &RemoteError) -> i32 {
    match e {
        RemoteError::Cancelled => libc::EINTR,
        // A remote object missing under a committed version is damage, not an absent path:
        // paths are answered from manifests, never from object listings.
        RemoteError::NotFound(_)
        | RemoteError::AlreadyExists(_)
        | RemoteError::Denied { .. }
        | RemoteError::Unavailable { .. }
        | RemoteError::Other { .. }
        | RemoteError::Io { .. } => libc::EIO,
    }
}

/// Why a mount point cannot be mounted on or unmounted: each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(
        "/dev/fuse is missing: load the FUSE kernel module (`modprobe fuse`), or in a container pass the device (`--device /dev/fuse`)"
    )]
    NoDevFuse,
    #[error("mount point {0} does not exist: create it first (`mkdir -p {0}`)")]
    Missing(String),
    #[error("mount point {0} is not a directory: mount on an empty directory")]
    NotADirectory(String),
    #[error(
        "mount point {0} is not empty: mount on an empty directory (a mount would hide what it holds)"
    )]
    NotEmpty(String),
    #[error("{0} is already a podfs mount: `podfs unmount {0}` first")]
    AlreadyMounted(String),
    #[error("{0} is not a podfs mount")]
    NotMounted(String),
    #[error(
        "{0} is busy: close the files and shells open below it, then unmount again (`umount -l {0}` detaches it now)"
    )]
    Busy(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl MountError {
    pub fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> MountError + '_ {
        move |source| MountError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// The errnos the mount point code tells apart (everything else is reported as it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// `ENOTCONN`: a FUSE mount whose daemon is gone.
    NotConnected,
    /// `EBUSY`: files are open below a mount point.
    Busy,
    /// `EPERM`: not allowed (unprivileged unmount goes through fusermount3).
    NotPermitted,
    Other,
}

/// Classifies an I/O error by its errno.
pub fn io_kind(e: &std::io::Error) -> IoKind {
    match e.raw_os_error() {
        Some(libc::ENOTCONN) => IoKind::NotConnected,
        Some(libc::EBUSY) => IoKind::Busy,
        Some(libc::EPERM) => IoKind::NotPermitted,
        Some(_) | None => IoKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos() {
        assert_eq!(FsError::NotFound.errno(), libc::ENOENT);
        assert_eq!(FsError::ReadOnly("mkdir").errno(), libc::EROFS);
        let missing = PodError::NoSuchVersion {
            pod: "p".into(),
            version: 3,
            remote: "r".into(),
        };
        assert_eq!(FsError::Pod(missing).errno(), libc::ENOENT);
        let down = RemoteError::Unavailable {
            remote: "r".into(),
            detail: "refused".into(),
        };
        assert_eq!(FsError::Remote(down).errno(), libc::EIO);
    }
}
