//! A cached route's fill: the answer of the request that took an entry's
//! single-flight lock (the upstream's, or a built-in responder's), stored
//! when it may be.

use hyper::header::HeaderValue;
use hyper::Response;

use crate::cache;
use crate::refusal::Answer;
use crate::response::Body;
use crate::state::State;
use crate::upstream::Route;

/// The answer to a request that took the cache lock (the upstream's, or a
/// built-in responder's): stored when it may be and fits, with up to 10 %
/// less time than it allows (so that entries made together do not expire
/// together), and answered either way (`x-cache: miss`). `stream`
/// passes on an answer that is not kept. The lock is released by the
/// guard that holds it (`proxy::cached::Unlock`), however the request
/// ends.
pub(crate) async fn fill_cache<B>(
    st: &State,
    route: &Route,
    place: &cache::Place,
    request_headers: &hyper::HeaderMap,
    parts: hyper::http::response::Parts,
    body: B,
    stream: impl FnOnce(B) -> Body,
) -> Answer
where
    B: hyper::body::Body<Data = bytes::Bytes, Error = hyper::Error> + Send + Unpin,
{
    let Some(limits) = route.cfg.cache else {
        return Ok(Response::from_parts(parts, stream(body)));
    };
    let miss = |mut r: Response<Body>| {
        r.headers_mut()
            .insert(cache::X_CACHE, HeaderValue::from_static("miss"));
        r
    };
    // The length the answer declared (an upstream's `Content-Length`), or
    // the one a built-in answer has.
    let length = hyper::body::Body::size_hint(&body).exact();
    let keep = cache::storable(parts.status, &parts.headers, place.shared, limits.max_ttl)
        .filter(|_| length.is_some_and(|n| n <= limits.max_bytes));
    let Some((ttl, spec)) = keep else {
        return Ok(miss(Response::from_parts(parts, stream(body))));
    };
    let ttl = cache::jittered(ttl);
    let read = http_body_util::BodyExt::collect(http_body_util::Limited::new(
        body,
        limits.max_bytes as usize,
    ));
    let bytes = match tokio::time::timeout(route.cfg.timeout, read).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => {
            return Err(route.bad_gateway(
                &st.host,
                &format!("the answer broke off during a cache fill: {e}"),
                "The upstream service broke off its answer.",
            ));
        }
        Err(_) => {
            return Err(route.gateway_timeout(
                &st.host,
                &format!(
                    "the answer did not end within the route's timeout ({:?}) during a cache fill",
                    route.cfg.timeout
                ),
                "The upstream service did not finish its answer in time.",
            ))
        }
    };
    cache::store(
        st,
        &route.specs,
        place,
        &spec,
        request_headers,
        (&parts.status, &parts.headers, &bytes),
        ttl,
    )
    .await;
    Ok(miss(Response::from_parts(parts, Body::new(bytes))))
}
