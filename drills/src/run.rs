//! One drill, start to report.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use dr_continuous::pitr::{Plan, ToTime};
use dr_core::config::{Config, DatabaseConfig, DrillDurability, DrillSample, DrillTarget};
use dr_core::keys::Identities;
use dr_core::manifest::{BackupId, Manifest, ObjectRole};
use dr_core::pg::counts::count_rows;
use dr_core::pg::{ConnUrl, Connection};
use dr_core::repo::Repository;
use dr_restore::run::{Confirm, Destination, Request, Watch};
use dr_restore::select::Selector;
use dr_restore::target::Target;
use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use crate::ephemeral::EphemeralCluster;
use crate::report::{self, Check, DrillReport, Stages};
use crate::DrillError;

/// Drills never confirm replacing a database: they only restore into ones they create.
struct Never;

impl Confirm for Never {
    fn replace_non_empty(&self, _: &str, _: u64) -> bool {
        false
    }
}

/// The scratch place a drill restores into, and how to clean it up.
enum Scratch {
    Ephemeral(EphemeralCluster),
    Server,
}

/// Runs one drill of `db` and stores its report. Returns the report whether the drill
/// passed or failed; errors only when the drill cannot be described at all.
pub async fn run(
    repo: &Repository,
    config: &Config,
    db: &DatabaseConfig,
    identities: Arc<Identities>,
    cancel: CancellationToken,
) -> Result<DrillReport, DrillError> {
    let drill = db
        .drill
        .as_ref()
        .ok_or_else(|| DrillError::NotConfigured(db.name.to_string()))?;
    let started = Instant::now();
    let started_at = Timestamp::now();
    let id = BackupId::new(started_at).to_string();
    let mut r = DrillReport {
        format: 1,
        id: id.clone(),
        environment: config.environment.to_string(),
        database: db.name.to_string(),
        backup_id: None,
        backup_started_at: None,
        target: match drill.target {
            DrillTarget::Ephemeral => "ephemeral".into(),
            DrillTarget::Server(_) => "server".into(),
        },
        started_at,
        finished_at: started_at,
        passed: false,
        rto_seconds: 0.0,
        rto_objective_seconds: db.rto.as_ref().map(|d| d.seconds_at(started_at) as f64),
        rto_breached: false,
        rto_representative: !matches!(
            (&drill.target, drill.durability),
            (DrillTarget::Ephemeral, DrillDurability::Off)
        ),
        stages: Stages::default(),
        checks: Vec::new(),
        error: None,
        recovery_point: None,
        achieved_rpo_seconds: None,
    };
    tracing::info!(drill = %id, database = %db.name, target = %r.target, "drill started");
    let outcome = attempt(repo, db, identities, cancel, &mut r, started).await;
    r.finished_at = Timestamp::now();
    r.rto_seconds = started.elapsed().as_secs_f64();
    match outcome {
        Ok(()) => r.passed = r.checks.iter().all(|c| c.passed),
        Err(e) => {
            // The full error (it may quote table names and row values) goes to the local
            // log only; the report gets its category.
            tracing::error!(drill = %id, database = %db.name, error = %e, "drill failed");
            r.error = Some(report::failure_summary(&e));
            r.passed = false;
        }
    }
    r.rto_breached = r.rto_objective_seconds.is_some_and(|o| r.rto_seconds > o);
    if let Err(e) = report::store(repo, &r).await {
        tracing::error!(error = %e, "could not store the drill report");
    }
    if !r.rto_representative {
        tracing::warn!(drill = %id, database = %db.name, "the RTO is not representative: the ephemeral cluster ran with durability = \"off\"");
    }
    if r.passed && !r.rto_breached {
        tracing::info!(drill = %id, database = %db.name, rto_seconds = format!("{:.1}", r.rto_seconds), "drill passed");
    } else {
        tracing::error!(drill = %id, database = %db.name, rto_seconds = format!("{:.1}", r.rto_seconds), passed = r.passed, rto_breached = r.rto_breached, error = r.error.as_deref().unwrap_or(""), "drill failed");
    }
    Ok(r)
}

async fn attempt(
    repo: &Repository,
    db: &DatabaseConfig,
    identities: Arc<Identities>,
    cancel: CancellationToken,
    r: &mut DrillReport,
    started: Instant,
) -> Result<(), DrillError> {
    let drill = db.drill.as_ref().expect("checked");
    let listing = repo.list(Some(db.name.as_str())).await?;
    // With continuous capture the drill restores to the newest stored change: the base the
    // plan chooses, then the changes after it.
    let plan = match &db.continuous {
        Some(_) => continuous_plan(repo, db, &listing.backups).await,
        None => None,
    };
    let m = match &plan {
        Some(p) => p.base.clone(),
        None => pick(&listing.backups, drill.sample, drill.sample_size).ok_or_else(|| {
            dr_restore::RestoreError::Select(dr_restore::select::SelectError::NoBackups {
                database: db.name.to_string(),
                place: repo.storage().location(),
            })
        })?,
    };
    r.backup_id = Some(m.id.to_string());
    r.backup_started_at = Some(m.started_at);

    let major = if m.server_version_num >= 100_000 {
        m.server_version_num / 10_000
    } else {
        m.server_version_num / 100
    };
    let (scratch, conn) = match &drill.target {
        DrillTarget::Ephemeral => {
            let (run_as, durability) = (drill.run_as.clone(), drill.durability);
            let cluster = tokio::task::spawn_blocking(move || {
                EphemeralCluster::start_with(major, &run_as, durability)
            })
            .await
            .expect("ephemeral start panicked")?;
            let url =
                ConnUrl::try_from(cluster.url(db.name.as_str())).map_err(DrillError::Scratch)?;
            let conn = Connection::new(&url, None)?;
            (Scratch::Ephemeral(cluster), conn)
        }
        DrillTarget::Server(url) => {
            let admin = Connection::new(url, drill.password_file.as_deref())?;
            let source = Connection::new(&db.url, db.password_file.as_deref())?;
            let allow = drill.allow_same_server;
            let name = format!(
                "dr_drill_{}_{}",
                db.name,
                r.id.to_lowercase().replace('-', "_")
            );
            let target = admin.for_database(&name);
            refuse_same_server_or_existing(&source, target.clone(), major, allow).await?;
            (Scratch::Server, target)
        }
    };
    // One discovery of client tools for every check and the cleanup.
    let scratch_target = Arc::new(Target::connect(conn.clone(), major).await?);
    r.stages.prepare = started.elapsed().as_secs_f64();

    let server = matches!(scratch, Scratch::Server);
    let watch = Arc::new(Watch::default());
    let forward = watch.pipeline.cancel.clone();
    let cancel_task = tokio::spawn(async move {
        cancel.cancelled().await;
        forward.cancel();
    });
    let request = Request {
        database: db.name.to_string(),
        selector: Selector::Id(m.id.to_string()),
        destination: Destination::Database {
            conn: conn.clone(),
            create: true,
            force: false,
            // An ephemeral cluster gets the backup's roles; a shared scratch server is not
            // given roles, so ownership and privileges are skipped there.
            globals: !server,
            no_owner: server,
            no_acl: server,
        },
        identities: identities.clone(),
        jobs: std::thread::available_parallelism().map_or(2, |n| n.get()),
        staging_dir: std::env::temp_dir(),
    };
    let restored = dr_restore::run::restore(repo, request, watch, &Never).await;
    cancel_task.abort();
    let summary = restored?;
    r.stages.fetch = summary.seconds.fetch;
    r.stages.decrypt_decompress = summary.seconds.decrypt_decompress;
    r.stages.restore = summary.seconds.pg_restore;
    r.stages.restore_sections =
        summary
            .seconds
            .sections
            .as_ref()
            .map(|s| crate::report::RestoreSections {
                pre_data: s.pre_data,
                data: s.data,
                post_data: s.post_data,
                data_archives: m
                    .objects
                    .iter()
                    .filter(|o| o.role == dr_core::manifest::ObjectRole::Data)
                    .count(),
            });
    r.checks.push(Check {
        name: "pg_restore".into(),
        passed: true,
        detail: "pg_restore reported no errors".into(),
    });

    let checks_started = Instant::now();
    let replay = plan.as_ref().map(|p| (p, &conn));
    let result = run_checks(repo, &m, db, identities, &scratch_target, replay, r).await;
    r.stages.checks = checks_started.elapsed().as_secs_f64() - r.stages.replay;

    match scratch {
        Scratch::Ephemeral(mut cluster) => {
            tokio::task::spawn_blocking(move || cluster.stop())
                .await
                .expect("stop panicked");
        }
        Scratch::Server if summary.target_created => {
            if let Err(e) = scratch_target.drop_created().await {
                tracing::error!(error = %e, database = conn.url.dbname(), "could not drop the drill's database; drop it by hand");
            }
        }
        Scratch::Server => {}
    }
    result
}

/// The point-in-time plan to the newest stored change, or `None` (logged) when there is no
/// usable base or change stream yet: the drill then restores the newest backup alone.
async fn continuous_plan(
    repo: &Repository,
    db: &DatabaseConfig,
    backups: &[Manifest],
) -> Option<Plan> {
    let segments = match dr_continuous::pitr::list_segments(repo, db.name.as_str()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(database = %db.name, error = %e, "cannot list change segments; drilling the newest backup alone");
            return None;
        }
    };
    match dr_continuous::pitr::plan(db.name.as_str(), backups, segments, ToTime::Latest) {
        Ok(plan) => Some(plan),
        Err(e) => {
            tracing::warn!(database = %db.name, error = %e, "no point-in-time drill possible; drilling the newest backup alone");
            None
        }
    }
}

/// The newest backup, or a random one of the newest `n`.
fn pick(backups: &[Manifest], sample: DrillSample, n: usize) -> Option<Manifest> {
    match sample {
        DrillSample::Latest => backups.last().cloned(),
        DrillSample::RandomRecent => {
            let recent = &backups[backups.len().saturating_sub(n.max(1))..];
            if recent.is_empty() {
                return None;
            }
            Some(recent[rand::random::<u64>() as usize % recent.len()].clone())
        }
    }
}

/// Refuses the backed-up server itself (unless allowed) and an existing database name.
async fn refuse_same_server_or_existing(
    source: &Connection,
    target: Connection,
    major: u32,
    allow_same_server: bool,
) -> Result<(), DrillError> {
    let target = Target::connect(target, major).await?;
    const IDENT: &str = "SELECT system_identifier::text FROM pg_control_system()";
    let scratch_id: String = target
        .admin_session()
        .await?
        .query_one(IDENT, &[])
        .await?
        .get(0);
    let source_id = match source.connect("dr drill").await {
        Ok(c) => c.query_one(IDENT, &[]).await.map(|r| r.get::<_, String>(0)),
        Err(e) => Err(e),
    };
    let same = match source_id {
        Ok(id) => id == scratch_id,
        // Without access to the source's identifier, compare where the URLs point.
        Err(_) => host_port(&source.url) == host_port(&target.conn.for_database("postgres").url),
    };
    if same && !allow_same_server {
        return Err(DrillError::SameServer(scratch_id));
    }
    if target.inspect().await?.exists {
        return Err(DrillError::Exists(target.database().to_string()));
    }
    Ok(())
}

fn host_port(url: &ConnUrl) -> Option<(String, u16)> {
    let u = url::Url::parse(url.for_argv()).ok()?;
    Some((u.host_str()?.to_string(), u.port().unwrap_or(5432)))
}

async fn run_checks(
    repo: &Repository,
    m: &Manifest,
    db: &DatabaseConfig,
    identities: Arc<Identities>,
    target: &Arc<Target>,
    replay: Option<(&Plan, &Connection)>,
    r: &mut DrillReport,
) -> Result<(), DrillError> {
    let drill = db.drill.as_ref().expect("checked");
    // Row counts recorded in the dump's own snapshot.
    match m.object(ObjectRole::RowCounts) {
        None => r.checks.push(Check {
            name: "row counts".into(),
            passed: true,
            detail: match &m.row_counts_unavailable {
                Some(reason) => format!("row counts unavailable: {reason} at backup time"),
                None => "skipped: the backup recorded no row counts (taken before drills were configured)".into(),
            },
        }),
        Some(entry) => {
            let (_, json) = dr_restore::fetch::fetch_decoded(
                repo,
                m,
                entry,
                identities.clone(),
                Vec::new(),
                &Default::default(),
                &Default::default(),
            )
            .await?;
            let expected: Result<BTreeMap<String, u64>, _> = serde_json::from_slice(&json);
            let found = match expected {
                Ok(expected) => target
                    .session("dr drill")
                    .await
                    .map_err(DrillError::from)
                    .map(|c| (c, expected)),
                Err(e) => Err(DrillError::Scratch(format!(
                    "the backup's row counts do not parse: {e}"
                ))),
            };
            let (found, expected) = match found {
                Ok((client, expected)) => (
                    count_rows(&client, None).await.map_err(DrillError::from),
                    expected,
                ),
                Err(e) => (Err(e), BTreeMap::new()),
            };
            r.checks.push(match found {
                Ok(found) => {
                    let differ: Vec<&String> = expected
                        .iter()
                        .filter(|(t, n)| found.get(t) != Some(**n))
                        .map(|(t, _)| t)
                        .collect();
                    if !differ.is_empty() {
                        // Table names stay in the local log, never in the repository.
                        tracing::error!(tables = ?differ, "restored row counts differ from the backup's");
                    }
                    Check {
                        name: "row counts".into(),
                        passed: differ.is_empty(),
                        detail: if differ.is_empty() {
                            format!("{} tables, every count equal to the backup's", expected.len())
                        } else {
                            format!("{} of {} tables differ from the backup's counts", differ.len(), expected.len())
                        },
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "counting restored rows failed");
                    Check {
                        name: "row counts".into(),
                        passed: false,
                        detail: "counting rows in the restored database failed (see the log)".into(),
                    }
                }
            });
        }
    }
    // The row counts proved the backup; now the changes after it, up to the newest.
    if let Some((plan, conn)) = replay {
        let replayed =
            dr_continuous::pitr::apply(repo, identities, plan, conn, &std::env::temp_dir()).await?;
        r.stages.replay = replayed.seconds;
        r.recovery_point = Some(plan.to);
        r.achieved_rpo_seconds = Some(r.started_at.duration_since(plan.to).as_secs_f64().max(0.0));
        r.checks.push(Check {
            name: "changes replayed".into(),
            passed: true,
            detail: format!(
                "{} transaction(s) after the backup replayed, up to {}",
                replayed.transactions, plan.to
            ),
        });
    }
    // The configured checks: each must return true.
    for (i, sql) in drill.checks.iter().enumerate() {
        let result = match target.session("dr drill check").await {
            Ok(client) => client.first_value(sql).await,
            Err(e) => Err(e),
        };
        let name = format!("check #{}", i + 1);
        r.checks.push(match result {
            Ok(Some(v)) if v == "t" => Check {
                name,
                passed: true,
                detail: "returned true".into(),
            },
            Ok(v) => {
                tracing::error!(check = i + 1, returned = ?v, "drill check did not return true");
                Check {
                    name,
                    passed: false,
                    detail: "did not return true".into(),
                }
            }
            Err(e) => {
                tracing::error!(check = i + 1, error = %e, "drill check failed");
                Check {
                    name,
                    passed: false,
                    detail: "failed with an error (see the log)".into(),
                }
            }
        });
    }
    Ok(())
}
