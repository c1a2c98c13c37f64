//! The one rate limiter. Every policy (a route's `[rate_limit.policy]`,
//! the login limits, `/profile`'s) is taken here: in the one
//! all-or-nothing Redis call that also checks the session and reads the
//! cache ([`forkd_store::Store::route_check`]), so a refused request takes
//! a place in no bucket. While Redis cannot answer,
//! `rate_limit.on_redis_error` decides the same way for every policy; a
//! request whose session must be checked is 503 whatever it says. The
//! 429 is [`crate::refusal::Refusal::too_many`]; the `RateLimit` and
//! `RateLimit-Policy` items are formatted in [`crate::response`].

use std::time::Duration;

use forkd_store::{Bucket, CacheLookup, CacheProbe, Decision, Limit, RouteCheck, SessionRef};

use crate::lease;
use crate::refusal::Refusal;
use crate::state::State;
use crate::OnRedisError;

/// Where a check took its places.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Held {
    Redis,
    /// In this worker's memory: Redis did not answer (`local`).
    Local,
    /// Nowhere: Redis did not answer (`fail_open`).
    Nowhere,
}

/// What one check found.
pub(crate) struct Taken {
    /// (user, role) of the session, when one was checked.
    pub(crate) identity: Option<(String, String)>,
    /// One per limit, in order; None for one not reached (Redis Cluster
    /// stops at the first slot's call that refused) or not counted.
    pub(crate) decisions: Vec<Option<Decision>>,
    /// What the cache probe found, when it could be read in the call.
    pub(crate) probed: Option<CacheLookup>,
    pub(crate) held: Held,
}

impl Taken {
    /// The longest wait of the policies that refused, if any did.
    pub(crate) fn refused(&self) -> Option<Duration> {
        self.decisions
            .iter()
            .flatten()
            .filter(|d| !d.allowed)
            .map(|d| d.retry_after)
            .max()
    }
}

/// Checks `session` (when given), takes a place in each of `limits` (all
/// or none), and reads `probe`: None when the session has ended; Err is
/// the answer to send instead (503 when Redis cannot answer and the
/// policies may not go on without it).
pub(crate) async fn take(
    st: &State,
    session: Option<&SessionRef<'_>>,
    limits: &[Limit],
    probe: Option<&CacheProbe<'_>>,
) -> Result<Option<Taken>, Refusal> {
    if limits.iter().any(|l| l.policy.lease > 1) {
        return take_leased(st, session, limits, probe).await;
    }
    take_exact(st, session, limits, probe).await
}

/// [`take`] with leased limits: each spends a cell of this worker's
/// lease when it holds one, else asks Redis for a new lease in the call
/// the others make; a refusal puts back the cells spent here.
async fn take_leased(
    st: &State,
    session: Option<&SessionRef<'_>>,
    limits: &[Limit],
    probe: Option<&CacheProbe<'_>>,
) -> Result<Option<Taken>, Refusal> {
    let uid = session.map(|s| s.uid);
    let now = std::time::Instant::now();
    let mut spent: Vec<(usize, String, Decision)> = Vec::new();
    let mut asked: Vec<(usize, Limit, Option<String>)> = Vec::new();
    for (i, l) in limits.iter().enumerate() {
        if l.policy.lease <= 1 {
            asked.push((i, l.clone(), None));
            continue;
        }
        let key = lease::key(l, uid);
        match st.leases.spend(&key, now) {
            Some(d) => spent.push((i, key, d)),
            None => asked.push((
                i,
                Limit {
                    want: l.policy.lease,
                    ..l.clone()
                },
                Some(key),
            )),
        }
    }
    let ask: Vec<Limit> = asked.iter().map(|(_, l, _)| l.clone()).collect();
    let taken = match take_exact(st, session, &ask, probe).await {
        Ok(Some(t)) => t,
        other => {
            for (_, key, _) in &spent {
                st.leases.unspend(key);
            }
            return other;
        }
    };
    let refused = taken.refused().is_some();
    if !spent.is_empty() && !refused {
        st.host
            .count(crate::metrics::LEASE_SPENT, spent.len() as u64);
    }
    let mut decisions = vec![None; limits.len()];
    for ((i, l, key), d) in asked.into_iter().zip(taken.decisions) {
        if let (Some(key), Some(d)) = (key, d.filter(|_| !refused)) {
            st.host.count(
                crate::metrics::LEASE_KEPT,
                u64::from(d.cells.saturating_sub(1)),
            );
            st.leases.keep(key, &l, uid, &d);
        }
        decisions[i] = d;
    }
    for (i, key, d) in spent {
        if refused {
            st.leases.unspend(&key);
        }
        decisions[i] = Some(d);
    }
    Ok(Some(Taken { decisions, ..taken }))
}

/// Gives back the cells of the leases past their lifetime (every lease
/// with `all`, when the worker stops).
pub(crate) async fn end_leases(st: &State, all: bool) {
    for (limit, uid, cells) in st.leases.ended(std::time::Instant::now(), all) {
        match st.store.return_cells(&limit, uid.as_deref(), cells).await {
            Ok(()) => st
                .host
                .count(crate::metrics::LEASE_RETURNED, u64::from(cells)),
            Err(e) => st.redis_warnings.warn(
                format_args!("cannot give back leased rate-limit cells: {e}"),
                "Redis errors",
            ),
        }
    }
}

async fn take_exact(
    st: &State,
    session: Option<&SessionRef<'_>>,
    limits: &[Limit],
    probe: Option<&CacheProbe<'_>>,
) -> Result<Option<Taken>, Refusal> {
    let e = match st.store.route_check(session, limits, probe).await {
        Ok(RouteCheck::Unauthenticated) => return Ok(None),
        Ok(RouteCheck::Checked {
            identity,
            decisions,
            probed,
        }) => {
            return Ok(Some(Taken {
                identity,
                decisions,
                probed,
                held: Held::Redis,
            }))
        }
        Err(e) => e,
    };
    if session.is_some() || limits.is_empty() {
        return Err(st.redis_down(&e));
    }
    let held = match st.settings.on_redis_error {
        OnRedisError::FailClosed => return Err(st.redis_down(&e)),
        OnRedisError::FailOpen => Held::Nowhere,
        OnRedisError::Local => Held::Local,
    };
    st.redis_error(&e);
    let decisions = match held {
        Held::Local => local(st, limits),
        _ => vec![None; limits.len()],
    };
    Ok(Some(Taken {
        identity: None,
        decisions,
        probed: None,
        held,
    }))
}

/// All of `limits` in this worker's memory, with each limit shared out
/// among the workers; all or none, as in Redis.
fn local(st: &State, limits: &[Limit]) -> Vec<Option<Decision>> {
    let workers = st.settings.workers;
    let decisions: Vec<Option<Decision>> = limits
        .iter()
        .map(|l| Some(st.local_limits.check(&local_key(l), l.policy, workers)))
        .collect();
    if decisions.iter().flatten().any(|d| !d.allowed) {
        for (l, d) in limits.iter().zip(&decisions) {
            if d.is_some_and(|d| d.allowed) {
                st.local_limits.refund(&local_key(l), l.policy, workers);
            }
        }
    }
    decisions
}

fn local_key(l: &Limit) -> String {
    match &l.bucket {
        Bucket::Plain { name } | Bucket::Other { name, .. } => format!("{}:{name}", l.policy_name),
        Bucket::User { scope } => format!("{}:u{scope}", l.policy_name),
    }
}

/// Gives back the places `taken` holds in `limits` (a right password's),
/// where they were taken.
pub(crate) async fn give_back(st: &State, limits: &[Limit], taken: &Taken, uid: Option<&str>) {
    match taken.held {
        Held::Nowhere => {}
        Held::Local => {
            for l in limits {
                st.local_limits
                    .refund(&local_key(l), l.policy, st.settings.workers);
            }
        }
        Held::Redis => {
            if let Err(e) = st.store.refund_limits(limits, uid).await {
                st.redis_warnings.warn(
                    format_args!("cannot give back rate-limit places: {e}"),
                    "Redis errors",
                );
            }
        }
    }
}
