//! What systemd sees: sd_notify messages, the watchdog, socket activation,
//! privilege drop; the unit files are checked by bin/test.

mod common;

use std::os::unix::net::UnixDatagram;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// A datagram socket standing in for systemd's notify socket; every
/// message arrives on the channel with the time it came.
struct NotifySocket {
    path: std::path::PathBuf,
    rx: mpsc::Receiver<(Instant, String)>,
}

impl NotifySocket {
    fn new(dir: &std::path::Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            // Bounded: ends when the test drops the receiver.
            for _ in 0..1_000_000 {
                let Ok(n) = sock.recv(&mut buf) else { return };
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if tx.send((Instant::now(), msg)).is_err() {
                    return;
                }
            }
        });
        NotifySocket { path, rx }
    }

    /// The next message that satisfies `want`, skipping others.
    fn next(&self, want: impl Fn(&str) -> bool) -> (Instant, String) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (t, m) = self
                .rx
                .recv_timeout(left)
                .expect("a notify message in time");
            if want(&m) {
                return (t, m);
            }
        }
    }
}

#[test]
fn sd_notify_ready_status_reloading_and_stopping() {
    let mut f = Forkd::configure("workers = 2\nshutdown_timeout = 5\n");
    let notify = NotifySocket::new(f.dir.path());
    f.spawn(&[("NOTIFY_SOCKET", notify.path.to_str().unwrap())]);

    // STATUS= lines and READY=1, in whichever order the workers' start
    // makes them come.
    let mut seen = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while !seen.iter().any(|m: &String| m == "READY=1") {
        let left = deadline.saturating_duration_since(Instant::now());
        seen.push(notify.rx.recv_timeout(left).expect("READY=1 in time").1);
    }
    assert!(
        seen.iter()
            .all(|m| m == "READY=1" || m.starts_with("STATUS=")),
        "{seen:?}"
    );
    // READY=1 came once every worker was ready: both answer right now.
    let s = f.status().unwrap();
    assert_eq!(s["workers_ready"], 2);
    let mut pids = std::collections::HashSet::new();
    poll(PATIENCE, || {
        pids.insert(get(f.port, "/healthz").ok()?.pid());
        (pids.len() == 2).then_some(())
    })
    .expect("both workers answer");
    let (_, status) = notify.next(|m| m.starts_with("STATUS=2/2"));
    assert!(status.contains("2/2 workers ready"), "{status}");

    // A reload: RELOADING=1 with MONOTONIC_USEC, then READY=1.
    let out = f.cli(&["reload"]);
    assert!(out.status.success());
    let (_, reloading) = notify.next(|m| m.starts_with("RELOADING=1"));
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .expect("MONOTONIC_USEC")
        .parse()
        .unwrap();
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    let now_usec = now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1000;
    assert!(
        usec <= now_usec && now_usec - usec < 60_000_000,
        "{usec} vs {now_usec}"
    );
    notify.next(|m| m == "READY=1");

    signal(f.pid(), Signal::SIGTERM);
    notify.next(|m| m == "STOPPING=1");
    assert_eq!(f.wait_exit(PATIENCE), Some(0));
}

#[test]
fn nothing_is_sent_without_notify_socket_and_children_do_not_inherit_it() {
    // Neither the managed redis-server nor a worker may see NOTIFY_SOCKET
    // or WATCHDOG_* (they could speak for the service to systemd), as
    // /proc/PID/environ shows their environment to the same user.
    let mut f = Forkd::configure("workers = 2\n");
    let notify = NotifySocket::new(f.dir.path());
    f.spawn(&[
        ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
        ("WATCHDOG_USEC", "60000000"),
    ]);
    let workers = f.wait_ready();
    let redis = f.status().unwrap()["redis"]["pid"].as_i64().unwrap() as i32;
    for pid in workers.iter().copied().chain([redis]) {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let env = String::from_utf8_lossy(&env);
        for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_"] {
            assert!(!env.contains(var), "pid {pid} sees {var}: {env:?}");
        }
        if pid != redis {
            // The rest of the environment is still there.
            assert!(env.contains("PATH="), "pid {pid}: {env:?}");
        }
    }
    // The supervisor itself still speaks to systemd.
    notify.next(|m| m == "READY=1");
}

#[test]
fn watchdog_is_fed_at_half_the_interval_only_while_workers_beat() {
    let mut f = Forkd::configure("workers = 2\nworker_timeout = 600\n");
    let notify = NotifySocket::new(f.dir.path());
    f.spawn(&[
        ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
        ("WATCHDOG_USEC", "1000000"),
    ]);
    let workers = f.wait_ready();
    let mut times = Vec::new();
    for _ in 0..6 {
        times.push(notify.next(|m| m == "WATCHDOG=1").0);
    }
    let mut gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort();
    let median = gaps[gaps.len() / 2];
    // Sent every half interval; the bound that matters to systemd is the
    // whole interval (1 s).
    eprintln!("WATCHDOG=1 every {median:?} (median), WATCHDOG_USEC 1 s");
    assert!(
        median >= Duration::from_millis(350) && median < Duration::from_secs(1),
        "WATCHDOG=1 every {median:?}, expected about 500 ms"
    );

    // Every worker stuck: the watchdog starves.
    for &pid in &workers {
        signal(pid, Signal::SIGSTOP);
    }
    let stopped = Instant::now();
    // Once the supervisor says it starves the watchdog (heartbeats are
    // stale within 2 x 1 s + 0.25 s), nothing feeds it: listen for two
    // more seconds.
    poll(PATIENCE, || {
        f.log_text().contains("watchdog not fed").then_some(())
    })
    .expect("the supervisor stops feeding the watchdog");
    while notify.rx.try_recv().is_ok() {}
    let quiet_from = Instant::now();
    let mut fed = 0;
    while quiet_from.elapsed() < Duration::from_secs(2) {
        if let Ok((_, m)) = notify.rx.recv_timeout(Duration::from_millis(100)) {
            if m == "WATCHDOG=1" {
                fed += 1;
            }
        }
    }
    for &pid in &workers {
        signal(pid, Signal::SIGCONT);
    }
    assert_eq!(
        fed,
        0,
        "watchdog fed while every worker was stopped ({:?} after stop)",
        stopped.elapsed()
    );
    // And it comes back with the workers.
    notify.next(|m| m == "WATCHDOG=1");
}

#[test]
fn socket_activation_serves_on_the_passed_socket_and_binds_nothing() {
    let mut f = Forkd::configure("workers = 2\n");
    let passed = free_port();
    f.socket_activated(&[passed]);
    // systemd-socket-activate starts forkd on the first connection.
    let r = poll(PATIENCE, || get(passed, "/healthz").ok()).expect("served on the passed socket");
    assert_eq!(r.status, 200);
    f.wait_ready();
    assert!(
        f.log_text()
            .contains("adopted the socket passed by systemd"),
        "{}",
        f.log_text()
    );
    // The configured listen address was never bound.
    assert!(port_free(f.port));
    let status = f.status().unwrap();
    assert_eq!(status["listen"], format!("127.0.0.1:{passed}"));
    signal(f.pid(), Signal::SIGTERM);
    assert_eq!(f.wait_exit(PATIENCE), Some(0));
}

#[test]
fn root_drops_to_the_configured_user_before_forking() {
    if !nix::unistd::geteuid().is_root() {
        return skip("not root");
    }
    let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
        return skip("no user 'nobody'");
    };
    let mut f = Forkd::configure("workers = 2\nuser = \"nobody\"\n");
    // The account must be able to reach its runtime and data directories.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(f.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    f.spawn(&[]);
    let workers = f.wait_ready();
    let uid_of = |pid: i32| -> u32 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    for pid in &workers {
        assert_eq!(uid_of(*pid), nobody.uid.as_raw(), "worker {pid}");
    }
    assert_eq!(uid_of(f.pid()), nobody.uid.as_raw(), "supervisor");
    let redis = f.status().unwrap()["redis"]["pid"].as_i64().unwrap() as i32;
    assert_eq!(uid_of(redis), nobody.uid.as_raw(), "redis-server");
    assert_eq!(get(f.port, "/healthz").unwrap().status, 200);
    poll(PATIENCE, || {
        (get(f.port, "/readyz").ok()?.status == 200).then_some(())
    })
    .expect("the managed redis-server works as nobody");
    assert!(f.log_text().contains("dropped privileges to user 'nobody'"));
    signal(f.pid(), Signal::SIGTERM);
    assert_eq!(f.wait_exit(PATIENCE), Some(0));
    assert!(
        !f.dir.path().join("run/forkd.pid").exists(),
        "cleaned up as nobody"
    );
}

/// bin/package ships `config/forkd.toml` as committed, never the working
/// copy: the README has the user edit that file (bin/run reads it), and a
/// package built afterwards must not carry the edits (a gateway tutorial's
/// test routes) as `/etc/forkd/forkd.toml`. Run in a repository of its
/// own holding this tree's bin/package and what it reads, whose
/// `config/forkd.toml` is then edited, so this tree is never touched; the
/// README's install by hand is held to the same.
#[test]
fn the_package_ships_the_committed_config_not_an_edited_working_copy() {
    use std::path::Path;
    use std::process::{Command, Output, Stdio};
    let missing: Vec<&str> = ["git", "dpkg-deb", "dpkg-shlibdeps", "strip", "gzip", "tar"]
        .into_iter()
        .filter(|tool| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .unwrap()
                .success()
        })
        .collect();
    if !missing.is_empty() {
        return skip(&format!("bin/package needs {missing:?}"));
    }
    let run = |dir: &Path, cmd: &str, args: &[&str]| -> Output {
        let out = Command::new(cmd)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    std::fs::create_dir_all(repo.join("bin")).unwrap();
    std::fs::create_dir_all(repo.join("config")).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (from, to) in [
        ("bin/package", "bin/"),
        ("bin/setup.sh", "bin/"),
        ("Cargo.toml", ""),
        ("config/forkd.toml", "config/"),
        ("pkg", ""),
        ("systemd", ""),
    ] {
        let (from, to) = (src.join(from), repo.join(to));
        run(
            tmp.path(),
            "cp",
            &["-a", from.to_str().unwrap(), to.to_str().unwrap()],
        );
    }
    let git = |args: &[&str]| {
        let mut a = vec![
            "-c",
            "user.name=forkd test",
            "-c",
            "user.email=forkd@example.org",
            "-c",
            "commit.gpgsign=false",
        ];
        a.extend_from_slice(args);
        run(&repo, "git", &a)
    };
    git(&["init", "-q"]);
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "the default configuration"]);
    let pristine = std::fs::read_to_string(repo.join("config/forkd.toml")).unwrap();
    let marker = "# a test route the README had me add: forkd-package-test";
    std::fs::write(
        repo.join("config/forkd.toml"),
        format!("{pristine}\n{marker}\n[[route]]\nprefix = \"/mine/\"\nupstream = \"http://127.0.0.1:9\"\n"),
    )
    .unwrap();

    // The conffile of the package built from `repo`, and what bin/package
    // said on stderr.
    let package = |out: &str| -> (String, String) {
        let out_dir = tmp.path().join(out);
        let script = repo.join("bin/package");
        let built = run(
            &repo,
            script.to_str().unwrap(),
            &["--binary", BIN, "--out", out_dir.to_str().unwrap()],
        );
        let stdout = String::from_utf8_lossy(&built.stdout).into_owned();
        let deb = stdout.lines().last().expect("bin/package prints the .deb");
        let conffile = run(
            &repo,
            "sh",
            &[
                "-c",
                "dpkg-deb --fsys-tarfile \"$1\" | tar -xOf - ./etc/forkd/forkd.toml",
                "sh",
                deb,
            ],
        );
        (
            String::from_utf8_lossy(&conffile.stdout).into_owned(),
            String::from_utf8_lossy(&built.stderr).into_owned(),
        )
    };
    // The README's install by hand: its line that installs the config,
    // run in `repo` with another destination.
    let readme = std::fs::read_to_string(src.join("docs/systemd.md")).unwrap();
    let line = readme
        .lines()
        .find(|l| l.contains("config/forkd.toml") && l.ends_with(" /etc/forkd/forkd.toml"))
        .expect("docs/systemd.md installs config/forkd.toml as /etc/forkd/forkd.toml");
    let by_hand = |dest: &str| -> String {
        let dest = tmp.path().join(dest);
        let line = line.replace("/etc/forkd/forkd.toml", dest.to_str().unwrap());
        run(&repo, "bash", &["-c", &line]);
        std::fs::read_to_string(dest).unwrap()
    };

    let (shipped, said) = package("deb");
    assert!(
        !shipped.contains(marker),
        "the edited working copy was shipped"
    );
    assert_eq!(
        shipped, pristine,
        "the committed config/forkd.toml is shipped"
    );
    assert!(said.contains("local changes"), "{said}");
    assert_eq!(by_hand("etc/forkd.toml"), pristine, "README: {line}");

    // A tree without git (a tarball): the file as it is, which is all
    // there is.
    std::fs::remove_dir_all(repo.join(".git")).unwrap();
    let (shipped, _) = package("deb-no-git");
    assert!(shipped.contains(marker), "{shipped}");
    assert!(
        by_hand("etc-no-git/forkd.toml").contains(marker),
        "README: {line}"
    );
}
