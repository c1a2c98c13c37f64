//! At most one log line a second for a kind of event, with a count of the
//! lines left out: a Redis outage under load must not write one warning
//! per request.

use std::sync::Mutex;
use std::time::{Duration, Instant};

const EVERY: Duration = Duration::from_secs(1);

#[derive(Default)]
pub(crate) struct LogGate {
    /// When the last line was let through, and how many were held back
    /// since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogGate {
    /// Whether a line may be logged now; if so, how many were held back
    /// since the last one.
    pub(crate) fn pass(&self) -> Option<u64> {
        self.pass_at(Instant::now())
    }

    /// Logs `line` at warn when a line may be logged now, with how many
    /// lines of its `kind` (plural) were held back since the last one.
    pub(crate) fn warn(&self, line: std::fmt::Arguments<'_>, kind: &str) {
        match self.pass() {
            Some(0) => log::warn!("{line}"),
            Some(held) => log::warn!("{line} ({held} more {kind} since the last line)"),
            None => {}
        }
    }

    fn pass_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.0 {
            Some(last) if now.duration_since(last) < EVERY => {
                s.1 += 1;
                None
            }
            _ => {
                let held = s.1;
                *s = (Some(now), 0);
                Some(held)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_with_a_count() {
        let g = LogGate::default();
        let t = Instant::now();
        assert_eq!(g.pass_at(t), Some(0));
        for i in 1..100 {
            assert_eq!(g.pass_at(t + Duration::from_millis(i * 5)), None);
        }
        assert_eq!(g.pass_at(t + Duration::from_millis(1000)), Some(99));
        assert_eq!(g.pass_at(t + Duration::from_millis(1500)), None);
        assert_eq!(g.pass_at(t + Duration::from_millis(2500)), Some(1));
    }
}
