//! One writer per database: a lease object in the repository,
//! `<environment>/<database>/lock.json`.
//!
//! What is guaranteed where:
//! - Stores with conditional writes (AWS S3, MinIO, Ceph RGW, R2, file://): taking a free
//!   lock is atomic (`If-None-Match: *`, or link(2) on a local disk); two agents cannot both
//!   take it.
//! - Stores that ignore conditional writes (Garage): best effort. The lock is written, then
//!   read back after a pause; an agent that reads another's owner backs off. Two agents can
//!   only both proceed if one writes more than `SETTLE` after the other's read-back, which
//!   needs a stall of that length between its own read and write.
//! - Taking over an expired lease (its holder crashed) is best effort everywhere.
//!
//! In every case a second agent also skips a slot that already has a backup, so the worst
//! case is one redundant backup, never a lost one.

use std::time::Duration;

use bytes::Bytes;
use dr_core::repo::Repository;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// How long a lease lasts without renewal; the holder renews it every `RENEW`.
pub const LEASE: Duration = Duration::from_secs(300);
pub const RENEW: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_millis(750);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Lease {
    pub owner: String,
    pub host: String,
    pub pid: u32,
    pub expires_at: Timestamp,
}

#[derive(Debug)]
pub enum Acquired {
    Yes(LockGuard),
    HeldBy(Lease),
}

pub struct LockGuard {
    repo: Repository,
    key: String,
    owner: String,
}

pub fn key(repo: &Repository, database: &str) -> String {
    format!("{}/{database}/lock.json", repo.environment())
}

fn lease(owner: &str) -> Lease {
    Lease {
        owner: owner.to_string(),
        host: hostname(),
        pid: std::process::id(),
        expires_at: Timestamp::now() + jiff::SignedDuration::try_from(LEASE).expect("small"),
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

async fn read(
    repo: &Repository,
    key: &str,
) -> Result<Option<Lease>, dr_core::storage::StorageError> {
    match repo.storage().get(key).await {
        Ok(b) => Ok(serde_json::from_slice(&b).ok()),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Tries to take the lock for `database`; `owner` identifies this agent process.
pub async fn acquire(
    repo: &Repository,
    database: &str,
    owner: &str,
) -> Result<Acquired, dr_core::storage::StorageError> {
    let key = key(repo, database);
    let mine = lease(owner);
    let body = Bytes::from(serde_json::to_vec(&mine).expect("lease serializes"));
    match read(repo, &key).await? {
        Some(held) if held.owner != owner && held.expires_at > Timestamp::now() => {
            return Ok(Acquired::HeldBy(held));
        }
        None => {
            if !repo.storage().put_if_absent(&key, body).await? {
                if let Some(held) = read(repo, &key).await? {
                    return Ok(Acquired::HeldBy(held));
                }
            } else if repo.storage().atomic_create() {
                // The create was exclusive: no need to wait and read it back.
                return Ok(Acquired::Yes(LockGuard {
                    repo: repo.clone(),
                    key,
                    owner: owner.to_string(),
                }));
            }
        }
        Some(expired) => {
            if expired.owner != owner {
                tracing::warn!(database, holder = %expired.owner, host = %expired.host, "taking over an expired lock lease");
            }
            repo.storage().put(&key, body).await?;
        }
    }
    tokio::time::sleep(SETTLE).await;
    match read(repo, &key).await? {
        Some(l) if l.owner == owner => Ok(Acquired::Yes(LockGuard {
            repo: repo.clone(),
            key,
            owner: owner.to_string(),
        })),
        Some(other) => Ok(Acquired::HeldBy(other)),
        None => Ok(Acquired::HeldBy(mine)),
    }
}

impl LockGuard {
    /// Extends the lease; call every `RENEW` while working.
    pub async fn renew(&self) -> Result<(), dr_core::storage::StorageError> {
        let body = Bytes::from(serde_json::to_vec(&lease(&self.owner)).expect("lease serializes"));
        self.repo.storage().put(&self.key, body).await
    }

    /// Deletes the lock if it is still ours.
    pub async fn release(self) {
        if let Ok(Some(l)) = read(&self.repo, &self.key).await {
            if l.owner == self.owner {
                if let Err(e) = self.repo.storage().delete(&self.key).await {
                    tracing::warn!(error = %e, "could not release the lock; it expires by itself");
                }
            }
        }
    }
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LockGuard({})", self.key)
    }
}
