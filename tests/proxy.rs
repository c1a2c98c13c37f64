//! `[[route]]`: forkd in front of an upstream service (the harness's
//! `Upstream`, on TCP and on a unix socket): sessions checked here and the
//! identity passed on, spoofed headers removed, bodies streamed both ways
//! in bounded memory, upgrades tunnelled, 502 and 504, and routes changed
//! by a reload under load.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::time::Duration;

use common::*;
use serde_json::Value;

const PW: &str = "proxy-secret";

/// The headers the upstream saw, lower-cased, from its JSON echo.
fn seen(r: &Response) -> Vec<(String, String)> {
    let v = r.json();
    v["headers"]
        .as_array()
        .unwrap_or_else(|| panic!("no echo: {r:?}"))
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_ascii_lowercase(),
                p[1].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn all<'a>(h: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    h.iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

fn one<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    let v = all(h, name);
    assert!(v.len() <= 1, "{name} seen {} times: {v:?}", v.len());
    v.first().copied()
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

fn routes(api: &Upstream, unix: &Upstream) -> String {
    format!(
        "workers = 1\n\
         [[route]]\nprefix = \"/api\"\nupstream = \"{}\"\n\
         [[route]]\nprefix = \"/pub/\"\nupstream = \"{}\"\nauth = \"none\"\nstrip_prefix = true\n\
         [[route]]\nprefix = \"/opt\"\nupstream = \"{}\"\nauth = \"optional\"\n\
         [[route]]\nprefix = \"/sock\"\nupstream = \"{}\"\nauth = \"none\"\npass_authorization = true\n",
        api.url(),
        api.url(),
        api.url(),
        unix.url()
    )
}

#[test]
fn routes_pass_the_identity_and_never_a_spoofed_one() {
    let api = Upstream::tcp();
    let dir = tempfile::tempdir().unwrap();
    let unix = Upstream::unix(dir.path().join("app.sock"));
    let f = Forkd::start(&routes(&api, &unix));
    f.add_user("alice", PW);
    let t = token(f.port, "alice", PW);

    // Required: no token, a bad one, then a good one with spoofed headers.
    let before = api.requests.load(std::sync::atomic::Ordering::Relaxed);
    let r = request(f.port, "GET", "/api/items", &[], b"").unwrap();
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let bad = "Bearer AAAAAAAAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let r = request(f.port, "GET", "/api/items", &[("Authorization", bad)], b"").unwrap();
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(
        api.requests.load(std::sync::atomic::Ordering::Relaxed),
        before,
        "a refused request reached the upstream"
    );
    let r = request(
        f.port,
        "GET",
        "/api/items?page=2",
        &[
            ("Authorization", &bearer(&t)),
            ("X-Forkd-User", "admin"),
            ("x-forkd-role", "admin"),
            ("X-Forkd-Session", "forged"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-Host", "evil.example"),
            ("Forwarded", "for=6.6.6.6"),
            ("X-Request-Id", "proxy-test-1"),
            ("Connection", "close, X-Hop"),
            ("X-Hop", "secret"),
            // Read as X-Forkd-User and X-Forwarded-For by CGI-style servers.
            ("X_Forkd_User", "admin"),
            ("X-Forwarded_For", "6.6.6.6"),
        ],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let h = seen(&r);
    assert!(h.iter().all(|(k, _)| !k.contains('_')), "{h:?}");
    assert_eq!(r.json()["target"], "/api/items?page=2");
    assert_eq!(one(&h, "x-forkd-user"), Some("alice"));
    assert_eq!(one(&h, "x-forkd-role"), Some("user"));
    let session = one(&h, "x-forkd-session").unwrap();
    assert_eq!(session.len(), 32, "{session}");
    assert!(!t.contains(session) && session != "forged");
    assert_eq!(one(&h, "authorization"), None, "the token went upstream");
    assert_eq!(one(&h, "x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(one(&h, "x-forwarded-proto"), Some("http"));
    assert_eq!(one(&h, "x-forwarded-host"), Some("localhost"));
    assert_eq!(one(&h, "forwarded"), None);
    assert_eq!(one(&h, "host"), Some("localhost"));
    assert_eq!(one(&h, "x-request-id"), Some("proxy-test-1"));
    assert_eq!(r.header("x-request-id"), Some("proxy-test-1"));
    assert_eq!(
        one(&h, "x-hop"),
        None,
        "a header Connection names went upstream"
    );
    assert_eq!(one(&h, "connection"), None);
    // The upstream's answer, without its hop-by-hop headers.
    assert_eq!(r.header("x-upstream"), Some("yes"));
    assert_eq!(r.header("keep-alive"), None);

    // None, prefix stripped: identity headers removed, token dropped.
    let r = request(
        f.port,
        "POST",
        "/pub/form?x=1",
        &[("Authorization", &bearer(&t)), ("X-Forkd-User", "admin")],
        b"a=1&b=2",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let h = seen(&r);
    assert_eq!(r.json()["target"], "/form?x=1");
    assert_eq!(r.json()["method"], "POST");
    assert_eq!(r.json()["body_bytes"], 7);
    assert_eq!(one(&h, "x-forkd-user"), None);
    assert_eq!(one(&h, "authorization"), None);
    let r = request(f.port, "GET", "/pub", &[], b"").unwrap();
    assert_eq!(r.json()["target"], "/");

    // Optional: anonymous passes without identity, a token adds it, a bad
    // token is refused.
    let r = request(f.port, "GET", "/opt/x", &[("X-Forkd-User", "admin")], b"").unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(one(&seen(&r), "x-forkd-user"), None);
    let r = request(
        f.port,
        "GET",
        "/opt/x",
        &[("Authorization", &bearer(&t))],
        b"",
    )
    .unwrap();
    assert_eq!(one(&seen(&r), "x-forkd-user"), Some("alice"));
    let r = request(f.port, "GET", "/opt/x", &[("Authorization", bad)], b"").unwrap();
    assert_eq!(r.status, 401);

    // A unix socket upstream that asks for Authorization.
    let r = request(
        f.port,
        "GET",
        "/sock/y",
        &[("Authorization", "Basic dTpw")],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(one(&seen(&r), "authorization"), Some("Basic dTpw"));

    // Paths a prefix and an upstream could read differently are refused;
    // a prefix matches at a segment boundary only; built-ins stay.
    for p in ["/api/../admin", "/pub/%2e%2e/admin", "/api/a%2fb"] {
        let r = request(f.port, "GET", p, &[("Authorization", &bearer(&t))], b"").unwrap();
        assert_eq!(r.status, 400, "{p}: {r:?}");
        assert!(r.body.contains("request_id"), "{r:?}");
    }
    assert_eq!(
        request(f.port, "GET", "/apix", &[], b"").unwrap().status,
        404
    );
    assert_eq!(get(f.port, "/healthz").unwrap().status, 200);

    // Kept-alive connections to the upstream: 30 requests, a few
    // connections.
    let c0 = api.connections.load(std::sync::atomic::Ordering::Relaxed);
    for _ in 0..30 {
        assert_eq!(get(f.port, "/pub/k").unwrap().status, 200);
    }
    let opened = api.connections.load(std::sync::atomic::Ordering::Relaxed) - c0;
    assert!(opened <= 3, "{opened} upstream connections for 30 requests");
}

#[test]
fn upstream_failures_are_502_and_504_problems_and_counted() {
    let api = Upstream::tcp();
    let closed = free_port();
    let f = Forkd::start(&format!(
        "workers = 1\n\
         [[route]]\nprefix = \"/down\"\nupstream = \"http://127.0.0.1:{closed}\"\nauth = \"none\"\n\
         [[route]]\nprefix = \"/\"\nupstream = \"{}\"\nauth = \"none\"\ntimeout = 0.5\n",
        api.url()
    ));
    let r = get(f.port, "/down/x").unwrap();
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(r.json()["type"], "urn:forkd:problem:bad-gateway");
    let r = get(f.port, "/reset").unwrap();
    assert_eq!(r.status, 502, "{r:?}");
    let r = get(f.port, "/slow/3000").unwrap();
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(r.json()["type"], "urn:forkd:problem:gateway-timeout");
    // The catch-all route leaves forkd's own paths alone.
    assert_eq!(get(f.port, "/healthz").unwrap().status, 200);
    assert_eq!(get(f.port, "/anything").unwrap().status, 200);
    let m = parse_exposition(&get(f.port, "/metrics").unwrap().body);
    assert!(m["forkd_upstream_failures_total{}"] >= 2.0, "{m:?}");
    assert!(m["forkd_upstream_timeouts_total{}"] >= 1.0, "{m:?}");
    // An operator who sees a 502 or 504 finds its route, its upstream and
    // why in the log, at warn.
    let log = f.log_text();
    let line = |route: &str, upstream: &str, cause: &str| {
        log.lines().any(|l| {
            l.contains("WARN")
                && l.contains(&format!("route {route}: upstream {upstream} failed: "))
                && l.contains(cause)
        })
    };
    let down = format!("http://127.0.0.1:{closed}");
    for l in log.lines().filter(|l| l.contains("upstream")) {
        eprintln!("{l}");
    }
    assert!(line("/down", &down, "Connection refused"), "{log}");
    assert!(line("/", &api.url(), "route's timeout (500ms)"), "{log}");
}

/// A flood of upstream failures is one warning a second per route, with a
/// count of the lines held back, never one line per request.
#[test]
fn upstream_failure_warnings_are_rate_limited_with_a_count() {
    let closed = free_port();
    let f = Forkd::start(&format!(
        "workers = 1\n\
         [[route]]\nprefix = \"/down\"\nupstream = \"http://127.0.0.1:{closed}\"\nauth = \"none\"\n"
    ));
    for _ in 0..50 {
        assert_eq!(get(f.port, "/down/x").unwrap().status, 502);
    }
    let m = parse_exposition(&get(f.port, "/metrics").unwrap().body);
    assert_eq!(m["forkd_upstream_failures_total{}"], 50.0, "{m:?}");
    let lines = || {
        f.log_text()
            .lines()
            .filter(|l| l.contains("route /down: upstream"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let first = lines();
    assert!(!first.is_empty() && first.len() < 50, "{first:?}");
    // Past the gate's second, the next failure says how many were held.
    let counted = poll(PATIENCE, || {
        assert_eq!(get(f.port, "/down/x").unwrap().status, 502);
        let l = lines();
        l.iter()
            .any(|l| l.contains("more of this route's upstream failures since the last line"))
            .then_some(l)
    })
    .expect("a line with the count of those held back");
    assert!(counted.len() < 50, "{counted:?}");
}

/// The peak RSS of a process, KiB.
fn hwm_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_100_mib_download_and_upload_pass_with_flat_memory() {
    const SIZE: u64 = 100 * 1024 * 1024;
    let api = Upstream::tcp();
    let f = Forkd::start(&format!(
        "workers = 1\n[[route]]\nprefix = \"/\"\nupstream = \"{}\"\nauth = \"none\"\ntimeout = 60\n",
        api.url()
    ));
    let pid = f.wait_ready()[0];
    assert_eq!(get(f.port, "/warm").unwrap().status, 200);
    let before = hwm_kib(pid);

    // Download: read as it comes, count, keep nothing.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", f.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET /big/{SIZE} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    let mut chunked = false;
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        chunked |= line
            .to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked");
    }
    assert!(chunked, "expected a streamed (chunked) answer");
    let mut body = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let n = u64::from_str_radix(line.trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        let mut left = n;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            r.read_exact(&mut buf[..k]).unwrap();
            left -= k as u64;
        }
        body += n;
        line.clear();
        r.read_line(&mut line).unwrap();
    }
    assert_eq!(body, SIZE);
    let after_download = hwm_kib(pid);

    // Upload, chunked, 64 KiB at a time.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", f.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST /count HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .unwrap();
    let chunk = vec![b'u'; 64 * 1024];
    for _ in 0..SIZE / chunk.len() as u64 {
        write!(s, "{:x}\r\n", chunk.len()).unwrap();
        s.write_all(&chunk).unwrap();
        s.write_all(b"\r\n").unwrap();
    }
    s.write_all(b"0\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let json: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(json["bytes"], SIZE);
    let after_upload = hwm_kib(pid);
    eprintln!(
        "worker peak RSS: {before} KiB before, {after_download} KiB after 100 MiB down, {after_upload} KiB after 100 MiB up"
    );
    assert!(
        after_upload < before + 16 * 1024,
        "the worker's peak RSS grew from {before} to {after_upload} KiB"
    );
}

#[test]
fn an_upgrade_is_tunnelled_both_ways() {
    let api = Upstream::tcp();
    let f = Forkd::start(&format!(
        "workers = 1\n[[route]]\nprefix = \"/ws\"\nupstream = \"{}\"\nauth = \"none\"\n",
        api.url()
    ));
    // A switch the request did not ask for is the upstream's fault.
    let r = request(f.port, "GET", "/ws", &[], b"").unwrap();
    assert_eq!(r.status, 502, "{r:?}");

    let mut s = std::net::TcpStream::connect(("127.0.0.1", f.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut head = String::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        head.push_str(&line);
    }
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    // A masked WebSocket text frame ("hello"), twice: both come back.
    let frame = [
        0x81u8,
        0x85,
        1,
        2,
        3,
        4,
        b'h' ^ 1,
        b'e' ^ 2,
        b'l' ^ 3,
        b'l' ^ 4,
        b'o' ^ 1,
    ];
    for _ in 0..2 {
        s.write_all(&frame).unwrap();
        let mut back = [0u8; 11];
        r.read_exact(&mut back).unwrap();
        assert_eq!(back, frame);
    }
    // The tunnel still counts as an open connection (what spreading
    // connections over the workers compares): it and the scrape, 2.
    let open = || {
        let m = parse_exposition(&get(f.port, "/metrics").ok()?.body);
        m.iter()
            .find(|(k, _)| k.starts_with("forkd_worker_connections{"))
            .map(|(_, v)| *v)
    };
    poll(PATIENCE, || (open()? == 2.0).then_some(()))
        .unwrap_or_else(|| panic!("open connections: {:?}", open()));
}

#[test]
fn a_reload_changes_routes_under_load_with_zero_failures() {
    let (one_up, two_up) = (Upstream::tcp(), Upstream::tcp());
    let route = |prefix: &str, up: &Upstream| {
        format!(
            "[[route]]\nprefix = \"{prefix}\"\nupstream = \"{}\"\nauth = \"none\"\n",
            up.url()
        )
    };
    let f = Forkd::start(&format!("workers = 2\n{}", route("/a", &one_up)));
    assert_eq!(get(f.port, "/b/x").unwrap().status, 404);
    let load = Load::start(f.port, 4, "/a/x");
    wait_served(&f, 50);
    f.rewrite_config(&format!(
        "workers = 2\n{}{}",
        route("/a", &two_up),
        route("/b", &two_up)
    ));
    let out = f.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let served = two_up.requests.load(std::sync::atomic::Ordering::Relaxed);
    poll(PATIENCE, || {
        (two_up.requests.load(std::sync::atomic::Ordering::Relaxed) > served + 50).then_some(())
    })
    .expect("the new routes served no requests");
    let res = load.finish();
    assert_eq!(
        res.failed,
        0,
        "{:?}",
        &res.errors[..res.errors.len().min(5)]
    );
    assert!(res.ok > 100, "{res:?}");
    assert_eq!(get(f.port, "/b/x").unwrap().status, 200);

    // A bad route is refused by the reload; the old routes keep serving.
    f.rewrite_config(
        "workers = 2\n[[route]]\nprefix = \"/profile\"\nupstream = \"http://127.0.0.1:1\"\n",
    );
    let out = f.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("route[0].prefix"), "{err}");
    assert_eq!(get(f.port, "/b/x").unwrap().status, 200);
}

#[test]
fn a_bad_route_is_a_configuration_error() {
    for (route, key) in [
        (
            "prefix = \"api\"\nupstream = \"http://127.0.0.1:9\"",
            "route[0].prefix",
        ),
        (
            "prefix = \"/a/../b\"\nupstream = \"http://127.0.0.1:9\"",
            "route[0].prefix",
        ),
        (
            "prefix = \"/healthz\"\nupstream = \"http://127.0.0.1:9\"",
            "route[0].prefix",
        ),
        (
            "prefix = \"/a\"\nupstream = \"http://127.0.0.1\"",
            "route[0].upstream",
        ),
        (
            "prefix = \"/a\"\nupstream = \"ftp://x:1/p\"",
            "route[0].upstream",
        ),
        (
            "prefix = \"/a\"\nupstream = \"unix:rel.sock\"",
            "route[0].upstream",
        ),
        (
            "prefix = \"/a\"\nupstream = \"http://h:1\"\nauth = \"maybe\"",
            "auth",
        ),
        (
            "prefix = \"/a\"\nupstream = \"http://h:1\"\ntimeout = 0",
            "route[0].timeout",
        ),
        (
            "prefix = \"/a\"\nupstream = \"http://h:1\"\nbogus = 1",
            "bogus",
        ),
    ] {
        let f = Forkd::configure(&format!("[[route]]\n{route}\n"));
        let out = f.cli(&["check-config"]);
        assert_eq!(out.status.code(), Some(64), "{route}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{route}: {err}");
    }
    let f = Forkd::configure(
        "[[route]]\nprefix = \"/a\"\nupstream = \"http://h:1\"\n[[route]]\nprefix = \"/a/\"\nupstream = \"http://h:2\"\n",
    );
    let out = f.cli(&["check-config"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("route[1].prefix"));
    let f = Forkd::configure("[proxy]\nuser_header = \"Authorization\"\n");
    assert_eq!(f.cli(&["check-config"]).status.code(), Some(64));
    // A good one is printed back as forkd will use it.
    let f = Forkd::configure("[[route]]\nprefix = \"/api/\"\nupstream = \"unix:/run/app.sock\"\n");
    let out = f.cli(&["check-config"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("[[route]]") && text.contains("prefix = \"/api\""),
        "{text}"
    );
    assert!(text.contains("upstream = \"unix:/run/app.sock\""), "{text}");
}

/// Several policies on one route, one bucket per user and one per client,
/// exact over two forkd instances of two workers each sharing one Redis.
fn policies_hold_exactly_across_workers_and_instances(redis: &impl Backend) {
    let api = Upstream::tcp();
    let config = format!(
        "workers = 2\n\
         [rate_limit.policy.per-user]\nlimit = 5\nwindow = 600\nkey = \"user\"\n\
         [rate_limit.policy.per-client]\nlimit = 8\nwindow = 600\nkey = \"client\"\n\
         [rate_limit.policy.per-key]\nlimit = 2\nwindow = 600\nkey = \"header:X-Api-Key\"\n\
         [[route]]\nprefix = \"/api\"\nupstream = \"{}\"\npolicies = [\"per-user\", \"per-client\"]\n\
         [[route]]\nprefix = \"/keyed\"\nupstream = \"{}\"\nauth = \"none\"\npolicies = [\"per-key\"]\n",
        api.url(),
        api.url()
    );
    let a = Forkd::start_with_redis(redis, &config);
    let b = Forkd::start_with_redis(redis, &config);
    a.add_user("alice", PW);
    a.add_user("bob", PW);
    let (ta, tb) = (token(a.port, "alice", PW), token(b.port, "bob", PW));
    let ports = [a.port, b.port];
    let run = |t: &str, n: usize| -> (usize, Vec<Response>) {
        let mut ok = 0;
        let mut refused = Vec::new();
        for i in 0..n {
            let r = request_from(
                "127.0.0.2",
                ports[i % 2],
                "GET",
                "/api/x",
                &[("Authorization", &bearer(t))],
                b"",
            )
            .unwrap();
            match r.status {
                200 => ok += 1,
                429 => refused.push(r),
                _ => panic!("unexpected {r:?}"),
            }
        }
        (ok, refused)
    };
    let before = api.requests.load(std::sync::atomic::Ordering::Relaxed);
    let (ok, refused) = run(&ta, 9);
    assert_eq!(ok, 5, "alice: per-user allows 5");
    let r = &refused[0];
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert!(r.header("retry-after").is_some(), "{r:?}");
    assert_eq!(
        r.header("ratelimit-policy"),
        Some("\"per-user\";q=5;w=600, \"per-client\";q=8;w=600")
    );
    let state = r.header("ratelimit").unwrap();
    assert!(state.starts_with("\"per-user\";r=0;t="), "{state}");
    // The client's bucket took only alice's 5 allowed requests: bob, from
    // the same address, gets the 3 left.
    let (ok, _) = run(&tb, 6);
    assert_eq!(ok, 3, "bob: per-client has 3 left for this address");
    assert_eq!(
        api.requests.load(std::sync::atomic::Ordering::Relaxed) - before,
        8,
        "a refused request reached the upstream"
    );
    // From another address bob still has per-user places.
    let r = request_from(
        "127.0.0.3",
        a.port,
        "GET",
        "/api/x",
        &[("Authorization", &bearer(&tb))],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let state = r.header("ratelimit").unwrap();
    assert!(state.contains("\"per-client\";r=7;"), "{state}");

    // A header's value is the bucket: two keys, two places each.
    for key in ["k1", "k2"] {
        let codes: Vec<u16> = (0..3)
            .map(|i| {
                request(ports[i % 2], "GET", "/keyed/x", &[("X-Api-Key", key)], b"")
                    .unwrap()
                    .status
            })
            .collect();
        assert_eq!(codes, [200, 200, 429], "{key}");
    }

    // Forward-auth applies the policies of the route the original path is
    // under: alice is out of places there.
    let r = request(
        a.port,
        "GET",
        "/auth",
        &[
            ("Authorization", &bearer(&ta)),
            ("X-Original-URI", "/api/y"),
        ],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 429, "{r:?}");
    assert!(r.header("ratelimit-policy").is_some(), "{r:?}");

    // forkd limit: what is left, and a reset that gives alice her places.
    let text = |o: std::process::Output| {
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
        )
    };
    let (code, out) = text(a.cli(&["limit", "show", "per-user", "user:alice"]));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(": 0 left, whole again in"), "{out}");
    let (code, out) = text(a.cli(&["limit", "show", "per-client", "client:127.0.0.3"]));
    assert!(code == Some(0) && out.contains(": 7 left"), "{out}");
    let (code, out) = text(b.cli(&["limit", "reset", "per-user", "user:alice"]));
    assert!(code == Some(0) && out.contains("reset"), "{out}");
    let r = request_from(
        "127.0.0.4",
        a.port,
        "GET",
        "/api/x",
        &[("Authorization", &bearer(&ta))],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    for (args, says) in [
        (["limit", "show", "nope", "user:alice"], "no policy 'nope'"),
        (
            ["limit", "show", "per-key", "user:alice"],
            "not one of its buckets",
        ),
        (
            ["limit", "show", "per-user", "user:nobody"],
            "no user 'nobody'",
        ),
        (
            ["limit", "show", "per-client", "client:not-an-ip"],
            "not an IP address",
        ),
    ] {
        let (code, out) = text(a.cli(&args));
        assert_eq!(code, Some(1), "{args:?}: {out}");
        assert!(out.contains(says), "{args:?}: {out}");
    }
}

mod policies {
    use super::*;
    #[test]
    fn single_redis() {
        super::policies_hold_exactly_across_workers_and_instances(&RedisServer::start());
    }
    #[test]
    fn redis_cluster() {
        super::policies_hold_exactly_across_workers_and_instances(&RedisCluster::start());
    }
}

/// The `Set-Cookie` value's `NAME=VALUE`.
fn cookie_of(r: &Response) -> String {
    let c = r
        .header("set-cookie")
        .unwrap_or_else(|| panic!("no cookie: {r:?}"));
    c.split(';').next().unwrap().to_owned()
}

#[test]
fn cookie_sessions_for_browsers_with_a_csrf_check() {
    let api = Upstream::tcp();
    let f = Forkd::start(&format!(
        "workers = 1\n[auth]\ncookie = true\n\
         [[route]]\nprefix = \"/app\"\nupstream = \"{}\"\n",
        api.url()
    ));
    f.add_user("carol", PW);
    let r = login(f.port, "carol", PW);
    assert_eq!(r.status, 200, "{r:?}");
    let set = r.header("set-cookie").unwrap();
    for attr in ["HttpOnly", "SameSite=Lax", "Secure", "Path=/"] {
        assert!(set.contains(attr), "{attr} missing: {set}");
    }
    let cookie = cookie_of(&r);
    let token = r.json()["token"].as_str().unwrap().to_owned();
    assert_eq!(cookie, format!("forkd_session={token}"));

    // The cookie authenticates a GET on a route and /profile.
    let r = request(f.port, "GET", "/app/page", &[("Cookie", &cookie)], b"").unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(one(&seen(&r), "x-forkd-user"), Some("carol"));
    assert_eq!(
        one(&seen(&r), "cookie"),
        None,
        "the session cookie went upstream"
    );
    let r = request(
        f.port,
        "GET",
        "/app/page",
        &[("Cookie", &format!("theme=dark; {cookie}"))],
        b"",
    )
    .unwrap();
    assert_eq!(one(&seen(&r), "cookie"), Some("theme=dark"));
    assert_eq!(profile_with(f.port, &[("Cookie", &cookie)]).status, 200);

    // An unsafe method by cookie: cross-site refused, same site allowed.
    let post = |headers: &[(&str, &str)]| {
        let mut h = vec![("Cookie", cookie.as_str())];
        h.extend_from_slice(headers);
        request(f.port, "POST", "/app/form", &h, b"x=1").unwrap()
    };
    let before = api.requests.load(std::sync::atomic::Ordering::Relaxed);
    for bad in [
        vec![("Origin", "http://evil.example")],
        vec![("Referer", "http://evil.example/page")],
        vec![],
    ] {
        let r = post(&bad);
        assert_eq!(r.status, 403, "{bad:?}: {r:?}");
        assert_eq!(r.json()["type"], "urn:forkd:problem:cross-site-request");
    }
    assert_eq!(
        api.requests.load(std::sync::atomic::Ordering::Relaxed),
        before
    );
    assert_eq!(post(&[("Origin", "http://localhost")]).status, 200);
    assert_eq!(post(&[("Referer", "http://localhost/form")]).status, 200);
    assert_eq!(post(&[("X-Requested-With", "fetch")]).status, 200);
    // A bearer token needs no such check.
    let r = request(
        f.port,
        "POST",
        "/app/form",
        &[
            ("Authorization", &bearer(&token)),
            ("Origin", "http://evil.example"),
        ],
        b"x=1",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");

    // A WebSocket handshake by cookie is a GET, checked as an unsafe
    // method is (a sibling subdomain is the same site for SameSite=Lax).
    let ws = |origin: &str| {
        let h = [
            ("Cookie", cookie.as_str()),
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Origin", origin),
        ];
        request(f.port, "GET", "/app/ws", &h, b"").unwrap().status
    };
    assert_eq!(ws("http://evil.localhost"), 403);
    assert_eq!(ws("http://localhost"), 200);

    // A new login ends the session the browser had (no fixation), and
    // logout clears the cookie.
    let again = request(
        f.port,
        "POST",
        "/login",
        &[("Content-Type", "application/json"), ("Cookie", &cookie)],
        serde_json::json!({"username": "carol", "password": PW})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(again.status, 200, "{again:?}");
    let fresh = cookie_of(&again);
    assert_ne!(fresh, cookie);
    let r = request(f.port, "GET", "/app/page", &[("Cookie", &cookie)], b"").unwrap();
    assert_eq!(r.status, 401, "the old session still works: {r:?}");
    let r = request(
        f.port,
        "POST",
        "/logout",
        &[("Cookie", &fresh), ("Origin", "http://evil.example")],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 403, "a cross-site logout: {r:?}");
    let r = request(
        f.port,
        "POST",
        "/logout",
        &[("Cookie", &fresh), ("X-Requested-With", "x")],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 204, "{r:?}");
    assert!(
        r.header("set-cookie").unwrap().contains("Max-Age=0"),
        "{r:?}"
    );
    let r = request(f.port, "GET", "/app/page", &[("Cookie", &fresh)], b"").unwrap();
    assert_eq!(r.status, 401);

    // Secure can be turned off for plain-HTTP development.
    let g = Forkd::start("workers = 1\n[auth]\ncookie = true\ncookie_secure = false\n");
    g.add_user("carol", PW);
    let r = login(g.port, "carol", PW);
    assert!(!r.header("set-cookie").unwrap().contains("Secure"), "{r:?}");
}

/// What could let a request skip its route's check is refused: a path an
/// app would read as another route's (an escaped letter, `//`, `;params`,
/// `..;`), by the proxy and by forward-auth; two different names for the
/// original request in a forward-auth call (a client can add the header
/// its proxy does not set). A cookie session asked about another request
/// needs that request's method, and its same-site check compares with the
/// original host (`X-Forwarded-Host`).
#[test]
fn paths_and_forward_auth_headers_that_could_skip_a_check_are_refused() {
    let api = Upstream::tcp();
    let f = Forkd::start(&format!(
        "workers = 1\n[auth]\ncookie = true\n\
         [[route]]\nprefix = \"/\"\nupstream = \"{0}\"\nauth = \"none\"\n\
         [[route]]\nprefix = \"/api\"\nupstream = \"{0}\"\n\
         [[route]]\nprefix = \"/v;1\"\nupstream = \"{0}\"\nauth = \"none\"\n",
        api.url()
    ));
    f.add_user("dora", PW);
    let calls = || api.requests.load(std::sync::atomic::Ordering::Relaxed);
    let c0 = calls();
    for path in [
        "/%61pi/x",
        "//api/x",
        "/api;v=1/x",
        "/x/..;/api/y",
        "/%70rofile",
        "/%2561pi",
    ] {
        let r = request(f.port, "GET", path, &[], b"").unwrap();
        let want = if path == "/%2561pi" { 200 } else { 400 };
        assert_eq!(r.status, want, "{path}: {r:?}");
        if want == 400 {
            // `..;` is a dot segment to Tomcat-style servers: refused as one.
            let why = if path.contains("..;") {
                "dot segment"
            } else {
                "another route"
            };
            assert!(r.body.contains(why), "{path}: {r:?}");
        }
    }
    assert_eq!(
        calls() - c0,
        1,
        "only the path that stays under / went upstream"
    );
    // An authority or `*` target names no path.
    for target in ["localhost:80", "*"] {
        let r = raw(
            f.port,
            &format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
        )
        .unwrap();
        assert_eq!(r.status, 400, "{target}: {r:?}");
    }
    assert_eq!(calls() - c0, 1, "an authority target went upstream");
    for path in ["/pub;x", "/%41BC/x", "/a//b", "/api", "/v;1/x"] {
        let r = request(f.port, "GET", path, &[], b"").unwrap();
        let want = if path == "/api" { 401 } else { 200 };
        assert_eq!(r.status, want, "{path}: {r:?}");
    }

    let auth = |headers: &[(&str, &str)]| request(f.port, "GET", "/auth", headers, b"").unwrap();
    let t = token(f.port, "dora", PW);
    let b = bearer(&t);
    let b = b.as_str();
    for (want, headers) in [
        (401, vec![("X-Forwarded-Uri", "/api/x")]),
        (200, vec![("X-Original-URI", "/pub")]),
        (
            400,
            vec![("X-Forwarded-Uri", "/api/x"), ("X-Original-URI", "/pub")],
        ),
        (
            400,
            vec![("X-Original-URI", "/pub"), ("X-Original-URI", "/api/x")],
        ),
        (
            200,
            vec![
                ("X-Forwarded-Uri", "/api/x"),
                ("X-Original-URI", "/api/x"),
                ("Authorization", b),
            ],
        ),
        (400, vec![("X-Forwarded-Uri", "/%61pi/x")]),
        (400, vec![("X-Forwarded-Uri", "/x/..;/api/y")]),
        (
            400,
            vec![
                ("X-Original-URI", "/api/x"),
                ("X-Original-Method", "GET"),
                ("X-Forwarded-Method", "POST"),
                ("Authorization", b),
            ],
        ),
    ] {
        let r = auth(&headers);
        assert_eq!(r.status, want, "{headers:?}: {r:?}");
    }

    let r = login(f.port, "dora", PW);
    let cookie = cookie_of(&r);
    let c = cookie.as_str();
    for (want, headers) in [
        // Asked about another request without its method: refused, not
        // taken for a GET.
        (400, vec![("Cookie", c), ("X-Forwarded-Uri", "/api/x")]),
        (
            200,
            vec![
                ("Cookie", c),
                ("X-Forwarded-Uri", "/api/x"),
                ("X-Forwarded-Method", "GET"),
            ],
        ),
        (
            200,
            vec![
                ("Cookie", c),
                ("X-Forwarded-Uri", "/api/x"),
                ("X-Forwarded-Method", "POST"),
                ("X-Forwarded-Host", "app.example"),
                ("Origin", "https://app.example"),
            ],
        ),
        (
            403,
            vec![
                ("Cookie", c),
                ("X-Forwarded-Uri", "/api/x"),
                ("X-Forwarded-Method", "POST"),
                ("X-Forwarded-Host", "app.example"),
                ("Origin", "https://evil.example"),
            ],
        ),
        // A page asking who it is, directly.
        (200, vec![("Cookie", c)]),
    ] {
        let r = auth(&headers);
        assert_eq!(r.status, want, "{headers:?}: {r:?}");
    }
}

fn profile_with(port: u16, headers: &[(&str, &str)]) -> Response {
    request(port, "GET", "/profile", headers, b"").unwrap()
}

#[test]
fn the_cache_keeps_what_the_upstream_allows_per_user_and_shared() {
    let api = Upstream::tcp();
    let f = Forkd::start(&format!(
        "workers = 2\n\
         [[route]]\nprefix = \"/c\"\nupstream = \"{0}\"\nauth = \"none\"\nstrip_prefix = true\ncache = true\n\
         [[route]]\nprefix = \"/u\"\nupstream = \"{0}\"\nstrip_prefix = true\ncache = true\n",
        api.url()
    ));
    f.add_user("alice", PW);
    f.add_user("bob", PW);
    let (ta, tb) = (token(f.port, "alice", PW), token(f.port, "bob", PW));
    let calls = || api.requests.load(std::sync::atomic::Ordering::Relaxed);
    let fetch = |path: &str, headers: &[(&str, &str)]| {
        let r = request(f.port, "GET", path, headers, b"").unwrap();
        assert_eq!(r.status, 200, "{path}: {r:?}");
        (
            r.header("x-cache").unwrap_or("").to_owned(),
            r.json()["n"].as_u64(),
            r,
        )
    };

    // max-age: the second answer is the first one, from the cache.
    let c0 = calls();
    let (x1, n1, _) = fetch("/c/a?cc=max-age%3D60", &[]);
    let (x2, n2, r2) = fetch("/c/a?cc=max-age%3D60", &[]);
    assert_eq!((x1.as_str(), x2.as_str()), ("miss", "hit"));
    assert_eq!(n1, n2, "a hit is the stored answer");
    assert!(r2.header("age").is_some(), "{r2:?}");
    assert_eq!(calls() - c0, 1);

    // no-store (the upstream's default here), and private in the shared
    // cache: asked every time.
    for path in [
        "/c/b",
        "/c/p?cc=private%2Cmax-age%3D60",
        "/c/q?cc=private%3D%22Set-Cookie%22%2Cmax-age%3D60",
    ] {
        let c0 = calls();
        let (x1, _, _) = fetch(path, &[]);
        let (x2, _, _) = fetch(path, &[]);
        assert_eq!((x1.as_str(), x2.as_str()), ("miss", "miss"), "{path}");
        assert_eq!(calls() - c0, 2, "{path}");
    }

    // Vary: one entry per value of the header it names.
    let v = "/c/v?cc=max-age%3D60&vary=Accept-Language";
    let seq: Vec<String> = ["fr", "fr", "de", "fr", "de"]
        .iter()
        .map(|l| fetch(v, &[("Accept-Language", l)]).0)
        .collect();
    assert_eq!(seq, ["miss", "hit", "miss", "hit", "hit"]);

    // The Host is in every entry's key: an answer made for another host
    // (its links, say) is never served for this one.
    let with_host = |host: &str| {
        let r = raw(
            f.port,
            &format!(
                "GET /c/h?cc=max-age%3D60 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            ),
        )
        .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let upstream_saw = one(&seen(&r), "host").unwrap_or("").to_owned();
        (r.header("x-cache").unwrap_or("").to_owned(), upstream_saw)
    };
    let seq: Vec<(String, String)> = ["evil.example", "localhost", "evil.example", "localhost"]
        .iter()
        .map(|h| with_host(h))
        .collect();
    let x: Vec<&str> = seq.iter().map(|(x, _)| x.as_str()).collect();
    assert_eq!(x, ["miss", "miss", "hit", "hit"]);
    assert_eq!(seq[3].1, "localhost");

    // A request with credentials never gets the shared cache's answer.
    let (x, _, _) = fetch("/c/a?cc=max-age%3D60", &[("Authorization", &bearer(&ta))]);
    assert_ne!(x, "hit");

    // Per user: alice's answer is hers alone.
    let me = "/u/me?cc=private%2Cmax-age%3D60";
    let (x1, _, _) = fetch(me, &[("Authorization", &bearer(&ta))]);
    let (x2, _, r2) = fetch(me, &[("Authorization", &bearer(&ta))]);
    assert_eq!((x1.as_str(), x2.as_str()), ("miss", "hit"));
    assert_eq!(one(&seen(&r2), "x-forkd-user"), Some("alice"));
    let (x3, _, r3) = fetch(me, &[("Authorization", &bearer(&tb))]);
    assert_eq!(x3, "miss");
    assert_eq!(one(&seen(&r3), "x-forkd-user"), Some("bob"));

    // Single flight: concurrent misses of one URL make one upstream call.
    let c0 = calls();
    let port = f.port;
    let answers = concurrently(8, move |_| {
        request(port, "GET", "/c/slow/400?cc=max-age%3D60", &[], b"")
    });
    for r in &answers {
        assert_eq!(r.as_ref().unwrap().status, 200, "{r:?}");
    }
    assert_eq!(calls() - c0, 1, "single flight");

    // Purge: by path prefix, then asked again.
    let out = f.cli(&["cache", "purge", "/c/a"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("purged 1 "),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fetch("/c/a?cc=max-age%3D60", &[]).0, "miss");
    assert_eq!(
        fetch(
            "/c/v?cc=max-age%3D60&vary=Accept-Language",
            &[("Accept-Language", "fr")]
        )
        .0,
        "hit"
    );
    let out = f.cli(&["cache", "purge", "c"]);
    assert_eq!(out.status.code(), Some(1));
}

/// The promise of the pattern: a routed, authenticated GET that its cache
/// answers is the session, its policies and the cache entry in one Redis
/// call, on a URL whose answers vary by a header too.
#[test]
fn a_cached_authenticated_get_with_a_policy_is_one_redis_call() {
    let redis = RedisServer::start();
    let api = Upstream::tcp();
    let f = Forkd::start_with_redis(
        &redis,
        &format!(
            "workers = 1\n\
             [rate_limit.policy.per-user]\nlimit = 1000\nwindow = 60\nkey = \"user\"\n\
             [rate_limit.policy.per-route]\nlimit = 1000\nwindow = 60\nkey = \"user+route\"\n\
             [[route]]\nprefix = \"/u\"\nupstream = \"{}\"\nstrip_prefix = true\ncache = true\n\
             policies = [\"per-user\", \"per-route\"]\n",
            api.url()
        ),
    );
    f.add_user("alice", PW);
    let t = bearer(&token(f.port, "alice", PW));
    let path = "/u/me?cc=private%2Cmax-age%3D60&vary=Accept-Language";
    let get = || {
        let r = request(
            f.port,
            "GET",
            path,
            &[("Authorization", &t), ("Accept-Language", "fr")],
            b"",
        )
        .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.header("ratelimit").is_some(), "{r:?}");
        r.header("x-cache").unwrap_or("").to_owned()
    };
    // The miss fills the entry and teaches this worker the URL's spec.
    assert_eq!(get(), "miss");
    assert_eq!(get(), "hit");
    let mut monitor = Monitor::start(&redis);
    assert_eq!(get(), "hit");
    let sent = monitor.sent_before_marker("end-of-hit");
    assert_eq!(sent.len(), 1, "Redis calls for one cached GET: {sent:?}");
    assert!(sent[0].to_lowercase().contains("evalsha"), "{sent:?}");
}

/// The login limits and `/profile`'s limit are policies too: named in
/// their `RateLimit` headers, shown and reset by `forkd limit`, and their
/// names taken by no `[rate_limit.policy]`.
#[test]
fn the_built_in_policies_are_named_and_forkd_limit_reaches_them() {
    let f = Forkd::start(
        "workers = 2\n[auth]\nlogin_ip_limit = 2\nlogin_user_limit = 5\nlogin_user_all_limit = 7\n\
         [rate_limit.profile]\nlimit = 4\nwindow = 600\n",
    );
    f.add_user("alice", PW);
    let text = |o: std::process::Output| {
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
        )
    };
    let show = |policy: &str, bucket: &str| text(f.cli(&["limit", "show", policy, bucket]));
    let attempt = |from: &str| {
        let body = serde_json::json!({"username": "alice", "password": "wrong"}).to_string();
        request_from(
            from,
            f.port,
            "POST",
            "/login",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .unwrap()
    };
    // Two failures from one client; the third is refused, by name.
    assert_eq!(attempt("127.0.0.5").status, 401);
    assert_eq!(attempt("127.0.0.5").status, 401);
    let r = attempt("127.0.0.5");
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.header("ratelimit-policy"), Some("\"login-ip\";q=2;w=60"));
    assert!(
        r.header("ratelimit")
            .is_some_and(|v| v.starts_with("\"login-ip\";r=0;t=")),
        "{r:?}"
    );
    let (code, out) = show("login-ip", "client:127.0.0.5");
    assert!(
        code == Some(0) && out.contains(": 0 left, whole again in"),
        "{out}"
    );
    let (code, out) = show("login-user", "user:alice,client:127.0.0.5");
    assert!(code == Some(0) && out.contains(": 3 left"), "{out}");
    let (code, out) = show("login-user-all", "user:alice");
    assert!(code == Some(0) && out.contains(": 5 left"), "{out}");
    // Another client's bucket is whole; a reset makes this one whole.
    let (code, out) = show("login-ip", "client:127.0.0.6");
    assert!(code == Some(0) && out.contains(": 2 left (whole)"), "{out}");
    let (code, out) = text(f.cli(&["limit", "reset", "login-ip", "client:127.0.0.5"]));
    assert!(code == Some(0) && out.contains("reset"), "{out}");
    let good = serde_json::json!({"username": "alice", "password": PW}).to_string();
    let r = request_from(
        "127.0.0.5",
        f.port,
        "POST",
        "/login",
        &[("Content-Type", "application/json")],
        good.as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let t = r.json()["token"].as_str().unwrap().to_owned();

    // /profile's limit: one request takes one place of alice's.
    let (_, out) = show("profile", "user:alice");
    assert!(out.contains(": 4 left (whole)"), "{out}");
    let r = profile_with(f.port, &[("Authorization", &bearer(&t))]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("ratelimit-policy"), Some("\"profile\";q=4;w=600"));
    let (code, out) = show("profile", "user:alice");
    assert!(code == Some(0) && out.contains(": 3 left"), "{out}");
    let (code, out) = text(f.cli(&["limit", "reset", "profile", "user:alice"]));
    assert!(code == Some(0) && out.contains("reset"), "{out}");
    assert!(show("profile", "user:alice").1.contains(": 4 left (whole)"));

    // Buckets that are not the policy's, and the names listed.
    for (policy, bucket, says) in [
        ("login-ip", "user:alice", "not one of its buckets"),
        ("login-user", "user:alice", "not one of its buckets"),
        ("profile", "client:127.0.0.1", "not one of its buckets"),
        ("login-user", "user:alice,client:nope", "not an IP address"),
        (
            "nope",
            "user:alice",
            "login-ip, login-user, login-user-all, profile",
        ),
    ] {
        let (code, out) = show(policy, bucket);
        assert_eq!(code, Some(1), "{policy} {bucket}: {out}");
        assert!(out.contains(says), "{policy} {bucket}: {out}");
    }
    let g = Forkd::configure("[rate_limit.policy.profile]\nlimit = 5\n");
    let (code, out) = text(g.cli(&["check-config"]));
    assert_eq!(code, Some(64), "{out}");
    assert!(
        out.contains("rate_limit.policy.profile") && out.contains("built-in"),
        "{out}"
    );
}

/// `/profile` is a route of the same mechanism: `profile.origin` is its
/// upstream, reached through the route's pooled client, so profile loads
/// reuse one kept-alive connection.
#[test]
fn the_profile_origin_is_reached_through_the_pooled_client() {
    let origin = Upstream::tcp();
    let f = Forkd::start(&format!(
        "workers = 1\n[profile]\norigin = \"{}\"\n",
        origin.url()
    ));
    let users = ["ann", "ben", "cai"];
    for u in users {
        f.add_user(u, PW);
    }
    for u in users {
        let t = token(f.port, u, PW);
        let r = profile_with(f.port, &[("Authorization", &bearer(&t))]);
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-cache"), Some("miss"));
        assert_eq!(r.json()["target"], format!("/users/{u}"), "{r:?}");
        assert_eq!(r.header("ratelimit-policy"), Some("\"profile\";q=10;w=60"));
    }
    let count = |c: &std::sync::atomic::AtomicUsize| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(count(&origin.requests), 3);
    assert_eq!(count(&origin.connections), 1, "one kept-alive connection");
}

/// `/profile` keeps one entry per user, whatever query a request adds
/// (the responder reads none), for `profile.cache_ttl` as written (less
/// up to 10 % jitter), not cut to whole seconds by the route cache.
#[test]
fn the_profile_entry_is_one_per_user_for_its_cache_ttl() {
    let redis = RedisServer::start();
    let f = Forkd::start_with_redis(&redis, "workers = 1\n[profile]\ncache_ttl = 2.9\n");
    f.add_user("fay", PW);
    let t = token(f.port, "fay", PW);
    assert_eq!(profile(f.port, &t).unwrap().header("x-cache"), Some("miss"));
    let key = redis
        .keys()
        .into_iter()
        .find(|k| k.contains(":cache:/profile#"))
        .expect("the profile's entry");
    let ttl: i64 = redis.raw(&["PTTL", &key])[0].trim().parse().unwrap();
    // At least 2.61 s when made; whole seconds would have made it 2 s.
    assert!((2_001..=2_900).contains(&ttl), "{ttl}");
    for query in ["/profile?a=1", "/profile?b=2"] {
        let r = request(f.port, "GET", query, &[("Authorization", &bearer(&t))], b"").unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-cache"), Some("hit"), "{query}");
    }
    let entries = redis
        .keys()
        .into_iter()
        .filter(|k| k.contains(":cache:/profile"))
        .count();
    assert_eq!(entries, 1);
}

/// A cached route's fill that fails (the upstream refuses) leaves no
/// single-flight lock behind, so the next request for the entry asks the
/// upstream at once rather than waiting out a fill that will never come.
/// (Before, the lock stayed its whole lifetime: twice the route's
/// timeout, 61 s here.)
#[test]
fn a_failed_fill_releases_its_lock() {
    let redis = RedisServer::start();
    let closed = free_port();
    let f = Forkd::start_with_redis(
        &redis,
        &format!(
            "workers = 1\n[[route]]\nprefix = \"/c\"\nupstream = \"http://127.0.0.1:{closed}\"\n\
             auth = \"none\"\ncache = true\n"
        ),
    );
    assert_eq!(get(f.port, "/c/x").unwrap().status, 502);
    let locks = || {
        redis
            .keys()
            .into_iter()
            .filter(|k| k.contains(":cachelock:"))
            .count()
    };
    poll(Duration::from_secs(10), || (locks() == 0).then_some(()))
        .expect("the fill's lock is released");
    // And the next request is answered by the upstream's failure, not
    // after another's wait: it takes the lock itself.
    assert_eq!(get(f.port, "/c/x").unwrap().status, 502);
}

/// An upstream with a path: every forwarded path goes under it, after the
/// prefix is stripped or not, with the query kept; `status` shows it.
#[test]
fn an_upstream_s_path_is_put_before_the_forwarded_path() {
    let api = Upstream::tcp();
    let f = Forkd::start(&format!(
        "workers = 1\n\
         [[route]]\nprefix = \"/s\"\nupstream = \"{0}/v2/\"\nauth = \"none\"\nstrip_prefix = true\n\
         [[route]]\nprefix = \"/k\"\nupstream = \"{0}/v2\"\nauth = \"none\"\n",
        api.url()
    ));
    for (path, target) in [
        ("/s/items?page=2", "/v2/items?page=2"),
        ("/s", "/v2/"),
        ("/s/", "/v2/"),
        ("/k/items?page=2", "/v2/k/items?page=2"),
        ("/k", "/v2/k"),
    ] {
        let r = request(f.port, "GET", path, &[], b"").unwrap();
        assert_eq!(r.status, 200, "{path}: {r:?}");
        assert_eq!(r.json()["target"], target, "{path}");
    }
    let out = f.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("route /s -> {}/v2 (", api.url())),
        "{text}"
    );
}
