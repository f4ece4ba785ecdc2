//! The repository layout over a storage backend:
//!
//! ```text
//! <environment>/<database>/backups/<backup-id>/{data.dump.zst.age, globals.sql.zst.age, manifest.json}
//! <environment>/<database>/drills/<drill-id>.json
//! ```
//!
//! A backup exists only when its `manifest.json` does; listing reads manifests and nothing
//! else, so it needs no private key.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use jiff::Timestamp;

use crate::manifest::{BackupId, Manifest, ManifestError};
use crate::storage::{Storage, StorageError};

pub const MANIFEST: &str = "manifest.json";
pub const DATA_OBJECT: &str = "data.dump.zst.age";
pub const GLOBALS_OBJECT: &str = "globals.sql.zst.age";
pub const ROW_COUNTS_OBJECT: &str = "rowcounts.json.zst.age";

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

#[derive(Debug, Clone)]
pub struct Repository {
    storage: Arc<dyn Storage>,
    environment: String,
    lock: Option<ObjectLock>,
}

/// What listing found: readable manifests, and the ones that could not be read.
#[derive(Debug, Default)]
pub struct Listing {
    /// Sorted by start time, oldest first.
    pub backups: Vec<Manifest>,
    pub unreadable: Vec<RepoError>,
}

impl Repository {
    pub fn new(storage: Arc<dyn Storage>, environment: &str) -> Self {
        Repository {
            storage,
            environment: environment.to_string(),
            lock: None,
        }
    }

    /// Every backup committed here is locked (S3 Object Lock) by `lock`.
    pub fn with_lock(mut self, lock: Option<ObjectLock>) -> Self {
        self.lock = lock;
        self
    }

    pub fn object_lock(&self) -> Option<&ObjectLock> {
        self.lock.as_ref()
    }

    /// Until when this repository locks a backup of `database` started `at` in `classes`;
    /// `None` without Object Lock.
    pub fn locked_until(
        &self,
        database: &str,
        classes: &[String],
        at: Timestamp,
    ) -> Option<Timestamp> {
        self.lock.as_ref().map(|l| l.until(database, classes, at))
    }

    /// Locks the objects `names` of the unit in `dir` until `until`, when this repository
    /// locks at all.
    pub async fn lock_objects(
        &self,
        dir: &str,
        names: &[&str],
        until: Timestamp,
    ) -> Result<(), StorageError> {
        let Some(lock) = &self.lock else {
            return Ok(());
        };
        for name in names {
            self.storage
                .retain(&format!("{dir}/{name}"), lock.mode, until)
                .await?;
        }
        Ok(())
    }

    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    pub fn environment(&self) -> &str {
        &self.environment
    }

    pub fn backup_dir(&self, database: &str, id: &BackupId) -> String {
        format!("{}/{database}/backups/{id}", self.environment)
    }

    pub fn object_key(&self, database: &str, id: &BackupId, name: &str) -> String {
        format!("{}/{name}", self.backup_dir(database, id))
    }

    /// Writes the manifest: the commit point of a backup.
    /// With Object Lock, the data objects are locked first (a backup that cannot be locked
    /// is not committed), then the manifest once written.
    pub async fn commit(&self, manifest: &Manifest) -> Result<(), StorageError> {
        let dir = self.backup_dir(&manifest.database, &manifest.id);
        let until = self.locked_until(&manifest.database, &manifest.classes, manifest.started_at);
        if let Some(until) = until {
            let names: Vec<&str> = manifest.objects.iter().map(|o| o.name.as_str()).collect();
            self.lock_objects(&dir, &names, until).await?;
        }
        let key = self.object_key(&manifest.database, &manifest.id, MANIFEST);
        self.storage
            .put(&key, Bytes::from(manifest.to_json()))
            .await?;
        if let Some(until) = until {
            self.lock_objects(&dir, &[MANIFEST], until).await?;
        }
        Ok(())
    }

    /// Every backup of this environment (or of one database), oldest first.
    pub async fn list(&self, database: Option<&str>) -> Result<Listing, StorageError> {
        let prefix = match database {
            Some(db) => format!("{}/{db}/backups/", self.environment),
            None => format!("{}/", self.environment),
        };
        let keys: Vec<String> = self
            .storage
            .list(&prefix)
            .await?
            .into_iter()
            .map(|o| o.key)
            .filter(|k| is_manifest_key(k))
            .collect();
        let mut tasks = tokio::task::JoinSet::new();
        let limit = Arc::new(tokio::sync::Semaphore::new(16));
        for key in keys {
            let storage = self.storage.clone();
            let limit = limit.clone();
            tasks.spawn(async move {
                let _permit = limit.acquire().await;
                let bytes = storage.get(&key).await?;
                // Directory backups share the layout; they are not database backups.
                if is_directory_manifest(&bytes) {
                    return Ok(None);
                }
                Ok::<_, RepoError>(Some(Manifest::from_json(&key, &bytes)?))
            });
        }
        let mut listing = Listing::default();
        while let Some(joined) = tasks.join_next().await {
            match joined.expect("manifest read task panicked") {
                Ok(Some(m)) => listing.backups.push(m),
                Ok(None) => {}
                Err(e) => listing.unreadable.push(e),
            }
        }
        listing
            .backups
            .sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));
        Ok(listing)
    }

    /// Removes a backup's objects, manifest first so it stops existing before its data goes.
    pub async fn delete_backup(&self, database: &str, id: &BackupId) -> Result<(), StorageError> {
        let dir = format!("{}/", self.backup_dir(database, id));
        self.storage.delete(&format!("{dir}{MANIFEST}")).await?;
        for obj in self.storage.list(&dir).await? {
            self.storage.delete(&obj.key).await?;
        }
        Ok(())
    }
}

/// Objects are locked this long past their backup's longest `keep`: retention deletes a
/// backup once `keep` has passed, so the lock must not outlive it by much, nor end before.
pub const LOCK_MARGIN_DAYS: i64 = 1;

/// S3 Object Lock for a repository: each backup's objects are locked until its start plus
/// the longest `keep` among its classes, plus [`LOCK_MARGIN_DAYS`].
#[derive(Debug, Clone)]
pub struct ObjectLock {
    pub mode: crate::storage::LockMode,
    /// Per database, each scheduled class's `keep` (a copy's overrides applied).
    pub keeps: BTreeMap<String, BTreeMap<String, crate::config::Duration>>,
}

impl ObjectLock {
    /// Until when a backup of `database` started `at` in `classes` stays locked. A class
    /// without a schedule (`manual`) or no class at all takes the database's longest keep.
    pub fn until(&self, database: &str, classes: &[String], at: Timestamp) -> Timestamp {
        let keeps = self.keeps.get(database);
        let longest_of = |pick: &mut dyn Iterator<Item = &crate::config::Duration>| {
            pick.map(|d| after(at, d)).max()
        };
        let by_class = keeps.and_then(|k| longest_of(&mut classes.iter().filter_map(|c| k.get(c))));
        let longest = keeps.and_then(|k| longest_of(&mut k.values()));
        let end = by_class
            .filter(|_| {
                classes
                    .iter()
                    .all(|c| keeps.is_some_and(|k| k.contains_key(c)))
            })
            .or(longest)
            .unwrap_or(at);
        end + jiff::SignedDuration::from_hours(24 * LOCK_MARGIN_DAYS)
    }
}

fn after(at: Timestamp, keep: &crate::config::Duration) -> Timestamp {
    at.to_zoned(jiff::tz::TimeZone::UTC)
        .checked_add(keep.span())
        .map(|z| z.timestamp())
        .unwrap_or(Timestamp::MAX)
}

/// A `[[directories]]` backup's manifest (`"kind": "directory"`).
pub fn is_directory_manifest(bytes: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Kind {
        kind: Option<String>,
    }
    serde_json::from_slice::<Kind>(bytes).is_ok_and(|k| k.kind.as_deref() == Some("directory"))
}

/// `<env>/<db>/backups/<id>/manifest.json`
fn is_manifest_key(key: &str) -> bool {
    let parts: Vec<&str> = key.split('/').collect();
    parts.len() == 5 && parts[2] == "backups" && parts[4] == MANIFEST
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_manifests_at_the_right_depth_count() {
        assert!(is_manifest_key(
            "staging/app/backups/20261122T030000Z-3f9a/manifest.json"
        ));
        assert!(!is_manifest_key("staging/app/drills/manifest.json"));
        assert!(!is_manifest_key(
            "staging/app/backups/x/manifest.json.partial-1"
        ));
    }
}
