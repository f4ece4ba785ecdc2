//! `dr backup`: one backup now, of one database or all of them.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use dr_core::config::Name;
use dr_core::pipeline::Control;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

use crate::daemon::job::{self, Outcome};
use crate::daemon::lock::{self, Acquired};

/// Back up databases now: pg_dump streamed through zstd and age to the repository.
///
/// Prints each new backup's id on stdout. Without --database every configured database is
/// backed up; one failing does not stop the others, but the exit code is then non-zero.
/// Each backup holds the database's repository lock, like the agent's jobs: while another
/// process (the agent, another `dr backup`, `dr prune`) holds it, that database is refused
/// with the holder's host, pid and lease expiry. A backup running past [agent] job_timeout
/// is cancelled. Ctrl-C or SIGTERM stops cleanly: pg_dump is stopped, the upload aborted,
/// nothing recorded.
#[derive(clap::Args)]
pub struct Args {
    /// Database to back up, as named in the config (default: all).
    #[arg(long, short)]
    database: Option<String>,

    /// Back up this `[[directories]]` tree instead of databases.
    #[arg(long, value_name = "NAME", conflicts_with = "database")]
    directory: Option<String>,

    /// Class recorded in the manifest; retention keeps the backup per that class's `keep`.
    #[arg(long, default_value = "manual")]
    class: Name,

    /// Print each committed manifest as JSON instead of the id.
    #[arg(long)]
    json: bool,
}

/// Exit code after a signal stopped the work, as shells report SIGINT.
const EXIT_CANCELLED: u8 = 130;

impl Args {
    pub async fn run(self, config_path: &Path) -> anyhow::Result<ExitCode> {
        let config = super::load_config(config_path)?;
        if let Some(name) = &self.directory {
            return self.directory(&config, name).await;
        }
        let databases: Vec<_> = match &self.database {
            Some(name) => vec![config.database(name).with_context(|| {
                format!(
                    "database `{name}` is not in {} (configured: {})",
                    config_path.display(),
                    super::names(config.databases.iter().map(|d| d.name.as_str()))
                )
            })?],
            None if config.databases.is_empty() => {
                anyhow::bail!("{} configures no [[databases]]", config_path.display())
            }
            None => config.databases.iter().collect(),
        };
        let repo = super::open_repo(&config).await?;
        let control = Control::default();
        super::cancel_on_signal(
            control.cancel.clone(),
            "stopping; the backup in progress will not be recorded",
        );

        let owner = lock::new_owner();
        let mut failed = 0;
        for db in databases {
            if control.cancel.is_cancelled() {
                break;
            }
            let scheduled = db.classes().any(|c| c == self.class.as_str());
            if !scheduled && self.class.as_str() != "manual" {
                tracing::warn!(
                    database = %db.name, class = %self.class,
                    "no schedule of this class is configured; retention keeps such backups only while they are the newest"
                );
            }
            let guard = match lock::acquire(&repo, db.name.as_str(), &owner, "backup").await {
                Ok(Acquired::Yes(g)) => g,
                Ok(Acquired::HeldBy(holder)) => {
                    failed += 1;
                    crate::print_error(&anyhow::anyhow!(
                        "database `{}` is locked by {holder}; not backing it up now (run it again once that finishes; a crashed holder's lease expires by itself)",
                        db.name
                    ));
                    continue;
                }
                Err(e) => {
                    failed += 1;
                    crate::print_error(&anyhow::Error::new(e).context(format!(
                        "cannot take the lock of database `{}`; no backup was made",
                        db.name
                    )));
                    continue;
                }
            };
            let control = Control {
                cancel: control.cancel.clone(),
                progress: Default::default(),
            };
            let bar = progress_bar(db.name.as_str(), &control);
            let outcome = job::backup_with_control(
                &repo,
                &config,
                db,
                vec![self.class.to_string()],
                &control,
            )
            .await;
            bar.finish_and_clear();
            guard.release().await;
            match outcome {
                Outcome::Done(m) if self.json => {
                    println!("{}", String::from_utf8_lossy(&m.to_json()).trim_end())
                }
                Outcome::Done(m) => println!("{}", m.id),
                Outcome::Failed(e) => {
                    failed += 1;
                    let mut e = anyhow::Error::new(e);
                    if let Some(hint) = job::lock_wait_hint(&format!("{e:#}"), &config, db) {
                        e = e.context(hint);
                    }
                    crate::print_error(&e.context(format!(
                        "backup of database `{}` failed; no backup was recorded",
                        db.name
                    )));
                }
                other => {
                    failed += 1;
                    let why = other.problem(&config, db).unwrap_or_default();
                    crate::print_error(&anyhow::anyhow!(
                        "backup of database `{}` did not complete: {why}; no backup was recorded",
                        db.name
                    ));
                }
            }
        }
        Ok(if control.cancel.is_cancelled() {
            ExitCode::from(EXIT_CANCELLED)
        } else if failed > 0 {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    }
}

impl Args {
    /// `--directory NAME`: the tree as a tar with its listing, under the name's lock.
    async fn directory(
        &self,
        config: &dr_core::config::Config,
        name: &str,
    ) -> anyhow::Result<ExitCode> {
        let dir = dr_directories::configured(config, name)
            .with_context(|| format!("no [[directories]] entry named `{name}` in the config"))?;
        let recipients = config.recipients()?;
        if recipients.is_empty() {
            anyhow::bail!("[encryption] has no recipients: nothing can be encrypted");
        }
        let repo = super::open_repo(config).await?;
        let control = Control::default();
        super::cancel_on_signal(
            control.cancel.clone(),
            "stopping; the backup in progress will not be recorded",
        );
        let owner = lock::new_owner();
        let guard = match lock::acquire(&repo, name, &owner, "backup").await? {
            Acquired::Yes(g) => g,
            Acquired::HeldBy(holder) => {
                anyhow::bail!("directory `{name}` is locked by {holder}; not backing it up now")
            }
        };
        let encode = dr_core::pipeline::encode::EncodeOptions {
            level: config.compression.level,
            threads: config.compression.threads,
        };
        let bar = progress_bar(name, &control);
        let result = dr_directories::backup(
            &repo,
            dir,
            &recipients,
            encode,
            vec![self.class.to_string()],
            &control,
        )
        .await;
        bar.finish_and_clear();
        guard.release().await;
        let m = result.with_context(|| {
            format!("backup of directory `{name}` failed; no backup was recorded")
        })?;
        if m.changed_files > 0 {
            eprintln!(
                "warning: {} file(s) changed while they were read and are stored as read: {}",
                m.changed_files,
                m.changed.join(", ")
            );
        }
        if m.skipped_files > 0 {
            eprintln!(
                "warning: {} file(s) skipped (unreadable or not regular files): {}",
                m.skipped_files,
                m.skipped.join(", ")
            );
        }
        if self.json {
            println!("{}", serde_json::to_string_pretty(&m)?);
        } else {
            println!("{}", m.id);
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// A live line on a terminal (hidden otherwise): bytes dumped, stored and the rate.
fn progress_bar(database: &str, control: &Control) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix}: {msg} ({elapsed})")
            .expect("valid template"),
    );
    bar.set_prefix(database.to_string());
    let progress = control.progress.clone();
    let ticker = bar.clone();
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        while !ticker.is_finished() {
            let raw = progress.raw();
            let rate = raw as f64 / started.elapsed().as_secs_f64().max(0.001);
            ticker.set_message(format!(
                "{} dumped, {} stored, {}/s",
                HumanBytes(raw),
                HumanBytes(progress.stored()),
                HumanBytes(rate as u64)
            ));
            ticker.tick();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    bar
}
