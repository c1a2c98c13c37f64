//! The routes that report on the worker: `/healthz` (alive), `/readyz`
//! (reaches Redis) and `/metrics` (every worker's counters, for allowed
//! clients).

use std::net::SocketAddr;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};

use crate::response::{json, json_body, no_store, problem, unavailable, Body};
use crate::state::State;

pub(crate) fn healthz(st: &State) -> Response<Body> {
    // Made once per worker (`State::healthz`): a Bytes clone per request.
    no_store(json_body(StatusCode::OK, st.healthz.clone()))
}

pub(crate) async fn readyz(st: &State) -> Response<Body> {
    // A stop has begun (during `shutdown_delay` the worker still serves
    // everything else): load balancers must take this host out.
    if st.host.stopping() {
        return no_store(unavailable(
            "forkd is stopping; this host takes no new work.",
            std::time::Duration::from_secs(1),
        ));
    }
    match st.store.ping().await {
        Ok(()) => no_store(json(
            StatusCode::OK,
            &serde_json::json!({"status": "ready", "redis": "ok"}),
        )),
        Err(e) => no_store(st.redis_down(&e)),
    }
}

pub(crate) fn metrics(req: &Request<Incoming>, st: &State, peer: SocketAddr) -> Response<Body> {
    // Checked against the client as the rate limits see it: a request
    // relayed by a trusted (local) proxy is the forwarded client's, not the
    // proxy's.
    let client = crate::request::client::client_ip(
        peer.ip(),
        req.headers(),
        st.settings.trusted_proxy.as_ref(),
    );
    if !(st.settings.metrics_allow)(client) {
        return problem(
            StatusCode::FORBIDDEN,
            "forbidden",
            "Metrics are not available from this address.",
        );
    }
    let cert = st.settings.tls.as_ref().map(|t| &t.identity.info);
    let routes: Vec<(&str, bool)> = st
        .settings
        .routes
        .iter()
        .map(|r| (r.prefix.as_str(), r.cache.is_some()))
        .collect();
    let mut r = Response::new(Body::new(Bytes::from(crate::metrics::render(
        st.host.as_ref(),
        cert,
        &routes,
    ))));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    no_store(r)
}
