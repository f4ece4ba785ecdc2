//! Each continuous database's capture loop: every `segment_seconds` it stores one change
//! segment (confirmed to the slot only once committed), then checks the source: the WAL
//! the slot holds back, a slot PostgreSQL invalidated, published tables without a replica
//! identity (whose UPDATEs and DELETEs fail on the source), and failing captures. Any of
//! these is `continuous_at_risk`: exported as metrics and notified once each time the set
//! of risks changes.

use std::sync::Arc;
use std::time::Duration;

use dr_continuous::capture::{self, Target};
use dr_core::config::NotifyEvent;
use dr_core::pg::Connection;
use dr_core::pipeline::encode::EncodeOptions;
use tokio_util::sync::CancellationToken;

use super::metrics::db as db_labels;
use super::Shared;

const MIB: u64 = 1024 * 1024;

pub async fn watch_loop(shared: Arc<Shared>, name: String, stop: CancellationToken) {
    let config = shared.config.clone();
    let Some(db) = config.database(&name) else {
        return;
    };
    let Some(settings) = &db.continuous else {
        return;
    };
    let every = Duration::from_secs(settings.segment_seconds);
    let threshold = settings.slot_retained_alert_mib.saturating_mul(MIB);
    let labels = db_labels(shared.environment(), &name);
    let m = &shared.metrics;
    let mut notified: Vec<String> = Vec::new();
    let recipients = match config.recipients() {
        Ok(r) if !r.is_empty() => Some(r),
        _ => None,
    };
    let encode = EncodeOptions {
        level: config.compression.level,
        threads: config.compression.threads,
    };
    // The recovery point and the schema digest survive restarts: they come back from the
    // newest segment.
    let mut previous = match capture::latest_segment(&shared.repo, &name).await {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(database = %name, error = %e, "cannot read the newest change segment");
            None
        }
    };
    if let Some(m) = &previous {
        covered(&shared, &name, m);
    }
    let mut slot_usable = true;
    loop {
        let conn = Connection::new(&db.url, db.password_file.as_deref());
        let mut capture_failing = false;
        if let (Ok(conn), Some(recipients), true) = (&conn, &recipients, slot_usable) {
            let target = Target {
                repo: &shared.repo,
                recipients,
                encode,
            };
            tokio::select! {
                result = capture::capture_segment(db, conn, &target, previous.as_ref()) => match result {
                    Ok(segment) => {
                        covered(&shared, &name, &segment);
                        segment_metrics(&shared, &labels, &segment);
                        if segment.schema_changed {
                            tracing::warn!(database = %name, segment = %segment.id, "schema change captured: taking a new backup now, so changes after it can be restored");
                            let (shared, db_name) = (shared.clone(), name.clone());
                            tokio::spawn(async move {
                                if let Some(db) = shared.config.database(&db_name) {
                                    let classes = new_base_classes(db);
                                    super::job::run_job(&shared, db, super::job::Trigger::CatchUp(classes)).await;
                                }
                            });
                        }
                        previous = Some(segment);
                    }
                    Err(e) => {
                        capture_failing = true;
                        m.continuous_capture_failures.get_or_create(&labels).inc();
                        tracing::error!(database = %name, error = %e, "change capture failed; the slot keeps the changes and the next segment retries");
                    }
                },
                _ = stop.cancelled() => return,
            }
        }
        let health = match &conn {
            Ok(conn) => dr_continuous::health(db, conn)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match health {
            Err(e) => {
                // An unreachable source is the backups' alarm to raise; say it here too.
                tracing::warn!(database = %name, error = %e, "cannot check the continuous-capture slot");
            }
            Ok(h) => {
                if let Some(bytes) = h.retained_bytes {
                    m.continuous_retained
                        .get_or_create(&labels)
                        .set(bytes.max(0));
                }
                m.continuous_without_identity
                    .get_or_create(&labels)
                    .set(h.tables_without_identity.len() as i64);
                slot_usable = h.slot_exists && !h.slot_lost();
                let mut risks = Vec::new();
                if recipients.is_none() {
                    risks.push("no [encryption] recipients: nothing can be captured".to_string());
                }
                if capture_failing {
                    risks.push("change capture is failing (the error is in the agent's log); the slot keeps the changes meanwhile".to_string());
                }
                if !h.slot_exists {
                    risks.push(
                        "the replication slot does not exist: run `dr continuous setup`"
                            .to_string(),
                    );
                } else if h.slot_lost() {
                    risks.push(new_chain(&shared, db, conn.as_ref().ok()).await);
                    slot_usable = true;
                }
                if let Some(bytes) = h.retained_bytes.filter(|b| *b as u64 > threshold) {
                    risks.push(format!(
                        "the slot holds back {} MiB of WAL on the source (alert above slot_retained_alert_mib = {}): is capture running?",
                        bytes as u64 / MIB,
                        threshold / MIB
                    ));
                }
                if !h.tables_without_identity.is_empty() {
                    tracing::error!(
                        database = %name,
                        tables = %h.tables_without_identity.join(", "),
                        "published tables without a replica identity: UPDATE and DELETE on them fail on the source; add a primary key or REPLICA IDENTITY FULL"
                    );
                    risks.push(format!(
                        "{} published table(s) have no replica identity, so UPDATE and DELETE on them fail on the source now (names in the agent's log): add a primary key or REPLICA IDENTITY FULL",
                        h.tables_without_identity.len()
                    ));
                }
                m.continuous_at_risk
                    .get_or_create(&labels)
                    .set(i64::from(!risks.is_empty()));
                if risks != notified {
                    if risks.is_empty() {
                        tracing::info!(database = %name, "continuous capture no longer at risk");
                    } else {
                        let message = format!("continuous capture at risk: {}", risks.join("; "));
                        tracing::error!(database = %name, "{message}");
                        shared.notifier.send(shared.event(
                            NotifyEvent::ContinuousAtRisk,
                            Some(&name),
                            message,
                        ));
                    }
                    notified = risks;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// The slot was invalidated: start a new one and take a new backup, so protection resumes
/// by itself. Returns the risk to report (once).
async fn new_chain(
    shared: &Arc<Shared>,
    db: &dr_core::config::DatabaseConfig,
    conn: Option<&Connection>,
) -> String {
    let lost =
        "the replication slot was invalidated (it lost WAL it needed: max_slot_wal_keep_size)";
    let Some(conn) = conn else {
        return format!("{lost}: run `dr continuous teardown` then `dr continuous setup`");
    };
    match dr_continuous::setup::restart_chain(db, conn).await {
        Ok(()) => {
            let (shared, name) = (shared.clone(), db.name.to_string());
            tokio::spawn(async move {
                if let Some(db) = shared.config.database(&name) {
                    let classes = new_base_classes(db);
                    super::job::run_job(&shared, db, super::job::Trigger::CatchUp(classes)).await;
                }
            });
            format!("{lost}; a new slot was created and a new backup started: the changes between the last stored segment and that backup cannot be restored")
        }
        Err(e) => {
            format!("{lost}, and starting a new chain failed ({e}): run `dr continuous teardown` then `dr continuous setup`")
        }
    }
}

/// A committed segment moves the recovery point, once a backup exists to apply it to.
fn covered(shared: &Shared, name: &str, m: &dr_continuous::SegmentManifest) {
    let mut last = shared.last_success.lock().expect("last success");
    if let Some(at) = last.get_mut(name) {
        if m.covered_until > *at {
            *at = m.covered_until;
        }
    }
}

fn segment_metrics(
    shared: &Shared,
    labels: &super::metrics::Db,
    m: &dr_continuous::SegmentManifest,
) {
    let metrics = &shared.metrics;
    metrics
        .continuous_covered_until
        .get_or_create(labels)
        .set(m.covered_until.as_millisecond() as f64 / 1000.0);
    metrics.continuous_segments.get_or_create(labels).inc();
    if let Some(last) = m.last_commit_at {
        let lag = jiff::Timestamp::now().duration_since(last).as_secs_f64();
        metrics
            .continuous_lag
            .get_or_create(labels)
            .observe(lag.max(0.0));
    }
}

/// A backup taken for a new base (a schema change, a new chain) belongs to the database's
/// shortest-kept class, so retention handles it like a scheduled one; without schedules it
/// is `manual`.
fn new_base_classes(db: &dr_core::config::DatabaseConfig) -> Vec<String> {
    let class = db
        .schedules
        .iter()
        .min_by_key(|s| s.keep.to_std())
        .map_or_else(|| "manual".to_string(), |s| s.class.to_string());
    vec![class]
}

/// Segment retention, after backup retention decided `pruned`: segments that no retained
/// base needs go, and leftovers of a capture killed before its commit once older than the
/// longest a job may run plus an hour. `None` for a database without continuous capture.
pub async fn prune_segments(
    repo: &dr_core::repo::Repository,
    db: &dr_core::config::DatabaseConfig,
    pruned: &dr_core::retention::PruneReport,
    job_timeout: Duration,
    dry_run: bool,
) -> Result<Option<dr_continuous::retention::SegmentPrune>, dr_core::storage::StorageError> {
    if db.continuous.is_none() {
        return Ok(None);
    }
    let gone: std::collections::HashSet<&str> = pruned
        .decisions
        .iter()
        .filter(|d| !d.keep)
        .map(|d| d.backup_id.as_str())
        .collect();
    let listing = repo.list(Some(db.name.as_str())).await?;
    if !listing.unreadable.is_empty() {
        // A base dr cannot read may still need the segments: keep them all.
        tracing::warn!(database = %db.name, unreadable = listing.unreadable.len(), "some backup manifests are unreadable; change segments are not pruned");
        return Ok(None);
    }
    let retained: Vec<_> = listing
        .backups
        .into_iter()
        .filter(|m| !gone.contains(m.id.as_str()))
        .collect();
    let orphan_age = jiff::SignedDuration::try_from(job_timeout + Duration::from_secs(3600))
        .unwrap_or(jiff::SignedDuration::MAX);
    dr_continuous::retention::prune_segments(
        repo,
        db.name.as_str(),
        &retained,
        jiff::Timestamp::now(),
        orphan_age,
        dry_run,
    )
    .await
    .map(Some)
}
