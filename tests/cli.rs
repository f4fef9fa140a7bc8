//! The podfs binary on the built-in `default` remote and on `file://` remotes: remote
//! management, pod names, bad input, credentials in remote URLs, and the volume dir. The
//! scenarios every remote shares (round trips, incremental saves, deletes, load strategies) are
//! in `backends.rs`.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use support::{MIB, Podfs, assert_same_tree, make_tree, snapshot};

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
    make_tree(&src, MIB);
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
