//! The hand-off from the synchronous encoding thread to the asynchronous uploader: parts over
//! a bounded channel, so memory is `current part size × (max_in_flight + 3)` (the parts in
//! flight, one waiting for a slot, one in the channel, one being filled).
//!
//! S3 allows at most 10,000 parts per upload and pg_dump's output size is unknown up front,
//! so parts grow as the upload proceeds (see [`part_size`]): small objects keep small parts
//! and little memory, and any object up to S3's 5 TiB maximum fits.

use std::io::{self, Write};

use bytes::Bytes;
use tokio::sync::mpsc;

/// S3's limit on the number of parts in one multipart upload.
pub const MAX_PARTS: usize = 10_000;
/// S3's limit on the size of one part.
pub const MAX_PART_SIZE: usize = 5 * 1024 * 1024 * 1024;
/// The part size at least doubles every this many parts.
pub const DOUBLE_EVERY: usize = 1_000;
/// The growth curve: 8 MiB doubled every 1,000 parts from part 1,001 on. Parts 1,001 to
/// 10,000 alone then hold 7.8 TiB, past S3's 5 TiB object limit whatever the configured
/// part size.
const GROWTH_BASE: usize = 8 * 1024 * 1024;

/// The size of part `number` (1-based) of an upload whose configured part size is `base`:
/// `base` for the first 1,000 parts, then the larger of `base` and 8 MiB × 2^⌊(n−1)/1000⌋,
/// never more than 5 GiB. With the default 8 MiB, parts stay at 8 MiB up to 7.8 GiB
/// stored, are 16 MiB up to 23 GiB, 64 MiB around 100 GiB, 512 MiB around 1 TiB and 4 GiB
/// near 5 TiB.
pub fn part_size(base: usize, number: usize) -> usize {
    let doublings = (number.max(1) - 1) / DOUBLE_EVERY;
    if doublings == 0 {
        return base.min(MAX_PART_SIZE);
    }
    let curve = GROWTH_BASE
        .checked_shl(doublings as u32)
        .unwrap_or(MAX_PART_SIZE);
    base.max(curve).min(MAX_PART_SIZE)
}

/// How an upload's parts are sized: `base` bytes, growing by [`part_size`] where the store
/// limits the number of parts (S3). A local file has no limit: its parts stay `base`, and
/// memory stays flat however large the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub base: usize,
    pub grow: bool,
}

impl Plan {
    /// How `storage` wants its parts.
    pub fn of(storage: &dyn crate::storage::Storage) -> Self {
        Plan {
            base: storage.part_size(),
            grow: storage.parts_grow(),
        }
    }

    /// The size of part `number` (1-based).
    pub fn size(&self, number: usize) -> usize {
        match self.grow {
            true => part_size(self.base, number),
            false => self.base.min(MAX_PART_SIZE),
        }
    }
}

impl From<usize> for Plan {
    fn from(base: usize) -> Self {
        Plan { base, grow: true }
    }
}

pub struct PartWriter {
    buf: Vec<u8>,
    plan: Plan,
    part_size: usize,
    tx: mpsc::Sender<Bytes>,
    sent: usize,
}

impl PartWriter {
    /// Parts start at `plan.base` bytes and, if `plan.grow`, grow by [`part_size`].
    pub fn new(tx: mpsc::Sender<Bytes>, plan: impl Into<Plan>) -> Self {
        let plan = plan.into();
        let part_size = plan.size(1);
        PartWriter {
            buf: Vec::with_capacity(part_size),
            plan,
            part_size,
            tx,
            sent: 0,
        }
    }

    fn send(&mut self) -> io::Result<()> {
        self.part_size = self.plan.size(self.sent + 2);
        let part = std::mem::replace(&mut self.buf, Vec::with_capacity(self.part_size));
        self.sent += 1;
        self.tx
            .blocking_send(Bytes::from(part))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, UploadStopped))
    }

    /// Sends the last, possibly short, part.
    pub fn finish(mut self) -> io::Result<()> {
        if !self.buf.is_empty() || self.sent == 0 {
            self.send()?;
        }
        Ok(())
    }
}

impl Write for PartWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(self.part_size - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.part_size {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The uploader stopped taking parts; its own error says why.
#[derive(Debug, thiserror::Error)]
#[error("the upload stopped")]
pub struct UploadStopped;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_fixed_size_with_a_short_tail() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut w = PartWriter::new(tx, 10);
        w.write_all(&[7u8; 25]).unwrap();
        w.finish().unwrap();
        let mut sizes = Vec::new();
        while let Ok(p) = rx.try_recv() {
            sizes.push(p.len());
        }
        assert_eq!(sizes, vec![10, 10, 5]);
    }

    #[test]
    fn part_sizes_reach_5_tib_within_10000_parts_and_never_exceed_5_gib() {
        const MIB: usize = 1024 * 1024;
        const TIB: u128 = 1024 * 1024 * 1024 * 1024;
        for base in [
            5 * MIB,
            8 * MIB,
            16 * MIB,
            100 * MIB,
            1024 * MIB,
            MAX_PART_SIZE,
        ] {
            // S3's own minimum; smaller sizes are for tests of the writer only.
            let mut total: u128 = 0;
            let mut previous = 0;
            for number in 1..=MAX_PARTS {
                let size = part_size(base, number);
                assert!(
                    size <= MAX_PART_SIZE,
                    "part {number} of base {base}: {size}"
                );
                assert!(size >= 5 * MIB, "part {number} of base {base}: {size}");
                assert!(size >= previous, "parts never shrink");
                previous = size;
                total += size as u128;
            }
            assert!(
                total >= 5 * TIB,
                "base {base}: 10,000 parts hold only {total} bytes"
            );
        }
        // Small and medium objects keep the configured size (memory stays where it was).
        assert_eq!(part_size(16 * MIB, 1), 16 * MIB);
        assert_eq!(part_size(16 * MIB, 2000), 16 * MIB);
        assert_eq!(part_size(16 * MIB, 2001), 32 * MIB);
    }

    #[test]
    fn the_writer_follows_the_growing_schedule() {
        let (tx, mut rx) = mpsc::channel(MAX_PARTS + 1);
        let mut w = PartWriter::new(tx, 1024);
        let mut sizes = Vec::new();
        while sizes.len() < 1002 {
            w.write_all(&[0u8; 1024]).unwrap();
            while let Ok(p) = rx.try_recv() {
                sizes.push(p.len());
            }
        }
        assert!(sizes[..1000].iter().all(|&n| n == 1024));
        assert_eq!(sizes[1000], 16 * 1024 * 1024);
        assert_eq!(sizes[1001], 16 * 1024 * 1024);
    }

    #[test]
    fn parts_without_a_count_limit_keep_their_size() {
        let (tx, mut rx) = mpsc::channel(MAX_PARTS + 1);
        let mut w = PartWriter::new(
            tx,
            Plan {
                base: 1024,
                grow: false,
            },
        );
        let mut sizes = Vec::new();
        while sizes.len() < 1002 {
            w.write_all(&[0u8; 1024]).unwrap();
            while let Ok(p) = rx.try_recv() {
                sizes.push(p.len());
            }
        }
        assert!(sizes.iter().all(|&n| n == 1024), "{:?}", &sizes[998..]);
    }

    #[test]
    fn a_closed_uploader_stops_the_writer() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let mut w = PartWriter::new(tx, 4);
        let err = w.write_all(&[0u8; 8]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
