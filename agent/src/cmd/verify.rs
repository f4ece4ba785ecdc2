//! `dr verify`: prove backups are intact without restoring them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use indicatif::HumanBytes;

/// Check backups: every object present with the manifest's size and sha256.
///
/// Needs no private key. With --deep it also decrypts and decompresses every object (age and
/// zstd check themselves) and has `pg_restore --list` read the archive; that needs the
/// identity, and a pg_restore at least as new as the pg_dump that wrote the archive.
///
/// Exit status: 0 all good; 1 a backup failed verification (named, with the object); 3 no
/// failure found, but the archive of some backup could not be listed on this host (it needs
/// a newer pg_restore): not a verdict on the backup.
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Read from this repository: `primary` ([storage], the default) or a `[[copies]]`
    /// name, e.g. when the primary's region is down.
    #[arg(long, value_name = "NAME")]
    repository: Option<String>,

    /// Only this database (default: all configured databases).
    #[arg(long, short)]
    database: Option<String>,

    /// Check this backup (default: the newest of each database).
    #[arg(long, group = "which")]
    backup: Option<String>,

    /// Check every backup.
    #[arg(long, group = "which")]
    all: bool,

    /// Also decrypt, decompress and list the archive (needs the identity).
    #[arg(long)]
    deep: bool,

    /// Identity file for --deep (default: [encryption] identity_file).
    #[arg(long, value_name = "FILE")]
    identity: Option<PathBuf>,

    /// JSON for scripts.
    #[arg(long)]
    json: bool,
}

impl Args {
    pub async fn run(self, config_path: &Path) -> anyhow::Result<ExitCode> {
        let config = super::load_config(config_path)?;
        let identities = if self.deep {
            let path = self
                .identity
                .clone()
                .or_else(|| config.encryption.identity_file.clone())
                .ok_or(dr_restore::RestoreError::NoIdentity)?;
            Some(Arc::new(
                dr_core::keys::Identities::from_file(&path)
                    .context("cannot load the identity for --deep")?,
            ))
        } else {
            None
        };
        let repo = super::open_repository(&config, self.repository.as_deref()).await?;
        let listing = repo.list(self.database.as_deref()).await?;
        for problem in &listing.unreadable {
            tracing::error!(error = %problem, "unreadable manifest");
        }
        let chosen: Vec<_> = if self.all {
            listing.backups.clone()
        } else if let Some(id) = &self.backup {
            let found: Vec<_> = listing
                .backups
                .iter()
                .filter(|m| m.id.as_str() == id)
                .cloned()
                .collect();
            if found.is_empty() {
                anyhow::bail!("no backup `{id}` in {}", repo.storage().location());
            }
            found
        } else {
            let mut newest = std::collections::BTreeMap::new();
            for m in &listing.backups {
                newest.insert(m.database.clone(), m.clone());
            }
            newest.into_values().collect()
        };
        if chosen.is_empty() {
            anyhow::bail!(
                "no backups to verify in {} (environment `{}`)",
                repo.storage().location(),
                repo.environment()
            );
        }
        let checks = dr_restore::verify::verify(&repo, &chosen, identities).await;
        let failed = checks.iter().filter(|c| !c.ok).count() + listing.unreadable.len();
        let incomplete = checks.iter().filter(|c| c.ok && !c.complete).count();
        if self.json {
            println!("{}", serde_json::to_string_pretty(&checks)?);
        } else {
            for c in &checks {
                let verdict = match (c.ok, c.complete) {
                    (false, _) => "FAIL",
                    (true, false) => "INCOMPLETE",
                    (true, true) => "OK",
                };
                println!("{verdict:<4}  {}  {}", c.backup_id, c.database);
                for o in &c.objects {
                    match &o.error {
                        None => println!(
                            "      {} ok ({}{}{})",
                            o.name,
                            HumanBytes(o.stored_bytes),
                            o.raw_bytes
                                .map(|r| format!(", {} decoded", HumanBytes(r)))
                                .unwrap_or_default(),
                            o.toc_entries
                                .map(|t| format!(", {t} archive entries"))
                                .unwrap_or_default()
                        ),
                        Some(e) => println!("      {} FAILED: {e}", o.name),
                    }
                    if let Some(why) = &o.cannot_deep_verify {
                        println!("      {} cannot deep-verify: {why}", o.name);
                    }
                }
            }
        }
        if failed > 0 {
            eprintln!("error: {failed} backup(s) failed verification");
            return Ok(ExitCode::FAILURE);
        }
        if incomplete > 0 {
            eprintln!(
                "error: cannot deep-verify {incomplete} backup(s) on this host (see above); their stored bytes, encryption and compression checked out"
            );
            return Ok(ExitCode::from(3));
        }
        Ok(ExitCode::SUCCESS)
    }
}
