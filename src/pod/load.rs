//! Loading a version of a pod into a local directory.
//!
//! The version's manifest is compared with what the directory holds (rsync's quick check: kind,
//! size, mtime, mode, symlink target). `merge` writes the pod's entries over the directory and
//! keeps everything else; `overwrite` also removes what the version does not have. Each file is
//! written to a temporary name beside its destination, checked (size, CRC-32), then renamed, so a
//! failure never leaves a half-written file. Manifest paths were validated on decode (no absolute
//! paths, no `..`, no NUL, parents are directories of the pod); an existing symlink or file where
//! the pod has a directory is replaced, never followed.

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use filetime::FileTime;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::fence::{self, Fences, Reason};
use super::manifest::{DataRef, Entry, Kind, VersionObject, find};
use super::read::{
    CHUNK, ReadBudget, copy_file, decode_into, fetch, read_version, resolve_version,
};
use super::scan::{Scan, ScanOptions, scan};
use super::{PodError, PodName, PodResult, blocking};
use crate::progress::Progress;
use crate::remote::{Remote, RemoteError};

/// Files written at once.
const FILES_IN_FLIGHT: usize = 8;

/// Permission bits a load does not restore unless asked: pods store no owners, so a setuid or
/// setgid bit would apply to whoever runs the load (root, often).
pub const SETID_BITS: u32 = 0o6000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Write the pod's entries over the directory; keep other files.
    #[default]
    Merge,
    /// Make the directory exactly the version: also remove what it does not have.
    Overwrite,
}

/// Settings for a load.
#[derive(Debug, Clone, Default)]
pub struct LoadParams {
    pub strategy: Strategy,
    /// Only plan: write nothing.
    pub dry_run: bool,
    /// Restore setuid/setgid bits (off: they are cleared).
    pub keep_setid: bool,
    /// Neither remove nor write into directories on another file system than the target's.
    pub one_file_system: bool,
    /// Directories a load never writes into or removes, wherever they are (podfs's volume dir,
    /// its staging and cache dirs). A target inside one is refused.
    pub protect: Vec<PathBuf>,
    /// Stops the load between files; it then fails with [`PodError::Cancelled`].
    pub cancel: CancellationToken,
}

/// What happens to one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Add,
    Change,
    Remove,
}

/// A path of the target that a load leaves alone, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LeftAlone {
    pub path: String,
    pub reason: String,
}

/// The changes a load makes (or would make, with `--dry-run`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LoadPlan {
    pub version: u64,
    /// Sorted by path (names that are not UTF-8 are shown lossily).
    pub changes: Vec<(String, Action)>,
    pub unchanged: u64,
    /// Bytes of the files to write.
    pub bytes: u64,
    /// Fenced paths: neither written nor removed.
    pub left_alone: Vec<LeftAlone>,
    /// Files and directories whose setuid/setgid bits are not restored.
    pub setid_cleared: u64,
    /// What to remove, as real paths, deepest first.
    #[serde(skip)]
    removals: Vec<PathBuf>,
    /// The pod's directories outside every fence, whose modes and mtimes are set.
    #[serde(skip)]
    dirs: Vec<String>,
}

impl LoadPlan {
    pub fn count(&self, action: Action) -> usize {
        self.changes.iter().filter(|(_, a)| *a == action).count()
    }
}

/// Loads version `wanted` (default: latest) of `pod` into `dir`.
pub async fn load(
    remote: &dyn Remote,
    pod: &PodName,
    wanted: Option<u64>,
    dir: &Path,
    params: &LoadParams,
    progress: &Arc<dyn Progress>,
) -> PodResult<LoadPlan> {
    let target = fence::absolute(dir).map_err(PodError::io(dir))?;
    let fences = Fenced::new(&target, params)?;
    let version = resolve_version(remote, pod, wanted).await?;
    let mut obj = read_version(remote, pod, version).await?;
    let root = dir.to_owned();
    let opts = ScanOptions {
        fences: Fences::new(&target, &params.protect, params.one_file_system),
        lenient_names: true,
    };
    let current = blocking(move || match std::fs::symlink_metadata(&root) {
        Ok(_) => scan(&root, &opts),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Scan::default()),
        Err(e) => Err(PodError::io(&root)(e)),
    })
    .await?;
    let fences = fences.with_scan(dir, &current);
    let setid_cleared = if params.keep_setid {
        0
    } else {
        clear_setid(&mut obj)
    };
    let mut plan = plan(version, &obj, dir, &current, &fences, params.strategy);
    plan.setid_cleared = setid_cleared;
    if params.dry_run {
        return Ok(plan);
    }
    apply(remote, pod, &obj, dir, &plan, &params.cancel, progress).await?;
    Ok(plan)
}

/// Clears the setuid/setgid bits of every entry; returns how many had one.
fn clear_setid(obj: &mut VersionObject) -> u64 {
    let mut n = 0;
    for e in &mut obj.manifest.entries {
        if e.mode & SETID_BITS != 0 {
            e.mode &= !SETID_BITS;
            n += 1;
        }
    }
    n
}

/// The relative paths under the target that a load must leave alone.
struct Fenced {
    paths: Vec<(String, Reason)>,
}

impl Fenced {
    /// Refuses a target inside a protected directory or a podfs mount, and overwriting `/`;
    /// fences the protected directories and podfs mounts that lie inside the target.
    fn new(target: &Path, params: &LoadParams) -> PodResult<Self> {
        let refuse = |reason: String| PodError::Refused {
            path: target.to_owned(),
            reason,
        };
        if params.strategy == Strategy::Overwrite && target == Path::new("/") {
            return Err(refuse(
                "overwrite would remove everything the pod does not hold: load into a directory, or use --strategy merge".into(),
            ));
        }
        if let Some(m) = fence::podfs_mount_holding(target) {
            return Err(refuse(format!(
                "it is inside the podfs mount {}: load into a local directory",
                m.point.display()
            )));
        }
        let mut fenced = Self { paths: Vec::new() };
        for dir in &params.protect {
            let abs = fence::absolute(dir).map_err(PodError::io(dir))?;
            if fence::is_within(target, &abs) {
                return Err(refuse(format!(
                    "it is inside podfs's own volume dir {}: choose another directory",
                    abs.display()
                )));
            }
            fenced.add(target, &abs, Reason::Volume);
        }
        for m in fence::mounts().iter().filter(|m| m.is_podfs()) {
            fenced.add(target, &m.point, Reason::PodfsMount);
        }
        Ok(fenced)
    }

    /// Fences `abs` if it lies below `target`.
    fn add(&mut self, target: &Path, abs: &Path, why: Reason) {
        if let Ok(rel) = abs.strip_prefix(target)
            && let Some(rel) = rel.to_str()
            && !rel.is_empty()
            && !self.paths.iter().any(|(p, _)| p == rel)
        {
            self.paths.push((rel.to_owned(), why));
        }
    }

    /// Adds what the scan of the target left out (mount points, other file systems).
    fn with_scan(mut self, dir: &Path, scan: &Scan) -> Self {
        for s in &scan.skipped {
            if let Some(why) = s.fence {
                self.add(dir, &s.path, why);
            }
        }
        self
    }

    /// The fence `path` is at or below.
    fn inside(&self, path: &str) -> Option<&(String, Reason)> {
        self.paths.iter().find(|(f, _)| {
            path == f
                || path
                    .strip_prefix(f.as_str())
                    .is_some_and(|r| r.starts_with('/'))
        })
    }

    /// The fence `path` holds (so it must stay the directory it is).
    fn holds(&self, path: &str) -> Option<&(String, Reason)> {
        self.paths
            .iter()
            .find(|(f, _)| f.strip_prefix(path).is_some_and(|r| r.starts_with('/')))
    }
}

/// rsync's quick check: the same kind, mode and, for a file, size and mtime; for a symlink,
/// target. Directory mtimes are not compared (loading into a directory changes them).
fn same(e: &Entry, s: &Entry) -> bool {
    e.kind == s.kind
        && e.mode == s.mode
        && match e.kind {
            Kind::File => e.size == s.size && e.mtime == s.mtime && e.mtime_nsec == s.mtime_nsec,
            Kind::Symlink => e.target == s.target,
            Kind::Dir => true,
        }
}

fn plan(
    version: u64,
    obj: &VersionObject,
    dir: &Path,
    current: &Scan,
    fences: &Fenced,
    strategy: Strategy,
) -> LoadPlan {
    let mut out = LoadPlan {
        version,
        ..LoadPlan::default()
    };
    let mut left_alone = |path: &str, reason: String| {
        if !out.left_alone.iter().any(|l| l.path == path) {
            out.left_alone.push(LeftAlone {
                path: path.to_owned(),
                reason,
            });
        }
    };
    let holds = |why: Reason| format!("it holds {}", why.describe());
    let mut changes = Vec::new();
    let mut bytes = 0;
    let mut unchanged = 0;
    let mut dirs = Vec::new();
    for e in &obj.manifest.entries {
        if let Some((fence, why)) = fences.inside(&e.path) {
            left_alone(fence, why.describe().to_owned());
            continue;
        }
        if e.kind == Kind::Dir {
            dirs.push(e.path.clone());
        }
        if e.kind != Kind::Dir
            && let Some((_, why)) = fences.holds(&e.path)
        {
            left_alone(&e.path, holds(*why));
            continue;
        }
        let action = match find(&current.entries, &e.path) {
            None => Action::Add,
            Some(s) if same(e, s) => {
                unchanged += 1;
                continue;
            }
            Some(_) => Action::Change,
        };
        changes.push((e.path.clone(), action));
        if e.kind == Kind::File {
            bytes += e.size;
        }
    }
    let mut removals = Vec::new();
    if strategy == Strategy::Overwrite {
        // What overwrite would otherwise have removed.
        for s in &current.skipped {
            if let (Some(why), Ok(rel)) = (s.fence, s.path.strip_prefix(dir)) {
                left_alone(&rel.to_string_lossy(), why.describe().to_owned());
            }
        }
        for s in &current.entries {
            if obj.manifest.get(&s.path).is_some() {
                continue;
            }
            if let Some((_, why)) = fences.holds(&s.path) {
                left_alone(&s.path, holds(*why));
                continue;
            }
            changes.push((s.path.clone(), Action::Remove));
            removals.push(dir.join(&s.path));
        }
        for path in &current.foreign {
            let shown = path.strip_prefix(dir).unwrap_or(path).to_string_lossy();
            changes.push((shown.into_owned(), Action::Remove));
            removals.push(path.clone());
        }
    }
    changes.sort();
    // Deepest first: a directory's contents before the directory.
    removals.sort_by(|a, b| b.cmp(a));
    out.changes = changes;
    out.bytes = bytes;
    out.unchanged = unchanged;
    out.removals = removals;
    out.dirs = dirs;
    out
}

async fn apply(
    remote: &dyn Remote,
    pod: &PodName,
    obj: &VersionObject,
    dir: &Path,
    plan: &LoadPlan,
    cancel: &CancellationToken,
    progress: &Arc<dyn Progress>,
) -> PodResult<()> {
    let touched: Vec<&Entry> = plan
        .changes
        .iter()
        .filter(|(_, a)| *a != Action::Remove)
        .filter_map(|(p, _)| obj.manifest.get(p))
        .collect();

    // 1. Removals (overwrite), deepest first, and directories, parents first.
    let removals = plan.removals.clone();
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

    // 2. Files and symlinks, several at once, until cancelled.
    progress.start("loading", plan.bytes);
    let budget = ReadBudget::default();
    let ctx = WriteCtx {
        remote,
        pod,
        via: obj.info.version,
        dir,
        progress,
        budget: &budget,
    };
    // After a failure no new job starts, but the jobs in flight finish (or fail) before load
    // returns: a file being written on the blocking pool is renamed or removed by then, never
    // left half-written behind the caller's back.
    let failed = std::sync::atomic::AtomicBool::new(false);
    let mut first_error = None;
    let mut results = std::pin::pin!(
        futures::stream::iter(jobs(&touched))
            .map(|job| async {
                if failed.load(std::sync::atomic::Ordering::Relaxed) {
                    return Ok(());
                }
                let r = ctx.run(job).await;
                if r.is_err() {
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                r
            })
            .buffer_unordered(FILES_IN_FLIGHT)
            .take_until(cancel.cancelled())
    );
    while let Some(r) = results.next().await {
        if let Err(e) = r {
            first_error.get_or_insert(e);
        }
    }
    progress.finish();
    if let Some(e) = first_error {
        return Err(e);
    }
    if cancel.is_cancelled() {
        return Err(PodError::Cancelled(
            "the files written so far are complete; the rest were not loaded",
        ));
    }

    // 3. Directory modes and mtimes, deepest first (writing into a directory changes its mtime).
    let mut dir_times: Vec<(PathBuf, u32, FileTime)> = plan
        .dirs
        .iter()
        .filter_map(|p| obj.manifest.get(p))
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

/// Small files: read together with their neighbours and decoded in memory.
const SMALL_CSIZE: u64 = 1 << 20;
const SMALL_SIZE: u64 = 4 << 20;
/// Bytes between two small files that a coalesced read may skip over (zip local headers).
const MAX_GAP: u64 = 64 << 10;

/// One unit of load work.
enum Job<'a> {
    Symlink(&'a Entry),
    /// A large file: streamed by ranges.
    Large(&'a Entry),
    /// Small files lying close together in one state object: one range read for all.
    Batch {
        state: u64,
        range: Range<u64>,
        entries: Vec<&'a Entry>,
    },
}

/// Groups the files and symlinks to write into jobs, coalescing neighbouring small files so a
/// tree of many small files costs a few range requests, not one each.
fn jobs<'a>(touched: &[&'a Entry]) -> Vec<Job<'a>> {
    let mut jobs = Vec::new();
    let mut small: Vec<(&'a Entry, &'a DataRef)> = Vec::new();
    for &e in touched {
        match (e.kind, &e.data) {
            (Kind::Symlink, _) => jobs.push(Job::Symlink(e)),
            (Kind::File, Some(d)) if d.csize <= SMALL_CSIZE && e.size <= SMALL_SIZE => {
                small.push((e, d))
            }
            (Kind::File, _) => jobs.push(Job::Large(e)),
            (Kind::Dir, _) => {}
        }
    }
    small.sort_by_key(|(_, d)| (d.state, d.offset));
    for (e, d) in small {
        let end = d.range().end;
        if let Some(Job::Batch {
            state,
            range,
            entries,
        }) = jobs.last_mut()
            && *state == d.state
            && d.offset >= range.end
            && d.offset - range.end <= MAX_GAP
            && end - range.start <= CHUNK
        {
            range.end = end;
            entries.push(e);
            continue;
        }
        jobs.push(Job::Batch {
            state: d.state,
            range: d.offset..end,
            entries: vec![e],
        });
    }
    jobs
}

/// What writing files needs, shared by all jobs of a load.
struct WriteCtx<'a> {
    remote: &'a dyn Remote,
    pod: &'a PodName,
    via: u64,
    dir: &'a Path,
    progress: &'a Arc<dyn Progress>,
    budget: &'a ReadBudget,
}

impl WriteCtx<'_> {
    async fn run(&self, job: Job<'_>) -> PodResult<()> {
        match job {
            Job::Symlink(e) => self.write_symlink(e).await,
            Job::Large(e) => self.write_large(e).await,
            Job::Batch {
                state,
                range,
                entries,
            } => {
                let chunk = fetch(
                    self.remote,
                    self.pod,
                    self.via,
                    state,
                    range.clone(),
                    self.budget,
                )
                .await
                .map_err(|e| match e {
                    RemoteError::NotFound(what) => PodError::Corrupt {
                        pod: self.pod.to_string(),
                        version: self.via,
                        reason: format!("a state object is missing ({what})"),
                    },
                    e => e.into(),
                })?;
                for e in entries {
                    let Some(d) = &e.data else { continue };
                    let part = chunk.part(d.offset - range.start, d.csize);
                    let mut bytes = Vec::with_capacity(usize::try_from(e.size).unwrap_or(0));
                    let one = futures::stream::once(std::future::ready(Ok(part)));
                    decode_into(self.pod, self.via, e, one, &mut bytes).await?;
                    self.progress.advance(bytes.len() as u64);
                    let (dest, mode, mtime) = self.target(e);
                    blocking(move || write_small(&dest, &bytes, mode, mtime)).await?;
                }
                Ok(())
            }
        }
    }

    fn target(&self, e: &Entry) -> (PathBuf, u32, FileTime) {
        (
            self.dir.join(&e.path),
            e.mode,
            FileTime::from_unix_time(e.mtime, e.mtime_nsec),
        )
    }

    async fn write_symlink(&self, e: &Entry) -> PodResult<()> {
        let (dest, _, mtime) = self.target(e);
        let target = e.target.clone().unwrap_or_default();
        blocking(move || {
            let tmp = temp_name(dest.parent().unwrap_or(Path::new(".")));
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

    /// Streams a large file into a temporary file beside it, then renames it into place.
    async fn write_large(&self, e: &Entry) -> PodResult<()> {
        let (dest, mode, mtime) = self.target(e);
        let parent = dest.parent().unwrap_or(self.dir).to_owned();
        let tmp = blocking(move || temp_file(&parent)).await?;
        let (std_file, tmp_path) = tmp.into_parts();
        let mut file = tokio::fs::File::from_std(std_file);
        let mut counting = ProgressWriter {
            inner: &mut file,
            progress: &**self.progress,
        };
        copy_file(
            self.remote,
            self.pod,
            self.via,
            e,
            &mut counting,
            self.budget,
        )
        .await?;
        tokio::io::AsyncWriteExt::flush(&mut file)
            .await
            .map_err(PodError::io(&dest))?;
        let std_file = file.into_std().await;
        blocking(move || finish_file(std_file, tmp_path, &dest, mode, mtime)).await
    }
}

fn temp_file(dir: &Path) -> PodResult<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(".podfs-load-")
        .tempfile_in(dir)
        .map_err(PodError::io(dir))
}

/// Writes a small file's verified bytes beside `dest`, then renames it into place.
fn write_small(dest: &Path, bytes: &[u8], mode: u32, mtime: FileTime) -> PodResult<()> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    let tmp = temp_file(parent)?;
    let (mut file, tmp_path) = tmp.into_parts();
    std::io::Write::write_all(&mut file, bytes).map_err(PodError::io(dest))?;
    finish_file(file, tmp_path, dest, mode, mtime)
}

/// Sets mode and mtime on a written temporary file and renames it over `dest`.
fn finish_file(
    file: std::fs::File,
    tmp_path: tempfile::TempPath,
    dest: &Path,
    mode: u32,
    mtime: FileTime,
) -> PodResult<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(PodError::io(dest))?;
    filetime::set_file_handle_times(&file, Some(mtime), Some(mtime)).map_err(PodError::io(dest))?;
    drop(file);
    replace(&tmp_path, dest)?;
    // The rename consumed the temporary name: disarm its guard.
    let _ = tmp_path.keep();
    Ok(())
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
