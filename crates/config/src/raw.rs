//! The configuration as written: the file's tables as structs, each with
//! its defaults, so that every key is optional and a table that sets one
//! key keeps the others' defaults. Nothing is checked here beyond types.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::routes::{RawNamedPolicy, RawProxy, RawRoute};
use crate::{ConfigError, MAX_WORKERS};

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
        // A count may come as text, as overrides give it ("3").
        let expected = || format!("expected \"auto\" or 1 to {MAX_WORKERS}");
        match Repr::deserialize(d)? {
            Repr::Count(n) => usize::try_from(n)
                .map(Workers::Count)
                .map_err(|_| serde::de::Error::custom(expected())),
            Repr::Text(t) if t.trim() == "auto" => Ok(Workers::Auto),
            Repr::Text(t) => t
                .trim()
                .parse::<usize>()
                .map(Workers::Count)
                .map_err(|_| serde::de::Error::custom(expected())),
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

/// `access_log`: one line per request, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    Off,
    /// Apache/nginx "combined", with duration, worker and request id after.
    Combined,
    /// One JSON object a line.
    Json,
}

/// The `[recycle]` table: when a worker is replaced for its own sake.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRecycle {
    pub max_requests: i64,
    pub max_requests_jitter: i64,
    /// MiB.
    pub max_rss: i64,
    /// Seconds.
    pub max_age: f64,
}

/// The `[redis]` table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRedis {
    pub url: String,
    pub password_file: Option<PathBuf>,
    pub prefix: String,
    pub command_timeout: f64,
    pub connect_timeout: f64,
    pub reconnect_max_delay: f64,
    /// MiB; 0: no near cache.
    pub near_cache_mib: i64,
    /// Seconds.
    pub near_cache_max_age: f64,
    pub server: String,
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
            near_cache_mib: 64,
            near_cache_max_age: 60.0,
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
    pub cookie: bool,
    pub cookie_name: String,
    pub cookie_secure: bool,
}

impl Default for RawAuth {
    fn default() -> Self {
        RawAuth {
            argon2_memory_kib: 19_456,
            argon2_iterations: 2,
            argon2_parallelism: 1,
            max_concurrent_hashes: 0,
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
            cookie: false,
            cookie_name: "forkd_session".into(),
            cookie_secure: true,
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
    pub lease: i64,
}

/// The `/profile` policy's defaults, key by key: a table that sets only
/// `limit` keeps the default `window`.
impl Default for RawPolicy {
    fn default() -> Self {
        RawPolicy {
            limit: 10,
            window: 60.0,
            lease: 1,
        }
    }
}

/// The `[rate_limit]` table: one policy per limited route.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRateLimit {
    pub on_redis_error: String,
    pub profile: RawPolicy,
    /// `[rate_limit.policy.NAME]`, for routes.
    pub policy: std::collections::BTreeMap<String, RawNamedPolicy>,
}

impl Default for RawRateLimit {
    fn default() -> Self {
        RawRateLimit {
            on_redis_error: "local".into(),
            profile: RawPolicy::default(),
            policy: std::collections::BTreeMap::new(),
        }
    }
}

/// The configuration as written: every key optional, defaults filled in,
/// nothing checked beyond types.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub instance: String,
    pub listen: crate::listen::RawListen,
    pub backlog: i64,
    pub listener: ListenerMode,
    pub workers: Workers,
    pub runtime_dir: Option<PathBuf>,
    pub log_level: String,
    pub log_file: Option<PathBuf>,
    pub shutdown_timeout: f64,
    pub shutdown_delay: f64,
    pub access_log: AccessLogFormat,
    pub access_log_file: Option<PathBuf>,
    pub worker_timeout: f64,
    pub startup_timeout: f64,
    pub user: Option<String>,
    pub group: Option<String>,
    pub watchdog_quorum: f64,
    pub http: RawHttp,
    pub recycle: RawRecycle,
    pub redis: RawRedis,
    pub auth: RawAuth,
    pub profile: RawProfile,
    pub metrics: RawMetrics,
    pub rate_limit: RawRateLimit,
    pub proxy: RawProxy,
    pub tls: crate::tls::RawTls,
    pub http2: crate::tls::RawHttp2,
    /// `[[route]]` tables, in the file's order. Not a key of its own for
    /// overrides: a route is set in the file only.
    pub route: Vec<RawRoute>,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            instance: "forkd".into(),
            listen: crate::listen::RawListen::One("127.0.0.1:8080".into()),
            backlog: 1024,
            listener: ListenerMode::Shared,
            workers: Workers::Auto,
            runtime_dir: None,
            log_level: "info".into(),
            log_file: None,
            shutdown_timeout: 30.0,
            shutdown_delay: 0.0,
            access_log: AccessLogFormat::Off,
            access_log_file: None,
            worker_timeout: 30.0,
            startup_timeout: 30.0,
            user: None,
            group: None,
            watchdog_quorum: 0.5,
            http: RawHttp::default(),
            recycle: RawRecycle::default(),
            redis: RawRedis::default(),
            auth: RawAuth::default(),
            profile: RawProfile::default(),
            metrics: RawMetrics::default(),
            rate_limit: RawRateLimit::default(),
            proxy: RawProxy::default(),
            tls: crate::tls::RawTls::default(),
            http2: crate::tls::RawHttp2::default(),
            route: Vec::new(),
        }
    }
}

impl RawConfig {
    /// Parses a config file's text. `path` is only used in messages.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] naming the line and key for syntax errors,
    /// unknown keys and wrongly typed values.
    pub fn from_str(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| parse_error(path, text, &e))?;
        // TOML has nan and inf; no key takes them, and an override (which
        // rewrites the whole config) could not carry them.
        raw.check_finite()?;
        Ok(raw)
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
}

/// A TOML error as line, column and what is wrong, without the offending
/// line itself: it may hold a secret (a password in `redis.url`).
pub(crate) fn parse_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
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
    let message = e.message().trim_end();
    ConfigError::Parse {
        path: path.to_owned(),
        message: format!(
            "{}{}",
            at.unwrap_or_default(),
            unknown_key(message).unwrap_or_else(|| message.to_owned())
        ),
    }
}

/// serde's "unknown field `X`, expected one of `a`, `b`, …" said as an
/// operator wants it: the nearest key when one is within two edits (one
/// for a key of five letters or fewer), else the keys there are.
fn unknown_key(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (key, rest) = rest.split_once('`')?;
    let known: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    let nearest = known
        .iter()
        .map(|k| (strsim::osa_distance(key, k), *k))
        .filter(|(d, k)| *d <= if k.len() <= 5 { 1 } else { 2 })
        .min();
    Some(match nearest {
        Some((_, k)) => format!("unknown key `{key}`; did you mean `{k}`?"),
        None if known.is_empty() => format!("unknown key `{key}`: this table takes no keys"),
        None => format!(
            "unknown key `{key}`; the keys here are {}",
            known.join(", ")
        ),
    })
}
