//! VM networking for Kiln.
//!
//! Owns: named networks (a Linux bridge holding the gateway address per network, default `kiln0`
//! on 10.77.0.0/16), address leases stored under a state directory the caller passes (one file per
//! network, `flock`ed, replaced atomically, repaired when read), one persistent tap per attached VM
//! as a bridge port, outbound NAT and published ports (`iptables`, Kiln's own chains, every rule
//! tagged), and removing all of it again. Kernel objects are made with `ip` and `iptables` in the
//! network namespace of the calling thread. docs/networking.md explains the choices.
//!
//! Must not: print to the terminal, start or know about VMMs (the caller hands the tap to one), or
//! touch firewall rules and links it did not create.

mod config;
mod error;
mod firewall;
mod host;
pub mod ipam;
mod ports;

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use config::{NetworkConfig, Subnet, DEFAULT_NETWORK, DEFAULT_SUBNET};
pub use error::{NetworkError, Result};
pub use ipam::Lease;
pub use ports::{PortMapping, Protocol};

use firewall::Select;
use ipam::Ipam;

const CONFIG_FILE: &str = "network.json";
/// Held while the host changes: the firewall chains and port numbers are shared by all networks.
const HOST_LOCK: &str = ".host.lock";

/// What a VM needs to join a network: the host tap to give its VMM, and the guest's addressing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub network: String,
    pub tap: String,
    pub mac: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    /// Name servers for the guest (the host's, loopback ones left out); may be empty.
    pub dns: Vec<Ipv4Addr>,
    pub ports: Vec<PortMapping>,
}

impl Attachment {
    /// The netmask for `prefix`.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0))
    }

    /// The Linux kernel's `ip=` argument configuring `eth0` statically (CONFIG_IP_PNP):
    /// `ip=IP::GATEWAY:NETMASK::eth0:off[:DNS0[:DNS1]]`.
    pub fn kernel_ip_arg(&self) -> String {
        let mut arg = format!("ip={}::{}:{}::eth0:off", self.ip, self.gateway, self.netmask());
        for dns in self.dns.iter().take(2) {
            arg.push_str(&format!(":{dns}"));
        }
        arg
    }
}

/// All networks under one state directory (`<state>/<network>/network.json`, `leases.json`).
#[derive(Clone, Debug)]
pub struct Networks {
    dir: PathBuf,
}

impl Networks {
    /// Opens (creating) the state directory. Cheap; nothing on the host changes.
    pub fn open(state_dir: &Path) -> Result<Self> {
        fs::create_dir_all(state_dir).map_err(NetworkError::state(state_dir))?;
        Ok(Networks { dir: state_dir.to_path_buf() })
    }

    /// Serializes host changes across processes (taken before any network's lease lock).
    fn host_lock(&self) -> Result<fs::File> {
        ipam::lock_file(&self.dir.join(HOST_LOCK))
    }

    fn config_path(&self, name: &str) -> PathBuf {
        self.dir.join(name).join(CONFIG_FILE)
    }

    /// Records a network (idempotent for an identical config). The bridge appears with its first VM.
    pub fn create(&self, config: &NetworkConfig) -> Result<()> {
        config.validate()?;
        // Under the host lock: two processes recording one name, or overlapping subnets, at once.
        let _host = self.host_lock()?;
        match self.get(&config.name) {
            Ok(existing) if existing == *config => return Ok(()),
            Ok(existing) => {
                return Err(NetworkError::Conflict {
                    name: config.name.clone(),
                    existing: format!("bridge {}, subnet {}", existing.bridge, existing.subnet),
                })
            }
            Err(NetworkError::UnknownNetwork { .. }) => {}
            Err(e) => return Err(e),
        }
        for other in self.list()? {
            if other.subnet.overlaps(&config.subnet) || other.bridge == config.bridge {
                return Err(NetworkError::Overlap {
                    name: config.name.clone(),
                    subnet: config.subnet.to_string(),
                    other: other.name,
                    other_subnet: other.subnet.to_string(),
                });
            }
        }
        let path = self.config_path(&config.name);
        let dir = self.dir.join(&config.name);
        fs::create_dir_all(&dir).map_err(NetworkError::state(&dir))?;
        let bytes = serde_json::to_vec_pretty(config)
            .map_err(|source| NetworkError::Corrupt { path: path.clone(), source })?;
        let tmp = dir.join(format!(".{CONFIG_FILE}.tmp.{}", std::process::id()));
        fs::write(&tmp, bytes).and_then(|()| fs::rename(&tmp, &path)).map_err(NetworkError::state(&path))
    }

    /// The default network (`kiln0`, 10.77.0.0/16), recorded on first use; an existing record
    /// (possibly edited to another subnet) wins.
    pub fn ensure_default(&self) -> Result<NetworkConfig> {
        match self.get(DEFAULT_NETWORK) {
            Err(NetworkError::UnknownNetwork { .. }) => {
                let config = NetworkConfig::default_network();
                match self.create(&config) {
                    // Another process recorded it first.
                    Err(NetworkError::Conflict { .. }) => self.get(DEFAULT_NETWORK),
                    other => other.map(|()| config),
                }
            }
            other => other,
        }
    }

    pub fn get(&self, name: &str) -> Result<NetworkConfig> {
        config::validate_network_name(name)?;
        let path = self.config_path(name);
        match fs::read(&path) {
            Ok(bytes) => {
                let config: NetworkConfig = serde_json::from_slice(&bytes)
                    .map_err(|source| NetworkError::Corrupt { path: path.clone(), source })?;
                config.validate()?;
                Ok(config)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(NetworkError::UnknownNetwork {
                name: name.to_string(),
                known: self.list()?.into_iter().map(|c| c.name).collect::<Vec<_>>().join(", "),
            }),
            Err(e) => Err(NetworkError::State { path, source: e }),
        }
    }

    /// Recorded networks, by name.
    pub fn list(&self) -> Result<Vec<NetworkConfig>> {
        let entries = fs::read_dir(&self.dir).map_err(NetworkError::state(&self.dir))?;
        let mut names: Vec<String> = entries
            .flatten()
            .filter(|e| e.path().join(CONFIG_FILE).is_file())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| config::validate_network_name(n).is_ok())
            .collect();
        names.sort();
        names.iter().map(|n| self.get(n)).collect()
    }

    fn ipam(&self, name: &str) -> Ipam {
        Ipam::new(&self.dir.join(name))
    }

    /// The network's leases (repaired as they are read).
    pub fn leases(&self, network: &str) -> Result<Vec<Lease>> {
        let config = self.get(network)?;
        let mut leases = self.ipam(network).lock(&config)?;
        leases.save()?;
        Ok(leases.leases().to_vec())
    }

    /// Puts a VM on a network: a lease (its existing one when attached before), the bridge and the
    /// network's rules when missing, the VM's tap, and its published ports (replacing earlier
    /// ones). Idempotent. On failure the VM's new kernel objects are removed again.
    pub fn attach(&self, network: &str, vm_id: &str, ports: &[PortMapping]) -> Result<Attachment> {
        config::validate_vm_id(vm_id)?;
        let config = self.get(network)?;
        let _host = self.host_lock()?;
        self.check_ports_free(&config, vm_id, ports)?;
        let mut leases = self.ipam(network).lock(&config)?;
        let existed = leases.get(vm_id).is_some();
        leases.allocate(&config, vm_id)?;
        leases.set_ports(vm_id, ports);
        let Some(lease) = leases.get(vm_id).cloned() else {
            return Err(NetworkError::Exhausted {
                network: config.name.clone(),
                subnet: config.subnet.to_string(),
            });
        };
        // Saved before the host changes: a crash in between leaves a lease that detach or
        // reclaim removes together with whatever was made.
        leases.save()?;
        if let Err(e) = setup_host(&config, &lease) {
            tracing::warn!(network, vm = vm_id, error = %e, "attach failed; undoing it");
            let _ = teardown_vm(&config, &lease);
            if !existed {
                leases.release(vm_id);
                if leases.leases().is_empty() {
                    let _ = teardown_network(&config);
                }
                leases.save()?;
            }
            return Err(e);
        }
        tracing::info!(network, vm = vm_id, ip = %lease.ip, tap = %lease.tap, "attached");
        Ok(Attachment {
            network: config.name.clone(),
            tap: lease.tap,
            mac: lease.mac,
            ip: lease.ip,
            prefix: config.subnet.prefix(),
            gateway: config.gateway,
            dns: host::host_dns(),
            ports: lease.ports,
        })
    }

    /// Refuses a host port another VM publishes on any network (the caller holds the host lock,
    /// so no other attach can take the port meanwhile).
    fn check_ports_free(&self, config: &NetworkConfig, vm_id: &str, ports: &[PortMapping]) -> Result<()> {
        if ports.is_empty() {
            return Ok(());
        }
        for other in self.list()? {
            let leases = self.ipam(&other.name).lock(&other)?;
            for lease in leases.leases() {
                if other.name == config.name && lease.vm_id == vm_id {
                    continue;
                }
                if let Some(p) = lease
                    .ports
                    .iter()
                    .find(|p| ports.iter().any(|q| q.host_port == p.host_port && q.protocol == p.protocol))
                {
                    return Err(NetworkError::PortInUse {
                        port: p.host_port,
                        protocol: p.protocol,
                        owner: lease.vm_id.clone(),
                        network: other.name.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Takes a VM off a network: its rules, its tap, its lease; the bridge and the network's rules
    /// too when it was the last VM. Idempotent (detaching a VM that is not attached is fine).
    pub fn detach(&self, network: &str, vm_id: &str) -> Result<()> {
        config::validate_vm_id(vm_id)?;
        let config = self.get(network)?;
        let _host = self.host_lock()?;
        let mut leases = self.ipam(network).lock(&config)?;
        let lease = leases.get(vm_id).cloned().unwrap_or_else(|| Lease {
            vm_id: vm_id.to_string(),
            ip: config.gateway,
            mac: String::new(),
            tap: ipam::tap_name(network, vm_id),
            ports: Vec::new(),
        });
        teardown_vm(&config, &lease)?;
        leases.release(vm_id);
        if leases.leases().is_empty() {
            teardown_network(&config)?;
        }
        leases.save()?;
        tracing::info!(network, vm = vm_id, "detached");
        Ok(())
    }

    /// Detaches the VM from every network it has a lease on.
    pub fn detach_everywhere(&self, vm_id: &str) -> Result<()> {
        for config in self.list()? {
            if self.leases(&config.name)?.iter().any(|l| l.vm_id == vm_id) {
                self.detach(&config.name, vm_id)?;
            }
        }
        Ok(())
    }

    /// Detaches every VM on the network for which `is_live` says false (a VM whose record is gone,
    /// e.g. after a crash); returns their ids.
    pub fn reclaim(&self, network: &str, is_live: &dyn Fn(&str) -> bool) -> Result<Vec<String>> {
        let dead: Vec<String> =
            self.leases(network)?.into_iter().map(|l| l.vm_id).filter(|id| !is_live(id)).collect();
        for vm_id in &dead {
            self.detach(network, vm_id)?;
        }
        Ok(dead)
    }

    /// Removes a network: refused while VMs hold leases unless `force` (which detaches them), then
    /// the bridge, its rules and its record.
    pub fn remove(&self, network: &str, force: bool) -> Result<()> {
        let config = self.get(network)?;
        let _host = self.host_lock()?;
        let mut leases = self.ipam(network).lock(&config)?;
        if !leases.leases().is_empty() && !force {
            let vms: Vec<String> = leases.leases().iter().map(|l| l.vm_id.clone()).collect();
            return Err(NetworkError::InUse { network: network.to_string(), vms: vms.join(", ") });
        }
        for lease in leases.leases().to_vec() {
            teardown_vm(&config, &lease)?;
            leases.release(&lease.vm_id);
        }
        teardown_network(&config)?;
        leases.save()?;
        let dir = self.dir.join(network);
        // The lock file goes with the directory; a process waiting on it finds no config next.
        fs::remove_dir_all(&dir).map_err(NetworkError::state(&dir))
    }
}

fn setup_host(config: &NetworkConfig, lease: &Lease) -> Result<()> {
    host::ensure_bridge(config)?;
    firewall::ensure_chains()?;
    firewall::add(&firewall::network_rules(config), &format!("setting up network {}", config.name))?;
    host::ensure_tap(&lease.tap, &config.bridge)?;
    let what = format!("publishing ports of {}", lease.vm_id);
    firewall::delete(&Select::Vm { network: &config.name, vm_id: &lease.vm_id }, &what)?;
    firewall::add(&firewall::port_rules(config, lease), &what)
}

fn teardown_vm(config: &NetworkConfig, lease: &Lease) -> Result<()> {
    let what = format!("removing the network of {}", lease.vm_id);
    firewall::delete(&Select::Vm { network: &config.name, vm_id: &lease.vm_id }, &what)?;
    host::delete_link(&lease.tap)
}

fn teardown_network(config: &NetworkConfig) -> Result<()> {
    firewall::delete(&Select::Network(&config.name), &format!("removing network {}", config.name))?;
    firewall::remove_chains_if_unused()?;
    host::delete_link(&config.bridge)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_ip_argument() {
        let a = Attachment {
            network: "kiln0".into(),
            tap: "kt0".into(),
            mac: "02:4b:0a:4d:00:02".into(),
            ip: "10.77.0.2".parse().unwrap(),
            prefix: 16,
            gateway: "10.77.0.1".parse().unwrap(),
            dns: vec!["192.0.2.53".parse().unwrap()],
            ports: vec![],
        };
        assert_eq!(a.kernel_ip_arg(), "ip=10.77.0.2::10.77.0.1:255.255.0.0::eth0:off:192.0.2.53");
    }

    #[test]
    fn networks_are_recorded_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let nets = Networks::open(dir.path()).unwrap();
        let default = nets.ensure_default().unwrap();
        assert_eq!(nets.ensure_default().unwrap(), default);
        let other = NetworkConfig::new("lab", "10.77.8.0/24".parse().unwrap()).unwrap();
        let err = nets.create(&other).unwrap_err().to_string();
        assert!(err.contains("overlaps network \"kiln0\""), "{err}");
        let other = NetworkConfig::new("lab", "10.78.8.0/24".parse().unwrap()).unwrap();
        nets.create(&other).unwrap();
        nets.create(&other).unwrap();
        let names: Vec<String> = nets.list().unwrap().into_iter().map(|c| c.name).collect();
        assert_eq!(names, ["kiln0", "lab"]);
        let err = nets.get("nope").unwrap_err().to_string();
        assert!(err.contains("known: kiln0, lab"), "{err}");
        let err = nets.attach("kiln0", "bad id", &[]).unwrap_err().to_string();
        assert!(err.contains("VM id"), "{err}");
    }
}
