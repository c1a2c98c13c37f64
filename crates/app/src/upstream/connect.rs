//! How a route's pooled client reaches its upstream: TCP to `HOST:PORT`
//! (with TLS for `https://`) or a unix socket, bounded by the route's
//! connect timeout. The client asks for a connection with the request's
//! URI; every client has one upstream, so the URI is not looked at.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::tls::ClientTls;
use crate::Upstream;

#[derive(Clone)]
pub(crate) struct Connector {
    target: Arc<Option<Upstream>>,
    timeout: Duration,
    /// For an `https://` target.
    tls: Option<Arc<ClientTls>>,
}

impl Connector {
    pub(crate) fn new(
        target: Option<Upstream>,
        timeout: Duration,
        tls: Option<Arc<ClientTls>>,
    ) -> Self {
        Connector {
            target: Arc::new(target),
            timeout,
            tls,
        }
    }
}

/// A connection to an upstream: TCP or a unix socket.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// hyper-util's `TokioIo` gives a stream hyper's `Read` and `Write`, and
/// is a `Connection` when the stream is one.
impl Connection for Box<dyn Io> {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

pub(crate) type Stream = TokioIo<Box<dyn Io>>;

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
        let tls = self.tls.clone();
        Box::pin(async move {
            let connect = async {
                match &*target {
                    Some(Upstream::Tcp {
                        addr, tls: https, ..
                    }) => {
                        let s = tokio::net::TcpStream::connect(addr.as_str()).await?;
                        let _ = s.set_nodelay(true);
                        match (https, &tls) {
                            (false, _) => Ok(TokioIo::new(Box::new(s) as Box<dyn Io>)),
                            // The handshake is part of connecting: within
                            // the connect timeout, and a failure is a
                            // connect error (the request was never sent).
                            (true, Some(t)) => {
                                let s = t.wrap(addr, s).await?;
                                Ok(TokioIo::new(Box::new(s) as Box<dyn Io>))
                            }
                            (true, None) => Err(io::Error::new(
                                io::ErrorKind::InvalidInput,
                                "an https:// upstream without TLS settings",
                            )),
                        }
                    }
                    Some(Upstream::Unix(path)) => {
                        let s = tokio::net::UnixStream::connect(PathBuf::from(path)).await?;
                        Ok(TokioIo::new(Box::new(s) as Box<dyn Io>))
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
