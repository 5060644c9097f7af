//! The VMM's metrics, in Firecracker's format (`docs/metrics.md` there): once a destination is set
//! (`PUT /metrics`, `--metrics-path` or `metrics` in the config file; a file or a named pipe), one
//! JSON object per line is written to it every 60 seconds, on `FlushMetrics`, and when the process
//! ends. Each line starts with `utc_timestamp_ms`; counters report what happened since the
//! previous line, gauges (`*_time_us`, `latencies_us`, `min_us`/`max_us`) their current value.
//!
//! Sections and field names are Firecracker's, so its metrics parsers read these lines:
//! process-wide counters live in [`METRICS`] (API requests, vCPU exits, latencies, logger...),
//! device counters in the devices (`kiln_devices::metrics`), registered here when the VM is built
//! and reported per device (`block_<drive_id>`, `net_<iface_id>`) and summed (`block`, `net`).
//! Fields Firecracker lacks are additions; sections for what kiln-vmm does not do (seccomp,
//! signals) are present and stay zero.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::Duration;

use kiln_devices::bus::lock;
use kiln_devices::metrics::{
    BalloonMetrics, BlockMetrics, Counter, EntropyMetrics, Gauge, I8042Metrics, LatencyAgg, SerialMetrics,
    VsockMetrics,
};
use kiln_devices::virtio::net::NetMetrics;
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use serde_json::{to_value, Value};

/// How often metrics are written without being asked (Firecracker's period).
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(60);
/// How long a flush waits for a full named pipe to drain before giving the line up.
const PIPE_PATIENCE: Duration = Duration::from_secs(1);

/// `api_server`.
#[derive(Debug, Default, Serialize)]
pub struct ApiServerMetrics {
    /// From process start to the API socket serving, in microseconds.
    pub process_startup_time_us: Gauge,
    /// CPU time the process used until then, in microseconds.
    pub process_startup_time_cpu_us: Gauge,
}

/// `get_api_requests`.
#[derive(Debug, Default, Serialize)]
pub struct GetRequestsMetrics {
    pub instance_info_count: Counter,
    pub machine_cfg_count: Counter,
    pub mmds_count: Counter,
    pub vmm_version_count: Counter,
    pub hotplug_memory_count: Counter,
    /// `GET /vm/config` (kiln addition).
    pub vm_config_count: Counter,
    /// `GET /balloon` and `/balloon/statistics` (kiln addition).
    pub balloon_count: Counter,
}

/// `put_api_requests`.
#[derive(Debug, Default, Serialize)]
pub struct PutRequestsMetrics {
    pub actions_count: Counter,
    pub actions_fails: Counter,
    pub boot_source_count: Counter,
    pub boot_source_fails: Counter,
    pub drive_count: Counter,
    pub drive_fails: Counter,
    pub logger_count: Counter,
    pub logger_fails: Counter,
    pub machine_cfg_count: Counter,
    pub machine_cfg_fails: Counter,
    pub cpu_cfg_count: Counter,
    pub cpu_cfg_fails: Counter,
    pub metrics_count: Counter,
    pub metrics_fails: Counter,
    pub network_count: Counter,
    pub network_fails: Counter,
    pub mmds_count: Counter,
    pub mmds_fails: Counter,
    pub vsock_count: Counter,
    pub vsock_fails: Counter,
    pub pmem_count: Counter,
    pub pmem_fails: Counter,
    pub serial_count: Counter,
    pub serial_fails: Counter,
    pub hotplug_memory_count: Counter,
    pub hotplug_memory_fails: Counter,
    /// `PUT /balloon` (kiln addition).
    pub balloon_count: Counter,
    pub balloon_fails: Counter,
    /// `PUT /entropy` (kiln addition).
    pub entropy_count: Counter,
    pub entropy_fails: Counter,
}

/// `patch_api_requests`.
#[derive(Debug, Default, Serialize)]
pub struct PatchRequestsMetrics {
    pub drive_count: Counter,
    pub drive_fails: Counter,
    pub network_count: Counter,
    pub network_fails: Counter,
    pub machine_cfg_count: Counter,
    pub machine_cfg_fails: Counter,
    pub mmds_count: Counter,
    pub mmds_fails: Counter,
    pub hotplug_memory_count: Counter,
    pub hotplug_memory_fails: Counter,
    /// `PATCH /vm` (kiln addition).
    pub vm_count: Counter,
    pub vm_fails: Counter,
    /// `PATCH /balloon` and `/balloon/statistics` (kiln addition).
    pub balloon_count: Counter,
    pub balloon_fails: Counter,
}

/// `deprecated_api`.
#[derive(Debug, Default, Serialize)]
pub struct DeprecatedApiMetrics {
    pub deprecated_http_api_calls: Counter,
}

/// `logger`.
#[derive(Debug, Default, Serialize)]
pub struct LoggerSystemMetrics {
    /// Metrics lines that could not be written.
    pub missed_metrics_count: Counter,
    pub metrics_fails: Counter,
    /// Log lines lost (a full log pipe).
    pub missed_log_count: Counter,
}

/// `mmds` (Firecracker's `MmdsMetrics`; zero unless an MMDS counts into it).
#[derive(Debug, Default, Serialize)]
pub struct MmdsMetrics {
    pub rx_accepted: Counter,
    pub rx_accepted_err: Counter,
    pub rx_accepted_unusual: Counter,
    pub rx_bad_eth: Counter,
    pub rx_invalid_token: Counter,
    pub rx_no_token: Counter,
    pub rx_count: Counter,
    pub tx_bytes: Counter,
    pub tx_count: Counter,
    pub tx_errors: Counter,
    pub tx_frames: Counter,
    pub connections_created: Counter,
    pub connections_destroyed: Counter,
}

/// `latencies_us`: the last duration of each operation, in microseconds.
#[derive(Debug, Default, Serialize)]
pub struct PerformanceMetrics {
    pub full_create_snapshot: Gauge,
    pub diff_create_snapshot: Gauge,
    pub load_snapshot: Gauge,
    /// `PATCH /vm` Paused, as the API saw it.
    pub pause_vm: Gauge,
    pub resume_vm: Gauge,
    pub vmm_full_create_snapshot: Gauge,
    pub vmm_diff_create_snapshot: Gauge,
    pub vmm_load_snapshot: Gauge,
    /// Stopping the vCPUs.
    pub vmm_pause_vm: Gauge,
    pub vmm_resume_vm: Gauge,
}

/// `seccomp` (kiln-vmm installs no filters yet).
#[derive(Debug, Default, Serialize)]
pub struct SeccompMetrics {
    pub num_faults: Gauge,
}

/// `vcpu`: exits of all vCPUs, and the time spent handling them in the VMM.
#[derive(Debug, Default, Serialize)]
pub struct VcpuMetrics {
    pub exit_io_in: Counter,
    pub exit_io_out: Counter,
    pub exit_mmio_read: Counter,
    pub exit_mmio_write: Counter,
    /// vCPUs that failed (KVM errors, emulation failures).
    pub failures: Counter,
    pub kvmclock_ctrl_fails: Counter,
    pub exit_io_in_agg: LatencyAgg,
    pub exit_io_out_agg: LatencyAgg,
    pub exit_mmio_read_agg: LatencyAgg,
    pub exit_mmio_write_agg: LatencyAgg,
}

/// `vmm`.
#[derive(Debug, Default, Serialize)]
pub struct VmmSectionMetrics {
    pub panic_count: Gauge,
}

/// `signals` (kiln-vmm handles none of these yet).
#[derive(Debug, Default, Serialize)]
pub struct SignalMetrics {
    pub sigbus: Gauge,
    pub sigsegv: Gauge,
    pub sigxfsz: Gauge,
    pub sigxcpu: Gauge,
    pub sigpipe: Counter,
    pub sighup: Gauge,
    pub sigill: Gauge,
}

/// `interrupts`.
#[derive(Debug, Default, Serialize)]
pub struct InterruptMetrics {
    pub triggers: Counter,
    pub config_updates: Counter,
}

/// The process-wide counters.
#[derive(Debug, Default)]
pub struct ProcessMetrics {
    pub api_server: ApiServerMetrics,
    pub deprecated_api: DeprecatedApiMetrics,
    pub get_api_requests: GetRequestsMetrics,
    pub latencies_us: PerformanceMetrics,
    pub logger: LoggerSystemMetrics,
    pub mmds: MmdsMetrics,
    pub patch_api_requests: PatchRequestsMetrics,
    pub put_api_requests: PutRequestsMetrics,
    pub seccomp: SeccompMetrics,
    pub vcpu: VcpuMetrics,
    pub vmm: VmmSectionMetrics,
    pub signals: SignalMetrics,
    pub interrupts: InterruptMetrics,
}

/// The process-wide counters, updated from any thread.
pub static METRICS: LazyLock<ProcessMetrics> = LazyLock::new(ProcessMetrics::default);

/// The counters of one device, to report with the process-wide ones.
#[derive(Debug, Clone)]
pub enum DeviceMetrics {
    Block { drive_id: String, metrics: Arc<BlockMetrics> },
    Net { iface_id: String, metrics: Arc<NetMetrics> },
    Vsock(Arc<VsockMetrics>),
    Balloon(Arc<BalloonMetrics>),
    Entropy(Arc<EntropyMetrics>),
    Uart(Arc<SerialMetrics>),
    I8042(Arc<I8042Metrics>),
}

#[derive(Debug, Default)]
struct Devices {
    block: BTreeMap<String, Arc<BlockMetrics>>,
    net: BTreeMap<String, Arc<NetMetrics>>,
    vsock: Option<Arc<VsockMetrics>>,
    balloon: Option<Arc<BalloonMetrics>>,
    entropy: Option<Arc<EntropyMetrics>>,
    uart: Option<Arc<SerialMetrics>>,
    i8042: Option<Arc<I8042Metrics>>,
}

static DEVICES: LazyLock<Mutex<Devices>> = LazyLock::new(Mutex::default);

/// Adds a device's counters to the report (replacing a device of the same kind and id).
pub fn register(dev: DeviceMetrics) {
    let mut d = lock(&DEVICES);
    match dev {
        DeviceMetrics::Block { drive_id, metrics } => {
            d.block.insert(drive_id, metrics);
        }
        DeviceMetrics::Net { iface_id, metrics } => {
            d.net.insert(iface_id, metrics);
        }
        DeviceMetrics::Vsock(m) => d.vsock = Some(m),
        DeviceMetrics::Balloon(m) => d.balloon = Some(m),
        DeviceMetrics::Entropy(m) => d.entropy = Some(m),
        DeviceMetrics::Uart(m) => d.uart = Some(m),
        DeviceMetrics::I8042(m) => d.i8042 = Some(m),
    }
}

/// A JSON object whose keys keep their order (the timestamp first, as Firecracker writes it).
struct Line(Vec<(String, Value)>);

impl Serialize for Line {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// Adds `from` into `into`, field by field: counters and sums add up, `min_us` takes the smallest
/// non-zero value, `max_us` the largest.
fn merge_sum(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, bv) in b {
                match a.get_mut(k) {
                    Some(Value::Number(an)) if bv.is_u64() => {
                        let (x, y) = (an.as_u64().unwrap_or(0), bv.as_u64().unwrap_or(0));
                        let v = match k.as_str() {
                            "min_us" if x == 0 || (y != 0 && y < x) => y,
                            "min_us" => x,
                            "max_us" => x.max(y),
                            _ => x.saturating_add(y),
                        };
                        *an = v.into();
                    }
                    Some(av) => merge_sum(av, bv),
                    None => {
                        a.insert(k.clone(), bv.clone());
                    }
                }
            }
        }
        (into, from) => *into = from.clone(),
    }
}

/// Per-device entries `<prefix>_<id>` followed by their sum `<prefix>` (all zeros without devices).
fn per_device<M: Serialize + Default>(
    entries: &mut Vec<(String, Value)>,
    prefix: &str,
    devices: &BTreeMap<String, Arc<M>>,
) -> serde_json::Result<()> {
    let mut total = serde_json::to_value(M::default())?;
    for (id, m) in devices {
        // Serializing reports (and resets) the device's counters: do it once and sum that.
        let v = serde_json::to_value(&**m)?;
        merge_sum(&mut total, &v);
        entries.push((format!("{prefix}_{id}"), v));
    }
    entries.push((prefix.to_string(), total));
    Ok(())
}

fn single<M: Serialize + Default>(m: &Option<Arc<M>>) -> serde_json::Result<Value> {
    match m {
        Some(m) => serde_json::to_value(&**m),
        None => serde_json::to_value(M::default()),
    }
}

fn utc_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One metrics line (without the newline), in Firecracker's section order. Reports, and so resets,
/// every counter's increase since the previous line.
pub fn render_line() -> serde_json::Result<String> {
    let m = &*METRICS;
    let d = lock(&DEVICES);
    let mut e: Vec<(String, Value)> = vec![
        ("utc_timestamp_ms".into(), Value::from(utc_now_ms())),
        ("api_server".into(), to_value(&m.api_server)?),
        ("balloon".into(), single(&d.balloon)?),
    ];
    per_device(&mut e, "block", &d.block)?;
    e.push(("deprecated_api".into(), to_value(&m.deprecated_api)?));
    e.push(("get_api_requests".into(), to_value(&m.get_api_requests)?));
    e.push(("i8042".into(), single(&d.i8042)?));
    e.push(("uart".into(), single(&d.uart)?));
    e.push(("latencies_us".into(), to_value(&m.latencies_us)?));
    e.push(("logger".into(), to_value(&m.logger)?));
    e.push(("mmds".into(), to_value(&m.mmds)?));
    per_device(&mut e, "net", &d.net)?;
    e.push(("patch_api_requests".into(), to_value(&m.patch_api_requests)?));
    e.push(("put_api_requests".into(), to_value(&m.put_api_requests)?));
    e.push(("seccomp".into(), to_value(&m.seccomp)?));
    e.push(("vcpu".into(), to_value(&m.vcpu)?));
    e.push(("vmm".into(), to_value(&m.vmm)?));
    e.push(("signals".into(), to_value(&m.signals)?));
    e.push(("vsock".into(), single(&d.vsock)?));
    e.push(("entropy".into(), single(&d.entropy)?));
    e.push(("interrupts".into(), to_value(&m.interrupts)?));
    serde_json::to_string(&Line(e))
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("Reinitialization of metrics not allowed: the metrics already go to {0}")]
    AlreadyConfigured(PathBuf),
    #[error("cannot open the metrics destination {path}: {source}; create the file or named pipe (mkfifo) first and check its permissions")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to write metrics to {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to serialize the metrics: {0}")]
    Serialize(#[source] serde_json::Error),
}

/// Where the lines go.
#[derive(Debug)]
pub struct Destination {
    path: PathBuf,
    file: Mutex<File>,
}

impl Destination {
    pub fn open(path: &Path) -> Result<Self, MetricsError> {
        let (file, _fifo) = crate::output::open(path)
            .map_err(|source| MetricsError::Open { path: path.to_owned(), source })?;
        Ok(Self { path: path.to_owned(), file: Mutex::new(file) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renders and writes one line. Rendering and writing happen under one lock, so lines are in
    /// order and each counter increase is in exactly one of them.
    pub fn flush(&self) -> Result<(), MetricsError> {
        let mut file = lock(&self.file);
        let mut line = render_line().map_err(MetricsError::Serialize)?;
        line.push('\n');
        crate::output::write_all_within(&mut file, line.as_bytes(), PIPE_PATIENCE).map_err(|source| {
            METRICS.logger.missed_metrics_count.inc();
            MetricsError::Write { path: self.path.clone(), source }
        })
    }
}

static DESTINATION: OnceLock<Arc<Destination>> = OnceLock::new();

/// Sets the destination (once per process) and starts the periodic flush.
pub fn init(path: &Path) -> Result<(), MetricsError> {
    if let Some(d) = DESTINATION.get() {
        return Err(MetricsError::AlreadyConfigured(d.path.clone()));
    }
    let dest = Arc::new(Destination::open(path)?);
    DESTINATION.set(dest.clone()).map_err(|d| MetricsError::AlreadyConfigured(d.path.clone()))?;
    spawn_periodic(dest, FLUSH_INTERVAL);
    tracing::info!("metrics go to {}", path.display());
    Ok(())
}

/// Writes a line now; `Ok(false)` when no destination is set (as Firecracker, not an error).
pub fn flush() -> Result<bool, MetricsError> {
    match DESTINATION.get() {
        Some(d) => d.flush().map(|()| true),
        None => Ok(false),
    }
}

/// The last line, when the process ends; failures are only logged.
pub fn flush_at_exit() {
    if let Err(e) = flush() {
        tracing::warn!("final metrics flush: {e}");
    }
}

/// Flushes `dest` every `interval` on a thread of its own, for as long as `dest` exists (the
/// process's destination never goes away).
pub fn spawn_periodic(dest: Arc<Destination>, interval: Duration) {
    let dest = Arc::downgrade(&dest);
    let spawned = std::thread::Builder::new().name("kiln_metrics".into()).spawn(move || loop {
        std::thread::sleep(interval);
        let Some(dest) = dest.upgrade() else { return };
        if let Err(e) = dest.flush() {
            METRICS.logger.metrics_fails.inc();
            tracing::warn!("periodic metrics flush: {e}");
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the periodic metrics flush: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines report the process-wide counters: tests that render them take turns.
    static RENDERING: Mutex<()> = Mutex::new(());

    #[test]
    fn a_line_has_firecrackers_sections_in_order_and_reports_increases() {
        let _turn = lock(&RENDERING);
        let blk = Arc::new(BlockMetrics::default());
        register(DeviceMetrics::Block { drive_id: "unit_a".into(), metrics: blk.clone() });
        let blk2 = Arc::new(BlockMetrics::default());
        register(DeviceMetrics::Block { drive_id: "unit_b".into(), metrics: blk2.clone() });
        // Counters already counted by other tests in this process are reported by this first line.
        let _ = render_line().unwrap();
        blk.read_bytes.add(4096);
        blk2.read_bytes.add(512);
        blk.read_agg.record(Duration::from_micros(40));
        blk2.read_agg.record(Duration::from_micros(10));
        let line = render_line().unwrap();
        assert!(line.starts_with("{\"utc_timestamp_ms\":"), "{line}");
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["block_unit_a"]["read_bytes"], 4096);
        assert_eq!(v["block_unit_b"]["read_bytes"], 512);
        assert!(v["block"]["read_bytes"].as_u64().unwrap() >= 4608, "the sum over drives: {}", v["block"]);
        assert_eq!(v["block"]["read_agg"]["min_us"], 10);
        assert_eq!(v["block"]["read_agg"]["max_us"], 40);
        for section in [
            "api_server",
            "balloon",
            "deprecated_api",
            "get_api_requests",
            "i8042",
            "uart",
            "latencies_us",
            "logger",
            "mmds",
            "net",
            "patch_api_requests",
            "put_api_requests",
            "seccomp",
            "vcpu",
            "vmm",
            "signals",
            "vsock",
            "entropy",
            "interrupts",
        ] {
            assert!(v[section].is_object(), "section {section} missing: {line}");
        }
        assert!(v["vcpu"]["exit_io_out_agg"]["sum_us"].is_u64());
        assert!(v["uart"]["write_count"].is_u64());
        let again: Value = serde_json::from_str(&render_line().unwrap()).unwrap();
        assert_eq!(again["block_unit_a"]["read_bytes"], 0, "an increase is reported once");
        assert_eq!(again["block_unit_a"]["read_agg"]["max_us"], 40, "gauges hold");
    }

    #[test]
    fn destination_writes_json_lines_and_the_periodic_flush_runs() {
        let _turn = lock(&RENDERING);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.json");
        let dest = Arc::new(Destination::open(&path).unwrap());
        dest.flush().unwrap();
        spawn_periodic(dest.clone(), Duration::from_millis(30));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let lines = loop {
            let text = std::fs::read_to_string(&path).unwrap();
            let n = text.lines().count();
            if n >= 3 || std::time::Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(lines.lines().count() >= 3, "periodic flushes: {lines}");
        // Dropping the destination ends the periodic flush.
        drop(dest);
        std::thread::sleep(Duration::from_millis(100));
        let n = std::fs::read_to_string(&path).unwrap().lines().count();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), n);
        for l in lines.lines() {
            let v: Value = serde_json::from_str(l).unwrap();
            assert!(v["utc_timestamp_ms"].as_u64().unwrap() > 1_600_000_000_000);
        }
        assert!(matches!(
            Destination::open(&dir.path().join("missing/dir/m.json")),
            Err(MetricsError::Open { .. })
        ));
    }

    #[test]
    fn merge_sums_counters_and_keeps_extremes() {
        let mut a = serde_json::json!({"n": 1, "agg": {"min_us": 0, "max_us": 5, "sum_us": 5}});
        merge_sum(&mut a, &serde_json::json!({"n": 2, "agg": {"min_us": 3, "max_us": 4, "sum_us": 4}}));
        merge_sum(&mut a, &serde_json::json!({"n": 0, "agg": {"min_us": 7, "max_us": 9, "sum_us": 9}}));
        assert_eq!(a, serde_json::json!({"n": 3, "agg": {"min_us": 3, "max_us": 9, "sum_us": 18}}));
    }
}
