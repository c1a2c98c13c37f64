//! A routed request's session and rate limits, in one script call: the
//! session's keys and a user's buckets share the user's hash slot, so on a
//! single Redis (or when every bucket is the user's) it is one round trip.
//! On Redis Cluster, buckets of other slots (a client's, a header value's)
//! take one more call per slot, made only when the ones before allowed;
//! when a later one refuses, the places the earlier ones took are given
//! back, so that a refused request costs no bucket anything there either.

use std::time::Duration;

use fred::prelude::*;

use crate::{
    decision, scripts, CacheLookup, CacheUrl, Decision, Policy, Result, Store, StoreError,
};

/// Whose bucket a limit counts in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bucket {
    /// The session's user (`scope` "" for the user alone, or a route).
    User { scope: String },
    /// Anything else: a client address, a header's value. Buckets with
    /// the same `group` share a hash slot.
    Other { group: String, name: String },
    /// A bucket of the login limits (by client, by name), in no slot group.
    Plain { name: String },
}

/// One limit to apply.
#[derive(Debug, Clone)]
pub struct Limit {
    pub policy_name: String,
    pub policy: Policy,
    pub bucket: Bucket,
    /// Cells to take: 1, or for a lease up to the policy's `lease`.
    pub want: u32,
}

/// What one call of a check took: its keys, and the policy and cells of
/// each, to give back if a later call refuses.
type Taken = (Vec<String>, Vec<(Policy, u32)>);

/// What [`Store::route_check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteCheck {
    /// A session was asked for and there is none (any longer).
    Unauthenticated,
    /// `identity`: (user, role) when a session was checked; `decisions` in
    /// the order of the limits (None for one not reached: on Redis Cluster,
    /// the calls stop at the first that refused), a place taken in each
    /// only if all of its call allowed.
    Checked {
        identity: Option<(String, String)>,
        decisions: Vec<Option<Decision>>,
        /// What the probe found, when it could be read in the first call
        /// and every limit allowed.
        probed: Option<CacheLookup>,
    },
}

/// A cache entry to read in the same call once the limits allow: on a
/// single Redis always; on Redis Cluster only a user's, which shares the
/// session's slot.
pub enum CacheProbe<'a> {
    /// A route's entry of one variant, with its URL's spec.
    Entry { url: &'a CacheUrl, variant: &'a str },
}

/// A session to check: the token's (uid, hash), and the idle timeout.
pub struct SessionRef<'a> {
    pub uid: &'a str,
    pub token_hash: &'a str,
    pub idle: Duration,
    /// The near cache vouched for it: not checked again, its user's
    /// buckets and cache are still its user's.
    pub verified: bool,
}

impl Store {
    /// The Redis key of a bucket; `uid` is the user's tag for a user's.
    pub(crate) fn bucket_key(
        &self,
        policy_name: &str,
        bucket: &Bucket,
        uid: Option<&str>,
    ) -> String {
        match (bucket, uid) {
            (Bucket::User { scope }, Some(uid)) => {
                self.tagged_key(uid, &["rl:", policy_name, ":u", scope])
            }
            (Bucket::User { scope }, None) => format!("{}rl:{policy_name}:u{scope}", self.prefix),
            (Bucket::Plain { name }, _) => format!("{}rl:{policy_name}:{name}", self.prefix),
            (Bucket::Other { group, name }, _) => {
                format!("{}{{{group}}}:rl:{policy_name}:{name}", self.prefix)
            }
        }
    }

    /// What is left in a bucket now (`forkd limit show`): None when it is
    /// whole (never used, or used long enough ago).
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn peek_bucket(
        &self,
        policy_name: &str,
        bucket: &Bucket,
        uid: Option<&str>,
        policy: Policy,
    ) -> Result<Option<Decision>> {
        let key = self.bucket_key(policy_name, bucket, uid);
        let reply: Vec<Value> = self.run(scripts::peek(), vec![key], vec![]).await?;
        let now = reply.get(1).and_then(Value::as_i64).unwrap_or(0) as f64;
        let Some(tat) = reply
            .first()
            .and_then(Value::as_string)
            .and_then(|t| t.parse::<f64>().ok())
        else {
            return Ok(None);
        };
        if tat <= now {
            return Ok(None);
        }
        let window = policy.window.as_millis() as f64;
        let emission = window / f64::from(policy.limit.max(1));
        let left = ((now + window - tat) / emission).floor().max(0.0) as i64;
        Ok(Some(decision(left > 0, left, (tat - now).ceil() as i64, 0)))
    }

    /// Makes a bucket whole again (`forkd limit reset`); whether it held
    /// anything.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn reset_bucket(
        &self,
        policy_name: &str,
        bucket: &Bucket,
        uid: Option<&str>,
    ) -> Result<bool> {
        self.ready()?;
        let n: i64 = self
            .client
            .del(self.bucket_key(policy_name, bucket, uid))
            .await?;
        Ok(n > 0)
    }

    /// The calls `limits` take: the session with the user's buckets first,
    /// then one per other slot group (all in the first on a single Redis).
    fn slot_groups(&self, limits: &[Limit], session: bool) -> Vec<(Option<String>, Vec<usize>)> {
        let clustered = self.clustered;
        let mut calls: Vec<(Option<String>, Vec<usize>)> = vec![(None, Vec::new())];
        for (i, l) in limits.iter().enumerate() {
            let group = match &l.bucket {
                Bucket::Other { group, .. } if clustered => Some(group.clone()),
                Bucket::User { .. } if clustered && !session => Some(String::new()),
                Bucket::Plain { name } if clustered => {
                    Some(format!("plain:{}:{name}", l.policy_name))
                }
                _ => None,
            };
            match calls.iter_mut().find(|(g, _)| *g == group) {
                Some((_, v)) => v.push(i),
                None => calls.push((group, vec![i])),
            }
        }
        calls
    }

    /// Gives back the places one [`Store::route_check`] took in `limits`
    /// (`uid`: the session's user, for a user's buckets): one call on a
    /// single Redis, one per slot group on Redis Cluster.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn refund_limits(&self, limits: &[Limit], uid: Option<&str>) -> Result<()> {
        for (_, members) in self.slot_groups(limits, uid.is_some()) {
            if members.is_empty() {
                continue;
            }
            let keys = members
                .iter()
                .map(|&i| self.bucket_key(&limits[i].policy_name, &limits[i].bucket, uid))
                .collect();
            let policies: Vec<(Policy, u32)> =
                members.iter().map(|&i| (limits[i].policy, 1)).collect();
            self.refund_keys(keys, &policies).await?;
        }
        Ok(())
    }

    /// Gives back, best effort, the places earlier calls of one check
    /// took (one call per slot group); a failure is logged.
    async fn refund_taken(&self, taken: &[Taken]) {
        for (keys, policies) in taken {
            if let Err(e) = self.refund_keys(keys.clone(), policies).await {
                log::warn!("cannot give back rate-limit places: {e}");
            }
        }
    }

    /// Gives back `cells` of `limit` (`uid`: the user, for a user's
    /// bucket) that a lease took and did not spend.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn return_cells(&self, limit: &Limit, uid: Option<&str>, cells: u32) -> Result<()> {
        let key = self.bucket_key(&limit.policy_name, &limit.bucket, uid);
        self.refund_keys(vec![key], &[(limit.policy, cells)]).await
    }

    /// One refund call for keys of one slot: (policy, cells) of each.
    async fn refund_keys(&self, keys: Vec<String>, policies: &[(Policy, u32)]) -> Result<()> {
        let args: Vec<Value> = policies
            .iter()
            .flat_map(|(p, cells)| {
                [
                    (p.limit as i64).into(),
                    (p.window.as_millis() as i64).into(),
                    i64::from(*cells).into(),
                ]
            })
            .collect();
        let _: i64 = self.run(scripts::refund(), keys, args).await?;
        Ok(())
    }

    /// Checks `session` (when given) and applies `limits`.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn route_check(
        &self,
        session: Option<&SessionRef<'_>>,
        limits: &[Limit],
        probe: Option<&CacheProbe<'_>>,
    ) -> Result<RouteCheck> {
        let key = |l: &Limit| self.bucket_key(&l.policy_name, &l.bucket, session.map(|s| s.uid));
        let calls = self.slot_groups(limits, session.is_some());
        let clustered = self.clustered;
        let probe = probe.filter(|CacheProbe::Entry { url, .. }| {
            !clustered || session.is_some_and(|s| url.in_slot_of(s.uid))
        });
        let mut identity = None;
        let mut probed = None;
        let mut decisions = vec![None; limits.len()];
        let mut taken: Vec<Taken> = Vec::new();
        for (n, (_, members)) in calls.iter().enumerate() {
            let with_session = n == 0 && session.is_some_and(|s| !s.verified);
            let probing = probe.filter(|_| n == 0);
            if members.is_empty() && !with_session && probing.is_none() {
                continue;
            }
            let mut keys = Vec::with_capacity(3 + members.len());
            let mut args: Vec<Value> = Vec::with_capacity(4 + 2 * members.len());
            match session.filter(|_| with_session) {
                Some(s) => {
                    keys.extend([
                        self.session_key(s.uid, s.token_hash),
                        self.index_key(s.uid),
                        self.epoch_key(s.uid),
                    ]);
                    args.extend(["1".into(), (s.idle.as_millis() as i64).into()]);
                    args.push(s.token_hash.into());
                }
                None => args.extend(["0".into(), 0i64.into(), "".into()]),
            }
            args.push((members.len() as i64).into());
            let first_limit = keys.len();
            for &i in members {
                keys.push(key(&limits[i]));
                let p = limits[i].policy;
                args.push((p.limit as i64).into());
                args.push((p.window.as_millis() as i64).into());
                args.push(i64::from(limits[i].want.max(1)).into());
            }
            let limit_keys = keys[first_limit..].to_vec();
            match probing {
                Some(CacheProbe::Entry { url, variant }) => {
                    let [spec, entry] = self.cache_keys(url, variant);
                    keys.extend([spec, entry]);
                    args.push(2i64.into());
                }
                None => args.push(0i64.into()),
            }
            // The limits alone: the smaller script, the same reply.
            let call = if !with_session && probing.is_none() {
                args = args.into_iter().skip(4).take(3 * members.len()).collect();
                self.run(scripts::take(), keys, args)
            } else {
                self.run(scripts::route_check(), keys, args)
            };
            let reply: Vec<Value> = match call.await {
                Ok(r) => r,
                Err(e) => {
                    // The earlier slots' places would stay taken for a
                    // request that is not answered by these limits.
                    self.refund_taken(&taken).await;
                    return Err(e);
                }
            };
            let int = |i: usize| reply.get(i).and_then(Value::as_i64).unwrap_or(0);
            match int(0) {
                0 => return Ok(RouteCheck::Unauthenticated),
                1 | 2 => {}
                other => {
                    self.refund_taken(&taken).await;
                    return Err(StoreError::Protocol(format!(
                        "route check returned {other}"
                    )));
                }
            }
            if with_session {
                let text = |i: usize| reply.get(i).and_then(Value::as_string).unwrap_or_default();
                identity = Some((text(1), text(2)));
            }
            for (k, &i) in members.iter().enumerate() {
                let at = 3 + 5 * k;
                let mut d = decision(int(at) == 1, int(at + 1), int(at + 2), int(at + 3));
                d.cells = u32::try_from(int(at + 4)).unwrap_or(0);
                decisions[i] = Some(d);
            }
            if int(0) == 2 {
                // Refused: what the earlier calls took goes back. A
                // refund that fails leaves the refusal a refusal.
                self.refund_taken(&taken).await;
                break;
            }
            if !members.is_empty() {
                taken.push((
                    limit_keys,
                    members
                        .iter()
                        .map(|&i| (limits[i].policy, decisions[i].map_or(1, |d| d.cells)))
                        .collect(),
                ));
            }
            let rest = &reply[(3 + 5 * members.len()).min(reply.len())..];
            if probing.is_some() {
                probed = Some(CacheLookup::from_reply(rest));
            }
        }
        Ok(RouteCheck::Checked {
            identity,
            decisions,
            probed,
        })
    }
}
