//! Regression tests for the hardening issue: no command and no hostile remote may destroy data or
//! hand out privileges. Each test is named for what it protects; each failed on the code before.
//! Pods are crafted by hand from docs/FORMAT.md, as a careless or compromised writer of a shared
//! remote could leave them.

mod support;

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use podfs::pod::manifest::{Entry, FORMAT, Kind, Manifest, VersionInfo, VersionObject};
use support::{Podfs, file_entry, snapshot, zip_of};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn dir_entry(path: &str) -> Entry {
    Entry {
        path: path.into(),
        kind: Kind::Dir,
        mode: 0o755,
        mtime: 1_700_000_000,
        mtime_nsec: 0,
        size: 0,
        target: None,
        data: None,
    }
}

/// Version `version` of `pod` holding `entries` (files in state object 1).
fn crafted(pod: &str, version: u64, entries: Vec<Entry>) -> VersionObject {
    let files = entries.iter().filter(|e| e.kind == Kind::File);
    let has_files = files.clone().count() > 0;
    VersionObject {
        info: VersionInfo {
            format: FORMAT,
            pod: pod.into(),
            version,
            parent: None,
            created_at: "2026-01-01T00:00:00Z".into(),
            message: String::new(),
            creator: "attacker".into(),
            tool_version: "hand-made".into(),
            file_count: files.clone().count() as u64,
            logical_bytes: files.map(|e| e.size).sum(),
            stored_bytes: 0,
            states: if has_files { vec![1] } else { vec![] },
            state_ids: Default::default(),
        },
        manifest: Manifest::new(entries),
    }
}

fn object_path(p: &Podfs, pod: &str, kind: &str, n: u64) -> PathBuf {
    p.pods_dir()
        .join(format!("localstack-pod-{pod}-{kind}-{n}.zip"))
}

/// Writes raw object bytes into the default remote.
fn plant_raw(p: &Podfs, pod: &str, version: u64, version_zip: &[u8], state: Option<&[u8]>) {
    std::fs::create_dir_all(p.pods_dir()).unwrap();
    if let Some(state) = state {
        std::fs::write(object_path(p, pod, "state", 1), state).unwrap();
    }
    std::fs::write(object_path(p, pod, "version", version), version_zip).unwrap();
}

fn plant(p: &Podfs, obj: &VersionObject, state: Option<&[u8]>) {
    plant_raw(
        p,
        &obj.info.pod,
        obj.info.version,
        &obj.encode().unwrap(),
        state,
    );
}

/// Runs podfs with a deadline: a command that blocks forever is a failure, not a hang.
fn run_within(p: &Podfs, args: &[&str], limit: Duration) -> Output {
    let mut child = p
        .command()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "podfs {args:?} still ran after {limit:?} (it blocks): {}",
                stderr(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// 1. Data loss: overwrite deletes the volume dir.

/// A home directory whose volume dir is the default one below it.
struct Home {
    _tmp: tempfile::TempDir,
    home: PathBuf,
    podfs: Podfs,
}

impl Home {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("home");
        let volume = home.join(".local/share/podfs");
        std::fs::create_dir_all(&volume).unwrap();
        write(&home.join("notes.txt"), b"keep me in the pod");
        write(&home.join("src/main.rs"), b"fn main() {}");
        let podfs = Podfs::new().env("PODFS_HOME", volume.to_str().unwrap());
        Self {
            _tmp: tmp,
            home,
            podfs,
        }
    }

    fn volume(&self) -> PathBuf {
        self.home.join(".local/share/podfs")
    }

    fn h(&self) -> &str {
        self.home.to_str().unwrap()
    }
}

#[test]
fn overwrite_into_a_directory_holding_the_volume_dir_keeps_the_volume_dir() {
    let h = Home::new();
    h.podfs
        .ok(&["remote", "add", "mine", "file:///tmp/podfs-never-used"]);
    h.podfs.ok(&["save", "home", "--from", h.h()]);
    let volume_before = snapshot(&h.volume());
    write(&h.home.join("later.txt"), b"not in the pod");

    let out = h
        .podfs
        .run(&["load", "home", "--into", h.h(), "--strategy", "overwrite"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("podfs's own volume dir"),
        "says what it left alone: {}",
        stderr(&out)
    );
    assert!(
        !h.home.join("later.txt").exists(),
        "overwrite still removes"
    );
    assert_eq!(
        volume_before,
        snapshot(&h.volume()),
        "the volume dir is intact"
    );
    assert!(h.podfs.ok(&["list"]).contains("home"));
    assert!(h.podfs.ok(&["remote", "list"]).contains("mine"));
}

#[test]
fn a_target_inside_the_volume_dir_is_refused_even_before_it_exists() {
    let h = Home::new();
    h.podfs.ok(&["save", "home", "--from", h.h()]);
    let volume = h.volume();
    for into in [
        volume.join("newsub"),
        volume.join("pods/new/.."),
        volume.clone(),
    ] {
        let before = snapshot(&volume);
        h.podfs.fails(
            &["load", "home", "--into", into.to_str().unwrap()],
            "inside podfs's own volume dir",
        );
        assert_eq!(before, snapshot(&volume), "{}", into.display());
    }
    assert!(!volume.join("newsub").exists());
    h.podfs.fails(
        &["save", "x", "--from", volume.join("pods").to_str().unwrap()],
        "inside podfs's own volume dir",
    );
}

#[test]
fn overwrite_into_the_root_directory_is_refused() {
    let p = Podfs::new();
    let src = tempfile::tempdir().unwrap();
    write(&src.path().join("f"), b"x");
    p.ok(&["save", "p", "--from", src.path().to_str().unwrap()]);
    p.fails(
        &[
            "load",
            "p",
            "--into",
            "/",
            "--strategy",
            "overwrite",
            "--dry-run",
        ],
        "refusing to load into /",
    );
}

#[test]
fn a_pod_cannot_write_into_the_volume_dir() {
    let h = Home::new();
    h.podfs
        .ok(&["remote", "add", "mine", "file:///tmp/podfs-never-used"]);
    let remotes_before = std::fs::read(h.volume().join("remotes.toml")).unwrap();
    // A pod saved elsewhere that holds a volume dir of its own, at the same place.
    let evil = tempfile::tempdir().unwrap();
    write(
        &evil.path().join(".local/share/podfs/remotes.toml"),
        b"[remotes]\nevil = \"file:///tmp/evil\"\n",
    );
    write(&evil.path().join(".local/share/podfs/pods/x"), b"junk");
    write(&evil.path().join("ok.txt"), b"fine");
    h.podfs
        .ok(&["save", "evil", "--from", evil.path().to_str().unwrap()]);

    let out = h.podfs.run(&["load", "evil", "--into", h.h()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("left .local/share/podfs alone"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        remotes_before,
        std::fs::read(h.volume().join("remotes.toml")).unwrap()
    );
    assert!(!h.volume().join("pods/x").exists());
    assert_eq!(std::fs::read(h.home.join("ok.txt")).unwrap(), b"fine");
}

#[test]
fn a_pod_cannot_replace_a_directory_that_holds_the_volume_dir() {
    let h = Home::new();
    // `.local` is a symlink in the pod: writing it would remove the real `.local` first.
    let evil = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/tmp", evil.path().join(".local")).unwrap();
    h.podfs
        .ok(&["save", "evil", "--from", evil.path().to_str().unwrap()]);
    let volume_before = snapshot(&h.volume());
    for strategy in ["merge", "overwrite"] {
        let out = h
            .podfs
            .run(&["load", "evil", "--into", h.h(), "--strategy", strategy]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(volume_before, snapshot(&h.volume()), "{strategy}");
        assert!(h.home.join(".local").is_dir() && !h.home.join(".local").is_symlink());
    }
}

/// A tmpfs mounted at `point`, unmounted on drop.
struct TmpMount(PathBuf);

impl TmpMount {
    /// Mounts a tmpfs whose source (as mountinfo shows it) is `source`.
    fn new(point: &Path, source: &str) -> Self {
        std::fs::create_dir_all(point).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m", source])
            .arg(point)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (the tests run as root): {}",
            stderr(&out)
        );
        Self(point.to_owned())
    }
}

impl Drop for TmpMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn save_and_load_never_cross_into_a_podfs_mount() {
    let p = Podfs::new();
    let tree = tempfile::tempdir().unwrap();
    write(&tree.path().join("a.txt"), b"a");
    // A stand-in for a podfs mount: mountinfo names its source "podfs", as the mount does.
    let mount = TmpMount::new(&tree.path().join("mnt"), "podfs");
    write(&mount.0.join("inside.txt"), b"on the mount");
    let t = tree.path().to_str().unwrap();

    let out = p.run(&["save", "tree", "--from", t]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("a podfs mount"), "{}", stderr(&out));
    let inspect = p.ok(&["inspect", "tree"]);
    assert!(!inspect.contains("mnt"), "{inspect}");

    let out = p.run(&["load", "tree", "--into", t, "--strategy", "overwrite"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(mount.0.join("inside.txt")).unwrap(),
        b"on the mount"
    );
    p.fails(
        &[
            "load",
            "tree",
            "--into",
            mount.0.join("sub").to_str().unwrap(),
        ],
        "inside the podfs mount",
    );
}

#[test]
fn one_file_system_leaves_other_mounts_out_of_save_and_load() {
    let p = Podfs::new();
    let tree = tempfile::tempdir().unwrap();
    write(&tree.path().join("a.txt"), b"a");
    let mount = TmpMount::new(&tree.path().join("other"), "tmpfs");
    write(&mount.0.join("inside.txt"), b"another fs");
    let t = tree.path().to_str().unwrap();

    p.ok(&["save", "all", "--from", t]);
    assert!(p.ok(&["inspect", "all"]).contains("other/inside.txt"));
    let out = p.run(&["save", "one", "--from", t, "--one-file-system"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("another file system"),
        "{}",
        stderr(&out)
    );
    assert!(!p.ok(&["inspect", "one"]).contains("other"));

    // Overwrite with a pod that lacks `other/`: only --one-file-system keeps the mount's files.
    let out = p.run(&[
        "load",
        "one",
        "--into",
        t,
        "--strategy",
        "overwrite",
        "--one-file-system",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(mount.0.join("inside.txt").exists());
}

// 2. Privileges.

#[test]
fn setuid_and_setgid_bits_are_not_restored_unless_asked() {
    let p = Podfs::new();
    let src = tempfile::tempdir().unwrap();
    let modes = [
        ("suid", 0o4755),
        ("sgid", 0o2755),
        ("both", 0o6755),
        ("all", 0o7777),
    ];
    for (name, mode) in modes {
        write(&src.path().join(name), b"#!/bin/sh\n");
        std::fs::set_permissions(src.path().join(name), std::fs::Permissions::from_mode(mode))
            .unwrap();
    }
    p.ok(&["save", "setid", "--from", src.path().to_str().unwrap()]);
    let into = tempfile::tempdir().unwrap();
    let i = into.path().to_str().unwrap();
    let out = p.run(&["load", "setid", "--into", i]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cleared setuid/setgid bits on 4 paths"),
        "{}",
        stderr(&out)
    );
    let mode = |name: &str| {
        std::fs::metadata(into.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    for (name, m) in modes {
        assert_eq!(mode(name), m & !0o6000, "{name}");
    }
    // A second load sees nothing to change.
    assert!(p.ok(&["load", "setid", "--into", i]).contains("0 changed"));

    let out = p.run(&["load", "setid", "--into", i, "--keep-setid"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("--keep-setid"), "{}", stderr(&out));
    for (name, m) in modes {
        assert_eq!(mode(name), m, "{name}");
    }
}

// 3. Objects that are not plain files.

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

#[test]
fn objects_that_are_not_plain_files_are_refused_without_blocking() {
    let p = Podfs::new();
    let src = tempfile::tempdir().unwrap();
    write(&src.path().join("f"), b"healthy");
    p.ok(&["save", "healthy", "--from", src.path().to_str().unwrap()]);
    mkfifo(&object_path(&p, "fifo", "version", 1));
    std::os::unix::fs::symlink("/dev/zero", object_path(&p, "zero", "version", 1)).unwrap();
    let limit = Duration::from_secs(60);

    let out = run_within(&p, &["list"], limit);
    assert!(stdout(&out).contains("healthy"), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("not a regular file"),
        "{}",
        stderr(&out)
    );
    for pod in ["fifo", "zero"] {
        let into = src.path().join(format!("into-{pod}"));
        for args in [
            vec!["load", pod, "--into", into.to_str().unwrap()],
            vec!["inspect", pod],
            vec!["versions", pod],
        ] {
            let out = run_within(&p, &args, limit);
            assert!(!out.status.success(), "{args:?}");
            assert!(
                stderr(&out).contains("not a regular file"),
                "{args:?}: {}",
                stderr(&out)
            );
        }
    }

    // A FIFO as the state object of a valid version.
    let obj = crafted("fifostate", 1, vec![file_entry("f", b"data", 0)]);
    plant(&p, &obj, None);
    mkfifo(&object_path(&p, "fifostate", "state", 1));
    let into = tempfile::tempdir().unwrap();
    let out = run_within(
        &p,
        &["load", "fifostate", "--into", into.path().to_str().unwrap()],
        limit,
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a regular file"),
        "{}",
        stderr(&out)
    );
    assert!(
        snapshot(into.path()).is_empty(),
        "no temporary file is left"
    );
}

#[test]
fn an_oversized_version_object_is_refused_before_it_is_read() {
    let p = Podfs::new();
    std::fs::create_dir_all(p.pods_dir()).unwrap();
    // 1 GiB, sparse: reading it would cost 1 GiB of memory.
    let f = std::fs::File::create(object_path(&p, "sparse", "version", 1)).unwrap();
    f.set_len(1 << 30).unwrap();
    let out = run_within(&p, &["inspect", "sparse"], Duration::from_secs(60));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("more than the 536870912 a version object may have"),
        "{}",
        stderr(&out)
    );
}

// 4. Memory proportional to real content.

/// Peak RSS (KiB) of podfs running `args`, measured by GNU time.
fn peak_rss_kib(p: &Podfs, args: &[&str]) -> (Output, u64) {
    let time = support::require("time");
    let report = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new(time);
    cmd.arg("-f").arg("%M").arg("-o").arg(report.path());
    cmd.arg(env!("CARGO_BIN_EXE_podfs")).args(args);
    cmd.env("PODFS_HOME", p.home.path())
        .env("PODFS_LOG", "warn");
    let out = cmd.output().unwrap();
    let kib = std::fs::read_to_string(report.path())
        .unwrap()
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap();
    (out, kib)
}

#[test]
fn a_manifest_padded_to_256_mib_costs_no_memory_for_the_padding() {
    let p = Podfs::new();
    let obj = crafted("padded", 1, vec![dir_entry("d")]);
    let info = serde_json::to_vec(&obj.info).unwrap();
    let mut manifest = br#"{"format": 1, "entries": [{"path": "d", "kind": "dir", "mode": 493, "mtime": 1700000000}"#.to_vec();
    manifest.resize(manifest.len() + (256 << 20), b' ');
    manifest.extend_from_slice(b"]}");
    let zip = zip_of(&[("version.json", &info), ("manifest.json", &manifest)]);
    assert!(zip.len() < 2 << 20, "the object itself is small");
    plant_raw(&p, "padded", 1, &zip, None);
    let (out, kib) = peak_rss_kib(&p, &["inspect", "padded"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("d/"), "{}", stdout(&out));
    assert!(
        kib < 128 << 10,
        "inspect peaked at {kib} KiB for a 2 MiB object"
    );
}

#[test]
fn a_giant_string_in_a_manifest_is_refused_without_holding_it() {
    let p = Podfs::new();
    let obj = crafted("longpath", 1, vec![]);
    let info = serde_json::to_vec(&obj.info).unwrap();
    let mut manifest = br#"{"format": 1, "entries": [{"path": ""#.to_vec();
    manifest.resize(manifest.len() + (256 << 20), b'a');
    manifest.extend_from_slice(br#"", "kind": "dir", "mode": 493, "mtime": 0}]}"#);
    let zip = zip_of(&[("version.json", &info), ("manifest.json", &manifest)]);
    plant_raw(&p, "longpath", 1, &zip, None);
    let (out, kib) = peak_rss_kib(&p, &["inspect", "longpath"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("holds a string longer than"),
        "{}",
        stderr(&out)
    );
    assert!(kib < 128 << 10, "inspect peaked at {kib} KiB");
}

// 5. Overflow.

#[test]
fn a_version_numbered_u64_max_stops_save_with_a_clear_error() {
    let p = Podfs::new();
    plant(&p, &crafted("full", u64::MAX, vec![dir_entry("d")]), None);
    let src = tempfile::tempdir().unwrap();
    write(&src.path().join("f"), b"x");
    p.fails(
        &["save", "full", "--from", src.path().to_str().unwrap()],
        "no number is left for a new version",
    );
    let names: Vec<String> = std::fs::read_dir(p.pods_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [format!("localstack-pod-full-version-{}.zip", u64::MAX)]
    );
}

// 6. Terminal injection.

#[test]
fn text_from_a_remote_reaches_the_terminal_escaped() {
    let p = Podfs::new();
    let data = b"x";
    let evil_path = "a\x1b[31mred\nfake line";
    let mut link = dir_entry("l\u{202e}txt");
    link.kind = Kind::Symlink;
    link.mode = 0o777;
    link.target = Some("\x1b]0;title\x07".into());
    let mut obj = crafted("ansi", 1, vec![file_entry(evil_path, data, 0), link]);
    obj.info.message = "msg\x1b[2J\nVERSION forged".into();
    obj.info.created_at = "2026\x1b[1m".into();
    plant(&p, &obj, Some(data));
    let into = tempfile::tempdir().unwrap();
    let i = into.path().to_str().unwrap();
    for args in [
        vec!["inspect", "ansi"],
        vec!["versions", "ansi"],
        vec!["list"],
        vec!["load", "ansi", "--into", i, "--dry-run"],
    ] {
        let out = p.run(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let text = format!("{}{}", stdout(&out), stderr(&out));
        assert!(!text.contains('\x1b'), "{args:?}: {text:?}");
        assert!(!text.contains('\u{202e}'), "{args:?}: {text:?}");
        assert!(
            !text.contains("\nfake line") && !text.contains("\nVERSION forged"),
            "{args:?}: {text:?}"
        );
        assert!(
            text.contains("\\x1b"),
            "{args:?} shows the escape: {text:?}"
        );
    }
    // JSON stays exact.
    let json = p.ok(&["inspect", "ansi", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["entries"][0]["path"], evil_path);
}

// 7. Strictness.

#[test]
fn a_version_zip_with_two_manifests_is_refused() {
    let p = Podfs::new();
    let good = crafted("dup", 1, vec![dir_entry("d")]);
    let info = serde_json::to_vec(&good.info).unwrap();
    let manifest = serde_json::to_vec(&good.manifest).unwrap();
    let other = serde_json::to_vec(&Manifest::new(vec![dir_entry("e")])).unwrap();
    let zip = zip_of(&[
        ("version.json", &info),
        ("manifest.json", &manifest),
        ("manifest.json", &other),
    ]);
    plant_raw(&p, "dup", 1, &zip, None);
    p.fails(&["inspect", "dup"], "two entries with the same name");
    p.fails(&["versions", "dup"], "two entries with the same name");
}

#[test]
fn nanoseconds_of_a_second_or_more_are_refused() {
    let p = Podfs::new();
    let mut d = dir_entry("d");
    d.mtime_nsec = 1_500_000_000;
    plant(&p, &crafted("nsec", 1, vec![d]), None);
    p.fails(&["inspect", "nsec"], "mtime_nsec 1500000000");
}

#[test]
fn every_command_applies_one_limit_to_version_json() {
    let p = Podfs::new();
    let obj = crafted("bigjson", 1, vec![dir_entry("d")]);
    let mut info = serde_json::to_vec(&obj.info).unwrap();
    info.resize(info.len() + (1 << 20), b' ');
    let manifest = serde_json::to_vec(&obj.manifest).unwrap();
    plant_raw(
        &p,
        "bigjson",
        1,
        &zip_of(&[("version.json", &info), ("manifest.json", &manifest)]),
        None,
    );
    for args in [
        vec!["inspect", "bigjson"],
        vec!["versions", "bigjson"],
        vec!["load", "bigjson", "--dry-run", "--into", "/tmp/podfs-never"],
    ] {
        p.fails(&args, "version.json is larger than 1048576 bytes");
    }
    let out = p.run(&["list"]);
    assert!(
        stderr(&out).contains("version.json is larger than 1048576 bytes"),
        "{}",
        stderr(&out)
    );
}

// 8. Unrelated files in the target.

#[test]
fn files_the_pod_cannot_name_do_not_break_a_load() {
    let p = Podfs::new();
    let src = tempfile::tempdir().unwrap();
    write(&src.path().join("a.txt"), b"a");
    p.ok(&["save", "p", "--from", src.path().to_str().unwrap()]);
    let into = tempfile::tempdir().unwrap();
    let odd = into
        .path()
        .join(std::ffi::OsStr::from_bytes(b"not-utf8-\xff\xfe"));
    std::fs::write(&odd, b"mine").unwrap();
    let odd_dir = into.path().join(std::ffi::OsStr::from_bytes(b"dir-\xff"));
    std::fs::create_dir(&odd_dir).unwrap();
    std::fs::write(odd_dir.join("x"), b"mine").unwrap();
    let i = into.path().to_str().unwrap();

    p.ok(&["load", "p", "--into", i]);
    assert!(
        odd.exists() && odd_dir.join("x").exists(),
        "merge leaves them alone"
    );
    let dry = p.ok(&[
        "load",
        "p",
        "--into",
        i,
        "--strategy",
        "overwrite",
        "--dry-run",
    ]);
    assert!(dry.contains("- not-utf8-"), "{dry}");
    p.ok(&["load", "p", "--into", i, "--strategy", "overwrite"]);
    assert!(!odd.exists() && !odd_dir.exists(), "overwrite removes them");
    support::assert_same_tree(src.path(), into.path());
}

// 9. Interrupts (the S3 multipart case is in tests/s3.rs).

#[test]
fn sigterm_during_a_load_stops_it_cleanly() {
    let p = Podfs::new();
    let src = tempfile::tempdir().unwrap();
    for i in 0..8u8 {
        write(&src.path().join(format!("big{i}")), &vec![i; 64 << 20]);
    }
    p.ok(&["save", "big", "--from", src.path().to_str().unwrap()]);
    let into = tempfile::tempdir().unwrap();
    let mut child = p
        .command()
        .args(["load", "big", "--into", into.path().to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the load to start writing: a temporary file appears.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_dir(into.path()).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".podfs-load-")
    }) {
        assert!(Instant::now() < deadline, "the load never started writing");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the load ended before it could be stopped"
        );
        std::thread::yield_now();
    }
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("interrupted by SIGTERM"), "{err}");
    let left: Vec<_> = snapshot(into.path())
        .into_keys()
        .filter(|k| k.contains(".podfs-load-"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

// 10. Messages.

#[test]
fn errors_name_each_cause_once_in_words() {
    let p = Podfs::new();
    let src = tempfile::tempdir().unwrap();
    write(&src.path().join("a.txt"), b"a");
    p.ok(&["save", "p", "--from", src.path().to_str().unwrap()]);
    std::fs::remove_file(object_path(&p, "p", "state", 1)).unwrap();
    let into = tempfile::tempdir().unwrap();
    let err = p.fails(
        &["load", "p", "--into", into.path().to_str().unwrap()],
        "state object",
    );
    assert!(!err.contains("PodName("), "{err}");
    assert!(err.contains("of pod \"p\""), "{err}");

    let err = p.fails(
        &["save", "p", "--from", "/nonexistent/podfs"],
        "No such file",
    );
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
