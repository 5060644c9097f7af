//! A VM's record in the store: what it was made from, how to run it, and where it is in its
//! lifecycle. One JSON file per VM (`<root>/vms/<id>/vm-record.json`), replaced atomically.

use std::net::Ipv4Addr;

use kiln_hypervisor::{BackendKind, ProcessId, VmExit};
use serde::{Deserialize, Serialize};

/// Format version of [`VmEntry`] files.
pub const ENTRY_FORMAT: u32 = 1;

/// Where a VM is in its lifecycle: `Creating → Created → Running ⇄ Paused → Exited → Running ...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmStatus {
    /// Its directory and disk are being made by the process in [`VmEntry::creator`]; a crash leaves
    /// it here, and the next command that opens the store removes it.
    Creating,
    /// Made, never started.
    Created,
    /// Its VMM runs the guest.
    Running,
    /// Its vCPUs are paused.
    Paused,
    /// Its VMM has ended (see [`VmEntry::exit`]).
    Exited,
}

impl VmStatus {
    /// True while a VMM process exists for it.
    pub fn is_live(self) -> bool {
        matches!(self, VmStatus::Running | VmStatus::Paused)
    }

    /// The word `ps` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            VmStatus::Creating => "creating",
            VmStatus::Created => "created",
            VmStatus::Running => "running",
            VmStatus::Paused => "paused",
            VmStatus::Exited => "exited",
        }
    }
}

impl std::fmt::Display for VmStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The process the guest agent runs at boot (from the image config and the command line).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MainProcess {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
}

/// How a VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// The main process's exit code (128+N for signal N), when the guest reported it.
    pub main_code: Option<i32>,
    /// How the VMM process ended.
    pub vmm: VmExit,
}

impl ExitInfo {
    /// The code `ps` shows and `run` exits with: the main process's, else 0 for a VMM that ended
    /// cleanly, else 128+signal or 255.
    pub fn code(&self) -> i32 {
        match (self.main_code, self.vmm) {
            (Some(code), _) => code,
            (None, VmExit::Code(code)) => code,
            (None, VmExit::Signal(sig)) => 128 + sig,
            (None, VmExit::Unknown) => 255,
        }
    }
}

/// The guest side of a network attachment, configured with the kernel's `ip=` parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestAddress {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
}

/// The seam for `kiln-network`: a tap it created for this VM, the guest's MAC, and the address the
/// guest configures on `eth0`. Kiln-manager only passes these to the backend and the guest kernel;
/// creating and removing taps, bridges and NAT rules is the network crate's job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkAttachment {
    /// Host tap device (exists before the VM starts).
    pub tap: String,
    /// Guest MAC address; derived from the VM name when absent.
    pub mac: Option<String>,
    /// Guest address on eth0; none: the guest leaves eth0 unconfigured.
    pub guest: Option<GuestAddress>,
    /// The kiln-network network that made the tap and leased the address (detached on `rm`);
    /// none for a tap the caller made.
    #[serde(default)]
    pub network: Option<String>,
    /// Published ports (`-p`).
    #[serde(default)]
    pub ports: Vec<kiln_network::PortMapping>,
}

impl From<kiln_network::Attachment> for NetworkAttachment {
    fn from(a: kiln_network::Attachment) -> Self {
        NetworkAttachment {
            tap: a.tap,
            mac: Some(a.mac),
            guest: Some(GuestAddress { address: a.ip, prefix_len: a.prefix, gateway: Some(a.gateway) }),
            network: Some(a.network),
            ports: a.ports,
        }
    }
}

impl NetworkAttachment {
    /// The kernel `ip=` parameter for the guest address (`ip=A::GW:MASK::eth0:off`).
    pub fn kernel_param(&self) -> Option<String> {
        let g = self.guest?;
        let mask = if g.prefix_len == 0 { 0 } else { u32::MAX << (32 - u32::from(g.prefix_len.min(32))) };
        let gw = g.gateway.map(|g| g.to_string()).unwrap_or_default();
        Some(format!("ip={}::{gw}:{}::eth0:off", g.address, Ipv4Addr::from(mask)))
    }
}

/// Everything the store knows about one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEntry {
    /// [`ENTRY_FORMAT`].
    pub format: u32,
    /// 16 hex digits, unique in the store; names the VM's directory.
    pub id: String,
    /// Unique name (`--name`, else derived from the ID).
    pub name: String,
    /// The image as the user named it.
    pub image: String,
    /// The image ID (config digest) the disk was made from.
    pub image_id: String,
    /// Kernel name in the kernel store.
    pub kernel: String,
    pub backend: BackendKind,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// Disk size asked for (bytes); the image's size plus headroom when absent.
    pub disk_size: Option<u64>,
    pub main: MainProcess,
    /// Remove the VM when it exits (`--rm`).
    pub auto_remove: bool,
    pub network: Option<NetworkAttachment>,
    pub status: VmStatus,
    /// The process making the VM while `status` is `Creating`.
    pub creator: Option<ProcessId>,
    /// Seconds since the epoch.
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub exit: Option<ExitInfo>,
    /// Size of the console log when the VM last started (its exit line is searched after it).
    pub console_offset: u64,
}

impl VmEntry {
    /// The exit code to show, for an exited VM.
    pub fn exit_code(&self) -> Option<i32> {
        (self.status == VmStatus::Exited).then(|| self.exit.map(|e| e.code())).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_ip_parameter_has_address_gateway_and_mask() {
        let net = NetworkAttachment {
            tap: "kt0".into(),
            mac: None,
            guest: Some(GuestAddress {
                address: "10.88.0.5".parse().unwrap(),
                prefix_len: 24,
                gateway: Some("10.88.0.1".parse().unwrap()),
            }),
            network: None,
            ports: vec![],
        };
        assert_eq!(net.kernel_param().unwrap(), "ip=10.88.0.5::10.88.0.1:255.255.255.0::eth0:off");
        assert_eq!(NetworkAttachment { guest: None, ..net }.kernel_param(), None);
    }

    #[test]
    fn exit_code_prefers_the_main_process() {
        let e = ExitInfo { main_code: Some(3), vmm: VmExit::Code(0) };
        assert_eq!(e.code(), 3);
        assert_eq!(ExitInfo { main_code: None, vmm: VmExit::Signal(9) }.code(), 137);
        assert_eq!(ExitInfo { main_code: None, vmm: VmExit::Unknown }.code(), 255);
    }
}
