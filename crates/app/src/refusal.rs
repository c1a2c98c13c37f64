//! Every answer that refuses or fails a request: one type, [`Refusal`],
//! and its one conversion to an RFC 9457 `application/problem+json`
//! response with a stable `type`, the right status, the request id, and no
//! internal detail. The conversion marks the response ([`Refused`]) so
//! that the pipeline counts it where it counts every answer.

use std::borrow::Cow;
use std::time::Duration;

use hyper::header::{HeaderName, HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};

use crate::body::Body;

tokio::task_local! {
    /// The request id of the request being answered, for problem bodies.
    pub(crate) static REQUEST_ID: HeaderValue;
}

/// A handler's answer: the response, or the refusal to answer with.
pub(crate) type Answer = Result<Response<Body>, Refusal>;

/// What was refused: the status and the `type` of the problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Problem {
    BadRequest,
    Unauthorized,
    InvalidCredentials,
    Forbidden,
    CrossSite,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    PayloadTooLarge,
    UnsupportedMediaType,
    TooManyRequests,
    HeadTooLarge,
    ClientClosed,
    NotImplemented,
    BadGateway,
    Unavailable,
    GatewayTimeout,
}

impl Problem {
    /// The status, and the last word of the `type` URI.
    fn parts(self) -> (u16, &'static str) {
        use Problem::*;
        match self {
            BadRequest => (400, "bad-request"),
            Unauthorized => (401, "unauthorized"),
            InvalidCredentials => (401, "invalid-credentials"),
            Forbidden => (403, "forbidden"),
            CrossSite => (403, "cross-site-request"),
            NotFound => (404, "not-found"),
            MethodNotAllowed => (405, "method-not-allowed"),
            RequestTimeout => (408, "request-timeout"),
            PayloadTooLarge => (413, "payload-too-large"),
            UnsupportedMediaType => (415, "unsupported-media-type"),
            TooManyRequests => (429, "too-many-requests"),
            HeadTooLarge => (431, "request-header-too-large"),
            // nginx's, for the access log: nobody reads the answer.
            ClientClosed => (499, "client-closed-request"),
            NotImplemented => (501, "not-implemented"),
            BadGateway => (502, "bad-gateway"),
            Unavailable => (503, "unavailable"),
            GatewayTimeout => (504, "gateway-timeout"),
        }
    }
}

/// A request refused or failed, with what the client is told.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) problem: Problem,
    detail: Cow<'static, str>,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// On HTTP/2 the stream is reset instead (a malformed request, RFC
    /// 9113 section 8.1.1).
    reset: bool,
}

/// Marks a response made from a [`Refusal`], with its problem.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Refused(pub(crate) Problem);

impl Refusal {
    pub(crate) fn new(problem: Problem, detail: impl Into<Cow<'static, str>>) -> Self {
        Refusal {
            problem,
            detail: detail.into(),
            headers: Vec::new(),
            reset: false,
        }
    }

    pub(crate) fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.problem.parts().0).unwrap_or(StatusCode::BAD_REQUEST)
    }

    /// The refusal with header `name` set on its answer.
    pub(crate) fn with(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// The refusal with the headers it has, and `Some` of the others.
    pub(crate) fn with_all(
        mut self,
        headers: impl IntoIterator<Item = (HeaderName, Option<HeaderValue>)>,
    ) -> Self {
        for (name, value) in headers {
            if let Some(v) = value {
                self.headers.push((name, v));
            }
        }
        self
    }

    /// A 400 that resets the stream on HTTP/2 when `h2`.
    pub(crate) fn reset_on_h2(mut self, h2: bool) -> Self {
        self.reset = h2 && self.problem == Problem::BadRequest;
        self
    }

    pub(crate) fn bad_request(detail: impl Into<Cow<'static, str>>) -> Self {
        Self::new(Problem::BadRequest, detail)
    }

    pub(crate) fn not_found(detail: &'static str) -> Self {
        Self::new(Problem::NotFound, detail)
    }

    pub(crate) fn method_not_allowed(allow: &'static str) -> Self {
        Self::new(
            Problem::MethodNotAllowed,
            "This method is not allowed on this resource; see the Allow header.",
        )
        .with(ALLOW, HeaderValue::from_static(allow))
    }

    /// 503 with Retry-After, for Redis trouble and full queues.
    pub(crate) fn unavailable(detail: &'static str, retry: Duration) -> Self {
        Self::new(Problem::Unavailable, detail).with(RETRY_AFTER, ceil_secs(retry).into())
    }

    /// 429 with `Retry-After` the longest wait.
    pub(crate) fn too_many(detail: &'static str, wait: Duration) -> Self {
        Self::new(Problem::TooManyRequests, detail).with(RETRY_AFTER, ceil_secs(wait).into())
    }

    /// 431 for a head over the limit; the connection closes after it.
    pub(crate) fn head_too_large() -> Self {
        Self::new(
            Problem::HeadTooLarge,
            "The request head is larger than this server accepts.",
        )
        .with(CONNECTION, HeaderValue::from_static("close"))
    }
}

impl From<Refusal> for Response<Body> {
    fn from(r: Refusal) -> Self {
        let (status, kind) = (r.status(), r.problem.parts().1);
        let mut body = serde_json::json!({
            "type": format!("urn:forkd:problem:{kind}"),
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": r.detail,
        });
        // An extension member (RFC 9457 section 3.2), so that a client can
        // quote it and an operator find the access line and log.
        if let Ok(Some(id)) = REQUEST_ID.try_with(|v| v.to_str().ok().map(str::to_owned)) {
            body["request_id"] = serde_json::Value::from(id);
        }
        let mut resp = Response::new(Body::new(bytes::Bytes::from(body.to_string())));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        for (name, value) in r.headers {
            h.insert(name, value);
        }
        let x = resp.extensions_mut();
        x.insert(Refused(r.problem));
        if r.problem == Problem::ClientClosed {
            // A client that only half-closed reads this: give 499 its name.
            x.insert(hyper::ext::ReasonPhrase::from_static(
                b"Client Closed Request",
            ));
        }
        if r.reset {
            x.insert(Malformed);
        }
        resp
    }
}

/// Marks the answer to a malformed HTTP/2 request: its stream is reset
/// with PROTOCOL_ERROR (RFC 9113 section 8.1.1: a stream error; a 400 is
/// only what a server may send first), after it is counted and logged as
/// the 400 it is.
#[derive(Clone, Copy)]
pub(crate) struct Malformed;

/// Whole seconds, rounded up, at least 1: for Retry-After.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_millis().div_ceil(1000).max(1) as u64
}
