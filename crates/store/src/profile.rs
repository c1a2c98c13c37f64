//! The profile's cache and its single-flight lock (its one round trip for
//! a hit is [`Store::route_check`] with [`crate::CacheProbe::Profile`]).

use std::time::Duration;

use fred::prelude::*;

use crate::{scripts, Result, Store};

impl Store {
    /// Takes the single-flight lock for filling `uid`'s profile.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn lock_profile(&self, uid: &str, owner: &str, ttl: Duration) -> Result<bool> {
        self.lock(self.lock_key(uid), owner, ttl).await
    }

    /// Releases the lock if `owner` still holds it.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn unlock_profile(&self, uid: &str, owner: &str) -> Result<()> {
        self.unlock(self.lock_key(uid), owner).await
    }

    /// Takes a single-flight lock (`SET NX PX`) for `owner`.
    pub(crate) async fn lock(&self, key: String, owner: &str, ttl: Duration) -> Result<bool> {
        self.ready()?;
        let set: Option<String> = self
            .client
            .set(
                key,
                owner,
                Some(Expiration::PX(ttl.as_millis().max(1) as i64)),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        Ok(set.is_some())
    }

    /// Releases a lock only if `owner` still holds it.
    pub(crate) async fn unlock(&self, key: String, owner: &str) -> Result<()> {
        let _: i64 = self
            .run(scripts::unlock(), vec![key], vec![owner.into()])
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
