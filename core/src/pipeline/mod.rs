//! The stage pipeline, one implementation of each stage shared by backup, restore and drills:
//!
//! ```text
//! child stdout (pg_dump) -> zstd -> age -> sha256 -> fixed-size parts -> storage upload
//! ```
//!
//! The encoding stages are synchronous `Write` wrappers run on one blocking thread (zstd
//! spreads its own work over cores); the upload is asynchronous. A bounded channel of parts
//! joins them, so memory does not grow with the database.

pub mod child;
pub mod encode;
pub mod parts;

use std::io::{self, Read, Write};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::keys::Recipients;
use crate::storage::{Storage, StorageError};
use child::{ChildError, ChildSource};
use encode::{EncodeOptions, Encoder, HashWriter};
use parts::{PartWriter, UploadStopped};

/// What was stored for one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Bytes the source produced (the plaintext).
    pub raw_bytes: u64,
    /// Bytes in storage (age ciphertext).
    pub stored_bytes: u64,
    /// sha256 of the stored bytes, hex.
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Source(#[from] ChildError),
    #[error("cannot read the output of {program}: {source}")]
    Read {
        program: &'static str,
        source: io::Error,
    },
    #[error("{program} exited successfully but wrote nothing")]
    EmptyOutput { program: &'static str },
    #[error("{program} wrote something that is not a {expected}")]
    BadOutput {
        program: &'static str,
        expected: &'static str,
    },
    #[error("compression or encryption failed: {0}")]
    Encode(io::Error),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// What the source's output must start with, checked before anything is committed.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    pub magic: &'static [u8],
    pub description: &'static str,
}

/// The pg_dump custom format's header.
pub const PG_DUMP_CUSTOM: Expect = Expect {
    magic: b"PGDMP",
    description: "pg_dump custom-format archive",
};

/// Plain SQL: anything non-empty.
pub const SQL: Expect = Expect {
    magic: b"",
    description: "SQL script",
};

/// Streams `source` through zstd and age into the object `key`.
///
/// The object is completed only after the source exited 0 and its output looked right;
/// on any failure the child is killed and reaped and the upload aborted, so nothing partial
/// remains under `key`.
pub async fn encrypt_to_storage(
    source: ChildSource,
    expect: Expect,
    storage: &dyn Storage,
    key: &str,
    recipients: &Recipients,
    opts: EncodeOptions,
) -> Result<Stored, PipelineError> {
    let mut upload = match storage.start_upload(key).await {
        Ok(u) => u,
        Err(e) => {
            source.kill();
            return Err(e.into());
        }
    };
    // One queued part: enough to overlap encoding with the upload, little memory.
    let (tx, mut rx) = mpsc::channel::<Bytes>(1);
    let part_size = storage.part_size();
    let recipients = recipients.clone();
    let worker = tokio::task::spawn_blocking(move || {
        encode_source(source, expect, tx, part_size, &recipients, opts)
    });

    let mut upload_error = None;
    while let Some(part) = rx.recv().await {
        if let Err(e) = upload.put_part(part).await {
            upload_error = Some(e);
            break;
        }
    }
    // Dropping the receiver makes a still-running encoder fail fast and kill its child.
    drop(rx);
    let encoded = worker.await.expect("encoding thread panicked");

    let failure = match (upload_error, encoded) {
        (Some(e), _) => PipelineError::Storage(e),
        (None, Err(e)) => e,
        (None, Ok(stored)) => {
            upload.complete().await?;
            return Ok(stored);
        }
    };
    if let Err(e) = upload.abort().await {
        tracing::warn!(key, error = %e, "could not abort the upload; prune removes it later");
    }
    Err(failure)
}

fn encode_source(
    mut source: ChildSource,
    expect: Expect,
    tx: mpsc::Sender<Bytes>,
    part_size: usize,
    recipients: &Recipients,
    opts: EncodeOptions,
) -> Result<Stored, PipelineError> {
    let program = source.program();
    let mut head = Vec::with_capacity(expect.magic.len());
    let streamed = (|| {
        let sink = HashWriter::new(PartWriter::new(tx, part_size));
        let mut enc = Encoder::new(sink, recipients, opts).map_err(PipelineError::Encode)?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut raw = 0u64;
        loop {
            let n = match source.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(PipelineError::Read { program, source }),
            };
            if head.len() < expect.magic.len() {
                let take = (expect.magic.len() - head.len()).min(n);
                head.extend_from_slice(&buf[..take]);
            }
            raw += n as u64;
            enc.write_all(&buf[..n]).map_err(write_error)?;
        }
        let (parts, sha256, stored_bytes) = enc.finish().map_err(write_error)?.finish();
        parts.finish().map_err(write_error)?;
        Ok(Stored {
            raw_bytes: raw,
            stored_bytes,
            sha256,
        })
    })();
    match streamed {
        Ok(stored) => {
            source.finish()?;
            if stored.raw_bytes == 0 {
                return Err(PipelineError::EmptyOutput { program });
            }
            if head != expect.magic {
                return Err(PipelineError::BadOutput {
                    program,
                    expected: expect.description,
                });
            }
            Ok(stored)
        }
        Err(e) => {
            source.kill();
            Err(e)
        }
    }
}

fn write_error(e: io::Error) -> PipelineError {
    if e.get_ref().is_some_and(|inner| inner.is::<UploadStopped>()) {
        // The uploader's own error is reported instead of this one.
        PipelineError::Encode(io::Error::new(io::ErrorKind::BrokenPipe, "upload stopped"))
    } else {
        PipelineError::Encode(e)
    }
}
