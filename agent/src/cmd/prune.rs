//! `dr prune`: apply retention now.

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
#[derive(clap::Args)]
pub struct Args {
    /// Only this database (default: all configured databases).
    #[arg(long, short)]
    database: Option<String>,

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
        let repo = super::open_repo(&config).await?;
        let dbs = config.databases_named(self.database.as_deref());
        if dbs.is_empty() {
            anyhow::bail!(
                "no configured database matches {}",
                self.database.as_deref().unwrap_or("(none configured)")
            );
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
            let result =
                dr_core::retention::prune(&repo, db, now, config.job_timeout(), self.dry_run).await;
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
        if self.json {
            // One object per database; `change_segments` where continuous capture is on.
            let mut out = Vec::new();
            for r in &reports {
                let mut v = serde_json::to_value(r)?;
                if let Some(s) = segment_reports.iter().find(|s| s.database == r.database) {
                    v["change_segments"] = serde_json::to_value(s)?;
                }
                out.push(v);
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
        }
        Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    }
}
