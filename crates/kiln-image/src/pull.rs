//! `pull`: reference → registry → verified blobs in the store → an image record under the reference.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::digest::Digest;
use crate::error::{ImageError, Result};
use crate::oci::{self, Descriptor, ImageConfig, Manifest, ManifestDocument, MAX_CONFIG_BYTES};
use crate::progress::{BlobKind, Progress, ProgressEvent};
use crate::reference::Reference;
use crate::registry::{RegistryClient, RegistryOptions};
use crate::store::{BlobSource, ImageRecord, Store};

/// Pulls `reference` into `store` and records it under its name. Blobs already stored are reused.
pub fn pull(
    store: &Store,
    reference: &Reference,
    options: &RegistryOptions,
    progress: &dyn Progress,
) -> Result<ImageRecord> {
    let _in_use = store.use_lock()?;
    progress.event(ProgressEvent::Resolving { reference: reference.to_string() });
    let client = RegistryClient::connect(reference, options)?;
    let source_name = format!("registry {}", client.registry());
    let shown = reference.to_string();
    let top = client.fetch_manifest(reference.manifest_reference(), &shown)?;
    let (index_digest, manifest_desc, manifest_bytes) = match oci::parse_manifest_document(
        &top.bytes,
        top.media_type.as_deref(),
        &format!("manifest {shown}"),
    )? {
        ManifestDocument::Index(index) => {
            store.ingest_bytes(&top.bytes, Some(&top.digest), &blob_source("index", &source_name))?;
            let chosen = index.select(&options.os, &options.architecture, &format!("index {shown}"))?.clone();
            let what = format!("{} manifest of {shown}", chosen.platform_name());
            let fetched = client.fetch_manifest(chosen.digest.as_str(), &what)?;
            if fetched.bytes.len() as u64 != chosen.size {
                return Err(ImageError::SizeMismatch {
                    what,
                    source_name,
                    expected: chosen.size,
                    actual: fetched.bytes.len() as u64,
                });
            }
            (Some(top.digest), chosen, fetched.bytes)
        }
        ManifestDocument::Manifest(_) => {
            let media_type = top.media_type.clone().unwrap_or_else(|| oci::OCI_MANIFEST.to_string());
            let desc = Descriptor {
                media_type,
                digest: top.digest.clone(),
                size: top.bytes.len() as u64,
                platform: None,
                annotations: Default::default(),
            };
            (None, desc, top.bytes)
        }
    };
    let manifest = parse_manifest(&manifest_bytes, &format!("manifest of {shown}"))?;
    progress.event(ProgressEvent::Resolved {
        reference: shown.clone(),
        manifest: manifest_desc.digest.clone(),
        layers: manifest.layers.len(),
    });
    store.ingest_bytes(
        &manifest_bytes,
        Some(&manifest_desc.digest),
        &blob_source("manifest", &source_name),
    )?;

    let fetch = |desc: &Descriptor, kind: BlobKind, what: &str| -> Result<()> {
        fetch_blob(store, &client, desc, kind, what, &source_name, progress)
    };
    fetch(&manifest.config, BlobKind::Config, &format!("config {} of {shown}", manifest.config.digest))?;
    let config = read_config(store, &manifest, &shown)?;

    let count = manifest.layers.len();
    let next = AtomicUsize::new(0);
    let first_error: Mutex<Option<ImageError>> = Mutex::new(None);
    let workers = options.parallel_downloads.clamp(1, 8).min(count.max(1));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count || first_error.lock().map(|e| e.is_some()).unwrap_or(true) {
                    return;
                }
                let layer = &manifest.layers[i];
                let what = format!("layer {}/{count} {} of {shown}", i + 1, layer.digest);
                if let Err(e) = fetch(layer, BlobKind::Layer { index: i, count }, &what) {
                    if let Ok(mut slot) = first_error.lock() {
                        slot.get_or_insert(e);
                    }
                    return;
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().ok().flatten() {
        return Err(e);
    }
    let record = ImageRecord::from_manifest(&manifest_desc, index_digest, &manifest, &config);
    store.update_index(|index| {
        index.add(Some(reference.to_string()), &record);
        Ok(())
    })?;
    Ok(record)
}

fn blob_source<'a>(what: &'a str, source_name: &'a str) -> BlobSource<'a> {
    BlobSource { what, source_name }
}

/// Downloads one blob into the store unless it is already there.
fn fetch_blob(
    store: &Store,
    client: &RegistryClient,
    desc: &Descriptor,
    kind: BlobKind,
    what: &str,
    source_name: &str,
    progress: &dyn Progress,
) -> Result<()> {
    let digest = &desc.digest;
    progress.event(ProgressEvent::BlobStarted { digest: digest.clone(), kind, size: desc.size });
    if store.has_blob(digest, desc.size) {
        progress.event(ProgressEvent::BlobDone { digest: digest.clone(), reused: true });
        return Ok(());
    }
    let mut body = client.fetch_blob(digest, what)?;
    let size = desc.size;
    let mut last_reported = 0u64;
    store.ingest(&mut body, Some((digest, size)), &blob_source(what, source_name), &mut |done| {
        // At most ~100 progress events per blob.
        if done == size || done - last_reported >= (size / 100).max(256 * 1024) {
            last_reported = done;
            progress.event(ProgressEvent::BlobProgress {
                digest: digest.clone(),
                done: done.min(size),
                size,
            });
        }
    })?;
    progress.event(ProgressEvent::BlobDone { digest: digest.clone(), reused: false });
    Ok(())
}

/// Parses an image manifest (not an index) and checks its layers are ones we can unpack.
pub(crate) fn parse_manifest(bytes: &[u8], what: &str) -> Result<Manifest> {
    let manifest = match oci::parse_manifest_document(bytes, None, what)? {
        ManifestDocument::Manifest(m) => m,
        ManifestDocument::Index(_) => {
            return Err(ImageError::Malformed {
                what: what.to_string(),
                detail: "an index where a manifest belongs".into(),
            })
        }
    };
    for layer in &manifest.layers {
        if !oci::is_layer_media_type(&layer.media_type) {
            return Err(ImageError::Unsupported {
                what: "layer media type",
                detail: format!("{} for layer {} in {what}", layer.media_type, layer.digest),
            });
        }
    }
    Ok(manifest)
}

/// Reads and checks a stored config against its manifest (one diff_id per layer).
pub(crate) fn read_config(store: &Store, manifest: &Manifest, shown: &str) -> Result<ImageConfig> {
    let what = format!("config of {shown}");
    let bytes = store.read_blob(&manifest.config.digest, MAX_CONFIG_BYTES, &what)?;
    let config: ImageConfig = serde_json::from_slice(&bytes).map_err(crate::error::json_err(&what))?;
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(ImageError::Malformed {
            what,
            detail: format!(
                "{} diff_ids for {} layers in the manifest",
                config.rootfs.diff_ids.len(),
                manifest.layers.len()
            ),
        });
    }
    Ok(config)
}

impl Descriptor {
    /// `linux/amd64` when the descriptor carries a platform.
    pub fn platform_name(&self) -> String {
        self.platform
            .as_ref()
            .map(|p| format!("{}/{}", p.os, p.architecture))
            .unwrap_or_else(|| "image".into())
    }
}

/// Verifies a digest we computed against one we expected (shared by import).
pub(crate) fn check_digest(expected: &Digest, actual: &Digest, what: &str, source_name: &str) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(ImageError::DigestMismatch {
            what: what.to_string(),
            source_name: source_name.to_string(),
            expected: expected.clone(),
            actual: actual.clone(),
        })
    }
}
