//! The lenient lookup the client commands use: only `instance` and
//! `runtime_dir`, so that `forkd stop` works even while the file holds a
//! value that a start would reject.

use std::path::{Path, PathBuf};

use crate::raw::{parse_error, RawConfig};
use crate::{env_name, ConfigError};

/// Where a running instance can be found: all the CLI's client commands
/// (stop, reload, status, scale) need, read leniently so that they still
/// work while the file holds a value that a start would reject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub instance: String,
    pub runtime_dir: Option<PathBuf>,
    /// Where it logs, when not to stderr (`forkd logs`).
    pub log_file: Option<PathBuf>,
}

impl Location {
    /// `instance` and `runtime_dir` from the file (if any) and the
    /// `FORKD_INSTANCE` / `FORKD_RUNTIME_DIR` variables of `vars`.
    ///
    /// # Errors
    /// The file cannot be read or is not TOML.
    pub fn load<I>(file: Option<&Path>, vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut loc = Location {
            instance: RawConfig::default().instance,
            runtime_dir: None,
            log_file: None,
        };
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            let table: toml::Table =
                toml::from_str(&text).map_err(|e| parse_error(path, &text, &e))?;
            if let Some(i) = table.get("instance").and_then(|v| v.as_str()) {
                loc.instance = i.to_owned();
            }
            if let Some(d) = table.get("runtime_dir").and_then(|v| v.as_str()) {
                loc.runtime_dir = Some(d.into());
            }
            if let Some(f) = table.get("log_file").and_then(|v| v.as_str()) {
                loc.log_file = Some(f.into());
            }
        }
        for (k, v) in vars {
            if k == env_name("instance") {
                loc.instance = v;
            } else if k == env_name("runtime_dir") {
                loc.runtime_dir = Some(v.into());
            } else if k == env_name("log_file") {
                loc.log_file = Some(v.into());
            }
        }
        Ok(loc)
    }
}
