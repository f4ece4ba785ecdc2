//! End-to-end tests of `dr continuous setup | teardown` against a real PostgreSQL 15 with
//! `wal_level = logical`.
//!
//! What they prove: setup never makes the source's writes fail (a table without replica
//! identity is listed and setup refuses, changing nothing, until the operator chooses
//! REPLICA IDENTITY FULL for it); each missing prerequisite is named with its fix; setup is
//! all or nothing and idempotent; teardown leaves no slot and no publication.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use std::time::Duration;

use dr_tests::{
    decrypt_to_bytes, encryption_toml, free_port, keygen, metric_value, wait_until, write_config,
    Agent, Dr, DrOutput, Garage, PgCluster, Storage, WebhookReceiver,
};
use serde_json::Value;
use tempfile::TempDir;

const DB: &str = "app";

struct Bed {
    tmp: TempDir,
    cluster: PgCluster,
    recipient: String,
    identity: PathBuf,
    /// The repository: `file://` in the test directory unless a test points it at Garage.
    storage: Storage,
}

impl Bed {
    fn new(cluster: PgCluster) -> Bed {
        let tmp = tempfile::Builder::new()
            .prefix("dr-continuous-")
            .tempdir()
            .expect("create test dir");
        let keys = keygen(tmp.path());
        cluster.create_db(DB);
        let storage = Storage::File(tmp.path().join("repo"));
        Bed {
            tmp,
            cluster,
            recipient: keys.recipient,
            identity: keys.identity,
            storage,
        }
    }

    /// A config for `app` reached as `user` (password from a file), with `continuous` as
    /// the body of its [databases.continuous] section.
    fn config(&self, user: &str, password: &str, continuous: &str) -> PathBuf {
        self.config_with(user, password, continuous, "")
    }

    /// Like [`Bed::config`], with `extra` (top-level tables) after the database.
    fn config_with(&self, user: &str, password: &str, continuous: &str, extra: &str) -> PathBuf {
        let secret = self.tmp.path().join(format!("{user}.password"));
        fs::write(&secret, format!("{password}\n")).unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        let url = format!("postgres://{user}@127.0.0.1:{}/{DB}", self.cluster.port());
        let body = encryption_toml(&[&self.recipient], None)
            + &format!(
                "[[databases]]\nname = \"{DB}\"\nurl = \"{url}\"\npassword_file = \"{}\"\n  [databases.continuous]\n{continuous}\n\n{extra}",
                secret.display()
            );
        write_config(self.tmp.path(), &self.storage, &body)
    }

    fn superuser_config(&self, continuous: &str) -> PathBuf {
        self.config("postgres", self.cluster.password(), continuous)
    }

    fn dr(config: &Path, args: &[&str]) -> DrOutput {
        Dr::new(config).args(args).run()
    }

    fn sql(&self, sql: &str) -> String {
        self.cluster.psql(DB, sql)
    }

    /// (publications, logical slots) on the cluster.
    fn published(&self) -> (String, String) {
        (
            self.sql("SELECT coalesce(string_agg(pubname || ':' || puballtables, ','), '') FROM pg_publication"),
            self.sql("SELECT coalesce(string_agg(slot_name || ':' || plugin || ':' || database, ','), '') FROM pg_replication_slots"),
        )
    }

    /// UPDATE and DELETE on every table without a primary key still work.
    fn writes_work(&self) {
        for table in ["public.events", r#""odd.schema"."log ""x""""#] {
            self.sql(&format!("UPDATE {table} SET what = what || '!'"));
            self.sql(&format!("DELETE FROM {table} WHERE what = 'gone!'"));
            self.sql(&format!("INSERT INTO {table} (what) VALUES ('gone')"));
        }
    }
}

fn json(out: &DrOutput) -> Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON on stdout ({e}):\nstdout:\n{}\nstderr:\n{}",
            out.stdout, out.stderr
        )
    })
}

const ODD: &str = r#""odd.schema"."log ""x""""#;

#[test]
fn setup_refuses_tables_without_identity_until_chosen_and_teardown_removes_everything() {
    let bed = Bed::new(PgCluster::start_logical());
    bed.sql(
        r#"CREATE TABLE orders (id serial PRIMARY KEY, what text);
           CREATE TABLE events (at timestamptz DEFAULT now(), what text);
           CREATE SCHEMA "odd.schema";
           CREATE TABLE "odd.schema"."log ""x""" (what text);
           CREATE TABLE full_already (what text);
           ALTER TABLE full_already REPLICA IDENTITY FULL;
           CREATE TABLE by_index (id int NOT NULL, what text);
           CREATE UNIQUE INDEX by_index_id ON by_index (id);
           ALTER TABLE by_index REPLICA IDENTITY USING INDEX by_index_id;
           CREATE UNLOGGED TABLE scratch (what text);
           INSERT INTO events (what) VALUES ('a'), ('gone');
           INSERT INTO "odd.schema"."log ""x""" (what) VALUES ('b'), ('gone');"#,
    );

    // No choice made: refused, both tables named exactly as the config must name them.
    let config = bed.superuser_config("");
    let out = Bed::dr(&config, &["continuous", "setup", "--database", DB]);
    out.assert_failure_mentions(&[
        "refused",
        "2 tables without a replica identity",
        "nothing was changed",
    ]);
    eprintln!("{}", out.stdout);
    for listed in ["public.events", ODD] {
        assert!(
            out.stdout.lines().any(|l| l.trim() == listed),
            "{listed} not listed:\n{}",
            out.stdout
        );
    }
    for fine in ["orders", "full_already", "by_index", "scratch"] {
        assert!(!out.stdout.contains(fine), "{fine} listed:\n{}", out.stdout);
    }
    assert_eq!(bed.published(), (String::new(), String::new()));
    bed.writes_work();

    // The operator chooses REPLICA IDENTITY FULL for one only: still refused, still nothing.
    let config = bed.superuser_config("replica_identity_full = [\"public.events\"]");
    let out = Bed::dr(
        &config,
        &["continuous", "setup", "--database", DB, "--json"],
    );
    assert!(!out.status.success());
    let report = json(&out);
    assert_eq!(report["tables_without_identity"], serde_json::json!([ODD]));
    assert_eq!(report["ready"], false);
    assert_eq!(
        bed.sql("SELECT relreplident FROM pg_class WHERE relname = 'events'"),
        "d"
    );
    assert_eq!(bed.published(), (String::new(), String::new()));

    // Both chosen: a dry run reports and changes nothing.
    let both = format!(
        "replica_identity_full = [\"public.events\", {}]",
        serde_json::to_string(ODD).unwrap()
    );
    let config = bed.superuser_config(&both);
    let out = Bed::dr(
        &config,
        &[
            "continuous",
            "setup",
            "--database",
            DB,
            "--dry-run",
            "--json",
        ],
    );
    out.assert_success();
    let report = json(&out);
    assert_eq!(report["ready"], true);
    assert_eq!(report["dry_run"], true);
    assert_eq!(report["actions"].as_array().unwrap().len(), 4, "{report}");
    assert_eq!(bed.published(), (String::new(), String::new()));

    let out = Bed::dr(&config, &["continuous", "setup", "--database", DB]);
    out.assert_success();
    eprintln!("{}", out.stdout);
    assert_eq!(
        bed.published(),
        ("dr_app:true".to_string(), "dr_app:pgoutput:app".to_string())
    );
    assert_eq!(
        bed.sql("SELECT string_agg(relreplident::text, '' ORDER BY relname) FROM pg_class WHERE relname IN ('events', 'log \"x\"')"),
        "ff"
    );
    // Published now, and the source's writes still work.
    bed.writes_work();

    // Again: nothing to do.
    let out = Bed::dr(&config, &["continuous", "setup", "--database", DB]);
    out.assert_success();
    assert!(out.stdout.contains("already set up"), "{}", out.stdout);

    // A dump of a continuous database records where its snapshot sits in the change stream.
    let id = Bed::dr(&config, &["backup", "--database", DB]).assert_one_backup_id();
    let manifest: Value = serde_json::from_str(
        &fs::read_to_string(
            bed.tmp
                .path()
                .join(format!("repo/test/{DB}/backups/{id}/manifest.json")),
        )
        .unwrap(),
    )
    .unwrap();
    let base = &manifest["continuous_base"];
    let snapshot = base["snapshot"].as_str().unwrap_or_default();
    let parts: Vec<&str> = snapshot.split(':').collect();
    assert!(
        parts.len() == 3 && parts[0].parse::<u64>().is_ok() && parts[1].parse::<u64>().is_ok(),
        "{manifest:#}"
    );
    assert!(
        base["wal_lsn_before"]
            .as_str()
            .unwrap_or_default()
            .contains('/'),
        "{manifest:#}"
    );

    let out = Bed::dr(
        &config,
        &["continuous", "teardown", "--database", DB, "--dry-run"],
    );
    out.assert_success();
    assert!(
        out.stdout
            .contains("would: drop the replication slot dr_app"),
        "{}",
        out.stdout
    );
    assert_eq!(bed.published().1, "dr_app:pgoutput:app");

    Bed::dr(&config, &["continuous", "teardown", "--database", DB]).assert_success();
    assert_eq!(bed.published(), (String::new(), String::new()));
    let out = Bed::dr(&config, &["continuous", "teardown", "--database", DB]);
    out.assert_success();
    assert!(
        out.stdout.contains("nothing to tear down"),
        "{}",
        out.stdout
    );
    bed.writes_work();
}

#[test]
fn setup_names_each_missing_prerequisite_with_its_fix_and_changes_nothing() {
    // wal_level = replica (the default) and a role that is neither superuser nor REPLICATION.
    let bed = Bed::new(PgCluster::start());
    bed.sql("CREATE ROLE capture LOGIN PASSWORD 'capture-pw'; CREATE TABLE t (id int PRIMARY KEY)");
    let config = bed.config("capture", "capture-pw", "");
    let out = Bed::dr(&config, &["continuous", "setup", "--database", DB]);
    eprintln!("{}{}", out.stdout, out.stderr);
    out.assert_failure_mentions(&["refused", "3 prerequisites missing", "nothing was changed"]);
    for needle in [
        "MISSING  wal_level = replica",
        "ALTER SYSTEM SET wal_level = logical",
        "ALTER ROLE \"capture\" REPLICATION",
        "a superuser run CREATE PUBLICATION dr_app FOR ALL TABLES",
    ] {
        assert!(
            out.stdout.contains(needle),
            "`{needle}` missing:\n{}",
            out.stdout
        );
    }
    let report = json(&Bed::dr(
        &config,
        &["continuous", "setup", "--database", DB, "--json"],
    ));
    let failing: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        failing,
        ["wal_level", "replication_privilege", "publication"]
    );
    assert_eq!(bed.published(), (String::new(), String::new()));

    // A database without [databases.continuous] is refused with the fix.
    let plain = bed.tmp.path().join("plain.toml");
    let text = fs::read_to_string(&config)
        .unwrap()
        .replace("  [databases.continuous]\n", "");
    fs::write(&plain, text).unwrap();
    fs::set_permissions(&plain, fs::Permissions::from_mode(0o600)).unwrap();
    Bed::dr(&plain, &["continuous", "setup", "--database", DB])
        .assert_failure_mentions(&["no [databases.continuous] section"]);
}

/// The committed segments' manifests, oldest first.
fn segments(repo: &Path) -> Vec<Value> {
    let dir = repo.join("test").join(DB).join("changes");
    let mut found: Vec<(String, Value)> = fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(|e| {
                    let path = e.ok()?.path().join("manifest.json");
                    let text = fs::read_to_string(&path).ok()?;
                    Some((
                        path.display().to_string(),
                        serde_json::from_str(&text).ok()?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found.into_iter().map(|(_, v)| v).collect()
}

/// Every segment's plaintext (decrypted with the stock tools), concatenated.
fn captured_plaintext(bed: &Bed, repo: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for m in segments(repo) {
        let object = repo
            .join("test")
            .join(DB)
            .join("changes")
            .join(m["id"].as_str().unwrap())
            .join("changes.zst.age");
        let plain = decrypt_to_bytes(&bed.identity, &object);
        assert!(
            plain.starts_with(b"DRCHANGES1\n") && plain.ends_with(b"E"),
            "incomplete segment {}",
            m["id"]
        );
        all.extend_from_slice(&plain);
    }
    all
}

fn lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// RFC 3339 in UTC, to the second: comparable as text.
fn second(t: &str) -> String {
    t.get(..19).unwrap_or_default().to_string()
}

/// Waits until a committed segment in `repo` covers a second after `time`.
fn covered_past(repo: &Path, time: &str) -> bool {
    wait_until(Duration::from_secs(60), || {
        segments(repo)
            .last()
            .is_some_and(|m| second(m["covered_until"].as_str().unwrap_or_default()) > second(time))
    })
}

impl Bed {
    /// `dr restore --to-time TO --create --json` of `app` into database `name`; `dr` carries
    /// the config and any storage credentials.
    fn restore_to(&self, dr: Dr, name: &str, to: &str) -> DrOutput {
        dr.env("PGPASSWORD", self.cluster.password())
            .args([
                "restore",
                "--database",
                DB,
                "--to-time",
                to,
                "--json",
                "--create",
            ])
            .arg("--target")
            .arg(self.cluster.url(name))
            .arg("--staging-dir")
            .arg(self.tmp.path().join("staging"))
            .arg("--identity")
            .arg(&self.identity)
            .run()
    }
}

#[test]
fn agent_captures_segments_confirms_only_what_is_stored_and_alerts_on_risk() {
    let bed = Bed::new(PgCluster::start_logical());
    bed.sql("CREATE TABLE t (id int PRIMARY KEY, v text)");
    let hook = WebhookReceiver::start();
    let port = free_port();
    let config = bed.config_with(
        "postgres",
        bed.cluster.password(),
        "segment_seconds = 1\nslot_retained_alert_mib = 4\nsegment_max_mib = 1",
        &format!(
            "[agent]\nlisten = \"127.0.0.1:{port}\"\n\n[[notify]]\nurl = \"{}\"\n",
            hook.url("/hook")
        ),
    );
    let repo = bed.tmp.path().join("repo");
    Bed::dr(&config, &["continuous", "setup", "--database", DB]).assert_success();
    let agent = Agent::start(Dr::new(&config), port);
    let labels = [("environment", "test"), ("database", DB)];
    let metric = |name: &str| metric_value(&agent.metrics(), name, &labels);
    let at_risk_events = || {
        hook.json_bodies()
            .into_iter()
            .filter(|b| b["event"] == "continuous_at_risk")
            .collect::<Vec<_>>()
    };
    let confirmed = || {
        lsn(&bed
            .sql("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'dr_app'"))
    };

    // Changes land in segments; the slot is confirmed exactly as far as the newest one.
    bed.sql("INSERT INTO t VALUES (1, 'marker-before-outage')");
    let stored = wait_until(Duration::from_secs(30), || {
        segments(&repo)
            .iter()
            .any(|m| m["transactions"].as_u64() > Some(0))
    });
    assert!(stored, "no segment with the change:\n{}", agent.log());
    assert!(contains(
        &captured_plaintext(&bed, &repo),
        "marker-before-outage"
    ));
    let all = segments(&repo);
    for pair in all.windows(2) {
        assert!(
            lsn(pair[1]["start_lsn"].as_str().unwrap())
                <= lsn(pair[0]["end_lsn"].as_str().unwrap()),
            "a gap between segments: {pair:#?}"
        );
    }
    let text = all.iter().map(|m| m.to_string()).collect::<String>();
    assert!(
        !text.contains("marker") && !text.contains("\"t\""),
        "content in a manifest: {text}"
    );
    assert_eq!(
        metric("dr_continuous_at_risk"),
        Some(0.0),
        "{}",
        agent.log()
    );
    // Lag (commit on the source -> durable in the repository) is a histogram with the
    // segment's transactions in it, a second or two with segment_seconds = 1.
    let lagged = wait_until(Duration::from_secs(10), || {
        metric("dr_continuous_lag_seconds_count").is_some_and(|n| n >= 1.0)
    });
    assert!(lagged, "{}", agent.metrics());
    let (sum, count) = (
        metric("dr_continuous_lag_seconds_sum").unwrap(),
        metric("dr_continuous_lag_seconds_count").unwrap(),
    );
    assert!(sum / count < 15.0, "mean lag {} s", sum / count);
    assert!(metric("dr_continuous_segments_total").is_some_and(|n| n >= 1.0));
    let covered = metric("dr_continuous_covered_until_timestamp_seconds").unwrap_or(0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - covered).abs() < 30.0,
        "covered until {covered}, now {now}"
    );

    // A table created without identity is published at once: its UPDATEs fail on the
    // source, which is what the alert is for.
    bed.sql("CREATE TABLE newt (v text); INSERT INTO newt VALUES ('a')");
    let refused = bed.cluster.try_psql(DB, "UPDATE newt SET v = 'b'");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("replica identity"),
        "the premise does not hold: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let alerted = wait_until(Duration::from_secs(30), || {
        metric("dr_continuous_tables_without_identity") == Some(1.0) && at_risk_events().len() == 1
    });
    assert!(
        alerted,
        "no alert: events {:?}\n{}",
        hook.events(),
        agent.log()
    );
    let message = at_risk_events()[0]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("1 published table(s) have no replica identity"),
        "{message}"
    );
    assert!(
        !message.contains("newt"),
        "a table name left the host: {message}"
    );
    assert!(agent.log().contains("public.newt"), "{}", agent.log());
    bed.sql("ALTER TABLE newt REPLICA IDENTITY FULL; UPDATE newt SET v = 'b'");
    let cleared = wait_until(Duration::from_secs(30), || {
        metric("dr_continuous_at_risk") == Some(0.0)
    });
    assert!(cleared, "{}", agent.log());

    // The store goes away: nothing more is confirmed, the slot retains the changes, and
    // the agent says so.
    let before = segments(&repo).len();
    let aside = bed.tmp.path().join("repo-away");
    fs::rename(&repo, &aside).unwrap();
    fs::write(&repo, "not a directory").unwrap();
    let held = confirmed();
    bed.sql("INSERT INTO t VALUES (2, 'marker-during-outage')");
    // 30,000 small transactions: the catch-up segment is cut at segment_max_mib = 1 with
    // most of them still to come in the same read.
    bed.sql(
        "DO $$ BEGIN FOR i IN 10..30000 LOOP \
           INSERT INTO t VALUES (i, repeat(md5(i::text), 4)); COMMIT; \
         END LOOP; END $$",
    );
    bed.sql("INSERT INTO t VALUES (3, 'marker-after-bulk')");
    let retained = wait_until(Duration::from_secs(30), || {
        at_risk_events().iter().any(|e| {
            let m = e["message"].as_str().unwrap_or_default();
            m.contains("holds back") && m.contains("capture is failing")
        })
    });
    assert!(
        retained,
        "no outage alert: events {:?}\n{}",
        hook.events(),
        agent.log()
    );
    // The gauge DrContinuousSlotRetention alerts on says so too.
    let gauge = metric("dr_continuous_slot_retained_bytes").unwrap_or(0.0);
    assert!(
        gauge > 4.0 * 1024.0 * 1024.0,
        "dr_continuous_slot_retained_bytes = {gauge} with the alert raised:\n{}",
        agent.metrics()
    );
    assert_eq!(
        confirmed(),
        held,
        "the slot moved while nothing could be stored"
    );
    assert!(metric("dr_continuous_capture_failures_total").unwrap_or(0.0) >= 1.0);

    // The store is back: capture catches up and nothing written meanwhile is missing.
    fs::remove_file(&repo).unwrap();
    fs::rename(&aside, &repo).unwrap();
    let caught_up = wait_until(Duration::from_secs(60), || {
        segments(&repo).len() > before && metric("dr_continuous_at_risk") == Some(0.0)
    });
    assert!(caught_up, "{}", agent.log());
    let after_bulk = wait_until(Duration::from_secs(30), || {
        contains(&captured_plaintext(&bed, &repo), "marker-after-bulk")
    });
    assert!(
        after_bulk,
        "nothing after the cut segment was captured:\n{}",
        agent.log()
    );
    let plain = captured_plaintext(&bed, &repo);
    assert!(contains(&plain, "marker-during-outage"));
    assert!(
        segments(&repo)
            .iter()
            .any(|m| m["object"]["raw_bytes"].as_u64() > Some(1024 * 1024)),
        "no segment reached the size limit"
    );
    assert!(confirmed() > held);
    // With a backup to apply them to, the segments are the recovery point: `dr status`
    // counts the RPO from the newest covered commit time, not from the dump.
    Bed::dr(&config, &["backup", "--database", DB]).assert_one_backup_id();
    std::thread::sleep(Duration::from_secs(5));
    let status = json(&Bed::dr(&config, &["status", "--json"]));
    let row = &status[0];
    assert!(row["changes_covered_until"].is_string(), "{status:#}");
    assert!(row["rpo_seconds"].as_i64().unwrap() <= 3, "{status:#}");

    // Never confirmed beyond what a committed segment holds.
    let stored_up_to = segments(&repo)
        .iter()
        .map(|m| lsn(m["end_lsn"].as_str().unwrap()))
        .max()
        .unwrap();
    assert!(confirmed() <= stored_up_to);
}

/// Every table's full contents as one checksum per table.
fn checksums(cluster: &PgCluster, db: &str) -> Vec<String> {
    checksums_of(cluster, db, &["accounts", "docs", "events", "scratch"])
}

/// Each table's row count and a digest of its sorted rows: equal only if every row is.
fn checksums_of(cluster: &PgCluster, db: &str, tables: &[&str]) -> Vec<String> {
    tables
        .iter()
        .map(|t| {
            cluster.psql(
                db,
                &format!(
                    "SELECT '{t}:' || count(*) || ':' || coalesce(md5(string_agg(x::text, '|' ORDER BY x::text)), '-') FROM {t} x"
                ),
            )
        })
        .collect()
}

/// The server's clock, as RFC 3339 with microseconds.
fn server_now(cluster: &PgCluster) -> String {
    cluster.psql(
        DB,
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    )
}

/// Inserts into `accounts` one row at a time until told to stop: a writer running while the
/// other changes happen.
fn writer(cluster: &PgCluster, stop: &std::sync::atomic::AtomicBool) {
    let mut n = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        cluster.psql(
            DB,
            &format!("INSERT INTO accounts (balance, note) VALUES ({n}, 'writer {n}')"),
        );
        n += 1;
    }
}

#[test]
fn point_in_time_restore_is_exact_at_each_recorded_time() {
    let bed = Bed::new(PgCluster::start_logical());
    // `events` has no key: changes to it are matched on the whole row, including columns
    // of types without an equality operator (json[], a composite holding json).
    bed.sql(
        r#"CREATE TABLE accounts (id serial PRIMARY KEY, balance int, note text);
           CREATE TABLE docs (id bigserial PRIMARY KEY, body jsonb, blob bytea, big text, spare text);
           CREATE TYPE pair AS (j json, n float8);
           CREATE TABLE events (at timestamptz, what text,
                                meta json[] DEFAULT ARRAY['{"k": 1}'::json],
                                extra pair DEFAULT ROW('{"x": [2]}', 0.1)::pair);
           CREATE TABLE scratch (id int PRIMARY KEY);
           INSERT INTO accounts (balance, note) SELECT g, 'seed' FROM generate_series(1, 50) g;
           INSERT INTO events VALUES ('2026-01-01 00:00:00+00', 'seed'), (NULL, NULL);
           INSERT INTO scratch SELECT generate_series(1, 10);"#,
    );
    pgbench_init(&bed.cluster);
    let port = free_port();
    let config = bed.config_with(
        "postgres",
        bed.cluster.password(),
        "segment_seconds = 1\nreplica_identity_full = [\"public.events\", \"public.pgbench_history\"]",
        &format!("[agent]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    fs::create_dir(bed.tmp.path().join("staging")).unwrap();
    Bed::dr(&config, &["continuous", "setup", "--database", DB]).assert_success();
    let agent = Agent::start(Dr::new(&config), port);
    let too_early = server_now(&bed.cluster);
    std::thread::sleep(Duration::from_millis(200));
    let stop = std::sync::atomic::AtomicBool::new(false);
    // The base is dumped while a writer runs and capture reads the same commits: segments
    // then hold transactions the base already has, which the replay must skip.
    std::thread::scope(|s| {
        s.spawn(|| writer(&bed.cluster, &stop));
        s.spawn(|| pgbench(&bed.cluster, 3));
        std::thread::sleep(Duration::from_millis(1500));
        Bed::dr(&config, &["backup", "--database", DB]).assert_one_backup_id();
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let mut recorded = Vec::new();
    for phase in 0..2 {
        std::thread::scope(|s| {
            stop.store(false, std::sync::atomic::Ordering::Relaxed);
            s.spawn(|| writer(&bed.cluster, &stop));
            s.spawn(|| pgbench(&bed.cluster, 1));
            if phase == 0 {
                bed.sql(
                    r#"BEGIN;
                       INSERT INTO docs (body, blob, big, spare)
                         SELECT jsonb_build_object('n', g, 'quote', 'it''s', 'nested', jsonb_build_array(g, NULL)),
                                decode(md5(g::text), 'hex'),
                                (SELECT string_agg(md5(g::text || i::text), '') FROM generate_series(1, 150) i),
                                NULL
                         FROM generate_series(1, 40) g;
                       UPDATE accounts SET balance = balance * 2 WHERE id % 3 = 0;
                       COMMIT;
                       UPDATE docs SET spare = 'touched' WHERE id % 2 = 0;
                       DELETE FROM accounts WHERE id % 7 = 0;
                       UPDATE events SET what = 'changed' WHERE what = 'seed';
                       DELETE FROM events WHERE what IS NULL;
                       INSERT INTO events VALUES (now(), E'tab\there, newline\nthere'), (now(), 'dup'), (now(), 'dup');
                       DELETE FROM events WHERE ctid = (SELECT min(ctid) FROM events WHERE what = 'dup');
                       TRUNCATE scratch;
                       INSERT INTO scratch VALUES (42);"#,
                );
            } else {
                bed.sql(
                    r#"UPDATE docs SET big = big || 'x', body = body || '{"later": true}' WHERE id <= 5;
                       DELETE FROM docs WHERE id > 30;
                       UPDATE accounts SET note = NULL WHERE id % 5 = 0;
                       BEGIN; INSERT INTO scratch VALUES (43); ROLLBACK;
                       INSERT INTO scratch VALUES (44);"#,
                );
            }
            std::thread::sleep(Duration::from_millis(500));
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        // Writers paused: this moment and everything's contents, then a gap before more.
        recorded.push((
            server_now(&bed.cluster),
            checksums_of(&bed.cluster, DB, &PGBENCH_TABLES),
        ));
        std::thread::sleep(Duration::from_millis(1100));
    }
    // Changes after the last recorded time that a restore to it must not include.
    bed.sql("UPDATE accounts SET balance = -1; INSERT INTO scratch VALUES (99)");
    let latest = checksums_of(&bed.cluster, DB, &PGBENCH_TABLES);
    let final_time = server_now(&bed.cluster);
    let covered = covered_past(&bed.tmp.path().join("repo"), &final_time);
    assert!(
        covered,
        "capture never covered the last change:\n{}",
        agent.log()
    );
    let restore = |name: &str, to: &str| bed.restore_to(Dr::new(&config), name, to);
    for (i, (at, sums)) in recorded.iter().enumerate() {
        let name = format!("app_t{i}");
        let out = restore(&name, at);
        out.assert_success();
        eprintln!("restore to {at}:\n{}", out.stdout);
        if i == 0 {
            let replay = &json(&out)["replay"];
            assert!(
                replay["already_in_base"].as_u64().unwrap() > 0,
                "the segments never overlapped the base: {replay:#}"
            );
        }
        assert_eq!(
            &checksums_of(&bed.cluster, &name, &PGBENCH_TABLES),
            sums,
            "restore to {at} is not exact"
        );
        // Sequences were carried: new rows get fresh ids.
        assert_eq!(
            bed.cluster.psql(
                &name,
                "SELECT nextval('accounts_id_seq') > (SELECT max(id) FROM accounts)"
            ),
            "t"
        );
    }
    // `dr list` and `dr status` name the window those times lie in.
    let out = Bed::dr(&config, &["list", "--database", DB]);
    out.assert_success();
    assert!(
        out.stdout.contains("`app`: any moment from "),
        "{}",
        out.stdout
    );
    let status = json(&Bed::dr(&config, &["status", "--json"]));
    let windows = status[0]["restorable_windows"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(windows.len(), 1, "{status:#}");
    let (from, to) = (
        second(windows[0]["from"].as_str().unwrap()),
        second(windows[0]["to"].as_str().unwrap()),
    );
    for (at, _) in &recorded {
        assert!(
            from <= second(at) && second(at) <= to,
            "{at} outside {windows:?}"
        );
    }
    assert!(second(&too_early) < from, "{too_early} inside {windows:?}");

    let out = restore("app_latest", "latest");
    out.assert_success();
    let summary = json(&out);
    assert!(
        summary["recovery_point"]["commit_at"].is_string(),
        "{summary:#}"
    );
    assert_eq!(
        checksums_of(&bed.cluster, "app_latest", &PGBENCH_TABLES),
        latest
    );

    // Unreachable times fail before anything is created, naming what is reachable.
    restore("app_early", &too_early)
        .assert_failure_mentions(&["no backup of `app` can serve", "choose a time after it"]);
    restore("app_future", "2099-01-01T00:00:00Z").assert_failure_mentions(&["are stored up to"]);
    let exists = bed.cluster.psql(
        "postgres",
        "SELECT count(*) FROM pg_database WHERE datname IN ('app_early', 'app_future')",
    );
    assert_eq!(exists, "0");
}

#[test]
fn sigkill_during_capture_loses_nothing_and_replays_nothing_twice() {
    let bed = Bed::new(PgCluster::start_logical());
    bed.sql(
        "CREATE TABLE accounts (id serial PRIMARY KEY, balance int, note text);
         CREATE TABLE docs (id int PRIMARY KEY); CREATE TABLE events (at timestamptz, what text);
         CREATE TABLE scratch (id int PRIMARY KEY);",
    );
    let port = free_port();
    let config = bed.config_with(
        "postgres",
        bed.cluster.password(),
        "segment_seconds = 1\nreplica_identity_full = [\"public.events\"]",
        &format!("[agent]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    fs::create_dir(bed.tmp.path().join("staging")).unwrap();
    Bed::dr(&config, &["continuous", "setup", "--database", DB]).assert_success();
    Bed::dr(&config, &["backup", "--database", DB]).assert_one_backup_id();

    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| writer(&bed.cluster, &stop));
        for round in 0..4 {
            let mut agent = Agent::start(Dr::new(&config), port);
            std::thread::sleep(Duration::from_millis(900 + 300 * round));
            agent.signal(libc::SIGKILL);
            assert!(agent.wait_exit(Duration::from_secs(10)).is_some());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let expected = checksums(&bed.cluster, DB);
    let final_time = server_now(&bed.cluster);
    let agent = Agent::start(Dr::new(&config), port);
    let covered = covered_past(&bed.tmp.path().join("repo"), &final_time);
    assert!(covered, "capture did not resume:\n{}", agent.log());
    // A segment stored twice, as when the agent dies between storing a segment and
    // confirming it: the restore must replay its transactions once.
    let changes = bed.tmp.path().join("repo/test").join(DB).join("changes");
    let busy = segments(&bed.tmp.path().join("repo"))
        .into_iter()
        .find(|m| m["transactions"].as_u64() > Some(5))
        .expect("a segment with transactions");
    let id = busy["id"].as_str().unwrap();
    let copy = changes.join(format!("{id}-again"));
    fs::create_dir(&copy).unwrap();
    for file in ["changes.zst.age", "manifest.json"] {
        fs::copy(changes.join(id).join(file), copy.join(file)).unwrap();
    }
    let manifest = fs::read_to_string(copy.join("manifest.json"))
        .unwrap()
        .replace(id, &format!("{id}-again"));
    fs::write(copy.join("manifest.json"), manifest).unwrap();

    let out = bed.restore_to(Dr::new(&config), "app_after_kills", "latest");
    out.assert_success();
    eprintln!("{}", out.stdout);
    assert!(
        json(&out)["replay"]["duplicates"].as_u64() > Some(5),
        "{}",
        out.stdout
    );
    assert_eq!(checksums(&bed.cluster, "app_after_kills"), expected);
    let rows = bed.cluster.psql(DB, "SELECT count(*) FROM accounts");
    assert!(
        rows.parse::<u32>().unwrap() > 10,
        "the writer barely wrote: {rows}"
    );
}

#[test]
fn a_column_added_mid_stream_takes_a_new_base_and_restores_on_either_side() {
    let bed = Bed::new(PgCluster::start_logical());
    bed.sql(
        "CREATE TABLE accounts (id serial PRIMARY KEY, balance int, note text);
         CREATE TABLE docs (id int PRIMARY KEY); CREATE TABLE events (at timestamptz, what text);
         CREATE TABLE scratch (id int PRIMARY KEY);
         INSERT INTO accounts (balance, note) SELECT g, 'seed' FROM generate_series(1, 20) g;",
    );
    let port = free_port();
    let config = bed.config_with(
        "postgres",
        bed.cluster.password(),
        "segment_seconds = 1\nreplica_identity_full = [\"public.events\"]",
        &format!("[agent]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    fs::create_dir(bed.tmp.path().join("staging")).unwrap();
    Bed::dr(&config, &["continuous", "setup", "--database", DB]).assert_success();
    Bed::dr(&config, &["backup", "--database", DB]).assert_one_backup_id();
    let agent = Agent::start(Dr::new(&config), port);
    let backups = || Bed::dr(&config, &["list", "--database", DB, "--json"]);
    let count = || json(&backups()).as_array().map_or(0, Vec::len);

    bed.sql("UPDATE accounts SET balance = balance + 1 WHERE id <= 10");
    let before_sums = checksums(&bed.cluster, DB);
    let before = server_now(&bed.cluster);
    // More than a segment and the 1 s cover margin before the change.
    std::thread::sleep(Duration::from_millis(3000));
    bed.sql("ALTER TABLE accounts ADD COLUMN extra int DEFAULT 7; INSERT INTO accounts (balance, note, extra) VALUES (100, 'after', 8)");
    let right_after = server_now(&bed.cluster);
    let new_base = wait_until(Duration::from_secs(30), || count() == 2);
    assert!(
        new_base,
        "no backup after the schema change:\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("schema change captured"),
        "{}",
        agent.log()
    );
    bed.sql("UPDATE accounts SET extra = 9 WHERE note = 'after'; INSERT INTO accounts (balance, note, extra) VALUES (101, 'later', 10)");
    let after_sums = checksums(&bed.cluster, DB);
    let after = server_now(&bed.cluster);
    let covered = covered_past(&bed.tmp.path().join("repo"), &after);
    assert!(covered, "{}", agent.log());

    let restore = |name: &str, to: &str| bed.restore_to(Dr::new(&config), name, to);
    // Before the change: the first backup plus its changes.
    restore("app_before", &before).assert_success();
    assert_eq!(checksums(&bed.cluster, "app_before"), before_sums);
    // After the new backup: that backup plus its changes, the new column included.
    restore("app_after", &after).assert_success();
    assert_eq!(checksums(&bed.cluster, "app_after"), after_sums);
    // Between the change and the new backup: refused before anything is created, naming
    // both reachable sides.
    restore("app_between", &right_after).assert_failure_mentions(&[
        "schema change",
        "Reachable: any time up to",
        "the backup taken after it",
    ]);
    assert_eq!(
        bed.cluster.psql(
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname = 'app_between'"
        ),
        "0"
    );
}

#[test]
fn a_drill_of_a_continuous_database_restores_to_the_newest_change_and_reports_the_rpo() {
    let bed = Bed::new(PgCluster::start_logical());
    bed.sql("CREATE TABLE accounts (id serial PRIMARY KEY, note text)");
    let port = free_port();
    let drill = format!(
        "segment_seconds = 1\n\n  [databases.drill]\n  cron = \"0 3 1 1 *\"\n  target = \"{}\"\n  allow_same_server = true\n  checks = [\"SELECT count(*) = 1 FROM accounts WHERE note = 'after the backup'\"]\n",
        bed.cluster.url("postgres")
    );
    let config = bed.config_with(
        "postgres",
        bed.cluster.password(),
        &drill,
        &format!("[agent]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    Bed::dr(&config, &["continuous", "setup", "--database", DB]).assert_success();
    let id = Bed::dr(&config, &["backup", "--database", DB]).assert_one_backup_id();
    let agent = Agent::start(Dr::new(&config), port);
    bed.sql("INSERT INTO accounts (note) VALUES ('after the backup')");
    let written = server_now(&bed.cluster);
    let covered = covered_past(&bed.tmp.path().join("repo"), &written);
    assert!(covered, "{}", agent.log());

    let out = Dr::new(&config)
        .env("PGPASSWORD", bed.cluster.password())
        .args(["drill", "--database", DB, "--json"])
        .arg("--identity")
        .arg(&bed.identity)
        .run();
    let report = json(&out);
    let report = if report.is_array() {
        report[0].clone()
    } else {
        report
    };
    assert_eq!(report["passed"], true, "{report:#}\n{}", out.stderr);
    assert_eq!(report["backup_id"], id.as_str());
    assert!(
        report["recovery_point"]
            .as_str()
            .is_some_and(|p| second(p) >= second(&written)),
        "{report:#}"
    );
    assert!(
        report["achieved_rpo_seconds"]
            .as_f64()
            .is_some_and(|r| r < 30.0),
        "{report:#}"
    );
    let replayed = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "changes replayed")
        .cloned()
        .unwrap_or_default();
    assert_eq!(replayed["passed"], true, "{report:#}");

    // The agent is stateless: restarted, it exports the last drill's RTO and achieved RPO
    // from the stored report.
    drop(agent);
    let agent = Agent::start(Dr::new(&config), port);
    let labels = [("environment", "test"), ("database", DB)];
    let exported = wait_until(Duration::from_secs(20), || {
        metric_value(&agent.metrics(), "dr_drill_achieved_rpo_seconds", &labels).is_some()
    });
    let metrics = agent.metrics();
    assert!(exported, "{metrics}");
    let close = |name: &str, want: &Value| {
        let got = metric_value(&metrics, name, &labels).unwrap_or(f64::NAN);
        assert!(
            (got - want.as_f64().unwrap()).abs() < 0.01,
            "{name} = {got}, report {want}"
        );
    };
    close(
        "dr_drill_achieved_rpo_seconds",
        &report["achieved_rpo_seconds"],
    );
    close("dr_drill_rto_seconds", &report["rto_seconds"]);
}

const PGBENCH_TABLES: [&str; 8] = [
    "accounts",
    "docs",
    "events",
    "scratch",
    "pgbench_accounts",
    "pgbench_branches",
    "pgbench_tellers",
    "pgbench_history",
];

/// pgbench's tables in `app`, at scale 1 (100,000 accounts).
fn pgbench_init(cluster: &PgCluster) {
    let init = cluster
        .client_command("pgbench")
        .args(["-i", "-s", "1", "-q", DB])
        .output()
        .expect("pgbench -i");
    assert!(init.status.success(), "{init:?}");
}

/// Runs pgbench's TPC-B-like load against `app` for `seconds` at a steady rate.
fn pgbench(cluster: &PgCluster, seconds: u64) {
    let out = cluster
        .client_command("pgbench")
        .args(["-n", "-c", "2", "-j", "1", "-R", "100", "-T"])
        .arg(seconds.to_string())
        .arg(DB)
        .output()
        .expect("run pgbench");
    assert!(
        out.status.success(),
        "pgbench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn capture_into_s3_survives_a_killed_agent_and_a_one_minute_store_outage_under_pgbench() {
    let mut bed = Bed::new(PgCluster::start_logical());
    let mut garage = Garage::start();
    bed.storage = Storage::garage(&garage, "continuous");
    bed.sql(
        "CREATE TABLE accounts (id serial PRIMARY KEY, balance int, note text);
         CREATE TABLE docs (id int PRIMARY KEY); CREATE TABLE events (at timestamptz, what text);
         CREATE TABLE scratch (id int PRIMARY KEY);",
    );
    pgbench_init(&bed.cluster);
    let port = free_port();
    // pgbench_history has no key: its rows are only ever inserted, as FULL identity allows.
    let config = bed.config_with(
        "postgres",
        bed.cluster.password(),
        "segment_seconds = 1\nreplica_identity_full = [\"public.events\", \"public.pgbench_history\"]",
        &format!("[agent]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    fs::create_dir(bed.tmp.path().join("staging")).unwrap();
    let env = garage.env();
    let dr = || Dr::new(&config).envs(env.clone());
    dr().args(["continuous", "setup", "--database", DB])
        .run()
        .assert_success();
    dr().args(["backup", "--database", DB])
        .run()
        .assert_one_backup_id();

    let stop = std::sync::atomic::AtomicBool::new(false);
    let agent = std::thread::scope(|s| {
        s.spawn(|| writer(&bed.cluster, &stop));
        let load = s.spawn(|| pgbench(&bed.cluster, 80));
        let mut first = Agent::start(dr(), port);
        std::thread::sleep(Duration::from_millis(1500));
        first.signal(libc::SIGKILL);
        assert!(first.wait_exit(Duration::from_secs(10)).is_some());
        // The store goes away for a minute while the load goes on; a new agent cannot
        // store anything and must not confirm anything to the slot.
        garage.stop();
        let down = std::time::Instant::now();
        let agent = Agent::start(dr(), port);
        let failing = wait_until(Duration::from_secs(30), || {
            agent.log().contains("change capture failed")
        });
        assert!(failing, "{}", agent.log());
        std::thread::sleep(Duration::from_secs(60).saturating_sub(down.elapsed()));
        garage.restart();
        load.join().expect("pgbench thread");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        agent
    });
    let expected = checksums_of(&bed.cluster, DB, &PGBENCH_TABLES);
    let final_time = server_now(&bed.cluster);
    let covered = wait_until(Duration::from_secs(90), || {
        let status = dr().args(["status", "--json"]).run();
        serde_json::from_str::<Value>(&status.stdout)
            .ok()
            .and_then(|v| v[0]["changes_covered_until"].as_str().map(second))
            .is_some_and(|c| c > second(&final_time))
    });
    assert!(covered, "capture did not catch up:\n{}", agent.log());
    let history: u64 = bed
        .sql("SELECT count(*) FROM pgbench_history")
        .parse()
        .unwrap();
    assert!(history > 2000, "pgbench barely ran: {history} transactions");

    let out = bed.restore_to(dr(), "app_from_s3", "latest");
    out.assert_success();
    eprintln!("{}", out.stdout);
    // Equal row for row: nothing lost in the outage, nothing applied twice.
    assert_eq!(
        checksums_of(&bed.cluster, "app_from_s3", &PGBENCH_TABLES),
        expected
    );
}

#[test]
fn an_invalidated_slot_is_replaced_by_a_new_chain_with_a_new_base() {
    let bed = Bed::new(PgCluster::start_logical());
    bed.sql("CREATE TABLE t (id bigint PRIMARY KEY, v text)");
    bed.cluster.psql(
        "postgres",
        "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'; ALTER SYSTEM SET max_wal_size = '32MB'; SELECT pg_reload_conf()",
    );
    let hook = WebhookReceiver::start();
    let port = free_port();
    let config = bed.config_with(
        "postgres",
        bed.cluster.password(),
        "segment_seconds = 1",
        &format!(
            "[agent]\nlisten = \"127.0.0.1:{port}\"\n\n[[notify]]\nurl = \"{}\"\n",
            hook.url("/hook")
        ),
    );
    Bed::dr(&config, &["continuous", "setup", "--database", DB]).assert_success();
    Bed::dr(&config, &["backup", "--database", DB]).assert_one_backup_id();
    // Nothing consumes the slot: WAL beyond max_slot_wal_keep_size invalidates it.
    let status = || {
        bed.sql(
            "SELECT coalesce(wal_status, '-') FROM pg_replication_slots WHERE slot_name = 'dr_app'",
        )
    };
    let mut round = 0;
    while status() != "lost" && round < 10 {
        bed.sql(&format!(
            "INSERT INTO t SELECT g, repeat(md5(g::text), 8) FROM generate_series({0} * 100000 + 1, {0} * 100000 + 100000) g",
            round
        ));
        bed.sql("SELECT pg_switch_wal(); CHECKPOINT");
        round += 1;
    }
    assert_eq!(status(), "lost", "the slot was never invalidated");

    let agent = Agent::start(Dr::new(&config), port);
    let alerted = wait_until(Duration::from_secs(30), || {
        hook.json_bodies().iter().any(|b| {
            b["event"] == "continuous_at_risk"
                && b["message"].as_str().is_some_and(|m| {
                    m.contains("invalidated") && m.contains("a new slot was created")
                })
        })
    });
    assert!(alerted, "events {:?}\n{}", hook.events(), agent.log());
    let count = || {
        json(&Bed::dr(&config, &["list", "--database", DB, "--json"]))
            .as_array()
            .map_or(0, Vec::len)
    };
    assert!(
        wait_until(Duration::from_secs(60), || count() == 2),
        "no new base:\n{}",
        agent.log()
    );
    assert!(
        wait_until(Duration::from_secs(30), || status() == "reserved"),
        "{}",
        status()
    );
    bed.sql("INSERT INTO t VALUES (0, 'after the new chain')");
    let captured = wait_until(Duration::from_secs(30), || {
        contains(
            &captured_plaintext(&bed, &bed.tmp.path().join("repo")),
            "after the new chain",
        )
    });
    assert!(captured, "{}", agent.log());
}

#[test]
fn segments_no_kept_backup_needs_are_pruned_and_every_kept_time_still_restores() {
    let bed = Bed::new(PgCluster::start_logical());
    bed.sql(
        "CREATE TABLE accounts (id serial PRIMARY KEY, balance int, note text);
         CREATE TABLE docs (id int PRIMARY KEY); CREATE TABLE events (at timestamptz, what text);
         CREATE TABLE scratch (id int PRIMARY KEY);",
    );
    let port = free_port();
    // `daily` keeps a backup one second: once a newer one exists, the older goes.
    let config = bed.config_with(
        "postgres",
        bed.cluster.password(),
        "segment_seconds = 1\nreplica_identity_full = [\"public.events\"]",
        &format!(
            "  [[databases.schedules]]\n  class = \"daily\"\n  cron = \"0 3 1 1 *\"\n  keep = \"1s\"\n\n[agent]\nlisten = \"127.0.0.1:{port}\"\n"
        ),
    );
    fs::create_dir(bed.tmp.path().join("staging")).unwrap();
    let repo = bed.tmp.path().join("repo");
    Bed::dr(&config, &["continuous", "setup", "--database", DB]).assert_success();
    let backup = || {
        Bed::dr(&config, &["backup", "--database", DB, "--class", "daily"]).assert_one_backup_id()
    };
    let agent = Agent::start(Dr::new(&config), port);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (old_base, before_new_base) = std::thread::scope(|s| {
        s.spawn(|| writer(&bed.cluster, &stop));
        std::thread::sleep(Duration::from_millis(1500));
        let old_base = backup();
        std::thread::sleep(Duration::from_millis(2500));
        let before = server_now(&bed.cluster);
        std::thread::sleep(Duration::from_millis(500));
        // The new base is dumped while the writer runs: the segment around its snapshot
        // holds commits the base does not see, and must be kept.
        backup();
        std::thread::sleep(Duration::from_millis(2000));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (old_base, before)
    });
    let expected = checksums(&bed.cluster, DB);
    let final_time = server_now(&bed.cluster);
    assert!(
        covered_past(&repo, &final_time),
        "capture never covered the last change:\n{}",
        agent.log()
    );
    drop(agent);
    // A segment a killed capture stored without its manifest, long ago.
    let changes = repo.join("test").join(DB).join("changes");
    let leftover = "20200101T000000Z-0000000000000000-abcd";
    fs::create_dir(changes.join(leftover)).unwrap();
    fs::write(changes.join(leftover).join("changes.zst.age"), b"partial").unwrap();

    let all = segments(&repo);
    let dry = Bed::dr(&config, &["prune", "--dry-run", "--json"]);
    dry.assert_success();
    let report = json(&dry);
    let plan = &report[0]["change_segments"];
    let doomed: Vec<String> = plan["deleted"]
        .as_array()
        .unwrap_or_else(|| panic!("no change_segments in {report:#}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(!doomed.is_empty(), "nothing to prune: {report:#}");
    assert_eq!(plan["orphans"], serde_json::json!([leftover]), "{report:#}");
    assert_eq!(
        segments(&repo).len(),
        all.len(),
        "--dry-run deleted segments"
    );
    assert!(
        changes.join(leftover).exists(),
        "--dry-run deleted the leftover"
    );

    let out = Bed::dr(&config, &["prune", "--json"]);
    out.assert_success();
    assert!(
        !repo
            .join("test")
            .join(DB)
            .join("backups")
            .join(&old_base)
            .exists(),
        "the old base was not pruned: {}",
        out.stdout
    );
    let kept = segments(&repo);
    assert_eq!(kept.len(), all.len() - doomed.len(), "{}", out.stdout);
    assert!(!changes.join(leftover).exists());
    for id in &doomed {
        assert!(!changes.join(id).exists(), "segment {id} still there");
    }
    // Exactly the segments before the one the kept base starts from went: that one ends at
    // or before the base's position, the next one after it.
    let backups: Vec<_> = fs::read_dir(repo.join("test").join(DB).join("backups"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(backups.len(), 1, "{backups:?}");
    let base: Value =
        serde_json::from_str(&fs::read_to_string(backups[0].join("manifest.json")).unwrap())
            .unwrap();
    let from = lsn(base["continuous_base"]["wal_lsn_before"].as_str().unwrap());
    assert!(
        lsn(kept[0]["end_lsn"].as_str().unwrap()) <= from,
        "{:#}",
        kept[0]
    );
    assert!(
        lsn(kept[1]["end_lsn"].as_str().unwrap()) > from,
        "{:#}",
        kept[1]
    );
    let last_doomed = all
        .iter()
        .find(|m| m["id"] == doomed[doomed.len() - 1])
        .unwrap();
    assert!(lsn(last_doomed["end_lsn"].as_str().unwrap()) <= from);

    // A dry run names the plan (JSON on stdout for scripts) and creates nothing.
    let dry = Dr::new(&config)
        .env("PGPASSWORD", bed.cluster.password())
        .args([
            "restore",
            "--database",
            DB,
            "--to-time",
            "latest",
            "--dry-run",
            "--json",
            "--create",
        ])
        .arg("--target")
        .arg(bed.cluster.url("app_dry"))
        .arg("--identity")
        .arg(&bed.identity)
        .run();
    dry.assert_success();
    let plan = json(&dry);
    assert_eq!(
        plan["base_id"].as_str(),
        backups[0].file_name().and_then(|n| n.to_str()),
        "{plan:#}"
    );
    assert_eq!(
        plan["segments"].as_array().map(Vec::len),
        Some(kept.len()),
        "{plan:#}"
    );
    assert_eq!(
        bed.cluster.psql(
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname = 'app_dry'"
        ),
        "0"
    );

    // The newest change still restores exactly; a time before the kept base is refused.
    let out = bed.restore_to(Dr::new(&config), "app_pruned", "latest");
    out.assert_success();
    assert_eq!(checksums(&bed.cluster, "app_pruned"), expected);
    bed.restore_to(Dr::new(&config), "app_gone", &before_new_base)
        .assert_failure_mentions(&["no backup of `app` can serve"]);
    // A second prune finds nothing more to delete.
    let again = json(&Bed::dr(&config, &["prune", "--dry-run", "--json"]));
    assert_eq!(
        again[0]["change_segments"]["deleted"],
        serde_json::json!([])
    );
}
