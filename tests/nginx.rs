//! nginx as a real client of forkd's forward-auth: an `auth_request`
//! location in front of an upstream (the harness's `Upstream`), with
//! forkd's `/auth` deciding, tested end to end through nginx.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};

use common::*;

const PW: &str = "nginx-secret";

/// An nginx of the test's own, in the foreground, ended by pid.
struct Nginx {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Nginx {
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
    upstream forkd {{ server 127.0.0.1:{forkd}; keepalive 8; }}
    server {{
        listen 127.0.0.1:{port};
        location = /_forkd_auth {{
            internal;
            proxy_pass http://forkd/auth;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Original-Method $request_method;
            proxy_set_header X-Forwarded-Uri "";      # only nginx names the request
            proxy_set_header X-Forwarded-Method "";
            proxy_set_header X-Forwarded-Host $http_host;  # with its port, for the
            proxy_set_header Upgrade $http_upgrade;         # cookie's same-site check
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
        location / {{
            auth_request /_forkd_auth;
            auth_request_set $forkd_user $upstream_http_x_forkd_user;
            auth_request_set $forkd_role $upstream_http_x_forkd_role;
            proxy_set_header X-Forkd-User $forkd_user;
            proxy_set_header X-Forkd-Role $forkd_role;
            proxy_pass http://127.0.0.1:{upstream};
        }}
    }}
}}
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
        let up = poll(PATIENCE, || get(port, "/").ok().map(|_| ()));
        assert!(
            up.is_some(),
            "nginx did not answer; error.log:\n{}",
            std::fs::read_to_string(n.dir.path().join("error.log")).unwrap_or_default()
        );
        Some(n)
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

fn seen_user(r: &Response) -> Option<String> {
    r.json()["headers"].as_array().and_then(|h| {
        h.iter()
            .find(|p| {
                p[0].as_str()
                    .is_some_and(|k| k.eq_ignore_ascii_case("x-forkd-user"))
            })
            .map(|p| p[1].as_str().unwrap().to_owned())
    })
}

#[test]
fn nginx_auth_request_asks_forkd_and_passes_the_user() {
    let up = Upstream::tcp();
    let f = Forkd::start(&format!(
        "workers = 1\n[[route]]\nprefix = \"/public\"\nupstream = \"{}\"\nauth = \"none\"\n",
        up.url()
    ));
    f.add_user("alice", PW);
    let t = token(f.port, "alice", PW);
    let Some(n) = Nginx::start(f.port, up.port) else {
        return;
    };
    let auth = format!("Bearer {t}");

    // No token, a spoofed identity: nginx answers 401 and the upstream
    // never sees the request.
    let before = up.requests.load(std::sync::atomic::Ordering::Relaxed);
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
    assert_eq!(
        up.requests.load(std::sync::atomic::Ordering::Relaxed),
        before
    );

    // A valid session: the upstream gets the user forkd named, not the
    // one the client claimed.
    let r = request(
        n.port,
        "GET",
        "/app/x?y=1",
        &[("Authorization", &auth), ("X-Forkd-User", "admin")],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["target"], "/app/x?y=1");
    assert_eq!(seen_user(&r).as_deref(), Some("alice"));

    // Under a forkd route with auth = "none", forward-auth lets anyone by.
    let r = request(
        n.port,
        "GET",
        "/public/page",
        &[("X-Forkd-User", "admin")],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(seen_user(&r), None, "{r:?}");

    // After logout the same token is refused through nginx too.
    assert_eq!(logout(f.port, &t).unwrap().status, 204);
    let r = request(n.port, "GET", "/app/x", &[("Authorization", &auth)], b"").unwrap();
    assert_eq!(r.status, 401, "{r:?}");

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
