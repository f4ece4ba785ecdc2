//! Small helpers shared by the fixtures and tests: free ports, randomness, waiting, processes,
//! directory listings, unprivileged users.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngCore;

/// Ports already handed out by this process. The OS may give the same ephemeral port to
/// two `bind(0)` calls once the first listener is closed, and our servers bind only later,
/// so without this two parallel tests in one process could be told the same port.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is found by binding to port 0 and closing the listener again, so another
/// process can still take it before our server binds: callers that start servers retry
/// with a fresh port when the bind fails.
pub fn free_port() -> u16 {
    let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed_out = guard.get_or_insert_with(HashSet::new);
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        if handed_out.insert(port) {
            return port;
        }
    }
}

/// `bytes` random bytes, hex-encoded (so `2 * bytes` characters).
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// Where slow-to-build test tools (Garage) are cached: `$DR_TEST_CACHE`, else
/// `$HOME/.cache/dr-tests`.
pub fn test_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DR_TEST_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache").join("dr-tests")
}

/// Polls `ready` every 100 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, ready: impl FnMut() -> bool) -> bool {
    poll_every(Duration::from_millis(100), timeout, ready)
}

/// Polls `ready` every `interval` until it returns true or `timeout` passes.
pub fn poll_every(interval: Duration, timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(interval);
    }
}

/// Every live process that `/proc` shows: (pid, argv). Processes that end while being read
/// (or whose command line cannot be read) are left out.
pub fn processes() -> Vec<(u32, Vec<String>)> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        found.push((pid, args));
    }
    found
}

/// True when `args` (a process's argv) runs the program named `program` (by its file name).
pub fn runs_program(args: &[String], program: &str) -> bool {
    args.first()
        .is_some_and(|a| a.rsplit('/').next() == Some(program))
}

/// The names of the entries of `dir`, sorted.
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// True when something accepts TCP connections on 127.0.0.1:`port`.
pub(crate) fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

/// True when the test process runs as root (as CI does).
pub(crate) fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// An unprivileged system account to run servers as when the tests run as root
/// (PostgreSQL refuses to run as root).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ServiceUser {
    pub uid: u32,
    pub gid: u32,
}

impl ServiceUser {
    /// `postgres` (Debian's postgresql package creates it), else `nobody`.
    pub fn find() -> ServiceUser {
        ["postgres", "nobody"]
            .iter()
            .find_map(|name| lookup_user(name))
            .expect("neither a `postgres` nor a `nobody` user exists to run PostgreSQL as")
    }
}

fn lookup_user(name: &str) -> Option<ServiceUser> {
    let cname = CString::new(name).ok()?;
    let mut record: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r (the thread-safe variant; tests run in parallel) gets a valid
    // NUL-terminated name, a record and a buffer that outlive the call, and their sizes.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut record,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some(ServiceUser {
        uid: record.pw_uid,
        gid: record.pw_gid,
    })
}
