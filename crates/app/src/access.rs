//! The access log: one line per answered request, "combined" or JSON, to
//! standard output or `access_log_file`.
//!
//! Handlers never wait on the log: a line is appended to a buffer in
//! memory, and a thread of the worker's own writes the buffer out every
//! 100 ms (or sooner when it fills), so a slow disk or a busy journald
//! cannot stall the event loop. Past [`MAX_BUFFER`] lines are dropped, and
//! counted. A line never holds a token, a password, the Authorization
//! header or the query string.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

/// `access_log`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessFormat {
    Combined,
    Json,
}

/// Where and how a worker logs requests.
#[derive(Debug, Clone)]
pub struct AccessSettings {
    pub format: AccessFormat,
    /// None: standard output.
    pub file: Option<PathBuf>,
}

/// What one line says.
pub(crate) struct Line<'a> {
    pub client: IpAddr,
    pub method: &'a str,
    pub path: &'a str,
    pub version: &'a str,
    pub status: u16,
    /// None when the body's length is not known ahead.
    pub bytes: Option<u64>,
    pub duration: Duration,
    pub slot: usize,
    pub pid: u32,
    pub request_id: &'a str,
    pub user: Option<&'a str>,
    pub referer: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    /// The route that answered: a built-in's name or a route's prefix.
    pub route: &'a str,
    /// The route's upstream, when it has one.
    pub upstream: Option<&'a str>,
    /// When the upstream was asked: its status (None: no answer), and how
    /// long it took.
    pub upstream_answer: Option<(Option<u16>, Duration)>,
}

/// Lines waiting for the writer thread beyond this are dropped.
const MAX_BUFFER: usize = 8 << 20;
/// The writer thread is woken early once this much waits.
const WAKE_AT: usize = 64 << 10;
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Writes to a pipe or socket (journald) stay within PIPE_BUF and end at a
/// line's end, so that workers sharing it never interleave inside a line.
const PIPE_CHUNK: usize = 4096;

/// Which route answered and what its upstream did, put in the response's
/// extensions by the proxy for the metrics and the access log.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Routed {
    /// What `/metrics` counts it under.
    pub(crate) label: usize,
    /// The route's place in the configuration (None for `/profile`).
    pub(crate) index: Option<usize>,
    /// When the upstream (or built-in responder) was asked: its status,
    /// None when it gave no answer, and how long it took.
    pub(crate) upstream: Option<(Option<u16>, Duration)>,
    /// Which of the route's servers was asked last (None before any).
    pub(crate) server: Option<usize>,
}

#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    closing: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    reopen: AtomicBool,
    dropped: AtomicU64,
}

pub(crate) struct AccessLog {
    format: AccessFormat,
    shared: Arc<Shared>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

enum Sink {
    Stdout,
    File(std::fs::File),
}

fn open(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

impl AccessLog {
    /// Opens the file (if any) and starts the writer thread.
    ///
    /// # Errors
    /// The file cannot be opened, or the thread cannot be started.
    pub(crate) fn start(settings: &AccessSettings) -> Result<Self, String> {
        let sink = match &settings.file {
            Some(p) => Sink::File(
                open(p).map_err(|e| format!("cannot open access_log_file {}: {e}", p.display()))?,
            ),
            None => Sink::Stdout,
        };
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            reopen: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        });
        let file = settings.file.clone();
        let theirs = shared.clone();
        let writer = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_out(&theirs, sink, file))
            .map_err(|e| format!("cannot start the access log thread: {e}"))?;
        Ok(AccessLog {
            format: settings.format,
            shared,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Formats and queues one line; false when it was dropped.
    pub(crate) fn log(&self, line: &Line<'_>) -> bool {
        let mut text = String::with_capacity(256);
        match self.format {
            AccessFormat::Combined => combined(&mut text, line),
            AccessFormat::Json => json(&mut text, line),
        }
        text.push('\n');
        let mut p = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if p.buf.len() + text.len() > MAX_BUFFER {
            self.shared.dropped.fetch_add(1, Relaxed);
            return false;
        }
        p.buf.extend_from_slice(text.as_bytes());
        if p.buf.len() >= WAKE_AT {
            self.shared.wake.notify_one();
        }
        true
    }

    /// Reopens the file on the writer thread's next round (SIGUSR1).
    pub(crate) fn reopen(&self) {
        self.shared.reopen.store(true, Relaxed);
        self.shared.wake.notify_one();
    }

    /// Lines dropped because the writer could not keep up.
    pub(crate) fn dropped(&self) -> u64 {
        self.shared.dropped.load(Relaxed)
    }

    /// Writes out what waits, then ends the writer thread (the worker is
    /// exiting).
    pub(crate) fn finish(&self) {
        {
            let mut p = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            p.closing = true;
        }
        self.shared.wake.notify_one();
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = writer {
            let _ = w.join();
        }
    }
}

/// The writer thread: waits for lines, writes them, reopens on request.
fn write_out(shared: &Shared, mut sink: Sink, file: Option<PathBuf>) {
    loop {
        let (buf, closing) = {
            let p = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
            let (mut p, _) = shared
                .wake
                .wait_timeout_while(p, FLUSH_EVERY, |p| {
                    !p.closing && p.buf.len() < WAKE_AT && !shared.reopen.load(Relaxed)
                })
                .unwrap_or_else(|e| e.into_inner());
            (std::mem::take(&mut p.buf), p.closing)
        };
        if !buf.is_empty() {
            if let Err(e) = write_all(&mut sink, &buf) {
                log::warn!("access log: cannot write: {e}");
            }
        }
        if shared.reopen.swap(false, Relaxed) {
            if let Some(path) = &file {
                match open(path) {
                    Ok(f) => sink = Sink::File(f),
                    Err(e) => log::error!("access log: cannot reopen {}: {e}", path.display()),
                }
            }
        }
        if closing {
            return;
        }
    }
}

fn write_all(sink: &mut Sink, buf: &[u8]) -> std::io::Result<()> {
    match sink {
        Sink::File(f) => f.write_all(buf),
        Sink::Stdout => {
            let mut out = std::io::stdout().lock();
            let mut rest = buf;
            while !rest.is_empty() {
                let mut end = rest.len().min(PIPE_CHUNK);
                if end < rest.len() {
                    // Back to the last line end inside the chunk; a single
                    // line longer than a chunk goes whole.
                    end = rest[..end].iter().rposition(|&b| b == b'\n').map_or_else(
                        || {
                            rest.iter()
                                .position(|&b| b == b'\n')
                                .map_or(rest.len(), |i| i + 1)
                        },
                        |i| i + 1,
                    );
                }
                out.write_all(&rest[..end])?;
                out.flush()?;
                rest = &rest[end..];
            }
            Ok(())
        }
    }
}

/// `client - user [time] "METHOD path VERSION" status bytes "referer"
/// "agent" rt=SECONDS slot=N pid=N rid=ID route=ROUTE ua=UPSTREAM
/// us=STATUS urt=SECONDS` (nginx's `$upstream_addr`, `$upstream_status`
/// and `$upstream_response_time`; `-` where there is none).
fn combined(out: &mut String, l: &Line<'_>) {
    let _ = write!(out, "{} - ", l.client);
    quoted_or_dash(out, l.user, false);
    out.push_str(" [");
    clf_time(out, SystemTime::now());
    out.push_str("] \"");
    escape_clf(out, l.method);
    out.push(' ');
    escape_clf(out, l.path);
    out.push(' ');
    out.push_str(l.version);
    let _ = write!(out, "\" {} ", l.status);
    or_none(out, l.bytes, "-");
    out.push(' ');
    quoted_or_dash(out, l.referer, true);
    out.push(' ');
    quoted_or_dash(out, l.user_agent, true);
    let _ = write!(
        out,
        " rt={:.6} slot={} pid={} rid={} route=",
        l.duration.as_secs_f64(),
        l.slot,
        l.pid,
        l.request_id
    );
    escape_clf(out, l.route);
    out.push_str(" ua=");
    quoted_or_dash(out, l.upstream, false);
    out.push_str(" us=");
    or_none(out, l.upstream_answer.and_then(|a| a.0), "-");
    out.push_str(" urt=");
    let secs = l
        .upstream_answer
        .map(|a| format!("{:.6}", a.1.as_secs_f64()));
    or_none(out, secs, "-");
}

/// `v`, or `none` (`-` in a combined line, `null` in JSON).
fn or_none(out: &mut String, v: Option<impl std::fmt::Display>, none: &str) {
    match v {
        Some(v) => {
            let _ = write!(out, "{v}");
        }
        None => out.push_str(none),
    }
}

fn quoted_or_dash(out: &mut String, v: Option<&str>, quoted: bool) {
    match v {
        Some(v) if quoted => {
            out.push('"');
            escape_clf(out, v);
            out.push('"');
        }
        Some(v) => escape_clf(out, v),
        None if quoted => out.push_str("\"-\""),
        None => out.push('-'),
    }
}

/// As nginx does: `"`, `\` and bytes outside printable ASCII as `\xHH`.
fn escape_clf(out: &mut String, v: &str) {
    for b in v.bytes() {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(b as char);
        }
    }
}

fn json(out: &mut String, l: &Line<'_>) {
    out.push_str("{\"time\":\"");
    rfc3339(out, SystemTime::now());
    out.push_str("\",\"client\":\"");
    let _ = write!(out, "{}", l.client);
    out.push_str("\",\"method\":");
    json_str(out, l.method);
    out.push_str(",\"path\":");
    json_str(out, l.path);
    out.push_str(",\"version\":");
    json_str(out, l.version);
    let _ = write!(out, ",\"status\":{},\"bytes\":", l.status);
    or_none(out, l.bytes, "null");
    let _ = write!(
        out,
        ",\"duration_ms\":{:.3},\"slot\":{},\"pid\":{},\"request_id\":",
        l.duration.as_secs_f64() * 1000.0,
        l.slot,
        l.pid
    );
    json_str(out, l.request_id);
    for (key, v) in [
        ("user", l.user),
        ("referer", l.referer),
        ("user_agent", l.user_agent),
        ("route", Some(l.route)),
        ("upstream", l.upstream),
    ] {
        let _ = write!(out, ",\"{key}\":");
        match v {
            Some(v) => json_str(out, v),
            None => out.push_str("null"),
        }
    }
    out.push_str(",\"upstream_status\":");
    or_none(out, l.upstream_answer.and_then(|a| a.0), "null");
    out.push_str(",\"upstream_ms\":");
    let ms = l
        .upstream_answer
        .map(|a| format!("{:.3}", a.1.as_secs_f64() * 1000.0));
    or_none(out, ms, "null");
    out.push('}');
}

fn json_str(out: &mut String, v: &str) {
    out.push_str(&serde_json::to_string(v).expect("a string always serializes"));
}

/// The time in UTC, as `format` (jiff's strftime) has it.
fn utc(out: &mut String, t: SystemTime, format: &str) {
    let t = jiff::Timestamp::try_from(t).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    let _ = write!(out, "{}", t.strftime(format));
}

fn rfc3339(out: &mut String, t: SystemTime) {
    utc(out, t, "%Y-%m-%dT%H:%M:%S%.3fZ");
}

fn clf_time(out: &mut String, t: SystemTime) {
    utc(out, t, "%d/%b/%Y:%H:%M:%S +0000");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn line<'a>() -> Line<'a> {
        Line {
            client: "127.0.0.9".parse().unwrap(),
            method: "GET",
            path: "/a\"b",
            version: "HTTP/1.1",
            status: 200,
            bytes: Some(15),
            duration: Duration::from_micros(1500),
            slot: 1,
            pid: 42,
            request_id: "r-1",
            user: Some("alice"),
            referer: None,
            user_agent: Some("curl/8\n"),
            route: "/api",
            upstream: Some("http://127.0.0.1:9000"),
            upstream_answer: Some((Some(201), Duration::from_micros(1200))),
        }
    }

    #[test]
    fn dates_are_civil_utc() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
        let mut s = String::new();
        rfc3339(&mut s, t);
        assert_eq!(s, "2026-11-18T11:06:40.123Z");
        let mut s = String::new();
        clf_time(&mut s, UNIX_EPOCH + Duration::from_secs(951_782_400));
        assert_eq!(s, "29/Feb/2000:00:00:00 +0000");
    }

    #[test]
    fn lines_escape_what_the_client_sent() {
        let mut c = String::new();
        combined(&mut c, &line());
        assert!(c.starts_with("127.0.0.9 - alice ["), "{c}");
        assert!(
            c.contains("\"GET /a\\x22b HTTP/1.1\" 200 15 \"-\" \"curl/8\\x0A\""),
            "{c}"
        );
        assert!(
            c.ends_with(
                " rt=0.001500 slot=1 pid=42 rid=r-1 route=/api ua=http://127.0.0.1:9000 us=201 urt=0.001200"
            ),
            "{c}"
        );
        let none = Line {
            route: "healthz",
            upstream: None,
            upstream_answer: None,
            ..line()
        };
        let mut c = String::new();
        combined(&mut c, &none);
        assert!(c.ends_with(" route=healthz ua=- us=- urt=-"), "{c}");
        let mut j = String::new();
        json(&mut j, &line());
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["path"], "/a\"b");
        assert_eq!(v["user_agent"], "curl/8\n");
        assert_eq!(v["status"], 200);
        assert_eq!(v["request_id"], "r-1");
        assert_eq!(v["referer"], serde_json::Value::Null);
        assert_eq!(v["route"], "/api");
        assert_eq!(v["upstream"], "http://127.0.0.1:9000");
        assert_eq!(v["upstream_status"], 201);
        assert_eq!(v["upstream_ms"], 1.2);
    }
}
