//! HTTP/2 requests are held to the same rules as HTTP/1.1 ones, with a raw
//! h2 client that sends what curl and nghttp would not: a field value with
//! leading or trailing white space (RFC 9113 section 8.2.1: malformed, never
//! forwarded) and a `Host` beside a different `:authority` (section 8.3.1).
//! A malformed request's stream is reset with PROTOCOL_ERROR (section
//! 8.1.1), and it is counted as a 400.

mod common;

use common::*;

/// Runs `f` on a current-thread runtime of its own.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// An h2c client connection to forkd (prior knowledge), ready to send.
async fn h2c(port: u16) -> Result<h2::client::SendRequest<bytes::Bytes>, String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let (client, conn) = h2::client::handshake(tcp)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client.ready().await.map_err(|e| e.to_string())
}

/// Sends `GET uri` over h2c with `headers`; the status, or the stream's
/// error as text (a reset: "RESET PROTOCOL_ERROR").
fn h2_status(port: u16, uri: &str, headers: &[(&str, &str)]) -> Result<u16, String> {
    block_on(async {
        let mut client = h2c(port).await?;
        let mut req = http::Request::get(uri);
        for (k, v) in headers {
            req = req.header(*k, http::HeaderValue::from_bytes(v.as_bytes()).unwrap());
        }
        let (resp, _) = client
            .send_request(req.body(()).unwrap(), true)
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(PATIENCE, resp)
            .await
            .map_err(|_| "no answer".to_owned())?
            .map_err(|e| match e.reason() {
                Some(r) if e.is_reset() => format!("RESET {r:?}"),
                _ => e.to_string(),
            })?;
        Ok(resp.status().as_u16())
    })
}

#[test]
fn malformed_h2_requests_are_refused_before_the_upstream() {
    let api = Upstream::tcp();
    let f = Forkd::start(&format!(
        "workers = 1\n[http2]\nh2c = true\n\
         [[route]]\nprefix = \"/api\"\nupstream = \"{}\"\nauth = \"none\"\n",
        api.url()
    ));
    let base = format!("http://a.test:{}", f.port);
    let ok = h2_status(f.port, &format!("{base}/api/ok"), &[("x-a", "b c")]);
    assert_eq!(ok, Ok(200));
    let served = api.requests.load(std::sync::atomic::Ordering::SeqCst);
    for (name, value) in [
        ("x-a", " leading"),
        ("x-a", "trailing\t"),
        ("x-a", "\tboth "),
    ] {
        let r = h2_status(f.port, &format!("{base}/api/bad"), &[(name, value)]);
        assert_eq!(r, Err("RESET PROTOCOL_ERROR".into()), "{value:?}");
    }
    // A Host that names another authority than :authority.
    let r = h2_status(f.port, &format!("{base}/api/bad"), &[("host", "evil.test")]);
    assert_eq!(r, Err("RESET PROTOCOL_ERROR".into()));
    // The same authority is fine.
    let host = format!("a.test:{}", f.port);
    let r = h2_status(f.port, &format!("{base}/api/ok"), &[("host", &host)]);
    assert_eq!(r, Ok(200));
    assert_eq!(
        api.requests.load(std::sync::atomic::Ordering::SeqCst),
        served + 1,
        "the refused requests never reached the upstream"
    );
}

/// Sends `GET uri` over h2c with `headers`; the upstream's JSON echo.
fn h2_echo(port: u16, uri: &str, headers: &[(&str, &str)]) -> serde_json::Value {
    block_on(async {
        let mut client = h2c(port).await.unwrap();
        let mut req = http::Request::get(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let (resp, _) = client.send_request(req.body(()).unwrap(), true).unwrap();
        let resp = tokio::time::timeout(PATIENCE, resp).await.unwrap().unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut bytes = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            bytes.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&bytes).unwrap()
    })
}

#[test]
fn an_h2_request_reaches_an_http_1_1_upstream_as_http_1_1_would_send_it() {
    let api = Upstream::tcp();
    let f = Forkd::start(&format!(
        "workers = 1\n[http2]\nh2c = true\n\
         [[route]]\nprefix = \"/api\"\nupstream = \"{}\"\nauth = \"none\"\n",
        api.url()
    ));
    let uri = format!("http://a.test:{}/api/x", f.port);
    let echo = h2_echo(f.port, &uri, &[("cookie", "a=1"), ("cookie", "b=2")]);
    let seen: Vec<(String, String)> = echo["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_ascii_lowercase(),
                p[1].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let of = |name: &str| -> Vec<&str> {
        seen.iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    // One Cookie line (RFC 9113 section 8.2.3), and :authority as Host.
    assert_eq!(of("cookie"), ["a=1; b=2"], "{seen:?}");
    assert_eq!(
        of("host"),
        [format!("a.test:{}", f.port).as_str()],
        "{seen:?}"
    );
}

#[test]
fn an_h2_client_that_resets_its_stream_mid_body_is_counted_as_gone() {
    let api = Upstream::tcp();
    let f = Forkd::start(&format!(
        "workers = 1\n[http2]\nh2c = true\n\
         [[route]]\nprefix = \"/api\"\nupstream = \"{}\"\nauth = \"none\"\n",
        api.url()
    ));
    let counter = |name: &str| {
        let m = parse_exposition(&get(f.port, "/metrics").unwrap().body);
        m.get(&format!("{name}{{}}")).copied().unwrap_or(0.0)
    };
    block_on(async {
        let mut client = h2c(f.port).await.unwrap();
        let req = http::Request::post(format!("http://a.test:{}/api/upload", f.port))
            .header("content-length", "100")
            .body(())
            .unwrap();
        let (_resp, mut body) = client.send_request(req, false).unwrap();
        body.send_data(bytes::Bytes::from_static(b"0123456789"), false)
            .unwrap();
        // Let the request reach the upstream before the reset.
        let went = async {
            while api.requests.load(std::sync::atomic::Ordering::SeqCst) == 0
                && !api_seen_connection(&api)
            {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        };
        let _ = tokio::time::timeout(PATIENCE, went).await;
        body.send_reset(h2::Reason::CANCEL);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    });
    poll(PATIENCE, || {
        (counter("forkd_client_aborts_total") >= 1.0).then_some(())
    })
    .expect("the reset stream is counted as a client gone");
    assert_eq!(counter("forkd_upstream_failures_total"), 0.0);
}

/// Whether the upstream has taken a connection (the request is on its way).
fn api_seen_connection(api: &Upstream) -> bool {
    api.connections.load(std::sync::atomic::Ordering::SeqCst) > 0
}

#[test]
fn a_write_whose_client_resets_before_the_answer_still_ends_its_cached_answers() {
    let api = Upstream::tcp();
    let f = Forkd::start(&format!(
        "workers = 1\n[http2]\nh2c = true\n\
         [[route]]\nprefix = \"/api\"\nupstream = \"{}\"\nauth = \"none\"\ncache = true\nstrip_prefix = true\n",
        api.url()
    ));
    // The upstream takes 300 ms to answer /slow/300 (the route strips
    // /api).
    let url = "/api/slow/300?cc=max-age%3D600";
    assert_eq!(get(f.port, url).unwrap().header("x-cache"), Some("miss"));
    assert_eq!(get(f.port, url).unwrap().header("x-cache"), Some("hit"));
    let before = api.requests.load(std::sync::atomic::Ordering::SeqCst);
    block_on(async {
        let mut client = h2c(f.port).await.unwrap();
        // The Host the cached answers were made for (the harness's).
        let req = http::Request::post(format!("http://localhost{url}"))
            .body(())
            .unwrap();
        let (_resp, mut body) = client.send_request(req, true).unwrap();
        // The upstream has the write (and answers it in 300 ms): reset.
        let arrived = async {
            while api.requests.load(std::sync::atomic::Ordering::SeqCst) == before {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(PATIENCE, arrived)
            .await
            .expect("the write reached the upstream");
        body.send_reset(h2::Reason::CANCEL);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    });
    poll(PATIENCE, || {
        let r = get(f.port, url).unwrap();
        (r.header("x-cache") == Some("miss")).then_some(())
    })
    .expect("the write went through, so its cached answers end");
}

#[test]
fn a_cookie_keyed_policy_takes_an_h2_browser_s_cookie_fields_as_one() {
    let api = Upstream::tcp();
    let f = Forkd::start(&format!(
        "workers = 1\n[http2]\nh2c = true\n\
         [rate_limit.policy.by-cookie]\nlimit = 2\nwindow = 600\nkey = \"header:Cookie\"\n\
         [[route]]\nprefix = \"/api\"\nupstream = \"{}\"\nauth = \"none\"\npolicies = [\"by-cookie\"]\n",
        api.url()
    ));
    let uri = format!("http://a.test:{}/api/x", f.port);
    let crumbs = [("cookie", "a=1"), ("cookie", "b=2")];
    // Two cookie fields are one Cookie header: served, and counted as one
    // value ("a=1; b=2"), so the third request is over the limit.
    assert_eq!(h2_status(f.port, &uri, &crumbs), Ok(200));
    assert_eq!(h2_status(f.port, &uri, &crumbs), Ok(200));
    assert_eq!(h2_status(f.port, &uri, &crumbs), Ok(429));
    assert_eq!(h2_status(f.port, &uri, &[("cookie", "a=1")]), Ok(200));
}
