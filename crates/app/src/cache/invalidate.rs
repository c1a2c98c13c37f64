//! The cached answers a successful write ends (RFC 9111 section 4.4): a
//! request with a method that is not safe on a cached route ends, once
//! its answer is 2xx or 3xx, the answers cached for its target and for a
//! same-host `Location` or `Content-Location`, for the `Host` it named.

use hyper::header::{HeaderMap, HeaderValue};
use hyper::Uri;

use crate::cache;
use crate::state::State;

/// A request with a method that is not safe (RFC 9110 section 9.2.1) on
/// a cached route: whose cached answers its success ends.
pub(crate) struct Written {
    /// Path and query.
    pub(crate) target: String,
    pub(crate) host: Option<HeaderValue>,
}

impl Written {
    /// The request's target, and the `Location` and `Content-Location`
    /// of the answer when they name a path on the same host (RFC 9111
    /// section 4.4: never another host's).
    fn targets(&self, answer: &HeaderMap) -> Vec<String> {
        let mut out = vec![self.target.clone()];
        for name in [hyper::header::LOCATION, hyper::header::CONTENT_LOCATION] {
            let Some(v) = answer.get(name).and_then(|v| v.to_str().ok()) else {
                continue;
            };
            let v = v.split('#').next().unwrap_or("");
            let path = if v.starts_with('/') && !v.starts_with("//") {
                Some(v.to_owned())
            } else if let Ok(uri) = v.parse::<Uri>() {
                let same_host = uri
                    .authority()
                    .zip(self.host.as_ref())
                    .is_some_and(|(a, h)| a.as_str().as_bytes().eq_ignore_ascii_case(h.as_bytes()));
                let web = matches!(uri.scheme_str(), Some("http" | "https"));
                (same_host && web)
                    .then(|| uri.path_and_query().map_or("/", |p| p.as_str()).to_owned())
            } else {
                None
            };
            if let Some(p) = path.filter(|p| !out.contains(p)) {
                out.push(p);
            }
        }
        out
    }

    /// Ends the cached answers of every target a successful `answer` to
    /// this write names, for the user `uid` and the shared cache.
    pub(crate) async fn invalidate(&self, st: &State, answer: &HeaderMap, uid: Option<&str>) {
        let host = cache::host_tag(self.host.as_ref());
        for target in self.targets(answer) {
            invalidate(st, &target, &host, uid).await;
        }
    }
}

/// Ends the cached answers of `target` on `host` (RFC 9111 section 4.4):
/// the shared cache's, and the user's own (`uid`). Other users' private entries are
/// their own caches and run out with their lifetime, as a browser's
/// would.
async fn invalidate(st: &State, target: &str, host: &str, uid: Option<&str>) {
    let shared = forkd_store::CacheScope::Shared(crate::secrets::hex16(target.as_bytes()));
    let own = uid.map(|uid| forkd_store::CacheScope::User(uid.to_owned()));
    let end = |scope: &forkd_store::CacheScope| {
        let url = st.store.cache_url(scope, target);
        async move {
            if let Err(e) = st.store.cache_invalidate(&url, host).await {
                log::warn!("cannot end the cached answers of {target}: {e}");
            }
        }
    };
    // fred pipelines the two calls on its one connection.
    match &own {
        Some(own) => {
            tokio::join!(end(&shared), end(own));
        }
        None => end(&shared).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_ends_its_own_and_its_same_host_locations() {
        let w = Written {
            target: "/api/a?x=1".into(),
            host: Some(HeaderValue::from_static("app.test:8080")),
        };
        let h = crate::test_util::headers(&[
            ("location", "/api/b#top"),
            ("content-location", "http://app.test:8080/api/c?y"),
        ]);
        assert_eq!(w.targets(&h), ["/api/a?x=1", "/api/b", "/api/c?y"]);
        let other = crate::test_util::headers(&[
            ("location", "http://evil.test/api/b"),
            ("content-location", "//evil.test/api/c"),
        ]);
        assert_eq!(w.targets(&other), ["/api/a?x=1"]);
    }
}
