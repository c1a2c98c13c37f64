//! The supervisor's main loop. It only carries out what [`Plan`] decides:
//! forks, signals, replies. One `poll` waits on the signalfd, the control
//! socket and its connections, with a short timeout for the periodic
//! heartbeat check, so an idle or crash-looping supervisor costs almost no
//! CPU.
//!
//! - this file: the loop, carrying out actions, spawn and reap, signals,
//!   scale and reload;
//! - `start`: a fresh start, and the constructor a resume shares;
//! - `requests`: the control socket's requests, replies and status;
//! - `systemd`: sd_notify and the watchdog;
//! - `upgrade`: probing, executing and reporting an upgrade, and the
//!   rollback (the resume is in `start`; the handover in [`crate::upgrade`]).

mod requests;
mod start;
mod systemd;
mod upgrade;

pub use start::run;

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixListener;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::control::Conn;
use crate::control_files::Pidfile;
use crate::plan::{Action, Limits, Observed, Phase, Plan, ReloadOutcome, Sig};
use crate::redis::RedisChild;
use crate::scoreboard::{now_ms, Scoreboard, WorkerState};
use crate::signals::{SignalEvent, Signals};
use crate::{
    listen, redirect_output, sys, Error, Fixed, ListenerMode, Live, Program, Settings,
    WorkerContext,
};
use systemd::Systemd;
use upgrade::Upgrade;

/// Heartbeat and readiness checks run at least this often.
const TICK_MS: u64 = 100;
/// Open control connections at most; the socket is 0600, so only the
/// owner can reach this, but a stuck script should not grow the poll set.
const MAX_CONTROL_CONNS: usize = 64;

pub(crate) fn limits(s: &Live) -> Limits {
    Limits {
        worker_timeout_ms: s.worker_timeout.as_millis() as u64,
        startup_timeout_ms: s.startup_timeout.as_millis() as u64,
        shutdown_timeout_ms: s.shutdown_timeout.as_millis() as u64,
    }
}

/// Everything the supervisor holds while it runs.
pub(crate) struct Supervisor<P: Program> {
    pub(crate) settings: Settings,
    pub(crate) pidfile: Option<Pidfile>,
    /// The binary `forkd upgrade` executes, and the arguments and
    /// environment (without upgrade state) this supervisor was started with.
    pub(crate) exe: Option<PathBuf>,
    pub(crate) args: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) upgrade: Option<Upgrade>,
    pub(crate) systemd: Systemd,
    pub(crate) redis: Option<RedisChild>,
    program: P,
    pub(crate) plan: Plan,
    pub(crate) board: Scoreboard,
    /// Per listen address: one socket, or (reuseport) one per slot.
    pub(crate) sockets: listen::Sockets,
    signals: Signals,
    pub(crate) control: UnixListener,
    pub(crate) conns: Vec<Conn>,
    pid: i32,
    pub(crate) started_ms: u64,
    control_path: PathBuf,
    /// The pool size before and after the reload under way, when it
    /// changes it: told in the reload's answer.
    resized: Option<[usize; 2]>,
}

impl<P: Program> Supervisor<P> {
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
            let watchdog_due = self.systemd.watchdog_due();
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
            let by_memory = self.plan.recycling().max_rss_bytes > 0;
            let actions = self.plan.tick(now_ms(), |w| {
                let v = board.view(w.cell);
                Observed {
                    ready: v.state == WorkerState::Ready,
                    heartbeat_ms: v.heartbeat_ms,
                    requests: v.requests,
                    rss_bytes: if by_memory {
                        requests::rss_bytes(w.pid)
                    } else {
                        0
                    },
                }
            });
            if self.execute(actions) {
                return;
            }
            let ready = ready_slots(&self.plan, &self.board);
            let restarts: u64 = self.plan.slots().iter().map(|s| s.restarts).sum();
            self.board.set_supervisor_figures(ready as u64, restarts);
            self.board.set_recycles(self.plan.recycled());
            let (queued, backlog) = self.accept_queue();
            self.board.set_accept_queue(queued, backlog);
            self.tell_systemd(ready, restarts);
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
                Action::Hung { slot, pid, cell } => {
                    let doing = requests::describe_activity(&self.board.activity(cell), now_ms());
                    log::error!("worker slot {slot} pid {pid} was stuck with {doing}");
                }
                Action::Exit => exit = true,
            }
        }
        exit
    }

    fn spawn(&mut self, slot: usize, generation: u64) -> Vec<Action> {
        let now = now_ms();
        let per_slot = self.settings.fixed.listener == ListenerMode::Reuseport;
        let listeners = match self
            .sockets
            .for_slot(slot, per_slot, self.settings.fixed.backlog)
        {
            Ok(fds) => fds,
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
            Ok(nix::unistd::ForkResult::Child) => self.child(slot, generation, cell, &listeners),
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
    fn child(&self, slot: usize, generation: u64, cell: usize, listener_fds: &[i32]) -> ! {
        crate::signals::unblock_all();
        // Die with the supervisor, even when it is SIGKILLed, so that no
        // orphan keeps the port; then make sure it had not died already.
        let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
        if nix::unistd::getppid().as_raw() != self.pid {
            sys::exit_now(1);
        }
        let mut listeners = Vec::with_capacity(listener_fds.len());
        for fd in listener_fds {
            let l = self
                .sockets
                .all()
                .find(|l| l.as_raw_fd() == *fd)
                .and_then(|l| l.try_clone().ok());
            let Some(l) = l else {
                sys::exit_now(1);
            };
            listeners.push(l);
        }
        let mut keep = vec![0, 1, 2];
        keep.extend(listeners.iter().map(|l| l.as_raw_fd()));
        sys::close_fds_except(&keep);
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
            listeners,
            shared_listeners: self.settings.fixed.listener != ListenerMode::Reuseport,
            cell: self.board.handle(cell),
            log_file: self.settings.live.log_file.clone(),
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
                let ms = self.settings.live.shutdown_timeout.as_millis() as u64;
                self.begin_stop(now, ms)
            }
            SignalEvent::FastStop => {
                log::info!("fast stop requested");
                self.systemd.stopping();
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

    pub(super) fn scale(&mut self, n: usize, now: u64) -> Vec<Action> {
        let n = n.clamp(1, crate::MAX_WORKERS);
        if n != self.plan.target() {
            log::info!("scaling from {} to {n} worker(s)", self.plan.target());
        }
        let actions = self.plan.scale(n, now);
        if self.settings.fixed.listener == ListenerMode::Reuseport {
            // The slot sockets of removed slots close here; their retiring
            // workers hold their own copies until they exit.
            self.sockets.truncate(n);
        }
        actions
    }

    /// A graceful stop (TERM, INT, `forkd stop`): /readyz fails at once on
    /// every worker; the drain starts after `shutdown_delay`.
    pub(super) fn begin_stop(&mut self, now: u64, timeout_ms: u64) -> Vec<Action> {
        let delay = self.settings.live.shutdown_delay.as_millis() as u64;
        if self.plan.stop_pending() {
            log::info!("graceful stop requested again: draining now");
        } else if delay > 0 && self.plan.phase() == Phase::Running {
            log::info!(
                "graceful stop requested: /readyz fails now; draining in {delay} ms \
                 (shutdown_delay), for up to {timeout_ms} ms"
            );
        } else {
            log::info!("graceful stop requested (drain up to {timeout_ms} ms)");
        }
        self.systemd.stopping();
        self.board.set_stopping();
        self.plan.stop(now, timeout_ms, delay)
    }

    /// Connections waiting in the listening sockets' accept queues, and
    /// their backlog, summed.
    pub(super) fn accept_queue(&self) -> (u64, u64) {
        self.sockets
            .all()
            .filter_map(|l| sys::accept_queue(l.as_fd()))
            .fold((0, 0), |(q, b), (lq, lb)| (q + lq, b + lb))
    }

    /// SIGUSR1: the log file here, and in every worker the log file and
    /// the access log file.
    fn reopen_logs(&mut self) {
        match self.settings.live.log_file.clone() {
            Some(path) => match redirect_output(&path) {
                Ok(()) => log::info!("reopened log file {}", path.display()),
                Err(e) => log::error!("cannot reopen log file: {e}"),
            },
            None => log::info!("SIGUSR1: no log_file configured; telling the workers"),
        }
        for w in self.plan.workers() {
            let _ = kill(Pid::from_raw(w.pid), Signal::SIGUSR1);
        }
    }

    pub(super) fn reload(&mut self, now: u64) -> Vec<Action> {
        if self.plan.phase() != Phase::Running {
            return Vec::new();
        }
        if self.upgrade.is_some() {
            let error = "an upgrade is in progress; reload when it is done";
            log::warn!("reload refused: {error}");
            return self.refuse_reload(error.into());
        }
        log::info!("reloading the configuration");
        let new = match self.program.reload() {
            Ok(s) => s,
            Err(e) => {
                log::error!("reload failed, the current workers keep serving: {e}");
                return self.refuse_reload(e);
            }
        };
        if new.fixed != self.settings.fixed {
            log::warn!("{} changes take effect at the next start", Fixed::KEYS);
        }
        let log_changed = new.live.log_file != self.settings.live.log_file;
        if new.live.more_counters_of != self.settings.live.more_counters_of {
            self.board.restart_more_counters();
        }
        self.settings.live = new.live;
        self.plan.set_limits(limits(&self.settings.live));
        self.plan.set_recycling(self.settings.live.recycling);
        if log_changed {
            if let Some(path) = &self.settings.live.log_file {
                if let Err(e) = redirect_output(path) {
                    log::error!("{e}");
                }
            }
        }
        self.systemd.reloading();
        // A reload asked for while one runs is folded into it, and so is
        // what it says of the pool's size.
        let folded = self.plan.reloading();
        let mut actions = self.plan.begin_reload(now);
        let workers = self.settings.live.workers;
        let before = self.plan.target();
        if !folded {
            self.resized = None;
        }
        if workers != before {
            log::info!(
                "reload: {before} -> {workers} worker(s), the config's `workers` \
                 (forkd scale lasts until a reload)"
            );
            let from = self.resized.map_or(before, |[from, _]| from);
            self.resized = Some([from, workers]);
            actions.extend(self.scale(workers, now));
        }
        actions
    }

    fn refuse_reload(&mut self, error: String) -> Vec<Action> {
        self.reply_reload(ReloadOutcome {
            workers: None,
            ok: false,
            generation: self.plan.generation(),
            replaced: Vec::new(),
            error: Some(error),
        });
        Vec::new()
    }

    /// A rolling replacement has ended: the one an upgrade runs, or a
    /// reload's.
    fn reload_done(&mut self, mut outcome: ReloadOutcome) {
        if matches!(self.upgrade, Some(Upgrade::Replacing { .. })) {
            return self.upgrade_done(&outcome);
        }
        outcome.workers = self.resized.take();
        if !outcome.ok {
            self.program.abandon_reload();
        }
        self.systemd.ready();
        self.reply_reload(outcome);
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
