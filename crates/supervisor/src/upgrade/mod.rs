//! Binary upgrades by re-executing in place, never blindly: the mechanism
//! (the probe, the handover's format and its transport across `exec`, the
//! first format). What the running supervisor does with it (start, exec,
//! report, roll back, resume) is in `runner/upgrade.rs` and
//! `runner/start.rs`. The supervisor
//! keeps its pid (so systemd keeps tracking it, and its workers and
//! redis-server stay its children):
//!
//! 1. `forkd upgrade` / USR2 opens the binary on disk and runs it as a
//!    probe (`probe`): it must read the handover and accept the
//!    configuration within `startup_timeout`. Anything else refuses the
//!    upgrade; nothing has changed.
//! 2. Only then the supervisor executes that same open file in place. The
//!    listening sockets, pidfile lock, control socket, scoreboard memfd and
//!    waiting CLI connections cross the `exec` as open descriptors, the rest
//!    of the state as a versioned envelope and payload in a memfd
//!    (`handover`).
//! 3. The new image reads the envelope first; any failure from there on
//!    (an unreadable payload, a resume that fails, workers that never become
//!    ready) executes the previous binary again, kept open as a descriptor,
//!    and the old workers keep serving.

pub(crate) mod format;
pub(crate) mod handover;
pub(crate) mod legacy;
pub(crate) mod probe;

use std::path::PathBuf;

pub use handover::{take, Inherited};
pub use probe::{answer as probe_answer, read_request as probe_request};

/// The variables that carry upgrade state (removed from the environment by
/// [`take`]; never passed to a child).
pub(crate) const VARS: [&str; 2] = [handover::FD_VAR, legacy::VAR];

/// The binary this process was started from (resolved at start, before
/// anything can replace it).
pub(crate) fn exe_path() -> Option<PathBuf> {
    std::env::current_exe().ok()
}
