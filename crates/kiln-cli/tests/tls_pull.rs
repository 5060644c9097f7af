//! `kiln image pull` from an HTTPS registry with its own CA (Debian's `docker-registry`, test CA made
//! with `openssl`): `KILN_CERTS_DIR` is searched first; without the CA the error says where it goes.
#![allow(clippy::unwrap_used)] // Test helpers: a failed setup step should panic.

use std::process::{Command, Output, Stdio};

use kiln_test_utils::oci::{OciLayout, TarBuilder};
use kiln_test_utils::registry::LocalRegistry;

fn kiln_pull(root: &std::path::Path, image: &str, certs_dir: Option<&std::path::Path>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
    command
        .args(["image", "pull", image])
        .env("KILN_ROOT", root)
        .env_remove("KILN_LOG")
        .env_remove("KILN_CERTS_DIR")
        .env_remove("SSL_CERT_FILE")
        .stdin(Stdio::null());
    if let Some(dir) = certs_dir {
        command.env("KILN_CERTS_DIR", dir);
    }
    command.output().unwrap()
}

#[test]
fn kiln_certs_dir_holds_a_private_registry_ca() {
    let registry = LocalRegistry::start_tls(false);
    let work = tempfile::tempdir().unwrap();
    let mut layout = OciLayout::create(&work.path().join("layout"));
    let mut layer = TarBuilder::new();
    layer.file("etc/motd", 0o644, b"over TLS\n");
    layout.add_image(&[layer.finish()], true, serde_json::json!({}), "v1");
    registry.push_oci(&layout.dir, "v1", "kiln/tls:v1");
    let image = format!("{}/kiln/tls:v1", registry.host());
    let root = work.path().join("root");

    let out = kiln_pull(&root, &image, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("is not trusted"), "{stderr}");
    assert!(stderr.contains(&format!("/etc/kiln/certs.d/{}/ca.crt", registry.host())), "{stderr}");

    let certs_dir = work.path().join("certs.d");
    registry.certs().unwrap().install(&certs_dir, &registry.host(), false);
    let out = kiln_pull(&root, &image, Some(&certs_dir));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with(&format!("{}/kiln/tls", registry.host())) && stdout.contains("sha256:"),
        "{stdout}"
    );
}
