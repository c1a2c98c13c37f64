//! `forkd logs`: the last lines of the instance's log file, and what is
//! written to it next (`--follow`), as `tail -n N [-f]` would show them.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::source::Target;

/// Where the instance logs when not in the foreground: `log_file`, or,
/// for `forkd start --daemon`, INSTANCE.log in the runtime directory.
pub(crate) fn log_path(target: &Target) -> PathBuf {
    target
        .log_file
        .clone()
        .unwrap_or_else(|| target.runtime_dir.join(format!("{}.log", target.instance)))
}

/// The most read from the end of the file to find the last lines.
const MAX_TAIL_BYTES: u64 = 8 << 20;

pub(crate) fn run(target: &Target, lines: usize, follow: bool) -> anyhow::Result<()> {
    let path = log_path(target);
    let mut file = match open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "no log file at {}: forkd writes one only with log_file set or when \
             started with --daemon; in the foreground it logs to stderr, and under \
             systemd to the journal (journalctl -u forkd)",
            path.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut out = std::io::stdout().lock();
    let end = file.metadata()?.len();
    let start = tail_start(&mut file, end, lines)?;
    let mut at = copy_from(&mut file, start, &mut out)?;
    if !follow {
        return Ok(());
    }
    let mut inode = file.metadata()?.ino();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        // Rotated (a new file at the path): the rest of the old one, then
        // the new one from its start. Truncated: from its start.
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.ino() != inode => {
                if let Ok(f) = open(&path) {
                    copy_from(&mut file, at, &mut out)?;
                    file = f;
                    inode = m.ino();
                    at = 0;
                }
            }
            _ => {}
        }
        if file.metadata()?.len() < at {
            at = 0;
        }
        at = copy_from(&mut file, at, &mut out)?;
    }
}

/// Opens the log without following a link (the log belongs to the
/// service's account, and root may be the one reading), without blocking
/// (a FIFO put in its place), and only if it is a regular file.
fn open(path: &Path) -> std::io::Result<File> {
    let flags = nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_NOFOLLOW;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits())
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    Ok(file)
}

/// Where the last `lines` lines of the first `end` bytes begin.
fn tail_start(file: &mut File, end: u64, lines: usize) -> std::io::Result<u64> {
    if lines == 0 {
        return Ok(end);
    }
    let floor = end.saturating_sub(MAX_TAIL_BYTES);
    let mut pos = end;
    let mut seen = 0;
    let mut buf = vec![0u8; 64 << 10];
    while pos > floor {
        let n = (pos - floor).min(buf.len() as u64) as usize;
        pos -= n as u64;
        file.seek(SeekFrom::Start(pos))?;
        if file.read_exact(&mut buf[..n]).is_err() {
            // Truncated meanwhile: what is left, from its start.
            return Ok(0);
        }
        for i in (0..n).rev() {
            // The newline that ends the last line is not a line break.
            if buf[i] == b'\n' && pos + i as u64 + 1 != end {
                seen += 1;
                if seen == lines {
                    return Ok(pos + i as u64 + 1);
                }
            }
        }
    }
    Ok(floor)
}

/// Copies what the file holds from `at` on; returns where it ended.
fn copy_from(file: &mut File, at: u64, out: &mut impl Write) -> std::io::Result<u64> {
    file.seek(SeekFrom::Start(at))?;
    // Only writing fails with a broken pipe: the reader of stdout is gone.
    let gone = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::BrokenPipe => crate::stdout_failed(&e),
        _ => e,
    };
    let n = std::io::copy(file, out).map_err(gone)?;
    out.flush().map_err(gone)?;
    Ok(at + n)
}
