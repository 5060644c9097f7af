//! What a VM is made of, independent of the backend that runs it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::HypervisorError;

/// Most vCPUs a spec may ask for (kiln-vmm's and Firecracker's limit).
pub const MAX_VCPUS: u8 = 32;

/// Smallest guest memory a spec may ask for, in MiB.
pub const MIN_MEMORY_MIB: u32 = 16;

/// The vsock port the guest agent listens on unless the spec says otherwise.
pub const DEFAULT_AGENT_PORT: u32 = 1024;

/// The guest CID given to the vsock device (the first one a guest may have).
pub const AGENT_GUEST_CID: u32 = 3;

/// Name of the virtio-serial port carrying the agent channel where there is no vsock (QEMU here).
/// The further ports are `kiln.agent.1` ... (see [`agent_serial_port_name`]).
pub const AGENT_SERIAL_PORT_NAME: &str = "kiln.agent";

/// Agent ports per VM on virtio-serial: a port carries one host connection at a time, so this many
/// `kiln` commands can talk to one VM's agent at once (`run` attached plus `exec`s, say).
pub const AGENT_SERIAL_PORTS: usize = 4;

/// The name of agent port `i` (`kiln.agent`, `kiln.agent.1`, ...).
pub fn agent_serial_port_name(i: usize) -> String {
    if i == 0 {
        AGENT_SERIAL_PORT_NAME.to_string()
    } else {
        format!("{AGENT_SERIAL_PORT_NAME}.{i}")
    }
}

/// Longest VM name (Firecracker's instance id limit).
pub const MAX_NAME_LEN: usize = 64;

/// Longest Unix socket path (`sun_path` holds 108 bytes including the terminating NUL).
pub const MAX_SOCKET_PATH_LEN: usize = 107;

/// A block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Host file (raw image) or block device.
    pub path: PathBuf,
    /// The guest may not write to it.
    pub read_only: bool,
}

/// A network interface backed by a host tap device the caller created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSpec {
    /// Host tap device name.
    pub tap: String,
    /// Guest MAC address, `xx:xx:xx:xx:xx:xx`; the backend picks one when absent.
    pub mac: Option<String>,
}

/// How the host reaches the guest agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSpec {
    /// vsock port the agent listens on (where the channel is vsock).
    pub vsock_port: u32,
}

impl Default for AgentSpec {
    fn default() -> Self {
        Self { vsock_port: DEFAULT_AGENT_PORT }
    }
}

/// Everything a backend needs to create a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// VM name: 1-64 characters of `A-Z a-z 0-9 -` (Firecracker's instance id rules); becomes the
    /// VMM's instance id.
    pub name: String,
    /// Guest kernel: ELF vmlinux (PVH note) or bzImage.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line. Backends add their own kernel parameters (root device, virtio-mmio
    /// devices) before ` -- `; whatever follows ` -- ` stays the init's arguments.
    pub cmdline: String,
    /// vCPUs (1..=32).
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// The root device: the guest's `/dev/vda`, announced as `root=/dev/vda rw|ro`.
    pub root_disk: Option<DiskSpec>,
    /// More block devices, after the root disk (`/dev/vdb`, ... or `/dev/vda`, ... without one).
    pub extra_disks: Vec<DiskSpec>,
    /// Network interfaces (`eth0`, `eth1`, ... in the guest).
    pub network_interfaces: Vec<NetSpec>,
    /// Give the guest an agent channel.
    pub agent: Option<AgentSpec>,
    /// File the guest's serial console is written to (appended).
    pub console_log: PathBuf,
    /// Directory holding this VM's sockets, logs, exit status and record; created if missing.
    /// Its path must be short enough for Unix socket paths inside it (about 90 bytes).
    pub state_dir: PathBuf,
}

impl VmSpec {
    /// A spec with one vCPU, 128 MiB, no devices, the console at `<state_dir>/console.log`.
    pub fn new(name: &str, kernel: impl Into<PathBuf>, cmdline: &str, state_dir: impl Into<PathBuf>) -> Self {
        let state_dir = state_dir.into();
        Self {
            name: name.to_string(),
            kernel: kernel.into(),
            initrd: None,
            cmdline: cmdline.to_string(),
            vcpus: 1,
            memory_mib: 128,
            root_disk: None,
            extra_disks: Vec::new(),
            network_interfaces: Vec::new(),
            agent: None,
            console_log: state_dir.join("console.log"),
            state_dir,
        }
    }

    /// All disks in attach order: the root disk first.
    pub fn disks(&self) -> impl Iterator<Item = &DiskSpec> {
        self.root_disk.iter().chain(self.extra_disks.iter())
    }

    /// Checks what every backend needs; backends check their own limits on top.
    pub fn validate(&self) -> Result<(), HypervisorError> {
        let invalid = |msg: String| Err(HypervisorError::InvalidSpec(msg));
        if !is_valid_name(&self.name) {
            return invalid(format!(
                "VM name {:?} must be 1-{MAX_NAME_LEN} characters of A-Z, a-z, 0-9 or '-'",
                self.name
            ));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return invalid(format!("{} vCPUs asked; use 1 to {MAX_VCPUS}", self.vcpus));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return invalid(format!(
                "{} MiB of memory asked; use at least {MIN_MEMORY_MIB}",
                self.memory_mib
            ));
        }
        require_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            require_file("initrd", initrd)?;
        }
        for disk in self.disks() {
            require_file("disk", &disk.path)?;
        }
        for net in &self.network_interfaces {
            if net.tap.is_empty() || net.tap.len() > 15 || net.tap.contains(['/', ',', ' ']) {
                return invalid(format!(
                    "tap name {:?} must be 1-15 characters without '/', ',' or spaces",
                    net.tap
                ));
            }
            if let Some(mac) = &net.mac {
                if !kiln_fc_api::models::is_valid_mac(mac) {
                    return invalid(format!("MAC address {mac:?} must be written xx:xx:xx:xx:xx:xx"));
                }
            }
        }
        if self.cmdline.contains(['\n', '\0']) {
            return invalid("the kernel command line must be one line without NUL bytes".into());
        }
        if !self.state_dir.is_absolute() || !self.console_log.is_absolute() {
            return invalid(format!(
                "state directory {} and console log {} must be absolute paths",
                self.state_dir.display(),
                self.console_log.display()
            ));
        }
        // The longest socket name a backend puts there is "agent.vsock_1024" style; leave room.
        let longest = self.state_dir.join("agent.vsock_4294967295");
        if longest.as_os_str().len() > MAX_SOCKET_PATH_LEN {
            return invalid(format!(
                "state directory {} is too long for Unix socket paths inside it ({} bytes at most); \
                 use a shorter state root",
                self.state_dir.display(),
                MAX_SOCKET_PATH_LEN - "/agent.vsock_4294967295".len()
            ));
        }
        Ok(())
    }
}

fn require_file(what: &str, path: &Path) -> Result<(), HypervisorError> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_dir() => Ok(()),
        Ok(_) => {
            Err(HypervisorError::InvalidSpec(format!("{what} {} is a directory, not a file", path.display())))
        }
        Err(e) => Err(HypervisorError::InvalidSpec(format!("{what} {} cannot be used: {e}", path.display()))),
    }
}

/// Whether `name` can be a VM name (and a Firecracker instance id).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// `cmdline` with `params` added as kernel parameters: before ` -- ` when there is one (what
/// follows belongs to init), else at the end.
pub fn with_kernel_params(cmdline: &str, params: &[String]) -> String {
    let cmdline = cmdline.trim();
    let (kernel_part, init_part) = if cmdline == "--" || cmdline.starts_with("-- ") {
        ("", Some(cmdline))
    } else if let Some(i) = cmdline.find(" -- ") {
        (&cmdline[..i], Some(&cmdline[i + 1..]))
    } else {
        (cmdline, None)
    };
    let mut words: Vec<&str> = Vec::new();
    if !kernel_part.is_empty() {
        words.push(kernel_part);
    }
    words.extend(params.iter().map(String::as_str));
    if let Some(init) = init_part {
        words.push(init);
    }
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn kernel_params_go_before_the_init_arguments() {
        let p = params(&["root=/dev/vda", "rw"]);
        assert_eq!(
            with_kernel_params("console=ttyS0 -- echo hi", &p),
            "console=ttyS0 root=/dev/vda rw -- echo hi"
        );
        assert_eq!(with_kernel_params("console=ttyS0", &p), "console=ttyS0 root=/dev/vda rw");
        assert_eq!(with_kernel_params("-- echo a -- b", &p), "root=/dev/vda rw -- echo a -- b");
        assert_eq!(with_kernel_params("  quiet  ", &[]), "quiet");
        assert_eq!(with_kernel_params("", &p), "root=/dev/vda rw");
        assert_eq!(with_kernel_params("--", &p), "root=/dev/vda rw --");
    }

    #[test]
    fn names_are_restricted_to_instance_id_characters() {
        assert!(is_valid_name("web-1-Test"));
        assert!(is_valid_name(&"x".repeat(64)));
        for bad in ["", "a b", "a/b", "a.b", "a_b", "é", &"x".repeat(65)] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn validation_names_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"k").unwrap();
        let ok = VmSpec::new("vm", &kernel, "console=ttyS0", dir.path().join("state"));
        ok.validate().unwrap();

        let check = |f: &dyn Fn(&mut VmSpec), want: &str| {
            let mut s = ok.clone();
            f(&mut s);
            let msg = s.validate().unwrap_err().to_string();
            assert!(msg.contains(want), "{msg:?} lacks {want:?}");
        };
        check(&|s| s.vcpus = 0, "use 1 to 32");
        check(&|s| s.memory_mib = 1, "at least 16");
        check(&|s| s.kernel = dir.path().join("missing"), "kernel");
        check(
            &|s| s.extra_disks.push(DiskSpec { path: dir.path().to_path_buf(), read_only: true }),
            "directory",
        );
        check(&|s| s.network_interfaces.push(NetSpec { tap: "tap/0".into(), mac: None }), "tap name");
        check(
            &|s| s.network_interfaces.push(NetSpec { tap: "tap0".into(), mac: Some("nope".into()) }),
            "MAC address",
        );
        check(&|s| s.state_dir = PathBuf::from(format!("/{}", "d".repeat(100))), "too long");
        check(&|s| s.state_dir = PathBuf::from("relative"), "absolute");
        check(&|s| s.cmdline = "a\nb".into(), "one line");
    }
}
