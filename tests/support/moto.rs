//! A real S3 server for the tests: `moto_server` (PyPI `moto[server]` >= 5.2.5) on a free
//! loopback port, killed on drop; boto3 and the aws CLI as independent clients; and a TCP proxy
//! that can be made to die in the middle of a transfer.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{free_port, require, wait_for_port};

/// Credentials moto accepts when it does not check them.
pub const KEY_ID: &str = "test";
pub const SECRET: &str = "test";

/// A running `moto_server`.
pub struct Moto {
    child: Child,
    pub port: u16,
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
}

impl Moto {
    pub fn start() -> Self {
        Self::start_with_env(&[])
    }

    /// Starts moto with extra environment variables (e.g. `INITIAL_NO_AUTH_ACTION_COUNT`).
    pub fn start_with_env(envs: &[(&str, &str)]) -> Self {
        let bin = require("moto_server");
        require("python3");
        let port = free_port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let moto = Self {
            child,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        assert!(
            wait_for_port(&format!("127.0.0.1:{port}"), 60),
            "moto_server did not listen on port {port}"
        );
        moto
    }

    /// The server's process id (the Python process itself: `moto_server` runs no workers).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the server process (SIGSTOP) until the returned guard is dropped (SIGCONT): its
    /// port still completes TCP connections (the kernel does that) but nothing is answered, as
    /// with a server that hangs. The guard resumes it also when the test panics.
    pub fn freeze(&self) -> Frozen<'_> {
        let pid = i32::try_from(self.pid()).expect("pid fits in pid_t");
        // SAFETY: kill only sends a signal to our own child, which is not reaped while `self`
        // lives.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP moto");
        Frozen { pid, _moto: self }
    }

    /// Runs a Python snippet with `boto3` imported, `EP` the endpoint and `s3` a client using
    /// [`KEY_ID`]/[`SECRET`]. Asserts success; returns stdout.
    pub fn python(&self, code: &str) -> String {
        self.python_with(code, KEY_ID, SECRET)
    }

    pub fn python_with(&self, code: &str, key_id: &str, secret: &str) -> String {
        let prelude = r#"
import boto3, io, json, os, sys, zipfile
EP = os.environ["MOTO_EP"]
s3 = boto3.client("s3", endpoint_url=EP, region_name="us-east-1",
                  aws_access_key_id=os.environ["MOTO_KEY"], aws_secret_access_key=os.environ["MOTO_SECRET"])
"#;
        let out = Command::new(require("python3"))
            .arg("-c")
            .arg(format!("{prelude}\n{code}"))
            .env("MOTO_EP", &self.endpoint)
            .env("MOTO_KEY", key_id)
            .env("MOTO_SECRET", secret)
            .output()
            .expect("run python3");
        assert!(
            out.status.success(),
            "python failed: {}\n{code}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the aws CLI against this server (`aws --endpoint-url EP ARGS`).
    pub fn aws(&self, args: &[&str]) -> Output {
        Command::new(require("aws"))
            .arg("--endpoint-url")
            .arg(&self.endpoint)
            .args(args)
            .env("AWS_ACCESS_KEY_ID", KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env_remove("AWS_PROFILE")
            .output()
            .expect("run aws")
    }

    /// Keys in `bucket` under `prefix`, all pages.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let out = self.python(&format!(
            r#"
keys = []
try:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket={bucket:?}, Prefix={prefix:?}):
        keys += [o["Key"] for o in page.get("Contents", [])]
except s3.exceptions.NoSuchBucket:
    pass
print(json.dumps(keys))
"#
        ));
        serde_json::from_str(out.trim()).expect("keys as JSON")
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A stopped [`Moto`] (see [`Moto::freeze`]); dropping it resumes the server.
#[must_use = "the server resumes when this guard is dropped"]
pub struct Frozen<'a> {
    pid: i32,
    /// The server is not killed and reaped while it is frozen.
    _moto: &'a Moto,
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        // SAFETY: kill only sends a signal to our own child, alive while `_moto` is borrowed.
        unsafe { libc::kill(self.pid, libc::SIGCONT) };
    }
}

/// A TCP proxy in front of a server that dies (closes its port and every connection) once it
/// has forwarded `kill_after` bytes towards the server: a server crash in the middle of an
/// upload, at a deterministic point.
pub struct DyingProxy {
    pub port: u16,
    pub endpoint: String,
    dead: Arc<AtomicBool>,
    forwarded: Arc<AtomicU64>,
}

impl DyingProxy {
    pub fn start(upstream_port: u16, kill_after: u64) -> Self {
        Self::start_with(upstream_port, kill_after, Mode::Die)
    }

    /// A proxy that, once it has forwarded `stall_after` bytes towards the server, holds every
    /// request but `DELETE`s forever: an upload that hangs in the middle, while its abort can
    /// still reach the server.
    pub fn stalling(upstream_port: u16, stall_after: u64) -> Self {
        Self::start_with(upstream_port, stall_after, Mode::Stall)
    }

    fn start_with(upstream_port: u16, kill_after: u64, mode: Mode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let dead = Arc::new(AtomicBool::new(false));
        let forwarded = Arc::new(AtomicU64::new(0));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (d, f) = (Arc::clone(&dead), Arc::clone(&forwarded));
        std::thread::spawn(move || {
            // Accept until dead; the listener is dropped (port closed) when this loop ends.
            while !d.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).expect("blocking");
                        let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
                            continue;
                        };
                        let mut all = conns.lock().unwrap();
                        all.push(client.try_clone().unwrap());
                        all.push(server.try_clone().unwrap());
                        drop(all);
                        let up = Pump {
                            from: client.try_clone().unwrap(),
                            to: server.try_clone().unwrap(),
                            counter: Some((Arc::clone(&f), kill_after)),
                            mode,
                            dead: Arc::clone(&d),
                            conns: Arc::clone(&conns),
                        };
                        let down = Pump {
                            from: server,
                            to: client,
                            counter: None,
                            mode,
                            dead: Arc::clone(&d),
                            conns: Arc::clone(&conns),
                        };
                        std::thread::spawn(move || up.run());
                        std::thread::spawn(move || down.run());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => break,
                }
            }
        });
        Self {
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
            dead,
            forwarded,
        }
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for DyingProxy {
    fn drop(&mut self) {
        self.dead.store(true, Ordering::SeqCst);
    }
}

/// What a proxy does once its byte limit is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Close the port and cut every connection.
    Die,
    /// Hold every request but a `DELETE`.
    Stall,
}

struct Pump {
    from: TcpStream,
    to: TcpStream,
    counter: Option<(Arc<AtomicU64>, u64)>,
    mode: Mode,
    dead: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Pump {
    fn run(mut self) {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            if self.dead.load(Ordering::SeqCst) {
                break;
            }
            let n = match self.from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some((count, limit)) = &self.counter {
                let total = count.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                if total >= *limit && self.mode == Mode::Stall {
                    if !buf[..n].starts_with(b"DELETE ") {
                        while !self.dead.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        break;
                    }
                } else if total >= *limit {
                    // Die: stop accepting and cut every connection, mid-request.
                    self.dead.store(true, Ordering::SeqCst);
                    for c in self.conns.lock().unwrap().iter() {
                        let _ = c.shutdown(Shutdown::Both);
                    }
                    break;
                }
            }
            if self.to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = self.to.shutdown(Shutdown::Write);
    }
}
