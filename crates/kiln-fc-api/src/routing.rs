//! Request routing: method + path + body → a typed [`ApiRequest`], and the [`ApiResponse`] a
//! handler answers with.
//!
//! The rules follow Firecracker's `parsed_request.rs`: paths are split on `/` after trimming
//! leading slashes (a trailing slash is ignored); a GET must not carry a body and a PUT/PATCH
//! must (except the two balloon-hinting PATCHes whose body is optional or absent); resource ids
//! in a path are non-empty and made of alphanumerics and `_`, and must equal the id in the body.
//! Every refusal is a 400 with a `fault_message`.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::http::{Method, StatusCode};
use crate::models::*;

/// One API call, fully parsed and validated for shape. Variant names follow the swagger's
/// operations; the payload is the request body.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ApiRequest {
    /// `GET /`.
    GetInstanceInfo,
    /// `GET /version`.
    GetVersion,
    /// `PUT /actions`.
    PutAction(InstanceActionInfo),
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `PUT /cpu-config`.
    PutCpuConfig(CpuConfig),
    /// `PUT /drives/{drive_id}` (ids checked equal).
    PutDrive(Drive),
    /// `PATCH /drives/{drive_id}` (ids checked equal).
    PatchDrive(PartialDrive),
    /// `PUT /pmem/{id}` (ids checked equal).
    PutPmem(Pmem),
    /// `PATCH /pmem/{id}` (ids checked equal).
    PatchPmem(PartialPmem),
    /// `PUT /network-interfaces/{iface_id}` (ids checked equal).
    PutNetworkInterface(NetworkInterface),
    /// `PATCH /network-interfaces/{iface_id}` (ids checked equal).
    PatchNetworkInterface(PartialNetworkInterface),
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfiguration),
    /// `PATCH /machine-config`.
    PatchMachineConfig(MachineConfigurationUpdate),
    /// `PATCH /vm`.
    PatchVm(Vm),
    /// `GET /vm/config`.
    GetVmConfig,
    /// `PUT /vsock`.
    PutVsock(Vsock),
    /// `PUT /entropy`.
    PutEntropy(EntropyDevice),
    /// `PUT /serial`.
    PutSerial(SerialDevice),
    /// `GET /balloon`.
    GetBalloon,
    /// `PUT /balloon`.
    PutBalloon(Balloon),
    /// `PATCH /balloon`.
    PatchBalloon(BalloonUpdate),
    /// `GET /balloon/statistics`.
    GetBalloonStats,
    /// `PATCH /balloon/statistics`.
    PatchBalloonStats(BalloonStatsUpdate),
    /// `PATCH /balloon/hinting/start` (body optional; default when absent).
    StartBalloonHinting(BalloonStartCmd),
    /// `GET /balloon/hinting/status`.
    GetBalloonHintingStatus,
    /// `PATCH /balloon/hinting/stop`.
    StopBalloonHinting,
    /// `PUT /logger`.
    PutLogger(Logger),
    /// `PUT /metrics`.
    PutMetrics(Metrics),
    /// `GET /mmds`.
    GetMmds,
    /// `PUT /mmds`: replace the data store.
    PutMmds(MmdsContentsObject),
    /// `PATCH /mmds`: JSON merge-patch the data store.
    PatchMmds(MmdsContentsObject),
    /// `PUT /mmds/config`.
    PutMmdsConfig(MmdsConfig),
    /// `PUT /snapshot/create`.
    CreateSnapshot(SnapshotCreateParams),
    /// `PUT /snapshot/load`.
    LoadSnapshot(SnapshotLoadParams),
    /// `GET /hotplug/memory`.
    GetMemoryHotplug,
    /// `PUT /hotplug/memory`.
    PutMemoryHotplug(MemoryHotplugConfig),
    /// `PATCH /hotplug/memory`.
    PatchMemoryHotplug(MemoryHotplugSizeUpdate),
}

/// Why a request was refused before reaching the handler. Every variant is a 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No route for this method and path.
    #[error("Invalid request method and/or path: {method} {path}.")]
    InvalidPathMethod {
        /// Method as sent.
        method: String,
        /// Path as sent.
        path: String,
    },
    /// A GET carried a body.
    #[error("GET request cannot have a body.")]
    GetWithBody,
    /// A PUT without a body.
    #[error("Empty PUT request.")]
    EmptyPut,
    /// A PATCH without a body.
    #[error("Empty PATCH request.")]
    EmptyPatch,
    /// The path lacks the resource id.
    #[error("The ID cannot be empty.")]
    EmptyId,
    /// The path's resource id has forbidden characters.
    #[error("API Resource IDs can only contain alphanumeric characters and underscores.")]
    InvalidId,
    /// The id in the path differs from the one in the body.
    #[error("The id from the path does not match the id from the body!")]
    IdMismatch,
    /// The body does not deserialize into the expected type.
    #[error("An error occurred when deserializing the json body of a request: {0}.")]
    Json(String),
    /// A body that is well-typed but self-contradictory (e.g. snapshot memory source).
    #[error("{0}")]
    Invalid(String),
}

impl RequestError {
    /// The status code Firecracker answers with (always 400).
    pub fn status(&self) -> StatusCode {
        StatusCode::BadRequest
    }
}

/// A handler's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiResponse {
    /// Status code.
    pub status: StatusCode,
    /// JSON body; `None` for 204.
    pub body: Option<String>,
}

impl ApiResponse {
    /// 204 No Content: the usual answer to a successful PUT/PATCH.
    pub fn no_content() -> Self {
        Self { status: StatusCode::NoContent, body: None }
    }

    /// 200 with `value` as JSON (500 with a fault_message should serialisation fail).
    pub fn ok<T: Serialize + ?Sized>(value: &T) -> Self {
        match serde_json::to_string(value) {
            Ok(body) => Self { status: StatusCode::Ok, body: Some(body) },
            Err(e) => {
                Self::error(StatusCode::InternalServerError, format!("Failed to serialize the response: {e}"))
            }
        }
    }

    /// `status` with `{"fault_message": msg}`.
    pub fn error(status: StatusCode, msg: impl Into<String>) -> Self {
        let body = serde_json::to_string(&ApiError::new(msg))
            .unwrap_or_else(|_| r#"{"fault_message":"internal error"}"#.to_string());
        Self { status, body: Some(body) }
    }

    /// 400 with `{"fault_message": msg}`: how the VMM refuses a request.
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::error(StatusCode::BadRequest, msg)
    }
}

impl From<RequestError> for ApiResponse {
    fn from(e: RequestError) -> Self {
        ApiResponse::error(e.status(), e.to_string())
    }
}

/// What the server hands parsed requests to; the VMM implements it.
///
/// Called from the connection's thread; one call per request, in order for a connection,
/// concurrently across connections.
pub trait ApiHandler: Send + Sync {
    /// Executes one request.
    fn handle(&self, req: ApiRequest) -> ApiResponse;
}

impl<F> ApiHandler for F
where
    F: Fn(ApiRequest) -> ApiResponse + Send + Sync,
{
    fn handle(&self, req: ApiRequest) -> ApiResponse {
        self(req)
    }
}

fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, RequestError> {
    // Every body in the API is a JSON object; serde would otherwise read an array positionally
    // into a struct (`[2, 96]` as a machine config).
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(RequestError::Json("the request body must be a JSON object".into()));
    }
    serde_json::from_slice(body).map_err(|e| RequestError::Json(e.to_string()))
}

fn checked_id(id: Option<&str>) -> Result<&str, RequestError> {
    let id = id.ok_or(RequestError::EmptyId)?;
    if id.is_empty() {
        return Err(RequestError::EmptyId);
    }
    if !id.chars().all(|c| c == '_' || c.is_alphanumeric()) {
        return Err(RequestError::InvalidId);
    }
    Ok(id)
}

fn same_id(path_id: &str, body_id: &str) -> Result<(), RequestError> {
    if path_id == body_id {
        Ok(())
    } else {
        Err(RequestError::IdMismatch)
    }
}

/// Parses a request into an [`ApiRequest`]. `body` is `None` when there was no body
/// (no or zero `Content-Length`).
pub fn parse_request(method: &Method, path: &str, body: Option<&[u8]>) -> Result<ApiRequest, RequestError> {
    use ApiRequest as R;
    let invalid =
        || RequestError::InvalidPathMethod { method: method.as_str().to_string(), path: path.to_string() };
    let tokens: Vec<&str> = path.trim_start_matches('/').split_terminator('/').collect();
    let (first, rest) = match tokens.split_first() {
        Some((f, r)) => (*f, r),
        None => ("", &[][..]),
    };
    let sub = rest.first().copied();
    // Paths have at most two segments after the first one (`/balloon/hinting/start`).
    if rest.len() > 2 {
        return Err(invalid());
    }

    match method {
        Method::Get => {
            let req = match (first, rest) {
                ("", []) => R::GetInstanceInfo,
                ("version", []) => R::GetVersion,
                ("machine-config", []) => R::GetMachineConfig,
                ("vm", ["config"]) => R::GetVmConfig,
                ("balloon", []) => R::GetBalloon,
                ("balloon", ["statistics"]) => R::GetBalloonStats,
                ("balloon", ["hinting", "status"]) => R::GetBalloonHintingStatus,
                ("mmds", []) => R::GetMmds,
                ("hotplug", ["memory"]) => R::GetMemoryHotplug,
                _ => return Err(invalid()),
            };
            if body.is_some() {
                return Err(RequestError::GetWithBody);
            }
            Ok(req)
        }
        Method::Put => {
            // Check the route first so that unknown paths are named even without a body.
            let known = matches!(
                (first, rest),
                ("actions", [])
                    | ("boot-source", [])
                    | ("cpu-config", [])
                    | ("drives", [] | [_])
                    | ("pmem", [] | [_])
                    | ("network-interfaces", [] | [_])
                    | ("machine-config", [])
                    | ("vsock", [])
                    | ("entropy", [])
                    | ("serial", [])
                    | ("balloon", [])
                    | ("logger", [])
                    | ("metrics", [])
                    | ("mmds", [] | ["config"])
                    | ("snapshot", ["create" | "load"])
                    | ("hotplug", ["memory"])
            );
            if !known {
                return Err(invalid());
            }
            let body = body.ok_or(RequestError::EmptyPut)?;
            Ok(match (first, rest) {
                ("actions", _) => R::PutAction(json(body)?),
                ("boot-source", _) => R::PutBootSource(json(body)?),
                ("cpu-config", _) => R::PutCpuConfig(json(body)?),
                ("drives", _) => {
                    let id = checked_id(sub)?;
                    let d: Drive = json(body)?;
                    same_id(id, &d.drive_id)?;
                    R::PutDrive(d)
                }
                ("pmem", _) => {
                    let id = checked_id(sub)?;
                    let p: Pmem = json(body)?;
                    same_id(id, &p.id)?;
                    R::PutPmem(p)
                }
                ("network-interfaces", _) => {
                    let id = checked_id(sub)?;
                    let n: NetworkInterface = json(body)?;
                    same_id(id, &n.iface_id)?;
                    R::PutNetworkInterface(n)
                }
                ("machine-config", _) => R::PutMachineConfig(json(body)?),
                ("vsock", _) => R::PutVsock(json(body)?),
                ("entropy", _) => R::PutEntropy(json(body)?),
                ("serial", _) => R::PutSerial(json(body)?),
                ("balloon", _) => R::PutBalloon(json(body)?),
                ("logger", _) => R::PutLogger(json(body)?),
                ("metrics", _) => R::PutMetrics(json(body)?),
                ("mmds", []) => R::PutMmds(json(body)?),
                ("mmds", _) => R::PutMmdsConfig(json(body)?),
                ("snapshot", ["create"]) => R::CreateSnapshot(json(body)?),
                ("snapshot", _) => {
                    let p: SnapshotLoadParams = json(body)?;
                    p.validate().map_err(RequestError::Json)?;
                    R::LoadSnapshot(p)
                }
                ("hotplug", _) => R::PutMemoryHotplug(json(body)?),
                _ => return Err(invalid()),
            })
        }
        Method::Patch => {
            match (first, rest) {
                ("balloon", ["hinting", "start"]) => {
                    return Ok(R::StartBalloonHinting(match body {
                        Some(b) => json(b)?,
                        None => BalloonStartCmd::default(),
                    }));
                }
                ("balloon", ["hinting", "stop"]) => {
                    // The swagger defines no body; tolerate an empty JSON object.
                    if let Some(b) = body {
                        let _: serde_json::Map<String, serde_json::Value> = json(b)?;
                    }
                    return Ok(R::StopBalloonHinting);
                }
                _ => {}
            }
            let known = matches!(
                (first, rest),
                ("drives", [] | [_])
                    | ("pmem", [] | [_])
                    | ("network-interfaces", [] | [_])
                    | ("machine-config", [])
                    | ("vm", [])
                    | ("balloon", [] | ["statistics"])
                    | ("mmds", [])
                    | ("hotplug", ["memory"])
            );
            if !known {
                return Err(invalid());
            }
            let body = body.ok_or(RequestError::EmptyPatch)?;
            Ok(match (first, rest) {
                ("drives", _) => {
                    let id = checked_id(sub)?;
                    let d: PartialDrive = json(body)?;
                    same_id(id, &d.drive_id)?;
                    R::PatchDrive(d)
                }
                ("pmem", _) => {
                    let id = checked_id(sub)?;
                    let p: PartialPmem = json(body)?;
                    same_id(id, &p.id)?;
                    R::PatchPmem(p)
                }
                ("network-interfaces", _) => {
                    let id = checked_id(sub)?;
                    let n: PartialNetworkInterface = json(body)?;
                    same_id(id, &n.iface_id)?;
                    R::PatchNetworkInterface(n)
                }
                ("machine-config", _) => {
                    let u: MachineConfigurationUpdate = json(body)?;
                    // Firecracker refuses a PATCH that changes nothing.
                    if u == MachineConfigurationUpdate::default() {
                        return Err(RequestError::EmptyPatch);
                    }
                    R::PatchMachineConfig(u)
                }
                ("vm", _) => R::PatchVm(json(body)?),
                ("balloon", []) => R::PatchBalloon(json(body)?),
                ("balloon", _) => R::PatchBalloonStats(json(body)?),
                ("mmds", _) => R::PatchMmds(json(body)?),
                ("hotplug", _) => R::PatchMemoryHotplug(json(body)?),
                _ => return Err(invalid()),
            })
        }
        Method::Other(_) => Err(invalid()),
    }
}

impl ApiRequest {
    /// The method and path this request is sent with (ids filled in from the body).
    pub fn method_and_path(&self) -> (Method, String) {
        use ApiRequest as R;
        let (m, p): (Method, String) = match self {
            R::GetInstanceInfo => (Method::Get, "/".into()),
            R::GetVersion => (Method::Get, "/version".into()),
            R::PutAction(_) => (Method::Put, "/actions".into()),
            R::PutBootSource(_) => (Method::Put, "/boot-source".into()),
            R::PutCpuConfig(_) => (Method::Put, "/cpu-config".into()),
            R::PutDrive(d) => (Method::Put, format!("/drives/{}", d.drive_id)),
            R::PatchDrive(d) => (Method::Patch, format!("/drives/{}", d.drive_id)),
            R::PutPmem(p) => (Method::Put, format!("/pmem/{}", p.id)),
            R::PatchPmem(p) => (Method::Patch, format!("/pmem/{}", p.id)),
            R::PutNetworkInterface(n) => (Method::Put, format!("/network-interfaces/{}", n.iface_id)),
            R::PatchNetworkInterface(n) => (Method::Patch, format!("/network-interfaces/{}", n.iface_id)),
            R::GetMachineConfig => (Method::Get, "/machine-config".into()),
            R::PutMachineConfig(_) => (Method::Put, "/machine-config".into()),
            R::PatchMachineConfig(_) => (Method::Patch, "/machine-config".into()),
            R::PatchVm(_) => (Method::Patch, "/vm".into()),
            R::GetVmConfig => (Method::Get, "/vm/config".into()),
            R::PutVsock(_) => (Method::Put, "/vsock".into()),
            R::PutEntropy(_) => (Method::Put, "/entropy".into()),
            R::PutSerial(_) => (Method::Put, "/serial".into()),
            R::GetBalloon => (Method::Get, "/balloon".into()),
            R::PutBalloon(_) => (Method::Put, "/balloon".into()),
            R::PatchBalloon(_) => (Method::Patch, "/balloon".into()),
            R::GetBalloonStats => (Method::Get, "/balloon/statistics".into()),
            R::PatchBalloonStats(_) => (Method::Patch, "/balloon/statistics".into()),
            R::StartBalloonHinting(_) => (Method::Patch, "/balloon/hinting/start".into()),
            R::GetBalloonHintingStatus => (Method::Get, "/balloon/hinting/status".into()),
            R::StopBalloonHinting => (Method::Patch, "/balloon/hinting/stop".into()),
            R::PutLogger(_) => (Method::Put, "/logger".into()),
            R::PutMetrics(_) => (Method::Put, "/metrics".into()),
            R::GetMmds => (Method::Get, "/mmds".into()),
            R::PutMmds(_) => (Method::Put, "/mmds".into()),
            R::PatchMmds(_) => (Method::Patch, "/mmds".into()),
            R::PutMmdsConfig(_) => (Method::Put, "/mmds/config".into()),
            R::CreateSnapshot(_) => (Method::Put, "/snapshot/create".into()),
            R::LoadSnapshot(_) => (Method::Put, "/snapshot/load".into()),
            R::GetMemoryHotplug => (Method::Get, "/hotplug/memory".into()),
            R::PutMemoryHotplug(_) => (Method::Put, "/hotplug/memory".into()),
            R::PatchMemoryHotplug(_) => (Method::Patch, "/hotplug/memory".into()),
        };
        (m, p)
    }

    /// The JSON body this request is sent with, if any.
    pub fn body_json(&self) -> Result<Option<String>, serde_json::Error> {
        use ApiRequest as R;
        fn s<T: Serialize>(t: &T) -> Result<String, serde_json::Error> {
            serde_json::to_string(t)
        }
        Ok(Some(match self {
            R::GetInstanceInfo
            | R::GetVersion
            | R::GetMachineConfig
            | R::GetVmConfig
            | R::GetBalloon
            | R::GetBalloonStats
            | R::GetBalloonHintingStatus
            | R::StopBalloonHinting
            | R::GetMmds
            | R::GetMemoryHotplug => return Ok(None),
            R::PutAction(b) => s(b)?,
            R::PutBootSource(b) => s(b)?,
            R::PutCpuConfig(b) => s(b)?,
            R::PutDrive(b) => s(b)?,
            R::PatchDrive(b) => s(b)?,
            R::PutPmem(b) => s(b)?,
            R::PatchPmem(b) => s(b)?,
            R::PutNetworkInterface(b) => s(b)?,
            R::PatchNetworkInterface(b) => s(b)?,
            R::PutMachineConfig(b) => s(b)?,
            R::PatchMachineConfig(b) => s(b)?,
            R::PatchVm(b) => s(b)?,
            R::PutVsock(b) => s(b)?,
            R::PutEntropy(b) => s(b)?,
            R::PutSerial(b) => s(b)?,
            R::PutBalloon(b) => s(b)?,
            R::PatchBalloon(b) => s(b)?,
            R::PatchBalloonStats(b) => s(b)?,
            R::StartBalloonHinting(b) => s(b)?,
            R::PutLogger(b) => s(b)?,
            R::PutMetrics(b) => s(b)?,
            R::PutMmds(b) => s(b)?,
            R::PatchMmds(b) => s(b)?,
            R::PutMmdsConfig(b) => s(b)?,
            R::CreateSnapshot(b) => s(b)?,
            R::LoadSnapshot(b) => s(b)?,
            R::PutMemoryHotplug(b) => s(b)?,
            R::PatchMemoryHotplug(b) => s(b)?,
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn put(path: &str, body: &str) -> Result<ApiRequest, RequestError> {
        parse_request(&Method::Put, path, Some(body.as_bytes()))
    }
    fn patch(path: &str, body: &str) -> Result<ApiRequest, RequestError> {
        parse_request(&Method::Patch, path, Some(body.as_bytes()))
    }
    fn get(path: &str) -> Result<ApiRequest, RequestError> {
        parse_request(&Method::Get, path, None)
    }

    /// One valid request per route: (method, path, body).
    pub(crate) const VALID: &[(&str, &str, Option<&str>)] = &[
        ("GET", "/", None),
        ("GET", "/version", None),
        ("PUT", "/actions", Some(r#"{"action_type":"InstanceStart"}"#)),
        ("PUT", "/boot-source", Some(r#"{"kernel_image_path":"/k","boot_args":"console=ttyS0"}"#)),
        ("PUT", "/cpu-config", Some(r#"{"kvm_capabilities":["!56"]}"#)),
        (
            "PUT",
            "/drives/rootfs",
            Some(r#"{"drive_id":"rootfs","path_on_host":"/r","is_root_device":true,"is_read_only":false}"#),
        ),
        ("PATCH", "/drives/rootfs", Some(r#"{"drive_id":"rootfs","path_on_host":"/r2"}"#)),
        ("PUT", "/pmem/pm0", Some(r#"{"id":"pm0","path_on_host":"/p"}"#)),
        ("PATCH", "/pmem/pm0", Some(r#"{"id":"pm0"}"#)),
        ("PUT", "/network-interfaces/eth0", Some(r#"{"iface_id":"eth0","host_dev_name":"tap0"}"#)),
        (
            "PATCH",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id":"eth0","rx_rate_limiter":{"ops":{"size":1,"refill_time":1}}}"#),
        ),
        ("GET", "/machine-config", None),
        ("PUT", "/machine-config", Some(r#"{"vcpu_count":2,"mem_size_mib":256}"#)),
        ("PATCH", "/machine-config", Some(r#"{"mem_size_mib":512}"#)),
        ("PATCH", "/vm", Some(r#"{"state":"Paused"}"#)),
        ("GET", "/vm/config", None),
        ("PUT", "/vsock", Some(r#"{"guest_cid":3,"uds_path":"/v.sock"}"#)),
        ("PUT", "/entropy", Some(r#"{}"#)),
        ("PUT", "/serial", Some(r#"{"serial_out_path":"/s"}"#)),
        ("GET", "/balloon", None),
        ("PUT", "/balloon", Some(r#"{"amount_mib":1,"deflate_on_oom":true}"#)),
        ("PATCH", "/balloon", Some(r#"{"amount_mib":2}"#)),
        ("GET", "/balloon/statistics", None),
        ("PATCH", "/balloon/statistics", Some(r#"{"stats_polling_interval_s":1}"#)),
        ("PATCH", "/balloon/hinting/start", Some(r#"{"acknowledge_on_stop":true}"#)),
        ("GET", "/balloon/hinting/status", None),
        ("PATCH", "/balloon/hinting/stop", None),
        ("PUT", "/logger", Some(r#"{"level":"debug","log_path":"/l"}"#)),
        ("PUT", "/metrics", Some(r#"{"metrics_path":"/m"}"#)),
        ("GET", "/mmds", None),
        ("PUT", "/mmds", Some(r#"{"latest":{"meta-data":{}}}"#)),
        ("PATCH", "/mmds", Some(r#"{"latest":null}"#)),
        ("PUT", "/mmds/config", Some(r#"{"network_interfaces":["eth0"],"version":"V2"}"#)),
        ("PUT", "/snapshot/create", Some(r#"{"mem_file_path":"/m","snapshot_path":"/s"}"#)),
        (
            "PUT",
            "/snapshot/load",
            Some(r#"{"snapshot_path":"/s","mem_backend":{"backend_type":"File","backend_path":"/m"}}"#),
        ),
        ("GET", "/hotplug/memory", None),
        ("PUT", "/hotplug/memory", Some(r#"{"total_size_mib":1024}"#)),
        ("PATCH", "/hotplug/memory", Some(r#"{"requested_size_mib":128}"#)),
    ];

    fn method(m: &str) -> Method {
        match m {
            "GET" => Method::Get,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            o => Method::Other(o.into()),
        }
    }

    #[test]
    fn every_route_parses_and_maps_back() {
        for (m, p, b) in VALID {
            let req =
                parse_request(&method(m), p, b.map(str::as_bytes)).unwrap_or_else(|e| panic!("{m} {p}: {e}"));
            let (m2, p2) = req.method_and_path();
            assert_eq!((m2.as_str(), p2.as_str()), (*m, *p), "{req:?}");
            // The body the client would send parses back to the same request.
            let body = req.body_json().unwrap();
            let again = parse_request(&m2, &p2, body.as_deref().map(str::as_bytes)).unwrap();
            assert_eq!(again, req);
        }
    }

    #[test]
    fn typed_payloads() {
        assert_eq!(
            put("/actions", r#"{"action_type":"SendCtrlAltDel"}"#).unwrap(),
            ApiRequest::PutAction(InstanceActionInfo { action_type: ActionType::SendCtrlAltDel })
        );
        match put("/drives/rootfs", r#"{"drive_id":"rootfs","is_root_device":true}"#).unwrap() {
            ApiRequest::PutDrive(d) => {
                assert_eq!(d.cache_type, CacheType::Unsafe);
                assert_eq!(d.io_engine, IoEngine::Sync);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_request(&Method::Patch, "/balloon/hinting/start", None).unwrap(),
            ApiRequest::StartBalloonHinting(BalloonStartCmd::default())
        );
        // Trailing slash and query string are tolerated.
        assert_eq!(get("/machine-config/").unwrap(), ApiRequest::GetMachineConfig);
        assert_eq!(get("//version").unwrap(), ApiRequest::GetVersion);
    }

    #[test]
    fn unknown_paths_and_methods() {
        let e = get("/nope").unwrap_err();
        assert_eq!(e.to_string(), "Invalid request method and/or path: GET /nope.");
        for (m, p) in [
            ("GET", "/actions"),
            ("GET", "/vm"),
            ("GET", "/drives/x"),
            ("PUT", "/version"),
            ("PUT", "/vm/config"),
            ("PATCH", "/boot-source"),
            ("PUT", "/snapshot/other"),
            ("PUT", "/drives/a/b"),
            ("POST", "/actions"),
            ("DELETE", "/drives/rootfs"),
            ("PATCH", "/balloon/hinting/other"),
            ("GET", "/balloon/hinting"),
        ] {
            let e = parse_request(&method(m), p, Some(b"{}")).unwrap_err();
            assert!(matches!(e, RequestError::InvalidPathMethod { .. }), "{m} {p}: {e}");
            assert!(e.to_string().contains(p), "{e}");
            assert_eq!(ApiResponse::from(e).status, StatusCode::BadRequest);
        }
    }

    #[test]
    fn body_presence_rules() {
        assert_eq!(parse_request(&Method::Get, "/", Some(b"{}")).unwrap_err(), RequestError::GetWithBody);
        assert_eq!(parse_request(&Method::Put, "/boot-source", None).unwrap_err(), RequestError::EmptyPut);
        assert_eq!(parse_request(&Method::Patch, "/vm", None).unwrap_err(), RequestError::EmptyPatch);
        assert_eq!(parse_request(&Method::Put, "/mmds", None).unwrap_err().to_string(), "Empty PUT request.");
        assert_eq!(patch("/machine-config", "{}").unwrap_err(), RequestError::EmptyPatch);
    }

    #[test]
    fn id_rules() {
        let body = r#"{"drive_id":"a","is_root_device":false}"#;
        assert_eq!(put("/drives", body).unwrap_err(), RequestError::EmptyId);
        assert_eq!(put("/drives/", body).unwrap_err(), RequestError::EmptyId);
        assert_eq!(put("/drives/a-b", body).unwrap_err(), RequestError::InvalidId);
        assert_eq!(put("/drives/b", body).unwrap_err(), RequestError::IdMismatch);
        assert_eq!(
            put("/drives/b", body).unwrap_err().to_string(),
            "The id from the path does not match the id from the body!"
        );
        assert!(put("/drives/a", body).is_ok());
        assert_eq!(patch("/drives/b", r#"{"drive_id":"a"}"#).unwrap_err(), RequestError::IdMismatch);
        assert_eq!(
            put("/network-interfaces/x", r#"{"iface_id":"y","host_dev_name":"t"}"#).unwrap_err(),
            RequestError::IdMismatch
        );
        assert_eq!(
            patch("/network-interfaces/x", r#"{"iface_id":"y"}"#).unwrap_err(),
            RequestError::IdMismatch
        );
        assert_eq!(
            put("/pmem/x", r#"{"id":"y","path_on_host":"/p"}"#).unwrap_err(),
            RequestError::IdMismatch
        );
        assert_eq!(patch("/pmem/x", r#"{"id":"y"}"#).unwrap_err(), RequestError::IdMismatch);
    }

    #[test]
    fn bad_bodies() {
        for (m, p, b) in [
            ("PUT", "/boot-source", r#"{"kernel_image_path":"/k","extra":1}"#),
            ("PUT", "/boot-source", r#"{"boot_args":"x"}"#),
            ("PUT", "/boot-source", "not json"),
            ("PUT", "/machine-config", r#"{"vcpu_count":"2","mem_size_mib":1}"#),
            ("PUT", "/machine-config", r#"{"vcpu_count":-1,"mem_size_mib":1}"#),
            ("PUT", "/actions", r#"{"action_type":"Reboot"}"#),
            ("PATCH", "/vm", r#"{"state":"Running"}"#),
            ("PUT", "/mmds", "[1,2]"),
            ("PUT", "/mmds", "\"s\""),
            ("PUT", "/logger", r#"{"level":"loud"}"#),
            ("PUT", "/mmds/config", r#"{"network_interfaces":["e"],"ipv4_address":"x"}"#),
            ("PATCH", "/balloon/hinting/stop", "[]"),
        ] {
            let e = parse_request(&method(m), p, Some(b.as_bytes())).unwrap_err();
            assert!(matches!(e, RequestError::Json(_)), "{m} {p} {b}: {e:?}");
            assert!(
                e.to_string()
                    .starts_with("An error occurred when deserializing the json body of a request: "),
                "{e}"
            );
        }
        // Snapshot memory source must be exactly one of the two.
        let e = put("/snapshot/load", r#"{"snapshot_path":"/s"}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "An error occurred when deserializing the json body of a request: missing field: \
             either `mem_backend` or `mem_file_path` is required."
        );
        let e = put(
            "/snapshot/load",
            r#"{"snapshot_path":"/s","mem_file_path":"/m","mem_backend":{"backend_type":"File","backend_path":"/m"}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("too many fields"), "{e:?}");
    }

    #[test]
    fn responses() {
        let r = ApiResponse::bad_request("nope \"quoted\"");
        assert_eq!(r.status, StatusCode::BadRequest);
        let v: serde_json::Value = serde_json::from_str(r.body.as_deref().unwrap()).unwrap();
        assert_eq!(v["fault_message"], "nope \"quoted\"");
        assert_eq!(ApiResponse::no_content().body, None);
        let ok = ApiResponse::ok(&FirecrackerVersion { firecracker_version: "1".into() });
        assert_eq!(ok.status, StatusCode::Ok);
        assert_eq!(ok.body.as_deref(), Some(r#"{"firecracker_version":"1"}"#));
    }
}
