//! The pod-level storage interface every backend implements, and the object names of format v1.
//!
//! A [`Remote`] stores, per pod, version objects (the commit records) and state objects (file
//! bytes). It is shared as `Arc<dyn Remote>` by many tasks at once. Vendor errors never leave this
//! module tree: each backend classifies them into [`RemoteError`].

pub mod failfast;
pub mod file;
pub mod memory;
pub mod metered;
pub mod oras;
pub mod s3;

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::config::RemoteUrl;
use crate::name::PodName;
use crate::progress::Progress;

/// How far a file being written is, for [`Remote::put_state_growing`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Growing {
    /// Bytes from the start that are in the file (flushed to the OS).
    pub written: u64,
    /// Bytes among those that may still change (a zip entry's header, rewritten once the entry
    /// is done).
    pub open: Option<std::ops::Range<u64>>,
    /// The file's length, once it is complete: nothing changes any more.
    pub end: Option<u64>,
    /// About how long it will be (for part sizes).
    pub expected: u64,
}

impl Growing {
    /// Whether bytes `range` are written and final.
    pub fn settled(&self, range: &std::ops::Range<u64>) -> bool {
        if let Some(end) = self.end {
            return range.end <= end;
        }
        range.end <= self.written
            && self
                .open
                .as_ref()
                .is_none_or(|o| o.end <= range.start || range.end <= o.start)
    }
}

/// What went wrong talking to a remote, classified so callers can act on it.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("access denied by remote {remote:?}: {detail} (check its credentials)")]
    Denied { remote: String, detail: String },
    #[error("remote {remote:?} is unavailable: {detail}")]
    Unavailable { remote: String, detail: String },
    #[error("remote {remote:?}: {detail}")]
    Other { remote: String, detail: String },
    #[error("cancelled")]
    Cancelled,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl RemoteError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> RemoteError {
        let context = context.into();
        move |source| RemoteError::Io { context, source }
    }
}

pub type RemoteResult<T> = Result<T, RemoteError>;

/// A state object [`Remote::put_state`] stored, handed to [`Remote::commit_version`] of the
/// version that introduces it. It carries what the backend needs to commit (the ORAS layer's
/// digest and size), so nothing is kept inside the remote between the two calls: a save that
/// fails or moves to another number simply drops it. Opaque above `remote/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredState {
    pod: PodName,
    state: u64,
    receipt: Receipt,
}

/// What a backend noted about an upload, for its own commit.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Receipt {
    /// The object is found by its name (file, S3, memory).
    Named,
    /// A content-addressed blob (ORAS): its `sha256:` digest and size.
    Blob { digest: String, size: u64 },
}

impl StoredState {
    /// A state object a backend finds again by its name.
    fn named(pod: &PodName, state: u64) -> Self {
        Self {
            pod: pod.clone(),
            state,
            receipt: Receipt::Named,
        }
    }

    /// A content-addressed blob with `digest` (`sha256:…`) of `size` bytes.
    fn blob(pod: &PodName, state: u64, digest: String, size: u64) -> Self {
        Self {
            pod: pod.clone(),
            state,
            receipt: Receipt::Blob { digest, size },
        }
    }

    /// The pod the state object belongs to.
    pub fn pod(&self) -> &PodName {
        &self.pod
    }

    /// The state object's number (`K` of `state-K`).
    pub fn state(&self) -> u64 {
        self.state
    }

    /// The digest and size of the blob, for a backend that stores blobs.
    fn blob_ref(&self) -> Option<(&str, u64)> {
        match &self.receipt {
            Receipt::Named => None,
            Receipt::Blob { digest, size } => Some((digest, *size)),
        }
    }
}

/// Largest version object a backend reads: it is held in memory while it is decoded. About 10
/// million manifest entries (45 bytes each, deflated, measured); docs/FORMAT.md, *Limits*.
/// Backends refuse a larger object before reading it.
pub const MAX_VERSION_OBJECT: u64 = 512 << 20;

/// The error for a version object larger than [`MAX_VERSION_OBJECT`].
pub fn version_object_too_large(remote: &str, what: &str, size: u64) -> RemoteError {
    RemoteError::Other {
        remote: remote.to_owned(),
        detail: format!(
            "{what} is {size} bytes, more than the {MAX_VERSION_OBJECT} a version object may have: it is not a podfs version (remove it, or check who writes to this remote)"
        ),
    }
}

/// What identifies the object of a committed version, and its size in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionId {
    /// Opaque; another object under the same name has another.
    pub id: String,
    pub size: u64,
}

/// A pod-level object store. Versions are immutable once committed.
///
/// Implementations must allow many concurrent calls (the mount issues parallel range reads).
#[async_trait]
pub trait Remote: Send + Sync + std::fmt::Debug {
    /// The remote's configured name, for messages.
    fn name(&self) -> &str;

    /// Pods that have at least one committed version, with their latest version, sorted by
    /// name.
    async fn list_pods(&self) -> RemoteResult<Vec<(PodName, u64)>>;

    /// Committed versions of `pod`, ascending; empty if the pod does not exist.
    async fn list_versions(&self, pod: &PodName) -> RemoteResult<Vec<u64>>;

    /// The whole version object (`localstack-pod-P-version-N.zip`) of a committed version; an
    /// error, before reading it, if it is larger than [`MAX_VERSION_OBJECT`].
    async fn read_version(&self, pod: &PodName, version: u64) -> RemoteResult<Bytes>;

    /// The identity and size of the object of committed version `version`, or `None` if there
    /// is none. Any other object stored under that name later (a pod deleted and saved again
    /// reuses its numbers) has another identity: the ETag on S3, the manifest digest in a
    /// registry, the inode and mtime in a directory. One small request; nothing is downloaded.
    async fn version_id(&self, pod: &PodName, version: u64) -> RemoteResult<Option<VersionId>>;

    /// Bytes `range` of state object `state`, as referenced by committed version `via` (the
    /// ORAS backend finds the blob through `via`'s manifest): exactly those bytes, or an error
    /// (also where the object is shorter than `range`).
    async fn read_state(
        &self,
        pod: &PodName,
        via: u64,
        state: u64,
        range: Range<u64>,
    ) -> RemoteResult<Bytes>;

    /// Stores `file` as state object `version`, only if no state object of that number exists
    /// ([`RemoteError::AlreadyExists`] otherwise). Streams: never holds the whole file in memory.
    /// The caller must not modify `file` afterwards: a backend may link it instead of copying.
    /// `progress` is advanced by the bytes sent (the caller has started it). The returned
    /// [`StoredState`] goes to the [`commit_version`](Remote::commit_version) of version
    /// `version`; the backend keeps nothing of it.
    async fn put_state(
        &self,
        pod: &PodName,
        version: u64,
        file: &Path,
        progress: Arc<dyn Progress>,
    ) -> RemoteResult<StoredState>;

    /// As [`Remote::put_state`], with `file` still being written: `growing` says how far it is
    /// written (and which bytes may still change), and its end once complete. A backend that can
    /// upload while the file grows overrides this (S3: parts go up as they are written); by
    /// default it waits for the end, then calls [`Remote::put_state`]. Fails if the writer stops
    /// without an end (the sender dropped).
    async fn put_state_growing(
        &self,
        pod: &PodName,
        version: u64,
        file: &Path,
        mut growing: tokio::sync::watch::Receiver<Growing>,
        progress: Arc<dyn Progress>,
    ) -> RemoteResult<StoredState> {
        growing
            .wait_for(|g| g.end.is_some())
            .await
            .map_err(|_| RemoteError::Cancelled)?;
        self.put_state(pod, version, file, progress).await
    }

    /// Commits version `version` by creating its version object only if absent
    /// ([`RemoteError::AlreadyExists`] when another writer took the number first). `states` are
    /// the state objects the version refers to (already stored), `parent` its parent version,
    /// `new_state` what `put_state` returned for the version's own state object `version` when
    /// it has one (it must then be in `states`; older states are found through `parent`).
    async fn commit_version(
        &self,
        pod: &PodName,
        version: u64,
        version_zip: Bytes,
        states: &[u64],
        new_state: Option<&StoredState>,
        parent: Option<u64>,
    ) -> RemoteResult<()>;

    /// Removes a version object. Missing is not an error.
    async fn delete_version(&self, pod: &PodName, version: u64) -> RemoteResult<()>;

    /// Removes a state object no remaining version refers to. Missing is not an error.
    async fn delete_state(&self, pod: &PodName, state: u64) -> RemoteResult<()>;

    /// State objects of `pod` that exist, committed or not (used to clean up a deleted pod).
    async fn list_states(&self, pod: &PodName) -> RemoteResult<Vec<u64>>;
}

/// Checks that `new_state` is what `commit_version` of version `version` of `pod` listing
/// `states` may take: state object `version` of `pod`, present exactly when `states` lists
/// `version`. A mismatch is a bug of the caller, refused before anything is written.
pub(crate) fn check_new_state(
    remote: &str,
    pod: &PodName,
    version: u64,
    states: &[u64],
    new_state: Option<&StoredState>,
) -> RemoteResult<()> {
    let listed = states.contains(&version);
    let detail = match new_state {
        Some(s) if s.pod != *pod || s.state != version => format!(
            "cannot commit version {version} of pod {pod:?} with state object {} of pod {:?}: \
             a version can only introduce its own state object",
            s.state, s.pod
        ),
        Some(_) if !listed => format!(
            "cannot commit version {version} of pod {pod:?}: it does not list the state object \
             it uploaded"
        ),
        None if listed => format!(
            "cannot commit version {version} of pod {pod:?}: its state object {version} was not \
             uploaded first"
        ),
        _ => return Ok(()),
    };
    Err(RemoteError::Other {
        remote: remote.to_owned(),
        detail,
    })
}

/// Settings for opening a remote that do not come from its URL.
#[derive(Debug, Clone, Default)]
pub struct OpenParams {
    /// Where large state objects are staged before upload, and where the ORAS backend keeps
    /// whole-blob copies from a registry that ignores `Range`; not used by every backend.
    pub staging_dir: Option<std::path::PathBuf>,
    /// Cancelled on shutdown (SIGINT/SIGTERM): a backend stops long transfers and cleans up
    /// after itself (S3 aborts its multipart upload, ORAS drops its blob upload), then fails
    /// with [`RemoteError::Cancelled`].
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// Opens the backend for a resolved URL.
pub async fn open(
    name: &str,
    url: &RemoteUrl,
    params: &OpenParams,
) -> RemoteResult<Arc<dyn Remote>> {
    match url {
        RemoteUrl::File(path) => Ok(Arc::new(file::FileRemote::new(name, path))),
        RemoteUrl::S3(s3) => Ok(Arc::new(
            s3::S3Remote::new(name, s3)
                .await?
                .with_shutdown(params.shutdown.clone()),
        )),
        RemoteUrl::Oras(o) => {
            let remote = oras::OrasRemote::new(name, o)?.with_shutdown(params.shutdown.clone());
            Ok(Arc::new(match &params.staging_dir {
                Some(dir) => remote.staging_in(dir.clone()),
                None => remote,
            }))
        }
    }
}

/// Which of the two objects of a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    State,
    Version,
}

impl ObjectKind {
    fn as_str(self) -> &'static str {
        match self {
            ObjectKind::State => "state",
            ObjectKind::Version => "version",
        }
    }
}

/// `localstack-pod-P-state-N.zip` or `localstack-pod-P-version-N.zip`.
pub fn object_name(pod: &PodName, kind: ObjectKind, n: u64) -> String {
    format!("localstack-pod-{pod}-{}-{n}.zip", kind.as_str())
}

/// Parses an object name from the right (pod names may contain `-state-`-like text).
pub fn parse_object_name(name: &str) -> Option<(PodName, ObjectKind, u64)> {
    let rest = name.strip_prefix("localstack-pod-")?.strip_suffix(".zip")?;
    let (rest, n) = rest.rsplit_once('-')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || n.starts_with('0') {
        return None;
    }
    let n: u64 = n.parse().ok()?;
    let (pod, kind) = if let Some(pod) = rest.strip_suffix("-state") {
        (pod, ObjectKind::State)
    } else if let Some(pod) = rest.strip_suffix("-version") {
        (pod, ObjectKind::Version)
    } else {
        return None;
    };
    Some((PodName::new(pod).ok()?, kind, n))
}

/// A parsed object name: pod, kind, number.
pub type ObjectId = (PodName, ObjectKind, u64);

/// The pods that have a version object among `objects`, with their latest version, sorted by
/// name (for backends that list flat object names).
pub fn pods_among(objects: impl IntoIterator<Item = ObjectId>) -> Vec<(PodName, u64)> {
    let mut latest = std::collections::BTreeMap::new();
    for (pod, kind, n) in objects {
        if kind == ObjectKind::Version {
            let v = latest.entry(pod).or_insert(n);
            *v = (*v).max(n);
        }
    }
    latest.into_iter().collect()
}

/// The numbers of `pod`'s objects of `kind` among `objects`, ascending and unique.
pub fn numbers_among(
    objects: impl IntoIterator<Item = ObjectId>,
    pod: &PodName,
    kind: ObjectKind,
) -> Vec<u64> {
    let mut v: Vec<u64> = objects
        .into_iter()
        .filter(|(p, k, _)| p == pod && *k == kind)
        .map(|(_, _, n)| n)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_takes_only_the_receipt_of_its_own_state() {
        let (p, q) = (PodName::new("p").unwrap(), PodName::new("q").unwrap());
        let check = |version, states: &[u64], s: Option<&StoredState>| {
            check_new_state("r", &p, version, states, s).map_err(|e| e.to_string())
        };
        let mine = StoredState::blob(&p, 2, "sha256:ab".into(), 7);
        assert_eq!(mine.blob_ref(), Some(("sha256:ab", 7)));
        assert_eq!((mine.pod(), mine.state()), (&p, 2));
        check(2, &[1, 2], Some(&mine)).unwrap();
        check(2, &[1], None).unwrap();
        check(2, &[], None).unwrap();
        let err = check(2, &[1, 2], None).unwrap_err();
        assert!(err.contains("was not uploaded first"), "{err}");
        let err = check(2, &[1], Some(&mine)).unwrap_err();
        assert!(err.contains("does not list"), "{err}");
        // A receipt from before a renumbering, or of another pod, is refused.
        let err = check(3, &[3], Some(&mine)).unwrap_err();
        assert!(err.contains("its own state object"), "{err}");
        let other = StoredState::named(&q, 2);
        assert_eq!(other.blob_ref(), None);
        let err = check(2, &[2], Some(&other)).unwrap_err();
        assert!(err.contains("its own state object"), "{err}");
    }

    #[test]
    fn names_round_trip_and_parse_from_the_right() {
        for pod in ["my-pod", "a-state-1", "x-version-2", "p"] {
            let p = PodName::new(pod).unwrap();
            for kind in [ObjectKind::State, ObjectKind::Version] {
                let name = object_name(&p, kind, 12);
                assert_eq!(parse_object_name(&name), Some((p.clone(), kind, 12)));
            }
        }
        assert_eq!(
            object_name(&PodName::new("my-pod").unwrap(), ObjectKind::State, 1),
            "localstack-pod-my-pod-state-1.zip"
        );
        for bad in [
            "localstack-pod-p-state-0.zip",
            "localstack-pod-p-state-01.zip",
            "localstack-pod-p-other-1.zip",
            "localstack-pod--state-1.zip",
            "localstack-pod-p-state-1.zip.tmp",
            "other",
        ] {
            assert_eq!(parse_object_name(bad), None, "{bad}");
        }
    }
}
