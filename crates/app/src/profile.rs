//! `GET /profile`: the built-in route of `[[route]]`'s mechanism (a
//! session required, the policy `profile`, `profile.origin` through the
//! route's pooled client), with its own cache: the one-round-trip check
//! (session, limit, cached profile), the cache fill with single flight
//! across workers and hosts, and the load from the origin or the user
//! record.

use std::net::SocketAddr;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CACHE_CONTROL};
use hyper::{Method, Request, Response, StatusCode};

use crate::access::LoggedUser;
use crate::auth::invalid_token;
use crate::origin::{self, OriginError};
use crate::proxy::check::{check, Lookup};
use crate::response::{json_text, not_found, problem, unavailable, with_header, Body};
use crate::state::State;
use crate::upstream::Route;
use crate::{metrics, secrets};

/// `GET /profile`: every answer is the user's alone, never for a cache.
pub(crate) async fn profile(
    req: Request<Incoming>,
    st: &State,
    peer: SocketAddr,
) -> Response<Body> {
    with_header(
        profile_answer(req, st, peer).await,
        CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    )
}

async fn profile_answer(req: Request<Incoming>, st: &State, peer: SocketAddr) -> Response<Body> {
    let route = &st.routes.profile;
    let checked = match check(&req, &Method::GET, st, Some(route), peer, Lookup::Profile).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let (Some([user, ..]), Some(uid)) = (&checked.who, &checked.uid) else {
        return invalid_token();
    };
    let mut r = match &checked.profile {
        Some(p) => {
            st.host.count(metrics::CACHE_HITS, 1);
            cache_header(json_text(StatusCode::OK, p.clone()), true)
        }
        None => {
            st.host.count(metrics::CACHE_MISSES, 1);
            match fill(st, route, uid, user).await {
                Ok(p) => cache_header(json_text(StatusCode::OK, p), false),
                Err(r) => r,
            }
        }
    };
    checked.add_headers(&mut r);
    r.extensions_mut().insert(LoggedUser(user.clone()));
    r
}

/// Cache-aside with single flight across every worker and host: one
/// request takes the Redis lock and fills the cache; the others wait
/// (bounded) for its result.
async fn fill(st: &State, route: &Route, uid: &str, user: &str) -> Result<String, Response<Body>> {
    let cfg = &st.settings.profile;
    let owner = secrets::nonce();
    let deadline = tokio::time::Instant::now() + cfg.lock_wait;
    let mut last_try = false;
    loop {
        match st.store.lock_profile(uid, &owner, cfg.lock_timeout).await {
            Ok(true) => {
                let result = load(st, route, uid, user).await;
                if let Ok(p) = &result {
                    if let Err(e) = st
                        .store
                        .cache_profile(uid, p, jittered(cfg.cache_ttl))
                        .await
                    {
                        log::warn!("cannot cache the profile of '{user}': {e}");
                    }
                }
                if let Err(e) = st.store.unlock_profile(uid, &owner).await {
                    log::warn!("cannot release the profile lock of '{user}': {e}");
                }
                return result;
            }
            Ok(false) if last_try => {
                return Err(unavailable(
                    "The profile is being loaded; try again shortly.",
                    Duration::from_secs(1),
                ))
            }
            Ok(false) => {}
            Err(e) => return Err(st.redis_down(&e)),
        }
        // Someone else is filling it: wait (bounded) for the result, then
        // try the lock once more in case its holder died.
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            match st.store.cached_profile(uid).await {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => return Err(st.redis_down(&e)),
            }
        }
        last_try = true;
    }
}

fn jittered(ttl: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    let fraction = f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX) * 0.1;
    ttl.mul_f64(1.0 - fraction)
}

/// The slow path: the profile from the origin or the user record.
async fn load(st: &State, route: &Route, uid: &str, user: &str) -> Result<String, Response<Body>> {
    if st.settings.profile.origin.is_some() {
        return origin::fetch(route, user).await.map_err(|e| match e {
            OriginError::NotFound => not_found("There is no profile for this user."),
            OriginError::Failed(why) => {
                log::warn!("profile origin failed for '{user}': {why}");
                problem(
                    StatusCode::BAD_GATEWAY,
                    "bad-gateway",
                    "The profile service did not answer properly.",
                )
            }
        });
    }
    let record = match st.store.user(user).await {
        // The session belongs to the user of its tag: a user deleted and
        // made again under the same name is someone else.
        Ok(Some(u)) if u.uid == uid => u,
        Ok(_) => return Err(not_found("There is no profile for this user.")),
        Err(e) => return Err(st.redis_down(&e)),
    };
    let sessions = match st.store.session_count(uid).await {
        Ok(n) => n,
        Err(e) => return Err(st.redis_down(&e)),
    };
    Ok(serde_json::json!({
        "username": record.name,
        "display_name": record.display_name,
        "role": record.role,
        "created_at": record.created_at,
        "last_login": record.last_login,
        "active_sessions": sessions,
    })
    .to_string())
}

fn cache_header(r: Response<Body>, hit: bool) -> Response<Body> {
    with_header(
        r,
        HeaderName::from_static("x-cache"),
        HeaderValue::from_static(if hit { "hit" } else { "miss" }),
    )
}
