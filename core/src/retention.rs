//! Retention: which backups to keep, decided from manifests alone.
//!
//! A backup is kept while any of its classes' `keep` covers it. The newest backup of each
//! class, and the newest backup of the database, are always kept, however old (a run of
//! failures must never leave a class with nothing). Only committed backups count: a crash
//! leaves no manifest, so it cannot make a good backup look superseded. Order is by the
//! manifest's start time, never by name or version. Backups of classes the config has no
//! schedule for, and backups with no class at all, are kept: we do not delete what we were
//! not told how long to keep.
//!
//! Leftovers (objects without a manifest, multipart uploads never completed) are aged from
//! their backup id's time: a backup runs at most `[agent] job_timeout`, so one whose id is
//! older than that plus [`ORPHAN_MARGIN_SECONDS`] cannot still be in flight. Last-Modified
//! alone would say nothing about a slow backup that is about to commit.

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use serde::Serialize;

use crate::config::DatabaseConfig;
use crate::manifest::Manifest;

/// Slack on top of the longest backup for clock differences between hosts; an object
/// written this recently is never a leftover, whatever its id says.
pub const ORPHAN_MARGIN_SECONDS: i64 = 3600;

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
    plan_with(db, &BTreeMap::new(), backups, now)
}

/// Like [`plan`], with `overrides` replacing some classes' `keep` (a copy's retention).
pub fn plan_with(
    db: &DatabaseConfig,
    overrides: &BTreeMap<String, crate::config::Duration>,
    backups: &[Manifest],
    now: Timestamp,
) -> Vec<Decision> {
    let keeps: BTreeMap<&str, &crate::config::Duration> = db
        .schedules
        .iter()
        .map(|s| {
            let class = s.class.as_str();
            (class, overrides.get(class).unwrap_or(&s.keep))
        })
        .collect();
    let mut sorted: Vec<&Manifest> = backups.iter().collect();
    sorted.sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));

    // The newest backup of each class, by manifest time.
    let newest_overall = sorted.last().map(|m| m.id.as_str());
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
            if newest_overall == Some(m.id.as_str()) {
                return decide(true, "newest backup of this database".to_string());
            }
            if m.classes.is_empty() {
                return decide(
                    true,
                    "it has no class, so no `keep` (delete it by hand if unwanted)".to_string(),
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

/// The time in a backup id (`20261122T030000Z-3f9a`), if it is one.
fn id_time(id: &str) -> Option<Timestamp> {
    let stamp = id.get(..16)?;
    jiff::civil::DateTime::strptime("%Y%m%dT%H%M%SZ", stamp)
        .ok()?
        .to_zoned(jiff::tz::TimeZone::UTC)
        .ok()
        .map(|z| z.timestamp())
}

/// The backup id in `<env>/<db>/backups/<id>/...`.
fn backup_id_of(key: &str) -> Option<&str> {
    let parts: Vec<&str> = key.split('/').collect();
    (parts.len() >= 5 && parts[2] == "backups").then(|| parts[3])
}

/// Whether something of the backup `key` belongs to, last touched at `touched`, is old
/// enough that no backup can still be writing it: its id's time is more than
/// `max_backup_seconds` plus the margin ago, and it was not touched within the margin. A
/// key without a backup id is aged from `touched` alone, by the same total.
fn is_stale(
    key: &str,
    touched: Option<Timestamp>,
    now: Timestamp,
    max_backup_seconds: i64,
) -> bool {
    let limit = max_backup_seconds + ORPHAN_MARGIN_SECONDS;
    let age = |t: Timestamp| now.as_second() - t.as_second();
    let recently_touched = touched.is_some_and(|t| age(t) <= ORPHAN_MARGIN_SECONDS);
    match backup_id_of(key).and_then(id_time) {
        Some(started) => age(started) > limit && !recently_touched,
        None => touched.is_some_and(|t| age(t) > limit),
    }
}

/// Backup directories holding objects but no manifest, old enough to be leftovers of a
/// crash rather than a backup in flight. `keys` are all object keys under the database.
pub fn orphans(
    keys: &[crate::storage::ObjectInfo],
    committed: &BTreeSet<String>,
    now: Timestamp,
    max_backup_seconds: i64,
) -> Vec<String> {
    keys.iter()
        .filter(|o| {
            let parts: Vec<&str> = o.key.split('/').collect();
            let uncommitted =
                parts.len() == 5 && parts[2] == "backups" && !committed.contains(parts[3]);
            // A temporary file from a crashed write is a leftover even in a committed backup.
            uncommitted || o.key.contains(crate::storage::file::PARTIAL_MARKER)
        })
        .filter(|o| is_stale(&o.key, o.modified, now, max_backup_seconds))
        .map(|o| o.key.clone())
        .collect()
}

/// Multipart uploads no backup can still be feeding. `initiated` is not trusted alone:
/// some stores report a fixed date for every upload (moto says 2010-11-10).
pub fn stale_uploads(
    uploads: Vec<crate::storage::PendingUpload>,
    now: Timestamp,
    max_backup_seconds: i64,
) -> Vec<crate::storage::PendingUpload> {
    uploads
        .into_iter()
        .filter(|u| is_stale(&u.key, u.initiated, now, max_backup_seconds))
        .collect()
}

/// What a prune did (or, dry, would do) for one database.
#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    pub database: String,
    pub decisions: Vec<Decision>,
    /// Leftover objects of crashed backups (no manifest, too old to be in flight).
    pub orphans: Vec<String>,
    /// Multipart uploads a crash left open, too old to be in flight.
    pub stale_uploads: Vec<String>,
    pub dry_run: bool,
    /// Deletions that failed; the rest went ahead.
    pub errors: Vec<String>,
    /// Steps skipped because the store cannot do them; retention itself went ahead.
    pub warnings: Vec<String>,
}

/// Whether a prune also removes leftovers: objects no manifest refers to and multipart
/// uploads left open, once old enough that no backup of ours can still be writing them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leftovers {
    Remove,
    /// In a copy repository, from outside the agent: a catch-up copy writes old backup ids
    /// and can run for hours without a lock, so only the agent's own copy pass (which prunes
    /// after it copies) may judge what is left over there.
    Keep,
}

/// Applies retention to one database: each expired backup loses its manifest first, then
/// its objects; then old orphaned objects go. `max_backup` is the longest a backup may run
/// (`[agent] job_timeout`). The caller holds the database's lock, so no backup of ours is
/// in flight; the aging guards against one whose lease was lost.
pub async fn prune(
    repo: &crate::repo::Repository,
    db: &DatabaseConfig,
    now: Timestamp,
    max_backup: std::time::Duration,
    dry_run: bool,
) -> Result<PruneReport, crate::storage::StorageError> {
    prune_with(
        repo,
        db,
        &BTreeMap::new(),
        now,
        max_backup,
        Leftovers::Remove,
        dry_run,
    )
    .await
}

/// Like [`prune`], with `overrides` replacing some classes' `keep` (a copy's retention).
pub async fn prune_with(
    repo: &crate::repo::Repository,
    db: &DatabaseConfig,
    overrides: &BTreeMap<String, crate::config::Duration>,
    now: Timestamp,
    max_backup: std::time::Duration,
    leftovers: Leftovers,
    dry_run: bool,
) -> Result<PruneReport, crate::storage::StorageError> {
    let max_backup_seconds = i64::try_from(max_backup.as_secs()).unwrap_or(i64::MAX / 2);
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
    let mut decisions = plan_with(db, overrides, &listing.backups, now);
    // Never try to delete what Object Lock still protects: it goes once the lock expires.
    for d in decisions.iter_mut().filter(|d| !d.keep) {
        if let Some(until) = repo
            .locked_until(database, &d.classes, d.started_at)
            .filter(|u| *u > now)
        {
            d.keep = true;
            d.reason = format!(
                "{}, but locked until {until} (object lock): deleted by the first prune after that",
                d.reason
            );
        }
    }
    let committed: BTreeSet<String> = listing.backups.iter().map(|m| m.id.to_string()).collect();
    let prefix = format!("{}/{database}/backups/", repo.environment());
    let mut warnings = Vec::new();
    let orphans = match leftovers {
        Leftovers::Remove => orphans(
            &repo.storage().list(&prefix).await?,
            &committed,
            now,
            max_backup_seconds,
        ),
        Leftovers::Keep => Vec::new(),
    };
    let pending = match repo.storage().pending_uploads(&prefix).await {
        _ if leftovers == Leftovers::Keep => Vec::new(),
        Ok(p) => p,
        // Without multipart listing (s3s-fs) only that step is lost: retention goes on.
        Err(e) if e.is_unsupported() => {
            let warning = format!("cannot look for multipart uploads left open by crashes: {e}; remove them with the store's own tools if it keeps any");
            tracing::warn!(database, "{warning}");
            warnings.push(warning);
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    let stale = stale_uploads(pending, now, max_backup_seconds);
    let mut report = PruneReport {
        database: database.to_string(),
        decisions,
        orphans,
        stale_uploads: stale.iter().map(|u| u.key.clone()).collect(),
        dry_run,
        errors: Vec::new(),
        warnings,
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
            continuous_base: None,
            restore_order: Vec::new(),
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
    fn newest_backup_without_classes_is_kept() {
        // Invariant 7: a manifest with `classes: []` is still a good backup.
        let now: Timestamp = "2027-12-01T00:00:00Z".parse().unwrap();
        let b = vec![
            backup("2026-11-01T03:00:00Z", &["daily"]),
            backup("2026-11-02T03:00:00Z", &[]),
        ];
        let d = plan(&db(), &b, now);
        assert_eq!(kept(&d), vec![true, true], "{d:#?}");
        assert!(d[1].reason.contains("newest"), "{}", d[1].reason);
        // An older classless backup has no `keep` to expire by: kept too.
        let b = vec![
            backup("2026-11-01T03:00:00Z", &[]),
            backup("2026-11-02T03:00:00Z", &["daily"]),
        ];
        assert_eq!(kept(&plan(&db(), &b, now)), vec![true, true]);
    }

    const DAY: i64 = 24 * 3600;

    fn obj(key: &str, modified: &str) -> crate::storage::ObjectInfo {
        crate::storage::ObjectInfo {
            key: key.into(),
            size: 1,
            modified: Some(modified.parse().unwrap()),
        }
    }

    #[test]
    fn only_old_uncommitted_objects_are_orphans() {
        let now: Timestamp = "2026-11-23T12:00:00Z".parse().unwrap();
        let keys = vec![
            obj(
                "e/app/backups/20261120T000000Z-aaaa/data.dump.zst.age",
                "2026-11-20T00:00:00Z",
            ),
            obj(
                "e/app/backups/20261120T000000Z-aaaa/manifest.json",
                "2026-11-20T00:00:00Z",
            ),
            obj(
                "e/app/backups/20261120T000000Z-bbbb/data.dump.zst.age",
                "2026-11-20T00:00:00Z",
            ),
            obj(
                "e/app/backups/20261123T100000Z-cccc/data.dump.zst.age.partial-1",
                "2026-11-23T11:00:00Z",
            ),
            obj(
                "e/app/backups/20261120T000000Z-aaaa/manifest.json.partial-2",
                "2026-11-20T00:00:00Z",
            ),
        ];
        let committed = BTreeSet::from(["20261120T000000Z-aaaa".to_string()]);
        assert_eq!(
            orphans(&keys, &committed, now, DAY),
            vec![
                "e/app/backups/20261120T000000Z-bbbb/data.dump.zst.age".to_string(),
                "e/app/backups/20261120T000000Z-aaaa/manifest.json.partial-2".to_string()
            ]
        );
    }

    #[test]
    fn orphans_are_aged_from_the_backup_id_plus_the_longest_backup() {
        let now: Timestamp = "2026-11-23T12:00:00Z".parse().unwrap();
        // A slow backup started 30 h ago may run 48 h: its first object was last written
        // 29 h ago, but it is still in flight and about to commit.
        let slow = obj(
            "e/app/backups/20261122T060000Z-aaaa/data.dump.zst.age",
            "2026-11-22T07:00:00Z",
        );
        assert!(orphans(std::slice::from_ref(&slow), &BTreeSet::new(), now, 2 * DAY).is_empty());
        // With a 24 h limit it cannot be in flight any more.
        assert_eq!(orphans(&[slow], &BTreeSet::new(), now, DAY).len(), 1);
        // An old id whose object was written a minute ago is left alone (clock skew).
        let fresh = obj(
            "e/app/backups/20261101T000000Z-bbbb/data.dump.zst.age",
            "2026-11-23T11:59:00Z",
        );
        assert!(orphans(&[fresh], &BTreeSet::new(), now, DAY).is_empty());
    }

    #[test]
    fn stale_uploads_are_aged_from_the_backup_id_not_the_store_date() {
        let now: Timestamp = "2026-11-23T12:00:00Z".parse().unwrap();
        let upload = |id: &str, initiated: &str| crate::storage::PendingUpload {
            key: format!("e/app/backups/{id}/data.dump.zst.age"),
            upload_id: id.to_string(),
            initiated: Some(initiated.parse().unwrap()),
        };
        // moto reports every upload as started in 2010: an upload begun an hour ago by a
        // running backup must survive; one whose backup began two days ago goes.
        let stale = stale_uploads(
            vec![
                upload("20261123T110000Z-aaaa", "2010-11-10T00:00:00Z"),
                upload("20261121T110000Z-bbbb", "2010-11-10T00:00:00Z"),
            ],
            now,
            DAY,
        );
        let keys: Vec<&str> = stale.iter().map(|u| u.upload_id.as_str()).collect();
        assert_eq!(keys, vec!["20261121T110000Z-bbbb"]);
    }

    #[tokio::test]
    async fn prune_goes_on_when_the_store_cannot_list_uploads() {
        let dir = tempfile::tempdir().unwrap();
        // Like s3s-fs: no ListMultipartUploads.
        let store = crate::storage::refusing::Refusing {
            inner: crate::storage::file::FileStorage::new(dir.path().to_path_buf()),
            refused: crate::storage::refusing::Refused::PendingUploads,
        };
        let repo = crate::repo::Repository::new(std::sync::Arc::new(store), "e");
        let old = backup("2026-09-01T03:00:00Z", &["daily"]);
        let newest = backup("2026-11-22T03:00:00Z", &["daily"]);
        for m in [&old, &newest] {
            repo.commit(m).await.unwrap();
        }
        let now: Timestamp = "2026-11-23T12:00:00Z".parse().unwrap();
        let report = prune(
            &repo,
            &db(),
            now,
            std::time::Duration::from_secs(3600),
            false,
        )
        .await
        .expect("prune must not fail because upload listing is unsupported");
        assert_eq!(kept(&report.decisions), vec![false, true]);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
        assert!(
            report.warnings[0].contains("does not support"),
            "{:?}",
            report.warnings
        );
        let left: Vec<String> = repo
            .list(Some("app"))
            .await
            .unwrap()
            .backups
            .iter()
            .map(|m| m.id.to_string())
            .collect();
        assert_eq!(left, vec![newest.id.to_string()]);
    }
}
