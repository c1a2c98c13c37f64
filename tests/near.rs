//! The near cache (`redis.near_cache_mib`): sessions and cached answers
//! served from a worker's memory, kept true by Redis' invalidations. A
//! warm hit costs Redis nothing; a logout, revocation, password change,
//! `FLUSHALL`, key deleted behind forkd's back or expired reaches every
//! worker; a lost connection or a restarted Redis empties the near cache
//! before it serves again; a fill that an invalidation overtook is not
//! kept.

mod common;

use std::time::{Duration, Instant};

use common::*;

const PW: &str = "near-secret";

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// The first `n` samples of the near cache in `/metrics`.
fn near_metric(port: u16, name: &str) -> f64 {
    let m = parse_exposition(&get(port, "/metrics").unwrap().body);
    m.get(&format!("forkd_near_cache_{name}_total{{}}"))
        .copied()
        .unwrap_or_else(|| panic!("no forkd_near_cache_{name}_total in /metrics"))
}

/// The Redis key of a session, found by its user's tag in the token.
fn session_key(redis: &RedisServer) -> String {
    redis
        .keys()
        .into_iter()
        .find(|k| k.contains(":sess:"))
        .expect("a session in Redis")
}

/// The id of the near cache's connection `name` (CLIENT LIST).
fn near_connection(redis: &RedisServer, name: &str) -> String {
    let list = redis.cli(&["CLIENT", "LIST"]);
    list.lines()
        .find(|l| l.split(' ').any(|f| f == format!("name={name}")))
        .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .unwrap_or_else(|| panic!("no {name} in {list}"))
        .to_owned()
}

fn routes(api: &Upstream, extra: &str) -> String {
    format!(
        "workers = 1\n{extra}\n\
         [rate_limit.policy.per-user]\nlimit = 1000\nwindow = 60\nkey = \"user\"\n\
         [[route]]\nprefix = \"/u\"\nupstream = \"{0}\"\nstrip_prefix = true\ncache = true\n\
         [[route]]\nprefix = \"/p\"\nupstream = \"{0}\"\nstrip_prefix = true\ncache = true\n\
         policies = [\"per-user\"]\n",
        api.url()
    )
}

const CACHED: &str = "/u/me?cc=private%2Cmax-age%3D60";

/// GETs `path` with `auth` until one is a cache hit that sent Redis
/// nothing but `expected` commands (as MONITOR shows them); panics after
/// the test's patience.
fn until_warm(
    port: u16,
    monitor: &mut Monitor,
    path: &str,
    auth: &str,
    expected: usize,
) -> Vec<String> {
    let mut n = 0;
    poll(PATIENCE, || {
        n += 1;
        let r = request(port, "GET", path, &[("Authorization", auth)], b"").unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let sent = monitor.sent_before_marker(&format!("warm-{n}"));
        (r.header("x-cache") == Some("hit") && sent.len() == expected).then_some(sent)
    })
    .unwrap_or_else(|| panic!("{path} never answered from the near cache"))
}

#[test]
fn a_warm_cached_get_costs_redis_nothing_and_with_a_policy_one_call_without_the_session() {
    let redis = RedisServer::start();
    let api = Upstream::tcp();
    let (f, t) = with_alice(&redis, &api, "", "");
    let mut monitor = Monitor::start(&redis);
    until_warm(f.port, &mut monitor, CACHED, &t, 0);
    let hits = near_metric(f.port, "hits");
    for i in 0..5 {
        let r = request(f.port, "GET", CACHED, &[("Authorization", &t)], b"").unwrap();
        assert_eq!((r.status, r.header("x-cache")), (200, Some("hit")), "{r:?}");
        assert!(r.header("age").is_some(), "{r:?}");
        let sent = monitor.sent_before_marker(&format!("hit-{i}"));
        assert!(sent.is_empty(), "a warm hit sent Redis {sent:?}");
    }
    // Each hit found the session and the entry in memory (counted at the
    // worker's next heartbeat).
    poll(PATIENCE, || {
        (near_metric(f.port, "hits") >= hits + 10.0).then_some(())
    })
    .expect("near cache hits counted");
    // `forkd status` shows what the worker's near cache holds: the
    // session, its user's epoch, the entry.
    poll(PATIENCE, || {
        let out = f.cli(&["status"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .any(|l| {
                l.starts_with("redis: standalone (tcp)") && l.contains("; near cache: 3 held,")
            })
            .then_some(())
    })
    .expect("forkd status shows the session, the epoch and the entry held");
    // And the routes it serves.
    let text = String::from_utf8_lossy(&f.cli(&["status"]).stdout).into_owned();
    for route in [
        format!("route /u -> {} (auth required, cache)", api.url()),
        format!(
            "route /p -> {} (auth required, cache, policies per-user)",
            api.url()
        ),
    ] {
        assert!(text.lines().any(|l| l == route), "{route}\n{text}");
    }
    let flushes = near_metric(f.port, "flushes");
    // With a policy: the limit's one call, which neither checks the
    // session nor reads the entry.
    let path = "/p/me?cc=private%2Cmax-age%3D60";
    until_warm(f.port, &mut monitor, path, &t, 1);
    for i in 0..5 {
        let r = request(f.port, "GET", path, &[("Authorization", &t)], b"").unwrap();
        assert_eq!((r.status, r.header("x-cache")), (200, Some("hit")), "{r:?}");
        assert!(r.header("ratelimit").is_some(), "{r:?}");
        let sent = monitor.sent_before_marker(&format!("limited-{i}"));
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert!(sent[0].to_lowercase().contains("evalsha"), "{sent:?}");
        assert!(
            !sent[0].contains(":sess:") && !sent[0].contains(":cache:"),
            "{sent:?}"
        );
    }
    // The liveness checks (a PING, CLIENT TRACKINGINFO and ROLE a second) found
    // nothing wrong all along: no flush since the first warm hits, over
    // at least two more heartbeats.
    for _ in 0..2 {
        let hits = near_metric(f.port, "hits");
        poll(PATIENCE, || {
            let _ = request(f.port, "GET", CACHED, &[("Authorization", &t)], b"");
            (near_metric(f.port, "hits") > hits).then_some(())
        })
        .expect("a later heartbeat");
    }
    assert_eq!(near_metric(f.port, "flushes"), flushes);
    // Rate-limit keys, written by every request with a policy, are never
    // tracked: nothing the near cache holds changed, so Redis sent no
    // invalidation at all.
    assert_eq!(near_metric(f.port, "invalidations"), 0.0);
}

/// Requests over new connections (spread over the workers by the
/// kernel) until `want` of them in a row get `status`; panics after the
/// test's patience.
fn until_all(port: u16, auth: &str, status: u16, want: usize) -> Duration {
    let start = Instant::now();
    let mut run = 0;
    poll(PATIENCE, || {
        let r = request(port, "GET", CACHED, &[("Authorization", auth)], b"").unwrap();
        run = if r.status == status { run + 1 } else { 0 };
        (run >= want).then_some(())
    })
    .unwrap_or_else(|| panic!("never {want} answers {status} in a row"));
    start.elapsed()
}

/// A session is ended in Redis by every means there is; every worker,
/// each warm with it, stops serving it.
#[test]
fn every_way_a_session_ends_reaches_every_worker() {
    let redis = RedisServer::start();
    let api = Upstream::tcp();
    let f = Forkd::start_with_redis(
        &redis,
        &routes(&api, "").replace("workers = 1", "workers = 2"),
    );
    f.add_user("alice", PW);
    type End<'a> = &'a dyn Fn(&str);
    let ends: [(&str, End); 5] = [
        ("logout", &|t: &str| {
            let r = request(f.port, "POST", "/logout", &[("Authorization", t)], b"").unwrap();
            assert_eq!(r.status, 204, "{r:?}");
        }),
        ("revoke", &|_: &str| {
            assert!(f.cli(&["user", "revoke", "alice"]).status.success());
        }),
        ("passwd", &|_: &str| {
            assert!(f.passwd("alice", PW).status.success());
        }),
        ("DEL behind forkd's back", &|_: &str| {
            assert_eq!(redis.raw(&["DEL", &session_key(&redis)]).concat(), "1");
        }),
        ("FLUSHALL", &|_: &str| {
            assert_eq!(redis.raw(&["FLUSHALL"]).concat(), "OK");
        }),
    ];
    for (how, end) in ends {
        if how == "FLUSHALL" {
            // The user goes too; add her back.
            redis.raw(&["FLUSHALL"]);
            f.add_user("alice", PW);
        }
        let t = bearer(&token(f.port, "alice", PW));
        // Both workers serve it from memory.
        until_all(f.port, &t, 200, 40);
        let flushes = near_metric(f.port, "flushes");
        end(&t);
        until_all(f.port, &t, 401, 40);
        if how == "FLUSHALL" {
            poll(PATIENCE, || {
                (near_metric(f.port, "flushes") > flushes).then_some(())
            })
            .expect("the FLUSHALL counted as a flush");
        }
    }
}

/// The near cache's connections killed, or Redis restarted: the near
/// cache is emptied and tracking made again, so that a change after it
/// is still seen.
#[test]
fn a_lost_tracking_connection_or_a_restarted_redis_empties_the_near_cache() {
    let mut redis = RedisServer::start();
    let api = Upstream::tcp();
    let f = Forkd::start_with_redis(&redis, &routes(&api, ""));
    f.add_user("alice", PW);
    for how in ["listener", "reader", "restart"] {
        let t = bearer(&token(f.port, "alice", PW));
        let mut monitor = Monitor::start(&redis);
        until_warm(f.port, &mut monitor, CACHED, &t, 0);
        let flushes = near_metric(f.port, "flushes");
        match how {
            "restart" => {
                redis.kill();
                redis.spawn();
            }
            name => {
                let id = near_connection(&redis, &format!("forkd-near-{name}"));
                assert_eq!(redis.raw(&["CLIENT", "KILL", "ID", &id]).concat(), "1");
            }
        }
        poll(PATIENCE, || {
            (near_metric(f.port, "flushes") > flushes).then_some(())
        })
        .unwrap_or_else(|| panic!("{how}: no flush"));
        // Warm again on the new connections, then the session ends behind
        // forkd's back: only tracking made again can tell the worker.
        let mut monitor = Monitor::start(&redis);
        until_warm(f.port, &mut monitor, CACHED, &t, 0);
        assert_eq!(redis.raw(&["DEL", &session_key(&redis)]).concat(), "1");
        until_all(f.port, &t, 401, 20);
    }
}

/// An ACL user as Redis' docs suggest (`+@all -@dangerous`): the near
/// cache needs no command of the `@dangerous` category (ROLE, INFO,
/// MONITOR…), so it tracks and serves from memory all the same.
#[test]
fn the_near_cache_works_for_an_acl_user_without_dangerous_commands() {
    let redis = RedisServer::start();
    let ok = redis.raw(&[
        "ACL",
        "SETUSER",
        "app",
        "on",
        ">app-secret",
        "~*",
        "&*",
        "+@all",
        "-@dangerous",
    ]);
    assert_eq!(ok.concat(), "OK");
    let api = Upstream::tcp();
    let mut f = Forkd::configure(&routes(&api, ""));
    f.env.push((
        "FORKD_REDIS_URL".into(),
        format!("redis://app:app-secret@127.0.0.1:{}", redis.port),
    ));
    f.spawn(&[]);
    f.wait_ready();
    f.add_user("alice", PW);
    let t = bearer(&token(f.port, "alice", PW));
    let mut monitor = Monitor::start(&redis);
    until_warm(f.port, &mut monitor, CACHED, &t, 0);
    // Over several of the near cache's once-a-second checks: no flush
    // (counted at heartbeats: the first one counts the warm-up's).
    let heartbeat = || {
        let hits = near_metric(f.port, "hits");
        poll(PATIENCE, || {
            let _ = request(f.port, "GET", CACHED, &[("Authorization", &t)], b"");
            (near_metric(f.port, "hits") > hits).then_some(())
        })
        .expect("a later heartbeat");
    };
    heartbeat();
    let flushes = near_metric(f.port, "flushes");
    for _ in 0..3 {
        heartbeat();
    }
    assert_eq!(near_metric(f.port, "flushes"), flushes);
}

/// forkd on `redis` with the routes, `extra` config and the test-only
/// `failpoints` (FORKD_FAILPOINTS, "" for none), alice added; her bearer
/// token.
fn with_alice(
    redis: &RedisServer,
    api: &Upstream,
    extra: &str,
    failpoints: &str,
) -> (Forkd, String) {
    let mut f = Forkd::configure(&routes(api, extra));
    f.env.push(("FORKD_REDIS_URL".into(), redis.url()));
    f.spawn(&[("FORKD_FAILPOINTS", failpoints)]);
    f.wait_ready();
    f.add_user("alice", PW);
    let t = bearer(&token(f.port, "alice", PW));
    (f, t)
}

/// An invalidation that comes in while a fill's read is on its way (the
/// test-only failpoint holds the fill 0.8 s between its read and storing
/// it): what the fill read is not kept.
#[test]
fn a_fill_overtaken_by_an_invalidation_is_not_kept() {
    let redis = RedisServer::start();
    let api = Upstream::tcp();
    let (f, t) = with_alice(&redis, &api, "", "near-fill-slow");
    let mut monitor = Monitor::start(&redis);
    // The Redis path answers and starts the session's fill.
    let r = request(f.port, "GET", CACHED, &[("Authorization", &t)], b"").unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    // Once the fill's read has reached Redis, the session ends.
    let mut n = 0;
    poll(PATIENCE, || {
        n += 1;
        let sent = monitor.all_before_marker(&format!("fill-{n}"));
        sent.iter()
            .any(|l| l.to_lowercase().contains("\"hmget\""))
            .then_some(())
    })
    .expect("the fill's read");
    assert_eq!(redis.raw(&["DEL", &session_key(&redis)]).concat(), "1");
    // Past the fill's end, the session is never served again.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        let r = request(f.port, "GET", CACHED, &[("Authorization", &t)], b"").unwrap();
        assert_eq!(r.status, 401, "served after its end: {r:?}");
    }
}

/// Hits from memory do not stop the idle timeout from being renewed: a
/// session used all along outlives its idle timeout several times over.
#[test]
fn a_session_used_from_memory_is_still_renewed() {
    let redis = RedisServer::start();
    let api = Upstream::tcp();
    let (f, t) = with_alice(&redis, &api, "[auth]\nsession_idle_timeout = 1", "");
    let start = Instant::now();
    let mut from_memory = 0.0;
    while start.elapsed() < Duration::from_secs(4) {
        let r = request(f.port, "GET", CACHED, &[("Authorization", &t)], b"").unwrap();
        assert_eq!(r.status, 200, "after {:?}: {r:?}", start.elapsed());
        from_memory = near_metric(f.port, "hits");
    }
    assert!(from_memory > 0.0);
}

/// Invalidations arriving faster than the worker reads them (the
/// test-only failpoint makes the channel hold 2 and the worker read one a
/// second): the one lost is not trusted to have been harmless; the near
/// cache is emptied.
#[test]
fn a_lagging_invalidation_channel_empties_the_near_cache() {
    let redis = RedisServer::start();
    let api = Upstream::tcp();
    let (f, t) = with_alice(&redis, &api, "", "near-slow-listener");
    let mut monitor = Monitor::start(&redis);
    for path in [
        CACHED,
        "/u/two?cc=max-age%3D60",
        "/u/three?cc=max-age%3D60",
        "/u/four?cc=max-age%3D60",
    ] {
        until_warm(f.port, &mut monitor, path, &t, 0);
    }
    drop(monitor);
    let keys = redis.keys();
    let entry = |part: &str| {
        keys.iter()
            .find(|k| k.contains(":cache:") && k.contains(part))
            .unwrap_or_else(|| panic!("no entry for {part} in {keys:?}"))
            .clone()
    };
    let session = session_key(&redis);
    // One message the worker takes at once (then it waits a second)...
    redis.raw(&["PEXPIRE", &entry("/four"), "600000"]);
    // ...then three while it waits: the channel keeps the last two, and
    // the session's end is the one lost. The other two are of answers
    // the session's requests do not ask for.
    assert_eq!(redis.raw(&["DEL", &session]).concat(), "1");
    redis.raw(&["PEXPIRE", &entry("/two"), "600000"]);
    redis.raw(&["PEXPIRE", &entry("/three"), "600000"]);
    // The worker then finds it lagged, and serves the session no more.
    poll(PATIENCE, || {
        let r = request(f.port, "GET", CACHED, &[("Authorization", &t)], b"").unwrap();
        (r.status == 401).then_some(())
    })
    .expect("the ended session refused once the lag is seen");
    poll(PATIENCE, || {
        (near_metric(f.port, "flushes") >= 2.0).then_some(())
    })
    .expect("the lag counted as a flush");
}
