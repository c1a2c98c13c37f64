//! The routes of one worker, longest prefix first, each with its pooled
//! clients (connected on first use).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::header::HeaderName;

use super::members::Members;
use crate::{
    Host, PolicyKey, ProfileSettings, Proxy, RouteAuth, RouteCache, RoutePolicy, RouteSettings,
    Upstream,
};

use crate::refusal::{Problem, Refusal};

/// The built-in policy of the `/profile` route (`[rate_limit.profile]`).
pub(crate) const PROFILE_POLICY: &str = "profile";

/// The largest profile kept (an origin's answer is at most 64 KiB).
const PROFILE_MAX_BYTES: u64 = 64 * 1024;

/// One route of this worker, with its clients.
pub(crate) struct Route {
    pub(crate) cfg: RouteSettings,
    /// The `Host` for a request without one, and the URI authority.
    pub(crate) authority: String,
    /// Its servers, with their pooled clients (shared with a write's
    /// detached task).
    pub(crate) members: Arc<Members>,
    /// `RateLimit-Policy` of its policies (None without any).
    pub(crate) policy_header: Option<hyper::header::HeaderValue>,
    /// The cache specs this worker has seen for the route's URLs.
    pub(crate) specs: Specs,
    /// The prefix as lenient servers read it (see [`lenient`]).
    lenient_prefix: String,
    /// Who counts an answer's body that breaks off (made on first use).
    watch: std::sync::OnceLock<std::sync::Arc<crate::body::UpstreamBody>>,
    /// The answer comes from forkd itself, not from the upstream.
    pub(crate) builtin: Option<Builtin>,
    /// What `/metrics` counts the route's requests under.
    pub(crate) label: crate::metrics::Label,
    /// Its place in the configuration (None for a built-in route).
    pub(crate) index: Option<usize>,
    /// The cache fill's single-flight lock: how long its holder keeps it,
    /// and how long the others wait for the answer.
    pub(crate) fill_lock: (Duration, Duration),
}

/// A route whose upstream is a responder of forkd's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Builtin {
    /// `GET /profile` (`crate::responders::profile`).
    Profile,
}

/// Every route of this worker, longest prefix first.
pub(crate) struct Routes {
    routes: Vec<Route>,
    /// `/profile`: a session required, the policy `profile`, and
    /// `profile.origin` as its upstream (or none).
    pub(crate) profile: Route,
    /// The identity headers: user, role, session.
    pub(crate) names: [HeaderName; 3],
}

impl Routes {
    /// The clients are made here but connect on first use.
    pub(crate) fn new(routes: &[RouteSettings], proxy: &Proxy, profile: &ProfileSettings) -> Self {
        let mut routes: Vec<Route> = routes
            .iter()
            .enumerate()
            .map(|(i, r)| Route {
                label: crate::metrics::label(i),
                index: Some(i),
                ..Route::new(r, proxy)
            })
            .collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.cfg.prefix.len()));
        let settings = profile;
        let profile = RouteSettings {
            prefix: "/profile".into(),
            upstream: profile
                .origin
                .clone()
                .map(Upstream::tcp)
                .into_iter()
                .collect(),
            fail_timeout: Duration::from_secs(10),
            health: None,
            upstream_tls: None,
            auth: RouteAuth::Required,
            strip_prefix: false,
            connect_timeout: profile.origin_timeout,
            timeout: profile.origin_timeout,
            pass_authorization: false,
            policies: vec![RoutePolicy {
                name: PROFILE_POLICY.into(),
                policy: profile.limit,
                key: PolicyKey::User,
            }],
            cache: Some(RouteCache {
                max_ttl: profile.cache_ttl,
                max_bytes: PROFILE_MAX_BYTES,
            }),
        };
        let profile = Route {
            builtin: Some(Builtin::Profile),
            label: crate::metrics::builtin("profile"),
            fill_lock: (settings.lock_timeout, settings.lock_wait),
            ..Route::new(&profile, proxy)
        };
        Routes {
            routes,
            profile,
            // Names the configuration validated (letters, digits, '-').
            names: [
                &proxy.user_header,
                &proxy.role_header,
                &proxy.session_header,
            ]
            .map(|n| {
                HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes())
                    .expect("a validated header name")
            }),
        }
    }

    /// Starts the active health checks of the routes that have them, on
    /// this (the worker's) runtime.
    pub(crate) fn spawn_health_checks(&self) {
        for r in &self.routes {
            r.members.spawn_checks();
        }
    }

    /// The route that takes `path`, if any.
    pub(crate) fn find(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| matches(&r.cfg.prefix, path))
    }

    /// Whether an app that reads `path` the usual lenient way (escaped
    /// letters and digits decoded, `;params` dropped, `//` and dot
    /// segments resolved) would
    /// read a path of another route than the one forkd matches: such a
    /// request could skip its route's session check or policies.
    /// forkd's own `/profile` counts as a route too: its origin may be the
    /// app behind an open route.
    pub(crate) fn crosses_routes(&self, path: &str) -> bool {
        if read_alike(path) {
            return false;
        }
        let lenient = lenient(path);
        if lenient == path {
            return false;
        }
        let read_by_app = self
            .routes
            .iter()
            .find(|r| matches(&r.lenient_prefix, &lenient))
            .map(|r| r.cfg.prefix.as_str());
        let read_by_forkd = self.find(path).map(|r| r.cfg.prefix.as_str());
        read_by_app != read_by_forkd || lenient == self.profile.cfg.prefix
    }
}

/// Whether `path` (which starts with '/') has nothing a lenient reading
/// changes: no escape, no `;`, no empty or dot segment. Most paths, so
/// they are answered without building the lenient reading.
fn read_alike(path: &str) -> bool {
    !path.contains(['%', ';']) && !path.contains("//") && !path.contains("/.")
}

/// `path` as lenient servers read it: `%XX` escapes of letters, digits
/// and `-._~` decoded, each segment cut at its first `;` (a path
/// parameter), then empty and dot segments resolved (`/x/..;/api` is
/// `/api` to them).
fn lenient(path: &str) -> String {
    let b = path.as_bytes();
    let mut decoded = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                    decoded.push(c);
                    i += 3;
                    continue;
                }
            }
        }
        decoded.push(b[i]);
        i += 1;
    }
    let decoded = String::from_utf8_lossy(&decoded);
    let mut segments: Vec<&str> = Vec::new();
    for s in decoded
        .split('/')
        .map(|s| s.split(';').next().unwrap_or(""))
    {
        match s {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = format!("/{}", segments.join("/"));
    if path.ends_with('/') && out.len() > 1 {
        out.push('/');
    }
    out
}

/// The prefix itself, or below it at a segment boundary.
fn matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

impl Route {
    fn new(cfg: &RouteSettings, proxy: &Proxy) -> Self {
        let authority = cfg
            .upstream
            .first()
            .map_or("localhost", Upstream::authority)
            .to_owned();
        let policies: Vec<String> = cfg
            .policies
            .iter()
            .map(|p| crate::response::policy_item(&p.name, p.policy))
            .collect();
        Route {
            policy_header: crate::response::header(&policies),
            specs: Specs::default(),
            lenient_prefix: lenient(&cfg.prefix),
            cfg: cfg.clone(),
            authority,
            members: Arc::new(Members::new(cfg, proxy)),
            watch: std::sync::OnceLock::new(),
            builtin: None,
            label: crate::metrics::builtin("other"),
            index: None,
            // The fill may take `timeout` for the answer's head and as
            // long again for its body; the lock is released when it ends.
            fill_lock: (
                cfg.timeout * 2 + Duration::from_secs(1),
                cfg.timeout.min(Duration::from_secs(3)),
            ),
        }
    }

    /// What the route's cache keys an answer by: the path and query, or
    /// for a built-in responder, which reads no query, the path alone (so
    /// that `/profile?x=1`, `?x=2`, ... are one entry, one load).
    pub(crate) fn cache_target<'a>(&self, uri: &'a hyper::Uri) -> &'a str {
        match self.builtin {
            Some(_) => uri.path(),
            None => uri.path_and_query().map_or("/", |p| p.as_str()),
        }
    }

    /// 502 for the upstream's own failure (`cause`, for the log), counted.
    pub(crate) fn bad_gateway(
        &self,
        host: &Arc<dyn Host>,
        cause: &str,
        detail: &'static str,
    ) -> Refusal {
        self.watch(host).failed(false, &cause);
        Refusal::new(Problem::BadGateway, detail)
    }

    /// 504 for an upstream that outlasted the route's timeout, counted and
    /// logged.
    pub(crate) fn gateway_timeout(
        &self,
        host: &Arc<dyn Host>,
        cause: &str,
        detail: &'static str,
    ) -> Refusal {
        self.watch(host).failed(true, &cause);
        Refusal::new(Problem::GatewayTimeout, detail)
    }

    /// The watch on this route's answer bodies.
    pub(crate) fn watch(
        &self,
        host: &std::sync::Arc<dyn crate::Host>,
    ) -> std::sync::Arc<crate::body::UpstreamBody> {
        self.watch
            .get_or_init(|| {
                std::sync::Arc::new(crate::body::UpstreamBody {
                    host: host.clone(),
                    prefix: self.cfg.prefix.clone(),
                    upstream: match &self.cfg.upstream[..] {
                        [] => "none".into(),
                        list => list
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                    },
                    warnings: Default::default(),
                })
            })
            .clone()
    }
}

/// The specs this worker has seen, so that a hit is one call: a URL's spec
/// names the headers its variants differ by.
#[derive(Default)]
pub(crate) struct Specs(Mutex<HashMap<String, String>>);

const MAX_SPECS: usize = 10_000;

impl Specs {
    pub(crate) fn get(&self, url: &str) -> String {
        let m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.get(url).cloned().unwrap_or_default()
    }

    pub(crate) fn set(&self, url: &str, spec: &str) {
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if m.len() >= MAX_SPECS {
            m.clear();
        }
        m.insert(url.to_owned(), spec.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_at_segment_boundaries() {
        assert!(matches("/api", "/api"));
        assert!(matches("/api", "/api/x"));
        assert!(!matches("/api", "/apix"));
        assert!(matches("/", "/anything"));
    }

    #[test]
    fn lenient_reading_decodes_merges_and_cuts() {
        assert_eq!(lenient("/%61pi/x"), "/api/x");
        assert_eq!(lenient("//api//x"), "/api/x");
        assert_eq!(lenient("/api;x/secret"), "/api/secret");
        assert_eq!(lenient("/x/..;/api/y"), "/api/y");
        assert_eq!(lenient("/../../api"), "/api");
        assert_eq!(lenient("/api/x/"), "/api/x/");
        assert_eq!(lenient("/a%20b/%2"), "/a%20b/%2");
        assert_eq!(lenient("/%7e%2D"), "/~-");
        assert_eq!(lenient("/"), "/");
        assert_eq!(lenient("%"), "/%");
    }

    #[test]
    fn paths_read_alike_are_their_own_lenient_reading() {
        for p in ["/", "/api", "/api/x/", "/a-b_c~d/e.f", "/v1/items?x=%2F"] {
            let path = p.split('?').next().unwrap();
            assert!(read_alike(path), "{p}");
            assert_eq!(lenient(path), path);
        }
        for p in ["/%61", "/a;b", "//a", "/a/./b", "/a/../b", "/.x"] {
            assert!(!read_alike(p), "{p}");
        }
    }
}
