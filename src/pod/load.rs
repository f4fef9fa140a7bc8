//! Loading a version of a pod into a local directory.
//!
//! The version's manifest is compared with what the directory holds (rsync's quick check: kind,
//! size, mtime, mode, symlink target). `merge` writes the pod's entries over the directory and
//! keeps everything else; `overwrite` also removes what the version does not have. Each file is
//! written to a temporary name beside its destination, checked (size, CRC-32), then renamed, so a
//! failure never leaves a half-written file. Manifest paths were validated on decode (no absolute
//! paths, no `..`, no NUL, parents are directories of the pod); an existing symlink or file where
//! the pod has a directory is replaced, never followed.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use filetime::FileTime;
use futures::{StreamExt, TryStreamExt};

use super::manifest::{Entry, Kind, VersionObject};
use super::read::{ReadBudget, copy_file, read_version, resolve_version};
use super::scan::{Exclude, Scanned, scan};
use super::{PodError, PodName, PodResult, blocking};
use crate::progress::Progress;
use crate::remote::Remote;

/// Files written at once.
const FILES_IN_FLIGHT: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Strategy {
    /// Write the pod's entries over the directory; keep other files.
    #[default]
    Merge,
    /// Make the directory exactly the version: also remove what it does not have.
    Overwrite,
}

/// What happens to one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Add,
    Change,
    Remove,
}

/// The changes a load makes (or would make, with `--dry-run`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LoadPlan {
    pub version: u64,
    /// Sorted by path.
    pub changes: Vec<(String, Action)>,
    pub unchanged: u64,
    /// Bytes of the files to write.
    pub bytes: u64,
}

impl LoadPlan {
    pub fn count(&self, action: Action) -> usize {
        self.changes.iter().filter(|(_, a)| *a == action).count()
    }
}

/// Loads version `wanted` (default: latest) of `pod` into `dir`.
pub async fn load(
    remote: &Arc<dyn Remote>,
    pod: &PodName,
    wanted: Option<u64>,
    dir: &Path,
    strategy: Strategy,
    dry_run: bool,
    progress: &Arc<dyn Progress>,
) -> PodResult<LoadPlan> {
    let version = resolve_version(remote, pod, wanted).await?;
    let obj = read_version(remote, pod, version).await?;
    let root = dir.to_owned();
    let current = blocking(move || match std::fs::symlink_metadata(&root) {
        Ok(_) => Ok(scan(&root, &Exclude::default())?.entries),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(PodError::io(&root)(e)),
    })
    .await?;
    let plan = plan(version, &obj, &current, strategy);
    if dry_run {
        return Ok(plan);
    }
    apply(remote, pod, &obj, dir, &plan, progress).await?;
    Ok(plan)
}

fn same(e: &Entry, s: &Scanned) -> bool {
    e.kind == s.kind
        && e.mode == s.mode
        && match e.kind {
            Kind::File => e.size == s.size && e.mtime == s.mtime && e.mtime_nsec == s.mtime_nsec,
            Kind::Symlink => e.target == s.target,
            Kind::Dir => true,
        }
}

fn plan(version: u64, obj: &VersionObject, current: &[Scanned], strategy: Strategy) -> LoadPlan {
    let cur: HashMap<&str, &Scanned> = current.iter().map(|s| (s.path.as_str(), s)).collect();
    let mut out = LoadPlan {
        version,
        ..LoadPlan::default()
    };
    for e in &obj.manifest.entries {
        match cur.get(e.path.as_str()) {
            None => out.changes.push((e.path.clone(), Action::Add)),
            Some(s) if same(e, s) => out.unchanged += 1,
            Some(_) => out.changes.push((e.path.clone(), Action::Change)),
        }
        if e.kind == Kind::File && !matches!(cur.get(e.path.as_str()), Some(s) if same(e, s)) {
            out.bytes += e.size;
        }
    }
    if strategy == Strategy::Overwrite {
        let wanted: HashMap<&str, ()> = obj
            .manifest
            .entries
            .iter()
            .map(|e| (e.path.as_str(), ()))
            .collect();
        for s in current {
            if !wanted.contains_key(s.path.as_str()) {
                out.changes.push((s.path.clone(), Action::Remove));
            }
        }
    }
    out.changes.sort();
    out
}

async fn apply(
    remote: &Arc<dyn Remote>,
    pod: &PodName,
    obj: &VersionObject,
    dir: &Path,
    plan: &LoadPlan,
    progress: &Arc<dyn Progress>,
) -> PodResult<()> {
    let entries: HashMap<&str, &Entry> = obj
        .manifest
        .entries
        .iter()
        .map(|e| (e.path.as_str(), e))
        .collect();
    let touched: Vec<&Entry> = plan
        .changes
        .iter()
        .filter(|(_, a)| *a != Action::Remove)
        .filter_map(|(p, _)| entries.get(p.as_str()).copied())
        .collect();

    // 1. Removals (overwrite), deepest first, and directories, parents first.
    let removals: Vec<PathBuf> = plan
        .changes
        .iter()
        .rev()
        .filter(|(_, a)| *a == Action::Remove)
        .map(|(p, _)| dir.join(p))
        .collect();
    let dirs: Vec<(PathBuf, u32)> = touched
        .iter()
        .filter(|e| e.kind == Kind::Dir)
        .map(|e| (dir.join(&e.path), e.mode))
        .collect();
    let root = dir.to_owned();
    blocking(move || {
        std::fs::create_dir_all(&root).map_err(PodError::io(&root))?;
        for path in &removals {
            remove_any(path)?;
        }
        for (path, mode) in &dirs {
            make_dir(path, *mode)?;
        }
        Ok(())
    })
    .await?;

    // 2. Files and symlinks, several at once.
    progress.start("loading", plan.bytes);
    let budget = ReadBudget::default();
    futures::stream::iter(touched.iter().filter(|e| e.kind != Kind::Dir))
        .map(|e| write_entry(remote, pod, obj.info.version, dir, e, progress, &budget))
        .buffer_unordered(FILES_IN_FLIGHT)
        .try_collect::<()>()
        .await?;
    progress.finish();

    // 3. Directory modes and mtimes, deepest first (writing into a directory changes its mtime).
    let mut dir_times: Vec<(PathBuf, u32, FileTime)> = obj
        .manifest
        .entries
        .iter()
        .filter(|e| e.kind == Kind::Dir)
        .map(|e| {
            (
                dir.join(&e.path),
                e.mode,
                FileTime::from_unix_time(e.mtime, e.mtime_nsec),
            )
        })
        .collect();
    dir_times.reverse();
    blocking(move || {
        for (path, mode, mtime) in &dir_times {
            set_mode(path, *mode)?;
            filetime::set_file_mtime(path, *mtime).map_err(PodError::io(path))?;
        }
        Ok(())
    })
    .await
}

/// Removes a file, symlink or whole directory; missing is fine.
fn remove_any(path: &Path) -> PodResult<()> {
    let r = match std::fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match r {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(PodError::io(path)(e)),
        _ => Ok(()),
    }
}

/// Makes `path` a real directory (replacing a file or symlink there) that we can write into.
fn make_dir(path: &Path, mode: u32) -> PodResult<()> {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => {}
        Ok(_) => {
            remove_any(path)?;
            std::fs::create_dir(path).map_err(PodError::io(path))?;
        }
        Err(_) => std::fs::create_dir(path).map_err(PodError::io(path))?,
    }
    // Owner needs rwx while we fill it; the final mode is set at the end.
    set_mode(path, mode | 0o700)
}

fn set_mode(path: &Path, mode: u32) -> PodResult<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(PodError::io(path))
}

/// Writes one file or symlink to a temporary name beside it, then renames it into place.
async fn write_entry(
    remote: &Arc<dyn Remote>,
    pod: &PodName,
    version: u64,
    dir: &Path,
    e: &Entry,
    progress: &Arc<dyn Progress>,
    budget: &ReadBudget,
) -> PodResult<()> {
    let dest = dir.join(&e.path);
    let parent = dest.parent().unwrap_or(dir).to_owned();
    let mtime = FileTime::from_unix_time(e.mtime, e.mtime_nsec);
    match e.kind {
        Kind::Dir => Ok(()),
        Kind::Symlink => {
            let target = e.target.clone().unwrap_or_default();
            blocking(move || {
                let tmp = temp_name(&parent);
                std::os::unix::fs::symlink(&target, &tmp).map_err(PodError::io(&tmp))?;
                let done = filetime::set_symlink_file_times(&tmp, mtime, mtime)
                    .map_err(PodError::io(&tmp))
                    .and_then(|()| replace(&tmp, &dest));
                if done.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                done
            })
            .await
        }
        Kind::File => {
            let p = parent.clone();
            let tmp = blocking(move || {
                tempfile::Builder::new()
                    .prefix(".podfs-load-")
                    .tempfile_in(&p)
                    .map_err(PodError::io(&p))
            })
            .await?;
            let (std_file, tmp_path) = tmp.into_parts();
            let mut file = tokio::fs::File::from_std(std_file);
            let mut counting = ProgressWriter {
                inner: &mut file,
                progress: &**progress,
            };
            copy_file(remote, pod, version, e, &mut counting, budget).await?;
            tokio::io::AsyncWriteExt::flush(&mut file)
                .await
                .map_err(PodError::io(&dest))?;
            let std_file = file.into_std().await;
            let mode = e.mode;
            blocking(move || {
                use std::os::unix::fs::PermissionsExt;
                std_file
                    .set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(PodError::io(&dest))?;
                filetime::set_file_handle_times(&std_file, Some(mtime), Some(mtime))
                    .map_err(PodError::io(&dest))?;
                drop(std_file);
                replace(&tmp_path, &dest)?;
                // The rename consumed the temporary name: disarm its guard.
                let _ = tmp_path.keep();
                Ok(())
            })
            .await
        }
    }
}

/// A unique temporary name in `dir` (for symlinks, which tempfile cannot create).
fn temp_name(dir: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".podfs-load-{}-{n}", std::process::id()))
}

/// Renames `tmp` over `dest`, first removing a directory that is in the way.
fn replace(tmp: &Path, dest: &Path) -> PodResult<()> {
    if std::fs::symlink_metadata(dest).is_ok_and(|md| md.is_dir()) {
        remove_any(dest)?;
    }
    std::fs::rename(tmp, dest).map_err(PodError::io(dest))
}

/// An `AsyncWrite` that reports bytes written to a progress bar.
struct ProgressWriter<'a, W> {
    inner: &'a mut W,
    progress: &'a dyn Progress,
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for ProgressWriter<'_, W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let r = std::pin::Pin::new(&mut *self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = r {
            self.progress.advance(n as u64);
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}
