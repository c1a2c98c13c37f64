//! TLS session tickets every worker can read. The secrets are made by the
//! supervisor (before it forks, like the certificate) and inherited, so a
//! client that comes back on a new connection resumes whichever worker
//! takes it; with a key per worker it resumed only when it happened to
//! land on the same one. Each 6-hour period of the wall clock has its own
//! key, derived from the secret, so no key seals for longer; a reload makes
//! a new secret and keeps the one before it for reading.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::hkdf;

/// How long a ticket may be used, and how long one derived key makes
/// tickets: every 6 hours (by the wall clock) each worker derives the same
/// new key from the shared secret, and a ticket is read only during the
/// period it was made in and the one after, and only within 6 hours of
/// being made. rustls leaves both to the ticketer.
const LIFETIME_SECS: u64 = 6 * 3600;

/// A key's name: the secret's id, then the period it is for.
const NAME_LEN: usize = 16;

/// A little past the clock, for workers whose clocks read a moment apart.
const CLOCK_SLACK_SECS: u64 = 60;

/// One shared secret: its id (carried in each ticket) and its bytes.
#[derive(Clone)]
struct Secret {
    id: [u8; 8],
    bytes: [u8; 32],
}

/// The ticket secrets of one configuration: the one that makes tickets,
/// and the one before it (the previous reload's), which still reads them.
#[derive(Clone)]
pub struct TicketKeys {
    current: Secret,
    previous: Option<Secret>,
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets.
        f.write_str("TicketKeys")
    }
}

impl TicketKeys {
    /// New keys from the operating system's random source.
    ///
    /// # Errors
    /// The random source fails.
    pub fn generate() -> Result<TicketKeys, String> {
        Ok(TicketKeys {
            current: Secret::generate()?,
            previous: None,
        })
    }

    /// The keys for the next configuration: a new secret, and this one's
    /// current secret to read the tickets already out.
    ///
    /// # Errors
    /// The random source fails.
    pub fn rotate(&self) -> Result<TicketKeys, String> {
        Ok(TicketKeys {
            current: Secret::generate()?,
            previous: Some(self.current.clone()),
        })
    }

    /// This worker's ticketer over the secrets.
    pub(crate) fn ticketer(&self) -> std::sync::Arc<dyn rustls::server::ProducesTickets> {
        std::sync::Arc::new(self.sealer())
    }

    fn sealer(&self) -> Sealer {
        Sealer {
            keys: self.clone(),
            derived: Mutex::new(Vec::new()),
            rng: aws_lc_rs::rand::SystemRandom::new(),
        }
    }
}

impl Secret {
    fn generate() -> Result<Secret, String> {
        let mut s = Secret {
            id: [0; 8],
            bytes: [0; 32],
        };
        getrandom::fill(&mut s.id)
            .and_then(|()| getrandom::fill(&mut s.bytes))
            .map_err(|e| format!("cannot make TLS session-ticket keys: {e}"))?;
        Ok(s)
    }

    /// The name of the key for `period`: this secret's id, then the period.
    fn name(&self, period: u64) -> [u8; NAME_LEN] {
        let mut name = [0u8; NAME_LEN];
        name[..8].copy_from_slice(&self.id);
        name[8..].copy_from_slice(&period.to_be_bytes());
        name
    }

    /// The name and key of `period` (HKDF-SHA256 over the secret).
    fn derive(&self, period: u64) -> ([u8; NAME_LEN], LessSafeKey) {
        let name = self.name(period);
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"forkd session tickets").extract(&self.bytes);
        let info = [name.as_slice()];
        let okm = prk
            .expand(&info, &AES_256_GCM)
            .expect("one AES-256 key is a valid HKDF length");
        let key = LessSafeKey::new(UnboundKey::from(okm));
        (name, key)
    }
}

/// Seals and opens tickets: `name (16) | nonce (12) | AES-256-GCM(issued
/// at, 8 bytes | state) + tag`, the name as associated data.
struct Sealer {
    keys: TicketKeys,
    /// Keys derived so far (at most the two periods of two secrets).
    derived: Mutex<Vec<([u8; NAME_LEN], LessSafeKey)>>,
    rng: aws_lc_rs::rand::SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer")
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Sealer {
    /// Runs `f` with the key of `secret` for `period`, deriving it once.
    fn with_key<T>(
        &self,
        secret: &Secret,
        period: u64,
        f: impl FnOnce(&[u8; NAME_LEN], &LessSafeKey) -> T,
    ) -> T {
        let mut derived = self.derived.lock().unwrap_or_else(|e| e.into_inner());
        let name = secret.name(period);
        let at = match derived.iter().position(|(n, _)| *n == name) {
            Some(at) => at,
            None => {
                if derived.len() >= 4 {
                    derived.remove(0);
                }
                derived.push(secret.derive(period));
                derived.len() - 1
            }
        };
        let (name, key) = &derived[at];
        f(name, key)
    }

    fn seal_at(&self, plain: &[u8], now: u64) -> Option<Vec<u8>> {
        use aws_lc_rs::rand::SecureRandom;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut sealed = Vec::with_capacity(8 + plain.len() + AES_256_GCM.tag_len());
        sealed.extend_from_slice(&now.to_be_bytes());
        sealed.extend_from_slice(plain);
        self.with_key(&self.keys.current, now / LIFETIME_SECS, |name, key| {
            key.seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name),
                &mut sealed,
            )
            .ok()?;
            let mut out = Vec::with_capacity(NAME_LEN + NONCE_LEN + sealed.len());
            out.extend_from_slice(name);
            out.extend_from_slice(&nonce);
            out.extend_from_slice(&sealed);
            Some(out)
        })
    }

    fn open_at(&self, ticket: &[u8], now: u64) -> Option<Vec<u8>> {
        if ticket.len() < NAME_LEN + NONCE_LEN + 8 + AES_256_GCM.tag_len() {
            return None;
        }
        let (name, rest) = ticket.split_at(NAME_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let period = u64::from_be_bytes(name[8..].try_into().ok()?);
        let this = now / LIFETIME_SECS;
        if period != this && period.checked_add(1) != Some(this) {
            return None;
        }
        let secret = std::iter::once(&self.keys.current)
            .chain(self.keys.previous.as_ref())
            .find(|s| s.id == name[..8])?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let opened = self.with_key(secret, period, |name, key| {
            key.open_in_place(nonce, Aad::from(name), &mut buf)
                .ok()
                .map(|p| p.to_vec())
        })?;
        let issued = u64::from_be_bytes(opened.get(..8)?.try_into().ok()?);
        let fresh = issued <= now + CLOCK_SLACK_SECS && now.saturating_sub(issued) < LIFETIME_SECS;
        fresh.then(|| opened[8..].to_vec())
    }
}

impl rustls::server::ProducesTickets for Sealer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        LIFETIME_SECS as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal_at(plain, now_secs())
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        self.open_at(ticket, now_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn a_ticket_opens_in_another_worker_after_one_reload_only() {
        let keys = TicketKeys::generate().unwrap();
        // Two workers of one configuration: one makes, the other reads.
        let ticket = keys.sealer().seal_at(b"session state", NOW).unwrap();
        let opened = keys.sealer().open_at(&ticket, NOW);
        assert_eq!(opened.as_deref(), Some(&b"session state"[..]));
        // Nonces differ: two tickets of the same state are not alike.
        assert_ne!(
            keys.sealer().seal_at(b"session state", NOW).unwrap(),
            ticket
        );
        let once = keys.rotate().unwrap();
        assert!(once.sealer().open_at(&ticket, NOW).is_some());
        let twice = once.rotate().unwrap();
        assert!(twice.sealer().open_at(&ticket, NOW).is_none());
        // Another instance's keys, a flipped bit, a cut ticket: nothing.
        let other = TicketKeys::generate().unwrap();
        assert!(other.sealer().open_at(&ticket, NOW).is_none());
        let mut bad = ticket.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(keys.sealer().open_at(&bad, NOW).is_none());
        for n in [0, 10, NAME_LEN + NONCE_LEN, ticket.len() - 1] {
            assert!(keys.sealer().open_at(&ticket[..n], NOW).is_none());
        }
    }

    #[test]
    fn a_ticket_expires_and_keys_change_with_the_clock() {
        let keys = TicketKeys::generate().unwrap();
        let s = keys.sealer();
        let ticket = s.seal_at(b"state", NOW).unwrap();
        assert!(s.open_at(&ticket, NOW + LIFETIME_SECS - 1).is_some());
        assert!(s.open_at(&ticket, NOW + LIFETIME_SECS).is_none());
        // From the future (beyond the slack): refused.
        assert!(s.open_at(&ticket, NOW - CLOCK_SLACK_SECS - 1).is_none());
        // The next period seals under another key name.
        let later = s.seal_at(b"state", NOW + LIFETIME_SECS).unwrap();
        assert_ne!(later[..NAME_LEN], ticket[..NAME_LEN]);
        assert_eq!(later[..8], ticket[..8]);
    }
}
