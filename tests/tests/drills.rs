//! End-to-end tests of restore drills (`dr drill`, `dr drill history`, drills scheduled by
//! `dr agent`) and of `dr demo`: the built `dr` against real PostgreSQL clusters and a
//! `file://` repository.
//!
//! What they prove: a drill of a good backup passes, measures its RTO and stores a report
//! that describes nothing of the database's content (invariant 4); a corrupted backup, a
//! failing check or a breached RTO fails the drill loudly (exit code, webhook, metric);
//! drills touch only the databases they create and refuse the backed-up server itself
//! (invariant 6); and every throwaway cluster, directory and staging file is gone
//! afterwards, whatever the outcome.
//!
//! As root, ephemeral clusters always live in `/tmp/dr-drill-*`, so the tests that start
//! them hold [`SCRATCH`] while they run: the "nothing left behind" checks compare the
//! scratch directories and postmasters before and after, and must not see another test's.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use dr_tests::{
    create_seeded, dir_entries, encryption_toml, free_port, metric_value, processes, runs_program,
    seed_incompressible, wait_until, write_config, write_secret_file, Agent, Dr, DrOutput, Keypair,
    PgCluster, Repo, Storage, WebhookReceiver, SEED_ROLE,
};
use serde_json::Value;
use tempfile::TempDir;

const ENV: &str = "test";
const DB: &str = "app";
const DATA_OBJECT: &str = "data.dump.zst.age";
const ROWCOUNTS_OBJECT: &str = "rowcounts.json.zst.age";
/// A backup schedule that never fires during a test.
const NEVER: &str = "0 0 1 1 *";
/// A check that is true on the seeded database; its SQL must never reach the repository.
const GOOD_CHECK: &str = "select count(*) > 0 from customers";
/// Names from the seed that must never appear in plaintext in the repository.
const SEED_NAMES: &[&str] = &[
    "customers",
    "blobs",
    "documents",
    "events",
    "audit",
    "app_settings",
    SEED_ROLE,
];

/// Held by every test that starts ephemeral clusters (or `dr demo`), so the
/// before/after comparisons of scratch directories and postmasters see only its own.
static SCRATCH: Mutex<()> = Mutex::new(());

fn scratch_lock() -> MutexGuard<'static, ()> {
    SCRATCH.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------
// The bed

/// A cluster with the seeded database `app`, keys, a password file, a `file://` repository
/// and a private temporary directory `dr` uses as `$TMPDIR` (where restores stage).
struct Bed {
    tmp: TempDir,
    cluster: PgCluster,
    keys: Keypair,
    password_file: PathBuf,
}

/// What goes into one config besides storage, keys and the database's URL.
struct Spec {
    /// Lines of the `[databases.drill]` table.
    drill: Vec<String>,
    rto: String,
    /// Appended verbatim (e.g. `[agent]`, `[[notify]]`).
    extra: String,
}

impl Spec {
    /// An ephemeral drill with [`GOOD_CHECK`] and an RTO objective of one hour.
    fn ephemeral() -> Spec {
        Spec {
            drill: vec![
                "target = \"ephemeral\"".into(),
                format!("checks = [{}]", toml_str(GOOD_CHECK)),
            ],
            rto: "1h".into(),
            extra: String::new(),
        }
    }

    /// A drill on a scratch server at `url` whose password is in `password_file`.
    fn server(url: &str, password_file: &Path) -> Spec {
        Spec {
            drill: vec![
                format!("target = {}", toml_str(url)),
                format!(
                    "password_file = {}",
                    toml_str(&password_file.display().to_string())
                ),
                format!("checks = [{}]", toml_str(GOOD_CHECK)),
            ],
            rto: "1h".into(),
            extra: String::new(),
        }
    }

    fn drill_line(mut self, line: &str) -> Spec {
        self.drill.push(line.to_string());
        self
    }

    fn checks(mut self, checks: &[&str]) -> Spec {
        self.drill.retain(|l| !l.starts_with("checks"));
        let list: Vec<String> = checks.iter().map(|c| toml_str(c)).collect();
        self.drill.push(format!("checks = [{}]", list.join(", ")));
        self
    }

    fn rto(mut self, rto: &str) -> Spec {
        self.rto = rto.to_string();
        self
    }

    fn extra(mut self, extra: &str) -> Spec {
        self.extra += extra;
        self
    }
}

impl Bed {
    fn new() -> Bed {
        let tmp = tempfile::Builder::new()
            .prefix("dr-drilltest-")
            .tempdir()
            .expect("create test dir");
        let cluster = PgCluster::start();
        create_seeded(&cluster, DB);
        let keys = dr_tests::keygen(tmp.path());
        let password_file = tmp.path().join("source.pw");
        write_secret_file(&password_file, cluster.password());
        fs::create_dir(tmp.path().join("tmp")).expect("create private TMPDIR");
        Bed {
            tmp,
            cluster,
            keys,
            password_file,
        }
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// `dr`'s `$TMPDIR`: restores stage here, so it must be empty after every drill.
    fn private_tmp(&self) -> PathBuf {
        self.dir().join("tmp")
    }

    fn repo_root(&self) -> PathBuf {
        self.dir().join("repo")
    }

    fn repo(&self) -> Repo {
        Repo::file(&self.repo_root())
    }

    /// Writes `dir/<sub>/dr.toml` for `spec` and returns its path.
    fn config(&self, sub: &str, spec: &Spec) -> PathBuf {
        let dir = self.dir().join(sub);
        fs::create_dir_all(&dir).expect("create config dir");
        let mut body = encryption_toml(&[&self.keys.recipient], Some(&self.keys.identity));
        body += &format!(
            "[[databases]]\nname = \"{DB}\"\nurl = {}\npassword_file = {}\nrpo = \"3650d\"\nrto = {}\n",
            toml_str(&self.cluster.url(DB)),
            toml_str(&self.password_file.display().to_string()),
            toml_str(&spec.rto),
        );
        body += &format!(
            "  [[databases.schedules]]\n  class = \"daily\"\n  cron = \"{NEVER}\"\n  keep = \"30d\"\n"
        );
        body += "  [databases.drill]\n";
        for line in &spec.drill {
            body += &format!("  {line}\n");
        }
        body += "\n";
        body += &spec.extra;
        write_config(&dir, &Storage::File(self.repo_root()), &body)
    }

    /// `dr --config <config>` with the private `$TMPDIR`.
    fn dr(&self, config: &Path) -> Dr {
        Dr::new(config).env("TMPDIR", self.private_tmp())
    }

    /// `dr backup --database app`; returns the id.
    fn backup(&self, config: &Path) -> String {
        self.dr(config)
            .args(["backup", "--database", DB])
            .run()
            .assert_one_backup_id()
    }

    /// `dr drill --database app --json`: the output and its one report.
    fn drill(&self, config: &Path) -> (DrOutput, Value) {
        let out = self
            .dr(config)
            .args(["drill", "--database", DB, "--json"])
            .run();
        let report = one_report(&out);
        (out, report)
    }

    /// Keys of the stored drill reports.
    fn report_keys(&self) -> Vec<String> {
        let prefix = format!("{ENV}/{DB}/drills/");
        self.repo()
            .keys()
            .into_iter()
            .filter(|k| k.starts_with(&prefix))
            .collect()
    }

    /// The stored report of drill `id`, as text.
    fn stored_report(&self, id: &str) -> String {
        let key = format!("{ENV}/{DB}/drills/{id}.json");
        let keys = self.report_keys();
        assert!(
            keys.contains(&key),
            "no report {key} in the repository; drill reports there: {keys:?}"
        );
        String::from_utf8(self.repo().get(&key)).expect("the report is UTF-8")
    }

    fn data_object(&self, id: &str) -> PathBuf {
        self.repo_root()
            .join(format!("{ENV}/{DB}/backups/{id}/{DATA_OBJECT}"))
    }

    /// Asserts `dr` left nothing in its `$TMPDIR` (no staged archive).
    fn assert_private_tmp_empty(&self, after: &str) {
        let left = dir_entries(&self.private_tmp());
        assert!(
            left.is_empty(),
            "files left in dr's TMPDIR after {after}: {left:?}"
        );
    }
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The single report printed by `dr drill --json`.
fn one_report(out: &DrOutput) -> Value {
    let parsed: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "dr drill --json printed no JSON ({e}):\nstdout:\n{}\nstderr:\n{}",
            out.stdout, out.stderr
        )
    });
    match parsed {
        Value::Array(mut reports) if reports.len() == 1 => reports.remove(0),
        other => panic!(
            "dr drill --json should print an array of one report:\n{other:#}\nstderr:\n{}",
            out.stderr
        ),
    }
}

/// The check named `name` in `report`.
fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("the report has no check {name:?}:\n{report:#}"))
}

/// Asserts the text of a stored report names nothing of the database's content: no table,
/// schema or role of the seed, and no check SQL.
fn assert_no_content(report: &str, checks: &[&str]) {
    for name in SEED_NAMES {
        assert!(
            !report.contains(name),
            "the stored drill report names {name:?} in plaintext (invariant 4):\n{report}"
        );
    }
    for sql in checks {
        assert!(
            !report.contains(sql),
            "the stored drill report holds the check SQL {sql:?} (invariant 4):\n{report}"
        );
    }
    assert!(
        !report.to_lowercase().contains("select "),
        "the stored drill report holds SQL (invariant 4):\n{report}"
    );
}

fn databases_like(cluster: &PgCluster, pattern: &str) -> Vec<String> {
    cluster
        .psql(
            "postgres",
            &format!("SELECT datname FROM pg_database WHERE datname LIKE '{pattern}' ORDER BY 1"),
        )
        .lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

// ---------------------------------------------------------------------------------------
// Scratch leftovers

/// Directories where `dr` may put throwaway clusters and demo files: `/tmp` (always, as
/// root) and this process's temporary directory.
fn scratch_parents() -> BTreeSet<PathBuf> {
    [PathBuf::from("/tmp"), std::env::temp_dir()]
        .into_iter()
        .collect()
}

fn is_scratch_name(name: &str) -> bool {
    name.starts_with("dr-drill-") || name.starts_with("dr-demo-")
}

/// Every `dr-drill-*` / `dr-demo-*` directory in the scratch parents.
fn scratch_dirs() -> BTreeSet<PathBuf> {
    let mut dirs = BTreeSet::new();
    for parent in scratch_parents() {
        let Ok(entries) = fs::read_dir(&parent) else {
            continue;
        };
        for entry in entries.flatten() {
            if is_scratch_name(&entry.file_name().to_string_lossy()) {
                dirs.insert(entry.path());
            }
        }
    }
    dirs
}

/// Postmasters (`postgres -D DIR ...`) whose data directory lies in a `dr-drill-*` or
/// `dr-demo-*` directory: (pid, data directory).
fn scratch_postmasters() -> BTreeSet<(u32, String)> {
    let mut found = BTreeSet::new();
    for (pid, args) in processes() {
        if !runs_program(&args, "postgres") {
            continue;
        }
        let data_dir = args
            .iter()
            .position(|a| a == "-D")
            .and_then(|i| args.get(i + 1));
        if let Some(dir) = data_dir {
            if dir.contains("/dr-drill-") || dir.contains("/dr-demo-") {
                found.insert((pid, dir.clone()));
            }
        }
    }
    found
}

/// Every `/…/dr-drill-XXXX` path a `dr` log names (the ephemeral clusters it started).
fn drill_dirs_in_log(log: &str) -> BTreeSet<PathBuf> {
    let mut dirs = BTreeSet::new();
    for parent in scratch_parents() {
        let needle = format!("{}/dr-drill-", parent.display());
        let mut rest = log;
        while let Some(at) = rest.find(&needle) {
            let tail = &rest[at + needle.len()..];
            let len = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            dirs.insert(PathBuf::from(format!("{needle}{}", &tail[..len])));
            rest = &tail[len..];
        }
    }
    dirs
}

/// The scratch directories and postmasters that existed before a test's drills (taken
/// while holding [`SCRATCH`]).
struct Leftovers {
    dirs: BTreeSet<PathBuf>,
    postmasters: BTreeSet<(u32, String)>,
    started: SystemTime,
}

impl Leftovers {
    fn snapshot() -> Leftovers {
        Leftovers {
            dirs: scratch_dirs(),
            postmasters: scratch_postmasters(),
            // Directory mtimes have coarse granularity on some filesystems.
            started: SystemTime::now() - Duration::from_secs(1),
        }
    }

    /// Asserts no scratch directory or postmaster appeared since the snapshot, and none
    /// of the cluster directories `log` names still exists.
    fn assert_nothing_new(&self, after: &str, log: &str) {
        let mut problems = Vec::new();
        let named = drill_dirs_in_log(log);
        let still_there: Vec<&PathBuf> = named.iter().filter(|d| d.exists()).collect();
        if !still_there.is_empty() {
            problems.push(format!(
                "ephemeral cluster directories left: {still_there:?}"
            ));
        }
        // Give a just-stopped postmaster a moment to disappear from /proc.
        let mut new_postmasters = Vec::new();
        wait_until(Duration::from_secs(10), || {
            new_postmasters = scratch_postmasters()
                .difference(&self.postmasters)
                .cloned()
                .collect();
            new_postmasters.is_empty()
        });
        if !new_postmasters.is_empty() {
            problems.push(format!(
                "PostgreSQL servers left running: {new_postmasters:?}"
            ));
        }
        let new_dirs: Vec<PathBuf> = scratch_dirs()
            .difference(&self.dirs)
            .filter(|d| {
                fs::metadata(d)
                    .and_then(|m| m.modified())
                    .map_or(true, |t| t >= self.started)
            })
            .cloned()
            .collect();
        if !new_dirs.is_empty() {
            problems.push(format!("scratch directories left: {new_dirs:?}"));
        }
        if !problems.is_empty() {
            reap_leftovers(log);
            panic!("after {after}:\n  {}\nlog:\n{log}", problems.join("\n  "));
        }
    }
}

/// Cleans up after a failed test what `dr` left behind, so one failure does not litter
/// the machine: stops the postmasters (by pid, SIGQUIT = immediate shutdown) of the
/// ephemeral clusters `log` names, then removes their directories. Only clusters this
/// test's `dr` started are touched.
fn reap_leftovers(log: &str) {
    let named = drill_dirs_in_log(log);
    for (pid, data_dir) in scratch_postmasters() {
        if named.iter().any(|d| Path::new(&data_dir).starts_with(d)) {
            // SAFETY: kill(2) on a postmaster our own `dr` started (its -D is in a
            // directory that `dr` logged as its ephemeral cluster).
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGQUIT);
            }
            wait_until(Duration::from_secs(10), || {
                !Path::new(&format!("/proc/{pid}")).exists()
            });
        }
    }
    for dir in named {
        let _ = fs::remove_dir_all(&dir);
    }
}

/// Runs `dr` with a time limit: its output, or a panic (after killing it) on timeout.
fn run_with_timeout(dr: Dr, limit: Duration) -> (DrOutput, Duration) {
    let started = Instant::now();
    let mut child = dr.spawn();
    let reader = |stream: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut s) = stream {
                let _ = s.read_to_end(&mut text);
            }
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for dr") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "dr did not finish within {limit:?}:\nstdout:\n{}\nstderr:\n{}",
                out.join().unwrap_or_default(),
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let elapsed = started.elapsed();
    let output = DrOutput {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    };
    (output, elapsed)
}

// ---------------------------------------------------------------------------------------
// Ephemeral drills

#[test]
fn drill_on_a_good_backup_passes_with_rto_and_a_report() {
    let bed = Bed::new();
    let config = bed.config("cfg", &Spec::ephemeral());
    let backup = bed.backup(&config);
    let objects = &bed.repo().backups(ENV, DB)[0].objects;
    assert!(
        objects.iter().any(|o| o == ROWCOUNTS_OBJECT),
        "a backup of a database with a drill section should store {ROWCOUNTS_OBJECT}: {objects:?}"
    );

    let _guard = scratch_lock();
    let before = Leftovers::snapshot();
    let (out, report) = bed.drill(&config);
    out.assert_success();

    assert_eq!(report["passed"], true, "{report:#}");
    assert_eq!(report["rto_breached"], false, "{report:#}");
    assert_eq!(report["database"], DB, "{report:#}");
    assert_eq!(report["backup_id"], backup.as_str(), "{report:#}");
    assert_eq!(report["target"], "ephemeral", "{report:#}");
    assert!(report["error"].is_null(), "{report:#}");
    let rto = report["rto_seconds"].as_f64().unwrap_or(0.0);
    assert!(rto > 0.0, "rto_seconds is not positive: {report:#}");
    assert_eq!(
        report["rto_objective_seconds"].as_f64(),
        Some(3600.0),
        "{report:#}"
    );
    for stage in [
        "prepare",
        "fetch",
        "decrypt_decompress",
        "restore",
        "checks",
    ] {
        let seconds = report["stages"][stage].as_f64();
        assert!(
            seconds.is_some_and(|s| s >= 0.0 && s <= rto),
            "stages.{stage} missing or larger than the RTO: {report:#}"
        );
    }
    for name in ["pg_restore", "row counts", "check #1"] {
        assert_eq!(check(&report, name)["passed"], true, "{report:#}");
    }
    let counts = check(&report, "row counts")["detail"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        !counts.contains("skipped"),
        "row counts were not compared although the backup recorded them: {report:#}"
    );

    let id = report["id"].as_str().expect("the report has an id");
    let stored = bed.stored_report(id);
    let stored_json: Value = serde_json::from_str(&stored).expect("the stored report is JSON");
    assert_eq!(stored_json["passed"], true, "{stored}");
    assert_eq!(stored_json["id"], id, "{stored}");
    assert_no_content(&stored, &[GOOD_CHECK]);
    assert_no_content(&out.stdout, &[GOOD_CHECK]);

    let named = drill_dirs_in_log(&out.stderr);
    assert!(
        !named.is_empty(),
        "dr's log does not say where the ephemeral cluster lived:\n{}",
        out.stderr
    );
    before.assert_nothing_new("a passing drill", &out.stderr);
    bed.assert_private_tmp_empty("a passing drill");
}

#[test]
fn drill_on_a_corrupted_backup_fails_notifies_and_leaves_nothing_behind() {
    let bed = Bed::new();
    let hook = WebhookReceiver::start();
    let port = free_port();
    let spec = Spec::ephemeral()
        .drill_line("cron = \"*/5 * * * * *\"")
        .extra(&format!(
            "[agent]\nlisten = \"127.0.0.1:{port}\"\ntimezone = \"UTC\"\n\n[[notify]]\nurl = {}\nformat = \"json\"\n",
            toml_str(&hook.url("/hook"))
        ));
    let config = bed.config("cfg", &spec);
    let backup = bed.backup(&config);
    let object = bed.data_object(&backup);
    let mut bytes = fs::read(&object).expect("read the data object");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    fs::write(&object, &bytes).expect("write the flipped data object");

    let _guard = scratch_lock();
    let before = Leftovers::snapshot();
    // Run by hand, the drill fails, names the corruption, and cleans up.
    let (out, report) = bed.drill(&config);
    assert!(
        !out.status.success(),
        "dr drill of a corrupted backup exited 0:\n{}",
        out.both()
    );
    assert_eq!(report["passed"], false, "{report:#}");
    assert_eq!(report["backup_id"], backup.as_str(), "{report:#}");
    let error = report["error"].as_str().unwrap_or("").to_lowercase();
    assert!(
        error.contains("corrupt"),
        "the report's error does not mention corruption: {report:#}"
    );
    let id = report["id"].as_str().expect("id");
    let stored: Value = serde_json::from_str(&bed.stored_report(id)).expect("JSON report");
    assert_eq!(stored["passed"], false, "{stored:#}");
    assert!(
        stored["error"]
            .as_str()
            .is_some_and(|e| e.to_lowercase().contains("corrupt")),
        "{stored:#}"
    );
    before.assert_nothing_new("a drill of a corrupted backup", &out.stderr);
    bed.assert_private_tmp_empty("a drill of a corrupted backup");

    // The agent runs the same drill on its schedule.
    let mut agent = Agent::start(bed.dr(&config), port);
    let notified = wait_until(Duration::from_secs(90), || {
        hook.events().iter().any(|e| e == "drill_failed")
    });
    assert!(
        notified,
        "no drill_failed webhook within 90 s (events: {:?}):\n{}",
        hook.events(),
        agent.log()
    );
    let body = hook
        .json_bodies()
        .into_iter()
        .find(|b| b["event"] == "drill_failed")
        .expect("a drill_failed body");
    assert_eq!(
        hook.requests()[0].path,
        "/hook",
        "the webhook went to the wrong path"
    );
    assert!(
        body.to_string().contains(DB),
        "the drill_failed webhook does not name the database: {body:#}"
    );
    let metrics = agent.metrics();
    let failures = metric_value(
        &metrics,
        "dr_drill_failures_total",
        &[("environment", ENV), ("database", DB)],
    );
    assert!(
        failures.is_some_and(|n| n >= 1.0),
        "dr_drill_failures_total should be at least 1 after a failed drill, got {failures:?}:\n{metrics}"
    );
    let backups_before_stop = bed.repo().committed_ids(ENV, DB);
    // Stop the agent while a scheduled drill has its throwaway cluster running: shutdown
    // must still stop and remove it.
    let started_clusters = agent.log_count("ephemeral cluster started");
    let mid_drill = wait_until(Duration::from_secs(20), || {
        agent.log_count("ephemeral cluster started") > started_clusters
    });
    agent.signal(libc::SIGTERM);
    let exited = agent.wait_exit(Duration::from_secs(60));
    let log = agent.log();
    assert!(
        mid_drill,
        "no further scheduled drill started its cluster within 20 s:\n{log}"
    );
    // Collect every problem of the shutdown before failing, so one run shows them all.
    let mut problems = Vec::new();
    match exited {
        None => problems.push("the agent did not exit within 60 s of SIGTERM".to_string()),
        Some((status, took)) => {
            if took > Duration::from_secs(10) {
                problems.push(format!(
                    "the agent took {took:?} to exit on SIGTERM during a drill (it should abort the drill at once)"
                ));
            }
            if !status.success() {
                problems.push(format!("the agent exited {status} on SIGTERM"));
            }
        }
    }
    let left_tmp = dir_entries(&bed.private_tmp());
    if !left_tmp.is_empty() {
        problems.push(format!("staging files left in dr's TMPDIR: {left_tmp:?}"));
    }
    let still_there: Vec<PathBuf> = drill_dirs_in_log(&log)
        .into_iter()
        .filter(|d| d.exists())
        .collect();
    if !still_there.is_empty() {
        problems.push(format!(
            "ephemeral cluster directories left: {still_there:?}"
        ));
    }
    if !problems.is_empty() {
        reap_leftovers(&log);
        panic!(
            "SIGTERM to the agent during a scheduled drill:\n  {}\nlog:\n{log}",
            problems.join("\n  ")
        );
    }
    assert_eq!(
        backups_before_stop,
        vec![backup.clone()],
        "the agent took a backup although none was due:\n{log}"
    );
    before.assert_nothing_new("scheduled drills and the agent's shutdown", &log);

    // The agent's reports are in the repository and say what went wrong.
    let keys = bed.report_keys();
    assert!(
        keys.len() >= 2,
        "the agent stored no drill report (reports: {keys:?}):\n{log}"
    );
    for key in &keys {
        let text = String::from_utf8(bed.repo().get(key)).expect("UTF-8 report");
        let report: Value = serde_json::from_str(&text).expect("JSON report");
        assert_eq!(report["passed"], false, "{key}: {report:#}");
        assert_no_content(&text, &[GOOD_CHECK]);
    }
}

#[test]
fn failing_user_check_fails_the_drill() {
    let bed = Bed::new();
    let config = bed.config("cfg", &Spec::ephemeral().checks(&["select false"]));
    bed.backup(&config);

    let _guard = scratch_lock();
    let before = Leftovers::snapshot();
    let (out, report) = bed.drill(&config);
    assert!(
        !out.status.success(),
        "a drill whose check returns false exited 0:\n{}",
        out.both()
    );
    assert_eq!(report["passed"], false, "{report:#}");
    assert_eq!(check(&report, "check #1")["passed"], false, "{report:#}");
    assert_eq!(check(&report, "pg_restore")["passed"], true, "{report:#}");
    assert_eq!(check(&report, "row counts")["passed"], true, "{report:#}");
    let id = report["id"].as_str().expect("id");
    let stored = bed.stored_report(id);
    let stored_json: Value = serde_json::from_str(&stored).expect("JSON report");
    assert_eq!(stored_json["passed"], false, "{stored}");
    assert_no_content(&stored, &["select false"]);
    before.assert_nothing_new("a drill with a failing check", &out.stderr);
    bed.assert_private_tmp_empty("a drill with a failing check");
}

#[test]
fn rto_objective_of_one_second_is_reported_as_a_breach() {
    let bed = Bed::new();
    let config = bed.config("cfg", &Spec::ephemeral().rto("1s"));
    bed.backup(&config);

    let _guard = scratch_lock();
    let before = Leftovers::snapshot();
    let (out, report) = bed.drill(&config);
    let rto = report["rto_seconds"].as_f64().unwrap_or(0.0);
    // Starting a throwaway cluster and restoring the seed take well over a second.
    assert!(
        rto > 1.0,
        "the drill took only {rto} s, too fast to breach a 1 s objective: {report:#}"
    );
    assert_eq!(
        report["rto_objective_seconds"].as_f64(),
        Some(1.0),
        "{report:#}"
    );
    assert_eq!(report["rto_breached"], true, "{report:#}");
    assert_eq!(report["passed"], true, "{report:#}");
    assert!(
        !out.status.success(),
        "a drill that breached its RTO exited 0:\n{}",
        out.both()
    );
    let id = report["id"].as_str().expect("id");
    let stored: Value = serde_json::from_str(&bed.stored_report(id)).expect("JSON report");
    assert_eq!(stored["rto_breached"], true, "{stored:#}");
    before.assert_nothing_new("a drill that breached its RTO", &out.stderr);
}

#[test]
fn drill_history_lists_and_plots() {
    let bed = Bed::new();
    let config = bed.config("cfg", &Spec::ephemeral());
    bed.backup(&config);

    let ids: Vec<String> = {
        let _guard = scratch_lock();
        (0..2)
            .map(|_| {
                let (out, report) = bed.drill(&config);
                out.assert_success();
                report["id"].as_str().expect("id").to_string()
            })
            .collect()
    };
    assert_ne!(ids[0], ids[1], "two drills got the same id");

    let out = bed
        .dr(&config)
        .args(["drill", "history", "--database", DB, "--json"])
        .run();
    out.assert_success();
    let history: Vec<Value> = serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "dr drill history --json is not a JSON array ({e}):\n{}",
            out.stdout
        )
    });
    let listed: Vec<&str> = history.iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(
        listed,
        ids.iter().map(String::as_str).collect::<Vec<_>>(),
        "history should list both drills, oldest first:\n{}",
        out.stdout
    );
    for r in &history {
        assert_eq!(r["passed"], true, "{r:#}");
        assert!(r["rto_seconds"].as_f64().unwrap_or(0.0) > 0.0, "{r:#}");
    }

    let plain = bed.dr(&config).args(["drill", "history"]).run();
    plain.assert_success();
    for id in &ids {
        assert!(
            plain.stdout.contains(id.as_str()),
            "dr drill history does not list {id}:\n{}",
            plain.stdout
        );
    }

    let svg = bed.dir().join("rto.svg");
    let out = bed
        .dr(&config)
        .args(["drill", "history", "--database", DB, "--plot"])
        .arg(&svg)
        .run();
    out.assert_success();
    let text = fs::read_to_string(&svg)
        .unwrap_or_else(|e| panic!("dr drill history --plot wrote no {}: {e}", svg.display()));
    assert!(
        text.trim_start().starts_with("<svg") && text.trim_end().ends_with("</svg>"),
        "not an SVG document:\n{text}"
    );
    assert_eq!(
        text.matches("<circle").count(),
        2,
        "the plot should have one point per drill:\n{text}"
    );
}

// ---------------------------------------------------------------------------------------
// Scratch servers

#[test]
fn server_target_equal_to_the_source_is_refused() {
    let bed = Bed::new();
    let config = bed.config(
        "cfg",
        &Spec::server(&bed.cluster.url("postgres"), &bed.password_file),
    );
    bed.backup(&config);
    let databases_before = databases_like(&bed.cluster, "%");

    let (out, report) = bed.drill(&config);
    assert!(
        !out.status.success(),
        "a drill into the backed-up server itself exited 0:\n{}",
        out.both()
    );
    assert_eq!(report["passed"], false, "{report:#}");
    let error = report["error"].as_str().unwrap_or("").to_lowercase();
    assert!(
        error.contains("same system_identifier") || error.contains("backed-up server itself"),
        "the report's error does not say the target is the source server: {report:#}"
    );
    assert!(
        report["checks"]
            .as_array()
            .is_none_or(|c| c.iter().all(|c| c["name"] != "pg_restore")),
        "the refused drill still restored: {report:#}"
    );
    assert_eq!(
        databases_like(&bed.cluster, "dr\\_drill\\_%"),
        Vec::<String>::new(),
        "a refused drill created a database on the source server"
    );
    assert_eq!(
        databases_like(&bed.cluster, "%"),
        databases_before,
        "a refused drill changed the source server's databases"
    );
    let id = report["id"].as_str().expect("id");
    let stored: Value = serde_json::from_str(&bed.stored_report(id)).expect("JSON report");
    assert_eq!(stored["passed"], false, "{stored:#}");
}

#[test]
fn drill_never_drops_a_database_it_did_not_create() {
    let bed = Bed::new();
    let scratch = PgCluster::start();
    let scratch_pw = bed.dir().join("scratch.pw");
    write_secret_file(&scratch_pw, scratch.password());
    scratch.create_db("dr_drill_app_x");
    scratch.psql(
        "dr_drill_app_x",
        "CREATE TABLE keep_me (x int); INSERT INTO keep_me VALUES (42)",
    );
    let config = bed.config("cfg", &Spec::server(&scratch.url("postgres"), &scratch_pw));
    let backup = bed.backup(&config);

    let (out, report) = bed.drill(&config);
    out.assert_success();
    assert_eq!(report["passed"], true, "{report:#}");
    assert_eq!(report["target"], "server", "{report:#}");
    assert_eq!(report["backup_id"], backup.as_str(), "{report:#}");
    for name in ["pg_restore", "row counts", "check #1"] {
        assert_eq!(check(&report, name)["passed"], true, "{report:#}");
    }

    assert_eq!(
        scratch.psql("dr_drill_app_x", "SELECT x FROM keep_me"),
        "42",
        "the drill changed a database it did not create"
    );
    assert_eq!(
        databases_like(&scratch, "dr\\_drill\\_%"),
        vec!["dr_drill_app_x".to_string()],
        "the drill's own database should be gone and the pre-existing one kept"
    );
    assert_eq!(
        databases_like(&bed.cluster, "dr\\_drill\\_%"),
        Vec::<String>::new(),
        "the drill created a database on the source server"
    );
    let stored = bed.stored_report(report["id"].as_str().expect("id"));
    assert_no_content(&stored, &[GOOD_CHECK]);
    assert!(
        !stored.contains(scratch.password()) && !stored.contains(bed.cluster.password()),
        "the stored report holds a password:\n{stored}"
    );
    bed.assert_private_tmp_empty("a drill on a scratch server");
}

// ---------------------------------------------------------------------------------------
// dr demo

#[test]
fn demo_runs_to_completion_and_cleans_up() {
    let _guard = scratch_lock();
    let before = Leftovers::snapshot();
    let (out, elapsed) =
        run_with_timeout(Dr::without_config().arg("demo"), Duration::from_secs(90));
    out.assert_success();
    let text = out.both();
    assert!(
        text.contains("PASSED"),
        "dr demo did not report a passed drill:\n{text}"
    );
    assert!(
        text.contains("Cleaned up"),
        "dr demo did not say it cleaned up:\n{text}"
    );
    assert!(
        elapsed < Duration::from_secs(90),
        "dr demo took {elapsed:?}"
    );
    before.assert_nothing_new("dr demo", &text);
}

#[test]
fn ctrl_c_during_a_drill_stops_it_and_leaves_nothing_behind() {
    let bed = Bed::new();
    // Enough incompressible data that fetching and decoding take a while: the interrupt
    // lands while the archive is being staged.
    seed_incompressible(&bed.cluster, DB, 24);
    let config = bed.config("cfg", &Spec::ephemeral());
    bed.backup(&config);

    let _guard = scratch_lock();
    let before = Leftovers::snapshot();
    let mut child = bed
        .dr(&config)
        .args(["drill", "--database", DB, "--json"])
        .spawn();
    let log = std::sync::Arc::new(Mutex::new(String::new()));
    let reader = {
        let log = log.clone();
        let mut stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                log.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let text = || log.lock().unwrap_or_else(|e| e.into_inner()).clone();
    // Interrupt as the restore begins, while the throwaway cluster runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    let started = loop {
        if text().contains("ephemeral cluster started") {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(started, "the drill never started its cluster:\n{}", text());
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let interrupted = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for dr") {
            break Some(status);
        }
        if interrupted.elapsed() > Duration::from_secs(30) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = interrupted.elapsed();
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = reader.join();
    let log = text();
    let Some(status) = status else {
        let postmasters = scratch_postmasters();
        let bed_tmp = dir_entries(&bed.private_tmp());
        reap_leftovers(&log);
        panic!(
            "dr drill did not exit within 30 s of SIGINT (killed it); it left running \
             {postmasters:?} and staging files {bed_tmp:?}:\n{log}"
        );
    };
    assert!(
        took < Duration::from_secs(10),
        "dr drill took {took:?} to exit on SIGINT:\n{log}"
    );
    assert!(!status.success(), "an interrupted drill exited 0:\n{log}");
    before.assert_nothing_new("an interrupted drill", &log);
    bed.assert_private_tmp_empty("an interrupted drill");
}

// ---------------------------------------------------------------------------------------
// The ephemeral cluster's isolation, durability and what its reports may say

/// Secrets put in `dr`'s environment: no throwaway server may inherit one.
const DR_SECRETS: &[(&str, &str)] = &[
    ("AWS_SECRET_ACCESS_KEY", "drill-secret-aws-5f1c0e"),
    ("PGPASSWORD", "drill-secret-pg-77a2d4"),
    ("DR_SOMETHING", "drill-secret-dr-91be3a"),
];

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A `dr` whose stderr is read into a shared string while it runs.
struct Running {
    child: std::process::Child,
    log: std::sync::Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    fn start(dr: Dr) -> Running {
        let mut child = dr.spawn();
        let log = std::sync::Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Running {
            child,
            log,
            reader: Some(reader),
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The postmaster (pid, data directory) of the ephemeral cluster this `dr` started.
    fn wait_for_postmaster(&self, limit: Duration) -> Option<(u32, PathBuf)> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let named = drill_dirs_in_log(&self.log());
            for (pid, data) in scratch_postmasters() {
                if named.iter().any(|d| Path::new(&data).starts_with(d)) {
                    return Some((pid, PathBuf::from(data)));
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Waits for `dr` to exit (killing it after `limit`) and returns its output.
    fn finish(mut self, limit: Duration) -> DrOutput {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for dr") {
                break status;
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let log = self.log();
                reap_leftovers(&log);
                panic!("dr did not finish within {limit:?}:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let mut stdout = String::new();
        if let Some(mut s) = self.child.stdout.take() {
            let _ = s.read_to_string(&mut stdout);
        }
        DrOutput {
            status,
            stdout,
            stderr: self.log(),
        }
    }
}

impl Drop for Running {
    /// A test that panics mid-drill kills its `dr` and what it left.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            reap_leftovers(&self.log());
        }
    }
}

/// Inodes of the TCP sockets in LISTEN state that process `pid` holds.
fn tcp_listeners_of(pid: u32) -> Vec<String> {
    let mut inodes = BTreeSet::new();
    if let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(link) = fs::read_link(fd.path()) {
                let link = link.to_string_lossy().into_owned();
                if let Some(inode) = link
                    .strip_prefix("socket:[")
                    .and_then(|s| s.strip_suffix(']'))
                {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // local_address, state 0A = LISTEN, inode is the tenth column.
            if cols.len() > 9 && cols[3] == "0A" && inodes.contains(cols[9]) {
                found.push(format!("{table} {}", cols[1]));
            }
        }
    }
    found
}

/// `psql -c 'select 1'` with a conninfo string, as `user` (via runuser) or as ourselves,
/// with a clean environment. Returns whether it connected, and its stderr.
fn psql_as(user: Option<&str>, conninfo: &str) -> (bool, String) {
    let psql = dr_tests::pg_bindir().join("psql");
    let mut cmd = match user {
        Some(u) => {
            let mut c = std::process::Command::new("/usr/sbin/runuser");
            c.args(["-u", u, "--"]).arg(&psql);
            c
        }
        None => std::process::Command::new(&psql),
    };
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .current_dir("/")
        .args(["-X", "-w", "-A", "-t", "-c", "select 1", conninfo]);
    let out = cmd.output().expect("run psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The environment of process `pid` and of its children, as text.
fn environ_of_tree(pid: u32) -> String {
    let mut text = fs::read(format!("/proc/{pid}/environ"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', "\n"))
        .unwrap_or_default();
    if let Ok(entries) = fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(pid) {
                if let Ok(b) = fs::read(format!("/proc/{child}/environ")) {
                    text.push_str(&String::from_utf8_lossy(&b).replace('\0', "\n"));
                }
            }
        }
    }
    text
}

#[test]
fn ephemeral_cluster_admits_no_other_user_and_inherits_no_secret() {
    if !running_as_root() {
        eprintln!(
            "skipped: acting as another OS user (runuser -u nobody) and reading a server's \
             /proc/PID/environ need root"
        );
        return;
    }
    let bed = Bed::new();
    // The last check keeps the cluster up long enough to probe it.
    let config = bed.config(
        "cfg",
        &Spec::ephemeral().checks(&[GOOD_CHECK, "select true from pg_sleep(15)"]),
    );
    bed.backup(&config);

    let _guard = scratch_lock();
    let before = Leftovers::snapshot();
    let mut dr = bed.dr(&config).args(["drill", "--database", DB, "--json"]);
    for (k, v) in DR_SECRETS {
        dr = dr.env(k, v);
    }
    let running = Running::start(dr);
    let Some((pid, data)) = running.wait_for_postmaster(Duration::from_secs(60)) else {
        let out = running.finish(Duration::from_secs(120));
        panic!("the drill never started its cluster:\n{}", out.stderr);
    };
    let pid_file = fs::read_to_string(data.join("postmaster.pid")).unwrap_or_default();
    let lines: Vec<&str> = pid_file.lines().collect();
    let port = lines.get(3).copied().unwrap_or("5432").trim().to_string();
    let socket_dir = lines.get(4).copied().unwrap_or("").trim().to_string();

    let mut problems = Vec::new();
    let listeners = tcp_listeners_of(pid);
    if !listeners.is_empty() {
        problems.push(format!(
            "the ephemeral postmaster listens on TCP: {listeners:?}"
        ));
    }
    for host in ["127.0.0.1", "::1", "localhost"] {
        let conninfo =
            format!("host={host} port={port} user=postgres dbname=postgres connect_timeout=5");
        let (ok, _) = psql_as(Some("nobody"), &conninfo);
        if ok {
            problems.push(format!("user nobody connected over TCP: {conninfo}"));
        }
    }
    if socket_dir.is_empty() {
        problems.push(format!(
            "the postmaster has no socket directory:\n{pid_file}"
        ));
    } else {
        let conninfo = format!(
            "host={socket_dir} port={port} user=postgres dbname=postgres connect_timeout=5"
        );
        let (ok, _) = psql_as(Some("nobody"), &conninfo);
        if ok {
            problems.push(format!("user nobody connected over the socket: {conninfo}"));
        }
        // The control: dr's own user (root) does reach the socket, so nobody's failure
        // is the directory's permissions, not a wrong address.
        let (ok, err) = psql_as(None, &conninfo);
        if !ok {
            problems.push(format!(
                "root cannot connect over the socket ({conninfo}): {err}"
            ));
        }
        let mode = fs::metadata(&socket_dir)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .unwrap_or(0);
        if mode & 0o077 != 0 {
            problems.push(format!(
                "the socket directory {socket_dir} has mode {mode:o}: others may enter it"
            ));
        }
        for (setting, expected) in [
            ("jit", "off"),
            ("fsync", "on"),
            ("full_page_writes", "on"),
            ("synchronous_commit", "on"),
            ("listen_addresses", ""),
        ] {
            let out = std::process::Command::new(dr_tests::pg_bindir().join("psql"))
                .env_clear()
                .args([
                    "-X",
                    "-w",
                    "-A",
                    "-t",
                    "-c",
                    &format!("show {setting}"),
                    &conninfo,
                ])
                .output()
                .expect("run psql");
            let value = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if value != expected {
                problems.push(format!("{setting} = {value:?}, expected {expected:?}"));
            }
        }
    }
    let environ = environ_of_tree(pid);
    for (name, value) in DR_SECRETS {
        if environ.contains(name) || environ.contains(value) {
            problems.push(format!(
                "the ephemeral server's environment holds {name} from dr's environment"
            ));
        }
    }
    // Variables pg_ctl and postgres set themselves.
    const SET_BY_POSTGRES: &[&str] = &[
        "PGDATA",
        "PG_GRANDPARENT_PID",
        "PGLOCALEDIR",
        "PGSYSCONFDIR",
    ];
    for line in environ.lines() {
        let name = line.split('=').next().unwrap_or("");
        if SET_BY_POSTGRES.contains(&name) {
            continue;
        }
        if line.starts_with("PG") || line.starts_with("AWS") || line.starts_with("DR_") {
            problems.push(format!("the ephemeral server's environment holds {line:?}"));
        }
    }

    let out = running.finish(Duration::from_secs(180));
    assert!(
        problems.is_empty(),
        "{}\nlog:\n{}",
        problems.join("\n"),
        out.stderr
    );
    out.assert_success();
    let report = one_report(&out);
    assert_eq!(report["passed"], true, "{report:#}");
    assert_eq!(report["rto_representative"], true, "{report:#}");
    for (_, value) in DR_SECRETS {
        assert!(
            !out.both().contains(value),
            "a secret reached dr's output:\n{}",
            out.both()
        );
    }
    before.assert_nothing_new("a drill probed by another user", &out.stderr);
}

#[test]
fn fast_ephemeral_drill_says_its_rto_is_not_representative() {
    let bed = Bed::new();
    let config = bed.config("cfg", &Spec::ephemeral().drill_line("durability = \"off\""));
    bed.backup(&config);

    let _guard = scratch_lock();
    let before = Leftovers::snapshot();
    let (out, report) = bed.drill(&config);
    out.assert_success();
    assert_eq!(report["passed"], true, "{report:#}");
    assert_eq!(report["rto_representative"], false, "{report:#}");
    let stored = bed.stored_report(report["id"].as_str().expect("id"));
    let stored: Value = serde_json::from_str(&stored).expect("JSON report");
    assert_eq!(stored["rto_representative"], false, "{stored:#}");

    let text = bed.dr(&config).args(["drill", "--database", DB]).run();
    text.assert_success();
    assert!(
        text.stdout.contains("RTO not representative"),
        "dr drill does not say the RTO of a drill without durability is not representative:\n{}",
        text.stdout
    );
    before.assert_nothing_new("a fast drill", &format!("{}{}", out.stderr, text.stderr));
}

/// The table and a value in it that a failing restore's error text names.
const PATIENT_TABLE: &str = "patient_records";
const PATIENT_VALUE: &str = "ZEBRA-4471-okapi";

#[test]
fn failed_restore_leaves_no_table_name_or_value_in_the_repository() {
    let bed = Bed::new();
    // The check's function is made strict after the row went in: the dump holds the row
    // and the strict function, so the restore's COPY fails naming the table and the row.
    bed.cluster.psql(
        DB,
        &format!(
            "create function pr_ok(t text) returns boolean language sql immutable as 'select true';
             create table {PATIENT_TABLE} (id int primary key, note text check (pr_ok(note)));
             insert into {PATIENT_TABLE} values (1, '{PATIENT_VALUE}');
             create or replace function pr_ok(t text) returns boolean language sql immutable
               as $$select t <> '{PATIENT_VALUE}'$$;"
        ),
    );
    let config = bed.config("cfg", &Spec::ephemeral());
    bed.backup(&config);

    let _guard = scratch_lock();
    let before = Leftovers::snapshot();
    let (out, report) = bed.drill(&config);
    assert!(
        !out.status.success(),
        "a drill whose restore failed exited 0:\n{}",
        out.both()
    );
    assert_eq!(report["passed"], false, "{report:#}");
    // The local log has the details, so the failure really names the table...
    assert!(
        out.stderr.contains(PATIENT_TABLE),
        "the restore did not fail on {PATIENT_TABLE} (the test proves nothing):\n{}",
        out.stderr
    );
    // ...and the report a category with the exit code.
    let error = report["error"].as_str().unwrap_or("");
    assert!(
        error.contains("pg_restore") && error.contains("exit"),
        "the report does not say pg_restore failed and how: {report:#}"
    );
    let mut leaks = Vec::new();
    for path in files_under(&bed.repo_root()) {
        let bytes = fs::read(&path).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        for needle in [PATIENT_TABLE, PATIENT_VALUE, "pr_ok"] {
            if text.contains(needle) {
                leaks.push(format!("{} holds {needle:?}", path.display()));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "content in the repository:\n{}",
        leaks.join("\n")
    );
    for needle in [PATIENT_TABLE, PATIENT_VALUE] {
        assert!(
            !out.stdout.contains(needle),
            "dr drill --json printed {needle:?} (the report is what gets stored):\n{}",
            out.stdout
        );
    }
    before.assert_nothing_new("a drill whose restore failed", &out.stderr);
    bed.assert_private_tmp_empty("a drill whose restore failed");
}

/// Every regular file below `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files
}
