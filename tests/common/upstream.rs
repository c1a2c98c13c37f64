//! A small HTTP/1.1 upstream service on threads of the test process (no
//! fork), on TCP or a unix socket, for the proxy tests. Keep-alive, and:
//!
//! - any path: 200, a JSON echo of the method, target and headers;
//! - `/big/N`: N bytes, chunked;
//! - `POST /count`: the request body's length (Content-Length or chunked);
//! - `/slow/MS`: answers after MS milliseconds;
//! - `/reset`: closes the connection without an answer;
//! - `/ws`: `101 Switching Protocols`, then echoes every byte back;
//! - `/health`: an empty answer with the status `health_status` holds
//!   (200 at first), counted in `checks`, not in `requests`;
//! - `?cc=VALUE&vary=NAMES` on the echo: its `Cache-Control` (else
//!   `no-store`) and `Vary`; the echo's `n` counts the requests so far.
//!
//! It counts the connections it accepted and the requests it answered.

use super::*;
use std::os::unix::net::UnixListener;

pub struct Upstream {
    pub port: u16,
    /// The unix socket path, for `Upstream::unix`.
    pub path: Option<PathBuf>,
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    pub requests: Arc<std::sync::atomic::AtomicUsize>,
    pub health_status: Arc<std::sync::atomic::AtomicU16>,
    pub checks: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<AtomicBool>,
    /// Every connection it accepted, to shut when it is dropped.
    open: Open,
}

/// The connections open now, by a number of their own.
type Open = Arc<std::sync::Mutex<(u64, std::collections::HashMap<u64, Box<dyn Conn>>)>>;

/// Takes a connection off the open ones when its thread ends.
struct Opened(Open, u64);

impl Drop for Opened {
    fn drop(&mut self) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .remove(&self.1);
    }
}

trait Conn: Read + Write + Send {
    fn reader(&self) -> std::io::Result<Box<dyn Read + Send>>;
    fn copy(&self) -> std::io::Result<Box<dyn Conn>>;
    fn shut(&self);
}
impl Conn for TcpStream {
    fn reader(&self) -> std::io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn copy(&self) -> std::io::Result<Box<dyn Conn>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shut(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}
impl Conn for std::os::unix::net::UnixStream {
    fn reader(&self) -> std::io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn copy(&self) -> std::io::Result<Box<dyn Conn>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shut(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl Upstream {
    pub fn tcp() -> Upstream {
        Upstream::tcp_on(0)
    }

    /// On a given port (0: any free one), as a server that comes back on
    /// its address does.
    pub fn tcp_on(port: u16) -> Upstream {
        let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
        l.set_nonblocking(true).unwrap();
        let u = Upstream::new(l.local_addr().unwrap().port(), None);
        u.accept_loop(move || {
            let (s, _) = l.accept()?;
            s.set_nonblocking(false)?;
            let _ = s.set_nodelay(true);
            Ok(Box::new(s))
        });
        u
    }

    pub fn unix(path: PathBuf) -> Upstream {
        let l = UnixListener::bind(&path).unwrap();
        l.set_nonblocking(true).unwrap();
        let u = Upstream::new(0, Some(path));
        u.accept_loop(move || {
            let (s, _) = l.accept()?;
            s.set_nonblocking(false)?;
            Ok(Box::new(s))
        });
        u
    }

    /// Accepts (without blocking) until dropped, a thread a connection.
    fn accept_loop(
        &self,
        mut accept: impl FnMut() -> std::io::Result<Box<dyn Conn>> + Send + 'static,
    ) {
        let (stop, c, r, open) = (
            self.stop.clone(),
            self.connections.clone(),
            self.requests.clone(),
            self.open.clone(),
        );
        let health = (self.health_status.clone(), self.checks.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match accept() {
                    Ok(s) => {
                        let Ok(copy) = s.copy() else { continue };
                        let id = {
                            let mut o = open.lock().unwrap();
                            // A server stopped meanwhile: this one too.
                            if stop.load(Ordering::Relaxed) {
                                copy.shut();
                            }
                            o.0 += 1;
                            let id = o.0;
                            o.1.insert(id, copy);
                            id
                        };
                        serve(
                            s,
                            c.clone(),
                            r.clone(),
                            Opened(open.clone(), id),
                            health.clone(),
                        )
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
    }

    fn new(port: u16, path: Option<PathBuf>) -> Upstream {
        Upstream {
            port,
            path,
            connections: Arc::default(),
            requests: Arc::default(),
            health_status: Arc::new(std::sync::atomic::AtomicU16::new(200)),
            checks: Arc::default(),
            stop: Arc::new(AtomicBool::new(false)),
            open: Arc::default(),
        }
    }

    /// What a route's `upstream` key says for this one.
    pub fn url(&self) -> String {
        match &self.path {
            Some(p) => format!("unix:{}", p.display()),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }
}

/// Stopped as a server process that exits: no more connections
/// accepted (the listener closes with its thread), and every open one shut.
impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for c in self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .values()
        {
            c.shut();
        }
    }
}

fn serve(
    s: Box<dyn Conn>,
    conns: Arc<std::sync::atomic::AtomicUsize>,
    reqs: Arc<std::sync::atomic::AtomicUsize>,
    opened: Opened,
    health: (
        Arc<std::sync::atomic::AtomicU16>,
        Arc<std::sync::atomic::AtomicUsize>,
    ),
) {
    conns.fetch_add(1, Ordering::Relaxed);
    std::thread::spawn(move || {
        let _opened = opened;
        let Ok(reader) = s.reader() else { return };
        let mut r = BufReader::new(reader);
        let mut w = s;
        // Bounded: a connection serves at most this many requests.
        for _ in 0..100_000 {
            let Some((method, target, headers)) = read_head(&mut r) else {
                return;
            };
            if target == "/health" {
                health.1.fetch_add(1, Ordering::Relaxed);
                let status = health.0.load(Ordering::Relaxed);
                let head = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
                if w.write_all(head.as_bytes()).is_err() {
                    return;
                }
                continue;
            }
            reqs.fetch_add(1, Ordering::Relaxed);
            let header = |n: &str| {
                headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(n))
                    .map(|(_, v)| v.clone())
            };
            let body_len = read_body(&mut r, &header);
            let close = header("connection").is_some_and(|c| c.eq_ignore_ascii_case("close"));
            let path = target.split('?').next().unwrap_or("").to_owned();
            if path == "/reset" {
                return;
            }
            if path == "/ws" {
                let _ = w.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                );
                let mut buf = [0u8; 4096];
                loop {
                    match r.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if w.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
            if let Some(ms) = path.strip_prefix("/slow/") {
                std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
            }
            // ?cc=CACHE-CONTROL&vary=NAMES, %-escapes for '=', ',' and '"'.
            let query = |k: &str| {
                target.split_once('?').and_then(|(_, q)| {
                    q.split('&').find_map(|kv| {
                        let (a, b) = kv.split_once('=')?;
                        (a == k).then(|| {
                            b.replace("%3D", "=")
                                .replace("%2C", ",")
                                .replace("%22", "\"")
                                .replace('+', " ")
                        })
                    })
                })
            };
            let cache_control = query("cc").unwrap_or_else(|| "no-store".into());
            let vary = query("vary")
                .map(|v| format!("Vary: {v}\r\n"))
                .unwrap_or_default();
            let ok = if let Some(n) = path.strip_prefix("/big/") {
                big(&mut w, n.parse().unwrap_or(0))
            } else {
                let body = if path == "/count" {
                    serde_json::json!({ "bytes": body_len }).to_string()
                } else {
                    serde_json::json!({
                        "method": method,
                        "target": target,
                        "headers": headers,
                        "body_bytes": body_len,
                        "n": reqs.load(Ordering::Relaxed),
                    })
                    .to_string()
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nKeep-Alive: timeout=60\r\nX-Upstream: yes\r\nCache-Control: {cache_control}\r\n{vary}\r\n",
                    body.len()
                );
                w.write_all(head.as_bytes())
                    .and_then(|_| w.write_all(body.as_bytes()))
                    .is_ok()
            };
            if !ok || close {
                return;
            }
        }
    });
}

fn big(w: &mut Box<dyn Conn>, n: u64) -> bool {
    if w
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let chunk = vec![b'x'; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk.len() as u64) as usize;
        if w.write_all(format!("{k:x}\r\n").as_bytes()).is_err()
            || w.write_all(&chunk[..k]).is_err()
            || w.write_all(b"\r\n").is_err()
        {
            return false;
        }
        left -= k as u64;
    }
    w.write_all(b"0\r\n\r\n").is_ok()
}

type Head = (String, String, Vec<(String, String)>);

fn read_head(r: &mut impl BufRead) -> Option<Head> {
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next()?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).ok()? == 0 {
            return None;
        }
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':')?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    Some((method, target, headers))
}

/// Reads and discards the body; its length.
fn read_body(r: &mut impl BufRead, header: &dyn Fn(&str) -> Option<String>) -> u64 {
    let mut sink = vec![0u8; 64 * 1024];
    if let Some(n) = header("content-length").and_then(|v| v.parse::<u64>().ok()) {
        let mut left = n;
        while left > 0 {
            let k = left.min(sink.len() as u64) as usize;
            if r.read_exact(&mut sink[..k]).is_err() {
                return n - left;
            }
            left -= k as u64;
        }
        return n;
    }
    if !header("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        return 0;
    }
    let mut total = 0;
    loop {
        let mut size = String::new();
        if r.read_line(&mut size).unwrap_or(0) == 0 {
            return total;
        }
        let n = u64::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16).unwrap_or(0);
        if n == 0 {
            let mut end = String::new();
            let _ = r.read_line(&mut end);
            return total;
        }
        let mut left = n;
        while left > 0 {
            let k = left.min(sink.len() as u64) as usize;
            if r.read_exact(&mut sink[..k]).is_err() {
                return total;
            }
            left -= k as u64;
        }
        total += n;
        let mut crlf = String::new();
        let _ = r.read_line(&mut crlf);
    }
}
