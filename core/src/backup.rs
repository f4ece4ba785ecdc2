//! One backup of one database, end to end: find matching client tools, stream the database
//! and its cluster's globals through the pipeline, then write the manifest last.
//!
//! Used by `dr backup` and by the agent's schedules alike.

use std::time::Instant;

use jiff::Timestamp;

use crate::config::{Config, DatabaseConfig};
use crate::manifest::{
    BackupId, Compression, Encryption, Manifest, ObjectEntry, ObjectRole, FORMAT_VERSION,
};
use crate::pg::{Connection, PgError, PgTools, ServerVersion};
use crate::pipeline::child::ChildError;
use crate::pipeline::encode::EncodeOptions;
use crate::pipeline::{self, Control, PipelineError, Stored};
use crate::repo::{Repository, DATA_OBJECT, GLOBALS_OBJECT, ROW_COUNTS_OBJECT};
use crate::snapshot::{CountsUnavailable, HeldSnapshot};
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("no encryption recipients are configured: set [encryption] recipients or recipients_file (dr never stores a backup unencrypted; `dr keygen` makes a key)")]
    NoRecipients,
    #[error(transparent)]
    Keys(#[from] crate::keys::KeyError),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("storing {what}: {source}")]
    Pipeline {
        what: &'static str,
        source: PipelineError,
    },
    #[error("writing the manifest: {0}")]
    Commit(StorageError),
}

impl BackupError {
    pub fn is_cancelled(&self) -> bool {
        matches!(
            self,
            BackupError::Pipeline {
                source: PipelineError::Cancelled,
                ..
            }
        )
    }
}

/// Runs one backup of `db` tagged with `classes`; returns its committed manifest.
pub async fn run(
    repo: &Repository,
    config: &Config,
    db: &DatabaseConfig,
    classes: Vec<String>,
    control: &Control,
) -> Result<Manifest, BackupError> {
    let recipients = config.recipients()?;
    if recipients.is_empty() {
        return Err(BackupError::NoRecipients);
    }
    let conn = Connection::new(&db.url, db.password_file.as_deref())?;
    let (tools, server) = choose_tools(&conn).await?;
    let opts = EncodeOptions {
        level: config.compression.level,
        threads: config.compression.threads,
    };
    let database = db.name.as_str();
    let started_at = Timestamp::now();
    let clock = Instant::now();
    let id = BackupId::new(started_at);
    tracing::info!(
        backup = %id, database, url = %conn.url, server = %server.text,
        pg_dump = %tools.version, storage = %repo.storage().location(),
        "backup started"
    );

    // With drills configured, a held snapshot lets the dump and exact row counts see the
    // same data; the counts run concurrently with the dump, on their own session.
    let mut row_counts_unavailable = None;
    // Continuous capture needs the snapshot's position in the change stream, the same way.
    let held = if db.drill.is_some() || db.continuous.is_some() {
        match HeldSnapshot::open(&conn, db.continuous.is_some()).await {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(error = %e, "could not hold a snapshot; backing up without row counts and without a base for continuous capture");
                if db.drill.is_some() {
                    row_counts_unavailable = Some(CountsUnavailable::from(&e).0);
                }
                None
            }
        }
    } else {
        None
    };
    let snapshot_id = held.as_ref().map(|s| s.id.clone());
    let continuous_base = held.as_ref().and_then(|h| h.base.clone());
    let counting = match (&held, &db.drill) {
        (Some(h), Some(_)) => Some(h.start_counting(&conn).await),
        _ => None,
    };

    let storage = repo.storage();
    let data_key = repo.object_key(database, &id, DATA_OBJECT);
    let dumped =
        match conn.spawn_pg_dump(&tools, snapshot_id.as_deref(), config.lock_wait_timeout(db)) {
            Ok(source) => pipeline::encrypt_to_storage(
                source,
                pipeline::PG_DUMP_CUSTOM,
                storage,
                &data_key,
                &recipients,
                opts,
                control,
            )
            .await
            .map_err(|source| BackupError::Pipeline {
                what: "the database dump (pg_dump)",
                source,
            }),
            Err(e) => Err(e.into()),
        };
    let data = match dumped {
        Ok(d) => d,
        Err(e) => {
            // Nothing of this backup stays open on the source.
            if let Some(c) = counting {
                c.abort().await;
            }
            if let Some(h) = held {
                h.close().await;
            }
            return Err(e);
        }
    };

    // The snapshot may only be released once pg_dump and the counts are done with it.
    let row_counts = match counting {
        Some(c) => match c.finish().await {
            Ok(counts) => Some(counts),
            Err(reason) => {
                row_counts_unavailable = Some(reason.0);
                None
            }
        },
        None => None,
    };
    if let Some(h) = held {
        h.close().await;
    }

    let globals_key = repo.object_key(database, &id, GLOBALS_OBJECT);
    let globals = match dump_globals(
        &conn,
        &tools,
        repo,
        &globals_key,
        &recipients,
        opts,
        control,
    )
    .await
    {
        Ok(g) => g,
        Err(e) => {
            discard(repo, &[&data_key]).await;
            return Err(e);
        }
    };

    let counts_key = repo.object_key(database, &id, ROW_COUNTS_OBJECT);
    let counts = match &row_counts {
        Some(c) => {
            let json = serde_json::to_vec(c).expect("counts serialize");
            let put =
                pipeline::encrypt_bytes_to_storage(&json, storage, &counts_key, &recipients, opts);
            match put.await {
                Ok(s) => Some(s),
                Err(source) => {
                    discard(repo, &[&data_key, &globals_key]).await;
                    return Err(BackupError::Pipeline {
                        what: "the row counts",
                        source,
                    });
                }
            }
        }
        None => None,
    };

    let mut objects = vec![
        entry(
            ObjectRole::Data,
            DATA_OBJECT,
            "pg_dump-custom",
            &data,
            false,
        ),
        entry(
            ObjectRole::Globals,
            GLOBALS_OBJECT,
            "sql",
            &globals.0,
            globals.1,
        ),
    ];
    if let Some(c) = &counts {
        objects.push(entry(
            ObjectRole::RowCounts,
            ROW_COUNTS_OBJECT,
            "json",
            c,
            false,
        ));
    }
    let manifest = Manifest {
        format: FORMAT_VERSION,
        id,
        environment: repo.environment().to_string(),
        database: database.to_string(),
        classes,
        started_at,
        finished_at: Timestamp::now(),
        server_version: server.text.clone(),
        server_version_num: server.num,
        pg_dump_version: tools.version.clone(),
        dr_version: env!("CARGO_PKG_VERSION").to_string(),
        compression: Compression {
            algorithm: "zstd".into(),
            level: opts.level,
        },
        encryption: Encryption {
            algorithm: "age".into(),
            recipients: recipients.to_strings(),
        },
        objects,
        row_counts_unavailable,
        continuous_base,
    };
    if let Err(e) = repo.commit(&manifest).await {
        discard(repo, &[&data_key, &globals_key, &counts_key]).await;
        return Err(BackupError::Commit(e));
    }
    let secs = clock.elapsed().as_secs_f64();
    tracing::info!(
        backup = %manifest.id,
        database,
        classes = ?manifest.classes,
        raw_bytes = data.raw_bytes,
        stored_bytes = data.stored_bytes,
        ratio = format!("{:.2}", data.raw_bytes as f64 / data.stored_bytes.max(1) as f64),
        seconds = format!("{secs:.1}"),
        "backup complete"
    );
    Ok(manifest)
}

/// Asks the server its version, then picks the `pg_dump` for it.
async fn choose_tools(conn: &Connection) -> Result<(PgTools, ServerVersion), PgError> {
    let server = conn.connect("dr").await?.server_version().await?;
    let found = tokio::task::spawn_blocking(PgTools::discover)
        .await
        .expect("tool discovery panicked");
    let tools = PgTools::for_server(&found, &server)?;
    Ok((tools, server))
}

/// Dumps roles and tablespaces; on managed services that hide `pg_authid`, retries without
/// role passwords and records that in the manifest.
async fn dump_globals(
    conn: &Connection,
    tools: &PgTools,
    repo: &Repository,
    key: &str,
    recipients: &crate::keys::Recipients,
    opts: EncodeOptions,
    control: &Control,
) -> Result<(Stored, bool), BackupError> {
    let attempt = |role_passwords: bool| async move {
        let source = conn.spawn_pg_dumpall_globals(tools, role_passwords)?;
        let storage = repo.storage();
        pipeline::encrypt_to_storage(
            source,
            pipeline::SQL,
            storage,
            key,
            recipients,
            opts,
            control,
        )
        .await
        .map_err(|source| BackupError::Pipeline {
            what: "the cluster's roles (pg_dumpall --globals-only)",
            source,
        })
    };
    match attempt(true).await {
        Ok(stored) => Ok((stored, false)),
        Err(BackupError::Pipeline {
            source: PipelineError::Source(ChildError::Failed { stderr, .. }),
            ..
        }) if stderr.contains("permission denied") => {
            tracing::warn!(
                "cannot read role passwords (pg_authid) on this server; dumping roles without passwords"
            );
            Ok((attempt(false).await?, true))
        }
        Err(e) => Err(e),
    }
}

fn entry(
    role: ObjectRole,
    name: &str,
    format: &str,
    stored: &Stored,
    without_role_passwords: bool,
) -> ObjectEntry {
    ObjectEntry {
        role,
        name: name.to_string(),
        format: format.to_string(),
        raw_bytes: stored.raw_bytes,
        stored_bytes: stored.stored_bytes,
        sha256: stored.sha256.clone(),
        without_role_passwords,
    }
}

/// Removes objects of a backup that will never get a manifest.
async fn discard(repo: &Repository, keys: &[&str]) {
    for key in keys {
        if let Err(e) = repo.storage().delete(key).await {
            tracing::warn!(key, error = %e, "could not remove an object of the failed backup; prune removes it later");
        }
    }
}
