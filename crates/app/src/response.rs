//! The plain answers every route shares (JSON, `no-store`) and the
//! `RateLimit` headers. Refusals are [`crate::refusal`]'s. Nothing here
//! knows a route or the worker's state.

use forkd_store::{Decision, Policy};
use hyper::header::{HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};

pub(crate) use crate::body::Body;
use crate::refusal::ceil_secs;

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

pub(crate) fn with_header(
    mut r: Response<Body>,
    name: HeaderName,
    value: HeaderValue,
) -> Response<Body> {
    r.headers_mut().insert(name, value);
    r
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
