//! The control socket: a unix stream socket (mode 0600) in the runtime
//! directory, one JSON request line in, JSON lines out. The CLI's client
//! side is here too, so both ends share one definition of the protocol.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::plan::ReloadOutcome;
use crate::scoreboard::WorkerState;

/// A CLI request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Status,
    /// Graceful stop; `timeout` (seconds) overrides `shutdown_timeout`.
    Stop {
        timeout: Option<f64>,
    },
    Reload,
    Scale {
        workers: usize,
    },
    /// Execute the binary on disk in place and replace the workers.
    Upgrade,
}

/// How an upgrade ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpgradeOutcome {
    pub ok: bool,
    pub from_build: String,
    pub to_build: String,
    /// (slot, old pid, new pid) for every replaced worker.
    pub replaced: Vec<(usize, i32, i32)>,
    pub error: Option<String>,
}

/// One worker in a status report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub slot: usize,
    pub pid: i32,
    pub generation: u64,
    pub state: String,
    pub uptime_ms: u64,
    pub requests: u64,
    pub rss_bytes: u64,
    pub restarts: u64,
    pub heartbeat_age_ms: u64,
    /// Which Redis the worker uses (mode and nodes), as it reports it.
    pub redis: String,
    #[serde(default)]
    pub in_flight: u64,
    #[serde(default)]
    pub connections: u64,
    /// Logins waiting for a password check.
    #[serde(default)]
    pub hash_queue: u64,
    /// The oldest request in flight, if any.
    #[serde(default)]
    pub oldest: Option<OldestRequest>,
    /// Why the slot's previous worker was replaced, if it was.
    #[serde(default)]
    pub last_replaced: Option<String>,
    /// The worker's answers so far by duration, one count per bound of
    /// [`Status::latency_bounds`], then those slower than every bound (not
    /// cumulative).
    #[serde(default)]
    pub latency_buckets: Vec<u64>,
}

/// A worker's oldest request in flight, in a status report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OldestRequest {
    pub what: String,
    pub request_id: String,
    pub age_ms: u64,
}

/// The listening sockets' accept queue, in a status report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptQueue {
    /// Connections waiting to be accepted, summed over the sockets.
    pub queued: u64,
    pub backlog: u64,
}

/// A status report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub instance: String,
    pub pid: i32,
    pub version: String,
    /// Identifies the binary file the supervisor runs.
    pub build: String,
    pub listen: String,
    pub listener: String,
    pub generation: u64,
    pub phase: String,
    pub uptime_ms: u64,
    pub workers_wanted: usize,
    pub workers_ready: usize,
    pub rss_bytes: u64,
    pub workers: Vec<WorkerStatus>,
    /// Slots waiting out a crash backoff: (slot, milliseconds left).
    pub backoff: Vec<(usize, u64)>,
    /// The managed redis-server, when forkd runs one.
    pub redis: Option<RedisStatus>,
    #[serde(default)]
    pub accept_queue: AcceptQueue,
    /// Workers recycled so far, by reason (max_requests, max_rss, max_age).
    #[serde(default)]
    pub recycled: std::collections::BTreeMap<String, u64>,
    /// The slot being recycled now, and why.
    #[serde(default)]
    pub recycling: Option<(usize, String)>,
    /// The TLS certificates that new workers serve.
    #[serde(default)]
    pub certificates: Vec<CertificateStatus>,
    /// Each listener, as bound, and what it speaks.
    #[serde(default)]
    pub listeners: Vec<ListenerStatus>,
    /// The routes new workers serve.
    #[serde(default)]
    pub routes: Vec<RouteStatus>,
    /// Where the configuration in use came from: the file, and the
    /// environment variables and flags over it.
    #[serde(default)]
    pub config_source: String,
    /// The configuration in use, as `forkd check-config` prints it
    /// (secrets masked).
    #[serde(default)]
    pub config: String,
    /// The upper bounds (seconds) of the workers' `latency_buckets`.
    #[serde(default)]
    pub latency_bounds: Vec<f64>,
}

/// A listener in a status report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub address: String,
    /// `http` or `https`.
    pub scheme: String,
    pub redirect_https: bool,
    pub proxy_protocol: bool,
}

/// A route in a status report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteStatus {
    pub prefix: String,
    pub upstream: String,
    /// `required`, `optional` or `none`.
    pub auth: String,
    pub cache: bool,
    pub policies: Vec<String>,
}

/// A TLS certificate in a status report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateStatus {
    pub file: String,
    pub subject: String,
    /// Hexadecimal.
    pub serial: String,
    /// Seconds since the epoch.
    pub not_before: i64,
    pub not_after: i64,
}

/// The managed redis-server in a status report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RedisStatus {
    /// None while it is being restarted.
    pub pid: Option<i32>,
    pub socket: String,
}

/// A reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "lowercase")]
pub enum Reply {
    Status(Box<Status>),
    /// A stop has begun; the connection closes when the supervisor exits.
    /// Workers drain for up to `drain_ms`.
    Stopping {
        pid: i32,
        drain_ms: u64,
    },
    Reload(ReloadOutcome),
    Upgrade(UpgradeOutcome),
    Scaled {
        workers: usize,
    },
    Error {
        message: String,
    },
}

impl WorkerState {
    pub(crate) fn name(self) -> &'static str {
        match self {
            WorkerState::Free => "exited",
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Draining => "draining",
        }
    }
}

/// Errors of the CLI side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("forkd is not running (no control socket at {0})")]
    NotRunning(String),
    #[error("control socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("control socket {path}: unexpected reply: {detail}")]
    Protocol { path: String, detail: String },
}

/// A connection to a running supervisor.
pub struct Client {
    path: String,
    reader: BufReader<UnixStream>,
}

impl Client {
    /// Connects to the control socket at `path`.
    ///
    /// # Errors
    /// [`ClientError::NotRunning`] when nothing listens there.
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let p = path.display().to_string();
        let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning(p.clone())
            }
            _ => ClientError::Io {
                path: p.clone(),
                source: e,
            },
        })?;
        Ok(Client {
            path: p,
            reader: BufReader::new(stream),
        })
    }

    fn io(&self, source: io::Error) -> ClientError {
        ClientError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Sends `req` and waits up to `timeout` for the reply.
    ///
    /// # Errors
    /// I/O failures, a timeout, or a reply that does not parse.
    pub fn request(&mut self, req: &Request, timeout: Duration) -> Result<Reply, ClientError> {
        let mut line = serde_json::to_string(req).expect("requests serialize");
        line.push('\n');
        let stream = self.reader.get_mut();
        stream
            .set_write_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| self.io(e))?;
        self.reader
            .get_mut()
            .write_all(line.as_bytes())
            .map_err(|e| self.io(e))?;
        self.read_reply(timeout)
    }

    fn read_reply(&mut self, timeout: Duration) -> Result<Reply, ClientError> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .map_err(|e| self.io(e))?;
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).map_err(|e| self.io(e))?;
        if n == 0 {
            return Err(ClientError::Protocol {
                path: self.path.clone(),
                detail: "connection closed".into(),
            });
        }
        serde_json::from_str(&line).map_err(|e| ClientError::Protocol {
            path: self.path.clone(),
            detail: e.to_string(),
        })
    }

    /// Waits up to `timeout` for the supervisor to close the connection,
    /// which it does when it exits. Returns whether it did.
    pub fn wait_closed(&mut self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = String::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            if self.reader.get_ref().set_read_timeout(Some(left)).is_err() {
                return true;
            }
            buf.clear();
            match self.reader.read_line(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }
}

/// The server side of one connection. Never blocks the supervisor: reads
/// and writes are non-blocking, replies wait in `out` until the socket
/// takes them, and a peer that stops reading is dropped once too much is
/// queued.
pub(crate) struct Conn {
    pub(crate) stream: UnixStream,
    buf: Vec<u8>,
    out: Vec<u8>,
    /// The peer has shut down its side (requests already read still count).
    eof: bool,
    /// What the request it sent waits for; it reads nothing more until then.
    pub(crate) awaiting: Option<Awaiting>,
}

/// What a control connection waits for after its request was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Awaiting {
    /// The outcome of a reload (sent by `reload_done`).
    Reload,
    /// The outcome of an upgrade; the connection crosses the `exec`.
    Upgrade,
    /// The supervisor's exit: the connection closes with it.
    Exit,
}

/// What reading a connection gave.
pub(crate) enum ReadResult {
    Pending,
    Request(Request),
    Invalid(String),
    Closed,
}

/// A request line longer than this is refused.
const MAX_REQUEST: usize = 64 * 1024;
/// Replies queued for a peer that does not read; past this it is dropped.
const MAX_QUEUED: usize = 4 << 20;

impl Conn {
    pub(crate) fn new(stream: UnixStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
            out: Vec::new(),
            eof: false,
            awaiting: None,
        })
    }

    /// The next request: reads what has arrived, then hands out complete
    /// lines one at a time (call again until it is not a request).
    pub(crate) fn read(&mut self) -> ReadResult {
        let mut chunk = [0u8; 4096];
        while !self.eof && self.buf.len() <= MAX_REQUEST {
            match io::Read::read(&mut self.stream, &mut chunk) {
                Ok(0) => self.eof = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return ReadResult::Closed,
            }
        }
        if self.awaiting.is_some() {
            return if self.eof {
                ReadResult::Closed
            } else {
                ReadResult::Pending
            };
        }
        let Some(end) = self.buf.iter().position(|&b| b == b'\n') else {
            if self.buf.len() > MAX_REQUEST {
                return ReadResult::Invalid("request too long".into());
            }
            // Nothing more will come: close once the replies are out.
            return if self.eof && self.out.is_empty() {
                ReadResult::Closed
            } else {
                ReadResult::Pending
            };
        };
        let line: Vec<u8> = self.buf.drain(..=end).collect();
        match serde_json::from_slice::<Request>(&line) {
            Ok(r) => ReadResult::Request(r),
            Err(e) => ReadResult::Invalid(format!("invalid request: {e}")),
        }
    }

    /// Queues one reply line and sends what the socket takes now.
    ///
    /// # Errors
    /// The peer is gone, or has let too much pile up unread.
    pub(crate) fn send(&mut self, reply: &Reply) -> io::Result<()> {
        let mut line = serde_json::to_vec(reply).expect("replies serialize");
        line.push(b'\n');
        self.out.extend_from_slice(&line);
        self.flush()?;
        if self.out.len() > MAX_QUEUED {
            return Err(io::Error::other("the peer does not read its replies"));
        }
        Ok(())
    }

    /// Sends what is queued, as far as the socket takes it.
    ///
    /// # Errors
    /// The peer is gone.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether there is anything to read for: not after the peer's end, nor
    /// while a request too long to take is buffered.
    pub(crate) fn wants_read(&self) -> bool {
        !self.eof && self.buf.len() <= MAX_REQUEST
    }

    /// Whether replies wait for the socket to take them.
    pub(crate) fn wants_write(&self) -> bool {
        !self.out.is_empty()
    }

    /// Whether the connection is beyond use: gone, or not reading.
    pub(crate) fn broken(&self) -> bool {
        self.out.len() > MAX_QUEUED
    }
}
