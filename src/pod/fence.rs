//! What a save or a load must never cross into: podfs's own volume dir (its pods, remotes.toml,
//! staging and cache), podfs mounts, and, with `--one-file-system`, any other file system.
//!
//! A save leaves these out of the tree. A load neither writes into them nor removes them (nor a
//! directory that holds one), whatever the target and whatever the pod holds: paths are compared
//! after [`absolute`] has resolved the target the way the kernel will, even where it does not
//! exist yet.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// `path` made absolute and normalized: the longest existing prefix is resolved (symlinks
/// followed, as a later `open` would), the rest is taken lexically (`..` of a directory that does
/// not exist yet removes it, as `mkdir -p a/b && cd a/b/..` would).
pub fn absolute(path: &Path) -> std::io::Result<PathBuf> {
    let path = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir()?.join(path)
    };
    let mut out = PathBuf::from("/");
    let mut resolved = true;
    for c in path.components() {
        match c {
            Component::RootDir | Component::Prefix(_) | Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => {
                out.push(name);
                if resolved {
                    match out.canonicalize() {
                        Ok(real) => out = real,
                        Err(_) => resolved = false,
                    }
                }
            }
        }
    }
    Ok(out)
}

/// True if `path` is `dir` or below it (both from [`absolute`]).
pub fn is_within(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir)
}

/// A mounted file system, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub point: PathBuf,
    /// `st_dev` of the files on it.
    pub dev: u64,
    pub fstype: String,
    pub source: String,
}

impl Mount {
    /// A podfs FUSE mount (its source is `podfs`, its type `fuse.podfs`).
    pub fn is_podfs(&self) -> bool {
        self.source == "podfs" || self.fstype == "fuse.podfs"
    }
}

/// The mounts of this process's mount namespace; empty where `/proc` is not mounted.
pub fn mounts() -> Vec<Mount> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|text| text.lines().filter_map(parse_mountinfo_line).collect())
        .unwrap_or_default()
}

/// One line of mountinfo: `id parent major:minor root point options [tags] - fstype source ...`.
fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    let (left, right) = line.split_once(" - ")?;
    let fields: Vec<&str> = left.split(' ').collect();
    let (major, minor) = fields.get(2)?.split_once(':')?;
    let dev = libc::makedev(major.parse().ok()?, minor.parse().ok()?);
    let point = PathBuf::from(unescape_octal(fields.get(4)?));
    let mut right = right.split(' ');
    let fstype = right.next()?.to_owned();
    let source = unescape_octal(right.next()?);
    Some(Mount {
        point,
        dev,
        fstype,
        source,
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|o| b[i] == b'\\' && o.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let Some(o) = octal {
            let v = o.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The podfs mount that holds `path` (from [`absolute`]), if any.
pub fn podfs_mount_holding(path: &Path) -> Option<Mount> {
    mounts()
        .into_iter()
        .filter(|m| m.is_podfs() && is_within(path, &m.point))
        .max_by_key(|m| m.point.as_os_str().len())
}

/// Why a directory met by a scan is left out, if it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// podfs's volume dir (or its staging or cache dir).
    Volume,
    /// A podfs mount.
    PodfsMount,
    /// Another file system, with `--one-file-system`.
    OtherFileSystem,
}

impl Reason {
    pub fn describe(self) -> &'static str {
        match self {
            Reason::Volume => "podfs's own volume dir",
            Reason::PodfsMount => "a podfs mount",
            Reason::OtherFileSystem => "another file system (--one-file-system)",
        }
    }
}

/// The fences of one scan: directories by identity, podfs mounts and, optionally, the root's
/// file system.
#[derive(Debug, Clone, Default)]
pub struct Fences {
    /// (dev, ino) of directories never crossed (the volume dir and its parts).
    dirs: Vec<(u64, u64)>,
    /// Mount points of podfs mounts (they may be dead: stat gives ENOTCONN).
    podfs_points: HashSet<PathBuf>,
    podfs_devs: HashSet<u64>,
    /// With `--one-file-system`: the device of the scanned root.
    root_dev: Option<u64>,
}

impl Fences {
    /// Fences for a scan of `root`: the existing directories of `dirs`, every podfs mount and,
    /// if `one_file_system`, every file system but `root`'s.
    pub fn new(root: &Path, dirs: &[PathBuf], one_file_system: bool) -> Self {
        let mounts = mounts();
        let podfs: Vec<&Mount> = mounts.iter().filter(|m| m.is_podfs()).collect();
        Self {
            dirs: dirs
                .iter()
                .filter_map(|d| std::fs::metadata(d).ok())
                .map(|m| (m.dev(), m.ino()))
                .collect(),
            podfs_points: podfs.iter().map(|m| m.point.clone()).collect(),
            podfs_devs: podfs.iter().map(|m| m.dev).collect(),
            root_dev: if one_file_system {
                std::fs::metadata(root).ok().map(|m| m.dev())
            } else {
                None
            },
        }
    }

    /// Why directory `path` (with metadata `md`, where it could be read) is not to be entered.
    pub fn reason(&self, path: &Path, md: Option<&std::fs::Metadata>) -> Option<Reason> {
        if self.podfs_points.contains(path) {
            return Some(Reason::PodfsMount);
        }
        let md = md?;
        if !md.is_dir() {
            return None;
        }
        if self.dirs.contains(&(md.dev(), md.ino())) {
            Some(Reason::Volume)
        } else if self.podfs_devs.contains(&md.dev()) {
            Some(Reason::PodfsMount)
        } else if self.root_dev.is_some_and(|d| d != md.dev()) {
            Some(Reason::OtherFileSystem)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_resolves_what_exists_and_the_rest_lexically() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().canonicalize().unwrap();
        std::fs::create_dir(real.join("pods")).unwrap();
        std::os::unix::fs::symlink(real.join("pods"), real.join("link")).unwrap();
        assert_eq!(
            absolute(&real.join("pods/new/..")).unwrap(),
            real.join("pods")
        );
        assert_eq!(absolute(&real.join("newsub")).unwrap(), real.join("newsub"));
        assert_eq!(absolute(&real.join("link/x")).unwrap(), real.join("pods/x"));
        assert_eq!(absolute(&real.join("link/..")).unwrap(), real);
        assert_eq!(absolute(Path::new("/..")).unwrap(), PathBuf::from("/"));
    }

    #[test]
    fn mountinfo_lines_parse() {
        let line = "36 35 0:52 / /mnt/my\\040pods rw,nosuid,nodev - fuse.podfs podfs rw,user_id=0";
        let m = parse_mountinfo_line(line).unwrap();
        assert_eq!(m.point, PathBuf::from("/mnt/my pods"));
        assert_eq!(m.dev, libc::makedev(0, 52));
        assert!(m.is_podfs());
        let line = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw";
        let m = parse_mountinfo_line(line).unwrap();
        assert_eq!((m.fstype.as_str(), m.is_podfs()), ("ext4", false));
        assert!(!mounts().is_empty(), "/proc/self/mountinfo lists the root");
    }
}
