//! A throwaway PostgreSQL cluster: `initdb` into a temporary directory, started on a free
//! loopback port, stopped and removed on drop (also after a failure or a signal that lets
//! destructors run). As root, the server runs as an unprivileged user, since `initdb`
//! refuses root.

use std::ffi::CString;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::DrillError;

pub struct EphemeralCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    owner: Option<(u32, u32)>,
    pub major: u32,
    running: bool,
}

/// Server binaries: directories with `initdb`, `pg_ctl` and `postgres`, and their major.
fn server_bins() -> Vec<(u32, PathBuf)> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        for e in entries.flatten() {
            let bin = e.path().join("bin");
            let major = e.file_name().to_string_lossy().parse::<u32>().ok();
            if let Some(major) = major {
                if ["initdb", "pg_ctl", "postgres"]
                    .iter()
                    .all(|b| bin.join(b).exists())
                {
                    found.push((major, bin));
                }
            }
        }
    }
    found.sort();
    found
}

fn user_ids(name: &str) -> Option<(u32, u32)> {
    let c = CString::new(name).ok()?;
    // SAFETY: getpwnam returns a pointer into static storage or null; read it at once.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    // SAFETY: non-null pointer from getpwnam.
    unsafe { Some(((*pw).pw_uid, (*pw).pw_gid)) }
}

fn free_port() -> Result<u16, DrillError> {
    let l = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| DrillError::Scratch(format!("no free port: {e}")))?;
    Ok(l.local_addr()
        .map_err(|e| DrillError::Scratch(e.to_string()))?
        .port())
}

impl EphemeralCluster {
    /// Starts a cluster whose major version is at least `min_major`.
    pub fn start(min_major: u32, run_as: &str) -> Result<EphemeralCluster, DrillError> {
        let bins = server_bins();
        let (major, bin) = bins
            .iter()
            .find(|(m, _)| *m >= min_major)
            .cloned()
            .ok_or_else(|| {
                DrillError::Scratch(format!(
                    "an ephemeral drill needs PostgreSQL server binaries of version {min_major} or newer (found: {}); install postgresql-{min_major}",
                    if bins.is_empty() {
                        "none".to_string()
                    } else {
                        bins.iter().map(|(m, _)| m.to_string()).collect::<Vec<_>>().join(", ")
                    }
                ))
            })?;
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let owner = if root {
            Some(user_ids(run_as).ok_or_else(|| {
                DrillError::Scratch(format!(
                    "dr runs as root and the ephemeral cluster must run as an unprivileged user, but user `{run_as}` does not exist; set [databases.drill] run_as"
                ))
            })?)
        } else {
            None
        };
        // /tmp rather than $TMPDIR: the server's user must be able to reach the directory.
        let parent = if root {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix("dr-drill-")
            .tempdir_in(&parent)
            .map_err(|e| {
                DrillError::Scratch(format!("cannot create a temporary directory: {e}"))
            })?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(|e| {
                DrillError::Scratch(format!(
                    "cannot hand {} to `{run_as}`: {e}",
                    dir.path().display()
                ))
            })?;
        }
        let mut cluster = EphemeralCluster {
            dir,
            bin,
            port: free_port()?,
            owner,
            major,
            running: false,
        };
        let data = cluster.data_dir();
        cluster.run(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_wal_size=1GB",
            cluster.port,
            cluster.dir.path().display()
        );
        let log = cluster.dir.path().join("server.log");
        cluster.run(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-l",
                &log.to_string_lossy(),
                "-w",
                "-t",
                "60",
                "-o",
                &opts,
                "start",
            ],
        )?;
        cluster.running = true;
        tracing::info!(port = cluster.port, major, dir = %cluster.dir.path().display(), "ephemeral cluster started");
        Ok(cluster)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), DrillError> {
        let mut cmd = Command::new(self.bin.join(tool));
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_remove("PGDATA")
            .current_dir(self.dir.path());
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd
            .output()
            .map_err(|e| DrillError::Scratch(format!("cannot run {tool}: {e}")))?;
        if !out.status.success() {
            return Err(DrillError::Scratch(format!(
                "{tool} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// A URL for `dbname` on this cluster (trust authentication on loopback).
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the server now; the directory goes when `self` is dropped.
    pub fn stop(&mut self) {
        if self.running {
            let data = self.data_dir();
            let _ = self.run(
                "pg_ctl",
                &[
                    "-D",
                    &data.to_string_lossy(),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
            );
            self.running = false;
        }
    }

    /// Keeps the directory (for `dr demo --keep`); the server is left running.
    pub fn keep(mut self) -> PathBuf {
        self.running = false;
        let dir = std::mem::replace(&mut self.dir, tempfile::TempDir::new().expect("tempdir"));
        dir.keep()
    }
}

impl Drop for EphemeralCluster {
    fn drop(&mut self) {
        self.stop();
    }
}
