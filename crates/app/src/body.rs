//! The bodies forkd sends: a whole one (every answer forkd makes itself),
//! an upstream's, streamed frame by frame as it arrives, so a large
//! download passes through in hyper's bounded buffers, or a client's on
//! its way upstream, watched so that a client's fault is never blamed on
//! the upstream.

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Frame, Incoming, SizeHint};

pub(crate) enum Body {
    Full(Full<Bytes>),
    /// An upstream's answer; a failure to read it is counted as the
    /// upstream's, unless the client's request body (whose fault is
    /// watched, when there is one) failed first.
    Stream(Incoming, Arc<UpstreamBody>, Option<Arc<ClientFault>>),
    /// A client's request body, forwarded; a failure to read it is noted
    /// in the fault.
    Client(Incoming, Arc<ClientFault>),
}

/// Who counts an upstream's body that breaks off after its head went out
/// (a short body, a bad chunk): the head's status is already logged, so
/// this is where the failure is counted and said.
pub(crate) struct UpstreamBody {
    pub(crate) host: Arc<dyn crate::Host>,
    /// The route's prefix and upstream, for the log.
    pub(crate) prefix: String,
    pub(crate) upstream: String,
    /// At most one warning a second for the route's failures, and one
    /// for its timeouts, each with a count.
    pub(crate) warnings: [crate::log_gate::LogGate; 2],
}

impl UpstreamBody {
    /// The route's upstream failed (`timeout`: did not answer in time):
    /// counted, and logged at warn, naming the route, the upstream and
    /// the cause, at most once a second with a count of the lines held
    /// back, so that an operator who sees a 502 finds why.
    pub(crate) fn failed(&self, timeout: bool, cause: &dyn std::fmt::Display) {
        let counter = match timeout {
            true => crate::metrics::UPSTREAM_TIMEOUTS,
            false => crate::metrics::UPSTREAM_FAILED,
        };
        self.host.count(counter, 1);
        let kind = match timeout {
            true => "of this route's upstream timeouts",
            false => "of this route's upstream failures",
        };
        self.warnings[usize::from(timeout)].warn(
            format_args!(
                "route {}: upstream {} failed: {cause}",
                self.prefix, self.upstream
            ),
            kind,
        );
    }
}

/// How reading a client's request body failed, if it did.
#[derive(Default)]
pub(crate) struct ClientFault(AtomicU8);

/// What went wrong with a client's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The body's framing is broken (a chunk size that is not hex, say):
    /// the client's fault, 400.
    Malformed,
    /// The client closed or reset the connection before its body ended.
    Gone,
}

impl ClientFault {
    pub(crate) fn get(&self) -> Option<Fault> {
        match self.0.load(Relaxed) {
            1 => Some(Fault::Malformed),
            2 => Some(Fault::Gone),
            _ => None,
        }
    }

    fn note(&self, e: &hyper::Error) {
        let fault = if malformed(e) { 1 } else { 2 };
        self.0.store(fault, Relaxed);
    }
}

/// Whether a body error is a framing error of the client's (hyper reports
/// a bad chunk line as invalid input), rather than a connection that ended.
fn malformed(e: &hyper::Error) -> bool {
    if e.is_parse() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData
            );
        }
        source = s.source();
    }
    false
}

impl Body {
    pub(crate) fn new(data: impl Into<Bytes>) -> Self {
        Body::Full(Full::new(data.into()))
    }
}

impl Default for Body {
    fn default() -> Self {
        Body::Full(Full::default())
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Body::Full(f) => Pin::new(f).poll_frame(cx).map_err(|never| match never {}),
            Body::Stream(s, watch, client) => {
                let polled = Pin::new(s).poll_frame(cx);
                if let Poll::Ready(Some(Err(e))) = &polled {
                    if client.as_ref().is_some_and(|c| c.get().is_some()) {
                        watch.host.count(crate::metrics::CLIENTS_GONE, 1);
                        log::debug!("a client's request body broke off: {e}");
                    } else {
                        watch.failed(false, &format_args!("the answer broke off: {e}"));
                    }
                }
                polled
            }
            Body::Client(s, fault) => {
                let polled = Pin::new(s).poll_frame(cx);
                if let Poll::Ready(Some(Err(e))) = &polled {
                    fault.note(e);
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(f) => f.is_end_stream(),
            Body::Stream(s, ..) | Body::Client(s, _) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(f) => f.size_hint(),
            Body::Stream(s, ..) | Body::Client(s, _) => s.size_hint(),
        }
    }
}
