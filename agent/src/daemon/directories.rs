//! One loop per `[[directories]]` entry with schedules: back the tree up when a schedule
//! fires (every class firing at that moment recorded in the one backup), apply retention,
//! and keep the same metrics as databases under `database="<directory name>"`.
//!
//! Stateless like the rest of the agent: the newest backup per class comes back from the
//! repository at start. Unlike databases, a slot missed while the agent was down is not
//! caught up at start; the next slot runs as scheduled (RPO metrics show the gap).

use std::sync::Arc;
use std::time::Duration;

use dr_core::config::NotifyEvent;
use dr_core::pipeline::encode::EncodeOptions;
use dr_core::pipeline::Control;
use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use super::metrics::{db as db_labels, DbClass};
use super::Shared;

/// RPO gauges move this often between backups.
const TICK: Duration = Duration::from_secs(5);

pub async fn directory_loop(shared: Arc<Shared>, index: usize, stop: CancellationToken) {
    let config = shared.config.clone();
    let dir = &config.directories[index];
    let name = dir.name.as_str();
    let env = shared.environment().to_string();
    let labels = db_labels(&env, name);
    if let Some(rpo) = &dir.rpo {
        shared
            .metrics
            .rpo_objective
            .get_or_create(&labels)
            .set(rpo.seconds_at(Timestamp::now()) as f64);
    }
    let _ = shared.metrics.failures.get_or_create(&labels);
    match dr_directories::list(&shared.repo, name).await {
        Ok(backups) => {
            for m in &backups {
                for class in &m.classes {
                    last_success(&shared, name, class, m.started_at);
                }
            }
        }
        Err(e) => {
            tracing::warn!(directory = name, error = %e, "cannot read the directory's backups")
        }
    }
    let tz = config.agent.timezone.0.clone();
    loop {
        let now = Timestamp::now().to_zoned(tz.clone());
        let next = dir
            .schedules
            .iter()
            .filter_map(|s| s.cron.next_runs(&now, 1).into_iter().next())
            .min();
        let Some(at) = next else { return };
        // Sleep in ticks, keeping the RPO gauge current. No alert before the first backup:
        // slots missed while the agent was down are not caught up, so none may be due yet.
        loop {
            let newest = shared
                .last_success
                .lock()
                .expect("last success")
                .get(name)
                .copied();
            if let Some(t) = newest {
                let now = Timestamp::now();
                let age = now.as_second() - t.as_second();
                let objective = dir.rpo.as_ref().map(|r| r.seconds_at(now));
                super::rpo::track(
                    &shared,
                    name,
                    dr_core::config::PRIMARY,
                    Some(age),
                    objective,
                );
            }
            let wait = at.timestamp().as_millisecond() - Timestamp::now().as_millisecond();
            if wait <= 0 {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK.min(Duration::from_millis(wait as u64))) => {}
                _ = stop.cancelled() => return,
            }
        }
        let classes: Vec<String> = dir
            .schedules
            .iter()
            .filter(|s| {
                s.cron
                    .next_runs(&now, 1)
                    .first()
                    .is_some_and(|n| n.timestamp() == at.timestamp())
            })
            .map(|s| s.class.to_string())
            .collect();
        run(&shared, index, classes).await;
    }
}

/// One scheduled backup of the directory, then retention.
async fn run(shared: &Arc<Shared>, index: usize, classes: Vec<String>) {
    let config = &shared.config;
    let dir = &config.directories[index];
    let name = dir.name.as_str();
    let labels = db_labels(shared.environment(), name);
    let recipients = match config.recipients() {
        Ok(r) if !r.is_empty() => r,
        _ => {
            tracing::error!(
                directory = name,
                "no [encryption] recipients; cannot back up"
            );
            return;
        }
    };
    let Ok(_permit) = shared.jobs.acquire().await else {
        return;
    };
    let control = Control {
        cancel: shared.abort.child_token(),
        progress: Default::default(),
    };
    let encode = EncodeOptions {
        level: config.compression.level,
        threads: config.compression.threads,
    };
    let began = std::time::Instant::now();
    let result = dr_directories::backup(
        &shared.repo,
        dir,
        &recipients,
        encode,
        classes.clone(),
        &control,
    )
    .await;
    shared
        .metrics
        .duration
        .get_or_create(&labels)
        .set(began.elapsed().as_secs_f64());
    match result {
        Ok(m) => {
            tracing::info!(directory = name, backup = %m.id, files = m.files, bytes = m.bytes, changed = m.changed_files, "directory backed up");
            for class in &classes {
                last_success(shared, name, class, m.started_at);
            }
            shared.committed.send_modify(|n| *n += 1);
            match dr_directories::prune(&shared.repo, dir, Timestamp::now(), false).await {
                Ok(decisions) => {
                    for d in decisions.iter().filter(|d| !d.keep) {
                        tracing::info!(directory = name, backup = %d.backup_id, reason = %d.reason, "pruned");
                    }
                }
                Err(e) => {
                    tracing::warn!(directory = name, error = %e, "prune failed; backups go on")
                }
            }
            let leftovers = dr_directories::prune_leftovers(
                &shared.repo,
                name,
                Timestamp::now(),
                config.job_timeout(),
                false,
            )
            .await;
            if let Err(e) = leftovers {
                tracing::warn!(directory = name, error = %e, "removing leftovers of failed backups failed; backups go on")
            }
        }
        Err(e) if control.cancel.is_cancelled() => {
            tracing::info!(directory = name, error = %e, "directory backup stopped by shutdown");
        }
        Err(e) => {
            tracing::error!(directory = name, error = %e, "directory backup failed");
            shared.metrics.failures.get_or_create(&labels).inc();
            shared.notifier.send(shared.event(
                NotifyEvent::BackupFailed,
                Some(name),
                format!("backup of directory `{name}` failed: {e}"),
            ));
        }
    }
}

/// Records a backup of `class`: its metric, and the newest backup the primary holds, which
/// the directory's RPO and the copies' (`copies::rpo`) are measured from.
fn last_success(shared: &Shared, name: &str, class: &str, at: Timestamp) {
    let mut last = shared.last_success.lock().expect("last success");
    let newest = last.entry(name.to_string()).or_insert(at);
    *newest = (*newest).max(at);
    drop(last);
    shared
        .metrics
        .last_success
        .get_or_create(&DbClass {
            environment: shared.environment().to_string(),
            database: name.to_string(),
            class: class.to_string(),
        })
        .set(at.as_millisecond() as f64 / 1000.0);
}
