//! The content-addressed blob store and the image index, under `<root>/images/`:
//!
//! ```text
//! blobs/sha256/<hex>     verified blobs (manifests, configs, layers), written once by rename
//! index.json             image records and name → image refs, replaced atomically (temp + rename)
//! index.lock             flock held (exclusive) around every read-modify-write of index.json
//! gc.lock                flock: shared while a pull/import/build uses blobs, exclusive while pruning
//! tmp/                   downloads and builds in progress (only ever renamed into place when complete)
//! rootfs/, kernels/      caches derived from images (see `rootfs`, `kernel`)
//! ```
//!
//! A blob only appears under `blobs/` after its digest and size were verified, so readers never see a
//! partial or wrong blob, and concurrent processes storing the same blob race harmlessly.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};

use crate::digest::{Digest, HashingWriter};
use crate::error::{io_err, json_err, ImageError, Result};
use crate::oci::{Descriptor, ImageConfig, Manifest};

const INDEX_VERSION: u32 = 1;

/// One image in the store: the platform manifest and what it points at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The platform-specific manifest (its digest is the image's digest).
    pub manifest: Descriptor,
    /// The index / manifest list the name resolved to, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_digest: Option<Digest>,
    /// The config blob; its digest is the image ID (`docker images` convention).
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    pub os: String,
    pub architecture: String,
    /// When the image entered this store (seconds since the epoch).
    pub added_at: u64,
}

impl ImageRecord {
    /// The record for a stored manifest and its config, added now.
    pub fn from_manifest(
        manifest_desc: &Descriptor,
        index_digest: Option<Digest>,
        manifest: &Manifest,
        config: &ImageConfig,
    ) -> Self {
        ImageRecord {
            manifest: Descriptor::new(
                &manifest_desc.media_type,
                manifest_desc.digest.clone(),
                manifest_desc.size,
            ),
            index_digest,
            config: manifest.config.clone(),
            layers: manifest.layers.clone(),
            os: config.os.clone(),
            architecture: config.architecture.clone(),
            added_at: now_secs(),
        }
    }

    /// The image ID: the config digest.
    pub fn id(&self) -> &Digest {
        &self.config.digest
    }

    /// Bytes of all blobs as stored (compressed layers, config, manifest).
    pub fn stored_size(&self) -> u64 {
        self.manifest.size + self.config.size + self.layers.iter().map(|l| l.size).sum::<u64>()
    }

    /// Every blob this image keeps alive.
    pub fn blobs(&self) -> impl Iterator<Item = &Digest> {
        [&self.manifest.digest, &self.config.digest]
            .into_iter()
            .chain(self.index_digest.iter())
            .chain(self.layers.iter().map(|l| &l.digest))
    }
}

/// The index file's contents.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StoreIndex {
    version: u32,
    /// Image records by manifest digest.
    pub images: BTreeMap<Digest, ImageRecord>,
    /// Full reference (`docker.io/library/busybox:latest`) → manifest digest.
    pub refs: BTreeMap<String, Digest>,
}

impl StoreIndex {
    /// Adds (or replaces) an image, and points `name` at it when given.
    pub fn add(&mut self, name: Option<String>, record: &ImageRecord) {
        if let Some(name) = name {
            self.refs.insert(name, record.manifest.digest.clone());
        }
        self.images.insert(record.manifest.digest.clone(), record.clone());
    }

    /// Names pointing at an image.
    pub fn names_of(&self, manifest: &Digest) -> Vec<String> {
        self.refs.iter().filter(|(_, d)| *d == manifest).map(|(n, _)| n.clone()).collect()
    }
}

/// An exclusive or shared `flock` held until dropped.
#[derive(Debug)]
pub struct LockGuard {
    _file: File,
}

/// Takes `flock` on `path` (created if missing); blocks until granted.
pub fn lock_file(path: &Path, exclusive: bool) -> Result<LockGuard> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_err("opening lock file", path))?;
    let op = if exclusive { FlockOperation::LockExclusive } else { FlockOperation::LockShared };
    rustix::fs::flock(&file, op).map_err(|e| io_err("locking", path)(e.into()))?;
    Ok(LockGuard { _file: file })
}

/// A unique name for temporary files in this process (pid + counter + time).
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{prefix}-{}-{n}-{nanos:x}", std::process::id())
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Writes `bytes` to `path` atomically: a temp file in the same directory, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(unique_name(".tmp"));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err("writing", path))
}

/// The blob store and index rooted at `<root>/images`.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

/// Where a blob came from, for messages.
#[derive(Clone, Debug)]
pub struct BlobSource<'a> {
    /// What the blob is (`layer 2/5 sha256:...`, `config of busybox:latest`).
    pub what: &'a str,
    /// Where it came from (a registry host, an archive path).
    pub source_name: &'a str,
}

impl Store {
    /// Opens (creating the directories if needed) the store under `root/images`.
    pub fn open(root: &Path) -> Result<Self> {
        let dir = root.join("images");
        for sub in ["blobs/sha256", "tmp", "rootfs", "kernels"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err("creating store directory", &p))?;
        }
        Ok(Store { dir })
    }

    /// `<root>/images`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Scratch space for work in progress (same filesystem as the store, so renames are atomic).
    pub fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    /// Path of a blob (whether or not it is present).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs").join(digest.algorithm()).join(digest.hex())
    }

    /// True when the blob is stored with the expected size.
    pub fn has_blob(&self, digest: &Digest, size: u64) -> bool {
        fs::metadata(self.blob_path(digest)).is_ok_and(|m| m.is_file() && m.len() == size)
    }

    /// Opens a stored blob for reading.
    pub fn open_blob(&self, digest: &Digest) -> Result<File> {
        let path = self.blob_path(digest);
        File::open(&path).map_err(io_err("opening blob", path))
    }

    /// Reads a small stored blob (manifest, config), re-checking its digest.
    pub fn read_blob(&self, digest: &Digest, limit: u64, what: &str) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        let path = self.blob_path(digest);
        self.open_blob(digest)?
            .take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err("reading blob", &path))?;
        if bytes.len() as u64 > limit {
            return Err(ImageError::TooLarge { what: what.to_string(), limit });
        }
        let actual = Digest::of(&bytes);
        if &actual != digest {
            return Err(ImageError::DigestMismatch {
                what: what.to_string(),
                source_name: format!("the local store ({})", path.display()),
                expected: digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Streams `reader` into the store. With `expected`, the content must have exactly that digest and
    /// size (a longer stream is cut at size+1 and refused); without, the computed digest names the blob.
    /// Nothing is left behind when verification fails. `on_bytes` is called with the running byte
    /// count. Returns the digest and size.
    pub fn ingest(
        &self,
        reader: &mut dyn Read,
        expected: Option<(&Digest, u64)>,
        source: &BlobSource<'_>,
        on_bytes: &mut dyn FnMut(u64),
    ) -> Result<(Digest, u64)> {
        let tmp = self.tmp_dir().join(unique_name("blob"));
        let result = self.ingest_to(&tmp, reader, expected, source, on_bytes);
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn ingest_to(
        &self,
        tmp: &Path,
        reader: &mut dyn Read,
        expected: Option<(&Digest, u64)>,
        source: &BlobSource<'_>,
        on_bytes: &mut dyn FnMut(u64),
    ) -> Result<(Digest, u64)> {
        let file = File::create(tmp).map_err(io_err("creating", tmp))?;
        let mut writer = HashingWriter::new(io::BufWriter::with_capacity(1 << 20, file));
        let mut limited: Box<dyn Read> = match expected {
            Some((_, size)) => Box::new(reader.take(size.saturating_add(1))),
            None => Box::new(reader),
        };
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match limited.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source_err) => {
                    return Err(ImageError::Transfer {
                        registry: source.source_name.to_string(),
                        what: source.what.to_string(),
                        source: source_err,
                    })
                }
            };
            writer.write_all(&buf[..n]).map_err(io_err("writing", tmp))?;
            on_bytes(writer.written());
        }
        let (digest, size, buffered) = writer.finish();
        let file = buffered.into_inner().map_err(|e| io_err("writing", tmp)(e.into_error()))?;
        if let Some((expected_digest, expected_size)) = expected {
            if size != expected_size {
                return Err(ImageError::SizeMismatch {
                    what: source.what.to_string(),
                    source_name: source.source_name.to_string(),
                    expected: expected_size,
                    actual: size,
                });
            }
            if &digest != expected_digest {
                return Err(ImageError::DigestMismatch {
                    what: source.what.to_string(),
                    source_name: source.source_name.to_string(),
                    expected: expected_digest.clone(),
                    actual: digest,
                });
            }
        }
        file.sync_all().map_err(io_err("syncing", tmp))?;
        drop(file);
        let dest = self.blob_path(&digest);
        fs::rename(tmp, &dest).map_err(io_err("storing blob", &dest))?;
        Ok((digest, size))
    }

    /// Stores bytes already in memory (manifests and configs), verifying `expected` when given.
    pub fn ingest_bytes(
        &self,
        bytes: &[u8],
        expected: Option<&Digest>,
        source: &BlobSource<'_>,
    ) -> Result<Digest> {
        let expected = expected.map(|d| (d, bytes.len() as u64));
        if let Some((d, size)) = expected {
            if self.has_blob(d, size) {
                // Still verify what we were handed.
                let actual = Digest::of(bytes);
                if &actual != d {
                    return Err(ImageError::DigestMismatch {
                        what: source.what.to_string(),
                        source_name: source.source_name.to_string(),
                        expected: d.clone(),
                        actual,
                    });
                }
                return Ok(d.clone());
            }
        }
        Ok(self.ingest(&mut &bytes[..], expected, source, &mut |_| {})?.0)
    }

    fn index_path(&self) -> PathBuf {
        self.dir.join("index.json")
    }

    /// Reads the index (a consistent snapshot: the file is only ever replaced by rename).
    pub fn read_index(&self) -> Result<StoreIndex> {
        let path = self.index_path();
        match fs::read(&path) {
            Ok(bytes) => {
                let index: StoreIndex = serde_json::from_slice(&bytes)
                    .map_err(json_err(format!("image index {}", path.display())))?;
                if index.version != INDEX_VERSION {
                    return Err(ImageError::Unsupported {
                        what: "image index version",
                        detail: format!(
                            "{} in {} (this kiln reads {INDEX_VERSION})",
                            index.version,
                            path.display()
                        ),
                    });
                }
                Ok(index)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Ok(StoreIndex { version: INDEX_VERSION, ..Default::default() })
            }
            Err(e) => Err(io_err("reading", path)(e)),
        }
    }

    /// Read-modify-write of the index under its exclusive lock; the closure's result is returned.
    pub fn update_index<T>(&self, change: impl FnOnce(&mut StoreIndex) -> Result<T>) -> Result<T> {
        let _lock = lock_file(&self.dir.join("index.lock"), true)?;
        let mut index = self.read_index()?;
        let out = change(&mut index)?;
        let bytes = serde_json::to_vec_pretty(&index).map_err(json_err("image index"))?;
        write_atomic(&self.index_path(), &bytes)?;
        Ok(out)
    }

    /// Held (shared) while blobs are being added or read, so `prune` never removes them underneath.
    pub fn use_lock(&self) -> Result<LockGuard> {
        lock_file(&self.dir.join("gc.lock"), false)
    }

    /// Removes every blob no image references, leftovers in `tmp/`, and derived caches (rootfs
    /// images, kernels) of images no longer present. Waits for running pulls/builds to finish.
    pub fn prune(&self) -> Result<PruneReport> {
        self.prune_keeping(None)
    }

    /// [`Store::prune`], and with `rootfs_variants` also the root filesystem caches of present
    /// images whose variant (`RootfsOptions::cache_variant`) is not in the list: builds for an
    /// earlier agent, say. VM disks are copies, so no VM needs a cache file.
    pub fn prune_keeping(&self, rootfs_variants: Option<&[String]>) -> Result<PruneReport> {
        let _gc = lock_file(&self.dir.join("gc.lock"), true)?;
        let index = self.read_index()?;
        let live: BTreeSet<&str> = index.images.values().flat_map(|r| r.blobs()).map(|d| d.hex()).collect();
        let live_ids: BTreeSet<&str> = index.images.values().map(|r| r.id().hex()).collect();
        let mut report = PruneReport::default();
        let blobs = self.dir.join("blobs/sha256");
        for entry in fs::read_dir(&blobs).map_err(io_err("listing", &blobs))? {
            let entry = entry.map_err(io_err("listing", &blobs))?;
            let name = entry.file_name();
            if !live.contains(name.to_string_lossy().as_ref()) {
                report.bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
                remove_any(&entry.path())?;
                report.blobs += 1;
            }
        }
        let tmp = self.tmp_dir();
        for entry in fs::read_dir(&tmp).map_err(io_err("listing", &tmp))? {
            let entry = entry.map_err(io_err("listing", &tmp))?;
            remove_any(&entry.path())?;
        }
        for cache in ["rootfs", "kernels"] {
            let dir = self.dir.join(cache);
            for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
                let entry = entry.map_err(io_err("listing", &dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                // Cache entries are named `<image id hex>` or `<image id hex>-<variant>...`.
                let id = name.split(['-', '.']).next().unwrap_or("");
                let stale_variant = cache == "rootfs"
                    && rootfs_variants.is_some_and(|keep| {
                        let variant = name
                            .strip_suffix(".ext4")
                            .or_else(|| name.strip_suffix(".lock"))
                            .and_then(|stem| stem.split_once('-'))
                            .map(|(_, variant)| variant);
                        variant.is_some_and(|v| !keep.iter().any(|k| k == v))
                    });
                if !live_ids.contains(id) || stale_variant {
                    report.bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
                    remove_any(&entry.path())?;
                    report.caches += 1;
                }
            }
        }
        Ok(report)
    }
}

/// What `prune` removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// Images removed because no name pointed at them (only `ImageStore::prune` removes those).
    pub images: usize,
    pub blobs: usize,
    pub caches: usize,
    /// Bytes freed by blobs and cache files (directories count as their entry size only).
    pub bytes: u64,
}

/// Removes a file or a whole directory tree.
pub(crate) fn remove_any(path: &Path) -> Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("inspecting", path)(e)),
    };
    let result = if meta.is_dir() { fs::remove_dir_all(path) } else { fs::remove_file(path) };
    match result {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("removing", path)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src() -> BlobSource<'static> {
        BlobSource { what: "test blob", source_name: "unit test" }
    }

    #[test]
    fn ingest_verifies_digest_and_size_and_leaves_nothing_on_mismatch() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let good = Digest::of(b"payload");
        let (d, n) = store.ingest(&mut &b"payload"[..], Some((&good, 7)), &src(), &mut |_| {}).unwrap();
        assert_eq!((d.clone(), n), (good.clone(), 7));
        assert_eq!(fs::read(store.blob_path(&good)).unwrap(), b"payload");

        let wrong = Digest::of(b"other");
        let err = store.ingest(&mut &b"payload"[..], Some((&wrong, 7)), &src(), &mut |_| {}).unwrap_err();
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
        assert!(err.to_string().contains("unit test"), "{err}");
        assert!(!store.blob_path(&wrong).exists());
        let err = store.ingest(&mut &b"payload+more"[..], Some((&good, 7)), &src(), &mut |_| {}).unwrap_err();
        assert!(matches!(err, ImageError::SizeMismatch { .. }), "{err}");
        let err = store.ingest(&mut &b"pay"[..], Some((&good, 7)), &src(), &mut |_| {}).unwrap_err();
        assert!(matches!(err, ImageError::SizeMismatch { actual: 3, .. }), "{err}");
        assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0, "temp files left behind");
    }

    #[test]
    fn concurrent_index_updates_are_not_lost() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        std::thread::scope(|scope| {
            for t in 0..8 {
                let store = store.clone();
                scope.spawn(move || {
                    for i in 0..10 {
                        store
                            .update_index(|idx| {
                                idx.refs.insert(format!("r{t}-{i}"), Digest::of(b"x"));
                                Ok(())
                            })
                            .unwrap();
                    }
                });
            }
        });
        assert_eq!(store.read_index().unwrap().refs.len(), 80);
    }

    #[test]
    fn index_updates_are_atomic_and_prune_keeps_referenced_blobs() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let blob = |b: &[u8]| store.ingest_bytes(b, None, &src()).unwrap();
        let desc = |d: Digest, n: usize| Descriptor::new("x", d, n as u64);
        let record = ImageRecord {
            manifest: desc(blob(b"manifest"), 8),
            index_digest: None,
            config: desc(blob(b"config"), 6),
            layers: vec![desc(blob(b"layer"), 5)],
            os: "linux".into(),
            architecture: "amd64".into(),
            added_at: 0,
        };
        let orphan = blob(b"orphan");
        store
            .update_index(|idx| {
                idx.refs.insert("r".into(), record.manifest.digest.clone());
                idx.images.insert(record.manifest.digest.clone(), record.clone());
                Ok(())
            })
            .unwrap();
        fs::write(store.dir().join("rootfs").join(format!("{}-64m.ext4", record.id().hex())), b"x").unwrap();
        fs::write(store.dir().join("rootfs").join(format!("{}-64m.ext4", orphan.hex())), b"x").unwrap();
        let report = store.prune().unwrap();
        assert_eq!((report.blobs, report.caches), (1, 1));
        assert!(!store.blob_path(&orphan).exists());
        for d in record.blobs() {
            assert!(store.blob_path(d).exists());
        }
        assert_eq!(store.read_index().unwrap().images.len(), 1);
    }
}
