//! forkd's shared state in Redis, through fred. The only crate that knows
//! Redis: fred's types never leave it.
//!
//! - [`Store`]: one client per worker (or CLI run), created inside a tokio
//!   runtime after fork; reconnects by itself with capped exponential
//!   backoff and jitter; answers [`StoreError::Unavailable`] at once while
//!   disconnected.
//! - users (`user:NAME` hashes), sessions, the profile cache with its
//!   single-flight lock, and GCRA rate limits, all as typed operations.
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
//! | `P{UID}:rl:POLICY` | string | GCRA theoretical arrival time (ms) |
//! | `P` `rl:POLICY:KEY` | string | GCRA state of an anonymous limit (login by IP, by name) |
#![forbid(unsafe_code)]

mod scripts;

use std::collections::HashMap;
use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;
use futures::TryStreamExt;

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
}

/// What the one-round-trip profile check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProfileCheck {
    /// No such session, or it expired.
    Unauthenticated,
    /// The session is valid but the user is over the limit.
    Limited { user: String, decision: Decision },
    /// Valid and allowed; `cached` is the profile when the cache has it.
    Allowed {
        user: String,
        decision: Decision,
        cached: Option<String>,
    },
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
}

impl Store {
    /// Builds the client without connecting.
    ///
    /// # Errors
    /// [`StoreError::Config`] for a URL fred does not accept.
    pub fn new(cfg: &StoreConfig) -> Result<Store> {
        let mut config =
            Config::from_url(&cfg.url).map_err(|e| StoreError::Config(e.details().to_string()))?;
        // The first connection is made by `start`'s own retry loop (with
        // fail_fast off, fred would wait out a reconnect delay before even
        // its first try); the reconnect policy covers later disconnections.
        config.fail_fast = true;
        if let Some(p) = &cfg.password {
            config.password = Some(p.clone());
        }
        let max = cfg.reconnect_max_delay.as_millis().clamp(50, 60_000) as u32;
        let mut policy = ReconnectPolicy::new_exponential(0, 50, max, 2);
        policy.set_jitter(max / 10 + 10);
        let timeout = cfg.command_timeout;
        let connect = cfg.connect_timeout;
        let client = Builder::from_config(config)
            .with_performance_config(|p| {
                p.default_command_timeout = timeout;
            })
            .with_connection_config(|c| {
                c.connection_timeout = connect;
                c.internal_command_timeout = connect;
                c.max_command_attempts = 2;
            })
            .set_policy(policy)
            .build()
            .map_err(|e| StoreError::Config(e.details().to_string()))?;
        let url_kind = if cfg.url.starts_with("redis+unix") || cfg.url.starts_with("unix") {
            "unix"
        } else if cfg.url.starts_with("rediss") {
            "tls"
        } else {
            "tcp"
        };
        Ok(Store {
            client,
            prefix: cfg.prefix.clone(),
            url_kind,
            max_delay: Duration::from_millis(u64::from(max)),
        })
    }

    /// Connects in the background: at once, then, while Redis is not
    /// there, again with exponential backoff (50 ms up to
    /// `reconnect_max_delay`) and jitter; fred's reconnect policy takes over
    /// once connected. Must run inside a tokio runtime; returns at once.
    pub fn start(&self) {
        let client = self.client.clone();
        let max = self.max_delay;
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(50);
            loop {
                match client.init().await {
                    Ok(_connection_task) => return,
                    Err(e) => log::debug!("redis: {e}; retrying in {delay:?}"),
                }
                // Jitter from the clock's low bits: up to a fifth more.
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| u64::from(d.subsec_nanos()));
                let jitter = Duration::from_millis(nanos % (delay.as_millis() as u64 / 5 + 1));
                tokio::time::sleep(delay + jitter).await;
                delay = (delay * 2).min(max);
            }
        });
    }

    /// Starts the connection and waits up to `timeout` for it.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis did not answer in time.
    pub async fn connect_within(&self, timeout: Duration) -> Result<()> {
        self.start();
        self.wait_connected(timeout).await
    }

    /// Waits up to `timeout` for the (already started) connection.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis did not answer in time.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = None;
        // A failed attempt (a socket not there yet) is followed by the next
        // reconnection; keep waiting for one until the deadline.
        while !self.client.is_connected() {
            match tokio::time::timeout_at(deadline, self.client.wait_for_connect()).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => last = Some(e),
                Err(_) => break,
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match last {
            _ if self.client.is_connected() => Ok(()),
            Some(e) => Err(e.into()),
            None => Err(StoreError::Unavailable(format!(
                "no connection within {timeout:?}"
            ))),
        }
    }

    /// One line for `forkd status`: the mode and the nodes connected now.
    pub fn describe(&self) -> String {
        let server = &self.client.client_config().server;
        let mode = if server.is_clustered() {
            "cluster"
        } else if server.is_sentinel() {
            "sentinel"
        } else {
            "standalone"
        };
        let mut nodes: Vec<String> = self
            .client
            .active_connections()
            .iter()
            .map(|s| s.to_string())
            .collect();
        nodes.sort();
        if nodes.is_empty() {
            format!("{mode} ({}), not connected", self.url_kind)
        } else {
            format!("{mode} ({}): {}", self.url_kind, nodes.join(","))
        }
    }

    /// Fails at once, without queueing a command, while disconnected.
    fn ready(&self) -> Result<()> {
        if self.client.is_connected() {
            Ok(())
        } else {
            Err(StoreError::Unavailable("not connected".into()))
        }
    }

    /// One PING.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn ping(&self) -> Result<()> {
        self.ready()?;
        let _: String = self.client.ping(None).await?;
        Ok(())
    }

    fn user_key(&self, name: &str) -> String {
        format!("{}user:{name}", self.prefix)
    }
    fn tagged(&self, uid: &str, rest: &str) -> String {
        format!("{}{{{uid}}}:{rest}", self.prefix)
    }
    fn session_key(&self, uid: &str, token_hash: &str) -> String {
        self.tagged(uid, &format!("sess:{token_hash}"))
    }
    fn index_key(&self, uid: &str) -> String {
        self.tagged(uid, "sessions")
    }
    fn profile_key(&self, uid: &str) -> String {
        self.tagged(uid, "profile")
    }
    fn lock_key(&self, uid: &str) -> String {
        self.tagged(uid, "profile:lock")
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

    // ---- users ----

    /// Creates a user.
    ///
    /// # Errors
    /// [`StoreError::UserExists`], or Redis is unreachable.
    pub async fn add_user(&self, user: &User) -> Result<()> {
        let args: Vec<Value> = vec![
            "phc".into(),
            user.phc.clone().into(),
            "role".into(),
            user.role.clone().into(),
            "display_name".into(),
            user.display_name.clone().into(),
            "created_at".into(),
            (user.created_at as i64).into(),
            "last_login".into(),
            (user.last_login as i64).into(),
            "uid".into(),
            user.uid.clone().into(),
            "gen".into(),
            (user.generation as i64).into(),
        ];
        let created: i64 = self
            .run(
                scripts::create_user(),
                vec![self.user_key(&user.name)],
                args,
            )
            .await?;
        if created == 1 {
            Ok(())
        } else {
            Err(StoreError::UserExists(user.name.clone()))
        }
    }

    /// Reads a user.
    ///
    /// # Errors
    /// Redis is unreachable, or the record is damaged.
    pub async fn user(&self, name: &str) -> Result<Option<User>> {
        self.ready()?;
        let map: HashMap<String, String> = self.client.hgetall(self.user_key(name)).await?;
        if map.is_empty() {
            return Ok(None);
        }
        let get = |k: &str| map.get(k).cloned().unwrap_or_default();
        let num = |k: &str| map.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
        let user = User {
            name: name.to_owned(),
            phc: get("phc"),
            role: get("role"),
            display_name: get("display_name"),
            created_at: num("created_at"),
            last_login: num("last_login"),
            uid: get("uid"),
            generation: num("gen"),
        };
        if user.phc.is_empty() || user.uid.is_empty() {
            return Err(StoreError::Protocol(format!(
                "user record '{name}' is incomplete"
            )));
        }
        Ok(Some(user))
    }

    /// Replaces a user's password hash (only if the user exists) and ends
    /// every session of the old one at once, including one a login that
    /// read the old hash creates later. Returns the user's tag.
    ///
    /// # Errors
    /// [`StoreError::NoSuchUser`], or Redis is unreachable.
    pub async fn set_password(&self, name: &str, phc: &str) -> Result<String> {
        let reply: Option<(i64, String)> = self
            .run(
                scripts::new_password(),
                vec![self.user_key(name)],
                vec![phc.into()],
            )
            .await?;
        let (generation, uid) = reply.ok_or_else(|| StoreError::NoSuchUser(name.to_owned()))?;
        self.raise_epoch(&uid, generation, Duration::ZERO).await?;
        Ok(uid)
    }

    /// Stores the re-hash of a password just verified at `generation`,
    /// unless a password change came in between. Returns whether it did.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn rehash(&self, name: &str, phc: &str, generation: u64) -> Result<bool> {
        let n: i64 = self
            .run(
                scripts::rehash(),
                vec![self.user_key(name)],
                vec![phc.into(), (generation as i64).into()],
            )
            .await?;
        Ok(n == 1)
    }

    /// Ends every session of the user now, and any a racing login creates
    /// later; removes them. Returns how many were removed.
    ///
    /// # Errors
    /// [`StoreError::NoSuchUser`], or Redis is unreachable.
    pub async fn revoke(&self, name: &str) -> Result<usize> {
        let uid = self.new_generation(name, Duration::ZERO, false).await?;
        self.remove_sessions(&uid).await
    }

    /// A new generation for `name`, and the epoch of its tag raised to it
    /// (past every generation with `tombstone`), kept for `keep` (zero: for
    /// good). Returns the tag.
    async fn new_generation(&self, name: &str, keep: Duration, tombstone: bool) -> Result<String> {
        let reply: Option<(i64, String)> = self
            .run(
                scripts::new_generation(),
                vec![self.user_key(name)],
                Vec::new(),
            )
            .await?;
        let (generation, uid) = reply.ok_or_else(|| StoreError::NoSuchUser(name.to_owned()))?;
        // Past every generation, and exact in Lua's doubles (i64::MAX is
        // not: it would come back negative).
        let epoch = if tombstone { 1 << 53 } else { generation };
        self.raise_epoch(&uid, epoch, keep).await?;
        Ok(uid)
    }

    async fn raise_epoch(&self, uid: &str, generation: i64, keep: Duration) -> Result<()> {
        let _: i64 = self
            .run(
                scripts::raise_epoch(),
                vec![self.epoch_key(uid)],
                vec![generation.into(), (keep.as_millis() as i64).into()],
            )
            .await?;
        Ok(())
    }

    /// Records a successful login.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn touch_login(&self, name: &str, unix_secs: u64) -> Result<()> {
        let _: i64 = self
            .run(
                scripts::update_if_exists(),
                vec![self.user_key(name)],
                vec!["last_login".into(), (unix_secs as i64).into()],
            )
            .await?;
        Ok(())
    }

    /// Deletes a user, its sessions and its cached profile. Its tag's
    /// epoch stays as a tombstone for `keep` (the longest a session lives),
    /// so that a session a racing login creates is never valid.
    ///
    /// # Errors
    /// [`StoreError::NoSuchUser`], or Redis is unreachable.
    pub async fn delete_user(&self, name: &str, keep: Duration) -> Result<()> {
        let uid = self
            .new_generation(name, keep.max(Duration::from_secs(1)), true)
            .await?;
        let _: i64 = self.client.del(self.user_key(name)).await?;
        self.remove_sessions(&uid).await?;
        let _: i64 = self
            .client
            .del(vec![self.profile_key(&uid), self.index_key(&uid)])
            .await?;
        Ok(())
    }

    /// Every user name, sorted.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn user_names(&self) -> Result<Vec<String>> {
        self.ready()?;
        let pattern = format!("{}user:*", escape_glob(&self.prefix));
        let strip = self.user_key("");
        // Every primary of a cluster holds some of the users.
        let keys: Vec<fred::types::Key> = if self.client.is_clustered() {
            self.client
                .scan_cluster_buffered(pattern, Some(500), None)
                .try_collect()
                .await?
        } else {
            self.client
                .scan_buffered(pattern, Some(500), None)
                .try_collect()
                .await?
        };
        let mut names: Vec<String> = keys
            .iter()
            .filter_map(|k| k.as_str()?.strip_prefix(&strip).map(str::to_owned))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    // ---- sessions ----

    /// Stores a session under the token's hash, for the generation of
    /// `user` as its login read it. Idle timeout renewed on use; absolute
    /// timeout fixed now; both enforced by Redis' clock. Returns false
    /// when the user's sessions were revoked since that read (the login
    /// raced a password change, revoke or deletion): no session is made.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn create_session(
        &self,
        user: &User,
        token_hash: &str,
        idle: Duration,
        absolute: Duration,
    ) -> Result<bool> {
        let n: i64 = self
            .run(
                scripts::create_session(),
                vec![
                    self.session_key(&user.uid, token_hash),
                    self.index_key(&user.uid),
                    self.epoch_key(&user.uid),
                ],
                vec![
                    user.name.clone().into(),
                    (idle.as_millis() as i64).into(),
                    (absolute.as_millis() as i64).into(),
                    token_hash.into(),
                    (user.generation as i64).into(),
                ],
            )
            .await?;
        Ok(n == 1)
    }

    /// The session's user name, renewing its idle timeout; None when it
    /// does not exist or has expired.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn session_user(
        &self,
        uid: &str,
        token_hash: &str,
        idle: Duration,
    ) -> Result<Option<String>> {
        let r: Option<String> = self
            .run(
                scripts::touch_session(),
                vec![
                    self.session_key(uid, token_hash),
                    self.index_key(uid),
                    self.epoch_key(uid),
                ],
                vec![(idle.as_millis() as i64).into(), token_hash.into()],
            )
            .await?;
        Ok(r)
    }

    /// Ends one session. Returns whether it existed.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn end_session(&self, uid: &str, token_hash: &str) -> Result<bool> {
        let n: i64 = self
            .run(
                scripts::end_session(),
                vec![self.session_key(uid, token_hash), self.index_key(uid)],
                vec![token_hash.into()],
            )
            .await?;
        Ok(n == 1)
    }

    /// Removes the sessions the index of tag `uid` lists now, and only
    /// those index entries (a session created meanwhile keeps its own).
    /// Revocation itself is the epoch's job; this is the clean-up.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn remove_sessions(&self, uid: &str) -> Result<usize> {
        self.ready()?;
        let index = self.index_key(uid);
        let hashes: Vec<String> = self
            .client
            .zrange(&index, 0, -1, None, false, None, false)
            .await?;
        for chunk in hashes.chunks(500) {
            let mut keys = vec![index.clone()];
            keys.extend(chunk.iter().map(|h| self.session_key(uid, h)));
            let args: Vec<Value> = chunk.iter().map(|h| h.as_str().into()).collect();
            let _: i64 = self.run(scripts::remove_sessions(), keys, args).await?;
        }
        Ok(hashes.len())
    }

    /// Live sessions of the user with tag `uid`.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn session_count(&self, uid: &str) -> Result<u64> {
        let hashes: Vec<String> = self
            .run(
                scripts::live_sessions(),
                vec![self.index_key(uid)],
                Vec::new(),
            )
            .await?;
        if hashes.is_empty() {
            return Ok(0);
        }
        // Sessions that ran out of idle time are gone but still indexed.
        let keys: Vec<String> = hashes.iter().map(|h| self.session_key(uid, h)).collect();
        let n: i64 = self.client.exists(keys).await?;
        Ok(n.max(0) as u64)
    }

    // ---- profile route: one round trip for a cache hit ----

    /// Session check (renewing its idle timeout), the user's rate limit
    /// under `policy_name`, and the cached profile, in one script.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn profile_check(
        &self,
        uid: &str,
        token_hash: &str,
        idle: Duration,
        policy_name: &str,
        policy: Policy,
    ) -> Result<ProfileCheck> {
        let keys = vec![
            self.session_key(uid, token_hash),
            self.index_key(uid),
            self.tagged(uid, &format!("rl:{policy_name}")),
            self.profile_key(uid),
            self.epoch_key(uid),
        ];
        let args: Vec<Value> = vec![
            (idle.as_millis() as i64).into(),
            token_hash.into(),
            (policy.limit as i64).into(),
            (policy.window.as_millis() as i64).into(),
        ];
        let reply: Vec<Value> = self.run(scripts::profile_check(), keys, args).await?;
        let int = |i: usize| reply.get(i).and_then(|v| v.as_i64()).unwrap_or(0);
        let text = |i: usize| reply.get(i).and_then(|v| v.as_string());
        match int(0) {
            0 => Ok(ProfileCheck::Unauthenticated),
            1 => Ok(ProfileCheck::Allowed {
                user: text(1).unwrap_or_default(),
                decision: decision(true, int(2), int(3), 0),
                cached: text(4),
            }),
            2 => Ok(ProfileCheck::Limited {
                user: text(1).unwrap_or_default(),
                decision: decision(false, 0, int(3), int(4)),
            }),
            other => Err(StoreError::Protocol(format!(
                "profile check returned {other}"
            ))),
        }
    }

    /// Takes the single-flight lock for filling `uid`'s profile.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn lock_profile(&self, uid: &str, owner: &str, ttl: Duration) -> Result<bool> {
        self.ready()?;
        let r: Option<String> = self
            .client
            .set(
                self.lock_key(uid),
                owner,
                Some(Expiration::PX(ttl.as_millis().max(1) as i64)),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        Ok(r.is_some())
    }

    /// Releases the lock if `owner` still holds it.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn unlock_profile(&self, uid: &str, owner: &str) -> Result<()> {
        let _: i64 = self
            .run(
                scripts::unlock(),
                vec![self.lock_key(uid)],
                vec![owner.into()],
            )
            .await?;
        Ok(())
    }

    /// The cached profile, if any.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn cached_profile(&self, uid: &str) -> Result<Option<String>> {
        self.ready()?;
        Ok(self.client.get(self.profile_key(uid)).await?)
    }

    /// Caches a profile for `ttl`.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn cache_profile(&self, uid: &str, json: &str, ttl: Duration) -> Result<()> {
        self.ready()?;
        let _: () = self
            .client
            .set(
                self.profile_key(uid),
                json,
                Some(Expiration::PX(ttl.as_millis().max(1) as i64)),
                None,
                false,
            )
            .await?;
        Ok(())
    }

    /// Drops a cached profile.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn forget_profile(&self, uid: &str) -> Result<()> {
        self.ready()?;
        let _: i64 = self.client.del(self.profile_key(uid)).await?;
        Ok(())
    }

    // ---- anonymous rate limits ----

    /// One GCRA step for `key` under `policy_name`.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn limit(&self, policy_name: &str, key: &str, policy: Policy) -> Result<Decision> {
        let (keys, args) = self.limit_call(policy_name, key, policy);
        let reply: Vec<i64> = self.run(scripts::limit(), keys, args).await?;
        let get = |i: usize| reply.get(i).copied().unwrap_or(0);
        Ok(decision(get(0) == 1, get(1), get(2), get(3)))
    }

    /// Gives back what one [`Store::limit`] step of `key` took.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn refund(&self, policy_name: &str, key: &str, policy: Policy) -> Result<()> {
        let (keys, args) = self.limit_call(policy_name, key, policy);
        let _: i64 = self.run(scripts::refund(), keys, args).await?;
        Ok(())
    }

    /// The key and arguments of an anonymous limit's scripts.
    fn limit_call(
        &self,
        policy_name: &str,
        key: &str,
        policy: Policy,
    ) -> (Vec<String>, Vec<Value>) {
        (
            vec![format!("{}rl:{policy_name}:{key}", self.prefix)],
            vec![
                (policy.limit as i64).into(),
                (policy.window.as_millis() as i64).into(),
            ],
        )
    }
}

fn decision(allowed: bool, remaining: i64, reset_ms: i64, retry_ms: i64) -> Decision {
    let ms = |v: i64| Duration::from_millis(v.max(0) as u64);
    Decision {
        allowed,
        remaining: remaining.max(0) as u64,
        reset: ms(reset_ms),
        retry_after: ms(retry_ms),
    }
}

fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
