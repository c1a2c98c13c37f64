//! The managed redis-server: the zero-config store for one host. Started
//! before the workers, respawned with backoff when it dies, stopped after
//! the last worker has exited. The supervisor never talks to it.

use std::os::unix::fs::DirBuilderExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::backoff::crash_delay_ms;
use crate::scoreboard::now_ms;
use crate::{sys, ManagedRedis};

/// A run this long proves the server healthy; the backoff resets. Longer
/// than a worker's [`crate::plan::STABLE_MS`], which counts from the
/// worker's readiness: the supervisor sees no readiness of redis-server
/// (it may spend seconds loading its append-only file), only its start.
const STABLE_MS: u64 = 10_000;
/// The longest wait between restarts: shorter than a worker slot's, since
/// every worker waits for this one process, and one process crash-looping
/// costs the host little.
const BACKOFF_MAX_MS: u64 = 5_000;

pub(crate) struct RedisChild {
    cfg: ManagedRedis,
    pub(crate) pid: Option<i32>,
    started_ms: u64,
    failures: u32,
    pub(crate) restart_at_ms: Option<u64>,
}

impl RedisChild {
    pub(crate) fn new(cfg: ManagedRedis) -> Self {
        RedisChild {
            cfg,
            pid: None,
            started_ms: 0,
            failures: 0,
            restart_at_ms: Some(0),
        }
    }

    /// Takes over a running server (still this process's child) after an
    /// upgrade.
    pub(crate) fn adopt(&mut self, pid: i32) {
        self.pid = Some(pid);
        self.started_ms = now_ms();
        self.restart_at_ms = None;
    }

    pub(crate) fn socket(&self) -> &std::path::Path {
        &self.cfg.socket
    }

    /// Waits, up to `limit`, until the server answers PING on its socket,
    /// so that workers started next find it up instead of each starting
    /// without Redis. Used once at start, before the first workers.
    pub(crate) fn wait_ready(&self, limit: Duration) -> bool {
        use std::io::{Read, Write};
        let deadline = std::time::Instant::now() + limit;
        let answers = || -> std::io::Result<bool> {
            let mut s = std::os::unix::net::UnixStream::connect(&self.cfg.socket)?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            s.write_all(b"PING\r\n")?;
            let mut reply = [0u8; 64];
            let n = s.read(&mut reply)?;
            Ok(reply[..n].starts_with(b"+PONG"))
        };
        while self.pid.is_some() {
            if answers().unwrap_or(false) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Starts the server if it is due.
    pub(crate) fn tick(&mut self, now: u64) {
        if self.pid.is_some() || self.restart_at_ms.is_none_or(|t| t > now) {
            return;
        }
        self.restart_at_ms = None;
        let made = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.cfg.dir);
        if let Err(e) = made {
            log::error!(
                "cannot create redis data dir {}: {e}",
                self.cfg.dir.display()
            );
        }
        let mut cmd = Command::new(&self.cfg.program);
        cmd.arg("--port")
            .arg("0")
            .arg("--unixsocket")
            .arg(&self.cfg.socket)
            .arg("--unixsocketperm")
            .arg("600")
            .arg("--dir")
            .arg(&self.cfg.dir)
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
            ])
            .args([
                "--daemonize",
                "no",
                "--logfile",
                "",
                "--loglevel",
                "warning",
            ])
            .stdin(Stdio::null());
        for var in crate::notify::SYSTEMD_VARS {
            cmd.env_remove(var);
        }
        for var in crate::upgrade::VARS {
            cmd.env_remove(var);
        }
        match sys::spawn_service(&mut cmd) {
            Ok(child) => {
                let pid = child.id() as i32;
                log::info!(
                    "redis-server started: pid {pid}, socket {}, data {}",
                    self.cfg.socket.display(),
                    self.cfg.dir.display()
                );
                self.pid = Some(pid);
                self.started_ms = now;
            }
            Err(e) => {
                log::error!("cannot start {}: {e}", self.cfg.program.display());
                self.schedule(now, false);
            }
        }
    }

    /// A reaped child was the server: schedule its return.
    pub(crate) fn exited(&mut self, pid: i32, how: &str, now: u64) -> bool {
        if self.pid != Some(pid) {
            return false;
        }
        self.pid = None;
        let stable = now.saturating_sub(self.started_ms) >= STABLE_MS;
        log::error!("redis-server pid {pid} {how}");
        self.schedule(now, stable);
        true
    }

    fn schedule(&mut self, now: u64, stable: bool) {
        let delay = crash_delay_ms(&mut self.failures, stable, now, BACKOFF_MAX_MS);
        log::warn!("restarting redis-server in {delay} ms");
        self.restart_at_ms = Some(now + delay);
    }

    /// Stops the server (SIGTERM: it flushes its append-only file), waiting
    /// up to `patience` before SIGKILL.
    pub(crate) fn stop(&mut self, patience: Duration) {
        self.restart_at_ms = None;
        let Some(pid) = self.pid.take() else { return };
        let pid = Pid::from_raw(pid);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = now_ms() + patience.as_millis() as u64;
        loop {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {}
                _ => {
                    log::info!("redis-server stopped");
                    return;
                }
            }
            if now_ms() > deadline {
                log::warn!("redis-server did not stop in time; killing it");
                let _ = kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
