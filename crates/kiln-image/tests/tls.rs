//! Pulling over HTTPS from a real registry (Debian's `docker-registry` with a test CA made by the
//! `openssl` CLI): the registry's CA from a certs.d directory, the error (and no plain-HTTP detour)
//! without it, Docker's insecure-registry behaviour, digests verified as over HTTP, and client
//! certificates (mutual TLS) from the same directory.
#![allow(clippy::unwrap_used)] // Test helpers: a failed setup step should panic.

use std::fs;
use std::path::Path;

use kiln_image::registry::RegistryClient;
use kiln_image::{ImageError, ImageStore, NoProgress, Reference, RegistryOptions};
use kiln_test_utils::oci::{OciLayout, TarBuilder};
use kiln_test_utils::registry::LocalRegistry;
use serde_json::json;

fn options(certs_dirs: &[&Path]) -> RegistryOptions {
    RegistryOptions { certs_dirs: certs_dirs.iter().map(|d| d.to_path_buf()).collect(), ..Default::default() }
}

/// Pushes a one-layer image to `registry` as `repo_tag`; returns its layer digest.
fn push_image(registry: &LocalRegistry, work: &Path, repo_tag: &str) -> (Reference, String) {
    let mut layout = OciLayout::create(&work.join(repo_tag.replace([':', '/'], "-")));
    let mut layer = TarBuilder::new();
    layer.file("etc/motd", 0o644, format!("served over TLS as {repo_tag}\n").as_bytes());
    layer.file("payload", 0o644, &[5u8; 32 << 10]);
    let built = layout.add_image(&[layer.finish()], true, json!({}), "v1");
    registry.push_oci(&layout.dir, "v1", repo_tag);
    (Reference::parse(&format!("{}/{repo_tag}", registry.host())).unwrap(), built.layer_digests[0].clone())
}

#[test]
fn https_pulls_trust_the_registry_ca_from_certs_d_and_explain_when_it_is_missing() {
    let registry = LocalRegistry::start_tls(false);
    let work = tempfile::tempdir().unwrap();
    let (name, layer_digest) = push_image(&registry, work.path(), "kiln/tls:v1");
    let images = ImageStore::open(&work.path().join("state")).unwrap();

    // Without the CA: a clear error naming where the CA goes, and no detour over plain HTTP (which
    // loopback registries are otherwise allowed).
    let empty_certs_d = work.path().join("empty-certs.d");
    fs::create_dir(&empty_certs_d).unwrap();
    let err = images.pull(&name, &options(&[&empty_certs_d]), &NoProgress).unwrap_err();
    eprintln!("without the CA: {err}");
    assert!(matches!(err, ImageError::UntrustedCertificate { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(&format!("the TLS certificate of {} is not trusted", registry.host())),
        "{message}"
    );
    let expected_place = empty_certs_d.join(registry.host()).join("ca.crt");
    assert!(message.contains(&expected_place.display().to_string()), "{message}");
    assert!(message.contains("--insecure-registry"), "{message}");
    assert!(images.list().unwrap().is_empty());

    // With the CA in the second certs.d directory of the search list: HTTPS, verified.
    let certs_d = work.path().join("certs.d");
    let ca_dir = registry.certs().unwrap().install(&certs_d, &registry.host(), false);
    let with_ca = options(&[&empty_certs_d, &certs_d]);
    let client = RegistryClient::connect(&name, &with_ca).unwrap();
    assert_eq!(client.base_url(), format!("https://{}", registry.host()));
    let summary = images.pull(&name, &with_ca, &NoProgress).unwrap();
    let record = images.resolve(&name.to_string()).unwrap();
    assert_eq!(record.layers[0].digest.as_str(), layer_digest);
    for digest in record.blobs() {
        let stored = fs::read(images.store().blob_path(digest)).unwrap();
        assert_eq!(kiln_image::Digest::of(&stored), *digest, "stored blob does not match its digest");
    }
    assert_eq!(images.list().unwrap()[0].id, summary.id);

    // A CA file that is not a certificate is an error naming it, not silently skipped.
    fs::write(ca_dir.join("broken.crt"), "not a certificate\n").unwrap();
    let err = images.pull(&name, &with_ca, &NoProgress).unwrap_err();
    assert!(matches!(err, ImageError::BadCertificateFile { .. }), "{err:?}");
    assert!(err.to_string().contains(&ca_dir.join("broken.crt").display().to_string()), "{err}");
    fs::remove_file(ca_dir.join("broken.crt")).unwrap();

    // An insecure registry (Docker's meaning): HTTPS without verification when nobody vouches for it.
    let insecure =
        RegistryOptions { insecure_registries: vec![registry.host()], ..options(&[&empty_certs_d]) };
    let client = RegistryClient::connect(&name, &insecure).unwrap();
    assert_eq!(client.base_url(), format!("https://{}", registry.host()));
    let (second, _) = push_image(&registry, work.path(), "kiln/tls-insecure:v1");
    images.pull(&second, &insecure, &NoProgress).unwrap();
}

#[test]
fn a_tampered_blob_served_over_https_is_refused() {
    let registry = LocalRegistry::start_tls(false);
    let work = tempfile::tempdir().unwrap();
    let (name, layer_digest) = push_image(&registry, work.path(), "kiln/tampered:v1");
    let data_path = registry.blob_data_path(&layer_digest);
    let mut data = fs::read(&data_path).unwrap();
    let middle = data.len() / 2;
    data[middle] ^= 0xff;
    fs::write(&data_path, &data).unwrap();

    let certs_d = work.path().join("certs.d");
    registry.certs().unwrap().install(&certs_d, &registry.host(), false);
    let images = ImageStore::open(&work.path().join("state")).unwrap();
    let err = images.pull(&name, &options(&[&certs_d]), &NoProgress).unwrap_err();
    match &err {
        ImageError::DigestMismatch { expected, .. } => assert_eq!(expected.as_str(), layer_digest),
        other => panic!("expected a digest mismatch, got {other}"),
    }
    assert!(images.list().unwrap().is_empty());
}

#[test]
fn mutual_tls_sends_the_client_certificate_from_certs_d() {
    let registry = LocalRegistry::start_tls(true);
    let work = tempfile::tempdir().unwrap();
    let (name, _) = push_image(&registry, work.path(), "kiln/mtls:v1");
    let images = ImageStore::open(&work.path().join("state")).unwrap();

    let ca_only = work.path().join("ca-only");
    registry.certs().unwrap().install(&ca_only, &registry.host(), false);
    let err = images.pull(&name, &options(&[&ca_only]), &NoProgress).unwrap_err();
    eprintln!("without a client certificate: {err}");
    assert!(matches!(err, ImageError::ClientCertificateRefused { .. }), "{err:?}");
    let expected_place = ca_only.join(registry.host()).join("client.cert");
    assert!(err.to_string().contains(&expected_place.display().to_string()), "{err}");

    let with_client = work.path().join("with-client");
    registry.certs().unwrap().install(&with_client, &registry.host(), true);
    images.pull(&name, &options(&[&with_client]), &NoProgress).unwrap();
    assert_eq!(images.list().unwrap().len(), 1);
}
