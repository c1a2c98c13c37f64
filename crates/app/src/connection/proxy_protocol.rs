//! The PROXY protocol (v1 text, v2 binary) that a load balancer sends
//! before anything else on a connection, carrying the client's address.
//! A listener with `proxy_protocol = true` takes connections only from
//! `http.trusted_proxies`, and only with a header; the address it carries
//! is the peer every later step sees (rate limits, access log, /metrics).
//!
//! The header is read in whatever pieces arrive; bytes read past it (the
//! TLS hello, or the request) are replayed by [`Prefixed`].

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use ppp::{HeaderResult, PartialResult};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// v2 headers carry TLVs; none a load balancer sends comes near this.
const MAX_HEADER_BYTES: usize = 8 * 1024;

const V1_PREFIX: &[u8] = b"PROXY ";
const V2_PREFIX: &[u8] = ppp::v2::PROTOCOL_PREFIX;

/// Why a connection was refused before its first request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The connection did not start with a PROXY header.
    Missing,
    /// It started with one that does not parse.
    Invalid(String),
    TooLong,
    /// Closed (or failed) before the header was whole.
    Closed,
    /// Not whole within `http.header_read_timeout`.
    TimedOut,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Missing => f.write_str("no PROXY protocol header"),
            Refused::Invalid(e) => write!(f, "a bad PROXY protocol header: {e}"),
            Refused::TooLong => write!(f, "a PROXY protocol header over {MAX_HEADER_BYTES} bytes"),
            Refused::Closed => f.write_str("closed before the PROXY protocol header was whole"),
            Refused::TimedOut => f.write_str("no whole PROXY protocol header in time"),
        }
    }
}

/// Reads the header from `stream`. Returns the client address it names
/// (None for a v2 LOCAL or v1 UNKNOWN header, the proxy's own health check,
/// or one that names no IP client) and the bytes read past it.
pub(crate) async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(Option<SocketAddr>, Vec<u8>), Refused> {
    let mut buf = vec![0u8; MAX_HEADER_BYTES];
    let mut have = 0;
    loop {
        let n = stream
            .read(&mut buf[have..])
            .await
            .map_err(|_| Refused::Closed)?;
        if n == 0 {
            return Err(if have == 0 {
                Refused::Closed
            } else {
                Refused::Missing
            });
        }
        have += n;
        if let Some(parsed) = parse(&buf[..have])? {
            let (client, len) = parsed;
            return Ok((client, buf[len..have].to_vec()));
        }
        if have == buf.len() {
            return Err(Refused::TooLong);
        }
    }
}

/// Some((client, header length)) once `bytes` hold a whole header; None
/// while they may still become one.
fn parse(bytes: &[u8]) -> Result<Option<(Option<SocketAddr>, usize)>, Refused> {
    let starts = |prefix: &[u8]| {
        let n = bytes.len().min(prefix.len());
        bytes[..n] == prefix[..n]
    };
    if !starts(V1_PREFIX) && !starts(V2_PREFIX) {
        return Err(Refused::Missing);
    }
    let header = HeaderResult::parse(bytes);
    if header.is_incomplete() {
        return Ok(None);
    }
    match header {
        HeaderResult::V1(Ok(h)) => {
            let client = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => {
                    Some(SocketAddr::new(a.source_address.into(), a.source_port))
                }
                ppp::v1::Addresses::Tcp6(a) => {
                    Some(SocketAddr::new(a.source_address.into(), a.source_port))
                }
                ppp::v1::Addresses::Unknown => None,
            };
            Ok(Some((client, h.header.len())))
        }
        HeaderResult::V2(Ok(h)) => {
            let client = match (h.command, h.addresses) {
                (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::new(a.source_address.into(), a.source_port))
                }
                (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::new(a.source_address.into(), a.source_port))
                }
                // LOCAL (the proxy's own health check), or an address family
                // that names no IP client.
                _ => None,
            };
            Ok(Some((client, h.len())))
        }
        HeaderResult::V1(Err(e)) => Err(Refused::Invalid(e.to_string())),
        HeaderResult::V2(Err(e)) => Err(Refused::Invalid(e.to_string())),
    }
}

/// A stream with bytes already read from it put back in front.
pub(crate) struct Prefixed<S> {
    before: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub(crate) fn new(before: Vec<u8>, inner: S) -> Self {
        Prefixed {
            before,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.before.len() {
            let n = (self.before.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.before[at..at + n]);
            self.at += n;
            if self.at == self.before.len() {
                self.before = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let h = b"PROXY TCP4 203.0.113.7 198.51.100.1 51234 443\r\nGET /";
        let (client, len) = parse(h).unwrap().unwrap();
        assert_eq!(client, Some("203.0.113.7:51234".parse().unwrap()));
        assert_eq!(&h[len..], b"GET /");
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n";
        let (client, _) = parse(h).unwrap().unwrap();
        assert_eq!(client, Some("[2001:db8::1]:4000".parse().unwrap()));
        let (client, _) = parse(b"PROXY UNKNOWN\r\n").unwrap().unwrap();
        assert_eq!(client, None);
    }

    #[test]
    fn v2_proxy_and_local() {
        let mut h = V2_PREFIX.to_vec();
        h.extend([
            0x21, 0x11, 0, 12, 203, 0, 113, 9, 198, 51, 100, 1, 0x1f, 0x90, 1, 187,
        ]);
        h.extend(b"rest");
        let (client, len) = parse(&h).unwrap().unwrap();
        assert_eq!(client, Some("203.0.113.9:8080".parse().unwrap()));
        assert_eq!(&h[len..], b"rest");
        let mut local = V2_PREFIX.to_vec();
        local.extend([0x20, 0x00, 0, 0]);
        let (client, len) = parse(&local).unwrap().unwrap();
        assert_eq!((client, len), (None, 16));
    }

    #[test]
    fn partial_missing_and_invalid() {
        assert_eq!(parse(b"PROXY TCP4 203.0"), Ok(None));
        assert_eq!(parse(&V2_PREFIX[..7]), Ok(None));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(Refused::Missing));
        assert_eq!(parse(b"\x16\x03\x01"), Err(Refused::Missing));
        assert!(matches!(
            parse(b"PROXY TCP4 not-an-ip 1.2.3.4 1 2\r\n"),
            Err(Refused::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn prefixed_replays_before_the_stream() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b" world")
            .await
            .unwrap();
        drop(a);
        let mut p = Prefixed::new(b"hello".to_vec(), b);
        let mut out = String::new();
        p.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }
}
