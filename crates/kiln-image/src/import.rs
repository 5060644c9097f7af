//! `import`: images from an `oci-layout` directory or archive, or a `docker save` archive (plain or
//! gzip-compressed), into the store. Archives are first unpacked into the store's scratch space with the
//! same confined unpacker layers use, so a crafted archive cannot write outside it; every blob is then
//! verified against the digest the layout names before it is stored.

use std::fs;
use std::io::Read;
use std::path::Path;

use serde::Deserialize;

use crate::digest::Digest;
use crate::error::{io_err, json_err, ImageError, Result};
use crate::oci::{self, Descriptor, Index, Manifest, ManifestDocument, MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES};
use crate::progress::{BlobKind, Progress, ProgressEvent};
use crate::pull::{parse_manifest, read_config};
use crate::reference::Reference;
use crate::store::{unique_name, BlobSource, ImageRecord, Store};
use crate::unpack::root::{archive_path_components, ResolveError, RootDir};
use crate::unpack::{unpack_layers, LayerSource, UnpackOptions};

/// An imported image and the name it was recorded under (none when the archive names none).
#[derive(Clone, Debug)]
pub struct Imported {
    pub name: Option<Reference>,
    pub record: ImageRecord,
}

/// Imports every image in `path`. `name` names the image when the archive holds exactly one (it
/// overrides the archive's own name); a bare tag in an oci-layout (`ref.name` = `latest`) needs it.
pub fn import(
    store: &Store,
    path: &Path,
    name: Option<&Reference>,
    progress: &dyn Progress,
) -> Result<Vec<Imported>> {
    let _in_use = store.use_lock()?;
    let meta = fs::metadata(path).map_err(io_err("opening", path))?;
    if meta.is_dir() {
        return import_dir(store, path, &path.display().to_string(), name, progress);
    }
    let scratch = store.tmp_dir().join(unique_name("import"));
    fs::create_dir(&scratch).map_err(io_err("creating", &scratch))?;
    let result = (|| {
        let layer = LayerSource { path, name: path.display().to_string(), diff_id: None };
        unpack_layers(&scratch, &[layer], &UnpackOptions { privileged: false }, |_| {})?;
        import_dir(store, &scratch, &path.display().to_string(), name, progress)
    })();
    let _ = crate::unpack::remove_staging(&scratch);
    result
}

/// A layout directory read through a confined root (symlinks stay inside it).
struct Layout {
    root: RootDir,
    shown: String,
}

impl Layout {
    fn open_file(&self, rel: &str) -> Result<Option<fs::File>> {
        let components = archive_path_components(rel.as_bytes()).map_err(|reason| ImageError::Malformed {
            what: self.shown.clone(),
            detail: format!("path {rel:?}: {reason}"),
        })?;
        match self.root.open_file(&components) {
            Ok(f) => Ok(Some(f)),
            Err(ResolveError::NotFound) => Ok(None),
            Err(ResolveError::Io(e)) => Err(io_err("reading", self.root.path().join(rel))(e)),
            Err(e) => {
                Err(ImageError::Malformed { what: self.shown.clone(), detail: format!("{rel:?}: {e}") })
            }
        }
    }

    fn read_json(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        let Some(file) = self.open_file(rel)? else { return Ok(None) };
        let mut bytes = Vec::new();
        file.take(MAX_MANIFEST_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err("reading", self.root.path().join(rel)))?;
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(ImageError::TooLarge {
                what: format!("{rel} in {}", self.shown),
                limit: MAX_MANIFEST_BYTES,
            });
        }
        Ok(Some(bytes))
    }

    /// Stores the file at `rel`, verified against `expected` (digest and size) when given.
    fn ingest(
        &self,
        store: &Store,
        rel: &str,
        expected: Option<&Descriptor>,
        what: &str,
        kind: BlobKind,
        progress: &dyn Progress,
    ) -> Result<(Digest, u64)> {
        if let Some(d) = expected {
            progress.event(ProgressEvent::BlobStarted { digest: d.digest.clone(), kind, size: d.size });
            if store.has_blob(&d.digest, d.size) {
                progress.event(ProgressEvent::BlobDone { digest: d.digest.clone(), reused: true });
                return Ok((d.digest.clone(), d.size));
            }
        }
        let mut file = self.open_file(rel)?.ok_or_else(|| ImageError::Malformed {
            what: self.shown.clone(),
            detail: format!("{what} ({rel}) is missing"),
        })?;
        let source = BlobSource { what, source_name: &self.shown };
        let stored = store.ingest(&mut file, expected.map(|d| (&d.digest, d.size)), &source, &mut |_| {})?;
        progress.event(ProgressEvent::BlobDone { digest: stored.0.clone(), reused: false });
        Ok(stored)
    }
}

fn blob_rel(digest: &Digest) -> String {
    format!("blobs/{}/{}", digest.algorithm(), digest.hex())
}

fn import_dir(
    store: &Store,
    dir: &Path,
    shown: &str,
    name: Option<&Reference>,
    progress: &dyn Progress,
) -> Result<Vec<Imported>> {
    let layout =
        Layout { root: RootDir::open(dir).map_err(io_err("opening", dir))?, shown: shown.to_string() };
    let imported = if let Some(index) = layout.read_json("index.json")? {
        import_oci(store, &layout, &index, name, progress)?
    } else if let Some(manifest) = layout.read_json("manifest.json")? {
        import_docker(store, &layout, &manifest, name, progress)?
    } else {
        return Err(ImageError::Malformed {
            what: shown.to_string(),
            detail: "neither an oci-layout (index.json) nor a `docker save` archive (manifest.json)".into(),
        });
    };
    if imported.is_empty() {
        return Err(ImageError::Malformed { what: shown.to_string(), detail: "it contains no image".into() });
    }
    store.update_index(|index| {
        for image in &imported {
            index.add(image.name.as_ref().map(Reference::to_string), &image.record);
        }
        Ok(())
    })?;
    Ok(imported)
}

/// The name for an image: the caller's when the archive holds one image, else the archive's.
fn choose_name(
    given: Option<&Reference>,
    image_count: usize,
    archive_name: Option<&str>,
    shown: &str,
) -> Result<Option<Reference>> {
    if let Some(given) = given {
        if image_count != 1 {
            return Err(ImageError::Malformed {
                what: shown.to_string(),
                detail: format!("it holds {image_count} images; import it without a name to keep theirs"),
            });
        }
        return Ok(Some(given.clone()));
    }
    match archive_name {
        None => Ok(None),
        // A full name (`docker.io/library/busybox:1`, `busybox:1`) or a bare tag needing a name.
        Some(n) if n.contains(['/', ':']) => Ok(Some(Reference::parse(n)?)),
        Some(tag) => Err(ImageError::Malformed {
            what: shown.to_string(),
            detail: format!("its image is tagged only {tag:?}; give a name to import it under (NAME:{tag})"),
        }),
    }
}

fn import_oci(
    store: &Store,
    layout: &Layout,
    index_bytes: &[u8],
    name: Option<&Reference>,
    progress: &dyn Progress,
) -> Result<Vec<Imported>> {
    let index: Index =
        serde_json::from_slice(index_bytes).map_err(json_err(format!("index.json of {}", layout.shown)))?;
    let mut out = Vec::new();
    for top in &index.manifests {
        let archive_name = top
            .annotations
            .get(oci::ANNOTATION_CONTAINERD_NAME)
            .or_else(|| top.annotations.get(oci::ANNOTATION_REF_NAME))
            .map(String::as_str);
        let name = choose_name(name, index.manifests.len(), archive_name, &layout.shown)?;
        let shown = name.as_ref().map(|n| n.to_string()).unwrap_or_else(|| top.digest.to_string());
        let what = format!("manifest {} of {shown}", top.digest);
        layout.ingest(store, &blob_rel(&top.digest), Some(top), &what, BlobKind::Manifest, progress)?;
        let bytes = store.read_blob(&top.digest, MAX_MANIFEST_BYTES, &what)?;
        let (index_digest, manifest_desc) =
            match oci::parse_manifest_document(&bytes, Some(&top.media_type), &what)? {
                ManifestDocument::Manifest(_) => (None, top.clone()),
                ManifestDocument::Index(nested) => {
                    let chosen = nested.select(oci::DEFAULT_OS, oci::DEFAULT_ARCH, &what)?.clone();
                    let what = format!("{} manifest of {shown}", chosen.platform_name());
                    layout.ingest(
                        store,
                        &blob_rel(&chosen.digest),
                        Some(&chosen),
                        &what,
                        BlobKind::Manifest,
                        progress,
                    )?;
                    (Some(top.digest.clone()), chosen)
                }
            };
        let what = format!("manifest of {shown}");
        let manifest =
            parse_manifest(&store.read_blob(&manifest_desc.digest, MAX_MANIFEST_BYTES, &what)?, &what)?;
        let record = ingest_image(store, layout, &manifest, manifest_desc, index_digest, &shown, progress)?;
        out.push(Imported { name, record });
    }
    Ok(out)
}

/// Stores an image's config and layers (verified against the manifest) and makes its record.
fn ingest_image(
    store: &Store,
    layout: &Layout,
    manifest: &Manifest,
    manifest_desc: Descriptor,
    index_digest: Option<Digest>,
    shown: &str,
    progress: &dyn Progress,
) -> Result<ImageRecord> {
    let config_what = format!("config {} of {shown}", manifest.config.digest);
    layout.ingest(
        store,
        &blob_rel(&manifest.config.digest),
        Some(&manifest.config),
        &config_what,
        BlobKind::Config,
        progress,
    )?;
    let config = read_config(store, manifest, shown)?;
    let count = manifest.layers.len();
    for (i, layer) in manifest.layers.iter().enumerate() {
        let what = format!("layer {}/{count} {} of {shown}", i + 1, layer.digest);
        layout.ingest(
            store,
            &blob_rel(&layer.digest),
            Some(layer),
            &what,
            BlobKind::Layer { index: i, count },
            progress,
        )?;
    }
    Ok(ImageRecord::from_manifest(&manifest_desc, index_digest, manifest, &config))
}

/// One image of a `docker save` archive's `manifest.json`.
#[derive(Deserialize)]
struct DockerSaveEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

fn import_docker(
    store: &Store,
    layout: &Layout,
    manifest_bytes: &[u8],
    name: Option<&Reference>,
    progress: &dyn Progress,
) -> Result<Vec<Imported>> {
    let entries: Vec<DockerSaveEntry> = serde_json::from_slice(manifest_bytes)
        .map_err(json_err(format!("manifest.json of {}", layout.shown)))?;
    let mut out = Vec::new();
    for entry in &entries {
        let tags = entry.repo_tags.clone().unwrap_or_default();
        let names: Vec<Option<Reference>> = if name.is_some() || tags.is_empty() {
            vec![choose_name(name, entries.len(), None, &layout.shown)?]
        } else {
            tags.iter().map(|t| Reference::parse(t).map(Some)).collect::<Result<_>>()?
        };
        let shown = tags.first().cloned().unwrap_or_else(|| entry.config.clone());
        // docker save names files by content; the digests computed while storing them are checked
        // against the config's diff_ids.
        let config_what = format!("config of {shown}");
        let (config_digest, config_size) =
            layout.ingest(store, &entry.config, None, &config_what, BlobKind::Config, progress)?;
        let config_bytes = store.read_blob(&config_digest, MAX_CONFIG_BYTES, &config_what)?;
        let config: oci::ImageConfig =
            serde_json::from_slice(&config_bytes).map_err(json_err(&config_what))?;
        if config.rootfs.diff_ids.len() != entry.layers.len() {
            return Err(ImageError::Malformed {
                what: config_what,
                detail: format!(
                    "{} diff_ids for {} layers",
                    config.rootfs.diff_ids.len(),
                    entry.layers.len()
                ),
            });
        }
        let count = entry.layers.len();
        let mut layers = Vec::new();
        for (i, (rel, diff_id)) in entry.layers.iter().zip(&config.rootfs.diff_ids).enumerate() {
            let what = format!("layer {}/{count} ({rel}) of {shown}", i + 1);
            let (digest, size) =
                layout.ingest(store, rel, None, &what, BlobKind::Layer { index: i, count }, progress)?;
            let gzip = is_gzip(&store.blob_path(&digest))?;
            if !gzip {
                crate::pull::check_digest(diff_id, &digest, &what, &layout.shown)?;
            }
            let media_type = if gzip { oci::OCI_LAYER_GZIP } else { oci::OCI_LAYER_TAR };
            layers.push(Descriptor::new(media_type, digest, size));
        }
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(oci::OCI_MANIFEST.into()),
            config: Descriptor::new(oci::OCI_CONFIG, config_digest, config_size),
            layers,
        };
        let bytes = serde_json::to_vec(&manifest).map_err(json_err("generated manifest"))?;
        let manifest_digest =
            store.ingest_bytes(&bytes, None, &BlobSource { what: "manifest", source_name: &layout.shown })?;
        let manifest_desc = Descriptor::new(oci::OCI_MANIFEST, manifest_digest, bytes.len() as u64);
        let record = ImageRecord::from_manifest(&manifest_desc, None, &manifest, &config);
        for name in names {
            out.push(Imported { name, record: record.clone() });
        }
    }
    Ok(out)
}

fn is_gzip(path: &Path) -> Result<bool> {
    let mut magic = [0u8; 2];
    let mut file = fs::File::open(path).map_err(io_err("reading", path))?;
    let n = file.read(&mut magic).map_err(io_err("reading", path))?;
    Ok(n == 2 && magic == [0x1f, 0x8b])
}
