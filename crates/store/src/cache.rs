//! The response cache of GET routes: one entry per URL and variant (the
//! request's values of the headers the response's `Vary` names), the
//! variant spec per URL, the set of a URL's entries (so that a write to
//! the URL ends them all), a single-flight lock per entry, and an index of
//! entries for `forkd cache purge`.
//!
//! A user's entries carry the user's tag (their slot); a shared entry's
//! tag is a hash of its URL, so an entry, its spec and its lock share a
//! slot. Entry keys hold the URL in clear after `:cache:`, and the index
//! (one sorted set, scored by expiry) lists them all.

use std::time::Duration;

use fred::prelude::*;

use crate::{scripts, Result, Store};

/// Whose cache an entry is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheScope {
    /// A user's (the tag of a session's user).
    User(String),
    /// Everyone's; the tag is a hash of the URL, made by the caller.
    Shared(String),
}

/// One URL in one scope: where its spec, entries and lock live.
#[derive(Debug, Clone)]
pub struct CacheUrl {
    tag: String,
    /// Path and query.
    target: String,
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheLookup {
    /// The header names the URL's responses vary on, as stored (None when
    /// nothing is cached for the URL, and when the entry was found: it was
    /// made under the spec its variant names).
    pub spec: Option<String>,
    /// The entry for the variant asked for, and the ms it has left.
    pub entry: Option<(bytes::Bytes, i64)>,
}

/// A stored entry as fred's reply buffer (no copy), whichever way fred
/// typed it.
pub(crate) fn entry_bytes(v: &Value) -> Option<bytes::Bytes> {
    match v {
        Value::Bytes(b) => Some(b.clone()),
        Value::String(s) => Some(s.inner().clone()),
        _ => None,
    }
}

impl CacheLookup {
    /// From a script's {spec or nil, entry or nil, the entry's ms left}.
    pub(crate) fn from_reply(reply: &[Value]) -> Self {
        let spec = reply
            .first()
            .filter(|v| !v.is_null())
            .and_then(Value::as_string);
        let entry = reply.get(1).and_then(entry_bytes);
        let ttl = reply.get(2).and_then(Value::as_i64).unwrap_or(0);
        CacheLookup {
            spec,
            entry: entry.map(|e| (e, ttl)),
        }
    }
}

impl CacheUrl {
    /// Whether the URL's keys share the slot of user `uid`'s keys.
    pub(crate) fn in_slot_of(&self, uid: &str) -> bool {
        self.tag == uid
    }
}

impl Store {
    pub fn cache_url(&self, scope: &CacheScope, target: &str) -> CacheUrl {
        let tag = match scope {
            CacheScope::User(uid) => uid.clone(),
            CacheScope::Shared(hash) => format!("s:{hash}"),
        };
        CacheUrl {
            tag,
            target: target.to_owned(),
        }
    }

    /// A URL's spec key and the entry key of `variant`.
    pub(crate) fn cache_keys(&self, url: &CacheUrl, variant: &str) -> [String; 2] {
        [
            self.tagged_key(&url.tag, &["cachevary:", &url.target]),
            self.tagged_key(&url.tag, &["cache:", &url.target, "#", variant]),
        ]
    }

    fn cache_lock_key(&self, url: &CacheUrl, variant: &str) -> String {
        self.tagged_key(&url.tag, &["cachelock:", &url.target, "#", variant])
    }

    /// The set of a URL's entry keys for one host (`host`: a tag of the
    /// `Host` the entries were made for), for ending them all at once.
    fn cache_variants(&self, url: &CacheUrl, host: &str) -> String {
        format!(
            "{}{{{}}}:cachevariants:{}#{host}",
            self.prefix, url.tag, url.target
        )
    }

    pub(crate) fn cache_index(&self) -> String {
        format!("{}{{cacheindex}}:entries", self.prefix)
    }

    /// The URL's spec and the entry of `variant`, in one call.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn cache_get(&self, url: &CacheUrl, variant: &str) -> Result<CacheLookup> {
        let [spec, entry] = self.cache_keys(url, variant);
        let reply: Vec<Value> = self
            .run(scripts::cache_get(), vec![spec, entry], vec![])
            .await?;
        Ok(CacheLookup::from_reply(&reply))
    }

    /// Stores an entry and its URL's spec for `ttl`, and lists it for
    /// purges and among the entries of its URL and host (`host`).
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn cache_put(
        &self,
        url: &CacheUrl,
        host: &str,
        (spec, variant): (&str, &str),
        entry: &[u8],
        ttl: Duration,
    ) -> Result<()> {
        let [spec_key, entry_key] = self.cache_keys(url, variant);
        let ms = ttl.as_millis().max(1) as i64;
        let _: () = self
            .run(
                scripts::cache_put(),
                vec![spec_key, entry_key.clone(), self.cache_variants(url, host)],
                vec![spec.into(), Value::Bytes(entry.to_vec().into()), ms.into()],
            )
            .await?;
        let _: i64 = self
            .run(
                scripts::cache_index(),
                vec![self.cache_index()],
                vec![entry_key.into(), ms.into()],
            )
            .await?;
        Ok(())
    }

    /// Ends every entry of a URL made for one host (each variant), in one
    /// call: after a method that is not safe succeeded on it (RFC 9111
    /// section 4.4; the target URI includes its authority, so another
    /// host's entries stay).
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn cache_invalidate(&self, url: &CacheUrl, host: &str) -> Result<()> {
        let ended: Vec<String> = self
            .run(
                scripts::cache_invalidate(),
                vec![self.cache_variants(url, host)],
                vec![],
            )
            .await?;
        // Gone from this worker's near cache before the write is answered;
        // the others hear it from Redis.
        self.near_forget(&ended);
        Ok(())
    }

    /// Takes the single-flight lock of an entry for `ttl`.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn cache_lock(
        &self,
        url: &CacheUrl,
        variant: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<bool> {
        self.lock(self.cache_lock_key(url, variant), owner, ttl)
            .await
    }

    /// Releases the lock if `owner` holds it.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn cache_unlock(&self, url: &CacheUrl, variant: &str, owner: &str) -> Result<()> {
        self.unlock(self.cache_lock_key(url, variant), owner).await
    }

    /// Takes a single-flight lock (`SET NX PX`) for `owner`.
    async fn lock(&self, key: String, owner: &str, ttl: Duration) -> Result<bool> {
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
    async fn unlock(&self, key: String, owner: &str) -> Result<()> {
        let _: i64 = self
            .run(scripts::unlock(), vec![key], vec![owner.into()])
            .await?;
        Ok(())
    }

    /// Deletes every cached entry whose path starts with `prefix`, in
    /// every scope; how many.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn cache_purge(&self, prefix: &str) -> Result<usize> {
        self.ready()?;
        let index = self.cache_index();
        let entries: Vec<String> = self
            .client
            .zrange(&index, 0, -1, None, false, None, false)
            .await?;
        let mut purged = 0;
        for key in entries {
            let Some((_, url)) = key.split_once(":cache:") else {
                continue;
            };
            if !url.starts_with(prefix) {
                continue;
            }
            let n: i64 = self.client.del(&key).await?;
            let _: i64 = self.client.zrem(&index, &key).await?;
            purged += usize::from(n > 0);
        }
        Ok(purged)
    }
}
