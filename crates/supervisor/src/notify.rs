//! sd_notify over `$NOTIFY_SOCKET`: one datagram per message to a unix
//! socket (a path, or an abstract address written with a leading '@'). No
//! libsystemd. Nothing is sent when the variable is unset.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

pub(crate) struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
    last_status: String,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`, if set and usable.
    pub(crate) fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        let addr = match bytes.split_first() {
            Some((b'@', name)) => SocketAddr::from_abstract_name(name),
            Some(_) => SocketAddr::from_pathname(std::path::Path::new(&path)),
            None => return None,
        };
        let addr = match addr {
            Ok(a) => a,
            Err(e) => {
                log::warn!("ignoring NOTIFY_SOCKET: {e}");
                return None;
            }
        };
        match UnixDatagram::unbound() {
            Ok(sock) => Some(Notifier {
                sock,
                addr,
                last_status: String::new(),
            }),
            Err(e) => {
                log::warn!("cannot create the notify socket: {e}");
                None
            }
        }
    }

    pub(crate) fn send(&self, msg: &str) {
        if let Err(e) = self.sock.send_to_addr(msg.as_bytes(), &self.addr) {
            log::debug!("sd_notify {msg:?}: {e}");
        }
    }

    /// Sends `STATUS=` only when it changed.
    pub(crate) fn status(&mut self, text: String) {
        if text != self.last_status {
            self.send(&format!("STATUS={text}"));
            self.last_status = text;
        }
    }
}

/// `$WATCHDOG_USEC` when it is meant for this process.
pub(crate) fn watchdog_interval() -> Option<std::time::Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| std::time::Duration::from_micros(usec))
}

/// The systemd variables children must not see: they are meant for the
/// supervisor alone.
pub(crate) const SYSTEMD_VARS: &[&str] = &[
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];
