//! One accepted connection: the PROXY protocol header when the listener
//! takes one, the TLS handshake when it speaks HTTPS, then HTTP/1.1 or HTTP/2 through hyper-util's auto builder (h2 by
//! ALPN on TLS; by prior knowledge on plain TCP when `http2.h2c` is on),
//! and its graceful end when the worker drains: HTTP/1.1 finishes the
//! request in flight, HTTP/2 sends GOAWAY and lets open streams finish.

pub(crate) mod balance;
pub(crate) mod head_limit;
pub(crate) mod proxy_protocol;
pub(crate) mod tickets;
pub(crate) mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::connection::head_limit::HeadLimit;
use crate::connection::proxy_protocol::{Prefixed, Refused};
use crate::conns::Watcher;
use crate::state::State;
use crate::{pipeline, ListenerSettings, Settings};

/// How this worker speaks on its connections.
pub(crate) struct Protocols {
    /// HTTP/1.1 only: an HTTP/2 preface is a bad request.
    http1: http1::Builder,
    /// Either, by the client's first bytes (hyper-util's upgradeable auto
    /// connection always reads them, so it never serves as HTTP/1.1 only).
    either: auto::Builder<TokioExecutor>,
    tls: Option<(TlsAcceptor, Duration)>,
    h2c: bool,
}

/// The builder for one connection.
#[derive(Clone, Copy)]
enum Speak<'a> {
    Http1(&'a http1::Builder),
    Either(&'a auto::Builder<TokioExecutor>),
}

impl Protocols {
    /// The builders and, for HTTPS, this worker's rustls configuration.
    ///
    /// # Errors
    /// The certificate and key cannot make a rustls configuration (the
    /// supervisor checked them, so this is not expected).
    pub(crate) fn new(s: &Settings) -> Result<Protocols, String> {
        // hyper's own cap on a head, above forkd's exact one.
        let cap = crate::request::head::parser_cap(s.max_header_bytes);
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(s.header_read_timeout)
            .max_buf_size(cap)
            .keep_alive(s.keepalive);
        let mut b = auto::Builder::new(TokioExecutor::new());
        b.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(s.header_read_timeout)
            .max_buf_size(cap)
            .keep_alive(s.keepalive);
        b.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(s.http2.max_concurrent_streams)
            .max_header_list_size(
                u32::try_from(crate::request::head::h2_list_cap(s.max_header_bytes))
                    .unwrap_or(u32::MAX),
            )
            // A client that resets streams as fast as it opens them
            // ("rapid reset") is cut off rather than served forever.
            .max_pending_accept_reset_streams(Some(s.http2.max_concurrent_streams as usize))
            .keep_alive_interval(Some(s.header_read_timeout))
            .keep_alive_timeout(s.header_read_timeout);
        let tls = match &s.tls {
            Some(t) => {
                let config = crate::connection::tls::server_config(
                    &t.identity,
                    s.http2.enabled,
                    Some(&t.tickets),
                )
                .map_err(|e| format!("cannot use the TLS certificate: {e}"))?;
                Some((TlsAcceptor::from(config), t.handshake_timeout))
            }
            None => None,
        };
        Ok(Protocols {
            http1: h1,
            either: b,
            tls,
            h2c: s.http2.h2c,
        })
    }

    /// Serves one connection to its end, or to a graceful end once the
    /// worker drains: the PROXY header first where the listener takes one,
    /// then the TLS handshake where it speaks TLS.
    pub(crate) async fn serve(
        &self,
        mut stream: TcpStream,
        mut peer: SocketAddr,
        state: Arc<State>,
        mut watcher: Watcher,
        listener: ListenerSettings,
        caps: &Arc<crate::request::client::PerClient>,
    ) {
        let host = state.host.clone();
        let mut before = Vec::new();
        // A PROXY header that names no client (the balancer's own check):
        // the peer is the balancer, whose trust must not extend to the
        // forwarding headers a client sent through it.
        let mut anonymous = false;
        if listener.proxy_protocol {
            let read = crate::connection::proxy_protocol::read_header(&mut stream);
            let header = tokio::select! {
                r = tokio::time::timeout(state.settings.header_read_timeout, read) => r,
                () = watcher.stopping() => return,
            };
            match header.unwrap_or(Err(Refused::TimedOut)) {
                Ok((client, rest)) => {
                    match client {
                        Some(c) => peer = c,
                        None => anonymous = true,
                    }
                    before = rest;
                }
                Err(e) => {
                    host.count(crate::metrics::PROXY_HEADERS_REFUSED, 1);
                    log::debug!("connection from {peer} refused: {e}");
                    return;
                }
            }
        }
        // One client may not hold every place, whether it connected itself
        // or a PROXY header names it; a trusted proxy speaks for many
        // clients, so it is not capped.
        let _place = if (state.settings.trusted_proxy)(peer.ip()) {
            None
        } else {
            match caps.enter(peer.ip()) {
                Some(p) => Some(p),
                None => {
                    host.count(crate::metrics::CONNECTIONS_REFUSED, 1);
                    return;
                }
            }
        };
        // A client speaking plain HTTP to an HTTPS listener is told so, in
        // plain HTTP, as nginx does; a TLS client's first byte is 0x16. The
        // wait for that byte is part of the handshake's time.
        let mut handshake_by = None;
        if let (true, Some((_, timeout))) = (listener.tls, &self.tls) {
            let by = tokio::time::Instant::now() + *timeout;
            handshake_by = Some(by);
            let first = match before.first() {
                Some(&b) => Some(b),
                None => {
                    let mut b = [0u8; 1];
                    let peek = tokio::time::timeout_at(by, stream.peek(&mut b));
                    tokio::select! {
                        r = peek => match r {
                            Ok(Ok(1)) => Some(b[0]),
                            Ok(_) => return,
                            Err(_) => {
                                host.count(crate::metrics::TLS_HANDSHAKE_FAILURES, 1);
                                log::debug!("TLS handshake with {peer} timed out");
                                return;
                            }
                        },
                        () = watcher.stopping() => return,
                    }
                }
            };
            if first.is_some_and(|b| b.is_ascii_uppercase()) {
                let io = HeadLimit::new(Prefixed::new(before, stream), host);
                plain_http_on_tls(&self.http1, io, watcher).await;
                return;
            }
        }
        let stream = Prefixed::new(before, stream);
        let to_https = listener.redirect_https;
        let tls = match (&self.tls, listener.tls) {
            (_, false) => None,
            (Some(t), true) => Some(t),
            (None, true) => {
                log::error!("a TLS listener without a certificate; closing the connection");
                return;
            }
        };
        let Some((acceptor, timeout)) = tls else {
            let builder = if self.h2c {
                Speak::Either(&self.either)
            } else {
                Speak::Http1(&self.http1)
            };
            let io = HeadLimit::new(stream, host);
            let how = How {
                tls: false,
                to_https,
                anonymous,
            };
            return run(builder, io, state, peer, how, watcher).await;
        };
        let by = handshake_by.unwrap_or_else(|| tokio::time::Instant::now() + *timeout);
        let handshake = tokio::select! {
            r = tokio::time::timeout_at(by, acceptor.accept(stream)) => r,
            () = watcher.stopping() => return,
        };
        let tls = match handshake {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                host.count(crate::metrics::TLS_HANDSHAKE_FAILURES, 1);
                log::debug!("TLS handshake with {peer} failed: {e}");
                return;
            }
            Err(_) => {
                host.count(crate::metrics::TLS_HANDSHAKE_FAILURES, 1);
                log::debug!("TLS handshake with {peer} timed out");
                return;
            }
        };
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let builder = if h2 {
            Speak::Either(&self.either)
        } else {
            Speak::Http1(&self.http1)
        };
        let how = How {
            tls: true,
            to_https: None,
            anonymous,
        };
        run(
            builder,
            HeadLimit::new(tls, host),
            state,
            peer,
            how,
            watcher,
        )
        .await;
    }
}

/// What every request of a connection is marked with.
#[derive(Clone, Copy)]
struct How {
    tls: bool,
    /// A redirecting listener: the HTTPS port.
    to_https: Option<u16>,
    /// Forwarding headers are the client's own, never to be believed.
    anonymous: bool,
}

/// Drives a connection until it ends, or gracefully ends it (GOAWAY on
/// HTTP/2) once the worker drains.
macro_rules! drive {
    ($conn:expr, $watcher:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r.map_err(|e| e.to_string()),
            () = $watcher.stopping() => {
                conn.as_mut().graceful_shutdown();
                conn.await.map_err(|e| e.to_string())
            }
        }
    }};
}

async fn run<I>(
    builder: Speak<'_>,
    io: I,
    state: Arc<State>,
    peer: SocketAddr,
    how: How,
    mut watcher: Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |mut req| {
        if how.tls {
            req.extensions_mut().insert(crate::request::OverTls);
        }
        if let Some(port) = how.to_https {
            req.extensions_mut()
                .insert(crate::responders::redirect::ToHttps(port));
        }
        if how.anonymous {
            for name in FORWARDING {
                req.headers_mut().remove(name);
            }
        }
        pipeline::handle(req, state.clone(), peer)
    });
    let io = TokioIo::new(io);
    let ended = match builder {
        Speak::Http1(b) => drive!(b.serve_connection(io, service).with_upgrades(), watcher),
        Speak::Either(b) => drive!(b.serve_connection_with_upgrades(io, service), watcher),
    };
    if let Err(e) = ended {
        log::debug!("connection ended: {e}");
    }
}

/// Answers every request of a plain-HTTP connection to an HTTPS listener
/// with 400 and closes it.
async fn plain_http_on_tls<I>(builder: &http1::Builder, io: I, mut watcher: Watcher)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(|_req| async {
        let refusal = crate::refusal::Refusal::bad_request(
            "This port speaks HTTPS: the plain HTTP request was sent to an HTTPS port.",
        )
        .with(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
        Ok::<_, std::convert::Infallible>(hyper::Response::<crate::body::Body>::from(refusal))
    });
    if let Err(e) = drive!(builder.serve_connection(TokioIo::new(io), service), watcher) {
        log::debug!("plain HTTP on an HTTPS listener: {e}");
    }
}

/// The headers through which a trusted proxy names the client.
const FORWARDING: [&str; 4] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
];
