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
