//! The kiln-vmm backend: one detached `kiln-vmm --api-sock` process per VM, configured and
//! controlled only through its Firecracker-compatible API (so the same code drives a Firecracker
//! binary). The guest's serial console is the VMM's stdout, appended to the console log.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use kiln_fc_api::models::{
    BootSource, Drive, FullVmConfiguration, InstanceState, MachineConfiguration, NetworkInterface, Vsock,
};
use kiln_fc_api::ApiClient;

use crate::agent::AgentChannel;
use crate::error::HypervisorError;
use crate::host::{Accelerator, Capabilities, HostProbe};
use crate::machine::{
    default_mac, expect_backend, usable_binary, Control, Launch, Machine, RecordDraft, RunState,
};
use crate::record::{StatePaths, VmRecord};
use crate::spec::{VmSpec, AGENT_GUEST_CID};
use crate::{BackendKind, Hypervisor, Vm};

/// How long a request to kiln-vmm may take (a boot under emulation is slow).
const API_TIMEOUT: Duration = Duration::from_secs(60);

/// Options of the kiln-vmm backend.
#[derive(Debug, Clone)]
pub struct KilnVmmOptions {
    /// The kiln-vmm binary (default: what the host probe found).
    pub binary: Option<PathBuf>,
    /// Pass `--allow-pvm` on a PVM host. Only for PVM-enabled or purpose-built guest kernels
    /// (tests): a stock Linux guest does not boot there.
    pub allow_pvm: bool,
    /// How long to wait for the API socket after starting kiln-vmm.
    pub ready_timeout: Duration,
}

impl Default for KilnVmmOptions {
    fn default() -> Self {
        Self { binary: None, allow_pvm: false, ready_timeout: Duration::from_secs(10) }
    }
}

/// The kiln-vmm backend.
#[derive(Debug, Clone)]
pub struct KilnVmmBackend {
    probe: HostProbe,
    options: KilnVmmOptions,
}

impl KilnVmmBackend {
    /// The backend on a host described by `probe`.
    pub fn new(mut probe: HostProbe, options: KilnVmmOptions) -> Self {
        if let Some(b) = &options.binary {
            probe.kiln_vmm = Some(b.clone());
        }
        Self { probe, options }
    }
}

/// kiln-vmm's command line: serve the API on the state directory's socket, no stdin.
pub fn kiln_vmm_args(spec: &VmSpec, paths: &StatePaths, allow_pvm: bool) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["--api-sock".into(), paths.api_socket.clone().into()];
    args.extend(["--id".into(), spec.name.clone().into(), "--no-stdin".into()]);
    if allow_pvm {
        args.push("--allow-pvm".into());
    }
    args
}

/// The API configuration for `spec`: machine, boot source (kiln-vmm adds `root=` and the
/// virtio-mmio devices to the command line itself), drives (root first), interfaces, vsock.
pub fn api_config(spec: &VmSpec, paths: &StatePaths) -> FullVmConfiguration {
    let drive = |i: usize, d: &crate::spec::DiskSpec, root: bool| Drive {
        drive_id: if root { "rootfs".to_string() } else { format!("disk{i}") },
        partuuid: None,
        is_root_device: root,
        cache_type: Default::default(),
        is_read_only: Some(d.read_only),
        path_on_host: Some(d.path.clone()),
        rate_limiter: None,
        io_engine: Default::default(),
        socket: None,
    };
    let mut drives: Vec<Drive> = spec.root_disk.iter().map(|d| drive(0, d, true)).collect();
    drives.extend(spec.extra_disks.iter().enumerate().map(|(i, d)| drive(i + 1, d, false)));
    FullVmConfiguration {
        machine_config: Some(MachineConfiguration {
            vcpu_count: spec.vcpus,
            mem_size_mib: u64::from(spec.memory_mib),
            smt: false,
            cpu_template: None,
            track_dirty_pages: false,
            huge_pages: Default::default(),
        }),
        boot_source: Some(BootSource {
            kernel_image_path: spec.kernel.clone(),
            boot_args: Some(spec.cmdline.clone()),
            initrd_path: spec.initrd.clone(),
        }),
        drives,
        network_interfaces: spec
            .network_interfaces
            .iter()
            .enumerate()
            .map(|(i, n)| NetworkInterface {
                iface_id: format!("eth{i}"),
                host_dev_name: n.tap.clone(),
                guest_mac: Some(n.mac.clone().unwrap_or_else(|| default_mac(&spec.name, i))),
                mtu: None,
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            })
            .collect(),
        vsock: spec.agent.map(|_| Vsock {
            vsock_id: None,
            guest_cid: AGENT_GUEST_CID,
            uds_path: paths.agent_vsock.clone(),
        }),
        ..Default::default()
    }
}

impl Hypervisor for KilnVmmBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::KilnVmm
    }

    fn capabilities(&self) -> Capabilities {
        self.probe.kiln_vmm_capabilities(self.options.allow_pvm)
    }

    fn create(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, HypervisorError> {
        let binary = usable_binary(&self.capabilities())?;
        spec.validate()?;
        let paths = StatePaths::new(&spec.state_dir);
        paths.prepare(&spec.console_log)?;
        let args = kiln_vmm_args(spec, &paths, self.options.allow_pvm);
        let mut client = ApiClient::new(&paths.api_socket).with_timeout(Some(API_TIMEOUT));
        let guard = Launch {
            backend: BackendKind::KilnVmm,
            binary: &binary,
            args: &args,
            stdout: &spec.console_log,
            vmm_log: &paths.vmm_log,
            exit_file: &paths.exit_file,
            control_socket: &paths.api_socket,
            ready_timeout: self.options.ready_timeout,
        }
        .run(|| client.get_instance_info().is_ok())?;
        let api_err = |source| HypervisorError::Api { name: spec.name.clone(), source };
        client.apply_config(&api_config(spec, &paths)).map_err(api_err)?;
        let record = guard.save_record(RecordDraft {
            backend: BackendKind::KilnVmm,
            spec,
            paths: &paths,
            control_socket: paths.api_socket.clone(),
            agent: spec
                .agent
                .map(|a| AgentChannel::Vsock { uds_path: paths.agent_vsock.clone(), port: a.vsock_port }),
            binary: &binary,
            args: &args,
            accelerator: Accelerator::Kvm,
        })?;
        Ok(Box::new(Machine::new(record, FcControl { name: spec.name.clone(), client })))
    }

    fn attach(&self, record: VmRecord) -> Result<Box<dyn Vm>, HypervisorError> {
        attach(record)
    }
}

/// A handle on a VM the kiln-vmm backend created.
pub fn attach(record: VmRecord) -> Result<Box<dyn Vm>, HypervisorError> {
    expect_backend(&record, BackendKind::KilnVmm)?;
    let client = ApiClient::new(&record.control_socket).with_timeout(Some(API_TIMEOUT));
    let name = record.name.clone();
    Ok(Box::new(Machine::new(record, FcControl { name, client })))
}

/// Control over the Firecracker API.
struct FcControl {
    name: String,
    client: ApiClient,
}

impl FcControl {
    fn api<T>(
        &mut self,
        call: impl FnOnce(&mut ApiClient) -> Result<T, kiln_fc_api::ClientError>,
    ) -> Result<T, HypervisorError> {
        call(&mut self.client).map_err(|source| HypervisorError::Api { name: self.name.clone(), source })
    }
}

impl Control for FcControl {
    fn start(&mut self) -> Result<(), HypervisorError> {
        self.api(ApiClient::start_instance)
    }

    fn pause(&mut self) -> Result<(), HypervisorError> {
        self.api(ApiClient::pause)
    }

    fn resume(&mut self) -> Result<(), HypervisorError> {
        self.api(ApiClient::resume)
    }

    fn request_shutdown(&mut self) -> Result<(), HypervisorError> {
        self.api(ApiClient::send_ctrl_alt_del)
    }

    fn run_state(&mut self) -> Result<RunState, HypervisorError> {
        Ok(match self.api(ApiClient::get_instance_info)?.state {
            InstanceState::NotStarted => RunState::Created,
            InstanceState::Running => RunState::Running,
            InstanceState::Paused => RunState::Paused,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{AgentSpec, DiskSpec, NetSpec};
    use kiln_fc_api::models::{ActionType, InstanceInfo, VmState as FcVmState};
    use kiln_fc_api::{ApiRequest, ApiResponse, ApiServer};
    use std::sync::{Arc, Mutex};

    fn spec() -> VmSpec {
        let mut s = VmSpec::new("vm-1", "/k/vmlinux", "console=ttyS0 -- echo hi", "/run/kiln/vm-1");
        s.vcpus = 2;
        s.memory_mib = 256;
        s.initrd = Some("/k/initrd".into());
        s.root_disk = Some(DiskSpec { path: "/img/root.ext4".into(), read_only: false });
        s.extra_disks.push(DiskSpec { path: "/img/data.ext4".into(), read_only: true });
        s.network_interfaces.push(NetSpec { tap: "tap0".into(), mac: None });
        s.network_interfaces.push(NetSpec { tap: "tap1".into(), mac: Some("02:00:00:00:00:09".into()) });
        s.agent = Some(AgentSpec { vsock_port: 52 });
        s
    }

    #[test]
    fn kiln_vmm_serves_the_api_on_the_state_dir_socket_without_stdin() {
        let s = spec();
        let args = kiln_vmm_args(&s, &StatePaths::new(&s.state_dir), false);
        assert_eq!(args, ["--api-sock", "/run/kiln/vm-1/api.sock", "--id", "vm-1", "--no-stdin"]);
        let args = kiln_vmm_args(&s, &StatePaths::new(&s.state_dir), true);
        assert_eq!(args.last().unwrap(), "--allow-pvm");
    }

    #[test]
    fn the_api_configuration_mirrors_the_spec() {
        let s = spec();
        let cfg = api_config(&s, &StatePaths::new(&s.state_dir));
        let m = cfg.machine_config.unwrap();
        assert_eq!((m.vcpu_count, m.mem_size_mib, m.smt), (2, 256, false));
        let boot = cfg.boot_source.unwrap();
        // kiln-vmm adds root= and virtio_mmio.device= itself (before " -- ").
        assert_eq!(boot.boot_args.as_deref(), Some("console=ttyS0 -- echo hi"));
        assert_eq!(boot.initrd_path.as_deref(), Some(std::path::Path::new("/k/initrd")));
        let drives: Vec<_> =
            cfg.drives.iter().map(|d| (d.drive_id.as_str(), d.is_root_device, d.is_read_only)).collect();
        assert_eq!(drives, [("rootfs", true, Some(false)), ("disk1", false, Some(true))]);
        let nets: Vec<_> =
            cfg.network_interfaces.iter().map(|n| (n.iface_id.as_str(), n.host_dev_name.as_str())).collect();
        assert_eq!(nets, [("eth0", "tap0"), ("eth1", "tap1")]);
        assert_eq!(cfg.network_interfaces[0].guest_mac, Some(default_mac("vm-1", 0)));
        assert_eq!(cfg.network_interfaces[1].guest_mac.as_deref(), Some("02:00:00:00:00:09"));
        let vsock = cfg.vsock.unwrap();
        assert_eq!((vsock.guest_cid, vsock.uds_path), (3, "/run/kiln/vm-1/agent.vsock".into()));
        // The config is what the API accepts: it survives the config-file parser.
        let mut cfg = api_config(&s, &StatePaths::new(&s.state_dir));
        cfg.boot_source.as_mut().unwrap().boot_args = None;
        kiln_fc_api::parse_config_file(&serde_json::to_string(&cfg).unwrap()).unwrap();
    }

    #[test]
    fn control_maps_to_firecracker_requests_and_instance_states() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(Mutex::new(InstanceState::NotStarted));
        let handler = {
            let (seen, state) = (seen.clone(), state.clone());
            Arc::new(move |req: ApiRequest| {
                let mut st = state.lock().unwrap();
                let response = match &req {
                    ApiRequest::GetInstanceInfo => {
                        return ApiResponse::ok(&InstanceInfo {
                            app_name: "kiln-vmm".into(),
                            id: "vm-1".into(),
                            state: *st,
                            vmm_version: "0".into(),
                        })
                    }
                    ApiRequest::PutAction(a) if a.action_type == ActionType::InstanceStart => {
                        *st = InstanceState::Running;
                        ApiResponse::no_content()
                    }
                    ApiRequest::PatchVm(v) => {
                        *st = match v.state {
                            FcVmState::Paused => InstanceState::Paused,
                            FcVmState::Resumed => InstanceState::Running,
                        };
                        ApiResponse::no_content()
                    }
                    ApiRequest::PutAction(_) => ApiResponse::no_content(),
                    _ => ApiResponse::bad_request("unexpected"),
                };
                seen.lock().unwrap().push(format!("{req:?}"));
                response
            })
        };
        let server = ApiServer::bind(&sock).unwrap().spawn(handler).unwrap();
        let mut c = FcControl { name: "vm-1".into(), client: ApiClient::new(&sock) };
        assert_eq!(c.run_state().unwrap(), RunState::Created);
        c.start().unwrap();
        assert_eq!(c.run_state().unwrap(), RunState::Running);
        c.pause().unwrap();
        assert_eq!(c.run_state().unwrap(), RunState::Paused);
        c.resume().unwrap();
        c.request_shutdown().unwrap();
        let seen = seen.lock().unwrap().join("\n");
        for want in ["InstanceStart", "Paused", "Resumed", "SendCtrlAltDel"] {
            assert!(seen.contains(want), "{want} not sent: {seen}");
        }
        server.shutdown();
    }
}
