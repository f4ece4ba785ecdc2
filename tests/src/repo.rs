//! Looking into a `dr` repository directly, without `dr`, to check what it stored.
//!
//! Layout: `<root>/<environment>/<database>/backups/<backup-id>/{manifest.json, data
//! objects}`, where the root is a directory (`file://`) or a bucket prefix (`s3://`).

use std::fs;
use std::path::{Path, PathBuf};

use crate::garage::Garage;
use crate::s3::S3;

/// A repository seen from outside `dr`.
pub enum Repo {
    File(PathBuf),
    S3 {
        client: S3,
        bucket: String,
        prefix: String,
    },
}

/// One backup directory found in a repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupEntry {
    pub environment: String,
    pub database: String,
    pub id: String,
    /// Object keys in the backup's directory, relative to the directory (e.g.
    /// `manifest.json`, `data.dump.zst.age`).
    pub objects: Vec<String>,
}

impl BackupEntry {
    /// True when the backup is committed (its manifest exists).
    pub fn has_manifest(&self) -> bool {
        self.objects.iter().any(|o| o == "manifest.json")
    }

    /// The key of `object` in this backup, relative to the repository root.
    pub fn key(&self, object: &str) -> String {
        format!(
            "{}/{}/backups/{}/{object}",
            self.environment, self.database, self.id
        )
    }
}

impl Repo {
    /// A `file://` repository rooted at `root`.
    pub fn file(root: &Path) -> Repo {
        Repo::File(root.to_path_buf())
    }

    /// An S3 repository in `garage`'s test bucket under `prefix`.
    pub fn garage(garage: &Garage, prefix: &str) -> Repo {
        Repo::S3 {
            client: garage.client(),
            bucket: garage.bucket().to_string(),
            prefix: prefix.trim_matches('/').to_string(),
        }
    }

    /// Every object key in the repository, relative to its root, sorted.
    pub fn keys(&self) -> Vec<String> {
        match self {
            Repo::File(root) => {
                let mut keys = Vec::new();
                if root.exists() {
                    walk(root, root, &mut keys);
                }
                keys.sort();
                keys
            }
            Repo::S3 {
                client,
                bucket,
                prefix,
            } => {
                let full_prefix = if prefix.is_empty() {
                    String::new()
                } else {
                    format!("{prefix}/")
                };
                client
                    .list(bucket, &full_prefix)
                    .into_iter()
                    .map(|k| k[full_prefix.len()..].to_string())
                    .collect()
            }
        }
    }

    /// The bytes of the object at `key` (relative to the root).
    pub fn get(&self, key: &str) -> Vec<u8> {
        match self {
            Repo::File(root) => {
                let path = root.join(key);
                fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
            }
            Repo::S3 {
                client,
                bucket,
                prefix,
            } => client.get(bucket, &join_key(prefix, key)),
        }
    }

    /// Copies the object at `key` to `dest` and returns `dest` (so stock tools can read
    /// it from a local file whatever the backend).
    pub fn fetch(&self, key: &str, dest: &Path) -> PathBuf {
        fs::write(dest, self.get(key)).unwrap_or_else(|e| panic!("write {}: {e}", dest.display()));
        dest.to_path_buf()
    }

    /// Every backup directory (committed or not) for `environment`/`database`, sorted by id.
    pub fn backups(&self, environment: &str, database: &str) -> Vec<BackupEntry> {
        let base = format!("{environment}/{database}/backups/");
        let mut entries: Vec<BackupEntry> = Vec::new();
        for key in self.keys() {
            let Some(rest) = key.strip_prefix(&base) else {
                continue;
            };
            let Some((id, object)) = rest.split_once('/') else {
                continue;
            };
            match entries.iter_mut().find(|e| e.id == id) {
                Some(entry) => entry.objects.push(object.to_string()),
                None => entries.push(BackupEntry {
                    environment: environment.to_string(),
                    database: database.to_string(),
                    id: id.to_string(),
                    objects: vec![object.to_string()],
                }),
            }
        }
        entries.sort_by(|a, b| a.id.cmp(&b.id));
        entries
    }

    /// Ids of the committed backups (those with a manifest) for `environment`/`database`.
    pub fn committed_ids(&self, environment: &str, database: &str) -> Vec<String> {
        self.backups(environment, database)
            .into_iter()
            .filter(BackupEntry::has_manifest)
            .map(|e| e.id)
            .collect()
    }

    /// Keys of multipart uploads still in progress (always empty for `file://`).
    pub fn pending_uploads(&self) -> Vec<String> {
        match self {
            Repo::File(_) => Vec::new(),
            Repo::S3 {
                client,
                bucket,
                prefix,
            } => client.multipart_uploads(bucket, prefix),
        }
    }
}

fn join_key(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}/{key}")
    }
}

/// Collects every file under `dir` (hidden temp files included, so leftovers show up),
/// as `/`-separated paths relative to `root`.
fn walk(root: &Path, dir: &Path, keys: &mut Vec<String>) {
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("read dir {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            walk(root, &path, keys);
        } else {
            let rel = path.strip_prefix(root).expect("under root");
            keys.push(rel.to_string_lossy().into_owned());
        }
    }
}
