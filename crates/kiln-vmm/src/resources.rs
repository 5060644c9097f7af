//! Pre-boot configuration: what the VM will be, validated, before anything touches KVM. Built from
//! Firecracker's configuration model (`kiln-fc-api` types) so a file `firecracker --config-file`
//! accepts means the same VM here.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use kiln_devices::rate_limiter::{self, RateLimiterConfig, TokenBucketConfig};
use kiln_devices::virtio::block::CacheType;
use kiln_fc_api::models::{self, FullVmConfiguration};

use crate::arch::layout::MAX_VIRTIO_DEVICES;

/// Firecracker's default kernel command line, used when `boot_args` is not given.
pub const DEFAULT_BOOT_ARGS: &str =
    "reboot=k panic=1 pci=off nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd swiotlb=noforce";
pub const MAX_VCPUS: u8 = 32;
pub const DEFAULT_VCPUS: u8 = 1;
pub const DEFAULT_MEM_MIB: u64 = 128;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResourcesError {
    #[error("the configuration has no boot-source: add one with at least kernel_image_path")]
    NoBootSource,
    #[error("vcpu_count {0} is out of range: use 1 to {MAX_VCPUS}")]
    VcpuCount(u8),
    #[error("vcpu_count {0} is odd while smt is on: with SMT use 1 or an even number of vCPUs")]
    VcpuCountSmt(u8),
    #[error("mem_size_mib must be at least 1")]
    MemoryZero,
    #[error("mem_size_mib {requested} is more than this host can back ({available} MiB of RAM and swap): lower mem_size_mib")]
    MemoryTooLarge { requested: u64, available: u64 },
    #[error("{what} is not supported by this kiln-vmm yet: remove it from the configuration")]
    Unsupported { what: String },
    #[error("two drives are named '{0}': drive_id must be unique")]
    DuplicateDrive(String),
    #[error("drives '{0}' and '{1}' are both root devices: mark only one is_root_device")]
    TwoRootDevices(String, String),
    #[error("drive '{0}' has no path_on_host: give the backing file (vhost-user 'socket' drives are not supported)")]
    DrivePath(String),
    #[error("drive_id '{0}' is invalid: use 1-64 characters from [A-Za-z0-9_]")]
    DriveId(String),
    #[error("network interface '{id}': guest_mac '{mac}' is invalid: {why}")]
    GuestMac { id: String, mac: String, why: String },
    #[error("two network interfaces are named '{0}': iface_id must be unique")]
    DuplicateIface(String),
    #[error("network interface '{0}' has no host_dev_name: name the host tap device")]
    IfaceTap(String),
    #[error("vsock guest_cid {0} is invalid: use 3 or more (0-2 are reserved)")]
    VsockCid(u32),
    #[error("balloon amount_mib {amount} is larger than the VM's {mem} MiB of memory")]
    BalloonTooLarge { amount: u32, mem: u64 },
    #[error("{0} virtio devices were configured; at most {MAX_VIRTIO_DEVICES} fit")]
    TooManyDevices(usize),
    #[error(
        "mmds-config names no network interface: list the iface_id of at least one configured \
         network interface in network_interfaces"
    )]
    MmdsNoInterfaces,
    #[error(
        "mmds-config names network interface '{0}', which is not configured: PUT \
         /network-interfaces/{0} first (or fix the id)"
    )]
    MmdsUnknownInterface(String),
    #[error(
        "mmds-config ipv4_address {0} is not a usable link-local address: use one in \
         169.254.1.0-169.254.254.255 (the default is 169.254.169.254)"
    )]
    MmdsAddress(Ipv4Addr),
    #[error("{what}: {why}")]
    RateLimiter { what: String, why: String },
}

/// One block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveConfig {
    pub id: String,
    pub path: PathBuf,
    pub read_only: bool,
    pub is_root: bool,
    pub partuuid: Option<String>,
    pub cache: CacheType,
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// One network interface: a virtio-net device on an existing host tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub id: String,
    pub tap: String,
    pub guest_mac: Option<[u8; 6]>,
    pub mtu: Option<u16>,
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// The vsock device (Firecracker's Unix-socket host side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockSpec {
    pub guest_cid: u32,
    pub uds_path: PathBuf,
}

/// The balloon device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonSpec {
    pub amount_mib: u32,
    pub deflate_on_oom: bool,
    pub stats_polling_interval_s: u16,
}

/// MMDS: which interfaces answer at which address, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MmdsSpec {
    pub version: kiln_mmds::MmdsVersion,
    pub ipv4_address: Ipv4Addr,
    /// iface_ids whose guest frames for `ipv4_address` go to MMDS.
    pub network_interfaces: Vec<String>,
    pub imds_compat: bool,
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialOutput {
    #[default]
    Stdout,
    File(PathBuf),
}

/// Everything needed to build a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmResources {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub boot_args: String,
    pub vcpu_count: u8,
    pub smt: bool,
    pub mem_size_mib: u64,
    pub huge_pages_2m: bool,
    /// In attach order, the root device (if any) first so the guest sees it as /dev/vda.
    pub drives: Vec<DriveConfig>,
    pub entropy: bool,
    pub entropy_rate_limiter: Option<RateLimiterConfig>,
    /// Network interfaces, in attach order.
    pub nets: Vec<NetConfig>,
    pub vsock: Option<VsockSpec>,
    pub balloon: Option<BalloonSpec>,
    pub serial: SerialOutput,
    pub mmds: Option<MmdsSpec>,
}

/// A token bucket as the devices take it; `what` names it in errors (e.g. `drive 'x' rate_limiter.ops`).
pub fn token_bucket(what: &str, b: &models::TokenBucket) -> Result<TokenBucketConfig, ResourcesError> {
    let cfg = TokenBucketConfig {
        size: b.size,
        one_time_burst: b.one_time_burst.unwrap_or(0),
        refill_time_ms: b.refill_time,
    };
    rate_limiter::validate_bucket(&cfg)
        .map_err(|e| ResourcesError::RateLimiter { what: what.to_string(), why: e.to_string() })?;
    Ok(cfg)
}

/// A rate limiter as the devices take it (Firecracker's rules: a bucket of size 0 or refill time 0
/// does not limit). `what` names it in errors.
pub fn rate_limiter(
    what: &str,
    r: Option<&models::RateLimiter>,
) -> Result<Option<RateLimiterConfig>, ResourcesError> {
    let Some(r) = r else { return Ok(None) };
    let bandwidth =
        r.bandwidth.as_ref().map(|b| token_bucket(&format!("{what}.bandwidth"), b)).transpose()?;
    let ops = r.ops.as_ref().map(|b| token_bucket(&format!("{what}.ops"), b)).transpose()?;
    Ok(Some(RateLimiterConfig { bandwidth, ops }).filter(RateLimiterConfig::is_enabled))
}

/// Firecracker's `PATCH` of a rate limiter: each bucket given replaces the old one; buckets that
/// limit nothing (size or refill time 0) are dropped, and so is a limiter left with no bucket.
pub fn patch_rate_limiter(
    old: Option<models::RateLimiter>,
    patch: Option<models::RateLimiter>,
) -> Option<models::RateLimiter> {
    let mut r = old.unwrap_or_default();
    if let Some(p) = patch {
        if p.bandwidth.is_some() {
            r.bandwidth = p.bandwidth;
        }
        if p.ops.is_some() {
            r.ops = p.ops;
        }
    }
    let limits = |b: &models::TokenBucket| b.size > 0 && b.refill_time > 0;
    r.bandwidth = r.bandwidth.filter(limits);
    r.ops = r.ops.filter(limits);
    (r.bandwidth.is_some() || r.ops.is_some()).then_some(r)
}

fn unsupported(what: &str) -> ResourcesError {
    ResourcesError::Unsupported { what: what.to_string() }
}

fn valid_drive_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Checks a machine configuration (also applied at `PUT`/`PATCH /machine-config`).
pub fn validate_machine_config(
    m: &models::MachineConfiguration,
    host_memory_mib: Option<u64>,
) -> Result<(), ResourcesError> {
    if m.cpu_template.as_ref().is_some_and(|t| *t != models::CpuTemplate::None) {
        return Err(unsupported("machine-config.cpu_template"));
    }
    if m.vcpu_count == 0 || m.vcpu_count > MAX_VCPUS {
        return Err(ResourcesError::VcpuCount(m.vcpu_count));
    }
    if m.smt && m.vcpu_count > 1 && m.vcpu_count % 2 == 1 {
        return Err(ResourcesError::VcpuCountSmt(m.vcpu_count));
    }
    if m.mem_size_mib == 0 {
        return Err(ResourcesError::MemoryZero);
    }
    if let Some(available) = host_memory_mib {
        if m.mem_size_mib > available {
            return Err(ResourcesError::MemoryTooLarge { requested: m.mem_size_mib, available });
        }
    }
    Ok(())
}

/// Checks one drive's own fields (also applied at `PUT /drives/{id}`); cross-drive rules (unique
/// ids, one root) are checked over the whole set.
pub fn validate_drive(d: &models::Drive) -> Result<(), ResourcesError> {
    if !valid_drive_id(&d.drive_id) {
        return Err(ResourcesError::DriveId(d.drive_id.clone()));
    }
    if d.socket.is_some() {
        return Err(unsupported("vhost-user block drives ('socket')"));
    }
    rate_limiter(&format!("drive '{}' rate_limiter", d.drive_id), d.rate_limiter.as_ref())?;
    if d.path_on_host.is_none() {
        return Err(ResourcesError::DrivePath(d.drive_id.clone()));
    }
    Ok(())
}

/// Checks one network interface (also applied at `PUT /network-interfaces/{id}`).
pub fn validate_net(n: &models::NetworkInterface) -> Result<NetConfig, ResourcesError> {
    if !valid_drive_id(&n.iface_id) {
        return Err(ResourcesError::DriveId(n.iface_id.clone()));
    }
    if n.host_dev_name.is_empty() {
        return Err(ResourcesError::IfaceTap(n.iface_id.clone()));
    }
    let what = |dir| format!("network interface '{}' {dir}_rate_limiter", n.iface_id);
    let rx_rate_limiter = rate_limiter(&what("rx"), n.rx_rate_limiter.as_ref())?;
    let tx_rate_limiter = rate_limiter(&what("tx"), n.tx_rate_limiter.as_ref())?;
    let guest_mac =
        match &n.guest_mac {
            Some(m) => Some(kiln_devices::virtio::net::parse_mac(m).map_err(|e| {
                ResourcesError::GuestMac { id: n.iface_id.clone(), mac: m.clone(), why: e.to_string() }
            })?),
            None => None,
        };
    Ok(NetConfig {
        id: n.iface_id.clone(),
        tap: n.host_dev_name.clone(),
        guest_mac,
        mtu: n.mtu,
        rx_rate_limiter,
        tx_rate_limiter,
    })
}

/// Checks an MMDS configuration (also applied at `PUT /mmds/config`) against the network
/// interfaces configured so far; fills in the default address.
pub fn validate_mmds_config(
    c: &models::MmdsConfig,
    interfaces: &[models::NetworkInterface],
) -> Result<MmdsSpec, ResourcesError> {
    if c.network_interfaces.is_empty() {
        return Err(ResourcesError::MmdsNoInterfaces);
    }
    if let Some(missing) =
        c.network_interfaces.iter().find(|id| !interfaces.iter().any(|n| &n.iface_id == *id))
    {
        return Err(ResourcesError::MmdsUnknownInterface(missing.clone()));
    }
    let ip = c.ipv4_address.unwrap_or(models::MmdsConfig::DEFAULT_IPV4_ADDRESS);
    // The swagger's pattern: 169.254.([1-9]|...|25[0-4]).(0-255).
    let [a, b, third, _] = ip.octets();
    if (a, b) != (169, 254) || third == 0 || third == 255 {
        return Err(ResourcesError::MmdsAddress(ip));
    }
    Ok(MmdsSpec {
        version: match c.version {
            models::MmdsVersion::V1 => kiln_mmds::MmdsVersion::V1,
            models::MmdsVersion::V2 => kiln_mmds::MmdsVersion::V2,
        },
        ipv4_address: ip,
        network_interfaces: c.network_interfaces.clone(),
        imds_compat: c.imds_compat,
    })
}

/// Checks the vsock device (also applied at `PUT /vsock`).
pub fn validate_vsock(v: &models::Vsock) -> Result<VsockSpec, ResourcesError> {
    if v.guest_cid < 3 || v.guest_cid == u32::MAX {
        return Err(ResourcesError::VsockCid(v.guest_cid));
    }
    Ok(VsockSpec { guest_cid: v.guest_cid, uds_path: v.uds_path.clone() })
}

/// Checks the balloon device (also applied at `PUT /balloon`) against the VM's memory.
pub fn validate_balloon(b: &models::Balloon, mem_mib: u64) -> Result<BalloonSpec, ResourcesError> {
    if b.free_page_hinting {
        return Err(unsupported("balloon free_page_hinting"));
    }
    if b.free_page_reporting {
        return Err(unsupported("balloon free_page_reporting"));
    }
    if u64::from(b.amount_mib) > mem_mib {
        return Err(ResourcesError::BalloonTooLarge { amount: b.amount_mib, mem: mem_mib });
    }
    Ok(BalloonSpec {
        amount_mib: b.amount_mib,
        deflate_on_oom: b.deflate_on_oom,
        stats_polling_interval_s: b.stats_polling_interval_s,
    })
}

/// Checks the entropy device (also applied at `PUT /entropy`).
pub fn validate_entropy(e: &models::EntropyDevice) -> Result<Option<RateLimiterConfig>, ResourcesError> {
    rate_limiter("entropy rate_limiter", e.rate_limiter.as_ref())
}

impl VmResources {
    /// Validates a Firecracker configuration. `host_memory_mib` is RAM + swap, when known.
    pub fn from_config(
        cfg: &FullVmConfiguration,
        host_memory_mib: Option<u64>,
    ) -> Result<Self, ResourcesError> {
        let boot = cfg.boot_source.as_ref().ok_or(ResourcesError::NoBootSource)?;

        let (vcpu_count, mem_size_mib, smt, huge_pages_2m) = match &cfg.machine_config {
            Some(m) => {
                validate_machine_config(m, host_memory_mib)?;
                if m.track_dirty_pages {
                    tracing::warn!(
                        "track_dirty_pages is accepted but has no effect until snapshots are supported"
                    );
                }
                (m.vcpu_count, m.mem_size_mib, m.smt, m.huge_pages == models::HugePages::Hugetlbfs2M)
            }
            None => (DEFAULT_VCPUS, DEFAULT_MEM_MIB, false, false),
        };

        for (present, what) in [
            (!cfg.pmem.is_empty(), "pmem"),
            (cfg.memory_hotplug.is_some(), "memory-hotplug"),
            (cfg.cpu_config.is_some(), "cpu-config"),
        ] {
            if present {
                return Err(unsupported(what));
            }
        }

        let mut drives = Vec::new();
        let mut seen = HashSet::new();
        let mut root: Option<String> = None;
        for d in &cfg.drives {
            validate_drive(d)?;
            if !seen.insert(d.drive_id.clone()) {
                return Err(ResourcesError::DuplicateDrive(d.drive_id.clone()));
            }
            let path = d.path_on_host.clone().ok_or_else(|| ResourcesError::DrivePath(d.drive_id.clone()))?;
            if d.is_root_device {
                if let Some(r) = &root {
                    return Err(ResourcesError::TwoRootDevices(r.clone(), d.drive_id.clone()));
                }
                root = Some(d.drive_id.clone());
            }
            if d.io_engine == models::IoEngine::Async {
                tracing::info!(drive = %d.drive_id, "io_engine Async is served by the synchronous engine");
            }
            let limit =
                rate_limiter(&format!("drive '{}' rate_limiter", d.drive_id), d.rate_limiter.as_ref())?;
            drives.push(DriveConfig {
                id: d.drive_id.clone(),
                path,
                read_only: d.is_read_only.unwrap_or(false),
                is_root: d.is_root_device,
                partuuid: d.partuuid.clone(),
                cache: match d.cache_type {
                    models::CacheType::Unsafe => CacheType::Unsafe,
                    models::CacheType::Writeback => CacheType::Writeback,
                },
                rate_limiter: limit,
            });
        }
        // The root device is attached first, so the guest names it /dev/vda.
        drives.sort_by_key(|d| !d.is_root);

        let (entropy, entropy_rate_limiter) = match &cfg.entropy {
            Some(e) => (true, validate_entropy(e)?),
            None => (false, None),
        };
        let mut nets = Vec::new();
        for n in &cfg.network_interfaces {
            let net = validate_net(n)?;
            if nets.iter().any(|x: &NetConfig| x.id == net.id) {
                return Err(ResourcesError::DuplicateIface(net.id));
            }
            nets.push(net);
        }
        let mmds =
            cfg.mmds_config.as_ref().map(|m| validate_mmds_config(m, &cfg.network_interfaces)).transpose()?;
        let vsock = cfg.vsock.as_ref().map(validate_vsock).transpose()?;
        let balloon = cfg.balloon.as_ref().map(|b| validate_balloon(b, mem_size_mib)).transpose()?;
        let devices = drives.len()
            + nets.len()
            + usize::from(entropy)
            + usize::from(vsock.is_some())
            + usize::from(balloon.is_some());
        if devices > MAX_VIRTIO_DEVICES {
            return Err(ResourcesError::TooManyDevices(devices));
        }

        Ok(Self {
            kernel: boot.kernel_image_path.clone(),
            initrd: boot.initrd_path.clone(),
            boot_args: boot.boot_args.clone().unwrap_or_else(|| DEFAULT_BOOT_ARGS.to_string()),
            vcpu_count,
            smt,
            mem_size_mib,
            huge_pages_2m,
            drives,
            entropy,
            entropy_rate_limiter,
            nets,
            vsock,
            balloon,
            serial: SerialOutput::Stdout,
            mmds,
        })
    }

    /// The kernel command line the guest gets: the configured one, then the root device and the
    /// virtio-mmio devices (`virtio_mmio.device=<size>@<addr>:<irq>`), in attach order.
    pub fn kernel_cmdline(&self, devices: &[(u64, u64, u32)]) -> String {
        let mut c = self.boot_args.trim().to_string();
        // Anything after " -- " belongs to init; kernel parameters must go before it.
        let (kernel_part, init_part) = match c.find(" -- ") {
            Some(i) => (c[..i].to_string(), Some(c[i..].to_string())),
            None if c.starts_with("-- ") => (String::new(), Some(format!(" {c}"))),
            None => (c.clone(), None),
        };
        c = kernel_part;
        if let Some(root) = self.drives.iter().find(|d| d.is_root) {
            let dev = match &root.partuuid {
                Some(u) => format!("root=PARTUUID={u}"),
                None => "root=/dev/vda".to_string(),
            };
            c.push_str(&format!(" {dev} {}", if root.read_only { "ro" } else { "rw" }));
        }
        for (addr, size, irq) in devices {
            c.push_str(&format!(" virtio_mmio.device={}K@{addr:#x}:{irq}", size / 1024));
        }
        if let Some(init) = init_part {
            c.push_str(&init);
        }
        c.trim().to_string()
    }
}

/// RAM + swap of this host in MiB, from /proc/meminfo.
pub fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("MemTotal:")? + field("SwapTotal:").unwrap_or(0)) / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_fc_api::models::parse_config_file;

    fn cfg(json: &str) -> FullVmConfiguration {
        parse_config_file(json).unwrap()
    }

    const BASE: &str = r#""boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0"}"#;

    #[test]
    fn defaults_follow_firecracker() {
        let r =
            VmResources::from_config(&cfg(r#"{"boot-source": {"kernel_image_path": "/k"}}"#), None).unwrap();
        assert_eq!((r.vcpu_count, r.mem_size_mib, r.boot_args.as_str()), (1, 128, DEFAULT_BOOT_ARGS));
    }

    #[test]
    fn vcpu_and_memory_limits() {
        for (n, ok) in [(0, false), (1, true), (32, true), (33, false)] {
            let j = format!(r#"{{{BASE}, "machine-config": {{"vcpu_count": {n}, "mem_size_mib": 256}}}}"#);
            assert_eq!(VmResources::from_config(&cfg(&j), None).is_ok(), ok, "vcpu_count {n}");
        }
        let j =
            format!(r#"{{{BASE}, "machine-config": {{"vcpu_count": 3, "mem_size_mib": 256, "smt": true}}}}"#);
        assert_eq!(VmResources::from_config(&cfg(&j), None), Err(ResourcesError::VcpuCountSmt(3)));
        let j = format!(r#"{{{BASE}, "machine-config": {{"vcpu_count": 1, "mem_size_mib": 4096}}}}"#);
        assert_eq!(
            VmResources::from_config(&cfg(&j), Some(1024)),
            Err(ResourcesError::MemoryTooLarge { requested: 4096, available: 1024 })
        );
        let j = format!(r#"{{{BASE}, "machine-config": {{"vcpu_count": 1, "mem_size_mib": 0}}}}"#);
        assert_eq!(VmResources::from_config(&cfg(&j), None), Err(ResourcesError::MemoryZero));
    }

    #[test]
    fn drives_validated_and_root_first() {
        let j = format!(
            r#"{{{BASE}, "drives": [
              {{"drive_id": "data", "path_on_host": "/d", "is_root_device": false, "is_read_only": true}},
              {{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true, "is_read_only": false}}]}}"#
        );
        let r = VmResources::from_config(&cfg(&j), None).unwrap();
        assert_eq!(r.drives[0].id, "rootfs");
        assert!(r.drives[1].read_only);
        let cmd = r.kernel_cmdline(&[(0xd000_0000, 0x1000, 5), (0xd000_1000, 0x1000, 6)]);
        assert_eq!(
            cmd,
            "console=ttyS0 root=/dev/vda rw virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );

        let dup = format!(
            r#"{{{BASE}, "drives": [{{"drive_id": "a", "path_on_host": "/a", "is_root_device": false}},
            {{"drive_id": "a", "path_on_host": "/b", "is_root_device": false}}]}}"#
        );
        assert_eq!(
            VmResources::from_config(&cfg(&dup), None),
            Err(ResourcesError::DuplicateDrive("a".into()))
        );
        let two_roots = format!(
            r#"{{{BASE}, "drives": [{{"drive_id": "a", "path_on_host": "/a", "is_root_device": true}},
            {{"drive_id": "b", "path_on_host": "/b", "is_root_device": true}}]}}"#
        );
        assert!(matches!(
            VmResources::from_config(&cfg(&two_roots), None),
            Err(ResourcesError::TwoRootDevices(..))
        ));
        let no_path = format!(r#"{{{BASE}, "drives": [{{"drive_id": "a", "is_root_device": false}}]}}"#);
        assert_eq!(
            VmResources::from_config(&cfg(&no_path), None),
            Err(ResourcesError::DrivePath("a".into()))
        );
    }

    #[test]
    fn rate_limiters_follow_firecrackers_rules() {
        let j = format!(
            r#"{{{BASE}, "drives": [{{"drive_id": "d", "path_on_host": "/d", "is_root_device": false,
                 "rate_limiter": {{"bandwidth": {{"size": 1000, "one_time_burst": 50, "refill_time": 10}},
                                   "ops": {{"size": 0, "refill_time": 10}}}}}}],
               "network-interfaces": [{{"iface_id": "eth0", "host_dev_name": "tap0",
                 "tx_rate_limiter": {{"ops": {{"size": 5, "refill_time": 1}}}}}}],
               "entropy": {{"rate_limiter": {{"bandwidth": {{"size": 0, "refill_time": 0}}}}}}}}"#
        );
        let r = VmResources::from_config(&cfg(&j), None).unwrap();
        let bw = r.drives[0].rate_limiter.and_then(|l| l.bandwidth).unwrap();
        assert_eq!((bw.size, bw.one_time_burst, bw.refill_time_ms), (1000, 50, 10));
        assert_eq!(r.nets[0].tx_rate_limiter.and_then(|l| l.ops).map(|b| b.size), Some(5));
        assert_eq!(r.nets[0].rx_rate_limiter, None);
        assert_eq!(r.entropy_rate_limiter, None, "a zero-sized bucket limits nothing");
        let j = format!(
            r#"{{{BASE}, "entropy": {{"rate_limiter": {{"ops": {{"size": 1, "refill_time": 18446744073709552}}}}}}}}"#
        );
        let e = VmResources::from_config(&cfg(&j), None).unwrap_err();
        assert!(e.to_string().starts_with("entropy rate_limiter.ops: refill_time"), "{e}");
    }

    #[test]
    fn patching_a_rate_limiter_replaces_the_buckets_given() {
        let tb = |size| models::TokenBucket { size, one_time_burst: None, refill_time: 100 };
        let rl = |bandwidth, ops| models::RateLimiter { bandwidth, ops };
        let old = Some(rl(Some(tb(1)), None));
        assert_eq!(patch_rate_limiter(old, Some(rl(None, Some(tb(2))))), Some(rl(Some(tb(1)), Some(tb(2)))));
        assert_eq!(patch_rate_limiter(old, None), old);
        assert_eq!(patch_rate_limiter(old, Some(rl(Some(tb(0)), None))), None, "disabled bucket dropped");
        assert_eq!(patch_rate_limiter(None, Some(rl(None, Some(tb(3))))), Some(rl(None, Some(tb(3)))));
    }

    #[test]
    fn init_arguments_stay_last() {
        let j = r#"{"boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0 -- echo hi"},
                   "drives": [{"drive_id": "r", "path_on_host": "/r", "is_root_device": true, "is_read_only": true,
                               "partuuid": "abcd-01"}]}"#;
        let r = VmResources::from_config(&cfg(j), None).unwrap();
        assert_eq!(
            r.kernel_cmdline(&[(0xd000_0000, 0x1000, 5)]),
            "console=ttyS0 root=PARTUUID=abcd-01 ro virtio_mmio.device=4K@0xd0000000:5 -- echo hi"
        );
    }

    #[test]
    fn mmds_config_is_checked_against_the_interfaces() {
        const NET: &str = r#""network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}]"#;
        let j = format!(r#"{{{BASE}, {NET}, "mmds-config": {{"network_interfaces": ["eth0"]}}}}"#);
        let m = VmResources::from_config(&cfg(&j), None).unwrap().mmds.unwrap();
        assert_eq!(m.ipv4_address, Ipv4Addr::new(169, 254, 169, 254));
        assert_eq!((m.version, m.imds_compat), (kiln_mmds::MmdsVersion::V1, false));
        let j = format!(
            r#"{{{BASE}, {NET}, "mmds-config": {{"network_interfaces": ["eth0"], "version": "V2",
                 "ipv4_address": "169.254.170.2", "imds_compat": true}}}}"#
        );
        let m = VmResources::from_config(&cfg(&j), None).unwrap().mmds.unwrap();
        assert_eq!((m.version, m.imds_compat), (kiln_mmds::MmdsVersion::V2, true));
        assert_eq!(m.ipv4_address, Ipv4Addr::new(169, 254, 170, 2));
        for (mmds, err) in [
            (r#"{"network_interfaces": []}"#, ResourcesError::MmdsNoInterfaces),
            (r#"{"network_interfaces": ["eth1"]}"#, ResourcesError::MmdsUnknownInterface("eth1".into())),
            (
                r#"{"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"}"#,
                ResourcesError::MmdsAddress(Ipv4Addr::new(10, 0, 0, 1)),
            ),
            (
                r#"{"network_interfaces": ["eth0"], "ipv4_address": "169.254.0.7"}"#,
                ResourcesError::MmdsAddress(Ipv4Addr::new(169, 254, 0, 7)),
            ),
            (
                r#"{"network_interfaces": ["eth0"], "ipv4_address": "169.254.255.1"}"#,
                ResourcesError::MmdsAddress(Ipv4Addr::new(169, 254, 255, 1)),
            ),
        ] {
            let j = format!(r#"{{{BASE}, {NET}, "mmds-config": {mmds}}}"#);
            let e = VmResources::from_config(&cfg(&j), None).unwrap_err();
            assert_eq!(e, err, "{mmds}");
        }
        // Without any interface configured.
        let j = format!(r#"{{{BASE}, "mmds-config": {{"network_interfaces": ["eth0"]}}}}"#);
        assert!(VmResources::from_config(&cfg(&j), None)
            .unwrap_err()
            .to_string()
            .contains("PUT /network-interfaces/eth0"));
    }

    #[test]
    fn unsupported_sections_are_named() {
        let j = format!(r#"{{{BASE}, "pmem": [{{"id": "p", "path_on_host": "/p"}}]}}"#);
        assert_eq!(
            VmResources::from_config(&cfg(&j), None),
            Err(ResourcesError::Unsupported { what: "pmem".into() })
        );
        let j = format!(
            r#"{{{BASE}, "network-interfaces": [{{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02"}}],
               "vsock": {{"guest_cid": 3, "uds_path": "/tmp/v.sock"}},
               "balloon": {{"amount_mib": 16, "deflate_on_oom": true}}}}"#
        );
        let r = VmResources::from_config(&cfg(&j), None).unwrap();
        assert_eq!(r.nets[0].guest_mac, Some([6, 0, 0xac, 0x10, 0, 2]));
        assert_eq!(r.vsock.as_ref().map(|v| v.guest_cid), Some(3));
        assert_eq!(r.balloon.map(|b| b.amount_mib), Some(16));
        let j = format!(r#"{{{BASE}, "balloon": {{"amount_mib": 4096, "deflate_on_oom": true}}}}"#);
        assert!(matches!(
            VmResources::from_config(&cfg(&j), None),
            Err(ResourcesError::BalloonTooLarge { .. })
        ));
        let j = format!(r#"{{{BASE}, "vsock": {{"guest_cid": 2, "uds_path": "/tmp/v.sock"}}}}"#);
        assert_eq!(VmResources::from_config(&cfg(&j), None), Err(ResourcesError::VsockCid(2)));
        let j = format!(r#"{{{BASE}, "entropy": {{}}}}"#);
        assert!(VmResources::from_config(&cfg(&j), None).unwrap().entropy);
        // Firecracker's parser already refuses a file without boot-source; a default-constructed
        // configuration (as the API builds before PUT /boot-source) is refused here.
        assert!(parse_config_file("{}").is_err());
        assert_eq!(
            VmResources::from_config(&FullVmConfiguration::default(), None),
            Err(ResourcesError::NoBootSource)
        );
    }
}
