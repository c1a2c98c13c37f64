//! The requests a worker has in flight, for forensics: their number and
//! the oldest of them are published in the scoreboard cell as each one
//! starts and ends, so that when the event loop stalls, what it was doing
//! is already there for the supervisor to log.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::Host;

/// The longest "METHOD path" kept (the scoreboard holds 64 bytes).
const WHAT_LEN: usize = 64;

struct Entry {
    started_ms: u64,
    what: String,
    id: String,
}

#[derive(Default)]
struct Open {
    next: u64,
    /// By start order: the first is the oldest.
    entries: BTreeMap<u64, Entry>,
}

pub(crate) struct InFlight {
    host: Arc<dyn Host>,
    open: Mutex<Open>,
}

/// Removes its request from [`InFlight`] when dropped: when the answer is
/// sent, and also when the client goes away and the handler is dropped.
pub(crate) struct Running {
    owner: Arc<InFlight>,
    key: u64,
}

impl InFlight {
    pub(crate) fn new(host: Arc<dyn Host>) -> Arc<Self> {
        Arc::new(InFlight {
            host,
            open: Mutex::new(Open::default()),
        })
    }

    pub(crate) fn enter(self: &Arc<Self>, method: &str, path: &str, id: &str) -> Running {
        let mut what = format!("{method} {path}");
        if what.len() > WHAT_LEN {
            let mut end = WHAT_LEN;
            while !what.is_char_boundary(end) {
                end -= 1;
            }
            what.truncate(end);
        }
        let entry = Entry {
            started_ms: self.host.now_ms(),
            what,
            id: id.to_owned(),
        };
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let key = open.next;
        open.next += 1;
        open.entries.insert(key, entry);
        self.publish(&open, open.entries.len() == 1);
        Running {
            owner: self.clone(),
            key,
        }
    }

    /// Publishes the count, and the oldest request when it changed.
    fn publish(&self, open: &Open, oldest_changed: bool) {
        let n = open.entries.len() as u64;
        if !oldest_changed {
            self.host.set_in_flight_count(n);
            return;
        }
        let oldest = open
            .entries
            .values()
            .next()
            .map(|e| (e.started_ms, e.what.as_str(), e.id.as_str()));
        self.host.set_in_flight(n, oldest);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock().unwrap_or_else(|e| e.into_inner());
        let was_oldest = open.entries.keys().next() == Some(&self.key);
        open.entries.remove(&self.key);
        self.owner.publish(&open, was_oldest);
    }
}
