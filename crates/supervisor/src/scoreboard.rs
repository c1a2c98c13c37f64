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
use std::sync::atomic::Ordering::Relaxed;

use crate::sys::{Cell, SharedMapping, SharedSlice};

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
pub(crate) fn info_text(words: &[u64; INFO_WORDS]) -> String {
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
pub use crate::sys::COUNTERS;
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
    cells: usize,
}

impl Scoreboard {
    /// A scoreboard for `workers` worker processes at once (plus cell 0).
    pub(crate) fn new(workers: usize) -> nix::Result<Self> {
        let cells = workers + 1;
        let len = NonZeroUsize::new(cells.max(1) * std::mem::size_of::<Cell>())
            .expect("at least one cell");
        let map = SharedMapping::new(len)?;
        Ok(Scoreboard {
            view: map.view(),
            map,
            cells,
        })
    }

    /// Maps the scoreboard an upgrade handed over.
    pub(crate) fn adopt(fd: std::os::fd::OwnedFd, cells: usize) -> nix::Result<Self> {
        let len = NonZeroUsize::new(cells.max(1) * std::mem::size_of::<Cell>())
            .expect("at least one cell");
        // A build whose cells are larger than the previous one's would map
        // past the memfd's end and fault on first touch: refuse (EINVAL),
        // and the upgrade rolls back.
        let size = nix::sys::stat::fstat(&fd)?.st_size;
        if usize::try_from(size).unwrap_or(0) < len.get() {
            return Err(nix::errno::Errno::EINVAL);
        }
        let map = SharedMapping::from_fd(fd, len)?;
        Ok(Scoreboard {
            view: map.view(),
            map,
            cells,
        })
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
        c.pid.store(0, Relaxed);
        c.state.store(WorkerState::Free as u32, Relaxed);
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

    /// The handle a worker keeps for its own cell. Valid for the life of
    /// the child process, which never unmaps the scoreboard.
    pub(crate) fn handle(&self, i: usize) -> WorkerCell {
        assert!(i < self.cells && self.cells <= self.view.len());
        WorkerCell {
            cells: self.view.clone(),
            index: i,
        }
    }
}

/// A worker's own scoreboard cell (and a view of every cell, for totals).
#[derive(Clone)]
pub struct WorkerCell {
    cells: SharedSlice<Cell>,
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
        let mut bytes = [0u8; INFO_WORDS * 8];
        let n = text.len().min(bytes.len());
        bytes[..n].copy_from_slice(&text.as_bytes()[..n]);
        for (i, w) in self.cell().info.iter().enumerate() {
            let word: [u8; 8] = bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes");
            w.store(u64::from_le_bytes(word), Relaxed);
        }
    }

    /// Adds `n` to this worker's counter `k`.
    pub fn add(&self, k: usize, n: u64) {
        self.cell().counters[k].fetch_add(n, Relaxed);
    }

    /// Every counter summed over all workers, past and present.
    pub fn totals(&self) -> [u64; COUNTERS] {
        let mut sum = [0u64; COUNTERS];
        for i in 0..self.cells.len() {
            let c = self.at(i);
            if i != 0 && c.state.load(Relaxed) == 0 {
                continue;
            }
            for (k, v) in c.counters.iter().enumerate() {
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
}

/// CLOCK_MONOTONIC in milliseconds: one clock for every process on the host.
pub fn now_ms() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000
}
