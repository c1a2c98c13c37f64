//! The listening sockets, bound before any fork.

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

use crate::Error;

/// Fails when something already listens on (or has bound) `addr`.
///
/// SO_REUSEPORT would otherwise let this process silently share a port
/// that a stale instance, or another program of the same user, serves. The
/// probe binds without SO_REUSEPORT: Linux refuses that while any socket is
/// bound to the port, but allows it over TIME_WAIT leftovers.
pub(crate) fn ensure_free(addr: SocketAddr) -> Result<(), Error> {
    let probe = new_socket(addr).map_err(|e| Error::Bind(addr, e))?;
    probe
        .set_reuse_address(true)
        .map_err(|e| Error::Bind(addr, e))?;
    match probe.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(Error::PortInUse(addr)),
        Err(e) => Err(Error::Bind(addr, e)),
    }
}

/// Binds a non-blocking, close-on-exec listener with SO_REUSEADDR and
/// SO_REUSEPORT.
pub(crate) fn bind(addr: SocketAddr, backlog: u32) -> Result<TcpListener, Error> {
    let err = |e| Error::Bind(addr, e);
    let s = new_socket(addr).map_err(err)?;
    s.set_reuse_address(true).map_err(err)?;
    s.set_reuse_port(true).map_err(err)?;
    s.bind(&addr.into()).map_err(err)?;
    s.listen(backlog.min(i32::MAX as u32) as i32).map_err(err)?;
    s.set_nonblocking(true).map_err(err)?;
    Ok(s.into())
}

fn new_socket(addr: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // "[::]" takes IPv4 too where the host's default allows it; be explicit.
        s.set_only_v6(false)?;
    }
    Ok(s)
}

/// Adopts a listening socket passed by systemd: it must be a listening
/// TCP stream socket.
pub(crate) fn adopt(fd: std::os::fd::OwnedFd) -> Result<TcpListener, Error> {
    let s = Socket::from(fd);
    let bad = |why: &str| Error::Activation(why.to_owned());
    let kind = s.r#type().map_err(|e| bad(&e.to_string()))?;
    if kind != Type::STREAM {
        return Err(bad("the passed socket is not a stream socket"));
    }
    if !s.is_listener().map_err(|e| bad(&e.to_string()))? {
        return Err(bad("the passed socket is not listening"));
    }
    let addr = s.local_addr().map_err(|e| bad(&e.to_string()))?;
    if addr.as_socket().is_none() {
        return Err(bad("the passed socket is not a TCP socket"));
    }
    s.set_nonblocking(true).map_err(|e| bad(&e.to_string()))?;
    s.set_cloexec(true).map_err(|e| bad(&e.to_string()))?;
    Ok(s.into())
}

/// The addresses for a log line or `forkd status`.
pub(crate) fn describe(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The listening sockets, per configured address: one shared by every
/// worker, or (reuseport) one per worker slot.
pub(crate) struct Sockets {
    groups: Vec<Group>,
}

struct Group {
    /// As bound (a configured port 0 has become the real port).
    addr: SocketAddr,
    sockets: Vec<TcpListener>,
}

impl Sockets {
    /// One socket per address, in the configured order.
    ///
    /// # Errors
    /// A socket without a local address.
    pub(crate) fn new(first: Vec<TcpListener>) -> Result<Sockets, Error> {
        let mut groups = Vec::with_capacity(first.len());
        for l in first {
            let addr = l
                .local_addr()
                .map_err(|e| Error::Activation(e.to_string()))?;
            groups.push(Group {
                addr,
                sockets: vec![l],
            });
        }
        Ok(Sockets { groups })
    }

    /// The sockets a handover passed, grouped by address in the order they
    /// come (every address's sockets are passed together, first to last).
    ///
    /// # Errors
    /// A passed descriptor that is not a bound socket.
    pub(crate) fn regroup(passed: Vec<TcpListener>) -> Result<Sockets, Error> {
        let mut groups: Vec<Group> = Vec::new();
        for l in passed {
            let addr = l
                .local_addr()
                .map_err(|e| Error::Upgrade(format!("a passed listening socket: {e}")))?;
            match groups.iter_mut().find(|g| g.addr == addr) {
                Some(g) => g.sockets.push(l),
                None => groups.push(Group {
                    addr,
                    sockets: vec![l],
                }),
            }
        }
        Ok(Sockets { groups })
    }

    /// Puts the groups in the order of `wanted` (the configuration's
    /// `listen`), each matched as [`pick`] does, so that every listener's
    /// settings reach its own socket.
    ///
    /// # Errors
    /// The sockets do not match `wanted` one to one.
    pub(crate) fn follow(&mut self, wanted: &[SocketAddr]) -> Result<(), Error> {
        let differ = |have: &[SocketAddr]| {
            Error::Upgrade(format!(
                "the running instance listens on {}, but this configuration names {}; \
                 a change of `listen` needs a restart",
                describe(have),
                describe(wanted)
            ))
        };
        let have = self.addrs();
        if have.len() != wanted.len() {
            return Err(differ(&have));
        }
        let mut left = std::mem::take(&mut self.groups);
        for want in wanted {
            let addrs: Vec<SocketAddr> = left.iter().map(|g| g.addr).collect();
            let Some(i) = pick(&addrs, *want) else {
                self.groups.append(&mut left);
                return Err(differ(&have));
            };
            self.groups.push(left.remove(i));
        }
        Ok(())
    }

    /// The addresses, as bound.
    pub(crate) fn addrs(&self) -> Vec<SocketAddr> {
        self.groups.iter().map(|g| g.addr).collect()
    }

    /// Some address has more than one socket: slot sockets (reuseport).
    pub(crate) fn per_slot(&self) -> bool {
        self.groups.iter().any(|g| g.sockets.len() > 1)
    }

    /// Every socket, address by address (the order [`Sockets::regroup`]
    /// reads back).
    pub(crate) fn all(&self) -> impl Iterator<Item = &TcpListener> {
        self.groups.iter().flat_map(|g| g.sockets.iter())
    }

    /// The descriptors a worker of `slot` accepts on, one per address;
    /// with `per_slot`, the slot's own sockets, bound on first use.
    ///
    /// # Errors
    /// A slot socket cannot be bound.
    pub(crate) fn for_slot(
        &mut self,
        slot: usize,
        per_slot: bool,
        backlog: u32,
    ) -> Result<Vec<std::os::fd::RawFd>, Error> {
        use std::os::fd::AsRawFd;
        let mut fds = Vec::with_capacity(self.groups.len());
        for g in &mut self.groups {
            if !per_slot {
                fds.push(g.sockets[0].as_raw_fd());
                continue;
            }
            while g.sockets.len() <= slot {
                g.sockets.push(bind(g.addr, backlog)?);
            }
            fds.push(g.sockets[slot].as_raw_fd());
        }
        Ok(fds)
    }

    /// Closes the slot sockets of slots `n` and above (their retiring
    /// workers hold copies until they exit).
    pub(crate) fn truncate(&mut self, n: usize) {
        for g in &mut self.groups {
            g.sockets.truncate(n.max(1));
        }
    }
}

/// Which of `bound` serves the configured address `want`: the one bound
/// to it; else, for port 0 (any port), the only one on its IP; else the
/// only one on its port (systemd binds `ListenStream=8443` on every
/// address).
fn pick(bound: &[SocketAddr], want: SocketAddr) -> Option<usize> {
    let only = |keep: &dyn Fn(&SocketAddr) -> bool| {
        let found: Vec<usize> = (0..bound.len()).filter(|&i| keep(&bound[i])).collect();
        (found.len() == 1).then(|| found[0])
    };
    if let Some(i) = bound.iter().position(|a| *a == want) {
        return Some(i);
    }
    if want.port() == 0 {
        return only(&|a| a.ip() == want.ip());
    }
    only(&|a| a.port() == want.port())
}

/// The sockets systemd passed, matched to the configured addresses: one
/// socket for one address as it comes; for several, each address takes
/// the passed socket bound to it, or else the only one on its port.
///
/// # Errors
/// An address no passed socket serves, or a passed socket no address
/// takes.
pub(crate) fn match_passed(
    passed: Vec<TcpListener>,
    wanted: &[SocketAddr],
) -> Result<Vec<TcpListener>, Error> {
    if passed.len() == 1 && wanted.len() == 1 {
        return Ok(passed);
    }
    let mut left: Vec<(SocketAddr, TcpListener)> = passed
        .into_iter()
        .map(|l| {
            let a = l
                .local_addr()
                .map_err(|e| Error::Activation(e.to_string()))?;
            Ok((a, l))
        })
        .collect::<Result<_, Error>>()?;
    let mut out = Vec::with_capacity(wanted.len());
    for want in wanted {
        let addrs: Vec<SocketAddr> = left.iter().map(|(a, _)| *a).collect();
        let Some(i) = pick(&addrs, *want) else {
            return Err(Error::Activation(format!(
                "no passed socket for listen address {want} (passed: {})",
                left.iter()
                    .map(|(a, _)| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        out.push(left.remove(i).1);
    }
    if let Some((a, _)) = left.first() {
        return Err(Error::Activation(format!(
            "systemd passed a socket on {a} that no listen address names"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_configured_address_finds_its_socket() {
        let bound = [a("127.0.0.1:8080"), a("0.0.0.0:8443"), a("127.0.0.2:41234")];
        assert_eq!(pick(&bound, a("127.0.0.1:8080")), Some(0));
        // systemd's ListenStream=8443 binds every address.
        assert_eq!(pick(&bound, a("10.0.0.1:8443")), Some(1));
        // Port 0: whatever port the kernel gave that address.
        assert_eq!(pick(&bound, a("127.0.0.2:0")), Some(2));
        assert_eq!(pick(&bound, a("127.0.0.1:9999")), None);
        // Two on one port: only an exact match will do.
        let two = [a("127.0.0.1:80"), a("127.0.0.2:80")];
        assert_eq!(pick(&two, a("127.0.0.3:80")), None);
        assert_eq!(pick(&two, a("127.0.0.2:80")), Some(1));
    }

    #[test]
    fn an_upgrade_puts_the_sockets_in_the_configured_order() {
        let l = |addr: &str| bind(a(addr), 16).unwrap();
        let first = l("127.0.0.1:0");
        let second = l("127.0.0.1:0");
        let (p1, p2) = (first.local_addr().unwrap(), second.local_addr().unwrap());
        let mut s = Sockets::regroup(vec![first, second]).unwrap();
        s.follow(&[p2, p1]).unwrap();
        assert_eq!(s.addrs(), vec![p2, p1]);
        let e = s.follow(&[p1]).unwrap_err().to_string();
        assert!(e.contains("needs a restart"), "{e}");
        let e = s.follow(&[p1, a("127.0.0.1:1")]).unwrap_err().to_string();
        assert!(e.contains("needs a restart"), "{e}");
        // A refused order leaves the sockets as they were.
        assert_eq!(s.addrs().len(), 2);
    }
}
