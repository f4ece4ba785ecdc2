//! A whole restore. Two shapes:
//!
//! - **staged** (`jobs > 1`, or a target that already existed): fetch, verify and decode into
//!   a local staging file, and only then run `pg_restore -j N`. A corrupted object or a wrong
//!   key fails before the target is touched. The staging file is removed on every path.
//! - **streamed** (`jobs = 1` into a database this run creates): stored bytes flow straight
//!   into `pg_restore`. A failure drops the database we created, so nothing half-restored
//!   remains.
//!
//! Both refuse up front an archive this host's `pg_restore` cannot read, or a target server
//! older than the archive. Cleanup after a failure or Ctrl-C is bounded and says what it does.

use std::io::{BufRead, BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dr_core::keys::Identities;
use dr_core::manifest::{Manifest, ObjectEntry, ObjectRole};
use dr_core::pg::{Connection, PgError, PgTools};
use dr_core::pipeline::child::{describe_status, ChildError};
use dr_core::pipeline::Control;
use dr_core::repo::Repository;
use serde::Serialize;

use crate::fetch::{fetch_decoded, FetchClock};
use crate::globals::{self, GlobalsReport};
use crate::select::{self, Selector};
use crate::target::{Target, TargetState};
use crate::RestoreError;

mod split;
pub use split::SectionSeconds;

/// Headroom asked of the staging disk beyond the archive itself.
const STAGING_MARGIN: u64 = 64 * 1024 * 1024;

/// How long pg_restore gets to stop after SIGTERM before its process group is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// How long dropping a database this run created may take before dr stops waiting and says
/// what to do by hand: Ctrl-C must not leave the operator staring at a silent terminal.
const DROP_LIMIT: Duration = Duration::from_secs(15);

pub struct Request {
    pub database: String,
    pub selector: Selector,
    pub destination: Destination,
    pub identities: Arc<Identities>,
    pub jobs: usize,
    pub staging_dir: PathBuf,
}

pub enum Destination {
    Database {
        conn: Connection,
        create: bool,
        force: bool,
        globals: bool,
        no_owner: bool,
        /// Skip GRANT/REVOKE (for a scratch server without the original roles).
        no_acl: bool,
    },
    /// The decrypted, decompressed pg_dump archive, for manual use.
    File(PathBuf),
}

/// What the caller decides for the engine: confirmation of destructive steps.
pub trait Confirm: Send + Sync {
    /// Asked before restoring over a database that holds relations (`--force`).
    fn replace_non_empty(&self, database: &str, relations: u64) -> bool;
}

/// Live state for progress displays.
#[derive(Debug, Default)]
pub struct Watch {
    pub pipeline: Control,
    /// Stored bytes of the object being fetched (for a download bar's length).
    pub stored_total: AtomicU64,
    pub toc_total: AtomicU64,
    pub toc_done: AtomicU64,
    pub phase: std::sync::Mutex<Phase>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    #[default]
    Preparing,
    Fetching,
    Restoring,
    Done,
}

impl Watch {
    fn set(&self, phase: Phase) {
        *self.phase.lock().expect("phase") = phase;
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub backup_id: String,
    pub database: String,
    pub backup_started_at: jiff::Timestamp,
    /// The target database URL (no password), or the output file.
    pub destination: String,
    /// `staged`, `streamed` or `output`.
    pub mode: &'static str,
    pub jobs: usize,
    pub target_created: bool,
    pub stored_bytes: u64,
    pub raw_bytes: u64,
    pub seconds: Seconds,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub globals: Option<GlobalsReport>,
}

/// Stage durations. Fetch and decode overlap (they stream); `total` is the measured RTO.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Seconds {
    pub fetch: f64,
    pub decrypt_decompress: f64,
    pub pg_restore: f64,
    pub total: f64,
    /// A split backup's steps: pre-data, the data archives side by side, post-data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sections: Option<SectionSeconds>,
}

/// What `--dry-run` found, touching nothing.
#[derive(Debug, Clone, Serialize)]
pub struct DryRun {
    pub backup_id: String,
    pub database: String,
    pub backup_started_at: jiff::Timestamp,
    pub classes: Vec<String>,
    pub stored_bytes: u64,
    pub raw_bytes: u64,
    pub destination: String,
    pub identity_can_decrypt: bool,
    /// What would happen to the destination.
    pub plan: String,
}

/// Picks the backup the request names.
pub async fn choose(repo: &Repository, req: &Request) -> Result<Manifest, RestoreError> {
    let listing = repo.list(Some(&req.database)).await?;
    for problem in &listing.unreadable {
        tracing::warn!(error = %problem, "skipping an unreadable manifest");
    }
    let place = format!(
        "{} (environment `{}`)",
        repo.storage().location(),
        repo.environment()
    );
    Ok(select::select(&listing.backups, &req.database, &req.selector, &place)?.clone())
}

fn object(m: &Manifest, role: ObjectRole) -> Result<&ObjectEntry, RestoreError> {
    m.object(role).ok_or_else(|| RestoreError::NoObject {
        backup: m.id.to_string(),
        role: match role {
            ObjectRole::Data => "data",
            ObjectRole::Globals => "globals",
            ObjectRole::RowCounts => "row counts",
            ObjectRole::Schema => "schema",
        },
    })
}

fn archive_major(m: &Manifest) -> u32 {
    m.pg_dump_version
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The oldest `pg_restore` among `found` that can read the archive of `m` (pg_restore reads
/// archives of its own and older majors only).
pub(crate) fn pg_restore_for(found: &[PgTools], m: &Manifest) -> Result<PgTools, RestoreError> {
    let major = archive_major(m);
    if let Some(tools) = found
        .iter()
        .filter(|t| t.major >= major)
        .min_by_key(|t| t.major)
    {
        return Ok(tools.clone());
    }
    match found.first() {
        None => Err(PgError::NoTools {
            needed: major.max(15),
        }
        .into()),
        Some(newest) => Err(RestoreError::PgRestoreTooOld {
            backup: m.id.to_string(),
            archive: m.pg_dump_version.clone(),
            major,
            newest: newest.version.clone(),
            dir: newest.dir.clone(),
        }),
    }
}

/// Finds the client tools and refuses an archive none of them can read, before any
/// connection is made.
async fn check_pg_restore(m: &Manifest) -> Result<(), RestoreError> {
    let found = blocking(|| Ok(PgTools::discover())).await?;
    pg_restore_for(&found, m).map(|_| ())
}

/// Connects to the target, refusing a server older than the archive: pg_restore emits what
/// the archive's major knows, which an older server rejects half way through.
async fn connect_target(conn: &Connection, m: &Manifest) -> Result<Target, RestoreError> {
    check_pg_restore(m).await?;
    let conn = conn.clone();
    let major = archive_major(m);
    let target = Target::connect(conn, major).await?;
    if target.server.major() < major {
        return Err(RestoreError::TargetOlderThanArchive(Box::new(
            crate::TargetOlderThanArchive {
                backup: m.id.to_string(),
                archive: m.pg_dump_version.clone(),
                major,
                pg_restore: target.tools.version.clone(),
                database: target.database().to_string(),
                server: target.server.text.clone(),
            },
        )));
    }
    Ok(target)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RestoreError> + Send + 'static,
) -> Result<T, RestoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking task panicked")
}

/// Proves the identity opens the object by decrypting its first chunk (about 64 KiB).
async fn check_key(
    repo: &Repository,
    m: &Manifest,
    data: &ObjectEntry,
    req: &Request,
) -> Result<(), RestoreError> {
    let key = repo.object_key(&m.database, &m.id, &data.name);
    let reader = crate::fetch::open(repo, m, data, &key).await?;
    let expected = crate::fetch::expected(m, data);
    let ids = req.identities.clone();
    let backup = m.id.to_string();
    let object_name = data.name.clone();
    blocking(move || {
        dr_core::pipeline::decode::check_key(
            tokio_util::io::SyncIoBridge::new(reader),
            &ids,
            &expected,
        )
        .map_err(|source| RestoreError::Decode {
            backup,
            object: object_name,
            source,
        })
    })
    .await
}

/// Says what a restore would do, checking the key against the real object.
pub async fn dry_run(repo: &Repository, req: &Request) -> Result<DryRun, RestoreError> {
    let m = choose(repo, req).await?;
    let data = object(&m, ObjectRole::Data)?.clone();
    check_key(repo, &m, &data, req).await?;

    let (destination, plan) = match &req.destination {
        Destination::File(path) => (
            path.display().to_string(),
            if m.is_split() {
                format!(
                    "would write the backup's {} pg_dump archives ({} bytes) into the new directory {}",
                    m.archives().count(),
                    m.database_bytes().0,
                    path.display()
                )
            } else {
                format!(
                    "would write the {} byte pg_dump archive to {}",
                    data.raw_bytes,
                    path.display()
                )
            },
        ),
        Destination::Database {
            conn,
            create,
            force,
            ..
        } => {
            let state = connect_target(conn, &m).await?.inspect().await?;
            let db = match &req.destination {
                Destination::Database { conn, .. } => conn.url.to_string(),
                Destination::File(_) => unreachable!(),
            };
            let plan = match (state.exists, state.relations, create, force) {
                (false, _, true, _) => "would create the database and restore into it".to_string(),
                (false, _, false, _) => "would refuse: the database does not exist (add --create)".to_string(),
                (true, 0, _, _) => "would restore into the existing empty database".to_string(),
                (true, n, _, true) => format!("would REPLACE objects in the existing database ({n} relations), after confirmation"),
                (true, n, _, false) => format!("would refuse: the database holds {n} relations (add --force to replace them)"),
            };
            (db, plan)
        }
    };
    Ok(DryRun {
        backup_id: m.id.to_string(),
        database: m.database.clone(),
        backup_started_at: m.started_at,
        classes: m.classes.clone(),
        stored_bytes: m.database_bytes().1,
        raw_bytes: m.database_bytes().0,
        destination,
        identity_can_decrypt: true,
        plan,
    })
}

/// Runs the restore the request describes.
pub async fn restore(
    repo: &Repository,
    req: Request,
    watch: Arc<Watch>,
    confirm: &dyn Confirm,
) -> Result<Summary, RestoreError> {
    let started = Instant::now();
    let m = choose(repo, &req).await?;
    let data = object(&m, ObjectRole::Data)?.clone();
    let (raw_bytes, stored_bytes) = m.database_bytes();
    tracing::info!(
        backup = %m.id, database = %m.database, taken_at = %m.started_at,
        stored_bytes, raw_bytes, archives = m.archives().count(),
        "restoring backup"
    );
    watch.stored_total.store(stored_bytes, Ordering::Relaxed);
    let mut summary = Summary {
        backup_id: m.id.to_string(),
        database: m.database.clone(),
        backup_started_at: m.started_at,
        destination: String::new(),
        mode: "staged",
        jobs: req.jobs,
        target_created: false,
        stored_bytes,
        raw_bytes,
        seconds: Seconds::default(),
        globals: None,
    };
    match &req.destination {
        Destination::File(path) => {
            summary.destination = path.display().to_string();
            summary.mode = "output";
            let (fetch, decode) = if m.is_split() {
                split::to_dir(repo, &m, &req, path, &watch).await?
            } else {
                to_file(repo, &m, &data, &req, path, &watch).await?
            };
            summary.seconds.fetch = fetch;
            summary.seconds.decrypt_decompress = decode;
        }
        Destination::Database {
            conn,
            create,
            force,
            globals,
            no_owner,
            no_acl,
        } => {
            summary.destination = conn.url.to_string();
            let target = Arc::new(connect_target(conn, &m).await?);
            let state = target.inspect().await?;
            let clean = check_target(&target, &state, *create, *force, confirm)?;
            let opts = PgRestoreOptions {
                jobs: req.jobs,
                clean,
                no_owner: *no_owner,
                no_acl: *no_acl,
                section: None,
            };
            if m.is_split() {
                summary.target_created = !state.exists;
                if state.exists {
                    summary.mode = "split-staged";
                    split::staged(
                        repo,
                        &m,
                        &req,
                        &target,
                        *globals,
                        opts,
                        &watch,
                        &mut summary,
                    )
                    .await?;
                } else {
                    summary.mode = "split-streamed";
                    split::streamed(
                        repo,
                        &m,
                        &req,
                        &target,
                        *globals,
                        opts,
                        &watch,
                        &mut summary,
                    )
                    .await?;
                }
            } else if req.jobs <= 1 && !state.exists {
                summary.mode = "streamed";
                summary.target_created = true;
                streamed(
                    repo,
                    &m,
                    &data,
                    &req,
                    &target,
                    *globals,
                    opts,
                    &watch,
                    &mut summary,
                )
                .await?;
            } else {
                summary.target_created = !state.exists;
                staged(
                    repo,
                    &m,
                    &data,
                    &req,
                    &target,
                    *globals,
                    opts,
                    &watch,
                    &mut summary,
                )
                .await?;
            }
        }
    }
    watch.set(Phase::Done);
    summary.seconds.total = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Decides whether the restore may go ahead; returns whether pg_restore must `--clean`.
fn check_target(
    target: &Target,
    state: &TargetState,
    create: bool,
    force: bool,
    confirm: &dyn Confirm,
) -> Result<bool, RestoreError> {
    let database = target.database().to_string();
    if !state.exists {
        return if create {
            Ok(false)
        } else {
            Err(RestoreError::TargetMissing { database })
        };
    }
    if state.relations == 0 {
        return Ok(false);
    }
    if !force {
        return Err(RestoreError::TargetNotEmpty {
            database,
            tables: state.relations,
        });
    }
    if !confirm.replace_non_empty(&database, state.relations) {
        return Err(RestoreError::NotConfirmed);
    }
    tracing::warn!(
        database,
        relations = state.relations,
        "replacing objects in a non-empty database (--force)"
    );
    Ok(true)
}

async fn to_file(
    repo: &Repository,
    m: &Manifest,
    data: &ObjectEntry,
    req: &Request,
    path: &Path,
    watch: &Watch,
) -> Result<(f64, f64), RestoreError> {
    if path.exists() {
        return Err(RestoreError::OutputExists {
            path: path.to_owned(),
        });
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    check_space(&dir, data.raw_bytes)?;
    let staging_err = |source| RestoreError::Staging {
        dir: dir.clone(),
        source,
    };
    let tmp = tempfile::Builder::new()
        .prefix(".dr-output-")
        .tempfile_in(&dir)
        .map_err(staging_err)?;
    let (fetch, decode, tmp) = decode_into(repo, m, data, req, tmp, watch).await?;
    // A staging file is read back at once and deleted, so only --output is synced to disk.
    tmp.as_file().sync_all().map_err(staging_err)?;
    tmp.persist_noclobber(path)
        .map_err(|e| staging_err(e.error))?;
    Ok((fetch, decode))
}

/// Fetches and decodes the data object into a temporary file, verified.
async fn decode_into(
    repo: &Repository,
    m: &Manifest,
    data: &ObjectEntry,
    req: &Request,
    tmp: tempfile::NamedTempFile,
    watch: &Watch,
) -> Result<(f64, f64, tempfile::NamedTempFile), RestoreError> {
    watch.set(Phase::Fetching);
    let start = Instant::now();
    let clock = FetchClock::default();
    let writer = BufWriter::with_capacity(1024 * 1024, tmp);
    let (_, writer) = fetch_decoded(
        repo,
        m,
        data,
        req.identities.clone(),
        writer,
        &watch.pipeline,
        &clock,
    )
    .await?;
    let tmp = writer.into_inner().map_err(|e| RestoreError::Staging {
        dir: req.staging_dir.clone(),
        source: e.into_error(),
    })?;
    let decode = start.elapsed().as_secs_f64();
    let fetch = clock
        .done_at()
        .map_or(decode, |t| t.duration_since(start).as_secs_f64());
    Ok((fetch, decode, tmp))
}

#[allow(clippy::too_many_arguments)]
async fn staged(
    repo: &Repository,
    m: &Manifest,
    data: &ObjectEntry,
    req: &Request,
    target: &Arc<Target>,
    with_globals: bool,
    opts: PgRestoreOptions,
    watch: &Arc<Watch>,
    summary: &mut Summary,
) -> Result<(), RestoreError> {
    check_space(&req.staging_dir, data.raw_bytes)?;
    let tmp = tempfile::Builder::new()
        .prefix("dr-restore-")
        .suffix(".dump")
        .tempfile_in(&req.staging_dir)
        .map_err(|source| RestoreError::Staging {
            dir: req.staging_dir.clone(),
            source,
        })?;
    tracing::info!(staging = %tmp.path().display(), "staging the verified archive before pg_restore");
    // The archive is verified whole before the target is created or touched.
    let (fetch, decode, tmp) = decode_into(repo, m, data, req, tmp, watch).await?;
    summary.seconds.fetch = fetch;
    summary.seconds.decrypt_decompress = decode;
    // The roles script is verified too before the target is touched.
    let globals_sql = match with_globals {
        true => Some(fetch_globals(repo, m, req, watch).await?),
        false => None,
    };
    if watch.pipeline.cancel.is_cancelled() {
        return Err(RestoreError::Cancelled);
    }
    if summary.target_created {
        target.create().await?;
    }
    // From here on, any failure drops the database this run created.
    let result = async {
        summary.globals = prepare_restore(target, globals_sql, watch).await?;
        let started = Instant::now();
        let path = tmp.path().to_owned();
        let result = run_pg_restore_file(target.clone(), opts, path, watch.clone()).await;
        summary.seconds.pg_restore = started.elapsed().as_secs_f64();
        result
    }
    .await;
    drop(tmp);
    if result.is_err() && summary.target_created {
        drop_created(target).await;
    }
    result
}

/// What staged and streamed restores do between creating the target and starting
/// pg_restore: the backup's roles first, then a last chance to stop.
async fn prepare_restore(
    target: &Arc<Target>,
    globals_sql: Option<String>,
    watch: &Watch,
) -> Result<Option<GlobalsReport>, RestoreError> {
    let globals = match globals_sql {
        Some(sql) => Some(apply_globals(target, sql).await?),
        None => None,
    };
    if watch.pipeline.cancel.is_cancelled() {
        return Err(RestoreError::Cancelled);
    }
    watch.set(Phase::Restoring);
    Ok(globals)
}

/// Drops a database this restore created, after a failure or Ctrl-C, so no half-restore
/// remains. Bounded: after [`DROP_LIMIT`] it stops waiting and says how to finish by hand.
async fn drop_created(target: &Arc<Target>) {
    let database = target.database().to_string();
    tracing::warn!(
        database,
        "dropping database {database} that this restore created (up to {} s)…",
        DROP_LIMIT.as_secs()
    );
    let by_hand = format!(
        "DROP DATABASE IF EXISTS {}",
        dr_core::pg::quote_ident(&database)
    );
    match tokio::time::timeout(DROP_LIMIT, target.drop_created()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(
            error = %e, database,
            "could not drop the database this restore created; drop it by hand: {by_hand}"
        ),
        Err(_) => tracing::error!(
            database,
            "dropping the database this restore created did not finish within {} s; check it and drop it by hand: {by_hand}",
            DROP_LIMIT.as_secs()
        ),
    }
}

async fn run_pg_restore_file(
    target: Arc<Target>,
    opts: PgRestoreOptions,
    path: PathBuf,
    watch: Arc<Watch>,
) -> Result<(), RestoreError> {
    let cancel = watch.pipeline.cancel.clone();
    let mut handle = tokio::task::spawn_blocking(move || {
        let total = count_toc(&target, &path)?;
        watch.toc_total.store(total, Ordering::Relaxed);
        let restore = PgRestore::spawn(&target, opts, Some(&path), watch.clone())?;
        Ok::<_, RestoreError>(restore)
    });
    let restore = tokio::select! {
        r = &mut handle => r.expect("pg_restore start panicked")?,
        _ = cancel.cancelled() => {
            // It may have started meanwhile: stop it rather than leave it running.
            if let Ok(Ok(restore)) = handle.await {
                let _ = wait_or_cancel(restore, &cancel).await;
            }
            return Err(RestoreError::Cancelled);
        }
    };
    wait_or_cancel(restore, &cancel).await
}

/// Waits for pg_restore; on cancellation stops it (and its parallel workers) first.
async fn wait_or_cancel(
    restore: PgRestore,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(), RestoreError> {
    let pid = restore.pid();
    let mut wait = tokio::task::spawn_blocking(move || restore.wait());
    tokio::select! {
        r = &mut wait => r.expect("pg_restore wait panicked"),
        _ = cancel.cancelled() => {
            stop_pg_restore(pid, wait).await;
            Err(RestoreError::Cancelled)
        }
    }
}

/// SIGTERM to pg_restore's process group (it and its `-j` workers), SIGKILL after
/// [`STOP_GRACE`]; waits a bounded time for it to be reaped.
async fn stop_pg_restore(pid: u32, mut wait: tokio::task::JoinHandle<Result<(), RestoreError>>) {
    tracing::warn!("stopping pg_restore…");
    signal_group(pid, rustix::process::Signal::TERM);
    if tokio::time::timeout(STOP_GRACE, &mut wait).await.is_ok() {
        return;
    }
    tracing::warn!(
        "pg_restore did not stop within {} s of SIGTERM; killing it",
        STOP_GRACE.as_secs()
    );
    signal_group(pid, rustix::process::Signal::KILL);
    let _ = tokio::time::timeout(STOP_GRACE, wait).await;
}

#[allow(clippy::too_many_arguments)]
async fn streamed(
    repo: &Repository,
    m: &Manifest,
    data: &ObjectEntry,
    req: &Request,
    target: &Arc<Target>,
    with_globals: bool,
    opts: PgRestoreOptions,
    watch: &Arc<Watch>,
    summary: &mut Summary,
) -> Result<(), RestoreError> {
    // A wrong key, or a damaged roles script, is found before anything is created.
    check_key(repo, m, data, req).await?;
    let globals_sql = match with_globals {
        true => Some(fetch_globals(repo, m, req, watch).await?),
        false => None,
    };
    target.create().await?;
    tracing::info!(
        database = target.database(),
        "streaming into a database this restore created; if anything fails it is dropped"
    );
    let result = async {
        summary.globals = prepare_restore(target, globals_sql, watch).await?;
        let start = Instant::now();
        let mut restore = {
            let t = target.clone();
            let w = watch.clone();
            blocking(move || PgRestore::spawn(&t, opts, None, w)).await?
        };
        let stdin = restore.child.stdin.take().expect("piped");
        let clock = FetchClock::default();
        let fetched = fetch_decoded(
            repo,
            m,
            data,
            req.identities.clone(),
            stdin,
            &watch.pipeline,
            &clock,
        )
        .await;
        let decode = start.elapsed().as_secs_f64();
        summary.seconds.fetch = clock
            .done_at()
            .map_or(decode, |t| t.duration_since(start).as_secs_f64());
        summary.seconds.decrypt_decompress = decode;
        match fetched {
            Ok((_, stdin)) => {
                drop(stdin);
                let r = wait_or_cancel(restore, &watch.pipeline.cancel).await;
                summary.seconds.pg_restore = start.elapsed().as_secs_f64();
                r
            }
            Err(e) => {
                let pid = restore.pid();
                stop_pg_restore(pid, tokio::task::spawn_blocking(move || restore.wait())).await;
                Err(e)
            }
        }
    }
    .await;
    if result.is_err() {
        drop_created(target).await;
    }
    result
}

/// Fetches and verifies the backup's roles script.
async fn fetch_globals(
    repo: &Repository,
    m: &Manifest,
    req: &Request,
    watch: &Watch,
) -> Result<String, RestoreError> {
    let entry = object(m, ObjectRole::Globals)?.clone();
    let (_, sql) = fetch_decoded(
        repo,
        m,
        &entry,
        req.identities.clone(),
        Vec::new(),
        &Control {
            cancel: watch.pipeline.cancel.clone(),
            progress: Default::default(),
        },
        &FetchClock::default(),
    )
    .await?;
    Ok(String::from_utf8_lossy(&sql).into_owned())
}

async fn apply_globals(target: &Arc<Target>, sql: String) -> Result<GlobalsReport, RestoreError> {
    let existing = globals::existing_roles(target).await?;
    let t = target.clone();
    let report = blocking(move || Ok(globals::apply(&t.conn, &t.tools, &sql, &existing)?)).await?;
    if !report.skipped_existing.is_empty() || report.skipped_statements > 0 {
        tracing::info!(
            roles = ?report.skipped_existing, statements = report.skipped_statements,
            "roles that already exist were left unchanged (their attributes, settings, memberships and grants)"
        );
    }
    if !report.created.is_empty() {
        tracing::info!(roles = ?report.created, "created roles from the backup");
    }
    for e in &report.errors {
        tracing::warn!(error = %e, "a globals statement failed");
    }
    Ok(report)
}

/// Fails early, naming the sizes, when the staging disk cannot hold the archive.
fn check_space(dir: &Path, raw_bytes: u64) -> Result<(), RestoreError> {
    let available = free_space(dir).map_err(|source| RestoreError::Staging {
        dir: dir.to_owned(),
        source,
    })?;
    let needed = raw_bytes + STAGING_MARGIN;
    if available < needed {
        return Err(RestoreError::NoSpace {
            dir: dir.to_owned(),
            needed,
            available,
        });
    }
    Ok(())
}

fn free_space(dir: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Signals the process group pg_restore leads (it was spawned as its own group). Our
/// waiter may have reaped it already; the group id is not reused while any member lives.
fn signal_group(pid: u32, signal: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process_group(pid, signal);
    }
}

#[derive(Debug, Clone, Copy)]
struct PgRestoreOptions {
    jobs: usize,
    clean: bool,
    no_owner: bool,
    no_acl: bool,
    /// `--section`: one step of a split backup's restore.
    section: Option<&'static str>,
}

/// A running `pg_restore`, its verbose stderr counted for progress and kept for errors.
struct PgRestore {
    child: Child,
    stderr: Option<JoinHandle<Vec<String>>>,
    secrets: Vec<String>,
}

impl PgRestore {
    fn spawn(
        target: &Target,
        opts: PgRestoreOptions,
        file: Option<&Path>,
        watch: Arc<Watch>,
    ) -> Result<PgRestore, RestoreError> {
        let mut cmd = target.conn.command(&target.tools.bin("pg_restore"));
        cmd.args(["--no-password", "--verbose"])
            .arg(format!("--dbname={}", target.conn.url.for_argv()));
        if opts.jobs > 1 && file.is_some() {
            cmd.arg(format!("--jobs={}", opts.jobs));
        }
        if opts.clean {
            cmd.args(["--clean", "--if-exists"]);
        }
        if let Some(section) = opts.section {
            cmd.arg(format!("--section={section}"));
        }
        if opts.no_owner {
            cmd.arg("--no-owner");
        }
        if opts.no_acl {
            cmd.arg("--no-acl");
        }
        if let Some(f) = file {
            cmd.arg(f);
        }
        cmd.stdin(if file.is_some() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(|source| ChildError::Spawn {
            program: "pg_restore".into(),
            source,
        })?;
        let stderr = child.stderr.take().expect("piped");
        let handle = std::thread::spawn(move || {
            let mut errors = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.starts_with("pg_restore: processing item")
                    || line.starts_with("pg_restore: creating ")
                    || line.starts_with("pg_restore: processing data for table")
                    || line.starts_with("pg_restore: finished item")
                {
                    watch.toc_done.fetch_add(1, Ordering::Relaxed);
                } else if (line.contains("error")
                    || line.contains("ERROR")
                    || line.contains("FATAL"))
                    && errors.len() < 20
                {
                    errors.push(line);
                }
            }
            errors
        });
        Ok(PgRestore {
            child,
            stderr: Some(handle),
            secrets: target.conn.secrets(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait(mut self) -> Result<(), RestoreError> {
        let status = self.child.wait().map_err(|source| ChildError::Spawn {
            program: "pg_restore".into(),
            source,
        })?;
        let errors = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        if status.success() {
            return Ok(());
        }
        let refs: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        Err(ChildError::Failed {
            program: "pg_restore".into(),
            status: describe_status(status),
            stderr: dr_core::redact::scrub(&errors.join(" | "), &refs),
        }
        .into())
    }
}

/// Number of entries in the archive's table of contents, for the progress bar.
fn count_toc(target: &Target, file: &Path) -> Result<u64, RestoreError> {
    let out = std::process::Command::new(target.tools.bin("pg_restore"))
        .arg("--list")
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ChildError::Spawn {
            program: "pg_restore".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(ChildError::Failed {
            program: "pg_restore --list".into(),
            status: describe_status(out.status),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .count() as u64)
}
