//! `dr status`: per database, the last backup and the RPO against its objective.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use dr_core::config::Config;
use dr_core::manifest::Manifest;
use dr_core::repo::Repository;
use jiff::Timestamp;
use serde::Serialize;

/// Show each database's last backup, current RPO against its objective, and next runs.
///
/// Everything comes from the repository's manifests, so this works from any host with
/// read access and no private key. With --all-environments it shows every environment in
/// the repository: a fleet view with no server.
#[derive(clap::Args)]
pub struct Args {
    /// Every environment in the repository, not only this config's.
    #[arg(long)]
    all_environments: bool,

    /// JSON for scripts and monitoring.
    #[arg(long)]
    json: bool,
}

/// One database or directory: a line of `dr status` and a row of the status page.
#[derive(Serialize)]
pub(crate) struct Row {
    /// `database` or `directory`.
    pub(crate) kind: &'static str,
    pub(crate) environment: String,
    pub(crate) database: String,
    pub(crate) last_backup_id: Option<String>,
    pub(crate) last_backup_at: Option<Timestamp>,
    /// Continuous capture: every commit up to this time is in a stored change segment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) changes_covered_until: Option<Timestamp>,
    /// Continuous capture: the spans `dr restore --to-time` can reach.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) restorable_windows: Vec<dr_continuous::pitr::Window>,
    /// Age of the newest recovery point: the newest backup, or with continuous capture the
    /// newest covered commit time (once a backup exists to apply the changes to).
    pub(crate) rpo_seconds: Option<i64>,
    pub(crate) rpo_objective_seconds: Option<i64>,
    /// `ok`, `breach`, `no_backup` or `no_objective`.
    pub(crate) rpo_status: &'static str,
    pub(crate) next_runs: Vec<String>,
    pub(crate) last_drill: Option<LastDrill>,
    /// The same database in each `[[copies]]` repository.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) copies: Vec<CopyRow>,
}

#[derive(Serialize)]
pub(crate) struct CopyRow {
    pub(crate) repository: String,
    pub(crate) last_backup_id: Option<String>,
    pub(crate) rpo_seconds: Option<i64>,
    /// `ok`, `breach`, `no_backup`, `no_objective` or `unreachable`.
    pub(crate) rpo_status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}

#[derive(Serialize)]
pub(crate) struct LastDrill {
    pub(crate) id: String,
    pub(crate) at: Timestamp,
    pub(crate) passed: bool,
    pub(crate) rto_seconds: f64,
    pub(crate) rto_objective_seconds: Option<f64>,
    pub(crate) rto_breached: bool,
}

impl LastDrill {
    fn describe(&self) -> String {
        format!(
            "{} {}, RTO {:.1} s{}",
            self.at.strftime("%Y-%m-%d %H:%M"),
            if self.passed { "passed" } else { "FAILED" },
            self.rto_seconds,
            if self.rto_breached { " BREACH" } else { "" }
        )
    }
}

impl Args {
    /// The human view of this config's environment, as `dr demo` shows it.
    pub fn for_demo() -> Args {
        Args {
            all_environments: false,
            json: false,
        }
    }

    pub async fn run(self, config_path: &Path) -> anyhow::Result<ExitCode> {
        let config = super::load_config(config_path)?;
        let repo = super::open_repo(&config).await?;
        let now = Timestamp::now();
        let tz = config.agent.timezone.0.clone();
        let mut rows = gather(&config, &repo, now).await?;
        if self.all_environments {
            for env in environments(&repo).await? {
                if env == config.environment.as_str() {
                    continue;
                }
                let other = Repository::new(dr_core::storage::open(&config.storage).await?, &env);
                let listing = other.list(None).await?;
                for (db, m) in newest_by_database(&listing.backups) {
                    rows.push(row(&env, db, Some(m), None, None, now, vec![]));
                }
            }
        }

        if self.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            let mut table = Table::new();
            table.load_preset(UTF8_BORDERS_ONLY).set_header([
                "ENV",
                "DATABASE",
                "LAST BACKUP",
                "RPO",
                "OBJECTIVE",
                "STATUS",
                "NEXT RUN",
                "LAST DRILL",
            ]);
            for r in &rows {
                table.add_row(vec![
                    r.environment.clone(),
                    r.database.clone(),
                    match (&r.last_backup_id, r.changes_covered_until) {
                        (Some(id), Some(c)) => format!(
                            "{id}\n+ changes to {}",
                            c.to_zoned(tz.clone()).strftime("%Y-%m-%d %H:%M:%S")
                        ),
                        (Some(id), None) => id.clone(),
                        (None, _) => "-".into(),
                    },
                    r.rpo_seconds
                        .map(human_duration)
                        .unwrap_or_else(|| "-".into()),
                    r.rpo_objective_seconds
                        .map(human_duration)
                        .unwrap_or_else(|| "-".into()),
                    r.rpo_status.to_uppercase(),
                    r.next_runs.first().cloned().unwrap_or_else(|| "-".into()),
                    r.last_drill
                        .as_ref()
                        .map_or_else(|| "none yet".into(), LastDrill::describe),
                ]);
            }
            println!("{table}");
            for r in &rows {
                for c in &r.copies {
                    println!(
                        "copy {}: {} RPO {} ({}){}",
                        c.repository,
                        r.database,
                        c.rpo_seconds
                            .map(human_duration)
                            .unwrap_or_else(|| "-".into()),
                        c.rpo_status.to_uppercase(),
                        c.error
                            .as_deref()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// This environment's rows: every configured database and directory, even those without a
/// backup yet, with its copies and last drill. `dr status` and the agent's status page
/// show the same thing.
pub(crate) async fn gather(
    config: &Config,
    repo: &Repository,
    now: Timestamp,
) -> anyhow::Result<Vec<Row>> {
    let tz = config.agent.timezone.0.clone();
    let next_runs = |schedules: &[dr_core::config::ScheduleConfig]| {
        let mut next: Vec<jiff::Zoned> = schedules
            .iter()
            .flat_map(|s| s.cron.next_runs(&now.to_zoned(tz.clone()), 1))
            .collect();
        next.sort();
        next.iter()
            .map(|z| z.strftime("%Y-%m-%d %H:%M %Z").to_string())
            .collect::<Vec<_>>()
    };
    let mut rows = Vec::new();
    let listing = repo.list(None).await?;
    let newest = newest_by_database(&listing.backups);
    for db in &config.databases {
        let last = newest.get(db.name.as_str()).copied();
        let objective = db.rpo.as_ref().map(|d| d.seconds_at(now));
        let segments = match db.continuous {
            Some(_) => dr_continuous::pitr::list_segments(repo, db.name.as_str())
                .await
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let covered = segments.iter().map(|m| m.covered_until).max();
        let windows = dr_continuous::pitr::windows(db.name.as_str(), &listing.backups, &segments);
        let mut r = row(
            config.environment.as_str(),
            db.name.as_str(),
            last,
            covered,
            objective,
            now,
            next_runs(&db.schedules),
        );
        r.last_drill = last_drill(repo, db.name.as_str()).await;
        for copy in &config.copies {
            r.copies
                .push(copy_row(config, copy.name.as_str(), db.name.as_str(), objective, now).await);
        }
        r.restorable_windows = windows;
        rows.push(r);
    }
    for dir in &config.directories {
        let name = dir.name.as_str();
        let newest = dr_directories::list(repo, name)
            .await?
            .into_iter()
            .max_by_key(|m| m.started_at);
        let objective = dir.rpo.as_ref().map(|d| d.seconds_at(now));
        let rpo = newest
            .as_ref()
            .map(|m| now.as_second() - m.started_at.as_second());
        let mut r = Row {
            kind: "directory",
            environment: config.environment.to_string(),
            database: name.to_string(),
            last_backup_id: newest.as_ref().map(|m| m.id.clone()),
            last_backup_at: newest.as_ref().map(|m| m.started_at),
            changes_covered_until: None,
            restorable_windows: Vec::new(),
            rpo_seconds: rpo,
            rpo_objective_seconds: objective,
            rpo_status: rpo_status(rpo, objective),
            next_runs: next_runs(&dir.schedules),
            last_drill: last_drill(repo, name).await,
            copies: Vec::new(),
        };
        for copy in &config.copies {
            r.copies
                .push(copy_row(config, copy.name.as_str(), name, objective, now).await);
        }
        rows.push(r);
    }
    Ok(rows)
}

async fn copy_row(
    config: &dr_core::config::Config,
    name: &str,
    database: &str,
    objective: Option<i64>,
    now: Timestamp,
) -> CopyRow {
    let held = async {
        let repo = super::open_repository(config, Some(name)).await?;
        Ok::<_, anyhow::Error>(dr_copies::newest_of(&repo, database).await?)
    };
    match tokio::time::timeout(std::time::Duration::from_secs(30), held).await {
        Ok(Ok((id, newest))) => {
            let rpo = newest.map(|t| now.as_second() - t.as_second());
            CopyRow {
                repository: name.to_string(),
                last_backup_id: id,
                rpo_seconds: rpo,
                rpo_status: rpo_status(rpo, objective),
                error: None,
            }
        }
        Ok(Err(e)) => unreachable_copy(name, format!("{e:#}")),
        Err(_) => unreachable_copy(name, "no answer within 30 s".into()),
    }
}

fn unreachable_copy(name: &str, error: String) -> CopyRow {
    CopyRow {
        repository: name.to_string(),
        last_backup_id: None,
        rpo_seconds: None,
        rpo_status: "unreachable",
        error: Some(error),
    }
}

fn row(
    environment: &str,
    database: &str,
    last: Option<&Manifest>,
    covered: Option<Timestamp>,
    objective: Option<i64>,
    now: Timestamp,
    next_runs: Vec<String>,
) -> Row {
    let point = last.map(|m| covered.map_or(m.started_at, |c| c.max(m.started_at)));
    let rpo = point.map(|p| now.as_second() - p.as_second());
    Row {
        kind: "database",
        environment: environment.to_string(),
        database: database.to_string(),
        last_backup_id: last.map(|m| m.id.to_string()),
        last_backup_at: last.map(|m| m.started_at),
        changes_covered_until: covered,
        restorable_windows: Vec::new(),
        rpo_seconds: rpo,
        rpo_objective_seconds: objective,
        rpo_status: rpo_status(rpo, objective),
        next_runs,
        last_drill: None,
        copies: Vec::new(),
    }
}

async fn last_drill(repo: &Repository, database: &str) -> Option<LastDrill> {
    let reports = dr_drills::report::history(repo, Some(database))
        .await
        .ok()?;
    let r = reports.last()?;
    Some(LastDrill {
        id: r.id.clone(),
        at: r.finished_at,
        passed: r.passed,
        rto_seconds: r.rto_seconds,
        rto_objective_seconds: r.rto_objective_seconds,
        rto_breached: r.rto_breached,
    })
}

fn rpo_status(rpo: Option<i64>, objective: Option<i64>) -> &'static str {
    match (rpo, objective) {
        (None, _) => "no_backup",
        (Some(_), None) => "no_objective",
        (Some(r), Some(o)) if r <= o => "ok",
        _ => "breach",
    }
}

fn newest_by_database(backups: &[Manifest]) -> BTreeMap<&str, &Manifest> {
    let mut newest = BTreeMap::new();
    for m in backups {
        newest.insert(m.database.as_str(), m);
    }
    newest
}

/// Environments present in the repository: the first path segment of every manifest.
async fn environments(repo: &Repository) -> anyhow::Result<Vec<String>> {
    let mut envs: Vec<String> = repo
        .storage()
        .list("")
        .await?
        .into_iter()
        .filter(|o| o.key.ends_with("/manifest.json"))
        .filter_map(|o| o.key.split('/').next().map(str::to_string))
        .collect();
    envs.sort();
    envs.dedup();
    Ok(envs)
}

/// `3h 12m`, `2d 4h`, `45s`.
pub(crate) fn human_duration(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}
