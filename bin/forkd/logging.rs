//! Log set-up: env_logger writing whole lines to stderr (which the
//! supervisor points at the log file when one is configured). Every line
//! names its process: the supervisor, or a worker's slot, plus the pid.

use std::io::Write;
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};

/// -1 in the supervisor; the slot number in a worker.
static WORKER_SLOT: AtomicIsize = AtomicIsize::new(-1);

/// Level from `log_level`, overridden by `RUST_LOG` when set.
pub(crate) fn init(level: &str) {
    let mut b = env_logger::Builder::new();
    b.parse_filters(level);
    // rustls warns about what a client sent (an IP address as SNI, as
    // OpenSSL-based clients send it): a line per connection that any
    // client could make. Its errors stay; RUST_LOG can ask for more.
    b.filter_module("rustls", log::LevelFilter::Error);
    if let Ok(spec) = std::env::var("RUST_LOG") {
        b.parse_filters(&spec);
    }
    b.format(|buf, record| {
        let ts = buf.timestamp_millis();
        let pid = std::process::id();
        match WORKER_SLOT.load(Relaxed) {
            -1 => writeln!(
                buf,
                "{ts} {:<5} supervisor pid {pid}: {}",
                record.level(),
                record.args()
            ),
            slot => writeln!(
                buf,
                "{ts} {:<5} worker {slot} pid {pid}: {}",
                record.level(),
                record.args()
            ),
        }
    });
    b.target(env_logger::Target::Stderr);
    let _ = b.try_init();
}

/// Called first thing in a forked worker.
pub(crate) fn set_worker(slot: usize) {
    WORKER_SLOT.store(slot as isize, Relaxed);
}
