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
        let exact = left.iter().position(|(a, _)| a == want);
        let by_port = || {
            let same: Vec<usize> = (0..left.len())
                .filter(|&i| left[i].0.port() == want.port())
                .collect();
            (same.len() == 1).then(|| same[0])
        };
        let Some(i) = exact.or_else(by_port) else {
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
