//! One request, start to end ([`handle`]): the request context (its head
//! checked, its id, its place among the requests in flight, the client's
//! address), the dispatch of a path and method to a built-in or a route,
//! and on the way out the one place that counts its metrics and writes
//! its access line (by the route that answered: [`Routed`]), with the
//! worker's pid and `Connection: close` while draining.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, REFERER, USER_AGENT};
use hyper::{Method, Request, Response, Version};

use crate::access::{Line, Routed};
use crate::request::id::X_REQUEST_ID;
use crate::request::Context;

use crate::refusal::{Answer, Problem, Refusal, Refused};
use crate::response::{with_header, Body};
use crate::state::State;
use crate::{gate::auth, proxy, responders::health};

pub(crate) async fn handle(
    req: Request<Incoming>,
    st: Arc<State>,
    peer: SocketAddr,
) -> Result<Response<Body>, h2::Error> {
    let started = std::time::Instant::now();
    let route_index = crate::metrics::route_index(req.uri().path());
    let id = st.request_ids.for_request(req.headers());
    let cx = Context::new(&req, peer, id, st.settings.trusted_proxy.as_ref());
    let running = st
        .in_flight
        .enter(req.method().as_str(), req.uri().path(), cx.id());
    // What the access line needs of the request, which the handler takes.
    let logged = st.access.as_ref().map(|_| Logged::of(&req));
    let hsts = st
        .settings
        .tls
        .as_ref()
        .filter(|_| cx.tls)
        .and_then(|t| t.hsts.clone());
    let mut abandoned = Abandoned(Some(&st));
    // Refusals are made into answers in the scope, with the request id.
    let answer = async { route(req, &st, &cx).await.unwrap_or_else(Response::from) };
    let mut resp = crate::refusal::REQUEST_ID
        .scope(cx.id.clone(), answer)
        .await;
    abandoned.0 = None;
    drop(running);
    // A whole body's length is the body's own, whatever a header (a
    // stored one, say) claims: hyper sets it from the body (RFC 9112
    // section 6.3).
    if let Body::Full(_) = resp.body() {
        resp.headers_mut().remove(CONTENT_LENGTH);
    }
    let took = started.elapsed();
    let routed = resp.extensions().get::<Routed>().copied();
    let label = routed.map_or(route_index, |r| r.label);
    crate::metrics::record(st.host.as_ref(), label, resp.status().as_u16(), took);
    match resp.extensions().get::<Refused>() {
        Some(Refused(Problem::TooManyRequests)) => st.host.count(crate::metrics::RATE_LIMITED, 1),
        Some(Refused(Problem::HeadTooLarge)) => st.host.count(crate::metrics::HEADS_TOO_LARGE, 1),
        _ => {}
    }
    if let (Some(access), Some(l)) = (&st.access, &logged) {
        let configured = routed
            .and_then(|r| r.index)
            .and_then(|i| st.settings.routes.get(i));
        let upstream = match (configured, routed) {
            (Some(r), Some(routed)) => routed
                .server
                .and_then(|i| r.upstream.get(i))
                .map(ToString::to_string),
            (Some(_), None) => None,
            (None, Some(_)) => st
                .settings
                .profile
                .origin
                .as_ref()
                .map(|o| format!("http://{o}")),
            (None, None) => None,
        };
        let kept = access.log(&Line {
            client: cx.client,
            method: &l.method,
            path: &l.path,
            version: l.version,
            status: resp.status().as_u16(),
            bytes: hyper::body::Body::size_hint(resp.body()).exact(),
            duration: took,
            slot: st.slot,
            pid: st.pid,
            request_id: cx.id(),
            user: cx.user.get().map(String::as_str),
            referer: l.referer.as_deref(),
            user_agent: l.user_agent.as_deref(),
            route: configured.map_or(crate::metrics::builtin_name(label), |r| r.prefix.as_str()),
            upstream: upstream.as_deref(),
            upstream_answer: routed.and_then(|r| r.upstream),
        });
        if !kept {
            st.host.count(crate::metrics::ACCESS_LINES_DROPPED, 1);
        }
    }
    let headers = resp.headers_mut();
    headers.insert(X_REQUEST_ID, cx.id);
    headers.insert("x-forkd-pid", st.pid_header.clone());
    if let Some(v) = hsts {
        headers.insert(hyper::header::STRICT_TRANSPORT_SECURITY, v);
    }
    if st.draining.load(Relaxed) {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    st.host.request_served();
    // Counted and logged as the 400 it is; on HTTP/2 the stream is reset.
    if resp
        .extensions()
        .get::<crate::refusal::Malformed>()
        .is_some()
    {
        return Err(h2::Error::from(h2::Reason::PROTOCOL_ERROR));
    }
    Ok(resp)
}

/// Counts a request whose handling was dropped before it answered: hyper
/// drops it when the client resets its HTTP/2 stream or the connection
/// goes, so the client went away (never the upstream's failure). A drain
/// that runs out of time drops requests too: those are not counted.
struct Abandoned<'a>(Option<&'a State>);

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if let Some(st) = self.0.filter(|st| !st.draining.load(Relaxed)) {
            st.host.count(crate::metrics::CLIENTS_GONE, 1);
            log::debug!("a client went away before its answer");
        }
    }
}

/// The parts of a request its access line shows.
struct Logged {
    method: String,
    /// Without the query, which may carry secrets.
    path: String,
    version: &'static str,
    referer: Option<String>,
    user_agent: Option<String>,
}

impl Logged {
    fn of(req: &Request<Incoming>) -> Self {
        let header = |name| {
            req.headers()
                .get(name)
                .map(|v: &HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        Logged {
            method: req.method().as_str().to_owned(),
            path: req.uri().path().to_owned(),
            version: match req.version() {
                Version::HTTP_10 => "HTTP/1.0",
                Version::HTTP_2 => "HTTP/2.0",
                _ => "HTTP/1.1",
            },
            referer: header(REFERER),
            user_agent: header(USER_AGENT),
        }
    }
}

async fn route(mut req: Request<Incoming>, st: &Arc<State>, cx: &Context) -> Answer {
    crate::request::head::check(&mut req, st.settings.max_header_bytes)?;
    if let Some(to) = req
        .extensions()
        .get::<crate::responders::redirect::ToHttps>()
    {
        if !crate::responders::redirect::served(req.uri().path()) {
            return crate::responders::redirect::to_https(&req, to.0);
        }
    }
    // An authority (`GET host:80`) or `*` target names no path: nothing
    // here, and no route's rules, applies to it.
    if !req.uri().path().starts_with('/') {
        return Err(Refusal::bad_request("The request target must be a path."));
    }
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    let post = *req.method() == Method::POST;
    let get = *req.method() == Method::GET;
    let not_allowed = |allow| Err(Refusal::method_not_allowed(allow));
    // The handlers that wait on Redis or an upstream are boxed: their
    // state is large, and hyper moves the request's future once per
    // request, so an unboxed one would cost every request (`/healthz`
    // too) a copy of all of it.
    match req.uri().path() {
        "/healthz" if read => Ok(health::healthz(st)),
        "/readyz" if read => Box::pin(health::readyz(st)).await,
        "/metrics" if read => health::metrics(st, cx),
        "/healthz" | "/readyz" | "/metrics" => not_allowed("GET, HEAD"),
        "/login" if post => Box::pin(auth::login(req, st, cx)).await,
        "/logout" if post => Box::pin(auth::logout(req, st)).await,
        "/login" | "/logout" => not_allowed("POST"),
        // Every answer is the user's alone, never for a cache on the way.
        "/profile" if get => Ok(with_header(
            Box::pin(proxy::forward(req, st, &st.routes.profile, cx)).await,
            CACHE_CONTROL,
            HeaderValue::from_static("private, no-store"),
        )),
        "/profile" => not_allowed("GET"),
        path if !path.is_empty() && path == st.settings.proxy.forward_auth_path => {
            if read {
                Box::pin(proxy::forward_auth(req, st, cx)).await
            } else {
                not_allowed("GET, HEAD")
            }
        }
        path => match st.routes.find(path) {
            Some(r) => Ok(Box::pin(proxy::forward(req, st, r, cx)).await),
            None => Err(Refusal::not_found("There is no resource at this path.")),
        },
    }
}
