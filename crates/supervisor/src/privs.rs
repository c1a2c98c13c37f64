//! Dropping root: after the sockets are bound and the runtime and data
//! directories prepared, before any worker (or the managed redis-server)
//! is started.

use nix::unistd::{setgid, setgroups, setuid, Gid, Group, Uid, User};

use crate::Error;

/// The account to run as.
pub(crate) struct Account {
    pub(crate) name: String,
    pub(crate) uid: Uid,
    pub(crate) gid: Gid,
}

/// Resolves `user` (and `group`, default: the user's primary group).
pub(crate) fn resolve(user: &str, group: Option<&str>) -> Result<Account, Error> {
    let not_found = |what: &str, name: &str| Error::Privileges(format!("no {what} named '{name}'"));
    let u = User::from_name(user)
        .map_err(|e| Error::Privileges(format!("cannot look up user '{user}': {e}")))?
        .ok_or_else(|| not_found("user", user))?;
    let gid = match group {
        Some(g) => {
            Group::from_name(g)
                .map_err(|e| Error::Privileges(format!("cannot look up group '{g}': {e}")))?
                .ok_or_else(|| not_found("group", g))?
                .gid
        }
        None => u.gid,
    };
    Ok(Account {
        name: u.name,
        uid: u.uid,
        gid,
    })
}

/// Switches this process to the account for good.
pub(crate) fn drop_to(account: &Account) -> Result<(), Error> {
    let fail = |what: &str, e: nix::Error| Error::Privileges(format!("{what}: {e}"));
    setgroups(&[account.gid]).map_err(|e| fail("setgroups", e))?;
    setgid(account.gid).map_err(|e| fail("setgid", e))?;
    setuid(account.uid).map_err(|e| fail("setuid", e))?;
    if account.uid.as_raw() != 0 && setuid(Uid::from_raw(0)).is_ok() {
        return Err(Error::Privileges(
            "root could be regained after setuid".into(),
        ));
    }
    log::info!(
        "dropped privileges to user '{}' (uid {}, gid {})",
        account.name,
        account.uid,
        account.gid
    );
    Ok(())
}
