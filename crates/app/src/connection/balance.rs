//! Spreading connections over the workers of a shared listener. Every
//! worker is woken for each new connection on a shared socket, and the
//! first one awake takes what is queued: a burst of connections that will
//! last (a load balancer filling its pool, wrk's 64) would run on one core
//! while the others idle. So a worker holding more than its share gives
//! way for a moment, and another worker takes the connection.
//!
//! Connections that come and go (a new one per request) are left to the
//! race: they even out by themselves, and a pause per accept only adds
//! latency and wakeups (it cost 20 % of the TLS handshake rate).

use std::time::{Duration, Instant};

use crate::state::State;

/// How long a worker over its share waits before it takes a queued
/// connection, and how many times at most: a slow peer, or one that cannot
/// accept (out of file descriptors), delays a connection by 4 pauses at
/// most (each 1-2 ms: tokio's timer rounds up to its next tick).
pub(crate) const GIVE_WAY: Duration = Duration::from_millis(1);
pub(crate) const GIVE_WAY_TRIES: usize = 4;

/// The window in which accepts are counted to tell churn from a burst.
const WINDOW: Duration = Duration::from_millis(100);

/// A worker's recent accepts (on all of its shared listeners, as its
/// connection count covers them all).
pub(crate) struct Balance {
    window_start: Instant,
    this_window: u64,
    last_window: u64,
}

impl Balance {
    pub(crate) fn new() -> Self {
        Balance {
            window_start: Instant::now(),
            this_window: 0,
            last_window: 0,
        }
    }

    /// One connection accepted.
    pub(crate) fn accepted(&mut self) {
        self.roll();
        self.this_window += 1;
    }

    fn roll(&mut self) {
        let elapsed = self.window_start.elapsed();
        if elapsed >= WINDOW {
            self.last_window = if elapsed >= 2 * WINDOW {
                0
            } else {
                self.this_window
            };
            self.this_window = 0;
            self.window_start = Instant::now();
        }
    }

    /// Whether to let another worker take the next connection.
    pub(crate) fn give_way(&mut self, state: &State) -> bool {
        self.roll();
        let mine = state.connections.load(std::sync::atomic::Ordering::Relaxed);
        over_share(mine, self.last_window, || {
            state.host.fewest_connections_elsewhere()
        })
    }
}

/// The rule: more connections than the least busy other worker by more
/// than an eighth of one's own, while they last (fewer were accepted in
/// the last window than are open now).
fn over_share(mine: u64, accepted_lately: u64, fewest: impl FnOnce() -> Option<u64>) -> bool {
    mine > 0 && accepted_lately <= mine && fewest().is_some_and(|f| mine > f + mine / 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_gives_way_only_over_its_share_of_lasting_connections() {
        // Alone, or with nobody ready: never.
        assert!(!over_share(30, 0, || None));
        // Even, or within an eighth: no.
        assert!(!over_share(0, 0, || Some(0)));
        assert!(!over_share(1, 0, || Some(1)));
        assert!(!over_share(33, 0, || Some(30)));
        // One more than an idle peer, or well over a busy one: yes.
        assert!(over_share(1, 0, || Some(0)));
        assert!(over_share(2, 1, || Some(1)));
        assert!(over_share(40, 0, || Some(30)));
        // Connections coming and going faster than they stay: no.
        assert!(!over_share(20, 250, || Some(5)));
    }

    #[test]
    fn accepts_are_counted_per_window() {
        let mut b = Balance::new();
        b.accepted();
        b.accepted();
        assert_eq!((b.this_window, b.last_window), (2, 0));
        b.window_start -= WINDOW;
        b.roll();
        assert_eq!((b.this_window, b.last_window), (0, 2));
        // A quiet spell longer than a window forgets them.
        b.accepted();
        b.window_start -= 3 * WINDOW;
        b.roll();
        assert_eq!((b.this_window, b.last_window), (0, 0));
    }
}
