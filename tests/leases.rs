//! Rate limits across two instances of two workers each, sharing one
//! Redis: `exact` (one call a request) allows exactly the limit; a lease
//! (`lease = 8`: a worker takes up to 8 cells at once and spends them
//! itself) never allows more, refuses early while other workers hold
//! cells, and gives back what it did not spend, so that the whole limit
//! is spent in the end.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// 40 a day: no cell comes back by the clock while a test runs.
fn config(api: &Upstream, lease: u32) -> String {
    format!(
        "workers = 2\n\
         [rate_limit.policy.per-client]\nlimit = 40\nwindow = 86400\nkey = \"client\"\nlease = {lease}\n\
         [[route]]\nprefix = \"/x\"\nupstream = \"{}\"\nauth = \"none\"\npolicies = [\"per-client\"]\n",
        api.url()
    )
}

/// GETs /x on new connections, alternating between the instances (and
/// so spread over their workers); the number allowed.
fn burst(ports: [u16; 2], n: usize) -> usize {
    (0..n)
        .filter(|i| {
            let r = request(ports[i % 2], "GET", "/x", &[], b"").unwrap();
            assert!(r.status == 200 || r.status == 429, "{r:?}");
            assert!(r.header("ratelimit").is_some(), "{r:?}");
            r.status == 200
        })
        .count()
}

fn metric(port: u16, name: &str) -> f64 {
    let m = parse_exposition(&get(port, "/metrics").unwrap().body);
    m.get(&format!("{name}{{}}")).copied().unwrap_or(0.0)
}

#[test]
fn an_exact_limit_allows_exactly_the_limit_across_instances() {
    let redis = RedisServer::start();
    let api = Upstream::tcp();
    let a = Forkd::start_with_redis(&redis, &config(&api, 1));
    let b = Forkd::start_with_redis(&redis, &config(&api, 1));
    assert_eq!(burst([a.port, b.port], 100), 40);
    assert_eq!(burst([a.port, b.port], 20), 0);
}

#[test]
fn a_lease_never_allows_more_than_the_limit_and_in_the_end_allows_all_of_it() {
    let redis = RedisServer::start();
    let api = Upstream::tcp();
    let a = Forkd::start_with_redis(&redis, &config(&api, 8));
    let b = Forkd::start_with_redis(&redis, &config(&api, 8));
    // Three requests to A: a worker of A leases 8 cells and spends at
    // most 3 of them.
    assert_eq!(burst([a.port, a.port], 3), 3);
    // B alone meanwhile: refused before the limit, since A holds cells.
    let early = burst([b.port, b.port], 60);
    assert!(early > 0 && 3 + early <= 40 - 5, "{early} allowed on B");
    // A's lease ends (1 s): what it did not spend (at least 5) goes back
    // to Redis...
    poll(PATIENCE, || {
        (metric(a.port, "forkd_rate_limit_lease_returned_total") >= 5.0).then_some(())
    })
    .expect("A gives back what it held");
    // ...and B spends it; not one request more than the limit in all.
    let mut allowed = 3 + early;
    let start = Instant::now();
    let mut refused_in_a_row = 0;
    while start.elapsed() < PATIENCE {
        let n = burst([b.port, b.port], 2);
        allowed += n;
        assert!(allowed <= 40, "{allowed} allowed");
        refused_in_a_row = if n == 0 { refused_in_a_row + 2 } else { 0 };
        // Past the leases' lifetime and the sweep that gives them back,
        // with nothing left anywhere.
        if allowed == 40 && refused_in_a_row >= 20 && start.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    assert_eq!(allowed, 40, "the whole limit, in the end");
    // Leases did the work: most requests were allowed with no Redis call.
    let spent = metric(b.port, "forkd_rate_limit_lease_spent_total");
    assert!(spent >= 10.0, "{spent} requests allowed from a lease");
}
