//! The supervisor's decisions: which worker to start, stop or kill, and
//! when. A pure state machine over events (a child exited, a tick with the
//! scoreboard's view, a signal or CLI request) that answers with actions; the
//! main loop carries them out. Time is passed in as monotonic milliseconds
//! and randomness comes from a seeded generator, so every decision is
//! unit-tested without forking.

use std::collections::VecDeque;

use crate::backoff::{crash_delay_ms, BACKOFF_MAX_MS};

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
}

/// What the scoreboard says about a worker, read at each tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    pub ready: bool,
    pub heartbeat_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Reload {
    generation: u64,
    pending: VecDeque<usize>,
    /// The slot being replaced now and the deadline of its new worker.
    current: Option<(usize, u64)>,
    replaced: Vec<(usize, i32, i32)>,
    /// Another reload was asked for while this one ran.
    again: bool,
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
        self.workers.push(Worker {
            pid,
            slot,
            generation,
            cell,
            spawned_ms: now,
            ready_ms: None,
            leaving: None,
            kill_at_ms: None,
        });
    }

    /// A `Spawn` could not be carried out (fork failed, no free cell).
    pub fn spawn_failed(&mut self, slot: usize, generation: u64, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        if self.is_reload_candidate(slot, generation) {
            self.fail_reload(format!("cannot start a worker for slot {slot}"), &mut out);
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
        for w in &mut self.workers {
            let seen = observe(w);
            if seen.ready && w.ready_ms.is_none() {
                w.ready_ms = Some(now);
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
        respawn.chain(kills).min()
    }

    /// Graceful stop: every worker drains for at most `timeout_ms`.
    pub fn stop(&mut self, now: u64, timeout_ms: u64) -> Vec<Action> {
        self.end_all(now, Sig::Term, timeout_ms + KILL_GRACE_MS)
    }

    /// Fast stop: every worker is killed.
    pub fn fast_stop(&mut self, now: u64) -> Vec<Action> {
        self.end_all(now, Sig::Kill, KILL_GRACE_MS)
    }

    fn end_all(&mut self, now: u64, sig: Sig, kill_after: u64) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(r) = self.reload.take() {
            out.push(Action::ReloadDone(ReloadOutcome {
                ok: false,
                generation: r.generation,
                replaced: r.replaced,
                error: Some("forkd is stopping".into()),
            }));
        }
        self.phase = Phase::Stopping;
        for s in &mut self.slots {
            s.respawn_at_ms = None;
        }
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

    /// Starts a rolling replacement with a new generation. The caller has
    /// already loaded the new config successfully.
    pub fn begin_reload(&mut self, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        if self.phase != Phase::Running {
            return out;
        }
        if let Some(r) = &mut self.reload {
            r.again = true;
            return out;
        }
        self.generation += 1;
        self.reload = Some(Reload {
            generation: self.generation,
            pending: (0..self.target).collect(),
            current: None,
            replaced: Vec::new(),
            again: false,
        });
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

    fn is_reload_candidate(&self, slot: usize, generation: u64) -> bool {
        self.reload.as_ref().is_some_and(|r| {
            r.generation == generation && r.current.is_some_and(|(s, _)| s == slot)
        })
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

    fn fail_reload(&mut self, error: String, out: &mut Vec<Action>) {
        let Some(r) = self.reload.take() else { return };
        log::error!("reload to generation {} abandoned: {error}", r.generation);
        // The new worker, if still alive, goes; the old ones keep serving.
        for w in &mut self.workers {
            if w.generation == r.generation && w.leaving.is_none() {
                if let Some((slot, _)) = r.current {
                    if w.slot == slot {
                        w.leaving = Some(Leaving::Retired);
                        out.push(Action::Signal {
                            pid: w.pid,
                            sig: Sig::Kill,
                        });
                    }
                }
            }
        }
        out.push(Action::ReloadDone(ReloadOutcome {
            ok: false,
            generation: r.generation,
            replaced: r.replaced,
            error: Some(error),
        }));
    }

    fn step_reload(&mut self, now: u64, out: &mut Vec<Action>) {
        loop {
            let Some(r) = &mut self.reload else { return };
            let generation = r.generation;
            if let Some((slot, deadline)) = r.current {
                let incoming = self
                    .workers
                    .iter()
                    .find(|w| w.slot == slot && w.generation == generation && w.leaving.is_none());
                match incoming {
                    Some(new) if new.ready_ms.is_some() => {
                        let new_pid = new.pid;
                        let drain = self.drain_deadline(now);
                        let mut old_pids = Vec::new();
                        for w in &mut self.workers {
                            if w.slot == slot && w.generation < generation && w.leaving.is_none() {
                                w.leaving = Some(Leaving::Retired);
                                w.kill_at_ms = Some(drain);
                                old_pids.push(w.pid);
                                out.push(Action::Signal {
                                    pid: w.pid,
                                    sig: Sig::Term,
                                });
                            }
                        }
                        let r = self.reload.as_mut().expect("reload is running");
                        for old in old_pids {
                            r.replaced.push((slot, old, new_pid));
                        }
                        r.current = None;
                    }
                    Some(_) if now >= deadline => {
                        let ms = self.limits.startup_timeout_ms;
                        self.fail_reload(
                            format!("the new worker for slot {slot} was not ready within {ms} ms"),
                            out,
                        );
                        return;
                    }
                    Some(_) => return,
                    None => {
                        // Spawn not yet reported, or failed and already handled.
                        return;
                    }
                }
            }
            let r = self.reload.as_mut().expect("reload is running");
            match r.pending.pop_front() {
                Some(slot) => {
                    let current_gen = self
                        .workers
                        .iter()
                        .filter(|w| w.slot == slot && w.leaving.is_none())
                        .map(|w| w.generation)
                        .max();
                    match current_gen {
                        // Already of the new generation (respawned after the
                        // reload began), or in backoff: nothing to replace.
                        Some(g) if g >= generation => continue,
                        None => continue,
                        Some(_) => {
                            r.current = Some((slot, now + self.limits.startup_timeout_ms));
                            out.push(Action::Spawn { slot, generation });
                            return;
                        }
                    }
                }
                None => {
                    let r = self.reload.take().expect("reload is running");
                    log::info!(
                        "reload to generation {} done: {} worker(s) replaced",
                        r.generation,
                        r.replaced.len()
                    );
                    out.push(Action::ReloadDone(ReloadOutcome {
                        ok: true,
                        generation: r.generation,
                        replaced: r.replaced,
                        error: None,
                    }));
                    if r.again {
                        out.extend(self.begin_reload(now));
                    }
                    return;
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        worker_timeout_ms: 2_000,
        startup_timeout_ms: 3_000,
        shutdown_timeout_ms: 5_000,
    };

    /// Carries out Spawn actions with made-up pids.
    struct Harness {
        plan: Plan,
        next_pid: i32,
        ready: Vec<i32>,
        heartbeat: u64,
    }

    impl Harness {
        fn new(n: usize) -> Self {
            let mut h = Harness {
                plan: Plan::new(n, LIMITS, 42),
                next_pid: 100,
                ready: Vec::new(),
                heartbeat: 0,
            };
            let a = h.plan.start();
            h.apply(a, 0);
            h
        }
        fn apply(&mut self, actions: Vec<Action>, now: u64) -> Vec<Action> {
            let mut rest = Vec::new();
            for a in actions {
                match a {
                    Action::Spawn { slot, generation } => {
                        self.next_pid += 1;
                        self.plan.spawned(slot, generation, self.next_pid, 0, now);
                    }
                    other => rest.push(other),
                }
            }
            rest
        }
        fn tick(&mut self, now: u64) -> Vec<Action> {
            let ready = self.ready.clone();
            let hb = self.heartbeat;
            let a = self.plan.tick(now, |w| Observed {
                ready: ready.contains(&w.pid),
                heartbeat_ms: hb.max(w.spawned_ms),
            });
            self.apply(a, now)
        }
        fn pids(&self) -> Vec<i32> {
            self.plan.workers().iter().map(|w| w.pid).collect()
        }
        fn all_ready(&mut self) {
            self.ready = self.pids();
        }
    }

    #[test]
    fn starts_one_worker_per_slot() {
        let h = Harness::new(3);
        let slots: Vec<_> = h.plan.workers().iter().map(|w| w.slot).collect();
        assert_eq!(slots, vec![0, 1, 2]);
    }

    #[test]
    fn stable_worker_is_respawned_at_once() {
        let mut h = Harness::new(2);
        h.all_ready();
        h.heartbeat = 10_000;
        h.tick(1_000);
        let (w, a) = h.plan.child_exited(101, 10_000);
        assert_eq!(w.unwrap().slot, 0);
        assert_eq!(
            a,
            vec![Action::Spawn {
                slot: 0,
                generation: 1
            }]
        );
        assert_eq!(h.plan.slots()[0].restarts, 1);
    }

    #[test]
    fn crash_loop_backs_off_exponentially_and_recovers() {
        let mut h = Harness::new(1);
        let mut now = 0;
        let mut delays = Vec::new();
        for _ in 0..6 {
            let pid = h.pids()[0];
            let (_, a) = h.plan.child_exited(pid, now);
            assert!(a.is_empty(), "no immediate respawn after a crash at start");
            let due = h.plan.next_timer().unwrap();
            delays.push(due - now);
            assert!(h.tick(due - 1).is_empty());
            now = due;
            h.heartbeat = now;
            assert!(h.tick(now).is_empty());
            assert_eq!(h.plan.workers().len(), 1);
        }
        for pair in delays.windows(2) {
            assert!(pair[1] > pair[0], "delays grow: {delays:?}");
        }
        assert!(delays[0] >= 80 && delays[0] <= 120, "{delays:?}");
        // Once a worker stays ready long enough, the count resets.
        h.all_ready();
        h.heartbeat = now + STABLE_MS;
        h.tick(now + 1);
        h.tick(now + 1 + STABLE_MS);
        assert_eq!(h.plan.slots()[0].failures, 0);
    }

    #[test]
    fn stale_heartbeat_kills_and_respawns() {
        let mut h = Harness::new(2);
        h.all_ready();
        h.heartbeat = 0;
        // 101's heartbeat goes stale; 102 keeps beating.
        let a = h.plan.tick(2_500, |w| Observed {
            ready: true,
            heartbeat_ms: if w.pid == 101 { 0 } else { 2_400 },
        });
        assert_eq!(
            a,
            vec![Action::Signal {
                pid: 101,
                sig: Sig::Kill
            }]
        );
        let (_, a) = h.plan.child_exited(101, 2_600);
        assert!(
            matches!(a[..], [] | [Action::Spawn { slot: 0, .. }]),
            "{a:?}"
        );
    }

    #[test]
    fn reload_replaces_one_slot_at_a_time() {
        let mut h = Harness::new(2);
        h.all_ready();
        h.heartbeat = 100;
        h.tick(100);
        let a = h.plan.begin_reload(200);
        let a = h.apply(a, 200);
        assert!(a.is_empty());
        assert_eq!(h.pids(), vec![101, 102, 103]);
        // Not ready yet: nothing is stopped.
        assert!(h.tick(300).is_empty());
        h.ready.push(103);
        let a = h.tick(400);
        assert_eq!(
            a,
            vec![Action::Signal {
                pid: 101,
                sig: Sig::Term
            }]
        );
        assert_eq!(h.pids(), vec![101, 102, 103, 104]);
        h.plan.child_exited(101, 450);
        h.ready.push(104);
        let a = h.tick(500);
        assert_eq!(a.len(), 2);
        assert_eq!(
            a[0],
            Action::Signal {
                pid: 102,
                sig: Sig::Term
            }
        );
        let Action::ReloadDone(out) = &a[1] else {
            panic!("{a:?}")
        };
        assert!(out.ok);
        assert_eq!(out.replaced, vec![(0, 101, 103), (1, 102, 104)]);
        // A retired worker's exit is not respawned.
        let (_, a) = h.plan.child_exited(102, 600);
        assert!(a.is_empty());
        assert_eq!(h.plan.generation(), 2);
    }

    #[test]
    fn reload_gives_up_when_new_worker_is_never_ready() {
        let mut h = Harness::new(2);
        h.all_ready();
        let a = h.plan.begin_reload(0);
        h.apply(a, 0);
        h.heartbeat = 3_000;
        let a = h.tick(3_000);
        assert_eq!(
            a[0],
            Action::Signal {
                pid: 103,
                sig: Sig::Kill
            }
        );
        let Action::ReloadDone(out) = &a[1] else {
            panic!("{a:?}")
        };
        assert!(!out.ok);
        let (_, a) = h.plan.child_exited(103, 3_100);
        assert!(a.is_empty(), "the failed new worker is not respawned");
        assert!(h.plan.workers().iter().all(|w| w.leaving.is_none()));
    }

    #[test]
    fn reload_fails_when_new_worker_dies() {
        let mut h = Harness::new(1);
        h.all_ready();
        let a = h.plan.begin_reload(0);
        h.apply(a, 0);
        let (_, a) = h.plan.child_exited(102, 50);
        assert!(matches!(&a[..], [Action::ReloadDone(o)] if !o.ok), "{a:?}");
        assert_eq!(h.pids(), vec![101]);
    }

    #[test]
    fn reload_fails_when_new_worker_hangs_before_ready() {
        let mut h = Harness::new(1);
        h.all_ready();
        h.heartbeat = 0;
        let a = h.plan.begin_reload(0);
        h.apply(a, 0);
        // The old worker keeps beating; the new one never does.
        let a = h.plan.tick(2_500, |w| Observed {
            ready: w.pid == 101,
            heartbeat_ms: if w.pid == 101 { 2_400 } else { 0 },
        });
        assert_eq!(
            a,
            vec![Action::Signal {
                pid: 102,
                sig: Sig::Kill
            }]
        );
        let (_, a) = h.plan.child_exited(102, 2_600);
        assert!(matches!(&a[..], [Action::ReloadDone(o)] if !o.ok), "{a:?}");
        assert!(!h.plan.reloading());
    }

    #[test]
    fn scaling_away_the_slot_being_reloaded_finishes_the_reload() {
        let mut h = Harness::new(2);
        h.all_ready();
        h.heartbeat = 1_000;
        h.tick(10);
        let a = h.plan.begin_reload(10);
        h.apply(a, 10);
        h.ready.push(103);
        let a = h.tick(20);
        assert_eq!(
            a,
            vec![Action::Signal {
                pid: 101,
                sig: Sig::Term
            }]
        );
        // Slot 1's replacement (104) is starting; scale slot 1 away.
        let a = h.plan.scale(1, 30);
        assert!(
            a.iter().any(|a| matches!(a, Action::ReloadDone(o) if o.ok)),
            "{a:?}"
        );
        assert!(!h.plan.reloading());
    }

    #[test]
    fn scale_up_and_down() {
        let mut h = Harness::new(2);
        let a = h.plan.scale(3, 0);
        assert_eq!(
            a,
            vec![Action::Spawn {
                slot: 2,
                generation: 1
            }]
        );
        h.apply(a, 0);
        let a = h.plan.scale(1, 10);
        assert_eq!(
            a,
            vec![
                Action::Signal {
                    pid: 102,
                    sig: Sig::Term
                },
                Action::Signal {
                    pid: 103,
                    sig: Sig::Term
                }
            ]
        );
        let (_, a) = h.plan.child_exited(102, 20);
        assert!(a.is_empty());
        assert_eq!(h.plan.target(), 1);
    }

    #[test]
    fn stop_drains_then_kills_then_exits() {
        let mut h = Harness::new(2);
        let a = h.plan.stop(0, 5_000);
        assert_eq!(a.len(), 2);
        assert!(h.tick(5_000).is_empty());
        let a = h.tick(6_000);
        assert_eq!(a.len(), 2, "{a:?}");
        assert!(a
            .iter()
            .all(|a| matches!(a, Action::Signal { sig: Sig::Kill, .. })));
        h.plan.child_exited(101, 6_100);
        let (_, a) = h.plan.child_exited(102, 6_100);
        assert_eq!(a, vec![Action::Exit]);
    }

    #[test]
    fn no_respawn_while_stopping() {
        let mut h = Harness::new(1);
        h.plan.stop(0, 1_000);
        let (_, a) = h.plan.child_exited(101, 10);
        assert_eq!(a, vec![Action::Exit]);
    }
}
