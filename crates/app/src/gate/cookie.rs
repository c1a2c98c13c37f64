//! The session cookie for browser apps (`auth.cookie`): set at login
//! (`HttpOnly`, `SameSite=Lax`, `Secure` unless configured off), cleared at
//! logout, read where a bearer token would be; and the CSRF check that a
//! request authenticated by it must pass when its method changes state.

use std::time::Duration;

use hyper::header::{HeaderMap, HeaderValue, COOKIE, HOST, ORIGIN, REFERER};
use hyper::Method;

use crate::CookieSettings;

/// The value of cookie `name`, if the request has it (the first one).
pub(crate) fn read<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().trim_matches('"'))
}

/// `Set-Cookie` for a new session.
pub(crate) fn set(c: &CookieSettings, token: &str, max_age: Duration) -> HeaderValue {
    let secure = if c.secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{}={token}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
        c.name,
        max_age.as_secs()
    ))
    .expect("a validated cookie name and a token of base64url characters")
}

/// `Set-Cookie` that removes it.
pub(crate) fn clear(c: &CookieSettings) -> HeaderValue {
    set(c, "", Duration::ZERO)
}

/// Requests a page of another site must not be able to make a browser
/// send with the cookie: the methods that change state, and a switch of
/// protocols (a WebSocket handshake is a GET, and `SameSite=Lax` still
/// sends the cookie from a sibling subdomain; browsers always send
/// `Origin` with it).
pub(crate) fn state_changing(m: &Method, h: &HeaderMap) -> bool {
    !matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    ) || h.get_all(hyper::header::UPGRADE).iter().any(|v| {
        v.as_bytes()
            .windows(9)
            .any(|w| w.eq_ignore_ascii_case(b"websocket"))
    })
}

/// The host (and port) part of an origin or URL: `http://a.example:8080/x`
/// gives `a.example:8080`.
fn authority(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    Some(&rest[..end]).filter(|a| !a.is_empty())
}

/// Whether a request authenticated by the cookie comes from the site
/// itself: its `Origin` (else its `Referer`) names the request's own
/// `Host`, or it carries `X-Requested-With`, which a cross-site form
/// cannot send (a script would need a CORS preflight).
pub(crate) fn same_site(h: &HeaderMap) -> bool {
    if h.get("x-requested-with").is_some_and(|v| !v.is_empty()) {
        return true;
    }
    let Some(host) = h.get(HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let from = h
        .get(ORIGIN)
        .or_else(|| h.get(REFERER))
        .and_then(|v| v.to_str().ok())
        .and_then(authority);
    from.is_some_and(|a| a.eq_ignore_ascii_case(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_util::headers as map;

    #[test]
    fn the_cookie_is_found_among_others() {
        let h = map(&[("cookie", "a=1; forkd_session=T.S; b=2")]);
        assert_eq!(read(&h, "forkd_session"), Some("T.S"));
        assert_eq!(read(&h, "forkd"), None);
    }

    #[test]
    fn set_cookie_has_the_attributes() {
        let c = CookieSettings {
            name: "s".into(),
            secure: true,
        };
        let v = set(&c, "T.S", Duration::from_secs(60));
        assert_eq!(
            v,
            "s=T.S; Path=/; Max-Age=60; HttpOnly; SameSite=Lax; Secure"
        );
        let plain = CookieSettings {
            name: "s".into(),
            secure: false,
        };
        assert!(!clear(&plain).to_str().unwrap().contains("Secure"));
    }

    #[test]
    fn same_site_needs_a_matching_origin_or_referer() {
        let host = ("host", "app.example:8080");
        assert!(same_site(&map(&[
            host,
            ("origin", "http://app.example:8080")
        ])));
        assert!(same_site(&map(&[
            host,
            ("referer", "https://app.example:8080/page?x")
        ])));
        assert!(!same_site(&map(&[host, ("origin", "http://evil.example")])));
        assert!(!same_site(&map(&[host, ("origin", "null")])));
        assert!(!same_site(&map(&[host])));
        assert!(same_site(&map(&[host, ("x-requested-with", "fetch")])));
    }
}
