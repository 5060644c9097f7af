//! A VM's saved record: everything a later process needs to find and control a running VM again.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::agent::AgentChannel;
use crate::error::HypervisorError;
use crate::host::Accelerator;
use crate::process::VmmProcess;
use crate::spec::VmSpec;
use crate::BackendKind;

/// Format of [`VmRecord`] written by this version.
pub const RECORD_FORMAT: u32 = 1;

/// File name of the record in a VM's state directory.
pub const RECORD_FILE: &str = "vm.json";

/// The files a backend keeps in a VM's state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatePaths {
    /// The directory.
    pub dir: PathBuf,
    /// The record (`vm.json`).
    pub record: PathBuf,
    /// The VMM's stdout/stderr log (`vmm.log`).
    pub vmm_log: PathBuf,
    /// The exit status written by the monitor (`vmm.exit`).
    pub exit_file: PathBuf,
    /// kiln-vmm's API socket (`api.sock`).
    pub api_socket: PathBuf,
    /// QEMU's QMP socket (`qmp.sock`).
    pub qmp_socket: PathBuf,
    /// kiln-vmm's vsock Unix socket (`agent.vsock`; Firecracker-style, `_PORT` suffixes for
    /// guest-initiated connections).
    pub agent_vsock: PathBuf,
    /// QEMU's first agent virtio-serial socket (`agent.sock`; the others: [`StatePaths::agent_serial_port`]).
    pub agent_serial: PathBuf,
}

impl StatePaths {
    /// The layout under `dir`.
    pub fn new(dir: &Path) -> Self {
        let f = |name: &str| dir.join(name);
        Self {
            dir: dir.to_path_buf(),
            record: f(RECORD_FILE),
            vmm_log: f("vmm.log"),
            exit_file: f("vmm.exit"),
            api_socket: f("api.sock"),
            qmp_socket: f("qmp.sock"),
            agent_vsock: f("agent.vsock"),
            agent_serial: f("agent.sock"),
        }
    }

    /// The socket of agent virtio-serial port `i` (`agent.sock`, `agent-1.sock`, ...).
    pub fn agent_serial_port(&self, i: usize) -> PathBuf {
        if i == 0 {
            self.agent_serial.clone()
        } else {
            self.dir.join(format!("agent-{i}.sock"))
        }
    }

    /// Creates the directory (mode 0700: sockets inside control the VM) and the console log's,
    /// and removes sockets and status files a previous VM left there.
    pub fn prepare(&self, console_log: &Path) -> Result<(), HypervisorError> {
        let state_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| HypervisorError::StateDir { path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(state_err(&self.dir))?;
        if let Some(parent) = console_log.parent() {
            std::fs::create_dir_all(parent).map_err(state_err(parent))?;
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(state_err(&self.dir))?;
        let ports = (1..crate::spec::AGENT_SERIAL_PORTS).map(|i| self.agent_serial_port(i));
        let fixed =
            [&self.exit_file, &self.api_socket, &self.qmp_socket, &self.agent_vsock, &self.agent_serial];
        for stale in fixed.into_iter().cloned().chain(ports) {
            let stale = &stale;
            match std::fs::remove_file(stale) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(state_err(stale)(e)),
                _ => {}
            }
        }
        Ok(())
    }
}

/// What was created and how to reach it; saved as `vm.json` in the state directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// [`RECORD_FORMAT`] of the writer.
    pub format: u32,
    /// VM name.
    pub name: String,
    /// Backend that created it (and must attach it).
    pub backend: BackendKind,
    /// State directory.
    pub state_dir: PathBuf,
    /// The VMM process, its monitor and its exit-status file.
    pub process: VmmProcess,
    /// kiln-vmm's API socket or QEMU's QMP socket.
    pub control_socket: PathBuf,
    /// The guest's serial console log.
    pub console_log: PathBuf,
    /// The VMM's own log (stdout/stderr).
    pub vmm_log: PathBuf,
    /// How the host reaches the guest agent, when the spec asked for it.
    pub agent: Option<AgentChannel>,
    /// VMM binary.
    pub binary: PathBuf,
    /// Its arguments (for `ps`-style display and debugging).
    pub args: Vec<String>,
    /// The accelerator the VMM uses.
    pub accelerator: Accelerator,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix_secs: u64,
    /// The spec it was created from.
    pub spec: VmSpec,
}

impl VmRecord {
    /// Path of the record in `state_dir`.
    pub fn path_in(state_dir: &Path) -> PathBuf {
        state_dir.join(RECORD_FILE)
    }

    /// Writes the record atomically (temp file, fsync, rename) into its state directory.
    pub fn save(&self) -> Result<(), HypervisorError> {
        let path = Self::path_in(&self.state_dir);
        let json = serde_json::to_vec_pretty(self).map_err(|e| HypervisorError::RecordWrite {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        write_atomic(&path, &json).map_err(|source| HypervisorError::RecordWrite { path, source })
    }

    /// Reads the record saved in `state_dir`.
    pub fn load(state_dir: &Path) -> Result<Self, HypervisorError> {
        let path = Self::path_in(state_dir);
        let text = std::fs::read(&path)
            .map_err(|source| HypervisorError::RecordRead { path: path.clone(), source })?;
        #[derive(Deserialize)]
        struct Format {
            format: u32,
        }
        let format: Format = serde_json::from_slice(&text)
            .map_err(|source| HypervisorError::RecordParse { path: path.clone(), source })?;
        if format.format != RECORD_FORMAT {
            return Err(HypervisorError::RecordFormat {
                path,
                found: format.format,
                expected: RECORD_FORMAT,
            });
        }
        serde_json::from_slice(&text).map_err(|source| HypervisorError::RecordParse { path, source })
    }
}

/// Writes `data` to `path` so that readers see the old or the new content, never a mix.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::process::ProcessId;
    use crate::spec::{AgentSpec, DiskSpec, NetSpec};

    pub(crate) fn record(dir: &Path) -> VmRecord {
        let paths = StatePaths::new(dir);
        let second_port = paths.agent_serial_port(1);
        let mut spec = VmSpec::new("web", "/k/vmlinux", "console=ttyS0 -- true", dir);
        spec.root_disk = Some(DiskSpec { path: "/img/root.ext4".into(), read_only: false });
        spec.network_interfaces.push(NetSpec { tap: "tap0".into(), mac: Some("02:00:00:00:00:01".into()) });
        spec.agent = Some(AgentSpec::default());
        VmRecord {
            format: RECORD_FORMAT,
            name: "web".into(),
            backend: BackendKind::Qemu,
            state_dir: dir.to_path_buf(),
            process: VmmProcess {
                vmm: ProcessId { pid: 10, start_time: 20 },
                monitor: ProcessId { pid: 9, start_time: 19 },
                exit_file: paths.exit_file.clone(),
            },
            control_socket: paths.qmp_socket.clone(),
            console_log: spec.console_log.clone(),
            vmm_log: paths.vmm_log,
            agent: Some(AgentChannel::VirtioSerial {
                more_sockets: vec![second_port],
                socket: paths.agent_serial,
                port_name: crate::spec::AGENT_SERIAL_PORT_NAME.into(),
            }),
            binary: "/usr/bin/qemu-system-x86_64".into(),
            args: vec!["-M".into(), "microvm".into()],
            accelerator: Accelerator::Tcg,
            created_unix_secs: 1_700_000_000,
            spec,
        }
    }

    #[test]
    fn a_saved_record_loads_back_equal_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let r = record(dir.path());
        r.save().unwrap();
        assert_eq!(VmRecord::load(dir.path()).unwrap(), r);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(RECORD_FILE)]);
        // Saving again replaces it.
        let mut r2 = r.clone();
        r2.process.vmm.pid = 11;
        r2.save().unwrap();
        assert_eq!(VmRecord::load(dir.path()).unwrap().process.vmm.pid, 11);
    }

    #[test]
    fn records_of_another_format_or_damaged_ones_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = VmRecord::path_in(dir.path());
        let err = VmRecord::load(dir.path()).unwrap_err();
        assert!(matches!(err, HypervisorError::RecordRead { .. }), "{err}");
        std::fs::write(&path, r#"{"format": 99}"#).unwrap();
        let err = VmRecord::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("format 99") && err.contains("reads format 1"), "{err}");
        std::fs::write(&path, r#"{"format": 1, "name": 3}"#).unwrap();
        let err = VmRecord::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("damaged"), "{err}");
    }

    #[test]
    fn preparing_a_state_dir_removes_what_a_previous_vm_left() {
        let dir = tempfile::tempdir().unwrap();
        let paths = StatePaths::new(&dir.path().join("vm"));
        paths.prepare(&paths.dir.join("console.log")).unwrap();
        std::fs::write(&paths.exit_file, "1 exit 0\n").unwrap();
        std::fs::write(&paths.qmp_socket, "").unwrap();
        std::fs::write(&paths.vmm_log, "old log\n").unwrap();
        paths.prepare(&dir.path().join("logs/console.log")).unwrap();
        assert!(dir.path().join("logs").is_dir());
        assert!(!paths.exit_file.exists() && !paths.qmp_socket.exists());
        assert!(paths.vmm_log.exists(), "logs are kept (appended to)");
    }
}
