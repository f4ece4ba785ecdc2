//! The restore-side pipeline (stored bytes -> sha256 -> age -> zstd) with a fixed identity.
//!
//! The first byte picks what the rest is:
//! - 0: the stored object itself, as fetched from the repository;
//! - 1: a zstd stream, encrypted here to the fixed recipient, so the zstd stage sees
//!   arbitrary bytes behind a valid age layer;
//! - 2: a plaintext, encoded by the backup pipeline and decoded again: it must round-trip.
//!
//! Any input must give `Ok` or a `DecodeError`, never a panic.
#![no_main]

use std::io::{Read, Write};
use std::str::FromStr;
use std::sync::OnceLock;

use dr_core::keys::{write_new_identity, GeneratedKey, Identities, Recipients};
use dr_core::pipeline::decode::{check_key, decode, DecodeError, Expected};
use dr_core::pipeline::encode::{EncodeOptions, Encoder, HashWriter};
use dr_core::pipeline::Progress;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

/// A key made for these tests only; the corpus holds objects encrypted to it.
const IDENTITY: &str = "AGE-SECRET-KEY-1HJKSR6XTDKXEX9ZDUKJJGFAEKJW2J9AXQ9Q2EVTALWCT4HK63X6QYDWC9P";
const RECIPIENT: &str = "age1ke0dgq4q8h9d2z0q0yy6xcpag22wfmpgcmj6gx5wxst0rer053gqnf8ydf";

/// Decoded output is counted, not kept: a small input can decompress to a lot.
const MAX_OUTPUT: u64 = 64 << 20;

struct Keys {
    identities: Identities,
    recipients: Recipients,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        // Identities load only from files (as in production); the file is gone once read.
        let dir = std::env::temp_dir().join(format!("dr-fuzz-decode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("identity.txt");
        let _ = std::fs::remove_file(&path);
        let key = GeneratedKey {
            file_text: format!("{IDENTITY}\n"),
            recipient: RECIPIENT.to_string(),
        };
        write_new_identity(&path, &key).unwrap();
        let identities = Identities::from_file(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let recipients = Recipients::parse_all([RECIPIENT].into_iter(), "fuzz").unwrap();
        Keys {
            identities,
            recipients,
        }
    })
}

/// Keeps a hash of what is written, up to `MAX_OUTPUT` bytes.
#[derive(Default)]
struct Sink {
    hasher: Sha256,
    len: u64,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.len + buf.len() as u64 > MAX_OUTPUT {
            return Err(std::io::Error::other("output limit"));
        }
        self.hasher.update(buf);
        self.len += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn expect_for(stored: &[u8]) -> Expected {
    Expected {
        stored_bytes: stored.len() as u64,
        sha256: hex::encode(Sha256::digest(stored)),
        recipients: vec![RECIPIENT.to_string()],
    }
}

fn run(
    stored: &[u8],
) -> (
    Result<dr_core::pipeline::decode::Decoded, DecodeError>,
    Sink,
) {
    let k = keys();
    let mut out = Sink::default();
    let r = decode(
        stored,
        &k.identities,
        &expect_for(stored),
        &mut out,
        &Progress::default(),
    );
    let _ = check_key(stored, &k.identities, &expect_for(stored));
    (r, out)
}

fn age_encrypt(plain: &[u8]) -> Vec<u8> {
    let r = age::x25519::Recipient::from_str(RECIPIENT).unwrap();
    let enc = age::Encryptor::with_recipients(std::iter::once(&r as &dyn age::Recipient)).unwrap();
    let mut out = Vec::new();
    let mut w = enc.wrap_output(&mut out).unwrap();
    w.write_all(plain).unwrap();
    w.finish().unwrap();
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let _ = run(rest);
        }
        1 => {
            let stored = age_encrypt(rest);
            let (r, out) = run(&stored);
            if let Ok(d) = r {
                // What decode accepted is exactly what the stock `zstd -d` would give.
                let mut plain = Vec::new();
                zstd::stream::read::Decoder::new(rest)
                    .unwrap()
                    .take(MAX_OUTPUT + 1)
                    .read_to_end(&mut plain)
                    .expect("stock zstd reads what decode accepted");
                assert_eq!(d.raw_bytes, plain.len() as u64);
                assert_eq!(
                    out.hasher.finalize().as_slice(),
                    Sha256::digest(&plain).as_slice()
                );
            }
        }
        _ => {
            let opts = EncodeOptions {
                level: 1,
                threads: 1,
            };
            let mut enc =
                Encoder::new(HashWriter::new(Vec::new()), &keys().recipients, opts).unwrap();
            enc.write_all(rest).unwrap();
            let (stored, sha256, n) = enc.finish().unwrap().finish();
            assert_eq!(n, stored.len() as u64);
            assert_eq!(sha256, hex::encode(Sha256::digest(&stored)));
            let (r, out) = run(&stored);
            let d = r.expect("what the backup pipeline wrote decodes");
            assert_eq!(d.raw_bytes, rest.len() as u64);
            assert_eq!(
                out.hasher.finalize().as_slice(),
                Sha256::digest(rest).as_slice()
            );
        }
    }
});
