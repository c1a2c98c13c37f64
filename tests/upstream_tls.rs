//! `https://` upstreams: a real TLS server (Python's http.server over its
//! ssl module, OpenSSL underneath) with a certificate of the tests' own
//! CA, reached through a route with `upstream_tls`: the CA file trusted,
//! the certificate's name checked (by IP, or by `server_name`, sent as
//! SNI), a client certificate shown when set; and refusals: an unknown
//! authority or a wrong name is 502, never a request sent in clear.

mod common;

use std::io::BufRead;
use std::process::{Child, Command, Stdio};

use common::*;

/// The TLS upstream: answers every GET with a JSON of its path, the SNI
/// it got and the client certificate's CN (null without one).
const SERVER: &str = r#"
import http.server, json, ssl, sys
cert, key, ca = sys.argv[1:4]
sni = {}
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ctx.load_verify_locations(ca)
ctx.verify_mode = ssl.CERT_OPTIONAL
ctx.sni_callback = lambda s, name, c: sni.__setitem__(id(s), name)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        peer = self.connection.getpeercert()
        cn = dict(x[0] for x in peer["subject"])["commonName"] if peer else None
        body = json.dumps({"path": self.path, "sni": sni.get(id(self.connection)), "client": cn}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
s.socket = ctx.wrap_socket(s.socket, server_side=True)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;

/// The server process, ended when dropped.
struct TlsServer {
    child: Child,
    port: u16,
}

impl TlsServer {
    fn start(leaf: &Leaf, ca: &str) -> TlsServer {
        let mut child = Command::new("python3")
            .args(["-c", SERVER])
            .arg(&leaf.cert)
            .arg(&leaf.key)
            .arg(ca)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("the TLS server said {line:?}")
        });
        TlsServer { child, port }
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn route(prefix: &str, upstream: &str, tls: &str) -> String {
    format!(
        "[[route]]\nprefix = \"{prefix}\"\nupstream = \"{upstream}\"\nauth = \"none\"\n\
         strip_prefix = true\nupstream_tls = {{ {tls} }}\n"
    )
}

#[test]
fn https_upstreams_are_verified_and_may_be_shown_a_client_certificate() {
    let pki = Pki::new();
    let leaf = pki.leaf("upstream", KeyKind::Ecdsa);
    let client = pki.leaf_for("forkd-client", KeyKind::Ecdsa, "clientAuth");
    let server = TlsServer::start(&leaf, &pki.ca());
    let at = format!("https://127.0.0.1:{}", server.port);
    let ca = format!("ca_file = \"{}\"", pki.ca());
    let config = [
        "workers = 1\n".to_owned(),
        route("/ip", &at, &ca),
        route("/sni", &at, &format!("{ca}, server_name = \"localhost\"")),
        route(
            "/client",
            &format!("{at}/base"),
            &format!(
                "{ca}, cert_file = \"{}\", key_file = \"{}\"",
                client.cert.display(),
                client.key.display()
            ),
        ),
        route("/system", &at, ""),
        route(
            "/wrong",
            &at,
            &format!("{ca}, server_name = \"wrong.example\""),
        ),
    ]
    .concat();
    let f = Forkd::start(&config);

    // Verified by the certificate's IP address: no SNI for an address.
    let r = request(f.port, "GET", "/ip/x?y=1", &[], b"").unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["path"], "/x?y=1");
    assert_eq!(r.json()["sni"], serde_json::Value::Null);
    assert_eq!(r.json()["client"], serde_json::Value::Null);
    // By a name of its own, sent as SNI.
    let r = request(f.port, "GET", "/sni/x", &[], b"").unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["sni"], "localhost");
    // With forkd's client certificate, and under the upstream's path.
    let r = request(f.port, "GET", "/client/x", &[], b"").unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["client"], "forkd-client");
    assert_eq!(r.json()["path"], "/base/x");

    // The test CA is no authority of the system's, and the certificate is
    // not wrong.example's: 502, and the log says why.
    for (path, why) in [
        ("/system/x", "UnknownIssuer"),
        (
            "/wrong/x",
            "certificate not valid for name \"wrong.example\"",
        ),
    ] {
        let r = request(f.port, "GET", path, &[], b"").unwrap();
        assert_eq!(r.status, 502, "{path}: {r:?}");
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
        let log = poll(PATIENCE, || {
            let l = f.log_text();
            l.contains(why).then_some(l)
        });
        assert!(log.is_some(), "{path}: no {why} in\n{}", f.log_text());
    }
    let s = String::from_utf8_lossy(&f.cli(&["status"]).stdout).into_owned();
    assert!(s.contains(&format!("route /ip -> {at} (")), "{s}");
}

#[test]
fn bad_upstream_tls_settings_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let (one, other) = (
        pki.leaf_for("one", KeyKind::Ecdsa, "clientAuth"),
        pki.leaf_for("other", KeyKind::Ecdsa, "clientAuth"),
    );
    let mismatched = format!(
        "cert_file = \"{}\", key_file = \"{}\"",
        one.cert.display(),
        other.key.display()
    );
    let missing = dir.path().join("missing.pem");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    for (config, said) in [
        (
            route(
                "/a",
                "http://127.0.0.1:9",
                "ca_file = \"/etc/ssl/certs/ca-certificates.crt\"",
            ),
            "`route[0].upstream_tls`: \"a table\" (upstream_tls is for https:// servers",
        ),
        (
            route(
                "/a",
                "https://127.0.0.1:9",
                &format!("ca_file = \"{}\"", missing.display()),
            ),
            "route[0].upstream_tls: cannot read",
        ),
        (
            route(
                "/a",
                "https://127.0.0.1:9",
                &format!("ca_file = \"{}\"", empty.display()),
            ),
            "no CERTIFICATE block",
        ),
        (
            route("/a", "https://127.0.0.1:9", "cert_file = \"/x.pem\""),
            "expected cert_file and key_file together",
        ),
        (
            route("/a", "https://127.0.0.1:9", &mismatched),
            "route[0].upstream_tls: client certificate",
        ),
    ] {
        let path = dir.path().join("forkd.toml");
        std::fs::write(&path, &config).unwrap();
        let out = Command::new(BIN)
            .args(["--config", path.to_str().unwrap(), "check-config"])
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{config}: {err}");
        assert!(err.contains(said), "{config}: {err}");
    }
}
