//! End-to-end tests of the queries `dr` runs itself (server version, the held snapshot and
//! its row counts, target inspection, drill checks): the built `dr` against real PostgreSQL.
//!
//! What they prove: identifiers are never split or quoted by hand (schemas and tables with
//! dots, spaces, quotes, newlines and non-ASCII back up, restore and drill with exact row
//! counts); the snapshot pg_dump imports survives role settings that kill idle or waiting
//! sessions; thousands of tables drill (no SQL on argv); and "empty target" means no user
//! object at all, not just no table.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use dr_tests::{database_toml, encryption_toml, write_config, BedBase, Dr, DrOutput, PgCluster};
use serde_json::Value;

const DB: &str = "app";

/// A cluster, a `file://` repository and a config whose drill restores into a scratch
/// database on the same cluster (allowed explicitly), the password coming from
/// `PGPASSWORD` like a libpq tool's would.
struct Bed {
    base: BedBase,
    config: PathBuf,
}

impl Bed {
    fn new() -> Bed {
        let base = BedBase::file("dr-pgcontrol-");
        base.cluster.create_db(DB);
        let body = encryption_toml(&[&base.keys.recipient], Some(&base.keys.identity))
            + &database_toml(DB, &base.cluster.url(DB), None)
            + &format!(
                "  [databases.drill]\n  target = {}\n  allow_same_server = true\n  checks = [\"select true\"]\n\n",
                toml_str(&base.cluster.url("postgres"))
            );
        let config = write_config(base.dir(), &base.storage, &body);
        fs::create_dir(base.dir().join("staging")).expect("create staging dir");
        Bed { base, config }
    }

    fn cluster(&self) -> &PgCluster {
        &self.base.cluster
    }

    fn dr(&self) -> Dr {
        self.base
            .dr(&self.config)
            .env("PGPASSWORD", self.cluster().password())
    }

    fn backup(&self) -> String {
        self.dr()
            .args(["backup", "--database", DB])
            .run()
            .assert_one_backup_id()
    }

    fn restore_into(&self, target: &str) -> DrOutput {
        self.dr()
            .args(["restore", "--database", DB, "--latest", "--staging-dir"])
            .arg(self.base.dir().join("staging"))
            .args([
                "--target",
                &self.cluster().url(target),
                "--create",
                "--json",
            ])
            .run()
    }

    /// `dr drill --json`: the one report, asserted to have passed.
    fn drill_passes(&self) -> Value {
        let out = self.dr().args(["drill", "--database", DB, "--json"]).run();
        let report: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "dr drill --json printed no JSON ({e}):\nstdout:\n{}\nstderr:\n{}",
                out.stdout, out.stderr
            )
        });
        let report = match report {
            Value::Array(mut v) => v.remove(0),
            v => v,
        };
        assert_eq!(
            report["passed"], true,
            "the drill failed:\n{report:#}\nstderr:\n{}",
            out.stderr
        );
        report
    }

    /// Exact row counts of every user table in `db`, keyed by `schema.table` as quoted
    /// by the server.
    fn counts(&self, db: &str) -> Vec<(String, u64)> {
        let tables = self.cluster().psql(
            db,
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
             ORDER BY 1",
        );
        // Names with newlines come back quoted, so split on the rows psql prints per table.
        let mut out = Vec::new();
        for name in split_quoted_rows(&tables) {
            let n = self
                .cluster()
                .psql(db, &format!("SELECT count(*) FROM ONLY {name}"));
            out.push((name, n.parse().expect("a count")));
        }
        out
    }
}

/// Rows of quoted identifiers, one per line, where a quoted name may itself hold newlines.
fn split_quoted_rows(text: &str) -> Vec<String> {
    let mut rows = Vec::new();
    let mut current = String::new();
    let mut in_quotes = false;
    for c in text.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                current.push(c);
            }
            '\n' if !in_quotes => rows.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    if !current.is_empty() {
        rows.push(current);
    }
    rows
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The drill report's "row counts" check.
fn row_count_check(report: &Value) -> &Value {
    report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == "row counts")
        .unwrap_or_else(|| panic!("no row-count check in {report:#}"))
}

#[test]
fn odd_identifiers_back_up_restore_and_drill_with_exact_counts() {
    let bed = Bed::new();
    bed.cluster().psql(
        DB,
        "CREATE SCHEMA \"a.b\";
         CREATE TABLE \"a.b\".\"x.y\" (id int PRIMARY KEY);
         INSERT INTO \"a.b\".\"x.y\" SELECT generate_series(1, 3);
         CREATE TABLE \"a.b\".\"with space\" (id int);
         INSERT INTO \"a.b\".\"with space\" SELECT generate_series(1, 5);
         CREATE TABLE public.\"quo\"\"te\" (id int);
         INSERT INTO public.\"quo\"\"te\" SELECT generate_series(1, 7);
         CREATE TABLE public.\"new\nline\" (id int);
         INSERT INTO public.\"new\nline\" SELECT generate_series(1, 11);
         CREATE SCHEMA \"Zoë 山田\";
         CREATE TABLE \"Zoë 山田\".\"naïve\" (id int);
         INSERT INTO \"Zoë 山田\".\"naïve\" SELECT generate_series(1, 13);
         CREATE TABLE public.plain (id int);
         INSERT INTO public.plain SELECT generate_series(1, 17);",
    );
    let source = bed.counts(DB);
    assert_eq!(source.len(), 6, "{source:?}");

    bed.backup();
    let out = bed.restore_into("restored");
    out.assert_success();
    assert_eq!(bed.counts("restored"), source, "restored counts differ");

    let report = bed.drill_passes();
    let check = row_count_check(&report);
    assert_eq!(check["passed"], true, "{report:#}");
    assert!(
        check["detail"]
            .as_str()
            .unwrap_or("")
            .contains("6 tables, every count equal"),
        "the row-count check did not compare all six tables: {report:#}"
    );
}

#[test]
fn role_timeouts_do_not_break_the_held_snapshot() {
    let bed = Bed::new();
    dr_tests::seed(bed.cluster(), DB);
    // Settings a DBA may put on the backup role: they must not end dr's sessions.
    bed.cluster().psql(
        "postgres",
        "ALTER ROLE postgres SET lock_timeout = '1ms';
         ALTER ROLE postgres SET idle_in_transaction_session_timeout = '20ms';",
    );
    bed.backup();
    let report = bed.drill_passes();
    let check = row_count_check(&report);
    assert!(
        check["passed"] == true
            && check["detail"]
                .as_str()
                .unwrap_or("")
                .contains("every count equal"),
        "row counts were not taken in the dump's snapshot: {report:#}"
    );
}

#[test]
fn five_thousand_tables_drill() {
    let bed = Bed::new();
    bed.cluster().psql(
        DB,
        "DO $$ BEGIN
           FOR i IN 1..5000 LOOP
             EXECUTE format('CREATE TABLE t%s (id int)', i);
           END LOOP;
         END $$;
         INSERT INTO t1 SELECT generate_series(1, 10);
         INSERT INTO t5000 SELECT generate_series(1, 20);",
    );
    bed.backup();
    let report = bed.drill_passes();
    let check = row_count_check(&report);
    assert!(
        check["detail"]
            .as_str()
            .unwrap_or("")
            .contains("5000 tables, every count equal"),
        "{report:#}"
    );
}

/// Each case leaves the target without any table but with one user object.
#[test]
fn target_with_any_user_object_is_not_empty() {
    let bed = Bed::new();
    bed.cluster()
        .psql(DB, "CREATE TABLE t (id int); INSERT INTO t VALUES (1);");
    bed.backup();
    let cases = [
        ("only_type", "CREATE TYPE mood AS ENUM ('ok', 'sad')"),
        (
            "only_function",
            "CREATE FUNCTION answer() RETURNS int LANGUAGE sql AS 'select 42'",
        ),
        ("only_large_object", "SELECT lo_from_bytea(0, 'keep me')"),
        ("only_schema", "CREATE SCHEMA keep"),
        ("only_extension", "CREATE EXTENSION pg_trgm"),
    ];
    for (db, sql) in cases {
        bed.cluster().create_db(db);
        bed.cluster().psql(db, sql);
        let out = bed.restore_into(db);
        eprintln!("[{db}] {}", out.stderr);
        out.assert_failure_mentions(&["already holds", db, "--force"]);
        assert_eq!(
            bed.cluster().psql(
                db,
                "SELECT count(*) FROM pg_class WHERE relname = 't' AND relkind = 'r'"
            ),
            "0",
            "a refused restore wrote into {db}"
        );
    }
    // An empty database (from template0-like template1) is accepted.
    bed.cluster().create_db("empty");
    bed.restore_into("empty").assert_success();
}

/// The snapshot and count sessions identify themselves and end with the backup.
#[test]
fn no_session_outlives_the_backup() {
    let bed = Bed::new();
    dr_tests::seed(bed.cluster(), DB);
    bed.backup();
    let left = bed.cluster().psql(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'dr%'",
    );
    assert_eq!(left, "0", "dr sessions still open after the backup");
}

#[test]
fn client_certificates_come_from_sslcert_and_sslkey() {
    let bed = Bed::new();
    bed.cluster()
        .psql(DB, "CREATE TABLE t (id int); INSERT INTO t VALUES (1);");
    let certs = bed.base.dir().join("certs");
    fs::create_dir(&certs).expect("certs dir");
    make_certs(&certs);
    // The client's certificate: CN = the database user, signed by the same CA (an X.509 v3
    // certificate: webpki refuses v1).
    fs::write(certs.join("client.cnf"), "extendedKeyUsage = clientAuth\n").expect("write ext");
    openssl(
        &certs,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=postgres",
            "-keyout",
            "client.key",
            "-out",
            "client.csr",
        ],
    );
    openssl(
        &certs,
        &[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "client.cnf",
            "-out",
            "client.crt",
        ],
    );
    fs::set_permissions(certs.join("client.key"), fs::Permissions::from_mode(0o600))
        .expect("chmod client key");
    bed.cluster()
        .require_tls(&certs.join("server.crt"), &certs.join("server.key"));
    bed.cluster().require_client_certs(&certs.join("ca.crt"));

    let file = |name: &str| certs.join(name).display().to_string();
    let run = |name: &str, query: String| {
        let url = format!("{}?{query}", bed.cluster().url(DB));
        let body = encryption_toml(&[&bed.base.keys.recipient], Some(&bed.base.keys.identity))
            + &database_toml(DB, &url, None)
            + "  [databases.drill]\n  target = \"ephemeral\"\n\n";
        let dir = bed.base.dir().join(name);
        fs::create_dir_all(&dir).expect("config dir");
        let config = write_config(&dir, &bed.base.storage, &body);
        // No password anywhere: only the certificate can authenticate.
        bed.base
            .dr(&config)
            .env("HOME", &dir)
            .args(["backup", "--database", DB])
            .run()
    };
    let verify = format!("sslmode=verify-ca&sslrootcert={}", file("ca.crt"));
    // pg_dump (libpq) and dr's own sessions (row counts, for the drill) both present it.
    run(
        "with-cert",
        format!(
            "{verify}&sslcert={}&sslkey={}",
            file("client.crt"),
            file("client.key")
        ),
    )
    .assert_success();
    run("without-cert", verify).assert_failure_mentions(&["certificate"]);
}

/// `openssl` in `dir`: returns its stdout, panicking with its stderr on failure.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a server certificate it signed for `db.invalid` only (not 127.0.0.1), so
/// `verify-ca` passes and `verify-full` fails on the name; a second, unrelated CA.
fn make_certs(dir: &std::path::Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=dr test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=other CA",
            "-keyout",
            "other.key",
            "-out",
            "other.crt",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=db.invalid",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    fs::write(dir.join("ext.cnf"), "subjectAltName = DNS:db.invalid\n").expect("write ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.crt",
        ],
    );
}

#[test]
fn sslmode_means_what_libpq_means() {
    let bed = Bed::new();
    bed.cluster().psql(
        DB,
        "CREATE TABLE t (id int); INSERT INTO t VALUES (1), (2);",
    );
    let certs = bed.base.dir().join("certs");
    fs::create_dir(&certs).expect("certs dir");
    make_certs(&certs);
    bed.cluster()
        .require_tls(&certs.join("server.crt"), &certs.join("server.key"));

    let run = |query: &str| {
        let url = format!("{}?{query}", bed.cluster().url(DB));
        let body = encryption_toml(&[&bed.base.keys.recipient], Some(&bed.base.keys.identity))
            + &database_toml(DB, &url, None)
            + "  [databases.drill]\n  target = \"ephemeral\"\n\n";
        let dir = bed.base.dir().join(format!("tls-{}", query.len()));
        fs::create_dir_all(&dir).expect("config dir");
        let config = write_config(&dir, &bed.base.storage, &body);
        bed.base
            .dr(&config)
            .env("PGPASSWORD", bed.cluster().password())
            .env("HOME", &dir)
            .args(["backup", "--database", DB])
            .run()
    };
    let ca = certs.join("ca.crt").display().to_string();
    let other = certs.join("other.crt").display().to_string();

    // Encrypted, no certificate check: passes (the server refuses plaintext).
    run("sslmode=require").assert_success();
    run(&format!("sslmode=verify-ca&sslrootcert={ca}")).assert_success();
    // The chain is fine but the name is not.
    run(&format!("sslmode=verify-full&sslrootcert={ca}")).assert_failure_mentions(&["certificate"]);
    // An unrelated CA: the chain fails.
    run(&format!("sslmode=verify-ca&sslrootcert={other}"))
        .assert_failure_mentions(&["certificate"]);
    // verify-full without any root certificate says what to set.
    run("sslmode=verify-full").assert_failure_mentions(&["sslrootcert"]);
    // No TLS: the server's refusal is reported.
    run("sslmode=disable").assert_failure_mentions(&["no encryption"]);
}
