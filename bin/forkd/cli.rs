//! The command line: argument definitions and the client commands that talk
//! to a running supervisor over its control socket.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use forkd_config::Config;
use forkd_supervisor::control::{Client, Reply, Request, Status};

use crate::source::{runtime_dir_of, ConfigSource, Overrides, Target};

/// forkd: a pre-fork HTTP server supervisor.
#[derive(Debug, Parser)]
#[command(name = "forkd", version, about, propagate_version = true)]
pub(crate) struct Cli {
    /// Configuration file [default: config/forkd.toml when it exists, else
    /// built-in defaults].
    #[arg(
        long,
        short = 'c',
        global = true,
        env = "FORKD_CONFIG",
        hide_env_values = true,
        value_name = "FILE"
    )]
    pub(crate) config: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the supervisor (in the foreground unless --daemon).
    Start {
        #[command(flatten)]
        overrides: Overrides,
        /// Detach, log to a file, and return once every worker is ready.
        #[arg(long)]
        daemon: bool,
    },
    /// Stop gracefully and wait until forkd has exited.
    Stop {
        /// Seconds workers may drain [default: shutdown_timeout].
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
    },
    /// Reload the configuration and replace the workers one by one.
    Reload,
    /// Show the supervisor and its workers.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Print the configuration the running instance uses (with what
        /// its environment and flags set; secrets masked) instead.
        #[arg(long, conflicts_with = "json")]
        show_config: bool,
    },
    /// Print the last lines of the log file (log_file, or the one
    /// `start --daemon` writes), and with --follow what is written next.
    Logs {
        /// How many lines.
        #[arg(short = 'n', long, default_value_t = 20, value_name = "N")]
        lines: usize,
        /// Keep printing what is written, as `tail -f` (through rotations).
        #[arg(short, long)]
        follow: bool,
    },
    /// A live view of the running instance: workers, requests a second,
    /// latency, routes, Redis; keys: r reload, + and - scale, q quit.
    Top {
        /// Print one frame (after two samples a second apart) and exit.
        #[arg(long)]
        once: bool,
    },
    /// Set the number of workers.
    Scale {
        /// The new number of workers.
        workers: usize,
    },
    /// Validate the configuration and print it as forkd would use it.
    CheckConfig {
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Replace the running binary with the one on disk, without dropping a
    /// request; waits for the outcome.
    Upgrade,
    /// Run by a supervisor on the binary it is about to upgrade to: reads
    /// the handover on stdin and answers whether this build can take over.
    #[command(hide = true)]
    UpgradeProbe,
    /// Print a shell completion script (bash, zsh, fish, elvish or
    /// powershell) to stdout.
    Completions { shell: clap_complete::Shell },
    /// Print forkd(1) (roff) to stdout, or write it and a page per
    /// command into DIR.
    #[command(hide = true)]
    Manpage { dir: Option<PathBuf> },
    /// Print docs/cli-reference.md: every command's --help, in Markdown.
    #[command(hide = true)]
    CliReference,
    /// Print docs/configuration.md's key table: every key, its default and
    /// what it means.
    #[command(hide = true)]
    ConfigReference,
    /// Manage users (stored in Redis).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Manage the response cache of GET routes (in Redis).
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Look at or reset one bucket of a [rate_limit.policy] (in Redis).
    Limit {
        #[command(subcommand)]
        command: LimitCommand,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum CacheCommand {
    /// Delete every cached answer (every user's and the shared ones) whose
    /// path starts with PREFIX ("/" for all).
    Purge { prefix: String },
}

#[derive(Debug, Subcommand)]
pub(crate) enum LimitCommand {
    /// What is left in a bucket. BUCKET: user:NAME, client:ADDRESS (either
    /// with :/ROUTE after it for a user+route policy) or header:NAME:VALUE.
    Show { policy: String, bucket: String },
    /// Make a bucket whole again.
    Reset { policy: String, bucket: String },
}

#[derive(Debug, Subcommand)]
pub(crate) enum UserCommand {
    /// Create a user; the password is asked for, or read from stdin.
    Add {
        name: String,
        #[arg(long, default_value = "user")]
        role: String,
        /// Shown in the profile [default: the name].
        #[arg(long)]
        display_name: Option<String>,
        /// Read the password from the first line of stdin.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Change a user's password; ends all of the user's sessions.
    Passwd {
        name: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Delete a user and end all of its sessions.
    Del { name: String },
    /// List the users.
    List,
    /// End all of a user's sessions (log out everywhere).
    Revoke { name: String },
}

impl Command {
    pub(crate) fn overrides(&self) -> Overrides {
        match self {
            Command::Start { overrides, .. } | Command::CheckConfig { overrides } => {
                overrides.clone()
            }
            _ => Overrides::default(),
        }
    }
}

/// Writes the completion script for `shell`, generated from these
/// definitions, so it never falls behind the flags.
pub(crate) fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "forkd", &mut std::io::stdout());
    Ok(())
}

pub(crate) fn connect(target: &Target) -> anyhow::Result<Client> {
    Client::connect(&target.control_socket()).map_err(|e| match e {
        forkd_supervisor::control::ClientError::NotRunning(_) => {
            anyhow::anyhow!("instance '{}' is not running", target.instance)
        }
        other => other.into(),
    })
}

pub(crate) fn expect_ok(reply: Reply) -> anyhow::Result<Reply> {
    match reply {
        Reply::Error { message } => bail!("{message}"),
        other => Ok(other),
    }
}

/// Each listener with its scheme, so that HTTP and HTTPS read apart (the
/// bare addresses from a supervisor too old to say).
pub(crate) fn listening(s: &Status) -> String {
    if s.listeners.is_empty() {
        return s.listen.clone();
    }
    s.listeners
        .iter()
        .map(|l| {
            let mut d = format!("{}://{}", l.scheme, l.address);
            if l.redirect_https {
                d.push_str(" (redirects to https)");
            }
            if l.proxy_protocol {
                d.push_str(" (PROXY protocol)");
            }
            d
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn fetch_status(target: &Target) -> anyhow::Result<Status> {
    let mut c = connect(target)?;
    match expect_ok(c.request(&Request::Status, Duration::from_secs(10))?)? {
        Reply::Status(s) => Ok(*s),
        other => bail!("unexpected reply: {other:?}"),
    }
}

pub(crate) fn status(target: &Target, json: bool, show_config: bool) -> anyhow::Result<()> {
    let s = fetch_status(target)?;
    if show_config {
        if s.config.is_empty() {
            bail!(
                "this forkd ({}) does not say its configuration; upgrade it",
                s.build
            );
        }
        outln!(
            "# the configuration of instance '{}' (pid {}): {}",
            s.instance,
            s.pid,
            s.config_source
        );
        out!("{}", s.config);
        return Ok(());
    }
    if json {
        outln!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    outln!(
        "forkd {} (build {}) instance '{}': pid {}, {}, generation {}, up {}",
        s.version,
        s.build,
        s.instance,
        s.pid,
        s.phase,
        s.generation,
        duration(s.uptime_ms)
    );
    outln!(
        "listening on {} ({} listener); {}/{} workers ready; supervisor RSS {}",
        listening(&s),
        s.listener,
        s.workers_ready,
        s.workers_wanted,
        bytes(s.rss_bytes)
    );
    outln!(
        "accept queue {}/{}; recycled: {}",
        s.accept_queue.queued,
        s.accept_queue.backlog,
        s.recycled
            .iter()
            .map(|(why, n)| format!("{n} {why}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some((slot, why)) = &s.recycling {
        outln!("recycling slot {slot} now ({why})");
    }
    if !s.config_source.is_empty() {
        outln!("config: {}", s.config_source);
    }
    for r in &s.routes {
        let mut how = vec![format!("auth {}", r.auth)];
        if r.cache {
            how.push("cache".into());
        }
        if !r.policies.is_empty() {
            how.push(format!("policies {}", r.policies.join(" ")));
        }
        outln!("route {} -> {} ({})", r.prefix, r.upstream, how.join(", "));
    }
    for c in &s.certificates {
        outln!(
            "certificate {}: {} (serial {}), expires {}",
            c.file,
            c.subject,
            c.serial,
            crate::settings::date(c.not_after)
        );
    }
    outln!(
        "{:<5} {:<8} {:<4} {:<9} {:>9} {:>10} {:>8} {:>6} {:>10} {:>8} {:>9}",
        "SLOT",
        "PID",
        "GEN",
        "STATE",
        "UPTIME",
        "REQUESTS",
        "INFLIGHT",
        "CONNS",
        "RSS",
        "RESTARTS",
        "HEARTBEAT"
    );
    for w in &s.workers {
        outln!(
            "{:<5} {:<8} {:<4} {:<9} {:>9} {:>10} {:>8} {:>6} {:>10} {:>8} {:>9}",
            w.slot,
            w.pid,
            w.generation,
            w.state,
            duration(w.uptime_ms),
            w.requests,
            w.in_flight,
            w.connections,
            bytes(w.rss_bytes),
            w.restarts,
            duration(w.heartbeat_age_ms)
        );
    }
    for w in &s.workers {
        if let Some(o) = &w.oldest {
            outln!(
                "slot {} pid {}: oldest request {} (id {}) for {}",
                w.slot,
                w.pid,
                o.what,
                o.request_id,
                duration(o.age_ms)
            );
        }
        if w.hash_queue > 0 {
            outln!(
                "slot {} pid {}: {} login(s) waiting for a password check",
                w.slot,
                w.pid,
                w.hash_queue
            );
        }
    }
    let mut replaced: Vec<(usize, &str)> = s
        .workers
        .iter()
        .filter_map(|w| Some((w.slot, w.last_replaced.as_deref()?)))
        .collect();
    replaced.dedup();
    for (slot, why) in replaced {
        outln!("slot {slot}: last replaced: {why}");
    }
    let mut redis: Vec<&str> = s.workers.iter().map(|w| w.redis.as_str()).collect();
    redis.sort();
    redis.dedup();
    for r in redis.iter().filter(|r| !r.is_empty()) {
        outln!("redis: {r}");
    }
    for (slot, ms) in &s.backoff {
        outln!(
            "slot {slot}: crashed at start; next worker in {}",
            duration(*ms)
        );
    }
    Ok(())
}

pub(crate) fn stop(target: &Target, timeout: Option<f64>) -> anyhow::Result<()> {
    if let Some(t) = timeout {
        if !t.is_finite() || t < 0.0 {
            bail!("invalid --timeout {t}: expected seconds, 0 or more");
        }
    }
    let mut c = connect(target)?;
    let (pid, drain_ms) =
        match expect_ok(c.request(&Request::Stop { timeout }, Duration::from_secs(10))?)? {
            Reply::Stopping { pid, drain_ms } => (pid, drain_ms),
            other => bail!("unexpected reply: {other:?}"),
        };
    let wait = Duration::from_millis(drain_ms) + Duration::from_secs(10);
    if !c.wait_closed(wait) {
        bail!("forkd (pid {pid}) has not exited after {}s", wait.as_secs());
    }
    // The control socket closes as the process exits; wait for the pid too.
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_exists(pid) {
        if Instant::now() > deadline {
            bail!("forkd (pid {pid}) closed its control socket but has not exited");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    outln!("forkd stopped (pid {pid})");
    Ok(())
}

/// One line per replaced worker: (slot, old pid, new pid).
fn print_replaced(replaced: &[(usize, i32, i32)]) {
    for (slot, old, new) in replaced {
        outln!("slot {slot}: pid {old} -> {new}");
    }
}

pub(crate) fn reload(target: &Target) -> anyhow::Result<()> {
    let mut c = connect(target)?;
    // A rolling reload waits for each new worker in turn, each bounded by
    // startup_timeout; the supervisor always answers in the end.
    let wait = Duration::from_secs(3600);
    let outcome = match expect_ok(c.request(&Request::Reload, wait)?)? {
        Reply::Reload(o) => o,
        other => bail!("unexpected reply: {other:?}"),
    };
    print_replaced(&outcome.replaced);
    match outcome.error {
        None => {
            outln!(
                "reloaded: generation {}, {} worker(s) replaced",
                outcome.generation,
                outcome.replaced.len()
            );
            if let Some([from, to]) = outcome.workers {
                outln!(
                    "workers: {from} -> {to}, as the config's `workers` says \
                     (forkd scale lasts until a reload; set workers in the config to keep it)"
                );
            }
            Ok(())
        }
        Some(e) => bail!("reload failed, the previous workers keep serving: {e}"),
    }
}

pub(crate) fn upgrade(target: &Target) -> anyhow::Result<()> {
    let mut c = connect(target)?;
    let outcome = match expect_ok(c.request(&Request::Upgrade, Duration::from_secs(3600))?)? {
        Reply::Upgrade(o) => o,
        other => bail!("unexpected reply: {other:?}"),
    };
    print_replaced(&outcome.replaced);
    match outcome.error {
        None => {
            outln!(
                "upgraded from build {} to build {}: {} worker(s) replaced",
                outcome.from_build,
                outcome.to_build,
                outcome.replaced.len()
            );
            Ok(())
        }
        Some(e) => bail!(
            "upgrade failed, build {} keeps serving: {e}",
            outcome.from_build
        ),
    }
}

pub(crate) fn scale(target: &Target, workers: usize) -> anyhow::Result<()> {
    let mut c = connect(target)?;
    match expect_ok(c.request(&Request::Scale { workers }, Duration::from_secs(10))?)? {
        Reply::Scaled { workers } => {
            outln!("scaling to {workers} worker(s)");
            Ok(())
        }
        other => bail!("unexpected reply: {other:?}"),
    }
}

/// `forkd start --daemon`: start a detached supervisor that logs to a file
/// and return once every worker is ready.
pub(crate) fn start_daemon(source: &ConfigSource, config: &Config) -> anyhow::Result<()> {
    let target = Target {
        instance: config.instance.clone(),
        runtime_dir: runtime_dir_of(config),
        log_file: config.log_file.clone(),
    };
    if let Ok(s) = fetch_status(&target) {
        bail!(
            "forkd instance '{}' is already running (pid {})",
            s.instance,
            s.pid
        );
    }
    let dir = &target.runtime_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let log = crate::logs::log_path(&target);
    let log_out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("cannot open log file {}", log.display()))?;
    let log_start = log_out.metadata().map(|m| m.len()).unwrap_or(0);
    let exe = std::env::current_exe().context("cannot find the forkd binary")?;
    let mut cmd = std::process::Command::new(exe);
    if let Some(p) = source.file() {
        cmd.arg("--config").arg(p);
    }
    let overrides = Overrides {
        log_file: Some(log.display().to_string()),
        ..source.overrides.clone()
    };
    cmd.arg("start").args(overrides.flags());
    cmd.stdin(std::process::Stdio::null())
        .stdout(log_out.try_clone()?)
        .stderr(log_out);
    let mut child =
        forkd_supervisor::spawn_detached(&mut cmd).context("cannot start the daemon")?;
    let deadline = Instant::now() + config.startup_timeout + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait()? {
            print_log_tail(&log, log_start);
            bail!(
                "forkd exited during start-up ({status}); see {}",
                log.display()
            );
        }
        if let Ok(s) = fetch_status(&target) {
            if s.workers_ready >= s.workers_wanted {
                outln!(
                    "forkd started: pid {}, {} worker(s) ready, listening on {}; log: {}",
                    s.pid,
                    s.workers_ready,
                    s.listen,
                    log.display()
                );
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            print_log_tail(&log, log_start);
            bail!(
                "forkd (pid {}) did not become ready in time; it keeps running; see {}",
                child.id(),
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `pid` still runs; a zombie waiting for its parent does not.
fn process_exists(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn print_log_tail(path: &std::path::Path, from: u64) {
    use std::io::{Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return;
    };
    if f.seek(SeekFrom::Start(from)).is_err() {
        return;
    }
    let lines: Vec<String> = std::io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .collect();
    for l in lines.iter().rev().take(10).rev() {
        eprintln!("  {l}");
    }
}

pub(crate) fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{}.{}s", s, (ms % 1000) / 100),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

pub(crate) fn bytes(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}
