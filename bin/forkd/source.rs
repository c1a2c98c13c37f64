//! Where the configuration comes from (the file, `FORKD_*` variables, the
//! command-line overrides) and where an instance lives: its runtime and
//! data directories, its control socket.

use std::path::{Path, PathBuf};

use clap::Args;
use forkd_config::{Config, ConfigError, RawConfig};

/// A running instance, as the client commands find it.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) instance: String,
    pub(crate) runtime_dir: PathBuf,
    /// `log_file`, when set (`forkd logs`).
    pub(crate) log_file: Option<PathBuf>,
}

impl Target {
    pub(crate) fn control_socket(&self) -> PathBuf {
        forkd_supervisor::control_socket_path(&self.runtime_dir, &self.instance)
    }
}

/// Where the configuration comes from: the file, the environment, flags.
#[derive(Debug, Clone)]
pub(crate) struct ConfigSource {
    pub(crate) path: Option<PathBuf>,
    pub(crate) overrides: Overrides,
}

impl ConfigSource {
    /// Where the configuration comes from, for `forkd status`: the file
    /// (or the built-in defaults), then the environment variables and the
    /// flags that override it. Read before forkd sets any variable itself.
    pub(crate) fn describe(&self) -> String {
        let mut out = match self.file() {
            Some(p) => std::fs::canonicalize(&p).unwrap_or(p).display().to_string(),
            None => "built-in defaults (no config file)".to_owned(),
        };
        let mut env: Vec<String> = std::env::vars()
            .map(|(k, _)| k)
            .filter(|k| {
                forkd_config::keys()
                    .iter()
                    .any(|key| forkd_config::env_name(key) == *k)
            })
            .collect();
        env.sort();
        if !env.is_empty() {
            out.push_str(&format!(", environment {}", env.join(" ")));
        }
        let flags: Vec<String> = self
            .overrides
            .pairs()
            .iter()
            .map(|(k, _)| format!("--{}", k.replace('_', "-")))
            .collect();
        if !flags.is_empty() {
            out.push_str(&format!(", flags {}", flags.join(" ")));
        }
        out
    }

    /// The file in use: `--config` (or FORKD_CONFIG), else
    /// `config/forkd.toml` when it exists, else none (built-in defaults).
    pub(crate) fn file(&self) -> Option<PathBuf> {
        self.path.clone().or_else(|| {
            let default = Path::new("config/forkd.toml");
            default.exists().then(|| default.to_owned())
        })
    }

    pub(crate) fn load(&self) -> Result<Config, ConfigError> {
        let mut raw = match self.file() {
            Some(path) => RawConfig::load(&path)?,
            None => RawConfig::default(),
        };
        let passed_over = raw.apply_env(std::env::vars())?;
        // Once per process: a reload reads the same environment.
        static WARNED: std::sync::Once = std::sync::Once::new();
        if !passed_over.is_empty() {
            WARNED.call_once(|| {
                eprintln!(
                    "forkd: warning: ignoring {}: not a config override (no key's \
                     variable, nor close to one)",
                    passed_over.join(", ")
                );
            });
        }
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
    pub(crate) fn target(&self) -> Result<Target, ConfigError> {
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
            log_file: loc.log_file,
        })
    }
}

/// The runtime directory: configured, or systemd's RuntimeDirectory, or
/// /run/forkd for root, or forkd in the login session's XDG_RUNTIME_DIR.
/// Nothing in a shared directory such as /tmp, where another user could
/// have made it first.
pub(crate) fn resolve_runtime_dir(configured: Option<&Path>) -> Result<PathBuf, String> {
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
             your own, e.g. runtime_dir = {:?}), or XDG_RUNTIME_DIR \
             (a login session sets it: export XDG_RUNTIME_DIR=/run/user/{})",
            own_runtime_dir_example(),
            nix::unistd::geteuid()
        )),
    }
}

/// A runtime directory to suggest: in the user's home, spelled out (the
/// config takes absolute paths only, no `$HOME`).
fn own_runtime_dir_example() -> String {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|h| h.is_absolute())
        .or_else(|| {
            let user = nix::unistd::User::from_uid(nix::unistd::geteuid());
            user.ok().flatten().map(|u| u.dir)
        })
        .unwrap_or_else(|| "/home/YOU".into());
    home.join(".forkd/run").display().to_string()
}

/// The managed redis-server's data directory when `redis.data_dir` is
/// unset: systemd's StateDirectory, else a per-user default.
pub(crate) fn default_data_dir() -> PathBuf {
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

/// The first line of a password file.
pub(crate) fn read_password_file(path: &Path) -> Result<String, String> {
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

/// The runtime directory of a loaded configuration (which resolved it).
pub(crate) fn runtime_dir_of(c: &Config) -> PathBuf {
    c.runtime_dir.clone().unwrap_or_else(|| "/run/forkd".into())
}

/// Flags that override the file and the environment.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct Overrides {
    /// Address to listen on, e.g. 127.0.0.1:8080 or [::]:8080.
    #[arg(long, value_name = "ADDR")]
    pub(crate) listen: Option<String>,
    /// Number of workers, or "auto".
    #[arg(long, value_name = "N")]
    pub(crate) workers: Option<String>,
    /// Append logs to this file.
    #[arg(long, value_name = "FILE")]
    pub(crate) log_file: Option<String>,
}

impl Overrides {
    pub(crate) fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut v = Vec::new();
        if let Some(l) = &self.listen {
            v.push(("listen", l.clone()));
        }
        if let Some(w) = &self.workers {
            v.push(("workers", w.clone()));
        }
        if let Some(f) = &self.log_file {
            v.push(("log_file", f.clone()));
        }
        v
    }

    /// The same overrides as command-line flags (for the daemon that
    /// `forkd start --daemon` starts).
    pub(crate) fn flags(&self) -> Vec<String> {
        self.pairs()
            .into_iter()
            .flat_map(|(key, value)| [format!("--{}", key.replace('_', "-")), value])
            .collect()
    }
}
