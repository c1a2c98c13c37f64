//! The API with its state in Redis: each test starts its own redis-server
//! (or lets forkd run one), runs the built binary, and speaks HTTP to it.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const PW: &str = "correct horse battery staple";
/// Two workers, limits high enough not to interfere.
// Login limits out of the way (and their state short-lived) unless a test
// is about them.
const BASE: &str = "workers = 2\nshutdown_timeout = 5\n\
[auth]\nlogin_ip_limit = 100000\nlogin_user_limit = 100000\n\
login_user_all_limit = 100000\nlogin_host_limit = 100000\n\
[rate_limit.profile]\nlimit = 100000\nwindow = 60\n";

fn with(base: &str, section_values: &str) -> String {
    // `section_values` adds keys to tables of `base` by appending whole
    // tables, so it must only name tables base does not have.
    format!("{base}{section_values}")
}

fn login_on_one_worker_profile_on_the_other_and_logout_everywhere(redis: &impl Backend) {
    let f = Forkd::start_with_redis(redis, BASE);
    let pids: HashSet<i32> = f.wait_ready().into_iter().collect();
    f.add_user("alice", PW);

    let login = login(f.port, "alice", PW);
    assert_eq!(login.status, 200, "{login:?}");
    let body = login.json();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 1800);
    let token = body["token"].as_str().unwrap().to_owned();
    let login_pid = login.pid();

    // Every worker accepts the token, including the one that did not issue it.
    let mut answered = HashSet::new();
    poll(PATIENCE, || {
        let r = profile(f.port, &token).ok()?;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json()["username"], "alice");
        answered.insert(r.pid());
        (answered == pids).then_some(())
    })
    .expect("both workers answer /profile");
    assert!(answered.iter().any(|&p| p != login_pid));

    let out = logout(f.port, &token).unwrap();
    assert_eq!(out.status, 204);
    // Refused by every worker from the moment Redis' invalidation reaches
    // it (the one that logged it out: at once).
    until_refused_everywhere(f.port, &token, &pids);
    // A second logout of the same token is a 401 too.
    let again = logout(f.port, &token).unwrap();
    assert_eq!(again.status, 401);
}

fn rate_limit_of_10_holds_exactly_across_workers(redis: &impl Backend) {
    let f = Forkd::start_with_redis(
        redis,
        // 10 an hour: a token refills only after 6 minutes, so however slow
        // the machine, the 40 requests meet exactly 10 tokens.
        "workers = 2\n[auth]\nlogin_ip_limit = 1000\nlogin_user_limit = 1000\n[rate_limit.profile]\nlimit = 10\nwindow = 3600\n",
    );
    f.add_user("bob", PW);
    let token = token(f.port, "bob", PW);
    let port = f.port;
    let t = token.clone();
    let results = concurrently(40, move |_| profile(port, &t));
    let mut by_status: HashMap<u16, Vec<Response>> = HashMap::new();
    for r in results {
        let r = r.expect("every request is answered");
        by_status.entry(r.status).or_default().push(r);
    }
    let ok = by_status.get(&200).map_or(0, Vec::len);
    let limited = by_status.get(&429).map_or(0, Vec::len);
    assert_eq!((ok, limited), (10, 30), "{:?}", by_status.keys());
    // The limit is one for both workers: each of them refuses now.
    let mut pids: HashSet<i32> = by_status[&429].iter().map(Response::pid).collect();
    poll(PATIENCE, || {
        let r = profile(port, &token).ok()?;
        assert_eq!(r.status, 429);
        pids.insert(r.pid());
        (pids.len() == 2).then_some(())
    })
    .expect("both workers refuse");

    let mut remaining: Vec<u64> = Vec::new();
    for r in &by_status[&200] {
        assert_eq!(
            r.header("ratelimit-policy"),
            Some("\"profile\";q=10;w=3600")
        );
        let rl = r.header("ratelimit").unwrap();
        let r_value = rl.split(';').find_map(|p| p.strip_prefix("r=")).unwrap();
        remaining.push(r_value.parse().unwrap());
        let t: u64 = rl
            .split(';')
            .find_map(|p| p.strip_prefix("t="))
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=3600).contains(&t), "{rl}");
    }
    remaining.sort();
    assert_eq!(remaining, (0..10).collect::<Vec<u64>>());
    for r in &by_status[&429] {
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
        assert_eq!(r.json()["status"], 429);
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=3600).contains(&retry), "{retry}");
        assert_eq!(
            r.header("ratelimit-policy"),
            Some("\"profile\";q=10;w=3600")
        );
        assert!(r.header("ratelimit").unwrap().contains("r=0"));
    }
}

/// A slow HTTP origin on loopback that counts its calls.
struct Origin {
    port: u16,
    calls: Arc<AtomicU64>,
}

impl Origin {
    fn start(delay: Duration) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let calls = Arc::new(AtomicU64::new(0));
        let counter = calls.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(10_000) {
                let Ok(mut stream) = stream else { continue };
                let counter = counter.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap_or(0);
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(delay);
                    let path = line.split_whitespace().nth(1).unwrap_or("");
                    let resp = match path.strip_prefix("/users/") {
                        Some(name) if name != "ghost" => {
                            let body = format!("{{\"name\":\"{name}\",\"source\":\"origin\"}}");
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                body.len()
                            )
                        }
                        _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned(),
                    };
                    let _ = stream.write_all(resp.as_bytes());
                });
            }
        });
        Origin { port, calls }
    }
}

fn profile_cache_misses_then_hits_and_50_misses_make_one_origin_call(redis: &impl Backend) {
    let origin = Origin::start(Duration::from_millis(400));
    let config = format!(
        "{BASE}[profile]\norigin = \"http://127.0.0.1:{}\"\n",
        origin.port
    );
    let f = Forkd::start_with_redis(redis, &config);
    f.add_user("carol", PW);
    f.add_user("dave", PW);

    let t = token(f.port, "carol", PW);
    let first = profile(f.port, &t).unwrap();
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.header("x-cache"), Some("miss"));
    assert_eq!(first.json()["source"], "origin");
    let second = profile(f.port, &t).unwrap();
    assert_eq!(second.header("x-cache"), Some("hit"));
    assert_eq!(second.body, first.body);
    assert_eq!(origin.calls.load(Ordering::SeqCst), 1);
    // The cache entry (the /profile route's, in the user's cache) has a
    // TTL of at most 300 s (less by up to 10 % jitter).
    let uid = &t[..12];
    let mine = format!("forkd:{{{uid}}}:cache:/profile#");
    let keys: Vec<String> = redis
        .keys()
        .into_iter()
        .filter(|k| k.starts_with(&mine))
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let ttl: i64 = redis.raw(&["PTTL", &keys[0]])[0].trim().parse().unwrap();
    assert!((269_000..=300_000).contains(&ttl), "{ttl}");

    // 50 concurrent misses for another user: one origin call in all.
    let t = token(f.port, "dave", PW);
    let port = f.port;
    let results = concurrently(50, move |_| profile(port, &t));
    let mut bodies = HashSet::new();
    for r in results {
        let r = r.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        bodies.insert(r.body);
    }
    assert_eq!(bodies.len(), 1);
    assert_eq!(
        origin.calls.load(Ordering::SeqCst),
        2,
        "one call for carol, one for dave"
    );
}

fn profile_origin_errors_are_problems(redis: &impl Backend) {
    let origin = Origin::start(Duration::from_millis(0));
    let slow = Origin::start(Duration::from_secs(3));
    let f = Forkd::start_with_redis(
        redis,
        &format!(
            "{BASE}[profile]\norigin = \"http://127.0.0.1:{}\"\n",
            origin.port
        ),
    );
    f.add_user("ghost", PW);
    let t = token(f.port, "ghost", PW);
    let r = profile(f.port, &t).unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));

    let g = Forkd::start_with_redis(
        redis,
        &format!(
            "{BASE}[profile]\norigin = \"http://127.0.0.1:{}\"\norigin_timeout = 0.5\n",
            slow.port
        ),
    );
    let t = token(g.port, "ghost", PW);
    let r = profile(g.port, &t).unwrap();
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.json()["type"], "urn:forkd:problem:bad-gateway");
}

fn sessions_expire_when_idle_and_at_the_absolute_limit(redis: &impl Backend) {
    let f = Forkd::start_with_redis(
        redis,
        &with(
            "workers = 1\n[rate_limit.profile]\nlimit = 100000\nwindow = 60\n",
            "[auth]\nsession_idle_timeout = 1.5\nsession_absolute_timeout = 4\nlogin_ip_limit = 1000\nlogin_user_limit = 1000\n",
        ),
    );
    f.add_user("erin", PW);

    // Idle: unused for longer than the idle timeout, the token is dead.
    let t = token(f.port, "erin", PW);
    assert_eq!(profile(f.port, &t).unwrap().status, 200);
    std::thread::sleep(Duration::from_millis(1_700));
    let r = poll(PATIENCE, || {
        let r = profile(f.port, &t).ok()?;
        (r.status != 503).then_some(r)
    })
    .expect("an answer other than 503");
    assert_eq!(r.status, 401, "idle session still valid");

    // Absolute: used all the time, it still ends, and not before.
    let before_login = Instant::now();
    let t = token(f.port, "erin", PW);
    let mut last_ok = Duration::ZERO;
    let ended = poll(Duration::from_secs(30), || {
        let r = profile(f.port, &t).ok()?;
        match r.status {
            200 => {
                last_ok = before_login.elapsed();
                std::thread::sleep(Duration::from_millis(100));
                None
            }
            // Redis too slow to answer on a loaded machine: ask again.
            503 => None,
            status => Some((status, before_login.elapsed())),
        }
    })
    .expect("the session ends");
    assert_eq!(ended.0, 401);
    assert!(
        ended.1 >= Duration::from_secs(4),
        "ended after {:?}",
        ended.1
    );
    assert!(
        last_ok >= Duration::from_millis(2_000),
        "kept alive past the idle timeout by use: last ok at {last_ok:?}"
    );
}

fn password_change_revoke_and_delete_end_every_session(redis: &impl Backend) {
    let f = Forkd::start_with_redis(redis, BASE);
    f.add_user("frank", PW);
    let a = token(f.port, "frank", PW);
    let b = token(f.port, "frank", PW);
    assert_ne!(a, b, "a new token at every login");
    assert_eq!(profile(f.port, &a).unwrap().status, 200);

    let pids: HashSet<i32> = f.wait_ready().into_iter().collect();
    let out = f.passwd("frank", "new-secret");
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 session(s) ended"));
    for t in [&a, &b] {
        until_refused_everywhere(f.port, t, &pids);
    }
    assert_eq!(login(f.port, "frank", PW).status, 401);
    let c = token(f.port, "frank", "new-secret");
    let d = token(f.port, "frank", "new-secret");
    // The profile cached before the change was dropped with it.
    let r = profile(f.port, &c).unwrap();
    assert_eq!(r.header("x-cache"), Some("miss"), "{r:?}");
    assert_eq!(profile(f.port, &c).unwrap().header("x-cache"), Some("hit"));

    let out = f.cli(&["user", "revoke", "frank"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 session(s)"));
    for t in [&c, &d] {
        until_refused_everywhere(f.port, t, &pids);
    }

    let e = token(f.port, "frank", "new-secret");
    let out = f.cli(&["user", "list"]);
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(list.contains("frank") && list.contains("user"), "{list}");
    let out = f.cli(&["user", "del", "frank"]);
    assert!(out.status.success());
    assert_eq!(profile(f.port, &e).unwrap().status, 401);
    assert_eq!(login(f.port, "frank", "new-secret").status, 401);
    // Nothing of frank is left in Redis: no key names him, and of those
    // his tag names (the hash-slot tag of every per-user key, as in his
    // tokens) only the revocation tombstone, which expires.
    let tag = a.split('.').next().unwrap();
    let keys = redis.keys();
    let left: Vec<&String> = keys
        .iter()
        .filter(|k| k.contains("frank") || k.contains(tag))
        .collect();
    assert_eq!(left, vec![&format!("forkd:{{{tag}}}:epoch")], "{keys:?}");
    let ttl: i64 = redis.raw(&["PTTL", left[0]])[0].parse().unwrap();
    assert!(ttl > 0, "the tombstone expires: {ttl}");
    // Past every generation (a value Lua keeps exactly).
    let epoch: i64 = redis.raw(&["GET", left[0]])[0].parse().unwrap();
    assert!(epoch >= 1 << 53, "tombstone epoch {epoch}");

    // CLI errors are plain and non-zero.
    let out = f.cli(&["user", "del", "frank"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no user 'frank'"));
    let out = f.cli_input(
        &["user", "add", "bad name", "--password-stdin"],
        Some("x\n"),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid user name"));
    f.add_user("gina", PW);
    let out = f.cli_input(&["user", "add", "gina", "--password-stdin"], Some("x\n"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let out = f.cli_input(&["user", "add", "hank", "--password-stdin"], Some("\n"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("password is empty"));
    let out = f.cli(&["user", "add", "hank"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--password-stdin"));
}

fn redis_never_holds_a_token(redis: &impl Backend) {
    let f = Forkd::start_with_redis(redis, BASE);
    f.add_user("ivy", PW);
    let tokens: Vec<String> = (0..5).map(|_| token(f.port, "ivy", PW)).collect();
    for t in &tokens {
        assert_eq!(profile(f.port, t).unwrap().status, 200);
    }
    let keys = redis.keys();
    assert!(keys.len() >= 5, "{keys:?}");
    let secrets: Vec<&str> = tokens.iter().map(|t| &t[13..]).collect();
    let mut seen = 0;
    for key in &keys {
        let kind = redis.raw(&["TYPE", key]).join("");
        let values = match kind.as_str() {
            "hash" => redis.raw(&["HGETALL", key]),
            "string" => redis.raw(&["GET", key]),
            "zset" => redis.raw(&["ZRANGE", key, "0", "-1"]),
            "set" => redis.raw(&["SMEMBERS", key]),
            other => panic!("unexpected key type {other} for {key}"),
        };
        for s in &secrets {
            assert!(!key.contains(s), "key {key} holds a token");
            for v in &values {
                assert!(!v.contains(s), "{key} holds a token");
            }
        }
        seen += 1;
    }
    assert_eq!(seen, keys.len());
    // The session keys are the SHA-256 of the tokens.
    assert_eq!(keys.iter().filter(|k| k.contains(":sess:")).count(), 5);
}

fn wrong_password_and_unknown_user_look_and_take_the_same(redis: &impl Backend) {
    let f = Forkd::start_with_redis(
        redis,
        "workers = 1\n[auth]\nlogin_ip_limit = 100000\nlogin_user_limit = 100000\nlogin_user_all_limit = 100000\nlogin_host_limit = 100000\n",
    );
    f.add_user("judy", PW);
    // Warm up both paths (connections, the dummy hash).
    login(f.port, "judy", "nope");
    login(f.port, "nobody", "nope");
    let mut wrong = Vec::new();
    let mut unknown = Vec::new();
    let mut bodies = HashSet::new();
    for i in 0..25 {
        for (name, times) in [("judy", &mut wrong), ("nobody", &mut unknown)] {
            let t = Instant::now();
            let r = login(f.port, name, &format!("guess-{i}"));
            times.push(t.elapsed());
            assert_eq!(r.status, 401);
            // The same but for the request id, which every answer has.
            let mut body = r.json();
            assert!(body["request_id"].is_string(), "{body}");
            body["request_id"] = serde_json::Value::Null;
            bodies.insert(body.to_string());
        }
    }
    assert_eq!(bodies.len(), 1, "one body for both: {bodies:?}");
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (w, u) = (median(&mut wrong), median(&mut unknown));
    let ratio = w.as_secs_f64() / u.as_secs_f64();
    eprintln!("login 401 medians: wrong password {w:?}, unknown user {u:?}, ratio {ratio:.3}");
    // Interleaved, so load slows both alike; a skipped hash (~1 ms against
    // ~16 ms) would put the ratio far outside this band.
    assert!((0.5..=2.0).contains(&ratio), "wrong {w:?} vs unknown {u:?}");
}

fn two_hundred_parallel_logins_do_not_stall_the_event_loop(redis: &impl Backend) {
    let f = Forkd::start_with_redis(
        redis,
        "workers = 2\n[auth]\nlogin_ip_limit = 100000\nlogin_user_limit = 100000\nlogin_user_all_limit = 100000\nlogin_host_limit = 100000\nmax_concurrent_hashes = 2\nhash_queue_timeout = 0.2\n",
    );
    f.add_user("kim", PW);
    let port = f.port;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe_stop = stop.clone();
    let probe = std::thread::spawn(move || {
        let mut latencies = Vec::new();
        while !probe_stop.load(Ordering::Relaxed) && latencies.len() < 100_000 {
            let t = Instant::now();
            let r = get(port, "/healthz").unwrap();
            latencies.push(t.elapsed());
            assert_eq!(r.status, 200);
            std::thread::sleep(Duration::from_millis(5));
        }
        latencies
    });
    let results = concurrently(200, move |i| {
        let pw = if i % 2 == 0 { PW } else { "wrong" };
        let body = serde_json::json!({"username": "kim", "password": pw}).to_string();
        request(
            port,
            "POST",
            "/login",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
    });
    stop.store(true, Ordering::Relaxed);
    let mut latencies = probe.join().unwrap();
    let mut counts: HashMap<u16, usize> = HashMap::new();
    for r in &results {
        let r = r.as_ref().expect("every login is answered");
        *counts.entry(r.status).or_default() += 1;
        match r.status {
            200 | 401 => {}
            503 => {
                assert!(r.header("retry-after").is_some());
                assert_eq!(r.json()["type"], "urn:forkd:problem:unavailable");
            }
            s => panic!("unexpected status {s}: {r:?}"),
        }
    }
    latencies.sort();
    let p90 = latencies[latencies.len() * 9 / 10];
    let max = *latencies.last().unwrap();
    eprintln!(
        "200 parallel logins: {counts:?}; /healthz during them: {} probes, p90 {p90:?}, max {max:?}",
        latencies.len()
    );
    // Hashes ran: at least one semaphore's capacity (2; all the logins may
    // land on one worker) got a real answer before any 503, and the queue
    // was bounded (some 503s). Every /healthz probe during the burst was
    // answered (asserted in the probe); how fast is bin/bench's to measure.
    let answered = counts.get(&200).unwrap_or(&0) + counts.get(&401).unwrap_or(&0);
    assert!(answered >= 2, "{counts:?}");
    assert!(counts.get(&503).is_some_and(|&n| n > 0), "{counts:?}");
    assert!(!latencies.is_empty());
    // With the burst over, logins are answered normally again.
    assert_eq!(login(f.port, "kim", PW).status, 200);
}

#[test]
fn redis_going_away_gives_503s_without_restarts_and_service_resumes() {
    let mut redis = RedisServer::start();
    let f = Forkd::start_with_redis(&redis, BASE);
    let workers = f.wait_ready();
    f.add_user("leo", PW);
    let t = token(f.port, "leo", PW);
    assert_eq!(get(f.port, "/readyz").unwrap().status, 200);

    redis.kill();
    let r = poll(PATIENCE, || {
        let r = profile(f.port, &t).ok()?;
        (r.status == 503).then_some(r)
    })
    .expect("503 once Redis is gone");
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert!(r.header("retry-after").is_some());
    assert!(
        !r.body.contains("redis://"),
        "no internal detail: {}",
        r.body
    );
    assert_eq!(login(f.port, "leo", PW).status, 503);
    assert_eq!(get(f.port, "/readyz").unwrap().status, 503);
    assert_eq!(get(f.port, "/healthz").unwrap().status, 200);
    // A while without Redis: still no worker restarts.
    for _ in 0..20 {
        assert_eq!(profile(f.port, &t).unwrap().status, 503);
        std::thread::sleep(Duration::from_millis(25));
    }
    // Many failed requests, few warnings: at most one a second per worker
    // (the bound follows the time the burst took, however long).
    let warnings = || f.log_text().matches("WARN").count();
    let (before, started) = (warnings(), Instant::now());
    for _ in 0..300 {
        assert_eq!(profile(f.port, &t).unwrap().status, 503);
    }
    let allowed = workers.len() * (started.elapsed().as_secs() as usize + 2);
    let logged = warnings() - before;
    eprintln!("300 requests without Redis: {logged} warning lines (at most {allowed})");
    assert!(logged <= allowed, "{logged} warnings:\n{}", f.log_text());

    redis.spawn();
    let back = Instant::now();
    // Resumed means every worker serves again.
    let mut served = HashSet::new();
    poll(PATIENCE, || {
        let r = profile(f.port, &t).ok()?;
        if r.status == 200 {
            served.insert(r.pid());
        }
        (served.len() == workers.len()).then_some(())
    })
    .expect("service resumes on every worker");
    let took = back.elapsed();
    eprintln!("service resumed on every worker {took:?} after Redis answered again");
    assert_eq!(get(f.port, "/readyz").unwrap().status, 200);
    assert_eq!(f.wait_ready(), workers, "no worker was restarted");
    let status = f.status().unwrap();
    assert!(status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|w| w["restarts"] == 0));
}

/// Expected status, method, path, headers, body.
type Case<'a> = (u16, &'a str, &'a str, Vec<(&'a str, &'a str)>, Vec<u8>);

fn bad_input_gets_problems_and_never_reaches_argon2_or_redis(redis: &impl Backend) {
    // Redis' own count of commands is the measure, so without the near
    // cache, whose liveness checks (a PING and CLIENT TRACKINGINFO a second
    // on each primary, with CLUSTER NODES and CLUSTER INFO on a cluster)
    // belong to no request.
    let f = Forkd::start_with_redis(redis, &with(BASE, "[redis]\nnear_cache_mib = 0\n"));
    f.add_user("mia", PW);
    let json = [("Content-Type", "application/json")];
    let long = "x".repeat(1025);
    let before = redis.commands_processed();
    let cases: Vec<Case> = vec![
        (
            413,
            "POST",
            "/login",
            json.to_vec(),
            format!("{{\"username\":\"{}\"}}", "a".repeat(17 * 1024)).into_bytes(),
        ),
        (
            415,
            "POST",
            "/login",
            vec![("Content-Type", "text/plain")],
            b"{}".to_vec(),
        ),
        (
            415,
            "POST",
            "/login",
            vec![],
            b"{\"username\":\"mia\",\"password\":\"x\"}".to_vec(),
        ),
        (
            400,
            "POST",
            "/login",
            json.to_vec(),
            b"{\"username\": ".to_vec(),
        ),
        (400, "POST", "/login", json.to_vec(), b"[1,2]".to_vec()),
        (
            400,
            "POST",
            "/login",
            json.to_vec(),
            b"{\"password\":\"x\"}".to_vec(),
        ),
        (
            400,
            "POST",
            "/login",
            json.to_vec(),
            b"{\"username\":\"mia\"}".to_vec(),
        ),
        (
            400,
            "POST",
            "/login",
            json.to_vec(),
            b"{\"username\":\"\",\"password\":\"x\"}".to_vec(),
        ),
        (
            400,
            "POST",
            "/login",
            json.to_vec(),
            b"{\"username\":\"mia\",\"password\":\"\"}".to_vec(),
        ),
        (
            400,
            "POST",
            "/login",
            json.to_vec(),
            b"{\"username\":7,\"password\":\"x\"}".to_vec(),
        ),
        (
            400,
            "POST",
            "/login",
            json.to_vec(),
            format!("{{\"username\":\"{long}\",\"password\":\"x\"}}").into_bytes(),
        ),
        (
            400,
            "POST",
            "/login",
            json.to_vec(),
            format!("{{\"username\":\"mia\",\"password\":\"{long}\"}}").into_bytes(),
        ),
        (
            400,
            "POST",
            "/login",
            json.to_vec(),
            b"{\"username\":\"mi\xff\",\"password\":\"x\"}".to_vec(),
        ),
        // Names no user can have (the rule of `forkd user add`): a `{`
        // would steer Redis Cluster's hash slot.
        (
            400,
            "POST",
            "/login",
            json.to_vec(),
            b"{\"username\":\"a{b}c\",\"password\":\"x\"}".to_vec(),
        ),
        (
            400,
            "POST",
            "/login",
            json.to_vec(),
            b"{\"username\":\"mia smith\",\"password\":\"x\"}".to_vec(),
        ),
        (
            400,
            "POST",
            "/login",
            json.to_vec(),
            b"{\"username\":\"mi\\u0001a\",\"password\":\"x\"}".to_vec(),
        ),
        (
            400,
            "POST",
            "/login",
            json.to_vec(),
            format!("{{\"username\":\"{}\",\"password\":\"x\"}}", "m".repeat(65)).into_bytes(),
        ),
        (405, "GET", "/login", vec![], vec![]),
        (405, "PUT", "/profile", vec![], vec![]),
        (405, "GET", "/logout", vec![], vec![]),
        (401, "GET", "/profile", vec![], vec![]),
        (
            401,
            "GET",
            "/profile",
            vec![("Authorization", "Basic bWlhOng=")],
            vec![],
        ),
        (
            401,
            "GET",
            "/profile",
            vec![("Authorization", "Bearer not-a-token")],
            vec![],
        ),
        (
            401,
            "POST",
            "/logout",
            vec![("Authorization", "Bearer ")],
            vec![],
        ),
    ];
    for (status, method, path, headers, body) in &cases {
        let r = request(f.port, method, path, headers, body).unwrap();
        assert_eq!(r.status, *status, "{method} {path} {headers:?}: {r:?}");
        assert_eq!(
            r.header("content-type"),
            Some("application/problem+json"),
            "{r:?}"
        );
        assert_eq!(r.json()["status"], *status);
        assert!(r.json()["type"]
            .as_str()
            .unwrap()
            .starts_with("urn:forkd:problem:"));
        match status {
            405 => assert!(r.header("allow").is_some()),
            401 => assert!(r.header("www-authenticate").unwrap().starts_with("Bearer")),
            _ => {}
        }
        if *path == "/profile" && *method == "GET" {
            assert_eq!(
                r.header("cache-control"),
                Some("private, no-store"),
                "{r:?}"
            );
        }
    }
    // A body announced as huge is refused before it is read.
    let r = raw(
        f.port,
        "POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 999999999\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert_eq!(r.status, 413);
    // Only the INFO that measures it reached Redis.
    let after = redis.commands_processed();
    assert_eq!(after - before, redis.info_cost(), "bad input reached Redis");
    // A well-formed token that is no session gets no log line, however
    // often it comes (its one round trip: tests/metrics.rs).
    let lines = f.log_text().lines().count();
    let bogus = format!("Bearer {}.{}", "A".repeat(12), "A".repeat(43));
    for _ in 0..20 {
        let r = request(f.port, "GET", "/profile", &[("Authorization", &bogus)], b"").unwrap();
        assert_eq!(r.status, 401, "{r:?}");
        assert_eq!(r.header("cache-control"), Some("private, no-store"));
    }
    assert_eq!(f.log_text().lines().count(), lines, "{}", f.log_text());
    // The workers are still the same and fine.
    assert_eq!(login(f.port, "mia", PW).status, 200);
    assert!(f.status().unwrap()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|w| w["restarts"] == 0));
}

fn login_limits_apply_per_client_address_and_per_username(redis: &impl Backend) {
    let trusted = "workers = 1\n[http]\ntrusted_proxies = [\"127.0.0.1\"]\n\
        [auth]\nlogin_ip_limit = 2\nlogin_user_limit = 3\nlogin_user_all_limit = 3\n";
    let f = Forkd::start_with_redis(redis, trusted);
    f.add_user("ned", PW);
    let attempt = |xff: &str, user: &str| {
        let body = serde_json::json!({"username": user, "password": "wrong"}).to_string();
        request(
            f.port,
            "POST",
            "/login",
            &[
                ("Content-Type", "application/json"),
                ("X-Forwarded-For", xff),
            ],
            body.as_bytes(),
        )
        .unwrap()
    };
    // Client A: two attempts, then 429 (before any hashing).
    assert_eq!(attempt("198.51.100.1", "u1").status, 401);
    assert_eq!(attempt("198.51.100.1", "u2").status, 401);
    let r = attempt("198.51.100.1", "u3");
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    // Client B has its own budget; an IPv6 /64 is one client.
    assert_eq!(attempt("198.51.100.2", "u4").status, 401);
    assert_eq!(attempt("2001:db8:1:2::1", "u5").status, 401);
    assert_eq!(attempt("2001:db8:1:2::2", "u6").status, 401);
    assert_eq!(attempt("2001:db8:1:2::3", "u7").status, 429);
    // Per username over all addresses (the loose ceiling, small here): 3
    // failures, then 429.
    assert_eq!(attempt("203.0.113.1", "ned").status, 401);
    assert_eq!(attempt("203.0.113.2", "ned").status, 401);
    assert_eq!(attempt("203.0.113.3", "ned").status, 401);
    assert_eq!(attempt("203.0.113.4", "ned").status, 429);

    // Without trusted proxies, X-Forwarded-For is ignored: one budget.
    let g = Forkd::start_with_redis(
        redis,
        "workers = 1\n[redis]\nprefix = \"other:\"\n[auth]\nlogin_ip_limit = 2\nlogin_user_limit = 100\n",
    );
    let attempt = |xff: &str, user: &str| {
        let body = serde_json::json!({"username": user, "password": "wrong"}).to_string();
        request(
            g.port,
            "POST",
            "/login",
            &[
                ("Content-Type", "application/json"),
                ("X-Forwarded-For", xff),
            ],
            body.as_bytes(),
        )
        .unwrap()
        .status
    };
    assert_eq!(attempt("198.51.100.7", "a"), 401);
    assert_eq!(attempt("198.51.100.8", "b"), 401);
    assert_eq!(attempt("198.51.100.9", "c"), 429);
}

fn stored_hashes_with_old_parameters_are_upgraded_at_login(redis: &impl Backend) {
    let cheap = "workers = 1\n[auth]\nargon2_memory_kib = 1024\nargon2_iterations = 1\n";
    let f = Forkd::start_with_redis(redis, cheap);
    f.add_user("olga", PW);
    let phc = redis.raw(&["HGET", "forkd:user:olga", "phc"]).join("");
    assert!(phc.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"), "{phc}");
    drop(f);
    let g = Forkd::start_with_redis(
        redis,
        "workers = 1\n[auth]\nlogin_ip_limit = 100000\nlogin_user_limit = 100000\n\
         login_user_all_limit = 100000\nlogin_host_limit = 100000\n",
    );
    // Until she logs in, a wrong password for her cheap hash takes as long
    // as for an unknown user (interleaved medians; a 1 MiB, t=1 verify is
    // ~30 times faster than the current one, so unpadded it is far out).
    // Warm up both paths first (the hashing threads' argon2 memory, the
    // connections), as the equal-timing test does: a cold first verify
    // is a page-fault pass, not a timing signal.
    login(g.port, "nobody", "wrong");
    let (mut olga, mut nobody) = (Vec::new(), Vec::new());
    for _ in 0..9 {
        for (user, times) in [("olga", &mut olga), ("nobody", &mut nobody)] {
            let t = Instant::now();
            assert_eq!(login(g.port, user, "wrong").status, 401);
            times.push(t.elapsed());
        }
    }
    olga.sort();
    nobody.sort();
    let ratio = olga[4].as_secs_f64() / nobody[4].as_secs_f64();
    eprintln!(
        "401 medians: old hash {:?}, unknown {:?}, ratio {ratio:.2}",
        olga[4], nobody[4]
    );
    assert!(
        (0.5..=2.0).contains(&ratio),
        "old hash {:?} vs unknown {:?}",
        olga[4],
        nobody[4]
    );
    assert_eq!(login(g.port, "olga", PW).status, 200);
    let phc = redis.raw(&["HGET", "forkd:user:olga", "phc"]).join("");
    assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
    assert_eq!(login(g.port, "olga", PW).status, 200);
}

#[test]
fn managed_redis_keeps_sessions_across_restarts_and_is_respawned() {
    // No redis.url: forkd runs its own redis-server (socket in the runtime
    // dir, append-only file in the data dir).
    let mut f = Forkd::start("workers = 1\nshutdown_timeout = 5\n");
    let status = f.status().unwrap();
    let redis_pid = status["redis"]["pid"]
        .as_i64()
        .expect("a managed redis-server") as i32;
    assert!(f.dir.path().join("run/forkd-redis.sock").exists());
    poll(PATIENCE, || {
        (get(f.port, "/readyz").ok()?.status == 200).then_some(())
    })
    .expect("ready once the managed redis-server answers");
    // The workers were started once it answered, not before.
    let log = f.log_text();
    assert!(!log.contains("starting without Redis"), "{log}");
    assert!(
        log.find("redis-server started").unwrap() < log.find("worker slot 0 started").unwrap(),
        "{log}"
    );
    f.add_user("pia", PW);
    let t = token(f.port, "pia", PW);
    assert_eq!(profile(f.port, &t).unwrap().status, 200);

    // The supervisor brings a dead redis-server back.
    signal(redis_pid, nix::sys::signal::Signal::SIGKILL);
    let new_pid = poll(PATIENCE, || {
        let p = f.status()?["redis"]["pid"].as_i64()? as i32;
        (p != redis_pid).then_some(p)
    })
    .expect("redis-server respawned");
    assert!(alive(new_pid));
    poll(PATIENCE, || {
        (profile(f.port, &t).ok()?.status == 200).then_some(())
    })
    .expect("the session survived the redis-server restart");

    // And across a restart of forkd itself.
    signal(f.pid(), nix::sys::signal::Signal::SIGTERM);
    assert_eq!(f.wait_exit(PATIENCE), Some(0));
    assert!(!alive(new_pid), "the managed redis-server stops with forkd");
    f.spawn(&[]);
    f.wait_ready();
    poll(PATIENCE, || {
        (profile(f.port, &t).ok()?.status == 200).then_some(())
    })
    .expect("the session survived a restart of forkd");
}

#[test]
fn missing_redis_server_is_a_clear_error() {
    let f = Forkd::configure("workers = 1\n[redis]\nserver = \"/nonexistent/redis-server\"\n");
    let out = f.cli(&["start"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not installed") && err.contains("apt-get install redis-server"),
        "{err}"
    );
    assert!(port_free(f.port));
}

/// Login statuses of 4 attempts (distinct users, one client) against a
/// forkd with `config` whose Redis has just died.
fn logins_without_redis(config: &str) -> Vec<u16> {
    let mut redis = RedisServer::start();
    let f = Forkd::start_with_redis(&redis, config);
    redis.kill();
    poll(PATIENCE, || {
        (get(f.port, "/readyz").ok()?.status == 503).then_some(())
    })
    .expect("the worker notices");
    (0..4)
        .map(|i| login(f.port, &format!("u{i}"), "x").status)
        .collect()
}

#[test]
fn login_limits_hold_per_worker_while_redis_is_down() {
    // Default on_redis_error = "local": limit / workers in each worker.
    // Within the limit the login itself needs Redis (503); past it, 429.
    assert_eq!(
        logins_without_redis("workers = 1\n[auth]\nlogin_ip_limit = 2\nlogin_user_limit = 100\n"),
        vec![503, 503, 429, 429]
    );
    // "fail_closed": 503 from the limiter itself, every time.
    assert_eq!(
        logins_without_redis(
            "workers = 1\n[auth]\nlogin_ip_limit = 2\n[rate_limit]\non_redis_error = \"fail_closed\"\n"
        ),
        vec![503, 503, 503, 503]
    );
}

/// Statuses of 4 anonymous requests to a route with a policy of 2 (one
/// client) against a forkd with `mode` whose Redis has just died.
fn route_policy_without_redis(mode: &str) -> Vec<u16> {
    let mut redis = RedisServer::start();
    let api = Upstream::tcp();
    let config = format!(
        "workers = 1\n[rate_limit]\non_redis_error = \"{mode}\"\n\
         [rate_limit.policy.pub]\nlimit = 2\nwindow = 600\nkey = \"client\"\n\
         [[route]]\nprefix = \"/pub\"\nupstream = \"{}\"\nauth = \"none\"\npolicies = [\"pub\"]\n",
        api.url()
    );
    let f = Forkd::start_with_redis(&redis, &config);
    redis.kill();
    poll(PATIENCE, || {
        (get(f.port, "/readyz").ok()?.status == 503).then_some(())
    })
    .expect("the worker notices");
    (0..4)
        .map(|_| get(f.port, "/pub/x").unwrap().status)
        .collect()
}

/// `rate_limit.on_redis_error` means the same for a route's policies as
/// for the login limits: one limiter.
#[test]
fn route_policies_follow_on_redis_error_like_the_login_limits() {
    assert_eq!(
        route_policy_without_redis("local"),
        vec![200, 200, 429, 429]
    );
    assert_eq!(route_policy_without_redis("fail_open"), vec![200; 4]);
    assert_eq!(route_policy_without_redis("fail_closed"), vec![503; 4]);
}

/// Failures from one address cannot lock a user out at another, and
/// successes use up no budget; a guesser spread over many addresses still
/// meets the per-username ceiling. 127.0.0.x are distinct clients.
fn a_user_cannot_be_locked_out_from_another_address(redis: &impl Backend) {
    let f = Forkd::start_with_redis(
        redis,
        "workers = 2\n[auth]\nlogin_ip_limit = 1000\nlogin_user_limit = 5\nlogin_user_all_limit = 12\n",
    );
    f.add_user("ned", PW);
    let attempt = |from: &str, password: &str| {
        let body = serde_json::json!({"username": "ned", "password": password}).to_string();
        let json = [("Content-Type", "application/json")];
        request_from(from, f.port, "POST", "/login", &json, body.as_bytes())
            .unwrap()
            .status
    };
    // An attacker at 127.0.0.2 uses up its own budget for ned...
    for _ in 0..5 {
        assert_eq!(attempt("127.0.0.2", "wrong"), 401);
    }
    assert_eq!(attempt("127.0.0.2", "wrong"), 429);
    assert_eq!(attempt("127.0.0.2", PW), 429, "even with the password");
    // ...and ned, at 127.0.0.1, logs in, eight times in a row.
    for i in 0..8 {
        assert_eq!(attempt("127.0.0.1", PW), 200, "good login {i}");
    }
    // A guesser spread over addresses meets the ceiling of 12 failures (5
    // were spent above): 127.0.0.3 five, 127.0.0.4 two, then 429 anywhere.
    for _ in 0..5 {
        assert_eq!(attempt("127.0.0.3", "wrong"), 401);
    }
    for _ in 0..2 {
        assert_eq!(attempt("127.0.0.4", "wrong"), 401);
    }
    assert_eq!(attempt("127.0.0.5", "wrong"), 429);
}

/// Logins racing `forkd user passwd` and `forkd user revoke`: no session
/// made with the old password outlives the change, even one created after
/// it returned by a login that had read the old hash; no session from
/// before a revoke outlives it; logins after either work. And a session of
/// a deleted user never reaches a new user of the same name.
/// Requests the current workers have served.
fn served(f: &Forkd) -> u64 {
    f.status().unwrap()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["requests"].as_u64().unwrap_or(0))
        .sum()
}

fn logins_racing_passwd_and_revoke_never_outlive_them(redis: &impl Backend) {
    let f = Forkd::start_with_redis(redis, BASE);
    // Logins in a loop on 4 threads until told to stop: (started,
    // finished, token) of each that got one.
    let race = |user: &'static str, password: &'static str, stop: Arc<AtomicBool>| {
        let port = f.port;
        (0..4)
            .map(move |_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    for _ in 0..10_000 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let started = Instant::now();
                        let r = login(port, user, password);
                        if r.status == 200 {
                            let t = r.json()["token"].as_str().unwrap().to_owned();
                            got.push((started, Instant::now(), t));
                        }
                    }
                    got
                })
            })
            .collect::<Vec<_>>()
    };
    let join = |threads: Vec<std::thread::JoinHandle<Vec<(Instant, Instant, String)>>>| {
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect::<Vec<_>>()
    };

    f.add_user("rex", PW);
    let stop = Arc::new(AtomicBool::new(false));
    let base = served(&f);
    let threads = race("rex", PW, stop.clone());
    wait_served(&f, base + 8);
    f.passwd("rex", "rex-new");
    // Logins go on for a while after the change returned (some were in
    // flight with the old hash).
    wait_served(&f, served(&f) + 8);
    stop.store(true, Ordering::Relaxed);
    let tokens = join(threads);
    assert!(!tokens.is_empty());
    for (_, _, t) in &tokens {
        assert_eq!(
            profile(f.port, t).unwrap().status,
            401,
            "an old-password session lives"
        );
    }
    assert_eq!(login(f.port, "rex", PW).status, 401);
    assert_eq!(login(f.port, "rex", "rex-new").status, 200);

    f.add_user("sam", PW);
    let stop = Arc::new(AtomicBool::new(false));
    let base = served(&f);
    let threads = race("sam", PW, stop.clone());
    wait_served(&f, base + 8);
    let revoking = Instant::now();
    let out = f.cli(&["user", "revoke", "sam"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revoked = Instant::now();
    // Logins go on for a while after the revoke returned.
    wait_served(&f, served(&f) + 8);
    stop.store(true, Ordering::Relaxed);
    let tokens = join(threads);
    let (mut before, mut after) = (0, 0);
    for (started, finished, t) in &tokens {
        let status = profile(f.port, t).unwrap().status;
        if *finished < revoking {
            assert_eq!(status, 401, "a session from before the revoke lives");
            before += 1;
        } else if *started > revoked {
            assert_eq!(status, 200, "a session from after the revoke is refused");
            after += 1;
        }
    }
    assert!(before > 0 && after > 0, "{before} before, {after} after");

    // A session of a deleted user does not reach a new one of that name.
    f.add_user("tom", PW);
    let old = token(f.port, "tom", PW);
    assert!(f.cli(&["user", "del", "tom"]).status.success());
    f.add_user("tom", "tom-again");
    assert_eq!(profile(f.port, &old).unwrap().status, 401);
    let new = token(f.port, "tom", "tom-again");
    assert_eq!(profile(f.port, &new).unwrap().status, 200);
}

/// All logins of the host together meet `auth.login_host_limit` (shared
/// out among the workers), whatever their addresses and names.
#[test]
fn the_host_wide_login_rate_holds_behind_the_per_client_limits() {
    let redis = RedisServer::start();
    let f = Forkd::start_with_redis(
        &redis,
        "workers = 1\n[auth]\nlogin_ip_limit = 1000\nlogin_host_limit = 3\nlogin_host_window = 3600\n",
    );
    let statuses: Vec<u16> = (2..7)
        .map(|i| {
            let body = serde_json::json!({"username": format!("u{i}"), "password": "x"});
            let json = [("Content-Type", "application/json")];
            let from = format!("127.0.0.{i}");
            request_from(
                &from,
                f.port,
                "POST",
                "/login",
                &json,
                body.to_string().as_bytes(),
            )
            .unwrap()
            .status
        })
        .collect();
    assert_eq!(statuses, vec![401, 401, 401, 429, 429]);
}

/// Every API test above, against one redis-server and against a Redis
/// Cluster of 3 primaries and 3 replicas.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use super::*;
                #[test]
                fn single_redis() {
                    super::$name(&RedisServer::start());
                }
                #[test]
                fn redis_cluster() {
                    super::$name(&RedisCluster::start());
                }
            }
        )*
    };
}

on_both!(
    login_on_one_worker_profile_on_the_other_and_logout_everywhere,
    rate_limit_of_10_holds_exactly_across_workers,
    profile_cache_misses_then_hits_and_50_misses_make_one_origin_call,
    profile_origin_errors_are_problems,
    sessions_expire_when_idle_and_at_the_absolute_limit,
    password_change_revoke_and_delete_end_every_session,
    redis_never_holds_a_token,
    wrong_password_and_unknown_user_look_and_take_the_same,
    two_hundred_parallel_logins_do_not_stall_the_event_loop,
    bad_input_gets_problems_and_never_reaches_argon2_or_redis,
    login_limits_apply_per_client_address_and_per_username,
    a_user_cannot_be_locked_out_from_another_address,
    logins_racing_passwd_and_revoke_never_outlive_them,
    stored_hashes_with_old_parameters_are_upgraded_at_login,
);
