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
pub const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

// Counter layout in a cell.
const REQUESTS: usize = 0; // ROUTES.len() x 5 status classes
/// Where a cell's latency histogram starts: `BUCKETS.len() + 1` counters,
/// the last for answers slower than every bound.
pub const HISTOGRAM: usize = REQUESTS + ROUTES.len() * 5;
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

/// Where the scoreboard's further counters start (its cells' counter
/// count): each configured route's figures are there.
pub const MORE_AT: usize = 64;
/// Configured routes with a label of their own in `/metrics`, in the
/// order of the configuration; later ones count as "other".
pub const LABELLED_ROUTES: usize = 32;
/// Each labelled route's counters: 5 status classes, cache hits, misses.
const PER_ROUTE: usize = 7;
const ROUTE_HITS: usize = 5;
const ROUTE_MISSES: usize = 6;
// The near cache's, after the routes'.
const NEAR_HITS: usize = MORE_AT + LABELLED_ROUTES * PER_ROUTE;
const NEAR_MISSES: usize = NEAR_HITS + 1;
const NEAR_INVALIDATIONS: usize = NEAR_MISSES + 1;
const NEAR_FLUSHES: usize = NEAR_INVALIDATIONS + 1;
// Leased rate-limit cells: kept by a worker beyond the one its request
// spent, spent from a lease, given back unspent.
pub(crate) const LEASE_KEPT: usize = NEAR_FLUSHES + 1;
pub(crate) const LEASE_SPENT: usize = LEASE_KEPT + 1;
pub(crate) const LEASE_RETURNED: usize = LEASE_SPENT + 1;
/// Further counters used; the scoreboard must have at least this many.
pub const MORE_USED: usize = LEASE_RETURNED + 1 - MORE_AT;

/// The label a request is counted under: a built-in route's index in
/// [`ROUTES`], or past them a configured route's place (see [`label`]).
pub(crate) type Label = usize;

/// The label of the configured route at `index` in the configuration.
pub(crate) fn label(index: usize) -> Label {
    if index < LABELLED_ROUTES {
        ROUTES.len() + index
    } else {
        ROUTES.len() - 1
    }
}

/// A built-in route's label.
pub(crate) fn builtin(name: &str) -> Label {
    ROUTES
        .iter()
        .position(|r| *r == name)
        .unwrap_or(ROUTES.len() - 1)
}

/// A built-in route's name ("other" for a configured route's label).
pub(crate) fn builtin_name(label: Label) -> &'static str {
    ROUTES.get(label).copied().unwrap_or("other")
}

/// The first counter of a configured route's label.
fn route_base(label: Label) -> Option<usize> {
    label.checked_sub(ROUTES.len()).map(labelled_route)
}

/// The first counter of the labelled route at `index` in the
/// configuration.
fn labelled_route(index: usize) -> usize {
    MORE_AT + index * PER_ROUTE
}

/// Counts a cache hit or miss of the route of `label`: `/profile`'s, or
/// a labelled route's (a route past [`LABELLED_ROUTES`] has no series).
pub(crate) fn count_cache(host: &dyn Host, label: Label, hit: bool) {
    let k = match route_base(label) {
        Some(base) => base + if hit { ROUTE_HITS } else { ROUTE_MISSES },
        None if label != builtin("profile") => return,
        None if hit => CACHE_HITS,
        None => CACHE_MISSES,
    };
    host.count(k, 1);
}

/// Adds what the near cache counted since the last call.
pub(crate) fn count_near(host: &dyn Host, n: &forkd_store::NearCounts) {
    for (k, v) in [
        (NEAR_HITS, n.hits),
        (NEAR_MISSES, n.misses),
        (NEAR_INVALIDATIONS, n.invalidations),
        (NEAR_FLUSHES, n.flushes),
    ] {
        if v > 0 {
            host.count(k, v);
        }
    }
}

/// Reads one gauge of a worker.
type Gauge = fn(&WorkerGauges) -> u64;

/// The built-in route index of a path (configured routes are labelled by
/// the proxy, which knows which one took the request).
pub(crate) fn route_index(path: &str) -> usize {
    ROUTES
        .iter()
        .position(|r| path.strip_prefix('/') == Some(r))
        .unwrap_or(ROUTES.len() - 1)
}

/// Counts one answered request.
pub(crate) fn record(host: &dyn Host, route: Label, status: u16, took: Duration) {
    let class = usize::from((status / 100).clamp(1, 5)) - 1;
    let first = route_base(route).unwrap_or(REQUESTS + route * 5);
    host.count(first + class, 1);
    let secs = took.as_secs_f64();
    let bucket = BUCKETS
        .iter()
        .position(|&b| secs <= b)
        .unwrap_or(BUCKETS.len());
    host.count(HISTOGRAM + bucket, 1);
    host.count(LATENCY_SUM_US, took.as_micros() as u64);
}

/// The text exposition format (version 0.0.4). `routes`: the configured
/// routes' (prefix, whether cached), in the configuration's order.
pub(crate) fn render(
    host: &dyn Host,
    cert: Option<&crate::CertificateInfo>,
    routes: &[(&str, bool)],
) -> String {
    let c = host.totals();
    let get = |k: usize| c.get(k).copied().unwrap_or(0);
    let mut out = String::with_capacity(4096);
    family(
        &mut out,
        "forkd_http_requests_total",
        "counter",
        "HTTP requests answered, by route and status class.",
    );
    let labelled = &routes[..routes.len().min(LABELLED_ROUTES)];
    let all = ROUTES
        .iter()
        .enumerate()
        .map(|(r, name)| (*name, REQUESTS + r * 5))
        .chain(
            labelled
                .iter()
                .enumerate()
                .map(|(i, (prefix, _))| (*prefix, labelled_route(i))),
        );
    for (route, first) in all {
        for class in 0..5 {
            let _ = writeln!(
                out,
                "forkd_http_requests_total{{route=\"{}\",status=\"{}xx\"}} {}",
                label_value(route),
                class + 1,
                get(first + class)
            );
        }
    }
    for (name, what, profile, offset) in [
        ("hits", "served from", CACHE_HITS, ROUTE_HITS),
        ("misses", "that missed", CACHE_MISSES, ROUTE_MISSES),
    ] {
        family(
            &mut out,
            &format!("forkd_cache_{name}_total"),
            "counter",
            &format!("Answers of a cached route {what} the Redis cache."),
        );
        let _ = writeln!(
            out,
            "forkd_cache_{name}_total{{route=\"profile\"}} {}",
            get(profile)
        );
        for (i, (prefix, cached)) in labelled.iter().enumerate() {
            if *cached {
                let _ = writeln!(
                    out,
                    "forkd_cache_{name}_total{{route=\"{}\"}} {}",
                    label_value(prefix),
                    get(labelled_route(i) + offset)
                );
            }
        }
    }
    family(
        &mut out,
        "forkd_http_request_duration_seconds",
        "histogram",
        "Time to answer a request, from its head to the response.",
    );
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
            "forkd_near_cache_hits_total",
            "counter",
            "Session and cached-answer lookups the workers' near caches answered.",
            get(NEAR_HITS),
        ),
        (
            "forkd_near_cache_misses_total",
            "counter",
            "Session and cached-answer lookups that went to Redis.",
            get(NEAR_MISSES),
        ),
        (
            "forkd_near_cache_invalidations_total",
            "counter",
            "Keys Redis said changed, each dropped from a near cache.",
            get(NEAR_INVALIDATIONS),
        ),
        (
            "forkd_near_cache_flushes_total",
            "counter",
            "Times a near cache was emptied: a connection lost, a FLUSHALL, a missed \
             invalidation.",
            get(NEAR_FLUSHES),
        ),
        (
            "forkd_rate_limit_leased_cells_total",
            "counter",
            "Cells of leased policies a worker took from Redis to spend itself.",
            get(LEASE_KEPT),
        ),
        (
            "forkd_rate_limit_lease_spent_total",
            "counter",
            "Requests a worker's lease allowed, with no Redis call.",
            get(LEASE_SPENT),
        ),
        (
            "forkd_rate_limit_lease_returned_total",
            "counter",
            "Leased cells given back to Redis unspent, at the lease's end or the worker's.",
            get(LEASE_RETURNED),
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
        family(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
    family(
        &mut out,
        "forkd_worker_recycles_total",
        "counter",
        "Workers replaced for their own sake (recycle.*), by reason.",
    );
    for (reason, n) in &sup.recycles {
        let _ = writeln!(
            out,
            "forkd_worker_recycles_total{{reason=\"{reason}\"}} {n}"
        );
    }
    if let Some(c) = cert {
        let name = "forkd_tls_certificate_expiry_timestamp_seconds";
        family(
            &mut out,
            name,
            "gauge",
            "When the certificate this worker serves expires (notAfter), in seconds since the epoch.",
        );
        let _ = writeln!(
            out,
            "{name}{{file=\"{}\",serial=\"{}\"}} {}",
            label_value(&c.file.display().to_string()),
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
        family(&mut out, name, "gauge", help);
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

/// A metric family's `# HELP` and `# TYPE` lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value with backslashes, quotes and newlines escaped.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
