//! The one crash backoff policy, for the workers' slots (in [`crate::plan`])
//! and the managed redis-server (in `redis`): the same curve, each with its
//! own cap and its own proof of stability, for the reasons given where
//! those are defined.

/// First respawn delay after a crash at start; doubles per crash.
pub const BACKOFF_BASE_MS: u64 = 100;
/// Longest respawn delay of a worker slot.
pub const BACKOFF_MAX_MS: u64 = 30_000;

/// The delay before the next start. `failures` counts deaths in a row. A
/// death after a stable run (each caller says what proves stability)
/// resets the count and is answered at once; any other waits
/// [`backoff_ms`].
pub fn crash_delay_ms(failures: &mut u32, stable: bool, random: u64, max_ms: u64) -> u64 {
    if stable {
        *failures = 0;
    }
    *failures += 1;
    if stable {
        0
    } else {
        backoff_ms(*failures, random, max_ms)
    }
}

/// Delay after the `failures`-th crash in a row: 100 ms doubling to
/// `max_ms`, spread by up to ±20 % so that slots crashing together do not
/// restart in lockstep.
pub fn backoff_ms(failures: u32, random: u64, max_ms: u64) -> u64 {
    let exp = failures.saturating_sub(1).min(20);
    let base = (BACKOFF_BASE_MS << exp).min(max_ms);
    let spread = base / 5;
    base - spread + random % (2 * spread + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        assert_eq!(backoff_ms(1, 0, BACKOFF_MAX_MS), 80);
        assert_eq!(backoff_ms(1, 40, BACKOFF_MAX_MS), 120);
        assert!(backoff_ms(40, 7, BACKOFF_MAX_MS) <= BACKOFF_MAX_MS * 6 / 5);
        assert!(backoff_ms(40, 7, BACKOFF_MAX_MS) >= BACKOFF_MAX_MS * 4 / 5);
    }
}
