//! TLS session tickets every worker can read. The keys are made by the
//! supervisor (before it forks, like the certificate) and inherited, so a
//! client that comes back on a new connection resumes whichever worker
//! takes it; with a key per worker it resumed only when it happened to
//! land on the same one. A reload makes a new key and keeps the one
//! before it for reading, so tickets outlive one reload and no more.
//!
//! A ticket is `key name (16) | nonce (12) | AES-256-GCM(state) + tag`,
//! the key name as associated data.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

/// How long a client is told it may use a ticket. The key itself lives
/// until the second reload after it was made.
const LIFETIME_SECS: u32 = 6 * 3600;

const NAME_LEN: usize = 16;

/// One ticket key: its name (carried in each ticket) and its secret.
#[derive(Clone)]
struct Key {
    name: [u8; NAME_LEN],
    secret: [u8; 32],
}

/// The ticket keys of one configuration: the one that makes tickets, and
/// the one before it (the previous reload's), which still reads them.
#[derive(Clone)]
pub struct TicketKeys {
    current: Key,
    previous: Option<Key>,
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
            current: Key::generate()?,
            previous: None,
        })
    }

    /// The keys for the next configuration: a new current key, and this
    /// one's current key to read the tickets already out.
    ///
    /// # Errors
    /// The random source fails.
    pub fn rotate(&self) -> Result<TicketKeys, String> {
        Ok(TicketKeys {
            current: Key::generate()?,
            previous: Some(self.current.clone()),
        })
    }

    /// This worker's ticketer over the keys.
    pub(crate) fn ticketer(&self) -> std::sync::Arc<dyn rustls::server::ProducesTickets> {
        let sealer = |k: &Key| {
            let key = UnboundKey::new(&AES_256_GCM, &k.secret).expect("a 32-byte AES-256 key");
            (k.name, LessSafeKey::new(key))
        };
        std::sync::Arc::new(Ticketer {
            current: sealer(&self.current),
            previous: self.previous.as_ref().map(sealer),
            rng: ring::rand::SystemRandom::new(),
        })
    }
}

impl Key {
    fn generate() -> Result<Key, String> {
        let mut k = Key {
            name: [0; NAME_LEN],
            secret: [0; 32],
        };
        getrandom::fill(&mut k.name)
            .and_then(|()| getrandom::fill(&mut k.secret))
            .map_err(|e| format!("cannot make TLS session-ticket keys: {e}"))?;
        Ok(k)
    }
}

struct Ticketer {
    current: ([u8; NAME_LEN], LessSafeKey),
    previous: Option<([u8; NAME_LEN], LessSafeKey)>,
    rng: ring::rand::SystemRandom,
}

impl std::fmt::Debug for Ticketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ticketer")
    }
}

impl rustls::server::ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        LIFETIME_SECS
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        use ring::rand::SecureRandom;
        let (name, key) = &self.current;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut sealed = plain.to_vec();
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
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() < NAME_LEN + NONCE_LEN + AES_256_GCM.tag_len() {
            return None;
        }
        let (name, rest) = ticket.split_at(NAME_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let (name, key) = std::iter::once(&self.current)
            .chain(self.previous.as_ref())
            .find(|(n, _)| n.as_slice() == name)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain = key.open_in_place(nonce, Aad::from(name), &mut buf).ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_opens_in_another_worker_and_after_one_reload_only() {
        let keys = TicketKeys::generate().unwrap();
        // Two workers of one configuration: one makes, the other reads.
        let ticket = keys.ticketer().encrypt(b"session state").unwrap();
        assert_eq!(
            keys.ticketer().decrypt(&ticket).as_deref(),
            Some(&b"session state"[..])
        );
        // Nonces differ: two tickets of the same state are not alike.
        assert_ne!(keys.ticketer().encrypt(b"session state").unwrap(), ticket);
        let once = keys.rotate().unwrap();
        assert!(once.ticketer().decrypt(&ticket).is_some());
        let twice = once.rotate().unwrap();
        assert!(twice.ticketer().decrypt(&ticket).is_none());
        // Another instance's keys, a flipped bit, a cut ticket: nothing.
        assert!(TicketKeys::generate()
            .unwrap()
            .ticketer()
            .decrypt(&ticket)
            .is_none());
        let mut bad = ticket.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(keys.ticketer().decrypt(&bad).is_none());
        for n in [0, 10, NAME_LEN + NONCE_LEN] {
            assert!(keys.ticketer().decrypt(&ticket[..n]).is_none());
        }
    }
}
