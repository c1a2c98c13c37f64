//! The configuration reference: docs/configuration.md's key table, made
//! from the code (`forkd config-reference` prints it; a test holds the page
//! to it). The keys are the file's own (`keys()`), every one in exactly one
//! row; the defaults are `RawConfig::default()`'s, written as TOML; what
//! each key means is written here, next to the code.

use serde_json::Value;

use crate::raw::RawConfig;

/// One row of the table: keys that go together, what they mean, and how
/// their defaults read when the code's alone would not say enough.
pub(crate) struct Row {
    pub(crate) keys: &'static [&'static str],
    meaning: &'static str,
    /// Said instead of the code's defaults (a default that is worked out
    /// at start, say).
    default: Option<&'static str>,
    /// Said after the code's defaults, in brackets.
    note: Option<&'static str>,
}

const fn row(keys: &'static [&'static str], meaning: &'static str) -> Row {
    Row {
        keys,
        meaning,
        default: None,
        note: None,
    }
}

impl Row {
    const fn default(self, text: &'static str) -> Row {
        Row {
            default: Some(text),
            ..self
        }
    }

    const fn note(self, text: &'static str) -> Row {
        Row {
            note: Some(text),
            ..self
        }
    }
}

pub(crate) const ROWS: &[Row] = &[
    row(&["instance"], "Names the pidfile, control socket and default log file, so several instances run side by side."),
    row(&["listen"], r#"`IP:PORT`, IPv4 or IPv6 (`"[::]:8080"`), or `HOST:PORT` (a host name is looked up when the config is read, as an upstream's is, and its first IPv4 address bound, else its first: `"localhost:8080"`), or a list of listeners, each an address or `{ address, tls, proxy_protocol, redirect_https }`; see [Several listeners, redirects and the PROXY protocol](https.md#several-listeners-redirects-and-the-proxy-protocol)."#),
    row(&["backlog"], "Accept queue length."),
    row(&["listener"], r#"`"shared"` or `"reuseport"`; see [Listener modes](operations.md#listener-modes)."#),
    row(&["workers"], "Number of workers, or one per CPU."),
    row(&["runtime_dir"], "Pidfile and control socket (mode 0600).").default("see [the runtime directory](#the-runtime-directory)"),
    row(&["log_level"], "`off` to `trace`; `RUST_LOG` wins when set."),
    row(&["log_file"], "Append logs to this file; `USR1` reopens it.").note("stderr"),
    row(&["shutdown_timeout"], "Seconds a draining worker may take before it is killed."),
    row(&["shutdown_delay"], "Seconds between a stop and the drain: `/readyz` answers 503 at once while every worker keeps serving; see [Stopping behind a load balancer](operations.md#stopping-behind-a-load-balancer)."),
    row(&["access_log"], r#"`"off"`, `"combined"` or `"json"`; see [Access log and request ids](operations.md#access-log-and-request-ids)."#),
    row(&["access_log_file"], "Append access lines to this file (0640); `USR1` reopens it.").note("stdout"),
    row(&["recycle.max_requests", "recycle.max_requests_jitter"], "Replace a worker after this many requests plus a random share of the jitter (0: never); see [Worker recycling](operations.md#worker-recycling)."),
    row(&["recycle.max_rss"], "Replace a worker whose resident memory stays above this many MiB (0, or 32 and more)."),
    row(&["recycle.max_age"], "Replace a worker this many seconds after it became ready (0, or 1 and more)."),
    row(&["worker_timeout"], "A worker whose heartbeat is older than this is killed and replaced."),
    row(&["startup_timeout"], "Seconds a reload's (or upgrade's) new worker has to become ready, and an upgrade's probe has to answer."),
    row(&["user", "group"], "Run as this account once the port is bound."),
    row(&["watchdog_quorum"], "Fraction of workers with a fresh heartbeat needed to feed systemd's watchdog."),
    row(&["http.header_read_timeout"], "Seconds to send a complete request head; also the idle keep-alive timeout."),
    row(&["http.max_connections_per_client"], "Open connections per worker from one client address (IPv6: /64); more are closed at once and counted in `forkd_http_connections_refused_total`. Trusted proxies are not capped."),
    row(&["http.max_header_bytes"], "The largest request head accepted (8192 to 1048576), counted as parsed: the request line, each field as `name: value` plus CRLF, and the closing CRLF (for an ordinary head, its size on the wire), so the answer is the same however the bytes arrive; larger is 431 problem+json, the connection closed, counted in `forkd_http_request_heads_too_large_total`. White space padding around values does not count, but hyper stops a head of more than twice the limit before it is parsed (431 too). HTTP/2 requests are counted the same way."),
    row(&["http.max_connections"], "Open connections per worker; more wait in the accept queue."),
    row(&["http.keepalive"], "HTTP/1.1 keep-alive."),
    row(&["http.trusted_proxies"], "Proxies whose `X-Forwarded-For` is believed (IP or IP/LEN)."),
    row(&["redis.url"], "Empty: a managed redis-server; else `redis://`, `rediss://`, `redis+unix://`, `redis-cluster://`, `redis-sentinel://`."),
    row(&["redis.password_file"], "File whose first line is the Redis password."),
    row(&["redis.prefix"], "Prepended to every key."),
    row(&["redis.command_timeout"], "Seconds one Redis command may take."),
    row(&["redis.connect_timeout"], "Seconds to connect; a new worker waits this long for Redis before serving."),
    row(&["redis.reconnect_max_delay"], r#"Cap of the reconnect backoff, seconds; on Redis Cluster at most 0.25 s (see "Beyond one host")."#),
    row(&["redis.near_cache_mib"], "Each worker's near cache of sessions and cached answers, MiB; `0` turns it off (see [The near cache](redis.md#the-near-cache))."),
    row(&["redis.near_cache_max_age"], "The longest the near cache keeps anything, seconds."),
    row(&["redis.server", "redis.data_dir"], "The managed redis-server.").note("the data directory is worked out at start: see [Redis](redis.md#redis)"),
    row(&["auth.argon2_memory_kib", "auth.argon2_iterations", "auth.argon2_parallelism"], "argon2id cost."),
    row(&["auth.max_concurrent_hashes", "auth.hash_queue_timeout"], "Password checks at once per worker, and how long a login waits for a place.").note("`0`: one per core"),
    row(&["auth.session_idle_timeout", "auth.session_absolute_timeout"], "Session lifetimes, seconds."),
    row(&["auth.login_ip_limit", "auth.login_ip_window"], "Failed logins per client address (IPv6: /64) per window."),
    row(&["auth.login_user_limit", "auth.login_user_window"], "Failed logins per username from one client address per window."),
    row(&["auth.login_user_all_limit", "auth.login_user_all_window"], "Failed logins per username from all addresses together: a loose ceiling for a guesser spread over many addresses."),
    row(&["auth.login_host_limit", "auth.login_host_window"], "All logins of this host per window, shared out among its workers (in memory)."),
    row(&["auth.cookie", "auth.cookie_name", "auth.cookie_secure"], "Sessions as a cookie too, for browsers (see [forkd in front of your app](gateway.md#forkd-in-front-of-your-app)); `Secure` off only for plain-HTTP development."),
    row(&["profile.origin", "profile.origin_timeout"], "HTTP profile backend (`http://HOST:PORT`), reached with upstream keep-alive, and its timeout (to connect, and for the whole answer)."),
    row(&["profile.cache_ttl"], "Seconds a cached profile lives (minus up to 10 % jitter)."),
    row(&["profile.lock_timeout", "profile.lock_wait"], "Single-flight lock lifetime, and how long other requests wait for it."),
    row(&["metrics.allow"], "Who may read `/metrics`."),
    row(&["rate_limit.on_redis_error"], "`local`, `fail_open` or `fail_closed`; see [docs/redis.md](redis.md)."),
    row(&["rate_limit.profile.limit", "rate_limit.profile.window"], "`/profile` requests per user per window."),
    row(&["rate_limit.profile.lease"], r#"Cells a worker takes at once for `/profile`'s limit (see "Exact or leased")."#),
    row(&["proxy.user_header", "proxy.role_header", "proxy.session_header"], "Identity headers sent to upstreams; always removed from what clients send."),
    row(&["proxy.max_idle_per_upstream", "proxy.idle_timeout"], "Idle upstream connections kept per route and worker, and for how long."),
    row(&["proxy.forward_auth_path"], r#"Forward-auth endpoint for nginx `auth_request`, Traefik and Envoy; `""` turns it off."#),
    row(&["tls.cert_file", "tls.key_file"], "PEM certificate (then its chain) and key: the listeners speak HTTPS (but those with `tls = false`); see [HTTPS and HTTP/2](https.md#https-and-http2)."),
    row(&["tls.hsts_max_age", "tls.hsts_include_subdomains"], "`Strict-Transport-Security` on HTTPS answers (0: none)."),
    row(&["tls.handshake_timeout"], "Seconds a new connection has to finish its TLS handshake."),
    row(&["http2.enabled"], "Offer `h2` by ALPN on HTTPS."),
    row(&["http2.h2c"], "Also take HTTP/2 by prior knowledge on plain HTTP."),
    row(&["http2.max_concurrent_streams"], "Streams open at once on one HTTP/2 connection (1 to 10000)."),
    row(&["[[route]]"], "A path prefix forwarded to an upstream; see [forkd in front of your app](gateway.md#forkd-in-front-of-your-app).").default("none"),
];

/// A default as the table writes it: TOML in backticks, or "unset".
fn written(v: &Value) -> String {
    match v {
        Value::Null => "unset".into(),
        // A whole number of seconds reads as one (`30`, not `30.0`).
        Value::Number(n)
            if n.as_f64()
                .is_some_and(|f| f.fract() == 0.0 && f.abs() < 1e15) =>
        {
            format!("`{}`", n.as_f64().unwrap_or_default() as i64)
        }
        _ => match toml::Value::try_from(v) {
            Ok(t) => format!("`{t}`"),
            Err(_) => format!("`{v}`"),
        },
    }
}

/// The key table, as docs/configuration.md holds it.
pub fn key_table() -> String {
    let defaults = serde_json::to_value(RawConfig::default()).expect("the defaults serialize");
    let at = |key: &str| key.split('.').try_fold(&defaults, |v, part| v.get(part));
    let mut out = String::from("| key | default | meaning |\n|---|---|---|\n");
    for r in ROWS {
        let keys: Vec<String> = r.keys.iter().map(|k| format!("`{k}`")).collect();
        let default = match r.default {
            Some(text) => text.to_owned(),
            None => {
                let values: Vec<String> = r
                    .keys
                    .iter()
                    .map(|k| at(k).map_or_else(|| "unset".into(), written))
                    .collect();
                let mut d = if values.iter().all(|v| v == "unset") {
                    "unset".to_owned()
                } else {
                    values.join(", ")
                };
                if let Some(note) = r.note {
                    d.push_str(&format!(" ({note})"));
                }
                d
            }
        };
        out.push_str(&format!(
            "| {} | {default} | {} |\n",
            keys.join(", "),
            r.meaning
        ));
    }
    out
}
