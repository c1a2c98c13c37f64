//! From [`RawConfig`] to [`Config`]: each table checks its own keys
//! (`RawHttp::validate` and so on), and the top level checks its keys and
//! what spans tables.

use std::time::Duration;

use crate::check::{bad, count, seconds};
use crate::config::{
    Auth, Config, Http, Metrics, OnRedisError, Policy, Profile, RateLimit, Recycle, Redis,
};
use crate::raw::{
    RawAuth, RawConfig, RawHttp, RawMetrics, RawPolicy, RawProfile, RawRateLimit, RawRecycle,
    RawRedis, Workers,
};
use crate::{Cidr, ConfigError, ListenerMode, MAX_WORKERS};

fn cidrs(key: &str, list: &[String]) -> Result<Vec<Cidr>, ConfigError> {
    list.iter()
        .map(|p| {
            p.parse::<Cidr>()
                .map_err(|_| bad(key, p, "expected IP or IP/LEN, e.g. 10.0.0.0/8 or ::1"))
        })
        .collect()
}

fn absolute(key: &str, path: Option<&std::path::Path>) -> Result<(), ConfigError> {
    match path {
        Some(p) if !p.is_absolute() => Err(bad(key, p.display(), "expected an absolute path")),
        _ => Ok(()),
    }
}

impl RawConfig {
    /// Checks every value and resolves `workers = "auto"` to `parallelism`.
    ///
    /// # Errors
    /// [`ConfigError::Value`] for the first value out of range.
    pub fn validate(self, parallelism: usize) -> Result<Config, ConfigError> {
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
        let backlog = count("backlog", self.backlog, 1, 65_535)?;
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
        absolute("runtime_dir", self.runtime_dir.as_deref())?;
        absolute("log_file", self.log_file.as_deref())?;
        absolute("access_log_file", self.access_log_file.as_deref())?;
        let http = self.http.validate()?;
        let recycle = self.recycle.validate()?;
        let redis = self.redis.validate()?;
        let auth = self.auth.validate(parallelism)?;
        let rate_limit = self.rate_limit.validate()?;
        let profile = self.profile.validate()?;
        let metrics = self.metrics.validate()?;
        let proxy = self.proxy.validate()?;
        let tls = self.tls.validate()?;
        let http2 = self.http2.validate()?;
        let listen = self
            .listen
            .validate(tls.files().is_some(), !http.trusted_proxies.is_empty())?;
        let route = crate::routes::validate_routes(&self.route, &proxy, &rate_limit.policy)?;
        if !(self.watchdog_quorum.is_finite() && (0.0..=1.0).contains(&self.watchdog_quorum)) {
            return Err(bad(
                "watchdog_quorum",
                self.watchdog_quorum,
                "expected a fraction from 0 to 1",
            ));
        }
        self.check_account()?;
        Ok(Config {
            instance: self.instance,
            listen,
            backlog,
            listener: self.listener,
            workers,
            runtime_dir: self.runtime_dir,
            log_level: self.log_level,
            log_file: self.log_file,
            shutdown_timeout: seconds("shutdown_timeout", self.shutdown_timeout, 0.0)?,
            shutdown_delay: seconds("shutdown_delay", self.shutdown_delay, 0.0)?,
            access_log: self.access_log,
            access_log_file: self.access_log_file,
            worker_timeout: seconds("worker_timeout", self.worker_timeout, 0.5)?,
            startup_timeout: seconds("startup_timeout", self.startup_timeout, 0.5)?,
            user: self.user,
            group: self.group,
            watchdog_quorum: self.watchdog_quorum,
            http,
            recycle,
            redis,
            auth,
            profile,
            metrics,
            rate_limit,
            proxy,
            tls,
            http2,
            route,
        })
    }

    /// `user` and `group`, and what they rule out.
    fn check_account(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }
}

impl RawHttp {
    fn validate(&self) -> Result<Http, ConfigError> {
        Ok(Http {
            header_read_timeout: seconds(
                "http.header_read_timeout",
                self.header_read_timeout,
                0.1,
            )?,
            max_connections: count("http.max_connections", self.max_connections, 1, 1_000_000)?,
            // hyper's read buffer, which caps the head, is at least 8 KiB.
            max_header_bytes: count(
                "http.max_header_bytes",
                self.max_header_bytes,
                8192,
                1 << 20,
            )?,
            max_connections_per_client: count(
                "http.max_connections_per_client",
                self.max_connections_per_client,
                1,
                1_000_000,
            )?,
            keepalive: self.keepalive,
            trusted_proxies: cidrs("http.trusted_proxies", &self.trusted_proxies)?,
        })
    }
}

impl RawRedis {
    fn validate(&self) -> Result<Redis, ConfigError> {
        // redis.url is checked where the client is (forkd_store::check_url).
        if self.prefix.contains(['{', '}']) {
            return Err(bad(
                "redis.prefix",
                &self.prefix,
                "must not contain '{' or '}' (forkd uses hash tags)",
            ));
        }
        absolute("redis.data_dir", self.data_dir.as_deref())?;
        absolute("redis.password_file", self.password_file.as_deref())?;
        if self.server.trim().is_empty() {
            return Err(bad(
                "redis.server",
                &self.server,
                "expected a program name or path",
            ));
        }
        Ok(Redis {
            url: self.url.trim().to_owned(),
            password_file: self.password_file.clone(),
            prefix: self.prefix.clone(),
            command_timeout: seconds("redis.command_timeout", self.command_timeout, 0.001)?,
            connect_timeout: seconds("redis.connect_timeout", self.connect_timeout, 0.001)?,
            reconnect_max_delay: seconds(
                "redis.reconnect_max_delay",
                self.reconnect_max_delay,
                0.05,
            )?,
            near_cache_mib: count("redis.near_cache_mib", self.near_cache_mib, 0, 65_536)?,
            near_cache_max_age: seconds(
                "redis.near_cache_max_age",
                self.near_cache_max_age,
                0.001,
            )?,
            server: self.server.clone(),
            data_dir: self.data_dir.clone(),
        })
    }
}

impl RawAuth {
    /// `parallelism`: the cores, for `max_concurrent_hashes = 0`.
    fn validate(&self, parallelism: usize) -> Result<Auth, ConfigError> {
        let limit = |key: &str, v: i64| count(key, v, 1, 1_000_000);
        let window = |key: &str, v: f64| seconds(key, v, 0.001);
        let auth = Auth {
            argon2_memory_kib: count(
                "auth.argon2_memory_kib",
                self.argon2_memory_kib,
                8,
                4_194_304,
            )?,
            argon2_iterations: count("auth.argon2_iterations", self.argon2_iterations, 1, 100)?,
            argon2_parallelism: count("auth.argon2_parallelism", self.argon2_parallelism, 1, 64)?,
            // 0: one per core, so that a worker holding every login
            // connection still keeps every core hashing.
            max_concurrent_hashes: match self.max_concurrent_hashes {
                0 => parallelism.clamp(1, 1024),
                n => count("auth.max_concurrent_hashes", n, 1, 1024)?,
            },
            hash_queue_timeout: seconds("auth.hash_queue_timeout", self.hash_queue_timeout, 0.0)?,
            session_idle_timeout: seconds(
                "auth.session_idle_timeout",
                self.session_idle_timeout,
                1.0,
            )?,
            session_absolute_timeout: seconds(
                "auth.session_absolute_timeout",
                self.session_absolute_timeout,
                1.0,
            )?,
            login_ip_limit: limit("auth.login_ip_limit", self.login_ip_limit)?,
            login_ip_window: window("auth.login_ip_window", self.login_ip_window)?,
            login_user_limit: limit("auth.login_user_limit", self.login_user_limit)?,
            login_user_window: window("auth.login_user_window", self.login_user_window)?,
            login_user_all_limit: limit("auth.login_user_all_limit", self.login_user_all_limit)?,
            login_user_all_window: window(
                "auth.login_user_all_window",
                self.login_user_all_window,
            )?,
            login_host_limit: limit("auth.login_host_limit", self.login_host_limit)?,
            login_host_window: window("auth.login_host_window", self.login_host_window)?,
            cookie: self.cookie,
            cookie_name: self.cookie_name.clone(),
            cookie_secure: self.cookie_secure,
        };
        // An RFC 6265 cookie-name: a token.
        let name_ok = (1..=64).contains(&auth.cookie_name.len())
            && auth
                .cookie_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !name_ok {
            return Err(bad(
                "auth.cookie_name",
                &auth.cookie_name,
                "expected 1 to 64 letters, digits or !#$%&'*+-.^_`|~",
            ));
        }
        if auth.argon2_memory_kib < 8 * auth.argon2_parallelism {
            return Err(bad(
                "auth.argon2_memory_kib",
                auth.argon2_memory_kib,
                "expected at least 8 x argon2_parallelism",
            ));
        }
        Ok(auth)
    }
}

impl RawProfile {
    fn validate(&self) -> Result<Profile, ConfigError> {
        let origin = self.origin.trim().trim_end_matches('/').to_owned();
        let ok = origin.is_empty()
            || origin
                .strip_prefix("http://")
                .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'));
        if !ok {
            return Err(bad(
                "profile.origin",
                &self.origin,
                "expected http://HOST:PORT",
            ));
        }
        Ok(Profile {
            origin,
            origin_timeout: seconds("profile.origin_timeout", self.origin_timeout, 0.001)?,
            cache_ttl: seconds("profile.cache_ttl", self.cache_ttl, 0.001)?,
            lock_timeout: seconds("profile.lock_timeout", self.lock_timeout, 0.01)?,
            lock_wait: seconds("profile.lock_wait", self.lock_wait, 0.0)?,
        })
    }
}

impl RawRecycle {
    fn validate(&self) -> Result<Recycle, ConfigError> {
        let max_age = match self.max_age {
            0.0 => Duration::ZERO,
            v => seconds("recycle.max_age", v, 1.0).map_err(|_| {
                bad(
                    "recycle.max_age",
                    v,
                    "expected 0 (never) or 1 to 86400 seconds",
                )
            })?,
        };
        let max_rss_mib = match self.max_rss {
            0 => 0,
            v => count("recycle.max_rss", v, 32, 1 << 30).map_err(|_| {
                bad(
                    "recycle.max_rss",
                    v,
                    "expected 0 (never) or 32 to 1073741824 MiB",
                )
            })?,
        };
        Ok(Recycle {
            max_requests: count("recycle.max_requests", self.max_requests, 0, i64::MAX)?,
            max_requests_jitter: count(
                "recycle.max_requests_jitter",
                self.max_requests_jitter,
                0,
                i64::MAX,
            )?,
            max_rss_mib,
            max_age,
        })
    }
}

impl RawMetrics {
    fn validate(&self) -> Result<Metrics, ConfigError> {
        Ok(Metrics {
            allow: cidrs("metrics.allow", &self.allow)?,
        })
    }
}

impl RawRateLimit {
    fn validate(&self) -> Result<RateLimit, ConfigError> {
        let on_redis_error = match self.on_redis_error.as_str() {
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
        Ok(RateLimit {
            on_redis_error,
            profile: self.profile.validate("rate_limit.profile")?,
            policy: crate::routes::validate_policies(&self.policy)?,
        })
    }
}

impl RawPolicy {
    /// `table`: where the policy is, for messages.
    fn validate(&self, table: &str) -> Result<Policy, ConfigError> {
        Ok(Policy {
            limit: count(&format!("{table}.limit"), self.limit, 1, 1_000_000_000)?,
            window: seconds(&format!("{table}.window"), self.window, 0.001)?,
            lease: crate::routes::lease(&format!("{table}.lease"), self.lease, self.limit)?,
        })
    }
}
