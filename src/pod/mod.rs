//! Pods: names, the v1 format (manifest, state and version zips), and the save, load, list and
//! delete operations on any [`Remote`](crate::remote::Remote).

pub mod delete;
pub mod fence;
pub mod load;
pub mod manifest;
pub mod read;
pub mod save;
pub mod scan;
pub mod state;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::remote::RemoteError;

/// A pod name: `^[A-Za-z0-9_-]+$`, at most 128 characters.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodName(String);

/// Shown as the quoted name (`"my-pod"`), as messages quote names.
impl fmt::Debug for PodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl PodName {
    pub fn new(name: &str) -> Result<Self, PodError> {
        let ok = !name.is_empty()
            && name.len() <= 128
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(PodError::InvalidName(name.to_owned()))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `POD` or `POD:N` on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub pod: PodName,
    pub version: Option<u64>,
}

impl FromStr for PodRef {
    type Err = PodError;
    fn from_str(s: &str) -> Result<Self, PodError> {
        match s.split_once(':') {
            None => Ok(Self {
                pod: PodName::new(s)?,
                version: None,
            }),
            Some((pod, v)) => {
                let pod = PodName::new(pod)?;
                let version = v
                    .parse::<u64>()
                    .ok()
                    .filter(|&n| n > 0 && !v.starts_with('+'))
                    .ok_or_else(|| PodError::InvalidVersion(v.to_owned()))?;
                Ok(Self {
                    pod,
                    version: Some(version),
                })
            }
        }
    }
}

/// Errors of pod operations.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("invalid pod name {0:?}: use letters, digits, '-' and '_' (at most 128 characters)")]
    InvalidName(String),
    #[error("invalid version {0:?}: versions are whole numbers from 1 (POD:N)")]
    InvalidVersion(String),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_refs() {
        let r: PodRef = "my-pod:3".parse().unwrap();
        assert_eq!(r.pod.as_str(), "my-pod");
        assert_eq!(r.version, Some(3));
        assert_eq!("a-state-1".parse::<PodRef>().unwrap().version, None);
        for bad in [
            "p:0", "p:", "p:x", "p:-1", "p:+1", ":1", "a b", "a/b", "a.b", "",
        ] {
            assert!(bad.parse::<PodRef>().is_err(), "{bad}");
        }
    }
}
