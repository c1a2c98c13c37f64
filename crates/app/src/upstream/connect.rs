//! How a route's pooled client reaches its upstream: TCP to `HOST:PORT` or
//! a unix socket, bounded by the route's connect timeout. The client asks
//! for a connection with the request's URI; every client has one upstream,
//! so the URI is not looked at.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;

use crate::Upstream;

#[derive(Clone)]
pub(crate) struct Connector {
    target: Arc<Option<Upstream>>,
    timeout: Duration,
}

impl Connector {
    pub(crate) fn new(target: Option<Upstream>, timeout: Duration) -> Self {
        Connector {
            target: Arc::new(target),
            timeout,
        }
    }
}

/// A connection to an upstream.
pub(crate) enum Stream {
    Tcp(TokioIo<tokio::net::TcpStream>),
    Unix(TokioIo<tokio::net::UnixStream>),
}

impl tower_service::Service<Uri> for Connector {
    type Response = Stream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let target = self.target.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let connect = async {
                match &*target {
                    Some(Upstream::Tcp(addr)) => {
                        let s = tokio::net::TcpStream::connect(addr.as_str()).await?;
                        let _ = s.set_nodelay(true);
                        Ok(Stream::Tcp(TokioIo::new(s)))
                    }
                    Some(Upstream::Unix(path)) => {
                        let s = tokio::net::UnixStream::connect(PathBuf::from(path)).await?;
                        Ok(Stream::Unix(TokioIo::new(s)))
                    }
                    None => Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        "the route has no upstream",
                    )),
                }
            };
            match tokio::time::timeout(timeout, connect).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {timeout:?}"),
                )),
            }
        })
    }
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl Read for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl Write for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
