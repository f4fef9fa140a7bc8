//! Hostile and damaged pods, and interrupted saves: load refuses unsafe paths and damaged data
//! without leaving partial files, and a killed save leaves no visible version.

mod support;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use filetime::FileTime;

use podfs::pod::manifest::{Entry, FORMAT, Kind, Manifest, VersionInfo, VersionObject};
use support::{Podfs, file_entry, snapshot};

/// Writes a hand-made version 1 of `pod` into the default remote: a state object holding
/// `state` and a version object listing `entries`.
fn plant(p: &Podfs, pod: &str, entries: Vec<Entry>, state: &[u8]) {
    let files = entries.iter().filter(|e| e.kind == Kind::File);
    let obj = VersionObject {
        info: VersionInfo {
            format: FORMAT,
            pod: pod.into(),
            version: 1,
            parent: None,
            created_at: "2026-01-01T00:00:00Z".into(),
            message: String::new(),
            creator: "attacker".into(),
            tool_version: "hand-made".into(),
            file_count: files.clone().count() as u64,
            logical_bytes: files.map(|e| e.size).sum(),
            stored_bytes: state.len() as u64,
            states: vec![1],
            state_ids: Default::default(),
        },
        manifest: Manifest::new(entries),
    };
    std::fs::create_dir_all(p.pods_dir()).unwrap();
    std::fs::write(
        p.pods_dir()
            .join(format!("localstack-pod-{pod}-state-1.zip")),
        state,
    )
    .unwrap();
    std::fs::write(
        p.pods_dir()
            .join(format!("localstack-pod-{pod}-version-1.zip")),
        obj.encode().unwrap(),
    )
    .unwrap();
}

fn temp_files_left(dir: &Path) -> Vec<String> {
    snapshot(dir)
        .into_keys()
        .filter(|k| k.contains(".podfs-load-"))
        .collect()
}

#[test]
fn unsafe_manifest_paths_are_refused_and_nothing_is_written() {
    let p = Podfs::new();
    let work = tempfile::tempdir().unwrap();
    let data = b"owned";
    for (i, bad) in ["../escape", "/etc/podfs-escape", "a\0b", "dir/../../escape"]
        .iter()
        .enumerate()
    {
        let pod = format!("evil{i}");
        plant(&p, &pod, vec![file_entry(bad, data, 0)], data);
        let into = work.path().join(format!("into{i}"));
        let stderr = p.fails(
            &["load", &pod, "--into", into.to_str().unwrap()],
            "unsafe path",
        );
        assert!(stderr.contains("refusing to load"), "{stderr}");
        assert!(!into.exists(), "nothing is created for a refused pod");
    }
    assert!(!work.path().join("escape").exists());
    assert!(!Path::new("/etc/podfs-escape").exists());
}

#[test]
fn a_file_under_a_symlink_of_the_pod_is_refused() {
    let p = Podfs::new();
    let work = tempfile::tempdir().unwrap();
    let link = Entry {
        path: "link".into(),
        kind: Kind::Symlink,
        mode: 0o777,
        mtime: 0,
        mtime_nsec: 0,
        size: 0,
        target: Some(work.path().to_str().unwrap().into()),
        data: None,
    };
    plant(
        &p,
        "via-link",
        vec![link, file_entry("link/planted", b"x", 0)],
        b"x",
    );
    let into = work.path().join("into");
    p.fails(
        &["load", "via-link", "--into", into.to_str().unwrap()],
        "parent is not a directory",
    );
    assert!(!work.path().join("planted").exists());
}

#[test]
fn unsafe_names_inside_the_version_zip_are_refused() {
    let p = Podfs::new();
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("f"), "x").unwrap();
    p.ok(&["save", "zipname", "--from", work.path().to_str().unwrap()]);
    // Rebuild the version zip with an extra entry named "../x".
    let path = p.pods_dir().join("localstack-pod-zipname-version-1.zip");
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&path).unwrap()).unwrap();
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for i in 0..zip.len() {
        out.raw_copy_file(zip.by_index(i).unwrap()).unwrap();
    }
    out.start_file("../x", zip::write::SimpleFileOptions::default())
        .unwrap();
    out.write_all(b"evil").unwrap();
    std::fs::write(&path, out.finish().unwrap().into_inner()).unwrap();
    let into = work.path().join("into");
    p.fails(
        &["load", "zipname", "--into", into.to_str().unwrap()],
        "unsafe path \"../x\"",
    );
    assert!(!work.path().join("x").exists());
}

#[test]
fn data_pointing_outside_the_state_object_is_refused() {
    let p = Podfs::new();
    let work = tempfile::tempdir().unwrap();
    plant(
        &p,
        "outside",
        vec![file_entry("f", b"0123456789", 1000)],
        b"0123456789",
    );
    let into = work.path().join("into");
    p.fails(
        &["load", "outside", "--into", into.to_str().unwrap()],
        "truncated",
    );
    assert!(!into.join("f").exists());
    assert!(temp_files_left(&into).is_empty());
}

#[test]
fn corrupted_or_truncated_objects_give_a_clear_error_and_no_partial_files() {
    let p = Podfs::new();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let big: Vec<u8> = (0..5_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(src.join("big"), &big).unwrap();
    std::fs::write(src.join("small"), "small file").unwrap();
    p.ok(&["save", "damaged", "--from", src.to_str().unwrap()]);
    let state = p.pods_dir().join("localstack-pod-damaged-state-1.zip");
    let version = p.pods_dir().join("localstack-pod-damaged-version-1.zip");

    // Flip one byte in the middle of the big file's data: CRC mismatch.
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&state, &bytes).unwrap();
    let into = work.path().join("into");
    p.fails(
        &["load", "damaged", "--into", into.to_str().unwrap()],
        "CRC-32 mismatch",
    );
    assert!(!into.join("big").exists(), "no damaged file is left behind");
    assert!(temp_files_left(&into).is_empty());

    // A truncated state object.
    std::fs::write(&state, &bytes[..mid]).unwrap();
    p.fails(
        &["load", "damaged", "--into", into.to_str().unwrap()],
        "truncated",
    );
    assert!(!into.join("big").exists());
    assert!(temp_files_left(&into).is_empty());

    // A truncated version object.
    let v = std::fs::read(&version).unwrap();
    std::fs::write(&version, &v[..v.len() / 2]).unwrap();
    p.fails(
        &["load", "damaged", "--into", into.to_str().unwrap()],
        "is corrupt",
    );
}

#[test]
fn a_save_killed_half_way_leaves_no_version_and_the_next_save_succeeds() {
    let p = Podfs::new();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    // Big enough that the save is still zipping when we kill it.
    let mut f = std::fs::File::create(src.join("big")).unwrap();
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i ^ (i >> 7)) as u8).collect();
    for _ in 0..600 {
        f.write_all(&chunk).unwrap();
    }
    drop(f);
    let mut child = p
        .command()
        .args(["save", "killed", "--from", src.to_str().unwrap()])
        .spawn()
        .unwrap();
    // Wait until the state zip is being written, then SIGKILL.
    let staging = p.home.path().join("staging");
    let deadline = Instant::now() + Duration::from_secs(120);
    let started = loop {
        let busy = std::fs::read_dir(&staging)
            .map(|rd| {
                rd.flatten()
                    .any(|e| e.metadata().map(|m| m.len() > 0).unwrap_or(false))
            })
            .unwrap_or(false);
        if busy || Instant::now() > deadline {
            break busy;
        }
        if child.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(started, "the save never started writing its state zip");
    child.kill().unwrap();
    child.wait().unwrap();

    // The killed save's staged zip is left behind; age it past the sweep's grace period.
    let leftovers: Vec<_> = std::fs::read_dir(&staging)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(!leftovers.is_empty());
    for path in &leftovers {
        filetime::set_file_mtime(path, FileTime::from_unix_time(1_000_000_000, 0)).unwrap();
    }

    p.fails(&["versions", "killed"], "does not exist");
    p.fails(
        &[
            "load",
            "killed",
            "--into",
            work.path().join("x").to_str().unwrap(),
        ],
        "does not exist",
    );
    let out = p.ok(&["save", "killed", "--from", src.to_str().unwrap()]);
    assert!(out.contains("Saved version 1"), "{out}");
    for path in &leftovers {
        assert!(!path.exists(), "the next save sweeps {}", path.display());
    }
    let into = work.path().join("into");
    p.ok(&["load", "killed", "--into", into.to_str().unwrap()]);
    support::assert_same_tree(&src, &into);
}

#[test]
fn concurrent_saves_on_a_file_remote_get_distinct_versions() {
    let p = Podfs::new();
    let work = tempfile::tempdir().unwrap();
    let dirs: Vec<_> = (0..4)
        .map(|i| {
            let d = work.path().join(format!("src{i}"));
            std::fs::create_dir(&d).unwrap();
            // Sizes differ: the quick check (size + mtime) must not confuse the writers' files.
            std::fs::write(d.join("who"), format!("writer {i}{}", "!".repeat(i))).unwrap();
            std::fs::write(d.join(format!("only-{i}")), vec![i as u8; 300_000]).unwrap();
            d
        })
        .collect();
    let children: Vec<_> = dirs
        .iter()
        .map(|d| {
            p.command()
                .args(["save", "race", "--from", d.to_str().unwrap(), "--json"])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut versions = Vec::new();
    for (child, dir) in children.into_iter().zip(&dirs) {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        versions.push((v["version"].as_u64().unwrap(), dir.clone()));
    }
    let mut numbers: Vec<_> = versions.iter().map(|(v, _)| *v).collect();
    numbers.sort();
    numbers.dedup();
    assert_eq!(
        numbers.len(),
        4,
        "every save got its own version: {versions:?}"
    );
    for (v, dir) in versions {
        let into = work.path().join(format!("into{v}"));
        p.ok(&[
            "load",
            &format!("race:{v}"),
            "--into",
            into.to_str().unwrap(),
        ]);
        support::assert_same_tree(&dir, &into);
    }
}
