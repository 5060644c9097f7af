//! Kiln's VM manager: everything `kiln` does between the command line and the backends.
//!
//! Owns: the store of VM records under the state root ([`store`]: one JSON record per VM replaced
//! atomically, a store-wide `flock`, crash repair on open), the lifecycle state machine
//! ([`VmStatus`]: created → running ⇄ paused → exited → running ...), making a VM from an image
//! (per-VM disk copy of the image's cached root filesystem, which `kiln-image` built with the static
//! agent in it; an ssh key pair; at each boot the agent's configuration from the image config and
//! overrides, sent over the agent channel), kernels ([`kernels`]), agent sessions (exec,
//! attach, copies, graceful shutdown) and reconciling records with live VMM processes, so a VMM
//! that died reads as exited with its code, never as running.
//!
//! Networking is `kiln-network`'s: a VM created with a network gets its lease, tap and published
//! ports from it (state under `<root>/networks`) and gives them back on `rm`.
//!
//! Must not: print to the terminal (the CLI renders what this returns), create bridges, taps or
//! NAT rules itself (it asks `kiln-network`), or link a VMM.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A timing mark of `kiln run`'s phases (create, start, agent, finish): a `debug` event with the
/// target `kiln::phase`, so `KILN_LOG=kiln::phase=debug` prints timestamped phases (`bench/kiln`
/// uses them to break the overhead down).
macro_rules! phase {
    ($msg:literal) => {
        tracing::debug!(target: "kiln::phase", $msg)
    };
}

pub mod copy;
pub mod error;
pub mod guest;
pub mod kernels;
pub mod lifecycle;
pub mod record;
pub mod store;

pub use error::{ManagerError, Result};
pub use kernels::{KernelInfo, KernelStore};
pub use lifecycle::{CreateOptions, PruneSummary};
pub use record::{ExitInfo, GuestAddress, MainProcess, NetworkAttachment, VmEntry, VmStatus};

use kiln_hypervisor::{BackendOptions, HostProbe};
use kiln_image::ImageStore;
use store::VmStore;

/// `KILN_ROOT`: the state root when `--root` is not given.
pub const ROOT_ENV: &str = "KILN_ROOT";
/// The state root when neither `--root` nor `KILN_ROOT` is given.
pub const DEFAULT_ROOT: &str = "/var/lib/kiln";

/// How long a guest may take to boot until its agent answers (TCG boots take seconds).
pub const AGENT_BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Options of [`Manager::open`].
#[derive(Debug, Clone, Default)]
pub struct ManagerOptions {
    /// The static agent to inject (else `$KILN_AGENT_BIN`, else `kiln-agent` next to the program).
    pub agent_binary: Option<PathBuf>,
    /// Backend options (QEMU accelerator, kiln-vmm `allow_pvm`).
    pub backends: BackendOptions,
}

/// The manager of one state root.
pub struct Manager {
    root: PathBuf,
    images: ImageStore,
    kernels: KernelStore,
    vms: VmStore,
    networks: kiln_network::Networks,
    probe: HostProbe,
    options: ManagerOptions,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager").field("root", &self.root).finish()
    }
}

/// The state root: `explicit`, else `$KILN_ROOT`, else [`DEFAULT_ROOT`].
pub fn state_root(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(ROOT_ENV).filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT))
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Manager {
    /// Opens (creating) the state root and repairs what a crash left: half-made VM directories,
    /// and records of VMs whose VMM is gone (they become exited with its code).
    pub fn open(root: &Path, options: ManagerOptions) -> Result<Self> {
        std::fs::create_dir_all(root).map_err(error::io_err("creating the state root", root))?;
        let manager = Manager {
            root: root.to_path_buf(),
            images: ImageStore::open(root)?,
            kernels: KernelStore::open(root)?,
            vms: VmStore::open(root)?,
            networks: kiln_network::Networks::open(&root.join("networks"))?,
            probe: HostProbe::detect(),
            options,
        };
        {
            let _lock = manager.vms.lock()?;
            manager.vms.repair()?;
            manager.reclaim_network_leases();
        }
        Ok(manager)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn images(&self) -> &ImageStore {
        &self.images
    }

    pub fn kernels(&self) -> &KernelStore {
        &self.kernels
    }

    /// The networks VMs attach to (`kiln network ...`).
    pub fn networks(&self) -> &kiln_network::Networks {
        &self.networks
    }

    /// Gives back the leases (taps, rules) of VMs whose records are gone — a crash between
    /// attaching and recording, or a VM directory removed by hand. Best effort: a failure (e.g.
    /// no privilege to remove a tap) is logged and retried by the next command.
    fn reclaim_network_leases(&self) {
        let Ok(known) = self.vms.list() else { return };
        let ids: std::collections::HashSet<String> = known.into_iter().map(|e| e.id).collect();
        for network in self.networks.list().unwrap_or_default() {
            let has_dead = self
                .networks
                .leases(&network.name)
                .is_ok_and(|leases| leases.iter().any(|l| !ids.contains(&l.vm_id)));
            if has_dead {
                if let Err(e) = self.networks.reclaim(&network.name, &|vm| ids.contains(vm)) {
                    tracing::warn!(network = %network.name, error = %e, "could not reclaim leases of removed VMs");
                }
            }
        }
    }

    /// What each backend can do on this host (`kiln info`).
    pub fn host_report(&self) -> Vec<kiln_hypervisor::Capabilities> {
        self.probe.report()
    }

    pub fn probe(&self) -> &HostProbe {
        &self.probe
    }
}
