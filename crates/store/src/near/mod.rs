//! The near cache: sessions and cached answers kept in the worker's
//! memory, and kept true by Redis (server-assisted client-side caching,
//! `CLIENT TRACKING`).
//!
//! - Two connections of the near cache's own to each primary, beside the
//!   command client: the *listener* (RESP2) subscribes to
//!   `__redis__:invalidate`; the *reader* has tracking on, in the default
//!   mode, redirected to the listener on the same node. Redis remembers
//!   every key the reader reads and tells the listener when one changes,
//!   expires or is evicted; `FLUSHALL` or `FLUSHDB` is a message with no
//!   keys. Everything the near cache holds was read on the reader of the
//!   primary that owns the key. Rate-limit keys never are: their writes,
//!   one a request, cost no invalidation. (`BCAST` mode tracks by prefix,
//!   but a key's kind comes after its hash tag: no prefix tells a session
//!   from a rate-limit key.)
//! - One primary when standalone or under Sentinel (found through the
//!   sentinels, as the command client finds it); on Redis Cluster, a pair
//!   for each primary in the command client's map of the slots, and a key
//!   is read on the reader of the primary that owns its slot.
//! - A fill puts a placeholder in before its read and keeps what it read
//!   only if its placeholder is still there: an invalidation that came in
//!   before the reply (on the other connection) took it out.
//! - What is served is never older than Redis' own expiry of the key
//!   (counted from before the read was sent) nor than `max_age`.
//! - Any connection lost or killed, tracking not confirmed, a node no
//!   longer a primary, a changed map of the slots, a `MOVED` or `ASK`
//!   answer to a fill, a flush, a lagged or closed invalidation channel:
//!   everything is dropped, and nothing is served from memory until every
//!   pair is back and tracking is on again. Requests meanwhile take the
//!   Redis path, which answers 503 while Redis cannot be reached, as
//!   without a near cache.
//! - Bounded: at most `max_bytes` of keys and values, least recently used
//!   first out.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::prelude::*;
use fred::types::Value as FredValue;
use lru::LruCache;

use crate::{Store, StoreConfig};

mod tracking;

use tracking::track;
pub(crate) use tracking::Readers;

/// What the near cache holds under a key.
#[derive(Debug, Clone)]
enum Value {
    /// A session: its user, role and generation; when its idle expiry is
    /// due for renewal (which only the Redis path does).
    Session {
        user: String,
        role: String,
        generation: u64,
        renew_at: Instant,
    },
    /// A user's revocation epoch (0 when unset).
    Epoch(u64),
    /// A cached answer, as stored, and when Redis expires it (its `Age`
    /// is counted from that, whatever `max_age` cuts off).
    Entry(Bytes, Instant),
}

enum Slot {
    /// A fill's read is on its way.
    Pending(u64),
    Ready {
        value: Value,
        until: Instant,
        size: usize,
    },
}

struct Inner {
    slots: LruCache<Vec<u8>, Slot>,
    bytes: usize,
    next_fill: u64,
}

/// Counts for `/metrics` and `forkd status`, taken (and zeroed) by
/// [`Store::near_counts`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NearCounts {
    pub hits: u64,
    pub misses: u64,
    pub invalidations: u64,
    pub flushes: u64,
    /// Now, not taken: entries and bytes held.
    pub entries: u64,
    pub bytes: u64,
}

/// One worker's near cache.
pub(crate) struct Near {
    inner: Mutex<Inner>,
    /// Tracking is known to be on: what is held may be served.
    live: AtomicBool,
    max_bytes: usize,
    max_age: Duration,
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
    flushes: AtomicU64,
    /// The slowest listener's PING at the last check, in microseconds
    /// (u64::MAX: none since tracking was last made).
    ping_us: AtomicU64,
}

/// Bytes a slot is counted for beside its key and value.
const SLOT_OVERHEAD: usize = 96;

impl Near {
    pub(crate) fn new(max_bytes: usize, max_age: Duration) -> Near {
        Near {
            inner: Mutex::new(Inner {
                slots: LruCache::unbounded(),
                bytes: 0,
                next_fill: 0,
            }),
            live: AtomicBool::new(false),
            max_bytes,
            max_age,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            ping_us: AtomicU64::new(u64::MAX),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere leaves nothing half-written that a lookup
        // could misread: every change is one insert or remove.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value held under `key`, if it may be served now.
    fn get(&self, key: &[u8], now: Instant) -> Option<(Value, Instant)> {
        if !self.live.load(Relaxed) {
            return None;
        }
        let mut inner = self.lock();
        match inner.slots.get(key) {
            Some(Slot::Ready { value, until, .. }) if now < *until => Some((value.clone(), *until)),
            _ => None,
        }
    }

    /// Counts a lookup that the near cache answered, or could not.
    pub(crate) fn count(&self, hit: bool) {
        let c = if hit { &self.hits } else { &self.misses };
        c.fetch_add(1, Relaxed);
    }

    /// Puts a placeholder under `key` unless another fill's is there:
    /// the number to complete it with. A value held is replaced: a fill
    /// follows a request the near cache could not answer (its session
    /// was due for renewal, or its user's epoch was gone), so what is
    /// held may be what cannot be served.
    fn begin(&self, key: &[u8]) -> Option<u64> {
        if !self.live.load(Relaxed) {
            return None;
        }
        let mut inner = self.lock();
        if let Some(Slot::Pending(_)) = inner.slots.peek(key) {
            return None;
        }
        inner.next_fill += 1;
        let n = inner.next_fill;
        Self::put(&mut inner, key.to_vec(), Slot::Pending(n), 0);
        Some(n)
    }

    /// Stores what fill `n` read, if its placeholder is still there.
    fn complete(&self, key: &[u8], n: u64, value: Option<(Value, Instant)>) {
        let mut inner = self.lock();
        if !matches!(inner.slots.peek(key), Some(Slot::Pending(m)) if *m == n) {
            return;
        }
        let Some((value, until)) = value else {
            Self::remove(&mut inner, key);
            return;
        };
        let until = until.min(Instant::now() + self.max_age);
        let size = key.len()
            + SLOT_OVERHEAD
            + match &value {
                Value::Session { user, role, .. } => user.len() + role.len(),
                Value::Epoch(_) => 8,
                Value::Entry(b, _) => b.len(),
            };
        if size > self.max_bytes / 4 {
            Self::remove(&mut inner, key);
            return;
        }
        let slot = Slot::Ready { value, until, size };
        Self::put(&mut inner, key.to_vec(), slot, size);
        while inner.bytes > self.max_bytes {
            match inner.slots.pop_lru() {
                Some((_, Slot::Ready { size, .. })) => inner.bytes -= size,
                Some(_) => {}
                None => break,
            }
        }
    }

    fn put(inner: &mut Inner, key: Vec<u8>, slot: Slot, size: usize) {
        if let Some(Slot::Ready { size: old, .. }) = inner.slots.put(key, slot) {
            inner.bytes -= old;
        }
        inner.bytes += size;
    }

    fn remove(inner: &mut Inner, key: &[u8]) {
        if let Some(Slot::Ready { size, .. }) = inner.slots.pop(key) {
            inner.bytes -= size;
        }
    }

    /// Redis said these keys changed.
    fn invalidate(&self, keys: &[Key]) {
        let mut inner = self.lock();
        for k in keys {
            Self::remove(&mut inner, k.as_bytes());
        }
        self.invalidations.fetch_add(keys.len() as u64, Relaxed);
    }

    /// Drops everything; `live`: whether tracking is still known to be on.
    fn flush(&self, live: bool) {
        // Not live first, so that no lookup serves what is being dropped
        // and no fill begun before completes into the emptied map.
        self.live.store(false, Relaxed);
        let mut inner = self.lock();
        inner.slots.clear();
        inner.bytes = 0;
        self.flushes.fetch_add(1, Relaxed);
        self.live.store(live, Relaxed);
    }

    fn counts(&self) -> NearCounts {
        let inner = self.lock();
        NearCounts {
            hits: self.hits.swap(0, Relaxed),
            misses: self.misses.swap(0, Relaxed),
            invalidations: self.invalidations.swap(0, Relaxed),
            flushes: self.flushes.swap(0, Relaxed),
            entries: inner.slots.len() as u64,
            bytes: inner.bytes as u64,
        }
    }
}

/// A session as the near cache knows it.
pub struct NearSession {
    pub user: String,
    pub role: String,
}

impl Store {
    /// A session from memory: Some only while it, and its user's epoch,
    /// are held, valid and not due for renewal.
    pub fn near_session(&self, uid: &str, token_hash: &str) -> Option<NearSession> {
        let near = self.near.as_ref()?;
        let now = Instant::now();
        let found = near
            .get(self.session_key(uid, token_hash).as_bytes(), now)
            .zip(near.get(self.epoch_key(uid).as_bytes(), now));
        let hit = match found {
            Some((
                (
                    Value::Session {
                        user,
                        role,
                        generation,
                        renew_at,
                    },
                    _,
                ),
                (Value::Epoch(epoch), _),
            )) if generation >= epoch && now < renew_at => Some(NearSession { user, role }),
            _ => None,
        };
        near.count(hit.is_some());
        hit
    }

    /// A cached answer from memory, and the ms it has left.
    pub fn near_entry(&self, url: &crate::CacheUrl, variant: &str) -> Option<(Bytes, i64)> {
        let near = self.near.as_ref()?;
        let now = Instant::now();
        let [_, key] = self.cache_keys(url, variant);
        let hit = match near.get(key.as_bytes(), now) {
            Some((Value::Entry(b, expires), _)) => {
                Some((b, expires.saturating_duration_since(now).as_millis() as i64))
            }
            _ => None,
        };
        near.count(hit.is_some());
        hit
    }

    /// Reads a session and its user's epoch into memory, in the
    /// background (`idle`: the session idle timeout, for when it is due
    /// for renewal).
    pub fn near_fill_session(&self, uid: &str, token_hash: &str, idle: Duration) {
        let skey = self.session_key(uid, token_hash);
        let Some((near, readers, reader)) = self.near_reader(&skey) else {
            return;
        };
        let ekey = self.epoch_key(uid);
        let Some(n) = near.begin(skey.as_bytes()) else {
            return;
        };
        let m = near.begin(ekey.as_bytes());
        tokio::spawn(async move {
            let t0 = Instant::now();
            let read = async {
                let p = reader.pipeline();
                let () = p.hmget(&skey, vec!["user", "gen", "role"]).await?;
                let () = p.pttl(&skey).await?;
                let () = p.get(&ekey).await?;
                let () = p.pttl(&ekey).await?;
                p.all::<Vec<FredValue>>().await
            };
            let (session, epoch) = match read.await {
                Ok(reply) => {
                    let int = |i: usize| reply.get(i).and_then(FredValue::as_i64).unwrap_or(-2);
                    let (s_ttl, e_ttl) = (int(1), int(3));
                    let at = |ttl: i64| t0 + Duration::from_millis(ttl.max(0) as u64);
                    // No expiry (or no key): held until max_age.
                    let e_until = if e_ttl < 0 {
                        t0 + Duration::from_secs(86_400)
                    } else {
                        at(e_ttl)
                    };
                    let epoch = reply.get(2).and_then(FredValue::as_u64).unwrap_or(0);
                    let fields: Vec<Option<String>> = match reply.first() {
                        Some(FredValue::Array(f)) => f.iter().map(FredValue::as_string).collect(),
                        _ => Vec::new(),
                    };
                    let field = |i: usize| fields.get(i).cloned().flatten();
                    let session = field(0).filter(|_| s_ttl > 0).map(|user| {
                        // The Redis path renews once a tenth of `idle` has
                        // passed since the last renewal, which set the TTL
                        // to `idle` (or less, near the absolute expiry:
                        // then this is due sooner, never later).
                        let due = Duration::from_millis(s_ttl.max(0) as u64)
                            .saturating_sub(idle.mul_f64(0.9));
                        let value = Value::Session {
                            user,
                            role: field(2).unwrap_or_default(),
                            generation: field(1).and_then(|g| g.parse().ok()).unwrap_or(0),
                            renew_at: t0 + due,
                        };
                        (value, at(s_ttl))
                    });
                    (session, Some((Value::Epoch(epoch), e_until)))
                }
                Err(e) => {
                    readers.read_failed(&e);
                    (None, None)
                }
            };
            slow_fill().await;
            near.complete(skey.as_bytes(), n, session);
            if let Some(m) = m {
                near.complete(ekey.as_bytes(), m, epoch);
            }
        });
    }

    /// Reads a cached answer into memory, in the background.
    pub fn near_fill_entry(&self, url: &crate::CacheUrl, variant: &str) {
        let [_, key] = self.cache_keys(url, variant);
        let Some((near, readers, reader)) = self.near_reader(&key) else {
            return;
        };
        let Some(n) = near.begin(key.as_bytes()) else {
            return;
        };
        tokio::spawn(async move {
            let t0 = Instant::now();
            let read = async {
                let p = reader.pipeline();
                let () = p.get(&key).await?;
                let () = p.pttl(&key).await?;
                p.all::<Vec<FredValue>>().await
            };
            let value = match read.await {
                Ok(reply) => {
                    let entry = reply.first().and_then(crate::cache::entry_bytes);
                    let ttl = reply.get(1).and_then(FredValue::as_i64).unwrap_or(0);
                    entry.filter(|_| ttl > 0).map(|b| {
                        let expires = t0 + Duration::from_millis(ttl as u64);
                        (Value::Entry(b, expires), expires)
                    })
                }
                Err(e) => {
                    readers.read_failed(&e);
                    None
                }
            };
            slow_fill().await;
            near.complete(key.as_bytes(), n, value);
        });
    }

    /// Drops keys this worker has just changed in Redis from its own near
    /// cache, without waiting for Redis to say so.
    pub(crate) fn near_forget(&self, keys: &[String]) {
        if let Some(near) = &self.near {
            let mut inner = near.lock();
            for k in keys {
                // A placeholder too: the fill it stands for read the key
                // before this change.
                Near::remove(&mut inner, k.as_bytes());
            }
        }
    }

    /// A session Redis has just refused: dropped from memory with any
    /// fill of it on its way, so that this worker never serves it again.
    pub fn near_forget_session(&self, uid: &str, token_hash: &str) {
        self.near_forget(&[self.session_key(uid, token_hash)]);
    }

    /// The near cache, its readers and the one that reads `key` (the
    /// reader of the primary that owns it), while tracking is on.
    fn near_reader(&self, key: &str) -> Option<(Arc<Near>, Arc<Readers>, Client)> {
        let near = self.near.clone()?;
        let readers = self.near_readers.lock().ok()?.clone()?;
        let reader = readers.for_key(key)?;
        Some((near, readers, reader))
    }

    /// The near cache's counts since the last call (None when it is off).
    pub fn near_counts(&self) -> Option<NearCounts> {
        self.near.as_ref().map(|n| n.counts())
    }

    /// Entries and bytes the near cache holds (None when it is off).
    pub fn near_size(&self) -> Option<(usize, usize)> {
        let near = self.near.as_ref()?;
        let inner = near.lock();
        Some((inner.slots.len(), inner.bytes))
    }

    /// The round trip of the near cache's last liveness PING (the slowest
    /// primary's), while tracking is on: Redis' latency as this worker
    /// sees it, at no command's cost beyond the check's own.
    pub fn near_ping(&self) -> Option<Duration> {
        let near = self.near.as_ref().filter(|n| n.live.load(Relaxed))?;
        match near.ping_us.load(Relaxed) {
            u64::MAX => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Whether the near cache may serve now (tracking is on).
    pub fn near_live(&self) -> bool {
        self.near.as_ref().is_some_and(|n| n.live.load(Relaxed))
    }

    /// Starts the near cache's connections and keeps them up: at once,
    /// then after each loss, with backoff. Must run inside a tokio
    /// runtime; returns at once. Nothing without a near cache.
    pub fn start_near(&self, cfg: &StoreConfig) {
        let Some(near) = self.near.clone() else {
            return;
        };
        let store = self.clone();
        let cfg = cfg.clone();
        // As the command client's: on Redis Cluster a failover is over
        // once a replica takes over.
        let max = if self.clustered {
            cfg.reconnect_max_delay.min(Duration::from_millis(250))
        } else {
            cfg.reconnect_max_delay
        };
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(50);
            loop {
                let began = Instant::now();
                match track(&store, &near, &cfg).await {
                    // A life that lasted starts the backoff again; short
                    // ones (a slot moving back and forth) keep backing off.
                    Ok(()) if began.elapsed() > Duration::from_secs(10) => {
                        delay = Duration::from_millis(50)
                    }
                    Ok(()) => {}
                    Err(e) => log::debug!("near cache: {e}"),
                }
                near.flush(false);
                if let Ok(mut r) = store.near_readers.lock() {
                    *r = None;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(max);
            }
        });
    }
}

/// Whether the test-only failpoint `name` is set (FORKD_FAILPOINTS).
fn failpoint(name: &str) -> bool {
    cfg!(feature = "failpoints")
        && std::env::var("FORKD_FAILPOINTS").is_ok_and(|v| v.split(',').any(|p| p.trim() == name))
}

/// With the failpoint `near-fill-slow`, a fill waits between its read and
/// storing what it read, so that a test can change the key meanwhile.
async fn slow_fill() {
    if failpoint("near-fill-slow") {
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(max_bytes: usize) -> Near {
        let n = Near::new(max_bytes, Duration::from_secs(60));
        n.flush(true);
        n
    }

    fn entry(n: &Near, key: &str, body: &'static [u8]) {
        let fill = n.begin(key.as_bytes()).expect("a placeholder");
        let until = Instant::now() + Duration::from_secs(30);
        n.complete(
            key.as_bytes(),
            fill,
            Some((Value::Entry(Bytes::from_static(body), until), until)),
        );
    }

    fn held(n: &Near, key: &str) -> bool {
        n.get(key.as_bytes(), Instant::now()).is_some()
    }

    #[test]
    fn a_fill_is_kept_only_while_its_placeholder_is_there() {
        let n = live(1 << 20);
        entry(&n, "a", b"1");
        assert!(held(&n, "a"));
        // One fill at a time per key; a new one replaces what is held.
        let again = n.begin(b"a").unwrap();
        assert!(n.begin(b"a").is_none());
        assert!(!held(&n, "a"));
        n.complete(
            b"a",
            again,
            Some((Value::Epoch(1), Instant::now() + Duration::from_secs(9))),
        );
        assert!(held(&n, "a"));
        // Invalidated while its read was on its way: not kept.
        let fill = n.begin(b"b").unwrap();
        assert!(n.begin(b"b").is_none());
        n.invalidate(&[Key::from("b")]);
        let until = Instant::now() + Duration::from_secs(30);
        n.complete(b"b", fill, Some((Value::Epoch(1), until)));
        assert!(!held(&n, "b"));
        // Flushed meanwhile: not kept either, and a newer fill's
        // placeholder is not taken by an older one's answer.
        let old = n.begin(b"c").unwrap();
        n.flush(true);
        let new = n.begin(b"c").unwrap();
        n.complete(b"c", old, Some((Value::Epoch(1), until)));
        assert!(!held(&n, "c"));
        n.complete(b"c", new, Some((Value::Epoch(2), until)));
        assert!(held(&n, "c"));
    }

    #[test]
    fn nothing_is_served_or_filled_while_tracking_is_not_on() {
        let n = live(1 << 20);
        entry(&n, "a", b"1");
        let fill = n.begin(b"b").unwrap();
        n.flush(false);
        assert!(!held(&n, "a"));
        assert!(n.begin(b"a").is_none());
        n.complete(
            b"b",
            fill,
            Some((Value::Epoch(1), Instant::now() + Duration::from_secs(9))),
        );
        n.flush(true);
        assert!(!held(&n, "b"));
    }

    #[test]
    fn expiry_and_max_age_bound_what_is_served() {
        let n = Near::new(1 << 20, Duration::from_millis(50));
        n.flush(true);
        let fill = n.begin(b"a").unwrap();
        let far = Instant::now() + Duration::from_secs(3600);
        n.complete(b"a", fill, Some((Value::Epoch(1), far)));
        assert!(held(&n, "a"));
        assert!(n
            .get(b"a", Instant::now() + Duration::from_millis(60))
            .is_none());
    }

    #[test]
    fn the_least_recently_used_go_first_and_the_bytes_stay_bounded() {
        let body: &'static [u8] = &[b'x'; 1000];
        let max = 4 * (1000 + 1 + SLOT_OVERHEAD) + 10;
        let n = live(max);
        for k in ["a", "b", "c", "d"] {
            entry(&n, k, body);
        }
        assert!(held(&n, "a")); // now the most recently used
        entry(&n, "e", body);
        assert!(held(&n, "a") && !held(&n, "b") && held(&n, "e"));
        let c = n.counts();
        assert_eq!(c.entries, 4);
        assert!(c.bytes as usize <= max);
        // An answer too big for a quarter of the cache is not kept.
        let big: &'static [u8] = &[b'y'; 2000];
        entry(&n, "f", big);
        assert!(!held(&n, "f"));
        assert_eq!(n.counts().bytes as usize, 4 * (1000 + 1 + SLOT_OVERHEAD));
    }
}
