//! Authentication: `POST /login` (body, failure limits, the password
//! check, the session), `POST /logout`, and bearer tokens. The hashing
//! itself, and the dummy hash that makes an unknown user cost what a wrong
//! password costs, are in [`crate::secrets`]; the session scripts are in
//! the store. Bad input is answered before it reaches argon2 or Redis.

use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use forkd_store::{Bucket, Limit, Policy, User};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, SET_COOKIE,
    WWW_AUTHENTICATE,
};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::OwnedSemaphorePermit;

use crate::refusal::{Answer, Problem, Refusal};
use crate::request::Context;
use crate::response::{json, no_store, Body, RATELIMIT, RATELIMIT_POLICY};
use crate::secrets;
use crate::state::State;
use crate::{gate::buckets, gate::limiter};

/// Largest accepted request body.
const MAX_BODY: usize = 16 * 1024;
/// Largest username or password.
const MAX_FIELD: usize = 1024;

/// `POST /login`: one step per function, each answering on its own
/// failure.
pub(crate) async fn login(req: Request<Incoming>, st: &Arc<State>, cx: &Context) -> Answer {
    let ip = cx.client;
    // The session this browser had: ended once the new one is made, so a
    // cookie planted before the login is worth nothing after it.
    let before = st
        .settings
        .auth
        .cookie
        .as_ref()
        .and_then(|c| crate::gate::cookie::read(req.headers(), &c.name))
        .and_then(secrets::parse_token);
    let (username, password) = credentials(req, st).await?;
    let (limits, taken) = take_places(st, ip, &username).await?;
    let give_back = || limiter::give_back(st, &limits, &taken, None);
    let Some(permit) = queue(st).await else {
        // Not a wrong password: its places go back.
        give_back().await;
        return Err(Refusal::unavailable(
            "Too many logins are being checked; try again shortly.",
            Duration::from_secs(1),
        ));
    };
    // On a Redis error the places are kept: through a flapping Redis the
    // limits (then in memory) must still count what reaches them.
    let user = st
        .store
        .user(&username)
        .await
        .map_err(|e| st.redis_down(&e))?;
    let phc = user.as_ref().map(|u| u.phc.clone());
    let (ok, rehash) = match verify(st, permit, phc, password).await {
        Ok(v) => v,
        Err(r) => {
            give_back().await;
            return Err(r);
        }
    };
    let Some(user) = user.filter(|_| ok) else {
        return Err(unauthorized_login());
    };
    give_back().await;
    if let Some(phc) = rehash {
        store_rehash(st, &user, &phc).await;
    }
    let r = start_session(st, &user).await?;
    cx.log_user(&user.name);
    if let Some((uid, hash)) = before {
        if let Err(e) = st.store.end_session(&uid, &hash).await {
            log::warn!("cannot end the session a login replaced: {e}");
        }
    }
    Ok(r)
}

/// The username and password of the body, checked before anything costs.
async fn credentials(req: Request<Incoming>, st: &State) -> Result<(String, String), Refusal> {
    let body = read_json(req, st).await?;
    if !body.is_object() {
        return Err(Refusal::bad_request("The body must be a JSON object."));
    }
    let (username, password) = match (field(&body, "username"), field(&body, "password")) {
        (Ok(u), Ok(p)) => (u.to_owned(), p.to_owned()),
        (Err(r), _) | (_, Err(r)) => return Err(r),
    };
    // The rule of `forkd user add`: a name no user can have gets no Redis
    // command and no hash.
    if !forkd_store::valid_username(&username) {
        return Err(Refusal::bad_request(
            "The username must be 1 to 64 letters, digits, '.', '_', '-' or '@'.",
        ));
    }
    Ok((username, password))
}

/// Brute-force limits, before any hashing, as built-in policies: per
/// client, per (username, client), and a loose ceiling per username over
/// all addresses, taken all or none in one call. A right password gives
/// its places back, so only failures use them up, and failures from one
/// address cannot lock the user out at another. Behind them (so that one
/// client's excess never reaches it), all logins of this host, in memory,
/// shared out among its workers: a flood from many addresses gets 429s,
/// not the hash queue.
async fn take_places(
    st: &State,
    ip: IpAddr,
    username: &str,
) -> Result<(Vec<Limit>, limiter::Taken), Refusal> {
    let auth = &st.settings.auth;
    let limit = |name: &str, key: String, policy: Policy| Limit {
        policy_name: name.to_owned(),
        policy,
        bucket: Bucket::Plain { name: key },
        want: 1,
    };
    let limits = vec![
        limit(
            buckets::LOGIN_CLIENT,
            buckets::login_client(ip),
            auth.login_ip,
        ),
        limit(
            buckets::LOGIN_NAME_CLIENT,
            buckets::login_name_client(username, ip),
            auth.login_user,
        ),
        limit(
            buckets::LOGIN_NAME,
            username.to_owned(),
            auth.login_user_all,
        ),
    ];
    let Some(taken) = limiter::take(st, None, &limits, None).await? else {
        // Only a session check answers "no session", and none was asked
        // for: a store that says so is not one to trust with the limits.
        return Err(Refusal::unavailable(
            "The session store is unavailable; try again shortly.",
            Duration::from_secs(1),
        ));
    };
    if let Some(wait) = taken.refused() {
        // The policies that refused, by their names for `forkd limit`.
        let refused = || {
            limits
                .iter()
                .zip(&taken.decisions)
                .filter_map(|(l, d)| d.filter(|d| !d.allowed).map(|d| (l, d)))
        };
        let policy: Vec<String> = refused()
            .map(|(l, _)| crate::response::policy_item(&l.policy_name, l.policy))
            .collect();
        let state: Vec<String> = refused()
            .map(|(l, d)| crate::response::state_item(&l.policy_name, &d))
            .collect();
        let r = Refusal::too_many("Too many login attempts; try again later.", wait);
        return Err(r.with_all([
            (RATELIMIT_POLICY, crate::response::header(&policy)),
            (RATELIMIT, crate::response::header(&state)),
        ]));
    }
    // Refused here is no failure, so the places taken above go back.
    let host = st
        .local_limits
        .check("login-host", auth.login_host, st.settings.workers);
    if !host.allowed {
        limiter::give_back(st, &limits, &taken, None).await;
        return Err(Refusal::too_many(
            "Too many logins on this server; try again shortly.",
            host.retry_after,
        ));
    }
    Ok((limits, taken))
}

/// A place in the bounded password-check queue, within
/// `auth.hash_queue_timeout`.
async fn queue(st: &State) -> Option<OwnedSemaphorePermit> {
    if let Ok(p) = st.hashes.clone().try_acquire_owned() {
        return Some(p);
    }
    let waiting = Waiting::enter(st);
    let wait = st.hashes.clone().acquire_owned();
    let place = match tokio::time::timeout(st.settings.auth.hash_queue_timeout, wait).await {
        Ok(Ok(p)) => Some(p),
        _ => None,
    };
    drop(waiting);
    place
}

/// One login in the hash queue gauge, for as long as it waits (also when
/// the client goes away and the login is dropped).
struct Waiting<'a>(&'a State);

impl<'a> Waiting<'a> {
    fn enter(st: &'a State) -> Self {
        let n = st.hash_waiting.fetch_add(1, Relaxed) + 1;
        st.host.set_hash_queue(n);
        Waiting(st)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let n = self.0.hash_waiting.fetch_sub(1, Relaxed) - 1;
        self.0.host.set_hash_queue(n);
    }
}

/// Checks the password off the event loop, holding `permit`: whether it
/// is right, and a new hash when the stored one has older parameters.
async fn verify(
    st: &State,
    permit: OwnedSemaphorePermit,
    phc: Option<String>,
    password: String,
) -> Result<(bool, Option<String>), Refusal> {
    let cost = st.settings.auth.cost;
    let dummy = st.dummy.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let Some(phc) = phc else {
            // Same work as a wrong password, so that the answer's timing
            // does not tell whether the user exists.
            dummy.verify(&password);
            return (false, None);
        };
        let ok = secrets::verify_password(&phc, &password);
        let older = secrets::needs_rehash(&phc, cost);
        let rehash = (ok && older)
            .then(|| secrets::hash_password(&password, cost).ok())
            .flatten();
        // A wrong password for a hash of older, cheaper parameters takes as
        // long as for an unknown user: the same dummy verify on top, which
        // costs what it costs whatever the load (a measured pause went
        // stale when the load changed).
        if !ok && older {
            dummy.verify(&password);
        }
        (ok, rehash)
    })
    .await;
    let (ok, rehash) = checked.map_err(|e| {
        log::error!("password check failed: {e}");
        Refusal::unavailable(
            "The password check failed; try again.",
            Duration::from_secs(1),
        )
    })?;
    Ok((ok, rehash))
}

/// Stores a hash with the current parameters, only over the hash it
/// verified: never over a newer password.
async fn store_rehash(st: &State, user: &User, phc: &str) {
    match st.store.rehash(&user.name, phc, user.generation).await {
        Ok(true) => log::info!(
            "re-hashed the password of '{}' with the current parameters",
            user.name
        ),
        Ok(false) => {}
        Err(e) => log::warn!(
            "cannot store the re-hashed password of '{}': {e}",
            user.name
        ),
    }
}

/// The session of a login whose password was right, and its token.
async fn start_session(st: &State, user: &User) -> Answer {
    let auth = &st.settings.auth;
    let (token, hash) = secrets::new_token(&user.uid);
    match st
        .store
        .create_session(user, &hash, auth.session_idle, auth.session_absolute)
        .await
    {
        Ok(true) => {}
        // The password was changed, or the sessions revoked, while this
        // login checked the old one.
        Ok(false) => return Err(unauthorized_login()),
        Err(e) => return Err(st.redis_down(&e)),
    }
    if let Err(e) = st.store.touch_login(&user.name, now_unix()).await {
        log::warn!("cannot record the login of '{}': {e}", user.name);
    }
    let expires = auth.session_idle.min(auth.session_absolute).as_secs();
    let mut r = no_store(json(
        StatusCode::OK,
        &serde_json::json!({"token": token, "token_type": "Bearer", "expires_in": expires}),
    ));
    if let Some(c) = &auth.cookie {
        r.headers_mut().insert(
            SET_COOKIE,
            crate::gate::cookie::set(c, &token, auth.session_absolute),
        );
    }
    Ok(r)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads a JSON body: 415 for another media type, 413 over 16 KiB, 408 when
/// it does not arrive in time, 400 when it is not UTF-8 JSON.
async fn read_json(req: Request<Incoming>, st: &State) -> Result<serde_json::Value, Refusal> {
    let is_json = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(Refusal::new(
            Problem::UnsupportedMediaType,
            "The body must be application/json.",
        ));
    }
    let too_large = || Refusal::new(Problem::PayloadTooLarge, "The body must be at most 16 KiB.");
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let collect = Limited::new(req.into_body(), MAX_BODY).collect();
    let bytes = match tokio::time::timeout(st.settings.header_read_timeout, collect).await {
        Err(_) => {
            return Err(Refusal::new(
                Problem::RequestTimeout,
                "The body did not arrive in time.",
            ))
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Ok(Err(_)) => return Err(Refusal::bad_request("The body could not be read.")),
        Ok(Ok(b)) => b.to_bytes(),
    };
    if std::str::from_utf8(&bytes).is_err() {
        return Err(Refusal::bad_request("The body is not valid UTF-8."));
    }
    serde_json::from_slice(&bytes).map_err(|_| Refusal::bad_request("The body is not valid JSON."))
}

/// A required, non-empty string field of at most 1 KiB.
fn field<'a>(body: &'a serde_json::Value, name: &str) -> Result<&'a str, Refusal> {
    let why = match body.get(name) {
        Some(serde_json::Value::String(s)) if s.len() > MAX_FIELD => "is longer than 1 KiB",
        Some(serde_json::Value::String(s)) if !s.is_empty() => return Ok(s),
        Some(serde_json::Value::String(_)) => "is empty",
        None | Some(serde_json::Value::Null) => "is missing",
        Some(_) => "must be a string",
    };
    Err(Refusal::bad_request(format!("`{name}` {why}.")))
}

fn unauthorized_login() -> Refusal {
    Refusal::new(
        Problem::InvalidCredentials,
        "The username or password is wrong.",
    )
}

// ---- bearer tokens ----

fn unauthorized_bearer(error: Option<&str>, detail: &'static str) -> Refusal {
    let challenge = match error {
        Some(e) => format!("Bearer error=\"{e}\""),
        None => "Bearer".to_owned(),
    };
    Refusal::new(Problem::Unauthorized, detail).with(
        WWW_AUTHENTICATE,
        HeaderValue::from_str(&challenge).expect("a plain ASCII challenge"),
    )
}

/// The bearer token's (uid, hash), or the 401 to answer.
fn bearer_in(h: &HeaderMap) -> Result<(String, String), Refusal> {
    let Some(value) = h.get(AUTHORIZATION) else {
        return Err(unauthorized_bearer(None, "A bearer token is required."));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .and_then(secrets::parse_token);
    token.ok_or_else(|| {
        unauthorized_bearer(
            Some("invalid_request"),
            "The Authorization header is not a valid bearer token.",
        )
    })
}

/// 401 for a well-formed token that is no session (any longer).
pub(crate) fn invalid_token() -> Refusal {
    unauthorized_bearer(
        Some("invalid_token"),
        "The token is unknown or has expired.",
    )
}

/// `POST /logout`: the session ends on every worker and host at once (and
/// the cookie, when sessions are cookies too, is cleared).
pub(crate) async fn logout(req: Request<Incoming>, st: &State) -> Answer {
    let t = session_token(req.headers(), req.method(), st)?;
    let mut r = match st.store.end_session(&t.uid, &t.hash).await {
        Ok(true) => {
            let mut r = Response::new(Body::default());
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        Ok(false) => invalid_token().into(),
        Err(e) => return Err(st.redis_down(&e)),
    };
    if let Some(c) = &st.settings.auth.cookie {
        r.headers_mut()
            .insert(SET_COOKIE, crate::gate::cookie::clear(c));
    }
    Ok(r)
}

/// A session's token as a request carries it.
pub(crate) struct Token {
    pub(crate) uid: String,
    pub(crate) hash: String,
}

/// Whether the request carries a session at all: a bearer token, or the
/// session cookie when sessions are cookies too.
pub(crate) fn has_credentials(h: &HeaderMap, st: &State) -> bool {
    h.contains_key(AUTHORIZATION)
        || st
            .settings
            .auth
            .cookie
            .as_ref()
            .is_some_and(|c| crate::gate::cookie::read(h, &c.name).is_some())
}

/// The session token: the bearer token, else the session cookie (when
/// `auth.cookie`). A request authenticated by the cookie with a state-changing
/// `method` must come from the site itself, else 403 (CSRF).
pub(crate) fn session_token(h: &HeaderMap, method: &Method, st: &State) -> Result<Token, Refusal> {
    let cookie = st.settings.auth.cookie.as_ref();
    if h.contains_key(AUTHORIZATION) || cookie.is_none() {
        let (uid, hash) = bearer_in(h)?;
        return Ok(Token { uid, hash });
    }
    let Some(value) = cookie.and_then(|c| crate::gate::cookie::read(h, &c.name)) else {
        return Err(unauthorized_bearer(
            None,
            "A bearer token or the session cookie is required.",
        ));
    };
    let Some((uid, hash)) = secrets::parse_token(value) else {
        return Err(invalid_token());
    };
    if crate::gate::cookie::state_changing(method, h) && !crate::gate::cookie::same_site(h) {
        return Err(Refusal::new(
            Problem::CrossSite,
            "A request authenticated by the session cookie must come from this site (Origin or Referer), or carry X-Requested-With.",
        ));
    }
    Ok(Token { uid, hash })
}
