//! The repository layout over a storage backend:
//!
//! ```text
//! <environment>/<database>/backups/<backup-id>/{data.dump.zst.age, globals.sql.zst.age, manifest.json}
//! <environment>/<database>/drills/<drill-id>.json
//! ```
//!
//! A backup exists only when its `manifest.json` does; listing reads manifests and nothing
//! else, so it needs no private key.

use std::sync::Arc;

use bytes::Bytes;

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
        }
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
    pub async fn commit(&self, manifest: &Manifest) -> Result<(), StorageError> {
        let key = self.object_key(&manifest.database, &manifest.id, MANIFEST);
        self.storage
            .put(&key, Bytes::from(manifest.to_json()))
            .await
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
                Ok::<_, RepoError>(Manifest::from_json(&key, &bytes)?)
            });
        }
        let mut listing = Listing::default();
        while let Some(joined) = tasks.join_next().await {
            match joined.expect("manifest read task panicked") {
                Ok(m) => listing.backups.push(m),
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
