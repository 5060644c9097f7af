//! A directory used as a root filesystem, accessed only through `*at()` calls relative to its fd.
//!
//! Paths are resolved one component at a time, like the kernel would inside a chroot: symlinks met on
//! the way are followed *within* the root (an absolute target restarts at the root), and a `..` that
//! would climb above the root is refused. Every directory is opened with `O_NOFOLLOW | O_DIRECTORY`, so
//! the walk itself never follows a symlink the resolver did not interpret; nothing resolved here can
//! name a file outside the root.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

/// Symlinks followed while resolving one path (the kernel's limit).
const MAX_SYMLINKS: usize = 40;

/// Why a path could not be resolved inside the root.
#[derive(Debug)]
pub enum ResolveError {
    /// A `..` (in the path or a symlink target) would leave the root.
    Escape(String),
    /// A component is missing (and creating was not asked for).
    NotFound,
    /// A component is a file, not a directory.
    NotADirectory(String),
    /// The path names something other than a regular file.
    NotAFile,
    /// More than 40 symlinks.
    TooManySymlinks,
    Io(io::Error),
}

impl std::fmt::Display for ResolveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResolveError::Escape(via) => write!(f, "{via} leads outside the root filesystem"),
            ResolveError::NotFound => write!(f, "a parent directory does not exist"),
            ResolveError::NotADirectory(c) => write!(f, "parent {c:?} is not a directory"),
            ResolveError::NotAFile => write!(f, "not a regular file"),
            ResolveError::TooManySymlinks => write!(f, "more than {MAX_SYMLINKS} symlinks in the path"),
            ResolveError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl From<Errno> for ResolveError {
    fn from(e: Errno) -> Self {
        ResolveError::Io(e.into())
    }
}

/// Splits a path from an archive into its components. Refuses absolute paths and `..` anywhere
/// (archives never need them); drops `.` and empty components. An empty result means the root itself.
pub fn archive_path_components(raw: &[u8]) -> Result<Vec<OsString>, &'static str> {
    if raw.first() == Some(&b'/') {
        return Err("absolute path");
    }
    if raw.contains(&0) {
        return Err("NUL byte in the path");
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("'..' component"),
            c => out.push(OsString::from_vec(c.to_vec())),
        }
    }
    Ok(out)
}

/// Joins components with `/` (the key used for per-layer bookkeeping).
pub fn join(components: &[OsString]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, c) in components.iter().enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        out.extend_from_slice(c.as_bytes());
    }
    out
}

/// A root directory opened for confined access.
pub struct RootDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl RootDir {
    /// Opens `path` (which must be a directory, not a symlink).
    pub fn open(path: &Path) -> io::Result<Self> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(RootDir { fd, path: path.to_path_buf() })
    }

    /// The host path (for messages only; never used to reach files).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Resolves `components` to a directory inside the root, following symlinks within the root.
    /// With `create`, missing directories are made (mode 0755, as container runtimes do).
    pub fn resolve_dir(&self, components: &[OsString], create: bool) -> Result<OwnedFd, ResolveError> {
        let mut stack: Vec<OwnedFd> = vec![self.fd.try_clone().map_err(ResolveError::Io)?];
        let mut pending: VecDeque<OsString> = components.iter().cloned().collect();
        let mut symlinks = 0;
        while let Some(component) = pending.pop_front() {
            match component.as_bytes() {
                b"" | b"." => continue,
                b".." => {
                    if stack.len() == 1 {
                        return Err(ResolveError::Escape("a '..' in a symlink target".into()));
                    }
                    stack.pop();
                    continue;
                }
                _ => {}
            }
            let current = stack.last().ok_or(ResolveError::NotFound)?;
            let stat = match rustix::fs::statat(current, &component, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) => Some(stat),
                Err(Errno::NOENT) if create => None,
                Err(Errno::NOENT) => return Err(ResolveError::NotFound),
                Err(e) => return Err(e.into()),
            };
            let file_type = stat.map(|s| FileType::from_raw_mode(s.st_mode));
            match file_type {
                None => {
                    match rustix::fs::mkdirat(current, &component, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(e.into()),
                    }
                    stack.push(open_dir_at(current, &component)?);
                }
                Some(FileType::Directory) => stack.push(open_dir_at(current, &component)?),
                Some(FileType::Symlink) => {
                    symlinks += 1;
                    if symlinks > MAX_SYMLINKS {
                        return Err(ResolveError::TooManySymlinks);
                    }
                    let target = rustix::fs::readlinkat(current, &component, Vec::new())?;
                    let target = target.as_bytes();
                    if target.first() == Some(&b'/') {
                        stack.truncate(1);
                    }
                    let mut parts: Vec<OsString> = target
                        .split(|b| *b == b'/')
                        .filter(|c| !c.is_empty())
                        .map(|c| OsString::from_vec(c.to_vec()))
                        .collect();
                    if parts.iter().any(|p| p == "..") && escapes(&stack, &parts) {
                        return Err(ResolveError::Escape(format!(
                            "symlink {:?} -> {:?}",
                            component,
                            OsStr::from_bytes(target)
                        )));
                    }
                    while let Some(p) = parts.pop() {
                        pending.push_front(p);
                    }
                }
                Some(_) => return Err(ResolveError::NotADirectory(component.to_string_lossy().into_owned())),
            }
        }
        stack.pop().ok_or(ResolveError::NotFound)
    }

    /// Resolves the parent of `components` (created if missing when `create`) and returns it with the
    /// final name. `components` must not be empty.
    pub fn resolve_parent(
        &self,
        components: &[OsString],
        create: bool,
    ) -> Result<(OwnedFd, OsString), ResolveError> {
        let (name, parents) = components.split_last().ok_or(ResolveError::NotFound)?;
        Ok((self.resolve_dir(parents, create)?, name.clone()))
    }
}

impl RootDir {
    /// Opens a regular file inside the root for reading, following symlinks (a final one too) within
    /// the root.
    pub fn open_file(&self, components: &[OsString]) -> Result<std::fs::File, ResolveError> {
        let mut path = components.to_vec();
        for _ in 0..=MAX_SYMLINKS {
            let (parent, name) = self.resolve_parent(&path, false)?;
            let stat = match rustix::fs::statat(&parent, &name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(s) => s,
                Err(Errno::NOENT) => return Err(ResolveError::NotFound),
                Err(e) => return Err(e.into()),
            };
            match FileType::from_raw_mode(stat.st_mode) {
                FileType::RegularFile => {
                    let fd = rustix::fs::openat(
                        &parent,
                        &name,
                        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )?;
                    return Ok(fd.into());
                }
                FileType::Symlink => {
                    let target = rustix::fs::readlinkat(&parent, &name, Vec::new())?;
                    let target = target.as_bytes();
                    if target.first() != Some(&b'/') {
                        path.pop();
                    } else {
                        path.clear();
                    }
                    path.extend(
                        target
                            .split(|b| *b == b'/')
                            .filter(|c| !c.is_empty())
                            .map(|c| OsString::from_vec(c.to_vec())),
                    );
                }
                _ => return Err(ResolveError::NotAFile),
            }
        }
        Err(ResolveError::TooManySymlinks)
    }
}

/// Would following `parts` (relative to the directory on top of `stack`) climb above the root? Only
/// the target's own `..` count here; further symlinks are checked when they are met.
fn escapes(stack: &[OwnedFd], parts: &[OsString]) -> bool {
    let mut depth = stack.len() as isize - 1;
    for p in parts {
        match p.as_bytes() {
            b"." => {}
            b".." => depth -= 1,
            _ => depth += 1,
        }
        if depth < 0 {
            return true;
        }
    }
    false
}

/// Opens a directory entry of `dir` as a directory, refusing symlinks.
pub fn open_dir_at(dir: impl AsFd, name: &OsStr) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Removes `name` in `dir`: a file, a symlink (never followed) or a whole directory tree. With
/// `make_writable`, directories get owner rwx first (needed when not running as root).
pub fn remove_tree_at(dir: &OwnedFd, name: &OsStr, make_writable: bool) -> Result<(), Errno> {
    let stat = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(s) => s,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    if FileType::from_raw_mode(stat.st_mode) != FileType::Directory {
        return rustix::fs::unlinkat(dir, name, AtFlags::empty());
    }
    if make_writable {
        rustix::fs::chmodat(dir, name, Mode::from_raw_mode(0o700), AtFlags::empty())?;
    }
    let child = open_dir_at(dir, name)?;
    for child_name in list_dir(&child)? {
        remove_tree_at(&child, &child_name, make_writable)?;
    }
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
}

/// Names in a directory (without `.` and `..`).
pub fn list_dir(dir: &OwnedFd) -> Result<Vec<OsString>, Errno> {
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsString::from_vec(name.to_vec()));
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn comps(s: &str) -> Vec<OsString> {
        archive_path_components(s.as_bytes()).unwrap()
    }

    #[test]
    fn archive_paths_refuse_absolute_and_dotdot() {
        assert_eq!(comps("./a//b/./c/"), vec!["a", "b", "c"]);
        assert!(comps("./").is_empty());
        assert_eq!(archive_path_components(b"/etc/passwd"), Err("absolute path"));
        assert_eq!(archive_path_components(b"a/../../x"), Err("'..' component"));
        assert_eq!(archive_path_components(b".."), Err("'..' component"));
    }

    #[test]
    fn symlinks_resolve_inside_the_root_and_escapes_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root_path = tmp.path().join("root");
        std::fs::create_dir_all(root_path.join("usr/lib")).unwrap();
        symlink("usr/lib", root_path.join("lib")).unwrap();
        symlink("/usr", root_path.join("abs")).unwrap();
        symlink("../../..", root_path.join("usr/up")).unwrap();
        symlink(tmp.path(), root_path.join("host")).unwrap();
        let root = RootDir::open(&root_path).unwrap();

        let dir = root.resolve_dir(&comps("lib"), false).unwrap();
        rustix::fs::mkdirat(&dir, "via-lib", Mode::from_raw_mode(0o755)).unwrap();
        assert!(root_path.join("usr/lib/via-lib").is_dir());

        // An absolute target is taken relative to the root, never the host.
        let dir = root.resolve_dir(&comps("abs/lib"), false).unwrap();
        rustix::fs::mkdirat(&dir, "via-abs", Mode::from_raw_mode(0o755)).unwrap();
        assert!(root_path.join("usr/lib/via-abs").is_dir());
        let dir = root.resolve_dir(&comps("host/new"), true).unwrap();
        drop(dir);
        assert!(root_path.join(tmp.path().strip_prefix("/").unwrap()).join("new").is_dir());
        assert!(!tmp.path().join("new").exists(), "an absolute symlink was followed on the host");

        assert!(matches!(root.resolve_dir(&comps("usr/up/x"), true), Err(ResolveError::Escape(_))));
        assert!(!tmp.path().join("x").exists());
        assert!(matches!(root.resolve_dir(&comps("missing/x"), false), Err(ResolveError::NotFound)));
    }

    #[test]
    fn symlink_loops_end() {
        let tmp = tempfile::tempdir().unwrap();
        symlink("b", tmp.path().join("a")).unwrap();
        symlink("a", tmp.path().join("b")).unwrap();
        let root = RootDir::open(tmp.path()).unwrap();
        assert!(matches!(root.resolve_dir(&comps("a/x"), true), Err(ResolveError::TooManySymlinks)));
    }
}
