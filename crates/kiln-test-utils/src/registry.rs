//! A real OCI registry for tests: Debian's `docker-registry` (distribution 2.x) on 127.0.0.1 with its
//! storage in a temp dir, and `skopeo` to push images into it. Plain HTTP ([`LocalRegistry::start`]),
//! or HTTPS with a test CA made by the `openssl` CLI ([`LocalRegistry::start_tls`], optionally
//! requiring client certificates signed by the same CA).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `docker-registry`, killed on drop.
pub struct LocalRegistry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    /// With TLS: the certificates, and the directory skopeo takes as `--dest-cert-dir`.
    tls: Option<(TestCerts, PathBuf)>,
}

/// A CA, a server certificate for IP 127.0.0.1 and a client certificate, all signed by the CA (PEM
/// files in `dir`, named as Docker's certs.d expects: `ca.crt`, `client.cert`, `client.key`).
pub struct TestCerts {
    pub dir: PathBuf,
}

impl TestCerts {
    /// Makes the CA and certificates in `dir` (created) with the `openssl` CLI.
    pub fn create(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stdin(Stdio::null())
                .output()
                .expect("running openssl (scripts/install-deps installs it)");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        fn ec<'a>(rest: &[&'a str]) -> Vec<&'a str> {
            let mut args = vec!["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
            args.extend_from_slice(rest);
            args
        }
        let ca = ec(&["-subj", "/CN=kiln test CA", "-keyout", "ca.key", "-out", "ca.crt"]);
        openssl(&[&["req", "-x509", "-days", "2"][..], &ca[..]].concat());
        let extensions = [
            ("server", "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n"),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ];
        for (name, extension) in extensions {
            let (key, csr, cert, ext) =
                (format!("{name}.key"), format!("{name}.csr"), format!("{name}.cert"), format!("{name}.ext"));
            std::fs::write(dir.join(&ext), format!("basicConstraints=CA:FALSE\n{extension}")).unwrap();
            let subject = format!("/CN=kiln test {name}");
            openssl(&[&["req"][..], &ec(&["-subj", &subject, "-keyout", &key, "-out", &csr])[..]].concat());
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &cert,
            ]);
        }
        TestCerts { dir: dir.to_path_buf() }
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Lays out Docker's `<certs_d>/<host>/` for this CA (`ca.crt`) and, with `client`, the client
    /// certificate (`client.cert`, `client.key`); returns the host's directory.
    pub fn install(&self, certs_d: &Path, host: &str, client: bool) -> PathBuf {
        let host_dir = certs_d.join(host);
        std::fs::create_dir_all(&host_dir).unwrap();
        std::fs::copy(self.ca_cert(), host_dir.join("ca.crt")).unwrap();
        if client {
            for file in ["client.cert", "client.key"] {
                std::fs::copy(self.dir.join(file), host_dir.join(file)).unwrap();
            }
        }
        host_dir
    }
}

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// True when `docker-registry` and `skopeo` are installed.
pub fn registry_tools_present() -> bool {
    ["docker-registry", "skopeo"].iter().all(|t| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {t}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

impl LocalRegistry {
    /// Starts a plain-HTTP registry on a free loopback port and waits until it answers `GET /v2/`.
    pub fn start() -> Self {
        Self::launch(false, false)
    }

    /// Starts an HTTPS registry on a free loopback port with a fresh test CA ([`Self::certs`]); with
    /// `require_client_cert`, only clients presenting a certificate signed by that CA get in.
    pub fn start_tls(require_client_cert: bool) -> Self {
        Self::launch(true, require_client_cert)
    }

    fn launch(tls: bool, require_client_cert: bool) -> Self {
        assert!(
            registry_tools_present(),
            "docker-registry and skopeo are needed (Debian packages; run scripts/install-deps)"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("config.yml");
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    \
             rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("storage").display()
        );
        let tls = tls.then(|| {
            let certs = TestCerts::create(&dir.path().join("certs"));
            let (cert, key) = (certs.dir.join("server.cert"), certs.dir.join("server.key"));
            yaml += &format!("  tls:\n    certificate: {}\n    key: {}\n", cert.display(), key.display());
            if require_client_cert {
                yaml += &format!("    clientcas:\n      - {}\n", certs.ca_cert().display());
            }
            let host = format!("127.0.0.1:{port}");
            let skopeo_dir = certs.install(&dir.path().join("skopeo-certs.d"), &host, require_client_cert);
            (certs, skopeo_dir)
        });
        std::fs::write(&config, yaml).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting docker-registry");
        let mut registry = LocalRegistry { child, port, dir, tls };
        let ready = crate::wait_until(Duration::from_secs(20), || registry.answers());
        if !ready {
            let status = registry.child.try_wait().ok().flatten();
            panic!("docker-registry on 127.0.0.1:{port} did not come up (exit status {status:?})");
        }
        registry
    }

    /// Plain HTTP: `GET /v2/` answers 200. TLS: the server answers a plain request with Go's "400:
    /// client sent an HTTP request to an HTTPS server", which shows it is serving TLS.
    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
            return false;
        }
        let mut response = Vec::new();
        let _ = s.read_to_end(&mut response);
        let status = if self.tls.is_some() { b"400" } else { b"200" };
        (response.starts_with(b"HTTP/1.0 ") || response.starts_with(b"HTTP/1.1 "))
            && response.get(9..12) == Some(&status[..])
    }

    /// The test CA and certificates of a TLS registry.
    pub fn certs(&self) -> Option<&TestCerts> {
        self.tls.as_ref().map(|(certs, _)| certs)
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Where the registry keeps its data (`docker/registry/v2/...`), for tampering with blobs.
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The registry's file holding blob `digest` (`sha256:...`).
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage().join("docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    }

    /// Pushes the image tagged `ref_name` in the oci-layout `layout` to `REGISTRY/repo_tag` with
    /// skopeo (plain HTTP, or HTTPS verified with the test CA and, if required, its client certificate).
    pub fn push_oci(&self, layout: &Path, ref_name: &str, repo_tag: &str) {
        let mut skopeo = Command::new("skopeo");
        skopeo.args(["--insecure-policy", "copy", "--quiet"]);
        match &self.tls {
            Some((_, cert_dir)) => skopeo.arg("--dest-cert-dir").arg(cert_dir),
            None => skopeo.arg("--dest-tls-verify=false"),
        };
        let out = skopeo
            .arg(format!("oci:{}:{ref_name}", layout.display()))
            .arg(format!("docker://{}/{repo_tag}", self.host()))
            .stdin(Stdio::null())
            .output()
            .expect("running skopeo");
        assert!(out.status.success(), "skopeo copy failed: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
