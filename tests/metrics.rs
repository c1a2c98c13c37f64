//! GET /metrics (checked with a real Prometheus text parser) and the Redis
//! round-trip budget of an authenticated cache hit.

mod common;

use std::collections::HashMap;

use common::*;
use nix::sys::signal::Signal;

const PW: &str = "metrics-secret";

fn scrape(port: u16) -> HashMap<String, f64> {
    let r = get(port, "/metrics").unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    parse_exposition(&r.body)
}

fn value(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| panic!("no sample {key}"))
}

#[test]
fn counters_move_by_exactly_the_requests_sent_across_workers() {
    let f = Forkd::start("workers = 2\n");
    let workers = f.wait_ready();
    let before = scrape(f.port);
    let key = "forkd_http_requests_total{route=healthz,status=2xx}";
    let served_before: Vec<u64> = workers_requests(&f);
    // 60 requests at least, and on until both workers have served some
    // (which one accepts a new connection is the kernel's choice).
    let mut sent = 0;
    while sent < 60
        || !workers_requests(&f)
            .iter()
            .zip(&served_before)
            .all(|(a, b)| a > b)
    {
        assert_eq!(get(f.port, "/healthz").unwrap().status, 200);
        sent += 1;
        assert!(sent < 10_000, "one worker took every request");
    }
    for _ in 0..7 {
        assert_eq!(get(f.port, "/nope").unwrap().status, 404);
    }
    let after = scrape(f.port);
    assert_eq!(value(&after, key) - value(&before, key), f64::from(sent));
    let other = "forkd_http_requests_total{route=other,status=4xx}";
    assert_eq!(value(&after, other) - value(&before, other), 7.0);
    // Both workers answered some of them, and /metrics on either counts all.
    let served_after = workers_requests(&f);
    assert!(
        served_after.iter().zip(&served_before).all(|(a, b)| a > b),
        "{served_before:?} -> {served_after:?}"
    );
    let count = "forkd_http_request_duration_seconds_count{}";
    assert!(value(&after, count) - value(&before, count) >= f64::from(sent + 7));
    assert_eq!(
        value(
            &after,
            "forkd_http_request_duration_seconds_bucket{le=+Inf}"
        ),
        value(&after, count)
    );
    assert_eq!(value(&after, "forkd_workers_up{}"), 2.0);
    assert_eq!(workers.len(), 2);
}

fn workers_requests(f: &Forkd) -> Vec<u64> {
    let s = f.status().unwrap();
    let mut v: Vec<(u64, u64)> = s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["slot"].as_u64().unwrap(), w["requests"].as_u64().unwrap()))
        .collect();
    v.sort();
    v.into_iter().map(|(_, r)| r).collect()
}

#[test]
fn counts_survive_a_dead_worker_and_restarts_are_counted() {
    let f = Forkd::start("workers = 2\n");
    let workers = f.wait_ready();
    for _ in 0..40 {
        get(f.port, "/healthz").unwrap();
    }
    let before = scrape(f.port);
    let key = "forkd_http_requests_total{route=healthz,status=2xx}";
    signal(workers[0], Signal::SIGKILL);
    poll(PATIENCE, || {
        (!f.wait_ready().contains(&workers[0])).then_some(())
    })
    .expect("replaced");
    poll(PATIENCE, || {
        (value(&scrape(f.port), "forkd_workers_up{}") == 2.0).then_some(())
    })
    .expect("workers_up back to 2");
    let after = scrape(f.port);
    assert!(
        value(&after, key) >= value(&before, key),
        "a counter went backwards"
    );
    assert_eq!(value(&after, "forkd_worker_restarts_total{}"), 1.0);
}

#[test]
fn cache_rate_limit_and_redis_errors_are_counted() {
    let mut redis = RedisServer::start();
    let f = Forkd::start_with_redis(
        &redis,
        "workers = 2\n[auth]\nlogin_ip_limit = 1000\nlogin_user_limit = 1000\n[rate_limit.profile]\nlimit = 3\nwindow = 60\n",
    );
    f.add_user("quinn", PW);
    let t = token(f.port, "quinn", PW);
    let before = scrape(f.port);
    let statuses: Vec<u16> = (0..5)
        .map(|_| profile(f.port, &t).unwrap().status)
        .collect();
    assert_eq!(statuses, vec![200, 200, 200, 429, 429]);
    let after = scrape(f.port);
    let delta = |k: &str| value(&after, k) - value(&before, k);
    assert_eq!(delta("forkd_profile_cache_misses_total{}"), 1.0);
    assert_eq!(delta("forkd_profile_cache_hits_total{}"), 2.0);
    assert_eq!(delta("forkd_rate_limited_requests_total{}"), 2.0);

    redis.kill();
    poll(PATIENCE, || {
        (profile(f.port, &t).ok()?.status == 503).then_some(())
    })
    .expect("503 without Redis");
    assert!(value(&scrape(f.port), "forkd_redis_errors_total{}") >= 1.0);
}

#[test]
fn metrics_are_refused_outside_the_allow_list() {
    let f = Forkd::start("workers = 1\n[metrics]\nallow = [\"10.0.0.0/8\"]\n");
    let r = get(f.port, "/metrics").unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
}

/// A request head over http.max_header_bytes is refused with 431
/// problem+json before any handler runs, counted, and the worker goes on.
#[test]
fn an_oversized_request_head_is_431_problem_json_and_counted() {
    use std::io::{Read, Write};
    let f = Forkd::start("workers = 1\n");
    let worker = f.wait_ready()[0];
    let key = "forkd_http_request_heads_too_large_total{}";
    let before = scrape(f.port);
    // 64 KiB of headers, over the 32 KiB default.
    let mut head = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
    for i in 0..64 {
        head.push_str(&format!("X-Filler-{i}: {}\r\n", "a".repeat(1000)));
    }
    head.push_str("\r\n");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", f.port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    // The server may close before it has read everything we send.
    let _ = s.write_all(head.as_bytes());
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
    assert!(
        text.contains("content-type: application/problem+json"),
        "{text}"
    );
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(json["status"], 431);
    assert_eq!(json["type"], "urn:forkd:problem:request-header-too-large");
    let after = scrape(f.port);
    assert_eq!(value(&after, key) - value(&before, key), 1.0);
    // A head under the cap is served, by the same worker.
    let mut ok = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    ok.push_str(&format!("X-Filler: {}\r\n\r\n", "a".repeat(20_000)));
    let r = raw(f.port, &ok).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.pid(), worker);
    assert_eq!(f.wait_ready(), vec![worker]);
}

/// Behind a trusted local proxy, the allow-list is checked against the
/// client the proxy names, not the proxy's own (loopback) address.
#[test]
fn metrics_behind_a_trusted_proxy_check_the_forwarded_client() {
    let f = Forkd::start("workers = 1\n[http]\ntrusted_proxies = [\"127.0.0.0/8\"]\n");
    let via = |xff: &str| {
        request(f.port, "GET", "/metrics", &[("X-Forwarded-For", xff)], b"")
            .unwrap()
            .status
    };
    assert_eq!(get(f.port, "/metrics").unwrap().status, 200);
    assert_eq!(via("203.0.113.9"), 403);
    assert_eq!(via("127.0.0.7"), 200);
    // A client's own spoofed entry left of what the proxy appends is not
    // believed: the proxy says 203.0.113.9.
    assert_eq!(via("127.0.0.1, 203.0.113.9"), 403);
    // Bytes that are not text in what the client sent do not make the
    // request the proxy's own.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", f.port)).unwrap();
    use std::io::{Read, Write};
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Forwarded-For: caf\xc3\xa9\xff, 203.0.113.9\r\n\r\n")
        .unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    assert!(
        resp.starts_with(b"HTTP/1.1 403"),
        "{}",
        String::from_utf8_lossy(&resp)
    );
}

/// A wrong password costs two Redis round trips: the three login limits
/// in one call, then the user record. A right one gives its places back
/// in one more call.
#[test]
fn a_failed_login_costs_two_redis_round_trips() {
    let redis = RedisServer::start();
    let f = Forkd::start_with_redis(&redis, "workers = 1\n");
    f.add_user("lena", PW);
    // Load the scripts.
    assert_eq!(login(f.port, "lena", "wrong").status, 401);
    assert_eq!(login(f.port, "lena", PW).status, 200);
    let mut monitor = Monitor::start(&redis);
    assert_eq!(login(f.port, "lena", "wrong").status, 401);
    let sent = monitor.sent_before_marker("end-of-wrong");
    assert_eq!(
        sent.len(),
        2,
        "Redis round trips for a wrong password: {sent:?}"
    );
    assert!(sent[0].to_lowercase().contains("evalsha"), "{sent:?}");
    assert!(sent[1].to_lowercase().contains("hgetall"), "{sent:?}");
    assert_eq!(login(f.port, "nobody", "wrong").status, 401);
    let sent = monitor.sent_before_marker("end-of-unknown");
    assert_eq!(
        sent.len(),
        2,
        "Redis round trips for an unknown user: {sent:?}"
    );
    // The right password: its places go back in one call, whatever the
    // session then costs.
    assert_eq!(login(f.port, "lena", PW).status, 200);
    let sent = monitor.sent_before_marker("end-of-right");
    let refunds = sent.iter().filter(|l| l.contains("rl:login")).count();
    assert_eq!(refunds, 2, "the check and one refund call: {sent:?}");
}

#[test]
fn an_authenticated_cache_hit_costs_one_redis_round_trip() {
    let redis = RedisServer::start();
    let f = Forkd::start_with_redis(
        &redis,
        "workers = 1\n[rate_limit.profile]\nlimit = 1000\nwindow = 60\n",
    );
    f.add_user("rita", PW);
    let t = token(f.port, "rita", PW);
    // Fill the cache and load the script.
    assert_eq!(profile(f.port, &t).unwrap().header("x-cache"), Some("miss"));
    assert_eq!(profile(f.port, &t).unwrap().header("x-cache"), Some("hit"));
    let mut monitor = Monitor::start(&redis);
    let r = profile(f.port, &t).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-cache"), Some("hit"));
    let sent = monitor.sent_before_marker("end-of-request");
    // And a well-formed token that is no session: one round trip too.
    let bogus = format!("{}.{}", "A".repeat(12), "A".repeat(43));
    assert_eq!(profile(f.port, &bogus).unwrap().status, 401);
    let bogus_sent = monitor.sent_before_marker("end-of-bogus");
    assert_eq!(
        bogus_sent.len(),
        1,
        "round trips for a bogus token: {bogus_sent:?}"
    );
    assert_eq!(
        sent.len(),
        1,
        "Redis round trips for one cache hit: {sent:?}"
    );
    assert!(sent[0].to_lowercase().contains("evalsha"), "{sent:?}");
}

/// Requests are counted per route (each configured route under its
/// prefix, with its cache's hits and misses), and the counts survive a
/// reload; a reload that changes the routes starts their series again, so
/// that no count carries over to another route.
#[test]
fn requests_and_cache_answers_are_counted_per_route() {
    let api = Upstream::tcp();
    let config = |first: &str, second: &str| {
        format!(
            "workers = 2\n\
             [[route]]\nprefix = \"{first}\"\nupstream = \"{u}\"\nauth = \"none\"\ncache = true\n\
             [[route]]\nprefix = \"{second}\"\nupstream = \"{u}\"\nauth = \"none\"\n",
            u = api.url()
        )
    };
    let f = Forkd::start(&config("/api", "/web"));
    let cached = "/api/x?cc=max-age%3D60";
    let x_cache: Vec<String> = (0..3)
        .map(|_| {
            let r = get(f.port, cached).unwrap();
            assert_eq!(r.status, 200, "{r:?}");
            r.header("x-cache").unwrap_or_default().to_owned()
        })
        .collect();
    assert_eq!(x_cache, ["miss", "hit", "hit"]);
    for _ in 0..4 {
        assert_eq!(get(f.port, "/web/y").unwrap().status, 200);
    }
    assert_eq!(get(f.port, "/nope").unwrap().status, 404);
    let m = scrape(f.port);
    let n = |key: &str| m.get(key).copied().unwrap_or(-1.0);
    assert_eq!(n("forkd_http_requests_total{route=/api,status=2xx}"), 3.0);
    assert_eq!(n("forkd_http_requests_total{route=/web,status=2xx}"), 4.0);
    assert_eq!(n("forkd_http_requests_total{route=other,status=4xx}"), 1.0);
    assert_eq!(n("forkd_cache_hits_total{route=/api}"), 2.0);
    assert_eq!(n("forkd_cache_misses_total{route=/api}"), 1.0);
    assert_eq!(n("forkd_cache_hits_total{route=profile}"), 0.0);
    assert!(
        !m.contains_key("forkd_cache_hits_total{route=/web}"),
        "{m:?}"
    );

    // The same routes: the counts go on across the reload.
    let reload = |text: String| {
        f.rewrite_config(&text);
        let out = f.cli(&["reload"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    reload(config("/api", "/web"));
    assert_eq!(
        scrape(f.port)["forkd_http_requests_total{route=/api,status=2xx}"],
        3.0
    );
    // Other routes: their series start again.
    reload(config("/web", "/api"));
    assert_eq!(get(f.port, "/api/z").unwrap().status, 200);
    let m = scrape(f.port);
    assert_eq!(m["forkd_http_requests_total{route=/api,status=2xx}"], 1.0);
    assert_eq!(m["forkd_http_requests_total{route=/web,status=2xx}"], 0.0);
}
