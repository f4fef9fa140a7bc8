//! The `file://` backend (and the built-in `default` remote): objects are files in one directory.
//!
//! Objects appear atomically and only if absent: each is written to a temporary file in the same
//! directory, synced, then hard-linked to its final name (`link` fails with `EEXIST` instead of
//! replacing), so a crashed save leaves at most a `.tmp-*` file and never a partial object.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    MAX_VERSION_OBJECT, ObjectId, ObjectKind, Remote, RemoteError, RemoteResult, StoredState,
    VersionId, check_new_state, numbers_among, object_name, parse_object_name, pods_among,
    version_object_too_large,
};
use crate::name::PodName;
use crate::progress::Progress;

#[derive(Debug)]
pub struct FileRemote {
    name: String,
    dir: PathBuf,
}

impl FileRemote {
    pub fn new(name: &str, dir: &Path) -> Self {
        Self {
            name: name.to_owned(),
            dir: dir.to_owned(),
        }
    }

    fn path(&self, pod: &PodName, kind: ObjectKind, n: u64) -> PathBuf {
        self.dir.join(object_name(pod, kind, n))
    }

    /// Every parsed object name in the directory; a missing directory is an empty remote.
    async fn objects(&self) -> RemoteResult<Vec<ObjectId>> {
        let dir = self.dir.clone();
        blocking(move || {
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(RemoteError::io(format!("listing {}", dir.display()))(e)),
            };
            let mut out = Vec::new();
            for entry in rd {
                let entry = entry.map_err(RemoteError::io(format!("listing {}", dir.display())))?;
                if let Some(parsed) = entry.file_name().to_str().and_then(parse_object_name) {
                    out.push(parsed);
                }
            }
            Ok(out)
        })
        .await
    }

    fn not_found(&self, what: String) -> RemoteError {
        RemoteError::NotFound(format!("{what} on remote {:?}", self.name))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> RemoteResult<T> + Send + 'static,
) -> RemoteResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RemoteError::Io {
            context: "background task".into(),
            source: io::Error::other(e),
        })?
}

/// Opens object `path` for reading, with its size. Refuses anything but a regular file (a FIFO
/// would block forever, a device never ends) without blocking on the open.
fn open_object(remote: &str, path: &Path, missing: RemoteError) -> RemoteResult<(File, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing),
        Err(e) => return Err(RemoteError::io(format!("opening {}", path.display()))(e)),
    };
    let md = file
        .metadata()
        .map_err(RemoteError::io(format!("reading {}", path.display())))?;
    if !md.is_file() {
        return Err(RemoteError::Other {
            remote: remote.to_owned(),
            detail: format!(
                "{} is not a regular file: podfs objects are plain files (remove it from the remote's directory)",
                path.display()
            ),
        });
    }
    Ok((file, md.len()))
}

/// Links `tmp` to `dest` only if `dest` is absent, then removes `tmp` and syncs the directory.
fn link_if_absent(tmp: &Path, dest: &Path) -> RemoteResult<()> {
    let linked = std::fs::hard_link(tmp, dest);
    let _ = std::fs::remove_file(tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(RemoteError::AlreadyExists(dest.display().to_string()));
        }
        Err(e) => return Err(RemoteError::io(format!("creating {}", dest.display()))(e)),
    }
    sync_dir(dest)
}

/// Makes a new directory entry for `path` durable.
fn sync_dir(path: &Path) -> RemoteResult<()> {
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(RemoteError::io(format!("syncing {}", dir.display())))?;
    }
    Ok(())
}

/// A temporary file beside `dest`, removed on drop unless linked.
fn temp_beside(dest: &Path) -> RemoteResult<tempfile::NamedTempFile> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(RemoteError::io(format!("creating {}", dir.display())))?;
    tempfile::Builder::new()
        .prefix(".tmp-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .tempfile_in(dir)
        .map_err(RemoteError::io(format!(
            "creating a file in {}",
            dir.display()
        )))
}

#[async_trait]
impl Remote for FileRemote {
    fn name(&self) -> &str {
        &self.name
    }

    async fn list_pods(&self) -> RemoteResult<Vec<(PodName, u64)>> {
        Ok(pods_among(self.objects().await?))
    }

    async fn list_versions(&self, pod: &PodName) -> RemoteResult<Vec<u64>> {
        Ok(numbers_among(
            self.objects().await?,
            pod,
            ObjectKind::Version,
        ))
    }

    async fn list_states(&self, pod: &PodName) -> RemoteResult<Vec<u64>> {
        Ok(numbers_among(self.objects().await?, pod, ObjectKind::State))
    }

    async fn read_version(&self, pod: &PodName, version: u64) -> RemoteResult<Bytes> {
        let path = self.path(pod, ObjectKind::Version, version);
        let missing = self.not_found(format!("version {version} of pod {pod:?}"));
        let remote = self.name.clone();
        blocking(move || {
            let (file, size) = open_object(&remote, &path, missing)?;
            let what = path.display().to_string();
            if size > MAX_VERSION_OBJECT {
                return Err(version_object_too_large(&remote, &what, size));
            }
            let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            io::Read::read_to_end(&mut io::Read::take(&file, MAX_VERSION_OBJECT + 1), &mut buf)
                .map_err(RemoteError::io(format!("reading {what}")))?;
            if buf.len() as u64 > MAX_VERSION_OBJECT {
                return Err(version_object_too_large(&remote, &what, buf.len() as u64));
            }
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn version_id(&self, pod: &PodName, version: u64) -> RemoteResult<Option<VersionId>> {
        let path = self.path(pod, ObjectKind::Version, version);
        blocking(move || match std::fs::metadata(&path) {
            // A commit creates a new file (link or rename), so a new object is a new inode.
            Ok(m) => Ok(Some(VersionId {
                id: format!(
                    "{}:{}:{}:{}.{}",
                    m.dev(),
                    m.ino(),
                    m.size(),
                    m.mtime(),
                    m.mtime_nsec()
                ),
                size: m.size(),
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RemoteError::io(format!("reading {}", path.display()))(e)),
        })
        .await
    }

    async fn read_state(
        &self,
        pod: &PodName,
        _via: u64,
        state: u64,
        range: Range<u64>,
    ) -> RemoteResult<Bytes> {
        let path = self.path(pod, ObjectKind::State, state);
        let missing = self.not_found(format!("state object {state} of pod {pod:?}"));
        let remote = self.name.clone();
        blocking(move || {
            let (file, size) = open_object(&remote, &path, missing)?;
            if range.start > range.end || range.end > size {
                return Err(RemoteError::Other {
                    remote,
                    detail: format!(
                        "bytes {}..{} are past the end of {} ({size} bytes): the state object is truncated, or its version points outside it",
                        range.start,
                        range.end,
                        path.display()
                    ),
                });
            }
            // Bounded by `size`, which the object really has.
            let mut buf = vec![0u8; (range.end - range.start) as usize];
            file.read_exact_at(&mut buf, range.start)
                .map_err(RemoteError::io(format!("reading {}", path.display())))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn put_state(
        &self,
        pod: &PodName,
        version: u64,
        file: &Path,
        progress: Arc<dyn Progress>,
    ) -> RemoteResult<StoredState> {
        let dest = self.path(pod, ObjectKind::State, version);
        let src = file.to_owned();
        let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        let put = blocking(move || {
            if dest.exists() {
                return Err(RemoteError::AlreadyExists(dest.display().to_string()));
            }
            // Same file system (the default remote and its staging dir): link the staged file
            // itself, with no copy. Objects are world-readable like any file a user shares.
            use std::os::unix::fs::PermissionsExt;
            let shared = std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o644))
                .and_then(|()| File::open(&src)?.sync_all());
            if shared.is_ok() {
                std::fs::create_dir_all(dest.parent().unwrap_or(Path::new("."))).map_err(
                    RemoteError::io(format!("creating the directory of {}", dest.display())),
                )?;
                match std::fs::hard_link(&src, &dest) {
                    Ok(()) => return sync_dir(&dest),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        return Err(RemoteError::AlreadyExists(dest.display().to_string()));
                    }
                    Err(_) => {} // another file system: copy below
                }
            }
            let tmp = temp_beside(&dest)?;
            std::fs::copy(&src, tmp.path())
                .and_then(|_| tmp.as_file().sync_all())
                .map_err(RemoteError::io(format!("copying to {}", dest.display())))?;
            let (_f, tmp_path) = tmp.keep().map_err(|e| RemoteError::Io {
                context: "keeping a temporary file".into(),
                source: e.error,
            })?;
            link_if_absent(&tmp_path, &dest)
        })
        .await;
        put?;
        progress.advance(size);
        Ok(StoredState::named(pod, version))
    }

    async fn commit_version(
        &self,
        pod: &PodName,
        version: u64,
        version_zip: Bytes,
        states: &[u64],
        new_state: Option<&StoredState>,
        _parent: Option<u64>,
    ) -> RemoteResult<()> {
        check_new_state(&self.name, pod, version, states, new_state)?;
        let dest = self.path(pod, ObjectKind::Version, version);
        blocking(move || {
            let mut tmp = temp_beside(&dest)?;
            io::Write::write_all(&mut tmp, &version_zip)
                .and_then(|()| tmp.as_file().sync_all())
                .map_err(RemoteError::io(format!("writing {}", dest.display())))?;
            let (_f, tmp_path) = tmp.keep().map_err(|e| RemoteError::Io {
                context: "keeping a temporary file".into(),
                source: e.error,
            })?;
            link_if_absent(&tmp_path, &dest)
        })
        .await
    }

    async fn delete_version(&self, pod: &PodName, version: u64) -> RemoteResult<()> {
        remove(self.path(pod, ObjectKind::Version, version)).await
    }

    async fn delete_state(&self, pod: &PodName, state: u64) -> RemoteResult<()> {
        remove(self.path(pod, ObjectKind::State, state)).await
    }
}

async fn remove(path: PathBuf) -> RemoteResult<()> {
    blocking(move || match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RemoteError::io(format!("removing {}", path.display()))(e)),
    })
    .await
}
