//! End-to-end tests of `[[copies]]` and Object Lock: the built `dr` against real
//! PostgreSQL, Garage, and SeaweedFS (which enforces Object Lock; Garage ignores it).
//!
//! What they prove: every committed backup reaches each copy byte for byte, manifest last;
//! a copy that was down catches up by itself; a damaged primary object is never copied;
//! when the primary cannot be read, `dr restore` names the copies that hold the backup with
//! the exact command, and restoring from a copy gives the same database. With Object Lock
//! every object carries its retention date, the store refuses to delete it, and prune keeps
//! what is still locked; where locking cannot work, config check says so.

use std::fs;
use std::time::Duration;

use dr_tests::{
    create_seeded, database_toml, encryption_toml, free_port, metric_value, table_hashes,
    wait_until, write_config, Agent, BedBase, Dr, DrOutput, Garage, Seaweed, Storage,
    WebhookReceiver,
};
use serde_json::Value;

const DB: &str = "app";

fn json(out: &DrOutput) -> Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON on stdout ({e}):\nstdout:\n{}\nstderr:\n{}",
            out.stdout, out.stderr
        )
    })
}

/// The `[[copies]]` entry for `storage`, named `name`, with a one-second catch-up interval.
fn copy_toml(name: &str, storage: &Storage) -> String {
    let table = storage.toml().replace("[storage]", "  [copies.storage]");
    format!("[[copies]]\nname = \"{name}\"\ninterval_seconds = 1\n{table}\n")
}

/// A second bucket on `garage`, allowed to the test key.
fn second_bucket(garage: &Garage, bucket: &str) -> Storage {
    for args in [
        vec!["bucket", "create", bucket],
        vec![
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            bucket,
            "--key",
            garage.access_key(),
        ],
    ] {
        let out = garage.cli(&args);
        assert!(out.status.success(), "garage {args:?}: {out:?}");
    }
    match Storage::garage(garage, "copy") {
        Storage::S3 {
            prefix,
            endpoint,
            region,
            ..
        } => Storage::S3 {
            bucket: bucket.to_string(),
            prefix,
            endpoint,
            region,
        },
        other => other,
    }
}

/// Backup ids `dr list --repository NAME --json` shows.
fn listed(dr: Dr, repository: &str) -> Vec<String> {
    let out = dr
        .args([
            "list",
            "--database",
            DB,
            "--json",
            "--repository",
            repository,
        ])
        .run();
    if !out.status.success() {
        return Vec::new();
    }
    let v = json(&out);
    let list = v.as_array().cloned().unwrap_or_default();
    list.iter()
        .filter_map(|b| b["id"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn a_copy_that_was_down_catches_up_by_itself_byte_for_byte() {
    // Primary on file://, the copy in a second Garage bucket that goes away for a while.
    let mut base = BedBase::file("dr-copies-");
    create_seeded(&base.cluster, DB);
    let mut garage = Garage::start();
    let copy = second_bucket(&garage, "dr-copy");
    let port = free_port();
    let hook = WebhookReceiver::start();
    // An RPO the outage below outlasts: the copy must alert on its own.
    let body = encryption_toml(&[&base.keys.recipient], Some(&base.keys.identity))
        + &database_toml(DB, &base.cluster.url(DB), None).replace("rpo = \"26h\"", "rpo = \"20s\"")
        + &copy_toml("offsite", &copy)
        + &format!(
            "[agent]\nlisten = \"127.0.0.1:{port}\"\n\n[[notify]]\nurl = \"{}\"\n",
            hook.url("/hook")
        );
    let config = write_config(base.dir(), &base.storage, &body);
    let env = garage.env();
    let password = base.cluster.password().to_string();
    let dr = || {
        Dr::new(&config)
            .envs(env.clone())
            .env("PGPASSWORD", &password)
    };
    let first = dr()
        .args(["backup", "--database", DB])
        .run()
        .assert_one_backup_id();
    let agent = Agent::start(dr(), port);
    let copied = wait_until(Duration::from_secs(30), || {
        listed(dr(), "offsite").contains(&first)
    });
    assert!(
        copied,
        "the first backup never reached the copy:\n{}",
        agent.log()
    );

    // The copy is down during three backups: they fail to copy, the primary is unaffected.
    garage.stop();
    let mut ids = vec![first];
    for _ in 0..3 {
        ids.push(
            dr().args(["backup", "--database", DB])
                .run()
                .assert_one_backup_id(),
        );
    }
    let labels = [("database", DB), ("repository", "offsite")];
    let failing = wait_until(Duration::from_secs(30), || {
        metric_value(&agent.metrics(), "dr_copy_failures_total", &labels).is_some_and(|n| n > 0.0)
    });
    assert!(failing, "{}", agent.metrics());
    assert_eq!(listed(Dr::new(&config), "primary"), ids);
    // The copy falls behind the objective while the primary has fresh backups: a breach
    // naming the copy, and its RPO gauge past the objective.
    let copy_events = |event: &str| {
        hook.json_bodies()
            .into_iter()
            .filter(|b| {
                b["event"] == event
                    && b["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("copy `offsite`"))
            })
            .count()
    };
    let breached = wait_until(Duration::from_secs(60), || copy_events("rpo_breach") == 1);
    assert!(
        breached,
        "no rpo_breach for the copy: {:?}\n{}",
        hook.events(),
        agent.log()
    );
    let behind = metric_value(&agent.metrics(), "dr_rpo_seconds", &labels);
    assert!(behind.is_some_and(|r| r > 20.0), "{}", agent.metrics());

    garage.restart();
    // A fresh backup, so the caught-up copy is within its objective again.
    ids.push(
        dr().args(["backup", "--database", DB])
            .run()
            .assert_one_backup_id(),
    );
    let caught_up = wait_until(Duration::from_secs(60), || listed(dr(), "offsite") == ids);
    assert!(caught_up, "the copy did not catch up:\n{}", agent.log());
    let rpo = metric_value(
        &agent.metrics(),
        "dr_rpo_seconds",
        &[("database", DB), ("repository", "offsite")],
    );
    assert!(rpo.is_some_and(|r| r < 120.0), "{}", agent.metrics());
    let recovered = wait_until(Duration::from_secs(30), || {
        copy_events("rpo_recovered") == 1
    });
    assert!(
        recovered,
        "no rpo_recovered for the copy: {:?}\n{}",
        hook.events(),
        agent.log()
    );
    assert_eq!(copy_events("rpo_breach"), 1, "{:?}", hook.events());
    drop(agent);

    // Byte for byte: every object and manifest of the copy equals the primary's.
    let primary = base.storage.clone();
    let Storage::File(root) = primary else {
        unreachable!()
    };
    for id in &ids {
        let dir = root.join("test").join(DB).join("backups").join(id);
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            let key = format!("copy/test/{DB}/backups/{id}/{name}");
            let stored = garage.client().get(&copy_bucket(&copy), &key);
            assert_eq!(stored, fs::read(&path).unwrap(), "{key} differs");
        }
    }
    // `dr verify` reads the copy (sha256 of what is stored there).
    dr().args(["verify", "--database", DB, "--repository", "offsite"])
        .run()
        .assert_success();
    let status = json(&dr().args(["status", "--json"]).run());
    assert_eq!(
        status[0]["copies"][0]["repository"], "offsite",
        "{status:#}"
    );
    assert_eq!(status[0]["copies"][0]["rpo_status"], "ok", "{status:#}");

    // A damaged object at the primary is never copied: the copy keeps no manifest of it.
    let damaged = dr()
        .args(["backup", "--database", DB])
        .run()
        .assert_one_backup_id();
    let data = root
        .join("test")
        .join(DB)
        .join("backups")
        .join(&damaged)
        .join("data.dump.zst.age");
    let mut bytes = fs::read(&data).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    fs::write(&data, bytes).unwrap();
    let out = dr().args(["copy", "--to", "offsite"]).run();
    out.assert_failure_mentions(&["damaged", &damaged]);
    assert!(!listed(dr(), "offsite").contains(&damaged));
    base.garage = None;
}

fn copy_bucket(storage: &Storage) -> String {
    match storage {
        Storage::S3 { bucket, .. } => bucket.clone(),
        Storage::File(_) => unreachable!(),
    }
}

#[test]
fn with_the_primary_down_restore_names_the_copy_and_restores_from_it() {
    // Primary in Garage, the copy on a local disk.
    let mut base = BedBase::s3("dr-copies-", "primary");
    create_seeded(&base.cluster, DB);
    let local = Storage::File(base.dir().join("copy"));
    let body = encryption_toml(&[&base.keys.recipient], Some(&base.keys.identity))
        + &database_toml(DB, &base.cluster.url(DB), None)
        + &copy_toml("local", &local);
    let config = write_config(base.dir(), &base.storage, &body);
    let id = base
        .dr(&config)
        .env("PGPASSWORD", base.cluster.password())
        .args(["backup", "--database", DB])
        .run()
        .assert_one_backup_id();
    let report = json(&base.dr(&config).args(["copy", "--json"]).run());
    assert_eq!(
        report[0]["copied"].as_array().map(Vec::len),
        Some(1),
        "{report:#}"
    );
    // Idempotent: a second run finds everything there.
    let again = json(&base.dr(&config).args(["copy", "--json"]).run());
    assert_eq!(again[0]["present"], 1, "{again:#}");

    base.garage.as_mut().unwrap().stop();
    let restore = |extra: &[&str], target: &str| {
        base.dr(&config)
            .env("PGPASSWORD", base.cluster.password())
            .args(["restore", "--database", DB, "--latest", "--create"])
            .args(extra)
            .args(["--target", &base.cluster.url(target)])
            .arg("--staging-dir")
            .arg(base.dir())
            .run()
    };
    let out = restore(&[], "app_from_primary");
    out.assert_failure_mentions(&[
        "primary repository",
        "cannot be read",
        "local: 1 backup(s)",
        "--repository local",
        &id,
    ]);
    restore(&["--repository", "local"], "app_from_copy").assert_success();
    assert_eq!(
        table_hashes(&base.cluster, "app_from_copy"),
        table_hashes(&base.cluster, DB)
    );
    assert_eq!(listed(Dr::new(&config), "local"), vec![id]);
    Dr::new(&config)
        .args(["list", "--repository", "nowhere"])
        .run()
        .assert_failure_mentions(&["no repository named `nowhere`", "primary, local"]);
}

#[test]
fn object_lock_protects_every_object_and_prune_waits_for_it() {
    let base = BedBase::file("dr-lock-");
    create_seeded(&base.cluster, DB);
    let weed = Seaweed::start();
    let s3 = weed.client();
    s3.create_locked_bucket("locked");
    let storage = Storage::S3 {
        bucket: "locked".into(),
        prefix: "dr".into(),
        endpoint: weed.endpoint(),
        region: dr_tests::SEAWEED_REGION.into(),
    };
    // `daily` keeps a backup one second, so the older of two is expired at once; its lock
    // (keep plus a day) is not.
    let db =
        database_toml(DB, &base.cluster.url(DB), None).replace("keep = \"30d\"", "keep = \"1s\"");
    let body = encryption_toml(&[&base.keys.recipient], Some(&base.keys.identity)) + &db;
    let config = write_config(base.dir(), &storage, &body);
    let text = fs::read_to_string(&config).unwrap().replace(
        "path_style = true\n",
        "path_style = true\nobject_lock = \"compliance\"\n",
    );
    fs::write(&config, text).unwrap();
    let dr = || {
        Dr::new(&config)
            .envs(weed.env())
            .env("PGPASSWORD", base.cluster.password())
    };
    let check = dr().args(["config", "check"]).run();
    check.assert_success();
    assert!(
        check.stdout.contains("Object Lock enabled"),
        "{}",
        check.stdout
    );

    let old = dr()
        .args(["backup", "--database", DB, "--class", "daily"])
        .run()
        .assert_one_backup_id();
    std::thread::sleep(Duration::from_millis(1100));
    let new = dr()
        .args(["backup", "--database", DB, "--class", "daily"])
        .run()
        .assert_one_backup_id();

    // Every object of the backup, manifest included, carries the retention date.
    let listed_old = json(&dr().args(["list", "--database", DB, "--json"]).run());
    let started: jiff::Timestamp = listed_old[0]["started_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let want = started.as_second() + 1 + 24 * 3600;
    for object in ["data.dump.zst.age", "globals.sql.zst.age", "manifest.json"] {
        let key = format!("dr/test/{DB}/backups/{old}/{object}");
        let (mode, until) = s3
            .retention("locked", &key)
            .unwrap_or_else(|| panic!("{key} carries no retention"));
        assert_eq!(mode, "COMPLIANCE");
        assert!(
            (until - want).abs() <= 2,
            "{key} locked until {until}, expected {want}"
        );
    }
    // The store itself refuses to delete it, whatever the credentials.
    let key = format!("dr/test/{DB}/backups/{old}/data.dump.zst.age");
    let refused = s3.delete_all_versions("locked", &key);
    assert!(refused.is_err(), "a locked object was deleted");

    // Prune keeps the expired backup, saying until when, and deletes nothing.
    let out = dr().args(["prune", "--json"]).run();
    out.assert_success();
    let report = json(&out);
    let decision = report[0]["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["backup_id"] == old.as_str())
        .cloned()
        .unwrap();
    assert_eq!(decision["keep"], true, "{report:#}");
    assert!(
        decision["reason"]
            .as_str()
            .unwrap()
            .contains("locked until"),
        "{decision:#}"
    );
    let ids: Vec<String> = json(&dr().args(["list", "--database", DB, "--json"]).run())
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec![old, new]);
}

#[test]
fn object_lock_is_refused_where_it_cannot_work() {
    let base = BedBase::file("dr-lock-");
    let body = encryption_toml(&[&base.keys.recipient], None)
        + &database_toml(DB, &base.cluster.url(DB), None);
    let config = write_config(base.dir(), &base.storage, &body);
    let text = fs::read_to_string(&config).unwrap().replace(
        "[encryption]",
        "object_lock = \"governance\"\n\n[encryption]",
    );
    fs::write(&config, text).unwrap();
    Dr::new(&config)
        .args(["config", "check"])
        .run()
        .assert_failure_mentions(&["file://", "Object Lock is an S3 feature"]);

    // Garage does not implement Object Lock: config check says so, not "OK".
    let garage = Garage::start();
    let storage = Storage::garage(&garage, "locked");
    let config = write_config(base.dir(), &storage, &body);
    let text = fs::read_to_string(&config).unwrap().replace(
        "path_style = true\n",
        "path_style = true\nobject_lock = \"compliance\"\n",
    );
    fs::write(&config, text).unwrap();
    Dr::new(&config)
        .envs(garage.env())
        .args(["config", "check"])
        .run()
        .assert_failure_mentions(&["object_lock = \"compliance\"", "Object Lock"]);
}

#[test]
fn a_copy_gets_change_segments_and_keeps_its_own_retention() {
    let base = BedBase::file("dr-copies-");
    let cluster = dr_tests::PgCluster::start_logical();
    cluster.create_db(DB);
    cluster.psql(
        DB,
        "CREATE TABLE t (id serial PRIMARY KEY, v text); INSERT INTO t (v) VALUES ('base')",
    );
    let port = free_port();
    let cold = Storage::File(base.dir().join("cold"));
    // The primary keeps `daily` 30 days; the copy keeps it one second.
    let body = encryption_toml(&[&base.keys.recipient], Some(&base.keys.identity))
        + &database_toml(DB, &cluster.url(DB), None)
        + "  [databases.continuous]\n  segment_seconds = 1\n\n"
        + &copy_toml("cold", &cold)
        + "  [copies.keep]\n  daily = \"1s\"\n\n"
        + &format!("[agent]\nlisten = \"127.0.0.1:{port}\"\n");
    let config = write_config(base.dir(), &base.storage, &body);
    let dr = || Dr::new(&config).env("PGPASSWORD", cluster.password());
    dr().args(["continuous", "setup", "--database", DB])
        .run()
        .assert_success();
    let first = dr()
        .args(["backup", "--database", DB, "--class", "daily"])
        .run()
        .assert_one_backup_id();
    std::thread::sleep(Duration::from_millis(1100));
    let second = dr()
        .args(["backup", "--database", DB, "--class", "daily"])
        .run()
        .assert_one_backup_id();
    let agent = Agent::start(dr(), port);
    cluster.psql(DB, "INSERT INTO t (v) VALUES ('after both backups')");
    let segments = base.dir().join("cold/test").join(DB).join("changes");
    let in_step = wait_until(Duration::from_secs(60), || {
        listed(dr(), "cold") == vec![second.clone()]
            && fs::read_dir(&segments).is_ok_and(|d| d.count() > 0)
    });
    assert!(
        in_step,
        "copy holds {:?}:\n{}",
        listed(dr(), "cold"),
        agent.log()
    );
    // The primary's retention is its own.
    assert_eq!(listed(dr(), "primary"), vec![first, second]);
    // Wait for a segment holding the insert, then restore from the copy alone.
    let expected = cluster.psql(DB, "SELECT string_agg(v, ',' ORDER BY id) FROM t");
    let restored = wait_until(Duration::from_secs(60), || {
        let out = dr()
            .args([
                "restore",
                "--database",
                DB,
                "--to-time",
                "latest",
                "--create",
            ])
            .args([
                "--repository",
                "cold",
                "--target",
                &cluster.url("from_cold"),
            ])
            .arg("--staging-dir")
            .arg(base.dir())
            .run();
        if !out.status.success() {
            return false;
        }
        let got = cluster.psql("from_cold", "SELECT string_agg(v, ',' ORDER BY id) FROM t");
        if got != expected {
            cluster.psql("postgres", "DROP DATABASE from_cold");
            return false;
        }
        true
    });
    assert!(
        restored,
        "no point-in-time restore from the copy reached the insert:\n{}",
        agent.log()
    );
}

#[test]
fn a_copy_is_not_sent_backups_its_own_keep_would_delete() {
    let base = BedBase::file("dr-copies-");
    create_seeded(&base.cluster, DB);
    let cold = Storage::File(base.dir().join("cold"));
    // The primary keeps `daily` 30 days; the copy keeps it one second, so of two backups
    // the older is beyond the copy's keep at once.
    let body = encryption_toml(&[&base.keys.recipient], Some(&base.keys.identity))
        + &database_toml(DB, &base.cluster.url(DB), None)
        + &copy_toml("cold", &cold)
        + "  [copies.keep]\n  daily = \"1s\"\n";
    let config = write_config(base.dir(), &base.storage, &body);
    let dr = || Dr::new(&config).env("PGPASSWORD", base.cluster.password());
    let backup = || {
        dr().args(["backup", "--database", DB, "--class", "daily"])
            .run()
            .assert_one_backup_id()
    };
    let first = backup();
    std::thread::sleep(Duration::from_millis(1100));
    let second = backup();
    std::thread::sleep(Duration::from_millis(1100));

    // Copied, the older one would be pruned from the copy and copied again on every pass.
    let out = dr().args(["copy", "--to", "cold", "--json"]).run();
    out.assert_success();
    let report = &json(&out)[0];
    let unit = |id: &str| format!("test/{DB}/backups/{id}");
    assert_eq!(
        report["copied"],
        serde_json::json!([unit(&second)]),
        "{report:#}"
    );
    assert_eq!(
        report["beyond_keep"],
        serde_json::json!([unit(&first)]),
        "{report:#}"
    );
    assert_eq!(listed(dr(), "cold"), vec![second.clone()]);
    // Nothing is left to copy next time, and the primary keeps both.
    let again = json(&dr().args(["copy", "--to", "cold", "--json"]).run());
    assert_eq!(again[0]["copied"], serde_json::json!([]), "{again:#}");
    assert_eq!(again[0]["present"], 1, "{again:#}");
    assert_eq!(listed(dr(), "primary"), vec![first, second]);
    // The human report says what was left out.
    let text = dr().args(["copy", "--to", "cold"]).run();
    text.assert_success();
    assert!(
        text.stdout.contains("1 older than its keep (not copied)"),
        "{}",
        text.stdout
    );
}
