//! Recycling: a worker replaced for its own sake (requests, memory, age),
//! its successor ready before it drains, one slot at a time.

use super::{Action, Leaving, Observed, Plan, Sig, Worker};

/// Replacing a worker for its own sake, its successor ready first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Recycling {
    /// Requests after which a worker is replaced (0: never), plus a random
    /// share of `max_requests_jitter`, chosen per worker.
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    /// Resident memory above which a worker is replaced (0: never), once
    /// it has stayed above for [`RSS_HOLD_MS`]; it must fall below 90 % of
    /// this to be forgiven.
    pub max_rss_bytes: u64,
    /// Time after which a worker is replaced (0: never).
    pub max_age_ms: u64,
}

/// Why a worker was recycled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecycleReason {
    MaxRequests,
    MaxRss,
    MaxAge,
}

impl RecycleReason {
    pub const ALL: [RecycleReason; 3] = [
        RecycleReason::MaxRequests,
        RecycleReason::MaxRss,
        RecycleReason::MaxAge,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RecycleReason::MaxRequests => "max_requests",
            RecycleReason::MaxRss => "max_rss",
            RecycleReason::MaxAge => "max_age",
        }
    }

    pub(super) fn index(self) -> usize {
        self as usize
    }
}

/// How long a worker's memory must stay above `max_rss` before it is
/// recycled: one sample over the line is not enough.
pub const RSS_HOLD_MS: u64 = 1_000;

/// After a recycle whose successor failed, the worker is left alone this
/// long before it is tried again.
pub(super) const RECYCLE_RETRY_MS: u64 = 10_000;

/// A recycle in progress: one slot at a time.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct Recycle {
    pub(super) slot: usize,
    pub(super) old_pid: i32,
    /// 0 until the spawn is reported.
    pub(super) new_pid: i32,
    pub(super) reason: RecycleReason,
    /// What made it due, for status and the log.
    pub(super) why: String,
    /// The successor must be ready by then.
    pub(super) deadline_ms: u64,
}

/// Whether `w` is due for recycling, and why. Updates its memory
/// bookkeeping (the hysteresis) as a side effect.
pub(super) fn recycle_due(
    w: &mut Worker,
    seen: &Observed,
    rules: &Recycling,
    now: u64,
) -> Option<(i32, RecycleReason, String)> {
    if rules.max_rss_bytes > 0 {
        if seen.rss_bytes > rules.max_rss_bytes {
            w.rss_over_since_ms.get_or_insert(now);
        } else if seen.rss_bytes < rules.max_rss_bytes / 10 * 9 {
            w.rss_over_since_ms = None;
        }
    }
    let ready = w.ready_ms?;
    if w.leaving.is_some() || w.recycle_not_before_ms.is_some_and(|t| now < t) {
        return None;
    }
    if w.recycle_after > 0 && seen.requests >= w.recycle_after {
        let why = format!("max_requests: {} requests", seen.requests);
        return Some((w.pid, RecycleReason::MaxRequests, why));
    }
    if w.rss_over_since_ms
        .is_some_and(|t| now.saturating_sub(t) >= RSS_HOLD_MS)
    {
        let why = format!("max_rss: {} MiB resident", seen.rss_bytes >> 20);
        return Some((w.pid, RecycleReason::MaxRss, why));
    }
    if rules.max_age_ms > 0 && now.saturating_sub(ready) >= rules.max_age_ms {
        let why = format!("max_age: up {} s", now.saturating_sub(w.spawned_ms) / 1000);
        return Some((w.pid, RecycleReason::MaxAge, why));
    }
    None
}

impl Plan {
    /// Sets the recycling rules; each worker draws its request limit anew.
    pub fn set_recycling(&mut self, r: Recycling) {
        self.recycling = r;
        for i in 0..self.workers.len() {
            self.workers[i].recycle_after = self.draw_request_limit();
        }
    }

    pub fn recycling(&self) -> Recycling {
        self.recycling
    }

    /// Workers recycled so far, by [`RecycleReason::ALL`].
    pub fn recycled(&self) -> [u64; 3] {
        self.recycled
    }

    /// The slot being recycled now, and why.
    pub fn recycling_now(&self) -> Option<(usize, &str)> {
        self.recycle.as_ref().map(|r| (r.slot, r.why.as_str()))
    }

    pub(super) fn draw_request_limit(&mut self) -> u64 {
        let r = self.recycling;
        if r.max_requests == 0 {
            return 0;
        }
        let jitter = match r.max_requests_jitter {
            0 => 0,
            j => self.next_random() % (j + 1),
        };
        r.max_requests.saturating_add(jitter)
    }

    /// Starts, advances or ends the one recycle: a due worker gets a
    /// successor in its slot, and drains only once that one is ready.
    pub(super) fn step_recycle(
        &mut self,
        now: u64,
        due: Option<(i32, RecycleReason, String)>,
        out: &mut Vec<Action>,
    ) {
        if self.reload.is_some() {
            return;
        }
        let Some(r) = &self.recycle else {
            let Some((pid, reason, why)) = due else {
                return;
            };
            let Some(w) = self.workers.iter().find(|w| w.pid == pid) else {
                return;
            };
            let slot = w.slot;
            log::info!("worker slot {slot} pid {pid}: recycling ({why}); starting its successor");
            self.recycle = Some(Recycle {
                slot,
                old_pid: pid,
                new_pid: 0,
                reason,
                why,
                deadline_ms: now + self.limits.startup_timeout_ms,
            });
            out.push(Action::Spawn {
                slot,
                generation: self.generation,
            });
            return;
        };
        if r.new_pid == 0 {
            return;
        }
        let successor = self
            .workers
            .iter()
            .find(|w| w.pid == r.new_pid && w.leaving.is_none());
        match successor {
            Some(new) if new.ready_ms.is_some() => {
                let r = self.recycle.take().expect("recycle is running");
                self.retire_pid(r.old_pid, now, out);
                self.recycled[r.reason.index()] += 1;
                if let Some(s) = self.slots.get_mut(r.slot) {
                    s.last_replaced = Some(format!("recycled: {}", r.why));
                }
                log::info!(
                    "worker slot {} recycled ({}): pid {} -> {}",
                    r.slot,
                    r.why,
                    r.old_pid,
                    r.new_pid
                );
            }
            Some(_) if now >= r.deadline_ms => {
                let ms = self.limits.startup_timeout_ms;
                let pid = r.new_pid;
                self.give_up_recycle(now, &format!("its successor was not ready within {ms} ms"));
                self.retire_pid(pid, now, out);
            }
            Some(_) => {}
            // Scaled away, or retired by a stop.
            None => self.recycle = None,
        }
    }

    /// Ends the recycle in progress without replacing its worker, which is
    /// left alone for a while.
    pub(super) fn give_up_recycle(&mut self, now: u64, why: &str) {
        let Some(r) = self.recycle.take() else { return };
        log::warn!(
            "worker slot {} pid {}: recycle ({}) given up: {why}; the worker keeps serving",
            r.slot,
            r.old_pid,
            r.why
        );
        if let Some(w) = self.workers.iter_mut().find(|w| w.pid == r.old_pid) {
            w.recycle_not_before_ms = Some(now + RECYCLE_RETRY_MS);
        }
    }

    /// Asks a worker to go, if it is still there and not already going.
    pub(super) fn retire_pid(&mut self, pid: i32, now: u64, out: &mut Vec<Action>) {
        let drain = self.drain_deadline(now);
        if let Some(w) = self
            .workers
            .iter_mut()
            .find(|w| w.pid == pid && pid != 0 && w.leaving.is_none())
        {
            w.leaving = Some(Leaving::Retired);
            w.kill_at_ms = Some(drain);
            out.push(Action::Signal {
                pid: w.pid,
                sig: Sig::Term,
            });
        }
    }
}
