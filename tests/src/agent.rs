//! Fixtures for `dr agent` tests: the running agent itself, a tiny HTTP client for its
//! endpoints, a webhook receiver, and a session that holds a table lock so `pg_dump` hangs
//! (the throttling proxy is in `proxy.rs`).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::dr::Dr;
use crate::pg::PgCluster;
use crate::util::wait_until;

/// A running `dr agent`, its stderr collected in the background (so a full pipe never
/// blocks it). Dropping it sends SIGTERM, then SIGKILL if it has not exited within 10 s.
pub struct Agent {
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    port: u16,
    readers: Vec<JoinHandle<()>>,
    exit: Option<ExitStatus>,
}

impl Agent {
    /// Starts `dr agent` (`dr` carries the config and environment); `port` is the config's
    /// `[agent] listen` port. Waits until `/healthz` answers, panicking with the log if the
    /// agent exits or does not answer within 30 s.
    pub fn start(dr: Dr, port: u16) -> Agent {
        let mut child = dr.arg("agent").spawn();
        let log = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        if let Some(stderr) = child.stderr.take() {
            readers.push(collect(stderr, log.clone()));
        }
        if let Some(stdout) = child.stdout.take() {
            readers.push(collect(stdout, log.clone()));
        }
        let mut agent = Agent {
            child: Some(child),
            log,
            port,
            readers,
            exit: None,
        };
        let up = wait_until(Duration::from_secs(30), || {
            agent.has_exited() || agent.get("/healthz").is_some()
        });
        if agent.has_exited() || !up {
            panic!(
                "dr agent did not come up on port {port} (exit: {:?}):\n{}",
                agent.exit,
                agent.log()
            );
        }
        agent
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Everything the agent wrote to stderr and stdout so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Polls the log for `needle` until `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().contains(needle))
    }

    /// How many times `needle` occurs in the log.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to the agent.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.pid() as libc::pid_t;
        if pid > 0 && self.exit.is_none() {
            // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    /// True once the process has exited (and records its status).
    pub fn has_exited(&mut self) -> bool {
        if self.exit.is_some() {
            return true;
        }
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                self.exit = Some(status);
                return true;
            }
        }
        false
    }

    /// Waits up to `timeout` for the process to exit; returns its status and how long it
    /// took, or `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<(ExitStatus, Duration)> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if self.has_exited() {
                // The readers finish once the pipes close, so the log is complete.
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
                return self.exit.map(|s| (s, started.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGTERM, then waits up to 10 s; panics with the log if the agent is still running.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        match self.wait_exit(Duration::from_secs(10)) {
            Some((status, _)) => status,
            None => panic!(
                "dr agent did not exit within 10 s of SIGTERM:\n{}",
                self.log()
            ),
        }
    }

    /// GET `path` on the agent's HTTP port.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.port, path)
    }

    /// The `/metrics` text (empty if the agent does not answer).
    pub fn metrics(&self) -> String {
        self.get("/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.exit.is_none() && matches!(child.try_wait(), Ok(None)) {
                // SAFETY: kill(2) on our own unreaped child.
                unsafe {
                    libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
                }
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

fn collect(mut stream: impl Read + Send + 'static, log: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => log
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    })
}

/// A plain HTTP/1.1 GET on 127.0.0.1:`port`: the status code and body, or `None` if
/// nothing answered.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Some((status, body))
}

pub(crate) fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size =
            usize::from_str_radix(size.split(';').next().unwrap_or("0").trim(), 16).unwrap_or(0);
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}

/// The value of the series `name` whose labels include every `labels` pair, from
/// Prometheus/OpenMetrics text.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(series, _)| {
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (*series, ""),
            };
            series_name == name
                && labels
                    .iter()
                    .all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|(_, value)| value.trim().parse().ok())
}

/// One request a [`WebhookReceiver`] got.
#[derive(Clone, Debug)]
pub struct WebhookRequest {
    pub path: String,
    pub body: String,
}

/// A local HTTP server that records every request's path and body and answers 200.
/// Stops on drop.
pub struct WebhookReceiver {
    port: u16,
    requests: Arc<Mutex<Vec<WebhookRequest>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WebhookReceiver {
    pub fn start() -> WebhookReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind webhook receiver");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("local addr").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (requests, stop) = (requests.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            if let Some(request) = answer(stream) {
                                requests
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push(request);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        };
        WebhookReceiver {
            port,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn requests(&self) -> Vec<WebhookRequest> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The JSON bodies received so far (bodies that are not JSON are skipped).
    pub fn json_bodies(&self) -> Vec<serde_json::Value> {
        self.requests()
            .iter()
            .filter_map(|r| serde_json::from_str(&r.body).ok())
            .collect()
    }

    /// The `event` field of every JSON body, in arrival order.
    pub fn events(&self) -> Vec<String> {
        self.json_bodies()
            .iter()
            .filter_map(|b| b["event"].as_str().map(String::from))
            .collect()
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads one request (headers, then `Content-Length` bytes of body) and answers 200.
fn answer(mut stream: TcpStream) -> Option<WebhookRequest> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
    let length: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < header_end + length {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[header_end..]).into_owned();
    let _ =
        stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
    let _ = stream.shutdown(Shutdown::Both);
    Some(WebhookRequest { path, body })
}

/// A session holding `LOCK TABLE <table> IN ACCESS EXCLUSIVE MODE`, as a long migration
/// would: `pg_dump` then blocks on that table. The session ends by itself after `max`;
/// dropping the guard terminates it at once.
pub struct TableLock<'a> {
    cluster: &'a PgCluster,
    db: String,
    child: Option<Child>,
}

const LOCKER_APP: &str = "dr-test-table-lock";

impl<'a> TableLock<'a> {
    /// Takes the lock and returns once the server shows it granted (panics after 20 s).
    pub fn hold(cluster: &'a PgCluster, db: &str, table: &str, max: Duration) -> TableLock<'a> {
        let sql = format!(
            "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep({}); COMMIT;",
            max.as_secs()
        );
        let child = cluster
            .client_command("psql")
            .env("PGAPPNAME", LOCKER_APP)
            .args(["-X", "-q", "-d", db, "-c", &sql])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the locking psql");
        let guard = TableLock {
            cluster,
            db: db.to_string(),
            child: Some(child),
        };
        let check = format!(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
             WHERE c.relname = '{table}' AND l.mode = 'AccessExclusiveLock' AND l.granted"
        );
        assert!(
            wait_until(Duration::from_secs(20), || cluster.psql(db, &check) == "1"),
            "the test session did not get its lock on {table}"
        );
        guard
    }
}

impl Drop for TableLock<'_> {
    fn drop(&mut self) {
        // The backend would sit in pg_sleep after its client died: end it from the server.
        let _ = self.cluster.try_psql(
            &self.db,
            &format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{LOCKER_APP}'"
            ),
        );
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
