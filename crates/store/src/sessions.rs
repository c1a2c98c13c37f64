//! Sessions: created against the revocation epoch, looked up, ended,
//! counted.

use std::time::Duration;

use fred::prelude::*;

use crate::{scripts, Result, Store, User};

impl Store {
    /// Stores a session under the token's hash, for the generation of
    /// `user` as its login read it. Idle timeout renewed on use; absolute
    /// timeout fixed now; both enforced by Redis' clock. Returns false
    /// when the user's sessions were revoked since that read (the login
    /// raced a password change, revoke or deletion): no session is made.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn create_session(
        &self,
        user: &User,
        token_hash: &str,
        idle: Duration,
        absolute: Duration,
    ) -> Result<bool> {
        let n: i64 = self
            .run(
                scripts::create_session(),
                vec![
                    self.session_key(&user.uid, token_hash),
                    self.index_key(&user.uid),
                    self.epoch_key(&user.uid),
                ],
                vec![
                    user.name.clone().into(),
                    (idle.as_millis() as i64).into(),
                    (absolute.as_millis() as i64).into(),
                    token_hash.into(),
                    (user.generation as i64).into(),
                    user.role.clone().into(),
                ],
            )
            .await?;
        Ok(n == 1)
    }

    /// Ends one session. Returns whether it existed.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn end_session(&self, uid: &str, token_hash: &str) -> Result<bool> {
        let key = self.session_key(uid, token_hash);
        let n: i64 = self
            .run(
                scripts::end_session(),
                vec![key.clone(), self.index_key(uid)],
                vec![token_hash.into()],
            )
            .await?;
        // Gone from this worker's near cache before the logout is
        // answered; the others hear it from Redis.
        self.near_forget(&[key]);
        Ok(n == 1)
    }

    /// Removes the sessions the index of tag `uid` lists now, and only
    /// those index entries (a session created meanwhile keeps its own).
    /// Revocation itself is the epoch's job; this is the clean-up.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn remove_sessions(&self, uid: &str) -> Result<usize> {
        self.ready()?;
        let index = self.index_key(uid);
        let hashes: Vec<String> = self
            .client
            .zrange(&index, 0, -1, None, false, None, false)
            .await?;
        for chunk in hashes.chunks(500) {
            let mut keys = vec![index.clone()];
            keys.extend(chunk.iter().map(|h| self.session_key(uid, h)));
            let args: Vec<Value> = chunk.iter().map(|h| h.as_str().into()).collect();
            let _: i64 = self.run(scripts::remove_sessions(), keys, args).await?;
        }
        Ok(hashes.len())
    }

    /// Live sessions of the user with tag `uid`.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn session_count(&self, uid: &str) -> Result<u64> {
        let hashes: Vec<String> = self
            .run(
                scripts::live_sessions(),
                vec![self.index_key(uid)],
                Vec::new(),
            )
            .await?;
        if hashes.is_empty() {
            return Ok(0);
        }
        // Sessions that ran out of idle time are gone but still indexed.
        let keys: Vec<String> = hashes.iter().map(|h| self.session_key(uid, h)).collect();
        let n: i64 = self.client.exists(keys).await?;
        Ok(n.max(0) as u64)
    }
}
