//! The HTTP API. Every error is an RFC 9457 `application/problem+json` body
//! with a stable `type`, the right status, and no internal detail.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONNECTION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

use crate::Host;

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
}

impl State {
    pub(crate) fn new(slot: usize, generation: u64, host: Arc<dyn Host>) -> Self {
        let pid = std::process::id();
        State {
            slot,
            generation,
            pid,
            pid_header: HeaderValue::from(pid),
            draining: AtomicBool::new(false),
            host,
        }
    }
}

pub(crate) async fn handle(
    req: Request<Incoming>,
    st: Arc<State>,
) -> Result<Response<Body>, Infallible> {
    let mut resp = route(&req, &st);
    let headers = resp.headers_mut();
    headers.insert("x-forkd-pid", st.pid_header.clone());
    if st.draining.load(Relaxed) {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    st.host.request_served();
    Ok(resp)
}

fn route(req: &Request<Incoming>, st: &State) -> Response<Body> {
    match req.uri().path() {
        "/healthz" => match *req.method() {
            Method::GET | Method::HEAD => {
                let body = serde_json::json!({
                    "status": "ok",
                    "slot": st.slot,
                    "pid": st.pid,
                    "generation": st.generation,
                });
                let mut r = json(StatusCode::OK, &body);
                r.headers_mut()
                    .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                r
            }
            _ => method_not_allowed("GET, HEAD"),
        },
        _ => problem(
            StatusCode::NOT_FOUND,
            "not-found",
            "There is no resource at this path.",
        ),
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
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

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = problem(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "This method is not allowed on this resource; see the Allow header.",
    );
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}
