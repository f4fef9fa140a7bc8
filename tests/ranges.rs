//! One rule for state reads, on every backend: `read_state` returns exactly the range asked for,
//! or an error; never fewer bytes. The memory and file backends run here directly, S3 against a
//! real moto server, ORAS against a real registry.

mod support;

use std::sync::Arc;

use podfs::config::resolve_with;
use podfs::name::PodName;
use podfs::pod::read::read_version;
use podfs::pod::save::{SaveParams, save};
use podfs::progress::{NoProgress, Progress};
use podfs::remote::file::FileRemote;
use podfs::remote::memory::MemoryRemote;
use podfs::remote::{OpenParams, Remote, open};
use support::moto::{KEY_ID, Moto, SECRET};
use support::registry::Registry;

/// Saves a small tree as version 1 of pod `ranges`, then checks reads of its state object at
/// and around its end.
async fn check_ranges(remote: &dyn Remote) {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("a"), vec![7u8; 3000]).unwrap();
    std::fs::write(tree.join("b"), b"bee").unwrap();
    let pod = PodName::new("ranges").unwrap();
    let params = SaveParams {
        staging_dir: tmp.path().join("staging"),
        ..SaveParams::default()
    };
    let progress: Arc<dyn Progress> = Arc::new(NoProgress);
    save(remote, &pod, &tree, &params, &progress).await.unwrap();
    let size = read_version(remote, &pod, 1)
        .await
        .unwrap()
        .info
        .stored_bytes;
    assert!(size > 100, "state object of {size} bytes");

    for ok in [0..size, 0..1, size - 10..size, 17..90, size..size] {
        let got = remote.read_state(&pod, 1, 1, ok.clone()).await;
        let got = got.unwrap_or_else(|e| panic!("{}: {ok:?}: {e}", remote.name()));
        assert_eq!(
            got.len() as u64,
            ok.end - ok.start,
            "{}: {ok:?}",
            remote.name()
        );
    }
    for bad in [size - 10..size + 1, size..size + 1, size + 5..size + 10] {
        let got = remote.read_state(&pod, 1, 1, bad.clone()).await;
        assert!(
            got.is_err(),
            "{}: {bad:?} past the end of {size} bytes gave {:?} bytes",
            remote.name(),
            got.map(|b| b.len())
        );
    }
    #[allow(clippy::reversed_empty_ranges)]
    let backwards = 20..10;
    assert!(
        remote.read_state(&pod, 1, 1, backwards).await.is_err(),
        "{}: a backwards range",
        remote.name()
    );
}

async fn opened(name: &str, url: &str) -> Arc<dyn Remote> {
    let resolved = resolve_with(name, url, |_| None).unwrap();
    open(name, &resolved, &OpenParams::default()).await.unwrap()
}

#[tokio::test]
async fn memory_reads_exactly_the_range_or_fails() {
    check_ranges(&MemoryRemote::new()).await;
}

#[tokio::test]
async fn file_reads_exactly_the_range_or_fails() {
    let dir = tempfile::tempdir().unwrap();
    check_ranges(&FileRemote::new("file", dir.path())).await;
}

#[tokio::test]
async fn s3_reads_exactly_the_range_or_fails() {
    let moto = Moto::start();
    let url = format!(
        "s3://ranges/?access_key_id={KEY_ID}&secret_access_key={SECRET}&endpoint={}",
        moto.endpoint
    );
    check_ranges(&*opened("s3", &url).await).await;
}

#[tokio::test]
async fn oras_reads_exactly_the_range_or_fails() {
    let registry = Registry::anonymous();
    check_ranges(&*opened("oras", &registry.url("ns")).await).await;
}
