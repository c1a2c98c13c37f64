//! The one place where Unix signals become supervisor events. The signals
//! are blocked and read from a signalfd in the main loop, so there are no
//! handlers and nothing runs asynchronously.

use std::os::fd::{AsFd, BorrowedFd};

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// What a signal asks of the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalEvent {
    /// TERM, INT: drain and stop.
    Stop,
    /// QUIT: stop at once.
    FastStop,
    /// HUP: reload the config and replace workers one by one.
    Reload,
    /// USR1: reopen the log file.
    ReopenLogs,
    /// USR2: upgrade to the binary on disk.
    Upgrade,
    /// TTIN: one worker more.
    More,
    /// TTOU: one worker fewer.
    Fewer,
    /// CHLD: reap children.
    Child,
}

const HANDLED: [Signal; 9] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGCHLD,
];

fn handled_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in HANDLED {
        set.add(s);
    }
    set
}

fn event(sig: Signal) -> Option<SignalEvent> {
    Some(match sig {
        Signal::SIGTERM | Signal::SIGINT => SignalEvent::Stop,
        Signal::SIGQUIT => SignalEvent::FastStop,
        Signal::SIGHUP => SignalEvent::Reload,
        Signal::SIGUSR1 => SignalEvent::ReopenLogs,
        Signal::SIGUSR2 => SignalEvent::Upgrade,
        Signal::SIGTTIN => SignalEvent::More,
        Signal::SIGTTOU => SignalEvent::Fewer,
        Signal::SIGCHLD => SignalEvent::Child,
        _ => return None,
    })
}

pub(crate) struct Signals {
    fd: SignalFd,
}

impl Signals {
    /// Blocks the handled signals and opens a signalfd for them.
    pub(crate) fn new() -> nix::Result<Self> {
        let set = handled_set();
        nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(Signals { fd })
    }

    /// Every pending signal, in arrival order.
    pub(crate) fn drain(&self) -> Vec<SignalEvent> {
        let mut out = Vec::new();
        while let Ok(Some(info)) = self.fd.read_signal() {
            if let Some(ev) = Signal::try_from(info.ssi_signo as i32).ok().and_then(event) {
                out.push(ev);
            }
        }
        out
    }

    pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// In a new child: deliver signals normally again.
pub(crate) fn unblock_all() {
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}
