//! The `oras://` backend against a real registry (distribution 2.8 via Debian's
//! `docker-registry`), the real podfs binary, and independent clients (oras-py, skopeo). The
//! scenarios every remote shares (round trips, also with Basic and bearer-token auth,
//! incremental saves, deletes, load strategies) are in `backends.rs`; this file keeps what only
//! registries have: interop, auth failures, foreign artifacts, a registry going down, and one
//! that ignores `Range`.

mod support;

use std::path::Path;
use std::process::Command;

use support::range_proxy::RangeStrippingProxy;
use support::registry::{Registry, python};
use support::{MIB, Podfs, assert_same_tree, make_tree, noise, require};

const USER: &str = "podfs-user";
const PASSWORD: &str = "s3cret-Pass!";

/// A pod name unique to this test run.
fn pod_name(test: &str) -> String {
    format!("{test}-{}", std::process::id())
}

/// A podfs installation with remote `oras-remote` pointing at `reg`/`ns`, with the right
/// credentials in the environment when the registry needs them.
fn podfs_for(reg: &Registry, ns: &str) -> Podfs {
    let mut p = Podfs::new();
    if let Some((u, pw)) = &reg.auth {
        p = p.env("ORAS_USERNAME", u).env("ORAS_PASSWORD", pw);
    }
    p.ok(&["remote", "add", "oras-remote", &reg.url(ns)]);
    p
}

fn versions(p: &Podfs, pod: &str) -> Vec<u64> {
    let out = p.ok(&["versions", pod, "oras-remote", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i["version"].as_u64().unwrap())
        .collect()
}

fn save(p: &Podfs, pod: &str, dir: &Path) {
    p.ok(&["save", pod, "oras-remote", "--from", dir.to_str().unwrap()]);
}

fn load(p: &Podfs, pod_ref: &str, into: &Path) {
    p.ok(&[
        "load",
        pod_ref,
        "oras-remote",
        "--into",
        into.to_str().unwrap(),
        "--strategy",
        "overwrite",
    ]);
}

/// The round trip on a token-auth registry is in `backends.rs`; deleting also needs a token with
/// the `delete` action, and a wrong password is refused by the token service.
#[test]
fn bearer_tokens_allow_deleting_and_refuse_a_wrong_password() {
    let reg = Registry::with_token_auth(USER, PASSWORD);
    let p = podfs_for(&reg, "myns");
    let pod = pod_name("token");
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    make_tree(&tree, 0);
    save(&p, &pod, &tree);
    std::fs::write(tree.join("hello.txt"), "second").unwrap();
    save(&p, &pod, &tree);

    p.ok(&["delete", &format!("{pod}:1"), "oras-remote"]);
    assert_eq!(versions(&p, &pod), vec![2]);
    let out = work.path().join("out");
    std::fs::create_dir(&out).unwrap();
    load(&p, &format!("{pod}:2"), &out);
    assert_same_tree(&tree, &out);

    let bad = Podfs::new()
        .env("ORAS_USERNAME", USER)
        .env("ORAS_PASSWORD", "wrong");
    bad.ok(&["remote", "add", "oras-remote", &reg.url("myns")]);
    bad.fails(
        &["versions", &pod, "oras-remote"],
        "wrong user or password for remote \"oras-remote\"",
    );
}

#[test]
fn oras_py_and_skopeo_read_what_podfs_pushed() {
    let reg = Registry::anonymous();
    let p = podfs_for(&reg, "interop");
    let pod = pod_name("interop");
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    make_tree(&tree, 3 * MIB);
    save(&p, &pod, &tree);
    std::fs::write(tree.join("hello.txt"), "second").unwrap();
    save(&p, &pod, &tree);

    let out = work.path().join("pulled");
    let target = format!("{}/interop/{pod}:2", reg.addr());
    let script = format!(
        r#"
import oras.client, zipfile, os, sys
c = oras.client.OrasClient(insecure=True)
files = c.pull(target={target:?}, outdir={out:?})
for f in sorted(files):
    with zipfile.ZipFile(f) as z:
        assert z.testzip() is None, f
        print(os.path.basename(f), len(z.namelist()))
"#,
        out = out.to_str().unwrap()
    );
    let printed = python(&script, work.path());
    for title in [
        format!("localstack-pod-{pod}-version-2.zip"),
        format!("localstack-pod-{pod}-state-1.zip"),
        format!("localstack-pod-{pod}-state-2.zip"),
    ] {
        assert!(printed.contains(&title), "{title} not pulled: {printed}");
        assert!(out.join(&title).is_file(), "{title} missing");
    }

    require("skopeo");
    let raw = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{}/interop/{pod}:1", reg.addr()))
        .output()
        .unwrap();
    assert!(raw.status.success(), "skopeo: {raw:?}");
    let m: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(m["artifactType"], "application/vnd.podfs.pod.v1");
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.oci.empty.v1+json"
    );
    assert_eq!(
        m["layers"][0]["mediaType"],
        "application/vnd.podfs.version.v1+zip"
    );
    assert_eq!(
        m["layers"][1]["annotations"]["org.opencontainers.image.title"],
        format!("localstack-pod-{pod}-state-1.zip")
    );
}

#[test]
fn an_artifact_that_is_not_a_pod_is_refused_clearly() {
    let reg = Registry::anonymous();
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("hello.txt"), "not a pod").unwrap();
    let pod = pod_name("notapod");
    let script = format!(
        r#"
import oras.client
c = oras.client.OrasClient(insecure=True)
c.push(target="{}/other/{pod}:1", files=["hello.txt"])
"#,
        reg.addr()
    );
    python(&script, work.path());
    let p = podfs_for(&reg, "other");
    let into = work.path().join("into");
    std::fs::create_dir(&into).unwrap();
    let err = p.fails(
        &[
            "load",
            &pod,
            "oras-remote",
            "--into",
            into.to_str().unwrap(),
        ],
        "is not a podfs pod",
    );
    assert!(err.contains("artifactType"), "{err}");
    // And `list` skips it instead of failing.
    let list = p.ok(&["list", "oras-remote"]);
    assert!(!list.contains(&pod), "{list}");
}

#[test]
fn wrong_password_is_a_clear_authentication_error() {
    let reg = Registry::with_auth(USER, PASSWORD);
    let work = tempfile::tempdir().unwrap();
    make_tree(work.path(), 0);
    let pod = pod_name("wrongpw");

    let p = Podfs::new()
        .env("ORAS_USERNAME", USER)
        .env("ORAS_PASSWORD", "not-the-password");
    p.ok(&["remote", "add", "oras-remote", &reg.url("myns")]);
    let err = p.fails(
        &[
            "save",
            &pod,
            "oras-remote",
            "--from",
            work.path().to_str().unwrap(),
        ],
        "wrong user or password for remote \"oras-remote\"",
    );
    assert!(!err.contains("not-the-password"), "secret leaked: {err}");

    // No credentials at all.
    let anon = Podfs::new();
    anon.ok(&[
        "remote",
        "add",
        "oras-remote",
        &format!("oras://{}/myns", reg.addr()),
    ]);
    anon.fails(&["list", "oras-remote"], "requires a user and password");
}

#[test]
fn registry_down_fails_after_bounded_retries_and_commits_nothing() {
    let mut reg = Registry::anonymous();
    let p = podfs_for(&reg, "myns");
    let pod = pod_name("down");
    let work = tempfile::tempdir().unwrap();
    make_tree(work.path(), 0);
    save(&p, &pod, work.path());

    reg.stop();
    std::fs::write(work.path().join("hello.txt"), "changed while down").unwrap();
    let err = p.fails(
        &[
            "save",
            &pod,
            "oras-remote",
            "--from",
            work.path().to_str().unwrap(),
        ],
        "unavailable",
    );
    assert!(err.contains("giving up"), "{err}");

    reg.resume();
    assert_eq!(versions(&p, &pod), vec![1]);
}

#[test]
fn many_small_files_spanning_several_blocks_load_exactly() {
    // ~12 MiB of incompressible small files: the load merges neighbouring files into a few
    // large range reads of the state blob, and every file must come back exactly.
    let reg = Registry::anonymous();
    let p = podfs_for(&reg, "myns");
    let pod = pod_name("small");
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("d")).unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..600 {
        let len = 15_000 + (i * 37) % 10_000;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(tree.join(format!("d/f{i:04}.bin")), bytes).unwrap();
    }
    save(&p, &pod, &tree);
    let out = work.path().join("out");
    std::fs::create_dir(&out).unwrap();
    load(&p, &pod, &out);
    assert_same_tree(&tree, &out);
}

/// The sum of the layer sizes (version zip and state zips) of `ns/pod:tag` on `reg`.
fn stored_size(reg: &Registry, ns: &str, pod: &str, tag: u64) -> u64 {
    let script = format!(
        r#"
import json, urllib.request
req = urllib.request.Request("http://{}/v2/{ns}/{pod}/manifests/{tag}",
    headers={{"Accept": "application/vnd.oci.image.manifest.v1+json"}})
m = json.load(urllib.request.urlopen(req))
print(sum(l["size"] for l in m["layers"]))
"#,
        reg.addr()
    );
    let dir = tempfile::tempdir().unwrap();
    python(&script, dir.path()).trim().parse().unwrap()
}

/// Issue: a registry that answers ranged blob reads with the whole blob (`200`) made a load
/// stream each blob from its start for every 8 MiB range (a 64 MiB file cost ~6x its size).
/// Each blob must now be downloaded about once per load, even with many ranges of it in flight
/// at once (two large files, four ranges each).
#[test]
fn a_registry_that_ignores_range_costs_about_one_download_per_blob() {
    let reg = Registry::anonymous();
    let pod = pod_name("norange");
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("small")).unwrap();
    std::fs::write(tree.join("big.bin"), noise(64 * MIB, 1)).unwrap();
    std::fs::write(tree.join("second.bin"), noise(16 * MIB, 2)).unwrap();
    for i in 0..5 {
        std::fs::write(
            tree.join(format!("small/f{i}.txt")),
            format!("small file {i}\n"),
        )
        .unwrap();
    }
    // Saved straight to the registry; loaded through the proxy by another installation.
    save(&podfs_for(&reg, "myns"), &pod, &tree);
    let stored = stored_size(&reg, "myns", &pod, 1);

    let proxy = RangeStrippingProxy::start(reg.port);
    let p = Podfs::new();
    p.ok(&[
        "remote",
        "add",
        "oras-remote",
        &format!("oras://{}/myns", proxy.addr()),
    ]);
    let out = work.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let run = p.run(&["load", &pod, "oras-remote", "--into", out.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "podfs load failed: {stderr}");
    assert_same_tree(&tree, &out);

    let counts = proxy.counts();
    let ratio = counts.blob_bytes as f64 / stored as f64;
    eprintln!("blob bytes through the proxy: {counts:?}, stored {stored}, ratio {ratio:.2}");
    assert!(
        counts.ranges_stripped > 0,
        "the load made no range request: {counts:?}"
    );
    assert_eq!(
        stderr.matches("ignores Range").count(),
        1,
        "the fallback should be logged once: {stderr}"
    );
    // One GET for the version zip, one for the state blob: the reads in flight together
    // (two large files, four ranges each, and the small files) share one download.
    assert!(
        counts.blob_gets <= 2,
        "a blob was fetched more than once: {counts:?}"
    );
    assert!(
        ratio <= 1.2,
        "a load through a registry that ignores Range moved {} blob bytes for {stored} stored \
         ({ratio:.2}x): {counts:?}",
        counts.blob_bytes
    );
}
