//! `dr prune`: apply retention now, to databases and directories, in any repository.

use std::path::Path;
use std::process::ExitCode;

use crate::daemon::lock::{self, Acquired};

/// Delete backups no class keeps any more, and leftovers of crashed backups.
///
/// A backup is kept while any of its classes' `keep` covers it; the newest backup of each
/// class and of the database is always kept; backups of classes without a schedule (or
/// with no class) are kept. Manifests go first, then data. Objects without a manifest and
/// unfinished multipart uploads are removed once their backup id is older than
/// [agent] job_timeout plus an hour (no backup can still be writing them).
///
/// Each database is pruned under its repository lock; one whose lock another process holds
/// (a backup in flight) is skipped with the holder named, and the exit code is non-zero.
/// --dry-run deletes nothing and takes no lock.
///
/// `[[directories]]` backups follow the same retention rules and lose their leftovers the
/// same way, but take no lock. With --repository a copy is pruned by its own
/// `[copies.keep]` and the primary is not touched; leftovers in a copy are left to the
/// agent's copy pass (a catch-up copy in flight looks like one).
#[derive(clap::Args)]
pub struct Args {
    /// Only this database (default: every configured database and directory).
    #[arg(long, short, conflicts_with = "directory")]
    database: Option<String>,

    /// Only this `[[directories]]` tree.
    #[arg(long, value_name = "NAME")]
    directory: Option<String>,

    /// Prune this repository: `primary` ([storage], the default) or a `[[copies]]` name,
    /// by that copy's `keep`.
    #[arg(long, value_name = "NAME")]
    repository: Option<String>,

    /// List what would be deleted and why; delete nothing.
    #[arg(long)]
    dry_run: bool,

    /// JSON for scripts: every decision with its reason.
    #[arg(long)]
    json: bool,
}

impl Args {
    pub async fn run(self, config_path: &Path) -> anyhow::Result<ExitCode> {
        let config = super::load_config(config_path)?;
        let repo = super::open_repository(&config, self.repository.as_deref()).await?;
        // A copy's leftovers are the agent's to remove (see Leftovers::Keep).
        let leftovers = match self.repository.as_deref() {
            None | Some(dr_core::config::PRIMARY) => dr_core::retention::Leftovers::Remove,
            Some(_) => dr_core::retention::Leftovers::Keep,
        };
        let overrides = self
            .repository
            .as_deref()
            .and_then(|name| config.copies.iter().find(|c| c.name.as_str() == name))
            .map(|c| c.keep.clone())
            .unwrap_or_default();
        let dbs = match &self.directory {
            Some(_) => Vec::new(),
            None => config.databases_named(self.database.as_deref()),
        };
        let dirs: Vec<_> = match (&self.database, &self.directory) {
            (Some(_), _) => Vec::new(),
            (None, Some(name)) => match dr_directories::configured(&config, name) {
                Some(d) => vec![d],
                None => anyhow::bail!(
                    "no `[[directories]]` entry is named `{name}`; configured: {}",
                    super::names(config.directories.iter().map(|d| d.name.as_str()))
                ),
            },
            (None, None) => config.directories.iter().collect(),
        };
        if let Some(name) = &self.database {
            if dbs.is_empty() {
                anyhow::bail!(
                    "no configured database is named `{name}`; configured: {}",
                    super::names(config.databases.iter().map(|d| d.name.as_str()))
                );
            }
        }
        if dbs.is_empty() && dirs.is_empty() {
            anyhow::bail!("the config has no databases and no directories to prune");
        }
        let now = jiff::Timestamp::now();
        let owner = lock::new_owner();
        let mut reports = Vec::new();
        let mut segment_reports = Vec::new();
        let mut failed = false;
        for db in dbs {
            let guard = if self.dry_run {
                None
            } else {
                match lock::acquire(&repo, db.name.as_str(), &owner, "prune").await {
                    Ok(Acquired::Yes(g)) => Some(g),
                    Ok(Acquired::HeldBy(holder)) => {
                        failed = true;
                        crate::print_error(&anyhow::anyhow!(
                            "skipping database `{}`: it is locked by {holder}; nothing of it was deleted (prune again once that finishes)",
                            db.name
                        ));
                        continue;
                    }
                    Err(e) => {
                        failed = true;
                        crate::print_error(&anyhow::Error::new(e).context(format!(
                            "cannot take the lock of database `{}`; nothing of it was deleted",
                            db.name
                        )));
                        continue;
                    }
                }
            };
            let result = dr_core::retention::prune_with(
                &repo,
                db,
                &overrides,
                now,
                config.job_timeout(),
                leftovers,
                self.dry_run,
            )
            .await;
            let segments = match &result {
                Ok(r) => {
                    crate::daemon::continuous::prune_segments(
                        &repo,
                        db,
                        r,
                        config.job_timeout(),
                        self.dry_run,
                    )
                    .await
                }
                Err(_) => Ok(None),
            };
            if let Some(guard) = guard {
                guard.release().await;
            }
            match segments {
                Ok(Some(s)) => {
                    failed |= !s.errors.is_empty();
                    segment_reports.push(s);
                }
                Ok(None) => {}
                Err(e) => {
                    failed = true;
                    crate::print_error(&anyhow::Error::new(e).context(format!(
                        "cannot prune the change segments of `{}`; none was deleted",
                        db.name
                    )));
                }
            }
            match result {
                Ok(r) => {
                    failed |= !r.errors.is_empty();
                    reports.push(r);
                }
                Err(e) => {
                    failed = true;
                    crate::print_error(&anyhow::Error::new(e).context(format!(
                        "cannot prune database `{}`; nothing was deleted",
                        db.name
                    )));
                }
            }
        }
        // Directory backups take no lock (none is held while one is written): a backup in
        // flight has no manifest, so retention never sees it, and its objects are too young
        // to be leftovers.
        let mut dir_reports = Vec::new();
        for dir in dirs {
            let name = dir.name.as_str();
            let pruned = async {
                let decisions =
                    dr_directories::prune_with(&repo, dir, &overrides, now, self.dry_run).await?;
                let leftovers = match leftovers {
                    dr_core::retention::Leftovers::Remove => {
                        dr_directories::prune_leftovers(
                            &repo,
                            name,
                            now,
                            config.job_timeout(),
                            self.dry_run,
                        )
                        .await?
                    }
                    dr_core::retention::Leftovers::Keep => Vec::new(),
                };
                Ok::<_, dr_core::storage::StorageError>((decisions, leftovers))
            }
            .await;
            match pruned {
                Ok((decisions, leftovers)) => dir_reports.push((name, decisions, leftovers)),
                Err(e) => {
                    failed = true;
                    crate::print_error(&anyhow::Error::new(e).context(format!(
                        "cannot prune directory `{}`; the backups it had not reached yet are kept",
                        dir.name
                    )));
                }
            }
        }
        if self.json {
            // One object per database (`change_segments` where continuous capture is on),
            // then one per directory; `kind` tells them apart.
            let mut out = Vec::new();
            for r in &reports {
                let mut v = serde_json::to_value(r)?;
                v["kind"] = "database".into();
                if let Some(s) = segment_reports.iter().find(|s| s.database == r.database) {
                    v["change_segments"] = serde_json::to_value(s)?;
                }
                out.push(v);
            }
            for (name, decisions, leftovers) in &dir_reports {
                out.push(serde_json::json!({
                    "kind": "directory",
                    "directory": name,
                    "decisions": decisions,
                    "orphans": leftovers,
                    "dry_run": self.dry_run,
                }));
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            let verb = if self.dry_run {
                "would delete"
            } else {
                "deleted"
            };
            for r in &reports {
                for d in &r.decisions {
                    println!(
                        "{} {}  {}  {}",
                        if d.keep { "keep  " } else { verb },
                        d.backup_id,
                        r.database,
                        d.reason
                    );
                }
                for o in &r.orphans {
                    println!("{verb} {o}  (no manifest, too old to be a backup in flight)");
                }
                for u in &r.stale_uploads {
                    let verb = if self.dry_run {
                        "would abort"
                    } else {
                        "aborted"
                    };
                    println!("{verb} upload {u}  (left open by a crash, too old to be in flight)");
                }
                for s in segment_reports.iter().filter(|s| s.database == r.database) {
                    for id in &s.deleted {
                        println!(
                            "{verb} segment {id}  {}  (before the oldest kept base {})",
                            s.database,
                            s.oldest_base.as_deref().unwrap_or("-")
                        );
                    }
                    for id in &s.locked {
                        println!("keep   segment {id}  {}  (no kept backup needs it, but object lock protects it)", s.database);
                    }
                    for id in &s.orphans {
                        println!("{verb} segment {id}  {}  (no manifest, too old to be a capture in flight)", s.database);
                    }
                    for e in &s.errors {
                        eprintln!("error: {e}");
                    }
                }
                for w in &r.warnings {
                    eprintln!("warning: {w}");
                }
                for e in &r.errors {
                    eprintln!("error: {e}");
                }
            }
            for (name, decisions, leftovers) in &dir_reports {
                for d in decisions {
                    println!(
                        "{} {}  {name} (directory)  {}",
                        if d.keep { "keep  " } else { verb },
                        d.backup_id,
                        d.reason
                    );
                }
                for o in leftovers {
                    println!("{verb} {o}  (no manifest, too old to be a backup in flight)");
                }
            }
        }
        Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    }
}
