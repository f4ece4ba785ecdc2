//! End-to-end tests of `dr agent` (and the one-shot commands around it: `dr prune`,
//! `dr status`, `dr notify test`): the built `dr` against a real PostgreSQL cluster and a
//! `file://` (or Garage S3) repository, with schedules of a few seconds.
//!
//! Every agent runs in an [`Agent`] guard that stops it on drop, so a failing test never
//! leaves one running. Waits poll with a timeout; the only fixed waits are the windows in
//! which something must *not* happen (a second notification).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dr_tests::{
    encryption_toml, free_port, metric_value, poll_every, processes, runs_program,
    wait_with_timeout, write_config, Agent, BedBase, Dr, Repo, Storage, TableLock, ThrottledProxy,
    WebhookReceiver,
};

const ENV: &str = "test";
const DB: &str = "app";
const LAST_SUCCESS: &str = "dr_backup_last_success_timestamp_seconds";
/// A schedule that does not fire during a test: only catch-up backups run.
const NEVER: &str = "0 0 1 1 *";
const EVERY_5S: &str = "*/5 * * * * *";
const EVERY_10S: &str = "*/10 * * * * *";

/// What goes into one test's config besides the storage and the recipient.
struct Spec {
    listen: u16,
    rpo: Option<String>,
    /// (class, cron, keep)
    schedules: Vec<(String, String, String)>,
    notify: Vec<String>,
    /// Connect to this port instead of the cluster's (a proxy in front of it).
    db_port: Option<u16>,
    /// Extra lines for `[agent]` and for the database's table.
    agent_extra: String,
    db_extra: String,
}

impl Spec {
    fn new(listen: u16) -> Spec {
        Spec {
            listen,
            rpo: None,
            schedules: Vec::new(),
            notify: Vec::new(),
            db_port: None,
            agent_extra: String::new(),
            db_extra: String::new(),
        }
    }

    fn agent_line(mut self, line: &str) -> Spec {
        self.agent_extra += &format!("{line}\n");
        self
    }

    fn db_line(mut self, line: &str) -> Spec {
        self.db_extra += &format!("{line}\n");
        self
    }

    fn rpo(mut self, rpo: &str) -> Spec {
        self.rpo = Some(rpo.to_string());
        self
    }

    fn schedule(mut self, class: &str, cron: &str, keep: &str) -> Spec {
        self.schedules
            .push((class.to_string(), cron.to_string(), keep.to_string()));
        self
    }

    fn notify(mut self, url: &str) -> Spec {
        self.notify.push(url.to_string());
        self
    }

    fn db_port(mut self, port: u16) -> Spec {
        self.db_port = Some(port);
        self
    }
}

/// A cluster with a small database `app`, keys, and a repository.
struct Bed {
    base: BedBase,
}

impl Bed {
    fn file() -> Bed {
        Bed::new(BedBase::file("dr-agent-"))
    }

    fn s3(prefix: &str) -> Bed {
        Bed::new(BedBase::s3("dr-agent-", prefix))
    }

    fn new(base: BedBase) -> Bed {
        base.cluster.create_db(DB);
        base.cluster.psql(
            DB,
            "CREATE TABLE items AS SELECT i AS id, md5(i::text) AS v FROM generate_series(1, 2000) AS i",
        );
        Bed { base }
    }

    fn dir(&self) -> &Path {
        self.base.dir()
    }

    /// Writes `dr.toml` for `spec` into `self.dir()/sub` (so two agents can have two
    /// configs) and returns its path.
    fn write(&self, sub: &str, spec: &Spec) -> PathBuf {
        let dir = self.dir().join(sub);
        fs::create_dir_all(&dir).expect("create config dir");
        write_config(&dir, &self.base.storage, &self.body(spec))
    }

    fn body(&self, spec: &Spec) -> String {
        let url = match spec.db_port {
            Some(port) => format!("postgres://postgres@127.0.0.1:{port}/{DB}"),
            None => self.base.cluster.url(DB),
        };
        let mut out = encryption_toml(&[&self.base.keys.recipient], None);
        out += &format!(
            "[agent]\nlisten = \"127.0.0.1:{}\"\ntimezone = \"UTC\"\nmax_concurrent_jobs = 2\n{}\n",
            spec.listen, spec.agent_extra
        );
        out += &format!(
            "[[databases]]\nname = \"{DB}\"\nurl = \"{url}\"\nrto = \"1h\"\n{}",
            spec.db_extra
        );
        if let Some(rpo) = &spec.rpo {
            out += &format!("rpo = \"{rpo}\"\n");
        }
        for (class, cron, keep) in &spec.schedules {
            out += &format!(
                "  [[databases.schedules]]\n  class = \"{class}\"\n  cron = \"{cron}\"\n  keep = \"{keep}\"\n"
            );
        }
        for url in &spec.notify {
            out += &format!("\n[[notify]]\nurl = \"{url}\"\nformat = \"json\"\n");
        }
        out
    }

    /// `dr --config <config>` with the password and storage credentials in its environment.
    fn dr(&self, config: &Path) -> Dr {
        self.base
            .dr(config)
            .env("PGPASSWORD", self.base.cluster.password())
    }

    fn agent(&self, config: &Path, port: u16) -> Agent {
        Agent::start(self.dr(config), port)
    }

    fn repo(&self) -> Repo {
        self.base.repo()
    }

    fn committed(&self) -> Vec<String> {
        self.repo().committed_ids(ENV, DB)
    }

    /// `dr backup --class <class>`; returns the id.
    fn backup(&self, config: &Path, class: &str) -> String {
        self.dr(config)
            .args(["backup", "--database", DB, "--class", class])
            .run()
            .assert_one_backup_id()
    }

    fn list(&self, config: &Path) -> Vec<serde_json::Value> {
        self.dr(config).list_json(Some(DB))
    }

    /// This database's row of `dr status --json`.
    fn status(&self, config: &Path) -> serde_json::Value {
        let out = self.dr(config).args(["status", "--json"]).run();
        out.assert_success();
        let rows: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "dr status --json is not a JSON array ({e}):\n{}",
                out.stdout
            )
        });
        rows.into_iter()
            .find(|r| r["environment"] == ENV && r["database"] == DB)
            .unwrap_or_else(|| {
                panic!(
                    "dr status --json has no row for {ENV}/{DB}:\n{}",
                    out.stdout
                )
            })
    }
}

/// Polls `ready` every 200 ms until it is true or `timeout` passes.
fn poll(timeout: Duration, ready: impl FnMut() -> bool) -> bool {
    poll_every(Duration::from_millis(200), timeout, ready)
}

fn db_labels() -> [(&'static str, &'static str); 2] {
    [("environment", ENV), ("database", DB)]
}

fn class_labels(class: &str) -> [(&str, &str); 3] {
    [("environment", ENV), ("database", DB), ("class", class)]
}

fn classes_of(backup: &serde_json::Value) -> Vec<String> {
    backup["classes"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Pids of live `pg_dump` processes whose command line names `port` (its `--dbname` URL).
fn pg_dumps_on_port(port: u16) -> Vec<u32> {
    let needle = format!(":{port}/");
    processes()
        .into_iter()
        .filter(|(_, args)| {
            runs_program(args, "pg_dump") && args.iter().any(|a| a.contains(&needle))
        })
        .map(|(pid, _)| pid)
        .collect()
}

#[test]
fn agent_takes_a_scheduled_backup_and_metrics_show_it() {
    let bed = Bed::file();
    let port = free_port();
    // No RPO objective, so no catch-up: the backup comes from the schedule.
    let config = bed.write("a", &Spec::new(port).schedule("daily", EVERY_5S, "30d"));
    let agent = bed.agent(&config, port);

    let stored = [("environment", ENV), ("database", DB), ("stage", "stored")];
    let shown = poll(Duration::from_secs(30), || {
        let m = agent.metrics();
        metric_value(&m, LAST_SUCCESS, &class_labels("daily")).is_some_and(|v| v > 0.0)
            && metric_value(&m, "dr_backup_size_bytes", &stored).is_some_and(|v| v > 0.0)
    });
    assert!(
        shown,
        "no scheduled backup showed in /metrics within 30 s:\n{}\nagent log:\n{}",
        agent.metrics(),
        agent.log()
    );
    let metrics = agent.metrics();
    for family in [
        "dr_backup_last_duration_seconds",
        "dr_rto_objective_seconds",
        "dr_backup_failures_total",
    ] {
        assert!(
            metric_value(&metrics, family, &db_labels()).is_some(),
            "/metrics has no {family} for {ENV}/{DB}:\n{metrics}"
        );
    }
    assert_eq!(
        metric_value(&metrics, "dr_backup_failures_total", &db_labels()),
        Some(0.0),
        "a backup failed:\n{metrics}\nagent log:\n{}",
        agent.log()
    );
    assert_eq!(
        agent
            .get("/healthz")
            .map(|(code, body)| (code, body.trim().to_string())),
        Some((200, "ok".to_string()))
    );

    let backups = bed.list(&config);
    assert!(
        backups
            .iter()
            .any(|b| classes_of(b).contains(&"daily".to_string())),
        "dr list shows no daily backup: {backups:#?}"
    );
}

#[test]
fn rpo_breach_notifies_once_and_recovery_notifies() {
    let bed = Bed::file();
    let hook = WebhookReceiver::start();
    let port = free_port();
    // No backup yet and an RPO of 6 s: the agent catches up at start (recovery), and since
    // the schedule never fires, the RPO is breached again about 6 s later and stays so.
    let config = bed.write(
        "a",
        &Spec::new(port)
            .rpo("6s")
            .schedule("daily", NEVER, "30d")
            .notify(&hook.url("/hook")),
    );
    let agent = bed.agent(&config, port);
    let rpo_events = || -> Vec<String> {
        hook.events()
            .into_iter()
            .filter(|e| e.starts_with("rpo_"))
            .collect()
    };
    let after_recovery = |events: &[String]| -> Vec<String> {
        match events.iter().position(|e| e == "rpo_recovered") {
            Some(i) => events[i + 1..].to_vec(),
            None => Vec::new(),
        }
    };

    assert!(
        poll(Duration::from_secs(30), || rpo_events()
            .contains(&"rpo_recovered".to_string())),
        "no rpo_recovered after the catch-up backup; events {:?}\nagent log:\n{}",
        hook.events(),
        agent.log()
    );
    assert_eq!(bed.committed().len(), 1, "the catch-up backup is missing");
    assert!(
        poll(Duration::from_secs(20), || after_recovery(&rpo_events())
            .contains(&"rpo_breach".to_string())),
        "no rpo_breach once the backup got older than the objective; events {:?}\nagent log:\n{}",
        hook.events(),
        agent.log()
    );
    // The RPO stays breached for at least two more 5 s ticks: no repeat.
    std::thread::sleep(Duration::from_secs(12));
    let events = rpo_events();
    let first_recovery = events
        .iter()
        .position(|e| e == "rpo_recovered")
        .expect("seen above");
    assert!(
        events[..first_recovery].iter().all(|e| e == "rpo_breach") && first_recovery <= 1,
        "before the first backup there may be one rpo_breach (no backup yet), nothing else: {events:?}"
    );
    assert_eq!(
        after_recovery(&events),
        vec!["rpo_breach".to_string()],
        "after the recovery the breach must be notified exactly once: {events:?}"
    );
    assert_eq!(
        events.iter().filter(|e| *e == "rpo_recovered").count(),
        1,
        "{events:?}"
    );

    let breach = hook
        .json_bodies()
        .into_iter()
        .rev()
        .find(|b| b["event"] == "rpo_breach")
        .expect("a breach body");
    assert_eq!(breach["environment"], ENV, "{breach}");
    assert_eq!(breach["database"], DB, "{breach}");
    assert!(
        breach["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{breach}"
    );
    assert!(breach["at"].as_str().is_some(), "{breach}");
    assert!(
        hook.requests().iter().all(|r| r.path == "/hook"),
        "{:?}",
        hook.requests()
    );
    let metrics = agent.metrics();
    let rpo = metric_value(&metrics, "dr_rpo_seconds", &db_labels());
    let objective = metric_value(&metrics, "dr_rpo_objective_seconds", &db_labels());
    assert_eq!(objective, Some(6.0), "{metrics}");
    assert!(
        rpo.is_some_and(|r| r > 6.0),
        "dr_rpo_seconds does not show the breach:\n{metrics}"
    );
}

#[test]
fn prune_keeps_the_newest_of_each_class_and_removes_the_expired() {
    let bed = Bed::file();
    let spec = Spec::new(free_port())
        .schedule("daily", "0 3 * * *", "2s")
        .schedule("monthly", "0 4 1 * *", "1h");
    let config = bed.write("a", &spec);
    let mut ids = Vec::new();
    for class in ["daily", "daily", "daily", "monthly"] {
        if !ids.is_empty() {
            std::thread::sleep(Duration::from_millis(1100));
        }
        ids.push(bed.backup(&config, class));
    }
    let (old1, old2, newest_daily, monthly) = (&ids[0], &ids[1], &ids[2], &ids[3]);
    // Every daily is now older than its 2 s keep.
    std::thread::sleep(Duration::from_secs(3));
    let before = bed.repo().keys();

    let out = bed.dr(&config).args(["prune", "--dry-run", "--json"]).run();
    out.assert_success();
    let reports: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("dr prune --json is not JSON ({e}):\n{}", out.stdout));
    let decisions: BTreeMap<String, (bool, String)> = reports
        .as_array()
        .expect("an array of reports")
        .iter()
        .flat_map(|r| r["decisions"].as_array().cloned().unwrap_or_default())
        .map(|d| {
            (
                d["backup_id"].as_str().expect("backup_id").to_string(),
                (
                    d["keep"].as_bool().expect("keep"),
                    d["reason"].as_str().unwrap_or_default().to_string(),
                ),
            )
        })
        .collect();
    assert_eq!(decisions.len(), 4, "{}", out.stdout);
    for (id, keep) in [
        (old1, false),
        (old2, false),
        (newest_daily, true),
        (monthly, true),
    ] {
        let (kept, reason) = &decisions[id.as_str()];
        assert_eq!(*kept, keep, "{id}: {reason}\n{}", out.stdout);
        assert!(!reason.is_empty(), "{id} has no reason:\n{}", out.stdout);
    }
    assert_eq!(
        bed.repo().keys(),
        before,
        "--dry-run changed the repository"
    );

    let out = bed.dr(&config).arg("prune").run();
    out.assert_success();
    let mut expected = vec![newest_daily.clone(), monthly.clone()];
    expected.sort();
    assert_eq!(bed.committed(), expected, "prune output:\n{}", out.stdout);
    let left: Vec<String> = bed
        .repo()
        .backups(ENV, DB)
        .into_iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(left, expected, "objects of pruned backups are left behind");
    assert_eq!(bed.list(&config).len(), 2);
}

#[test]
fn sigterm_during_a_backup_leaves_no_manifest_and_exits_in_time() {
    let bed = Bed::file();
    // About 11 MB of dump behind a 512 KiB/s link: pg_dump streams for about 20 s.
    bed.base.cluster.psql(
        DB,
        "CREATE TABLE big AS SELECT i AS id, md5(i::text) || md5((i * 7)::text) AS v \
         FROM generate_series(1, 150000) AS i",
    );
    let proxy = ThrottledProxy::start(bed.base.cluster.port(), 512 * 1024);
    let port = free_port();
    // No backup and an RPO objective: the catch-up backup starts at once.
    let config = bed.write(
        "a",
        &Spec::new(port)
            .rpo("1h")
            .schedule("daily", NEVER, "30d")
            .db_port(proxy.port()),
    );
    let mut agent = bed.agent(&config, port);
    let repo = bed.repo();
    let partial = || repo.keys().iter().any(|k| k.contains(".partial-"));
    assert!(
        poll(Duration::from_secs(30), || partial()
            && !pg_dumps_on_port(proxy.port()).is_empty()),
        "the backup did not start streaming (keys {:?}):\n{}",
        repo.keys(),
        agent.log()
    );
    // Well into the stream.
    std::thread::sleep(Duration::from_secs(1));
    let dumps = pg_dumps_on_port(proxy.port());
    assert!(
        !dumps.is_empty(),
        "pg_dump finished too early:\n{}",
        agent.log()
    );

    agent.signal(libc::SIGTERM);
    let Some((status, took)) = agent.wait_exit(Duration::from_secs(10)) else {
        let alive = pg_dumps_on_port(proxy.port());
        let later = agent.wait_exit(Duration::from_secs(60));
        panic!(
            "dr agent did not exit within 10 s of SIGTERM; pg_dump still running then: {alive:?} \
             (of {dumps:?}); the agent exited only {later:?} later:\n{}",
            agent.log()
        );
    };
    eprintln!("agent exited {status} after {took:?}");
    assert!(
        status.success(),
        "dr agent exited {status} on SIGTERM:\n{}",
        agent.log()
    );
    assert!(
        bed.committed().is_empty(),
        "an aborted backup was committed: {:?}",
        bed.committed()
    );
    let keys = repo.keys();
    assert!(
        !keys.iter().any(|k| k.contains(".partial-")),
        "partial files left: {keys:?}"
    );
    assert!(
        !keys.iter().any(|k| k.ends_with("manifest.json")),
        "a manifest exists: {keys:?}"
    );
    assert!(
        poll(Duration::from_secs(2), || pg_dumps_on_port(proxy.port())
            .is_empty()),
        "pg_dump still running after the agent exited: {:?} (was {dumps:?})",
        pg_dumps_on_port(proxy.port())
    );
    let log = agent.log();
    assert!(
        log.contains("aborted"),
        "the log does not say the backup was aborted:\n{log}"
    );
    assert!(
        !log.contains("backup failed"),
        "a shutdown was reported as a failed backup:\n{log}"
    );
    eprintln!("keys left after the abort: {keys:?}");
    assert!(
        !keys.contains(&lock_key()),
        "the lock was not released after SIGTERM: {keys:?}\n{log}"
    );

    // A restarted agent catches up at once: no dead agent's lease stands in its way.
    let config = bed.write(
        "a",
        &Spec::new(port).rpo("1h").schedule("daily", NEVER, "30d"),
    );
    let again = bed.agent(&config, port);
    assert!(
        poll(Duration::from_secs(30), || bed.committed().len() == 1),
        "the restarted agent did not catch up:\n{}",
        again.log()
    );
}

/// Two agents, one config, one repository: every 10 s slot gets at most one backup.
fn two_agents_one_backup_per_slot(bed: Bed) {
    let (port_a, port_b) = (free_port(), free_port());
    let spec = |port| Spec::new(port).schedule("daily", EVERY_10S, "30d");
    let config_a = bed.write("a", &spec(port_a));
    let config_b = bed.write("b", &spec(port_b));
    let started = Instant::now();
    let mut a = bed.agent(&config_a, port_a);
    let mut b = bed.agent(&config_b, port_b);
    while started.elapsed() < Duration::from_secs(26) {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(a.stop().success(), "agent a:\n{}", a.log());
    assert!(b.stop().success(), "agent b:\n{}", b.log());

    let backups = bed.list(&config_a);
    // `started_at` is RFC 3339 (`2026-11-23T10:00:10.8Z`): the first 18 characters name
    // the 10 s slot.
    let mut per_slot: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for backup in &backups {
        let started_at = backup["started_at"].as_str().expect("started_at");
        per_slot
            .entry(started_at[..18].to_string())
            .or_default()
            .push(backup["id"].as_str().expect("id").to_string());
    }
    eprintln!("backups per 10 s slot: {per_slot:#?}");
    assert!(
        backups.len() >= 2,
        "fewer than two backups in 26 s of a 10 s schedule: {per_slot:?}\nagent a:\n{}\nagent b:\n{}",
        a.log(),
        b.log()
    );
    assert!(
        per_slot.values().all(|ids| ids.len() == 1),
        "a slot has more than one backup: {per_slot:#?}\nagent a:\n{}\nagent b:\n{}",
        a.log(),
        b.log()
    );
    let skips: usize = [&a, &b]
        .iter()
        .map(|agent| agent.log_count("scheduled backup skipped"))
        .sum();
    assert!(
        skips >= 1,
        "neither agent logged skipping a slot:\nagent a:\n{}\nagent b:\n{}",
        a.log(),
        b.log()
    );
}

#[test]
fn two_agents_on_one_database_produce_one_backup_per_slot() {
    two_agents_one_backup_per_slot(Bed::file());
}

/// Garage ignores conditional writes, so the lock is best effort there (see the agent's
/// lock module); the slot check still keeps it to one backup per slot.
#[test]
fn two_agents_on_one_database_produce_one_backup_per_slot_on_s3() {
    two_agents_one_backup_per_slot(Bed::s3("agents"));
}

#[test]
fn restarted_agent_reports_the_same_rpo() {
    let bed = Bed::file();
    let port = free_port();
    // A catch-up backup at the first start only; the schedule never fires.
    let config = bed.write(
        "a",
        &Spec::new(port).rpo("1h").schedule("daily", NEVER, "30d"),
    );
    let mut first = bed.agent(&config, port);
    assert!(
        poll(Duration::from_secs(30), || metric_value(
            &first.metrics(),
            LAST_SUCCESS,
            &class_labels("daily")
        )
        .is_some()),
        "the first agent did not back up:\n{}",
        first.log()
    );
    let before =
        metric_value(&first.metrics(), LAST_SUCCESS, &class_labels("daily")).expect("seen above");
    assert!(first.stop().success(), "{}", first.log());
    assert_eq!(bed.committed().len(), 1);

    let second = bed.agent(&config, port);
    assert!(
        poll(Duration::from_secs(15), || {
            let m = second.metrics();
            metric_value(&m, LAST_SUCCESS, &class_labels("daily")).is_some()
                && metric_value(&m, "dr_rpo_seconds", &db_labels()).is_some()
        }),
        "the restarted agent does not report the last backup and RPO:\n{}\nlog:\n{}",
        second.metrics(),
        second.log()
    );
    let metrics = second.metrics();
    let after = metric_value(&metrics, LAST_SUCCESS, &class_labels("daily")).expect("present");
    assert!(
        (after - before).abs() < 0.001,
        "last success was {before} before the restart and {after} after"
    );
    let rpo = metric_value(&metrics, "dr_rpo_seconds", &db_labels()).expect("present");
    assert!(
        (0.0..3600.0).contains(&rpo),
        "dr_rpo_seconds = {rpo}:\n{metrics}"
    );
    assert_eq!(
        bed.committed().len(),
        1,
        "the restarted agent backed up although the RPO was met:\n{}",
        second.log()
    );
}

#[test]
fn bad_sighup_config_keeps_the_old_one() {
    let bed = Bed::file();
    let port = free_port();
    let config = bed.write("a", &Spec::new(port).schedule("daily", EVERY_5S, "30d"));
    let agent = bed.agent(&config, port);
    assert!(
        poll(Duration::from_secs(30), || !bed.committed().is_empty()),
        "no backup before the reload:\n{}",
        agent.log()
    );

    let bad = bed.write("a", &Spec::new(port).schedule("daily", "bad", "30d"));
    assert_eq!(bad, config);
    agent.signal(libc::SIGHUP);
    assert!(
        agent.wait_for_log(
            "the new configuration is invalid; keeping the running one",
            Duration::from_secs(10)
        ),
        "the invalid config was not rejected:\n{}",
        agent.log()
    );
    let count = bed.committed().len();
    assert!(
        poll(Duration::from_secs(20), || bed.committed().len() > count),
        "backups stopped after the rejected reload:\n{}",
        agent.log()
    );
    assert_eq!(agent.get("/healthz").map(|(code, _)| code), Some(200));

    bed.write("a", &Spec::new(port).schedule("hourly", EVERY_5S, "30d"));
    agent.signal(libc::SIGHUP);
    assert!(
        agent.wait_for_log("configuration reloaded", Duration::from_secs(10)),
        "the valid config was not reloaded:\n{}",
        agent.log()
    );
    assert!(
        poll(Duration::from_secs(20), || bed
            .list(&config)
            .iter()
            .any(|b| classes_of(b).contains(&"hourly".to_string()))),
        "no backup of the reloaded schedule's class:\n{}",
        agent.log()
    );
    assert_eq!(agent.get("/healthz").map(|(code, _)| code), Some(200));
}

#[test]
fn status_reports_rpo_against_objective() {
    let bed = Bed::file();
    let spec = |rpo| {
        Spec::new(free_port())
            .rpo(rpo)
            .schedule("daily", "0 3 * * *", "30d")
    };
    let config = bed.write("a", &spec("1h"));
    let id = bed.backup(&config, "daily");

    let row = bed.status(&config);
    assert_eq!(row["rpo_status"], "ok", "{row:#}");
    assert_eq!(row["rpo_objective_seconds"], 3600, "{row:#}");
    assert_eq!(row["last_backup_id"], id.as_str(), "{row:#}");
    assert!(
        row["rpo_seconds"]
            .as_i64()
            .is_some_and(|s| (0..3600).contains(&s)),
        "{row:#}"
    );
    assert!(
        row["next_runs"].as_array().is_some_and(|r| !r.is_empty()),
        "{row:#}"
    );

    bed.write("a", &spec("1s"));
    let mut row = serde_json::Value::Null;
    assert!(
        poll(Duration::from_secs(10), || {
            row = bed.status(&config);
            row["rpo_status"] == "breach"
        }),
        "no breach reported with a 1 s objective: {row:#}"
    );
    assert_eq!(row["rpo_objective_seconds"], 1, "{row:#}");

    // The fleet view: another environment's backups in the same repository show up too.
    let other = config.with_file_name("other-env.toml");
    let text = std::fs::read_to_string(&config).expect("read config");
    let env_line = format!("environment = \"{ENV}\"");
    assert!(text.contains(&env_line), "{text}");
    std::fs::write(
        &other,
        text.replace(&env_line, "environment = \"elsewhere\""),
    )
    .expect("write config");
    let other_id = bed.backup(&other, "daily");
    let out = bed
        .dr(&config)
        .args(["status", "--json", "--all-environments"])
        .run();
    out.assert_success();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).expect("JSON rows");
    let fleet: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["environment"].as_str().unwrap_or(""),
                r["last_backup_id"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(fleet.contains(&(ENV, id.as_str())), "{fleet:?}");
    assert!(
        fleet.contains(&("elsewhere", other_id.as_str())),
        "{fleet:?}"
    );
}

#[test]
fn notify_test_reaches_the_webhook() {
    const TOKEN: &str = "SECRET123";
    let bed = Bed::file();
    let hook = WebhookReceiver::start();
    let config = bed.write(
        "a",
        &Spec::new(free_port())
            .schedule("daily", "0 3 * * *", "30d")
            .notify(&hook.url(&format!("/hook/{TOKEN}"))),
    );
    let out = bed.dr(&config).args(["notify", "test"]).run();
    out.assert_success();
    let requests = hook.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].path, format!("/hook/{TOKEN}"));
    let body: serde_json::Value = serde_json::from_str(&requests[0].body)
        .unwrap_or_else(|e| panic!("the webhook body is not JSON ({e}): {}", requests[0].body));
    assert_eq!(body["event"], "test", "{body}");
    assert_eq!(body["environment"], ENV, "{body}");

    // Nothing listens on this port.
    let closed = format!("http://127.0.0.1:{}/hook/{TOKEN}", free_port());
    let config = bed.write(
        "b",
        &Spec::new(free_port())
            .schedule("daily", "0 3 * * *", "30d")
            .notify(&closed),
    );
    let out = bed.dr(&config).args(["notify", "test"]).run();
    eprintln!(
        "dr notify test to a closed port:\n{}\n{}",
        out.stdout, out.stderr
    );
    assert!(
        !out.status.success(),
        "dr notify test to a closed port exited 0"
    );
    let all = format!("{}\n{}", out.stdout, out.stderr);
    assert!(all.contains("FAILED"), "{all}");
    assert!(
        !all.contains(TOKEN) && !all.contains(&closed),
        "the webhook URL (with its token) was printed:\n{all}"
    );
}

/// `<env>/<db>/lock.json`, the database's lock in the repository.
fn lock_key() -> String {
    format!("{ENV}/{DB}/lock.json")
}

fn has_lock(bed: &Bed) -> bool {
    bed.repo().keys().contains(&lock_key())
}

/// Writes `bytes` at `key` of the bed's `file://` repository.
fn write_repo_file(bed: &Bed, key: &str, bytes: &[u8]) {
    let Storage::File(root) = &bed.base.storage else {
        panic!("a file:// bed");
    };
    let path = root.join(key);
    fs::create_dir_all(path.parent().expect("a parent")).expect("create repo dirs");
    fs::write(&path, bytes).expect("write into the repo");
}

/// A lease as another live process would hold it.
fn write_live_lease(bed: &Bed, host: &str, pid: u32) {
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 300;
    let lease = serde_json::json!({
        "owner": format!("{pid}-0000abcd"),
        "host": host,
        "pid": pid,
        "expires_at": rfc3339(expires),
        "command": "backup",
    });
    write_repo_file(bed, &lock_key(), lease.to_string().as_bytes());
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`, with `date` (no time crate here).
fn rfc3339(secs: u64) -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("run date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_string()
}

fn failures(agent: &Agent) -> Option<f64> {
    metric_value(&agent.metrics(), "dr_backup_failures_total", &db_labels())
}

/// About 11 MB of dump: behind a [`ThrottledProxy`] pg_dump streams for many seconds.
fn add_big_table(bed: &Bed) {
    bed.base.cluster.psql(
        DB,
        "CREATE TABLE big AS SELECT i AS id, md5(i::text) || md5((i * 7)::text) AS v \
         FROM generate_series(1, 150000) AS i",
    );
}

#[test]
fn lock_is_released_after_a_failed_backup() {
    let bed = Bed::file();
    let port = free_port();
    // Nothing listens on the database port: the catch-up backup fails at once.
    let config = bed.write(
        "a",
        &Spec::new(port)
            .rpo("1h")
            .schedule("daily", NEVER, "30d")
            .db_port(free_port()),
    );
    let mut agent = bed.agent(&config, port);
    assert!(
        poll(Duration::from_secs(30), || failures(&agent) == Some(1.0)),
        "the backup did not fail:\n{}",
        agent.log()
    );
    assert!(
        poll(Duration::from_secs(5), || !has_lock(&bed)),
        "lock.json is still there after the failed backup: {:?}\n{}",
        bed.repo().keys(),
        agent.log()
    );
    assert!(agent.stop().success(), "{}", agent.log());

    // The next agent, pointed at the database, catches up at once.
    let config = bed.write(
        "a",
        &Spec::new(port).rpo("1h").schedule("daily", NEVER, "30d"),
    );
    let again = bed.agent(&config, port);
    assert!(
        poll(Duration::from_secs(30), || bed.committed().len() == 1),
        "the restarted agent did not back up:\n{}",
        again.log()
    );
}

#[test]
fn an_unparseable_lock_file_is_taken_over_and_named() {
    let bed = Bed::file();
    write_repo_file(
        &bed,
        &lock_key(),
        b"{\"owner\": \"4242-0000abcd\", \"host\": ",
    );
    let port = free_port();
    let config = bed.write(
        "a",
        &Spec::new(port).rpo("1h").schedule("daily", NEVER, "30d"),
    );
    let agent = bed.agent(&config, port);
    assert!(
        poll(Duration::from_secs(30), || bed.committed().len() == 1),
        "a corrupt lock.json blocked the backup:\n{}",
        agent.log()
    );
    let log = agent.log();
    assert!(
        log.contains("the lock file cannot be parsed") && log.contains(&lock_key()),
        "the log does not name the corrupt lock file:\n{log}"
    );
    assert!(
        poll(Duration::from_secs(5), || !has_lock(&bed)),
        "the lock was not released: {:?}",
        bed.repo().keys()
    );
}

#[test]
fn a_second_manual_backup_refuses_while_the_first_holds_the_lock() {
    let bed = Bed::file();
    add_big_table(&bed);
    let proxy = ThrottledProxy::start(bed.base.cluster.port(), 512 * 1024);
    let config = bed.write(
        "a",
        &Spec::new(free_port())
            .schedule("daily", NEVER, "30d")
            .db_port(proxy.port()),
    );
    let first = bed.dr(&config).args(["backup", "--database", DB]).spawn();
    let first_pid = first.id();
    assert!(
        poll(Duration::from_secs(30), || has_lock(&bed)
            && !pg_dumps_on_port(proxy.port()).is_empty()),
        "the first backup did not start: {:?}",
        bed.repo().keys()
    );

    let second = bed.dr(&config).args(["backup", "--database", DB]).spawn();
    let out = wait_with_timeout(second, Duration::from_secs(60));
    eprintln!("second dr backup:\n{}", out.stderr);
    assert!(
        !out.status.success(),
        "two backups of one database ran at once:\n{}",
        out.stderr
    );
    for needle in [hostname(), format!("pid {first_pid}"), "until".to_string()] {
        assert!(
            out.stderr.contains(&needle),
            "the refusal does not name the holder ({needle}):\n{}",
            out.stderr
        );
    }

    // SAFETY: kill(2) on our own unreaped child.
    unsafe {
        libc::kill(first_pid as libc::pid_t, libc::SIGTERM);
    }
    let out = wait_with_timeout(first, Duration::from_secs(30));
    assert!(!out.status.success(), "{}", out.stderr);
    assert!(
        !has_lock(&bed),
        "the stopped backup left its lock: {:?}\n{}",
        bed.repo().keys(),
        out.stderr
    );
    assert!(bed.committed().is_empty(), "{:?}", bed.committed());
}

#[test]
fn prune_skips_a_database_whose_lock_is_held() {
    let bed = Bed::file();
    let config = bed.write(
        "a",
        &Spec::new(free_port()).schedule("daily", "0 3 * * *", "1s"),
    );
    bed.backup(&config, "daily");
    std::thread::sleep(Duration::from_millis(1100));
    bed.backup(&config, "daily");
    std::thread::sleep(Duration::from_secs(2));

    write_live_lease(&bed, "backup-host-7", 4242);
    let out = bed.dr(&config).arg("prune").run();
    eprintln!(
        "dr prune with the lock held:\n{}\n{}",
        out.stdout, out.stderr
    );
    assert!(
        !out.status.success(),
        "prune under someone else's lock exited 0"
    );
    for needle in ["backup-host-7", "pid 4242", "skipping database `app`"] {
        assert!(out.stderr.contains(needle), "{needle}:\n{}", out.stderr);
    }
    assert_eq!(
        bed.committed().len(),
        2,
        "prune deleted while the lock was held"
    );

    fs::remove_file(match &bed.base.storage {
        Storage::File(root) => root.join(lock_key()),
        _ => unreachable!(),
    })
    .expect("remove the lease");
    let out = bed.dr(&config).arg("prune").run();
    out.assert_success();
    assert_eq!(bed.committed().len(), 1, "{}", out.stdout);
    assert!(!has_lock(&bed), "prune left its lock behind");
}

#[test]
fn pg_dump_gives_up_on_a_locked_table_after_lock_wait_timeout() {
    let bed = Bed::file();
    let config = bed.write(
        "a",
        &Spec::new(free_port())
            .schedule("daily", NEVER, "30d")
            .db_line("lock_wait_timeout = \"2s\""),
    );
    let lock = TableLock::hold(&bed.base.cluster, DB, "items", Duration::from_secs(120));
    let started = Instant::now();
    let child = bed.dr(&config).args(["backup", "--database", DB]).spawn();
    let out = wait_with_timeout(child, Duration::from_secs(90));
    let took = started.elapsed();
    drop(lock);
    eprintln!(
        "dr backup against a locked table ({took:?}):\n{}",
        out.stderr
    );
    assert!(
        !out.status.success(),
        "the backup succeeded under a lock?\n{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("statement timeout") && out.stderr.contains("lock_wait_timeout"),
        "the error does not say pg_dump gave up waiting for a lock:\n{}",
        out.stderr
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(bed.committed().is_empty());
    assert!(!has_lock(&bed), "{:?}", bed.repo().keys());
}

#[test]
fn a_hung_backup_is_cancelled_at_job_timeout_and_counted_as_failed() {
    let bed = Bed::file();
    let _lock = TableLock::hold(&bed.base.cluster, DB, "items", Duration::from_secs(120));
    let port = free_port();
    // lock_wait_timeout stays at its 10 min default: only the job deadline can end this.
    let config = bed.write(
        "a",
        &Spec::new(port)
            .rpo("1h")
            .schedule("daily", NEVER, "30d")
            .agent_line("job_timeout = \"4s\""),
    );
    let agent = bed.agent(&config, port);
    assert!(
        poll(Duration::from_secs(40), || failures(&agent) == Some(1.0)),
        "the hung backup was not counted as failed:\n{}\n{}",
        agent.metrics(),
        agent.log()
    );
    let log = agent.log();
    assert!(log.contains("job_timeout"), "{log}");
    let cluster_port = bed.base.cluster.port();
    assert!(
        poll(Duration::from_secs(5), || pg_dumps_on_port(cluster_port)
            .is_empty()),
        "pg_dump still runs after the deadline: {:?}",
        pg_dumps_on_port(cluster_port)
    );
    assert!(
        poll(Duration::from_secs(5), || !has_lock(&bed)),
        "{:?}",
        bed.repo().keys()
    );
    let keys = bed.repo().keys();
    assert!(
        !keys
            .iter()
            .any(|k| k.ends_with("manifest.json") || k.contains(".partial-")),
        "{keys:?}"
    );
}

#[test]
fn a_slot_that_falls_during_a_long_backup_runs_after_it() {
    let bed = Bed::file();
    add_big_table(&bed);
    // About 11 MB at 1 MiB/s: each backup takes at least 11 s (up to 30 s on a loaded
    // machine), so an `other` slot 5 s after an `often` slot always falls while the `often`
    // backup runs.
    let proxy = ThrottledProxy::start(bed.base.cluster.port(), 1024 * 1024);
    let port = free_port();
    let config = bed.write(
        "a",
        &Spec::new(port)
            .schedule("often", "0,30 * * * * *", "30d")
            .schedule("other", "5,35 * * * * *", "30d")
            .db_port(proxy.port()),
    );
    // Start just after an `other` slot, so the first slot is an `often` one.
    let second = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            % 30
    };
    while !(6..20).contains(&second()) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let agent = bed.agent(&config, port);
    let has_class = |class: &str| {
        bed.list(&config)
            .iter()
            .any(|b| classes_of(b).contains(&class.to_string()))
    };
    assert!(
        poll(Duration::from_secs(180), || has_class("other")),
        "the `other` slot that fell during the `often` backup never ran; backups {:#?}\n{}",
        bed.list(&config),
        agent.log()
    );
    assert!(has_class("often"), "{:#?}", bed.list(&config));
    assert!(
        agent.log().contains("fell while an earlier backup"),
        "{}",
        agent.log()
    );
}
