//! What operators run forkd with: recycling by requests, memory and age
//! under load; the pause before a stop; the access log and request ids;
//! what a stuck worker was doing; saturation figures.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;

const PW: &str = "operations-secret";

/// Workers of `s` by slot, leaving out those already on their way out.
fn live_by_slot(s: &Value) -> HashMap<u64, usize> {
    let mut by_slot = HashMap::new();
    for w in s["workers"].as_array().into_iter().flatten() {
        if w["state"] == "stopping" || w["state"] == "draining" {
            continue;
        }
        *by_slot.entry(w["slot"].as_u64().unwrap()).or_insert(0) += 1;
    }
    by_slot
}

fn recycled(s: &Value, reason: &str) -> u64 {
    s["recycled"][reason].as_u64().unwrap_or(0)
}

/// Runs a request loop until `enough` holds for a status report, checking
/// at every report that at most one slot has a second live worker (its
/// successor). Returns the last status and what the loop saw.
fn under_load_until(f: &Forkd, mut enough: impl FnMut(&Value) -> bool) -> (Value, LoadResult) {
    let load = Load::start(f.port, 4, "/healthz");
    let mut last = Value::Null;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut reports = 0;
    while Instant::now() < deadline && reports < 100_000 {
        reports += 1;
        let Some(s) = f.status() else { continue };
        let doubled = live_by_slot(&s).values().filter(|&&n| n > 1).count();
        assert!(doubled <= 1, "more than one slot recycling at once: {s:#}");
        if enough(&s) {
            last = s;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let res = load.finish();
    assert!(!last.is_null(), "not done in time; log:\n{}", f.log_text());
    (last, res)
}

fn assert_no_failures(res: &LoadResult, f: &Forkd) {
    assert!(res.ok > 0);
    assert_eq!(
        res.failed,
        0,
        "failed requests: {:?}\nlog:\n{}",
        &res.errors[..res.errors.len().min(5)],
        f.log_text()
    );
}

fn last_replaced(s: &Value) -> Vec<String> {
    s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["last_replaced"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn max_requests_recycles_one_slot_at_a_time_without_a_failed_request() {
    let f = Forkd::start("workers = 2\n[recycle]\nmax_requests = 300\nmax_requests_jitter = 100\n");
    let first = f.wait_ready();
    let (s, res) = under_load_until(&f, |s| recycled(s, "max_requests") >= 4);
    assert_no_failures(&res, &f);
    assert!(
        last_replaced(&s).iter().any(|r| r.contains("max_requests")),
        "{s:#}"
    );
    // Recycled workers are new processes; no restart was counted.
    let now = f.wait_ready();
    assert!(now.iter().all(|p| !first.contains(p)), "{first:?} {now:?}");
    assert!(s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|w| w["restarts"] == 0));
    let text = f.cli(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("last replaced: recycled: max_requests"),
        "{text}"
    );
}

#[test]
fn max_age_recycles_without_a_failed_request() {
    let f = Forkd::start("workers = 2\n[recycle]\nmax_age = 2\n");
    let (s, res) = under_load_until(&f, |s| recycled(s, "max_age") >= 3);
    assert_no_failures(&res, &f);
    assert!(
        last_replaced(&s).iter().any(|r| r.contains("max_age")),
        "{s:#}"
    );
}

#[test]
fn max_rss_recycles_a_worker_whose_memory_grew() {
    let f = Forkd::start("workers = 1\n[recycle]\nmax_rss = 0\n");
    f.add_user("alice", PW);
    let idle = f.status().unwrap()["workers"][0]["rss_bytes"]
        .as_u64()
        .unwrap();
    // A line above this build's idle worker that the argon2 memory of a
    // login (19 MiB a hashing thread) crosses; a new worker is well below
    // 90 % of it.
    let limit = (idle >> 20) + 12;
    let text = std::fs::read_to_string(&f.config).unwrap();
    let text = text.replace("max_rss = 0", &format!("max_rss = {}", limit.max(32)));
    std::fs::write(&f.config, text).unwrap();
    let out = f.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    f.wait_ready();
    let port = f.port;
    let stop = Arc::new(AtomicBool::new(false));
    let logins: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut statuses = Vec::new();
                for _ in 0..5_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    statuses.push(login(port, "alice", PW).status);
                }
                statuses
            })
        })
        .collect();
    let (s, res) = under_load_until(&f, |s| recycled(s, "max_rss") >= 1);
    stop.store(true, Ordering::Relaxed);
    for t in logins {
        let statuses = t.join().unwrap();
        assert!(
            statuses.iter().all(|&c| c == 200 || c == 429),
            "logins failed: {statuses:?}"
        );
    }
    assert_no_failures(&res, &f);
    assert!(
        last_replaced(&s).iter().any(|r| r.contains("max_rss")),
        "{s:#}"
    );
}

#[test]
fn shutdown_delay_fails_readyz_at_once_and_keeps_serving_then_drains() {
    let mut f = Forkd::start("workers = 2\nshutdown_delay = 3\n");
    f.add_user("bob", PW);
    assert_eq!(f.get("/readyz").unwrap().status, 200);
    let term = Instant::now();
    signal(f.pid(), Signal::SIGTERM);
    let mut first_503 = None;
    let mut last_served = Duration::ZERO;
    let mut served_in_window = 0;
    let mut logged_in = false;
    // Until the supervisor has gone, bounded.
    for _ in 0..100_000 {
        let at = term.elapsed();
        if at > Duration::from_secs(30) {
            break;
        }
        match (f.get("/healthz"), f.get("/readyz")) {
            (Ok(h), Ok(r)) => {
                assert_eq!(h.status, 200, "{h:?}");
                if r.status == 503 {
                    first_503.get_or_insert(at);
                    assert_eq!(r.json()["type"], "urn:forkd:problem:unavailable");
                } else {
                    assert!(first_503.is_none(), "/readyz was 503, then {r:?}");
                }
                last_served = at;
                served_in_window += 1;
                if first_503.is_some() && !logged_in {
                    // The API answers during the pause too.
                    assert_eq!(login(f.port, "bob", PW).status, 200);
                    logged_in = true;
                }
            }
            // The drain has begun: new connections are refused.
            _ => {
                // Every request up to 2 s after TERM was served: the drain
                // starts only at 3 s, however late this loop runs.
                assert!(at >= Duration::from_secs(2), "refused at {at:?}");
                break;
            }
        }
    }
    let first_503 = first_503.expect("/readyz answered 503 during the delay");
    assert!(logged_in);
    assert!(last_served >= Duration::from_secs(2), "{last_served:?}");
    eprintln!(
        "/readyz turned 503 {first_503:?} after TERM; {served_in_window} pairs served in the pause"
    );
    assert_eq!(f.wait_exit(PATIENCE), Some(0));
    assert!(f
        .log_text()
        .contains("draining in 3000 ms (shutdown_delay)"));
}

/// `GET path` with an `X-Request-Id` (and optionally a bearer token).
fn get_with_id(port: u16, path: &str, id: &str, token: Option<&str>) -> Response {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("X-Request-Id", id)];
    if let Some(a) = &auth {
        headers.push(("Authorization", a));
    }
    request(port, "GET", path, &headers, b"").unwrap()
}

fn access_lines(path: &Path, at_least: usize) -> Vec<String> {
    poll(PATIENCE, || {
        let text = std::fs::read_to_string(path).ok()?;
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        (lines.len() >= at_least).then_some(lines)
    })
    .unwrap_or_else(|| panic!("fewer than {at_least} access lines in {}", path.display()))
}

#[test]
fn json_access_log_has_every_request_once_with_its_id_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("access.log");
    let f = Forkd::start(&format!(
        "workers = 2\naccess_log = \"json\"\naccess_log_file = \"{}\"\n",
        file.display()
    ));
    f.add_user("carol", PW);
    let token = token(f.port, "carol", PW);
    let mut sent = vec![];
    for i in 0..40 {
        let id = format!("test-{i}");
        let r = match i % 4 {
            0 => get_with_id(f.port, "/healthz", &id, None),
            1 => get_with_id(f.port, "/profile?token=x", &id, Some(&token)),
            2 => get_with_id(f.port, "/nope", &id, None),
            _ => get_with_id(f.port, "/healthz", "bad id with spaces", None),
        };
        let echoed = r.header("x-request-id").expect("x-request-id").to_owned();
        if i % 4 == 3 {
            assert_ne!(echoed, "bad id with spaces");
        } else {
            assert_eq!(echoed, id);
        }
        if r.status == 404 {
            assert_eq!(r.json()["request_id"], echoed.as_str(), "{r:?}");
        }
        sent.push((echoed, r.status));
    }
    // The login's line too: 41 requests.
    let lines = access_lines(&file, sent.len() + 1);
    assert_eq!(lines.len(), sent.len() + 1, "{lines:#?}");
    let parsed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    for (id, status) in &sent {
        let mine: Vec<&Value> = parsed
            .iter()
            .filter(|v| v["request_id"] == id.as_str())
            .collect();
        assert_eq!(mine.len(), 1, "{id}: {mine:?}");
        assert_eq!(mine[0]["status"], *status);
        assert_eq!(mine[0]["client"], "127.0.0.1");
        assert!(mine[0]["duration_ms"].as_f64().is_some());
        assert!(mine[0]["pid"].as_u64().is_some() && mine[0]["slot"].as_u64().is_some());
        if mine[0]["path"] == "/profile" {
            assert_eq!(mine[0]["user"], "carol");
            assert_eq!(mine[0]["route"], "profile");
            // Built from the user record: no upstream address.
            assert_eq!(mine[0]["upstream"], Value::Null);
        }
        if mine[0]["path"] == "/healthz" {
            assert_eq!(mine[0]["route"], "healthz");
            assert_eq!(mine[0]["upstream_status"], Value::Null);
            assert_eq!(mine[0]["upstream_ms"], Value::Null);
        }
        if mine[0]["path"] == "/nope" {
            assert_eq!(mine[0]["route"], "other");
        }
    }
    let login_line = parsed.iter().find(|v| v["path"] == "/login").unwrap();
    assert_eq!(login_line["user"], "carol");
    let all = lines.join("\n");
    for secret in [token.as_str(), PW, "Bearer", "token=x"] {
        assert!(!all.contains(secret), "the access log holds {secret:?}");
    }
    // Reopened on USR1: after a rename, lines go to a new file.
    let moved = dir.path().join("access.log.1");
    std::fs::rename(&file, &moved).unwrap();
    signal(f.pid(), Signal::SIGUSR1);
    let fresh = poll(PATIENCE, || {
        get_with_id(f.port, "/healthz", "after-usr1", None);
        let text = std::fs::read_to_string(&file).ok()?;
        text.contains("after-usr1").then_some(text)
    })
    .expect("a new access log file after USR1");
    assert!(fresh
        .lines()
        .all(|l| serde_json::from_str::<Value>(l).is_ok()));
}

#[test]
fn combined_access_log_to_stdout() {
    let f = Forkd::start("workers = 1\naccess_log = \"combined\"\n");
    let r = request(
        f.port,
        "GET",
        "/healthz",
        &[("X-Request-Id", "comb-1"), ("User-Agent", "probe \"x\"")],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let line = poll(PATIENCE, || {
        f.log_text()
            .lines()
            .find(|l| l.contains("rid=comb-1"))
            .map(str::to_owned)
    })
    .expect("a combined line in the output");
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(line.contains("] \"GET /healthz HTTP/1.1\" 200 "), "{line}");
    assert!(line.contains("\"probe \\x22x\\x22\" rt="), "{line}");
    assert!(line.contains(&format!(" pid={} ", r.pid())), "{line}");
}

/// A proxied request's line names its route, the upstream, the upstream's
/// status and time (nginx's `$upstream_*`); `-` where there is none.
#[test]
fn access_lines_name_the_route_and_what_its_upstream_did() {
    let api = Upstream::tcp();
    let closed = free_port();
    let f = Forkd::start(&format!(
        "workers = 1\naccess_log = \"combined\"\n\
         [[route]]\nprefix = \"/api\"\nupstream = \"{}\"\nauth = \"none\"\n\
         [[route]]\nprefix = \"/down\"\nupstream = \"http://127.0.0.1:{closed}\"\nauth = \"none\"\n",
        api.url()
    ));
    assert_eq!(get_with_id(f.port, "/api/x", "up-1", None).status, 200);
    assert_eq!(get_with_id(f.port, "/down/x", "up-2", None).status, 502);
    assert_eq!(get_with_id(f.port, "/healthz", "up-3", None).status, 200);
    let line = |id: &str| {
        poll(PATIENCE, || {
            f.log_text()
                .lines()
                .find(|l| l.contains(&format!("rid={id} ")))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| panic!("no line of {id}: {}", f.log_text()))
    };
    // The upstream's time: seconds, as `rt=`.
    let urt = |l: &str| -> f64 {
        let v = l.rsplit_once(" urt=").map_or("", |(_, v)| v);
        v.parse().unwrap_or_else(|_| panic!("urt of {l}"))
    };
    let ok = line("up-1");
    assert!(
        ok.contains(&format!(" route=/api ua={} us=200 urt=", api.url())),
        "{ok}"
    );
    assert!(urt(&ok) >= 0.0, "{ok}");
    let down = line("up-2");
    assert!(
        down.contains(&format!(
            " route=/down ua=http://127.0.0.1:{closed} us=- urt="
        )),
        "{down}"
    );
    assert!(urt(&down) >= 0.0, "{down}");
    let own = line("up-3");
    assert!(own.ends_with(" route=healthz ua=- us=- urt=-"), "{own}");
}

/// An origin that accepts connections and never answers.
fn silent_origin() -> (std::net::TcpListener, u16) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

#[test]
fn a_stuck_worker_is_killed_with_its_oldest_request_in_the_log() {
    let (_origin, origin_port) = silent_origin();
    let f = Forkd::start(&format!(
        "workers = 2\nworker_timeout = 2\n[profile]\norigin = \"http://127.0.0.1:{origin_port}\"\norigin_timeout = 60\n"
    ));
    f.add_user("dave", PW);
    let token = token(f.port, "dave", PW);
    let port = f.port;
    let waiting = std::thread::spawn(move || {
        // Ends when the worker is killed (or the origin times out).
        let _ = request(
            port,
            "GET",
            "/profile",
            &[
                ("Authorization", &format!("Bearer {token}")),
                ("X-Request-Id", "stuck-42"),
            ],
            b"",
        );
    });
    // forkd status shows the request in flight, on one worker.
    let pid = poll(PATIENCE, || {
        let s = f.status()?;
        s["workers"].as_array()?.iter().find_map(|w| {
            let o = &w["oldest"];
            (w["in_flight"] == 1 && o["request_id"] == "stuck-42" && o["what"] == "GET /profile")
                .then(|| w["pid"].as_i64().unwrap() as i32)
        })
    })
    .unwrap_or_else(|| panic!("no worker shows the request; {:?}", f.status()));
    let text = String::from_utf8_lossy(&f.cli(&["status"]).stdout).into_owned();
    assert!(
        text.contains("oldest request GET /profile (id stuck-42)"),
        "{text}"
    );
    signal(pid, Signal::SIGSTOP);
    let line = poll(PATIENCE, || {
        f.log_text()
            .lines()
            .find(|l| l.contains(&format!("pid {pid} was stuck with")))
            .map(str::to_owned)
    })
    .unwrap_or_else(|| panic!("no forensics line; log:\n{}", f.log_text()));
    assert!(
        line.contains(
            "1 request(s) in flight; the oldest: GET /profile (request id stuck-42) for "
        ),
        "{line}"
    );
    waiting.join().unwrap();
    f.wait_ready();
}

#[test]
fn saturation_figures_in_status_and_metrics() {
    let f = Forkd::start("workers = 2\nbacklog = 128\n[recycle]\nmax_requests = 1000000\n");
    let workers = f.wait_ready();
    // Every worker stopped: connections wait in the accept queue.
    for &p in &workers {
        signal(p, Signal::SIGSTOP);
    }
    let held: Vec<TcpStream> = (0..5)
        .map(|_| TcpStream::connect(("127.0.0.1", f.port)).unwrap())
        .collect();
    let queued = poll(PATIENCE, || {
        let s = f.status()?;
        (s["accept_queue"]["queued"] == 5).then_some(s)
    });
    for &p in &workers {
        signal(p, Signal::SIGCONT);
    }
    let s = queued.unwrap_or_else(|| panic!("queue not seen: {:?}", f.status()));
    assert_eq!(s["accept_queue"]["backlog"], 128);
    for mut c in held {
        let _ = c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    }
    let r = get(f.port, "/metrics").unwrap();
    assert_eq!(r.status, 200);
    let m = parse_exposition(&r.body);
    assert_eq!(m["forkd_listen_backlog{}"], 128.0);
    assert!(m.contains_key("forkd_listen_accept_queue{}"));
    for reason in ["max_requests", "max_rss", "max_age"] {
        assert_eq!(
            m[&format!("forkd_worker_recycles_total{{reason={reason}}}")],
            0.0
        );
    }
    for &p in &workers {
        for name in [
            "forkd_worker_requests_in_flight",
            "forkd_worker_connections",
            "forkd_login_hash_queue",
        ] {
            let key = m
                .keys()
                .find(|k| k.starts_with(&format!("{name}{{pid={p},")))
                .unwrap_or_else(|| panic!("no {name} for pid {p}: {m:#?}"));
            assert!(m[key] >= 0.0);
        }
    }
    // The scrape itself is in flight on the worker that answers it.
    let answering = r.pid();
    let key = m
        .keys()
        .find(|k| {
            k.starts_with(&format!(
                "forkd_worker_requests_in_flight{{pid={answering},"
            ))
        })
        .unwrap();
    assert_eq!(m[key], 1.0);
    let conns = m
        .keys()
        .find(|k| k.starts_with(&format!("forkd_worker_connections{{pid={answering},")))
        .unwrap();
    assert!(m[conns] >= 1.0);
}
