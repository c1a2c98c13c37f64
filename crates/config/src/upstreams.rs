//! A route's `upstream`: one server, or a list of them (a pool), each
//! `http://HOST:PORT` (with a path, optionally) or `unix:/PATH.sock`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::check::{bad, count, seconds_in, secs};
use crate::ConfigError;

/// A route's `health` table as written: a request every server of the
/// pool must answer 2xx to stay in (off without a path).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHealth {
    pub path: String,
    pub interval: f64,
    pub timeout: f64,
    pub fails: i64,
    pub passes: i64,
}

impl Default for RawHealth {
    fn default() -> Self {
        RawHealth {
            path: String::new(),
            interval: 5.0,
            timeout: 2.0,
            fails: 2,
            passes: 2,
        }
    }
}

/// The active health check of a route's servers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Health {
    /// Asked of each server as written ('/', then no space or control).
    pub path: String,
    #[serde(serialize_with = "secs")]
    pub interval: Duration,
    #[serde(serialize_with = "secs")]
    pub timeout: Duration,
    /// Failed checks in a row that take a server out.
    pub fails: u32,
    /// Passed checks in a row that bring it back.
    pub passes: u32,
}

impl RawHealth {
    /// None when off (no path).
    pub(crate) fn validate(&self, key: &str) -> Result<Option<Health>, ConfigError> {
        if self.path.is_empty() {
            return Ok(None);
        }
        let k = |name: &str| format!("{key}.{name}");
        if !self.path.starts_with('/')
            || self.path.len() > 256
            || !self.path.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(bad(
                &k("path"),
                &self.path,
                "expected a path such as \"/healthz\" ('/', then no space or control character, at most 256 bytes)",
            ));
        }
        Ok(Some(Health {
            path: self.path.clone(),
            interval: seconds_in(&k("interval"), self.interval, 0.05, 3600.0)?,
            timeout: seconds_in(&k("timeout"), self.timeout, 0.05, 60.0)?,
            fails: count(&k("fails"), self.fails, 1, 100)?,
            passes: count(&k("passes"), self.passes, 1, 100)?,
        }))
    }
}

/// A route's `upstream_tls` table as written: how its `https://` servers
/// are checked, and the certificate forkd shows them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawUpstreamTls {
    pub ca_file: String,
    pub server_name: String,
    pub cert_file: String,
    pub key_file: String,
}

/// How a route's `https://` servers are reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// PEM certificates of the authorities trusted (None: the system's).
    pub ca_file: Option<std::path::PathBuf>,
    /// The name every server's certificate must have, sent by SNI (None:
    /// each server's host).
    pub server_name: Option<String>,
    /// forkd's client certificate (then its chain) and key, if asked.
    pub client: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// Written back with the keys it was read from.
impl Serialize for UpstreamTls {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        if let Some(f) = &self.ca_file {
            m.serialize_entry("ca_file", f)?;
        }
        if let Some(n) = &self.server_name {
            m.serialize_entry("server_name", n)?;
        }
        if let Some((c, k)) = &self.client {
            m.serialize_entry("cert_file", c)?;
            m.serialize_entry("key_file", k)?;
        }
        m.end()
    }
}

impl RawUpstreamTls {
    /// Some when a server is `https://`; a table set for none is refused.
    pub(crate) fn validate(
        &self,
        key: &str,
        servers: &Upstreams,
    ) -> Result<Option<UpstreamTls>, ConfigError> {
        let any_tls = servers
            .0
            .iter()
            .any(|u| matches!(u, Upstream::Tcp { tls: true, .. }));
        let set = !(self.ca_file.is_empty()
            && self.server_name.is_empty()
            && self.cert_file.is_empty()
            && self.key_file.is_empty());
        if !any_tls {
            return if set {
                Err(bad(
                    key,
                    "a table",
                    "upstream_tls is for https:// servers, and this route has none",
                ))
            } else {
                Ok(None)
            };
        }
        let path = |s: &str| (!s.is_empty()).then(|| std::path::PathBuf::from(s));
        let client = match (path(&self.cert_file), path(&self.key_file)) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(bad(
                    &format!("{key}.cert_file"),
                    &self.cert_file,
                    "expected cert_file and key_file together",
                ))
            }
        };
        let name = &self.server_name;
        if !name.is_empty()
            && (name.len() > 253
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:".contains(&b)))
        {
            return Err(bad(
                &format!("{key}.server_name"),
                name,
                "expected a DNS name or an IP address (no brackets)",
            ));
        }
        Ok(Some(UpstreamTls {
            ca_file: path(&self.ca_file),
            server_name: path(name).map(|_| name.clone()),
            client,
        }))
    }
}

/// The most servers one route's pool holds.
pub const MAX_UPSTREAMS: usize = 32;

/// Where a route's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// `http://HOST:PORT`, with a path every forwarded path is put under
    /// ("" for none; else '/' and segments, no trailing '/').
    /// With `tls`, `https://`.
    Tcp {
        addr: String,
        path: String,
        tls: bool,
    },
    /// An absolute socket path.
    Unix(std::path::PathBuf),
}

impl Upstream {
    /// `http://HOST:PORT`, with no path.
    pub fn tcp(addr: impl Into<String>) -> Upstream {
        Upstream::Tcp {
            addr: addr.into(),
            path: String::new(),
            tls: false,
        }
    }

    /// What a request to it names as its authority (and `Host` when the
    /// client sent none): `HOST:PORT`, or "localhost" for a unix socket.
    pub fn authority(&self) -> &str {
        match self {
            Upstream::Tcp { addr, .. } => addr,
            Upstream::Unix(_) => "localhost",
        }
    }

    /// The path the forwarded paths go under ("" for none).
    pub fn path(&self) -> &str {
        match self {
            Upstream::Tcp { path, .. } => path,
            Upstream::Unix(_) => "",
        }
    }
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Upstream::Tcp { addr, path, tls } => {
                let scheme = if *tls { "https" } else { "http" };
                write!(f, "{scheme}://{addr}{path}")
            }
            Upstream::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Serialize for Upstream {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `upstream` as written: a string, or a list of strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawUpstreams {
    One(String),
    Many(Vec<String>),
}

impl Default for RawUpstreams {
    fn default() -> Self {
        RawUpstreams::One(String::new())
    }
}

impl Serialize for RawUpstreams {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RawUpstreams::One(u) => u.serialize(s),
            RawUpstreams::Many(list) => list.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for RawUpstreams {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Written;
        impl<'de> serde::de::Visitor<'de> for Written {
            type Value = RawUpstreams;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a server (\"http://HOST:PORT\") or a list of servers")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawUpstreams, E> {
                Ok(RawUpstreams::One(v.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawUpstreams, A::Error> {
                let mut list = Vec::new();
                while let Some(u) = seq.next_element::<String>()? {
                    list.push(u);
                }
                Ok(RawUpstreams::Many(list))
            }
        }
        d.deserialize_any(Written)
    }
}

impl RawUpstreams {
    /// Every server checked; a list holds 1 to [`MAX_UPSTREAMS`], none
    /// twice.
    pub(crate) fn validate(&self, key: &str) -> Result<Upstreams, ConfigError> {
        let list = match self {
            RawUpstreams::One(u) => vec![upstream(key, u)?],
            RawUpstreams::Many(written) => {
                if written.is_empty() || written.len() > MAX_UPSTREAMS {
                    return Err(bad(
                        key,
                        format!("a list of {}", written.len()),
                        &format!("expected 1 to {MAX_UPSTREAMS} servers"),
                    ));
                }
                let mut list: Vec<Upstream> = Vec::with_capacity(written.len());
                for (i, w) in written.iter().enumerate() {
                    let u = upstream(&format!("{key}[{i}]"), w)?;
                    if list.contains(&u) {
                        return Err(bad(&format!("{key}[{i}]"), w, "expected each server once"));
                    }
                    if list.first().is_some_and(|f| f.path() != u.path()) {
                        return Err(bad(
                            &format!("{key}[{i}]"),
                            w,
                            "expected the same path on every server of the list (the path the forwarded paths go under)",
                        ));
                    }
                    list.push(u);
                }
                list
            }
        };
        Ok(Upstreams(list))
    }
}

/// A route's servers: at least one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstreams(pub Vec<Upstream>);

impl Upstreams {
    /// The first (the one of a route that has one).
    pub fn first(&self) -> &Upstream {
        &self.0[0]
    }
}

/// One server as a string, several as a list, as they can be written.
impl Serialize for Upstreams {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0[..] {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }
}

/// `http://a:1`, or `http://a:1, http://b:2` for a pool.
impl std::fmt::Display for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, u) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{u}")?;
        }
        Ok(())
    }
}

fn upstream(key: &str, raw: &str) -> Result<Upstream, ConfigError> {
    if let Some(path) = raw.strip_prefix("unix:") {
        let path = std::path::Path::new(path);
        if path.is_absolute() && path.as_os_str().len() < 108 {
            return Ok(Upstream::Unix(path.to_owned()));
        }
        return Err(bad(
            key,
            raw,
            "expected unix:/ABSOLUTE/PATH.sock (under 108 bytes)",
        ));
    }
    let (tls, rest) = match (raw.strip_prefix("http://"), raw.strip_prefix("https://")) {
        (Some(rest), _) => (false, rest),
        (None, Some(rest)) => (true, rest),
        (None, None) => (false, ""),
    };
    let (addr, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, port) = addr.rsplit_once(':').unwrap_or((addr, ""));
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        }
    };
    // The path: as a route's prefix is written (plain path characters, no
    // dot or empty segment, no escape), so it is what the upstream reads.
    let path = path.trim_end_matches('/');
    let path_ok = path.is_empty()
        || path.len() <= 256
            && path
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/-._~!$&'()*+,;=:@".contains(&b))
            && path[1..]
                .split('/')
                .all(|s| !s.is_empty() && s != "." && s != "..");
    if host_ok && port.parse::<u16>().is_ok_and(|p| p > 0) && path_ok {
        Ok(Upstream::Tcp {
            addr: addr.to_owned(),
            path: path.to_owned(),
            tls,
        })
    } else {
        Err(bad(
            key,
            raw,
            "expected http://HOST:PORT or https://HOST:PORT, optionally with a path (\"http://127.0.0.1:9000/v2\": segments of letters, digits and -._~!$&'()*+,;=:@, no '.' or '..' segment, no %, no query), or unix:/PATH.sock",
        ))
    }
}
