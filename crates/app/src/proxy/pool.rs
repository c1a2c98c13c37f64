//! The routes of one worker, longest prefix first, each with its pooled
//! clients (connected on first use).

use std::collections::HashMap;
use std::sync::Mutex;

use hyper::header::HeaderName;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::connect::Connector;
use crate::body::Body;
use crate::{
    PolicyBucket, ProfileSettings, ProxySettings, RouteAuth, RoutePolicy, RouteSettings,
    UpstreamAddr,
};

pub(crate) type Pool = Client<Connector, Body>;

/// One route of this worker, with its clients.
pub(crate) struct Route {
    pub(crate) cfg: RouteSettings,
    /// The `Host` for a request without one, and the URI authority.
    pub(crate) authority: String,
    /// For idempotent methods: a request that was never sent (its pooled
    /// connection had closed) is retried on another connection.
    pub(crate) retrying: Pool,
    /// For the others: never retried.
    pub(crate) once: Pool,
    /// `RateLimit-Policy` of its policies (None without any).
    pub(crate) policy_header: Option<hyper::header::HeaderValue>,
    /// The cache specs this worker has seen for the route's URLs.
    pub(crate) specs: Specs,
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
    pub(crate) fn new(
        routes: &[RouteSettings],
        proxy: &ProxySettings,
        profile: &ProfileSettings,
    ) -> Self {
        let mut routes: Vec<Route> = routes.iter().map(|r| Route::new(r, proxy)).collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.cfg.prefix.len()));
        let profile = RouteSettings {
            prefix: "/profile".into(),
            upstream: profile
                .origin
                .clone()
                .map_or(UpstreamAddr::None, UpstreamAddr::Tcp),
            auth: RouteAuth::Required,
            strip_prefix: false,
            connect_timeout: profile.origin_timeout,
            timeout: profile.origin_timeout,
            pass_authorization: false,
            policies: vec![RoutePolicy {
                name: crate::buckets::PROFILE.into(),
                policy: profile.limit,
                key: PolicyBucket::User,
            }],
            cache: None,
        };
        Routes {
            routes,
            profile: Route::new(&profile, proxy),
            names: [
                proxy.user_header.clone(),
                proxy.role_header.clone(),
                proxy.session_header.clone(),
            ],
        }
    }

    /// The route that takes `path`, if any.
    pub(crate) fn find(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| matches(&r.cfg.prefix, path))
    }
}

/// The prefix itself, or below it at a segment boundary.
fn matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

impl Route {
    fn new(cfg: &RouteSettings, proxy: &ProxySettings) -> Self {
        let authority = match &cfg.upstream {
            UpstreamAddr::Tcp(a) => a.clone(),
            UpstreamAddr::Unix(_) | UpstreamAddr::None => "localhost".to_owned(),
        };
        let pool = |retry: bool| {
            Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(proxy.idle_timeout)
                .pool_max_idle_per_host(proxy.max_idle_per_upstream)
                .retry_canceled_requests(retry)
                .set_host(false)
                .build(Connector::new(cfg.upstream.clone(), cfg.connect_timeout))
        };
        let policies: Vec<String> = cfg
            .policies
            .iter()
            .map(|p| {
                format!(
                    "\"{}\";q={};w={}",
                    p.name,
                    p.policy.limit,
                    p.policy.window.as_millis().div_ceil(1000)
                )
            })
            .collect();
        Route {
            policy_header: (!policies.is_empty())
                .then(|| hyper::header::HeaderValue::from_str(&policies.join(", ")).ok())
                .flatten(),
            specs: Specs::default(),
            cfg: cfg.clone(),
            authority,
            retrying: pool(true),
            once: pool(false),
        }
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
}
