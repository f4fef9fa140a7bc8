//! The conflict and failure paths of save and load, driven deterministically through the
//! in-memory remote and the fault injector.

mod support;

use std::path::Path;
use std::sync::Arc;

use podfs::pod::delete::delete;
use podfs::pod::load::{LoadParams, load};
use podfs::pod::manifest::VersionObject;
use podfs::pod::read::read_version;
use podfs::pod::save::{SaveParams, save};
use podfs::pod::{PodError, PodName};
use podfs::progress::{NoProgress, Progress};
use podfs::remote::memory::{Call, FaultyRemote, MemoryRemote};
use podfs::remote::{Remote, RemoteError};

struct Fixture {
    tmp: tempfile::TempDir,
    memory: Arc<MemoryRemote>,
    faulty: Arc<FaultyRemote>,
    remote: Arc<dyn Remote>,
    pod: PodName,
    progress: Arc<dyn Progress>,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::write(src.join("small"), "small file").unwrap();
        std::fs::write(src.join("d/big"), vec![7u8; 3 << 20]).unwrap();
        let memory = Arc::new(MemoryRemote::new());
        let faulty = Arc::new(FaultyRemote::new(memory.clone()));
        Self {
            tmp,
            remote: faulty.clone(),
            memory,
            faulty,
            pod: PodName::new("p").unwrap(),
            progress: Arc::new(NoProgress),
        }
    }
    fn src(&self) -> std::path::PathBuf {
        self.tmp.path().join("src")
    }
    async fn save(&self) -> Result<Option<u64>, PodError> {
        let params = SaveParams {
            staging_dir: self.tmp.path().join("staging"),
            ..SaveParams::default()
        };
        save(
            &*self.remote,
            &self.pod,
            &self.src(),
            &params,
            &self.progress,
        )
        .await
        .map(|o| o.version)
    }
    async fn version(&self, version: u64) -> VersionObject {
        read_version(&*self.remote, &self.pod, version)
            .await
            .unwrap()
    }
    async fn load(&self, version: Option<u64>, into: &Path) -> Result<(), PodError> {
        load(
            &*self.remote,
            &self.pod,
            version,
            into,
            &LoadParams::default(),
            &self.progress,
        )
        .await
        .map(|_| ())
    }
}

fn taken() -> RemoteError {
    RemoteError::AlreadyExists("taken by another writer".into())
}
fn down() -> RemoteError {
    RemoteError::Unavailable {
        remote: "memory".into(),
        detail: "connection refused".into(),
    }
}

#[tokio::test]
async fn a_taken_state_number_moves_the_save_to_the_next_number() {
    let f = Fixture::new();
    f.faulty.fail_next(Call::PutState, taken);
    assert_eq!(f.save().await.unwrap(), Some(2));
    assert_eq!(f.remote.list_versions(&f.pod).await.unwrap(), [2]);
    let into = f.tmp.path().join("into");
    f.load(None, &into).await.unwrap();
    support::assert_same_tree(&f.src(), &into);
}

#[tokio::test]
async fn a_taken_version_number_renumbers_the_snapshot_and_removes_its_state() {
    let f = Fixture::new();
    f.faulty.fail_next(Call::CommitVersion, taken);
    assert_eq!(f.save().await.unwrap(), Some(2));
    // The state object uploaded as 1 was removed; the version points into state 2 only.
    assert_eq!(
        f.memory.names(),
        [
            "localstack-pod-p-state-2.zip",
            "localstack-pod-p-version-2.zip"
        ]
    );
    let into = f.tmp.path().join("into");
    f.load(Some(2), &into).await.unwrap();
    support::assert_same_tree(&f.src(), &into);
}

#[tokio::test]
async fn a_failed_commit_leaves_no_version_and_the_next_save_succeeds() {
    let f = Fixture::new();
    f.faulty.fail_next(Call::CommitVersion, down);
    let err = f.save().await.unwrap_err();
    assert!(err.to_string().contains("unavailable"), "{err}");
    assert!(f.remote.list_versions(&f.pod).await.unwrap().is_empty());
    // The orphaned state object 1 is garbage, not a version: the next save skips its number.
    assert_eq!(f.save().await.unwrap(), Some(2));
    let into = f.tmp.path().join("into");
    f.load(None, &into).await.unwrap();
    support::assert_same_tree(&f.src(), &into);
}

#[tokio::test]
async fn a_failed_read_leaves_no_partial_files() {
    let f = Fixture::new();
    assert_eq!(f.save().await.unwrap(), Some(1));
    let into = f.tmp.path().join("into");
    f.faulty.fail_next(Call::ReadState, down);
    let err = f.load(None, &into).await.unwrap_err();
    assert!(err.to_string().contains("connection refused"), "{err}");
    // Files that finished before the failure are whole; nothing else is there.
    let source = support::snapshot(&f.src());
    for (path, node) in support::snapshot(&into) {
        if matches!(node, support::Node::File { .. }) {
            assert_eq!(source.get(&path), Some(&node), "{path} is partial");
        }
    }
    // With the fault gone, the same load completes.
    f.load(None, &into).await.unwrap();
    support::assert_same_tree(&f.src(), &into);
}

/// A commit is handed what `put_state` returned for its own state: one from another number (a
/// save that renumbered but kept its old receipt) is refused and writes nothing.
#[tokio::test]
async fn a_commit_refuses_a_receipt_for_another_state() {
    let f = Fixture::new();
    let staged = f.tmp.path().join("state");
    std::fs::write(&staged, b"not really a zip").unwrap();
    let stored = f
        .remote
        .put_state(&f.pod, 1, &staged, f.progress.clone())
        .await
        .unwrap();
    assert_eq!(stored.state(), 1);
    let zip = bytes::Bytes::from_static(b"version");
    let err = f
        .remote
        .commit_version(&f.pod, 2, zip.clone(), &[2], Some(&stored), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("its own state object"), "{err}");
    let err = f
        .remote
        .commit_version(&f.pod, 2, zip, &[2], None, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not uploaded first"), "{err}");
    assert_eq!(f.memory.names(), ["localstack-pod-p-state-1.zip"]);
}

/// After `podfs delete POD` and a new save, `state-1` names other bytes: its identity differs,
/// so a cache keyed by identity cannot serve the old bytes.
#[tokio::test]
async fn a_pod_saved_again_after_delete_has_new_state_identities() {
    let f = Fixture::new();
    assert_eq!(f.save().await.unwrap(), Some(1));
    let before = f.version(1).await;
    let old_id = before
        .state_id(1)
        .expect("a new save records an identity")
        .to_owned();
    delete(&*f.remote, &f.pod, None).await.unwrap();
    std::fs::write(f.src().join("small"), "other content").unwrap();
    assert_eq!(f.save().await.unwrap(), Some(1));
    let after = f.version(1).await;
    assert_eq!(after.info.states, [1]);
    let new_id = after.state_id(1).expect("a new save records an identity");
    assert_ne!(old_id, new_id);
}

/// A version that reuses an older state copies its identity; its own state gets a new one.
#[tokio::test]
async fn reused_states_keep_their_identity() {
    let f = Fixture::new();
    assert_eq!(f.save().await.unwrap(), Some(1));
    std::fs::write(f.src().join("small"), "changed").unwrap();
    assert_eq!(f.save().await.unwrap(), Some(2));
    let (v1, v2) = (f.version(1).await, f.version(2).await);
    assert_eq!(v2.info.states, [1, 2]);
    assert_eq!(v2.state_id(1), v1.state_id(1));
    assert!(v2.state_id(2).is_some_and(|id| Some(id) != v1.state_id(1)));
}

/// A state renumbered after a conflict is a new object: the committed version records the
/// identity of the object it points at, and nothing of the loser is left.
#[tokio::test]
async fn a_renumbered_state_is_recorded_under_its_new_number() {
    let f = Fixture::new();
    f.faulty.fail_next(Call::CommitVersion, taken);
    assert_eq!(f.save().await.unwrap(), Some(2));
    let v2 = f.version(2).await;
    assert_eq!(v2.info.states, [2]);
    assert_eq!(v2.info.state_ids.keys().copied().collect::<Vec<_>>(), [2]);
}

/// A pod written before identities reads; the next save gives the states it reuses an identity.
#[tokio::test]
async fn a_save_on_a_pod_without_identities_gives_its_states_one() {
    let f = Fixture::new();
    assert_eq!(f.save().await.unwrap(), Some(1));
    // Rewrite version 1 as an older podfs wrote it: no state_ids.
    let mut v1 = f.version(1).await;
    v1.info.state_ids.clear();
    let state = f
        .memory
        .read_state(&f.pod, 1, 1, 0..v1.info.stored_bytes)
        .await
        .unwrap();
    let staged = f.tmp.path().join("state-1");
    std::fs::write(&staged, &state).unwrap();
    f.memory.delete_version(&f.pod, 1).await.unwrap();
    f.memory.delete_state(&f.pod, 1).await.unwrap();
    let stored = f
        .memory
        .put_state(&f.pod, 1, &staged, f.progress.clone())
        .await
        .unwrap();
    f.memory
        .commit_version(&f.pod, 1, v1.encode().unwrap(), &[1], Some(&stored), None)
        .await
        .unwrap();
    assert_eq!(f.version(1).await.state_id(1), None);
    let into = f.tmp.path().join("into");
    f.load(Some(1), &into).await.unwrap();
    support::assert_same_tree(&f.src(), &into);

    std::fs::write(f.src().join("small"), "changed").unwrap();
    assert_eq!(f.save().await.unwrap(), Some(2));
    let v2 = f.version(2).await;
    let (a, b) = (v2.state_id(1).unwrap(), v2.state_id(2).unwrap());
    assert_ne!(a, b);
}
