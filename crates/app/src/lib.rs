//! The forkd worker: what runs in each forked process.
//!
//! - [`run`] builds a current-thread tokio runtime (after the fork, never
//!   before), serves HTTP/1.1 through hyper on the inherited listener, beats
//!   its heartbeat from inside the runtime, and drains on SIGTERM.
//! - `routes`: the HTTP API and its problem+json errors.
//!
//! The worker knows nothing of the supervisor: it reports through the
//! [`Host`] trait, which the binary implements over the scoreboard.
#![forbid(unsafe_code)]

mod routes;
mod server;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

pub use server::run;

/// The worker's settings, from the config.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Time to receive a request head; also the idle keep-alive timeout.
    pub header_read_timeout: Duration,
    /// Open connections per worker; more wait in the accept queue.
    pub max_connections: usize,
    pub keepalive: bool,
    /// How long a draining worker may finish in-flight requests.
    pub shutdown_timeout: Duration,
    /// How often to beat the heartbeat.
    pub heartbeat_interval: Duration,
}

/// How a worker tells its supervisor about itself.
pub trait Host: Send + Sync {
    /// The event loop is alive.
    fn heartbeat(&self);
    /// Accepting connections.
    fn ready(&self);
    /// Stopped accepting; finishing in-flight requests.
    fn draining(&self);
    /// One request answered.
    fn request_served(&self);
    /// Reopen the log file (SIGUSR1).
    fn reopen_log(&self);
}

/// Everything a worker needs.
pub struct Worker {
    pub slot: usize,
    pub generation: u64,
    pub listener: TcpListener,
    pub settings: Settings,
    pub host: Arc<dyn Host>,
}
