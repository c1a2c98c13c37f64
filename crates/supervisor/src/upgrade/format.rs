//! The handover's data: a small [`Envelope`] that every build can parse
//! (it holds what a rollback needs: the previous binary's descriptor, argv
//! and environment), then the [`Payload`] (descriptors and the plan), as
//! two JSON lines.
//!
//! Compatibility rules, held by the fixture tests in `handover`: a field
//! is only ever added, with a default (`#[serde(default)]` or an
//! `Option`); the envelope's fields never change meaning. A payload this
//! build cannot read is not fatal: the envelope alone is enough to execute
//! the previous binary again with the payload it wrote, unchanged.

use std::os::fd::RawFd;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::plan::Plan;

/// The envelope's format. It stays 1: the envelope only gains fields with
/// defaults, so that any build can roll back from any other.
pub(crate) const FORMAT: u32 = 1;
/// The payload's version; raise it when a change cannot be expressed by
/// adding a field with a default.
pub(crate) const PAYLOAD: u32 = 2;
/// The part of the handover that is read first and always understood.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Envelope {
    pub(crate) format: u32,
    /// The payload's version.
    pub(crate) payload: u32,
    /// Set when this exec undoes a failed upgrade: why it failed.
    #[serde(default)]
    pub(crate) rollback: Option<String>,
    /// The previous binary, open, for a rollback.
    #[serde(default)]
    pub(crate) previous_exe: Option<RawFd>,
    /// The previous image's build, for the report.
    #[serde(default)]
    pub(crate) previous_build: String,
    /// The binary on disk that `forkd upgrade` executes: the path the
    /// service was started from, kept across upgrades and rollbacks (a
    /// rolled-back image's /proc/self/exe names a deleted file).
    #[serde(default)]
    pub(crate) exe: Option<PathBuf>,
    /// The supervisor's arguments and environment as first started (without
    /// upgrade state), for the next image and for a rollback.
    #[serde(default)]
    pub(crate) args: Vec<String>,
    #[serde(default)]
    pub(crate) env: Vec<(String, String)>,
    /// The descriptor this image was executed through; closed once read.
    #[serde(default)]
    pub(crate) image: Option<RawFd>,
}

/// The rest of the supervisor's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Payload {
    pub(crate) listeners: Vec<RawFd>,
    pub(crate) pidfile: RawFd,
    pub(crate) control: RawFd,
    pub(crate) scoreboard: RawFd,
    pub(crate) scoreboard_cells: usize,
    #[serde(default)]
    pub(crate) redis_pid: Option<i32>,
    pub(crate) plan: Plan,
    pub(crate) started_ms: u64,
    #[serde(default)]
    pub(crate) sent_ready: bool,
    /// CLI connections waiting for the outcome.
    #[serde(default)]
    pub(crate) waiting: Vec<RawFd>,
}

impl Payload {
    /// Every descriptor the payload names.
    pub(crate) fn fds(&self) -> Vec<RawFd> {
        let mut v = self.listeners.clone();
        v.extend([self.pidfile, self.control, self.scoreboard]);
        v.extend(&self.waiting);
        v
    }
}

/// The two lines of a handover.
pub(crate) fn encode(envelope: &Envelope, payload: &str) -> Result<String, String> {
    let head = serde_json::to_string(envelope)
        .map_err(|e| format!("cannot serialize the upgrade envelope: {e}"))?;
    Ok(format!("{head}\n{payload}\n"))
}

pub(crate) fn encode_payload(p: &Payload) -> Result<String, String> {
    serde_json::to_string(p).map_err(|e| format!("cannot serialize the upgrade state: {e}"))
}

/// Reads a handover's text: the envelope, or why not; and the payload, or
/// why not.
pub(crate) fn decode(text: &str) -> Result<(Envelope, String, Result<Payload, String>), String> {
    let (head, rest) = text.split_once('\n').unwrap_or((text, ""));
    let envelope: Envelope =
        serde_json::from_str(head).map_err(|e| format!("unreadable upgrade envelope: {e}"))?;
    if envelope.format != FORMAT {
        return Err(format!(
            "upgrade envelope format {} is not {FORMAT}",
            envelope.format
        ));
    }
    let payload_text = rest.trim_end_matches('\n').to_owned();
    let payload = decode_payload(envelope.payload, &payload_text);
    Ok((envelope, payload_text, payload))
}

fn decode_payload(version: u32, text: &str) -> Result<Payload, String> {
    if version != PAYLOAD {
        return Err(format!(
            "upgrade state version {version} is not {PAYLOAD}, which this build reads"
        ));
    }
    serde_json::from_str(text).map_err(|e| format!("unreadable upgrade state: {e}"))
}
