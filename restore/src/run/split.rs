//! Restoring a split backup (a schema archive and K data archives, see `dr_core::split`).
//!
//! - **streamed** (into a database this run creates): the schema archive is staged and
//!   verified (it is small), its pre-data restored; then every data archive streams from
//!   storage, verified as it goes, straight into its own `pg_restore`, all at once; then
//!   post-data (indexes, constraints) with `pg_restore -j N`. Any failure drops the database.
//! - **staged** (into an existing database): every archive is fetched and verified to local
//!   files before the target is touched; with `--force`, what the backup defines is dropped
//!   first (the drops `pg_restore --clean` would issue), then the same three steps.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use dr_core::manifest::{Manifest, ObjectEntry, ObjectRole};
use dr_core::pipeline::child::{describe_status, ChildError};
use dr_core::pipeline::Control;
use dr_core::repo::Repository;

use super::{
    blocking, check_key, check_space, decode_into, drop_created, fetch_globals, prepare_restore,
    stop_pg_restore, wait_or_cancel, PgRestore, PgRestoreOptions, Request, Summary, Watch,
};
use crate::fetch::{fetch_decoded, FetchClock};
use crate::target::Target;
use crate::RestoreError;

/// The schema archive and the data archives of a split backup, in manifest order.
pub(super) fn archives(m: &Manifest) -> Result<(ObjectEntry, Vec<ObjectEntry>), RestoreError> {
    let schema = super::object(m, ObjectRole::Schema)?.clone();
    let data: Vec<ObjectEntry> = m
        .objects
        .iter()
        .filter(|o| o.role == ObjectRole::Data)
        .cloned()
        .collect();
    if data.is_empty() {
        return Err(RestoreError::NoObject {
            backup: m.id.to_string(),
            role: "data",
        });
    }
    Ok((schema, data))
}

/// A local, verified copy of an archive, removed when dropped.
struct Staged {
    file: tempfile::NamedTempFile,
}

impl Staged {
    fn path(&self) -> PathBuf {
        self.file.path().to_owned()
    }
}

async fn stage(
    repo: &Repository,
    m: &Manifest,
    entry: &ObjectEntry,
    req: &Request,
    dir: &Path,
    watch: &Watch,
) -> Result<(Staged, f64), RestoreError> {
    let tmp = tempfile::Builder::new()
        .prefix("dr-restore-")
        .suffix(".dump")
        .tempfile_in(dir)
        .map_err(|source| RestoreError::Staging {
            dir: dir.to_owned(),
            source,
        })?;
    let (fetch, _, file) = decode_into(repo, m, entry, req, tmp, watch).await?;
    Ok((Staged { file }, fetch))
}

/// Streamed into a database this restore creates.
#[allow(clippy::too_many_arguments)]
pub(super) async fn streamed(
    repo: &Repository,
    m: &Manifest,
    req: &Request,
    target: &Arc<Target>,
    with_globals: bool,
    opts: PgRestoreOptions,
    watch: &Arc<Watch>,
    summary: &mut Summary,
) -> Result<(), RestoreError> {
    let (schema, data) = archives(m)?;
    let start = Instant::now();
    // A wrong key or a damaged schema or roles script is found before anything is created.
    check_key(repo, m, &data[0], req).await?;
    check_space(&req.staging_dir, schema.raw_bytes)?;
    let (schema_file, _) = stage(repo, m, &schema, req, &req.staging_dir, watch).await?;
    let globals_sql = match with_globals {
        true => Some(fetch_globals(repo, m, req, watch).await?),
        false => None,
    };
    if watch.pipeline.cancel.is_cancelled() {
        return Err(RestoreError::Cancelled);
    }
    target.create().await?;
    tracing::info!(
        database = target.database(),
        archives = data.len(),
        "streaming {} data archives side by side into a database this restore created; if anything fails it is dropped",
        data.len()
    );
    let result = async {
        summary.globals = prepare_restore(target, globals_sql, watch).await?;
        let schema_path = schema_file.path();
        set_toc_total(target, &schema_path, watch).await?;
        let sections = Sections::run_pre(target, opts, &schema_path, watch).await?;
        let clock = Instant::now();
        let fetched = stream_all(repo, m, &data, req, target, opts, watch).await;
        summary.seconds.fetch = fetched.as_ref().map_or(0.0, |f| *f);
        summary.seconds.decrypt_decompress = clock.elapsed().as_secs_f64();
        fetched?;
        sections
            .finish(target, opts, &schema_path, watch, summary, clock)
            .await
    }
    .await;
    drop(schema_file);
    summary.seconds.pg_restore = start.elapsed().as_secs_f64();
    if result.is_err() {
        drop_created(target).await;
    }
    result
}

/// Staged into an existing database (or one created after every archive is verified).
#[allow(clippy::too_many_arguments)]
pub(super) async fn staged(
    repo: &Repository,
    m: &Manifest,
    req: &Request,
    target: &Arc<Target>,
    with_globals: bool,
    opts: PgRestoreOptions,
    watch: &Arc<Watch>,
    summary: &mut Summary,
) -> Result<(), RestoreError> {
    let (schema, data) = archives(m)?;
    let (raw, _) = m.database_bytes();
    check_space(&req.staging_dir, raw)?;
    let fetch_started = Instant::now();
    let (schema_file, _) = stage(repo, m, &schema, req, &req.staging_dir, watch).await?;
    let mut data_files = Vec::new();
    for entry in &data {
        data_files.push(stage(repo, m, entry, req, &req.staging_dir, watch).await?.0);
    }
    summary.seconds.fetch = fetch_started.elapsed().as_secs_f64();
    summary.seconds.decrypt_decompress = summary.seconds.fetch;
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
    let result = async {
        summary.globals = prepare_restore(target, globals_sql, watch).await?;
        let schema_path = schema_file.path();
        set_toc_total(target, &schema_path, watch).await?;
        if opts.clean {
            drop_what_the_backup_defines(target, &schema_path).await?;
        }
        // Everything the backup defines is gone now: restore as into an empty database,
        // except that large objects of the same number are replaced (`--clean` in data).
        let load = PgRestoreOptions {
            clean: false,
            ..opts
        };
        let started = Instant::now();
        let sections = Sections::run_pre(target, load, &schema_path, watch).await?;
        let clock = Instant::now();
        let runs = data_files.iter().map(|f| {
            let data_opts = PgRestoreOptions {
                jobs: 1,
                clean: opts.clean,
                section: None,
                ..opts
            };
            run_file(target.clone(), data_opts, f.path(), watch.clone())
        });
        first_error(futures_util::future::join_all(runs).await)?;
        sections
            .finish(target, load, &schema_path, watch, summary, clock)
            .await?;
        summary.seconds.pg_restore = started.elapsed().as_secs_f64();
        Ok(())
    }
    .await;
    drop(schema_file);
    drop(data_files);
    if result.is_err() && summary.target_created {
        drop_created(target).await;
    }
    result
}

/// Times of the three steps; pre-data is done when this exists.
struct Sections {
    pre: f64,
}

impl Sections {
    async fn run_pre(
        target: &Arc<Target>,
        opts: PgRestoreOptions,
        schema: &Path,
        watch: &Arc<Watch>,
    ) -> Result<Sections, RestoreError> {
        let t = Instant::now();
        let pre = PgRestoreOptions {
            jobs: 1,
            section: Some("pre-data"),
            ..opts
        };
        run_file(target.clone(), pre, schema.to_owned(), watch.clone()).await?;
        Ok(Sections {
            pre: t.elapsed().as_secs_f64(),
        })
    }

    async fn finish(
        self,
        target: &Arc<Target>,
        opts: PgRestoreOptions,
        schema: &Path,
        watch: &Arc<Watch>,
        summary: &mut Summary,
        data_started: Instant,
    ) -> Result<(), RestoreError> {
        let data = data_started.elapsed().as_secs_f64();
        let t = Instant::now();
        let post = PgRestoreOptions {
            section: Some("post-data"),
            ..opts
        };
        run_file(target.clone(), post, schema.to_owned(), watch.clone()).await?;
        summary.seconds.sections = Some(SectionSeconds {
            pre_data: self.pre,
            data,
            post_data: t.elapsed().as_secs_f64(),
        });
        Ok(())
    }
}

/// Durations of a split restore's steps (pg_restore's sections).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SectionSeconds {
    pub pre_data: f64,
    /// Every data archive, streamed (or read) side by side.
    pub data: f64,
    pub post_data: f64,
}

async fn set_toc_total(
    target: &Arc<Target>,
    schema: &Path,
    watch: &Arc<Watch>,
) -> Result<(), RestoreError> {
    let t = target.clone();
    let path = schema.to_owned();
    let total = blocking(move || super::count_toc(&t, &path)).await?;
    watch.toc_total.store(total, Ordering::Relaxed);
    Ok(())
}

/// One pg_restore of a local file, stopped on cancellation.
async fn run_file(
    target: Arc<Target>,
    opts: PgRestoreOptions,
    path: PathBuf,
    watch: Arc<Watch>,
) -> Result<(), RestoreError> {
    let cancel = watch.pipeline.cancel.clone();
    let restore = {
        let w = watch.clone();
        blocking(move || PgRestore::spawn(&target, opts, Some(&path), w)).await?
    };
    wait_or_cancel(restore, &cancel).await
}

/// Every data archive from storage into its own `pg_restore`, concurrently. The first
/// failure stops the others. Returns when the last stored byte arrived (seconds).
async fn stream_all(
    repo: &Repository,
    m: &Manifest,
    data: &[ObjectEntry],
    req: &Request,
    target: &Arc<Target>,
    opts: PgRestoreOptions,
    watch: &Arc<Watch>,
) -> Result<f64, RestoreError> {
    let group = Control {
        cancel: watch.pipeline.cancel.child_token(),
        progress: watch.pipeline.progress.clone(),
    };
    let start = Instant::now();
    let runs = data.iter().map(|entry| {
        let group = &group;
        async move {
            let r = stream_one(repo, m, entry, req, target, opts, watch, group).await;
            if r.is_err() {
                group.cancel.cancel();
            }
            r.map(|done| done.map_or(0.0, |t| t.duration_since(start).as_secs_f64()))
        }
    });
    let results = futures_util::future::join_all(runs).await;
    if watch.pipeline.cancel.is_cancelled() {
        return Err(RestoreError::Cancelled);
    }
    let fetched = results
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .fold(0.0, f64::max);
    first_error(results)?;
    Ok(fetched)
}

#[allow(clippy::too_many_arguments)]
async fn stream_one(
    repo: &Repository,
    m: &Manifest,
    entry: &ObjectEntry,
    req: &Request,
    target: &Arc<Target>,
    opts: PgRestoreOptions,
    watch: &Arc<Watch>,
    group: &Control,
) -> Result<Option<Instant>, RestoreError> {
    let data_opts = PgRestoreOptions {
        jobs: 1,
        section: None,
        ..opts
    };
    let mut restore = {
        let t = target.clone();
        let w = watch.clone();
        blocking(move || PgRestore::spawn(&t, data_opts, None, w)).await?
    };
    let stdin = restore.child.stdin.take().expect("piped");
    let clock = FetchClock::default();
    let fetched = fetch_decoded(repo, m, entry, req.identities.clone(), stdin, group, &clock).await;
    match fetched {
        Ok((_, stdin)) => {
            drop(stdin);
            wait_or_cancel(restore, &group.cancel).await?;
            Ok(clock.done_at())
        }
        Err(e) => {
            let pid = restore.pid();
            stop_pg_restore(pid, tokio::task::spawn_blocking(move || restore.wait())).await;
            Err(e)
        }
    }
}

/// The first failure that is not the cancellation another failure caused.
fn first_error<T>(results: Vec<Result<T, RestoreError>>) -> Result<(), RestoreError> {
    let mut errors: Vec<RestoreError> = results.into_iter().filter_map(Result::err).collect();
    if errors.is_empty() {
        return Ok(());
    }
    let i = errors
        .iter()
        .position(|e| !matches!(e, RestoreError::Cancelled))
        .unwrap_or(0);
    Err(errors.swap_remove(i))
}

/// Drops what the backup's schema defines from an existing database, in the order
/// `pg_restore --clean --if-exists` would (constraints and indexes before their tables), in
/// one transaction. pg_restore has no drop-only mode: its script's drop statements come
/// before the first object's header comment, after the session settings.
async fn drop_what_the_backup_defines(
    target: &Arc<Target>,
    schema: &Path,
) -> Result<(), RestoreError> {
    let t = target.clone();
    let path = schema.to_owned();
    let script = blocking(move || {
        let out = std::process::Command::new(t.tools.bin("pg_restore"))
            .args([
                "--clean",
                "--if-exists",
                "--section=pre-data",
                "--section=post-data",
            ])
            .arg("--file=-")
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|source| ChildError::Spawn {
                program: "pg_restore".into(),
                source,
            })?;
        if !out.status.success() {
            return Err(ChildError::Failed {
                program: "pg_restore --clean --file=-".into(),
                status: describe_status(out.status),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            }
            .into());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .await?;
    let sql = drop_statements(&script);
    tracing::warn!(
        database = target.database(),
        statements = sql.lines().filter(|l| !l.starts_with("SET ")).count(),
        "dropping what the backup defines before restoring it (--force)"
    );
    let client = target.session("dr restore").await?;
    client
        .execute(&format!("BEGIN;\n{sql}\nCOMMIT;"))
        .await
        .map_err(RestoreError::from)
}

/// The session settings and drop statements at the head of a `pg_restore --clean` script.
pub(crate) fn drop_statements(script: &str) -> String {
    let mut out = String::new();
    let mut in_body = false;
    for line in script.lines() {
        let header = line.is_empty() || line.starts_with("--") || line.starts_with('\\');
        if !in_body {
            if header {
                continue;
            }
            in_body = true;
        }
        if line.starts_with("--") {
            break;
        }
        if line.is_empty() || line.starts_with('\\') {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Writes every archive of a split backup, decoded and verified, into `dir`, which must not
/// exist: `schema.dump`, `data.dump`, `data-2.dump`, ... (see README, break glass).
pub(super) async fn to_dir(
    repo: &Repository,
    m: &Manifest,
    req: &Request,
    dir: &Path,
    watch: &Watch,
) -> Result<(f64, f64), RestoreError> {
    if dir.exists() {
        return Err(RestoreError::OutputExists {
            path: dir.to_owned(),
        });
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    let (raw, _) = m.database_bytes();
    check_space(&parent, raw)?;
    let staging_err = |source| RestoreError::Staging {
        dir: parent.clone(),
        source,
    };
    // Built beside the destination and renamed into place: no half-written directory.
    let tmp = tempfile::Builder::new()
        .prefix(".dr-output-")
        .tempdir_in(&parent)
        .map_err(staging_err)?;
    let start = Instant::now();
    for entry in m.archives() {
        let (staged, _) = stage(repo, m, entry, req, tmp.path(), watch).await?;
        staged.file.as_file().sync_all().map_err(staging_err)?;
        let name = entry.name.trim_end_matches(".zst.age");
        staged
            .file
            .persist(tmp.path().join(name))
            .map_err(|e| staging_err(e.error))?;
    }
    let secs = start.elapsed().as_secs_f64();
    let tmp = tmp.keep();
    std::fs::rename(&tmp, dir).map_err(staging_err)?;
    Ok((secs, secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_statements_are_the_scripts_head() {
        let script = "--\n-- PostgreSQL database dump\n--\n\n\\restrict abc\n\n-- Dumped from x\n\nSET statement_timeout = 0;\nSELECT pg_catalog.set_config('search_path', '', false);\n\nALTER TABLE IF EXISTS ONLY public.c DROP CONSTRAINT IF EXISTS c_fk;\nDROP TABLE IF EXISTS public.p;\n--\n-- Name: p; Type: TABLE\n--\n\nCREATE TABLE public.p ();\n";
        assert_eq!(
            drop_statements(script),
            "SET statement_timeout = 0;\nSELECT pg_catalog.set_config('search_path', '', false);\nALTER TABLE IF EXISTS ONLY public.c DROP CONSTRAINT IF EXISTS c_fk;\nDROP TABLE IF EXISTS public.p;\n"
        );
    }
}
