//! What every request handler of one worker shares.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use forkd_store::{Store, StoreError};
use hyper::header::HeaderValue;
use tokio::sync::Semaphore;

use crate::access::AccessLog;
use crate::conns::Conns;
use crate::local_limit::LocalLimiter;
use crate::log_gate::LogGate;
use crate::refusal::Refusal;
use crate::request::id::RequestIds;
use crate::request::inflight::InFlight;
use crate::secrets::DummyHash;
use crate::upstream::Routes;
use crate::{metrics, Host, Settings};

/// Retry-After for Redis trouble: reconnects are retried much faster.
const REDIS_RETRY: Duration = Duration::from_secs(1);

pub(crate) struct State {
    pub(crate) slot: usize,
    pub(crate) pid: u32,
    pub(crate) pid_header: HeaderValue,
    /// `/healthz`'s body: all of it is fixed for the worker's life.
    pub(crate) healthz: bytes::Bytes,
    /// Set once the worker drains: every response then closes its
    /// connection, so kept-alive clients move to another worker.
    pub(crate) draining: AtomicBool,
    pub(crate) host: Arc<dyn Host>,
    pub(crate) settings: Settings,
    pub(crate) store: Store,
    /// Password checks in flight (argon2 runs off the event loop).
    pub(crate) hashes: Arc<Semaphore>,
    /// What unknown users are verified against.
    pub(crate) dummy: Arc<DummyHash>,
    /// Used for rate limits while Redis cannot answer them.
    pub(crate) local_limits: LocalLimiter,
    /// Cells of leased policies this worker holds.
    pub(crate) leases: crate::lease::Leases,
    /// Redis errors are logged at most once a second.
    pub(crate) redis_warnings: LogGate,
    pub(crate) request_ids: RequestIds,
    pub(crate) in_flight: Arc<InFlight>,
    pub(crate) access: Option<AccessLog>,
    /// Open connections (upgrade tunnels included).
    pub(crate) connections: AtomicU64,
    /// Logins waiting for a password check.
    pub(crate) hash_waiting: AtomicU64,
    /// Open connections and upgrade tunnels, for the drain.
    pub(crate) conns: Conns,
    /// `[[route]]`s and their pooled clients.
    pub(crate) routes: Routes,
}

impl State {
    pub(crate) fn new(
        slot: usize,
        generation: u64,
        host: Arc<dyn Host>,
        settings: Settings,
        store: Store,
        access: Option<AccessLog>,
    ) -> Self {
        let pid = std::process::id();
        State {
            request_ids: RequestIds::new(),
            in_flight: InFlight::new(host.clone()),
            access,
            connections: AtomicU64::new(0),
            hash_waiting: AtomicU64::new(0),
            conns: Conns::new(),
            routes: Routes::new(&settings.routes, &settings.proxy, &settings.profile),
            slot,
            pid,
            pid_header: HeaderValue::from(pid),
            healthz: serde_json::json!({
                "status": "ok",
                "slot": slot,
                "pid": pid,
                "generation": generation,
                "build": settings.build,
            })
            .to_string()
            .into(),
            draining: AtomicBool::new(false),
            host,
            hashes: Arc::new(Semaphore::new(settings.auth.max_concurrent_hashes)),
            dummy: Arc::new(DummyHash::new(settings.auth.cost)),
            settings,
            store,
            local_limits: LocalLimiter::new(),
            leases: Default::default(),
            redis_warnings: LogGate::default(),
        }
    }

    /// A Redis failure, counted, and logged at most once a while.
    pub(crate) fn redis_error(&self, e: &StoreError) {
        self.host.count(metrics::REDIS_ERRORS, 1);
        self.redis_warnings
            .warn(format_args!("{e}"), "Redis errors");
    }

    /// The 503 for a Redis failure, counted, and logged at most once a
    /// second.
    pub(crate) fn redis_down(&self, e: &StoreError) -> Refusal {
        self.redis_error(e);
        Refusal::unavailable(
            "The session store is unavailable; try again shortly.",
            REDIS_RETRY,
        )
    }
}

/// Counts the connection open while it lives.
pub(crate) struct Open(pub(crate) Arc<State>);

impl Open {
    pub(crate) fn new(state: Arc<State>) -> Open {
        let open = state.connections.fetch_add(1, Relaxed) + 1;
        state.host.set_connections(open);
        Open(state)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let open = self.0.connections.fetch_sub(1, Relaxed) - 1;
        self.0.host.set_connections(open);
    }
}
