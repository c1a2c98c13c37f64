//! A route's upstream as written: an address, with or without a path the
//! forwarded paths go under, or a unix socket.

use std::path::Path;

use crate::*;

fn upstream_of(written: &str) -> Result<Upstream, ConfigError> {
    let text = format!("[[route]]\nprefix = \"/api\"\nupstream = \"{written}\"\n");
    let c = RawConfig::from_str(&text, Path::new("test.toml"))?.validate(2)?;
    Ok(c.route[0].upstream.clone())
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
                path: path.into()
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
        "https://127.0.0.1:9000/v2",
    ] {
        let e = upstream_of(written).expect_err(written).to_string();
        assert!(
            e.contains("route[0].upstream") && e.contains("optionally with a path"),
            "{written}: {e}"
        );
    }
}
