//! The checks every table's validation shares: a value's error, seconds,
//! whole numbers, and durations written back as seconds.

use std::time::Duration;

use crate::ConfigError;

pub(crate) fn bad(key: &str, value: impl ToString, expected: &str) -> ConfigError {
    ConfigError::Value {
        key: key.to_owned(),
        origin: String::new(),
        value: value.to_string(),
        expected: expected.to_owned(),
    }
}

/// `v` seconds, from `min` to a day.
pub(crate) fn seconds(key: &str, v: f64, min: f64) -> Result<Duration, ConfigError> {
    seconds_in(key, v, min, 86_400.0)
}

/// `v` seconds, from `min` to `max`.
pub(crate) fn seconds_in(key: &str, v: f64, min: f64, max: f64) -> Result<Duration, ConfigError> {
    if v.is_finite() && (min..=max).contains(&v) {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(bad(key, v, &format!("expected {min} to {max} seconds")))
    }
}

/// A whole number from `min` to `max`.
pub(crate) fn count<T: TryFrom<i64>>(
    key: &str,
    v: i64,
    min: i64,
    max: i64,
) -> Result<T, ConfigError> {
    if (min..=max).contains(&v) {
        T::try_from(v).map_err(|_| bad(key, v, "out of range"))
    } else {
        Err(bad(key, v, &format!("expected {min} to {max}")))
    }
}

/// A duration as seconds, for `forkd check-config`.
pub(crate) fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}
