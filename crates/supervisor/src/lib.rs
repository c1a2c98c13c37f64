//! forkd's supervisor: binds the listener, forks the workers, and keeps them
//! running. Single-threaded for its whole life; never links tokio, hyper,
//! fred or argon2 (bin/test checks this with `cargo tree`).
//!
//! - `runner/`: the running supervisor: the main loop, spawn and reap,
//!   signals, scale and reload (`mod.rs`); a fresh start and the one
//!   constructor (`start.rs`); control requests, replies and status
//!   (`requests.rs`); sd_notify and the watchdog (`systemd.rs`).
//! - [`plan`]: the pure decisions (respawn, scale, rolling reload).
//! - [`backoff`]: the one crash backoff, for worker slots and redis-server.
//! - `scoreboard`: per-worker shared-memory cells made before fork.
//! - `signals`: the one place where signals become [`SignalEvent`]s.
//! - `listen`: socket binding and the "already served" probe.
//! - [`control`]: the control-socket protocol, both ends.
//! - `control_files`: the pidfile (locked for life) and socket paths.
//! - `private_dir`: the runtime and data directories, checked and opened
//!   without following links.
//! - `privs`: dropping root to the configured account.
//! - `notify`: the sd_notify datagram and the watchdog interval.
//! - `redis`: the managed redis-server child.
//! - `upgrade/`: the mechanism of in-place binary upgrades: the probe, the
//!   versioned handover (`format`) and its transport across `exec`
//!   (`handover`), the first format (`legacy`). The supervisor's use of it
//!   is in `runner/upgrade.rs` and `runner/start.rs`.
//! - `sys`: all the code the compiler cannot check, for the whole project
//!   (this crate denies `unsafe_code` everywhere else, the others forbid
//!   it), including the scoreboard cell's layout and the typed view of the
//!   shared mapping.
#![deny(unsafe_code)]

pub mod backoff;
mod control_files;
mod listen;
mod notify;
pub mod plan;
mod private_dir;
mod privs;
mod redis;
mod runner;
mod scoreboard;
mod signals;
#[allow(unsafe_code)]
mod sys;
mod upgrade;

pub mod control;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use control_files::{control_socket_path, pidfile_path};
pub use runner::run;
pub use scoreboard::{
    heartbeat_fresh_ms, now_ms, ActivityView, Oldest, SupervisorFigures, WorkerActivity,
    WorkerCell, WorkerState, COUNTERS, MORE_COUNTERS,
};
pub use signals::SignalEvent;
pub use sys::spawn_detached;
pub use upgrade::{
    probe_answer, probe_request, take as take_handover, Inherited as InheritedState,
};

/// The largest number of workers (the config crate checks the same bound).
pub const MAX_WORKERS: usize = 512;

/// How workers accept connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerMode {
    /// One socket shared by every worker.
    Shared,
    /// One SO_REUSEPORT socket per worker slot, kept by the supervisor.
    Reuseport,
}

impl ListenerMode {
    fn name(self) -> &'static str {
        match self {
            ListenerMode::Shared => "shared",
            ListenerMode::Reuseport => "reuseport",
        }
    }
}

/// What the supervisor needs to know from the configuration, in two parts:
/// what only a restart (or an upgrade) changes, and what a reload applies.
/// A reload compares `fixed` once (and warns when it differs) and takes
/// `live` whole.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub fixed: Fixed,
    pub live: Live,
}

/// Settings bound to what the supervisor made at start: its sockets, its
/// files, its account, its binary.
#[derive(Debug, Clone, PartialEq)]
pub struct Fixed {
    pub instance: String,
    /// One or more addresses, in the configured order.
    pub listen: Vec<SocketAddr>,
    pub backlog: u32,
    pub listener: ListenerMode,
    pub runtime_dir: PathBuf,
    /// A redis-server for the workers to share, run and respawned by the
    /// supervisor; None when Redis is run elsewhere.
    pub redis: Option<ManagedRedis>,
    /// Run as this user (and group) once the sockets are bound.
    pub user: Option<String>,
    pub group: Option<String>,
    /// Identifies the binary (reported by status and upgrades).
    pub build: String,
}

impl Fixed {
    /// The names of the configuration keys behind these settings, for the
    /// warning a reload gives when one of them changed.
    pub const KEYS: &'static str =
        "listen, backlog, listener, instance, runtime_dir, user, group and managed redis";
}

/// Settings a reload applies.
#[derive(Debug, Clone, PartialEq)]
pub struct Live {
    pub workers: usize,
    pub log_file: Option<PathBuf>,
    pub shutdown_timeout: Duration,
    pub worker_timeout: Duration,
    pub startup_timeout: Duration,
    /// How often workers beat their heartbeat; a heartbeat is fresh (for
    /// the systemd watchdog) while younger than twice this.
    pub heartbeat_interval: Duration,
    /// Fraction of the workers that must have a fresh heartbeat for the
    /// systemd watchdog to be fed.
    pub watchdog_quorum: f64,
    /// How long /readyz fails, with workers still serving, between a stop
    /// and the drain.
    pub shutdown_delay: Duration,
    pub recycling: plan::Recycling,
    /// What `forkd status` shows of the TLS certificates (read by the
    /// program, which also hands them to its workers).
    pub certificates: Vec<control::CertificateStatus>,
    /// What the workers' further counters ([`MORE_COUNTERS`]) are per (the
    /// program's routes, say): when a reload changes it, they start again
    /// from zero, so that no figure carries over to another meaning.
    pub more_counters_of: Vec<String>,
    /// Which of the workers' counters hold their request-duration
    /// histogram, for `forkd status` to show per worker.
    pub latency: LatencyCounters,
    /// What `forkd status` shows of the listeners (in `Fixed::listen`'s
    /// order), the routes and where the configuration came from.
    pub listeners: Vec<control::ListenerStatus>,
    pub routes: Vec<control::RouteStatus>,
    pub config_source: String,
    /// The configuration in use, as `forkd check-config` prints it.
    pub config: String,
}

/// A histogram among each worker's counters: `bounds.len() + 1` counters
/// from `first` (one of the cell's [`COUNTERS`]), the count of answers that
/// took at most each bound (seconds), and last those slower than every one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LatencyCounters {
    pub first: usize,
    pub bounds: Vec<f64>,
}

/// The managed redis-server: unix socket only, append-only file in `dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedRedis {
    pub program: PathBuf,
    pub socket: PathBuf,
    pub dir: PathBuf,
}

/// What a forked worker gets.
pub struct WorkerContext {
    pub slot: usize,
    pub generation: u64,
    /// The sockets to accept on (non-blocking), owned by this process, one
    /// per `listen` address in the configured order.
    pub listeners: Vec<TcpListener>,
    /// Whether every worker accepts on these same sockets (the shared
    /// listener), rather than each on sockets of its own (reuseport).
    pub shared_listeners: bool,
    /// This worker's scoreboard cell.
    pub cell: WorkerCell,
    pub log_file: Option<PathBuf>,
}

/// The program the supervisor runs in its workers.
pub trait Program {
    /// Runs in the forked child and returns its exit code. It never returns
    /// into supervisor code: the child exits with the code right after.
    fn run_worker(&self, ctx: WorkerContext) -> i32;

    /// Reloads the configuration (SIGHUP, `forkd reload`). On success,
    /// workers forked from now on use the new configuration.
    ///
    /// # Errors
    /// A message for the log and the CLI; the running workers stay.
    fn reload(&mut self) -> Result<Settings, String>;

    /// A reload's new workers never became ready: go back to the
    /// configuration from before it.
    fn abandon_reload(&mut self);
}

/// Errors that stop the supervisor from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("forkd instance '{instance}' is already running (pid {pid})")]
    AlreadyRunning { instance: String, pid: i32 },
    #[error("{0} is already in use: another process listens on it or has bound it")]
    PortInUse(SocketAddr),
    #[error("cannot bind {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error("cannot use {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Sys {
        what: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error(
        "the supervisor must be single-threaded when it starts, but this process runs {0} threads"
    )]
    Threads(usize),
    #[error("socket activation: {0}")]
    Activation(String),
    #[error("cannot drop privileges: {0}")]
    Privileges(String),
    #[error("upgrade: {0}")]
    Upgrade(String),
    #[error("refusing {what} {path}: {why}")]
    UnsafeDir {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
}

impl Error {
    fn file(path: &Path, source: std::io::Error) -> Self {
        Error::File {
            path: path.to_owned(),
            source,
        }
    }
}

/// Points this process's stdout and stderr at `path` (opened for append,
/// never through a symbolic link), so that the log, and anything a library
/// prints, goes there. Used at start, on SIGUSR1 by the supervisor, and by
/// workers when told to reopen.
///
/// # Errors
/// The file cannot be opened.
pub fn redirect_output(path: &Path) -> Result<(), Error> {
    point_output_at(&open_log(path)?)
}

fn open_log(path: &Path) -> Result<std::fs::File, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| Error::file(path, e))
}

fn point_output_at(file: &std::fs::File) -> Result<(), Error> {
    let sys = |source| Error::Sys {
        what: "dup2",
        source,
    };
    nix::unistd::dup2_stdout(file).map_err(sys)?;
    nix::unistd::dup2_stderr(file).map_err(sys)?;
    Ok(())
}
