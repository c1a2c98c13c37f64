//! Dispatch, and the responses every route shares. Every error is an RFC
//! 9457 `application/problem+json` body with a stable `type`, the right
//! status, and no internal detail.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use forkd_store::Store;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    HeaderName, HeaderValue, ALLOW, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, RETRY_AFTER,
};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::Semaphore;

use crate::{api, Host, Settings};

pub(crate) type Body = Full<Bytes>;

/// What every request handler of one worker shares.
pub(crate) struct State {
    pub(crate) slot: usize,
    pub(crate) generation: u64,
    pub(crate) pid: u32,
    pid_header: HeaderValue,
    /// Set once the worker drains: every response then closes its
    /// connection, so kept-alive clients move to another worker.
    pub(crate) draining: AtomicBool,
    pub(crate) host: Arc<dyn Host>,
    pub(crate) settings: Settings,
    pub(crate) store: Store,
    /// Password checks in flight (argon2 runs off the event loop).
    pub(crate) hashes: Arc<Semaphore>,
    /// A hash of a password nobody has, verified for unknown users so that
    /// they cost the same time as a wrong password.
    pub(crate) dummy_phc: Arc<OnceLock<String>>,
    /// What verifying it takes in this worker, ns (0 until measured).
    pub(crate) dummy_verify_ns: Arc<std::sync::atomic::AtomicU64>,
    /// Used for rate limits while Redis cannot answer them.
    pub(crate) local_limits: crate::local_limit::LocalLimiter,
    /// The `RateLimit-Policy` header of /profile.
    pub(crate) profile_policy: HeaderValue,
    /// Redis errors are logged at most once a second.
    pub(crate) redis_warnings: crate::log_gate::LogGate,
}

impl State {
    pub(crate) fn new(
        slot: usize,
        generation: u64,
        host: Arc<dyn Host>,
        settings: Settings,
        store: Store,
    ) -> Self {
        let pid = std::process::id();
        State {
            slot,
            generation,
            pid,
            pid_header: HeaderValue::from(pid),
            draining: AtomicBool::new(false),
            host,
            hashes: Arc::new(Semaphore::new(settings.auth.max_concurrent_hashes)),
            profile_policy: api::policy_header("profile", settings.profile.limit),
            settings,
            store,
            dummy_phc: Arc::new(OnceLock::new()),
            dummy_verify_ns: Arc::default(),
            local_limits: crate::local_limit::LocalLimiter::new(),
            redis_warnings: crate::log_gate::LogGate::default(),
        }
    }
}

pub(crate) async fn handle(
    req: Request<Incoming>,
    st: Arc<State>,
    peer: SocketAddr,
) -> Result<Response<Body>, Infallible> {
    let started = std::time::Instant::now();
    let route_index = crate::metrics::route_index(req.uri().path());
    let mut resp = route(req, &st, peer).await;
    crate::metrics::record(
        st.host.as_ref(),
        route_index,
        resp.status().as_u16(),
        started.elapsed(),
    );
    let headers = resp.headers_mut();
    headers.insert("x-forkd-pid", st.pid_header.clone());
    if st.draining.load(Relaxed) {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    st.host.request_served();
    Ok(resp)
}

async fn route(req: Request<Incoming>, st: &Arc<State>, peer: SocketAddr) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match path.as_str() {
        "/healthz" => match method {
            Method::GET | Method::HEAD => {
                let body = serde_json::json!({
                    "status": "ok",
                    "slot": st.slot,
                    "pid": st.pid,
                    "generation": st.generation,
                    "build": st.settings.build,
                });
                no_store(json(StatusCode::OK, &body))
            }
            _ => method_not_allowed("GET, HEAD"),
        },
        "/readyz" => match method {
            Method::GET | Method::HEAD => api::readyz(st).await,
            _ => method_not_allowed("GET, HEAD"),
        },
        "/metrics" => match method {
            Method::GET | Method::HEAD => {
                // Checked against the client as the rate limits see it: a
                // request relayed by a trusted (local) proxy is the
                // forwarded client's, not the proxy's.
                let client = crate::client::client_ip(
                    peer.ip(),
                    req.headers(),
                    st.settings.trusted_proxy.as_ref(),
                );
                if (st.settings.metrics_allow)(client) {
                    let mut r = Response::new(Full::new(Bytes::from(crate::metrics::render(
                        st.host.as_ref(),
                    ))));
                    r.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    no_store(r)
                } else {
                    problem(
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        "Metrics are not available from this address.",
                    )
                }
            }
            _ => method_not_allowed("GET, HEAD"),
        },
        "/login" => match method {
            Method::POST => api::login(req, st, peer).await,
            _ => method_not_allowed("POST"),
        },
        "/logout" => match method {
            Method::POST => api::logout(req, st).await,
            _ => method_not_allowed("POST"),
        },
        "/profile" => match method {
            Method::GET => api::profile(req, st).await,
            _ => method_not_allowed("GET"),
        },
        _ => problem(
            StatusCode::NOT_FOUND,
            "not-found",
            "There is no resource at this path.",
        ),
    }
}

pub(crate) fn no_store(mut r: Response<Body>) -> Response<Body> {
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    json_text(status, value.to_string())
}

pub(crate) fn json_text(status: StatusCode, text: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// An RFC 9457 problem response. `kind` makes the stable `type` URI.
pub(crate) fn problem(status: StatusCode, kind: &str, detail: &str) -> Response<Body> {
    let body = serde_json::json!({
        "type": format!("urn:forkd:problem:{kind}"),
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut r = json(status, &body);
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    r
}

pub(crate) fn with_header(
    mut r: Response<Body>,
    name: HeaderName,
    value: HeaderValue,
) -> Response<Body> {
    r.headers_mut().insert(name, value);
    r
}

/// Whole seconds, rounded up, at least 1: for Retry-After.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_millis().div_ceil(1000).max(1) as u64
}

/// 503 with Retry-After, for Redis trouble and full queues.
pub(crate) fn unavailable(detail: &str, retry: Duration) -> Response<Body> {
    with_header(
        problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail),
        RETRY_AFTER,
        HeaderValue::from(ceil_secs(retry)),
    )
}

pub(crate) fn method_not_allowed(allow: &'static str) -> Response<Body> {
    with_header(
        problem(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "This method is not allowed on this resource; see the Allow header.",
        ),
        ALLOW,
        HeaderValue::from_static(allow),
    )
}
