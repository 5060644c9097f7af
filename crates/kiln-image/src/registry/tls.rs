//! Which certificates a registry connection trusts, following Docker's and containerd's conventions:
//! the system CA bundle (`SSL_CERT_FILE`, else the distribution's bundle) plus the registry's own CAs
//! from `certs.d` directories (`<dir>/<host[:port]>/*.crt`), and a client certificate for mutual TLS
//! (`<dir>/<host[:port]>/*.cert` with the matching `*.key`). Read once per registry connection.
//!
//! A file in a registry's directory that is not usable (no PEM certificate in a `.crt`, a `.cert`
//! without its `.key`) is an error naming the file, not skipped: an administrator who put a CA there
//! expects it to be used, and a silently ignored CA only shows up later as "certificate not trusted".
//! Files with other extensions are ignored, as Docker does.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig};

use crate::error::{io_err, ImageError, Result};

/// Where per-registry certificates are looked for by default, in order.
pub const DEFAULT_CERTS_DIRS: [&str; 2] = ["/etc/kiln/certs.d", "/etc/docker/certs.d"];

/// The system CA bundles tried when `SSL_CERT_FILE` is not set (Debian/Ubuntu/Alpine, Fedora/RHEL,
/// macOS/Arch), first existing wins.
const SYSTEM_BUNDLES: [&str; 3] =
    ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];

/// The TLS setup for one registry.
#[derive(Debug, Clone)]
pub struct RegistryTls {
    root_certs: RootCerts,
    client_cert: Option<ClientCert>,
    /// The registry's own CA files found in `certs.d` (for messages and logs).
    pub ca_files: Vec<PathBuf>,
    /// The client certificate and key sent, if any.
    pub client_files: Option<(PathBuf, PathBuf)>,
}

/// Builds the TLS configuration for a registry known by `names` (as written in references and the
/// host actually contacted, `host[:port]`): system bundle + the registry's CAs from `certs_dirs`, and
/// its client certificate. With neither a system bundle nor a registry CA, ureq's built-in Mozilla
/// roots are kept. (A registry CA without a system bundle trusts only that CA, also for redirects.)
pub fn registry_tls(certs_dirs: &[PathBuf], names: &[&str]) -> Result<RegistryTls> {
    let mut roots = match system_bundle() {
        Some(bundle) => read_certificates(&bundle)?,
        None => Vec::new(),
    };
    let system_roots = roots.len();
    let mut ca_files = Vec::new();
    let (mut client_cert, mut client_files) = (None, None);
    for dir in registry_dirs(certs_dirs, names) {
        let found = read_certs_dir(&dir)?;
        roots.extend(found.cas);
        ca_files.extend(found.ca_files);
        if client_cert.is_none() {
            if let Some((cert_file, key_file, cert)) = found.client_cert {
                client_files = Some((cert_file, key_file));
                client_cert = Some(cert);
            }
        }
    }
    tracing::debug!(
        "TLS for {}: {system_roots} system roots, CA files {ca_files:?}, client certificate {client_files:?}",
        names.first().unwrap_or(&"")
    );
    let root_certs = if roots.is_empty() { RootCerts::WebPki } else { RootCerts::from(roots) };
    Ok(RegistryTls { root_certs, client_cert, ca_files, client_files })
}

impl RegistryTls {
    /// The configuration for ureq; `verify: false` accepts any server certificate (insecure
    /// registries only, as Docker does).
    pub fn config(&self, verify: bool) -> TlsConfig {
        TlsConfig::builder()
            .root_certs(self.root_certs.clone())
            .client_cert(self.client_cert.clone())
            .disable_verification(!verify)
            .build()
    }
}

/// `SSL_CERT_FILE` when set (even if missing: reading it then fails with its name), else the first
/// existing system bundle.
fn system_bundle() -> Option<PathBuf> {
    let candidates: Vec<&Path> = SYSTEM_BUNDLES.iter().map(Path::new).collect();
    choose_system_bundle(std::env::var_os("SSL_CERT_FILE"), &candidates)
}

fn choose_system_bundle(ssl_cert_file: Option<OsString>, candidates: &[&Path]) -> Option<PathBuf> {
    if let Some(file) = ssl_cert_file.filter(|f| !f.is_empty()) {
        return Some(PathBuf::from(file));
    }
    candidates.iter().find(|p| p.is_file()).map(|p| p.to_path_buf())
}

/// The existing `<dir>/<name>` directories, in `certs_dirs` order.
fn registry_dirs(certs_dirs: &[PathBuf], names: &[&str]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for dir in certs_dirs {
        for name in names {
            // A name is a host[:port]; never let it climb out of the certs directory.
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                continue;
            }
            let candidate = dir.join(name);
            if candidate.is_dir() && !dirs.contains(&candidate) {
                dirs.push(candidate);
            }
        }
    }
    dirs
}

/// What one registry's certificate directory holds.
#[derive(Debug, Default)]
pub struct CertsDir {
    /// CA certificates from every `*.crt` file, in file-name order.
    pub cas: Vec<Certificate<'static>>,
    pub ca_files: Vec<PathBuf>,
    /// The first (by name) `*.cert` with its `*.key`: (cert file, key file, parsed). Every `*.cert`
    /// must have its `*.key`, as with Docker; only the first is sent.
    pub client_cert: Option<(PathBuf, PathBuf, ClientCert)>,
}

/// Reads a registry's certificate directory (Docker's layout): every `*.crt` is a PEM file of CA
/// certificates, a `*.cert` is a client certificate whose key is the `*.key` of the same name.
pub fn read_certs_dir(dir: &Path) -> Result<CertsDir> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err("reading certificate directory", dir))? {
        let entry = entry.map_err(io_err("reading certificate directory", dir))?;
        files.push(entry.path());
    }
    files.sort();
    let mut found = CertsDir::default();
    for file in files {
        match file.extension().and_then(|e| e.to_str()) {
            Some("crt") => {
                found.cas.extend(read_certificates(&file)?);
                found.ca_files.push(file);
            }
            Some("cert") => {
                let key_file = file.with_extension("key");
                if !key_file.is_file() {
                    return Err(bad_file(
                        &file,
                        format!(
                            "a client certificate needs its private key in {} (CA certificates use the \
                             extension .crt)",
                            key_file.display()
                        ),
                    ));
                }
                if found.client_cert.is_none() {
                    let chain = read_certificates(&file)?;
                    let key = read_private_key(&key_file)?;
                    found.client_cert = Some((file, key_file, ClientCert::new_with_certs(&chain, key)));
                }
            }
            _ => {}
        }
    }
    Ok(found)
}

fn bad_file(path: &Path, detail: impl Into<String>) -> ImageError {
    ImageError::BadCertificateFile { path: path.to_path_buf(), detail: detail.into() }
}

/// Every PEM certificate in `path`; none at all, or malformed PEM, is an error.
fn read_certificates(path: &Path) -> Result<Vec<Certificate<'static>>> {
    let pem = std::fs::read(path).map_err(io_err("reading certificate file", path))?;
    let mut certificates = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(PemItem::Certificate(certificate)) => certificates.push(certificate),
            Ok(_) => {}
            Err(e) => return Err(bad_file(path, format!("malformed PEM ({e})"))),
        }
    }
    if certificates.is_empty() {
        return Err(bad_file(path, "it holds no PEM certificate (-----BEGIN CERTIFICATE-----)"));
    }
    Ok(certificates)
}

fn read_private_key(path: &Path) -> Result<PrivateKey<'static>> {
    let pem = std::fs::read(path).map_err(io_err("reading private key file", path))?;
    PrivateKey::from_pem(&pem).map_err(|e| bad_file(path, format!("no usable PEM private key ({e})")))
}

/// What a failed TLS handshake says about certificates, if anything.
pub enum CertificateProblem {
    /// The registry's certificate was refused (unknown issuer, wrong name, expired, ...).
    Untrusted(String),
    /// The registry refused ours (or wanted one we did not have).
    ClientRefused(String),
}

/// Looks for a rustls certificate error in what ureq returned.
pub fn certificate_problem(error: &ureq::Error) -> Option<CertificateProblem> {
    let rustls_error = match error {
        ureq::Error::Rustls(e) => e,
        ureq::Error::Io(io) => io.get_ref()?.downcast_ref::<rustls::Error>()?,
        _ => return None,
    };
    use rustls::AlertDescription as Alert;
    match rustls_error {
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
            Some(CertificateProblem::Untrusted(
                "it is signed by an authority neither the system CA bundle nor certs.d holds".into(),
            ))
        }
        rustls::Error::InvalidCertificate(e) => Some(CertificateProblem::Untrusted(e.to_string())),
        rustls::Error::AlertReceived(
            alert @ (Alert::CertificateRequired
            | Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateUnknown
            | Alert::CertificateExpired
            | Alert::CertificateRevoked
            | Alert::UnsupportedCertificate
            | Alert::AccessDenied),
        ) => Some(CertificateProblem::ClientRefused(format!("{alert:?}"))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kiln_test_utils::registry::TestCerts;
    use std::fs;

    #[test]
    fn a_registry_directory_gives_every_ca_and_the_client_certificate() {
        let work = tempfile::tempdir().unwrap();
        let (one, two) =
            (TestCerts::create(&work.path().join("one")), TestCerts::create(&work.path().join("two")));
        let dir = work.path().join("registry.example:5000");
        fs::create_dir(&dir).unwrap();
        fs::copy(one.ca_cert(), dir.join("a.crt")).unwrap();
        let both = [fs::read(one.ca_cert()).unwrap(), fs::read(two.ca_cert()).unwrap()].concat();
        fs::write(dir.join("b.crt"), both).unwrap();
        fs::write(dir.join("README"), "not a certificate, and not named .crt: ignored").unwrap();
        fs::copy(two.dir.join("client.cert"), dir.join("client.cert")).unwrap();
        fs::copy(two.dir.join("client.key"), dir.join("client.key")).unwrap();

        let found = read_certs_dir(&dir).unwrap();
        assert_eq!(found.cas.len(), 3);
        assert_eq!(found.ca_files, vec![dir.join("a.crt"), dir.join("b.crt")]);
        let (cert_file, key_file, client) = found.client_cert.unwrap();
        assert_eq!((cert_file, key_file), (dir.join("client.cert"), dir.join("client.key")));
        assert_eq!(client.certs().len(), 1);

        // Found under the name the registry is known by, in every certs dir, in order.
        let other = work.path().join("other.d");
        fs::create_dir_all(other.join("registry.example:5000")).unwrap();
        let dirs = registry_dirs(&[other.clone(), work.path().to_path_buf()], &["registry.example:5000"]);
        assert_eq!(dirs, vec![other.join("registry.example:5000"), dir.clone()]);
        assert!(registry_dirs(&[work.path().to_path_buf()], &["../etc", ".", ""]).is_empty());

        // A .crt that is not PEM is an error naming it; so is a client certificate without its key.
        fs::write(dir.join("c.crt"), "garbage").unwrap();
        let err = read_certs_dir(&dir).unwrap_err();
        assert!(
            matches!(&err, ImageError::BadCertificateFile { path, .. } if *path == dir.join("c.crt")),
            "{err}"
        );
        assert!(err.to_string().contains("holds no PEM certificate"), "{err}");
        fs::write(dir.join("c.crt"), "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n")
            .unwrap();
        let err = read_certs_dir(&dir).unwrap_err();
        assert!(err.to_string().contains("c.crt") && err.to_string().contains("malformed PEM"), "{err}");
        fs::remove_file(dir.join("c.crt")).unwrap();
        fs::copy(one.dir.join("client.cert"), dir.join("second.cert")).unwrap();
        let err = read_certs_dir(&dir).unwrap_err();
        assert!(err.to_string().contains("second.key"), "{err}");
    }

    #[test]
    fn the_system_bundle_is_ssl_cert_file_else_the_first_existing_candidate() {
        let work = tempfile::tempdir().unwrap();
        let (missing, present) = (work.path().join("missing.pem"), work.path().join("present.pem"));
        fs::write(&present, "").unwrap();
        let candidates = [missing.as_path(), present.as_path()];
        assert_eq!(choose_system_bundle(None, &candidates), Some(present.clone()));
        assert_eq!(choose_system_bundle(Some("".into()), &candidates), Some(present.clone()));
        // Set but missing: kept, so that reading it fails with its name instead of being ignored.
        assert_eq!(choose_system_bundle(Some(missing.clone().into()), &candidates), Some(missing.clone()));
        assert_eq!(choose_system_bundle(None, &[missing.as_path()]), None);
    }
}
