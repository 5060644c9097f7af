//! A writer for the "newc" cpio format (the one the Linux kernel unpacks as an initramfs).
//!
//! The kernel accepts several archives concatenated, so the lab's initrd is the cached base archive
//! followed by one payload archive per run. The kernel's unpacker does not create missing parent
//! directories, so [`CpioWriter`] emits every ancestor directory of an entry once per archive.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};

/// File type bits of `st_mode`.
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Streams a newc archive into `W`. Call [`CpioWriter::finish`] to write the trailer.
///
/// All entries are owned by root with mtime 0, so an archive depends only on its content.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

/// Normalises an in-archive path: no leading `/`, no empty, `.` or `..` components.
pub fn archive_path(path: &str) -> io::Result<String> {
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("`..` in lab path {path:?}")))
            }
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("empty lab path {path:?}")));
    }
    Ok(parts.join("/"))
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive.
    pub fn new(out: W) -> Self {
        Self { out, written: 0, next_ino: 1, dirs: BTreeSet::new() }
    }

    fn put(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    fn pad(&mut self, align: u64) -> io::Result<()> {
        let rem = self.written % align;
        if rem != 0 {
            let zeros = [0u8; 512];
            let n = (align - rem) as usize;
            self.put(&zeros[..n])?;
        }
        Ok(())
    }

    fn header(&mut self, name: &str, mode: u32, size: u64) -> io::Result<()> {
        self.header_dev(name, mode, size, (0, 0))
    }

    fn header_dev(&mut self, name: &str, mode: u32, size: u64, rdev: (u32, u32)) -> io::Result<()> {
        let size = u32::try_from(size).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{name}: too large for newc cpio"))
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let namesize = name.len() + 1;
        let hdr = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
            0, 0, 0, 0, 0, rdev.0, rdev.1, 0
        );
        self.put(hdr.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad(4)
    }

    /// Emits directory entries for every ancestor of `path` not emitted yet in this archive.
    fn parents(&mut self, path: &str) -> io::Result<()> {
        let mut prefix = String::new();
        let comps: Vec<&str> = path.split('/').collect();
        for comp in comps.iter().take(comps.len().saturating_sub(1)) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(comp);
            if self.dirs.insert(prefix.clone()) {
                let p = prefix.clone();
                self.header(&p, S_IFDIR | 0o755, 0)?;
            }
        }
        Ok(())
    }

    /// A directory (and its parents).
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        let path = archive_path(path)?;
        self.parents(&path)?;
        if self.dirs.insert(path.clone()) {
            self.header(&path, S_IFDIR | (perm & 0o7777), 0)?;
        }
        Ok(())
    }

    /// A regular file whose content is read from `data` (exactly `size` bytes).
    pub fn file_from(&mut self, path: &str, perm: u32, size: u64, data: &mut dyn Read) -> io::Result<()> {
        let path = archive_path(path)?;
        self.parents(&path)?;
        self.header(&path, S_IFREG | (perm & 0o7777), size)?;
        let copied = io::copy(&mut data.take(size), &mut self.out)?;
        self.written += copied;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{path}: changed size while being archived"),
            ));
        }
        self.pad(4)
    }

    /// A regular file with the given content.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let mut r = data;
        self.file_from(path, perm, data.len() as u64, &mut r)
    }

    /// A symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let path = archive_path(path)?;
        self.parents(&path)?;
        self.header(&path, S_IFLNK | 0o777, target.len() as u64)?;
        self.put(target.as_bytes())?;
        self.pad(4)
    }

    /// A character device node.
    pub fn chardev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        let path = archive_path(path)?;
        self.parents(&path)?;
        self.header_dev(&path, S_IFCHR | (perm & 0o7777), 0, (major, minor))
    }

    /// Writes the trailer, pads to 512 bytes and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 0)?;
        self.pad(512)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() -> io::Result<()> {
        let mut w = CpioWriter::new(Vec::new());
        w.file("/a/b/c.txt", 0o644, b"hello")?;
        w.symlink("a/link", "b/c.txt")?;
        let out = w.finish()?;
        assert_eq!(out.len() % 512, 0);
        let text = String::from_utf8_lossy(&out);
        // dirs a, a/b, then the file, the link, the trailer.
        assert_eq!(text.matches("070701").count(), 5);
        assert!(text.contains("a/b/c.txt\0"));
        assert!(text.contains("hello"));
        // Every header starts 4-byte aligned.
        let mut pos = 0;
        while let Some(off) = text[pos..].find("070701") {
            assert_eq!((pos + off) % 4, 0);
            pos += off + 6;
        }
        Ok(())
    }

    #[test]
    fn rejects_escaping_paths() {
        assert!(archive_path("/a/../b").is_err());
        assert!(archive_path("/").is_err());
        assert_eq!(archive_path("//usr/./bin/").ok().as_deref(), Some("usr/bin"));
    }

    #[test]
    fn matches_gnu_cpio_listing() -> io::Result<()> {
        // Cross-check with Debian's cpio when it is installed (it is in scripts/install-deps).
        if std::process::Command::new("cpio").arg("--version").output().is_err() {
            return Ok(());
        }
        let mut w = CpioWriter::new(Vec::new());
        w.file("/x/y", 0o755, b"data")?;
        let out = w.finish()?;
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(&out)?;
        }
        let o = child.wait_with_output()?;
        assert_eq!(String::from_utf8_lossy(&o.stdout), "x\nx/y\n");
        Ok(())
    }
}
