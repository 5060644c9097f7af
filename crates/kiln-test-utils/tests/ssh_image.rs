//! The Debian+sshd test image (scripts/ssh-image): built (or found cached) and checked without
//! booting it — layout, digests, entrypoint, what sshd needs — then pushed to a local registry.
#![allow(clippy::unwrap_used)] // Test helpers: a failed setup step should panic.

use std::path::Path;
use std::process::Command;

use kiln_test_utils::oci::sha256_digest;
use kiln_test_utils::registry::LocalRegistry;
use kiln_test_utils::{ssh_image, SSH_IMAGE_REF};
use serde_json::Value;

fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    let data = std::fs::read(layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))).unwrap();
    assert_eq!(sha256_digest(&data), digest, "blob content does not match its digest");
    data
}

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

/// `tar` output for the layer: verbose listing, or one member's contents.
fn tar(layer: &Path, args: &[&str]) -> String {
    let out = Command::new("tar").arg("-f").arg(layer).args(args).output().unwrap();
    assert!(out.status.success(), "tar {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_ssh_image_has_sshd_ready_to_run_as_the_entrypoint() {
    if !is_root() {
        eprintln!("SKIPPED {}: scripts/ssh-image runs debootstrap, which needs root", module_path!());
        return;
    }
    let layout = ssh_image();
    let index = json(&std::fs::read(layout.join("index.json")).unwrap());
    let entry = &index["manifests"][0];
    assert_eq!(entry["annotations"]["org.opencontainers.image.ref.name"], SSH_IMAGE_REF);
    let manifest = json(&blob(layout, entry["digest"].as_str().unwrap()));
    let config = json(&blob(layout, manifest["config"]["digest"].as_str().unwrap()));
    // kiln-agent mounts a tmpfs on /run before it starts the entrypoint: make sshd's dir there.
    let entrypoint = serde_json::json!(["/bin/sh", "-c", "mkdir -p /run/sshd && exec /usr/sbin/sshd -D -e"]);
    assert_eq!(config["config"]["Entrypoint"], entrypoint);
    assert_eq!(config["architecture"], "amd64");
    let layer_digest = manifest["layers"][0]["digest"].as_str().unwrap();
    blob(layout, layer_digest);
    assert_eq!(config["rootfs"]["diff_ids"][0], layer_digest, "uncompressed layer: diff_id = digest");
    let layer = layout.join("blobs/sha256").join(layer_digest.trim_start_matches("sha256:"));

    let listing = tar(&layer, &["-tv"]);
    let entry_of = |path: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(" {path}")) || l.contains(&format!(" {path} -> ")))
            .unwrap_or_else(|| panic!("{path} missing from the image"))
            .to_string()
    };
    assert!(entry_of("./usr/sbin/sshd").starts_with("-rwxr-xr-x 0/0"));
    assert!(entry_of("./run/sshd/").starts_with("drwxr-xr-x 0/0"), "sshd's privilege separation dir");
    for key in ["ed25519", "rsa", "ecdsa"] {
        let private = entry_of(&format!("./etc/ssh/ssh_host_{key}_key"));
        assert!(private.starts_with("-rw------- 0/0"), "host key readable by others: {private}");
        entry_of(&format!("./etc/ssh/ssh_host_{key}_key.pub"));
    }
    assert!(entry_of("./root/.ssh/").starts_with("drwx------ 0/0"));
    entry_of("./usr/bin/ssh-keygen");
    entry_of("./usr/bin/sh");
    assert!(entry_of("./bin").contains("./bin -> usr/bin"), "merged /usr expected");

    assert!(entry_of("./etc/os-release").contains("-> ../usr/lib/os-release"));
    let os_release = tar(&layer, &["-xO", "./usr/lib/os-release"]);
    assert!(os_release.contains("VERSION_CODENAME=bookworm"), "{os_release}");
    let kiln_conf = tar(&layer, &["-xO", "./etc/ssh/sshd_config.d/kiln.conf"]);
    assert!(kiln_conf.contains("PermitRootLogin prohibit-password"), "{kiln_conf}");
    assert!(kiln_conf.contains("PasswordAuthentication no"), "{kiln_conf}");
    let sshd_config = tar(&layer, &["-xO", "./etc/ssh/sshd_config"]);
    assert!(sshd_config.contains("Include /etc/ssh/sshd_config.d/*.conf"), "kiln.conf would be ignored");

    // The registry fixture takes it as it is.
    let registry = LocalRegistry::start();
    registry.push_oci(layout, SSH_IMAGE_REF, "debian/ssh:bookworm");
    // skopeo may recompress the layer on the way: compare the image config it stored.
    let out = Command::new("skopeo")
        .args(["inspect", "--config", "--tls-verify=false"])
        .arg(format!("docker://{}/debian/ssh:bookworm", registry.host()))
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo inspect: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(json(&out.stdout)["config"]["Entrypoint"], config["config"]["Entrypoint"]);
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}
