//! Copies: every committed unit of the primary repository (a backup, a change segment) goes
//! byte for byte to another repository, manifest last (DESIGN invariant 12).
//!
//! Nothing is decrypted: the copy host needs no private key. Each object is streamed from
//! the source to a multipart upload at the destination in bounded memory, its size and
//! sha256 checked against the source's manifest *before* the upload completes (a corrupted
//! source object is never copied), and the manifest is written only once every object is
//! stored and listed at the destination with its size. A unit is missing at the
//! destination while its manifest is; a crash mid-copy leaves objects without a manifest,
//! which the next pass overwrites and the destination's prune ages out like any leftover.

use std::collections::{BTreeMap, BTreeSet};

use bytes::{Bytes, BytesMut};
use dr_core::pipeline::parts::Plan;
use dr_core::repo::Repository;
use dr_core::storage::StorageError;
use jiff::Timestamp;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

const MANIFEST: &str = "manifest.json";
/// Kinds of committed unit, in the order a catch-up copies them: bases first, so a copy
/// that was down for a week can restore something as early as possible.
const KINDS: [&str; 2] = ["backups", "changes"];
/// A pass gives up after this many units fail in a row: the destination is unreachable,
/// not one unit broken.
const FAILURES_IN_A_ROW: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("cannot list {what}: {source}")]
    List {
        what: String,
        #[source]
        source: StorageError,
    },
}

/// What one pass copied, for one destination.
#[derive(Debug, Default, Serialize)]
pub struct CopyReport {
    pub repository: String,
    /// Unit directories copied (`<env>/<db>/backups/<id>`, `<env>/<db>/changes/<id>`).
    pub copied: Vec<String>,
    /// Stored bytes copied.
    pub bytes: u64,
    /// Units the destination already held.
    pub present: usize,
    /// Units not copied because the destination's own retention would delete them at once
    /// (older than its `keep`): copying them would repeat on every pass.
    pub beyond_keep: Vec<String>,
    /// Units that could not be copied, with why; the next pass tries them again.
    pub errors: Vec<String>,
    /// Per database, the newest moment the destination can restore: its newest backup's
    /// start, or, once it holds a backup, the newest segment's covered time.
    pub newest: BTreeMap<String, Timestamp>,
}

/// Copies to `dst` every committed unit of `databases` that `src` holds and `dst` lacks,
/// except those in `beyond_keep` (unit directories the destination's retention would
/// delete at once).
pub async fn copy_missing(
    src: &Repository,
    dst: &Repository,
    repository: &str,
    databases: &[String],
    beyond_keep: &BTreeSet<String>,
) -> Result<CopyReport, CopyError> {
    let mut report = CopyReport {
        repository: repository.to_string(),
        ..Default::default()
    };
    let mut failed_in_a_row = 0;
    for database in databases {
        let have = committed_units(dst, database)
            .await
            .map_err(|source| CopyError::List {
                what: format!("repository `{repository}` ({})", dst.storage().location()),
                source,
            })?;
        let want = committed_units(src, database)
            .await
            .map_err(|source| CopyError::List {
                what: format!("the primary repository ({})", src.storage().location()),
                source,
            })?;
        let mut held = have.clone();
        for kind in KINDS {
            for dir in want.iter().filter(|d| unit_kind(d) == Some(kind)) {
                if have.contains(dir) {
                    report.present += 1;
                    continue;
                }
                if beyond_keep.contains(dir) {
                    report.beyond_keep.push(dir.clone());
                    continue;
                }
                if failed_in_a_row >= FAILURES_IN_A_ROW {
                    break;
                }
                match copy_unit(src, dst, dir).await {
                    Ok(bytes) => {
                        tracing::info!(repository, unit = %dir, bytes, "copied");
                        report.bytes += bytes;
                        report.copied.push(dir.clone());
                        held.insert(dir.clone());
                        failed_in_a_row = 0;
                    }
                    Err(e) => {
                        tracing::warn!(repository, unit = %dir, error = %e, "copy failed; the next pass tries again");
                        report.errors.push(format!("{dir}: {e}"));
                        failed_in_a_row += 1;
                    }
                }
            }
        }
        if let Some(at) = newest_restorable(dst, &held).await {
            report.newest.insert(database.clone(), at);
        }
    }
    Ok(report)
}

/// The directories of a database's committed units (those with a manifest), sorted.
pub async fn committed_units(
    repo: &Repository,
    database: &str,
) -> Result<BTreeSet<String>, StorageError> {
    let mut units = BTreeSet::new();
    for kind in KINDS {
        let prefix = format!("{}/{database}/{kind}/", repo.environment());
        for o in repo.storage().list(&prefix).await? {
            if let Some(dir) = o.key.strip_suffix(&format!("/{MANIFEST}")) {
                if dir
                    .strip_prefix(&prefix)
                    .is_some_and(|id| !id.contains('/'))
                {
                    units.insert(dir.to_string());
                }
            }
        }
    }
    Ok(units)
}

fn unit_kind(dir: &str) -> Option<&'static str> {
    let kind = dir.rsplit('/').nth(1)?;
    KINDS.into_iter().find(|k| *k == kind)
}

/// One stored object a manifest names.
#[derive(Debug, PartialEq)]
struct Expected {
    name: String,
    stored_bytes: u64,
    sha256: String,
}

/// The objects a manifest names, whatever its kind: a backup's `objects` or a segment's
/// `object`. Read as JSON so a copy carries manifests of formats it does not otherwise know.
fn expected_objects(manifest: &[u8]) -> Result<Vec<Expected>, String> {
    let value: serde_json::Value =
        serde_json::from_slice(manifest).map_err(|e| format!("manifest is not JSON: {e}"))?;
    let entries: Vec<&serde_json::Value> = match (&value["objects"], &value["object"]) {
        (serde_json::Value::Array(list), _) => list.iter().collect(),
        (_, object @ serde_json::Value::Object(_)) => vec![object],
        _ => return Err("manifest names no objects".into()),
    };
    entries
        .into_iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap_or_default();
            // A name is a file in the unit's directory, never a path out of it.
            if name.is_empty() || name.contains('/') || name == MANIFEST || name == ".." {
                return Err(format!("manifest names an invalid object {name:?}"));
            }
            Ok(Expected {
                name: name.to_string(),
                stored_bytes: e["stored_bytes"]
                    .as_u64()
                    .ok_or_else(|| format!("object {name} has no stored_bytes"))?,
                sha256: e["sha256"]
                    .as_str()
                    .ok_or_else(|| format!("object {name} has no sha256"))?
                    .to_string(),
            })
        })
        .collect()
}

/// Copies one unit, manifest last; returns the stored bytes copied.
async fn copy_unit(src: &Repository, dst: &Repository, dir: &str) -> Result<u64, String> {
    let manifest_key = format!("{dir}/{MANIFEST}");
    let manifest = src
        .storage()
        .get(&manifest_key)
        .await
        .map_err(|e| e.to_string())?;
    let objects = expected_objects(&manifest)?;
    let mut bytes = 0;
    for object in &objects {
        bytes += copy_object(src, dst, &format!("{dir}/{}", object.name), object).await?;
    }
    // Every object is at the destination with its size before the manifest commits it.
    let listed: BTreeMap<String, u64> = dst
        .storage()
        .list(&format!("{dir}/"))
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect();
    for object in &objects {
        let key = format!("{dir}/{}", object.name);
        match listed.get(&key) {
            Some(size) if *size == object.stored_bytes => {}
            Some(size) => {
                return Err(format!(
                    "{key} is {size} bytes at the destination, {} expected",
                    object.stored_bytes
                ))
            }
            None => return Err(format!("{key} is not listed at the destination")),
        }
    }
    // Object Lock at the destination: objects before the manifest commits them.
    let until = lock_until(dst, dir, &manifest);
    let names: Vec<&str> = objects.iter().map(|o| o.name.as_str()).collect();
    if let Some(until) = until {
        dst.lock_objects(dir, &names, until)
            .await
            .map_err(|e| e.to_string())?;
    }
    dst.storage()
        .put(&manifest_key, manifest)
        .await
        .map_err(|e| e.to_string())?;
    if let Some(until) = until {
        dst.lock_objects(dir, &[MANIFEST], until)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(bytes)
}

/// Until when `repo` locks the unit in `dir`: a backup by its classes and start, a segment
/// by its capture time and the database's longest keep.
fn lock_until(repo: &Repository, dir: &str, manifest: &[u8]) -> Option<Timestamp> {
    repo.object_lock()?;
    let value: serde_json::Value = serde_json::from_slice(manifest).ok()?;
    let database = dir.split('/').nth(1)?;
    let classes: Vec<String> = value["classes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let at = value["started_at"]
        .as_str()
        .or(value["taken_at"].as_str())?
        .parse::<Timestamp>()
        .ok()?;
    repo.locked_until(database, &classes, at)
}

/// Streams one object into a multipart upload, completing it only if its size and sha256
/// are the manifest's.
async fn copy_object(
    src: &Repository,
    dst: &Repository,
    key: &str,
    expected: &Expected,
) -> Result<u64, String> {
    let mut reader = src
        .storage()
        .open_read(key)
        .await
        .map_err(|e| e.to_string())?;
    let mut upload = dst
        .storage()
        .start_upload(key)
        .await
        .map_err(|e| e.to_string())?;
    let plan = Plan::of(dst.storage());
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut number = 1;
    let result: Result<(), String> = async {
        loop {
            let size = plan.size(number);
            let mut part = BytesMut::with_capacity(size);
            while part.len() < size {
                let n = reader
                    .read_buf(&mut part)
                    .await
                    .map_err(|e| format!("reading {key} from the primary: {e}"))?;
                if n == 0 {
                    break;
                }
            }
            if part.is_empty() && number > 1 {
                return Ok(());
            }
            let last = part.len() < size;
            hasher.update(&part);
            total += part.len() as u64;
            upload
                .put_part(Bytes::from(part))
                .await
                .map_err(|e| e.to_string())?;
            number += 1;
            if last {
                return Ok(());
            }
        }
    }
    .await;
    let sha256 = hex::encode(hasher.finalize());
    let checked = result.and_then(|()| {
        if total != expected.stored_bytes {
            Err(format!(
                "{key} at the primary is {total} bytes, its manifest says {}; not copied",
                expected.stored_bytes
            ))
        } else if sha256 != expected.sha256 {
            Err(format!(
                "{key} at the primary has sha256 {sha256}, its manifest says {}: the primary's object is damaged; not copied (run `dr verify`)",
                expected.sha256
            ))
        } else {
            Ok(())
        }
    });
    match checked {
        Ok(()) => {
            upload.complete().await.map_err(|e| e.to_string())?;
            Ok(total)
        }
        Err(e) => {
            let _ = upload.abort().await;
            Err(e)
        }
    }
}

/// What `repo` holds of `database`: its newest backup's id and the newest moment it can
/// restore (see [`CopyReport::newest`]).
pub async fn newest_of(
    repo: &Repository,
    database: &str,
) -> Result<(Option<String>, Option<Timestamp>), StorageError> {
    let held = committed_units(repo, database).await?;
    let id = held
        .iter()
        .rev()
        .find(|d| unit_kind(d) == Some("backups"))
        .and_then(|d| d.rsplit('/').next())
        .map(str::to_string);
    Ok((id, newest_restorable(repo, &held).await))
}

/// The newest moment `repo` can restore, from the units it holds: the newest backup's start
/// or, with a backup, the newest segment's covered time.
async fn newest_restorable(repo: &Repository, held: &BTreeSet<String>) -> Option<Timestamp> {
    let newest_of = |kind: &str| {
        held.iter()
            .rev()
            .find(|d| unit_kind(d) == Some(kind))
            .cloned()
    };
    let read = |dir: String, field: &'static str| async move {
        let bytes = repo
            .storage()
            .get(&format!("{dir}/{MANIFEST}"))
            .await
            .ok()?;
        let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        value[field].as_str()?.parse::<Timestamp>().ok()
    };
    let backup = read(newest_of("backups")?, "started_at").await?;
    let covered = match newest_of("changes") {
        Some(dir) => read(dir, "covered_until").await,
        None => None,
    };
    Some(covered.map_or(backup, |c| c.max(backup)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_come_from_either_kind_of_manifest() {
        let backup = br#"{"objects": [{"name": "data.dump.zst.age", "stored_bytes": 10, "sha256": "ab"},
                                        {"name": "globals.sql.zst.age", "stored_bytes": 2, "sha256": "cd"}]}"#;
        assert_eq!(expected_objects(backup).unwrap().len(), 2);
        let segment =
            br#"{"object": {"name": "changes.zst.age", "stored_bytes": 5, "sha256": "ef"}}"#;
        assert_eq!(
            expected_objects(segment).unwrap(),
            vec![Expected {
                name: "changes.zst.age".into(),
                stored_bytes: 5,
                sha256: "ef".into()
            }]
        );
        for bad in [
            &br#"{"objects": [{"name": "../x", "stored_bytes": 1, "sha256": "a"}]}"#[..],
            br#"{"objects": [{"name": "manifest.json", "stored_bytes": 1, "sha256": "a"}]}"#,
            br#"{"objects": [{"name": "a", "sha256": "a"}]}"#,
            br#"{"format": 1}"#,
            b"not json",
        ] {
            assert!(expected_objects(bad).is_err());
        }
    }

    #[test]
    fn units_have_a_kind() {
        assert_eq!(
            unit_kind("test/app/backups/20261122T030000Z-3f9a"),
            Some("backups")
        );
        assert_eq!(
            unit_kind("test/app/changes/20261122T030000Z-0-3f9a"),
            Some("changes")
        );
        assert_eq!(unit_kind("test/app/drills/x"), None);
    }
}
