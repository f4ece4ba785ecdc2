//! RPO of one unit (a database or a directory) in one repository: the `dr_rpo_seconds`
//! gauge, and a breach or recovery notified once each. The primary's and every copy's RPO
//! go through here, so they alert alike.

use dr_core::config::{NotifyEvent, PRIMARY};

use super::metrics::db_repo;
use super::Shared;

/// `age`: seconds since the newest backup the repository can restore, `None` when it holds
/// none (or cannot be reached). `objective`: the unit's `rpo`, if it has one.
pub fn track(
    shared: &Shared,
    unit: &str,
    repository: &str,
    age: Option<i64>,
    objective: Option<i64>,
) {
    if let Some(age) = age {
        shared
            .metrics
            .rpo
            .get_or_create(&db_repo(shared.environment(), unit, repository))
            .set(age as f64);
    }
    let Some(objective) = objective else {
        return;
    };
    let breach = age.is_none_or(|a| a > objective);
    let primary = repository == PRIMARY;
    let message = |what: &str| {
        match (primary, age) {
        (true, Some(a)) => format!("{what}: newest backup is {a} s old, objective {objective} s"),
        (true, None) => format!("{what}: no backup yet, objective {objective} s"),
        (false, Some(a)) => format!(
            "{what} in copy `{repository}`: its newest backup is {a} s old, objective {objective} s"
        ),
        (false, None) => format!(
            "{what} in copy `{repository}`: it holds no backup yet (or cannot be reached), objective {objective} s"
        ),
    }
    };
    let key = if primary {
        unit.to_string()
    } else {
        format!("{unit}@{repository}")
    };
    let mut breached = shared.breached.lock().expect("breached");
    if breach && breached.insert(key.clone()) {
        tracing::error!(database = unit, repository, "RPO objective breached");
        shared.notifier.send(shared.event(
            NotifyEvent::RpoBreach,
            Some(unit),
            message("RPO breach"),
        ));
    } else if !breach && breached.remove(&key) {
        tracing::info!(database = unit, repository, "RPO objective met again");
        shared.notifier.send(shared.event(
            NotifyEvent::RpoRecovered,
            Some(unit),
            message("RPO recovered"),
        ));
    }
}
