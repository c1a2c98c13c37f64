//! The request context, worked out once per request before any route:
//! what its head must be (`head`: one valid `Host`, no padded values,
//! within `http.max_header_bytes`), its id (`id`), its place among the
//! requests in flight (`inflight`), and the client's address as the
//! limits see it (`client`).

pub(crate) mod client;
pub(crate) mod head;
pub(crate) mod id;
pub(crate) mod inflight;

/// Marks a request that came over TLS (set by the connection, read by
/// the proxy for `X-Forwarded-Proto` and by the dispatch for HSTS).
#[derive(Debug, Clone, Copy)]
pub(crate) struct OverTls;
