//! A [`Remote`] that stops asking a remote that just failed as unreachable or denied: for
//! [`HOLD`] after such a failure, every call fails at once with the same cause, instead of
//! each waiting for its own timeouts and retries. The mount wraps every remote in one, so that
//! a dead server costs its readers one timeout, not one per read.

use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

// tokio's clock, so tests can move time instead of waiting for it.
use tokio::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;

use super::{Remote, RemoteError, RemoteResult, StoredState, VersionId};
use crate::name::PodName;
use crate::progress::Progress;

/// How long calls fail at once after a remote was found unreachable or denied.
pub const HOLD: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
struct Down {
    at: Instant,
    denied: bool,
    detail: String,
}

/// `inner`, failing fast for [`HOLD`] after it failed as unavailable or denied.
#[derive(Debug)]
pub struct FailFast {
    inner: Arc<dyn Remote>,
    hold: Duration,
    down: Mutex<Option<Down>>,
}

impl FailFast {
    pub fn new(inner: Arc<dyn Remote>) -> Self {
        Self::with_hold(inner, HOLD)
    }

    pub fn with_hold(inner: Arc<dyn Remote>, hold: Duration) -> Self {
        Self {
            inner,
            hold,
            down: Mutex::new(None),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Option<Down>> {
        self.down.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The error to answer without asking, while the last failure is recent.
    fn held(&self) -> Option<RemoteError> {
        let down = self.state().clone()?;
        let ago = down.at.elapsed();
        if ago >= self.hold {
            return None;
        }
        let remote = self.inner.name().to_owned();
        let detail = format!(
            "{} (not asked again for {}s after that failure, {}s ago)",
            down.detail,
            self.hold.as_secs(),
            ago.as_secs()
        );
        Some(if down.denied {
            RemoteError::Denied { remote, detail }
        } else {
            RemoteError::Unavailable { remote, detail }
        })
    }

    /// Remembers how `r` went: a failure to reach or be let in holds the remote down.
    fn note<T>(&self, r: RemoteResult<T>) -> RemoteResult<T> {
        let name = self.inner.name();
        match &r {
            Err(RemoteError::Unavailable { detail, .. } | RemoteError::Denied { detail, .. }) => {
                let denied = matches!(r, Err(RemoteError::Denied { .. }));
                let mut down = self.state();
                if down.is_none() {
                    tracing::warn!(
                        remote = name,
                        "remote {name} fails: {detail}; its operations fail at once for {}s at a time",
                        self.hold.as_secs()
                    );
                }
                *down = Some(Down {
                    at: Instant::now(),
                    denied,
                    detail: detail.clone(),
                });
            }
            Ok(_) => {
                if self.state().take().is_some() {
                    tracing::info!(remote = name, "remote {name} answers again");
                }
            }
            Err(_) => {}
        }
        r
    }
}

/// Answers a held failure, or runs the call and notes how it went.
macro_rules! guarded {
    ($self:ident, $call:expr) => {{
        if let Some(e) = $self.held() {
            return Err(e);
        }
        let r = $call.await;
        $self.note(r)
    }};
}

#[async_trait]
impl Remote for FailFast {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn list_pods(&self) -> RemoteResult<Vec<(PodName, u64)>> {
        guarded!(self, self.inner.list_pods())
    }

    async fn list_versions(&self, pod: &PodName) -> RemoteResult<Vec<u64>> {
        guarded!(self, self.inner.list_versions(pod))
    }

    async fn read_version(&self, pod: &PodName, version: u64) -> RemoteResult<Bytes> {
        guarded!(self, self.inner.read_version(pod, version))
    }

    async fn version_id(&self, pod: &PodName, version: u64) -> RemoteResult<Option<VersionId>> {
        guarded!(self, self.inner.version_id(pod, version))
    }

    async fn read_state(
        &self,
        pod: &PodName,
        via: u64,
        state: u64,
        range: Range<u64>,
    ) -> RemoteResult<Bytes> {
        guarded!(self, self.inner.read_state(pod, via, state, range))
    }

    async fn put_state(
        &self,
        pod: &PodName,
        version: u64,
        file: &Path,
        progress: Arc<dyn Progress>,
    ) -> RemoteResult<StoredState> {
        guarded!(self, self.inner.put_state(pod, version, file, progress))
    }

    async fn put_state_growing(
        &self,
        pod: &PodName,
        version: u64,
        file: &Path,
        growing: tokio::sync::watch::Receiver<super::Growing>,
        progress: Arc<dyn Progress>,
    ) -> RemoteResult<StoredState> {
        guarded!(
            self,
            self.inner
                .put_state_growing(pod, version, file, growing, progress)
        )
    }

    async fn commit_version(
        &self,
        pod: &PodName,
        version: u64,
        version_zip: Bytes,
        states: &[u64],
        new_state: Option<&StoredState>,
        parent: Option<u64>,
    ) -> RemoteResult<()> {
        guarded!(
            self,
            self.inner
                .commit_version(pod, version, version_zip, states, new_state, parent)
        )
    }

    async fn delete_version(&self, pod: &PodName, version: u64) -> RemoteResult<()> {
        guarded!(self, self.inner.delete_version(pod, version))
    }

    async fn delete_state(&self, pod: &PodName, state: u64) -> RemoteResult<()> {
        guarded!(self, self.inner.delete_state(pod, state))
    }

    async fn list_states(&self, pod: &PodName) -> RemoteResult<Vec<u64>> {
        guarded!(self, self.inner.list_states(pod))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::memory::{Call, FaultyRemote, MakeError, MemoryRemote};

    #[tokio::test(start_paused = true)]
    async fn a_failure_to_reach_the_remote_is_answered_at_once_for_a_while() {
        let pod = PodName::new("p").unwrap();
        let faulty = Arc::new(FaultyRemote::new(Arc::new(MemoryRemote::new())));
        let ff = FailFast::with_hold(faulty.clone(), Duration::from_millis(300));
        let unreachable: MakeError = || RemoteError::Unavailable {
            remote: "memory".into(),
            detail: "connection refused".into(),
        };
        faulty.fail_next(Call::ReadState, unreachable);
        let first = ff.read_state(&pod, 1, 1, 0..1).await.unwrap_err();
        assert!(first.to_string().contains("connection refused"), "{first}");
        // Held: not even asked (the memory remote would say "not found").
        let held = ff.list_versions(&pod).await.unwrap_err();
        assert!(held.to_string().contains("not asked again"), "{held}");
        tokio::time::advance(Duration::from_millis(400)).await;
        assert_eq!(ff.list_versions(&pod).await.unwrap(), Vec::<u64>::new());
        assert!(
            ff.read_state(&pod, 1, 1, 0..1)
                .await
                .unwrap_err()
                .to_string()
                .contains("not found")
        );
    }
}
