//! Reading a PEM file (a certificate chain, a key, authorities) with a
//! bound on its size: shared by the listeners' certificate and the
//! routes' TLS client settings.

use std::io::Read;
use std::path::Path;

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
