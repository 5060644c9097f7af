//! The VM store under the state root: one directory per VM under `<root>/vms/<id>/` holding its
//! record (`vm-record.json`), disk, ssh keys, console log and the hypervisor's state directory
//! (`run/`). A store-wide `flock` (`<root>/vms.lock`) serializes every read-modify-write, so
//! simultaneous `kiln` processes are safe; records are replaced atomically (temp + fsync + rename).
//!
//! Why JSON files and not an embedded database: a VM's state is one small document changed a few
//! times in its life, always under the store lock; files need no extra dependency, survive a crash
//! at any point (the rename is the commit), and a user can read them. Crash repair on open removes
//! what a crash can leave: a VM directory without a record (crash between `mkdir` and the first
//! write) and `creating` records whose creating process is gone.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use kiln_hypervisor::process::Liveness;
use kiln_image::store::{lock_file, write_atomic, LockGuard};

use crate::error::{io_err, ManagerError, Result};
use crate::record::{VmEntry, VmStatus, ENTRY_FORMAT};

/// The record's file name in a VM directory.
pub const ENTRY_FILE: &str = "vm-record.json";

/// Paths of one VM's directory.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
    pub entry: PathBuf,
    pub disk: PathBuf,
    pub console: PathBuf,
    /// The hypervisor's state directory (sockets, `vm.json`, `vmm.exit`, `vmm.log`).
    pub run: PathBuf,
    pub ssh_key: PathBuf,
    pub agent_config: PathBuf,
}

impl VmPaths {
    fn new(dir: PathBuf) -> Self {
        VmPaths {
            entry: dir.join(ENTRY_FILE),
            disk: dir.join("disk.ext4"),
            console: dir.join("console.log"),
            run: dir.join("run"),
            ssh_key: dir.join("ssh").join("id_ed25519"),
            agent_config: dir.join("agent.json"),
            dir,
        }
    }
}

/// The VM store.
#[derive(Debug, Clone)]
pub struct VmStore {
    vms: PathBuf,
    lock: PathBuf,
}

impl VmStore {
    /// Opens (creating) the store under `root`.
    pub fn open(root: &Path) -> Result<Self> {
        let vms = root.join("vms");
        fs::create_dir_all(&vms).map_err(io_err("creating", &vms))?;
        Ok(VmStore { vms, lock: root.join("vms.lock") })
    }

    /// Takes the store-wide lock (blocks while another process holds it).
    pub fn lock(&self) -> Result<LockGuard> {
        Ok(lock_file(&self.lock, true)?)
    }

    pub fn paths(&self, id: &str) -> VmPaths {
        VmPaths::new(self.vms.join(id))
    }

    /// Writes a record atomically.
    pub fn save(&self, entry: &VmEntry) -> Result<()> {
        let path = self.paths(&entry.id).entry;
        let json = serde_json::to_vec_pretty(entry)
            .map_err(|e| io_err("serializing", &path)(io::Error::other(e)))?;
        Ok(write_atomic(&path, &json)?)
    }

    fn load_file(path: &Path) -> Result<Option<VmEntry>> {
        match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| ManagerError::CorruptRecord { path: path.to_path_buf(), source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading", path)(e)),
        }
    }

    /// Every record, oldest first. Directories without a record are skipped (see [`Self::repair`]).
    pub fn list(&self) -> Result<Vec<VmEntry>> {
        let mut out = Vec::new();
        for dirent in fs::read_dir(&self.vms).map_err(io_err("listing", &self.vms))? {
            let dirent = dirent.map_err(io_err("listing", &self.vms))?;
            if let Some(entry) = Self::load_file(&dirent.path().join(ENTRY_FILE))? {
                if entry.format == ENTRY_FORMAT {
                    out.push(entry);
                }
            }
        }
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.name.cmp(&b.name)));
        Ok(out)
    }

    /// Finds a VM by name, full ID or unambiguous ID prefix.
    pub fn find(&self, name_or_id: &str) -> Result<VmEntry> {
        let all = self.list()?;
        if let Some(e) = all.iter().find(|e| e.name == name_or_id || e.id == name_or_id) {
            return Ok(e.clone());
        }
        let by_prefix: Vec<&VmEntry> =
            all.iter().filter(|e| !name_or_id.is_empty() && e.id.starts_with(name_or_id)).collect();
        match by_prefix.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(ManagerError::NoSuchVm(name_or_id.to_string())),
            _ => Err(ManagerError::AmbiguousVm(name_or_id.to_string())),
        }
    }

    /// Removes a VM's directory.
    pub fn remove_dir(&self, id: &str) -> Result<()> {
        let dir = self.paths(id).dir;
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("removing", &dir)(e)),
            _ => Ok(()),
        }
    }

    /// Removes what a crash can leave behind; call with the lock held. Returns the directories
    /// removed.
    pub fn repair(&self) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for dirent in fs::read_dir(&self.vms).map_err(io_err("listing", &self.vms))? {
            let dirent = dirent.map_err(io_err("listing", &self.vms))?;
            let dir = dirent.path();
            if !dir.is_dir() {
                continue;
            }
            let abandoned = match Self::load_file(&dir.join(ENTRY_FILE)) {
                Ok(None) => true,
                Ok(Some(e)) => {
                    e.status == VmStatus::Creating
                        && e.creator.is_none_or(|p| p.liveness() != Liveness::Running)
                }
                // A corrupt record is left for the user to look at (the error names it).
                Err(_) => false,
            };
            if abandoned {
                tracing::info!(dir = %dir.display(), "removing a half-made VM directory");
                fs::remove_dir_all(&dir).map_err(io_err("removing", &dir))?;
                removed.push(dir);
            }
        }
        Ok(removed)
    }
}
