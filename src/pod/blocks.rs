//! Verified reads of single blocks: the per-block CRC-32C checksums of a file (docs/FORMAT.md,
//! *Block checksums*), computed while a save zips the file, and checked by every reader that
//! returns part of a file.
//!
//! A file's block `i` is bytes `i * B .. min((i + 1) * B, size)`, where `B` is the block size its
//! manifest entry records ([`BLOCK_SIZE`] when it records none). What can be checked:
//!
//! - a file with block checksums: every block on its own ([`verify_block`]);
//! - a file of at most one block: its only block against the whole-file CRC-32, so old pods and
//!   small (deflated) files need no checksums of their own;
//! - a larger file saved before block checksums existed: only the whole file, once one reader has
//!   read it from start to end in order ([`WholeFileCheck`]).
//!
//! [`block_checked`] tells which of these applies, so a reader can choose before it reads.

use std::ops::Range;

use super::manifest::Entry;

/// The block size of a file whose manifest entry records none, and the smallest unit a mount
/// fetches and caches while reading a file in order.
pub const BLOCK_SIZE: u64 = 1 << 20;

/// The block size podfs writes checksums with: a random read fetches and checks this much
/// around the bytes it needs (a remote's range request costs more the longer it is: on
/// LocalStack, 4.5 ms for 4 KiB, 5.1 ms for 256 KiB, 8.2 ms for 1 MiB), for 4 bytes of CRC-32C
/// (about 22 KiB of deflated manifest per GiB of file).
pub const CHECK_BLOCK: u64 = 256 << 10;

/// CRC-32C (Castagnoli, iSCSI) of `bytes`, hardware-accelerated where the CPU allows.
pub fn crc32c(bytes: &[u8]) -> u32 {
    // A CRC-32 fits in 32 bits; crc-fast returns every width as a u64.
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, bytes) as u32
}

/// Why a block failed its check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockMismatch {
    #[error("block {index} has {got} bytes where the file has {want}")]
    Length { index: u64, want: u64, got: u64 },
    #[error("block {index} has CRC-32C {actual:#010x} where the manifest says {expected:#010x}")]
    Crc32c {
        index: u64,
        expected: u32,
        actual: u32,
    },
    #[error("the file has CRC-32 {actual:#010x} where the manifest says {expected:#010x}")]
    Crc32 { expected: u32, actual: u32 },
    #[error("block {index} is past the end of the file ({blocks} blocks)")]
    OutOfRange { index: u64, blocks: u64 },
    /// Nothing in the manifest covers this block alone (a file larger than one block saved
    /// before block checksums existed): the caller checks it with a [`WholeFileCheck`].
    #[error("no checksum covers block {index} on its own (saved before block checksums)")]
    NoChecksum { index: u64 },
    #[error("not a file with data")]
    NotAFile,
}

impl BlockMismatch {
    /// The file offset where the bad bytes start (0 for a whole-file mismatch).
    pub fn offset(&self, entry: &Entry) -> u64 {
        match self {
            Self::Length { index, .. }
            | Self::Crc32c { index, .. }
            | Self::OutOfRange { index, .. }
            | Self::NoChecksum { index } => index.saturating_mul(block_size(entry)),
            Self::Crc32 { .. } | Self::NotAFile => 0,
        }
    }
}

/// The block size of `entry`: the one its checksums were made with, else [`BLOCK_SIZE`].
pub fn block_size(entry: &Entry) -> u64 {
    entry
        .data
        .as_ref()
        .and_then(|d| d.blocks.as_ref())
        .map_or(BLOCK_SIZE, |b| b.size)
}

/// How many blocks `entry` has (0 for an empty file).
pub fn block_count(entry: &Entry) -> u64 {
    entry.size.div_ceil(block_size(entry))
}

/// The file offsets of block `index` of `entry`: the last block may be short, a block past the
/// end is empty.
pub fn block_range(entry: &Entry, index: u64) -> Range<u64> {
    let b = block_size(entry);
    let start = index.saturating_mul(b).min(entry.size);
    start..start.saturating_add(b).min(entry.size)
}

/// Whether each block of `entry` can be checked on its own by [`verify_block`]; when not, only a
/// [`WholeFileCheck`] can check the file.
pub fn block_checked(entry: &Entry) -> bool {
    entry
        .data
        .as_ref()
        .is_some_and(|d| d.blocks.is_some() || entry.size <= BLOCK_SIZE)
}

/// Checks `bytes`, which should be block `index` of `entry` (all of it: a block's checksum covers
/// the whole block). A file of at most one block without block checksums is checked against its
/// whole-file CRC-32.
pub fn verify_block(entry: &Entry, index: u64, bytes: &[u8]) -> Result<(), BlockMismatch> {
    let Some(data) = &entry.data else {
        return Err(BlockMismatch::NotAFile);
    };
    let blocks = block_count(entry);
    if index >= blocks && !(index == 0 && entry.size == 0) {
        return Err(BlockMismatch::OutOfRange { index, blocks });
    }
    let want = block_range(entry, index);
    let (want, got) = (want.end - want.start, bytes.len() as u64);
    if got != want {
        return Err(BlockMismatch::Length { index, want, got });
    }
    match &data.blocks {
        Some(b) => {
            let i = usize::try_from(index).ok();
            let expected = i.and_then(|i| b.crc32c.get(i)).copied().ok_or(
                // The manifest was validated: one checksum per block.
                BlockMismatch::OutOfRange { index, blocks },
            )?;
            let actual = crc32c(bytes);
            if actual != expected {
                return Err(BlockMismatch::Crc32c {
                    index,
                    expected,
                    actual,
                });
            }
            Ok(())
        }
        None if entry.size <= BLOCK_SIZE => {
            let actual = crc32fast::hash(bytes);
            if actual != data.crc32 {
                return Err(BlockMismatch::Crc32 {
                    expected: data.crc32,
                    actual,
                });
            }
            Ok(())
        }
        None => Err(BlockMismatch::NoChecksum { index }),
    }
}

/// Checks `bytes`, which should be bytes `span` of `entry`: every block it covers, with
/// [`verify_block`]. `span` starts on a block boundary and ends on one or at the end of the
/// file.
pub fn verify_span(entry: &Entry, span: Range<u64>, bytes: &[u8]) -> Result<(), BlockMismatch> {
    let b = block_size(entry);
    if bytes.len() as u64 != span.end.saturating_sub(span.start) || !span.start.is_multiple_of(b) {
        let index = span.start / b;
        let got = bytes.len() as u64;
        return Err(BlockMismatch::Length {
            index,
            want: span.end - span.start,
            got,
        });
    }
    for index in span.start / b..span.end.div_ceil(b) {
        let r = block_range(entry, index);
        let at = (r.start - span.start) as usize..(r.end.min(span.end) - span.start) as usize;
        verify_block(entry, index, &bytes[at])?;
    }
    Ok(())
}

/// Where a [`WholeFileCheck`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WholeFile {
    /// Reading in order; not all of the file yet.
    Reading,
    /// Every byte was read in order and the CRC-32 matched.
    Verified,
    /// A read skipped ahead, so this handle cannot check the file (another handle may).
    Abandoned,
}

/// The whole-file CRC-32 of a file read from start to end by one handle, for files that have no
/// block checksums. Reads are fed in as they are returned; bytes at or after the next expected
/// offset extend the check, bytes before it (a re-read) are ignored, a gap abandons it. The
/// mismatch can only be reported by the read that completes the file: earlier reads of the same
/// file have returned bytes that were not checked yet.
#[derive(Debug, Clone)]
pub struct WholeFileCheck {
    hasher: crc32fast::Hasher,
    next: u64,
    size: u64,
    expected: u32,
    state: WholeFile,
}

impl WholeFileCheck {
    /// A check of `entry`, or `None` if it is not a file with data.
    pub fn new(entry: &Entry) -> Option<Self> {
        let data = entry.data.as_ref()?;
        Some(Self {
            hasher: crc32fast::Hasher::new(),
            next: 0,
            size: entry.size,
            expected: data.crc32,
            state: WholeFile::Reading,
        })
    }

    /// Feeds `bytes`, read at file offset `offset`. Fails when they complete the file and its
    /// CRC-32 does not match (or they run past its size).
    pub fn update(&mut self, offset: u64, bytes: &[u8]) -> Result<WholeFile, BlockMismatch> {
        if self.state != WholeFile::Reading {
            return Ok(self.state);
        }
        if offset > self.next {
            self.state = WholeFile::Abandoned;
            return Ok(self.state);
        }
        let end = offset.saturating_add(bytes.len() as u64);
        if end > self.size {
            self.state = WholeFile::Abandoned;
            return Err(BlockMismatch::Length {
                index: 0,
                want: self.size,
                got: end,
            });
        }
        if end > self.next {
            // `next - offset` < `bytes.len()`, so it fits in usize.
            let skip = usize::try_from(self.next - offset).unwrap_or(bytes.len());
            self.hasher.update(&bytes[skip..]);
            self.next = end;
        }
        if self.next == self.size {
            let actual = self.hasher.clone().finalize();
            if actual != self.expected {
                self.state = WholeFile::Abandoned;
                return Err(BlockMismatch::Crc32 {
                    expected: self.expected,
                    actual,
                });
            }
            self.state = WholeFile::Verified;
        }
        Ok(self.state)
    }

    pub fn state(&self) -> WholeFile {
        self.state
    }
}

/// CRC-32C of each block of a byte stream, computed as the bytes stream past (a save computes
/// them while it zips the file, in the same pass).
#[derive(Debug)]
pub struct BlockHasher {
    block: u64,
    digest: crc_fast::Digest,
    filled: u64,
    sums: Vec<u32>,
}

impl BlockHasher {
    /// A hasher of `block`-byte blocks (at least 1).
    pub fn new(block: u64) -> Self {
        Self {
            block: block.max(1),
            digest: crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi),
            filled: 0,
            sums: Vec::new(),
        }
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let room = self.block - self.filled;
            let take = usize::try_from(room).map_or(bytes.len(), |r| r.min(bytes.len()));
            self.digest.update(&bytes[..take]);
            self.filled += take as u64;
            if self.filled == self.block {
                self.sums.push(self.digest.finalize_reset() as u32);
                self.filled = 0;
            }
            bytes = &bytes[take..];
        }
    }

    /// The checksum of every block, the last one possibly short, and the bytes hashed.
    pub fn finish(mut self) -> (Vec<u32>, u64) {
        let total = self.sums.len() as u64 * self.block + self.filled;
        if self.filled > 0 {
            self.sums.push(self.digest.finalize() as u32);
        }
        (self.sums, total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::manifest::{Blocks, DataRef, Kind, Method};

    /// An entry for `bytes` with `block`-byte checksums, or none.
    fn entry(bytes: &[u8], block: Option<u64>) -> Entry {
        let blocks = block.map(|b| {
            let mut h = BlockHasher::new(b);
            h.update(bytes);
            Box::new(Blocks {
                size: b,
                crc32c: h.finish().0,
            })
        });
        Entry {
            path: "f".into(),
            kind: Kind::File,
            mode: 0o644,
            mtime: 0,
            mtime_nsec: 0,
            size: bytes.len() as u64,
            target: None,
            data: Some(DataRef {
                state: 1,
                offset: 0,
                csize: bytes.len() as u64,
                method: Method::Stored,
                crc32: crc32fast::hash(bytes),
                blocks,
            }),
        }
    }

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 253) as u8).collect()
    }

    fn block(data: &[u8], e: &Entry, i: u64) -> Vec<u8> {
        let r = block_range(e, i);
        data[r.start as usize..r.end as usize].to_vec()
    }

    #[test]
    fn a_span_is_checked_block_by_block() {
        let b = CHECK_BLOCK;
        let data = bytes((9 * b + 77) as usize);
        let e = entry(&data, Some(b));
        let span = |r: std::ops::Range<u64>| data[r.start as usize..r.end as usize].to_vec();
        // A 1 MiB unit, and the short last one.
        assert_eq!(verify_span(&e, 4 * b..8 * b, &span(4 * b..8 * b)), Ok(()));
        assert_eq!(verify_span(&e, 8 * b..e.size, &span(8 * b..e.size)), Ok(()));
        let mut bad = span(4 * b..8 * b);
        bad[(2 * b + 5) as usize] ^= 1;
        assert!(matches!(
            verify_span(&e, 4 * b..8 * b, &bad),
            Err(BlockMismatch::Crc32c { index: 6, .. })
        ));
        // Off a block boundary, or a length that is not the span's: refused.
        assert!(verify_span(&e, 10..b + 10, &span(10..b + 10)).is_err());
        assert!(verify_span(&e, 0..b, &span(0..b - 1)).is_err());
        assert!(verify_span(&e, 0..b + 1, &span(0..b + 1)).is_err());
    }

    #[test]
    fn crc32c_is_castagnoli() {
        // The check value of CRC-32C (RFC 3720, B.4).
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn hasher_matches_one_shot_whatever_the_pieces() {
        let data = bytes(300_000);
        for piece in [1, 7, 4096, 65_536, 300_000] {
            let mut h = BlockHasher::new(65_536);
            for p in data.chunks(piece) {
                h.update(p);
            }
            let (sums, total) = h.finish();
            let want: Vec<u32> = data.chunks(65_536).map(crc32c).collect();
            assert_eq!((sums, total), (want, 300_000), "pieces of {piece}");
        }
        assert_eq!(BlockHasher::new(65_536).finish(), (vec![], 0));
    }

    #[test]
    fn right_blocks_pass_and_a_flipped_byte_fails() {
        let b = 64 << 10;
        let data = bytes(3 * b as usize + 100); // the last block is short
        let e = entry(&data, Some(b));
        assert_eq!(block_count(&e), 4);
        assert!(block_checked(&e));
        assert_eq!(block_range(&e, 3), 3 * b..3 * b + 100);
        for i in 0..4 {
            verify_block(&e, i, &block(&data, &e, i)).unwrap();
        }
        for i in 0..4 {
            let mut bad = block(&data, &e, i);
            let mid = bad.len() / 2;
            bad[mid] ^= 1;
            let err = verify_block(&e, i, &bad).unwrap_err();
            assert!(matches!(err, BlockMismatch::Crc32c { index, .. } if index == i));
            assert_eq!(err.offset(&e), i * b);
        }
        // A short read of a block, or a block past the end, is refused.
        let short = &block(&data, &e, 3)[..99];
        assert!(matches!(
            verify_block(&e, 3, short),
            Err(BlockMismatch::Length {
                want: 100,
                got: 99,
                ..
            })
        ));
        assert!(matches!(
            verify_block(&e, 4, &[]),
            Err(BlockMismatch::OutOfRange { blocks: 4, .. })
        ));
        assert!(block_range(&e, 9).is_empty());
    }

    #[test]
    fn a_file_of_exactly_n_blocks() {
        let b = 64 << 10;
        let data = bytes(2 * b as usize);
        let e = entry(&data, Some(b));
        assert_eq!(
            e.data
                .as_ref()
                .unwrap()
                .blocks
                .as_ref()
                .unwrap()
                .crc32c
                .len(),
            2
        );
        assert_eq!(block_range(&e, 1), b..2 * b);
        verify_block(&e, 1, &block(&data, &e, 1)).unwrap();
        assert!(verify_block(&e, 2, &[]).is_err());
    }

    #[test]
    fn entries_without_block_checksums() {
        // One block at most: the whole-file CRC-32 checks it.
        let small = bytes(1000);
        let e = entry(&small, None);
        assert!(block_checked(&e));
        verify_block(&e, 0, &small).unwrap();
        let mut bad = small.clone();
        bad[0] ^= 0x80;
        assert!(matches!(
            verify_block(&e, 0, &bad),
            Err(BlockMismatch::Crc32 { .. })
        ));
        let empty = entry(&[], None);
        verify_block(&empty, 0, &[]).unwrap();
        assert_eq!(block_count(&empty), 0);

        // Larger: no block can be checked alone.
        let big = bytes(BLOCK_SIZE as usize + 1);
        let e = entry(&big, None);
        assert!(!block_checked(&e));
        assert_eq!(block_range(&e, 1), BLOCK_SIZE..BLOCK_SIZE + 1);
        assert_eq!(
            verify_block(&e, 1, &big[BLOCK_SIZE as usize..]),
            Err(BlockMismatch::NoChecksum { index: 1 })
        );

        let mut dir = e.clone();
        dir.data = None;
        assert_eq!(verify_block(&dir, 0, &[]), Err(BlockMismatch::NotAFile));
        assert!(WholeFileCheck::new(&dir).is_none());
    }

    #[test]
    fn whole_file_check_reads_in_order() {
        let data = bytes(10_000);
        let e = entry(&data, None);
        let mut c = WholeFileCheck::new(&e).unwrap();
        assert_eq!(c.update(0, &data[..4000]), Ok(WholeFile::Reading));
        // A re-read of bytes already seen, then one that overlaps the end of the last.
        assert_eq!(c.update(1000, &data[1000..2000]), Ok(WholeFile::Reading));
        assert_eq!(c.update(3000, &data[3000..8000]), Ok(WholeFile::Reading));
        assert_eq!(c.update(8000, &data[8000..]), Ok(WholeFile::Verified));
        assert_eq!(c.state(), WholeFile::Verified);

        let mut bad = data.clone();
        bad[9999] ^= 1;
        let mut c = WholeFileCheck::new(&e).unwrap();
        assert_eq!(c.update(0, &bad[..5000]), Ok(WholeFile::Reading));
        assert!(matches!(
            c.update(5000, &bad[5000..]),
            Err(BlockMismatch::Crc32 { .. })
        ));

        // A gap: this handle cannot check the file.
        let mut c = WholeFileCheck::new(&e).unwrap();
        assert_eq!(c.update(0, &data[..100]), Ok(WholeFile::Reading));
        assert_eq!(c.update(200, &data[200..]), Ok(WholeFile::Abandoned));
        assert_eq!(c.update(100, &data[100..]), Ok(WholeFile::Abandoned));

        // More bytes than the file has.
        let mut c = WholeFileCheck::new(&e).unwrap();
        assert!(c.update(0, &[0; 10_001]).is_err());
    }
}
