//! `forkd limit show|reset POLICY BUCKET`: one `[rate_limit.policy]`
//! bucket, straight in Redis, as the workers count it; and
//! `forkd cache purge PREFIX`.
//!
//! BUCKET is `user:NAME`, `client:ADDRESS`, either with `:/ROUTE` after it
//! for a `user+route` policy, or `header:NAME:VALUE`.

use std::net::IpAddr;

use anyhow::{bail, Context};
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
        println!("purged {n} cached answer(s) under {prefix}");
        Ok(())
    })
}

pub(crate) fn run(config: &Config, cmd: LimitCommand) -> anyhow::Result<()> {
    let (LimitCommand::Show { policy, bucket } | LimitCommand::Reset { policy, bucket }) = &cmd;
    let (policy, bucket) = (policy.clone(), bucket.clone());
    let Some(p) = config.rate_limit.policy.get(&policy) else {
        let known: Vec<&str> = config
            .rate_limit
            .policy
            .keys()
            .map(String::as_str)
            .collect();
        bail!(
            "no policy '{policy}' in the configuration (policies: {})",
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        );
    };
    let target = parse(&bucket, &p.key)?;
    let rt = crate::users::runtime()?;
    rt.block_on(async {
        let store = crate::users::connect(config).await?;
        let uid = match &target {
            Target::User(name, _) => Some(
                store
                    .user(name)
                    .await?
                    .with_context(|| format!("no user '{name}'"))?
                    .uid,
            ),
            _ => None,
        };
        let b = target.bucket();
        match cmd {
            LimitCommand::Show { .. } => {
                let policy = forkd_store::Policy {
                    limit: p.limit as u32,
                    window: p.window,
                };
                let head = format!(
                    "policy {policy_name}: {} per {} s, by {}; bucket {bucket}",
                    p.limit,
                    p.window.as_secs_f64(),
                    p.key,
                    policy_name = policy_name(&cmd),
                );
                match store
                    .peek_bucket(policy_name(&cmd), &b, uid.as_deref(), policy)
                    .await?
                {
                    None => println!("{head}: {} left (whole)", p.limit),
                    Some(d) => println!(
                        "{head}: {} left, whole again in {} s",
                        d.remaining,
                        d.reset.as_millis().div_ceil(1000)
                    ),
                }
            }
            LimitCommand::Reset { .. } => {
                let held = store
                    .reset_bucket(policy_name(&cmd), &b, uid.as_deref())
                    .await?;
                println!(
                    "bucket {bucket} of policy {}: {}",
                    policy_name(&cmd),
                    if held { "reset" } else { "was already whole" }
                );
            }
        }
        Ok(())
    })
}

fn policy_name(cmd: &LimitCommand) -> &str {
    match cmd {
        LimitCommand::Show { policy, .. } | LimitCommand::Reset { policy, .. } => policy,
    }
}

enum Target {
    User(String, String),
    Client(IpAddr, String),
    Header(String, String),
}

impl Target {
    fn bucket(&self) -> Bucket {
        match self {
            Target::User(_, scope) => forkd_app::buckets::user(scope),
            Target::Client(ip, scope) => forkd_app::buckets::client(*ip, scope),
            Target::Header(name, value) => forkd_app::buckets::header(name, value.as_bytes()),
        }
    }
}

/// BUCKET, checked against what the policy counts by.
fn parse(text: &str, key: &PolicyKey) -> anyhow::Result<Target> {
    let (kind, rest) = text.split_once(':').unwrap_or((text, ""));
    // An optional ":/ROUTE" scope (for user+route).
    let scoped = |rest: &str| match rest.split_once(":/") {
        Some((who, route)) => (who.to_owned(), format!(":/{route}")),
        None => (rest.to_owned(), String::new()),
    };
    let target = match kind {
        "user" => {
            let (name, scope) = scoped(rest);
            if !forkd_store::valid_username(&name) {
                bail!("'{name}' is not a user name");
            }
            Target::User(name, scope)
        }
        "client" => {
            // An IPv6 address holds ':', so the scope is what follows ":/".
            let (addr, scope) = scoped(rest);
            let ip = addr
                .parse::<IpAddr>()
                .map_err(|_| anyhow::anyhow!("'{addr}' is not an IP address"))?;
            Target::Client(ip, scope)
        }
        "header" => {
            let Some((name, value)) = rest.split_once(':') else {
                bail!("expected header:NAME:VALUE");
            };
            Target::Header(name.to_ascii_lowercase(), value.to_owned())
        }
        _ => bail!(
            "'{text}': expected user:NAME[:/ROUTE], client:ADDRESS[:/ROUTE] or header:NAME:VALUE"
        ),
    };
    // A client's bucket also holds anonymous requests of a user policy
    // and requests without the header of a header policy.
    let fits = match (&target, key) {
        (Target::User(_, s) | Target::Client(_, s), PolicyKey::UserRoute) => !s.is_empty(),
        (Target::User(_, s), PolicyKey::User) => s.is_empty(),
        (Target::Client(_, s), _) => s.is_empty(),
        (Target::Header(n, _), PolicyKey::Header(h)) => n == h,
        _ => false,
    };
    if !fits {
        bail!("policy counts by {key}: bucket '{text}' is not one of its buckets");
    }
    Ok(target)
}
