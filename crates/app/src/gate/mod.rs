//! The gate: who is asking and whether they may. Credentials and
//! sessions (`auth`, `cookie`), the one rate limiter (`limiter`, with the
//! cells it leases in `crate::lease`) and whose bucket a request counts in
//! (`buckets`), and `check`, which asks Redis all of it for a route in one
//! call, with the cache probe.

pub(crate) mod auth;
pub mod buckets;
pub(crate) mod check;
pub(crate) mod cookie;
pub(crate) mod limiter;
