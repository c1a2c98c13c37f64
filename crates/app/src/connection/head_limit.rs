//! hyper's own request-head cap. `request_head` holds
//! `http.max_header_bytes` exactly; hyper refuses, before any handler
//! runs, a head that outgrows its read buffer (twice the limit) or has
//! more than 100 fields, with a bare `431` and no body, then closes the
//! connection. This wrapper of the connection's socket turns that one
//! response into forkd's problem+json and counts it; everything else
//! passes through untouched. A handler's answer (forkd's own 431
//! included) always carries `x-forkd-pid`, and hyper writes its 431 as
//! one bodiless head without it, so a write that is exactly that is
//! hyper's.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::Host;

const HYPER_431: &[u8] = b"HTTP/1.1 431 ";

/// Whether a write is hyper's own 431: a status line and headers, no body,
/// in one short write, without the `x-forkd-pid` of a handler's answer.
/// An app's answer or a tunnel's bytes that merely begin so are left
/// alone.
fn is_hyper_431(buf: &[u8]) -> bool {
    buf.len() <= 1024
        && buf.starts_with(HYPER_431)
        && buf.ends_with(b"\r\n\r\n")
        && buf.windows(4).filter(|w| *w == b"\r\n\r\n").count() == 1
        // Every answer a handler gives (an upstream's 431 with no body
        // too) carries forkd's pid header; hyper's own has none.
        && !buf
            .windows(X_FORKD_PID.len())
            .any(|w| w.eq_ignore_ascii_case(X_FORKD_PID))
}

const X_FORKD_PID: &[u8] = b"x-forkd-pid";

/// A connection's socket, watched for hyper's 431.
pub(crate) struct HeadLimit<S> {
    inner: S,
    host: Arc<dyn Host>,
    /// What is still to be written of forkd's own 431.
    pending: Vec<u8>,
    /// hyper's 431 was replaced: nothing more of hyper's goes out.
    replaced: bool,
}

impl<S> HeadLimit<S> {
    pub(crate) fn new(inner: S, host: Arc<dyn Host>) -> Self {
        HeadLimit {
            inner,
            host,
            pending: Vec::new(),
            replaced: false,
        }
    }
}

/// forkd's 431: problem+json, and the connection closes.
fn problem_431() -> Vec<u8> {
    let body = serde_json::json!({
        "type": "urn:forkd:problem:request-header-too-large",
        "title": "Request Header Fields Too Large",
        "status": 431,
        "detail": "The request head is larger than this server accepts.",
    })
    .to_string();
    format!(
        "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/problem+json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl<S: AsyncWrite + Unpin> HeadLimit<S> {
    /// Writes what is pending of forkd's 431; Ready once it is all out.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HeadLimit<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeadLimit<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.replaced {
            // After forkd's 431 nothing else goes out.
            return this.drain(cx).map_ok(|()| buf.len());
        }
        if is_hyper_431(buf) {
            this.host.count(crate::metrics::HEADS_TOO_LARGE, 1);
            this.pending = problem_431();
            this.replaced = true;
            // hyper's bytes are taken as written; forkd's go in their place.
            return match this.drain(cx) {
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                _ => Poll::Ready(Ok(buf.len())),
            };
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    /// hyper writes its heads and bodies together (writev) when the socket
    /// can: its 431 is then a first slice that is the whole write.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        if self.replaced || (first.len() == total && is_hyper_431(first)) {
            return self.poll_write(cx, first).map_ok(|_| total);
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_bodiless_431_head_is_hyper_s() {
        let hyper =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        assert!(is_hyper_431(hyper));
        // An app's 431 with a body, a body chunk or tunnel bytes that begin
        // so, and a long write: someone else's.
        assert!(!is_hyper_431(
            b"HTTP/1.1 431 Too Large\r\ncontent-length: 2\r\n\r\nhi"
        ));
        assert!(!is_hyper_431(b"HTTP/1.1 431 is what the log says\n"));
        assert!(!is_hyper_431(
            b"HTTP/1.1 431 X\r\ncontent-length: 0\r\nx-forkd-pid: 7\r\n\r\n"
        ));
        assert!(!is_hyper_431(
            b"HTTP/1.1 431 X\r\n\r\nHTTP/1.1 431 X\r\n\r\n"
        ));
        let mut long = b"HTTP/1.1 431 X\r\nx: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', 2000));
        long.extend(b"\r\n\r\n");
        assert!(!is_hyper_431(&long));
    }
}
