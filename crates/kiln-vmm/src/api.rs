//! Serves Firecracker's API: maps each parsed request (`kiln_fc_api::routing::ApiRequest`) to a
//! [`VmmAction`] on the [`Controller`], and its outcome to Firecracker's status codes. HTTP itself is
//! `kiln-fc-api`'s; this module only decides what each request means for this VMM.

use std::sync::Arc;

use kiln_fc_api::models::{ActionType, FirecrackerVersion, InstanceInfo, InstanceState, VmState};
use kiln_fc_api::routing::{ApiHandler, ApiRequest, ApiResponse};

use crate::controller::{ActionOutput, Controller, Lifecycle, VmmAction};

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

impl ApiHandler for VmmApi {
    fn handle(&self, req: ApiRequest) -> ApiResponse {
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
                ActionType::FlushMetrics => ApiResponse::bad_request(
                    "FlushMetrics is not supported by kiln-vmm yet: metrics are not configured",
                ),
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
