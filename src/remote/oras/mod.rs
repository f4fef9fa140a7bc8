//! The `oras://` backend: pods as OCI artifacts in a registry (ORAS conventions), through
//! `oci-client` (see [`client`] for what is hand-written and why, [`layout`] for the manifest).
//!
//! Pod `P` is repository `NAMESPACE/P`; version `N` is tag `N`. Blobs are content-addressed and
//! shared, so unchanged state is never stored twice.
//!
//! Guarantees and limits:
//! - A commit pushes the manifest under tag `N` only if the tag is absent (checked just before,
//!   and verified just after the push). Registries have no conditional tag write, so two writers
//!   racing for the same number inside that window can still overwrite each other's tag.
//! - Blobs are never deleted by podfs: the registry's garbage collector removes blobs no manifest
//!   refers to. [`Remote::delete_state`] is a no-op and [`Remote::list_states`] reports the states
//!   referenced by the existing manifests.
//! - Tags are immutable for podfs, so manifests are cached in memory per `(pod, tag)`. A tag is
//!   reused only after its version is deleted: [`Remote::delete_version`] evicts the entry and a
//!   commit replaces it, so within one process the cache follows. After a delete and a new save
//!   by another process, the entry still describes the old version: a reader sees that version
//!   whole (the manifest pins every blob by digest, so the old version zip and the old state
//!   blobs, with the old state identities), or NotFound once the registry collected them, never
//!   a mix. A long-lived reader (the mount, to come) must revalidate a tag's digest when it
//!   refreshes a pod.
//! - `put_state` returns the state blob's digest and size in its [`StoredState`], and
//!   `commit_version` takes them from there: the remote keeps nothing between the two calls, so
//!   a failed commit leaves only an unreferenced blob for the registry's garbage collector.
//! - State reads are one range request each, with no cache here: `pod::load` already merges
//!   neighbouring small files into one read.
//! - A registry that ignores `Range` (answers `200` with the whole blob) is noticed on its first
//!   such answer and remembered for the life of the remote (logged once). Until the registry has
//!   answered one ranged read, ranged reads go one at a time, so that no more than one whole
//!   blob is ever started by mistake. From then on each state blob is downloaded once, whole,
//!   into a temporary file in the staging directory, its size and digest checked while writing,
//!   and every range of it is read from that file (see [`whole`]): about one blob's size of
//!   transfer per blob, instead of one stream from the blob's start per 8 MiB range. The first
//!   `200` answer itself fills the file.
//! - [`Remote::read_state`] returns exactly the range asked for, or an error.

mod client;
mod layout;
mod whole;

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use oci_client::client::{BlobResponse, SizedStream};
use oci_client::manifest::{OCI_IMAGE_MEDIA_TYPE, OciDescriptor, OciImageManifest};
use oci_client::{Reference, RegistryOperation};
use reqwest::{Method, StatusCode};
use tokio_util::sync::CancellationToken;

pub use client::RegistryConfig;
use client::{Registry, lock};
use layout::*;
pub use layout::{POD_ARTIFACT_TYPE, STATE_MEDIA_TYPE, VERSION_MEDIA_TYPE};
use whole::{FillError, KEEP_AT_LEAST, WholeBlobs};

use super::{
    ObjectKind, Remote, RemoteError, RemoteResult, StoredState, VersionId, check_new_state,
    object_name, parse_object_name,
};
use crate::config::OrasUrl;
use crate::name::PodName;
use crate::progress::Progress;

/// Page size asked of `/v2/_catalog` and tag lists.
const PAGE: usize = 1000;

/// A parsed pod manifest and its digest.
type CachedManifest = (Arc<OciImageManifest>, String);

pub struct OrasRemote {
    name: String,
    namespace: String,
    registry: Registry,
    /// Validated pod manifests by `(pod, tag)`, with their digest. A tag changes only when its
    /// pod is deleted and saved again, which [`Remote::version_id`] notices.
    manifests: Mutex<HashMap<(PodName, u64), CachedManifest>>,
    /// Whether the registry honours `Range`: one of [`RANGE_UNKNOWN`], [`RANGE_HONOURED`],
    /// [`RANGE_IGNORED`] (set by the first `200` answer to a ranged read, and kept).
    range_support: AtomicU8,
    /// Held by the one ranged read in flight while `range_support` is unknown, so that a
    /// registry that ignores `Range` starts sending whole blobs once, not once per read.
    probe: tokio::sync::Mutex<()>,
    /// Whole copies of state blobs, used once the registry is known to ignore `Range`.
    whole: WholeBlobs,
    /// Cancelled on shutdown: a blob upload in progress stops.
    shutdown: CancellationToken,
}

const RANGE_UNKNOWN: u8 = 0;
const RANGE_HONOURED: u8 = 1;
const RANGE_IGNORED: u8 = 2;

/// The answer to a range read.
enum Ranged {
    /// The bytes asked for (`206`).
    Bytes(Bytes),
    /// The registry ignored `Range`: the whole blob, not read yet (`200`).
    Whole(SizedStream),
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
            range_support: AtomicU8::new(RANGE_UNKNOWN),
            probe: tokio::sync::Mutex::new(()),
            whole: WholeBlobs::new(std::env::temp_dir(), KEEP_AT_LEAST),
            shutdown: CancellationToken::new(),
        })
    }

    /// Stops blob uploads when `shutdown` is cancelled.
    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Keeps whole-blob copies (for a registry that ignores `Range`) in `dir` instead of the
    /// system temporary directory.
    pub fn staging_in(mut self, dir: PathBuf) -> Self {
        self.whole = WholeBlobs::new(dir, KEEP_AT_LEAST);
        self
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

    /// The reference `NAMESPACE/POD:tag`, authenticated for `op`.
    async fn reference(
        &self,
        pod: &PodName,
        tag: &str,
        op: RegistryOperation,
    ) -> RemoteResult<Reference> {
        let r = self.registry.reference(&self.repo(pod)?, tag);
        self.registry.login(&r, op).await?;
        Ok(r)
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
        if let Some((m, _)) = lock(&self.manifests).get(&key) {
            return Ok(Ok(Arc::clone(m)));
        }
        let r = self
            .reference(pod, &tag.to_string(), RegistryOperation::Pull)
            .await?;
        let what = format!("reading the manifest of {r}");
        let (body, digest) = self
            .registry
            .call(&what, || {
                self.registry
                    .oci
                    .pull_manifest_raw(&r, &self.registry.auth, MANIFEST_TYPES)
            })
            .await
            .map_err(|e| match e {
                RemoteError::NotFound(_) => RemoteError::NotFound(format!(
                    "version {tag} of pod {pod:?} on remote {:?}",
                    self.name
                )),
                e => e,
            })?;
        let manifest = match parse_pod_manifest(&body) {
            Ok(m) => Arc::new(m),
            Err(why) => return Ok(Err(why)),
        };
        lock(&self.manifests).insert(key, (Arc::clone(&manifest), digest));
        Ok(Ok(manifest))
    }

    /// The digest `r`'s tag points at, or `None` if the tag does not exist.
    async fn tag_digest(&self, r: &Reference) -> RemoteResult<Option<String>> {
        let what = format!("looking up {r}");
        let found = self
            .registry
            .call(&what, || {
                self.registry
                    .oci
                    .fetch_manifest_digest(r, &self.registry.auth)
            })
            .await;
        match found {
            Ok(d) => Ok(Some(d)),
            Err(RemoteError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Uploads a blob unless the repository already has it. `r` is logged in for push and pull.
    async fn push_blob(
        &self,
        r: &Reference,
        digest: &str,
        size: u64,
        data: Blob<'_>,
    ) -> RemoteResult<()> {
        let oci = &self.registry.oci;
        let exists = self
            .registry
            .call(&format!("checking blob {digest} in {r}"), || {
                oci.blob_exists(r, digest)
            })
            .await?;
        if exists {
            tracing::debug!(remote = %self.name, %r, digest, "blob already in the registry");
            return Ok(());
        }
        let what = format!("uploading blob {digest} ({size} bytes) to {r}");
        let upload = self.registry.call_upload(&what, size, || async {
            match &data {
                Blob::Bytes(bytes) => oci.push_blob(r, bytes.clone(), digest).await,
                Blob::File(path, progress) => {
                    let file = tokio::fs::File::open(path).await?;
                    let stream = file_stream(file, Arc::clone(progress));
                    oci.push_blob_stream(r, stream, digest, Some(size)).await
                }
            }
        });
        // On shutdown the upload is dropped: the registry discards an upload session that is
        // never completed (distribution purges them after a week by default).
        tokio::select! {
            r = upload => r.map(|_| ()),
            () = self.shutdown.cancelled() => Err(RemoteError::Cancelled),
        }
    }

    /// Fetches a whole blob into memory; oci-client checks its digest.
    async fn blob_bytes(&self, r: &Reference, layer: &OciDescriptor) -> RemoteResult<Bytes> {
        let what = format!("downloading blob {} from {r}", layer.digest);
        let out = self
            .registry
            .call(&what, || async {
                let size = usize::try_from(layer.size).unwrap_or(0);
                let mut out = AtMost(Vec::with_capacity(size), size);
                self.registry.oci.pull_blob(r, layer, &mut out).await?;
                Ok(out.0)
            })
            .await?;
        Ok(out.into())
    }

    /// Bytes `range` of blob `layer` with one `Range` request, or the whole blob's stream if the
    /// registry ignores `Range`.
    async fn fetch_range(
        &self,
        r: &Reference,
        layer: &OciDescriptor,
        title: &str,
        range: Range<u64>,
    ) -> RemoteResult<Ranged> {
        let what = format!(
            "reading bytes {}..{} of {title} ({})",
            range.start, range.end, layer.digest
        );
        let wanted = usize::try_from(range.end - range.start)
            .map_err(|_| self.registry.other(format!("{what}: range too large")))?;
        let out = self
            .registry
            .call(&what, || async {
                let resp = self
                    .registry
                    .oci
                    .pull_blob_stream_partial(r, layer, range.start, Some(range.end - range.start))
                    .await?;
                let mut stream = match resp {
                    BlobResponse::Partial(s) => s,
                    BlobResponse::Full(s) => return Ok(Ranged::Whole(s)),
                };
                let mut out = crate::buffers::take(wanted);
                while out.len() < wanted {
                    let Some(chunk) = stream.next().await else {
                        break;
                    };
                    let chunk = chunk?;
                    let take = chunk.len().min(wanted - out.len());
                    out.extend_from_slice(&chunk[..take]);
                }
                Ok(Ranged::Bytes(crate::buffers::share(out)))
            })
            .await?;
        if let Ranged::Bytes(b) = &out
            && b.len() < wanted
        {
            return Err(self.registry.other(format!(
                "{what}: the registry returned only {} of {wanted} bytes",
                b.len()
            )));
        }
        Ok(out)
    }

    /// Bytes `range` of blob `layer` from its whole copy, downloading it first unless it is
    /// here or on its way; `first` is a whole-blob answer already received, used for the first
    /// attempt.
    async fn read_whole(
        &self,
        r: &Reference,
        layer: &OciDescriptor,
        title: &str,
        range: Range<u64>,
        first: Option<SizedStream>,
    ) -> RemoteResult<Bytes> {
        let size = u64::try_from(layer.size).unwrap_or(0);
        self.whole
            .read(&layer.digest, size, range, first, |file, first| {
                self.download_whole(r, layer, title, first, file)
            })
            .await
    }

    /// Fills `file` with blob `layer` (see [`whole::fill`]), retrying broken transfers.
    async fn download_whole(
        &self,
        r: &Reference,
        layer: &OciDescriptor,
        title: &str,
        first: Option<SizedStream>,
        file: std::fs::File,
    ) -> RemoteResult<std::fs::File> {
        let size = u64::try_from(layer.size).unwrap_or(0);
        let what = format!(
            "downloading {title} ({}, {size} bytes) whole, as the registry ignores Range",
            layer.digest
        );
        tracing::debug!(remote = %self.name, %r, digest = %layer.digest, size, "downloading a whole blob");
        let what = what.as_str();
        let mut first = first;
        let to = &file;
        self.registry
            .call_download(what, size, || {
                let first = first.take();
                async move {
                    let stream = match first {
                        Some(s) => s,
                        None => self.registry.oci.pull_blob_stream(r, layer).await?,
                    };
                    // A broken transfer is retried; what the registry sent wrong, or a local
                    // write failure, is final.
                    Ok(match whole::fill(to, stream, &layer.digest, size).await {
                        Ok(()) => Ok(()),
                        Err(FillError::Transfer(e)) => return Err(e.into()),
                        Err(FillError::Write(e)) => Err(RemoteError::Io {
                            context: format!(
                                "{what}: writing its temporary copy in {} (it needs room for \
                                 the blob; the staging directory sets where)",
                                self.whole.dir().display()
                            ),
                            source: e,
                        }),
                        Err(e) => Err(self.registry.other(format!("{what}: {e}"))),
                    })
                }
            })
            .await??;
        Ok(file)
    }

    /// Remembers that the registry honours `Range`, unless it was seen to ignore it.
    fn note_range_honoured(&self) {
        let _ = self.range_support.compare_exchange(
            RANGE_UNKNOWN,
            RANGE_HONOURED,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Remembers that the registry ignores `Range`, logging it the first time.
    fn note_range_ignored(&self) {
        if self.range_support.swap(RANGE_IGNORED, Ordering::Relaxed) != RANGE_IGNORED {
            tracing::warn!(
                remote = %self.name,
                "the registry ignores Range requests (it answers with whole blobs): each state \
                 blob is now downloaded once, whole, into a temporary file in {}",
                self.whole.dir().display()
            );
        }
    }

    /// Tags of `repo`, paged with `n`/`last` (distribution 2.8 ignores both and sends all).
    async fn tags(&self, pod: &PodName) -> RemoteResult<Vec<String>> {
        let r = self.reference(pod, "1", RegistryOperation::Pull).await?;
        let what = format!("listing the tags of {}", r.repository());
        let mut out = BTreeSet::new();
        let mut last: Option<String> = None;
        loop {
            let page = self
                .registry
                .call(&what, || {
                    self.registry.oci.list_tags(
                        &r,
                        &self.registry.auth,
                        Some(PAGE),
                        last.as_deref(),
                    )
                })
                .await;
            let tags = match page {
                Ok(p) => p.tags,
                Err(RemoteError::NotFound(_)) => Vec::new(), // no such repository yet
                Err(e) => return Err(e),
            };
            let full = tags.len() >= PAGE;
            last = tags.last().cloned();
            let before = out.len();
            out.extend(tags);
            // A short page, or one with nothing new (pagination ignored), ends the list.
            if !full || out.len() == before {
                return Ok(out.into_iter().collect());
            }
        }
    }

    /// Repositories directly under `NAMESPACE/` whose name is a pod name, from the catalog.
    /// Hand-written: oci-client's `catalog` asks for a repository token, not `registry:catalog:*`.
    async fn catalog_pods(&self) -> RemoteResult<BTreeSet<PodName>> {
        #[derive(serde::Deserialize)]
        struct Catalog {
            repositories: Option<Vec<String>>,
        }
        let what = "listing repositories (/v2/_catalog)";
        let prefix = format!("{}/", self.namespace);
        let mut pods = BTreeSet::new();
        let mut last = String::new();
        loop {
            let mut path = format!("/v2/_catalog?n={PAGE}");
            if !last.is_empty() {
                let q = percent_encoding::utf8_percent_encode(
                    &last,
                    percent_encoding::NON_ALPHANUMERIC,
                );
                path.push_str(&format!("&last={q}"));
            }
            let (status, body) = self
                .registry
                .call(what, || async {
                    let resp = self
                        .registry
                        .send_scoped(Method::GET, &path, "registry:catalog:*")
                        .await?;
                    Ok((resp.status(), resp.bytes().await?))
                })
                .await?;
            if !status.is_success() {
                return Err(self.registry.other(format!(
                    "{what}: HTTP {status}: {} (this registry may not allow listing repositories)",
                    String::from_utf8_lossy(&body).trim()
                )));
            }
            let page: Catalog = serde_json::from_slice(&body)
                .map_err(|e| self.registry.other(format!("{what}: {e}")))?;
            let repos = page.repositories.unwrap_or_default();
            let full = repos.len() >= PAGE;
            let next = repos.last().cloned().unwrap_or_default();
            pods.extend(
                repos
                    .iter()
                    .filter_map(|r| r.strip_prefix(&prefix))
                    .filter(|rest| !rest.contains('/'))
                    .filter_map(|rest| PodName::new(rest).ok()),
            );
            if !full || next <= last {
                return Ok(pods);
            }
            last = next;
        }
    }

    /// The layers of version `version`'s manifest after the version zip: its own state from
    /// what `put_state` returned, older ones from the parent's manifest.
    async fn layers_for(
        &self,
        pod: &PodName,
        version: u64,
        states: &[u64],
        new_state: Option<&StoredState>,
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
                new_state
                    .and_then(StoredState::blob_ref)
                    .map(|(digest, size)| {
                        descriptor(STATE_MEDIA_TYPE, digest.to_owned(), size, title.clone())
                    })
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
                        "cannot commit version {version} of pod {pod:?}: its state object {s} was not uploaded to this registry first"
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

/// A buffer that refuses to grow past its descriptor's size: a registry that sends more bytes
/// than the manifest says cannot make podfs hold them.
struct AtMost(Vec<u8>, usize);

impl tokio::io::AsyncWrite for AtMost {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.0.len() + buf.len() > self.1 {
            return std::task::Poll::Ready(Err(std::io::Error::other(format!(
                "the registry sent more than the {} bytes the manifest gives for this blob",
                self.1
            ))));
        }
        self.0.extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Where the bytes of a blob to upload are.
enum Blob<'a> {
    Bytes(Bytes),
    /// Read streaming, reopened for each attempt; the progress is advanced as it is read.
    File(&'a Path, Arc<dyn Progress>),
}

/// `file` as a stream of 1 MiB pieces, for oci-client's streamed upload.
fn file_stream(
    file: tokio::fs::File,
    progress: Arc<dyn Progress>,
) -> impl futures::Stream<Item = Result<Bytes, oci_client::errors::OciDistributionError>> + Send {
    futures::stream::try_unfold(file, move |mut f| {
        let progress = Arc::clone(&progress);
        async move {
            let mut buf = BytesMut::with_capacity(1 << 20);
            let n = tokio::io::AsyncReadExt::read_buf(&mut f, &mut buf).await?;
            progress.advance(n as u64);
            Ok((n > 0).then(|| (buf.freeze(), f)))
        }
    })
}

#[async_trait]
impl Remote for OrasRemote {
    fn name(&self) -> &str {
        &self.name
    }

    async fn list_pods(&self) -> RemoteResult<Vec<(PodName, u64)>> {
        // A repository whose tags were all deleted stays in the catalog, and other artifacts may
        // share the namespace: keep repositories whose latest version is a podfs manifest (the
        // manifest is cached, so reading the pod next costs nothing more).
        let mut pods = Vec::new();
        for pod in self.catalog_pods().await? {
            let Some(&latest) = self.list_versions(&pod).await?.last() else {
                continue;
            };
            match self.fetch_manifest(&pod, latest).await {
                Ok(Ok(_)) => pods.push((pod, latest)),
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
        let mut versions: Vec<u64> = self
            .tags(pod)
            .await?
            .iter()
            .filter(|t| !t.starts_with('0') && t.bytes().all(|b| b.is_ascii_digit()))
            .filter_map(|t| t.parse().ok())
            .collect();
        versions.sort_unstable();
        Ok(versions)
    }

    async fn read_version(&self, pod: &PodName, version: u64) -> RemoteResult<Bytes> {
        let manifest = self.pod_manifest(pod, version).await?;
        let r = self
            .reference(pod, &version.to_string(), RegistryOperation::Pull)
            .await?;
        // parse_pod_manifest checked that layer 0 exists and is the version zip.
        let layer = manifest
            .layers
            .first()
            .ok_or_else(|| self.registry.other(format!("{r} has no layers")))?;
        let size = u64::try_from(layer.size).unwrap_or(u64::MAX);
        if size > super::MAX_VERSION_OBJECT {
            return Err(super::version_object_too_large(
                &self.name,
                &format!("the version blob of {r}"),
                size,
            ));
        }
        self.blob_bytes(&r, layer).await
    }

    async fn version_id(&self, pod: &PodName, version: u64) -> RemoteResult<Option<VersionId>> {
        let r = self
            .reference(pod, &version.to_string(), RegistryOperation::Pull)
            .await?;
        let digest = self.tag_digest(&r).await?;
        // The tag may point elsewhere since its manifest was cached (a pod deleted and saved
        // again): then forget every manifest this remote kept of the pod.
        {
            let mut manifests = lock(&self.manifests);
            let cached = manifests.get(&(pod.clone(), version)).map(|(_, d)| d);
            if cached.is_some() && cached != digest.as_ref() {
                manifests.retain(|(p, _), _| p != pod);
            }
        }
        let Some(digest) = digest else {
            return Ok(None);
        };
        // The version zip is layer 0 (checked when the manifest was parsed).
        let manifest = self.pod_manifest(pod, version).await?;
        let size = manifest.layers.first().map_or(0, |l| l.size);
        Ok(Some(VersionId {
            id: digest,
            size: u64::try_from(size).unwrap_or(0),
        }))
    }

    async fn read_state(
        &self,
        pod: &PodName,
        via: u64,
        state: u64,
        range: Range<u64>,
    ) -> RemoteResult<Bytes> {
        let manifest = self.pod_manifest(pod, via).await?;
        let title = object_name(pod, ObjectKind::State, state);
        let layer = manifest
            .layers
            .iter()
            .find(|l| title_of(l) == Some(title.as_str()))
            .ok_or_else(|| {
                RemoteError::NotFound(format!(
                    "state object {state} of pod {pod:?} (no layer {title} in version {via}) on remote {:?}",
                    self.name
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
        let r = self
            .reference(pod, &via.to_string(), RegistryOperation::Pull)
            .await?;
        let ranged = {
            // Until the registry has answered one ranged read, send one at a time: otherwise
            // a registry that ignores `Range` would start a whole blob for each read in flight.
            let _probe = match self.range_support.load(Ordering::Relaxed) {
                RANGE_UNKNOWN => Some(self.probe.lock().await),
                _ => None,
            };
            match self.range_support.load(Ordering::Relaxed) {
                RANGE_IGNORED => None,
                _ => {
                    let got = self.fetch_range(&r, layer, &title, range.clone()).await?;
                    // Noted before the probe is released, for the reads waiting on it.
                    match &got {
                        Ranged::Bytes(_) => self.note_range_honoured(),
                        Ranged::Whole(_) => self.note_range_ignored(),
                    }
                    Some(got)
                }
            }
        };
        match ranged {
            Some(Ranged::Bytes(b)) => Ok(b),
            Some(Ranged::Whole(stream)) => {
                self.read_whole(&r, layer, &title, range, Some(stream))
                    .await
            }
            None => self.read_whole(&r, layer, &title, range, None).await,
        }
    }

    async fn put_state(
        &self,
        pod: &PodName,
        version: u64,
        file: &Path,
        progress: Arc<dyn Progress>,
    ) -> RemoteResult<StoredState> {
        let r = self
            .reference(pod, &version.to_string(), RegistryOperation::Push)
            .await?;
        self.registry.login(&r, RegistryOperation::Pull).await?;
        let path = file.to_owned();
        let (digest, size) = tokio::task::spawn_blocking(move || file_digest(&path))
            .await
            .map_err(|e| RemoteError::Io {
                context: "background task".into(),
                source: std::io::Error::other(e),
            })?
            .map_err(RemoteError::io(format!("hashing {}", file.display())))?;
        self.push_blob(&r, &digest, size, Blob::File(file, progress))
            .await?;
        // Until a manifest refers to it, the blob is garbage for the registry's collector:
        // a commit that fails leaves nothing else behind.
        Ok(StoredState::blob(pod, version, digest, size))
    }

    async fn commit_version(
        &self,
        pod: &PodName,
        version: u64,
        version_zip: Bytes,
        states: &[u64],
        new_state: Option<&StoredState>,
        parent: Option<u64>,
    ) -> RemoteResult<()> {
        check_new_state(&self.name, pod, version, states, new_state)?;
        let r = self
            .reference(pod, &version.to_string(), RegistryOperation::Push)
            .await?;
        self.registry.login(&r, RegistryOperation::Pull).await?;
        let taken = |d: &str| {
            RemoteError::AlreadyExists(format!(
                "version {version} of pod {pod:?} on remote {:?} (tag {r} is {d})",
                self.name
            ))
        };
        if let Some(d) = self.tag_digest(&r).await? {
            return Err(taken(&d));
        }
        let version_layer = descriptor(
            VERSION_MEDIA_TYPE,
            sha256_digest(&version_zip),
            version_zip.len() as u64,
            object_name(pod, ObjectKind::Version, version),
        );
        let mut layers = vec![version_layer.clone()];
        layers.extend(
            self.layers_for(pod, version, states, new_state, parent)
                .await?,
        );
        let manifest = build_manifest(layers);
        let body = encode_manifest(&manifest).map_err(|why| {
            self.registry.other(format!(
                "cannot commit version {version} of pod {pod:?}: {why}"
            ))
        })?;
        let body_digest = sha256_digest(&body);

        let config = Bytes::from_static(EMPTY_CONFIG);
        self.push_blob(
            &r,
            EMPTY_CONFIG_DIGEST,
            config.len() as u64,
            Blob::Bytes(config),
        )
        .await?;
        let size = version_zip.len() as u64;
        self.push_blob(&r, &version_layer.digest, size, Blob::Bytes(version_zip))
            .await?;

        // Registries have no conditional tag write: check again right before, verify after.
        if let Some(d) = self.tag_digest(&r).await? {
            return Err(taken(&d));
        }
        let body = Bytes::from(body);
        let content_type = reqwest::header::HeaderValue::from_static(OCI_IMAGE_MEDIA_TYPE);
        self.registry
            .call(&format!("pushing the manifest of {r}"), || {
                self.registry
                    .oci
                    .push_manifest_raw(&r, body.clone(), content_type.clone())
            })
            .await?;
        match self.tag_digest(&r).await? {
            Some(d) if d == body_digest => {}
            Some(d) => return Err(taken(&d)),
            None => {
                return Err(self.registry.other(format!(
                    "pushing the manifest of {r}: the registry accepted it but the tag is missing"
                )));
            }
        }
        lock(&self.manifests).insert((pod.clone(), version), (Arc::new(manifest), body_digest));
        Ok(())
    }

    async fn delete_version(&self, pod: &PodName, version: u64) -> RemoteResult<()> {
        lock(&self.manifests).remove(&(pod.clone(), version));
        let r = self
            .reference(pod, &version.to_string(), RegistryOperation::Pull)
            .await?;
        // distribution cannot delete by tag: resolve the digest, delete the manifest.
        let Some(digest) = self.tag_digest(&r).await? else {
            return Ok(());
        };
        let repo = r.repository();
        let what = format!("deleting {r} ({digest})");
        let path = format!("/v2/{repo}/manifests/{digest}");
        let scope = format!("repository:{repo}:pull,delete");
        let (status, body) = self
            .registry
            .call(&what, || async {
                let resp = self
                    .registry
                    .send_scoped(Method::DELETE, &path, &scope)
                    .await?;
                Ok((resp.status(), resp.text().await.unwrap_or_default()))
            })
            .await?;
        match status {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            StatusCode::METHOD_NOT_ALLOWED => Err(self.registry.other(format!(
                "{what}: the registry does not allow deletes (distribution: storage.delete.enabled)"
            ))),
            s => Err(self
                .registry
                .other(format!("{what}: unexpected HTTP {s}: {}", body.trim()))),
        }
    }

    /// A no-op: blobs are shared and content-addressed; the registry's garbage collector removes
    /// the ones no manifest refers to.
    async fn delete_state(&self, pod: &PodName, state: u64) -> RemoteResult<()> {
        tracing::debug!(remote = %self.name, pod = %pod, state, "state blobs are left to registry garbage collection");
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

    /// A commit gets its new state's layer from the `put_state` result it is handed, and
    /// refuses, before any request, to commit without it (nothing is kept between the calls).
    #[tokio::test]
    async fn a_commit_without_its_uploaded_state_is_refused_before_any_request() {
        let url = OrasUrl {
            registry: "127.0.0.1:9".into(), // discard: nothing answers
            namespace: "ns".into(),
            username: None,
            password: None,
            plain_http: true,
        };
        let remote = OrasRemote::new("r", &url).unwrap();
        let pod = PodName::new("p").unwrap();
        let zip = Bytes::from_static(b"version");
        let err = remote
            .commit_version(&pod, 1, zip.clone(), &[1], None, None)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not uploaded first"), "{err}");
        let stale = StoredState::blob(&pod, 1, "sha256:00".into(), 1);
        let err = remote
            .commit_version(&pod, 2, zip, &[2], Some(&stale), Some(1))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("its own state object"), "{err}");
    }
}
