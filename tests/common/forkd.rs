//! One forkd instance under test: its directory, config, process, CLI
//! and logs, and waits on what its workers have served.

use super::*;

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

    /// Writes `extra` as the configuration after the listener and the
    /// runtime directory `configure` wrote (for a reload).
    pub fn rewrite_config(&self, extra: &str) {
        let old = std::fs::read_to_string(&self.config).unwrap();
        let head: Vec<&str> = old.lines().take(2).collect();
        std::fs::write(&self.config, format!("{}\n{extra}\n", head.join("\n"))).unwrap();
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

    /// Starts the supervisor through `systemd-socket-activate`, which
    /// binds 127.0.0.1 on `ports` (in that order), passes them as
    /// LISTEN_FDS and execs forkd on the first connection.
    pub fn socket_activated(&mut self, ports: &[u16]) {
        let log = std::fs::File::create(&self.log).unwrap();
        let data = self.dir.path().join("data");
        let mut cmd = Command::new("systemd-socket-activate");
        for p in ports {
            cmd.arg("-l").arg(format!("127.0.0.1:{p}"));
        }
        let child = cmd
            .args(["-E", "PATH", "-E"])
            .arg(format!("FORKD_REDIS_DATA_DIR={}", data.display()))
            .arg(BIN)
            .arg("--config")
            .arg(&self.config)
            .arg("start")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("systemd-socket-activate runs (bin/test installs systemd)");
        self.adopt(child);
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
