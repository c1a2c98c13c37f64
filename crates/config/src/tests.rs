//! Unit tests of the configuration: parsing, overrides, validation.

use std::path::{Path, PathBuf};

use crate::*;

fn parse(text: &str) -> Result<RawConfig, ConfigError> {
    RawConfig::from_str(text, Path::new("test.toml"))
}

#[test]
fn a_syntax_error_names_the_place_but_never_echoes_the_line() {
    let text = "workers = 2\n[redis]\nurl = \"redis://app:s3cret-PASSWORD@db:6379\" oops\n";
    let e = parse(text).unwrap_err().to_string();
    assert!(!e.contains("s3cret"), "{e}");
    assert!(e.contains("test.toml") && e.contains("line 3"), "{e}");
    assert!(e.contains("`redis.url`"), "{e}");
    // The client commands' lenient read of the file says the same.
    let file = std::env::temp_dir().join(format!("forkd-config-{}.toml", std::process::id()));
    std::fs::write(&file, text).unwrap();
    let e = Location::load(Some(&file), Vec::new())
        .err()
        .unwrap()
        .to_string();
    std::fs::remove_file(&file).unwrap();
    assert!(!e.contains("s3cret") && e.contains("line 3"), "{e}");
}

#[test]
fn every_table_falls_back_to_its_defaults_key_by_key() {
    let d = RawConfig::default().validate(2).unwrap();
    // One key of each table: the others keep their defaults.
    let one = |text: &str| parse(text).unwrap().validate(2).unwrap();
    let c = one("[rate_limit.profile]\nlimit = 5\n");
    assert_eq!(c.rate_limit.profile.limit, 5);
    assert_eq!(c.rate_limit.profile.window, d.rate_limit.profile.window);
    let c = one("[rate_limit.profile]\nwindow = 30\n");
    assert_eq!(c.rate_limit.profile.limit, d.rate_limit.profile.limit);
    let c = one("[rate_limit]\non_redis_error = \"fail_open\"\n");
    assert_eq!(c.rate_limit.profile, d.rate_limit.profile);
    let c = one("[http]\nkeepalive = false\n");
    assert_eq!(c.http.max_connections, d.http.max_connections);
    assert!(!c.http.keepalive);
    let c = one("[redis]\nprefix = \"x:\"\n");
    assert_eq!(c.redis.command_timeout, d.redis.command_timeout);
    let c = one("[auth]\nlogin_ip_limit = 7\n");
    assert_eq!(c.auth.login_ip_limit, 7);
    assert_eq!(c.auth.login_ip_window, d.auth.login_ip_window);
    assert_eq!(c.auth.argon2_memory_kib, d.auth.argon2_memory_kib);
    let c = one("[profile]\ncache_ttl = 5\n");
    assert_eq!(c.profile.origin_timeout, d.profile.origin_timeout);
    let c = one("[metrics]\nallow = [\"10.0.0.0/8\"]\n");
    assert_eq!(c.metrics.allow.len(), 1);
}

#[test]
fn reuseport_with_a_user_to_drop_to_is_refused() {
    let e = parse("listener = \"reuseport\"\nuser = \"nobody\"\n")
        .unwrap()
        .validate(2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("listener") && e.contains("user"), "{e}");
    assert!(parse("listener = \"reuseport\"\n")
        .unwrap()
        .validate(2)
        .is_ok());
    assert!(parse("user = \"nobody\"\n").unwrap().validate(2).is_ok());
}

#[test]
fn defaults_validate() {
    let c = RawConfig::default().validate(4).unwrap();
    assert_eq!(c.workers, 4);
    assert_eq!(c.listen[0].address, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(c.listener, ListenerMode::Shared);
}

#[test]
fn the_example_file_is_valid_and_lists_every_key() {
    let text = include_str!("../../../config/forkd.toml");
    parse(text).unwrap().validate(2).unwrap();
    for key in keys() {
        let leaf = key.rsplit('.').next().unwrap();
        assert!(
            text.lines()
                .any(|l| l.trim_start_matches("# ").starts_with(&format!("{leaf} ="))),
            "config/forkd.toml does not document `{key}`"
        );
    }
}

#[test]
fn unknown_key_is_named() {
    let e = parse("listen = \"127.0.0.1:1\"\nworkerz = 3\n").unwrap_err();
    assert!(e.to_string().contains("workerz"), "{e}");
    let e = parse("[http]\nmax_conn = 3\n").unwrap_err();
    assert!(e.to_string().contains("max_conn"), "{e}");
}

/// A mistyped key is answered with the key meant, not every key there is.
#[test]
fn a_mistyped_key_suggests_the_nearest() {
    let e = parse("workerz = 3\n").unwrap_err().to_string();
    assert!(
        e.contains("unknown key `workerz`; did you mean `workers`?"),
        "{e}"
    );
    assert!(!e.contains("`instance`"), "{e}");
    let e = parse("[http]\nmax_conections = 3\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("did you mean `max_connections`?"), "{e}");
    let e = parse("[redis]\nurll = \"redis://x\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("did you mean `url`?"), "{e}");
    // Nothing near: the keys there are.
    let e = parse("[tls]\ncolour = 1\n").unwrap_err().to_string();
    assert!(
        e.contains("unknown key `colour`; the keys here are") && e.contains("cert_file"),
        "{e}"
    );
}

#[test]
fn bad_values_are_named() {
    let e = parse("workers = 0").unwrap().validate(2).unwrap_err();
    assert!(e.to_string().contains("`workers`"), "{e}");
    let e = parse("workers = \"many\"").unwrap_err();
    assert!(e.to_string().contains("workers"), "{e}");
    let e = parse("listen = \"localhost\"")
        .unwrap()
        .validate(2)
        .unwrap_err();
    assert!(e.to_string().contains("`listen`"), "{e}");
    let e = parse("worker_timeout = 0")
        .unwrap()
        .validate(2)
        .unwrap_err();
    assert!(e.to_string().contains("`worker_timeout`"), "{e}");
    let e = parse("instance = \"a/b\"")
        .unwrap()
        .validate(2)
        .unwrap_err();
    assert!(e.to_string().contains("`instance`"), "{e}");
    let e = parse("log_file = \"rel.log\"")
        .unwrap()
        .validate(2)
        .unwrap_err();
    assert!(e.to_string().contains("`log_file`"), "{e}");
}

#[test]
fn env_overrides_file_and_unknown_variables_fail() {
    let mut c = parse("workers = 3\nlisten = \"127.0.0.1:1\"").unwrap();
    c.apply_env([
        ("FORKD_WORKERS".to_string(), "5".to_string()),
        ("FORKD_HTTP_KEEPALIVE".to_string(), "false".to_string()),
        ("FORKD_CONFIG".to_string(), "/x".to_string()),
        ("PATH".to_string(), "/bin".to_string()),
    ])
    .unwrap();
    let c2 = c.clone().validate(1).unwrap();
    assert_eq!(c2.workers, 5);
    assert!(!c2.http.keepalive);
    let e = c
        .apply_env([("FORKD_WORKRES".to_string(), "5".to_string())])
        .unwrap_err();
    assert!(e.to_string().contains("FORKD_WORKRES"), "{e}");
    let e = c
        .apply_env([("FORKD_BACKLOG".to_string(), "lots".to_string())])
        .unwrap_err();
    assert!(e.to_string().contains("FORKD_BACKLOG"), "{e}");
    assert!(e.to_string().contains("`backlog`"), "{e}");
}

#[test]
fn every_key_can_be_set() {
    for key in keys() {
        let value = match *key {
            "listener" => "reuseport",
            "http.keepalive"
            | "auth.cookie"
            | "auth.cookie_secure"
            | "http2.enabled"
            | "http2.h2c"
            | "tls.hsts_include_subdomains" => "true",
            "tls.cert_file" | "tls.key_file" => "/tmp/z",
            "runtime_dir" | "log_file" | "access_log_file" => "/tmp/x",
            "access_log" => "json",
            "recycle.max_rss" => "64",
            "instance"
            | "listen"
            | "log_level"
            | "redis.url"
            | "redis.prefix"
            | "redis.server"
            | "profile.origin"
            | "http.trusted_proxies"
            | "auth.cookie_name" => continue,
            "redis.data_dir" => "/tmp/y",
            "redis.password_file" => "/tmp/pw",
            _ => "7",
        };
        RawConfig::default().set(key, value).unwrap();
    }
    assert!(RawConfig::default().set("nope", "1").is_err());
}

#[test]
fn location_ignores_values_a_start_would_reject() {
    let dir = std::env::temp_dir().join(format!("forkd-loc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("c.toml");
    std::fs::write(
        &file,
        "instance = \"a\"\nworkers = \"lots\"\nruntime_dir = \"/r\"\n",
    )
    .unwrap();
    let loc = Location::load(Some(&file), []).unwrap();
    assert_eq!(loc.instance, "a");
    assert_eq!(loc.runtime_dir, Some(PathBuf::from("/r")));
    let loc = Location::load(Some(&file), [("FORKD_INSTANCE".into(), "b".into())]).unwrap();
    assert_eq!(loc.instance, "b");
    std::fs::write(&file, "instance = ").unwrap();
    assert!(Location::load(Some(&file), []).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn passwords_are_redacted() {
    assert_eq!(redact_url("redis://u:pw@h:1/0"), "redis://u:***@h:1/0");
    assert_eq!(redact_url("rediss://pw@h:1"), "rediss://***@h:1");
    assert_eq!(redact_url("redis://h:1"), "redis://h:1");
    let mut c = RawConfig::default();
    c.set("redis.url", "redis://app:hunter2@127.0.0.1:6379")
        .unwrap();
    let text = c.validate(1).unwrap().to_toml();
    assert!(!text.contains("hunter2"), "{text}");
    // A bad URL is refused by forkd_store::check_url (tests/cli.rs).
}

#[test]
fn trusted_proxies_are_cidrs() {
    let c: Cidr = "10.0.0.0/8".parse().unwrap();
    assert!(c.contains("10.1.2.3".parse().unwrap()));
    assert!(c.contains("::ffff:10.1.2.3".parse().unwrap()));
    assert!(!c.contains("11.0.0.1".parse().unwrap()));
    let c: Cidr = "2001:db8::/32".parse().unwrap();
    assert!(c.contains("2001:db8:1::1".parse().unwrap()));
    let c: Cidr = "127.0.0.1".parse().unwrap();
    assert!(c.contains("127.0.0.1".parse().unwrap()));
    assert!(!c.contains("127.0.0.2".parse().unwrap()));
    assert!("10.0.0.0/33".parse::<Cidr>().is_err());
    let e = parse("[http]\ntrusted_proxies = [\"nope\"]")
        .unwrap()
        .validate(1)
        .unwrap_err();
    assert!(e.to_string().contains("trusted_proxies"), "{e}");
}

#[test]
fn effective_config_round_trips() {
    let c = RawConfig::default().validate(2).unwrap();
    let again = parse(&c.to_toml()).unwrap().validate(9).unwrap();
    assert_eq!(c, again);
}

/// The keys are derived from the raw defaults; these are the lists written
/// by hand, which must name the same keys: the table of
/// docs/configuration.md, and the validated config (a raw key nothing
/// validates would be lost).
#[test]
fn the_docs_and_the_validated_config_list_every_key() {
    let table = include_str!("../../../docs/configuration.md");
    for key in keys() {
        assert!(
            table.contains(&format!("`{key}`")),
            "docs/configuration.md does not document `{key}`"
        );
    }
    let raw = serde_json::to_value(RawConfig::default()).unwrap();
    let valid = serde_json::to_value(RawConfig::default().validate(2).unwrap()).unwrap();
    let at = |v: &serde_json::Value, key: &str| {
        key.split('.')
            .try_fold(v.clone(), |v, part| v.get(part).cloned())
    };
    for key in keys() {
        // Unset by default (a path, an account): absent when validated too.
        let unset = at(&raw, key) == Some(serde_json::Value::Null);
        assert!(
            unset || at(&valid, key).is_some(),
            "`{key}` is read from the file but not part of the validated config"
        );
    }
    let mut valid_keys = Vec::new();
    let mut valid = valid;
    for t in crate::overrides::TABLE_ARRAYS {
        valid.as_object_mut().unwrap().remove(*t);
    }
    let mut stack = vec![(String::new(), valid)];
    while let Some((prefix, v)) = stack.pop() {
        match v {
            serde_json::Value::Object(map) => {
                stack.extend(map.into_iter().map(|(k, v)| (format!("{prefix}{k}."), v)));
            }
            _ => valid_keys.push(prefix.trim_end_matches('.').to_owned()),
        }
    }
    for key in valid_keys {
        assert!(
            keys().contains(&key.as_str()),
            "the validated config has `{key}`, which no key of the file sets"
        );
    }
}

#[test]
fn an_override_is_parsed_by_the_kind_of_its_default() {
    let mut c = RawConfig::default();
    c.set("workers", "3").unwrap();
    c.set("http.trusted_proxies", "10.0.0.0/8, ::1").unwrap();
    c.set("shutdown_timeout", "2.5").unwrap();
    c.set("log_file", "/var/log/forkd.log").unwrap();
    let v = c.clone().validate(1).unwrap();
    assert_eq!(v.workers, 3);
    assert_eq!(v.http.trusted_proxies.len(), 2);
    assert_eq!(v.shutdown_timeout, std::time::Duration::from_millis(2500));
    assert_eq!(v.log_file, Some(PathBuf::from("/var/log/forkd.log")));
    for (key, value) in [
        ("backlog", "1.5"),
        ("shutdown_timeout", "nan"),
        ("http.keepalive", "maybe"),
        ("listener", "fast"),
        ("workers", "many"),
    ] {
        let e = c.set(key, value).unwrap_err().to_string();
        assert!(e.contains(&format!("`{key}`")) && e.contains(value), "{e}");
    }
}

#[test]
fn a_non_finite_number_in_the_file_is_named_and_never_blamed_on_an_override() {
    for text in ["shutdown_timeout = nan\n", "watchdog_quorum = inf\n"] {
        let e = parse(text).unwrap_err().to_string();
        let key = text.split(' ').next().unwrap();
        assert!(e.contains(&format!("`{key}`")), "{e}");
    }
    let mut c = parse("shutdown_timeout = 5\n").unwrap();
    c.set("listen", "127.0.0.1:1").unwrap();
}

const TLS_FILES: &str = "[tls]\ncert_file = \"/etc/c.pem\"\nkey_file = \"/etc/k.pem\"\n";

#[test]
fn listen_takes_one_address_or_a_list_of_listeners() {
    // One address: TLS when [tls] names a certificate, as always.
    let c = parse(&format!("listen = \"127.0.0.1:8443\"\n{TLS_FILES}"))
        .unwrap()
        .validate(1)
        .unwrap();
    assert_eq!(c.listen.len(), 1);
    assert!(c.listen[0].tls);
    let text = format!(
        "listen = [\"127.0.0.1:8443\", {{ address = \"127.0.0.1:8080\", tls = false }},\n\
         {{ address = \"[::1]:8081\", redirect_https = true }},\n\
         {{ address = \"127.0.0.1:9000\", tls = false, proxy_protocol = true }}]\n\
         [http]\ntrusted_proxies = [\"10.0.0.0/8\"]\n{TLS_FILES}"
    );
    let c = parse(&text).unwrap().validate(1).unwrap();
    let got: Vec<_> = c
        .listen
        .iter()
        .map(|l| (l.address.port(), l.tls, l.proxy_protocol, l.redirect_https))
        .collect();
    assert_eq!(
        got,
        [
            (8443, true, false, false),
            (8080, false, false, false),
            (8081, false, false, true),
            (9000, false, true, false),
        ]
    );
    // check-config prints what it validated, and that reads back the same.
    let shown = c.to_toml();
    let again = parse(&shown).unwrap().validate(1).unwrap();
    assert_eq!(again.listen, c.listen, "{shown}");
    // An override sets one plain address.
    let mut raw = parse(&text).unwrap();
    raw.set("listen", "127.0.0.1:1").unwrap();
    let c = raw.validate(1).unwrap();
    assert_eq!(c.listen.len(), 1);
}

#[test]
fn a_listener_that_cannot_work_is_refused_naming_it() {
    let cases = [
        ("listen = []\n", "`listen`", "1 to 16"),
        (
            "listen = [\"127.0.0.1:1\", \"no host:2\"]\n",
            "`listen[1]`",
            "IP:PORT",
        ),
        (
            "listen = [\"127.0.0.1:1\", { address = \"127.0.0.1:2\", tsl = true }]\n",
            "listen[1]",
            "tsl",
        ),
        ("listen = [\"127.0.0.1:1\", 7]\n", "listen[1]", "an address"),
        (
            "listen = [{ address = \"127.0.0.1:1\", tls = true }]\n",
            "`listen[0].tls`",
            "tls.cert_file",
        ),
        (
            "listen = [{ address = \"127.0.0.1:1\", proxy_protocol = true }]\n",
            "`listen[0].proxy_protocol`",
            "trusted_proxies",
        ),
        (
            "listen = [{ address = \"127.0.0.1:1\", redirect_https = true }]\n",
            "`listen`",
            "TLS listener",
        ),
        (
            "listen = [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n",
            "`listen[1]`",
            "same address",
        ),
    ];
    for (text, key, why) in cases {
        let e = parse(text)
            .and_then(|r| r.validate(1))
            .unwrap_err()
            .to_string();
        assert!(e.contains(key) && e.contains(why), "{text}: {e}");
    }
    let e = parse(&format!(
        "listen = [{{ address = \"127.0.0.1:1\", tls = true, redirect_https = true }}]\n{TLS_FILES}"
    ))
    .unwrap()
    .validate(1)
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("redirect_https") && e.contains("tls = false"),
        "{e}"
    );
    let e = parse(&format!(
        "listen = [{{ address = \"127.0.0.1:1\", tls = false }}]\n{TLS_FILES}"
    ))
    .unwrap()
    .validate(1)
    .unwrap_err()
    .to_string();
    assert!(e.contains("no listener speaks TLS"), "{e}");
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn a_mistyped_override_is_refused_but_other_forkd_variables_are_not() {
    // Close to a key's variable, or a table's prefix with an unknown rest:
    // a mistyped override, refused and named.
    for name in [
        "FORKD_WROKERS",
        "FORKD_WORKER",
        "FORKD_Workers",
        "FORKD_LOGFILE",
        "FORKD_USR",
        "FORKD_HTTP_MAX_CONECTIONS",
        "FORKD_HTTP_NO_SUCH_THING",
        "FORKD_REDIS_HOST",
        "FORKD_RATE_LIMIT_PROFILE_LIMITS",
        "FORKD_ROUTE_PREFIX",
        "FORKD_MAX_CONNECTIONS",
        "FORKD_TRUSTED_PROXIES",
    ] {
        let mut c = RawConfig::default();
        let e = c.apply_env(env(&[(name, "4")])).unwrap_err().to_string();
        assert!(e.contains(name), "{name}: {e}");
    }
    let e = RawConfig::default()
        .apply_env(env(&[("FORKD_WROKERS", "4")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("did you mean FORKD_WORKERS?"), "{e}");
    let e = RawConfig::default()
        .apply_env(env(&[("FORKD_MAX_CONNECTIONS", "4")]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("did you mean FORKD_HTTP_MAX_CONNECTIONS?"),
        "{e}"
    );

    // The project's own variables and anyone else's: not overrides.
    let mut c = RawConfig::default();
    let passed_over = c
        .apply_env(env(&[
            ("FORKD_PORTS", "8081 8082"),
            ("FORKD_MAINTAINER", "Jo <jo@example.org>"),
            ("FORKD_BIN", "/x/forkd"),
            ("FORKD_CONFIG", "/x.toml"),
            ("FORKD_FAILPOINTS", "worker_start"),
            ("FORKD_UPGRADE_FD", "3"),
            ("FORKD_WORKERS", "3"),
            ("FORKD_RUNTIME_DIR", "/tmp/r"),
            ("FORKD_INSTANCE", "b"),
            ("FORKD_DEBUG_PORT", "1"),
            ("PATH", "/bin"),
        ]))
        .unwrap();
    // The project's own in silence, the others for a warning.
    assert_eq!(passed_over, ["FORKD_BIN", "FORKD_DEBUG_PORT"]);
    let v = c.validate(1).unwrap();
    assert_eq!(v.workers, 3);
    assert_eq!(v.instance, "b");
}

/// Every `FORKD_*` name the scripts, units, package and test harness use
/// is a key's variable or passes: none of them stops forkd from starting.
#[test]
fn the_projects_own_forkd_variables_never_look_mistyped() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    let mut dirs: Vec<PathBuf> = [
        "bin",
        "systemd",
        "pkg",
        ".ci",
        "tests/common",
        "tests/systemd",
    ]
    .iter()
    .map(|d| root.join(d))
    .collect();
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for (at, _) in text.match_indices("FORKD_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if name.len() > "FORKD_".len() && !name.ends_with('_') {
                names.insert(name);
            }
        }
    }
    for must in ["FORKD_PORTS", "FORKD_MAINTAINER", "FORKD_CONFIG"] {
        assert!(names.contains(must), "{must} not found in {files:?}");
    }
    for name in names {
        // A key's variable may refuse the value "1": it is a key's.
        if let Err(e) = RawConfig::default().apply_env([(name.clone(), "1".into())]) {
            assert!(matches!(e, ConfigError::Value { .. }), "{name}: {e}");
        }
    }
}
