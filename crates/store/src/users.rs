//! Users: the `user:NAME` hashes, passwords, generations and the
//! revocation epoch.

use std::collections::HashMap;
use std::time::Duration;

use fred::prelude::*;
use futures::TryStreamExt;

use crate::{scripts, Result, Store, StoreError, User};

impl Store {
    /// Creates a user.
    ///
    /// # Errors
    /// [`StoreError::UserExists`], or Redis is unreachable.
    pub async fn add_user(&self, user: &User) -> Result<()> {
        let args: Vec<Value> = vec![
            "phc".into(),
            user.phc.clone().into(),
            "role".into(),
            user.role.clone().into(),
            "display_name".into(),
            user.display_name.clone().into(),
            "created_at".into(),
            (user.created_at as i64).into(),
            "last_login".into(),
            (user.last_login as i64).into(),
            "uid".into(),
            user.uid.clone().into(),
            "gen".into(),
            (user.generation as i64).into(),
        ];
        let created: i64 = self
            .run(
                scripts::create_user(),
                vec![self.user_key(&user.name)],
                args,
            )
            .await?;
        if created == 1 {
            Ok(())
        } else {
            Err(StoreError::UserExists(user.name.clone()))
        }
    }

    /// Reads a user.
    ///
    /// # Errors
    /// Redis is unreachable, or the record is damaged.
    pub async fn user(&self, name: &str) -> Result<Option<User>> {
        self.ready()?;
        let map: HashMap<String, String> = self.client.hgetall(self.user_key(name)).await?;
        if map.is_empty() {
            return Ok(None);
        }
        let get = |k: &str| map.get(k).cloned().unwrap_or_default();
        let num = |k: &str| map.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
        let user = User {
            name: name.to_owned(),
            phc: get("phc"),
            role: get("role"),
            display_name: get("display_name"),
            created_at: num("created_at"),
            last_login: num("last_login"),
            uid: get("uid"),
            generation: num("gen"),
        };
        if user.phc.is_empty() || user.uid.is_empty() {
            return Err(StoreError::Protocol(format!(
                "user record '{name}' is incomplete"
            )));
        }
        Ok(Some(user))
    }

    /// Replaces a user's password hash (only if the user exists) and ends
    /// every session of the old one at once, including one a login that
    /// read the old hash creates later. Returns the user's tag.
    ///
    /// # Errors
    /// [`StoreError::NoSuchUser`], or Redis is unreachable.
    pub async fn set_password(&self, name: &str, phc: &str) -> Result<String> {
        let reply: Option<(i64, String)> = self
            .run(
                scripts::new_password(),
                vec![self.user_key(name)],
                vec![phc.into()],
            )
            .await?;
        let (generation, uid) = reply.ok_or_else(|| StoreError::NoSuchUser(name.to_owned()))?;
        self.raise_epoch(&uid, generation, Duration::ZERO).await?;
        Ok(uid)
    }

    /// Stores the re-hash of a password just verified at `generation`,
    /// unless a password change came in between. Returns whether it did.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn rehash(&self, name: &str, phc: &str, generation: u64) -> Result<bool> {
        let n: i64 = self
            .run(
                scripts::rehash(),
                vec![self.user_key(name)],
                vec![phc.into(), (generation as i64).into()],
            )
            .await?;
        Ok(n == 1)
    }

    /// Ends every session of the user now, and any a racing login creates
    /// later; removes them. Returns how many were removed.
    ///
    /// # Errors
    /// [`StoreError::NoSuchUser`], or Redis is unreachable.
    pub async fn revoke(&self, name: &str) -> Result<usize> {
        let uid = self.new_generation(name, Duration::ZERO, false).await?;
        self.remove_sessions(&uid).await
    }

    /// A new generation for `name`, and the epoch of its tag raised to it
    /// (past every generation with `tombstone`), kept for `keep` (zero: for
    /// good). Returns the tag.
    async fn new_generation(&self, name: &str, keep: Duration, tombstone: bool) -> Result<String> {
        let reply: Option<(i64, String)> = self
            .run(
                scripts::new_generation(),
                vec![self.user_key(name)],
                Vec::new(),
            )
            .await?;
        let (generation, uid) = reply.ok_or_else(|| StoreError::NoSuchUser(name.to_owned()))?;
        // Past every generation, and exact in Lua's doubles (i64::MAX is
        // not: it would come back negative).
        let epoch = if tombstone { 1 << 53 } else { generation };
        self.raise_epoch(&uid, epoch, keep).await?;
        Ok(uid)
    }

    async fn raise_epoch(&self, uid: &str, generation: i64, keep: Duration) -> Result<()> {
        let _: i64 = self
            .run(
                scripts::raise_epoch(),
                vec![self.epoch_key(uid)],
                vec![generation.into(), (keep.as_millis() as i64).into()],
            )
            .await?;
        Ok(())
    }

    /// Records a successful login.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn touch_login(&self, name: &str, unix_secs: u64) -> Result<()> {
        let _: i64 = self
            .run(
                scripts::update_if_exists(),
                vec![self.user_key(name)],
                vec!["last_login".into(), (unix_secs as i64).into()],
            )
            .await?;
        Ok(())
    }

    /// Deletes a user, its sessions and its cached profile. Its tag's
    /// epoch stays as a tombstone for `keep` (the longest a session lives),
    /// so that a session a racing login creates is never valid.
    ///
    /// # Errors
    /// [`StoreError::NoSuchUser`], or Redis is unreachable.
    pub async fn delete_user(&self, name: &str, keep: Duration) -> Result<()> {
        let uid = self
            .new_generation(name, keep.max(Duration::from_secs(1)), true)
            .await?;
        let _: i64 = self.client.del(self.user_key(name)).await?;
        self.remove_sessions(&uid).await?;
        let _: i64 = self.client.del(self.index_key(&uid)).await?;
        self.forget_cached(&uid).await?;
        Ok(())
    }

    /// Every user name, sorted.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn user_names(&self) -> Result<Vec<String>> {
        self.ready()?;
        let pattern = format!("{}user:*", escape_glob(&self.prefix));
        let strip = self.user_key("");
        let mut names: Vec<String> = self
            .scan(pattern)
            .await?
            .iter()
            .filter_map(|k| k.as_str()?.strip_prefix(&strip).map(str::to_owned))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Drops everything the response cache holds of user `uid` (their
    /// `/profile` and their entries of every route, with the specs, sets
    /// and locks beside them): after a password change or a deletion,
    /// nothing made for the old user is served. A SCAN of the keyspace
    /// for the user's tag, as `forkd user list` scans for users.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn forget_cached(&self, uid: &str) -> Result<usize> {
        self.ready()?;
        let tagged = self.tagged(uid, "cache");
        let keys = self.scan(format!("{}*", escape_glob(&tagged))).await?;
        let index = self.cache_index();
        let mut dropped = 0;
        for key in keys {
            let n: i64 = self.client.del(&key).await?;
            let _: i64 = self.client.zrem(&index, key).await?;
            dropped += usize::from(n > 0);
        }
        Ok(dropped)
    }

    /// The keys `pattern` matches (on every primary of a cluster).
    async fn scan(&self, pattern: String) -> Result<Vec<fred::types::Key>> {
        Ok(if self.client.is_clustered() {
            self.client
                .scan_cluster_buffered(pattern, Some(500), None)
                .try_collect()
                .await?
        } else {
            self.client
                .scan_buffered(pattern, Some(500), None)
                .try_collect()
                .await?
        })
    }
}

fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
