//! Binary upgrades under load: the supervisor re-executes the binary on
//! disk in place; the listening socket never closes.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::*;

/// A copy of the built binary at `dir/forkd`, to be replaced on disk.
fn install(dir: &Path) -> PathBuf {
    let path = dir.join("forkd");
    std::fs::copy(BIN, &path).unwrap();
    path
}

/// Replaces `path` atomically (rename over it), as a package manager does.
fn replace(path: &Path, content: &[u8], executable: bool) {
    let tmp = path.with_extension("new");
    let mut f = std::fs::File::create(&tmp).unwrap();
    f.write_all(content).unwrap();
    drop(f);
    if executable {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::rename(&tmp, path).unwrap();
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

#[test]
fn upgrade_under_load_replaces_every_worker_with_zero_failures() {
    let mut f = Forkd::configure("workers = 2\nshutdown_timeout = 5\n");
    let exe = install(f.dir.path());
    f.exe = Some(exe.clone());
    f.spawn(&[]);
    let before: HashSet<i32> = f.wait_ready().into_iter().collect();
    let supervisor = f.pid();
    let old_build = f.status().unwrap()["build"].as_str().unwrap().to_owned();
    assert_eq!(builds(&f), HashSet::from([old_build.clone()]));

    let load = Load::start(f.port, 4, "/healthz");
    poll(PATIENCE, || {
        (f.status()?["workers"][1]["requests"].as_u64()? > 20).then_some(())
    })
    .expect("load reaches the workers");

    // A new binary on disk: the same program with other bytes at its end.
    let mut bytes = std::fs::read(BIN).unwrap();
    bytes.extend_from_slice(b"\0forkd upgrade test build\0");
    replace(&exe, &bytes, true);
    let out = f.cli(&["upgrade"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
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

    // The managed redis-server was handed over, not restarted.
    assert!(status["redis"]["pid"].as_i64().is_some());
    signal(f.pid(), nix::sys::signal::Signal::SIGTERM);
    assert_eq!(f.wait_exit(PATIENCE), Some(0));
    assert!(port_free(f.port));
}

#[cfg(feature = "failpoints")]
#[test]
fn upgrade_to_a_binary_whose_workers_fail_is_rolled_back_with_zero_failures() {
    let mut f = Forkd::configure("workers = 2\nshutdown_timeout = 5\nstartup_timeout = 5\n");
    let exe = install(f.dir.path());
    f.exe = Some(exe.clone());
    f.spawn(&[]);
    let before = f.wait_ready();
    let supervisor = f.pid();
    let old_build = f.status().unwrap()["build"].as_str().unwrap().to_owned();
    let load = Load::start(f.port, 4, "/healthz");
    poll(PATIENCE, || {
        (f.status()?["workers"][1]["requests"].as_u64()? > 20).then_some(())
    })
    .expect("load reaches the workers");

    // The "new binary" starts, but none of its workers can.
    let real = f.dir.path().join("forkd-broken");
    std::fs::copy(BIN, &real).unwrap();
    let script = format!(
        "#!/bin/sh\nFORKD_FAILPOINTS=worker-start exec {} \"$@\"\n",
        real.display()
    );
    replace(&exe, script.as_bytes(), true);
    let out = f.cli(&["upgrade"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("rolled back") && err.contains(&old_build),
        "{err}"
    );

    assert_eq!(f.wait_ready(), before, "the old workers kept serving");
    let result = load.finish();
    assert_eq!(result.failed, 0, "{:?}", result.errors);
    assert_eq!(f.pid(), supervisor);
    let status = f.status().unwrap();
    assert_eq!(
        status["build"],
        old_build.as_str(),
        "back on the previous build"
    );
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
    let out = f.cli(&["upgrade"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("upgrade failed"));
    assert_eq!(f.wait_ready(), before);
    assert_eq!(get(f.port, "/healthz").unwrap().status, 200);
}
