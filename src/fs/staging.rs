//! A pod's staging dir on local disk (`staging/mount/REMOTE/POD/` in the volume dir): the
//! journal of changes made through a mount and not yet saved, and the data files of the files
//! written.
//!
//! ```text
//! journal      line 1: {"podfs_journal":1,"base":N}, then one Op per line (src/fs/overlay.rs)
//! data/ID      the bytes of a staged file
//! ```
//!
//! Crash safety: an operation is appended to the journal (one `write`) before it is answered, and
//! written bytes are in their data file before the write is answered, so whatever a writer saw
//! acknowledged is in the page cache of the staging disk when the daemon dies (a power loss can
//! take what was not yet saved, as on any file system: `fsync` means "committed on the remote"
//! here). A journal line cut short by a crash was never acknowledged: replay drops it.
//! After a commit the journal is rewritten (a new file renamed over the old one) to start at the
//! committed version, with the operations that came in during the save.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::overlay::Op;

const JOURNAL: &str = "journal";
const DATA: &str = "data";
const FORMAT: u32 = 1;

/// The journal's first line.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    podfs_journal: u32,
    /// The committed version the operations apply to (none: a new pod).
    base: Option<u64>,
}

/// Why a staging dir cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{0} is in use by another podfs mount of this volume dir: unmount it to write to this pod here"
    )]
    InUse(PathBuf),
    #[error(
        "{path}: line {line} of the journal is damaged ({reason}); the staged changes are kept there, unsaved: move the directory away to start afresh"
    )]
    Damaged {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StagingError + '_ {
    move |source| StagingError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What a staging dir held when it was opened.
#[derive(Debug)]
pub struct Recovered {
    /// The version the operations apply to.
    pub base: Option<u64>,
    pub ops: Vec<Op>,
}

/// An open staging dir, locked against other mounts of the same volume dir.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    journal: File,
    /// Bytes in the journal.
    len: u64,
    next_id: u64,
}

impl Staging {
    /// Opens (creating it if needed) the staging dir `dir`, and what it holds. A new journal
    /// starts at `base`.
    pub fn open(dir: &Path, base: Option<u64>) -> Result<(Self, Option<Recovered>), StagingError> {
        let data = dir.join(DATA);
        std::fs::create_dir_all(&data).map_err(io(&data))?;
        let path = dir.join(JOURNAL);
        let journal = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        if journal.try_lock().is_err() {
            return Err(StagingError::InUse(dir.to_owned()));
        }
        let recovered = read_journal(&path, &journal)?;
        let next_id = std::fs::read_dir(&data)
            .map_err(io(&data))?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
            .max()
            .map_or(1, |m| m + 1);
        let mut staging = Self {
            dir: dir.to_owned(),
            journal,
            len: 0,
            next_id,
        };
        match recovered {
            Some((rec, len)) => {
                staging.len = len;
                // A line cut short by a crash is dropped, so that the next append starts clean.
                if staging.journal.metadata().map_err(io(&path))?.len() != len {
                    staging.journal.set_len(len).map_err(io(&path))?;
                }
                Ok((staging, Some(rec)))
            }
            None => {
                staging.start(base)?;
                Ok((staging, None))
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The data file of staged id `id`.
    pub fn data_path(&self, id: u64) -> PathBuf {
        self.dir.join(DATA).join(id.to_string())
    }

    /// A new, empty data file.
    pub fn new_data(&mut self) -> Result<(u64, File), StagingError> {
        let id = self.next_id;
        self.next_id += 1;
        let path = self.data_path(id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        Ok((id, file))
    }

    /// Removes the data file of `id` (gone already: fine).
    pub fn remove_data(&self, id: u64) {
        let path = self.data_path(id);
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("cannot remove {}: {e}", path.display());
        }
    }

    /// Bytes in the journal: where the operations after now start.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Appends `op` (one `write`, so a crash leaves it whole or cut short, never mixed).
    pub fn append(&mut self, op: &Op) -> Result<(), StagingError> {
        let mut line = serde_json::to_vec(op).map_err(|e| StagingError::Io {
            path: self.dir.join(JOURNAL),
            source: std::io::Error::other(e),
        })?;
        line.push(b'\n');
        let path = self.dir.join(JOURNAL);
        if let Err(e) = self.journal.write_all(&line) {
            // A short write (a full disk) leaves part of a line: cut it off again.
            let _ = self.journal.set_len(self.len);
            return Err(io(&path)(e));
        }
        self.len += line.len() as u64;
        Ok(())
    }

    /// Starts the journal afresh at `base`, keeping the operations appended since byte `from`:
    /// the tree up to `from` is committed as `base`.
    pub fn restart(&mut self, base: Option<u64>, from: u64) -> Result<(), StagingError> {
        let path = self.dir.join(JOURNAL);
        let all = std::fs::read(&path).map_err(io(&path))?;
        let tail = all
            .get(usize::try_from(from).unwrap_or(usize::MAX)..)
            .unwrap_or(&[]);
        let tmp = self.dir.join("journal.new");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        let mut head = serde_json::to_vec(&Header {
            podfs_journal: FORMAT,
            base,
        })
        .map_err(|e| io(&tmp)(std::io::Error::other(e)))?;
        head.push(b'\n');
        f.write_all(&head).map_err(io(&tmp))?;
        f.write_all(tail).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        let journal = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        journal
            .try_lock()
            .map_err(|_| StagingError::InUse(self.dir.clone()))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.journal = journal;
        self.len = (head.len() + tail.len()) as u64;
        Ok(())
    }

    /// A new journal at `base`, with no operations.
    fn start(&mut self, base: Option<u64>) -> Result<(), StagingError> {
        let from = self.len;
        self.restart(base, from)?;
        self.len = self.journal.metadata().map_err(io(&self.dir))?.len();
        Ok(())
    }

    /// Removes the staging dir (nothing is staged and nothing is open).
    pub fn remove(self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!("cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// Where a mount stages the changes to `pod` of remote `remote`, below the volume's staging dir.
pub fn pod_dir(staging: &Path, remote: &str, pod: &str) -> PathBuf {
    staging.join("mount").join(remote).join(pod)
}

/// `(remote, pod)` of every pod with a journal below the volume's staging dir `staging`
/// (changes a mount staged and has not saved yet), sorted.
pub fn staged_pods(staging: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let dirs = |p: &Path| std::fs::read_dir(p).into_iter().flatten().flatten();
    for remote in dirs(&staging.join("mount")) {
        for pod in dirs(&remote.path()) {
            if pod.path().join(JOURNAL).is_file() {
                out.push((
                    remote.file_name().to_string_lossy().into_owned(),
                    pod.file_name().to_string_lossy().into_owned(),
                ));
            }
        }
    }
    out.sort();
    out
}

/// The version the journal in `dir` starts from, if there is a journal (`Some(None)`: a new
/// pod's).
pub fn journal_base(dir: &Path) -> Option<Option<u64>> {
    let f = File::open(dir.join(JOURNAL)).ok()?;
    let mut line = Vec::new();
    std::io::BufReader::new(f)
        .read_until(b'\n', &mut line)
        .ok()?;
    serde_json::from_slice::<Header>(&line).ok().map(|h| h.base)
}

/// The journal's header and operations, and its length up to the last whole line; `None` if it
/// is empty (new).
fn read_journal(path: &Path, f: &File) -> Result<Option<(Recovered, u64)>, StagingError> {
    let mut reader = std::io::BufReader::new(f);
    let mut line = Vec::new();
    let mut len = 0u64;
    let mut header: Option<Header> = None;
    let mut ops = Vec::new();
    let mut n = 0;
    loop {
        line.clear();
        let got = reader.read_until(b'\n', &mut line).map_err(io(path))?;
        if got == 0 {
            break;
        }
        n += 1;
        if line.last() != Some(&b'\n') {
            tracing::info!(
                "{}: dropping line {n}, cut short by a crash (it was never acknowledged)",
                path.display()
            );
            break;
        }
        let damaged = |reason: String| StagingError::Damaged {
            path: path.to_owned(),
            line: n,
            reason,
        };
        if header.is_none() {
            let h: Header = serde_json::from_slice(&line).map_err(|e| damaged(e.to_string()))?;
            if h.podfs_journal != FORMAT {
                return Err(damaged(format!(
                    "journal format {} (this podfs reads {FORMAT})",
                    h.podfs_journal
                )));
            }
            header = Some(h);
        } else {
            ops.push(serde_json::from_slice(&line).map_err(|e| damaged(e.to_string()))?);
        }
        len += got as u64;
    }
    Ok(header.map(|h| (Recovered { base: h.base, ops }, len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_replays_whole_lines_and_restarts_with_its_tail() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pod");
        let (mut s, rec) = Staging::open(&dir, Some(3)).unwrap();
        assert!(rec.is_none());
        assert!(
            matches!(Staging::open(&dir, None), Err(StagingError::InUse(_))),
            "locked against a second mount"
        );
        s.append(&Op::Remove("a".into())).unwrap();
        let mid = s.len();
        s.append(&Op::Remove("b".into())).unwrap();
        let (id, _) = s.new_data().unwrap();
        drop(s);
        // A crash in the middle of an append.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.join(JOURNAL))
            .unwrap();
        f.write_all(b"{\"remove\":\"c").unwrap();

        let (mut s, rec) = Staging::open(&dir, None).unwrap();
        let rec = rec.unwrap();
        assert_eq!(rec.base, Some(3));
        assert_eq!(rec.ops, [Op::Remove("a".into()), Op::Remove("b".into())]);
        assert_eq!(s.new_data().unwrap().0, id + 1, "ids are not reused");
        s.restart(Some(4), mid).unwrap();
        s.append(&Op::Remove("d".into())).unwrap();
        drop(s);
        let (_, rec) = Staging::open(&dir, None).unwrap();
        let rec = rec.unwrap();
        assert_eq!(rec.base, Some(4));
        assert_eq!(rec.ops, [Op::Remove("b".into()), Op::Remove("d".into())]);
    }
}
