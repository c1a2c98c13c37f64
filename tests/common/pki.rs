//! A test PKI made with the `openssl` CLI (a CA and the leaf
//! certificates it signs), a forkd serving HTTPS with one, and curl as the
//! client: shared by the HTTPS tests.

use super::*;

/// A test CA in a temporary directory, and the leaf certificates it signs.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub next_serial: std::cell::Cell<u32>,
}

#[derive(Clone, Copy)]
pub enum KeyKind {
    /// SEC1 `EC PRIVATE KEY`, P-256.
    Ecdsa,
    /// PKCS#1 `RSA PRIVATE KEY`, 2048 bits.
    Rsa,
    /// PKCS#8 `PRIVATE KEY`.
    Ed25519,
}

/// A leaf certificate (then the CA, as a chain) and its key.
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Upper-case hexadecimal, as `openssl x509 -serial` prints it.
    pub serial: String,
}

pub fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (bin/test installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "30",
                "-subj",
                "/CN=forkd test CA",
            ],
            dir.path(),
        );
        Pki {
            dir,
            next_serial: std::cell::Cell::new(0x1000),
        }
    }

    pub fn ca(&self) -> String {
        self.dir.path().join("ca.pem").display().to_string()
    }

    /// A certificate for 127.0.0.1 and localhost, signed by the CA.
    pub fn leaf(&self, name: &str, kind: KeyKind) -> Leaf {
        self.leaf_for(name, kind, "serverAuth")
    }

    /// A leaf for `usage` (`extendedKeyUsage`: serverAuth, clientAuth).
    pub fn leaf_for(&self, name: &str, kind: KeyKind, usage: &str) -> Leaf {
        let d = self.dir.path();
        let serial = self.next_serial.get();
        self.next_serial.set(serial + 1);
        let stem = format!("{name}-{serial}");
        let key = format!("{stem}.key");
        match kind {
            KeyKind::Ecdsa => openssl(
                &[
                    "ecparam",
                    "-name",
                    "prime256v1",
                    "-genkey",
                    "-noout",
                    "-out",
                    &key,
                ],
                d,
            ),
            KeyKind::Rsa => openssl(&["genrsa", "-traditional", "-out", &key, "2048"], d),
            KeyKind::Ed25519 => openssl(&["genpkey", "-algorithm", "ed25519", "-out", &key], d),
        }
        let csr = format!("{stem}.csr");
        openssl(
            &[
                "req",
                "-new",
                "-key",
                &key,
                "-subj",
                &format!("/CN={name}"),
                "-out",
                &csr,
            ],
            d,
        );
        std::fs::write(
            d.join("ext.cnf"),
            format!(
                "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
                 extendedKeyUsage={usage}\n"
            ),
        )
        .unwrap();
        let only = format!("{stem}.only.pem");
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-set_serial",
                &serial.to_string(),
                "-days",
                "20",
                "-extfile",
                "ext.cnf",
                "-out",
                &only,
            ],
            d,
        );
        // The chain as servers present it: the leaf, then its issuer.
        let chain = [
            std::fs::read(d.join(&only)).unwrap(),
            std::fs::read(d.join("ca.pem")).unwrap(),
        ]
        .concat();
        let cert = d.join(format!("{stem}.pem"));
        std::fs::write(&cert, chain).unwrap();
        Leaf {
            cert,
            key: d.join(key),
            serial: format!("{serial:X}"),
        }
    }
}

/// Puts a pair where the config names it, each file replaced by a rename
/// (as certbot and friends do).
pub fn install(f: &Forkd, cert: &Path, key: &Path) {
    let tls = f.dir.path().join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    for (from, to) in [(cert, "cert.pem"), (key, "key.pem")] {
        let tmp = tls.join(format!("{to}.new"));
        std::fs::copy(from, &tmp).unwrap();
        std::fs::rename(&tmp, tls.join(to)).unwrap();
    }
}

pub fn tls_config(f: &Forkd) -> String {
    let tls = f.dir.path().join("tls");
    format!(
        "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        tls.join("cert.pem").display(),
        tls.join("key.pem").display()
    )
}

/// A forkd whose listener speaks HTTPS with `leaf`, plus `extra` config.
pub fn https_forkd(redis: &RedisServer, leaf: &Leaf, tls_extra: &str, extra: &str) -> Forkd {
    let mut f = Forkd::configure("");
    install(&f, &leaf.cert, &leaf.key);
    let text = std::fs::read_to_string(&f.config).unwrap();
    std::fs::write(
        &f.config,
        format!("{text}{extra}\n{}{tls_extra}\n", tls_config(&f)),
    )
    .unwrap();
    f.env.push(("FORKD_REDIS_URL".into(), redis.url()));
    f.spawn(&[]);
    f.wait_ready();
    f
}

/// What curl made of one request.
pub struct Curled {
    /// 0 when curl failed (with `error` saying why).
    pub status: u16,
    pub version: String,
    pub headers: String,
    pub body: String,
    pub error: String,
}

/// `curl -sS` with the test CA and `args`, on `https://127.0.0.1:PORT` +
/// `path` (or `http://` when `ca` is None).
pub fn curl(ca: Option<&str>, port: u16, path: &str, args: &[&str]) -> Curled {
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("head");
    let url = match ca {
        Some(_) => format!("https://127.0.0.1:{port}{path}"),
        None => format!("http://127.0.0.1:{port}{path}"),
    };
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "-D"])
        .arg(&head)
        .args(["-w", "\n%{http_code} %{http_version}"]);
    if let Some(ca) = ca {
        cmd.args(["--cacert", ca]);
    }
    let out = cmd
        .args(args)
        .arg(&url)
        .stdin(Stdio::null())
        .output()
        .expect("curl runs (bin/test installs it)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    let mut it = tail.split_whitespace();
    Curled {
        status: it.next().and_then(|s| s.parse().ok()).unwrap_or(0),
        version: it.next().unwrap_or("").to_owned(),
        headers: std::fs::read_to_string(&head).unwrap_or_default(),
        body: body.to_owned(),
        error: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}

/// The answer's status and HTTP version, or what went wrong.
pub fn expect(r: &Curled, status: u16, version: &str) {
    assert_eq!(
        (r.status, r.version.as_str()),
        (status, version),
        "{}{}",
        r.error,
        r.body
    );
}

impl Curled {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}
