//! The API routes: login, logout, profile, readiness. Bad input is answered
//! before it reaches argon2 or Redis.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use forkd_store::{Decision, Policy, ProfileCheck, StoreError};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{
    HeaderName, HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE,
    RETRY_AFTER, WWW_AUTHENTICATE,
};
use hyper::{Request, Response, StatusCode};

use crate::client::{client_ip, client_key};
use crate::origin::{self, OriginError};
use crate::routes::{
    ceil_secs, json, json_text, no_store, problem, unavailable, with_header, Body, State,
};
use crate::{metrics, secrets, OnRedisError};

const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Largest accepted request body.
const MAX_BODY: usize = 16 * 1024;
/// Largest username or password.
const MAX_FIELD: usize = 1024;
/// Retry-After for Redis trouble: reconnects are retried much faster.
const REDIS_RETRY: Duration = Duration::from_secs(1);

fn redis_down(st: &State, e: &StoreError) -> Response<Body> {
    st.host.count(metrics::REDIS_ERRORS, 1);
    match st.redis_warnings.pass() {
        Some(0) => log::warn!("{e}"),
        Some(held) => log::warn!("{e} ({held} more Redis errors since the last line)"),
        None => {}
    }
    unavailable(
        "The session store is unavailable; try again shortly.",
        REDIS_RETRY,
    )
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(crate) async fn readyz(st: &State) -> Response<Body> {
    match st.store.ping().await {
        Ok(()) => no_store(json(
            StatusCode::OK,
            &serde_json::json!({"status": "ready", "redis": "ok"}),
        )),
        Err(e) => no_store(redis_down(st, &e)),
    }
}

// ---- login ----

fn bad_request(detail: &str) -> Response<Body> {
    problem(StatusCode::BAD_REQUEST, "bad-request", detail)
}

/// Reads a JSON body: 415 for another media type, 413 over 16 KiB, 408 when
/// it does not arrive in time, 400 when it is not UTF-8 JSON.
async fn read_json(
    req: Request<Incoming>,
    st: &State,
) -> Result<serde_json::Value, Response<Body>> {
    let is_json = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "The body must be application/json.",
        ));
    }
    let too_large = || {
        problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "The body must be at most 16 KiB.",
        )
    };
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
            return Err(problem(
                StatusCode::REQUEST_TIMEOUT,
                "request-timeout",
                "The body did not arrive in time.",
            ))
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Ok(Err(_)) => return Err(bad_request("The body could not be read.")),
        Ok(Ok(b)) => b.to_bytes(),
    };
    if std::str::from_utf8(&bytes).is_err() {
        return Err(bad_request("The body is not valid UTF-8."));
    }
    serde_json::from_slice(&bytes).map_err(|_| bad_request("The body is not valid JSON."))
}

/// A required, non-empty string field of at most 1 KiB.
fn field<'a>(body: &'a serde_json::Value, name: &str) -> Result<&'a str, Response<Body>> {
    match body.get(name) {
        None | Some(serde_json::Value::Null) => Err(bad_request(&format!("`{name}` is missing."))),
        Some(serde_json::Value::String(s)) if s.is_empty() => {
            Err(bad_request(&format!("`{name}` is empty.")))
        }
        Some(serde_json::Value::String(s)) if s.len() > MAX_FIELD => {
            Err(bad_request(&format!("`{name}` is longer than 1 KiB.")))
        }
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(_) => Err(bad_request(&format!("`{name}` must be a string."))),
    }
}

fn too_many(detail: &str, d: Decision) -> Response<Body> {
    with_header(
        problem(StatusCode::TOO_MANY_REQUESTS, "too-many-requests", detail),
        RETRY_AFTER,
        HeaderValue::from(ceil_secs(d.retry_after)),
    )
}

fn unauthorized_login() -> Response<Body> {
    problem(
        StatusCode::UNAUTHORIZED,
        "invalid-credentials",
        "The username or password is wrong.",
    )
}

pub(crate) async fn login(
    req: Request<Incoming>,
    st: &Arc<State>,
    peer: SocketAddr,
) -> Response<Body> {
    let ip = client_ip(peer.ip(), req.headers(), st.settings.trusted_proxy.as_ref());
    let body = match read_json(req, st).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if !body.is_object() {
        return bad_request("The body must be a JSON object.");
    }
    let (username, password) = match (field(&body, "username"), field(&body, "password")) {
        (Ok(u), Ok(p)) => (u.to_owned(), p.to_owned()),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    // The rule of `forkd user add`: a name no user can have gets no Redis
    // command and no hash.
    if !forkd_store::valid_username(&username) {
        return bad_request("The username must be 1 to 64 letters, digits, '.', '_', '-' or '@'.");
    }
    let auth = &st.settings.auth;

    // Brute-force limits, before any hashing. Each takes a place now and
    // gives it back if the password is right, so only failures use them
    // up, and failures from one address cannot lock the user out at
    // another: per client, per (username, client), and a loose ceiling per
    // username over all addresses.
    let client = client_key(ip);
    let limits = [
        ("login-ip", client.clone(), auth.login_ip),
        (
            "login-user",
            format!("{username}|{client}"),
            auth.login_user,
        ),
        ("login-user-all", username.clone(), auth.login_user_all),
    ];
    let mut taken = Vec::new();
    for (name, key, policy) in limits {
        let (decision, local) = match st.store.limit(name, &key, policy).await {
            Ok(d) => (d, false),
            Err(e) => match st.settings.on_redis_error {
                OnRedisError::FailClosed => return redis_down(st, &e),
                OnRedisError::FailOpen => continue,
                OnRedisError::Local => {
                    let key = format!("{name}:{key}");
                    (
                        st.local_limits.check(&key, policy, st.settings.workers),
                        true,
                    )
                }
            },
        };
        if !decision.allowed {
            st.host.count(metrics::RATE_LIMITED, 1);
            return too_many("Too many login attempts; try again later.", decision);
        }
        taken.push(Taken {
            name,
            key,
            policy,
            local,
        });
    }
    // Behind them (so that one client's excess never reaches it), all
    // logins of this host, in memory, shared out among its workers: a flood
    // from many addresses gets 429s, not the hash queue. Refused here is no
    // failure, so the places taken above go back.
    let host = st
        .local_limits
        .check("login-host", auth.login_host, st.settings.workers);
    if !host.allowed {
        give_back(st, &taken).await;
        st.host.count(metrics::RATE_LIMITED, 1);
        return too_many("Too many logins on this server; try again shortly.", host);
    }

    // A place in the bounded password-check queue.
    let permit = match tokio::time::timeout(
        auth.hash_queue_timeout,
        st.hashes.clone().acquire_owned(),
    )
    .await
    {
        Ok(Ok(p)) => p,
        _ => {
            // Not a wrong password: its places go back.
            give_back(st, &taken).await;
            return unavailable(
                "Too many logins are being checked; try again shortly.",
                Duration::from_secs(1),
            );
        }
    };
    let user = match st.store.user(&username).await {
        Ok(u) => u,
        // Kept: through a flapping Redis the limits (then in memory) must
        // still count what reaches them.
        Err(e) => return redis_down(st, &e),
    };
    let phc = user.as_ref().map(|u| u.phc.clone());
    let cost = auth.cost;
    let dummy = st.dummy_phc.clone();
    let dummy_ns = st.dummy_verify_ns.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let started = Instant::now();
        match phc {
            Some(phc) => {
                let ok = secrets::verify_password(&phc, &password);
                let older = secrets::needs_rehash(&phc, cost);
                let rehash = (ok && older)
                    .then(|| secrets::hash_password(&password, cost).ok())
                    .flatten();
                // A wrong password for a hash of older, cheaper parameters
                // takes as long as for an unknown user: padded up to what
                // the dummy hash takes here.
                let pad = if !ok && older {
                    Duration::from_nanos(dummy_ns.load(Relaxed)).saturating_sub(started.elapsed())
                } else {
                    Duration::ZERO
                };
                (ok, rehash, pad)
            }
            None => {
                // Same work as a wrong password, so that the answer's
                // timing does not tell whether the user exists.
                let phc = dummy.get_or_init(|| dummy_hash(cost));
                let _ = secrets::verify_password(phc, &password);
                note_dummy_time(&dummy_ns, started.elapsed());
                (false, None, Duration::ZERO)
            }
        }
    })
    .await;
    let (ok, rehash, pad) = match checked {
        Ok(r) => r,
        Err(e) => {
            log::error!("password check failed: {e}");
            give_back(st, &taken).await;
            return unavailable(
                "The password check failed; try again.",
                Duration::from_secs(1),
            );
        }
    };
    if !pad.is_zero() {
        tokio::time::sleep(pad).await;
    }
    let Some(user) = user.filter(|_| ok) else {
        return unauthorized_login();
    };
    give_back(st, &taken).await;
    if let Some(phc) = rehash {
        // Only over the hash it verified: never over a newer password.
        match st.store.rehash(&user.name, &phc, user.generation).await {
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
    let (token, hash) = secrets::new_token(&user.uid);
    match st
        .store
        .create_session(&user, &hash, auth.session_idle, auth.session_absolute)
        .await
    {
        Ok(true) => {}
        // The password was changed, or the sessions revoked, while this
        // login checked the old one.
        Ok(false) => return unauthorized_login(),
        Err(e) => return redis_down(st, &e),
    }
    if let Err(e) = st.store.touch_login(&user.name, now_unix()).await {
        log::warn!("cannot record the login of '{}': {e}", user.name);
    }
    let expires = auth.session_idle.min(auth.session_absolute).as_secs();
    no_store(json(
        StatusCode::OK,
        &serde_json::json!({"token": token, "token_type": "Bearer", "expires_in": expires}),
    ))
}

/// A place a login took in a failure limit.
struct Taken {
    name: &'static str,
    key: String,
    policy: Policy,
    /// In this worker's memory (Redis did not answer), not in Redis.
    local: bool,
}

/// A successful login gives back the places it took in the failure
/// limits, where it took them.
async fn give_back(st: &State, taken: &[Taken]) {
    for t in taken {
        if t.local {
            let key = format!("{}:{}", t.name, t.key);
            st.local_limits.refund(&key, t.policy, st.settings.workers);
        } else if let Err(e) = st.store.refund(t.name, &t.key, t.policy).await {
            if let Some(held) = st.redis_warnings.pass() {
                log::warn!("cannot give back a login limit place: {e} ({held} more held back)");
            }
        }
    }
}

/// Keeps what verifying the dummy hash takes in this worker (a moving
/// average, so that it follows the load).
pub(crate) fn note_dummy_time(avg_ns: &AtomicU64, took: Duration) {
    let took = took.as_nanos().min(u128::from(u64::MAX)) as u64;
    let old = avg_ns.load(Relaxed);
    let new = if old == 0 {
        took
    } else {
        (old / 8) * 7 + took / 8
    };
    avg_ns.store(new, Relaxed);
}

/// The PHC string verified for unknown users: a real hash with the
/// configured cost, of a random password.
pub(crate) fn dummy_hash(cost: secrets::HashCost) -> String {
    secrets::hash_password(&secrets::nonce(), cost).unwrap_or_default()
}

// ---- bearer routes ----

fn unauthorized_bearer(error: Option<&str>, detail: &str) -> Response<Body> {
    let challenge = match error {
        Some(e) => format!("Bearer error=\"{e}\""),
        None => "Bearer".to_owned(),
    };
    with_header(
        problem(StatusCode::UNAUTHORIZED, "unauthorized", detail),
        WWW_AUTHENTICATE,
        HeaderValue::from_str(&challenge).expect("a plain ASCII challenge"),
    )
}

/// The bearer token's (uid, hash), or the 401 to answer.
fn bearer(req: &Request<Incoming>) -> Result<(String, String), Response<Body>> {
    let Some(value) = req.headers().get(AUTHORIZATION) else {
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

fn invalid_token() -> Response<Body> {
    unauthorized_bearer(
        Some("invalid_token"),
        "The token is unknown or has expired.",
    )
}

pub(crate) async fn logout(req: Request<Incoming>, st: &State) -> Response<Body> {
    let (uid, hash) = match bearer(&req) {
        Ok(t) => t,
        Err(r) => return r,
    };
    match st.store.end_session(&uid, &hash).await {
        Ok(true) => {
            let mut r = Response::new(Body::default());
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        Ok(false) => invalid_token(),
        Err(e) => redis_down(st, &e),
    }
}

/// `RateLimit-Policy` of a policy: fixed, so made once per worker.
pub(crate) fn policy_header(name: &str, policy: Policy) -> HeaderValue {
    let window = ceil_secs(policy.window);
    HeaderValue::from_str(&format!("\"{name}\";q={};w={window}", policy.limit))
        .expect("a policy name is a plain token")
}

fn rate_headers(mut r: Response<Body>, st: &State, d: Decision) -> Response<Body> {
    let h = r.headers_mut();
    h.insert(RATELIMIT_POLICY, st.profile_policy.clone());
    let reset = d.reset.as_millis().div_ceil(1000);
    if let Ok(v) = HeaderValue::from_str(&format!("\"profile\";r={};t={reset}", d.remaining)) {
        h.insert(RATELIMIT, v);
    }
    if !d.allowed {
        h.insert(RETRY_AFTER, HeaderValue::from(ceil_secs(d.retry_after)));
    }
    r
}

fn cache_header(r: Response<Body>, hit: bool) -> Response<Body> {
    with_header(
        r,
        HeaderName::from_static("x-cache"),
        HeaderValue::from_static(if hit { "hit" } else { "miss" }),
    )
}

/// `GET /profile`: every answer is the user's alone, never for a cache.
pub(crate) async fn profile(req: Request<Incoming>, st: &State) -> Response<Body> {
    with_header(
        profile_answer(req, st).await,
        CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    )
}

async fn profile_answer(req: Request<Incoming>, st: &State) -> Response<Body> {
    let (uid, hash) = match bearer(&req) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let policy = st.settings.profile.limit;
    let idle = st.settings.auth.session_idle;
    let check = match st
        .store
        .profile_check(&uid, &hash, idle, "profile", policy)
        .await
    {
        Ok(c) => c,
        Err(e) => return redis_down(st, &e),
    };
    match check {
        ProfileCheck::Unauthenticated => invalid_token(),
        ProfileCheck::Limited { decision, .. } => {
            st.host.count(metrics::RATE_LIMITED, 1);
            rate_headers(
                problem(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too-many-requests",
                    "Too many requests; see Retry-After.",
                ),
                st,
                decision,
            )
        }
        ProfileCheck::Allowed {
            decision,
            cached: Some(p),
            ..
        } => {
            st.host.count(metrics::CACHE_HITS, 1);
            rate_headers(
                cache_header(json_text(StatusCode::OK, p), true),
                st,
                decision,
            )
        }
        ProfileCheck::Allowed {
            user,
            decision,
            cached: None,
        } => {
            st.host.count(metrics::CACHE_MISSES, 1);
            let r = match fill(st, &uid, &user).await {
                Ok(p) => cache_header(json_text(StatusCode::OK, p), false),
                Err(r) => r,
            };
            rate_headers(r, st, decision)
        }
    }
}

/// Cache-aside with single flight across every worker and host: one
/// request takes the Redis lock and fills the cache; the others wait
/// (bounded) for its result.
async fn fill(st: &State, uid: &str, user: &str) -> Result<String, Response<Body>> {
    let cfg = &st.settings.profile;
    let owner = secrets::nonce();
    let deadline = tokio::time::Instant::now() + cfg.lock_wait;
    let mut last_try = false;
    loop {
        match st.store.lock_profile(uid, &owner, cfg.lock_timeout).await {
            Ok(true) => {
                let result = load(st, uid, user).await;
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
            Err(e) => return Err(redis_down(st, &e)),
        }
        // Someone else is filling it: wait (bounded) for the result, then
        // try the lock once more in case its holder died.
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            match st.store.cached_profile(uid).await {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => return Err(redis_down(st, &e)),
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
async fn load(st: &State, uid: &str, user: &str) -> Result<String, Response<Body>> {
    let cfg = &st.settings.profile;
    if let Some(host) = &cfg.origin {
        return origin::fetch(host, user, cfg.origin_timeout)
            .await
            .map_err(|e| match e {
                OriginError::NotFound => problem(
                    StatusCode::NOT_FOUND,
                    "not-found",
                    "There is no profile for this user.",
                ),
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
        Ok(Some(_)) => {
            return Err(problem(
                StatusCode::NOT_FOUND,
                "not-found",
                "There is no profile for this user.",
            ))
        }
        Ok(None) => {
            return Err(problem(
                StatusCode::NOT_FOUND,
                "not-found",
                "There is no profile for this user.",
            ))
        }
        Err(e) => return Err(redis_down(st, &e)),
    };
    let sessions = match st.store.session_count(uid).await {
        Ok(n) => n,
        Err(e) => return Err(redis_down(st, &e)),
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
