//! The QEMU backend on this host, under TCG (no KVM needed): the repository's guest kernel and
//! initramfs boot on `-M microvm`; lifecycle, console, disks, network, agent channel, stop, kill,
//! and re-attaching from another process.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::Duration;

use common::*;
use kiln_hypervisor::qemu::QemuOptions;
use kiln_hypervisor::{
    attach, open_backend, Accelerator, AgentChannel, AgentSpec, BackendKind, BackendOptions, DiskSpec,
    HostProbe, Hypervisor, NetSpec, VmExit, VmRecord, VmSpec, VmState,
};
use kiln_test_utils::guest_assets;

const BOOT: Duration = Duration::from_secs(120);

fn backend() -> Box<dyn Hypervisor> {
    let options = BackendOptions {
        qemu: QemuOptions { accelerator: Some(Accelerator::Tcg), ..Default::default() },
        ..Default::default()
    };
    open_backend(BackendKind::Qemu, &HostProbe::detect(), &options)
}

/// A spec booting the guest kernel + initramfs with `command` run by the guest's init.
fn spec(name: &str, state_dir: &Path, command: &str) -> VmSpec {
    let assets = guest_assets();
    let cmdline = format!("console=ttyS0 reboot=k panic=1 tsc=reliable acpi=off -- {command}");
    let mut spec = VmSpec::new(name, &assets.vmlinux, &cmdline, state_dir);
    spec.initrd = Some(assets.initramfs.clone());
    spec.memory_mib = 256;
    spec
}

/// Linux hands init at most 32 words from the command line, so longer guest scripts travel on a
/// read-only disk the guest runs with `sh /dev/vdX`: the script, then `exit`, padded to 512 bytes.
fn script_disk(dir: &Path, script: &str) -> std::path::PathBuf {
    let mut bytes = format!("{script}\nexit 0\n").into_bytes();
    bytes.resize(bytes.len().div_ceil(512) * 512, b'\n');
    let path = dir.join("script.img");
    std::fs::write(&path, bytes).unwrap();
    path
}

const LIFECYCLE_GUEST: &str = r#"
cat /sys/class/net/eth0/address
echo vda-ro=$(cat /sys/block/vda/ro)
# The agent's port is found by name (its device is vport<virtio index>p1); ports appear a
# little after the driver binds, so wait, as an agent would.
port=
n=0
while [ -z "$port" ] && [ $n -lt 100 ]; do
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name 2>/dev/null)" = kiln.agent ] && port=/dev/${p##*/}
  done
  n=$((n+1)); sleep 0.1
done
echo port-found=${port:+yes}
read line < $port
echo got-$line
echo agent-hello > $port
i=0; while [ $i -lt 40 ]; do echo tick-$i; i=$((i+1)); sleep 0.1; done
"#;

#[test]
fn a_guest_boots_pauses_resumes_talks_to_the_host_and_ends_itself() {
    let dir = tempfile::tempdir().unwrap();
    let tap = Tap::new("q");
    let mut s = spec("life", &dir.path().join("vm"), "sh /dev/vda");
    s.vcpus = 2;
    s.extra_disks.push(DiskSpec { path: script_disk(dir.path(), LIFECYCLE_GUEST), read_only: true });
    s.network_interfaces.push(NetSpec { tap: tap.0.clone(), mac: Some("02:11:22:33:44:55".into()) });
    s.agent = Some(AgentSpec::default());

    let backend = backend();
    assert_eq!(backend.capabilities().accelerator, Some(Accelerator::Tcg));
    let vm = KillOnDrop::new(backend.create(&s).unwrap());
    assert_eq!(vm.state().unwrap(), VmState::Created);
    assert_eq!(
        VmRecord::load(&dir.path().join("vm")).unwrap(),
        *vm.record(),
        "the saved record is the handle's"
    );
    assert_eq!(vm.record().accelerator, Accelerator::Tcg);
    vm.start().unwrap();
    assert_eq!(vm.state().unwrap(), VmState::Running);

    // The agent channel: the host writes first, the guest answers.
    let chan = vm.agent_channel().unwrap();
    assert!(matches!(chan, AgentChannel::VirtioSerial { port_name, .. } if port_name == "kiln.agent"));
    let mut agent = chan.connect(Duration::from_secs(10)).unwrap().stream;
    agent.write_all(b"ping\n").unwrap();
    agent.set_read_timeout(Some(BOOT)).unwrap();
    let mut answer = String::new();
    BufReader::new(&agent).read_line(&mut answer).unwrap_or_else(|e| {
        let log = std::fs::read_to_string(&vm.record().vmm_log).unwrap_or_default();
        panic!("reading the agent channel: {e}; QEMU log:\n{log}\nconsole:\n{}", console(&*vm))
    });
    assert_eq!(answer, "agent-hello\n", "console:\n{}", console(&*vm));
    wait_for_line(&*vm, "got-ping", BOOT);
    let out = console(&*vm);
    for line in ["KILN-GUEST-READY", "02:11:22:33:44:55", "vda-ro=1", "port-found=yes"] {
        assert!(out.lines().any(|l| l.trim_end() == line), "no {line:?} on the console:\n{out}");
    }

    wait_for_line(&*vm, "tick-3", BOOT);
    vm.pause().unwrap();
    assert_eq!(vm.state().unwrap(), VmState::Paused);
    let paused_at = assert_frozen(&*vm, "tick-");
    vm.resume().unwrap();
    assert_eq!(vm.state().unwrap(), VmState::Running);
    assert!(
        kiln_test_utils::wait_until(Duration::from_secs(30), || count_lines(&*vm, "tick-") > paused_at + 2),
        "the guest did not go on after resume:\n{}",
        console(&*vm)
    );

    // The guest's init reboots after the command (reboot=k, i8042): QEMU exits 0.
    assert_eq!(wait_exit(&*vm, BOOT), VmExit::Code(0));
    assert_eq!(vm.state().unwrap(), VmState::Exited(VmExit::Code(0)));
    wait_for_line(&*vm, "KILN-GUEST-EXIT 0", Duration::ZERO);
    let err = vm.resume().unwrap_err().to_string();
    assert!(err.contains("has exited (exit code 0)"), "{err}");
}

#[test]
fn stop_shuts_a_sleeping_guest_down_and_kills_one_that_ignores_ctrl_alt_del() {
    let dir = tempfile::tempdir().unwrap();
    let backend = backend();
    let polite =
        KillOnDrop::new(backend.create(&spec("polite", &dir.path().join("a"), "sleep 100000")).unwrap());
    // With ctrl-alt-del off the kernel signals init instead, and this init ignores SIGINT.
    let stubborn = KillOnDrop::new(
        backend
            .create(&spec(
                "stubborn",
                &dir.path().join("b"),
                "echo 0 > /proc/sys/kernel/ctrl-alt-del; echo cad-off; sleep 100000",
            ))
            .unwrap(),
    );
    polite.start().unwrap();
    stubborn.start().unwrap();
    wait_for_line(&*polite, "KILN-GUEST-READY", BOOT);
    wait_for_line(&*stubborn, "cad-off", BOOT);

    let stopped = polite.stop(Duration::from_secs(60)).unwrap();
    assert_eq!((stopped.exit, stopped.forced), (VmExit::Code(0), false), "console:\n{}", console(&*polite));
    assert!(console(&*polite).contains("reboot: Restarting system"));

    let stopped = stubborn.stop(Duration::from_secs(3)).unwrap();
    assert_eq!((stopped.exit, stopped.forced), (VmExit::Signal(libc::SIGKILL), true));
    assert_eq!(stubborn.state().unwrap(), VmState::Exited(VmExit::Signal(libc::SIGKILL)));
}

#[test]
fn killed_vmms_are_reported_exited_with_the_signal() {
    let dir = tempfile::tempdir().unwrap();
    let backend = backend();
    let a = KillOnDrop::new(backend.create(&spec("killed", &dir.path().join("a"), "sleep 100000")).unwrap());
    a.start().unwrap();
    assert_eq!(a.kill().unwrap(), VmExit::Signal(libc::SIGKILL));
    assert_eq!(a.state().unwrap(), VmState::Exited(VmExit::Signal(libc::SIGKILL)));

    // Killed behind our back (kill -9 by someone else): the monitor still recorded it.
    let b = KillOnDrop::new(backend.create(&spec("shot", &dir.path().join("b"), "sleep 100000")).unwrap());
    b.start().unwrap();
    // SAFETY: a plain kill(2) of the VMM we just created.
    assert_eq!(unsafe { libc::kill(b.record().process.vmm.pid, libc::SIGKILL) }, 0);
    assert_eq!(wait_exit(&*b, Duration::from_secs(10)), VmExit::Signal(libc::SIGKILL));
    assert_eq!(b.state().unwrap(), VmState::Exited(VmExit::Signal(libc::SIGKILL)));
    let err = b.pause().unwrap_err().to_string();
    assert!(err.contains("killed by signal 9 (SIGKILL)"), "{err}");
    // A later process attaching from the record learns the same.
    let again = attach(VmRecord::load(&dir.path().join("b")).unwrap()).unwrap();
    assert_eq!(again.state().unwrap(), VmState::Exited(VmExit::Signal(libc::SIGKILL)));
}

/// Run only by `run_creator_process`: creates and starts a ticking VM, then this process exits.
#[test]
#[ignore = "helper: runs in a child process of a_vm_outlives_its_creator_and_another_process_controls_it"]
fn creator_process() {
    let Some(dir) = std::env::var_os(CREATOR_ENV) else { return };
    let dir = std::path::PathBuf::from(dir);
    let guest = "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.1; done";
    let vm = backend().create(&spec("outlives", &dir, guest)).unwrap();
    vm.start().unwrap();
    wait_for_line(&*vm, "tick-1", BOOT);
}

#[test]
fn a_vm_outlives_its_creator_and_another_process_controls_it() {
    let dir = tempfile::tempdir().unwrap();
    run_creator_process(dir.path());
    let record = VmRecord::load(dir.path()).unwrap();
    assert_ne!(record.process.vmm.pid, std::process::id() as i32);
    let vm = KillOnDrop::new(attach(record).unwrap());
    assert_eq!(vm.state().unwrap(), VmState::Running, "console:\n{}", console(&*vm));
    vm.pause().unwrap();
    let paused_at = assert_frozen(&*vm, "tick-");
    vm.resume().unwrap();
    assert!(
        kiln_test_utils::wait_until(Duration::from_secs(30), || count_lines(&*vm, "tick-") > paused_at + 2)
    );
    // Dropping a handle leaves the VM alone; a third handle still controls it.
    drop(vm.release());
    let third = KillOnDrop::new(attach(VmRecord::load(dir.path()).unwrap()).unwrap());
    assert_eq!(third.state().unwrap(), VmState::Running);
    let stopped = third.stop(Duration::from_secs(60)).unwrap();
    assert_eq!((stopped.exit, stopped.forced), (VmExit::Code(0), false));
}
