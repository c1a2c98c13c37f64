//! The command line and configuration, through the built binary, plus the
//! worker's HTTP edges (errors, slow clients, IPv6).

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn run(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(BIN);
    c.args(args).stdin(Stdio::null()).env_remove("RUST_LOG");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Output into a pipe whose reader has gone (`forkd status | head` once
/// head has its lines) ends the command quietly, as SIGPIPE ends `ls`:
/// status 141, nothing on stderr, no panic. The read end is closed before the command
/// starts, so its first write fails.
#[test]
fn a_closed_pipe_on_stdout_ends_a_command_quietly() {
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("forkd.log");
    let f = Forkd::start(&format!(
        "workers = 1\nlog_file = {:?}\n",
        log.display().to_string()
    ));
    f.wait_workers(Some(1));
    let config = f.config.display().to_string();
    for args in [
        vec!["--config", &config, "status"],
        vec!["--config", &config, "check-config"],
        vec!["config-reference"],
        vec!["--config", &config, "logs"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(BIN)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(
            out.status.code() == Some(141) && out.stderr.is_empty(),
            "forkd {args:?} into a closed pipe: {:?}, stderr {}",
            out.status,
            stderr(&out)
        );
    }
}

#[test]
fn unknown_key_exits_64_naming_the_key() {
    let f = Forkd::configure("workerz = 3\n");
    for cmd in ["start", "check-config"] {
        let out = f.cli(&[cmd]);
        assert_eq!(out.status.code(), Some(64), "{cmd}");
        assert!(stderr(&out).contains("workerz"), "{}", stderr(&out));
    }
    // Nothing was bound.
    assert!(port_free(f.port));
}

#[test]
fn bad_values_exit_64_naming_key_and_value() {
    for (extra, key) in [
        ("workers = 0\n", "workers"),
        ("backlog = -1\n", "backlog"),
        ("listener = \"fast\"\n", "listener"),
        ("shutdown_timeout = \"soon\"\n", "shutdown_timeout"),
        ("[http]\nmax_connections = 0\n", "max_connections"),
    ] {
        let f = Forkd::configure(extra);
        let out = f.cli(&["start"]);
        assert_eq!(out.status.code(), Some(64), "{extra}: {}", stderr(&out));
        assert!(stderr(&out).contains(key), "{extra}: {}", stderr(&out));
        assert!(port_free(f.port));
    }
    let f = Forkd::configure("");
    let out = f.cli(&["start", "--listen", "nowhere"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("`listen`") && stderr(&out).contains("nowhere"));
}

#[test]
fn a_bad_redis_url_exits_64_and_never_shows_the_url() {
    for url in [
        "http://app:s3cret@127.0.0.1:6379",
        "redis://app:s3cret@127.0.0.1:notaport",
    ] {
        let f = Forkd::configure(&format!("[redis]\nurl = \"{url}\"\n"));
        for cmd in ["start", "check-config"] {
            let out = f.cli(&[cmd]);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(64), "{url} {cmd}: {err}");
            assert!(err.contains("`redis.url`"), "{url} {cmd}: {err}");
            assert!(!err.contains("s3cret"), "{url} {cmd}: {err}");
        }
        assert!(port_free(f.port));
    }
}

#[test]
fn environment_and_flags_override_the_file() {
    let f = Forkd::configure("workers = 2\n");
    let path = f.config.to_str().unwrap();
    let out = run(
        &["--config", path, "check-config"],
        &[("FORKD_WORKERS", "3"), ("FORKD_HTTP_KEEPALIVE", "false")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("workers = 3"), "{text}");
    assert!(text.contains("keepalive = false"), "{text}");

    let out = run(
        &[
            "--config",
            path,
            "check-config",
            "--workers",
            "5",
            "--listen",
            "[::1]:9",
        ],
        &[("FORKD_WORKERS", "3")],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("workers = 5"), "{text}");
    assert!(text.contains("listen = \"[::1]:9\""), "{text}");

    let out = run(
        &["--config", path, "check-config"],
        &[("FORKD_WORKERS", "many")],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("FORKD_WORKERS"), "{}", stderr(&out));
    let out = run(
        &["--config", path, "check-config"],
        &[("FORKD_WROKERS", "2")],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("FORKD_WROKERS"), "{}", stderr(&out));
}

/// The scripts' own `FORKD_*` variables (bin/cluster's FORKD_PORTS,
/// bin/package's FORKD_MAINTAINER) and anyone else's (a harness's
/// FORKD_BIN) are no overrides; a mistyped override still fails.
#[test]
fn forkd_variables_that_are_no_keys_pass_and_mistyped_keys_fail() {
    let f = Forkd::configure("workers = 2\n");
    let path = f.config.to_str().unwrap();
    let out = run(
        &["--config", path, "check-config"],
        &[
            ("FORKD_PORTS", "8081 8082"),
            ("FORKD_MAINTAINER", "x"),
            ("FORKD_WORKERS", "3"),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("workers = 3"));

    // Not the project's: ignored, with a warning that names it.
    let out = run(
        &["--config", path, "check-config"],
        &[("FORKD_BIN", "/somewhere/forkd")],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("warning") && stderr(&out).contains("FORKD_BIN"),
        "{}",
        stderr(&out)
    );

    for (name, hint) in [
        ("FORKD_WROKERS", "FORKD_WORKERS"),
        ("FORKD_HTTP_MAX_CONECTIONS", "FORKD_HTTP_MAX_CONNECTIONS"),
    ] {
        let out = run(
            &["--config", path, "check-config"],
            &[("FORKD_PORTS", "8081 8082"), (name, "4")],
        );
        assert_eq!(out.status.code(), Some(64), "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains(name), "{}", stderr(&out));
        assert!(stderr(&out).contains(hint), "{}", stderr(&out));
    }
}

#[test]
fn missing_config_file_and_bad_usage_exit_64() {
    let out = run(
        &["--config", "/nonexistent/forkd.toml", "check-config"],
        &[],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("/nonexistent/forkd.toml"));
    let out = run(&["frobnicate"], &[]);
    assert_eq!(out.status.code(), Some(64));
    let out = run(&["--help"], &[]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["start", "stop", "reload", "status", "scale", "check-config"] {
        assert!(help.contains(cmd), "{help}");
    }
}

#[test]
fn port_already_served_by_another_process_is_refused() {
    let f = Forkd::configure("workers = 1\n");
    let squatter = std::net::TcpListener::bind(("127.0.0.1", f.port)).unwrap();
    let out = f.cli(&["start"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already in use"), "{}", stderr(&out));
    // A refused start leaves no pidfile behind.
    let pidfile = f.dir.path().join("run/forkd.pid");
    assert!(!pidfile.exists(), "{} left behind", pidfile.display());
    drop(squatter);
    // The same holds for a socket that itself uses SO_REUSEPORT, which would
    // otherwise share the port silently.
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_reuse_port(true).unwrap();
    s.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], f.port)).into())
        .unwrap();
    s.listen(8).unwrap();
    let out = f.cli(&["start"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already in use"), "{}", stderr(&out));
}

#[test]
fn second_start_of_the_same_instance_is_refused() {
    let f = Forkd::start("workers = 1\n");
    let out = f.cli(&["start"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already running"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&f.pid().to_string()),
        "{}",
        stderr(&out)
    );
    assert_eq!(f.get("/healthz").unwrap().status, 200);
}

#[test]
fn two_instances_with_different_names_run_side_by_side() {
    let a = Forkd::start("workers = 1\ninstance = \"alpha\"\n");
    let b = Forkd::configure("workers = 1\ninstance = \"beta\"\n");
    // Same runtime dir as `a`, different name and port.
    let text = std::fs::read_to_string(&b.config).unwrap().replace(
        &b.dir.path().join("run").display().to_string(),
        &a.dir.path().join("run").display().to_string(),
    );
    std::fs::write(&b.config, text).unwrap();
    let mut b = b;
    b.spawn(&[]);
    b.wait_ready();
    assert_eq!(a.get("/healthz").unwrap().status, 200);
    assert_eq!(b.get("/healthz").unwrap().status, 200);
    assert_eq!(a.status().unwrap()["instance"], "alpha");
    assert_eq!(b.status().unwrap()["instance"], "beta");
    assert!(a.dir.path().join("run/alpha.sock").exists());
    assert!(a.dir.path().join("run/beta.sock").exists());
}

#[test]
fn commands_say_plainly_when_forkd_is_not_running() {
    let f = Forkd::configure("");
    for args in [
        &["status"][..],
        &["stop"],
        &["reload"],
        &["scale", "2"],
        &["status", "--json"],
    ] {
        let out = f.cli(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&out).contains("is not running"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn daemon_start_returns_when_ready_and_stop_waits() {
    // The flag reaches the daemon: the file alone would give one worker.
    let f = Forkd::configure("workers = 1\n");
    let out = f.cli(&["start", "--daemon", "--workers", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("2 worker(s) ready"), "{text}");
    // Ready means serving, right away.
    assert_eq!(f.get("/healthz").unwrap().status, 200);
    let status = f.status().unwrap();
    let sup = status["pid"].as_i64().unwrap() as i32;
    let log = f.dir.path().join("run/forkd.log");
    assert!(std::fs::read_to_string(&log).unwrap().contains("starting"));
    // A second daemon start is refused.
    let out = f.cli(&["start", "--daemon"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already running"));

    let out = f.cli(&["stop"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!alive(sup));
    assert!(port_free(f.port));
}

/// `forkd logs`: the daemon's last lines, then (`--follow`) what it
/// writes next; without a log file, where the logs go instead.
#[test]
fn logs_shows_the_daemons_last_lines_and_follows() {
    let f = Forkd::configure("workers = 1\n");
    let out = f.cli(&["logs"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("no log file at") && err.contains("journalctl"),
        "{err}"
    );
    let out = f.cli(&["start", "--daemon"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = f.cli(&["logs", "-n", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(text.lines().count(), 2, "{text}");
    let whole = std::fs::read_to_string(f.dir.path().join("run/forkd.log")).unwrap();
    assert!(whole.contains(&text) && whole.lines().count() > 2, "{text}");

    /// Killed when dropped, a failed assertion too.
    struct Follow(std::process::Child);
    impl Drop for Follow {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut follow = Command::new(BIN)
        .arg("--config")
        .arg(&f.config)
        .args(["logs", "--follow", "-n", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(Follow)
        .unwrap();
    let stdout = follow.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The last line first: once it is shown, the end is measured and
    // what comes next is followed.
    poll(PATIENCE, || rx.try_recv().ok()).expect("--follow -n 1 shows the last line");
    let out = f.cli(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut seen = Vec::new();
    let found = poll(PATIENCE, || {
        seen.extend(rx.try_iter());
        seen.iter()
            .any(|l| l.contains("reloading the configuration"))
            .then_some(())
    });
    drop(follow);
    found.unwrap_or_else(|| panic!("--follow never showed the reload: {seen:?}"));
    // Like the other client commands, it reads only where to look: a
    // value a start would refuse does not stop it.
    let text = std::fs::read_to_string(&f.config).unwrap();
    std::fs::write(&f.config, format!("{text}\nshutdown_timeout = -1\n")).unwrap();
    let out = f.cli(&["logs", "-n", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = f.cli(&["stop"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// docs/cli-reference.md is what the binary says of itself: regenerate it
/// with `forkd cli-reference > docs/cli-reference.md` when a flag changes.
#[test]
fn the_cli_reference_is_what_the_binary_prints() {
    let out = Command::new(BIN)
        .arg("cli-reference")
        .env("FORKD_CONFIG", "/a/path/that/must/not/show")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let generated = String::from_utf8(out.stdout).unwrap();
    let file = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/cli-reference.md"
    ))
    .unwrap();
    assert!(
        generated == file,
        "docs/cli-reference.md is stale: run `forkd cli-reference > docs/cli-reference.md`"
    );
    for command in [
        "## forkd start",
        "## forkd top",
        "## forkd logs",
        "## forkd user add",
    ] {
        assert!(file.contains(&format!("{command}\n")), "{command}");
    }
}

/// `forkd status --show-config`: the configuration the running instance uses,
/// with what its own environment set, seen from a terminal that has none
/// of it (where `check-config` cannot know).
#[test]
fn status_config_shows_what_the_running_instance_uses() {
    let mut f = Forkd::configure("workers = 1\n");
    f.env
        .push(("FORKD_HTTP_MAX_CONNECTIONS".into(), "123".into()));
    f.spawn(&[]);
    f.wait_ready();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&f.config)
        .args(["status", "--show-config"])
        .env_remove("FORKD_HTTP_MAX_CONNECTIONS")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(text.contains("max_connections = 123"), "{text}");
    assert!(
        text.contains("environment FORKD_HTTP_MAX_CONNECTIONS"),
        "{text}"
    );
    let here = Command::new(BIN)
        .arg("--config")
        .arg(&f.config)
        .arg("check-config")
        .env_remove("FORKD_HTTP_MAX_CONNECTIONS")
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&here.stdout).contains("max_connections = 123"));
}

#[test]
fn daemon_start_reports_a_failed_start() {
    let f = Forkd::configure("workers = 1\n");
    let squatter = std::net::TcpListener::bind(("127.0.0.1", f.port)).unwrap();
    let out = f.cli(&["start", "--daemon"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already in use"), "{}", stderr(&out));
    assert!(!f.dir.path().join("run/forkd.pid").exists());
    drop(squatter);
}

#[test]
fn check_config_prints_the_effective_config() {
    let f = Forkd::configure("workers = \"auto\"\n");
    let out = f.cli(&["check-config"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let cores = std::thread::available_parallelism().unwrap().get();
    assert!(text.contains(&format!("workers = {cores}")), "{text}");
    assert!(text.contains(&format!("listen = \"127.0.0.1:{}\"", f.port)));
    assert!(port_free(f.port));
}

#[test]
fn unknown_paths_and_methods_get_problem_json() {
    let f = Forkd::start("workers = 1\n");
    let r = f.get("/nope").unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(r.json()["type"], "urn:forkd:problem:not-found");
    assert_eq!(r.json()["status"], 404);

    let r = raw(
        f.port,
        "DELETE /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    assert_eq!(r.header("content-type"), Some("application/problem+json"));

    let r = raw(
        f.port,
        "HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.unwrap().status, 200);
    // Garbage is answered with 400 by hyper, and the worker lives on.
    let r = raw(f.port, "NOT HTTP AT ALL\r\n\r\n").unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(f.get("/healthz").unwrap().status, 200);
}

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    let f = Forkd::start("workers = 1\n");
    let mut ka = KeepAlive::new(f.port);
    let pid = ka.get("/healthz").unwrap().pid();
    for _ in 0..50 {
        let r = ka.get("/healthz").unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.pid(), pid);
    }
}

#[test]
fn a_slow_client_is_cut_off_and_cannot_pin_the_worker() {
    let f = Forkd::start("workers = 1\n[http]\nheader_read_timeout = 1\nmax_connections = 2\n");
    // A client that never finishes its request head is disconnected.
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", f.port)).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let t = Instant::now();
    let mut buf = Vec::new();
    // Cut off by the server (EOF), not by our 15 s read timeout.
    let cut = slow.read_to_end(&mut buf);
    eprintln!("slow client cut off after {:?}", t.elapsed());
    assert!(cut.is_ok(), "not cut off: {cut:?}");
    // Two idle connections fill max_connections; a third is served once the
    // header timeout has freed a place, not never.
    let _a = std::net::TcpStream::connect(("127.0.0.1", f.port)).unwrap();
    let _b = std::net::TcpStream::connect(("127.0.0.1", f.port)).unwrap();
    let t = Instant::now();
    let r = f.get("/healthz").unwrap();
    assert_eq!(r.status, 200);
    // It really waited for a place (a lower bound: a slow machine only
    // makes the wait longer), about header_read_timeout.
    let waited = t.elapsed();
    eprintln!("the third client waited {waited:?}");
    assert!(
        waited >= Duration::from_millis(500),
        "served at once: {waited:?}"
    );
}

#[test]
fn listens_on_ipv6_loopback() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        return skip("no IPv6 loopback on this machine");
    }
    let mut f = Forkd::configure("workers = 1\n");
    let port = f.port;
    let text = std::fs::read_to_string(&f.config)
        .unwrap()
        .replace(&format!("127.0.0.1:{port}"), &format!("[::1]:{port}"));
    std::fs::write(&f.config, text).unwrap();
    f.spawn(&[]);
    f.wait_ready();
    let mut s = std::net::TcpStream::connect(("::1", port)).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

/// The control socket never lets one client stall the supervisor: several
/// requests in one write are all answered, a request followed by a
/// half-close is answered, and a client that sends without ever reading is
/// dropped while everyone else is served.
#[test]
fn the_control_socket_serves_every_line_and_survives_a_client_that_never_reads() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    let f = Forkd::start("workers = 1\n");
    let sock = f.dir.path().join("run/forkd.sock");

    let mut c = UnixStream::connect(&sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(b"{\"cmd\":\"status\"}\n{\"cmd\":\"status\"}\n{\"cmd\":\"status\"}\n")
        .unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let replies: Vec<String> = BufReader::new(c).lines().map(|l| l.unwrap()).collect();
    assert_eq!(replies.len(), 3, "{replies:?}");
    assert!(replies.iter().all(|r| r.contains("\"reply\":\"status\"")));

    // A client that asks and asks and never reads: its replies pile up
    // until the supervisor gives up on it, and meanwhile others are served.
    let mut greedy = UnixStream::connect(&sock).unwrap();
    greedy
        .set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let request = b"{\"cmd\":\"status\"}\n".repeat(64);
    let mut dropped = false;
    for _ in 0..20_000 {
        if greedy.write_all(&request).is_err() {
            dropped = true;
            break;
        }
    }
    assert!(dropped, "a client that never reads is dropped");
    let out = f.cli(&["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(f.get("/healthz").unwrap().status, 200);
}

/// One client cannot hold all of a worker's connections: past
/// http.max_connections_per_client its further connections are closed at
/// once (and counted), while other clients are served.
#[test]
fn one_client_cannot_hold_every_connection() {
    let f = Forkd::start("workers = 1\n[http]\nmax_connections_per_client = 2\n");
    let _a = connect_from("127.0.0.2", f.port).unwrap();
    let _b = connect_from("127.0.0.2", f.port).unwrap();
    // The third from the same client: closed without an answer. (The
    // worker has taken the first two once it refuses one, so poll.)
    let refused = poll(PATIENCE, || {
        let mut c = connect_from("127.0.0.2", f.port).ok()?;
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut buf = Vec::new();
        let _ = c.read_to_end(&mut buf);
        buf.is_empty().then_some(())
    });
    assert!(
        refused.is_some(),
        "a third connection from one client is refused"
    );
    let r = request_from("127.0.0.3", f.port, "GET", "/healthz", &[], b"").unwrap();
    assert_eq!(r.status, 200, "another client is served");
    let metrics = f.get("/metrics").unwrap().body;
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("forkd_http_connections_refused_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(refused >= 1, "{metrics}");
    // Once one of the two closes, the client gets a place again.
    drop(_a);
    poll(PATIENCE, || {
        let r = request_from("127.0.0.2", f.port, "GET", "/healthz", &[], b"").ok()?;
        (r.status == 200).then_some(())
    })
    .expect("a place again after a connection closed");
}
