//! Who is asking and whether a route's rate-limit policies let them, in
//! one Redis call (the session and the user's buckets share its slot):
//! the identity for the upstream, and the `RateLimit` headers.

use forkd_store::{CacheProbe, Limit, SessionRef};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Request, Response};

use crate::cache::{self, Place};
use crate::gate::auth::{has_credentials, session_token};
use crate::gate::buckets;
use crate::refusal::Refusal;
use crate::request::Context;
use crate::response::{Body, RATELIMIT, RATELIMIT_POLICY};
use crate::state::State;
use crate::upstream::{Route, Specs};
use crate::{gate::limiter, PolicyKey, RouteAuth};

/// Fields whose one value may hold commas (a browser's `User-Agent`, a
/// Digest `Authorization`, a cookie string, a URL, a date): a policy keyed
/// on one refuses only a repeated line, never a comma.
const ONE_VALUE_WITH_COMMAS: &[&str] = &[
    "user-agent",
    "authorization",
    "proxy-authorization",
    "cookie",
    "referer",
    "date",
    "if-modified-since",
    "if-unmodified-since",
    "if-range",
];

/// The value a header-keyed policy counts by: the field's (the cookies
/// joined, as an HTTP/1.1 upstream gets them); None when it is missing or
/// empty, which counts per client.
fn header_key(h: &hyper::HeaderMap, name: &str) -> Option<Vec<u8>> {
    let values: Vec<&[u8]> = h
        .get_all(name)
        .iter()
        .map(HeaderValue::as_bytes)
        .filter(|v| !v.is_empty())
        .collect();
    (!values.is_empty()).then(|| values.join(&b"; "[..]))
}

/// What the check found: the identity (user, role, session id) of an
/// authenticated request, and the rate-limit headers to answer with.
#[derive(Default)]
pub(crate) struct Checked {
    pub(crate) who: Option<[String; 3]>,
    /// The session's user tag, when there is one.
    pub(crate) uid: Option<String>,
    pub(crate) rate: Option<(HeaderValue, HeaderValue)>,
    /// When a route's cache was asked: the answer on a hit, else the
    /// place to fill, read in the same call as the session and limits
    /// where it can be.
    pub(crate) cache: Option<Result<Response<Body>, Place>>,
}

impl Checked {
    /// `RateLimit-Policy` and `RateLimit`, when the route has policies.
    pub(crate) fn rate_headers(&self) -> [(HeaderName, Option<HeaderValue>); 2] {
        let (policy, state) = self.rate.clone().unzip();
        [(RATELIMIT_POLICY, policy), (RATELIMIT, state)]
    }

    pub(crate) fn add_headers(&self, r: &mut Response<Body>) {
        for (name, value) in self.rate_headers() {
            if let Some(v) = value {
                r.headers_mut().insert(name, v);
            }
        }
    }
}

/// The session id the upstream sees: a hash of the token's hash, so it is
/// neither the token nor the key Redis keeps the session under.
pub(crate) fn session_id(token_hash: &str) -> String {
    crate::secrets::hex16(&[b"forkd-session:", token_hash.as_bytes()].concat())
}

/// Checks the request against `route` (or, with none, requires a session
/// and applies no policy); Err is the answer to send instead.
///
/// `method` is the one the session cookie's CSRF check looks at: the
/// request's, or for forward-auth the original request's. With a route's
/// cache to look in, the request's entry is looked up too: the user's on
/// an authenticated request, the shared one for a request without
/// credentials, none otherwise.
pub(crate) async fn check(
    req: &Request<Incoming>,
    method: &Method,
    st: &State,
    route: Option<&Route>,
    cx: &Context,
    cache: Option<&Specs>,
) -> Result<Checked, Refusal> {
    let auth = route.map_or(RouteAuth::Required, |r| r.cfg.auth);
    let policies = route.map_or(&[][..], |r| &r.cfg.policies[..]);
    let anonymous = !has_credentials(req.headers(), st);
    let token = if auth == RouteAuth::None || (auth == RouteAuth::Optional && anonymous) {
        None
    } else {
        let t = session_token(req.headers(), method, st)?;
        Some((t.uid, t.hash))
    };
    let target = route.map_or("/", |r| r.cache_target(req.uri()));
    let place = cache.and_then(|specs| match &token {
        Some((uid, _)) => Some(cache::place(specs, st, Some(uid), target, req.headers())),
        None if anonymous => Some(cache::place(specs, st, None, target, req.headers())),
        None => None,
    });
    // A session the near cache holds needs no Redis command.
    let near = token
        .as_ref()
        .and_then(|(uid, hash)| st.store.near_session(uid, hash))
        .zip(token.as_ref())
        .map(|(s, (_, hash))| [s.user, s.role, session_id(hash)]);
    if (token.is_none() || near.is_some()) && policies.is_empty() {
        let cache = match (place, cache) {
            (Some(p), Some(specs)) => Some(cache::lookup_at(st, specs, p, req.headers()).await?),
            _ => None,
        };
        if let Some([user, ..]) = &near {
            cx.log_user(user);
        }
        return Ok(Checked {
            uid: near.as_ref().and(token.map(|(uid, _)| uid)),
            who: near,
            cache,
            ..Checked::default()
        });
    }
    // A policy keyed on a header counts one value: a request that repeats
    // the header, or lists values in it (the same thing, RFC 9110 section
    // 5.3), could pass on a fresh first value while the app reads a spent
    // last one.
    for p in policies {
        if let PolicyKey::Header(h) = &p.key {
            let mut values = req.headers().get_all(h.as_str()).iter();
            let first = values.next();
            let listed = |v: &HeaderValue| {
                v.as_bytes().contains(&b',') && !ONE_VALUE_WITH_COMMAS.contains(&h.as_str())
            };
            // HTTP/2 clients send each cookie as a field of its own; they
            // are one Cookie header (RFC 9113 section 8.2.3).
            let repeated = values.next().is_some() && h != "cookie";
            if repeated || first.is_some_and(listed) {
                return Err(Refusal::bad_request(format!(
                    "The request repeats the {h} header, or lists values in it, which a rate limit counts by."
                )));
            }
        }
    }
    let client = cx.client;
    let prefix = route.map_or("", |r| r.cfg.prefix.as_str());
    let by_client = |scope: &str| buckets::client(client, scope);
    let limits: Vec<Limit> = policies
        .iter()
        .map(|p| Limit {
            policy_name: p.name.clone(),
            policy: p.policy,
            want: 1,
            bucket: match &p.key {
                PolicyKey::User if token.is_some() => buckets::user(""),
                PolicyKey::UserRoute if token.is_some() => buckets::user(&format!(":{prefix}")),
                PolicyKey::User | PolicyKey::Client => by_client(""),
                PolicyKey::UserRoute => by_client(&format!(":{prefix}")),
                PolicyKey::Header(h) => match header_key(req.headers(), h) {
                    Some(v) => buckets::header(h, &v),
                    None => by_client(""),
                },
            },
        })
        .collect();
    let idle = st.settings.auth.session_idle;
    let session = token.as_ref().map(|(uid, hash)| SessionRef {
        uid,
        token_hash: hash,
        idle,
        verified: near.is_some(),
    });
    let near_hit = place.as_ref().and_then(|p| cache::near(st, p));
    let probe = place
        .as_ref()
        .filter(|_| near_hit.is_none())
        .map(|p| CacheProbe::Entry {
            url: &p.url,
            variant: &p.variant,
        });
    let Some(taken) = limiter::take(st, session.as_ref(), &limits, probe.as_ref()).await? else {
        if let Some((uid, hash)) = &token {
            st.store.near_forget_session(uid, hash);
        }
        return Err(crate::gate::auth::invalid_token());
    };
    let checked_now = taken.identity.clone().zip(token.as_ref());
    if let Some((_, (uid, hash))) = &checked_now {
        // Checked in Redis: read into the near cache for next time.
        st.store.near_fill_session(uid, hash, idle);
    }
    let who = checked_now
        .map(|((user, role), (_, hash))| [user, role, session_id(hash)])
        .or(near);
    if let Some([user, ..]) = &who {
        cx.log_user(user);
    }
    let uid = who.as_ref().and(token.map(|(uid, _)| uid));
    let state: Vec<String> = policies
        .iter()
        .zip(&taken.decisions)
        .filter_map(|(p, d)| Some(crate::response::state_item(&p.name, d.as_ref()?)))
        .collect();
    let rate = route
        .and_then(|r| r.policy_header.clone())
        .zip(crate::response::header(&state));
    let mut checked = Checked {
        uid,
        who,
        rate,
        cache: None,
    };
    if let Some(wait) = taken.refused() {
        let r = Refusal::too_many("Too many requests; see Retry-After.", wait);
        return Err(r.with_all(checked.rate_headers()));
    }
    let probed = taken.probed;
    // Read in the same call, or (on Redis Cluster, a shared entry) now.
    checked.cache = match (place, cache, probed) {
        _ if near_hit.is_some() => near_hit.map(Ok),
        (Some(p), Some(specs), Some(found)) => {
            Some(cache::resolve(st, specs, p, found, req.headers()).await?)
        }
        (Some(p), Some(specs), None) => Some(cache::lookup_at(st, specs, p, req.headers()).await?),
        _ => None,
    };
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_id_is_neither_token_nor_key() {
        let id = session_id("abc");
        assert_eq!(id.len(), 32);
        assert_ne!(id, "abc");
        assert_eq!(id, session_id("abc"));
        assert_ne!(id, session_id("abd"));
    }
}
