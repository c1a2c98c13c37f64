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

use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

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
        Box::pin(async move {
            let connect = async {
                match &*target {
                    Some(Upstream::Tcp { addr, .. }) => {
                        let s = tokio::net::TcpStream::connect(addr.as_str()).await?;
                        let _ = s.set_nodelay(true);
                        Ok(TokioIo::new(Box::new(s) as Box<dyn Io>))
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
