//! Retention: which backups to keep, decided from manifests alone.
//!
//! A backup is kept while any of its classes' `keep` covers it. The newest backup of each
//! class is always kept, however old (a run of failures must never leave a class with
//! nothing). Only committed backups count: a crash leaves no manifest, so it cannot make a
//! good backup look superseded. Order is by the manifest's start time, never by name or
//! version. Backups of classes the config has no schedule for are kept: we do not delete
//! what we were not told how long to keep.

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use serde::Serialize;

use crate::config::DatabaseConfig;
use crate::manifest::Manifest;

/// Objects without a manifest younger than this may be a backup in flight.
pub const ORPHAN_GRACE_SECONDS: i64 = 24 * 3600;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub backup_id: String,
    pub database: String,
    pub started_at: Timestamp,
    pub classes: Vec<String>,
    pub keep: bool,
    pub reason: String,
}

/// Decides for every backup of one database (`backups` in any order).
pub fn plan(db: &DatabaseConfig, backups: &[Manifest], now: Timestamp) -> Vec<Decision> {
    let keeps: BTreeMap<&str, &crate::config::Duration> = db
        .schedules
        .iter()
        .map(|s| (s.class.as_str(), &s.keep))
        .collect();
    let mut sorted: Vec<&Manifest> = backups.iter().collect();
    sorted.sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));

    // The newest backup of each class, by manifest time.
    let mut newest_of: BTreeMap<&str, &str> = BTreeMap::new();
    for m in &sorted {
        for c in &m.classes {
            newest_of.insert(c.as_str(), m.id.as_str());
        }
    }

    sorted
        .iter()
        .map(|m| {
            let decide = |keep: bool, reason: String| Decision {
                backup_id: m.id.to_string(),
                database: m.database.clone(),
                started_at: m.started_at,
                classes: m.classes.clone(),
                keep,
                reason,
            };
            let newest: Vec<&str> = m
                .classes
                .iter()
                .map(String::as_str)
                .filter(|c| newest_of.get(c) == Some(&m.id.as_str()))
                .collect();
            if !newest.is_empty() {
                return decide(
                    true,
                    format!("newest backup of class {}", newest.join(", ")),
                );
            }
            let unscheduled: Vec<&str> = m
                .classes
                .iter()
                .map(String::as_str)
                .filter(|c| !keeps.contains_key(c))
                .collect();
            if !unscheduled.is_empty() {
                return decide(
                    true,
                    format!(
                        "class {} has no schedule, so no `keep` (delete it by hand if unwanted)",
                        unscheduled.join(", ")
                    ),
                );
            }
            for c in &m.classes {
                let keep = keeps[c.as_str()];
                if m.started_at > keep.before(now) {
                    return decide(true, format!("within {c} keep {keep}"));
                }
            }
            let keeps: Vec<String> = m
                .classes
                .iter()
                .map(|c| format!("{c} keep {}", keeps[c.as_str()]))
                .collect();
            decide(false, format!("older than {}", keeps.join(" and ")))
        })
        .collect()
}

/// Backup directories holding objects but no manifest, old enough to be leftovers of a
/// crash rather than a backup in flight. `keys` are all object keys under the database.
pub fn orphans(
    keys: &[crate::storage::ObjectInfo],
    committed: &BTreeSet<String>,
    now: Timestamp,
) -> Vec<String> {
    keys.iter()
        .filter(|o| {
            let parts: Vec<&str> = o.key.split('/').collect();
            let uncommitted =
                parts.len() == 5 && parts[2] == "backups" && !committed.contains(parts[3]);
            // A temporary file from a crashed write is a leftover even in a committed backup.
            uncommitted || o.key.contains(crate::storage::file::PARTIAL_MARKER)
        })
        .filter(|o| {
            o.modified
                .is_some_and(|t| now.as_second() - t.as_second() > ORPHAN_GRACE_SECONDS)
        })
        .map(|o| o.key.clone())
        .collect()
}

/// What a prune did (or, dry, would do) for one database.
#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    pub database: String,
    pub decisions: Vec<Decision>,
    /// Leftover objects of crashed backups (no manifest, older than a day).
    pub orphans: Vec<String>,
    /// Multipart uploads a crash left open, older than a day.
    pub stale_uploads: Vec<String>,
    pub dry_run: bool,
    /// Deletions that failed; the rest went ahead.
    pub errors: Vec<String>,
}

/// Applies retention to one database: each expired backup loses its manifest first, then
/// its objects; then old orphaned objects go.
pub async fn prune(
    repo: &crate::repo::Repository,
    db: &DatabaseConfig,
    now: Timestamp,
    dry_run: bool,
) -> Result<PruneReport, crate::storage::StorageError> {
    let database = db.name.as_str();
    let listing = repo.list(Some(database)).await?;
    if !listing.unreadable.is_empty() {
        // An unreadable manifest might be the newest backup of a class: decide nothing.
        return Err(crate::storage::StorageError::Failed {
            op: "prune",
            key: format!("{}/{database}/backups/", repo.environment()),
            location: repo.storage().location(),
            message: format!(
                "{} manifest(s) cannot be read ({}); refusing to prune until they are fixed",
                listing.unreadable.len(),
                listing.unreadable[0]
            ),
        });
    }
    let decisions = plan(db, &listing.backups, now);
    let committed: BTreeSet<String> = listing.backups.iter().map(|m| m.id.to_string()).collect();
    let prefix = format!("{}/{database}/backups/", repo.environment());
    let orphans = orphans(&repo.storage().list(&prefix).await?, &committed, now);
    let stale: Vec<crate::storage::PendingUpload> = repo
        .storage()
        .pending_uploads(&prefix)
        .await?
        .into_iter()
        .filter(|u| {
            u.initiated
                .is_some_and(|t| now.as_second() - t.as_second() > ORPHAN_GRACE_SECONDS)
        })
        .collect();
    let mut report = PruneReport {
        database: database.to_string(),
        decisions,
        orphans,
        stale_uploads: stale.iter().map(|u| u.key.clone()).collect(),
        dry_run,
        errors: Vec::new(),
    };
    if dry_run {
        return Ok(report);
    }
    for d in report.decisions.iter().filter(|d| !d.keep) {
        let id = crate::manifest::BackupId::try_from(d.backup_id.clone()).expect("listed id");
        match repo.delete_backup(database, &id).await {
            Ok(()) => tracing::info!(backup = %d.backup_id, database, reason = %d.reason, "pruned"),
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    for key in &report.orphans {
        match repo.storage().delete(key).await {
            Ok(()) => tracing::info!(key, "removed an object no manifest refers to"),
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    for upload in &stale {
        match repo.storage().abort_pending(upload).await {
            Ok(()) => {
                tracing::info!(key = %upload.key, "aborted a multipart upload a crash left open")
            }
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{BackupId, Compression, Encryption, FORMAT_VERSION};

    fn db() -> DatabaseConfig {
        let text = r#"
            name = "app"
            url = "postgres://u@h/app"
            [[schedules]]
            class = "daily"
            cron = "0 3 * * *"
            keep = "30d"
            [[schedules]]
            class = "monthly"
            cron = "0 4 1 * *"
            keep = "1y"
        "#;
        toml::from_str(text).unwrap()
    }

    fn backup(at: &str, classes: &[&str]) -> Manifest {
        let t: Timestamp = at.parse().unwrap();
        Manifest {
            format: FORMAT_VERSION,
            id: BackupId::new(t),
            environment: "e".into(),
            database: "app".into(),
            classes: classes.iter().map(|c| c.to_string()).collect(),
            started_at: t,
            finished_at: t,
            server_version: "15".into(),
            server_version_num: 150000,
            pg_dump_version: "15".into(),
            dr_version: "0".into(),
            compression: Compression {
                algorithm: "zstd".into(),
                level: 3,
            },
            encryption: Encryption {
                algorithm: "age".into(),
                recipients: vec![],
            },
            objects: vec![],
            row_counts_unavailable: None,
        }
    }

    fn kept(decisions: &[Decision]) -> Vec<bool> {
        decisions.iter().map(|d| d.keep).collect()
    }

    #[test]
    fn expired_go_and_covered_stay() {
        let now: Timestamp = "2026-11-23T12:00:00Z".parse().unwrap();
        let b = vec![
            backup("2026-09-01T03:00:00Z", &["daily"]),
            backup("2026-11-01T04:00:00Z", &["daily", "monthly"]),
            backup("2026-11-20T03:00:00Z", &["daily"]),
            backup("2026-11-22T03:00:00Z", &["daily"]),
        ];
        let d = plan(&db(), &b, now);
        assert_eq!(kept(&d), vec![false, true, true, true]);
        assert!(
            d[0].reason.contains("older than daily keep 30d"),
            "{}",
            d[0].reason
        );
        assert!(
            d[1].reason.contains("newest backup of class monthly"),
            "{}",
            d[1].reason
        );
    }

    #[test]
    fn newest_of_a_class_survives_a_long_outage() {
        // Nothing for a year: the last daily and the last monthly both stay.
        let now: Timestamp = "2027-12-01T00:00:00Z".parse().unwrap();
        let b = vec![
            backup("2026-10-01T04:00:00Z", &["monthly"]),
            backup("2026-11-01T04:00:00Z", &["monthly"]),
            backup("2026-11-21T03:00:00Z", &["daily"]),
            backup("2026-11-22T03:00:00Z", &["daily"]),
        ];
        assert_eq!(kept(&plan(&db(), &b, now)), vec![false, true, false, true]);
    }

    #[test]
    fn order_is_by_time_not_by_input_order() {
        let now: Timestamp = "2027-12-01T00:00:00Z".parse().unwrap();
        let b = vec![
            backup("2026-11-22T03:00:00Z", &["daily"]),
            backup("2026-11-21T03:00:00Z", &["daily"]),
        ];
        let d = plan(&db(), &b, now);
        let keep: Vec<_> = d.iter().filter(|d| d.keep).collect();
        assert_eq!(keep.len(), 1);
        assert_eq!(keep[0].started_at.to_string(), "2026-11-22T03:00:00Z");
    }

    #[test]
    fn unscheduled_classes_are_kept() {
        let now: Timestamp = "2027-12-01T00:00:00Z".parse().unwrap();
        let b = vec![
            backup("2026-01-01T00:00:00Z", &["manual"]),
            backup("2026-02-01T00:00:00Z", &["manual"]),
        ];
        assert_eq!(kept(&plan(&db(), &b, now)), vec![true, true]);
    }

    #[test]
    fn only_old_uncommitted_objects_are_orphans() {
        let now: Timestamp = "2026-11-23T12:00:00Z".parse().unwrap();
        let obj = |key: &str, at: &str| crate::storage::ObjectInfo {
            key: key.into(),
            size: 1,
            modified: Some(at.parse().unwrap()),
        };
        let keys = vec![
            obj("e/app/backups/A/data.dump.zst.age", "2026-11-20T00:00:00Z"),
            obj("e/app/backups/A/manifest.json", "2026-11-20T00:00:00Z"),
            obj("e/app/backups/B/data.dump.zst.age", "2026-11-20T00:00:00Z"),
            obj(
                "e/app/backups/C/data.dump.zst.age.partial-1",
                "2026-11-23T11:00:00Z",
            ),
            obj(
                "e/app/backups/A/manifest.json.partial-2",
                "2026-11-20T00:00:00Z",
            ),
        ];
        let committed = BTreeSet::from(["A".to_string()]);
        assert_eq!(
            orphans(&keys, &committed, now),
            vec![
                "e/app/backups/B/data.dump.zst.age".to_string(),
                "e/app/backups/A/manifest.json.partial-2".to_string()
            ]
        );
    }
}
