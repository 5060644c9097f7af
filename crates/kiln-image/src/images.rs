//! [`ImageStore`]: the API `kiln-manager` and `kiln-cli` use — pull, import, list, inspect, remove,
//! prune, and the root filesystem and kernel an image provides.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::digest::Digest;
use crate::disk::{copy_disk, CopyMethod};
use crate::error::{io_err, json_err, ImageError, Result};
use crate::kernel::{KernelSource, KERNEL_PATHS};
use crate::oci::{Descriptor, ImageConfig, RunConfig, MAX_CONFIG_BYTES};
use crate::progress::{Progress, ProgressEvent};
use crate::reference::Reference;
use crate::registry::RegistryOptions;
use crate::rootfs::{add_files, build_ext4, RootfsOptions};
use crate::store::{lock_file, unique_name, ImageRecord, PruneReport, Store, StoreIndex};
use crate::unpack::root::{archive_path_components, RootDir};
use crate::unpack::{remove_staging, unpack_layers, LayerSource};

/// One line of `kiln image ls`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ImageSummary {
    /// Full names (`docker.io/library/busybox:latest`); empty for an unnamed image.
    pub names: Vec<String>,
    /// The image ID (config digest).
    pub id: Digest,
    /// The manifest digest (what `name@digest` pins).
    pub digest: Digest,
    /// Bytes stored (compressed layers, config, manifest).
    pub size: u64,
    pub os: String,
    pub architecture: String,
    /// When it entered this store (seconds since the epoch).
    pub added_at: u64,
}

/// `kiln image inspect`.
#[derive(Clone, Debug, Serialize)]
pub struct ImageDetails {
    #[serde(flatten)]
    pub summary: ImageSummary,
    /// When the image was built (from its config), RFC 3339.
    pub created: Option<String>,
    /// Entrypoint, Cmd, Env, WorkingDir, User, ExposedPorts, Labels, StopSignal.
    pub config: RunConfig,
    pub layers: Vec<Descriptor>,
    pub diff_ids: Vec<Digest>,
}

/// What `remove` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RemoveReport {
    /// Names removed.
    pub untagged: Vec<String>,
    /// The image removed, when no name points at it any more.
    pub deleted: Option<Digest>,
    pub pruned: PruneReport,
}

/// A root filesystem image built from an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RootfsImage {
    /// The cached ext4 image; read-only by convention: give each VM a copy (`vm_disk`).
    pub path: PathBuf,
    pub size: u64,
    /// True when it was already built.
    pub cached: bool,
}

/// The image store under a state root.
#[derive(Clone, Debug)]
pub struct ImageStore {
    store: Store,
}

impl ImageStore {
    /// Opens the store under `root` (`<root>/images`), creating it when missing.
    pub fn open(root: &Path) -> Result<Self> {
        Ok(ImageStore { store: Store::open(root)? })
    }

    /// The underlying blob store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Pulls an image from its registry and records it under `reference`.
    pub fn pull(
        &self,
        reference: &Reference,
        options: &RegistryOptions,
        progress: &dyn Progress,
    ) -> Result<ImageSummary> {
        let record = crate::pull::pull(&self.store, reference, options, progress)?;
        self.summary_of(&record)
    }

    /// Imports the images of an oci-layout directory or archive, or a `docker save` archive.
    pub fn import(
        &self,
        path: &Path,
        name: Option<&Reference>,
        progress: &dyn Progress,
    ) -> Result<Vec<ImageSummary>> {
        let imported = crate::import::import(&self.store, path, name, progress)?;
        let mut seen = BTreeMap::new();
        for image in imported {
            seen.entry(image.record.manifest.digest.clone()).or_insert(image.record);
        }
        seen.values().map(|r| self.summary_of(r)).collect()
    }

    fn summary_of(&self, record: &ImageRecord) -> Result<ImageSummary> {
        Ok(summary(&self.store.read_index()?, record))
    }

    /// All images, newest first.
    pub fn list(&self) -> Result<Vec<ImageSummary>> {
        let index = self.store.read_index()?;
        let mut out: Vec<ImageSummary> = index.images.values().map(|r| summary(&index, r)).collect();
        out.sort_by(|a, b| b.added_at.cmp(&a.added_at).then_with(|| a.names.cmp(&b.names)));
        Ok(out)
    }

    /// Finds an image by name (`busybox`, `busybox:1`, `host/x@sha256:...`), by ID or digest
    /// (`sha256:...`), or by an unambiguous prefix of either (at least 4 hex digits).
    pub fn resolve(&self, name: &str) -> Result<ImageRecord> {
        resolve_in(&self.store.read_index()?, name).map(|(_, record)| record)
    }

    /// Image details for `kiln image inspect`.
    pub fn inspect(&self, name: &str) -> Result<ImageDetails> {
        let index = self.store.read_index()?;
        let (_, record) = resolve_in(&index, name)?;
        let config = self.config(&record)?;
        Ok(ImageDetails {
            summary: summary(&index, &record),
            created: config.created,
            config: config.config,
            layers: record.layers.clone(),
            diff_ids: config.rootfs.diff_ids,
        })
    }

    /// The image config of a stored image.
    pub fn config(&self, record: &ImageRecord) -> Result<ImageConfig> {
        let what = format!("config of image {}", record.id().short());
        let bytes = self.store.read_blob(record.id(), MAX_CONFIG_BYTES, &what)?;
        serde_json::from_slice(&bytes).map_err(json_err(what))
    }

    /// Removes a name; when it was the image's last name (or `name` is an ID), the image and its
    /// no longer referenced blobs and caches go too.
    pub fn remove(&self, name: &str) -> Result<RemoveReport> {
        let mut report = self.store.update_index(|index| {
            let (by_name, record) = resolve_in(index, name)?;
            let digest = record.manifest.digest.clone();
            let mut report = RemoveReport::default();
            match by_name {
                Some(n) => {
                    index.refs.remove(&n);
                    report.untagged.push(n);
                }
                None => {
                    report.untagged = index.names_of(&digest);
                    index.refs.retain(|_, d| *d != digest);
                }
            }
            if index.names_of(&digest).is_empty() {
                index.images.remove(&digest);
                report.deleted = Some(digest);
            }
            Ok(report)
        })?;
        if report.deleted.is_some() {
            report.pruned = self.store.prune()?;
        }
        Ok(report)
    }

    /// Removes images no name points at any more (`docker image prune`), then the blobs and caches
    /// no image references (see `Store::prune`).
    pub fn prune(&self) -> Result<PruneReport> {
        self.prune_images_then_store(None)
    }

    /// [`ImageStore::prune`], and root filesystem caches built with options other than `keep`
    /// (e.g. with an earlier build of an added file).
    pub fn prune_keeping(&self, keep: &[RootfsOptions]) -> Result<PruneReport> {
        let variants: Vec<String> = keep.iter().map(RootfsOptions::cache_variant).collect();
        self.prune_images_then_store(Some(&variants))
    }

    fn prune_images_then_store(&self, rootfs_variants: Option<&[String]>) -> Result<PruneReport> {
        let dangling = self.store.update_index(|index| {
            let before = index.images.len();
            let named: std::collections::BTreeSet<Digest> = index.refs.values().cloned().collect();
            index.images.retain(|digest, _| named.contains(digest));
            Ok(before - index.images.len())
        })?;
        Ok(PruneReport { images: dangling, ..self.store.prune_keeping(rootfs_variants)? })
    }

    /// The ext4 root filesystem of an image, built on first use and cached per image ID and options.
    pub fn rootfs(
        &self,
        name: &str,
        options: &RootfsOptions,
        progress: &dyn Progress,
    ) -> Result<RootfsImage> {
        let record = self.resolve(name)?;
        let cache_dir = self.store.dir().join("rootfs");
        let key = format!("{}-{}", record.id().hex(), options.cache_variant());
        let path = cache_dir.join(format!("{key}.ext4"));
        let cached = |path: &Path| -> Result<Option<RootfsImage>> {
            match fs::metadata(path) {
                Ok(m) => Ok(Some(RootfsImage { path: path.to_path_buf(), size: m.len(), cached: true })),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io_err("inspecting", path)(e)),
            }
        };
        if let Some(hit) = cached(&path)? {
            progress.event(ProgressEvent::CacheHit { what: format!("root filesystem {}", path.display()) });
            return Ok(hit);
        }
        // One builder per image and options; others wait and then use its result.
        let _build = lock_file(&cache_dir.join(format!("{key}.lock")), true)?;
        if let Some(hit) = cached(&path)? {
            return Ok(hit);
        }
        self.in_scratch("rootfs", |work, staging| {
            let mut report = self.unpack_image(&record, staging, &options.unpack, progress)?;
            add_files(staging, &options.added_files, options.unpack.privileged, &mut report.fixups)?;
            progress.event(ProgressEvent::BuildingFilesystem { bytes: report.bytes });
            let image = work.join("rootfs.ext4");
            let size = build_ext4(staging, &image, &report.fixups, options)?;
            fs::rename(&image, &path).map_err(io_err("storing", &path))?;
            Ok(RootfsImage { path: path.clone(), size, cached: false })
        })
    }

    /// Runs `work` with a fresh scratch directory (`work/`, with an empty `work/root/` to unpack into)
    /// while holding the store's use lock, and removes the scratch directory afterwards.
    fn in_scratch<T>(&self, prefix: &str, work: impl FnOnce(&Path, &Path) -> Result<T>) -> Result<T> {
        let _in_use = self.store.use_lock()?;
        let dir = self.store.tmp_dir().join(unique_name(prefix));
        let staging = dir.join("root");
        fs::create_dir_all(&staging).map_err(io_err("creating", &staging))?;
        let result = work(&dir, &staging);
        let _ = remove_staging(&dir);
        result
    }

    fn unpack_image(
        &self,
        record: &ImageRecord,
        staging: &Path,
        options: &crate::unpack::UnpackOptions,
        progress: &dyn Progress,
    ) -> Result<crate::unpack::UnpackReport> {
        let config = self.config(record)?;
        let paths: Vec<PathBuf> = record.layers.iter().map(|l| self.store.blob_path(&l.digest)).collect();
        let count = record.layers.len();
        let layers: Vec<LayerSource<'_>> = record
            .layers
            .iter()
            .zip(&paths)
            .enumerate()
            .map(|(i, (layer, path))| LayerSource {
                path,
                name: format!("{}/{count} {}", i + 1, layer.digest),
                diff_id: config.rootfs.diff_ids.get(i),
            })
            .collect();
        unpack_layers(staging, &layers, options, |i| {
            progress.event(ProgressEvent::Unpacking {
                index: i,
                count,
                digest: record.layers[i].digest.clone(),
            })
        })
    }

    /// A VM's own disk at `dest`: a copy of the image's cached root filesystem (reflink when possible,
    /// else sparse), grown to `size` bytes when given.
    pub fn vm_disk(
        &self,
        name: &str,
        dest: &Path,
        size: Option<u64>,
        options: &RootfsOptions,
        progress: &dyn Progress,
    ) -> Result<CopyMethod> {
        let rootfs = self.rootfs(name, options, progress)?;
        copy_disk(&rootfs.path, dest, size)
    }

    /// The kernel file of a kernel source: the file itself, or the kernel extracted from an image
    /// (cached per image ID).
    pub fn kernel(&self, source: &KernelSource, progress: &dyn Progress) -> Result<PathBuf> {
        let name = match source {
            KernelSource::File(path) => {
                return match fs::metadata(path) {
                    Ok(m) if m.is_file() => Ok(path.clone()),
                    Ok(_) => Err(ImageError::NoKernel {
                        what: path.display().to_string(),
                        candidates: "a regular file".into(),
                    }),
                    Err(e) => Err(io_err("opening kernel", path)(e)),
                };
            }
            KernelSource::Image(name) => name,
        };
        let record = self.resolve(name)?;
        let cache_dir = self.store.dir().join("kernels");
        for candidate in KERNEL_PATHS {
            let cached = cache_dir.join(format!("{}-{}", record.id().hex(), file_name(candidate)));
            if cached.is_file() {
                progress.event(ProgressEvent::CacheHit { what: format!("kernel {}", cached.display()) });
                return Ok(cached);
            }
        }
        self.in_scratch("kernel", |work, staging| {
            let unprivileged = crate::unpack::UnpackOptions { privileged: false };
            self.unpack_image(&record, staging, &unprivileged, progress)?;
            let root = RootDir::open(staging).map_err(io_err("opening", staging))?;
            for candidate in KERNEL_PATHS {
                let components = archive_path_components(candidate.as_bytes()).unwrap_or_default();
                let Ok(mut file) = root.open_file(&components) else { continue };
                let dest = cache_dir.join(format!("{}-{}", record.id().hex(), file_name(candidate)));
                let tmp = work.join("kernel");
                let mut out = fs::File::create(&tmp).map_err(io_err("creating", &tmp))?;
                io::copy(&mut file, &mut out).map_err(io_err("extracting kernel to", &tmp))?;
                out.sync_all().map_err(io_err("syncing", &tmp))?;
                fs::rename(&tmp, &dest).map_err(io_err("storing", &dest))?;
                return Ok(dest);
            }
            Err(ImageError::NoKernel {
                what: format!("image {name}"),
                candidates: KERNEL_PATHS.map(|p| format!("/{p}")).join(", "),
            })
        })
    }
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn summary(index: &StoreIndex, record: &ImageRecord) -> ImageSummary {
    ImageSummary {
        names: index.names_of(&record.manifest.digest),
        id: record.id().clone(),
        digest: record.manifest.digest.clone(),
        size: record.stored_size(),
        os: record.os.clone(),
        architecture: record.architecture.clone(),
        added_at: record.added_at,
    }
}

/// Finds an image; returns the name it was found by (None when found by ID/digest).
fn resolve_in(index: &StoreIndex, name: &str) -> Result<(Option<String>, ImageRecord)> {
    let unknown = || ImageError::UnknownImage { name: name.to_string() };
    if let Ok(reference) = Reference::parse(name) {
        if let Some(digest) = index.refs.get(&reference.to_string()) {
            let record = index.images.get(digest).ok_or_else(unknown)?;
            return Ok((Some(reference.to_string()), record.clone()));
        }
        if let Some(pinned) = reference.digest() {
            if let Some(record) = index
                .images
                .values()
                .find(|r| &r.manifest.digest == pinned || r.index_digest.as_ref() == Some(pinned))
            {
                return Ok((None, record.clone()));
            }
        }
    }
    let hex = name.strip_prefix("sha256:").unwrap_or(name);
    if hex.len() < 4 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(unknown());
    }
    let hex = hex.to_ascii_lowercase();
    let matches: Vec<&ImageRecord> = index
        .images
        .values()
        .filter(|r| r.id().hex().starts_with(&hex) || r.manifest.digest.hex().starts_with(&hex))
        .collect();
    match matches.as_slice() {
        [] => Err(unknown()),
        [one] => Ok((None, (*one).clone())),
        many => Err(ImageError::AmbiguousImage {
            name: name.to_string(),
            candidates: many.iter().map(|r| r.id().short().to_string()).collect::<Vec<_>>().join(", "),
        }),
    }
}
