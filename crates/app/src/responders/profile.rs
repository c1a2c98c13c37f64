//! `GET /profile`, an ordinary route (`Routes::profile`: a session
//! required, the policy `profile`, a per-user cache kept for
//! `profile.cache_ttl`; every answer `Cache-Control: private, no-store`)
//! whose upstream is the built-in responder here:
//! the profile from `profile.origin` through the route's pooled client,
//! or from the user record. The route's check, cache, single flight and
//! framing are every route's ([`crate::proxy::forward`]).

use hyper::header::{HeaderValue, CACHE_CONTROL};
use hyper::{Response, StatusCode};

use crate::refusal::Refusal;
use crate::responders::origin::{self, OriginError};
use crate::response::{json_text, with_header, Body};
use crate::state::State;
use crate::upstream::Route;

/// The responder: the profile of session user `user` (tag `uid`), with
/// the `Cache-Control` the route's cache keeps it by.
pub(crate) async fn answer(st: &State, route: &Route, uid: &str, user: &str) -> Response<Body> {
    let profile = match load(st, route, uid, user).await {
        Ok(p) => p,
        Err(r) => return r.into(),
    };
    // Whole seconds, rounded up: the route's `max_ttl` (cache_ttl itself)
    // cuts it to the exact figure, 0.1 s included.
    let ttl = (st.settings.profile.cache_ttl.as_secs_f64().ceil() as u64).max(1);
    with_header(
        json_text(StatusCode::OK, profile),
        CACHE_CONTROL,
        HeaderValue::from_str(&format!("private, max-age={ttl}"))
            .unwrap_or(HeaderValue::from_static("no-store")),
    )
}

/// The profile from the origin or the user record.
async fn load(st: &State, route: &Route, uid: &str, user: &str) -> Result<String, Refusal> {
    if st.settings.profile.origin.is_some() {
        return origin::fetch(route, user).await.map_err(|e| match e {
            OriginError::NotFound => Refusal::not_found("There is no profile for this user."),
            OriginError::Failed(why) => route.bad_gateway(
                &st.host,
                &why,
                "The profile service did not answer properly.",
            ),
        });
    }
    let record = match st.store.user(user).await {
        // The session belongs to the user of its tag: a user deleted and
        // made again under the same name is someone else.
        Ok(Some(u)) if u.uid == uid => u,
        Ok(_) => return Err(Refusal::not_found("There is no profile for this user.")),
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
