//! A route whose upstream is a list of servers: requests spread over them
//! by the fewest waiting, a server that fails is passed over and
//! idempotent requests it never got go to another, and it is taken back
//! after the route's fail_timeout.

mod common;

use std::sync::atomic::Ordering::Relaxed;

use common::*;

fn pool_route(servers: &[&Upstream], extra: &str) -> String {
    let list: Vec<String> = servers.iter().map(|u| format!("\"{}\"", u.url())).collect();
    format!(
        "workers = 1\n\
         [[route]]\nprefix = \"/api\"\nupstream = [{}]\nauth = \"none\"\nstrip_prefix = true\n{extra}",
        list.join(", ")
    )
}

fn answered(u: &Upstream) -> usize {
    u.requests.load(Relaxed)
}

#[test]
fn requests_spread_over_the_servers_and_go_to_the_least_busy() {
    let (a, b) = (Upstream::tcp(), Upstream::tcp());
    let f = Forkd::start(&pool_route(&[&a, &b], ""));
    // One at a time, nobody waits anywhere: the servers take turns.
    for i in 0..20 {
        let r = request(f.port, "GET", &format!("/api/x{i}"), &[], b"").unwrap();
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert_eq!((answered(&a), answered(&b)), (10, 10));

    // A slow request waits on one server; the next ones go to the other.
    // (The echo counts a request as its head arrives.)
    let port = f.port;
    let slow = std::thread::spawn(move || request(port, "GET", "/api/slow/3000", &[], b""));
    poll(PATIENCE, || {
        (answered(&a) + answered(&b) == 21).then_some(())
    })
    .expect("the slow request reached a server");
    let busy_is_a = answered(&a) == 11;
    let (a0, b0) = (answered(&a), answered(&b));
    for i in 0..6 {
        let r = request(f.port, "GET", &format!("/api/q{i}"), &[], b"").unwrap();
        assert_eq!(r.status, 200, "{r:?}");
    }
    let (a1, b1) = (answered(&a) - a0, answered(&b) - b0);
    let r = slow.join().unwrap().unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        if busy_is_a { (a1, b1) } else { (b1, a1) },
        (0, 6),
        "while one server was busy, the quick requests went to it too"
    );
}

#[test]
fn a_server_that_fails_is_passed_over_and_taken_back() {
    let a = Upstream::tcp();
    let b = Upstream::tcp();
    let b_port = b.port;
    let f = Forkd::start(&pool_route(&[&a, &b], "fail_timeout = 1\n"));
    for i in 0..4 {
        assert_eq!(
            request(f.port, "GET", &format!("/api/{i}"), &[], b"")
                .unwrap()
                .status,
            200
        );
    }
    assert_eq!(answered(&b), 2);
    // b goes away (its port refuses connections). Every GET still gets an
    // answer: one that found b down is sent to a, and b is passed over.
    drop(b);
    poll(PATIENCE, || {
        std::net::TcpStream::connect(("127.0.0.1", b_port))
            .is_err()
            .then_some(())
    })
    .expect("the stopped server refuses connections");
    let a0 = answered(&a);
    for i in 0..10 {
        let r = request(f.port, "GET", &format!("/api/d{i}"), &[], b"").unwrap();
        assert_eq!(r.status, 200, "GET {i} with a server down: {r:?}");
    }
    assert_eq!(answered(&a) - a0, 10);
    let log = poll(PATIENCE, || {
        let l = f.log_text();
        l.contains(&format!(
            "route /api: upstream http://127.0.0.1:{b_port} failed"
        ))
        .then_some(l)
    })
    .expect("the log says the server was passed over");
    assert!(log.contains("passed over for 1s"), "{log}");

    // b comes back on its address: after the fail timeout it gets
    // requests again.
    let b = Upstream::tcp_on(b_port);
    let back = poll(PATIENCE, || {
        let r = request(f.port, "GET", "/api/back", &[], b"").ok()?;
        assert_eq!(r.status, 200, "{r:?}");
        (answered(&b) > 0).then_some(())
    });
    assert!(back.is_some(), "the server that came back got no request");
}

#[test]
fn a_write_is_not_sent_twice_and_every_server_down_is_502() {
    let a = Upstream::tcp();
    let b = Upstream::tcp();
    let (a_port, b_port) = (a.port, b.port);
    let f = Forkd::start(&pool_route(&[&a, &b], "fail_timeout = 30\n"));
    drop(a);
    drop(b);
    for port in [a_port, b_port] {
        poll(PATIENCE, || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .is_err()
                .then_some(())
        })
        .expect("the stopped server refuses connections");
    }
    // Every server down: the first try goes to one all the same, and the
    // answer is 502 problem+json.
    for method in ["GET", "POST"] {
        let r = request(f.port, method, "/api/x", &[], b"a=1").unwrap();
        assert_eq!(r.status, 502, "{method}: {r:?}");
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
    }
    // One back: a POST may reach it only if it is tried first; it is
    // never sent twice. A GET always finds it.
    let a = Upstream::tcp_on(a_port);
    let r = request(f.port, "GET", "/api/y", &[], b"").unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(answered(&a), 1);
}

/// The requests each server got, but the health checks.
fn spread(f: &Forkd, a: &Upstream, b: &Upstream, n: usize) -> (usize, usize) {
    let (a0, b0) = (answered(a), answered(b));
    for i in 0..n {
        let r = request(f.port, "GET", &format!("/api/h{i}"), &[], b"").unwrap();
        assert_eq!(r.status, 200, "{r:?}");
    }
    (answered(a) - a0, answered(b) - b0)
}

#[test]
fn a_server_failing_its_health_check_is_out_until_it_passes() {
    let (a, b) = (Upstream::tcp(), Upstream::tcp());
    let f = Forkd::start(&pool_route(
        &[&a, &b],
        "health = { path = \"/health\", interval = 0.1, timeout = 1, fails = 2, passes = 2 }\n",
    ));
    poll(PATIENCE, || (b.checks.load(Relaxed) >= 2).then_some(()))
        .expect("forkd checks the servers' health");
    assert_eq!(spread(&f, &a, &b, 10), (5, 5));
    // b answers its checks 503 (but its other requests still 200): out.
    b.health_status.store(503, Relaxed);
    poll(PATIENCE, || (spread(&f, &a, &b, 10).1 == 0).then_some(()))
        .expect("a server failing its health check keeps getting requests");
    let log = f.log_text();
    assert!(
        log.contains(&format!(
            "route /api: upstream {} failed its health check /health 2 time(s) in a row (status 503)",
            b.url()
        )),
        "{log}"
    );
    // Healthy again: back.
    b.health_status.store(200, Relaxed);
    poll(PATIENCE, || (spread(&f, &a, &b, 10).1 > 0).then_some(()))
        .expect("a server passing its health checks again gets no requests");
    assert!(f.log_text().contains(&format!(
        "route /api: upstream {} passed its health check /health 2 time(s) in a row; back",
        b.url()
    )));
}

/// A client cannot take servers out: bodies that break off and slow
/// uploads are the client's doing, never a server's failure.
#[test]
fn a_client_breaking_off_its_body_takes_no_server_out() {
    use std::io::Write;
    let (a, b) = (Upstream::tcp(), Upstream::tcp());
    let f = Forkd::start(&pool_route(&[&a, &b], "fail_timeout = 60\ntimeout = 1\n"));
    for i in 0..6 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", f.port)).unwrap();
        write!(
            s,
            "POST /api/count HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nonly-a-start-{i}"
        )
        .unwrap();
        // Gone before the body ends; or, for the odd ones, slow past the
        // route's timeout.
        if i % 2 == 1 {
            std::thread::sleep(std::time::Duration::from_millis(1500));
        }
        drop(s);
    }
    // Both servers still take requests in turn.
    poll(PATIENCE, || {
        let (x, y) = spread(&f, &a, &b, 10);
        (x == 5 && y == 5).then_some(())
    })
    .expect("the servers took turns again");
    assert!(
        !f.log_text().contains("passed over"),
        "a client took a server out:\n{}",
        f.log_text()
    );
}
