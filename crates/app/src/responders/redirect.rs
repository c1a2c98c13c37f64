//! A redirecting listener: plain HTTP answered `308 Permanent Redirect` to
//! the same host, path and query on the HTTPS listener (308 rather than
//! 301, so that a POST stays a POST). `/healthz` and `/readyz` are served
//! as usual, so that a load balancer can check the plain port.

use hyper::body::Incoming;
use hyper::header::{HeaderValue, HOST, LOCATION};
use hyper::{Request, Response, StatusCode};

use crate::body::Body;
use crate::refusal::{Answer, Refusal};
use crate::response::no_store;

/// A request that came in on a redirecting listener (a request
/// extension): the HTTPS port to send it to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ToHttps(pub(crate) u16);

/// Whether a path is served on a redirecting listener.
pub(crate) fn served(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz")
}

/// The redirect, or 400 when the request names no usable host.
pub(crate) fn to_https(req: &Request<Incoming>, port: u16) -> Answer {
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(host_name);
    let Some(host) = host else {
        return Err(Refusal::bad_request(
            "This port redirects to HTTPS and needs a valid Host header.",
        ));
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = if port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{port}{path}")
    };
    let Ok(location) = HeaderValue::from_str(&location) else {
        return Err(Refusal::bad_request(
            "The request path cannot be redirected.",
        ));
    };
    let mut r = Response::new(Body::new(""));
    *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
    r.headers_mut().insert(LOCATION, location);
    Ok(no_store(r))
}

/// The host of a `Host` value without its port: a DNS name or IPv4
/// address (letters, digits, '-', '.'), or a bracketed IPv6 address.
/// Anything else (userinfo, a path, spaces) is refused, so that the
/// redirect can only ever name a host.
fn host_name(value: &str) -> Option<&str> {
    let host = if value.starts_with('[') {
        let end = value.find(']')?;
        let (h, rest) = value.split_at(end + 1);
        if !(rest.is_empty() || port_ok(rest.strip_prefix(':')?)) {
            return None;
        }
        let inner = &h[1..h.len() - 1];
        if inner.parse::<std::net::Ipv6Addr>().is_err() {
            return None;
        }
        h
    } else {
        let (h, port) = match value.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (value, None),
        };
        if port.is_some_and(|p| !port_ok(p)) {
            return None;
        }
        let ok = !h.is_empty()
            && h.len() <= 253
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !ok {
            return None;
        }
        h
    };
    Some(host)
}

fn port_ok(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::host_name;

    #[test]
    fn hosts_are_names_or_addresses_only() {
        assert_eq!(host_name("example.com"), Some("example.com"));
        assert_eq!(host_name("example.com:8080"), Some("example.com"));
        assert_eq!(host_name("127.0.0.1:80"), Some("127.0.0.1"));
        assert_eq!(host_name("[::1]:8080"), Some("[::1]"));
        assert_eq!(host_name("[::1]"), Some("[::1]"));
        for bad in [
            "",
            "evil.com/x",
            "a@b",
            "a b",
            "host:",
            "host:80:80",
            "[::1",
            "[zz]",
            "[::1]x",
            "h:123456",
        ] {
            assert_eq!(host_name(bad), None, "{bad}");
        }
    }
}
