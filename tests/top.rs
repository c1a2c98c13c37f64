//! `forkd top` in a real terminal: tmux (a server of the test's own, on
//! its own socket) runs it; the test sends keys and reads the pane.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use common::*;

/// A tmux server of this test's own; killed when dropped.
struct Tmux {
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmux {
    fn new() -> Option<Tmux> {
        if Command::new("tmux").arg("-V").output().is_err() {
            skip("tmux is missing");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        Some(Tmux {
            socket: dir.path().join("tmux.sock"),
            _dir: dir,
        })
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("tmux runs")
    }

    /// What the pane shows now ("" once it is gone).
    fn pane(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }

    /// Polls the pane until `f` holds of it; panics with the pane after
    /// the test's patience.
    fn until(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        poll(PATIENCE, || {
            last = self.pane();
            f(&last).then(|| last.clone())
        })
        .unwrap_or_else(|| panic!("the pane never showed {what}:\n{last}"))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

#[test]
fn top_shows_the_workers_and_reloads_and_scales_from_the_keyboard() {
    let Some(tmux) = Tmux::new() else {
        return;
    };
    let f = Forkd::start("workers = 2\n");
    let pids: Vec<i32> = f.wait_workers(Some(2));
    let command = format!("{BIN} --config {} top", f.config.display());
    let out = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "160",
        "-y",
        "50",
        &command,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Both workers, the listener and the keys (polled as one: a capture
    // may catch a frame half drawn).
    tmux.until("both workers, the listener and the keys", |p| {
        pids.iter().all(|pid| p.contains(&format!(" {pid} ")))
            && p.contains("REQ/S")
            && p.contains("listening on http://127.0.0.1:")
            && p.contains("q quit  r reload  +/- scale (2 worker(s) wanted)")
    });
    // Requests show as a rate, /metrics was read (p50 is computed), and
    // a worker's row shows its own p50 and p99 (from `forkd status`).
    // Requests go on until a frame shows them: a quantile covers the last
    // second only.
    let mut last = String::new();
    poll(PATIENCE, || {
        for _ in 0..20 {
            assert_eq!(f.get("/healthz").unwrap().status, 200);
        }
        last = tmux.pane();
        let worker_latency = last.lines().any(|l| {
            pids.iter().any(|pid| l.contains(&format!(" {pid} ")))
                && l.matches('≤').count() == 2
                && l.contains("ms ")
        });
        (last.contains("p50 ≤") && last.contains("requests/s:") && worker_latency).then_some(())
    })
    .unwrap_or_else(|| panic!("the pane never showed the latencies:\n{last}"));
    // Redis' round trip as each worker sees it (the near cache's check).
    tmux.until("Redis' round trip", |p| {
        p.contains("; ping ") && p.contains(" ms")
    });

    // `+` scales to three workers.
    tmux.run(&["send-keys", "-t", "top", "+"]);
    tmux.until("three workers wanted", |p| {
        p.contains("(3 worker(s) wanted)")
    });
    assert_eq!(f.wait_workers(Some(3)).len(), 3);
    // `r` reloads, which goes back to the config's two, and says so.
    tmux.run(&["send-keys", "-t", "top", "r"]);
    tmux.until("the reload's answer", |p| {
        p.contains("reloaded: generation 2, workers 3 -> 2 (the config's)")
    });
    assert_eq!(f.wait_workers(Some(2)).len(), 2);
    // `q` quits: the pane's program ends and the session with it.
    tmux.run(&["send-keys", "-t", "top", "q"]);
    poll(PATIENCE, || {
        (!tmux.run(&["has-session", "-t", "top"]).status.success()).then_some(())
    })
    .expect("top quit on q");

    // Without a terminal, it says what to use instead.
    let out = f.cli(&["top"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("forkd top --once"),
        "{out:?}"
    );
    // `--once` prints one frame, for scripts.
    let out = f.cli(&["top", "--once"]);
    let frame = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && frame.contains(" workers "),
        "{out:?}"
    );
}
