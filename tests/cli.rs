//! The podfs binary on the built-in `default` remote and on `file://` remotes: round trips,
//! incremental saves, deletes, and bad input.

mod support;

use std::io::Write;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use filetime::FileTime;
use support::{Podfs, assert_same_tree, snapshot};

/// A tree with regular, empty and large files, an empty directory, symlinks, modes and mtimes.
fn make_tree(root: &Path, big_mb: usize) {
    std::fs::create_dir_all(root.join("dir/nested/deeper")).unwrap();
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::fs::write(root.join("hello.txt"), "hello, pods\n").unwrap();
    std::fs::write(root.join("empty-file"), "").unwrap();
    std::fs::write(root.join("dir/nested/deeper/data.json"), r#"{"a": 1}"#).unwrap();
    let mut big = std::fs::File::create(root.join("dir/big.bin")).unwrap();
    let chunk: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for i in 0..big_mb {
        big.write_all(&chunk[i % 7..]).unwrap();
        big.write_all(&chunk[..i % 7]).unwrap();
    }
    drop(big);
    std::fs::write(root.join("script.sh"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(root.join("script.sh"), PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(root.join("secret"), "s").unwrap();
    std::fs::set_permissions(root.join("secret"), PermissionsExt::from_mode(0o600)).unwrap();
    symlink("hello.txt", root.join("link-to-file")).unwrap();
    symlink("../../nowhere", root.join("dir/dangling")).unwrap();
    symlink("dir/nested", root.join("link-to-dir")).unwrap();
    filetime::set_file_mtime(
        root.join("hello.txt"),
        FileTime::from_unix_time(1_600_000_000, 123_456_789),
    )
    .unwrap();
    std::fs::set_permissions(root.join("dir/nested"), PermissionsExt::from_mode(0o750)).unwrap();
    filetime::set_file_mtime(
        root.join("empty-dir"),
        FileTime::from_unix_time(1_500_000_000, 1),
    )
    .unwrap();
}

fn copy_tree(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp")
        .args([
            "-a",
            &format!("{}/.", from.display()),
            &to.display().to_string(),
        ])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn save_change_save_then_every_version_loads_byte_for_byte() {
    let p = Podfs::new();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_tree(&src, 100);
    let out = p.ok(&[
        "save",
        "roundtrip",
        "--from",
        src.to_str().unwrap(),
        "-m",
        "first",
    ]);
    assert!(
        out.contains("Saved version 1 of pod roundtrip on remote default"),
        "{out}"
    );
    let v1 = work.path().join("v1-expected");
    std::fs::create_dir(&v1).unwrap();
    copy_tree(&src, &v1);

    // Change: edit, add, delete, chmod, re-link, new empty dir.
    std::fs::write(src.join("hello.txt"), "changed\n").unwrap();
    std::fs::write(src.join("dir/new.txt"), "new file").unwrap();
    std::fs::remove_file(src.join("secret")).unwrap();
    std::fs::set_permissions(src.join("script.sh"), PermissionsExt::from_mode(0o700)).unwrap();
    std::fs::remove_file(src.join("link-to-file")).unwrap();
    symlink("script.sh", src.join("link-to-file")).unwrap();
    std::fs::create_dir(src.join("another-empty")).unwrap();
    let out = p.ok(&[
        "save",
        "roundtrip",
        "--from",
        src.to_str().unwrap(),
        "-m",
        "second",
    ]);
    assert!(out.contains("Saved version 2"), "{out}");

    for (version, expected) in [("1", &v1), ("2", &src)] {
        let into = work.path().join(format!("load-{version}"));
        let spec = format!("roundtrip:{version}");
        p.ok(&["load", &spec, "--into", into.to_str().unwrap()]);
        assert_same_tree(expected, &into);
    }
    // Latest by default.
    let into = work.path().join("load-latest");
    p.ok(&["load", "roundtrip", "--into", into.to_str().unwrap()]);
    assert_same_tree(&src, &into);

    let versions = p.ok(&["versions", "roundtrip", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&versions).unwrap();
    assert_eq!(v[0]["message"], "first");
    assert_eq!(v[1]["message"], "second");
    assert_eq!(v[1]["parent"], 1);
}

#[test]
fn incremental_save_stores_only_changed_bytes() {
    let p = Podfs::new();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_tree(&src, 20);
    let first: serde_json::Value =
        serde_json::from_str(&p.ok(&["save", "incr", "--from", src.to_str().unwrap(), "--json"]))
            .unwrap();
    assert!(first["stored_bytes"].as_u64().unwrap() > 20 << 20);

    // Nothing changed: no version is made, and it says so.
    let out = p.ok(&["save", "incr", "--from", src.to_str().unwrap()]);
    assert!(out.contains("Nothing changed since version 1"), "{out}");
    assert!(
        !p.pods_dir()
            .join("localstack-pod-incr-version-2.zip")
            .exists()
    );

    // One small file changes: the new state object holds only it.
    std::fs::write(src.join("dir/nested/deeper/data.json"), r#"{"a": 2}"#).unwrap();
    let second: serde_json::Value =
        serde_json::from_str(&p.ok(&["save", "incr", "--from", src.to_str().unwrap(), "--json"]))
            .unwrap();
    assert_eq!(second["version"], 2);
    assert_eq!(second["changed_files"], 1);
    let state2 = std::fs::metadata(p.pods_dir().join("localstack-pod-incr-state-2.zip")).unwrap();
    assert!(
        state2.len() < 1024,
        "state-2 holds only the changed file: {} bytes",
        state2.len()
    );
    assert_eq!(second["stored_bytes"].as_u64().unwrap(), state2.len());

    // A metadata-only change (a deletion) makes a version with no state object at all.
    std::fs::remove_file(src.join("empty-file")).unwrap();
    let third: serde_json::Value =
        serde_json::from_str(&p.ok(&["save", "incr", "--from", src.to_str().unwrap(), "--json"]))
            .unwrap();
    assert_eq!(third["version"], 3);
    assert_eq!(third["stored_bytes"], 0);
    assert!(
        !p.pods_dir()
            .join("localstack-pod-incr-state-3.zip")
            .exists()
    );
    let into = work.path().join("out");
    p.ok(&["load", "incr", "--into", into.to_str().unwrap()]);
    assert_same_tree(&src, &into);
}

#[test]
fn deleting_a_version_keeps_the_others_loadable() {
    let p = Podfs::new();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_tree(&src, 2);
    p.ok(&["save", "del", "--from", src.to_str().unwrap()]);
    let v1 = work.path().join("v1");
    std::fs::create_dir(&v1).unwrap();
    copy_tree(&src, &v1);
    std::fs::write(src.join("hello.txt"), "v2").unwrap();
    p.ok(&["save", "del", "--from", src.to_str().unwrap()]);
    let v2 = work.path().join("v2");
    std::fs::create_dir(&v2).unwrap();
    copy_tree(&src, &v2);
    std::fs::write(src.join("hello.txt"), "v3").unwrap();
    p.ok(&["save", "del", "--from", src.to_str().unwrap()]);

    // Version 1's state object still holds bytes versions 2 and 3 use: it must stay.
    let out = p.ok(&["delete", "del:1"]);
    assert!(out.contains("Deleted version 1"), "{out}");
    assert!(
        !p.pods_dir()
            .join("localstack-pod-del-version-1.zip")
            .exists()
    );
    assert!(p.pods_dir().join("localstack-pod-del-state-1.zip").exists());
    // Version 2's own state object is used by nobody else once 2 is gone.
    p.ok(&["delete", "del:2"]);
    assert!(!p.pods_dir().join("localstack-pod-del-state-2.zip").exists());
    let into = work.path().join("out");
    p.ok(&["load", "del", "--into", into.to_str().unwrap()]);
    assert_same_tree(&src, &into);
    p.fails(
        &["load", "del:1", "--into", into.to_str().unwrap()],
        "has no version 1",
    );

    let out = p.ok(&["versions", "del", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);

    p.ok(&["delete", "del"]);
    let left: Vec<_> = std::fs::read_dir(p.pods_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "deleting the pod removes every object: {left:?}"
    );
    p.fails(&["versions", "del"], "does not exist");
}

#[test]
fn load_strategies_merge_overwrite_and_dry_run() {
    let p = Podfs::new();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_tree(&src, 1);
    p.ok(&["save", "strat", "--from", src.to_str().unwrap()]);

    let into = work.path().join("into");
    std::fs::create_dir_all(into.join("local-dir")).unwrap();
    std::fs::write(into.join("local-only"), "mine").unwrap();
    std::fs::write(into.join("hello.txt"), "local edit").unwrap();
    // Where the pod has a directory, the target has a symlink pointing elsewhere: it must be
    // replaced, never followed.
    let outside = work.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    symlink(&outside, into.join("dir")).unwrap();

    let before = snapshot(&into);
    let out = p.ok(&[
        "load",
        "strat",
        "--into",
        into.to_str().unwrap(),
        "--dry-run",
    ]);
    assert!(
        out.contains("~ hello.txt") && out.contains("+ script.sh") && out.contains("~ dir"),
        "{out}"
    );
    assert!(
        !out.contains("- local-only"),
        "merge keeps other files: {out}"
    );
    assert_eq!(before, snapshot(&into), "--dry-run changes nothing");
    let out = p.ok(&[
        "load",
        "strat",
        "--into",
        into.to_str().unwrap(),
        "--dry-run",
        "--strategy",
        "overwrite",
    ]);
    assert!(
        out.contains("- local-only") && out.contains("- local-dir"),
        "{out}"
    );

    p.ok(&["load", "strat", "--into", into.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(into.join("local-only")).unwrap(),
        "mine"
    );
    assert_eq!(
        std::fs::read_to_string(into.join("hello.txt")).unwrap(),
        "hello, pods\n"
    );
    assert!(
        std::fs::symlink_metadata(into.join("dir"))
            .unwrap()
            .is_dir()
    );
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing written through the symlink"
    );

    p.ok(&[
        "load",
        "strat",
        "--into",
        into.to_str().unwrap(),
        "--strategy",
        "overwrite",
    ]);
    assert_same_tree(&src, &into);
}

#[test]
fn file_remotes_and_remote_management() {
    let p = Podfs::new();
    let work = tempfile::tempdir().unwrap();
    let store = work.path().join("store");
    let url = format!("file://{}", store.display());
    p.ok(&["remote", "add", "team", &url]);
    let list = p.ok(&["remote", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v[0]["name"], "default");
    assert_eq!(v[1]["name"], "team");
    assert_eq!(v[1]["url"], url.as_str());
    let mode = std::fs::metadata(p.home.path().join("remotes.toml"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let src = work.path().join("src");
    make_tree(&src, 1);
    p.ok(&[
        "save",
        "shared-pod",
        "team",
        "--from",
        src.to_str().unwrap(),
    ]);
    assert!(
        store
            .join("localstack-pod-shared-pod-version-1.zip")
            .exists()
    );
    assert!(store.join("localstack-pod-shared-pod-state-1.zip").exists());
    let pods = p.ok(&["list", "team", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&pods).unwrap();
    assert_eq!(v[0]["name"], "shared-pod");
    assert_eq!(v[0]["latest"], 1);

    // A second installation with the same remote configuration sees the same pod.
    let other = Podfs::new();
    other.ok(&["remote", "add", "team", &url]);
    let into = work.path().join("into");
    other.ok(&[
        "load",
        "shared-pod",
        "team",
        "--into",
        into.to_str().unwrap(),
    ]);
    assert_same_tree(&src, &into);

    let inspect = p.ok(&["inspect", "shared-pod:1", "team"]);
    assert!(
        inspect.contains("link-to-file -> hello.txt") && inspect.contains("empty-dir/"),
        "{inspect}"
    );

    p.ok(&["remote", "delete", "team"]);
    p.fails(&["list", "team"], "remote \"team\" does not exist");
    assert!(
        store
            .join("localstack-pod-shared-pod-version-1.zip")
            .exists(),
        "pods stay"
    );
}

#[test]
fn pod_names_may_look_like_object_suffixes() {
    let p = Podfs::new();
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("f"), "x").unwrap();
    for pod in ["a-state-1", "b-version-2"] {
        p.ok(&["save", pod, "--from", work.path().to_str().unwrap()]);
    }
    let list = p.ok(&["list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a-state-1", "b-version-2"]);
}

/// Bad input: one clear line on stderr, non-zero exit, configuration and data untouched.
#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let p = Podfs::new();
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("f"), "x").unwrap();
    let from = work.path().to_str().unwrap();
    p.ok(&["remote", "add", "good", "file:///tmp/podfs-test-good"]);
    p.ok(&["save", "pod", "--from", from]);
    let remotes_before = std::fs::read(p.home.path().join("remotes.toml")).unwrap();
    let pods_before = snapshot(&p.pods_dir());

    for (args, want) in [
        (
            vec!["remote", "add", "bad name", "file:///x"],
            "invalid remote name",
        ),
        (vec!["remote", "add", "x", "ftp://host/x"], "unknown scheme"),
        (vec!["remote", "add", "x", "s3://"], "invalid remote URL"),
        (
            vec!["remote", "add", "x", "s3://Bad_Bucket/"],
            "not a valid S3 bucket",
        ),
        (vec!["remote", "add", "x", "oras://host"], "namespace"),
        (
            vec!["remote", "add", "x", "s3://b-1/?access_key_id={unclosed"],
            "matching",
        ),
        (
            vec!["remote", "add", "good", "file:///tmp/other"],
            "already exists",
        ),
        (
            vec!["remote", "add", "default", "file:///tmp/other"],
            "built-in remote",
        ),
        (vec!["remote", "delete", "missing"], "does not exist"),
        (
            vec!["remote", "delete", "default"],
            "cannot be added, replaced or deleted",
        ),
        (vec!["save", "bad/name", "--from", from], "invalid pod name"),
        (vec!["save", "pod:2", "--from", from], "invalid pod name"),
        (
            vec!["save", "pod", "missing-remote", "--from", from],
            "remote \"missing-remote\" does not exist",
        ),
        (
            vec!["load", "pod:0", "--into", "/tmp/never"],
            "invalid version",
        ),
        (
            vec!["load", "pod:99", "--into", "/tmp/never"],
            "has no version 99",
        ),
        (
            vec!["load", "nope", "--into", "/tmp/never"],
            "pod \"nope\" does not exist",
        ),
        (vec!["delete", "pod:99"], "has no version 99"),
        (vec!["inspect", "pod:x"], "invalid version"),
        (
            vec!["save", "pod", "--from", "/nonexistent/dir"],
            "/nonexistent/dir",
        ),
    ] {
        let stderr = p.fails(&args, want);
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{args:?}: one line: {stderr}"
        );
    }
    assert!(!Path::new("/tmp/never").exists());
    assert_eq!(
        remotes_before,
        std::fs::read(p.home.path().join("remotes.toml")).unwrap()
    );
    assert_eq!(pods_before, snapshot(&p.pods_dir()));
}

#[test]
fn an_unset_placeholder_names_its_variable() {
    let p = Podfs::new();
    p.ok(&["remote", "add", "s3r", "s3://ls-pods-bucket-test/?access_key_id={access_key_id}&secret_access_key={secret_access_key}"]);
    p.ok(&[
        "remote",
        "add",
        "orasr",
        "oras://{oras_username}:{oras_password}@127.0.0.1:9/ns",
    ]);
    let out = p
        .command()
        .args(["list", "s3r"])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("ACCESS_KEY_ID")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ACCESS_KEY_ID") && stderr.contains("s3r"),
        "{stderr}"
    );
    let out = p
        .command()
        .args(["list", "orasr"])
        .env_remove("ORAS_USERNAME")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("ORAS_USERNAME"),
        "{stderr}"
    );
    // The stored template never holds a resolved value.
    let toml = std::fs::read_to_string(p.home.path().join("remotes.toml")).unwrap();
    assert!(toml.contains("{secret_access_key}") && toml.contains("{oras_password}"));
}

#[test]
fn remote_list_masks_literal_credentials() {
    let p = Podfs::new();
    p.ok(&[
        "remote",
        "add",
        "lit",
        "s3://bucket-x/?access_key_id=AKIAEXAMPLE&secret_access_key=VERYSECRET",
    ]);
    p.ok(&[
        "remote",
        "add",
        "o",
        "oras://me:hunter2@registry.example.com/ns",
    ]);
    let out = p.ok(&["remote", "list"]);
    assert!(
        !out.contains("VERYSECRET") && !out.contains("AKIAEXAMPLE") && !out.contains("hunter2"),
        "{out}"
    );
    assert!(
        out.contains("secret_access_key=***") && out.contains("me:***@"),
        "{out}"
    );
}

#[test]
fn saving_a_tree_that_holds_the_volume_dir_leaves_the_volume_out() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("home");
    std::fs::create_dir_all(tree.join("project")).unwrap();
    std::fs::write(tree.join("project/file"), "data").unwrap();
    let volume = tree.join(".local/share/podfs");
    let p = Podfs::new().env("PODFS_HOME", volume.to_str().unwrap());
    let out = p.run(&["save", "home", "--from", tree.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("left out"));
    // Saving again sees no change: the pod's own objects are not part of the tree.
    let again = p.ok(&["save", "home", "--from", tree.to_str().unwrap()]);
    assert!(again.contains("Nothing changed"), "{again}");
    let inspect = p.ok(&["inspect", "home"]);
    assert!(
        inspect.contains("project/file") && !inspect.contains("podfs/pods"),
        "{inspect}"
    );
}
