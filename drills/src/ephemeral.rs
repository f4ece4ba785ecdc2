//! A throwaway PostgreSQL cluster for drills and `dr demo`: `initdb` into a private
//! temporary directory, started, then stopped and removed on drop (also after a failure or
//! a signal that lets destructors run).
//!
//! # Only dr can reach it
//! The cluster holds restored production rows and has a superuser, so:
//! - No TCP at all: `listen_addresses = ''` (and `--auth-host=reject`, should that ever
//!   change). The only way in is the Unix socket in the cluster's directory.
//! - That directory is created with mode 0700 and owned by the cluster's OS user: dr's own
//!   user, or `run_as` when dr runs as root (initdb refuses root). dr checks both before
//!   `initdb`. Connecting to a Unix socket needs search permission on its directory, so only
//!   that user and root can reach the socket.
//! - Local connections are therefore `trust`, with no password: whoever can enter the
//!   directory is either the cluster's OS user, who owns the data files and could start the
//!   server itself, or root. A password would keep neither out and would be one more secret
//!   to hold; peer authentication would refuse dr itself when it runs as root.
//! - `initdb`, `pg_ctl` and so the server start with a cleared environment plus an allowlist
//!   ([`ALLOWED_ENV`], and the user's `HOME`, `USER`, `LOGNAME`): `COPY ... FROM PROGRAM
//!   'env'` inside the cluster shows none of dr's secrets (`AWS_*`, `PG*`, `DR_*`).
//!
//! # Settings
//! `jit = off`: the hardened systemd unit's `MemoryDenyWriteExecute=yes` forbids JIT code
//! pages. Durability is PostgreSQL's default, so a drill's restore costs what it would in an
//! incident. [`Durability::Off`] (a drill's `durability = "off"`) turns `fsync`,
//! `full_page_writes` and `synchronous_commit` off for speed; such a drill reports its RTO
//! as not representative.
//!
//! # Which binaries
//! `initdb`, `pg_ctl` and `postgres` from the directories [`dr_core::pgbin::search_dirs`]
//! gives (`DR_PG_BINDIR`, else `PATH` then `/usr/lib/postgresql/*/bin`), the same search as
//! for the client tools; the oldest major at least as new as the backup's server wins.

use std::ffi::OsString;
use std::fs::Permissions;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub use dr_core::config::DrillDurability as Durability;

use crate::DrillError;

/// Environment variables the cluster's processes may inherit from dr (plus `LC_*`).
pub const ALLOWED_ENV: &[&str] = &["PATH", "LANG", "LANGUAGE", "TZ", "TZDIR"];

/// The port in the socket's name (`.s.PGSQL.5432`); the directory is private, so every
/// cluster can use the same one.
const PORT: u16 = 5432;

/// Longest socket path a `sockaddr_un` holds (108 bytes with the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

pub struct EphemeralCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    owner: Option<ClusterUser>,
    pub major: u32,
    pub durability: Durability,
    running: bool,
}

/// The unprivileged OS user the cluster runs as when dr runs as root.
#[derive(Debug, Clone)]
struct ClusterUser {
    name: String,
    uid: u32,
    gid: u32,
    home: PathBuf,
}

/// One directory with `initdb`, `pg_ctl` and `postgres`, and their version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerBin {
    pub dir: PathBuf,
    pub major: u32,
    pub version: String,
}

/// Every directory in `dirs` holding real (not wrapper) `initdb`, `pg_ctl` and `postgres`,
/// oldest major first; the first directory wins among equal majors.
pub fn server_bins(dirs: &[PathBuf]) -> Vec<ServerBin> {
    let mut found: Vec<ServerBin> = Vec::new();
    for dir in dirs {
        let real = ["initdb", "pg_ctl", "postgres"].iter().all(|b| {
            std::fs::canonicalize(dir.join(b))
                .is_ok_and(|p| p.is_file() && p.file_name().is_some_and(|n| n == *b))
        });
        if !real || found.iter().any(|f| f.dir == *dir) {
            continue;
        }
        if let Some((major, version)) = dr_core::pg::tool_version(&dir.join("postgres")) {
            found.push(ServerBin {
                dir: dir.clone(),
                major,
                version,
            });
        }
    }
    found.sort_by_key(|b| b.major);
    found
}

/// The oldest server at least as new as `min_major`: it restores the backup, and is the
/// closest match to the server the backup came from.
pub fn pick_server(found: &[ServerBin], min_major: u32) -> Option<&ServerBin> {
    found.iter().find(|b| b.major >= min_major)
}

fn cluster_user(run_as: &str) -> Result<ClusterUser, DrillError> {
    let missing = || {
        DrillError::Scratch(format!(
            "dr runs as root and the ephemeral cluster must run as an unprivileged user, but user `{run_as}` does not exist; set [databases.drill] run_as"
        ))
    };
    let user = nix::unistd::User::from_name(run_as)
        .map_err(|e| DrillError::Scratch(format!("cannot look up user `{run_as}`: {e}")))?
        .ok_or_else(missing)?;
    if user.uid.is_root() {
        return Err(DrillError::Scratch(format!(
            "[databases.drill] run_as = `{run_as}` is root; the ephemeral cluster must run as an unprivileged user"
        )));
    }
    Ok(ClusterUser {
        name: user.name,
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        home: user.dir,
    })
}

/// The environment the cluster's processes start with: the allowlist only.
fn allowed_env(owner: Option<&ClusterUser>) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| {
            let k = k.to_string_lossy();
            ALLOWED_ENV.contains(&k.as_ref()) || k.starts_with("LC_")
        })
        .collect();
    match owner {
        Some(u) => {
            env.push(("HOME".into(), u.home.clone().into()));
            env.push(("USER".into(), u.name.clone().into()));
            env.push(("LOGNAME".into(), u.name.clone().into()));
        }
        None => {
            for k in ["HOME", "USER", "LOGNAME"] {
                if let Some(v) = std::env::var_os(k) {
                    env.push((k.into(), v));
                }
            }
        }
    }
    env
}

/// A PostgreSQL configuration string literal.
fn conf_literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

impl EphemeralCluster {
    /// Starts a cluster whose major version is at least `min_major`, with default
    /// durability.
    pub fn start(min_major: u32, run_as: &str) -> Result<EphemeralCluster, DrillError> {
        Self::start_with(min_major, run_as, Durability::Full)
    }

    /// Starts a cluster whose major version is at least `min_major`.
    pub fn start_with(
        min_major: u32,
        run_as: &str,
        durability: Durability,
    ) -> Result<EphemeralCluster, DrillError> {
        let bins = server_bins(&dr_core::pgbin::search_dirs());
        let server = pick_server(&bins, min_major).cloned().ok_or_else(|| {
            DrillError::Scratch(format!(
                "an ephemeral drill needs PostgreSQL server binaries (initdb, pg_ctl, postgres) of version {min_major} or newer; found {} in {}; install postgresql-{min_major}",
                if bins.is_empty() {
                    "none".to_string()
                } else {
                    bins.iter().map(|b| format!("{} ({})", b.version, b.dir.display())).collect::<Vec<_>>().join(", ")
                },
                dr_core::pgbin::searched()
            ))
        })?;
        let root = rustix::process::geteuid().is_root();
        let owner = if root {
            Some(cluster_user(run_as)?)
        } else {
            None
        };
        // As root, /tmp rather than $TMPDIR: the cluster's user must reach the directory.
        // A socket path has a small size limit, so a long $TMPDIR falls back to /tmp too.
        let tmp = std::env::temp_dir();
        let parent = if root || tmp.as_os_str().len() > MAX_SOCKET_PATH - 40 {
            PathBuf::from("/tmp")
        } else {
            tmp
        };
        let dir = tempfile::Builder::new()
            .prefix("dr-drill-")
            .permissions(Permissions::from_mode(0o700))
            .tempdir_in(&parent)
            .map_err(|e| {
                DrillError::Scratch(format!(
                    "cannot create a temporary directory in {}: {e}",
                    parent.display()
                ))
            })?;
        if let Some(u) = &owner {
            std::os::unix::fs::chown(dir.path(), Some(u.uid), Some(u.gid)).map_err(|e| {
                DrillError::Scratch(format!(
                    "cannot hand {} to `{}`: {e}",
                    dir.path().display(),
                    u.name
                ))
            })?;
        }
        let expected_uid = owner
            .as_ref()
            .map_or_else(|| rustix::process::geteuid().as_raw(), |u| u.uid);
        check_private(dir.path(), expected_uid)?;
        let socket = dir.path().join(format!(".s.PGSQL.{PORT}"));
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(DrillError::Scratch(format!(
                "the ephemeral cluster's socket path {} is longer than {MAX_SOCKET_PATH} bytes",
                socket.display()
            )));
        }
        let mut cluster = EphemeralCluster {
            dir,
            bin: server.dir,
            owner,
            major: server.major,
            durability,
            running: false,
        };
        let data = cluster.data_dir();
        cluster.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--auth-local=trust".as_ref(),
                "--auth-host=reject".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        cluster.configure()?;
        let log = cluster.dir.path().join("server.log");
        cluster.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "start".as_ref(),
            ],
        )?;
        cluster.running = true;
        tracing::info!(major = cluster.major, version = %server.version, durability = ?durability, dir = %cluster.dir.path().display(), "ephemeral cluster started (Unix socket only)");
        Ok(cluster)
    }

    /// Appends dr's settings to the cluster's `postgresql.conf` (a file rather than `-o`,
    /// which pg_ctl hands to a shell).
    fn configure(&self) -> Result<(), DrillError> {
        let socket_dir = self.dir.path().to_str().ok_or_else(|| {
            DrillError::Scratch(format!(
                "the temporary directory {} is not UTF-8",
                self.dir.path().display()
            ))
        })?;
        let mut settings = format!(
            "\n# dr: reachable only through the socket in this private directory\n\
             listen_addresses = ''\n\
             unix_socket_directories = {}\n\
             unix_socket_permissions = 0700\n\
             port = {PORT}\n\
             jit = off\n",
            conf_literal(socket_dir)
        );
        if self.durability == Durability::Off {
            settings.push_str(
                "# dr: durability = \"off\": faster drills, RTO not representative\n\
                 fsync = off\n\
                 full_page_writes = off\n\
                 synchronous_commit = off\n",
            );
        }
        let path = self.data_dir().join("postgresql.conf");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(settings.as_bytes()))
            .map_err(|e| DrillError::Scratch(format!("cannot write {}: {e}", path.display())))
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, tool: &str, args: &[&std::ffi::OsStr]) -> Result<(), DrillError> {
        let mut cmd = Command::new(self.bin.join(tool));
        cmd.args(args)
            .env_clear()
            .envs(allowed_env(self.owner.as_ref()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .current_dir(self.dir.path());
        if let Some(u) = &self.owner {
            // std also drops root's supplementary groups (setgroups(0)) when it switches uid.
            cmd.uid(u.uid).gid(u.gid);
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

    /// A URL for `dbname` on this cluster: the socket directory as `host`, e.g.
    /// `postgres:///app?host=/tmp/dr-drill-x1y2&port=5432&user=postgres`.
    pub fn url(&self, dbname: &str) -> String {
        socket_url(self.dir.path(), PORT, dbname)
    }

    pub fn port(&self) -> u16 {
        PORT
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
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-m".as_ref(),
                    "immediate".as_ref(),
                    "-w".as_ref(),
                    "stop".as_ref(),
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

/// Refuses a directory others could enter, or one owned by someone else.
fn check_private(dir: &Path, uid: u32) -> Result<(), DrillError> {
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| DrillError::Scratch(format!("cannot stat {}: {e}", dir.display())))?;
    let mode = meta.mode() & 0o7777;
    if !meta.is_dir() || meta.uid() != uid || mode & 0o077 != 0 {
        return Err(DrillError::Scratch(format!(
            "{} is not private to the cluster's user (uid {}, mode {mode:o}; expected uid {uid}, mode 700); refusing to start a cluster others could reach",
            dir.display(),
            meta.uid()
        )));
    }
    Ok(())
}

/// `postgres:///<dbname>?host=<dir>&port=<port>&user=postgres`, each part percent-encoded
/// except `/` (libpq and tokio-postgres decode `%XX`, but not `+` as a space).
pub fn socket_url(dir: &Path, port: u16, dbname: &str) -> String {
    let enc = |s: &str| {
        url::form_urlencoded::byte_serialize(s.as_bytes())
            .collect::<String>()
            .replace('+', "%20")
            .replace("%2F", "/")
    };
    format!(
        "postgres:///{}?host={}&port={port}&user=postgres",
        enc(dbname),
        enc(&dir.to_string_lossy())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake installation: `initdb`, `pg_ctl` and a `postgres` that prints `version`.
    fn fake_install(root: &Path, name: &str, version: &str) -> PathBuf {
        let bin = root.join(name);
        std::fs::create_dir_all(&bin).unwrap();
        for tool in ["initdb", "pg_ctl", "postgres"] {
            let path = bin.join(tool);
            std::fs::write(
                &path,
                format!("#!/bin/sh\necho '{tool} (PostgreSQL) {version}'\n"),
            )
            .unwrap();
            std::fs::set_permissions(&path, Permissions::from_mode(0o755)).unwrap();
        }
        bin
    }

    #[test]
    fn server_discovery_reads_versions_and_picks_the_oldest_new_enough() {
        let root = tempfile::tempdir().unwrap();
        let pg17 = fake_install(root.path(), "pg17", "17.2");
        let pg15 = fake_install(root.path(), "pg15", "15.8 (Debian 15.8-1)");
        let pg16 = fake_install(root.path(), "pg16", "16.4");
        // No pg_ctl: not a server installation.
        let partial = fake_install(root.path(), "partial", "18.0");
        std::fs::remove_file(partial.join("pg_ctl")).unwrap();
        // A wrapper: `postgres` is a link to something else.
        let wrapper = root.path().join("wrapper");
        std::fs::create_dir_all(&wrapper).unwrap();
        for tool in ["initdb", "pg_ctl"] {
            std::os::unix::fs::symlink(pg17.join(tool), wrapper.join(tool)).unwrap();
        }
        std::os::unix::fs::symlink(pg17.join("initdb"), wrapper.join("postgres")).unwrap();

        let found = server_bins(&[
            pg17.clone(),
            partial,
            wrapper,
            root.path().join("missing"),
            pg15.clone(),
            pg16.clone(),
            pg16.clone(),
        ]);
        let majors: Vec<(u32, &str)> = found
            .iter()
            .map(|b| (b.major, b.version.as_str()))
            .collect();
        assert_eq!(majors, vec![(15, "15.8"), (16, "16.4"), (17, "17.2")]);
        assert_eq!(pick_server(&found, 15).unwrap().dir, pg15);
        assert_eq!(pick_server(&found, 16).unwrap().dir, pg16);
        assert_eq!(pick_server(&found, 14).unwrap().dir, pg15);
        assert!(pick_server(&found, 18).is_none());
    }

    #[test]
    fn socket_urls_parse_and_keep_the_socket_for_other_databases() {
        let url = socket_url(Path::new("/tmp/dr-drill-a b"), 5432, "app");
        assert_eq!(
            url,
            "postgres:///app?host=/tmp/dr-drill-a%20b&port=5432&user=postgres"
        );
        let parsed = dr_core::pg::ConnUrl::try_from(url).unwrap();
        assert_eq!(parsed.dbname(), "app");
        let other = parsed.with_dbname("postgres");
        assert_eq!(
            other.for_argv(),
            "postgres:///postgres?host=/tmp/dr-drill-a%20b&port=5432&user=postgres"
        );
    }

    #[test]
    fn the_cluster_environment_is_the_allowlist_only() {
        let owner = ClusterUser {
            name: "postgres".into(),
            uid: 1,
            gid: 1,
            home: "/var/lib/postgresql".into(),
        };
        let env = allowed_env(Some(&owner));
        for (k, _) in &env {
            let k = k.to_string_lossy();
            assert!(
                ALLOWED_ENV.contains(&k.as_ref())
                    || k.starts_with("LC_")
                    || ["HOME", "USER", "LOGNAME"].contains(&k.as_ref()),
                "{k} is not on the allowlist"
            );
        }
        assert!(env.contains(&("HOME".into(), "/var/lib/postgresql".into())));
    }

    #[test]
    fn private_directories_are_checked() {
        let dir = tempfile::Builder::new()
            .permissions(Permissions::from_mode(0o700))
            .tempdir()
            .unwrap();
        let me = rustix::process::geteuid().as_raw();
        check_private(dir.path(), me).unwrap();
        assert!(check_private(dir.path(), me + 1).is_err());
        std::fs::set_permissions(dir.path(), Permissions::from_mode(0o750)).unwrap();
        let err = check_private(dir.path(), me).unwrap_err().to_string();
        assert!(err.contains("not private"), "{err}");
    }
}
