//! A cached route's miss: the single-flight lock and the wait for another
//! request's answer, the fill from the upstream's answer or a built-in
//! responder's, and the responder itself.

use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response};

use super::{bad_gateway, cache, check, gateway_timeout};
use crate::access::LoggedUser;
use crate::response::Body;
use crate::state::State;
use crate::upstream::Route;

/// The answer of a route whose upstream is forkd's own responder, through
/// the route's cache as an upstream's would be.
pub(super) async fn builtin(
    st: &State,
    route: &Route,
    checked: &check::Checked,
    request_headers: &hyper::HeaderMap,
    cacheable: bool,
    filling: Option<(cache::Place, String)>,
) -> Response<Body> {
    let (Some([user, ..]), Some(uid)) = (&checked.who, &checked.uid) else {
        return crate::auth::invalid_token();
    };
    let answer = crate::profile::answer(st, route, uid, user).await;
    let mut r = match filling {
        Some(fill) => {
            let (parts, body) = answer.into_parts();
            fill_cache(st, route, &fill, request_headers, parts, body, |b| b).await
        }
        None => answer,
    };
    if cacheable && !r.headers().contains_key(cache::X_CACHE) {
        r.headers_mut()
            .insert(cache::X_CACHE, HeaderValue::from_static("miss"));
    }
    r.extensions_mut().insert(LoggedUser(user.clone()));
    checked.add_headers(&mut r);
    r
}

/// A cached answer, or the place to fill (with the lock's owner) when this
/// request took the single-flight lock; `Ok(Err(None))` for a miss that
/// another request is filling and that did not arrive in time. `first` is
/// what the check's lookup found.
pub(super) async fn from_cache(
    st: &State,
    route: &Route,
    checked: &check::Checked,
    req: &Request<Incoming>,
    first: Result<Response<Body>, cache::Place>,
) -> Result<Result<Response<Body>, Option<(cache::Place, String)>>, Response<Body>> {
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let uid = checked.uid.as_deref();
    let hit = |mut r: Response<Body>| {
        checked.add_headers(&mut r);
        if let Some([user, ..]) = &checked.who {
            r.extensions_mut().insert(LoggedUser(user.clone()));
        }
        r
    };
    let place = match first {
        Ok(r) => return Ok(Ok(hit(r))),
        Err(p) => p,
    };
    let owner = crate::secrets::nonce();
    let (lock_ttl, wait) = route.fill_lock;
    let wait_until = tokio::time::Instant::now() + wait;
    match st
        .store
        .cache_lock(&place.url, &place.variant, &owner, lock_ttl)
        .await
    {
        Ok(true) => return Ok(Err(Some((place, owner)))),
        Ok(false) => {}
        Err(e) => return Err(st.redis_down(&e)),
    }
    // Another request is asking the upstream: wait (bounded) for its
    // answer, then ask the upstream ourselves.
    while tokio::time::Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Ok(r) = cache::lookup(st, &route.specs, uid, target, req.headers()).await? {
            return Ok(Ok(hit(r)));
        }
    }
    Ok(Err(None))
}

/// The answer to a request that took the cache lock (the upstream's, or a
/// built-in responder's): stored when it may be and fits, with up to 10 %
/// less time than it allows (so that entries made together do not expire
/// together), and answered either way (`x-cache: miss`); then the lock
/// is released. `stream` passes on an answer that is not kept.
pub(super) async fn fill_cache<B>(
    st: &State,
    route: &Route,
    fill: &(cache::Place, String),
    request_headers: &hyper::HeaderMap,
    parts: hyper::http::response::Parts,
    body: B,
    stream: impl FnOnce(B) -> Body,
) -> Response<Body>
where
    B: hyper::body::Body<Data = bytes::Bytes, Error = hyper::Error> + Send + Unpin,
{
    let r = async {
        let Some(limits) = route.cfg.cache else {
            return Response::from_parts(parts, stream(body));
        };
        let miss = |mut r: Response<Body>| {
            r.headers_mut()
                .insert(cache::X_CACHE, HeaderValue::from_static("miss"));
            r
        };
        // The length the answer declared (an upstream's `Content-Length`), or
        // the one a built-in answer has.
        let length = hyper::body::Body::size_hint(&body).exact();
        let keep = cache::storable(parts.status, &parts.headers, fill.0.shared, limits.max_ttl)
            .filter(|_| length.is_some_and(|n| n <= limits.max_bytes));
        let Some((ttl, spec)) = keep else {
            return miss(Response::from_parts(parts, stream(body)));
        };
        let ttl = cache::jittered(ttl);
        let read = http_body_util::BodyExt::collect(http_body_util::Limited::new(
            body,
            limits.max_bytes as usize,
        ));
        let bytes = match tokio::time::timeout(route.cfg.timeout, read).await {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) => {
                return bad_gateway(
                    st,
                    route,
                    &format!("the answer broke off during a cache fill: {e}"),
                    "The upstream service broke off its answer.",
                );
            }
            Err(_) => {
                return gateway_timeout(
                    st,
                    route,
                    &format!(
                    "the answer did not end within the route's timeout ({:?}) during a cache fill",
                    route.cfg.timeout
                ),
                    "The upstream service did not finish its answer in time.",
                )
            }
        };
        cache::store(
            st,
            &route.specs,
            &fill.0,
            &spec,
            request_headers,
            (&parts.status, &parts.headers, &bytes),
            ttl,
        )
        .await;
        miss(Response::from_parts(parts, Body::new(bytes)))
    }
    .await;
    let (place, owner) = fill;
    if let Err(e) = st
        .store
        .cache_unlock(&place.url, &place.variant, owner)
        .await
    {
        log::debug!("cannot release a cache lock: {e}");
    }
    r
}
