//! Firecracker wire types: serde models of every definition in
//! `shared/anchors/firecracker-api.yaml`, plus the config-file parser.
//!
//! Conventions, matching Firecracker:
//! - every object rejects unknown fields (`deny_unknown_fields`);
//! - optional fields are `Option<_>` and omitted from the output when `None`;
//! - fields with a documented default (`cache_type`, `io_engine`, `smt`, ...) are plain values
//!   filled by `#[serde(default)]`, so the VMM never has to re-derive the default.
//!
//! Semantic checks that need VMM state (vCPU count is 1 or even, the balloon fits in memory, a
//! MAC address is well-formed, ...) are not done here: these types only say what is well-typed.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

fn is_false(b: &bool) -> bool {
    !*b
}

// ---------------------------------------------------------------------------------------------
// Rate limiting
// ---------------------------------------------------------------------------------------------

/// A token bucket: `size` tokens refilled every `refill_time` ms, plus an initial burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    /// The total number of tokens this bucket can hold.
    pub size: u64,
    /// The initial size of a token bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// The amount of milliseconds it takes for the bucket to refill.
    pub refill_time: u64,
}

/// An IO rate limiter with independent bytes/s and ops/s limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    /// Token bucket with bytes as tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// Token bucket with operations as tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

// ---------------------------------------------------------------------------------------------
// Boot source, machine, CPU
// ---------------------------------------------------------------------------------------------

/// `PUT /boot-source`, `"boot-source"` in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Host path of the kernel image (ELF vmlinux or bzImage).
    pub kernel_image_path: PathBuf,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// Host path of the initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
}

/// Deprecated static CPU templates (`cpu_template`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum CpuTemplate {
    /// C3.
    C3,
    /// T2.
    T2,
    /// T2S.
    T2S,
    /// T2CL.
    T2CL,
    /// T2A.
    T2A,
    /// V1N1.
    V1N1,
    /// No template (the default).
    #[default]
    None,
}

/// Huge pages backing guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum HugePages {
    /// Normal 4K pages (the default).
    #[default]
    None,
    /// 2 MiB huge pages.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// `GET/PUT/PATCH /machine-config`, `"machine-config"` in the config file.
///
/// For `PATCH` use [`MachineConfigurationUpdate`], where every field is optional.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfiguration {
    /// Number of vCPUs (1..=32, either 1 or even; checked by the VMM).
    pub vcpu_count: u8,
    /// Guest memory size in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading (x86 only). Default false.
    #[serde(default)]
    pub smt: bool,
    /// Deprecated static CPU template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    /// Dirty page tracking (for diff snapshots). Default false.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Huge pages backing guest memory. Default `None`.
    #[serde(default)]
    pub huge_pages: HugePages,
}

/// `PATCH /machine-config` body: the same fields as [`MachineConfiguration`], all optional.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigurationUpdate {
    /// Number of vCPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_count: Option<u8>,
    /// Guest memory size in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_size_mib: Option<u64>,
    /// Simultaneous multithreading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// Deprecated static CPU template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    /// Dirty page tracking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// Huge pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

/// CPUID register named by a [`CpuidRegisterModifier`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuidRegister {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// Modifier for one CPUID register (x86_64).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidRegisterModifier {
    /// Target register.
    pub register: CpuidRegister,
    /// `"0b"` + 32 chars of `0`/`1`/`x`.
    pub bitmap: String,
}

/// Modifier for a CPUID leaf and subleaf (x86_64).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidLeafModifier {
    /// Leaf index as a hex, binary or decimal string.
    pub leaf: String,
    /// Subleaf index as a hex, binary or decimal string.
    pub subleaf: String,
    /// KVM feature flags for this leaf/subleaf.
    pub flags: i32,
    /// Register modifiers.
    pub modifiers: Vec<CpuidRegisterModifier>,
}

/// Modifier for a model specific register (x86_64).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsrModifier {
    /// MSR address as a hex, binary or decimal string.
    pub addr: String,
    /// `"0b"` + 64 chars of `0`/`1`/`x` (underscores allowed).
    pub bitmap: String,
}

/// Modifier for an ARM register (aarch64).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmRegisterModifier {
    /// Register address as a hex, binary or decimal string.
    pub addr: String,
    /// `"0b"` + up to 128 chars of `0`/`1`/`x`.
    pub bitmap: String,
}

/// vCPU feature modifier (aarch64).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuFeatures {
    /// Index in `kvm_vcpu_init.features`.
    pub index: i32,
    /// `"0b"` + 32 chars of `0`/`1`/`x`.
    pub bitmap: String,
}

/// `PUT /cpu-config`: a custom CPU template.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuConfig {
    /// KVM capabilities as numeric strings, `!` prefix to remove.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kvm_capabilities: Vec<String>,
    /// CPUID modifiers (x86_64).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpuid_modifiers: Vec<CpuidLeafModifier>,
    /// MSR modifiers (x86_64).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub msr_modifiers: Vec<MsrModifier>,
    /// Register modifiers (aarch64).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reg_modifiers: Vec<ArmRegisterModifier>,
    /// vCPU feature modifiers (aarch64).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vcpu_features: Vec<VcpuFeatures>,
}

/// `"cpu-config"` in a [`FullVmConfiguration`].
///
/// Firecracker's config file takes a *path* to a JSON CPU template there, while the swagger's
/// `GET /vm/config` describes the template inline; both forms are accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum CpuConfigSource {
    /// Path to a JSON file holding a [`CpuConfig`] (Firecracker's config-file form).
    Path(PathBuf),
    /// The template itself.
    Inline(CpuConfig),
}

impl<'de> Deserialize<'de> for CpuConfigSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(p) => Ok(CpuConfigSource::Path(PathBuf::from(p))),
            v @ serde_json::Value::Object(_) => {
                serde_json::from_value(v).map(CpuConfigSource::Inline).map_err(D::Error::custom)
            }
            _ => Err(D::Error::custom("expected the path of a CPU template file or a CPU template object")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Block, pmem
// ---------------------------------------------------------------------------------------------

/// Block device caching strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum CacheType {
    /// Flush requests from the guest are ignored (the default).
    #[default]
    Unsafe,
    /// Flush requests are honoured (fsync).
    Writeback,
}

/// Block device IO engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum IoEngine {
    /// Synchronous IO (the default).
    #[default]
    Sync,
    /// io_uring based asynchronous IO.
    Async,
}

/// `PUT /drives/{drive_id}`, an entry of `"drives"` in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// Drive id; must equal the `{drive_id}` of the path.
    pub drive_id: String,
    /// Unique id of the boot partition; used only when `is_root_device`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Whether this is the root device.
    pub is_root_device: bool,
    /// Caching strategy. Default `Unsafe`.
    #[serde(default)]
    pub cache_type: CacheType,
    /// Read-only (virtio-block; omit for vhost-user-block).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    /// Host path of the backing file (virtio-block; omit for vhost-user-block).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    /// Rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    /// IO engine. Default `Sync`.
    #[serde(default)]
    pub io_engine: IoEngine,
    /// vhost-user-block backend socket (omit for virtio-block).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

/// `PATCH /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// Drive id; must equal the `{drive_id}` of the path.
    pub drive_id: String,
    /// New host path of the backing file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    /// New rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /pmem/{id}`, an entry of `"pmem"` in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pmem {
    /// Device id; must equal the `{id}` of the path.
    pub id: String,
    /// Host path of the backing file.
    pub path_on_host: PathBuf,
    /// Boot from this device.
    #[serde(default)]
    pub root_device: bool,
    /// Map the backing file read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PATCH /pmem/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialPmem {
    /// Device id; must equal the `{id}` of the path.
    pub id: String,
    /// New rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

// ---------------------------------------------------------------------------------------------
// Network, vsock, entropy, serial, balloon, hotplug
// ---------------------------------------------------------------------------------------------

/// `PUT /network-interfaces/{iface_id}`, an entry of `"network-interfaces"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// Interface id; must equal the `{iface_id}` of the path.
    pub iface_id: String,
    /// Host TAP device name.
    pub host_dev_name: String,
    /// Guest MAC address, `xx:xx:xx:xx:xx:xx` (hex digits; checked when parsed).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "de_mac")]
    pub guest_mac: Option<String>,
    /// MTU advertised to the guest (68..=65535).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Receive rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Transmit rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// Whether `s` is a MAC address written `xx:xx:xx:xx:xx:xx` (hex digits, either case).
pub fn is_valid_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn de_mac<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let mac = Option::<String>::deserialize(d)?;
    match mac {
        Some(m) if !is_valid_mac(&m) => {
            Err(serde::de::Error::custom(format!("invalid MAC address `{m}`, expected xx:xx:xx:xx:xx:xx")))
        }
        other => Ok(other),
    }
}

/// `PATCH /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    /// Interface id; must equal the `{iface_id}` of the path.
    pub iface_id: String,
    /// New receive rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// New transmit rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PUT /vsock`, `"vsock"` in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// Deprecated device id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    /// Guest CID (>= 3).
    pub guest_cid: u32,
    /// Host Unix socket proxying vsock connections.
    pub uds_path: PathBuf,
}

/// `PUT /entropy`, `"entropy"` in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyDevice {
    /// Rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /serial`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialDevice {
    /// File or named pipe receiving the guest's serial output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<PathBuf>,
    /// Output bandwidth limit (bytes); excess output is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<TokenBucket>,
}

/// `GET/PUT /balloon`, `"balloon"` in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    /// Target balloon size in MiB.
    pub amount_mib: u32,
    /// Deflate when the guest is under memory pressure.
    pub deflate_on_oom: bool,
    /// Statistics refresh interval in seconds; 0 (the default) disables statistics.
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Free page hinting. Default false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub free_page_hinting: bool,
    /// Free page reporting. Default false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub free_page_reporting: bool,
}

/// `PATCH /balloon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// Target balloon size in MiB.
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    /// Statistics refresh interval in seconds.
    pub stats_polling_interval_s: u16,
}

/// `GET /balloon/statistics` response.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct BalloonStats {
    pub target_pages: u32,
    pub actual_pages: u32,
    pub target_mib: u32,
    pub actual_mib: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_kill: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alloc_stall: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_scan: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_scan: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_reclaim: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_reclaim: Option<u64>,
}

/// `PATCH /balloon/hinting/start` (optional body).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStartCmd {
    /// Acknowledge automatically when the guest reports done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledge_on_stop: Option<bool>,
}

/// `GET /balloon/hinting/status` response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonHintingStatus {
    /// Last command issued by the host.
    pub host_cmd: u32,
    /// Last command provided by the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_cmd: Option<u32>,
}

/// `PUT /hotplug/memory`, `"memory-hotplug"` in the config file (virtio-mem).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryHotplugConfig {
    /// Total size of the hotpluggable memory in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_size_mib: Option<u64>,
    /// Slot size in MiB (>= 128). Default 128.
    #[serde(default = "MemoryHotplugConfig::default_slot_size_mib")]
    pub slot_size_mib: u64,
    /// Logical block size in MiB (>= 2). Default 2.
    #[serde(default = "MemoryHotplugConfig::default_block_size_mib")]
    pub block_size_mib: u64,
}

impl MemoryHotplugConfig {
    /// Default `slot_size_mib`.
    pub const DEFAULT_SLOT_SIZE_MIB: u64 = 128;
    /// Default `block_size_mib`.
    pub const DEFAULT_BLOCK_SIZE_MIB: u64 = 2;
    fn default_slot_size_mib() -> u64 {
        Self::DEFAULT_SLOT_SIZE_MIB
    }
    fn default_block_size_mib() -> u64 {
        Self::DEFAULT_BLOCK_SIZE_MIB
    }
}

impl Default for MemoryHotplugConfig {
    fn default() -> Self {
        Self {
            total_size_mib: None,
            slot_size_mib: Self::DEFAULT_SLOT_SIZE_MIB,
            block_size_mib: Self::DEFAULT_BLOCK_SIZE_MIB,
        }
    }
}

/// `PATCH /hotplug/memory`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryHotplugSizeUpdate {
    /// New target size in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_size_mib: Option<u64>,
}

/// `GET /hotplug/memory` response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct MemoryHotplugStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_size_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_size_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugged_size_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_size_mib: Option<u64>,
}

// ---------------------------------------------------------------------------------------------
// Logger, metrics, MMDS
// ---------------------------------------------------------------------------------------------

/// Log level; parsed case-insensitively as Firecracker does (`"warn"` is accepted too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogLevel {
    /// Off.
    Off,
    /// Error.
    Error,
    /// Warning.
    Warning,
    /// Info (the default).
    #[default]
    Info,
    /// Debug.
    Debug,
    /// Trace.
    Trace,
}

impl LogLevel {
    /// The spelling used in the swagger.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Off => "Off",
            LogLevel::Error => "Error",
            LogLevel::Warning => "Warning",
            LogLevel::Info => "Info",
            LogLevel::Debug => "Debug",
            LogLevel::Trace => "Trace",
        }
    }
}

impl Serialize for LogLevel {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl LogLevel {
    /// The spellings accepted, as the swagger lists them (any case; `warn` too).
    pub const VARIANTS: &'static [&'static str] = &["Error", "Warning", "Info", "Debug", "Trace", "Off"];
}

impl std::str::FromStr for LogLevel {
    type Err = ();

    /// Case-insensitive, as Firecracker parses `--level` and `PUT /logger`.
    fn from_str(s: &str) -> Result<Self, ()> {
        match s.to_ascii_lowercase().as_str() {
            "off" => Ok(LogLevel::Off),
            "error" => Ok(LogLevel::Error),
            "warning" | "warn" => Ok(LogLevel::Warning),
            "info" => Ok(LogLevel::Info),
            "debug" => Ok(LogLevel::Debug),
            "trace" => Ok(LogLevel::Trace),
            _ => Err(()),
        }
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|()| serde::de::Error::unknown_variant(&s, Self::VARIANTS))
    }
}

/// `PUT /logger`, `"logger"` in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// Named pipe or file for the log output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    /// Level (default Info).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Print the level in each line (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Print file and line of the log's origin (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only log messages from this module path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `PUT /metrics`, `"metrics"` in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Named pipe or file where JSON metrics are flushed.
    pub metrics_path: PathBuf,
}

/// MMDS version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum MmdsVersion {
    /// V1 (the default).
    #[default]
    V1,
    /// V2 (session tokens).
    V2,
}

/// `PUT /mmds/config`, `"mmds-config"` in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    /// MMDS version. Default V1.
    #[serde(default)]
    pub version: MmdsVersion,
    /// Interfaces that forward to MMDS (must exist).
    pub network_interfaces: Vec<String>,
    /// Link-local address of MMDS; default 169.254.169.254.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<Ipv4Addr>,
    /// Answer `text/plain` regardless of `Accept` (EC2 IMDS compatibility). Default false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub imds_compat: bool,
}

impl MmdsConfig {
    /// The address used when `ipv4_address` is absent.
    pub const DEFAULT_IPV4_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
}

/// `GET/PUT/PATCH /mmds` body: any JSON object.
pub type MmdsContentsObject = serde_json::Map<String, serde_json::Value>;

// ---------------------------------------------------------------------------------------------
// Actions, instance, VM state, version, errors
// ---------------------------------------------------------------------------------------------

/// `action_type` of `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Flush metrics to the metrics file.
    FlushMetrics,
    /// Boot the configured microVM.
    InstanceStart,
    /// Press Ctrl+Alt+Del (x86: i8042); the guest shuts down.
    SendCtrlAltDel,
}

/// `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// The action.
    pub action_type: ActionType,
}

/// Instance state reported by `GET /`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum InstanceState {
    /// Configured but not booted.
    #[default]
    #[serde(rename = "Not started")]
    NotStarted,
    /// Running.
    Running,
    /// Paused.
    Paused,
}

/// `GET /` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceInfo {
    /// Application name (`"Firecracker"` for Firecracker).
    pub app_name: String,
    /// Instance id (`--id`).
    pub id: String,
    /// Current state.
    pub state: InstanceState,
    /// VMM version.
    pub vmm_version: String,
}

/// `state` of `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Pause the vCPUs.
    Paused,
    /// Resume the vCPUs.
    Resumed,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// Requested state.
    pub state: VmState,
}

/// `GET /version` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirecrackerVersion {
    /// Build version.
    pub firecracker_version: String,
}

/// The swagger's `Error`: the body of every non-2xx response.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong.
    #[serde(default)]
    pub fault_message: String,
}

impl ApiError {
    /// An error body with this message.
    pub fn new(msg: impl Into<String>) -> Self {
        Self { fault_message: msg.into() }
    }
}

// ---------------------------------------------------------------------------------------------
// Snapshots
// ---------------------------------------------------------------------------------------------

/// Snapshot kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SnapshotType {
    /// Full memory (the default).
    #[default]
    Full,
    /// Only pages dirtied since the last snapshot.
    Diff,
}

/// `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// File receiving guest memory.
    pub mem_file_path: PathBuf,
    /// File receiving the microVM state.
    pub snapshot_path: PathBuf,
    /// Kind; default Full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
}

/// Memory backend kind for snapshot load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    /// A memory file.
    File,
    /// A userfaultfd handler listening on a Unix socket.
    Uffd,
}

/// Memory backend for snapshot load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    /// Kind.
    pub backend_type: MemoryBackendType,
    /// Memory file, or the UFFD handler's socket.
    pub backend_path: PathBuf,
}

/// Replace a network interface's TAP on snapshot load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// Interface to modify.
    pub iface_id: String,
    /// New host TAP device.
    pub host_dev_name: String,
}

/// Replace the vsock device's Unix socket on snapshot load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// New Unix socket path.
    pub uds_path: PathBuf,
}

/// `PUT /snapshot/load`. Exactly one of `mem_file_path` / `mem_backend` must be present; see
/// [`SnapshotLoadParams::validate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// File holding the microVM state.
    pub snapshot_path: PathBuf,
    /// Deprecated: memory file (exclusive with `mem_backend`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<PathBuf>,
    /// Memory backend (exclusive with `mem_file_path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemoryBackend>,
    /// Deprecated alias of `track_dirty_pages`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_diff_snapshots: Option<bool>,
    /// Track dirty pages after load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// Resume the VM once loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_vm: Option<bool>,
    /// TAP overrides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    /// vsock socket override.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    /// Advance kvmclock by the wall-clock time since the snapshot (x86_64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_realtime: Option<bool>,
}

impl SnapshotLoadParams {
    /// The memory backend to use: `mem_backend`, or `mem_file_path` as a `File` backend.
    /// Errors (with Firecracker's wording) unless exactly one of them is present.
    pub fn validate(&self) -> Result<MemoryBackend, String> {
        match (&self.mem_file_path, &self.mem_backend) {
            (Some(path), None) => {
                Ok(MemoryBackend { backend_type: MemoryBackendType::File, backend_path: path.clone() })
            }
            (None, Some(b)) => Ok(b.clone()),
            (Some(_), Some(_)) => {
                Err("too many fields: either `mem_backend` or `mem_file_path` exclusively is required"
                    .to_string())
            }
            (None, None) => {
                Err("missing field: either `mem_backend` or `mem_file_path` is required".to_string())
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Full VM configuration and the config file
// ---------------------------------------------------------------------------------------------

/// `GET /vm/config` response and Firecracker's `--config-file` format.
///
/// Every section is optional in the swagger; [`parse_config_file`] additionally requires
/// `boot-source`, as Firecracker does for a config file.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullVmConfiguration {
    /// Balloon device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<Balloon>,
    /// Block devices, in attach order.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// Kernel, initrd and command line.
    #[serde(rename = "boot-source", default, skip_serializing_if = "Option::is_none")]
    pub boot_source: Option<BootSource>,
    /// Custom CPU template (a path in a config file, inline in `GET /vm/config`).
    #[serde(rename = "cpu-config", default, skip_serializing_if = "Option::is_none")]
    pub cpu_config: Option<CpuConfigSource>,
    /// Logger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    /// vCPUs and memory.
    #[serde(rename = "machine-config", default, skip_serializing_if = "Option::is_none")]
    pub machine_config: Option<MachineConfiguration>,
    /// Metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// virtio-mem hotpluggable memory.
    #[serde(rename = "memory-hotplug", default, skip_serializing_if = "Option::is_none")]
    pub memory_hotplug: Option<MemoryHotplugConfig>,
    /// MMDS.
    #[serde(rename = "mmds-config", default, skip_serializing_if = "Option::is_none")]
    pub mmds_config: Option<MmdsConfig>,
    /// Network interfaces, in attach order.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// virtio-pmem devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pmem: Vec<Pmem>,
    /// vsock device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    /// Entropy device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyDevice>,
}

/// Why a config file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not JSON at all.
    #[error(
        "invalid VM config file at line {line}, column {column}: {message}; the file is not \
         valid JSON, check quotes, commas and brackets near that position"
    )]
    Syntax {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// serde_json's description.
        message: String,
    },
    /// Valid JSON that ended early.
    #[error(
        "invalid VM config file at line {line}, column {column}: {message}; the file ends too \
         early, close every brace and bracket"
    )]
    Eof {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// serde_json's description.
        message: String,
    },
    /// JSON that does not match the config-file format.
    #[error(
        "invalid VM config file at line {line}, column {column}, in `{path}`: {message}; fix \
         the field name or value (the format is Firecracker's config file, `FullVmConfiguration` \
         in firecracker-api.yaml)"
    )]
    Data {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// Where in the document, e.g. `drives[0].cache_type` (`.` for the top level).
        path: String,
        /// serde's description.
        message: String,
    },
    /// No `boot-source` section.
    #[error(
        "invalid VM config file: missing section `boot-source`; add \
         `\"boot-source\": {{\"kernel_image_path\": \"...\"}}`"
    )]
    MissingBootSource,
}

/// serde_json's message without its trailing " at line L column C".
fn strip_position(err: &serde_json::Error) -> String {
    let s = err.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Parses a Firecracker `--config-file` document.
pub fn parse_config_file(text: &str) -> Result<FullVmConfiguration, ConfigError> {
    // serde would also accept a JSON array for a struct (fields by position); Firecracker's
    // format is an object.
    if let Some(c) = text.trim_start().chars().next() {
        if c != '{' {
            let consumed = text.len() - text.trim_start().len();
            let before = &text[..consumed];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            return Err(ConfigError::Data {
                line,
                column,
                path: ".".to_string(),
                message: format!("expected a JSON object, found `{c}`"),
            });
        }
    }
    let de = &mut serde_json::Deserializer::from_str(text);
    let cfg: FullVmConfiguration = match serde_path_to_error::deserialize(&mut *de) {
        Ok(cfg) => cfg,
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let (line, column, message) = (inner.line(), inner.column(), strip_position(&inner));
            return Err(match inner.classify() {
                serde_json::error::Category::Eof => ConfigError::Eof { line, column, message },
                serde_json::error::Category::Data => ConfigError::Data { line, column, path, message },
                serde_json::error::Category::Syntax | serde_json::error::Category::Io => {
                    ConfigError::Syntax { line, column, message }
                }
            });
        }
    };
    // Trailing characters are reported by `end`.
    if let Err(inner) = de.end() {
        return Err(ConfigError::Syntax {
            line: inner.line(),
            column: inner.column(),
            message: strip_position(&inner),
        });
    }
    if cfg.boot_source.is_none() {
        return Err(ConfigError::MissingBootSource);
    }
    Ok(cfg)
}

/// Why [`load_config_file`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadConfigError {
    /// The config file could not be read.
    #[error("cannot read the VM config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The config file's content is invalid.
    #[error("cannot load the VM config file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column.
        #[source]
        source: ConfigError,
    },
    /// The CPU template named by `cpu-config` could not be read.
    #[error("cannot read the CPU template {path} named by `cpu-config`; fix the path")]
    ReadCpuTemplate {
        /// The template file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The CPU template named by `cpu-config` is invalid.
    #[error("invalid CPU template {path} named by `cpu-config`")]
    ParseCpuTemplate {
        /// The template file.
        path: PathBuf,
        /// What is wrong, with line and column.
        #[source]
        source: serde_json::Error,
    },
}

/// Reads and parses a `--config-file`, then reads the CPU template a `cpu-config` path names
/// (relative to the current directory, as Firecracker does) so that the result's `cpu_config`
/// is always [`CpuConfigSource::Inline`].
pub fn load_config_file(path: impl AsRef<std::path::Path>) -> Result<FullVmConfiguration, LoadConfigError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path)
        .map_err(|source| LoadConfigError::Read { path: path.to_path_buf(), source })?;
    let mut cfg = parse_config_file(&text)
        .map_err(|source| LoadConfigError::Parse { path: path.to_path_buf(), source })?;
    if let Some(CpuConfigSource::Path(tpath)) = &cfg.cpu_config {
        let ttext = std::fs::read_to_string(tpath)
            .map_err(|source| LoadConfigError::ReadCpuTemplate { path: tpath.clone(), source })?;
        let tmpl: CpuConfig = serde_json::from_str(&ttext)
            .map_err(|source| LoadConfigError::ParseCpuTemplate { path: tpath.clone(), source })?;
        cfg.cpu_config = Some(CpuConfigSource::Inline(tmpl));
    }
    Ok(cfg)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;

    /// Firecracker's getting-started / tests `vm_config.json`, verbatim in shape.
    const GETTING_STARTED: &str = r#"{
  "boot-source": {
    "kernel_image_path": "vmlinux.bin",
    "boot_args": "console=ttyS0 reboot=k panic=1 pci=off",
    "initrd_path": null
  },
  "drives": [
    {
      "drive_id": "rootfs",
      "partuuid": null,
      "is_root_device": true,
      "cache_type": "Unsafe",
      "is_read_only": false,
      "path_on_host": "ubuntu-22.04.ext4",
      "io_engine": "Sync",
      "rate_limiter": null,
      "socket": null
    }
  ],
  "machine-config": {
    "vcpu_count": 2,
    "mem_size_mib": 1024,
    "smt": false,
    "track_dirty_pages": false,
    "huge_pages": "None"
  },
  "cpu-config": null,
  "balloon": null,
  "network-interfaces": [
    {
      "iface_id": "net1",
      "guest_mac": "06:00:AC:10:00:02",
      "host_dev_name": "tap0"
    }
  ],
  "vsock": null,
  "logger": {
    "log_path": "firecracker.log",
    "level": "Debug",
    "show_level": true,
    "show_log_origin": true
  },
  "metrics": null,
  "mmds-config": null,
  "entropy": null
}"#;

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(v: &T) {
        let s = serde_json::to_string(v).unwrap();
        let back: T = serde_json::from_str(&s).unwrap();
        assert_eq!(&back, v, "round trip through {s}");
    }

    fn tb(size: u64) -> TokenBucket {
        TokenBucket { size, one_time_burst: Some(7), refill_time: 100 }
    }

    fn rl() -> RateLimiter {
        RateLimiter {
            bandwidth: Some(tb(1000)),
            ops: Some(TokenBucket { size: 10, one_time_burst: None, refill_time: 1 }),
        }
    }

    fn full() -> FullVmConfiguration {
        FullVmConfiguration {
            balloon: Some(Balloon {
                amount_mib: 64,
                deflate_on_oom: true,
                stats_polling_interval_s: 1,
                free_page_hinting: true,
                free_page_reporting: false,
            }),
            drives: vec![Drive {
                drive_id: "rootfs".into(),
                partuuid: Some("abcd-01".into()),
                is_root_device: true,
                cache_type: CacheType::Writeback,
                is_read_only: Some(true),
                path_on_host: Some("/r.ext4".into()),
                rate_limiter: Some(rl()),
                io_engine: IoEngine::Async,
                socket: None,
            }],
            boot_source: Some(BootSource {
                kernel_image_path: "/k".into(),
                boot_args: Some("console=ttyS0".into()),
                initrd_path: Some("/i".into()),
            }),
            cpu_config: Some(CpuConfigSource::Inline(CpuConfig {
                kvm_capabilities: vec!["!56".into()],
                cpuid_modifiers: vec![CpuidLeafModifier {
                    leaf: "0x1".into(),
                    subleaf: "0x0".into(),
                    flags: 0,
                    modifiers: vec![CpuidRegisterModifier {
                        register: CpuidRegister::Ecx,
                        bitmap: "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxx0001".into(),
                    }],
                }],
                msr_modifiers: vec![MsrModifier { addr: "0x10a".into(), bitmap: "0b0".into() }],
                reg_modifiers: vec![],
                vcpu_features: vec![],
            })),
            logger: Some(Logger {
                log_path: Some("/l".into()),
                level: Some(LogLevel::Warning),
                show_level: Some(true),
                show_log_origin: Some(false),
                module: Some("api_server".into()),
            }),
            machine_config: Some(MachineConfiguration {
                vcpu_count: 2,
                mem_size_mib: 256,
                smt: true,
                cpu_template: Some(CpuTemplate::T2S),
                track_dirty_pages: true,
                huge_pages: HugePages::Hugetlbfs2M,
            }),
            metrics: Some(Metrics { metrics_path: "/m".into() }),
            memory_hotplug: Some(MemoryHotplugConfig {
                total_size_mib: Some(1024),
                slot_size_mib: 256,
                block_size_mib: 4,
            }),
            mmds_config: Some(MmdsConfig {
                version: MmdsVersion::V2,
                network_interfaces: vec!["eth0".into()],
                ipv4_address: Some(Ipv4Addr::new(169, 254, 1, 2)),
                imds_compat: true,
            }),
            network_interfaces: vec![NetworkInterface {
                iface_id: "eth0".into(),
                host_dev_name: "tap0".into(),
                guest_mac: Some("06:00:AC:10:00:02".into()),
                mtu: Some(1500),
                rx_rate_limiter: Some(rl()),
                tx_rate_limiter: None,
            }],
            pmem: vec![Pmem {
                id: "pm0".into(),
                path_on_host: "/p".into(),
                root_device: false,
                read_only: true,
                rate_limiter: None,
            }],
            vsock: Some(Vsock { vsock_id: None, guest_cid: 3, uds_path: "/v.sock".into() }),
            entropy: Some(EntropyDevice { rate_limiter: Some(rl()) }),
        }
    }

    #[test]
    fn getting_started_example_parses() {
        let cfg = parse_config_file(GETTING_STARTED).unwrap();
        let bs = cfg.boot_source.as_ref().unwrap();
        assert_eq!(bs.kernel_image_path, PathBuf::from("vmlinux.bin"));
        assert_eq!(bs.initrd_path, None);
        assert_eq!(cfg.drives.len(), 1);
        assert_eq!(cfg.drives[0].cache_type, CacheType::Unsafe);
        assert_eq!(cfg.drives[0].io_engine, IoEngine::Sync);
        assert_eq!(cfg.drives[0].is_read_only, Some(false));
        let mc = cfg.machine_config.as_ref().unwrap();
        assert_eq!((mc.vcpu_count, mc.mem_size_mib), (2, 1024));
        assert_eq!(mc.huge_pages, HugePages::None);
        assert_eq!(cfg.network_interfaces[0].host_dev_name, "tap0");
        assert_eq!(cfg.logger.as_ref().unwrap().level, Some(LogLevel::Debug));
        assert!(cfg.balloon.is_none() && cfg.vsock.is_none() && cfg.cpu_config.is_none());
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let cfg = parse_config_file(
            r#"{"boot-source": {"kernel_image_path": "k"},
                "drives": [{"drive_id": "d", "is_root_device": false, "path_on_host": "x"}],
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}}"#,
        )
        .unwrap();
        let d = &cfg.drives[0];
        assert_eq!(d.cache_type, CacheType::Unsafe);
        assert_eq!(d.io_engine, IoEngine::Sync);
        let mc = cfg.machine_config.unwrap();
        assert!(!mc.smt && !mc.track_dirty_pages);
        assert_eq!(mc.cpu_template, None);
        assert_eq!(mc.huge_pages, HugePages::None);
        assert!(cfg.network_interfaces.is_empty());
        let hp: MemoryHotplugConfig = serde_json::from_str(r#"{"total_size_mib": 512}"#).unwrap();
        assert_eq!((hp.slot_size_mib, hp.block_size_mib), (128, 2));
        let mm: MmdsConfig = serde_json::from_str(r#"{"network_interfaces": []}"#).unwrap();
        assert_eq!(mm.version, MmdsVersion::V1);
        assert!(!mm.imds_compat);
        let b: Balloon = serde_json::from_str(r#"{"amount_mib": 1, "deflate_on_oom": false}"#).unwrap();
        assert_eq!(b.stats_polling_interval_s, 0);
    }

    #[test]
    fn cpu_config_path_form() {
        let cfg =
            parse_config_file(r#"{"boot-source": {"kernel_image_path": "k"}, "cpu-config": "/t.json"}"#)
                .unwrap();
        assert_eq!(cfg.cpu_config, Some(CpuConfigSource::Path("/t.json".into())));
    }

    #[test]
    fn full_config_round_trips() {
        let cfg = full();
        round_trip(&cfg);
        let text = serde_json::to_string_pretty(&cfg).unwrap();
        assert_eq!(parse_config_file(&text).unwrap(), cfg);
        // Exact Firecracker key spellings.
        let v = serde_json::to_value(&cfg).unwrap();
        for k in [
            "boot-source",
            "machine-config",
            "network-interfaces",
            "mmds-config",
            "cpu-config",
            "memory-hotplug",
            "drives",
            "vsock",
            "balloon",
            "entropy",
            "logger",
            "metrics",
            "pmem",
        ] {
            assert!(v.get(k).is_some(), "missing key {k}");
        }
        assert_eq!(v["machine-config"]["huge_pages"], "2M");
        assert_eq!(v["logger"]["level"], "Warning");
    }

    #[test]
    fn none_fields_are_omitted() {
        let cfg = FullVmConfiguration {
            boot_source: Some(BootSource {
                kernel_image_path: "k".into(),
                boot_args: None,
                initrd_path: None,
            }),
            ..Default::default()
        };
        let s = serde_json::to_string(&cfg).unwrap();
        assert_eq!(s, r#"{"drives":[],"boot-source":{"kernel_image_path":"k"},"network-interfaces":[]}"#);
    }

    #[test]
    fn every_other_body_round_trips() {
        round_trip(&full().balloon.unwrap());
        round_trip(&BalloonUpdate { amount_mib: 3 });
        round_trip(&BalloonStatsUpdate { stats_polling_interval_s: 5 });
        round_trip(&BalloonStats {
            target_pages: 1,
            actual_pages: 2,
            target_mib: 3,
            actual_mib: 4,
            swap_in: Some(5),
            oom_kill: Some(1),
            ..Default::default()
        });
        round_trip(&BalloonStartCmd { acknowledge_on_stop: Some(true) });
        round_trip(&BalloonHintingStatus { host_cmd: 1, guest_cmd: Some(2) });
        round_trip(&SerialDevice { serial_out_path: Some("/s".into()), rate_limiter: Some(tb(9)) });
        round_trip(&PartialDrive {
            drive_id: "d".into(),
            path_on_host: Some("/x".into()),
            rate_limiter: Some(rl()),
        });
        round_trip(&PartialNetworkInterface {
            iface_id: "n".into(),
            rx_rate_limiter: None,
            tx_rate_limiter: Some(rl()),
        });
        round_trip(&PartialPmem { id: "p".into(), rate_limiter: None });
        round_trip(&MachineConfigurationUpdate { vcpu_count: Some(4), ..Default::default() });
        round_trip(&MemoryHotplugSizeUpdate { requested_size_mib: Some(256) });
        round_trip(&MemoryHotplugStatus { plugged_size_mib: Some(1), ..Default::default() });
        for a in [ActionType::FlushMetrics, ActionType::InstanceStart, ActionType::SendCtrlAltDel] {
            round_trip(&InstanceActionInfo { action_type: a });
        }
        round_trip(&Vm { state: VmState::Paused });
        round_trip(&Vm { state: VmState::Resumed });
        let info = InstanceInfo {
            app_name: "Firecracker".into(),
            id: "anonymous-instance".into(),
            state: InstanceState::NotStarted,
            vmm_version: "1.16.1".into(),
        };
        round_trip(&info);
        assert!(serde_json::to_string(&info).unwrap().contains(r#""state":"Not started""#));
        round_trip(&FirecrackerVersion { firecracker_version: "1.16.1".into() });
        round_trip(&ApiError::new("boom"));
        round_trip(&SnapshotCreateParams {
            mem_file_path: "/m".into(),
            snapshot_path: "/s".into(),
            snapshot_type: Some(SnapshotType::Diff),
        });
        let load = SnapshotLoadParams {
            snapshot_path: "/s".into(),
            mem_file_path: None,
            mem_backend: Some(MemoryBackend {
                backend_type: MemoryBackendType::Uffd,
                backend_path: "/u".into(),
            }),
            enable_diff_snapshots: None,
            track_dirty_pages: Some(true),
            resume_vm: Some(true),
            network_overrides: vec![NetworkOverride {
                iface_id: "eth0".into(),
                host_dev_name: "tap1".into(),
            }],
            vsock_override: Some(VsockOverride { uds_path: "/v".into() }),
            clock_realtime: Some(false),
        };
        round_trip(&load);
        assert!(load.validate().is_ok());
        let mut both = load.clone();
        both.mem_file_path = Some("/m".into());
        assert!(both.validate().is_err());
        both.mem_backend = None;
        assert_eq!(both.validate().unwrap().backend_type, MemoryBackendType::File);
        both.mem_file_path = None;
        assert!(both.validate().is_err());
        let mmds: MmdsContentsObject =
            serde_json::from_str(r#"{"latest": {"meta-data": {"ami-id": "x"}}}"#).unwrap();
        round_trip(&mmds);
    }

    #[test]
    fn log_level_is_case_insensitive() {
        for (s, l) in [
            ("\"info\"", LogLevel::Info),
            ("\"WARN\"", LogLevel::Warning),
            ("\"Warning\"", LogLevel::Warning),
            ("\"off\"", LogLevel::Off),
            ("\"TRACE\"", LogLevel::Trace),
        ] {
            assert_eq!(serde_json::from_str::<LogLevel>(s).unwrap(), l);
        }
        assert!(serde_json::from_str::<LogLevel>("\"loud\"").is_err());
    }

    #[test]
    fn unknown_field_is_rejected_with_position_and_path() {
        let text = "{\n  \"boot-source\": {\"kernel_image_path\": \"k\"},\n  \"drives\": [{\"drive_id\": \"d\", \"is_root_device\": true, \"bogus\": 1}]\n}";
        let err = parse_config_file(text).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Data { line: 3, .. }), "{err:?}");
        assert!(msg.contains("unknown field `bogus`"), "{msg}");
        assert!(msg.contains("drives[0]"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");

        let err =
            parse_config_file(r#"{"boot-source": {"kernel_image_path": "k"}, "serial": {}}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `serial`"), "{err}");
        let err = parse_config_file(r#"{"boot_source": {"kernel_image_path": "k"}}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `boot_source`"), "{err}");
    }

    #[test]
    fn wrong_types_are_rejected() {
        let err = parse_config_file(
            r#"{"boot-source": {"kernel_image_path": "k"},
                "machine-config": {"vcpu_count": "two", "mem_size_mib": 128}}"#,
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("machine-config.vcpu_count"), "{msg}");
        assert!(msg.contains("invalid type: string \"two\""), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");

        let err = parse_config_file(
            r#"{"boot-source": {"kernel_image_path": "k"},
                "machine-config": {"vcpu_count": 300, "mem_size_mib": 128}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("300"), "{err}");

        let err = parse_config_file(
            r#"{"boot-source": {"kernel_image_path": "k"},
                "drives": [{"drive_id": "d", "is_root_device": true, "cache_type": "Fast"}]}"#,
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("unknown variant `Fast`"), "{msg}");
        assert!(msg.contains("drives[0].cache_type"), "{msg}");
    }

    #[test]
    fn missing_required_fields_are_rejected() {
        let err = parse_config_file(r#"{"boot-source": {"boot_args": "x"}}"#).unwrap_err();
        assert!(err.to_string().contains("missing field `kernel_image_path`"), "{err}");
        let err = parse_config_file(r#"{"drives": []}"#).unwrap_err();
        assert!(matches!(err, ConfigError::MissingBootSource));
        assert!(err.to_string().contains("boot-source"));
        let err = parse_config_file(
            r#"{"boot-source": {"kernel_image_path": "k"}, "drives": [{"drive_id": "d"}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("missing field `is_root_device`"), "{err}");
    }

    #[test]
    fn syntax_errors_have_positions() {
        let err =
            parse_config_file("{\n  \"boot-source\": {\"kernel_image_path\": \"k\"}\n  \"drives\": []\n}")
                .unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { line: 3, .. }), "{err:?}");
        assert!(err.to_string().contains("line 3"));
        let err = parse_config_file("{\"boot-source\": {").unwrap_err();
        assert!(matches!(err, ConfigError::Eof { .. }), "{err:?}");
        let err = parse_config_file(r#"{"boot-source": {"kernel_image_path": "k"}} trailing"#).unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err:?}");
        assert!(parse_config_file("").is_err());
    }

    #[test]
    fn guest_mac_is_checked() {
        let ok: NetworkInterface =
            serde_json::from_str(r#"{"iface_id":"e","host_dev_name":"t","guest_mac":"06:00:aC:10:00:02"}"#)
                .unwrap();
        assert_eq!(ok.guest_mac.as_deref(), Some("06:00:aC:10:00:02"));
        for bad in ["06:00:AC:10:00", "06:00:AC:10:00:0g", "0600AC100002", "06:00:AC:10:00:002", ""] {
            let text = format!(r#"{{"iface_id":"e","host_dev_name":"t","guest_mac":"{bad}"}}"#);
            let err = serde_json::from_str::<NetworkInterface>(&text).unwrap_err();
            assert!(err.to_string().contains("invalid MAC address"), "{bad}: {err}");
        }
        let none: NetworkInterface =
            serde_json::from_str(r#"{"iface_id":"e","host_dev_name":"t","guest_mac":null}"#).unwrap();
        assert_eq!(none.guest_mac, None);
    }

    #[test]
    fn top_level_must_be_an_object() {
        let err = parse_config_file("\n  []").unwrap_err();
        assert!(matches!(err, ConfigError::Data { line: 2, column: 3, .. }), "{err:?}");
        assert!(err.to_string().contains("expected a JSON object"), "{err}");
    }

    #[test]
    fn cpu_config_errors_are_specific() {
        let err =
            parse_config_file(r#"{"boot-source": {"kernel_image_path": "k"}, "cpu-config": 5}"#).unwrap_err();
        assert!(err.to_string().contains("path of a CPU template"), "{err}");
        let err = parse_config_file(
            r#"{"boot-source": {"kernel_image_path": "k"}, "cpu-config": {"kvm_caps": []}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `kvm_caps`"), "{err}");
    }

    #[test]
    fn load_config_file_resolves_the_cpu_template() {
        let dir = tempfile::tempdir().unwrap();
        let tmpl = dir.path().join("t.json");
        std::fs::write(&tmpl, r#"{"kvm_capabilities": ["!56"]}"#).unwrap();
        let cfg_path = dir.path().join("vm.json");
        let text = format!(
            r#"{{"boot-source": {{"kernel_image_path": "k"}}, "cpu-config": {:?}}}"#,
            tmpl.to_str().unwrap()
        );
        std::fs::write(&cfg_path, text).unwrap();
        let cfg = load_config_file(&cfg_path).unwrap();
        match cfg.cpu_config {
            Some(CpuConfigSource::Inline(c)) => assert_eq!(c.kvm_capabilities, ["!56"]),
            other => panic!("{other:?}"),
        }
        std::fs::write(&tmpl, "{").unwrap();
        assert!(matches!(load_config_file(&cfg_path), Err(LoadConfigError::ParseCpuTemplate { .. })));
        std::fs::remove_file(&tmpl).unwrap();
        assert!(matches!(load_config_file(&cfg_path), Err(LoadConfigError::ReadCpuTemplate { .. })));
        assert!(matches!(
            load_config_file(dir.path().join("missing.json")),
            Err(LoadConfigError::Read { .. })
        ));
        std::fs::write(&cfg_path, "{}").unwrap();
        let err = load_config_file(&cfg_path).unwrap_err();
        assert!(matches!(err, LoadConfigError::Parse { .. }));
        assert!(err.to_string().contains("vm.json"), "{err}");
    }

    #[test]
    fn requests_reject_unknown_fields() {
        assert!(serde_json::from_str::<BootSource>(r#"{"kernel_image_path":"k","x":1}"#).is_err());
        assert!(serde_json::from_str::<InstanceActionInfo>(r#"{"action_type":"Reboot"}"#).is_err());
        assert!(serde_json::from_str::<Vm>(r#"{"state":"Running"}"#).is_err());
        assert!(serde_json::from_str::<MachineConfigurationUpdate>(r#"{"vcpus":1}"#).is_err());
        assert!(serde_json::from_str::<TokenBucket>(r#"{"size":1}"#).is_err());
    }
}
