//! `[tls]` and `[http2]`: HTTPS on the listener, and HTTP/2 by ALPN on it
//! or by prior knowledge (h2c) on plain TCP. The files are named here and
//! read by the binary, never by this crate.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::check::{bad, count, seconds};
use crate::ConfigError;

/// The `[tls]` table as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTls {
    /// PEM: the certificate first, then its chain.
    pub cert_file: Option<PathBuf>,
    /// PEM: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key_file: Option<PathBuf>,
    /// `Strict-Transport-Security: max-age` in seconds; 0: no header.
    pub hsts_max_age: i64,
    pub hsts_include_subdomains: bool,
    /// Seconds for the TLS handshake, from accept.
    pub handshake_timeout: f64,
}

impl Default for RawTls {
    fn default() -> Self {
        RawTls {
            cert_file: None,
            key_file: None,
            hsts_max_age: 0,
            hsts_include_subdomains: false,
            handshake_timeout: 10.0,
        }
    }
}

/// The `[http2]` table as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHttp2 {
    /// Offer `h2` by ALPN on the TLS listener.
    pub enabled: bool,
    /// Take HTTP/2 with prior knowledge on the plain listener.
    pub h2c: bool,
    pub max_concurrent_streams: i64,
}

impl Default for RawHttp2 {
    fn default() -> Self {
        RawHttp2 {
            enabled: true,
            h2c: false,
            max_concurrent_streams: 100,
        }
    }
}

/// HTTPS settings of a validated config: both files, or neither (plain
/// HTTP).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tls {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    pub hsts_max_age: u64,
    pub hsts_include_subdomains: bool,
    #[serde(serialize_with = "crate::check::secs")]
    pub handshake_timeout: Duration,
}

/// HTTP/2 settings of a validated config.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Http2 {
    pub enabled: bool,
    pub h2c: bool,
    pub max_concurrent_streams: u32,
}

impl RawTls {
    pub(crate) fn validate(&self) -> Result<Tls, ConfigError> {
        let hsts_max_age = count("tls.hsts_max_age", self.hsts_max_age, 0, 1 << 40)?;
        let handshake_timeout = seconds("tls.handshake_timeout", self.handshake_timeout, 0.1)?;
        let (cert_file, key_file) = match (&self.cert_file, &self.key_file) {
            (None, None) => {
                if hsts_max_age > 0 {
                    return Err(bad(
                        "tls.hsts_max_age",
                        hsts_max_age,
                        "HSTS needs tls.cert_file and tls.key_file",
                    ));
                }
                return Ok(Tls {
                    cert_file: None,
                    key_file: None,
                    hsts_max_age,
                    hsts_include_subdomains: self.hsts_include_subdomains,
                    handshake_timeout,
                });
            }
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            (Some(_), None) => {
                return Err(bad("tls.key_file", "", "set together with tls.cert_file"))
            }
            (None, Some(_)) => {
                return Err(bad("tls.cert_file", "", "set together with tls.key_file"))
            }
        };
        for (key, p) in [("tls.cert_file", &cert_file), ("tls.key_file", &key_file)] {
            if !p.is_absolute() {
                return Err(bad(key, p.display(), "expected an absolute path"));
            }
        }
        Ok(Tls {
            cert_file: Some(cert_file),
            key_file: Some(key_file),
            hsts_max_age,
            hsts_include_subdomains: self.hsts_include_subdomains,
            handshake_timeout,
        })
    }
}

impl Tls {
    /// The certificate and key files, when the listener speaks HTTPS.
    pub fn files(&self) -> Option<(&std::path::Path, &std::path::Path)> {
        Some((self.cert_file.as_deref()?, self.key_file.as_deref()?))
    }
}

impl RawHttp2 {
    pub(crate) fn validate(&self) -> Result<Http2, ConfigError> {
        Ok(Http2 {
            enabled: self.enabled,
            h2c: self.h2c,
            max_concurrent_streams: count(
                "http2.max_concurrent_streams",
                self.max_concurrent_streams,
                1,
                10_000,
            )?,
        })
    }
}
