//! The HTTP profile origin: `GET http://HOST:PORT/users/NAME` through the
//! `/profile` route's pooled client (keep-alive), bounded by
//! `profile.origin_timeout`; the answer must be a JSON object.

use http_body_util::{BodyExt, Limited};
use hyper::{Request, StatusCode};

use crate::body::Body;
use crate::upstream::Route;

/// Why the origin gave no profile.
#[derive(Debug)]
pub(crate) enum OriginError {
    NotFound,
    /// Unreachable, too slow, or a bad answer.
    Failed(String),
}

const MAX_BODY: usize = 64 * 1024;

pub(crate) async fn fetch(route: &Route, user: &str) -> Result<String, OriginError> {
    let timeout = route.cfg.timeout;
    match tokio::time::timeout(timeout, fetch_inner(route, user)).await {
        Ok(r) => r,
        Err(_) => Err(OriginError::Failed(format!("no answer within {timeout:?}"))),
    }
}

async fn fetch_inner(route: &Route, user: &str) -> Result<String, OriginError> {
    let failed = |e: &dyn std::fmt::Display| OriginError::Failed(e.to_string());
    let req = Request::get(format!("http://{}/users/{}", route.authority, encode(user)))
        .header(hyper::header::HOST, &route.authority)
        .header(hyper::header::ACCEPT, "application/json")
        .body(Body::default())
        .map_err(|e| failed(&e))?;
    let Some(origin) = route.members.list.first() else {
        return Err(OriginError::Failed("no profile.origin".into()));
    };
    let resp = origin.retrying.request(req).await.map_err(|e| failed(&e))?;
    match resp.status() {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => return Err(OriginError::NotFound),
        s => return Err(OriginError::Failed(format!("status {s}"))),
    }
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| failed(&e))?
        .to_bytes();
    let value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| failed(&format!("not JSON: {e}")))?;
    if !value.is_object() {
        return Err(OriginError::Failed("not a JSON object".into()));
    }
    Ok(value.to_string())
}

/// Percent-encodes everything but unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
