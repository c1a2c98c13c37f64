//! The plan's decisions, without forking: made-up pids and times.

use super::*;
use crate::plan::recycle::RECYCLE_RETRY_MS;

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
    /// Requests and resident bytes by pid.
    requests: std::collections::HashMap<i32, u64>,
    rss: std::collections::HashMap<i32, u64>,
}

impl Harness {
    fn new(n: usize) -> Self {
        let mut h = Harness {
            plan: Plan::new(n, LIMITS, 42),
            next_pid: 100,
            ready: Vec::new(),
            heartbeat: 0,
            requests: Default::default(),
            rss: Default::default(),
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
        let (requests, rss) = (&self.requests, &self.rss);
        let a = self.plan.tick(now, |w| Observed {
            ready: ready.contains(&w.pid),
            heartbeat_ms: hb.max(w.spawned_ms),
            requests: requests.get(&w.pid).copied().unwrap_or(0),
            rss_bytes: rss.get(&w.pid).copied().unwrap_or(0),
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
        ..Default::default()
    });
    assert_eq!(
        a,
        vec![
            Action::Hung {
                slot: 0,
                pid: 101,
                cell: 0
            },
            Action::Signal {
                pid: 101,
                sig: Sig::Kill
            }
        ]
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
        ..Default::default()
    });
    assert!(matches!(a[0], Action::Hung { pid: 102, .. }), "{a:?}");
    assert_eq!(
        a[1..],
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
    let a = h.plan.stop(0, 5_000, 0);
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
    h.plan.stop(0, 1_000, 0);
    let (_, a) = h.plan.child_exited(101, 10);
    assert_eq!(a, vec![Action::Exit]);
}

fn terms(a: &[Action]) -> Vec<i32> {
    a.iter()
        .filter_map(|a| match a {
            Action::Signal {
                pid,
                sig: Sig::Term,
            } => Some(*pid),
            _ => None,
        })
        .collect()
}

#[test]
fn shutdown_delay_waits_before_the_drain_and_a_second_stop_ends_it() {
    let mut h = Harness::new(2);
    h.all_ready();
    h.heartbeat = 100_000;
    let a = h.plan.stop(0, 5_000, 3_000);
    assert!(a.is_empty(), "nobody is signalled during the delay: {a:?}");
    assert!(h.plan.stop_pending());
    assert_eq!(h.plan.phase(), Phase::Stopping);
    assert_eq!(h.plan.next_timer(), Some(3_000));
    assert!(h.tick(2_999).is_empty());
    let a = h.tick(3_000);
    assert_eq!(terms(&a), vec![101, 102]);
    assert!(!h.plan.stop_pending());
    // Again, with a second stop during the delay.
    let mut h = Harness::new(1);
    assert!(h.plan.stop(0, 5_000, 3_000).is_empty());
    assert_eq!(terms(&h.plan.stop(10, 5_000, 3_000)), vec![101]);
}

fn recycling(max_requests: u64, max_rss_bytes: u64, max_age_ms: u64) -> Recycling {
    Recycling {
        max_requests,
        max_requests_jitter: 0,
        max_rss_bytes,
        max_age_ms,
    }
}

/// Ticks until the recycle of the worker `old` is over; the successor
/// is made ready when it appears. Returns the successor's pid.
fn recycle_through(h: &mut Harness, old: i32, mut now: u64) -> (i32, u64) {
    let before = h.pids();
    let a = h.tick(now);
    assert!(
        terms(&a).is_empty(),
        "the old worker stays until its successor is ready"
    );
    let new = *h
        .pids()
        .iter()
        .find(|p| !before.contains(p))
        .expect("a successor");
    assert!(h
        .plan
        .workers()
        .iter()
        .any(|w| w.pid == old && w.leaving.is_none()));
    now += 100;
    assert!(h.tick(now).is_empty(), "not ready yet: nothing happens");
    h.ready.push(new);
    now += 100;
    let a = h.tick(now);
    assert_eq!(terms(&a), vec![old]);
    (new, now)
}

#[test]
fn max_requests_recycles_one_slot_at_a_time_successor_first() {
    let mut h = Harness::new(2);
    h.plan.set_recycling(recycling(1_000, 0, 0));
    h.all_ready();
    h.heartbeat = u64::MAX / 2;
    h.tick(10);
    h.requests.insert(101, 1_000);
    h.requests.insert(102, 5_000);
    let (new, now) = recycle_through(&mut h, 101, 100);
    // Only then the second slot, which was due all along.
    let (new2, _) = recycle_through(&mut h, 102, now + 100);
    assert_ne!(new, new2);
    assert_eq!(h.plan.recycled(), [2, 0, 0]);
    let last = h.plan.slots()[0].last_replaced.clone().unwrap();
    assert!(last.contains("max_requests"), "{last}");
    assert_eq!(h.plan.slots()[0].restarts, 0, "a recycle is no restart");
}

#[test]
fn jitter_spreads_the_request_limits() {
    let mut h = Harness::new(8);
    h.plan.set_recycling(Recycling {
        max_requests_jitter: 500,
        ..recycling(1_000, 0, 0)
    });
    let limits: std::collections::BTreeSet<u64> =
        h.plan.workers().iter().map(|w| w.recycle_after).collect();
    assert!(limits.len() > 1, "{limits:?}");
    assert!(
        limits.iter().all(|l| (1_000..=1_500).contains(l)),
        "{limits:?}"
    );
}

#[test]
fn max_rss_needs_a_held_excess_and_forgives_only_well_below() {
    let mib = 1 << 20;
    let mut h = Harness::new(1);
    h.plan.set_recycling(recycling(0, 100 * mib, 0));
    h.all_ready();
    h.heartbeat = u64::MAX / 2;
    h.tick(0);
    h.rss.insert(101, 101 * mib);
    assert!(h.tick(100).is_empty());
    // Just under the line is not enough to be forgiven...
    h.rss.insert(101, 95 * mib);
    assert!(h.tick(600).is_empty());
    h.rss.insert(101, 101 * mib);
    assert_eq!(h.pids(), vec![101]);
    // ...so the excess has lasted since 100.
    let before = h.pids();
    h.tick(100 + RSS_HOLD_MS);
    assert_eq!(h.pids().len(), before.len() + 1, "a successor started");
    // Below 90 % resets the clock.
    let mut h = Harness::new(1);
    h.plan.set_recycling(recycling(0, 100 * mib, 0));
    h.all_ready();
    h.heartbeat = u64::MAX / 2;
    h.rss.insert(101, 101 * mib);
    h.tick(0);
    h.rss.insert(101, 80 * mib);
    h.tick(500);
    h.rss.insert(101, 101 * mib);
    h.tick(600);
    assert_eq!(h.pids(), vec![101], "the clock started again at 600");
    h.tick(600 + RSS_HOLD_MS);
    assert_eq!(h.pids().len(), 2);
}

#[test]
fn max_age_recycles_and_a_failed_successor_leaves_the_worker_alone() {
    let mut h = Harness::new(1);
    h.plan.set_recycling(recycling(0, 0, 5_000));
    h.all_ready();
    h.heartbeat = u64::MAX / 2;
    h.tick(0);
    assert!(h.tick(4_999).is_empty());
    h.tick(5_000);
    let new = h.pids()[1];
    // The successor dies before it is ready: the old one keeps serving,
    // is not respawned, and is not tried again at once.
    let (_, a) = h.plan.child_exited(new, 5_100);
    assert!(a.is_empty(), "{a:?}");
    assert_eq!(h.pids(), vec![101]);
    assert!(h.tick(5_200).is_empty());
    assert_eq!(h.pids(), vec![101]);
    h.tick(5_100 + RECYCLE_RETRY_MS);
    assert_eq!(h.pids().len(), 2, "tried again later");
}

#[test]
fn a_reload_takes_over_from_a_recycle() {
    let mut h = Harness::new(1);
    h.plan.set_recycling(recycling(10, 0, 0));
    h.all_ready();
    h.heartbeat = u64::MAX / 2;
    h.requests.insert(101, 10);
    h.tick(0);
    let successor = h.pids()[1];
    let a = h.plan.begin_reload(100);
    assert!(terms(&a).contains(&successor), "{a:?}");
    assert!(h.plan.recycling_now().is_none());
}
