//! Writing state objects: a zip of the files that are new or changed in a version.
//!
//! Entries are named by their path in the tree. Files smaller than the compression threshold are
//! deflated; larger ones are stored, so any byte range of them is one range read. Files of 4 GiB
//! and more get zip64 records. After writing, the zip's central directory is read back to learn
//! each entry's data offset, compressed size and CRC-32 for the manifest. The CRC-32C of each
//! block of a file larger than one block is computed as its bytes stream into the zip, in the
//! same pass.

use std::fs::File;
use std::io::{self, BufWriter, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tokio::sync::watch;

use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, DateTime};

use super::blocks::{BlockHasher, CHECK_BLOCK};
use super::manifest::{Blocks, Method};
use super::{PodError, PodResult};
use tokio_util::sync::CancellationToken;

use crate::progress::Progress;
use crate::remote::Growing;

/// Files below this size are deflated by default.
pub const DEFAULT_COMPRESS_BELOW: u64 = 1 << 20;

/// A file to put into a state zip.
#[derive(Debug, Clone)]
pub struct StateInput {
    /// The entry name: the file's path in the tree.
    pub name: String,
    /// Where to read it from.
    pub source: PathBuf,
    /// Its size when scanned (decides compression; the written size is measured).
    pub size: u64,
    pub mode: u32,
    pub mtime: i64,
}

/// Where an entry's data landed in the written state zip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    pub offset: u64,
    pub csize: u64,
    pub size: u64,
    pub method: Method,
    pub crc32: u32,
    /// CRC-32C of each [`CHECK_BLOCK`] block, for files larger than one block.
    pub blocks: Option<Box<Blocks>>,
}

/// How many bytes a tracked zip writes between two reports of how far it is.
const REPORT_EVERY: u64 = 4 << 20;

/// Writes `inputs` as a zip into `dest` and returns, in input order, where each entry's data is.
/// Stops with an error soon after `cancel` is cancelled. `growing`, if given, is told how far
/// the file is written and which bytes may still change (an entry's header, until the entry is
/// done), so that an upload can run while it is written ([`Remote::put_state_growing`]); its
/// end is set once the zip is complete.
///
/// [`Remote::put_state_growing`]: crate::remote::Remote::put_state_growing
pub fn write_state_zip(
    dest: &Path,
    inputs: &[StateInput],
    compress_below: u64,
    progress: &dyn Progress,
    cancel: &CancellationToken,
    growing: Option<&watch::Sender<Growing>>,
) -> PodResult<Vec<StoredEntry>> {
    let file = File::create(dest).map_err(PodError::io(dest))?;
    let end = Arc::new(AtomicU64::new(0));
    let tracked = Tracked {
        file,
        pos: 0,
        end: Arc::clone(&end),
    };
    let mut zip = zip::ZipWriter::new(BufWriter::with_capacity(1 << 20, tracked));
    let zip_err = |e: zip::result::ZipError| PodError::io(dest)(io::Error::other(e));
    // Flushes what the zip holds and reports it, with `open` the bytes that may still change.
    let report = |zip: &mut zip::ZipWriter<BufWriter<Tracked>>, open: Option<Range<u64>>| {
        let Some(g) = growing else {
            return Ok::<_, io::Error>(0);
        };
        io::Write::flush(zip)?;
        let written = end.load(Relaxed);
        g.send_modify(|g| {
            g.written = written;
            g.open = open;
        });
        Ok(written)
    };
    let mut sums = Vec::with_capacity(inputs.len());
    let mut header: Option<Range<u64>> = None;
    for input in inputs {
        let (method, level) = if input.size < compress_below {
            (CompressionMethod::Deflated, Some(1))
        } else {
            (CompressionMethod::Stored, None)
        };
        let opts = SimpleFileOptions::default()
            .compression_method(method)
            .compression_level(level)
            .unix_permissions(input.mode)
            .large_file(input.size >= u32::MAX as u64)
            .last_modified_time(dos_time(input.mtime));
        // The previous entry's header is rewritten when this one starts.
        let at = report(&mut zip, header.take()).map_err(PodError::io(dest))?;
        zip.start_file(input.name.as_str(), opts).map_err(zip_err)?;
        if growing.is_some() {
            let data_at = report(&mut zip, Some(at..u64::MAX)).map_err(PodError::io(dest))?;
            header = Some(at..data_at);
        }
        let src = File::open(&input.source).map_err(PodError::io(&input.source))?;
        // A file that grew past 4 GiB after the scan would need zip64 we did not ask for: cap it.
        let limit = if input.size >= u32::MAX as u64 {
            u64::MAX
        } else {
            u32::MAX as u64 - 1
        };
        let mut reader = Counting {
            inner: src.take(limit),
            progress,
            cancel,
            blocks: BlockHasher::new(CHECK_BLOCK),
        };
        let mut since = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(PodError::io(&input.source)(e)),
            };
            io::Write::write_all(&mut zip, &buf[..n]).map_err(PodError::io(dest))?;
            since += n as u64;
            if since >= REPORT_EVERY {
                since = 0;
                report(&mut zip, header.clone()).map_err(PodError::io(dest))?;
            }
        }
        sums.push(reader.blocks.finish());
    }
    let mut out = zip.finish().map_err(zip_err)?;
    io::Write::flush(&mut out).map_err(PodError::io(dest))?;
    // Not synced: a backend that keeps this very file (the file remote links it) syncs it
    // itself; the others upload it from the page cache, and a sync here would first write it
    // all to disk (seconds per GiB).
    let written = out
        .into_inner()
        .map_err(|e| PodError::io(dest)(e.into_error()))?;
    let len = written.end.load(Relaxed);
    drop(written);
    if let Some(g) = growing {
        g.send_modify(|g| {
            g.written = len;
            g.open = None;
            g.end = Some(len);
        });
    }
    read_back(dest, inputs, sums)
}

/// Reads the central directory of a written state zip and maps each input to its data, with the
/// block checksums and byte count computed while it was written.
fn read_back(
    dest: &Path,
    inputs: &[StateInput],
    sums: Vec<(Vec<u32>, u64)>,
) -> PodResult<Vec<StoredEntry>> {
    let file = File::open(dest).map_err(PodError::io(dest))?;
    let zip_err = |e: zip::result::ZipError| PodError::io(dest)(io::Error::other(e));
    let mut zip = zip::ZipArchive::new(file).map_err(zip_err)?;
    if zip.len() != inputs.len() {
        return Err(PodError::io(dest)(io::Error::other(
            "state zip has the wrong number of entries",
        )));
    }
    let mut out = Vec::with_capacity(inputs.len());
    for (i, (input, (crc32c, hashed))) in inputs.iter().zip(sums).enumerate() {
        let f = zip.by_index_raw(i).map_err(zip_err)?;
        let offset = f.data_start().ok_or_else(|| {
            PodError::io(dest)(io::Error::other("zip entry without a data offset"))
        })?;
        if f.name().ok().as_deref() != Some(input.name.as_str()) {
            return Err(PodError::io(dest)(io::Error::other(
                "state zip entries are out of order",
            )));
        }
        let method = match f.compression() {
            CompressionMethod::Stored => Method::Stored,
            CompressionMethod::Deflated => Method::Deflate,
            other => {
                return Err(PodError::io(dest)(io::Error::other(format!(
                    "unexpected compression {other:?}"
                ))));
            }
        };
        if hashed != f.size() {
            return Err(PodError::io(dest)(io::Error::other(format!(
                "zip entry {:?} has {} bytes, {hashed} were read",
                input.name,
                f.size()
            ))));
        }
        // A file of one block is checked by its CRC-32 alone.
        let blocks = (hashed > CHECK_BLOCK).then(|| {
            Box::new(Blocks {
                size: CHECK_BLOCK,
                crc32c,
            })
        });
        out.push(StoredEntry {
            offset,
            csize: f.compressed_size(),
            size: f.size(),
            method,
            crc32: f.crc32(),
            blocks,
        });
    }
    Ok(out)
}

/// Counts bytes read into a progress reporter and hashes each block of them.
/// The zip's file, counting how far it is written (the zip seeks back to rewrite headers).
struct Tracked {
    file: File,
    pos: u64,
    /// The furthest byte written, shared with whoever reports it.
    end: Arc<AtomicU64>,
}

impl io::Write for Tracked {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = io::Write::write(&mut self.file, buf)?;
        self.pos += n as u64;
        self.end.fetch_max(self.pos, Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        io::Write::flush(&mut self.file)
    }
}

impl io::Seek for Tracked {
    fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
        self.pos = io::Seek::seek(&mut self.file, to)?;
        Ok(self.pos)
    }
}

struct Counting<'a, R> {
    inner: R,
    progress: &'a dyn Progress,
    cancel: &'a CancellationToken,
    blocks: BlockHasher,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancel.is_cancelled() {
            return Err(io::Error::other("cancelled"));
        }
        let n = self.inner.read(buf)?;
        self.progress.advance(n as u64);
        self.blocks.update(&buf[..n]);
        Ok(n)
    }
}

/// The zip (MS-DOS, UTC) timestamp for a Unix time; out-of-range times get the zip default.
fn dos_time(unix: i64) -> DateTime {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let parts = (
        u16::try_from(year),
        u8::try_from(month),
        u8::try_from(day),
        u8::try_from(secs / 3600),
        u8::try_from(secs % 3600 / 60),
        u8::try_from(secs % 60),
    );
    match parts {
        (Ok(y), Ok(mo), Ok(d), Ok(h), Ok(mi), Ok(s)) => {
            DateTime::from_date_and_time(y, mo, d, h, mi, s).unwrap_or_default()
        }
        _ => DateTime::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;
    use std::os::unix::fs::FileExt;

    fn input(dir: &Path, name: &str, data: &[u8]) -> StateInput {
        let source = dir.join(name.replace('/', "_"));
        std::fs::write(&source, data).unwrap();
        StateInput {
            name: name.into(),
            source,
            size: data.len() as u64,
            mode: 0o644,
            mtime: 1_700_000_000,
        }
    }

    /// Every report of a tracked zip names bytes that are in the file and never change again:
    /// an upload may take them at once.
    #[test]
    fn a_tracked_zip_reports_only_bytes_that_never_change() {
        let d = tempfile::tempdir().unwrap();
        let noise = |n: u32, k: u32| -> Vec<u8> {
            (0..n)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> (k % 24)) as u8)
                .collect()
        };
        let inputs = vec![
            input(d.path(), "a.bin", &noise(9 << 20, 3)),
            input(d.path(), "small.txt", b"small"),
            input(d.path(), "b.bin", &noise(6 << 20, 7)),
        ];
        let dest = d.path().join("state.zip");
        let (tx, mut rx) = watch::channel(Growing::default());
        let watched = dest.clone();
        let watcher = std::thread::spawn(move || {
            let mut seen = Vec::new();
            loop {
                let g = rx.borrow_and_update().clone();
                if g.written > 0 {
                    let bytes = std::fs::read(&watched).unwrap();
                    seen.push((g.clone(), bytes));
                }
                if g.end.is_some() {
                    return seen;
                }
                while !rx.has_changed().unwrap_or(true) {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        });
        write_state_zip(
            &dest,
            &inputs,
            DEFAULT_COMPRESS_BELOW,
            &NoProgress,
            &CancellationToken::new(),
            Some(&tx),
        )
        .unwrap();
        let seen = watcher.join().unwrap();
        let last = std::fs::read(&dest).unwrap();
        assert_eq!(tx.borrow().end, Some(last.len() as u64));
        assert!(seen.len() > 3, "{} reports", seen.len());
        let mut headers_hidden = 0;
        for (g, bytes) in &seen {
            let written = usize::try_from(g.written).unwrap();
            assert!(bytes.len() >= written);
            for i in 0..written {
                let open = g.open.as_ref().is_some_and(|o| o.contains(&(i as u64)));
                if open {
                    headers_hidden += 1;
                } else {
                    assert_eq!(bytes[i], last[i], "byte {i} changed after it was reported");
                }
            }
        }
        assert!(
            headers_hidden > 0,
            "headers being written are reported as open"
        );
    }

    #[test]
    fn offsets_point_at_the_bytes() {
        let d = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let inputs = vec![
            input(d.path(), "small.txt", b"hello hello hello hello"),
            input(d.path(), "dir/big.bin", &big),
            input(d.path(), "empty", b""),
        ];
        let dest = d.path().join("state.zip");
        let stored = write_state_zip(
            &dest,
            &inputs,
            DEFAULT_COMPRESS_BELOW,
            &NoProgress,
            &CancellationToken::new(),
            None,
        )
        .unwrap();
        assert_eq!(stored[0].method, Method::Deflate);
        assert_eq!(stored[1].method, Method::Stored);
        let f = File::open(&dest).unwrap();
        let mut buf = vec![0; stored[1].csize as usize];
        f.read_exact_at(&mut buf, stored[1].offset).unwrap();
        assert_eq!(buf, big);
        assert_eq!(stored[1].crc32, crc32fast::hash(&big));
        // 3,000,000 bytes: eleven whole 256 KiB blocks and a short one, hashed as they were
        // zipped.
        let sums: Vec<u32> = big
            .chunks(256 << 10)
            .map(crate::pod::blocks::crc32c)
            .collect();
        assert_eq!(sums.len(), 12);
        assert_eq!(stored[1].blocks.as_ref().map(|b| &b.crc32c), Some(&sums));
        assert!(stored[0].blocks.is_none() && stored[2].blocks.is_none());
        assert_eq!(stored[2].size, 0);
        // The first entry decompresses from its offset.
        let mut c = vec![0; stored[0].csize as usize];
        f.read_exact_at(&mut c, stored[0].offset).unwrap();
        let mut out = Vec::new();
        flate2::read::DeflateDecoder::new(&c[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"hello hello hello hello");
    }

    /// Files of 4 GiB and more need zip64: the entry's size and offset must survive.
    #[test]
    fn zip64_for_files_over_4_gib() {
        let d = tempfile::tempdir().unwrap();
        let size = (4u64 << 30) + 4096;
        let source = d.path().join("huge");
        let f = File::create(&source).unwrap();
        f.set_len(size).unwrap(); // sparse: zeros
        f.write_all_at(b"tail", size - 4).unwrap();
        let inputs = vec![
            input(d.path(), "first", b"abc"),
            StateInput {
                name: "huge".into(),
                source,
                size,
                mode: 0o600,
                mtime: 0,
            },
            input(d.path(), "after", b"after the huge one"),
        ];
        let dest = d.path().join("state.zip");
        let stored = write_state_zip(
            &dest,
            &inputs,
            DEFAULT_COMPRESS_BELOW,
            &NoProgress,
            &CancellationToken::new(),
            None,
        )
        .unwrap();
        assert_eq!(stored[1].size, size);
        assert_eq!(stored[1].csize, size);
        assert!(
            stored[2].offset > size,
            "entry after a 4 GiB one has a 64-bit offset"
        );
        let z = File::open(&dest).unwrap();
        let mut tail = [0u8; 4];
        z.read_exact_at(&mut tail, stored[1].offset + size - 4)
            .unwrap();
        assert_eq!(&tail, b"tail");
        let mut after = vec![0; stored[2].csize as usize];
        z.read_exact_at(&mut after, stored[2].offset).unwrap();
        let mut out = Vec::new();
        flate2::read::DeflateDecoder::new(&after[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"after the huge one");
    }

    #[test]
    fn dos_times() {
        let t = dos_time(1_700_000_000); // 2023-11-14T22:13:20Z
        assert_eq!(
            (
                t.year(),
                t.month(),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            ),
            (2023, 11, 14, 22, 13, 20)
        );
        assert_eq!(dos_time(0), DateTime::default()); // before 1980
    }
}
