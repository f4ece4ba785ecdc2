//! End-to-end tests of `dr restore` and `dr verify`: the built `dr` against real PostgreSQL
//! clusters and a real Garage S3 server. Every test builds its own cluster, repository, keys
//! and staging directory.
//!
//! What they prove: a restore reproduces the source table for table (streamed and staged,
//! file and S3); the right backup is chosen; a damaged, missing or undecryptable backup fails
//! loudly and never touches the target; a non-empty target is refused without `--force`;
//! staging files never outlive the run (success, failure, Ctrl-C); `--dry-run` changes
//! nothing; `verify --deep` reads the archive.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dr_tests::{
    create_seeded, database_toml, dir_entries, encryption_toml, pg_bindir, table_hashes, tool_dir,
    wait_with_timeout, write_config, write_secret_file, BedBase, Dr, DrOutput, PgCluster, Repo,
    Storage, SEED_ROLE,
};
use serde_json::Value;

const ENV: &str = "test";
const DATA_OBJECT: &str = "data.dump.zst.age";

/// A cluster with a seeded database `app`, keys, a repository (file or S3), a config whose
/// `[encryption] identity_file` is the bed's identity, and an empty staging directory.
struct Bed {
    base: BedBase,
    config: PathBuf,
}

impl Bed {
    /// A seeded cluster and a `file://` repository.
    fn file() -> Bed {
        Bed::new(BedBase::file("dr-restore-e2e-"))
    }

    /// A seeded cluster and an S3 repository on a fresh Garage under `prefix`.
    fn s3(prefix: &str) -> Bed {
        Bed::new(BedBase::s3("dr-restore-e2e-", prefix))
    }

    fn new(base: BedBase) -> Bed {
        create_seeded(&base.cluster, "app");
        let body = encryption_toml(&[&base.keys.recipient], Some(&base.keys.identity))
            + &database_toml("app", &base.cluster.url("app"), None);
        let config = write_config(base.dir(), &base.storage, &body);
        fs::create_dir(base.dir().join("staging")).expect("create staging dir");
        Bed { base, config }
    }

    fn dir(&self) -> &Path {
        self.base.dir()
    }

    /// Where every restore of this bed stages its archive.
    fn staging(&self) -> PathBuf {
        self.dir().join("staging")
    }

    /// `dr --config <config>` with the storage credentials and the cluster's password
    /// (for pg_dump and for restore targets on the same cluster) in its environment.
    fn dr(&self) -> Dr {
        self.dr_without_password()
            .env("PGPASSWORD", self.base.cluster.password())
    }

    /// Like [`Bed::dr`] without PGPASSWORD.
    fn dr_without_password(&self) -> Dr {
        self.base.dr(&self.config)
    }

    /// `dr restore --database app --staging-dir <staging>`, password in the environment.
    fn restore(&self) -> Dr {
        self.dr()
            .args(["restore", "--database", "app", "--staging-dir"])
            .arg(self.staging())
    }

    /// [`Bed::restore`] into `db` on the bed's cluster.
    fn restore_into(&self, db: &str) -> Dr {
        self.restore()
            .args(["--target", &self.base.cluster.url(db)])
    }

    fn repo(&self) -> Repo {
        self.base.repo()
    }

    /// Runs `dr backup --database app`, asserts it printed one id, and returns it.
    fn backup_ok(&self) -> String {
        self.dr()
            .args(["backup", "--database", "app"])
            .run()
            .assert_one_backup_id()
    }

    /// The data object of backup `id` on disk (file repositories only).
    fn data_object(&self, id: &str) -> PathBuf {
        let Storage::File(root) = &self.base.storage else {
            panic!("data_object needs a file:// bed")
        };
        root.join(format!("{ENV}/app/backups/{id}/{DATA_OBJECT}"))
    }

    /// Asserts the restored database `db` holds exactly the source's tables and rows.
    fn assert_same_as_source(&self, db: &str) {
        assert_eq!(
            table_hashes(&self.base.cluster, "app"),
            table_hashes(&self.base.cluster, db),
            "the restored database {db} differs from the source"
        );
    }

    /// Asserts the staging directory holds nothing (no `dr-restore-*.dump` left behind).
    fn assert_staging_empty(&self, after: &str) {
        let left = dir_entries(&self.staging());
        assert!(
            left.is_empty(),
            "files left in the staging directory after {after}: {left:?}"
        );
    }
}

/// Parses `dr restore --json` output.
fn summary(out: &DrOutput) -> Value {
    out.assert_success();
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("dr restore --json printed no JSON ({e}):\n{}", out.stdout))
}

/// Checks the fields every restore summary carries.
fn assert_summary(summary: &Value, id: &str, mode: &str, jobs: u64) {
    assert_eq!(summary["backup_id"], id, "{summary:#}");
    assert_eq!(summary["database"], "app", "{summary:#}");
    assert_eq!(summary["mode"], mode, "{summary:#}");
    assert_eq!(summary["jobs"].as_u64(), Some(jobs), "{summary:#}");
    assert!(summary["destination"].is_string(), "{summary:#}");
    assert!(
        summary["stored_bytes"].as_u64().unwrap_or(0) > 0,
        "{summary:#}"
    );
    assert!(
        summary["raw_bytes"].as_u64().unwrap_or(0) > 0,
        "{summary:#}"
    );
    for stage in ["fetch", "decrypt_decompress", "pg_restore"] {
        assert!(
            summary["seconds"][stage].as_f64().is_some(),
            "seconds.{stage} missing: {summary:#}"
        );
    }
    assert!(
        summary["seconds"]["total"].as_f64().unwrap_or(0.0) > 0.0,
        "seconds.total is not positive: {summary:#}"
    );
}

fn db_exists(cluster: &PgCluster, db: &str) -> bool {
    let n = cluster.psql(
        "postgres",
        &format!(
            "SELECT count(*) FROM pg_database WHERE datname = '{}'",
            db.replace('\'', "''")
        ),
    );
    n == "1"
}

/// User tables in `db`.
fn table_count(cluster: &PgCluster, db: &str) -> u64 {
    cluster
        .psql(
            db,
            "SELECT count(*) FROM pg_tables \
             WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
        )
        .parse()
        .expect("a count")
}

fn role_exists(cluster: &PgCluster, role: &str) -> bool {
    cluster.psql(
        "postgres",
        &format!("SELECT count(*) FROM pg_roles WHERE rolname = '{role}'"),
    ) == "1"
}

// ---------------------------------------------------------------------------------------
// Round trips

#[test]
fn file_restore_round_trip_jobs_1_and_2() {
    let bed = Bed::file();
    let id = bed.backup_ok();

    let streamed = summary(
        &bed.restore_into("restored_j1")
            .args(["--create", "--jobs", "1", "--json"])
            .run(),
    );
    assert_summary(&streamed, &id, "streamed", 1);
    assert_eq!(streamed["target_created"], true, "{streamed:#}");
    bed.assert_same_as_source("restored_j1");

    let staged = summary(
        &bed.restore_into("restored_j2")
            .args(["--create", "--jobs", "2", "--json"])
            .run(),
    );
    assert_summary(&staged, &id, "staged", 2);
    assert_eq!(staged["target_created"], true, "{staged:#}");
    bed.assert_same_as_source("restored_j2");
    bed.assert_staging_empty("a staged restore");
}

#[test]
fn s3_restore_round_trip() {
    let bed = Bed::s3("ci");
    let id = bed.backup_ok();
    assert_eq!(bed.repo().committed_ids(ENV, "app"), vec![id.clone()]);

    let staged = summary(
        &bed.restore_into("restored_j2")
            .args(["--create", "--jobs", "2", "--json"])
            .run(),
    );
    assert_summary(&staged, &id, "staged", 2);
    bed.assert_same_as_source("restored_j2");

    // Streaming straight from S3 into pg_restore is a different path; cover it too.
    let streamed = summary(
        &bed.restore_into("restored_j1")
            .args(["--create", "--jobs", "1", "--json"])
            .run(),
    );
    assert_summary(&streamed, &id, "streamed", 1);
    bed.assert_same_as_source("restored_j1");
    bed.assert_staging_empty("S3 restores");
}

// ---------------------------------------------------------------------------------------
// Choosing the backup

#[test]
fn before_picks_the_right_backup_among_three() {
    let bed = Bed::file();
    bed.base
        .cluster
        .psql("app", "CREATE TABLE marker (v int NOT NULL)");
    let mut ids = Vec::new();
    for v in 1..=3 {
        if v > 1 {
            // Backup ids and start times have a resolution of one second.
            std::thread::sleep(Duration::from_millis(1500));
        }
        bed.base.cluster.psql(
            "app",
            &format!("DELETE FROM marker; INSERT INTO marker VALUES ({v})"),
        );
        ids.push(bed.backup_ok());
    }

    let listed = bed.dr().list_json(Some("app"));
    let started: BTreeMap<String, f64> = listed
        .iter()
        .map(|b| {
            let id = b["id"].as_str().expect("id").to_string();
            let at = b["started_at"].as_str().expect("started_at");
            (id, parse_utc(at))
        })
        .collect();
    for id in &ids {
        assert!(started.contains_key(id), "{id} not listed: {listed:?}");
    }
    let (t2, t3) = (started[&ids[1]], started[&ids[2]]);
    assert!(t2 < t3, "started_at does not increase: {listed:?}");
    let between = format_utc((t2 + t3) / 2.0);
    eprintln!("backups {ids:?}; --before {between}");

    let out = bed
        .restore_into("before")
        .args(["--create", "--jobs", "2", "--json", "--before", &between])
        .run();
    let chosen = summary(&out);
    assert_eq!(
        chosen["backup_id"], ids[1],
        "--before {between} chose the wrong backup: {chosen:#}"
    );
    assert_eq!(bed.base.cluster.psql("before", "SELECT v FROM marker"), "2");

    // The default is the newest.
    let latest = summary(
        &bed.restore_into("latest")
            .args(["--create", "--jobs", "2", "--json", "--latest"])
            .run(),
    );
    assert_eq!(latest["backup_id"], ids[2], "{latest:#}");
    assert_eq!(bed.base.cluster.psql("latest", "SELECT v FROM marker"), "3");

    // An unknown id fails, names the nearest existing ids, and creates nothing.
    let unknown = "20200101T000000Z-0000";
    let out = bed
        .restore_into("unknown")
        .args(["--create", "--jobs", "2", "--backup", unknown])
        .run();
    out.assert_failure_mentions(&[unknown, "nearest"]);
    assert!(
        ids.iter().any(|id| out.stderr.contains(id.as_str())),
        "the error names none of the existing ids {ids:?}:\n{}",
        out.stderr
    );
    assert!(!db_exists(&bed.base.cluster, "unknown"));

    // Before the first backup there is nothing to restore.
    let out = bed
        .restore_into("too_early")
        .args(["--create", "--before", "2000-01-01T00:00:00Z"])
        .run();
    out.assert_failure_mentions(&[&ids[0]]);
    assert!(!db_exists(&bed.base.cluster, "too_early"));
}

// ---------------------------------------------------------------------------------------
// Damaged backups

/// Runs `dr verify` (text) and asserts it fails naming the backup, the object and every
/// one of `needles`.
fn assert_verify_fails(bed: &Bed, id: &str, needles: &[&str]) {
    let out = bed.dr().args(["verify", "--database", "app"]).run();
    eprintln!("dr verify:\n{}", out.both());
    out.assert_failure_mentions(&["failed verification"]);
    let text = out.both().to_lowercase();
    for needle in [id, DATA_OBJECT].iter().chain(needles) {
        assert!(
            text.contains(&needle.to_lowercase()),
            "dr verify does not mention {needle:?}:\n{}",
            out.both()
        );
    }
    let json = bed
        .dr()
        .args(["verify", "--database", "app", "--json"])
        .run();
    assert!(!json.status.success(), "dr verify --json exited 0");
    let checks: Value = serde_json::from_str(&json.stdout).expect("verify --json is JSON");
    let check = &checks[0];
    assert_eq!(check["backup_id"], id, "{checks:#}");
    assert_eq!(check["ok"], false, "{checks:#}");
    let data = check["objects"]
        .as_array()
        .expect("objects")
        .iter()
        .find(|o| o["name"] == DATA_OBJECT)
        .unwrap_or_else(|| panic!("no {DATA_OBJECT} in {checks:#}"));
    assert_eq!(data["ok"], false, "{checks:#}");
    assert!(data["error"].is_string(), "{checks:#}");
}

/// Restores the damaged latest backup three ways and asserts each fails mentioning
/// `needles` without leaving a database behind, then once into an existing empty database
/// that must survive untouched.
fn assert_restores_fail_untouched(bed: &Bed, case: &str, needles: &[&str]) {
    for jobs in ["2", "1"] {
        let db = format!("{case}_j{jobs}");
        let out = bed
            .restore_into(&db)
            .args(["--create", "--jobs", jobs])
            .run();
        eprintln!("[{case}, --jobs {jobs}] dr restore:\n{}", out.stderr);
        out.assert_failure_mentions(&["restore failed"]);
        out.assert_failure_mentions(needles);
        assert!(
            !db_exists(&bed.base.cluster, &db),
            "[{case}] a failed restore with --jobs {jobs} --create left database {db} behind"
        );
    }
    // An existing empty database must survive a failed restore as it was, whatever --jobs
    // says (a pre-existing target is never streamed into).
    let db = format!("{case}_existing");
    bed.base.cluster.create_db(&db);
    for jobs in ["2", "1"] {
        let out = bed.restore_into(&db).args(["--jobs", jobs]).run();
        out.assert_failure_mentions(needles);
        assert!(
            db_exists(&bed.base.cluster, &db),
            "[{case}] a failed restore dropped the existing database {db}"
        );
        assert_eq!(
            table_count(&bed.base.cluster, &db),
            0,
            "[{case}] a failed restore with --jobs {jobs} wrote tables into {db}"
        );
    }
    bed.assert_staging_empty(&format!("failed restores ({case})"));
}

/// Byte offset in an age file where the first 64 KiB payload chunk starts: after the header
/// (which ends with the `--- MAC` line) and the 16-byte payload nonce.
fn age_payload_start(bytes: &[u8]) -> usize {
    let mac_line = bytes
        .windows(5)
        .position(|w| w == b"\n--- ")
        .expect("age header has a MAC line");
    let end = mac_line
        + 1
        + bytes[mac_line + 1..]
            .iter()
            .position(|&b| b == b'\n')
            .expect("MAC line ends");
    end + 1 + 16
}

/// One age STREAM chunk as stored: 64 KiB of plaintext plus a 16-byte tag.
const AGE_CHUNK: usize = 64 * 1024 + 16;

#[test]
fn corrupted_truncated_missing_and_wrong_key_fail_clearly_and_leave_target_untouched() {
    let bed = Bed::file();
    let id = bed.backup_ok();
    let object = bed.data_object(&id);
    let original = fs::read(&object).expect("read data object");
    let payload = age_payload_start(&original);
    assert!(
        original.len() > payload + 4 * AGE_CHUNK,
        "the data object ({} bytes) is too small for the chunk-boundary case",
        original.len()
    );

    // (a) One flipped byte in the middle.
    let mut flipped = original.clone();
    flipped[original.len() / 2] ^= 0xff;
    fs::write(&object, &flipped).expect("write flipped object");
    assert_verify_fails(&bed, &id, &["sha256"]);
    assert_restores_fail_untouched(&bed, "flipped", &["corrupted", DATA_OBJECT, &id]);

    // (b) Truncated off a chunk boundary (half the object) and exactly on one (so every
    // chunk left authenticates, but the final one is missing).
    for (case, len) in [
        ("cut_half", original.len() / 2),
        ("cut_chunk", payload + 2 * AGE_CHUNK),
    ] {
        fs::write(&object, &original[..len]).expect("write truncated object");
        assert_verify_fails(&bed, &id, &["truncated"]);
        assert_restores_fail_untouched(&bed, case, &["truncated", DATA_OBJECT, &id]);
    }

    // (c) The data object is gone.
    fs::remove_file(&object).expect("remove data object");
    assert_verify_fails(&bed, &id, &["missing"]);
    assert_restores_fail_untouched(&bed, "missing", &["missing", DATA_OBJECT, &id]);

    // (d) Intact again, but decrypted with someone else's identity.
    fs::write(&object, &original).expect("restore data object");
    bed.dr()
        .args(["verify", "--database", "app"])
        .run()
        .assert_success();
    let other_dir = bed.dir().join("other-key");
    fs::create_dir(&other_dir).expect("create other key dir");
    let other = dr_tests::keygen(&other_dir);
    for jobs in ["2", "1"] {
        let db = format!("wrong_key_j{jobs}");
        let out = bed
            .restore_into(&db)
            .args(["--create", "--jobs", jobs, "--identity"])
            .arg(&other.identity)
            .run();
        eprintln!("[wrong key, --jobs {jobs}] dr restore:\n{}", out.stderr);
        out.assert_failure_mentions(&["identit", &bed.base.keys.recipient]);
        assert!(
            !db_exists(&bed.base.cluster, &db),
            "a restore with the wrong key left database {db} behind"
        );
    }
    bed.assert_staging_empty("wrong-key restores");

    // With the right key everything works again.
    bed.restore_into("good")
        .args(["--create", "--jobs", "2"])
        .run()
        .assert_success();
    bed.assert_same_as_source("good");
}

// ---------------------------------------------------------------------------------------
// Targets

#[test]
fn non_empty_target_is_refused_without_force() {
    let bed = Bed::file();
    bed.backup_ok();
    bed.base.cluster.create_db("busy");
    bed.base.cluster.psql(
        "busy",
        "CREATE TABLE precious (id int PRIMARY KEY, note text);
         INSERT INTO precious SELECT i, 'row ' || i FROM generate_series(1, 3) AS i;",
    );
    let precious = || {
        bed.base.cluster.psql(
            "busy",
            "SELECT string_agg(id || ':' || note, ',' ORDER BY id) FROM precious",
        )
    };
    let before = precious();

    for jobs in ["2", "1"] {
        let out = bed.restore_into("busy").args(["--jobs", jobs]).run();
        eprintln!(
            "[--jobs {jobs}] dr restore into a non-empty db:\n{}",
            out.stderr
        );
        out.assert_failure_mentions(&["already holds", "busy", "--force"]);
        assert_eq!(precious(), before, "a refused restore changed the target");
        assert_eq!(table_count(&bed.base.cluster, "busy"), 1);
    }
    // --force cannot be confirmed without a terminal unless --yes is given.
    let out = bed
        .restore_into("busy")
        .args(["--jobs", "2", "--force"])
        .run();
    out.assert_failure_mentions(&["--yes"]);
    assert_eq!(
        precious(),
        before,
        "an unconfirmed --force changed the target"
    );
    assert_eq!(table_count(&bed.base.cluster, "busy"), 1);

    let out = bed
        .restore_into("busy")
        .args(["--jobs", "2", "--force", "--yes", "--json"])
        .run();
    let done = summary(&out);
    assert_eq!(done["target_created"], false, "{done:#}");
    let source = table_hashes(&bed.base.cluster, "app");
    let restored = table_hashes(&bed.base.cluster, "busy");
    for (table, hash) in &source {
        assert_eq!(
            restored.get(table),
            Some(hash),
            "table {table} differs after restoring with --force"
        );
    }
    bed.assert_staging_empty("a forced restore");
}

#[test]
fn output_writes_an_archive_pg_restore_accepts() {
    let bed = Bed::file();
    let id = bed.backup_ok();
    let out_dir = bed.dir().join("out");
    fs::create_dir(&out_dir).expect("create output dir");
    let file = out_dir.join("app.dump");

    let out = bed.restore().arg("--output").arg(&file).arg("--json").run();
    let done = summary(&out);
    assert_eq!(done["mode"], "output", "{done:#}");
    assert_eq!(done["backup_id"], id.as_str(), "{done:#}");
    let size = fs::metadata(&file).expect("output file exists").len();
    assert_eq!(
        done["raw_bytes"].as_u64(),
        Some(size),
        "raw_bytes is not the archive's size: {done:#}"
    );

    let list = std::process::Command::new(pg_bindir().join("pg_restore"))
        .arg("-l")
        .arg(&file)
        .output()
        .expect("run pg_restore -l");
    assert!(
        list.status.success(),
        "pg_restore -l rejected the archive:\n{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let toc = String::from_utf8_lossy(&list.stdout);
    for table in ["customers", "events", "app_settings"] {
        assert!(toc.contains(table), "the archive lists no {table}:\n{toc}");
    }
    // And pg_restore can restore it.
    bed.base.cluster.create_db("from_file");
    let restored = bed
        .base
        .cluster
        .client_command("pg_restore")
        .args(["--exit-on-error", "-d", "from_file"])
        .arg(&file)
        .output()
        .expect("run pg_restore");
    assert!(
        restored.status.success(),
        "pg_restore of the output failed:\n{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    bed.assert_same_as_source("from_file");

    let again = bed.restore().arg("--output").arg(&file).run();
    again.assert_failure_mentions(&["already exists"]);
    assert_eq!(
        fs::metadata(&file).expect("output still there").len(),
        size,
        "a refused --output changed the existing file"
    );
    assert_eq!(
        dir_entries(&out_dir),
        vec!["app.dump".to_string()],
        "temporary files left next to the output"
    );
}

#[test]
fn globals_recreates_a_role_the_source_had() {
    let bed = Bed::file();
    let id = bed.backup_ok();
    let other = PgCluster::start();
    assert!(!role_exists(&other, SEED_ROLE));

    // The target's password from a file this time, not the environment.
    let password_file = bed.dir().join("target-password");
    write_secret_file(&password_file, other.password());
    let out = bed
        .dr_without_password()
        .args(["restore", "--database", "app", "--staging-dir"])
        .arg(bed.staging())
        .args(["--target", &other.url("app"), "--create", "--globals"])
        .args(["--jobs", "2", "--json", "--target-password-file"])
        .arg(&password_file)
        .run();
    let done = summary(&out);
    assert_summary(&done, &id, "staged", 2);
    assert!(
        !out.stdout.contains(other.password()) && !out.stderr.contains(other.password()),
        "the target password leaked"
    );

    assert!(
        role_exists(&other, SEED_ROLE),
        "{SEED_ROLE} was not created on the new cluster"
    );
    let names = |key: &str| -> Vec<String> {
        done["globals"][key]
            .as_array()
            .unwrap_or_else(|| panic!("globals.{key} missing: {done:#}"))
            .iter()
            .map(|v| v.as_str().expect("role name").to_string())
            .collect()
    };
    assert!(
        names("created").iter().any(|r| r == SEED_ROLE),
        "globals.created lacks {SEED_ROLE}: {done:#}"
    );
    assert!(
        names("skipped_existing").iter().any(|r| r == "postgres"),
        "globals.skipped_existing lacks postgres: {done:#}"
    );
    assert!(
        !names("created").iter().any(|r| r == "postgres"),
        "postgres reported as created: {done:#}"
    );
    assert_eq!(
        other.psql(
            "app",
            "SELECT tableowner FROM pg_tables WHERE tablename = 'app_settings'"
        ),
        SEED_ROLE,
        "ownership by the recreated role was not restored"
    );
    assert_eq!(
        table_hashes(&bed.base.cluster, "app"),
        table_hashes(&other, "app"),
        "the restore on the other cluster differs from the source"
    );
}

/// One role's attributes, settings, memberships and comment, as the catalog shows them.
fn role_state(cluster: &PgCluster, role: &str) -> String {
    cluster.psql(
        "postgres",
        &format!(
            "SELECT concat_ws(' | ', rolcanlogin, rolcreatedb, rolcreaterole, rolconnlimit, \
               coalesce(array_to_string(rolconfig, ','), '-'), \
               coalesce((SELECT string_agg(g.rolname, ',' ORDER BY g.rolname) \
                         FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid \
                         WHERE m.member = r.oid), '-'), \
               coalesce(shobj_description(r.oid, 'pg_authid'), '-')) \
             FROM pg_roles r WHERE rolname = '{role}'"
        ),
    )
}

#[test]
fn globals_leave_an_existing_role_unchanged() {
    let bed = Bed::file();
    let source = &bed.base.cluster;
    source.psql(
        "postgres",
        &format!(
            "CREATE ROLE dr_admins NOLOGIN;\n\
             CREATE ROLE dr_newcomer LOGIN;\n\
             ALTER ROLE {SEED_ROLE} LOGIN CREATEDB CREATEROLE CONNECTION LIMIT 7;\n\
             ALTER ROLE {SEED_ROLE} SET work_mem = '7MB';\n\
             GRANT dr_admins TO {SEED_ROLE};\n\
             GRANT dr_admins TO dr_newcomer;\n\
             COMMENT ON ROLE {SEED_ROLE} IS 'from the source';"
        ),
    );
    bed.backup_ok();

    // The target server already has the role, with other attributes and no memberships.
    let other = PgCluster::start();
    other.psql(
        "postgres",
        &format!(
            "CREATE ROLE dr_admins NOLOGIN;\n\
             CREATE ROLE {SEED_ROLE} NOLOGIN NOCREATEDB CONNECTION LIMIT 3;"
        ),
    );
    let before = role_state(&other, SEED_ROLE);
    let out = bed
        .dr_without_password()
        .env("PGPASSWORD", other.password())
        .args(["restore", "--database", "app", "--staging-dir"])
        .arg(bed.staging())
        .args(["--target", &other.url("app"), "--create", "--globals"])
        .args(["--jobs", "2", "--json"])
        .run();
    let done = summary(&out);
    assert_eq!(
        role_state(&other, SEED_ROLE),
        before,
        "--globals changed the existing role {SEED_ROLE} (login | createdb | createrole | \
         connlimit | settings | member of | comment); summary: {done:#}"
    );
    assert!(
        done["globals"]["skipped_existing"]
            .as_array()
            .is_some_and(|a| a.iter().any(|r| r == SEED_ROLE)),
        "{done:#}"
    );
    // A role the restore creates still gets its membership of an existing role.
    assert_eq!(
        other.psql(
            "postgres",
            "SELECT count(*) FROM pg_auth_members m \
             JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles u ON u.oid = m.member \
             WHERE g.rolname = 'dr_admins' AND u.rolname = 'dr_newcomer'"
        ),
        "1",
        "the new role dr_newcomer lost its membership in dr_admins; summary: {done:#}"
    );
}

#[test]
fn a_damaged_globals_object_fails_the_restore_without_leaving_a_database() {
    let bed = Bed::file();
    let id = bed.backup_ok();
    let globals = bed.data_object(&id).with_file_name("globals.sql.zst.age");
    let mut bytes = fs::read(&globals).expect("read globals object");
    let at = bytes.len() - 20;
    bytes[at] ^= 0x01;
    fs::write(&globals, &bytes).expect("write damaged globals object");

    for (db, jobs) in [("staged_globals", "2"), ("streamed_globals", "1")] {
        let out = bed
            .restore_into(db)
            .args(["--create", "--globals", "--jobs", jobs])
            .run();
        out.assert_failure_mentions(&["globals"]);
        assert!(
            !db_exists(&bed.base.cluster, db),
            "the restore with --jobs {jobs} left the database {db} it created behind:\n{}",
            out.stderr
        );
        bed.assert_staging_empty("a failed globals step");
    }
}

#[test]
fn restore_refuses_a_password_in_the_target_url() {
    let bed = Bed::file();
    bed.backup_ok();
    let password = bed.base.cluster.password().to_string();
    let with_password = bed.base.cluster.url_with_password("from_argv");
    // A password that breaks URL parsing is refused the same way, and not echoed either.
    let unparseable = format!(
        "postgres://postgres:{password}#x/y@127.0.0.1:{}/from_argv",
        bed.base.cluster.port()
    );
    for url in [with_password, unparseable] {
        let out = bed.restore().args(["--target", &url, "--create"]).run();
        out.assert_failure_mentions(&["PGPASSWORD", "pgpass", "--target-password-file"]);
        assert!(
            !out.both().contains(&password),
            "the refusal echoed the password:\n{}",
            out.both()
        );
        assert!(!db_exists(&bed.base.cluster, "from_argv"));
    }
}

// ---------------------------------------------------------------------------------------
// Staging files and signals

/// A `pg_restore` wrapper that passes `--list`/`--version` straight through but, for a real
/// restore, touches `marker` and sleeps a minute first (ending the sleep if it is
/// signalled), so a test can interrupt `dr` while pg_restore runs.
fn slow_pg_restore(marker: &Path) -> String {
    format!(
        r#"#!/bin/bash
for arg in "$@"; do
  case "$arg" in
    -l|--list|-V|--version) exec '{real}' "$@" ;;
  esac
done
sleep 60 </dev/null >/dev/null 2>&1 &
sleeper=$!
trap 'kill $sleeper 2>/dev/null; exit 143' TERM INT
touch '{marker}'
wait $sleeper
exec '{real}' "$@"
"#,
        real = pg_bindir().join("pg_restore").display(),
        marker = marker.display(),
    )
}

#[test]
fn staging_file_is_removed_after_success_failure_and_sigint() {
    let bed = Bed::file();
    let id = bed.backup_ok();

    // Success.
    bed.restore_into("ok")
        .args(["--create", "--jobs", "2"])
        .run()
        .assert_success();
    bed.assert_same_as_source("ok");
    bed.assert_staging_empty("a successful restore");

    // Failure: a corrupted object (flipped near the end, so most of it is staged first).
    let object = bed.data_object(&id);
    let original = fs::read(&object).expect("read data object");
    let mut damaged = original.clone();
    let at = original.len() - original.len() / 10;
    damaged[at] ^= 0x01;
    fs::write(&object, &damaged).expect("write damaged object");
    let out = bed
        .restore_into("damaged")
        .args(["--create", "--jobs", "2"])
        .run();
    out.assert_failure_mentions(&["corrupted"]);
    bed.assert_staging_empty("a failed restore");
    assert!(!db_exists(&bed.base.cluster, "damaged"));
    fs::write(&object, &original).expect("repair data object");

    // SIGINT while pg_restore runs from the staged file.
    let marker = bed.dir().join("pg_restore-started");
    let tools = tool_dir(bed.dir(), &[("pg_restore", slow_pg_restore(&marker))]);
    let child = bed
        .restore_into("interrupted")
        .path_first(&tools)
        .args(["--create", "--jobs", "2"])
        .spawn();
    let pid = child.id();
    let staged_file_seen = || {
        dir_entries(&bed.staging())
            .iter()
            .any(|n| n.starts_with("dr-restore-") && n.ends_with(".dump"))
    };
    let started = Instant::now();
    while !(marker.exists() && staged_file_seen()) && started.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let ready = marker.exists() && staged_file_seen();
    // SAFETY: kill(2) on our own child, which has not been reaped yet.
    unsafe {
        libc::kill(pid as i32, libc::SIGINT);
    }
    let interrupted_at = Instant::now();
    let out = wait_with_timeout(child, Duration::from_secs(15));
    eprintln!(
        "dr after SIGINT ({:?}):\n{}",
        interrupted_at.elapsed(),
        out.stderr
    );
    assert!(
        ready,
        "the staged file and the slow pg_restore never both appeared (did dr use the pg_restore \
         next to the pg_dump first on PATH?); staging dir: {:?}\n{}",
        dir_entries(&bed.staging()),
        out.stderr
    );
    assert_eq!(
        out.status.code(),
        Some(130),
        "dr did not exit 130 after SIGINT ({}):\n{}",
        out.status,
        out.stderr
    );
    bed.assert_staging_empty("SIGINT");
    assert!(
        !db_exists(&bed.base.cluster, "interrupted"),
        "the database the interrupted restore created was left behind:\n{}",
        out.stderr
    );
}

/// A `pg_restore` wrapper that, for a real restore, touches `marker` and then ignores SIGTERM
/// and SIGINT for two minutes (as a pg_restore stuck in a long statement does).
fn stubborn_pg_restore(marker: &Path) -> String {
    format!(
        r#"#!/bin/bash
for arg in "$@"; do
  case "$arg" in
    -l|--list|-V|--version) exec '{real}' "$@" ;;
  esac
done
trap '' TERM INT
touch '{marker}'
sleep 120 </dev/null >/dev/null 2>&1
exec '{real}' "$@"
"#,
        real = pg_bindir().join("pg_restore").display(),
        marker = marker.display(),
    )
}

#[test]
fn ctrl_c_during_a_staged_restore_cleans_up_quickly_and_says_so() {
    let bed = Bed::file();
    bed.backup_ok();
    let marker = bed.dir().join("pg_restore-started");
    let tools = tool_dir(bed.dir(), &[("pg_restore", stubborn_pg_restore(&marker))]);
    let child = bed
        .restore_into("interrupted")
        .path_first(&tools)
        .args(["--create", "--jobs", "2"])
        .spawn();
    let pid = child.id();
    let started = Instant::now();
    while !marker.exists() && started.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(marker.exists(), "the wrapped pg_restore never started");
    assert!(db_exists(&bed.base.cluster, "interrupted"));
    // SAFETY: kill(2) on our own child, which has not been reaped yet.
    unsafe {
        libc::kill(pid as i32, libc::SIGINT);
    }
    let interrupted_at = Instant::now();
    let out = wait_with_timeout(child, Duration::from_secs(60));
    let took = interrupted_at.elapsed();
    eprintln!("dr after SIGINT ({took:?}):\n{}", out.stderr);
    assert_eq!(out.status.code(), Some(130), "{}", out.stderr);
    assert!(
        took < Duration::from_secs(25),
        "cleanup after Ctrl-C took {took:?}:\n{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("dropping database interrupted"),
        "dr did not say it was dropping the database it created:\n{}",
        out.stderr
    );
    assert!(
        !db_exists(&bed.base.cluster, "interrupted"),
        "the database the interrupted restore created was left behind:\n{}",
        out.stderr
    );
    bed.assert_staging_empty("SIGINT");
    let wrapper = tools.join("pg_restore").display().to_string();
    assert!(
        !dr_tests::processes()
            .iter()
            .any(|(_, args)| args.iter().any(|a| a == &wrapper)),
        "the stubborn pg_restore outlived dr"
    );
}

// ---------------------------------------------------------------------------------------
// Dry run and verify

#[test]
fn dry_run_touches_nothing() {
    let bed = Bed::file();
    let id = bed.backup_ok();

    let out = bed
        .restore_into("planned")
        .args(["--create", "--dry-run"])
        .run();
    out.assert_success();
    eprintln!("dr restore --dry-run:\n{}", out.stdout);
    assert!(
        out.stdout.contains(&id),
        "the dry run names no backup id:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("can decrypt"),
        "the dry run does not say the key can decrypt:\n{}",
        out.stdout
    );
    assert!(
        !db_exists(&bed.base.cluster, "planned"),
        "a dry run created the database"
    );
    bed.assert_staging_empty("a dry run");

    let json = bed
        .restore_into("planned")
        .args(["--create", "--dry-run", "--json"])
        .run();
    json.assert_success();
    let plan: Value = serde_json::from_str(&json.stdout).expect("dry-run --json is JSON");
    assert_eq!(plan["backup_id"], id.as_str(), "{plan:#}");
    assert_eq!(plan["identity_can_decrypt"], true, "{plan:#}");
    assert!(!db_exists(&bed.base.cluster, "planned"));

    // Even a dry run over a non-empty database with --force changes nothing.
    bed.base.cluster.create_db("busy");
    bed.base.cluster.psql(
        "busy",
        "CREATE TABLE t (id int); INSERT INTO t VALUES (1), (2)",
    );
    bed.restore_into("busy")
        .args(["--force", "--dry-run"])
        .run()
        .assert_success();
    assert_eq!(bed.base.cluster.psql("busy", "SELECT count(*) FROM t"), "2");

    let other_dir = bed.dir().join("other-key");
    fs::create_dir(&other_dir).expect("create other key dir");
    let other = dr_tests::keygen(&other_dir);
    let out = bed
        .restore_into("planned")
        .args(["--create", "--dry-run", "--identity"])
        .arg(&other.identity)
        .run();
    eprintln!("dry run with a wrong key:\n{}", out.stderr);
    out.assert_failure_mentions(&["identit"]);
    assert!(!db_exists(&bed.base.cluster, "planned"));
}

#[test]
fn verify_deep_lists_the_archive() {
    let bed = Bed::file();
    let id = bed.backup_ok();

    let shallow = bed.dr().args(["verify", "--json"]).run();
    shallow.assert_success();
    let deep = bed.dr().args(["verify", "--deep", "--json"]).run();
    deep.assert_success();
    let checks: Value = serde_json::from_str(&deep.stdout).expect("verify --json is JSON");
    let checks = checks.as_array().expect("an array");
    assert_eq!(checks.len(), 1, "{checks:#?}");
    let check = &checks[0];
    assert_eq!(check["backup_id"], id.as_str(), "{check:#}");
    assert_eq!(check["database"], "app", "{check:#}");
    assert_eq!(check["ok"], true, "{check:#}");
    let objects = check["objects"].as_array().expect("objects");
    assert!(
        objects
            .iter()
            .all(|o| o["ok"] == true && o["error"].is_null()),
        "{check:#}"
    );
    let data = objects
        .iter()
        .find(|o| o["name"] == DATA_OBJECT)
        .unwrap_or_else(|| panic!("no {DATA_OBJECT}: {check:#}"));
    assert!(data["stored_bytes"].as_u64().unwrap_or(0) > 0, "{check:#}");
    assert!(data["raw_bytes"].as_u64().unwrap_or(0) > 0, "{check:#}");
    assert!(
        data["toc_entries"].as_u64().unwrap_or(0) > 0,
        "--deep did not list the archive: {check:#}"
    );

    // --deep needs the identity; without one in the config or on the command line it says so.
    let no_identity_dir = bed.dir().join("no-identity");
    fs::create_dir(&no_identity_dir).expect("create dir");
    let body = encryption_toml(&[&bed.base.keys.recipient], None)
        + &database_toml("app", &bed.base.cluster.url("app"), None);
    let config = write_config(&no_identity_dir, &bed.base.storage, &body);
    Dr::new(&config).args(["verify"]).run().assert_success();
    let out = Dr::new(&config).args(["verify", "--deep"]).run();
    out.assert_failure_mentions(&["identit"]);
}

// ---------------------------------------------------------------------------------------
// RFC 3339 in UTC, both ways, without a date library.

/// Seconds since the epoch of `2026-05-01T12:34:56.789Z` (or `+00:00`).
fn parse_utc(text: &str) -> f64 {
    let (date, time) = text
        .split_once(['T', ' '])
        .unwrap_or_else(|| panic!("not RFC 3339: {text}"));
    let time = time
        .strip_suffix('Z')
        .or_else(|| time.strip_suffix("+00:00"))
        .unwrap_or_else(|| panic!("not UTC: {text}"));
    let d: Vec<i64> = date.split('-').map(|p| p.parse().expect("date")).collect();
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms.split(':').map(|p| p.parse().expect("time")).collect();
    let frac: f64 = format!("0.{frac}").parse().expect("fraction");
    let days = days_from_civil(d[0], d[1], d[2]);
    (days * 86_400 + t[0] * 3_600 + t[1] * 60 + t[2]) as f64 + frac
}

/// `secs` since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn format_utc(secs: f64) -> String {
    let millis = (secs * 1000.0).floor() as i64;
    let (days, ms_of_day) = (millis.div_euclid(86_400_000), millis.rem_euclid(86_400_000));
    let (y, m, d) = civil_from_days(days);
    let s = ms_of_day / 1000;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        ms_of_day % 1000
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[test]
fn utc_helpers_round_trip() {
    let t = parse_utc("2026-11-22T03:00:00.25Z");
    assert_eq!(format_utc(t), "2026-11-22T03:00:00.250Z");
    assert_eq!(parse_utc("1970-01-01T00:00:00Z"), 0.0);
    assert_eq!(parse_utc("2000-03-01T00:00:00+00:00"), 951_868_800.0);
}
