//! The VM lifecycle: create, start (detached or attached), stop, kill, pause, resume, remove, and
//! reconciling records with the VMM processes. Store updates happen under the store lock; slow
//! waits (a guest shutting down) happen outside it.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln_agent_proto::{Client, ExitStatus, Process, ShutdownAction};
use kiln_hypervisor::{
    open_backend, AgentSpec, BackendKind, DiskSpec, NetSpec, ProcessId, Vm, VmExit, VmRecord, VmSpec,
};
use kiln_image::{Progress, PruneReport};

use crate::error::{io_err, ManagerError, Result};
use crate::guest::{self, BootSettings};
use crate::record::{ExitInfo, MainProcess, NetworkAttachment, VmEntry, VmStatus, ENTRY_FORMAT};
use crate::{now_secs, Manager, AGENT_BOOT_TIMEOUT};

/// How long a guest has to power off after its main process ended and the host let go.
const POWEROFF_WAIT: Duration = Duration::from_secs(30);

/// What `kiln create` / `kiln run` asks for.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub image: String,
    pub name: Option<String>,
    /// Replaces the image's Cmd (the Entrypoint stays), like `docker run IMAGE CMD...`.
    pub command: Vec<String>,
    /// `KEY=VALUE`, overriding the image's Env.
    pub env: Vec<String>,
    pub kernel: Option<String>,
    pub backend: BackendKind,
    pub vcpus: u8,
    pub memory_mib: u32,
    pub disk_size: Option<u64>,
    pub auto_remove: bool,
    /// A tap the caller made (kept as is, never removed by Kiln). Takes precedence over
    /// `network_name`.
    pub network: Option<NetworkAttachment>,
    /// The kiln-network network to attach to (`kiln0` is made on first use); none: no network.
    pub network_name: Option<String>,
    /// Ports to publish (`-p HOST:GUEST[/proto]`); needs `network_name`.
    pub publish: Vec<kiln_network::PortMapping>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            image: String::new(),
            name: None,
            command: Vec::new(),
            env: Vec::new(),
            kernel: None,
            backend: BackendKind::default(),
            vcpus: 1,
            memory_mib: 256,
            disk_size: None,
            auto_remove: false,
            network: None,
            network_name: None,
            publish: Vec::new(),
        }
    }
}

/// A started VM, and the backend's notice (e.g. "QEMU runs the guest under TCG ...").
pub struct Started {
    pub entry: VmEntry,
    pub notice: Option<String>,
    /// With `attach`: the agent connection and the main process attached over it.
    pub attached: Option<(Client, Process)>,
}

/// A VM whose VMM was just started, before its guest is configured.
struct Booted {
    entry: VmEntry,
    vm: Box<dyn Vm>,
    /// The backend's notice.
    notice: Option<String>,
    /// The network's name servers for the guest.
    nameservers: Vec<std::net::Ipv4Addr>,
}

/// How long setting the clock of a resumed guest may wait for its agent.
const RESUME_CLOCK_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a VMM whose agent connection broke may take to end before it counts as alive.
const VMM_END_GRACE: Duration = Duration::from_secs(2);

/// How long one attempt to reach a booting guest's agent may take before the VMM is checked.
const AGENT_CONNECT_SLICE: Duration = Duration::from_secs(1);

/// How the foreground process of `kiln run` is attached.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttachOptions {
    /// Terminal size when the main process gets a tty.
    pub tty: Option<(u16, u16)>,
    /// The host sends stdin.
    pub stdin: bool,
}

/// What `system prune` removed.
#[derive(Debug, Default)]
pub struct PruneSummary {
    pub images: PruneReport,
    pub kernels: Vec<String>,
    /// Exited VMs created with `--rm` that were still on disk.
    pub vms: Vec<String>,
}

fn random_id() -> String {
    let mut bytes = [0u8; 8];
    let ok = fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).is_ok();
    if !ok {
        let seed = now_secs() ^ u64::from(std::process::id()).rotate_left(32);
        bytes = seed.to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `KEY=VALUE` lists: `overrides` replace the same keys of `base`, new keys are appended.
fn merge_env(base: &[String], overrides: &[String]) -> Vec<String> {
    let key = |kv: &str| kv.split('=').next().unwrap_or(kv).to_string();
    let mut out: Vec<String> = base.to_vec();
    for kv in overrides {
        let k = key(kv);
        match out.iter_mut().find(|e| key(e) == k) {
            Some(slot) => slot.clone_from(kv),
            None => out.push(kv.clone()),
        }
    }
    out
}

impl Manager {
    fn backend(&self, kind: BackendKind) -> Result<(Box<dyn kiln_hypervisor::Hypervisor>, Option<String>)> {
        let backend = open_backend(kind, &self.probe, &self.options.backends);
        let caps = backend.capabilities();
        if !caps.usable {
            return Err(ManagerError::BackendUnusable {
                backend: kind.to_string(),
                reason: caps.reason.unwrap_or_else(|| "no reason given".into()),
            });
        }
        Ok((backend, caps.notice))
    }

    /// Makes a VM from an image: its disk (a copy of the image's root filesystem, which has the
    /// agent) and an ssh key pair. Nothing of it remains when this fails.
    pub fn create(&self, opts: &CreateOptions, progress: &dyn Progress) -> Result<VmEntry> {
        if let Some(name) = &opts.name {
            if !kiln_hypervisor::spec::is_valid_name(name) {
                return Err(ManagerError::InvalidName(name.clone()));
            }
        }
        if opts.vcpus == 0 || opts.vcpus > kiln_hypervisor::spec::MAX_VCPUS {
            return Err(ManagerError::InvalidInput {
                what: "--cpus",
                detail: format!("{}; use 1 to {}", opts.vcpus, kiln_hypervisor::spec::MAX_VCPUS),
            });
        }
        if opts.memory_mib < kiln_hypervisor::spec::MIN_MEMORY_MIB {
            return Err(ManagerError::InvalidInput {
                what: "--memory",
                detail: format!(
                    "{} MiB; at least {} MiB",
                    opts.memory_mib,
                    kiln_hypervisor::spec::MIN_MEMORY_MIB
                ),
            });
        }
        if let Some(bad) = opts.env.iter().find(|kv| !kv.contains('=') || kv.starts_with('=')) {
            return Err(ManagerError::InvalidInput {
                what: "-e",
                detail: format!("{bad:?} is not KEY=VALUE"),
            });
        }
        if !opts.publish.is_empty() && (opts.network.is_some() || opts.network_name.is_none()) {
            return Err(ManagerError::InvalidInput {
                what: "-p",
                detail: "publishing ports needs a Kiln network; drop `--network none`".into(),
            });
        }
        phase!("create: begin");
        self.backend(opts.backend)?;
        let image = self.images.resolve(&opts.image)?;
        let config = self.images.config(&image)?.config;
        let mut argv = config.entrypoint.clone().unwrap_or_default();
        if opts.command.is_empty() {
            argv.extend(config.cmd.clone().unwrap_or_default());
        } else {
            argv.extend(opts.command.iter().cloned());
        }
        if argv.is_empty() {
            return Err(ManagerError::NoCommand);
        }
        let main = MainProcess {
            argv,
            env: merge_env(&config.env.clone().unwrap_or_default(), &opts.env),
            cwd: config.working_dir.clone().filter(|s| !s.is_empty()),
            user: config.user.clone().filter(|s| !s.is_empty()),
        };
        let (kernel, _) = self.kernels.resolve(opts.kernel.as_deref())?;
        let agent = guest::find_agent_binary(self.options.agent_binary.as_deref())?;

        let id = random_id();
        let name = opts.name.clone().unwrap_or_else(|| format!("vm-{}", &id[..8]));
        let entry = VmEntry {
            format: ENTRY_FORMAT,
            id: id.clone(),
            name: name.clone(),
            image: opts.image.clone(),
            image_id: image.id().to_string(),
            kernel,
            backend: opts.backend,
            vcpus: opts.vcpus,
            memory_mib: opts.memory_mib,
            disk_size: opts.disk_size,
            main,
            auto_remove: opts.auto_remove,
            network: opts.network.clone(),
            status: VmStatus::Creating,
            creator: ProcessId::of(std::process::id() as i32).ok(),
            created_at: now_secs(),
            started_at: None,
            finished_at: None,
            exit: None,
            console_offset: 0,
        };
        let paths = self.vms.paths(&id);
        {
            let _lock = self.vms.lock()?;
            if self.vms.list()?.iter().any(|e| e.name == name) {
                return Err(ManagerError::NameInUse(name));
            }
            fs::create_dir_all(&paths.dir).map_err(io_err("creating", &paths.dir))?;
            self.vms.save(&entry)?;
        }
        let made = (|| {
            let network = match (&opts.network, &opts.network_name) {
                (Some(given), _) => Some(given.clone()),
                (None, Some(net)) => Some(self.attach_network(net, &id, &opts.publish)?.into()),
                (None, None) => None,
            };
            // The key pair is made while the disk is copied.
            std::thread::scope(|scope| {
                let key = scope.spawn(|| guest::generate_ssh_key(&paths.ssh_key, &format!("kiln-{name}")));
                self.images.vm_disk(
                    &opts.image,
                    &paths.disk,
                    opts.disk_size,
                    &guest::agent_rootfs_options(&agent),
                    progress,
                )?;
                phase!("create: disk copied");
                key.join().map_err(|_| ManagerError::Tool {
                    tool: "ssh key generation",
                    path: paths.ssh_key.clone(),
                    detail: "the key generating thread panicked".into(),
                })??;
                phase!("create: ssh key generated");
                Ok::<_, ManagerError>(())
            })?;
            Ok(network)
        })();
        let _lock = self.vms.lock()?;
        let network = match made {
            Ok(network) => network,
            Err(e) => {
                if let Err(undo) = self.networks.detach_everywhere(&id) {
                    tracing::warn!(vm = %name, error = %undo, "could not undo the network attachment");
                }
                self.forget(&entry)?;
                return Err(e);
            }
        };
        let entry = VmEntry { status: VmStatus::Created, creator: None, network, ..entry };
        self.vms.save(&entry)?;
        Ok(entry)
    }

    /// A VM's record, reconciled with its VMM process.
    pub fn inspect(&self, name: &str) -> Result<VmEntry> {
        let _lock = self.vms.lock()?;
        let entry = self.vms.find(name)?;
        self.reconcile(entry, None)?.ok_or_else(|| ManagerError::NoSuchVm(name.to_string()))
    }

    /// VMs (all, or only the live ones), reconciled.
    pub fn list(&self, all: bool) -> Result<Vec<VmEntry>> {
        let _lock = self.vms.lock()?;
        let mut out = Vec::new();
        for entry in self.vms.list()? {
            if let Some(e) = self.reconcile(entry, None)? {
                if all || e.status.is_live() {
                    out.push(e);
                }
            }
        }
        Ok(out)
    }

    /// Updates a live record whose VMM ended: exited, with the VMM's status and the main process's
    /// code (`main_code`, else the agent's console line). Removes `--rm` VMs that exited (then
    /// `None`). Call with the lock held.
    fn reconcile(&self, mut entry: VmEntry, main_code: Option<i32>) -> Result<Option<VmEntry>> {
        if !entry.status.is_live() {
            return Ok(Some(entry));
        }
        let paths = self.vms.paths(&entry.id);
        let vmm_exit = match VmRecord::load(&paths.run) {
            Ok(record) => match record.process.exit_status() {
                None => return Ok(Some(entry)),
                Some(exit) => exit,
            },
            Err(_) => VmExit::Unknown,
        };
        let main_code =
            main_code.or_else(|| guest::main_exit_from_console(&paths.console, entry.console_offset));
        entry.status = VmStatus::Exited;
        entry.exit = Some(ExitInfo { main_code, vmm: vmm_exit });
        entry.finished_at = Some(now_secs());
        if entry.auto_remove {
            self.forget(&entry)?;
            return Ok(None);
        }
        self.vms.save(&entry)?;
        Ok(Some(entry))
    }

    fn handle(&self, entry: &VmEntry) -> Result<Box<dyn Vm>> {
        let record = VmRecord::load(&self.vms.paths(&entry.id).run)?;
        Ok(kiln_hypervisor::attach(record)?)
    }

    /// Boots a created or exited VM and configures its guest through the agent (main process,
    /// hostname, clock, ssh key, name servers), waiting for the guest to come up. With `attach`, the
    /// main process's stdio is attached to the returned connection (the foreground of `kiln run`);
    /// otherwise it starts at once. A guest whose agent never answers is killed.
    pub fn start(&self, name: &str, attach: Option<AttachOptions>) -> Result<Started> {
        let Booted { entry, vm, notice, nameservers } = self.boot(name)?;
        let boot = BootSettings {
            wait_for_attach: attach.is_some(),
            tty: attach.and_then(|a| a.tty),
            stdin: attach.is_some_and(|a| a.stdin),
            ssh_public_key: guest::ssh_public_key(&self.vms.paths(&entry.id).ssh_key),
            nameservers,
        };
        match self.configure_guest(&entry, vm.as_ref(), &boot) {
            Ok(attached) => {
                phase!("start: guest configured");
                Ok(Started { entry, notice, attached })
            }
            Err(e) => {
                if let Err(kill) = vm.kill() {
                    tracing::warn!(vm = %entry.name, error = %kill, "could not kill the VM after a failed start");
                }
                let _lock = self.vms.lock()?;
                if let Ok(entry) = self.vms.find(name) {
                    self.reconcile(entry, None)?;
                }
                Err(e)
            }
        }
    }

    /// Starts the VMM of a created or exited VM (under the store lock, which it releases before
    /// the guest boots).
    fn boot(&self, name: &str) -> Result<Booted> {
        let _lock = self.vms.lock()?;
        let entry = self.vms.find(name)?;
        let mut entry = self.reconcile(entry, None)?.ok_or_else(|| ManagerError::NoSuchVm(name.into()))?;
        match entry.status {
            VmStatus::Created | VmStatus::Exited => {}
            VmStatus::Running | VmStatus::Paused => {
                return Err(ManagerError::WrongState {
                    name: entry.name,
                    state: entry.status.to_string(),
                    hint: "it is already started",
                })
            }
            VmStatus::Creating => {
                return Err(ManagerError::WrongState {
                    name: entry.name,
                    state: entry.status.to_string(),
                    hint: "wait until it is created",
                })
            }
        }
        let (_, kernel) = self.kernels.resolve(Some(&entry.kernel))?;
        let (backend, notice) = self.backend(entry.backend)?;
        let paths = self.vms.paths(&entry.id);

        let mut spec = VmSpec::new(&entry.name, kernel, &guest::kernel_cmdline(&entry), &paths.run);
        spec.console_log = paths.console.clone();
        spec.vcpus = entry.vcpus;
        spec.memory_mib = entry.memory_mib;
        spec.root_disk = Some(DiskSpec { path: paths.disk.clone(), read_only: false });
        spec.agent = Some(AgentSpec::default());
        let mut nameservers = Vec::new();
        if let Some(net) = &entry.network {
            if let Some(name) = &net.network {
                // Idempotent; brings back the tap and rules should the host have lost them (reboot).
                nameservers = self.networks.attach(name, &entry.id, &net.ports)?.dns;
            }
            spec.network_interfaces.push(NetSpec { tap: net.tap.clone(), mac: net.mac.clone() });
        }
        entry.console_offset = fs::metadata(&paths.console).map(|m| m.len()).unwrap_or(0);
        let vm = backend.create(&spec)?;
        phase!("start: VMM created");
        if let Err(e) = vm.start() {
            let _ = vm.kill();
            return Err(e.into());
        }
        phase!("start: guest started");
        entry.status = VmStatus::Running;
        entry.started_at = Some(now_secs());
        entry.finished_at = None;
        entry.exit = None;
        self.vms.save(&entry)?;
        Ok(Booted { entry, vm, notice, nameservers })
    }

    /// Waits for the agent of a booting guest (giving up early when the VMM ends) and sends it
    /// this boot's configuration; with `boot.wait_for_attach`, attaches to the main process in the
    /// same round trip and returns the connection and the process.
    fn configure_guest(
        &self,
        entry: &VmEntry,
        vm: &dyn Vm,
        boot: &BootSettings,
    ) -> Result<Option<(Client, Process)>> {
        let client = self.connect_agent(entry, vm, AGENT_BOOT_TIMEOUT)?;
        let process = self.send_boot_config(&client, entry, boot)?;
        Ok(process.map(|p| {
            phase!("agent: main process attached");
            (client, p)
        }))
    }

    /// Gives the agent this boot's configuration unless it has one already, and with
    /// `boot.wait_for_attach` attaches to the main process (in the same round trip).
    fn send_boot_config(
        &self,
        client: &Client,
        entry: &VmEntry,
        boot: &BootSettings,
    ) -> Result<Option<Process>> {
        let agent_err = |source| ManagerError::Agent { name: entry.name.clone(), source };
        let config = guest::guest_config(entry, boot);
        Ok(match (client.welcome().configured, boot.wait_for_attach) {
            // An agent configured from a file in the image (or by an earlier host) keeps it.
            (true, true) => Some(client.attach_main().map_err(agent_err)?),
            (true, false) => None,
            (false, true) => Some(client.configure_and_attach(config).map_err(agent_err)?),
            (false, false) => {
                client.configure(config).map_err(agent_err)?;
                None
            }
        })
    }

    /// Connects to a VM's agent and does the handshake, retrying while the guest boots, until
    /// `timeout` or until the VMM has ended (a guest that panicked does not keep `kiln` waiting).
    fn connect_agent(&self, entry: &VmEntry, vm: &dyn Vm, timeout: Duration) -> Result<Client> {
        let channel = vm.agent_channel().ok_or_else(|| ManagerError::NoAgentChannel(entry.name.clone()))?;
        let deadline = std::time::Instant::now() + timeout;
        let stream = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match channel.connect(left.min(AGENT_CONNECT_SLICE)) {
                Ok(stream) => break stream,
                Err(source) => {
                    if let Some(status) = vm.record().process.exit_status() {
                        return Err(ManagerError::GuestEnded {
                            name: entry.name.clone(),
                            status: status.to_string(),
                        });
                    }
                    if left <= AGENT_CONNECT_SLICE {
                        let source = source.tried_for(timeout);
                        return Err(ManagerError::AgentConnect { name: entry.name.clone(), source });
                    }
                }
            }
        };
        phase!("agent: connected");
        let left = deadline.saturating_duration_since(std::time::Instant::now()).max(Duration::from_secs(1));
        let kiln_hypervisor::AgentStream { stream, port_lock } = stream;
        let client = Client::from_stream(stream, left).map_err(|source| {
            // A virtio-serial socket accepts before the guest is up: a guest that died while
            // booting shows as a reset connection, and its VMM ends right after.
            match vm.wait(Some(VMM_END_GRACE)) {
                Ok(Some(status)) => {
                    ManagerError::GuestEnded { name: entry.name.clone(), status: status.to_string() }
                }
                _ => ManagerError::Agent { name: entry.name.clone(), source },
            }
        })?;
        if let Some(lock) = port_lock {
            client.hold(lock);
        }
        phase!("agent: handshake done");
        Ok(client)
    }

    /// A connection to a running VM's agent (waits for a booting guest).
    pub fn agent(&self, name: &str) -> Result<Client> {
        self.agent_within(name, AGENT_BOOT_TIMEOUT, true)
    }

    fn agent_within(&self, name: &str, timeout: Duration, configure: bool) -> Result<Client> {
        let entry = self.inspect(name)?;
        if entry.status != VmStatus::Running {
            return Err(ManagerError::WrongState {
                name: entry.name,
                state: entry.status.to_string(),
                hint: if entry.status == VmStatus::Paused {
                    "resume it first (`kiln resume`)"
                } else {
                    "start it first (`kiln start`)"
                },
            });
        }
        let vm = self.handle(&entry)?;
        let client = self.connect_agent(&entry, vm.as_ref(), timeout)?;
        if configure && !client.welcome().configured {
            // The `kiln start` that booted it ended before configuring it: finish its job, with
            // the main process detached.
            let boot = BootSettings {
                ssh_public_key: guest::ssh_public_key(&self.vms.paths(&entry.id).ssh_key),
                nameservers: self.network_dns(&entry),
                ..BootSettings::default()
            };
            self.send_boot_config(&client, &entry, &boot)?;
        }
        Ok(client)
    }

    /// The name servers of a running VM's Kiln network (none for a tap the caller made), from
    /// its attachment (idempotent: it exists while the VM runs).
    fn network_dns(&self, entry: &VmEntry) -> Vec<std::net::Ipv4Addr> {
        let Some(net) = entry.network.as_ref() else { return Vec::new() };
        let Some(name) = net.network.as_deref() else { return Vec::new() };
        self.networks.attach(name, &entry.id, &net.ports).map(|a| a.dns).unwrap_or_default()
    }

    /// After the foreground main process ended (and the caller dropped its agent connection): waits
    /// for the guest to power off (killing it after a while), records the exit, removes a `--rm` VM.
    /// A `--rm` VM whose main process's status is known is killed at once instead: its disk is
    /// about to be deleted, so a clean shutdown would buy nothing.
    /// Returns the exit code `kiln run` exits with.
    pub fn finish_attached(&self, name: &str, status: Option<ExitStatus>) -> Result<i32> {
        phase!("finish: main process ended");
        let entry = self.inspect(name)?;
        if entry.status.is_live() {
            let vm = self.handle(&entry)?;
            if entry.auto_remove && status.is_some() {
                // `--rm` with the main process's code in hand: the guest's disk is deleted next,
                // so nothing in it needs a clean shutdown (sync, remount) — end the VMM at once.
                vm.kill()?;
            } else if vm.wait(Some(POWEROFF_WAIT))?.is_none() {
                tracing::warn!(vm = %entry.name, "the guest did not power off; killing its VMM");
                vm.kill()?;
            }
        }
        phase!("finish: guest powered off");
        let _lock = self.vms.lock()?;
        let entry = self.vms.find(name)?;
        let code = status.map(|s| s.shell_code());
        let entry = self.reconcile(entry, code)?;
        phase!("finish: recorded (and removed with --rm)");
        Ok(code.or_else(|| entry.and_then(|e| e.exit_code())).unwrap_or(255))
    }

    /// Stops a VM: the agent stops every guest process (SIGTERM, SIGKILL after `timeout`) and powers
    /// the guest off; if the agent cannot be reached, Ctrl-Alt-Del; after `timeout` the VMM is killed.
    pub fn stop(&self, name: &str, timeout: Duration) -> Result<VmEntry> {
        let entry = self.inspect(name)?;
        if entry.status.is_live() {
            let vm = self.handle(&entry)?;
            if entry.status == VmStatus::Paused {
                vm.resume()?;
            }
            let asked = self
                .agent_within(name, Duration::from_secs(3), false)
                .and_then(|c| {
                    c.shutdown(ShutdownAction::Poweroff, Some(timeout))
                        .map_err(|source| ManagerError::Agent { name: name.to_string(), source })
                })
                .map_err(|e| tracing::info!("graceful stop through the agent failed: {e}"))
                .is_ok();
            if asked {
                if vm.wait(Some(timeout + Duration::from_secs(5)))?.is_none() {
                    vm.kill()?;
                }
            } else {
                vm.stop(timeout)?;
            }
        }
        self.inspect(name)
    }

    /// Kills a VM's VMM at once.
    pub fn kill(&self, name: &str) -> Result<VmEntry> {
        let entry = self.inspect(name)?;
        if !entry.status.is_live() {
            return Err(ManagerError::WrongState {
                name: entry.name,
                state: entry.status.to_string(),
                hint: "only a running or paused VM can be killed",
            });
        }
        self.handle(&entry)?.kill()?;
        self.inspect(name)
    }

    /// Pauses (`true`) or resumes (`false`) a VM's vCPUs.
    pub fn set_paused(&self, name: &str, paused: bool) -> Result<VmEntry> {
        let _lock = self.vms.lock()?;
        let entry = self.vms.find(name)?;
        let mut entry = self.reconcile(entry, None)?.ok_or_else(|| ManagerError::NoSuchVm(name.into()))?;
        let (from, to) = if paused {
            (VmStatus::Running, VmStatus::Paused)
        } else {
            (VmStatus::Paused, VmStatus::Running)
        };
        if entry.status != from {
            return Err(ManagerError::WrongState {
                name: entry.name,
                state: entry.status.to_string(),
                hint: if paused {
                    "only a running VM can be paused"
                } else {
                    "only a paused VM can be resumed"
                },
            });
        }
        let vm = self.handle(&entry)?;
        if paused {
            vm.pause()?
        } else {
            vm.resume()?
        }
        entry.status = to;
        self.vms.save(&entry)?;
        drop(_lock);
        if !paused {
            // The guest's clock stood still while it was paused: give it the time (best effort;
            // the agent sets it at boot too).
            let synced = self.connect_agent(&entry, vm.as_ref(), RESUME_CLOCK_TIMEOUT).and_then(|c| {
                c.set_time(std::time::SystemTime::now())
                    .map_err(|source| ManagerError::Agent { name: entry.name.clone(), source })
            });
            if let Err(e) = synced {
                tracing::info!(vm = %entry.name, "the guest clock was not set after resume: {e}");
            }
        }
        Ok(entry)
    }

    /// Removes a VM and everything of it on disk; a running one only with `force` (killed first).
    pub fn remove(&self, name: &str, force: bool) -> Result<VmEntry> {
        let _lock = self.vms.lock()?;
        let entry = self.vms.find(name)?;
        let Some(entry) = self.reconcile(entry, None)? else {
            return Err(ManagerError::NoSuchVm(name.to_string()));
        };
        match entry.status {
            VmStatus::Running | VmStatus::Paused if !force => {
                return Err(ManagerError::WrongState {
                    name: entry.name,
                    state: entry.status.to_string(),
                    hint: "stop it first (`kiln stop`) or remove it with `kiln rm -f`",
                })
            }
            VmStatus::Running | VmStatus::Paused => {
                self.handle(&entry)?.kill()?;
            }
            VmStatus::Creating => {
                return Err(ManagerError::WrongState {
                    name: entry.name,
                    state: entry.status.to_string(),
                    hint: "another kiln process is creating it",
                })
            }
            VmStatus::Created | VmStatus::Exited => {}
        }
        self.forget(&entry)?;
        Ok(entry)
    }

    /// Attaches VM `id` to network `name` (recording `kiln0` on first use).
    fn attach_network(
        &self,
        name: &str,
        id: &str,
        publish: &[kiln_network::PortMapping],
    ) -> Result<kiln_network::Attachment> {
        if name == kiln_network::DEFAULT_NETWORK {
            self.networks.ensure_default()?;
        }
        Ok(self.networks.attach(name, id, publish)?)
    }

    /// Removes a VM for good: its network attachment (tap, rules, lease), then its directory.
    /// Call with the lock held.
    fn forget(&self, entry: &VmEntry) -> Result<()> {
        if let Some(network) = entry.network.as_ref().and_then(|n| n.network.as_deref()) {
            self.networks.detach(network, &entry.id)?;
        }
        self.vms.remove_dir(&entry.id)
    }

    /// The VM's directory (disk, console log, keys, hypervisor state).
    pub fn vm_dir(&self, name: &str) -> Result<PathBuf> {
        Ok(self.vms.paths(&self.vms.find(name)?.id).dir)
    }

    /// The file the VM's serial console is captured in.
    pub fn console_log(&self, name: &str) -> Result<PathBuf> {
        Ok(self.vms.paths(&self.vms.find(name)?.id).console)
    }

    /// Copies a host file or directory into the guest (see [`crate::copy::copy_in`]).
    pub fn copy_in(&self, name: &str, host: &Path, guest_path: &str) -> Result<u64> {
        // Checked before the agent is reached: a typo should not wait for a booting guest.
        fs::metadata(host).map_err(io_err("inspecting", host))?;
        crate::copy::copy_in(&self.agent(name)?, name, host, guest_path)
    }

    /// Copies a guest file or directory to the host (see [`crate::copy::copy_out`]).
    pub fn copy_out(&self, name: &str, guest_path: &str, host: &Path) -> Result<u64> {
        crate::copy::copy_out(&self.agent(name)?, name, guest_path, host)
    }

    /// The system `ssh` command for a VM, with its key. Without a network address the connection
    /// goes through the agent: `proxy` (e.g. `kiln exec -i VM`) runs `sshd -i` in the guest.
    pub fn ssh_command(&self, name: &str, proxy: &[String], command: &[String]) -> Result<Command> {
        let entry = self.inspect(name)?;
        let paths = self.vms.paths(&entry.id);
        let mut cmd = Command::new("ssh");
        cmd.arg("-i")
            .arg(&paths.ssh_key)
            .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
            .args(["-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes"]);
        let target = match entry.network.as_ref().and_then(|n| n.guest) {
            Some(g) => format!("root@{}", g.address),
            None => {
                let quoted: Vec<String> = proxy.iter().map(|a| shell_quote(a)).collect();
                let sshd = "sh -c 'mkdir -p /run/sshd && exec $(command -v sshd || echo /usr/sbin/sshd) -i'";
                cmd.arg("-o").arg(format!("ProxyCommand={} {sshd}", quoted.join(" ")));
                format!("root@{}", entry.name)
            }
        };
        cmd.arg(target);
        if !command.is_empty() {
            cmd.arg("--").args(command);
        }
        Ok(cmd)
    }

    /// Removes a kernel no VM uses.
    pub fn remove_kernel(&self, name: &str) -> Result<()> {
        let _lock = self.vms.lock()?;
        let users: Vec<String> =
            self.vms.list()?.into_iter().filter(|e| e.kernel == name).map(|e| e.name).collect();
        if !users.is_empty() {
            return Err(ManagerError::KernelInUse { name: name.into(), vms: users.join(", ") });
        }
        self.kernels.remove(name)
    }

    /// Frees what nothing uses: exited `--rm` VMs, images without a name and their blobs and
    /// caches (root filesystem images), and kernels that are neither the default nor used by a VM.
    pub fn prune(&self) -> Result<PruneSummary> {
        let _lock = self.vms.lock()?;
        let mut summary = PruneSummary::default();
        let mut kept = Vec::new();
        for entry in self.vms.list()? {
            let name = entry.name.clone();
            match self.reconcile(entry, None)? {
                Some(e) => kept.push(e),
                None => summary.vms.push(name),
            }
        }
        // Root filesystem caches of earlier agent builds go too (the current one is kept).
        summary.images = match guest::find_agent_binary(self.options.agent_binary.as_deref()) {
            Ok(agent) => self.images.prune_keeping(&[guest::agent_rootfs_options(&agent)])?,
            Err(_) => self.images.prune()?,
        };
        for kernel in self.kernels.list()? {
            if !kernel.default && !kept.iter().any(|e| e.kernel == kernel.name) {
                self.kernels.remove(&kernel.name)?;
                summary.kernels.push(kernel.name);
            }
        }
        Ok(summary)
    }
}

fn shell_quote(s: &str) -> String {
    if s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-=:@+".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_replace_keys_and_append_new_ones() {
        let base = vec!["PATH=/bin".to_string(), "A=1".to_string()];
        let merged = merge_env(&base, &["A=2".into(), "B=3".into()]);
        assert_eq!(merged, ["PATH=/bin", "A=2", "B=3"]);
    }

    #[test]
    fn ids_are_16_hex_digits_and_differ() {
        let (a, b) = (random_id(), random_id());
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
