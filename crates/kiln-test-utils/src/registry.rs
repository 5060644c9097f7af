//! A real OCI registry for tests: Debian's `docker-registry` (distribution 2.x) on 127.0.0.1 with its
//! storage in a temp dir, and `skopeo` to push images into it.

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
    /// Starts a registry on a free loopback port and waits until it answers `GET /v2/`.
    pub fn start() -> Self {
        assert!(
            registry_tools_present(),
            "docker-registry and skopeo are needed (Debian packages; run scripts/install-deps)"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    \
                 rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("storage").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting docker-registry");
        let mut registry = LocalRegistry { child, port, dir };
        let ready = crate::wait_until(Duration::from_secs(20), || registry.answers());
        if !ready {
            let status = registry.child.try_wait().ok().flatten();
            panic!("docker-registry on 127.0.0.1:{port} did not come up (exit status {status:?})");
        }
        registry
    }

    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
            return false;
        }
        let mut response = Vec::new();
        let _ = s.read_to_end(&mut response);
        response.starts_with(b"HTTP/1.0 200") || response.starts_with(b"HTTP/1.1 200")
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
    /// skopeo (plain HTTP).
    pub fn push_oci(&self, layout: &Path, ref_name: &str, repo_tag: &str) {
        let out = Command::new("skopeo")
            .args(["--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false"])
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
