//! PostgreSQL: connection URLs and their secrets, dr's own sessions ([`client`], through
//! tokio-postgres, with [`tls`] as libpq means `sslmode`), finding client binaries that match
//! a server's major version, and running `pg_dump` and `pg_dumpall` as children.
//!
//! Every child gets its password through `PGPASSWORD` in its environment, never on argv, and
//! uses libpq itself, so TLS settings (`sslmode`, `sslrootcert`), `~/.pgpass` and service files
//! work exactly as they do for the stock tools.

pub mod client;
pub mod counts;
pub mod tls;

pub use client::{Canceller, PgClient};
/// Quoting comes from the protocol crate, never from string replacement here.
pub use postgres_protocol::escape::{
    escape_identifier as quote_ident, escape_literal as quote_literal,
};

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::pipeline::child::{ChildError, ChildSource};
use crate::redact;

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("no PostgreSQL client tools found (looked for pg_dump in DR_PG_BINDIR if set, else on PATH and in /usr/lib/postgresql/*/bin); install postgresql-client-{needed} or set DR_PG_BINDIR to a PostgreSQL bin directory")]
    NoTools { needed: u32 },
    #[error("the server runs PostgreSQL {server_major}, but the newest pg_dump on this host is {newest} ({dir}); pg_dump must be at least as new as the server: install postgresql-client-{server_major}")]
    ToolsTooOld {
        server_major: u32,
        newest: String,
        dir: PathBuf,
    },
    #[error("cannot connect to database `{database}` at {url}: {message}")]
    Connect {
        database: String,
        url: String,
        message: String,
    },
    #[error("query on database `{database}` failed: {message}")]
    Query {
        database: String,
        message: String,
        /// The server's SQLSTATE, when the server reported the error.
        sqlstate: Option<String>,
    },
    #[error("cannot read password file: {0}")]
    PasswordFile(#[from] crate::keys::KeyError),
    #[error("password file {path} is empty")]
    EmptyPasswordFile { path: PathBuf },
    #[error(transparent)]
    Child(#[from] ChildError),
}

/// A `postgres://` URL split into the part that may appear on argv and the password.
#[derive(Clone, Deserialize)]
#[serde(try_from = "String")]
pub struct ConnUrl {
    /// The URL with any password removed: safe for argv.
    without_password: String,
    /// The same, parsed: what dr's own sessions connect with.
    parsed: url::Url,
    password: Option<SecretString>,
    dbname: String,
}

impl ConnUrl {
    pub fn dbname(&self) -> &str {
        &self.dbname
    }

    /// The URL for argv: never contains the password.
    pub fn for_argv(&self) -> &str {
        &self.without_password
    }

    pub fn has_password(&self) -> bool {
        self.password.is_some()
    }

    /// The same server and credentials, connected to another database.
    pub fn with_dbname(&self, dbname: &str) -> ConnUrl {
        let mut url = url::Url::parse(&self.without_password).expect("validated at load");
        url.set_path(&format!("/{dbname}"));
        ConnUrl {
            without_password: url.to_string(),
            parsed: url,
            password: self.password.clone(),
            dbname: dbname.to_string(),
        }
    }
}

impl fmt::Display for ConnUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.without_password)
    }
}

impl fmt::Debug for ConnUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnUrl({})", self.without_password)
    }
}

impl TryFrom<String> for ConnUrl {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let reserved = "percent-encode `/`, `#`, `?` and `@` in the password (%2F, %23, %3F, %40) or move it to password_file";
        let bad = || {
            format!(
                "invalid database url `{}`: expected postgres://user@host:port/dbname{}",
                redact::redact_urls(&text),
                if redact::has_password(&text) {
                    format!("; {reserved}")
                } else {
                    String::new()
                }
            )
        };
        let mut url = url::Url::parse(&text).map_err(|_| bad())?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(bad());
        }
        // An `@` after the parsed host means a `/`, `#` or `?` in the password cut it short,
        // and part of it would be taken as the database name or port.
        if url[url::Position::BeforeHost..].contains('@') {
            return Err(format!(
                "database url `{}` has an `@` after its host, so its password was cut short: {reserved}",
                redact::redact_urls(&text)
            ));
        }
        let mut password = url.password().map(percent_decode).map(SecretString::from);
        // A socket URL (`postgres:///db?host=/dir`) has no host to carry a password.
        if url.password().is_some() {
            url.set_password(None).map_err(|_| bad())?;
        }
        // A `password=` query parameter is as secret as the userinfo one.
        let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        if pairs.iter().any(|(k, _)| k == "password") {
            password = pairs
                .iter()
                .find(|(k, _)| k == "password")
                .map(|(_, v)| SecretString::from(v.clone()));
            let kept: Vec<_> = pairs.into_iter().filter(|(k, _)| k != "password").collect();
            if kept.is_empty() {
                url.set_query(None);
            } else {
                url.query_pairs_mut().clear().extend_pairs(kept);
            }
        }
        let dbname = url.path().trim_start_matches('/').to_string();
        if dbname.is_empty() {
            return Err(format!(
                "database url `{}` names no database: add `/dbname` after the host",
                redact::redact_urls(&text)
            ));
        }
        Ok(ConnUrl {
            without_password: url.to_string(),
            parsed: url,
            password,
            dbname: percent_decode(&dbname),
        })
    }
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// How to reach one database: its URL and the password resolved from the config.
#[derive(Clone, Debug)]
pub struct Connection {
    pub url: ConnUrl,
    password: Option<SecretString>,
}

impl Connection {
    /// Resolves the password: `password_file` first, then the URL's; otherwise children
    /// inherit `PGPASSWORD` or use `~/.pgpass` as libpq does.
    pub fn new(url: &ConnUrl, password_file: Option<&Path>) -> Result<Self, PgError> {
        let password = match password_file {
            Some(path) => {
                crate::keys::check_not_world_readable(path, "password")?;
                let text = std::fs::read_to_string(path).map_err(|source| {
                    crate::keys::KeyError::Read {
                        what: "password",
                        path: path.to_owned(),
                        source,
                    }
                })?;
                let line = text.lines().next().unwrap_or("").to_string();
                if line.is_empty() {
                    return Err(PgError::EmptyPasswordFile {
                        path: path.to_owned(),
                    });
                }
                Some(SecretString::from(line))
            }
            None => url.password.clone(),
        };
        Ok(Connection {
            url: url.clone(),
            password,
        })
    }

    /// The same server and credentials, another database (e.g. `postgres` to create one).
    pub fn for_database(&self, dbname: &str) -> Connection {
        Connection {
            url: self.url.with_dbname(dbname),
            password: self.password.clone(),
        }
    }

    /// Secrets to scrub from any child output before it is shown.
    pub fn secrets(&self) -> Vec<String> {
        self.password
            .iter()
            .map(|p| p.expose_secret().to_string())
            .collect()
    }

    /// A command for one of the client tools, with the password in its environment only.
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        if let Some(p) = &self.password {
            cmd.env("PGPASSWORD", p.expose_secret());
        }
        if std::env::var_os("PGAPPNAME").is_none() {
            cmd.env("PGAPPNAME", "dr");
        }
        if std::env::var_os("PGCONNECT_TIMEOUT").is_none() {
            cmd.env("PGCONNECT_TIMEOUT", "15");
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Child stderr as one line, secrets removed.
    pub fn clean_stderr(&self, stderr: &str) -> String {
        let secrets = self.secrets();
        let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let joined = stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        redact::scrub(&joined, &refs)
    }

    /// Starts `pg_dump` in custom format without compression: zstd does that better, later.
    /// With `snapshot`, dumps exactly what an exported snapshot sees.
    pub fn spawn_pg_dump(
        &self,
        tools: &PgTools,
        snapshot: Option<&str>,
        lock_wait_timeout: std::time::Duration,
    ) -> Result<ChildSource, PgError> {
        let mut cmd = self.command(&tools.bin("pg_dump"));
        cmd.args(["--format=custom", "--compress=0", "--no-password"])
            .arg(format!("--dbname={}", self.url.for_argv()))
            .arg(format!(
                "--lock-wait-timeout={}",
                lock_wait_timeout.as_millis().max(1)
            ));
        if let Some(id) = snapshot {
            cmd.arg(format!("--snapshot={id}"));
        }
        Ok(ChildSource::spawn("pg_dump", cmd, self.secrets())?)
    }

    /// Starts one `pg_dump` of a split backup: `part`'s arguments added to a whole dump's.
    pub fn spawn_pg_dump_part(
        &self,
        tools: &PgTools,
        snapshot: &str,
        lock_wait_timeout: std::time::Duration,
        part: &crate::split::Part,
    ) -> Result<ChildSource, PgError> {
        let mut cmd = self.command(&tools.bin("pg_dump"));
        cmd.args(["--format=custom", "--compress=0", "--no-password"])
            .arg(format!("--dbname={}", self.url.for_argv()))
            .arg(format!(
                "--lock-wait-timeout={}",
                lock_wait_timeout.as_millis().max(1)
            ))
            .arg(format!("--snapshot={snapshot}"))
            .args(part.pg_dump_args());
        Ok(ChildSource::spawn("pg_dump", cmd, self.secrets())?)
    }

    /// Starts `pg_dumpall --globals-only`; with `role_passwords = false` it reads `pg_roles`
    /// instead of `pg_authid`, which managed services (RDS, Cloud SQL) do not let users read.
    pub fn spawn_pg_dumpall_globals(
        &self,
        tools: &PgTools,
        role_passwords: bool,
    ) -> Result<ChildSource, PgError> {
        let mut cmd = self.command(&tools.bin("pg_dumpall"));
        cmd.args(["--globals-only", "--no-password"]);
        if !role_passwords {
            cmd.arg("--no-role-passwords");
        }
        // pg_dumpall ignores the URL's database; -l picks the one the role can reach.
        cmd.arg(format!("--dbname={}", self.url.for_argv()))
            .arg("-l")
            .arg(self.url.dbname());
        Ok(ChildSource::spawn("pg_dumpall", cmd, self.secrets())?)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerVersion {
    /// e.g. 150018
    pub num: u32,
    /// e.g. "15.18"
    pub text: String,
}

impl ServerVersion {
    pub fn major(&self) -> u32 {
        if self.num >= 100_000 {
            self.num / 10_000
        } else {
            self.num / 100
        }
    }
}

/// One directory of PostgreSQL client binaries and its major version.
#[derive(Debug, Clone)]
pub struct PgTools {
    pub dir: PathBuf,
    pub major: u32,
    pub version: String,
}

impl PgTools {
    pub fn bin(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Every directory holding a real `pg_dump` among [`crate::pgbin::search_dirs`]
    /// (`DR_PG_BINDIR`, else PATH then `/usr/lib/postgresql/*/bin`), newest major first.
    /// Debian's `pg_wrapper` shims are skipped: they pick a version by cluster config, not by
    /// the server we talk to.
    pub fn discover() -> Vec<PgTools> {
        let dirs = crate::pgbin::search_dirs();
        let mut found: Vec<PgTools> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for dir in dirs {
            let exe = dir.join("pg_dump");
            let Ok(real) = std::fs::canonicalize(&exe) else {
                continue;
            };
            if real.file_name().is_none_or(|n| n != "pg_dump") {
                continue;
            }
            if !seen.insert(dir.clone()) {
                continue;
            }
            if let Some((major, version)) = tool_version(&exe) {
                found.push(PgTools {
                    dir,
                    major,
                    version,
                });
            }
        }
        // Stable sort keeps PATH order among equal majors.
        found.sort_by_key(|t| std::cmp::Reverse(t.major));
        found
    }

    /// The newest tools, for talking to a server whose version is not known yet.
    pub fn newest(found: &[PgTools]) -> Result<&PgTools, PgError> {
        found.first().ok_or(PgError::NoTools { needed: 15 })
    }

    /// The oldest tools whose major is at least the server's: a same-major `pg_dump` writes
    /// an archive that the same server's `pg_restore` can read.
    pub fn for_server(found: &[PgTools], server: &ServerVersion) -> Result<PgTools, PgError> {
        let major = server.major();
        found
            .iter()
            .filter(|t| t.major >= major)
            .min_by_key(|t| t.major)
            .cloned()
            .ok_or_else(|| match found.first() {
                None => PgError::NoTools { needed: major },
                Some(newest) => PgError::ToolsTooOld {
                    server_major: major,
                    newest: newest.version.clone(),
                    dir: newest.dir.clone(),
                },
            })
    }
}

/// Parses `pg_dump (PostgreSQL) 15.18 (Debian ...)` into (15, "15.18").
pub fn tool_version(exe: &Path) -> Option<(u32, String)> {
    let out = Command::new(exe)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    parse_tool_version(&String::from_utf8_lossy(&out.stdout))
}

fn parse_tool_version(text: &str) -> Option<(u32, String)> {
    let version = text.split_whitespace().nth(2)?.to_string();
    let major = version
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some((major, version))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> ConnUrl {
        ConnUrl::try_from(s.to_string()).unwrap()
    }

    #[test]
    fn password_is_split_from_the_url() {
        let u = url("postgres://app:p%40ss@db:5432/app?sslmode=require");
        assert_eq!(u.for_argv(), "postgres://app@db:5432/app?sslmode=require");
        assert_eq!(u.password.as_ref().unwrap().expose_secret(), "p@ss");
        let u = url("postgresql://app@db/app?password=x&sslmode=require");
        assert_eq!(u.for_argv(), "postgresql://app@db/app?sslmode=require");
        assert_eq!(u.password.as_ref().unwrap().expose_secret(), "x");
        assert_eq!(u.dbname(), "app");
    }

    #[test]
    fn bad_urls_are_explained_without_the_password() {
        let e = ConnUrl::try_from("mysql://a:secret@h/db".to_string())
            .err()
            .unwrap();
        assert!(e.contains("expected postgres://"), "{e}");
        assert!(!e.contains("secret"), "{e}");
        let e = ConnUrl::try_from("postgres://a@h".to_string())
            .err()
            .unwrap();
        assert!(e.contains("names no database"), "{e}");
        for (text, secret) in [
            ("postgres://app:pa#ss/w@db/app", "ss/w"),
            ("postgres://app:7777/zebra@db/app", "zebra"),
        ] {
            let e = ConnUrl::try_from(text.to_string()).err().unwrap();
            assert!(e.contains("percent-encode") && !e.contains(secret), "{e}");
        }
    }

    #[test]
    fn tool_versions_parse() {
        assert_eq!(
            parse_tool_version("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some((15, "15.18".into()))
        );
        assert_eq!(
            parse_tool_version("pg_dump (PostgreSQL) 18beta1"),
            Some((18, "18beta1".into()))
        );
    }

    #[test]
    fn tools_are_chosen_by_server_major() {
        let t = |major| PgTools {
            dir: PathBuf::from(format!("/pg/{major}")),
            major,
            version: format!("{major}.1"),
        };
        let found = vec![t(17), t(16), t(15)];
        let v = |num| ServerVersion {
            num,
            text: String::new(),
        };
        assert_eq!(PgTools::for_server(&found, &v(160004)).unwrap().major, 16);
        assert_eq!(PgTools::for_server(&found, &v(140010)).unwrap().major, 15);
        let err = PgTools::for_server(&found, &v(180001))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("PostgreSQL 18") && err.contains("17.1"),
            "{err}"
        );
    }
}
