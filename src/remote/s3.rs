//! The `s3://` backend: pod objects are S3 objects under the URL's key prefix.
//!
//! Guarantees:
//! - Objects are created only if absent (`If-None-Match: *` on PutObject and on
//!   CompleteMultipartUpload), so two writers never overwrite one version; a `412
//!   PreconditionFailed` or `409 ConditionalRequestConflict` becomes
//!   [`RemoteError::AlreadyExists`].
//! - Large state objects go up as a multipart upload whose parts are read from the file with
//!   `pread`, at most [`PARTS_IN_FLIGHT`] at once, so memory is bounded by the parts in flight. A
//!   failed upload is aborted, so it leaves no object behind.
//! - A version object is read in at most two GETs (a suffix range, then the rest); a state range
//!   in one ranged GET.
//! - A missing bucket is an empty remote when listing and is created on the first save.
//! - Throttling, 5xx and connection errors are retried with backoff a bounded number of times;
//!   every request attempt has a timeout. SDK errors are classified here and never leave this
//!   module.

use std::fmt;

use crate::term::cause_chain;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::environment::region::EnvironmentVariableRegionProvider;
use aws_config::meta::region::RegionProviderChain;
use aws_config::profile::ProfileFileRegionProvider;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    BucketLocationConstraint, CompletedMultipartUpload, CompletedPart, CreateBucketConfiguration,
};
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use tokio_util::sync::CancellationToken;

use super::{
    Growing, MAX_VERSION_OBJECT, ObjectId, ObjectKind, Remote, RemoteError, RemoteResult,
    StoredState, VersionId, check_new_state, numbers_among, object_name, parse_object_name,
    pods_among, version_object_too_large,
};
use crate::config::{ChecksumMode, S3Url};
use crate::name::PodName;
use crate::progress::Progress;

/// Multipart part size when the URL gives none (`part_size=`).
pub const DEFAULT_PART_SIZE: u64 = 8 << 20;
/// Parts uploaded at once: bounds memory to `PARTS_IN_FLIGHT * part_size`.
pub const PARTS_IN_FLIGHT: usize = 4;
/// Per-attempt request timeout when the URL gives none (`timeout=`).
pub const DEFAULT_TIMEOUT_SECS: u64 = 60;
/// Time allowed to open a connection, per attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts per request (the first one included) for retryable failures.
pub const MAX_ATTEMPTS: u32 = 4;
/// The first GET of a version object asks for this many bytes from its end.
const VERSION_TAIL: u64 = 256 << 10;
/// S3 allows at most this many parts per upload.
const MAX_PARTS: u64 = 10_000;
/// The region used when neither the URL nor the AWS configuration names one.
const FALLBACK_REGION: &str = "us-east-1";

/// An S3 bucket (and key prefix) holding pods.
pub struct S3Remote {
    name: String,
    client: Client,
    bucket: String,
    prefix: String,
    region: String,
    /// What to call the server in messages: the endpoint URL, or "AWS S3".
    server: String,
    part_size: u64,
    timeout_secs: u64,
    /// Cancelled on shutdown: a multipart upload in progress stops and is aborted.
    shutdown: CancellationToken,
}

impl fmt::Debug for S3Remote {
    // By hand: the SDK client's configuration holds credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Remote")
            .field("name", &self.name)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("region", &self.region)
            .field("server", &self.server)
            .field("part_size", &self.part_size)
            .finish_non_exhaustive()
    }
}

/// Why one attempt at a write failed: the bucket is missing (create it and try again), or
/// anything else.
/// The size of a file to upload: known, or growing as it is written.
#[derive(Clone, Debug)]
enum Sizing {
    Known(u64),
    Growing(tokio::sync::watch::Receiver<Growing>),
}

enum WriteFailure {
    NoBucket,
    Failed(RemoteError),
}

impl From<RemoteError> for WriteFailure {
    fn from(e: RemoteError) -> Self {
        WriteFailure::Failed(e)
    }
}

impl S3Remote {
    /// Builds the client: keys from the URL or else the standard AWS credential chain; region
    /// from the URL, else the AWS configuration, else `us-east-1`; path-style addressing when an
    /// endpoint is given. Makes no request.
    pub async fn new(name: &str, url: &S3Url) -> RemoteResult<Self> {
        let timeout_secs = url.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS);
        // The default chain without IMDS: probing instance metadata off EC2 costs a timeout and
        // logs a warning on every command, and a bucket's region rarely comes from there.
        let region = RegionProviderChain::first_try(url.region.clone().map(Region::new))
            .or_else(EnvironmentVariableRegionProvider::new())
            .or_else(ProfileFileRegionProvider::new())
            .or_else(Region::new(FALLBACK_REGION));
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(region)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(MAX_ATTEMPTS)
                    .with_initial_backoff(Duration::from_millis(200))
                    .with_max_backoff(Duration::from_secs(5)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .operation_attempt_timeout(Duration::from_secs(timeout_secs))
                    .build(),
            );
        if let (Some(id), Some(secret)) = (&url.access_key_id, &url.secret_access_key) {
            loader = loader.credentials_provider(Credentials::new(
                id.expose(),
                secret.expose(),
                url.session_token.as_ref().map(|t| t.expose().to_owned()),
                None,
                "podfs-remote-url",
            ));
        }
        if let Some(endpoint) = &url.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some(bundle) = &url.ca_bundle {
            loader = loader.http_client(https_client_trusting(name, bundle).await?);
        }
        let sdk = loader.load().await;
        let (request_checksums, response_checksums) = match url.checksum {
            ChecksumMode::WhenRequired => (
                RequestChecksumCalculation::WhenRequired,
                ResponseChecksumValidation::WhenRequired,
            ),
            ChecksumMode::WhenSupported => (
                RequestChecksumCalculation::WhenSupported,
                ResponseChecksumValidation::WhenSupported,
            ),
        };
        let conf = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(url.endpoint.is_some())
            .request_checksum_calculation(request_checksums)
            .response_checksum_validation(response_checksums)
            .build();
        let region = sdk
            .region()
            .map_or_else(|| FALLBACK_REGION.to_owned(), |r| r.to_string());
        Ok(Self {
            name: name.to_owned(),
            client: Client::from_conf(conf),
            bucket: url.bucket.clone(),
            prefix: url.prefix.clone(),
            region,
            server: url.endpoint.clone().unwrap_or_else(|| "AWS S3".to_owned()),
            part_size: url.part_size.unwrap_or(DEFAULT_PART_SIZE),
            timeout_secs,
            shutdown: CancellationToken::new(),
        })
    }

    /// Stops multipart uploads (and aborts them) when `shutdown` is cancelled.
    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
    }

    fn key(&self, pod: &PodName, kind: ObjectKind, n: u64) -> String {
        format!("{}{}", self.prefix, object_name(pod, kind, n))
    }

    /// `s3://bucket/key`, for messages.
    fn object_url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    /// Turns an SDK error about `key` into a [`RemoteError`] that names the remote and says what
    /// to do. Never includes the SDK's debug output.
    fn classify<E>(&self, err: SdkError<E, HttpResponse>, key: &str) -> RemoteError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let remote = self.name.clone();
        let what = self.object_url(key);
        match &err {
            SdkError::ServiceError(service) => {
                let status = service.raw().status().as_u16();
                let code = err.code().unwrap_or_default().to_owned();
                let message = err.message().unwrap_or_default().to_owned();
                let detail = match (code.is_empty(), message.is_empty()) {
                    (false, false) => format!("{code}: {message}"),
                    (false, true) => code.clone(),
                    (true, _) => format!("HTTP status {status}"),
                };
                match (status, code.as_str()) {
                    (
                        _,
                        "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch"
                        | "InvalidToken" | "ExpiredToken" | "AllAccessDisabled",
                    )
                    | (401 | 403, _) => RemoteError::Denied {
                        remote,
                        detail: format!("{detail} (on {what})"),
                    },
                    (_, "NoSuchBucket") => {
                        RemoteError::NotFound(format!("bucket {:?} on remote {remote:?}", self.bucket))
                    }
                    (_, "NoSuchKey") | (404, _) => {
                        RemoteError::NotFound(format!("{what} on remote {remote:?}"))
                    }
                    (_, "PreconditionFailed" | "ConditionalRequestConflict") | (412, _) => {
                        RemoteError::AlreadyExists(format!("{what} on remote {remote:?}"))
                    }
                    (_, "SlowDown" | "ServiceUnavailable" | "InternalError") | (500..=599, _) => {
                        RemoteError::Unavailable {
                            remote,
                            detail: format!(
                                "{} kept failing after {MAX_ATTEMPTS} attempts ({detail}); try again later",
                                self.server
                            ),
                        }
                    }
                    _ => RemoteError::Other {
                        remote,
                        detail: format!("{detail} (on {what})"),
                    },
                }
            }
            SdkError::TimeoutError(_) => RemoteError::Unavailable {
                remote,
                detail: format!(
                    "{} did not answer within {}s, {MAX_ATTEMPTS} attempts (raise timeout= in the remote URL, or check the server)",
                    self.server, self.timeout_secs
                ),
            },
            SdkError::DispatchFailure(dispatch) if dispatch.is_io() || dispatch.is_timeout() => {
                RemoteError::Unavailable {
                    remote,
                    detail: format!(
                        "cannot reach {} after {MAX_ATTEMPTS} attempts: {} (check the endpoint and that the server is running)",
                        self.server,
                        root_cause(&err)
                    ),
                }
            }
            SdkError::DispatchFailure(_) if mentions_credentials(&err) => RemoteError::Denied {
                remote,
                detail: "no AWS credentials found: put access_key_id and secret_access_key in the remote URL, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or configure a profile (AWS_PROFILE) or SSO".to_owned(),
            },
            _ => RemoteError::Other {
                remote,
                detail: format!("request for {what} failed: {}", cause_chain(&err)),
            },
        }
    }

    /// Like [`Self::classify`], but reports a missing bucket separately so a write can create it.
    fn classify_write<E>(&self, err: SdkError<E, HttpResponse>, key: &str) -> WriteFailure
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        if err.code() == Some("NoSuchBucket") {
            WriteFailure::NoBucket
        } else {
            WriteFailure::Failed(self.classify(err, key))
        }
    }

    /// Runs a write; if the bucket is missing, creates it and runs the write once more.
    async fn with_bucket<F, Fut>(&self, write: F) -> RemoteResult<()>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), WriteFailure>>,
    {
        match write().await {
            Ok(()) => Ok(()),
            Err(WriteFailure::Failed(e)) => Err(e),
            Err(WriteFailure::NoBucket) => {
                self.create_bucket().await?;
                match write().await {
                    Ok(()) => Ok(()),
                    Err(WriteFailure::Failed(e)) => Err(e),
                    Err(WriteFailure::NoBucket) => Err(RemoteError::NotFound(format!(
                        "bucket {:?} on remote {:?} (it was created but is still missing)",
                        self.bucket, self.name
                    ))),
                }
            }
        }
    }

    /// Creates the bucket (with a location constraint outside us-east-1). A bucket that already
    /// exists is fine: the write that needed it is retried and reports any real problem.
    #[tracing::instrument(level = "debug", skip(self), fields(remote = %self.name, bucket = %self.bucket))]
    async fn create_bucket(&self) -> RemoteResult<()> {
        tracing::info!(remote = %self.name, bucket = %self.bucket, region = %self.region, "creating the bucket");
        let mut req = self.client.create_bucket().bucket(&self.bucket);
        if self.region != FALLBACK_REGION {
            req = req.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(self.region.as_str()))
                    .build(),
            );
        }
        match req.send().await {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.code(),
                    Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(self.classify(e, "")),
        }
    }

    /// Every pod object (key relative to the prefix, parsed) whose name starts with `start`;
    /// all pages of ListObjectsV2. A missing bucket is an empty remote.
    #[tracing::instrument(level = "debug", skip(self), fields(remote = %self.name))]
    async fn list(&self, start: &str) -> RemoteResult<Vec<ObjectId>> {
        let prefix = format!("{}{start}", self.prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let resp = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&prefix)
                .set_continuation_token(token.take())
                .send()
                .await;
            let page = match resp {
                Ok(page) => page,
                Err(e) if e.code() == Some("NoSuchBucket") => return Ok(Vec::new()),
                Err(e) => return Err(self.classify(e, &prefix)),
            };
            for obj in page.contents() {
                if let Some(parsed) = obj
                    .key()
                    .and_then(|k| k.strip_prefix(&self.prefix))
                    .and_then(parse_object_name)
                {
                    out.push(parsed);
                }
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        Ok(out)
    }

    /// Numbers of `pod`'s objects of `kind`, ascending.
    async fn numbers(&self, pod: &PodName, kind: ObjectKind) -> RemoteResult<Vec<u64>> {
        let objects = self.list(&format!("localstack-pod-{pod}-")).await?;
        Ok(numbers_among(objects, pod, kind))
    }

    /// One GET of `key` for `range`; returns the body and the object's total size when the
    /// server sent a `Content-Range`. The SDK retries the request; a connection that breaks while
    /// the body streams is retried here, as many times.
    ///
    /// The body is streamed into one buffer allocated up front from the `Content-Length` (at most
    /// the bytes asked for), so a ranged read holds only its own bytes: no list of received
    /// segments beside a contiguous copy. A body longer than the range asked for is refused as
    /// soon as its length shows it, before it is held.
    #[tracing::instrument(level = "debug", skip(self), fields(remote = %self.name))]
    async fn get(&self, key: &str, range: &GetRange) -> RemoteResult<(Bytes, Option<u64>)> {
        let mut attempt = 1;
        loop {
            let resp = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .set_range(range.header())
                .send()
                .await
                .map_err(|e| self.classify(e, key))?;
            let total = resp
                .content_range()
                .and_then(|r| r.rsplit_once('/'))
                .and_then(|(_, total)| total.parse::<u64>().ok());
            let limit = range.limit(resp.content_range().is_some());
            let length = resp.content_length().and_then(|n| u64::try_from(n).ok());
            let chunks = futures::stream::unfold(resp.body, |mut body| async move {
                body.next().await.map(|chunk| (chunk, body))
            });
            match read_body(chunks, length, limit).await {
                Ok(body) => return Ok((body, total)),
                Err(BodyFailure::TooLong { got, limit }) => {
                    return Err(RemoteError::Other {
                        remote: self.name.clone(),
                        detail: format!(
                            "{} sent at least {got} bytes of {} where {limit} were asked for ({}): refusing the rest (does it ignore Range headers?)",
                            self.server,
                            self.object_url(key),
                            range.header().unwrap_or_default()
                        ),
                    });
                }
                Err(BodyFailure::Broken(e)) if attempt < MAX_ATTEMPTS => {
                    tracing::debug!(remote = %self.name, key, attempt, "reading a response body failed, retrying: {}", cause_chain(&e));
                    attempt += 1;
                }
                Err(BodyFailure::Broken(e)) => {
                    return Err(RemoteError::Unavailable {
                        remote: self.name.clone(),
                        detail: format!(
                            "the connection broke while reading {} ({MAX_ATTEMPTS} attempts): {} (try again)",
                            self.object_url(key),
                            cause_chain(&e)
                        ),
                    });
                }
            }
        }
    }

    #[tracing::instrument(level = "debug", skip(self, body), fields(remote = %self.name, len = body.len()))]
    async fn put_small(&self, key: &str, body: Bytes) -> Result<(), WriteFailure> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .if_none_match("*")
            .body(ByteStream::from(body))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.classify_write(e, key))
    }

    /// True if `key` exists (HEAD). Anything but a clean "not found" is an error.
    async fn exists(&self, key: &str) -> RemoteResult<bool> {
        Ok(self.etag(key).await?.is_some())
    }

    /// The ETag and modification time of `key` (HEAD), or `None` if it does not exist.
    async fn etag(&self, key: &str) -> RemoteResult<Option<VersionId>> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(head) => Ok(Some(VersionId {
                id: format!(
                    "{}@{}",
                    head.e_tag().unwrap_or_default(),
                    head.last_modified()
                        .map(|t| t.as_nanos())
                        .unwrap_or_default()
                ),
                size: head
                    .content_length()
                    .and_then(|n| u64::try_from(n).ok())
                    .unwrap_or_default(),
            })),
            Err(e) => match self.classify(e, key) {
                RemoteError::NotFound(_) => Ok(None),
                e => Err(e),
            },
        }
    }

    /// Uploads `file` (`size` bytes) to `key` as a multipart upload, created only if absent.
    #[tracing::instrument(level = "debug", skip(self, file, progress), fields(remote = %self.name))]
    async fn put_multipart(
        &self,
        key: &str,
        file: &Arc<std::fs::File>,
        size: Sizing,
        progress: &dyn Progress,
    ) -> Result<(), WriteFailure> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.classify_write(e, key))?;
        let Some(upload_id) = created.upload_id().map(str::to_owned) else {
            return Err(WriteFailure::Failed(RemoteError::Other {
                remote: self.name.clone(),
                detail: format!(
                    "{} started an upload of {} without an upload id",
                    self.server,
                    self.object_url(key)
                ),
            }));
        };
        // On shutdown the parts in flight are dropped and the upload is aborted below, so an
        // interrupted save leaves no parts behind.
        let result = tokio::select! {
            r = self.upload_parts(key, &upload_id, file, size.clone(), progress) => r,
            () = self.shutdown.cancelled() => Err(RemoteError::Cancelled),
        };
        if result.is_err() {
            // Best effort: an upload left behind costs storage but is never a visible object.
            if let Err(e) = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .send()
                .await
            {
                tracing::warn!(
                    remote = %self.name,
                    key,
                    "could not abort the failed multipart upload (its parts stay in the bucket until an AbortIncompleteMultipartUpload lifecycle rule removes them): {}",
                    self.classify(e, key)
                );
            }
        }
        result.map_err(WriteFailure::Failed)
    }

    async fn upload_parts(
        &self,
        key: &str,
        upload_id: &str,
        file: &Arc<std::fs::File>,
        size: Sizing,
        progress: &dyn Progress,
    ) -> RemoteResult<()> {
        let (part_size, growing) = match size {
            Sizing::Known(size) => {
                let ready = Growing {
                    written: size,
                    open: None,
                    end: Some(size),
                    expected: size,
                };
                (
                    self.part_size.max(size.div_ceil(MAX_PARTS)),
                    tokio::sync::watch::channel(ready).1,
                )
            }
            // Room for twice the size expected.
            Sizing::Growing(g) => {
                let expected = g.borrow().expected;
                (self.part_size.max((2 * expected).div_ceil(MAX_PARTS)), g)
            }
        };
        // Each part once its bytes are written and final (all at once for a complete file), in
        // order, but for a part holding a header still open (rewritten when its entry is done):
        // it goes once it is final, so that the parts after it need not wait.
        let part = move |k: u64, end: Option<u64>| {
            let start = k * part_size;
            (
                k,
                start,
                end.map_or(part_size, |e| part_size.min(e - start)),
            )
        };
        let ready = futures::stream::unfold(
            (0u64, Vec::<u64>::new(), growing),
            move |(mut i, mut deferred, mut g)| async move {
                loop {
                    let now = g.borrow_and_update().clone();
                    let range = |k: u64| k * part_size..(k + 1) * part_size;
                    if let Some(at) = deferred.iter().position(|&k| now.settled(&range(k))) {
                        let k = deferred.remove(at);
                        return Some((Ok(part(k, now.end)), (i, deferred, g)));
                    }
                    if let Some(end) = now.end {
                        if i * part_size >= end && i > 0 {
                            return None;
                        }
                        return Some((Ok(part(i, now.end)), (i + 1, deferred, g)));
                    }
                    if now.settled(&range(i)) {
                        return Some((Ok(part(i, None)), (i + 1, deferred, g)));
                    }
                    if range(i).end <= now.written {
                        deferred.push(i);
                        i += 1;
                        continue;
                    }
                    if g.changed().await.is_err() {
                        // The writer stopped without finishing the file.
                        let stop = (u64::MAX / part_size, Vec::new(), g);
                        return Some((Err(RemoteError::Cancelled), stop));
                    }
                }
            },
        );
        let mut parts: Vec<CompletedPart> = ready
            .map(|part| async move {
                let (i, start, len) = part?;
                let data = pread(file, start, len).await?;
                let number = i32::try_from(i + 1).map_err(|_| RemoteError::Other {
                    remote: self.name.clone(),
                    detail: "too many parts".into(),
                })?;
                let resp = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .part_number(number)
                    .body(ByteStream::from(data))
                    .send()
                    .await
                    .map_err(|e| self.classify(e, key))?;
                progress.advance(len);
                Ok::<_, RemoteError>(
                    CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(resp.e_tag().map(str::to_owned))
                        .build(),
                )
            })
            .buffer_unordered(PARTS_IN_FLIGHT)
            .try_collect()
            .await?;
        parts.sort_by_key(|p| p.part_number());
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .if_none_match("*")
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.classify(e, key))
    }
}

/// `file`, opened to be uploaded, and its length now.
async fn open_to_upload(file: &Path) -> RemoteResult<(Arc<std::fs::File>, u64)> {
    let context = format!("opening {}", file.display());
    let path = file.to_owned();
    let opened = tokio::task::spawn_blocking(move || std::fs::File::open(path))
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(RemoteError::io(context.clone()))?;
    let size = opened.metadata().map_err(RemoteError::io(context))?.len();
    Ok((Arc::new(opened), size))
}

/// An HTTPS client that trusts the system roots and the PEM certificates in `bundle`
/// (`AWS_CA_BUNDLE`).
async fn https_client_trusting(
    remote: &str,
    bundle: &Path,
) -> RemoteResult<aws_sdk_s3::config::SharedHttpClient> {
    use aws_smithy_http_client::tls::{self, TlsContext, TrustStore, rustls_provider::CryptoMode};
    let bad = |reason: String| RemoteError::Other {
        remote: remote.to_owned(),
        detail: format!(
            "the CA bundle {} (AWS_CA_BUNDLE) {reason}: fix the file or unset AWS_CA_BUNDLE",
            bundle.display()
        ),
    };
    let pem = tokio::fs::read(bundle)
        .await
        .map_err(|e| bad(format!("cannot be read ({e})")))?;
    let context = TlsContext::builder()
        .with_trust_store(TrustStore::default().with_pem_certificate(pem))
        .build()
        .map_err(|e| bad(format!("is not usable ({})", cause_chain(&e))))?;
    Ok(aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc))
        .tls_context(context)
        .build_https())
}

/// Reads `len` bytes at `offset` of `file` on the blocking pool.
async fn pread(file: &Arc<std::fs::File>, offset: u64, len: u64) -> RemoteResult<Bytes> {
    let file = Arc::clone(file);
    tokio::task::spawn_blocking(move || {
        let len = usize::try_from(len).map_err(std::io::Error::other)?;
        let mut buf = BytesMut::zeroed(len);
        file.read_exact_at(&mut buf, offset)?;
        Ok(buf.freeze())
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|r| r)
    .map_err(RemoteError::io("reading the staged state object"))
}

/// What one GET asks for: its `Range` header, and so how long its body may be.
#[derive(Debug, Clone, PartialEq, Eq)]
enum GetRange {
    /// The whole object.
    Whole,
    /// The last `n` bytes: all of them if the object is shorter, and the whole object if the
    /// server ignores the range (a version object is read whole anyway).
    Tail(u64),
    /// Exactly these bytes; a longer body is an error.
    Bytes(Range<u64>),
}

impl GetRange {
    /// The `Range` header (`None`: the whole object). An empty `Bytes` range is never sent.
    fn header(&self) -> Option<String> {
        match self {
            GetRange::Whole => None,
            GetRange::Tail(n) => Some(format!("bytes=-{n}")),
            GetRange::Bytes(r) => Some(format!("bytes={}-{}", r.start, r.end.saturating_sub(1))),
        }
    }

    /// The most bytes the body may hold, given whether the server answered with a part of the
    /// object (it sent a `Content-Range`). Only version objects are read whole, so a whole body
    /// is bounded by [`MAX_VERSION_OBJECT`].
    fn limit(&self, partial: bool) -> Option<u64> {
        match self {
            GetRange::Whole => Some(MAX_VERSION_OBJECT),
            GetRange::Tail(n) if partial => Some(*n),
            GetRange::Tail(_) => Some(MAX_VERSION_OBJECT),
            GetRange::Bytes(r) => Some(r.end.saturating_sub(r.start)),
        }
    }
}

/// Why a response body could not be read.
#[derive(Debug)]
enum BodyFailure<E> {
    /// It is longer than the `limit` bytes asked for (at least `got` bytes).
    TooLong { got: u64, limit: u64 },
    /// The stream failed (a broken connection): the request may be retried.
    Broken(E),
}

/// Reads a response body, arriving as `chunks`, into one buffer allocated once: `length` (the
/// `Content-Length`) bytes, or `limit` if that is smaller or no length was sent. Each chunk is
/// copied in and dropped as it arrives. More than `limit` bytes (by the `Content-Length` or as
/// they arrive) is [`BodyFailure::TooLong`], and the rest of the body is not read.
async fn read_body<E>(
    chunks: impl futures::Stream<Item = Result<Bytes, E>>,
    length: Option<u64>,
    limit: Option<u64>,
) -> Result<Bytes, BodyFailure<E>> {
    if let (Some(length), Some(limit)) = (length, limit)
        && length > limit
    {
        return Err(BodyFailure::TooLong { got: length, limit });
    }
    let capacity = match (length, limit) {
        (Some(length), _) => length,
        (None, Some(limit)) => limit,
        (None, None) => 0,
    };
    let mut buf = crate::buffers::take(usize::try_from(capacity).unwrap_or(0));
    let mut chunks = std::pin::pin!(chunks);
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(BodyFailure::Broken)?;
        let got = (buf.len() + chunk.len()) as u64;
        if let Some(limit) = limit
            && got > limit
        {
            return Err(BodyFailure::TooLong { got, limit });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(crate::buffers::share(buf))
}

/// The innermost message of an error chain (e.g. "Connection refused (os error 111)").
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = err;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

fn mentions_credentials(err: &(dyn std::error::Error + 'static)) -> bool {
    cause_chain(err).to_ascii_lowercase().contains("credential")
}

#[async_trait]
impl Remote for S3Remote {
    fn name(&self) -> &str {
        &self.name
    }

    async fn list_pods(&self) -> RemoteResult<Vec<(PodName, u64)>> {
        Ok(pods_among(self.list("localstack-pod-").await?))
    }

    async fn list_versions(&self, pod: &PodName) -> RemoteResult<Vec<u64>> {
        self.numbers(pod, ObjectKind::Version).await
    }

    async fn list_states(&self, pod: &PodName) -> RemoteResult<Vec<u64>> {
        self.numbers(pod, ObjectKind::State).await
    }

    async fn version_id(&self, pod: &PodName, version: u64) -> RemoteResult<Option<VersionId>> {
        self.etag(&self.key(pod, ObjectKind::Version, version))
            .await
    }

    async fn read_version(&self, pod: &PodName, version: u64) -> RemoteResult<Bytes> {
        let key = self.key(pod, ObjectKind::Version, version);
        let (tail, total) = self.get(&key, &GetRange::Tail(VERSION_TAIL)).await?;
        let got = tail.len() as u64;
        match total {
            // The server ignored the range (whole object) or the tail is the whole object.
            None => Ok(tail),
            Some(total) if total <= got => Ok(tail),
            Some(total) if total > MAX_VERSION_OBJECT => Err(version_object_too_large(
                &self.name,
                &self.object_url(&key),
                total,
            )),
            Some(total) => {
                let head_len = total - got;
                let (head, _) = self.get(&key, &GetRange::Bytes(0..head_len)).await?;
                if head.len() as u64 != head_len {
                    return Err(RemoteError::Other {
                        remote: self.name.clone(),
                        detail: format!(
                            "{} returned {} bytes of {} where {head_len} were asked for (is the object changing?)",
                            self.server,
                            head.len(),
                            self.object_url(&key)
                        ),
                    });
                }
                let mut whole = BytesMut::with_capacity(total as usize);
                whole.extend_from_slice(&head);
                whole.extend_from_slice(&tail);
                Ok(whole.freeze())
            }
        }
    }

    async fn read_state(
        &self,
        pod: &PodName,
        _via: u64,
        state: u64,
        range: Range<u64>,
    ) -> RemoteResult<Bytes> {
        let key = self.key(pod, ObjectKind::State, state);
        if range.start > range.end {
            return Err(RemoteError::Other {
                remote: self.name.clone(),
                detail: format!(
                    "bytes {range:?} of {} is not a range",
                    self.object_url(&key)
                ),
            });
        }
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        let want = range.end - range.start;
        let (bytes, _) = self.get(&key, &GetRange::Bytes(range.clone())).await?;
        if bytes.len() as u64 != want {
            return Err(RemoteError::Other {
                remote: self.name.clone(),
                detail: format!(
                    "{} returned {} bytes of {} at offset {} where {want} were asked for (the object is shorter than its version says)",
                    self.server,
                    bytes.len(),
                    self.object_url(&key),
                    range.start
                ),
            });
        }
        Ok(bytes)
    }

    async fn put_state(
        &self,
        pod: &PodName,
        version: u64,
        file: &Path,
        progress: Arc<dyn Progress>,
    ) -> RemoteResult<StoredState> {
        let key = self.key(pod, ObjectKind::State, version);
        let (opened, size) = open_to_upload(file).await?;
        if size <= self.part_size {
            let body = pread(&opened, 0, size).await?;
            self.with_bucket(|| self.put_small(&key, body.clone()))
                .await?;
            progress.advance(size);
            return Ok(StoredState::named(pod, version));
        }
        // The condition is only checked when the upload completes: look first, so a number
        // taken by another writer does not cost a whole upload.
        if self.exists(&key).await? {
            return Err(RemoteError::AlreadyExists(format!(
                "{} on remote {:?}",
                self.object_url(&key),
                self.name
            )));
        }
        self.with_bucket(|| self.put_multipart(&key, &opened, Sizing::Known(size), &*progress))
            .await?;
        Ok(StoredState::named(pod, version))
    }

    /// Uploads the parts of the state zip as they are written: a large save's upload runs with
    /// its zip, not after it.
    async fn put_state_growing(
        &self,
        pod: &PodName,
        version: u64,
        file: &Path,
        mut growing: tokio::sync::watch::Receiver<Growing>,
        progress: Arc<dyn Progress>,
    ) -> RemoteResult<StoredState> {
        let first = self.part_size;
        let start = growing
            .wait_for(|g| g.end.is_some() || g.written > first)
            .await
            .map_err(|_| RemoteError::Cancelled)?
            .clone();
        if start.end.is_some() {
            return self.put_state(pod, version, file, progress).await;
        }
        let key = self.key(pod, ObjectKind::State, version);
        if self.exists(&key).await? {
            return Err(RemoteError::AlreadyExists(format!(
                "{} on remote {:?}",
                self.object_url(&key),
                self.name
            )));
        }
        let (opened, _) = open_to_upload(file).await?;
        tracing::debug!(remote = %self.name, key, "uploading the parts of the state object as they are written");
        self.with_bucket(|| {
            let sizing = Sizing::Growing(growing.clone());
            self.put_multipart(&key, &opened, sizing, &*progress)
        })
        .await?;
        Ok(StoredState::named(pod, version))
    }

    async fn commit_version(
        &self,
        pod: &PodName,
        version: u64,
        version_zip: Bytes,
        states: &[u64],
        new_state: Option<&StoredState>,
        _parent: Option<u64>,
    ) -> RemoteResult<()> {
        check_new_state(&self.name, pod, version, states, new_state)?;
        let key = self.key(pod, ObjectKind::Version, version);
        match self
            .with_bucket(|| self.put_small(&key, version_zip.clone()))
            .await
        {
            // A retried PUT whose first attempt did succeed also fails the condition: the object
            // is then ours, byte for byte (it holds a timestamp and the whole manifest).
            Err(RemoteError::AlreadyExists(what)) => match self.get(&key, &GetRange::Whole).await {
                Ok((existing, _)) if existing == version_zip => Ok(()),
                _ => Err(RemoteError::AlreadyExists(what)),
            },
            other => other,
        }
    }

    async fn delete_version(&self, pod: &PodName, version: u64) -> RemoteResult<()> {
        self.delete(&self.key(pod, ObjectKind::Version, version))
            .await
    }

    async fn delete_state(&self, pod: &PodName, state: u64) -> RemoteResult<()> {
        self.delete(&self.key(pod, ObjectKind::State, state)).await
    }
}

impl S3Remote {
    /// DeleteObject; a missing object or bucket is not an error.
    #[tracing::instrument(level = "debug", skip(self), fields(remote = %self.name))]
    async fn delete(&self, key: &str) -> RemoteResult<()> {
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match self.classify(e, key) {
                RemoteError::NotFound(_) => Ok(()),
                e => Err(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RemoteUrl, Secret};

    fn s3(url: &str) -> S3Url {
        match RemoteUrl::parse(url) {
            Ok(RemoteUrl::S3(s3)) => s3,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn debug_redacts_credentials() {
        let mut url = s3("s3://bucket/p/?endpoint=http://127.0.0.1:9&region=eu-west-1");
        url.access_key_id = Some(Secret::new("AKIAEXAMPLE"));
        url.secret_access_key = Some(Secret::new("hunter2-secret"));
        let r = S3Remote::new("r", &url).await.unwrap();
        let dbg = format!("{r:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(!dbg.contains("AKIAEXAMPLE"), "{dbg}");
        assert!(dbg.contains("eu-west-1"), "{dbg}");
        assert_eq!(
            r.key(&PodName::new("a-b").unwrap(), ObjectKind::State, 3),
            "p/localstack-pod-a-b-state-3.zip"
        );
    }

    fn chunks(parts: &[&'static [u8]]) -> impl futures::Stream<Item = Result<Bytes, String>> {
        futures::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    #[tokio::test]
    async fn body_is_joined_into_one_buffer() {
        let body = read_body(chunks(&[b"abc", b"", b"defg"]), Some(7), Some(7))
            .await
            .unwrap();
        assert_eq!(&body[..], b"abcdefg");
        // No length and no limit (a whole object sent chunked): grows as needed.
        let body = read_body(chunks(&[b"abc", b"defg"]), None, None)
            .await
            .unwrap();
        assert_eq!(&body[..], b"abcdefg");
        // Shorter than asked is not refused here: read_state reports the truncation.
        let body = read_body(chunks(&[b"abc"]), None, Some(10)).await.unwrap();
        assert_eq!(&body[..], b"abc");
    }

    #[tokio::test]
    async fn body_longer_than_asked_is_refused_as_it_arrives() {
        let err = read_body(chunks(&[b"abcd", b"efgh", b"ijkl"]), None, Some(6))
            .await
            .unwrap_err();
        assert!(
            matches!(err, BodyFailure::TooLong { got: 8, limit: 6 }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn body_longer_than_asked_by_its_length_is_not_read() {
        let unread = futures::stream::iter([Err::<Bytes, _>("the body was read".to_owned())]);
        let err = read_body(unread, Some(1 << 30), Some(8 << 20))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                BodyFailure::TooLong {
                    got: 1_073_741_824,
                    limit: 8_388_608
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn broken_body_can_be_retried() {
        let broken =
            futures::stream::iter([Ok(Bytes::from_static(b"ab")), Err("reset".to_owned())]);
        let err = read_body(broken, Some(4), Some(4)).await.unwrap_err();
        assert!(
            matches!(err, BodyFailure::Broken(ref e) if e == "reset"),
            "{err:?}"
        );
    }

    #[test]
    fn get_ranges_bound_their_bodies() {
        assert_eq!(GetRange::Whole.header(), None);
        assert_eq!(GetRange::Whole.limit(false), Some(MAX_VERSION_OBJECT));
        let tail = GetRange::Tail(256);
        assert_eq!(tail.header().as_deref(), Some("bytes=-256"));
        assert_eq!(tail.limit(true), Some(256));
        assert_eq!(
            tail.limit(false),
            Some(MAX_VERSION_OBJECT),
            "a whole version object is accepted, up to the limit"
        );
        let bytes = GetRange::Bytes(100..1100);
        assert_eq!(bytes.header().as_deref(), Some("bytes=100-1099"));
        assert_eq!(bytes.limit(true), Some(1000));
        assert_eq!(bytes.limit(false), Some(1000), "a whole object is refused");
    }

    /// A server that answers every request with `200 OK` and `body`, ignoring any `Range`:
    /// with a `Content-Length`, or chunked (4 KiB chunks) when `chunked`.
    fn range_ignoring_server(body: Vec<u8>, chunked: bool) -> u16 {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let head = if chunked {
                    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                        .to_owned()
                } else {
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                };
                let _ = stream.write_all(head.as_bytes());
                if chunked {
                    for piece in body.chunks(4096) {
                        let _ = write!(stream, "{:x}\r\n", piece.len());
                        let _ = stream.write_all(piece);
                        let _ = stream.write_all(b"\r\n");
                    }
                    let _ = stream.write_all(b"0\r\n\r\n");
                } else {
                    let _ = stream.write_all(&body);
                }
            }
        });
        port
    }

    async fn remote_at(port: u16) -> S3Remote {
        let mut url = s3(&format!("s3://bucket/?endpoint=http://127.0.0.1:{port}"));
        url.access_key_id = Some(Secret::new("test"));
        url.secret_access_key = Some(Secret::new("test"));
        S3Remote::new("ignoring", &url).await.unwrap()
    }

    #[tokio::test]
    async fn state_range_refuses_a_whole_object_sent_instead() {
        for chunked in [false, true] {
            let port = range_ignoring_server(vec![7; 256 << 10], chunked);
            let remote = remote_at(port).await;
            let pod = PodName::new("p").unwrap();
            let err = remote.read_state(&pod, 1, 1, 1000..2000).await.unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, RemoteError::Other { .. }), "{msg}");
            assert!(msg.contains("where 1000 were asked for"), "{msg}");
            assert!(msg.contains("bytes=1000-1999"), "{msg}");
        }
    }

    #[tokio::test]
    async fn version_tail_accepts_a_whole_object_sent_instead() {
        // A server that ignores ranges still serves whole version objects (read whole anyway).
        let body: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let port = range_ignoring_server(body.clone(), false);
        let remote = remote_at(port).await;
        let pod = PodName::new("p").unwrap();
        assert_eq!(remote.read_version(&pod, 1).await.unwrap(), body);
    }

    #[test]
    fn error_chains_skip_repeats() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let outer = RemoteError::io("connecting")(inner);
        assert_eq!(cause_chain(&outer), "connecting: refused");
        assert_eq!(root_cause(&outer), "refused");
    }
}
