//! Kiln's hypervisor backends behind one trait.
//!
//! Owns: the [`Hypervisor`] trait (capabilities, create, attach) and the [`Vm`] handle (start,
//! pause, resume, stop, kill, wait, state, console, agent channel); the two backends —
//! [`kiln_vmm::KilnVmmBackend`] (default; drives `kiln-vmm` only through its Firecracker-compatible
//! API with `kiln_fc_api`'s client) and [`qemu::QemuBackend`] (`qemu-system-x86_64 -M microvm`,
//! controlled over QMP with the [`qmp`] client, accelerator `kvm` where `/dev/kvm` is hardware KVM
//! and `tcg` elsewhere); the host probe behind `kiln info` ([`host`]); detached VMM processes that
//! outlive the caller and the record ([`record::VmRecord`]) a later process attaches from.
//!
//! Must not: link the VMM core (`kiln-vmm` is a separate process reached over its socket), print to
//! the terminal (notices are returned in [`Capabilities`] and logged with `tracing`), or kill a VM
//! because a handle was dropped: a VM lives until it is stopped, killed, or its guest ends it.
//!
//! # Processes and exit statuses
//!
//! A VM must outlive the `kiln` command that created it, and a later `kiln` must still learn how its
//! VMM ended. A detached process is nobody's child we can `waitpid` on, so each VMM gets a
//! **monitor**: `create` double-forks (the intermediate child calls `setsid` and exits at once, so
//! the monitor is reparented to init and never becomes our zombie); the monitor forks and execs the
//! VMM in its own process group with stdio on files, then blocks in `waitpid` and writes
//! `<pid> exit <code>` or `<pid> signal <n>` atomically to `vmm.exit` in the state directory. See
//! [`detach`](crate::detach) for the sequence.
//!
//! Why a forked monitor rather than the alternatives: a `sh -c 'vmm; echo $? > file'` wrapper
//! reports a death by signal N as 128+N, which collides with kiln-vmm's own exit codes 152–154; a
//! separate monitor binary would have to be installed next to every program that creates VMs. The
//! forked monitor gets the exact `waitpid` status and needs nothing but this library. Its cost: the
//! monitor is a copy-on-write image of the creating process (it closes every fd it inherited, so it
//! holds no sockets, locks or terminal; its memory is the creator's resident pages at fork time —
//! small for the `kiln` CLI). Between `fork` and `execve`/`_exit` the children make only
//! async-signal-safe system calls on data prepared before forking.
//!
//! A VMM is identified by pid **and start time** (`/proc/PID/stat` field 22), so a reused pid is
//! never mistaken for it; signals go through a pidfd checked against that identity. If the VMM was
//! killed (SIGKILL included) its monitor records the signal; if the monitor was killed as well, the
//! VM reads as exited with [`VmExit::Unknown`].
//!
//! # Re-attaching
//!
//! `create` saves a [`VmRecord`] as `vm.json` in the VM's state directory: the VMM and monitor
//! identities, the control socket (kiln-vmm API or QMP), the console log, the agent channel and the
//! spec. [`attach`] (or [`Hypervisor::attach`]) builds a new [`Vm`] handle from it in any process.
//!
//! ```no_run
//! use std::time::Duration;
//! use kiln_hypervisor::{open_backend, BackendKind, BackendOptions, HostProbe, VmSpec};
//!
//! let probe = HostProbe::detect();
//! let backend = open_backend(BackendKind::Qemu, &probe, &BackendOptions::default());
//! let mut spec = VmSpec::new("demo", "/path/vmlinux", "console=ttyS0 reboot=k -- echo hi", "/tmp/kiln/demo");
//! spec.initrd = Some("/path/initramfs.cpio.gz".into());
//! let vm = backend.create(&spec)?;
//! vm.start()?;
//! let exit = vm.wait(Some(Duration::from_secs(60)))?;
//! println!("{:?}; console in {}", exit, vm.console_log().display());
//! # Ok::<(), kiln_hypervisor::HypervisorError>(())
//! ```

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod agent;
mod detach;
pub mod error;
pub mod host;
pub mod kiln_vmm;
mod machine;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod record;
pub mod spec;

pub use agent::{AgentChannel, AgentError, AgentStream};
pub use error::HypervisorError;
pub use host::{Accelerator, AgentTransport, Capabilities, HostProbe, KvmStatus, ProbePaths};
pub use process::{ProcessId, VmExit, VmmProcess};
pub use record::{StatePaths, VmRecord};
pub use spec::{AgentSpec, DiskSpec, NetSpec, VmSpec};

/// A hypervisor backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum BackendKind {
    /// Kiln's own VMM, driven through its Firecracker-compatible API (the default).
    #[default]
    #[serde(rename = "kiln-vmm")]
    KilnVmm,
    /// QEMU's `microvm` machine, driven over QMP.
    #[serde(rename = "qemu")]
    Qemu,
}

impl BackendKind {
    /// Every backend, the default first.
    pub const ALL: [BackendKind; 2] = [BackendKind::KilnVmm, BackendKind::Qemu];

    /// The name used on the command line (`--hypervisor NAME`).
    pub fn name(&self) -> &'static str {
        match self {
            BackendKind::KilnVmm => "kiln-vmm",
            BackendKind::Qemu => "qemu",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `--hypervisor NAME` named no backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown hypervisor {0:?}: use kiln-vmm or qemu")]
pub struct UnknownBackend(pub String);

impl FromStr for BackendKind {
    type Err = UnknownBackend;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BackendKind::ALL.into_iter().find(|b| b.name() == s).ok_or_else(|| UnknownBackend(s.to_string()))
    }
}

/// The state of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// The VMM runs and is configured; the guest has not started.
    Created,
    /// The guest runs.
    Running,
    /// The guest's vCPUs are paused (QEMU also reports an error stop such as a guest panic under
    /// `panic=0` this way).
    Paused,
    /// The VMM has exited.
    Exited(VmExit),
}

/// How [`Vm::stop`] ended the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stopped {
    /// The VMM's exit status.
    pub exit: VmExit,
    /// True when the guest did not shut down in time and the VMM was killed.
    pub forced: bool,
}

/// A hypervisor backend on this host.
pub trait Hypervisor: Send + Sync {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// Whether this backend can run VMs here, with which accelerator, and why not.
    fn capabilities(&self) -> Capabilities;

    /// Starts a VMM for `spec` (detached: it outlives this process), configures it, saves the
    /// record in the state directory, and returns a handle with the guest not yet started
    /// ([`VmState::Created`]). On failure the VMM is killed; its log stays in the state directory.
    fn create(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, HypervisorError>;

    /// A handle on a VM this backend created, from its saved record (in any process).
    fn attach(&self, record: VmRecord) -> Result<Box<dyn Vm>, HypervisorError>;
}

/// A VM's handle. Dropping it leaves the VM running. Calls may come from several threads (e.g. one
/// waits while another stops).
pub trait Vm: Send + Sync {
    /// Its record (what `vm.json` holds).
    fn record(&self) -> &VmRecord;

    /// Boots the guest.
    fn start(&self) -> Result<(), HypervisorError>;

    /// Pauses the guest's vCPUs.
    fn pause(&self) -> Result<(), HypervisorError>;

    /// Resumes paused vCPUs.
    fn resume(&self) -> Result<(), HypervisorError>;

    /// Asks the guest to shut down (Ctrl-Alt-Del on both backends; a paused guest is resumed
    /// first so it can react), waits up to `timeout`, then kills the VMM. A VM that was never
    /// started is killed at once; one that already exited reports how.
    fn stop(&self, timeout: Duration) -> Result<Stopped, HypervisorError>;

    /// Kills the VMM (SIGKILL) and returns its exit status.
    fn kill(&self) -> Result<VmExit, HypervisorError>;

    /// Waits for the VMM to exit, at most `timeout` (`None`: forever); `Ok(None)` on timeout.
    fn wait(&self, timeout: Option<Duration>) -> Result<Option<VmExit>, HypervisorError>;

    /// The current state, asked of the VMM while it runs.
    fn state(&self) -> Result<VmState, HypervisorError>;

    /// VM name.
    fn name(&self) -> &str {
        &self.record().name
    }

    /// The file the guest's serial console is written to.
    fn console_log(&self) -> &Path {
        &self.record().console_log
    }

    /// How to reach the guest agent (when the spec asked for a channel).
    fn agent_channel(&self) -> Option<&AgentChannel> {
        self.record().agent.as_ref()
    }
}

/// Options for [`open_backend`].
#[derive(Debug, Clone, Default)]
pub struct BackendOptions {
    /// kiln-vmm backend options.
    pub kiln_vmm: kiln_vmm::KilnVmmOptions,
    /// QEMU backend options.
    pub qemu: qemu::QemuOptions,
}

/// The backend `kind` on a host described by `probe`.
pub fn open_backend(kind: BackendKind, probe: &HostProbe, options: &BackendOptions) -> Box<dyn Hypervisor> {
    match kind {
        BackendKind::KilnVmm => {
            Box::new(kiln_vmm::KilnVmmBackend::new(probe.clone(), options.kiln_vmm.clone()))
        }
        BackendKind::Qemu => Box::new(qemu::QemuBackend::new(probe.clone(), options.qemu.clone())),
    }
}

/// A handle on the VM whose record is `record`, with the backend that created it.
pub fn attach(record: VmRecord) -> Result<Box<dyn Vm>, HypervisorError> {
    match record.backend {
        BackendKind::KilnVmm => kiln_vmm::attach(record),
        BackendKind::Qemu => qemu::attach(record),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_round_trip_and_unknown_ones_list_the_choices() {
        for b in BackendKind::ALL {
            assert_eq!(b.name().parse::<BackendKind>().unwrap(), b);
            assert_eq!(serde_json::to_string(&b).unwrap(), format!("\"{}\"", b.name()));
        }
        assert_eq!(BackendKind::default(), BackendKind::KilnVmm);
        let err = "xen".parse::<BackendKind>().unwrap_err().to_string();
        assert_eq!(err, "unknown hypervisor \"xen\": use kiln-vmm or qemu");
    }
}
