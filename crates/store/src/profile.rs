//! The profile route's one round trip for a cache hit (session, limit,
//! cache), the single-flight lock, and the cache itself.

use std::time::Duration;

use fred::prelude::*;

use crate::{decision, scripts, Policy, ProfileCheck, Result, Store, StoreError};

impl Store {
    /// Session check (renewing its idle timeout), the user's rate limit
    /// under `policy_name`, and the cached profile, in one script.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn profile_check(
        &self,
        uid: &str,
        token_hash: &str,
        idle: Duration,
        policy_name: &str,
        policy: Policy,
    ) -> Result<ProfileCheck> {
        let keys = vec![
            self.session_key(uid, token_hash),
            self.index_key(uid),
            self.bucket_key(
                policy_name,
                &crate::Bucket::User {
                    scope: String::new(),
                },
                Some(uid),
            ),
            self.profile_key(uid),
            self.epoch_key(uid),
        ];
        let args: Vec<Value> = vec![
            (idle.as_millis() as i64).into(),
            token_hash.into(),
            (policy.limit as i64).into(),
            (policy.window.as_millis() as i64).into(),
        ];
        let reply: Vec<Value> = self.run(scripts::profile_check(), keys, args).await?;
        let int = |i: usize| reply.get(i).and_then(|v| v.as_i64()).unwrap_or(0);
        let text = |i: usize| reply.get(i).and_then(|v| v.as_string());
        match int(0) {
            0 => Ok(ProfileCheck::Unauthenticated),
            1 => Ok(ProfileCheck::Allowed {
                user: text(1).unwrap_or_default(),
                decision: decision(true, int(2), int(3), 0),
                cached: text(4),
            }),
            2 => Ok(ProfileCheck::Limited {
                user: text(1).unwrap_or_default(),
                decision: decision(false, 0, int(3), int(4)),
            }),
            other => Err(StoreError::Protocol(format!(
                "profile check returned {other}"
            ))),
        }
    }

    /// Takes the single-flight lock for filling `uid`'s profile.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn lock_profile(&self, uid: &str, owner: &str, ttl: Duration) -> Result<bool> {
        self.ready()?;
        let r: Option<String> = self
            .client
            .set(
                self.lock_key(uid),
                owner,
                Some(Expiration::PX(ttl.as_millis().max(1) as i64)),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        Ok(r.is_some())
    }

    /// Releases the lock if `owner` still holds it.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn unlock_profile(&self, uid: &str, owner: &str) -> Result<()> {
        let _: i64 = self
            .run(
                scripts::unlock(),
                vec![self.lock_key(uid)],
                vec![owner.into()],
            )
            .await?;
        Ok(())
    }

    /// The cached profile, if any.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn cached_profile(&self, uid: &str) -> Result<Option<String>> {
        self.ready()?;
        Ok(self.client.get(self.profile_key(uid)).await?)
    }

    /// Caches a profile for `ttl`.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn cache_profile(&self, uid: &str, json: &str, ttl: Duration) -> Result<()> {
        self.ready()?;
        let _: () = self
            .client
            .set(
                self.profile_key(uid),
                json,
                Some(Expiration::PX(ttl.as_millis().max(1) as i64)),
                None,
                false,
            )
            .await?;
        Ok(())
    }

    /// Drops a cached profile.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn forget_profile(&self, uid: &str) -> Result<()> {
        self.ready()?;
        let _: i64 = self.client.del(self.profile_key(uid)).await?;
        Ok(())
    }
}
