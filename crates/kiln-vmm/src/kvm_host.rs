//! What this host's KVM is and can do. Everything the VMM relies on is asked of KVM here, once,
//! instead of assumed: the lab's nested KVM, a PVM host and bare metal each report differently.

use std::path::Path;

use kvm_bindings::{CpuId, KVM_API_VERSION, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

/// The capabilities the VMM cannot work without.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
];

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("{path} does not exist: this host has no KVM. Load kvm_intel or kvm_amd, or run on a host with hardware virtualization")]
    Missing { path: String },
    #[error("permission denied opening {path}: run as root or add your user to the group owning it (usually 'kvm')")]
    PermissionDenied { path: String },
    #[error("cannot open {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("KVM API version {0} is not the supported {KVM_API_VERSION}")]
    ApiVersion(i32),
    #[error("this KVM lacks {0}, which kiln-vmm needs")]
    MissingCapability(&'static str),
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_MSR_INDEX_LIST failed")]
    MsrList(#[source] kvm_ioctls::Error),
}

/// True when `/dev/kvm` is PVM (software KVM): stock Linux guests cannot boot on it.
pub fn host_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// One line explaining why a stock guest cannot run on a PVM host, and what to do instead.
pub const PVM_EXPLANATION: &str = "this host's /dev/kvm is PVM (software KVM, module kvm_pvm), which boots only \
PVM-enabled guest kernels: a stock Linux guest would hang or fail in emulation. Run kiln-vmm on a host with hardware \
virtualization (VT-x/AMD-V), in Kiln's lab (docs/testing.md), or pass --allow-pvm for a PVM-enabled guest kernel";

/// An open `/dev/kvm` and what it supports.
pub struct KvmHost {
    pub kvm: Kvm,
    pub supported_cpuid: CpuId,
    pub msr_index_list: Vec<u32>,
    /// Most vCPUs one VM may have.
    pub max_vcpus: usize,
    /// Guest physical address width in bits (CPUID 0x8000_0008), when reported.
    pub phys_addr_bits: Option<u8>,
    /// Features offered through capabilities rather than the supported CPUID.
    pub cap_features: crate::arch::cpuid::CapabilityFeatures,
}

impl std::fmt::Debug for KvmHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmHost")
            .field("max_vcpus", &self.max_vcpus)
            .field("phys_addr_bits", &self.phys_addr_bits)
            .field("msrs", &self.msr_index_list.len())
            .finish()
    }
}

impl KvmHost {
    /// Opens `/dev/kvm` (or `KILN_KVM_DEVICE`, for tests) and reads its capabilities.
    pub fn open() -> Result<Self, KvmError> {
        let path = std::env::var("KILN_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".to_string());
        Self::open_path(&path)
    }

    pub fn open_path(path: &str) -> Result<Self, KvmError> {
        let cpath = std::ffi::CString::new(path).map_err(|_| KvmError::Missing { path: path.to_string() })?;
        let kvm = Kvm::new_with_path(&cpath).map_err(|e| match e.errno() {
            libc::ENOENT | libc::ENXIO | libc::ENODEV => KvmError::Missing { path: path.to_string() },
            libc::EACCES | libc::EPERM => KvmError::PermissionDenied { path: path.to_string() },
            _ => KvmError::Open {
                path: path.to_string(),
                source: std::io::Error::from_raw_os_error(e.errno()),
            },
        })?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION as i32 {
            return Err(KvmError::ApiVersion(version));
        }
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(*cap) {
                return Err(KvmError::MissingCapability(name));
            }
        }
        let supported_cpuid =
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(KvmError::SupportedCpuid)?;
        let msr_index_list = kvm.get_msr_index_list().map_err(KvmError::MsrList)?.as_slice().to_vec();
        let max_vcpus = kvm.get_max_vcpus();
        let phys_addr_bits = supported_cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 0x8000_0008)
            .map(|e| (e.eax & 0xff) as u8)
            .filter(|b| *b >= 32);
        let cap_features = crate::arch::cpuid::CapabilityFeatures {
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
        };
        Ok(Self { kvm, supported_cpuid, msr_index_list, max_vcpus, phys_addr_bits, cap_features })
    }
}
