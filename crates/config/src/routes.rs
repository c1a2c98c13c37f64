//! `[[route]]` tables (a path prefix forwarded to an upstream service) and
//! the `[proxy]` table (what every route shares): as written, validated.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::check::{seconds_in, secs};
use crate::upstreams::{Health, RawHealth, RawUpstreamTls, RawUpstreams, UpstreamTls, Upstreams};
use crate::ConfigError;

/// Paths forkd answers itself; a route cannot take them.
pub const BUILT_IN_PATHS: &[&str] = &[
    "/healthz", "/readyz", "/metrics", "/login", "/logout", "/profile",
];

/// Who may use a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteAuth {
    /// A valid session, else 401 (the default).
    Required,
    /// The identity is passed on when there is a valid session; a missing
    /// token passes anonymously, an invalid one gets 401.
    Optional,
    /// Never looked at; the identity headers are only removed.
    None,
}

/// One `[[route]]` as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRoute {
    pub prefix: String,
    pub upstream: RawUpstreams,
    pub auth: RouteAuth,
    pub strip_prefix: bool,
    pub connect_timeout: f64,
    pub timeout: f64,
    pub pass_authorization: bool,
    pub policies: Vec<String>,
    pub cache: bool,
    pub cache_max_ttl: f64,
    pub cache_max_bytes: i64,
    pub fail_timeout: f64,
    pub health: RawHealth,
    pub upstream_tls: RawUpstreamTls,
}

impl Default for RawRoute {
    fn default() -> Self {
        RawRoute {
            prefix: String::new(),
            upstream: RawUpstreams::default(),
            auth: RouteAuth::Required,
            strip_prefix: false,
            connect_timeout: 2.0,
            timeout: 30.0,
            pass_authorization: false,
            policies: Vec::new(),
            cache: false,
            cache_max_ttl: 300.0,
            cache_max_bytes: 1024 * 1024,
            fail_timeout: 10.0,
            health: RawHealth::default(),
            upstream_tls: RawUpstreamTls::default(),
        }
    }
}

/// The `[proxy]` table as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawProxy {
    pub user_header: String,
    pub role_header: String,
    pub session_header: String,
    pub max_idle_per_upstream: i64,
    pub idle_timeout: f64,
    pub forward_auth_path: String,
}

impl Default for RawProxy {
    fn default() -> Self {
        RawProxy {
            user_header: "X-Forkd-User".into(),
            role_header: "X-Forkd-Role".into(),
            session_header: "X-Forkd-Session".into(),
            max_idle_per_upstream: 256,
            idle_timeout: 60.0,
            forward_auth_path: "/auth".into(),
        }
    }
}

/// A validated route.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Route {
    /// Starts with '/', no trailing '/' (but "/" itself).
    pub prefix: String,
    /// One server or more (a pool).
    pub upstream: Upstreams,
    pub auth: RouteAuth,
    pub strip_prefix: bool,
    #[serde(serialize_with = "secs")]
    pub connect_timeout: Duration,
    #[serde(serialize_with = "secs")]
    pub timeout: Duration,
    pub pass_authorization: bool,
    /// Names of `[rate_limit.policy.NAME]` tables.
    pub policies: Vec<String>,
    /// Keep GET answers the upstream allows to be kept.
    pub cache: bool,
    #[serde(serialize_with = "secs")]
    pub cache_max_ttl: Duration,
    pub cache_max_bytes: u64,
    /// How long a server of the pool that failed is passed over.
    #[serde(serialize_with = "secs")]
    pub fail_timeout: Duration,
    /// The active health check of its servers, when on.
    pub health: Option<Health>,
    /// How its `https://` servers are reached (Some when it has one).
    pub upstream_tls: Option<UpstreamTls>,
}

impl Route {
    /// Whether this route takes `path`: the prefix itself, or below it at
    /// a segment boundary ("/api" takes "/api" and "/api/x", not "/apix").
    pub fn matches(&self, path: &str) -> bool {
        self.prefix == "/"
            || path
                .strip_prefix(self.prefix.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }
}

/// The validated `[proxy]` table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Proxy {
    pub user_header: String,
    pub role_header: String,
    pub session_header: String,
    pub max_idle_per_upstream: usize,
    #[serde(serialize_with = "secs")]
    pub idle_timeout: Duration,
    /// "" when off.
    pub forward_auth_path: String,
}

fn bad(key: String, value: impl ToString, expected: &str) -> ConfigError {
    ConfigError::Value {
        key,
        origin: String::new(),
        value: value.to_string(),
        expected: expected.to_owned(),
    }
}

/// A prefix of plain path characters, with no dot segment, no empty
/// segment and no percent escape: what a route matches is then what the
/// upstream sees, however it decodes.
fn prefix(key: String, raw: &str) -> Result<String, ConfigError> {
    let p = if raw.len() > 1 {
        raw.trim_end_matches('/')
    } else {
        raw
    };
    let chars_ok = p
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/-._~!$&'()*+,;=:@".contains(&b));
    // Sliced only once known to be ASCII and to start with '/' ("", "//"
    // and "é" are refused, not a panic).
    let segments_ok = p == "/"
        || chars_ok
            && p.starts_with('/')
            && p[1..]
                .split('/')
                .all(|s| !s.is_empty() && s != "." && s != "..");
    if !p.starts_with('/') || !chars_ok || !segments_ok || p.len() > 256 {
        return Err(bad(
            key,
            raw,
            "expected a path prefix such as \"/api\": '/' then segments of letters, digits and -._~!$&'()*+,;=:@, no '.' or '..' segment, no %",
        ));
    }
    if let Some(b) = BUILT_IN_PATHS.iter().find(|b| p == **b) {
        return Err(bad(
            key,
            raw,
            &format!("{b} is answered by forkd itself; choose another prefix"),
        ));
    }
    Ok(p.to_owned())
}

impl RawRoute {
    fn validate(&self, i: usize) -> Result<Route, ConfigError> {
        let key = |k: &str| format!("route[{i}].{k}");
        let upstream = self.upstream.validate(&key("upstream"))?;
        Ok(Route {
            upstream_tls: self
                .upstream_tls
                .validate(&key("upstream_tls"), &upstream)?,
            prefix: prefix(key("prefix"), &self.prefix)?,
            upstream,
            auth: self.auth,
            strip_prefix: self.strip_prefix,
            connect_timeout: seconds_in(
                &key("connect_timeout"),
                self.connect_timeout,
                0.001,
                60.0,
            )?,
            timeout: seconds_in(&key("timeout"), self.timeout, 0.001, 3600.0)?,
            fail_timeout: seconds_in(&key("fail_timeout"), self.fail_timeout, 0.001, 3600.0)?,
            health: self.health.validate(&key("health"))?,
            pass_authorization: self.pass_authorization,
            policies: self.policies.clone(),
            cache: self.cache,
            cache_max_ttl: seconds_in(&key("cache_max_ttl"), self.cache_max_ttl, 1.0, 86_400.0)?,
            cache_max_bytes: if (1..=64 * 1024 * 1024).contains(&self.cache_max_bytes) {
                self.cache_max_bytes as u64
            } else {
                return Err(bad(
                    key("cache_max_bytes"),
                    self.cache_max_bytes,
                    "expected 1 to 67108864 bytes",
                ));
            },
        })
    }
}

/// Every route, checked, with no prefix twice, none on forkd's
/// forward-auth path, and policies that exist.
pub(crate) fn validate_routes(
    raw: &[RawRoute],
    proxy: &Proxy,
    policies: &BTreeMap<String, NamedPolicy>,
) -> Result<Vec<Route>, ConfigError> {
    let mut routes: Vec<Route> = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let route = r.validate(i)?;
        for (k, name) in route.policies.iter().enumerate() {
            let key = format!("route[{i}].policies");
            if !policies.contains_key(name) {
                return Err(bad(key, name, "no [rate_limit.policy] table of that name"));
            }
            if route.policies[..k].contains(name) {
                return Err(bad(key, name, "named twice"));
            }
        }
        if route.policies.len() > 8 {
            return Err(bad(
                format!("route[{i}].policies"),
                route.policies.len(),
                "expected at most 8 policies",
            ));
        }
        if route.prefix == proxy.forward_auth_path {
            return Err(bad(
                format!("route[{i}].prefix"),
                &route.prefix,
                "that is proxy.forward_auth_path, answered by forkd itself",
            ));
        }
        if let Some(j) = routes.iter().position(|o| o.prefix == route.prefix) {
            return Err(bad(
                format!("route[{i}].prefix"),
                &route.prefix,
                &format!("route[{j}] has the same prefix"),
            ));
        }
        routes.push(route);
    }
    Ok(routes)
}

/// Header names forkd sets or removes itself.
const RESERVED: &[&str] = &[
    "host",
    "authorization",
    "connection",
    "upgrade",
    "content-length",
    "transfer-encoding",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
    "cookie",
    "x-request-id",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
];

fn header_name(key: &str, v: &str) -> Result<String, ConfigError> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !RESERVED.contains(&v.to_ascii_lowercase().as_str());
    if ok {
        Ok(v.to_owned())
    } else {
        Err(bad(
            key.to_owned(),
            v,
            "expected a header name of letters, digits and '-', not one forkd sets itself",
        ))
    }
}

impl RawProxy {
    pub(crate) fn validate(&self) -> Result<Proxy, ConfigError> {
        let proxy = Proxy {
            user_header: header_name("proxy.user_header", &self.user_header)?,
            role_header: header_name("proxy.role_header", &self.role_header)?,
            session_header: header_name("proxy.session_header", &self.session_header)?,
            max_idle_per_upstream: if (0..=1024).contains(&self.max_idle_per_upstream) {
                self.max_idle_per_upstream as usize
            } else {
                return Err(bad(
                    "proxy.max_idle_per_upstream".into(),
                    self.max_idle_per_upstream,
                    "expected 0 to 1024",
                ));
            },
            idle_timeout: seconds_in("proxy.idle_timeout", self.idle_timeout, 0.1, 3600.0)?,
            forward_auth_path: match self.forward_auth_path.as_str() {
                "" => String::new(),
                p => prefix("proxy.forward_auth_path".into(), p)?,
            },
        };
        let names = [
            &proxy.user_header,
            &proxy.role_header,
            &proxy.session_header,
        ]
        .map(|h| h.to_ascii_lowercase());
        if names[0] == names[1] || names[0] == names[2] || names[1] == names[2] {
            return Err(bad(
                "proxy.session_header".into(),
                &proxy.session_header,
                "the user, role and session headers must differ",
            ));
        }
        Ok(proxy)
    }
}

/// What a `[rate_limit.policy.NAME]` counts per.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyKey {
    /// The session's user; the client address on an anonymous request.
    User,
    /// The client address (as the login limits see it).
    Client,
    /// The user on this route alone.
    UserRoute,
    /// The value of a request header (lower-case name); the client
    /// address when it is missing.
    Header(String),
}

impl std::fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicyKey::User => f.write_str("user"),
            PolicyKey::Client => f.write_str("client"),
            PolicyKey::UserRoute => f.write_str("user+route"),
            PolicyKey::Header(h) => write!(f, "header:{h}"),
        }
    }
}

impl Serialize for PolicyKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One `[rate_limit.policy.NAME]` as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawNamedPolicy {
    pub limit: i64,
    pub window: f64,
    pub key: String,
    pub lease: i64,
}

impl Default for RawNamedPolicy {
    fn default() -> Self {
        RawNamedPolicy {
            limit: 60,
            window: 60.0,
            key: "user".into(),
            lease: 1,
        }
    }
}

/// A validated named policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NamedPolicy {
    pub limit: u64,
    #[serde(serialize_with = "secs")]
    pub window: Duration,
    pub key: PolicyKey,
    /// Cells a worker takes from Redis at once and spends itself (1:
    /// exact, one call a request).
    pub lease: u32,
}

/// The names of the built-in policies: the login limits (set by `[auth]`
/// `login_*`) and `/profile`'s (`[rate_limit.profile]`). `forkd limit`
/// knows them; no `[rate_limit.policy]` may take them.
pub const BUILTIN_POLICIES: [&str; 4] = ["login-ip", "login-user", "login-user-all", "profile"];

/// A policy's `lease`: 1 (exact) to 10000, and no more than its limit.
pub(crate) fn lease(key: &str, lease: i64, limit: i64) -> Result<u32, ConfigError> {
    if (1..=10_000).contains(&lease) && lease <= limit {
        Ok(lease as u32)
    } else {
        Err(bad(
            key.to_owned(),
            lease,
            "expected 1 (exact) to 10000 cells, and no more than the limit",
        ))
    }
}

/// Every `[rate_limit.policy.NAME]`, checked.
pub(crate) fn validate_policies(
    raw: &BTreeMap<String, RawNamedPolicy>,
) -> Result<BTreeMap<String, NamedPolicy>, ConfigError> {
    let mut out = BTreeMap::new();
    for (name, p) in raw {
        let at = |k: &str| format!("rate_limit.policy.{name}.{k}");
        let name_ok = (1..=32).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !name_ok {
            return Err(bad(
                format!("rate_limit.policy.{name}"),
                name,
                "expected a name of 1 to 32 lower-case letters, digits, '_' or '-'",
            ));
        }
        if BUILTIN_POLICIES.contains(&name.as_str()) {
            return Err(bad(
                format!("rate_limit.policy.{name}"),
                name,
                "the name of a built-in policy (set the login limits in [auth], /profile's in [rate_limit.profile])",
            ));
        }
        if !(1..=1_000_000_000).contains(&p.limit) {
            return Err(bad(at("limit"), p.limit, "expected 1 to 1000000000"));
        }
        let key = match p.key.as_str() {
            "user" => PolicyKey::User,
            "client" => PolicyKey::Client,
            "user+route" => PolicyKey::UserRoute,
            k => match k.strip_prefix("header:") {
                Some(h)
                    if !h.is_empty()
                        && h.len() <= 64
                        && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') =>
                {
                    PolicyKey::Header(h.to_ascii_lowercase())
                }
                _ => {
                    return Err(bad(
                        at("key"),
                        k,
                        "expected \"user\", \"client\", \"user+route\" or \"header:NAME\"",
                    ))
                }
            },
        };
        out.insert(
            name.clone(),
            NamedPolicy {
                limit: p.limit as u64,
                window: seconds_in(&at("window"), p.window, 0.001, 86_400.0)?,
                key,
                lease: lease(&at("lease"), p.lease, p.limit)?,
            },
        );
    }
    Ok(out)
}
