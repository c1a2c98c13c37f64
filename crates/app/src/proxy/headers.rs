//! The headers of a forwarded request and of its answer: hop-by-hop
//! headers removed both ways (RFC 9110 section 7.6.1), the forwarding
//! headers set from what forkd trusts, the identity headers set by forkd
//! only.

use std::net::IpAddr;

use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, COOKIE, HOST,
    TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Whether a request or response asks to switch protocols (WebSocket):
/// `Connection: upgrade` and an `Upgrade` header.
pub(crate) fn wants_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(UPGRADE)
        && h.get_all(CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Removes the hop-by-hop headers, those `Connection` names included. With
/// `upgrade`, `Upgrade` is kept and `Connection: upgrade` set again.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    // From the bytes: a value that is not text still names its headers.
    let named: Vec<HeaderName> = h
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
        .collect();
    for name in named {
        if !(upgrade && name == UPGRADE) {
            h.remove(name);
        }
    }
    for name in [
        CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        TE,
        TRAILER,
        TRANSFER_ENCODING,
    ] {
        h.remove(name);
    }
    h.remove("proxy-authenticate");
    h.remove("proxy-authorization");
    if upgrade {
        h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(UPGRADE);
    }
}

/// Makes an upstream's answer one forkd can pass on without mis-framing
/// it (RFC 9112 section 6.3); Err names what is wrong with it. hyper has
/// read the body by the upstream's framing; what goes on to the client
/// must say the same:
///
/// - a `Transfer-Encoding` other than `chunked` alone (`gzip, chunked`)
///   is refused: the client would get coded bytes it cannot know to
///   decode;
/// - with `chunked`, a `Content-Length` beside it is dropped (chunked
///   wins), and hyper frames the body it streams itself;
/// - a `Content-Length` list of one value (`8, 8`, or two equal lines)
///   goes on as one value; differing ones are refused;
/// - a 1xx or 204 answer has no body, so it carries neither;
/// - a status outside 100-599 is refused (RFC 9110 section 15);
/// - the answer goes on as HTTP/1.1 whatever the upstream spoke, so an
///   HTTP/1.0 upstream does not close the client's connection.
pub(crate) fn frame_upstream_answer<B>(r: &mut hyper::Response<B>) -> Result<(), &'static str> {
    *r.version_mut() = hyper::Version::HTTP_11;
    let status = r.status();
    if status.as_u16() > 599 {
        return Err("a status outside 100-599");
    }
    let h = r.headers_mut();
    if h.contains_key(TRANSFER_ENCODING) {
        if crate::request::head::chunked_alone(h) != Some(true) {
            return Err("a transfer coding other than chunked");
        }
        h.remove(TRANSFER_ENCODING);
        h.remove(CONTENT_LENGTH);
    }
    one_content_length(h).map_err(|()| "Content-Length values that differ")?;
    if status.is_informational() || status == hyper::StatusCode::NO_CONTENT {
        h.remove(CONTENT_LENGTH);
    }
    Ok(())
}

/// Leaves at most one `Content-Length`, of one value: a list of equal
/// values (`5, 5`, or the header twice, as an HTTP/2 peer may send it) is
/// one length (RFC 9110 section 8.6); values that differ, or one that is
/// not a number, are Err.
pub(crate) fn one_content_length(h: &mut HeaderMap) -> Result<(), ()> {
    let mut values = h.get_all(CONTENT_LENGTH).iter();
    let Some(first) = values.next() else {
        return Ok(());
    };
    if values.next().is_none() && first.as_bytes().iter().all(u8::is_ascii_digit) {
        return Ok(());
    }
    let mut length: Option<&[u8]> = None;
    for v in h
        .get_all(CONTENT_LENGTH)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
    {
        if v.is_empty() || !v.iter().all(u8::is_ascii_digit) || length.is_some_and(|l| l != v) {
            return Err(());
        }
        length = Some(v);
    }
    let one = HeaderValue::from_bytes(length.ok_or(())?).map_err(|_| ())?;
    h.insert(CONTENT_LENGTH, one);
    Ok(())
}

/// Joins several `Cookie` headers (an HTTP/2 client sends one a cookie)
/// into the one an HTTP/1.1 upstream expects (RFC 9113 section 8.2.3).
pub(crate) fn join_cookies(h: &mut HeaderMap) {
    let mut all = h.get_all(COOKIE).iter();
    if all.next().is_none() || all.next().is_none() {
        return;
    }
    let joined: Vec<&[u8]> = h
        .get_all(COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        h.insert(COOKIE, v);
    }
}

/// Removes every request header with an underscore in its name, as nginx
/// does by default: app servers that read headers as CGI-style variables
/// (`HTTP_X_FORKD_USER`) would take a client's `X_Forkd_User` or
/// `X-Forwarded_For` for the headers forkd sets.
pub(crate) fn drop_underscored(h: &mut HeaderMap) {
    let names: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().contains('_'))
        .cloned()
        .collect();
    for name in names {
        h.remove(name);
    }
}

/// Who is asking, for the upstream.
pub(crate) struct Forwarding<'a> {
    /// The TCP peer.
    pub(crate) peer: IpAddr,
    /// The peer is a trusted proxy: what it says of the client is kept.
    pub(crate) trusted: bool,
    /// The upstream's authority, for a request without `Host`.
    pub(crate) upstream_host: &'a str,
    /// The client reached forkd over TLS.
    pub(crate) tls: bool,
}

/// `X-Forwarded-For`/`-Proto`/`-Host` and `Forwarded`: a trusted proxy's
/// are kept (and the peer appended to `X-Forwarded-For`); anyone else's
/// are replaced by what forkd saw.
pub(crate) fn set_forwarding(h: &mut HeaderMap, f: &Forwarding<'_>) {
    let peer = f.peer.to_string();
    let xff = if f.trusted {
        let before: Vec<&str> = h
            .get_all(X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if before.is_empty() {
            peer
        } else {
            format!("{}, {peer}", before.join(", "))
        }
    } else {
        peer
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert(X_FORWARDED_FOR, v);
    }
    if !f.trusted || !h.contains_key(X_FORWARDED_PROTO) {
        let proto = if f.tls { "https" } else { "http" };
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !f.trusted || !h.contains_key(X_FORWARDED_HOST) {
        match h.get(HOST).cloned() {
            Some(host) => {
                h.insert(X_FORWARDED_HOST, host);
            }
            None => {
                h.remove(X_FORWARDED_HOST);
            }
        }
    }
    if !f.trusted {
        h.remove(FORWARDED);
    }
    if !h.contains_key(HOST) {
        if let Ok(v) = HeaderValue::from_str(f.upstream_host) {
            h.insert(HOST, v);
        }
    }
}

/// The identity headers' names, and whether `Authorization` goes on.
pub(crate) struct Identity<'a> {
    pub(crate) names: [&'a HeaderName; 3],
    /// (user, role, session), on an authenticated request.
    pub(crate) values: Option<[&'a str; 3]>,
    pub(crate) pass_authorization: bool,
    /// forkd's session cookie, which is a token too.
    pub(crate) cookie_name: Option<&'a str>,
}

/// Removes whatever a client sent under the identity headers' names (every
/// occurrence), then sets them for an authenticated request.
pub(crate) fn set_identity(h: &mut HeaderMap, id: &Identity<'_>) {
    for name in id.names {
        h.remove(name);
    }
    if !id.pass_authorization {
        h.remove(AUTHORIZATION);
        if let Some(name) = id.cookie_name {
            drop_cookie(h, name);
        }
    }
    if let Some(values) = id.values {
        for (name, value) in id.names.iter().zip(values) {
            if value.is_empty() {
                continue;
            }
            if let Ok(v) = HeaderValue::from_str(value) {
                h.insert(*name, v);
            }
        }
    }
}

/// Removes cookie `name` from every `Cookie` header, and a header left
/// empty.
fn drop_cookie(h: &mut HeaderMap, name: &str) {
    let kept: Vec<String> = h
        .get_all(COOKIE)
        .iter()
        .map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .split(';')
                .map(str::trim)
                .filter(|pair| pair.split_once('=').is_none_or(|(k, _)| k.trim() != name))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .filter(|v| !v.is_empty())
        .collect();
    h.remove(COOKIE);
    for v in kept {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.append(COOKIE, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_util::headers as map;

    #[test]
    fn one_content_length_of_one_value() {
        let one = |p: &[(&str, &str)]| {
            let mut h = map(p);
            one_content_length(&mut h).map(|()| {
                let v: Vec<&str> = h
                    .get_all(CONTENT_LENGTH)
                    .iter()
                    .map(|v| v.to_str().unwrap())
                    .collect();
                v.join("|")
            })
        };
        assert_eq!(one(&[]), Ok(String::new()));
        assert_eq!(one(&[("content-length", "8")]), Ok("8".into()));
        assert_eq!(one(&[("content-length", "8, 8")]), Ok("8".into()));
        assert_eq!(
            one(&[("content-length", "5"), ("content-length", "5")]),
            Ok("5".into())
        );
        assert_eq!(one(&[("content-length", "8, 3")]), Err(()));
        assert_eq!(one(&[("content-length", "+8")]), Err(()));
        assert_eq!(
            one(&[("content-length", "5"), ("content-length", "6")]),
            Err(())
        );
    }

    #[test]
    fn cookies_become_one_header() {
        let mut h = map(&[("cookie", "a=1"), ("cookie", "b=2")]);
        join_cookies(&mut h);
        let v: Vec<&str> = h
            .get_all(COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(v, ["a=1; b=2"]);
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_go() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn an_upgrade_keeps_upgrade_and_connection_upgrade() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn forwarding_from_an_untrusted_peer_is_replaced() {
        let mut h = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil"),
            ("forwarded", "for=6.6.6.6"),
            ("host", "app.example"),
        ]);
        let f = Forwarding {
            peer: "127.0.0.9".parse().unwrap(),
            trusted: false,
            upstream_host: "up:1",
            tls: false,
        };
        set_forwarding(&mut h, &f);
        assert_eq!(h["x-forwarded-for"], "127.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "app.example");
        assert!(!h.contains_key("forwarded"));
        assert_eq!(h["host"], "app.example");
    }

    #[test]
    fn a_trusted_proxy_is_appended_to() {
        let mut h = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
        ]);
        let f = Forwarding {
            peer: "10.0.0.1".parse().unwrap(),
            trusted: true,
            upstream_host: "up:1",
            tls: false,
        };
        set_forwarding(&mut h, &f);
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["host"], "up:1");
    }

    #[test]
    fn identity_headers_from_a_client_never_pass() {
        let (u, r, s) = (
            HeaderName::from_static("x-forkd-user"),
            HeaderName::from_static("x-forkd-role"),
            HeaderName::from_static("x-forkd-session"),
        );
        let mut h = map(&[
            ("x-forkd-user", "admin"),
            ("X-Forkd-User", "root"),
            ("x-forkd-role", "admin"),
            ("authorization", "Bearer t"),
        ]);
        let anonymous = Identity {
            names: [&u, &r, &s],
            values: None,
            pass_authorization: false,
            cookie_name: None,
        };
        set_identity(&mut h, &anonymous);
        assert!(h.is_empty(), "{h:?}");
        let mut h = map(&[("x-forkd-user", "admin"), ("authorization", "Bearer t")]);
        let alice = Identity {
            names: [&u, &r, &s],
            values: Some(["alice", "user", "abc"]),
            pass_authorization: true,
            cookie_name: Some("forkd_session"),
        };
        set_identity(&mut h, &alice);
        assert_eq!(h.get_all("x-forkd-user").iter().count(), 1);
        assert_eq!(h["x-forkd-user"], "alice");
        assert_eq!(h["x-forkd-session"], "abc");
        assert_eq!(h["authorization"], "Bearer t");
    }

    #[test]
    fn the_session_cookie_stays_with_forkd() {
        let mut h = map(&[
            ("cookie", "a=1; forkd_session=T.S; b=2"),
            ("cookie", "forkd_session=x"),
        ]);
        drop_cookie(&mut h, "forkd_session");
        let left: Vec<&str> = h
            .get_all("cookie")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(left, ["a=1; b=2"]);
    }
}
