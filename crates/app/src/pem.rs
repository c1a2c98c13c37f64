//! Reading a PEM file (a certificate chain, a key, authorities) with a
//! bound on its size: shared by the listeners' certificate and the
//! routes' TLS client settings.

use std::io::Read;
use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// No PEM file of certificates or a key is this large.
const MAX_PEM_BYTES: u64 = 1 << 20;

pub(crate) fn read_capped(path: &Path) -> Result<Vec<u8>, String> {
    let f =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut out = Vec::new();
    f.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if out.len() as u64 > MAX_PEM_BYTES {
        return Err(format!(
            "{}: larger than {MAX_PEM_BYTES} bytes; not a certificate or key file",
            path.display()
        ));
    }
    Ok(out)
}

/// A certificate file (PEM: the certificate, then its chain) and its key
/// file (PEM: PKCS#8, PKCS#1 or SEC1), read; whether they belong together
/// is for rustls to say.
///
/// # Errors
/// A message naming the file: unreadable, not PEM, no certificate, no
/// key, or a key of a kind rustls cannot use.
pub(crate) fn read_pair(
    cert_file: &Path,
    key_file: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let cert_pem = read_capped(cert_file)?;
    let key_pem = read_capped(key_file)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", cert_file.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no CERTIFICATE block in the file",
            cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        format!(
            "{}: no usable private key (PKCS#8, RSA or EC PEM): {e}",
            key_file.display()
        )
    })?;
    Ok((chain, key))
}
