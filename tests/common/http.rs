//! A plain HTTP/1.1 client over std sockets, from any 127.0.0.x source,
//! and the API calls the tests make with it.

use super::*;

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn pid(&self) -> i32 {
        self.header("x-forkd-pid")
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

pub fn connect_from(source: &str, port: u16) -> std::io::Result<TcpStream> {
    if source == "127.0.0.1" {
        return connect(port);
    }
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let from: std::net::SocketAddr = format!("{source}:0").parse().unwrap();
    sock.bind(&from.into())?;
    let to: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    sock.connect_timeout(&to.into(), Duration::from_secs(5))?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

fn connect(port: u16) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(5),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// Reads one response from `r`.
fn read_response(r: &mut BufReader<TcpStream>, head: bool) -> std::io::Result<Response> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        ));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(&format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').ok_or_else(|| bad("bad header"))?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .filter(|_| !head)
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Sends raw request bytes on a new connection and reads one response.
pub fn raw(port: u16, request: &str) -> std::io::Result<Response> {
    let mut s = connect(port)?;
    s.write_all(request.as_bytes())?;
    read_response(&mut BufReader::new(s), request.starts_with("HEAD "))
}

/// Sends raw bytes (say, a PROXY protocol header, then a request) on a
/// new connection from the loopback address `source`, and reads one
/// response.
pub fn raw_bytes_from(source: &str, port: u16, bytes: &[u8]) -> std::io::Result<Response> {
    let mut s = connect_from(source, port)?;
    s.write_all(bytes)?;
    read_response(&mut BufReader::new(s), false)
}

/// `GET path` on an open connection, kept alive.
pub fn get_on(conn: &mut BufReader<TcpStream>, path: &str) -> std::io::Result<Response> {
    conn.get_mut()
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())?;
    read_response(conn, false)
}

/// `GET path` on a new connection.
pub fn get(port: u16, path: &str) -> std::io::Result<Response> {
    raw(
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
    )
}

/// A kept-alive connection that reconnects only when the server said
/// `Connection: close` (or it was never open). Any other failure is
/// reported, not retried.
pub struct KeepAlive {
    port: u16,
    conn: Option<BufReader<TcpStream>>,
}

impl KeepAlive {
    pub fn new(port: u16) -> Self {
        KeepAlive { port, conn: None }
    }

    pub fn get(&mut self, path: &str) -> std::io::Result<Response> {
        let r = self.try_get(path);
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    fn try_get(&mut self, path: &str) -> std::io::Result<Response> {
        if self.conn.is_none() {
            self.conn = Some(BufReader::new(connect(self.port)?));
        }
        let resp = get_on(self.conn.as_mut().unwrap(), path)?;
        if resp
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        {
            self.conn = None;
        }
        Ok(resp)
    }
}

/// Sends one request with `headers` and `body` on a new connection.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    request_from("127.0.0.1", port, method, path, headers, body)
}

/// As `request`, from the loopback address `source` (any 127.0.0.x is a
/// distinct client).
pub fn request_from(
    source: &str,
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut s = connect_from(source, port)?;
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    read_response(&mut BufReader::new(s), method == "HEAD")
}

/// `POST /login` with a JSON body.
pub fn login(port: u16, user: &str, password: &str) -> Response {
    login_from("127.0.0.1", port, user, password)
}

/// `POST /login` from the loopback address `source`.
pub fn login_from(source: &str, port: u16, user: &str, password: &str) -> Response {
    let body = serde_json::json!({"username": user, "password": password}).to_string();
    request_from(
        source,
        port,
        "POST",
        "/login",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
    .expect("login answered")
}

/// The token of a successful login.
pub fn token(port: u16, user: &str, password: &str) -> String {
    let r = login(port, user, password);
    assert_eq!(r.status, 200, "login failed: {r:?}");
    r.json()["token"].as_str().unwrap().to_owned()
}

/// `POST /logout` with a bearer token.
pub fn logout(port: u16, token: &str) -> std::io::Result<Response> {
    request(
        port,
        "POST",
        "/logout",
        &[("Authorization", &format!("Bearer {token}"))],
        b"",
    )
}

/// `GET /profile` with a bearer token.
pub fn profile(port: u16, token: &str) -> std::io::Result<Response> {
    request(
        port,
        "GET",
        "/profile",
        &[("Authorization", &format!("Bearer {token}"))],
        b"",
    )
}

/// `GET /profile` with a token whose session just ended elsewhere (a
/// logout on another worker, `forkd user passwd`, `revoke`): each worker
/// serves it from its near cache at most until Redis' invalidation
/// reaches it, and never again once it has refused it. Polls until every
/// worker in `pids` has refused it; panics if one serves it after
/// refusing it, or past the test's patience.
pub fn until_refused_everywhere(port: u16, token: &str, pids: &std::collections::HashSet<i32>) {
    let mut refused = std::collections::HashSet::new();
    super::poll(super::PATIENCE, || {
        let r = profile(port, token).ok()?;
        match r.status {
            401 => {
                assert_eq!(
                    r.header("www-authenticate"),
                    Some("Bearer error=\"invalid_token\""),
                    "{r:?}"
                );
                refused.insert(r.pid());
            }
            200 => assert!(
                !refused.contains(&r.pid()),
                "served again after refusing: {r:?}"
            ),
            _ => panic!("{r:?}"),
        }
        (refused == *pids).then_some(())
    })
    .expect("every worker refuses the token");
}

/// Sends `n` requests built by `make` from `n` threads at once.
pub fn concurrently<F>(n: usize, make: F) -> Vec<std::io::Result<Response>>
where
    F: Fn(usize) -> std::io::Result<Response> + Send + Sync + 'static,
{
    let make = Arc::new(make);
    let barrier = Arc::new(std::sync::Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let make = make.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                make(i)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}
