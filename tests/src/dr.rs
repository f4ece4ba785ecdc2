//! Running the built `dr` binary.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The `dr` binary under test: `$DR_BIN`, else `<target dir>/debug/dr` where the target dir
/// is `$CARGO_TARGET_DIR` or the workspace's `target/`. Panics if it is not built.
pub fn dr_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("DR_BIN").filter(|b| !b.is_empty()) {
        return PathBuf::from(bin);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|t| !t.is_empty())
        .map(|t| {
            let t = PathBuf::from(t);
            if t.is_absolute() {
                t
            } else {
                workspace.join(t)
            }
        })
        .unwrap_or_else(|| workspace.join("target"));
    let bin = target.join("debug").join("dr");
    assert!(
        bin.is_file(),
        "the dr binary is not built at {} (run `cargo build -p dr-agent` first, or set DR_BIN)",
        bin.display()
    );
    bin
}

/// What a finished `dr` run printed and how it exited.
#[derive(Debug)]
pub struct DrOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl DrOutput {
    /// Panics with both streams unless `dr` exited 0.
    pub fn assert_success(&self) -> &DrOutput {
        assert!(
            self.status.success(),
            "dr failed ({}):\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Panics unless `dr` exited non-zero and stderr contains every one of `needles`
    /// (case-insensitively).
    pub fn assert_failure_mentions(&self, needles: &[&str]) -> &DrOutput {
        assert!(
            !self.status.success(),
            "dr should have failed but exited 0:\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        let stderr = self.stderr.to_lowercase();
        for needle in needles {
            assert!(
                stderr.contains(&needle.to_lowercase()),
                "dr's stderr does not mention {needle:?}:\n{}",
                self.stderr
            );
        }
        self
    }

    /// The non-empty lines of stdout (e.g. the backup ids `dr backup` prints).
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    }

    /// Asserts a `dr backup` succeeded and printed exactly one id, and returns that id.
    pub fn assert_one_backup_id(&self) -> String {
        self.assert_success();
        let ids = self.stdout_lines();
        assert_eq!(
            ids.len(),
            1,
            "dr backup should print one id:\n{}",
            self.stdout
        );
        ids[0].clone()
    }

    /// stdout and stderr together, for messages that may land on either.
    pub fn both(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// A `dr` invocation being built: `Dr::new(config).args([...]).env(k, v).run()`.
///
/// The child gets the test process's environment minus every `PG*`, `AWS*` and `DR_*`
/// variable, so a developer's own database or cloud settings never leak into a test;
/// only what the test sets explicitly reaches `dr`.
pub struct Dr {
    command: Command,
    path_prefix: Vec<PathBuf>,
}

impl Dr {
    /// `dr --config <config> ...`.
    pub fn new(config: &Path) -> Dr {
        let mut dr = Dr::without_config();
        dr.command.arg("--config").arg(config);
        dr
    }

    /// `dr ...` with no config (e.g. `keygen`).
    pub fn without_config() -> Dr {
        let mut command = Command::new(dr_binary());
        for (key, _) in std::env::vars_os() {
            let name = key.to_string_lossy();
            if name.starts_with("PG") || name.starts_with("AWS") || name.starts_with("DR_") {
                command.env_remove(&key);
            }
        }
        command.stdin(Stdio::null());
        Dr {
            command,
            path_prefix: Vec::new(),
        }
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> Dr
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.command.args(args);
        self
    }

    /// Adds one argument (e.g. a path).
    pub fn arg(mut self, arg: impl AsRef<std::ffi::OsStr>) -> Dr {
        self.command.arg(arg);
        self
    }

    /// Sets an environment variable for the child.
    pub fn env(
        mut self,
        key: impl AsRef<std::ffi::OsStr>,
        value: impl AsRef<std::ffi::OsStr>,
    ) -> Dr {
        self.command.env(key, value);
        self
    }

    /// Sets several environment variables (e.g. [`crate::Garage::env`]).
    pub fn envs<K, V>(mut self, vars: impl IntoIterator<Item = (K, V)>) -> Dr
    where
        K: AsRef<std::ffi::OsStr>,
        V: AsRef<std::ffi::OsStr>,
    {
        self.command.envs(vars);
        self
    }

    /// Puts `dir` first on the child's PATH, so wrapper scripts there shadow real tools
    /// such as `pg_dump`.
    pub fn path_first(mut self, dir: &Path) -> Dr {
        self.path_prefix.push(dir.to_path_buf());
        self
    }

    /// Runs `dr` to completion and captures its output.
    pub fn run(self) -> DrOutput {
        let out = self
            .into_command()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("run dr");
        DrOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs `dr list --json` (for one database, if given), asserts it succeeded and returns
    /// the parsed backups.
    pub fn list_json(self, database: Option<&str>) -> Vec<serde_json::Value> {
        let mut dr = self.args(["list", "--json"]);
        if let Some(database) = database {
            dr = dr.args(["--database", database]);
        }
        let out = dr.run();
        out.assert_success();
        match serde_json::from_str(&out.stdout) {
            Ok(serde_json::Value::Array(items)) => items,
            other => panic!(
                "dr list --json did not print a JSON array ({other:?}):\n{}",
                out.stdout
            ),
        }
    }

    /// Starts `dr` with piped stdout/stderr and returns the child (for kill tests).
    pub fn spawn(self) -> Child {
        self.into_command()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dr")
    }

    /// The `Command` this builds, for tests that run it themselves.
    pub fn into_command(mut self) -> Command {
        if !self.path_prefix.is_empty() {
            let inherited = std::env::var_os("PATH").unwrap_or_default();
            let dirs = self
                .path_prefix
                .iter()
                .cloned()
                .chain(std::env::split_paths(&inherited));
            let path: OsString = std::env::join_paths(dirs).expect("PATH entries are valid");
            self.command.env("PATH", path);
        }
        self.command
    }
}

/// Waits for `child` (a spawned `dr`) up to `timeout`, killing it (and failing) if it runs longer.
pub fn wait_with_timeout(mut child: Child, timeout: Duration) -> DrOutput {
    let started = Instant::now();
    while child.try_wait().expect("poll dr").is_none() {
        if started.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().expect("reap dr");
            panic!(
                "dr did not finish within {timeout:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("collect dr output");
    DrOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
