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

/// The alert rules and the dashboard shipped in packaging/ query only what `Metrics` exports:
/// a renamed or misspelled family fails here, not silently in an operator's Prometheus.
#[cfg(test)]
mod packaging_tests {
    use super::Metrics;
    use std::collections::BTreeSet;
    use std::path::PathBuf;

    const RULES: &str = "packaging/prometheus/dr-rules.yaml";
    const DASHBOARD: &str = "packaging/grafana/dr.json";

    fn read(relative: &str) -> String {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(relative);
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
    }

    /// Every family with one series: prometheus_client leaves empty families out.
    fn populated() -> Metrics {
        let m = Metrics::new();
        let (db, repo) = (super::db("e", "d"), super::db_repo("e", "d", "primary"));
        let class = super::DbClass {
            environment: "e".into(),
            database: "d".into(),
            class: "daily".into(),
        };
        let stage = super::DbStage {
            environment: "e".into(),
            database: "d".into(),
            stage: "raw".into(),
        };
        let reason = super::DbReason {
            environment: "e".into(),
            database: "d".into(),
            reason: "lock_held".into(),
        };
        // Destructured, so a new family cannot be added without being listed here.
        let Metrics {
            registry: _,
            last_success,
            duration,
            size,
            failures,
            skipped,
            rpo,
            copy_failures,
            rpo_objective,
            drill_last_success,
            drill_rto,
            rto_objective,
            drill_failures,
            drill_achieved_rpo,
            continuous_retained,
            continuous_without_identity,
            continuous_at_risk,
            continuous_covered_until,
            continuous_segments,
            continuous_capture_failures,
            continuous_lag,
        } = &m;
        last_success.get_or_create(&class).set(1.0);
        for gauge in [
            duration,
            rpo_objective,
            drill_last_success,
            drill_rto,
            rto_objective,
            drill_achieved_rpo,
            continuous_covered_until,
        ] {
            gauge.get_or_create(&db).set(1.0);
        }
        rpo.get_or_create(&repo).set(1.0);
        size.get_or_create(&stage).set(1);
        for gauge in [
            continuous_retained,
            continuous_without_identity,
            continuous_at_risk,
        ] {
            gauge.get_or_create(&db).set(1);
        }
        for counter in [
            failures,
            drill_failures,
            continuous_segments,
            continuous_capture_failures,
        ] {
            counter.get_or_create(&db).inc();
        }
        skipped.get_or_create(&reason).inc();
        copy_failures.get_or_create(&repo).inc();
        continuous_lag.get_or_create(&db).observe(1.0);
        m
    }

    /// Every sample name a scrape can contain, from the `# TYPE` lines of the encoding.
    fn exported() -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for line in populated().encode().lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else {
                continue;
            };
            let (name, kind) = rest.split_once(' ').expect("# TYPE <name> <type>");
            match kind {
                "gauge" => {
                    names.insert(name.to_string());
                }
                "counter" => {
                    names.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                other => panic!("{name}: no rule for metric type {other}"),
            }
        }
        names
    }

    /// The `dr_…` identifiers in a query (not those inside longer words).
    fn dr_identifiers(expr: &str) -> Vec<String> {
        let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
        let bytes = expr.as_bytes();
        let mut found = Vec::new();
        let mut i = 0;
        while let Some(at) = expr[i..].find("dr_").map(|at| at + i) {
            let mut end = at + 3;
            while end < expr.len()
                && (bytes[end].is_ascii_lowercase()
                    || bytes[end].is_ascii_digit()
                    || bytes[end] == b'_')
            {
                end += 1;
            }
            let preceded = expr[..at].chars().next_back().is_some_and(word);
            if !preceded && end > at + 3 {
                found.push(expr[at..end].to_string());
            }
            i = end;
        }
        found
    }

    /// The `expr:` values of a rules file, inline or as a block scalar (`expr: |`).
    fn rule_exprs(yaml: &str) -> Vec<String> {
        let lines: Vec<&str> = yaml.lines().collect();
        let indent = |l: &str| l.len() - l.trim_start().len();
        let mut exprs = Vec::new();
        for (n, line) in lines.iter().enumerate() {
            let item = line.trim_start().trim_start_matches("- ");
            let Some(value) = item.strip_prefix("expr:") else {
                continue;
            };
            let key_column = line.len() - item.len();
            let value = value.trim();
            if value.starts_with('|') || value.starts_with('>') {
                let block = lines[n + 1..]
                    .iter()
                    .take_while(|l| l.trim().is_empty() || indent(l) > key_column)
                    .copied()
                    .collect::<Vec<_>>()
                    .join("\n");
                exprs.push(block);
            } else {
                exprs.push(value.to_string());
            }
        }
        exprs
    }

    /// Every target's `expr` and every template variable's query, anywhere in the dashboard.
    fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr" | "definition", serde_json::Value::String(s)) => {
                            out.push(s.clone())
                        }
                        _ => dashboard_exprs(value, out),
                    }
                }
            }
            serde_json::Value::Array(items) => {
                items.iter().for_each(|item| dashboard_exprs(item, out))
            }
            _ => {}
        }
    }

    fn unknown_metrics(file: &str, exprs: &[String]) -> Vec<String> {
        let exported = exported();
        exprs
            .iter()
            .flat_map(|e| dr_identifiers(e))
            .filter(|name| !exported.contains(name))
            .map(|name| format!("{file} queries {name}, which dr does not export"))
            .collect()
    }

    fn dashboard() -> serde_json::Value {
        serde_json::from_str(&read(DASHBOARD))
            .unwrap_or_else(|e| panic!("{DASHBOARD} is not valid JSON: {e}"))
    }

    #[test]
    fn exported_names_follow_prometheus_client_suffixes() {
        let names = exported();
        for name in [
            "dr_rpo_seconds",
            "dr_backup_failures_total",
            "dr_continuous_lag_seconds_bucket",
            "dr_continuous_lag_seconds_count",
        ] {
            assert!(names.contains(name), "{name} missing from {names:?}");
        }
        assert!(!names.contains("dr_backup_failures"));
    }

    #[test]
    fn alert_rules_query_only_exported_metrics() {
        let exprs = rule_exprs(&read(RULES));
        assert!(
            exprs.len() >= 10,
            "{RULES}: found only {} exprs",
            exprs.len()
        );
        let unknown = unknown_metrics(RULES, &exprs);
        assert!(unknown.is_empty(), "{}", unknown.join("\n"));
    }

    #[test]
    fn dashboard_queries_only_exported_metrics() {
        let mut exprs = Vec::new();
        dashboard_exprs(&dashboard(), &mut exprs);
        assert!(
            exprs.len() >= 10,
            "{DASHBOARD}: found only {} queries",
            exprs.len()
        );
        let unknown = unknown_metrics(DASHBOARD, &exprs);
        assert!(unknown.is_empty(), "{}", unknown.join("\n"));
    }

    #[test]
    fn dashboard_keeps_its_panels() {
        let titles: BTreeSet<String> = dashboard()["panels"]
            .as_array()
            .unwrap_or_else(|| panic!("{DASHBOARD} has no panels"))
            .iter()
            .filter_map(|p| p["title"].as_str().map(str::to_string))
            .collect();
        for title in [
            "RPO per database against objective",
            "Backup duration",
            "Backup size (raw and stored)",
            "Drill RTO against objective",
            "Failures",
            "Continuous capture lag p99",
            "Slot retention",
        ] {
            assert!(
                titles.contains(title),
                "{DASHBOARD} lost its panel {title:?}"
            );
        }
    }

    #[test]
    fn a_misspelled_metric_is_named_with_its_file() {
        let unknown = unknown_metrics(
            "x.yaml",
            &rule_exprs("      - expr: |\n          dr_rpo_second > 1\n        for: 5m\n"),
        );
        assert_eq!(
            unknown,
            ["x.yaml queries dr_rpo_second, which dr does not export"]
        );
        assert!(dr_identifiers("xdr_rpo_seconds + up{job=\"dr\"}").is_empty());
    }
}
