//! `dr copy`: catch the `[[copies]]` repositories up with the primary now.

use std::path::Path;
use std::process::ExitCode;

/// Copy every committed backup (databases and directories) and change segment the primary
/// holds and a copy lacks, byte for byte (no key needed), manifest last, checking each
/// object's size and sha256 against the primary's manifest.
///
/// Backups the copy's own `[copies.keep]` would delete at once are left out (counted as
/// older than its keep), or every pass would copy them and prune them again.
///
/// The agent does this by itself after each backup and every `interval_seconds`; run it by
/// hand after an outage of a copy, or to fill a new one. Exits 1 if anything could not be
/// copied (it is tried again next time; nothing copied is lost).
///
///   dr copy                      # every copy
///   dr copy --to eu-west --json  # one copy, a report for scripts
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Only this copy (a `[[copies]]` name; default: all of them).
    #[arg(long)]
    to: Option<String>,

    /// Only this database (default: every configured database and directory).
    #[arg(long, short, conflicts_with = "directory")]
    database: Option<String>,

    /// Only this `[[directories]]` tree.
    #[arg(long, value_name = "NAME")]
    directory: Option<String>,

    /// JSON for scripts: per copy, what was copied and what failed.
    #[arg(long)]
    json: bool,
}

impl Args {
    pub async fn run(self, config_path: &Path) -> anyhow::Result<ExitCode> {
        let config = super::load_config(config_path)?;
        if config.copies.is_empty() {
            anyhow::bail!(
                "the config has no [[copies]]: add one (see `dr config check` and the README's \"Copies\") to copy backups to another repository"
            );
        }
        let copies: Vec<_> = config
            .copies
            .iter()
            .filter(|c| self.to.as_deref().is_none_or(|t| t == c.name.as_str()))
            .collect();
        if copies.is_empty() {
            let names: Vec<&str> = config.copies.iter().map(|c| c.name.as_str()).collect();
            anyhow::bail!(
                "no copy named `{}`: the config has {}",
                self.to.as_deref().unwrap_or_default(),
                names.join(", ")
            );
        }
        // Directory backups share the layout: they are copied the same way.
        let dbs = config.databases.iter().map(|d| d.name.as_str());
        let dirs = config.directories.iter().map(|d| d.name.as_str());
        let databases: Vec<String> = match (&self.database, &self.directory) {
            (Some(name), _) => {
                if config.database(name).is_none() {
                    anyhow::bail!(
                        "no configured database is named `{name}`; configured: {}",
                        super::names(dbs)
                    );
                }
                vec![name.clone()]
            }
            (None, Some(name)) => {
                if dr_directories::configured(&config, name).is_none() {
                    anyhow::bail!(
                        "no `[[directories]]` entry is named `{name}`; configured: {}",
                        super::names(dirs)
                    );
                }
                vec![name.clone()]
            }
            (None, None) => dbs.chain(dirs).map(str::to_string).collect(),
        };
        if databases.is_empty() {
            anyhow::bail!("the config has no databases and no directories to copy");
        }
        let src = super::open_repo(&config).await?;
        let mut reports = Vec::new();
        let mut failed = false;
        for copy in copies {
            let name = copy.name.as_str();
            let result = async {
                let dst = super::open_repository(&config, Some(name)).await?;
                let beyond = crate::daemon::copies::beyond_keep(
                    &config,
                    copy,
                    &src,
                    &databases,
                    jiff::Timestamp::now(),
                )
                .await;
                Ok::<_, anyhow::Error>(
                    dr_copies::copy_missing(&src, &dst, name, &databases, &beyond).await?,
                )
            }
            .await;
            match result {
                Ok(r) => {
                    failed |= !r.errors.is_empty();
                    if !self.json {
                        for unit in &r.copied {
                            println!("copied  {unit}  -> {name}");
                        }
                        println!(
                            "{name}: {} copied ({}), {} already there, {} older than its keep (not copied), {} failed",
                            r.copied.len(),
                            indicatif::HumanBytes(r.bytes),
                            r.present,
                            r.beyond_keep.len(),
                            r.errors.len()
                        );
                        for e in &r.errors {
                            eprintln!("error: {e}");
                        }
                    }
                    reports.push(r);
                }
                Err(e) => {
                    failed = true;
                    crate::print_error(&e.context(format!("copy `{name}` failed; nothing of it was lost, run `dr copy --to {name}` again")));
                }
            }
        }
        if self.json {
            println!("{}", serde_json::to_string_pretty(&reports)?);
        }
        Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    }
}
