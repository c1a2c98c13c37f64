//! A route's servers (its pool): which one takes a request, and passing
//! over one that failed. Each worker keeps its own view (as each nginx
//! worker does without a shared zone).
//!
//! A request goes to the server with the fewest requests waiting for
//! their answer's head, among those not passed over, ties taken in turn.
//! A server that fails (no connection, no answer, no answer in time) is
//! passed over for the route's `fail_timeout`, unless every server is:
//! then the least busy of those the health checks keep (else of all) is
//! tried all the same, so a pool is never refused without a try. A
//! request that was never sent (no connection could be made) goes to
//! another server when it can be sent again: an idempotent method with
//! no body. What a client causes (a body that breaks off, a timeout while
//! a body goes up) never passes a server over.
//!
//! With a `health` check, each worker also asks every server its path
//! every interval; a server that fails `fails` checks in a row (no 2xx
//! within the check's timeout) is out until it passes `passes` in a row.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::connect::Connector;
use crate::body::{Body, ClientFault};
use crate::{Health, Proxy, RouteSettings, Upstream};

pub(crate) type Pool = Client<Connector, Body>;

/// One server of a route.
pub(crate) struct Member {
    pub(crate) upstream: Upstream,
    /// For idempotent methods: a request that was never sent (its pooled
    /// connection had closed) is retried on another connection.
    pub(crate) retrying: Pool,
    /// For the others: never retried.
    pub(crate) once: Pool,
    /// Requests sent to it and waiting for their answer's head.
    waiting: AtomicUsize,
    /// Milliseconds after the pool's epoch until which it is passed over
    /// (0: never failed).
    out_until_ms: AtomicU64,
    /// Out by its health checks.
    sick: AtomicBool,
    /// Checks in a row whose result differs from `sick`'s.
    streak: AtomicU32,
}

/// A route's servers, in the configured order.
pub(crate) struct Members {
    pub(crate) list: Vec<Member>,
    /// Where the next search for the least busy server starts.
    next: AtomicUsize,
    fail_timeout: Duration,
    epoch: Instant,
    /// The route's prefix, for the log.
    prefix: String,
    health: Option<Health>,
}

/// Why a request got no answer from the pool.
pub(crate) enum Failure {
    /// No answer's head within the time left.
    Timeout,
    /// The error and its causes, for the log.
    Failed(String),
}

impl Members {
    pub(crate) fn new(route: &RouteSettings, proxy: &Proxy) -> Members {
        let pool = |u: &Upstream, retry: bool| {
            Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(proxy.idle_timeout)
                .pool_max_idle_per_host(proxy.max_idle_per_upstream)
                .retry_canceled_requests(retry)
                .set_host(false)
                .build(Connector::new(
                    Some(u.clone()),
                    route.connect_timeout,
                    route.upstream_tls.clone(),
                ))
        };
        Members {
            list: route
                .upstream
                .iter()
                .map(|u| Member {
                    upstream: u.clone(),
                    retrying: pool(u, true),
                    once: pool(u, false),
                    waiting: AtomicUsize::new(0),
                    out_until_ms: AtomicU64::new(0),
                    sick: AtomicBool::new(false),
                    streak: AtomicU32::new(0),
                })
                .collect(),
            next: AtomicUsize::new(0),
            fail_timeout: route.fail_timeout,
            epoch: Instant::now(),
            prefix: route.prefix.clone(),
            health: route.health.clone(),
        }
    }

    fn now_ms(&self) -> u64 {
        // From 1, so that 0 means "never failed".
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// The server to try, of those not in `tried`: the least busy of those
    /// in (ties in turn); with none such, on a first try, the least busy
    /// of those its health checks keep, else of all (a pool is never
    /// refused untried); on a retry, none.
    pub(crate) fn pick(&self, tried: &[usize]) -> Option<usize> {
        let n = self.list.len();
        if n == 0 {
            return None;
        }
        let now = self.now_ms();
        let start = self.next.fetch_add(1, Relaxed) % n;
        let least = |usable: &dyn Fn(&Member) -> bool| {
            let mut best: Option<(usize, usize)> = None;
            for k in 0..n {
                let i = (start + k) % n;
                let m = &self.list[i];
                if tried.contains(&i) || !usable(m) {
                    continue;
                }
                let w = m.waiting.load(Relaxed);
                if best.is_none_or(|(_, fewest)| w < fewest) {
                    best = Some((i, w));
                }
            }
            best.map(|(i, _)| i)
        };
        least(&|m| m.out_until_ms.load(Relaxed) <= now && !m.sick.load(Relaxed)).or_else(|| {
            if !tried.is_empty() {
                return None;
            }
            least(&|m| !m.sick.load(Relaxed)).or_else(|| least(&|_| true))
        })
    }

    /// Passes over server `i` for the fail timeout (when there is another
    /// to take its requests), saying so once when it goes out.
    fn failed(&self, i: usize, why: &str) {
        if self.list.len() < 2 {
            return;
        }
        let now = self.now_ms();
        let until = now + self.fail_timeout.as_millis() as u64;
        let before = self.list[i].out_until_ms.swap(until, Relaxed);
        if before <= now {
            log::warn!(
                "route {}: upstream {} failed ({why}); passed over for {:?}",
                self.prefix,
                self.list[i].upstream,
                self.fail_timeout
            );
        }
    }

    /// Sends `out` to a server of the pool (see the module's docs), within
    /// `timeout` in all; `server` is set to each one's index as it is
    /// asked (for the access log). A failure the client caused (its body
    /// broke off: `fault`), or a timeout while a body was going up (a slow
    /// client may be why), does not pass the server over: a client must
    /// not be able to take servers out.
    pub(crate) async fn send(
        &self,
        out: Request<Body>,
        timeout: Duration,
        server: &AtomicUsize,
        fault: &ClientFault,
    ) -> Result<Response<Incoming>, Failure> {
        let deadline = tokio::time::Instant::now() + timeout;
        let idempotent = out.method().is_idempotent();
        let has_body = !out.body().is_end_stream();
        // What it takes to send it again: an idempotent request whose body
        // is known to be empty, when there is another server to send it to
        // (so a route of one server copies no headers).
        let again = (idempotent && out.body().is_end_stream() && self.list.len() > 1).then(|| {
            (
                out.method().clone(),
                out.uri().clone(),
                out.version(),
                out.headers().clone(),
            )
        });
        let mut out = Some(out);
        let mut tried = Vec::new();
        let mut last = String::new();
        loop {
            let Some(i) = self.pick(&tried) else {
                // Every server was tried: the last one's failure.
                return Err(Failure::Failed(last));
            };
            let req = match (out.take(), &again) {
                (Some(r), _) => r,
                (None, Some((method, uri, version, headers))) => {
                    let mut r = Request::new(Body::Full(Full::new(Bytes::new())));
                    *r.method_mut() = method.clone();
                    *r.uri_mut() = uri.clone();
                    *r.version_mut() = *version;
                    *r.headers_mut() = headers.clone();
                    r
                }
                (None, None) => unreachable!("a request is sent again only when it can be"),
            };
            let m = &self.list[i];
            let pool = if idempotent { &m.retrying } else { &m.once };
            m.waiting.fetch_add(1, Relaxed);
            let _waiting = Waiting(&m.waiting);
            tried.push(i);
            server.store(i, Relaxed);
            match tokio::time::timeout_at(deadline, pool.request(req)).await {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(e)) => {
                    let why = cause(&e);
                    if fault.get().is_none() {
                        self.failed(i, &why);
                    }
                    if !(e.is_connect() && again.is_some()) {
                        return Err(Failure::Failed(why));
                    }
                    last = why;
                }
                Err(_) => {
                    if !has_body {
                        self.failed(i, "no answer in time");
                    }
                    return Err(Failure::Timeout);
                }
            }
        }
    }
}

impl Members {
    /// Starts the health checks, if the route has them (on the worker's
    /// runtime: a task that lives as long as the worker).
    pub(crate) fn spawn_checks(self: &Arc<Self>) {
        let Some(h) = self.health.clone() else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(h.interval);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                t.tick().await;
                let mut checks = tokio::task::JoinSet::new();
                for i in 0..me.list.len() {
                    let (me, h) = (me.clone(), h.clone());
                    checks.spawn(async move { me.check(i, &h).await });
                }
                while checks.join_next().await.is_some() {}
            }
        });
    }

    /// One check of server `i`, and what its result changes.
    async fn check(&self, i: usize, h: &Health) {
        let m = &self.list[i];
        let result = tokio::time::timeout(h.timeout, async {
            let mut req = Request::new(Body::Full(Full::new(Bytes::new())));
            *req.uri_mut() = format!("http://{}{}", m.upstream.authority(), h.path)
                .parse()
                .map_err(|e| format!("{e}"))?;
            req.headers_mut().insert(
                hyper::header::HOST,
                hyper::header::HeaderValue::from_str(m.upstream.authority())
                    .map_err(|e| e.to_string())?,
            );
            req.headers_mut().insert(
                hyper::header::USER_AGENT,
                hyper::header::HeaderValue::from_static("forkd-health-check"),
            );
            let resp = m.retrying.request(req).await.map_err(|e| cause(&e))?;
            let status = resp.status();
            // Read to its end (up to 64 KiB), so that the connection can
            // serve the next check; a longer answer just closes it.
            let _ = http_body_util::BodyExt::collect(http_body_util::Limited::new(
                resp.into_body(),
                64 * 1024,
            ))
            .await;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("status {}", status.as_u16()))
            }
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", h.timeout)));
        // A result that agrees with the server's state ends a streak.
        if result.is_err() == m.sick.load(Relaxed) {
            m.streak.store(0, Relaxed);
            return;
        }
        let n = m.streak.fetch_add(1, Relaxed) + 1;
        match &result {
            Err(why) if n >= h.fails => {
                m.sick.store(true, Relaxed);
                m.streak.store(0, Relaxed);
                log::warn!(
                    "route {}: upstream {} failed its health check {} {n} time(s) in a row ({why}); out until it passes {} in a row",
                    self.prefix,
                    m.upstream,
                    h.path,
                    h.passes
                );
            }
            Ok(()) if n >= h.passes => {
                m.sick.store(false, Relaxed);
                m.streak.store(0, Relaxed);
                log::info!(
                    "route {}: upstream {} passed its health check {} {n} time(s) in a row; back",
                    self.prefix,
                    m.upstream,
                    h.path
                );
            }
            _ => {}
        }
    }
}

/// Counts a request as waiting on its server until dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// What went wrong, for the log: the error and each of its sources
/// ("client error (Connect): Connection refused (os error 111)").
pub(crate) fn cause(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.ends_with(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    text
}
