//! A small fault-injecting TCP proxy for the test bed (no toxiproxy or netem here).
//!
//! [`FaultProxy`] listens on `127.0.0.1:<free port>` and forwards every connection to an
//! upstream port, applying the current [`Fault`]: a slow link, a connection reset after some
//! bytes, canned `503 Slow Down` answers, a frozen endpoint, or one flipped byte in an
//! upload body. The fault can be changed while connections are open ([`FaultProxy::set`]),
//! and [`FaultProxy::injected`] counts the faults actually applied, so a test can prove it
//! exercised what it claims. Dropping the proxy stops it and every connection.
//!
//! HTTP faults (503s, corruption) parse requests on the client-to-upstream side: headers,
//! then `Content-Length` bytes of body; a connection that does not start like HTTP (such
//! as PostgreSQL's protocol through [`ThrottledProxy`]) is forwarded untouched.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Which way bytes flow through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the client (e.g. `dr`) to the server: requests and upload bodies.
    ToUpstream,
    /// From the server to the client: responses and download bodies.
    ToClient,
}

/// What the proxy does to the traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything unchanged.
    None,
    /// At most this many bytes per second in each direction that has a rate.
    Throttle {
        to_upstream: Option<usize>,
        to_client: Option<usize>,
    },
    /// Reset (TCP RST) each connection once `after` bytes have flowed through it in
    /// `direction`; for the next `times` connections that get that far, then forward.
    ResetAfter {
        direction: Direction,
        after: u64,
        times: usize,
    },
    /// Answer the next `requests` HTTP requests with `503 Slow Down` without forwarding
    /// them (the body is read and dropped), closing each such connection.
    Unavailable { requests: usize },
    /// A frozen endpoint: new connections are accepted and never answered, open ones stop
    /// forwarding in both directions.
    Stall,
    /// Flip one byte in the middle of the body of the next `times` HTTP requests whose body
    /// has at least `min_body` bytes (the headers, and so the signature, stay intact).
    CorruptUpload { min_body: u64, times: usize },
}

struct Shared {
    fault: Mutex<Fault>,
    stop: AtomicBool,
    injected: AtomicUsize,
    /// Every HTTP request's request line and headers, lower-cased, in arrival order.
    heads: Mutex<Vec<String>>,
}

impl Shared {
    fn fault(&self) -> Fault {
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Takes one unit of the current fault's budget if `wanted` matches it.
    fn take(&self, wanted: impl FnOnce(&mut Fault) -> bool) -> bool {
        let mut fault = self.fault.lock().unwrap_or_else(|e| e.into_inner());
        let taken = wanted(&mut fault);
        if taken {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// A fault-injecting TCP proxy to an upstream port on 127.0.0.1. Stops on drop.
pub struct FaultProxy {
    port: u16,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl FaultProxy {
    /// Starts forwarding to `127.0.0.1:upstream_port` with `fault` in effect.
    pub fn start(upstream_port: u16, fault: Fault) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        // Loopback receive buffers autotune to megabytes: a throttled proxy would take a whole
        // upload part at once and drain it silently, which no real slow link does. A small
        // fixed buffer (inherited by accepted sockets) keeps TCP's backpressure on the sender.
        set_recv_buffer(&listener, 64 * 1024);
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared {
            fault: Mutex::new(fault),
            stop: AtomicBool::new(false),
            injected: AtomicUsize::new(0),
            heads: Mutex::new(Vec::new()),
        });
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = {
            let (shared, connections) = (shared.clone(), connections.clone());
            std::thread::spawn(move || {
                while !shared.stopped() {
                    let Ok((client, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    let shared = shared.clone();
                    let handle = std::thread::spawn(move || serve(client, upstream_port, &shared));
                    let mut all = connections.lock().unwrap_or_else(|e| e.into_inner());
                    all.retain(|h| !h.is_finished());
                    all.push(handle);
                }
            })
        };
        FaultProxy {
            port,
            shared,
            accept: Some(accept),
            connections,
        }
    }

    /// The port to connect to instead of the upstream's.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`, for an S3 endpoint behind the proxy.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Replaces the fault in effect (open connections follow it from their next read).
    pub fn set(&self, fault: Fault) {
        *self.shared.fault.lock().unwrap_or_else(|e| e.into_inner()) = fault;
    }

    /// The request line and headers (lower-cased) of every HTTP request seen so far.
    pub fn request_heads(&self) -> Vec<String> {
        self.shared
            .heads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many faults were applied so far: resets, 503s, corrupted bodies.
    pub fn injected(&self) -> usize {
        self.shared.injected.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        let handles: Vec<_> = self
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for handle in handles {
            let _ = handle.join();
        }
    }
}

/// A TCP proxy on 127.0.0.1 to `upstream_port` that passes upstream-to-client traffic at
/// about `bytes_per_second` (client-to-upstream unthrottled): a slow network to the
/// database, so a real `pg_dump` streams for a long time. Stops on drop, cutting every
/// connection.
pub struct ThrottledProxy(FaultProxy);

impl ThrottledProxy {
    pub fn start(upstream_port: u16, bytes_per_second: usize) -> ThrottledProxy {
        ThrottledProxy(FaultProxy::start(
            upstream_port,
            Fault::Throttle {
                to_upstream: None,
                to_client: Some(bytes_per_second),
            },
        ))
    }

    /// The port to connect to instead of the upstream's.
    pub fn port(&self) -> u16 {
        self.0.port()
    }
}

const CHUNK: usize = 64 * 1024;
const POLL_MS: i32 = 50;

const SLOW_DOWN: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";

/// Where the client-to-upstream side is in the current HTTP request.
enum Request {
    /// Collecting the header block.
    Head(Vec<u8>),
    /// Forwarding the body: bytes left, and the body offset of a byte to flip, if any.
    Body { left: u64, flip_in: Option<u64> },
    /// Reading and dropping the body of a request answered with 503.
    Refused { left: u64 },
    /// Not HTTP (or a body we cannot delimit): forward as is.
    Raw,
}

/// One connection: forwards both ways with `poll(2)`, applying the shared fault.
fn serve(client: TcpStream, upstream_port: u16, shared: &Shared) {
    if shared.fault() == Fault::Stall {
        hold(&client, shared);
        return;
    }
    let Ok(upstream) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
        return;
    };
    for s in [&client, &upstream] {
        let _ = s.set_nodelay(true);
        let _ = s.set_write_timeout(Some(Duration::from_secs(30)));
    }
    let mut request = Request::Head(Vec::new());
    let (mut up_bytes, mut down_bytes) = (0u64, 0u64);
    let mut buf = vec![0u8; CHUNK];
    while !shared.stopped() {
        let fault = shared.fault();
        if fault == Fault::Stall {
            std::thread::sleep(Duration::from_millis(POLL_MS as u64));
            continue;
        }
        let (client_ready, upstream_ready) = match poll_readable(&client, &upstream) {
            Some(ready) => ready,
            None => break,
        };
        let rate = |dir| match fault {
            Fault::Throttle {
                to_upstream,
                to_client,
            } => match dir {
                Direction::ToUpstream => to_upstream,
                Direction::ToClient => to_client,
            },
            _ => None,
        };
        if client_ready {
            let limit = rate(Direction::ToUpstream).map_or(CHUNK, |r| (r / 10).clamp(1, CHUNK));
            let n = match (&client).read(&mut buf[..limit]) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let data = &mut buf[..n];
            let mut forward = Vec::with_capacity(n);
            match feed(&mut request, data, shared, &mut forward) {
                Verdict::Forward => {}
                Verdict::Answer503 => {
                    let _ = (&upstream).write_all(&forward);
                    let reply = format!(
                        "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{SLOW_DOWN}",
                        SLOW_DOWN.len()
                    );
                    let _ = (&client).write_all(reply.as_bytes());
                    break;
                }
            }
            if let Some(cut) = reset_point(shared, Direction::ToUpstream, up_bytes, forward.len()) {
                let _ = (&upstream).write_all(&forward[..cut]);
                reset(&client);
                reset(&upstream);
                return;
            }
            up_bytes += forward.len() as u64;
            if (&upstream).write_all(&forward).is_err() {
                break;
            }
            if rate(Direction::ToUpstream).is_some() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if upstream_ready {
            let limit = rate(Direction::ToClient).map_or(CHUNK, |r| (r / 10).clamp(1, CHUNK));
            let n = match (&upstream).read(&mut buf[..limit]) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(cut) = reset_point(shared, Direction::ToClient, down_bytes, n) {
                let _ = (&client).write_all(&buf[..cut]);
                reset(&client);
                reset(&upstream);
                return;
            }
            down_bytes += n as u64;
            if (&client).write_all(&buf[..n]).is_err() {
                break;
            }
            if rate(Direction::ToClient).is_some() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = upstream.shutdown(Shutdown::Both);
}

fn set_recv_buffer(socket: &impl AsRawFd, bytes: libc::c_int) {
    // SAFETY: a valid socket descriptor and a c_int option value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &bytes as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt(SO_RCVBUF): {}",
        std::io::Error::last_os_error()
    );
}

/// A frozen endpoint's side of a connection: accepted, never read, never answered.
fn hold(client: &TcpStream, shared: &Shared) {
    while !shared.stopped() && shared.fault() == Fault::Stall {
        std::thread::sleep(Duration::from_millis(POLL_MS as u64));
    }
    let _ = client.shutdown(Shutdown::Both);
}

enum Verdict {
    Forward,
    Answer503,
}

/// Runs client-to-upstream bytes through the HTTP request tracker, appending what should be
/// forwarded to `out` (a corrupted byte flipped in place).
fn feed(request: &mut Request, mut data: &mut [u8], shared: &Shared, out: &mut Vec<u8>) -> Verdict {
    while !data.is_empty() {
        match request {
            Request::Raw => {
                out.extend_from_slice(data);
                return Verdict::Forward;
            }
            Request::Head(head) => {
                head.extend_from_slice(data);
                if !looks_like_http(head) {
                    out.extend_from_slice(head);
                    *request = Request::Raw;
                    return Verdict::Forward;
                }
                let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                    return Verdict::Forward;
                };
                let mut rest = head.split_off(end + 4);
                let text = String::from_utf8_lossy(head).to_ascii_lowercase();
                shared
                    .heads
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(text.clone());
                let header = |name: &str| {
                    text.lines()
                        .filter_map(|l| l.split_once(':'))
                        .find(|(k, _)| k.trim() == name)
                        .map(|(_, v)| v.trim().to_string())
                };
                let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
                let length: u64 = header("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let expects_continue = header("expect").is_some_and(|v| v.contains("100-continue"));
                let refuse = shared.take(|f| match f {
                    Fault::Unavailable { requests } if *requests > 0 => {
                        *requests -= 1;
                        true
                    }
                    _ => false,
                });
                if refuse {
                    if expects_continue || length == 0 {
                        return Verdict::Answer503;
                    }
                    *request = Request::Refused { left: length };
                } else {
                    let corrupt = !chunked
                        && shared.take(|f| match f {
                            Fault::CorruptUpload { min_body, times }
                                if *times > 0 && length >= *min_body && length > 0 =>
                            {
                                *times -= 1;
                                true
                            }
                            _ => false,
                        });
                    out.extend_from_slice(head);
                    *request = if chunked {
                        Request::Raw
                    } else {
                        Request::Body {
                            left: length,
                            flip_in: corrupt.then_some(length / 2),
                        }
                    };
                }
                if rest.is_empty() {
                    if let Request::Body { left: 0, .. } = request {
                        *request = Request::Head(Vec::new());
                    }
                    if let Request::Refused { left: 0 } = request {
                        return Verdict::Answer503;
                    }
                    return Verdict::Forward;
                }
                // Feed what followed the headers through the new state.
                let verdict = feed_owned(request, &mut rest, shared, out);
                return verdict;
            }
            Request::Body { left, flip_in } => {
                let n = (*left).min(data.len() as u64) as usize;
                let (body, after) = std::mem::take(&mut data).split_at_mut(n);
                if let Some(at) = *flip_in {
                    if at < n as u64 {
                        body[at as usize] ^= 0x20;
                        *flip_in = None;
                    } else {
                        *flip_in = Some(at - n as u64);
                    }
                }
                out.extend_from_slice(body);
                *left -= n as u64;
                if *left == 0 {
                    *request = Request::Head(Vec::new());
                }
                data = after;
            }
            Request::Refused { left } => {
                let n = (*left).min(data.len() as u64) as usize;
                *left -= n as u64;
                if *left == 0 {
                    return Verdict::Answer503;
                }
                data = &mut std::mem::take(&mut data)[n..];
            }
        }
    }
    Verdict::Forward
}

fn feed_owned(
    request: &mut Request,
    rest: &mut Vec<u8>,
    shared: &Shared,
    out: &mut Vec<u8>,
) -> Verdict {
    feed(request, rest.as_mut_slice(), shared, out)
}

/// Whether a connection's first bytes are an HTTP request line (`GET /`, `PUT /`, ...).
fn looks_like_http(head: &[u8]) -> bool {
    let method_len = head.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if method_len == head.len() {
        // Not enough bytes yet to tell; an empty or all-caps prefix may still be HTTP.
        return head.len() < 8;
    }
    (3..=7).contains(&method_len) && head[method_len] == b' '
}

/// If a reset is due within the next `n` bytes in `direction` (after `so_far`), how many of
/// them still go through first.
fn reset_point(shared: &Shared, direction: Direction, so_far: u64, n: usize) -> Option<usize> {
    let end = so_far + n as u64;
    let mut cut = 0;
    let due = shared.take(|f| match f {
        Fault::ResetAfter {
            direction: d,
            after,
            times,
        } if *d == direction && *times > 0 && end >= *after && so_far < *after => {
            *times -= 1;
            cut = (*after - so_far) as usize;
            true
        }
        _ => false,
    });
    due.then_some(cut)
}

/// Closes `stream` with a TCP RST (SO_LINGER 0) instead of a FIN.
fn reset(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized `linger` value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    // The caller drops the stream next; closing with linger 0 sends the RST.
}

/// Waits up to `POLL_MS` for either side to be readable (or closed). `None` on error.
fn poll_readable(a: &TcpStream, b: &TcpStream) -> Option<(bool, bool)> {
    let mut fds = [
        libc::pollfd {
            fd: a.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: two valid pollfd entries that outlive the call.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, POLL_MS) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        return (err.kind() == ErrorKind::Interrupted).then_some((false, false));
    }
    let ready =
        |fd: &libc::pollfd| fd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
    Some((ready(&fds[0]), ready(&fds[1])))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that answers every request with `200 OK`, serving connections one after
    /// another until none arrives for a second; returns the request bodies it saw.
    fn echo_server() -> (u16, JoinHandle<Vec<Vec<u8>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let handle = std::thread::spawn(move || {
            let mut bodies = Vec::new();
            let mut idle = 0;
            while idle < 50 {
                let Ok((s, _)) = listener.accept() else {
                    idle += 1;
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                idle = 0;
                serve_echo(s, &mut bodies);
            }
            bodies
        });
        (port, handle)
    }

    fn serve_echo(mut s: TcpStream, bodies: &mut Vec<Vec<u8>>) {
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            while buf.len() < end + 4 + len {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            bodies.push(buf[end + 4..end + 4 + len].to_vec());
            buf.drain(..end + 4 + len);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        }
    }

    fn request(body: &[u8]) -> Vec<u8> {
        let mut r = format!(
            "PUT /b/k HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    }

    fn response(s: &mut TcpStream) -> String {
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn corrupts_one_byte_of_a_large_body_only() {
        let (port, server) = echo_server();
        let proxy = FaultProxy::start(
            port,
            Fault::CorruptUpload {
                min_body: 1000,
                times: 1,
            },
        );
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
        let small = vec![b'a'; 10];
        let large = vec![b'b'; 5000];
        for body in [&small, &large, &large] {
            s.write_all(&request(body)).unwrap();
            assert!(response(&mut s).starts_with("HTTP/1.1 200"));
        }
        drop(s);
        let bodies = server.join().unwrap();
        assert_eq!(bodies[0], small);
        assert_ne!(bodies[1], large);
        assert_eq!(bodies[1].len(), large.len());
        let diff = bodies[1].iter().zip(&large).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 1);
        assert_eq!(bodies[2], large, "only `times` bodies are corrupted");
        assert_eq!(proxy.injected(), 1);
    }

    #[test]
    fn answers_503_then_forwards() {
        let (port, server) = echo_server();
        let proxy = FaultProxy::start(port, Fault::Unavailable { requests: 1 });
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
        s.write_all(&request(b"hello")).unwrap();
        assert!(response(&mut s).starts_with("HTTP/1.1 503"));
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
        s.write_all(&request(b"hello")).unwrap();
        assert!(response(&mut s).starts_with("HTTP/1.1 200"));
        drop(s);
        assert_eq!(server.join().unwrap(), vec![b"hello".to_vec()]);
        assert_eq!(proxy.injected(), 1);
    }

    #[test]
    fn resets_after_n_bytes_and_stalls() {
        let (port, _server) = echo_server();
        let proxy = FaultProxy::start(
            port,
            Fault::ResetAfter {
                direction: Direction::ToUpstream,
                after: 100,
                times: 1,
            },
        );
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
        let _ = s.write_all(&request(&[b'c'; 1000]));
        let mut buf = [0u8; 16];
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let err = s.read(&mut buf);
        assert!(
            matches!(&err, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "{err:?}"
        );
        assert_eq!(proxy.injected(), 1);

        proxy.set(Fault::Stall);
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
        s.write_all(&request(b"x")).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let err = s.read(&mut buf).unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{err:?}"
        );
    }
}
