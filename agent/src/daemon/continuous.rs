//! Watches each continuous database's source between captures: the WAL its slot holds
//! back, a slot PostgreSQL invalidated, and published tables without a replica identity
//! (whose UPDATEs and DELETEs fail on the source). Any of these is `continuous_at_risk`:
//! exported as metrics and notified once each time the set of risks changes.

use std::sync::Arc;
use std::time::Duration;

use dr_core::config::NotifyEvent;
use dr_core::pg::Connection;
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
    let every = Duration::from_secs(settings.segment_seconds.clamp(1, 60));
    let threshold = settings.slot_retained_alert_mib.saturating_mul(MIB);
    let labels = db_labels(shared.environment(), &name);
    let m = &shared.metrics;
    let mut notified: Vec<String> = Vec::new();
    loop {
        let health = match Connection::new(&db.url, db.password_file.as_deref()) {
            Ok(conn) => dr_continuous::health(db, &conn)
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
                let mut risks = Vec::new();
                if !h.slot_exists {
                    risks.push(
                        "the replication slot does not exist: run `dr continuous setup`"
                            .to_string(),
                    );
                } else if h.slot_lost() {
                    risks.push("the replication slot was invalidated (it lost WAL it needed, max_slot_wal_keep_size): run `dr continuous teardown` then `dr continuous setup` to start a new chain".to_string());
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
