//! Serves Firecracker's API: maps each parsed request (`kiln_fc_api::routing::ApiRequest`) to a
//! [`VmmAction`] on the [`Controller`], and its outcome to Firecracker's status codes. HTTP itself is
//! `kiln-fc-api`'s; this module only decides what each request means for this VMM.

use std::sync::Arc;

use kiln_devices::metrics::Counter;
use kiln_fc_api::models::{ActionType, FirecrackerVersion, InstanceInfo, InstanceState, VmState};
use kiln_fc_api::routing::{ApiHandler, ApiRequest, ApiResponse};

use crate::controller::{ActionOutput, Controller, Lifecycle, VmmAction};
use crate::metrics::METRICS;

/// The Firecracker API version whose contract (`firecracker-api.yaml`) this VMM serves.
pub const FIRECRACKER_API_VERSION: &str = "1.16.1";

/// The API handler for one VMM process.
pub struct VmmApi {
    pub controller: Arc<Controller>,
    pub instance_id: String,
}

impl VmmApi {
    fn act(&self, action: VmmAction) -> ApiResponse {
        match self.controller.handle(action) {
            Ok(ActionOutput::Done) => ApiResponse::no_content(),
            Ok(ActionOutput::MachineConfig(m)) => ApiResponse::ok(&m),
            Ok(ActionOutput::VmConfig(c)) => ApiResponse::ok(&*c),
            Ok(ActionOutput::Balloon(b)) => ApiResponse::ok(&b),
            Ok(ActionOutput::BalloonStats(b)) => ApiResponse::ok(&*b),
            Ok(ActionOutput::Mmds(v)) => ApiResponse::ok(&v),
            Err(e) => ApiResponse::bad_request(e.to_string()),
        }
    }
}

/// The metrics counters of a request: (requests, failures); Firecracker's names where it has them.
fn request_counters(req: &ApiRequest) -> Option<(&'static Counter, Option<&'static Counter>)> {
    let (g, p, a) = (&METRICS.get_api_requests, &METRICS.put_api_requests, &METRICS.patch_api_requests);
    Some(match req {
        ApiRequest::GetInstanceInfo => (&g.instance_info_count, None),
        ApiRequest::GetVersion => (&g.vmm_version_count, None),
        ApiRequest::GetMachineConfig => (&g.machine_cfg_count, None),
        ApiRequest::GetVmConfig => (&g.vm_config_count, None),
        ApiRequest::GetMmds => (&g.mmds_count, None),
        ApiRequest::GetMemoryHotplug => (&g.hotplug_memory_count, None),
        ApiRequest::GetBalloon | ApiRequest::GetBalloonStats | ApiRequest::GetBalloonHintingStatus => {
            (&g.balloon_count, None)
        }
        ApiRequest::PutAction(_) => (&p.actions_count, Some(&p.actions_fails)),
        ApiRequest::PutBootSource(_) => (&p.boot_source_count, Some(&p.boot_source_fails)),
        ApiRequest::PutCpuConfig(_) => (&p.cpu_cfg_count, Some(&p.cpu_cfg_fails)),
        ApiRequest::PutDrive(_) => (&p.drive_count, Some(&p.drive_fails)),
        ApiRequest::PutPmem(_) => (&p.pmem_count, Some(&p.pmem_fails)),
        ApiRequest::PutNetworkInterface(_) => (&p.network_count, Some(&p.network_fails)),
        ApiRequest::PutMachineConfig(_) => (&p.machine_cfg_count, Some(&p.machine_cfg_fails)),
        ApiRequest::PutVsock(_) => (&p.vsock_count, Some(&p.vsock_fails)),
        ApiRequest::PutEntropy(_) => (&p.entropy_count, Some(&p.entropy_fails)),
        ApiRequest::PutSerial(_) => (&p.serial_count, Some(&p.serial_fails)),
        ApiRequest::PutBalloon(_) => (&p.balloon_count, Some(&p.balloon_fails)),
        ApiRequest::PutLogger(_) => (&p.logger_count, Some(&p.logger_fails)),
        ApiRequest::PutMetrics(_) => (&p.metrics_count, Some(&p.metrics_fails)),
        ApiRequest::PutMmds(_) | ApiRequest::PutMmdsConfig(_) => (&p.mmds_count, Some(&p.mmds_fails)),
        ApiRequest::PutMemoryHotplug(_) => (&p.hotplug_memory_count, Some(&p.hotplug_memory_fails)),
        ApiRequest::PatchDrive(_) => (&a.drive_count, Some(&a.drive_fails)),
        ApiRequest::PatchNetworkInterface(_) => (&a.network_count, Some(&a.network_fails)),
        ApiRequest::PatchMachineConfig(_) => (&a.machine_cfg_count, Some(&a.machine_cfg_fails)),
        ApiRequest::PatchMmds(_) => (&a.mmds_count, Some(&a.mmds_fails)),
        ApiRequest::PatchMemoryHotplug(_) => (&a.hotplug_memory_count, Some(&a.hotplug_memory_fails)),
        ApiRequest::PatchVm(_) => (&a.vm_count, Some(&a.vm_fails)),
        ApiRequest::PatchBalloon(_)
        | ApiRequest::PatchBalloonStats(_)
        | ApiRequest::StartBalloonHinting(_)
        | ApiRequest::StopBalloonHinting => (&a.balloon_count, Some(&a.balloon_fails)),
        _ => return None,
    })
}

impl ApiHandler for VmmApi {
    fn handle(&self, req: ApiRequest) -> ApiResponse {
        let counters = request_counters(&req);
        if let Some((count, _)) = counters {
            count.inc();
        }
        let resp = self.dispatch(req);
        if let (Some((_, Some(fails))), false) = (counters, (200..300).contains(&resp.status.as_u16())) {
            fails.inc();
        }
        resp
    }
}

impl VmmApi {
    fn dispatch(&self, req: ApiRequest) -> ApiResponse {
        match req {
            ApiRequest::GetInstanceInfo => ApiResponse::ok(&InstanceInfo {
                app_name: "kiln-vmm".into(),
                id: self.instance_id.clone(),
                state: match self.controller.lifecycle() {
                    Lifecycle::NotStarted => InstanceState::NotStarted,
                    Lifecycle::Running => InstanceState::Running,
                    Lifecycle::Paused => InstanceState::Paused,
                },
                vmm_version: env!("CARGO_PKG_VERSION").into(),
            }),
            ApiRequest::GetVersion => {
                ApiResponse::ok(&FirecrackerVersion { firecracker_version: FIRECRACKER_API_VERSION.into() })
            }
            ApiRequest::PutBootSource(b) => self.act(VmmAction::SetBootSource(b)),
            ApiRequest::PutDrive(d) => self.act(VmmAction::InsertDrive(d)),
            ApiRequest::PatchDrive(d) => self.act(VmmAction::UpdateDrive(d)),
            ApiRequest::GetMachineConfig => self.act(VmmAction::GetMachineConfig),
            ApiRequest::PutMachineConfig(m) => self.act(VmmAction::SetMachineConfig(m)),
            ApiRequest::PatchMachineConfig(m) => self.act(VmmAction::UpdateMachineConfig(m)),
            ApiRequest::GetVmConfig => self.act(VmmAction::GetVmConfig),
            ApiRequest::PutEntropy(e) => self.act(VmmAction::SetEntropy(e)),
            ApiRequest::PutNetworkInterface(n) => self.act(VmmAction::InsertNetworkInterface(n)),
            ApiRequest::PatchNetworkInterface(n) => self.act(VmmAction::UpdateNetworkInterface(n)),
            ApiRequest::PutMetrics(m) => self.act(VmmAction::ConfigureMetrics(m)),
            ApiRequest::PutLogger(l) => self.act(VmmAction::ConfigureLogger(l)),
            ApiRequest::PutSerial(s) => self.act(VmmAction::ConfigureSerial(s)),
            ApiRequest::PutVsock(v) => self.act(VmmAction::SetVsock(v)),
            ApiRequest::PutBalloon(b) => self.act(VmmAction::SetBalloon(b)),
            ApiRequest::PatchBalloon(b) => self.act(VmmAction::UpdateBalloon(b)),
            ApiRequest::GetBalloon => self.act(VmmAction::GetBalloon),
            ApiRequest::GetBalloonStats => self.act(VmmAction::GetBalloonStats),
            ApiRequest::PatchBalloonStats(u) => self.act(VmmAction::UpdateBalloonStats(u)),
            ApiRequest::GetMmds => self.act(VmmAction::GetMmds),
            ApiRequest::PutMmds(data) => self.act(VmmAction::PutMmds(data.into())),
            ApiRequest::PatchMmds(patch) => self.act(VmmAction::PatchMmds(patch.into())),
            ApiRequest::PutMmdsConfig(c) => self.act(VmmAction::SetMmdsConfig(c)),
            ApiRequest::PatchVm(vm) => self.act(match vm.state {
                VmState::Paused => VmmAction::Pause,
                VmState::Resumed => VmmAction::Resume,
            }),
            ApiRequest::PutAction(a) => match a.action_type {
                ActionType::InstanceStart => self.act(VmmAction::Start),
                ActionType::SendCtrlAltDel => self.act(VmmAction::SendCtrlAltDel),
                ActionType::FlushMetrics => self.act(VmmAction::FlushMetrics),
            },
            other => {
                let (method, path) = other.method_and_path();
                ApiResponse::bad_request(format!(
                    "{method} {path} is not supported by kiln-vmm yet (see docs/kiln-vmm.md for what is)"
                ))
            }
        }
    }
}
