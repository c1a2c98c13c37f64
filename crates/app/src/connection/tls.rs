//! HTTPS: the certificate and key, read by the supervisor (at start while
//! it may still be root, and again at each reload) and inherited by the
//! workers across fork, and the rustls configuration each worker builds
//! from them after the fork (so that its session-ticket keys are its own).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::pem::read_pair;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::ServerSessionMemoryCache;
use rustls::ServerConfig;

/// Resumption state each worker keeps for clients that come back.
const SESSION_CACHE_ENTRIES: usize = 4096;

/// The suites in the server's order of preference, AES-128-GCM with
/// SHA-256 first: the suite browsers ask for first, and the cheaper one
/// (fewer AES rounds, and SHA-256 runs on the CPU's SHA extensions; the
/// TLS 1.3 key schedule hashes a lot: with OpenSSL clients, which ask for
/// AES-256 first, SHA-384 was 11 % of a worker's time in a new-connection
/// benchmark under *ring*). Every suite is as strong as TLS 1.3 requires;
/// a client is never refused for its order.
static PREFERRED_SUITES: &[rustls::SupportedCipherSuite] = {
    use rustls::crypto::aws_lc_rs::cipher_suite::*;
    &[
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
};

/// A certificate chain and its key, checked to belong together.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    pub info: CertificateInfo,
}

/// What `forkd status` and /metrics say of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    pub file: PathBuf,
    pub subject: String,
    /// Hexadecimal, as `openssl x509 -serial` prints it.
    pub serial: String,
    /// Seconds since the epoch.
    pub not_before: i64,
    pub not_after: i64,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Identity")
            .field("info", &self.info)
            .finish()
    }
}

impl Identity {
    /// Reads and checks a certificate file (PEM: the certificate, then its
    /// chain) and its key file (PEM: PKCS#8, PKCS#1 or SEC1).
    ///
    /// # Errors
    /// A message naming the file: unreadable, not PEM, no certificate, no
    /// key, a key of a kind rustls cannot use, or a key that is not the
    /// certificate's.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Identity, String> {
        let (chain, key) = read_pair(cert_file, key_file)?;
        let leaf = &chain[0];
        let info = describe(cert_file, leaf)?;
        let id = Identity { chain, key, info };
        server_config(&id, true, None).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "{} is not the key of the certificate in {}",
                key_file.display(),
                cert_file.display()
            ),
            e => format!("{} and {}: {e}", cert_file.display(), key_file.display()),
        })?;
        Ok(id)
    }
}

fn describe(file: &Path, leaf: &CertificateDer<'_>) -> Result<CertificateInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| {
        format!(
            "{}: the first certificate cannot be parsed: {e}",
            file.display()
        )
    })?;
    let serial = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<String>();
    Ok(CertificateInfo {
        file: file.to_owned(),
        subject: cert.subject().to_string(),
        serial,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// The rustls configuration of one worker: TLS 1.2 and 1.3, ALPN `h2`
/// (when `h2`) and `http/1.1`, resumption by session tickets under the
/// keys every worker shares (`tickets`; None: no tickets, for a check),
/// or by this worker's session cache.
///
/// # Errors
/// The key is not the certificate's, or of a kind rustls cannot use.
pub(crate) fn server_config(
    id: &Identity,
    h2: bool,
    tickets: Option<&crate::TicketKeys>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = PREFERRED_SUITES.to_vec();
    let mut c = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(id.chain.clone(), id.key.clone_key())?;
    c.alpn_protocols = if h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    c.ignore_client_order = true;
    c.send_tls13_tickets = 1;
    c.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
    if let Some(t) = tickets {
        c.ticketer = t.ticketer();
    }
    Ok(Arc::new(c))
}
