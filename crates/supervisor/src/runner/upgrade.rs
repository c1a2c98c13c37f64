//! The running supervisor's side of an upgrade: probe the binary on disk,
//! execute it in place with the handover, report the outcome, and go back
//! to the previous binary when the new workers never become ready. The
//! resume in the new image is in `start.rs`; the mechanism in
//! [`crate::upgrade`].

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use super::Supervisor;
use crate::control::{Awaiting, Reply, UpgradeOutcome};
use crate::plan::{Phase, ReloadOutcome};
use crate::scoreboard::now_ms;
use crate::upgrade::format::{self, Envelope, Payload};
use crate::upgrade::handover::{self, Transport};
use crate::upgrade::legacy;
use crate::upgrade::probe::Probe;
use crate::Program;

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
            format: format::FORMAT,
            payload: format::PAYLOAD,
            rollback,
            previous_exe: previous_exe.map(|f| f.as_raw_fd()),
            previous_build: self.settings.fixed.build.clone(),
            exe: self.exe.clone(),
            args: args.to_vec(),
            env: self.env.clone(),
            image: image.map(|f| f.as_raw_fd()),
        };
        let payload = Payload {
            listeners: self.sockets.all().map(|l| l.as_raw_fd()).collect(),
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
        format::encode(&envelope, &format::encode_payload(&payload)?)
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
            format::encode_payload(&payload).and_then(|p| format::encode(&envelope, &p))
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
        let mut passed: Vec<BorrowedFd<'_>> = self.sockets.all().map(|l| l.as_fd()).collect();
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
        let readable = legacy || previous_payload == format::PAYLOAD;
        if stopping || !readable {
            let why = if stopping {
                "forkd is stopping".to_owned()
            } else {
                format!(
                    "the previous binary reads upgrade state version {previous_payload}, \
                     not {}, so this build cannot go back to it",
                    format::PAYLOAD
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
