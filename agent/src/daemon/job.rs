//! One database's schedule loop and its jobs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dr_core::config::{DatabaseConfig, NotifyEvent};
use dr_core::manifest::Manifest;
use dr_core::pipeline::Control;
use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use super::lock::{self, Acquired};
use super::metrics::{db as db_labels, DbClass, DbReason, DbStage};
use super::schedule::{due, missed_classes, next_slot, DueClass};
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
    // Slots after `handled` that are due run next, merged into one job: a slot that falls
    // while a job of this database runs is never dropped. After a reload that is the
    // previous generation's job still in flight; slots before the agent started are the
    // catch-up's business.
    let mut handled = shared
        .in_flight
        .lock()
        .expect("in flight")
        .get(name.as_str())
        .copied()
        .unwrap_or(now)
        .to_zoned(tz.clone());
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
        run_job(&shared, db, Trigger::CatchUp(classes)).await;
    }

    loop {
        if stop.is_cancelled() {
            return;
        }
        let now = Timestamp::now().to_zoned(tz.clone());
        let due = due(db, &handled, &now);
        if due.is_empty() {
            let Some(slot) = next_slot(db, &handled) else {
                tracing::info!(database = %name, "no schedules: nothing to run");
                stop.cancelled().await;
                return;
            };
            let wait =
                (slot.at.timestamp().as_millisecond() - now.timestamp().as_millisecond()).max(0);
            tracing::debug!(database = %name, at = %slot.at, classes = ?slot.classes, "next backup");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
                _ = stop.cancelled() => return,
            }
            continue;
        }
        for c in due
            .iter()
            .filter(|c| c.fires > 1 || c.last.timestamp() < now.timestamp() - LATE)
        {
            tracing::warn!(
                database = %name, class = %c.class, slots = c.fires, latest = %c.last,
                "slots fell while an earlier backup of this database ran; one backup covers them now"
            );
        }
        handled = due.iter().map(|c| c.last.clone()).max().expect("not empty");
        let mark = handled.timestamp();
        shared
            .in_flight
            .lock()
            .expect("in flight")
            .insert(name.clone(), mark);
        run_job(&shared, db, Trigger::Slots(due)).await;
        let mut in_flight = shared.in_flight.lock().expect("in flight");
        if in_flight.get(name.as_str()) == Some(&mark) {
            in_flight.remove(name.as_str());
        }
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

/// Why a job runs.
#[derive(Debug, Clone)]
pub enum Trigger {
    /// At start, the RPO was already breached: these classes' slots were missed.
    CatchUp(Vec<String>),
    /// Slots of the schedule, merged (see [`super::schedule::due`]).
    Slots(Vec<DueClass>),
}

impl Trigger {
    fn classes(&self) -> Vec<String> {
        match self {
            Trigger::CatchUp(c) => c.clone(),
            Trigger::Slots(due) => due.iter().map(|d| d.class.clone()).collect(),
        }
    }
}

/// How a backup run ended.
#[derive(Debug)]
pub enum Outcome {
    Done(Box<Manifest>),
    /// Stopped by SIGTERM/SIGINT: not a failure, the next start catches up.
    Cancelled,
    /// Ran past `[agent] job_timeout` and was cancelled: a failure.
    TimedOut,
    Failed(dr_core::backup::BackupError),
}

/// How long a cancelled backup gets to stop pg_dump and abort its upload before the job
/// stops waiting for it.
const CANCEL_GRACE: Duration = Duration::from_secs(30);
/// A slot due more than this before the loop saw it fell while something else ran.
const LATE: jiff::SignedDuration = jiff::SignedDuration::from_secs(1);

/// One backup: lock, dump, record, prune. Never overlaps another job of the same database;
/// the lock is released on every path.
pub async fn run_job(shared: &Arc<Shared>, db: &DatabaseConfig, trigger: Trigger) {
    let name = db.name.as_str();
    let _permit = shared.jobs.acquire().await.expect("semaphore open");
    let db_mutex = shared.database_mutex(name);
    let _serial = db_mutex.lock().await;
    if shared.abort.is_cancelled() {
        for class in trigger.classes() {
            skipped(
                shared,
                name,
                SkipReason::Shutdown,
                &class,
                "the agent is stopping".into(),
            );
        }
        return;
    }
    let guard = match lock::acquire(&shared.repo, name, &shared.owner, "agent").await {
        Ok(Acquired::Yes(g)) => g,
        Ok(Acquired::HeldBy(l)) => {
            for class in trigger.classes() {
                skipped(
                    shared,
                    name,
                    SkipReason::LockHeld,
                    &class,
                    format!("another process holds this database's lock: {l}"),
                );
            }
            return;
        }
        Err(e) => {
            failed(shared, name, format!("cannot take the lock: {e}"));
            return;
        }
    };
    let classes = match &trigger {
        Trigger::CatchUp(classes) => classes.clone(),
        // Another agent may have done some of these slots already and released the lock.
        Trigger::Slots(due) => match shared.repo.list(Some(name)).await {
            Ok(listing) => {
                let mut left = Vec::new();
                for d in due {
                    let done = listing.backups.iter().find(|m| {
                        m.started_at >= d.last.timestamp() && m.classes.contains(&d.class)
                    });
                    match done {
                        Some(m) => skipped(
                            shared,
                            name,
                            SkipReason::AlreadyDone,
                            &d.class,
                            format!("this slot already has a backup ({}); skipping", m.id),
                        ),
                        None => left.push(d.class.clone()),
                    }
                }
                left
            }
            Err(_) => due.iter().map(|d| d.class.clone()).collect(),
        },
    };
    if classes.is_empty() {
        guard.release().await;
        return;
    }
    set_status(shared, format!("backing up {name}"));
    let started = Instant::now();
    let outcome = backup_with_deadline(
        &shared.repo,
        &shared.config,
        db,
        classes,
        shared.abort.child_token(),
    )
    .await;
    let labels = db_labels(shared.environment(), name);
    shared
        .metrics
        .duration
        .get_or_create(&labels)
        .set(started.elapsed().as_secs_f64());
    if let Outcome::Done(m) = &outcome {
        for c in &m.classes {
            set_last_success(shared, name, c, m.started_at);
        }
        if m.object(dr_core::manifest::ObjectRole::Data).is_some() {
            let (raw, stored) = m.database_bytes();
            for (stage, bytes) in [("raw", raw), ("stored", stored)] {
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
        shared.committed.send_modify(|n| *n += 1);
        // Still under the lock: no backup of this database is in flight.
        let pruned = dr_core::retention::prune(
            &shared.repo,
            db,
            Timestamp::now(),
            shared.config.job_timeout(),
            false,
        )
        .await;
        match pruned {
            Ok(r) => {
                for e in &r.errors {
                    tracing::warn!(database = name, error = %e, "prune could not delete something; backups go on");
                }
                match super::continuous::prune_segments(
                    &shared.repo,
                    db,
                    &r,
                    shared.config.job_timeout(),
                    false,
                )
                .await
                {
                    Ok(Some(s)) => {
                        if !s.deleted.is_empty() || !s.orphans.is_empty() {
                            tracing::info!(
                                database = name,
                                segments = s.deleted.len(),
                                leftovers = s.orphans.len(),
                                "pruned change segments no retained backup needs"
                            );
                        }
                        for e in &s.errors {
                            tracing::warn!(database = name, error = %e, "segment prune could not delete something; capture goes on");
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(database = name, error = %e, "segment prune failed; capture goes on")
                    }
                }
            }
            Err(e) => {
                tracing::warn!(database = name, error = %e, "prune failed; backups go on")
            }
        }
    }
    record(shared, db, &outcome);
    guard.release().await;
}

/// Runs one backup, cancelled by `cancel` (shutdown) or when it runs past
/// `[agent] job_timeout`. Shared by the agent and `dr backup`.
pub async fn backup_with_deadline(
    repo: &dr_core::repo::Repository,
    config: &dr_core::config::Config,
    db: &DatabaseConfig,
    classes: Vec<String>,
    cancel: CancellationToken,
) -> Outcome {
    backup_with_control(
        repo,
        config,
        db,
        classes,
        &Control {
            cancel,
            progress: Default::default(),
        },
    )
    .await
}

/// [`backup_with_deadline`] with the caller's [`Control`] (for a progress bar).
pub async fn backup_with_control(
    repo: &dr_core::repo::Repository,
    config: &dr_core::config::Config,
    db: &DatabaseConfig,
    classes: Vec<String>,
    control: &Control,
) -> Outcome {
    let limit = config.job_timeout();
    // The deadline cancels through a child token, so a shutdown and a timeout stay apart.
    let control = Control {
        cancel: control.cancel.child_token(),
        progress: control.progress.clone(),
    };
    let run = dr_core::backup::run(repo, config, db, classes, &control);
    tokio::pin!(run);
    tokio::select! {
        result = &mut run => classify(result),
        _ = tokio::time::sleep(limit) => {
            tracing::error!(
                database = %db.name, job_timeout = %config.agent.job_timeout,
                "the backup ran past [agent] job_timeout; cancelling it"
            );
            control.cancel.cancel();
            match tokio::time::timeout(CANCEL_GRACE, &mut run).await {
                // It committed just as the deadline fell: a good backup.
                Ok(Ok(m)) => Outcome::Done(Box::new(m)),
                Ok(Err(_)) => Outcome::TimedOut,
                Err(_) => {
                    tracing::error!(database = %db.name, "the cancelled backup did not stop within 30 s; abandoning it");
                    Outcome::TimedOut
                }
            }
        }
    }
}

fn classify(result: Result<Manifest, dr_core::backup::BackupError>) -> Outcome {
    match result {
        Ok(m) => Outcome::Done(Box::new(m)),
        Err(e) if e.is_cancelled() => Outcome::Cancelled,
        Err(e) => Outcome::Failed(e),
    }
}

/// What to add when pg_dump gave up waiting for a table lock (`--lock-wait-timeout`
/// cancels the `LOCK TABLE` with a statement timeout).
pub fn lock_wait_hint(
    error: &str,
    config: &dr_core::config::Config,
    db: &DatabaseConfig,
) -> Option<String> {
    let gave_up = error.contains("LOCK TABLE")
        && (error.contains("statement timeout") || error.contains("lock timeout"));
    gave_up.then(|| {
        let setting = match &db.lock_wait_timeout {
            Some(t) => format!("lock_wait_timeout = \"{t}\" of database `{}`", db.name),
            None => format!(
                "[agent] lock_wait_timeout = \"{}\"",
                config.agent.lock_wait_timeout
            ),
        };
        format!(
            "another session held a lock on a table longer than {setting}, so pg_dump gave up; find it in pg_locks / pg_stat_activity, or raise the timeout"
        )
    })
}

impl Outcome {
    /// The error line for a run that did not commit (`None` for a good one).
    pub fn problem(&self, config: &dr_core::config::Config, db: &DatabaseConfig) -> Option<String> {
        match self {
            Outcome::Done(_) => None,
            Outcome::Cancelled => Some("it was stopped by a signal".into()),
            Outcome::TimedOut => Some(format!(
                "it did not finish within [agent] job_timeout = \"{}\" and was cancelled (raise job_timeout if the database needs longer; a table lock held by another session stops pg_dump only after lock_wait_timeout)",
                config.agent.job_timeout
            )),
            Outcome::Failed(e) => {
                let text = e.to_string();
                Some(match lock_wait_hint(&text, config, db) {
                    Some(hint) => format!("{hint}: {text}"),
                    None => text,
                })
            }
        }
    }
}

/// Counts and reports how a job ended. A shutdown is not a failure: the next start
/// catches up.
fn record(shared: &Shared, db: &DatabaseConfig, outcome: &Outcome) {
    let database = db.name.as_str();
    match outcome {
        Outcome::Done(_) => {}
        Outcome::Cancelled => tracing::warn!(
            database,
            "backup aborted by shutdown; nothing was recorded (not counted as a failure)"
        ),
        Outcome::TimedOut | Outcome::Failed(_) => failed(
            shared,
            database,
            outcome.problem(&shared.config, db).unwrap_or_default(),
        ),
    }
}

/// Why a scheduled backup did not run.
#[derive(Debug, Clone, Copy)]
pub enum SkipReason {
    /// Another process (agent, `dr backup`, `dr prune`) holds the database's lock.
    LockHeld,
    /// Another agent already backed up this slot.
    AlreadyDone,
    /// The agent was stopping when the slot's turn came.
    Shutdown,
}

impl SkipReason {
    fn label(self) -> &'static str {
        match self {
            SkipReason::LockHeld => "lock_held",
            SkipReason::AlreadyDone => "already_done",
            SkipReason::Shutdown => "shutdown",
        }
    }
}

/// Counts one class's slot as skipped and says why, once per skip.
fn skipped(shared: &Shared, database: &str, reason: SkipReason, class: &str, why: String) {
    shared
        .metrics
        .skipped
        .get_or_create(&DbReason {
            environment: shared.environment().to_string(),
            database: database.to_string(),
            reason: reason.label().to_string(),
        })
        .inc();
    tracing::warn!(
        database,
        class,
        reason = reason.label(),
        "scheduled backup skipped: {why}"
    );
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
        let age = last.get(name).map(|t| now.as_second() - t.as_second());
        let objective = db.rpo.as_ref().map(|r| r.seconds_at(now));
        super::rpo::track(shared, name, dr_core::config::PRIMARY, age, objective);
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
            if let Some(rpo) = r.achieved_rpo_seconds {
                shared
                    .metrics
                    .drill_achieved_rpo
                    .get_or_create(&labels)
                    .set(rpo);
            }
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
            if let Some(rpo) = r.achieved_rpo_seconds {
                shared
                    .metrics
                    .drill_achieved_rpo
                    .get_or_create(&labels)
                    .set(rpo);
            }
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

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};
    use std::path::Path;
    use std::sync::Mutex;

    use dr_core::config::Config;
    use dr_core::repo::Repository;
    use dr_core::storage::file::FileStorage;

    use super::super::metrics::Metrics;
    use super::super::notify::Notifier;
    use super::*;

    /// An agent's shared state on a `file://` repository; the database listens nowhere.
    fn shared(dir: &Path) -> Arc<Shared> {
        let text = format!(
            r#"
environment = "test"
[storage]
url = "file://{}"
[encryption]
recipients = ["age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"]
[[databases]]
name = "app"
url = "postgres://nobody@127.0.0.1:1/app"
"#,
            dir.display()
        );
        let config = Arc::new(Config::parse(&text, Path::new("test.toml")).unwrap());
        Arc::new(Shared {
            config,
            repo: Repository::new(Arc::new(FileStorage::new(dir.to_path_buf())), "test"),
            metrics: Arc::new(Metrics::new()),
            notifier: Notifier::new(Vec::new()),
            jobs: Arc::new(tokio::sync::Semaphore::new(1)),
            db_mutex: Arc::new(Mutex::new(HashMap::new())),
            in_flight: Arc::new(Mutex::new(HashMap::new())),
            owner: lock::new_owner(),
            abort: CancellationToken::new(),
            last_success: Arc::new(Mutex::new(HashMap::new())),
            breached: Arc::new(Mutex::new(BTreeSet::new())),
            ready: Arc::new(Mutex::new(BTreeSet::new())),
            status: Arc::new(Mutex::new(String::new())),
            committed: tokio::sync::watch::Sender::new(0),
        })
    }

    fn failures(s: &Shared) -> u64 {
        s.metrics
            .failures
            .get_or_create(&db_labels("test", "app"))
            .get()
    }

    fn skips(s: &Shared, reason: &str) -> u64 {
        s.metrics
            .skipped
            .get_or_create(&DbReason {
                environment: "test".into(),
                database: "app".into(),
                reason: reason.into(),
            })
            .get()
    }

    fn slot() -> Trigger {
        Trigger::Slots(vec![DueClass {
            class: "daily".into(),
            last: Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC),
            fires: 1,
        }])
    }

    #[tokio::test]
    async fn a_shutdown_is_not_a_failure_but_a_timeout_is() {
        let dir = tempfile::tempdir().unwrap();
        let s = shared(dir.path());
        let db = s.config.database("app").unwrap();
        record(&s, db, &Outcome::Cancelled);
        assert_eq!(failures(&s), 0);
        record(&s, db, &Outcome::TimedOut);
        assert_eq!(failures(&s), 1);
    }

    #[tokio::test]
    async fn a_failed_job_releases_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let s = shared(dir.path());
        let db = s.config.database("app").unwrap();
        run_job(&s, db, Trigger::CatchUp(vec!["daily".into()])).await;
        assert_eq!(failures(&s), 1);
        let key = lock::key(&s.repo, "app");
        assert!(
            s.repo.storage().get(&key).await.unwrap_err().is_not_found(),
            "the lock outlived the failed job"
        );
    }

    #[tokio::test]
    async fn slots_not_run_are_counted_with_their_reason() {
        let dir = tempfile::tempdir().unwrap();
        let s = shared(dir.path());
        let db = s.config.database("app").unwrap();
        let other = match lock::acquire(&s.repo, "app", "someone-else", "backup")
            .await
            .unwrap()
        {
            Acquired::Yes(g) => g,
            Acquired::HeldBy(l) => panic!("held by {l}"),
        };
        run_job(&s, db, slot()).await;
        assert_eq!(skips(&s, "lock_held"), 1);
        assert_eq!(failures(&s), 0);
        other.release().await;

        s.abort.cancel();
        run_job(&s, db, slot()).await;
        assert_eq!(skips(&s, "shutdown"), 1);
        assert_eq!(failures(&s), 0);
    }
}
