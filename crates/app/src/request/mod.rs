//! The request context, worked out once per request before any route:
//! what its head must be (`head`: one valid `Host`, no padded values,
//! within `http.max_header_bytes`), its id (`id`), its place among the
//! requests in flight (`inflight`), and the client's address as the
//! limits see it (`client`).

pub(crate) mod client;
pub(crate) mod head;
pub(crate) mod id;
pub(crate) mod inflight;

/// One request's context, worked out once before any route and lent to
/// every phase after it.
pub(crate) struct Context {
    /// The request id, as `X-Request-Id` carries it.
    pub(crate) id: hyper::header::HeaderValue,
    /// The connection's peer.
    pub(crate) peer: std::net::SocketAddr,
    /// The peer is a trusted proxy (`http.trusted_proxies`).
    pub(crate) trusted: bool,
    /// The client as the limits see it ([`client::client_ip`]).
    pub(crate) client: std::net::IpAddr,
    /// The request came over TLS.
    pub(crate) tls: bool,
    /// The user the gate found, for the access log.
    pub(crate) user: std::sync::OnceLock<String>,
}

impl Context {
    pub(crate) fn new<B>(
        req: &hyper::Request<B>,
        peer: std::net::SocketAddr,
        id: hyper::header::HeaderValue,
        trusted: &dyn Fn(std::net::IpAddr) -> bool,
    ) -> Self {
        let peer_trusted = trusted(peer.ip());
        Context {
            id,
            peer,
            trusted: peer_trusted,
            client: client::client_ip(peer.ip(), peer_trusted, req.headers(), trusted),
            tls: req.extensions().get::<OverTls>().is_some(),
            user: std::sync::OnceLock::new(),
        }
    }

    pub(crate) fn id(&self) -> &str {
        self.id.to_str().unwrap_or_default()
    }

    /// Names the user for the access log (the first name given stays).
    pub(crate) fn log_user(&self, name: &str) {
        if self.user.get().is_none() {
            let _ = self.user.set(name.to_owned());
        }
    }
}

/// Marks a request that came over TLS (set by the connection, read by
/// the proxy for `X-Forwarded-Proto` and by the dispatch for HSTS).
#[derive(Debug, Clone, Copy)]
pub(crate) struct OverTls;
