//! The QEMU backend: `qemu-system-x86_64 -M microvm`, one detached process per VM, controlled over
//! QMP.
//!
//! The machine, and why each choice:
//! - `-M microvm,pit=on,acpi=off,auto-kernel-cmdline=off,ioapic2=off`: microvm is QEMU's
//!   Firecracker-like machine (virtio-mmio, no PCI). Under TCG the guest's TSC calibration hangs
//!   without the PIT. No ACPI: the guest kernels Kiln builds fail to load microvm's ACPI tables
//!   and then lose the console's interrupt, while the MP table works. QEMU would append the
//!   `virtio_mmio.device=` parameters at the **end** of the command line, i.e. after ` -- ` where
//!   Linux hands them to init, so this backend writes them itself, before ` -- `, like kiln-vmm.
//!   With `ioapic2=off` microvm has 8 virtio-mmio transports at `0xfeb00000 + n * 0x200`, IRQ
//!   `5 + n`, and QEMU gives the first `-device` the last transport (n = 7), the next one n = 6, ...
//!   so at most 8 virtio devices.
//! - `-device i8042`: microvm has no keyboard controller. With one, a guest `reboot=k` resets the
//!   machine (`-no-reboot` turns that into QEMU exiting 0, as kiln-vmm exits 0) and QMP
//!   `send-key ctrl-alt-delete` reaches the guest: that is the graceful stop, the same signal as
//!   kiln-vmm's `SendCtrlAltDel`. (`system_powerdown` needs ACPI, which is off.)
//! - `-S` and `cont`: QEMU starts with vCPUs stopped (`prelaunch`), so create and start are separate
//!   as with kiln-vmm; `stop`/`cont` pause and resume.
//! - Accelerator `kvm` with `-cpu host` only where `/dev/kvm` is hardware KVM; elsewhere (missing,
//!   PVM) `tcg` with `-cpu max` and a one-line notice.
//! - The console is a `file` chardev on COM1; the agent channel is a `virtio-serial-device` with a
//!   port named `kiln.agent` on a server-mode Unix socket (no vhost-vsock on the hosts Kiln
//!   targets, and QEMU's vsock needs it).
//! - No `-daemonize`: the process is detached by this crate so that its monitor can record how it
//!   ends.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::agent::AgentChannel;
use crate::error::HypervisorError;
use crate::host::{Accelerator, Capabilities, HostProbe};
use crate::machine::{
    default_mac, expect_backend, usable_binary, Control, Launch, Machine, RecordDraft, RunState,
};
use crate::qmp::{QmpClient, QmpError};
use crate::record::{StatePaths, VmRecord};
use crate::spec::{
    agent_serial_port_name, with_kernel_params, VmSpec, AGENT_SERIAL_PORTS, AGENT_SERIAL_PORT_NAME,
};
use crate::{BackendKind, Hypervisor, Vm};

/// Read/write timeout of one QMP exchange.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// virtio-mmio transports of microvm with `ioapic2=off`.
pub const MAX_VIRTIO_DEVICES: usize = 8;
const VIRTIO_MMIO_BASE: u64 = 0xfeb0_0000;
const VIRTIO_MMIO_SIZE: u64 = 0x200;
const VIRTIO_IRQ_BASE: u64 = 5;

/// Options of the QEMU backend.
#[derive(Debug, Clone)]
pub struct QemuOptions {
    /// The QEMU binary (default: what the host probe found).
    pub binary: Option<PathBuf>,
    /// Force an accelerator (default: kvm on hardware KVM, else tcg).
    pub accelerator: Option<Accelerator>,
    /// How long to wait for the QMP socket after starting QEMU.
    pub ready_timeout: Duration,
}

impl Default for QemuOptions {
    fn default() -> Self {
        Self { binary: None, accelerator: None, ready_timeout: Duration::from_secs(20) }
    }
}

/// The QEMU backend.
#[derive(Debug, Clone)]
pub struct QemuBackend {
    probe: HostProbe,
    options: QemuOptions,
}

impl QemuBackend {
    /// The backend on a host described by `probe`.
    pub fn new(mut probe: HostProbe, options: QemuOptions) -> Self {
        if let Some(b) = &options.binary {
            probe.qemu = Some(b.clone());
        }
        Self { probe, options }
    }
}

/// `value` for a QEMU `key=value,...` option: commas are doubled.
fn opt_value(value: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// `prefix` followed by an escaped path.
fn opt_path(prefix: &str, path: &Path) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(opt_value(path.as_os_str()));
    s
}

/// The `virtio_mmio.device=` parameter of the `index`-th virtio `-device` (see the module doc).
pub fn virtio_mmio_param(index: usize) -> String {
    let slot = (MAX_VIRTIO_DEVICES - 1 - index) as u64;
    format!(
        "virtio_mmio.device=512@{:#x}:{}",
        VIRTIO_MMIO_BASE + slot * VIRTIO_MMIO_SIZE,
        VIRTIO_IRQ_BASE + slot
    )
}

/// The guest's command line: the spec's, with the root device and the virtio-mmio devices added
/// before ` -- `.
pub fn guest_cmdline(spec: &VmSpec) -> String {
    let mut params = Vec::new();
    if let Some(root) = &spec.root_disk {
        params.push("root=/dev/vda".to_string());
        params.push(if root.read_only { "ro" } else { "rw" }.to_string());
    }
    params.extend((0..virtio_device_count(spec)).map(virtio_mmio_param));
    with_kernel_params(&spec.cmdline, &params)
}

fn virtio_device_count(spec: &VmSpec) -> usize {
    spec.disks().count() + spec.network_interfaces.len() + usize::from(spec.agent.is_some())
}

/// QEMU's command line for `spec` (everything after the program name).
pub fn qemu_args(
    spec: &VmSpec,
    paths: &StatePaths,
    accel: Accelerator,
) -> Result<Vec<OsString>, HypervisorError> {
    let devices = virtio_device_count(spec);
    if devices > MAX_VIRTIO_DEVICES {
        return Err(HypervisorError::InvalidSpec(format!(
            "{devices} virtio devices (disks, interfaces, agent) asked; the QEMU microvm backend has \
             {MAX_VIRTIO_DEVICES}"
        )));
    }
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |items: &[&dyn AsRef<OsStr>]| a.extend(items.iter().map(|i| i.as_ref().to_os_string()));
    push(&[&"-name", &opt_value(OsStr::new(&format!("guest={}", spec.name)))]);
    push(&[&"-M", &"microvm,pit=on,acpi=off,auto-kernel-cmdline=off,ioapic2=off"]);
    let cpu = match accel {
        Accelerator::Kvm => "host",
        Accelerator::Tcg => "max",
    };
    push(&[&"-accel", &accel.to_string(), &"-cpu", &cpu]);
    push(&[&"-smp", &spec.vcpus.to_string(), &"-m", &format!("{}M", spec.memory_mib)]);
    push(&[&"-nodefaults", &"-no-user-config", &"-display", &"none", &"-no-reboot", &"-S"]);
    push(&[&"-chardev", &opt_path("socket,id=qmp,server=on,wait=off,path=", &paths.qmp_socket)]);
    push(&[&"-mon", &"chardev=qmp,mode=control"]);
    push(&[&"-chardev", &opt_path("file,id=console,append=on,path=", &spec.console_log)]);
    push(&[&"-serial", &"chardev:console", &"-device", &"i8042"]);
    push(&[&"-kernel", &spec.kernel]);
    if let Some(initrd) = &spec.initrd {
        push(&[&"-initrd", initrd]);
    }
    push(&[&"-append", &guest_cmdline(spec)]);
    for (i, disk) in spec.disks().enumerate() {
        let mut drive = opt_path(&format!("id=disk{i},format=raw,if=none,file="), &disk.path);
        drive.push(if disk.read_only { ",readonly=on" } else { ",readonly=off" });
        push(&[&"-drive", &drive, &"-device", &format!("virtio-blk-device,drive=disk{i}")]);
    }
    for (i, net) in spec.network_interfaces.iter().enumerate() {
        let mac = net.mac.clone().unwrap_or_else(|| default_mac(&spec.name, i));
        push(&[&"-netdev", &format!("tap,id=net{i},ifname={},script=no,downscript=no", net.tap)]);
        push(&[&"-device", &format!("virtio-net-device,netdev=net{i},mac={mac}")]);
    }
    if spec.agent.is_some() {
        push(&[&"-device", &"virtio-serial-device,id=agent0"]);
        for i in 0..AGENT_SERIAL_PORTS {
            let chardev = format!("socket,id=agent{i},server=on,wait=off,path=");
            push(&[&"-chardev", &opt_path(&chardev, &paths.agent_serial_port(i))]);
            let name = agent_serial_port_name(i);
            push(&[&"-device", &format!("virtserialport,bus=agent0.0,chardev=agent{i},name={name}")]);
        }
    }
    Ok(a)
}

impl Hypervisor for QemuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn capabilities(&self) -> Capabilities {
        self.probe.qemu_capabilities(self.options.accelerator)
    }

    fn create(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, HypervisorError> {
        let caps = self.capabilities();
        let binary = usable_binary(&caps)?;
        let accel = caps.accelerator.unwrap_or(Accelerator::Tcg);
        spec.validate()?;
        let paths = StatePaths::new(&spec.state_dir);
        let args = qemu_args(spec, &paths, accel)?;
        paths.prepare(&spec.console_log)?;
        let guard = Launch {
            backend: BackendKind::Qemu,
            binary: &binary,
            args: &args,
            stdout: &paths.vmm_log,
            vmm_log: &paths.vmm_log,
            exit_file: &paths.exit_file,
            control_socket: &paths.qmp_socket,
            ready_timeout: self.options.ready_timeout,
        }
        .run(|| QmpClient::connect(&paths.qmp_socket, QMP_TIMEOUT).is_ok())?;
        let record = guard.save_record(RecordDraft {
            backend: BackendKind::Qemu,
            spec,
            paths: &paths,
            control_socket: paths.qmp_socket.clone(),
            agent: spec.agent.map(|_| AgentChannel::VirtioSerial {
                socket: paths.agent_serial.clone(),
                port_name: AGENT_SERIAL_PORT_NAME.to_string(),
                more_sockets: (1..AGENT_SERIAL_PORTS).map(|i| paths.agent_serial_port(i)).collect(),
            }),
            binary: &binary,
            args: &args,
            accelerator: accel,
        })?;
        attach(record)
    }

    fn attach(&self, record: VmRecord) -> Result<Box<dyn Vm>, HypervisorError> {
        attach(record)
    }
}

/// A handle on a VM the QEMU backend created.
pub fn attach(record: VmRecord) -> Result<Box<dyn Vm>, HypervisorError> {
    expect_backend(&record, BackendKind::Qemu)?;
    let control = QmpControl { name: record.name.clone(), socket: record.control_socket.clone() };
    Ok(Box::new(Machine::new(record, control)))
}

/// Control over QMP. QEMU serves one QMP client at a time, so each call connects, runs its
/// command and disconnects: no process holds the monitor.
struct QmpControl {
    name: String,
    socket: PathBuf,
}

impl QmpControl {
    fn qmp<T>(&self, call: impl FnOnce(&mut QmpClient) -> Result<T, QmpError>) -> Result<T, HypervisorError> {
        QmpClient::connect(&self.socket, QMP_TIMEOUT)
            .and_then(|mut c| call(&mut c))
            .map_err(|source| HypervisorError::Qmp { name: self.name.clone(), source })
    }
}

impl Control for QmpControl {
    fn start(&mut self) -> Result<(), HypervisorError> {
        self.qmp(QmpClient::cont)
    }

    fn pause(&mut self) -> Result<(), HypervisorError> {
        self.qmp(QmpClient::stop)
    }

    fn resume(&mut self) -> Result<(), HypervisorError> {
        self.qmp(QmpClient::cont)
    }

    fn request_shutdown(&mut self) -> Result<(), HypervisorError> {
        self.qmp(QmpClient::send_ctrl_alt_delete)
    }

    fn run_state(&mut self) -> Result<RunState, HypervisorError> {
        let status = self.qmp(QmpClient::query_status)?;
        Ok(match (status.status.as_str(), status.running) {
            ("prelaunch", _) => RunState::Created,
            (_, true) => RunState::Running,
            // paused, and stops QEMU reports the same way: guest-panicked, internal-error, ...
            (_, false) => RunState::Paused,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{AgentSpec, DiskSpec, NetSpec};

    fn spec() -> VmSpec {
        let mut s = VmSpec::new("vm1", "/k/vmlinux", "console=ttyS0 reboot=k -- echo hi", "/run/kiln/vm1");
        s.vcpus = 2;
        s.memory_mib = 256;
        s.initrd = Some("/k/initrd.cpio".into());
        s.root_disk = Some(DiskSpec { path: "/img/root,1.ext4".into(), read_only: false });
        s.extra_disks.push(DiskSpec { path: "/img/data.ext4".into(), read_only: true });
        s.network_interfaces.push(NetSpec { tap: "tap0".into(), mac: Some("02:aa:bb:cc:dd:ee".into()) });
        s.agent = Some(AgentSpec::default());
        s
    }

    fn args(spec: &VmSpec, accel: Accelerator) -> Vec<String> {
        qemu_args(spec, &StatePaths::new(&spec.state_dir), accel)
            .unwrap()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    /// The value after `flag`'s `n`-th occurrence.
    fn after(args: &[String], flag: &str, n: usize) -> String {
        args.iter().enumerate().filter(|(_, a)| *a == flag).nth(n).map(|(i, _)| args[i + 1].clone()).unwrap()
    }

    #[test]
    fn the_command_line_is_a_paused_microvm_with_qmp_console_and_i8042() {
        let a = args(&spec(), Accelerator::Tcg);
        assert_eq!(after(&a, "-M", 0), "microvm,pit=on,acpi=off,auto-kernel-cmdline=off,ioapic2=off");
        assert_eq!((after(&a, "-accel", 0), after(&a, "-cpu", 0)), ("tcg".into(), "max".into()));
        assert_eq!((after(&a, "-smp", 0), after(&a, "-m", 0)), ("2".into(), "256M".into()));
        for flag in ["-S", "-no-reboot", "-nodefaults", "-no-user-config"] {
            assert!(a.contains(&flag.to_string()), "{flag} missing: {a:?}");
        }
        assert!(!a.contains(&"-daemonize".to_string()));
        assert_eq!(after(&a, "-chardev", 0), "socket,id=qmp,server=on,wait=off,path=/run/kiln/vm1/qmp.sock");
        assert_eq!(after(&a, "-mon", 0), "chardev=qmp,mode=control");
        assert_eq!(after(&a, "-chardev", 1), "file,id=console,append=on,path=/run/kiln/vm1/console.log");
        assert_eq!(after(&a, "-serial", 0), "chardev:console");
        assert_eq!(after(&a, "-device", 0), "i8042");
        assert_eq!(
            (after(&a, "-kernel", 0), after(&a, "-initrd", 0)),
            ("/k/vmlinux".into(), "/k/initrd.cpio".into())
        );
        let kvm = args(&spec(), Accelerator::Kvm);
        assert_eq!((after(&kvm, "-accel", 0), after(&kvm, "-cpu", 0)), ("kvm".into(), "host".into()));
    }

    #[test]
    fn devices_come_in_spec_order_with_escaped_paths() {
        let a = args(&spec(), Accelerator::Tcg);
        assert_eq!(after(&a, "-drive", 0), "id=disk0,format=raw,if=none,file=/img/root,,1.ext4,readonly=off");
        assert_eq!(after(&a, "-device", 1), "virtio-blk-device,drive=disk0");
        assert_eq!(after(&a, "-drive", 1), "id=disk1,format=raw,if=none,file=/img/data.ext4,readonly=on");
        assert_eq!(after(&a, "-device", 2), "virtio-blk-device,drive=disk1");
        assert_eq!(after(&a, "-netdev", 0), "tap,id=net0,ifname=tap0,script=no,downscript=no");
        assert_eq!(after(&a, "-device", 3), "virtio-net-device,netdev=net0,mac=02:aa:bb:cc:dd:ee");
        assert_eq!(after(&a, "-device", 4), "virtio-serial-device,id=agent0");
        assert_eq!(
            after(&a, "-chardev", 2),
            "socket,id=agent0,server=on,wait=off,path=/run/kiln/vm1/agent.sock"
        );
        assert_eq!(after(&a, "-device", 5), "virtserialport,bus=agent0.0,chardev=agent0,name=kiln.agent");
        // More ports, so that several kiln commands can reach the agent at once.
        assert_eq!(
            after(&a, "-chardev", 3),
            "socket,id=agent1,server=on,wait=off,path=/run/kiln/vm1/agent-1.sock"
        );
        assert_eq!(after(&a, "-device", 6), "virtserialport,bus=agent0.0,chardev=agent1,name=kiln.agent.1");
        assert_eq!(a.iter().filter(|x| x.starts_with("virtserialport")).count(), 4);
    }

    #[test]
    fn kernel_parameters_name_each_transport_before_the_init_arguments() {
        let a = args(&spec(), Accelerator::Tcg);
        assert_eq!(
            after(&a, "-append", 0),
            "console=ttyS0 reboot=k root=/dev/vda rw virtio_mmio.device=512@0xfeb00e00:12 \
             virtio_mmio.device=512@0xfeb00c00:11 virtio_mmio.device=512@0xfeb00a00:10 \
             virtio_mmio.device=512@0xfeb00800:9 -- echo hi"
        );
        let mut bare = spec();
        bare.root_disk = None;
        bare.extra_disks.clear();
        bare.network_interfaces.clear();
        bare.agent = None;
        assert_eq!(after(&args(&bare, Accelerator::Tcg), "-append", 0), "console=ttyS0 reboot=k -- echo hi");
    }

    #[test]
    fn more_devices_than_transports_are_refused() {
        let mut s = spec();
        for i in 0..6 {
            s.extra_disks.push(DiskSpec { path: format!("/img/{i}").into(), read_only: true });
        }
        let err = qemu_args(&s, &StatePaths::new(&s.state_dir), Accelerator::Tcg).unwrap_err().to_string();
        assert!(err.contains("10 virtio devices") && err.contains("has 8"), "{err}");
    }

    #[test]
    fn attach_refuses_a_record_of_the_other_backend() {
        let dir = tempfile::tempdir().unwrap();
        let mut record = crate::record::tests::record(dir.path());
        record.backend = BackendKind::KilnVmm;
        let err = attach(record).err().unwrap().to_string();
        assert!(err.contains("created by the kiln-vmm backend"), "{err}");
    }

    #[test]
    fn qmp_run_states_map_to_vm_states() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let states = ["prelaunch", "running", "paused", "guest-panicked"];
        let next = std::sync::atomic::AtomicUsize::new(0);
        let server = crate::qmp::tests::fake_qmp(&path, states.len(), move |cmd| match cmd {
            "query-status" => {
                let s = states[next.fetch_add(1, std::sync::atomic::Ordering::SeqCst)];
                let running = s == "running";
                vec![format!(r#"{{"return": {{"status": "{s}", "running": {running}}}, "id": {{id}}}}"#)]
            }
            _ => vec![r#"{"return": {}, "id": {id}}"#.into()],
        });
        let mut control = QmpControl { name: "vm".into(), socket: path };
        let got: Vec<RunState> = (0..4).map(|_| control.run_state().unwrap()).collect();
        assert_eq!(got, [RunState::Created, RunState::Running, RunState::Paused, RunState::Paused]);
        assert_eq!(server.join().unwrap().iter().filter(|c| *c == "query-status").count(), 4);
    }
}
