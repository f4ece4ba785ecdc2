//! One loop per `[[copies]]` repository: copy what the primary holds and the copy lacks (as
//! soon as a backup is committed, and every `interval_seconds` for change segments and for
//! catching up after an outage), then apply the copy's own retention, and keep its RPO.
//!
//! A copy's failures never touch the primary's backups: they are logged, counted
//! (`dr_copy_failures_total`), and show as that repository's RPO, which alerts like the
//! primary's when it passes the database's objective.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use dr_core::config::{Config, CopyConfig};
use dr_core::repo::Repository;
use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use super::metrics::db_repo;
use super::Shared;

/// RPO gauges move this often between passes.
const TICK: Duration = Duration::from_secs(5);

pub async fn copy_loop(shared: Arc<Shared>, index: usize, stop: CancellationToken) {
    let config = shared.config.clone();
    let copy = &config.copies[index];
    let name = copy.name.as_str();
    let interval = Duration::from_secs(copy.interval_seconds);
    let mut committed = shared.committed.subscribe();
    // Directory backups share the layout: they are copied the same way.
    let databases: Vec<String> = config
        .databases
        .iter()
        .map(|d| d.name.to_string())
        .chain(config.directories.iter().map(|d| d.name.to_string()))
        .collect();
    let mut dst: Option<Repository> = None;
    // Per database, the newest moment the copy can restore, as of its last good pass.
    let mut newest: HashMap<String, Timestamp> = HashMap::new();
    let mut due = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= due {
            due = tokio::time::Instant::now() + interval;
            if dst.is_none() {
                match dr_core::storage::open(&copy.storage).await {
                    Ok(storage) => {
                        dst = Some(
                            Repository::new(storage, shared.environment())
                                .with_lock(config.object_lock(name)),
                        )
                    }
                    Err(e) => {
                        tracing::warn!(repository = name, error = %e, "cannot open the copy repository; retrying")
                    }
                }
            }
            if let Some(dst) = &dst {
                pass(&shared, index, dst, &databases, &mut newest).await;
            }
        }
        rpo(&shared, name, &newest);
        tokio::select! {
            _ = tokio::time::sleep(TICK.min(due.saturating_duration_since(tokio::time::Instant::now()))) => {}
            changed = committed.changed() => {
                // A backup was committed: copy it now.
                if changed.is_ok() {
                    due = tokio::time::Instant::now();
                }
            }
            _ = stop.cancelled() => return,
        }
    }
}

/// The primary's backups of `names` that `copy`'s retention would delete from the copy at
/// once (older than its `keep` and not the newest of a class), decided as the copy's prune
/// decides, on the primary's manifests. A pass leaves them out: copied, they would be
/// pruned and copied again on every pass. A primary that cannot be listed leaves out none.
pub async fn beyond_keep(
    config: &Config,
    copy: &CopyConfig,
    src: &Repository,
    names: &[String],
    now: Timestamp,
) -> BTreeSet<String> {
    let env = src.environment();
    let mut out = BTreeSet::new();
    for name in names {
        // (backup id, kept) for each of the primary's backups, by the copy's keep.
        let decided = if let Some(db) = config.database(name) {
            src.list(Some(name)).await.map(|listing| {
                dr_core::retention::plan_with(db, &copy.keep, &listing.backups, now)
                    .into_iter()
                    .map(|d| (d.backup_id, d.keep))
                    .collect::<Vec<_>>()
            })
        } else if let Some(dir) = dr_directories::configured(config, name) {
            dr_directories::list(src, name).await.map(|backups| {
                dr_directories::plan_with(dir, &copy.keep, &backups, now)
                    .into_iter()
                    .map(|d| (d.backup_id, d.keep))
                    .collect()
            })
        } else {
            Ok(Vec::new())
        };
        match decided {
            Ok(decided) => out.extend(
                decided
                    .into_iter()
                    .filter(|(_, kept)| !kept)
                    .map(|(id, _)| format!("{env}/{name}/backups/{id}")),
            ),
            Err(e) => {
                tracing::warn!(repository = %copy.name, name = %name, error = %e, "cannot list the primary's backups to apply the copy's keep; copying every missing one")
            }
        }
    }
    out
}

async fn pass(
    shared: &Shared,
    index: usize,
    dst: &Repository,
    databases: &[String],
    newest: &mut HashMap<String, Timestamp>,
) {
    let copy = &shared.config.copies[index];
    let name = copy.name.as_str();
    let env = shared.environment();
    let copied = async {
        let beyond = beyond_keep(
            &shared.config,
            copy,
            &shared.repo,
            databases,
            Timestamp::now(),
        )
        .await;
        dr_copies::copy_missing(&shared.repo, dst, name, databases, &beyond).await
    };
    let report = tokio::select! {
        r = copied => r,
        _ = shared.abort.cancelled() => return,
    };
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(repository = name, error = %e, "copy pass failed; retrying");
            for db in databases {
                shared
                    .metrics
                    .copy_failures
                    .get_or_create(&db_repo(env, db, name))
                    .inc();
            }
            return;
        }
    };
    for e in &report.errors {
        let db = e.split('/').nth(1).unwrap_or_default();
        shared
            .metrics
            .copy_failures
            .get_or_create(&db_repo(env, db, name))
            .inc();
    }
    if report.bytes > 0 {
        tracing::info!(
            repository = name,
            units = report.copied.len(),
            bytes = report.bytes,
            "copied to the copy repository"
        );
    }
    newest.extend(report.newest.clone());

    // The copy's own retention, only once it holds everything it can.
    if !report.errors.is_empty() {
        return;
    }
    // Directory backups too, by the copy's keep.
    for dir in &shared.config.directories {
        match dr_directories::prune_with(dst, dir, &copy.keep, Timestamp::now(), false).await {
            Ok(decisions) => {
                for d in decisions.iter().filter(|d| !d.keep) {
                    tracing::info!(repository = name, directory = %dir.name, backup = %d.backup_id, "pruned from the copy");
                }
            }
            Err(e) => {
                tracing::warn!(repository = name, directory = %dir.name, error = %e, "prune of the copy failed")
            }
        }
        let leftovers = dr_directories::prune_leftovers(
            dst,
            dir.name.as_str(),
            Timestamp::now(),
            shared.config.job_timeout(),
            false,
        )
        .await;
        if let Err(e) = leftovers {
            tracing::warn!(repository = name, directory = %dir.name, error = %e, "removing leftovers from the copy failed")
        }
    }
    for db in &shared.config.databases {
        let pruned = dr_core::retention::prune_with(
            dst,
            db,
            &copy.keep,
            Timestamp::now(),
            shared.config.job_timeout(),
            // Right after this pass copied everything: nothing is being copied now.
            dr_core::retention::Leftovers::Remove,
            false,
        )
        .await;
        match pruned {
            Ok(r) => {
                for e in &r.errors {
                    tracing::warn!(repository = name, database = %db.name, error = %e, "prune of the copy could not delete something");
                }
                if let Err(e) = super::continuous::prune_segments(
                    dst,
                    db,
                    &r,
                    shared.config.job_timeout(),
                    false,
                )
                .await
                {
                    tracing::warn!(repository = name, database = %db.name, error = %e, "segment prune of the copy failed");
                }
            }
            Err(e) => {
                tracing::warn!(repository = name, database = %db.name, error = %e, "prune of the copy failed")
            }
        }
    }
}

/// Sets the copy's RPO gauges and notifies a breach or recovery once each, like the
/// primary's. A unit the primary holds no backup of yet is the primary's alert, not the
/// copy's.
fn rpo(shared: &Shared, name: &str, newest: &HashMap<String, Timestamp>) {
    let now = Timestamp::now();
    let primary = shared.last_success.lock().expect("last success").clone();
    let config = &shared.config;
    let units = config
        .databases
        .iter()
        .map(|d| (d.name.as_str(), d.rpo.as_ref()))
        .chain(
            config
                .directories
                .iter()
                .map(|d| (d.name.as_str(), d.rpo.as_ref())),
        );
    for (unit, objective) in units {
        let age = newest.get(unit).map(|t| now.as_second() - t.as_second());
        if age.is_none() && !primary.contains_key(unit) {
            continue;
        }
        let objective = objective.map(|r| r.seconds_at(now));
        super::rpo::track(shared, unit, name, age, objective);
    }
}
