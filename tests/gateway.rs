//! The gateway never mis-frames, mis-blames or lets through what a
//! black-box review found: a strict upstream of the test's own logs every
//! byte it receives and answers with exactly the bytes a case needs (a
//! `Content-Length` beside chunked coding, two lengths, a length longer or
//! shorter than the body, `gzip, chunked`, a body on 204 and 304, an
//! HTTP/1.0 answer), and a strict client reads each answer by its framing
//! and the next pipelined one after it. Also: the exact head limit however
//! the bytes arrive, `Host` validation, client faults that are not the
//! upstream's, cached answers ended by a write, and a repeated header
//! that keys a policy.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// An upstream that answers each request with the raw bytes `answer`
/// gives for its target (and whether to close after them), and keeps
/// every byte it received.
struct Strict {
    port: u16,
    received: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
}

type Answer = fn(&str) -> (Vec<u8>, bool);

impl Strict {
    fn start(answer: Answer) -> Strict {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => {
                        let r = r.clone();
                        std::thread::spawn(move || serve_strict(c, &r, answer));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Strict {
            port,
            received,
            stop,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn received(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().unwrap()).into_owned()
    }
}

impl Drop for Strict {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads requests (head, then a Content-Length or chunked body) and
/// answers each; every byte read is logged.
fn serve_strict(c: TcpStream, log: &Mutex<Vec<u8>>, answer: Answer) {
    c.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut w = c.try_clone().unwrap();
    let mut r = BufReader::new(c);
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = Vec::new();
            if r.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
                return;
            }
            let end = line == b"\r\n";
            head.extend_from_slice(&line);
            if end {
                break;
            }
        }
        log.lock().unwrap().extend_from_slice(&head);
        let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let target = text.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let length = text
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        if text.contains("transfer-encoding: chunked") {
            loop {
                let mut size = Vec::new();
                if r.read_until(b'\n', &mut size).unwrap_or(0) == 0 {
                    return;
                }
                log.lock().unwrap().extend_from_slice(&size);
                let n = usize::from_str_radix(String::from_utf8_lossy(&size).trim(), 16);
                let Ok(n) = n else { return };
                let mut data = vec![0; n + 2];
                if r.read_exact(&mut data).is_err() {
                    return;
                }
                log.lock().unwrap().extend_from_slice(&data);
                if n == 0 {
                    break;
                }
            }
        } else if let Some(n) = length {
            let mut body = vec![0; n];
            if r.read_exact(&mut body).is_err() {
                return;
            }
            log.lock().unwrap().extend_from_slice(&body);
        }
        let (bytes, close) = answer(&target);
        if w.write_all(&bytes).is_err() || close {
            let _ = w.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}

/// One answer as a strict client reads it: by its own framing.
#[derive(Debug)]
struct Framed {
    version: String,
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Framed {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response: no body for 1xx, 204, 304 and HEAD; chunked if so
/// framed; else Content-Length; else to the end of the connection.
fn read_framed(r: &mut BufReader<TcpStream>, head_only: bool) -> std::io::Result<Framed> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let mut parts = line.split_whitespace();
    let version = parts.next().unwrap_or("").to_owned();
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').ok_or_else(|| bad(h.to_owned()))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let get = |n: &str| headers.iter().filter(|(k, _)| k == n).count();
    if get("content-length") > 1 || (get("content-length") > 0 && get("transfer-encoding") > 0) {
        return Err(bad(format!("mis-framed: {headers:?}")));
    }
    let mut body = Vec::new();
    let no_body = head_only || status < 200 || status == 204 || status == 304;
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let length = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map(|(_, v)| v.parse::<usize>().map_err(|_| bad(v.clone())))
        .transpose()?;
    if no_body {
    } else if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim(), 16).map_err(|_| bad(size.clone()))?;
            let mut data = vec![0; n + 2];
            r.read_exact(&mut data)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&data[..n]);
        }
    } else if let Some(n) = length {
        body = vec![0; n];
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok(Framed {
        version,
        status,
        headers,
        body,
    })
}

fn connect(port: u16) -> BufReader<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    BufReader::new(s)
}

/// Sends `bytes` on a new connection and reads one answer.
fn exchange(port: u16, bytes: &[u8]) -> Framed {
    let mut c = connect(port);
    c.get_mut().write_all(bytes).unwrap();
    read_framed(&mut c, false).unwrap()
}

fn get_req(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: gw.test\r\n\r\n")
}

/// The upstream's answers, by the target's last segment.
fn answers(target: &str) -> (Vec<u8>, bool) {
    let last = target.rsplit('/').next().unwrap_or("");
    let last = last.split('?').next().unwrap_or("");
    let cc = "Cache-Control: max-age=60\r\n";
    let a = match last {
        "cl-te" => format!(
            "HTTP/1.1 200 OK\r\n{cc}Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        ),
        "two-cl" => format!("HTTP/1.1 200 OK\r\n{cc}Content-Length: 3\r\nContent-Length: 5\r\n\r\nhello"),
        "long-cl" => {
            return (
                format!("HTTP/1.1 200 OK\r\n{cc}Content-Length: 10\r\n\r\nhello").into_bytes(),
                true,
            )
        }
        "short-cl" => {
            return (
                format!("HTTP/1.1 200 OK\r\n{cc}Content-Length: 3\r\n\r\nhello").into_bytes(),
                true,
            )
        }
        "gzip-chunked" => format!(
            "HTTP/1.1 200 OK\r\n{cc}Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        ),
        "204" => {
            return (
                b"HTTP/1.1 204 No Content\r\nContent-Length: 4\r\n\r\njunk".to_vec(),
                true,
            )
        }
        "304" => {
            return (
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 4\r\n\r\njunk".to_vec(),
                true,
            )
        }
        "cl-list" => format!("HTTP/1.1 200 OK\r\n{cc}Content-Length: 5, 5\r\n\r\nhello"),
        "status-999" => "HTTP/1.1 999 Weird\r\nContent-Length: 2\r\n\r\nok".to_owned(),
        "bad-chunk" => {
            return (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
                    .to_vec(),
                true,
            )
        }
        "http10" => return (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi".to_vec(), true),
        "http10-eof" => return (b"HTTP/1.0 200 OK\r\n\r\nuntil the end".to_vec(), true),
        _ => "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_owned(),
    };
    (a.into_bytes(), false)
}

fn gateway(strict: &Strict) -> Forkd {
    Forkd::start(&format!(
        "workers = 2\n\
         [[route]]\nprefix = \"/plain\"\nupstream = \"{u}\"\nauth = \"none\"\n\
         [[route]]\nprefix = \"/cached\"\nupstream = \"{u}\"\nauth = \"none\"\ncache = true\n\
         policies = [\"g\"]\n\
         [rate_limit.policy.g]\nlimit = 1000000\nwindow = 60\nkey = \"client\"\n",
        u = strict.url()
    ))
}

/// Sends `GET path` and `GET /healthz` in one write on one connection:
/// the first answer as framed, and the proof that the second one starts
/// where the first ends.
fn pipelined(port: u16, path: &str) -> Framed {
    let mut c = connect(port);
    let both = format!("{}{}", get_req(path), get_req("/healthz"));
    c.get_mut().write_all(both.as_bytes()).unwrap();
    let first = read_framed(&mut c, false).unwrap_or_else(|e| panic!("{path}: {e}"));
    let second = read_framed(&mut c, false).unwrap_or_else(|e| panic!("{path}, then: {e}"));
    assert_eq!(second.status, 200, "{path}: the next answer: {second:?}");
    assert!(
        String::from_utf8_lossy(&second.body).contains("ok"),
        "{path}: the next answer is /healthz's: {second:?}"
    );
    first
}

#[test]
fn answers_are_framed_by_their_body_and_never_desync_the_client() {
    let strict = Strict::start(answers);
    let f = gateway(&strict);
    for prefix in ["/plain", "/cached"] {
        // Chunked wins over a Content-Length beside it: all five bytes,
        // framed as five, on the miss and (cached) on every later read.
        for round in 0..3 {
            let r = pipelined(f.port, &format!("{prefix}/cl-te"));
            assert_eq!(r.status, 200, "{prefix} round {round}: {r:?}");
            assert_eq!(r.body, b"hello", "{prefix} round {round}: {r:?}");
            assert_ne!(r.header("content-length"), Some("3"), "{r:?}");
        }
        // Two lengths, or a coding other than chunked: 502.
        for case in ["two-cl", "gzip-chunked"] {
            let r = pipelined(f.port, &format!("{prefix}/{case}"));
            assert_eq!(r.status, 502, "{prefix}/{case}: {r:?}");
            assert_eq!(
                r.header("content-type"),
                Some("application/problem+json"),
                "{r:?}"
            );
        }
        // A length shorter than the body: that many bytes, said so.
        for _ in 0..2 {
            let r = pipelined(f.port, &format!("{prefix}/short-cl"));
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(r.body, b"hel", "{r:?}");
        }
        // A Content-Length list of one value goes on as that value.
        let r = pipelined(f.port, &format!("{prefix}/cl-list"));
        assert_eq!((r.status, &r.body[..]), (200, &b"hello"[..]), "{r:?}");
        assert_eq!(r.header("content-length"), Some("5"), "{r:?}");
        // A status outside 100-599 is the upstream's failure.
        let r = pipelined(f.port, &format!("{prefix}/status-999"));
        assert_eq!(r.status, 502, "{r:?}");
        // A body on 204 and 304 never reaches the client.
        for case in ["204", "304"] {
            let r = pipelined(f.port, &format!("{prefix}/{case}"));
            assert_eq!(r.status.to_string(), case, "{r:?}");
            assert!(r.body.is_empty(), "{r:?}");
            if case == "204" {
                assert_eq!(r.header("content-length"), None, "{r:?}");
            }
        }
    }
    // A length longer than the body: on a plain route the client sees a
    // short body and a closed connection, never another answer's bytes;
    // a cached route cannot fill, so it answers 502.
    let mut c = connect(f.port);
    c.get_mut()
        .write_all(get_req("/plain/long-cl").as_bytes())
        .unwrap();
    assert!(read_framed(&mut c, false).is_err());
    let r = pipelined(f.port, "/cached/long-cl");
    assert_eq!(r.status, 502, "{r:?}");
    // A failed fill is answered like any of the route's answers: with its
    // rate-limit headers.
    assert!(r.header("ratelimit").is_some(), "{r:?}");
    assert!(r.header("ratelimit-policy").is_some(), "{r:?}");
}

#[test]
fn an_http_1_0_upstream_leaves_the_client_on_http_1_1_keep_alive() {
    let strict = Strict::start(answers);
    let f = gateway(&strict);
    let mut c = connect(f.port);
    for _ in 0..3 {
        for (path, body) in [
            ("/plain/http10", "hi"),
            ("/plain/http10-eof", "until the end"),
        ] {
            c.get_mut().write_all(get_req(path).as_bytes()).unwrap();
            let r = read_framed(&mut c, false).unwrap();
            assert_eq!(r.version, "HTTP/1.1", "{r:?}");
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(r.body, body.as_bytes(), "{r:?}");
            assert_ne!(r.header("connection"), Some("close"), "{r:?}");
        }
    }
}

/// A head of exactly `size` bytes for `GET /healthz`.
fn head_of(size: usize) -> Vec<u8> {
    let start = "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ";
    let end = "\r\n\r\n";
    let pad = size - start.len() - end.len();
    format!("{start}{}{end}", "a".repeat(pad)).into_bytes()
}

/// The status of one request whose head is written whole or a byte a
/// write.
fn status_of(port: u16, head: &[u8], bytewise: bool) -> u16 {
    let mut c = connect(port);
    c.get_mut().set_nodelay(true).unwrap();
    if bytewise {
        for b in head {
            if c.get_mut().write_all(&[*b]).is_err() {
                break;
            }
        }
    } else {
        let _ = c.get_mut().write_all(head);
    }
    read_framed(&mut c, false)
        .map(|r| r.status)
        .unwrap_or_else(|e| panic!("no answer to a {}-byte head: {e}", head.len()))
}

#[test]
fn the_head_limit_holds_exactly_however_the_head_arrives() {
    // The default limit, 32 KiB: hyper's reads grow past it in steps
    // that do not land on it, which is how a 40,000-byte head in one
    // write used to pass.
    let f = Forkd::start("workers = 1\n");
    for bytewise in [false, true] {
        for (size, want) in [(32_768, 200), (32_769, 431), (40_000, 431), (50_000, 431)] {
            let got = status_of(f.port, &head_of(size), bytewise);
            assert_eq!(got, want, "{size} bytes, a byte a write: {bytewise}");
        }
    }
}

#[test]
fn host_must_be_one_valid_authority() {
    let strict = Strict::start(answers);
    let f = gateway(&strict);
    let cases = [
        ("Host: a.test\r\nHost: b.test\r\n", "HTTP/1.1", 400),
        ("", "HTTP/1.1", 400),
        ("Host: evil.example/x y\r\n", "HTTP/1.1", 400),
        ("Host: a@evil.example\r\n", "HTTP/1.1", 400),
        ("Host: a.test:80x\r\n", "HTTP/1.1", 400),
        ("Host: evil.example,good.example\r\n", "HTTP/1.1", 400),
        ("", "HTTP/1.0", 200),
        ("Host: a.test:8080\r\n", "HTTP/1.1", 200),
    ];
    for (hosts, version, want) in cases {
        let mut c = connect(f.port);
        let req = format!("GET /plain/x-{want} {version}\r\n{hosts}Connection: close\r\n\r\n");
        c.get_mut().write_all(req.as_bytes()).unwrap();
        let r = read_framed(&mut c, false).unwrap();
        assert_eq!(r.status, want, "{hosts:?} {version}: {r:?}");
    }
    // The refused ones never reached the upstream.
    let seen = strict.received();
    assert!(!seen.contains("x-400"), "{seen}");
    assert_eq!(seen.matches("x-200").count(), 2, "{seen}");
}

#[test]
fn a_repeated_header_that_keys_a_policy_is_refused() {
    let strict = Strict::start(answers);
    let f = Forkd::start(&format!(
        "workers = 1\n\
         [rate_limit.policy.per-key]\nlimit = 1\nwindow = 600\nkey = \"header:X-Api-Key\"\n\
         [[route]]\nprefix = \"/keyed\"\nupstream = \"{}\"\nauth = \"none\"\npolicies = [\"per-key\"]\n",
        strict.url()
    ));
    let send = |keys: &[&str]| {
        let h: Vec<(&str, &str)> = keys.iter().map(|k| ("X-Api-Key", *k)).collect();
        request(f.port, "GET", "/keyed/x", &h, b"").unwrap()
    };
    assert_eq!(send(&["spent"]).status, 200);
    assert_eq!(send(&["spent"]).status, 429);
    for keys in [&["fresh", "spent"][..], &["fresh,spent"][..]] {
        let r = send(keys);
        assert_eq!(r.status, 400, "{keys:?}: {r:?}");
    }
    let r = send(&["fresh", "spent"]);
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert!(
        r.body.contains("X-Api-Key") || r.body.contains("x-api-key"),
        "{r:?}"
    );
    assert_eq!(send(&["fresh"]).status, 200);
}

fn counter(port: u16, name: &str) -> f64 {
    let m = parse_exposition(&get(port, "/metrics").unwrap().body);
    m.get(&format!("{name}{{}}")).copied().unwrap_or(0.0)
}

#[test]
fn a_client_s_broken_body_is_the_client_s_fault_not_the_upstream_s() {
    let strict = Strict::start(answers);
    let f = gateway(&strict);
    let failures = "forkd_upstream_failures_total";
    let aborts = "forkd_client_aborts_total";
    // A chunk size that is not hex: 400, not 502.
    let r = exchange(
        f.port,
        b"POST /plain/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    // A body coding other than chunked alone: 501, never sent upstream
    // as unlabelled gzip bytes.
    let r = exchange(
        f.port,
        b"POST /plain/gz HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    assert_eq!(r.status, 501, "{r:?}");
    assert!(!strict.received().contains("/plain/gz"));
    // A client that only half-closes reads a 499 with its name.
    let mut c = connect(f.port);
    c.get_mut()
        .write_all(b"POST /plain/half HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123")
        .unwrap();
    c.get_mut().shutdown(std::net::Shutdown::Write).unwrap();
    let mut line = String::new();
    c.read_line(&mut line).unwrap();
    assert_eq!(line.trim_end(), "HTTP/1.1 499 Client Closed Request");
    assert_eq!(counter(f.port, failures), 0.0);
    // A client that goes away after 1,000 of 100,000 bytes.
    let mut c = connect(f.port);
    c.get_mut()
        .write_all(b"POST /plain/x HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n")
        .unwrap();
    c.get_mut().write_all(&[b'a'; 1000]).unwrap();
    poll(PATIENCE, || {
        let seen = strict.received().to_ascii_lowercase();
        seen.contains("content-length: 100000").then_some(())
    })
    .expect("the request went upstream");
    drop(c);
    poll(PATIENCE, || (counter(f.port, aborts) >= 2.0).then_some(()))
        .expect("the client's going away is counted as such");
    assert_eq!(counter(f.port, failures), 0.0);
    // And the upstream's own failure after its head is counted as its.
    let mut c = connect(f.port);
    c.get_mut()
        .write_all(get_req("/plain/bad-chunk").as_bytes())
        .unwrap();
    let _ = read_framed(&mut c, false);
    poll(PATIENCE, || {
        (counter(f.port, failures) >= 1.0).then_some(())
    })
    .expect("a body that breaks off is the upstream's failure");
}

#[test]
fn a_successful_write_ends_the_cached_answers_of_its_url() {
    let api = Upstream::tcp();
    let f = Forkd::start(&format!(
        "workers = 2\n\
         [[route]]\nprefix = \"/api\"\nupstream = \"{}\"\nauth = \"none\"\ncache = true\n",
        api.url()
    ));
    let url = "/api/item?cc=max-age%3D600";
    let n = |r: &Response| r.json()["n"].as_u64().unwrap();
    let first = get(f.port, url).unwrap();
    assert_eq!(first.header("x-cache"), Some("miss"));
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let hit = poll(PATIENCE, || {
            let r = get(f.port, url).unwrap();
            (r.header("x-cache") == Some("hit")).then_some(r)
        })
        .expect("a hit");
        let w = request(f.port, method, url, &[], b"x").unwrap();
        assert_eq!(w.status, 200, "{method}: {w:?}");
        // The old answer is gone from the worker that took the write at
        // once, and from the other as soon as Redis' invalidation reaches
        // its near cache.
        let after = poll(PATIENCE, || {
            let r = get(f.port, url).unwrap();
            (r.header("x-cache") == Some("miss")).then_some(r)
        })
        .unwrap_or_else(|| panic!("after {method}: still a hit"));
        assert!(n(&after) > n(&hit), "after {method}: a new answer");
    }
    // A write on another host leaves this host's answers: the target URI
    // includes its authority.
    let _ = poll(PATIENCE, || {
        let r = get(f.port, url).unwrap();
        (r.header("x-cache") == Some("hit")).then_some(r)
    })
    .expect("a hit");
    let other = raw(
        f.port,
        &format!("POST {url} HTTP/1.1\r\nHost: other.test\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx"),
    )
    .unwrap();
    assert_eq!(other.status, 200);
    assert_eq!(get(f.port, url).unwrap().header("x-cache"), Some("hit"));
    // A write to another URL leaves this one cached.
    let _ = poll(PATIENCE, || {
        let r = get(f.port, url).unwrap();
        (r.header("x-cache") == Some("hit")).then_some(r)
    })
    .expect("a hit");
    let w = request(f.port, "POST", "/api/other", &[], b"x").unwrap();
    assert_eq!(w.status, 200);
    assert_eq!(get(f.port, url).unwrap().header("x-cache"), Some("hit"));
}
