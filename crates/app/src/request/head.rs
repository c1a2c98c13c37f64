//! What every request's head must be before any handler reads it, on
//! HTTP/1 and HTTP/2 alike:
//!
//! - one valid `Host` (RFC 9112 section 3.2): none on an HTTP/1.1
//!   request, two, or one that is not `host[:port]` (a DNS name or IPv4
//!   address, or a bracketed IPv6 address; a port up to 65535) is 400.
//!   An absolute-form target (http or https only), or on HTTP/2
//!   `:authority`, gives the `Host` handlers see; an HTTP/2 `Host` that
//!   differs from `:authority` is 400 (RFC 9113 section 8.3.1);
//! - no field value with leading or trailing white space (RFC 9113
//!   section 8.2.1 calls such a request malformed; HTTP/1's parser trims
//!   it, so this only ever refuses HTTP/2 requests);
//! - a `CONNECT` that names no authority is 400; a request body whose
//!   transfer coding is not `chunked` alone is 501;
//! - on HTTP/2 such a refusal is a malformed request: counted and logged
//!   as a 400, and the stream reset with PROTOCOL_ERROR;
//! - a head no larger than `http.max_header_bytes`, counted from what was
//!   parsed (the request line, then each field as `name: value` and CRLF,
//!   then CRLF), so the same head gets the same answer however its bytes
//!   were segmented, and of at most 100 fields. hyper's own read buffer
//!   stops a head at twice the limit, or at 100 fields, before it is
//!   parsed; forkd answers that 431 too (`head_limit`). On HTTP/2 the h2
//!   library counts 32 bytes a field, so its cap sits at seven times the
//!   limit. The 431 asks an HTTP/1.1 client to close the connection.

use hyper::header::{HeaderMap, HeaderValue, HOST, TRANSFER_ENCODING};
use hyper::{Request, Version};

use crate::refusal::{Problem, Refusal};

/// The most fields a request head may have: hyper's own cap on HTTP/1.1,
/// held on HTTP/2 too.
const MAX_FIELDS: usize = 100;

/// hyper's read buffer: twice the limit, so that every head this module
/// counts as within it is parsed.
pub(crate) fn parser_cap(max_header_bytes: usize) -> usize {
    max_header_bytes.saturating_mul(2)
}

/// HTTP/2's header-list cap (SETTINGS_MAX_HEADER_LIST_SIZE), which counts
/// a field as its name, its value and 32 bytes (RFC 9113 section 6.5.2):
/// a head within the limit as counted here (4 bytes a field) has at most
/// 33/5 of that size, plus the pseudo-headers.
pub(crate) fn h2_list_cap(max_header_bytes: usize) -> usize {
    max_header_bytes.saturating_mul(7).saturating_add(1024)
}

/// Checks the head and gives the request the `Host` handlers read; Err
/// is the answer to send instead.
pub(crate) fn check<B>(req: &mut Request<B>, max_header_bytes: usize) -> Result<(), Refusal> {
    let h2 = req.version() == Version::HTTP_2;
    checked(req, max_header_bytes).map_err(|r| r.reset_on_h2(h2))
}

fn checked<B>(req: &mut Request<B>, max_header_bytes: usize) -> Result<(), Refusal> {
    if req.method() == hyper::Method::CONNECT && req.uri().authority().is_none() {
        return Err(Refusal::bad_request(
            "A CONNECT request must name an authority.",
        ));
    }
    let mut size = head_line_len(req);
    // HTTP/2's :authority stands for the Host line it becomes.
    if req.version() == Version::HTTP_2 && !req.headers().contains_key(HOST) {
        size += req
            .uri()
            .authority()
            .map_or(0, |a| "host".len() + a.as_str().len() + 4);
    }
    for (name, value) in req.headers() {
        size += name.as_str().len() + value.len() + 4;
        if let (Some(first), Some(last)) = (value.as_bytes().first(), value.as_bytes().last()) {
            if matches!(first, b' ' | b'\t') || matches!(last, b' ' | b'\t') {
                return Err(Refusal::bad_request(
                    "A header value begins or ends with white space.",
                ));
            }
        }
    }
    // HTTP/1.1's parser takes at most 100 fields; HTTP/2 the same.
    if size + 2 > max_header_bytes || req.headers().len() > MAX_FIELDS {
        return Err(Refusal::head_too_large());
    }
    if req
        .uri()
        .scheme_str()
        .is_some_and(|s| !s.eq_ignore_ascii_case("http") && !s.eq_ignore_ascii_case("https"))
    {
        return Err(Refusal::bad_request(
            "The request target's scheme is not http or https.",
        ));
    }
    transfer_coding(req)?;
    host(req)
}

/// A request body's transfer coding must be `chunked` alone: another
/// (`gzip, chunked`) would reach an upstream as unlabelled coded bytes
/// once hyper has undone the chunking (RFC 9112 section 6.1: 501).
fn transfer_coding<B>(req: &Request<B>) -> Result<(), Refusal> {
    if chunked_alone(req.headers()) != Some(false) {
        return Ok(());
    }
    Err(Refusal::new(
        Problem::NotImplemented,
        "The request body's transfer coding is not chunked alone, which this server does not take.",
    ))
}

/// Whether a message's `Transfer-Encoding` codings are `chunked` alone:
/// None when it names none, Some(false) for any other list (`gzip,
/// chunked`, `chunked, chunked`). Requests and upstream answers alike.
pub(crate) fn chunked_alone(h: &HeaderMap) -> Option<bool> {
    let mut codings = h
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty());
    let first = codings.next()?;
    Some(first.eq_ignore_ascii_case(b"chunked") && codings.next().is_none())
}

/// The request line's length: method, target, version, each space and
/// the CRLF (`HTTP/1.1` is as long as `HTTP/2.0`).
fn head_line_len<B>(req: &Request<B>) -> usize {
    let uri = req.uri();
    let target = match (req.version(), uri.scheme_str(), uri.authority()) {
        // An absolute-form target came as written.
        (Version::HTTP_10 | Version::HTTP_11, Some(s), Some(a)) => {
            s.len() + 3 + a.as_str().len() + uri.path_and_query().map_or(0, |p| p.as_str().len())
        }
        (_, _, a) if req.method() == hyper::Method::CONNECT => a.map_or(0, |a| a.as_str().len()),
        _ => uri.path_and_query().map_or(1, |p| p.as_str().len()),
    };
    req.method().as_str().len() + 1 + target + 1 + "HTTP/1.1".len() + 2
}

/// The `Host` rules above.
fn host<B>(req: &mut Request<B>) -> Result<(), Refusal> {
    let mut hosts = req.headers().get_all(HOST).iter();
    let given = hosts.next().cloned();
    if hosts.next().is_some() {
        return Err(Refusal::bad_request(
            "The request has more than one Host header.",
        ));
    }
    if let Some(h) = &given {
        if !valid_authority(h.as_bytes()) {
            return Err(Refusal::bad_request(
                "The Host header is not a host name or address with an optional port.",
            ));
        }
    }
    let authority = req.uri().authority().map(|a| a.as_str().to_owned());
    match (req.version(), authority, given) {
        (Version::HTTP_2, Some(a), Some(h)) if !a.as_bytes().eq_ignore_ascii_case(h.as_bytes()) => {
            return Err(Refusal::bad_request(
                "The Host header names another authority than :authority.",
            ));
        }
        // An absolute-form target, or HTTP/2's :authority: the Host.
        (_, Some(a), _) => {
            if !valid_authority(a.as_bytes()) {
                return Err(Refusal::bad_request(
                    "The request target's authority is not a host name or address with an optional port.",
                ));
            }
            if let Ok(v) = HeaderValue::from_str(&a) {
                req.headers_mut().insert(HOST, v);
            }
        }
        (Version::HTTP_11, None, None) => {
            return Err(Refusal::bad_request(
                "An HTTP/1.1 request needs a Host header.",
            ));
        }
        (Version::HTTP_2, None, None) => {
            return Err(Refusal::bad_request(
                "An HTTP/2 request needs :authority or a Host header.",
            ));
        }
        _ => {}
    }
    Ok(())
}

/// `host [":" port]`: a DNS name or IPv4 address (letters, digits, `-`,
/// `.`, `_`), or a bracketed IPv6 address; a port up to 65535.
/// No user part, path or space, and none of the sub-delimiters RFC 3986
/// would allow in a name (`,` `;` `!` ...): an app reading
/// `X-Forwarded-Host` as a list would take `a.example,b.example` for two.
fn valid_authority(a: &[u8]) -> bool {
    let (host_ok, port) = if let Some(rest) = a.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        let port = match &rest[end + 1..] {
            [] => None,
            [b':', port @ ..] => Some(port),
            _ => return false,
        };
        (ipv6_literal(&rest[..end]), port)
    } else {
        match a.iter().rposition(|&b| b == b':') {
            Some(i) => (dns_name(&a[..i]), Some(&a[i + 1..])),
            None => (dns_name(a), None),
        }
    };
    let port_ok = port.is_none_or(|p| {
        !p.is_empty()
            && p.iter().all(u8::is_ascii_digit)
            && std::str::from_utf8(p).is_ok_and(|p| p.parse::<u16>().is_ok())
    });
    host_ok && port_ok
}

/// An IPv6 address, with a zone after `%25` (RFC 6874: fe80::1%25eth0).
fn ipv6_literal(literal: &[u8]) -> bool {
    let (address, zone) = match literal.windows(3).position(|w| w == b"%25") {
        Some(i) => (&literal[..i], Some(&literal[i + 3..])),
        None => (literal, None),
    };
    let zone_ok = zone.is_none_or(|z| {
        !z.is_empty()
            && z.iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
    });
    zone_ok && std::str::from_utf8(address).is_ok_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok())
}

/// A DNS name or IPv4 address: labels of 1 to 63 letters, digits, `-`
/// (not first or last) and `_`, at most 253 bytes, a trailing dot allowed.
fn dns_name(name: &[u8]) -> bool {
    let name = name.strip_suffix(b".").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split(|&b| b == b'.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
                && !label.starts_with(b"-")
                && !label.ends_with(b"-")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().version(version).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn status(r: &mut Request<()>, max: usize) -> u16 {
        match check(r, max) {
            Ok(()) => 200,
            Err(r) => r.status().as_u16(),
        }
    }

    #[test]
    fn authorities() {
        for ok in [
            "a.example",
            "a.example:8080",
            "127.0.0.1:1",
            "[::1]:80",
            "[::1]",
            "[fe80::1%25eth0]:8080",
            "a.example.",
            "x:08",
            "x:65535",
            "xn--bcher-kva.example",
            "a_b",
        ] {
            assert!(valid_authority(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "evil.example/x y",
            "a@evil.example",
            "evil.example,good.example",
            "a;b",
            "a%2eb",
            "a.example:80:80x",
            "a.example:123456",
            "a b",
            "[::1",
            "[::1]x",
            "[zz]",
            "[1::2::3]",
            "x:99999",
            "x:",
            ".x",
            "-x",
            "x..y",
            "x-.y",
            "[fe80::1%25]",
            "[fe80::1%eth0]",
            ":80",
            "a/b",
        ] {
            assert!(!valid_authority(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn host_rules() {
        let max = 32 * 1024;
        let h11 = Version::HTTP_11;
        assert_eq!(status(&mut req(h11, "/", &[("host", "a")]), max), 200);
        assert_eq!(status(&mut req(h11, "/", &[]), max), 400);
        assert_eq!(status(&mut req(Version::HTTP_10, "/", &[]), max), 200);
        assert_eq!(
            status(&mut req(h11, "/", &[("host", "a"), ("host", "b")]), max),
            400
        );
        assert_eq!(
            status(&mut req(h11, "/", &[("host", "a@evil.example")]), max),
            400
        );
        // An absolute-form target's authority is the Host.
        let mut r = req(h11, "http://b.example/x", &[("host", "a")]);
        assert_eq!(status(&mut r, max), 200);
        assert_eq!(r.headers()["host"], "b.example");
        // HTTP/2: :authority gives the Host, and a different Host is 400.
        let mut r = req(Version::HTTP_2, "http://b.example/x", &[]);
        assert_eq!(status(&mut r, max), 200);
        assert_eq!(r.headers()["host"], "b.example");
        let mut r = req(Version::HTTP_2, "http://b.example/x", &[("host", "c")]);
        assert_eq!(status(&mut r, max), 400);
        let mut r = req(
            Version::HTTP_2,
            "http://b.example/x",
            &[("host", "B.example")],
        );
        assert_eq!(status(&mut r, max), 200);
        // Neither :authority nor Host.
        assert_eq!(status(&mut req(Version::HTTP_2, "/x", &[]), max), 400);
    }

    #[test]
    fn more_than_100_fields_or_another_scheme_is_refused() {
        let names: Vec<String> = (0..101).map(|i| format!("x-{i}")).collect();
        let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
        assert_eq!(
            status(&mut req(Version::HTTP_2, "http://a/", &many[..100]), 32768),
            200
        );
        assert_eq!(
            status(&mut req(Version::HTTP_2, "http://a/", &many), 32768),
            431
        );
        let mut r = req(Version::HTTP_11, "ftp://a/x", &[("host", "a")]);
        assert_eq!(status(&mut r, 32768), 400);
    }

    #[test]
    fn a_body_coding_other_than_chunked_is_501() {
        let te = |v| {
            req(
                Version::HTTP_11,
                "/",
                &[("host", "a"), ("transfer-encoding", v)],
            )
        };
        assert_eq!(status(&mut te("chunked"), 32768), 200);
        assert_eq!(status(&mut te("Chunked"), 32768), 200);
        assert_eq!(status(&mut te("gzip, chunked"), 32768), 501);
        assert_eq!(status(&mut te("chunked, chunked"), 32768), 501);
    }

    #[test]
    fn white_space_around_a_value_is_refused() {
        let max = 32 * 1024;
        for v in [" x", "x\t", "\tx "] {
            let mut r = req(Version::HTTP_2, "http://a/", &[("x-a", v)]);
            assert_eq!(status(&mut r, max), 400, "{v:?}");
        }
        let mut r = req(Version::HTTP_2, "http://a/", &[("x-a", "a b")]);
        assert_eq!(status(&mut r, max), 200);
    }

    #[test]
    fn the_head_is_counted_as_written() {
        // "GET /x HTTP/1.1\r\n" 17 + "host: a\r\n" 9 + "\r\n" 2 = 28.
        let mut r = req(Version::HTTP_11, "/x", &[("host", "a")]);
        assert_eq!(status(&mut r, 28), 200);
        let mut r = req(Version::HTTP_11, "/x", &[("host", "a")]);
        assert_eq!(status(&mut r, 27), 431);
        // On HTTP/2, :authority counts as the Host line it becomes.
        let mut r = req(Version::HTTP_2, "http://a/x", &[]);
        assert_eq!(status(&mut r, 28), 200);
        let mut r = req(Version::HTTP_2, "http://a/x", &[]);
        assert_eq!(status(&mut r, 27), 431);
    }
}
