//! A [`Remote`] that counts the requests it passes on, and the bytes they bring back, into a
//! mount's [`Metrics`].

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{Remote, RemoteResult, StoredState, VersionId};
use crate::metrics::{Metrics, RemoteLabels, RequestLabels};
use crate::name::PodName;
use crate::progress::Progress;

/// `inner`, counted.
#[derive(Debug)]
pub struct Metered {
    inner: Arc<dyn Remote>,
    metrics: Arc<Metrics>,
}

impl Metered {
    pub fn new(inner: Arc<dyn Remote>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    /// Counts one request `op` and its outcome.
    fn count<T>(&self, op: &'static str, r: RemoteResult<T>) -> RemoteResult<T> {
        let labels = RequestLabels {
            remote: self.inner.name().to_owned(),
            op,
        };
        self.metrics.requests.get_or_create(&labels).inc();
        if r.is_err() {
            self.metrics.errors.get_or_create(&labels).inc();
        }
        r
    }

    fn received(&self, bytes: RemoteResult<Bytes>) -> RemoteResult<Bytes> {
        if let Ok(b) = &bytes {
            let labels = RemoteLabels {
                remote: self.inner.name().to_owned(),
            };
            self.metrics
                .bytes
                .get_or_create(&labels)
                .inc_by(b.len() as u64);
        }
        bytes
    }
}

#[async_trait]
impl Remote for Metered {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn list_pods(&self) -> RemoteResult<Vec<(PodName, u64)>> {
        self.count("list_pods", self.inner.list_pods().await)
    }

    async fn list_versions(&self, pod: &PodName) -> RemoteResult<Vec<u64>> {
        self.count("list_versions", self.inner.list_versions(pod).await)
    }

    async fn read_version(&self, pod: &PodName, version: u64) -> RemoteResult<Bytes> {
        let r = self.inner.read_version(pod, version).await;
        self.received(self.count("read_version", r))
    }

    async fn version_id(&self, pod: &PodName, version: u64) -> RemoteResult<Option<VersionId>> {
        self.count("version_id", self.inner.version_id(pod, version).await)
    }

    async fn read_state(
        &self,
        pod: &PodName,
        via: u64,
        state: u64,
        range: Range<u64>,
    ) -> RemoteResult<Bytes> {
        let r = self.inner.read_state(pod, via, state, range).await;
        self.received(self.count("read_state", r))
    }

    async fn put_state(
        &self,
        pod: &PodName,
        version: u64,
        file: &Path,
        progress: Arc<dyn Progress>,
    ) -> RemoteResult<StoredState> {
        let r = self.inner.put_state(pod, version, file, progress).await;
        self.count("put_state", r)
    }

    async fn put_state_growing(
        &self,
        pod: &PodName,
        version: u64,
        file: &Path,
        growing: tokio::sync::watch::Receiver<super::Growing>,
        progress: Arc<dyn Progress>,
    ) -> RemoteResult<StoredState> {
        let r = self
            .inner
            .put_state_growing(pod, version, file, growing, progress)
            .await;
        self.count("put_state", r)
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
        let r = self
            .inner
            .commit_version(pod, version, version_zip, states, new_state, parent)
            .await;
        self.count("commit_version", r)
    }

    async fn delete_version(&self, pod: &PodName, version: u64) -> RemoteResult<()> {
        self.count(
            "delete_version",
            self.inner.delete_version(pod, version).await,
        )
    }

    async fn delete_state(&self, pod: &PodName, state: u64) -> RemoteResult<()> {
        self.count("delete_state", self.inner.delete_state(pod, state).await)
    }

    async fn list_states(&self, pod: &PodName) -> RemoteResult<Vec<u64>> {
        self.count("list_states", self.inner.list_states(pod).await)
    }
}
