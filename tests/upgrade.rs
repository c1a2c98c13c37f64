//! Binary upgrades under load: the supervisor probes the binary on disk,
//! then re-executes it in place; the listening socket never closes. A
//! binary that is not a working forkd is refused or rolled back, and the
//! old workers keep serving.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use common::*;

/// A copy of the built binary at `dir/forkd`, to be replaced on disk.
fn install(dir: &Path) -> PathBuf {
    let path = dir.join("forkd");
    install_copy(Path::new(BIN), &path, 0o755);
    path
}

/// The built program with other bytes at its end: another build.
fn other_build(tag: &str) -> Vec<u8> {
    let mut bytes = std::fs::read(BIN).unwrap();
    bytes.extend_from_slice(format!("\0forkd upgrade test build {tag}\0").as_bytes());
    bytes
}

fn builds(f: &Forkd) -> HashSet<String> {
    let mut seen = HashSet::new();
    for _ in 0..40 {
        if let Ok(r) = get(f.port, "/healthz") {
            seen.insert(r.json()["build"].as_str().unwrap_or("").to_owned());
        }
    }
    seen
}

fn build_of(f: &Forkd) -> String {
    f.status().unwrap()["build"].as_str().unwrap().to_owned()
}

/// Starts forkd from a replaceable copy of the binary, with load running
/// on both kinds of connection.
fn start_loaded(extra: &str) -> (Forkd, PathBuf, Load) {
    let mut f = Forkd::configure(extra);
    let exe = install(f.dir.path());
    f.exe = Some(exe.clone());
    f.spawn(&[]);
    f.wait_ready();
    let load = Load::start(f.port, 4, "/healthz");
    wait_served(&f, 20);
    (f, exe, load)
}

/// Runs `forkd upgrade` with the CLI of the build under test (the binary
/// on disk may be broken) and returns (exit code, stdout, stderr).
fn upgrade(f: &Forkd) -> (Option<i32>, String, String) {
    let out = f.cli(&["upgrade"]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A "new binary": a script that runs a copy of the built forkd (in `dir`)
/// with the failpoint `name` set.
#[cfg(feature = "failpoints")]
fn failpoint_build(dir: &Path, name: &str) -> Vec<u8> {
    let real = dir.join(format!("forkd-{name}"));
    install_copy(Path::new(BIN), &real, 0o755);
    format!(
        "#!/bin/sh\nFORKD_FAILPOINTS={name} exec {} \"$@\"\n",
        real.display()
    )
    .into_bytes()
}

/// `forkd upgrade` on a thread of its own, for a test that acts while it
/// waits.
fn upgrade_in_background(f: &Forkd) -> std::thread::JoinHandle<std::process::Output> {
    let (config, dir) = (f.config.clone(), f.dir.path().join("data"));
    std::thread::spawn(move || {
        std::process::Command::new(BIN)
            .arg("--config")
            .arg(config)
            .arg("upgrade")
            .env("FORKD_REDIS_DATA_DIR", dir)
            .output()
            .unwrap()
    })
}

#[test]
fn upgrade_under_load_replaces_every_worker_with_zero_failures() {
    let (f, exe, load) = start_loaded("workers = 2\nshutdown_timeout = 5\n");
    let before: HashSet<i32> = f.wait_ready().into_iter().collect();
    let supervisor = f.pid();
    let old_build = build_of(&f);
    assert_eq!(builds(&f), HashSet::from([old_build.clone()]));

    install_executable(&exe, &other_build("a"), 0o755);
    let (code, text, err) = upgrade(&f);
    assert_eq!(code, Some(0), "{text} {err}");
    assert!(text.contains("2 worker(s) replaced"), "{text}");

    let after: HashSet<i32> = f.wait_ready().into_iter().collect();
    wait_served(&f, 50);
    let result = load.finish();

    assert!(
        before.is_disjoint(&after),
        "every worker pid changed: {before:?} -> {after:?}"
    );
    assert_eq!(f.pid(), supervisor);
    assert!(alive(supervisor), "the supervisor kept its pid");
    let status = f.status().unwrap();
    assert_eq!(status["pid"], supervisor);
    let new_build = status["build"].as_str().unwrap().to_owned();
    assert_ne!(new_build, old_build);
    assert!(
        text.contains(&old_build) && text.contains(&new_build),
        "{text}"
    );
    assert_eq!(
        builds(&f),
        HashSet::from([new_build]),
        "the new workers report the new build"
    );
    assert_eq!(result.failed, 0, "{:?}", result.errors);
    eprintln!("upgrade under load: {} requests, 0 failed", result.ok);
    // The probe ran before the point of no return.
    assert!(
        f.log_text().contains("answered the probe"),
        "{}",
        f.log_text()
    );

    // The managed redis-server was handed over, not restarted.
    assert!(status["redis"]["pid"].as_i64().is_some());
    // No upgrade state reaches the new workers, nor what the new image
    // starts (its environment was scrubbed): redis-server is restarted
    // here to show it.
    for w in status["workers"].as_array().unwrap() {
        let env = std::fs::read(format!("/proc/{}/environ", w["pid"])).unwrap();
        assert!(
            !String::from_utf8_lossy(&env).contains("FORKD_UPGRADE"),
            "worker {} sees upgrade state",
            w["pid"]
        );
    }
    let redis = status["redis"]["pid"].as_i64().unwrap() as i32;
    signal(redis, nix::sys::signal::Signal::SIGKILL);
    let restarted = poll(PATIENCE, || {
        let pid = f.status()?["redis"]["pid"].as_i64()? as i32;
        (pid != redis).then_some(pid)
    })
    .expect("redis-server is restarted");
    let env = std::fs::read(format!("/proc/{restarted}/environ")).unwrap();
    assert!(
        !String::from_utf8_lossy(&env).contains("FORKD_UPGRADE"),
        "redis-server inherited upgrade state"
    );
    let mut f = f;
    signal(f.pid(), nix::sys::signal::Signal::SIGTERM);
    assert_eq!(f.wait_exit(PATIENCE), Some(0));
    assert!(port_free(f.port));
}

/// Every kind of broken binary on disk, one after the other under one load:
/// each is refused (or, once executed, rolled back) with the same
/// supervisor, the same workers and zero failed requests; then two good
/// upgrades in a row still succeed, from the path on disk.
#[cfg(feature = "failpoints")]
#[test]
fn broken_binaries_on_disk_are_refused_and_good_ones_still_upgrade() {
    // startup_timeout bounds the probe: the sleeping script is cut off.
    let (f, exe, load) = start_loaded("workers = 2\nshutdown_timeout = 5\nstartup_timeout = 5\n");
    let supervisor = f.pid();
    let workers = f.wait_ready();
    let old_build = build_of(&f);

    let forkd = std::fs::read(BIN).unwrap();
    let rejecting = failpoint_build(f.dir.path(), "handover");
    let cases: Vec<(&str, Vec<u8>, u32, &str)> = vec![
        (
            "a script that exits 1",
            b"#!/bin/sh\nexit 1\n".to_vec(),
            0o755,
            "exited with status 1",
        ),
        (
            "a script that sleeps, then exits",
            b"#!/bin/sh\nsleep 60\nexit 0\n".to_vec(),
            0o755,
            "did not answer the upgrade probe within 5000 ms",
        ),
        (
            "an empty file",
            Vec::new(),
            0o755,
            "without answering the upgrade probe",
        ),
        (
            "a truncated forkd",
            forkd[..64 * 1024].to_vec(),
            0o755,
            "the new binary",
        ),
        (
            "forkd without the execute bit",
            forkd.clone(),
            0o644,
            "Permission denied",
        ),
        (
            "a script that prints garbage",
            b"#!/bin/sh\necho '{\"forkd_probe\": \"yes\"}'\necho hello\n".to_vec(),
            0o755,
            "without answering the upgrade probe",
        ),
        (
            "a script that prints a lot, then exits 1",
            b"#!/bin/sh\nhead -c 300000 /dev/zero | tr '\\0' x\nexit 1\n".to_vec(),
            0o755,
            "exited with status 1",
        ),
        (
            "a forkd that rejects the handover",
            rejecting,
            0o755,
            "failpoint handover",
        ),
    ];
    for (what, content, mode, cause) in cases {
        install_executable(&exe, &content, mode);
        let (code, out, err) = upgrade(&f);
        assert_eq!(code, Some(1), "{what}: {out} {err}");
        assert!(
            err.contains("upgrade failed") && err.contains(cause),
            "{what}: the message names the cause ({cause}): {err}"
        );
        assert!(err.contains(&old_build), "{what}: {err}");
        assert_eq!(f.pid(), supervisor, "{what}");
        assert!(alive(supervisor), "{what}");
        assert_eq!(f.wait_ready(), workers, "{what}: the same workers serve");
        assert_eq!(build_of(&f), old_build, "{what}");
        eprintln!("{what}: refused: {}", err.trim());
    }
    assert!(f.log_text().contains("rolled back"), "{}", f.log_text());

    // Two good upgrades in a row, after a rollback whose image runs from a
    // deleted file: the binary is still found at the path on disk.
    let mut seen = vec![old_build];
    for tag in ["b", "c"] {
        install_executable(&exe, &other_build(tag), 0o755);
        let (code, out, err) = upgrade(&f);
        assert_eq!(code, Some(0), "good upgrade {tag}: {out} {err}");
        assert!(out.contains("2 worker(s) replaced"), "{out}");
        f.wait_ready();
        let build = build_of(&f);
        assert!(!seen.contains(&build), "{build} is new: {seen:?}");
        seen.push(build);
        assert_eq!(f.pid(), supervisor);
    }
    wait_served(&f, 50);
    let result = load.finish();
    assert_eq!(result.failed, 0, "{:?}", result.errors);
    eprintln!(
        "8 refused and 2 good upgrades under load: {} requests, 0 failed",
        result.ok
    );
    // The probes left nothing behind (the sleeping script's child too).
    let leftovers: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.split_whitespace().nth(3) == Some(&supervisor.to_string()))
        })
        .filter_map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains("sleep").then_some(cmd)
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[cfg(feature = "failpoints")]
#[test]
fn upgrade_to_a_binary_whose_workers_fail_is_rolled_back_with_zero_failures() {
    let (f, exe, load) = start_loaded("workers = 2\nshutdown_timeout = 5\nstartup_timeout = 5\n");
    let before = f.wait_ready();
    let supervisor = f.pid();
    let old_build = build_of(&f);

    // The "new binary" starts, but none of its workers can.
    install_executable(&exe, &failpoint_build(f.dir.path(), "worker-start"), 0o755);
    let (code, _, err) = upgrade(&f);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("rolled back") && err.contains(&old_build),
        "{err}"
    );

    assert_eq!(f.wait_ready(), before, "the old workers kept serving");
    let result = load.finish();
    assert_eq!(result.failed, 0, "{:?}", result.errors);
    assert_eq!(f.pid(), supervisor);
    assert_eq!(build_of(&f), old_build, "back on the previous build");
    assert!(f.log_text().contains("failpoint worker-start"));

    // The rolled-back supervisor is whole: it still respawns workers (with
    // the previous binary and environment) and stops cleanly.
    signal(before[0], nix::sys::signal::Signal::SIGKILL);
    let replaced = poll(PATIENCE, || {
        let w = f.wait_ready();
        (!w.contains(&before[0])).then_some(w)
    })
    .expect("a killed worker is replaced after the rollback");
    assert_eq!(replaced.len(), 2);
    assert_eq!(builds(&f), HashSet::from([old_build]));
    let mut f = f;
    signal(f.pid(), nix::sys::signal::Signal::SIGTERM);
    assert_eq!(f.wait_exit(PATIENCE), Some(0));
}

#[test]
fn upgrade_to_a_missing_binary_fails_plainly_and_changes_nothing() {
    let mut f = Forkd::configure("workers = 1\n");
    let exe = install(f.dir.path());
    f.exe = Some(exe.clone());
    f.spawn(&[]);
    let before = f.wait_ready();
    std::fs::remove_file(&exe).unwrap();
    let (code, _, err) = upgrade(&f);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("upgrade failed") && err.contains("No such file"),
        "{err}"
    );
    assert_eq!(f.wait_ready(), before);
    assert_eq!(get(f.port, "/healthz").unwrap().status, 200);
}

/// A binary whose configuration check fails (here: the config file it
/// would read has become invalid) is refused by the probe, before the exec.
#[test]
fn upgrade_refuses_a_configuration_the_new_binary_rejects() {
    let (f, exe, load) = start_loaded("workers = 2\n");
    let workers = f.wait_ready();
    install_executable(&exe, &other_build("d"), 0o755);
    let good = std::fs::read_to_string(&f.config).unwrap();
    std::fs::write(&f.config, format!("{good}\nno_such_key = 1\n")).unwrap();
    let (code, _, err) = upgrade(&f);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no_such_key"), "{err}");
    assert_eq!(f.wait_ready(), workers);
    std::fs::write(&f.config, good).unwrap();
    let (code, out, err) = upgrade(&f);
    assert_eq!(code, Some(0), "{out} {err}");
    f.wait_ready();
    let result = load.finish();
    assert_eq!(result.failed, 0, "{:?}", result.errors);
}

/// While a probe runs, a reload or a second upgrade is refused with a
/// plain answer, not left waiting; a stop cuts the probe short.
#[test]
fn requests_during_a_probe_get_a_plain_answer() {
    let mut f = Forkd::configure("workers = 1\nstartup_timeout = 60\n");
    let exe = install(f.dir.path());
    f.exe = Some(exe.clone());
    f.spawn(&[]);
    let workers = f.wait_ready();
    install_executable(&exe, b"#!/bin/sh\nsleep 120\n", 0o755);
    let first = upgrade_in_background(&f);
    poll(PATIENCE, || {
        f.log_text().contains("upgrade: probing").then_some(())
    })
    .expect("the probe runs");
    let out = f.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("an upgrade is in progress"), "{err}");
    let (code, _, err) = upgrade(&f);
    assert_eq!(code, Some(1));
    assert!(err.contains("in progress"), "{err}");
    assert_eq!(f.wait_ready(), workers);
    // A stop ends the probe (and what it started) and the upgrade's wait.
    let out = f.cli(&["stop"]);
    assert!(out.status.success());
    let first = first.join().unwrap();
    assert_eq!(first.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&first.stderr).contains("forkd is stopping"),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(f.wait_exit(PATIENCE), Some(0));
}

/// A stop while the new image replaces the workers: the supervisor stops
/// (drains and exits), it does not go back to the previous binary, and
/// the waiting `forkd upgrade` hears why.
#[cfg(feature = "failpoints")]
#[test]
fn a_stop_during_the_replacement_stops_and_does_not_roll_back() {
    let mut f = Forkd::configure("workers = 2\nshutdown_timeout = 5\nstartup_timeout = 60\n");
    let exe = install(f.dir.path());
    f.exe = Some(exe.clone());
    f.spawn(&[]);
    let old = f.wait_ready();
    let old_build = build_of(&f);
    // The new image's workers never become ready.
    install_executable(&exe, &failpoint_build(f.dir.path(), "worker-hang"), 0o755);
    let waiting = upgrade_in_background(&f);
    poll(PATIENCE, || {
        f.log_text().contains("failpoint worker-hang").then_some(())
    })
    .expect("the new image starts replacing the workers");
    signal(f.pid(), nix::sys::signal::Signal::SIGTERM);
    assert_eq!(f.wait_exit(PATIENCE), Some(0), "{}", f.log_text());
    let out = waiting.join().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("forkd is stopping"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = f.log_text();
    assert!(!log.contains("rolled back"), "{log}");
    assert!(
        !log.contains(&format!("going back to build {old_build}")),
        "{log}"
    );
    for pid in old {
        assert!(
            log.contains(&format!("pid {pid} exited with status 0")),
            "old worker {pid} drained: {log}"
        );
    }
    assert!(port_free(f.port));
}
