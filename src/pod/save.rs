//! Saving a directory as the next version of a pod.
//!
//! The tree is scanned and compared with the latest version's manifest: a file whose size and
//! mtime are unchanged keeps pointing at its old bytes; new or changed files go into this version's
//! state zip, staged on local disk and uploaded streaming. The version object is then committed
//! only if absent. If another writer took the number, the same snapshot is renumbered and committed
//! as the next one, so concurrent saves never overwrite each other.
//!
//! Every state object gets a fresh random identity when it is uploaded (a state renumbered after
//! a conflict is a new object, with a new identity); a version that reuses older states copies
//! their identities from its parent (docs/FORMAT.md, *State identity*).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::fence::Fences;
use super::manifest::{
    DataRef, Entry, FORMAT, Kind, Manifest, VersionInfo, VersionObject, new_state_id,
};
use super::read::read_version;
use super::scan::{ScanOptions, Skipped, scan};
use super::state::{DEFAULT_COMPRESS_BELOW, StateInput, write_state_zip};
use super::{PodError, PodName, PodResult, blocking};
use tokio_util::sync::CancellationToken;

use crate::progress::{NoProgress, Progress};
use crate::remote::{Growing, Remote, RemoteError};

/// How many times a save moves to the next number before giving up.
const MAX_ATTEMPTS: u32 = 64;

/// Settings for a save.
#[derive(Debug, Clone)]
pub struct SaveParams {
    pub message: String,
    /// Who saved: `user@host`.
    pub creator: String,
    /// Local scratch directory for the state zip.
    pub staging_dir: PathBuf,
    /// Files below this size are deflated, others stored.
    pub compress_below: u64,
    /// Directories never saved (podfs's own volume dir, when it is inside the tree). podfs
    /// mounts are never saved either.
    pub exclude: Vec<PathBuf>,
    /// Leave out directories on another file system than the tree's.
    pub one_file_system: bool,
    /// Stops the save before it commits; it then fails with [`PodError::Cancelled`] and leaves
    /// nothing behind (backends abort their uploads).
    pub cancel: CancellationToken,
}

impl Default for SaveParams {
    fn default() -> Self {
        Self {
            message: String::new(),
            creator: String::new(),
            staging_dir: std::env::temp_dir(),
            compress_below: DEFAULT_COMPRESS_BELOW,
            exclude: Vec::new(),
            one_file_system: false,
            cancel: CancellationToken::new(),
        }
    }
}

/// What a save did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveOutcome {
    /// The new version, or `None` when nothing changed since `previous`.
    pub version: Option<u64>,
    pub previous: Option<u64>,
    pub file_count: u64,
    pub logical_bytes: u64,
    /// Files whose bytes were stored in this version.
    pub changed_files: u64,
    /// Size of the uploaded state object.
    pub stored_bytes: u64,
    /// What the scan left out: sockets, FIFOs and devices, the volume dir, mounts.
    pub skipped: Vec<Skipped>,
}

/// What a save stores: the new version's tree, taken on top of the pod's latest version.
pub trait Changes: Send + Sync {
    /// The new version's entries on top of `parent` (the pod's latest version, if it has one),
    /// sorted by the bytes of their paths. A file whose bytes are to be stored comes with the
    /// local file that holds them (its `data` is ignored); every other file keeps its `data`,
    /// pointing into a state that `parent` or [`Changes::state_id`] names.
    fn on_top_of(&self, parent: Option<&VersionObject>)
    -> PodResult<Vec<(Entry, Option<PathBuf>)>>;

    /// Whether a version another writer commits first is merged: the entries are then taken
    /// again on top of it (a mount's staged changes, per path). Otherwise the same tree is
    /// committed under the next number (a directory saved whole replaces what was there).
    fn merges(&self) -> bool {
        false
    }

    /// The identity of state `state`, which a kept entry points into, when the parent does not
    /// name it (an entry kept from an older version than the parent).
    fn state_id(&self, _state: u64) -> Option<String> {
        None
    }

    /// The local files of [`Changes::on_top_of`] are read: they may change from now on.
    fn zipped(&self) {}
}

/// A directory scanned for `podfs save`: a file whose size and mtime match the parent's entry
/// keeps pointing at its old bytes, every other file is stored from the directory.
struct Scanned {
    root: PathBuf,
    entries: Vec<Entry>,
}

impl Changes for Scanned {
    fn on_top_of(
        &self,
        parent: Option<&VersionObject>,
    ) -> PodResult<Vec<(Entry, Option<PathBuf>)>> {
        let prev = parent.map(|p| &p.manifest);
        Ok(self
            .entries
            .iter()
            .map(|e| {
                let mut e = e.clone();
                if e.kind != Kind::File {
                    return (e, None);
                }
                match prev.and_then(|m| m.get(&e.path)) {
                    Some(p)
                        if p.kind == Kind::File
                            && p.size == e.size
                            && p.mtime == e.mtime
                            && p.mtime_nsec == e.mtime_nsec =>
                    {
                        e.data = p.data.clone();
                        (e, None)
                    }
                    _ => {
                        let source = self.root.join(&e.path);
                        (e, Some(source))
                    }
                }
            })
            .collect())
    }
}

/// Saves `dir` as the next version of `pod` on `remote`.
pub async fn save(
    remote: &dyn Remote,
    pod: &PodName,
    dir: &Path,
    params: &SaveParams,
    progress: &Arc<dyn Progress>,
) -> PodResult<SaveOutcome> {
    // Made first, so an excluded volume dir that holds it exists when the scan looks for it.
    std::fs::create_dir_all(&params.staging_dir).map_err(PodError::io(&params.staging_dir))?;
    let root = dir.to_owned();
    let opts = ScanOptions {
        fences: Fences::new(dir, &params.exclude, params.one_file_system),
        lenient_names: false,
    };
    let scanned = blocking(move || scan(&root, &opts)).await?;
    let changes = Scanned {
        root: dir.to_owned(),
        entries: scanned.entries,
    };
    let (mut outcome, _) = save_changes(remote, pod, &changes, params, progress).await?;
    outcome.skipped = scanned.skipped;
    Ok(outcome)
}

/// Saves `changes` as the next version of `pod` on `remote`: the one save-and-commit path of
/// `podfs save` and of a mount. Returns what it did and, if it committed a version, that
/// version's object.
pub async fn save_changes(
    remote: &dyn Remote,
    pod: &PodName,
    changes: &dyn Changes,
    params: &SaveParams,
    progress: &Arc<dyn Progress>,
) -> PodResult<(SaveOutcome, Option<VersionObject>)> {
    std::fs::create_dir_all(&params.staging_dir).map_err(PodError::io(&params.staging_dir))?;
    let mut previous = remote.list_versions(pod).await?.last().copied();
    let mut prev = match previous {
        Some(v) => Some(read_version(remote, pod, v).await?),
        None => None,
    };
    let plan = Plan::new(changes.on_top_of(prev.as_ref())?);
    let mut outcome = SaveOutcome {
        version: None,
        previous,
        file_count: plan.file_count,
        logical_bytes: plan.entries.iter().map(|e| e.size).sum(),
        changed_files: plan.to_store.len() as u64,
        stored_bytes: 0,
        skipped: Vec::new(),
    };
    if prev
        .as_ref()
        .is_some_and(|p| p.manifest.entries == plan.entries)
    {
        return Ok((outcome, None));
    }

    sweep_staging(&params.staging_dir);
    let staged = tempfile::Builder::new()
        .prefix(STAGED_PREFIX)
        .suffix(".zip")
        .tempfile_in(&params.staging_dir)
        .map_err(PodError::io(&params.staging_dir))?;
    // Held while this save runs, so a sweep by another save leaves the file alone.
    staged
        .as_file()
        .try_lock()
        .map_err(|e| PodError::io(staged.path())(std::io::Error::other(e)))?;
    let mut entries = plan.entries;
    let mut to_store = plan.to_store;
    let has_state = !to_store.is_empty();
    // What this version's own state holds, by path: kept across a merge.
    let mut stored_at: HashMap<String, (u64, DataRef)> = HashMap::new();
    let next = |n: u64| {
        n.checked_add(1)
            .ok_or_else(|| PodError::NoVersionNumberLeft {
                pod: pod.to_string(),
                remote: remote.name().to_owned(),
                last: n,
            })
    };
    let mut n = next(previous.unwrap_or(0))?;
    // The upload of the state under `n`, run while the zip is written.
    let mut first_put = None;
    if has_state {
        let total = to_store.iter().map(|(i, _)| entries[*i].size).sum();
        let inputs: Vec<StateInput> = to_store
            .iter()
            .map(|(i, source)| StateInput {
                name: entries[*i].path.clone(),
                source: source.clone(),
                size: entries[*i].size,
                mode: entries[*i].mode,
                mtime: entries[*i].mtime,
            })
            .collect();
        let dest = staged.path().to_owned();
        let compress_below = params.compress_below;
        let cancel = params.cancel.clone();
        let (tx, growing) = tokio::sync::watch::channel(Growing {
            expected: total,
            ..Growing::default()
        });
        // One bar for both: the bytes uploaded.
        progress.start("saving", total);
        let zipping = async {
            let zipped = blocking(move || {
                write_state_zip(
                    &dest,
                    &inputs,
                    compress_below,
                    &NoProgress,
                    &cancel,
                    Some(&tx),
                )
            })
            .await;
            changes.zipped();
            zipped
        };
        let uploading =
            remote.put_state_growing(pod, n, staged.path(), growing, Arc::clone(progress));
        let (stored, put) = tokio::join!(zipping, uploading);
        progress.finish();
        let stored = stored.map_err(|e| cancelled_or(&params.cancel, e))?;
        first_put = Some(put);
        for ((i, _), s) in to_store.iter().zip(stored) {
            let e = &mut entries[*i];
            e.size = s.size; // the file may have changed since the scan
            e.data = Some(DataRef {
                state: 0, // numbered at commit
                offset: s.offset,
                csize: s.csize,
                method: s.method,
                crc32: s.crc32,
                blocks: s.blocks,
            });
            if changes.merges()
                && let Some(d) = &e.data
            {
                stored_at.insert(e.path.clone(), (e.size, d.clone()));
            }
        }
        outcome.stored_bytes = std::fs::metadata(staged.path())
            .map_err(PodError::io(staged.path()))?
            .len();
        // Sizes are the bytes zipped: a file may have changed since the scan.
        outcome.logical_bytes = entries.iter().map(|e| e.size).sum();
    }

    for _ in 0..MAX_ATTEMPTS {
        let mut state_ids = reused_state_ids(&entries, prev.as_ref(), changes)?;
        // What the backend needs to commit the state uploaded under `n`: a new upload (under a
        // new number after a conflict) comes with its own.
        let mut stored = None;
        if has_state {
            state_ids.insert(n, new_state_id()?);
            let put = match first_put.take() {
                Some(put) => put,
                None => {
                    progress.start("uploading", outcome.stored_bytes);
                    let put = remote
                        .put_state(pod, n, staged.path(), Arc::clone(progress))
                        .await;
                    progress.finish();
                    put
                }
            };
            if params.cancel.is_cancelled() {
                return Err(PodError::Cancelled(NOTHING_SAVED));
            }
            match put {
                Ok(s) => stored = Some(s),
                Err(RemoteError::AlreadyExists(_)) => {
                    tracing::info!(pod = %pod, version = n, "state object taken, trying the next number");
                    n = next(n)?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if params.cancel.is_cancelled() {
            if has_state && let Err(e) = remote.delete_state(pod, n).await {
                tracing::warn!(pod = %pod, state = n, "could not remove an unused state object: {e}");
            }
            return Err(PodError::Cancelled(NOTHING_SAVED));
        }
        let to_number: Vec<usize> = to_store.iter().map(|(i, _)| *i).collect();
        let mut obj = version_object(pod, n, previous, &entries, &to_number, params, &outcome);
        obj.info.state_ids = state_ids;
        let states = obj.info.states.clone();
        let zip = obj.encode()?;
        match remote
            .commit_version(pod, n, zip, &states, stored.as_ref(), previous)
            .await
        {
            Ok(()) => {
                outcome.version = Some(n);
                return Ok((outcome, Some(obj)));
            }
            Err(RemoteError::AlreadyExists(_)) => {
                tracing::info!(pod = %pod, version = n, "version taken by another writer, trying the next number");
                if has_state && let Err(e) = remote.delete_state(pod, n).await {
                    tracing::warn!(pod = %pod, state = n, "could not remove an unused state object: {e}");
                }
                n = next(n)?;
                if changes.merges() {
                    // Merged on top of what the other writer committed, never over it.
                    let latest = remote.list_versions(pod).await?.last().copied();
                    if latest != previous {
                        let newer = match latest {
                            Some(v) => Some(read_version(remote, pod, v).await?),
                            None => None,
                        };
                        tracing::info!(
                            pod = %pod,
                            "another writer saved version {} meanwhile: applying these changes on top of it",
                            latest.map_or_else(|| "none".to_owned(), |v| v.to_string())
                        );
                        let merged = Plan::new(changes.on_top_of(newer.as_ref())?);
                        (entries, to_store) = (merged.entries, merged.to_store);
                        for (i, _) in &to_store {
                            let e = &mut entries[*i];
                            let Some((size, data)) = stored_at.get(&e.path) else {
                                return Err(PodError::Io {
                                    path: e.path.clone().into(),
                                    source: std::io::Error::other(
                                        "a staged file appeared while merging with another writer's version",
                                    ),
                                });
                            };
                            e.size = *size;
                            e.data = Some(data.clone());
                        }
                        outcome.previous = latest;
                        outcome.file_count = merged.file_count;
                        outcome.logical_bytes = entries.iter().map(|e| e.size).sum();
                        (previous, prev) = (latest, newer);
                        n = next(previous.unwrap_or(0))?.max(n);
                    }
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(PodError::TooManyConflicts(MAX_ATTEMPTS))
}

const NOTHING_SAVED: &str = "nothing was saved (the staged and partly uploaded data were removed)";

/// `e`, or [`PodError::Cancelled`] if the save was cancelled (the error is then its echo).
fn cancelled_or(cancel: &CancellationToken, e: PodError) -> PodError {
    if cancel.is_cancelled() {
        PodError::Cancelled(NOTHING_SAVED)
    } else {
        e
    }
}

/// Staged state zips are named `save-*.zip` in the staging dir.
const STAGED_PREFIX: &str = "save-";

/// Removes staged state zips left by saves that were killed: those no running save holds a lock
/// on and that are older than a minute (a new one may not be locked yet). Best effort.
fn sweep_staging(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in rd.flatten() {
        let name = entry.file_name();
        let stale = name.to_str().is_some_and(|n| n.starts_with(STAGED_PREFIX))
            && entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age.as_secs() > 60));
        if !stale {
            continue;
        }
        if let Ok(f) = std::fs::File::open(entry.path())
            && f.try_lock().is_ok()
        {
            tracing::info!(path = %entry.path().display(), "removing a staged file left by a killed save");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The identities of the states the new version reuses (every state but its own, still
/// numbered 0 in `entries`): copied from the parent's `version.json`. A state the parent has no
/// identity for (a pod written before identities) gets a fresh one, so the pod can be cached
/// from this version on: a new identity can never name other bytes, only the same bytes twice.
fn reused_state_ids(
    entries: &[Entry],
    parent: Option<&VersionObject>,
    changes: &dyn Changes,
) -> PodResult<BTreeMap<u64, String>> {
    let reused: BTreeSet<u64> = entries
        .iter()
        .filter_map(|e| e.data.as_ref().map(|d| d.state))
        .filter(|&s| s != 0)
        .collect();
    reused
        .into_iter()
        .map(|s| {
            let id = match parent.and_then(|p| p.state_id(s)) {
                Some(id) => id.to_owned(),
                None => match changes.state_id(s) {
                    Some(id) => id,
                    None => new_state_id()?,
                },
            };
            Ok((s, id))
        })
        .collect()
}

/// Builds version `n`'s object, pointing newly stored files at state object `n`; the caller
/// fills in the state identities.
fn version_object(
    pod: &PodName,
    n: u64,
    parent: Option<u64>,
    entries: &[Entry],
    to_store: &[usize],
    params: &SaveParams,
    outcome: &SaveOutcome,
) -> VersionObject {
    let mut entries = entries.to_vec();
    for &i in to_store {
        if let Some(d) = entries[i].data.as_mut() {
            d.state = n;
        }
    }
    let states: BTreeSet<u64> = entries
        .iter()
        .filter_map(|e| e.data.as_ref().map(|d| d.state))
        .collect();
    VersionObject {
        info: VersionInfo {
            format: FORMAT,
            pod: pod.to_string(),
            version: n,
            parent,
            created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            message: params.message.clone(),
            creator: params.creator.clone(),
            tool_version: concat!("podfs ", env!("CARGO_PKG_VERSION")).to_owned(),
            file_count: outcome.file_count,
            logical_bytes: outcome.logical_bytes,
            stored_bytes: outcome.stored_bytes,
            states: states.into_iter().collect(),
            state_ids: BTreeMap::new(),
        },
        manifest: Manifest::new(entries),
    }
}

/// The new manifest (before numbering) and which of its files need storing, from where.
struct Plan {
    entries: Vec<Entry>,
    to_store: Vec<(usize, PathBuf)>,
    file_count: u64,
}

impl Plan {
    fn new(listed: Vec<(Entry, Option<PathBuf>)>) -> Self {
        let mut entries = Vec::with_capacity(listed.len());
        let mut to_store = Vec::new();
        let mut file_count = 0;
        for (mut e, source) in listed {
            if e.kind == Kind::File {
                file_count += 1;
                if let Some(source) = source {
                    e.data = None;
                    to_store.push((entries.len(), source));
                }
            }
            entries.push(e);
        }
        Self {
            entries,
            to_store,
            file_count,
        }
    }
}
