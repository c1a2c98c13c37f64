//! README.md's tour, run as written: its `sh` blocks, in order, in one
//! bash session (`set -euo pipefail`), in a directory laid out like the
//! repository (`config/forkd.toml`, a copy of the shipped one), against a
//! forkd started as `bin/run` starts it. Only what a machine cannot share
//! is replaced: the ports (8080, 9000), the binary's path, and the
//! runtime and data directories (given through their `FORKD_*`
//! variables). What the README says the commands print is checked.

mod common;

use std::process::{Command, Stdio};

use common::*;

/// The README's `sh` blocks, but the first (`bin/run`, `bin/test`).
fn tour() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match (&mut current, line) {
            (None, "```sh") => current = Some(String::new()),
            (Some(b), "```") => {
                blocks.push(std::mem::take(b));
                current = None;
            }
            (Some(b), l) => {
                b.push_str(l);
                b.push('\n');
            }
            _ => {}
        }
    }
    assert!(
        blocks.first().is_some_and(|b| b.starts_with("bin/run")),
        "the README starts with bin/run: {blocks:?}"
    );
    blocks.remove(0);
    blocks
}

#[test]
fn the_readme_tour_runs_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let (port, app) = {
        let p = free_ports(2);
        (p[0], p[1])
    };
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/forkd.toml")).unwrap();
    let listen = "listen = \"127.0.0.1:8080\"";
    assert!(
        shipped.contains(listen),
        "config/forkd.toml listens on 8080"
    );
    let config = shipped.replace(listen, &format!("listen = \"127.0.0.1:{port}\""));
    std::fs::write(dir.path().join("config/forkd.toml"), config).unwrap();
    let env = [
        ("FORKD_RUNTIME_DIR", dir.path().join("run")),
        ("FORKD_REDIS_DATA_DIR", dir.path().join("data")),
    ];
    // What bin/run does: `forkd start` in the foreground, config/forkd.toml.
    let mut server = Command::new(BIN)
        .arg("start")
        .current_dir(dir.path())
        .envs(env.clone())
        .env_remove("FORKD_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let up = poll(PATIENCE, || {
        let r = request(port, "GET", "/readyz", &[], b"").ok()?;
        (r.status == 200).then_some(())
    });

    // The app the tour starts in the background ends with the script.
    let mut script =
        String::from("set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n");
    for (i, block) in tour().iter().enumerate() {
        let block = block
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
            .replace("http.server 9000", &format!("http.server {app}"))
            .replace("127.0.0.1:9000", &format!("127.0.0.1:{app}"))
            .replace("target/release/forkd", BIN);
        script.push_str(&format!("echo '=== block {i}'\n{block}"));
    }
    script.push_str("echo '=== done'\n");
    let out = up.map(|()| {
        Command::new("setsid")
            .args(["bash", "-c", &script])
            .current_dir(dir.path())
            .envs(env.clone())
            .env_remove("FORKD_CONFIG")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    });
    // The tour ends with `forkd stop`; make sure, whatever happened.
    let _ = server.kill();
    let _ = server.wait();
    let out = out.expect("forkd became ready as bin/run starts it");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("=== done"),
        "{text}\n{err}"
    );

    // What the README says each step prints.
    let said = |what: &str, needle: &str| {
        assert!(text.contains(needle), "{what}: no {needle:?} in\n{text}");
    };
    said("/healthz", "HTTP/1.1 200 OK");
    said("/nope", "HTTP/1.1 404 Not Found");
    said("DELETE /healthz", "allow: GET, HEAD");
    said("the first profile read", "x-cache: miss");
    said("the second", "x-cache: hit");
    said(
        "the loop",
        "200\n200\n200\n200\n200\n200\n200\n200\n429\n429\n",
    );
    said("the logout", "HTTP/1.1 204 No Content");
    said("after it", "HTTP/1.1 401 Unauthorized");
    said("the reload after adding a route", "reloaded: generation 2");
    said("the app, logged in", "200\n401\n");
    said("status", "route /app -> http://127.0.0.1:");
    said("top --once", " workers ");
    said("scale", "scaling to 4 worker(s)");
    said("stop", "forkd stopped");
}
