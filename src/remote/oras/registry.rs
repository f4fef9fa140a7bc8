//! A small OCI distribution client: every HTTP request of the `oras://` backend goes through
//! [`Registry::send`], which adds credentials, follows the auth challenge and retries.
//!
//! Auth: requests go out anonymously (or with a cached token) first. A `401` tells us what the
//! registry wants: `WWW-Authenticate: Basic` means our user and password on every request from
//! then on; `WWW-Authenticate: Bearer realm=..,service=..,scope=..` means a token fetched from the
//! realm (with our user and password, if any) for that scope, cached per scope. A second `401`
//! after that, or a `403`, is [`RemoteError::Denied`].
//!
//! Retries: connection failures, timeouts, `429` and `5xx` are retried with exponential backoff,
//! at most [`RegistryConfig::attempts`] times, then reported as [`RemoteError::Unavailable`].
//! Every request is rebuilt for each attempt (a streamed upload reopens its file).
//!
//! Secrets (the password and tokens) are never logged and are redacted in `Debug`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue, WWW_AUTHENTICATE};
use reqwest::{RequestBuilder, Response, StatusCode};

use crate::config::{OrasUrl, Secret};
use crate::remote::{RemoteError, RemoteResult};

/// How the client talks to a registry.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Tries per request (the first one included) before giving up as unavailable.
    pub attempts: u32,
    /// Wait before the first retry; doubled after each one.
    pub backoff: Duration,
    /// Cap on one wait.
    pub max_backoff: Duration,
    pub connect_timeout: Duration,
    /// Limit on one request that does not upload a blob, response body included.
    pub request_timeout: Duration,
    /// A blob upload may take `upload_timeout_base` plus one second per `upload_min_rate` bytes.
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

/// Builds one attempt of a request.
pub type BuildRequest<'a> =
    dyn Fn(&reqwest::Client) -> BoxFuture<'a, RemoteResult<RequestBuilder>> + Send + Sync + 'a;

pub struct Registry {
    /// The remote's configured name, for messages.
    remote: String,
    /// `http://host:port` or `https://host`.
    pub base: String,
    http: reqwest::Client,
    username: Option<String>,
    password: Option<Secret>,
    /// The registry answered `WWW-Authenticate: Basic`: send the user and password every time.
    basic: AtomicBool,
    /// `Authorization: Basic ...` for our user and password, if we have them.
    basic_header: Option<HeaderValue>,
    /// Bearer tokens by scope. Short critical sections only, never held across `.await`.
    tokens: Mutex<HashMap<String, Secret>>,
    config: RegistryConfig,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("remote", &self.remote)
            .field("base", &self.base)
            .field("username", &self.username)
            .field("password", &self.password)
            .finish_non_exhaustive()
    }
}

impl Registry {
    pub fn new(remote: &str, url: &OrasUrl, config: RegistryConfig) -> RemoteResult<Self> {
        let scheme = if url.plain_http { "http" } else { "https" };
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            // Not `read_timeout`: in reqwest it runs from the start of the request to the
            // response headers, so it would cut long uploads. Limits are set per request.
            .tcp_keepalive(Duration::from_secs(30))
            .user_agent(concat!("podfs/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| RemoteError::Other {
                remote: remote.to_owned(),
                detail: format!("cannot create an HTTP client: {e}"),
            })?;
        // reqwest encodes Basic credentials; borrow its encoding once.
        let basic_header = match &url.username {
            Some(user) => http
                .get(format!("{scheme}://{}/", url.registry))
                .basic_auth(user, url.password.as_ref().map(|p| p.expose()))
                .build()
                .ok()
                .and_then(|r| r.headers().get(AUTHORIZATION).cloned()),
            None => None,
        };
        Ok(Self {
            basic_header,
            remote: remote.to_owned(),
            base: format!("{scheme}://{}", url.registry),
            http,
            username: url.username.clone(),
            password: url.password.clone(),
            basic: AtomicBool::new(false),
            tokens: Mutex::new(HashMap::new()),
            config,
        })
    }

    /// `base` + `path` (path starts with `/v2/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn other(&self, detail: impl Into<String>) -> RemoteError {
        RemoteError::Other {
            remote: self.remote.clone(),
            detail: detail.into(),
        }
    }

    fn denied(&self, detail: impl Into<String>) -> RemoteError {
        RemoteError::Denied {
            remote: self.remote.clone(),
            detail: detail.into(),
        }
    }

    fn wrong_credentials(&self, what: &str) -> RemoteError {
        if self.username.is_some() {
            self.denied(format!(
                "wrong user or password for remote {:?} ({what})",
                self.remote
            ))
        } else {
            self.denied(format!(
                "remote {:?} requires a user and password ({what}): use oras://{{oras_username}}:{{oras_password}}@HOST/NAMESPACE",
                self.remote
            ))
        }
    }

    /// Sends a request built by `build` with auth `scope` (e.g. `repository:ns/p:pull`), retrying
    /// transient failures. Returns any response that is not an auth failure, a `429` or a `5xx`:
    /// the caller interprets `2xx`/`404`/other codes.
    pub async fn send(
        &self,
        what: &str,
        scope: &str,
        build: &BuildRequest<'_>,
    ) -> RemoteResult<Response> {
        self.send_with_timeout(what, scope, build, self.config.request_timeout)
            .await
    }

    /// [`Registry::send`] for an upload of `size` bytes, with a time limit that grows with it.
    pub async fn send_upload(
        &self,
        what: &str,
        scope: &str,
        size: u64,
        build: &BuildRequest<'_>,
    ) -> RemoteResult<Response> {
        let limit = self.config.upload_timeout_base
            + Duration::from_secs(size / self.config.upload_min_rate.max(1));
        self.send_with_timeout(what, scope, build, limit).await
    }

    async fn send_with_timeout(
        &self,
        what: &str,
        scope: &str,
        build: &BuildRequest<'_>,
        timeout: Duration,
    ) -> RemoteResult<Response> {
        let mut delay = self.config.backoff;
        let mut auth_retried = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let last = attempt >= self.config.attempts.max(1);
            let (client, req) = build(&self.http).await?.build_split();
            let mut req = req.map_err(|e| self.other(format!("{what}: {}", error_chain(&e))))?;
            // Credentials go only to the registry itself, never to a host an upload Location or
            // a redirect names.
            if same_origin(req.url(), &self.base) {
                self.authorize(req.headers_mut(), scope);
            }
            *req.timeout_mut() = Some(timeout);
            let failure = match client.execute(req).await {
                Ok(resp) => match resp.status() {
                    StatusCode::UNAUTHORIZED => {
                        if auth_retried {
                            return Err(self.wrong_credentials(what));
                        }
                        auth_retried = true;
                        self.answer_challenge(what, scope, resp.headers()).await?;
                        attempt -= 1; // an auth round trip is not a failed attempt
                        continue;
                    }
                    StatusCode::FORBIDDEN => {
                        return Err(self.denied(format!(
                            "{what}: forbidden (HTTP 403); the user may lack permission for {scope}"
                        )));
                    }
                    s if s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error() => {
                        let body = resp.text().await.unwrap_or_default();
                        format!("HTTP {s}: {}", body.trim())
                    }
                    _ => return Ok(resp),
                },
                Err(e) if e.is_connect() || e.is_timeout() || e.is_request() || e.is_body() => {
                    error_chain(&e)
                }
                Err(e) => return Err(self.other(format!("{what}: {}", error_chain(&e)))),
            };
            if last {
                return Err(RemoteError::Unavailable {
                    remote: self.remote.clone(),
                    detail: format!(
                        "{what} failed {attempt} times, giving up: {failure} ({})",
                        self.base
                    ),
                });
            }
            tracing::warn!(remote = %self.remote, attempt, "{what} failed, retrying in {delay:?}: {failure}");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.config.max_backoff);
        }
    }

    /// Adds the cached token for `scope`, or Basic credentials once the registry asked for them.
    fn authorize(&self, headers: &mut HeaderMap, scope: &str) {
        let token = self
            .tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(scope)
            .cloned();
        let value = match token {
            Some(t) => HeaderValue::from_str(&format!("Bearer {}", t.expose())).ok(),
            None if self.basic.load(Ordering::Relaxed) => self.basic_header.clone(),
            None => None,
        };
        if let Some(mut v) = value {
            v.set_sensitive(true);
            headers.insert(AUTHORIZATION, v);
        }
    }

    /// Reacts to a `401`: switch to Basic, or fetch a bearer token for `scope`.
    async fn answer_challenge(
        &self,
        what: &str,
        scope: &str,
        headers: &HeaderMap,
    ) -> RemoteResult<()> {
        let challenge = headers
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        match parse_challenge(challenge) {
            Challenge::Basic => {
                if self.username.is_none() || self.basic.swap(true, Ordering::Relaxed) {
                    return Err(self.wrong_credentials(what));
                }
                Ok(())
            }
            Challenge::Bearer {
                realm,
                service,
                scope: wanted,
            } => {
                // Ask for what this request needs and what the registry named, in one token.
                let mut scopes = vec![scope];
                if let Some(w) = wanted.as_deref().filter(|w| *w != scope) {
                    scopes.push(w);
                }
                let token = self
                    .fetch_token(what, &realm, service.as_deref(), &scopes)
                    .await?;
                self.tokens
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(scope.to_owned(), token);
                Ok(())
            }
            Challenge::Unknown => Err(self.wrong_credentials(what)),
        }
    }

    async fn fetch_token(
        &self,
        what: &str,
        realm: &str,
        service: Option<&str>,
        scopes: &[&str],
    ) -> RemoteResult<Secret> {
        let mut query: Vec<(&str, &str)> = scopes.iter().map(|s| ("scope", *s)).collect();
        if let Some(s) = service {
            query.push(("service", s));
        }
        let mut delay = self.config.backoff;
        for attempt in 1..=self.config.attempts.max(1) {
            let mut req = self
                .http
                .get(realm)
                .query(&query)
                .timeout(self.config.request_timeout);
            if let Some(user) = &self.username {
                req = req.basic_auth(user, self.password.as_ref().map(|p| p.expose()));
            }
            let failure = match req.send().await {
                Ok(resp) if resp.status().is_success() => {
                    let body: TokenResponse = read_json(resp).await.map_err(|e| {
                        self.other(format!("{what}: unreadable token from {realm}: {e}"))
                    })?;
                    return body
                        .token
                        .or(body.access_token)
                        .map(Secret::new)
                        .ok_or_else(|| {
                            self.other(format!(
                                "{what}: the token service {realm} returned no token"
                            ))
                        });
                }
                Ok(resp)
                    if matches!(
                        resp.status(),
                        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
                    ) =>
                {
                    return Err(self.wrong_credentials(what));
                }
                Ok(resp) if resp.status().is_server_error() => format!("HTTP {}", resp.status()),
                Ok(resp) => {
                    return Err(self.other(format!(
                        "{what}: the token service {realm} answered HTTP {}",
                        resp.status()
                    )));
                }
                Err(e) => error_chain(&e),
            };
            if attempt == self.config.attempts.max(1) {
                return Err(RemoteError::Unavailable {
                    remote: self.remote.clone(),
                    detail: format!("{what}: the token service {realm} failed: {failure}"),
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.config.max_backoff);
        }
        Err(self.other(format!("{what}: no token from {realm}")))
    }
}

/// Reads a JSON body (reqwest's `json` feature is not enabled, to stay with oci-client's build).
pub async fn read_json<T: serde::de::DeserializeOwned>(resp: Response) -> Result<T, String> {
    let bytes = resp.bytes().await.map_err(|e| error_chain(&e))?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Unknown,
}

/// Parses `WWW-Authenticate: Bearer realm="..",service="..",scope=".."` or `Basic realm=".."`.
fn parse_challenge(header: &str) -> Challenge {
    let header = header.trim();
    let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Challenge::Basic;
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Challenge::Unknown;
    }
    let mut map: HashMap<String, String> = HashMap::new();
    let mut rest = params.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let (value, after) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        map.insert(key, value.to_owned());
        rest = after.trim_start_matches([',', ' ']);
    }
    match map.remove("realm") {
        Some(realm) => Challenge::Bearer {
            realm,
            service: map.remove("service"),
            scope: map.remove("scope"),
        },
        None => Challenge::Unknown,
    }
}

/// Whether `url` has the scheme, host and port of `base` (`http://host[:port]`).
fn same_origin(url: &reqwest::Url, base: &str) -> bool {
    reqwest::Url::parse(base).is_ok_and(|b| b.origin() == url.origin())
}

/// An error and its sources on one line (reqwest hides the cause, e.g. "connection refused").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        source = cause.source();
    }
    s
}

/// The `rel="next"` target of a `Link` header, resolved against `base`.
pub fn next_link(headers: &HeaderMap, base: &str) -> Option<String> {
    let link = headers.get(reqwest::header::LINK)?.to_str().ok()?;
    for part in link.split(',') {
        let (target, params) = part.split_once(';').unwrap_or((part, ""));
        if params.contains("rel=\"next\"") || params.contains("rel=next") {
            let target = target.trim().trim_start_matches('<').trim_end_matches('>');
            return Some(
                if target.starts_with("http://") || target.starts_with("https://") {
                    target.to_owned()
                } else {
                    format!("{base}{target}")
                },
            );
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        assert_eq!(parse_challenge("Basic realm=\"x\""), Challenge::Basic);
        assert_eq!(
            parse_challenge(
                "Bearer realm=\"https://auth.docker.io/token\",service=\"registry.docker.io\",scope=\"repository:a/b:pull,push\""
            ),
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:a/b:pull,push".into()),
            }
        );
        assert_eq!(
            parse_challenge("Bearer realm=https://r/t,service=s"),
            Challenge::Bearer {
                realm: "https://r/t".into(),
                service: Some("s".into()),
                scope: None,
            }
        );
        assert_eq!(parse_challenge(""), Challenge::Unknown);
        assert_eq!(parse_challenge("Negotiate"), Challenge::Unknown);
    }

    #[test]
    fn credentials_stay_with_the_registry() {
        let u = |s: &str| reqwest::Url::parse(s).unwrap();
        assert!(same_origin(
            &u("http://127.0.0.1:5000/v2/x"),
            "http://127.0.0.1:5000"
        ));
        assert!(same_origin(
            &u("https://r.example/v2/"),
            "https://r.example"
        ));
        assert!(!same_origin(
            &u("https://s3.example/blob"),
            "https://r.example"
        ));
        assert!(!same_origin(
            &u("http://r.example/v2/"),
            "https://r.example"
        ));
        assert!(!same_origin(
            &u("http://127.0.0.1:5001/v2/"),
            "http://127.0.0.1:5000"
        ));
    }

    #[test]
    fn next_links_resolve() {
        let mut h = HeaderMap::new();
        h.insert(
            reqwest::header::LINK,
            "</v2/_catalog?last=ns%2Fb&n=2>; rel=\"next\""
                .parse()
                .unwrap(),
        );
        assert_eq!(
            next_link(&h, "http://127.0.0.1:5000").as_deref(),
            Some("http://127.0.0.1:5000/v2/_catalog?last=ns%2Fb&n=2")
        );
        assert_eq!(next_link(&HeaderMap::new(), "http://x"), None);
    }
}
