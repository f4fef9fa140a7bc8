//! The `oras://` backend: pods as OCI artifacts in a registry (ORAS conventions).
//!
//! Layout (see `docs/ORAS.md`): pod `P` is repository `NAMESPACE/P`; version `N` is tag `N`, an
//! OCI image manifest with `artifactType` [`POD_ARTIFACT_TYPE`], the empty config, and layers:
//! the version zip first ([`VERSION_MEDIA_TYPE`]), then every state zip the version refers to
//! ([`STATE_MEDIA_TYPE`]), each titled (`org.opencontainers.image.title`) with its format-v1
//! object name. Blobs are content-addressed and shared, so unchanged state is never stored twice.
//!
//! Guarantees and limits:
//! - A commit pushes the manifest under tag `N` only if the tag is absent (checked just before,
//!   and verified just after the push). Registries have no conditional tag write, so two writers
//!   racing for the same number inside that window can still overwrite each other's tag.
//! - Blobs are never deleted by podfs: the registry's garbage collector removes blobs no manifest
//!   refers to. [`Remote::delete_state`] is a no-op and [`Remote::list_states`] reports the states
//!   referenced by the existing manifests.
//! - Manifests are refused above [`MAX_MANIFEST_BYTES`] (the distribution limit) before pushing.
//! - Tags are immutable for podfs, so manifests are cached in memory per `(pod, tag)`.

mod registry;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::future::BoxFuture;
use oci_client::manifest::{OCI_IMAGE_MEDIA_TYPE, OciDescriptor, OciImageManifest};
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RANGE};
use sha2::{Digest, Sha256};

pub use registry::RegistryConfig;
use registry::{Registry, error_chain, next_link, read_json};

use super::{ObjectKind, Remote, RemoteError, RemoteResult, object_name, parse_object_name};
use crate::config::OrasUrl;
use crate::pod::PodName;

/// `artifactType` of every podfs version manifest.
pub const POD_ARTIFACT_TYPE: &str = "application/vnd.podfs.pod.v1";
/// Media type of layer 0: the version zip (`localstack-pod-P-version-N.zip`).
pub const VERSION_MEDIA_TYPE: &str = "application/vnd.podfs.version.v1+zip";
/// Media type of the other layers: state zips (`localstack-pod-P-state-K.zip`).
pub const STATE_MEDIA_TYPE: &str = "application/vnd.podfs.state.v1+zip";
/// The OCI empty descriptor used as config.
pub const EMPTY_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
pub const EMPTY_CONFIG_DIGEST: &str =
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
const EMPTY_CONFIG: &[u8] = b"{}";
/// The layer annotation holding the object name.
pub const TITLE: &str = "org.opencontainers.image.title";
/// Largest manifest distribution accepts.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";
/// Page size asked of `/v2/_catalog` and tag lists.
const PAGE: usize = 1000;
/// Reads up to this size go through the block cache.
const SMALL_READ: u64 = 256 << 10;
/// Block size of the block cache.
const BLOCK: u64 = 4 << 20;
/// Blocks kept (at most `BLOCKS * BLOCK` bytes of memory).
const BLOCKS: usize = 16;
/// Times a blob upload is restarted from a new session when the registry rejects it midway.
const UPLOAD_SESSIONS: u32 = 3;

pub struct OrasRemote {
    name: String,
    namespace: String,
    registry: Registry,
    /// Validated pod manifests by `(pod, tag)`. Tags are immutable for podfs.
    manifests: Mutex<HashMap<(PodName, u64), Arc<OciImageManifest>>>,
    /// State blobs pushed by `put_state`, waiting for `commit_version`.
    pending: Mutex<HashMap<(PodName, u64), OciDescriptor>>,
    /// Recently read blocks of state blobs, for small reads.
    blocks: Mutex<BlockCache>,
}

/// A small LRU-by-insertion map of blob blocks. Each slot is a `OnceCell`, so concurrent readers
/// of one block share a single request; the map lock is never held across `.await`.
#[derive(Default)]
struct BlockCache {
    cells: HashMap<(String, u64), Arc<tokio::sync::OnceCell<Bytes>>>,
    order: std::collections::VecDeque<(String, u64)>,
}

impl BlockCache {
    /// The slot for `(digest, idx)`, created (evicting the oldest) if absent.
    fn entry(&mut self, digest: String, idx: u64) -> Arc<tokio::sync::OnceCell<Bytes>> {
        let key = (digest, idx);
        if let Some(c) = self.cells.get(&key) {
            return Arc::clone(c);
        }
        while self.order.len() >= BLOCKS {
            if let Some(old) = self.order.pop_front() {
                self.cells.remove(&old);
            }
        }
        let cell = Arc::new(tokio::sync::OnceCell::new());
        self.cells.insert(key.clone(), Arc::clone(&cell));
        self.order.push_back(key);
        cell
    }
}

impl std::fmt::Debug for OrasRemote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrasRemote")
            .field("name", &self.name)
            .field("namespace", &self.namespace)
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

/// Where a blob's bytes come from.
#[derive(Clone)]
enum BlobSource {
    Memory(Bytes),
    File(PathBuf),
}

fn ready(r: reqwest::RequestBuilder) -> BoxFuture<'static, RemoteResult<reqwest::RequestBuilder>> {
    Box::pin(async move { Ok(r) })
}

fn pull_scope(repo: &str) -> String {
    format!("repository:{repo}:pull")
}

fn push_scope(repo: &str) -> String {
    format!("repository:{repo}:pull,push")
}

impl OrasRemote {
    pub fn new(name: &str, url: &OrasUrl) -> RemoteResult<Self> {
        Self::with_config(name, url, RegistryConfig::default())
    }

    pub fn with_config(name: &str, url: &OrasUrl, config: RegistryConfig) -> RemoteResult<Self> {
        Ok(Self {
            name: name.to_owned(),
            namespace: url.namespace.clone(),
            registry: Registry::new(name, url, config)?,
            manifests: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            blocks: Mutex::new(BlockCache::default()),
        })
    }

    /// `NAMESPACE/POD`, if the pod name is a valid repository path component.
    fn repo(&self, pod: &PodName) -> RemoteResult<String> {
        if !is_repo_component(pod.as_str()) {
            return Err(self.registry.other(format!(
                "pod name {:?} cannot be stored in an OCI registry: repository names use lower-case \
                 letters and digits, separated by '-', '_' or '__' (rename the pod, e.g. {:?})",
                pod.as_str(),
                pod.as_str().to_ascii_lowercase()
            )));
        }
        Ok(format!("{}/{pod}", self.namespace))
    }

    fn not_found(&self, what: String) -> RemoteError {
        RemoteError::NotFound(format!("{what} on remote {:?}", self.name))
    }

    fn unexpected(&self, what: &str, status: StatusCode, body: &str) -> RemoteError {
        self.registry
            .other(format!("{what}: unexpected HTTP {status}: {}", body.trim()))
    }

    async fn get(&self, what: &str, scope: &str, url: &str) -> RemoteResult<reqwest::Response> {
        self.registry
            .send(what, scope, &|c| ready(c.get(url)))
            .await
    }

    /// The validated pod manifest of tag `tag`, from the cache or the registry.
    async fn pod_manifest(&self, pod: &PodName, tag: u64) -> RemoteResult<Arc<OciImageManifest>> {
        self.fetch_manifest(pod, tag).await?.map_err(|why| {
            self.registry.other(format!(
                "{}/{pod}:{tag} is not a podfs pod ({why})",
                self.namespace
            ))
        })
    }

    /// Tag `tag`'s manifest: `Ok(Err(why))` when it exists but is not a podfs version.
    async fn fetch_manifest(
        &self,
        pod: &PodName,
        tag: u64,
    ) -> RemoteResult<Result<Arc<OciImageManifest>, String>> {
        let key = (pod.clone(), tag);
        if let Some(m) = lock(&self.manifests).get(&key) {
            return Ok(Ok(Arc::clone(m)));
        }
        let repo = self.repo(pod)?;
        let what = format!("reading the manifest of {repo}:{tag}");
        let url = self.registry.url(&format!("/v2/{repo}/manifests/{tag}"));
        let resp = self
            .registry
            .send(&what, &pull_scope(&repo), &|c| {
                ready(c.get(&url).header(ACCEPT, MANIFEST_ACCEPT))
            })
            .await?;
        let status = resp.status();
        if status == StatusCode::NOT_FOUND {
            return Err(self.not_found(format!("version {tag} of pod {pod:?}")));
        }
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = resp
            .bytes()
            .await
            .map_err(|e| self.registry.other(format!("{what}: {}", error_chain(&e))))?;
        if !status.is_success() {
            return Err(self.unexpected(&what, status, &String::from_utf8_lossy(&body)));
        }
        let manifest = match parse_pod_manifest(&body, &content_type) {
            Ok(m) => Arc::new(m),
            Err(why) => return Ok(Err(why)),
        };
        lock(&self.manifests).insert(key, Arc::clone(&manifest));
        Ok(Ok(manifest))
    }

    /// The digest tag `tag` points at, or `None` if the tag does not exist.
    async fn tag_digest(&self, repo: &str, tag: u64, scope: &str) -> RemoteResult<Option<String>> {
        let what = format!("looking up {repo}:{tag}");
        let url = self.registry.url(&format!("/v2/{repo}/manifests/{tag}"));
        let resp = self
            .registry
            .send(&what, scope, &|c| {
                ready(c.head(&url).header(ACCEPT, MANIFEST_ACCEPT))
            })
            .await?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => {
                let digest = resp
                    .headers()
                    .get("Docker-Content-Digest")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                match digest {
                    Some(d) => Ok(Some(d)),
                    None => {
                        // The header is optional in the spec: hash the manifest instead.
                        let resp = self
                            .registry
                            .send(&what, scope, &|c| {
                                ready(c.get(&url).header(ACCEPT, MANIFEST_ACCEPT))
                            })
                            .await?;
                        let body = resp.bytes().await.map_err(|e| {
                            self.registry.other(format!("{what}: {}", error_chain(&e)))
                        })?;
                        Ok(Some(sha256_digest(&body)))
                    }
                }
            }
            s => Err(self.unexpected(&what, s, "")),
        }
    }

    async fn blob_exists(&self, repo: &str, digest: &str) -> RemoteResult<bool> {
        let what = format!("checking blob {digest} in {repo}");
        let url = self.registry.url(&format!("/v2/{repo}/blobs/{digest}"));
        let resp = self
            .registry
            .send(&what, &push_scope(repo), &|c| ready(c.head(&url)))
            .await?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(false),
            s if s.is_success() => Ok(true),
            s => Err(self.unexpected(&what, s, "")),
        }
    }

    /// Uploads a blob unless the repository already has it: a POST opens an upload session, one
    /// PUT streams the bytes and names the digest (the registry verifies it).
    async fn push_blob(
        &self,
        repo: &str,
        digest: &str,
        size: u64,
        source: BlobSource,
    ) -> RemoteResult<()> {
        if self.blob_exists(repo, digest).await? {
            tracing::debug!(remote = %self.name, repo, digest, "blob already in the registry");
            return Ok(());
        }
        let what = format!("uploading blob {digest} ({size} bytes) to {repo}");
        let scope = push_scope(repo);
        let start_url = self.registry.url(&format!("/v2/{repo}/blobs/uploads/"));
        let mut last_error = String::new();
        for session in 1..=UPLOAD_SESSIONS {
            let resp = self
                .registry
                .send(&what, &scope, &|c| {
                    ready(c.post(&start_url).header(CONTENT_LENGTH, 0))
                })
                .await?;
            let status = resp.status();
            let location = resp
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let Some(location) = location.filter(|_| status == StatusCode::ACCEPTED) else {
                let body = resp.text().await.unwrap_or_default();
                return Err(self.unexpected(&format!("{what} (starting)"), status, &body));
            };
            let mut put_url = if location.starts_with("http://") || location.starts_with("https://")
            {
                location
            } else {
                self.registry.url(&location)
            };
            put_url.push(if put_url.contains('?') { '&' } else { '?' });
            put_url.push_str("digest=");
            put_url.push_str(&digest.replace(':', "%3A"));
            let source = source.clone();
            let resp = self
                .registry
                .send_upload(&what, &scope, size, &|c| {
                    let req = c
                        .put(&put_url)
                        .header(CONTENT_TYPE, "application/octet-stream")
                        .header(CONTENT_LENGTH, size);
                    match &source {
                        BlobSource::Memory(b) => ready(req.body(b.clone())),
                        BlobSource::File(path) => Box::pin(file_body(req, path.clone())),
                    }
                })
                .await?;
            let status = resp.status();
            if status == StatusCode::CREATED || status.is_success() {
                return Ok(());
            }
            last_error = format!(
                "HTTP {status}: {}",
                resp.text().await.unwrap_or_default().trim()
            );
            if status == StatusCode::BAD_REQUEST && last_error.contains("DIGEST_INVALID") {
                return Err(self.registry.other(format!(
                    "{what}: the registry computed another digest (did the file change during the save?): {last_error}"
                )));
            }
            tracing::warn!(remote = %self.name, session, "{what}: {last_error}; starting a new upload");
        }
        Err(self.registry.other(format!("{what}: {last_error}")))
    }

    /// Fetches a whole blob into memory and checks its digest.
    async fn blob_bytes(&self, repo: &str, layer: &OciDescriptor) -> RemoteResult<Bytes> {
        let what = format!("downloading blob {} from {repo}", layer.digest);
        let url = self
            .registry
            .url(&format!("/v2/{repo}/blobs/{}", layer.digest));
        let resp = self.get(&what, &pull_scope(repo), &url).await?;
        let status = resp.status();
        if status == StatusCode::NOT_FOUND {
            return Err(self.not_found(format!("blob {} of {repo}", layer.digest)));
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| self.registry.other(format!("{what}: {}", error_chain(&e))))?;
        if !status.is_success() {
            return Err(self.unexpected(&what, status, &String::from_utf8_lossy(&body)));
        }
        let got = sha256_digest(&body);
        if got != layer.digest {
            return Err(self.registry.other(format!(
                "{what}: the bytes have digest {got}, not {}",
                layer.digest
            )));
        }
        Ok(body)
    }

    /// Tags of `repo`, following `Link` pages when the registry paginates.
    async fn tags(&self, repo: &str) -> RemoteResult<Vec<String>> {
        #[derive(serde::Deserialize)]
        struct TagList {
            tags: Option<Vec<String>>,
        }
        let what = format!("listing the tags of {repo}");
        let mut url = Some(self.registry.url(&format!("/v2/{repo}/tags/list?n={PAGE}")));
        let mut out = Vec::new();
        while let Some(u) = url.take() {
            let resp = self.get(&what, &pull_scope(repo), &u).await?;
            let status = resp.status();
            if status == StatusCode::NOT_FOUND {
                return Ok(out);
            }
            if !status.is_success() {
                let body = resp.text().await.unwrap_or_default();
                return Err(self.unexpected(&what, status, &body));
            }
            url = next_link(resp.headers(), &self.registry.base);
            let page: TagList = read_json(resp)
                .await
                .map_err(|e| self.registry.other(format!("{what}: {e}")))?;
            let before = out.len();
            out.extend(page.tags.unwrap_or_default());
            if out.len() == before {
                break; // an empty page ends the list whatever the Link says
            }
        }
        Ok(out)
    }

    /// Bytes `range` of blob `layer` with one `Range` request (streaming past the start when
    /// the registry ignores `Range`).
    async fn fetch_range(
        &self,
        repo: &str,
        layer: &OciDescriptor,
        title: &str,
        range: Range<u64>,
    ) -> RemoteResult<Bytes> {
        let len = range.end - range.start;
        let what = format!(
            "reading bytes {}..{} of {title} ({})",
            range.start, range.end, layer.digest
        );
        let url = self
            .registry
            .url(&format!("/v2/{repo}/blobs/{}", layer.digest));
        let header = format!("bytes={}-{}", range.start, range.end - 1);
        let resp = self
            .registry
            .send(&what, &pull_scope(repo), &|c| {
                ready(c.get(&url).header(RANGE, &header))
            })
            .await?;
        let status = resp.status();
        if status == StatusCode::NOT_FOUND {
            return Err(self.not_found(format!("{title} ({})", layer.digest)));
        }
        let wanted = usize::try_from(len)
            .map_err(|_| self.registry.other(format!("{what}: range too large")))?;
        // 206: the range. 200: the registry ignored Range; skip to it in the stream.
        let mut skip = match status {
            StatusCode::PARTIAL_CONTENT => 0,
            StatusCode::OK => range.start,
            s => {
                let body = resp.text().await.unwrap_or_default();
                return Err(self.unexpected(&what, s, &body));
            }
        };
        let mut out = BytesMut::with_capacity(wanted);
        let mut stream = resp.bytes_stream();
        while out.len() < wanted {
            let Some(chunk) = stream.next().await else {
                break;
            };
            let mut chunk =
                chunk.map_err(|e| self.registry.other(format!("{what}: {}", error_chain(&e))))?;
            if skip > 0 {
                let n = skip.min(chunk.len() as u64);
                let _ = chunk.split_to(n as usize);
                skip -= n;
            }
            let take = chunk.len().min(wanted - out.len());
            out.extend_from_slice(&chunk[..take]);
        }
        if out.len() < wanted {
            return Err(self.registry.other(format!(
                "{what}: the registry returned only {} of {wanted} bytes",
                out.len()
            )));
        }
        Ok(out.freeze())
    }

    /// Block `idx` of blob `layer` (`BLOCK` bytes, the last one shorter), fetched once even when
    /// several reads want it at the same time.
    async fn block(
        &self,
        repo: &str,
        layer: &OciDescriptor,
        title: &str,
        idx: u64,
        size: u64,
    ) -> RemoteResult<Bytes> {
        let cell = lock(&self.blocks).entry(layer.digest.clone(), idx);
        let bytes = cell
            .get_or_try_init(|| {
                let start = idx * BLOCK;
                self.fetch_range(repo, layer, title, start..(start + BLOCK).min(size))
            })
            .await?;
        Ok(bytes.clone())
    }

    /// Builds version `version`'s manifest from the version blob and the states it refers to.
    async fn layers_for(
        &self,
        pod: &PodName,
        version: u64,
        states: &[u64],
        parent: Option<u64>,
    ) -> RemoteResult<Vec<OciDescriptor>> {
        let parent_manifest = match parent {
            Some(p) if states.iter().any(|&s| s != version) => {
                Some(self.pod_manifest(pod, p).await?)
            }
            _ => None,
        };
        let mut layers = Vec::with_capacity(states.len());
        for &s in states {
            let title = object_name(pod, ObjectKind::State, s);
            let found = if s == version {
                lock(&self.pending).get(&(pod.clone(), s)).cloned()
            } else {
                parent_manifest.as_ref().and_then(|m| {
                    m.layers
                        .iter()
                        .find(|l| title_of(l) == Some(title.as_str()))
                        .cloned()
                })
            };
            let Some(layer) = found else {
                return Err(self.registry.other(match parent {
                    _ if s == version => format!(
                        "cannot commit version {version} of pod {pod:?}: its state object {s} was not uploaded first"
                    ),
                    Some(p) => format!(
                        "cannot commit version {version} of pod {pod:?}: state object {s} ({title}) is not a layer of parent version {p}"
                    ),
                    None => format!(
                        "cannot commit version {version} of pod {pod:?}: it refers to state object {s} but has no parent version"
                    ),
                }));
            };
            layers.push(layer);
        }
        Ok(layers)
    }
}

/// Streams `path` as the request body, 1 MiB at a time.
async fn file_body(
    req: reqwest::RequestBuilder,
    path: PathBuf,
) -> RemoteResult<reqwest::RequestBuilder> {
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(RemoteError::io(format!("opening {}", path.display())))?;
    let stream = futures::stream::try_unfold(file, |mut f| async move {
        let mut buf = BytesMut::with_capacity(1 << 20);
        let n = tokio::io::AsyncReadExt::read_buf(&mut f, &mut buf).await?;
        Ok::<_, std::io::Error>((n > 0).then(|| (buf.freeze(), f)))
    });
    Ok(req.body(reqwest::Body::wrap_stream(stream)))
}

/// `sha256:<hex>` of `bytes`.
fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// `sha256:<hex>` and size of a file, read in 1 MiB pieces.
fn file_digest(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((format!("sha256:{}", hex::encode(h.finalize())), size))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn title_of(layer: &OciDescriptor) -> Option<&str> {
    layer.annotations.as_ref()?.get(TITLE).map(String::as_str)
}

fn descriptor(media_type: &str, digest: String, size: u64, title: String) -> OciDescriptor {
    OciDescriptor {
        media_type: media_type.to_owned(),
        digest,
        size: i64::try_from(size).unwrap_or(i64::MAX),
        annotations: Some(BTreeMap::from([(TITLE.to_owned(), title)])),
        ..Default::default()
    }
}

/// The manifest of a version: `layers[0]` is the version zip, the rest its states.
fn build_manifest(layers: Vec<OciDescriptor>) -> OciImageManifest {
    OciImageManifest {
        schema_version: 2,
        media_type: Some(OCI_IMAGE_MEDIA_TYPE.to_owned()),
        config: OciDescriptor {
            media_type: EMPTY_CONFIG_MEDIA_TYPE.to_owned(),
            digest: EMPTY_CONFIG_DIGEST.to_owned(),
            size: EMPTY_CONFIG.len() as i64,
            ..Default::default()
        },
        layers,
        subject: None,
        artifact_type: Some(POD_ARTIFACT_TYPE.to_owned()),
        annotations: None,
    }
}

/// Serializes a manifest, refusing one the registry would reject for its size.
fn encode_manifest(manifest: &OciImageManifest) -> Result<Vec<u8>, String> {
    let body = serde_json::to_vec(manifest).map_err(|e| e.to_string())?;
    if body.len() > MAX_MANIFEST_BYTES {
        return Err(format!(
            "its manifest would be {} bytes ({} layers), over the 4 MiB limit registries accept \
             for manifests; nothing was committed",
            body.len(),
            manifest.layers.len()
        ));
    }
    Ok(body)
}

/// Parses and validates a podfs version manifest; the error says why it is not one.
fn parse_pod_manifest(body: &[u8], content_type: &str) -> Result<OciImageManifest, String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        media_type: Option<String>,
        artifact_type: Option<String>,
        config: Option<serde_json::Value>,
    }
    let probe: Probe =
        serde_json::from_slice(body).map_err(|e| format!("unreadable manifest: {e}"))?;
    let media_type = probe
        .media_type
        .as_deref()
        .unwrap_or(content_type)
        .to_owned();
    if media_type != OCI_IMAGE_MEDIA_TYPE {
        return Err(format!("manifest type {media_type:?}"));
    }
    let artifact_type = probe.artifact_type.or_else(|| {
        probe
            .config
            .as_ref()
            .and_then(|c| c.get("mediaType"))
            .and_then(|m| m.as_str())
            .map(str::to_owned)
    });
    if artifact_type.as_deref() != Some(POD_ARTIFACT_TYPE) {
        return Err(format!(
            "artifactType {:?}, expected {POD_ARTIFACT_TYPE:?}",
            artifact_type.unwrap_or_default()
        ));
    }
    let manifest: OciImageManifest =
        serde_json::from_slice(body).map_err(|e| format!("unreadable manifest: {e}"))?;
    match manifest.layers.first() {
        Some(l) if l.media_type == VERSION_MEDIA_TYPE => Ok(manifest),
        _ => Err(format!("its first layer is not a {VERSION_MEDIA_TYPE}")),
    }
}

/// Whether `s` is a valid repository path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn is_repo_component(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &s[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

#[async_trait]
impl Remote for OrasRemote {
    fn name(&self) -> &str {
        &self.name
    }

    async fn list_pods(&self) -> RemoteResult<Vec<PodName>> {
        #[derive(serde::Deserialize)]
        struct Catalog {
            repositories: Option<Vec<String>>,
        }
        let what = "listing repositories (/v2/_catalog)";
        let prefix = format!("{}/", self.namespace);
        let mut url = Some(self.registry.url(&format!("/v2/_catalog?n={PAGE}")));
        let mut candidates = BTreeSet::new();
        while let Some(u) = url.take() {
            let resp = self.get(what, "registry:catalog:*", &u).await?;
            let status = resp.status();
            if !status.is_success() {
                let body = resp.text().await.unwrap_or_default();
                return Err(self.registry.other(format!(
                    "{what}: HTTP {status}: {} (this registry may not allow listing repositories)",
                    body.trim()
                )));
            }
            url = next_link(resp.headers(), &self.registry.base);
            let page: Catalog = read_json(resp)
                .await
                .map_err(|e| self.registry.other(format!("{what}: {e}")))?;
            let repos = page.repositories.unwrap_or_default();
            if repos.is_empty() {
                break;
            }
            candidates.extend(
                repos
                    .iter()
                    .filter_map(|r| r.strip_prefix(&prefix))
                    .filter(|rest| !rest.contains('/'))
                    .filter_map(|rest| PodName::new(rest).ok()),
            );
        }
        // A repository whose tags were all deleted stays in the catalog, and other artifacts may
        // share the namespace: keep repositories whose latest version is a podfs manifest (the
        // manifest is cached, so reading the pod next costs nothing more).
        let mut pods = Vec::new();
        for pod in candidates {
            let Some(&latest) = self.list_versions(&pod).await?.last() else {
                continue;
            };
            match self.fetch_manifest(&pod, latest).await {
                Ok(Ok(_)) => pods.push(pod),
                Ok(Err(why)) => {
                    tracing::debug!(remote = %self.name, pod = %pod, "not a pod: {why}");
                }
                Err(RemoteError::NotFound(_)) => {} // deleted meanwhile
                Err(e) => return Err(e),
            }
        }
        Ok(pods)
    }

    async fn list_versions(&self, pod: &PodName) -> RemoteResult<Vec<u64>> {
        let repo = self.repo(pod)?;
        let mut versions: Vec<u64> = self
            .tags(&repo)
            .await?
            .iter()
            .filter(|t| !t.starts_with('0') && t.bytes().all(|b| b.is_ascii_digit()))
            .filter_map(|t| t.parse().ok())
            .collect();
        versions.sort_unstable();
        versions.dedup();
        Ok(versions)
    }

    async fn read_version(&self, pod: &PodName, version: u64) -> RemoteResult<Bytes> {
        let manifest = self.pod_manifest(pod, version).await?;
        let repo = self.repo(pod)?;
        // parse_pod_manifest checked that layer 0 exists and is the version zip.
        let layer = manifest.layers.first().ok_or_else(|| {
            self.registry
                .other(format!("{repo}:{version} has no layers"))
        })?;
        self.blob_bytes(&repo, layer).await
    }

    async fn read_state(
        &self,
        pod: &PodName,
        via: u64,
        state: u64,
        range: Range<u64>,
    ) -> RemoteResult<Bytes> {
        let manifest = self.pod_manifest(pod, via).await?;
        let repo = self.repo(pod)?;
        let title = object_name(pod, ObjectKind::State, state);
        let layer = manifest
            .layers
            .iter()
            .find(|l| title_of(l) == Some(title.as_str()))
            .ok_or_else(|| {
                self.not_found(format!(
                    "state object {state} of pod {pod:?} (no layer {title} in version {via})"
                ))
            })?;
        let size = u64::try_from(layer.size).unwrap_or(0);
        if range.end > size || range.start > range.end {
            return Err(self.registry.other(format!(
                "bytes {}..{} are past the end of {title} ({size} bytes)",
                range.start, range.end
            )));
        }
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        if range.end - range.start > SMALL_READ {
            return self.fetch_range(&repo, layer, &title, range).await;
        }
        // Small reads (a load reads small files one by one, in blob order) are served from
        // aligned blocks: one request per block instead of one per file.
        let (first, last) = (range.start / BLOCK, (range.end - 1) / BLOCK);
        let mut out = BytesMut::with_capacity((range.end - range.start) as usize);
        for idx in first..=last {
            let block = self.block(&repo, layer, &title, idx, size).await?;
            let block_start = idx * BLOCK;
            let from = range.start.max(block_start) - block_start;
            let to = range.end.min(block_start + block.len() as u64) - block_start;
            out.extend_from_slice(&block[from as usize..to as usize]);
        }
        Ok(out.freeze())
    }

    async fn put_state(&self, pod: &PodName, version: u64, file: &Path) -> RemoteResult<()> {
        let repo = self.repo(pod)?;
        let path = file.to_owned();
        let (digest, size) = tokio::task::spawn_blocking(move || file_digest(&path))
            .await
            .map_err(|e| RemoteError::Io {
                context: "background task".into(),
                source: std::io::Error::other(e),
            })?
            .map_err(RemoteError::io(format!("hashing {}", file.display())))?;
        self.push_blob(&repo, &digest, size, BlobSource::File(file.to_owned()))
            .await?;
        let layer = descriptor(
            STATE_MEDIA_TYPE,
            digest,
            size,
            object_name(pod, ObjectKind::State, version),
        );
        lock(&self.pending).insert((pod.clone(), version), layer);
        Ok(())
    }

    async fn commit_version(
        &self,
        pod: &PodName,
        version: u64,
        version_zip: Bytes,
        states: &[u64],
        parent: Option<u64>,
    ) -> RemoteResult<()> {
        let repo = self.repo(pod)?;
        let scope = push_scope(&repo);
        let taken = |d: &str| {
            RemoteError::AlreadyExists(format!(
                "version {version} of pod {pod:?} on remote {:?} (tag {repo}:{version} is {d})",
                self.name
            ))
        };
        if let Some(d) = self.tag_digest(&repo, version, &scope).await? {
            return Err(taken(&d));
        }
        let version_layer = descriptor(
            VERSION_MEDIA_TYPE,
            sha256_digest(&version_zip),
            version_zip.len() as u64,
            object_name(pod, ObjectKind::Version, version),
        );
        let mut layers = vec![version_layer.clone()];
        layers.extend(self.layers_for(pod, version, states, parent).await?);
        let manifest = build_manifest(layers);
        let body = encode_manifest(&manifest).map_err(|why| {
            self.registry.other(format!(
                "cannot commit version {version} of pod {pod:?}: {why}"
            ))
        })?;
        let body_digest = sha256_digest(&body);

        self.push_blob(
            &repo,
            EMPTY_CONFIG_DIGEST,
            EMPTY_CONFIG.len() as u64,
            BlobSource::Memory(Bytes::from_static(EMPTY_CONFIG)),
        )
        .await?;
        self.push_blob(
            &repo,
            &version_layer.digest,
            version_zip.len() as u64,
            BlobSource::Memory(version_zip),
        )
        .await?;

        // Registries have no conditional tag write: check again right before, verify after.
        if let Some(d) = self.tag_digest(&repo, version, &scope).await? {
            return Err(taken(&d));
        }
        let what = format!("pushing the manifest of {repo}:{version}");
        let url = self
            .registry
            .url(&format!("/v2/{repo}/manifests/{version}"));
        let body = Bytes::from(body);
        let resp = self
            .registry
            .send(&what, &scope, &|c| {
                ready(
                    c.put(&url)
                        .header(CONTENT_TYPE, OCI_IMAGE_MEDIA_TYPE)
                        .body(body.clone()),
                )
            })
            .await?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(self.unexpected(&what, status, &text));
        }
        match self.tag_digest(&repo, version, &scope).await? {
            Some(d) if d == body_digest => {}
            Some(d) => return Err(taken(&d)),
            None => {
                return Err(self.registry.other(format!(
                    "{what}: the registry accepted it but tag {version} is missing"
                )));
            }
        }
        lock(&self.pending).remove(&(pod.clone(), version));
        lock(&self.manifests).insert((pod.clone(), version), Arc::new(manifest));
        Ok(())
    }

    async fn delete_version(&self, pod: &PodName, version: u64) -> RemoteResult<()> {
        let repo = self.repo(pod)?;
        let scope = format!("repository:{repo}:pull,delete");
        lock(&self.manifests).remove(&(pod.clone(), version));
        // distribution cannot delete by tag: resolve the digest, delete the manifest.
        let Some(digest) = self.tag_digest(&repo, version, &scope).await? else {
            return Ok(());
        };
        let what = format!("deleting {repo}:{version} ({digest})");
        let url = self.registry.url(&format!("/v2/{repo}/manifests/{digest}"));
        let resp = self
            .registry
            .send(&what, &scope, &|c| ready(c.delete(&url)))
            .await?;
        match resp.status() {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            StatusCode::METHOD_NOT_ALLOWED => Err(self.registry.other(format!(
                "{what}: the registry does not allow deletes (distribution: storage.delete.enabled)"
            ))),
            s => {
                let body = resp.text().await.unwrap_or_default();
                Err(self.unexpected(&what, s, &body))
            }
        }
    }

    /// A no-op: blobs are shared and content-addressed; the registry's garbage collector removes
    /// the ones no manifest refers to.
    async fn delete_state(&self, pod: &PodName, state: u64) -> RemoteResult<()> {
        tracing::debug!(remote = %self.name, pod = %pod, state, "state blobs are left to registry garbage collection");
        lock(&self.pending).remove(&(pod.clone(), state));
        Ok(())
    }

    /// The state objects referenced by the pod's existing manifests.
    async fn list_states(&self, pod: &PodName) -> RemoteResult<Vec<u64>> {
        let mut states = BTreeSet::new();
        for v in self.list_versions(pod).await? {
            let m = match self.pod_manifest(pod, v).await {
                Ok(m) => m,
                Err(RemoteError::NotFound(_)) => continue, // deleted meanwhile
                Err(e) => return Err(e),
            };
            states.extend(
                m.layers
                    .iter()
                    .filter_map(title_of)
                    .filter_map(parse_object_name)
                    .filter(|(p, kind, _)| p == pod && *kind == ObjectKind::State)
                    .map(|(_, _, n)| n),
            );
        }
        Ok(states.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(i: u64) -> OciDescriptor {
        descriptor(
            STATE_MEDIA_TYPE,
            sha256_digest(&i.to_le_bytes()),
            1000,
            format!("localstack-pod-some-pod-state-{i}.zip"),
        )
    }

    #[test]
    fn empty_config_digest_is_right() {
        assert_eq!(sha256_digest(EMPTY_CONFIG), EMPTY_CONFIG_DIGEST);
    }

    #[test]
    fn manifests_round_trip_and_are_recognised() {
        let mut layers = vec![descriptor(
            VERSION_MEDIA_TYPE,
            sha256_digest(b"v"),
            1,
            "localstack-pod-p-version-1.zip".into(),
        )];
        layers.push(layer(1));
        let body = encode_manifest(&build_manifest(layers)).unwrap();
        let text = String::from_utf8(body.clone()).unwrap();
        assert!(
            text.contains("\"artifactType\":\"application/vnd.podfs.pod.v1\""),
            "{text}"
        );
        assert!(text.contains(EMPTY_CONFIG_DIGEST));
        let m = parse_pod_manifest(&body, "").unwrap();
        assert_eq!(
            title_of(&m.layers[1]),
            Some("localstack-pod-some-pod-state-1.zip")
        );

        let other = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.unknown.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
        let err = parse_pod_manifest(other, "").unwrap_err();
        assert!(
            err.contains("artifactType \"application/vnd.unknown.config.v1+json\""),
            "{err}"
        );
        let err = parse_pod_manifest(
            b"{\"manifests\":[]}",
            "application/vnd.oci.image.index.v1+json",
        )
        .unwrap_err();
        assert!(err.contains("manifest type"), "{err}");
    }

    #[test]
    fn oversized_manifests_are_refused_before_pushing() {
        // About 250 bytes per layer: 20,000 state layers exceed 4 MiB.
        let layers: Vec<_> = (1..=20_000).map(layer).collect();
        let err = encode_manifest(&build_manifest(layers)).unwrap_err();
        assert!(err.contains("over the 4 MiB limit"), "{err}");
        let layers: Vec<_> = (1..=100).map(layer).collect();
        assert!(encode_manifest(&build_manifest(layers)).is_ok());
    }

    #[test]
    fn block_cache_shares_slots_and_evicts_the_oldest() {
        let mut c = BlockCache::default();
        let a = c.entry("sha256:a".into(), 0);
        assert!(Arc::ptr_eq(&a, &c.entry("sha256:a".into(), 0)));
        for i in 1..=BLOCKS as u64 {
            c.entry("sha256:b".into(), i);
        }
        assert_eq!(c.cells.len(), BLOCKS);
        assert!(!Arc::ptr_eq(&a, &c.entry("sha256:a".into(), 0)));
    }

    #[test]
    fn debug_output_hides_the_password() {
        let url = OrasUrl {
            registry: "127.0.0.1:5000".into(),
            namespace: "ns".into(),
            username: Some("me".into()),
            password: Some(crate::config::Secret::new("hunter2")),
            plain_http: true,
        };
        let remote = OrasRemote::new("r", &url).unwrap();
        let dbg = format!("{remote:?}");
        assert!(
            dbg.contains("me") && dbg.contains("http://127.0.0.1:5000"),
            "{dbg}"
        );
        assert!(!dbg.contains("hunter2"), "{dbg}");
    }

    #[test]
    fn repository_components() {
        for ok in ["p", "my-pod", "a--b", "a_b", "a__b", "pod1", "0"] {
            assert!(is_repo_component(ok), "{ok}");
        }
        for bad in ["My-Pod", "-a", "a-", "_a", "a___b", "a_-b", ""] {
            assert!(!is_repo_component(bad), "{bad}");
        }
    }
}
