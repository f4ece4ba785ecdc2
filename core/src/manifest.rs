//! The manifest: written last, it is what makes a backup exist.
//!
//! It holds ids, times, sizes, hashes, versions and classes only; anything describing the
//! database's content lives in the encrypted objects.

use std::fmt;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::config::Name;

/// The manifest format of a one-archive backup, which every dr reads.
pub const FORMAT_VERSION: u32 = 1;
/// A split backup (a schema archive and several data archives): a dr that knows only
/// version 1 must refuse it rather than restore one data archive and call it done.
pub const FORMAT_SPLIT: u32 = 2;
/// The newest format this build reads.
pub const FORMAT_NEWEST: u32 = FORMAT_SPLIT;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest {key} is not valid JSON or is missing fields: {message}")]
    Malformed { key: String, message: String },
    #[error("manifest {key} has format version {found}, but this dr reads up to version {FORMAT_NEWEST}; upgrade dr to read it")]
    UnknownVersion { key: String, found: u64 },
    #[error("manifest {key} is invalid: {message}; dr never writes that, so the manifest was damaged or tampered with")]
    Invalid { key: String, message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: u32,
    pub id: BackupId,
    pub environment: String,
    pub database: String,
    /// The schedule classes this backup belongs to (`daily`, `monthly`, ...).
    pub classes: Vec<String>,
    /// When the dump started: the recovery point.
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
    pub server_version: String,
    pub server_version_num: u32,
    pub pg_dump_version: String,
    pub dr_version: String,
    pub compression: Compression,
    pub encryption: Encryption,
    pub objects: Vec<ObjectEntry>,
    /// Why there are no row counts although drills are configured: a category and SQLSTATE,
    /// never a table name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_counts_unavailable: Option<String>,
    /// For a database with continuous capture: where the dump's snapshot sits in the change
    /// stream, so a point-in-time restore applies exactly the transactions it does not see.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continuous_base: Option<BaseSnapshot>,
    /// A split backup's restore, step by step (empty for one archive): the schema archive's
    /// pre-data, then every data archive (concurrently), then the schema's post-data.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restore_order: Vec<RestoreStep>,
}

/// One step of a split backup's restore.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RestoreStep {
    /// `pre-data`, `data` or `post-data` (pg_restore's `--section`).
    pub section: String,
    /// The archives this step restores; several run concurrently.
    pub objects: Vec<String>,
}

/// The dump's snapshot as PostgreSQL describes it: transaction ids and a WAL position only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BaseSnapshot {
    /// `pg_current_snapshot()` in the dump's transaction (`xmin:xmax:xip,...`, 64-bit ids):
    /// a transaction is in the dump exactly when this snapshot sees it.
    pub snapshot: String,
    /// `pg_current_wal_lsn()` read just before the snapshot was taken: every transaction the
    /// snapshot does not see commits at or after it (give or take a commit in flight).
    pub wal_lsn_before: String,
    /// A server time just after the snapshot was taken: the base holds no commit after it,
    /// so it serves every point in time from here on.
    pub snapshot_taken_at: Timestamp,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Compression {
    pub algorithm: String,
    pub level: i32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Encryption {
    pub algorithm: String,
    /// Public keys only: which identity can decrypt this backup.
    pub recipients: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ObjectRole {
    /// The database (or, in a split backup, one share of its tables' data): a pg_dump
    /// custom-format archive.
    Data,
    /// A split backup's schema: pre-data and post-data sections, no table data.
    Schema,
    /// Roles and tablespaces: `pg_dumpall --globals-only` SQL.
    Globals,
    /// Exact row count of every table in the dump's snapshot (JSON), for drills.
    RowCounts,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ObjectEntry {
    pub role: ObjectRole,
    /// File name inside the backup's directory.
    pub name: String,
    /// What the plaintext is: `pg_dump-custom` or `sql`.
    pub format: String,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    pub sha256: String,
    /// Globals dumped without role passwords (the server did not let us read them).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub without_role_passwords: bool,
}

impl Manifest {
    /// Parses a manifest, refusing format versions this build does not know.
    pub fn from_json(key: &str, bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let malformed = |e: serde_json::Error| ManifestError::Malformed {
            key: key.to_string(),
            message: e.to_string(),
        };
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(malformed)?;
        let found = value.get("format").and_then(|v| v.as_u64()).unwrap_or(0);
        if found == 0 || found > u64::from(FORMAT_NEWEST) {
            if found == 0 {
                return Err(ManifestError::Malformed {
                    key: key.to_string(),
                    message: "no `format` field".into(),
                });
            }
            return Err(ManifestError::UnknownVersion {
                key: key.to_string(),
                found,
            });
        }
        let manifest: Manifest = serde_json::from_value(value).map_err(malformed)?;
        manifest
            .check_key_segments()
            .map_err(|message| ManifestError::Invalid {
                key: key.to_string(),
                message,
            })?;
        Ok(manifest)
    }

    /// The fields that become parts of object keys must each be one path segment, so a
    /// tampered manifest cannot send a restore or a prune outside its backup's directory.
    fn check_key_segments(&self) -> Result<(), String> {
        Name::try_from(self.environment.clone()).map_err(|e| format!("environment: {e}"))?;
        Name::try_from(self.database.clone()).map_err(|e| format!("database: {e}"))?;
        for o in &self.objects {
            let ok = !o.name.is_empty()
                && o.name != "."
                && o.name != ".."
                && !o
                    .name
                    .chars()
                    .any(|c| c == '/' || c == '\\' || c.is_control());
            if !ok {
                return Err(format!(
                    "object name {:?} is not a single file name",
                    o.name
                ));
            }
        }
        Ok(())
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("manifest serializes");
        v.push(b'\n');
        v
    }

    pub fn object(&self, role: ObjectRole) -> Option<&ObjectEntry> {
        self.objects.iter().find(|o| o.role == role)
    }

    /// Whether this backup is a schema archive plus several data archives.
    pub fn is_split(&self) -> bool {
        self.object(ObjectRole::Schema).is_some()
    }

    /// The pg_dump archives (schema and data), in manifest order.
    pub fn archives(&self) -> impl Iterator<Item = &ObjectEntry> {
        self.objects
            .iter()
            .filter(|o| matches!(o.role, ObjectRole::Data | ObjectRole::Schema))
    }

    /// Plaintext and stored bytes of the database's archives together.
    pub fn database_bytes(&self) -> (u64, u64) {
        self.archives()
            .fold((0, 0), |(r, s), o| (r + o.raw_bytes, s + o.stored_bytes))
    }
}

/// A backup id: sorts by time, e.g. `20261122T030000Z-3f9a`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BackupId(String);

impl BackupId {
    pub fn new(at: Timestamp) -> BackupId {
        BackupId(format!(
            "{}-{:04x}",
            at.strftime("%Y%m%dT%H%M%SZ"),
            rand::random::<u16>()
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for BackupId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok = s.len() >= 18
            && s.is_char_boundary(16)
            && jiff::civil::DateTime::strptime("%Y%m%dT%H%M%SZ", &s[..16]).is_ok()
            && s[16..].starts_with('-')
            && s[17..].chars().all(|c| c.is_ascii_alphanumeric());
        if ok {
            Ok(BackupId(s))
        } else {
            Err(format!(
                "`{s}` is not a backup id (they look like 20261122T030000Z-3f9a)"
            ))
        }
    }
}

impl From<BackupId> for String {
    fn from(id: BackupId) -> String {
        id.0
    }
}

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let t: Timestamp = "2026-11-22T03:00:00Z".parse().unwrap();
        Manifest {
            format: FORMAT_VERSION,
            id: BackupId::new(t),
            environment: "staging".into(),
            database: "app".into(),
            classes: vec!["daily".into()],
            started_at: t,
            finished_at: t,
            server_version: "15.18".into(),
            server_version_num: 150018,
            pg_dump_version: "15.18".into(),
            dr_version: "0.1.0".into(),
            compression: Compression {
                algorithm: "zstd".into(),
                level: 3,
            },
            encryption: Encryption {
                algorithm: "age".into(),
                recipients: vec!["age1x".into()],
            },
            objects: vec![],
            row_counts_unavailable: None,
            continuous_base: None,
            restore_order: Vec::new(),
        }
    }

    #[test]
    fn manifest_round_trips() {
        let m = sample();
        assert!(m.id.as_str().starts_with("20261122T030000Z-"));
        assert_eq!(Manifest::from_json("k", &m.to_json()).unwrap(), m);
    }

    #[test]
    fn unknown_version_and_garbage_are_refused_clearly() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["format"] = (FORMAT_NEWEST + 1).into();
        let err = Manifest::from_json("k", v.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("format version {}", FORMAT_NEWEST + 1))
                && err.contains("upgrade dr"),
            "{err}"
        );
        let json = sample().to_json();
        let err = Manifest::from_json("k", &json[..json.len() / 2])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid JSON"), "{err}");
    }

    /// Found by `fuzz/fuzz_targets/manifest.rs`: object names and the database were used in
    /// object keys unchecked, so `../` in a manifest reached outside the backup.
    #[test]
    fn names_that_would_leave_the_backup_directory_are_refused() {
        let data = |name: &str| ObjectEntry {
            role: ObjectRole::Data,
            name: name.into(),
            format: "pg_dump-custom".into(),
            raw_bytes: 1,
            stored_bytes: 1,
            sha256: "00".repeat(32),
            without_role_passwords: false,
        };
        let mut fuzzed = sample();
        fuzzed.objects = vec![data("data.dump.zst.age"), data("globals./ql.zst.age")];
        let mut up = sample();
        up.objects = vec![data("../../../../etc/shadow")];
        let mut database = sample();
        database.database = "../other".into();
        let mut environment = sample();
        environment.environment = "".into();
        for m in [fuzzed, up, database, environment] {
            let err = Manifest::from_json("k", &m.to_json())
                .unwrap_err()
                .to_string();
            assert!(err.contains("tampered with"), "{err}");
        }
        let mut fine = sample();
        fine.objects = vec![data("data.dump.zst.age")];
        Manifest::from_json("k", &fine.to_json()).unwrap();
    }

    #[test]
    fn backup_ids_validate() {
        assert!(BackupId::try_from("20261122T030000Z-3f9a".to_string()).is_ok());
        assert!(BackupId::try_from("../../etc".to_string()).is_err());
        assert!(BackupId::try_from("20261322T030000Z-3f9a".to_string()).is_err());
    }
}
