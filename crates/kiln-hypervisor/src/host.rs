//! What this host can run: its KVM (hardware, PVM, missing), the VMM binaries found, and for each
//! backend whether it is usable, with which accelerator, and why not. This is what `kiln info`
//! prints.

use std::ffi::OsString;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::BackendKind;

/// Environment variable naming the kiln-vmm binary to use.
pub const KILN_VMM_BIN_ENV: &str = "KILN_VMM_BIN";
/// Environment variable naming the QEMU binary to use.
pub const QEMU_BIN_ENV: &str = "KILN_QEMU_BIN";
/// kiln-vmm's binary name.
pub const KILN_VMM_BINARY: &str = "kiln-vmm";
/// QEMU's binary name.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// The module whose presence in sysfs marks `/dev/kvm` as PVM (the same check kiln-vmm makes in
/// `kvm_host::host_is_pvm`, which this crate must not link).
const PVM_MODULE: &str = "kvm_pvm";
/// Modules of hardware-assisted KVM.
const HARDWARE_KVM_MODULES: [&str; 2] = ["kvm_intel", "kvm_amd"];

/// How guest code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// KVM (hardware virtualization, or PVM for kiln-vmm with `allow_pvm`).
    Kvm,
    /// QEMU's TCG: software emulation, no KVM needed, much slower.
    Tcg,
}

impl fmt::Display for Accelerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        })
    }
}

/// What `/dev/kvm` is on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KvmStatus {
    /// Hardware-assisted KVM (VT-x/AMD-V, also nested): stock Linux guests boot.
    Hardware {
        /// `kvm_intel` or `kvm_amd` when sysfs says which.
        module: Option<String>,
    },
    /// PVM, a software KVM: only PVM-enabled guest kernels boot; stock Linux hangs or fails.
    Pvm,
    /// No `/dev/kvm`.
    Missing,
    /// `/dev/kvm` exists but cannot be opened.
    Inaccessible {
        /// Why.
        reason: String,
    },
}

impl fmt::Display for KvmStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvmStatus::Hardware { module: Some(m) } => write!(f, "hardware KVM ({m})"),
            KvmStatus::Hardware { module: None } => write!(f, "hardware KVM"),
            KvmStatus::Pvm => {
                write!(f, "PVM (software KVM, module kvm_pvm): only PVM-enabled guest kernels boot")
            }
            KvmStatus::Missing => write!(f, "no /dev/kvm"),
            KvmStatus::Inaccessible { reason } => write!(f, "/dev/kvm unusable: {reason}"),
        }
    }
}

/// Where the probe looks; [`ProbePaths::system`] for the real host, anything else in tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbePaths {
    /// Root under which `dev/kvm` and `sys/module/*` are looked up (`/` on the host).
    pub root: PathBuf,
    /// Directory of the running program (kiln-vmm is looked for next to it first).
    pub exe_dir: Option<PathBuf>,
    /// The `PATH` to search.
    pub path: Option<OsString>,
    /// An explicit kiln-vmm binary ([`KILN_VMM_BIN_ENV`]).
    pub kiln_vmm: Option<PathBuf>,
    /// An explicit QEMU binary ([`QEMU_BIN_ENV`]).
    pub qemu: Option<PathBuf>,
}

impl ProbePaths {
    /// This host: `/`, the current executable's directory, `$PATH`, `$KILN_VMM_BIN`, `$KILN_QEMU_BIN`.
    pub fn system() -> Self {
        Self {
            root: PathBuf::from("/"),
            exe_dir: std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)),
            path: std::env::var_os("PATH"),
            kiln_vmm: std::env::var_os(KILN_VMM_BIN_ENV).map(PathBuf::from),
            qemu: std::env::var_os(QEMU_BIN_ENV).map(PathBuf::from),
        }
    }
}

/// What a backend can do on this host (`kiln info`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Backend.
    pub backend: BackendKind,
    /// The VMM binary it would run.
    pub binary: Option<PathBuf>,
    /// Whether `create` can work here.
    pub usable: bool,
    /// Why not, and what to do instead (when not usable).
    pub reason: Option<String>,
    /// The accelerator it would use (when usable).
    pub accelerator: Option<Accelerator>,
    /// A one-line notice to show the user when creating a VM (e.g. "slow: TCG").
    pub notice: Option<String>,
    /// How the host reaches the guest agent.
    pub agent_transport: AgentTransport,
    /// How `stop` asks the guest to shut down before killing the VMM.
    pub graceful_stop: String,
}

/// The kind of agent channel a backend gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentTransport {
    /// virtio-vsock, Firecracker-style Unix socket (`CONNECT <port>`); many connections.
    Vsock,
    /// A virtio-serial port on a Unix socket; one stream.
    VirtioSerial,
}

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostProbe {
    /// What `/dev/kvm` is.
    pub kvm: KvmStatus,
    /// The kiln-vmm binary, if found.
    pub kiln_vmm: Option<PathBuf>,
    /// The QEMU binary, if found.
    pub qemu: Option<PathBuf>,
}

impl HostProbe {
    /// Probes this host.
    pub fn detect() -> Self {
        Self::detect_with(&ProbePaths::system())
    }

    /// Probes with explicit paths (tests use a fake root).
    pub fn detect_with(p: &ProbePaths) -> Self {
        Self {
            kvm: probe_kvm(&p.root),
            kiln_vmm: find_binary(
                KILN_VMM_BINARY,
                p.kiln_vmm.as_deref(),
                p.exe_dir.as_deref(),
                p.path.as_ref(),
            ),
            qemu: find_binary(QEMU_BINARY, p.qemu.as_deref(), None, p.path.as_ref()),
        }
    }

    /// The accelerator QEMU uses here, and the one-line notice when it is TCG: KVM only where
    /// `/dev/kvm` is hardware KVM (stock Linux does not boot on PVM).
    pub fn qemu_accelerator(&self) -> (Accelerator, Option<String>) {
        let why = match &self.kvm {
            KvmStatus::Hardware { .. } => return (Accelerator::Kvm, None),
            KvmStatus::Pvm => "/dev/kvm is PVM, which stock Linux guests do not boot on".to_string(),
            KvmStatus::Missing => "this host has no /dev/kvm".to_string(),
            KvmStatus::Inaccessible { reason } => format!("/dev/kvm is unusable ({reason})"),
        };
        (
            Accelerator::Tcg,
            Some(format!("QEMU runs the guest under TCG (software emulation, much slower): {why}")),
        )
    }

    /// What the kiln-vmm backend can do here. `allow_pvm` is for PVM-enabled or purpose-built
    /// guest kernels only (tests); without it a PVM host makes the backend unusable.
    pub fn kiln_vmm_capabilities(&self, allow_pvm: bool) -> Capabilities {
        let mut caps = Capabilities {
            backend: BackendKind::KilnVmm,
            binary: self.kiln_vmm.clone(),
            usable: false,
            reason: None,
            accelerator: None,
            notice: None,
            agent_transport: AgentTransport::Vsock,
            graceful_stop: "Ctrl-Alt-Del through the API (SendCtrlAltDel, i8042)".into(),
        };
        let qemu_instead = "use --hypervisor qemu";
        let unusable = match (&self.kiln_vmm, &self.kvm) {
            (None, _) => Some(format!(
                "{KILN_VMM_BINARY} was found neither next to this program nor on PATH; install it there or set \
                 {KILN_VMM_BIN_ENV}"
            )),
            (_, KvmStatus::Missing) => Some(format!("this host has no /dev/kvm, which kiln-vmm needs; {qemu_instead}")),
            (_, KvmStatus::Inaccessible { reason }) => {
                Some(format!("/dev/kvm is unusable ({reason}); fix that, or {qemu_instead}"))
            }
            (_, KvmStatus::Pvm) if !allow_pvm => Some(format!(
                "kiln-vmm backend unusable on this PVM host (software KVM that boots only PVM-enabled guest \
                 kernels), {qemu_instead}"
            )),
            (_, KvmStatus::Pvm) => {
                caps.notice = Some("PVM host: only PVM-enabled or purpose-built guest kernels run".into());
                None
            }
            (_, KvmStatus::Hardware { .. }) => None,
        };
        caps.usable = unusable.is_none();
        caps.reason = unusable;
        caps.accelerator = caps.usable.then_some(Accelerator::Kvm);
        caps
    }

    /// What the QEMU backend can do here, optionally with a forced accelerator.
    pub fn qemu_capabilities(&self, forced: Option<Accelerator>) -> Capabilities {
        let (auto, auto_notice) = self.qemu_accelerator();
        let mut caps = Capabilities {
            backend: BackendKind::Qemu,
            binary: self.qemu.clone(),
            usable: false,
            reason: None,
            accelerator: None,
            notice: None,
            agent_transport: AgentTransport::VirtioSerial,
            graceful_stop: "Ctrl-Alt-Del through QMP send-key (an i8042 is added to the microvm machine)"
                .into(),
        };
        if self.qemu.is_none() {
            caps.reason = Some(format!(
                "{QEMU_BINARY} is not on PATH; install Debian's qemu-system-x86 package or set {QEMU_BIN_ENV}"
            ));
            return caps;
        }
        match forced {
            Some(Accelerator::Kvm) if auto != Accelerator::Kvm => {
                caps.reason = Some(format!(
                    "the kvm accelerator needs hardware KVM, and this host has {}; use tcg",
                    self.kvm
                ));
                return caps;
            }
            Some(Accelerator::Tcg) => {
                caps.accelerator = Some(Accelerator::Tcg);
                caps.notice =
                    Some("QEMU runs the guest under TCG (software emulation, much slower), as asked".into());
            }
            _ => {
                caps.accelerator = Some(auto);
                caps.notice = auto_notice;
            }
        }
        caps.usable = true;
        caps
    }

    /// Every backend's capabilities with default options, for `kiln info`.
    pub fn report(&self) -> Vec<Capabilities> {
        vec![self.kiln_vmm_capabilities(false), self.qemu_capabilities(None)]
    }
}

fn probe_kvm(root: &Path) -> KvmStatus {
    let dev = root.join("dev/kvm");
    let modules = root.join("sys/module");
    if !dev.exists() {
        return KvmStatus::Missing;
    }
    if modules.join(PVM_MODULE).exists() {
        return KvmStatus::Pvm;
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(&dev) {
        let hint = match e.kind() {
            std::io::ErrorKind::PermissionDenied => {
                ": run as root or join the group owning /dev/kvm (usually kvm)"
            }
            _ => "",
        };
        return KvmStatus::Inaccessible { reason: format!("cannot open it: {e}{hint}") };
    }
    let module = HARDWARE_KVM_MODULES.iter().find(|m| modules.join(m).exists()).map(|m| m.to_string());
    KvmStatus::Hardware { module }
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `explicit` if given (even when it is not executable: the user asked for it, and create reports
/// the problem), else `name` in `exe_dir`, else on `path`.
fn find_binary(
    name: &str,
    explicit: Option<&Path>,
    exe_dir: Option<&Path>,
    path: Option<&OsString>,
) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    let from_path = path.into_iter().flat_map(std::env::split_paths);
    exe_dir
        .map(Path::to_path_buf)
        .into_iter()
        .chain(from_path)
        .map(|d| d.join(name))
        .find(|c| is_executable(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeHost {
        dir: tempfile::TempDir,
    }

    impl FakeHost {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("dev")).unwrap();
            std::fs::create_dir_all(dir.path().join("sys/module/kvm")).unwrap();
            std::fs::create_dir_all(dir.path().join("bin")).unwrap();
            std::fs::create_dir_all(dir.path().join("exe")).unwrap();
            Self { dir }
        }
        fn p(&self, rel: &str) -> PathBuf {
            self.dir.path().join(rel)
        }
        fn with_kvm(self) -> Self {
            std::fs::write(self.p("dev/kvm"), "").unwrap();
            self
        }
        fn with_module(self, m: &str) -> Self {
            std::fs::create_dir_all(self.p(&format!("sys/module/{m}"))).unwrap();
            self
        }
        fn with_binary(self, rel: &str) -> Self {
            std::fs::write(self.p(rel), "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(self.p(rel), std::fs::Permissions::from_mode(0o755)).unwrap();
            self
        }
        fn probe(&self) -> HostProbe {
            HostProbe::detect_with(&ProbePaths {
                root: self.dir.path().to_path_buf(),
                exe_dir: Some(self.p("exe")),
                path: Some(std::env::join_paths([self.p("nowhere"), self.p("bin")]).unwrap()),
                kiln_vmm: None,
                qemu: None,
            })
        }
    }

    #[test]
    fn hardware_kvm_makes_both_backends_use_kvm() {
        let host = FakeHost::new()
            .with_kvm()
            .with_module("kvm_amd")
            .with_binary("exe/kiln-vmm")
            .with_binary("bin/qemu-system-x86_64");
        let probe = host.probe();
        assert_eq!(probe.kvm, KvmStatus::Hardware { module: Some("kvm_amd".into()) });
        assert_eq!(probe.kiln_vmm, Some(host.p("exe/kiln-vmm")));
        assert_eq!(probe.qemu, Some(host.p("bin/qemu-system-x86_64")));
        let [vmm, qemu] = <[Capabilities; 2]>::try_from(probe.report()).unwrap();
        assert!(vmm.usable && qemu.usable);
        assert_eq!((vmm.accelerator, qemu.accelerator), (Some(Accelerator::Kvm), Some(Accelerator::Kvm)));
        assert_eq!((vmm.notice, qemu.notice), (None, None));
    }

    #[test]
    fn on_pvm_kiln_vmm_says_to_use_qemu_and_qemu_falls_back_to_tcg_with_a_notice() {
        let host = FakeHost::new()
            .with_kvm()
            .with_module("kvm_pvm")
            .with_binary("bin/kiln-vmm")
            .with_binary("bin/qemu-system-x86_64");
        let probe = host.probe();
        assert_eq!(probe.kvm, KvmStatus::Pvm);
        let vmm = probe.kiln_vmm_capabilities(false);
        assert!(!vmm.usable);
        let reason = vmm.reason.unwrap();
        assert!(
            reason.contains("unusable on this PVM host") && reason.contains("--hypervisor qemu"),
            "{reason}"
        );
        let allowed = probe.kiln_vmm_capabilities(true);
        assert!(allowed.usable && allowed.notice.is_some());
        let qemu = probe.qemu_capabilities(None);
        assert_eq!(qemu.accelerator, Some(Accelerator::Tcg));
        let notice = qemu.notice.unwrap();
        assert!(notice.contains("TCG") && notice.contains("PVM") && !notice.contains('\n'), "{notice}");
        let forced = probe.qemu_capabilities(Some(Accelerator::Kvm));
        assert!(!forced.usable && forced.reason.unwrap().contains("needs hardware KVM"));
    }

    #[test]
    fn without_kvm_or_binaries_each_backend_says_why() {
        let host = FakeHost::new();
        let probe = host.probe();
        assert_eq!(probe.kvm, KvmStatus::Missing);
        let vmm = probe.kiln_vmm_capabilities(false);
        assert!(vmm.reason.unwrap().contains("neither next to this program nor on PATH"));
        let qemu = probe.qemu_capabilities(None);
        assert!(!qemu.usable && qemu.reason.unwrap().contains("qemu-system-x86"));

        let host = host.with_binary("bin/kiln-vmm").with_binary("bin/qemu-system-x86_64");
        let probe = host.probe();
        assert!(probe.kiln_vmm_capabilities(false).reason.unwrap().contains("no /dev/kvm"));
        let qemu = probe.qemu_capabilities(None);
        assert!(qemu.usable && qemu.notice.unwrap().contains("no /dev/kvm"));
    }

    #[test]
    fn a_kvm_device_that_cannot_be_opened_is_reported_with_the_error() {
        let host = FakeHost::new();
        std::fs::create_dir(host.p("dev/kvm")).unwrap(); // opening a directory read-write fails
        let probe = host.probe();
        match &probe.kvm {
            KvmStatus::Inaccessible { reason } => assert!(reason.contains("cannot open"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(probe.qemu_accelerator().0, Accelerator::Tcg);
    }

    #[test]
    fn non_executable_files_are_not_binaries_but_explicit_ones_win() {
        let host = FakeHost::new();
        std::fs::write(host.p("bin/qemu-system-x86_64"), "").unwrap();
        assert_eq!(host.probe().qemu, None);
        let probe = HostProbe::detect_with(&ProbePaths {
            root: host.p(""),
            exe_dir: None,
            path: None,
            kiln_vmm: Some("/opt/kiln-vmm".into()),
            qemu: Some("/opt/qemu".into()),
        });
        assert_eq!((probe.kiln_vmm, probe.qemu), (Some("/opt/kiln-vmm".into()), Some("/opt/qemu".into())));
    }

    #[test]
    fn the_real_host_probe_agrees_with_the_test_utils() {
        let probe = HostProbe::detect();
        assert_eq!(probe.kvm == KvmStatus::Missing, !kiln_test_utils::host_has_kvm());
        assert_eq!(probe.kvm == KvmStatus::Pvm, kiln_test_utils::host_is_pvm());
    }
}
