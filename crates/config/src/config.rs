//! The validated configuration: every value in range, durations as
//! [`Duration`], networks as [`Cidr`]. What `forkd check-config` prints.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::check::secs;
use crate::routes::{NamedPolicy, Proxy, Route};
use crate::{AccessLogFormat, Cidr, ListenerMode};

/// The HTTP settings of a validated config.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Http {
    #[serde(serialize_with = "secs")]
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub max_connections_per_client: usize,
    pub keepalive: bool,
    pub trusted_proxies: Vec<Cidr>,
}

/// Redis settings of a validated config.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Redis {
    /// Empty: forkd runs its own redis-server (see `server`, `data_dir`).
    pub url: String,
    /// A file whose first line is the Redis password (read at start and at
    /// every reload; never printed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    pub prefix: String,
    #[serde(serialize_with = "secs")]
    pub command_timeout: Duration,
    #[serde(serialize_with = "secs")]
    pub connect_timeout: Duration,
    #[serde(serialize_with = "secs")]
    pub reconnect_max_delay: Duration,
    /// The worker's near cache of sessions and cached answers, in MiB
    /// (0: none).
    pub near_cache_mib: usize,
    /// The longest the near cache keeps anything.
    #[serde(serialize_with = "secs")]
    pub near_cache_max_age: Duration,
    pub server: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
}

/// Authentication settings of a validated config.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Auth {
    pub argon2_memory_kib: u32,
    pub argon2_iterations: u32,
    pub argon2_parallelism: u32,
    pub max_concurrent_hashes: usize,
    #[serde(serialize_with = "secs")]
    pub hash_queue_timeout: Duration,
    #[serde(serialize_with = "secs")]
    pub session_idle_timeout: Duration,
    #[serde(serialize_with = "secs")]
    pub session_absolute_timeout: Duration,
    pub login_ip_limit: u32,
    #[serde(serialize_with = "secs")]
    pub login_ip_window: Duration,
    pub login_user_limit: u32,
    #[serde(serialize_with = "secs")]
    pub login_user_window: Duration,
    pub login_user_all_limit: u32,
    #[serde(serialize_with = "secs")]
    pub login_user_all_window: Duration,
    pub login_host_limit: u32,
    #[serde(serialize_with = "secs")]
    pub login_host_window: Duration,
    /// Sessions also as a cookie, for browsers.
    pub cookie: bool,
    pub cookie_name: String,
    /// The cookie's `Secure` attribute (off only for plain-HTTP development).
    pub cookie_secure: bool,
}

/// Profile settings of a validated config.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Profile {
    /// Empty: profiles come from the user records.
    pub origin: String,
    #[serde(serialize_with = "secs")]
    pub origin_timeout: Duration,
    #[serde(serialize_with = "secs")]
    pub cache_ttl: Duration,
    #[serde(serialize_with = "secs")]
    pub lock_timeout: Duration,
    #[serde(serialize_with = "secs")]
    pub lock_wait: Duration,
}

/// A validated rate-limit policy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Policy {
    pub limit: u32,
    #[serde(serialize_with = "secs")]
    pub window: Duration,
    /// Cells a worker takes at once (1: exact).
    pub lease: u32,
}

/// What a rate limiter does when Redis cannot answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRedisError {
    /// Let the request through.
    FailOpen,
    /// Answer 503.
    FailClosed,
    /// Apply limit / workers in each worker's memory.
    Local,
}

/// Rate limits of a validated config.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RateLimit {
    pub on_redis_error: OnRedisError,
    pub profile: Policy,
    pub policy: std::collections::BTreeMap<String, NamedPolicy>,
}

/// A validated configuration. Every value is in range; paths may still fail
/// to open when used.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub instance: String,
    /// One or more, in the file's order.
    #[serde(serialize_with = "crate::listen::serialize")]
    pub listen: Vec<crate::listen::Listen>,
    pub backlog: u32,
    pub listener: ListenerMode,
    /// Resolved: `"auto"` has become the machine's available parallelism.
    pub workers: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime_dir: Option<PathBuf>,
    pub log_level: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_file: Option<PathBuf>,
    #[serde(serialize_with = "secs")]
    pub shutdown_timeout: Duration,
    #[serde(serialize_with = "secs")]
    pub shutdown_delay: Duration,
    pub access_log: AccessLogFormat,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_log_file: Option<PathBuf>,
    #[serde(serialize_with = "secs")]
    pub worker_timeout: Duration,
    #[serde(serialize_with = "secs")]
    pub startup_timeout: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub watchdog_quorum: f64,
    pub http: Http,
    pub recycle: Recycle,
    pub redis: Redis,
    pub auth: Auth,
    pub profile: Profile,
    pub metrics: Metrics,
    pub rate_limit: RateLimit,
    pub proxy: Proxy,
    pub tls: crate::tls::Tls,
    pub http2: crate::tls::Http2,
    /// Last: TOML writes arrays of tables after the plain keys.
    pub route: Vec<Route>,
}

/// When a worker is replaced for its own sake (0: never).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recycle {
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    #[serde(rename = "max_rss")]
    pub max_rss_mib: u64,
    #[serde(serialize_with = "secs")]
    pub max_age: Duration,
}

/// Metrics settings of a validated config.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metrics {
    /// Who may read /metrics.
    pub allow: Vec<Cidr>,
}

impl Config {
    /// The effective configuration as TOML, for `forkd check-config`, with
    /// any password in `redis.url` replaced by `***`.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.redis.url = redact_url(&shown.redis.url);
        toml::to_string(&shown).expect("a validated config always serializes")
    }
}

/// `scheme://user:secret@host` -> `scheme://user:***@host`, for logs and
/// `check-config`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let hidden = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                "***".to_owned()
            };
            format!("{scheme}://{hidden}{}", &rest[at..])
        }
        None => url.to_owned(),
    }
}
