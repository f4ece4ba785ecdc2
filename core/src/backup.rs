//! One backup of one database, end to end: find matching client tools, stream the database
//! and its cluster's globals through the pipeline, then write the manifest last.
//!
//! Used by `dr backup` and by the agent's schedules alike.

use std::time::Instant;

use jiff::Timestamp;

use crate::config::{Config, DatabaseConfig};
use crate::manifest::{
    BackupId, Compression, Encryption, Manifest, ObjectEntry, ObjectRole, RestoreStep,
    FORMAT_SPLIT, FORMAT_VERSION,
};
use crate::pg::{Connection, PgError, PgTools, ServerVersion};
use crate::pipeline::child::ChildError;
use crate::pipeline::encode::EncodeOptions;
use crate::pipeline::{self, Control, PipelineError, Stored};
use crate::repo::{Repository, DATA_OBJECT, GLOBALS_OBJECT, ROW_COUNTS_OBJECT};
use crate::snapshot::{CountsUnavailable, HeldSnapshot};
use crate::split;
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
    let cpu_before = process_cpu_seconds();
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
    // A split dump needs it too: every pg_dump of the backup reads the same snapshot.
    let held = if db.drill.is_some() || db.continuous.is_some() || db.dump_jobs() > 1 {
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
    let parts = match &held {
        Some(h) if db.dump_jobs() > 1 => split_plan(h, db).await,
        _ => None,
    };
    let lock_wait = config.lock_wait_timeout(db);
    let dumped = match (&parts, snapshot_id.as_deref()) {
        (Some(parts), Some(snapshot)) => {
            dump_split(
                repo,
                &conn,
                &tools,
                database,
                snapshot,
                lock_wait,
                parts,
                &id,
                &recipients,
                opts,
                control,
            )
            .await
        }
        _ => {
            let data_key = repo.object_key(database, &id, DATA_OBJECT);
            match conn.spawn_pg_dump(&tools, snapshot_id.as_deref(), lock_wait) {
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
                .map(|stored| Dumped {
                    objects: vec![entry(
                        ObjectRole::Data,
                        DATA_OBJECT,
                        "pg_dump-custom",
                        &stored,
                        false,
                    )],
                    keys: vec![data_key],
                    restore_order: Vec::new(),
                })
                .map_err(|source| BackupError::Pipeline {
                    what: "the database dump (pg_dump)",
                    source,
                }),
                Err(e) => Err(e.into()),
            }
        }
    };
    let dumped = match dumped {
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
    let (raw_bytes, stored_bytes) = dumped
        .objects
        .iter()
        .fold((0, 0), |(r, s), o| (r + o.raw_bytes, s + o.stored_bytes));
    let data_keys: Vec<&str> = dumped.keys.iter().map(String::as_str).collect();

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
            discard(repo, &data_keys).await;
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
                    discard(repo, &[&data_keys[..], &[&globals_key]].concat()).await;
                    return Err(BackupError::Pipeline {
                        what: "the row counts",
                        source,
                    });
                }
            }
        }
        None => None,
    };

    let split = !dumped.restore_order.is_empty();
    let mut objects = dumped.objects;
    objects.extend([entry(
        ObjectRole::Globals,
        GLOBALS_OBJECT,
        "sql",
        &globals.0,
        globals.1,
    )]);
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
        format: if split { FORMAT_SPLIT } else { FORMAT_VERSION },
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
        restore_order: dumped.restore_order,
    };
    if let Err(e) = repo.commit(&manifest).await {
        discard(
            repo,
            &[&data_keys[..], &[&globals_key, &counts_key]].concat(),
        )
        .await;
        return Err(BackupError::Commit(e));
    }
    let secs = clock.elapsed().as_secs_f64();
    tracing::info!(
        backup = %manifest.id,
        database,
        classes = ?manifest.classes,
        archives = data_keys.len(),
        // dr's own work (zstd, age, sha256, upload), not pg_dump's; the agent's other jobs
        // count too when they overlap.
        dr_cpu_seconds = format!("{:.1}", process_cpu_seconds() - cpu_before),
        raw_bytes,
        stored_bytes,
        ratio = format!("{:.2}", raw_bytes as f64 / stored_bytes.max(1) as f64),
        seconds = format!("{secs:.1}"),
        "backup complete"
    );
    Ok(manifest)
}

/// The database's archives as stored, their keys, and (split) the order to restore them.
struct Dumped {
    objects: Vec<ObjectEntry>,
    keys: Vec<String>,
    restore_order: Vec<RestoreStep>,
}

/// The data archives for a split backup, or `None` for one archive: the database is under
/// `split_min_mib`, its tables fit one archive, or they could not be listed.
async fn split_plan(held: &HeldSnapshot, db: &DatabaseConfig) -> Option<Vec<split::Part>> {
    let tables = match held.tables().await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "could not list tables to split the dump; dumping one archive");
            return None;
        }
    };
    let total: u64 = tables.iter().map(|t| t.bytes).sum();
    if total < db.split_min_mib.saturating_mul(1024 * 1024) {
        tracing::debug!(
            total,
            split_min_mib = db.split_min_mib,
            "small database: one archive"
        );
        return None;
    }
    let parts = split::plan(&tables, db.dump_jobs() as usize);
    (parts.len() > 1).then_some(parts)
}

/// Dumps a split backup: the schema archive and each data archive through its own pg_dump
/// and pipeline, all at once. The first failure stops the others; nothing stays stored.
#[allow(clippy::too_many_arguments)]
async fn dump_split(
    repo: &Repository,
    conn: &Connection,
    tools: &PgTools,
    database: &str,
    snapshot: &str,
    lock_wait: std::time::Duration,
    data_parts: &[split::Part],
    id: &BackupId,
    recipients: &crate::keys::Recipients,
    opts: EncodeOptions,
    control: &Control,
) -> Result<Dumped, BackupError> {
    // The data pipelines share the cores (see split_worker_threads).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_pipeline = EncodeOptions {
        level: opts.level,
        threads: crate::pipeline::encode::split_worker_threads(
            opts.threads,
            cores,
            data_parts.len(),
        ),
    };
    let all: Vec<(split::Part, String, ObjectRole)> = std::iter::once((
        split::Part::Schema,
        split::SCHEMA_OBJECT.to_string(),
        ObjectRole::Schema,
    ))
    .chain(
        data_parts
            .iter()
            .enumerate()
            .map(|(i, p)| (p.clone(), split::data_object(i), ObjectRole::Data)),
    )
    .collect();
    // One token for the backup's pg_dumps: a failure in one cancels the rest.
    let group = Control {
        cancel: control.cancel.child_token(),
        progress: control.progress.clone(),
    };
    let keys: Vec<String> = all
        .iter()
        .map(|(_, name, _)| repo.object_key(database, id, name))
        .collect();
    tracing::info!(
        archives = data_parts.len(),
        "dumping the schema and {} data archives concurrently from one snapshot",
        data_parts.len()
    );
    let runs = all.iter().zip(&keys).map(|((part, _, role), key)| {
        let group = &group;
        let opts = if *role == ObjectRole::Schema {
            opts
        } else {
            per_pipeline
        };
        async move {
            let result = match conn.spawn_pg_dump_part(tools, snapshot, lock_wait, part) {
                Ok(source) => pipeline::encrypt_to_storage(
                    source,
                    pipeline::PG_DUMP_CUSTOM,
                    repo.storage(),
                    key,
                    recipients,
                    opts,
                    group,
                )
                .await
                .map_err(|source| BackupError::Pipeline {
                    what: match role {
                        ObjectRole::Schema => {
                            "the schema dump (pg_dump --section=pre-data --section=post-data)"
                        }
                        _ => "a data dump (pg_dump --data-only)",
                    },
                    source,
                }),
                Err(e) => Err(e.into()),
            };
            if result.is_err() {
                group.cancel.cancel();
            }
            result
        }
    });
    let results = futures_util::future::join_all(runs).await;
    if results.iter().any(Result::is_err) {
        let stored: Vec<&str> = results
            .iter()
            .zip(&keys)
            .filter(|(r, _)| r.is_ok())
            .map(|(_, k)| k.as_str())
            .collect();
        discard(repo, &stored).await;
        // The failure that started it, not the cancellations it caused (unless the
        // backup itself was cancelled).
        let mut errors: Vec<BackupError> = results.into_iter().filter_map(Result::err).collect();
        let first = errors.iter().position(|e| !e.is_cancelled()).unwrap_or(0);
        return Err(errors.swap_remove(first));
    }
    let objects: Vec<ObjectEntry> = results
        .into_iter()
        .zip(&all)
        .map(|(r, (_, name, role))| {
            entry(*role, name, "pg_dump-custom", &r.expect("checked"), false)
        })
        .collect();
    let data_names: Vec<String> = objects
        .iter()
        .filter(|o| o.role == ObjectRole::Data)
        .map(|o| o.name.clone())
        .collect();
    let step = |section: &str, objects: Vec<String>| RestoreStep {
        section: section.into(),
        objects,
    };
    Ok(Dumped {
        objects,
        keys,
        restore_order: vec![
            step("pre-data", vec![split::SCHEMA_OBJECT.into()]),
            step("data", data_names),
            step("post-data", vec![split::SCHEMA_OBJECT.into()]),
        ],
    })
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

/// User and system CPU time this process has used, its threads included, children not.
fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Removes objects of a backup that will never get a manifest.
async fn discard(repo: &Repository, keys: &[&str]) {
    for key in keys {
        if let Err(e) = repo.storage().delete(key).await {
            tracing::warn!(key, error = %e, "could not remove an object of the failed backup; prune removes it later");
        }
    }
}
