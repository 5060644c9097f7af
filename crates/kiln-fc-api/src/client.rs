//! A blocking, typed client for the Firecracker API over a Unix socket.
//!
//! Works against kiln-vmm and a real Firecracker alike. One connection is kept open and reused
//! (keep-alive); if the server closed it in between, the request is retried once on a fresh one.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::http::{read_response, write_request, HttpError, Method, RawResponse};
use crate::models::*;
use crate::routing::ApiRequest;

/// Default read/write timeout of a request (boots under emulation are slow).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Largest response body accepted.
pub const MAX_RESPONSE_SIZE: usize = 16 * 1024 * 1024;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot connect to the API socket {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Sending the request or reading the answer failed (includes timeouts).
    #[error("API request {method} {path} failed")]
    Transport {
        /// Method.
        method: String,
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: HttpError,
    },
    /// The server refused the request.
    #[error("API request {method} {path} answered {status}: {fault_message}")]
    Api {
        /// Method.
        method: String,
        /// Path.
        path: String,
        /// HTTP status.
        status: u16,
        /// The server's `fault_message` (or the raw body when it had none).
        fault_message: String,
    },
    /// The request body could not be encoded.
    #[error("cannot encode the request body")]
    Encode(#[source] serde_json::Error),
    /// The response body is not what the swagger says.
    #[error("unexpected response body for {path}: {body}")]
    Decode {
        /// Path.
        path: String,
        /// The body received.
        body: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

/// A blocking API client bound to one socket path.
#[derive(Debug)]
pub struct ApiClient {
    path: PathBuf,
    timeout: Option<Duration>,
    stream: Option<UnixStream>,
}

impl ApiClient {
    /// A client for `socket`; connects lazily on the first request.
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Self { path: socket.as_ref().to_path_buf(), timeout: Some(DEFAULT_TIMEOUT), stream: None }
    }

    /// Sets the per-request read/write timeout (`None`: wait forever).
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self.stream = None;
        self
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Connects now (to check the server is up).
    pub fn connect(&mut self) -> Result<(), ClientError> {
        if self.stream.is_none() {
            self.stream = Some(self.open()?);
        }
        Ok(())
    }

    fn open(&self) -> Result<UnixStream, ClientError> {
        let connect_err = |source| ClientError::Connect { path: self.path.clone(), source };
        let s = UnixStream::connect(&self.path).map_err(connect_err)?;
        s.set_read_timeout(self.timeout).map_err(connect_err)?;
        s.set_write_timeout(self.timeout).map_err(connect_err)?;
        Ok(s)
    }

    /// Sends any request and returns the raw answer, whatever its status.
    pub fn request(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<RawResponse, ClientError> {
        let transport =
            |source| ClientError::Transport { method: method.to_string(), path: path.to_string(), source };
        if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(transport(HttpError::Malformed(format!("invalid request path {path:?}"))));
        }
        let reused = self.stream.is_some();
        let stream = match self.stream.take() {
            Some(s) => s,
            None => self.open()?,
        };
        match Self::exchange(stream, &method, path, body) {
            Ok((resp, stream)) => {
                if resp.keep_alive {
                    self.stream = Some(stream);
                }
                Ok(resp)
            }
            // A kept-alive connection the server had closed: nothing was processed; retry once.
            Err(e) if reused && is_stale_connection(&e) => {
                let stream = self.open()?;
                let (resp, stream) = Self::exchange(stream, &method, path, body).map_err(transport)?;
                if resp.keep_alive {
                    self.stream = Some(stream);
                }
                Ok(resp)
            }
            Err(e) => Err(transport(e)),
        }
    }

    fn exchange(
        mut stream: UnixStream,
        method: &Method,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(RawResponse, UnixStream), HttpError> {
        write_request(&mut stream, method, path, body).map_err(HttpError::Io)?;
        let resp = read_response(&mut stream, MAX_RESPONSE_SIZE)?;
        Ok((resp, stream))
    }

    /// Sends `req` (an [`ApiRequest`] built by the caller) and returns the raw answer.
    pub fn send(&mut self, req: &ApiRequest) -> Result<RawResponse, ClientError> {
        let (method, path) = req.method_and_path();
        let body = req.body_json().map_err(ClientError::Encode)?;
        self.request(method, &path, body.as_deref().map(str::as_bytes))
    }

    fn check(method: &Method, path: &str, resp: RawResponse) -> Result<RawResponse, ClientError> {
        if (200..300).contains(&resp.status) {
            return Ok(resp);
        }
        let fault_message = serde_json::from_slice::<ApiError>(&resp.body)
            .ok()
            .filter(|e| !e.fault_message.is_empty())
            .map(|e| e.fault_message)
            .unwrap_or_else(|| resp.text());
        Err(ClientError::Api {
            method: method.to_string(),
            path: path.to_string(),
            status: resp.status,
            fault_message,
        })
    }

    /// Sends `body` as JSON and expects a 2xx.
    pub fn call<T: Serialize + ?Sized>(
        &mut self,
        method: Method,
        path: &str,
        body: &T,
    ) -> Result<(), ClientError> {
        let body = serde_json::to_vec(body).map_err(ClientError::Encode)?;
        let resp = self.request(method.clone(), path, Some(&body))?;
        Self::check(&method, path, resp).map(|_| ())
    }

    /// GETs `path` and decodes the 200 body.
    pub fn get<T: DeserializeOwned>(&mut self, path: &str) -> Result<T, ClientError> {
        let resp = self.request(Method::Get, path, None)?;
        let resp = Self::check(&Method::Get, path, resp)?;
        serde_json::from_slice(&resp.body).map_err(|source| ClientError::Decode {
            path: path.to_string(),
            body: resp.text(),
            source,
        })
    }

    // --- Typed calls -------------------------------------------------------------------------

    /// `GET /`.
    pub fn get_instance_info(&mut self) -> Result<InstanceInfo, ClientError> {
        self.get("/")
    }

    /// `GET /version`.
    pub fn get_version(&mut self) -> Result<FirecrackerVersion, ClientError> {
        self.get("/version")
    }

    /// `PUT /boot-source`.
    pub fn put_boot_source(&mut self, b: &BootSource) -> Result<(), ClientError> {
        self.call(Method::Put, "/boot-source", b)
    }

    /// `PUT /drives/{drive_id}`.
    pub fn put_drive(&mut self, d: &Drive) -> Result<(), ClientError> {
        self.call(Method::Put, &format!("/drives/{}", d.drive_id), d)
    }

    /// `PATCH /drives/{drive_id}`.
    pub fn patch_drive(&mut self, d: &PartialDrive) -> Result<(), ClientError> {
        self.call(Method::Patch, &format!("/drives/{}", d.drive_id), d)
    }

    /// `PUT /network-interfaces/{iface_id}`.
    pub fn put_network_interface(&mut self, n: &NetworkInterface) -> Result<(), ClientError> {
        self.call(Method::Put, &format!("/network-interfaces/{}", n.iface_id), n)
    }

    /// `PATCH /network-interfaces/{iface_id}`.
    pub fn patch_network_interface(&mut self, n: &PartialNetworkInterface) -> Result<(), ClientError> {
        self.call(Method::Patch, &format!("/network-interfaces/{}", n.iface_id), n)
    }

    /// `PUT /pmem/{id}`.
    pub fn put_pmem(&mut self, p: &Pmem) -> Result<(), ClientError> {
        self.call(Method::Put, &format!("/pmem/{}", p.id), p)
    }

    /// `GET /machine-config`.
    pub fn get_machine_config(&mut self) -> Result<MachineConfiguration, ClientError> {
        self.get("/machine-config")
    }

    /// `PUT /machine-config`.
    pub fn put_machine_config(&mut self, m: &MachineConfiguration) -> Result<(), ClientError> {
        self.call(Method::Put, "/machine-config", m)
    }

    /// `PATCH /machine-config`.
    pub fn patch_machine_config(&mut self, m: &MachineConfigurationUpdate) -> Result<(), ClientError> {
        self.call(Method::Patch, "/machine-config", m)
    }

    /// `PUT /cpu-config`.
    pub fn put_cpu_config(&mut self, c: &CpuConfig) -> Result<(), ClientError> {
        self.call(Method::Put, "/cpu-config", c)
    }

    /// `PUT /vsock`.
    pub fn put_vsock(&mut self, v: &Vsock) -> Result<(), ClientError> {
        self.call(Method::Put, "/vsock", v)
    }

    /// `PUT /entropy`.
    pub fn put_entropy(&mut self, e: &EntropyDevice) -> Result<(), ClientError> {
        self.call(Method::Put, "/entropy", e)
    }

    /// `PUT /serial`.
    pub fn put_serial(&mut self, s: &SerialDevice) -> Result<(), ClientError> {
        self.call(Method::Put, "/serial", s)
    }

    /// `PUT /logger`.
    pub fn put_logger(&mut self, l: &Logger) -> Result<(), ClientError> {
        self.call(Method::Put, "/logger", l)
    }

    /// `PUT /metrics`.
    pub fn put_metrics(&mut self, m: &Metrics) -> Result<(), ClientError> {
        self.call(Method::Put, "/metrics", m)
    }

    /// `PUT /balloon`.
    pub fn put_balloon(&mut self, b: &Balloon) -> Result<(), ClientError> {
        self.call(Method::Put, "/balloon", b)
    }

    /// `PATCH /balloon`.
    pub fn patch_balloon(&mut self, b: &BalloonUpdate) -> Result<(), ClientError> {
        self.call(Method::Patch, "/balloon", b)
    }

    /// `GET /balloon`.
    pub fn get_balloon(&mut self) -> Result<Balloon, ClientError> {
        self.get("/balloon")
    }

    /// `GET /balloon/statistics`.
    pub fn get_balloon_stats(&mut self) -> Result<BalloonStats, ClientError> {
        self.get("/balloon/statistics")
    }

    /// `PUT /mmds/config`.
    pub fn put_mmds_config(&mut self, c: &MmdsConfig) -> Result<(), ClientError> {
        self.call(Method::Put, "/mmds/config", c)
    }

    /// `PUT /mmds`.
    pub fn put_mmds(&mut self, data: &MmdsContentsObject) -> Result<(), ClientError> {
        self.call(Method::Put, "/mmds", data)
    }

    /// `PATCH /mmds`.
    pub fn patch_mmds(&mut self, data: &MmdsContentsObject) -> Result<(), ClientError> {
        self.call(Method::Patch, "/mmds", data)
    }

    /// `GET /mmds`.
    pub fn get_mmds(&mut self) -> Result<serde_json::Value, ClientError> {
        self.get("/mmds")
    }

    /// `PUT /actions`.
    pub fn action(&mut self, action_type: ActionType) -> Result<(), ClientError> {
        self.call(Method::Put, "/actions", &InstanceActionInfo { action_type })
    }

    /// `PUT /actions` `InstanceStart`: boots the configured VM.
    pub fn start_instance(&mut self) -> Result<(), ClientError> {
        self.action(ActionType::InstanceStart)
    }

    /// `PUT /actions` `SendCtrlAltDel`: asks the guest to shut down.
    pub fn send_ctrl_alt_del(&mut self) -> Result<(), ClientError> {
        self.action(ActionType::SendCtrlAltDel)
    }

    /// `PUT /actions` `FlushMetrics`.
    pub fn flush_metrics(&mut self) -> Result<(), ClientError> {
        self.action(ActionType::FlushMetrics)
    }

    /// `PATCH /vm` `Paused`.
    pub fn pause(&mut self) -> Result<(), ClientError> {
        self.call(Method::Patch, "/vm", &Vm { state: VmState::Paused })
    }

    /// `PATCH /vm` `Resumed`.
    pub fn resume(&mut self) -> Result<(), ClientError> {
        self.call(Method::Patch, "/vm", &Vm { state: VmState::Resumed })
    }

    /// `GET /vm/config`.
    pub fn get_vm_config(&mut self) -> Result<FullVmConfiguration, ClientError> {
        self.get("/vm/config")
    }

    /// `PUT /snapshot/create`.
    pub fn create_snapshot(&mut self, p: &SnapshotCreateParams) -> Result<(), ClientError> {
        self.call(Method::Put, "/snapshot/create", p)
    }

    /// `PUT /snapshot/load`.
    pub fn load_snapshot(&mut self, p: &SnapshotLoadParams) -> Result<(), ClientError> {
        self.call(Method::Put, "/snapshot/load", p)
    }

    /// `PUT /hotplug/memory`.
    pub fn put_memory_hotplug(&mut self, c: &MemoryHotplugConfig) -> Result<(), ClientError> {
        self.call(Method::Put, "/hotplug/memory", c)
    }

    /// `PATCH /hotplug/memory`.
    pub fn patch_memory_hotplug(&mut self, u: &MemoryHotplugSizeUpdate) -> Result<(), ClientError> {
        self.call(Method::Patch, "/hotplug/memory", u)
    }

    /// `GET /hotplug/memory`.
    pub fn get_memory_hotplug(&mut self) -> Result<MemoryHotplugStatus, ClientError> {
        self.get("/hotplug/memory")
    }

    /// Applies every section of a config file through the API, in Firecracker's order
    /// (everything but `cpu-config` given as a path, which only the VMM can read), without
    /// starting the VM.
    pub fn apply_config(&mut self, cfg: &FullVmConfiguration) -> Result<(), ClientError> {
        if let Some(l) = &cfg.logger {
            self.put_logger(l)?;
        }
        if let Some(m) = &cfg.metrics {
            self.put_metrics(m)?;
        }
        if let Some(m) = &cfg.machine_config {
            self.put_machine_config(m)?;
        }
        if let Some(CpuConfigSource::Inline(c)) = &cfg.cpu_config {
            self.put_cpu_config(c)?;
        }
        if let Some(b) = &cfg.boot_source {
            self.put_boot_source(b)?;
        }
        for d in &cfg.drives {
            self.put_drive(d)?;
        }
        for p in &cfg.pmem {
            self.put_pmem(p)?;
        }
        for n in &cfg.network_interfaces {
            self.put_network_interface(n)?;
        }
        if let Some(v) = &cfg.vsock {
            self.put_vsock(v)?;
        }
        if let Some(b) = &cfg.balloon {
            self.put_balloon(b)?;
        }
        if let Some(m) = &cfg.mmds_config {
            self.put_mmds_config(m)?;
        }
        if let Some(e) = &cfg.entropy {
            self.put_entropy(e)?;
        }
        if let Some(h) = &cfg.memory_hotplug {
            self.put_memory_hotplug(h)?;
        }
        Ok(())
    }
}

fn is_stale_connection(e: &HttpError) -> bool {
    match e {
        HttpError::Closed => true,
        HttpError::Io(io) => matches!(
            io.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
        ),
        _ => false,
    }
}
