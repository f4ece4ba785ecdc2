//! A real single-node Garage S3 server.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::s3::S3;
use crate::util::{free_port, port_open, random_hex, test_cache_dir, wait_until};

/// The Garage binary: `$DR_GARAGE_BIN`, else `$DR_TEST_CACHE/garage/bin/garage`, else
/// `garage` on PATH. Panics with instructions when none exists.
pub fn garage_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("DR_GARAGE_BIN").filter(|b| !b.is_empty()) {
        let bin = PathBuf::from(bin);
        assert!(
            bin.exists(),
            "DR_GARAGE_BIN={} does not exist",
            bin.display()
        );
        return bin;
    }
    let cached = test_cache_dir().join("garage/bin/garage");
    if cached.exists() {
        return cached;
    }
    if let Some(on_path) = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("garage"))
            .find(|candidate| candidate.is_file())
    }) {
        return on_path;
    }
    panic!(
        "the Garage S3 server is not installed (looked at $DR_GARAGE_BIN, {}, and PATH); \
         run scripts/test.sh, which installs it",
        cached.display()
    );
}

/// A running single-node Garage with one bucket ([`Garage::BUCKET`]) and one access key
/// allowed to read, write and own it.
///
/// Dropping it kills the server and removes its directory.
pub struct Garage {
    dir: TempDir,
    bin: PathBuf,
    config: PathBuf,
    s3_port: u16,
    access_key: String,
    secret_key: String,
    server: Option<Child>,
}

impl Garage {
    /// The bucket created for tests.
    pub const BUCKET: &'static str = "dr-test";
    /// The S3 region Garage is configured with (S3 clients must sign with it).
    pub const REGION: &'static str = "garage";

    /// Starts a fresh server, lays out its single node, and creates the bucket and key.
    /// Retries with new ports if one was taken between picking and binding it.
    pub fn start() -> Garage {
        let bin = garage_binary();
        let mut last_failure = String::new();
        for _attempt in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("dr-garage-")
                .tempdir()
                .expect("create garage temp dir");
            let s3_port = free_port();
            let config = write_garage_config(dir.path(), s3_port);
            let mut garage = Garage {
                dir,
                bin: bin.clone(),
                config,
                s3_port,
                access_key: String::new(),
                secret_key: String::new(),
                server: None,
            };
            match garage.bootstrap() {
                Ok(()) => return garage,
                Err(failure) => last_failure = failure,
            }
        }
        panic!("Garage did not start:\n{last_failure}");
    }

    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// The access key id allowed on [`Garage::BUCKET`].
    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    /// The secret for [`Garage::access_key`].
    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// The bucket created for tests.
    pub fn bucket(&self) -> &str {
        Self::BUCKET
    }

    /// Environment for a `dr` child to reach this server with the bed's key.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", self.access_key.as_str()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.as_str()),
            ("AWS_REGION", Self::REGION),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// A blocking S3 client for this server.
    pub fn client(&self) -> S3 {
        S3::for_garage(self)
    }

    /// The server's log so far, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default()
    }

    /// Kills the server (SIGKILL), as a crash or a network partition would look to a
    /// client mid-upload. Its data stays; [`Garage::restart`] brings it back.
    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }

    /// Starts the server again on the same data, ports and keys after [`Garage::stop`].
    pub fn restart(&mut self) {
        assert!(self.server.is_none(), "Garage is still running");
        self.spawn_server()
            .and_then(|()| self.wait_for_s3())
            .unwrap_or_else(|failure| panic!("Garage did not restart: {failure}"));
    }

    /// Runs the garage CLI against this server, e.g. `["bucket", "list"]`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .expect("run garage CLI")
    }

    fn bootstrap(&mut self) -> Result<(), String> {
        self.spawn_server()?;
        let node_id = self.node_id()?;
        self.cli_ok(&["layout", "assign", "-z", "dc1", "-c", "1G", &node_id])?;
        self.cli_ok(&["layout", "apply", "--version", "1"])?;
        let key_info = self.cli_ok(&["key", "create", "dr-test-key"])?;
        (self.access_key, self.secret_key) = parse_key(&key_info)?;
        self.cli_ok(&["bucket", "create", Self::BUCKET])?;
        self.cli_ok(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            Self::BUCKET,
            "--key",
            &self.access_key.clone(),
        ])?;
        self.wait_for_s3()
    }

    fn spawn_server(&mut self) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("garage.log"))
            .map_err(|e| format!("open garage.log: {e}"))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let server = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .arg("server")
            .env("RUST_LOG", "garage=info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.bin.display()))?;
        self.server = Some(server);
        let up = wait_until(Duration::from_secs(30), || {
            self.exited().is_none() && port_open(self.s3_port)
        });
        if up {
            Ok(())
        } else {
            let exit = self.exited();
            self.stop();
            Err(format!(
                "server did not listen on {} (exit: {exit:?}); log:\n{}",
                self.s3_port,
                self.log()
            ))
        }
    }

    /// The server's exit status, if it has exited.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.server
            .as_mut()
            .and_then(|s| s.try_wait().ok().flatten())
    }

    /// The node's full id, from `garage node id -q` (`<hex id>@<addr>`).
    fn node_id(&self) -> Result<String, String> {
        let mut last = String::new();
        let found = wait_until(Duration::from_secs(30), || {
            match self.cli_ok(&["node", "id", "-q"]) {
                Ok(out) => {
                    last = out;
                    true
                }
                Err(e) => {
                    last = e;
                    false
                }
            }
        });
        if !found {
            return Err(last);
        }
        last.lines()
            .map(str::trim)
            .find_map(|line| line.split('@').next().filter(|id| is_hex(id)))
            .map(String::from)
            .ok_or_else(|| format!("no node id in `garage node id -q` output: {last:?}"))
    }

    /// Waits until the S3 API serves the test bucket with the test key (Garage answers on
    /// the port before the layout has propagated to its tables).
    fn wait_for_s3(&self) -> Result<(), String> {
        let client = self.client();
        let mut last = String::new();
        let ready = wait_until(Duration::from_secs(30), || {
            match client.try_list(Self::BUCKET, "") {
                Ok(_) => true,
                Err(e) => {
                    last = e;
                    false
                }
            }
        });
        if ready {
            Ok(())
        } else {
            Err(format!("S3 API not ready: {last}\nlog:\n{}", self.log()))
        }
    }

    /// Runs the garage CLI and returns its stdout, or a description of the failure.
    fn cli_ok(&self, args: &[&str]) -> Result<String, String> {
        let out = self.cli(args);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "garage {} failed ({}):\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes a single-node configuration with fresh secrets and free ports.
fn write_garage_config(dir: &Path, s3_port: u16) -> PathBuf {
    let config = format!(
        r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "sqlite"
metadata_fsync = false
data_fsync = false
replication_factor = 1

rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{rpc_secret}"

[s3_api]
s3_region = "{region}"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
admin_token = "{admin_token}"
metrics_token = "{metrics_token}"
"#,
        meta = dir.join("meta").display(),
        data = dir.join("data").display(),
        rpc = free_port(),
        rpc_secret = random_hex(32),
        region = Garage::REGION,
        admin = free_port(),
        admin_token = random_hex(32),
        metrics_token = random_hex(32),
    );
    let path = dir.join("garage.toml");
    fs::write(&path, config).expect("write garage.toml");
    path
}

/// Extracts the key id and secret from `garage key create` output, whose lines look like
/// `Key ID:              GK...` and `Secret key:          ...`.
fn parse_key(output: &str) -> Result<(String, String), String> {
    let field = |label: &str| {
        output.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case(label)
                .then(|| value.trim().to_string())
                .filter(|v| !v.is_empty())
        })
    };
    match (field("Key ID"), field("Secret key")) {
        (Some(id), Some(secret)) => Ok((id, secret)),
        _ => Err(format!(
            "could not find `Key ID:` and `Secret key:` in `garage key create` output:\n{output}"
        )),
    }
}

fn is_hex(s: &str) -> bool {
    s.len() >= 16 && s.chars().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::parse_key;

    #[test]
    fn parses_key_create_output() {
        let out = "==== ACCESS KEY INFORMATION ====\nKey ID:              GK31c2f218a2e44f485b94239e\nKey name:            dr-test-key\nSecret key:          b892c0665f0ada8a4755dae98baa3b133590e11dae3bcc1f9d769d67f16c3835\n";
        let (id, secret) = parse_key(out).unwrap();
        assert_eq!(id, "GK31c2f218a2e44f485b94239e");
        assert_eq!(secret.len(), 64);
    }
}
