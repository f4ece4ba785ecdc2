//! `dr verify`: prove backups are intact without restoring them.
//!
//! The plain check needs no private key: every object is present, has the manifest's size
//! and sha256. `--deep` also decrypts and decompresses everything (age and zstd verify
//! themselves) and has `pg_restore --list` read the archive's table of contents.

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
    pub ok: bool,
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
}

/// Checks each backup; `identities` makes it deep.
pub async fn verify(
    repo: &Repository,
    backups: &[Manifest],
    identities: Option<Arc<Identities>>,
) -> Vec<BackupCheck> {
    let mut out = Vec::new();
    for m in backups {
        let mut objects = Vec::new();
        for entry in &m.objects {
            let result = match &identities {
                None => fetch_hashed(repo, m, entry).await.map(|_| (None, None)),
                Some(ids) => deep(repo, m, entry, ids.clone()).await,
            };
            objects.push(match result {
                Ok((raw_bytes, toc_entries)) => ObjectCheck {
                    name: entry.name.clone(),
                    ok: true,
                    error: None,
                    stored_bytes: entry.stored_bytes,
                    raw_bytes,
                    toc_entries,
                },
                Err(e) => ObjectCheck {
                    name: entry.name.clone(),
                    ok: false,
                    error: Some(e.to_string()),
                    stored_bytes: entry.stored_bytes,
                    raw_bytes: None,
                    toc_entries: None,
                },
            });
        }
        out.push(BackupCheck {
            backup_id: m.id.to_string(),
            database: m.database.clone(),
            ok: objects.iter().all(|o| o.ok),
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
) -> Result<(Option<u64>, Option<u64>), RestoreError> {
    let control = Control::default();
    let clock = FetchClock::default();
    if entry.role != ObjectRole::Data {
        let (d, _) = fetch_decoded(repo, m, entry, ids, io::sink(), &control, &clock).await?;
        return Ok((Some(d.raw_bytes), None));
    }
    let tools = tokio::task::spawn_blocking(|| {
        let found = PgTools::discover();
        PgTools::newest(&found).cloned()
    })
    .await
    .expect("discovery panicked")?;
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
    Ok((Some(decoded.raw_bytes), Some(entries)))
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
