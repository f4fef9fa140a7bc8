//! Configuration: the volume dir, `remotes.toml`, and remote URL templates.
//!
//! This is the only module that reads environment variables (besides `main.rs` for logging).
//! Remote URLs are stored verbatim as templates: a `{placeholder}` is resolved from an environment
//! variable only when the remote is used, so a resolved secret never reaches `remotes.toml`:
//! `{access_key_id}`, `{secret_access_key}` and `{session_token}` read the standard
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`; any other `{name}` reads
//! `NAME` (upper-cased), e.g. `{oras_password}` reads `ORAS_PASSWORD`. An `s3://` URL without an
//! `endpoint=` takes `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`, when set, and an HTTPS one
//! takes `AWS_CA_BUNDLE` (never a plain-HTTP one: there is no TLS to configure). Types that hold
//! resolved secrets redact them in `Debug`.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Serialize};

/// The name of the built-in remote that always exists.
pub const DEFAULT_REMOTE: &str = "default";

/// Errors about configuration: names, URLs, placeholders and `remotes.toml`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "invalid remote name {0:?}: use letters, digits, '-' and '_' (at most 64 characters), starting with a letter or digit"
    )]
    InvalidRemoteName(String),
    #[error("remote {0:?} already exists: delete it first with `podfs remote delete {0}`")]
    DuplicateRemote(String),
    #[error("remote {0:?} does not exist: `podfs remote list` shows the configured remotes")]
    UnknownRemote(String),
    #[error("the built-in remote \"default\" cannot be added, replaced or deleted")]
    DefaultRemote,
    #[error("invalid remote URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error(
        "remote {remote:?} needs the environment variable {var} (for the placeholder {{{placeholder}}} in its URL): export {var}=... and try again"
    )]
    MissingVariable {
        remote: String,
        placeholder: String,
        var: String,
    },
    #[error("cannot find the volume dir: set PODFS_HOME (or HOME / XDG_DATA_HOME)")]
    NoVolumeDir,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid remotes file: {reason} (fix or remove it)")]
    BadRemotesFile { path: PathBuf, reason: String },
}

type Result<T> = std::result::Result<T, ConfigError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ConfigError + '_ {
    move |source| ConfigError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The volume dir: `remotes.toml`, the default remote's objects, cache and staging.
#[derive(Debug, Clone)]
pub struct VolumeDir {
    root: PathBuf,
}

impl VolumeDir {
    /// `$PODFS_HOME`, else `$XDG_DATA_HOME/podfs`, else `~/.local/share/podfs`.
    pub fn from_env() -> Result<Self> {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let root = if let Some(home) = var("PODFS_HOME") {
            PathBuf::from(home)
        } else if let Some(xdg) = var("XDG_DATA_HOME") {
            PathBuf::from(xdg).join("podfs")
        } else if let Some(home) = var("HOME") {
            PathBuf::from(home).join(".local/share/podfs")
        } else {
            return Err(ConfigError::NoVolumeDir);
        };
        Ok(Self { root })
    }

    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn remotes_file(&self) -> PathBuf {
        self.root.join("remotes.toml")
    }
    /// Where the `default` remote keeps its objects.
    pub fn default_pods_dir(&self) -> PathBuf {
        self.root.join("pods")
    }
    /// Scratch space for saves in progress (state zips before upload).
    pub fn staging_dir(&self) -> PathBuf {
        self.root.join("staging")
    }
}

/// One configured remote: a name and its URL template, stored verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteEntry {
    pub url: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RemotesToml {
    #[serde(default)]
    remotes: BTreeMap<String, RemoteEntry>,
}

/// The configured remotes, as kept in `remotes.toml` (mode 0600).
#[derive(Debug)]
pub struct Remotes {
    path: PathBuf,
    file: RemotesToml,
}

impl Remotes {
    pub fn load(volume: &VolumeDir) -> Result<Self> {
        let path = volume.remotes_file();
        let file = match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| ConfigError::BadRemotesFile {
                path: path.clone(),
                reason: e.message().to_owned(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => RemotesToml::default(),
            Err(e) => return Err(io_err(&path)(e)),
        };
        Ok(Self { path, file })
    }

    /// All remotes, `default` first, as (name, URL template).
    pub fn list(&self, volume: &VolumeDir) -> Vec<(String, String)> {
        let default_url = format!("file://{}", volume.default_pods_dir().display());
        std::iter::once((DEFAULT_REMOTE.to_owned(), default_url))
            .chain(
                self.file
                    .remotes
                    .iter()
                    .map(|(k, v)| (k.clone(), v.url.clone())),
            )
            .collect()
    }

    /// The URL template of `name`; `default` is the volume dir's `pods/`.
    pub fn template(&self, volume: &VolumeDir, name: &str) -> Result<String> {
        if name == DEFAULT_REMOTE {
            return Ok(format!("file://{}", volume.default_pods_dir().display()));
        }
        self.file
            .remotes
            .get(name)
            .map(|e| e.url.clone())
            .ok_or_else(|| ConfigError::UnknownRemote(name.to_owned()))
    }

    /// Adds a remote after validating its name and URL template, then saves the file.
    pub fn add(&mut self, name: &str, url: &str) -> Result<()> {
        validate_remote_name(name)?;
        if name == DEFAULT_REMOTE {
            return Err(ConfigError::DefaultRemote);
        }
        if self.file.remotes.contains_key(name) {
            return Err(ConfigError::DuplicateRemote(name.to_owned()));
        }
        validate_template(url)?;
        self.file.remotes.insert(
            name.to_owned(),
            RemoteEntry {
                url: url.to_owned(),
            },
        );
        self.save()
    }

    pub fn delete(&mut self, name: &str) -> Result<()> {
        if name == DEFAULT_REMOTE {
            return Err(ConfigError::DefaultRemote);
        }
        if self.file.remotes.remove(name).is_none() {
            return Err(ConfigError::UnknownRemote(name.to_owned()));
        }
        self.save()
    }

    /// Writes the file atomically (temp file, fsync, rename) with mode 0600.
    fn save(&self) -> Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let text = toml::to_string(&self.file).map_err(|e| ConfigError::BadRemotesFile {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".remotes.toml.")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .tempfile_in(dir)
            .map_err(io_err(dir))?;
        tmp.write_all(text.as_bytes()).map_err(io_err(&self.path))?;
        tmp.as_file().sync_all().map_err(io_err(&self.path))?;
        tmp.persist(&self.path)
            .map_err(|e| io_err(&self.path)(e.error))?;
        Ok(())
    }
}

/// Who is saving: `user@host`, for `version.json`.
pub fn creator() -> String {
    let user = ["USER", "LOGNAME"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    if host.is_empty() {
        user
    } else {
        format!("{user}@{host}")
    }
}

/// Remote names: `^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$`.
pub fn validate_remote_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::InvalidRemoteName(name.to_owned()))
    }
}

/// A piece of a URL template: literal text or a `{placeholder}`.
#[derive(Debug, PartialEq, Eq)]
enum Piece<'a> {
    Text(&'a str),
    Placeholder(&'a str),
}

/// Splits a template into literal text and `{name}` placeholders (`name` is `[a-z0-9_]+`,
/// case-insensitive). Unbalanced braces are an error.
fn parse_template(url: &str) -> Result<Vec<Piece<'_>>> {
    let bad = |reason: String| ConfigError::InvalidUrl {
        url: url.to_owned(),
        reason,
    };
    let mut pieces = Vec::new();
    let mut rest = url;
    while let Some(open) = rest.find(['{', '}']) {
        if rest.as_bytes()[open] == b'}' {
            return Err(bad("'}' without a matching '{'".into()));
        }
        if open > 0 {
            pieces.push(Piece::Text(&rest[..open]));
        }
        let after = &rest[open + 1..];
        let close = after
            .find(['{', '}'])
            .filter(|&i| after.as_bytes()[i] == b'}')
            .ok_or_else(|| bad("'{' without a matching '}'".into()))?;
        let name = &after[..close];
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(bad(format!(
                "placeholder {{{name}}} must be letters, digits and '_', like {{access_key_id}}"
            )));
        }
        pieces.push(Piece::Placeholder(name));
        rest = &after[close + 1..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest));
    }
    Ok(pieces)
}

/// Everything but RFC 3986 unreserved characters is encoded in a placeholder's value.
const VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The environment variable a placeholder reads: the AWS credential placeholders read the standard
/// `AWS_*` variables (as in the pod remotes document); any other `{name}` reads `NAME`.
fn placeholder_var(name: &str) -> String {
    match name.to_ascii_lowercase().as_str() {
        "access_key_id" => "AWS_ACCESS_KEY_ID".to_owned(),
        "secret_access_key" => "AWS_SECRET_ACCESS_KEY".to_owned(),
        "session_token" => "AWS_SESSION_TOKEN".to_owned(),
        _ => name.to_ascii_uppercase(),
    }
}

/// Fills every placeholder from the environment through `lookup` (variable → value),
/// percent-encoding each value. An unset variable is an error that names it.
fn fill_template(
    remote: &str,
    url: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String> {
    let mut out = String::with_capacity(url.len());
    for piece in parse_template(url)? {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Placeholder(name) => {
                let var = placeholder_var(name);
                let value = lookup(&var).ok_or_else(|| ConfigError::MissingVariable {
                    remote: remote.to_owned(),
                    placeholder: name.to_owned(),
                    var: var.clone(),
                })?;
                out.extend(utf8_percent_encode(&value, VALUE));
            }
        }
    }
    Ok(out)
}

/// Checks a template's placeholder syntax and URL structure without needing any variable set.
pub fn validate_template(url: &str) -> Result<()> {
    let filled = fill_template("", url, |_| Some("placeholder".to_owned()))?;
    RemoteUrl::parse(&filled).map_err(|reason| ConfigError::InvalidUrl {
        url: mask_url(url),
        reason,
    })?;
    Ok(())
}

/// Resolves remote `name`'s template from the process environment and parses it.
pub fn resolve(name: &str, template: &str) -> Result<RemoteUrl> {
    resolve_with(name, template, |var| {
        std::env::var(var).ok().filter(|v| !v.is_empty())
    })
}

/// [`resolve`] with an explicit variable lookup (for tests).
pub fn resolve_with(
    name: &str,
    template: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<RemoteUrl> {
    let filled = fill_template(name, template, &lookup)?;
    let mut url = RemoteUrl::parse(&filled).map_err(|reason| ConfigError::InvalidUrl {
        url: mask_url(template),
        reason,
    })?;
    if let RemoteUrl::S3(s3) = &mut url
        && s3.endpoint.is_none()
    {
        for var in ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"] {
            if let Some(v) = lookup(var) {
                let endpoint = parse_endpoint(&v).map_err(|reason| ConfigError::InvalidUrl {
                    url: format!("{var}={v}"),
                    reason,
                })?;
                s3.endpoint = Some(endpoint);
                break;
            }
        }
    }
    if let RemoteUrl::S3(s3) = &mut url
        && s3
            .endpoint
            .as_ref()
            .is_none_or(|e| e.starts_with("https://"))
    {
        s3.ca_bundle = lookup("AWS_CA_BUNDLE").map(PathBuf::from);
    }
    Ok(url)
}

/// Checks an S3 endpoint (`http://` or `https://` with a host) and drops a trailing '/'.
fn parse_endpoint(v: &str) -> std::result::Result<String, String> {
    let e = url::Url::parse(v).map_err(|e| format!("endpoint {v:?}: {e}"))?;
    if !matches!(e.scheme(), "http" | "https") || e.host_str().is_none() {
        return Err(format!(
            "endpoint {v:?} must be an http:// or https:// URL with a host"
        ));
    }
    Ok(v.trim_end_matches('/').to_owned())
}

/// The names of credential-bearing query parameters.
const SECRET_PARAMS: &[&str] = &["access_key_id", "secret_access_key", "session_token"];

/// Masks literal credentials in a URL template (query secrets and a userinfo password);
/// `{placeholders}` are kept since they are not secrets.
pub fn mask_url(url: &str) -> String {
    let is_placeholder = |v: &str| v.starts_with('{') && v.ends_with('}') && v.len() > 2;
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let mut out = String::new();
    // userinfo password: scheme://user:PASS@host
    match head.split_once("://") {
        Some((scheme, rest)) => {
            out.push_str(scheme);
            out.push_str("://");
            let authority_end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(authority_end);
            match authority.rsplit_once('@') {
                Some((userinfo, host)) => {
                    match userinfo.split_once(':') {
                        Some((user, pass)) if !is_placeholder(pass) => {
                            out.push_str(user);
                            out.push_str(":***");
                        }
                        _ => out.push_str(userinfo),
                    }
                    out.push('@');
                    out.push_str(host);
                }
                None => out.push_str(authority),
            }
            out.push_str(path);
        }
        None => out.push_str(head),
    }
    if let Some(query) = query {
        out.push('?');
        let parts: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) if SECRET_PARAMS.contains(&k) && !is_placeholder(v) => {
                    format!("{k}=***")
                }
                _ => kv.to_owned(),
            })
            .collect();
        out.push_str(&parts.join("&"));
    }
    out
}

/// A secret string: never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// How aws-sdk-s3 computes and validates checksums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChecksumMode {
    /// Only when an operation requires it: works with most S3-compatible servers.
    #[default]
    WhenRequired,
    /// Whenever the operation supports it (the AWS SDK default).
    WhenSupported,
}

/// A resolved `s3://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// Key prefix, empty or ending in '/'.
    pub prefix: String,
    pub access_key_id: Option<Secret>,
    pub secret_access_key: Option<Secret>,
    pub session_token: Option<Secret>,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub checksum: ChecksumMode,
    /// Multipart part size in bytes.
    pub part_size: Option<u64>,
    /// Per-request timeout in seconds.
    pub timeout_secs: Option<u64>,
    /// A PEM file of extra CA certificates to trust (from `AWS_CA_BUNDLE`). Filled only for
    /// HTTPS (an `https://` endpoint or AWS itself): a plain-HTTP endpoint has no use for it.
    pub ca_bundle: Option<PathBuf>,
}

/// A resolved `oras://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrasUrl {
    /// `host` or `host:port`.
    pub registry: String,
    pub namespace: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub plain_http: bool,
}

/// A resolved remote URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteUrl {
    File(PathBuf),
    S3(S3Url),
    Oras(OrasUrl),
}

impl RemoteUrl {
    /// Parses a resolved URL (no placeholders left). The error is a reason, without the URL.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let url = url::Url::parse(s).map_err(|e| e.to_string())?;
        match url.scheme() {
            "file" => parse_file(&url),
            "s3" => parse_s3(&url).map(RemoteUrl::S3),
            "oras" => parse_oras(&url).map(RemoteUrl::Oras),
            other => Err(format!(
                "unknown scheme {other:?}: use s3://, oras:// or file://"
            )),
        }
    }
}

fn parse_file(url: &url::Url) -> std::result::Result<RemoteUrl, String> {
    if url
        .host_str()
        .is_some_and(|h| !h.is_empty() && h != "localhost")
    {
        return Err("a file:// URL takes an absolute path: file:///ABSOLUTE/PATH".into());
    }
    if url.query().is_some() {
        return Err("a file:// URL takes no query parameters".into());
    }
    let path = url
        .to_file_path()
        .map_err(|()| "a file:// URL takes an absolute path: file:///ABSOLUTE/PATH".to_string())?;
    if path == Path::new("/") {
        return Err("refusing the root directory as a remote: name a directory".into());
    }
    Ok(RemoteUrl::File(path))
}

fn decoded(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

fn parse_s3(url: &url::Url) -> std::result::Result<S3Url, String> {
    let bucket = url.host_str().unwrap_or_default().to_owned();
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && bucket.as_bytes()[0].is_ascii_alphanumeric()
        && bucket.as_bytes()[bucket.len() - 1].is_ascii_alphanumeric();
    if !valid_bucket {
        return Err(format!(
            "bucket {bucket:?} is not a valid S3 bucket name (3-63 characters: a-z, 0-9, '.', '-')"
        ));
    }
    if url.port().is_some() || !url.username().is_empty() {
        return Err("s3://BUCKET takes no port or user: put an endpoint in ?endpoint=".into());
    }
    let path = url.path().trim_matches('/');
    let prefix = if path.is_empty() {
        String::new()
    } else {
        if path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(format!(
                "key prefix {path:?} has an empty, '.' or '..' part"
            ));
        }
        format!("{path}/")
    };
    let mut s3 = S3Url {
        bucket,
        prefix,
        access_key_id: None,
        secret_access_key: None,
        session_token: None,
        region: None,
        endpoint: None,
        checksum: ChecksumMode::default(),
        part_size: None,
        timeout_secs: None,
        ca_bundle: None,
    };
    for (k, v) in url.query_pairs() {
        let v = v.into_owned();
        let number = |what: &str| {
            v.parse::<u64>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{what}={v:?} must be a positive whole number"))
        };
        match &*k {
            "access_key_id" => s3.access_key_id = Some(Secret(v)),
            "secret_access_key" => s3.secret_access_key = Some(Secret(v)),
            "session_token" => s3.session_token = Some(Secret(v)),
            "region" => s3.region = Some(v),
            "endpoint" => s3.endpoint = Some(parse_endpoint(&v)?),
            "checksum" => {
                s3.checksum = match v.as_str() {
                    "when_required" => ChecksumMode::WhenRequired,
                    "when_supported" => ChecksumMode::WhenSupported,
                    _ => {
                        return Err(format!(
                            "checksum={v:?}: use when_required or when_supported"
                        ));
                    }
                }
            }
            "part_size" => {
                let n = number("part_size")?;
                if n < 5 * 1024 * 1024 {
                    return Err("part_size must be at least 5242880 (5 MiB, the S3 minimum)".into());
                }
                s3.part_size = Some(n);
            }
            "timeout" => s3.timeout_secs = Some(number("timeout")?),
            other => {
                return Err(format!(
                    "unknown parameter {other:?}: s3:// takes access_key_id, secret_access_key, session_token, region, endpoint, checksum, part_size, timeout"
                ));
            }
        }
    }
    if s3.access_key_id.is_some() != s3.secret_access_key.is_some() {
        return Err("give both access_key_id and secret_access_key, or neither".into());
    }
    if s3.session_token.is_some() && s3.access_key_id.is_none() {
        return Err("session_token needs access_key_id and secret_access_key".into());
    }
    Ok(s3)
}

fn parse_oras(url: &url::Url) -> std::result::Result<OrasUrl, String> {
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or("oras:// needs a registry host: oras://HOST[:PORT]/NAMESPACE")?;
    let registry = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    };
    let namespace = url.path().trim_matches('/').to_owned();
    let valid_ns = !namespace.is_empty()
        && namespace.split('/').all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.as_bytes()[0].is_ascii_alphanumeric()
        });
    if !valid_ns {
        return Err(format!(
            "namespace {namespace:?} is not a valid repository path: lower-case letters, digits, '.', '_', '-', separated by '/' (oras://HOST/NAMESPACE)"
        ));
    }
    let username = (!url.username().is_empty()).then(|| decoded(url.username()));
    let password = url.password().map(|p| Secret(decoded(p)));
    if password.is_some() && username.is_none() {
        return Err("a password needs a user name: oras://USER:PASS@HOST/NAMESPACE".into());
    }
    let loopback = matches!(host, "localhost" | "[::1]" | "::1") || host.starts_with("127.");
    let mut plain_http = loopback;
    for (k, v) in url.query_pairs() {
        match &*k {
            "plain_http" => {
                plain_http = match &*v {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(format!("plain_http={v:?}: use true or false")),
                }
            }
            other => {
                return Err(format!(
                    "unknown parameter {other:?}: oras:// takes plain_http"
                ));
            }
        }
    }
    Ok(OrasUrl {
        registry,
        namespace,
        username,
        password,
        plain_http,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const SEED_S3: &str = "s3://ls-pods-bucket-test/?access_key_id={access_key_id}&secret_access_key={secret_access_key}";

    #[test]
    fn seed_s3_url_resolves_from_env() {
        let url = resolve_with(
            "s3-storage-aws",
            SEED_S3,
            env(&[
                ("AWS_ACCESS_KEY_ID", "AKIA/x+y"),
                ("AWS_SECRET_ACCESS_KEY", "s&c=r?t"),
            ]),
        )
        .unwrap();
        let RemoteUrl::S3(s3) = url else {
            panic!("not s3")
        };
        assert_eq!(s3.bucket, "ls-pods-bucket-test");
        assert_eq!(s3.prefix, "");
        // Values with URL metacharacters survive the round trip through percent-encoding.
        assert_eq!(s3.access_key_id.unwrap().expose(), "AKIA/x+y");
        assert_eq!(s3.secret_access_key.unwrap().expose(), "s&c=r?t");
    }

    #[test]
    fn missing_variable_is_named() {
        let err = resolve_with("r", SEED_S3, env(&[("AWS_ACCESS_KEY_ID", "a")])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("AWS_SECRET_ACCESS_KEY"), "{msg}");
        assert!(msg.contains("{secret_access_key}"), "{msg}");
        assert!(matches!(err, ConfigError::MissingVariable { .. }));
        // The bare upper-cased names are not what the seed's placeholders read.
        let err = resolve_with(
            "r",
            SEED_S3,
            env(&[("ACCESS_KEY_ID", "a"), ("SECRET_ACCESS_KEY", "b")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("AWS_ACCESS_KEY_ID"), "{err}");
    }

    #[test]
    fn placeholders_map_to_variables() {
        assert_eq!(placeholder_var("access_key_id"), "AWS_ACCESS_KEY_ID");
        assert_eq!(
            placeholder_var("secret_access_key"),
            "AWS_SECRET_ACCESS_KEY"
        );
        assert_eq!(placeholder_var("session_token"), "AWS_SESSION_TOKEN");
        assert_eq!(placeholder_var("oras_username"), "ORAS_USERNAME");
        assert_eq!(placeholder_var("oras_password"), "ORAS_PASSWORD");
        assert_eq!(placeholder_var("my_bucket"), "MY_BUCKET");
        let RemoteUrl::S3(s3) = resolve_with(
            "r",
            "s3://b-{my_bucket}/?access_key_id={access_key_id}&secret_access_key={secret_access_key}&session_token={session_token}",
            env(&[
                ("MY_BUCKET", "x"),
                ("AWS_ACCESS_KEY_ID", "a"),
                ("AWS_SECRET_ACCESS_KEY", "s"),
                ("AWS_SESSION_TOKEN", "t"),
            ]),
        )
        .unwrap() else {
            panic!("not s3")
        };
        assert_eq!(s3.bucket, "b-x");
        assert_eq!(s3.session_token.unwrap().expose(), "t");
    }

    #[test]
    fn s3_endpoint_and_ca_bundle_from_env() {
        let s3_of = |url: &str, vars: &[(&str, &str)]| match resolve_with("r", url, env(vars)) {
            Ok(RemoteUrl::S3(s3)) => s3.endpoint,
            other => panic!("{other:?}"),
        };
        assert_eq!(s3_of("s3://bucket/", &[]), None);
        assert_eq!(
            s3_of("s3://bucket/", &[("AWS_ENDPOINT_URL", "http://h:1/")]).as_deref(),
            Some("http://h:1")
        );
        assert_eq!(
            s3_of(
                "s3://bucket/",
                &[
                    ("AWS_ENDPOINT_URL", "http://h:1"),
                    ("AWS_ENDPOINT_URL_S3", "http://s3:2")
                ]
            )
            .as_deref(),
            Some("http://s3:2")
        );
        assert_eq!(
            s3_of(
                "s3://bucket/?endpoint=http://url:3",
                &[("AWS_ENDPOINT_URL_S3", "http://s3:2")]
            )
            .as_deref(),
            Some("http://url:3")
        );
        let err =
            resolve_with("r", "s3://bucket/", env(&[("AWS_ENDPOINT_URL", "ftp://x")])).unwrap_err();
        assert!(err.to_string().contains("AWS_ENDPOINT_URL"), "{err}");
    }

    #[test]
    fn seed_oras_url_resolves() {
        let url = resolve_with(
            "oras-remote",
            "oras://{oras_username}:{oras_password}@registry.hub.docker.com/my_id",
            env(&[
                ("ORAS_USERNAME", "me"),
                ("ORAS_PASSWORD", "ILoveLocalStack1!"),
            ]),
        )
        .unwrap();
        let RemoteUrl::Oras(o) = url else {
            panic!("not oras")
        };
        assert_eq!(o.registry, "registry.hub.docker.com");
        assert_eq!(o.namespace, "my_id");
        assert_eq!(o.username.as_deref(), Some("me"));
        assert_eq!(o.password.unwrap().expose(), "ILoveLocalStack1!");
        assert!(!o.plain_http);
    }

    #[test]
    fn oras_loopback_is_plain_http() {
        let RemoteUrl::Oras(o) = RemoteUrl::parse("oras://127.0.0.1:5000/team/pods").unwrap()
        else {
            panic!()
        };
        assert!(o.plain_http);
        assert_eq!(o.registry, "127.0.0.1:5000");
        assert_eq!(o.namespace, "team/pods");
    }

    #[test]
    fn s3_prefix_endpoint_and_params() {
        let RemoteUrl::S3(s3) = RemoteUrl::parse(
            "s3://bucket/team/pods/?endpoint=http://127.0.0.1:9000/&region=eu-west-1&checksum=when_supported&part_size=8388608",
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(s3.prefix, "team/pods/");
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(s3.region.as_deref(), Some("eu-west-1"));
        assert_eq!(s3.checksum, ChecksumMode::WhenSupported);
        assert_eq!(s3.part_size, Some(8 << 20));
    }

    #[test]
    fn bad_urls_are_rejected_with_a_reason() {
        for (url, want) in [
            ("ftp://x/y", "unknown scheme"),
            ("not a url", "relative URL"),
            ("s3://B/", "bucket"),
            ("s3://bucket/?acess_key_id=x", "unknown parameter"),
            ("s3://bucket/?access_key_id=x", "both"),
            ("s3://bucket/?endpoint=ftp://x", "endpoint"),
            ("s3://bucket/a//b/", "empty"),
            ("oras://host", "namespace"),
            ("oras://host/Upper", "namespace"),
            ("oras://host/ns?plain_http=maybe", "plain_http"),
            ("file://relative/path", "absolute"),
            ("file:///", "root"),
        ] {
            let err = RemoteUrl::parse(url).unwrap_err();
            assert!(err.contains(want), "{url}: {err}");
        }
    }

    #[test]
    fn template_syntax_errors() {
        for url in [
            "s3://b/?access_key_id={access_key_id",
            "s3://b/?access_key_id=x}",
            "s3://b/?access_key_id={}",
            "s3://b/?access_key_id={a-b}",
        ] {
            assert!(validate_template(url).is_err(), "{url}");
        }
        validate_template(SEED_S3).unwrap();
    }

    #[test]
    fn masking_hides_literal_secrets_only() {
        assert_eq!(mask_url(SEED_S3), SEED_S3);
        assert_eq!(
            mask_url("s3://b/?access_key_id=AKIA&secret_access_key=SECRET&region=x"),
            "s3://b/?access_key_id=***&secret_access_key=***&region=x"
        );
        assert_eq!(
            mask_url("oras://me:hunter2@host/ns"),
            "oras://me:***@host/ns"
        );
        assert_eq!(
            mask_url("oras://{oras_username}:{oras_password}@host/ns"),
            "oras://{oras_username}:{oras_password}@host/ns"
        );
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let url = resolve_with(
            "r",
            "oras://u:{oras_password}@h/ns",
            env(&[("ORAS_PASSWORD", "hunter2")]),
        )
        .unwrap();
        assert!(!format!("{url:?}").contains("hunter2"));
    }

    #[test]
    fn remote_names() {
        for ok in ["a", "s3-storage-aws", "A_1"] {
            validate_remote_name(ok).unwrap();
        }
        for bad in ["", "-a", "a b", "a/b", "ä", &"x".repeat(65)] {
            assert!(validate_remote_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn remotes_file_roundtrip_and_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let vol = VolumeDir::at(dir.path());
        let mut r = Remotes::load(&vol).unwrap();
        r.add("s3-storage-aws", SEED_S3).unwrap();
        assert!(matches!(
            r.add("s3-storage-aws", SEED_S3),
            Err(ConfigError::DuplicateRemote(_))
        ));
        assert!(matches!(
            r.add("default", "file:///x"),
            Err(ConfigError::DefaultRemote)
        ));
        let mode = std::fs::metadata(vol.remotes_file())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let r = Remotes::load(&vol).unwrap();
        assert_eq!(r.template(&vol, "s3-storage-aws").unwrap(), SEED_S3);
        let names: Vec<_> = r.list(&vol).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["default", "s3-storage-aws"]);
    }
}
