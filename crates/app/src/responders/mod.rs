//! forkd's own answers: `/healthz`, `/readyz` and `/metrics` (`health`),
//! the `/profile` route's responder (`profile`, with `origin`), and the
//! plain-to-HTTPS redirect of a redirecting listener (`redirect`).

pub(crate) mod health;
pub(crate) mod origin;
pub(crate) mod profile;
pub(crate) mod redirect;
