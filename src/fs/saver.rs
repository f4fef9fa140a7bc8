//! Saving working trees: each pod's saver commits its staged changes as the next version when
//! the pod is quiet (no file open for writing, no change for [`FsConfig::save_delay`]), at once
//! when an `fsync` asks, and once more at unmount. A failed save keeps everything staged and is
//! tried again with a growing delay (1 s to a minute), or at the next `fsync`.
//!
//! [`FsConfig::save_delay`]: super::FsConfig::save_delay

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::workspace::Workspace;
use super::{FsError, FsResult, PodFs, PodState, lock};
use crate::pod::save::{SaveParams, save_changes};
use crate::progress::{NoProgress, Progress};

/// The first wait after a failed save, and the longest.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(60);
/// How long a saver with nothing to do sleeps before looking again.
const IDLE: Duration = Duration::from_secs(60);

impl PodFs {
    /// Starts saving: every working tree gets a saver, stopped by [`PodFs::stop_saving`].
    pub fn start_saving(self: &Arc<Self>) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Arc<Workspace>>();
        if self.saver_tx.set(tx).is_err() {
            return;
        }
        let existing: Vec<Arc<Workspace>> = lock(&self.workspaces).values().cloned().collect();
        let fs = Arc::clone(self);
        tokio::spawn(async move {
            for ws in existing {
                tokio::spawn(saver(Arc::clone(&fs), ws));
            }
            while let Some(ws) = rx.recv().await {
                tokio::spawn(saver(Arc::clone(&fs), ws));
            }
        });
    }

    /// Stops the savers (after [`PodFs::save_all`] at unmount).
    pub fn stop_saving(&self) {
        self.savers.cancel();
    }

    /// Hands a new working tree to its saver, if saving has started.
    pub(super) fn saver_for(&self, ws: &Arc<Workspace>) {
        if self.config.staging.is_some()
            && let Some(tx) = self.saver_tx.get()
        {
            // The receiver lives as long as the runtime.
            let _ = tx.send(Arc::clone(ws));
        }
    }

    /// Whether any pod has changes not yet saved.
    pub fn has_pending(&self) -> bool {
        lock(&self.workspaces).values().any(|ws| ws.dirty())
    }

    /// Saves every pod with staged changes once; says for each what happened. Returns whether
    /// every one was saved.
    pub async fn save_all(&self) -> bool {
        let all: Vec<Arc<Workspace>> = lock(&self.workspaces)
            .values()
            .filter(|ws| ws.dirty())
            .cloned()
            .collect();
        if all.is_empty() {
            return true;
        }
        tracing::info!(
            "saving the pending changes of {} pods before exiting",
            all.len()
        );
        let mut ok = true;
        for ws in all {
            if let Err(e) = self.save_pod(&ws, false).await {
                ok = false;
                tracing::error!(
                    pod = %ws.pod,
                    "cannot save the changes to pod {}: {}; they stay staged in {} and are saved by the next mount",
                    ws.pod,
                    crate::term::error_chain(&e),
                    ws.dir().display()
                );
            }
        }
        ok
    }

    /// Opens the working tree of every pod with changes staged by an earlier mount (the daemon
    /// was killed, or a save failed at unmount), so that their savers save them. A remote that
    /// cannot be reached is tried again every 10 s.
    pub async fn recover(self: Arc<Self>) {
        let Some(staging) = self.config.staging.clone() else {
            return;
        };
        let mut left = super::staging::staged_pods(&staging);
        while !left.is_empty() {
            let mut again = Vec::new();
            for (remote, pod) in left {
                let Some(r) = self.remotes.find(&remote) else {
                    tracing::warn!(
                        "changes staged for pod {pod} of remote {remote} wait in {}: the remote is not mounted",
                        super::staging::pod_dir(&staging, &remote, &pod).display()
                    );
                    continue;
                };
                let Ok(name) = crate::name::PodName::new(&pod) else {
                    continue;
                };
                if let Err(e) = self.workspace(r, &name).await {
                    tracing::warn!(
                        "cannot open the changes staged for pod {pod} of remote {remote} yet: {}; trying again in 10 s",
                        crate::term::error_chain(&e)
                    );
                    again.push((remote, pod));
                }
            }
            left = again;
            if left.is_empty() {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(10)) => {}
                () = self.savers.cancelled() => return,
            }
        }
    }

    /// Commits the staged changes of `ws` (`force`: also a new pod with no content yet).
    async fn save_pod(&self, ws: &Arc<Workspace>, force: bool) -> FsResult<()> {
        let Some(snap) = ws.snapshot(force) else {
            return Ok(());
        };
        let remote = self.remote(ws.remote)?;
        let staging = self.config.staging.clone().unwrap_or_default();
        let params = SaveParams {
            message: "saved by podfs mount".into(),
            creator: self.config.creator.clone(),
            staging_dir: staging,
            ..SaveParams::default()
        };
        let progress: Arc<dyn Progress> = Arc::new(NoProgress);
        let started = Instant::now();
        let (outcome, obj) = save_changes(&*remote, &ws.pod, &snap, &params, &progress).await?;
        let Some(obj) = obj else {
            // Nothing to compare with and nothing committed: cannot happen for a pending pod.
            return Err(FsError::SaveFailed);
        };
        let obj = Arc::new(obj);
        let version = obj.info.version;
        let kept = ws.committed(&snap, Arc::clone(&obj))?;
        drop(snap);
        self.keep_as_copies(ws, &remote, &obj, kept).await;
        self.note_committed(ws.remote, &ws.pod, obj);
        // A merge with another writer's version changes listings behind the kernel's back.
        self.forget_listings(ws);
        let remote_name = self.remote_name(ws.remote).unwrap_or_default();
        match outcome.version {
            Some(v) => tracing::info!(
                pod = %ws.pod,
                remote = %remote_name,
                version = v,
                "saved pod {} on {remote_name} as version {v} in {:.1?}: {} changed files, {} bytes uploaded",
                ws.pod,
                started.elapsed(),
                outcome.changed_files,
                outcome.stored_bytes
            ),
            None => tracing::info!(
                pod = %ws.pod,
                "the changes to pod {} leave it as version {version} holds it: nothing to save",
                ws.pod
            ),
        }
        ws.tidy();
        Ok(())
    }

    /// The data files of files just saved become their whole-file copies in the disk cache
    /// (read again from there, or passed through, instead of fetched); the others go.
    async fn keep_as_copies(
        &self,
        ws: &Workspace,
        remote: &Arc<dyn crate::remote::Remote>,
        obj: &crate::pod::manifest::VersionObject,
        kept: Vec<(String, u64, std::path::PathBuf)>,
    ) {
        use crate::pod::manifest::Method;
        for (path, id, file) in kept {
            let key = obj.manifest.get(&path).and_then(|e| {
                let d = e.data.as_ref()?;
                if d.method != Method::Stored || d.blocks.is_none() {
                    return None;
                }
                let state_id = obj.state_id(d.state)?;
                crate::cache::BlockKey::new(
                    remote.name(),
                    &ws.pod,
                    Some(state_id),
                    d.offset,
                    e.size,
                )
            });
            let adopted = match (&self.reader.cache, key) {
                (Some(cache), Some(key)) => cache.adopt_copy(&key, file).await,
                _ => false,
            };
            if !adopted {
                ws.discard_data(id);
            }
        }
    }

    /// Version `obj` of `pod` was just committed by this mount: it is known without listing.
    fn note_committed(
        &self,
        r: usize,
        pod: &crate::name::PodName,
        obj: Arc<crate::pod::manifest::VersionObject>,
    ) {
        let version = obj.info.version;
        let mut pods = lock(&self.pods);
        let state = pods.entry((r, pod.clone())).or_insert_with(|| PodState {
            at: Instant::now(),
            generation: self
                .generations
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            versions: Arc::new(Vec::new()),
            known: None,
        });
        if !state.versions.contains(&version) {
            let mut v = state.versions.as_ref().clone();
            v.push(version);
            v.sort_unstable();
            state.versions = Arc::new(v);
        }
        let generation = state.generation;
        drop(pods);
        let cell = tokio::sync::OnceCell::new_with(Some(obj));
        lock(&self.manifests).insert((r, pod.clone(), generation, version), Arc::new(cell));
        lock(&self.pod_lists).remove(&r);
    }
}

/// The saver of one working tree; see the module documentation.
async fn saver(fs: Arc<PodFs>, ws: Arc<Workspace>) {
    let delay = fs.config.save_delay;
    let mut retry: Option<(Instant, Duration)> = None;
    loop {
        let wake = ws.wake.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        let asked = ws.take_asked();
        let quiet = ws.quiet_for();
        let retry_in = retry.map(|(at, wait)| wait.saturating_sub(at.elapsed()));
        let due = asked
            || (ws.dirty()
                && quiet.is_some_and(|q| q >= delay)
                && retry_in.is_none_or(|r| r.is_zero()));
        if due {
            match fs.save_pod(&ws, asked).await {
                Ok(()) => retry = None,
                Err(e) => {
                    let wait = retry.map_or(FIRST_RETRY, |(_, w)| (w * 2).min(LAST_RETRY));
                    tracing::warn!(
                        pod = %ws.pod,
                        "cannot save pod {}: {}; the changes stay staged in {}; trying again in {wait:?}",
                        ws.pod,
                        crate::term::error_chain(&e),
                        ws.dir().display()
                    );
                    ws.save_failed();
                    retry = Some((Instant::now(), wait));
                }
            }
            continue;
        }
        let sleep = if ws.dirty() {
            match (quiet, retry_in) {
                (Some(q), r) => delay.saturating_sub(q).max(r.unwrap_or_default()),
                (None, _) => IDLE,
            }
        } else {
            IDLE
        };
        tokio::select! {
            () = &mut wake => {}
            () = tokio::time::sleep(sleep.max(Duration::from_millis(10))) => {}
            () = fs.savers.cancelled() => return,
        }
    }
}
