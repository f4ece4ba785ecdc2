//! Throwaway PostgreSQL clusters started with `initdb` / `pg_ctl`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use tempfile::TempDir;

use crate::util::{free_port, random_hex, running_as_root, ServiceUser};

/// The directory holding `initdb`, `pg_ctl`, `postgres`, `psql`, `pg_dump`, `pg_restore`:
/// `$DR_PG_BINDIR`, else Debian's PostgreSQL 15.
pub fn pg_bindir() -> PathBuf {
    std::env::var_os("DR_PG_BINDIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

/// A running PostgreSQL cluster in its own temporary directory, listening on 127.0.0.1 on
/// a free port. Local (socket) connections are trusted; TCP connections need the
/// superuser `postgres`'s password, so tests can exercise password handling.
///
/// Dropping the cluster stops the server and removes its directory.
pub struct PgCluster {
    dir: TempDir,
    bindir: PathBuf,
    port: u16,
    password: String,
    /// Who the server runs as when the tests run as root (initdb refuses root).
    user: Option<ServiceUser>,
    running: bool,
    /// Appended to [`SETTINGS`] at initdb.
    extra_settings: &'static str,
}

/// Server settings that keep a test cluster small and fast; durability is irrelevant here.
const SETTINGS: &str = "
listen_addresses = '127.0.0.1'
shared_buffers = 32MB
max_connections = 20
fsync = off
synchronous_commit = off
full_page_writes = off
max_wal_size = 256MB
# pg_dump and dr's row counts lock every table: a 5,000-table database needs room.
max_locks_per_transaction = 512
logging_collector = off
";

impl PgCluster {
    /// Creates and starts a fresh cluster. Panics with the server log on failure.
    pub fn start() -> PgCluster {
        PgCluster::start_with_bindir(pg_bindir())
    }

    /// Like [`PgCluster::start`] with the server binaries of `bindir` (e.g. another major
    /// from [`crate::postgresql_binaries`]).
    pub fn start_with_bindir(bindir: PathBuf) -> PgCluster {
        PgCluster::start_inner(bindir, "")
    }

    /// Like [`PgCluster::start`] with `wal_level = logical` and room for replication slots,
    /// for continuous capture.
    pub fn start_logical() -> PgCluster {
        PgCluster::start_inner(
            pg_bindir(),
            "wal_level = logical\nmax_replication_slots = 8\nmax_wal_senders = 8\n",
        )
    }

    fn start_inner(bindir: PathBuf, extra_settings: &'static str) -> PgCluster {
        assert!(
            bindir.join("initdb").exists(),
            "PostgreSQL binaries not found in {} (install Debian's postgresql-15 or set DR_PG_BINDIR)",
            bindir.display()
        );
        let user = running_as_root().then(ServiceUser::find);
        // As root the server runs as another user, who must be able to reach the
        // directory: $TMPDIR may sit under root's 0700 home, /tmp never does.
        let parent = if user.is_some() {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix("dr-pg-")
            .tempdir_in(parent)
            .expect("create cluster temp dir");
        let bindir = match user {
            Some(_) if !reachable_by_all(&bindir) => copy_install(&bindir, dir.path()),
            _ => bindir,
        };
        let mut cluster = PgCluster {
            dir,
            bindir,
            port: 0,
            password: random_hex(16),
            user,
            running: false,
            extra_settings,
        };
        cluster.init();
        cluster.launch();
        cluster
    }

    /// The TCP port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser `postgres`'s password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// A connection URL without the password: `postgres://postgres@127.0.0.1:PORT/db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A connection URL that carries the password.
    pub fn url_with_password(&self, db: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{db}",
            self.password, self.port
        )
    }

    /// The cluster's temporary directory (data directory, socket, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server log so far, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Runs `sql` in `db` over TCP with psql (`-XAtq`, `ON_ERROR_STOP=1`) and returns its
    /// stdout without the trailing newline. Statements are fed on stdin so each runs in its
    /// own transaction. Panics with psql's stderr on failure.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = self.try_psql(db, sql);
        assert!(
            out.status.success(),
            "psql failed in database {db:?} ({}):\n{}\nSQL:\n{sql}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .trim_end_matches('\n')
            .to_string()
    }

    /// Like [`PgCluster::psql`] but returns psql's raw output instead of panicking.
    pub fn try_psql(&self, db: &str, sql: &str) -> Output {
        let mut child = self
            .client_command("psql")
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"])
            .args(["-d", db])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn psql");
        let mut stdin = child.stdin.take().expect("psql stdin");
        let sql = sql.to_string();
        // Written from a thread: a large script and a large result could otherwise
        // deadlock on full pipes.
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(sql.as_bytes());
        });
        let out = child.wait_with_output().expect("wait for psql");
        writer.join().expect("psql stdin writer");
        out
    }

    /// A command for a client tool from the cluster's bindir, aimed at this server over TCP
    /// with the password in its environment; inherited `PG*` variables are removed.
    pub fn client_command(&self, tool: &str) -> Command {
        self.client_command_for(&self.bindir.join(tool))
    }

    /// Like [`PgCluster::client_command`] for any program (e.g. a shell pipeline).
    pub fn client_command_for(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        cmd.env("PGHOST", "127.0.0.1")
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", "postgres")
            .env("PGPASSWORD", &self.password)
            .env("PGCONNECT_TIMEOUT", "10")
            .env("LC_ALL", "C");
        cmd
    }

    /// Creates database `name`.
    pub fn create_db(&self, name: &str) {
        self.psql(
            "postgres",
            &format!("CREATE DATABASE {}", quote_ident(name)),
        );
    }

    /// Turns TLS on with `cert` and `key` (PEM) and refuses every TCP connection without it.
    pub fn require_tls(&self, cert: &Path, key: &Path) {
        let data = self.data_dir();
        for (from, name) in [(cert, "server.crt"), (key, "server.key")] {
            let to = data.join(name);
            fs::copy(from, &to).expect("copy TLS file");
            fs::set_permissions(&to, fs::Permissions::from_mode(0o600)).expect("chmod TLS file");
            self.give_to_server_user(&to);
        }
        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .expect("open postgresql.conf");
        writeln!(
            conf,
            "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'"
        )
        .expect("write postgresql.conf");
        fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n\
             hostnossl all all 0.0.0.0/0 reject\n",
        )
        .expect("write pg_hba.conf");
        self.psql("postgres", "SELECT pg_reload_conf()");
        let out = self.try_psql("postgres", "SHOW ssl");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "on",
            "TLS did not turn on:\n{}",
            self.log()
        );
    }

    /// After [`PgCluster::require_tls`]: TCP clients must also present a certificate signed
    /// by `ca` whose CN is their user name (`cert` authentication, no password).
    pub fn require_client_certs(&self, ca: &Path) {
        let data = self.data_dir();
        let to = data.join("client-ca.crt");
        fs::copy(ca, &to).expect("copy client CA");
        self.give_to_server_user(&to);
        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .expect("open postgresql.conf");
        writeln!(conf, "ssl_ca_file = 'client-ca.crt'").expect("write postgresql.conf");
        fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 cert\n\
             host all all 0.0.0.0/0 reject\n",
        )
        .expect("write pg_hba.conf");
        self.psql("postgres", "SELECT pg_reload_conf()");
    }

    /// Stops the server immediately (no checkpoint). Safe to call twice.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        let out = self
            .server_command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "-t", "30"])
            .output()
            .expect("run pg_ctl stop");
        if !out.status.success() && !std::thread::panicking() {
            panic!(
                "pg_ctl stop failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// Runs initdb and writes the server settings.
    fn init(&mut self) {
        let root = self.dir.path().to_path_buf();
        let pwfile = root.join("pwfile");
        fs::write(&pwfile, format!("{}\n", self.password)).expect("write pwfile");
        fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o600)).expect("chmod pwfile");
        fs::create_dir(root.join("sock")).expect("create socket dir");
        for path in [root.clone(), pwfile.clone(), root.join("sock")] {
            self.give_to_server_user(&path);
        }

        let out = self
            .server_command("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-U", "postgres", "-E", "UTF8", "--locale=C"])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .args(["--no-sync", "--no-instructions"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        fs::remove_file(&pwfile).expect("remove pwfile");

        let conf = self.data_dir().join("postgresql.conf");
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .expect("open postgresql.conf");
        let socket_dir = root.join("sock");
        writeln!(
            file,
            "{SETTINGS}{}unix_socket_directories = '{}'",
            self.extra_settings,
            socket_dir.display()
        )
        .expect("write postgresql.conf");
    }

    /// Starts the server on a free port, retrying with another port when the one picked
    /// was taken in the meantime.
    fn launch(&mut self) {
        for _attempt in 0..5 {
            self.port = free_port();
            let log_before = self.log().len();
            let out = self
                .server_command("pg_ctl")
                .arg("start")
                .arg("-D")
                .arg(self.data_dir())
                .arg("-l")
                .arg(self.log_path())
                .args(["-w", "-t", "60", "-o"])
                .arg(format!("-p {}", self.port))
                .stdin(Stdio::null())
                .output()
                .expect("run pg_ctl start");
            if out.status.success() {
                self.running = true;
                return;
            }
            let log = self.log();
            let attempt_log = log.get(log_before..).unwrap_or(&log);
            if attempt_log.contains("could not bind") || attempt_log.contains("already in use") {
                continue;
            }
            panic!(
                "pg_ctl start failed ({}):\n{}\nserver log:\n{attempt_log}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        panic!("could not find a free port for PostgreSQL after 5 attempts");
    }

    /// A command for a server-side tool (initdb, pg_ctl), run as the unprivileged service
    /// user when the tests run as root.
    fn server_command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(tool));
        cmd.current_dir(self.dir.path()).env("LC_ALL", "C");
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        if let Some(user) = self.user {
            // std drops root's supplementary groups itself when it changes the uid.
            cmd.uid(user.uid).gid(user.gid);
        }
        cmd
    }

    fn give_to_server_user(&self, path: &Path) {
        if let Some(user) = self.user {
            std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
                .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// True when every user may reach `dir` (each ancestor searchable by others).
fn reachable_by_all(dir: &Path) -> bool {
    dir.ancestors()
        .all(|d| fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

/// Copies the installation `bindir` belongs to (hard links where possible) into `dir/pg`,
/// for a server user who cannot reach it (e.g. a cache under root's 0700 home).
fn copy_install(bindir: &Path, dir: &Path) -> PathBuf {
    let install = bindir.parent().expect("bindir has a parent");
    let copy = dir.join("pg");
    let linked = Command::new("cp")
        .arg("-al")
        .arg(install)
        .arg(&copy)
        .status()
        .is_ok_and(|s| s.success());
    if !linked {
        let _ = fs::remove_dir_all(&copy);
        let status = Command::new("cp")
            .arg("-a")
            .arg(install)
            .arg(&copy)
            .status()
            .expect("run cp");
        assert!(status.success(), "copying {} failed", install.display());
    }
    copy.join(bindir.file_name().expect("bindir has a name"))
}

/// Quotes an SQL identifier.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
