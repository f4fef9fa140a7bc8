//! Walking a local directory tree into manifest-shaped entries, without following symlinks.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::manifest::{Entry, Kind};
use super::{PodError, PodResult};

/// The manifest entry for a path found under the scanned root (without `data`), or `None`
/// for a socket, FIFO or device.
fn entry_from(path: String, md: &std::fs::Metadata, target: Option<String>) -> Option<Entry> {
    let ft = md.file_type();
    let kind = if ft.is_file() {
        Kind::File
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else {
        return None;
    };
    Some(Entry {
        path,
        kind,
        mode: md.mode() & 0o7777,
        mtime: md.mtime(),
        mtime_nsec: md.mtime_nsec().clamp(0, 999_999_999) as u32,
        size: if kind == Kind::File { md.len() } else { 0 },
        target,
        data: None,
    })
}

/// What a scan found: entries sorted by path bytes, and what it skipped.
#[derive(Debug, Default)]
pub struct Scan {
    /// Manifest-shaped entries with no `data` yet.
    pub entries: Vec<Entry>,
    /// Sockets, FIFOs and device files, which a pod cannot hold, and excluded directories.
    pub skipped: Vec<PathBuf>,
}

/// Directories a scan leaves out, by identity (device, inode), e.g. podfs's own volume dir.
#[derive(Debug, Clone, Default)]
pub struct Exclude(Vec<(u64, u64)>);

impl Exclude {
    /// Excludes each existing directory of `dirs` (missing ones are ignored).
    pub fn dirs(dirs: &[PathBuf]) -> Self {
        Self(
            dirs.iter()
                .filter_map(|d| std::fs::metadata(d).ok())
                .map(|m| (m.dev(), m.ino()))
                .collect(),
        )
    }
    fn contains(&self, md: &std::fs::Metadata) -> bool {
        self.0.contains(&(md.dev(), md.ino()))
    }
}

/// Scans `root` (which must be a directory), leaving out `exclude`. Paths must be UTF-8 and
/// free of backslashes.
pub fn scan(root: &Path, exclude: &Exclude) -> PodResult<Scan> {
    let md = std::fs::metadata(root).map_err(PodError::io(root))?;
    if !md.is_dir() {
        return Err(PodError::Unsupported {
            path: root.to_owned(),
            reason: "not a directory".into(),
        });
    }
    let mut out = Scan::default();
    walk(root, "", exclude, &mut out)?;
    out.entries
        .sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    Ok(out)
}

fn walk(dir: &Path, rel: &str, exclude: &Exclude, out: &mut Scan) -> PodResult<()> {
    let rd = std::fs::read_dir(dir).map_err(PodError::io(dir))?;
    for entry in rd {
        let entry = entry.map_err(PodError::io(dir))?;
        let abs = entry.path();
        let name = entry.file_name();
        let name = match std::str::from_utf8(name.as_bytes()) {
            Ok(n) if !n.contains('\\') => n.to_owned(),
            _ => {
                return Err(PodError::Unsupported {
                    path: abs,
                    reason: "file names must be UTF-8 without '\\' to be saved in a pod: rename it"
                        .into(),
                });
            }
        };
        let path = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let md = match std::fs::symlink_metadata(&abs) {
            Ok(md) => md,
            // Removed while we walked: it is simply not part of this snapshot.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(PodError::io(&abs)(e)),
        };
        let target = if md.file_type().is_symlink() {
            let t = std::fs::read_link(&abs).map_err(PodError::io(&abs))?;
            match t.to_str() {
                Some(t) => Some(t.to_owned()),
                None => {
                    return Err(PodError::Unsupported {
                        path: abs,
                        reason: "symlink targets must be UTF-8 to be saved in a pod".into(),
                    });
                }
            }
        } else {
            None
        };
        if md.is_dir() && exclude.contains(&md) {
            out.skipped.push(abs);
            continue;
        }
        match entry_from(path, &md, target) {
            Some(s) => {
                let is_dir = s.kind == Kind::Dir;
                let rel = s.path.clone();
                out.entries.push(s);
                if is_dir {
                    walk(&abs, &rel, exclude, out)?;
                }
            }
            None => out.skipped.push(abs),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_files_dirs_and_symlinks_sorted() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("a/b")).unwrap();
        std::fs::create_dir(r.join("a-b")).unwrap();
        std::fs::write(r.join("a/b/f"), b"hello").unwrap();
        std::os::unix::fs::symlink("../x", r.join("a/l")).unwrap();
        let s = scan(r, &Exclude::default()).unwrap();
        let paths: Vec<_> = s.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["a", "a-b", "a/b", "a/b/f", "a/l"]);
        assert_eq!(s.entries[3].size, 5);
        assert_eq!(s.entries[4].target.as_deref(), Some("../x"));
        assert_eq!(s.entries[4].kind, Kind::Symlink);

        let s = scan(r, &Exclude::dirs(&[r.join("a/b")])).unwrap();
        let paths: Vec<_> = s.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["a", "a-b", "a/l"]);
        assert_eq!(s.skipped, [r.join("a/b")]);
    }
}
