//! The one way into a VM from the outside (`VmmAction`): configure before boot, start, then control
//! the running VM. The API thread and the config-file path both go through here; this module knows
//! the Firecracker configuration model but nothing of HTTP.

use std::io::Write;
use std::sync::{mpsc, Mutex};

use kiln_devices::bus::lock;
use kiln_devices::legacy::boot_timer::StartTime;
use kiln_devices::rate_limiter::TokenBucketConfig;
use kiln_fc_api::models::{
    Balloon, BalloonStats, BalloonStatsUpdate, BalloonUpdate, BootSource, Drive, EntropyDevice,
    FullVmConfiguration, Logger, MachineConfiguration, MachineConfigurationUpdate, Metrics, MmdsConfig,
    NetworkInterface, PartialDrive, PartialNetworkInterface, SerialDevice, Vsock,
};
use kiln_mmds::{SharedMmds, StoreError};

use crate::builder::{self, BuildOptions};
use crate::exit_code;
use crate::kvm_host::{self, KvmHost};
use crate::metrics::METRICS;
use crate::resources::{self, VmResources, DEFAULT_MEM_MIB, DEFAULT_VCPUS};
use crate::vmm::{VmExit, VmHandle};

/// Everything the outside can ask of a VM.
#[derive(Debug)]
pub enum VmmAction {
    SetBootSource(BootSource),
    InsertDrive(Drive),
    UpdateDrive(PartialDrive),
    SetMachineConfig(MachineConfiguration),
    UpdateMachineConfig(MachineConfigurationUpdate),
    SetEntropy(EntropyDevice),
    InsertNetworkInterface(NetworkInterface),
    UpdateNetworkInterface(PartialNetworkInterface),
    SetVsock(Vsock),
    SetBalloon(Balloon),
    UpdateBalloon(BalloonUpdate),
    UpdateBalloonStats(BalloonStatsUpdate),
    GetBalloon,
    GetBalloonStats,
    GetMachineConfig,
    GetVmConfig,
    /// `PUT /mmds`: replace the data store.
    PutMmds(serde_json::Value),
    /// `PATCH /mmds`: merge into the data store.
    PatchMmds(serde_json::Value),
    GetMmds,
    SetMmdsConfig(MmdsConfig),
    /// `PUT /metrics`: where metrics lines go (once, before boot).
    ConfigureMetrics(Metrics),
    /// `PUT /logger`: changes the fields given (at any time; Firecracker only before boot).
    ConfigureLogger(Logger),
    /// `PUT /serial`: where the guest console goes, and its output limit (before boot).
    ConfigureSerial(SerialDevice),
    FlushMetrics,
    Start,
    Pause,
    Resume,
    SendCtrlAltDel,
}

/// What an action returns.
#[derive(Debug)]
pub enum ActionOutput {
    Done,
    MachineConfig(MachineConfiguration),
    VmConfig(Box<FullVmConfiguration>),
    Balloon(Balloon),
    BalloonStats(Box<BalloonStats>),
    Mmds(serde_json::Value),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActionError {
    #[error("The requested operation is not supported before starting the microVM.")]
    NotStarted,
    #[error("The requested operation is not supported after starting the microVM.")]
    AlreadyStarted,
    #[error("{0}")]
    Invalid(String),
    #[error("Cannot start microvm that was already started")]
    StartedTwice,
    #[error("Failed to start the microVM: {0}")]
    Start(String),
    #[error("{0}")]
    Runtime(String),
}

/// Where the VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    NotStarted,
    Running,
    Paused,
}

enum State {
    NotStarted,
    Running(VmHandle),
}

/// Host-side settings for the VM the controller will start.
pub struct ControllerOptions {
    pub start: StartTime,
    pub serial_out: SharedWriter,
    pub serial_in: bool,
    pub allow_pvm: bool,
    /// Receives the process exit code when the started VM ends.
    pub exit_tx: mpsc::Sender<i32>,
    /// The MMDS data store (with its size limit), shared with the VM's network devices.
    pub mmds: SharedMmds,
}

/// A writer several owners can hold (the serial console's output survives a refused start).
#[derive(Clone)]
pub struct SharedWriter(std::sync::Arc<Mutex<Box<dyn Write + Send>>>);

impl SharedWriter {
    pub fn new(w: Box<dyn Write + Send>) -> Self {
        Self(std::sync::Arc::new(Mutex::new(w)))
    }

    /// Sends everything written from now on to `w` instead.
    pub fn replace(&self, w: Box<dyn Write + Send>) {
        let mut cur = lock(&self.0);
        let _ = cur.flush();
        *cur = w;
    }
}

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        lock(&self.0).flush()
    }
}

/// Holds the configuration, starts the VM, and controls it afterwards.
pub struct Controller {
    config: Mutex<FullVmConfiguration>,
    state: Mutex<State>,
    opts: Mutex<Option<ControllerOptions>>,
    mmds: SharedMmds,
    /// From `PUT /serial`.
    serial_out_limit: Mutex<Option<TokenBucketConfig>>,
}

impl Controller {
    pub fn new(opts: ControllerOptions) -> Self {
        Self {
            config: Mutex::new(FullVmConfiguration::default()),
            state: Mutex::new(State::NotStarted),
            mmds: opts.mmds.clone(),
            opts: Mutex::new(Some(opts)),
            serial_out_limit: Mutex::new(None),
        }
    }

    /// Replaces the whole pre-boot configuration (from a config file given with the API).
    pub fn load_config(&self, cfg: FullVmConfiguration) -> Result<(), ActionError> {
        *self.pre_boot()? = cfg;
        Ok(())
    }

    pub fn lifecycle(&self) -> Lifecycle {
        match &*lock(&self.state) {
            State::NotStarted => Lifecycle::NotStarted,
            State::Running(h) if h.is_paused() => Lifecycle::Paused,
            State::Running(_) => Lifecycle::Running,
        }
    }

    fn started(&self) -> bool {
        !matches!(*lock(&self.state), State::NotStarted)
    }

    fn pre_boot(&self) -> Result<std::sync::MutexGuard<'_, FullVmConfiguration>, ActionError> {
        if self.started() {
            return Err(ActionError::AlreadyStarted);
        }
        Ok(lock(&self.config))
    }

    fn running(&self) -> Result<VmHandle, ActionError> {
        match &*lock(&self.state) {
            State::Running(h) => Ok(h.clone()),
            State::NotStarted => Err(ActionError::NotStarted),
        }
    }

    pub fn handle(&self, action: VmmAction) -> Result<ActionOutput, ActionError> {
        match action {
            VmmAction::SetBootSource(b) => {
                let mut cfg = self.pre_boot()?;
                crate::loader::detect_format(&b.kernel_image_path)
                    .map_err(|e| ActionError::Invalid(crate::error_chain(&e)))?;
                if let Some(initrd) = &b.initrd_path {
                    std::fs::File::open(initrd).map_err(|e| {
                        ActionError::Invalid(format!("cannot read initrd {}: {e}", initrd.display()))
                    })?;
                }
                cfg.boot_source = Some(b);
            }
            VmmAction::InsertDrive(d) => {
                let mut cfg = self.pre_boot()?;
                resources::validate_drive(&d).map_err(|e| ActionError::Invalid(e.to_string()))?;
                // Open it now, as the VM will, so a bad backing file is refused here.
                if let Some(path) = &d.path_on_host {
                    let probe = kiln_devices::virtio::block::BlockConfig {
                        id: d.drive_id.clone(),
                        path: path.clone(),
                        read_only: d.is_read_only.unwrap_or(false),
                        cache: kiln_devices::virtio::block::CacheType::Unsafe,
                    };
                    kiln_devices::virtio::block::Block::new(probe).map_err(|e| {
                        ActionError::Invalid(format!("drive '{}': {}", d.drive_id, crate::error_chain(&e)))
                    })?;
                }
                if d.is_root_device && cfg.drives.iter().any(|x| x.is_root_device && x.drive_id != d.drive_id)
                {
                    return Err(ActionError::Invalid("A root block device already exists!".into()));
                }
                match cfg.drives.iter_mut().find(|x| x.drive_id == d.drive_id) {
                    Some(existing) => *existing = d,
                    None => cfg.drives.push(d),
                }
            }
            VmmAction::UpdateDrive(p) => self.update_drive(p)?,
            VmmAction::SetMachineConfig(m) => {
                let mut cfg = self.pre_boot()?;
                resources::validate_machine_config(&m, resources::host_memory_mib())
                    .map_err(|e| ActionError::Invalid(e.to_string()))?;
                cfg.machine_config = Some(m);
            }
            VmmAction::UpdateMachineConfig(u) => {
                let mut cfg = self.pre_boot()?;
                let mut m = cfg.machine_config.clone().unwrap_or_else(default_machine_config);
                if let Some(v) = u.vcpu_count {
                    m.vcpu_count = v;
                }
                if let Some(v) = u.mem_size_mib {
                    m.mem_size_mib = v;
                }
                if let Some(v) = u.smt {
                    m.smt = v;
                }
                if let Some(v) = u.cpu_template {
                    m.cpu_template = Some(v);
                }
                if let Some(v) = u.track_dirty_pages {
                    m.track_dirty_pages = v;
                }
                if let Some(v) = u.huge_pages {
                    m.huge_pages = v;
                }
                resources::validate_machine_config(&m, resources::host_memory_mib())
                    .map_err(|e| ActionError::Invalid(e.to_string()))?;
                cfg.machine_config = Some(m);
            }
            VmmAction::SetEntropy(e) => {
                let mut cfg = self.pre_boot()?;
                resources::validate_entropy(&e).map_err(|e| ActionError::Invalid(e.to_string()))?;
                cfg.entropy = Some(e);
            }
            VmmAction::InsertNetworkInterface(n) => {
                let mut cfg = self.pre_boot()?;
                resources::validate_net(&n).map_err(|e| ActionError::Invalid(e.to_string()))?;
                match cfg.network_interfaces.iter_mut().find(|x| x.iface_id == n.iface_id) {
                    Some(existing) => *existing = n,
                    None => cfg.network_interfaces.push(n),
                }
            }
            VmmAction::UpdateNetworkInterface(p) => self.update_net(p)?,
            VmmAction::SetVsock(v) => {
                let mut cfg = self.pre_boot()?;
                resources::validate_vsock(&v).map_err(|e| ActionError::Invalid(e.to_string()))?;
                cfg.vsock = Some(v);
            }
            VmmAction::SetBalloon(b) => {
                let mut cfg = self.pre_boot()?;
                let mem = cfg.machine_config.as_ref().map_or(DEFAULT_MEM_MIB, |m| m.mem_size_mib);
                resources::validate_balloon(&b, mem).map_err(|e| ActionError::Invalid(e.to_string()))?;
                cfg.balloon = Some(b);
            }
            VmmAction::UpdateBalloon(u) => {
                let mem =
                    lock(&self.config).machine_config.as_ref().map_or(DEFAULT_MEM_MIB, |m| m.mem_size_mib);
                if u64::from(u.amount_mib) > mem {
                    return Err(ActionError::Invalid(format!(
                        "balloon amount_mib {} is larger than the VM's {mem} MiB of memory",
                        u.amount_mib
                    )));
                }
                if self.started() {
                    self.running()?
                        .with_balloon(|b| b.update_target(u.amount_mib))
                        .ok_or_else(no_balloon)?
                        .map_err(|e| ActionError::Runtime(crate::error_chain(&e)))?;
                }
                let mut cfg = lock(&self.config);
                cfg.balloon.as_mut().ok_or_else(no_balloon)?.amount_mib = u.amount_mib;
            }
            VmmAction::UpdateBalloonStats(u) => {
                if self.started() {
                    self.running()?
                        .with_balloon(|b| b.update_stats_interval(u.stats_polling_interval_s))
                        .ok_or_else(no_balloon)?
                        .map_err(|e| ActionError::Invalid(crate::error_chain(&e)))?;
                }
                let mut cfg = lock(&self.config);
                cfg.balloon.as_mut().ok_or_else(no_balloon)?.stats_polling_interval_s =
                    u.stats_polling_interval_s;
            }
            VmmAction::GetBalloon => {
                let b = lock(&self.config).balloon.clone().ok_or_else(no_balloon)?;
                return Ok(ActionOutput::Balloon(b));
            }
            VmmAction::GetBalloonStats => {
                let snap = self
                    .running()?
                    .with_balloon(|b| b.stats_enabled().then(|| b.latest_stats()))
                    .ok_or_else(no_balloon)?
                    .ok_or_else(|| {
                        ActionError::Invalid("Statistics are not enabled for the balloon device.".into())
                    })?;
                return Ok(ActionOutput::BalloonStats(Box::new(BalloonStats {
                    target_pages: snap.target_pages,
                    actual_pages: snap.actual_pages,
                    target_mib: snap.target_mib,
                    actual_mib: snap.actual_mib,
                    swap_in: snap.swap_in,
                    swap_out: snap.swap_out,
                    major_faults: snap.major_faults,
                    minor_faults: snap.minor_faults,
                    free_memory: snap.free_memory,
                    total_memory: snap.total_memory,
                    available_memory: snap.available_memory,
                    disk_caches: snap.disk_caches,
                    hugetlb_allocations: snap.hugetlb_allocations,
                    hugetlb_failures: snap.hugetlb_failures,
                    oom_kill: snap.oom_kill,
                    alloc_stall: snap.alloc_stall,
                    async_scan: snap.async_scan,
                    direct_scan: snap.direct_scan,
                    async_reclaim: snap.async_reclaim,
                    direct_reclaim: snap.direct_reclaim,
                })));
            }
            VmmAction::GetMachineConfig => {
                let m = lock(&self.config).machine_config.clone().unwrap_or_else(default_machine_config);
                return Ok(ActionOutput::MachineConfig(m));
            }
            VmmAction::GetVmConfig => {
                let mut cfg = lock(&self.config).clone();
                cfg.machine_config.get_or_insert_with(default_machine_config);
                return Ok(ActionOutput::VmConfig(Box::new(cfg)));
            }
            VmmAction::PutMmds(data) => lock(&self.mmds).put(data).map_err(mmds_error)?,
            VmmAction::PatchMmds(patch) => lock(&self.mmds).patch(&patch).map_err(mmds_error)?,
            VmmAction::GetMmds => return Ok(ActionOutput::Mmds(lock(&self.mmds).document())),
            VmmAction::SetMmdsConfig(mut c) => {
                let mut cfg = self.pre_boot()?;
                let spec = resources::validate_mmds_config(&c, &cfg.network_interfaces)
                    .map_err(|e| ActionError::Invalid(e.to_string()))?;
                let mut store = lock(&self.mmds);
                store.set_version(spec.version);
                store.set_imds_compat(spec.imds_compat);
                // GET /vm/config shows the address in use, as Firecracker does.
                c.ipv4_address = Some(spec.ipv4_address);
                cfg.mmds_config = Some(c);
            }
            VmmAction::ConfigureMetrics(m) => {
                let _cfg = self.pre_boot()?;
                crate::metrics::init(&m.metrics_path).map_err(|e| ActionError::Invalid(e.to_string()))?;
            }
            VmmAction::ConfigureLogger(l) => {
                crate::logger::update(&l).map_err(|e| ActionError::Invalid(crate::error_chain(&e)))?;
            }
            VmmAction::ConfigureSerial(sd) => self.configure_serial(sd)?,
            VmmAction::FlushMetrics => {
                self.running()?;
                crate::metrics::flush().map_err(|e| ActionError::Runtime(e.to_string()))?;
            }
            VmmAction::Start => self.start()?,
            VmmAction::Pause => {
                let t0 = std::time::Instant::now();
                if !self.running()?.pause() {
                    return Err(ActionError::Runtime("the vCPUs did not pause within a second".into()));
                }
                let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                METRICS.latencies_us.pause_vm.set(us);
                METRICS.latencies_us.vmm_pause_vm.set(us);
            }
            VmmAction::Resume => {
                let t0 = std::time::Instant::now();
                self.running()?.resume();
                let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                METRICS.latencies_us.resume_vm.set(us);
                METRICS.latencies_us.vmm_resume_vm.set(us);
            }
            VmmAction::SendCtrlAltDel => self.running()?.send_ctrl_alt_del().map_err(ActionError::Runtime)?,
        }
        Ok(ActionOutput::Done)
    }

    /// `PATCH /drives/{id}`: a new backing file and/or rate limiter; before boot only the
    /// configuration changes. A refused request changes nothing.
    fn update_drive(&self, p: PartialDrive) -> Result<(), ActionError> {
        if p.path_on_host.is_none() && p.rate_limiter.is_none() {
            return Err(ActionError::Invalid(
                "nothing to update: give path_on_host and/or rate_limiter".into(),
            ));
        }
        let not_found = || ActionError::Invalid(format!("Could not find a drive with id {}", p.drive_id));
        let old_limit = lock(&self.config)
            .drives
            .iter()
            .find(|d| d.drive_id == p.drive_id)
            .ok_or_else(not_found)?
            .rate_limiter;
        let limit = resources::patch_rate_limiter(old_limit, p.rate_limiter);
        let what = format!("drive '{}' rate_limiter", p.drive_id);
        let limit_cfg = resources::rate_limiter(&what, limit.as_ref()).map_err(invalid)?;
        if self.started() {
            let vm = self.running()?;
            if let Some(path) = &p.path_on_host {
                vm.update_drive(&p.drive_id, path).map_err(ActionError::Runtime)?;
            }
            if p.rate_limiter.is_some() {
                vm.update_drive_rate_limiter(&p.drive_id, limit_cfg).map_err(ActionError::Runtime)?;
            }
        }
        let mut cfg = lock(&self.config);
        let d = cfg.drives.iter_mut().find(|d| d.drive_id == p.drive_id).ok_or_else(not_found)?;
        if let Some(path) = p.path_on_host {
            d.path_on_host = Some(path);
        }
        if p.rate_limiter.is_some() {
            d.rate_limiter = limit;
        }
        Ok(())
    }

    /// `PATCH /network-interfaces/{id}`: new receive and/or transmit rate limiters (buckets given
    /// replace the old ones). A refused request changes nothing.
    fn update_net(&self, p: PartialNetworkInterface) -> Result<(), ActionError> {
        let not_found =
            || ActionError::Invalid(format!("Could not find a network interface with id {}", p.iface_id));
        let (old_rx, old_tx) = {
            let cfg = lock(&self.config);
            let n = cfg.network_interfaces.iter().find(|n| n.iface_id == p.iface_id).ok_or_else(not_found)?;
            (n.rx_rate_limiter, n.tx_rate_limiter)
        };
        let rx = resources::patch_rate_limiter(old_rx, p.rx_rate_limiter);
        let tx = resources::patch_rate_limiter(old_tx, p.tx_rate_limiter);
        let what = |dir| format!("network interface '{}' {dir}_rate_limiter", p.iface_id);
        let rx_cfg = resources::rate_limiter(&what("rx"), rx.as_ref()).map_err(invalid)?;
        let tx_cfg = resources::rate_limiter(&what("tx"), tx.as_ref()).map_err(invalid)?;
        if self.started() {
            self.running()?
                .update_net_rate_limiters(&p.iface_id, rx_cfg, tx_cfg)
                .map_err(ActionError::Runtime)?;
        }
        let mut cfg = lock(&self.config);
        let n = cfg.network_interfaces.iter_mut().find(|n| n.iface_id == p.iface_id).ok_or_else(not_found)?;
        n.rx_rate_limiter = rx;
        n.tx_rate_limiter = tx;
        Ok(())
    }

    /// `PUT /serial`: the console output goes to `serial_out_path` (a file, created if missing, or
    /// a named pipe), limited by `rate_limiter`.
    fn configure_serial(&self, sd: SerialDevice) -> Result<(), ActionError> {
        let _cfg = self.pre_boot()?;
        let limit = sd
            .rate_limiter
            .as_ref()
            .map(|b| resources::token_bucket("serial rate_limiter", b))
            .transpose()
            .map_err(invalid)?;
        let out = match &sd.serial_out_path {
            Some(path) => Some(crate::output::open(path).map_err(|e| {
                ActionError::Invalid(format!("cannot open serial_out_path {}: {e}", path.display()))
            })?),
            None => None,
        };
        let opts = lock(&self.opts);
        let opts = opts.as_ref().ok_or(ActionError::AlreadyStarted)?;
        if let Some((file, _fifo)) = out {
            opts.serial_out.replace(Box::new(file));
        }
        *lock(&self.serial_out_limit) = limit;
        Ok(())
    }

    fn start(&self) -> Result<(), ActionError> {
        let mut state = lock(&self.state);
        if !matches!(*state, State::NotStarted) {
            return Err(ActionError::StartedTwice);
        }
        let cfg = lock(&self.config).clone();
        let res = VmResources::from_config(&cfg, resources::host_memory_mib())
            .map_err(|e| ActionError::Start(e.to_string()))?;
        let mut opts_slot = lock(&self.opts);
        let opts = opts_slot.as_ref().ok_or(ActionError::StartedTwice)?;
        let start_err = |e: &dyn std::error::Error| ActionError::Start(crate::error_chain(e));
        // Nothing below consumes the options until the VM is built, so a refused start leaves the
        // VMM serving and a corrected configuration can be started.
        let mut backends = builder::open_backends(&res).map_err(|e| start_err(&e))?;
        builder::attach_mmds(&mut backends, &res, &self.mmds).map_err(|e| start_err(&e))?;
        if kvm_host::host_is_pvm() && !opts.allow_pvm {
            return Err(ActionError::Start(kvm_host::PVM_EXPLANATION.into()));
        }
        let host = KvmHost::open().map_err(|e| start_err(&e))?;
        let build = BuildOptions {
            serial_out: Box::new(opts.serial_out.clone()),
            serial_in: opts.serial_in,
            serial_out_limit: *lock(&self.serial_out_limit),
            start: opts.start,
        };
        let vmm = builder::build_microvm(&res, backends, &host, build).map_err(|e| start_err(&e))?;
        let exit_tx = opts.exit_tx.clone();
        let vm_handle = vmm.handle();
        std::thread::Builder::new()
            .name("kiln_vmm".into())
            .spawn(move || {
                let code = match vmm.run() {
                    Ok(VmExit::GuestStopped(why)) => {
                        tracing::info!("VM stopped: {why}");
                        exit_code::OK
                    }
                    Ok(VmExit::Failed(why)) => {
                        tracing::error!("VM failed: {why}");
                        exit_code::VM_FAILED
                    }
                    Err(e) => {
                        tracing::error!("VMM failed: {}", crate::error_chain(&e));
                        exit_code::VMM_ERROR
                    }
                };
                let _ = exit_tx.send(code);
            })
            .map_err(|e| ActionError::Start(format!("cannot start the VMM thread: {e}")))?;
        *state = State::Running(vm_handle);
        *opts_slot = None;
        Ok(())
    }
}

fn mmds_error(e: StoreError) -> ActionError {
    ActionError::Invalid(e.to_string())
}

fn invalid(e: resources::ResourcesError) -> ActionError {
    ActionError::Invalid(e.to_string())
}

fn no_balloon() -> ActionError {
    ActionError::Invalid("No balloon device configured: PUT /balloon before starting the microVM.".into())
}

fn default_machine_config() -> MachineConfiguration {
    MachineConfiguration {
        vcpu_count: DEFAULT_VCPUS,
        mem_size_mib: DEFAULT_MEM_MIB,
        smt: false,
        cpu_template: None,
        track_dirty_pages: false,
        huge_pages: Default::default(),
    }
}
