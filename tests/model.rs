//! A reference model for save → load: random sequences of tree changes are saved as versions
//! of a pod on a file remote, then every version is loaded back and must equal the tree that
//! was saved, whatever reuse of earlier state objects the incremental saves did. Also checks
//! that the version-object parser never panics on damaged input.

mod support;

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::sync::Arc;

use filetime::FileTime;
use podfs::pod::PodName;
use podfs::pod::load::{LoadParams, Strategy as LoadStrategy, load};
use podfs::pod::manifest::VersionObject;
use podfs::pod::save::{SaveParams, save};
use podfs::progress::{NoProgress, Progress};
use podfs::remote::Remote;
use podfs::remote::file::FileRemote;
use proptest::prelude::*;

/// Paths the model may put things at; their directories always exist.
const PATHS: [&str; 7] = ["f1", "f2", "d1/f3", "d1/f4", "d1/d2/f5", "d3/f6", "d3/f7"];
const DIRS: [&str; 4] = ["d1", "d1/d2", "d3", "empty"];

#[derive(Debug, Clone)]
enum Node {
    Absent,
    File { bytes: Vec<u8>, mode: u32 },
    Symlink(String),
}

fn node() -> impl Strategy<Value = Node> {
    prop_oneof![
        1 => Just(Node::Absent),
        4 => (
            prop_oneof![
                4 => proptest::collection::vec(any::<u8>(), 0..2048),
                1 => (0usize..3, any::<u8>()).prop_map(|(mb, b)| vec![b; (mb << 20) + 7]),
            ],
            prop_oneof![Just(0o644u32), Just(0o600), Just(0o755)]
        )
            .prop_map(|(bytes, mode)| Node::File { bytes, mode }),
        1 => "[a-z./]{1,12}".prop_map(Node::Symlink),
    ]
}

/// Applies one step of changes to `root`. Every written file gets a new, unique mtime, so the
/// size+mtime quick check is never fooled (that limit is documented, not modelled).
fn apply(root: &Path, changes: &[(usize, Node)], clock: &mut i64) {
    for (i, node) in changes {
        let path = root.join(PATHS[*i]);
        if let Ok(md) = std::fs::symlink_metadata(&path) {
            assert!(!md.is_dir());
            std::fs::remove_file(&path).unwrap();
        }
        *clock += 1;
        match node {
            Node::Absent => {}
            Node::File { bytes, mode } => {
                std::fs::write(&path, bytes).unwrap();
                std::fs::set_permissions(&path, PermissionsExt::from_mode(*mode)).unwrap();
                filetime::set_file_mtime(&path, FileTime::from_unix_time(*clock, 7)).unwrap();
            }
            Node::Symlink(target) => symlink(target, &path).unwrap(),
        }
    }
}

fn run_model(steps: Vec<Vec<(usize, Node)>>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    for d in DIRS {
        std::fs::create_dir_all(work.join(d)).unwrap();
    }
    let remote: Arc<dyn Remote> = Arc::new(FileRemote::new("model", &tmp.path().join("remote")));
    let pod = PodName::new("model").unwrap();
    let progress: Arc<dyn Progress> = Arc::new(NoProgress);
    let params = SaveParams {
        staging_dir: tmp.path().join("staging"),
        ..SaveParams::default()
    };
    let mut clock = 1_600_000_000;
    let mut saved = Vec::new();
    for changes in &steps {
        apply(&work, changes, &mut clock);
        let out = rt
            .block_on(save(&*remote, &pod, &work, &params, &progress))
            .unwrap();
        if let Some(v) = out.version {
            saved.push((v, support::snapshot(&work)));
        } else {
            let (_, last) = saved.last().expect("the first save always makes a version");
            assert_eq!(
                last,
                &support::snapshot(&work),
                "no version only when nothing changed"
            );
        }
    }
    for (v, expected) in &saved {
        let into = tmp.path().join(format!("load-{v}"));
        rt.block_on(load(
            &*remote,
            &pod,
            Some(*v),
            &into,
            &LoadParams {
                strategy: LoadStrategy::Overwrite,
                ..LoadParams::default()
            },
            &progress,
        ))
        .unwrap();
        assert_eq!(expected, &support::snapshot(&into), "version {v}");
    }
    // Loading the first version over the last one with overwrite gives exactly the first.
    if let (Some((v1, first)), Some(_)) = (saved.first(), saved.last()) {
        let into = tmp.path().join(format!("load-{}", saved.last().unwrap().0));
        rt.block_on(load(
            &*remote,
            &pod,
            Some(*v1),
            &into,
            &LoadParams {
                strategy: LoadStrategy::Overwrite,
                ..LoadParams::default()
            },
            &progress,
        ))
        .unwrap();
        assert_eq!(first, &support::snapshot(&into));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn every_saved_version_loads_back_exactly(
        steps in proptest::collection::vec(
            proptest::collection::vec((0..PATHS.len(), node()), 0..6),
            1..5,
        )
    ) {
        run_model(steps);
    }

    /// Damaged version objects are rejected with an error, never a panic. The seeds are a real
    /// version zip and the hand-crafted hostile objects of the hardening issue.
    #[test]
    fn version_parser_survives_damage(
        seed in 0..SEEDS,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let (version, bytes) = seed_object(seed);
        let mut damaged = bytes.to_vec();
        for (at, b) in flips {
            let i = at.index(damaged.len());
            damaged[i] ^= b | 1;
        }
        let pod = PodName::new("p").unwrap();
        let _ = VersionObject::decode(&pod, version, damaged.clone().into());
        let _ = podfs::pod::manifest::decode_info(&pod, version, damaged.clone().into());
        damaged.truncate(cut.index(damaged.len()));
        prop_assert!(VersionObject::decode(&pod, version, damaged.into()).is_err());
    }
}

/// How many seeds [`seed_object`] has.
const SEEDS: usize = 7;

/// Seed `i` of the damage test: (version, version zip). Seed 0 is real; the others are the
/// hostile objects of the hardening issue, each refused as it is.
fn seed_object(i: usize) -> (u64, bytes::Bytes) {
    let real = sample_version_zip();
    let pod = PodName::new("p").unwrap();
    let good = VersionObject::decode(&pod, 1, real.clone()).unwrap();
    let info = serde_json::to_vec(&good.info).unwrap();
    let manifest = serde_json::to_vec(&good.manifest).unwrap();
    let zip_of = |entries: &[(&str, &[u8])]| bytes::Bytes::from(support::zip_of(entries));
    let padded = |json: &[u8], pad: usize| {
        let mut v = json.to_vec();
        v.resize(v.len() + pad, b' ');
        v
    };
    match i {
        0 => (1, real),
        // Two manifest.json entries: the second must not win.
        1 => (
            1,
            zip_of(&[
                ("version.json", &info),
                ("manifest.json", &manifest),
                ("manifest.json", br#"{"format":1,"entries":[]}"#),
            ]),
        ),
        // version.json past its 1 MiB limit (whitespace).
        2 => (
            1,
            zip_of(&[
                ("version.json", &padded(&info, 1 << 20)),
                ("manifest.json", &manifest),
            ]),
        ),
        // A string longer than any path.
        3 => {
            let long = format!(
                r#"{{"format":1,"entries":[{{"path":"{}","kind":"dir","mode":493,"mtime":0}}]}}"#,
                "a".repeat(40 << 10)
            );
            (
                1,
                zip_of(&[("version.json", &info), ("manifest.json", long.as_bytes())]),
            )
        }
        // mtime_nsec of a second and a half.
        4 => {
            let mut obj = good.clone();
            obj.manifest.entries[0].mtime_nsec = 1_500_000_000;
            (1, obj.encode().unwrap())
        }
        // The largest version number (valid: save must refuse to go past it).
        5 => {
            let mut obj = good.clone();
            obj.info.version = u64::MAX;
            (u64::MAX, obj.encode().unwrap())
        }
        // A manifest padded with whitespace (valid: padding costs no memory).
        _ => (
            1,
            zip_of(&[
                ("version.json", &info),
                ("manifest.json", &padded(&manifest, 4 << 20)),
            ]),
        ),
    }
}

#[test]
fn the_hostile_seeds_are_refused_and_the_valid_ones_read() {
    let pod = PodName::new("p").unwrap();
    for i in 0..SEEDS {
        let (version, bytes) = seed_object(i);
        let decoded = VersionObject::decode(&pod, version, bytes);
        let valid = matches!(i, 0 | 5 | 6);
        assert_eq!(decoded.is_ok(), valid, "seed {i}: {:?}", decoded.err());
    }
}

/// A real version zip, made by saving a small tree.
fn sample_version_zip() -> bytes::Bytes {
    static ONCE: std::sync::OnceLock<bytes::Bytes> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().join("w");
        std::fs::create_dir_all(work.join("d")).unwrap();
        std::fs::write(work.join("d/f"), "hello").unwrap();
        symlink("d/f", work.join("l")).unwrap();
        let remote: Arc<dyn Remote> = Arc::new(FileRemote::new("r", &tmp.path().join("r")));
        let pod = PodName::new("p").unwrap();
        let params = SaveParams {
            staging_dir: tmp.path().join("s"),
            ..SaveParams::default()
        };
        let progress: Arc<dyn Progress> = Arc::new(NoProgress);
        rt.block_on(save(&*remote, &pod, &work, &params, &progress))
            .unwrap();
        rt.block_on(remote.read_version(&pod, 1)).unwrap()
    })
    .clone()
}
