//! Both backends booting the repository's Linux guest on real (nested) KVM, in the lab: kiln-vmm
//! through its API, and QEMU with `-accel kvm`. This test binary itself runs inside the lab (its
//! `in_the_lab` test, with the library under test), so the lab exercises the same code as the host.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use kiln_hypervisor::qmp::QmpClient;
use kiln_hypervisor::{
    open_backend, Accelerator, BackendKind, BackendOptions, HostProbe, Hypervisor, KvmStatus, Vm, VmExit,
    VmSpec, VmState,
};
use kiln_test_utils::{echo_lab_retries, guest_assets, wait_until};

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

/// What QEMU says of a VM that did not get where the test expected: its run state and vCPUs.
fn qemu_state(vm: &dyn Vm) -> String {
    let mut qmp = match QmpClient::connect(&vm.record().control_socket, Duration::from_secs(5)) {
        Ok(q) => q,
        Err(e) => return format!("(QMP did not answer: {e})"),
    };
    let mut out = format!("QEMU status: {:?}\n", qmp.query_status());
    for command in ["info registers -a", "info lapic"] {
        let answer =
            qmp.execute("human-monitor-command", Some(serde_json::json!({ "command-line": command })));
        match answer {
            Ok(serde_json::Value::String(text)) => out.push_str(&format!("--- {command}\n{text}")),
            other => out.push_str(&format!("--- {command}: {other:?}\n")),
        }
    }
    out
}

/// How long a booting guest's console may stand still before the boot counts as stalled.
const STALL: Duration = Duration::from_secs(40);

/// What a boot waits for.
enum Until {
    /// A console line equal to this.
    Line(&'static str),
    /// The VMM's end.
    Exit,
}

/// Creates and starts a VM from `spec(name)` and waits until `until` holds.
///
/// The lab's emulated nesting occasionally freezes a guest mid-boot: the guest's vCPU spins with
/// interrupts off or waits for an interrupt that never comes, under either VMM (see
/// docs/testing.md). A guest whose console stands still for [`STALL`] before it gets there is
/// reported on stderr as a `lab-retry:` line with its console tail (and QEMU's view of its vCPU),
/// killed, and booted once more under a new name. A second stall, or anything else, fails.
fn boot(backend: &dyn Hypervisor, name: &str, command: &str, until: Until) -> KillOnDrop {
    // QEMU's view of its vCPU; kiln-vmm has no such monitor.
    let vcpu_state = |vm: &dyn Vm| {
        if backend.kind() == BackendKind::Qemu {
            qemu_state(vm)
        } else {
            String::new()
        }
    };
    let reached = |vm: &dyn Vm| match until {
        Until::Line(line) => console(vm).lines().any(|l| l.trim_end() == line),
        Until::Exit => !vm.record().process.is_running(),
    };
    for attempt in 1..=2 {
        let name = if attempt == 1 { name.to_string() } else { format!("{name}-again") };
        let vm = KillOnDrop::new(backend.create(&spec(&name, command)).unwrap());
        vm.start().unwrap();
        let deadline = Instant::now() + BOOT;
        let (mut seen, mut changed) = (0, Instant::now());
        loop {
            if reached(&*vm) {
                return vm;
            }
            let len = console(&*vm).len();
            if len != seen {
                (seen, changed) = (len, Instant::now());
            }
            let stalled = changed.elapsed() > STALL;
            if stalled && attempt == 1 {
                let state = vcpu_state(&*vm);
                let text = console(&*vm);
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                for line in tail.iter().rev().copied().chain(state.lines()) {
                    eprintln!("lab-retry: {name}: {line}");
                }
                eprintln!(
                    "lab-retry: {name}: console still for {STALL:?} before {:?}; booting it once more",
                    until_text(&until)
                );
                break;
            }
            assert!(
                !stalled && Instant::now() < deadline,
                "{name}: not at {:?} within {BOOT:?} (console still for {:?}); console:\n{text}\n{state}",
                until_text(&until),
                changed.elapsed(),
                text = console(&*vm),
                state = vcpu_state(&*vm),
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    unreachable!("the second attempt returns or fails")
}

fn until_text(until: &Until) -> String {
    match until {
        Until::Line(line) => format!("console line {line}"),
        Until::Exit => "the VM's end".to_string(),
    }
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
    let vm = boot(&*vmm, "vmm-ticker", ticker, Until::Line("tick-3"));
    vm.pause().unwrap();
    assert_eq!(vm.state().unwrap(), VmState::Paused);
    let paused_at = assert_frozen(&*vm, "tick-");
    vm.resume().unwrap();
    assert!(wait_until(BOOT, || count_lines(&*vm, "tick-") > paused_at + 2), "{}", console(&*vm));
    let stopped = vm.stop(Duration::from_secs(30)).unwrap();
    println!("kiln-vmm-stop={} forced={}", stopped.exit, stopped.forced);
    assert_eq!((stopped.exit, stopped.forced), (VmExit::Code(0), false), "{}", console(&*vm));

    // kiln-vmm: a guest that ends itself.
    let vm = boot(&*vmm, "vmm-bye", "echo bye-from-linux", Until::Exit);
    assert_eq!(wait_exit(&*vm, Duration::ZERO), VmExit::Code(0), "{}", console(&*vm));
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
    let vm = boot(&*qemu, "qemu-bye", "echo bye-from-qemu-kvm", Until::Exit);
    assert_eq!(vm.record().accelerator, Accelerator::Kvm);
    assert!(vm.record().args.windows(2).any(|w| w == ["-cpu", "host"]));
    assert_eq!(wait_exit(&*vm, Duration::ZERO), VmExit::Code(0), "{}", console(&*vm));
    wait_for_line(&*vm, "bye-from-qemu-kvm", Duration::ZERO);
    let vm = boot(&*qemu, "qemu-sleeper", "sleep 100000", Until::Line("KILN-GUEST-READY"));
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
        .timeout(Duration::from_secs(480))
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
    echo_lab_retries(&step.stderr_str());
}
