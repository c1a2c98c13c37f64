//! The `forkd` binary: the command line, logging, and the wiring of the
//! config, supervisor and worker crates. Exit codes: 0 ok, 1 runtime
//! failure, 64 usage or configuration error.
//!
//! - this file: `main`, the upgrade probe, `start` and `check-config`;
//! - `cli`: the commands and their flags, and the client commands;
//! - `source`: where the configuration and the instance are;
//! - `settings`: the configuration mapped onto each crate's settings;
//! - `worker`: the program the supervisor forks;
//! - `users`: `forkd user ...`;
//! - `limits`: `forkd limit ...` and `forkd cache purge`;
//! - `logging`: the log format;
//! - `manpage`: forkd(1) and the per-command pages.
#![forbid(unsafe_code)]

/// `print!` to stdout, but a pipe closed early (`forkd status | head`)
/// ends the command quietly, as it ends a Unix tool, instead of panicking.
macro_rules! out {
    ($($t:tt)*) => {
        $crate::write_stdout(format_args!($($t)*))
    };
}

/// `println!` as [`out!`] is `print!`.
macro_rules! outln {
    ($($t:tt)*) => {
        $crate::write_stdout(format_args!("{}\n", format_args!($($t)*)))
    };
}

mod cli;
mod limits;
mod logging;
mod logs;
mod manpage;
mod settings;
mod source;
mod top;
mod users;
mod worker;

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use forkd_config::Config;

use cli::{Cli, Command};
use settings::{build_id, supervisor_settings};
use source::{runtime_dir_of, ConfigSource};
use worker::Forkd;

const EXIT_FAILURE: u8 = 1;
/// 128 + SIGPIPE: what a shell reports for a command SIGPIPE ended.
const EXIT_PIPE: i32 = 141;
const EXIT_USAGE: u8 = 64;

/// Writes to stdout for [`out!`] and [`outln!`].
pub(crate) fn write_stdout(args: std::fmt::Arguments) {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        stdout_failed(&e);
    }
}

/// Ends the command after a failed write to stdout: quietly when the
/// reader has gone, with status 141 as a Unix tool that SIGPIPE ended
/// (`ls | head`), so that a pipeline under `pipefail` still sees it; else
/// with the error.
pub(crate) fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(EXIT_PIPE);
    }
    eprintln!("forkd: cannot write to stdout: {e}");
    std::process::exit(EXIT_FAILURE.into());
}

fn main() -> ExitCode {
    // First, while the process is single-threaded: the state an upgrade
    // handed over, if any (it also leaves the environment here).
    let inherited = match forkd_supervisor::take_handover() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("forkd: upgrade: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            if let Some(h) = inherited {
                return give_back(h, &format!("this build does not accept the arguments: {e}"));
            }
            let usage = e.use_stderr();
            let _ = e.print();
            return if usage {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let source = ConfigSource {
        path: cli.config.clone(),
        overrides: cli.command.overrides(),
    };
    let result = match cli.command {
        Command::Start { .. }
        | Command::CheckConfig { .. }
        | Command::User { .. }
        | Command::Limit { .. }
        | Command::Cache { .. } => {
            let config = match source.load() {
                Ok(c) => c,
                Err(e) => {
                    if let Some(h) = inherited {
                        // An upgraded image that cannot start goes back to
                        // the previous binary, whose workers still serve.
                        return give_back(h, &e.to_string());
                    }
                    eprintln!("forkd: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            logging::init(&config.log_level);
            // Read at start, while this process may still be root: the
            // workers inherit the pair, so a key only root can read works
            // with `user`. A bad pair is a bad configuration.
            let tls = match cli.command {
                Command::Start { .. } | Command::CheckConfig { .. } => {
                    match settings::load_tls(&config) {
                        Ok(t) => t,
                        Err(e) => {
                            if let Some(h) = inherited {
                                return give_back(h, &e);
                            }
                            eprintln!("forkd: {e}");
                            return ExitCode::from(EXIT_USAGE);
                        }
                    }
                }
                _ => settings::Tls::default(),
            };
            match cli.command {
                Command::Start { daemon: false, .. } => start(source, config, tls, inherited),
                _ if inherited.is_some() => {
                    let h = inherited.expect("checked");
                    return give_back(h, "an upgrade must execute `forkd start`");
                }
                Command::Start { .. } => cli::start_daemon(&source, &config),
                Command::User { command } => users::run(&config, command),
                Command::Limit { command } => limits::run(&config, command),
                Command::Cache { command } => limits::purge(&config, command),
                _ => {
                    check_config(&source, config, tls.server.as_deref());
                    Ok(())
                }
            }
        }
        _ if inherited.is_some() => {
            let h = inherited.expect("checked");
            return give_back(h, "an upgrade must execute `forkd start`");
        }
        Command::UpgradeProbe => return upgrade_probe(),
        Command::Completions { shell } => cli::completions(shell),
        Command::Manpage { dir } => manpage::run(dir.as_deref()),
        Command::CliReference => manpage::reference(),
        Command::ConfigReference => {
            out!("{}", forkd_config::key_table());
            Ok(())
        }
        command => {
            let target = match source.target() {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("forkd: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            match command {
                Command::Stop { timeout } => cli::stop(&target, timeout),
                Command::Reload => cli::reload(&target),
                Command::Status { json, show_config } => cli::status(&target, json, show_config),
                Command::Scale { workers } => cli::scale(&target, workers),
                Command::Top { once } => top::run(&target, once),
                Command::Logs { lines, follow } => logs::run(&target, lines, follow),
                Command::Upgrade => cli::upgrade(&target),
                Command::User { .. }
                | Command::Limit { .. }
                | Command::Cache { .. }
                | Command::UpgradeProbe => {
                    unreachable!()
                }
                Command::Completions { .. }
                | Command::Manpage { .. }
                | Command::CliReference
                | Command::ConfigReference => {
                    unreachable!()
                }
                Command::Start { .. } | Command::CheckConfig { .. } => unreachable!(),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("forkd: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// An upgraded image that cannot run: executes the previous binary again
/// with the state it handed over. Returns only if that fails.
fn give_back(h: forkd_supervisor::InheritedState, reason: &str) -> ExitCode {
    let why = h.roll_back(reason, build_id());
    eprintln!("forkd: upgrade: {reason}; cannot go back: {why}");
    ExitCode::from(EXIT_FAILURE)
}

/// `forkd upgrade-probe`, run by a supervisor on the binary it is about to
/// execute in place: reads the handover on stdin, checks that this build
/// understands it and accepts the configuration the supervisor was started
/// with, and answers with this build. Anything else exits 1 with the reason.
fn upgrade_probe() -> ExitCode {
    let checked = || -> anyhow::Result<()> {
        let args =
            forkd_supervisor::probe_request(std::io::stdin().lock()).map_err(anyhow::Error::msg)?;
        let cli = Cli::try_parse_from(&args)
            .map_err(|e| anyhow::anyhow!("this build does not accept the arguments: {e}"))?;
        if !matches!(cli.command, Command::Start { .. }) {
            anyhow::bail!("the running supervisor was not started with `forkd start`");
        }
        let source = ConfigSource {
            path: cli.config.clone(),
            overrides: cli.command.overrides(),
        };
        let config = source.load()?;
        settings::load_tls(&config).map_err(anyhow::Error::msg)?;
        preflight(&config)
    };
    match checked() {
        Ok(()) => {
            outln!("{}", forkd_supervisor::probe_answer(build_id()));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("forkd: upgrade probe: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Whether `program` (a path, or a name looked up in PATH) exists.
fn program_exists(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn check_config(source: &ConfigSource, config: Config, tls: Option<&forkd_app::Identity>) {
    match source.file() {
        Some(p) => outln!("# configuration OK: {} with overrides applied", p.display()),
        None => outln!("# configuration OK: built-in defaults with overrides applied"),
    }
    if let Some(id) = tls {
        let i = &id.info;
        outln!(
            "# certificate OK: {} (serial {}), valid {} to {}",
            i.subject,
            i.serial,
            settings::date(i.not_before),
            settings::date(i.not_after)
        );
    }
    out!("{}", config.to_toml());
}

/// What a start needs beyond a valid configuration.
fn preflight(config: &Config) -> anyhow::Result<()> {
    if config.redis.url.is_empty() && !program_exists(&config.redis.server) {
        anyhow::bail!(
            "{} is not installed, and redis.url is empty so forkd would run it; \
             install it with `apt-get install redis-server` (as root), or set redis.url",
            config.redis.server
        );
    }
    Ok(())
}

/// `forkd start` in the foreground, or the resume of an upgraded
/// supervisor.
fn start(
    source: ConfigSource,
    config: Config,
    tls: settings::Tls,
    inherited: Option<forkd_supervisor::InheritedState>,
) -> anyhow::Result<()> {
    // Before this process sets any variable of its own.
    let source_described = source.describe();
    if nix::unistd::geteuid().is_root() && config.user.is_none() && inherited.is_none() {
        log::warn!("running as root with no `user` configured; workers keep root privileges");
    }
    if let Err(e) = preflight(&config) {
        if let Some(h) = inherited {
            let reason = format!("{e:#}");
            let why = h.roll_back(&reason, build_id());
            anyhow::bail!("upgrade: {reason}; cannot go back: {why}");
        }
        return Err(e);
    }
    // The directories as resolved now, for every later load of this
    // supervisor (reload, an upgrade's probe and new image): after a drop
    // from root, or in another environment, the defaults would resolve
    // elsewhere, while the sockets and the store stay here. Still
    // single-threaded: nothing reads the environment concurrently.
    std::env::set_var(
        forkd_config::env_name("runtime_dir"),
        runtime_dir_of(&config),
    );
    if let Some(dir) = config
        .redis
        .data_dir
        .as_ref()
        .filter(|_| config.redis.url.is_empty())
    {
        std::env::set_var(forkd_config::env_name("redis.data_dir"), dir);
    }
    let settings = supervisor_settings(&config, tls.server.as_deref(), &source_described);
    let program = Forkd {
        described: source_described,
        source,
        config,
        tls,
        tickets: forkd_app::TicketKeys::generate().map_err(anyhow::Error::msg)?,
        previous: None,
    };
    forkd_supervisor::run(settings, program, inherited).context("cannot start")
}

// The worker's counters must fit the scoreboard's cells.
// The config accepts no more workers than the supervisor can hold.
