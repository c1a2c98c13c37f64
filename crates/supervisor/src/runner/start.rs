//! Start-up: a fresh start binds, takes the files and drops privileges;
//! a resume after an upgrade adopts all of that from the handover instead,
//! and goes back to the previous binary when it cannot. Both end in
//! [`Supervisor::new`].

use std::net::TcpListener;
use std::os::unix::net::{UnixListener, UnixStream};

use nix::sys::stat::{umask, Mode};

use super::systemd::Systemd;
use super::upgrade::Upgrade;
use super::{limits, Supervisor};
use crate::control::{Awaiting, Conn, UpgradeOutcome};
use crate::control_files::{control_socket_path, pidfile_path, Pidfile};
use crate::plan::Plan;
use crate::private_dir::{give_file, PrivateDir};
use crate::redis::RedisChild;
use crate::scoreboard::{now_ms, Scoreboard};
use crate::signals::Signals;
use crate::upgrade::{self, Inherited};
use crate::{listen, privs, sys, Error, ListenerMode, Program, Settings};

/// How long a start waits for the managed redis-server before it forks the
/// workers (a server that loads a large append-only file takes a while).
const REDIS_START_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs the supervisor until it is stopped.
///
/// Binds the listener (refusing a port that is already served), takes the
/// pidfile and control socket, forks `settings.workers` workers running
/// `program`, and supervises them until SIGTERM/SIGINT/SIGQUIT or
/// `forkd stop`.
///
/// # Errors
/// Anything that prevents start-up: the instance already runs, the port is
/// served, a file or directory cannot be made. Once workers run, failures
/// are logged and handled, not returned.
/// `inherited` is the handover this process was started with
/// ([`crate::take_handover`]): it resumes instead of starting afresh.
pub fn run<P: Program>(
    settings: Settings,
    program: P,
    inherited: Option<Inherited>,
) -> Result<(), Error> {
    let threads = sys::thread_count();
    if threads != 1 {
        return Err(Error::Threads(threads));
    }
    if let Some(inherited) = inherited {
        return resume(settings, program, inherited);
    }
    let mut sup = start(settings, program)?;
    // The store first, and up (bounded) before the workers look for it.
    if let Some(r) = &mut sup.redis {
        r.tick(now_ms());
        if !r.wait_ready(REDIS_START_WAIT) {
            log::warn!(
                "redis-server does not answer on {} after {} s; starting the workers anyway",
                r.socket().display(),
                REDIS_START_WAIT.as_secs()
            );
        }
    }
    let actions = sup.plan.start();
    sup.execute(actions);
    sup.finish()
}

/// A fresh start: directories and files (as root, then handed to the
/// account), the listener and control socket, then privileges dropped.
/// A start that fails after taking the pidfile removes it.
fn start<P: Program>(mut settings: Settings, program: P) -> Result<Supervisor<P>, Error> {
    let fixed = &settings.fixed;
    let account = match &fixed.user {
        Some(u) => Some(privs::resolve(u, fixed.group.as_deref())?),
        None => None,
    };
    let runtime = PrivateDir::prepare(
        &fixed.runtime_dir,
        "runtime directory",
        account.as_ref(),
        false,
    )?;
    let pidfile = Pidfile::acquire(&runtime, &fixed.instance)?;
    let parts = match prepare(&mut settings, &runtime, &pidfile, account.as_ref()) {
        Ok(parts) => parts,
        Err(e) => {
            pidfile.remove();
            return Err(e);
        }
    };
    let (sockets, control, signals, board, plan, redis) = parts;
    Ok(Supervisor::new(
        settings,
        program,
        Parts {
            pidfile,
            sockets,
            control,
            board,
            signals,
            plan,
            redis,
            started_ms: now_ms(),
        },
    ))
}

/// What a start makes once it holds the pidfile.
type Prepared = (
    listen::Sockets,
    UnixListener,
    Signals,
    Scoreboard,
    Plan,
    Option<RedisChild>,
);

fn prepare(
    settings: &mut Settings,
    runtime: &PrivateDir,
    pidfile: &Pidfile,
    account: Option<&privs::Account>,
) -> Result<Prepared, Error> {
    if let Some(path) = &settings.live.log_file {
        let log = crate::open_log(path)?;
        crate::point_output_at(&log)?;
        if let Some(acct) = account {
            give_file(&log, path, acct)?;
        }
    }
    if let Some(r) = &settings.fixed.redis {
        // Its append-only file holds password hashes and sessions.
        PrivateDir::prepare(&r.dir, "redis data directory", account, true)?;
    }
    let sockets = listen::Sockets::new(first_listeners(settings)?)?;
    let fixed = &settings.fixed;
    let control_path = control_socket_path(&fixed.runtime_dir, &fixed.instance);
    let control = bind_control(&control_path)?;
    if let Some(acct) = account {
        // Everything the supervisor (and its redis-server) writes later
        // must belong to the account first (the directories already do).
        let name = control_path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        runtime.give_entry(&name, acct)?;
        pidfile.give(acct)?;
        privs::drop_to(acct)?;
    }
    let signals = Signals::new().map_err(|source| Error::Sys {
        what: "signalfd",
        source,
    })?;
    // Twice the largest worker count: a rolling replacement briefly runs
    // two processes per slot.
    let board = Scoreboard::new(2 * crate::MAX_WORKERS).map_err(|source| Error::Sys {
        what: "mmap for the scoreboard",
        source,
    })?;
    let mut seed = [0u8; 8];
    let _ = getrandom::fill(&mut seed);
    log::info!(
        "forkd {} starting: instance '{}', {} worker(s), listening on {} ({} listener)",
        env!("CARGO_PKG_VERSION"),
        fixed.instance,
        settings.live.workers,
        crate::listen::describe(&sockets.addrs()),
        fixed.listener.name()
    );
    let mut plan = Plan::new(
        settings.live.workers,
        limits(&settings.live),
        u64::from_le_bytes(seed),
    );
    plan.set_recycling(settings.live.recycling);
    let redis = fixed.redis.clone().map(RedisChild::new);
    Ok((sockets, control, signals, board, plan, redis))
}

/// The sockets systemd passed (socket activation), or new ones bound to
/// each `listen` address once nothing else serves it.
fn first_listeners(settings: &mut Settings) -> Result<Vec<TcpListener>, Error> {
    let fixed = &mut settings.fixed;
    let passed = sys::listen_fds();
    if !passed.is_empty() {
        let adopted = passed
            .into_iter()
            .map(listen::adopt)
            .collect::<Result<Vec<_>, _>>()?;
        let matched = listen::match_passed(adopted, &fixed.listen)?;
        if fixed.listener == ListenerMode::Reuseport {
            log::warn!("socket activation: serving on the passed sockets in shared mode");
            fixed.listener = ListenerMode::Shared;
        }
        if matched.len() == 1 {
            log::info!("socket activation: adopted the socket passed by systemd");
        } else {
            log::info!(
                "socket activation: adopted the {} sockets passed by systemd",
                matched.len()
            );
        }
        return Ok(matched);
    }
    for addr in &fixed.listen {
        listen::ensure_free(*addr)?;
    }
    fixed
        .listen
        .iter()
        .map(|addr| listen::bind(*addr, fixed.backlog))
        .collect()
}

/// The control socket, made 0600 (the umask covers the bind itself).
fn bind_control(path: &std::path::Path) -> Result<UnixListener, Error> {
    let _ = std::fs::remove_file(path);
    let old_mask = umask(Mode::from_bits_truncate(0o177));
    let control = UnixListener::bind(path);
    umask(old_mask);
    let control = control.map_err(|e| Error::file(path, e))?;
    control
        .set_nonblocking(true)
        .map_err(|e| Error::file(path, e))?;
    Ok(control)
}

/// What a fresh start and a resume both bring to the supervisor.
pub(crate) struct Parts {
    pub(crate) pidfile: Pidfile,
    pub(crate) sockets: listen::Sockets,
    pub(crate) control: UnixListener,
    pub(crate) board: Scoreboard,
    pub(crate) signals: Signals,
    pub(crate) plan: Plan,
    pub(crate) redis: Option<RedisChild>,
    pub(crate) started_ms: u64,
}

impl<P: Program> Supervisor<P> {
    /// The one constructor, for a fresh start and a resume alike.
    pub(crate) fn new(settings: Settings, program: P, parts: Parts) -> Self {
        Supervisor {
            systemd: Systemd::from_env(),
            pidfile: Some(parts.pidfile),
            exe: upgrade::exe_path(),
            args: std::env::args().collect(),
            env: std::env::vars().collect(),
            upgrade: None,
            redis: parts.redis,
            plan: parts.plan,
            control_path: control_socket_path(
                &settings.fixed.runtime_dir,
                &settings.fixed.instance,
            ),
            settings,
            program,
            board: parts.board,
            sockets: parts.sockets,
            signals: parts.signals,
            control: parts.control,
            conns: Vec::new(),
            pid: std::process::id() as i32,
            started_ms: parts.started_ms,
            resized: None,
        }
    }
}

/// Continues where the previous image of this process left off: an upgrade
/// (replace every worker with one of this binary) or a rollback (keep the
/// workers, report the failure). Any error before the supervisor runs goes
/// back to the previous binary with the handover as it came.
pub(crate) fn resume<P: Program>(
    settings: Settings,
    program: P,
    inherited: Inherited,
) -> Result<(), Error> {
    let build = settings.fixed.build.clone();
    let mut sup = match adopt(settings, program, &inherited) {
        Ok(s) => s,
        Err(e) => {
            let why = inherited.roll_back(&e.to_string(), &build);
            log::error!("cannot resume after the upgrade ({e}) nor go back: {why}");
            return Err(e);
        }
    };
    let envelope = inherited.envelope.clone();
    inherited.release();
    match envelope.rollback {
        Some(reason) => {
            log::error!(
                "upgrade to build {} failed and was rolled back; the previous workers keep serving: {reason}",
                envelope.previous_build
            );
            sup.reply_upgrade(UpgradeOutcome {
                ok: false,
                from_build: sup.settings.fixed.build.clone(),
                to_build: envelope.previous_build.clone(),
                replaced: Vec::new(),
                error: Some(format!(
                    "{reason}; rolled back from build {} to build {}",
                    envelope.previous_build, sup.settings.fixed.build
                )),
            });
            sup.systemd.ready();
        }
        None => {
            log::info!(
                "upgraded from build {} to build {}: replacing the workers",
                envelope.previous_build,
                sup.settings.fixed.build
            );
            let actions = sup.plan.begin_reload(now_ms());
            sup.execute(actions);
        }
    }
    sup.finish()
}

/// Builds the supervisor from the handover's descriptors (copies of them:
/// the originals stay open for a rollback until the resume succeeds).
fn adopt<P: Program>(
    mut settings: Settings,
    program: P,
    inherited: &Inherited,
) -> Result<Supervisor<P>, Error> {
    let h = inherited
        .payload
        .as_ref()
        .map_err(|e| Error::Upgrade(e.clone()))?;
    #[cfg(feature = "failpoints")]
    if std::env::var("FORKD_FAILPOINTS").is_ok_and(|v| v.split(',').any(|p| p.trim() == "handover"))
    {
        return Err(Error::Upgrade(
            "failpoint handover: this build rejects the upgrade state".into(),
        ));
    }
    let sys_err = |what: &'static str| move |source| Error::Sys { what, source };
    let take = |fd| {
        inherited
            .adopt(fd)
            .map_err(sys_err("an inherited descriptor"))
    };
    let mut passed = Vec::new();
    for fd in &h.listeners {
        passed.push(TcpListener::from(take(*fd)?));
    }
    let mut sockets = listen::Sockets::regroup(passed)?;
    sockets.follow(&settings.fixed.listen)?;
    if sockets.per_slot() {
        settings.fixed.listener = ListenerMode::Reuseport;
    }
    let control = UnixListener::from(take(h.control)?);
    control
        .set_nonblocking(true)
        .map_err(|e| Error::file(&settings.fixed.runtime_dir, e))?;
    let board = Scoreboard::adopt(take(h.scoreboard)?, h.scoreboard_cells)
        .map_err(sys_err("mmap for the scoreboard"))?;
    let signals = Signals::new().map_err(sys_err("signalfd"))?;
    let mut conns = Vec::new();
    for fd in &h.waiting {
        if let Ok(mut c) = Conn::new(UnixStream::from(take(*fd)?)) {
            c.awaiting = Some(Awaiting::Upgrade);
            conns.push(c);
        }
    }
    let mut redis = settings
        .fixed
        .redis
        .clone()
        .map(crate::redis::RedisChild::new);
    if let (Some(r), Some(pid)) = (&mut redis, h.redis_pid) {
        r.adopt(pid);
    }
    let mut plan = h.plan.clone();
    plan.set_limits(limits(&settings.live));
    plan.set_recycling(settings.live.recycling);
    let e = &inherited.envelope;
    let upgrade = match e.rollback {
        Some(_) => None,
        None => Some(Upgrade::Replacing {
            previous_exe: e.previous_exe.map(take).transpose()?,
            previous_build: e.previous_build.clone(),
            legacy: inherited.legacy.is_some(),
            previous_payload: e.payload,
        }),
    };
    // Last: nix's Flock unlocks on drop, and the lock belongs to the open
    // file the original descriptor shares, so an error after this would
    // hand the pidfile to anyone before the rollback takes it back.
    let pidfile = Pidfile::adopt(
        &pidfile_path(&settings.fixed.runtime_dir, &settings.fixed.instance),
        take(h.pidfile)?,
    )?;
    let mut sup = Supervisor::new(
        settings,
        program,
        Parts {
            pidfile,
            sockets,
            control,
            board,
            signals,
            plan,
            redis,
            started_ms: h.started_ms,
        },
    );
    sup.conns = conns;
    sup.systemd.sent_ready = h.sent_ready;
    sup.exe = e.exe.clone().or(sup.exe);
    sup.args = e.args.clone();
    sup.env = e.env.clone();
    sup.upgrade = upgrade;
    Ok(sup)
}
