//! Test harness: runs the built `forkd` binary in a temporary directory on a
//! free loopback port and speaks plain HTTP/1.1 to it over std sockets.
//! Never forks: processes are started with `Command` and ended by pid.
//!
//! - this file: ports, polling, processes, files;
//! - `forkd`: one forkd instance under test;
//! - `http`: the HTTP client and the API calls;
//! - `load`: a background request loop;
//! - `pki`: a test CA, HTTPS forkd instances and curl;
//! - `redis`: a redis-server or Redis Cluster of the test's own;
//! - `upstream`: an HTTP service for the proxy tests, on threads.
//!
//! Every test binary uses a part of this, so unused items are allowed.
#![allow(dead_code, unused_imports)]

mod forkd;
mod http;
mod load;
mod pki;
mod redis;
mod upstream;

pub use forkd::*;
pub use http::*;
pub use load::*;
pub use pki::*;
pub use redis::*;
pub use upstream::*;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_forkd");

/// A generous deadline for things that normally take milliseconds, so tests
/// hold on a loaded 2-core machine.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `n` distinct ports that were free a moment ago.
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A test that cannot run here says why; under `CI=true` that is a
/// failure, never a silent pass.
pub fn skip(why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("cannot run under CI=true: {why}");
    }
    eprintln!("skipped: {why}");
}

/// Polls `f` every 20 ms until it returns Some or `limit` passes.
pub fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn alive(pid: i32) -> bool {
    // A zombie still answers kill(0); look at its state too.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Sum of user and system CPU ticks of `pid`.
pub fn cpu_ticks(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest: Vec<&str> = s
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // Fields after the command: state is index 0, utime 11, stime 12.
    let f = |i: usize| rest.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    f(11) + f(12)
}

pub fn signal(pid: i32, sig: Signal) {
    kill(Pid::from_raw(pid), sig).unwrap();
}

/// Puts `content` at `path` with `mode`, replacing it atomically (rename
/// over it), as a package manager does. The bytes are written by a `cp`
/// child, never by this process: a file this process holds open for
/// writing can be inherited for an instant by any child another test thread
/// forks, and executing it then fails with ETXTBSY ("Text file busy").
pub fn install_executable(path: &Path, content: &[u8], mode: u32) {
    let scratch = path.with_extension("src");
    std::fs::write(&scratch, content).unwrap();
    install_copy(&scratch, path, mode);
    std::fs::remove_file(&scratch).unwrap();
}

/// Copies `from` to `path` with `mode` (atomically, by a `cp` child; see
/// `install_executable`).
pub fn install_copy(from: &Path, path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("new");
    let out = Command::new("cp")
        .arg(from)
        .arg(&tmp)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cp: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Whether `port` on loopback can be bound (nothing holds it).
pub fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

pub fn path_exists(p: &Path) -> bool {
    p.exists()
}

/// Parses an exposition with the `prometheus_client` Python package and
/// returns every sample as "name{label=value,...}" -> value.
pub fn parse_exposition(text: &str) -> std::collections::HashMap<String, f64> {
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the exposition does not parse (bin/test installs prometheus-client): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
