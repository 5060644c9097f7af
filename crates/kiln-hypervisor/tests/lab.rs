//! Both backends booting the repository's Linux guest on real (nested) KVM, in the lab: kiln-vmm
//! through its API, and QEMU with `-accel kvm`. This test binary itself runs inside the lab (its
//! `in_the_lab` test, with the library under test), so the lab exercises the same code as the host.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use kiln_hypervisor::{
    open_backend, Accelerator, BackendKind, BackendOptions, HostProbe, KvmStatus, VmExit, VmSpec, VmState,
};
use kiln_test_utils::{guest_assets, wait_until};

const IN_LAB_ENV: &str = "KILN_HYP_IN_LAB";
const BOOT: Duration = Duration::from_secs(180);

fn spec(name: &str, command: &str) -> VmSpec {
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd -- {command}"
    );
    let mut s = VmSpec::new(name, "/lab/vmlinux", &cmdline, Path::new("/tmp/kiln").join(name));
    s.initrd = Some("/lab/initramfs.cpio.gz".into());
    s.memory_mib = 256;
    s
}

/// Runs inside the lab only (see the module doc).
#[test]
#[ignore = "helper: runs inside the lab, started by both_backends_boot_linux_on_real_kvm"]
fn in_the_lab() {
    if std::env::var_os(IN_LAB_ENV).is_none() {
        return;
    }
    let probe = HostProbe::detect();
    assert!(matches!(probe.kvm, KvmStatus::Hardware { .. }), "the lab's KVM: {:?}", probe.kvm);
    let options = BackendOptions::default();
    let ticker = "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.2; done";

    // kiln-vmm: lifecycle over the API with a Linux guest, then a graceful stop.
    let vmm = open_backend(BackendKind::KilnVmm, &probe, &options);
    let caps = vmm.capabilities();
    assert_eq!((caps.usable, caps.accelerator), (true, Some(Accelerator::Kvm)), "{caps:?}");
    let vm = KillOnDrop::new(vmm.create(&spec("vmm-ticker", ticker)).unwrap());
    vm.start().unwrap();
    wait_for_line(&*vm, "tick-3", BOOT);
    vm.pause().unwrap();
    assert_eq!(vm.state().unwrap(), VmState::Paused);
    let paused_at = assert_frozen(&*vm, "tick-");
    vm.resume().unwrap();
    assert!(wait_until(BOOT, || count_lines(&*vm, "tick-") > paused_at + 2), "{}", console(&*vm));
    let stopped = vm.stop(Duration::from_secs(30)).unwrap();
    println!("kiln-vmm-stop={} forced={}", stopped.exit, stopped.forced);
    assert_eq!((stopped.exit, stopped.forced), (VmExit::Code(0), false), "{}", console(&*vm));

    // kiln-vmm: a guest that ends itself.
    let vm = KillOnDrop::new(vmm.create(&spec("vmm-bye", "echo bye-from-linux")).unwrap());
    vm.start().unwrap();
    assert_eq!(wait_exit(&*vm, BOOT), VmExit::Code(0));
    wait_for_line(&*vm, "bye-from-linux", Duration::ZERO);
    wait_for_line(&*vm, "KILN-GUEST-EXIT 0", Duration::ZERO);
    println!("kiln-vmm-exit=ok");

    // QEMU on hardware KVM: -accel kvm, no notice; a guest that ends itself, then a graceful stop.
    let qemu = open_backend(BackendKind::Qemu, &probe, &options);
    let caps = qemu.capabilities();
    assert_eq!(
        (caps.usable, caps.accelerator, caps.notice.clone()),
        (true, Some(Accelerator::Kvm), None),
        "{caps:?}"
    );
    let vm = KillOnDrop::new(qemu.create(&spec("qemu-bye", "echo bye-from-qemu-kvm")).unwrap());
    assert_eq!(vm.record().accelerator, Accelerator::Kvm);
    assert!(vm.record().args.windows(2).any(|w| w == ["-cpu", "host"]));
    vm.start().unwrap();
    assert_eq!(wait_exit(&*vm, BOOT), VmExit::Code(0), "{}", console(&*vm));
    wait_for_line(&*vm, "bye-from-qemu-kvm", Duration::ZERO);
    let vm = KillOnDrop::new(qemu.create(&spec("qemu-sleeper", "sleep 100000")).unwrap());
    vm.start().unwrap();
    wait_for_line(&*vm, "KILN-GUEST-READY", BOOT);
    let stopped = vm.stop(Duration::from_secs(30)).unwrap();
    println!("qemu-kvm-stop={} forced={}", stopped.exit, stopped.forced);
    assert_eq!((stopped.exit, stopped.forced), (VmExit::Code(0), false), "{}", console(&*vm));
    println!("lab-done");
}

#[test]
fn both_backends_boot_linux_on_real_kvm() {
    let assets = guest_assets();
    let me = std::env::current_exe().unwrap();
    let report = kiln_lab::Lab::new()
        .unwrap()
        .binary(&me, "/usr/bin/kiln-hypervisor-lab-test")
        .binary(kiln_vmm_bin(), "/usr/bin/kiln-vmm")
        .binary("/usr/bin/qemu-system-x86_64", "/usr/bin/qemu-system-x86_64")
        .dir("/usr/share/qemu", "/usr/share/qemu")
        .file(&assets.vmlinux, "/lab/vmlinux")
        .file(&assets.initramfs, "/lab/initramfs.cpio.gz")
        .env(IN_LAB_ENV, "1")
        .timeout(Duration::from_secs(900))
        .step(
            "backends",
            "kiln-hypervisor-lab-test in_the_lab --exact --include-ignored --nocapture --test-threads=1",
        )
        .run()
        .unwrap();
    let step = report.step("backends").unwrap();
    let out = step.stdout_str();
    let ctx = format!("--- stdout\n{out}\n--- stderr\n{}", step.stderr_str());
    assert_eq!(step.exit_code, 0, "{ctx}");
    assert!(out.lines().any(|l| l == "lab-done"), "the in-lab test did not run to the end:\n{ctx}");
    for line in out.lines().filter(|l| l.contains("-stop=") || l.contains("-exit=")) {
        eprintln!("lab: {line} ({:?} step wall)", step.wall);
    }
}
