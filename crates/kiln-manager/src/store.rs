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
}

impl VmPaths {
    fn new(dir: PathBuf) -> Self {
        VmPaths {
            entry: dir.join(ENTRY_FILE),
            disk: dir.join("disk.ext4"),
            console: dir.join("console.log"),
            run: dir.join("run"),
            ssh_key: dir.join("ssh").join("id_ed25519"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_hypervisor::{BackendKind, ProcessId};

    fn entry(id: &str, name: &str, status: VmStatus, creator: Option<ProcessId>) -> VmEntry {
        VmEntry {
            format: ENTRY_FORMAT,
            id: id.into(),
            name: name.into(),
            image: "busybox".into(),
            image_id: "sha256:00".into(),
            kernel: "k".into(),
            backend: BackendKind::Qemu,
            vcpus: 1,
            memory_mib: 128,
            disk_size: None,
            main: Default::default(),
            auto_remove: false,
            network: None,
            status,
            creator,
            created_at: 1,
            started_at: None,
            finished_at: None,
            exit: None,
            console_offset: 0,
        }
    }

    #[test]
    fn repair_removes_half_made_vms_and_keeps_the_rest() {
        let root = tempfile::tempdir().unwrap();
        let store = VmStore::open(root.path()).unwrap();
        // A creator that has exited.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = ProcessId::of(child.id() as i32).unwrap();
        child.wait().unwrap();
        let me = ProcessId::of(std::process::id() as i32).unwrap();
        for e in [
            entry("aa01", "crashed", VmStatus::Creating, Some(dead)),
            entry("aa02", "in-progress", VmStatus::Creating, Some(me)),
            entry("aa03", "made", VmStatus::Created, None),
        ] {
            fs::create_dir_all(store.paths(&e.id).dir).unwrap();
            store.save(&e).unwrap();
        }
        fs::create_dir_all(store.paths("aa04").dir).unwrap(); // crash before the first write
        fs::create_dir_all(store.paths("aa05").dir).unwrap();
        fs::write(store.paths("aa05").entry, b"{not json").unwrap();

        let removed = store.repair().unwrap();
        let mut removed: Vec<String> =
            removed.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        removed.sort();
        assert_eq!(removed, ["aa01", "aa04"]);
        assert!(store.paths("aa05").dir.exists(), "a corrupt record is left for the user");
        let err = store.list().unwrap_err().to_string();
        assert!(err.contains("corrupt") && err.contains("aa05"), "{err}");
        fs::remove_dir_all(store.paths("aa05").dir).unwrap();
        let names: Vec<String> = store.list().unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["in-progress", "made"]);
        assert_eq!(
            store.find("aa0").unwrap_err().to_string(),
            "\"aa0\" matches more than one VM ID; use more characters or the name"
        );
        assert_eq!(store.find("aa03").unwrap().name, "made");
        assert!(matches!(store.find("nope"), Err(ManagerError::NoSuchVm(_))));
    }

    #[test]
    fn records_are_replaced_whole() {
        let root = tempfile::tempdir().unwrap();
        let store = VmStore::open(root.path()).unwrap();
        let mut e = entry("bb01", "x", VmStatus::Created, None);
        fs::create_dir_all(store.paths(&e.id).dir).unwrap();
        store.save(&e).unwrap();
        e.status = VmStatus::Exited;
        store.save(&e).unwrap();
        assert_eq!(store.find("x").unwrap().status, VmStatus::Exited);
        let leftovers: Vec<_> =
            fs::read_dir(store.paths("bb01").dir).unwrap().map(|d| d.unwrap().file_name()).collect();
        assert_eq!(leftovers, [std::ffi::OsString::from(ENTRY_FILE)], "no temp files left");
    }
}
