//! The decoding stages, the backup pipeline backwards: stored bytes -> sha256 -> age -> zstd.
//!
//! Every check a backup carries is made while streaming: age authenticates each 64 KiB chunk
//! and the end of the stream, zstd checks its frame checksum, and the sha256 and size of the
//! stored bytes are compared with the manifest at the end. Callers that must not act on an
//! unverified archive (a restore into a database that must survive a failure) decode into a
//! staging file first and act only when `decode` returned `Ok`.

use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::Progress;
use crate::keys::Identities;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("none of the identities in the identity file can decrypt it (it was encrypted to {recipients}); use the identity that matches one of those recipients")]
    WrongKey { recipients: String },
    #[error("it is not an age file or its header is damaged: {0}")]
    BadHeader(String),
    #[error("it is corrupted or truncated: {what} failed after {offset} stored bytes ({detail})")]
    Corrupt {
        what: &'static str,
        offset: u64,
        detail: String,
    },
    #[error("its sha256 is {found} but the manifest records {expected}: the stored object differs from what was backed up")]
    HashMismatch { expected: String, found: String },
    #[error("it has {found} bytes but the manifest records {expected}: the object is truncated or was replaced")]
    SizeMismatch { expected: u64, found: u64 },
    #[error("reading it from storage failed after {offset} bytes: {source}")]
    Fetch { offset: u64, source: io::Error },
    #[error("writing the decoded archive failed: {0}")]
    Write(io::Error),
}

/// What the stored object must match.
#[derive(Debug, Clone)]
pub struct Expected {
    pub stored_bytes: u64,
    pub sha256: String,
    /// Recipients from the manifest, named when the key does not match.
    pub recipients: Vec<String>,
}

/// What was decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub stored_bytes: u64,
    pub raw_bytes: u64,
    pub sha256: String,
}

#[derive(Default)]
struct HashState {
    hasher: Sha256,
    bytes: u64,
    /// Set when the storage read itself failed, to tell that apart from bad data.
    failed: bool,
}

/// Hashes the stored bytes as they are read, sharing its state with `decode`.
struct HashReader<R> {
    inner: R,
    state: Arc<Mutex<HashState>>,
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                let mut st = self.state.lock().expect("hash state");
                st.hasher.update(&buf[..n]);
                st.bytes += n as u64;
                Ok(n)
            }
            Err(e) => {
                self.state.lock().expect("hash state").failed = true;
                Err(e)
            }
        }
    }
}

/// Decrypts and decompresses `stored` into `out`, verifying everything on the way.
///
/// `out` receives plaintext before the end is verified: only an `Ok` proves it whole.
pub fn decode(
    stored: impl Read,
    identities: &Identities,
    expected: &Expected,
    out: &mut (dyn Write + Send),
    progress: &Progress,
) -> Result<Decoded, DecodeError> {
    let state = Arc::new(Mutex::new(HashState::default()));
    let reader = HashReader {
        inner: stored,
        state: state.clone(),
    };
    let offset = || state.lock().expect("hash state").bytes;
    let fetch_failed = || state.lock().expect("hash state").failed;

    let decryptor = match age::Decryptor::new(reader) {
        Ok(d) => d,
        Err(age::DecryptError::Io(e)) if fetch_failed() => {
            return Err(DecodeError::Fetch {
                offset: offset(),
                source: e,
            })
        }
        Err(e) => return Err(DecodeError::BadHeader(e.to_string())),
    };
    let plaintext = decryptor.decrypt(identities.iter()).map_err(|e| match e {
        age::DecryptError::NoMatchingKeys => DecodeError::WrongKey {
            recipients: expected.recipients.join(", "),
        },
        other => DecodeError::BadHeader(other.to_string()),
    })?;
    // Two threads: this one fetches, hashes and decrypts; the other decompresses and writes.
    // On a restore's critical path that roughly halves the time before pg_restore starts.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
    let (decrypted, decompressed) = std::thread::scope(|scope| {
        let zstd_side = scope.spawn(move || decompress(ChannelReader::new(rx), out, progress));
        let mut plaintext = plaintext;
        let mut decrypted = Ok(());
        loop {
            let mut chunk = vec![0u8; 256 * 1024];
            match plaintext.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    chunk.truncate(n);
                    progress.stored_bytes.store(offset(), Ordering::Relaxed);
                    if tx.send(chunk).is_err() {
                        // The other side stopped; its error says why.
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    decrypted = Err(read_failure(e, offset(), fetch_failed()));
                    break;
                }
            }
        }
        drop(tx);
        let decompressed = zstd_side.join().expect("decompression thread panicked");
        (decrypted, decompressed)
    });
    // The earlier stage's error is the cause; a later stage's follows from it.
    decrypted?;
    let raw = decompressed.map_err(|e| match e {
        DecodeError::Corrupt { what, detail, .. } => DecodeError::Corrupt {
            what,
            offset: offset(),
            detail,
        },
        other => other,
    })?;

    let st = std::mem::take(&mut *state.lock().expect("hash state"));
    let sha256 = hex::encode(st.hasher.finalize());
    if st.bytes != expected.stored_bytes {
        return Err(DecodeError::SizeMismatch {
            expected: expected.stored_bytes,
            found: st.bytes,
        });
    }
    if sha256 != expected.sha256 {
        return Err(DecodeError::HashMismatch {
            expected: expected.sha256.clone(),
            found: sha256,
        });
    }
    Ok(Decoded {
        stored_bytes: st.bytes,
        raw_bytes: raw,
        sha256,
    })
}

/// The zstd stage: decompresses what the channel carries into `out`; returns the raw size.
fn decompress(
    input: ChannelReader,
    out: &mut (dyn Write + Send),
    progress: &Progress,
) -> Result<u64, DecodeError> {
    let zstd_err = |e: io::Error| DecodeError::Corrupt {
        what: "zstd decompression",
        offset: 0,
        detail: e.to_string(),
    };
    let mut zstd = zstd::stream::read::Decoder::new(input).map_err(zstd_err)?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut raw = 0u64;
    loop {
        let n = match zstd.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(zstd_err(e)),
        };
        out.write_all(&buf[..n]).map_err(DecodeError::Write)?;
        raw += n as u64;
        progress.raw_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
    // zstd stops at the end of its frame: nothing may follow it.
    let mut rest = zstd.finish();
    let mut one = [0u8; 1];
    if rest.read(&mut one).map_err(zstd_err)? != 0 {
        return Err(zstd_err(io::Error::other(
            "data follows the end of the compressed stream",
        )));
    }
    out.flush().map_err(DecodeError::Write)?;
    Ok(raw)
}

/// Reads the chunks a channel carries, as one stream; EOF when the sender is gone.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl ChannelReader {
    fn new(rx: std::sync::mpsc::Receiver<Vec<u8>>) -> Self {
        ChannelReader {
            rx,
            chunk: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn read_failure(e: io::Error, offset: u64, fetch_failed: bool) -> DecodeError {
    if fetch_failed {
        return DecodeError::Fetch { offset, source: e };
    }
    // Only the age stage reads here: a chunk failed authentication or the stream ended early.
    DecodeError::Corrupt {
        what: "age authentication",
        offset,
        detail: e.to_string(),
    }
}

/// Proves `identities` can decrypt the object by opening it and reading its first chunk;
/// reads about 64 KiB, whatever the object's size.
pub fn check_key(
    stored: impl Read,
    identities: &Identities,
    expected: &Expected,
) -> Result<(), DecodeError> {
    let decryptor =
        age::Decryptor::new(stored).map_err(|e| DecodeError::BadHeader(e.to_string()))?;
    let mut plaintext = decryptor.decrypt(identities.iter()).map_err(|e| match e {
        age::DecryptError::NoMatchingKeys => DecodeError::WrongKey {
            recipients: expected.recipients.join(", "),
        },
        other => DecodeError::BadHeader(other.to_string()),
    })?;
    let mut first = [0u8; 1];
    plaintext
        .read(&mut first)
        .map(|_| ())
        .map_err(|e| read_failure(e, 0, false))
}

/// Checks only the stored bytes (presence is the caller's, size and sha256 here): no key needed.
pub fn hash_stored(mut stored: impl Read, expected: &Expected) -> Result<u64, DecodeError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n_total = 0u64;
    loop {
        let n = match stored.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(DecodeError::Fetch {
                    offset: n_total,
                    source,
                })
            }
        };
        hasher.update(&buf[..n]);
        n_total += n as u64;
    }
    if n_total != expected.stored_bytes {
        return Err(DecodeError::SizeMismatch {
            expected: expected.stored_bytes,
            found: n_total,
        });
    }
    let found = hex::encode(hasher.finalize());
    if found != expected.sha256 {
        return Err(DecodeError::HashMismatch {
            expected: expected.sha256.clone(),
            found,
        });
    }
    Ok(n_total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{generate, write_new_identity, Recipients};
    use crate::pipeline::encode::{EncodeOptions, Encoder, HashWriter};

    struct Fixture {
        _dir: tempfile::TempDir,
        ids: Identities,
        stored: Vec<u8>,
        expected: Expected,
        plain: Vec<u8>,
    }

    fn fixture(size: usize) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let key = generate();
        let path = dir.path().join("id");
        write_new_identity(&path, &key).unwrap();
        let recipients = Recipients::parse_all([key.recipient.as_str()].into_iter(), "t").unwrap();
        // Incompressible, so stored offsets track plaintext offsets.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let plain: Vec<u8> = (0..size)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let opts = EncodeOptions {
            level: 1,
            threads: 1,
        };
        let mut enc = Encoder::new(HashWriter::new(Vec::new()), &recipients, opts).unwrap();
        enc.write_all(&plain).unwrap();
        let (stored, sha256, n) = enc.finish().unwrap().finish();
        Fixture {
            ids: Identities::from_file(&path).unwrap(),
            expected: Expected {
                stored_bytes: n,
                sha256,
                recipients: vec![key.recipient],
            },
            stored,
            plain,
            _dir: dir,
        }
    }

    fn run(f: &Fixture, stored: &[u8]) -> Result<Vec<u8>, DecodeError> {
        let mut out = Vec::new();
        decode(stored, &f.ids, &f.expected, &mut out, &Progress::default())?;
        Ok(out)
    }

    #[test]
    fn round_trip_verifies() {
        let f = fixture(300_000);
        assert_eq!(run(&f, &f.stored).unwrap(), f.plain);
        assert_eq!(
            hash_stored(&f.stored[..], &f.expected).unwrap(),
            f.expected.stored_bytes
        );
    }

    #[test]
    fn flipped_byte_is_caught() {
        let f = fixture(300_000);
        let mut bad = f.stored.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x40;
        let err = run(&f, &bad).unwrap_err();
        assert!(matches!(err, DecodeError::Corrupt { .. }), "{err}");
        assert!(matches!(
            hash_stored(&bad[..], &f.expected).unwrap_err(),
            DecodeError::HashMismatch { .. }
        ));
    }

    #[test]
    fn truncation_on_and_off_a_chunk_boundary_is_caught() {
        let f = fixture(300_000);
        let mac_line = f.stored.windows(4).position(|w| w == b"\n---").unwrap() + 1;
        let header_end = mac_line
            + f.stored[mac_line..]
                .iter()
                .position(|&b| b == b'\n')
                .unwrap()
            + 1;
        // After the header: a 16-byte nonce, then 64 KiB chunks each with a 16-byte tag.
        let chunks_start = header_end + 16;
        let on_boundary = chunks_start + 2 * (65536 + 16);
        for cut in [on_boundary, on_boundary + 1000, f.stored.len() - 1] {
            let err = run(&f, &f.stored[..cut]).unwrap_err();
            assert!(
                matches!(
                    err,
                    DecodeError::Corrupt { .. } | DecodeError::SizeMismatch { .. }
                ),
                "cut {cut}: {err}"
            );
        }
    }

    #[test]
    fn wrong_identity_names_the_recipients() {
        let f = fixture(1000);
        let other = fixture(10);
        let mut out = Vec::new();
        let err = decode(
            &f.stored[..],
            &other.ids,
            &f.expected,
            &mut out,
            &Progress::default(),
        )
        .unwrap_err();
        assert!(matches!(err, DecodeError::WrongKey { .. }), "{err}");
        assert!(err.to_string().contains(&f.expected.recipients[0]), "{err}");
    }

    #[test]
    fn tampered_manifest_hash_is_caught() {
        let mut f = fixture(1000);
        f.expected.sha256 = "00".repeat(32);
        assert!(matches!(
            run(&f, &f.stored).unwrap_err(),
            DecodeError::HashMismatch { .. }
        ));
    }
}
