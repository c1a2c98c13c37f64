//! The supervisor's main loop. It only carries out what [`Plan`] decides:
//! forks, signals, replies. One `poll` waits on the signalfd, the control
//! socket and its connections, with a short timeout for the periodic
//! heartbeat check, so an idle or crash-looping supervisor costs almost no
//! CPU.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixListener;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::stat::{umask, Mode};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::control::{Conn, ReadResult, Reply, Request, Status, WorkerStatus};
use crate::control_files::{control_socket_path, Pidfile};
use crate::notify::{self, Notifier};
use crate::plan::{Action, Limits, Observed, Phase, Plan, ReloadOutcome, Sig};
use crate::private_dir::{give_file, PrivateDir};
use crate::redis::RedisChild;
use crate::scoreboard::{now_ms, Scoreboard, WorkerState};
use crate::signals::{SignalEvent, Signals};
use crate::upgrade::Upgrade;
use crate::{
    listen, privs, redirect_output, sys, upgrade, Error, ListenerMode, Program, Settings,
    WorkerContext,
};

/// Heartbeat and readiness checks run at least this often.
const TICK_MS: u64 = 100;
/// Open control connections at most; the socket is 0600, so only the
/// owner can reach this, but a stuck script should not grow the poll set.
const MAX_CONTROL_CONNS: usize = 64;
/// How long a start waits for the managed redis-server before it forks the
/// workers (a server that loads a large append-only file takes a while).
const REDIS_START_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

pub(crate) fn limits(s: &Settings) -> Limits {
    Limits {
        worker_timeout_ms: s.worker_timeout.as_millis() as u64,
        startup_timeout_ms: s.startup_timeout.as_millis() as u64,
        shutdown_timeout_ms: s.shutdown_timeout.as_millis() as u64,
    }
}

/// Runs the supervisor until it is stopped.
///
/// Binds the listener (refusing a port that is already served), takes the
/// pidfile and control socket, forks `settings.workers` workers running
/// `program`, and supervises them until SIGTERM/SIGINT/SIGQUIT or
/// `forkd stop`.
///
/// # Errors
/// Anything that prevents start-up: the instance already runs, the port is
/// served, a file or directory cannot be made. Once workers run, failures
/// are logged and handled, not returned.
/// `inherited` is the handover this process was started with
/// ([`crate::take_handover`]): it resumes instead of starting afresh.
pub fn run<P: Program>(
    settings: Settings,
    program: P,
    inherited: Option<upgrade::Inherited>,
) -> Result<(), Error> {
    let threads = sys::thread_count();
    if threads != 1 {
        return Err(Error::Threads(threads));
    }
    if let Some(inherited) = inherited {
        return upgrade::resume(settings, program, inherited);
    }
    let mut settings = settings;
    let account = match &settings.user {
        Some(u) => Some(privs::resolve(u, settings.group.as_deref())?),
        None => None,
    };
    let runtime = PrivateDir::prepare(
        &settings.runtime_dir,
        "runtime directory",
        account.as_ref(),
        false,
    )?;
    let pidfile = Pidfile::acquire(&runtime, &settings.instance)?;
    if let Some(path) = &settings.log_file {
        let log = crate::open_log(path)?;
        crate::point_output_at(&log)?;
        if let Some(acct) = &account {
            give_file(&log, path, acct)?;
        }
    }
    if let Some(r) = &settings.redis {
        // Its append-only file holds password hashes and sessions.
        PrivateDir::prepare(&r.dir, "redis data directory", account.as_ref(), true)?;
    }
    let first = match sys::listen_fds().into_iter().next() {
        Some(fd) => {
            let l = listen::adopt(fd)?;
            if settings.listener == ListenerMode::Reuseport {
                log::warn!("socket activation: serving on the passed socket in shared mode");
                settings.listener = ListenerMode::Shared;
            }
            log::info!("socket activation: adopted the socket passed by systemd");
            l
        }
        None => {
            listen::ensure_free(settings.listen)?;
            listen::bind(settings.listen, settings.backlog)?
        }
    };
    let listen_addr = first
        .local_addr()
        .map_err(|e| Error::Bind(settings.listen, e))?;
    let control_path = control_socket_path(&settings.runtime_dir, &settings.instance);
    let _ = std::fs::remove_file(&control_path);
    let old_mask = umask(Mode::from_bits_truncate(0o177));
    let control = UnixListener::bind(&control_path);
    umask(old_mask);
    let control = control.map_err(|e| Error::file(&control_path, e))?;
    control
        .set_nonblocking(true)
        .map_err(|e| Error::file(&control_path, e))?;
    if let Some(acct) = &account {
        // Everything the supervisor (and its redis-server) writes later
        // must belong to the account first (the directories already do).
        let name = control_path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        runtime.give_entry(&name, acct)?;
        pidfile.give(acct)?;
        privs::drop_to(acct)?;
    }
    let signals = Signals::new().map_err(|source| Error::Sys {
        what: "signalfd",
        source,
    })?;
    // Twice the largest worker count: a rolling replacement briefly runs
    // two processes per slot.
    let board = Scoreboard::new(2 * crate::MAX_WORKERS).map_err(|source| Error::Sys {
        what: "mmap for the scoreboard",
        source,
    })?;
    let mut seed = [0u8; 8];
    let _ = getrandom::fill(&mut seed);

    log::info!(
        "forkd {} starting: instance '{}', {} worker(s), listening on {} ({} listener)",
        env!("CARGO_PKG_VERSION"),
        settings.instance,
        settings.workers,
        listen_addr,
        settings.listener.name()
    );
    let plan = Plan::new(
        settings.workers,
        limits(&settings),
        u64::from_le_bytes(seed),
    );
    let redis = settings.redis.clone().map(RedisChild::new);
    let mut sup = Supervisor::new(
        settings,
        program,
        Parts {
            pidfile,
            listeners: vec![first],
            listen_addr,
            control,
            board,
            signals,
            plan,
            redis,
            started_ms: now_ms(),
        },
    );
    // The store first, and up (bounded) before the workers look for it.
    if let Some(r) = &mut sup.redis {
        r.tick(now_ms());
        if !r.wait_ready(REDIS_START_WAIT) {
            log::warn!(
                "redis-server does not answer on {} after {} s; starting the workers anyway",
                r.socket().display(),
                REDIS_START_WAIT.as_secs()
            );
        }
    }
    let actions = sup.plan.start();
    sup.execute(actions);
    sup.finish()
}

/// What a fresh start and a resume both bring to the supervisor.
pub(crate) struct Parts {
    pub(crate) pidfile: Pidfile,
    pub(crate) listeners: Vec<TcpListener>,
    pub(crate) listen_addr: SocketAddr,
    pub(crate) control: UnixListener,
    pub(crate) board: Scoreboard,
    pub(crate) signals: Signals,
    pub(crate) plan: Plan,
    pub(crate) redis: Option<RedisChild>,
    pub(crate) started_ms: u64,
}

pub(crate) struct Supervisor<P: Program> {
    pub(crate) settings: Settings,
    pub(crate) pidfile: Option<Pidfile>,
    /// The binary `forkd upgrade` executes, and the arguments and
    /// environment (without upgrade state) this supervisor was started with.
    pub(crate) exe: Option<PathBuf>,
    pub(crate) args: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) upgrade: Option<Upgrade>,
    notifier: Option<Notifier>,
    /// Half the systemd watchdog interval, and when WATCHDOG=1 is next due.
    watchdog: Option<(std::time::Duration, u64)>,
    pub(crate) sent_ready: bool,
    pub(crate) redis: Option<RedisChild>,
    program: P,
    pub(crate) plan: Plan,
    pub(crate) board: Scoreboard,
    /// Shared mode: one socket. Reuseport mode: one per slot.
    pub(crate) listeners: Vec<TcpListener>,
    listen_addr: SocketAddr,
    signals: Signals,
    pub(crate) control: UnixListener,
    pub(crate) conns: Vec<Conn>,
    pid: i32,
    pub(crate) started_ms: u64,
    control_path: PathBuf,
}

impl<P: Program> Supervisor<P> {
    pub(crate) fn new(settings: Settings, program: P, parts: Parts) -> Self {
        Supervisor {
            notifier: Notifier::from_env(),
            watchdog: notify::watchdog_interval().map(|iv| (iv / 2, now_ms())),
            sent_ready: false,
            pidfile: Some(parts.pidfile),
            exe: upgrade::exe_path(),
            args: std::env::args().collect(),
            env: std::env::vars().collect(),
            upgrade: None,
            redis: parts.redis,
            plan: parts.plan,
            control_path: control_socket_path(&settings.runtime_dir, &settings.instance),
            settings,
            program,
            board: parts.board,
            listeners: parts.listeners,
            listen_addr: parts.listen_addr,
            signals: parts.signals,
            control: parts.control,
            conns: Vec::new(),
            pid: std::process::id() as i32,
            started_ms: parts.started_ms,
        }
    }

    /// Runs until stopped, then cleans up.
    pub(crate) fn finish(mut self) -> Result<(), Error> {
        self.run_loop();
        if let Some(r) = &mut self.redis {
            r.stop(std::time::Duration::from_secs(10));
        }
        let _ = std::fs::remove_file(&self.control_path);
        if let Some(p) = self.pidfile.take() {
            p.remove();
        }
        log::info!("forkd stopped");
        Ok(())
    }

    fn run_loop(&mut self) {
        loop {
            let now = now_ms();
            let redis_due = self.redis.as_ref().and_then(|r| r.restart_at_ms);
            let watchdog_due = self.watchdog.map(|(_, due)| due);
            let probe_due = self.probe_wait().map(|(_, due)| due);
            let wait = [self.plan.next_timer(), redis_due, watchdog_due, probe_due]
                .into_iter()
                .flatten()
                .min()
                .map_or(TICK_MS, |t| t.saturating_sub(now).min(TICK_MS));
            self.wait(wait);
            for ev in self.signals.drain() {
                self.on_signal(ev);
            }
            self.reap();
            if self.plan.phase() == Phase::Running {
                if let Some(r) = &mut self.redis {
                    r.tick(now_ms());
                }
            }
            self.serve_control();
            self.check_probe();
            let board = &self.board;
            let actions = self.plan.tick(now_ms(), |w| {
                let v = board.view(w.cell);
                Observed {
                    ready: v.state == WorkerState::Ready,
                    heartbeat_ms: v.heartbeat_ms,
                }
            });
            if self.execute(actions) {
                return;
            }
            let ready = ready_slots(&self.plan, &self.board);
            let restarts: u64 = self.plan.slots().iter().map(|s| s.restarts).sum();
            self.board.set_supervisor_figures(ready as u64, restarts);
            self.tell_systemd(ready, restarts);
        }
    }

    /// READY=1 once the first generation is up, STATUS= on changes, and
    /// WATCHDOG=1 while a quorum of workers has a fresh heartbeat.
    fn tell_systemd(&mut self, ready: usize, restarts: u64) {
        let Some(n) = &mut self.notifier else { return };
        let target = self.plan.target();
        if !self.sent_ready && ready >= target && self.plan.phase() == Phase::Running {
            self.sent_ready = true;
            n.send("READY=1");
        }
        n.status(format!(
            "{ready}/{target} workers ready, {restarts} restarts, generation {}",
            self.plan.generation()
        ));
        let now = now_ms();
        if let Some((every, due)) = &mut self.watchdog {
            if now >= *due {
                *due = now + every.as_millis() as u64;
                let fresh_ms = 2 * self.settings.heartbeat_interval.as_millis() as u64 + 250;
                let fresh = self
                    .plan
                    .workers()
                    .iter()
                    .filter(|w| w.leaving.is_none())
                    .filter(|w| {
                        now.saturating_sub(self.board.view(w.cell).heartbeat_ms) <= fresh_ms
                    })
                    .count();
                let quorum = ((target as f64) * self.settings.watchdog_quorum)
                    .ceil()
                    .max(1.0) as usize;
                if fresh >= quorum {
                    n.send("WATCHDOG=1");
                } else {
                    log::warn!("watchdog not fed: {fresh} of {target} workers have a fresh heartbeat (quorum {quorum})");
                }
            }
        }
    }

    pub(crate) fn notify(&self, msg: &str) {
        if let Some(n) = &self.notifier {
            n.send(msg);
        }
    }

    /// Blocks until a signal, a control connection or request, or `ms`.
    fn wait(&self, ms: u64) {
        let mut fds = vec![
            PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.control.as_fd(), PollFlags::POLLIN),
        ];
        fds.extend(self.conns.iter().map(|c| {
            let mut events = PollFlags::empty();
            if c.wants_read() {
                events |= PollFlags::POLLIN;
            }
            if c.wants_write() {
                events |= PollFlags::POLLOUT;
            }
            PollFd::new(c.stream.as_fd(), events)
        }));
        if let Some((Some(fd), _)) = self.probe_wait() {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
        }
        let timeout = PollTimeout::try_from(ms.min(10_000) as i32).unwrap_or(PollTimeout::MAX);
        let _ = poll(&mut fds, timeout);
    }

    /// Carries out actions. Returns true when the supervisor should exit.
    pub(crate) fn execute(&mut self, actions: Vec<Action>) -> bool {
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        let mut exit = false;
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Spawn { slot, generation } => queue.extend(self.spawn(slot, generation)),
                Action::Signal { pid, sig } => {
                    let sig = match sig {
                        Sig::Term => Signal::SIGTERM,
                        Sig::Kill => Signal::SIGKILL,
                    };
                    let _ = kill(Pid::from_raw(pid), sig);
                }
                Action::ReloadDone(outcome) => self.reload_done(outcome),
                Action::Exit => exit = true,
            }
        }
        exit
    }

    fn listener_for(&mut self, slot: usize) -> Result<&TcpListener, Error> {
        if self.settings.listener == ListenerMode::Shared {
            return Ok(&self.listeners[0]);
        }
        while self.listeners.len() <= slot {
            let l = listen::bind(self.listen_addr, self.settings.backlog)?;
            self.listeners.push(l);
        }
        Ok(&self.listeners[slot])
    }

    fn spawn(&mut self, slot: usize, generation: u64) -> Vec<Action> {
        let now = now_ms();
        let listener = match self.listener_for(slot) {
            Ok(l) => l.as_raw_fd(),
            Err(e) => {
                log::error!("slot {slot}: {e}");
                return self.plan.spawn_failed(slot, generation, now);
            }
        };
        let Some(cell) = self.board.claim(slot, generation, now) else {
            log::error!("slot {slot}: no free scoreboard cell");
            return self.plan.spawn_failed(slot, generation, now);
        };
        match sys::fork() {
            Ok(nix::unistd::ForkResult::Child) => self.child(slot, generation, cell, listener),
            Ok(nix::unistd::ForkResult::Parent { child }) => {
                self.board.set_pid(cell, child.as_raw());
                self.plan
                    .spawned(slot, generation, child.as_raw(), cell, now);
                log::info!("worker slot {slot} started: pid {child}, generation {generation}");
                Vec::new()
            }
            Err(e) => {
                self.board.release(cell);
                log::error!("slot {slot}: fork failed: {e}");
                self.plan.spawn_failed(slot, generation, now)
            }
        }
    }

    /// The child side of a fork. Never returns.
    fn child(&self, slot: usize, generation: u64, cell: usize, listener_fd: i32) -> ! {
        crate::signals::unblock_all();
        // Die with the supervisor, even when it is SIGKILLed, so that no
        // orphan keeps the port; then make sure it had not died already.
        let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
        if nix::unistd::getppid().as_raw() != self.pid {
            sys::exit_now(1);
        }
        let listener = self
            .listeners
            .iter()
            .find(|l| l.as_raw_fd() == listener_fd)
            .and_then(|l| l.try_clone().ok());
        let Some(listener) = listener else {
            sys::exit_now(1);
        };
        sys::close_fds_except(&[0, 1, 2, listener.as_raw_fd()]);
        // The worker faces the network: nothing that speaks for the service
        // to systemd, and no upgrade state.
        sys::scrub_environment(|k| {
            crate::notify::SYSTEMD_VARS.contains(&k) || k.starts_with("FORKD_UPGRADE")
        });
        sys::return_large_allocations();
        self.board.set_pid(cell, std::process::id() as i32);
        let ctx = WorkerContext {
            slot,
            generation,
            listener,
            cell: self.board.handle(cell),
            log_file: self.settings.log_file.clone(),
        };
        let code = std::panic::catch_unwind(AssertUnwindSafe(|| self.program.run_worker(ctx)))
            .unwrap_or(70);
        sys::exit_now(code)
    }

    fn reap(&mut self) {
        loop {
            let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(s) => s,
            };
            let (pid, code, how) = match status {
                WaitStatus::Exited(pid, code) => (pid, code, format!("exited with status {code}")),
                WaitStatus::Signaled(pid, sig, _) => (pid, -1, format!("was killed by {sig}")),
                _ => continue,
            };
            if self.probe_exited(pid.as_raw(), code, &how) {
                continue;
            }
            if let Some(r) = &mut self.redis {
                if r.exited(pid.as_raw(), &how, now_ms()) {
                    continue;
                }
            }
            let (worker, actions) = self.plan.child_exited(pid.as_raw(), now_ms());
            if let Some(w) = worker {
                self.board.release(w.cell);
                if w.leaving.is_some() {
                    log::info!("worker slot {} pid {pid} {how}", w.slot);
                } else {
                    log::error!("worker slot {} pid {pid} {how} unexpectedly", w.slot);
                }
            }
            // An Exit here (the last worker of a stop) is seen again by the
            // tick that follows, which ends the loop.
            self.execute(actions);
        }
    }

    fn on_signal(&mut self, ev: SignalEvent) {
        let now = now_ms();
        let actions = match ev {
            SignalEvent::Stop => {
                log::info!("graceful stop requested");
                self.notify("STOPPING=1");
                self.plan
                    .stop(now, self.settings.shutdown_timeout.as_millis() as u64)
            }
            SignalEvent::FastStop => {
                log::info!("fast stop requested");
                self.notify("STOPPING=1");
                self.plan.fast_stop(now)
            }
            SignalEvent::Reload => self.reload(now),
            SignalEvent::ReopenLogs => {
                self.reopen_logs();
                Vec::new()
            }
            SignalEvent::Upgrade => {
                self.start_upgrade(None);
                Vec::new()
            }
            SignalEvent::More => self.scale(self.plan.target() + 1, now),
            SignalEvent::Fewer => self.scale(self.plan.target().saturating_sub(1), now),
            SignalEvent::Child => Vec::new(),
        };
        self.execute(actions);
    }

    fn scale(&mut self, n: usize, now: u64) -> Vec<Action> {
        let n = n.clamp(1, crate::MAX_WORKERS);
        if n != self.plan.target() {
            log::info!("scaling from {} to {n} worker(s)", self.plan.target());
        }
        let actions = self.plan.scale(n, now);
        if self.settings.listener == ListenerMode::Reuseport {
            // The slot sockets of removed slots close here; their retiring
            // workers hold their own copies until they exit.
            self.listeners.truncate(n.max(1));
        }
        actions
    }

    fn reopen_logs(&mut self) {
        let Some(path) = self.settings.log_file.clone() else {
            log::info!("SIGUSR1: no log_file configured; nothing to reopen");
            return;
        };
        match redirect_output(&path) {
            Ok(()) => log::info!("reopened log file {}", path.display()),
            Err(e) => log::error!("cannot reopen log file: {e}"),
        }
        for w in self.plan.workers() {
            let _ = kill(Pid::from_raw(w.pid), Signal::SIGUSR1);
        }
    }

    fn reload(&mut self, now: u64) -> Vec<Action> {
        if self.plan.phase() != Phase::Running {
            return Vec::new();
        }
        if self.upgrade.is_some() {
            let error = "an upgrade is in progress; reload when it is done".to_owned();
            log::warn!("reload refused: {error}");
            self.reply_reload(ReloadOutcome {
                ok: false,
                generation: self.plan.generation(),
                replaced: Vec::new(),
                error: Some(error),
            });
            return Vec::new();
        }
        log::info!("reloading the configuration");
        let new = match self.program.reload() {
            Ok(s) => s,
            Err(e) => {
                log::error!("reload failed, the current workers keep serving: {e}");
                self.reply_reload(ReloadOutcome {
                    ok: false,
                    generation: self.plan.generation(),
                    replaced: Vec::new(),
                    error: Some(e),
                });
                return Vec::new();
            }
        };
        let old = &self.settings;
        if (
            &new.listen,
            new.backlog,
            new.listener,
            &new.instance,
            &new.runtime_dir,
            &new.redis,
        ) != (
            &old.listen,
            old.backlog,
            old.listener,
            &old.instance,
            &old.runtime_dir,
            &old.redis,
        ) {
            log::warn!(
                "listen, backlog, listener, instance, runtime_dir and managed redis changes take effect at the next start"
            );
        }
        let log_changed = new.log_file != old.log_file;
        let workers = new.workers;
        self.settings = Settings {
            listen: old.listen,
            backlog: old.backlog,
            listener: old.listener,
            instance: old.instance.clone(),
            runtime_dir: old.runtime_dir.clone(),
            redis: old.redis.clone(),
            ..new
        };
        self.plan.set_limits(limits(&self.settings));
        if log_changed {
            if let Some(path) = &self.settings.log_file {
                if let Err(e) = redirect_output(path) {
                    log::error!("{e}");
                }
            }
        }
        let usec = upgrade::monotonic_usec();
        self.notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
        let mut actions = self.plan.begin_reload(now);
        if workers != self.plan.target() {
            actions.extend(self.scale(workers, now));
        }
        actions
    }

    fn reload_done(&mut self, outcome: ReloadOutcome) {
        if self.upgrade_done(&outcome) {
            return;
        }
        if !outcome.ok {
            self.program.abandon_reload();
        }
        self.notify("READY=1");
        self.reply_reload(outcome);
    }

    fn reply_reload(&mut self, outcome: ReloadOutcome) {
        for c in &mut self.conns {
            if c.waiting == Some(Request::Reload) {
                c.waiting = None;
                let _ = c.send(&Reply::Reload(outcome.clone()));
            }
        }
    }

    fn serve_control(&mut self) {
        while let Ok((stream, _)) = self.control.accept() {
            if self.conns.len() >= MAX_CONTROL_CONNS {
                log::warn!("too many control connections; refusing one");
                continue;
            }
            match Conn::new(stream) {
                Ok(c) => self.conns.push(c),
                Err(e) => log::warn!("control connection: {e}"),
            }
        }
        let mut i = 0;
        while i < self.conns.len() {
            if self.serve_conn(i) {
                i += 1;
            } else {
                self.conns.swap_remove(i);
            }
        }
    }

    /// Sends what waits for connection `i` and answers every complete
    /// request it has sent. Returns whether it stays open.
    fn serve_conn(&mut self, i: usize) -> bool {
        if self.conns[i].flush().is_err() || self.conns[i].broken() {
            return false;
        }
        loop {
            match self.conns[i].read() {
                ReadResult::Pending => return true,
                ReadResult::Closed => return false,
                ReadResult::Invalid(message) => {
                    let _ = self.conns[i].send(&Reply::Error { message });
                    return false;
                }
                ReadResult::Request(req) => {
                    if !self.handle_request(i, req) || self.conns[i].broken() {
                        return false;
                    }
                }
            }
        }
    }

    /// Answers one request. Returns whether the connection stays open.
    fn handle_request(&mut self, i: usize, req: Request) -> bool {
        let now = now_ms();
        match req {
            Request::Status => {
                let status = self.status(now);
                let _ = self.conns[i].send(&Reply::Status(status));
                true
            }
            Request::Stop { timeout } => {
                let ms = match timeout {
                    Some(t) if t.is_finite() && t >= 0.0 => (t * 1000.0) as u64,
                    _ => self.settings.shutdown_timeout.as_millis() as u64,
                };
                let _ = self.conns[i].send(&Reply::Stopping {
                    pid: self.pid,
                    drain_ms: ms,
                });
                // Kept open: it closes when the supervisor exits.
                self.conns[i].waiting = Some(Request::Stop { timeout });
                if self.plan.phase() == Phase::Running {
                    log::info!("graceful stop requested (drain up to {ms} ms)");
                    self.notify("STOPPING=1");
                    let actions = self.plan.stop(now, ms);
                    self.execute(actions);
                }
                true
            }
            Request::Reload => {
                if self.plan.phase() != Phase::Running {
                    let _ = self.conns[i].send(&Reply::Error {
                        message: "forkd is stopping".into(),
                    });
                    return true;
                }
                self.conns[i].waiting = Some(Request::Reload);
                let actions = self.reload(now);
                self.execute(actions);
                true
            }
            Request::Upgrade => {
                self.start_upgrade(Some(i));
                true
            }
            Request::Scale { workers } => {
                let max = crate::MAX_WORKERS;
                let reply = if !(1..=max).contains(&workers) {
                    Reply::Error {
                        message: format!("cannot scale to {workers}: expected 1 to {max} workers"),
                    }
                } else if self.plan.phase() != Phase::Running {
                    Reply::Error {
                        message: "forkd is stopping".into(),
                    }
                } else {
                    let actions = self.scale(workers, now);
                    self.execute(actions);
                    Reply::Scaled { workers }
                };
                let _ = self.conns[i].send(&reply);
                true
            }
        }
    }

    fn status(&self, now: u64) -> Status {
        let slots = self.plan.slots();
        let mut workers: Vec<WorkerStatus> = self
            .plan
            .workers()
            .iter()
            .map(|w| {
                let v = self.board.view(w.cell);
                let state = match w.leaving {
                    Some(_) if v.state != WorkerState::Draining => "stopping",
                    _ => v.state.name(),
                };
                WorkerStatus {
                    slot: w.slot,
                    pid: w.pid,
                    generation: w.generation,
                    state: state.to_owned(),
                    uptime_ms: now.saturating_sub(w.spawned_ms),
                    requests: v.requests,
                    rss_bytes: rss_bytes(w.pid),
                    restarts: slots.get(w.slot).map_or(0, |s| s.restarts),
                    heartbeat_age_ms: now.saturating_sub(v.heartbeat_ms),
                    redis: crate::scoreboard::info_text(&v.info),
                }
            })
            .collect();
        workers.sort_by_key(|w| (w.slot, w.generation, w.pid));
        let ready = ready_slots(&self.plan, &self.board);
        Status {
            instance: self.settings.instance.clone(),
            pid: self.pid,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            build: self.settings.build.clone(),
            listen: self.listen_addr.to_string(),
            listener: self.settings.listener.name().to_owned(),
            generation: self.plan.generation(),
            phase: match (self.plan.phase(), self.plan.reloading()) {
                (Phase::Stopping, _) => "stopping",
                (Phase::Running, true) => "reloading",
                (Phase::Running, false) => "running",
            }
            .to_owned(),
            uptime_ms: now.saturating_sub(self.started_ms),
            workers_wanted: self.plan.target(),
            workers_ready: ready,
            rss_bytes: rss_bytes(self.pid),
            workers,
            redis: self.redis.as_ref().map(|r| crate::control::RedisStatus {
                pid: r.pid,
                socket: r.socket().display().to_string(),
            }),
            backoff: slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| Some((i, s.respawn_at_ms?.saturating_sub(now))))
                .collect(),
        }
    }
}

/// Slots with a ready worker that is not on its way out.
fn ready_slots(plan: &Plan, board: &Scoreboard) -> usize {
    plan.workers()
        .iter()
        .filter(|w| w.leaving.is_none() && w.slot < plan.target())
        .filter(|w| board.view(w.cell).state == WorkerState::Ready)
        .map(|w| w.slot)
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

/// Resident set size of `pid`, from /proc (0 when it cannot be read).
fn rss_bytes(pid: i32) -> u64 {
    let pages = std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    pages * page
}
