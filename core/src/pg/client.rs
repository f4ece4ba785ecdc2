//! dr's own connections to PostgreSQL, through `tokio-postgres`: the server version, the
//! held snapshot and its row counts, target inspection, drill checks. Results come back
//! typed, identifiers are quoted by the server (`format('%I.%I')`) or by
//! `postgres-protocol`, and no SQL ever goes on a child's argv.
//!
//! Connection settings follow libpq, so a URL that works for `pg_dump` works here: the URL's
//! host (a directory means a Unix socket), port, user and `sslmode`/`sslrootcert`/`sslcert`/
//! `sslkey`/`options`/`application_name`/`connect_timeout`/`target_session_attrs` parameters,
//! then the `PG*` environment variables, then libpq's defaults. The password comes from
//! `password_file` or the URL (see [`Connection::new`]), else `PGPASSWORD`, else the
//! passfile (`PGPASSFILE`, `~/.pgpass`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::ExposeSecret;
use tokio_postgres::{CancelToken, Row};

use super::tls::{self, RootCert, SslMode, TlsSettings};
use super::{Connection, PgError, ServerVersion};

/// One open session. Dropping it closes the connection (the server ends the session).
pub struct PgClient {
    client: tokio_postgres::Client,
    canceller: Canceller,
    database: String,
}

/// Cancels the statement a session is running, from anywhere (libpq's `PQcancel`).
#[derive(Clone)]
pub struct Canceller {
    token: CancelToken,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl Canceller {
    /// Best effort: asks the server to cancel; errors are only logged.
    pub async fn cancel(&self) {
        let result = match &self.tls {
            Some(tls) => self.token.cancel_query(tls.clone()).await,
            None => self.token.cancel_query(tokio_postgres::NoTls).await,
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "could not cancel a running query");
        }
    }
}

/// What [`Connection::connect`] derives from the URL, the environment and libpq defaults.
struct Settings {
    config: tokio_postgres::Config,
    tls: TlsSettings,
}

impl Connection {
    /// Opens a session; `purpose` becomes its `application_name` (e.g. `dr snapshot`) unless
    /// the URL or `PGAPPNAME` names one.
    pub async fn connect(&self, purpose: &str) -> Result<PgClient, PgError> {
        let settings = self.settings(purpose)?;
        let connector = tls::connector(&settings.tls).map_err(|e| self.connect_error(e))?;
        let canceller_tls = connector.clone();
        let (client, task) = match connector {
            Some(tls) => {
                let (client, connection) = settings
                    .config
                    .connect(tls)
                    .await
                    .map_err(|e| self.connect_error(describe(&e)))?;
                (client, tokio::spawn(drive(connection)))
            }
            None => {
                let (client, connection) = settings
                    .config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(|e| self.connect_error(describe(&e)))?;
                (client, tokio::spawn(drive(connection)))
            }
        };
        let canceller = Canceller {
            token: client.cancel_token(),
            tls: canceller_tls,
        };
        // The connection task ends by itself once the client is dropped.
        drop(task);
        Ok(PgClient {
            client,
            canceller,
            database: self.url.dbname().to_string(),
        })
    }

    fn connect_error(&self, message: impl ToString) -> PgError {
        PgError::Connect {
            database: self.url.dbname().to_string(),
            url: self.url.to_string(),
            message: self.scrub(&message.to_string()),
        }
    }

    fn scrub(&self, text: &str) -> String {
        let secrets = self.secrets();
        let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
        crate::redact::scrub(text, &refs)
    }

    fn settings(&self, purpose: &str) -> Result<Settings, PgError> {
        let url = &self.url.parsed;
        let query: HashMap<String, String> = url.query_pairs().into_owned().collect();
        let param = |key: &str, env: &str| -> Option<String> {
            query
                .get(key)
                .cloned()
                .or_else(|| std::env::var(env).ok())
                .filter(|v| !v.is_empty())
        };
        let bad = |message: String| self.connect_error(message);
        let mut config = tokio_postgres::Config::new();

        let hosts: Vec<String> = match query.get("host").filter(|h| !h.is_empty()) {
            Some(h) => h.split(',').map(str::to_string).collect(),
            None => match url.host_str().filter(|h| !h.is_empty()) {
                Some(h) => vec![decode(h.trim_start_matches('[').trim_end_matches(']'))],
                None => match std::env::var("PGHOST").ok().filter(|h| !h.is_empty()) {
                    Some(h) => h.split(',').map(str::to_string).collect(),
                    None => vec![default_socket_dir()],
                },
            },
        };
        let socket = hosts.iter().all(|h| h.starts_with('/'));
        for h in &hosts {
            if h.starts_with('/') {
                config.host_path(h);
            } else {
                config.host(h);
            }
        }
        if let Some(addr) = query.get("hostaddr") {
            for a in addr.split(',') {
                let ip = a
                    .parse()
                    .map_err(|_| bad(format!("invalid hostaddr `{a}`: expected an IP address")))?;
                config.hostaddr(ip);
            }
        }
        let port = match url.port() {
            Some(p) => p,
            None => match param("port", "PGPORT") {
                Some(p) => p
                    .parse()
                    .map_err(|_| bad(format!("invalid port `{p}`: expected a number")))?,
                None => 5432,
            },
        };
        config.port(port);

        let user = Some(decode(url.username()))
            .filter(|u| !u.is_empty())
            .or_else(|| param("user", "PGUSER"))
            .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
            .or_else(|| std::env::var("LOGNAME").ok().filter(|u| !u.is_empty()))
            .unwrap_or_else(|| "postgres".to_string());
        config.user(&user);
        config.dbname(self.url.dbname());
        if let Some(options) = param("options", "PGOPTIONS") {
            config.options(&options);
        }
        let app = param("application_name", "PGAPPNAME").unwrap_or_else(|| purpose.to_string());
        config.application_name(&app);
        let timeout = match param("connect_timeout", "PGCONNECT_TIMEOUT") {
            Some(t) => t.parse::<u64>().map_err(|_| {
                bad(format!(
                    "invalid connect_timeout `{t}`: expected whole seconds"
                ))
            })?,
            None => 15,
        };
        if timeout > 0 {
            config.connect_timeout(Duration::from_secs(timeout.max(2)));
        }
        if let Some(attrs) = query.get("target_session_attrs") {
            config.target_session_attrs(match attrs.as_str() {
                "any" => tokio_postgres::config::TargetSessionAttrs::Any,
                "read-write" => tokio_postgres::config::TargetSessionAttrs::ReadWrite,
                other => {
                    return Err(bad(format!(
                        "target_session_attrs `{other}` is not supported: use any or read-write"
                    )))
                }
            });
        }

        let mode_text = param("sslmode", "PGSSLMODE").unwrap_or_else(|| "prefer".into());
        let mut mode = SslMode::parse(&mode_text).ok_or_else(|| {
            bad(format!(
                "invalid sslmode `{mode_text}`: expected disable, allow, prefer, require, verify-ca or verify-full"
            ))
        })?;
        // Like libpq: no TLS over Unix sockets.
        if socket {
            mode = SslMode::Disable;
        }
        config.ssl_mode(mode.negotiate());
        let root = match param("sslrootcert", "PGSSLROOTCERT") {
            Some(r) if r == "system" => Some(RootCert::System),
            Some(r) => Some(RootCert::File(PathBuf::from(r))),
            None => tls::default_root_path()
                .filter(|p| p.exists())
                .map(RootCert::File),
        };
        let home_file = |name: &str| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".postgresql").join(name))
        };
        let client_cert = match (param("sslcert", "PGSSLCERT"), param("sslkey", "PGSSLKEY")) {
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            (Some(c), None) => Some((
                PathBuf::from(c),
                home_file("postgresql.key").unwrap_or_default(),
            )),
            _ => match (home_file("postgresql.crt"), home_file("postgresql.key")) {
                (Some(c), Some(k)) if c.exists() && k.exists() => Some((c, k)),
                _ => None,
            },
        };

        let password = self
            .password
            .as_ref()
            .map(|p| p.expose_secret().to_string())
            .or_else(|| std::env::var("PGPASSWORD").ok())
            .or_else(|| {
                let host = if socket { "localhost" } else { &hosts[0] };
                passfile_password(host, port, self.url.dbname(), &user)
            });
        if let Some(p) = password {
            config.password(p);
        }
        Ok(Settings {
            config,
            tls: TlsSettings {
                mode,
                root,
                client_cert,
            },
        })
    }
}

async fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "a PostgreSQL connection ended with an error");
    }
}

/// libpq's default socket directory: Debian's, else `/tmp`.
fn default_socket_dir() -> String {
    if Path::new("/var/run/postgresql").is_dir() {
        "/var/run/postgresql".into()
    } else {
        "/tmp".into()
    }
}

fn decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

/// The server's words for an error: severity, message, detail and hint, or the I/O cause.
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = format!("{}: {}", db.severity(), db.message());
        if let Some(hint) = db.hint() {
            text.push_str(&format!(" (hint: {hint})"));
        }
        return text;
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

impl PgClient {
    fn error(&self, e: tokio_postgres::Error) -> PgError {
        PgError::Query {
            database: self.database.clone(),
            message: describe(&e),
            sqlstate: e.code().map(|c| c.code().to_string()),
        }
    }

    /// Runs statements with no result (the simple protocol; several may be `;`-separated).
    pub async fn execute(&self, sql: &str) -> Result<(), PgError> {
        self.client
            .batch_execute(sql)
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, PgError> {
        self.client
            .query(sql, params)
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Row, PgError> {
        self.client
            .query_one(sql, params)
            .await
            .map_err(|e| self.error(e))
    }

    /// The first column of the first row, as text, of any single statement (drill checks):
    /// the simple protocol returns every type as text.
    pub async fn first_value(&self, sql: &str) -> Result<Option<String>, PgError> {
        let messages = self
            .client
            .simple_query(sql)
            .await
            .map_err(|e| self.error(e))?;
        for m in messages {
            if let tokio_postgres::SimpleQueryMessage::Row(row) = m {
                return Ok(row.get(0).map(str::to_string));
            }
        }
        Ok(None)
    }

    pub async fn server_version(&self) -> Result<ServerVersion, PgError> {
        let row = self
            .query_one(
                "SELECT current_setting('server_version_num')::int4, current_setting('server_version')",
                &[],
            )
            .await?;
        let num: i32 = row.get(0);
        let text: String = row.get(1);
        Ok(ServerVersion {
            num: num as u32,
            text: text.split_whitespace().next().unwrap_or("").to_string(),
        })
    }

    pub fn canceller(&self) -> Canceller {
        self.canceller.clone()
    }

    /// The underlying client, for what the helpers above do not cover.
    pub fn inner(&self) -> &tokio_postgres::Client {
        &self.client
    }
}

/// The password for (host, port, database, user) from the passfile, as libpq finds it:
/// `PGPASSFILE` or `~/.pgpass`, ignored (with a warning) when others can read it.
fn passfile_password(host: &str, port: u16, database: &str, user: &str) -> Option<String> {
    let path = std::env::var_os("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pgpass")))?;
    let meta = std::fs::metadata(&path).ok()?;
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "password file has group or world access; ignoring it (chmod 600 it)");
            return None;
        }
    }
    let text = std::fs::read_to_string(&path).ok()?;
    passfile_lookup(&text, host, &port.to_string(), database, user)
}

fn passfile_lookup(
    text: &str,
    host: &str,
    port: &str,
    database: &str,
    user: &str,
) -> Option<String> {
    let wanted = [host, port, database, user];
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        // Fields are `:`-separated; `\` escapes `:` and `\`.
        let mut fields = vec![String::new()];
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        fields.last_mut().expect("one").push(n);
                    }
                }
                ':' if fields.len() < 5 => fields.push(String::new()),
                c => fields.last_mut().expect("one").push(c),
            }
        }
        if fields.len() != 5 {
            continue;
        }
        if fields[..4]
            .iter()
            .zip(wanted)
            .all(|(f, w)| f == "*" || f == w)
        {
            return Some(fields.pop().expect("five"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passfile_lines_match_like_libpq() {
        let text = "# comment\n\
                    db.example:5432:app:alice:first\n\
                    *:*:*:bob:pa\\:ss\\\\word\n\
                    localhost:5433:*:*:sock\n";
        assert_eq!(
            passfile_lookup(text, "db.example", "5432", "app", "alice").as_deref(),
            Some("first")
        );
        assert_eq!(
            passfile_lookup(text, "elsewhere", "1", "x", "bob").as_deref(),
            Some("pa:ss\\word")
        );
        assert_eq!(
            passfile_lookup(text, "localhost", "5433", "any", "carol").as_deref(),
            Some("sock")
        );
        assert_eq!(
            passfile_lookup(text, "db.example", "5432", "app", "eve"),
            None
        );
    }
}
