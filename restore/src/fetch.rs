//! Fetching an object and running it through the verified decode stage.
//!
//! The download is asynchronous and the decode synchronous on a blocking thread, joined by
//! `SyncIoBridge`; memory stays at a few buffers whatever the object's size.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dr_core::keys::Identities;
use dr_core::manifest::{Manifest, ObjectEntry};
use dr_core::pipeline::decode::{self, Decoded, Expected};
use dr_core::pipeline::Control;
use dr_core::repo::Repository;
use tokio_util::io::SyncIoBridge;

use crate::RestoreError;

/// When the last stored byte arrived: the end of the fetch stage.
#[derive(Debug, Clone, Default)]
pub struct FetchClock(Arc<Mutex<Option<Instant>>>);

impl FetchClock {
    pub fn done_at(&self) -> Option<Instant> {
        *self.0.lock().expect("clock")
    }
}

/// Reads until cancelled; records when the source ran dry.
struct Watched<R> {
    inner: R,
    control: Control,
    clock: FetchClock,
}

impl<R: Read> Read for Watched<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.control.cancel.is_cancelled() {
            // Not ErrorKind::Interrupted: read loops retry that one.
            return Err(io::Error::other("cancelled"));
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            self.clock
                .0
                .lock()
                .expect("clock")
                .get_or_insert_with(Instant::now);
        }
        Ok(n)
    }
}

pub fn expected(manifest: &Manifest, object: &ObjectEntry) -> Expected {
    Expected {
        stored_bytes: object.stored_bytes,
        sha256: object.sha256.clone(),
        recipients: manifest.encryption.recipients.clone(),
    }
}

/// Streams `object` of `manifest` from the repository, verified and decoded, into `out`.
/// Returns `out` back so the caller can finish it (close a pipe, persist a file).
pub async fn fetch_decoded<W: Write + Send + 'static>(
    repo: &Repository,
    manifest: &Manifest,
    object: &ObjectEntry,
    identities: Arc<Identities>,
    out: W,
    control: &Control,
    clock: &FetchClock,
) -> Result<(Decoded, W), RestoreError> {
    let key = repo.object_key(&manifest.database, &manifest.id, &object.name);
    let reader = open(repo, manifest, object, &key).await?;
    let expected = expected(manifest, object);
    let watched = Watched {
        inner: SyncIoBridge::new(reader),
        control: control.clone(),
        clock: clock.clone(),
    };
    let progress = control.progress.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut out = out;
        decode::decode(watched, &identities, &expected, &mut out, &progress).map(|d| (d, out))
    })
    .await
    .expect("decode thread panicked");
    result.map_err(|source| {
        if control.cancel.is_cancelled() {
            RestoreError::Cancelled
        } else {
            RestoreError::Decode {
                backup: manifest.id.to_string(),
                object: object.name.clone(),
                source,
            }
        }
    })
}

/// Checks the stored bytes only (size and sha256): no identity needed.
pub async fn fetch_hashed(
    repo: &Repository,
    manifest: &Manifest,
    object: &ObjectEntry,
) -> Result<u64, RestoreError> {
    let key = repo.object_key(&manifest.database, &manifest.id, &object.name);
    let reader = open(repo, manifest, object, &key).await?;
    let expected = expected(manifest, object);
    tokio::task::spawn_blocking(move || decode::hash_stored(SyncIoBridge::new(reader), &expected))
        .await
        .expect("hash thread panicked")
        .map_err(|source| RestoreError::Decode {
            backup: manifest.id.to_string(),
            object: object.name.clone(),
            source,
        })
}

/// Opens an object's stored bytes; a missing object names the backup.
pub(crate) async fn open(
    repo: &Repository,
    manifest: &Manifest,
    object: &ObjectEntry,
    key: &str,
) -> Result<Box<dyn tokio::io::AsyncRead + Send + Unpin>, RestoreError> {
    repo.storage().open_read(key).await.map_err(|e| {
        if e.is_not_found() {
            RestoreError::Missing {
                backup: manifest.id.to_string(),
                object: object.name.clone(),
                location: repo.storage().location(),
            }
        } else {
            e.into()
        }
    })
}
