//! The encoding stages: zstd compression, then age encryption, then sha256 over what is
//! stored. Each stage wraps a `Write`, so the chain streams with bounded memory.

use std::io::{self, Write};

use sha2::{Digest, Sha256};

use crate::keys::Recipients;

/// zstd multithreaded job size: small enough to keep memory flat and low, large enough that
/// the per-job overhead and lost cross-job matches stay negligible.
const ZSTD_JOB_SIZE: u32 = 1024 * 1024;

/// The most zstd workers `threads = 0` picks: each worker holds about three jobs' worth of
/// buffers, and past a few workers the pipeline is bound by pg_dump, age and the upload.
pub const DEFAULT_MAX_THREADS: u32 = 4;

/// Compression settings for the zstd stage.
#[derive(Debug, Clone, Copy)]
pub struct EncodeOptions {
    pub level: i32,
    /// Worker threads; 0 means one per core, at most [`DEFAULT_MAX_THREADS`].
    pub threads: u32,
}

/// The zstd workers used for `configured` threads on a host with `cores` cores: an explicit
/// number as given, 0 as `min(cores, 4)`, so memory does not grow with the host's size.
pub fn worker_threads(configured: u32, cores: usize) -> u32 {
    match configured {
        0 => (cores.max(1) as u32).min(DEFAULT_MAX_THREADS),
        n => n,
    }
}

/// The zstd workers of each of `pipelines` concurrent streams (a split backup's data
/// archives): twice the one-stream count, shared out. A split's archives rarely end together,
/// and the one that runs on alone should still have the cores; a worker whose input waits is
/// idle, so running more workers than cores while all streams flow costs little. At most
/// 2 × [`worker_threads`] workers in all, so memory stays bounded however many archives.
pub fn split_worker_threads(configured: u32, cores: usize, pipelines: usize) -> u32 {
    let all = worker_threads(configured, cores);
    (2 * all / pipelines.max(1) as u32).clamp(1, all)
}

/// zstd (with frame checksum, multithreaded) feeding age (STREAM, X25519 recipients).
pub struct Encoder<W: Write> {
    zstd: zstd::stream::write::Encoder<'static, age::stream::StreamWriter<W>>,
}

impl<W: Write> Encoder<W> {
    pub fn new(out: W, recipients: &Recipients, opts: EncodeOptions) -> io::Result<Self> {
        let encryptor =
            age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
                .map_err(|e| io::Error::other(format!("age: {e}")))?;
        let age = encryptor.wrap_output(out)?;
        let mut zstd = zstd::stream::write::Encoder::new(age, opts.level)?;
        // The library omits the frame checksum unless asked; `zstd -d` verifies it.
        zstd.include_checksum(true)?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = worker_threads(opts.threads, cores);
        if threads > 1 {
            zstd.multithread(threads)?;
            // Each worker buffers a job in and out; the default (4 × window, 8 MiB at level 3)
            // would make zstd alone most of our memory budget.
            zstd.set_parameter(zstd::zstd_safe::CParameter::JobSize(ZSTD_JOB_SIZE))?;
        }
        Ok(Encoder { zstd })
    }

    /// Flushes both stages; without age's `finish` the file would be truncated.
    pub fn finish(self) -> io::Result<W> {
        self.zstd.finish()?.finish()
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.zstd.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.zstd.flush()
    }
}

/// Counts and hashes the bytes as they are stored.
pub struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> HashWriter<W> {
    pub fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// The inner writer, the hex sha256 and the byte count.
    pub fn finish(self) -> (W, String, u64) {
        (self.inner, hex::encode(self.hasher.finalize()), self.bytes)
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn default_threads_are_capped_whatever_the_core_count() {
        assert_eq!(worker_threads(0, 1), 1);
        assert_eq!(worker_threads(0, 2), 2);
        assert_eq!(worker_threads(0, 16), DEFAULT_MAX_THREADS);
        assert_eq!(worker_threads(0, 64), DEFAULT_MAX_THREADS);
        // An explicit setting is the operator's choice.
        assert_eq!(worker_threads(12, 64), 12);
    }

    #[test]
    fn split_streams_share_twice_the_workers() {
        // Two cores, two data archives: each may use both cores once the other is done.
        assert_eq!(split_worker_threads(0, 2, 2), 2);
        assert_eq!(split_worker_threads(0, 16, 4), 2);
        assert_eq!(split_worker_threads(0, 16, 2), DEFAULT_MAX_THREADS);
        // Never more per stream than one stream alone, never fewer than one.
        assert_eq!(split_worker_threads(0, 1, 4), 1);
        assert_eq!(split_worker_threads(3, 64, 1), 3);
        assert_eq!(split_worker_threads(0, 16, 64), 1);
    }

    #[test]
    fn encoded_bytes_are_age_then_zstd_and_hash_matches() {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::keys::generate();
        let id_path = dir.path().join("id");
        crate::keys::write_new_identity(&id_path, &key).unwrap();
        let recipients =
            Recipients::parse_all([key.recipient.as_str()].into_iter(), "test").unwrap();
        let plain: Vec<u8> = (0..3_000_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let mut enc = Encoder::new(
            HashWriter::new(Vec::new()),
            &recipients,
            EncodeOptions {
                level: 3,
                threads: 2,
            },
        )
        .unwrap();
        enc.write_all(&plain).unwrap();
        let (stored, sha, n) = enc.finish().unwrap().finish();
        assert_eq!(n as usize, stored.len());
        assert!(stored.starts_with(b"age-encryption.org/v1\n"));
        assert_eq!(sha, hex::encode(Sha256::digest(&stored)));

        let ids = crate::keys::Identities::from_file(&id_path).unwrap();
        let dec = age::Decryptor::new(&stored[..]).unwrap();
        let mut r = dec.decrypt(ids.iter()).unwrap();
        let mut compressed = Vec::new();
        r.read_to_end(&mut compressed).unwrap();
        assert_eq!(zstd::decode_all(&compressed[..]).unwrap(), plain);
    }
}
