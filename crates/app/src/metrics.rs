//! Prometheus metrics. Each worker counts into its own scoreboard cell
//! (through [`Host::count`]); `GET /metrics` on any worker sums every cell,
//! so one scrape covers all workers, including those that have exited.

use std::fmt::Write;
use std::time::Duration;

use crate::{Host, WorkerGauges};

/// Routes, in counter order.
pub(crate) const ROUTES: [&str; 7] = [
    "healthz", "readyz", "login", "logout", "profile", "metrics", "other",
];
/// Upper bounds of the latency histogram, seconds (+Inf follows).
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

// Counter layout in a cell.
const REQUESTS: usize = 0; // ROUTES.len() x 5 status classes
const HISTOGRAM: usize = REQUESTS + ROUTES.len() * 5; // BUCKETS.len() + 1
const LATENCY_SUM_US: usize = HISTOGRAM + BUCKETS.len() + 1;
pub(crate) const CACHE_HITS: usize = LATENCY_SUM_US + 1;
pub(crate) const CACHE_MISSES: usize = CACHE_HITS + 1;
pub(crate) const RATE_LIMITED: usize = CACHE_MISSES + 1;
pub(crate) const REDIS_ERRORS: usize = RATE_LIMITED + 1;
pub(crate) const HEADS_TOO_LARGE: usize = REDIS_ERRORS + 1;
pub(crate) const CONNECTIONS_REFUSED: usize = HEADS_TOO_LARGE + 1;
pub(crate) const ACCESS_LINES_DROPPED: usize = CONNECTIONS_REFUSED + 1;
pub(crate) const UPSTREAM_FAILED: usize = ACCESS_LINES_DROPPED + 1;
pub(crate) const UPSTREAM_TIMEOUTS: usize = UPSTREAM_FAILED + 1;
pub(crate) const TLS_HANDSHAKE_FAILURES: usize = UPSTREAM_TIMEOUTS + 1;
pub(crate) const PROXY_HEADERS_REFUSED: usize = TLS_HANDSHAKE_FAILURES + 1;
pub(crate) const CLIENTS_GONE: usize = PROXY_HEADERS_REFUSED + 1;
/// Counters used; the scoreboard must have at least this many.
pub const USED: usize = CLIENTS_GONE + 1;

/// Reads one gauge of a worker.
type Gauge = fn(&WorkerGauges) -> u64;

/// The route index of a path.
pub(crate) fn route_index(path: &str) -> usize {
    ROUTES
        .iter()
        .position(|r| path.strip_prefix('/') == Some(r))
        .unwrap_or(ROUTES.len() - 1)
}

/// Counts one answered request.
pub(crate) fn record(host: &dyn Host, route: usize, status: u16, took: Duration) {
    let class = usize::from((status / 100).clamp(1, 5)) - 1;
    host.count(REQUESTS + route * 5 + class, 1);
    let secs = took.as_secs_f64();
    let bucket = BUCKETS
        .iter()
        .position(|&b| secs <= b)
        .unwrap_or(BUCKETS.len());
    host.count(HISTOGRAM + bucket, 1);
    host.count(LATENCY_SUM_US, took.as_micros() as u64);
}

/// The text exposition format (version 0.0.4).
pub(crate) fn render(host: &dyn Host, cert: Option<&crate::CertificateInfo>) -> String {
    let c = host.totals();
    let get = |k: usize| c.get(k).copied().unwrap_or(0);
    let mut out = String::with_capacity(4096);
    let _ = writeln!(
        out,
        "# HELP forkd_http_requests_total HTTP requests answered, by route and status class."
    );
    let _ = writeln!(out, "# TYPE forkd_http_requests_total counter");
    for (r, route) in ROUTES.iter().enumerate() {
        for class in 0..5 {
            let _ = writeln!(
                out,
                "forkd_http_requests_total{{route=\"{route}\",status=\"{}xx\"}} {}",
                class + 1,
                get(REQUESTS + r * 5 + class)
            );
        }
    }
    let _ = writeln!(out, "# HELP forkd_http_request_duration_seconds Time to answer a request, from its head to the response.");
    let _ = writeln!(out, "# TYPE forkd_http_request_duration_seconds histogram");
    let mut cumulative = 0;
    for (b, bound) in BUCKETS.iter().enumerate() {
        cumulative += get(HISTOGRAM + b);
        let _ = writeln!(
            out,
            "forkd_http_request_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
        );
    }
    cumulative += get(HISTOGRAM + BUCKETS.len());
    let _ = writeln!(
        out,
        "forkd_http_request_duration_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
    );
    let _ = writeln!(
        out,
        "forkd_http_request_duration_seconds_sum {}",
        get(LATENCY_SUM_US) as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "forkd_http_request_duration_seconds_count {cumulative}"
    );
    let simple = [
        (
            "forkd_profile_cache_hits_total",
            "counter",
            "Profiles served from the Redis cache.",
            get(CACHE_HITS),
        ),
        (
            "forkd_profile_cache_misses_total",
            "counter",
            "Profiles that had to be loaded.",
            get(CACHE_MISSES),
        ),
        (
            "forkd_rate_limited_requests_total",
            "counter",
            "Requests refused with 429 by a rate limit.",
            get(RATE_LIMITED),
        ),
        (
            "forkd_redis_errors_total",
            "counter",
            "Requests that failed because Redis could not answer.",
            get(REDIS_ERRORS),
        ),
        (
            "forkd_http_request_heads_too_large_total",
            "counter",
            "Requests refused with 431: a head over http.max_header_bytes.",
            get(HEADS_TOO_LARGE),
        ),
        (
            "forkd_http_connections_refused_total",
            "counter",
            "Connections closed at once: their client held http.max_connections_per_client.",
            get(CONNECTIONS_REFUSED),
        ),
        (
            "forkd_upstream_failures_total",
            "counter",
            "Proxied requests the upstream failed: answered 502 (it refused, reset or broke \
             the connection, or answered unframeably), or its body broke off after its head \
             went out.",
            get(UPSTREAM_FAILED),
        ),
        (
            "forkd_client_aborts_total",
            "counter",
            "Requests whose client went away first: it closed the connection before its \
             request body ended (logged with status 499), or reset its HTTP/2 stream or \
             closed the connection before the answer; never counted as upstream failures.",
            get(CLIENTS_GONE),
        ),
        (
            "forkd_upstream_timeouts_total",
            "counter",
            "Proxied requests answered 504: no response head within the route's timeout.",
            get(UPSTREAM_TIMEOUTS),
        ),
        (
            "forkd_tls_handshake_failures_total",
            "counter",
            "TLS connections closed before a request: the handshake failed or timed out.",
            get(TLS_HANDSHAKE_FAILURES),
        ),
        (
            "forkd_proxy_protocol_refused_total",
            "counter",
            "Connections to a PROXY protocol listener closed before a request: from an \
             untrusted peer, or without a valid header.",
            get(PROXY_HEADERS_REFUSED),
        ),
        (
            "forkd_access_log_lines_dropped_total",
            "counter",
            "Access log lines dropped because the log could not be written fast enough.",
            get(ACCESS_LINES_DROPPED),
        ),
    ];
    let (up, restarts) = host.supervisor_figures();
    let figures = [
        (
            "forkd_worker_restarts_total",
            "counter",
            "Workers that died or hung and were replaced.",
            restarts,
        ),
        ("forkd_workers_up", "gauge", "Workers ready to serve.", up),
    ];
    let sup = host.supervisor_gauges();
    let queue = [
        (
            "forkd_listen_accept_queue",
            "gauge",
            "Connections waiting in the listening sockets' accept queues.",
            sup.accept_queue,
        ),
        (
            "forkd_listen_backlog",
            "gauge",
            "The accept queues' capacity (backlog).",
            sup.accept_backlog,
        ),
    ];
    for (name, kind, help, value) in simple.into_iter().chain(figures).chain(queue) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {value}");
    }
    let _ = writeln!(out, "# HELP forkd_worker_recycles_total Workers replaced for their own sake (recycle.*), by reason.");
    let _ = writeln!(out, "# TYPE forkd_worker_recycles_total counter");
    for (reason, n) in &sup.recycles {
        let _ = writeln!(
            out,
            "forkd_worker_recycles_total{{reason=\"{reason}\"}} {n}"
        );
    }
    if let Some(c) = cert {
        let name = "forkd_tls_certificate_expiry_timestamp_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} When the certificate this worker serves expires (notAfter), in seconds since the epoch."
        );
        let _ = writeln!(out, "# TYPE {name} gauge");
        let _ = writeln!(
            out,
            "{name}{{file=\"{}\",serial=\"{}\"}} {}",
            label(&c.file.display().to_string()),
            c.serial,
            c.not_after
        );
    }
    let mut workers = host.workers();
    workers.sort_by_key(|w| (w.slot, w.pid));
    let gauges: [(&str, &str, Gauge); 3] = [
        (
            "forkd_worker_requests_in_flight",
            "Requests a worker is answering now.",
            |w| w.in_flight,
        ),
        (
            "forkd_worker_connections",
            "Connections a worker has open.",
            |w| w.connections,
        ),
        (
            "forkd_login_hash_queue",
            "Logins waiting for a password check, per worker.",
            |w| w.hash_queue,
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for w in &workers {
            let _ = writeln!(
                out,
                "{name}{{slot=\"{}\",pid=\"{}\"}} {}",
                w.slot,
                w.pid,
                value(w)
            );
        }
    }
    out
}

/// A label value with backslashes, quotes and newlines escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
