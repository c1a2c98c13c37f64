//! The requests a worker has in flight, for forensics: their number and
//! the oldest of them are published in the scoreboard cell as each one
//! starts and ends, so that when the event loop stalls, what it was doing
//! is already there for the supervisor to log.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::Host;

/// The longest "METHOD path" kept (the scoreboard holds 64 bytes).
const WHAT_LEN: usize = 64;

/// A request's texts, kept only for one that may become the oldest later:
/// one that started while others were in flight. A request that starts
/// alone is the oldest from the start, published then, and never again
/// (the common case: no copy, no allocation).
struct Entry {
    started_ms: u64,
    what: String,
    id: String,
}

#[derive(Default)]
struct Open {
    next: u64,
    /// By start order (keys rise): the first is the oldest.
    entries: VecDeque<(u64, Option<Entry>)>,
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

/// "METHOD path", cut to [`WHAT_LEN`] bytes at a character boundary, in
/// `buf`.
fn what<'a>(buf: &'a mut [u8; WHAT_LEN], method: &str, path: &str) -> &'a str {
    let mut n = 0;
    for part in [method, " ", path] {
        let take = part.len().min(WHAT_LEN - n);
        let mut end = take;
        while !part.is_char_boundary(end) {
            end -= 1;
        }
        buf[n..n + end].copy_from_slice(&part.as_bytes()[..end]);
        n += end;
        if end < part.len() {
            break;
        }
    }
    std::str::from_utf8(&buf[..n]).unwrap_or_default()
}

impl InFlight {
    pub(crate) fn new(host: Arc<dyn Host>) -> Arc<Self> {
        Arc::new(InFlight {
            host,
            open: Mutex::new(Open::default()),
        })
    }

    pub(crate) fn enter(self: &Arc<Self>, method: &str, path: &str, id: &str) -> Running {
        let started_ms = self.host.now_ms();
        let mut buf = [0u8; WHAT_LEN];
        let what = what(&mut buf, method, path);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let key = open.next;
        open.next += 1;
        let n = open.entries.len() as u64 + 1;
        if n == 1 {
            open.entries.push_back((key, None));
            self.host.set_in_flight(1, Some((started_ms, what, id)));
        } else {
            let entry = Entry {
                started_ms,
                what: what.to_owned(),
                id: id.to_owned(),
            };
            open.entries.push_back((key, Some(entry)));
            self.host.set_in_flight_count(n);
        }
        Running {
            owner: self.clone(),
            key,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock().unwrap_or_else(|e| e.into_inner());
        let Ok(at) = open.entries.binary_search_by_key(&self.key, |(k, _)| *k) else {
            return;
        };
        open.entries.remove(at);
        let n = open.entries.len() as u64;
        if at != 0 {
            self.owner.host.set_in_flight_count(n);
            return;
        }
        // The oldest left: the next one (which started while it ran, so
        // its texts were kept) is the oldest now.
        let oldest = open.entries.front().and_then(|(_, e)| e.as_ref());
        let oldest = oldest.map(|e| (e.started_ms, e.what.as_str(), e.id.as_str()));
        self.owner.host.set_in_flight(n, oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SupervisorGauges, WorkerGauges};

    /// What the scoreboard would hold: the count, and the oldest request.
    #[derive(Default)]
    struct Board(Mutex<(u64, Option<(String, String)>)>);

    impl Host for Board {
        fn set_in_flight(&self, n: u64, oldest: Option<(u64, &str, &str)>) {
            *self.0.lock().unwrap() = (n, oldest.map(|(_, w, i)| (w.to_owned(), i.to_owned())));
        }
        fn set_in_flight_count(&self, n: u64) {
            self.0.lock().unwrap().0 = n;
        }
        fn now_ms(&self) -> u64 {
            1
        }
        fn heartbeat(&self) {}
        fn ready(&self) {}
        fn draining(&self) {}
        fn request_served(&self) {}
        fn reopen_log(&self) {}
        fn count(&self, _: usize, _: u64) {}
        fn totals(&self) -> Vec<u64> {
            Vec::new()
        }
        fn supervisor_figures(&self) -> (u64, u64) {
            (0, 0)
        }
        fn set_redis_info(&self, _: &str) {}
        fn set_connections(&self, _: u64) {}
        fn fewest_connections_elsewhere(&self) -> Option<u64> {
            None
        }
        fn set_hash_queue(&self, _: u64) {}
        fn stopping(&self) -> bool {
            false
        }
        fn workers(&self) -> Vec<WorkerGauges> {
            Vec::new()
        }
        fn supervisor_gauges(&self) -> SupervisorGauges {
            SupervisorGauges::default()
        }
    }

    #[test]
    fn the_oldest_request_in_flight_is_always_the_one_shown() {
        let board = Arc::new(Board::default());
        let table = InFlight::new(board.clone());
        let shown = || board.0.lock().unwrap().clone();
        let one = |w: &str, i: &str| Some((w.to_owned(), i.to_owned()));
        let a = table.enter("GET", "/a", "id-a");
        assert_eq!(shown(), (1, one("GET /a", "id-a")));
        let b = table.enter("POST", "/b", "id-b");
        let c = table.enter("GET", "/c", "id-c");
        assert_eq!(shown(), (3, one("GET /a", "id-a")));
        // A younger one ends: the oldest stays.
        drop(b);
        assert_eq!(shown(), (2, one("GET /a", "id-a")));
        // The oldest ends: the next one, with its own texts, is shown.
        drop(a);
        assert_eq!(shown(), (1, one("GET /c", "id-c")));
        drop(c);
        assert_eq!(shown(), (0, None));
        // A long path is cut at a character boundary.
        let long = format!("/{}", "é".repeat(40));
        let d = table.enter("GET", &long, "id-d");
        let (_, oldest) = shown();
        let what = oldest.unwrap().0;
        assert!(
            what.len() <= WHAT_LEN && what.starts_with("GET /é"),
            "{what}"
        );
        drop(d);
    }
}
