//! Test harness: runs the built `forkd` binary in a temporary directory on a
//! free loopback port and speaks plain HTTP/1.1 to it over std sockets.
//! Never forks: processes are started with `Command` and ended by pid.
#![allow(dead_code)]

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

/// A free port whose cluster bus port (port + 10000) is valid and free too.
pub fn free_cluster_port() -> u16 {
    for _ in 0..1000 {
        let p = free_port();
        if p < 55_000 && TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
    panic!("no free port pair for a cluster node");
}

/// `n` distinct cluster node ports (none another's bus port).
pub fn cluster_ports(n: usize) -> Vec<u16> {
    let mut ports: Vec<u16> = Vec::new();
    while ports.len() < n {
        let p = free_cluster_port();
        if !ports.iter().any(|&q| q == p || q.abs_diff(p) == 10_000) {
            ports.push(p);
        }
    }
    ports
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

/// One forkd instance under test.
pub struct Forkd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    seen_pids: Mutex<HashSet<i32>>,
    /// Set for every forkd process this test runs.
    pub env: Vec<(String, String)>,
    /// The binary `spawn` starts (default: the one cargo built).
    pub exe: Option<PathBuf>,
}

impl Forkd {
    /// Writes a config (listen on a free port, runtime dir in a temp dir,
    /// plus `extra`) without starting anything.
    pub fn configure(extra: &str) -> Forkd {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("forkd.toml");
        let text = format!(
            "listen = \"127.0.0.1:{port}\"\nruntime_dir = \"{}\"\n{extra}\n",
            dir.path().join("run").display()
        );
        std::fs::write(&config, text).unwrap();
        let log = dir.path().join("forkd.log");
        Forkd {
            dir,
            port,
            config,
            log,
            child: None,
            seen_pids: Mutex::new(HashSet::new()),
            env: Vec::new(),
            exe: None,
        }
    }

    /// Starts forkd against `redis` with `extra` config.
    pub fn start_with_redis(redis: &impl Backend, extra: &str) -> Forkd {
        let mut f = Forkd::configure(extra);
        f.env.push(("FORKD_REDIS_URL".into(), redis.url()));
        f.spawn(&[]);
        f.wait_ready();
        f
    }

    /// Adds a user through the CLI.
    pub fn add_user(&self, name: &str, password: &str) {
        let out = self.cli_input(
            &["user", "add", name, "--password-stdin"],
            Some(&format!("{password}\n")),
        );
        assert!(
            out.status.success(),
            "user add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Changes a user's password through the CLI; returns its output.
    pub fn passwd(&self, name: &str, password: &str) -> Output {
        let out = self.cli_input(
            &["user", "passwd", name, "--password-stdin"],
            Some(&format!("{password}\n")),
        );
        assert!(
            out.status.success(),
            "user passwd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Starts forkd in the foreground with `extra` config and waits until
    /// every worker is ready.
    pub fn start(extra: &str) -> Forkd {
        Self::start_env(extra, &[])
    }

    pub fn start_env(extra: &str, env: &[(&str, &str)]) -> Forkd {
        let mut f = Forkd::configure(extra);
        f.spawn(env);
        f.wait_ready();
        f
    }

    /// Starts the supervisor without waiting.
    pub fn spawn(&mut self, env: &[(&str, &str)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(self.exe.as_deref().unwrap_or(Path::new(BIN)));
        cmd.arg("--config")
            .arg(&self.config)
            .arg("start")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .env_remove("RUST_LOG")
            // A managed redis-server (when redis.url is unset) keeps its
            // data in the test's directory.
            .env("FORKD_REDIS_DATA_DIR", self.dir.path().join("data"))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap());
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("started").id() as i32
    }

    /// Takes over a supervisor process started another way (e.g. through
    /// systemd-socket-activate, which execs into forkd).
    pub fn adopt(&mut self, child: Child) {
        self.child = Some(child);
    }

    /// Runs `forkd --config CONFIG ARGS...`.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_input(args, None)
    }

    /// Runs `forkd --config CONFIG ARGS...` with `input` on stdin.
    pub fn cli_input(&self, args: &[&str], input: Option<&str>) -> Output {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("RUST_LOG")
            .env("FORKD_REDIS_DATA_DIR", self.dir.path().join("data"))
            // `forkd user` talks to Redis itself: on a loaded machine a
            // reply can take longer than the default 1 s. The servers keep
            // their configured timeout, which the outage tests rely on.
            .env("FORKD_REDIS_COMMAND_TIMEOUT", "10")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        if let Some(text) = input {
            // A command that refuses its arguments exits without reading
            // stdin; a broken pipe then is its answer, not the harness's.
            match stdin.write_all(text.as_bytes()) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                other => other.unwrap(),
            }
        }
        drop(stdin);
        child.wait_with_output().unwrap()
    }

    /// `forkd status --json`, or None when it fails.
    pub fn status(&self) -> Option<Value> {
        let out = self.cli(&["status", "--json"]);
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        for w in v["workers"].as_array().into_iter().flatten() {
            self.seen_pids
                .lock()
                .unwrap()
                .insert(w["pid"].as_i64().unwrap() as i32);
        }
        Some(v)
    }

    /// Pids of ready workers, by slot.
    pub fn ready_workers(&self) -> Option<Vec<(usize, i32)>> {
        let s = self.status()?;
        let mut v: Vec<(usize, i32)> = s["workers"]
            .as_array()?
            .iter()
            .filter(|w| w["state"] == "ready")
            .map(|w| {
                (
                    w["slot"].as_u64().unwrap() as usize,
                    w["pid"].as_i64().unwrap() as i32,
                )
            })
            .collect();
        v.sort();
        Some(v)
    }

    /// Waits until every wanted worker is ready and no other process is
    /// around (no draining or starting leftovers); returns their pids.
    pub fn wait_ready(&self) -> Vec<i32> {
        self.wait_workers(None)
    }

    /// As `wait_ready`, for exactly `n` workers.
    pub fn wait_workers(&self, n: Option<usize>) -> Vec<i32> {
        poll(PATIENCE, || {
            let s = self.status()?;
            let wanted = s["workers_wanted"].as_u64()? as usize;
            let workers = s["workers"].as_array()?;
            let ready = workers.iter().filter(|w| w["state"] == "ready").count();
            let settled = ready == wanted && workers.len() == wanted;
            (settled && n.is_none_or(|n| n == wanted)).then(|| {
                workers
                    .iter()
                    .map(|w| w["pid"].as_i64().unwrap() as i32)
                    .collect()
            })
        })
        .unwrap_or_else(|| {
            panic!(
                "forkd did not become ready; status: {:?}\nlog:\n{}",
                self.status(),
                self.log_text()
            )
        })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the supervisor to exit and returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn get(&self, path: &str) -> std::io::Result<Response> {
        get(self.port, path)
    }

    /// Every worker pid this test has seen in a status report.
    pub fn seen_pids(&self) -> Vec<i32> {
        self.seen_pids.lock().unwrap().iter().copied().collect()
    }
}

impl Drop for Forkd {
    fn drop(&mut self) {
        let _ = self.status();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Workers die with the supervisor (PDEATHSIG); make sure, by pid,
        // of those this test started.
        for pid in self.seen_pids() {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if alive(pid) && String::from_utf8_lossy(&cmd).contains("forkd") {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn pid(&self) -> i32 {
        self.header("x-forkd-pid")
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

pub fn connect_from(source: &str, port: u16) -> std::io::Result<TcpStream> {
    if source == "127.0.0.1" {
        return connect(port);
    }
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let from: std::net::SocketAddr = format!("{source}:0").parse().unwrap();
    sock.bind(&from.into())?;
    let to: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    sock.connect_timeout(&to.into(), Duration::from_secs(5))?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

fn connect(port: u16) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(5),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// Reads one response from `r`.
fn read_response(r: &mut BufReader<TcpStream>, head: bool) -> std::io::Result<Response> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        ));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(&format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').ok_or_else(|| bad("bad header"))?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .filter(|_| !head)
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Sends raw request bytes on a new connection and reads one response.
pub fn raw(port: u16, request: &str) -> std::io::Result<Response> {
    let mut s = connect(port)?;
    s.write_all(request.as_bytes())?;
    read_response(&mut BufReader::new(s), request.starts_with("HEAD "))
}

/// `GET path` on a new connection.
pub fn get(port: u16, path: &str) -> std::io::Result<Response> {
    raw(
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
    )
}

/// A kept-alive connection that reconnects only when the server said
/// `Connection: close` (or it was never open). Any other failure is
/// reported, not retried.
pub struct KeepAlive {
    port: u16,
    conn: Option<BufReader<TcpStream>>,
}

impl KeepAlive {
    pub fn new(port: u16) -> Self {
        KeepAlive { port, conn: None }
    }

    pub fn get(&mut self, path: &str) -> std::io::Result<Response> {
        let r = self.try_get(path);
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    fn try_get(&mut self, path: &str) -> std::io::Result<Response> {
        if self.conn.is_none() {
            self.conn = Some(BufReader::new(connect(self.port)?));
        }
        let c = self.conn.as_mut().unwrap();
        c.get_mut()
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())?;
        let resp = read_response(c, false)?;
        if resp
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        {
            self.conn = None;
        }
        Ok(resp)
    }
}

/// What a load loop saw.
#[derive(Debug, Default)]
pub struct LoadResult {
    pub ok: u64,
    pub failed: u64,
    pub errors: Vec<String>,
    pub pids: HashSet<i32>,
}

/// A continuous request loop on several threads: half on new connections,
/// half on kept-alive ones. Bounded: it stops by itself after `max` time.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<LoadResult>>,
}

impl Load {
    pub fn start(port: u16, threads: usize, path: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Duration::from_secs(120);
        let threads = (0..threads)
            .map(|i| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut res = LoadResult::default();
                    let mut ka = KeepAlive::new(port);
                    let started = Instant::now();
                    for _ in 0..2_000_000u64 {
                        if stop.load(Ordering::Relaxed) || started.elapsed() > max {
                            break;
                        }
                        let r = if i % 2 == 0 {
                            get(port, path)
                        } else {
                            ka.get(path)
                        };
                        match r {
                            Ok(r) if r.status == 200 => {
                                res.ok += 1;
                                res.pids.insert(r.pid());
                            }
                            Ok(r) => {
                                res.failed += 1;
                                res.errors.push(format!("status {}", r.status));
                            }
                            Err(e) => {
                                res.failed += 1;
                                res.errors.push(e.to_string());
                            }
                        }
                    }
                    res
                })
            })
            .collect();
        Load { stop, threads }
    }

    pub fn finish(mut self) -> LoadResult {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = LoadResult::default();
        for t in std::mem::take(&mut self.threads) {
            let r = t.join().unwrap();
            total.ok += r.ok;
            total.failed += r.failed;
            total.errors.extend(r.errors);
            total.pids.extend(r.pids);
        }
        total
    }
}

impl Drop for Load {
    /// A test that panics mid-load stops its load threads rather than let
    /// them hammer a dead port for two minutes.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
    }
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

/// Sends one request with `headers` and `body` on a new connection.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    request_from("127.0.0.1", port, method, path, headers, body)
}

/// As `request`, from the loopback address `source` (any 127.0.0.x is a
/// distinct client).
pub fn request_from(
    source: &str,
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut s = connect_from(source, port)?;
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    read_response(&mut BufReader::new(s), method == "HEAD")
}

/// `POST /login` with a JSON body.
pub fn login(port: u16, user: &str, password: &str) -> Response {
    let body = serde_json::json!({"username": user, "password": password}).to_string();
    request(
        port,
        "POST",
        "/login",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
    .expect("login answered")
}

/// The token of a successful login.
pub fn token(port: u16, user: &str, password: &str) -> String {
    let r = login(port, user, password);
    assert_eq!(r.status, 200, "login failed: {r:?}");
    r.json()["token"].as_str().unwrap().to_owned()
}

/// `POST /logout` with a bearer token.
pub fn logout(port: u16, token: &str) -> std::io::Result<Response> {
    request(
        port,
        "POST",
        "/logout",
        &[("Authorization", &format!("Bearer {token}"))],
        b"",
    )
}

/// `GET /profile` with a bearer token.
pub fn profile(port: u16, token: &str) -> std::io::Result<Response> {
    request(
        port,
        "GET",
        "/profile",
        &[("Authorization", &format!("Bearer {token}"))],
        b"",
    )
}

/// A redis-server of the test's own, on a free loopback port, killed when
/// dropped.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let mut r = RedisServer {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        r.spawn();
        r
    }

    /// (Re)starts the server on the same port and data directory. Every
    /// write is synced, so a SIGKILLed server comes back with its data.
    pub fn spawn(&mut self) {
        let child = redis_server(self.port, self.dir.path())
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .spawn()
            .expect("redis-server runs (bin/test installs it)");
        self.child = Some(child);
        poll(PATIENCE, || {
            (self.cli(&["PING"]).trim() == "PONG").then_some(())
        })
        .expect("redis-server answers PING");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// SIGKILLs the server and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs redis-cli against this server and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--no-raw"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Like `cli`, with raw output (one value a line).
    pub fn raw(&self, args: &[&str]) -> Vec<String> {
        redis_cli_lines(&["-p", &self.port.to_string(), "--raw"], args)
    }

    /// Every key (SCAN).
    pub fn keys(&self) -> Vec<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--scan"])
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Commands processed so far (INFO stats).
    pub fn commands_processed(&self) -> u64 {
        self.raw(&["INFO", "stats"])
            .iter()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of 3 primaries and 3 replicas on free loopback ports,
/// with a 1 s node timeout so that failovers take seconds; every node is
/// killed when dropped.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    _dir: tempfile::TempDir,
    nodes: Vec<Child>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let dir = tempfile::tempdir().unwrap();
        let ports = cluster_ports(6);
        let mut nodes = Vec::new();
        for port in &ports {
            let d = dir.path().join(port.to_string());
            std::fs::create_dir_all(&d).unwrap();
            let child = redis_server(*port, &d)
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--save", "", "--appendonly", "no"])
                .spawn()
                .expect("redis-server runs");
            nodes.push(child);
        }
        let c = RedisCluster {
            ports,
            _dir: dir,
            nodes,
        };
        for &p in &c.ports {
            poll(PATIENCE, || {
                (c.cli_at(p, &["PING"]).trim() == "PONG").then_some(())
            })
            .expect("node answers");
        }
        let addrs: Vec<String> = c.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        c.wait_ok();
        c
    }

    /// Waits until every live node says the cluster is ok.
    pub fn wait_ok(&self) {
        poll(Duration::from_secs(60), || {
            self.live_ports()
                .iter()
                .all(|&p| {
                    self.cli_at(p, &["CLUSTER", "INFO"])
                        .contains("cluster_state:ok")
                })
                .then_some(())
        })
        .expect("cluster_state:ok");
    }

    fn live_ports(&self) -> Vec<u16> {
        self.ports
            .iter()
            .zip(&self.nodes)
            .filter(|(_, c)| alive(c.id() as i32))
            .map(|(p, _)| *p)
            .collect()
    }

    /// `redis-cluster://` with every node.
    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.ports[0]);
        for (i, p) in self.ports[1..].iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&format!("node=127.0.0.1:{p}"));
        }
        url
    }

    pub fn cli_at(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "--raw"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A command routed to the node that owns its key (redis-cli -c).
    pub fn raw(&self, args: &[&str]) -> Vec<String> {
        let port = self.live_ports()[0];
        redis_cli_lines(&["-c", "-p", &port.to_string(), "--raw"], args)
    }

    /// Every key on every primary.
    pub fn keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        for p in self.live_ports() {
            if !self.cli_at(p, &["ROLE"]).starts_with("master") {
                continue;
            }
            let out = Command::new("redis-cli")
                .args(["-p", &p.to_string(), "--scan"])
                .output()
                .unwrap();
            keys.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .map(str::to_owned),
            );
        }
        keys.sort();
        keys
    }

    /// The port of the primary that owns `key`'s slot.
    pub fn primary_of(&self, key: &str) -> u16 {
        let slot: u16 = self.raw(&["CLUSTER", "KEYSLOT", key])[0]
            .trim()
            .parse()
            .unwrap();
        let nodes = self.cli_at(self.live_ports()[0], &["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            for range in &f[8..] {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(a), Ok(b)) = (a.parse::<u16>(), b.parse::<u16>()) {
                    if (a..=b).contains(&slot) {
                        let port = f[1].split('@').next().unwrap().rsplit(':').next().unwrap();
                        return port.parse().unwrap();
                    }
                }
            }
        }
        panic!("no primary for slot {slot}:\n{nodes}");
    }

    /// Waits until the primary on `port` has been copied by its replica.
    pub fn wait_replicated(&self, port: u16) {
        poll(PATIENCE, || {
            replica_caught_up(&self.cli_at(port, &["INFO", "replication"])).then_some(())
        })
        .expect("the replica caught up");
    }

    /// SIGKILLs the node on `port`.
    pub fn kill(&mut self, port: u16) {
        let i = self.ports.iter().position(|&p| p == port).unwrap();
        let _ = self.nodes[i].kill();
        let _ = self.nodes[i].wait();
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.nodes {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What the API tests need of a Redis deployment, single server or cluster.
pub trait Backend {
    fn url(&self) -> String;
    /// Every key.
    fn keys(&self) -> Vec<String>;
    /// One command (routed to the key's node), raw output lines.
    fn raw(&self, args: &[&str]) -> Vec<String>;
    /// Commands processed so far, over all nodes.
    fn commands_processed(&self) -> u64;
    /// How much one `commands_processed` call adds itself.
    fn info_cost(&self) -> u64;
}

impl Backend for RedisServer {
    fn url(&self) -> String {
        RedisServer::url(self)
    }
    fn keys(&self) -> Vec<String> {
        RedisServer::keys(self)
    }
    fn raw(&self, args: &[&str]) -> Vec<String> {
        RedisServer::raw(self, args)
    }
    fn commands_processed(&self) -> u64 {
        RedisServer::commands_processed(self)
    }
    fn info_cost(&self) -> u64 {
        1
    }
}

impl Backend for RedisCluster {
    fn url(&self) -> String {
        RedisCluster::url(self)
    }
    fn keys(&self) -> Vec<String> {
        RedisCluster::keys(self)
    }
    fn raw(&self, args: &[&str]) -> Vec<String> {
        RedisCluster::raw(self, args)
    }
    fn commands_processed(&self) -> u64 {
        self.live_ports()
            .iter()
            .map(|&p| {
                self.cli_at(p, &["INFO", "stats"])
                    .lines()
                    .find_map(|l| l.strip_prefix("total_commands_processed:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }
    fn info_cost(&self) -> u64 {
        self.live_ports().len() as u64
    }
}

/// `redis-server` on loopback `port` with its data in `dir`, quiet; callers
/// add persistence and mode options.
pub fn redis_server(port: u16, dir: &Path) -> Command {
    let mut c = Command::new("redis-server");
    c.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(dir)
        .args([
            "--daemonize",
            "no",
            "--logfile",
            "",
            "--loglevel",
            "warning",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// Whether a primary's `INFO replication` shows its first replica at the
/// primary's own offset.
pub fn replica_caught_up(info: &str) -> bool {
    let master: Option<u64> = info
        .lines()
        .find_map(|l| l.strip_prefix("master_repl_offset:"))
        .and_then(|v| v.trim().parse().ok());
    let replica: Option<u64> = info
        .lines()
        .find(|l| l.starts_with("slave0:"))
        .and_then(|l| l.split(',').find_map(|kv| kv.strip_prefix("offset=")))
        .and_then(|v| v.parse().ok());
    matches!((master, replica), (Some(m), Some(r)) if r >= m)
}

/// Sends `n` requests built by `make` from `n` threads at once.
pub fn concurrently<F>(n: usize, make: F) -> Vec<std::io::Result<Response>>
where
    F: Fn(usize) -> std::io::Result<Response> + Send + Sync + 'static,
{
    let make = Arc::new(make);
    let barrier = Arc::new(std::sync::Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let make = make.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                make(i)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Waits until every current worker has served more than `n` requests.
pub fn wait_each_served(f: &Forkd, n: u64) {
    poll(PATIENCE, || {
        let s = f.status()?;
        let workers = s["workers"].as_array()?;
        workers
            .iter()
            .all(|w| w["requests"].as_u64().unwrap_or(0) > n)
            .then_some(())
    })
    .expect("every worker serves");
}

/// Waits until the current workers have served more than `n` requests.
pub fn wait_served(f: &Forkd, n: u64) {
    poll(PATIENCE, || {
        let s = f.status()?;
        let served: u64 = s["workers"]
            .as_array()?
            .iter()
            .map(|w| w["requests"].as_u64().unwrap_or(0))
            .sum();
        (served > n).then_some(())
    })
    .expect("the workers serve");
}

/// Runs `redis-cli OPTIONS ARGS...` and returns its output lines.
pub fn redis_cli_lines(options: &[&str], args: &[&str]) -> Vec<String> {
    let out = Command::new("redis-cli")
        .args(options)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}
