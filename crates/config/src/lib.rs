//! forkd's configuration: a TOML file, `FORKD_*` environment overrides and
//! command-line overrides, turned into one validated [`Config`].
//!
//! - [`RawConfig`] mirrors the file; unknown keys are an error.
//! - [`RawConfig::set`] applies one override (`key`, string value) and is what
//!   both the environment and the command line go through.
//! - [`RawConfig::validate`] returns the distinct validated type [`Config`];
//!   nothing is bound or forked before it has succeeded.
//!
//! This crate reads the config file and the process environment and does no
//! other I/O.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The largest number of workers one instance may run.
pub const MAX_WORKERS: usize = 512;

/// Every key the file accepts, as dotted paths. Environment variables are the
/// same names upper-cased with `.` turned into `_` and `FORKD_` in front.
pub const KEYS: &[&str] = &[
    "instance",
    "listen",
    "backlog",
    "listener",
    "workers",
    "runtime_dir",
    "log_level",
    "log_file",
    "shutdown_timeout",
    "worker_timeout",
    "startup_timeout",
    "user",
    "group",
    "watchdog_quorum",
    "http.header_read_timeout",
    "http.max_connections",
    "http.max_header_bytes",
    "http.max_connections_per_client",
    "http.keepalive",
    "http.trusted_proxies",
    "redis.url",
    "redis.password_file",
    "redis.prefix",
    "redis.command_timeout",
    "redis.connect_timeout",
    "redis.reconnect_max_delay",
    "redis.server",
    "redis.data_dir",
    "auth.argon2_memory_kib",
    "auth.argon2_iterations",
    "auth.argon2_parallelism",
    "auth.max_concurrent_hashes",
    "auth.hash_queue_timeout",
    "auth.session_idle_timeout",
    "auth.session_absolute_timeout",
    "auth.login_ip_limit",
    "auth.login_ip_window",
    "auth.login_user_limit",
    "auth.login_user_window",
    "auth.login_user_all_limit",
    "auth.login_user_all_window",
    "auth.login_host_limit",
    "auth.login_host_window",
    "profile.origin",
    "profile.origin_timeout",
    "profile.cache_ttl",
    "profile.lock_timeout",
    "profile.lock_wait",
    "metrics.allow",
    "rate_limit.on_redis_error",
    "rate_limit.profile.limit",
    "rate_limit.profile.window",
];

/// Environment variables that start with `FORKD_` but are not config keys.
const NON_KEY_VARS: &[&str] = &["FORKD_CONFIG", "FORKD_FAILPOINTS"];

/// A TOML error as line, column and what is wrong, without the offending
/// line itself: it may hold a secret (a password in `redis.url`).
fn parse_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let at = e.span().map(|span| {
        let start = span.start.min(text.len());
        let before = &text[..start];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        // The key of that line (never its value), under its table.
        let this = text[start..].split('\n').next().unwrap_or("");
        let this = format!("{}{this}", before.rsplit('\n').next().unwrap_or(""));
        let key = this.split_once('=').map(|(k, _)| k.trim()).filter(|k| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.\"".contains(c))
        });
        let table = before
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('[') && l.ends_with(']'))
            .map(|l| l.trim_matches(['[', ']']).trim());
        match (key, table) {
            (Some(k), Some(t)) => format!("line {line}, column {column}, key `{t}.{k}`: "),
            (Some(k), None) => format!("line {line}, column {column}, key `{k}`: "),
            _ => format!("line {line}, column {column}: "),
        }
    });
    ConfigError::Parse {
        path: path.to_owned(),
        message: format!("{}{}", at.unwrap_or_default(), e.message().trim_end()),
    }
}

/// A configuration error. Every message names the offending key or variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("unknown environment variable {0}: no config key of that name (keys: {keys})", keys = KEYS.join(", "))]
    UnknownVariable(String),
    #[error("unknown config key `{0}`")]
    UnknownKey(String),
    #[error("invalid value for `{key}`{origin}: {value:?} ({expected})")]
    Value {
        key: String,
        origin: String,
        value: String,
        expected: String,
    },
}

/// How workers accept connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerMode {
    /// One socket; every worker accepts on it.
    Shared,
    /// One SO_REUSEPORT socket per worker slot, kept by the supervisor.
    Reuseport,
}

/// `workers`: a count or `"auto"` (the machine's available parallelism).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    Auto,
    Count(usize),
}

impl Serialize for Workers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Workers::Auto => s.serialize_str("auto"),
            Workers::Count(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Count(i64),
            Text(String),
        }
        match Repr::deserialize(d)? {
            Repr::Count(n) if n >= 0 => Ok(Workers::Count(n as usize)),
            Repr::Count(n) => Err(serde::de::Error::custom(format!(
                "invalid value {n} for workers: expected \"auto\" or 1 to {MAX_WORKERS}"
            ))),
            Repr::Text(t) if t == "auto" => Ok(Workers::Auto),
            Repr::Text(t) => Err(serde::de::Error::custom(format!(
                "invalid value {t:?} for workers: expected \"auto\" or 1 to {MAX_WORKERS}"
            ))),
        }
    }
}

/// The `[http]` table as written in the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHttp {
    pub header_read_timeout: f64,
    pub max_connections: i64,
    pub max_header_bytes: i64,
    pub max_connections_per_client: i64,
    pub keepalive: bool,
    pub trusted_proxies: Vec<String>,
}

impl Default for RawHttp {
    fn default() -> Self {
        RawHttp {
            header_read_timeout: 15.0,
            max_connections: 4096,
            max_header_bytes: 32 * 1024,
            max_connections_per_client: 256,
            keepalive: true,
            trusted_proxies: Vec::new(),
        }
    }
}

/// The `[redis]` table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRedis {
    pub url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    pub prefix: String,
    pub command_timeout: f64,
    pub connect_timeout: f64,
    pub reconnect_max_delay: f64,
    pub server: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
}

impl Default for RawRedis {
    fn default() -> Self {
        RawRedis {
            url: String::new(),
            password_file: None,
            prefix: "forkd:".into(),
            command_timeout: 1.0,
            connect_timeout: 1.0,
            reconnect_max_delay: 1.0,
            server: "redis-server".into(),
            data_dir: None,
        }
    }
}

/// The `[auth]` table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAuth {
    pub argon2_memory_kib: i64,
    pub argon2_iterations: i64,
    pub argon2_parallelism: i64,
    pub max_concurrent_hashes: i64,
    pub hash_queue_timeout: f64,
    pub session_idle_timeout: f64,
    pub session_absolute_timeout: f64,
    pub login_ip_limit: i64,
    pub login_ip_window: f64,
    pub login_user_limit: i64,
    pub login_user_window: f64,
    pub login_user_all_limit: i64,
    pub login_user_all_window: f64,
    pub login_host_limit: i64,
    pub login_host_window: f64,
}

impl Default for RawAuth {
    fn default() -> Self {
        RawAuth {
            argon2_memory_kib: 19_456,
            argon2_iterations: 2,
            argon2_parallelism: 1,
            max_concurrent_hashes: 1,
            hash_queue_timeout: 0.5,
            session_idle_timeout: 1800.0,
            session_absolute_timeout: 86_400.0,
            login_ip_limit: 5,
            login_ip_window: 60.0,
            login_user_limit: 5,
            login_user_window: 60.0,
            login_user_all_limit: 100,
            login_user_all_window: 60.0,
            login_host_limit: 100,
            login_host_window: 1.0,
        }
    }
}

/// The `[profile]` table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawProfile {
    pub origin: String,
    pub origin_timeout: f64,
    pub cache_ttl: f64,
    pub lock_timeout: f64,
    pub lock_wait: f64,
}

impl Default for RawProfile {
    fn default() -> Self {
        RawProfile {
            origin: String::new(),
            origin_timeout: 2.0,
            cache_ttl: 300.0,
            lock_timeout: 5.0,
            lock_wait: 3.0,
        }
    }
}

/// The `[metrics]` table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMetrics {
    pub allow: Vec<String>,
}

impl Default for RawMetrics {
    fn default() -> Self {
        RawMetrics {
            allow: vec!["127.0.0.0/8".into(), "::1".into()],
        }
    }
}

/// One rate-limit policy as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPolicy {
    pub limit: i64,
    pub window: f64,
}

/// The `/profile` policy's defaults, key by key: a table that sets only
/// `limit` keeps the default `window`.
impl Default for RawPolicy {
    fn default() -> Self {
        RawPolicy {
            limit: 10,
            window: 60.0,
        }
    }
}

/// The `[rate_limit]` table: one policy per limited route.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRateLimit {
    pub on_redis_error: String,
    pub profile: RawPolicy,
}

impl Default for RawRateLimit {
    fn default() -> Self {
        RawRateLimit {
            on_redis_error: "local".into(),
            profile: RawPolicy::default(),
        }
    }
}

/// The configuration as written: every key optional, defaults filled in,
/// nothing checked beyond types.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub instance: String,
    pub listen: String,
    pub backlog: i64,
    pub listener: ListenerMode,
    pub workers: Workers,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime_dir: Option<PathBuf>,
    pub log_level: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_file: Option<PathBuf>,
    pub shutdown_timeout: f64,
    pub worker_timeout: f64,
    pub startup_timeout: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub watchdog_quorum: f64,
    pub http: RawHttp,
    pub redis: RawRedis,
    pub auth: RawAuth,
    pub profile: RawProfile,
    pub metrics: RawMetrics,
    pub rate_limit: RawRateLimit,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            instance: "forkd".into(),
            listen: "127.0.0.1:8080".into(),
            backlog: 1024,
            listener: ListenerMode::Shared,
            workers: Workers::Auto,
            runtime_dir: None,
            log_level: "info".into(),
            log_file: None,
            shutdown_timeout: 30.0,
            worker_timeout: 30.0,
            startup_timeout: 30.0,
            user: None,
            group: None,
            watchdog_quorum: 0.5,
            http: RawHttp::default(),
            redis: RawRedis::default(),
            auth: RawAuth::default(),
            profile: RawProfile::default(),
            metrics: RawMetrics::default(),
            rate_limit: RawRateLimit::default(),
        }
    }
}

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

/// An IP network, `ADDR/LEN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub len: u8,
}

impl Cidr {
    /// Whether `ip` is inside this network (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = addr.trim().parse().map_err(|_| ())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l.trim().parse::<u8>().map_err(|_| ())?,
            None => max,
        };
        if len > max {
            return Err(());
        }
        Ok(Cidr { addr, len })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
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
}

/// A validated configuration. Every value is in range; paths may still fail
/// to open when used.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub instance: String,
    pub listen: SocketAddr,
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
    pub worker_timeout: Duration,
    #[serde(serialize_with = "secs")]
    pub startup_timeout: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub watchdog_quorum: f64,
    pub http: Http,
    pub redis: Redis,
    pub auth: Auth,
    pub profile: Profile,
    pub metrics: Metrics,
    pub rate_limit: RateLimit,
}

/// Metrics settings of a validated config.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metrics {
    /// Who may read /metrics.
    pub allow: Vec<Cidr>,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
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

impl RawConfig {
    /// Parses a config file's text. `path` is only used in messages.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] naming the line and key for syntax errors,
    /// unknown keys and wrongly typed values.
    pub fn from_str(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| parse_error(path, text, &e))
    }

    /// Reads and parses a config file.
    ///
    /// # Errors
    /// [`ConfigError::Read`] when the file cannot be read, otherwise as
    /// [`RawConfig::from_str`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_str(&text, path)
    }

    /// Applies every `FORKD_*` variable of `vars` as an override.
    ///
    /// # Errors
    /// An unknown `FORKD_*` variable, or a value that does not parse.
    pub fn apply_env<I>(&mut self, vars: I) -> Result<(), ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut vars: Vec<_> = vars
            .into_iter()
            .filter(|(k, _)| {
                // FORKD_UPGRADE*: the supervisor's own upgrade state.
                k.starts_with("FORKD_")
                    && !k.starts_with("FORKD_UPGRADE")
                    && !NON_KEY_VARS.contains(&k.as_str())
            })
            .collect();
        vars.sort();
        for (name, value) in vars {
            let key = KEYS
                .iter()
                .find(|k| env_name(k) == name)
                .ok_or_else(|| ConfigError::UnknownVariable(name.clone()))?;
            self.set_from(key, &value, &format!(" (from {name})"))?;
        }
        Ok(())
    }

    /// Sets one key from its string form, as the command line does.
    ///
    /// # Errors
    /// An unknown key, or a value that does not parse for it.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        self.set_from(key, value, "")
    }

    fn set_from(&mut self, key: &str, value: &str, origin: &str) -> Result<(), ConfigError> {
        let bad = |expected: &str| ConfigError::Value {
            key: key.to_owned(),
            origin: origin.to_owned(),
            value: value.to_owned(),
            expected: expected.to_owned(),
        };
        let int = || {
            value
                .trim()
                .parse::<i64>()
                .map_err(|_| bad("expected a whole number"))
        };
        let float = || {
            value
                .trim()
                .parse::<f64>()
                .map_err(|_| bad("expected a number of seconds"))
        };
        match key {
            "instance" => self.instance = value.to_owned(),
            "listen" => self.listen = value.to_owned(),
            "backlog" => self.backlog = int()?,
            "listener" => {
                self.listener = match value {
                    "shared" => ListenerMode::Shared,
                    "reuseport" => ListenerMode::Reuseport,
                    _ => return Err(bad("expected \"shared\" or \"reuseport\"")),
                }
            }
            "workers" => {
                self.workers =
                    match value.trim() {
                        "auto" => Workers::Auto,
                        v => Workers::Count(v.parse::<usize>().map_err(|_| {
                            bad(&format!("expected \"auto\" or 1 to {MAX_WORKERS}"))
                        })?),
                    }
            }
            "runtime_dir" => self.runtime_dir = Some(value.into()),
            "log_level" => self.log_level = value.to_owned(),
            "log_file" => self.log_file = Some(value.into()),
            "shutdown_timeout" => self.shutdown_timeout = float()?,
            "worker_timeout" => self.worker_timeout = float()?,
            "startup_timeout" => self.startup_timeout = float()?,
            "user" => self.user = Some(value.to_owned()),
            "group" => self.group = Some(value.to_owned()),
            "watchdog_quorum" => {
                self.watchdog_quorum = value
                    .trim()
                    .parse()
                    .map_err(|_| bad("expected a fraction from 0 to 1"))?
            }
            "http.header_read_timeout" => self.http.header_read_timeout = float()?,
            "http.max_connections" => self.http.max_connections = int()?,
            "http.max_header_bytes" => self.http.max_header_bytes = int()?,
            "http.max_connections_per_client" => {
                self.http.max_connections_per_client = int()?;
            }
            "http.keepalive" => {
                self.http.keepalive = match value.trim() {
                    "true" | "1" | "yes" | "on" => true,
                    "false" | "0" | "no" | "off" => false,
                    _ => return Err(bad("expected true or false")),
                }
            }
            "http.trusted_proxies" => {
                self.http.trusted_proxies = value
                    .split(',')
                    .map(|v| v.trim().to_owned())
                    .filter(|v| !v.is_empty())
                    .collect()
            }
            "redis.url" => self.redis.url = value.to_owned(),
            "redis.prefix" => self.redis.prefix = value.to_owned(),
            "redis.password_file" => self.redis.password_file = Some(value.into()),
            "redis.command_timeout" => self.redis.command_timeout = float()?,
            "redis.connect_timeout" => self.redis.connect_timeout = float()?,
            "redis.reconnect_max_delay" => self.redis.reconnect_max_delay = float()?,
            "redis.server" => self.redis.server = value.to_owned(),
            "redis.data_dir" => self.redis.data_dir = Some(value.into()),
            "auth.argon2_memory_kib" => self.auth.argon2_memory_kib = int()?,
            "auth.argon2_iterations" => self.auth.argon2_iterations = int()?,
            "auth.argon2_parallelism" => self.auth.argon2_parallelism = int()?,
            "auth.max_concurrent_hashes" => self.auth.max_concurrent_hashes = int()?,
            "auth.hash_queue_timeout" => self.auth.hash_queue_timeout = float()?,
            "auth.session_idle_timeout" => self.auth.session_idle_timeout = float()?,
            "auth.session_absolute_timeout" => self.auth.session_absolute_timeout = float()?,
            "auth.login_ip_limit" => self.auth.login_ip_limit = int()?,
            "auth.login_ip_window" => self.auth.login_ip_window = float()?,
            "auth.login_user_limit" => self.auth.login_user_limit = int()?,
            "auth.login_user_window" => self.auth.login_user_window = float()?,
            "auth.login_user_all_limit" => self.auth.login_user_all_limit = int()?,
            "auth.login_user_all_window" => self.auth.login_user_all_window = float()?,
            "auth.login_host_limit" => self.auth.login_host_limit = int()?,
            "auth.login_host_window" => self.auth.login_host_window = float()?,
            "profile.origin" => self.profile.origin = value.to_owned(),
            "profile.origin_timeout" => self.profile.origin_timeout = float()?,
            "profile.cache_ttl" => self.profile.cache_ttl = float()?,
            "profile.lock_timeout" => self.profile.lock_timeout = float()?,
            "profile.lock_wait" => self.profile.lock_wait = float()?,
            "metrics.allow" => {
                self.metrics.allow = value
                    .split(',')
                    .map(|v| v.trim().to_owned())
                    .filter(|v| !v.is_empty())
                    .collect()
            }
            "rate_limit.on_redis_error" => self.rate_limit.on_redis_error = value.to_owned(),
            "rate_limit.profile.limit" => self.rate_limit.profile.limit = int()?,
            "rate_limit.profile.window" => self.rate_limit.profile.window = float()?,
            other => return Err(ConfigError::UnknownKey(other.to_owned())),
        }
        Ok(())
    }

    /// Checks every value and resolves `workers = "auto"` to `parallelism`.
    ///
    /// # Errors
    /// [`ConfigError::Value`] for the first value out of range.
    pub fn validate(self, parallelism: usize) -> Result<Config, ConfigError> {
        fn bad(key: &str, value: impl ToString, expected: &str) -> ConfigError {
            ConfigError::Value {
                key: key.to_owned(),
                origin: String::new(),
                value: value.to_string(),
                expected: expected.to_owned(),
            }
        }
        fn seconds(key: &str, v: f64, min: f64) -> Result<Duration, ConfigError> {
            if v.is_finite() && (min..=86_400.0).contains(&v) {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(bad(key, v, &format!("expected {min} to 86400 seconds")))
            }
        }

        let name_ok = !self.instance.is_empty()
            && self.instance.len() <= 64
            && self
                .instance
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !name_ok {
            return Err(bad(
                "instance",
                &self.instance,
                "expected 1 to 64 letters, digits, '-' or '_'",
            ));
        }
        let listen: SocketAddr = self.listen.parse().map_err(|_| {
            bad(
                "listen",
                &self.listen,
                "expected IP:PORT, e.g. 127.0.0.1:8080 or [::1]:8080",
            )
        })?;
        if !(1..=65_535).contains(&self.backlog) {
            return Err(bad("backlog", self.backlog, "expected 1 to 65535"));
        }
        let workers = match self.workers {
            Workers::Auto => parallelism.clamp(1, MAX_WORKERS),
            Workers::Count(n) if (1..=MAX_WORKERS).contains(&n) => n,
            Workers::Count(n) => {
                return Err(bad(
                    "workers",
                    n,
                    &format!("expected \"auto\" or 1 to {MAX_WORKERS}"),
                ))
            }
        };
        let levels = ["off", "error", "warn", "info", "debug", "trace"];
        if !levels.contains(&self.log_level.as_str()) {
            return Err(bad("log_level", &self.log_level, &levels.join(", ")));
        }
        for (key, path) in [
            ("runtime_dir", &self.runtime_dir),
            ("log_file", &self.log_file),
        ] {
            if let Some(p) = path {
                if !p.is_absolute() {
                    return Err(bad(key, p.display(), "expected an absolute path"));
                }
            }
        }
        // hyper's read buffer, which caps the head, is at least 8 KiB.
        if !(8192..=1 << 20).contains(&self.http.max_header_bytes) {
            return Err(bad(
                "http.max_header_bytes",
                self.http.max_header_bytes,
                "expected 8192 to 1048576 bytes",
            ));
        }
        if !(1..=1_000_000).contains(&self.http.max_connections_per_client) {
            return Err(bad(
                "http.max_connections_per_client",
                self.http.max_connections_per_client,
                "expected 1 to 1000000",
            ));
        }
        if !(1..=1_000_000).contains(&self.http.max_connections) {
            return Err(bad(
                "http.max_connections",
                self.http.max_connections,
                "expected 1 to 1000000",
            ));
        }
        fn count(key: &str, v: i64, min: i64, max: i64) -> Result<i64, ConfigError> {
            if (min..=max).contains(&v) {
                Ok(v)
            } else {
                Err(bad(key, v, &format!("expected {min} to {max}")))
            }
        }
        let cidrs = |key: &str, list: &[String]| -> Result<Vec<Cidr>, ConfigError> {
            list.iter()
                .map(|p| {
                    p.parse::<Cidr>()
                        .map_err(|_| bad(key, p, "expected IP or IP/LEN, e.g. 10.0.0.0/8 or ::1"))
                })
                .collect()
        };
        let trusted_proxies = cidrs("http.trusted_proxies", &self.http.trusted_proxies)?;
        let metrics_allow = cidrs("metrics.allow", &self.metrics.allow)?;
        // redis.url is checked where the client is (forkd_store::check_url).
        let url = self.redis.url.trim().to_owned();
        if self.redis.prefix.contains(['{', '}']) {
            return Err(bad(
                "redis.prefix",
                &self.redis.prefix,
                "must not contain '{' or '}' (forkd uses hash tags)",
            ));
        }
        if let Some(p) = &self.redis.data_dir {
            if !p.is_absolute() {
                return Err(bad(
                    "redis.data_dir",
                    p.display(),
                    "expected an absolute path",
                ));
            }
        }
        if self.redis.server.trim().is_empty() {
            return Err(bad(
                "redis.server",
                &self.redis.server,
                "expected a program name or path",
            ));
        }
        let origin = self.profile.origin.trim().trim_end_matches('/').to_owned();
        if !origin.is_empty() {
            let ok = origin
                .strip_prefix("http://")
                .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'));
            if !ok {
                return Err(bad(
                    "profile.origin",
                    &self.profile.origin,
                    "expected http://HOST:PORT",
                ));
            }
        }
        let a = &self.auth;
        let idle = seconds("auth.session_idle_timeout", a.session_idle_timeout, 1.0)?;
        let absolute = seconds(
            "auth.session_absolute_timeout",
            a.session_absolute_timeout,
            1.0,
        )?;
        let auth = Auth {
            argon2_memory_kib: count("auth.argon2_memory_kib", a.argon2_memory_kib, 8, 4_194_304)?
                as u32,
            argon2_iterations: count("auth.argon2_iterations", a.argon2_iterations, 1, 100)? as u32,
            argon2_parallelism: count("auth.argon2_parallelism", a.argon2_parallelism, 1, 64)?
                as u32,
            max_concurrent_hashes: count(
                "auth.max_concurrent_hashes",
                a.max_concurrent_hashes,
                1,
                1024,
            )? as usize,
            hash_queue_timeout: seconds("auth.hash_queue_timeout", a.hash_queue_timeout, 0.0)?,
            session_idle_timeout: idle,
            session_absolute_timeout: absolute,
            login_ip_limit: count("auth.login_ip_limit", a.login_ip_limit, 1, 1_000_000)? as u32,
            login_ip_window: seconds("auth.login_ip_window", a.login_ip_window, 0.001)?,
            login_user_limit: count("auth.login_user_limit", a.login_user_limit, 1, 1_000_000)?
                as u32,
            login_user_window: seconds("auth.login_user_window", a.login_user_window, 0.001)?,
            login_user_all_limit: count(
                "auth.login_user_all_limit",
                a.login_user_all_limit,
                1,
                1_000_000,
            )? as u32,
            login_user_all_window: seconds(
                "auth.login_user_all_window",
                a.login_user_all_window,
                0.001,
            )?,
            login_host_limit: count("auth.login_host_limit", a.login_host_limit, 1, 1_000_000)?
                as u32,
            login_host_window: seconds("auth.login_host_window", a.login_host_window, 0.001)?,
        };
        if auth.argon2_memory_kib < 8 * auth.argon2_parallelism {
            return Err(bad(
                "auth.argon2_memory_kib",
                auth.argon2_memory_kib,
                "expected at least 8 x argon2_parallelism",
            ));
        }
        let rl = &self.rate_limit.profile;
        let on_redis_error = match self.rate_limit.on_redis_error.as_str() {
            "fail_open" => OnRedisError::FailOpen,
            "fail_closed" => OnRedisError::FailClosed,
            "local" => OnRedisError::Local,
            other => {
                return Err(bad(
                    "rate_limit.on_redis_error",
                    other,
                    "expected \"local\", \"fail_open\" or \"fail_closed\"",
                ))
            }
        };
        let rate_limit = RateLimit {
            on_redis_error,
            profile: Policy {
                limit: count("rate_limit.profile.limit", rl.limit, 1, 1_000_000_000)? as u32,
                window: seconds("rate_limit.profile.window", rl.window, 0.001)?,
            },
        };
        let p = &self.profile;
        let profile = Profile {
            origin,
            origin_timeout: seconds("profile.origin_timeout", p.origin_timeout, 0.001)?,
            cache_ttl: seconds("profile.cache_ttl", p.cache_ttl, 0.001)?,
            lock_timeout: seconds("profile.lock_timeout", p.lock_timeout, 0.01)?,
            lock_wait: seconds("profile.lock_wait", p.lock_wait, 0.0)?,
        };
        let r = &self.redis;
        if let Some(p) = &r.password_file {
            if !p.is_absolute() {
                return Err(bad(
                    "redis.password_file",
                    p.display(),
                    "expected an absolute path",
                ));
            }
        }
        let redis = Redis {
            url,
            password_file: r.password_file.clone(),
            prefix: r.prefix.clone(),
            command_timeout: seconds("redis.command_timeout", r.command_timeout, 0.001)?,
            connect_timeout: seconds("redis.connect_timeout", r.connect_timeout, 0.001)?,
            reconnect_max_delay: seconds("redis.reconnect_max_delay", r.reconnect_max_delay, 0.05)?,
            server: r.server.clone(),
            data_dir: r.data_dir.clone(),
        };
        if !(self.watchdog_quorum.is_finite() && (0.0..=1.0).contains(&self.watchdog_quorum)) {
            return Err(bad(
                "watchdog_quorum",
                self.watchdog_quorum,
                "expected a fraction from 0 to 1",
            ));
        }
        for (key, v) in [("user", &self.user), ("group", &self.group)] {
            if v.as_ref()
                .is_some_and(|n| n.is_empty() || n.contains(['/', ':', '\n']))
            {
                return Err(bad(
                    key,
                    v.as_deref().unwrap_or(""),
                    "expected an account name",
                ));
            }
        }
        if self.listener == ListenerMode::Reuseport && self.user.is_some() {
            // SO_REUSEPORT only lets sockets of one user share a port, and
            // slot sockets are bound when their worker starts, after the
            // supervisor has given up root.
            return Err(bad(
                "listener",
                "reuseport",
                "cannot be combined with `user`: every SO_REUSEPORT socket must be \
                 bound by one user, and forkd binds a slot's socket after dropping \
                 privileges; use listener = \"shared\", or start forkd as that user \
                 (systemd's User=)",
            ));
        }
        if self.group.is_some() && self.user.is_none() {
            return Err(bad(
                "group",
                self.group.as_deref().unwrap_or(""),
                "set together with user",
            ));
        }
        Ok(Config {
            instance: self.instance,
            listen,
            backlog: self.backlog as u32,
            listener: self.listener,
            workers,
            runtime_dir: self.runtime_dir,
            log_level: self.log_level,
            log_file: self.log_file,
            shutdown_timeout: seconds("shutdown_timeout", self.shutdown_timeout, 0.0)?,
            worker_timeout: seconds("worker_timeout", self.worker_timeout, 0.5)?,
            startup_timeout: seconds("startup_timeout", self.startup_timeout, 0.5)?,
            user: self.user,
            group: self.group,
            watchdog_quorum: self.watchdog_quorum,
            http: Http {
                header_read_timeout: seconds(
                    "http.header_read_timeout",
                    self.http.header_read_timeout,
                    0.1,
                )?,
                max_connections: self.http.max_connections as usize,
                max_header_bytes: self.http.max_header_bytes as usize,
                max_connections_per_client: self.http.max_connections_per_client as usize,
                keepalive: self.http.keepalive,
                trusted_proxies,
            },
            redis,
            auth,
            profile,
            metrics: Metrics {
                allow: metrics_allow,
            },
            rate_limit,
        })
    }
}

/// Where a running instance can be found: all the CLI's client commands
/// (stop, reload, status, scale) need, read leniently so that they still
/// work while the file holds a value that a start would reject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub instance: String,
    pub runtime_dir: Option<PathBuf>,
}

impl Location {
    /// `instance` and `runtime_dir` from the file (if any) and the
    /// `FORKD_INSTANCE` / `FORKD_RUNTIME_DIR` variables of `vars`.
    ///
    /// # Errors
    /// The file cannot be read or is not TOML.
    pub fn load<I>(file: Option<&Path>, vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut loc = Location {
            instance: RawConfig::default().instance,
            runtime_dir: None,
        };
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            let table: toml::Table =
                toml::from_str(&text).map_err(|e| parse_error(path, &text, &e))?;
            if let Some(i) = table.get("instance").and_then(|v| v.as_str()) {
                loc.instance = i.to_owned();
            }
            if let Some(d) = table.get("runtime_dir").and_then(|v| v.as_str()) {
                loc.runtime_dir = Some(d.into());
            }
        }
        for (k, v) in vars {
            if k == env_name("instance") {
                loc.instance = v;
            } else if k == env_name("runtime_dir") {
                loc.runtime_dir = Some(v.into());
            }
        }
        Ok(loc)
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

/// The environment variable that overrides `key`.
pub fn env_name(key: &str) -> String {
    format!("FORKD_{}", key.replace('.', "_").to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RawConfig, ConfigError> {
        RawConfig::from_str(text, Path::new("test.toml"))
    }

    #[test]
    fn a_syntax_error_names_the_place_but_never_echoes_the_line() {
        let text = "workers = 2\n[redis]\nurl = \"redis://app:s3cret-PASSWORD@db:6379\" oops\n";
        let e = parse(text).unwrap_err().to_string();
        assert!(!e.contains("s3cret"), "{e}");
        assert!(e.contains("test.toml") && e.contains("line 3"), "{e}");
        assert!(e.contains("`redis.url`"), "{e}");
        // The client commands' lenient read of the file says the same.
        let file = std::env::temp_dir().join(format!("forkd-config-{}.toml", std::process::id()));
        std::fs::write(&file, text).unwrap();
        let e = Location::load(Some(&file), Vec::new())
            .err()
            .unwrap()
            .to_string();
        std::fs::remove_file(&file).unwrap();
        assert!(!e.contains("s3cret") && e.contains("line 3"), "{e}");
    }

    #[test]
    fn every_table_falls_back_to_its_defaults_key_by_key() {
        let d = RawConfig::default().validate(2).unwrap();
        // One key of each table: the others keep their defaults.
        let one = |text: &str| parse(text).unwrap().validate(2).unwrap();
        let c = one("[rate_limit.profile]\nlimit = 5\n");
        assert_eq!(c.rate_limit.profile.limit, 5);
        assert_eq!(c.rate_limit.profile.window, d.rate_limit.profile.window);
        let c = one("[rate_limit.profile]\nwindow = 30\n");
        assert_eq!(c.rate_limit.profile.limit, d.rate_limit.profile.limit);
        let c = one("[rate_limit]\non_redis_error = \"fail_open\"\n");
        assert_eq!(c.rate_limit.profile, d.rate_limit.profile);
        let c = one("[http]\nkeepalive = false\n");
        assert_eq!(c.http.max_connections, d.http.max_connections);
        assert!(!c.http.keepalive);
        let c = one("[redis]\nprefix = \"x:\"\n");
        assert_eq!(c.redis.command_timeout, d.redis.command_timeout);
        let c = one("[auth]\nlogin_ip_limit = 7\n");
        assert_eq!(c.auth.login_ip_limit, 7);
        assert_eq!(c.auth.login_ip_window, d.auth.login_ip_window);
        assert_eq!(c.auth.argon2_memory_kib, d.auth.argon2_memory_kib);
        let c = one("[profile]\ncache_ttl = 5\n");
        assert_eq!(c.profile.origin_timeout, d.profile.origin_timeout);
        let c = one("[metrics]\nallow = [\"10.0.0.0/8\"]\n");
        assert_eq!(c.metrics.allow.len(), 1);
    }

    #[test]
    fn reuseport_with_a_user_to_drop_to_is_refused() {
        let e = parse("listener = \"reuseport\"\nuser = \"nobody\"\n")
            .unwrap()
            .validate(2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("listener") && e.contains("user"), "{e}");
        assert!(parse("listener = \"reuseport\"\n")
            .unwrap()
            .validate(2)
            .is_ok());
        assert!(parse("user = \"nobody\"\n").unwrap().validate(2).is_ok());
    }

    #[test]
    fn defaults_validate() {
        let c = RawConfig::default().validate(4).unwrap();
        assert_eq!(c.workers, 4);
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.listener, ListenerMode::Shared);
    }

    #[test]
    fn the_example_file_is_valid_and_lists_every_key() {
        let text = include_str!("../../../config/forkd.toml");
        parse(text).unwrap().validate(2).unwrap();
        for key in KEYS {
            let leaf = key.rsplit('.').next().unwrap();
            assert!(
                text.lines()
                    .any(|l| l.trim_start_matches("# ").starts_with(&format!("{leaf} ="))),
                "config/forkd.toml does not document `{key}`"
            );
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse("listen = \"127.0.0.1:1\"\nworkerz = 3\n").unwrap_err();
        assert!(e.to_string().contains("workerz"), "{e}");
        let e = parse("[http]\nmax_conn = 3\n").unwrap_err();
        assert!(e.to_string().contains("max_conn"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = parse("workers = 0").unwrap().validate(2).unwrap_err();
        assert!(e.to_string().contains("`workers`"), "{e}");
        let e = parse("workers = \"many\"").unwrap_err();
        assert!(e.to_string().contains("workers"), "{e}");
        let e = parse("listen = \"localhost\"")
            .unwrap()
            .validate(2)
            .unwrap_err();
        assert!(e.to_string().contains("`listen`"), "{e}");
        let e = parse("worker_timeout = 0")
            .unwrap()
            .validate(2)
            .unwrap_err();
        assert!(e.to_string().contains("`worker_timeout`"), "{e}");
        let e = parse("instance = \"a/b\"")
            .unwrap()
            .validate(2)
            .unwrap_err();
        assert!(e.to_string().contains("`instance`"), "{e}");
        let e = parse("log_file = \"rel.log\"")
            .unwrap()
            .validate(2)
            .unwrap_err();
        assert!(e.to_string().contains("`log_file`"), "{e}");
    }

    #[test]
    fn env_overrides_file_and_unknown_variables_fail() {
        let mut c = parse("workers = 3\nlisten = \"127.0.0.1:1\"").unwrap();
        c.apply_env([
            ("FORKD_WORKERS".to_string(), "5".to_string()),
            ("FORKD_HTTP_KEEPALIVE".to_string(), "false".to_string()),
            ("FORKD_CONFIG".to_string(), "/x".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ])
        .unwrap();
        let c2 = c.clone().validate(1).unwrap();
        assert_eq!(c2.workers, 5);
        assert!(!c2.http.keepalive);
        let e = c
            .apply_env([("FORKD_WORKRES".to_string(), "5".to_string())])
            .unwrap_err();
        assert!(e.to_string().contains("FORKD_WORKRES"), "{e}");
        let e = c
            .apply_env([("FORKD_BACKLOG".to_string(), "lots".to_string())])
            .unwrap_err();
        assert!(e.to_string().contains("FORKD_BACKLOG"), "{e}");
        assert!(e.to_string().contains("`backlog`"), "{e}");
    }

    #[test]
    fn every_key_can_be_set() {
        for key in KEYS {
            let value = match *key {
                "listener" => "reuseport",
                "http.keepalive" => "true",
                "runtime_dir" | "log_file" => "/tmp/x",
                "instance"
                | "listen"
                | "log_level"
                | "redis.url"
                | "redis.prefix"
                | "redis.server"
                | "profile.origin"
                | "http.trusted_proxies" => continue,
                "redis.data_dir" => "/tmp/y",
                "redis.password_file" => "/tmp/pw",
                _ => "7",
            };
            RawConfig::default().set(key, value).unwrap();
        }
        assert!(RawConfig::default().set("nope", "1").is_err());
    }

    #[test]
    fn location_ignores_values_a_start_would_reject() {
        let dir = std::env::temp_dir().join(format!("forkd-loc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "instance = \"a\"\nworkers = \"lots\"\nruntime_dir = \"/r\"\n",
        )
        .unwrap();
        let loc = Location::load(Some(&file), []).unwrap();
        assert_eq!(loc.instance, "a");
        assert_eq!(loc.runtime_dir, Some(PathBuf::from("/r")));
        let loc = Location::load(Some(&file), [("FORKD_INSTANCE".into(), "b".into())]).unwrap();
        assert_eq!(loc.instance, "b");
        std::fs::write(&file, "instance = ").unwrap();
        assert!(Location::load(Some(&file), []).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact_url("redis://u:pw@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact_url("rediss://pw@h:1"), "rediss://***@h:1");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
        let mut c = RawConfig::default();
        c.set("redis.url", "redis://app:hunter2@127.0.0.1:6379")
            .unwrap();
        let text = c.validate(1).unwrap().to_toml();
        assert!(!text.contains("hunter2"), "{text}");
        // A bad URL is refused by forkd_store::check_url (tests/cli.rs).
    }

    #[test]
    fn trusted_proxies_are_cidrs() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        let c: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(c.contains("2001:db8:1::1".parse().unwrap()));
        let c: Cidr = "127.0.0.1".parse().unwrap();
        assert!(c.contains("127.0.0.1".parse().unwrap()));
        assert!(!c.contains("127.0.0.2".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        let e = parse("[http]\ntrusted_proxies = [\"nope\"]")
            .unwrap()
            .validate(1)
            .unwrap_err();
        assert!(e.to_string().contains("trusted_proxies"), "{e}");
    }

    #[test]
    fn effective_config_round_trips() {
        let c = RawConfig::default().validate(2).unwrap();
        let again = parse(&c.to_toml()).unwrap().validate(9).unwrap();
        assert_eq!(c, again);
    }
}
