//! Tests of the block cache, each on its own temp dir.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use filetime::FileTime;

use super::*;

const BS: u64 = 4096;

/// Key of block `n` (offset `n * BS`) of state `id`.
fn key(id: u8, n: u64) -> BlockKey {
    let pod = PodName::new("p").unwrap();
    BlockKey::new("r", &pod, Some(&format!("{id:032x}")), n * BS, BS).unwrap()
}

/// The true bytes of `key`.
fn data(key: &BlockKey) -> Bytes {
    let seed = key.state_id.bytes().last().unwrap_or(0) as u64 * 7919 + key.offset;
    (0..key.len)
        .map(|i| ((seed + i * 31) % 251) as u8)
        .collect()
}

/// A fetch of `key`'s true bytes that counts its calls.
fn fetch(key: &BlockKey, calls: &Arc<AtomicUsize>) -> impl Future<Output = Result<Bytes, String>> {
    let (bytes, calls) = (data(key), Arc::clone(calls));
    async move {
        calls.fetch_add(1, SeqCst);
        Ok(bytes)
    }
}

/// The verifier the mount would pass: the block's checksum, as the manifest gives it.
fn verify(key: &BlockKey) -> impl Fn(&[u8]) -> Result<(), String> + use<> {
    let want = crc32fast::hash(&data(key));
    move |b: &[u8]| {
        (crc32fast::hash(b) == want)
            .then_some(())
            .ok_or_else(|| "checksum mismatch".to_owned())
    }
}

fn config(dir: Option<&std::path::Path>) -> CacheConfig {
    CacheConfig {
        memory_bytes: 64 * BS,
        disk_dir: dir.map(Into::into),
        disk_bytes: 1 << 20,
        block_size: BS,
    }
}

/// A cache with no room in memory, so every get goes to disk.
fn disk_only(dir: &std::path::Path, disk_bytes: u64) -> BlockCache {
    BlockCache::new(CacheConfig {
        memory_bytes: 0,
        disk_bytes,
        ..config(Some(dir))
    })
    .unwrap()
}

/// Gets `key` through `cache`, checking the bytes.
async fn get(cache: &BlockCache, key: &BlockKey, calls: &Arc<AtomicUsize>) {
    let got = cache
        .get_or_fetch(key, fetch(key, calls), verify(key))
        .await
        .unwrap();
    assert_eq!(got, data(key), "{key:?}");
}

#[tokio::test]
async fn a_memory_hit_does_not_fetch() {
    let cache = BlockCache::new(config(None)).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    for _ in 0..3 {
        get(&cache, &key(1, 0), &calls).await;
    }
    assert_eq!(calls.load(SeqCst), 1);
    let s = cache.stats();
    assert_eq!((s.memory_hits, s.memory_misses, s.fetches), (2, 1, 1));
    assert!(!s.disk_enabled);
}

#[tokio::test]
async fn memory_is_bounded_in_bytes_and_evicts_the_least_recently_used() {
    // Room for two 4 KiB blocks and their keys, not three.
    let cache = BlockCache::new(CacheConfig {
        memory_bytes: 2 * BS + 1024,
        ..config(None)
    })
    .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let (a, b, c) = (key(1, 0), key(1, 1), key(1, 2));
    get(&cache, &a, &calls).await;
    get(&cache, &b, &calls).await;
    get(&cache, &a, &calls).await; // a is now the most recently used
    get(&cache, &c, &calls).await; // evicts b
    assert_eq!(calls.load(SeqCst), 3);
    get(&cache, &a, &calls).await;
    get(&cache, &c, &calls).await;
    assert_eq!(calls.load(SeqCst), 3, "a and c stayed");
    get(&cache, &b, &calls).await;
    assert_eq!(calls.load(SeqCst), 4, "b was evicted");
    let s = cache.stats();
    assert_eq!(s.memory_evictions, 2);
    assert!(s.memory_bytes <= 2 * BS + 1024, "{s:?}");
}

#[tokio::test]
async fn the_disk_tier_survives_a_new_cache_on_the_same_dir() {
    let dir = tempfile::tempdir().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    {
        let cache = BlockCache::new(config(Some(dir.path()))).unwrap();
        get(&cache, &key(1, 0), &calls).await;
        cache.flush().await;
        assert_eq!(cache.stats().disk_writes, 1);
    }
    let cache = BlockCache::new(config(Some(dir.path()))).unwrap();
    assert!(cache.stats().disk_bytes > BS, "size learnt at open");
    get(&cache, &key(1, 0), &calls).await;
    get(&cache, &key(1, 0), &calls).await;
    assert_eq!(calls.load(SeqCst), 1, "no second fetch");
    let s = cache.stats();
    assert_eq!((s.disk_hits, s.memory_hits), (1, 1));
}

#[tokio::test]
async fn the_disk_bound_evicts_the_least_recently_used() {
    let dir = tempfile::tempdir().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let keys: Vec<_> = (0..5).map(|n| key(2, n)).collect();
    let probe = disk_only(dir.path(), 1 << 20);
    get(&probe, &keys[0], &calls).await;
    probe.flush().await;
    let file_len = probe.stats().disk_bytes;
    // Room for four block files; eviction goes down to 90%, i.e. three.
    let cache = disk_only(dir.path(), 4 * file_len + 10);
    let disk = cache.disk.clone().unwrap();
    for k in &keys[1..4] {
        get(&cache, k, &calls).await;
    }
    cache.flush().await;
    // Ages: keys[0] oldest ... keys[3] newest, a second apart.
    let now = SystemTime::now();
    for (i, k) in keys[..4].iter().enumerate() {
        let t = now - Duration::from_secs(100 - i as u64);
        filetime::set_file_mtime(disk.block_path(k), FileTime::from_system_time(t)).unwrap();
    }
    get(&cache, &keys[0], &calls).await; // a disk hit: now the most recently used
    assert_eq!(calls.load(SeqCst), 4);
    get(&cache, &keys[4], &calls).await; // a fifth file: over the bound
    cache.flush().await;
    let present: Vec<bool> = keys.iter().map(|k| disk.block_path(k).exists()).collect();
    assert_eq!(present, [true, false, false, true, true]);
    let s = cache.stats();
    assert_eq!(s.disk_evictions, 2);
    assert_eq!(s.disk_bytes, 3 * file_len);
    // A mount started with a smaller bound evicts at once, keeping the most recent (mtimes
    // are coarse: make the order plain).
    let t = FileTime::from_system_time(now - Duration::from_secs(10));
    filetime::set_file_mtime(disk.block_path(&keys[0]), t).unwrap();
    let small = disk_only(dir.path(), 2 * file_len);
    assert_eq!(small.stats().disk_bytes, file_len);
    assert!(disk.block_path(&keys[4]).exists());
}

#[tokio::test]
async fn a_flipped_byte_on_disk_is_dropped_and_fetched_again() {
    let dir = tempfile::tempdir().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let k = key(3, 0);
    let cache = disk_only(dir.path(), 1 << 20);
    get(&cache, &k, &calls).await;
    cache.flush().await;
    let path = cache.disk.as_ref().unwrap().block_path(&k);
    let mut file = std::fs::read(&path).unwrap();
    let last = file.len() - 1;
    file[last] ^= 1;
    std::fs::write(&path, &file).unwrap();
    get(&cache, &k, &calls).await;
    assert_eq!(calls.load(SeqCst), 2);
    assert_eq!(cache.stats().disk_damaged, 1);
    cache.flush().await;
    get(&cache, &k, &calls).await;
    assert_eq!(
        calls.load(SeqCst),
        2,
        "the refetched block was cached again"
    );
}

#[tokio::test]
async fn a_whole_disk_block_the_verifier_refuses_is_dropped_and_fetched_again() {
    let dir = tempfile::tempdir().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let k = key(3, 1);
    let cache = disk_only(dir.path(), 1 << 20);
    // A well-formed file (header, CRC) holding the wrong bytes: only the verifier can tell.
    let wrong = vec![0u8; BS as usize];
    cache
        .disk
        .as_ref()
        .unwrap()
        .put(&k, &wrong, &cache.counters);
    get(&cache, &k, &calls).await;
    assert_eq!(calls.load(SeqCst), 1);
    let s = cache.stats();
    assert_eq!((s.disk_verify_failures, s.disk_hits), (1, 0));
    cache.flush().await;
    get(&cache, &k, &calls).await;
    assert_eq!(calls.load(SeqCst), 1, "the good block replaced the bad one");
}

#[tokio::test]
async fn foreign_and_garbage_files_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let k = key(4, 0);
    let path = {
        let cache = disk_only(dir.path(), 1 << 20);
        cache.disk.as_ref().unwrap().block_path(&k)
    };
    let v1 = dir.path().join("v1");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, b"garbage where a block should be").unwrap();
    std::fs::write(v1.join("README"), b"not ours").unwrap();
    std::fs::create_dir_all(v1.join("zz")).unwrap();
    std::fs::write(v1.join("zz/x"), b"not ours either").unwrap();
    // Tiny bound: every write scans and evicts, and must leave foreign files alone.
    let cache = disk_only(dir.path(), BS);
    get(&cache, &k, &calls).await;
    get(&cache, &key(4, 1), &calls).await;
    cache.flush().await;
    assert_eq!(calls.load(SeqCst), 2);
    assert_eq!(cache.stats().disk_damaged, 1);
    assert!(v1.join("README").exists() && v1.join("zz/x").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_caches_on_one_dir_serve_the_right_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    // Small enough that both evict while the other reads.
    let caches = [
        Arc::new(disk_only(dir.path(), 24 * BS)),
        Arc::new(disk_only(dir.path(), 24 * BS)),
    ];
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let cache = Arc::clone(&caches[t as usize % 2]);
        let calls = Arc::clone(&calls);
        tasks.push(tokio::spawn(async move {
            for i in 0..64u64 {
                let k = key((i * 7 + t) as u8 % 3, (i * 13 + t) % 40);
                get(&cache, &k, &calls).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for c in &caches {
        c.flush().await;
        let s = c.stats();
        assert_eq!((s.disk_damaged, s.disk_verify_failures), (0, 0), "{s:?}");
    }
    assert!(
        calls.load(SeqCst) < 8 * 64,
        "the disk tier served some reads"
    );
}

#[tokio::test]
async fn concurrent_gets_of_one_block_fetch_it_once() {
    let cache = BlockCache::new(config(None)).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let k = key(5, 0);
    let slow = || {
        let inner = fetch(&k, &calls);
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            inner.await
        }
    };
    let gets = (0..16).map(|_| cache.get_or_fetch(&k, slow(), verify(&k)));
    for got in futures::future::join_all(gets).await {
        assert_eq!(got.unwrap(), data(&k));
    }
    assert_eq!(calls.load(SeqCst), 1);
    assert_eq!(cache.stats().coalesced, 15);
    assert!(cache.in_flight.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_failed_fetch_is_returned_and_not_remembered() {
    let dir = tempfile::tempdir().unwrap();
    let cache = BlockCache::new(config(Some(dir.path()))).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let k = key(6, 0);
    let failing = async { Err::<Bytes, _>("remote down".to_owned()) };
    let err = cache.get_or_fetch(&k, failing, verify(&k)).await;
    assert_eq!(err.unwrap_err(), "remote down");
    // Wrong bytes from the remote: the verifier's error, and nothing cached.
    let wrong = async { Ok::<_, String>(Bytes::from(vec![1u8; BS as usize])) };
    let err = cache.get_or_fetch(&k, wrong, verify(&k)).await;
    assert_eq!(err.unwrap_err(), "checksum mismatch");
    get(&cache, &k, &calls).await;
    cache.flush().await;
    assert_eq!(calls.load(SeqCst), 1);
    let s = cache.stats();
    assert_eq!(
        (s.fetch_errors, s.remote_verify_failures, s.fetches),
        (1, 1, 1)
    );
    assert_eq!(s.disk_writes, 1, "{s:?}");
}

#[tokio::test]
async fn states_without_an_identity_are_never_cached() {
    let pod = PodName::new("p").unwrap();
    assert!(BlockKey::new("r", &pod, None, 0, BS).is_none());
    assert!(BlockKey::new("r", &pod, Some("not-an-id"), 0, BS).is_none());
    let dir = tempfile::tempdir().unwrap();
    let cache = BlockCache::new(config(Some(dir.path()))).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let k = BlockKey {
        state_id: String::new(),
        ..key(7, 0)
    };
    get(&cache, &k, &calls).await;
    get(&cache, &k, &calls).await;
    cache.flush().await;
    assert_eq!(calls.load(SeqCst), 2);
    let s = cache.stats();
    assert_eq!((s.uncached, s.disk_writes), (2, 0));
}

#[tokio::test]
async fn an_unusable_disk_dir_is_a_setup_error_and_a_failing_disk_means_memory_only() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let err = BlockCache::new(config(Some(&file))).err().unwrap();
    assert!(matches!(err, CacheError::DiskDir { .. }), "{err}");
    assert!(err.to_string().contains("--cache-dir"), "{err}");
    assert!(matches!(
        BlockCache::new(CacheConfig {
            block_size: 1000,
            ..config(None)
        }),
        Err(CacheError::BlockSize(1000))
    ));

    // The directory goes away under a running cache (as root, permissions would not stop us).
    let cache = BlockCache::new(config(Some(&dir.path().join("cache")))).unwrap();
    let v1 = dir.path().join("cache/v1");
    std::fs::remove_dir_all(&v1).unwrap();
    std::fs::write(&v1, b"in the way").unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    get(&cache, &key(8, 0), &calls).await;
    cache.flush().await;
    let s = cache.stats();
    assert_eq!((s.disk_write_errors, s.disk_enabled), (1, false));
    get(&cache, &key(8, 0), &calls).await;
    get(&cache, &key(8, 1), &calls).await;
    assert_eq!(calls.load(SeqCst), 2, "memory still serves");
    assert_eq!(
        cache.stats().disk_write_errors,
        1,
        "the disk is no longer tried"
    );
}

/// The key of a whole file of `blocks` blocks of [`BS`] (the last one 100 bytes short), and its
/// blocks' true bytes.
fn whole_file(blocks: u64) -> (BlockKey, Vec<Bytes>) {
    let pod = PodName::new("p").unwrap();
    let len = blocks * BS - 100;
    let key = BlockKey::new("r", &pod, Some(&format!("{:032x}", 9)), 0, len).unwrap();
    let parts = (0..blocks)
        .map(|i| {
            let n = BS.min(len - i * BS);
            (0..n).map(|j| ((i * 7 + j * 13) % 251) as u8).collect()
        })
        .collect();
    (key, parts)
}

/// Polls the copy's status until `want` says yes (the writer and checker run in the background).
async fn wait_for_copy(cache: &BlockCache, key: &BlockKey, want: fn(&CopyStatus) -> bool) {
    for _ in 0..500 {
        if want(&cache.copy_status(key).await) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the copy never got there");
}

/// Temp files and copies under the cache dir.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    walkdir(dir)
        .into_iter()
        .filter(|p| !p.ends_with(".lock"))
        .collect()
}

fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walkdir(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn a_copy_fed_every_block_appears_whole_and_ready() {
    let dir = tempfile::tempdir().unwrap();
    let cache = BlockCache::new(config(Some(dir.path()))).unwrap();
    let (key, parts) = whole_file(5);
    assert!(matches!(cache.copy_status(&key).await, CopyStatus::Missing));
    let writer = cache.start_copy(&key, BS).unwrap();
    // Out of order, one twice: each block is written once, where it belongs.
    for i in [3, 0, 4, 1, 1, 2] {
        writer.add(i, &parts[i as usize]);
    }
    wait_for_copy(&cache, &key, |s| matches!(s, CopyStatus::Ready(_))).await;
    let CopyStatus::Ready(file) = cache.copy_status(&key).await else {
        unreachable!()
    };
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut &file, &mut got).unwrap();
    assert!(
        got == parts.concat(),
        "the copy holds the file's bytes, nothing else"
    );
    assert_eq!(cache.stats().copies_written, 1);
}

/// A copy given up (its handles released first) keeps what it took, as block files: the blocks
/// it took were not written to disk as blocks.
#[tokio::test]
async fn a_copy_left_unfinished_keeps_what_it_took_as_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let cache = BlockCache::new(config(Some(dir.path()))).unwrap();
    let (key, parts) = whole_file(4);
    let writer = cache.start_copy(&key, BS).unwrap();
    writer.add(0, &parts[0]);
    writer.add(1, &parts[1]);
    // A second handle shares the writer.
    let again = cache.start_copy(&key, BS).unwrap();
    assert!(Arc::ptr_eq(&writer, &again));
    drop((writer, again));
    // Waits for the copy's writer to end.
    cache.flush().await;
    assert!(matches!(cache.copy_status(&key).await, CopyStatus::Missing));
    assert_eq!(cache.stats().copies_written, 0);
    assert_eq!(
        files_under(dir.path()).len(),
        2,
        "two block files: no copy, no temp file"
    );
    let cache = disk_only(dir.path(), 1 << 20);
    for i in 0..2 {
        let block = BlockKey {
            offset: key.offset + i * BS,
            len: BS,
            ..key.clone()
        };
        let gone = async { Err::<Bytes, String>("the remote is not asked".into()) };
        let got = cache
            .get_or_fetch(&block, gone, |_: &[u8]| Ok(()))
            .await
            .unwrap();
        assert!(got == parts[i as usize], "block {i} from disk");
    }
}

#[tokio::test]
async fn a_copy_found_on_disk_is_ready_only_once_checked_and_dropped_if_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let (key, parts) = whole_file(3);
    {
        let cache = BlockCache::new(config(Some(dir.path()))).unwrap();
        let writer = cache.start_copy(&key, BS).unwrap();
        for (i, p) in parts.iter().enumerate() {
            writer.add(i as u64, p);
        }
        wait_for_copy(&cache, &key, |s| matches!(s, CopyStatus::Ready(_))).await;
    }
    let check = |parts: Vec<Bytes>| move |i: u64, b: &[u8]| parts[i as usize] == b;
    // Another process: not trusted until checked.
    let cache = BlockCache::new(config(Some(dir.path()))).unwrap();
    assert!(matches!(
        cache.copy_status(&key).await,
        CopyStatus::Unverified(_)
    ));
    cache.check_copy(&key, BS, check(parts.clone()));
    wait_for_copy(&cache, &key, |s| matches!(s, CopyStatus::Ready(_))).await;
    // A third, after a byte of the last block flipped: dropped, never ready.
    let copy = files_under(dir.path())
        .into_iter()
        .find(|p| p.metadata().unwrap().len() == key.len)
        .unwrap();
    let mut bytes = std::fs::read(&copy).unwrap();
    bytes[(2 * BS + 10) as usize] ^= 1;
    std::fs::write(&copy, bytes).unwrap();
    let cache = BlockCache::new(config(Some(dir.path()))).unwrap();
    assert!(matches!(
        cache.copy_status(&key).await,
        CopyStatus::Unverified(_)
    ));
    cache.check_copy(&key, BS, check(parts));
    wait_for_copy(&cache, &key, |s| matches!(s, CopyStatus::Missing)).await;
    assert!(!copy.exists(), "the damaged copy is removed");
    assert_eq!(cache.stats().copies_damaged, 1);
}
