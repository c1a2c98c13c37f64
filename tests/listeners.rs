//! Several listeners in one instance: plain next to TLS, a plain listener
//! that redirects to HTTPS, and PROXY protocol (v1 and v2) listeners whose
//! client address is what rate limits, the access log and the /metrics
//! allow-list see. Real clients: curl (also as a PROXY protocol v1 sender,
//! `--haproxy-protocol`), and raw sockets from distinct loopback addresses
//! for headers that name other clients.

mod common;

use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

const PW: &str = "listeners-secret-pw";

/// Replaces the `listen` line the harness wrote, and appends `tables`.
fn set_listen(f: &Forkd, listen: &str, tables: &str) {
    let text = std::fs::read_to_string(&f.config).unwrap();
    let first = format!("listen = \"127.0.0.1:{}\"\n", f.port);
    assert!(text.starts_with(&first), "{text}");
    let text = format!("listen = {listen}\n{}{tables}\n", &text[first.len()..]);
    std::fs::write(&f.config, text).unwrap();
}

/// `curl -sS` with `args`; returns (status, what -w printed after it).
fn curl_w(args: &[&str], write_out: &str) -> (u16, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-o", "/dev/null", "-w"])
        .arg(format!("%{{http_code}} {write_out}"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("curl runs (bin/test installs it)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (code, rest) = text.split_once(' ').unwrap_or((&text, ""));
    (
        code.parse().unwrap_or(0),
        rest.to_owned(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn two_ports() -> (u16, u16) {
    let p = free_ports(2);
    (p[0], p[1])
}

#[test]
fn plain_tls_and_redirecting_listeners_serve_side_by_side() {
    let redis = RedisServer::start();
    let pki = Pki::new();
    let leaf = pki.leaf("localhost", KeyKind::Ecdsa);
    let mut f = Forkd::configure("workers = 2\n");
    install(&f, &leaf.cert, &leaf.key);
    let plain = f.port;
    let (tls, redirect) = two_ports();
    let listen = format!(
        "[{{ address = \"127.0.0.1:{plain}\", tls = false }}, \"127.0.0.1:{tls}\", \
         {{ address = \"127.0.0.1:{redirect}\", redirect_https = true }}]"
    );
    let tables = format!("{}hsts_max_age = 600\n", tls_config(&f));
    set_listen(&f, &listen, &tables);
    f.env.push(("FORKD_REDIS_URL".into(), redis.url()));
    f.spawn(&[]);
    f.wait_ready();
    f.add_user("ann", PW);
    let ca = pki.ca();

    // `forkd status` tells the listeners apart, and says where its
    // configuration came from.
    let out = f.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("listening on "))
        .unwrap_or_default();
    assert!(
        line.starts_with(&format!(
            "listening on http://127.0.0.1:{plain}, https://127.0.0.1:{tls}, \
             http://127.0.0.1:{redirect} (redirects to https) ("
        )),
        "{text}"
    );
    let config = std::fs::canonicalize(&f.config).unwrap();
    assert!(
        text.lines().any(
            |l| l.starts_with(&format!("config: {}, environment ", config.display()))
                && l.contains("FORKD_REDIS_URL")
        ),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&f.cli(&["status", "--json"]).stdout).unwrap();
    assert_eq!(json["listeners"][1]["scheme"], "https", "{json}");
    assert_eq!(json["listeners"][2]["redirect_https"], true, "{json}");

    // Plain HTTP/1.1 without HSTS; HTTPS with h2 and HSTS.
    let r = curl(None, plain, "/healthz", &["--http1.1"]);
    expect(&r, 200, "1.1");
    assert!(
        r.header("strict-transport-security").is_none(),
        "{}",
        r.headers
    );
    let r = curl(Some(&ca), tls, "/healthz", &["--http2"]);
    expect(&r, 200, "2");
    assert_eq!(
        r.header("strict-transport-security").as_deref(),
        Some("max-age=600")
    );
    // TLS on the plain port fails; plain HTTP on the TLS port is told so.
    assert_eq!(curl(Some(&ca), plain, "/healthz", &[]).status, 0);
    assert_eq!(curl(None, tls, "/healthz", &[]).status, 400);

    // The redirecting listener: 308 to the same path and query on the TLS
    // port; health checks are served there as they are.
    let r = curl(None, redirect, "/profile?x=1", &[]);
    assert_eq!(r.status, 308, "{}{}", r.error, r.headers);
    assert_eq!(
        r.header("location").as_deref(),
        Some(format!("https://127.0.0.1:{tls}/profile?x=1").as_str())
    );
    expect(&curl(None, redirect, "/healthz", &[]), 200, "1.1");
    // A real client follows it, a POST staying a POST: a login through the
    // redirect lands on HTTPS.
    let body = serde_json::json!({"username": "ann", "password": PW}).to_string();
    let (code, effective, err) = curl_w(
        &[
            "-L",
            "--cacert",
            &ca,
            "-H",
            "Content-Type: application/json",
            "--data",
            &body,
            &format!("http://127.0.0.1:{redirect}/login"),
        ],
        "%{url_effective}",
    );
    assert_eq!(
        (code, effective.as_str()),
        (200, format!("https://127.0.0.1:{tls}/login").as_str()),
        "{err}"
    );
    // A Host that is not a host name is refused, never echoed into a
    // redirect.
    for host in ["user@evil.example", "evil.example/x", "a b"] {
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let r = raw_bytes_from("127.0.0.1", redirect, req.as_bytes()).unwrap();
        assert_eq!(r.status, 400, "{host}: {r:?}");
        assert!(r.header("location").is_none());
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
    }

    // forkd status names every listener.
    let listed = f.status().unwrap()["listen"].as_str().unwrap().to_owned();
    for p in [plain, tls, redirect] {
        assert!(listed.contains(&format!("127.0.0.1:{p}")), "{listed}");
    }

    // A reload cannot move or drop a listener: refused, every port serves.
    let good = std::fs::read_to_string(&f.config).unwrap();
    set_listen_text(&f, &good, &format!("[\"127.0.0.1:{tls}\"]"));
    let out = f.cli(&["reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("`listen` changed"),
        "{err}"
    );
    std::fs::write(&f.config, &good).unwrap();
    expect(&curl(None, plain, "/healthz", &[]), 200, "1.1");
    expect(&curl(Some(&ca), tls, "/healthz", &[]), 200, "2");
    assert_eq!(curl(None, redirect, "/", &[]).status, 308);

    // An upgrade hands every listener to the new image, plain and TLS
    // alike, each to its own settings even when the file now lists them in
    // another order.
    let reordered = format!(
        "[{{ address = \"127.0.0.1:{redirect}\", redirect_https = true }}, \"127.0.0.1:{tls}\", \
         {{ address = \"127.0.0.1:{plain}\", tls = false }}]"
    );
    set_listen_text(&f, &good, &reordered);
    let out = f.cli(&["upgrade"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        f.log_text()
    );
    f.wait_ready();
    expect(&curl(None, plain, "/healthz", &[]), 200, "1.1");
    expect(&curl(Some(&ca), tls, "/healthz", &[]), 200, "2");
    assert_eq!(curl(None, redirect, "/", &[]).status, 308);
    signal(f.pid(), nix::sys::signal::Signal::SIGTERM);
    assert_eq!(f.wait_exit(PATIENCE), Some(0));
}

/// The config text `good` with its `listen` line set to `listen`.
fn set_listen_text(f: &Forkd, good: &str, listen: &str) {
    let rest = good.split_once('\n').unwrap().1;
    std::fs::write(&f.config, format!("listen = {listen}\n{rest}")).unwrap();
}

/// A PROXY protocol v1 header naming `client`.
fn v1(client: &str, port: u16) -> Vec<u8> {
    format!("PROXY TCP4 {client} 127.0.0.1 40000 {port}\r\n").into_bytes()
}

/// A PROXY protocol v2 header: PROXY over TCP/IPv4 from `client`, or LOCAL.
fn v2(client: Option<[u8; 4]>, port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    match client {
        Some(ip) => {
            h.extend([0x21, 0x11, 0, 12]);
            h.extend(ip);
            h.extend([127, 0, 0, 1]);
            h.extend(40000u16.to_be_bytes());
            h.extend(port.to_be_bytes());
        }
        None => h.extend([0x20, 0x00, 0, 0]),
    }
    h
}

fn with(header: Vec<u8>, request: &str) -> Vec<u8> {
    [header, request.as_bytes().to_vec()].concat()
}

fn failed_login(user: &str) -> String {
    let body = serde_json::json!({"username": user, "password": "wrong"}).to_string();
    format!(
        "POST /login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

const METRICS: &str = "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

#[test]
fn proxy_protocol_carries_the_client_address_and_refuses_everyone_else() {
    let redis = RedisServer::start();
    let pki = Pki::new();
    let leaf = pki.leaf("localhost", KeyKind::Ecdsa);
    let access = tempfile::tempdir().unwrap();
    let access_file = access.path().join("access.log");
    let mut f = Forkd::configure(&format!(
        "workers = 2\naccess_log = \"json\"\naccess_log_file = \"{}\"\n",
        access_file.display()
    ));
    install(&f, &leaf.cert, &leaf.key);
    let plain = f.port;
    let (pp, pp_tls) = two_ports();
    let listen = format!(
        "[{{ address = \"127.0.0.1:{plain}\", tls = false }}, \
         {{ address = \"127.0.0.1:{pp}\", tls = false, proxy_protocol = true }}, \
         {{ address = \"127.0.0.1:{pp_tls}\", proxy_protocol = true }}]"
    );
    // 127.0.0.1 and .2 are the load balancers; .3 is anyone else.
    let tables = format!(
        "{}[http]\ntrusted_proxies = [\"127.0.0.1/32\", \"127.0.0.2/32\"]\n\
         [auth]\nlogin_ip_limit = 2\n",
        tls_config(&f)
    );
    set_listen(&f, &listen, &tables);
    f.env.push(("FORKD_REDIS_URL".into(), redis.url()));
    f.spawn(&[]);
    f.wait_ready();

    // Two failures from 203.0.113.7 (v1), then its third attempt (v2) is
    // limited: both headers name the same client, whose bucket is its own.
    let lb = "127.0.0.2";
    let send = |bytes: Vec<u8>| raw_bytes_from(lb, pp, &bytes).map(|r| r.status);
    assert_eq!(
        send(with(v1("203.0.113.7", pp), &failed_login("u1"))).unwrap(),
        401
    );
    assert_eq!(
        send(with(v1("203.0.113.7", pp), &failed_login("u2"))).unwrap(),
        401
    );
    let v2_7 = || v2(Some([203, 0, 113, 7]), pp);
    assert_eq!(send(with(v2_7(), &failed_login("u3"))).unwrap(), 429);
    // A header that names no client (LOCAL) leaves the balancer as the
    // peer: the X-Forwarded-For a client sent through it is not believed,
    // though the balancer is a trusted proxy.
    let spoof = failed_login("u5").replacen(
        "Connection: close\r\n",
        "Connection: close\r\nX-Forwarded-For: 203.0.113.7\r\n",
        1,
    );
    assert_eq!(send(with(v2(None, pp), &spoof)).unwrap(), 401);
    // Another client behind the same balancer is not limited, nor is the
    // balancer itself on the plain listener.
    let v2_8 = v2(Some([203, 0, 113, 8]), pp);
    assert_eq!(send(with(v2_8, &failed_login("u4"))).unwrap(), 401);
    let r = request_from(lb, plain, "POST", "/login", &[], b"{}").unwrap();
    assert_ne!(r.status, 429, "{r:?}");

    // The /metrics allow-list (loopback) judges the carried address: a LOCAL
    // header (the balancer's own check) is the balancer, 127.0.0.2.
    assert_eq!(send(with(v1("203.0.113.7", pp), METRICS)).unwrap(), 403);
    assert_eq!(send(with(v1("127.0.0.9", pp), METRICS)).unwrap(), 200);
    assert_eq!(send(with(v2(None, pp), METRICS)).unwrap(), 200);

    // No header, a header from an untrusted peer, or a broken header: the
    // connection is closed without an answer.
    let healthz = "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    assert!(raw_bytes_from(lb, pp, healthz.as_bytes()).is_err());
    let spoofed = with(v1("127.0.0.1", pp), healthz);
    assert!(raw_bytes_from("127.0.0.3", pp, &spoofed).is_err());
    assert!(raw_bytes_from(lb, pp, &with(b"PROXY TCP4 x y 1 2\r\n".to_vec(), healthz)).is_err());
    // The header says nothing on a listener that does not expect one.
    let r = raw_bytes_from(lb, plain, &with(v1("203.0.113.7", plain), healthz)).unwrap();
    assert_eq!(r.status, 400, "{r:?}");

    // curl's own PROXY v1 header, before HTTP and before TLS.
    let ca = pki.ca();
    let ok = |args: &[&str]| curl_w(args, "");
    let (code, _, err) = ok(&[
        "--haproxy-protocol",
        &format!("http://127.0.0.1:{pp}/healthz"),
    ]);
    assert_eq!(code, 200, "{err}");
    let url = format!("https://127.0.0.1:{pp_tls}/healthz");
    let (code, _, err) = ok(&["--haproxy-protocol", "--http2", "--cacert", &ca, &url]);
    assert_eq!(code, 200, "{err}");
    let (code, _, _) = ok(&["--cacert", &ca, &url]);
    assert_eq!(code, 0, "TLS without the header is refused");

    // The access log has the carried client; /metrics counts the refusals.
    let seen = poll(PATIENCE, || {
        let text = std::fs::read_to_string(&access_file).ok()?;
        let clients: Vec<String> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| v["client"].as_str().unwrap_or("").to_owned())
            .collect();
        let both = ["203.0.113.7", "203.0.113.8"];
        both.iter()
            .all(|b| clients.iter().any(|c| c == b))
            .then_some(clients)
    })
    .expect("the access log names the clients the headers carried");
    assert!(!seen.iter().any(|c| c == "127.0.0.3"), "{seen:?}");
    let m = raw_bytes_from("127.0.0.1", plain, METRICS.as_bytes()).unwrap();
    let figures = parse_exposition(&m.body);
    let refused = figures
        .get("forkd_proxy_protocol_refused_total{}")
        .copied()
        .unwrap_or(0.0);
    assert!(refused >= 4.0, "{refused}: {}", m.body);
    signal(f.pid(), nix::sys::signal::Signal::SIGTERM);
    assert_eq!(f.wait_exit(PATIENCE), Some(0));
}

#[test]
fn socket_activation_hands_several_listeners_over_by_address() {
    let pki = Pki::new();
    let leaf = pki.leaf("localhost", KeyKind::Ecdsa);
    let mut f = Forkd::configure("workers = 1\n");
    install(&f, &leaf.cert, &leaf.key);
    let (plain, tls) = two_ports();
    let listen =
        format!("[\"127.0.0.1:{tls}\", {{ address = \"127.0.0.1:{plain}\", tls = false }}]");
    set_listen(&f, &listen, &tls_config(&f));
    // Passed in the other order than configured: matched by address.
    f.socket_activated(&[plain, tls]);
    // systemd-socket-activate starts forkd on the first connection.
    let r = poll(PATIENCE, || get(plain, "/healthz").ok()).expect("served on the plain socket");
    assert_eq!(r.status, 200);
    f.wait_ready();
    expect(&curl(Some(&pki.ca()), tls, "/healthz", &[]), 200, "2");
    assert!(
        f.log_text()
            .contains("adopted the 2 sockets passed by systemd"),
        "{}",
        f.log_text()
    );
    signal(f.pid(), nix::sys::signal::Signal::SIGTERM);
    assert_eq!(f.wait_exit(PATIENCE), Some(0));
}

/// Sends a PROXY v1 header naming `client` and one kept-alive /healthz on
/// a new connection from the balancer 127.0.0.2; returns the open
/// connection once its answer's status line came.
fn held_connection(client: &str, port: u16) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut s = connect_from("127.0.0.2", port).unwrap();
    s.write_all(&with(
        v1(client, port),
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n",
    ))
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.windows(2).any(|w| w == b"\r\n") && got.len() < 4096 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed before an answer");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    s
}

#[test]
fn a_client_behind_a_proxy_protocol_balancer_keeps_to_its_connection_cap() {
    let redis = RedisServer::start();
    // One worker: the cap is per worker.
    let mut f = Forkd::configure("workers = 1\n");
    let pp = f.port;
    set_listen(
        &f,
        &format!("[{{ address = \"127.0.0.1:{pp}\", proxy_protocol = true }}]"),
        "[http]\ntrusted_proxies = [\"127.0.0.2/32\"]\nmax_connections_per_client = 2\n",
    );
    f.env.push(("FORKD_REDIS_URL".into(), redis.url()));
    f.spawn(&[]);
    f.wait_ready();
    let held = [
        held_connection("203.0.113.9", pp),
        held_connection("203.0.113.9", pp),
    ];
    let healthz = "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    // The balancer itself is never capped; the client it names is.
    let third = with(v1("203.0.113.9", pp), healthz);
    assert!(raw_bytes_from("127.0.0.2", pp, &third).is_err());
    let other = with(v1("203.0.113.10", pp), healthz);
    assert_eq!(raw_bytes_from("127.0.0.2", pp, &other).unwrap().status, 200);
    drop(held);
    let r = poll(PATIENCE, || raw_bytes_from("127.0.0.2", pp, &third).ok());
    assert_eq!(r.expect("a place again once the two closed").status, 200);
    signal(f.pid(), nix::sys::signal::Signal::SIGTERM);
    assert_eq!(f.wait_exit(PATIENCE), Some(0));
}
