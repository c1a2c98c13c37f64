//! A route's upstream as written: an address, with or without a path the
//! forwarded paths go under, or a unix socket.

use std::path::Path;

use crate::*;

fn upstream_of(written: &str) -> Result<Upstream, ConfigError> {
    let text = format!("[[route]]\nprefix = \"/api\"\nupstream = \"{written}\"\n");
    let c = RawConfig::from_str(&text, Path::new("test.toml"))?.validate(2)?;
    Ok(c.route[0].upstream.first().clone())
}

#[test]
fn an_upstream_may_have_a_path() {
    for (written, addr, path) in [
        ("http://127.0.0.1:9000", "127.0.0.1:9000", ""),
        ("http://127.0.0.1:9000/", "127.0.0.1:9000", ""),
        ("http://127.0.0.1:9000/v2", "127.0.0.1:9000", "/v2"),
        ("http://127.0.0.1:9000/v2/", "127.0.0.1:9000", "/v2"),
        ("http://[::1]:9000/a/b-c", "[::1]:9000", "/a/b-c"),
    ] {
        let u = upstream_of(written).unwrap_or_else(|e| panic!("{written}: {e}"));
        assert_eq!(
            u,
            Upstream::Tcp {
                addr: addr.into(),
                path: path.into(),
                tls: false
            },
            "{written}"
        );
        // What status and check-config show reads back the same.
        assert_eq!(upstream_of(&u.to_string()).unwrap(), u, "{written}");
    }
    assert_eq!(upstream_of("unix:/run/app.sock").unwrap().path(), "");
}

#[test]
fn an_upstream_path_is_refused_unless_plain() {
    for written in [
        "http://127.0.0.1:9000/v2/../admin",
        "http://127.0.0.1:9000/./v2",
        "http://127.0.0.1:9000/v2//x",
        "http://127.0.0.1:9000/v%32",
        "http://127.0.0.1:9000/v2?x=1",
        "http://127.0.0.1:9000/v2#x",
        "http://127.0.0.1:9000/v 2",
        "http://127.0.0.1/v2",
        "http://[a b]:80",
        "http://[]:80",
    ] {
        let e = upstream_of(written).expect_err(written).to_string();
        assert!(
            e.contains("route[0].upstream") && e.contains("optionally with a path"),
            "{written}: {e}"
        );
    }
}

fn upstreams_of(written: &str) -> Result<Upstreams, ConfigError> {
    let text = format!("[[route]]\nprefix = \"/api\"\nupstream = {written}\nfail_timeout = 2.5\n");
    let c = RawConfig::from_str(&text, Path::new("test.toml"))?.validate(2)?;
    assert_eq!(
        c.route[0].fail_timeout,
        std::time::Duration::from_millis(2500)
    );
    Ok(c.route[0].upstream.clone())
}

#[test]
fn an_upstream_may_be_a_list_of_servers() {
    let u = upstreams_of(r#"["http://127.0.0.1:9001", "unix:/run/a.sock", "http://[::1]:9003"]"#)
        .unwrap();
    assert_eq!(u.0.len(), 3);
    assert_eq!(
        u.to_string(),
        "http://127.0.0.1:9001, unix:/run/a.sock, http://[::1]:9003"
    );
    // Written back (check-config, status --show-config) as a list, and
    // one server as a string.
    let list = toml::Value::try_from(&u).unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(3), "{list}");
    let one = upstreams_of(r#"["http://127.0.0.1:9001"]"#).unwrap();
    assert_eq!(
        toml::Value::try_from(&one).unwrap().as_str(),
        Some("http://127.0.0.1:9001")
    );
    for (written, expected) in [
        ("[]", "expected 1 to 32 servers"),
        (
            r#"["http://127.0.0.1:9001", "http://127.0.0.1:9001/"]"#,
            "expected each server once",
        ),
        (
            r#"["http://127.0.0.1:9001/v2", "http://127.0.0.1:9002"]"#,
            "the same path on every server",
        ),
        (
            r#"["http://127.0.0.1:9001", "ftp://x:1"]"#,
            "route[0].upstream[1]",
        ),
        ("42", "a server (\"http://HOST:PORT\") or a list of servers"),
        ("[1, 2]", "invalid type"),
    ] {
        let e = upstreams_of(written).expect_err(written).to_string();
        assert!(e.contains(expected), "{written}: {e}");
    }
    let many: Vec<String> = (0..33)
        .map(|p| format!("\"http://127.0.0.1:{}\"", 9000 + p))
        .collect();
    let e = upstreams_of(&format!("[{}]", many.join(", ")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected 1 to 32 servers"), "{e}");
}

#[test]
fn a_health_check_is_off_without_a_path_and_checked_with_one() {
    let route = |health: &str| {
        let text = format!(
            "[[route]]\nprefix = \"/api\"\nupstream = [\"http://127.0.0.1:9001\", \"http://127.0.0.1:9002\"]\n{health}"
        );
        RawConfig::from_str(&text, Path::new("test.toml"))
            .and_then(|r| r.validate(2))
            .map(|c| c.route[0].health.clone())
    };
    assert_eq!(route("").unwrap(), None);
    let h = route("health = { path = \"/healthz?deep=1\", interval = 0.5 }\n")
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            h.path.as_str(),
            h.interval.as_millis(),
            h.timeout.as_secs(),
            h.fails,
            h.passes
        ),
        ("/healthz?deep=1", 500, 2, 2, 2)
    );
    for (health, key) in [
        ("health = { path = \"healthz\" }", "route[0].health.path"),
        ("health = { path = \"/a b\" }", "route[0].health.path"),
        (
            "health = { path = \"/h\", interval = 0 }",
            "route[0].health.interval",
        ),
        (
            "health = { path = \"/h\", timeout = 61 }",
            "route[0].health.timeout",
        ),
        (
            "health = { path = \"/h\", fails = 0 }",
            "route[0].health.fails",
        ),
        (
            "health = { path = \"/h\", passes = 101 }",
            "route[0].health.passes",
        ),
        ("health = { path = \"/h\", every = 1 }", "every"),
    ] {
        let e = route(&format!("{health}\n")).expect_err(health).to_string();
        assert!(e.contains(key), "{health}: {e}");
    }
}

#[test]
fn a_prefix_that_is_no_path_is_refused_not_a_panic() {
    for prefix in ["", "//", "é", "/é", "a"] {
        let text = format!("[[route]]\nprefix = \"{prefix}\"\nupstream = \"http://127.0.0.1:9\"\n");
        let e = RawConfig::from_str(&text, Path::new("test.toml"))
            .and_then(|r| r.validate(2))
            .expect_err(prefix)
            .to_string();
        assert!(e.contains("route[0].prefix"), "{prefix:?}: {e}");
    }
}

/// What check-config and status --show-config print of routes with every
/// new key is read back as the same configuration.
#[test]
fn routes_with_pools_health_and_upstream_tls_read_back_the_same() {
    let text = r#"
[[route]]
prefix = "/api"
upstream = ["https://127.0.0.1:9001/v2", "https://[::1]:9002/v2"]
fail_timeout = 3
health = { path = "/healthz", interval = 0.5, timeout = 1, fails = 3, passes = 1 }
upstream_tls = { ca_file = "/etc/forkd/ca.pem", server_name = "api.internal", cert_file = "/etc/forkd/c.pem", key_file = "/etc/forkd/c.key" }

[[route]]
prefix = "/one"
upstream = "unix:/run/app.sock"
"#;
    let first = RawConfig::from_str(text, Path::new("test.toml"))
        .unwrap()
        .validate(2)
        .unwrap();
    let shown = first.to_toml();
    let again = RawConfig::from_str(&shown, Path::new("shown.toml"))
        .unwrap_or_else(|e| panic!("{e}\n{shown}"))
        .validate(2)
        .unwrap_or_else(|e| panic!("{e}\n{shown}"));
    assert_eq!(again.route, first.route, "{shown}");
}
