//! The HTTP profile origin: `GET http://HOST:PORT/users/NAME` with hyper's
//! client, bounded by a timeout; the answer must be a JSON object.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;

/// Why the origin gave no profile.
#[derive(Debug)]
pub(crate) enum OriginError {
    NotFound,
    /// Unreachable, too slow, or a bad answer.
    Failed(String),
}

const MAX_BODY: usize = 64 * 1024;

pub(crate) async fn fetch(
    host: &str,
    user: &str,
    timeout: Duration,
) -> Result<String, OriginError> {
    match tokio::time::timeout(timeout, fetch_inner(host, user)).await {
        Ok(r) => r,
        Err(_) => Err(OriginError::Failed(format!("no answer within {timeout:?}"))),
    }
}

async fn fetch_inner(host: &str, user: &str) -> Result<String, OriginError> {
    let failed = |e: &dyn std::fmt::Display| OriginError::Failed(e.to_string());
    let stream = tokio::net::TcpStream::connect(host)
        .await
        .map_err(|e| failed(&e))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| failed(&e))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::get(format!("/users/{}", encode(user)))
        .header(hyper::header::HOST, host)
        .header(hyper::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| failed(&e))?;
    let resp = sender.send_request(req).await.map_err(|e| failed(&e))?;
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
