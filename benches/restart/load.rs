//! The load generator: `clients` threads, each a closed loop of HTTP/1.1 `GET /` on loopback,
//! recording every request's start, latency and outcome. Bounded: it stops when told to, or after
//! its maximum run time whatever happens.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::procs;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// A whole request, however the server dribbles its reply.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Samples kept per client thread at most (a bound on memory; ~16 bytes each).
const MAX_SAMPLES: usize = 4_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A new connection per request (`Connection: close`).
    Close,
    /// One connection per client, reused until the server closes it.
    KeepAlive,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Close => "close",
            Mode::KeepAlive => "keepalive",
        }
    }
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    /// Connection refused: nothing listening.
    Refused,
    ConnectTimeout,
    /// Reset or broken pipe.
    Reset,
    /// No complete reply within the I/O timeout.
    Timeout,
    /// The server closed before a complete reply.
    Eof,
    /// A reply, but not 200.
    Status(u16),
    BadReply,
    Other,
}

impl Failure {
    pub fn name(self) -> String {
        match self {
            Failure::Refused => "connection refused".into(),
            Failure::ConnectTimeout => "connect timeout".into(),
            Failure::Reset => "connection reset".into(),
            Failure::Timeout => "reply timeout".into(),
            Failure::Eof => "closed before a reply".into(),
            Failure::Status(code) => format!("status {code}"),
            Failure::BadReply => "malformed reply".into(),
            Failure::Other => "other error".into(),
        }
    }

    fn of(e: &io::Error, connecting: bool) -> Failure {
        use io::ErrorKind::*;
        match e.kind() {
            ConnectionRefused => Failure::Refused,
            TimedOut | WouldBlock if connecting => Failure::ConnectTimeout,
            TimedOut | WouldBlock => Failure::Timeout,
            ConnectionReset | ConnectionAborted | BrokenPipe => Failure::Reset,
            UnexpectedEof => Failure::Eof,
            _ => Failure::Other,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// When the request started, in µs since the run's epoch.
    pub start_us: u64,
    pub latency_us: u32,
    pub failure: Option<Failure>,
    /// A reused keep-alive connection was closed under the request before any reply byte, and the
    /// request was sent again on a new connection, as HTTP clients do for idempotent requests
    /// (RFC 9110 section 9.2.2). Counted, not hidden.
    pub retried: bool,
}

impl Sample {
    pub fn end_us(&self) -> u64 {
        self.start_us + self.latency_us as u64
    }
}

pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    threads: Vec<JoinHandle<Vec<Sample>>>,
}

impl Load {
    pub fn start(
        addr: SocketAddr,
        clients: usize,
        mode: Mode,
        epoch: Instant,
        max_run: Duration,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok) = (Arc::clone(&stop), Arc::clone(&ok));
                std::thread::spawn(move || {
                    let mut client = Client::new(addr, mode);
                    let mut samples = Vec::with_capacity(100_000);
                    let started = Instant::now();
                    while !stop.load(Ordering::Relaxed)
                        && !procs::interrupted()
                        && started.elapsed() < max_run
                        && samples.len() < MAX_SAMPLES
                    {
                        let start = Instant::now();
                        let (result, retried) = client.request();
                        let latency = start.elapsed();
                        if result.is_ok() {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        samples.push(Sample {
                            start_us: start.duration_since(epoch).as_micros() as u64,
                            latency_us: latency.as_micros().min(u32::MAX as u128) as u32,
                            failure: result.err(),
                            retried,
                        });
                        if result.is_err() {
                            // A failing target (refused, say) answers at once: do not spin.
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                    samples
                })
            })
            .collect();
        Load { stop, ok, threads }
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests succeeded, so that every phase really carries load.
    pub fn wait_more(&self, n: u64, timeout: Duration) -> anyhow::Result<()> {
        let target = self.ok() + n;
        procs::wait_for("requests to succeed under load", timeout, || {
            Ok((self.ok() >= target).then_some(()))
        })
    }

    pub fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.threads.drain(..) {
            all.extend(t.join().unwrap_or_default());
        }
        all.sort_by_key(|s| s.start_us);
        all
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One simulated client: a minimal HTTP/1.1 client that reads replies by `Content-Length`.
pub struct Client {
    addr: SocketAddr,
    mode: Mode,
    conn: Option<TcpStream>,
    buf: Vec<u8>,
}

/// A failed attempt, and whether any byte of a reply had arrived.
struct Failed {
    failure: Failure,
    replied: bool,
}

impl Client {
    pub fn new(addr: SocketAddr, mode: Mode) -> Client {
        Client {
            addr,
            mode,
            conn: None,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Sends one `GET /`; Ok when the reply is a complete 200. The flag says it was retried.
    pub fn request(&mut self) -> (Result<(), Failure>, bool) {
        let reused = self.conn.is_some();
        match self.attempt() {
            Ok(()) => (Ok(()), false),
            Err(f)
                if reused && !f.replied && matches!(f.failure, Failure::Eof | Failure::Reset) =>
            {
                self.conn = None;
                (self.attempt().map_err(|f| f.failure), true)
            }
            Err(f) => (Err(f.failure), false),
        }
    }

    fn attempt(&mut self) -> Result<(), Failed> {
        let result = self.exchange();
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    fn exchange(&mut self) -> Result<(), Failed> {
        let fail = |failure, replied| Failed { failure, replied };
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => {
                let conn = TcpStream::connect_timeout(&self.addr, CONNECT_TIMEOUT)
                    .map_err(|e| fail(Failure::of(&e, true), false))?;
                let _ = conn.set_nodelay(true);
                let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
                let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
                conn
            }
        };
        let request: &[u8] = match self.mode {
            Mode::Close => b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n",
            Mode::KeepAlive => b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n",
        };
        conn.write_all(request)
            .map_err(|e| fail(Failure::of(&e, false), false))?;

        self.buf.clear();
        let mut chunk = [0u8; 4096];
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let head_len = loop {
            if Instant::now() > deadline {
                return Err(fail(Failure::Timeout, !self.buf.is_empty()));
            }
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                break end + 4;
            }
            let replied = !self.buf.is_empty();
            match conn.read(&mut chunk) {
                Ok(0) => return Err(fail(Failure::Eof, replied)),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(fail(Failure::of(&e, false), replied)),
            }
            if self.buf.len() > 64 * 1024 {
                return Err(fail(Failure::BadReply, true));
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_len]).into_owned();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| fail(Failure::BadReply, true))?;
        let mut length = None;
        let mut close = self.mode == Mode::Close;
        for line in head.lines().skip(1) {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("connection") {
                close |= value.eq_ignore_ascii_case("close");
            }
        }
        // Without a length the body runs to the end of the connection.
        let length = match length {
            Some(l) => l,
            None => {
                close = true;
                usize::MAX
            }
        };
        let mut body = self.buf.len() - head_len;
        while body < length {
            if Instant::now() > deadline {
                return Err(fail(Failure::Timeout, true));
            }
            match conn.read(&mut chunk) {
                Ok(0) if length == usize::MAX => break,
                Ok(0) => return Err(fail(Failure::Eof, true)),
                Ok(n) => body += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(fail(Failure::of(&e, true), true)),
            }
        }
        if close {
            // Wait for the server's FIN before closing, so that the server (not this client, with
            // its limited ephemeral ports) holds the TIME_WAIT.
            let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
            let until = Instant::now() + Duration::from_secs(1);
            while Instant::now() < until && matches!(conn.read(&mut chunk), Ok(n) if n > 0) {}
        } else {
            self.conn = Some(conn);
        }
        if status != 200 {
            return Err(fail(Failure::Status(status), true));
        }
        Ok(())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One `GET /` on a new connection: is the target answering?
pub fn probe(addr: SocketAddr) -> bool {
    Client::new(addr, Mode::Close).request().0.is_ok()
}

/// Waits until `addr` answers a `GET /` with 200.
pub fn wait_answering(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    procs::wait_for(&format!("{addr} to answer"), timeout, || {
        Ok(probe(addr).then_some(()))
    })
}
