//! `dr backup`: one backup now, of one database or all of them.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use dr_core::config::Name;

/// Back up databases now: pg_dump streamed through zstd and age to the repository.
///
/// Prints each new backup's id on stdout. Without --database every configured database is
/// backed up; one failing does not stop the others, but the exit code is then non-zero.
#[derive(clap::Args)]
pub struct Args {
    /// Database to back up, as named in the config (default: all).
    #[arg(long, short)]
    database: Option<String>,

    /// Class recorded in the manifest; retention keeps the backup per that class's `keep`.
    #[arg(long, default_value = "manual")]
    class: Name,

    /// Print each committed manifest as JSON instead of the id.
    #[arg(long)]
    json: bool,
}

impl Args {
    pub async fn run(self, config_path: &Path) -> anyhow::Result<ExitCode> {
        let config = super::load_config(config_path)?;
        let databases: Vec<_> = match &self.database {
            Some(name) => vec![config.database(name).with_context(|| {
                format!(
                    "database `{name}` is not in {} (configured: {})",
                    config_path.display(),
                    names(&config)
                )
            })?],
            None if config.databases.is_empty() => {
                anyhow::bail!("{} configures no [[databases]]", config_path.display())
            }
            None => config.databases.iter().collect(),
        };
        let repo = super::open_repo(&config).await?;
        let mut failed = 0;
        for db in databases {
            let scheduled = db.classes().any(|c| c == self.class.as_str());
            if !scheduled && self.class.as_str() != "manual" {
                tracing::warn!(
                    database = %db.name, class = %self.class,
                    "no schedule of this class is configured; retention keeps such backups only while they are the newest"
                );
            }
            match dr_core::backup::run(&repo, &config, db, vec![self.class.to_string()]).await {
                Ok(m) if self.json => println!("{}", String::from_utf8_lossy(&m.to_json()).trim_end()),
                Ok(m) => println!("{}", m.id),
                Err(e) => {
                    failed += 1;
                    let e = anyhow::Error::new(e)
                        .context(format!("backup of database `{}` failed; no backup was recorded", db.name));
                    crate::print_error(&e);
                }
            }
        }
        Ok(if failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }
}

fn names(config: &dr_core::config::Config) -> String {
    let v: Vec<&str> = config.databases.iter().map(|d| d.name.as_str()).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}
