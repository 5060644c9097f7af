//! Host-side helpers: running tools, finding them, `ldd` closures, the cache directory, file locks.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::LabError;

pub(crate) const INSTALL_HINT: &str =
    "run `scripts/install-deps` (as root) to install the lab's Debian packages";

/// Runs a command to completion; a non-zero exit is an error carrying its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<Output, LabError> {
    let command = format!("{cmd:?}");
    let out =
        cmd.output().map_err(|e| LabError::Command { command: command.clone(), detail: e.to_string() })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(LabError::Command { command, detail: format!("{}: {}", out.status, stderr.trim()) });
    }
    Ok(out)
}

/// Finds an executable on `PATH` (or takes an absolute path as is).
pub(crate) fn which(name: impl AsRef<OsStr>) -> Option<PathBuf> {
    let name = Path::new(name.as_ref());
    if name.is_absolute() {
        return name.is_file().then(|| name.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

pub(crate) fn require(name: &str, package: &str) -> Result<PathBuf, LabError> {
    which(name).ok_or_else(|| LabError::Missing {
        what: format!("`{name}` (Debian package {package})"),
        hint: INSTALL_HINT.to_string(),
    })
}

/// `${KILN_CACHE_DIR:-~/.cache/kiln}/lab`.
pub(crate) fn lab_cache_dir() -> Result<PathBuf, LabError> {
    let root = match std::env::var_os("KILN_CACHE_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => match std::env::var_os("HOME") {
            Some(h) if !h.is_empty() => PathBuf::from(h).join(".cache/kiln"),
            _ => {
                return Err(LabError::Missing {
                    what: "a cache directory".into(),
                    hint: "set KILN_CACHE_DIR or HOME".into(),
                })
            }
        },
    };
    let dir = root.join("lab");
    std::fs::create_dir_all(&dir).map_err(|e| LabError::io(&dir, e))?;
    Ok(dir)
}

/// An exclusive `flock` held until dropped.
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    pub(crate) fn exclusive(path: &Path) -> Result<Self, LabError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| LabError::io(path, e))?;
        loop {
            // SAFETY: flock on a descriptor owned by `file`, which outlives the call.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(LabError::io(path, err));
            }
        }
        Ok(Self { _file: file })
    }
}

/// The shared libraries (and dynamic loader) a dynamically linked executable needs, as absolute
/// paths the loader will look them up by. Empty for static executables.
pub(crate) fn ldd_closure(binary: &Path) -> Result<Vec<PathBuf>, LabError> {
    let ldd = require("ldd", "libc-bin")?;
    let out = Command::new(ldd).arg(binary).output().map_err(|e| LabError::Command {
        command: format!("ldd {}", binary.display()),
        detail: e.to_string(),
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // glibc's ldd exits 1 for static executables ("not a dynamic executable").
        if stdout.contains("not a dynamic executable") || stderr.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        return Err(LabError::Command {
            command: format!("ldd {}", binary.display()),
            detail: format!("{}: {}", out.status, stderr.trim()),
        });
    }
    parse_ldd(&stdout).map_err(|library| LabError::MissingLibrary { binary: binary.to_path_buf(), library })
}

/// Parses `ldd` output. `Err(lib)` names a library ldd could not find.
pub(crate) fn parse_ldd(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.contains("statically linked") {
            continue;
        }
        let target = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(name.trim().to_string());
                }
                rest.split(" (").next().unwrap_or("").trim()
            }
            None => line.split(" (").next().unwrap_or("").trim(),
        };
        // linux-vdso.so.1 has no file; everything real is an absolute path.
        if target.starts_with('/') {
            libs.push(PathBuf::from(target));
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x1)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x2)\n";
        let libs = parse_ldd(text).unwrap_or_default();
        assert_eq!(
            libs,
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert_eq!(parse_ldd("\tlibfoo.so => not found\n"), Err("libfoo.so".to_string()));
        assert_eq!(parse_ldd("\tstatically linked\n"), Ok(vec![]));
    }
}
