//! The rate limiter's fallback while Redis cannot answer: a per-worker,
//! in-memory GCRA with the policy's limit divided among the workers, so
//! brute-force protection holds (roughly) through an outage.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use forkd_store::{Decision, Policy};

/// Keys kept at most; past this, expired entries are dropped and, if still
/// full, new keys are refused (fail closed), so memory stays bounded.
const MAX_KEYS: usize = 100_000;

pub(crate) struct LocalLimiter {
    /// Theoretical arrival time per key.
    tat: Mutex<HashMap<String, Instant>>,
}

impl LocalLimiter {
    pub(crate) fn new() -> Self {
        LocalLimiter {
            tat: Mutex::new(HashMap::new()),
        }
    }

    /// One GCRA step for `key` with `policy.limit / share` (at least 1).
    pub(crate) fn check(&self, key: &str, policy: Policy, share: usize) -> Decision {
        let emission = emission(policy, share);
        let now = Instant::now();
        let mut map = self.tat.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_KEYS && !map.contains_key(key) {
            map.retain(|_, t| *t > now);
            if map.len() >= MAX_KEYS {
                return Decision {
                    allowed: false,
                    remaining: 0,
                    reset: policy.window,
                    retry_after: Duration::from_secs(1),
                    cells: 0,
                };
            }
        }
        let tat = map.get(key).copied().filter(|t| *t > now).unwrap_or(now);
        let new_tat = tat + emission;
        let allow_at = new_tat.checked_sub(policy.window).unwrap_or(now);
        if now < allow_at {
            return Decision {
                allowed: false,
                remaining: 0,
                reset: tat - now,
                retry_after: allow_at - now,
                cells: 0,
            };
        }
        map.insert(key.to_owned(), new_tat);
        let spare = (now - allow_at).as_nanos() / emission.as_nanos().max(1);
        Decision {
            allowed: true,
            remaining: spare as u64,
            reset: new_tat - now,
            retry_after: Duration::ZERO,
            cells: 1,
        }
    }

    /// Gives back what one `check` of `key` took.
    pub(crate) fn refund(&self, key: &str, policy: Policy, share: usize) {
        let emission = emission(policy, share);
        let mut map = self.tat.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = map.get_mut(key) {
            *t = t.checked_sub(emission).unwrap_or(*t);
        }
    }
}

/// The time one request takes of a policy's `limit / share` (at least 1).
fn emission(policy: Policy, share: usize) -> Duration {
    let limit = (policy.limit as usize).div_ceil(share.max(1)).max(1) as u32;
    policy.window / limit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_limit_over_share_then_denies() {
        let l = LocalLimiter::new();
        let p = Policy {
            limit: 10,
            window: Duration::from_secs(60),
            lease: 1,
        };
        let allowed = (0..10).filter(|_| l.check("k", p, 2).allowed).count();
        assert_eq!(allowed, 5);
        let d = l.check("k", p, 2);
        assert!(!d.allowed && d.retry_after > Duration::ZERO);
        assert!(l.check("other", p, 2).allowed);
        assert!(
            l.check("k", p, 100).retry_after > Duration::ZERO,
            "at least 1"
        );
    }

    #[test]
    fn a_refund_gives_a_place_back() {
        let l = LocalLimiter::new();
        let p = Policy {
            limit: 2,
            window: Duration::from_secs(60),
            lease: 1,
        };
        for _ in 0..10 {
            assert!(l.check("k", p, 1).allowed);
            l.refund("k", p, 1);
        }
        assert!(l.check("k", p, 1).allowed);
        assert!(l.check("k", p, 1).allowed);
        assert!(!l.check("k", p, 1).allowed);
    }
}
