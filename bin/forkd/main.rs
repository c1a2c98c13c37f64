//! The `forkd` binary: the command line, logging, and the wiring of the
//! config, supervisor and worker crates. Exit codes: 0 ok, 1 runtime
//! failure, 64 usage or configuration error.
#![forbid(unsafe_code)]

mod cli;
mod logging;
mod users;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use forkd_config::{Config, ConfigError, ListenerMode, RawConfig};
use forkd_supervisor::{Program, Settings, WorkerCell, WorkerContext};

use cli::{Cli, Command, Overrides};

const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 64;

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
        Command::Start { .. } | Command::CheckConfig { .. } | Command::User { .. } => {
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
            match cli.command {
                Command::Start { daemon: false, .. } => start(source, config, inherited),
                _ if inherited.is_some() => {
                    let h = inherited.expect("checked");
                    return give_back(h, "an upgrade must execute `forkd start`");
                }
                Command::Start { .. } => cli::start_daemon(&source, &config),
                Command::User { command } => users::run(&config, command),
                _ => {
                    check_config(&source, config);
                    Ok(())
                }
            }
        }
        _ if inherited.is_some() => {
            let h = inherited.expect("checked");
            return give_back(h, "an upgrade must execute `forkd start`");
        }
        Command::UpgradeProbe => return upgrade_probe(),
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
                Command::Status { json } => cli::status(&target, json),
                Command::Scale { workers } => cli::scale(&target, workers),
                Command::Upgrade => cli::upgrade(&target),
                Command::User { .. } | Command::UpgradeProbe => unreachable!(),
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
        preflight(&config)
    };
    match checked() {
        Ok(()) => {
            println!("{}", forkd_supervisor::probe_answer(build_id()));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("forkd: upgrade probe: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// A running instance, as the client commands find it.
pub(crate) struct Target {
    pub(crate) instance: String,
    pub(crate) runtime_dir: PathBuf,
}

impl Target {
    pub(crate) fn control_socket(&self) -> PathBuf {
        forkd_supervisor::control_socket_path(&self.runtime_dir, &self.instance)
    }
}

/// Where the configuration comes from: the file, the environment, flags.
#[derive(Debug, Clone)]
pub(crate) struct ConfigSource {
    path: Option<PathBuf>,
    overrides: Overrides,
}

impl ConfigSource {
    /// The file in use: `--config` (or FORKD_CONFIG), else
    /// `config/forkd.toml` when it exists, else none (built-in defaults).
    fn file(&self) -> Option<PathBuf> {
        self.path.clone().or_else(|| {
            let default = Path::new("config/forkd.toml");
            default.exists().then(|| default.to_owned())
        })
    }

    fn load(&self) -> Result<Config, ConfigError> {
        let mut raw = match self.file() {
            Some(path) => RawConfig::load(&path)?,
            None => RawConfig::default(),
        };
        raw.apply_env(std::env::vars())?;
        for (key, value) in self.overrides.pairs() {
            raw.set(key, &value)?;
        }
        let parallelism = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut config = raw.validate(parallelism)?;
        config.runtime_dir = Some(resolve_runtime_dir(config.runtime_dir.as_deref()).map_err(
            |expected| ConfigError::Value {
                key: "runtime_dir".into(),
                origin: String::new(),
                value: String::new(),
                expected,
            },
        )?);
        if !config.redis.url.is_empty() {
            forkd_store::check_url(&config.redis.url).map_err(|e| ConfigError::Value {
                key: "redis.url".into(),
                origin: String::new(),
                value: "(not shown)".into(),
                expected: match e {
                    forkd_store::StoreError::Config(detail) => detail,
                    other => other.to_string(),
                },
            })?;
        }
        if let Some(path) = &config.redis.password_file {
            // Checked here so that a start or reload fails early; the
            // password itself is read where the store is configured.
            read_password_file(path).map_err(|e| ConfigError::Value {
                key: "redis.password_file".into(),
                origin: String::new(),
                value: path.display().to_string(),
                expected: e,
            })?;
        }
        if config.redis.url.is_empty() && config.redis.data_dir.is_none() {
            config.redis.data_dir = Some(default_data_dir());
        }
        Ok(config)
    }

    /// Where the client commands find the instance. Reads only `instance`
    /// and `runtime_dir`, so that `forkd stop` works even while the file
    /// holds a value that a start would reject.
    fn target(&self) -> Result<Target, ConfigError> {
        let loc = forkd_config::Location::load(self.file().as_deref(), std::env::vars())?;
        let runtime_dir = resolve_runtime_dir(loc.runtime_dir.as_deref()).map_err(|expected| {
            ConfigError::Value {
                key: "runtime_dir".into(),
                origin: String::new(),
                value: String::new(),
                expected,
            }
        })?;
        Ok(Target {
            runtime_dir,
            instance: loc.instance,
        })
    }
}

/// The runtime directory: configured, or systemd's RuntimeDirectory, or
/// /run/forkd for root, or forkd in the login session's XDG_RUNTIME_DIR.
/// Nothing in a shared directory such as /tmp, where another user could
/// have made it first.
fn resolve_runtime_dir(configured: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(d) = configured {
        return Ok(d.to_owned());
    }
    if let Ok(d) = std::env::var("RUNTIME_DIRECTORY") {
        if let Some(first) = d.split(':').find(|s| !s.is_empty()) {
            return Ok(first.into());
        }
    }
    if nix::unistd::geteuid().is_root() {
        return Ok("/run/forkd".into());
    }
    match std::env::var("XDG_RUNTIME_DIR") {
        Ok(x) if !x.is_empty() => Ok(Path::new(&x).join("forkd")),
        _ => Err(format!(
            "no runtime directory: set runtime_dir in the config (a directory of \
             your own, e.g. runtime_dir = \"$HOME/.forkd/run\"), or XDG_RUNTIME_DIR \
             (a login session sets it: export XDG_RUNTIME_DIR=/run/user/{})",
            nix::unistd::geteuid()
        )),
    }
}

/// The managed redis-server's data directory when `redis.data_dir` is
/// unset: systemd's StateDirectory, else a per-user default.
fn default_data_dir() -> PathBuf {
    if let Ok(d) = std::env::var("STATE_DIRECTORY") {
        if let Some(first) = d.split(':').find(|s| !s.is_empty()) {
            return first.into();
        }
    }
    if nix::unistd::geteuid().is_root() {
        return "/var/lib/forkd".into();
    }
    match (std::env::var("XDG_STATE_HOME"), std::env::var("HOME")) {
        (Ok(x), _) if !x.is_empty() => Path::new(&x).join("forkd"),
        (_, Ok(h)) if !h.is_empty() => Path::new(&h).join(".local/state/forkd"),
        _ => format!("/tmp/forkd-state-{}", nix::unistd::geteuid()).into(),
    }
}

/// The managed redis-server's socket.
pub(crate) fn managed_socket(runtime_dir: &Path, instance: &str) -> PathBuf {
    runtime_dir.join(format!("{instance}-redis.sock"))
}

/// The URL workers and `forkd user` use.
pub(crate) fn store_url(c: &Config) -> String {
    if c.redis.url.is_empty() {
        format!(
            "redis+unix://{}",
            managed_socket(&runtime_dir_of(c), &c.instance).display()
        )
    } else {
        c.redis.url.clone()
    }
}

/// The first line of a password file.
fn read_password_file(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
    let line = text
        .lines()
        .next()
        .unwrap_or("")
        .trim_end_matches('\r')
        .to_owned();
    if line.is_empty() {
        return Err("it is empty".into());
    }
    Ok(line)
}

pub(crate) fn store_config(c: &Config) -> forkd_store::StoreConfig {
    forkd_store::StoreConfig {
        password: c
            .redis
            .password_file
            .as_deref()
            .and_then(|p| read_password_file(p).ok()),
        url: store_url(c),
        prefix: c.redis.prefix.clone(),
        command_timeout: c.redis.command_timeout,
        connect_timeout: c.redis.connect_timeout,
        reconnect_max_delay: c.redis.reconnect_max_delay,
    }
}

pub(crate) fn hash_cost(c: &Config) -> forkd_app::secrets::HashCost {
    forkd_app::secrets::HashCost {
        memory_kib: c.auth.argon2_memory_kib,
        iterations: c.auth.argon2_iterations,
        parallelism: c.auth.argon2_parallelism,
    }
}

fn policy(p: forkd_config::Policy) -> forkd_app::Policy {
    forkd_app::Policy {
        limit: p.limit,
        window: p.window,
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

/// The runtime directory of a loaded configuration (which resolved it).
pub(crate) fn runtime_dir_of(c: &Config) -> PathBuf {
    c.runtime_dir.clone().unwrap_or_else(|| "/run/forkd".into())
}

fn check_config(source: &ConfigSource, config: Config) {
    match source.file() {
        Some(p) => println!("# configuration OK: {} with overrides applied", p.display()),
        None => println!("# configuration OK: built-in defaults with overrides applied"),
    }
    print!("{}", config.to_toml());
}

fn supervisor_settings(c: &Config) -> Settings {
    Settings {
        fixed: forkd_supervisor::Fixed {
            instance: c.instance.clone(),
            listen: c.listen,
            backlog: c.backlog,
            listener: match c.listener {
                ListenerMode::Shared => forkd_supervisor::ListenerMode::Shared,
                ListenerMode::Reuseport => forkd_supervisor::ListenerMode::Reuseport,
            },
            runtime_dir: runtime_dir_of(c),
            build: build_id().to_owned(),
            user: c.user.clone(),
            group: c.group.clone(),
            redis: c
                .redis
                .url
                .is_empty()
                .then(|| forkd_supervisor::ManagedRedis {
                    program: c.redis.server.clone().into(),
                    socket: managed_socket(&runtime_dir_of(c), &c.instance),
                    dir: c.redis.data_dir.clone().unwrap_or_else(default_data_dir),
                }),
        },
        live: forkd_supervisor::Live {
            workers: c.workers,
            log_file: c.log_file.clone(),
            shutdown_timeout: c.shutdown_timeout,
            worker_timeout: c.worker_timeout,
            startup_timeout: c.startup_timeout,
            heartbeat_interval: heartbeat_interval(c),
            watchdog_quorum: c.watchdog_quorum,
        },
    }
}

/// Identifies the binary file: SHA-256 over its length and its first and
/// last MiB (a rebuilt or otherwise replaced binary differs there),
/// computed once per process.
pub(crate) fn build_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        use sha2::{Digest, Sha256};
        use std::io::{Read, Seek, SeekFrom};
        let fingerprint = || -> std::io::Result<String> {
            let mut f = std::fs::File::open("/proc/self/exe")?;
            let len = f.metadata()?.len();
            let mut h = Sha256::new();
            h.update(len.to_le_bytes());
            let mut buf = vec![0u8; 1 << 20];
            let n = f.read(&mut buf)?;
            h.update(&buf[..n]);
            f.seek(SeekFrom::Start(len.saturating_sub(1 << 20)))?;
            let n = f.read(&mut buf)?;
            h.update(&buf[..n]);
            Ok(h.finalize()
                .iter()
                .take(6)
                .map(|b| format!("{b:02x}"))
                .collect())
        };
        fingerprint().unwrap_or_else(|_| "unknown".into())
    })
}

/// A quarter of worker_timeout, between 50 ms and 1 s.
fn heartbeat_interval(c: &Config) -> Duration {
    (c.worker_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// Whether an address is in any of `nets`.
fn matcher(nets: Vec<forkd_config::Cidr>) -> forkd_app::TrustedProxy {
    Arc::new(move |ip| nets.iter().any(|n| n.contains(ip)))
}

fn app_settings(c: &Config) -> forkd_app::Settings {
    forkd_app::Settings {
        header_read_timeout: c.http.header_read_timeout,
        max_header_bytes: c.http.max_header_bytes,
        max_connections_per_client: c.http.max_connections_per_client,
        max_connections: c.http.max_connections,
        keepalive: c.http.keepalive,
        shutdown_timeout: c.shutdown_timeout,
        heartbeat_interval: heartbeat_interval(c),
        trusted_proxy: matcher(c.http.trusted_proxies.clone()),
        build: build_id().to_owned(),
        metrics_allow: matcher(c.metrics.allow.clone()),
        workers: c.workers,
        on_redis_error: match c.rate_limit.on_redis_error {
            forkd_config::OnRedisError::FailOpen => forkd_app::OnRedisError::FailOpen,
            forkd_config::OnRedisError::FailClosed => forkd_app::OnRedisError::FailClosed,
            forkd_config::OnRedisError::Local => forkd_app::OnRedisError::Local,
        },
        store: store_config(c),
        auth: forkd_app::AuthSettings {
            cost: hash_cost(c),
            max_concurrent_hashes: c.auth.max_concurrent_hashes,
            hash_queue_timeout: c.auth.hash_queue_timeout,
            session_idle: c.auth.session_idle_timeout,
            session_absolute: c.auth.session_absolute_timeout,
            login_ip: forkd_app::Policy {
                limit: c.auth.login_ip_limit,
                window: c.auth.login_ip_window,
            },
            login_user: forkd_app::Policy {
                limit: c.auth.login_user_limit,
                window: c.auth.login_user_window,
            },
            login_user_all: forkd_app::Policy {
                limit: c.auth.login_user_all_limit,
                window: c.auth.login_user_all_window,
            },
            login_host: forkd_app::Policy {
                limit: c.auth.login_host_limit,
                window: c.auth.login_host_window,
            },
        },
        profile: forkd_app::ProfileSettings {
            origin: (!c.profile.origin.is_empty())
                .then(|| c.profile.origin.trim_start_matches("http://").to_owned()),
            origin_timeout: c.profile.origin_timeout,
            cache_ttl: c.profile.cache_ttl,
            lock_timeout: c.profile.lock_timeout,
            lock_wait: c.profile.lock_wait,
            limit: policy(c.rate_limit.profile),
        },
    }
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
    inherited: Option<forkd_supervisor::InheritedState>,
) -> anyhow::Result<()> {
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
    let settings = supervisor_settings(&config);
    let program = Forkd {
        source,
        config,
        previous: None,
    };
    forkd_supervisor::run(settings, program, inherited).context("cannot start")
}

/// The program the supervisor forks: the HTTP worker, with reloadable
/// configuration.
struct Forkd {
    source: ConfigSource,
    config: Config,
    previous: Option<Config>,
}

impl Program for Forkd {
    fn run_worker(&self, ctx: WorkerContext) -> i32 {
        logging::set_worker(ctx.slot);
        forkd_app::run(forkd_app::Worker {
            slot: ctx.slot,
            generation: ctx.generation,
            listener: ctx.listener,
            settings: app_settings(&self.config),
            host: Arc::new(CellHost {
                cell: ctx.cell,
                log_file: ctx.log_file,
            }),
        })
    }

    fn reload(&mut self) -> Result<Settings, String> {
        let new = self.source.load().map_err(|e| e.to_string())?;
        let settings = supervisor_settings(&new);
        self.previous = Some(std::mem::replace(&mut self.config, new));
        Ok(settings)
    }

    fn abandon_reload(&mut self) {
        if let Some(old) = self.previous.take() {
            self.config = old;
        }
    }
}

// The worker's counters must fit the scoreboard's cells.
const _: () = assert!(forkd_app::COUNTERS_USED <= forkd_supervisor::COUNTERS);
// The config accepts no more workers than the supervisor can hold.
const _: () = assert!(forkd_config::MAX_WORKERS == forkd_supervisor::MAX_WORKERS);

/// A worker's view of its scoreboard cell.
struct CellHost {
    cell: WorkerCell,
    log_file: Option<PathBuf>,
}

impl forkd_app::Host for CellHost {
    fn heartbeat(&self) {
        self.cell.heartbeat();
    }
    fn ready(&self) {
        self.cell.set_ready();
    }
    fn draining(&self) {
        self.cell.set_draining();
    }
    fn request_served(&self) {
        self.cell.count_request();
    }
    fn count(&self, k: usize, n: u64) {
        self.cell.add(k, n);
    }
    fn totals(&self) -> Vec<u64> {
        self.cell.totals().to_vec()
    }
    fn supervisor_figures(&self) -> (u64, u64) {
        self.cell.supervisor_figures()
    }
    fn set_redis_info(&self, text: &str) {
        self.cell.set_info(text);
    }
    fn reopen_log(&self) {
        if let Some(path) = &self.log_file {
            if let Err(e) = forkd_supervisor::redirect_output(path) {
                log::error!("{e}");
            }
        }
    }
}
