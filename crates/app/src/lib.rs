//! The forkd worker: what runs in each forked process.
//!
//! [`run`] builds a current-thread tokio runtime (after the fork, never
//! before), connects to Redis, serves HTTP through hyper on the inherited
//! listeners, beats its heartbeat from inside the runtime, and drains on
//! SIGTERM. A request goes through these phases, each a module, and each
//! module uses only those listed after it (`bin/check-layout` holds it to
//! that: no cycle between siblings):
//!
//! 1. `server`: the runtime, the accept loop, the heartbeat, the drain.
//! 2. `connection`: one connection: the PROXY protocol header, TLS
//!    (`tls`, shared session tickets in `tickets`), HTTP/1.1 or HTTP/2,
//!    hyper's own head limit (`head_limit`), lasting connections spread
//!    over the workers (`balance`).
//! 3. `pipeline`: one request, start to end: the request context, the
//!    dispatch to a built-in or a route, then the one place that counts
//!    metrics and writes the access line.
//! 4. `proxy`: a route's way: path checks, the gate, the cache (`cached`),
//!    the upstream request and its headers (`headers`), tunnels.
//! 5. `gate`: who is asking and whether they may: login, logout and
//!    bearer tokens (`auth`, `cookie`), the one rate limiter (`limiter`,
//!    whose buckets are in [`buckets`]), and `check`, which asks Redis
//!    for the session, the policies and the cache probe in one call.
//! 6. `cache`: the response cache: place, lookup, what may be stored,
//!    the fill (`fill`) and what a write ends (`invalidate`).
//! 7. `responders`: forkd's own answers: `/healthz`, `/readyz`,
//!    `/metrics` (`health`), the `/profile` route's responder (`profile`,
//!    `origin`), the redirect to HTTPS (`redirect`).
//! 8. `state`: what every handler of one worker shares.
//! 9. `upstream`: the routes' settings, pooled clients and connector.
//! 10. `request`: the request context (`Context`, made once per request:
//!     its id, the client's address, TLS, the user for the log): the
//!     head's rules (`head`), the
//!     request id (`id`), requests in flight (`inflight`), the client's
//!     address as the limits see it (`client`).
//!
//! Below them, used by any: `refusal` (every refused or failed request,
//! and its one conversion to problem+json), `response` (the plain answers
//! every route shares, the `RateLimit` headers), `body` (whole, streamed
//! from an upstream, or a client's on its way up), `metrics` (counters in
//! the scoreboard and their text format), `access` (the access log and its
//! writer thread), `log_gate` (at most one warning a second),
//! `local_limit` (the in-memory GCRA), `lease` (the cells of leased
//! policies a worker holds), `conns` (open connections and
//! tunnels, for the drain), [`secrets`] (argon2id hashes, tokens).
//!
//! The worker knows nothing of the supervisor: it reports through the
//! [`Host`] trait, which the binary implements over the scoreboard.
#![forbid(unsafe_code)]

mod access;
mod body;
mod cache;
mod connection;
mod conns;
mod gate;
mod lease;
mod local_limit;
mod log_gate;
mod metrics;
mod pem;
mod pipeline;
mod proxy;
mod refusal;
mod request;
mod responders;
mod response;
pub mod secrets;
mod server;
mod state;
mod upstream;

pub use gate::buckets;

use std::net::{IpAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

pub use access::{AccessFormat, AccessSettings};
pub use connection::tickets::TicketKeys;
pub use connection::tls::{CertificateInfo, Identity};
pub use forkd_config::{Health, Http2, OnRedisError, PolicyKey, Proxy, RouteAuth, Upstream};
pub use forkd_store::{Policy, StoreConfig};
pub use hyper::header::{HeaderName, HeaderValue};
pub use metrics::{
    BUCKETS as LATENCY_BOUNDS, HISTOGRAM as LATENCY_COUNTERS_AT, MORE_AT as MORE_COUNTERS_AT,
    MORE_USED as MORE_COUNTERS_USED, USED as COUNTERS_USED,
};
pub use server::run;
pub use upstream::tls::ClientTls;

/// Decides whether an address is a trusted proxy.
pub type TrustedProxy = Arc<dyn Fn(IpAddr) -> bool + Send + Sync>;

/// The worker's settings, from the config.
#[derive(Clone)]
pub struct Settings {
    /// Time to receive a request head; also the idle keep-alive timeout and
    /// the time allowed for a request body.
    pub header_read_timeout: Duration,
    /// The largest request head accepted (hyper's read buffer).
    pub max_header_bytes: usize,
    /// Open connections per worker from one client (not a trusted proxy).
    pub max_connections_per_client: usize,
    /// Open connections per worker; more wait in the accept queue.
    pub max_connections: usize,
    pub keepalive: bool,
    /// How long a draining worker may finish in-flight requests.
    pub shutdown_timeout: Duration,
    /// How often to beat the heartbeat.
    pub heartbeat_interval: Duration,
    pub trusted_proxy: TrustedProxy,
    /// Identifies the binary (shown by /healthz).
    pub build: String,
    /// Who may read /metrics.
    pub metrics_allow: TrustedProxy,
    /// Workers of this instance: the local fallback limiter's share.
    pub workers: usize,
    pub on_redis_error: OnRedisError,
    pub store: StoreConfig,
    pub auth: AuthSettings,
    pub profile: ProfileSettings,
    /// None: no access log.
    pub access_log: Option<AccessSettings>,
    pub routes: Vec<RouteSettings>,
    /// What every route shares: the identity headers, the upstream pools'
    /// idle connections, `forward_auth_path` ("" for none).
    pub proxy: Proxy,
    /// How each listener speaks, in the order of the worker's listeners.
    pub listeners: Vec<ListenerSettings>,
    /// The certificate, for the listeners that speak TLS.
    pub tls: Option<TlsSettings>,
    /// HTTP/2: by ALPN on TLS, by prior knowledge on plain TCP (`h2c`).
    pub http2: Http2,
}

/// How one listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerSettings {
    pub tls: bool,
    /// Every connection starts with a PROXY protocol header (v1 or v2),
    /// and only trusted proxies may connect.
    pub proxy_protocol: bool,
    /// Answer with a redirect to HTTPS on this port (but `/healthz` and
    /// `/readyz`).
    pub redirect_https: Option<u16>,
}

/// HTTPS on the TLS listeners.
#[derive(Clone)]
pub struct TlsSettings {
    pub identity: Arc<Identity>,
    /// The `Strict-Transport-Security` value, when HSTS is on.
    pub hsts: Option<hyper::header::HeaderValue>,
    pub handshake_timeout: Duration,
    /// Session-ticket keys shared by every worker of this configuration.
    pub tickets: TicketKeys,
}

/// One `[[route]]`.
#[derive(Debug, Clone)]
pub struct RouteSettings {
    /// '/' then segments, no trailing '/'.
    pub prefix: String,
    /// Its servers; none for a built-in route (`/profile` without
    /// `profile.origin`) that answers itself.
    pub upstream: Vec<Upstream>,
    /// How long a server that failed is passed over (when there are
    /// others).
    pub fail_timeout: Duration,
    /// The active health check of its servers, when on.
    pub health: Option<Health>,
    /// How its `https://` servers are reached (loaded by the supervisor).
    pub upstream_tls: Option<Arc<ClientTls>>,
    pub auth: RouteAuth,
    pub strip_prefix: bool,
    pub connect_timeout: Duration,
    /// Until the upstream's response head.
    pub timeout: Duration,
    pub pass_authorization: bool,
    /// Checked in the same Redis call as the session.
    pub policies: Vec<RoutePolicy>,
    /// The response cache of GET requests, when on.
    pub cache: Option<RouteCache>,
}

/// A route's response cache.
#[derive(Debug, Clone, Copy)]
pub struct RouteCache {
    /// An upstream's `max-age` is cut to this.
    pub max_ttl: Duration,
    /// Larger answers (or ones without `Content-Length`) are not kept.
    pub max_bytes: u64,
}

/// One `[rate_limit.policy.NAME]` of a route.
#[derive(Debug, Clone)]
pub struct RoutePolicy {
    pub name: String,
    pub policy: Policy,
    pub key: PolicyKey,
}

/// One worker's gauges, as any worker reads them for /metrics.
#[derive(Debug, Clone, Default)]
pub struct WorkerGauges {
    pub slot: usize,
    pub pid: i32,
    pub in_flight: u64,
    pub connections: u64,
    pub hash_queue: u64,
}

/// The supervisor's figures for /metrics.
#[derive(Debug, Clone, Default)]
pub struct SupervisorGauges {
    /// Connections waiting in the listening sockets' accept queues.
    pub accept_queue: u64,
    pub accept_backlog: u64,
    /// Workers recycled so far, by reason.
    pub recycles: Vec<(&'static str, u64)>,
}

/// Login and session settings.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub cost: secrets::HashCost,
    pub max_concurrent_hashes: usize,
    pub hash_queue_timeout: Duration,
    pub session_idle: Duration,
    pub session_absolute: Duration,
    /// Failed logins per client address (IPv6: /64).
    pub login_ip: Policy,
    /// Failed logins per username from one client address.
    pub login_user: Policy,
    /// Failed logins per username from all addresses together.
    pub login_user_all: Policy,
    /// Every login of this host, shared out among its workers.
    pub login_host: Policy,
    /// Sessions also as a cookie (`auth.cookie`).
    pub cookie: Option<CookieSettings>,
}

/// The session cookie.
#[derive(Debug, Clone)]
pub struct CookieSettings {
    pub name: String,
    pub secure: bool,
}

/// `GET /profile` settings.
#[derive(Debug, Clone)]
pub struct ProfileSettings {
    /// `HOST:PORT` of the HTTP origin, or None for the user record.
    pub origin: Option<String>,
    pub origin_timeout: Duration,
    pub cache_ttl: Duration,
    pub lock_timeout: Duration,
    pub lock_wait: Duration,
    pub limit: Policy,
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
    /// Adds `n` to this worker's counter `k` (see `COUNTERS_USED`).
    fn count(&self, k: usize, n: u64);
    /// Every counter summed over all workers.
    fn totals(&self) -> Vec<u64>;
    /// (workers ready, worker restarts), from the supervisor.
    fn supervisor_figures(&self) -> (u64, u64);
    /// Which Redis this worker uses, for `forkd status`.
    fn set_redis_info(&self, text: &str);
    /// The scoreboard's clock (CLOCK_MONOTONIC), milliseconds.
    fn now_ms(&self) -> u64;
    /// Requests in flight, and the oldest: (started, from
    /// [`Host::now_ms`]; "METHOD path"; request id).
    fn set_in_flight(&self, n: u64, oldest: Option<(u64, &str, &str)>);
    /// Requests in flight; the oldest is unchanged.
    fn set_in_flight_count(&self, n: u64);
    fn set_connections(&self, n: u64);
    /// The fewest open connections of any other worker that accepts (ready,
    /// its heartbeat fresh); None when there is none.
    fn fewest_connections_elsewhere(&self) -> Option<u64>;
    /// Logins waiting for a password check.
    fn set_hash_queue(&self, n: u64);
    /// The supervisor is stopping: /readyz must fail.
    fn stopping(&self) -> bool;
    /// Every live worker's gauges.
    fn workers(&self) -> Vec<WorkerGauges>;
    fn supervisor_gauges(&self) -> SupervisorGauges;
}

/// Everything a worker needs.
pub struct Worker {
    pub slot: usize,
    pub generation: u64,
    /// One per `Settings::listeners`, in the same order.
    pub listeners: Vec<TcpListener>,
    /// Whether every worker accepts on these same sockets.
    pub shared_listeners: bool,
    pub settings: Settings,
    pub host: Arc<dyn Host>,
}

/// Helpers for the unit tests of several modules.
#[cfg(test)]
pub(crate) mod test_util {
    use hyper::header::{HeaderMap, HeaderName, HeaderValue};

    /// A header map from (name, value) pairs, repeats appended.
    pub(crate) fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }
}
