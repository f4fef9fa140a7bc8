//! The registry client of the `oras://` backend: `oci_client::Client` wrapped with retries, error
//! classification and explicit authentication, plus the two requests oci-client cannot make.
//!
//! - [`Registry::call`] runs one oci-client call (rebuilt for each attempt, each attempt under a
//!   time limit), retrying connection failures, timeouts, `429` and `5xx` with exponential
//!   backoff at most
//!   [`RegistryConfig::attempts`] times, then [`RemoteError::Unavailable`] ("giving up after N
//!   attempts"). Its errors are classified into [`RemoteError`] here: `OciDistributionError`
//!   never leaves `src/remote/`.
//! - [`Registry::login`] calls `Client::auth` (Basic, or the bearer token flow) once per
//!   repository and operation before the first request: oci-client's other calls fetch missing
//!   tokens on their own but drop the error (and blob reads do not store credentials at all), so
//!   a wrong password would surface as an anonymous `401` with no cause.
//! - [`Registry::send_scoped`] is hand-written HTTP for what oci-client lacks: it can only ask for
//!   `pull` and `pull,push` tokens, so it cannot list the catalog (`registry:catalog:*`) or delete
//!   a manifest (`delete`, and it has no delete call at all). It answers the registry's Basic or
//!   Bearer challenge for the scope it needs, on the registry's own URLs only.
//!
//! The password and tokens are never logged and are redacted in `Debug` (oci-client redacts its
//! own `RegistryAuth` and tokens too, and never sends credentials to another host).

use std::collections::HashSet;
use std::future::Future;
use std::sync::Mutex;

use crate::term::cause_chain;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use reqwest::header::WWW_AUTHENTICATE;
use reqwest::{Method, Response, StatusCode};

use crate::config::{OrasUrl, Secret};
use crate::remote::{RemoteError, RemoteResult};

/// How the client talks to a registry.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Tries per call (the first one included) before giving up as unavailable.
    pub attempts: u32,
    /// Wait before the first retry; doubled after each one.
    pub backoff: Duration,
    /// Cap on one wait.
    pub max_backoff: Duration,
    pub connect_timeout: Duration,
    /// Limit on one attempt of a call that does not upload a blob, response body included.
    pub request_timeout: Duration,
    /// A blob upload (or a whole-blob download, from a registry that ignores `Range`) may take
    /// `upload_timeout_base` plus one second per `upload_min_rate` bytes.
    pub upload_timeout_base: Duration,
    /// Bytes per second an upload must at least reach, for its time limit.
    pub upload_min_rate: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            attempts: 5,
            backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(300),
            upload_timeout_base: Duration::from_secs(300),
            upload_min_rate: 1 << 20,
        }
    }
}

type OciResult<T> = Result<T, OciDistributionError>;

pub struct Registry {
    /// The remote's configured name, for messages.
    remote: String,
    /// `host[:port]`, as in references.
    host: String,
    /// `http://host:port` or `https://host`.
    base: String,
    pub oci: Client,
    pub auth: RegistryAuth,
    username: Option<String>,
    password: Option<Secret>,
    /// For [`Registry::send_scoped`] only.
    http: reqwest::Client,
    /// `(repository, push)` pairs `Client::auth` succeeded for. Short lock sections only.
    logged_in: Mutex<HashSet<(String, bool)>>,
    config: RegistryConfig,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("base", &self.base)
            .field("username", &self.username)
            .field("password", &self.password)
            .finish_non_exhaustive()
    }
}

/// What a failed attempt means.
enum Failure {
    /// Worth another attempt.
    Transient(String),
    Final(RemoteError),
}

impl Registry {
    pub fn new(remote: &str, url: &OrasUrl, config: RegistryConfig) -> RemoteResult<Self> {
        let (protocol, scheme) = if url.plain_http {
            (ClientProtocol::Http, "http")
        } else {
            (ClientProtocol::Https, "https")
        };
        let user_agent = concat!("podfs/", env!("CARGO_PKG_VERSION"));
        let oci = Client::try_from(ClientConfig {
            protocol,
            // One POST and one streamed PUT per blob (the default is a PATCH per 4 MiB chunk).
            use_monolithic_push: true,
            connect_timeout: Some(config.connect_timeout),
            // Not `read_timeout`: reqwest runs it from the start of the request to the response
            // headers, so it would cut long uploads. `Registry::call` limits each attempt.
            user_agent,
            ..Default::default()
        });
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .user_agent(user_agent)
            .build();
        let (oci, http) = match (oci, http) {
            (Ok(o), Ok(h)) => (o, h),
            (Err(e), _) => return Err(other(remote, format!("cannot create a client: {e}"))),
            (_, Err(e)) => return Err(other(remote, format!("cannot create a client: {e}"))),
        };
        let auth = match &url.username {
            Some(u) => RegistryAuth::Basic(
                u.clone(),
                url.password
                    .as_ref()
                    .map(|p| p.expose().to_owned())
                    .unwrap_or_default(),
            ),
            None => RegistryAuth::Anonymous,
        };
        Ok(Self {
            remote: remote.to_owned(),
            host: url.registry.clone(),
            base: format!("{scheme}://{}", url.registry),
            oci,
            auth,
            username: url.username.clone(),
            password: url.password.clone(),
            http,
            logged_in: Mutex::new(HashSet::new()),
            config,
        })
    }

    /// `HOST/repo:tag`.
    pub fn reference(&self, repo: &str, tag: &str) -> Reference {
        Reference::with_tag(self.host.clone(), repo.to_owned(), tag.to_owned())
    }

    pub fn other(&self, detail: impl Into<String>) -> RemoteError {
        other(&self.remote, detail.into())
    }

    /// Authenticates for `op` on `reference`'s repository, once per process.
    pub async fn login(&self, reference: &Reference, op: RegistryOperation) -> RemoteResult<()> {
        let key = (
            reference.repository().to_owned(),
            matches!(op, RegistryOperation::Push),
        );
        if lock(&self.logged_in).contains(&key) {
            return Ok(());
        }
        let what = format!("authenticating for {}", reference.repository());
        self.call(&what, || self.oci.auth(reference, &self.auth, op))
            .await?;
        lock(&self.logged_in).insert(key);
        Ok(())
    }

    /// Runs `attempt` until it succeeds, fails for good, or fails transiently (including
    /// running over [`RegistryConfig::request_timeout`]) [`RegistryConfig::attempts`] times.
    pub async fn call<T, F, Fut>(&self, what: &str, attempt: F) -> RemoteResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = OciResult<T>>,
    {
        self.call_within(what, self.config.request_timeout, attempt)
            .await
    }

    /// [`Registry::call`] for an upload of `size` bytes, with a time limit that grows with it.
    pub async fn call_upload<T, F, Fut>(&self, what: &str, size: u64, attempt: F) -> RemoteResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = OciResult<T>>,
    {
        self.call_within(what, self.sized_limit(size), attempt)
            .await
    }

    /// [`Registry::call`] for a download of a whole blob of `size` bytes, with the time limit
    /// of an upload of that size.
    pub async fn call_download<T, F, Fut>(
        &self,
        what: &str,
        size: u64,
        attempt: F,
    ) -> RemoteResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = OciResult<T>>,
    {
        self.call_within(what, self.sized_limit(size), attempt)
            .await
    }

    /// [`RegistryConfig::upload_timeout_base`] plus one second per
    /// [`RegistryConfig::upload_min_rate`] bytes of `size`.
    fn sized_limit(&self, size: u64) -> Duration {
        self.config.upload_timeout_base
            + Duration::from_secs(size / self.config.upload_min_rate.max(1))
    }

    async fn call_within<T, F, Fut>(
        &self,
        what: &str,
        limit: Duration,
        mut attempt: F,
    ) -> RemoteResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = OciResult<T>>,
    {
        let mut delay = self.config.backoff;
        let attempts = self.config.attempts.max(1);
        for n in 1.. {
            let detail = match tokio::time::timeout(limit, attempt()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => match self.classify(what, e) {
                    Failure::Final(e) => return Err(e),
                    Failure::Transient(detail) => detail,
                },
                Err(_) => format!("no answer within {limit:?}"),
            };
            if n >= attempts {
                return Err(RemoteError::Unavailable {
                    remote: self.remote.clone(),
                    detail: format!(
                        "{what}: giving up after {n} attempts: {detail} ({})",
                        self.base
                    ),
                });
            }
            tracing::warn!(remote = %self.remote, attempt = n, "{what} failed, retrying in {delay:?}: {detail}");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.config.max_backoff);
        }
        unreachable!("the loop returns")
    }

    fn classify(&self, what: &str, e: OciDistributionError) -> Failure {
        use OciDistributionError as E;
        let detail = cause_chain(&e);
        let status = match &e {
            E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => Some(401),
            E::ServerError { code, .. } => Some(*code),
            E::RequestError(r) => r.status().map(|s| s.as_u16()),
            E::RegistryError { envelope, .. } => envelope.errors.iter().find_map(|o| {
                Some(match o.code {
                    OciErrorCode::Unauthorized => 401,
                    OciErrorCode::Denied => 403,
                    OciErrorCode::Toomanyrequests => 429,
                    OciErrorCode::BlobUnknown
                    | OciErrorCode::ManifestUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::NotFound => 404,
                    _ => return None,
                })
            }),
            _ => None,
        };
        Failure::Final(match status {
            Some(401) => self.wrong_credentials(what),
            Some(403) => RemoteError::Denied {
                remote: self.remote.clone(),
                detail: format!("{what}: forbidden (HTTP 403); the user may lack permission"),
            },
            Some(404) => RemoteError::NotFound(format!("{what}: {detail}")),
            Some(429 | 500..=599) => return Failure::Transient(detail),
            _ => match &e {
                E::RequestError(r) if r.is_connect() || r.is_timeout() || r.is_request() => {
                    return Failure::Transient(detail);
                }
                E::RequestError(r) if r.is_body() || r.is_decode() => {
                    return Failure::Transient(detail);
                }
                // Body streams of oci-client surface transfer errors as I/O errors.
                E::IoError(_) => return Failure::Transient(detail),
                _ => self.other(format!("{what}: {detail}")),
            },
        })
    }

    fn wrong_credentials(&self, what: &str) -> RemoteError {
        let detail = if self.username.is_some() {
            format!(
                "wrong user or password for remote {:?} ({what})",
                self.remote
            )
        } else {
            format!(
                "remote {:?} requires a user and password ({what}): use oras://{{oras_username}}:{{oras_password}}@HOST/NAMESPACE",
                self.remote
            )
        };
        RemoteError::Denied {
            remote: self.remote.clone(),
            detail,
        }
    }

    /// Sends `method` to `base + path` with credentials for `scope`, answering the registry's
    /// Basic or Bearer challenge. `429`, `5xx` and auth failures become errors for
    /// [`Registry::call`]; other statuses are the caller's to read.
    pub async fn send_scoped(
        &self,
        method: Method,
        path: &str,
        scope: &str,
    ) -> OciResult<Response> {
        let url = format!("{}{path}", self.base);
        let resp = self.http.request(method.clone(), &url).send().await?;
        let resp = if resp.status() == StatusCode::UNAUTHORIZED {
            let challenge = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let req = self.http.request(method, &url);
            let req = match (parse_challenge(challenge), &self.username) {
                (Challenge::Basic, Some(user)) => {
                    req.basic_auth(user, self.password.as_ref().map(Secret::expose))
                }
                (Challenge::Bearer(params), _) => {
                    let token = self.fetch_token(&params, scope).await?;
                    req.bearer_auth(token.expose())
                }
                _ => return Err(OciDistributionError::UnauthorizedError { url }),
            };
            req.send().await?
        } else {
            resp
        };
        let code = resp.status().as_u16();
        if matches!(code, 401 | 403 | 429 | 500..=599) {
            let message = resp.text().await.unwrap_or_default();
            return Err(OciDistributionError::ServerError { code, url, message });
        }
        Ok(resp)
    }

    /// A token for `scope` (and whatever the challenge named) from the challenge's realm.
    async fn fetch_token(&self, challenge: &BearerParams, scope: &str) -> OciResult<Secret> {
        let mut query = vec![("scope", scope)];
        if let Some(wanted) = challenge.scope.as_deref().filter(|w| *w != scope) {
            query.push(("scope", wanted));
        }
        if let Some(service) = &challenge.service {
            query.push(("service", service));
        }
        let mut req = self.http.get(&challenge.realm).query(&query);
        if let Some(user) = &self.username {
            req = req.basic_auth(user, self.password.as_ref().map(Secret::expose));
        }
        let resp = req.send().await?;
        let status = resp.status();
        let body = resp.bytes().await?;
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(OciDistributionError::AuthenticationFailure(format!(
                "the token service {} answered HTTP {status}",
                challenge.realm
            )));
        }
        if !status.is_success() {
            return Err(OciDistributionError::ServerError {
                code: status.as_u16(),
                url: challenge.realm.clone(),
                message: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: TokenResponse = serde_json::from_slice(&body)?;
        t.token.or(t.access_token).map(Secret::new).ok_or_else(|| {
            OciDistributionError::RegistryTokenDecodeError("no token in the answer".into())
        })
    }
}

fn other(remote: &str, detail: String) -> RemoteError {
    RemoteError::Other {
        remote: remote.to_owned(),
        detail,
    }
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, PartialEq, Eq)]
struct BearerParams {
    realm: String,
    service: Option<String>,
    scope: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
enum Challenge {
    Basic,
    Bearer(BearerParams),
    Unknown,
}

/// Parses `WWW-Authenticate: Bearer realm="..",service="..",scope=".."` or `Basic realm=".."`.
fn parse_challenge(header: &str) -> Challenge {
    let header = header.trim();
    let (scheme, mut rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Challenge::Basic;
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Challenge::Unknown;
    }
    let (mut realm, mut service, mut scope) = (None, None, None);
    while let Some((key, after)) = rest.split_once('=') {
        let key = key.trim_matches([',', ' ']).to_ascii_lowercase();
        let (value, after) = match after.strip_prefix('"') {
            Some(q) => q.split_once('"').unwrap_or((q, "")),
            None => after.split_once(',').unwrap_or((after, "")),
        };
        let value = Some(value.to_owned());
        match key.as_str() {
            "realm" => realm = value,
            "service" => service = value,
            "scope" => scope = value,
            _ => {}
        }
        rest = after;
    }
    match realm {
        Some(realm) => Challenge::Bearer(BearerParams {
            realm,
            service,
            scope,
        }),
        None => Challenge::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(user: Option<&str>) -> Registry {
        let url = OrasUrl {
            registry: "127.0.0.1:5000".into(),
            namespace: "ns".into(),
            username: user.map(str::to_owned),
            password: user.map(|_| Secret::new("pw")),
            plain_http: true,
        };
        Registry::new("r", &url, RegistryConfig::default()).unwrap()
    }

    fn classify(reg: &Registry, e: OciDistributionError) -> Result<String, RemoteError> {
        match reg.classify("doing it", e) {
            Failure::Transient(d) => Ok(d),
            Failure::Final(e) => Err(e),
        }
    }

    #[test]
    fn errors_are_classified() {
        use OciDistributionError as E;
        let server = |code| E::ServerError {
            code,
            url: "u".into(),
            message: "m".into(),
        };
        let reg = registry(Some("me"));
        for code in [429, 500, 503] {
            assert!(classify(&reg, server(code)).is_ok(), "{code}");
        }
        assert!(classify(&reg, E::IoError(std::io::Error::other("reset"))).is_ok());
        let denied = classify(&reg, E::UnauthorizedError { url: "u".into() }).unwrap_err();
        assert!(
            denied
                .to_string()
                .contains("wrong user or password for remote \"r\""),
            "{denied}"
        );
        let envelope: oci_client::errors::OciEnvelope =
            serde_json::from_str(r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"x"}]}"#)
                .unwrap();
        let missing = E::RegistryError {
            envelope,
            url: "u".into(),
        };
        assert!(matches!(
            classify(&reg, missing),
            Err(RemoteError::NotFound(_))
        ));
        assert!(matches!(
            classify(&reg, server(404)),
            Err(RemoteError::NotFound(_))
        ));
        assert!(matches!(
            classify(&reg, server(403)),
            Err(RemoteError::Denied { .. })
        ));
        assert!(matches!(
            classify(&reg, server(400)),
            Err(RemoteError::Other { .. })
        ));
        let anon = classify(&registry(None), E::UnauthorizedError { url: "u".into() });
        assert!(
            anon.unwrap_err()
                .to_string()
                .contains("requires a user and password"),
        );
    }

    #[test]
    fn challenges_parse() {
        assert_eq!(parse_challenge("Basic realm=\"x\""), Challenge::Basic);
        assert_eq!(
            parse_challenge(
                "Bearer realm=\"https://auth.docker.io/token\",service=\"registry.docker.io\",scope=\"repository:a/b:pull,push\""
            ),
            Challenge::Bearer(BearerParams {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge("Bearer realm=https://r/t,service=s"),
            Challenge::Bearer(BearerParams {
                realm: "https://r/t".into(),
                service: Some("s".into()),
                scope: None,
            })
        );
        assert_eq!(parse_challenge(""), Challenge::Unknown);
        assert_eq!(parse_challenge("Negotiate"), Challenge::Unknown);
    }
}
