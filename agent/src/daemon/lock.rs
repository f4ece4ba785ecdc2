//! One writer per database: a lease object in the repository,
//! `<environment>/<database>/lock.json`, taken by the agent's jobs, `dr backup` and
//! `dr prune`.
//!
//! What is guaranteed where:
//! - Stores with conditional writes (AWS S3, MinIO, Ceph RGW, R2, file://): taking a free
//!   lock is atomic (`If-None-Match: *`, or link(2) on a local disk); two processes cannot
//!   both take it.
//! - Stores that ignore conditional writes (Garage): best effort. The lock is written, then
//!   read back after a pause; a process that reads another's owner backs off. Two can only
//!   both proceed if one writes more than `SETTLE` after the other's read-back, which needs
//!   a stall of that length between its own read and write.
//! - Taking over an expired lease (its holder crashed) is best effort everywhere. A lock
//!   file that cannot be parsed is treated as expired (and logged as an error): it must not
//!   block every backup forever.
//!
//! The lease is renewed in the background while held and deleted by [`LockGuard::release`],
//! which every path of a job calls; a guard dropped without it still stops renewing, so the
//! lease expires by itself.
//!
//! In every case a second agent also skips a slot that already has a backup, so the worst
//! case is one redundant backup, never a lost one.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use dr_core::repo::Repository;
use dr_core::storage::StorageError;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

/// How long a lease lasts without renewal; the holder renews it every `RENEW`.
pub const LEASE: Duration = Duration::from_secs(300);
pub const RENEW: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_millis(750);
/// Attempts when the lock changes between our write and our read-back.
const ATTEMPTS: usize = 3;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Lease {
    pub owner: String,
    pub host: String,
    pub pid: u32,
    pub expires_at: Timestamp,
    /// What holds it: `agent`, `backup` or `prune` (absent in leases of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Set by a holder that could not delete the lock (credentials without delete, as on
    /// an Object Lock bucket): free to take at once. Older versions see an expired lease.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub released: bool,
}

impl fmt::Display for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.command {
            Some(c) => write!(f, "dr {c}")?,
            None => f.write_str("another dr process")?,
        }
        write!(
            f,
            " (pid {} on host {}, lease valid until {})",
            self.pid,
            if self.host.is_empty() {
                "?"
            } else {
                self.host.as_str()
            },
            self.expires_at
                .round(jiff::Unit::Second)
                .unwrap_or(self.expires_at)
        )
    }
}

#[derive(Debug)]
pub enum Acquired {
    Yes(LockGuard),
    HeldBy(Lease),
}

/// The lock, held: renewed in the background until [`LockGuard::release`].
pub struct LockGuard {
    repo: Repository,
    key: String,
    owner: String,
    renew: Option<JoinHandle<()>>,
}

pub fn key(repo: &Repository, database: &str) -> String {
    format!("{}/{database}/lock.json", repo.environment())
}

/// A new owner id for this process: pid and a random suffix (a restarted process with
/// the same pid is still someone else).
pub fn new_owner() -> String {
    format!("{}-{:08x}", std::process::id(), rand::random::<u32>())
}

fn lease(owner: &str, command: &str) -> Lease {
    Lease {
        owner: owner.to_string(),
        host: hostname(),
        pid: std::process::id(),
        expires_at: Timestamp::now() + jiff::SignedDuration::try_from(LEASE).expect("small"),
        command: Some(command.to_string()),
        released: false,
    }
}

fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// What `lock.json` holds.
enum State {
    Free,
    Held(Lease),
    /// Present but not a lease (truncated, hand-edited, another tool's): the parse error.
    Corrupt(String),
}

async fn read(repo: &Repository, key: &str) -> Result<State, StorageError> {
    match repo.storage().get(key).await {
        Ok(b) => Ok(match serde_json::from_slice(&b) {
            Ok(l) => State::Held(l),
            Err(e) => State::Corrupt(e.to_string()),
        }),
        Err(e) if e.is_not_found() => Ok(State::Free),
        Err(e) => Err(e),
    }
}

/// Tries to take the lock for `database`; `owner` identifies this process and `command`
/// says what it is (`agent`, `backup`, `prune`) to whoever finds the lock held.
pub async fn acquire(
    repo: &Repository,
    database: &str,
    owner: &str,
    command: &str,
) -> Result<Acquired, StorageError> {
    let key = key(repo, database);
    for _ in 0..ATTEMPTS {
        let body = || Bytes::from(serde_json::to_vec(&lease(owner, command)).expect("serializes"));
        match read(repo, &key).await? {
            State::Held(held)
                if held.owner != owner && !held.released && held.expires_at > Timestamp::now() =>
            {
                return Ok(Acquired::HeldBy(held));
            }
            State::Free => {
                if !repo.storage().put_if_absent(&key, body()).await? {
                    // Someone took it between our read and our write: look again.
                    continue;
                }
                if repo.storage().atomic_create() {
                    // The create was exclusive: no need to wait and read it back.
                    return Ok(Acquired::Yes(LockGuard::hold(repo, key, owner, command)));
                }
            }
            State::Held(expired) => {
                if expired.owner != owner && !expired.released {
                    tracing::warn!(database, holder = %expired, "taking over an expired lock lease");
                }
                repo.storage().put(&key, body()).await?;
            }
            State::Corrupt(error) => {
                tracing::error!(
                    database, file = %format!("{}/{key}", repo.storage().location()), %error,
                    "the lock file cannot be parsed; treating it as expired and taking it over"
                );
                repo.storage().put(&key, body()).await?;
            }
        }
        tokio::time::sleep(SETTLE).await;
        match read(repo, &key).await? {
            State::Held(l) if l.owner == owner => {
                return Ok(Acquired::Yes(LockGuard::hold(repo, key, owner, command)))
            }
            State::Held(other) => return Ok(Acquired::HeldBy(other)),
            // Deleted or overwritten with junk under us: try again.
            State::Free | State::Corrupt(_) => continue,
        }
    }
    Err(StorageError::Failed {
        op: "take the lock",
        key,
        location: repo.storage().location(),
        message: format!(
            "the lock changed under us {ATTEMPTS} times in a row; another process keeps writing it"
        ),
    })
}

impl LockGuard {
    fn hold(repo: &Repository, key: String, owner: &str, command: &str) -> LockGuard {
        let renew = {
            let (repo, key, owner, command) = (
                repo.clone(),
                key.clone(),
                owner.to_string(),
                command.to_string(),
            );
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(RENEW).await;
                    let body = serde_json::to_vec(&lease(&owner, &command)).expect("serializes");
                    if let Err(e) = repo.storage().put(&key, Bytes::from(body)).await {
                        tracing::warn!(error = %e, "could not renew the lock lease");
                    }
                }
            })
        };
        LockGuard {
            repo: repo.clone(),
            key,
            owner: owner.to_string(),
            renew: Some(renew),
        }
    }

    /// Stops renewing and deletes the lock if it is still ours, or, where the credentials
    /// may not delete, overwrites it with a released lease. Waits for the renewal task to
    /// end first, so a renewal in flight cannot write the lock back afterwards.
    pub async fn release(mut self) {
        if let Some(renew) = self.renew.take() {
            renew.abort();
            let _ = renew.await;
        }
        match read(&self.repo, &self.key).await {
            Ok(State::Held(l)) if l.owner == self.owner => {
                if let Err(e) = self.repo.storage().delete(&self.key).await {
                    let released = Lease {
                        released: true,
                        expires_at: Timestamp::now(),
                        ..l
                    };
                    let body = Bytes::from(serde_json::to_vec(&released).expect("serializes"));
                    match self.repo.storage().put(&self.key, body).await {
                        Ok(()) => {
                            tracing::debug!(error = %e, "could not delete the lock; marked it released")
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not release the lock; it expires by itself")
                        }
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not release the lock; it expires by itself")
            }
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        // Not released (a panic, or the process is going down): stop renewing so the lease
        // expires by itself.
        if let Some(renew) = self.renew.take() {
            renew.abort();
        }
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LockGuard({})", self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dr_core::storage::refusing::{Refused, Refusing};
    use std::sync::Arc;

    fn repo(dir: &std::path::Path) -> Repository {
        Repository::new(
            Arc::new(dr_core::storage::file::FileStorage::new(dir.to_path_buf())),
            "test",
        )
    }

    #[tokio::test]
    async fn a_released_lock_is_free_when_the_store_refuses_deletes() {
        let dir = tempfile::tempdir().unwrap();
        // Credentials without delete: the README's agent policy for an Object Lock bucket.
        let store = Refusing {
            inner: dr_core::storage::file::FileStorage::new(dir.path().to_path_buf()),
            refused: Refused::Delete,
        };
        let repo = Repository::new(Arc::new(store), "test");
        let first = match acquire(&repo, "app", "agent-1", "agent").await.unwrap() {
            Acquired::Yes(g) => g,
            Acquired::HeldBy(l) => panic!("free lock held by {l}"),
        };
        first.release().await;
        // The pruner (another role, another process) must not wait out the lease.
        match acquire(&repo, "app", "pruner", "prune").await.unwrap() {
            Acquired::Yes(g) => g.release().await,
            Acquired::HeldBy(l) => panic!("a released lock is still held by {l}"),
        }
    }

    #[tokio::test]
    async fn an_unparseable_lock_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path());
        let k = key(&repo, "app");
        repo.storage()
            .put(&k, Bytes::from_static(b"{\"owner\": tru"))
            .await
            .unwrap();
        let guard = match acquire(&repo, "app", "me", "backup").await.unwrap() {
            Acquired::Yes(g) => g,
            Acquired::HeldBy(l) => panic!("a corrupt lock blocked us, blamed on {l}"),
        };
        guard.release().await;
        assert!(repo.storage().get(&k).await.unwrap_err().is_not_found());
    }

    #[tokio::test]
    async fn a_live_lease_is_refused_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path());
        let first = match acquire(&repo, "app", "one", "agent").await.unwrap() {
            Acquired::Yes(g) => g,
            Acquired::HeldBy(l) => panic!("free lock held by {l}"),
        };
        match acquire(&repo, "app", "two", "backup").await.unwrap() {
            Acquired::Yes(_) => panic!("two holders"),
            Acquired::HeldBy(l) => {
                let text = l.to_string();
                assert!(text.contains("dr agent"), "{text}");
                assert!(text.contains(&std::process::id().to_string()), "{text}");
                assert!(text.contains("until"), "{text}");
            }
        }
        first.release().await;
        match acquire(&repo, "app", "two", "backup").await.unwrap() {
            Acquired::Yes(g) => g.release().await,
            Acquired::HeldBy(l) => panic!("released lock still held by {l}"),
        }
    }
}
