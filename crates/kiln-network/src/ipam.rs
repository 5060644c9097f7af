//! Address management: one lease file per network, read and rewritten only under an exclusive
//! `flock`, replaced atomically (temp file + fsync + rename), repaired whenever it is locked.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::config::NetworkConfig;
use crate::error::{NetworkError, Result};
use crate::ports::PortMapping;

const LEASES: &str = "leases.json";
const LOCK: &str = ".lock";
const TMP_PREFIX: &str = ".leases.tmp.";

/// One VM's place on a network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub vm_id: String,
    pub ip: Ipv4Addr,
    pub mac: String,
    /// The host tap device (created by `attach`).
    pub tap: String,
    /// Published ports.
    #[serde(default)]
    pub ports: Vec<PortMapping>,
}

#[derive(Default, Serialize, Deserialize)]
struct LeaseFile {
    version: u32,
    leases: Vec<Lease>,
}

/// A tap name derived from the network and VM id: `kt` + 11 hex digits (Linux allows 15 bytes).
pub fn tap_name(network: &str, vm_id: &str) -> String {
    let hash = Sha256::digest(format!("{network}/{vm_id}").as_bytes());
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("kt{}", &hex[..11])
}

/// A locally administered unicast MAC derived from the address (02:4b:<the four octets>), unique
/// on the network as long as the address is.
pub fn mac_for(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("02:4b:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// Opens (creating) `path` and takes an exclusive `flock` on it, waiting for other holders; the
/// lock lasts as long as the returned file.
pub(crate) fn lock_file(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(NetworkError::state(path))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| NetworkError::State { path: path.to_path_buf(), source: e.into() })?;
    Ok(file)
}

/// A network's lease directory (`<state>/<network>/`).
#[derive(Clone, Debug)]
pub struct Ipam {
    dir: PathBuf,
}

impl Ipam {
    pub fn new(dir: &Path) -> Self {
        Ipam { dir: dir.to_path_buf() }
    }

    /// Takes the network's lock (blocking until other processes release it), loads the leases and
    /// repairs what a crash or an edited config can leave: stale temp files, leases outside the
    /// subnet or on the gateway, a second lease for one address or one VM.
    pub fn lock(&self, config: &NetworkConfig) -> Result<LockedLeases> {
        fs::create_dir_all(&self.dir).map_err(NetworkError::state(&self.dir))?;
        let lock = lock_file(&self.dir.join(LOCK))?;
        self.remove_stale_temps();
        let path = self.dir.join(LEASES);
        let file: LeaseFile = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| NetworkError::Corrupt { path: path.clone(), source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => LeaseFile::default(),
            Err(e) => return Err(NetworkError::State { path, source: e }),
        };
        let mut locked =
            LockedLeases { _lock: lock, dir: self.dir.clone(), leases: file.leases, dirty: false };
        locked.repair(config);
        Ok(locked)
    }

    fn remove_stale_temps(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                tracing::info!(path = %entry.path().display(), "removing a lease file left by a crashed writer");
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// The leases of one network with its lock held; dropping it releases the lock (unsaved changes
/// are lost).
pub struct LockedLeases {
    _lock: File,
    dir: PathBuf,
    leases: Vec<Lease>,
    dirty: bool,
}

impl LockedLeases {
    fn repair(&mut self, config: &NetworkConfig) {
        let mut ips = HashSet::new();
        let mut vms = HashSet::new();
        let before = self.leases.len();
        self.leases.retain(|l| {
            let keep = config.subnet.contains(l.ip)
                && l.ip != config.gateway
                && ips.insert(l.ip)
                && vms.insert(l.vm_id.clone());
            if !keep {
                tracing::warn!(vm = %l.vm_id, ip = %l.ip, network = %config.name, "dropping an invalid lease");
            }
            keep
        });
        self.dirty |= self.leases.len() != before;
    }

    pub fn leases(&self) -> &[Lease] {
        &self.leases
    }

    pub fn get(&self, vm_id: &str) -> Option<&Lease> {
        self.leases.iter().find(|l| l.vm_id == vm_id)
    }

    /// The VM's lease: its existing one, else the lowest free address. Not saved until [`save`].
    ///
    /// [`save`]: LockedLeases::save
    pub fn allocate(&mut self, config: &NetworkConfig, vm_id: &str) -> Result<Lease> {
        if let Some(lease) = self.get(vm_id) {
            return Ok(lease.clone());
        }
        let used: HashSet<Ipv4Addr> = self.leases.iter().map(|l| l.ip).collect();
        let ip = config.subnet.hosts().find(|ip| *ip != config.gateway && !used.contains(ip)).ok_or_else(
            || NetworkError::Exhausted { network: config.name.clone(), subnet: config.subnet.to_string() },
        )?;
        let lease = Lease {
            vm_id: vm_id.to_string(),
            ip,
            mac: mac_for(ip),
            tap: tap_name(&config.name, vm_id),
            ports: Vec::new(),
        };
        self.leases.push(lease.clone());
        self.dirty = true;
        Ok(lease)
    }

    pub fn set_ports(&mut self, vm_id: &str, ports: &[PortMapping]) {
        if let Some(lease) = self.leases.iter_mut().find(|l| l.vm_id == vm_id) {
            if lease.ports != ports {
                lease.ports = ports.to_vec();
                self.dirty = true;
            }
        }
    }

    pub fn release(&mut self, vm_id: &str) -> Option<Lease> {
        let index = self.leases.iter().position(|l| l.vm_id == vm_id)?;
        self.dirty = true;
        Some(self.leases.remove(index))
    }

    /// Writes the leases if they changed: a temp file in the same directory, fsync, rename.
    pub fn save(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let path = self.dir.join(LEASES);
        let tmp = self.dir.join(format!("{TMP_PREFIX}{}", std::process::id()));
        let body = LeaseFile { version: 1, leases: self.leases.clone() };
        let bytes = serde_json::to_vec_pretty(&body)
            .map_err(|source| NetworkError::Corrupt { path: path.clone(), source })?;
        let write = || -> std::io::Result<()> {
            let mut file = File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(&self.dir)?.sync_all()
        };
        write().map_err(NetworkError::state(&path))?;
        self.dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Subnet;

    fn small_net() -> NetworkConfig {
        NetworkConfig::new("t0", "192.168.9.0/29".parse::<Subnet>().unwrap()).unwrap()
    }

    #[test]
    fn allocates_lowest_free_and_reuses_a_vms_lease() {
        let dir = tempfile::tempdir().unwrap();
        let config = small_net();
        let ipam = Ipam::new(dir.path());
        let mut leases = ipam.lock(&config).unwrap();
        let a = leases.allocate(&config, "a").unwrap();
        let b = leases.allocate(&config, "b").unwrap();
        assert_eq!(a.ip, Ipv4Addr::new(192, 168, 9, 2), "the gateway .1 is skipped");
        assert_eq!(b.ip, Ipv4Addr::new(192, 168, 9, 3));
        assert_eq!(leases.allocate(&config, "a").unwrap(), a);
        assert_eq!(a.mac, "02:4b:c0:a8:09:02");
        assert!(a.tap.starts_with("kt") && a.tap.len() == 13);
        leases.release("a");
        assert_eq!(leases.allocate(&config, "c").unwrap().ip, a.ip, "a freed address is reused");
        for vm in ["d", "e", "f"] {
            leases.allocate(&config, vm).unwrap();
        }
        let err = leases.allocate(&config, "g").unwrap_err().to_string();
        assert!(err.contains("no free address"), "{err}");
    }

    #[test]
    fn repairs_invalid_leases_and_stale_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let config = small_net();
        let lease = |vm: &str, ip: [u8; 4]| Lease {
            vm_id: vm.into(),
            ip: ip.into(),
            mac: String::new(),
            tap: String::new(),
            ports: vec![],
        };
        let file = LeaseFile {
            version: 1,
            leases: vec![
                lease("ok", [192, 168, 9, 2]),
                lease("dup-ip", [192, 168, 9, 2]),
                lease("gateway", [192, 168, 9, 1]),
                lease("outside", [10, 0, 0, 2]),
                lease("ok", [192, 168, 9, 3]),
            ],
        };
        fs::write(dir.path().join(LEASES), serde_json::to_vec(&file).unwrap()).unwrap();
        fs::write(dir.path().join(format!("{TMP_PREFIX}999")), b"{half").unwrap();
        let mut leases = Ipam::new(dir.path()).lock(&config).unwrap();
        let vms: Vec<&str> = leases.leases().iter().map(|l| l.vm_id.as_str()).collect();
        assert_eq!(vms, ["ok"]);
        leases.save().unwrap();
        assert!(!dir.path().join(format!("{TMP_PREFIX}999")).exists());
    }

    #[test]
    fn a_corrupt_file_is_reported_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(LEASES), b"{not json").unwrap();
        let err = Ipam::new(dir.path()).lock(&small_net()).err().unwrap().to_string();
        assert!(err.contains("leases.json") && err.contains("move it away"), "{err}");
    }
}
