//! Walking a local directory tree into manifest-shaped entries, without following symlinks.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::fence::{Fences, Reason};
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

/// What a scan found: entries sorted by path bytes, and what it left out.
#[derive(Debug, Default)]
pub struct Scan {
    /// Manifest-shaped entries with no `data` yet.
    pub entries: Vec<Entry>,
    /// What was left out, in the order met.
    pub skipped: Vec<Skipped>,
    /// Paths whose names a pod cannot hold (not UTF-8, or with `\`), found by a lenient scan.
    pub foreign: Vec<PathBuf>,
}

/// A path a scan left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    /// `None`: a socket, FIFO or device, which a pod cannot hold.
    pub fence: Option<Reason>,
}

/// How to scan.
#[derive(Debug, Clone, Default)]
pub struct ScanOptions {
    /// Directories not to enter.
    pub fences: Fences,
    /// Collect names a pod cannot hold in [`Scan::foreign`] instead of failing (a load's scan of
    /// its target: such files are not the pod's business).
    pub lenient_names: bool,
}

/// Scans `root` (which must be a directory). Paths must be UTF-8 and free of backslashes, unless
/// `opts.lenient_names`.
pub fn scan(root: &Path, opts: &ScanOptions) -> PodResult<Scan> {
    let md = std::fs::metadata(root).map_err(PodError::io(root))?;
    if !md.is_dir() {
        return Err(PodError::Unsupported {
            path: root.to_owned(),
            reason: "not a directory".into(),
        });
    }
    let mut out = Scan::default();
    walk(root, "", opts, &mut out)?;
    out.entries
        .sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    Ok(out)
}

fn walk(dir: &Path, rel: &str, opts: &ScanOptions, out: &mut Scan) -> PodResult<()> {
    let rd = std::fs::read_dir(dir).map_err(PodError::io(dir))?;
    for entry in rd {
        let entry = entry.map_err(PodError::io(dir))?;
        let abs = entry.path();
        let name = entry.file_name();
        let name = match std::str::from_utf8(name.as_bytes()) {
            Ok(n) if !n.contains('\\') => n.to_owned(),
            _ if opts.lenient_names => {
                out.foreign.push(abs);
                continue;
            }
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
            // A dead podfs mount answers ENOTCONN: it is left out like a live one.
            Err(e) => match opts.fences.reason(&abs, None) {
                Some(fence) => {
                    out.skipped.push(Skipped {
                        path: abs,
                        fence: Some(fence),
                    });
                    continue;
                }
                None => return Err(PodError::io(&abs)(e)),
            },
        };
        if let Some(fence) = opts.fences.reason(&abs, Some(&md)) {
            out.skipped.push(Skipped {
                path: abs,
                fence: Some(fence),
            });
            continue;
        }
        let target = if md.file_type().is_symlink() {
            let t = std::fs::read_link(&abs).map_err(PodError::io(&abs))?;
            match t.to_str() {
                Some(t) => Some(t.to_owned()),
                None if opts.lenient_names => {
                    out.foreign.push(abs);
                    continue;
                }
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
        match entry_from(path, &md, target) {
            Some(s) => {
                let is_dir = s.kind == Kind::Dir;
                let rel = s.path.clone();
                out.entries.push(s);
                if is_dir {
                    walk(&abs, &rel, opts, out)?;
                }
            }
            None => out.skipped.push(Skipped {
                path: abs,
                fence: None,
            }),
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
        let s = scan(r, &ScanOptions::default()).unwrap();
        let paths: Vec<_> = s.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["a", "a-b", "a/b", "a/b/f", "a/l"]);
        assert_eq!(s.entries[3].size, 5);
        assert_eq!(s.entries[4].target.as_deref(), Some("../x"));
        assert_eq!(s.entries[4].kind, Kind::Symlink);

        let opts = ScanOptions {
            fences: Fences::new(r, &[r.join("a/b")], false),
            ..ScanOptions::default()
        };
        let s = scan(r, &opts).unwrap();
        let paths: Vec<_> = s.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["a", "a-b", "a/l"]);
        assert_eq!(
            s.skipped,
            [Skipped {
                path: r.join("a/b"),
                fence: Some(Reason::Volume)
            }]
        );
    }
}
