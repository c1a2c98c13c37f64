//! The runtime and data directories, private to the service user (the
//! model is systemd's `RuntimeDirectory=`). A directory is opened with
//! `O_NOFOLLOW` and checked on that descriptor (no window between the check
//! and the use): a directory, owned by this user, writable by nobody else.
//! Files in it are opened relative to that descriptor with `O_NOFOLLOW`, and
//! handed to the account root drops to with `fchown`/`fchownat` on what was
//! opened, never `chown(path)`: a planted symbolic link is never followed.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{open, openat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstat, Mode, SFlag};
use nix::unistd::{fchown, fchownat, geteuid, Uid};

use crate::privs::Account;
use crate::Error;

/// A checked private directory, open.
pub(crate) struct PrivateDir {
    path: PathBuf,
    fd: OwnedFd,
}

impl PrivateDir {
    /// Creates `path` (mode 0700; missing parents 0755) if it does not exist,
    /// then checks it: a directory, not a link, owned by this user (or, for
    /// root about to drop to `owner`, by that account), not writable by
    /// group or others. When `owner` is given, hands it over with `fchown`.
    /// `private` also takes read access from group and others (for data).
    ///
    /// # Errors
    /// [`Error::UnsafeDir`] naming the directory, what is wrong and the fix.
    pub(crate) fn prepare(
        path: &Path,
        what: &'static str,
        owner: Option<&Account>,
        private: bool,
    ) -> Result<Self, Error> {
        let unsafe_dir = |why: String| Error::UnsafeDir {
            what,
            path: path.to_owned(),
            why,
        };
        if std::fs::symlink_metadata(path).is_err() {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| Error::file(parent, e))?;
            }
            match std::fs::DirBuilder::new().mode(0o700).create(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::file(path, e)),
            }
        }
        let fd = open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR => {
                let link =
                    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
                unsafe_dir(if link {
                    "it is a symbolic link; forkd uses a real directory there".into()
                } else {
                    "it is not a directory".into()
                })
            }
            e => Error::file(path, e.into()),
        })?;
        let st = fstat(&fd).map_err(|e| Error::file(path, e.into()))?;
        let me = geteuid();
        let uid = Uid::from_raw(st.st_uid);
        let allowed = uid == me || (me.is_root() && owner.is_some_and(|a| a.uid == uid));
        if !allowed {
            let user = owner.map_or(me, |a| a.uid);
            return Err(unsafe_dir(format!(
                "it belongs to uid {uid}, not to uid {user} that forkd runs as; \
                 remove it or run: chown {user} {}",
                path.display()
            )));
        }
        let mode = st.st_mode & 0o7777;
        if mode & 0o022 != 0 {
            return Err(unsafe_dir(format!(
                "group or others may write to it (mode {mode:04o}); run: chmod 0700 {}",
                path.display()
            )));
        }
        if private && mode & 0o077 != 0 {
            fchmod(&fd, Mode::from_bits_truncate(0o700))
                .map_err(|e| Error::file(path, e.into()))?;
        }
        if let Some(a) = owner {
            fchown(&fd, Some(a.uid), Some(a.gid)).map_err(|e| {
                Error::Privileges(format!("cannot give {} to {}: {e}", path.display(), a.name))
            })?;
        }
        Ok(PrivateDir {
            path: path.to_owned(),
            fd,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Opens (creating with `mode`) the regular file `name` in the
    /// directory, never through a symbolic link, without blocking on a
    /// planted FIFO.
    ///
    /// # Errors
    /// The file is a link or not a regular file, or cannot be opened.
    pub(crate) fn open_file(&self, name: &str, mode: u32) -> Result<File, Error> {
        let path = self.path.join(name);
        let fd = openat(
            &self.fd,
            name,
            OFlag::O_RDWR
                | OFlag::O_CREAT
                | OFlag::O_NOFOLLOW
                | OFlag::O_CLOEXEC
                | OFlag::O_NONBLOCK,
            Mode::from_bits_truncate(mode),
        )
        .map_err(|e| match e {
            nix::errno::Errno::ELOOP => Error::UnsafeDir {
                what: "file",
                path: path.clone(),
                why: "it is a symbolic link; remove it".into(),
            },
            e => Error::file(&path, e.into()),
        })?;
        let st = fstat(&fd).map_err(|e| Error::file(&path, e.into()))?;
        if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
            return Err(Error::UnsafeDir {
                what: "file",
                path,
                why: "it is not a regular file; remove it".into(),
            });
        }
        Ok(File::from(fd))
    }

    /// Hands the entry `name` (a socket, say) to `owner`, not following a
    /// link.
    ///
    /// # Errors
    /// The `fchownat(2)` error.
    pub(crate) fn give_entry(&self, name: &str, owner: &Account) -> Result<(), Error> {
        fchownat(
            self.fd.as_fd(),
            name,
            Some(owner.uid),
            Some(owner.gid),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| {
            Error::Privileges(format!(
                "cannot give {} to {}: {e}",
                self.path.join(name).display(),
                owner.name
            ))
        })
    }
}

/// Hands an open file to `owner`.
///
/// # Errors
/// The `fchown(2)` error.
pub(crate) fn give_file(file: &File, path: &Path, owner: &Account) -> Result<(), Error> {
    fchown(file, Some(owner.uid), Some(owner.gid)).map_err(|e| {
        Error::Privileges(format!(
            "cannot give {} to {}: {e}",
            path.display(),
            owner.name
        ))
    })
}
