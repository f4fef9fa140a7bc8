//! Shared helpers for the integration tests: run the real `podfs` binary in a private volume
//! dir, make and compare directory trees, and find free loopback ports. Servers (moto, the
//! registry) are started by the modules beside this one and stopped when dropped; `backend`
//! wraps each kind of remote in one fixture so a scenario is written once.
#![allow(dead_code)]

/// One `#[test]` per backend for each scenario: `SCENARIO::default_remote`, `::file_remote`,
/// `::s3_on_moto`, `::oras_on_registry`.
#[allow(unused_macros)] // used by the test files that `#[macro_use]` this module
macro_rules! on_every_backend {
    ($($scenario:ident),+ $(,)?) => {$(
        mod $scenario {
            use super::support::backend::Backend;
            #[test]
            fn default_remote() {
                super::$scenario(&Backend::default_remote(stringify!($scenario)));
            }
            #[test]
            fn file_remote() {
                super::$scenario(&Backend::file(stringify!($scenario)));
            }
            #[test]
            fn s3_on_moto() {
                super::$scenario(&Backend::moto(stringify!($scenario)));
            }
            #[test]
            fn oras_on_registry() {
                super::$scenario(&Backend::registry(stringify!($scenario)));
            }
        }
    )+};
}

pub mod backend;
pub mod moto;
pub mod mount;
pub mod range_proxy;
pub mod registry;
pub mod tree;

#[allow(unused_imports)] // each test crate uses some of them
pub use tree::{MIB, copy_tree, make_tree, noise};

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A private podfs installation: its own volume dir, removed on drop.
pub struct Podfs {
    pub home: tempfile::TempDir,
    pub envs: Vec<(String, String)>,
}

impl Podfs {
    pub fn new() -> Self {
        Self {
            home: tempfile::tempdir().expect("temp dir"),
            envs: Vec::new(),
        }
    }

    /// Sets an environment variable for every command run by this installation.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.envs.push((k.to_owned(), v.to_owned()));
        self
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_podfs"));
        c.env("PODFS_HOME", self.home.path())
            .env_remove("AWS_PROFILE")
            .env("PODFS_LOG", "warn");
        for (k, v) in &self.envs {
            c.env(k, v);
        }
        c
    }

    /// Runs podfs with `args`; returns the output whatever the status.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run podfs")
    }

    /// Runs podfs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "podfs {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs podfs and asserts it fails with one clear line on stderr containing `want`;
    /// returns stderr.
    pub fn fails(&self, args: &[&str], want: &str) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "podfs {args:?} should fail but succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            stderr.contains(want),
            "podfs {args:?}: stderr should mention {want:?}: {stderr}"
        );
        assert!(
            !stderr.contains("panicked"),
            "podfs {args:?} panicked: {stderr}"
        );
        stderr
    }

    /// Loads `pod_ref` (POD or POD:N) from `remote` into `into` and asserts that `into` is
    /// then exactly the tree `expected`.
    pub fn assert_loads(&self, pod_ref: &str, remote: &str, into: &Path, expected: &Path) {
        self.ok(&["load", pod_ref, remote, "--into", into.to_str().unwrap()]);
        assert_same_tree(expected, into);
    }

    pub fn pods_dir(&self) -> PathBuf {
        self.home.path().join("pods")
    }
}

/// What a tree holds, for exact comparison: kind, mode, mtime (ns), and content or target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    File {
        mode: u32,
        mtime_ns: i128,
        size: u64,
        crc: u32,
    },
    Dir {
        mode: u32,
        mtime_ns: i128,
    },
    Symlink {
        target: String,
        mtime_ns: i128,
    },
}

/// Every path under `root` (not `root` itself), without following symlinks.
pub fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Node>) {
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let p = e.expect("entry").path();
        let md = std::fs::symlink_metadata(&p).expect("stat");
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let mtime_ns = md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128;
        let node = if md.file_type().is_symlink() {
            Node::Symlink {
                target: std::fs::read_link(&p)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
                mtime_ns,
            }
        } else if md.is_dir() {
            walk(root, &p, out);
            Node::Dir {
                mode: md.mode() & 0o7777,
                mtime_ns,
            }
        } else {
            let mut h = crc32fast::Hasher::new();
            let mut f = std::fs::File::open(&p).unwrap();
            std::io::copy(&mut f, &mut HashWriter(&mut h)).unwrap();
            Node::File {
                mode: md.mode() & 0o7777,
                mtime_ns,
                size: md.len(),
                crc: h.finalize(),
            }
        };
        out.insert(rel, node);
    }
}

struct HashWriter<'a>(&'a mut crc32fast::Hasher);
impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.update(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Asserts two trees are identical: same paths, kinds, modes, mtimes (ns), bytes, targets.
pub fn assert_same_tree(expected: &Path, actual: &Path) {
    let a = snapshot(expected);
    let b = snapshot(actual);
    for (path, node) in &a {
        assert_eq!(
            Some(node),
            b.get(path),
            "{path} differs ({} vs {})",
            expected.display(),
            actual.display()
        );
    }
    for path in b.keys() {
        assert!(
            a.contains_key(path),
            "{path} should not be in {}",
            actual.display()
        );
    }
}

/// A free TCP port on 127.0.0.1.
///
/// A port handed out by `bind(…:0)` is released before the server binds it, and in that window
/// the kernel may give it to another test's server or to an outgoing connection (seen: two moto
/// servers on one port, the loser's test then talking to the winner until it went away). Ports
/// below the kernel's ephemeral range (32768 and up here) are never handed out by the kernel, and
/// a counter keeps the tests of this process apart; the process id spreads test binaries.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = (std::process::id() % 1000) * 12;
    for _ in 0..COUNT {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (start + n) % COUNT) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!(
        "no free loopback port between {FIRST} and {}",
        FIRST + COUNT
    );
}

/// The path of a required external program. Missing is a test failure, never a skip.
pub fn require(program: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(program);
        if p.is_file() {
            return p;
        }
    }
    panic!("{program} is required by this test but is not installed: run scripts/setup.sh");
}

/// Waits until `addr` accepts TCP connections, polling for at most `secs` seconds.
pub fn wait_for_port(addr: &str, secs: u64) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

/// A progress reporter that counts the bytes it is advanced by.
#[derive(Default)]
pub struct Counter(std::sync::atomic::AtomicU64);

impl Counter {
    pub fn total(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl podfs::progress::Progress for Counter {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, bytes: u64) {
        self.0
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }
    fn finish(&self) {}
}

/// A version zip with the given (name, bytes) entries, deflated, in that order. A name may
/// repeat (the zip writer refuses that, so repeats are written under a stand-in name of the same
/// length and renamed in the bytes).
pub fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    let mut renames = Vec::new();
    for (i, (name, data)) in entries.iter().enumerate() {
        let mut written = name.to_string();
        if entries[..i].iter().any(|(n, _)| n == name) {
            written = format!("{}{}", &name[..name.len() - 1], "#");
            renames.push((written.clone(), name.to_string()));
        }
        zip.start_file(written, opts).unwrap();
        std::io::Write::write_all(&mut zip, data).unwrap();
    }
    let mut bytes = zip.finish().unwrap().into_inner();
    for (from, to) in renames {
        let (from, to) = (from.as_bytes(), to.as_bytes());
        for i in 0..bytes.len() - from.len() {
            if &bytes[i..i + from.len()] == from {
                bytes[i..i + from.len()].copy_from_slice(to);
            }
        }
    }
    bytes
}

/// A stored file whose bytes are `data` at `offset` of state object 1.
pub fn file_entry(path: &str, data: &[u8], offset: u64) -> podfs::pod::manifest::Entry {
    podfs::pod::manifest::Entry {
        path: path.into(),
        kind: podfs::pod::manifest::Kind::File,
        mode: 0o644,
        mtime: 1_700_000_000,
        mtime_nsec: 0,
        size: data.len() as u64,
        target: None,
        data: Some(podfs::pod::manifest::DataRef {
            state: 1,
            offset,
            csize: data.len() as u64,
            method: podfs::pod::manifest::Method::Stored,
            crc32: crc32fast::hash(data),
            blocks: None,
        }),
    }
}
