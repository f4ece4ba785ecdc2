//! Prometheus metrics, in one explicit registry (no global recorder: tests get their own).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

type FloatGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Db {
    pub environment: String,
    pub database: String,
}

/// A database in one repository: `primary` ([storage]) or a copy's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DbRepo {
    pub environment: String,
    pub database: String,
    pub repository: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DbClass {
    pub environment: String,
    pub database: String,
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DbStage {
    pub environment: String,
    pub database: String,
    pub stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DbReason {
    pub environment: String,
    pub database: String,
    pub reason: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub last_success: Family<DbClass, FloatGauge>,
    pub duration: Family<Db, FloatGauge>,
    pub size: Family<DbStage, Gauge>,
    pub failures: Family<Db, Counter>,
    pub skipped: Family<DbReason, Counter>,
    pub rpo: Family<DbRepo, FloatGauge>,
    pub copy_failures: Family<DbRepo, Counter>,
    pub rpo_objective: Family<Db, FloatGauge>,
    pub drill_last_success: Family<Db, FloatGauge>,
    pub drill_rto: Family<Db, FloatGauge>,
    pub rto_objective: Family<Db, FloatGauge>,
    pub drill_failures: Family<Db, Counter>,
    pub drill_achieved_rpo: Family<Db, FloatGauge>,
    pub continuous_retained: Family<Db, Gauge>,
    pub continuous_without_identity: Family<Db, Gauge>,
    pub continuous_at_risk: Family<Db, Gauge>,
    pub continuous_covered_until: Family<Db, FloatGauge>,
    pub continuous_segments: Family<Db, Counter>,
    pub continuous_capture_failures: Family<Db, Counter>,
    pub continuous_lag: Family<Db, Histogram, fn() -> Histogram>,
}

fn lag_histogram() -> Histogram {
    Histogram::new([1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0])
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics {
            last_success: Family::default(),
            duration: Family::default(),
            size: Family::default(),
            failures: Family::default(),
            skipped: Family::default(),
            rpo: Family::default(),
            copy_failures: Family::default(),
            rpo_objective: Family::default(),
            drill_last_success: Family::default(),
            drill_rto: Family::default(),
            rto_objective: Family::default(),
            drill_failures: Family::default(),
            drill_achieved_rpo: Family::default(),
            continuous_retained: Family::default(),
            continuous_without_identity: Family::default(),
            continuous_at_risk: Family::default(),
            continuous_covered_until: Family::default(),
            continuous_segments: Family::default(),
            continuous_capture_failures: Family::default(),
            continuous_lag: Family::new_with_constructor(lag_histogram),
            registry: Registry::default(),
        };
        m.registry.register(
            "dr_backup_last_success_timestamp_seconds",
            "Start time of the newest good backup of each class",
            m.last_success.clone(),
        );
        m.registry.register(
            "dr_backup_last_duration_seconds",
            "Duration of the last backup run (a gauge: the last run only)",
            m.duration.clone(),
        );
        m.registry.register(
            "dr_backup_size_bytes",
            "Size of the last backup: raw (pg_dump output) and stored",
            m.size.clone(),
        );
        m.registry.register(
            "dr_backup_failures",
            "Backup runs that failed, including runs cancelled by [agent] job_timeout (not by shutdown)",
            m.failures.clone(),
        );
        m.registry.register(
            "dr_backup_skipped",
            "Scheduled backups not run, by reason (lock_held, already_done, shutdown)",
            m.skipped.clone(),
        );
        m.registry.register(
            "dr_rpo_seconds",
            "Age of the newest good backup (or, with continuous capture, of the newest stored change) in each repository: the data an incident now would lose",
            m.rpo.clone(),
        );
        m.registry.register(
            "dr_copy_failures",
            "Backups and change segments that could not be copied to a [[copies]] repository (retried on the next pass)",
            m.copy_failures.clone(),
        );
        m.registry.register(
            "dr_rpo_objective_seconds",
            "Configured recovery point objective",
            m.rpo_objective.clone(),
        );
        m.registry.register(
            "dr_drill_last_success_timestamp_seconds",
            "End time of the last successful restore drill",
            m.drill_last_success.clone(),
        );
        m.registry.register(
            "dr_drill_rto_seconds",
            "Measured recovery time of the last drill",
            m.drill_rto.clone(),
        );
        m.registry.register(
            "dr_rto_objective_seconds",
            "Configured recovery time objective",
            m.rto_objective.clone(),
        );
        m.registry.register(
            "dr_drill_failures",
            "Restore drills that failed",
            m.drill_failures.clone(),
        );
        m.registry.register(
            "dr_drill_achieved_rpo_seconds",
            "Continuous capture: age of the recovery point the last drill restored to, when it started",
            m.drill_achieved_rpo.clone(),
        );
        m.registry.register(
            "dr_continuous_slot_retained_bytes",
            "WAL the continuous-capture slot holds back on the source (current LSN minus restart LSN)",
            m.continuous_retained.clone(),
        );
        m.registry.register(
            "dr_continuous_tables_without_identity",
            "Published tables without a replica identity: UPDATE and DELETE on them fail on the source",
            m.continuous_without_identity.clone(),
        );
        m.registry.register(
            "dr_continuous_at_risk",
            "1 while continuous capture is at risk (slot missing or invalidated, WAL retained above the threshold, tables without identity)",
            m.continuous_at_risk.clone(),
        );
        m.registry.register(
            "dr_continuous_covered_until_timestamp_seconds",
            "Every commit up to this time is stored in a committed change segment",
            m.continuous_covered_until.clone(),
        );
        m.registry.register(
            "dr_continuous_segments",
            "Change segments committed",
            m.continuous_segments.clone(),
        );
        m.registry.register(
            "dr_continuous_capture_failures",
            "Change captures that failed (the slot keeps the changes; the next one retries)",
            m.continuous_capture_failures.clone(),
        );
        m.registry.register(
            "dr_continuous_lag_seconds",
            "From a segment's last commit on the source to the segment being durable in the repository",
            m.continuous_lag.clone(),
        );
        m
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

pub fn db(environment: &str, database: &str) -> Db {
    Db {
        environment: environment.to_string(),
        database: database.to_string(),
    }
}

pub fn db_repo(environment: &str, database: &str, repository: &str) -> DbRepo {
    DbRepo {
        environment: environment.to_string(),
        database: database.to_string(),
        repository: repository.to_string(),
    }
}
