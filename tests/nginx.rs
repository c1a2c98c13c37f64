//! nginx as a real client of forkd's forward-auth: docs/gateway.md's nginx
//! example, read from that page at test time and run as written (only its
//! addresses replaced), in front of an upstream (the harness's `Upstream`),
//! with forkd's `/auth` deciding, tested end to end through nginx.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;

use common::*;

const PW: &str = "nginx-secret";

/// What the example names, which the test replaces with its own.
const README_LISTEN: &str = "listen 80;";
const README_FORKD: &str = "127.0.0.1:8080";
const README_APP: &str = "127.0.0.1:9000";

/// The fenced blocks of `lang` in `text`, in order.
fn fenced<'a>(text: &'a str, lang: &str) -> Vec<&'a str> {
    let open = format!("```{lang}\n");
    text.split(open.as_str())
        .skip(1)
        .map(|rest| &rest[..rest.find("```").expect("a closed fence")])
        .collect()
}

/// docs/gateway.md ("forkd in front of your app"): its nginx example and
/// the forkd settings (the TOML block with `trusted_proxies`) it goes with.
fn readme_example() -> (String, String) {
    let section = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/gateway.md"))
        .expect("docs/gateway.md");
    let section = section.as_str();
    let nginx = fenced(section, "nginx");
    assert_eq!(nginx.len(), 1, "one nginx example in the section");
    let toml: Vec<&str> = fenced(section, "toml")
        .into_iter()
        .filter(|b| b.contains("trusted_proxies"))
        .collect();
    assert_eq!(toml.len(), 1, "one TOML block with trusted_proxies");
    (nginx[0].to_owned(), toml[0].to_owned())
}

/// `text` with every `from` replaced by `to`; the example must name `from`.
fn substitute(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "docs/gateway.md's nginx example no longer names {from}:\n{text}"
    );
    text.replace(from, to)
}

/// An nginx of the test's own, in the foreground, ended by pid.
struct Nginx {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Runs the example with forkd on `forkd` and the app on
    /// `upstream`.
    fn start(forkd: u16, upstream: u16) -> Option<Nginx> {
        let Some(bin) = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
        else {
            skip("nginx is not installed (apt-get install nginx)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        // nginx's workers run as nobody when it starts as root.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let d = dir.path().display().to_string();
        let port = free_port();
        let (example, _) = readme_example();
        let example = substitute(
            &example,
            README_LISTEN,
            &format!("listen 127.0.0.1:{port};"),
        );
        let example = substitute(&example, README_FORKD, &format!("127.0.0.1:{forkd}"));
        let example = substitute(&example, README_APP, &format!("127.0.0.1:{upstream}"));
        let conf = format!(
            r#"worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
{example}}}
"#
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let n = Nginx { child, port, dir };
        let up = poll(PATIENCE, || get(port, "/healthz").ok().map(|_| ()));
        assert!(
            up.is_some(),
            "nginx did not answer; error.log:\n{}",
            n.log()
        );
        Some(n)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        signal(pid, nix::sys::signal::Signal::SIGTERM);
        let gone = poll(PATIENCE, || {
            self.child.try_wait().ok().flatten().map(|_| ())
        });
        if gone.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// forkd's config for these tests: `extra`, then the TOML block of docs/gateway.md
/// (nginx's address in `http.trusted_proxies`).
fn forkd_config(extra: &str) -> String {
    let (_, settings) = readme_example();
    format!("workers = 1\n{extra}\n{settings}")
}

/// The value of header `name` the upstream saw, if any.
fn seen(r: &Response, name: &str) -> Option<String> {
    r.json()["headers"].as_array().and_then(|h| {
        h.iter()
            .find(|p| p[0].as_str().is_some_and(|k| k.eq_ignore_ascii_case(name)))
            .map(|p| p[1].as_str().unwrap().to_owned())
    })
}

fn seen_user(r: &Response) -> Option<String> {
    seen(r, "x-forkd-user")
}

#[test]
fn nginx_auth_request_asks_forkd_and_passes_the_user() {
    let up = Upstream::tcp();
    let f = Forkd::start(&forkd_config(&format!(
        "[[route]]\nprefix = \"/public\"\nupstream = \"{}\"\nauth = \"none\"\n",
        up.url()
    )));
    f.add_user("alice", PW);
    let t = token(f.port, "alice", PW);
    let Some(n) = Nginx::start(f.port, up.port) else {
        return;
    };
    let auth = format!("Bearer {t}");

    // No token, a spoofed identity: nginx answers 401 and the upstream
    // never sees the request.
    let before = up.requests.load(Relaxed);
    let r = request(n.port, "GET", "/app/x", &[("X-Forkd-User", "admin")], b"").unwrap();
    assert_eq!(r.status, 401, "{r:?}");
    let r = request(
        n.port,
        "GET",
        "/app/x",
        &[(
            "Authorization",
            "Bearer AAAAAAAAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        )],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 401, "{r:?}");
    // A client naming an open path as the "original" one: nginx names the
    // request itself, so this is still the closed path.
    let r = request(
        n.port,
        "GET",
        "/app/x",
        &[
            ("X-Forwarded-Uri", "/public/page"),
            ("X-Original-URI", "/public/page"),
        ],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(up.requests.load(Relaxed), before);

    // A valid session: the upstream gets the identity forkd named, not the
    // one the client claimed, session id included.
    let r = request(
        n.port,
        "GET",
        "/app/x?y=1",
        &[
            ("Authorization", &auth),
            ("X-Forkd-User", "admin"),
            ("X-Forkd-Role", "admin"),
            ("X-Forkd-Session", "forged"),
        ],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["target"], "/app/x?y=1");
    assert_eq!(seen_user(&r).as_deref(), Some("alice"));
    assert_eq!(seen(&r, "x-forkd-role").as_deref(), Some("user"), "{r:?}");
    assert_eq!(
        seen(&r, "authorization"),
        None,
        "the token stays with forkd"
    );
    let direct = request(f.port, "GET", "/auth", &[("Authorization", &auth)], b"").unwrap();
    let session = direct
        .header("x-forkd-session")
        .expect("/auth names the session");
    assert_ne!(session, "forged");
    assert_eq!(
        seen(&r, "x-forkd-session").as_deref(),
        Some(session),
        "{r:?}"
    );

    // Under a forkd route with auth = "none", forward-auth lets anyone by,
    // with no identity, whatever the client claims.
    let r = request(
        n.port,
        "GET",
        "/public/page",
        &[
            ("X-Forkd-User", "admin"),
            ("X-Forkd-Role", "admin"),
            ("X-Forkd-Session", "forged"),
        ],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(seen_user(&r), None, "{r:?}");
    assert_eq!(seen(&r, "x-forkd-role"), None, "{r:?}");
    assert_eq!(seen(&r, "x-forkd-session"), None, "{r:?}");

    // After logout the same token is refused through nginx too.
    assert_eq!(logout(f.port, &t).unwrap().status, 204);
    let r = request(n.port, "GET", "/app/x", &[("Authorization", &auth)], b"").unwrap();
    assert_eq!(r.status, 401, "{r:?}");

    // Login and logout through nginx: the token it gives works through
    // nginx, until the logout through nginx.
    let before = up.requests.load(Relaxed);
    let r = login(n.port, "alice", PW);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(up.requests.load(Relaxed), before, "forkd answers /login");
    let t2 = r.json()["token"].as_str().expect("a token").to_owned();
    let auth2 = format!("Bearer {t2}");
    let r = request(n.port, "GET", "/app/y", &[("Authorization", &auth2)], b"").unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(seen_user(&r).as_deref(), Some("alice"));
    assert_eq!(logout(n.port, &t2).unwrap().status, 204);
    let r = request(n.port, "GET", "/app/y", &[("Authorization", &auth2)], b"").unwrap();
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(login(n.port, "alice", "wrong").status, 401);

    // forkd's /auth itself, as Traefik would call it.
    let t = token(f.port, "alice", PW);
    let r = request(
        f.port,
        "GET",
        "/auth",
        &[
            ("Authorization", &format!("Bearer {t}")),
            ("X-Forwarded-Uri", "/app/z"),
        ],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-forkd-user"), Some("alice"));
    assert_eq!(r.header("x-forkd-role"), Some("user"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let r = request(f.port, "POST", "/auth", &[], b"").unwrap();
    assert_eq!(r.status, 405);
    drop(n);
}

#[test]
fn nginx_passes_forkd_refusals_on_and_counts_each_client() {
    let mut redis = RedisServer::start();
    let up = Upstream::tcp();
    let f = Forkd::start_with_redis(
        &redis,
        &forkd_config(&format!(
            "[auth]\nlogin_ip_limit = 2\n\
             [rate_limit.policy.tiny]\nlimit = 2\nwindow = 60\nkey = \"client\"\n\
             [[route]]\nprefix = \"/limited\"\nupstream = \"{}\"\nauth = \"none\"\n\
             policies = [\"tiny\"]\n",
            up.url()
        )),
    );
    f.add_user("alice", PW);
    let Some(n) = Nginx::start(f.port, up.port) else {
        return;
    };

    // A spent policy is the client's 429 through nginx, with Retry-After
    // and the RateLimit headers, and the upstream never sees the request.
    for _ in 0..2 {
        let r = request_from("127.0.0.2", n.port, "GET", "/limited/x", &[], b"").unwrap();
        assert_eq!(r.status, 200, "{r:?}");
    }
    let before = up.requests.load(Relaxed);
    let r = request_from("127.0.0.2", n.port, "GET", "/limited/x", &[], b"").unwrap();
    assert_eq!(r.status, 429, "{r:?}\nerror.log:\n{}", n.log());
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a Retry-After in seconds: {r:?}"));
    assert!((1..=60).contains(&retry), "{r:?}");
    assert!(
        r.header("ratelimit")
            .is_some_and(|v| v.contains("\"tiny\"")),
        "{r:?}"
    );
    assert!(
        r.header("ratelimit-policy")
            .is_some_and(|v| v.contains("\"tiny\";q=2;w=60")),
        "{r:?}"
    );
    assert_eq!(up.requests.load(Relaxed), before);

    // forkd believes nginx's X-Forwarded-For (http.trusted_proxies): the
    // policy and the login limits count each client, not nginx.
    let r = request_from("127.0.0.3", n.port, "GET", "/limited/x", &[], b"").unwrap();
    assert_eq!(r.status, 200, "another client has its own bucket: {r:?}");
    for _ in 0..2 {
        let r = login_from("127.0.0.4", n.port, "alice", "wrong");
        assert_eq!(r.status, 401, "{r:?}");
    }
    let r = login_from("127.0.0.4", n.port, "alice", PW);
    assert_eq!(r.status, 429, "{r:?}");
    assert!(r.header("retry-after").is_some(), "{r:?}");
    let r = login_from("127.0.0.5", n.port, "alice", PW);
    assert_eq!(r.status, 200, "another client can still log in: {r:?}");
    let t = r.json()["token"].as_str().unwrap().to_owned();
    let auth = format!("Bearer {t}");

    // A path forkd will not read two ways is 400 through nginx too.
    let before = up.requests.load(Relaxed);
    let r = request(
        n.port,
        "GET",
        "/app/%2e%2e/x",
        &[("Authorization", &auth)],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(up.requests.load(Relaxed), before);

    // Redis down: forkd's 503 with Retry-After, through nginx.
    redis.kill();
    let r = poll(PATIENCE, || {
        let r = request(n.port, "GET", "/app/x", &[("Authorization", &auth)], b"").ok()?;
        assert_ne!(r.status, 429, "{r:?}");
        (r.status != 200).then_some(r)
    })
    .expect("the session check fails without Redis");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("retry-after"), Some("1"), "{r:?}");

    // forkd unreachable: nginx's own failure is a 502, never a 429.
    drop(f);
    let r = poll(PATIENCE, || {
        let r = request_from("127.0.0.6", n.port, "GET", "/limited/x", &[], b"").ok()?;
        assert_ne!(r.status, 429, "{r:?}");
        (r.status != 503).then_some(r)
    })
    .expect("nginx answers");
    assert_eq!(r.status, 502, "{r:?}");
    drop(n);
}
