//! Pods: the v1 format (manifest, state and version zips), and the save, load, list and
//! delete operations on any [`Remote`](crate::remote::Remote).

pub mod blocks;
pub mod delete;
pub mod fence;
pub mod load;
pub mod manifest;
pub mod read;
pub mod save;
pub mod scan;
pub mod state;

use std::path::PathBuf;

pub use crate::name::{NameError, PodName, PodRef};
use crate::remote::RemoteError;

/// Errors of pod operations.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(
        "pod {pod:?} does not exist on remote {remote:?}: `podfs list {remote}` shows its pods"
    )]
    NoSuchPod { pod: String, remote: String },
    #[error(
        "pod {pod:?} has no version {version} on remote {remote:?}: `podfs versions {pod} {remote}` lists them"
    )]
    NoSuchVersion {
        pod: String,
        version: u64,
        remote: String,
    },
    #[error("version {version} of pod {pod:?} is corrupt: {reason}")]
    Corrupt {
        pod: String,
        version: u64,
        reason: String,
    },
    #[error(
        "unsafe path {path:?} in version {version} of pod {pod:?}: {reason}; refusing to load it"
    )]
    UnsafePath {
        pod: String,
        version: u64,
        path: String,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error("refusing to load into {path}: {reason}")]
    Refused { path: PathBuf, reason: String },
    #[error("interrupted: {0}")]
    Cancelled(&'static str),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("gave up saving after {0} attempts: other writers keep taking the next version number")]
    TooManyConflicts(u32),
    #[error(
        "pod {pod:?} on remote {remote:?} already has version {last}, the largest number there is: no number is left for a new version (save under another pod name)"
    )]
    NoVersionNumberLeft {
        pod: String,
        remote: String,
        last: u64,
    },
}

impl PodError {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> PodError {
        let path = path.into();
        move |source| PodError::Io { path, source }
    }
}

pub type PodResult<T> = Result<T, PodError>;

/// Runs blocking work (file system walks, zipping) off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> PodResult<T> + Send + 'static,
) -> PodResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PodError::Io {
            path: PathBuf::from("<background task>"),
            source: std::io::Error::other(e),
        })?
}
