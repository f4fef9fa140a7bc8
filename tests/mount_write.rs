//! The write path of the FUSE mount, on real mounts (`/dev/fuse`) and real servers. Changes under
//! `REMOTE/POD/` are staged and become version N+1 when the pod is quiet (no file open for
//! writing, no change for `--save-delay`), on `fsync`/`fsyncdir`, and at unmount. Every check of
//! a saved version loads it with the `podfs` CLI into a fresh directory.
//!
//! Scenarios:
//!
//! - Tools writing whole trees into new pods: `cp -r`, `rsync -a` (temporary file, then rename)
//!   and `tar -x` each give exactly one version, equal to the source; the same `rsync -a` again
//!   transfers nothing and makes no version. A `git clone` into a pod is clean after the save,
//!   and its loaded copy passes `git fsck`.
//! - What a save stores: one byte changed in a 100 MiB file stores that file only; renaming a
//!   directory of 1,000 files, or a chmod, stores no file data.
//! - When saves happen: once quiet and never while a file is open for writing; a new pod once
//!   it has content; `podfs unmount` and SIGTERM save first; every kind of change (create,
//!   write, append, truncate, mkdir, rmdir, unlink, rename over a file, rename of a directory,
//!   symlink, chmod, utimens on files, directories and symlinks) is saved exactly as the mount
//!   shows it.
//! - On every backend (`on_every_backend!`, as in `mount.rs`): `fsync` returns once the version
//!   is on the remote; staged changes survive SIGKILL of the daemon and the next mount saves
//!   them; a version saved meanwhile by another client is kept, with the staged changes saved
//!   on top of it as the next number.
//! - A remote that is down at save time (S3 on a stopped moto): `fsync` is `EIO`, the changes
//!   stay staged and readable, and once the server is back they are committed, nothing lost.
//! - Errors: `.versions/` stays `EROFS`; hard links, FIFOs, chown to another user, removing the
//!   pod's directory are `EPERM`, xattrs `EOPNOTSUPP`; `O_EXCL` and `RENAME_NOREPLACE` onto an
//!   existing name are `EEXIST`, `RENAME_EXCHANGE` works or is `EINVAL`; `O_APPEND`, truncate
//!   and statfs work as on a local disk.
//!
//! Deadlines only say "did not hang"; waits poll for a condition, never sleep a fixed time. "No
//! further version" is measured by a later event: a change made to another pod afterwards is
//! saved once quiet (so any save of the first pod that was pending was due before it), and an
//! `fsync` of the pod's directory saves anything still staged.

#[macro_use]
mod support;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use filetime::FileTime;

use support::backend::Backend;
use support::moto::{KEY_ID, Moto, SECRET};
use support::mount::{Mounted, is_mounted, sample, scrape, wait_until};
use support::{MIB, Node, Podfs, assert_same_tree, copy_tree, make_tree, noise, require, snapshot};

/// How long a save the test waits for may take (far more than it needs: it only says "did not
/// hang").
const SAVED: Duration = Duration::from_secs(120);

on_every_backend!(
    fsync_returns_once_the_version_is_on_the_remote,
    staged_changes_survive_sigkill_and_the_next_mount_saves_them,
    a_version_saved_meanwhile_by_another_client_is_kept_and_the_staged_changes_go_on_top,
);

// --- Helpers. ---

/// `fsync` of a file or a directory (`fsyncdir`), opened read-only: fsync needs no write access.
fn fsync(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// The latest version of `pod` on `b`'s remote, as `podfs list` shows it; 0 when it has none.
fn latest(b: &Backend, pod: &str) -> u64 {
    b.list().get(pod).copied().unwrap_or(0)
}

/// Waits until `pod` has version `n`, then asserts its versions are exactly 1..=n.
fn wait_for_version(b: &Backend, pod: &str, n: u64) {
    wait_until(&format!("version {n} of {pod}"), SAVED, || {
        latest(b, pod) >= n
    });
    assert_eq!(
        b.versions(pod),
        (1..=n).collect::<Vec<_>>(),
        "{pod}: exactly versions 1 to {n}"
    );
}

/// Starts pod `b.pod_named(name)` through the mount with one file and waits until the mount
/// has saved it on its own (once quiet). A save of another pod of the mount that was pending
/// before this call was due before this one.
fn a_quiet_save_of_another_pod(b: &Backend, m: &Mounted, name: &str) {
    let marker = b.pod_named(name);
    let dir = m.pod(b.remote(), &marker);
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("marker.txt"), "saved once quiet\n").unwrap();
    wait_for_version(b, &marker, 1);
}

/// Asserts that the mount makes no version of `pod` past `n`: not on its own (measured by a
/// later quiet save of another pod, `marker`), and not on `fsync` of the pod's directory (which
/// saves anything still staged).
fn assert_stays_at(b: &Backend, m: &Mounted, pod: &str, n: u64, marker: &str) {
    let want: Vec<u64> = (1..=n).collect();
    a_quiet_save_of_another_pod(b, m, marker);
    assert_eq!(b.versions(pod), want, "{pod}: no save after the last one");
    fsync(&m.pod(b.remote(), pod)).unwrap();
    assert_eq!(b.versions(pod), want, "{pod}: fsync found nothing staged");
}

/// `POD_REF` loaded from `b`'s remote with the CLI into a fresh directory.
fn loaded(b: &Backend, pod_ref: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    b.load(pod_ref, dir.path(), &[]);
    dir
}

/// `stored_bytes` of version `n` of `pod`, as `podfs versions --json` shows it.
fn stored_bytes(b: &Backend, pod: &str, n: u64) -> u64 {
    b.versions_json(pod)
        .iter()
        .find(|v| v["version"].as_u64() == Some(n))
        .and_then(|v| v["stored_bytes"].as_u64())
        .unwrap_or_else(|| panic!("{pod}: no stored_bytes for version {n}"))
}

/// A snapshot with directories' mtimes set to 0: for trees whose directories were changed at
/// different moments in two places, or where the tree's history (a crash, a rebase) leaves a
/// directory's mtime open.
fn without_dir_mtimes(mut s: BTreeMap<String, Node>) -> BTreeMap<String, Node> {
    for node in s.values_mut() {
        if let Node::Dir { mtime_ns, .. } = node {
            *mtime_ns = 0;
        }
    }
    s
}

/// A snapshot with every mtime set to 0 (a copy made without `-p`).
fn without_mtimes(mut s: BTreeMap<String, Node>) -> BTreeMap<String, Node> {
    for node in s.values_mut() {
        match node {
            Node::File { mtime_ns, .. } | Node::Dir { mtime_ns, .. } => *mtime_ns = 0,
            Node::Symlink { mtime_ns, .. } => *mtime_ns = 0,
        }
    }
    s
}

/// Asserts two snapshots hold the same paths and nodes, naming the first path that differs.
fn assert_same_nodes(want: &BTreeMap<String, Node>, got: &BTreeMap<String, Node>, what: &str) {
    for (path, node) in want {
        assert_eq!(Some(node), got.get(path), "{what}: {path} differs");
    }
    for path in got.keys() {
        assert!(
            want.contains_key(path),
            "{what}: {path} should not be there"
        );
    }
}

/// `diff -r` without following symlinks: bytes and symlink targets must be identical.
fn assert_diff_clean(expected: &Path, actual: &Path) {
    let out = Command::new(require("diff"))
        .args(["-r", "--no-dereference"])
        .arg(expected)
        .arg(actual)
        .output()
        .expect("run diff");
    assert!(
        out.status.success(),
        "diff -r {} {}:\n{}{}",
        expected.display(),
        actual.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `program` with `args`, asserts success, returns stdout.
fn run(program: &str, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(require(program))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The test tree (`make_tree`) with every mtime that `make_tree` leaves at "now" moved to a fixed
/// past time: rsync 3.5 leaves its own time on a directory or symlink whose mtime is in the
/// current second (see `mount.rs`), and tar's archive should not depend on the clock.
fn aged_tree(root: &Path, big: usize) {
    make_tree(root, big);
    let t = FileTime::from_unix_time(1_700_000_000, 5);
    let mut all: Vec<_> = snapshot(root).into_iter().collect();
    all.reverse(); // children before their directory
    for (rel, node) in all {
        let mtime_ns = match node {
            Node::File { mtime_ns, .. } | Node::Dir { mtime_ns, .. } => mtime_ns,
            Node::Symlink { mtime_ns, .. } => mtime_ns,
        };
        if mtime_ns > 1_650_000_000 * 1_000_000_000 {
            filetime::set_symlink_file_times(root.join(rel), t, t).unwrap();
        }
    }
}

/// A path as a C string for libc calls.
fn c_path(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in a test path")
}

/// The result of a libc call that returns -1 and sets errno on failure.
fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `renameat2(2)` with `flags` (`RENAME_NOREPLACE`, `RENAME_EXCHANGE`).
fn rename2(from: &Path, to: &Path, flags: libc::c_uint) -> std::io::Result<()> {
    let (from, to) = (c_path(from), c_path(to));
    // SAFETY: two valid NUL-terminated paths that outlive the call, relative to AT_FDCWD.
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    })
}

/// Asserts `r` failed with `errno`.
fn assert_errno<T: std::fmt::Debug>(what: &str, r: std::io::Result<T>, errno: i32) {
    let e = r.expect_err(what);
    assert_eq!(e.raw_os_error(), Some(errno), "{what}: {e}");
}

/// Runs `f` on its own thread; fails the test if it has not returned within `limit` (it hangs).
fn within<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what} did not return within {limit:?}"))
}

/// Appends `bytes` to the file at `path`.
fn append(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} to append: {e}", path.display()));
    f.write_all(bytes).unwrap();
}

// --- Tools writing whole trees into new pods (the built-in remote). ---

/// `cp -r SRC MNT/REMOTE/NEW` starts pod NEW and saves it once, when quiet: exactly one version,
/// which loads back as the mount showed it, with SRC's bytes, modes and symlinks (`cp` without
/// `-p` gives its own mtimes).
#[test]
fn cp_r_into_a_new_pod_saves_one_version_equal_to_the_source() {
    let b = Backend::default_remote("cp_r_into_a_new_pod");
    let pod = b.pod();
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path(), 2 * MIB);
    let m = Mounted::new(&b.podfs, &[]);
    let dest = m.pod(b.remote(), &pod);
    // With a fixed umask, `cp -r` keeps the test tree's modes (none has a bit 022 clears).
    let out = Command::new("sh")
        .arg("-c")
        .arg("umask 022 && exec cp -r \"$0\" \"$1\"")
        .arg(src.path())
        .arg(&dest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cp -r: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for_version(&b, &pod, 1);
    assert_stays_at(&b, &m, &pod, 1, "marker");

    let v1 = loaded(&b, &pod);
    assert_same_tree(&dest, v1.path());
    assert_same_nodes(
        &without_mtimes(snapshot(src.path())),
        &without_mtimes(snapshot(v1.path())),
        "version 1 against the source",
    );
    assert_diff_clean(src.path(), v1.path());
}

/// `rsync -a` (each file written to a temporary name, then renamed) into a new pod: exactly
/// one version, equal to the source with modes and mtimes. The same `rsync -a` again finds
/// every file up to date, transfers nothing, and no version follows.
#[test]
fn rsync_into_a_new_pod_saves_one_version_and_the_same_rsync_again_changes_nothing() {
    let b = Backend::default_remote("rsync_into_a_new_pod");
    let pod = b.pod();
    let src = tempfile::tempdir().unwrap();
    aged_tree(src.path(), 2 * MIB);
    let m = Mounted::new(&b.podfs, &[]);
    let dest = m.pod(b.remote(), &pod);
    let rsync = || {
        run(
            "rsync",
            &[
                "-a".as_ref(),
                "-i".as_ref(),
                "--stats".as_ref(),
                format!("{}/", src.path().display()).as_ref(),
                format!("{}/", dest.display()).as_ref(),
            ],
        )
    };
    rsync();
    wait_for_version(&b, &pod, 1);
    assert_stays_at(&b, &m, &pod, 1, "marker1");
    let v1 = loaded(&b, &pod);
    assert_same_tree(src.path(), v1.path());
    assert_same_tree(src.path(), &dest);

    let again = rsync();
    assert!(
        again.contains("Number of regular files transferred: 0"),
        "{again}"
    );
    // Itemized changes (`>f+++++++++ path`, `.d..t...... dir/`): none, but perhaps for the pod's
    // own directory `./`, whose attributes a version need not hold.
    let itemized: Vec<&str> = again
        .lines()
        .filter(|l| {
            let c: Vec<char> = l.chars().take(12).collect();
            c.len() == 12 && "<>ch.*".contains(c[0]) && "fdLDS".contains(c[1]) && c[11] == ' '
        })
        .filter(|l| !l.ends_with(" ./"))
        .collect();
    assert!(itemized.is_empty(), "the second rsync changed: {again}");
    assert_stays_at(&b, &m, &pod, 1, "marker2");
}

/// `tar -x` (POSIX format: nanosecond mtimes) into `mkdir MNT/REMOTE/NEW`: exactly one version,
/// equal to the archived tree with modes, mtimes and symlinks.
#[test]
fn tar_x_into_a_new_pod_saves_one_version_equal_to_the_source() {
    let b = Backend::default_remote("tar_x_into_a_new_pod");
    let pod = b.pod();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    aged_tree(&src, 2 * MIB);
    let archive = work.path().join("tree.tar");
    run(
        "tar",
        &[
            "-C".as_ref(),
            src.as_os_str(),
            "--format=posix".as_ref(),
            "-cf".as_ref(),
            archive.as_os_str(),
            ".".as_ref(),
        ],
    );
    let m = Mounted::new(&b.podfs, &[]);
    let dest = m.pod(b.remote(), &pod);
    std::fs::create_dir(&dest).unwrap();
    run(
        "tar",
        &[
            "-C".as_ref(),
            dest.as_os_str(),
            "-xpf".as_ref(),
            archive.as_os_str(),
        ],
    );
    wait_for_version(&b, &pod, 1);
    assert_stays_at(&b, &m, &pod, 1, "marker");
    let v1 = loaded(&b, &pod);
    assert_same_tree(&src, v1.path());
    assert_same_tree(&src, &dest);
}

/// `git` with a fixed identity and no user or system configuration, in `dir`; asserts success,
/// returns stdout.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(require("git"))
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .args([
            "-c",
            "user.name=podfs tests",
            "-c",
            "user.email=tests@podfs.invalid",
            "-c",
            "init.defaultBranch=main",
            "-c",
            "safe.directory=*",
        ])
        .args(args)
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?} in {} failed: {}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `git clone` (pack transport: temporary files, lock files, read-only packs, fsyncs, and
/// `link()` to finalize packs, which the mount refuses and git then renames) into a new pod
/// through the mount: after the save the clone is clean in the mount, and the version loaded
/// back is the same repository and passes `git fsck --full`.
#[test]
fn a_git_clone_into_a_pod_is_clean_after_the_save_and_its_loaded_copy_passes_fsck() {
    let b = Backend::default_remote("a_git_clone_into_a_pod");
    let pod = b.pod();
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    git(work.path(), &["init", "-q", "repo"]);
    std::fs::create_dir_all(repo.join("src")).unwrap();
    std::fs::write(repo.join("README.md"), "# a repository\n").unwrap();
    std::fs::write(repo.join("src/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(repo.join("data.bin"), noise(2 * MIB, 5)).unwrap();
    std::fs::write(repo.join("run.sh"), "#!/bin/sh\nexec true\n").unwrap();
    std::fs::set_permissions(repo.join("run.sh"), PermissionsExt::from_mode(0o755)).unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "one"]);
    std::fs::write(repo.join("README.md"), "# a repository\n\nwith docs\n").unwrap();
    std::fs::create_dir(repo.join("docs")).unwrap();
    std::fs::write(repo.join("docs/guide.md"), "read me\n").unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "two"]);
    git(&repo, &["mv", "src/main.rs", "src/app.rs"]);
    git(&repo, &["commit", "-q", "-m", "three"]);
    let head = git(&repo, &["rev-parse", "HEAD"]);

    let m = Mounted::new(&b.podfs, &[]);
    let dest = m.pod(b.remote(), &pod);
    git(
        work.path(),
        &[
            "clone",
            "-q",
            &format!("file://{}", repo.display()),
            dest.to_str().unwrap(),
        ],
    );
    fsync(&dest).unwrap();
    let n = latest(&b, &pod);
    assert!(n >= 1, "fsync saved the clone");

    assert_eq!(
        git(&dest, &["status", "--porcelain"]),
        "",
        "clean in the mount"
    );
    assert_eq!(git(&dest, &["rev-parse", "HEAD"]), head);
    assert_eq!(git(&dest, &["rev-list", "--count", "HEAD"]).trim(), "3");

    let copy = loaded(&b, &format!("{pod}:{n}"));
    git(copy.path(), &["fsck", "--full"]);
    assert_eq!(git(copy.path(), &["rev-parse", "HEAD"]), head);
    assert_eq!(
        git(copy.path(), &["status", "--porcelain"]),
        "",
        "the loaded work tree matches HEAD"
    );
}

// --- What a save stores (the built-in remote). ---

/// One byte changed in a 100 MiB file of a saved pod, then `fsync`: the new version stores that
/// file (its size, plus the zip's few bytes), not the pod's other large file, and loads back
/// exactly.
#[test]
fn changing_one_byte_of_a_large_file_stores_that_file_only() {
    const BIG: u64 = 100 * MIB as u64;
    const AT: u64 = 50 * MIB as u64 + 12_345;
    let b = Backend::default_remote("one_byte_of_a_large_file");
    let pod = b.pod();
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path(), 0);
    for (name, mib) in [("big", 100), ("other-big", 16)] {
        run(
            "dd",
            &[
                "if=/dev/urandom".as_ref(),
                "bs=1M".as_ref(),
                format!("count={mib}").as_ref(),
                "status=none".as_ref(),
                format!("of={}", src.path().join(name).display()).as_ref(),
            ],
        );
    }
    b.save(&pod, src.path(), &[]);
    let m = Mounted::new(&b.podfs, &["--save-delay", "1h"]);
    let root = m.pod(b.remote(), &pod);

    let mut byte = [0u8];
    std::fs::File::open(src.path().join("big"))
        .unwrap()
        .read_exact_at(&mut byte, AT)
        .unwrap();
    let t = FileTime::from_unix_time(1_700_000_123, 456);
    for dir in [root.as_path(), src.path()] {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("big"))
            .unwrap();
        f.write_all_at(&[byte[0] ^ 0xff], AT).unwrap();
        drop(f);
        filetime::set_file_mtime(dir.join("big"), t).unwrap();
    }
    let mut got = [0u8];
    std::fs::File::open(root.join("big"))
        .unwrap()
        .read_exact_at(&mut got, AT)
        .unwrap();
    assert_eq!(got[0], byte[0] ^ 0xff, "the mount reads the changed byte");
    assert_eq!(std::fs::metadata(root.join("big")).unwrap().len(), BIG);

    fsync(&root.join("big")).unwrap();
    assert_eq!(b.versions(&pod), [1, 2], "fsync saved version 2");
    let stored = stored_bytes(&b, &pod, 2);
    assert!(
        (BIG..BIG + MIB as u64).contains(&stored),
        "version 2 stores {stored} bytes: the changed file is {BIG}, the other large one 16 MiB"
    );
    let v2 = loaded(&b, &format!("{pod}:2"));
    assert_same_tree(src.path(), v2.path());
}

/// Renaming a directory of 1,000 files (1 KiB of noise each: 1 MiB if they were stored
/// again) makes a version that stores no file data; so does a chmod of a 4 MiB file. Each
/// version loads back as the mount showed it, with the expected files.
#[test]
fn renaming_a_directory_of_a_thousand_files_or_a_chmod_stores_no_file_data() {
    const SMALL: u64 = 64 << 10;
    let b = Backend::default_remote("a_rename_stores_no_file_data");
    let pod = b.pod();
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path(), 0);
    std::fs::create_dir(src.path().join("many")).unwrap();
    for i in 0..1000 {
        let name = src.path().join(format!("many/f{i:04}"));
        std::fs::write(name, noise(1024, 100 + i)).unwrap();
    }
    std::fs::write(src.path().join("big"), noise(4 * MIB, 6)).unwrap();
    b.save(&pod, src.path(), &[]);
    let m = Mounted::new(&b.podfs, &["--save-delay", "1h"]);
    let root = m.pod(b.remote(), &pod);

    for dir in [root.as_path(), src.path()] {
        std::fs::create_dir(dir.join("moved")).unwrap();
        std::fs::rename(dir.join("many"), dir.join("moved/renamed")).unwrap();
    }
    fsync(&root).unwrap();
    assert_eq!(b.versions(&pod), [1, 2]);
    let stored = stored_bytes(&b, &pod, 2);
    assert!(stored < SMALL, "the rename stored {stored} bytes");
    let v2 = loaded(&b, &format!("{pod}:2"));
    assert_same_tree(&root, v2.path());
    assert_same_nodes(
        &without_dir_mtimes(snapshot(src.path())),
        &without_dir_mtimes(snapshot(v2.path())),
        "version 2 against the renamed source",
    );

    for dir in [root.as_path(), src.path()] {
        std::fs::set_permissions(dir.join("big"), PermissionsExt::from_mode(0o600)).unwrap();
    }
    fsync(&root.join("big")).unwrap();
    assert_eq!(b.versions(&pod), [1, 2, 3]);
    let stored = stored_bytes(&b, &pod, 3);
    assert!(stored < SMALL, "the chmod stored {stored} bytes");
    let v3 = loaded(&b, &format!("{pod}:3"));
    assert_same_tree(&root, v3.path());
    assert_same_nodes(
        &without_dir_mtimes(snapshot(src.path())),
        &without_dir_mtimes(snapshot(v3.path())),
        "version 3 against the source",
    );
}

// --- When saves happen (the built-in remote). ---

/// A pod is not saved while a file of it is open for writing, even past `--save-delay` (a
/// change made to another pod after it is saved first); once the file is closed the pod is
/// saved on its own, with both writes of that handle; a later change alone is saved again.
#[test]
fn a_pod_is_saved_once_quiet_and_never_while_a_file_is_open_for_writing() {
    let b = Backend::default_remote("saved_once_quiet");
    let pod = b.pod();
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path(), 0);
    b.save(&pod, src.path(), &[]);
    let m = Mounted::new(&b.podfs, &["--save-delay", "200ms"]);
    let root = m.pod(b.remote(), &pod);

    let mut f = std::fs::File::create(root.join("open.txt")).unwrap();
    f.write_all(b"first part\n").unwrap();
    a_quiet_save_of_another_pod(&b, &m, "marker");
    assert_eq!(
        b.versions(&pod),
        [1],
        "not saved while open.txt is open for writing"
    );
    f.write_all(b"second part\n").unwrap();
    drop(f);
    wait_for_version(&b, &pod, 2);
    let v2 = loaded(&b, &format!("{pod}:2"));
    assert_eq!(
        std::fs::read_to_string(v2.path().join("open.txt")).unwrap(),
        "first part\nsecond part\n"
    );

    std::fs::write(root.join("hello.txt"), "changed once more\n").unwrap();
    wait_for_version(&b, &pod, 3);
    let v3 = loaded(&b, &format!("{pod}:3"));
    assert_eq!(
        std::fs::read_to_string(v3.path().join("hello.txt")).unwrap(),
        "changed once more\n"
    );
    assert_same_tree(&root, v3.path());
}

/// `mkdir REMOTE/NEW` shows an empty pod directory at once, but the pod has no version while
/// it is empty (a change made to another pod after it is saved first); its first file makes
/// version 1.
#[test]
fn a_new_pod_is_saved_once_it_has_content() {
    let b = Backend::default_remote("a_new_pod_is_saved");
    let pod = b.pod();
    let m = Mounted::new(&b.podfs, &["--save-delay", "200ms"]);
    let dir = m.pod(b.remote(), &pod);
    std::fs::create_dir(&dir).unwrap();
    assert!(std::fs::metadata(&dir).unwrap().is_dir());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    let listed: Vec<String> = std::fs::read_dir(m.point.join(b.remote()))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(listed.contains(&pod), "{listed:?}");

    a_quiet_save_of_another_pod(&b, &m, "marker");
    assert_eq!(latest(&b, &pod), 0, "an empty new pod has no version");
    assert!(dir.is_dir(), "the empty pod is still shown");

    std::fs::write(dir.join("first.txt"), "the first file\n").unwrap();
    wait_for_version(&b, &pod, 1);
    let v1 = loaded(&b, &pod);
    assert_same_tree(&dir, v1.path());
    assert_eq!(
        std::fs::read_to_string(v1.path().join("first.txt")).unwrap(),
        "the first file\n"
    );
}

/// With a `--save-delay` that never comes: `podfs unmount` saves the staged changes before it
/// returns, and SIGTERM saves them before the daemon exits (successfully).
#[test]
fn podfs_unmount_and_sigterm_save_pending_changes_first() {
    let b = Backend::default_remote("unmount_saves_first");
    let pod = b.pod();
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path(), 0);
    b.save(&pod, src.path(), &[]);

    let mut m = Mounted::new(&b.podfs, &["--save-delay", "1h"]);
    let root = m.pod(b.remote(), &pod);
    std::fs::write(root.join("by-unmount.txt"), "saved by podfs unmount\n").unwrap();
    b.podfs.ok(&["unmount", m.point.to_str().unwrap()]);
    assert_eq!(
        b.versions(&pod),
        [1, 2],
        "saved before podfs unmount returned"
    );
    assert!(!is_mounted(&m.point));
    let status = m.child.wait().unwrap();
    assert!(status.success(), "{status}: {}", m.log_text());

    let mut m = Mounted::new(&b.podfs, &["--save-delay", "1h"]);
    let root = m.pod(b.remote(), &pod);
    std::fs::write(root.join("by-sigterm.txt"), "saved on SIGTERM\n").unwrap();
    // SAFETY: kill only sends a signal to our own child.
    assert_eq!(unsafe { libc::kill(m.child.id() as i32, libc::SIGTERM) }, 0);
    let status = m.child.wait().unwrap();
    assert!(status.success(), "{status}: {}", m.log_text());
    assert!(!is_mounted(&m.point));
    assert_eq!(
        b.versions(&pod),
        [1, 2, 3],
        "saved before the daemon exited"
    );

    let v3 = loaded(&b, &format!("{pod}:3"));
    let expected = tempfile::tempdir().unwrap();
    copy_tree(src.path(), expected.path());
    std::fs::write(
        expected.path().join("by-unmount.txt"),
        "saved by podfs unmount\n",
    )
    .unwrap();
    std::fs::write(expected.path().join("by-sigterm.txt"), "saved on SIGTERM\n").unwrap();
    assert_diff_clean(expected.path(), v3.path());
}

/// One change of every kind, made both through the mount and in a local copy of the tree, then
/// every mtime set (utimens through the mount on files, directories and symlinks): the mount
/// shows exactly the local tree, and so does the version `fsync` of the pod's directory saves.
/// Version 1 still loads as it was.
#[test]
fn every_kind_of_change_through_the_mount_is_saved_exactly() {
    let b = Backend::default_remote("every_kind_of_change");
    let pod = b.pod();
    let work = tempfile::tempdir().unwrap();
    let (src, expected) = (work.path().join("src"), work.path().join("expected"));
    make_tree(&src, 2 * MIB);
    b.save(&pod, &src, &[]);
    copy_tree(&src, &expected);
    let m = Mounted::new(&b.podfs, &["--save-delay", "1h"]);
    let root = m.pod(b.remote(), &pod);

    let change = |d: &Path| {
        std::fs::write(d.join("new.txt"), "a new file\n").unwrap();
        std::fs::write(d.join("hello.txt"), "hello, changed\n").unwrap();
        append(&d.join("dir/medium.bin"), b"appended");
        std::fs::OpenOptions::new()
            .write(true)
            .open(d.join("dir/big.bin"))
            .unwrap()
            .set_len(MIB as u64 + 3)
            .unwrap();
        std::fs::File::create(d.join("sparse.bin"))
            .unwrap()
            .write_all_at(b"end", 3 * MIB as u64)
            .unwrap();
        std::fs::create_dir_all(d.join("made/deeper")).unwrap();
        std::fs::write(d.join("made/deeper/f.txt"), "deep\n").unwrap();
        std::fs::write(d.join("made/empty"), "").unwrap();
        std::fs::create_dir(d.join("made/empty-dir")).unwrap();
        std::fs::remove_dir(d.join("empty-dir")).unwrap();
        std::fs::remove_file(d.join("secret")).unwrap();
        // A file over an existing file; a directory with its contents to another parent.
        std::fs::rename(d.join("script.sh"), d.join("dir/nested/deeper/data.json")).unwrap();
        std::fs::rename(d.join("dir/nested"), d.join("nested-moved")).unwrap();
        symlink("../new.txt", d.join("made/link")).unwrap();
        std::fs::remove_file(d.join("link-to-file")).unwrap();
        symlink("new.txt", d.join("link-to-file")).unwrap();
        std::fs::set_permissions(d.join("new.txt"), PermissionsExt::from_mode(0o640)).unwrap();
        std::fs::set_permissions(d.join("made"), PermissionsExt::from_mode(0o700)).unwrap();
        std::fs::set_permissions(d.join("nested-moved"), PermissionsExt::from_mode(0o755)).unwrap();
    };
    change(&root);
    change(&expected);
    let mut paths: Vec<String> = snapshot(&expected).into_keys().collect();
    paths.reverse(); // children before their directory
    for (i, rel) in paths.iter().enumerate() {
        let t = FileTime::from_unix_time(1_650_000_000 + i as i64, i as u32 * 1_001);
        for d in [&root, &expected] {
            filetime::set_symlink_file_times(d.join(rel), t, t)
                .unwrap_or_else(|e| panic!("utimens {}: {e}", d.join(rel).display()));
        }
    }
    assert_same_tree(&expected, &root);

    fsync(&root).unwrap();
    assert_eq!(b.versions(&pod), [1, 2]);
    let v2 = loaded(&b, &format!("{pod}:2"));
    assert_same_tree(&expected, v2.path());
    let v1 = loaded(&b, &format!("{pod}:1"));
    assert_same_tree(&src, v1.path());
}

// --- On every backend. ---

/// `fsync` (and `fdatasync`) of a written file, and `fsync` of a new pod's directory, return
/// once the version holding the data is on the remote: a `podfs load` by another installation
/// right after finds it.
fn fsync_returns_once_the_version_is_on_the_remote(b: &Backend) {
    let pod = b.pod();
    let new_pod = b.pod_named("new");
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path(), 0);
    b.save(&pod, src.path(), &[]);
    let m = Mounted::new(&b.podfs, &["--save-delay", "1h"]);
    let root = m.pod(b.remote(), &pod);
    let other = b.another_installation();
    let load = |pod_ref: &str| {
        let dir = tempfile::tempdir().unwrap();
        other.ok(&[
            "load",
            pod_ref,
            b.remote(),
            "--into",
            dir.path().to_str().unwrap(),
        ]);
        dir
    };

    let mut f = std::fs::File::create(root.join("fsynced.txt")).unwrap();
    f.write_all(b"on the remote once fsync returns\n").unwrap();
    f.sync_all().unwrap();
    let got = load(&pod);
    assert_eq!(
        std::fs::read_to_string(got.path().join("fsynced.txt")).unwrap(),
        "on the remote once fsync returns\n"
    );
    drop(f);
    assert_eq!(b.versions(&pod), [1, 2]);

    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(root.join("hello.txt"))
        .unwrap();
    f.write_all_at(b"HELLO", 0).unwrap();
    f.sync_data().unwrap();
    let got = load(&pod);
    assert_eq!(
        std::fs::read_to_string(got.path().join("hello.txt")).unwrap(),
        "HELLO, pods\n"
    );
    drop(f);
    assert_eq!(b.versions(&pod), [1, 2, 3]);

    let dir = m.pod(b.remote(), &new_pod);
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("first.txt"), "in a new pod\n").unwrap();
    fsync(&dir).unwrap();
    let got = load(&new_pod);
    assert_eq!(
        std::fs::read_to_string(got.path().join("first.txt")).unwrap(),
        "in a new pod\n"
    );
    assert_eq!(b.versions(&new_pod), [1]);
}

/// One change of each kind under `root` (the test tree): new file, overwrite, append, unlink,
/// rename into a subdirectory, mkdir, symlink, chmod, utimens.
fn make_changes(root: &Path) {
    std::fs::write(root.join("new.txt"), "written before the crash\n").unwrap();
    std::fs::write(root.join("hello.txt"), "changed before the crash\n").unwrap();
    append(&root.join("dir/medium.bin"), b"appended before the crash");
    std::fs::remove_file(root.join("secret")).unwrap();
    std::fs::rename(root.join("script.sh"), root.join("dir/script-moved.sh")).unwrap();
    std::fs::create_dir(root.join("made")).unwrap();
    std::fs::write(root.join("made/inner.txt"), "inner\n").unwrap();
    symlink("../new.txt", root.join("made/link")).unwrap();
    std::fs::set_permissions(root.join("dir/nested"), PermissionsExt::from_mode(0o700)).unwrap();
    filetime::set_file_mtime(
        root.join("empty-file"),
        FileTime::from_unix_time(1_650_000_000, 42),
    )
    .unwrap();
}

/// With `--save-delay 1h`, changes to a pod and a new pod are staged, then the daemon is
/// killed (SIGKILL): nothing was saved, the staging directories hold them. `podfs unmount`
/// clears the dead mount; a new mount shows the changes and saves them: the versions hold
/// what the mount showed before the kill (files, symlinks, modes, mtimes).
fn staged_changes_survive_sigkill_and_the_next_mount_saves_them(b: &Backend) {
    let pod = b.pod();
    let new_pod = b.pod_named("new");
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path(), 0);
    b.save(&pod, src.path(), &[]);
    let mut m = Mounted::new(&b.podfs, &["--save-delay", "1h"]);
    let root = m.pod(b.remote(), &pod);
    let fresh = m.pod(b.remote(), &new_pod);
    make_changes(&root);
    std::fs::create_dir(&fresh).unwrap();
    std::fs::write(fresh.join("first.txt"), "in a new pod, before the crash\n").unwrap();
    let shown = without_dir_mtimes(snapshot(&root));
    let shown_new = without_dir_mtimes(snapshot(&fresh));

    m.child.kill().unwrap();
    m.child.wait().unwrap();
    assert_eq!(b.versions(&pod), [1], "nothing saved before the kill");
    assert_eq!(latest(b, &new_pod), 0, "the new pod was not saved");
    let staging = b.podfs.home.path().join("staging/mount").join(b.remote());
    for p in [&pod, &new_pod] {
        let n = std::fs::read_dir(staging.join(p)).map_or(0, |d| d.count());
        assert!(n > 0, "{}: the staged changes", staging.join(p).display());
    }
    b.podfs.ok(&["unmount", m.point.to_str().unwrap()]);
    assert!(!is_mounted(&m.point));

    let again = Mounted::new(&b.podfs, &["--save-delay", "200ms"]);
    let root = again.pod(b.remote(), &pod);
    assert_eq!(
        std::fs::read_to_string(root.join("new.txt")).unwrap(),
        "written before the crash\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("hello.txt")).unwrap(),
        "changed before the crash\n"
    );
    assert!(!root.join("secret").exists());
    assert_eq!(
        std::fs::read_to_string(again.pod(b.remote(), &new_pod).join("first.txt")).unwrap(),
        "in a new pod, before the crash\n"
    );

    wait_for_version(b, &pod, 2);
    wait_for_version(b, &new_pod, 1);
    let v2 = loaded(b, &format!("{pod}:2"));
    assert_same_nodes(
        &shown,
        &without_dir_mtimes(snapshot(v2.path())),
        "version 2 against the mount before the kill",
    );
    let expected = tempfile::tempdir().unwrap();
    copy_tree(src.path(), expected.path());
    make_changes(expected.path());
    assert_diff_clean(expected.path(), v2.path());
    let n1 = loaded(b, &new_pod);
    assert_same_nodes(
        &shown_new,
        &without_dir_mtimes(snapshot(n1.path())),
        "the new pod against the mount before the kill",
    );
}

/// The mount stages changes (`--save-delay 1h`) while another client saves version 2 of the
/// same pod from its own copy of version 1. `fsync` then saves the staged changes as version 3
/// (parent 2), never over 2: version 2 is exactly the other client's tree, and version 3 is it
/// with the staged changes on top (per path, the staged change wins). The mount then shows
/// version 3.
fn a_version_saved_meanwhile_by_another_client_is_kept_and_the_staged_changes_go_on_top(
    b: &Backend,
) {
    let pod = b.pod();
    let work = tempfile::tempdir().unwrap();
    let (v1, theirs) = (work.path().join("v1"), work.path().join("theirs"));
    make_tree(&v1, 0);
    b.save(&pod, &v1, &[]);
    copy_tree(&v1, &theirs);
    let m = Mounted::new(&b.podfs, &["--save-delay", "1h"]);
    let root = m.pod(b.remote(), &pod);

    // Staged by the mount: data.json is changed by both.
    std::fs::write(root.join("hello.txt"), "from the mount\n").unwrap();
    std::fs::write(
        root.join("dir/nested/deeper/data.json"),
        r#"{"by": "the mount"}"#,
    )
    .unwrap();
    std::fs::write(root.join("mount-new.txt"), "added through the mount\n").unwrap();
    std::fs::remove_file(root.join("secret")).unwrap();
    let staged = snapshot(&root);

    // Saved meanwhile by another client.
    std::fs::write(
        theirs.join("dir/nested/deeper/data.json"),
        r#"{"by": "the other client"}"#,
    )
    .unwrap();
    std::fs::write(theirs.join("script.sh"), "#!/bin/sh\necho other\n").unwrap();
    std::fs::write(theirs.join("other-new.txt"), "added by the other client\n").unwrap();
    std::fs::remove_file(theirs.join("empty-file")).unwrap();
    b.another_installation()
        .ok(&["save", &pod, b.remote(), "--from", theirs.to_str().unwrap()]);
    assert_eq!(b.versions(&pod), [1, 2]);

    fsync(&root).unwrap();
    assert_eq!(
        b.versions(&pod),
        [1, 2, 3],
        "the staged changes became version 3"
    );
    let info = b.versions_json(&pod);
    let v3_info = info
        .iter()
        .find(|v| v["version"].as_u64() == Some(3))
        .expect("version 3 in podfs versions");
    assert_eq!(v3_info["parent"].as_u64(), Some(2), "{v3_info:#}");
    let other_v2 = tempfile::tempdir().unwrap();
    b.podfs
        .assert_loads(&format!("{pod}:2"), b.remote(), other_v2.path(), &theirs);

    let v3 = loaded(b, &format!("{pod}:3"));
    let mut want = without_dir_mtimes(snapshot(&theirs));
    for p in ["hello.txt", "dir/nested/deeper/data.json", "mount-new.txt"] {
        want.insert(p.to_owned(), staged[p].clone());
    }
    want.remove("secret");
    assert_same_nodes(
        &want,
        &without_dir_mtimes(snapshot(v3.path())),
        "version 3: the other client's tree with the staged changes on top",
    );

    // The kernel may be told to forget old names and pages a moment after fsync returns.
    wait_until(
        "the mount to show version 3",
        Duration::from_secs(30),
        || {
            root.join("other-new.txt").exists()
                && !root.join("empty-file").exists()
                && std::fs::read_to_string(root.join("script.sh"))
                    .ok()
                    .as_deref()
                    == Some("#!/bin/sh\necho other\n")
        },
    );
    assert_same_tree(v3.path(), &root);
}

// --- A remote down at save time (S3 on moto). ---

/// The S3 remote's per-attempt timeout (`timeout=` in its URL): short, so a save to the
/// stopped server fails soon.
const S3_TIMEOUT_SECS: u64 = 2;

/// Changes staged, then the S3 server stops answering (moto under SIGSTOP): `fsync` fails with
/// `EIO` once the request timeouts run out; the changes, and one made after the failure, stay
/// staged and read back through the mount. Once the server is back a later `fsync` succeeds
/// (or the mount's retry got there first), and version 2 holds every change: nothing is lost.
#[test]
fn a_save_while_the_s3_server_is_down_is_eio_and_commits_once_it_is_back() {
    let moto = Moto::start();
    let podfs = Podfs::new()
        .env("AWS_ACCESS_KEY_ID", KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", SECRET);
    let url = format!(
        "s3://write-outage/?access_key_id={{access_key_id}}&secret_access_key={{secret_access_key}}&endpoint={}&timeout={S3_TIMEOUT_SECS}",
        moto.endpoint
    );
    podfs.ok(&["remote", "add", "s3-remote", &url]);
    const POD: &str = "outage";
    let work = tempfile::tempdir().unwrap();
    let (src, expected) = (work.path().join("src"), work.path().join("expected"));
    make_tree(&src, 0);
    podfs.ok(&["save", POD, "s3-remote", "--from", src.to_str().unwrap()]);
    copy_tree(&src, &expected);
    // No refresh of listings while the server is stopped: this is about the save.
    let m = Mounted::new(&podfs, &["--save-delay", "1h", "--refresh", "1h"]);
    let root = m.pod("s3-remote", POD);

    // Staged before the outage (copy-up of hello.txt needs the server).
    for d in [root.as_path(), expected.as_path()] {
        std::fs::write(d.join("hello.txt"), "changed before the outage\n").unwrap();
        std::fs::write(d.join("before.txt"), "written before the outage\n").unwrap();
    }

    let frozen = moto.freeze();
    let attempts = u64::from(podfs::remote::s3::MAX_ATTEMPTS);
    let one_request = Duration::from_secs(attempts * S3_TIMEOUT_SECS + (attempts - 1) * 5);
    let before = root.join("before.txt");
    let r = within(
        "fsync while the server is stopped",
        4 * one_request + Duration::from_secs(60),
        move || fsync(&before),
    );
    assert_errno("fsync while the server is stopped", r, libc::EIO);

    // Still staged and readable, and more changes are staged.
    for d in [root.as_path(), expected.as_path()] {
        std::fs::write(d.join("during.txt"), "written during the outage\n").unwrap();
    }
    assert_eq!(
        std::fs::read_to_string(root.join("hello.txt")).unwrap(),
        "changed before the outage\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("before.txt")).unwrap(),
        "written before the outage\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("during.txt")).unwrap(),
        "written during the outage\n"
    );

    // `podfs unmount` while the server is still down: the save fails, it says the changes stay
    // staged, and unmounts.
    let out = podfs.run(&["unmount", m.point.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{said}");
    assert!(said.contains("stay staged"), "{said}");
    assert!(!is_mounted(&m.point));
    let staged = podfs.home.path().join("staging/mount/s3-remote").join(POD);
    assert!(
        staged.join("journal").is_file(),
        "kept: {}",
        staged.display()
    );
    drop(m);

    // The server back, the next mount saves them on its own.
    drop(frozen);
    let m = Mounted::new(&podfs, &["--save-delay", "200ms"]);
    let root = m.pod("s3-remote", POD);
    assert_eq!(
        std::fs::read_to_string(root.join("during.txt")).unwrap(),
        "written during the outage\n"
    );
    // Right after, calls may still fail at once (podfs::remote::failfast::HOLD).
    wait_until(
        "the next mount to save the staged changes",
        podfs::remote::failfast::HOLD + SAVED,
        || {
            let out = podfs.run(&["versions", POD, "s3-remote", "--json"]);
            let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
            v.len() >= 2
        },
    );
    let out = podfs.ok(&["versions", POD, "s3-remote", "--json"]);
    let versions: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let numbers: Vec<u64> = versions
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2], "one version for the staged changes");
    let v2 = tempfile::tempdir().unwrap();
    podfs.ok(&[
        "load",
        &format!("{POD}:2"),
        "s3-remote",
        "--into",
        v2.path().to_str().unwrap(),
    ]);
    assert_diff_clean(&expected, v2.path());
    assert_same_tree(v2.path(), &root);
}

/// `rm -rf POD/*` saves an empty version; the pod's own directory stays.
#[test]
fn removing_everything_in_a_pod_saves_an_empty_version() {
    let (b, _src, m) = mounted_pod("remove_everything", &["--save-delay", "1h"]);
    let pod = b.pod();
    let root = m.pod(b.remote(), &pod);
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!("rm -rf '{}'/*", root.display()))
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    fsync(&root).unwrap();
    assert_eq!(b.versions(&pod), [1, 2]);
    let v2 = &b.versions_json(&pod)[1];
    assert_eq!(v2["file_count"].as_u64(), Some(0), "{v2}");
    assert_eq!(
        std::fs::read_dir(loaded(&b, &pod).path()).unwrap().count(),
        0
    );
    assert!(root.is_dir());
}

// --- Errors and edge cases (the built-in remote). ---

/// A saved pod, mounted with `args`; returns the backend, the source tree and the mount.
fn mounted_pod(test: &str, args: &[&str]) -> (Backend, tempfile::TempDir, Mounted) {
    let b = Backend::default_remote(test);
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path(), 0);
    b.save(&b.pod(), src.path(), &[]);
    let m = Mounted::new(&b.podfs, args);
    (b, src, m)
}

/// Every change under `POD/.versions/` is `EROFS`: in a version's tree, the `.versions`
/// directory itself and its `latest` link, and renames into or out of a version. The version
/// is unchanged, the latest tree still takes writes, and nothing was staged for a save.
#[test]
fn the_versions_stay_read_only_with_erofs() {
    let (b, src, m) = mounted_pod("versions_stay_read_only", &["--save-delay", "1h"]);
    let pod = b.pod();
    let root = m.pod(b.remote(), &pod);
    let v1 = root.join(".versions/1");
    let erofs = |what: &str, r: std::io::Result<()>| assert_errno(what, r, libc::EROFS);
    erofs("create", std::fs::File::create(v1.join("new")).map(drop));
    erofs(
        "open for writing",
        std::fs::OpenOptions::new()
            .write(true)
            .open(v1.join("hello.txt"))
            .map(drop),
    );
    erofs("mkdir", std::fs::create_dir(v1.join("newdir")));
    erofs("unlink", std::fs::remove_file(v1.join("hello.txt")));
    erofs("rmdir", std::fs::remove_dir(v1.join("empty-dir")));
    erofs(
        "rename inside a version",
        std::fs::rename(v1.join("hello.txt"), v1.join("x")),
    );
    erofs(
        "rename into a version",
        std::fs::rename(root.join("hello.txt"), v1.join("x")),
    );
    erofs(
        "rename out of a version",
        std::fs::rename(v1.join("hello.txt"), root.join("x")),
    );
    erofs(
        "chmod",
        std::fs::set_permissions(v1.join("hello.txt"), PermissionsExt::from_mode(0o600)),
    );
    erofs(
        "utimens",
        filetime::set_file_mtime(v1.join("hello.txt"), FileTime::from_unix_time(1, 0)),
    );
    erofs(
        "truncate",
        // SAFETY: a valid NUL-terminated path that outlives the call.
        check(unsafe { libc::truncate(c_path(&v1.join("hello.txt")).as_ptr(), 0) }),
    );
    erofs("symlink", symlink("x", v1.join("l")));
    erofs(
        "mkdir in .versions",
        std::fs::create_dir(root.join(".versions/9")),
    );
    erofs("rmdir of a version", std::fs::remove_dir(&v1));
    erofs(
        "unlink of .versions/latest",
        std::fs::remove_file(root.join(".versions/latest")),
    );
    let touch = Command::new("touch")
        .args(["-d", "2020-01-01"])
        .arg(v1.join("hello.txt"))
        .output()
        .unwrap();
    assert!(!touch.status.success());
    let err = String::from_utf8_lossy(&touch.stderr);
    assert!(err.contains("Read-only file system"), "touch -d: {err}");

    assert_same_tree(src.path(), &v1);
    assert_same_tree(src.path(), &root);
    fsync(&root).unwrap();
    assert_eq!(b.versions(&pod), [1], "nothing was staged");
    std::fs::write(root.join("writable.txt"), "the latest tree takes writes\n").unwrap();
    assert_eq!(
        std::fs::read_to_string(root.join("writable.txt")).unwrap(),
        "the latest tree takes writes\n"
    );
}

/// What pods cannot hold or the mount does not allow: a hard link, a FIFO, a file given to
/// another user, removing the pod's own directory (`EPERM`), an extended attribute
/// (`EOPNOTSUPP`). A chown to one's own user is allowed (tools like `rsync -a` as root do it).
/// Nothing is changed and nothing is staged.
#[test]
fn hard_links_fifos_chown_xattrs_and_removing_the_pod_dir_are_refused() {
    let (b, src, m) = mounted_pod("links_fifos_are_refused", &["--save-delay", "1h"]);
    let pod = b.pod();
    let root = m.pod(b.remote(), &pod);
    let hello = c_path(&root.join("hello.txt"));
    let eperm = |what: &str, r: std::io::Result<()>| assert_errno(what, r, libc::EPERM);

    eperm(
        "hard link",
        std::fs::hard_link(root.join("hello.txt"), root.join("hard")),
    );
    eperm("rmdir of the pod's directory", std::fs::remove_dir(&root));
    let fifo = c_path(&root.join("fifo"));
    // SAFETY: a valid NUL-terminated path that outlives the call.
    eperm(
        "mkfifo",
        check(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }),
    );
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    eperm(
        "chown to another user",
        // SAFETY: a valid NUL-terminated path; gid -1 leaves the group alone.
        check(unsafe { libc::chown(hello.as_ptr(), uid + 4242, libc::gid_t::MAX) }),
    );
    // SAFETY: as above.
    check(unsafe { libc::chown(hello.as_ptr(), uid, libc::gid_t::MAX) })
        .expect("chown to one's own user");
    let (name, value) = (CString::new("user.podfs").unwrap(), b"v");
    assert_errno(
        "setxattr",
        // SAFETY: valid C strings and a value buffer of the length given.
        check(unsafe {
            libc::setxattr(
                hello.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        }),
        libc::EOPNOTSUPP,
    );

    assert!(!root.join("hard").exists() && !root.join("fifo").exists());
    assert_same_tree(src.path(), &root);
    fsync(&root).unwrap();
    assert_eq!(b.versions(&pod), [1], "nothing was staged");
}

/// `O_EXCL` and `RENAME_NOREPLACE` onto an existing name are `EEXIST` and change nothing;
/// onto a free name they work. `RENAME_EXCHANGE` swaps two files, or is refused with `EINVAL`
/// (changing nothing). The saved version is what the mount shows.
#[test]
fn exclusive_creates_and_no_replace_renames_refuse_an_existing_name() {
    let (b, _src, m) = mounted_pod("exclusive_creates", &["--save-delay", "1h"]);
    let pod = b.pod();
    let root = m.pod(b.remote(), &pod);
    let create_new = |p: &Path| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(p)
    };
    assert_errno(
        "O_EXCL of an existing file",
        create_new(&root.join("hello.txt")),
        libc::EEXIST,
    );
    assert_errno(
        "mkdir of an existing directory",
        std::fs::create_dir(root.join("dir")),
        libc::EEXIST,
    );
    create_new(&root.join("fresh.txt"))
        .unwrap()
        .write_all(b"fresh\n")
        .unwrap();

    let read = |name: &str| std::fs::read_to_string(root.join(name)).unwrap();
    assert_errno(
        "RENAME_NOREPLACE onto an existing file",
        rename2(
            &root.join("fresh.txt"),
            &root.join("hello.txt"),
            libc::RENAME_NOREPLACE,
        ),
        libc::EEXIST,
    );
    assert_eq!(read("fresh.txt"), "fresh\n");
    assert_eq!(read("hello.txt"), "hello, pods\n");
    rename2(
        &root.join("fresh.txt"),
        &root.join("renamed.txt"),
        libc::RENAME_NOREPLACE,
    )
    .expect("RENAME_NOREPLACE onto a free name");
    assert!(!root.join("fresh.txt").exists());
    assert_eq!(read("renamed.txt"), "fresh\n");

    match rename2(
        &root.join("renamed.txt"),
        &root.join("hello.txt"),
        libc::RENAME_EXCHANGE,
    ) {
        Ok(()) => {
            assert_eq!(read("renamed.txt"), "hello, pods\n");
            assert_eq!(read("hello.txt"), "fresh\n");
        }
        Err(e) => {
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "RENAME_EXCHANGE: {e}");
            assert_eq!(read("renamed.txt"), "fresh\n");
            assert_eq!(read("hello.txt"), "hello, pods\n");
        }
    }

    fsync(&root).unwrap();
    assert_eq!(b.versions(&pod), [1, 2]);
    let v2 = loaded(&b, &format!("{pod}:2"));
    assert_same_tree(&root, v2.path());
}

/// `O_APPEND` writes at the end whatever the offset; `ftruncate` and `truncate` shorten and
/// extend (with zeros); `O_TRUNC` empties and keeps the mode; a write moves the mtime; statfs
/// (what `df` shows) reports a size. The saved version is what the mount shows.
#[test]
fn append_truncate_and_statfs_work_as_on_a_local_disk() {
    let (b, _src, m) = mounted_pod("append_truncate_statfs", &["--save-delay", "1h"]);
    let pod = b.pod();
    let root = m.pod(b.remote(), &pod);
    let hello = root.join("hello.txt");
    let before = std::fs::metadata(&hello).unwrap();

    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&hello)
        .unwrap();
    f.seek(std::io::SeekFrom::Start(0)).unwrap();
    f.write_all(b"more\n").unwrap();
    drop(f);
    assert_eq!(
        std::fs::read_to_string(&hello).unwrap(),
        "hello, pods\nmore\n"
    );
    let after = std::fs::metadata(&hello).unwrap();
    assert_ne!(
        after.modified().unwrap(),
        before.modified().unwrap(),
        "a write moves the mtime"
    );

    let medium = root.join("dir/medium.bin");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&medium)
        .unwrap();
    f.set_len(5).unwrap();
    assert_eq!(
        std::fs::read(&medium).unwrap(),
        noise(support::tree::MEDIUM, 1)[..5]
    );
    f.set_len(100_000).unwrap();
    drop(f);
    let mut want = noise(support::tree::MEDIUM, 1)[..5].to_vec();
    want.resize(100_000, 0);
    assert!(
        std::fs::read(&medium).unwrap() == want,
        "extended with zeros"
    );

    let script = c_path(&root.join("script.sh"));
    // SAFETY: a valid NUL-terminated path that outlives the call.
    check(unsafe { libc::truncate(script.as_ptr(), 3) }).expect("truncate by path");
    assert_eq!(
        std::fs::read_to_string(root.join("script.sh")).unwrap(),
        "#!/"
    );

    std::fs::write(root.join("secret"), "t").unwrap();
    let md = std::fs::metadata(root.join("secret")).unwrap();
    assert_eq!((md.len(), md.permissions().mode() & 0o7777), (1, 0o600));

    let c = c_path(&root);
    // SAFETY: statvfs is plain data; all zeros is a valid value to be overwritten.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a pointer to a statvfs we own.
    check(unsafe { libc::statvfs(c.as_ptr(), &mut st) }).expect("statvfs of the pod");
    assert!(st.f_blocks > 0, "total blocks: {}", st.f_blocks);
    assert!(st.f_frsize > 0 || st.f_bsize > 0, "a block size");

    fsync(&root).unwrap();
    assert_eq!(b.versions(&pod), [1, 2]);
    let v2 = loaded(&b, &format!("{pod}:2"));
    assert_same_tree(&root, v2.path());
}

/// As root only (it mounts a tmpfs); a non-root run outside CI says so and checks nothing, and
/// under `CI=true` it fails.
fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test} needs root (it mounts a small tmpfs)"
    );
    eprintln!("{test}: skipped, it needs root (it mounts a small tmpfs)");
    false
}

/// A tmpfs of `size` mounted on `dir`, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount a tmpfs on {}", dir.display());
        Self(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The staging dir on a full disk: the write that does not fit gets `ENOSPC`; what was staged
/// before stays readable and is saved, exactly.
#[test]
fn a_full_staging_disk_is_enospc_and_loses_nothing_staged_before() {
    if !root_or_skip("a_full_staging_disk_is_enospc_and_loses_nothing_staged_before") {
        return;
    }
    let b = Backend::default_remote("full_staging_disk");
    let pod = b.pod();
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path(), 0);
    b.save(&pod, src.path(), &[]);
    let _small = Tmpfs::mount(&b.podfs.home.path().join("staging"), "4m");
    let m = Mounted::new(&b.podfs, &["--save-delay", "1h"]);
    let root = m.pod(b.remote(), &pod);
    let kept = noise(100_000, 7);
    std::fs::write(root.join("kept.bin"), &kept).unwrap();
    std::fs::write(root.join("hello.txt"), "changed before the disk filled\n").unwrap();

    let mut filler = std::fs::File::create(root.join("filler")).unwrap();
    let chunk = vec![0u8; 64 << 10];
    let mut written = 0u64;
    let full = loop {
        match filler.write_all(&chunk) {
            Ok(()) => written += chunk.len() as u64,
            Err(e) => break e,
        }
        assert!(written < 64 << 20, "4 MiB of staging took 64 MiB");
    };
    assert_eq!(full.raw_os_error(), Some(libc::ENOSPC), "{full}");
    drop(filler);
    assert!(std::fs::read(root.join("kept.bin")).unwrap() == kept);
    assert_eq!(
        std::fs::read_to_string(root.join("hello.txt")).unwrap(),
        "changed before the disk filled\n"
    );

    std::fs::remove_file(root.join("filler")).unwrap();
    fsync(&root).unwrap();
    assert_eq!(b.versions(&pod), [1, 2]);
    let v2 = loaded(&b, &format!("{pod}:2"));
    assert!(std::fs::read(v2.path().join("kept.bin")).unwrap() == kept);
    assert!(!v2.path().join("filler").exists());
    assert_same_tree(&root, v2.path());
}

/// Saves (on `fsync`) while one writer appends records of 64 KiB, one `write` each: every
/// version holds a whole number of records, each exactly as written, and the last holds them
/// all. A version never holds half of a write.
#[test]
fn writes_during_saves_land_whole_in_one_version_or_the_next() {
    const RECORD: usize = 64 << 10;
    const RECORDS: usize = 600;
    let record = |i: usize| {
        let mut r = vec![(i % 251) as u8; RECORD];
        r[..8].copy_from_slice(&(i as u64).to_le_bytes());
        r
    };
    let b = Backend::default_remote("writes_during_saves");
    let pod = b.pod();
    let m = Mounted::new(&b.podfs, &["--save-delay", "1h"]);
    let root = m.pod(b.remote(), &pod);
    std::fs::create_dir(&root).unwrap();
    let log = root.join("log");
    let mut f = std::fs::File::create(&log).unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let saver = {
        let (root, done) = (root.clone(), std::sync::Arc::clone(&done));
        std::thread::spawn(move || {
            let mut saves = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                fsync(&root).unwrap();
                saves += 1;
            }
            saves
        })
    };
    for i in 0..RECORDS {
        f.write_all(&record(i)).unwrap();
    }
    drop(f);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let saves = saver.join().unwrap();
    fsync(&root).unwrap();
    let versions = b.versions(&pod);
    assert!(
        saves > 1 && versions.len() > 1,
        "{saves} fsyncs, versions {versions:?}"
    );
    for v in &versions {
        let dir = loaded(&b, &format!("{pod}:{v}"));
        let bytes = std::fs::read(dir.path().join("log")).unwrap_or_default();
        assert_eq!(
            bytes.len() % RECORD,
            0,
            "version {v}: {} bytes",
            bytes.len()
        );
        for (i, r) in bytes.chunks(RECORD).enumerate() {
            assert!(r == record(i), "version {v}: record {i} differs");
        }
    }
    let last = loaded(&b, &pod);
    assert_eq!(
        std::fs::metadata(last.path().join("log")).unwrap().len(),
        (RECORD * RECORDS) as u64
    );
}

/// A file unlinked while open stays readable and writable through its handle, and no version
/// holds it.
#[test]
fn an_unlinked_open_file_lives_on_through_its_handle_and_is_not_saved() {
    use std::io::Read;
    let (b, _src, m) = mounted_pod("unlinked_open_file", &["--save-delay", "1h"]);
    let pod = b.pod();
    let root = m.pod(b.remote(), &pod);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(root.join("hello.txt"))
        .unwrap();
    std::fs::remove_file(root.join("hello.txt")).unwrap();
    assert!(!root.join("hello.txt").exists());
    f.write_all_at(b"HELLO", 0).unwrap();
    let mut text = String::new();
    f.seek(std::io::SeekFrom::Start(0)).unwrap();
    f.read_to_string(&mut text).unwrap();
    assert_eq!(text, "HELLO, pods\n");
    fsync(&root).unwrap();
    drop(f);
    assert_eq!(b.versions(&pod), [1, 2]);
    let v2 = loaded(&b, &format!("{pod}:2"));
    assert!(!v2.path().join("hello.txt").exists());
    assert_same_tree(&root, v2.path());
}

/// A file written through the mount becomes, once saved, its own whole-file copy in the disk
/// cache: after a remount it is read from there, with no fetch from the remote.
#[test]
fn a_file_saved_by_the_mount_is_read_back_from_its_own_copy_without_a_fetch() {
    let b = Backend::default_remote("saved_file_copy");
    let pod = b.pod();
    let data = noise(3 * MIB, 5);
    {
        let m = Mounted::new(&b.podfs, &["--save-delay", "1h"]);
        let root = m.pod(b.remote(), &pod);
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("big"), &data).unwrap();
        fsync(&root).unwrap();
        assert_eq!(b.versions(&pod), [1]);
    }
    let staging = b
        .podfs
        .home
        .path()
        .join("staging/mount")
        .join(b.remote())
        .join(&pod);
    assert!(
        !staging.exists(),
        "nothing left staged: {}",
        staging.display()
    );
    let addr = format!("127.0.0.1:{}", support::free_port());
    let m = Mounted::new(&b.podfs, &["--metrics", &addr]);
    assert!(std::fs::read(m.pod(b.remote(), &pod).join("big")).unwrap() == data);
    let metrics = scrape(&addr);
    assert_eq!(
        sample(&metrics, "podfs_cache_fetches_total", ""),
        0.0,
        "{metrics}"
    );
    assert!(sample(&metrics, "podfs_cache_copy_hits_total", "") >= 1.0);
}

/// A handle goes on writing after its `fsync` committed the file (a log, a database): the next
/// writes land, and the next save holds them.
#[test]
fn a_handle_writes_on_after_its_fsync_committed_the_file() {
    let (b, _src, m) = mounted_pod("write_after_fsync", &["--save-delay", "1h"]);
    let pod = b.pod();
    let root = m.pod(b.remote(), &pod);
    let path = root.join("dir/medium.bin");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.write_all(b"first").unwrap();
    f.sync_all().unwrap();
    assert_eq!(b.versions(&pod), [1, 2]);
    f.write_all(b"second").unwrap();
    f.set_len(f.metadata().unwrap().len() + 3).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(b.versions(&pod), [1, 2, 3]);
    let mut want = noise(support::tree::MEDIUM, 1);
    want.extend_from_slice(b"firstsecond\0\0\0");
    assert!(std::fs::read(&path).unwrap() == want);
    let v3 = loaded(&b, &format!("{pod}:3"));
    assert!(std::fs::read(v3.path().join("dir/medium.bin")).unwrap() == want);
}
