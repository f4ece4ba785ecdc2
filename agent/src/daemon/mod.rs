//! `dr agent`: the long-running daemon.
//!
//! - [`schedule`]: when backups are due (pure, DST-safe).
//! - [`job`]: one scheduled backup: lock, dump, metrics, prune, notify.
//! - [`lock`]: one writer per database, a lease object in the repository.
//! - [`metrics`] and [`http`]: Prometheus metrics and `/healthz`.
//! - [`notify`]: webhook notifications, sent in the background.
//! - [`continuous`]: the health of continuous databases' slots and publications.
//! - [`copies`]: copying to `[[copies]]` repositories, their retention and RPO.
//! - [`directories`]: scheduled `[[directories]]` backups, their retention and metrics.
//!
//! Shaped like mini-redis's server: every task is told to stop through a token and the
//! process waits for them. Two tokens: `stop` ends scheduling (SIGHUP reload lets running
//! jobs finish), `abort` also cancels jobs in flight (SIGTERM). The agent keeps no state of
//! its own: at start every database's last backups and RPO are rebuilt from the repository.

pub mod continuous;
pub mod copies;
pub mod directories;
pub mod http;
pub mod job;
pub mod lock;
pub mod metrics;
pub mod notify;
pub mod page;
pub mod rpo;
pub mod schedule;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use dr_core::config::{Config, NotifyEvent};
use dr_core::repo::Repository;
use jiff::Timestamp;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use metrics::Metrics;
use notify::{Event, Notifier};

/// SIGTERM must end the process within this (systemd's default stop timeout is 90 s; ours
/// is promised as 10 s).
const STOP_TIMEOUT: Duration = Duration::from_secs(8);
const TICK: Duration = Duration::from_secs(5);

/// State shared by every task of one config generation.
pub struct Shared {
    pub config: Arc<Config>,
    pub repo: Repository,
    pub metrics: Arc<Metrics>,
    pub notifier: Notifier,
    pub jobs: Arc<tokio::sync::Semaphore>,
    /// Serializes jobs of one database, across config generations.
    pub db_mutex: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    /// The slot of each database's job in flight (pending or running), across config
    /// generations: after a reload, slots that fall after it still run.
    pub in_flight: Arc<Mutex<HashMap<String, Timestamp>>>,
    /// Identifies this process in lock leases.
    pub owner: String,
    /// Cancels jobs in flight.
    pub abort: CancellationToken,
    /// Start time of each database's newest good backup.
    pub last_success: Arc<Mutex<HashMap<String, Timestamp>>>,
    /// Databases currently in RPO breach (notified once per breach).
    pub breached: Arc<Mutex<BTreeSet<String>>>,
    /// Databases whose state was rebuilt from the repository (RPO is unknown before).
    pub ready: Arc<Mutex<BTreeSet<String>>>,
    pub status: Arc<Mutex<String>>,
    /// Bumped when a backup is committed: copy loops copy it at once.
    pub committed: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    pub fn environment(&self) -> &str {
        self.config.environment.as_str()
    }

    pub fn database_mutex(&self, database: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.db_mutex
            .lock()
            .expect("db mutex map")
            .entry(database.to_string())
            .or_default()
            .clone()
    }

    pub fn event(&self, event: NotifyEvent, database: Option<&str>, message: String) -> Event {
        Event {
            event,
            environment: self.environment().to_string(),
            database: database.map(str::to_string),
            message,
            at: Timestamp::now(),
            backup_id: None,
        }
    }
}

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(config_path: PathBuf) -> anyhow::Result<ExitCode> {
    let mut config = Arc::new(crate::cmd::load_config(&config_path)?);
    let metrics = Arc::new(Metrics::new());
    let heartbeat = Arc::new(AtomicI64::new(Timestamp::now().as_second()));
    let shutdown = CancellationToken::new();
    let page = Arc::new(page::Page::default());

    let listener = tokio::net::TcpListener::bind(config.agent.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} ([agent] listen); is another agent running?",
                config.agent.listen
            )
        })?;
    let http_addr = listener.local_addr()?;
    let http = tokio::spawn(http::serve(
        listener,
        http::HttpState {
            metrics: metrics.clone(),
            heartbeat: heartbeat.clone(),
            page: page.clone(),
        },
        shutdown.clone(),
    ));

    let owner = lock::new_owner();
    let db_mutex = Arc::new(Mutex::new(HashMap::new()));
    let in_flight = Arc::new(Mutex::new(HashMap::new()));
    let last_success = Arc::new(Mutex::new(HashMap::new()));
    let breached = Arc::new(Mutex::new(BTreeSet::new()));
    let ready = Arc::new(Mutex::new(BTreeSet::new()));
    let status = Arc::new(Mutex::new("starting".to_string()));
    let abort = CancellationToken::new();

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    spawn_watchdog(heartbeat.clone(), status.clone(), shutdown.clone());

    let generation = |config: &Arc<Config>, repo: Repository| {
        page.set_source(config.clone(), repo.clone());
        let shared = Arc::new(Shared {
            config: config.clone(),
            repo,
            metrics: metrics.clone(),
            notifier: Notifier::new(config.notify.clone()),
            jobs: Arc::new(tokio::sync::Semaphore::new(
                config.agent.max_concurrent_jobs,
            )),
            db_mutex: db_mutex.clone(),
            in_flight: in_flight.clone(),
            owner: owner.clone(),
            abort: abort.clone(),
            last_success: last_success.clone(),
            breached: breached.clone(),
            ready: ready.clone(),
            status: status.clone(),
            committed: tokio::sync::watch::Sender::new(0),
        });
        let stop = CancellationToken::new();
        let tasks = start_generation(&shared, &stop, &heartbeat);
        (shared, stop, tasks)
    };
    let (shared, mut stop, mut tasks) = generation(&config, crate::cmd::open_repo(&config).await?);
    tracing::info!(
        listen = %http_addr, environment = shared.environment(),
        databases = config.databases.len(), storage = %shared.repo.storage().location(),
        "agent started"
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {}
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
        let reloaded = match crate::cmd::load_config(&config_path) {
            Ok(new) => {
                let new = Arc::new(new);
                crate::cmd::open_repo(&new).await.map(|repo| (new, repo))
            }
            Err(e) => Err(e),
        };
        match reloaded {
            Ok((new, repo)) => {
                tracing::info!(config = %config_path.display(), "configuration reloaded");
                // Running jobs finish; per-database mutexes keep the new jobs from overlapping them.
                stop.cancel();
                detach(std::mem::take(&mut tasks));
                config = new;
                (_, stop, tasks) = generation(&config, repo);
            }
            Err(e) => tracing::error!(
                config = %config_path.display(), error = %format!("{e:#}"),
                "the new configuration is invalid; keeping the running one"
            ),
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    }

    tracing::info!("stopping: no new jobs; aborting jobs in flight");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    stop.cancel();
    abort.cancel();
    drain(tasks).await;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), http).await;
    tracing::info!("agent stopped");
    Ok(ExitCode::SUCCESS)
}

/// Waits for the tasks, but never past the stop timeout.
async fn drain(mut tasks: JoinSet<()>) {
    let all = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(STOP_TIMEOUT, all).await.is_err() {
        tracing::error!("jobs did not stop in time; exiting anyway");
    }
}

/// Lets a superseded generation finish its running jobs on its own.
fn detach(mut tasks: JoinSet<()>) {
    tokio::spawn(async move { while tasks.join_next().await.is_some() {} });
}

fn start_generation(
    shared: &Arc<Shared>,
    stop: &CancellationToken,
    heartbeat: &Arc<AtomicI64>,
) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    for db in &shared.config.databases {
        let name = db.name.to_string();
        tasks.spawn(job::database_loop(
            shared.clone(),
            name.clone(),
            stop.clone(),
        ));
        if db.continuous.is_some() {
            tasks.spawn(continuous::watch_loop(
                shared.clone(),
                name.clone(),
                stop.clone(),
            ));
        }
        if db.drill.as_ref().is_some_and(|d| d.cron.is_some()) {
            tasks.spawn(job::drill_loop(shared.clone(), name, stop.clone()));
        }
    }
    for (index, dir) in shared.config.directories.iter().enumerate() {
        if !dir.schedules.is_empty() {
            tasks.spawn(directories::directory_loop(
                shared.clone(),
                index,
                stop.clone(),
            ));
        }
    }
    for index in 0..shared.config.copies.len() {
        tasks.spawn(copies::copy_loop(shared.clone(), index, stop.clone()));
    }
    let (s, stop, hb) = (shared.clone(), stop.clone(), heartbeat.clone());
    tasks.spawn(async move {
        loop {
            hb.store(Timestamp::now().as_second(), Ordering::Relaxed);
            job::update_rpo(&s);
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = stop.cancelled() => return,
            }
        }
    });
    tasks
}

/// Pings systemd's watchdog while the scheduler's heartbeat is fresh, and keeps STATUS=.
fn spawn_watchdog(
    heartbeat: Arc<AtomicI64>,
    status: Arc<Mutex<String>>,
    shutdown: CancellationToken,
) {
    let watchdog = sd_notify::watchdog_enabled();
    let enabled = watchdog.is_some();
    let interval = watchdog.map_or(Duration::from_secs(10), |d| d / 2);
    tokio::spawn(async move {
        loop {
            let age = Timestamp::now().as_second() - heartbeat.load(Ordering::Relaxed);
            let text = status.lock().expect("status").clone();
            let mut states = vec![sd_notify::NotifyState::Status(&text)];
            if enabled && age <= http::HEARTBEAT_STALE_SECONDS {
                states.push(sd_notify::NotifyState::Watchdog);
            }
            let _ = sd_notify::notify(&states);
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    });
}
