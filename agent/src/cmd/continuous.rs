//! `dr continuous setup | teardown`: prepare a database's source for continuous capture, or
//! remove what setup created.

use std::path::Path;
use std::process::ExitCode;

use dr_continuous::setup::SetupReport;
use dr_core::config::{Config, DatabaseConfig};
use dr_core::pg::Connection;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Check the prerequisites, then create the publication and logical replication slot.
    ///
    /// Checks wal_level (on RDS: rds.logical_replication), the REPLICATION privilege (on RDS:
    /// rds_replication), the right to create a FOR ALL TABLES publication and a free
    /// replication slot, and says exactly what to change for each that is missing.
    ///
    /// It never makes the source's writes fail: a published table without a primary key or
    /// replica identity would reject every UPDATE and DELETE, so setup lists such tables and
    /// refuses until each has a primary key or is listed in [databases.continuous]
    /// replica_identity_full (dr then sets REPLICA IDENTITY FULL on it, in the same
    /// transaction as the publication). Nothing is changed unless everything is ready.
    /// Exits 1 when something is missing. Running it again on a set-up database is a no-op.
    Setup(Args),
    /// Drop the replication slot (the source stops retaining WAL for dr) and the publication.
    ///
    /// Refuses while a session reads the slot; stop the agent first. Replica identities that
    /// setup changed stay as they are.
    Teardown(Args),
}

#[derive(clap::Args)]
pub struct Args {
    /// The database, as named in the config; it needs a [databases.continuous] section.
    #[arg(long, short = 'd')]
    database: String,

    /// Only report what would be done.
    #[arg(long)]
    dry_run: bool,

    /// JSON for scripts.
    #[arg(long)]
    json: bool,
}

impl Args {
    fn database<'a>(&self, config: &'a Config) -> anyhow::Result<(&'a DatabaseConfig, Connection)> {
        let db = config.database(&self.database).ok_or_else(|| {
            anyhow::anyhow!(
                "database `{}` is not in the config (configured: {})",
                self.database,
                config
                    .databases
                    .iter()
                    .map(|d| d.name.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        if db.continuous.is_none() {
            anyhow::bail!(
                "database `{}` has no [databases.continuous] section; add one (an empty section takes the defaults) and run this again",
                db.name
            );
        }
        let conn = Connection::new(&db.url, db.password_file.as_deref())?;
        Ok((db, conn))
    }
}

impl Command {
    pub async fn run(self, config_path: &Path) -> anyhow::Result<ExitCode> {
        let config = super::load_config(config_path)?;
        match self {
            Command::Setup(args) => {
                let (db, conn) = args.database(&config)?;
                let report = dr_continuous::setup(db, &conn, args.dry_run).await?;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print_setup(&report);
                }
                match report.refusal() {
                    None => Ok(ExitCode::SUCCESS),
                    Some(why) if args.json => {
                        eprintln!("continuous setup of `{}` refused: {why}", report.database);
                        Ok(ExitCode::FAILURE)
                    }
                    Some(why) => {
                        eprintln!(
                            "error: continuous setup of `{}` refused: {why}; nothing was changed",
                            report.database
                        );
                        Ok(ExitCode::FAILURE)
                    }
                }
            }
            Command::Teardown(args) => {
                let (db, conn) = args.database(&config)?;
                let report = dr_continuous::teardown(db, &conn, args.dry_run).await?;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                    return Ok(ExitCode::SUCCESS);
                }
                if report.actions.is_empty() {
                    println!(
                        "`{}`: no slot {} and no publication {}: nothing to tear down",
                        report.database, report.slot, report.publication
                    );
                }
                let verb = if report.dry_run { "would" } else { "did" };
                for action in &report.actions {
                    println!("{verb}: {action}");
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

fn print_setup(r: &SetupReport) {
    println!(
        "Continuous capture of `{}` (PostgreSQL {}, {}): slot {}, publication {}",
        r.database,
        r.server_version,
        match r.platform {
            dr_continuous::setup::Platform::Rds => "Amazon RDS",
            dr_continuous::setup::Platform::SelfHosted => "self-hosted or other managed",
        },
        r.slot,
        r.publication
    );
    for c in &r.checks {
        println!("  {:<8} {}", if c.ok { "ok" } else { "MISSING" }, c.found);
        if let Some(fix) = &c.fix {
            println!("           fix: {fix}");
        }
    }
    if !r.tables_without_identity.is_empty() {
        println!(
            "\nOnce published, UPDATE and DELETE would fail on these tables (no primary key, no replica identity):"
        );
        for t in &r.tables_without_identity {
            println!("  {t}");
        }
        println!(
            "Give each a primary key (best), or list it in [databases.continuous] replica_identity_full,\n\
             exactly as written above, for dr to set REPLICA IDENTITY FULL (every UPDATE and DELETE\n\
             then logs the whole old row: more WAL)."
        );
    }
    for t in &r.replica_identity_full_unused {
        println!(
            "  note: replica_identity_full lists {t}, which is not a table lacking an identity (a typo, or it has a primary key now)"
        );
    }
    if r.actions.is_empty() {
        return;
    }
    let verb = if !r.ready {
        "\nOnce ready, setup will"
    } else if r.dry_run {
        "\nSetup would"
    } else {
        "\nDone"
    };
    println!("{verb}:");
    for a in &r.actions {
        println!("  {a}");
    }
}
