//! The scoreboard: one cache-line cell per worker process in a shared
//! mapping made before the first fork. Workers write their own cell (pid,
//! state, heartbeat, request count); the supervisor reads every cell.
//!
//! Cells are not slots: during a rolling replacement a slot has two
//! processes, so there are twice as many cells as the largest worker count.
//! Cell 0 belongs to no worker: it holds the counters of exited workers
//! (folded in when their cell is released, so totals never go backwards)
//! and the supervisor's own figures (workers up, restarts).
//!
//! Each cell has [`COUNTERS`] generic counters; the worker decides what they
//! count, and any worker can sum them over every cell.

use std::num::NonZeroUsize;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

pub(crate) use crate::sys::RECYCLE_REASONS;
use crate::sys::{Activity, Cell, MoreCounters, SharedMapping, SharedSlice};

/// What a worker process says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    Free,
    Starting,
    Ready,
    Draining,
}

/// The text a worker published with [`WorkerCell::set_info`].
pub(crate) fn info_text(words: &[u64]) -> String {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

impl WorkerState {
    fn from_u32(v: u32) -> Self {
        match v {
            1 => WorkerState::Starting,
            2 => WorkerState::Ready,
            3 => WorkerState::Draining,
            _ => WorkerState::Free,
        }
    }
}

/// Generic counters per cell.
pub use crate::sys::{COUNTERS, MORE_COUNTERS};

/// The oldest request a worker has in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Oldest {
    /// CLOCK_MONOTONIC milliseconds (see [`now_ms`]).
    pub started_ms: u64,
    /// Method and path, cut to 64 bytes.
    pub what: String,
    pub request_id: String,
}

/// A copy of a cell's [`Activity`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActivityView {
    pub in_flight: u64,
    pub connections: u64,
    pub hash_queue: u64,
    pub oldest: Option<Oldest>,
}

/// Stores `text` in `words` as little-endian bytes, zero-padded, cut at a
/// character boundary to fit (read back with [`info_text`]).
fn text_words(text: &str, words: &[AtomicU64]) {
    let mut n = text.len().min(words.len() * 8);
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    let mut bytes = text.as_bytes()[..n].chunks(8);
    for w in words {
        let mut word = [0u8; 8];
        if let Some(chunk) = bytes.next() {
            word[..chunk.len()].copy_from_slice(chunk);
        }
        w.store(u64::from_le_bytes(word), Relaxed);
    }
}

fn words_text(words: &[AtomicU64]) -> String {
    info_text(&words.iter().map(|w| w.load(Relaxed)).collect::<Vec<_>>())
}

fn read_activity(a: &Activity) -> ActivityView {
    let mut oldest = None;
    // The writer holds `oldest_seq` odd while it writes: retry a torn read
    // a few times, then report none rather than wait.
    for _ in 0..8 {
        let before = a.oldest_seq.load(Acquire);
        if before % 2 == 1 {
            std::hint::spin_loop();
            continue;
        }
        let started_ms = a.oldest_start_ms.load(Relaxed);
        let what = words_text(&a.oldest_what);
        let request_id = words_text(&a.oldest_id);
        std::sync::atomic::fence(Acquire);
        if a.oldest_seq.load(Relaxed) == before {
            oldest = (started_ms != 0).then_some(Oldest {
                started_ms,
                what,
                request_id,
            });
            break;
        }
    }
    ActivityView {
        in_flight: a.in_flight.load(Relaxed),
        connections: a.connections.load(Relaxed),
        hash_queue: a.hash_queue.load(Relaxed),
        oldest,
    }
}

fn clear_activity(a: &Activity) {
    a.in_flight.store(0, Relaxed);
    a.connections.store(0, Relaxed);
    a.hash_queue.store(0, Relaxed);
    a.oldest_start_ms.store(0, Relaxed);
}
pub(crate) use crate::sys::INFO_WORDS;

/// A copy of one cell.
#[derive(Debug, Clone, Copy)]
pub struct CellView {
    pub info: [u64; INFO_WORDS],
    pub state: WorkerState,
    pub heartbeat_ms: u64,
    pub requests: u64,
}

pub(crate) struct Scoreboard {
    /// Kept for its descriptor and to keep `view` valid.
    map: SharedMapping,
    view: SharedSlice<Cell>,
    activity: SharedSlice<Activity>,
    more: SharedSlice<MoreCounters>,
    cells: usize,
}

/// The mapping's length for `cells` cells: the cells, then their
/// activities, then their further counters.
fn mapping_len(cells: usize) -> NonZeroUsize {
    let per_cell = std::mem::size_of::<Cell>()
        + std::mem::size_of::<Activity>()
        + std::mem::size_of::<MoreCounters>();
    NonZeroUsize::new(cells.max(1) * per_cell).expect("at least one cell")
}

impl Scoreboard {
    /// A scoreboard for `workers` worker processes at once (plus cell 0).
    pub(crate) fn new(workers: usize) -> nix::Result<Self> {
        let cells = workers + 1;
        let map = SharedMapping::new(mapping_len(cells))?;
        Ok(Self::with_map(map, cells))
    }

    fn with_map(map: SharedMapping, cells: usize) -> Self {
        let cells = cells.max(1);
        let activities = cells * std::mem::size_of::<Cell>();
        let more = activities + cells * std::mem::size_of::<Activity>();
        Scoreboard {
            view: map.view_at(0, cells),
            activity: map.view_at(activities, cells),
            more: map.view_at(more, cells),
            map,
            cells,
        }
    }

    /// Maps the scoreboard an upgrade handed over; its further counters
    /// start again from zero.
    ///
    /// The cells must be where this build expects them: a build whose cells
    /// are larger than the previous one's is refused (EINVAL), and the
    /// upgrade rolls back. The activities and further counters after them
    /// were added later: a memfd without them (from an older build) is
    /// grown to hold them.
    pub(crate) fn adopt(fd: std::os::fd::OwnedFd, cells: usize) -> nix::Result<Self> {
        let size = nix::sys::stat::fstat(&fd)?.st_size;
        if usize::try_from(size).unwrap_or(0) < cells.max(1) * std::mem::size_of::<Cell>() {
            return Err(nix::errno::Errno::EINVAL);
        }
        let map = SharedMapping::from_fd(fd, mapping_len(cells))?;
        let board = Self::with_map(map, cells);
        // What the further counters are per may differ in this build or
        // this configuration: they start again from zero.
        board.restart_more_counters();
        Ok(board)
    }

    pub(crate) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.map.fd().as_fd()
    }

    pub(crate) fn cells(&self) -> usize {
        self.cells
    }

    fn cell(&self, i: usize) -> &Cell {
        assert!(i < self.cells);
        self.view.get(i)
    }

    /// A free cell index, prepared for a new worker of `slot`.
    pub(crate) fn claim(&self, slot: usize, generation: u64, now_ms: u64) -> Option<usize> {
        let i = (1..self.cells).find(|&i| self.cell(i).state.load(Relaxed) == 0)?;
        let c = self.cell(i);
        c.pid.store(0, Relaxed);
        c.slot.store(slot as u32, Relaxed);
        c.generation.store(generation, Relaxed);
        c.heartbeat_ms.store(now_ms, Relaxed);
        c.started_ms.store(now_ms, Relaxed);
        c.requests.store(0, Relaxed);
        for w in &c.info {
            w.store(0, Relaxed);
        }
        clear_activity(self.activity.get(i));
        c.state.store(WorkerState::Starting as u32, Relaxed);
        Some(i)
    }

    pub(crate) fn set_pid(&self, i: usize, pid: i32) {
        self.cell(i).pid.store(pid, Relaxed);
    }

    pub(crate) fn release(&self, i: usize) {
        let c = self.cell(i);
        let retired = self.cell(0);
        for (k, counter) in c.counters.iter().enumerate() {
            retired.counters[k].fetch_add(counter.swap(0, Relaxed), Relaxed);
        }
        let (mine, retired) = (self.more.get(i), self.more.get(0));
        for (k, counter) in mine.counters.iter().enumerate() {
            retired.counters[k].fetch_add(counter.swap(0, Relaxed), Relaxed);
        }
        clear_activity(self.activity.get(i));
        c.pid.store(0, Relaxed);
        c.state.store(WorkerState::Free as u32, Relaxed);
    }

    /// Starts the further counters again from zero in every cell: what
    /// they count changed (a reload changed the routes they are per).
    pub(crate) fn restart_more_counters(&self) {
        for i in 0..self.cells {
            for c in &self.more.get(i).counters {
                c.store(0, Relaxed);
            }
        }
    }

    /// What the worker in cell `i` is doing.
    pub(crate) fn activity(&self, i: usize) -> ActivityView {
        assert!(i < self.cells);
        read_activity(self.activity.get(i))
    }

    /// The supervisor's figures that /metrics and /readyz read.
    pub(crate) fn set_stopping(&self) {
        self.activity.get(0).stopping.store(1, Relaxed);
    }

    pub(crate) fn set_accept_queue(&self, queued: u64, backlog: u64) {
        let a = self.activity.get(0);
        a.accept_queue.store(queued, Relaxed);
        a.accept_backlog.store(backlog, Relaxed);
    }

    pub(crate) fn set_recycles(&self, counts: [u64; RECYCLE_REASONS]) {
        for (w, n) in self.activity.get(0).recycles.iter().zip(counts) {
            w.store(n, Relaxed);
        }
    }

    /// The supervisor's figures, for workers to report.
    pub(crate) fn set_supervisor_figures(&self, workers_up: u64, restarts: u64) {
        let c = self.cell(0);
        c.workers_up.store(workers_up, Relaxed);
        c.restarts.store(restarts, Relaxed);
    }

    pub(crate) fn view(&self, i: usize) -> CellView {
        let c = self.cell(i);
        CellView {
            info: std::array::from_fn(|i| c.info[i].load(Relaxed)),
            state: WorkerState::from_u32(c.state.load(Relaxed)),
            heartbeat_ms: c.heartbeat_ms.load(Relaxed),
            requests: c.requests.load(Relaxed),
        }
    }

    /// Cell `i`'s counters `first..first + n`; none unless all of them are
    /// among the cell's [`COUNTERS`].
    pub(crate) fn counters(&self, i: usize, first: usize, n: usize) -> Vec<u64> {
        let c = self.cell(i);
        match first.checked_add(n) {
            Some(end) if end <= COUNTERS => c.counters[first..end]
                .iter()
                .map(|v| v.load(Relaxed))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The handle a worker keeps for its own cell. Valid for the life of
    /// the child process, which never unmaps the scoreboard.
    pub(crate) fn handle(&self, i: usize) -> WorkerCell {
        assert!(i < self.cells && self.cells <= self.view.len());
        WorkerCell {
            cells: self.view.clone(),
            activity: self.activity.clone(),
            more: self.more.clone(),
            index: i,
        }
    }
}

/// What every worker is doing, as a worker reads it for /metrics.
#[derive(Debug, Clone)]
pub struct WorkerActivity {
    pub slot: usize,
    pub pid: i32,
    pub activity: ActivityView,
}

/// The supervisor's figures a worker reports in /metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct SupervisorFigures {
    pub accept_queue: u64,
    pub accept_backlog: u64,
    /// Workers recycled for max_requests, max_rss, max_age.
    pub recycles: [u64; RECYCLE_REASONS],
}

/// A worker's own scoreboard cell (and a view of every cell, for totals).
#[derive(Clone)]
pub struct WorkerCell {
    cells: SharedSlice<Cell>,
    activity: SharedSlice<Activity>,
    more: SharedSlice<MoreCounters>,
    index: usize,
}

impl WorkerCell {
    fn cell(&self) -> &Cell {
        self.at(self.index)
    }

    fn at(&self, i: usize) -> &Cell {
        self.cells.get(i)
    }

    /// Publishes a short text (at most 128 bytes are kept) for status.
    pub fn set_info(&self, text: &str) {
        text_words(text, &self.cell().info);
    }

    /// Adds `n` to this worker's counter `k`: one of the cell's
    /// [`COUNTERS`], or past them one of its [`MORE_COUNTERS`].
    pub fn add(&self, k: usize, n: u64) {
        match k.checked_sub(COUNTERS) {
            None => self.cell().counters[k].fetch_add(n, Relaxed),
            Some(m) => self.more.get(self.index).counters[m].fetch_add(n, Relaxed),
        };
    }

    /// Every counter (the cells' then the further ones) summed over all
    /// workers, past and present.
    pub fn totals(&self) -> Vec<u64> {
        let mut sum = vec![0u64; COUNTERS + MORE_COUNTERS];
        for i in 0..self.cells.len() {
            let c = self.at(i);
            if i != 0 && c.state.load(Relaxed) == 0 {
                continue;
            }
            let more = &self.more.get(i).counters;
            for (k, v) in c.counters.iter().chain(more).enumerate() {
                sum[k] += v.load(Relaxed);
            }
        }
        sum
    }

    /// (workers ready, restarts so far), as the supervisor last wrote them.
    pub fn supervisor_figures(&self) -> (u64, u64) {
        let c = self.at(0);
        (c.workers_up.load(Relaxed), c.restarts.load(Relaxed))
    }

    /// Records that the worker's event loop is alive.
    pub fn heartbeat(&self) {
        self.cell().heartbeat_ms.store(now_ms(), Relaxed);
    }

    /// The worker accepts connections.
    pub fn set_ready(&self) {
        self.cell().state.store(WorkerState::Ready as u32, Relaxed);
    }

    /// The worker has stopped accepting and is finishing its requests.
    pub fn set_draining(&self) {
        self.cell()
            .state
            .store(WorkerState::Draining as u32, Relaxed);
    }

    /// Counts one answered request.
    pub fn count_request(&self) {
        self.cell().requests.fetch_add(1, Relaxed);
    }

    fn own_activity(&self) -> &Activity {
        self.activity.get(self.index)
    }

    /// Requests in flight, and the oldest of them (None when none is).
    pub fn set_in_flight(&self, n: u64, oldest: Option<(u64, &str, &str)>) {
        let a = self.own_activity();
        a.in_flight.store(n, Relaxed);
        a.oldest_seq.fetch_add(1, Relaxed);
        std::sync::atomic::fence(Release);
        match oldest {
            Some((started_ms, what, id)) => {
                a.oldest_start_ms.store(started_ms.max(1), Relaxed);
                text_words(what, &a.oldest_what);
                text_words(id, &a.oldest_id);
            }
            None => a.oldest_start_ms.store(0, Relaxed),
        }
        a.oldest_seq.fetch_add(1, Release);
    }

    /// Requests in flight, when the oldest has not changed.
    pub fn set_in_flight_count(&self, n: u64) {
        self.own_activity().in_flight.store(n, Relaxed);
    }

    /// Open connections of this worker.
    pub fn set_connections(&self, n: u64) {
        self.own_activity().connections.store(n, Relaxed);
    }

    /// The fewest open connections of any other worker that accepts
    /// (ready, its heartbeat at most `fresh_ms` old); None when there is
    /// no such worker.
    pub fn fewest_connections_elsewhere(&self, fresh_ms: u64) -> Option<u64> {
        let now = now_ms();
        (1..self.cells.len())
            .filter(|&i| i != self.index)
            .filter(|&i| {
                let c = self.at(i);
                c.state.load(Relaxed) == WorkerState::Ready as u32
                    && now.saturating_sub(c.heartbeat_ms.load(Relaxed)) <= fresh_ms
            })
            .map(|i| self.activity.get(i).connections.load(Relaxed))
            .min()
    }

    /// Logins waiting for a password check in this worker.
    pub fn set_hash_queue(&self, n: u64) {
        self.own_activity().hash_queue.store(n, Relaxed);
    }

    /// Whether the supervisor is stopping (and /readyz must fail).
    pub fn supervisor_stopping(&self) -> bool {
        self.activity.get(0).stopping.load(Relaxed) != 0
    }

    /// The accept queue and recycling counts, as the supervisor last wrote
    /// them.
    pub fn supervisor_activity(&self) -> SupervisorFigures {
        let a = self.activity.get(0);
        SupervisorFigures {
            accept_queue: a.accept_queue.load(Relaxed),
            accept_backlog: a.accept_backlog.load(Relaxed),
            recycles: std::array::from_fn(|i| a.recycles[i].load(Relaxed)),
        }
    }

    /// Every live worker's activity.
    pub fn activities(&self) -> Vec<WorkerActivity> {
        (1..self.cells.len())
            .filter_map(|i| {
                let c = self.at(i);
                let pid = c.pid.load(Relaxed);
                if c.state.load(Relaxed) == 0 || pid == 0 {
                    return None;
                }
                Some(WorkerActivity {
                    slot: c.slot.load(Relaxed) as usize,
                    pid,
                    activity: read_activity(self.activity.get(i)),
                })
            })
            .collect()
    }
}

/// How old a worker's heartbeat may be, beating every `interval`, for its
/// event loop to count as alive: two beats and a margin.
pub fn heartbeat_fresh_ms(interval: std::time::Duration) -> u64 {
    2 * interval.as_millis() as u64 + 250
}

/// CLOCK_MONOTONIC in milliseconds: one clock for every process on the host.
pub fn now_ms() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fewest_connections_elsewhere_are_of_live_accepting_workers_only() {
        let board = Scoreboard::new(4).unwrap();
        let now = now_ms();
        let cells: Vec<WorkerCell> = (0..4)
            .map(|slot| board.handle(board.claim(slot, 1, now).unwrap()))
            .collect();
        let [me, busy, idle, draining] = &cells[..] else {
            unreachable!()
        };
        // Starting workers do not accept yet.
        assert_eq!(me.fewest_connections_elsewhere(1000), None);
        for (c, n) in [(me, 9), (busy, 12), (idle, 3), (draining, 0)] {
            c.set_ready();
            c.heartbeat();
            c.set_connections(n);
        }
        draining.set_draining();
        assert_eq!(me.fewest_connections_elsewhere(1000), Some(3));
        assert_eq!(idle.fewest_connections_elsewhere(1000), Some(9));
        // A worker whose heartbeat is stale may be stuck: it is not left
        // connections.
        idle.cell()
            .heartbeat_ms
            .store(now.saturating_sub(5000), Relaxed);
        assert_eq!(me.fewest_connections_elsewhere(1000), Some(12));
        busy.set_draining();
        assert_eq!(me.fewest_connections_elsewhere(1000), None);
    }
}
