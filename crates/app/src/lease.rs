//! Leased limits (`lease = K` on a policy): when a request finds no cell
//! of its bucket in this worker, the limiter's one all-or-nothing call
//! takes up to K cells of it from Redis (fewer near the limit, see the
//! `limits!` script) and the worker spends the rest itself, with no Redis
//! call, for at most a second, and never past the moment Redis stops
//! counting the cells it took (the bucket's state then, `reset`): a cell
//! spent later would be one the bucket no longer holds against anyone.
//! What is left at the end goes back to Redis (as much of it as Redis
//! still counts), as it does when the worker stops.
//!
//! Cells are taken in Redis before they are spent, so the limit is never
//! exceeded across workers and hosts. The price is early refusals: while
//! other workers hold cells a client could have had, it may be refused
//! up to workers x (K - 1) requests before the limit (less near it, where
//! leases shrink), for at most a lease's lifetime. The `RateLimit`
//! remaining of a leased policy is what Redis had left when the lease
//! was taken, plus what this worker still holds.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use forkd_store::{Decision, Limit};

struct Lease {
    cells: u32,
    until: Instant,
    limit: Limit,
    uid: Option<String>,
    /// Left in Redis when it was taken.
    remaining: u64,
    /// Until when Redis counts what this lease took (the bucket's state
    /// right after it).
    reset_at: Instant,
}

/// This worker's leases, by bucket.
#[derive(Default)]
pub(crate) struct Leases {
    held: Mutex<HashMap<String, Lease>>,
}

/// The lease key of a limit's bucket (`uid`: the session's user).
pub(crate) fn key(l: &Limit, uid: Option<&str>) -> String {
    format!("{}\n{:?}\n{}", l.policy_name, l.bucket, uid.unwrap_or(""))
}

impl Leases {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spends a cell of the lease under `key`, if one is held and live:
    /// the decision to answer with.
    pub(crate) fn spend(&self, key: &str, now: Instant) -> Option<Decision> {
        let mut held = self.lock();
        let lease = held.get_mut(key).filter(|l| l.cells > 0 && now < l.until)?;
        lease.cells -= 1;
        Some(Decision {
            allowed: true,
            remaining: lease.remaining + u64::from(lease.cells),
            reset: lease.reset_at.saturating_duration_since(now),
            retry_after: Duration::ZERO,
            cells: 1,
        })
    }

    /// Puts back a cell spent for a request that another limit refused.
    pub(crate) fn unspend(&self, key: &str) {
        if let Some(l) = self.lock().get_mut(key) {
            l.cells += 1;
        }
    }

    /// Keeps the cells a call took beyond the one its request spends
    /// (none when it took one). An older lease of the key, past its time,
    /// is replaced: what it still held is not given back (an early
    /// refusal at worst, never one request too many).
    pub(crate) fn keep(&self, key: String, limit: &Limit, uid: Option<&str>, d: &Decision) {
        if d.cells <= 1 {
            return;
        }
        let now = Instant::now();
        let lifetime = limit.policy.window.min(Duration::from_secs(1)).min(d.reset);
        self.lock().insert(
            key,
            Lease {
                cells: d.cells - 1,
                until: now + lifetime,
                limit: limit.clone(),
                uid: uid.map(str::to_owned),
                remaining: d.remaining,
                reset_at: now + d.reset,
            },
        );
    }

    /// Takes out the leases past their lifetime (all of them with
    /// `all`): (limit, user, cells to give back) of each with any left
    /// that Redis still counts (the cells' share of the time until
    /// `reset_at`: what has run out there is not given back twice).
    pub(crate) fn ended(&self, now: Instant, all: bool) -> Vec<(Limit, Option<String>, u32)> {
        let mut held = self.lock();
        let over: Vec<String> = held
            .iter()
            .filter(|(_, l)| all || now >= l.until)
            .map(|(k, _)| k.clone())
            .collect();
        over.into_iter()
            .filter_map(|k| held.remove(&k))
            .filter_map(|l| {
                let p = l.limit.policy;
                let emission = p.window.as_secs_f64() / f64::from(p.limit.max(1));
                let counted = l.reset_at.saturating_duration_since(now).as_secs_f64();
                let back = l.cells.min((counted / emission).floor() as u32);
                (back > 0).then_some((l.limit, l.uid, back))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkd_store::{Bucket, Policy};

    fn limit() -> Limit {
        Limit {
            policy_name: "p".into(),
            policy: Policy {
                limit: 100,
                window: Duration::from_secs(60),
                lease: 8,
            },
            bucket: Bucket::User { scope: "".into() },
            want: 8,
        }
    }

    fn taken(cells: u32) -> Decision {
        Decision {
            allowed: true,
            remaining: 50,
            reset: Duration::from_secs(10),
            retry_after: Duration::ZERO,
            cells,
        }
    }

    #[test]
    fn a_lease_ends_when_redis_stops_counting_its_cells() {
        let leases = Leases::default();
        let l = limit();
        let k = key(&l, None);
        let mut short = taken(8);
        short.reset = Duration::from_millis(100);
        leases.keep(k.clone(), &l, None, &short);
        assert!(leases.spend(&k, Instant::now()).is_some());
        let at = Instant::now() + Duration::from_millis(150);
        assert!(leases.spend(&k, at).is_none(), "spent after Redis let go");
    }

    #[test]
    fn a_lease_is_spent_cell_by_cell_then_is_empty() {
        let leases = Leases::default();
        let l = limit();
        let k = key(&l, Some("u1"));
        assert_ne!(k, key(&l, Some("u2")));
        assert!(leases.spend(&k, Instant::now()).is_none());
        leases.keep(k.clone(), &l, Some("u1"), &taken(4));
        let spent: Vec<u64> = (0..3)
            .map(|_| leases.spend(&k, Instant::now()).unwrap().remaining)
            .collect();
        assert_eq!(spent, [52, 51, 50]);
        assert!(leases.spend(&k, Instant::now()).is_none());
        leases.unspend(&k);
        assert!(leases.spend(&k, Instant::now()).is_some());
        // An empty lease goes back with nothing to give.
        assert!(leases.ended(Instant::now(), true).is_empty());
    }

    #[test]
    fn what_is_left_goes_back_when_the_lease_ends() {
        let leases = Leases::default();
        let l = limit();
        let k = key(&l, None);
        leases.keep(k.clone(), &l, None, &taken(8));
        assert!(leases.spend(&k, Instant::now()).is_some());
        assert!(leases.ended(Instant::now(), false).is_empty());
        let later = Instant::now() + Duration::from_secs(2);
        assert!(leases.spend(&k, later).is_none(), "spent past its time");
        // 2 s into the 10 s that Redis counts 8 cells of 0.6 s each for:
        // what is left of that, not more than the 6 held.
        let back = leases.ended(later, false);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].2, 6);
        assert!(leases.ended(later, true).is_empty());
        // Past what Redis counts, nothing goes back.
        leases.keep(k.clone(), &l, None, &taken(8));
        assert!(leases
            .ended(Instant::now() + Duration::from_secs(11), true)
            .is_empty());
    }
}
