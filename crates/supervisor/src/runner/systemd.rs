//! What the supervisor tells systemd: READY=1, STATUS=, RELOADING=1,
//! STOPPING=1 and the watchdog (fed only while a quorum of workers has a
//! fresh heartbeat). Nothing is sent when systemd did not ask for it.

use std::time::Duration;

use super::Supervisor;
use crate::notify::{self, Notifier};
use crate::plan::Phase;
use crate::scoreboard::now_ms;
use crate::Program;

/// The supervisor's side of sd_notify.
pub(crate) struct Systemd {
    notifier: Option<Notifier>,
    /// Half the systemd watchdog interval, and when WATCHDOG=1 is next due.
    watchdog: Option<(Duration, u64)>,
    /// READY=1 has been sent (it crosses an upgrade in the handover).
    pub(crate) sent_ready: bool,
}

impl Systemd {
    pub(crate) fn from_env() -> Self {
        Systemd {
            notifier: Notifier::from_env(),
            watchdog: notify::watchdog_interval().map(|iv| (iv / 2, now_ms())),
            sent_ready: false,
        }
    }

    fn send(&self, msg: &str) {
        if let Some(n) = &self.notifier {
            n.send(msg);
        }
    }

    /// The service is up again after a reload or an upgrade.
    pub(crate) fn ready(&self) {
        self.send("READY=1");
    }

    /// A reload or an upgrade begins (systemd wants the monotonic time).
    pub(crate) fn reloading(&self) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    pub(crate) fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// When WATCHDOG=1 is next due, if systemd watches.
    pub(crate) fn watchdog_due(&self) -> Option<u64> {
        self.watchdog.map(|(_, due)| due)
    }
}

fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0)
}

impl<P: Program> Supervisor<P> {
    /// READY=1 once the first generation is up, STATUS= on changes, and
    /// WATCHDOG=1 while a quorum of workers has a fresh heartbeat.
    pub(super) fn tell_systemd(&mut self, ready: usize, restarts: u64) {
        let systemd = &mut self.systemd;
        let Some(n) = &mut systemd.notifier else {
            return;
        };
        let target = self.plan.target();
        if !systemd.sent_ready && ready >= target && self.plan.phase() == Phase::Running {
            systemd.sent_ready = true;
            n.send("READY=1");
        }
        n.status(format!(
            "{ready}/{target} workers ready, {restarts} restarts, generation {}",
            self.plan.generation()
        ));
        let now = now_ms();
        let Some((every, due)) = &mut systemd.watchdog else {
            return;
        };
        if now < *due {
            return;
        }
        *due = now + every.as_millis() as u64;
        let live = &self.settings.live;
        let fresh_ms = crate::scoreboard::heartbeat_fresh_ms(live.heartbeat_interval);
        let fresh = self
            .plan
            .workers()
            .iter()
            .filter(|w| w.leaving.is_none())
            .filter(|w| now.saturating_sub(self.board.view(w.cell).heartbeat_ms) <= fresh_ms)
            .count();
        let quorum = ((target as f64) * live.watchdog_quorum).ceil().max(1.0) as usize;
        if fresh >= quorum {
            n.send("WATCHDOG=1");
        } else {
            log::warn!(
                "watchdog not fed: {fresh} of {target} workers have a fresh heartbeat (quorum {quorum})"
            );
        }
    }
}
