//! The response cache of a GET route (`cache = true`): per user on an
//! authenticated request, shared otherwise; an entry per URL and variant;
//! what the upstream's `Cache-Control` and `Vary` allow (RFC 9111, the
//! part a cache in front of one app needs); single flight across workers
//! and hosts through a Redis lock.

pub(crate) mod fill;
pub(crate) mod invalidate;

use std::time::Duration;

use bytes::Bytes;
use forkd_store::{CacheLookup, CacheScope, CacheUrl};
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_LENGTH, SET_COOKIE,
    TRANSFER_ENCODING, VARY,
};
use hyper::{Response, StatusCode};

use crate::refusal::Refusal;
use crate::response::Body;
use crate::state::State;
use crate::upstream::Specs;

pub(crate) const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const AGE: HeaderName = HeaderName::from_static("age");

/// The variant of a request: a hash of its `Host` and `X-Forwarded-Host`
/// (the upstream sees both, so its answer may differ by them: an answer
/// built for another host must never be served for this one) and of the
/// headers `spec` names (comma-separated, "" for none).
fn variant(spec: &str, h: &HeaderMap) -> String {
    let mut text = String::new();
    let named = spec.split(',').filter(|n| !n.is_empty());
    for name in ["host", "x-forwarded-host"].into_iter().chain(named) {
        text.push_str(name);
        text.push('=');
        for v in h.get_all(name) {
            text.push_str(&String::from_utf8_lossy(v.as_bytes()));
            text.push(',');
        }
        text.push('\n');
    }
    crate::secrets::hex16(text.as_bytes())
}

/// A tag of the `Host` a request named, which a write's invalidation is
/// limited to (the target URI includes its authority).
pub(crate) fn host_tag(host: Option<&HeaderValue>) -> String {
    let host = host.map_or(&b""[..], HeaderValue::as_bytes);
    crate::secrets::hex16(&host.to_ascii_lowercase())
}

/// One request's place in the cache.
pub(crate) struct Place {
    pub(crate) url: CacheUrl,
    pub(crate) variant: String,
    /// The spec `variant` was made under.
    spec: String,
    spec_key: String,
    pub(crate) shared: bool,
}

/// Where the request is in the cache under the spec this worker knows for
/// its URL: the user's (`uid`) or the shared cache.
pub(crate) fn place(
    specs: &Specs,
    st: &State,
    uid: Option<&str>,
    target: &str,
    h: &HeaderMap,
) -> Place {
    let scope = match uid {
        Some(uid) => CacheScope::User(uid.to_owned()),
        None => CacheScope::Shared(crate::secrets::hex16(target.as_bytes())),
    };
    let spec_key = format!("{}|{target}", uid.unwrap_or(""));
    let spec = specs.get(&spec_key);
    Place {
        url: st.store.cache_url(&scope, target),
        variant: variant(&spec, h),
        spec,
        spec_key,
        shared: uid.is_none(),
    }
}

/// Looks the request up: the answer on a hit, else its place.
pub(crate) async fn lookup(
    st: &State,
    specs: &Specs,
    uid: Option<&str>,
    target: &str,
    h: &HeaderMap,
) -> Result<Result<Response<Body>, Place>, Refusal> {
    lookup_at(st, specs, place(specs, st, uid, target, h), h).await
}

/// The answer for `place` from the worker's near cache, when it holds
/// it.
pub(crate) fn near(st: &State, place: &Place) -> Option<Response<Body>> {
    let (entry, left_ms) = st.store.near_entry(&place.url, &place.variant)?;
    decode(&entry, left_ms)
}

/// Looks `place` up: in the near cache, then in Redis.
pub(crate) async fn lookup_at(
    st: &State,
    specs: &Specs,
    place: Place,
    h: &HeaderMap,
) -> Result<Result<Response<Body>, Place>, Refusal> {
    if let Some(r) = near(st, &place) {
        return Ok(Ok(r));
    }
    let found = st
        .store
        .cache_get(&place.url, &place.variant)
        .await
        .map_err(|e| st.redis_down(&e))?;
    resolve(st, specs, place, found, h).await
}

/// What a read of `place` found: the answer on a hit, else the place to
/// fill. When the URL's stored spec is not the one the variant was made
/// under (another worker or host learnt it), asks once more with it.
pub(crate) async fn resolve(
    st: &State,
    specs: &Specs,
    mut place: Place,
    mut found: CacheLookup,
    h: &HeaderMap,
) -> Result<Result<Response<Body>, Place>, Refusal> {
    for again in [true, false] {
        // An entry at the variant's key was made under the spec the
        // variant names: the answer for this request.
        if let Some((entry, left_ms)) = &found.entry {
            let answer = decode(entry, *left_ms);
            if answer.is_some() {
                // Served from Redis: read into the near cache for next time.
                st.store.near_fill_entry(&place.url, &place.variant);
            }
            return Ok(answer.ok_or(place));
        }
        let stored = found.spec.take().unwrap_or_default();
        if stored == place.spec {
            break;
        }
        specs.set(&place.spec_key, &stored);
        place.variant = variant(&stored, h);
        place.spec = stored;
        if again {
            found = st
                .store
                .cache_get(&place.url, &place.variant)
                .await
                .map_err(|e| st.redis_down(&e))?;
        }
    }
    Ok(Err(place))
}

/// `ttl` less up to 10 %, so that entries made together do not expire
/// together.
pub(crate) fn jittered(ttl: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    let fraction = f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX) * 0.1;
    ttl.mul_f64(1.0 - fraction)
}

/// How long the upstream's answer may be kept, and the headers it varies
/// on; None when it may not be stored: not a 200, `no-store`, `no-cache`,
/// `private` in a shared cache, no `max-age` (`s-maxage` first in a shared
/// cache), `Vary: *`, or a `Set-Cookie`.
pub(crate) fn storable(
    status: StatusCode,
    h: &HeaderMap,
    shared: bool,
    max_ttl: Duration,
) -> Option<(Duration, String)> {
    if status != StatusCode::OK || h.contains_key(SET_COOKIE) {
        return None;
    }
    let mut max_age = None;
    let mut s_maxage = None;
    for v in h.get_all(CACHE_CONTROL) {
        for d in v.to_str().ok()?.split(',') {
            let d = d.trim().to_ascii_lowercase();
            match d.split_once('=') {
                None if d == "no-store" || d == "no-cache" => return None,
                None if d == "private" && shared => return None,
                // `private="Set-Cookie"` names fields a shared cache must
                // not keep; this cache keeps whole answers, so none of it.
                Some(("private", _)) if shared => return None,
                Some(("max-age", n)) => max_age = n.trim_matches('"').parse::<u64>().ok(),
                Some(("s-maxage", n)) => s_maxage = n.trim_matches('"').parse::<u64>().ok(),
                Some(("no-cache", _)) => return None,
                _ => {}
            }
        }
    }
    let lifetime = if shared {
        s_maxage.or(max_age)
    } else {
        max_age
    }?;
    // What the upstream (or a cache before it) already spent of it; an
    // `Age` that is not a whole number of seconds may hide any age, so
    // such an answer is not kept.
    let secs = lifetime.saturating_sub(upstream_age(h)?);
    if secs == 0 {
        return None;
    }
    let mut names: Vec<String> = Vec::new();
    for v in h.get_all(VARY) {
        for n in v.to_str().ok()?.split(',') {
            let n = n.trim().to_ascii_lowercase();
            if n == "*" {
                return None;
            }
            if !n.is_empty() && !names.contains(&n) {
                names.push(n);
            }
        }
    }
    names.sort();
    Some((Duration::from_secs(secs).min(max_ttl), names.join(",")))
}

/// The answer's `Age` in seconds: 0 without one, None for one that is
/// not a whole number of seconds (`abc`, `-1`, `1.5`, `7200;p=1`). A list
/// (`Age: 7200, 0`, or the header twice) is read by its first member
/// (RFC 9111 section 5.1).
fn upstream_age(h: &HeaderMap) -> Option<u64> {
    let Some(v) = h.get(AGE) else {
        return Some(0);
    };
    let first = v.to_str().ok()?.split(',').next()?.trim();
    if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Larger than can be counted: as old as can be.
    Some(first.parse().unwrap_or(u64::MAX))
}

/// Whether a header is stored with an entry: not the answer's framing,
/// which a hit takes from the stored body (RFC 9112 section 6.3), nor
/// what a hit sets afresh.
fn kept(name: &HeaderName) -> bool {
    *name != AGE && *name != X_CACHE && *name != CONTENT_LENGTH && *name != TRANSFER_ENCODING
}

/// Stores an answer and its spec; `specs` learns the spec.
pub(crate) async fn store(
    st: &State,
    specs: &Specs,
    place: &Place,
    spec: &str,
    h: &HeaderMap,
    r: (&StatusCode, &HeaderMap, &Bytes),
    ttl: Duration,
) {
    specs.set(&place.spec_key, spec);
    // The variant of the spec the answer came with.
    let v = variant(spec, h);
    // The entry's lifetime counts the upstream's `Age`, so that the `Age`
    // a hit answers with includes it.
    let lifetime = ttl + Duration::from_secs(upstream_age(r.1).unwrap_or(0));
    let entry = encode(r.0, r.1, r.2, lifetime);
    let host = host_tag(h.get(hyper::header::HOST));
    let put = st
        .store
        .cache_put(&place.url, &host, (spec, &v), &entry, ttl)
        .await;
    if let Err(e) = put {
        log::warn!("cannot cache an answer: {e}");
    }
}

/// The status and the ttl in ms, each on a line; each kept header as a
/// `name:value` line, then an empty line; then the body. (A header value
/// never holds a line end.) An entry of an older layout does not decode,
/// and is filled again.
fn encode(status: &StatusCode, h: &HeaderMap, body: &Bytes, ttl: Duration) -> Vec<u8> {
    let mut out = format!("{}\n{}\n", status.as_u16(), ttl.as_millis()).into_bytes();
    for (k, v) in h.iter().filter(|(k, _)| kept(k)) {
        out.extend_from_slice(k.as_str().as_bytes());
        out.push(b':');
        out.extend_from_slice(v.as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
    out.extend_from_slice(body);
    out
}

/// An entry as an answer, with `Age`; None for one that does not parse.
/// The body and the header values are slices of `entry`, not copies.
fn decode(entry: &Bytes, left_ms: i64) -> Option<Response<Body>> {
    let line = |from: usize| {
        let end = from + entry.get(from..)?.iter().position(|&b| b == b'\n')?;
        Some((&entry[from..end], end + 1))
    };
    let number = |text: &[u8]| std::str::from_utf8(text).ok()?.parse::<i64>().ok();
    let (status, at) = line(0)?;
    let (ttl, mut at) = line(at)?;
    let (status, ttl) = (u16::try_from(number(status)?).ok()?, number(ttl)?);
    if ttl < 0 {
        return None;
    }
    let mut r = Response::new(Body::default());
    *r.status_mut() = StatusCode::from_u16(status).ok()?;
    loop {
        let (text, next) = line(at)?;
        if text.is_empty() {
            at = next;
            break;
        }
        let colon = text.iter().position(|&b| b == b':')?;
        let name = HeaderName::from_bytes(&text[..colon]).ok()?;
        let value = HeaderValue::from_maybe_shared(entry.slice(at + colon + 1..next - 1)).ok()?;
        if kept(&name) {
            r.headers_mut().append(name, value);
        }
        at = next;
    }
    *r.body_mut() = Body::new(entry.slice(at..));
    let age = ttl.saturating_sub(left_ms.max(0)).max(0) / 1000;
    r.headers_mut().insert(AGE, HeaderValue::from(age as u64));
    r.headers_mut()
        .insert(X_CACHE, HeaderValue::from_static("hit"));
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::headers;

    #[test]
    fn cache_control_decides() {
        let max = Duration::from_secs(300);
        let ok = |p: &[(&str, &str)], shared| storable(StatusCode::OK, &headers(p), shared, max);
        assert_eq!(
            ok(&[("cache-control", "max-age=60")], true),
            Some((Duration::from_secs(60), String::new()))
        );
        assert_eq!(
            ok(&[("cache-control", "max-age=6000")], false).unwrap().0,
            max
        );
        assert_eq!(
            ok(&[("cache-control", "public, s-maxage=5, max-age=60")], true)
                .unwrap()
                .0,
            Duration::from_secs(5)
        );
        assert_eq!(ok(&[("cache-control", "private, max-age=60")], true), None);
        assert_eq!(
            ok(
                &[("cache-control", "private=\"Set-Cookie\", max-age=60")],
                true
            ),
            None
        );
        assert_eq!(
            ok(&[("cache-control", "max-age=60, PRIVATE=\"a, b\"")], true),
            None
        );
        assert_eq!(
            ok(&[("cache-control", "max-age=60"), ("age", "50")], false),
            Some((Duration::from_secs(10), String::new()))
        );
        assert_eq!(
            ok(&[("cache-control", "max-age=60"), ("age", "60")], false),
            None
        );
        assert_eq!(
            ok(&[("cache-control", "max-age=60"), ("age", "50, 0")], false),
            Some((Duration::from_secs(10), String::new()))
        );
        for bad in ["x", "-1", "1.5", "7200;p=1", ""] {
            assert_eq!(
                ok(&[("cache-control", "max-age=60"), ("age", bad)], false),
                None,
                "{bad:?}"
            );
        }
        assert!(ok(&[("cache-control", "private, max-age=60")], false).is_some());
        assert_eq!(
            ok(&[("cache-control", "no-store, max-age=60")], false),
            None
        );
        assert_eq!(ok(&[("cache-control", "no-cache")], false), None);
        assert_eq!(ok(&[], false), None);
        assert_eq!(
            storable(
                StatusCode::NOT_FOUND,
                &headers(&[("cache-control", "max-age=9")]),
                false,
                max
            ),
            None
        );
        assert_eq!(
            ok(&[("cache-control", "max-age=60"), ("vary", "*")], false),
            None
        );
        assert_eq!(
            ok(
                &[("cache-control", "max-age=60"), ("set-cookie", "a=b")],
                false
            ),
            None
        );
        assert_eq!(
            ok(
                &[
                    ("cache-control", "max-age=60"),
                    ("vary", "Accept-Language, accept"),
                    ("vary", "Accept")
                ],
                false
            )
            .unwrap()
            .1,
            "accept,accept-language"
        );
    }

    #[test]
    fn variants_differ_by_the_named_headers_only() {
        let a = headers(&[("accept-language", "fr"), ("user-agent", "x")]);
        let b = headers(&[("accept-language", "fr"), ("user-agent", "y")]);
        let c = headers(&[("accept-language", "de")]);
        assert_eq!(
            variant("accept-language", &a),
            variant("accept-language", &b)
        );
        assert_ne!(
            variant("accept-language", &a),
            variant("accept-language", &c)
        );
        assert_eq!(variant("", &a), variant("", &c));
    }

    #[test]
    fn variants_differ_by_host() {
        let a = headers(&[("host", "app.example")]);
        let b = headers(&[("host", "evil.example")]);
        let c = headers(&[
            ("host", "app.example"),
            ("x-forwarded-host", "evil.example"),
        ]);
        assert_ne!(variant("", &a), variant("", &b));
        assert_ne!(variant("", &a), variant("", &c));
        assert_ne!(variant("accept", &a), variant("accept", &b));
        assert_eq!(variant("", &a), variant("", &a.clone()));
    }

    #[test]
    fn an_entry_round_trips() {
        let h = headers(&[
            ("content-type", "text/plain"),
            ("x-a", "1"),
            ("x-a", "2"),
            ("content-length", "3"),
            ("transfer-encoding", "chunked"),
        ]);
        let e = encode(
            &StatusCode::OK,
            &h,
            &Bytes::from_static(b"hi\nthere"),
            Duration::from_secs(10),
        );
        let r = decode(&Bytes::from(e), 7_000).unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["age"], "3");
        assert_eq!(r.headers()["x-cache"], "hit");
        assert_eq!(r.headers().get_all("x-a").iter().count(), 2);
        // The framing comes from the stored body, never a stored header.
        assert!(!r.headers().contains_key("content-length"));
        assert!(!r.headers().contains_key("transfer-encoding"));
        assert_eq!(hyper::body::Body::size_hint(r.body()).exact(), Some(8));
        for bad in [
            &b"garbage"[..],
            b"200\n[]\n10\nbody",
            b"200\n10\nx-a:1\n",
            b"200\n-9223372036854775808\n\n",
            b"99999\n10\n\n",
            b"200\n10\nno colon\n\n",
        ] {
            assert!(decode(&Bytes::from_static(bad), 0).is_none(), "{bad:?}");
        }
    }
}
