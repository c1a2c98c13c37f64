//! Every `unsafe` block of forkd lives here, each with the reason it holds.

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64};

use nix::libc;
use nix::sys::mman::{munmap, MapFlags, ProtFlags};
use nix::unistd::ForkResult;

/// Forks the process.
///
/// # Errors
/// The `fork(2)` error (EAGAIN, ENOMEM).
pub(crate) fn fork() -> nix::Result<ForkResult> {
    debug_assert_eq!(thread_count(), 1, "fork from a multi-threaded supervisor");
    // SAFETY: the supervisor is single-threaded for its whole life (checked at
    // start-up by `thread_count`), so no lock can be held by another thread at
    // the moment of the fork, and the child may use the allocator and std.
    unsafe { nix::unistd::fork() }
}

/// The number of threads of this process, from /proc.
pub(crate) fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(1, |d| d.count())
}

/// Ends the calling process at once, without running atexit handlers or
/// destructors: a forked child must never unwind into the supervisor's code.
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` is async-signal-safe and takes no pointers.
    unsafe { libc::_exit(code) }
}

/// Closes every open descriptor of this process except those in `keep`.
/// Used in a freshly forked child, which must not hold the supervisor's
/// pidfile, control socket or signalfd, nor its siblings' listeners.
pub(crate) fn close_fds_except(keep: &[RawFd]) {
    let fds: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => return,
    };
    for fd in fds {
        if !keep.contains(&fd) {
            // SAFETY: the child owns every descriptor it inherited and never
            // runs the destructors of the supervisor's owners of them (it
            // leaves through `exit_now`), so closing by number cannot close a
            // descriptor that something alive still uses. The read_dir
            // descriptor is already closed; EBADF for it is harmless.
            unsafe { libc::close(fd) };
        }
    }
}

/// A shared, zero-filled memory mapping that survives `fork` (parent and
/// children see the same pages) and, through its memfd, `exec` (an
/// upgraded supervisor maps the same pages again).
pub(crate) struct SharedMapping {
    ptr: NonNull<u8>,
    len: NonZeroUsize,
    fd: OwnedFd,
}

impl SharedMapping {
    /// # Errors
    /// The `memfd_create(2)`, `ftruncate(2)` or `mmap(2)` error.
    pub(crate) fn new(len: NonZeroUsize) -> nix::Result<Self> {
        let fd = nix::sys::memfd::memfd_create(
            c"forkd-scoreboard",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )?;
        nix::unistd::ftruncate(&fd, len.get() as nix::libc::off_t)?;
        Self::map(fd, len)
    }

    /// Maps a scoreboard memfd handed over by the previous image, first
    /// growing it (zero-filled) to `len` when that image made it shorter.
    /// Mappings of the shorter length, in workers of that image, stay
    /// valid: they never reach the new part.
    pub(crate) fn from_fd(fd: OwnedFd, len: NonZeroUsize) -> nix::Result<Self> {
        let size = nix::sys::stat::fstat(&fd)?.st_size;
        if usize::try_from(size).unwrap_or(0) < len.get() {
            nix::unistd::ftruncate(&fd, len.get() as nix::libc::off_t)?;
        }
        Self::map(fd, len)
    }

    fn map(fd: OwnedFd, len: NonZeroUsize) -> nix::Result<Self> {
        // SAFETY: a fresh mapping at an address of the kernel's choosing
        // aliases no existing Rust object; the memfd is at least `len` long.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )?
        };
        Ok(SharedMapping {
            ptr: ptr.cast(),
            len,
            fd,
        })
    }

    /// `count` elements of `T` from byte `offset` on.
    ///
    /// The view is not tied to the mapping's lifetime: it is for a forked
    /// worker, which never unmaps the scoreboard (it leaves through
    /// `exit_now`), and for the supervisor's own scoreboard, which keeps its
    /// mapping alive as long as it uses the view.
    /// Panics unless they lie inside the mapping, aligned for `T`.
    pub(crate) fn view_at<T: SharedPlain>(&self, offset: usize, count: usize) -> SharedSlice<T> {
        assert!(
            std::mem::align_of::<T>() <= 4096 && offset.is_multiple_of(std::mem::align_of::<T>()),
            "the mapping is page-aligned, and so must the offset be for T"
        );
        let end = count
            .checked_mul(std::mem::size_of::<T>())
            .and_then(|n| n.checked_add(offset));
        assert!(
            end.is_some_and(|e| e <= self.len.get()),
            "view past the mapping"
        );
        SharedSlice {
            // SAFETY: `offset` is within the mapping (asserted above), so
            // the pointer stays inside the same allocation.
            base: unsafe { self.ptr.add(offset) }.cast(),
            len: count,
        }
    }

    pub(crate) fn fd(&self) -> &OwnedFd {
        &self.fd
    }
}

/// Types that may be viewed in a [`SharedMapping`] by any number of
/// processes and threads at once.
///
/// # Safety
/// All-zero bytes must be a valid value (the mapping starts zero-filled),
/// and every field must be an atomic (or an array of them), so that shared
/// access from several processes is sound without locks.
pub(crate) unsafe trait SharedPlain: Sync {}

/// The layout of one scoreboard cell (the scoreboard's logic is in
/// `scoreboard`). It is here, beside the promise below, so that one file
/// shows both what is shared between processes and why that is sound.
#[repr(C, align(64))]
pub(crate) struct Cell {
    pub(crate) pid: AtomicI32,
    pub(crate) state: AtomicU32,
    pub(crate) slot: AtomicU32,
    pub(crate) generation: AtomicU64,
    /// CLOCK_MONOTONIC milliseconds, comparable across processes.
    pub(crate) heartbeat_ms: AtomicU64,
    pub(crate) started_ms: AtomicU64,
    pub(crate) requests: AtomicU64,
    /// Cell 0 only: ready workers and restarts so far, from the supervisor.
    pub(crate) workers_up: AtomicU64,
    pub(crate) restarts: AtomicU64,
    pub(crate) counters: [AtomicU64; COUNTERS],
    /// A short text the worker publishes (which Redis it uses), as bytes.
    pub(crate) info: [AtomicU64; INFO_WORDS],
}

/// What a worker is doing, one per scoreboard cell, after all the cells
/// (a layout an older image never sees: see [`SharedMapping::from_fd`]).
/// The oldest request's fields are guarded by `oldest_seq`, odd while they
/// are written.
#[repr(C, align(64))]
pub(crate) struct Activity {
    pub(crate) in_flight: AtomicU64,
    pub(crate) connections: AtomicU64,
    pub(crate) hash_queue: AtomicU64,
    pub(crate) oldest_seq: AtomicU64,
    /// CLOCK_MONOTONIC milliseconds; 0 when nothing is in flight.
    pub(crate) oldest_start_ms: AtomicU64,
    pub(crate) oldest_what: [AtomicU64; ACTIVITY_TEXT_WORDS],
    pub(crate) oldest_id: [AtomicU64; ACTIVITY_TEXT_WORDS],
    /// Cell 0 only, from the supervisor: 1 once it is stopping (so
    /// /readyz fails during `shutdown_delay`).
    pub(crate) stopping: AtomicU64,
    pub(crate) accept_queue: AtomicU64,
    pub(crate) accept_backlog: AtomicU64,
    pub(crate) recycles: [AtomicU64; RECYCLE_REASONS],
    /// Room for later fields, so that they need no new layout.
    pub(crate) reserved: [AtomicU64; 8],
}

/// Words of each text of [`Activity`].
pub(crate) const ACTIVITY_TEXT_WORDS: usize = 8;
/// Recycling reasons counted in [`Activity::recycles`].
pub(crate) const RECYCLE_REASONS: usize = 3;

// SAFETY: as for `Cell`: `repr(C)`, atomics and arrays of them only.
unsafe impl SharedPlain for Activity {}

/// The accept queue of a listening TCP socket: (connections waiting to be
/// accepted, the backlog), from `TCP_INFO`, which reports these two for a
/// socket in the LISTEN state.
pub(crate) fn accept_queue(fd: BorrowedFd<'_>) -> Option<(u64, u64)> {
    let mut info = std::mem::MaybeUninit::<nix::libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<nix::libc::tcp_info>() as nix::libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes for the kernel to
    // fill, and `fd` is a descriptor borrowed for the call.
    let rc = unsafe {
        nix::libc::getsockopt(
            fd.as_raw_fd(),
            nix::libc::IPPROTO_TCP,
            nix::libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: zero-filled and then written by the kernel: every field is a
    // plain integer, so any bytes are a valid `tcp_info`.
    let info = unsafe { info.assume_init() };
    Some((u64::from(info.tcpi_unacked), u64::from(info.tcpi_sacked)))
}

/// Words of a cell's published text.
pub(crate) const INFO_WORDS: usize = 16;

/// Generic counters per cell.
pub const COUNTERS: usize = 64;

/// More generic counters per cell (the worker's per-route figures), after
/// the activities: a layout an older image never sees. Counter `k` of a
/// worker is `COUNTERS + k` in [`crate::WorkerCell::add`].
pub const MORE_COUNTERS: usize = 256;

#[repr(C, align(64))]
pub(crate) struct MoreCounters {
    pub(crate) counters: [AtomicU64; MORE_COUNTERS],
}

// SAFETY: `repr(C)`, an array of atomics only: all-zero is valid, and all
// access is atomic.
unsafe impl SharedPlain for MoreCounters {}

// SAFETY: a scoreboard cell is `repr(C)` and made only of atomic integers
// and arrays of them: all-zero is a valid cell, and all access is atomic.
unsafe impl SharedPlain for Cell {}

/// A typed view of a shared mapping (see [`SharedMapping::view`]).
pub(crate) struct SharedSlice<T: SharedPlain> {
    base: NonNull<T>,
    len: usize,
}

impl<T: SharedPlain> Clone for SharedSlice<T> {
    fn clone(&self) -> Self {
        SharedSlice {
            base: self.base,
            len: self.len,
        }
    }
}

// SAFETY: `T` is made of atomics only (`SharedPlain`), so handing the view
// to another thread shares nothing that is not already safe to share; the
// mapping outlives every view (see `SharedMapping::view`).
unsafe impl<T: SharedPlain> Send for SharedSlice<T> {}
// SAFETY: as above: every access to a `T` is atomic.
unsafe impl<T: SharedPlain> Sync for SharedSlice<T> {}

impl<T: SharedPlain> SharedSlice<T> {
    /// The `i`th element. Panics when `i` is out of the mapping.
    pub(crate) fn get(&self, i: usize) -> &T {
        assert!(i < self.len, "element {i} of {}", self.len);
        // SAFETY: `i` is within the mapping (asserted), which is
        // page-aligned (so every element is aligned for `T`), zero-filled or
        // written only through atomics (so a valid `T`, by `SharedPlain`),
        // and alive for as long as the view is used.
        unsafe { &*self.base.as_ptr().add(i) }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `new` with this length, and the
        // borrows handed out by the scoreboard end with it.
        let _ = unsafe { munmap(self.ptr.cast(), self.len.get()) };
    }
}

/// Starts `cmd` in a new session (no controlling terminal), for
/// `forkd start --daemon`.
///
/// # Errors
/// As `Command::spawn`.
pub fn spawn_detached(cmd: &mut Command) -> io::Result<Child> {
    // SAFETY: the closure runs between fork and exec and only calls
    // `setsid`, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(io::Error::from)?;
            Ok(())
        });
    }
    cmd.spawn()
}

/// Starts a helper service (the managed redis-server): it gets the default
/// signal mask back (the supervisor blocks the signals it reads from a
/// signalfd, and a mask survives exec), SIGTERM when the supervisor dies,
/// and umask 077.
///
/// # Errors
/// As `Command::spawn`.
pub(crate) fn spawn_service(cmd: &mut Command) -> io::Result<Child> {
    // SAFETY: the closure runs between fork and exec and only calls
    // `reset_child` and umask, which are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            reset_child(nix::sys::signal::Signal::SIGTERM)?;
            // What it writes (an append-only file of password hashes and
            // sessions) is for the service user alone.
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
            Ok(())
        });
    }
    cmd.spawn()
}

/// In a child between fork and exec: the default signal mask back (the
/// supervisor blocks the signals it reads from a signalfd, and a mask
/// survives exec) and `deathsig` when the supervisor dies. Calls only
/// sigprocmask and prctl, which are async-signal-safe.
fn reset_child(deathsig: nix::sys::signal::Signal) -> io::Result<()> {
    let empty = nix::sys::signal::SigSet::empty();
    nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&empty),
        None,
    )?;
    nix::sys::prctl::set_pdeathsig(deathsig)?;
    Ok(())
}

/// The sockets systemd passed to this process (`LISTEN_FDS` descriptors
/// from 3 on, when `LISTEN_PID` is this process). Call once.
pub(crate) fn listen_fds() -> Vec<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let n = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    if !ours || !(1..=64).contains(&n) {
        return Vec::new();
    }
    (0..n)
        .map(|i| {
            // SAFETY: by the sd_listen_fds protocol, descriptors 3 to
            // 3 + LISTEN_FDS - 1 are open and handed to this process, and
            // this function is called once, so each gets one owner.
            unsafe { std::os::fd::OwnedFd::from_raw_fd(3 + i) }
        })
        .collect()
}

/// A close-on-exec copy of a descriptor inherited across an upgrade's
/// exec; the inherited number itself stays open (see [`close_inherited`]).
///
/// # Errors
/// EBADF when `fd` is not open.
pub(crate) fn dup_inherited(fd: RawFd) -> nix::Result<OwnedFd> {
    // SAFETY: only used for the duration of the fcntl call; a descriptor
    // that is not open makes fcntl fail with EBADF, nothing worse.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let copy = nix::fcntl::fcntl(borrowed, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else
    // owns.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// Closes a descriptor number inherited across an upgrade's exec, once its
/// copy is owned (or when it is not needed at all).
pub(crate) fn close_inherited(fd: RawFd) {
    if fd > 2 {
        // SAFETY: the previous image passed this number for this image to
        // use once; nothing in this image owns it (owners hold copies made
        // by `dup_inherited`), so closing it cannot pull a descriptor from
        // under an owner. EBADF for a number already closed is harmless.
        unsafe { libc::close(fd) };
    }
}

/// Makes an inherited descriptor number, if open, survive the next exec.
pub(crate) fn set_inheritable(fd: RawFd) {
    // SAFETY: only used for the duration of the fcntl call; EBADF for a
    // closed number is harmless.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let _ = set_cloexec(&borrowed, false);
}

/// Makes reads from `fd` return at once.
///
/// # Errors
/// The `fcntl(2)` error.
pub(crate) fn set_nonblocking(fd: &impl AsFd) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(|_| ())
}

/// Starts an upgrade probe: the default signal mask (the supervisor's
/// blocked signals would survive exec), SIGKILL when the supervisor dies,
/// and `image`, the binary it is executed through as /proc/self/fd/N, kept
/// open across the exec so that an interpreter can open a script by it.
///
/// # Errors
/// As `Command::spawn`: the binary cannot be executed.
pub(crate) fn spawn_probe(cmd: &mut Command, image: BorrowedFd<'_>) -> io::Result<Child> {
    let image = image.as_raw_fd();
    // SAFETY: the closure runs between fork and exec and only calls
    // `reset_child` and fcntl, which are async-signal-safe; `image` is
    // open in the child (inherited) until the exec.
    unsafe {
        cmd.pre_exec(move || {
            reset_child(nix::sys::signal::Signal::SIGKILL)?;
            if libc::fcntl(image, libc::F_SETFD, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Replaces this process's image. Returns only on failure, why.
pub(crate) fn execve(path: &str, args: &[String], env: &[(String, String)]) -> String {
    use std::ffi::CString;
    let cstr = |s: &str| CString::new(s).map_err(|e| e.to_string());
    let built = || -> Result<(CString, Vec<CString>, Vec<CString>), String> {
        let argv = args.iter().map(|a| cstr(a)).collect::<Result<_, _>>()?;
        let envp = env
            .iter()
            .map(|(k, v)| cstr(&format!("{k}={v}")))
            .collect::<Result<_, _>>()?;
        Ok((cstr(path)?, argv, envp))
    };
    match built() {
        Ok((path, argv, envp)) => match nix::unistd::execve(&path, &argv, &envp) {
            Err(e) => format!("cannot execute {}: {e}", path.to_string_lossy()),
            Ok(never) => match never {},
        },
        Err(e) => e,
    }
}

/// Sets or clears close-on-exec.
///
/// # Errors
/// The `fcntl(2)` error.
pub(crate) fn set_cloexec(fd: &impl AsFd, on: bool) -> nix::Result<()> {
    let flags = if on {
        nix::fcntl::FdFlag::FD_CLOEXEC
    } else {
        nix::fcntl::FdFlag::empty()
    };
    nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_SETFD(flags)).map(|_| ())
}

/// In a new worker, before it runs anything: removes the variables for
/// which `hidden` is true from the environment, and blanks their text in
/// the environment block the process image was started with. A forked
/// child shares that block with the supervisor, and /proc/PID/environ shows
/// it whatever the environment is now; a compromised worker must find no
/// NOTIFY_SOCKET to speak for the service with.
pub(crate) fn scrub_environment(hidden: impl Fn(&str) -> bool) {
    let names: Vec<std::ffi::OsString> = std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| hidden(&k.to_string_lossy()))
        .collect();
    for k in names {
        // The child is single-threaded right after the fork.
        std::env::remove_var(k);
    }
    // env_start and env_end: fields 50 and 51 of /proc/self/stat, counted
    // from the state (field 3) after the command's closing parenthesis.
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<usize>().ok());
    let (Some(start), Some(end)) = (field(50), field(51)) else {
        return;
    };
    if start == 0 || end <= start || end - start > 1 << 30 {
        return;
    }
    // SAFETY: [env_start, env_end) is the environment block the kernel laid
    // out for this image, mapped read-write on the initial stack for the
    // process's whole life. Nothing holds a Rust reference into it: std
    // copies whatever it reads from the environment, and the entries blanked
    // here were just removed from libc's `environ`, so no pointer to them is
    // left there. The child is single-threaded, so nothing reads it meanwhile.
    let block = unsafe { std::slice::from_raw_parts_mut(start as *mut u8, end - start) };
    let mut i = 0;
    while i < block.len() {
        let len = block[i..]
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(block.len() - i);
        let entry = &block[i..i + len];
        let name = entry.split(|&b| b == b'=').next().unwrap_or(entry);
        if hidden(&String::from_utf8_lossy(name)) {
            block[i..i + len].fill(0);
        }
        i += len + 1;
    }
}

/// In a new worker: large allocations (argon2 takes 19 MiB per hash) are
/// always mmapped and so returned to the system when freed. glibc would
/// otherwise raise its mmap threshold after the first such free and keep
/// later ones in its heaps, leaving workers tens of MiB larger after a few
/// logins.
pub(crate) fn return_large_allocations() {
    // SAFETY: mallopt only changes a malloc tunable; called before the
    // worker starts any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}
