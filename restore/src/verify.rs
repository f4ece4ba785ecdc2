//! `dr verify`: prove backups are intact without restoring them.
//!
//! The plain check needs no private key: every object is present, has the manifest's size
//! and sha256. `--deep` also decrypts and decompresses everything (age and zstd verify
//! themselves) and has `pg_restore --list` read the archive's table of contents.
//!
//! When no pg_restore on this host can read the archive (it was written by a newer pg_dump),
//! the archive is still decoded in full, and the check is reported as incomplete: that is a
//! limit of this host, not a verdict on the backup.

use std::io::{self, Read, Write};
use std::process::{ChildStdin, Stdio};
use std::sync::Arc;

use dr_core::keys::Identities;
use dr_core::manifest::{Manifest, ObjectEntry, ObjectRole};
use dr_core::pg::PgTools;
use dr_core::pipeline::Control;
use dr_core::repo::Repository;
use serde::Serialize;

use crate::fetch::{fetch_decoded, fetch_hashed, FetchClock};
use crate::RestoreError;

#[derive(Debug, Clone, Serialize)]
pub struct BackupCheck {
    pub backup_id: String,
    pub database: String,
    /// No object failed.
    pub ok: bool,
    /// Every requested check ran (false when the archive could not be listed here).
    pub complete: bool,
    pub objects: Vec<ObjectCheck>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ObjectCheck {
    pub name: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub stored_bytes: u64,
    /// Decoded size (`--deep` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_bytes: Option<u64>,
    /// Entries `pg_restore --list` read (`--deep`, data object only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub toc_entries: Option<u64>,
    /// Why part of `--deep` could not run on this host (e.g. `pg_restore` too old).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cannot_deep_verify: Option<String>,
}

/// What a check of one object found.
#[derive(Default)]
struct Found {
    raw_bytes: Option<u64>,
    toc_entries: Option<u64>,
    cannot_deep_verify: Option<String>,
}

/// Checks each backup; `identities` makes it deep.
pub async fn verify(
    repo: &Repository,
    backups: &[Manifest],
    identities: Option<Arc<Identities>>,
) -> Vec<BackupCheck> {
    let mut out = Vec::new();
    let tools = match identities {
        Some(_) => tokio::task::spawn_blocking(PgTools::discover)
            .await
            .expect("discovery panicked"),
        None => Vec::new(),
    };
    for m in backups {
        let mut objects = Vec::new();
        for entry in &m.objects {
            let result = match &identities {
                None => fetch_hashed(repo, m, entry).await.map(|_| Found::default()),
                Some(ids) => deep(repo, m, entry, ids.clone(), &tools).await,
            };
            objects.push(match result {
                Ok(found) => ObjectCheck {
                    name: entry.name.clone(),
                    ok: true,
                    error: None,
                    stored_bytes: entry.stored_bytes,
                    raw_bytes: found.raw_bytes,
                    toc_entries: found.toc_entries,
                    cannot_deep_verify: found.cannot_deep_verify,
                },
                Err(e) => ObjectCheck {
                    name: entry.name.clone(),
                    ok: false,
                    error: Some(e.to_string()),
                    stored_bytes: entry.stored_bytes,
                    raw_bytes: None,
                    toc_entries: None,
                    cannot_deep_verify: None,
                },
            });
        }
        out.push(BackupCheck {
            backup_id: m.id.to_string(),
            database: m.database.clone(),
            ok: objects.iter().all(|o| o.ok),
            complete: objects.iter().all(|o| o.cannot_deep_verify.is_none()),
            objects,
        });
    }
    out
}

async fn deep(
    repo: &Repository,
    m: &Manifest,
    entry: &ObjectEntry,
    ids: Arc<Identities>,
    found: &[PgTools],
) -> Result<Found, RestoreError> {
    let control = Control::default();
    let clock = FetchClock::default();
    let mut cannot_deep_verify = None;
    if matches!(entry.role, ObjectRole::Data | ObjectRole::Schema) {
        match crate::run::pg_restore_for(found, m) {
            Ok(tools) => return list_archive(repo, m, entry, ids, &tools).await,
            Err(e) if e.is_missing_tools() => cannot_deep_verify = Some(e.to_string()),
            Err(e) => return Err(e),
        }
    }
    // Age and zstd still prove the object whole, without pg_restore.
    let (d, _) = fetch_decoded(repo, m, entry, ids, io::sink(), &control, &clock).await?;
    Ok(Found {
        raw_bytes: Some(d.raw_bytes),
        toc_entries: None,
        cannot_deep_verify,
    })
}

/// Decodes the data object into `pg_restore --list`, which reads its table of contents.
async fn list_archive(
    repo: &Repository,
    m: &Manifest,
    entry: &ObjectEntry,
    ids: Arc<Identities>,
    tools: &PgTools,
) -> Result<Found, RestoreError> {
    let control = Control::default();
    let clock = FetchClock::default();
    let mut child = std::process::Command::new(tools.bin("pg_restore"))
        .arg("--list")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| dr_core::pipeline::child::ChildError::Spawn {
            program: "pg_restore".into(),
            source,
        })?;
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let tee = TocTee(Some(child.stdin.take().expect("piped")));
    let decoded = fetch_decoded(repo, m, entry, ids, tee, &control, &clock).await;
    let decoded = match decoded {
        Ok((d, tee)) => {
            drop(tee);
            d
        }
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("wait panicked")
        .map_err(|source| dr_core::pipeline::child::ChildError::Spawn {
            program: "pg_restore".into(),
            source,
        })?;
    let listing = reader.join().unwrap_or_default();
    if !out.status.success() {
        return Err(dr_core::pipeline::child::ChildError::Failed {
            program: "pg_restore --list".into(),
            status: dr_core::pipeline::child::describe_status(out.status),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }
        .into());
    }
    let entries = listing
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .count() as u64;
    Ok(Found {
        raw_bytes: Some(decoded.raw_bytes),
        toc_entries: Some(entries),
        cannot_deep_verify: None,
    })
}

/// Feeds `pg_restore --list` until it has read the table of contents and closed its end,
/// then discards the rest, which is still decoded (and so verified) in full.
struct TocTee(Option<ChildStdin>);

impl Write for TocTee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(stdin) = &mut self.0 {
            if let Err(e) = stdin.write_all(buf) {
                if e.kind() != io::ErrorKind::BrokenPipe {
                    return Err(e);
                }
                self.0 = None;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
