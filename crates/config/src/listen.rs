//! `listen`: one address, or a list of listeners, each plain or TLS, each
//! optionally behind the PROXY protocol or redirecting to HTTPS.
//!
//! ```toml
//! listen = "127.0.0.1:8080"
//! listen = ["127.0.0.1:8080", { address = "127.0.0.1:8443", tls = true }]
//! ```

use std::net::SocketAddr;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};

use crate::check::bad;
use crate::ConfigError;

/// The most listeners one instance may have.
pub const MAX_LISTENERS: usize = 16;

/// `listen` as written: an address, or a list of addresses and tables.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum RawListen {
    One(String),
    Many(Vec<RawListener>),
}

/// One listener as written (a bare address is a table with only `address`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub address: String,
    /// Unset: TLS when `[tls]` names a certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<bool>,
    #[serde(default)]
    pub proxy_protocol: bool,
    #[serde(default)]
    pub redirect_https: bool,
}

impl RawListener {
    fn plain(address: String) -> Self {
        RawListener {
            address,
            tls: None,
            proxy_protocol: false,
            redirect_https: false,
        }
    }
}

impl<'de> Deserialize<'de> for RawListen {
    /// Through a generic value, so that a wrong entry is named by its
    /// place in the list rather than "did not match any variant".
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let expected = "expected an address (\"IP:PORT\") or a list of addresses and \
                        { address = \"IP:PORT\", tls, proxy_protocol, redirect_https } tables";
        match toml::Value::deserialize(d)? {
            toml::Value::String(s) => Ok(RawListen::One(s)),
            toml::Value::Array(items) => items
                .into_iter()
                .enumerate()
                .map(|(i, item)| match item {
                    toml::Value::String(s) => Ok(RawListener::plain(s)),
                    toml::Value::Table(t) => RawListener::deserialize(toml::Value::Table(t))
                        .map_err(|e| D::Error::custom(format!("listen[{i}]: {}", e.message()))),
                    _ => Err(D::Error::custom(format!("listen[{i}]: {expected}"))),
                })
                .collect::<Result<_, _>>()
                .map(RawListen::Many),
            _ => Err(D::Error::custom(expected)),
        }
    }
}

/// A validated listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Listen {
    pub address: SocketAddr,
    pub tls: bool,
    /// Every connection starts with a PROXY protocol (v1 or v2) header
    /// from a trusted proxy.
    pub proxy_protocol: bool,
    /// Plain HTTP answered with a redirect to the HTTPS listener.
    pub redirect_https: bool,
}

/// For `forkd check-config`: one listener without switches as its address
/// (as it is most often written), several as tables.
pub(crate) fn serialize<S: serde::Serializer>(v: &[Listen], s: S) -> Result<S::Ok, S::Error> {
    match v {
        [one] if !one.proxy_protocol && !one.redirect_https => s.collect_str(&one.address),
        _ => s.collect_seq(v),
    }
}

impl RawListen {
    pub(crate) fn entries(&self) -> Vec<RawListener> {
        match self {
            RawListen::One(s) => vec![RawListener::plain(s.clone())],
            RawListen::Many(v) => v.clone(),
        }
    }

    /// Checks every listener; `has_tls`: `[tls]` names a certificate;
    /// `trusted`: `http.trusted_proxies` is not empty.
    pub(crate) fn validate(
        &self,
        has_tls: bool,
        trusted: bool,
    ) -> Result<Vec<Listen>, ConfigError> {
        let entries = self.entries();
        if entries.is_empty() || entries.len() > MAX_LISTENERS {
            return Err(bad(
                "listen",
                entries.len(),
                &format!("expected 1 to {MAX_LISTENERS} listeners"),
            ));
        }
        let mut out: Vec<Listen> = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            let key = if matches!(self, RawListen::One(_)) {
                "listen".to_owned()
            } else {
                format!("listen[{i}]")
            };
            let address = resolve(&e.address).map_err(|why| bad(&key, &e.address, &why))?;
            let tls = e.tls.unwrap_or(has_tls && !e.redirect_https);
            if tls && !has_tls {
                return Err(bad(
                    &format!("{key}.tls"),
                    true,
                    "a TLS listener needs tls.cert_file and tls.key_file",
                ));
            }
            if e.redirect_https && tls {
                return Err(bad(
                    &format!("{key}.redirect_https"),
                    true,
                    "a redirecting listener speaks plain HTTP: set tls = false",
                ));
            }
            if e.proxy_protocol && !trusted {
                return Err(bad(
                    &format!("{key}.proxy_protocol"),
                    true,
                    "the PROXY protocol is accepted only from http.trusted_proxies, \
                     which is empty",
                ));
            }
            if let Some(same) = out.iter().position(|o| o.address == address) {
                return Err(bad(
                    &key,
                    address,
                    &format!("the same address as listener {same}"),
                ));
            }
            out.push(Listen {
                address,
                tls,
                proxy_protocol: e.proxy_protocol,
                redirect_https: e.redirect_https,
            });
        }
        if out.iter().any(|l| l.redirect_https) && !out.iter().any(|l| l.tls) {
            return Err(bad(
                "listen",
                "redirect_https",
                "a redirecting listener needs a TLS listener to send clients to",
            ));
        }
        if has_tls && !out.iter().any(|l| l.tls) {
            return Err(bad(
                "listen",
                out.len(),
                "[tls] names a certificate but no listener speaks TLS",
            ));
        }
        Ok(out)
    }
}

/// A listen address: `IP:PORT`, or `HOST:PORT` with a host name looked up
/// when the config is read (as `upstream`'s are, so that `localhost` works
/// in both): its first IPv4 address, else its first.
fn resolve(address: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = address.parse::<SocketAddr>() {
        return Ok(a);
    }
    let expected =
        "expected IP:PORT or HOST:PORT, e.g. 127.0.0.1:8080, [::1]:8080 or localhost:8080";
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(expected.into());
    };
    let name_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    let Some(port) = port.parse::<u16>().ok().filter(|_| name_ok) else {
        return Err(expected.into());
    };
    let found: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .map_err(|e| format!("the host name does not resolve: {e}"))?
        .collect();
    found
        .iter()
        .find(|a| a.is_ipv4())
        .or(found.first())
        .copied()
        .ok_or_else(|| "the host name resolves to no address".into())
}

#[cfg(test)]
mod tests {
    use super::resolve;

    /// `listen` takes a host name as `upstream` does (one rule for both):
    /// looked up when the config is read, its IPv4 address first.
    #[test]
    fn listen_takes_localhost_as_upstream_does() {
        assert_eq!(
            resolve("localhost:8080"),
            Ok("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(resolve("[::1]:8080"), Ok("[::1]:8080".parse().unwrap()));
        for (bad, why) in [
            ("no-such-host.invalid:8080", "does not resolve"),
            ("local host:8080", "HOST:PORT"),
            ("localhost:http", "HOST:PORT"),
            ("localhost", "HOST:PORT"),
        ] {
            let e = resolve(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
