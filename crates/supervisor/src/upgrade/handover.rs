//! What one image of the supervisor hands the next across `exec`: the
//! [`format`](super::format) read in two steps, carried in a memfd whose
//! number is in `FORKD_UPGRADE_FD` (the variable is removed from the
//! environment as soon as it is read), and the exec itself.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use super::format::{decode, encode, Envelope, Payload};
use super::legacy;
use crate::sys;

/// The variable that names the handover memfd.
pub(crate) const FD_VAR: &str = "FORKD_UPGRADE_FD";
/// Every variable that starts so is upgrade state, never passed on.
pub(crate) const VAR_PREFIX: &str = "FORKD_UPGRADE";
/// A handover larger than this is refused (it holds a few descriptors, a
/// plan of at most 2 x 512 workers, argv and the environment).
const MAX_LEN: u64 = 16 << 20;

/// A handover this process was started with.
pub struct Inherited {
    pub(crate) envelope: Envelope,
    /// The payload as the previous image wrote it, for a rollback.
    payload_text: String,
    pub(crate) payload: Result<Payload, String>,
    /// The previous image spoke the first, environment-variable format.
    pub(crate) legacy: Option<serde_json::Value>,
}

/// Takes the handover this process was started with, if any, and removes
/// every `FORKD_UPGRADE*` variable from the environment, so that nothing
/// started from here on (probes, workers, redis-server) sees it. Call it
/// first thing in `main`, while the process is single-threaded.
///
/// # Errors
/// The handover is there but its envelope cannot be read: there is nothing
/// to resume and nothing to go back to.
pub fn take() -> Result<Option<Inherited>, String> {
    let fd_var = std::env::var(FD_VAR).ok();
    let legacy_var = std::env::var(legacy::VAR).ok();
    let names: Vec<_> = std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| k.to_string_lossy().starts_with(VAR_PREFIX))
        .collect();
    for k in names {
        std::env::remove_var(k);
    }
    if let Some(v) = fd_var {
        let text = read_memfd(&v).map_err(|e| format!("{FD_VAR}={v}: {e}"))?;
        let (envelope, payload_text, payload) = decode(&text)?;
        if let Some(fd) = envelope.image {
            sys::close_inherited(fd);
        }
        return Ok(Some(Inherited {
            envelope,
            payload_text,
            payload,
            legacy: None,
        }));
    }
    if let Some(json) = legacy_var {
        let (value, envelope, payload) = legacy::decode(&json)?;
        return Ok(Some(Inherited {
            envelope,
            payload_text: String::new(),
            payload,
            legacy: Some(value),
        }));
    }
    Ok(None)
}

fn read_memfd(v: &str) -> Result<String, String> {
    let fd: RawFd = v
        .parse()
        .ok()
        .filter(|fd| *fd > 2)
        .ok_or("not a descriptor number")?;
    let owned = sys::dup_inherited(fd).map_err(|e| format!("no such descriptor: {e}"))?;
    sys::close_inherited(fd);
    let mut f = File::from(owned);
    f.rewind().map_err(|e| e.to_string())?;
    let mut text = String::new();
    (&mut f)
        .take(MAX_LEN)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read it: {e}"))?;
    Ok(text)
}

impl Inherited {
    /// A descriptor of the handover, duplicated: the one the previous image
    /// passed stays open and inheritable until [`Inherited::release`], so a
    /// rollback can pass it on even after a failed resume closed the copy.
    pub(crate) fn adopt(&self, fd: RawFd) -> nix::Result<OwnedFd> {
        sys::dup_inherited(fd)
    }

    /// The resume succeeded: closes the descriptors as passed (their copies
    /// live on), so that no child inherits them.
    pub(crate) fn release(self) {
        if let Ok(p) = &self.payload {
            for fd in p.fds() {
                sys::close_inherited(fd);
            }
        }
        if let Some(fd) = self.envelope.previous_exe {
            sys::close_inherited(fd);
        }
    }

    /// Executes the previous binary again, handing back the state exactly as
    /// it was received, marked as a rollback for `reason`. Nothing of it
    /// was closed (see [`Inherited::adopt`]), so the previous image resumes
    /// with its workers still serving. Returns only if that is impossible.
    /// `build` is this image's, reported as the one rolled back from.
    pub fn roll_back(self, reason: &str, build: &str) -> String {
        let Some(previous) = self.envelope.previous_exe else {
            return "no previous binary to go back to".into();
        };
        if let Ok(p) = &self.payload {
            for fd in p.fds() {
                sys::set_inheritable(fd);
            }
        }
        let path = fd_path(previous);
        let envelope = Envelope {
            rollback: Some(reason.to_owned()),
            previous_exe: None,
            image: Some(previous),
            previous_build: build.to_owned(),
            ..self.envelope.clone()
        };
        let (args, env) = (&envelope.args, &envelope.env);
        if let Some(value) = self.legacy {
            return match legacy::reencode(value, reason) {
                Ok(text) => exec(&path, Transport::Legacy(&text), args, env, &[]),
                Err(e) => e,
            };
        }
        match encode(&envelope, &self.payload_text) {
            Ok(text) => exec(&path, Transport::Memfd(&text), args, env, &[]),
            Err(e) => e,
        }
    }
}

/// How the state reaches the next image.
pub(crate) enum Transport<'a> {
    /// The two-line handover in a memfd (this format).
    Memfd(&'a str),
    /// One JSON document in `FORKD_UPGRADE` (the first format).
    Legacy(&'a str),
}

/// Replaces this process's image with `path`, passing `pass` (made
/// inheritable for the exec) and the state. Returns only on failure, why,
/// with close-on-exec restored.
pub(crate) fn exec(
    path: &str,
    state: Transport<'_>,
    args: &[String],
    env: &[(String, String)],
    pass: &[BorrowedFd<'_>],
) -> String {
    let memfd = match state {
        Transport::Memfd(text) => match to_memfd(text) {
            Ok(fd) => Some(fd),
            Err(e) => return format!("cannot write the upgrade state: {e}"),
        },
        Transport::Legacy(_) => None,
    };
    let mut vars: Vec<(String, String)> = env
        .iter()
        .filter(|(k, _)| !k.starts_with(VAR_PREFIX))
        .cloned()
        .collect();
    match (&state, &memfd) {
        (_, Some(fd)) => vars.push((FD_VAR.into(), fd.as_raw_fd().to_string())),
        (Transport::Legacy(text), None) => vars.push((legacy::VAR.into(), (*text).to_owned())),
        _ => {}
    }
    let mut passed: Vec<BorrowedFd<'_>> = pass.to_vec();
    passed.extend(memfd.as_ref().map(|f| f.as_fd()));
    for fd in &passed {
        let _ = sys::set_cloexec(fd, false);
    }
    let why = sys::execve(path, args, &vars);
    for fd in &passed {
        let _ = sys::set_cloexec(fd, true);
    }
    why
}

fn to_memfd(text: &str) -> std::io::Result<OwnedFd> {
    let fd =
        nix::sys::memfd::memfd_create(c"forkd-handover", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
    let mut f = File::from(fd);
    f.write_all(text.as_bytes())?;
    f.rewind()?;
    Ok(OwnedFd::from(f))
}

/// The path that executes an open binary.
pub(crate) fn fd_path(fd: RawFd) -> String {
    format!("/proc/self/fd/{fd}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upgrade::format::{encode_payload, FORMAT};
    use serde::Deserialize;

    /// A handover as this format's first build writes it. Every later build
    /// must read it: a field added without a default fails here.
    const FIXTURE: &str = include_str!("fixtures/handover-v2.txt");

    #[test]
    fn the_checked_in_handover_keeps_parsing() {
        let (envelope, _, payload) = decode(FIXTURE).unwrap();
        assert_eq!(envelope.format, FORMAT);
        assert_eq!(envelope.previous_exe, Some(9));
        assert_eq!(envelope.args[0], "forkd");
        let payload = payload.unwrap();
        assert_eq!(payload.listeners, vec![3]);
        assert_eq!(payload.plan.workers().len(), 2);
        assert!(payload.plan.reloading());
    }

    #[test]
    fn a_new_field_without_a_default_is_caught() {
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct Grown {
            #[serde(flatten)]
            p: Payload,
            added: u32,
        }
        let (_, text, _) = decode(FIXTURE).unwrap();
        assert!(serde_json::from_str::<Grown>(&text).is_err());
    }

    #[test]
    fn an_unreadable_payload_still_gives_the_envelope() {
        let (head, _) = FIXTURE.split_once('\n').unwrap();
        let (envelope, text, payload) = decode(&format!("{head}\n{{\"garbage\":1}}\n")).unwrap();
        assert_eq!(envelope.previous_exe, Some(9));
        assert_eq!(text, "{\"garbage\":1}");
        assert!(payload.unwrap_err().contains("unreadable upgrade state"));
        let newer = head.replace("\"payload\":2", "\"payload\":3");
        let (_, _, payload) = decode(&format!("{newer}\n{text}\n")).unwrap();
        assert!(payload.unwrap_err().contains("version 3"));
    }

    #[test]
    fn an_envelope_with_unknown_fields_is_read() {
        let (head, rest) = FIXTURE.split_once('\n').unwrap();
        let grown = head.replacen('{', "{\"from_the_future\":[1,2],", 1);
        let (envelope, _, payload) = decode(&format!("{grown}\n{rest}")).unwrap();
        assert_eq!(envelope.previous_build, "0123456789ab");
        assert!(payload.is_ok());
        assert!(decode("not json\n{}").is_err());
    }

    #[test]
    fn encoding_round_trips() {
        let (envelope, text, payload) = decode(FIXTURE).unwrap();
        let again = encode(
            &envelope,
            &encode_payload(&payload.clone().unwrap()).unwrap(),
        )
        .unwrap();
        let (e2, t2, p2) = decode(&again).unwrap();
        assert_eq!(e2, envelope);
        assert_eq!(p2.unwrap(), payload.unwrap());
        // Nothing the older build wrote is lost; fields added since then
        // come with their defaults.
        let (old, new): (serde_json::Value, serde_json::Value) = (
            serde_json::from_str(&text).unwrap(),
            serde_json::from_str(&t2).unwrap(),
        );
        assert!(kept(&old, &new), "{old}\n{new}");
    }

    /// Whether every field of `old` is in `new` with the same value.
    fn kept(old: &serde_json::Value, new: &serde_json::Value) -> bool {
        use serde_json::Value;
        match (old, new) {
            (Value::Object(o), Value::Object(n)) => o
                .iter()
                .all(|(k, v)| n.get(k).is_some_and(|nv| kept(v, nv))),
            (Value::Array(o), Value::Array(n)) => {
                o.len() == n.len() && o.iter().zip(n).all(|(a, b)| kept(a, b))
            }
            _ => old == new,
        }
    }
}
