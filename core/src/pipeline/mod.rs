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
pub mod decode;
pub mod encode;
pub mod parts;

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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
    #[error("cancelled")]
    Cancelled,
}

/// How a caller steers and watches a running pipeline.
#[derive(Debug, Clone, Default)]
pub struct Control {
    /// Cancelling kills the source, aborts the upload and fails with `Cancelled`.
    pub cancel: CancellationToken,
    pub progress: Arc<Progress>,
}

/// Live counters for progress displays.
#[derive(Debug, Default)]
pub struct Progress {
    /// Plaintext bytes read from the source so far.
    pub raw_bytes: AtomicU64,
    /// Bytes handed to storage so far.
    pub stored_bytes: AtomicU64,
}

impl Progress {
    pub fn raw(&self) -> u64 {
        self.raw_bytes.load(Ordering::Relaxed)
    }
    pub fn stored(&self) -> u64 {
        self.stored_bytes.load(Ordering::Relaxed)
    }
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
    control: &Control,
) -> Result<Stored, PipelineError> {
    let killer = source.kill_handle();
    let recipients = recipients.clone();
    let progress = control.progress.clone();
    upload_encoded(
        storage,
        key,
        control,
        move |tx, part_size| {
            encode_source(source, expect, tx, part_size, &recipients, opts, &progress)
        },
        move || killer.kill(),
    )
    .await
}

/// Streams chunks produced in the process (e.g. decoded changes) through zstd and age into
/// the object `key`. The producer ends the stream by dropping its sender; an `Err` chunk
/// fails it, and the upload is aborted as for a failed child.
pub async fn encrypt_chunks_to_storage(
    chunks: mpsc::Receiver<io::Result<Bytes>>,
    storage: &dyn Storage,
    key: &str,
    recipients: &Recipients,
    opts: EncodeOptions,
    control: &Control,
) -> Result<Stored, PipelineError> {
    let recipients = recipients.clone();
    let progress = control.progress.clone();
    upload_encoded(
        storage,
        key,
        control,
        move |tx, part_size| encode_chunks(chunks, tx, part_size, &recipients, opts, &progress),
        || {},
    )
    .await
}

/// The shared upload side: `encode` runs on a blocking thread and hands parts to the
/// upload; `stop` ends the source at once when the upload fails or is cancelled.
async fn upload_encoded(
    storage: &dyn Storage,
    key: &str,
    control: &Control,
    encode: impl FnOnce(mpsc::Sender<Bytes>, parts::Plan) -> Result<Stored, PipelineError>
        + Send
        + 'static,
    stop: impl FnOnce(),
) -> Result<Stored, PipelineError> {
    let mut upload = match storage.start_upload(key).await {
        Ok(u) => u,
        Err(e) => {
            stop();
            return Err(e.into());
        }
    };
    // One queued part: enough to overlap encoding with the upload, little memory.
    let (tx, mut rx) = mpsc::channel::<Bytes>(1);
    let part_size = parts::Plan::of(storage);
    let worker = tokio::task::spawn_blocking(move || encode(tx, part_size));

    let mut stopped = None;
    loop {
        let part = tokio::select! {
            part = rx.recv() => part,
            _ = control.cancel.cancelled() => {
                stopped = Some(PipelineError::Cancelled);
                break;
            }
        };
        let Some(part) = part else { break };
        let len = part.len() as u64;
        if let Err(e) = upload.put_part(part).await {
            stopped = Some(PipelineError::Storage(e));
            break;
        }
        control
            .progress
            .stored_bytes
            .fetch_add(len, Ordering::Relaxed);
    }
    // Dropping the receiver fails the encoder's next hand-off; killing the source ends its
    // reads at once, even while zstd is still filling a job and hands off nothing.
    drop(rx);
    if stopped.is_some() {
        stop();
    }
    let encoded = worker.await.expect("encoding thread panicked");

    let failure = match (stopped, encoded) {
        (Some(e), _) => e,
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

fn encode_chunks(
    mut chunks: mpsc::Receiver<io::Result<Bytes>>,
    tx: mpsc::Sender<Bytes>,
    part_size: parts::Plan,
    recipients: &Recipients,
    opts: EncodeOptions,
    progress: &Progress,
) -> Result<Stored, PipelineError> {
    let sink = HashWriter::new(PartWriter::new(tx, part_size));
    let mut enc = Encoder::new(sink, recipients, opts).map_err(PipelineError::Encode)?;
    let mut raw = 0u64;
    while let Some(chunk) = chunks.blocking_recv() {
        let chunk = chunk.map_err(|source| PipelineError::Read {
            program: "the change stream",
            source,
        })?;
        raw += chunk.len() as u64;
        progress
            .raw_bytes
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        enc.write_all(&chunk).map_err(write_error)?;
    }
    let (parts, sha256, stored_bytes) = enc.finish().map_err(write_error)?.finish();
    parts.finish().map_err(write_error)?;
    Ok(Stored {
        raw_bytes: raw,
        stored_bytes,
        sha256,
    })
}

/// Encrypts a small in-memory object (row counts, reports) through the same stages and
/// stores it whole.
pub async fn encrypt_bytes_to_storage(
    data: &[u8],
    storage: &dyn Storage,
    key: &str,
    recipients: &Recipients,
    opts: EncodeOptions,
) -> Result<Stored, PipelineError> {
    let mut enc = Encoder::new(HashWriter::new(Vec::new()), recipients, opts)
        .map_err(PipelineError::Encode)?;
    enc.write_all(data).map_err(PipelineError::Encode)?;
    let (stored, sha256, stored_bytes) = enc.finish().map_err(PipelineError::Encode)?.finish();
    storage.put(key, Bytes::from(stored)).await?;
    Ok(Stored {
        raw_bytes: data.len() as u64,
        stored_bytes,
        sha256,
    })
}

fn encode_source(
    mut source: ChildSource,
    expect: Expect,
    tx: mpsc::Sender<Bytes>,
    part_size: parts::Plan,
    recipients: &Recipients,
    opts: EncodeOptions,
    progress: &Progress,
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
            progress.raw_bytes.fetch_add(n as u64, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    //! The pipeline against a small in-memory store that can fail on demand.

    use super::*;
    use crate::storage::{ObjectInfo, Upload};
    use async_trait::async_trait;
    use std::collections::BTreeMap;
    use std::process::Command;
    use std::sync::Mutex;

    #[derive(Debug, Default)]
    struct FakeStore {
        objects: Mutex<BTreeMap<String, Vec<u8>>>,
        aborted: Mutex<Vec<String>>,
        fail_at_part: Option<usize>,
    }

    struct FakeUpload {
        store: Arc<FakeStore>,
        key: String,
        data: Vec<u8>,
        parts: usize,
    }

    #[async_trait]
    impl Storage for Arc<FakeStore> {
        fn location(&self) -> String {
            "fake://".into()
        }
        fn part_size(&self) -> usize {
            64 * 1024
        }
        async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
            self.objects
                .lock()
                .unwrap()
                .insert(key.into(), data.to_vec());
            Ok(())
        }
        async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, StorageError> {
            let mut objects = self.objects.lock().unwrap();
            if objects.contains_key(key) {
                return Ok(false);
            }
            objects.insert(key.into(), data.to_vec());
            Ok(true)
        }
        async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
            self.objects
                .lock()
                .unwrap()
                .get(key)
                .map(|v| Bytes::from(v.clone()))
                .ok_or(StorageError::NotFound {
                    key: key.into(),
                    location: self.location(),
                })
        }
        async fn open_read(
            &self,
            key: &str,
        ) -> Result<Box<dyn tokio::io::AsyncRead + Send + Unpin>, StorageError> {
            let data = self.get(key).await?;
            Ok(Box::new(std::io::Cursor::new(data.to_vec())))
        }
        async fn list(&self, _prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
            Ok(vec![])
        }
        async fn delete(&self, key: &str) -> Result<(), StorageError> {
            self.objects.lock().unwrap().remove(key);
            Ok(())
        }
        async fn start_upload(&self, key: &str) -> Result<Box<dyn Upload>, StorageError> {
            Ok(Box::new(FakeUpload {
                store: self.clone(),
                key: key.into(),
                data: vec![],
                parts: 0,
            }))
        }
    }

    #[async_trait]
    impl Upload for FakeUpload {
        async fn put_part(&mut self, data: Bytes) -> Result<(), StorageError> {
            self.parts += 1;
            if self.store.fail_at_part == Some(self.parts) {
                return Err(StorageError::Failed {
                    op: "upload part of",
                    key: self.key.clone(),
                    location: "fake://".into(),
                    message: "injected failure".into(),
                });
            }
            self.data.extend_from_slice(&data);
            Ok(())
        }
        async fn complete(self: Box<Self>) -> Result<u64, StorageError> {
            let n = self.data.len() as u64;
            self.store
                .objects
                .lock()
                .unwrap()
                .insert(self.key, self.data);
            Ok(n)
        }
        async fn abort(self: Box<Self>) -> Result<(), StorageError> {
            self.store.aborted.lock().unwrap().push(self.key);
            Ok(())
        }
    }

    fn sh(script: &str) -> ChildSource {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script);
        ChildSource::spawn("pg_dump", cmd, vec![]).unwrap()
    }

    fn recipients() -> Recipients {
        let key = crate::keys::generate();
        Recipients::parse_all([key.recipient.as_str()].into_iter(), "test").unwrap()
    }

    async fn run(
        store: &Arc<FakeStore>,
        script: &str,
        control: &Control,
    ) -> Result<Stored, PipelineError> {
        let opts = EncodeOptions {
            level: 1,
            threads: 2,
        };
        encrypt_to_storage(
            sh(script),
            PG_DUMP_CUSTOM,
            store,
            "k",
            &recipients(),
            opts,
            control,
        )
        .await
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn good_source_is_stored_with_matching_hash() {
        let store = Arc::new(FakeStore::default());
        let s = run(
            &store,
            "printf PGDMP; head -c 1000000 /dev/urandom",
            &Control::default(),
        )
        .await
        .unwrap();
        assert_eq!(s.raw_bytes, 1_000_005);
        let stored = store.objects.lock().unwrap()["k"].clone();
        assert_eq!(stored.len() as u64, s.stored_bytes);
        assert!(stored.starts_with(b"age-encryption.org/v1\n"));
        use sha2::Digest;
        assert_eq!(s.sha256, hex::encode(sha2::Sha256::digest(&stored)));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn source_exiting_non_zero_aborts_the_upload() {
        let store = Arc::new(FakeStore::default());
        let script =
            "printf PGDMP; head -c 300000 /dev/urandom; echo 'pg_dump: error: boom' >&2; exit 3";
        let err = run(&store, script, &Control::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("pg_dump failed (exit code 3)"), "{err}");
        assert!(err.contains("boom"), "{err}");
        assert!(store.objects.lock().unwrap().is_empty());
        assert_eq!(*store.aborted.lock().unwrap(), vec!["k".to_string()]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn source_killed_by_signal_is_reported() {
        let store = Arc::new(FakeStore::default());
        let err = run(
            &store,
            "printf PGDMP; head -c 100000 /dev/zero; kill -9 $$",
            &Control::default(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("killed by signal 9 (SIGKILL)"), "{err}");
        assert!(store.objects.lock().unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn storage_failure_kills_an_endless_source() {
        let store = Arc::new(FakeStore {
            fail_at_part: Some(3),
            ..Default::default()
        });
        // `cat /dev/urandom` never ends: returning at all proves the child was killed.
        let err = run(
            &store,
            "printf PGDMP; exec cat /dev/urandom",
            &Control::default(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("injected failure"), "{err}");
        assert_eq!(store.aborted.lock().unwrap().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn cancel_stops_source_and_aborts() {
        let store = Arc::new(FakeStore::default());
        let control = Control::default();
        let cancel = control.cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            cancel.cancel();
        });
        let err = run(&store, "printf PGDMP; exec cat /dev/urandom", &control)
            .await
            .unwrap_err();
        assert!(matches!(err, PipelineError::Cancelled), "{err}");
        assert!(control.progress.raw() > 0);
        assert_eq!(store.aborted.lock().unwrap().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn empty_or_foreign_output_is_refused() {
        let store = Arc::new(FakeStore::default());
        let err = run(&store, "exit 0", &Control::default())
            .await
            .unwrap_err();
        assert!(matches!(err, PipelineError::EmptyOutput { .. }), "{err}");
        let err = run(&store, "echo hello", &Control::default())
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("not a pg_dump custom-format archive"),
            "{err}"
        );
        assert!(store.objects.lock().unwrap().is_empty());
    }
}
