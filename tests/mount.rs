//! The read-only FUSE mount, on real mounts (`/dev/fuse`): scenarios written once and run on
//! every backend (`on_every_backend!`, as in `backends.rs`), then the daemon's life on the
//! built-in remote alone: SIGKILL leaves ENOTCONN until `podfs unmount`, SIGTERM unmounts, the
//! background mode, and the mount point errors.

#[macro_use]
mod support;

use std::io::{Read, Seek};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::backend::Backend;
use support::mount::{Mounted, is_mounted, sample, scrape, wait_until};
use support::{MIB, Podfs, assert_same_tree, copy_tree, make_tree, noise};

on_every_backend!(
    every_version_reads_back_exactly,
    versions_dir_is_hidden_but_resolves,
    versions_stay_read_only_with_erofs,
    parallel_readers_get_their_bytes,
    a_pod_deleted_and_saved_again_shows_only_its_new_content,
);

/// `diff -r` without following symlinks (the test tree has a dangling one): must be identical.
fn assert_diff_clean(expected: &Path, actual: &Path) {
    let out = Command::new("diff")
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

/// Saves the test tree (with a stored 2 MiB file), changes it, saves again; returns the work dir
/// with `v1/` (the first tree) and `src/` (the second).
fn two_versions(b: &Backend, pod: &str) -> tempfile::TempDir {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_tree(&src, 2 * MIB);
    b.save(pod, &src, &[]);
    copy_tree(&src, &work.path().join("v1"));
    std::fs::write(src.join("hello.txt"), "second\n").unwrap();
    std::fs::remove_file(src.join("secret")).unwrap();
    std::fs::write(src.join("dir/new.txt"), "new in v2").unwrap();
    std::fs::remove_file(src.join("link-to-file")).unwrap();
    std::os::unix::fs::symlink("script.sh", src.join("link-to-file")).unwrap();
    b.save(pod, &src, &[]);
    work
}

/// `REMOTE/POD/` is the latest tree and `.versions/N/` each saved tree: `diff -r` finds no
/// difference, and every path has the saved kind, mode, mtime (ns), size, bytes and target.
fn every_version_reads_back_exactly(b: &Backend) {
    let pod = b.pod();
    let work = two_versions(b, &pod);
    let (v1, v2) = (work.path().join("v1"), work.path().join("src"));
    let m = Mounted::new(&b.podfs, &["--remote", b.remote()]);
    let root = m.pod(b.remote(), &pod);
    let names: Vec<_> = std::fs::read_dir(&m.point)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, [b.remote()], "--remote shows that remote only");
    for (expected, actual) in [
        (&v2, root.clone()),
        (&v1, root.join(".versions/1")),
        (&v2, root.join(".versions/2")),
    ] {
        assert_diff_clean(expected, &actual);
        assert_same_tree(expected, &actual);
    }
    let md = std::fs::symlink_metadata(root.join("dir/dangling")).unwrap();
    assert_eq!(
        md.len(),
        "../../nowhere".len() as u64,
        "a symlink's size is its target's"
    );
    let dir = std::fs::metadata(root.join("dir")).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::nlink(&dir),
        3,
        "dir/ holds one directory"
    );
    let uid = std::os::unix::fs::MetadataExt::uid(&dir);
    // SAFETY: getuid cannot fail.
    assert_eq!(uid, unsafe { libc::getuid() }, "owned by the mounting user");
}

/// `podfs delete POD` and a new save reuse version 1: within `--refresh` the mount shows the new
/// tree at `POD/` and at `.versions/1/` (names the kernel cached are dropped), never the old
/// tree or bytes, also where both trees have a file of the same name and size.
fn a_pod_deleted_and_saved_again_shows_only_its_new_content(b: &Backend) {
    let pod = b.pod();
    let work = tempfile::tempdir().unwrap();
    let (old, new) = (work.path().join("old"), work.path().join("new"));
    make_tree(&old, 2 * MIB);
    b.save(&pod, &old, &[]);
    let m = Mounted::new(&b.podfs, &["--refresh", "1s"]);
    let root = m.pod(b.remote(), &pod);
    // Let the kernel and the daemon cache everything of the old tree.
    assert_diff_clean(&old, &root);
    assert_diff_clean(&old, &root.join(".versions/1"));

    b.ok(&["delete", &pod]);
    make_tree(&new, 2 * MIB);
    std::fs::write(new.join("hello.txt"), "HELLO, PODS\n").unwrap(); // same size
    std::fs::write(new.join("dir/big.bin"), noise(2 * MIB, 9)).unwrap();
    std::fs::write(new.join("only-new.txt"), "new").unwrap();
    b.save(&pod, &new, &[]);
    assert_eq!(b.versions(&pod), [1], "the number was reused");

    // The kernel is told to forget the old names from a blocking task, so `.versions/1` (kept
    // for an hour otherwise) may follow `POD/` by a moment.
    wait_until("the new tree to show", Duration::from_secs(30), || {
        ["hello.txt", ".versions/1/hello.txt"]
            .iter()
            .all(|p| std::fs::read(root.join(p)).ok() == Some(b"HELLO, PODS\n".to_vec()))
    });
    for dir in [root.clone(), root.join(".versions/1")] {
        assert_diff_clean(&new, &dir);
        assert_same_tree(&new, &dir);
    }
}

/// `.versions` is left out of `ls -a POD`, yet `POD/.versions/1` lists and `.versions/latest`
/// points at the newest version.
fn versions_dir_is_hidden_but_resolves(b: &Backend) {
    let pod = b.pod();
    let _work = two_versions(b, &pod);
    let m = Mounted::new(&b.podfs, &[]);
    let root = m.pod(b.remote(), &pod);
    let ls = |args: &[&str], dir: &Path| {
        let out = Command::new("ls").args(args).arg(dir).output().unwrap();
        assert!(out.status.success(), "ls {}: {out:?}", dir.display());
        String::from_utf8(out.stdout).unwrap()
    };
    let listed = ls(&["-a"], &root);
    assert!(!listed.contains(".versions"), "{listed}");
    assert!(listed.contains("hello.txt"), "{listed}");
    let v1 = ls(&[], &root.join(".versions/1"));
    assert!(v1.contains("secret"), "version 1 still has it: {v1}");
    assert!(!ls(&[], &root).contains("secret"));
    let versions = ls(&[], &root.join(".versions"));
    assert_eq!(
        versions.split_whitespace().collect::<Vec<_>>(),
        ["1", "2", "latest"]
    );
    assert_eq!(
        std::fs::read_link(root.join(".versions/latest")).unwrap(),
        Path::new("2")
    );
    assert_eq!(
        std::fs::read_to_string(root.join(".versions/latest/hello.txt")).unwrap(),
        "second\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join(".versions/1/hello.txt")).unwrap(),
        "hello, pods\n"
    );
    for missing in [".versions/3", ".versions/01", "nope"] {
        let e = std::fs::metadata(root.join(missing)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{missing}");
    }
}

/// Every change in a version answers EROFS: create, touch, write, mkdir, rm, rename, chmod (the
/// latest tree, `POD/`, is writable: tests/mount_write.rs).
fn versions_stay_read_only_with_erofs(b: &Backend) {
    let pod = b.pod();
    let work = tempfile::tempdir().unwrap();
    make_tree(work.path(), 0);
    b.save(&pod, work.path(), &[]);
    let m = Mounted::new(&b.podfs, &[]);
    let root = m.pod(b.remote(), &pod);
    {
        let dir = root.join(".versions/1");
        let erofs = |what: &str, r: std::io::Result<()>| {
            let e = r.expect_err(what);
            assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
        };
        erofs("create", std::fs::File::create(dir.join("new")).map(drop));
        erofs(
            "open for writing",
            std::fs::OpenOptions::new()
                .append(true)
                .open(dir.join("hello.txt"))
                .map(drop),
        );
        erofs("mkdir", std::fs::create_dir(dir.join("newdir")));
        erofs("rm", std::fs::remove_file(dir.join("hello.txt")));
        erofs("rmdir", std::fs::remove_dir(dir.join("empty-dir")));
        erofs(
            "rename",
            std::fs::rename(dir.join("hello.txt"), dir.join("x")),
        );
        erofs(
            "chmod",
            std::fs::set_permissions(
                dir.join("hello.txt"),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            ),
        );
        erofs("symlink", std::os::unix::fs::symlink("x", dir.join("l")));
        for (cmd, arg) in [
            ("touch", "hello.txt"),
            ("touch", "brand-new"),
            ("mkdir", "d"),
        ] {
            let out = Command::new(cmd).arg(dir.join(arg)).output().unwrap();
            assert!(!out.status.success(), "{cmd} {arg} succeeded");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("Read-only file system"), "{cmd} {arg}: {err}");
        }
    }
    assert_eq!(
        std::fs::read_to_string(root.join("hello.txt")).unwrap(),
        "hello, pods\n"
    );
    let log = m.log_text();
    assert!(
        log.contains("errno=30"),
        "each failure logs its errno: {log}"
    );
}

/// Eight threads read eight files (deflated and stored, empty to a few MiB) at once: each gets
/// exactly its bytes.
fn parallel_readers_get_their_bytes(b: &Backend) {
    let pod = b.pod();
    let work = tempfile::tempdir().unwrap();
    let sizes = [
        0,
        1,
        4096,
        130_000,
        700_000,
        MIB + 1,
        2 * MIB + 12_345,
        3 * MIB,
    ];
    for (i, size) in sizes.iter().enumerate() {
        std::fs::write(
            work.path().join(format!("f{i}")),
            noise(*size, i as u64 + 7),
        )
        .unwrap();
    }
    b.save(&pod, work.path(), &[]);
    let m = Mounted::new(&b.podfs, &[]);
    let root = m.pod(b.remote(), &pod);
    std::thread::scope(|s| {
        for (i, size) in sizes.iter().enumerate() {
            let path = root.join(format!("f{i}"));
            s.spawn(move || {
                let got = std::fs::read(&path).unwrap();
                let want = noise(*size, i as u64 + 7);
                assert_eq!(got.len(), want.len(), "f{i}: size");
                assert_eq!(crc32fast::hash(&got), crc32fast::hash(&want), "f{i}: bytes");
            });
        }
    });
}

// --- The daemon, on the built-in remote only. ---

/// A podfs installation with one pod `p` on the built-in remote; returns the tree's dir.
fn one_pod(podfs: &Podfs) -> tempfile::TempDir {
    let work = tempfile::tempdir().unwrap();
    make_tree(work.path(), 0);
    podfs.ok(&["save", "p", "--from", work.path().to_str().unwrap()]);
    work
}

/// The root follows `podfs remote add` and `podfs remote delete` without a remount (within
/// `--refresh`); a remote whose URL changed shows the new location, not cached pods of the old.
#[test]
fn the_root_follows_remotes_added_and_deleted() {
    let podfs = Podfs::new();
    let work = one_pod(&podfs);
    let m = Mounted::new(&podfs, &["--refresh", "200ms"]);
    let names = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&m.point)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(), ["default"]);

    let dirs = tempfile::tempdir().unwrap();
    let (a, b) = (dirs.path().join("a"), dirs.path().join("b"));
    let url = |d: &Path| format!("file://{}", d.display());
    podfs.ok(&["remote", "add", "extra", &url(&a)]);
    podfs.ok(&[
        "save",
        "in-a",
        "extra",
        "--from",
        work.path().to_str().unwrap(),
    ]);
    wait_until("extra to show", Duration::from_secs(30), || {
        names() == ["default", "extra"]
    });
    let hello = m.point.join("extra/in-a/hello.txt");
    assert_eq!(std::fs::read_to_string(&hello).unwrap(), "hello, pods\n");

    // Same name, another place: the old remote's pods go with it.
    podfs.ok(&["remote", "delete", "extra"]);
    podfs.ok(&["remote", "add", "extra", &url(&b)]);
    podfs.ok(&[
        "save",
        "in-b",
        "extra",
        "--from",
        work.path().to_str().unwrap(),
    ]);
    wait_until("extra to show b", Duration::from_secs(30), || {
        m.point.join("extra/in-b/hello.txt").exists()
    });
    assert!(!hello.exists(), "a's pod is gone with it");

    podfs.ok(&["remote", "delete", "extra"]);
    wait_until("extra to go", Duration::from_secs(30), || {
        names() == ["default"]
    });
    // The kernel forgets the names it cached below `extra` once told (a blocking task, after
    // the listing that found the change is answered), so by path it goes a moment later.
    wait_until("extra/in-b to go", Duration::from_secs(30), || {
        std::fs::metadata(m.point.join("extra/in-b"))
            .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
    });
    assert_same_tree(work.path(), &m.pod("default", "p"));
}

/// SIGKILL of the daemon leaves ENOTCONN (never an empty directory); `podfs unmount` clears it,
/// and a new mount on the same point works.
#[test]
fn a_killed_daemon_leaves_enotconn_until_unmounted() {
    let podfs = Podfs::new();
    let _work = one_pod(&podfs);
    let mut m = Mounted::new(&podfs, &[]);
    assert!(m.pod("default", "p").join("hello.txt").exists());
    m.child.kill().unwrap();
    m.child.wait().unwrap();
    let e = std::fs::read_dir(&m.point).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    assert!(
        is_mounted(&m.point),
        "still mounted: the kernel answers ENOTCONN"
    );
    let point = m.point.to_str().unwrap().to_owned();
    podfs.ok(&["unmount", &point]);
    assert!(!is_mounted(&m.point));
    assert_eq!(std::fs::read_dir(&m.point).unwrap().count(), 0);

    // A new mount on a dead mount clears it by itself.
    let mut again = podfs
        .command()
        .args(["mount", &point, "--foreground"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("mounted again", Duration::from_secs(60), || {
        is_mounted(&m.point)
    });
    again.kill().unwrap();
    again.wait().unwrap();
    let e = std::fs::read_dir(&m.point).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "dead again: {e}");
    podfs.ok(&["mount", &point]);
    assert_eq!(
        std::fs::read_to_string(m.pod("default", "p").join("hello.txt")).unwrap(),
        "hello, pods\n"
    );
    podfs.ok(&["unmount", &point]);
    wait_until("unmounted", Duration::from_secs(30), || {
        !is_mounted(&m.point)
    });
}

/// SIGTERM unmounts and the daemon exits successfully; so does `umount` from outside.
#[test]
fn sigterm_and_umount_end_the_daemon_cleanly() {
    let podfs = Podfs::new();
    let _work = one_pod(&podfs);
    let mut m = Mounted::new(&podfs, &[]);
    // SAFETY: kill only sends a signal to our own child.
    assert_eq!(unsafe { libc::kill(m.child.id() as i32, libc::SIGTERM) }, 0);
    let status = m.child.wait().unwrap();
    assert!(status.success(), "{status}: {}", m.log_text());
    assert!(!is_mounted(&m.point));

    let mut m = Mounted::new(&podfs, &[]);
    let st = Command::new("umount").arg(&m.point).status().unwrap();
    assert!(st.success());
    let status = m.child.wait().unwrap();
    assert!(status.success(), "{status}: {}", m.log_text());

    let mut m = Mounted::new(&podfs, &[]);
    let st = Command::new("fusermount3")
        .arg("-u")
        .arg(&m.point)
        .status()
        .unwrap();
    assert!(st.success());
    let status = m.child.wait().unwrap();
    assert!(status.success(), "{status}: {}", m.log_text());
}

/// `podfs mount X && ls X` works: the command returns once mounted, the daemon keeps serving.
/// A relative `--cache-dir` is the caller's, not the daemon's (which runs in `/`).
#[test]
fn mount_returns_once_ready_and_serves_in_the_background() {
    let podfs = Podfs::new();
    let _work = one_pod(&podfs);
    let dir = tempfile::tempdir().unwrap();
    let point = dir.path().canonicalize().unwrap();
    let p = point.to_str().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' mount '{p}' --cache-dir my-cache && ls '{p}' '{p}/default' \
             && cat '{p}/default/p/hello.txt'",
            env!("CARGO_BIN_EXE_podfs")
        ))
        .current_dir(cwd.path())
        .env("PODFS_HOME", podfs.home.path())
        .output()
        .unwrap();
    // The read block goes to disk in the background.
    let cache = cwd.path().join("my-cache");
    wait_until("a block in ./my-cache", Duration::from_secs(30), || {
        !cached_blocks(&cache).is_empty()
    });
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    podfs.ok(&["unmount", p]);
    assert!(
        out.status.success(),
        "{shown}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        shown.contains("default") && shown.contains("hello, pods"),
        "{shown}"
    );
    wait_until("unmounted", Duration::from_secs(30), || !is_mounted(&point));
}

/// A handle keeps reading the version it opened when `POD/` moves to a newer one.
#[test]
fn an_open_file_keeps_its_version() {
    let podfs = Podfs::new();
    let work = one_pod(&podfs);
    let m = Mounted::new(&podfs, &["--refresh", "50ms"]);
    let hello = m.pod("default", "p").join("hello.txt");
    let mut old = std::fs::File::open(&hello).unwrap();
    std::fs::write(work.path().join("hello.txt"), "a longer second version\n").unwrap();
    podfs.ok(&["save", "p", "--from", work.path().to_str().unwrap()]);
    wait_until("POD/ shows version 2", Duration::from_secs(30), || {
        std::fs::read_to_string(&hello).unwrap() == "a longer second version\n"
    });
    let mut text = String::new();
    old.seek(std::io::SeekFrom::Start(0)).unwrap();
    old.read_to_string(&mut text).unwrap();
    assert_eq!(text, "hello, pods\n");
}

/// Pods store no extended attributes: listing them gives none, reading one is `EOPNOTSUPP` (the
/// kernel's answer once the daemon said `ENOSYS`), and `cp -a` and `rsync -aX` copy out fine.
#[test]
fn extended_attributes_are_not_supported_and_copies_still_work() {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let podfs = Podfs::new();
    let work = tempfile::tempdir().unwrap();
    make_tree(work.path(), 0);
    // rsync 3.5 leaves its own time on a directory or symlink whose mtime is in the current
    // second (from a mount or not, when it runs right after the tree was made): age the tree.
    let t = filetime::FileTime::from_unix_time(1_700_000_000, 5);
    let mut all: Vec<_> = support::snapshot(work.path()).into_keys().collect();
    all.reverse(); // children before their directory
    for rel in all {
        filetime::set_symlink_file_times(work.path().join(rel), t, t).unwrap();
    }
    podfs.ok(&["save", "p", "--from", work.path().to_str().unwrap()]);
    let m = Mounted::new(&podfs, &[]);
    let root = m.pod("default", "p");
    let path = CString::new(root.join("hello.txt").as_os_str().as_bytes()).unwrap();
    for _ in 0..2 {
        let name = CString::new("user.x").unwrap();
        let mut buf = [0u8; 64];
        // SAFETY: valid C strings and a buffer of the length given.
        let n =
            unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), 64) };
        assert_eq!(n, -1);
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "{e}");
    }
    // SAFETY: a valid C string; a null buffer of length 0 asks for the size.
    let n = unsafe { libc::listxattr(path.as_ptr(), std::ptr::null_mut(), 0) };
    assert_eq!(n, 0, "no attributes");
    let out = tempfile::tempdir().unwrap();
    for (tool, args) in [("cp", vec!["-a"]), ("rsync", vec!["-aX"])] {
        let to = out.path().join(tool);
        let st = Command::new(tool)
            .args(&args)
            .arg(format!("{}/", root.display()))
            .arg(&to)
            .status()
            .unwrap();
        assert!(st.success(), "{tool} {args:?}");
        assert_same_tree(work.path(), &to);
    }
}

/// Each bad mount point (and cache dir, and metrics address) gets one line saying what is wrong
/// and what to do.
#[test]
fn bad_mount_points_are_refused_clearly() {
    let podfs = Podfs::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().canonicalize().unwrap();
    let missing = d.join("missing");
    podfs.fails(
        &["mount", missing.to_str().unwrap()],
        "does not exist: create it first",
    );
    let file = d.join("file");
    std::fs::write(&file, "x").unwrap();
    podfs.fails(&["mount", file.to_str().unwrap()], "is not a directory");
    podfs.fails(&["mount", d.to_str().unwrap()], "is not empty");
    let empty = d.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = empty.to_str().unwrap();
    podfs.fails(
        &["mount", e, "--remote", "nope"],
        "remote \"nope\" does not exist",
    );
    podfs.fails(&["unmount", e], "is not a podfs mount");
    // A cache dir that cannot be made (below a file), a metrics port already taken.
    let below_file = file.join("cache");
    podfs.fails(
        &["mount", e, "--cache-dir", below_file.to_str().unwrap()],
        "as the block cache directory",
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    podfs.fails(&["mount", e, "--metrics", &addr], "cannot serve metrics on");
    podfs.fails(
        &["mount", e, "--metrics", "nowhere"],
        "invalid socket address",
    );
    assert!(!is_mounted(&empty), "nothing was mounted");
    let m = Mounted::new(&podfs, &[]);
    let p = m.point.to_str().unwrap();
    podfs.fails(&["mount", p], "is already a podfs mount: `podfs unmount");
    podfs.fails(&["mount", p, "--foreground"], "is already a podfs mount");
}

// --- Verified, cached reads (the built-in remote). ---

/// A pod `p` holding `big`, 3 MiB of noise (three 1 MiB blocks, each with its CRC-32C); returns
/// the bytes and where the file's data starts in state object 1.
fn big_pod(podfs: &Podfs) -> (Vec<u8>, u64) {
    let data = one_file_pod(podfs, 3 * MIB, 11);
    let v: serde_json::Value =
        serde_json::from_str(&podfs.ok(&["inspect", "p", "--json"])).unwrap();
    let offset = v["entries"][0]["data"]["offset"].as_u64().unwrap();
    (data, offset)
}

/// Saves pod `p` on the default remote with one file, `big`: `size` bytes of noise from `seed`,
/// which it returns.
fn one_file_pod(podfs: &Podfs, size: usize, seed: u64) -> Vec<u8> {
    let work = tempfile::tempdir().unwrap();
    let data = noise(size, seed);
    std::fs::write(work.path().join("big"), &data).unwrap();
    podfs.ok(&["save", "p", "--from", work.path().to_str().unwrap()]);
    data
}

/// A mount serving metrics, and their address.
fn mounted_with_metrics(podfs: &Podfs) -> (Mounted, String) {
    let addr = format!("127.0.0.1:{}", support::free_port());
    (Mounted::new(podfs, &["--metrics", &addr]), addr)
}

/// Flips one byte of `path` at `at`.
fn flip(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
}

fn read_at(path: &Path, at: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)?.read_exact_at(&mut buf, at)?;
    Ok(buf)
}

/// A byte flipped inside a large file's data on the remote: reading that block is EIO, never
/// its bytes, and the other blocks read fine.
#[test]
fn a_damaged_block_on_the_remote_is_eio_and_the_others_read() {
    let podfs = Podfs::new();
    let (data, offset) = big_pod(&podfs);
    let state = podfs.pods_dir().join("localstack-pod-p-state-1.zip");
    flip(&state, offset + (3 << 19)); // inside block 1
    let m = Mounted::new(&podfs, &[]);
    let big = m.pod("default", "p").join("big");
    assert_eq!(read_at(&big, 0, 4096).unwrap(), data[..4096]);
    let e = read_at(&big, (1 << 20) + 10, 100).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert_eq!(
        read_at(&big, 2 << 20, 4096).unwrap(),
        data[2 << 20..(2 << 20) + 4096]
    );
    assert!(
        m.log_text().contains("damaged"),
        "the daemon logs the damage: {}",
        m.log_text()
    );
}

/// A 4 KiB read at a random offset of a 256 MiB file fetches at most 2 blocks (no read-ahead);
/// reading it again asks the remote nothing; after a remount the disk cache serves it, again
/// with no request, and the version object too (only its identity is asked). Counted by the
/// mount's metrics endpoint.
#[test]
fn a_random_read_fetches_only_its_blocks_and_the_caches_serve_it_again() {
    let podfs = Podfs::new();
    let work = tempfile::tempdir().unwrap();
    let big = work.path().join("big");
    let dd = Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "count=256", "status=none"])
        .arg(format!("of={}", big.display()))
        .status()
        .unwrap();
    assert!(dd.success());
    podfs.ok(&["save", "p", "--from", work.path().to_str().unwrap()]);
    let cache = tempfile::tempdir().unwrap();
    let at = 100 * MIB as u64 + 12_345;
    let want = read_at(&big, at, 4096).unwrap();
    let range_reads = |addr: &str| {
        sample(
            &scrape(addr),
            "podfs_remote_requests_total",
            r#"remote="default",op="read_state""#,
        )
    };
    let mount = || {
        let addr = format!("127.0.0.1:{}", support::free_port());
        let args = [
            "--cache-dir",
            cache.path().to_str().unwrap(),
            "--metrics",
            &addr,
        ];
        (Mounted::new(&podfs, &args), addr)
    };
    {
        let (m, addr) = mount();
        let file = m.pod("default", "p").join("big");
        assert_eq!(
            range_reads(&addr),
            0.0,
            "listing and stat fetch no file data"
        );
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 256 * MIB as u64);
        assert_eq!(read_at(&file, at, 4096).unwrap(), want);
        let first = range_reads(&addr);
        assert!(
            (1.0..=2.0).contains(&first),
            "{first} range reads for 4 KiB"
        );
        assert_eq!(read_at(&file, at, 4096).unwrap(), want);
        assert_eq!(range_reads(&addr), first, "read again: no request");
        // Recorded once the answer is sent: the reader may be first.
        wait_until("the read to be timed", Duration::from_secs(10), || {
            let text = scrape(&addr);
            sample(&text, "podfs_fuse_operation_seconds_count", r#"op="read""#) >= 1.0
        });
    }
    let (m, addr) = mount();
    assert_eq!(
        read_at(&m.pod("default", "p").join("big"), at, 4096).unwrap(),
        want
    );
    let text = scrape(&addr);
    assert_eq!(
        range_reads(&addr),
        0.0,
        "after a remount: from the disk cache"
    );
    assert!(
        sample(&text, "podfs_cache_disk_hits_total", "") >= 1.0,
        "{text}"
    );
}

/// Sequential reads of one handle read ahead: after the first 2 MiB of a 64 MiB file (kernel
/// reads in order), blocks past what was read are fetched without being asked for,
/// in range requests of several blocks, and reading on finds them cached: every block is
/// fetched exactly once, in fewer requests than blocks.
#[test]
fn sequential_reads_read_ahead_in_large_requests() {
    let podfs = Podfs::new();
    let data = one_file_pod(&podfs, 64 * MIB, 21);
    let (m, addr) = mounted_with_metrics(&podfs);
    let blocks = || sample(&scrape(&addr), "podfs_cache_fetches_total", "");
    let mut f = std::fs::File::open(m.pod("default", "p").join("big")).unwrap();
    let mut head = vec![0u8; 2 * MIB];
    f.read_exact(&mut head).unwrap();
    assert!(head == data[..2 * MIB]);
    // 2 blocks were read (in 1 MiB kernel reads, or 128 KiB ones without root); the window
    // (1 MiB, doubling per read) reaches past them.
    wait_until("blocks to be read ahead", Duration::from_secs(30), || {
        blocks() >= 4.0
    });
    let mut rest = Vec::new();
    f.read_to_end(&mut rest).unwrap();
    assert!(rest == data[2 * MIB..], "the rest reads back exactly");
    let text = scrape(&addr);
    assert_eq!(
        sample(&text, "podfs_cache_fetches_total", ""),
        64.0,
        "each block fetched once"
    );
    let requests = sample(
        &text,
        "podfs_remote_requests_total",
        r#"remote="default",op="read_state""#,
    );
    assert!(requests < 32.0, "{requests} range requests for 64 blocks");
}

/// The kernel reads ahead 1 MiB at a time on a podfs mount (its default, 128 KiB, would take
/// eight read requests, each two thread hand-offs in the daemon, per MiB). Raising it needs
/// root; without, the mount says how.
#[test]
fn the_kernel_reads_a_sequential_file_a_mib_at_a_time() {
    let podfs = Podfs::new();
    let data = one_file_pod(&podfs, 16 * MIB, 22);
    let (m, addr) = mounted_with_metrics(&podfs);
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        wait_until("the log to say how", Duration::from_secs(30), || {
            m.log_text().contains("read_ahead_kb")
        });
        return;
    }
    let mut f = std::fs::File::open(m.pod("default", "p").join("big")).unwrap();
    let mut got = Vec::with_capacity(data.len());
    let mut buf = vec![0u8; MIB];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got == data, "the file reads back exactly");
    let reads = || {
        sample(
            &scrape(&addr),
            "podfs_fuse_operation_seconds_count",
            r#"op="read""#,
        )
    };
    // A read's sample is recorded once it is answered.
    wait_until("16 reads to be counted", Duration::from_secs(30), || {
        reads() >= 16.0
    });
    let n = reads();
    assert!(n < 40.0, "{n} FUSE reads for 16 MiB (128 at 128 KiB each)");
}

/// Blocks read once are on disk for the next mount (the remote is not needed for them), and a
/// byte flipped in a cached block is caught: the block is fetched again, the bytes are right.
#[test]
fn the_disk_cache_serves_a_remount_and_damaged_cache_blocks_are_fetched_again() {
    let podfs = Podfs::new();
    let (data, _) = big_pod(&podfs);
    let cache = tempfile::tempdir().unwrap();
    let args = ["--cache-dir", cache.path().to_str().unwrap()];
    let cached_blocks = || cached_blocks(cache.path());
    {
        let m = Mounted::new(&podfs, &args);
        assert_eq!(
            std::fs::read(m.pod("default", "p").join("big")).unwrap(),
            data
        );
    }
    // SAFETY: geteuid cannot fail and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    assert_eq!(
        cached_blocks().len(),
        if root { 2 } else { 5 },
        "the version object and the file: one file per 1 MiB block, or where the kernel may \
         read it directly (root), one whole-file copy instead"
    );

    // Without the state object, a new mount still reads the file: from the disk cache.
    let state = podfs.pods_dir().join("localstack-pod-p-state-1.zip");
    let away = podfs.pods_dir().join("state-away");
    std::fs::rename(&state, &away).unwrap();
    {
        let m = Mounted::new(&podfs, &args);
        assert_eq!(
            std::fs::read(m.pod("default", "p").join("big")).unwrap(),
            data
        );
    }

    // Damage every cached block and the cached version object; with the remote back, the
    // right tree and bytes come back.
    for block in cached_blocks() {
        let len = std::fs::metadata(&block).unwrap().len();
        flip(&block, len - 7);
    }
    std::fs::rename(&away, &state).unwrap();
    let m = Mounted::new(&podfs, &args);
    assert_eq!(
        std::fs::read(m.pod("default", "p").join("big")).unwrap(),
        data
    );
}

/// Save and load never cross into a real podfs mount inside their tree (the hardening issue
/// tests this with a stand-in; this is the mount itself, as mountinfo shows it).
#[test]
fn save_and_load_leave_a_podfs_mount_inside_the_tree_alone() {
    let podfs = Podfs::new();
    let _work = one_pod(&podfs);
    let m = Mounted::new(&podfs, &[]);
    let tree = m.point.parent().unwrap().to_str().unwrap().to_owned();
    let out = podfs.run(&["save", "outer", "--from", &tree]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(a podfs mount)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!podfs.ok(&["inspect", "outer"]).contains("mnt"));
    podfs.ok(&["load", "outer", "--into", &tree, "--strategy", "overwrite"]);
    assert!(is_mounted(&m.point), "the mount is still there");
    assert_eq!(
        std::fs::read_to_string(m.pod("default", "p").join("hello.txt")).unwrap(),
        "hello, pods\n"
    );
}

/// The block files of the disk cache `dir` (its hidden lock and temp files left out).
fn cached_blocks(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                dirs.push(p);
            } else if name.len() > 32 && !name.starts_with('.') {
                out.push(p);
            }
        }
    }
    out
}

/// Whether the kernel will pass reads through to backing files for a mount run by this user;
/// when not (not root), the mount must say why in its log.
fn passthrough_or_log(m: &Mounted) -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    wait_until("the log to say why", Duration::from_secs(30), || {
        m.log_text().contains("FUSE passthrough")
    });
    false
}

/// A metric's value, once it has stopped changing between two scrapes (operations are
/// recorded after they are answered, so a reader may finish first).
fn settled(addr: &str, name: &str, labels: &str) -> f64 {
    let mut last = sample(&scrape(addr), name, labels);
    let mut n = 0;
    wait_until(
        &format!("{name} to settle"),
        Duration::from_secs(30),
        || {
            std::thread::sleep(Duration::from_millis(50));
            let now = sample(&scrape(addr), name, labels);
            n = if now == last { n + 1 } else { 0 };
            last = now;
            n >= 3
        },
    );
    last
}

fn fuse_reads(addr: &str) -> f64 {
    settled(addr, "podfs_fuse_operation_seconds_count", r#"op="read""#)
}

fn passthrough_opens(addr: &str) -> f64 {
    sample(&scrape(addr), "podfs_passthrough_opens_total", "")
}

/// Waits until the kernel has released every handle: it does so shortly after the last close
/// returns, and an open before that still finds the file open.
fn wait_until_released(addr: &str) {
    wait_until(
        "every handle to be released",
        Duration::from_secs(30),
        || sample(&scrape(addr), "podfs_open_files", "") == 0.0,
    );
}

/// Waits until `n` whole-file copies have been written.
fn wait_for_copies(addr: &str, n: f64) {
    wait_until("the whole-file copy", Duration::from_secs(60), || {
        sample(&scrape(addr), "podfs_cache_file_copies_total", "") >= n
    });
}

/// A large file read from start to end is kept whole in the disk cache, and the next open hands
/// that copy to the kernel: it reads the file without asking the mount (FUSE passthrough).
#[test]
fn a_file_read_whole_is_then_read_by_the_kernel_directly() {
    let podfs = Podfs::new();
    let data = one_file_pod(&podfs, 3 * MIB + 12345, 31);
    let (m, addr) = mounted_with_metrics(&podfs);
    if !passthrough_or_log(&m) {
        return;
    }
    let path = m.pod("default", "p").join("big");
    assert!(std::fs::read(&path).unwrap() == data);
    wait_for_copies(&addr, 1.0);
    wait_until_released(&addr);
    let reads = fuse_reads(&addr);
    assert!(reads >= 1.0);
    assert_eq!(passthrough_opens(&addr), 0.0);
    assert!(
        std::fs::read(&path).unwrap() == data,
        "read again: the same bytes"
    );
    assert!(read_at(&path, 3 * MIB as u64, 12345).unwrap() == data[3 * MIB..]);
    assert_eq!(passthrough_opens(&addr), 2.0);
    assert_eq!(fuse_reads(&addr), reads, "the kernel did not ask the mount");
}

/// The kernel refuses to mix the two ways of reading one inode: while a handle reads through
/// the mount, new opens do too, even with a copy ready; while one passes through, so do all.
#[test]
fn opens_of_one_file_never_mix_passthrough_and_reads_through_the_mount() {
    let podfs = Podfs::new();
    let data = one_file_pod(&podfs, 2 * MIB + 7, 32);
    let (m, addr) = mounted_with_metrics(&podfs);
    if !passthrough_or_log(&m) {
        return;
    }
    let path = m.pod("default", "p").join("big");
    let read_all = |f: &mut std::fs::File| {
        let mut got = Vec::new();
        f.rewind().unwrap();
        f.read_to_end(&mut got).unwrap();
        assert!(got == data, "the file's bytes");
    };
    let mut a = std::fs::File::open(&path).unwrap();
    read_all(&mut a);
    wait_for_copies(&addr, 1.0);
    // `a` still reads through the mount: `b` must as well.
    let mut b = std::fs::File::open(&path).unwrap();
    read_all(&mut b);
    read_all(&mut a);
    assert_eq!(passthrough_opens(&addr), 0.0);
    drop((a, b));
    wait_until_released(&addr);
    let mut c = std::fs::File::open(&path).unwrap();
    let mut d = std::fs::File::open(&path).unwrap();
    read_all(&mut c);
    read_all(&mut d);
    assert_eq!(passthrough_opens(&addr), 2.0);
}

/// A copy found on disk (an earlier mount's) is not handed to the kernel before this mount has
/// checked it; a damaged one is dropped, and reads return the true bytes all along.
#[test]
fn a_whole_file_copy_from_disk_is_checked_first_and_dropped_if_damaged() {
    let podfs = Podfs::new();
    let data = one_file_pod(&podfs, 3 * MIB, 33);
    {
        let (m, addr) = mounted_with_metrics(&podfs);
        if !passthrough_or_log(&m) {
            return;
        }
        assert!(std::fs::read(m.pod("default", "p").join("big")).unwrap() == data);
        wait_for_copies(&addr, 1.0);
    }
    let copy = files_of_size(podfs.home.path(), data.len() as u64);
    assert_eq!(copy.len(), 1, "one whole-file copy in the cache");
    let copy = &copy[0];

    // Whole: checked at the first open (which reads through the mount, from the copy: it
    // replaced the file's blocks on disk), then passed through.
    let (m, addr) = mounted_with_metrics(&podfs);
    let path = m.pod("default", "p").join("big");
    assert!(std::fs::read(&path).unwrap() == data);
    let metrics = scrape(&addr);
    assert_eq!(sample(&metrics, "podfs_cache_fetches_total", ""), 0.0);
    assert!(sample(&metrics, "podfs_cache_copy_hits_total", "") >= 3.0);
    assert_eq!(passthrough_opens(&addr), 0.0, "not before it is checked");
    wait_until("the copy to be checked", Duration::from_secs(30), || {
        std::fs::read(&path).unwrap() == data && passthrough_opens(&addr) >= 1.0
    });
    drop(m);

    // Damaged: dropped, never passed through; the bytes read are the true ones.
    flip(copy, 2 * MIB as u64 + 99);
    let (m, addr) = mounted_with_metrics(&podfs);
    let path = m.pod("default", "p").join("big");
    assert!(std::fs::read(&path).unwrap() == data);
    wait_until(
        "the damaged copy to be dropped",
        Duration::from_secs(30),
        || sample(&scrape(&addr), "podfs_cache_file_copies_damaged_total", "") >= 1.0,
    );
    assert!(!copy.exists(), "the damaged copy is removed");
    assert!(std::fs::read(&path).unwrap() == data);
    assert_eq!(passthrough_opens(&addr), 0.0);
}

/// Regular files of exactly `len` bytes under `dir`.
fn files_of_size(dir: &Path, len: u64) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let (p, t) = (e.path(), e.file_type().unwrap());
        if t.is_dir() {
            out.extend(files_of_size(&p, len));
        } else if t.is_file() && e.metadata().unwrap().len() == len {
            out.push(p);
        }
    }
    out
}

/// A random read of a file saved with 256 KiB checksum blocks fetches those blocks around it,
/// not a whole 1 MiB unit: a range request costs more the longer it is.
#[test]
fn a_random_read_fetches_only_the_checksum_blocks_around_it() {
    let podfs = Podfs::new();
    let data = one_file_pod(&podfs, 12 * MIB, 34);
    let (m, addr) = mounted_with_metrics(&podfs);
    // Past the first few units, which a first read treats as the start of a sequential one.
    let at = 17 * MIB as u64 / 2 + 100;
    let got = read_at(&m.pod("default", "p").join("big"), at, 4096).unwrap();
    assert!(got == data[at as usize..at as usize + 4096]);
    let fetched = sample(&scrape(&addr), "podfs_cache_fetched_bytes_total", "");
    assert!(fetched >= (256 << 10) as f64, "{fetched} bytes fetched");
    assert!(
        fetched < MIB as f64,
        "{fetched} bytes fetched: less than a 1 MiB unit"
    );
}

/// A file larger than a quarter of the disk cache gets no whole-file copy: the copy sits beside
/// the file's blocks and would push them, or itself, out.
#[test]
fn a_file_too_large_for_the_cache_gets_no_whole_file_copy() {
    let podfs = Podfs::new();
    let data = one_file_pod(&podfs, 3 * MIB, 35);
    let addr = format!("127.0.0.1:{}", support::free_port());
    let m = Mounted::new(&podfs, &["--metrics", &addr, "--cache-size", "8M"]);
    let path = m.pod("default", "p").join("big");
    assert!(std::fs::read(&path).unwrap() == data);
    wait_until("the blocks on disk", Duration::from_secs(30), || {
        sample(&scrape(&addr), "podfs_cache_disk_writes_total", "") >= 3.0
    });
    assert!(std::fs::read(&path).unwrap() == data);
    let text = scrape(&addr);
    assert_eq!(sample(&text, "podfs_cache_file_copies_total", ""), 0.0);
    assert_eq!(sample(&text, "podfs_passthrough_opens_total", ""), 0.0);
}
