//! Passwords (argon2id PHC strings), the dummy hash, and bearer tokens.
//!
//! A token is `UID.SECRET`: UID is the user's random tag (12 base64url
//! characters; it keeps all of a user's keys in one Redis hash slot) and
//! SECRET is 32 bytes from the OS (getrandom, never a PRNG seeded before
//! fork), base64url. Redis only ever sees the token's SHA-256.

use std::sync::OnceLock;

use argon2::password_hash::phc::Output;
use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, PasswordHasher, Version};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

/// argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashCost {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl HashCost {
    fn argon2(&self) -> Result<Argon2<'static>, String> {
        let params = Params::new(self.memory_kib, self.iterations, self.parallelism, None)
            .map_err(|e| format!("invalid argon2 parameters: {e}"))?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }
}

/// Hashes a password with a fresh salt.
///
/// # Errors
/// Parameters argon2 rejects.
pub fn hash_password(password: &str, cost: HashCost) -> Result<String, String> {
    let hash = cost
        .argon2()?
        .hash_password(password.as_bytes())
        .map_err(|e| format!("cannot hash the password: {e}"))?;
    Ok(hash.to_string())
}

/// Checks a password against a PHC string (with the parameters stored in
/// it). A damaged PHC string never verifies. The argon2 working memory is
/// this thread's, kept from one check to the next (see [`with_memory`]).
pub fn verify_password(phc: &str, password: &str) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (&hash.salt, &hash.hash) else {
        return false;
    };
    let (Ok(algorithm), Ok(version), Ok(params)) = (
        Algorithm::try_from(hash.algorithm.as_str()),
        hash.version.map(Version::try_from).transpose(),
        Params::try_from(&hash),
    ) else {
        return false;
    };
    let argon2 = Argon2::new(algorithm, version.unwrap_or_default(), params);
    let mut out = [0u8; Output::MAX_LENGTH];
    let Some(out) = out.get_mut(..expected.len()) else {
        return false;
    };
    let computed = with_memory(argon2.params().block_count(), |blocks| {
        argon2.hash_password_into_with_memory(password.as_bytes(), salt, out, blocks)
    });
    // Output's comparison takes the same time wherever the bytes differ.
    computed.is_ok() && Output::new(out).is_ok_and(|o| o == *expected)
}

thread_local! {
    /// This thread's argon2 working memory (19 MiB at the default cost),
    /// kept between hashes: a fresh block per check costs its page faults
    /// and zeroing, about as much again as the hash. Freed with the
    /// thread (the worker's runtime ends an idle blocking thread after 2 s).
    static MEMORY: std::cell::RefCell<Vec<Block>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on at least `blocks` blocks of this thread's argon2 memory.
fn with_memory<R>(blocks: usize, f: impl FnOnce(&mut [Block]) -> R) -> R {
    MEMORY.with(|m| {
        let mut m = m.borrow_mut();
        if m.len() < blocks {
            m.resize(blocks, Block::default());
        }
        f(&mut m[..blocks])
    })
}

/// Whether a stored hash was made with other parameters than `cost`.
pub fn needs_rehash(phc: &str, cost: HashCost) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else {
        return true;
    };
    let Ok(params) = Params::try_from(&hash) else {
        return true;
    };
    hash.algorithm.as_str() != "argon2id"
        || params.m_cost() != cost.memory_kib
        || params.t_cost() != cost.iterations
        || params.p_cost() != cost.parallelism
}

fn random(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).expect("the OS random source works");
    b
}

/// A new per-user tag.
pub fn new_uid() -> String {
    URL_SAFE_NO_PAD.encode(random(9))
}

const UID_LEN: usize = 12;
const SECRET_LEN: usize = 43;

/// A new token for the user with tag `uid`, and its hash.
pub fn new_token(uid: &str) -> (String, String) {
    let token = format!("{uid}.{}", URL_SAFE_NO_PAD.encode(random(32)));
    let hash = token_hash(&token);
    (token, hash)
}

/// Hex SHA-256 of a token: what Redis stores.
pub fn token_hash(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// The first 16 bytes of a SHA-256, in hex.
pub(crate) fn hex16(data: &[u8]) -> String {
    hex(&Sha256::digest(data)[..16])
}

/// Lower-case hex of `bytes`, without a formatter call per byte: this runs
/// several times for every authenticated request.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

/// A well-formed token's (uid, hash), or None.
pub fn parse_token(token: &str) -> Option<(String, String)> {
    let (uid, secret) = token.split_once('.')?;
    let b64 = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    (uid.len() == UID_LEN && secret.len() == SECRET_LEN && b64(uid) && b64(secret))
        .then(|| (uid.to_owned(), token_hash(token)))
}

/// A random hex string, for lock owners.
pub fn nonce() -> String {
    hex(&random(16))
}

/// The hash unknown users are verified against: a real hash with the
/// configured cost, of a random password, made once per worker.
pub(crate) struct DummyHash {
    cost: HashCost,
    phc: OnceLock<String>,
}

impl DummyHash {
    pub(crate) fn new(cost: HashCost) -> Self {
        DummyHash {
            cost,
            phc: OnceLock::new(),
        }
    }

    /// Makes the hash and verifies it twice, before the first login: the
    /// first verify on a thread also maps and faults in its argon2 memory.
    /// Blocking: run it off the event loop.
    pub(crate) fn prepare(&self) {
        let _ = verify_password(self.phc(), &nonce());
        self.verify(&nonce());
    }

    fn phc(&self) -> &str {
        self.phc
            .get_or_init(|| hash_password(&nonce(), self.cost).unwrap_or_default())
    }

    /// Verifies `password` against the dummy (always wrong). Blocking.
    pub(crate) fn verify(&self, password: &str) {
        let _ = verify_password(self.phc(), password);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_matches_the_formatter() {
        let bytes: Vec<u8> = (0..=255).collect();
        let by_format: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex(&bytes), by_format);
        assert_eq!(hex(&[]), "");
    }

    const CHEAP: HashCost = HashCost {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };

    #[test]
    fn hash_verify_and_rehash() {
        let phc = hash_password("s3cret", CHEAP).unwrap();
        assert!(phc.starts_with("$argon2id$"));
        assert!(verify_password(&phc, "s3cret"));
        assert!(!verify_password(&phc, "S3cret"));
        assert!(!verify_password("garbage", "s3cret"));
        assert!(!needs_rehash(&phc, CHEAP));
        assert!(needs_rehash(
            &phc,
            HashCost {
                memory_kib: 128,
                ..CHEAP
            }
        ));
        // Salts differ.
        assert_ne!(phc, hash_password("s3cret", CHEAP).unwrap());
    }

    #[test]
    fn tokens_round_trip_and_reject_garbage() {
        let uid = new_uid();
        assert_eq!(uid.len(), UID_LEN);
        let (token, hash) = new_token(&uid);
        assert_eq!(parse_token(&token), Some((uid.clone(), hash.clone())));
        assert_eq!(hash.len(), 64);
        assert!(!hash.contains(&token));
        let (other, _) = new_token(&uid);
        assert_ne!(token, other);
        for bad in [
            "",
            "x",
            "a.b",
            &format!("{uid}."),
            &format!("{uid}.{}!", &token[13..55]),
        ] {
            assert_eq!(parse_token(bad), None, "{bad}");
        }
    }
}
