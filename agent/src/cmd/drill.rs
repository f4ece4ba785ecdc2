//! `dr drill`: restore a backup into a scratch database, check it and time it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use dr_drills::report::DrillReport;

/// Run a restore drill now: restore the newest backup (or a random recent one) into a
/// scratch target, check it, measure the RTO and store a report in the repository.
///
/// The target is `[databases.drill] target`: "ephemeral" (a throwaway local cluster reachable
/// only through a Unix socket in a private directory, started with a cleared environment and
/// default durability unless `durability = "off"`, whose RTO is then flagged as not
/// representative; server binaries from DR_PG_BINDIR, else PATH and
/// /usr/lib/postgresql/*/bin) or a scratch server, where the drill creates
/// `dr_drill_<database>_<id>` and drops it again. A failure is stored in the report as a
/// category with exit codes and counts; details go to the log only.
/// Checks: pg_restore reported no errors, every table's row count equals the count recorded
/// in the backup's snapshot, and each configured check returns true. Exits non-zero when the
/// drill fails or its RTO exceeds the database's `rto`.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    /// Read from this repository: `primary` ([storage], the default) or a `[[copies]]`
    /// name, e.g. when the primary's region is down.
    #[arg(long, value_name = "NAME")]
    repository: Option<String>,

    #[command(subcommand)]
    history: Option<Sub>,

    /// Only this database (default: every database with a [databases.drill] section).
    #[arg(long, short)]
    database: Option<String>,

    /// Drill a `[[directories]]` tree instead: restore its newest backup into a temporary
    /// directory, check every entry against the backup's listing, time it.
    #[arg(long, value_name = "NAME", conflicts_with = "database")]
    directory: Option<String>,

    /// Identity file (default: [encryption] identity_file).
    #[arg(long, value_name = "FILE")]
    identity: Option<PathBuf>,

    /// Print the reports as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// List past drills with their RTO and outcome.
    History {
        #[arg(long, short)]
        database: Option<String>,
        #[arg(long)]
        json: bool,
        /// Draw the RTO trend against the objective into this SVG file.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
    },
}

impl Args {
    pub async fn run(self, config_path: &Path) -> anyhow::Result<ExitCode> {
        let config = super::load_config(config_path)?;
        let repo = super::open_repository(&config, self.repository.as_deref()).await?;
        if let Some(Sub::History {
            database,
            json,
            plot,
        }) = self.history
        {
            return history(&repo, database.as_deref(), json, plot.as_deref()).await;
        }
        if let Some(name) = &self.directory {
            return self.directory(&config, &repo, name).await;
        }
        let dbs: Vec<_> = config
            .databases_named(self.database.as_deref())
            .into_iter()
            .filter(|d| d.drill.is_some() || self.database.is_some())
            .collect();
        if dbs.is_empty() {
            anyhow::bail!(
                "no database to drill: add a [databases.drill] section to {}",
                config_path.display()
            );
        }
        let identity = self
            .identity
            .clone()
            .or_else(|| config.encryption.identity_file.clone())
            .ok_or(dr_restore::RestoreError::NoIdentity)?;
        let identities = Arc::new(
            dr_core::keys::Identities::from_file(&identity)
                .context("cannot load the identity to decrypt with")?,
        );
        let cancel = tokio_util::sync::CancellationToken::new();
        super::cancel_on_signal(
            cancel.clone(),
            "stopping the drill and removing its scratch target",
        );
        let mut reports = Vec::new();
        for db in dbs {
            let r =
                dr_drills::run::run(&repo, &config, db, identities.clone(), cancel.clone()).await?;
            if !self.json {
                print_report(&r);
            }
            reports.push(r);
        }
        if self.json {
            println!("{}", serde_json::to_string_pretty(&reports)?);
        }
        let ok = reports.iter().all(|r| r.passed && !r.rto_breached);
        Ok(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }
}

impl Args {
    /// A directory drill: restore into a temporary directory (verified against the listing
    /// by the restore itself), measure the RTO, store the report like a database drill's.
    async fn directory(
        &self,
        config: &dr_core::config::Config,
        repo: &dr_core::repo::Repository,
        name: &str,
    ) -> anyhow::Result<ExitCode> {
        if dr_directories::configured(config, name).is_none() {
            anyhow::bail!("no [[directories]] entry named `{name}` in the config");
        }
        let identity = self
            .identity
            .clone()
            .or_else(|| config.encryption.identity_file.clone())
            .ok_or(dr_restore::RestoreError::NoIdentity)?;
        let identities = Arc::new(
            dr_core::keys::Identities::from_file(&identity)
                .context("cannot load the identity to decrypt with")?,
        );
        let started_at = jiff::Timestamp::now();
        let began = std::time::Instant::now();
        let scratch = tempfile::Builder::new()
            .prefix(&format!("dr-drill-{name}-"))
            .tempdir()
            .context("cannot create the drill's temporary directory")?;
        let newest = dr_directories::list(repo, name).await?.pop();
        let result = dr_directories::restore(
            repo,
            name,
            None,
            &scratch.path().join("tree"),
            false,
            identities,
            scratch.path(),
        )
        .await;
        let seconds = began.elapsed().as_secs_f64();
        let (passed, detail, error) = match &result {
            Ok(r) => (
                true,
                format!(
                    "{} files, {} bytes, {} entries equal to the listing",
                    r.files, r.bytes, r.verified
                ),
                None,
            ),
            Err(e) => (false, e.to_string(), Some(e.to_string())),
        };
        let report = DrillReport {
            format: 1,
            id: dr_core::manifest::BackupId::new(started_at).to_string(),
            environment: repo.environment().to_string(),
            database: name.to_string(),
            backup_id: newest.as_ref().map(|m| m.id.clone()),
            backup_started_at: newest.as_ref().map(|m| m.started_at),
            target: "directory".into(),
            started_at,
            finished_at: jiff::Timestamp::now(),
            passed,
            rto_seconds: seconds,
            rto_objective_seconds: None,
            rto_breached: false,
            rto_representative: true,
            stages: dr_drills::report::Stages {
                restore: seconds,
                ..Default::default()
            },
            checks: vec![dr_drills::report::Check {
                name: "tree equals the listing".into(),
                passed,
                detail,
            }],
            error,
            recovery_point: None,
            achieved_rpo_seconds: None,
        };
        dr_drills::report::store(repo, &report).await?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&[&report])?);
        } else {
            print_report(&report);
        }
        Ok(if passed {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }
}

pub fn print_report(r: &DrillReport) {
    let verdict = match (r.passed, r.rto_breached) {
        (true, false) => "PASSED",
        (true, true) => "PASSED, RTO BREACHED",
        _ => "FAILED",
    };
    let objective = r
        .rto_objective_seconds
        .map(|o| format!(" (objective {o:.0} s)"))
        .unwrap_or_default();
    println!(
        "drill {} of `{}`: {verdict}; RTO {:.1} s{objective}; backup {}",
        r.id,
        r.database,
        r.rto_seconds,
        r.backup_id.as_deref().unwrap_or("-")
    );
    if !r.rto_representative {
        println!(
            "  note: RTO not representative: the ephemeral cluster ran with durability = \"off\" (no fsync, full_page_writes or synchronous_commit); a restore into a real server takes longer"
        );
    }
    if let (Some(point), Some(rpo)) = (r.recovery_point, r.achieved_rpo_seconds) {
        println!("  recovery point {point}: achieved RPO {rpo:.1} s (continuous capture)");
    }
    let s = &r.stages;
    println!(
        "  stages: prepare {:.1} s, fetch {:.1} s, decrypt+decompress {:.1} s, restore {:.1} s, replay {:.1} s, checks {:.1} s",
        s.prepare, s.fetch, s.decrypt_decompress, s.restore, s.replay, s.checks
    );
    if let Some(x) = &s.restore_sections {
        println!(
            "  restore of the split backup: pre-data {:.1} s, {} data archives side by side {:.1} s, post-data {:.1} s",
            x.pre_data, x.data_archives, x.data, x.post_data
        );
    }
    for c in &r.checks {
        println!(
            "  {} {}: {}",
            if c.passed { "ok  " } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    if let Some(e) = &r.error {
        println!("  error: {e}");
    }
}

async fn history(
    repo: &dr_core::repo::Repository,
    database: Option<&str>,
    json: bool,
    plot: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let reports = dr_drills::report::history(repo, database).await?;
    if let Some(path) = plot {
        let title = format!(
            "RTO of restore drills: {} / {}",
            repo.environment(),
            database.unwrap_or("all databases")
        );
        std::fs::write(path, dr_drills::report::plot_svg(&reports, &title))
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("plot written to {}", path.display());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
        return Ok(ExitCode::SUCCESS);
    }
    if reports.is_empty() {
        eprintln!("no drills yet in {}", repo.storage().location());
    }
    for r in &reports {
        println!(
            "{}  {:<12} {:<6} RTO {:>7.1} s{}  backup {}",
            r.id,
            r.database,
            if r.passed { "passed" } else { "FAILED" },
            r.rto_seconds,
            if r.rto_breached { " BREACH" } else { "" },
            r.backup_id.as_deref().unwrap_or("-")
        );
    }
    Ok(ExitCode::SUCCESS)
}
