//! HTTP/2 requests are held to the same rules as HTTP/1.1 ones, with a raw
//! h2 client that sends what curl and nghttp would not: a field value with
//! leading or trailing white space (RFC 9113 section 8.2.1: malformed, never
//! forwarded) and a `Host` beside a different `:authority` (section 8.3.1).
//! A malformed request's stream is reset with PROTOCOL_ERROR (section
//! 8.1.1), and it is counted as a 400.

mod common;

use common::*;

/// Sends `GET uri` over h2c with `headers`; the status, or the stream's
/// error as text (a reset: "RESET PROTOCOL_ERROR").
fn h2_status(port: u16, uri: &str, headers: &[(&str, &str)]) -> Result<u16, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let (client, conn) = h2::client::handshake(tcp)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut client = client.ready().await.map_err(|e| e.to_string())?;
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
