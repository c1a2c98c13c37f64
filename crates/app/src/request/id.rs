//! Request ids: a client's `X-Request-Id` is kept when it is short and
//! made of safe characters; otherwise the worker makes one. The id is
//! echoed in the response, in problem+json bodies, in the access log and,
//! while the request runs, in the worker's scoreboard cell.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use hyper::header::{HeaderName, HeaderValue};
use hyper::HeaderMap;

pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest client id kept.
pub(crate) const MAX_LEN: usize = 64;

/// Makes ids unique across workers and hosts without a syscall per
/// request: a random prefix drawn when the worker starts, then a counter.
pub(crate) struct RequestIds {
    prefix: String,
    next: AtomicU64,
}

impl RequestIds {
    pub(crate) fn new() -> Self {
        let mut seed = [0u8; 8];
        // Without the OS generator the prefix is still unique enough per
        // process: the pid and the time.
        if getrandom::fill(&mut seed).is_err() {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            seed = (t ^ u64::from(std::process::id()) << 40).to_le_bytes();
        }
        RequestIds {
            prefix: crate::secrets::hex(&seed),
            next: AtomicU64::new(1),
        }
    }

    /// The request's id, as the header it is echoed in: the client's
    /// when valid (shared, not copied), else a new one.
    pub(crate) fn for_request(&self, headers: &HeaderMap) -> HeaderValue {
        if let Some(id) = headers
            .get(X_REQUEST_ID)
            .filter(|v| v.to_str().is_ok_and(valid))
        {
            return id.clone();
        }
        let made = format!("{}-{:x}", self.prefix, self.next.fetch_add(1, Relaxed));
        // Hex digits and a dash: always a valid value.
        HeaderValue::from_maybe_shared(bytes::Bytes::from(made))
            .unwrap_or(HeaderValue::from_static("-"))
    }
}

/// 1 to [`MAX_LEN`] of letters, digits and `-_.:+/=`: nothing that could
/// break a log line, a header or a JSON string.
pub(crate) fn valid(id: &str) -> bool {
    (1..=MAX_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:+/=".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_safe_client_id_is_kept_and_anything_else_replaced() {
        let ids = RequestIds::new();
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, "abc-123_x.y:z".parse().unwrap());
        assert_eq!(ids.for_request(&h), "abc-123_x.y:z");
        let text = |v: HeaderValue| v.to_str().unwrap().to_owned();
        for bad in ["", "a b", "a\"b", "<script>", &"x".repeat(MAX_LEN + 1)] {
            let mut h = HeaderMap::new();
            if let Ok(v) = bad.parse() {
                h.insert(X_REQUEST_ID, v);
            }
            let made = text(ids.for_request(&h));
            assert_ne!(made, bad);
            assert!(valid(&made), "{made}");
        }
        let a = ids.for_request(&HeaderMap::new());
        let b = ids.for_request(&HeaderMap::new());
        assert_ne!(a, b);
    }
}
