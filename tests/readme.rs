//! The docs' examples, run as written. README.md's tour, with the examples
//! of docs/operations.md, docs/api.md and docs/cli.md: their `sh` blocks, in order, in one
//! bash session (`set -euo pipefail`), in a directory laid out like the
//! repository (`config/forkd.toml`, a copy of the shipped one), against a
//! forkd started as `bin/run` starts it. Only what a machine cannot share
//! is replaced: the ports (8080, 9000), the binary's path (and `forkd` is
//! the built one, first on the PATH), and the runtime and data
//! directories (given through their `FORKD_*` variables). What the README says the commands print is checked. And
//! docs/https.md's example on its own. (docs/gateway.md's nginx example
//! runs in tests/nginx.rs, docs/systemd.md's blocks in the systemd
//! checks (bin/systemd-test), docs/cluster.md's bin/cluster in tests/cluster.rs, and
//! docs/performance.md's bin/bench --quick in bin/test.)

mod common;

use std::process::{Command, Stdio};

use common::*;

/// The `sh` blocks of `page` (a path in the repository).
fn sh_blocks(page: &str) -> Vec<String> {
    let path = format!("{}/{page}", env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
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
    blocks
}

/// The README's `sh` blocks, but the first (`bin/run`, `bin/test`), with
/// the examples of docs/operations.md, docs/api.md and docs/cli.md run
/// against the same forkd before the last (which stops it).
fn tour() -> Vec<String> {
    let mut blocks = sh_blocks("README.md");
    assert!(
        blocks.first().is_some_and(|b| b.starts_with("bin/run")),
        "the README starts with bin/run: {blocks:?}"
    );
    blocks.remove(0);
    let last = blocks.pop().expect("the CLI block");
    blocks.extend(sh_blocks("docs/operations.md"));
    let users = sh_blocks("docs/api.md");
    assert_eq!(users.len(), 1, "docs/api.md has one sh block, the users'");
    blocks.extend(users);
    let signals = sh_blocks("docs/cli.md");
    assert_eq!(signals.len(), 1, "docs/cli.md has one sh block, the signal");
    // Its pidfile is where this test's runtime directory is.
    blocks.push(signals[0].replace("/run/forkd/", "$FORKD_RUNTIME_DIR/"));
    blocks.push(last);
    blocks
}

/// PATH with the built forkd's directory first.
fn path_with_forkd() -> String {
    let dir = std::path::Path::new(BIN).parent().expect("BIN is a path");
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
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
            // The docs' `forkd` is the one installed on the PATH.
            .env("PATH", path_with_forkd())
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
    said("docs/operations.md, /readyz", "\n200\n");
    said("docs/api.md, user add", "user 'bob' added (role admin)");
    said("docs/api.md, user passwd", "password of 'bob' changed");
    said("docs/api.md, user list", "Bob Example");
    said("docs/api.md, user del", "user 'bob' deleted");
    said(
        "docs/operations.md, a request id of the client's",
        "\"request_id\":\"my-trace-1\"",
    );
}

/// docs/https.md's example: a certificate made with openssl, forkd started
/// with it through the environment (as `bin/run` would be), curl over
/// HTTP/2 and HTTP/1.1, and the certificate in `forkd status`.
#[test]
fn the_https_example_runs_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/forkd.toml")).unwrap();
    let config = shipped.replace(
        "listen = \"127.0.0.1:8080\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    std::fs::write(dir.path().join("config/forkd.toml"), config).unwrap();
    // Its blocks, one after the other: the first starts forkd.
    let example = sh_blocks("docs/https.md").concat();
    let run = example
        .lines()
        .find(|l| l.ends_with(" bin/run"))
        .expect("a line that ends with bin/run");
    // bin/run is `forkd start` in the foreground; here in the background,
    // until it answers.
    let started = run.replace(" bin/run", &format!(" {BIN} start >forkd.out 2>&1 &"));
    let wait = format!(
        "for i in $(seq 200); do curl -sf --cacert \"$tls/cert.pem\" \
         https://127.0.0.1:{port}/readyz >/dev/null && break; sleep 0.1; done\n"
    );
    let script = format!(
        "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n{}\necho '=== done'\n",
        example
            .replace(run, &format!("{started}\n{wait}"))
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
            .replace("target/release/forkd", BIN)
    );
    let out = Command::new("setsid")
        .args(["bash", "-c", &script])
        .current_dir(dir.path())
        .env("FORKD_RUNTIME_DIR", dir.path().join("run"))
        .env("FORKD_REDIS_DATA_DIR", dir.path().join("data"))
        // The example's `mktemp -d` goes into the test's directory.
        .env("TMPDIR", dir.path())
        .env_remove("FORKD_CONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("=== done"),
        "{text}\n{err}"
    );
    assert!(text.contains("HTTP/2 200"), "{text}");
    assert!(text.contains("1.1\n"), "{text}");
    assert!(text.contains("certificate "), "{text}");
}
