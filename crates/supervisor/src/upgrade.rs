//! Binary upgrades by re-executing in place. The supervisor keeps its pid
//! (so systemd keeps tracking it, and its workers and redis-server stay its
//! children); the listening sockets, pidfile lock, control socket,
//! scoreboard memfd and waiting CLI connections cross the `exec` as open
//! descriptors, the rest of its state as JSON in one environment variable.
//! The new image then replaces the workers one slot at a time, like a
//! reload. If its workers do not become ready, it executes the previous
//! binary again (kept open as a descriptor, so replacing the file on disk
//! does not lose it), which resumes with the old workers still serving.

use std::ffi::CString;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::plan::Plan;

/// The environment variable that carries the handover.
pub(crate) const VAR: &str = "FORKD_UPGRADE";
const VERSION: u32 = 1;

/// What one supervisor image hands the next.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Handover {
    pub(crate) version: u32,
    /// Set when this exec undoes a failed upgrade: why it failed.
    pub(crate) rollback: Option<String>,
    pub(crate) listeners: Vec<RawFd>,
    pub(crate) pidfile: RawFd,
    pub(crate) control: RawFd,
    pub(crate) scoreboard: RawFd,
    pub(crate) scoreboard_cells: usize,
    pub(crate) redis_pid: Option<i32>,
    pub(crate) plan: Plan,
    pub(crate) started_ms: u64,
    pub(crate) sent_ready: bool,
    /// CLI connections waiting for the outcome.
    pub(crate) waiting: Vec<RawFd>,
    /// The previous binary, open, for a rollback.
    pub(crate) previous_exe: Option<RawFd>,
    /// The previous image's build, for the report.
    pub(crate) previous_build: String,
    /// The previous image's arguments and environment, for a rollback.
    pub(crate) args: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
}

/// Whether this process was started by an upgrade (or a rollback).
pub fn pending() -> bool {
    std::env::var_os(VAR).is_some()
}

pub(crate) fn take() -> Option<Result<Handover, String>> {
    let text = std::env::var(VAR).ok()?;
    Some(
        serde_json::from_str::<Handover>(&text)
            .map_err(|e| format!("unreadable upgrade state: {e}"))
            .and_then(|h| {
                if h.version == VERSION {
                    Ok(h)
                } else {
                    Err(format!(
                        "upgrade state version {} is not {VERSION}",
                        h.version
                    ))
                }
            }),
    )
}

/// Replaces this process's image with `path`, handing over `h`. Returns
/// only on failure.
pub(crate) fn exec(path: &str, h: &Handover, args: &[String], env: &[(String, String)]) -> String {
    let state = match serde_json::to_string(h) {
        Ok(s) => s,
        Err(e) => return format!("cannot serialize the upgrade state: {e}"),
    };
    let cstr = |s: &str| CString::new(s).map_err(|e| e.to_string());
    let build = || -> Result<(CString, Vec<CString>, Vec<CString>), String> {
        let path = cstr(path)?;
        let argv = args
            .iter()
            .map(|a| cstr(a))
            .collect::<Result<Vec<_>, _>>()?;
        let mut envp = env
            .iter()
            .filter(|(k, _)| k != VAR)
            .map(|(k, v)| cstr(&format!("{k}={v}")))
            .collect::<Result<Vec<_>, _>>()?;
        envp.push(cstr(&format!("{VAR}={state}"))?);
        Ok((path, argv, envp))
    };
    match build() {
        Ok((path, argv, envp)) => match nix::unistd::execve(&path, &argv, &envp) {
            Err(e) => format!("cannot execute {}: {e}", path.to_string_lossy()),
            Ok(never) => match never {},
        },
        Err(e) => e,
    }
}

/// The previous binary, opened now so that it can be executed again even
/// after the file on disk has been replaced.
pub(crate) fn open_current_exe() -> std::io::Result<std::fs::File> {
    std::fs::File::open("/proc/self/exe")
}

/// The path that executes an open binary.
pub(crate) fn fd_path(fd: RawFd) -> String {
    format!("/proc/self/fd/{fd}")
}

/// The binary file this process was started from (resolved at start, before
/// anything can replace it).
pub(crate) fn exe_path() -> Option<PathBuf> {
    std::env::current_exe().ok()
}

pub(crate) fn raw<F: AsRawFd>(f: &F) -> RawFd {
    f.as_raw_fd()
}

/// Called when this image cannot even start the resume (bad config, a
/// failure before `run`): executes the previous binary again with the
/// handover, marked as a rollback. Returns only if that is impossible.
pub fn abort(reason: &str) -> String {
    let h = match take() {
        Some(Ok(h)) => h,
        Some(Err(e)) => return e,
        None => return "no upgrade in progress".into(),
    };
    let Some(previous) = h.previous_exe else {
        return "no previous binary to go back to".into();
    };
    let back = Handover {
        rollback: Some(reason.to_owned()),
        previous_exe: None,
        ..h
    };
    let (args, env) = (back.args.clone(), back.env.clone());
    exec(&fd_path(previous), &back, &args, &env)
}
