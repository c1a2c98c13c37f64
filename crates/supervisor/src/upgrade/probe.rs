//! The upgrade probe: before the supervisor executes a new binary in place
//! (the point of no return), it runs that binary as a short-lived child,
//! `BINARY upgrade-probe`, with the handover on stdin. Only a forkd that
//! reads the handover, accepts the configuration the supervisor was started
//! with, and answers with its build within the time allowed is executed.
//! The probe runs the very file that will be executed: the binary is opened
//! once and both the probe and the exec go through that descriptor, so a
//! file replaced in between changes nothing.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::{format, handover};
use crate::sys;

/// At most this much of the probe's output is kept.
const MAX_OUTPUT: usize = 64 * 1024;

/// The probe's answer, one JSON line on its stdout.
#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    forkd_probe: u32,
    build: String,
    version: String,
}

/// A probe under way.
pub(crate) struct Probe {
    pub(crate) pid: i32,
    /// The new binary, open: the exec goes through it too.
    pub(crate) image: OwnedFd,
    pub(crate) path: PathBuf,
    output: File,
    buf: Vec<u8>,
    eof: bool,
    pub(crate) deadline_ms: u64,
    timeout_ms: u64,
    /// How the probe exited, once reaped.
    pub(crate) exited: Option<(i32, String)>,
}

impl Probe {
    /// Opens `path` and starts it as a probe fed with `handover`.
    ///
    /// # Errors
    /// Why the binary cannot even be started, naming it.
    pub(crate) fn start(
        path: &Path,
        handover: &str,
        env: &[(String, String)],
        now_ms: u64,
        timeout_ms: u64,
    ) -> Result<Probe, String> {
        let shown = path.display();
        // Not blocking on a FIFO planted there: opened without waiting, then
        // checked to be a regular file.
        let image = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(path)
                .map_err(|e| format!("cannot open {shown}: {e}"))?
        };
        let meta = image
            .metadata()
            .map_err(|e| format!("cannot read {shown}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("{shown} is not a regular file"));
        }
        let input = handover_input(handover).map_err(|e| format!("cannot feed the probe: {e}"))?;
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| format!("cannot make a pipe for the probe: {e}"))?;
        let output = File::from(read);
        sys::set_nonblocking(&output).map_err(|e| format!("probe pipe: {e}"))?;
        let write = File::from(write);
        let stderr = write.try_clone().map_err(|e| format!("probe pipe: {e}"))?;
        let mut cmd = Command::new(handover::fd_path(image.as_raw_fd()));
        cmd.arg0(path)
            .arg("upgrade-probe")
            .env_clear()
            .envs(
                env.iter()
                    .filter(|(k, _)| {
                        !crate::notify::SYSTEMD_VARS.contains(&k.as_str())
                            && !k.starts_with(handover::VAR_PREFIX)
                    })
                    .map(|(k, v)| (k, v)),
            )
            // It does not speak for the service.
            .stdin(Stdio::from(input))
            .stdout(Stdio::from(write))
            .stderr(Stdio::from(stderr))
            .process_group(0);
        let image = OwnedFd::from(image);
        let child = sys::spawn_probe(&mut cmd, image.as_fd())
            .map_err(|e| format!("cannot execute {shown}: {e}"))?;
        // The write ends went with `cmd`; dropping it closes ours.
        drop(cmd);
        Ok(Probe {
            pid: child.id() as i32,
            image,
            path: path.to_owned(),
            output,
            buf: Vec::new(),
            eof: false,
            deadline_ms: now_ms + timeout_ms,
            timeout_ms,
            exited: None,
        })
    }

    /// The pipe to wait on, until it reaches its end (a probe that closed
    /// its output but runs on must not make the supervisor spin).
    pub(crate) fn output_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        (!self.eof).then(|| self.output.as_fd())
    }

    /// Reads what the probe has written so far, keeping the first
    /// MAX_OUTPUT bytes and dropping the rest (a probe that writes more
    /// must neither block on a full pipe nor keep the poll busy).
    pub(crate) fn read(&mut self) {
        let mut chunk = [0u8; 4096];
        // Bounded per call: a probe that writes without end gets its
        // deadline, not the supervisor's loop.
        for _ in 0..64 {
            match self.output.read(&mut chunk) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => {
                    let room = MAX_OUTPUT.saturating_sub(self.buf.len()).min(n);
                    self.buf.extend_from_slice(&chunk[..room]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    /// The verdict, once there is one: the new build, or why the binary is
    /// refused. None while the probe runs and time is left.
    pub(crate) fn verdict(&mut self, now_ms: u64) -> Option<Result<String, String>> {
        self.read();
        let shown = self.path.display().to_string();
        let Some((code, how)) = self.exited.clone() else {
            if now_ms < self.deadline_ms {
                return None;
            }
            self.kill();
            return Some(Err(format!(
                "the new binary {shown} did not answer the upgrade probe within {} ms{}",
                self.timeout_ms,
                self.said()
            )));
        };
        // Whatever it started goes with it.
        self.kill();
        let text = String::from_utf8_lossy(&self.buf);
        let answer = text
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<Answer>(l.trim()).ok())
            .filter(|a| a.forkd_probe == 1 && !a.build.is_empty());
        Some(match answer {
            Some(a) if code == 0 => Ok(a.build),
            _ if code == 0 => Err(format!(
                "the new binary {shown} {how} without answering the upgrade probe \
                 (is it forkd, a build that speaks this handover?){}",
                self.said()
            )),
            _ => Err(format!(
                "the new binary {shown} {how} in the upgrade probe{}",
                self.said()
            )),
        })
    }

    /// The first lines the probe printed, for a message.
    fn said(&self) -> String {
        let text = String::from_utf8_lossy(&self.buf);
        let text: String = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .take(4)
            .collect::<Vec<_>>()
            .join(" | ");
        if text.is_empty() {
            return String::new();
        }
        let cut: String = text.chars().take(400).collect();
        format!(": {cut}")
    }

    /// Ends the probe's process group (the probe and anything it started).
    pub(crate) fn kill(&self) {
        let _ = kill(Pid::from_raw(-self.pid), Signal::SIGKILL);
    }
}

fn handover_input(text: &str) -> std::io::Result<File> {
    // A memfd, not a pipe: the supervisor never blocks on a probe that does
    // not read.
    let fd = nix::sys::memfd::memfd_create(
        c"forkd-probe-input",
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
    )?;
    let mut f = File::from(fd);
    f.write_all(text.as_bytes())?;
    f.rewind()?;
    Ok(f)
}

/// The probe's side, in the new binary: reads the handover from `input`
/// with this build's types and returns the arguments the running supervisor
/// was started with, so that the caller can check the configuration they
/// name.
///
/// # Errors
/// The handover cannot be read by this build.
pub fn read_request(input: impl Read) -> Result<Vec<String>, String> {
    let mut text = String::new();
    input
        .take(16 << 20)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the handover: {e}"))?;
    let (envelope, _, payload) = format::decode(&text)?;
    payload?;
    Ok(envelope.args)
}

/// The probe's answer line for a binary of `build`.
pub fn answer(build: &str) -> String {
    serde_json::to_string(&Answer {
        forkd_probe: 1,
        build: build.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
    .unwrap_or_default()
}
