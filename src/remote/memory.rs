//! An in-memory [`Remote`] and a fault injector around any remote, for tests of the pod layer.
//!
//! [`MemoryRemote`] keeps objects in a map with the same only-if-absent rules as the real
//! backends. [`FaultyRemote`] forwards to another remote but fails chosen calls, so the conflict
//! and failure paths of save and load can be tested deterministically.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    ObjectId, ObjectKind, Remote, RemoteError, RemoteResult, StoredState, VersionId,
    check_new_state, numbers_among, object_name, parse_object_name, pods_among,
};
use crate::name::PodName;
use crate::progress::Progress;

/// Objects in memory, keyed by object name.
#[derive(Debug, Default)]
pub struct MemoryRemote {
    objects: Mutex<BTreeMap<String, Bytes>>,
}

impl MemoryRemote {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Bytes>> {
        // A panic while holding the lock leaves the map consistent (single inserts/removes).
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Object names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Puts raw bytes under an object name, replacing what is there: for tests that craft
    /// objects by hand (a real remote never overwrites).
    pub fn put_raw(&self, name: &str, bytes: Bytes) {
        self.lock().insert(name.to_owned(), bytes);
    }

    fn objects(&self) -> Vec<ObjectId> {
        self.lock()
            .keys()
            .filter_map(|k| parse_object_name(k))
            .collect()
    }

    fn create(&self, name: String, bytes: Bytes) -> RemoteResult<()> {
        let mut map = self.lock();
        if map.contains_key(&name) {
            return Err(RemoteError::AlreadyExists(name));
        }
        map.insert(name, bytes);
        Ok(())
    }
}

#[async_trait]
impl Remote for MemoryRemote {
    fn name(&self) -> &str {
        "memory"
    }

    async fn list_pods(&self) -> RemoteResult<Vec<(PodName, u64)>> {
        Ok(pods_among(self.objects()))
    }

    async fn list_versions(&self, pod: &PodName) -> RemoteResult<Vec<u64>> {
        Ok(numbers_among(self.objects(), pod, ObjectKind::Version))
    }

    async fn list_states(&self, pod: &PodName) -> RemoteResult<Vec<u64>> {
        Ok(numbers_among(self.objects(), pod, ObjectKind::State))
    }

    async fn read_version(&self, pod: &PodName, version: u64) -> RemoteResult<Bytes> {
        let name = object_name(pod, ObjectKind::Version, version);
        self.lock()
            .get(&name)
            .cloned()
            .ok_or(RemoteError::NotFound(name))
    }

    async fn version_id(&self, pod: &PodName, version: u64) -> RemoteResult<Option<VersionId>> {
        let name = object_name(pod, ObjectKind::Version, version);
        // Every version object differs from any other (its info holds a creation time).
        let id = |b: &Bytes| VersionId {
            id: format!("{:08x}-{}", crc32fast::hash(b), b.len()),
            size: b.len() as u64,
        };
        Ok(self.lock().get(&name).map(id))
    }

    async fn read_state(
        &self,
        pod: &PodName,
        _via: u64,
        state: u64,
        range: Range<u64>,
    ) -> RemoteResult<Bytes> {
        let name = object_name(pod, ObjectKind::State, state);
        let bytes = self
            .lock()
            .get(&name)
            .cloned()
            .ok_or_else(|| RemoteError::NotFound(name.clone()))?;
        if range.start > range.end || range.end > bytes.len() as u64 {
            return Err(RemoteError::Other {
                remote: self.name().to_owned(),
                detail: format!("bytes {range:?} are past the end of {name}"),
            });
        }
        Ok(bytes.slice(range.start as usize..range.end as usize))
    }

    async fn put_state(
        &self,
        pod: &PodName,
        version: u64,
        file: &Path,
        progress: Arc<dyn Progress>,
    ) -> RemoteResult<StoredState> {
        let bytes = std::fs::read(file).map_err(RemoteError::io(file.display().to_string()))?;
        let len = bytes.len() as u64;
        self.create(object_name(pod, ObjectKind::State, version), bytes.into())?;
        progress.advance(len);
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
        check_new_state(self.name(), pod, version, states, new_state)?;
        self.create(object_name(pod, ObjectKind::Version, version), version_zip)
    }

    async fn delete_version(&self, pod: &PodName, version: u64) -> RemoteResult<()> {
        self.lock()
            .remove(&object_name(pod, ObjectKind::Version, version));
        Ok(())
    }

    async fn delete_state(&self, pod: &PodName, state: u64) -> RemoteResult<()> {
        self.lock()
            .remove(&object_name(pod, ObjectKind::State, state));
        Ok(())
    }
}

/// A call of the [`Remote`] trait, for [`FaultyRemote`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    ReadState,
    PutState,
    CommitVersion,
}

/// Makes the error a fault returns.
pub type MakeError = fn() -> RemoteError;

/// Forwards to `inner`, failing chosen calls with chosen errors.
#[derive(Debug)]
pub struct FaultyRemote {
    inner: Arc<dyn Remote>,
    /// Pending faults: the next call of that kind fails with the error the function makes.
    faults: Mutex<Vec<(Call, MakeError)>>,
}

impl FaultyRemote {
    pub fn new(inner: Arc<dyn Remote>) -> Self {
        Self {
            inner,
            faults: Mutex::new(Vec::new()),
        }
    }

    /// Makes the next `call` fail with `err()`. Faults for one call are used in order.
    pub fn fail_next(&self, call: Call, err: MakeError) {
        self.faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((call, err));
    }

    fn take(&self, call: Call) -> RemoteResult<()> {
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        match faults.iter().position(|(c, _)| *c == call) {
            Some(i) => Err((faults.remove(i).1)()),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl Remote for FaultyRemote {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn list_pods(&self) -> RemoteResult<Vec<(PodName, u64)>> {
        self.inner.list_pods().await
    }
    async fn list_versions(&self, pod: &PodName) -> RemoteResult<Vec<u64>> {
        self.inner.list_versions(pod).await
    }
    async fn list_states(&self, pod: &PodName) -> RemoteResult<Vec<u64>> {
        self.inner.list_states(pod).await
    }
    async fn read_version(&self, pod: &PodName, version: u64) -> RemoteResult<Bytes> {
        self.inner.read_version(pod, version).await
    }
    async fn version_id(&self, pod: &PodName, version: u64) -> RemoteResult<Option<VersionId>> {
        self.inner.version_id(pod, version).await
    }
    async fn read_state(
        &self,
        pod: &PodName,
        via: u64,
        state: u64,
        range: Range<u64>,
    ) -> RemoteResult<Bytes> {
        self.take(Call::ReadState)?;
        self.inner.read_state(pod, via, state, range).await
    }
    async fn put_state(
        &self,
        pod: &PodName,
        version: u64,
        file: &Path,
        progress: Arc<dyn Progress>,
    ) -> RemoteResult<StoredState> {
        self.take(Call::PutState)?;
        self.inner.put_state(pod, version, file, progress).await
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
        self.take(Call::CommitVersion)?;
        self.inner
            .commit_version(pod, version, version_zip, states, new_state, parent)
            .await
    }
    async fn delete_version(&self, pod: &PodName, version: u64) -> RemoteResult<()> {
        self.inner.delete_version(pod, version).await
    }
    async fn delete_state(&self, pod: &PodName, state: u64) -> RemoteResult<()> {
        self.inner.delete_state(pod, state).await
    }
}
