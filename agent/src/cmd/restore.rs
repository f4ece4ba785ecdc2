//! `dr restore`: the incident responder's command. Obvious, loud about what it does,
//! refuses to aim at the wrong database by accident, and as fast as the hardware allows.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dr_core::pg::{ConnUrl, Connection};
use dr_restore::run::{Confirm, Destination, Phase, Request, Watch};
use dr_restore::select::{parse_time, Selector};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

/// Restore a backup into a database, or write its pg_dump archive to a file.
///
/// Picks the latest backup unless told otherwise, verifies it as it streams (sha256 of the
/// stored bytes, age authentication, zstd checksum) and refuses to write into a database
/// that already holds tables unless --force is given and confirmed.
///
/// With --jobs above 1 the archive is fetched, verified and decoded into a staging file
/// first, then restored with `pg_restore -j N`, so a corrupted backup never touches the
/// target. With --jobs 1 it streams straight into pg_restore, only into a database it
/// creates (--create), which it drops again if anything fails.
///
/// A split backup (`dump_jobs` > 1 in the config) restores into a database it creates by
/// streaming every data archive from storage into its own pg_restore at once, between the
/// schema's pre-data and its post-data (`pg_restore -j N`); into an existing database every
/// archive is verified to local files first.
///
/// With continuous capture, --to-time rebuilds the database as of any moment the change
/// segments cover: the newest backup whose snapshot is before it, restored as above, then
/// every later transaction committed up to that moment, in commit order, then the
/// sequences. It checks the time is reachable before touching the target.
///
/// Examples:
///   dr restore --database app --target postgres://admin@db:5432/app_restored --create
///   dr restore --database app --to-time "10 min ago" --target URL --create
///   dr restore --database app --to-time latest --target URL --create --json
///   dr restore --database app --before "2h ago" --output app.dump
///   dr restore --database app --backup 20261122T030000Z-3f9a --target URL --dry-run
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Read from this repository: `primary` ([storage], the default) or a `[[copies]]`
    /// name, e.g. when the primary's region is down.
    #[arg(long, value_name = "NAME")]
    repository: Option<String>,

    /// The database whose backup to restore, as named in the config.
    #[arg(long, short, default_value = "", hide_default_value = true)]
    database: String,

    /// Restore a `[[directories]]` backup instead, into the empty (or new) directory
    /// --output DIR; the tree is then checked file by file against the backup's listing.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["database", "target", "to_time", "before"], requires = "output")]
    directory: Option<String>,

    /// Restore this backup (see `dr list`).
    #[arg(long, group = "which")]
    backup: Option<String>,

    /// Restore the newest backup (the default).
    #[arg(long, group = "which")]
    latest: bool,

    /// The newest backup taken at or before TIME: RFC 3339 or relative like "2h ago".
    #[arg(long, group = "which", value_name = "TIME")]
    before: Option<String>,

    /// Point in time (continuous capture): RFC 3339, relative like "10 min ago", or
    /// `latest` (the newest stored change).
    #[arg(long, group = "which", value_name = "TIME", requires = "target")]
    to_time: Option<String>,

    /// Restore into this database: postgres://user@host:port/dbname. A URL holding a
    /// password is refused: give it through PGPASSWORD, a passfile (~/.pgpass, PGPASSFILE)
    /// or --target-password-file, never on the command line.
    #[arg(long, group = "dest", value_name = "URL")]
    target: Option<String>,

    /// Write the decrypted, decompressed pg_dump archive here instead. A split backup
    /// (`dump_jobs` > 1) is several archives: they go into the new directory FILE
    /// (schema.dump, data.dump, data-2.dump, ...; see README, break-glass restore).
    #[arg(long, short, group = "dest", value_name = "FILE")]
    output: Option<PathBuf>,

    /// Create the target database when it does not exist.
    #[arg(long, requires = "target")]
    create: bool,

    /// Allow restoring into a database that already holds tables (replaces its objects),
    /// or, with --directory, into a non-empty directory (files of the backup overwrite).
    #[arg(long)]
    force: bool,

    /// Do not ask for confirmation of --force.
    #[arg(long, short = 'y')]
    yes: bool,

    /// Also create the backup's roles first (existing roles are left unchanged).
    #[arg(long, requires = "target")]
    globals: bool,

    /// Do not restore object ownership (for a server without the original roles).
    #[arg(long, requires = "target")]
    no_owner: bool,

    /// Do not restore privileges (GRANT/REVOKE), for a server without the original roles.
    #[arg(long, requires = "target")]
    no_acl: bool,

    /// Parallel pg_restore jobs (default: number of cores). 1 streams without staging.
    #[arg(long, short)]
    jobs: Option<usize>,

    /// Where the staged archive goes (default: $TMPDIR or /var/tmp). Needs the archive's
    /// raw size free; the file is removed afterwards, also on failure and Ctrl-C.
    #[arg(long, value_name = "DIR")]
    staging_dir: Option<PathBuf>,

    /// Identity file to decrypt with (default: [encryption] identity_file).
    #[arg(long, value_name = "FILE")]
    identity: Option<PathBuf>,

    /// File holding the target server's password.
    #[arg(long, value_name = "FILE")]
    target_password_file: Option<PathBuf>,

    /// Say what would be restored where and check the key can decrypt it; change nothing.
    #[arg(long)]
    dry_run: bool,

    /// Print a JSON summary: backup, target, stage durations, bytes.
    #[arg(long)]
    json: bool,
}

struct Prompt {
    yes: bool,
}

impl Confirm for Prompt {
    fn replace_non_empty(&self, database: &str, relations: u64) -> bool {
        if self.yes {
            return true;
        }
        eprint!(
            "\nDatabase `{database}` holds {relations} relations. Restoring with --force REPLACES its objects.\nType the database name to continue: "
        );
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        line.trim() == database
    }
}

impl Args {
    pub async fn run(self, config_path: &Path) -> anyhow::Result<ExitCode> {
        let config = super::load_config(config_path)?;
        if let Some(name) = &self.directory {
            return self.directory(&config, name).await;
        }
        if self.database.is_empty() {
            anyhow::bail!("say what to restore: --database NAME (or --directory NAME)");
        }
        if self.force && self.target.is_none() {
            anyhow::bail!(
                "--force applies to --target (a database that holds tables) or --directory"
            );
        }
        if self.force && !self.yes && !self.dry_run && !std::io::stdin().is_terminal() {
            anyhow::bail!("--force needs a terminal to confirm on, or --yes");
        }
        let selector = match (&self.backup, &self.before) {
            (Some(id), _) => Selector::Id(id.clone()),
            (_, Some(t)) => Selector::Before(parse_time(t, jiff::Timestamp::now())?),
            _ => Selector::Latest,
        };
        let destination = match (&self.target, &self.output) {
            (Some(url), _) => {
                // Checked before parsing, and the URL is not echoed: the password is already
                // in this process's argv and the shell's history, and must go no further.
                if dr_core::redact::has_password(url) {
                    anyhow::bail!(
                        "--target carries a password, which puts it in the process list and your shell history; \
                         remove it from the URL and give it through PGPASSWORD, a passfile (~/.pgpass, or PGPASSFILE) \
                         or --target-password-file FILE"
                    );
                }
                let url = ConnUrl::try_from(url.clone()).map_err(anyhow::Error::msg)?;
                Destination::Database {
                    conn: Connection::new(&url, self.target_password_file.as_deref())?,
                    create: self.create,
                    force: self.force,
                    globals: self.globals,
                    no_owner: self.no_owner,
                    no_acl: self.no_acl,
                }
            }
            (None, Some(path)) => Destination::File(path.clone()),
            (None, None) => anyhow::bail!("say where to restore: --target URL or --output FILE"),
        };
        let identity_path = self
            .identity
            .clone()
            .or_else(|| config.encryption.identity_file.clone())
            .ok_or(dr_restore::RestoreError::NoIdentity)?;
        let identities = Arc::new(
            dr_core::keys::Identities::from_file(&identity_path)
                .with_context(|| "cannot load the identity to decrypt with")?,
        );
        let jobs = self
            .jobs
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
            .max(1);
        let staging_dir = self
            .staging_dir
            .clone()
            .or_else(|| std::env::var_os("TMPDIR").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/var/tmp"));
        let request = Request {
            database: self.database.clone(),
            selector,
            destination,
            identities,
            jobs,
            staging_dir,
        };
        let repo = match super::open_repository(&config, self.repository.as_deref()).await {
            Ok(repo) => repo,
            Err(e) if self.repository.is_none() => {
                return Err(copies_instead(&config, &self.database, e).await)
            }
            Err(e) => return Err(e),
        };
        if self.repository.is_none() && !config.copies.is_empty() {
            let probe = repo
                .storage()
                .list(&format!(
                    "{}/{}/backups/",
                    repo.environment(),
                    self.database
                ))
                .await;
            if let Err(e) = probe {
                return Err(copies_instead(&config, &self.database, e.into()).await);
            }
        }

        if let Some(to) = &self.to_time {
            return self.point_in_time(&repo, request, to).await;
        }
        if self.dry_run {
            let plan = dr_restore::run::dry_run(&repo, &request).await?;
            if self.json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                println!(
                    "backup {} of `{}`, taken {} ({}), {} stored / {} raw",
                    plan.backup_id,
                    plan.database,
                    plan.backup_started_at,
                    plan.classes.join(","),
                    HumanBytes(plan.stored_bytes),
                    HumanBytes(plan.raw_bytes)
                );
                println!("identity: can decrypt it");
                println!("{}: {}", plan.destination, plan.plan);
                println!("dry run: nothing was changed");
            }
            return Ok(ExitCode::SUCCESS);
        }

        let manifest = dr_restore::run::choose(&repo, &request).await?;
        let to = match (&self.target, &self.output) {
            (Some(_), _) => match &request.destination {
                Destination::Database { conn, .. } => conn.url.to_string(),
                Destination::File(_) => unreachable!(),
            },
            _ => self
                .output
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        };
        eprintln!(
            "RESTORE backup {} of database `{}` (taken {}) -> {} [jobs {}]",
            manifest.id, manifest.database, manifest.started_at, to, jobs
        );

        let watch = Arc::new(Watch::default());
        super::cancel_on_signal(
            watch.pipeline.cancel.clone(),
            "stopping the restore and cleaning up",
        );
        let bar = progress(watch.clone());
        let result =
            dr_restore::run::restore(&repo, request, watch.clone(), &Prompt { yes: self.yes })
                .await;
        bar.finish_and_clear();
        match result {
            Ok(summary) => {
                if self.json {
                    println!("{}", serde_json::to_string_pretty(&summary)?);
                } else {
                    let s = &summary.seconds;
                    println!(
                        "restored backup {} into {} in {:.1} s (fetch {:.1} s, decrypt+decompress {:.1} s, pg_restore {:.1} s; {} mode)",
                        summary.backup_id, summary.destination, s.total, s.fetch,
                        s.decrypt_decompress, s.pg_restore, summary.mode
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(e) if e.is_cancelled() => {
                eprintln!("restore stopped by a signal; staging files were removed");
                Ok(ExitCode::from(130))
            }
            Err(e) => Err(anyhow::Error::new(e).context("restore failed")),
        }
    }
}

impl Args {
    /// `--to-time`: plan (failing before the target is touched), restore the base through the
    /// verified path, then replay the changes.
    async fn point_in_time(
        &self,
        repo: &dr_core::repo::Repository,
        mut request: Request,
        to: &str,
    ) -> anyhow::Result<ExitCode> {
        use dr_continuous::pitr::{self, ToTime};
        let to = if to.eq_ignore_ascii_case("latest") {
            ToTime::Latest
        } else {
            ToTime::At(parse_time(to, jiff::Timestamp::now())?)
        };
        let listing = repo.list(Some(&self.database)).await?;
        let segments = pitr::list_segments(repo, &self.database).await?;
        let plan = pitr::plan(&self.database, &listing.backups, segments, to)?;
        let Destination::Database { conn, .. } = &request.destination else {
            anyhow::bail!("--to-time restores into a database: give --target URL");
        };
        let conn = conn.clone();
        eprintln!(
            "POINT-IN-TIME RESTORE of `{}` to {} -> {}: base backup {} (snapshot {}), then {} change segment(s)",
            self.database,
            plan.to,
            conn.url,
            plan.base_id,
            plan.base_snapshot_at,
            plan.segments.len()
        );
        request.selector = Selector::Id(plan.base_id.clone());
        if self.dry_run {
            // The same checks as a plain dry run, for the base: the key decrypts it and the
            // target may be written.
            let base = dr_restore::run::dry_run(repo, &request).await?;
            if self.json {
                let mut out = serde_json::to_value(&plan)?;
                out["base"] = serde_json::to_value(&base)?;
                println!("{}", serde_json::to_string_pretty(&out)?);
                eprintln!("dry run: nothing was changed");
            } else {
                println!("identity: can decrypt the base");
                println!("{}: {}", base.destination, base.plan);
                println!("dry run: nothing was changed");
            }
            return Ok(ExitCode::SUCCESS);
        }
        let identities = request.identities.clone();
        let staging_dir = request.staging_dir.clone();
        let watch = Arc::new(Watch::default());
        super::cancel_on_signal(
            watch.pipeline.cancel.clone(),
            "stopping the restore and cleaning up",
        );
        let bar = progress(watch.clone());
        let base = dr_restore::run::restore(repo, request, watch, &Prompt { yes: self.yes }).await;
        bar.finish_and_clear();
        let base = base.map_err(|e| anyhow::Error::new(e).context("restoring the base failed"))?;
        let replay = pitr::apply(repo, identities, &plan, &conn, &staging_dir)
            .await
            .context("replaying the changes failed")?;
        if self.json {
            let out = serde_json::json!({
                "to": plan.to,
                "base": base,
                "segments": plan.segments.len(),
                "replay": replay,
                "recovery_point": {
                    "commit_at": replay.reached_commit_at,
                    "lsn": replay.reached_lsn,
                },
                "seconds": {
                    "base_restore": base.seconds.total,
                    "replay": replay.seconds,
                    "total": base.seconds.total + replay.seconds,
                },
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            println!(
                "restored `{}` as of {} into {}: recovery point {} (LSN {}); base {} in {:.1} s, then {} transaction(s) replayed in {:.1} s ({} already in the base, {} stored twice), {} sequence(s) set",
                self.database,
                plan.to,
                base.destination,
                replay
                    .reached_commit_at
                    .map_or_else(|| format!("{} (the base: no later commit)", plan.base_snapshot_at), |t| t.to_string()),
                replay.reached_lsn.as_deref().unwrap_or("-"),
                base.backup_id,
                base.seconds.total,
                replay.transactions,
                replay.seconds,
                replay.already_in_base,
                replay.duplicates,
                replay.sequences_set
            );
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Download bar (bytes, rate, ETA), then restore bar (TOC entries); hidden off a terminal.
fn progress(watch: Arc<Watch>) -> ProgressBar {
    let bar = ProgressBar::new(0);
    let fetch_style = ProgressStyle::with_template(
        "fetch+verify {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .expect("valid template");
    let restore_style =
        ProgressStyle::with_template("pg_restore   {bar:30} {pos}/{len} entries ({elapsed})")
            .expect("valid template");
    let ticker = bar.clone();
    tokio::spawn(async move {
        let mut shown = Phase::Preparing;
        while !ticker.is_finished() {
            let phase = *watch.phase.lock().expect("phase");
            if phase != shown {
                shown = phase;
                match phase {
                    Phase::Fetching => {
                        ticker.set_style(fetch_style.clone());
                        ticker.set_length(watch.stored_total.load(Ordering::Relaxed));
                    }
                    Phase::Restoring => {
                        ticker.set_style(restore_style.clone());
                        ticker.reset();
                    }
                    _ => {}
                }
            }
            match phase {
                Phase::Fetching => ticker.set_position(watch.pipeline.progress.stored()),
                Phase::Restoring => {
                    ticker.set_length(watch.toc_total.load(Ordering::Relaxed));
                    ticker.set_position(watch.toc_done.load(Ordering::Relaxed));
                }
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    bar
}

impl Args {
    /// `--directory NAME --output DIR`: verified whole in staging, unpacked, then checked
    /// against the listing.
    async fn directory(
        &self,
        config: &dr_core::config::Config,
        name: &str,
    ) -> anyhow::Result<ExitCode> {
        if dr_directories::configured(config, name).is_none() {
            anyhow::bail!(
                "no `[[directories]]` entry is named `{name}`; configured: {}",
                super::names(config.directories.iter().map(|d| d.name.as_str()))
            );
        }
        let output = self.output.clone().expect("clap requires --output");
        let identity_path = self
            .identity
            .clone()
            .or_else(|| config.encryption.identity_file.clone())
            .ok_or(dr_restore::RestoreError::NoIdentity)?;
        let identities = Arc::new(
            dr_core::keys::Identities::from_file(&identity_path)
                .with_context(|| "cannot load the identity to decrypt with")?,
        );
        let staging = self
            .staging_dir
            .clone()
            .or_else(|| std::env::var_os("TMPDIR").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/var/tmp"));
        let repo = super::open_repository(config, self.repository.as_deref()).await?;
        eprintln!("RESTORE of directory `{name}` -> {}", output.display());
        let done = dr_directories::restore(
            &repo,
            name,
            self.backup.as_deref(),
            &output,
            self.force,
            identities,
            &staging,
        )
        .await?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&done)?);
        } else {
            println!(
                "restored directory `{name}` backup {} into {}: {} files, {}, every entry checked against the listing, in {:.1} s",
                done.backup_id,
                done.output,
                done.files,
                HumanBytes(done.bytes),
                done.seconds
            );
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// The primary cannot be read: says so, and names the copies that hold backups of
/// `database` with the exact command that restores from one.
async fn copies_instead(
    config: &dr_core::config::Config,
    database: &str,
    cause: anyhow::Error,
) -> anyhow::Error {
    let mut holders = Vec::new();
    for copy in &config.copies {
        let name = copy.name.as_str();
        let Ok(repo) = super::open_repository(config, Some(name)).await else {
            continue;
        };
        let units = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            dr_copies::committed_units(&repo, database),
        )
        .await;
        if let Ok(Ok(units)) = units {
            let backups = units.iter().filter(|u| u.contains("/backups/")).count();
            if let Some(newest) = units.iter().rev().find(|u| u.contains("/backups/")) {
                holders.push(format!(
                    "  {name}: {backups} backup(s), newest {}\n    {}",
                    newest.rsplit('/').next().unwrap_or_default(),
                    same_command_with_repository(name)
                ));
            }
        }
    }
    if holders.is_empty() {
        return cause.context(format!(
            "the primary repository ({}) cannot be read, and no [[copies]] repository holds a backup of `{database}` either",
            config.storage.url
        ));
    }
    cause.context(format!(
        "the primary repository ({}) cannot be read. These copies hold backups of `{database}`; restore from one with:\n{}",
        config.storage.url,
        holders.join("\n")
    ))
}

/// This very command line with `--repository NAME` added after `restore`.
fn same_command_with_repository(name: &str) -> String {
    let mut words = Vec::new();
    let mut added = false;
    for arg in std::env::args() {
        let word = if arg.is_empty()
            || arg.contains(|c: char| !(c.is_ascii_alphanumeric() || "-_./:=@,+%".contains(c)))
        {
            format!("'{}'", arg.replace('\'', "'\\''"))
        } else {
            arg.clone()
        };
        words.push(word);
        if !added && arg == "restore" {
            words.push(format!("--repository {name}"));
            added = true;
        }
    }
    if let Some(first) = words.first_mut() {
        *first = "dr".to_string();
    }
    words.join(" ")
}
