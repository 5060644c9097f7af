//! `kiln cp` over the agent: files and directories both ways.
//!
//! Into the guest, a regular file goes as itself (`CopyFormat::File`, the agent writes a temp file
//! and renames it); a directory goes as a tar stream built here while it is sent (symlinks are not
//! followed) and unpacked by the agent into the guest directory. Out of the guest, everything comes
//! as a tar stream (`CopyFormat::Tar`): the guest is untrusted, so the stream is spooled to a temp
//! file next to the destination and unpacked with `kiln-image`'s layer unpacker (no entry can write
//! outside its staging directory), then the result is renamed into place — a failed or hostile copy
//! leaves nothing but what was there before.

use std::fs;
use std::path::{Path, PathBuf};

use kiln_agent_proto::{Client, CopyFormat};
use kiln_image::unpack::{remove_staging, unpack_layers, LayerSource, UnpackOptions};

use crate::error::{io_err, ManagerError, Result};

/// Copies a host file or directory into the guest at `guest_path`. A directory's contents land in
/// `guest_path` (created if missing), like `cp -r SRC/. DST`.
pub fn copy_in(client: &Client, vm: &str, host: &Path, guest_path: &str) -> Result<u64> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(host).map_err(io_err("inspecting", host))?;
    let agent_err = |source| ManagerError::Agent { name: vm.to_string(), source };
    if meta.is_file() {
        let file = fs::File::open(host).map_err(io_err("opening", host))?;
        return client
            .copy_in(guest_path, Some(meta.permissions().mode() & 0o7777), CopyFormat::File, file)
            .map_err(agent_err);
    }
    if !meta.is_dir() {
        return Err(ManagerError::InvalidInput {
            what: "copy source",
            detail: format!("{} is neither a regular file nor a directory", host.display()),
        });
    }
    let (reader, writer) = std::io::pipe().map_err(io_err("making a pipe for", host))?;
    let src = host.to_path_buf();
    let archiver = std::thread::spawn(move || -> std::io::Result<()> {
        let mut tar = tar::Builder::new(writer);
        tar.follow_symlinks(false);
        tar.append_dir_all(".", &src)?;
        tar.into_inner().map(drop)
    });
    let sent = client.copy_in(guest_path, None, CopyFormat::Tar, reader);
    let archived = archiver.join().unwrap_or_else(|_| Err(std::io::Error::other("the tar writer panicked")));
    // The archive's own error (an unreadable file) explains a failed copy better than the agent's.
    archived.map_err(io_err("archiving", host))?;
    sent.map_err(agent_err)
}

/// Copies `guest_path` (a file or a directory) out of the guest to `host`: to `host` itself, or into
/// it (as `host/NAME`) when `host` is an existing directory. Returns the bytes of file content written.
pub fn copy_out(client: &Client, vm: &str, guest_path: &str, host: &Path) -> Result<u64> {
    let name = Path::new(guest_path).file_name().map(PathBuf::from);
    let target = match (&name, host.is_dir()) {
        (Some(n), true) => host.join(n),
        _ => host.to_path_buf(),
    };
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let base = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "copy".into());
    let spool_path = parent.join(format!(".{base}.kiln-tmp.tar"));
    let staging = parent.join(format!(".{base}.kiln-tmp"));
    let cleanup = || {
        let _ = fs::remove_file(&spool_path);
        let _ = remove_staging(&staging);
    };
    cleanup();
    let result = (|| {
        let spool = fs::File::create(&spool_path).map_err(io_err("creating", &spool_path))?;
        client
            .copy_out(guest_path, CopyFormat::Tar, std::io::BufWriter::new(spool))
            .map_err(|source| ManagerError::Agent { name: vm.to_string(), source })?;
        fs::create_dir(&staging).map_err(io_err("creating", &staging))?;
        let layer = LayerSource { path: &spool_path, name: format!("{vm}:{guest_path}"), diff_id: None };
        let report = unpack_layers(&staging, &[layer], &UnpackOptions { privileged: false }, |_| {})?;
        // The archive's top entry is the guest path's last component ("." for "/").
        let copied = match &name {
            Some(n) => staging.join(n),
            None => staging.clone(),
        };
        if fs::symlink_metadata(&copied).is_err() {
            return Err(ManagerError::InvalidInput {
                what: "copy from the guest",
                detail: format!("the agent's archive of {guest_path} does not contain it"),
            });
        }
        if target.is_dir() && !fs::symlink_metadata(&copied).is_ok_and(|m| m.is_dir()) {
            return Err(ManagerError::InvalidInput {
                what: "copy destination",
                detail: format!("{} is a directory and {guest_path} is not", target.display()),
            });
        }
        fs::rename(&copied, &target).map_err(io_err("renaming into", &target))?;
        Ok(report.bytes)
    })();
    cleanup();
    result
}
