//! The pidfile (locked for the supervisor's life, so a stale one left by a
//! dead process never blocks a start) and the control socket's path.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::private_dir::{give_file, PrivateDir};
use crate::privs::Account;
use crate::Error;

/// `RUNTIME_DIR/INSTANCE.pid`
pub fn pidfile_path(runtime_dir: &Path, instance: &str) -> PathBuf {
    runtime_dir.join(format!("{instance}.pid"))
}

/// `RUNTIME_DIR/INSTANCE.sock`
pub fn control_socket_path(runtime_dir: &Path, instance: &str) -> PathBuf {
    runtime_dir.join(format!("{instance}.sock"))
}

/// A held pidfile: locked with flock while this process lives.
pub(crate) struct Pidfile {
    path: PathBuf,
    _lock: Flock<File>,
}

impl Pidfile {
    /// Takes `INSTANCE.pid` in `dir` (opened relative to the directory,
    /// never through a link).
    pub(crate) fn acquire(dir: &PrivateDir, instance: &str) -> Result<Self, Error> {
        let path = pidfile_path(dir.path(), instance);
        let name = format!("{instance}.pid");
        let file = dir.open_file(&name, 0o644)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(Error::AlreadyRunning {
                    instance: instance.to_owned(),
                    pid: text.trim().parse().unwrap_or(0),
                });
            }
            Err((_, e)) => {
                return Err(Error::Sys {
                    what: "flock on the pidfile",
                    source: e,
                })
            }
        };
        let write = |f: &mut File| -> std::io::Result<()> {
            f.set_len(0)?;
            f.rewind()?;
            writeln!(f, "{}", std::process::id())?;
            f.sync_data()
        };
        write(&mut lock).map_err(|e| Error::file(&path, e))?;
        Ok(Pidfile { path, _lock: lock })
    }

    /// Takes over the pidfile whose locked descriptor an upgrade handed
    /// over (the lock belongs to the open file, so it was never released).
    pub(crate) fn adopt(path: &Path, fd: std::os::fd::OwnedFd) -> Result<Self, Error> {
        let lock =
            Flock::lock(File::from(fd), FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
                Error::Sys {
                    what: "flock on the inherited pidfile",
                    source: e,
                }
            })?;
        Ok(Pidfile {
            path: path.to_owned(),
            _lock: lock,
        })
    }

    /// Hands the open pidfile to the account root drops to.
    pub(crate) fn give(&self, owner: &Account) -> Result<(), Error> {
        give_file(&self._lock, &self.path, owner)
    }

    pub(crate) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self._lock.as_fd()
    }

    /// Removes the file; the lock goes with `self`.
    pub(crate) fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
