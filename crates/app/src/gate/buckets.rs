//! Whose bucket a `[rate_limit.policy]` counts a request in, the same for
//! the workers and for `forkd limit`: a client by its address as the
//! limits see it (IPv6 by /64), a header by a hash of its value.

use std::net::IpAddr;

use forkd_store::Bucket;

/// A client's bucket; `scope` "" or ":ROUTE" for `user+route`.
pub fn client(ip: IpAddr, scope: &str) -> Bucket {
    let key = crate::request::client::client_key(ip);
    Bucket::Other {
        group: format!("c:{key}"),
        name: format!("c:{key}{scope}"),
    }
}

/// The bucket of a value of header `name` (lower-case).
pub fn header(name: &str, value: &[u8]) -> Bucket {
    let hash = crate::secrets::hex16(value);
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

/// The built-in policies: the login limits (by client, by (name,
/// client), by name over all clients) and `/profile`'s (by user). They are
/// set by `[auth] login_*` and `[rate_limit.profile]`, and their names are
/// no `[rate_limit.policy]`'s.
pub const LOGIN_CLIENT: &str = "login-ip";
pub const LOGIN_NAME_CLIENT: &str = "login-user";
pub const LOGIN_NAME: &str = "login-user-all";
pub const PROFILE: &str = crate::upstream::PROFILE_POLICY;

/// The key of a client's bucket in the login limits (`Bucket::Plain`).
pub fn login_client(ip: IpAddr) -> String {
    crate::request::client::client_key(ip)
}

/// The key of (a login name, a client)'s bucket in the login limits.
pub fn login_name_client(name: &str, ip: IpAddr) -> String {
    format!("{name}|{}", crate::request::client::client_key(ip))
}
