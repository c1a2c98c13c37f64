//! `[[route]]`: requests under a path prefix forwarded to an upstream
//! service, through one pooled hyper-util client per route and worker
//! (keep-alive, bounded idle pool), bodies streamed both ways, the session
//! checked here and the identity passed on in headers.
//!
//! The phases of a route, in order: path checks; the gate
//! (`crate::gate::check`: session, policies and cache probe in one Redis
//! call); a cache hit or the single-flight wait (`cached`); the upstream
//! request, its headers (`headers`: hop-by-hop, forwarding, identity) and
//! its answer, or the route's built-in responder; the cache fill
//! (`crate::cache::fill`). forward-auth (`GET /auth`) and tunnels too.

mod cached;
mod headers;

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;

use crate::access::Routed;
use crate::body::{ClientFault, Fault};
use crate::metrics;
use crate::refusal::{Answer, Problem, Refusal};
use crate::request::Context;
use crate::response::Body;
use crate::state::State;

use crate::cache::{self, fill::fill_cache, invalidate::Written};
use crate::gate::check;
use crate::upstream::{Failure, Route};
use cached::{builtin, from_cache};
use headers::{Forwarding, Identity};

/// A path that a prefix could be matched against in one way and the
/// upstream read in another: a dot segment (also with `;parameters`, as
/// `..;` that Tomcat-style servers read as `..`: it could climb out of
/// the upstream's path), or an escaped '.', '/' or '\'.
fn ambiguous(path: &str) -> bool {
    let escaped = |w: &[u8]| {
        w[0] == b'%' && matches!((w[1], w[2] | 0x20), (b'2', b'e' | b'f') | (b'5', b'c'))
    };
    path.as_bytes().windows(3).any(escaped)
        || path.contains('\\')
        || path.split('/').any(|s| {
            let s = s.split(';').next().unwrap_or(s);
            s == "." || s == ".."
        })
}

/// Forwards `req` to the route's upstream and streams its answer back,
/// marked with the route and what its upstream did ([`Routed`]).
pub(crate) async fn forward(
    req: Request<Incoming>,
    st: &Arc<State>,
    route: &Route,
    cx: &Context,
) -> Response<Body> {
    let mut upstream = None;
    let server = Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX));
    let mut r = forward_to(req, st, route, cx, &mut upstream, &server)
        .await
        .unwrap_or_else(Response::from);
    let server = server.load(std::sync::atomic::Ordering::Relaxed);
    r.extensions_mut().insert(Routed {
        label: route.label,
        index: route.index,
        upstream,
        server: (server != usize::MAX).then_some(server),
    });
    r
}

async fn forward_to(
    mut req: Request<Incoming>,
    st: &Arc<State>,
    route: &Route,
    cx: &Context,
    upstream: &mut Option<(Option<u16>, std::time::Duration)>,
    server: &Arc<std::sync::atomic::AtomicUsize>,
) -> Answer {
    if ambiguous(req.uri().path()) {
        return Err(Refusal::bad_request(
            "The path has a dot segment or an escaped '.', '/' or '\\'.",
        ));
    }
    if st.routes.crosses_routes(req.uri().path()) {
        return Err(crosses_routes());
    }
    let method = req.method().clone();
    let upgrade = headers::wants_upgrade(req.headers());
    let lookup = if route.cfg.cache.is_some() && method == hyper::Method::GET && !upgrade {
        Some(&route.specs)
    } else {
        None
    };
    let mut checked = check::check(&req, &method, st, Some(route), cx, lookup).await?;
    // The cache: a user's on an authenticated request; the shared one for
    // a request without credentials (never for one with them).
    let first = checked.cache.take();
    let cacheable = first.is_some();
    let mut filling = None;
    if let Some(first) = first {
        let counted = |hit| metrics::count_cache(st.host.as_ref(), route.label, hit);
        match from_cache(st, route, &checked, &req, first).await? {
            Ok(hit) => {
                counted(true);
                return Ok(hit);
            }
            Err(fill) => {
                counted(false);
                filling = fill;
            }
        }
    }
    if route.builtin.is_some() {
        let asked = std::time::Instant::now();
        let r = builtin(st, route, &checked, req.headers(), cacheable, filling).await;
        *upstream = Some((Some(r.status().as_u16()), asked.elapsed()));
        return Ok(r);
    }
    let who = &checked.who;
    // A writing method's target, whose cached answers a success ends.
    let written = (route.cfg.cache.is_some() && !method.is_safe()).then(|| Written {
        target: req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned(),
        host: req.headers().get(hyper::header::HOST).cloned(),
    });
    let request_headers = filling.as_ref().map(|_| req.headers().clone());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path();
    let path = if route.cfg.strip_prefix && route.cfg.prefix != "/" {
        match &path[route.cfg.prefix.len()..] {
            "" => "/",
            rest => rest,
        }
    } else {
        path
    };
    // Under the upstream's own path, if it has one: "/v2" + "/users" (a
    // pool's servers share it: see the config's check).
    let under = route.cfg.upstream.first().map_or("", |u| u.path());
    let target = match parts.uri.query() {
        Some(q) => format!("http://{}{under}{path}?{q}", route.authority),
        None => format!("http://{}{under}{path}", route.authority),
    };
    let Ok(uri) = target.parse::<Uri>() else {
        return Err(Refusal::bad_request(
            "The request target cannot be forwarded.",
        ));
    };
    let h = &mut parts.headers;
    if headers::one_content_length(h).is_err() {
        return Err(Refusal::bad_request(
            "The request's Content-Length values differ.",
        ));
    }
    headers::join_cookies(h);
    headers::strip_hop_by_hop(h, upgrade);
    headers::drop_underscored(h);
    headers::set_forwarding(
        h,
        &Forwarding {
            peer: cx.peer.ip(),
            trusted: cx.trusted,
            upstream_host: &route.authority,
            tls: cx.tls,
        },
    );
    let values = who
        .as_ref()
        .map(|[u, r, s]| [u.as_str(), r.as_str(), s.as_str()]);
    headers::set_identity(
        h,
        &Identity {
            names: st.routes.names.each_ref(),
            values,
            pass_authorization: route.cfg.pass_authorization,
            cookie_name: st.settings.auth.cookie.as_ref().map(|c| c.name.as_str()),
        },
    );
    h.insert(crate::request::id::X_REQUEST_ID, cx.id.clone());
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    let fault = Arc::new(ClientFault::default());
    let out = Request::from_parts(parts, Body::Client(body, fault.clone()));
    let asked = std::time::Instant::now();
    let sent = match written {
        None => {
            route
                .members
                .send(out, route.cfg.timeout, server, &fault)
                .await
        }
        // A write on a cached route is sent, and its cached answers ended,
        // by a task of its own: both happen even if the client goes away
        // meanwhile (hyper then drops this request's future). The task is
        // bounded by the route's timeout, and at most DETACHED_WRITES run
        // detached in a worker; past that a write is sent as any request.
        Some(w) => {
            let (members, st, uid) = (route.members.clone(), st.clone(), checked.uid.clone());
            let (timeout, server, fault) = (route.cfg.timeout, server.clone(), fault.clone());
            let write = async move {
                let r = members.send(out, timeout, &server, &fault).await;
                if let Ok(resp) = &r {
                    if resp.status().as_u16() < 400 {
                        w.invalidate(&st, resp.headers(), uid.as_deref()).await;
                    }
                }
                r
            };
            match DETACHED_WRITES.try_acquire() {
                Ok(permit) => tokio::spawn(async move {
                    let _permit = permit;
                    write.await
                })
                .await
                .unwrap_or_else(|e| Err(Failure::Failed(e.to_string()))),
                Err(_) => write.await,
            }
        }
    };
    *upstream = Some((
        sent.as_ref().ok().map(|r| r.status().as_u16()),
        asked.elapsed(),
    ));
    let mut resp = match sent {
        Ok(r) => r,
        Err(Failure::Failed(_)) if fault.get().is_some() => {
            return Err(client_fault(st, fault.get()));
        }
        Err(Failure::Failed(e)) => {
            return Err(route.bad_gateway(
                &st.host,
                &e,
                "The upstream service could not be reached or gave no answer.",
            ));
        }
        Err(Failure::Timeout) => {
            return Err(route.gateway_timeout(
                &st.host,
                &format!(
                    "no answer within the route's timeout ({:?})",
                    route.cfg.timeout
                ),
                "The upstream service did not answer in time.",
            ))
        }
    };
    if let Err(cause) = headers::frame_upstream_answer(&mut resp) {
        return Err(route.bad_gateway(
            &st.host,
            cause,
            "The upstream service's answer cannot be passed on as it is framed.",
        ));
    }
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switching {
        let Some(client_side) = client_upgrade else {
            return Err(route.bad_gateway(
                &st.host,
                "an unrequested 101",
                "The upstream service switched protocols, which the request did not ask for.",
            ));
        };
        let upstream_side = hyper::upgrade::on(&mut resp);
        tunnel(st, client_side, upstream_side);
    }
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, switching && upgrade);
    let mut r = match (filling, request_headers) {
        (Some(fill), Some(h)) => {
            let watch = route.watch(&st.host);
            let stream = move |b| Body::Stream(b, watch, None);
            fill_cache(st, route, &fill.place, &h, parts, body, stream)
                .await
                .map_err(|r| r.with_all(checked.rate_headers()))?
        }
        _ => {
            let mut r = Response::from_parts(
                parts,
                Body::Stream(body, route.watch(&st.host), Some(fault.clone())),
            );
            if cacheable {
                r.headers_mut()
                    .insert(cache::X_CACHE, HeaderValue::from_static("miss"));
            }
            r
        }
    };
    checked.add_headers(&mut r);
    Ok(r)
}

/// The answer to a request whose client broke off or garbled its body
/// while it was forwarded: the client's fault, never the upstream's. A
/// malformed body is 400; a client that went away is counted and logged
/// as such, with nginx's 499 for the access log (nobody reads the answer).
fn client_fault(st: &State, fault: Option<Fault>) -> Refusal {
    if fault == Some(Fault::Malformed) {
        return Refusal::bad_request("The request body's framing is malformed.");
    }
    st.host.count(metrics::CLIENTS_GONE, 1);
    log::debug!("a client went away before its request body ended");
    Refusal::new(
        Problem::ClientClosed,
        "The client closed the connection before its request body ended.",
    )
}

/// Writes on cached routes running detached in this worker, at most.
static DETACHED_WRITES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1024);

/// 400 for a path that an app could read as another route's.
fn crosses_routes() -> Refusal {
    Refusal::bad_request(
        "The path reads as another route's path once escaped letters are decoded, ';' parameters dropped and '//' or dot segments resolved.",
    )
}

/// The one value a proxy gave under any of `names`: nginx sends
/// `X-Original-*` (as configured), Traefik and others `X-Forwarded-*`.
/// The client's own headers come along, so a client could add the name its
/// proxy does not set: values that differ (or a name given twice with
/// different values) are refused. Ok(None) when none is there.
fn one_of<'a>(h: &'a HeaderMap, names: &[&str]) -> Result<Option<&'a HeaderValue>, ()> {
    let mut found: Option<&HeaderValue> = None;
    for v in names.iter().flat_map(|n| h.get_all(*n)) {
        match found {
            Some(f) if f != v => return Err(()),
            _ => found = Some(v),
        }
    }
    Ok(found)
}

/// `GET proxy.forward_auth_path`: whether the request a proxy in front
/// (nginx `auth_request`, Traefik `ForwardAuth`, Envoy `ext_authz`) is
/// about to pass on may go: 200 with the identity headers for a valid
/// session, 401 otherwise, in one Redis call. When the original path
/// (`X-Original-URI`, `X-Forwarded-Uri`) falls under a `[[route]]`, that
/// route's `auth` applies; otherwise a session is required. The session
/// cookie's same-site check compares with the original `Host`, which the
/// proxy names in `X-Forwarded-Host`.
pub(crate) async fn forward_auth(
    mut req: Request<Incoming>,
    st: &Arc<State>,
    cx: &Context,
) -> Answer {
    let h = req.headers();
    let (Ok(uri), Ok(method), Ok(host)) = (
        one_of(h, &["x-original-uri", "x-forwarded-uri"]),
        one_of(h, &["x-original-method", "x-forwarded-method"]),
        one_of(h, &["x-forwarded-host"]),
    ) else {
        return Err(Refusal::bad_request(
            "The original request is named twice, differently (X-Original-URI and X-Forwarded-Uri, X-Original-Method and X-Forwarded-Method, or X-Forwarded-Host).",
        ));
    };
    // Not a path (an absolute URI, say): no route's rules, a session required.
    let original = uri
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split('?').next().unwrap_or(""))
        .filter(|p| p.starts_with('/'));
    if original.is_some_and(ambiguous) {
        return Err(Refusal::bad_request(
            "The original path has a dot segment or an escaped '.', '/' or '\\'.",
        ));
    }
    if original.is_some_and(|p| st.routes.crosses_routes(p)) {
        return Err(crosses_routes());
    }
    // The credentials are the cookie when there is no bearer token.
    let by_cookie =
        !h.contains_key(hyper::header::AUTHORIZATION) && crate::gate::auth::has_credentials(h, st);
    let method = match method.map(|v| hyper::Method::from_bytes(v.as_bytes())) {
        Some(Ok(m)) => m,
        Some(Err(_)) => {
            return Err(Refusal::bad_request(
                "The original method is not an HTTP method.",
            ))
        }
        // Asked about another request whose method is unknown: a cookie
        // session cannot be checked against cross-site use.
        None if uri.is_some() && by_cookie => {
            return Err(Refusal::bad_request(
                "With the session cookie, forward-auth needs the original method (X-Original-Method or X-Forwarded-Method).",
            ))
        }
        None => hyper::Method::GET,
    };
    let route = original.and_then(|p| st.routes.find(p));
    if let Some(host) = host.cloned() {
        req.headers_mut().insert(hyper::header::HOST, host);
    }
    let checked = check::check(&req, &method, st, route, cx, None).await?;
    let mut r = crate::response::no_store(Response::new(Body::default()));
    checked.add_headers(&mut r);
    if let Some(values) = &checked.who {
        for (name, value) in st.routes.names.iter().zip(values) {
            if let Ok(v) = hyper::header::HeaderValue::from_str(value) {
                if !value.is_empty() {
                    r.headers_mut().insert(name, v);
                }
            }
        }
    }
    Ok(r)
}

/// Once both sides have switched protocols, copies bytes both ways until
/// either closes. The tunnel counts as an open connection, so a drain gives
/// it up to `shutdown_timeout`.
fn tunnel(st: &Arc<State>, client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let watcher = st.conns.watcher();
    // The client's connection lives on as the tunnel: counted as open (for
    // /metrics and for spreading connections over the workers).
    let open = crate::state::Open::new(st.clone());
    tokio::spawn(async move {
        let _open = (watcher, open);
        let (client, upstream) = match tokio::join!(client, upstream) {
            (Ok(c), Ok(u)) => (c, u),
            (c, u) => {
                log::debug!(
                    "upgrade failed: client {:?}, upstream {:?}",
                    c.err(),
                    u.err()
                );
                return;
            }
        };
        let (mut c, mut u) = (TokioIo::new(client), TokioIo::new(upstream));
        if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
            log::debug!("tunnel ended: {e}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ambiguous_paths_are_refused() {
        for p in [
            "/api/../admin",
            "/api/%2e%2e/admin",
            "/api%2Fx",
            "/a/./b",
            "/api/..;/admin",
            "/a/.;x/b",
            "/a\\b",
            "/a%5cb",
            "/a%5Cb",
            "/a%2E",
            "/a%2F",
        ] {
            assert!(ambiguous(p), "{p}");
        }
        for p in ["/api/x.y", "/api/..x", "/a/b", "/%2g", "/%3e", "/%2", "%5"] {
            assert!(!ambiguous(p), "{p}");
        }
    }
}
