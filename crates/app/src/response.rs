//! The responses every route shares. Every error is an RFC 9457
//! `application/problem+json` body with a stable `type`, the right status,
//! and no internal detail. Nothing here knows a route or the worker's
//! state.

use std::time::Duration;

use forkd_store::{Decision, Policy};
use hyper::header::{HeaderName, HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};

pub(crate) use crate::body::Body;

tokio::task_local! {
    /// The request id of the request being answered, for problem bodies.
    pub(crate) static REQUEST_ID: HeaderValue;
}

pub(crate) const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub(crate) const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

pub(crate) fn no_store(mut r: Response<Body>) -> Response<Body> {
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    json_text(status, value.to_string())
}

pub(crate) fn json_text(status: StatusCode, text: String) -> Response<Body> {
    json_body(status, text.into())
}

pub(crate) fn json_body(status: StatusCode, body: bytes::Bytes) -> Response<Body> {
    let mut r = Response::new(Body::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// An RFC 9457 problem response. `kind` makes the stable `type` URI.
pub(crate) fn problem(status: StatusCode, kind: &str, detail: &str) -> Response<Body> {
    let mut body = serde_json::json!({
        "type": format!("urn:forkd:problem:{kind}"),
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    // An extension member (RFC 9457 section 3.2), so that a client can
    // quote it and an operator find the access line and log.
    if let Ok(Some(id)) = REQUEST_ID.try_with(|v| v.to_str().ok().map(str::to_owned)) {
        body["request_id"] = serde_json::Value::from(id);
    }
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

pub(crate) fn bad_request(detail: &str) -> Response<Body> {
    problem(StatusCode::BAD_REQUEST, "bad-request", detail)
}

pub(crate) fn not_found(detail: &str) -> Response<Body> {
    problem(StatusCode::NOT_FOUND, "not-found", detail)
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

/// One policy's item of `RateLimit-Policy` (RFC draft
/// ietf-httpapi-ratelimit-headers).
pub(crate) fn policy_item(name: &str, policy: Policy) -> String {
    format!(
        "\"{name}\";q={};w={}",
        policy.limit,
        ceil_secs(policy.window)
    )
}

/// One decision's item of `RateLimit`.
pub(crate) fn state_item(name: &str, d: &Decision) -> String {
    format!(
        "\"{name}\";r={};t={}",
        d.remaining,
        d.reset.as_millis().div_ceil(1000)
    )
}

/// A header of `items`, None when there are none.
pub(crate) fn header(items: &[String]) -> Option<HeaderValue> {
    (!items.is_empty())
        .then(|| HeaderValue::from_str(&items.join(", ")).ok())
        .flatten()
}

/// `RateLimit-Policy` and `RateLimit` on `r`.
pub(crate) fn add_headers(
    r: &mut Response<Body>,
    policy: Option<HeaderValue>,
    state: Option<HeaderValue>,
) {
    if let Some(v) = policy {
        r.headers_mut().insert(RATELIMIT_POLICY, v);
    }
    if let Some(v) = state {
        r.headers_mut().insert(RATELIMIT, v);
    }
}
