//! The supervisor's decisions: which worker to start, stop or kill, and
//! when. A pure state machine over events (a child exited, a tick with the
//! scoreboard's view, a signal or CLI request) that answers with actions; the
//! main loop carries them out. Time is passed in as monotonic milliseconds
//! and randomness comes from a seeded generator, so every decision is
//! unit-tested without forking.

mod recycle;
mod reload;
#[cfg(test)]
mod tests;

use crate::backoff::{crash_delay_ms, BACKOFF_MAX_MS};
use recycle::{recycle_due, Recycle};
pub use recycle::{RecycleReason, Recycling, RSS_HOLD_MS};
use reload::Reload;

/// Timing rules, from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// A heartbeat older than this gets the worker killed.
    pub worker_timeout_ms: u64,
    /// A reload's new worker must be ready within this.
    pub startup_timeout_ms: u64,
    /// A draining worker is killed after this.
    pub shutdown_timeout_ms: u64,
}

/// A worker ready this long has proven its slot healthy: the crash count
/// resets, and its next death is respawned at once. A worker that dies
/// sooner (or before it was ever ready) counts as a crash at start.
pub const STABLE_MS: u64 = 1_000;
/// How long past a drain deadline a worker gets before SIGKILL.
const KILL_GRACE_MS: u64 = 1_000;

/// A stop that waits out `shutdown_delay` before the workers drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct PendingStop {
    at_ms: u64,
    timeout_ms: u64,
}

/// A signal the supervisor sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    Term,
    Kill,
}

/// How a reload ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReloadOutcome {
    pub ok: bool,
    pub generation: u64,
    /// (slot, old pid, new pid) for every replaced worker.
    pub replaced: Vec<(usize, i32, i32)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The pool size before and after, when the reload changed it (the
    /// config's `workers` replaces what `forkd scale` set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<[usize; 2]>,
}

/// What the main loop must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Fork a worker for `slot`; then report it with [`Plan::spawned`] or
    /// [`Plan::spawn_failed`].
    Spawn {
        slot: usize,
        generation: u64,
    },
    Signal {
        pid: i32,
        sig: Sig,
    },
    /// A reload finished (or was given up); answer whoever asked.
    ReloadDone(ReloadOutcome),
    /// The worker is about to be killed for a stale heartbeat: log what it
    /// was doing (its cell still holds that).
    Hung {
        slot: usize,
        pid: i32,
        cell: usize,
    },
    /// Every worker is gone after a stop: exit.
    Exit,
}

/// Why the supervisor asked a worker to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Leaving {
    /// Replaced by a newer generation, or scaled away: not respawned.
    Retired,
    /// Its heartbeat went stale: respawned like a crash.
    Hung,
    /// The supervisor is stopping.
    Stopping,
}

/// One worker process as the supervisor knows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Worker {
    pub pid: i32,
    pub slot: usize,
    pub generation: u64,
    /// Its scoreboard cell.
    pub cell: usize,
    pub spawned_ms: u64,
    /// When the supervisor first saw it ready.
    pub ready_ms: Option<u64>,
    pub leaving: Option<Leaving>,
    /// When it gets SIGKILL if still alive.
    pub kill_at_ms: Option<u64>,
    /// Requests after which it is recycled (0: never).
    #[serde(default)]
    pub recycle_after: u64,
    /// Since when its memory has been above `max_rss`.
    #[serde(default)]
    pub rss_over_since_ms: Option<u64>,
    /// Not recycled before this (its last successor failed).
    #[serde(default)]
    pub recycle_not_before_ms: Option<u64>,
}

/// Per-slot bookkeeping that outlives the slot's processes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SlotState {
    /// Deaths in a row of workers that had not proven stable.
    pub failures: u32,
    /// When the next worker is due, if the slot is waiting out a backoff.
    pub respawn_at_ms: Option<u64>,
    /// Unexpected deaths so far.
    pub restarts: u64,
    /// Why the slot's previous worker was replaced.
    #[serde(default)]
    pub last_replaced: Option<String>,
}

/// What the scoreboard says about a worker, read at each tick.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observed {
    pub ready: bool,
    pub heartbeat_ms: u64,
    /// Requests answered so far.
    pub requests: u64,
    /// Resident memory, when recycling by memory is on (else 0).
    pub rss_bytes: u64,
}

/// The supervisor's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Phase {
    Running,
    Stopping,
}

/// The supervisor's state. Serializable, so that an upgrade can hand it to
/// the next image of the supervisor across `exec`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    limits: Limits,
    target: usize,
    generation: u64,
    workers: Vec<Worker>,
    slots: Vec<SlotState>,
    phase: Phase,
    reload: Option<Reload>,
    rng: u64,
    #[serde(default)]
    recycling: Recycling,
    #[serde(default)]
    recycle: Option<Recycle>,
    /// Workers recycled so far, by [`RecycleReason`].
    #[serde(default)]
    recycled: [u64; 3],
    #[serde(default)]
    pending_stop: Option<PendingStop>,
}

impl Plan {
    /// A plan for `target` workers. `seed` drives the backoff jitter.
    pub fn new(target: usize, limits: Limits, seed: u64) -> Self {
        Plan {
            limits,
            target,
            generation: 1,
            workers: Vec::new(),
            slots: vec![SlotState::default(); target],
            phase: Phase::Running,
            reload: None,
            rng: seed | 1,
            recycling: Recycling::default(),
            recycle: None,
            recycled: [0; 3],
            pending_stop: None,
        }
    }

    pub fn workers(&self) -> &[Worker] {
        &self.workers
    }
    pub fn slots(&self) -> &[SlotState] {
        &self.slots
    }
    pub fn target(&self) -> usize {
        self.target
    }
    pub fn generation(&self) -> u64 {
        self.generation
    }
    pub fn phase(&self) -> Phase {
        self.phase
    }
    pub fn reloading(&self) -> bool {
        self.reload.is_some()
    }
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// The first workers.
    pub fn start(&mut self) -> Vec<Action> {
        (0..self.target)
            .map(|slot| Action::Spawn {
                slot,
                generation: self.generation,
            })
            .collect()
    }

    /// A `Spawn` was carried out.
    pub fn spawned(&mut self, slot: usize, generation: u64, pid: i32, cell: usize, now: u64) {
        if let Some(r) = &mut self.recycle {
            if r.slot == slot && r.new_pid == 0 && generation == self.generation {
                r.new_pid = pid;
            }
        }
        let recycle_after = self.draw_request_limit();
        self.workers.push(Worker {
            pid,
            slot,
            generation,
            cell,
            spawned_ms: now,
            ready_ms: None,
            leaving: None,
            kill_at_ms: None,
            recycle_after,
            rss_over_since_ms: None,
            recycle_not_before_ms: None,
        });
    }

    /// A `Spawn` could not be carried out (fork failed, no free cell).
    pub fn spawn_failed(&mut self, slot: usize, generation: u64, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        if self.is_reload_candidate(slot, generation) {
            self.fail_reload(format!("cannot start a worker for slot {slot}"), &mut out);
        } else if self
            .recycle
            .as_ref()
            .is_some_and(|r| r.slot == slot && r.new_pid == 0)
        {
            self.give_up_recycle(now, "its successor could not be started");
        } else {
            self.schedule_respawn(slot, false, now);
        }
        out
    }

    /// A child was reaped. Returns the worker it was, if it was one.
    pub fn child_exited(&mut self, pid: i32, now: u64) -> (Option<Worker>, Vec<Action>) {
        let mut out = Vec::new();
        let Some(i) = self.workers.iter().position(|w| w.pid == pid) else {
            return (None, out);
        };
        let w = self.workers.remove(i);
        if self.recycle.as_ref().is_some_and(|r| r.new_pid == pid) {
            self.give_up_recycle(now, "its successor exited before it was ready");
        }
        if self.phase == Phase::Stopping {
            if self.workers.is_empty() {
                out.push(Action::Exit);
            }
            return (Some(w), out);
        }
        // A reload's new worker that died (or was killed as hung) before it
        // was ready fails the reload. One the reload itself retired does not.
        let was_incoming =
            self.is_reload_candidate(w.slot, w.generation) && w.leaving != Some(Leaving::Retired);
        if was_incoming {
            self.fail_reload(
                format!(
                    "the new worker for slot {} (pid {}) exited before it was ready",
                    w.slot, w.pid
                ),
                &mut out,
            );
        } else if w.leaving != Some(Leaving::Retired) && w.slot < self.target {
            let stable = w
                .ready_ms
                .is_some_and(|r| now.saturating_sub(r) >= STABLE_MS);
            self.slots[w.slot].restarts += 1;
            self.slots[w.slot].last_replaced = Some(match w.leaving {
                Some(Leaving::Hung) => "hung: no heartbeat".into(),
                _ => "exited unexpectedly".into(),
            });
            if !self.slot_has_live_worker(w.slot) {
                self.schedule_respawn(w.slot, stable, now);
                out.extend(self.due_spawns(now));
            }
        }
        self.step_reload(now, &mut out);
        (Some(w), out)
    }

    /// Periodic check: readiness, heartbeats, respawn timers, reload
    /// progress, drain deadlines. `observe` reads a worker's scoreboard cell.
    pub fn tick(&mut self, now: u64, observe: impl Fn(&Worker) -> Observed) -> Vec<Action> {
        let mut out = Vec::new();
        let timeout = self.limits.worker_timeout_ms;
        let mut due = None;
        for w in &mut self.workers {
            let seen = observe(w);
            if seen.ready && w.ready_ms.is_none() {
                w.ready_ms = Some(now);
            }
            let this = recycle_due(w, &seen, &self.recycling, now);
            if due.is_none() && w.slot < self.target {
                due = this;
            }
            if let Some(at) = w.kill_at_ms {
                if now >= at {
                    log::warn!(
                        "worker slot {} pid {} did not exit in time; killing it",
                        w.slot,
                        w.pid
                    );
                    out.push(Action::Signal {
                        pid: w.pid,
                        sig: Sig::Kill,
                    });
                    w.kill_at_ms = None;
                }
            } else if w.leaving.is_none() && now.saturating_sub(seen.heartbeat_ms) > timeout {
                log::error!(
                    "worker slot {} pid {}: no heartbeat for {} ms (worker_timeout {} ms); killing it",
                    w.slot,
                    w.pid,
                    now.saturating_sub(seen.heartbeat_ms),
                    timeout
                );
                w.leaving = Some(Leaving::Hung);
                out.push(Action::Hung {
                    slot: w.slot,
                    pid: w.pid,
                    cell: w.cell,
                });
                out.push(Action::Signal {
                    pid: w.pid,
                    sig: Sig::Kill,
                });
            }
        }
        for (slot, s) in self.slots.iter_mut().enumerate() {
            let stable = self.workers.iter().any(|w| {
                w.slot == slot
                    && w.ready_ms
                        .is_some_and(|r| now.saturating_sub(r) >= STABLE_MS)
            });
            if stable {
                s.failures = 0;
            }
        }
        if self.phase == Phase::Running {
            out.extend(self.due_spawns(now));
            self.step_reload(now, &mut out);
            self.step_recycle(now, due, &mut out);
        } else if let Some(p) = self.pending_stop.filter(|p| now >= p.at_ms) {
            out.extend(self.end_all(now, Sig::Term, p.timeout_ms + KILL_GRACE_MS));
        } else if self.workers.is_empty() {
            out.push(Action::Exit);
        }
        out
    }

    /// The earliest time a tick has something to do, besides the regular
    /// heartbeat checks.
    pub fn next_timer(&self) -> Option<u64> {
        let respawn = self.slots.iter().filter_map(|s| s.respawn_at_ms);
        let kills = self.workers.iter().filter_map(|w| w.kill_at_ms);
        let stop = self.pending_stop.map(|p| p.at_ms);
        respawn.chain(kills).chain(stop).min()
    }

    /// Graceful stop: after `delay_ms` (`shutdown_delay`, while /readyz
    /// fails and the workers keep serving), every worker drains for at most
    /// `timeout_ms`. A second stop during the delay ends it at once.
    pub fn stop(&mut self, now: u64, timeout_ms: u64, delay_ms: u64) -> Vec<Action> {
        let pausing = self.pending_stop.take().is_some();
        if delay_ms == 0 || pausing || self.phase == Phase::Stopping {
            return self.end_all(now, Sig::Term, timeout_ms + KILL_GRACE_MS);
        }
        let mut out = Vec::new();
        self.end_changes(&mut out);
        self.pending_stop = Some(PendingStop {
            at_ms: now + delay_ms,
            timeout_ms,
        });
        if self.workers.is_empty() {
            out.push(Action::Exit);
        }
        out
    }

    /// Whether a stop is waiting out `shutdown_delay`.
    pub fn stop_pending(&self) -> bool {
        self.pending_stop.is_some()
    }

    /// Fast stop: every worker is killed.
    pub fn fast_stop(&mut self, now: u64) -> Vec<Action> {
        self.end_all(now, Sig::Kill, KILL_GRACE_MS)
    }

    /// Enters the stopping phase: a reload in progress is answered, a
    /// recycle forgotten (its successor drains with the rest), respawns
    /// cancelled.
    fn end_changes(&mut self, out: &mut Vec<Action>) {
        if let Some(r) = self.reload.take() {
            out.push(Action::ReloadDone(ReloadOutcome {
                workers: None,
                ok: false,
                generation: r.generation,
                replaced: r.replaced,
                error: Some("forkd is stopping".into()),
            }));
        }
        self.recycle = None;
        self.phase = Phase::Stopping;
        for s in &mut self.slots {
            s.respawn_at_ms = None;
        }
    }

    fn end_all(&mut self, now: u64, sig: Sig, kill_after: u64) -> Vec<Action> {
        let mut out = Vec::new();
        self.pending_stop = None;
        self.end_changes(&mut out);
        for w in &mut self.workers {
            w.leaving = Some(Leaving::Stopping);
            let at = now + kill_after;
            w.kill_at_ms = Some(w.kill_at_ms.map_or(at, |k| k.min(at)));
            out.push(Action::Signal { pid: w.pid, sig });
        }
        if self.workers.is_empty() {
            out.push(Action::Exit);
        }
        out
    }

    /// Sets the number of workers (`forkd scale`, TTIN, TTOU).
    pub fn scale(&mut self, target: usize, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        if self.phase != Phase::Running || target == 0 {
            return out;
        }
        let old = self.target;
        self.target = target;
        if self.slots.len() < target {
            self.slots.resize(target, SlotState::default());
        }
        for slot in target..self.slots.len() {
            self.slots[slot] = SlotState::default();
        }
        self.slots.truncate(target);
        for slot in old..target {
            if !self.slot_has_live_worker(slot) {
                out.push(Action::Spawn {
                    slot,
                    generation: self.generation,
                });
            }
        }
        let drain = self.drain_deadline(now);
        for w in &mut self.workers {
            if w.slot >= target && w.leaving.is_none() {
                w.leaving = Some(Leaving::Retired);
                w.kill_at_ms = Some(drain);
                out.push(Action::Signal {
                    pid: w.pid,
                    sig: Sig::Term,
                });
            }
        }
        if let Some(r) = &mut self.reload {
            r.pending.retain(|&s| s < target);
            // The slot being replaced was scaled away with its new worker.
            if r.current.is_some_and(|(s, _)| s >= target) {
                r.current = None;
            }
        }
        self.step_reload(now, &mut out);
        out
    }

    fn drain_deadline(&self, now: u64) -> u64 {
        now + self.limits.shutdown_timeout_ms + KILL_GRACE_MS
    }

    fn slot_has_live_worker(&self, slot: usize) -> bool {
        self.workers
            .iter()
            .any(|w| w.slot == slot && w.leaving.is_none())
    }

    fn schedule_respawn(&mut self, slot: usize, stable: bool, now: u64) {
        let jitter = self.next_random();
        let s = &mut self.slots[slot];
        let delay = crash_delay_ms(&mut s.failures, stable, jitter, BACKOFF_MAX_MS);
        if delay > 0 {
            log::warn!(
                "slot {slot}: {} crash(es) in a row; next worker in {delay} ms",
                s.failures
            );
        }
        s.respawn_at_ms = Some(now + delay);
    }

    fn due_spawns(&mut self, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        for slot in 0..self.slots.len() {
            if self.slots[slot].respawn_at_ms.is_some_and(|t| t <= now) {
                self.slots[slot].respawn_at_ms = None;
                if !self.slot_has_live_worker(slot) {
                    out.push(Action::Spawn {
                        slot,
                        generation: self.generation,
                    });
                }
            }
        }
        out
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64: jitter only, not security.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}
