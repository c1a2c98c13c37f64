//! Upstreams: each route's settings and its pooled clients, and the
//! connector that reaches an upstream over TCP or a unix socket. Plain
//! data and I/O, below the request path: nothing here knows the worker's
//! state or the proxy that uses it.

mod connect;
pub(crate) mod members;
pub(crate) mod pool;
pub(crate) mod tls;

pub(crate) use members::Failure;
pub(crate) use pool::{Route, Routes, Specs, PROFILE_POLICY};
