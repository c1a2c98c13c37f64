//! `forkd limit show|reset POLICY BUCKET`: one bucket of a
//! `[rate_limit.policy]` or a built-in policy (`login-ip`, `login-user`,
//! `login-user-all`, `profile`), straight in Redis, as the workers count
//! it; and `forkd cache purge PREFIX`.
//!
//! BUCKET is `user:NAME`, `client:ADDRESS`, either with `:/ROUTE` after it
//! for a `user+route` policy, `header:NAME:VALUE`, or for `login-user`
//! `user:NAME,client:ADDRESS`.

use std::net::IpAddr;

use anyhow::{bail, Context};
use forkd_app::buckets;
use forkd_config::{Config, PolicyKey};
use forkd_store::Bucket;

use crate::cli::{CacheCommand, LimitCommand};

/// `forkd cache purge PREFIX`.
pub(crate) fn purge(config: &Config, cmd: CacheCommand) -> anyhow::Result<()> {
    let CacheCommand::Purge { prefix } = cmd;
    if !prefix.starts_with('/') {
        bail!("'{prefix}': expected a path prefix starting with '/'");
    }
    let rt = crate::users::runtime()?;
    rt.block_on(async {
        let store = crate::users::connect(config).await?;
        let n = store.cache_purge(&prefix).await?;
        outln!("purged {n} cached answer(s) under {prefix}");
        Ok(())
    })
}

/// What a policy counts by: a `[rate_limit.policy]`'s key, or one of the
/// built-in policies' buckets.
enum Counts {
    Route(PolicyKey),
    /// `login-ip`.
    LoginClient,
    /// `login-user`: the login name at one client.
    LoginNameClient,
    /// `login-user-all`: the login name at every client.
    LoginName,
    /// `profile`: the session's user.
    Profile,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Counts::Route(k) => write!(f, "{k}"),
            Counts::LoginClient => f.write_str("client"),
            Counts::LoginNameClient => f.write_str("login name and client"),
            Counts::LoginName => f.write_str("login name"),
            Counts::Profile => f.write_str("user"),
        }
    }
}

/// A policy of the configuration by name: its limit, window and what it
/// counts by.
fn policy(config: &Config, name: &str) -> anyhow::Result<(u64, std::time::Duration, Counts)> {
    let a = &config.auth;
    let builtin = match name {
        buckets::LOGIN_CLIENT => Some((a.login_ip_limit, a.login_ip_window, Counts::LoginClient)),
        buckets::LOGIN_NAME_CLIENT => Some((
            a.login_user_limit,
            a.login_user_window,
            Counts::LoginNameClient,
        )),
        buckets::LOGIN_NAME => Some((
            a.login_user_all_limit,
            a.login_user_all_window,
            Counts::LoginName,
        )),
        buckets::PROFILE => Some((
            config.rate_limit.profile.limit,
            config.rate_limit.profile.window,
            Counts::Profile,
        )),
        _ => None,
    };
    if let Some((limit, window, counts)) = builtin {
        return Ok((u64::from(limit), window, counts));
    }
    if let Some(p) = config.rate_limit.policy.get(name) {
        return Ok((p.limit, p.window, Counts::Route(p.key.clone())));
    }
    let known: Vec<&str> = forkd_config::BUILTIN_POLICIES
        .into_iter()
        .chain(config.rate_limit.policy.keys().map(String::as_str))
        .collect();
    bail!(
        "no policy '{name}' in the configuration (policies: {})",
        known.join(", ")
    );
}

pub(crate) fn run(config: &Config, cmd: LimitCommand) -> anyhow::Result<()> {
    let (LimitCommand::Show {
        policy: name,
        bucket: text,
    }
    | LimitCommand::Reset {
        policy: name,
        bucket: text,
    }) = &cmd;
    let (limit, window, counts) = policy(config, name)?;
    let (bucket, user) = parse(text, &counts)?;
    let rt = crate::users::runtime()?;
    rt.block_on(async {
        let store = crate::users::connect(config).await?;
        let uid = match &user {
            Some(name) => Some(
                store
                    .user(name)
                    .await?
                    .with_context(|| format!("no user '{name}'"))?
                    .uid,
            ),
            None => None,
        };
        match cmd {
            LimitCommand::Show { .. } => {
                let p = forkd_store::Policy {
                    limit: limit as u32,
                    window,
                    lease: 1,
                };
                let head = format!(
                    "policy {name}: {limit} per {} s, by {counts}; bucket {text}",
                    window.as_secs_f64(),
                );
                match store.peek_bucket(name, &bucket, uid.as_deref(), p).await? {
                    None => outln!("{head}: {limit} left (whole)"),
                    Some(d) => outln!(
                        "{head}: {} left, whole again in {} s",
                        d.remaining,
                        d.reset.as_millis().div_ceil(1000)
                    ),
                }
            }
            LimitCommand::Reset { .. } => {
                let held = store.reset_bucket(name, &bucket, uid.as_deref()).await?;
                outln!(
                    "bucket {text} of policy {name}: {}",
                    if held { "reset" } else { "was already whole" }
                );
            }
        }
        Ok(())
    })
}

/// BUCKET as written.
enum Target {
    User(String, String),
    Client(IpAddr, String),
    Header(String, String),
    /// `user:NAME,client:ADDRESS`.
    UserAtClient(String, IpAddr),
}

/// BUCKET, checked against what the policy counts by: the bucket, and
/// the user whose tag it needs, if any.
fn parse(text: &str, counts: &Counts) -> anyhow::Result<(Bucket, Option<String>)> {
    let target = read(text)?;
    let route = |k: &PolicyKey| match k {
        PolicyKey::User => Some(false),
        PolicyKey::UserRoute => Some(true),
        _ => None,
    };
    // A client's bucket also holds anonymous requests of a user policy
    // and requests without the header of a header policy.
    let found = match (target, counts) {
        (Target::User(n, s), Counts::Route(k)) if route(k) == Some(!s.is_empty()) => {
            Some((buckets::user(&s), Some(n)))
        }
        (Target::Client(ip, s), Counts::Route(k)) if s.is_empty() != (route(k) == Some(true)) => {
            Some((buckets::client(ip, &s), None))
        }
        (Target::Header(n, v), Counts::Route(PolicyKey::Header(h))) if &n == h => {
            Some((buckets::header(&n, v.as_bytes()), None))
        }
        (Target::Client(ip, s), Counts::LoginClient) if s.is_empty() => {
            Some((plain(buckets::login_client(ip)), None))
        }
        (Target::UserAtClient(n, ip), Counts::LoginNameClient) => {
            Some((plain(buckets::login_name_client(&n, ip)), None))
        }
        (Target::User(n, s), Counts::LoginName) if s.is_empty() => Some((plain(n), None)),
        (Target::User(n, s), Counts::Profile) if s.is_empty() => Some((buckets::user(""), Some(n))),
        _ => None,
    };
    found.with_context(|| {
        format!("policy counts by {counts}: bucket '{text}' is not one of its buckets")
    })
}

fn plain(name: String) -> Bucket {
    Bucket::Plain { name }
}

fn read(text: &str) -> anyhow::Result<Target> {
    let (kind, rest) = text.split_once(':').unwrap_or((text, ""));
    // An optional ":/ROUTE" scope (for user+route).
    let scoped = |rest: &str| match rest.split_once(":/") {
        Some((who, route)) => (who.to_owned(), format!(":/{route}")),
        None => (rest.to_owned(), String::new()),
    };
    let ip = |addr: &str| {
        addr.parse::<IpAddr>()
            .map_err(|_| anyhow::anyhow!("'{addr}' is not an IP address"))
    };
    let name = |name: String| {
        if forkd_store::valid_username(&name) {
            Ok(name)
        } else {
            Err(anyhow::anyhow!("'{name}' is not a user name"))
        }
    };
    Ok(match kind {
        "user" => match rest.split_once(",client:") {
            Some((who, addr)) => Target::UserAtClient(name(who.to_owned())?, ip(addr)?),
            None => {
                let (who, scope) = scoped(rest);
                Target::User(name(who)?, scope)
            }
        },
        "client" => {
            // An IPv6 address holds ':', so the scope is what follows ":/".
            let (addr, scope) = scoped(rest);
            Target::Client(ip(&addr)?, scope)
        }
        "header" => {
            let Some((name, value)) = rest.split_once(':') else {
                bail!("expected header:NAME:VALUE");
            };
            Target::Header(name.to_ascii_lowercase(), value.to_owned())
        }
        _ => bail!(
            "'{text}': expected user:NAME[:/ROUTE], client:ADDRESS[:/ROUTE], \
             user:NAME,client:ADDRESS or header:NAME:VALUE"
        ),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_built_in_policy_names_are_the_workers() {
        use forkd_app::buckets;
        assert_eq!(
            forkd_config::BUILTIN_POLICIES,
            [
                buckets::LOGIN_CLIENT,
                buckets::LOGIN_NAME_CLIENT,
                buckets::LOGIN_NAME,
                buckets::PROFILE
            ]
        );
    }
}
