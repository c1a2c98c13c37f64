//! The validated configuration, mapped onto what each crate takes: the
//! supervisor's settings, the worker's, the store's.

use std::sync::Arc;
use std::time::Duration;

use forkd_config::{Config, ListenerMode};
use forkd_supervisor::Settings;

use crate::source::{default_data_dir, managed_socket, read_password_file, runtime_dir_of};

/// The URL workers and `forkd user` use.
pub(crate) fn store_url(c: &Config) -> String {
    if c.redis.url.is_empty() {
        format!(
            "redis+unix://{}",
            managed_socket(&runtime_dir_of(c), &c.instance).display()
        )
    } else {
        c.redis.url.clone()
    }
}

pub(crate) fn store_config(c: &Config) -> forkd_store::StoreConfig {
    forkd_store::StoreConfig {
        password: c
            .redis
            .password_file
            .as_deref()
            .and_then(|p| read_password_file(p).ok()),
        url: store_url(c),
        prefix: c.redis.prefix.clone(),
        command_timeout: c.redis.command_timeout,
        connect_timeout: c.redis.connect_timeout,
        reconnect_max_delay: c.redis.reconnect_max_delay,
        near_cache_bytes: c.redis.near_cache_mib << 20,
        near_cache_max_age: c.redis.near_cache_max_age,
    }
}

pub(crate) fn hash_cost(c: &Config) -> forkd_app::secrets::HashCost {
    forkd_app::secrets::HashCost {
        memory_kib: c.auth.argon2_memory_kib,
        iterations: c.auth.argon2_iterations,
        parallelism: c.auth.argon2_parallelism,
    }
}

pub(crate) fn policy(p: forkd_config::Policy) -> forkd_app::Policy {
    forkd_app::Policy {
        limit: p.limit,
        window: p.window,
        lease: p.lease,
    }
}

/// Reads the TLS certificate and key, when the config names them, and
/// what the routes' `https://` servers need (authorities, a client pair):
/// at start before the privileges are dropped, and at each reload.
///
/// # Errors
/// A message naming the file and what is wrong with it.
pub(crate) fn load_tls(c: &Config) -> Result<Tls, String> {
    let upstreams = c
        .route
        .iter()
        .enumerate()
        .map(|(i, r)| {
            r.upstream_tls
                .as_ref()
                .map(|t| {
                    forkd_app::ClientTls::load(t)
                        .map(Arc::new)
                        .map_err(|e| format!("route[{i}].upstream_tls: {e}"))
                })
                .transpose()
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Tls {
        server: load_identity(c)?,
        upstreams,
    })
}

/// What [`load_tls`] read: the listeners' certificate and key, and each
/// route's TLS client settings (by the route's place; None without an
/// `https://` server).
#[derive(Default)]
pub(crate) struct Tls {
    pub(crate) server: Option<Arc<forkd_app::Identity>>,
    pub(crate) upstreams: Vec<Option<Arc<forkd_app::ClientTls>>>,
}

fn load_identity(c: &Config) -> Result<Option<Arc<forkd_app::Identity>>, String> {
    let Some((cert, key)) = c.tls.files() else {
        return Ok(None);
    };
    let id = forkd_app::Identity::load(cert, key).map_err(|e| format!("tls: {e}"))?;
    let now = jiff::Timestamp::now().as_second();
    if id.info.not_after < now {
        log::warn!(
            "tls: the certificate in {} (serial {}) expired at {}",
            cert.display(),
            id.info.serial,
            date(id.info.not_after)
        );
    } else if id.info.not_before > now {
        log::warn!(
            "tls: the certificate in {} (serial {}) is not valid before {}",
            cert.display(),
            id.info.serial,
            date(id.info.not_before)
        );
    }
    Ok(Some(Arc::new(id)))
}

/// A time for messages, as RFC 3339 in UTC.
pub(crate) fn date(secs: i64) -> String {
    jiff::Timestamp::from_second(secs).map_or_else(|_| secs.to_string(), |t| t.to_string())
}

pub(crate) fn supervisor_settings(
    c: &Config,
    tls: Option<&forkd_app::Identity>,
    source: &str,
) -> Settings {
    Settings {
        fixed: forkd_supervisor::Fixed {
            instance: c.instance.clone(),
            listen: c.listen.iter().map(|l| l.address).collect(),
            backlog: c.backlog,
            listener: match c.listener {
                ListenerMode::Shared => forkd_supervisor::ListenerMode::Shared,
                ListenerMode::Reuseport => forkd_supervisor::ListenerMode::Reuseport,
            },
            runtime_dir: runtime_dir_of(c),
            build: build_id().to_owned(),
            user: c.user.clone(),
            group: c.group.clone(),
            redis: c
                .redis
                .url
                .is_empty()
                .then(|| forkd_supervisor::ManagedRedis {
                    program: c.redis.server.clone().into(),
                    socket: managed_socket(&runtime_dir_of(c), &c.instance),
                    dir: c.redis.data_dir.clone().unwrap_or_else(default_data_dir),
                }),
        },
        live: forkd_supervisor::Live {
            workers: c.workers,
            log_file: c.log_file.clone(),
            shutdown_timeout: c.shutdown_timeout,
            worker_timeout: c.worker_timeout,
            startup_timeout: c.startup_timeout,
            heartbeat_interval: heartbeat_interval(c),
            watchdog_quorum: c.watchdog_quorum,
            shutdown_delay: c.shutdown_delay,
            recycling: forkd_supervisor::plan::Recycling {
                max_requests: c.recycle.max_requests,
                max_requests_jitter: c.recycle.max_requests_jitter,
                max_rss_bytes: c.recycle.max_rss_mib << 20,
                max_age_ms: c.recycle.max_age.as_millis() as u64,
            },
            certificates: tls
                .map(|id| {
                    let i = &id.info;
                    forkd_supervisor::control::CertificateStatus {
                        file: i.file.display().to_string(),
                        subject: i.subject.clone(),
                        serial: i.serial.clone(),
                        not_before: i.not_before,
                        not_after: i.not_after,
                    }
                })
                .into_iter()
                .collect(),
            // The workers count per route, by the route's place in the
            // configuration (forkd_app's metrics).
            more_counters_of: c.route.iter().map(|r| r.prefix.clone()).collect(),
            latency: forkd_supervisor::LatencyCounters {
                first: forkd_app::LATENCY_COUNTERS_AT,
                bounds: forkd_app::LATENCY_BOUNDS.to_vec(),
            },
            listeners: c
                .listen
                .iter()
                .map(|l| forkd_supervisor::control::ListenerStatus {
                    address: l.address.to_string(),
                    scheme: if l.tls { "https" } else { "http" }.to_owned(),
                    redirect_https: l.redirect_https,
                    proxy_protocol: l.proxy_protocol,
                })
                .collect(),
            routes: c
                .route
                .iter()
                .map(|r| forkd_supervisor::control::RouteStatus {
                    prefix: r.prefix.clone(),
                    upstream: r.upstream.to_string(),
                    auth: match r.auth {
                        forkd_config::RouteAuth::Required => "required",
                        forkd_config::RouteAuth::Optional => "optional",
                        forkd_config::RouteAuth::None => "none",
                    }
                    .to_owned(),
                    cache: r.cache,
                    policies: r.policies.clone(),
                })
                .collect(),
            config_source: source.to_owned(),
            config: c.to_toml(),
        },
    }
}

/// Identifies the binary file: SHA-256 over its length and its first and
/// last MiB (a rebuilt or otherwise replaced binary differs there),
/// computed once per process.
pub(crate) fn build_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        use sha2::{Digest, Sha256};
        use std::io::{Read, Seek, SeekFrom};
        let fingerprint = || -> std::io::Result<String> {
            let mut f = std::fs::File::open("/proc/self/exe")?;
            let len = f.metadata()?.len();
            let mut h = Sha256::new();
            h.update(len.to_le_bytes());
            let mut buf = vec![0u8; 1 << 20];
            let n = f.read(&mut buf)?;
            h.update(&buf[..n]);
            f.seek(SeekFrom::Start(len.saturating_sub(1 << 20)))?;
            let n = f.read(&mut buf)?;
            h.update(&buf[..n]);
            Ok(h.finalize()
                .iter()
                .take(6)
                .map(|b| format!("{b:02x}"))
                .collect())
        };
        fingerprint().unwrap_or_else(|_| "unknown".into())
    })
}

/// A quarter of worker_timeout, between 50 ms and 1 s.
pub(crate) fn heartbeat_interval(c: &Config) -> Duration {
    (c.worker_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// Whether an address is in any of `nets`.
pub(crate) fn matcher(nets: Vec<forkd_config::Cidr>) -> forkd_app::TrustedProxy {
    Arc::new(move |ip| nets.iter().any(|n| n.contains(ip)))
}

pub(crate) fn app_settings(
    c: &Config,
    loaded: &Tls,
    tickets: &forkd_app::TicketKeys,
) -> forkd_app::Settings {
    let tls = loaded.server.as_ref();
    forkd_app::Settings {
        header_read_timeout: c.http.header_read_timeout,
        max_header_bytes: c.http.max_header_bytes,
        max_connections_per_client: c.http.max_connections_per_client,
        max_connections: c.http.max_connections,
        keepalive: c.http.keepalive,
        shutdown_timeout: c.shutdown_timeout,
        heartbeat_interval: heartbeat_interval(c),
        trusted_proxy: matcher(c.http.trusted_proxies.clone()),
        build: build_id().to_owned(),
        metrics_allow: matcher(c.metrics.allow.clone()),
        workers: c.workers,
        on_redis_error: c.rate_limit.on_redis_error,
        store: store_config(c),
        auth: forkd_app::AuthSettings {
            cost: hash_cost(c),
            max_concurrent_hashes: c.auth.max_concurrent_hashes,
            hash_queue_timeout: c.auth.hash_queue_timeout,
            session_idle: c.auth.session_idle_timeout,
            session_absolute: c.auth.session_absolute_timeout,
            login_ip: forkd_app::Policy {
                limit: c.auth.login_ip_limit,
                window: c.auth.login_ip_window,
                lease: 1,
            },
            login_user: forkd_app::Policy {
                limit: c.auth.login_user_limit,
                window: c.auth.login_user_window,
                lease: 1,
            },
            login_user_all: forkd_app::Policy {
                limit: c.auth.login_user_all_limit,
                window: c.auth.login_user_all_window,
                lease: 1,
            },
            login_host: forkd_app::Policy {
                limit: c.auth.login_host_limit,
                window: c.auth.login_host_window,
                lease: 1,
            },
            cookie: c.auth.cookie.then(|| forkd_app::CookieSettings {
                name: c.auth.cookie_name.clone(),
                secure: c.auth.cookie_secure,
            }),
        },
        profile: forkd_app::ProfileSettings {
            origin: (!c.profile.origin.is_empty())
                .then(|| c.profile.origin.trim_start_matches("http://").to_owned()),
            origin_timeout: c.profile.origin_timeout,
            cache_ttl: c.profile.cache_ttl,
            lock_timeout: c.profile.lock_timeout,
            lock_wait: c.profile.lock_wait,
            limit: policy(c.rate_limit.profile),
        },
        access_log: match c.access_log {
            forkd_config::AccessLogFormat::Off => None,
            f => Some(forkd_app::AccessSettings {
                format: match f {
                    forkd_config::AccessLogFormat::Json => forkd_app::AccessFormat::Json,
                    _ => forkd_app::AccessFormat::Combined,
                },
                file: c.access_log_file.clone(),
            }),
        },
        routes: c
            .route
            .iter()
            .enumerate()
            .map(|(i, r)| {
                route(
                    r,
                    &c.rate_limit.policy,
                    loaded.upstreams.get(i).cloned().flatten(),
                )
            })
            .collect(),
        proxy: c.proxy.clone(),
        listeners: listener_settings(c),
        tls: tls.map(|id| forkd_app::TlsSettings {
            identity: id.clone(),
            hsts: hsts(c),
            handshake_timeout: c.tls.handshake_timeout,
            tickets: tickets.clone(),
        }),
        http2: c.http2.clone(),
    }
}

/// How each listener speaks; a redirecting one sends clients to the first
/// TLS listener's port.
fn listener_settings(c: &Config) -> Vec<forkd_app::ListenerSettings> {
    let https_port = c.listen.iter().find(|l| l.tls).map(|l| l.address.port());
    c.listen
        .iter()
        .map(|l| forkd_app::ListenerSettings {
            tls: l.tls,
            proxy_protocol: l.proxy_protocol,
            redirect_https: if l.redirect_https { https_port } else { None },
        })
        .collect()
}

/// The `Strict-Transport-Security` value, when `tls.hsts_max_age` is set.
fn hsts(c: &Config) -> Option<forkd_app::HeaderValue> {
    if c.tls.hsts_max_age == 0 {
        return None;
    }
    let mut v = format!("max-age={}", c.tls.hsts_max_age);
    if c.tls.hsts_include_subdomains {
        v.push_str("; includeSubDomains");
    }
    forkd_app::HeaderValue::from_str(&v).ok()
}

fn route(
    r: &forkd_config::Route,
    policies: &std::collections::BTreeMap<String, forkd_config::NamedPolicy>,
    upstream_tls: Option<Arc<forkd_app::ClientTls>>,
) -> forkd_app::RouteSettings {
    forkd_app::RouteSettings {
        prefix: r.prefix.clone(),
        upstream: r.upstream.0.clone(),
        fail_timeout: r.fail_timeout,
        health: r.health.clone(),
        upstream_tls,
        auth: r.auth,
        strip_prefix: r.strip_prefix,
        connect_timeout: r.connect_timeout,
        timeout: r.timeout,
        pass_authorization: r.pass_authorization,
        cache: r.cache.then_some(forkd_app::RouteCache {
            max_ttl: r.cache_max_ttl,
            max_bytes: r.cache_max_bytes,
        }),
        policies: r
            .policies
            .iter()
            .filter_map(|name| {
                let p = policies.get(name)?;
                Some(forkd_app::RoutePolicy {
                    name: name.clone(),
                    policy: forkd_app::Policy {
                        limit: p.limit as u32,
                        window: p.window,
                        lease: p.lease,
                    },
                    key: p.key.clone(),
                })
            })
            .collect(),
    }
}
