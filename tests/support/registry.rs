//! A real OCI registry for the tests: Debian's `docker-registry` (CNCF distribution 2.8) on a free
//! loopback port, with filesystem storage in a temporary directory, deletes enabled, and
//! optionally htpasswd Basic auth or bearer-token auth (the registry verifies JWTs issued by
//! `token_server.py`, a small implementation of the Docker token service). Killed on drop.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::{free_port, require, wait_for_port};

pub struct Registry {
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// `Some((user, password))` when auth is on.
    pub auth: Option<(String, String)>,
    child: Option<Child>,
    token_server: Option<Child>,
}

/// How the registry checks clients.
enum Auth {
    None,
    Htpasswd,
    Token,
}

impl Registry {
    /// A registry anyone may read and write.
    pub fn anonymous() -> Self {
        Self::start(Auth::None, None)
    }

    /// A registry that needs `user`/`password` (htpasswd, bcrypt).
    pub fn with_auth(user: &str, password: &str) -> Self {
        Self::start(Auth::Htpasswd, Some((user.to_owned(), password.to_owned())))
    }

    /// A registry that needs bearer tokens from a token service that knows `user`/`password`.
    pub fn with_token_auth(user: &str, password: &str) -> Self {
        Self::start(Auth::Token, Some((user.to_owned(), password.to_owned())))
    }

    fn start(mode: Auth, auth: Option<(String, String)>) -> Self {
        require("docker-registry");
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let mut auth_yaml = String::new();
        let mut token_server = None;
        if let (Auth::Token, Some((user, password))) = (&mode, &auth) {
            require("python3");
            let token_port = free_port();
            let cert = dir.path().join("token-cert.pem");
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/token_server.py");
            let child = Command::new("python3")
                .arg(script)
                .arg(token_port.to_string())
                .arg(&cert)
                .args([user, password, "podfs-test-issuer", "podfs-test-registry"])
                .stdin(Stdio::null())
                .spawn()
                .expect("start token_server.py");
            token_server = Some(child);
            assert!(
                wait_for_port(&format!("127.0.0.1:{token_port}"), 30) && cert.is_file(),
                "token_server.py did not start"
            );
            auth_yaml = format!(
                "auth:\n  token:\n    realm: http://127.0.0.1:{token_port}/token\n    service: podfs-test-registry\n    issuer: podfs-test-issuer\n    rootcertbundle: {}\n",
                cert.display()
            );
        }
        if let (Auth::Htpasswd, Some((user, password))) = (&mode, &auth) {
            require("htpasswd");
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect("run htpasswd");
            assert!(out.status.success(), "htpasswd failed: {out:?}");
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, &out.stdout).expect("write htpasswd");
            auth_yaml = format!(
                "auth:\n  htpasswd:\n    realm: podfs-tests\n    path: {}\n",
                htpasswd.display()
            );
        }
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).expect("storage dir");
        let config = format!(
            "version: 0.1\n\
             log:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: podfs-tests\n\
             {auth_yaml}",
            storage.display()
        );
        std::fs::write(dir.path().join("config.yml"), config).expect("write config");
        let mut r = Self {
            port,
            dir,
            auth,
            child: None,
            token_server,
        };
        r.resume();
        r
    }

    /// Starts (again) the registry process on the same port and storage.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "registry already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("registry.log"))
            .expect("registry log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        self.child = Some(child);
        let addr = self.addr();
        if !wait_for_port(&addr, 30) {
            panic!("docker-registry did not listen on {addr}: {}", self.log());
        }
    }

    /// Kills the registry process (the storage stays, for [`Registry::resume`]).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The remote URL template for namespace `ns`, with the ORAS_USERNAME/ORAS_PASSWORD
    /// placeholders when auth is on.
    pub fn url(&self, ns: &str) -> String {
        match &self.auth {
            Some(_) => format!(
                "oras://{{oras_username}}:{{oras_password}}@{}/{ns}",
                self.addr()
            ),
            None => format!("oras://{}/{ns}", self.addr()),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    pub fn storage(&self) -> std::path::PathBuf {
        self.dir.path().join("storage")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
        if let Some(mut c) = self.token_server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs a Python snippet (oras-py, zipfile) and asserts success; returns stdout.
pub fn python(code: &str, cwd: &Path) -> String {
    require("python3");
    let out = Command::new("python3")
        .arg("-c")
        .arg(code)
        .current_dir(cwd)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
