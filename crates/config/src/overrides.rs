//! Overrides: one key set from its string form, as `FORKD_*` variables
//! and command-line flags give it.
//!
//! Nothing here names a key. The list of keys, and what kind of value each
//! takes, come from the serialized defaults of [`RawConfig`], so a new key
//! is written once in `raw.rs` (and checked in `validate.rs`); the tests
//! prove the example file, docs/configuration.md and the validated config list the
//! same keys.

use std::sync::OnceLock;

use serde_json::Value;

use crate::raw::RawConfig;
use crate::{env_name, ConfigError};

/// Arrays of tables (`[[route]]`): set in the file only, so not keys.
pub(crate) const TABLE_ARRAYS: &[&str] = &["route"];

/// `FORKD_*` variables of the project's own that are not config keys:
/// those forkd reads itself (the file, the test-only failpoints; the
/// upgrade's `FORKD_UPGRADE*` are skipped by prefix) and those of the
/// scripts in bin/ (bin/cluster, bin/package, bin/systemd-test). Passed
/// over in silence.
const NON_KEY_VARS: &[&str] = &[
    "FORKD_CONFIG",
    "FORKD_FAILPOINTS",
    "FORKD_PORTS",
    "FORKD_MAINTAINER",
    "FORKD_SYSTEMD_TEST_TIMEOUT",
    "FORKD_SYSTEMD_TEST_RESULTS",
];

/// What a key's value is, as its default serializes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Whole,
    Number,
    Flag,
    /// A list of strings, written comma-separated.
    List,
    /// Text, or a setting that is unset by default (a path, a name).
    Text,
}

/// Every key the file accepts, as dotted paths, sorted within each table.
/// Environment variables are the same names upper-cased with `.` turned
/// into `_` and `FORKD_` in front.
pub fn keys() -> &'static [&'static str] {
    &table().0
}

fn table() -> &'static (Vec<&'static str>, Vec<Kind>) {
    static KEYS: OnceLock<(Vec<&'static str>, Vec<Kind>)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let defaults = serde_json::to_value(RawConfig::default()).expect("the defaults serialize");
        let mut out = (Vec::new(), Vec::new());
        walk("", &defaults, &mut out);
        out
    })
}

fn walk(prefix: &str, v: &Value, out: &mut (Vec<&'static str>, Vec<Kind>)) {
    let Value::Object(map) = v else { return };
    for (name, value) in map {
        if prefix.is_empty() && TABLE_ARRAYS.contains(&name.as_str()) {
            continue;
        }
        let key = format!("{prefix}{name}");
        let kind = match value {
            Value::Object(_) => {
                walk(&format!("{key}."), value, out);
                continue;
            }
            Value::Number(n) if n.is_f64() => Kind::Number,
            Value::Number(_) => Kind::Whole,
            Value::Bool(_) => Kind::Flag,
            Value::Array(_) => Kind::List,
            Value::String(_) | Value::Null => Kind::Text,
        };
        // Once per process, for a list that lives as long.
        out.0.push(Box::leak(key.into_boxed_str()));
        out.1.push(kind);
    }
}

impl RawConfig {
    /// Refuses a number key set to nan or inf, naming it.
    pub(crate) fn check_finite(&self) -> Result<(), ConfigError> {
        let whole = serde_json::to_value(self).unwrap_or(Value::Null);
        let (names, kinds) = table();
        for (key, kind) in names.iter().zip(kinds) {
            let value = key.split('.').try_fold(&whole, |v, part| v.get(part));
            if *kind == Kind::Number && value.is_none_or(Value::is_null) {
                return Err(ConfigError::Value {
                    key: (*key).to_owned(),
                    origin: String::new(),
                    value: "nan or inf".into(),
                    expected: "expected a finite number".into(),
                });
            }
        }
        Ok(())
    }

    /// Applies every `FORKD_*` variable of `vars` that names a key as an
    /// override, and returns the names of those it passed over: neither a
    /// key's nor the project's own (`NON_KEY_VARS`), nor like a key's
    /// (`mistyped`), such as a test harness's own `FORKD_BIN`. The caller
    /// warns about them.
    ///
    /// # Errors
    /// A variable that looks like a mistyped key, or a value that does
    /// not parse.
    pub fn apply_env<I>(&mut self, vars: I) -> Result<Vec<String>, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut vars: Vec<_> = vars
            .into_iter()
            .filter(|(k, _)| {
                // FORKD_UPGRADE*: the supervisor's own upgrade state.
                k.starts_with("FORKD_")
                    && !k.starts_with("FORKD_UPGRADE")
                    && !NON_KEY_VARS.contains(&k.as_str())
            })
            .collect();
        vars.sort();
        let mut passed_over = Vec::new();
        for (name, value) in vars {
            match keys().iter().find(|k| env_name(k) == name) {
                Some(key) => self.set_from(key, &value, &format!(" (from {name})"))?,
                None => match mistyped(&name) {
                    Some(nearest) => {
                        return Err(ConfigError::UnknownVariable { name, nearest });
                    }
                    None => passed_over.push(name),
                },
            }
        }
        Ok(passed_over)
    }

    /// Sets one key from its string form, as the command line does.
    ///
    /// # Errors
    /// An unknown key, or a value that does not parse for it.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        self.set_from(key, value, "")
    }

    /// The key's value is parsed by its kind, put in place in the
    /// serialized config, and the whole read back, so that the types'
    /// own parsing (enums, `workers`) has the last word.
    fn set_from(&mut self, key: &str, value: &str, origin: &str) -> Result<(), ConfigError> {
        let bad = |expected: &str| ConfigError::Value {
            key: key.to_owned(),
            origin: origin.to_owned(),
            value: value.to_owned(),
            expected: expected.to_owned(),
        };
        let (names, kinds) = table();
        let Some(at) = names.iter().position(|k| *k == key) else {
            return Err(ConfigError::UnknownKey(key.to_owned()));
        };
        let parsed = match kinds[at] {
            Kind::Whole => Value::from(
                value
                    .trim()
                    .parse::<i64>()
                    .map_err(|_| bad("expected a whole number"))?,
            ),
            Kind::Number => Value::from(
                value
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| bad("expected a number"))?,
            ),
            Kind::Flag => Value::Bool(match value.trim() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => return Err(bad("expected true or false")),
            }),
            Kind::List => Value::Array(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(Value::from)
                    .collect(),
            ),
            Kind::Text => Value::from(value),
        };
        let mut whole = serde_json::to_value(&*self).map_err(|e| bad(&e.to_string()))?;
        let mut slot = &mut whole;
        for part in key.split('.') {
            slot = slot
                .get_mut(part)
                .ok_or_else(|| ConfigError::UnknownKey(key.to_owned()))?;
        }
        *slot = parsed;
        *self = serde_json::from_value(whole).map_err(|e| bad(&e.to_string()))?;
        Ok(())
    }
}

/// Whether `name`, a `FORKD_*` variable that is no key's, looks like a
/// mistyped override: `None` if not, else the nearest key's variable if
/// one is near. It does when
///
/// - it is within two edits (a letter added, dropped, changed, or two
///   swapped; one edit for a key of five letters or fewer) of a key's
///   variable, case aside: `FORKD_WROKERS`, `FORKD_Workers`, `FORKD_USR`,
///   or of a table's key without its table: `FORKD_MAX_CONNECTIONS` for
///   `FORKD_HTTP_MAX_CONNECTIONS`;
/// - or it starts with a table's prefix, `FORKD_HTTP_`, `FORKD_REDIS_`, …
///   (or `FORKD_ROUTE_`, whose tables are set in the file only): a key of
///   that table that does not exist, `FORKD_HTTP_MAX_CONECTIONS`.
///
/// Anything else (`FORKD_PORTS`, `FORKD_BIN`) is some other program's.
fn mistyped(name: &str) -> Option<Option<String>> {
    let upper = name.to_ascii_uppercase();
    let rest = upper.strip_prefix("FORKD_")?;
    let near = |a: &str, b: &str| {
        let d = strsim::osa_distance(a, b);
        (d <= if b.len() <= 5 { 1 } else { 2 }).then_some(d)
    };
    let nearest = keys()
        .iter()
        .filter_map(|key| {
            let var = env_name(key);
            let whole = near(rest, &var["FORKD_".len()..]);
            // A table's key without its table: FORKD_MAX_CONNECTIONS.
            let within = key
                .split_once('.')
                .and_then(|(_, k)| near(rest, &k.to_ascii_uppercase().replace(['.', '-'], "_")));
            whole.into_iter().chain(within).min().map(|d| (d, var))
        })
        .min_by_key(|(d, _)| *d);
    let in_a_table = keys()
        .iter()
        .filter_map(|k| k.split_once('.').map(|(table, _)| table))
        .chain(TABLE_ARRAYS.iter().copied())
        .any(|table| upper.starts_with(&format!("{}_", env_name(table))));
    match nearest {
        Some((_, var)) => Some(Some(var)),
        // Under a table's prefix, but no key near enough to name.
        None if in_a_table => Some(None),
        None => None,
    }
}
