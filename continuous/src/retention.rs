//! Retention of change segments: they follow the bases.
//!
//! A segment is worth keeping while a retained base may need it. A point-in-time restore
//! starts at the last segment ending at or before its base's `wal_lsn_before` (a commit in
//! flight when the snapshot was taken can sit there), so everything before that segment of
//! the *oldest* retained base is unreachable and goes. Without a retained base nothing is
//! deleted: the next base will need the chain. Segment objects without a manifest (a capture
//! killed between upload and commit) go once older than `orphan_age`.

use dr_core::manifest::Manifest;
use dr_core::repo::Repository;
use dr_core::storage::StorageError;
use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

use crate::capture::{parse_lsn, read_manifest, SegmentManifest, MANIFEST};
use crate::pitr::first_segment_for;

/// What segment retention decided for one database.
#[derive(Debug, Default, Serialize)]
pub struct SegmentPrune {
    pub database: String,
    /// Segments no retained base needs (ids), deleted unless `dry_run`.
    pub deleted: Vec<String>,
    /// Segment directories with no manifest, too old to be a capture in flight.
    pub orphans: Vec<String>,
    /// Committed segments kept.
    pub kept: usize,
    /// Segments no kept base needs that Object Lock still protects, with the date: they go
    /// at the first prune after it.
    pub locked: Vec<String>,
    /// The oldest retained base the kept segments start from, if any.
    pub oldest_base: Option<String>,
    pub dry_run: bool,
    /// Deletions that failed; the rest went ahead.
    pub errors: Vec<String>,
}

/// Applies segment retention given the backups that retention keeps (`retained`).
pub async fn prune_segments(
    repo: &Repository,
    database: &str,
    retained: &[Manifest],
    now: Timestamp,
    orphan_age: SignedDuration,
    dry_run: bool,
) -> Result<SegmentPrune, StorageError> {
    let mut report = SegmentPrune {
        database: database.to_string(),
        dry_run,
        ..Default::default()
    };
    let prefix = format!("{}/{database}/changes/", repo.environment());
    let objects = repo.storage().list(&prefix).await?;
    // Segment id -> its object keys, manifest included.
    let mut dirs: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for o in objects {
        if let Some(id) = o
            .key
            .strip_prefix(&prefix)
            .and_then(|r| r.split('/').next())
        {
            dirs.entry(id.to_string()).or_default().push(o.key.clone());
        }
    }
    let manifest_keys: Vec<String> = dirs
        .iter()
        .filter_map(|(id, keys)| {
            let key = format!("{prefix}{id}/{MANIFEST}");
            keys.contains(&key).then_some(key)
        })
        .collect();
    let segments = read_manifests(repo, manifest_keys).await?;

    let oldest = retained
        .iter()
        .filter(|m| m.database == database)
        .filter_map(|m| m.continuous_base.as_ref().map(|b| (b, m)))
        .min_by_key(|(b, _)| b.snapshot_taken_at);
    let unneeded = match oldest {
        Some((base, manifest)) => {
            report.oldest_base = Some(manifest.id.to_string());
            first_segment_for(&segments, parse_lsn(&base.wal_lsn_before).unwrap_or(0))
        }
        None => 0,
    };
    report.kept = segments.len() - unneeded;

    for s in &segments[..unneeded] {
        if let Some(until) = repo
            .locked_until(database, &[], s.taken_at)
            .filter(|u| *u > now)
        {
            report.locked.push(format!("{} (until {until})", s.id));
            continue;
        }
        report.deleted.push(s.id.clone());
        if !dry_run {
            let keys = dirs.get(&s.id).cloned().unwrap_or_default();
            if let Err(e) = delete_dir(repo, &prefix, &s.id, &keys).await {
                report.errors.push(format!("segment {}: {e}", s.id));
            }
        }
    }

    let committed: std::collections::HashSet<&str> =
        segments.iter().map(|s| s.id.as_str()).collect();
    for (id, keys) in &dirs {
        let has_manifest = keys.iter().any(|k| k.ends_with(&format!("/{MANIFEST}")));
        if has_manifest || committed.contains(id.as_str()) {
            continue;
        }
        // Ids start with the capture's UTC time; one that does not parse is not ours to judge.
        let Some(started) = id_time(id) else { continue };
        if now.duration_since(started) < orphan_age {
            continue;
        }
        report.orphans.push(id.clone());
        if !dry_run {
            if let Err(e) = delete_dir(repo, &prefix, id, keys).await {
                report.errors.push(format!("leftover segment {id}: {e}"));
            }
        }
    }
    Ok(report)
}

/// Manifest first, so a half-deleted segment is never taken for a committed one.
async fn delete_dir(
    repo: &Repository,
    prefix: &str,
    id: &str,
    keys: &[String],
) -> Result<(), StorageError> {
    let manifest = format!("{prefix}{id}/{MANIFEST}");
    if keys.contains(&manifest) {
        repo.storage().delete(&manifest).await?;
    }
    for key in keys.iter().filter(|k| **k != manifest) {
        repo.storage().delete(key).await?;
    }
    Ok(())
}

/// Reads segment manifests concurrently (a week of 30-second segments is 20,000 of them),
/// in stream order. Unparseable ones are logged and left out.
pub(crate) async fn read_manifests(
    repo: &Repository,
    keys: Vec<String>,
) -> Result<Vec<SegmentManifest>, StorageError> {
    use futures_util::stream::{self, StreamExt, TryStreamExt};
    let read: Vec<Option<SegmentManifest>> = stream::iter(keys)
        .map(|key| async move { read_manifest(repo, &key).await })
        .buffered(16)
        .try_collect()
        .await?;
    let mut segments: Vec<SegmentManifest> = read.into_iter().flatten().collect();
    // Stable: segments read again from the same position keep their time order.
    segments.sort_by_key(|m| {
        (
            parse_lsn(&m.start_lsn).unwrap_or(0),
            parse_lsn(&m.end_lsn).unwrap_or(0),
        )
    });
    Ok(segments)
}

fn id_time(id: &str) -> Option<Timestamp> {
    let stamp = id.get(..16)?;
    jiff::civil::DateTime::strptime("%Y%m%dT%H%M%SZ", stamp)
        .ok()?
        .to_zoned(jiff::tz::TimeZone::UTC)
        .ok()
        .map(|z| z.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_ids_carry_their_time() {
        let t = id_time("20261123T221500Z-0000000016B374D8-3f9a").unwrap();
        assert_eq!(t.to_string(), "2026-11-23T22:15:00Z");
        assert!(id_time("garbage").is_none());
    }
}
