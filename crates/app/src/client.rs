//! Who the client is, for rate limits: the peer address, or the
//! X-Forwarded-For hop found by walking from the right through trusted
//! proxies only. IPv6 clients are grouped by /64, since one host commonly
//! owns a whole /64.

use std::net::{IpAddr, Ipv6Addr};

use hyper::header::HeaderMap;

/// The client address of a request that arrived from `peer`.
pub(crate) fn client_ip(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &dyn Fn(IpAddr) -> bool,
) -> IpAddr {
    let peer = canonical(peer);
    if !trusted(peer) {
        return peer;
    }
    let mut hops = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let Ok(text) = value.to_str() else {
            return peer;
        };
        for hop in text.split(',') {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => hops.push(canonical(ip)),
                // An unparsable hop: trust nothing left of it.
                Err(_) => hops.clear(),
            }
        }
    }
    let mut client = peer;
    for hop in hops.into_iter().rev() {
        client = hop;
        if !trusted(hop) {
            break;
        }
    }
    client
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The rate-limit key of a client address: IPv4 as is, IPv6 by /64.
pub(crate) fn client_key(ip: IpAddr) -> String {
    match canonical(ip) {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{}/64", Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn trusted(ip: IpAddr) -> bool {
        ip.to_string().starts_with("10.")
    }

    #[test]
    fn untrusted_peer_is_the_client() {
        let peer: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(client_ip(peer, &headers(&["1.2.3.4"]), &trusted), peer);
    }

    #[test]
    fn walks_from_the_right_through_trusted_hops() {
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let h = headers(&["6.6.6.6, 1.2.3.4", "10.0.0.2"]);
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        // A spoofed left-most entry is ignored.
        let h = headers(&["9.9.9.9, 5.5.5.5, 10.0.0.3"]);
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "5.5.5.5".parse::<IpAddr>().unwrap()
        );
        // Garbage resets what is left of it.
        let h = headers(&["9.9.9.9, junk, 10.0.0.3"]);
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "10.0.0.3".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(peer, &headers(&[]), &trusted), peer);
    }

    #[test]
    fn ipv6_is_grouped_by_64() {
        let a = client_key("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = client_key("2001:db8:1:2:bbbb::2".parse().unwrap());
        assert_eq!(a, b);
        assert_eq!(a, "2001:db8:1:2::/64");
        assert_eq!(client_key("::ffff:192.0.2.7".parse().unwrap()), "192.0.2.7");
    }
}
