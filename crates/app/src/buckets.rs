//! Whose bucket a `[rate_limit.policy]` counts a request in, the same for
//! the workers and for `forkd limit`: a client by its address as the
//! limits see it (IPv6 by /64), a header by a hash of its value.

use std::net::IpAddr;

use forkd_store::Bucket;
use sha2::{Digest, Sha256};

/// A client's bucket; `scope` "" or ":ROUTE" for `user+route`.
pub fn client(ip: IpAddr, scope: &str) -> Bucket {
    let key = crate::client::client_key(ip);
    Bucket::Other {
        group: format!("c:{key}"),
        name: format!("c:{key}{scope}"),
    }
}

/// The bucket of a value of header `name` (lower-case).
pub fn header(name: &str, value: &[u8]) -> Bucket {
    let hash = hex16(value);
    Bucket::Other {
        group: format!("h:{hash}"),
        name: format!("h:{name}:{hash}"),
    }
}

/// A user's bucket; `scope` "" or ":ROUTE".
pub fn user(scope: &str) -> Bucket {
    Bucket::User {
        scope: scope.to_owned(),
    }
}

/// The first 16 bytes of a SHA-256, in hex.
pub(crate) fn hex16(data: &[u8]) -> String {
    crate::secrets::hex(&Sha256::digest(data)[..16])
}
