//! The scoreboard: one cache-line cell per worker process in a shared
//! mapping made before the first fork. Workers write their own cell (pid,
//! state, heartbeat, request count); the supervisor reads every cell.
//!
//! Cells are not slots: during a rolling replacement a slot has two
//! processes, so there are twice as many cells as the largest worker count.

use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering::Relaxed};

use crate::sys::SharedMapping;

/// What a worker process says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    Free,
    Starting,
    Ready,
    Draining,
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

#[repr(C, align(64))]
pub(crate) struct Cell {
    pid: AtomicI32,
    state: AtomicU32,
    slot: AtomicU32,
    generation: AtomicU64,
    /// CLOCK_MONOTONIC milliseconds, comparable across processes.
    heartbeat_ms: AtomicU64,
    started_ms: AtomicU64,
    requests: AtomicU64,
}

/// A copy of one cell.
#[derive(Debug, Clone, Copy)]
pub struct CellView {
    pub state: WorkerState,
    pub heartbeat_ms: u64,
    pub requests: u64,
}

pub(crate) struct Scoreboard {
    map: SharedMapping,
    cells: usize,
}

impl Scoreboard {
    pub(crate) fn new(cells: usize) -> nix::Result<Self> {
        let len = NonZeroUsize::new(cells.max(1) * std::mem::size_of::<Cell>())
            .expect("at least one cell");
        let map = SharedMapping::new(len)?;
        Ok(Scoreboard { map, cells })
    }

    /// Maps the scoreboard an upgrade handed over.
    pub(crate) fn adopt(fd: std::os::fd::OwnedFd, cells: usize) -> nix::Result<Self> {
        let len = NonZeroUsize::new(cells.max(1) * std::mem::size_of::<Cell>())
            .expect("at least one cell");
        let map = SharedMapping::from_fd(fd, len)?;
        Ok(Scoreboard { map, cells })
    }

    pub(crate) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.map.fd().as_fd()
    }

    pub(crate) fn cells(&self) -> usize {
        self.cells
    }

    fn cell(&self, i: usize) -> &Cell {
        assert!(i < self.cells && (i + 1) * std::mem::size_of::<Cell>() <= self.map.len());
        // SAFETY: the mapping is page-aligned and zero-filled, so every cell
        // is aligned and a valid `Cell` (all atomics, all-zero is valid); the
        // index is in bounds (asserted); atomics make shared access sound.
        unsafe { &*self.map.as_ptr().cast::<Cell>().as_ptr().add(i) }
    }

    /// A free cell index, prepared for a new worker of `slot`.
    pub(crate) fn claim(&self, slot: usize, generation: u64, now_ms: u64) -> Option<usize> {
        let i = (0..self.cells).find(|&i| self.cell(i).state.load(Relaxed) == 0)?;
        let c = self.cell(i);
        c.pid.store(0, Relaxed);
        c.slot.store(slot as u32, Relaxed);
        c.generation.store(generation, Relaxed);
        c.heartbeat_ms.store(now_ms, Relaxed);
        c.started_ms.store(now_ms, Relaxed);
        c.requests.store(0, Relaxed);
        c.state.store(WorkerState::Starting as u32, Relaxed);
        Some(i)
    }

    pub(crate) fn set_pid(&self, i: usize, pid: i32) {
        self.cell(i).pid.store(pid, Relaxed);
    }

    pub(crate) fn release(&self, i: usize) {
        let c = self.cell(i);
        c.pid.store(0, Relaxed);
        c.state.store(WorkerState::Free as u32, Relaxed);
    }

    pub(crate) fn view(&self, i: usize) -> CellView {
        let c = self.cell(i);
        CellView {
            state: WorkerState::from_u32(c.state.load(Relaxed)),
            heartbeat_ms: c.heartbeat_ms.load(Relaxed),
            requests: c.requests.load(Relaxed),
        }
    }

    /// The handle a worker keeps for its own cell. Valid for the life of
    /// the child process, which never unmaps the scoreboard.
    pub(crate) fn handle(&self, i: usize) -> WorkerCell {
        WorkerCell {
            cell: NonNull::from(self.cell(i)),
        }
    }
}

/// A worker's own scoreboard cell.
#[derive(Clone)]
pub struct WorkerCell {
    cell: NonNull<Cell>,
}

// SAFETY: a `Cell` is made of atomics only, and the mapping outlives every
// handle (a child never unmaps it; the supervisor hands handles only to
// children).
unsafe impl Send for WorkerCell {}
// SAFETY: as above; all access is through atomics.
unsafe impl Sync for WorkerCell {}

impl WorkerCell {
    fn cell(&self) -> &Cell {
        // SAFETY: see the `Send` impl: the pointee lives as long as the process.
        unsafe { self.cell.as_ref() }
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
