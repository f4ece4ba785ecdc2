//! Secrets in the configuration never reach a terminal or a log, and secret files that would
//! make every backup fail are caught by `dr config check`.
//!
//! A database URL whose password holds a character URLs reserve (`#`, `/`) does not parse,
//! or parses into the wrong parts; every path that reports it (`dr config check`,
//! `dr backup`, `dr restore --target`, the agent's log after SIGHUP) must still hide the
//! password. None of these tests needs a running PostgreSQL.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dr_tests::{
    database_toml, encryption_toml, free_port, keygen, write_config, write_secret_file, Agent, Dr,
    DrOutput, Keypair, Storage,
};
use tempfile::TempDir;

/// URLs whose password a URL parser misreads, and the fragments of that password.
const BAD_URLS: [(&str, &[&str]); 2] = [
    // `#` starts a fragment and `/` a path: the URL does not parse at all.
    (
        "postgres://app:s3cr#t/pw@127.0.0.1:1/app",
        &["s3cr", "t/pw"],
    ),
    // Parses, as host `app`, port 7777 and database `zebra@127.0.0.1:1/app`.
    ("postgres://app:7777/zebra@127.0.0.1:1/app", &["zebra"]),
];

struct Setup {
    dir: TempDir,
    keys: Keypair,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::Builder::new()
            .prefix("dr-secrets-")
            .tempdir()
            .expect("temp dir");
        let keys = keygen(dir.path());
        Setup { dir, keys }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A config for database `app` at `url`, with `extra` appended; a `file://` repository.
    fn config(&self, url: &str, password_file: Option<&Path>, extra: &str) -> PathBuf {
        let body = encryption_toml(&[&self.keys.recipient], Some(&self.keys.identity))
            + extra
            + &database_toml("app", url, password_file);
        write_config(self.dir(), &Storage::File(self.dir().join("repo")), &body)
    }
}

fn assert_hidden(out: &str, fragments: &[&str], what: &str) {
    for f in fragments {
        assert!(
            !out.contains(f),
            "{what} printed `{f}`, part of the password:\n{out}"
        );
    }
}

fn assert_fails_hidden(out: &DrOutput, fragments: &[&str], what: &str) {
    assert!(
        !out.status.success(),
        "{what} accepted a URL whose password it misreads:\n{}",
        out.both()
    );
    assert_hidden(&out.both(), fragments, what);
}

#[test]
fn unparseable_database_urls_are_redacted_by_config_check_backup_and_restore() {
    let setup = Setup::new();
    for (url, fragments) in BAD_URLS {
        let config = setup.config(url, None, "");
        let check = Dr::new(&config).args(["config", "check"]).run();
        assert_fails_hidden(&check, fragments, "dr config check");
        assert!(
            check.stderr.contains("***") || check.stderr.contains("percent-encode"),
            "dr config check does not say what is wrong:\n{}",
            check.stderr
        );

        let backup = Dr::new(&config).args(["backup", "--database", "app"]).run();
        assert_fails_hidden(&backup, fragments, "dr backup");

        // The same URL given to restore, with a config that is fine.
        let good = setup.config("postgres://app@127.0.0.1:1/app", None, "");
        let restore = Dr::new(&good)
            .args(["restore", "--database", "app", "--create", "--target", url])
            .run();
        assert_fails_hidden(&restore, fragments, "dr restore --target");
    }
}

#[test]
fn agent_log_after_sighup_hides_an_unparseable_url() {
    let setup = Setup::new();
    let port = free_port();
    let listen = format!("[agent]\nlisten = \"127.0.0.1:{port}\"\n\n");
    let config = setup.config("postgres://app@127.0.0.1:1/app", None, &listen);
    let agent = Agent::start(Dr::new(&config), port);
    for (url, fragments) in BAD_URLS {
        let before = agent.log_count("keeping the running one");
        setup.config(url, None, &listen);
        agent.signal(libc::SIGHUP);
        assert!(
            dr_tests::wait_until(Duration::from_secs(20), || {
                agent.log_count("keeping the running one") > before
            }),
            "the agent did not reject the new config:\n{}",
            agent.log()
        );
        assert_hidden(&agent.log(), fragments, "the agent's log");
    }
}

#[test]
fn config_check_fails_on_world_readable_secret_files() {
    let setup = Setup::new();
    let password_file = setup.dir().join("db-password");
    write_secret_file(&password_file, "hunter2-but-longer");
    let config = setup.config("postgres://app@127.0.0.1:1/app", Some(&password_file), "");
    Dr::new(&config)
        .args(["config", "check"])
        .run()
        .assert_success();

    let chmod = |path: &Path, mode: u32| {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    };
    for (secret, what) in [
        (&password_file, "password"),
        (&setup.keys.identity, "identity"),
    ] {
        chmod(secret, 0o644);
        let out = Dr::new(&config).args(["config", "check"]).run();
        out.assert_failure_mentions(&[what, &format!("chmod 600 {}", secret.display())]);
        assert!(!out.both().contains("hunter2"), "{}", out.both());
        chmod(secret, 0o600);
    }

    // A password file that does not exist is caught too.
    fs::remove_file(&password_file).expect("remove password file");
    let out = Dr::new(&config).args(["config", "check"]).run();
    out.assert_failure_mentions(&["password", &password_file.display().to_string()]);
}
