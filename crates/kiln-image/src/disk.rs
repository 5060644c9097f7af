//! Per-VM disks: each VM gets its own copy of a cached root filesystem image — a reflink (instant,
//! copy-on-write) where the host filesystem supports it, else a sparse copy that skips the holes —
//! optionally grown to a requested size with `resize2fs`.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;

use rustix::fs::SeekFrom;
use rustix::io::Errno;

use crate::error::{io_err, ImageError, Result};
use crate::rootfs::run_tool;
use crate::store::unique_name;

/// How a disk was copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyMethod {
    /// `FICLONE`: blocks shared copy-on-write with the source (btrfs, XFS with reflink, ...).
    Reflink,
    /// Data ranges copied with `copy_file_range`, holes kept as holes.
    SparseCopy,
}

/// Copies the ext4 image `source` to `dest` (which must not exist) and, when `size` is larger than the
/// image, grows the file and the filesystem to it. The copy appears at `dest` only when complete.
pub fn copy_disk(source: &Path, dest: &Path, size: Option<u64>) -> Result<CopyMethod> {
    if dest.exists() {
        return Err(ImageError::Io {
            action: "creating disk",
            path: dest.to_path_buf(),
            source: io::Error::from(io::ErrorKind::AlreadyExists),
        });
    }
    let dir = dest.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(unique_name(".disk"));
    let result = copy_and_grow(source, &tmp, size).and_then(|method| {
        fs::rename(&tmp, dest).map_err(io_err("creating disk", dest))?;
        Ok(method)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn copy_and_grow(source: &Path, dest: &Path, size: Option<u64>) -> Result<CopyMethod> {
    let src = File::open(source).map_err(io_err("opening", source))?;
    let len = src.metadata().map_err(io_err("inspecting", source))?.len();
    if let Some(size) = size {
        if size < len {
            return Err(ImageError::Unsupported {
                what: "disk size",
                detail: format!("{size} bytes is smaller than the image {} ({len} bytes)", source.display()),
            });
        }
    }
    let dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(io_err("creating", dest))?;
    let method = match rustix::fs::ioctl_ficlone(&dst, &src) {
        Ok(()) => CopyMethod::Reflink,
        Err(Errno::OPNOTSUPP | Errno::XDEV | Errno::INVAL | Errno::NOTTY | Errno::BADF | Errno::PERM) => {
            sparse_copy(&src, &dst, len).map_err(io_err("copying to", dest))?;
            CopyMethod::SparseCopy
        }
        Err(e) => return Err(io_err("cloning into", dest)(e.into())),
    };
    dst.sync_all().map_err(io_err("syncing", dest))?;
    if let Some(size) = size.filter(|s| *s > len) {
        dst.set_len(size).map_err(io_err("growing", dest))?;
        drop(dst);
        let mut resize = Command::new("resize2fs");
        resize.arg(dest);
        run_tool(resize)?;
    }
    Ok(method)
}

/// Copies the data ranges of `src` (found with `SEEK_DATA`/`SEEK_HOLE`) to the same offsets in `dst`.
fn sparse_copy(src: &File, dst: &File, len: u64) -> io::Result<()> {
    dst.set_len(len)?;
    let mut offset = 0u64;
    while offset < len {
        let data = match rustix::fs::seek(src, SeekFrom::Data(offset)) {
            Ok(d) => d,
            Err(Errno::NXIO) => break, // Only a hole remains.
            Err(e) => return Err(e.into()),
        };
        let hole = rustix::fs::seek(src, SeekFrom::Hole(data))?.min(len);
        let mut in_off = data;
        let mut out_off = data;
        while in_off < hole {
            let chunk = usize::try_from(hole - in_off).unwrap_or(usize::MAX).min(1 << 30);
            let n = rustix::fs::copy_file_range(src, Some(&mut in_off), dst, Some(&mut out_off), chunk)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "source shrank while copying"));
            }
        }
        offset = hole;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, Write};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let tmp = tempfile::tempdir().unwrap();
        let src_path = tmp.path().join("src");
        let mut src = File::create(&src_path).unwrap();
        src.write_all(b"head").unwrap();
        src.seek(io::SeekFrom::Start(64 << 20)).unwrap();
        src.write_all(b"tail").unwrap();
        drop(src);
        let dest = tmp.path().join("dest");
        copy_disk(&src_path, &dest, None).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), fs::read(&src_path).unwrap());
        let meta = fs::metadata(&dest).unwrap();
        assert!(meta.blocks() * 512 < 1 << 20, "the hole was written out: {} blocks", meta.blocks());
        assert!(copy_disk(&src_path, &dest, None).is_err(), "an existing disk was overwritten");
        assert!(copy_disk(&src_path, &tmp.path().join("small"), Some(10)).is_err());
    }
}
