//! The first handover format: one JSON document in the `FORKD_UPGRADE`
//! environment variable, written by forkd builds before the envelope. Read
//! so that a running first-format supervisor can upgrade to this build, and
//! written back so that such an upgrade can still roll back to it.

use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};

use super::format::{Envelope, Payload, FORMAT, PAYLOAD};
use crate::plan::Plan;

/// The variable of the first format.
pub(crate) const VAR: &str = "FORKD_UPGRADE";
const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct V1 {
    version: u32,
    rollback: Option<String>,
    listeners: Vec<RawFd>,
    pidfile: RawFd,
    control: RawFd,
    scoreboard: RawFd,
    scoreboard_cells: usize,
    redis_pid: Option<i32>,
    plan: Plan,
    started_ms: u64,
    sent_ready: bool,
    waiting: Vec<RawFd>,
    previous_exe: Option<RawFd>,
    previous_build: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// Reads a first-format handover: the document as it came (to hand back on
/// a rollback), the envelope and the payload.
pub(crate) fn decode(
    json: &str,
) -> Result<(serde_json::Value, Envelope, Result<Payload, String>), String> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("unreadable upgrade state: {e}"))?;
    let field = |k: &str| value.get(k).cloned().unwrap_or_default();
    let envelope = Envelope {
        format: FORMAT,
        payload: PAYLOAD,
        rollback: serde_json::from_value(field("rollback")).unwrap_or_default(),
        previous_exe: serde_json::from_value(field("previous_exe")).unwrap_or_default(),
        previous_build: serde_json::from_value(field("previous_build")).unwrap_or_default(),
        exe: None,
        args: serde_json::from_value(field("args")).unwrap_or_default(),
        env: serde_json::from_value(field("env")).unwrap_or_default(),
        image: None,
    };
    let payload = serde_json::from_value::<V1>(value.clone())
        .map_err(|e| format!("unreadable upgrade state: {e}"))
        .and_then(|h| {
            if h.version != VERSION {
                return Err(format!(
                    "upgrade state version {} is not {VERSION}",
                    h.version
                ));
            }
            Ok(Payload {
                listeners: h.listeners,
                pidfile: h.pidfile,
                control: h.control,
                scoreboard: h.scoreboard,
                scoreboard_cells: h.scoreboard_cells,
                redis_pid: h.redis_pid,
                plan: h.plan,
                started_ms: h.started_ms,
                sent_ready: h.sent_ready,
                waiting: h.waiting,
            })
        });
    Ok((value, envelope, payload))
}

/// The document as received, marked as a rollback for `reason`.
pub(crate) fn reencode(mut value: serde_json::Value, reason: &str) -> Result<String, String> {
    let obj = value
        .as_object_mut()
        .ok_or("the upgrade state is not a JSON object")?;
    obj.insert("rollback".into(), reason.into());
    obj.insert("previous_exe".into(), serde_json::Value::Null);
    Ok(value.to_string())
}

/// The current state in the first format, for a rollback to a first-format
/// binary after this build's workers failed.
pub(crate) fn encode(envelope: &Envelope, p: &Payload) -> Result<String, String> {
    serde_json::to_string(&V1 {
        version: VERSION,
        rollback: envelope.rollback.clone(),
        listeners: p.listeners.clone(),
        pidfile: p.pidfile,
        control: p.control,
        scoreboard: p.scoreboard,
        scoreboard_cells: p.scoreboard_cells,
        redis_pid: p.redis_pid,
        plan: p.plan.clone(),
        started_ms: p.started_ms,
        sent_ready: p.sent_ready,
        waiting: p.waiting.clone(),
        previous_exe: None,
        previous_build: envelope.previous_build.clone(),
        args: envelope.args.clone(),
        env: envelope.env.clone(),
    })
    .map_err(|e| format!("cannot serialize the upgrade state: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the first format's builds put in `FORKD_UPGRADE`, mid-reload.
    const FIXTURE: &str = include_str!("fixtures/legacy-v1.json");

    #[test]
    fn the_first_format_keeps_parsing() {
        let (value, envelope, payload) = decode(FIXTURE).unwrap();
        assert_eq!(envelope.previous_exe, Some(9));
        assert_eq!(envelope.args.last().map(String::as_str), Some("start"));
        let p = payload.unwrap();
        assert_eq!((p.pidfile, p.control, p.scoreboard), (4, 5, 6));
        assert_eq!(p.plan.workers().len(), 2);
        // Written back for a rollback: the same document, marked.
        let back: serde_json::Value =
            serde_json::from_str(&reencode(value.clone(), "why").unwrap()).unwrap();
        assert_eq!(back["rollback"], "why");
        assert_eq!(back["previous_exe"], serde_json::Value::Null);
        assert_eq!(back["plan"], value["plan"]);
        // And the state re-encoded from this build reads the same.
        let again = encode(&envelope, &p).unwrap();
        let (_, _, p2) = decode(&again).unwrap();
        assert_eq!(p2.unwrap(), p);
    }
}
