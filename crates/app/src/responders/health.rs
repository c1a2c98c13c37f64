//! The routes that report on the worker: `/healthz` (alive), `/readyz`
//! (reaches Redis) and `/metrics` (every worker's counters, for allowed
//! clients).

use bytes::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};

use crate::refusal::{Answer, Problem, Refusal};
use crate::request::Context;
use crate::response::{json, json_body, no_store, Body};
use crate::state::State;

pub(crate) fn healthz(st: &State) -> Response<Body> {
    // Made once per worker (`State::healthz`): a Bytes clone per request.
    no_store(json_body(StatusCode::OK, st.healthz.clone()))
}

pub(crate) async fn readyz(st: &State) -> Answer {
    // A stop has begun (during `shutdown_delay` the worker still serves
    // everything else): load balancers must take this host out.
    if st.host.stopping() {
        return Ok(no_store(
            Refusal::unavailable(
                "forkd is stopping; this host takes no new work.",
                std::time::Duration::from_secs(1),
            )
            .into(),
        ));
    }
    match st.store.ping().await {
        Ok(()) => Ok(no_store(json(
            StatusCode::OK,
            &serde_json::json!({"status": "ready", "redis": "ok"}),
        ))),
        Err(e) => Ok(no_store(st.redis_down(&e).into())),
    }
}

pub(crate) fn metrics(st: &State, cx: &Context) -> Answer {
    // Checked against the client as the rate limits see it: a request
    // relayed by a trusted (local) proxy is the forwarded client's, not the
    // proxy's.
    if !(st.settings.metrics_allow)(cx.client) {
        return Err(Refusal::new(
            Problem::Forbidden,
            "Metrics are not available from this address.",
        ));
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
    Ok(no_store(r))
}
