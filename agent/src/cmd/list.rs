//! `dr list`: the backups in the repository, from manifests alone (no private key).

use std::path::Path;
use std::process::ExitCode;

use comfy_table::{presets::UTF8_BORDERS_ONLY, Cell, CellAlignment, Table};
use dr_core::manifest::{Manifest, ObjectRole};
use indicatif::HumanBytes;
use serde::Serialize;

/// List backups, oldest first. Reads only manifests: no private key is needed.
#[derive(clap::Args)]
pub struct Args {
    /// Read from this repository: `primary` ([storage], the default) or a `[[copies]]`
    /// name, e.g. when the primary's region is down.
    #[arg(long, value_name = "NAME")]
    repository: Option<String>,

    /// Only this database's backups.
    #[arg(long, short)]
    database: Option<String>,

    /// JSON for scripts: an array of backups with sizes, hashes and versions.
    #[arg(long)]
    json: bool,
}

/// One backup as `dr list --json` prints it.
#[derive(Serialize)]
struct Entry<'a> {
    id: &'a str,
    database: &'a str,
    environment: &'a str,
    classes: &'a [String],
    started_at: String,
    finished_at: String,
    /// The database dump's size before compression and encryption.
    raw_bytes: u64,
    /// The database dump's size as stored.
    stored_bytes: u64,
    /// sha256 of the stored database dump (a split backup's first data archive).
    sha256: &'a str,
    server_version: &'a str,
    objects: &'a [dr_core::manifest::ObjectEntry],
    #[serde(skip)]
    started_at_ts: jiff::Timestamp,
    #[serde(skip)]
    finished_at_ts: jiff::Timestamp,
}

impl<'a> From<&'a Manifest> for Entry<'a> {
    fn from(m: &'a Manifest) -> Self {
        let data = m.object(ObjectRole::Data);
        Entry {
            id: m.id.as_str(),
            database: &m.database,
            environment: &m.environment,
            classes: &m.classes,
            started_at: m.started_at.to_string(),
            finished_at: m.finished_at.to_string(),
            raw_bytes: m.database_bytes().0,
            stored_bytes: m.database_bytes().1,
            sha256: data.map_or("", |d| d.sha256.as_str()),
            server_version: &m.server_version,
            objects: &m.objects,
            started_at_ts: m.started_at,
            finished_at_ts: m.finished_at,
        }
    }
}

impl Args {
    pub async fn run(self, config_path: &Path) -> anyhow::Result<ExitCode> {
        let config = super::load_config(config_path)?;
        let repo = super::open_repository(&config, self.repository.as_deref()).await?;
        let listing = repo.list(self.database.as_deref()).await?;
        for problem in &listing.unreadable {
            tracing::warn!(error = %problem, "skipping an unreadable manifest");
        }
        let entries: Vec<Entry> = listing.backups.iter().map(Entry::from).collect();
        if self.json {
            println!("{}", serde_json::to_string_pretty(&entries)?);
            return Ok(ExitCode::SUCCESS);
        }
        if entries.is_empty() {
            eprintln!(
                "no backups of {} in {} (environment `{}`)",
                self.database
                    .as_deref()
                    .map_or("any database".to_string(), |d| format!("database `{d}`")),
                repo.storage().location(),
                repo.environment()
            );
            return Ok(ExitCode::SUCCESS);
        }
        let mut table = Table::new();
        table.load_preset(UTF8_BORDERS_ONLY).set_header([
            "ID",
            "DATABASE",
            "ENV",
            "CLASS",
            "STARTED (UTC)",
            "FINISHED",
            "RAW",
            "STORED",
            "SHA256",
            "SERVER",
        ]);
        for e in &entries {
            table.add_row(vec![
                Cell::new(e.id),
                Cell::new(e.database),
                Cell::new(e.environment),
                Cell::new(e.classes.join(",")),
                Cell::new(m_time(e.started_at_ts, "%Y-%m-%d %H:%M:%S")),
                Cell::new(m_time(e.finished_at_ts, "%H:%M:%S")),
                Cell::new(HumanBytes(e.raw_bytes)).set_alignment(CellAlignment::Right),
                Cell::new(HumanBytes(e.stored_bytes)).set_alignment(CellAlignment::Right),
                Cell::new(format!("{}…", &e.sha256[..e.sha256.len().min(12)])),
                Cell::new(e.server_version),
            ]);
        }
        println!("{table}");
        println!(
            "{} backup(s) in {}; restore with `dr restore --database NAME --backup ID`",
            entries.len(),
            repo.storage().location()
        );
        // Continuous capture: the spans any moment of which a restore can reach.
        for db in &config.databases {
            if db.continuous.is_none()
                || self
                    .database
                    .as_deref()
                    .is_some_and(|d| d != db.name.as_str())
            {
                continue;
            }
            let segments = dr_continuous::pitr::list_segments(&repo, db.name.as_str()).await?;
            let windows =
                dr_continuous::pitr::windows(db.name.as_str(), &listing.backups, &segments);
            if windows.is_empty() {
                println!(
                    "`{}`: no point-in-time window yet (it needs a backup taken since `dr continuous setup`, and stored changes after it)",
                    db.name
                );
            }
            for w in windows {
                println!(
                    "`{}`: any moment from {} to {} (restore with `dr restore --database {} --to-time TIME --target URL --create`)",
                    db.name,
                    m_time(w.from, "%Y-%m-%d %H:%M:%S"),
                    m_time(w.to, "%Y-%m-%d %H:%M:%S UTC"),
                    db.name
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

fn m_time(t: jiff::Timestamp, format: &str) -> String {
    t.strftime(format).to_string()
}
