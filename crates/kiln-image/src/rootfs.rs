//! A staging directory → an ext4 image file, with `mkfs.ext4 -d` (e2fsprogs): no mounting, no root.
//! Ownership and device nodes an unprivileged unpack could not create are then set inside the image
//! with `debugfs -w`.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{io_err, ImageError, Result};
use crate::unpack::is_dir_at;
use crate::unpack::root::{archive_path_components, RootDir};
use crate::unpack::{Fixup, NodeKind, UnpackOptions};

const BLOCK: u64 = 4096;
const INODE_SIZE: u64 = 256;
const MIB: u64 = 1 << 20;

/// How root filesystem images are sized and built.
#[derive(Clone, Debug)]
pub struct RootfsOptions {
    /// Free space added on top of the content (the guest's writable space until its copy is grown).
    pub headroom_bytes: u64,
    /// Extra free space as a percentage of the content.
    pub headroom_percent: u64,
    pub unpack: UnpackOptions,
    /// Host files added on top of the image's layers (Kiln's guest agent), owned by root.
    pub added_files: Vec<AddedFile>,
}

/// A host file put into every root filesystem built with these options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddedFile {
    /// Absolute path in the guest, e.g. `/sbin/kiln-agent`. Symlinks on the way are followed inside
    /// the root (an image's merged-/usr `/sbin -> usr/sbin` puts it in `/usr/sbin`); what is at the
    /// path is replaced.
    pub guest_path: String,
    /// The file on the host.
    pub source: PathBuf,
    /// Permission bits.
    pub mode: u32,
}

impl Default for RootfsOptions {
    fn default() -> Self {
        RootfsOptions {
            headroom_bytes: 64 * MIB,
            headroom_percent: 10,
            unpack: UnpackOptions::default(),
            added_files: Vec::new(),
        }
    }
}

impl RootfsOptions {
    /// The part of a cache file name that tells builds with different options apart. Added files
    /// count by path, mode and the source's identity and modification time (not a hash of the
    /// content: hashing the agent on every `kiln run` would cost more than the cache saves).
    pub fn cache_variant(&self) -> String {
        use sha2::Digest as _;
        let mut variant = format!(
            "h{}m-p{}-{}",
            self.headroom_bytes / MIB,
            self.headroom_percent,
            if self.unpack.privileged { "root" } else { "user" }
        );
        if !self.added_files.is_empty() {
            let mut hasher = sha2::Sha256::new();
            for f in &self.added_files {
                let stamp = fs::metadata(&f.source)
                    .map(|m| format!("{}:{}:{}:{}.{}", m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
                    .unwrap_or_else(|e| format!("unreadable: {e}"));
                hasher.update(format!("{}\0{:o}\0{}\0{stamp}\n", f.guest_path, f.mode, f.source.display()));
            }
            let hash: String = hasher.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect();
            variant.push_str("-f");
            variant.push_str(&hash);
        }
        variant
    }
}

/// Puts `files` into the unpacked root `staging`. Unprivileged builds get owner fixups (root) for
/// the image; privileged ones create the files as root already.
pub fn add_files(
    staging: &Path,
    files: &[AddedFile],
    privileged: bool,
    fixups: &mut Vec<Fixup>,
) -> Result<()> {
    use rustix::fs::{AtFlags, Mode, OFlags};
    use std::os::fd::OwnedFd;
    let root = RootDir::open(staging).map_err(io_err("opening staging directory", staging))?;
    for file in files {
        let unsafe_path = |reason: String| ImageError::Unsupported {
            what: "added file",
            detail: format!("{}: {reason}", file.guest_path),
        };
        let relative = file.guest_path.strip_prefix('/').ok_or_else(|| unsafe_path("not absolute".into()))?;
        let components =
            archive_path_components(relative.as_bytes()).map_err(|reason| unsafe_path(reason.to_string()))?;
        if components.is_empty() {
            return Err(unsafe_path("not a file path".into()));
        }
        let (dir, name) = root.resolve_parent(&components, true).map_err(|e| unsafe_path(e.to_string()))?;
        if is_dir_at(&dir, &name) {
            return Err(unsafe_path("the image has a directory there".into()));
        }
        match rustix::fs::unlinkat(&dir, &name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(unsafe_path(format!("removing what the image has there: {e}"))),
        }
        let fd: OwnedFd = rustix::fs::openat(
            &dir,
            &name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(file.mode & 0o7777),
        )
        .map_err(|e| unsafe_path(format!("creating it: {e}")))?;
        let mut dest = File::from(fd);
        let mut source = File::open(&file.source).map_err(io_err("reading", &file.source))?;
        std::io::copy(&mut source, &mut dest).map_err(io_err("copying", &file.source))?;
        // The umask may have taken bits off.
        rustix::fs::fchmod(&dest, Mode::from_raw_mode(file.mode & 0o7777))
            .map_err(|e| unsafe_path(format!("setting its mode: {e}")))?;
        if !privileged {
            fixups.push(Fixup::Owner { path: relative.as_bytes().to_vec(), uid: 0, gid: 0 });
        }
    }
    Ok(())
}

/// What the content of a directory tree needs on ext4 (4 KiB blocks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContentSize {
    /// Data and directory blocks, in bytes.
    pub bytes: u64,
    /// Files, directories, links and nodes.
    pub inodes: u64,
}

/// Walks `dir` (never following symlinks) and adds up what its content needs on ext4.
pub fn content_size(dir: &Path) -> Result<ContentSize> {
    let mut size = ContentSize { bytes: BLOCK, inodes: 1 };
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let mut dir_bytes = 0u64;
        for entry in fs::read_dir(&d).map_err(io_err("listing", &d))? {
            let entry = entry.map_err(io_err("listing", &d))?;
            let meta = entry.metadata().map_err(io_err("inspecting", entry.path()))?;
            dir_bytes += 12 + entry.file_name().len() as u64;
            if meta.is_dir() {
                pending.push(entry.path());
                size.inodes += 1;
                continue;
            }
            // Hardlinks share an inode and its blocks: count them once.
            if meta.nlink() > 1 && !meta.is_dir() {
                size.bytes += round_up(meta.len(), BLOCK) / meta.nlink().max(1);
                size.inodes += 1;
                continue;
            }
            size.inodes += 1;
            if meta.file_type().is_symlink() {
                // Targets of 60 bytes or more need a block.
                if meta.len() >= 60 {
                    size.bytes += BLOCK;
                }
            } else {
                // Plus roughly one extent-tree block per 128 MiB.
                size.bytes += round_up(meta.len(), BLOCK) + meta.len() / (128 * MIB) * BLOCK;
            }
        }
        size.bytes += round_up(dir_bytes.max(1), BLOCK);
    }
    Ok(size)
}

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

/// The journal mke2fs creates for a filesystem of `blocks` 4 KiB blocks (ext2fs_default_journal_size).
fn journal_bytes(blocks: u64) -> u64 {
    let journal_blocks = match blocks {
        0..2048 => 0,
        2048..32768 => 1024,
        32768..262_144 => 4096,
        262_144..524_288 => 8192,
        524_288..4_194_304 => 16384,
        4_194_304..8_388_608 => 32768,
        _ => 65536,
    };
    journal_blocks * BLOCK
}

/// Image size and inode count for `content` with the options' headroom.
pub fn plan_size(content: ContentSize, options: &RootfsOptions) -> (u64, u64) {
    let inodes = (content.inodes * 2).max(4096);
    let base = content.bytes + inodes * INODE_SIZE;
    let with_headroom = base + base * options.headroom_percent / 100 + options.headroom_bytes;
    // Group descriptors, bitmaps, reserved GDT blocks for growth: a few percent plus a fixed part.
    let overhead = with_headroom / 32 + 4 * MIB;
    let size = with_headroom + overhead;
    let size = size + journal_bytes(size / BLOCK);
    (round_up(size, MIB), inodes)
}

/// Builds an ext4 image of `staging` at `image` (created or replaced), sized for the content plus
/// headroom; then applies `fixups` inside it. Returns the image size.
pub fn build_ext4(staging: &Path, image: &Path, fixups: &[Fixup], options: &RootfsOptions) -> Result<u64> {
    let content = content_size(staging)?;
    let (mut size, inodes) = plan_size(content, options);
    for attempt in 0..2 {
        match mkfs(staging, image, size, inodes) {
            Ok(()) => break,
            // The estimate was too small (mke2fs says "Could not allocate block"): one retry, doubled.
            Err(ImageError::ToolFailed { stderr, .. }) if attempt == 0 && stderr.contains("allocate") => {
                tracing::warn!(
                    "ext4 image of {size} bytes too small for {}; retrying larger",
                    staging.display()
                );
                size *= 2;
            }
            Err(e) => return Err(e),
        }
    }
    apply_fixups(image, fixups)?;
    Ok(size)
}

fn mkfs(staging: &Path, image: &Path, size: u64, inodes: u64) -> Result<()> {
    let file = File::create(image).map_err(io_err("creating", image))?;
    file.set_len(size).map_err(io_err("sizing", image))?;
    drop(file);
    let mut command = Command::new("mkfs.ext4");
    command
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0", "-L", "kiln-rootfs"])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-E")
        .arg("root_owner=0:0")
        .arg("-d")
        .arg(staging)
        .arg(image);
    run_tool(command)
}

/// Runs an e2fsprogs tool, turning failure into an error that carries its stderr.
pub(crate) fn run_tool(mut command: Command) -> Result<()> {
    let shown = format!("{command:?}");
    let output = command.stdin(Stdio::null()).output().map_err(|source| ImageError::ToolMissing {
        command: command.get_program().to_string_lossy().into_owned(),
        source,
    })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(ImageError::ToolFailed {
            command: shown,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// Applies ownership and device nodes inside an ext4 image with one `debugfs -w` run.
pub fn apply_fixups(image: &Path, fixups: &[Fixup]) -> Result<()> {
    if fixups.is_empty() {
        return Ok(());
    }
    let mut script = Vec::new();
    for fixup in fixups {
        let (path, uid, gid) = match fixup {
            Fixup::Owner { path, uid, gid } => (path, uid, gid),
            Fixup::Node { path, kind, major, minor, mode, uid, gid } => {
                let (letter, type_bits) = match kind {
                    NodeKind::Char => ("c", 0o020000),
                    NodeKind::Block => ("b", 0o060000),
                    NodeKind::Fifo => ("p", 0o010000),
                };
                // debugfs's mknod takes a name in the current directory, not a path.
                let (parent, name) = match path.iter().rposition(|b| *b == b'/') {
                    Some(i) => (&path[..i], &path[i + 1..]),
                    None => (&path[..0], &path[..]),
                };
                writeln!(script, "cd {}", debugfs_quote(parent, "/")?).ok();
                let name = debugfs_quote(name, "")?;
                if *kind == NodeKind::Fifo {
                    writeln!(script, "mknod {name} p").ok();
                } else {
                    writeln!(script, "mknod {name} {letter} {major} {minor}").ok();
                }
                writeln!(script, "cd /").ok();
                let quoted = debugfs_quote(path, "/")?;
                writeln!(script, "sif {quoted} mode 0{:o}", type_bits | (mode & 0o7777)).ok();
                (path, uid, gid)
            }
        };
        let quoted = debugfs_quote(path, "/")?;
        writeln!(script, "sif {quoted} uid {uid}").ok();
        writeln!(script, "sif {quoted} gid {gid}").ok();
    }
    let script_path = image.with_extension("debugfs");
    fs::write(&script_path, &script).map_err(io_err("writing", &script_path))?;
    let output = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&script_path)
        .arg(image)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ImageError::ToolMissing { command: "debugfs".into(), source });
    let _ = fs::remove_file(&script_path);
    let output = output?;
    // debugfs exits 0 even when a command fails; its stderr has the banner and any errors.
    let errors: Vec<&str> = std::str::from_utf8(&output.stderr)
        .unwrap_or("")
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        // A path a later layer removed has nothing left to fix.
        .filter(|l| !l.contains("File not found by ext2_lookup"))
        .collect();
    if !output.status.success() || !errors.is_empty() {
        return Err(ImageError::ToolFailed {
            command: format!("debugfs -w -f <fixups> {}", image.display()),
            status: output.status.to_string(),
            stderr: errors.join("; "),
        });
    }
    Ok(())
}

/// `"{prefix}path"` for a debugfs command line; names debugfs cannot quote are refused.
fn debugfs_quote(path: &[u8], prefix: &str) -> Result<String> {
    if path.iter().any(|b| matches!(b, b'"' | b'\n' | b'\r' | b'\\')) || std::str::from_utf8(path).is_err() {
        return Err(ImageError::Unsupported {
            what: "file name for an unprivileged build",
            detail: format!(
                "{:?} cannot be passed to debugfs; build as root to keep its owner",
                OsStr::from_bytes(path)
            ),
        });
    }
    Ok(format!("\"{prefix}{}\"", String::from_utf8_lossy(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_files_follow_links_inside_the_root_and_replace_what_is_there() {
        use std::os::unix::fs::{symlink, PermissionsExt as _};
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join("root");
        fs::create_dir_all(staging.join("usr/sbin")).unwrap();
        fs::create_dir_all(staging.join("bin")).unwrap();
        // Merged /usr, absolute form: must resolve inside the root, not to the host's /usr/sbin.
        symlink("/usr/sbin", staging.join("sbin")).unwrap();
        // A link at the destination itself is replaced, never written through.
        let outside = dir.path().join("outside");
        fs::write(&outside, "host file").unwrap();
        symlink(&outside, staging.join("usr/sbin/kiln-agent")).unwrap();
        fs::write(staging.join("bin/tool"), "old").unwrap();
        let source = dir.path().join("agent");
        fs::write(&source, "agent bytes").unwrap();
        let files = vec![
            AddedFile { guest_path: "/sbin/kiln-agent".into(), source: source.clone(), mode: 0o755 },
            AddedFile { guest_path: "/bin/tool".into(), source: source.clone(), mode: 0o700 },
            AddedFile { guest_path: "/new/dir/file".into(), source: source.clone(), mode: 0o644 },
        ];
        let mut fixups = Vec::new();
        add_files(&staging, &files, false, &mut fixups).unwrap();
        let agent = staging.join("usr/sbin/kiln-agent");
        assert!(!fs::symlink_metadata(&agent).unwrap().file_type().is_symlink());
        assert_eq!(fs::read_to_string(&agent).unwrap(), "agent bytes");
        assert_eq!(fs::metadata(&agent).unwrap().permissions().mode() & 0o7777, 0o755);
        assert_eq!(fs::read_to_string(&outside).unwrap(), "host file");
        assert_eq!(fs::read_to_string(staging.join("bin/tool")).unwrap(), "agent bytes");
        assert_eq!(fs::read_to_string(staging.join("new/dir/file")).unwrap(), "agent bytes");
        assert_eq!(fixups.len(), 3, "unprivileged builds make the files root's in the image");
        // Escapes and directories are refused.
        for bad in ["/../x", "/usr"] {
            let f = AddedFile { guest_path: bad.into(), source: source.clone(), mode: 0o644 };
            assert!(add_files(&staging, &[f], true, &mut Vec::new()).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_cache_variant_changes_with_the_added_file() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("agent");
        fs::write(&source, "v1").unwrap();
        let plain = RootfsOptions::default();
        let with = |mode| RootfsOptions {
            added_files: vec![AddedFile { guest_path: "/sbin/a".into(), source: source.clone(), mode }],
            ..Default::default()
        };
        assert_ne!(plain.cache_variant(), with(0o755).cache_variant());
        assert_eq!(with(0o755).cache_variant(), with(0o755).cache_variant());
        assert_ne!(with(0o755).cache_variant(), with(0o700).cache_variant());
        let before = with(0o755).cache_variant();
        // A rebuilt agent (new file, same path) is a new variant.
        fs::remove_file(&source).unwrap();
        fs::write(&source, "v2 longer").unwrap();
        assert_ne!(with(0o755).cache_variant(), before);
    }

    #[test]
    fn plan_leaves_the_headroom_asked_for() {
        let options = RootfsOptions { headroom_bytes: 10 * MIB, headroom_percent: 0, ..Default::default() };
        let (size, inodes) = plan_size(ContentSize { bytes: 100 * MIB, inodes: 10_000 }, &options);
        assert_eq!(inodes, 20_000);
        assert!(size >= 110 * MIB + 20_000 * INODE_SIZE, "{size}");
        assert!(size < 150 * MIB, "{size}");
        assert_eq!(size % MIB, 0);
    }
}
