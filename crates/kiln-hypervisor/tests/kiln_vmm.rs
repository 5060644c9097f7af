//! The kiln-vmm backend on this host's /dev/kvm, with kiln-vmm's small purpose-built guests
//! (`crates/kiln-vmm/tests/guests`), driven only through the Firecracker API. On a PVM host the
//! backend refuses by default (stock Linux does not boot there); these guests run on PVM, so the
//! tests pass the test-only `allow_pvm` option.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use kiln_hypervisor::kiln_vmm::KilnVmmOptions;
use kiln_hypervisor::{
    attach, open_backend, AgentError, AgentSpec, BackendKind, BackendOptions, DiskSpec, HostProbe,
    Hypervisor, HypervisorError, KvmStatus, NetSpec, VmExit, VmRecord, VmSpec, VmState,
};
use kiln_test_utils::{assemble_elf, require_kvm, wait_until};

const COMMON_S: &str = include_str!("../../kiln-vmm/tests/guests/common.S");
const TICKER_S: &str = include_str!("../../kiln-vmm/tests/guests/ticker.S");
const PVH_S: &str = include_str!("../../kiln-vmm/tests/guests/pvh.S");

fn guest(dir: &Path, name: &str, source: &str) -> PathBuf {
    let out = dir.join(name);
    assemble_elf(&format!("{COMMON_S}\n{source}"), 0x10_0000, &out);
    out
}

fn backend(allow_pvm: bool) -> Box<dyn Hypervisor> {
    let options = BackendOptions {
        kiln_vmm: KilnVmmOptions { binary: Some(kiln_vmm_bin()), allow_pvm, ..Default::default() },
        ..Default::default()
    };
    open_backend(BackendKind::KilnVmm, &HostProbe::detect(), &options)
}

/// A ticker guest (prints "tick:" then a '.' every few ms, forever; ignores Ctrl-Alt-Del).
fn ticker_spec(dir: &Path, name: &str) -> VmSpec {
    let kernel = guest(dir, "ticker.elf", TICKER_S);
    VmSpec::new(name, kernel, "console=ttyS0", dir.join(name))
}

fn ticks(vm: &dyn kiln_hypervisor::Vm) -> usize {
    console(vm).matches('.').count()
}

fn assert_ticking(vm: &dyn kiln_hypervisor::Vm) -> usize {
    let before = ticks(vm);
    assert!(
        wait_until(Duration::from_secs(10), || ticks(vm) > before + 5),
        "the guest does not tick: {}",
        console(vm)
    );
    ticks(vm)
}

fn assert_paused(vm: &dyn kiln_hypervisor::Vm) {
    std::thread::sleep(Duration::from_millis(100));
    let at = ticks(vm);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ticks(vm), at, "the guest advanced while paused");
}

#[test]
fn on_a_pvm_host_the_backend_says_to_use_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let backend = backend(false);
    let caps = backend.capabilities();
    if HostProbe::detect().kvm != KvmStatus::Pvm {
        eprintln!("NOTE: this host's KVM is not PVM; checking that kiln-vmm is usable instead");
        assert_eq!(caps.usable, kiln_test_utils::host_has_kvm(), "{caps:?}");
        return;
    }
    assert!(!caps.usable);
    match backend.create(&ticker_spec(dir.path(), "refused")) {
        Err(HypervisorError::Unusable { backend: BackendKind::KilnVmm, reason }) => {
            assert!(reason.contains("PVM host") && reason.contains("--hypervisor qemu"), "{reason}")
        }
        other => panic!("expected Unusable, got {:?}", other.map(|vm| vm.record().clone())),
    }
    assert!(!dir.path().join("refused").exists(), "nothing is started or written when unusable");
}

#[test]
fn the_api_driven_lifecycle_create_start_pause_resume_kill() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let tap = Tap::new("v");
    let mut spec = ticker_spec(dir.path(), "ticker");
    spec.vcpus = 1;
    spec.memory_mib = 64;
    let data = dir.path().join("data.img");
    std::fs::write(&data, vec![0u8; 1 << 20]).unwrap();
    spec.extra_disks.push(DiskSpec { path: data, read_only: true });
    spec.network_interfaces.push(NetSpec { tap: tap.0.clone(), mac: None });
    spec.agent = Some(AgentSpec { vsock_port: 5000 });

    let vm = KillOnDrop::new(backend(true).create(&spec).unwrap());
    assert_eq!(vm.state().unwrap(), VmState::Created);
    assert_eq!(VmRecord::load(&spec.state_dir).unwrap(), *vm.record());
    vm.start().unwrap();
    assert_eq!(vm.state().unwrap(), VmState::Running);
    assert_ticking(&*vm);
    assert!(console(&*vm).starts_with("tick:"), "{}", console(&*vm));

    vm.pause().unwrap();
    assert_eq!(vm.state().unwrap(), VmState::Paused);
    assert_paused(&*vm);
    vm.resume().unwrap();
    assert_eq!(vm.state().unwrap(), VmState::Running);
    assert_ticking(&*vm);

    // The vsock device is there (its socket answers), but nothing in this guest listens.
    let chan = vm.agent_channel().unwrap();
    match chan.connect(Duration::from_millis(300)) {
        Err(AgentError::NotListening { port: 5000, .. }) => {}
        other => panic!("expected NotListening on port 5000, got {other:?}"),
    }

    assert_eq!(vm.kill().unwrap(), VmExit::Signal(libc::SIGKILL));
    assert_eq!(vm.state().unwrap(), VmState::Exited(VmExit::Signal(libc::SIGKILL)));
    let err = vm.start().unwrap_err().to_string();
    assert!(err.contains("has exited (killed by signal 9 (SIGKILL))"), "{err}");
}

#[test]
fn a_guest_that_resets_ends_the_vmm_with_exit_code_0() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest(dir.path(), "pvh.elf", PVH_S);
    let mut spec = VmSpec::new("pvh", kernel, "kiln-hypervisor-test", dir.path().join("pvh"));
    // The guest checks that a virtio-mmio device answers at the first slot.
    let data = dir.path().join("data.img");
    std::fs::write(&data, vec![0u8; 4096]).unwrap();
    spec.extra_disks.push(DiskSpec { path: data, read_only: true });
    let vm = KillOnDrop::new(backend(true).create(&spec).unwrap());
    vm.start().unwrap();
    assert_eq!(wait_exit(&*vm, Duration::from_secs(10)), VmExit::Code(0));
    assert!(console(&*vm).contains("pvh:MTVFU\n"), "{}", console(&*vm));
    assert_eq!(vm.state().unwrap(), VmState::Exited(VmExit::Code(0)));
}

#[test]
fn stop_kills_a_guest_that_ignores_ctrl_alt_del_and_never_started_ones() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let backend = backend(true);
    let vm = KillOnDrop::new(backend.create(&ticker_spec(dir.path(), "a")).unwrap());
    vm.start().unwrap();
    assert_ticking(&*vm);
    let stopped = vm.stop(Duration::from_secs(1)).unwrap();
    assert_eq!((stopped.exit, stopped.forced), (VmExit::Signal(libc::SIGKILL), true));

    let never = KillOnDrop::new(backend.create(&ticker_spec(dir.path(), "b")).unwrap());
    let stopped = never.stop(Duration::from_secs(30)).unwrap();
    assert_eq!((stopped.exit, stopped.forced), (VmExit::Signal(libc::SIGKILL), true));
    // Stopping again reports how it ended.
    let again = never.stop(Duration::from_secs(30)).unwrap();
    assert_eq!((again.exit, again.forced), (VmExit::Signal(libc::SIGKILL), false));
}

/// Run only by `run_creator_process`: creates and starts a ticker VM, then this process exits.
#[test]
#[ignore = "helper: runs in a child process of a_vm_outlives_its_creator_and_is_reattached"]
fn creator_process() {
    let Some(dir) = std::env::var_os(CREATOR_ENV) else { return };
    let dir = PathBuf::from(dir);
    let vm = backend(true).create(&ticker_spec(&dir, "outlives")).unwrap();
    vm.start().unwrap();
    assert_ticking(&*vm);
}

#[test]
fn a_vm_outlives_its_creator_and_is_reattached() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let kernel_dir = dir.path().to_path_buf();
    run_creator_process(&kernel_dir);
    let record = VmRecord::load(&dir.path().join("outlives")).unwrap();
    let vm = KillOnDrop::new(attach(record).unwrap());
    assert_eq!(vm.state().unwrap(), VmState::Running);
    assert_ticking(&*vm);
    vm.pause().unwrap();
    assert_paused(&*vm);
    // A handle dropped and made again from the record still controls the VM.
    drop(vm.release());
    let vm =
        KillOnDrop::new(backend(true).attach(VmRecord::load(&dir.path().join("outlives")).unwrap()).unwrap());
    assert_eq!(vm.state().unwrap(), VmState::Paused);
    vm.resume().unwrap();
    assert_ticking(&*vm);
    // The wrong backend refuses the record.
    let qemu = open_backend(BackendKind::Qemu, &HostProbe::detect(), &BackendOptions::default());
    let err = qemu.attach(vm.record().clone()).err().unwrap().to_string();
    assert!(err.contains("created by the kiln-vmm backend"), "{err}");
    assert_eq!(vm.kill().unwrap(), VmExit::Signal(libc::SIGKILL));
}
