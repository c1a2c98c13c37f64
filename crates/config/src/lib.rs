//! forkd's configuration: a TOML file, `FORKD_*` environment overrides and
//! command-line overrides, turned into one validated [`Config`].
//!
//! - `raw`: [`RawConfig`] mirrors the file, one struct per table with its
//!   defaults; unknown keys are an error. Where a key is added.
//! - `overrides`: [`RawConfig::set`] applies one override (`key`, string
//!   value) for the environment and the command line alike; [`keys`] lists
//!   every key, derived from the serialized defaults.
//! - `validate`: [`RawConfig::validate`] returns the distinct validated
//!   type [`Config`] (in `config`), table by table; nothing is bound or
//!   forked before it has succeeded.
//! - `routes`: `[[route]]` (a prefix forwarded to an upstream) and
//!   `[proxy]`, as written and validated.
//! - `listen`: one address, or several listeners (plain, TLS, PROXY
//!   protocol, redirect to HTTPS).
//! - `tls`: `[tls]` (the certificate and key files, HSTS) and `[http2]`.
//! - `check`: the value checks the tables share.
//! - `cidr`: IP networks for the allow-lists.
//! - `location`: the lenient read the client commands use.
//!
//! This crate reads the config file and the process environment and does no
//! other I/O.
#![forbid(unsafe_code)]

mod check;
mod cidr;
mod config;
mod listen;
mod location;
mod overrides;
mod raw;
mod reference;
#[cfg(test)]
mod reference_tests;
mod routes;
#[cfg(test)]
mod routes_tests;
#[cfg(test)]
mod tests;
mod tls;
mod upstreams;
mod validate;

use std::path::PathBuf;

pub use cidr::Cidr;
pub use config::{
    redact_url, Auth, Config, Http, Metrics, OnRedisError, Policy, Profile, RateLimit, Recycle,
    Redis,
};
pub use listen::{Listen, RawListen, RawListener, MAX_LISTENERS};
pub use location::Location;
pub use overrides::keys;
pub use raw::{
    AccessLogFormat, ListenerMode, RawAuth, RawConfig, RawHttp, RawMetrics, RawPolicy, RawProfile,
    RawRateLimit, RawRecycle, RawRedis, Workers,
};
pub use reference::key_table;
pub use routes::{
    NamedPolicy, PolicyKey, Proxy, RawNamedPolicy, RawProxy, RawRoute, Route, RouteAuth,
    BUILTIN_POLICIES, BUILT_IN_PATHS,
};
pub use tls::{Http2, RawHttp2, RawTls, Tls};
pub use upstreams::{
    Health, RawHealth, RawUpstreamTls, RawUpstreams, Upstream, UpstreamTls, Upstreams,
    MAX_UPSTREAMS,
};

/// The largest number of workers one instance may run.
pub const MAX_WORKERS: usize = 512;

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
    /// A `FORKD_*` variable that is no key's but looks like a mistyped
    /// one's (other unknown `FORKD_*` variables are passed over).
    #[error(
        "unknown environment variable {name}{hint}: no config key has that name, and a \
         FORKD_ variable close to a key's or under a table's prefix (FORKD_HTTP_...) is taken \
         for a mistyped override (keys: {keys})",
        hint = nearest.as_ref().map(|n| format!(" (did you mean {n}?)")).unwrap_or_default(),
        keys = keys().join(", ")
    )]
    UnknownVariable {
        name: String,
        nearest: Option<String>,
    },
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

/// The environment variable that overrides `key`.
pub fn env_name(key: &str) -> String {
    format!("FORKD_{}", key.replace('.', "_").to_ascii_uppercase())
}
