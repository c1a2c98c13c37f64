//! How a route reaches its `https://` servers: rustls (HTTP/1.1 by ALPN),
//! the authorities of a CA file or else the system's, SNI and the
//! certificate's name from each server's host (or the configured
//! `server_name`), and forkd's client certificate when one is set. Loaded
//! by the supervisor at start (while it may still be root) and at each
//! reload, and inherited by the workers, as the listeners' certificate is.

use std::io;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use crate::pem::{read_capped, read_pair};

/// A route's TLS client settings.
pub struct ClientTls {
    connector: TlsConnector,
    /// The name every server's certificate must have (None: its host).
    name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("name", &self.name)
            .finish()
    }
}

impl ClientTls {
    /// # Errors
    /// A message naming the file or setting that is wrong: an unreadable
    /// or empty CA file, no system authorities, a bad client pair, a bad
    /// server name.
    pub fn load(t: &forkd_config::UpstreamTls) -> Result<ClientTls, String> {
        let mut roots = RootCertStore::empty();
        match &t.ca_file {
            Some(file) => {
                let pem = read_capped(file)?;
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert =
                        cert.map_err(|e| format!("{}: not PEM certificates: {e}", file.display()))?;
                    roots.add(cert).map_err(|e| {
                        format!("{}: a certificate rustls cannot use: {e}", file.display())
                    })?;
                }
                if roots.is_empty() {
                    return Err(format!(
                        "{}: no CERTIFICATE block in the file",
                        file.display()
                    ));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(format!(
                        "no certificate authorities on this system ({}); set upstream_tls.ca_file",
                        found
                            .errors
                            .first()
                            .map_or("none found".to_owned(), ToString::to_string)
                    ));
                }
            }
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let mut config = match &t.client {
            Some((cert, key)) => {
                let (chain, key_der) = read_pair(cert, key)?;
                builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                    format!(
                        "client certificate {} and key {}: {e}",
                        cert.display(),
                        key.display()
                    )
                })?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = match &t.server_name {
            Some(n) => Some(
                ServerName::try_from(n.clone()).map_err(|e| format!("server_name {n:?}: {e}"))?,
            ),
            None => None,
        };
        Ok(ClientTls {
            connector: TlsConnector::from(Arc::new(config)),
            name,
        })
    }

    /// `stream` (connected to `addr`, `HOST:PORT`) with TLS on it.
    pub(crate) async fn wrap(
        &self,
        addr: &str,
        stream: tokio::net::TcpStream,
    ) -> io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let name = match &self.name {
            Some(n) => n.clone(),
            None => {
                let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                ServerName::try_from(host.to_owned())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?
            }
        };
        self.connector.connect(name, stream).await
    }
}
