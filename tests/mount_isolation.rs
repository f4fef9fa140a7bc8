//! One remote in trouble must not take the mount's other remotes with it (docs/DESIGN.md: "one
//! slow read does not stall the mount"; docs/SEMANTICS.md: a remote failure is `EIO` with the
//! cause in the log). Real mounts of several remotes at once, on real servers: an S3 server
//! that stops answering (moto under SIGSTOP) and a registry that refuses the password. A hung
//! call is checked in the kernel (`/proc/.../syscall`) before the others run, and a call that
//! hangs too long fails the test with its kernel stack, which names what it waits for.
//!
//! Deadlines here only say "did not hang": an operation on a healthy remote gets
//! [`HEALTHY`], far more than it needs and far less than the stopped server takes to fail.

mod support;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use support::moto::{KEY_ID, Moto, SECRET};
use support::mount::{Mounted, wait_until};
use support::registry::Registry;
use support::{MIB, Podfs, assert_same_tree, make_tree, noise};

/// The pod every remote holds.
const POD: &str = "isolated";

/// How long an operation on a healthy remote may take while another remote hangs: far more
/// than it needs (milliseconds), and half the time a request to the stopped server takes to fail
/// ([`S3_TIMEOUT_SECS`]), so an operation that waits for that server cannot pass.
const HEALTHY: Duration = Duration::from_secs(10);

/// The S3 remote's per-attempt timeout (`timeout=` in its URL). A request to the stopped server
/// fails after `podfs::remote::s3::MAX_ATTEMPTS` (4) of these plus backoff: after 20 s and a bit.
const S3_TIMEOUT_SECS: u64 = 5;

/// How long one request to the stopped server may take to fail: every attempt times out, with at
/// most 5 s of backoff between attempts.
fn s3_request_fails_within() -> Duration {
    let attempts = u64::from(podfs::remote::s3::MAX_ATTEMPTS);
    Duration::from_secs(attempts * S3_TIMEOUT_SECS + (attempts - 1) * 5)
}

/// How long to wait for a thread to block in a system call it is about to make.
const STARTS: Duration = Duration::from_secs(10);

/// The mount's `--refresh` in the first test: short, so that listings are fetched again while
/// the server is stopped.
const REFRESH: Duration = Duration::from_millis(200);

/// The kernel stack of a process or thread (`proc_dir`: `/proc/PID` or `/proc/self/task/TID`;
/// readable as root, as the tests run), to show where a hung call waits.
fn kernel_stack(proc_dir: &str) -> String {
    std::fs::read_to_string(format!("{proc_dir}/stack"))
        .unwrap_or_else(|e| format!("(no kernel stack: {e})"))
}

/// A blocking call running on its own thread: its result once it returns, and the thread's id
/// to see where it waits.
struct Pending<T> {
    rx: mpsc::Receiver<T>,
    /// `/proc/self/task/TID`.
    proc_dir: String,
}

impl<T: Send + std::fmt::Debug + 'static> Pending<T> {
    fn start(f: impl FnOnce() -> T + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        let (tid_tx, tid_rx) = mpsc::channel();
        std::thread::spawn(move || {
            // SAFETY: gettid cannot fail and touches no memory.
            let _ = tid_tx.send(unsafe { libc::gettid() });
            let _ = tx.send(f());
        });
        let tid = tid_rx.recv().expect("the thread starts");
        Self {
            rx,
            proc_dir: format!("/proc/self/task/{tid}"),
        }
    }

    /// Waits until the thread sleeps inside system call `nr` (say `libc::SYS_pread64`): its
    /// request is in the kernel's hands. Panics if it returns first or never gets there.
    fn wait_blocked_in(&self, nr: libc::c_long, what: &str) {
        let start = Instant::now();
        loop {
            let syscall = std::fs::read_to_string(format!("{}/syscall", self.proc_dir));
            let stat = std::fs::read_to_string(format!("{}/stat", self.proc_dir));
            let number = syscall.as_deref().unwrap_or("").split(' ').next();
            // The state follows the command name, which is in parentheses.
            let state = stat
                .as_deref()
                .unwrap_or("")
                .rsplit(')')
                .next()
                .map(str::trim);
            let sleeping = state.is_some_and(|s| s.starts_with('S') || s.starts_with('D'));
            if number == Some(nr.to_string().as_str()) && sleeping {
                return;
            }
            if let Some(r) = self.try_take() {
                panic!("{what} returned before it could be seen waiting: {r:?}");
            }
            assert!(start.elapsed() < STARTS, "{what} never started");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The result, if the call has returned.
    fn try_take(&self) -> Option<T> {
        match self.rx.try_recv() {
            Ok(v) => Some(v),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => panic!("a pending call panicked"),
        }
    }

    /// The result; panics, with where the thread waits, if it takes longer than `limit`. A hung
    /// thread is left behind: unmounting (the mount's `Drop`) or resuming the server ends its
    /// system call.
    fn wait(self, limit: Duration, what: &str) -> T {
        match self.rx.recv_timeout(limit) {
            Ok(v) => v,
            Err(RecvTimeoutError::Timeout) => panic!(
                "{what} hung for more than {}s; kernel stack:\n{}",
                limit.as_secs(),
                kernel_stack(&self.proc_dir)
            ),
            Err(RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
        }
    }
}

/// `f()`, which must return within [`HEALTHY`].
fn within<T: Send + std::fmt::Debug + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    Pending::start(f).wait(HEALTHY, what)
}

/// `ls ARGS DIR`, which must succeed within [`HEALTHY`]; returns its output. A hung `ls` is
/// killed after showing where it waits.
fn ls_within(args: &[&str], dir: &Path) -> String {
    let what = format!(
        "ls {}",
        [args, &[&*dir.to_string_lossy()]].concat().join(" ")
    );
    // Files, not pipes: a full pipe must not pass for a hang.
    let (mut stdout, mut stderr) = (tempfile::tempfile().unwrap(), tempfile::tempfile().unwrap());
    let mut child = Command::new("ls")
        .args(args)
        .arg(dir)
        .stdout(stdout.try_clone().unwrap())
        .stderr(stderr.try_clone().unwrap())
        .spawn()
        .expect("run ls");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for ls") {
            break status;
        }
        if start.elapsed() > HEALTHY {
            let stack = kernel_stack(&format!("/proc/{}", child.id()));
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} hung for more than {}s; kernel stack:\n{stack}",
                HEALTHY.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let read = |f: &mut File| {
        use std::io::{Read, Seek};
        let mut s = String::new();
        f.rewind().unwrap();
        f.read_to_string(&mut s).unwrap();
        s
    };
    assert!(status.success(), "{what} failed: {}", read(&mut stderr));
    read(&mut stdout)
}

/// `std::fs::read(path)`, which must return within [`HEALTHY`].
fn read_within(path: &Path) -> std::io::Result<Vec<u8>> {
    let p = path.to_owned();
    within(&format!("reading {}", path.display()), move || {
        std::fs::read(p)
    })
}

/// The S3 remote's URL on `moto`, with the short attempt timeout.
fn s3_url(moto: &Moto) -> String {
    format!(
        "s3://isolation/?access_key_id={{access_key_id}}&secret_access_key={{secret_access_key}}&endpoint={}&timeout={S3_TIMEOUT_SECS}",
        moto.endpoint
    )
}

/// A podfs installation with an S3 remote `s3-remote` on `moto` besides the built-in one.
fn with_s3(moto: &Moto) -> Podfs {
    let podfs = Podfs::new()
        .env("AWS_ACCESS_KEY_ID", KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", SECRET);
    podfs.ok(&["remote", "add", "s3-remote", &s3_url(moto)]);
    podfs
}

/// Saves `tree` as pod [`POD`] on each of `remotes`.
fn save_on(podfs: &Podfs, tree: &Path, remotes: &[&str]) {
    for remote in remotes {
        podfs.ok(&["save", POD, remote, "--from", tree.to_str().unwrap()]);
    }
}

/// Three remotes (the built-in one, S3 on moto, a registry), each with the test tree as pod
/// [`POD`], mounted and read once. Then moto stops answering (SIGSTOP) while a read of a file it
/// holds is in flight. While that read hangs: listing the root, the built-in remote and the
/// registry, and reading a file of each, all answer. The hung read ends with `EIO` once the S3
/// timeouts run out (the server still stopped), and once the server is back the same bytes read
/// fine: a failed fetch is not remembered.
#[test]
fn a_stopped_server_leaves_the_other_remotes_working() {
    let moto = Moto::start();
    let reg = Registry::anonymous();
    let podfs = with_s3(&moto);
    podfs.ok(&["remote", "add", "oras-remote", &reg.url("isolation")]);
    let work = tempfile::tempdir().unwrap();
    make_tree(work.path(), 2 * MIB);
    let big = noise(2 * MIB, 2);
    let remotes = ["default", "oras-remote", "s3-remote"];
    save_on(&podfs, work.path(), &remotes);
    let refresh = format!("{}ms", REFRESH.as_millis());
    let m = Mounted::new(&podfs, &["--refresh", &refresh]);
    for remote in remotes {
        assert_eq!(
            std::fs::read_to_string(m.pod(remote, POD).join("hello.txt")).unwrap(),
            "hello, pods\n",
            "{remote}"
        );
    }
    // Opened now (which fetches nothing), read once the server is stopped.
    let on_s3 = m.pod("s3-remote", POD).join("dir/big.bin");
    let hung_file = File::open(&on_s3).unwrap();
    let listed = Instant::now();

    let frozen = moto.freeze();
    let hung = Pending::start(move || {
        let mut buf = vec![0u8; 64 << 10];
        hung_file
            .read_exact_at(&mut buf, MIB as u64)
            .map(|()| buf.len())
    });
    hung.wait_blocked_in(libc::SYS_pread64, "the read on the stopped server");
    // Past --refresh every listing is fetched again, from the stopped server too.
    wait_until(
        "the listings are older than --refresh",
        Duration::from_secs(10),
        || listed.elapsed() > REFRESH,
    );

    let shown = ls_within(&[], &m.point);
    assert_eq!(shown.split_whitespace().collect::<Vec<_>>(), remotes);
    // `ls -l` stats every remote directory, the stopped one included: its attributes must not
    // wait for its server.
    let long = ls_within(&["-l"], &m.point);
    for remote in remotes {
        assert!(long.contains(remote), "{long}");
    }
    for remote in ["default", "oras-remote"] {
        let pods = ls_within(&["-l"], &m.point.join(remote));
        assert!(pods.contains(POD), "{remote}: {pods}");
        let tree = ls_within(&["-lR"], &m.pod(remote, POD));
        assert!(tree.contains("big.bin"), "{remote}: {tree}");
        let got = read_within(&m.pod(remote, POD).join("dir/big.bin")).unwrap();
        assert!(got == big, "{remote}: dir/big.bin has the wrong bytes");
        let got = read_within(&m.pod(remote, POD).join("dir/medium.bin")).unwrap();
        assert_eq!(
            got,
            noise(support::tree::MEDIUM, 1),
            "{remote}: dir/medium.bin"
        );
    }
    // Not a timing claim: the S3 timeouts are far longer than the checks above may take, so
    // the read must still hang here, or the checks did not run while it hung.
    if let Some(r) = hung.try_take() {
        panic!("the read on the stopped server ended before the other remotes were checked: {r:?}");
    }

    // Every attempt times out, then the read fails: EIO, with the cause in the log. The kernel
    // asks twice (its read-ahead, then the one page the read needs), and each ask runs every
    // attempt again: two failed requests, plus a margin for a loaded machine.
    let r = hung.wait(
        2 * s3_request_fails_within() + Duration::from_secs(30),
        "the read on the stopped server (past every S3 timeout)",
    );
    let e = r.expect_err("the server is stopped: no bytes can come");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let log = m.log_text();
    assert!(
        log.contains(&format!("did not answer within {S3_TIMEOUT_SECS}s")),
        "the daemon logs why: {log}"
    );

    // Back: within the fail-fast hold (podfs::remote::failfast::HOLD) the bytes come again.
    drop(frozen);
    let hold = podfs::remote::failfast::HOLD;
    wait_until("the server is back", hold + HEALTHY, || {
        read_within(&on_s3).is_ok_and(|got| got == big)
    });
}

/// The first lookup of a pod while its server hangs (a fresh mount, nothing of that remote
/// looked at yet) leaves the rest of the mount alone: the remote's own directory stats without
/// its server, and listing the root and a first look at the built-in remote answer while the
/// lookup waits. (The kernel serialises lookups and readdir in one directory unless the file
/// system asks for parallel directory operations.)
#[test]
fn a_first_lookup_on_a_stopped_server_leaves_the_root_usable() {
    let moto = Moto::start();
    let podfs = with_s3(&moto);
    let work = tempfile::tempdir().unwrap();
    make_tree(work.path(), 0);
    save_on(&podfs, work.path(), &["default", "s3-remote"]);
    let m = Mounted::new(&podfs, &[]);

    let frozen = moto.freeze();
    let s3_dir = m.point.join("s3-remote");
    let stat = within("the stat of s3-remote", {
        let d = s3_dir.clone();
        move || std::fs::metadata(d).map(|md| md.is_dir()).ok()
    });
    assert_eq!(stat, Some(true), "a remote's directory needs no server");
    let s3_pod = s3_dir.join(POD);
    let hung = Pending::start(move || std::fs::metadata(s3_pod).map(|md| md.is_dir()));
    hung.wait_blocked_in(libc::SYS_statx, "the stat of s3-remote/POD");

    let shown = ls_within(&[], &m.point);
    assert_eq!(
        shown.split_whitespace().collect::<Vec<_>>(),
        ["default", "s3-remote"]
    );
    let hello = read_within(&m.pod("default", POD).join("hello.txt")).unwrap();
    assert_eq!(hello, b"hello, pods\n");
    let tree = ls_within(&["-lR"], &m.pod("default", POD));
    assert!(tree.contains("medium.bin"), "{tree}");
    if let Some(r) = hung.try_take() {
        panic!("the stat on the stopped server ended before the root was checked: {r:?}");
    }

    // Once the server is back (or its timeouts ran out), the stat ends: a directory, or EIO.
    drop(frozen);
    match hung.wait(
        s3_request_fails_within() + Duration::from_secs(30),
        "the stat of s3-remote/POD once its server is back",
    ) {
        Ok(is_dir) => assert!(is_dir),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
    }
}

/// More reads waiting on a stopped server than the kernel lets a FUSE connection have in the
/// background (`max_background`, 16 by default; page-cache reads and read-ahead are background
/// requests with `FUSE_ASYNC_READ`) must not hold up reads on another remote. Today they do: the
/// next read of any file of the mount waits in `fuse_get_req` until the stopped server's
/// requests time out.
#[test]
fn many_hung_reads_on_one_remote_leave_reads_on_the_others() {
    const READERS: usize = 24;
    let moto = Moto::start();
    let podfs = with_s3(&moto);
    let work = tempfile::tempdir().unwrap();
    make_tree(work.path(), 0);
    for i in 0..READERS {
        std::fs::write(work.path().join(format!("f{i}")), noise(100_000, i as u64)).unwrap();
    }
    save_on(&podfs, work.path(), &["default", "s3-remote"]);
    let m = Mounted::new(&podfs, &[]);
    // Opened now (which fetches nothing), read once the server is stopped.
    let files: Vec<File> = (0..READERS)
        .map(|i| File::open(m.pod("s3-remote", POD).join(format!("f{i}"))).unwrap())
        .collect();

    let frozen = moto.freeze();
    let hung: Vec<_> = files
        .into_iter()
        .map(|f| {
            Pending::start(move || {
                let mut buf = vec![0u8; 4096];
                f.read_exact_at(&mut buf, 0).map_err(|e| e.raw_os_error())
            })
        })
        .collect();
    for (i, h) in hung.iter().enumerate() {
        h.wait_blocked_in(libc::SYS_pread64, &format!("the read of s3-remote f{i}"));
    }

    let got = read_within(&m.pod("default", POD).join("dir/medium.bin")).unwrap();
    assert_eq!(got, noise(support::tree::MEDIUM, 1));

    drop(frozen);
    for (i, h) in hung.into_iter().enumerate() {
        let r = h.wait(
            2 * s3_request_fails_within() + Duration::from_secs(30),
            &format!("the read of s3-remote f{i} once its server is back"),
        );
        assert!(matches!(r, Ok(()) | Err(Some(libc::EIO))), "f{i}: {r:?}");
    }
}

/// A registry that refuses the mount's password: its directory still shows at the root, listing
/// it or reading below it is `EIO`, the daemon's log says why (without the password), and the
/// built-in remote beside it reads exactly.
#[test]
fn a_wrong_password_gives_eio_on_that_remote_only() {
    const USER: &str = "pod-user";
    const RIGHT: &str = "right-password-31337";
    const WRONG: &str = "wrong-password-42";
    let reg = Registry::with_auth(USER, RIGHT);
    let work = tempfile::tempdir().unwrap();
    make_tree(work.path(), 0);
    let saver = Podfs::new()
        .env("ORAS_USERNAME", USER)
        .env("ORAS_PASSWORD", RIGHT);
    saver.ok(&["remote", "add", "oras-remote", &reg.url("isolation")]);
    save_on(&saver, work.path(), &["oras-remote"]);

    let podfs = Podfs::new()
        .env("ORAS_USERNAME", USER)
        .env("ORAS_PASSWORD", WRONG);
    podfs.ok(&["remote", "add", "oras-remote", &reg.url("isolation")]);
    save_on(&podfs, work.path(), &["default"]);
    let m = Mounted::new(&podfs, &[]);

    let shown = ls_within(&[], &m.point);
    assert_eq!(
        shown.split_whitespace().collect::<Vec<_>>(),
        ["default", "oras-remote"]
    );
    let long = ls_within(&["-l"], &m.point);
    assert!(long.contains("oras-remote"), "{long}");
    let bad = m.point.join("oras-remote");
    let eio = |what: &str, r: std::io::Result<()>| {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}");
    };
    eio("listing oras-remote", std::fs::read_dir(&bad).map(drop));
    eio(
        "reading oras-remote/POD/hello.txt",
        std::fs::read(bad.join(POD).join("hello.txt")).map(drop),
    );
    eio(
        "stat of oras-remote/POD",
        std::fs::metadata(bad.join(POD)).map(drop),
    );

    assert_same_tree(work.path(), &m.pod("default", POD));

    let log = m.log_text();
    let why: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("wrong user or password"))
        .collect();
    assert!(!why.is_empty(), "the daemon logs why: {log}");
    let failed: Vec<&str> = log.lines().filter(|l| l.contains("errno=5")).collect();
    assert!(!failed.is_empty(), "failed operations are logged: {log}");
    assert!(
        failed.iter().all(|l| l.contains("wrong user or password")),
        "each failed operation's line names the cause: {log}"
    );
    assert!(
        !log.contains(RIGHT) && !log.contains(WRONG),
        "no password in the log: {log}"
    );
}
