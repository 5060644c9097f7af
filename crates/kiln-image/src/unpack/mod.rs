//! Applies image layers, in order, to a staging directory: regular files, directories, symlinks,
//! hardlinks, device nodes and FIFOs, modes, ownership, times and xattrs; whiteouts (`.wh.NAME`) and
//! opaque directories (`.wh..wh..opq`) remove what lower layers put there.
//!
//! A tar entry's path is never trusted: absolute paths and `..` components are refused, parents are
//! resolved inside the staging root with [`root::RootDir`] (symlinks followed within the root, escapes
//! refused), files are created with `O_NOFOLLOW | O_EXCL` relative to their parent's fd, and a hardlink's
//! target must resolve inside the root too. Nothing outside the staging directory is ever written.
//!
//! Without root privileges ownership and device nodes cannot be created on the host; they are recorded
//! in [`UnpackReport::fixups`] and applied to the ext4 image afterwards (see `rootfs`).

pub mod root;
mod zstd;

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::mpsc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timestamps};
use rustix::io::Errno;
use tar::EntryType;

use crate::digest::{Digest, HashingReader};
use crate::error::{io_err, ImageError, Result};
use root::{archive_path_components, join, list_dir, open_dir_at, remove_tree_at, ResolveError, RootDir};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_WHITEOUT: &[u8] = b".wh..wh..opq";

/// How to unpack.
#[derive(Clone, Debug)]
pub struct UnpackOptions {
    /// Set owners and create device nodes on the host (needs root). Default: when running as root.
    pub privileged: bool,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions { privileged: rustix::process::geteuid().is_root() }
    }
}

/// Something the host could not do unprivileged, to apply inside the filesystem image instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fixup {
    /// Set the owner of `path` (relative to the root, `/`-separated).
    Owner { path: Vec<u8>, uid: u32, gid: u32 },
    /// Create a device node or FIFO.
    Node { path: Vec<u8>, kind: NodeKind, major: u32, minor: u32, mode: u32, uid: u32, gid: u32 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    Char,
    Block,
    Fifo,
}

/// What unpacking produced besides the files.
#[derive(Clone, Debug, Default)]
pub struct UnpackReport {
    /// Entries written, over all layers.
    pub entries: u64,
    /// Bytes of regular file content written.
    pub bytes: u64,
    /// Ownership and nodes the host could not apply (empty when privileged).
    pub fixups: Vec<Fixup>,
}

/// A layer to apply: where its (compressed or not) tar is, and the digest of its uncompressed tar.
pub struct LayerSource<'a> {
    pub path: &'a Path,
    /// For messages (`sha256:...` or `layer 2/5`).
    pub name: String,
    /// The config's `diff_id`; checked after the layer is applied when given.
    pub diff_id: Option<&'a Digest>,
}

/// Applies layers in order into `staging` (an existing, normally empty directory).
pub fn unpack_layers(
    staging: &Path,
    layers: &[LayerSource<'_>],
    options: &UnpackOptions,
    mut on_layer: impl FnMut(usize),
) -> Result<UnpackReport> {
    let root = RootDir::open(staging).map_err(io_err("opening staging directory", staging))?;
    let mut state = Unpacker {
        root: &root,
        options,
        dirs: BTreeMap::new(),
        fixups: BTreeMap::new(),
        report: UnpackReport::default(),
    };
    for (i, layer) in layers.iter().enumerate() {
        on_layer(i);
        let file = File::open(layer.path).map_err(io_err("opening layer", layer.path))?;
        state.apply_layer(file, layer)?;
    }
    state.finish()
}

/// Removes a staging directory tree, also one whose directories lack write permission (unprivileged
/// unpacks keep image modes like 0555).
pub fn remove_staging(path: &Path) -> Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(());
    };
    let parent_fd =
        rustix::fs::open(parent, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| io_err("opening", parent)(e.into()))?;
    remove_tree_at(&parent_fd, name, true).map_err(|e| io_err("removing", path)(e.into()))
}

/// Directory metadata applied after all layers (writing into a directory changes its mtime, and an
/// unprivileged unpack needs write access to directories until the end).
#[derive(Clone, Copy, Debug)]
struct DirMeta {
    mode: u32,
    mtime: u64,
}

struct Unpacker<'a> {
    root: &'a RootDir,
    options: &'a UnpackOptions,
    dirs: BTreeMap<Vec<u8>, DirMeta>,
    fixups: BTreeMap<Vec<u8>, Fixup>,
    report: UnpackReport,
}

/// Opens a layer blob, sniffing its compression (stores and `docker save` disagree with media types).
fn decompressed(file: File, layer: &str) -> Result<Box<dyn Read + Send>> {
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let magic = reader.fill_buf().map_err(io_err("reading layer", layer))?;
    if magic.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(reader)))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(zstd::ZstdFrames::new(reader)))
    } else {
        Ok(Box::new(reader))
    }
}

impl Unpacker<'_> {
    fn unsafe_entry(&self, layer: &LayerSource<'_>, entry: &[u8], reason: impl Into<String>) -> ImageError {
        ImageError::UnsafeEntry {
            layer: layer.name.clone(),
            entry: String::from_utf8_lossy(entry).into_owned(),
            reason: reason.into(),
        }
    }

    /// Decompresses and hashes on a second thread while this one writes files (both are CPU-bound:
    /// on two cores this takes a third off a 100 MB image), then checks the `diff_id`.
    fn apply_layer(&mut self, file: File, layer: &LayerSource<'_>) -> Result<()> {
        let source = decompressed(file, &layer.name)?;
        let (digest, applied) = std::thread::scope(|scope| {
            let (tx, rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(8);
            let producer = scope.spawn(move || {
                let mut hashing = HashingReader::new(source);
                loop {
                    let mut chunk = vec![0u8; READ_AHEAD_CHUNK];
                    match hashing.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => {
                            chunk.truncate(n);
                            if tx.send(Ok(chunk)).is_err() {
                                return None; // The consumer stopped on an error.
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return None;
                        }
                    }
                }
                hashing.finish().ok()
            });
            let mut reader = ChannelReader { rx, chunk: Vec::new(), pos: 0 };
            let applied = self.apply_entries(&mut reader, layer).and_then(|()| {
                // Tar archives end before their padding; the digest covers all of it.
                io::copy(&mut reader, &mut io::sink()).map(drop).map_err(|e| read_error(layer, e))
            });
            drop(reader);
            (producer.join().ok().flatten(), applied)
        });
        applied?;
        let digest = digest.ok_or_else(|| read_error(layer, io::Error::other("decompression stopped")))?;
        if let Some(expected) = layer.diff_id {
            crate::pull::check_digest(
                expected,
                &digest,
                &format!("uncompressed layer {}", layer.name),
                "the image config's diff_ids",
            )?;
        }
        Ok(())
    }

    fn apply_entries(&mut self, reader: &mut dyn Read, layer: &LayerSource<'_>) -> Result<()> {
        let mut archive = tar::Archive::new(reader);
        let read_err = |source: io::Error| read_error(layer, source);
        // Paths written by this layer: whiteouts only hide what lower layers wrote.
        let mut written: HashSet<Vec<u8>> = HashSet::new();
        for entry in archive.entries().map_err(read_err)? {
            let mut entry = entry.map_err(read_err)?;
            let raw_path = entry.path_bytes().into_owned();
            let components =
                archive_path_components(&raw_path).map_err(|r| self.unsafe_entry(layer, &raw_path, r))?;
            let kind = entry.header().entry_type();
            if matches!(
                kind,
                EntryType::XGlobalHeader
                    | EntryType::XHeader
                    | EntryType::GNULongName
                    | EntryType::GNULongLink
            ) {
                continue;
            }
            let Some(name) = components.last() else {
                // The root directory itself ("./").
                if kind.is_dir() {
                    self.dirs.insert(
                        Vec::new(),
                        DirMeta { mode: header_mode(&entry), mtime: header_mtime(&entry) },
                    );
                    self.owner(&entry, Vec::new(), None)?;
                }
                continue;
            };
            let key = join(&components);
            if name.as_bytes().starts_with(WHITEOUT_PREFIX) {
                self.whiteout(&components, &written, layer, &raw_path)?;
                continue;
            }
            self.apply_entry(&mut entry, &components, &key, layer, &raw_path)?;
            written.insert(key);
            self.report.entries += 1;
        }
        Ok(())
    }

    fn resolve_parent(
        &self,
        components: &[OsString],
        create: bool,
        layer: &LayerSource<'_>,
        raw: &[u8],
    ) -> Result<Option<(OwnedFd, OsString)>> {
        match self.root.resolve_parent(components, create) {
            Ok(found) => Ok(Some(found)),
            Err(ResolveError::NotFound) if !create => Ok(None),
            Err(ResolveError::Io(e)) => {
                Err(io_err("unpacking into", self.root.path().join(OsStr::from_bytes(raw)))(e))
            }
            Err(e) => Err(self.unsafe_entry(layer, raw, e.to_string())),
        }
    }

    fn whiteout(
        &mut self,
        components: &[OsString],
        written: &HashSet<Vec<u8>>,
        layer: &LayerSource<'_>,
        raw: &[u8],
    ) -> Result<()> {
        let (parents, name) = components.split_at(components.len() - 1);
        let name = name[0].as_bytes();
        let Ok(parent) = self.root.resolve_dir(parents, false) else {
            return Ok(()); // Nothing below to hide.
        };
        let parent_key = join(parents);
        let errno = |e: Errno| {
            io_err("applying whiteout in", self.root.path().join(OsStr::from_bytes(&parent_key)))(e.into())
        };
        if name == OPAQUE_WHITEOUT {
            self.clear_opaque(&parent, &parent_key, written).map_err(errno)?;
            return Ok(());
        }
        let target = &name[WHITEOUT_PREFIX.len()..];
        if target.is_empty() || target == b"." || target == b".." || target.starts_with(WHITEOUT_PREFIX) {
            return Err(self.unsafe_entry(layer, raw, "malformed whiteout name"));
        }
        let key = child_key(&parent_key, target);
        if !written.contains(&key) {
            remove_tree_at(&parent, OsStr::from_bytes(target), !self.options.privileged).map_err(errno)?;
            self.forget(&key);
        }
        Ok(())
    }

    /// Removes everything in `dir` that this layer did not write (recursing into directories it did).
    fn clear_opaque(
        &mut self,
        dir: &OwnedFd,
        dir_key: &[u8],
        written: &HashSet<Vec<u8>>,
    ) -> Result<(), Errno> {
        for name in list_dir(dir)? {
            let key = child_key(dir_key, name.as_bytes());
            if !written.contains(&key) {
                remove_tree_at(dir, &name, !self.options.privileged)?;
                self.forget(&key);
            } else if is_dir_at(dir, &name) {
                let child = open_dir_at(dir, &name)?;
                self.clear_opaque(&child, &key, written)?;
            }
        }
        Ok(())
    }

    /// Drops deferred metadata for a removed path and everything below it.
    fn forget(&mut self, key: &[u8]) {
        remove_subtree(&mut self.dirs, key);
        remove_subtree(&mut self.fixups, key);
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        components: &[OsString],
        key: &[u8],
        layer: &LayerSource<'_>,
        raw: &[u8],
    ) -> Result<()> {
        let kind = entry.header().entry_type();
        let Some((parent, name)) = self.resolve_parent(components, true, layer, raw)? else {
            return Ok(());
        };
        let host_path = self.root.path().join(OsStr::from_bytes(raw));
        let errno = |action: &'static str| {
            let host_path = host_path.clone();
            move |e: Errno| io_err(action, host_path)(e.into())
        };
        let existing = match rustix::fs::statat(&parent, &name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(s) => Some(FileType::from_raw_mode(s.st_mode)),
            Err(Errno::NOENT) => None,
            Err(e) => return Err(errno("inspecting")(e)),
        };
        let mode = header_mode(entry);
        let xattrs = pax_xattrs(entry);
        if kind.is_dir() {
            if existing != Some(FileType::Directory) {
                if existing.is_some() {
                    remove_tree_at(&parent, &name, !self.options.privileged).map_err(errno("replacing"))?;
                    self.forget(key);
                }
                rustix::fs::mkdirat(&parent, &name, Mode::from_raw_mode(0o700))
                    .map_err(errno("creating directory"))?;
            }
            self.dirs.insert(key.to_vec(), DirMeta { mode, mtime: header_mtime(entry) });
            let dir = open_dir_at(&parent, &name).map_err(errno("opening directory"))?;
            set_xattrs(&dir, &xattrs, self.options.privileged);
            return self.owner(entry, key.to_vec(), Some((&parent, &name)));
        }
        if existing.is_some() {
            remove_tree_at(&parent, &name, !self.options.privileged).map_err(errno("replacing"))?;
            self.forget(key);
        }
        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let fd = rustix::fs::openat(
                    &parent,
                    &name,
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(errno("creating"))?;
                let mut file = File::from(fd);
                let n = io::copy(entry, &mut file).map_err(|e| ImageError::Malformed {
                    what: format!("layer {}", layer.name),
                    detail: format!("reading {:?}: {e}", String::from_utf8_lossy(raw)),
                })?;
                self.report.bytes += n;
                set_xattrs(&file, &xattrs, self.options.privileged);
                self.owner(entry, key.to_vec(), Some((&parent, &name)))?;
                // After chown, which clears set-id bits.
                rustix::fs::fchmod(&file, Mode::from_raw_mode(mode)).map_err(errno("setting mode of"))?;
                set_mtime(&parent, &name, header_mtime(entry));
            }
            EntryType::Symlink => {
                let target = entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                if target.is_empty() || target.contains(&0) {
                    return Err(self.unsafe_entry(layer, raw, "symlink with an empty or NUL target"));
                }
                // The target is stored as is: it is only ever interpreted inside the root (by the
                // resolver here, by the guest's kernel later).
                rustix::fs::symlinkat(OsStr::from_bytes(&target), &parent, &name)
                    .map_err(errno("creating symlink"))?;
                self.owner(entry, key.to_vec(), Some((&parent, &name)))?;
                set_mtime(&parent, &name, header_mtime(entry));
            }
            EntryType::Link => {
                let target = entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                let target_components = archive_path_components(&target).map_err(|r| {
                    self.unsafe_entry(
                        layer,
                        raw,
                        format!("hardlink target {:?}: {r}", String::from_utf8_lossy(&target)),
                    )
                })?;
                if target_components.is_empty() {
                    return Err(self.unsafe_entry(layer, raw, "hardlink to the root directory"));
                }
                let (target_parent, target_name) =
                    self.root.resolve_parent(&target_components, false).map_err(|e| {
                        self.unsafe_entry(
                            layer,
                            raw,
                            format!("hardlink target {:?}: {e}", String::from_utf8_lossy(&target)),
                        )
                    })?;
                match rustix::fs::statat(&target_parent, &target_name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(s) if FileType::from_raw_mode(s.st_mode) == FileType::Directory => {
                        return Err(self.unsafe_entry(layer, raw, "hardlink to a directory"));
                    }
                    Ok(_) => {}
                    Err(_) => {
                        return Err(self.unsafe_entry(
                            layer,
                            raw,
                            format!(
                                "hardlink target {:?} does not exist in the image",
                                String::from_utf8_lossy(&target)
                            ),
                        ))
                    }
                }
                // No AT_SYMLINK_FOLLOW: a symlink target is linked itself, never followed.
                rustix::fs::linkat(&target_parent, &target_name, &parent, &name, AtFlags::empty())
                    .map_err(errno("creating hardlink"))?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let node = match kind {
                    EntryType::Char => NodeKind::Char,
                    EntryType::Block => NodeKind::Block,
                    _ => NodeKind::Fifo,
                };
                let major = entry.header().device_major().ok().flatten().unwrap_or(0);
                let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
                if self.options.privileged || node == NodeKind::Fifo {
                    let file_type = match node {
                        NodeKind::Char => FileType::CharacterDevice,
                        NodeKind::Block => FileType::BlockDevice,
                        NodeKind::Fifo => FileType::Fifo,
                    };
                    rustix::fs::mknodat(
                        &parent,
                        &name,
                        file_type,
                        Mode::from_raw_mode(0o600),
                        rustix::fs::makedev(major, minor),
                    )
                    .map_err(errno("creating device node"))?;
                    self.owner(entry, key.to_vec(), Some((&parent, &name)))?;
                    rustix::fs::chmodat(&parent, &name, Mode::from_raw_mode(mode), AtFlags::empty())
                        .map_err(errno("setting mode of"))?;
                } else {
                    let (uid, gid) = header_owner(entry);
                    self.fixups.insert(
                        key.to_vec(),
                        Fixup::Node { path: key.to_vec(), kind: node, major, minor, mode, uid, gid },
                    );
                }
            }
            other => {
                tracing::warn!(
                    "layer {}: skipping {:?} of unsupported tar type {other:?}",
                    layer.name,
                    String::from_utf8_lossy(raw)
                );
            }
        }
        Ok(())
    }

    /// Sets the owner from the header (privileged) or records it as a fixup.
    fn owner<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        key: Vec<u8>,
        at: Option<(&OwnedFd, &OsString)>,
    ) -> Result<()> {
        let (uid, gid) = header_owner(entry);
        if !self.options.privileged {
            self.fixups.insert(key.clone(), Fixup::Owner { path: key, uid, gid });
            return Ok(());
        }
        let result = match at {
            Some((parent, name)) => rustix::fs::chownat(
                parent,
                name,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            ),
            None => rustix::fs::fchown(
                self.root.fd(),
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            ),
        };
        result.map_err(|e| {
            io_err("setting owner of", self.root.path().join(OsStr::from_bytes(&key_or_root(&key))))(e.into())
        })
    }

    /// Applies deferred directory metadata (deepest first) and returns the report.
    fn finish(mut self) -> Result<UnpackReport> {
        for (key, meta) in self.dirs.iter().rev() {
            let target = if key.is_empty() {
                self.root.fd().try_clone().map_err(io_err("opening", self.root.path()))?
            } else {
                let components = archive_path_components(key).unwrap_or_default();
                let Ok((parent, name)) = self.root.resolve_parent(&components, false) else { continue };
                match rustix::fs::statat(&parent, &name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(s) if FileType::from_raw_mode(s.st_mode) == FileType::Directory => {}
                    _ => continue,
                }
                let Ok(dir) = open_dir_at(&parent, &name) else { continue };
                dir
            };
            let path = self.root.path().join(OsStr::from_bytes(key));
            rustix::fs::fchmod(&target, Mode::from_raw_mode(meta.mode))
                .map_err(|e| io_err("setting mode of", &path)(e.into()))?;
            let _ = rustix::fs::futimens(&target, &timestamps(meta.mtime));
        }
        self.report.fixups = std::mem::take(&mut self.fixups).into_values().collect();
        Ok(self.report)
    }
}

/// Removes `key` and every `key/...` from a map ordered by path bytes.
fn remove_subtree<V>(map: &mut BTreeMap<Vec<u8>, V>, key: &[u8]) {
    let mut below = key.to_vec();
    below.push(b'/');
    let doomed: Vec<Vec<u8>> = map
        .range(key.to_vec()..)
        .map(|(k, _)| k)
        .take_while(|k| k.as_slice() == key || k.starts_with(&below) || k.starts_with(key))
        .filter(|k| k.as_slice() == key || k.starts_with(&below))
        .cloned()
        .collect();
    for k in doomed {
        map.remove(&k);
    }
}

const READ_AHEAD_CHUNK: usize = 256 * 1024;

fn read_error(layer: &LayerSource<'_>, source: io::Error) -> ImageError {
    ImageError::Malformed {
        what: format!("layer {}", layer.name),
        detail: format!("not a readable tar archive: {source}"),
    }
}

/// Reads the chunks the decompression thread sends.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0), // The sender finished: end of stream.
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn key_or_root(key: &[u8]) -> Vec<u8> {
    if key.is_empty() {
        b".".to_vec()
    } else {
        key.to_vec()
    }
}

fn child_key(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut key = parent.to_vec();
    if !key.is_empty() {
        key.push(b'/');
    }
    key.extend_from_slice(name);
    key
}

/// True when `name` in `dir` is a directory (not a link to one).
pub(crate) fn is_dir_at(dir: &OwnedFd, name: &OsStr) -> bool {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|s| FileType::from_raw_mode(s.st_mode) == FileType::Directory)
}

fn header_mode<R: Read>(entry: &tar::Entry<'_, R>) -> u32 {
    entry.header().mode().unwrap_or(0o644) & 0o7777
}

fn header_mtime<R: Read>(entry: &tar::Entry<'_, R>) -> u64 {
    entry.header().mtime().unwrap_or(0)
}

fn header_owner<R: Read>(entry: &tar::Entry<'_, R>) -> (u32, u32) {
    let h = entry.header();
    let clamp = |v: io::Result<u64>| u32::try_from(v.unwrap_or(0)).unwrap_or(0);
    (clamp(h.uid()), clamp(h.gid()))
}

fn timestamps(mtime: u64) -> Timestamps {
    let t = rustix::fs::Timespec { tv_sec: i64::try_from(mtime).unwrap_or(0), tv_nsec: 0 };
    Timestamps { last_access: t, last_modification: t }
}

fn set_mtime(parent: &OwnedFd, name: &OsStr, mtime: u64) {
    let _ = rustix::fs::utimensat(parent, name, &timestamps(mtime), AtFlags::SYMLINK_NOFOLLOW);
}

/// `SCHILY.xattr.NAME` PAX records of an entry.
fn pax_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> Vec<(Vec<u8>, Vec<u8>)> {
    let Ok(Some(extensions)) = entry.pax_extensions() else { return Vec::new() };
    extensions
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.key_bytes().strip_prefix(b"SCHILY.xattr.")?.to_vec();
            Some((name, e.value_bytes().to_vec()))
        })
        .collect()
}

/// Sets xattrs; without privileges only `user.*` can be set, others are dropped with a debug log.
fn set_xattrs(fd: &impl std::os::fd::AsFd, xattrs: &[(Vec<u8>, Vec<u8>)], privileged: bool) {
    for (name, value) in xattrs {
        if name.contains(&0) || (!privileged && !name.starts_with(b"user.")) {
            continue;
        }
        if let Err(e) =
            rustix::fs::fsetxattr(fd, OsStr::from_bytes(name), value, rustix::fs::XattrFlags::empty())
        {
            tracing::debug!("xattr {:?} not set: {e}", String::from_utf8_lossy(name));
        }
    }
}
