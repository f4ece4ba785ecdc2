//! A child process's stdout as the pipeline's source (`pg_dump`, `pg_dumpall`).
//!
//! The trap this guards against is the shell's `pg_dump | x`, which reports success when
//! pg_dump died: the source is only done when the child has exited 0, and a failure anywhere
//! else kills and reaps it.

use std::io::Read;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::redact;

/// How much of a child's stderr is kept for the error message.
const STDERR_TAIL: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} failed ({status}){}", fmt_stderr(stderr))]
    Failed {
        program: String,
        status: String,
        stderr: String,
    },
}

fn fmt_stderr(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    }
}

pub struct ChildSource {
    program: &'static str,
    child: Child,
    /// Set (under the lock) before the child is reaped, so a `KillHandle` never signals a
    /// pid that may have been reused.
    reaping: Arc<Mutex<bool>>,
    stdout: ChildStdout,
    stderr: Option<JoinHandle<Vec<u8>>>,
    secrets: Vec<String>,
}

impl ChildSource {
    /// Spawns `cmd` with stdout piped to us and stderr collected for errors.
    pub fn spawn(
        program: &'static str,
        mut cmd: Command,
        secrets: Vec<String>,
    ) -> Result<Self, ChildError> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        // Its own process group: a terminal's Ctrl-C reaches dr, which then stops the child
        // in order, instead of both dying at once.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        tracing::debug!(program, args = ?redacted_args(&cmd), "starting");
        let mut child = cmd.spawn().map_err(|source| ChildError::Spawn {
            program: program.to_string(),
            source,
        })?;
        let stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let stderr = std::thread::spawn(move || {
            let mut tail = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 2 * STDERR_TAIL {
                    tail.drain(..tail.len() - STDERR_TAIL);
                }
            }
            tail
        });
        Ok(ChildSource {
            program,
            child,
            reaping: Arc::new(Mutex::new(false)),
            stdout,
            stderr: Some(stderr),
            secrets,
        })
    }

    pub fn program(&self) -> &'static str {
        self.program
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lets another task stop the child while this source is busy on a blocking thread.
    pub fn kill_handle(&self) -> KillHandle {
        KillHandle {
            pid: self.child.id(),
            reaping: self.reaping.clone(),
        }
    }

    fn mark_reaping(&self) {
        *self.reaping.lock().expect("reaping flag") = true;
    }

    /// Waits for the child after its stdout reached EOF; an error unless it exited 0.
    pub fn finish(mut self) -> Result<(), ChildError> {
        self.mark_reaping();
        let status = self.child.wait().map_err(|source| ChildError::Spawn {
            program: self.program.to_string(),
            source,
        })?;
        let stderr = self.stderr_text();
        if status.success() {
            if !stderr.is_empty() {
                tracing::warn!(program = self.program, stderr = %stderr, "child wrote to stderr");
            }
            return Ok(());
        }
        Err(ChildError::Failed {
            program: self.program.to_string(),
            status: describe_status(status),
            stderr,
        })
    }

    /// Kills and reaps the child: used when a later stage failed.
    pub fn kill(mut self) {
        self.mark_reaping();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self.stderr.take().map(JoinHandle::join);
    }

    fn stderr_text(&mut self) -> String {
        let raw = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&raw);
        let joined = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        let secrets: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        redact::scrub(&joined, &secrets)
    }
}

impl Read for ChildSource {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stdout.read(buf)
    }
}

impl Drop for ChildSource {
    fn drop(&mut self) {
        // Never leave a child behind, whatever path dropped us.
        self.mark_reaping();
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Kills a `ChildSource`'s process from another task (cancellation).
#[derive(Debug, Clone)]
pub struct KillHandle {
    pid: u32,
    reaping: Arc<Mutex<bool>>,
}

impl KillHandle {
    pub fn kill(&self) {
        let reaping = self.reaping.lock().expect("reaping flag");
        if !*reaping {
            // Our child is not reaped yet, so the pid cannot have been reused.
            if let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

/// `exit code 1` or `killed by signal 9 (SIGKILL)`.
pub fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig} ({})", signal_name(sig)),
        _ => "unknown status".into(),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGABRT => "SIGABRT",
        libc::SIGHUP => "SIGHUP",
        _ => "signal",
    }
}

fn redacted_args(cmd: &Command) -> Vec<String> {
    cmd.get_args()
        .map(|a| redact::redact_urls(&a.to_string_lossy()))
        .collect()
}
