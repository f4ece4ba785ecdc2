//! One database's schedule loop and its jobs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dr_core::config::{DatabaseConfig, NotifyEvent};
use dr_core::pipeline::Control;
use jiff::{Timestamp, Zoned};
use tokio_util::sync::CancellationToken;

use super::lock::{self, Acquired};
use super::metrics::{db as db_labels, DbClass, DbStage};
use super::schedule::{missed_classes, next_slot};
use super::Shared;

/// How long to wait before retrying when the repository cannot be read at start.
const RETRY: Duration = Duration::from_secs(30);

/// Rebuilds this database's state from the repository, runs a catch-up backup if the RPO
/// objective is already breached, then follows the schedule until told to stop.
pub async fn database_loop(shared: Arc<Shared>, name: String, stop: CancellationToken) {
    let config = shared.config.clone();
    let Some(db) = config.database(&name) else {
        return;
    };
    let tz = config.agent.timezone.0.clone();
    let labels = db_labels(shared.environment(), &name);
    if let Some(rpo) = &db.rpo {
        shared
            .metrics
            .rpo_objective
            .get_or_create(&labels)
            .set(rpo.seconds_at(Timestamp::now()) as f64);
    }
    if let Some(rto) = &db.rto {
        shared
            .metrics
            .rto_objective
            .get_or_create(&labels)
            .set(rto.seconds_at(Timestamp::now()) as f64);
    }

    let newest = loop {
        match newest_per_class(&shared, &name).await {
            Ok(n) => break n,
            Err(e) => {
                tracing::error!(database = %name, error = %e, "cannot read the repository; retrying in 30 s");
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => continue,
                    _ = stop.cancelled() => return,
                }
            }
        }
    };
    for (class, at) in &newest {
        set_last_success(&shared, &name, class, *at);
    }
    // Counters exist from the start, so `increase()` alerts see the first failure.
    let _ = shared.metrics.failures.get_or_create(&labels);
    let _ = shared.metrics.drill_failures.get_or_create(&labels);
    shared.ready.lock().expect("ready").insert(name.clone());
    update_rpo(&shared);

    let now = Timestamp::now();
    let newest_any = newest.values().max().copied();
    let breached = db.rpo.as_ref().is_some_and(|rpo| {
        newest_any.is_none_or(|t| now.as_second() - t.as_second() > rpo.seconds_at(now))
    });
    if breached && !db.schedules.is_empty() {
        let mut classes = missed_classes(db, &newest, &now.to_zoned(tz.clone()));
        if classes.is_empty() {
            classes.push(db.schedules[0].class.to_string());
        }
        tracing::warn!(database = %name, ?classes, "newest backup is older than the RPO objective: catching up now");
        run_job(&shared, db, classes, None).await;
    }

    loop {
        let now = Timestamp::now().to_zoned(tz.clone());
        let Some(slot) = next_slot(db, &now) else {
            tracing::info!(database = %name, "no schedules: nothing to run");
            stop.cancelled().await;
            return;
        };
        let wait = (slot.at.timestamp().as_millisecond() - now.timestamp().as_millisecond()).max(0);
        tracing::debug!(database = %name, at = %slot.at, classes = ?slot.classes, "next backup");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
            _ = stop.cancelled() => return,
        }
        run_job(&shared, db, slot.classes, Some(slot.at)).await;
    }
}

async fn newest_per_class(
    shared: &Shared,
    database: &str,
) -> Result<BTreeMap<String, Timestamp>, dr_core::storage::StorageError> {
    let listing = shared.repo.list(Some(database)).await?;
    let mut newest = BTreeMap::new();
    for m in &listing.backups {
        for c in &m.classes {
            newest.insert(c.clone(), m.started_at);
        }
    }
    Ok(newest)
}

fn set_last_success(shared: &Shared, database: &str, class: &str, at: Timestamp) {
    shared
        .metrics
        .last_success
        .get_or_create(&DbClass {
            environment: shared.environment().to_string(),
            database: database.to_string(),
            class: class.to_string(),
        })
        .set(at.as_millisecond() as f64 / 1000.0);
    let mut last = shared.last_success.lock().expect("last success");
    let entry = last.entry(database.to_string()).or_insert(at);
    if at > *entry {
        *entry = at;
    }
}

/// One backup: lock, dump, record, prune. Never overlaps another job of the same database.
pub async fn run_job(
    shared: &Arc<Shared>,
    db: &DatabaseConfig,
    classes: Vec<String>,
    slot: Option<Zoned>,
) {
    let name = db.name.as_str();
    let _permit = shared.jobs.acquire().await.expect("semaphore open");
    let db_mutex = shared.database_mutex(name);
    let _serial = db_mutex.lock().await;
    if shared.abort.is_cancelled() {
        return;
    }
    let guard = match lock::acquire(&shared.repo, name, &shared.owner).await {
        Ok(Acquired::Yes(g)) => Arc::new(g),
        Ok(Acquired::HeldBy(l)) => {
            tracing::info!(database = name, holder = %l.owner, host = %l.host, "another agent holds this database's lock; skipping this run");
            return;
        }
        Err(e) => {
            failed(shared, name, format!("cannot take the lock: {e}"));
            return;
        }
    };
    // Another agent may have done this slot already and released the lock.
    if let Some(slot) = &slot {
        if let Ok(listing) = shared.repo.list(Some(name)).await {
            let done = listing.backups.iter().any(|m| {
                m.started_at >= slot.timestamp() && m.classes.iter().any(|c| classes.contains(c))
            });
            if done {
                tracing::info!(database = name, slot = %slot, "this slot already has a backup; skipping");
                release(guard).await;
                return;
            }
        }
    }
    let renew = {
        let guard = guard.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(lock::RENEW).await;
                if let Err(e) = guard.renew().await {
                    tracing::warn!(error = %e, "could not renew the lock lease");
                }
            }
        })
    };
    set_status(shared, format!("backing up {name}"));
    let control = Control {
        cancel: shared.abort.child_token(),
        progress: Default::default(),
    };
    let started = Instant::now();
    let result = dr_core::backup::run(&shared.repo, &shared.config, db, classes, &control).await;
    renew.abort();
    let labels = db_labels(shared.environment(), name);
    shared
        .metrics
        .duration
        .get_or_create(&labels)
        .set(started.elapsed().as_secs_f64());
    match result {
        Ok(m) => {
            for c in &m.classes {
                set_last_success(shared, name, c, m.started_at);
            }
            if let Some(data) = m.object(dr_core::manifest::ObjectRole::Data) {
                for (stage, bytes) in [("raw", data.raw_bytes), ("stored", data.stored_bytes)] {
                    shared
                        .metrics
                        .size
                        .get_or_create(&DbStage {
                            environment: shared.environment().to_string(),
                            database: name.to_string(),
                            stage: stage.to_string(),
                        })
                        .set(bytes as i64);
                }
            }
            set_status(
                shared,
                format!("last backup {} of {name} at {}", m.id, m.started_at),
            );
            update_rpo(shared);
            match dr_core::retention::prune(&shared.repo, db, Timestamp::now(), false).await {
                Ok(r) => {
                    for e in &r.errors {
                        tracing::warn!(database = name, error = %e, "prune could not delete something; backups go on");
                    }
                }
                Err(e) => {
                    tracing::warn!(database = name, error = %e, "prune failed; backups go on")
                }
            }
        }
        Err(e) if e.is_cancelled() => {
            shared.metrics.failures.get_or_create(&labels).inc();
            tracing::warn!(
                database = name,
                "backup aborted by shutdown; nothing was recorded"
            );
        }
        Err(e) => failed(shared, name, format!("{e}")),
    }
    release(guard).await;
}

async fn release(guard: Arc<lock::LockGuard>) {
    match Arc::try_unwrap(guard) {
        Ok(g) => g.release().await,
        Err(_) => tracing::warn!("lock still in use; it expires by itself"),
    }
}

fn failed(shared: &Shared, database: &str, message: String) {
    let labels = db_labels(shared.environment(), database);
    shared.metrics.failures.get_or_create(&labels).inc();
    tracing::error!(database, error = %message, "backup failed; no backup was recorded");
    set_status(shared, format!("backup of {database} FAILED"));
    shared.notifier.send(shared.event(
        NotifyEvent::BackupFailed,
        Some(database),
        format!("backup failed: {message}"),
    ));
}

fn set_status(shared: &Shared, text: String) {
    *shared.status.lock().expect("status") = text;
}

/// Recomputes each database's RPO gauge and notifies breaches and recoveries once each.
pub fn update_rpo(shared: &Shared) {
    let now = Timestamp::now();
    let last = shared.last_success.lock().expect("last success").clone();
    let ready = shared.ready.lock().expect("ready").clone();
    for db in &shared.config.databases {
        let name = db.name.as_str();
        if !ready.contains(name) {
            continue;
        }
        let labels = db_labels(shared.environment(), name);
        let age = last.get(name).map(|t| now.as_second() - t.as_second());
        if let Some(age) = age {
            shared.metrics.rpo.get_or_create(&labels).set(age as f64);
        }
        let Some(objective) = db.rpo.as_ref().map(|r| r.seconds_at(now)) else {
            continue;
        };
        let breach = age.is_none_or(|a| a > objective);
        let mut breached = shared.breached.lock().expect("breached");
        let message = |what: &str| match age {
            Some(a) => format!("{what}: newest backup is {a} s old, objective {objective} s"),
            None => format!("{what}: no backup yet, objective {objective} s"),
        };
        if breach && breached.insert(name.to_string()) {
            tracing::error!(database = name, "RPO objective breached");
            shared.notifier.send(shared.event(
                NotifyEvent::RpoBreach,
                Some(name),
                message("RPO breach"),
            ));
        } else if !breach && breached.remove(name) {
            tracing::info!(database = name, "RPO objective met again");
            shared.notifier.send(shared.event(
                NotifyEvent::RpoRecovered,
                Some(name),
                message("RPO recovered"),
            ));
        }
    }
}

/// Runs `[databases.drill] cron` drills, records their metrics and notifies failures.
pub async fn drill_loop(shared: Arc<Shared>, name: String, stop: CancellationToken) {
    let config = shared.config.clone();
    let Some(db) = config.database(&name) else {
        return;
    };
    let Some(cron) = db.drill.as_ref().and_then(|d| d.cron.clone()) else {
        return;
    };
    let labels = db_labels(shared.environment(), &name);
    // Stateless: the last drill's metrics come back from its report.
    if let Ok(history) = dr_drills::report::history(&shared.repo, Some(&name)).await {
        if let Some(r) = history.iter().rev().find(|r| r.passed) {
            shared
                .metrics
                .drill_last_success
                .get_or_create(&labels)
                .set(r.finished_at.as_millisecond() as f64 / 1000.0);
        }
        if let Some(r) = history.last() {
            shared
                .metrics
                .drill_rto
                .get_or_create(&labels)
                .set(r.rto_seconds);
        }
    }
    let tz = config.agent.timezone.0.clone();
    loop {
        let now = Timestamp::now().to_zoned(tz.clone());
        let Some(at) = cron.next_runs(&now, 1).into_iter().next() else {
            return;
        };
        let wait = (at.timestamp().as_millisecond() - now.timestamp().as_millisecond()).max(0);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
            _ = stop.cancelled() => return,
        }
        run_drill(&shared, db).await;
    }
}

async fn run_drill(shared: &Arc<Shared>, db: &DatabaseConfig) {
    let name = db.name.as_str();
    let labels = db_labels(shared.environment(), name);
    let Some(identity) = shared.config.encryption.identity_file.clone() else {
        shared.metrics.drill_failures.get_or_create(&labels).inc();
        tracing::error!(database = name, "a drill is scheduled but [encryption] identity_file is not set; drills need the private key");
        return;
    };
    let _permit = shared.jobs.acquire().await.expect("semaphore open");
    let identities = match dr_core::keys::Identities::from_file(&identity) {
        Ok(i) => Arc::new(i),
        Err(e) => {
            shared.metrics.drill_failures.get_or_create(&labels).inc();
            tracing::error!(database = name, error = %e, "cannot load the identity for the drill");
            return;
        }
    };
    set_status(shared, format!("drilling {name}"));
    let result = dr_drills::run::run(
        &shared.repo,
        &shared.config,
        db,
        identities,
        shared.abort.child_token(),
    )
    .await;
    let problem = match result {
        Ok(r) => {
            shared
                .metrics
                .drill_rto
                .get_or_create(&labels)
                .set(r.rto_seconds);
            if r.passed {
                shared
                    .metrics
                    .drill_last_success
                    .get_or_create(&labels)
                    .set(r.finished_at.as_millisecond() as f64 / 1000.0);
            }
            match (r.passed, r.rto_breached) {
                (true, false) => None,
                (true, true) => Some(format!(
                    "drill {} passed but its RTO {:.1} s exceeds the objective {:.0} s",
                    r.id,
                    r.rto_seconds,
                    r.rto_objective_seconds.unwrap_or(0.0)
                )),
                _ => Some(format!(
                    "drill {} failed: {}",
                    r.id,
                    r.error.clone().unwrap_or_else(|| {
                        r.checks
                            .iter()
                            .filter(|c| !c.passed)
                            .map(|c| format!("{}: {}", c.name, c.detail))
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
                )),
            }
        }
        Err(e) => Some(format!("drill could not run: {e}")),
    };
    if let Some(message) = problem {
        shared.metrics.drill_failures.get_or_create(&labels).inc();
        shared
            .notifier
            .send(shared.event(NotifyEvent::DrillFailed, Some(name), message));
    }
}
