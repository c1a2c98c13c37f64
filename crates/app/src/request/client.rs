//! Who the client is, for rate limits: the peer address, or the
//! X-Forwarded-For hop found by walking from the right through trusted
//! proxies only. IPv6 clients are grouped by /64, since one host commonly
//! owns a whole /64.

use std::net::{IpAddr, Ipv6Addr};

use hyper::header::HeaderMap;

/// The client address of a request that arrived from `peer`
/// (`peer_trusted`: whether it is a trusted proxy).
pub(crate) fn client_ip(
    peer: IpAddr,
    peer_trusted: bool,
    headers: &HeaderMap,
    trusted: &dyn Fn(IpAddr) -> bool,
) -> IpAddr {
    let peer = canonical(peer);
    if !peer_trusted {
        return peer;
    }
    // Every hop, right to left, over all X-Forwarded-For lines, each parsed
    // from the bytes (a value that is not valid text spoils only its own
    // hops). Each trusted proxy vouches for the hop left of it; a hop that
    // is not an address ends the walk: the client is the last hop a
    // trusted proxy named.
    let hops = headers
        .get_all("x-forwarded-for")
        .iter()
        .rev()
        .flat_map(|value| value.as_bytes().rsplit(|&b| b == b','));
    let mut client = peer;
    for hop in hops {
        let hop = std::str::from_utf8(hop).ok();
        let Some(ip) = hop.and_then(|h| h.trim().parse::<IpAddr>().ok()) else {
            break;
        };
        client = canonical(ip);
        if !trusted(client) {
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

/// Open connections per client in one worker, capped, so that one client
/// cannot hold all of `http.max_connections`.
pub(crate) struct PerClient {
    cap: usize,
    open: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

/// One open connection of a client; counted until dropped.
pub(crate) struct ClientSlot {
    owner: std::sync::Arc<PerClient>,
    key: String,
}

impl PerClient {
    pub(crate) fn new(cap: usize) -> std::sync::Arc<Self> {
        std::sync::Arc::new(PerClient {
            cap,
            open: Default::default(),
        })
    }

    /// A place for one more connection of `ip`'s client, or None when it
    /// holds `cap` already.
    pub(crate) fn enter(self: &std::sync::Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let key = client_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key.clone()).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            owner: self.clone(),
            key,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
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
        assert_eq!(
            client_ip(peer, trusted(peer), &headers(&["1.2.3.4"]), &trusted),
            peer
        );
    }

    #[test]
    fn walks_from_the_right_through_trusted_hops() {
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let h = headers(&["6.6.6.6, 1.2.3.4", "10.0.0.2"]);
        assert_eq!(
            client_ip(peer, trusted(peer), &h, &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        // A spoofed left-most entry is ignored.
        let h = headers(&["9.9.9.9, 5.5.5.5, 10.0.0.3"]);
        assert_eq!(
            client_ip(peer, trusted(peer), &h, &trusted),
            "5.5.5.5".parse::<IpAddr>().unwrap()
        );
        // Garbage ends the walk at the last hop a trusted proxy named.
        let h = headers(&["9.9.9.9, junk, 10.0.0.3"]);
        assert_eq!(
            client_ip(peer, trusted(peer), &h, &trusted),
            "10.0.0.3".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_ip(peer, trusted(peer), &headers(&[]), &trusted),
            peer
        );
    }

    #[test]
    fn bytes_that_are_not_text_spoil_only_their_hop() {
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let raw = |lines: &[&[u8]]| {
            let mut h = HeaderMap::new();
            for l in lines {
                h.append("x-forwarded-for", HeaderValue::from_bytes(l).unwrap());
            }
            client_ip(peer, trusted(peer), &h, &trusted)
        };
        let client: IpAddr = "1.2.3.4".parse().unwrap();
        // Not the proxy's own address: the client it names.
        assert_eq!(raw(&[b"6.6.6.6, caf\xc3\xa9\xff, 1.2.3.4"]), client);
        // What a client sends stands left of what its proxy appends, so a
        // client cannot end the walk at the proxy: only a proxy that itself
        // writes garbage leaves its own address as the client.
        assert_eq!(raw(&[b"\xfe\xff", b"1.2.3.4"]), client);
        assert_eq!(raw(&[b"1.2.3.4, \xfe"]), peer);
    }

    #[test]
    fn per_client_connections_are_capped_and_given_back() {
        let p = PerClient::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let (x, y) = (p.enter(a).unwrap(), p.enter(a).unwrap());
        assert!(p.enter(a).is_none());
        assert!(p.enter("192.0.2.2".parse().unwrap()).is_some());
        drop(x);
        let z = p.enter(a).unwrap();
        drop((y, z));
        assert!(p.open.lock().unwrap().is_empty());
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
