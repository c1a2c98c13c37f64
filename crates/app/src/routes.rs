//! Dispatch: a path and method to its handler, and what every answer
//! gets on the way out (metrics, the worker's pid, `Connection: close`
//! while draining).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION};
use hyper::{Method, Request, Response};

use crate::response::{method_not_allowed, not_found, Body};
use crate::state::State;
use crate::{auth, health, profile};

pub(crate) async fn handle(
    req: Request<Incoming>,
    st: Arc<State>,
    peer: SocketAddr,
) -> Result<Response<Body>, Infallible> {
    let started = std::time::Instant::now();
    let route_index = crate::metrics::route_index(req.uri().path());
    let mut resp = route(req, &st, peer).await;
    crate::metrics::record(
        st.host.as_ref(),
        route_index,
        resp.status().as_u16(),
        started.elapsed(),
    );
    let headers = resp.headers_mut();
    headers.insert("x-forkd-pid", st.pid_header.clone());
    if st.draining.load(Relaxed) {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    st.host.request_served();
    Ok(resp)
}

async fn route(req: Request<Incoming>, st: &Arc<State>, peer: SocketAddr) -> Response<Body> {
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    let post = *req.method() == Method::POST;
    let get = *req.method() == Method::GET;
    match req.uri().path() {
        "/healthz" if read => health::healthz(st),
        "/readyz" if read => health::readyz(st).await,
        "/metrics" if read => health::metrics(&req, st, peer),
        "/healthz" | "/readyz" | "/metrics" => method_not_allowed("GET, HEAD"),
        "/login" if post => auth::login(req, st, peer).await,
        "/logout" if post => auth::logout(req, st).await,
        "/login" | "/logout" => method_not_allowed("POST"),
        "/profile" if get => profile::profile(req, st).await,
        "/profile" => method_not_allowed("GET"),
        _ => not_found("There is no resource at this path."),
    }
}
