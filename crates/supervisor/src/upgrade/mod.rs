//! Binary upgrades by re-executing in place, never blindly. The supervisor
//! keeps its pid (so systemd keeps tracking it, and its workers and
//! redis-server stay its children):
//!
//! 1. `forkd upgrade` / USR2 opens the binary on disk and runs it as a
//!    probe (`probe`): it must read the handover and accept the
//!    configuration within `startup_timeout`. Anything else refuses the
//!    upgrade; nothing has changed.
//! 2. Only then the supervisor executes that same open file in place. The
//!    listening sockets, pidfile lock, control socket, scoreboard memfd and
//!    waiting CLI connections cross the `exec` as open descriptors, the rest
//!    of the state as a versioned envelope and payload in a memfd
//!    (`handover`).
//! 3. The new image reads the envelope first; any failure from there on
//!    (an unreadable payload, a resume that fails, workers that never become
//!    ready) executes the previous binary again, kept open as a descriptor,
//!    and the old workers keep serving.

mod handover;
mod legacy;
mod probe;

use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

pub use handover::{take, Inherited};
pub use probe::{answer as probe_answer, read_request as probe_request};

use crate::control::{Awaiting, Conn, Reply, UpgradeOutcome};
use crate::control_files::{pidfile_path, Pidfile};
use crate::plan::{Phase, ReloadOutcome};
use crate::runner::{limits, Supervisor};
use crate::scoreboard::{now_ms, Scoreboard};
use crate::signals::Signals;
use crate::{Error, ListenerMode, Program, Settings};
use handover::{Envelope, Payload, Transport};
use probe::Probe;

/// The variables that carry upgrade state (removed from the environment by
/// [`take`]; never passed to a child).
pub(crate) const VARS: [&str; 2] = [handover::FD_VAR, legacy::VAR];

/// Where an upgrade stands.
pub(crate) enum Upgrade {
    /// The new binary is being probed; nothing has changed yet.
    Probing(Probe),
    /// This (new) image replaces the workers; the previous binary stays
    /// open for a rollback.
    Replacing {
        previous_exe: Option<OwnedFd>,
        previous_build: String,
        /// The previous binary reads only the first handover format.
        legacy: bool,
        /// The payload version the previous binary wrote, so reads.
        previous_payload: u32,
    },
}

/// The binary this process was started from (resolved at start, before
/// anything can replace it).
pub(crate) fn exe_path() -> Option<PathBuf> {
    std::env::current_exe().ok()
}

impl<P: Program> Supervisor<P> {
    /// `forkd upgrade` / SIGUSR2: probe the binary on disk.
    pub(crate) fn start_upgrade(&mut self, conn: Option<usize>) {
        let refuse = |sup: &mut Self, message: String| {
            log::error!("upgrade refused: {message}");
            if let Some(i) = conn {
                let _ = sup.conns[i].send(&Reply::Error { message });
            }
        };
        if self.plan.phase() != Phase::Running {
            return refuse(self, "forkd is stopping".into());
        }
        if self.plan.reloading() || self.upgrade.is_some() {
            return refuse(self, "a reload or upgrade is in progress".into());
        }
        let Some(exe) = self.exe.clone() else {
            return refuse(self, "cannot tell which binary this process runs".into());
        };
        if let Some(i) = conn {
            self.conns[i].awaiting = Some(Awaiting::Upgrade);
        }
        let started = self.handover_text(None, None, None).and_then(|text| {
            Probe::start(
                &exe,
                &text,
                &self.env,
                now_ms(),
                self.settings.live.startup_timeout.as_millis() as u64,
            )
        });
        match started {
            Ok(p) => {
                log::info!("upgrade: probing {} (pid {})", exe.display(), p.pid);
                self.upgrade = Some(Upgrade::Probing(p));
            }
            Err(e) => self.refuse_upgrade(e),
        }
    }

    fn refuse_upgrade(&mut self, reason: String) {
        log::error!("upgrade refused, the current workers keep serving: {reason}");
        self.reply_upgrade(UpgradeOutcome {
            ok: false,
            from_build: self.settings.fixed.build.clone(),
            to_build: String::new(),
            replaced: Vec::new(),
            error: Some(reason),
        });
    }

    /// The probe's descriptor to wait on, and when it runs out of time.
    pub(crate) fn probe_wait(&self) -> Option<(Option<BorrowedFd<'_>>, u64)> {
        match &self.upgrade {
            Some(Upgrade::Probing(p)) => Some((p.output_fd(), p.deadline_ms)),
            _ => None,
        }
    }

    /// A reaped child that was the probe. Returns whether it was.
    pub(crate) fn probe_exited(&mut self, pid: i32, code: i32, how: &str) -> bool {
        match &mut self.upgrade {
            Some(Upgrade::Probing(p)) if p.pid == pid => {
                p.exited = Some((code, how.to_owned()));
                true
            }
            _ => false,
        }
    }

    /// Carries on with a probe under way: once it has a verdict, executes
    /// the new binary or refuses the upgrade.
    pub(crate) fn check_probe(&mut self) {
        let Some(Upgrade::Probing(p)) = &mut self.upgrade else {
            return;
        };
        let verdict = if self.plan.phase() != Phase::Running {
            p.kill();
            Err("forkd is stopping".to_owned())
        } else {
            match p.verdict(now_ms()) {
                Some(v) => v,
                None => return,
            }
        };
        let Some(Upgrade::Probing(probe)) = self.upgrade.take() else {
            return;
        };
        match verdict {
            Ok(build) => self.exec_upgrade(probe, &build),
            Err(e) => self.refuse_upgrade(e),
        }
    }

    /// The point of no return: executes the probed binary in place.
    fn exec_upgrade(&mut self, probe: Probe, build: &str) {
        let previous = match std::fs::File::open("/proc/self/exe") {
            Ok(f) => OwnedFd::from(f),
            Err(e) => return self.refuse_upgrade(format!("cannot open the running binary: {e}")),
        };
        log::info!(
            "upgrade: {} answered the probe as build {build}; executing it",
            probe.path.display()
        );
        self.systemd.reloading();
        let path = handover::fd_path(probe.image.as_raw_fd());
        let why = self.exec_image(
            &path,
            None,
            Some(&previous),
            Some(&probe.image),
            false,
            &self.args.clone(),
        );
        // Still here: the exec failed, and this image carries on.
        self.systemd.ready();
        self.refuse_upgrade(format!("cannot execute {}: {why}", probe.path.display()));
    }

    /// The handover as this image would pass it now.
    fn state(
        &self,
        rollback: Option<String>,
        previous_exe: Option<&OwnedFd>,
        image: Option<&OwnedFd>,
        args: &[String],
    ) -> Result<(Envelope, Payload), String> {
        let pidfile = self.pidfile.as_ref().ok_or("no pidfile")?;
        let envelope = Envelope {
            format: handover::FORMAT,
            payload: handover::PAYLOAD,
            rollback,
            previous_exe: previous_exe.map(|f| f.as_raw_fd()),
            previous_build: self.settings.fixed.build.clone(),
            exe: self.exe.clone(),
            args: args.to_vec(),
            env: self.env.clone(),
            image: image.map(|f| f.as_raw_fd()),
        };
        let payload = Payload {
            listeners: self.listeners.iter().map(|l| l.as_raw_fd()).collect(),
            pidfile: pidfile.fd().as_raw_fd(),
            control: self.control.as_raw_fd(),
            scoreboard: self.board.fd().as_raw_fd(),
            scoreboard_cells: self.board.cells(),
            redis_pid: self.redis.as_ref().and_then(|r| r.pid),
            plan: self.plan.clone(),
            started_ms: self.started_ms,
            sent_ready: self.systemd.sent_ready,
            waiting: self.waiting_upgrade().map(|c| c.as_raw_fd()).collect(),
        };
        Ok((envelope, payload))
    }

    fn handover_text(
        &self,
        rollback: Option<String>,
        previous_exe: Option<&OwnedFd>,
        image: Option<&OwnedFd>,
    ) -> Result<String, String> {
        let (envelope, payload) = self.state(rollback, previous_exe, image, &self.args)?;
        handover::encode(&envelope, &handover::encode_payload(&payload)?)
    }

    fn waiting_upgrade(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.conns
            .iter()
            .filter(|c| c.awaiting == Some(Awaiting::Upgrade))
            .map(|c| c.stream.as_fd())
    }

    /// Hands everything to a new image of this process. Returns why not,
    /// with close-on-exec restored, when the exec fails.
    fn exec_image(
        &mut self,
        path: &str,
        rollback: Option<String>,
        previous_exe: Option<&OwnedFd>,
        image: Option<&OwnedFd>,
        legacy: bool,
        args: &[String],
    ) -> String {
        let (envelope, payload) = match self.state(rollback, previous_exe, image, args) {
            Ok(s) => s,
            Err(e) => return e,
        };
        let text = if legacy {
            legacy::encode(&envelope, &payload)
        } else {
            handover::encode_payload(&payload).and_then(|p| handover::encode(&envelope, &p))
        };
        let text = match text {
            Ok(t) => t,
            Err(e) => return e,
        };
        let state = if legacy {
            Transport::Legacy(&text)
        } else {
            Transport::Memfd(&text)
        };
        let Some(pidfile) = &self.pidfile else {
            return "no pidfile".into();
        };
        let mut passed: Vec<BorrowedFd<'_>> = self.listeners.iter().map(|l| l.as_fd()).collect();
        passed.extend([self.control.as_fd(), self.board.fd(), pidfile.fd()]);
        passed.extend(self.waiting_upgrade());
        passed.extend(previous_exe.map(|f| f.as_fd()));
        passed.extend(image.map(|f| f.as_fd()));
        handover::exec(path, state, args, &self.env, &passed)
    }

    pub(crate) fn reply_upgrade(&mut self, outcome: UpgradeOutcome) {
        for c in &mut self.conns {
            if c.awaiting == Some(Awaiting::Upgrade) {
                c.awaiting = None;
                let _ = c.send(&Reply::Upgrade(outcome.clone()));
            }
        }
    }

    /// The rolling replacement that an upgrade runs has ended: report it,
    /// or go back to the previous binary.
    pub(crate) fn upgrade_done(&mut self, outcome: &ReloadOutcome) {
        let Some(Upgrade::Replacing {
            previous_exe,
            previous_build,
            legacy,
            previous_payload,
        }) = self.upgrade.take()
        else {
            return;
        };
        if outcome.ok {
            log::info!(
                "upgrade from build {previous_build} to build {} done: {} worker(s) replaced",
                self.settings.fixed.build,
                outcome.replaced.len()
            );
            self.systemd.ready();
            self.reply_upgrade(UpgradeOutcome {
                ok: true,
                from_build: previous_build,
                to_build: self.settings.fixed.build.clone(),
                replaced: outcome.replaced.clone(),
                error: None,
            });
            return;
        }
        let reason = outcome
            .error
            .clone()
            .unwrap_or_else(|| "the new workers did not become ready".into());
        let mut error = reason.clone();
        // A stop ended the replacement: carry on stopping here (the
        // workers' signals follow this outcome), never execute anything.
        let stopping = self.plan.phase() != Phase::Running;
        // A previous binary that reads another payload version cannot take
        // this state; this build keeps the workers (old and new) instead.
        let readable = legacy || previous_payload == handover::PAYLOAD;
        if stopping || !readable {
            let why = if stopping {
                "forkd is stopping".to_owned()
            } else {
                format!(
                    "the previous binary reads upgrade state version {previous_payload}, \
                     not {}, so this build cannot go back to it",
                    handover::PAYLOAD
                )
            };
            error = format!("{error}; {why}");
        } else if let Some(previous) = previous_exe {
            log::error!(
                "upgrade to build {} failed: {reason}; going back to build {previous_build}",
                self.settings.fixed.build
            );
            let path = handover::fd_path(previous.as_raw_fd());
            let args = self.args.clone();
            // The previous binary is executed through `previous`, which the
            // envelope names as its image, so that it closes it. The first
            // format has no such field: there the descriptor stays
            // close-on-exec (an ELF binary runs through /proc/self/fd/N even
            // so), so that it does not leak into the old image.
            let image = (!legacy).then_some(&previous);
            let why = self.exec_image(&path, Some(reason), None, image, legacy, &args);
            error = format!("{error}; cannot go back to the previous binary: {why}");
        }
        log::error!(
            "upgrade failed: {error}; build {} keeps running",
            self.settings.fixed.build
        );
        if !stopping {
            self.systemd.ready();
        }
        self.reply_upgrade(UpgradeOutcome {
            ok: false,
            from_build: previous_build,
            to_build: self.settings.fixed.build.clone(),
            replaced: Vec::new(),
            error: Some(error),
        });
    }
}

/// Continues where the previous image of this process left off: an upgrade
/// (replace every worker with one of this binary) or a rollback (keep the
/// workers, report the failure). Any error before the supervisor runs goes
/// back to the previous binary with the handover as it came.
pub(crate) fn resume<P: Program>(
    settings: Settings,
    program: P,
    inherited: Inherited,
) -> Result<(), Error> {
    let build = settings.fixed.build.clone();
    let mut sup = match adopt(settings, program, &inherited) {
        Ok(s) => s,
        Err(e) => {
            let why = inherited.roll_back(&e.to_string(), &build);
            log::error!("cannot resume after the upgrade ({e}) nor go back: {why}");
            return Err(e);
        }
    };
    let envelope = inherited.envelope.clone();
    inherited.release();
    match envelope.rollback {
        Some(reason) => {
            log::error!(
                "upgrade to build {} failed and was rolled back; the previous workers keep serving: {reason}",
                envelope.previous_build
            );
            sup.reply_upgrade(UpgradeOutcome {
                ok: false,
                from_build: sup.settings.fixed.build.clone(),
                to_build: envelope.previous_build.clone(),
                replaced: Vec::new(),
                error: Some(format!(
                    "{reason}; rolled back from build {} to build {}",
                    envelope.previous_build, sup.settings.fixed.build
                )),
            });
            sup.systemd.ready();
        }
        None => {
            log::info!(
                "upgraded from build {} to build {}: replacing the workers",
                envelope.previous_build,
                sup.settings.fixed.build
            );
            let actions = sup.plan.begin_reload(now_ms());
            sup.execute(actions);
        }
    }
    sup.finish()
}

/// Builds the supervisor from the handover's descriptors (copies of them:
/// the originals stay open for a rollback until the resume succeeds).
fn adopt<P: Program>(
    mut settings: Settings,
    program: P,
    inherited: &Inherited,
) -> Result<Supervisor<P>, Error> {
    let h = inherited
        .payload
        .as_ref()
        .map_err(|e| Error::Upgrade(e.clone()))?;
    #[cfg(feature = "failpoints")]
    if std::env::var("FORKD_FAILPOINTS").is_ok_and(|v| v.split(',').any(|p| p.trim() == "handover"))
    {
        return Err(Error::Upgrade(
            "failpoint handover: this build rejects the upgrade state".into(),
        ));
    }
    let sys_err = |what: &'static str| move |source| Error::Sys { what, source };
    let take = |fd| {
        inherited
            .adopt(fd)
            .map_err(sys_err("an inherited descriptor"))
    };
    let mut listeners = Vec::new();
    for fd in &h.listeners {
        listeners.push(TcpListener::from(take(*fd)?));
    }
    if listeners.len() > 1 {
        settings.fixed.listener = ListenerMode::Reuseport;
    }
    let listen_addr = listeners
        .first()
        .ok_or_else(|| Error::Upgrade("the upgrade state names no listening socket".into()))?
        .local_addr()
        .map_err(|e| Error::Bind(settings.fixed.listen, e))?;
    let control = UnixListener::from(take(h.control)?);
    control
        .set_nonblocking(true)
        .map_err(|e| Error::file(&settings.fixed.runtime_dir, e))?;
    let board = Scoreboard::adopt(take(h.scoreboard)?, h.scoreboard_cells)
        .map_err(sys_err("mmap for the scoreboard"))?;
    let signals = Signals::new().map_err(sys_err("signalfd"))?;
    let mut conns = Vec::new();
    for fd in &h.waiting {
        if let Ok(mut c) = Conn::new(UnixStream::from(take(*fd)?)) {
            c.awaiting = Some(Awaiting::Upgrade);
            conns.push(c);
        }
    }
    let mut redis = settings
        .fixed
        .redis
        .clone()
        .map(crate::redis::RedisChild::new);
    if let (Some(r), Some(pid)) = (&mut redis, h.redis_pid) {
        r.adopt(pid);
    }
    let mut plan = h.plan.clone();
    plan.set_limits(limits(&settings.live));
    let e = &inherited.envelope;
    let upgrade = match e.rollback {
        Some(_) => None,
        None => Some(Upgrade::Replacing {
            previous_exe: e.previous_exe.map(take).transpose()?,
            previous_build: e.previous_build.clone(),
            legacy: inherited.legacy.is_some(),
            previous_payload: e.payload,
        }),
    };
    // Last: nix's Flock unlocks on drop, and the lock belongs to the open
    // file the original descriptor shares, so an error after this would
    // hand the pidfile to anyone before the rollback takes it back.
    let pidfile = Pidfile::adopt(
        &pidfile_path(&settings.fixed.runtime_dir, &settings.fixed.instance),
        take(h.pidfile)?,
    )?;
    let mut sup = Supervisor::new(
        settings,
        program,
        crate::runner::Parts {
            pidfile,
            listeners,
            listen_addr,
            control,
            board,
            signals,
            plan,
            redis,
            started_ms: h.started_ms,
        },
    );
    sup.conns = conns;
    sup.systemd.sent_ready = h.sent_ready;
    sup.exe = e.exe.clone().or(sup.exe);
    sup.args = e.args.clone();
    sup.env = e.env.clone();
    sup.upgrade = upgrade;
    Ok(sup)
}
