//! One fixture per kind of remote, so a scenario is written once and run on each: the built-in
//! `default` remote, a `file://` directory, S3 (a real `moto_server`) and an OCI registry
//! (Debian's `docker-registry`). A [`Backend`] owns its server and a private [`Podfs`] with the
//! remote added; dropping it stops the server. A missing program fails the test (see
//! [`super::require`]), it never skips it.
//!
//! Each backend can also list what it stores, independently of podfs ([`Backend::objects`]):
//! the files of a directory remote, the keys of the bucket (boto3), or the layers of the
//! registry's manifests (plain HTTP), named by their format-v1 object names.

use std::collections::BTreeMap;
use std::path::Path;

use super::moto::{KEY_ID, Moto, SECRET};
use super::registry::{self, Registry};
use super::{Podfs, require};

/// The kind of remote a [`Backend`] stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The built-in `default` remote: `$PODFS_HOME/pods`.
    Default,
    /// `file:///TMP/store`.
    File,
    /// `s3://BUCKET/?access_key_id={access_key_id}&...` on moto.
    S3,
    /// `oras://127.0.0.1:PORT/NAMESPACE` on docker-registry.
    Oras,
}

/// The bucket of the S3 backend and the namespace of the registry backend.
const BUCKET: &str = "podfs-backend-tests";
const NAMESPACE: &str = "backends";

/// What a backend runs besides podfs.
enum Server {
    None,
    Dir(tempfile::TempDir),
    Moto(Moto),
    Registry(Registry),
}

/// A remote of one kind, ready for podfs commands, with a pod name unique to the test.
pub struct Backend {
    /// The podfs installation with [`Backend::remote`] added.
    pub podfs: Podfs,
    pub kind: Kind,
    remote: String,
    /// The URL template given to `podfs remote add` (`None` for the built-in remote).
    url: Option<String>,
    test: String,
    server: Server,
}

impl Backend {
    /// The built-in `default` remote: nothing to start.
    pub fn default_remote(test: &str) -> Self {
        Self::new(test, Kind::Default, "default", None, Server::None)
    }

    /// A `file://` remote on a fresh temporary directory.
    pub fn file(test: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("file://{}", dir.path().join("store").display());
        Self::new(test, Kind::File, "file-remote", Some(url), Server::Dir(dir))
    }

    /// An S3 remote on a fresh moto, in the seed's URL form: credentials come from the
    /// `{access_key_id}`/`{secret_access_key}` placeholders, filled from the environment.
    pub fn moto(test: &str) -> Self {
        let moto = Moto::start();
        let url = format!(
            "s3://{BUCKET}/?access_key_id={{access_key_id}}&secret_access_key={{secret_access_key}}&endpoint={}",
            moto.endpoint
        );
        Self::new(test, Kind::S3, "s3-remote", Some(url), Server::Moto(moto))
    }

    /// An `oras://` remote on a fresh registry anyone may read and write.
    pub fn registry(test: &str) -> Self {
        Self::on_registry(test, Registry::anonymous())
    }

    /// An `oras://` remote on `reg` (which may need credentials: they are put in the
    /// environment for the `{oras_username}`/`{oras_password}` placeholders).
    pub fn on_registry(test: &str, reg: Registry) -> Self {
        let url = reg.url(NAMESPACE);
        Self::new(
            test,
            Kind::Oras,
            "oras-remote",
            Some(url),
            Server::Registry(reg),
        )
    }

    fn new(test: &str, kind: Kind, remote: &str, url: Option<String>, server: Server) -> Self {
        let podfs = install(Podfs::new(), &server, remote, url.as_deref());
        Self {
            podfs,
            kind,
            remote: remote.to_owned(),
            url,
            test: test.to_owned(),
            server,
        }
    }

    /// Another podfs installation (its own volume dir, no state shared with [`Backend::podfs`])
    /// with the same remote configuration. For the built-in remote, whose pods live in the
    /// volume dir, it uses the same volume dir.
    pub fn another_installation(&self) -> Podfs {
        let p = Podfs::new();
        match self.kind {
            Kind::Default => p.env("PODFS_HOME", self.podfs.home.path().to_str().unwrap()),
            _ => install(p, &self.server, &self.remote, self.url.as_deref()),
        }
    }

    /// The remote name to pass to podfs commands.
    pub fn remote(&self) -> &str {
        &self.remote
    }

    /// A pod name unique to this test (lower case, as registry repositories must be).
    pub fn pod(&self) -> String {
        let kind = match self.kind {
            Kind::Default => "default",
            Kind::File => "file",
            Kind::S3 => "s3",
            Kind::Oras => "oras",
        };
        format!("{}-{kind}", self.test)
            .to_lowercase()
            .replace('_', "-")
    }

    /// A second pod name unique to this test.
    pub fn pod_named(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.pod())
    }

    /// `podfs ARGS` with this backend's remote appended: asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        self.podfs.ok(&self.with_remote(args))
    }

    /// `podfs ARGS REMOTE` must fail with one line containing `want`; returns stderr.
    pub fn fails(&self, args: &[&str], want: &str) -> String {
        self.podfs.fails(&self.with_remote(args), want)
    }

    /// `args` with the remote name inserted after the subcommand's positional POD argument.
    fn with_remote<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let at = match args.first() {
            Some(&"list") => 1,
            _ => 2,
        };
        let mut v = args.to_vec();
        v.insert(at.min(v.len()), self.remote());
        v
    }

    /// `podfs save POD REMOTE --from DIR ARGS`; returns stdout.
    pub fn save(&self, pod: &str, from: &Path, args: &[&str]) -> String {
        let mut v = vec!["save", pod, "--from", from.to_str().unwrap()];
        v.extend_from_slice(args);
        self.ok(&v)
    }

    /// `podfs save POD REMOTE --from DIR --json`, parsed.
    pub fn save_json(&self, pod: &str, from: &Path) -> serde_json::Value {
        let out = self.save(pod, from, &["--json"]);
        serde_json::from_str(&out).expect("save --json")
    }

    /// `podfs load POD_REF REMOTE --into DIR ARGS`; returns stdout.
    pub fn load(&self, pod_ref: &str, into: &Path, args: &[&str]) -> String {
        let mut v = vec!["load", pod_ref, "--into", into.to_str().unwrap()];
        v.extend_from_slice(args);
        self.ok(&v)
    }

    /// `podfs versions POD REMOTE --json`, parsed.
    pub fn versions_json(&self, pod: &str) -> Vec<serde_json::Value> {
        let out = self.ok(&["versions", pod, "--json"]);
        serde_json::from_str(&out).expect("versions --json")
    }

    /// The version numbers `podfs versions` shows.
    pub fn versions(&self, pod: &str) -> Vec<u64> {
        self.versions_json(pod)
            .iter()
            .map(|v| v["version"].as_u64().expect("version number"))
            .collect()
    }

    /// The pods `podfs list --json` shows, with their latest version.
    pub fn list(&self) -> BTreeMap<String, u64> {
        let out = self.ok(&["list", "--json"]);
        let v: Vec<serde_json::Value> = serde_json::from_str(&out).expect("list --json");
        v.iter()
            .map(|p| {
                (
                    p["name"].as_str().expect("name").to_owned(),
                    p["latest"].as_u64().expect("latest"),
                )
            })
            .collect()
    }

    /// Every object the remote stores, by object name (`localstack-pod-P-version-N.zip`,
    /// `localstack-pod-P-state-K.zip`), with its size, as seen without podfs. On a registry
    /// these are the layers of the manifests that exist: a state blob no manifest refers to is
    /// gone as far as any client can tell.
    pub fn objects(&self) -> BTreeMap<String, u64> {
        match &self.server {
            Server::None => dir_objects(&self.podfs.pods_dir()),
            Server::Dir(d) => dir_objects(&d.path().join("store")),
            Server::Moto(moto) => {
                let out = moto.python(&format!(
                    r#"
objects = {{}}
try:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket={BUCKET:?}):
        objects.update({{o["Key"]: o["Size"] for o in page.get("Contents", [])}})
except s3.exceptions.NoSuchBucket:
    pass
print(json.dumps(objects))
"#
                ));
                serde_json::from_str(out.trim()).expect("objects as JSON")
            }
            Server::Registry(reg) => {
                assert!(
                    reg.auth.is_none(),
                    "Backend::objects reads the registry anonymously"
                );
                require("python3");
                let script = format!(
                    r#"
import json, urllib.error, urllib.request
def get(path, accept=None):
    req = urllib.request.Request("http://{addr}" + path, headers={{"Accept": accept}} if accept else {{}})
    try:
        return json.load(urllib.request.urlopen(req))
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return {{}}
        raise
objects = {{}}
for repo in get("/v2/_catalog?n=1000").get("repositories") or []:
    if not repo.startswith("{NAMESPACE}/"):
        continue
    for tag in get("/v2/" + repo + "/tags/list").get("tags") or []:
        m = get("/v2/" + repo + "/manifests/" + tag, "application/vnd.oci.image.manifest.v1+json")
        for layer in m["layers"]:
            objects[layer["annotations"]["org.opencontainers.image.title"]] = layer["size"]
print(json.dumps(objects))
"#,
                    addr = reg.addr()
                );
                let dir = tempfile::tempdir().expect("temp dir");
                let out = registry::python(&script, dir.path());
                serde_json::from_str(out.trim()).expect("objects as JSON")
            }
        }
    }

    /// The objects of `pod` (see [`Backend::objects`]) by short name: `version-N`, `state-K`.
    pub fn objects_of(&self, pod: &str) -> BTreeMap<String, u64> {
        let prefix = format!("localstack-pod-{pod}-");
        self.objects()
            .into_iter()
            .filter_map(|(name, size)| {
                let short = name.strip_prefix(&prefix)?.strip_suffix(".zip")?;
                let (kind, n) = short.rsplit_once('-')?;
                let ours = matches!(kind, "version" | "state")
                    && !n.is_empty()
                    && n.bytes().all(|b| b.is_ascii_digit());
                ours.then(|| (short.to_owned(), size))
            })
            .collect()
    }
}

/// `p` with the server's credentials in its environment and the remote `remote` (`url`) added.
fn install(mut p: Podfs, server: &Server, remote: &str, url: Option<&str>) -> Podfs {
    match server {
        Server::Moto(_) => {
            p = p
                .env("AWS_ACCESS_KEY_ID", KEY_ID)
                .env("AWS_SECRET_ACCESS_KEY", SECRET);
        }
        Server::Registry(reg) => {
            if let Some((user, password)) = &reg.auth {
                p = p.env("ORAS_USERNAME", user).env("ORAS_PASSWORD", password);
            }
        }
        Server::None | Server::Dir(_) => {}
    }
    if let Some(url) = url {
        p.ok(&["remote", "add", remote, url]);
    }
    p
}

/// The files in `dir` (none if it does not exist), with their sizes.
fn dir_objects(dir: &Path) -> BTreeMap<String, u64> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return BTreeMap::new();
    };
    rd.map(|e| {
        let e = e.expect("dir entry");
        let size = e.metadata().expect("stat").len();
        (e.file_name().to_string_lossy().into_owned(), size)
    })
    .collect()
}
