//! HTTPS and HTTP/2 with real clients: curl (`--http1.1`, `--http2`,
//! `--http2-prior-knowledge`), `openssl s_client` for the certificate a new
//! connection gets, and nghttp2's `h2load` and `nghttp` as independent h2
//! clients. The test CA and certificates are made with the `openssl` CLI.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const PW: &str = "tls-secret-pw";

/// The serial of the certificate a new TLS connection to `port` is shown.
fn served_serial(port: u16) -> String {
    let shown = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    x509.stdin.take().unwrap().write_all(&shown.stdout).unwrap();
    let out = x509.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("serial=")
        .trim_start_matches('0')
        .to_owned()
}

fn status_serials(f: &Forkd) -> Vec<String> {
    f.status().unwrap()["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            c["serial"]
                .as_str()
                .unwrap()
                .trim_start_matches('0')
                .to_owned()
        })
        .collect()
}

/// nghttp2's clients, which bin/test installs (package nghttp2-client).
fn nghttp2_tools() -> bool {
    let found = ["h2load", "nghttp"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    });
    if !found {
        skip("h2load and nghttp are not installed (apt-get install nghttp2-client)");
    }
    found
}

#[test]
fn https_serves_http1_and_http2_alike() {
    let pki = Pki::new();
    let leaf = pki.leaf("localhost", KeyKind::Ecdsa);
    let ca = pki.ca();
    let redis = RedisServer::start();
    let up = Upstream::tcp();
    let f = https_forkd(
        &redis,
        &leaf,
        "hsts_max_age = 31536000\nhsts_include_subdomains = true\n",
        &format!(
            "workers = 2\n\
             [rate_limit.policy.tight]\nlimit = 3\nwindow = 60\nkey = \"user\"\n\
             [[route]]\nprefix = \"/app\"\nupstream = \"http://127.0.0.1:{}\"\n\
             policies = [\"tight\"]\n",
            up.port
        ),
    );
    f.add_user("alice", PW);
    let ca = Some(ca.as_str());
    let h1 = curl(ca, f.port, "/healthz", &["--http1.1"]);
    expect(&h1, 200, "1.1");
    let h2 = curl(ca, f.port, "/healthz", &["--http2"]);
    expect(&h2, 200, "2");
    for r in [&h1, &h2] {
        assert_eq!(
            r.header("strict-transport-security").as_deref(),
            Some("max-age=31536000; includeSubDomains")
        );
        assert!(r.header("x-request-id").is_some(), "{}", r.headers);
    }
    // A request id from the client is kept on h2 as on h1.
    let kept = curl(
        ca,
        f.port,
        "/healthz",
        &["--http2", "-H", "X-Request-Id: abc-123"],
    );
    assert_eq!(kept.header("x-request-id").as_deref(), Some("abc-123"));

    // Log in over h2; the session works over h1 and h2 alike, and the
    // route's policy counts both in the same bucket.
    let login = curl(
        ca,
        f.port,
        "/login",
        &[
            "--http2",
            "-H",
            "Content-Type: application/json",
            "--data",
            &format!(r#"{{"username":"alice","password":"{PW}"}}"#),
        ],
    );
    assert_eq!(login.status, 200, "{} {}", login.body, login.error);
    let token: serde_json::Value = serde_json::from_str(&login.body).unwrap();
    let auth = format!("Authorization: Bearer {}", token["token"].as_str().unwrap());
    let spoof = "X-Forkd-User: mallory";
    let first = curl(ca, f.port, "/app/x", &["--http2", "-H", &auth, "-H", spoof]);
    expect(&first, 200, "2");
    let echo: serde_json::Value = serde_json::from_str(&first.body).unwrap();
    let seen = |name: &str| -> Vec<String> {
        echo["headers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|kv| kv[0] == name)
            .map(|kv| kv[1].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(seen("x-forkd-user"), ["alice"], "{echo}");
    assert_eq!(seen("x-forwarded-proto"), ["https"], "{echo}");
    let authority = format!("127.0.0.1:{}", f.port);
    assert_eq!(seen("x-forwarded-host"), [authority.as_str()], "{echo}");
    assert_eq!(seen("host"), [authority.as_str()], "{echo}");
    let second = curl(ca, f.port, "/app/x", &["--http1.1", "-H", &auth]);
    assert_eq!(second.status, 200);
    let third = curl(ca, f.port, "/app/x", &["--http2", "-H", &auth]);
    assert_eq!(third.status, 200);
    assert!(third.header("ratelimit").is_some(), "{}", third.headers);
    let refused = curl(ca, f.port, "/app/x", &["--http2", "-H", &auth]);
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert!(refused.header("retry-after").is_some());
    assert!(
        refused.body.contains("too-many-requests"),
        "{}",
        refused.body
    );

    // Plain HTTP on the TLS port is told so; a broken ClientHello is a
    // failed handshake, counted; the workers serve on.
    assert_eq!(get(f.port, "/healthz").unwrap().status, 400);
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", f.port)).unwrap();
        s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x02, 0xff, 0xff])
            .unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let _ = s.read(&mut [0u8; 64]);
    }
    let metrics = poll(PATIENCE, || {
        let m = curl(ca, f.port, "/metrics", &["--http2"]);
        let parsed = parse_exposition(&m.body);
        (parsed
            .get("forkd_tls_handshake_failures_total{}")
            .copied()?
            >= 1.0)
            .then_some(parsed)
    })
    .expect("the failed handshake is counted");
    let expiry = metrics
        .iter()
        .find(|(k, _)| k.starts_with("forkd_tls_certificate_expiry_timestamp_seconds"))
        .map(|(_, v)| *v)
        .expect("the expiry is exported");
    let status = f.status().unwrap();
    let cert = &status["certificates"][0];
    assert_eq!(cert["not_after"].as_f64().unwrap(), expiry);
    assert_eq!(cert["subject"], "CN=localhost");
    let text = f.cli(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("CN=localhost"), "{text}");
    assert!(text.contains(&leaf.serial), "{text}");
}

#[test]
fn h2c_by_prior_knowledge_only_when_enabled() {
    let redis = RedisServer::start();
    let f = Forkd::start_with_redis(&redis, "workers = 1\n");
    let h1 = curl(None, f.port, "/healthz", &["--http1.1"]);
    expect(&h1, 200, "1.1");
    let refused = curl(None, f.port, "/healthz", &["--http2-prior-knowledge"]);
    assert_ne!(refused.status, 200, "h2c is off by default");
    let text = std::fs::read_to_string(&f.config).unwrap();
    std::fs::write(&f.config, format!("{text}\n[http2]\nh2c = true\n")).unwrap();
    let out = f.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let h2c = curl(None, f.port, "/healthz", &["--http2-prior-knowledge"]);
    expect(&h2c, 200, "2");
    let h1 = curl(None, f.port, "/healthz", &["--http1.1"]);
    expect(&h1, 200, "1.1");
    assert!(h2c.header("strict-transport-security").is_none());
}

#[test]
fn certificates_rotate_on_reload_under_load_and_a_bad_pair_is_refused() {
    let pki = Pki::new();
    let first = pki.leaf("localhost", KeyKind::Ecdsa);
    let second = pki.leaf("localhost", KeyKind::Rsa);
    let third = pki.leaf("localhost", KeyKind::Ed25519);
    let other = pki.leaf("other", KeyKind::Ecdsa);
    let ca = pki.ca();
    let redis = RedisServer::start();
    let f = https_forkd(&redis, &first, "", "workers = 2\n");
    assert_eq!(served_serial(f.port), first.serial);
    assert_eq!(status_serials(&f), vec![first.serial.clone()]);

    // New connections, one request each, for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let loop_stop = stop.clone();
    let (port, loop_ca) = (f.port, ca.clone());
    let load = std::thread::spawn(move || {
        let (mut ok, mut failed) = (0u32, Vec::new());
        let deadline = Instant::now() + Duration::from_secs(240);
        for _ in 0..5000 {
            if loop_stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                break;
            }
            let r = curl(Some(&loop_ca), port, "/healthz", &["--http1.1"]);
            if r.status == 200 {
                ok += 1;
            } else {
                failed.push(format!("{} {}", r.status, r.error));
            }
        }
        (ok, failed)
    });
    let reload = |expect_ok: bool| {
        let out = f.cli(&["reload"]);
        assert_eq!(
            out.status.success(),
            expect_ok,
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    // RSA (PKCS#1) after ECDSA (SEC1).
    install(&f, &second.cert, &second.key);
    reload(true);
    assert_eq!(served_serial(f.port), second.serial);
    // A key that is not the certificate's: refused, the old pair serves.
    install(&f, &third.cert, &other.key);
    let why = reload(false);
    assert!(why.contains("is not the key of the certificate"), "{why}");
    assert_eq!(served_serial(f.port), second.serial);
    assert_eq!(status_serials(&f), vec![second.serial.clone()]);
    // Not PEM at all: refused too.
    std::fs::write(f.dir.path().join("tls/key.pem"), "garbage").unwrap();
    let why = reload(false);
    assert!(why.contains("no usable private key"), "{why}");
    // Ed25519 (PKCS#8), good again.
    install(&f, &third.cert, &third.key);
    reload(true);
    assert_eq!(served_serial(f.port), third.serial);
    assert_eq!(status_serials(&f), vec![third.serial.clone()]);
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.join().unwrap();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert!(ok >= 5, "only {ok} requests were made");
}

#[test]
fn h2_streams_multiplex_and_a_reload_drains_them_with_goaway() {
    if !nghttp2_tools() {
        return;
    }
    let pki = Pki::new();
    let leaf = pki.leaf("localhost", KeyKind::Ecdsa);
    let redis = RedisServer::start();
    let up = Upstream::tcp();
    let f = https_forkd(
        &redis,
        &leaf,
        "",
        &format!(
            "workers = 2\n[http2]\nmax_concurrent_streams = 50\n\
             [[route]]\nprefix = \"/slow\"\nupstream = \"http://127.0.0.1:{}\"\nauth = \"none\"\n",
            up.port
        ),
    );
    let url = format!("https://127.0.0.1:{}/healthz", f.port);
    // Many streams on few connections, as many as the server allows
    // (h2load opens them before it has the server's SETTINGS: any more
    // would be refused).
    let out = Command::new("h2load")
        .args(["-n", "4000", "-c", "2", "-m", "50", &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("4000 succeeded, 0 failed, 0 errored"),
        "{text}"
    );
    assert!(text.contains("Application protocol: h2"), "{text}");
    // Three requests on one connection, as three streams.
    let out = Command::new("nghttp")
        .args(["-nv", &url, &format!("{url}?b"), &format!("{url}?c")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let streams: HashSet<&str> = text
        .lines()
        .filter(|l| l.contains("recv HEADERS frame"))
        .filter_map(|l| l.rsplit_once("stream_id=").map(|(_, id)| id))
        .collect();
    assert_eq!(streams.len(), 3, "{text}");
    assert_eq!(text.matches("Connected").count(), 1, "{text}");
    assert_eq!(text.matches(":status: 200").count(), 3, "{text}");

    // Twenty streams in flight on one connection when its worker is
    // replaced, twice: the worker says GOAWAY and every stream completes.
    // They last 10 s, so that they are still open when the rolling reload
    // reaches their worker, on a loaded machine too.
    // (A client that keeps opening streams after a GOAWAY has them refused
    // as RFC 9113 says, safe to retry; h2load counts those as failed
    // without retrying, so it is not the judge here.)
    let slow = format!("https://127.0.0.1:{}/slow/10000", f.port);
    let nghttp = Command::new("nghttp")
        .args(["-nv", "-m", "20", &slow])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    poll(PATIENCE, || {
        let s = f.status()?;
        let in_flight: u64 = s["workers"]
            .as_array()?
            .iter()
            .filter_map(|w| w["in_flight"].as_u64())
            .sum();
        (in_flight == 20).then_some(())
    })
    .expect("the slow streams are in flight");
    for _ in 0..2 {
        let out = f.cli(&["reload"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = nghttp.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("recv GOAWAY frame"), "{text}");
    assert_eq!(text.matches(":status: 200").count(), 20, "{text}");
    // New connections after the reloads are served as before.
    let out = Command::new("h2load")
        .args(["-n", "400", "-c", "2", "-m", "20", &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("400 succeeded, 0 failed, 0 errored"),
        "{text}"
    );
}

#[test]
fn a_key_only_root_can_read_works_with_user() {
    if !nix::unistd::geteuid().is_root() {
        return skip("not root");
    }
    if nix::unistd::User::from_name("nobody")
        .ok()
        .flatten()
        .is_none()
    {
        return skip("no user 'nobody'");
    }
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::new();
    let leaf = pki.leaf("localhost", KeyKind::Ecdsa);
    let ca = pki.ca();
    let redis = RedisServer::start();
    let mut f = Forkd::configure("workers = 1\nuser = \"nobody\"\n");
    std::fs::set_permissions(f.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    install(&f, &leaf.cert, &leaf.key);
    let key = f.dir.path().join("tls/key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(
        f.dir.path().join("tls"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    let text = std::fs::read_to_string(&f.config).unwrap();
    std::fs::write(&f.config, format!("{text}{}", tls_config(&f))).unwrap();
    f.env.push(("FORKD_REDIS_URL".into(), redis.url()));
    f.spawn(&[]);
    f.wait_ready();
    let r = curl(Some(&ca), f.port, "/healthz", &["--http2"]);
    assert_eq!(r.status, 200, "{}", r.error);
    // A reload reads the files again as nobody: refused, with the reason,
    // and the pair read at start keeps serving.
    let out = f.cli(&["reload"]);
    assert!(!out.status.success());
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(why.contains("Permission denied"), "{why}");
    assert_eq!(served_serial(f.port), leaf.serial);
}

#[test]
fn check_config_reads_every_key_kind_and_refuses_bad_pairs() {
    let pki = Pki::new();
    let f = Forkd::configure("");
    let check = |cert: &Path, key: &Path| {
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&f.config)
            .arg("check-config")
            .env("FORKD_TLS_CERT_FILE", cert)
            .env("FORKD_TLS_KEY_FILE", key)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    for (name, kind) in [
        ("ec", KeyKind::Ecdsa),
        ("rsa", KeyKind::Rsa),
        ("ed", KeyKind::Ed25519),
    ] {
        let l = pki.leaf(name, kind);
        let (code, text) = check(&l.cert, &l.key);
        assert_eq!(code, Some(0), "{text}");
        assert!(
            text.contains(&format!("# certificate OK: CN={name}")),
            "{text}"
        );
        assert!(text.contains(&l.serial), "{text}");
    }
    let a = pki.leaf("a", KeyKind::Ecdsa);
    let b = pki.leaf("b", KeyKind::Ecdsa);
    let (code, text) = check(&a.cert, &b.key);
    assert_eq!(code, Some(64), "{text}");
    assert!(text.contains("is not the key of the certificate"), "{text}");
    let (code, text) = check(&a.key, &a.key);
    assert_eq!(code, Some(64), "{text}");
    assert!(text.contains("no CERTIFICATE block"), "{text}");
    let (code, text) = check(&a.cert, &f.dir.path().join("missing.pem"));
    assert_eq!(code, Some(64), "{text}");
    assert!(text.contains("cannot read"), "{text}");
    let big = f.dir.path().join("big.pem");
    std::fs::write(&big, vec![b'A'; 2 << 20]).unwrap();
    let (code, text) = check(&big, &a.key);
    assert_eq!(code, Some(64), "{text}");
    assert!(text.contains("larger than"), "{text}");
    // A start with a bad pair binds nothing and says why.
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&f.config)
        .arg("start")
        .env("FORKD_TLS_CERT_FILE", &a.cert)
        .env("FORKD_TLS_KEY_FILE", &b.key)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(port_free(f.port));
}

#[test]
fn what_a_client_sends_in_its_hello_never_writes_a_log_line() {
    let pki = Pki::new();
    let leaf = pki.leaf("localhost", KeyKind::Ecdsa);
    let redis = RedisServer::start();
    let f = https_forkd(&redis, &leaf, "", "workers = 1\n");
    // OpenSSL-based clients (wrk among them) send an IP address as SNI,
    // which rustls warns about: a line per connection, were it logged.
    for _ in 0..5 {
        let out = Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{}", f.port)])
            .args(["-servername", "127.0.0.1", "-CAfile", &pki.ca()])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    }
    // A request after them, so that anything they logged is written.
    expect(&curl(Some(&pki.ca()), f.port, "/healthz", &[]), 200, "2");
    let log = f.log_text();
    assert!(!log.contains("SNI"), "{log}");
}

/// Plain HTTP sent to an HTTPS port gets a plain-HTTP 400 that says so
/// (as nginx does), not a TLS alert that curl calls HTTP/0.9; the port
/// still speaks HTTPS after it.
#[test]
fn plain_http_to_an_https_port_is_told_so() {
    let pki = Pki::new();
    let leaf = pki.leaf("localhost", KeyKind::Ecdsa);
    let redis = RedisServer::start();
    let f = https_forkd(&redis, &leaf, "", "workers = 1\n");
    let r = request(f.port, "GET", "/healthz", &[], b"").expect("a plain-HTTP answer");
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(r.header("connection"), Some("close"));
    let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["type"], "urn:forkd:problem:bad-request");
    assert!(
        body["detail"].as_str().unwrap().contains("HTTPS port"),
        "{body}"
    );
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://127.0.0.1:{}/healthz", f.port))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "400", "{out:?}");
    expect(&curl(Some(&pki.ca()), f.port, "/healthz", &[]), 200, "2");
}

/// One TLS connection with `openssl s_client` that asks for /healthz,
/// saving its session to `out` or resuming `resume`; returns what it
/// printed.
fn s_client(port: u16, ca: &str, out: Option<&Path>, resume: Option<&Path>) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-CAfile", ca, "-ign_eof"]);
    if let Some(p) = out {
        cmd.arg("-sess_out").arg(p);
    }
    if let Some(p) = resume {
        cmd.arg("-sess_in").arg(p);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    String::from_utf8_lossy(&child.wait_with_output().unwrap().stdout).to_string()
}

#[test]
fn a_session_resumes_on_every_worker() {
    let pki = Pki::new();
    let leaf = pki.leaf("localhost", KeyKind::Ecdsa);
    let redis = RedisServer::start();
    // One socket per worker: the kernel spreads new connections by their
    // source port, so both workers take some.
    let f = https_forkd(&redis, &leaf, "", "workers = 2\nlistener = \"reuseport\"\n");
    let dir = tempfile::tempdir().unwrap();
    let session = dir.path().join("session.pem");
    let first = s_client(f.port, &pki.ca(), Some(&session), None);
    assert!(first.contains("New, TLSv1.3"), "{first}");
    // Tickets are made under keys every worker shares: each resumption
    // works, whichever worker takes it.
    let mut pids = HashSet::new();
    for _ in 0..60 {
        let again = s_client(f.port, &pki.ca(), None, Some(&session));
        assert!(again.contains("Reused, TLSv1.3"), "{again}");
        let pid = again
            .lines()
            .find_map(|l| l.strip_prefix("x-forkd-pid: "))
            .unwrap_or_else(|| panic!("no answer: {again}"));
        pids.insert(pid.trim().to_owned());
        if pids.len() == 2 {
            break;
        }
    }
    assert_eq!(pids.len(), 2, "every resumption went to one worker");
}
