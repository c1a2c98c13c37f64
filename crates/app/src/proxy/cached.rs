//! A cached route's way through the cache: a hit, the single-flight lock
//! and the wait for another request's answer, and a built-in responder's
//! answer filled like an upstream's.

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response};

use crate::cache::{self, fill::fill_cache};
use crate::gate::check;
use crate::refusal::Refusal;
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
    filling: Option<Unlock>,
) -> Response<Body> {
    let (Some([user, ..]), Some(uid)) = (&checked.who, &checked.uid) else {
        return crate::gate::auth::invalid_token().into();
    };
    let answer = crate::responders::profile::answer(st, route, uid, user).await;
    let mut r = match filling {
        Some(fill) => {
            let (parts, body) = answer.into_parts();
            fill_cache(st, route, &fill.place, request_headers, parts, body, |b| b)
                .await
                .unwrap_or_else(Response::from)
        }
        None => answer,
    };
    if cacheable && !r.headers().contains_key(cache::X_CACHE) {
        r.headers_mut()
            .insert(cache::X_CACHE, HeaderValue::from_static("miss"));
    }
    checked.add_headers(&mut r);
    r
}

/// A cached answer, or the place to fill (its lock held until the guard
/// drops) when this request took the single-flight lock; `Ok(Err(None))`
/// for a miss that another request is filling and that did not arrive in
/// time. `first` is what the check's lookup found.
pub(super) async fn from_cache(
    st: &Arc<State>,
    route: &Route,
    checked: &check::Checked,
    req: &Request<Incoming>,
    first: Result<Response<Body>, cache::Place>,
) -> Result<Result<Response<Body>, Option<Unlock>>, Refusal> {
    let target = route.cache_target(req.uri());
    let uid = checked.uid.as_deref();
    let hit = |mut r: Response<Body>| {
        checked.add_headers(&mut r);
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
        Ok(true) => {
            return Ok(Err(Some(Unlock {
                st: st.clone(),
                place,
                owner,
            })))
        }
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

/// The place a request fills, with the single-flight lock it took: the
/// lock goes back when the request is done with it, however it ends
/// (answered, refused, failed upstream, or dropped with its client).
/// Without that, an early end would leave the lock for its whole lifetime
/// (twice the route's timeout), and every request for the entry would
/// wait out its bounded wait first.
pub(super) struct Unlock {
    st: Arc<State>,
    pub(super) place: cache::Place,
    owner: String,
}

impl Drop for Unlock {
    fn drop(&mut self) {
        // A worker's runtime always runs its requests; at its very end the
        // lock's own expiry releases it.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let st = self.st.clone();
        let (url, variant, owner) = (
            self.place.url.clone(),
            std::mem::take(&mut self.place.variant),
            std::mem::take(&mut self.owner),
        );
        runtime.spawn(async move {
            if let Err(e) = st.store.cache_unlock(&url, &variant, &owner).await {
                log::debug!("cannot release a cache lock: {e}");
            }
        });
    }
}
