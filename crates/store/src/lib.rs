//! forkd's shared state in Redis, through fred. The only crate that knows
//! Redis: fred's types never leave it.
//!
//! - [`Store`] (this file: the types, the key layout, the script runner):
//!   one client per worker (or CLI run), created inside a tokio runtime
//!   after fork.
//! - `connection`: building and connecting the client; it reconnects by
//!   itself with capped exponential backoff and jitter, and answers
//!   [`StoreError::Unavailable`] at once while disconnected.
//! - `users`, `sessions`, `profile` (the one-round-trip check, the cache
//!   and its single-flight lock) and `limits` (GCRA for anonymous keys):
//!   typed operations, one file each.
//! - `scripts`: the Lua scripts; each reads the Redis clock and touches only
//!   the keys it is given, which share one hash slot.
//!
//! Key layout (`P` is the configured prefix, `UID` a random per-user tag
//! that every token of the user carries, so a user's keys share a slot):
//!
//! | key | type | what |
//! |---|---|---|
//! | `P` `user:NAME` | hash | phc, role, display_name, created_at, last_login, uid, gen |
//! | `P{UID}:sess:SHA256(TOKEN)` | hash | user, abs (absolute expiry, ms), gen; TTL = idle timeout |
//! | `P{UID}:epoch` | string | revocation epoch: sessions of a lower gen are invalid |
//! | `P{UID}:sessions` | sorted set | the user's session hashes, scored by absolute expiry |
//! | `P{UID}:profile` | string | cached profile JSON, TTL with jitter |
//! | `P{UID}:profile:lock` | string | single-flight lock (SET NX PX) |
//! | `P` `rl:POLICY:KEY` | string | GCRA state of a login limit (by client, by name) |
//! | `P{UID}:rl:POLICY:uSCOPE` | string | a policy bucket of a user (SCOPE "" or a route; `/profile`'s is `rl:profile:u`) |
//! | `P{TAG}:cache:TARGET#VARIANT` | string | a cached response of a GET route (TAG: the user's, or `s:` and a hash of the URL) |
//! | `P{TAG}:cachevary:TARGET` | string | the header names that URL's responses vary on |
//! | `P{TAG}:cachevariants:TARGET#HOST` | set | that URL's entry keys for one `Host` (a hash), all ended by a successful write to it |
//! | `P{TAG}:cachelock:TARGET#VARIANT` | string | the single-flight lock of an entry |
//! | `P{cacheindex}:entries` | sorted set | every entry key, by expiry, for `forkd cache purge` |
//! | `P{GROUP}:rl:POLICY:NAME` | string | a policy bucket of a client (`c:ADDR`) or a header value (`h:HASH`) |
#![forbid(unsafe_code)]

mod cache;
mod connection;
mod near;
mod routes;
mod scripts;
mod sessions;
mod users;

use std::time::Duration;

pub use cache::{CacheLookup, CacheScope, CacheUrl};
pub use near::{NearCounts, NearSession};
pub use routes::{Bucket, CacheProbe, Limit, RouteCheck, SessionRef};

use fred::prelude::*;
use fred::types::scripts::Script;

/// How to reach Redis.
#[derive(Clone)]
pub struct StoreConfig {
    /// `redis://`, `rediss://` or `redis+unix:///path`.
    pub url: String,
    /// Prepended to every key.
    pub prefix: String,
    /// Every command fails after this (fred has no default).
    pub command_timeout: Duration,
    pub connect_timeout: Duration,
    /// Reconnect delays grow from 50 ms up to this, plus jitter.
    pub reconnect_max_delay: Duration,
    /// A password to use instead of (or as well as none in) the URL, e.g.
    /// read from `redis.password_file`. Never logged.
    pub password: Option<String>,
    /// The near cache's size in bytes (0: none), and the longest it keeps
    /// anything.
    pub near_cache_bytes: usize,
    pub near_cache_max_age: Duration,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("prefix", &self.prefix)
            .field("command_timeout", &self.command_timeout)
            .finish_non_exhaustive()
    }
}

/// A store failure. Messages never contain secrets.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid redis.url: {0}")]
    Config(String),
    #[error("redis is unavailable: {0}")]
    Unavailable(String),
    #[error("user '{0}' already exists")]
    UserExists(String),
    #[error("no user '{0}'")]
    NoSuchUser(String),
    #[error("unexpected reply from redis: {0}")]
    Protocol(String),
}

impl From<Error> for StoreError {
    fn from(e: Error) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

type Result<T> = std::result::Result<T, StoreError>;

/// A stored user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    /// The argon2id PHC string.
    pub phc: String,
    pub role: String,
    pub display_name: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds, 0 for never.
    pub last_login: u64,
    /// The per-user tag that every token of this user carries.
    pub uid: String,
    /// Raised by every password change and revocation; a session carries
    /// the generation its login read, and is valid only while it is not
    /// below the user's revocation epoch.
    pub generation: u64,
}

/// A rate-limit policy: `limit` requests per `window`, GCRA with a burst of
/// `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub limit: u32,
    pub window: Duration,
    /// Cells a worker takes at once (1: exact, one call a request).
    pub lease: u32,
}

/// A rate-limit answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Requests left in the window.
    pub remaining: u64,
    /// Until the window is whole again.
    pub reset: Duration,
    /// When denied: until the next request is allowed.
    pub retry_after: Duration,
    /// Cells taken: 1, or up to the policy's lease.
    pub cells: u32,
}

/// Whether `name` is a valid user name: 1 to 64 of ASCII letters, digits,
/// '.', '_', '-' and '@'. Checked before a name reaches a key (a `{` would
/// steer Redis Cluster's hash slot) or a password hash is computed.
pub fn valid_username(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b))
}

/// Checks that fred accepts `url`, without connecting. The one check of
/// `redis.url`: at start, at reload and by `forkd check-config`.
///
/// # Errors
/// [`StoreError::Config`] naming the problem (never the URL: it may carry a
/// password).
pub fn check_url(url: &str) -> Result<()> {
    const SCHEMES: [&str; 7] = [
        "redis://",
        "rediss://",
        "redis+unix://",
        "redis-cluster://",
        "rediss-cluster://",
        "redis-sentinel://",
        "rediss-sentinel://",
    ];
    if !SCHEMES.iter().any(|s| url.starts_with(s)) {
        return Err(StoreError::Config(
            "expected redis://, rediss:// or redis+unix:// (or redis-cluster://, \
             redis-sentinel://; empty for a managed redis-server)"
                .into(),
        ));
    }
    Config::from_url(url)
        .map(|_| ())
        .map_err(|e| StoreError::Config(format!("not a URL the client takes: {}", e.details())))
}

/// A handle to Redis. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    client: Client,
    prefix: String,
    url_kind: &'static str,
    max_delay: Duration,
    /// Redis Cluster (read once: fred's config is cloned to be read).
    clustered: bool,
    /// The near cache (None: off), and its readers (one a primary) while
    /// tracking is on.
    near: Option<std::sync::Arc<near::Near>>,
    near_readers: std::sync::Arc<std::sync::Mutex<Option<std::sync::Arc<near::Readers>>>>,
}

impl Store {
    fn user_key(&self, name: &str) -> String {
        format!("{}user:{name}", self.prefix)
    }
    /// `PREFIX{tag}:` and `rest` joined, made without a formatter: a
    /// routed request makes several.
    fn tagged_key(&self, tag: &str, rest: &[&str]) -> String {
        let len = rest.iter().map(|r| r.len()).sum::<usize>();
        let mut key = String::with_capacity(self.prefix.len() + tag.len() + 3 + len);
        for part in [&self.prefix, "{", tag, "}:"]
            .into_iter()
            .chain(rest.iter().copied())
        {
            key.push_str(part);
        }
        key
    }
    fn tagged(&self, uid: &str, rest: &str) -> String {
        self.tagged_key(uid, &[rest])
    }
    fn session_key(&self, uid: &str, token_hash: &str) -> String {
        self.tagged_key(uid, &["sess:", token_hash])
    }
    fn index_key(&self, uid: &str) -> String {
        self.tagged(uid, "sessions")
    }
    fn epoch_key(&self, uid: &str) -> String {
        self.tagged(uid, "epoch")
    }

    async fn run<T: FromValue>(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<T> {
        self.ready()?;
        Ok(script.evalsha_with_reload(&self.client, keys, args).await?)
    }
}

/// A rate-limit answer from what a script returns.
pub(crate) fn decision(allowed: bool, remaining: i64, reset_ms: i64, retry_ms: i64) -> Decision {
    let ms = |v: i64| Duration::from_millis(v.max(0) as u64);
    Decision {
        allowed,
        remaining: remaining.max(0) as u64,
        reset: ms(reset_ms),
        retry_after: ms(retry_ms),
        cells: u32::from(allowed),
    }
}
