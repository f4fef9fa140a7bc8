//! The S3 remote against a real server (moto), cross-checked with independent clients (the aws
//! CLI and boto3). Every test starts its own moto on a free loopback port. The scenarios every
//! remote shares (round trips, incremental saves, deletes, load strategies) are in
//! `backends.rs`; this file keeps what only S3 has: the seed's flow, multipart uploads, key
//! prefixes, pagination, credentials, and servers that fail.

mod support;

use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use podfs::config::resolve_with;
use podfs::pod::PodName;
use podfs::remote::{OpenParams, open};
use support::moto::{DyingProxy, KEY_ID, Moto, SECRET};
use support::{Counter, MIB, Podfs, assert_same_tree, make_tree, noise};

/// The smallest part size S3 accepts, so modest files take the multipart path.
const SMALL_PARTS: &str = "part_size=5242880";

/// A podfs whose environment holds the keys the seed's placeholders read.
fn podfs() -> Podfs {
    Podfs::new()
        .env("AWS_ACCESS_KEY_ID", KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
}

/// A URL template in the seed's form for `bucket[/prefix]` on `endpoint`.
fn seed_url(bucket_and_prefix: &str, endpoint: &str, extra: &str) -> String {
    let mut url = format!(
        "s3://{bucket_and_prefix}/?access_key_id={{access_key_id}}&secret_access_key={{secret_access_key}}&endpoint={endpoint}"
    );
    if !extra.is_empty() {
        url.push('&');
        url.push_str(extra);
    }
    url
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::File::create(path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
}

fn stdout_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        stdout_of(out)
    );
}

/// The seed's flow verbatim: remote add with placeholders, `save` from the current directory,
/// `aws s3 ls` shows the two objects (which Python's zipfile opens), `load` restores the tree.
#[test]
fn seed_flow_round_trips_and_interoperates() {
    let moto = Moto::start();
    let p = podfs();
    let url = seed_url("ls-pods-bucket-test", &moto.endpoint, "");
    p.ok(&["remote", "add", "s3-storage-aws", &url]);
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path(), 0);

    let out = p
        .command()
        .current_dir(src.path())
        .args(["save", "my-pod", "s3-storage-aws"])
        .output()
        .unwrap();
    assert_ok(&out, "podfs save my-pod s3-storage-aws");

    let ls = moto.aws(&["s3", "ls", "s3://ls-pods-bucket-test"]);
    assert_ok(&ls, "aws s3 ls");
    let listing = stdout_of(&ls);
    for name in [
        "localstack-pod-my-pod-state-1.zip",
        "localstack-pod-my-pod-version-1.zip",
    ] {
        assert!(listing.contains(name), "aws s3 ls lacks {name}:\n{listing}");
    }
    let names = moto.python(
        r#"
for key in ["localstack-pod-my-pod-state-1.zip", "localstack-pod-my-pod-version-1.zip"]:
    body = s3.get_object(Bucket="ls-pods-bucket-test", Key=key)["Body"].read()
    z = zipfile.ZipFile(io.BytesIO(body))
    assert z.testzip() is None, key
    print(key, sorted(z.namelist()))
"#,
    );
    assert!(names.contains("'dir/medium.bin'"), "{names}");
    assert!(names.contains("'version.json'"), "{names}");

    let dst = tempfile::tempdir().unwrap();
    let out = p
        .command()
        .current_dir(dst.path())
        .args(["load", "my-pod", "s3-storage-aws"])
        .output()
        .unwrap();
    assert_ok(&out, "podfs load my-pod s3-storage-aws");
    assert_same_tree(src.path(), dst.path());
}

/// A state object larger than the URL's `part_size` goes up as a multipart upload (its ETag says
/// how many parts) and loads back whole. The round trip itself is in `backends.rs`.
#[test]
fn a_state_object_above_the_part_size_goes_up_in_parts() {
    let moto = Moto::start();
    let p = podfs();
    p.ok(&[
        "remote",
        "add",
        "r",
        &seed_url("parts-bucket", &moto.endpoint, SMALL_PARTS),
    ]);
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path(), 12 * MIB);
    p.ok(&[
        "save",
        "in-parts",
        "r",
        "--from",
        src.path().to_str().unwrap(),
    ]);

    // About 12.3 MiB in 5 MiB parts: an S3 multipart ETag ends in "-3".
    let etag = moto.python(
        r#"print(s3.head_object(Bucket="parts-bucket", Key="localstack-pod-in-parts-state-1.zip")["ETag"])"#,
    );
    assert!(etag.trim().trim_matches('"').ends_with("-3"), "ETag {etag}");
    let dst = tempfile::tempdir().unwrap();
    p.assert_loads("in-parts", "r", dst.path(), src.path());
}

/// A large state object goes up while it is written: its parts are uploaded as the zip grows
/// (the header of an entry being written goes last), and it loads back whole.
#[test]
fn a_large_state_object_is_uploaded_while_it_is_written() {
    let moto = Moto::start();
    let p = podfs().env("PODFS_LOG", "podfs::remote::s3=debug");
    p.ok(&[
        "remote",
        "add",
        "r",
        &seed_url("growing-bucket", &moto.endpoint, SMALL_PARTS),
    ]);
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path(), 64 * MIB);
    let out = p.run(&[
        "save",
        "growing",
        "r",
        "--from",
        src.path().to_str().unwrap(),
    ]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert_ok(&out, "podfs save");
    assert!(
        log.contains("uploading the parts of the state object as they are written"),
        "{log}"
    );
    // About 64.3 MiB in 5 MiB parts: 13 parts.
    let etag = moto.python(
        r#"print(s3.head_object(Bucket="growing-bucket", Key="localstack-pod-growing-state-1.zip")["ETag"])"#,
    );
    assert!(
        etag.trim().trim_matches('"').ends_with("-13"),
        "ETag {etag}"
    );
    let dst = tempfile::tempdir().unwrap();
    p.assert_loads("growing", "r", dst.path(), src.path());
}

/// Objects sit under the URL's key prefix and nowhere else.
#[test]
fn key_prefix_scopes_the_objects() {
    let moto = Moto::start();
    let p = podfs();
    p.ok(&[
        "remote",
        "add",
        "team",
        &seed_url("prefix-bucket/team/pods", &moto.endpoint, ""),
    ]);
    p.ok(&[
        "remote",
        "add",
        "root",
        &seed_url("prefix-bucket", &moto.endpoint, ""),
    ]);
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path(), 0);
    p.ok(&[
        "save",
        "prefixed",
        "team",
        "--from",
        src.path().to_str().unwrap(),
    ]);

    let keys = moto.keys("prefix-bucket", "");
    assert_eq!(
        keys,
        [
            "team/pods/localstack-pod-prefixed-state-1.zip",
            "team/pods/localstack-pod-prefixed-version-1.zip"
        ]
    );
    assert!(p.ok(&["list", "team"]).contains("prefixed"));
    assert!(!p.ok(&["list", "root"]).contains("prefixed"));
    let dst = tempfile::tempdir().unwrap();
    p.assert_loads("prefixed", "team", dst.path(), src.path());
}

/// ListObjectsV2 pages (1,000 keys each) are all read: by the library and by `podfs delete`.
#[test]
fn listing_paginates_past_1000_objects() {
    let moto = Moto::start();
    let p = podfs();
    let url = format!(
        "s3://paged-bucket/pods/?access_key_id={KEY_ID}&secret_access_key={SECRET}&endpoint={}",
        moto.endpoint
    );
    p.ok(&["remote", "add", "paged", &url]);
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path(), 0);
    p.ok(&[
        "save",
        "many",
        "paged",
        "--from",
        src.path().to_str().unwrap(),
    ]);
    // 1,100 more (uncommitted) state objects, and a neighbour pod whose name extends ours.
    moto.python(
        r#"
for i in range(2, 1102):
    s3.put_object(Bucket="paged-bucket", Key=f"pods/localstack-pod-many-state-{i}.zip", Body=b"")
s3.put_object(Bucket="paged-bucket", Key="pods/localstack-pod-many-more-version-1.zip", Body=b"")
"#,
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let resolved = resolve_with("paged", &url, |_| None).unwrap();
        let remote = open("paged", &resolved, &OpenParams::default())
            .await
            .unwrap();
        let pod = PodName::new("many").unwrap();
        let states = remote.list_states(&pod).await.unwrap();
        assert_eq!(states, (1..=1101).collect::<Vec<u64>>());
        assert_eq!(remote.list_versions(&pod).await.unwrap(), [1]);
        let pods: Vec<String> = remote
            .list_pods()
            .await
            .unwrap()
            .iter()
            .map(|(p, _)| p.to_string())
            .collect();
        assert_eq!(pods, ["many", "many-more"]);
    });

    p.ok(&["delete", "many", "paged"]);
    assert_eq!(
        moto.keys("paged-bucket", "pods/localstack-pod-many-"),
        ["pods/localstack-pod-many-more-version-1.zip"]
    );
}

/// With authentication on (an IAM user made in moto's first unauthenticated calls), the right
/// keys work and a wrong secret gives one "access denied" line naming the remote.
#[test]
fn wrong_credentials_are_denied_naming_the_remote() {
    let moto = Moto::start_with_env(&[("INITIAL_NO_AUTH_ACTION_COUNT", "3")]);
    let keys = moto.python(
        r#"
iam = boto3.client("iam", endpoint_url=EP, region_name="us-east-1",
                   aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
iam.create_user(UserName="podfs")
iam.put_user_policy(UserName="podfs", PolicyName="s3", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
key = iam.create_access_key(UserName="podfs")["AccessKey"]
print(key["AccessKeyId"], key["SecretAccessKey"])
"#,
    );
    let (id, secret) = keys.trim().split_once(' ').unwrap();
    let p = Podfs::new()
        .env("AWS_ACCESS_KEY_ID", id)
        .env("AWS_SECRET_ACCESS_KEY", secret);
    p.ok(&[
        "remote",
        "add",
        "good",
        &seed_url("auth-bucket", &moto.endpoint, ""),
    ]);
    p.ok(&[
        "remote",
        "add",
        "wrong-keys",
        &format!(
            "s3://auth-bucket/?access_key_id={id}&secret_access_key=not-the-secret&endpoint={}",
            moto.endpoint
        ),
    ]);
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path(), 0);
    let from = src.path().to_str().unwrap();
    p.ok(&["save", "authed", "good", "--from", from]);

    for args in [
        &["save", "authed", "wrong-keys", "--from", from][..],
        &["list", "wrong-keys"][..],
    ] {
        let stderr = p.fails(args, "access denied by remote \"wrong-keys\"");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(!stderr.contains("not-the-secret"), "{stderr}");
        assert!(!stderr.contains("SdkError"), "{stderr}");
    }
    assert_eq!(
        moto.python_with(
            r#"print(len(s3.list_objects_v2(Bucket="auth-bucket").get("Contents", [])))"#,
            id,
            secret
        )
        .trim(),
        "2"
    );
}

/// An unset placeholder variable is named, before any request.
#[test]
fn unset_placeholder_variable_is_named() {
    let p = Podfs::new();
    p.ok(&[
        "remote",
        "add",
        "s3-storage-aws",
        &seed_url("ls-pods-bucket-test", "http://127.0.0.1:9", ""),
    ]);
    let out = p
        .command()
        .env("AWS_ACCESS_KEY_ID", "x")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .args(["list", "s3-storage-aws"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("AWS_SECRET_ACCESS_KEY"), "{stderr}");
    assert!(stderr.contains("s3-storage-aws"), "{stderr}");
}

/// A closed port: a clear error after bounded retries, a failing exit status, nothing left.
#[test]
fn unreachable_endpoint_fails_clearly() {
    let port = support::free_port(); // nothing listens there
    let p = podfs();
    p.ok(&[
        "remote",
        "add",
        "nowhere",
        &seed_url("some-bucket", &format!("http://127.0.0.1:{port}"), ""),
    ]);
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path(), 0);
    let stderr = p.fails(
        &[
            "save",
            "lost",
            "nowhere",
            "--from",
            src.path().to_str().unwrap(),
        ],
        "remote \"nowhere\" is unavailable",
    );
    assert!(stderr.contains("cannot reach"), "{stderr}");
    assert!(stderr.contains("attempts"), "{stderr}");
    p.fails(&["list", "nowhere"], "remote \"nowhere\" is unavailable");
    // No staged state object is left behind either.
    let staging = p.home.path().join("staging");
    let left: Vec<_> = std::fs::read_dir(&staging)
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

/// The server dies in the middle of a multipart upload: the save fails, no version exists, and
/// the same save succeeds afterwards.
#[test]
fn server_dying_mid_save_leaves_no_version() {
    let moto = Moto::start();
    let proxy = DyingProxy::start(moto.port, 12 << 20);
    let p = podfs();
    p.ok(&[
        "remote",
        "add",
        "flaky",
        &seed_url("crash-bucket", &proxy.endpoint, SMALL_PARTS),
    ]);
    p.ok(&[
        "remote",
        "add",
        "direct",
        &seed_url("crash-bucket", &moto.endpoint, SMALL_PARTS),
    ]);
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path(), 40 * MIB);
    let from = src.path().to_str().unwrap();

    let stderr = p.fails(
        &["save", "crashy", "flaky", "--from", from],
        "remote \"flaky\"",
    );
    eprintln!("the interrupted save said: {stderr}");
    assert!(
        proxy.is_dead(),
        "the proxy forwarded only {} bytes",
        proxy.forwarded()
    );
    assert!(
        moto.keys("crash-bucket", "localstack-pod-crashy-version-")
            .is_empty()
    );
    assert!(
        p.ok(&["list", "direct"])
            .lines()
            .all(|l| !l.contains("crashy"))
    );

    let out = p.ok(&["save", "crashy", "direct", "--from", from]);
    assert!(out.contains("Saved version 1"), "{out}");
    let dst = tempfile::tempdir().unwrap();
    p.assert_loads("crashy", "direct", dst.path(), src.path());
}

/// The backend's edge cases through the library: two-GET version reads, exact state ranges,
/// conditional creates (and a retried commit recognising its own bytes), missing objects, and
/// bucket creation with a LocationConstraint outside us-east-1.
#[test]
fn backend_reads_writes_and_conditions() {
    let moto = Moto::start();
    let url = |bucket: &str, extra: &str| {
        format!(
            "s3://{bucket}/?access_key_id={KEY_ID}&secret_access_key={SECRET}&endpoint={}{extra}",
            moto.endpoint
        )
    };
    let work = tempfile::tempdir().unwrap();
    let big_version = noise(600 << 10, 21);
    let small_state = noise(3000, 22);
    write(&work.path().join("big-version"), &big_version);
    write(&work.path().join("small-state"), &small_state);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let extra = format!("&region=eu-west-1&{SMALL_PARTS}");
        let resolved = resolve_with("edge", &url("edge-bucket", &extra), |_| None).unwrap();
        let remote = open("edge", &resolved, &OpenParams::default())
            .await
            .unwrap();
        let pod = PodName::new("edge").unwrap();
        assert!(
            remote.list_pods().await.unwrap().is_empty(),
            "missing bucket = empty"
        );

        // The first write creates the bucket in the URL's region.
        let counter = Arc::new(Counter::default());
        let state1 = remote
            .put_state(&pod, 1, &work.path().join("small-state"), counter.clone())
            .await
            .unwrap();
        assert_eq!(counter.total(), 3000, "progress counts the bytes sent");
        // A multipart upload advances the progress part by part, to the whole size.
        let parts = noise(11 << 20, 23);
        write(&work.path().join("parts-state"), &parts);
        let counter = Arc::new(Counter::default());
        remote
            .put_state(&pod, 9, &work.path().join("parts-state"), counter.clone())
            .await
            .unwrap();
        assert_eq!(counter.total(), 11 << 20);
        let err = remote
            .put_state(&pod, 1, &work.path().join("small-state"), counter.clone())
            .await
            .unwrap_err();
        assert!(
            matches!(err, podfs::remote::RemoteError::AlreadyExists(_)),
            "{err}"
        );

        // A version object larger than the first (tail) GET comes back whole and in order.
        let v = bytes::Bytes::from(big_version.clone());
        remote
            .commit_version(&pod, 1, v.clone(), &[1], Some(&state1), None)
            .await
            .unwrap();
        assert_eq!(remote.read_version(&pod, 1).await.unwrap(), v);
        // Committing the same bytes again is recognised as done (a retry whose first attempt
        // succeeded); different bytes are a conflict.
        remote
            .commit_version(&pod, 1, v.clone(), &[1], Some(&state1), None)
            .await
            .unwrap();
        let err = remote
            .commit_version(
                &pod,
                1,
                bytes::Bytes::from_static(b"other"),
                &[1],
                Some(&state1),
                None,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, podfs::remote::RemoteError::AlreadyExists(_)),
            "{err}"
        );
        // A small one (under the tail size) in one GET.
        let small = bytes::Bytes::from_static(b"tiny version object");
        remote
            .commit_version(&pod, 2, small.clone(), &[1], None, Some(1))
            .await
            .unwrap();
        assert_eq!(remote.read_version(&pod, 2).await.unwrap(), small);

        // Exact ranges; a range past the end is an error, not a short read.
        let got = remote.read_state(&pod, 1, 1, 100..1100).await.unwrap();
        assert_eq!(&got[..], &small_state[100..1100]);
        assert!(remote.read_state(&pod, 1, 1, 2900..3100).await.is_err());
        let missing = remote.read_version(&pod, 9).await.unwrap_err();
        assert!(
            matches!(missing, podfs::remote::RemoteError::NotFound(_)),
            "{missing}"
        );
        remote.delete_version(&pod, 9).await.unwrap();
        assert_eq!(remote.list_versions(&pod).await.unwrap(), [1, 2]);
    });
    let location =
        moto.python(r#"print(s3.get_bucket_location(Bucket="edge-bucket")["LocationConstraint"])"#);
    assert_eq!(location.trim(), "eu-west-1");
}

/// Ctrl-C in the middle of a multipart upload aborts it: no parts stay on the server, no object
/// or version appears, the staged state zip is removed, and podfs exits with one line.
#[test]
fn sigint_during_a_multipart_upload_aborts_it() {
    let moto = Moto::start();
    let proxy = DyingProxy::stalling(moto.port, 12 << 20);
    let p = podfs();
    p.ok(&[
        "remote",
        "add",
        "slow",
        &seed_url("int-bucket", &proxy.endpoint, SMALL_PARTS),
    ]);
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path(), 40 * MIB);
    let mut child = p
        .command()
        .args(["save", "stopped", "slow", "--from"])
        .arg(src.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let uploads = || {
        moto.python(
            r#"
try:
    print(len(s3.list_multipart_uploads(Bucket="int-bucket").get("Uploads", [])))
except s3.exceptions.NoSuchBucket:
    print(0)
"#,
        )
        .trim()
        .parse::<usize>()
        .unwrap()
    };
    // Wait until the upload is under way and held by the proxy.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while proxy.forwarded() < 12 << 20 || uploads() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the upload never started"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the save ended on its own"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("interrupted by SIGINT"), "{stderr}");
    assert_eq!(uploads(), 0, "the multipart upload was aborted");
    assert!(moto.keys("int-bucket", "").is_empty());
    let staged: Vec<_> = std::fs::read_dir(p.home.path().join("staging"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(staged.is_empty(), "staged files left: {staged:?}");
}
