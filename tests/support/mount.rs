//! Real FUSE mounts for the tests: [`Mounted`] runs `podfs mount --foreground` as a child, waits
//! until the mount point is a podfs mount (polling mountinfo, no fixed sleeps), and unmounts and
//! reaps the daemon when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::Podfs;

/// How long a mount or an unmount may take before the test fails.
const READY: Duration = Duration::from_secs(60);

/// True while `point` is a podfs mount in this mount namespace.
pub fn is_mounted(point: &Path) -> bool {
    podfs::pod::fence::mounts()
        .iter()
        .any(|m| m.is_podfs() && m.point == point)
}

/// Polls `cond` every 10 ms until it holds; panics with `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A `podfs mount --foreground` of a podfs installation on a fresh empty directory.
pub struct Mounted {
    /// The daemon (a child of the test).
    pub child: Child,
    /// The mount point.
    pub point: PathBuf,
    /// The daemon's stderr.
    pub log: PathBuf,
    podfs_home: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mounted {
    /// Mounts `podfs`'s remotes with extra `args` (`--remote NAME`, `--refresh 100ms`, …).
    pub fn new(podfs: &Podfs, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().canonicalize().expect("canonical temp dir");
        let point = root.join("mnt");
        std::fs::create_dir(&point).expect("mkdir mount point");
        let log = root.join("daemon.log");
        let child = podfs
            .command()
            .arg("mount")
            .arg(&point)
            .arg("--foreground")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start podfs mount");
        let mut m = Self {
            child,
            point,
            log,
            podfs_home: podfs.home.path().to_owned(),
            _dir: dir,
        };
        let start = Instant::now();
        while !is_mounted(&m.point) {
            if let Ok(Some(status)) = m.child.try_wait() {
                panic!("podfs mount exited ({status}): {}", m.log_text());
            }
            assert!(start.elapsed() < READY, "not mounted: {}", m.log_text());
            std::thread::sleep(Duration::from_millis(10));
        }
        m
    }

    /// `POINT/REMOTE/POD`.
    pub fn pod(&self, remote: &str, pod: &str) -> PathBuf {
        self.point.join(remote).join(pod)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if is_mounted(&self.point) {
            let st = std::process::Command::new(env!("CARGO_BIN_EXE_podfs"))
                .env("PODFS_HOME", &self.podfs_home)
                .arg("unmount")
                .arg(&self.point)
                .status();
            if !matches!(st, Ok(s) if s.success()) {
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(&self.point)
                    .status();
            }
        }
        let start = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if start.elapsed() > Duration::from_secs(10) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        if is_mounted(&self.point) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.point)
                .status();
        }
    }
}

/// The Prometheus text a mount's `--metrics ADDR` serves (`GET /metrics`).
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nhost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read the metrics");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

/// The value of sample `name{labels}` (labels as Prometheus writes them, e.g.
/// `remote="default",op="read_state"`) in `text`; a sample never written is 0.
pub fn sample(text: &str, name: &str, labels: &str) -> f64 {
    let key = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{labels}}} ")
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}
