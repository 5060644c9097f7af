//! The QEMU transport: the static agent as PID 1 (`rdinit=`) of the busybox initramfs under QEMU
//! (TCG, microvm, no KVM needed), served over a virtio-serial port named `kiln.agent` whose host
//! side is a QEMU chardev Unix socket. The host client execs, copies, reconnects (a virtio-serial
//! port is one stream: the agent must serve the next host after the first one left), and shuts the
//! guest down: QEMU exits 0.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_agent_proto::{Client, CopyFormat, ExecRequest, ExitStatus, ShutdownAction};
use kiln_test_utils::{guest_assets, static_agent, wait_until};

fn exec(argv: &[&str]) -> ExecRequest {
    ExecRequest { argv: argv.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

#[test]
fn the_agent_serves_a_qemu_guest_over_virtio_serial() {
    let assets = guest_assets();
    let dir = tempfile::tempdir().unwrap();
    // The assets' initramfs plus a second archive with the agent and its config (the kernel
    // unpacks concatenated archives).
    let initrd = dir.path().join("initrd.cpio");
    let mut bytes = std::fs::read(&assets.initramfs).unwrap();
    // An uncompressed archive must start 4-byte aligned; the kernel skips zero padding.
    bytes.resize(bytes.len().next_multiple_of(4), 0);
    let mut extra = kiln_lab::cpio::CpioWriter::new(Vec::new());
    extra.file("sbin/kiln-agent", 0o755, &std::fs::read(static_agent()).unwrap()).unwrap();
    extra.dir("etc/kiln", 0o755).unwrap();
    extra.file("etc/kiln/agent.json", 0o644, br#"{"hostname": "kiln-qemu"}"#).unwrap();
    bytes.extend_from_slice(&extra.finish().unwrap());
    std::fs::write(&initrd, bytes).unwrap();

    let sock = dir.path().join("agent.sock");
    let console = dir.path().join("console.log");
    // microvm under TCG needs pit=on; without an i8042, reboot=t + -no-reboot ends QEMU. The
    // only virtio device sits on microvm's last transport (0xfeb00e00, IRQ 12), named on the cmdline.
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm,pit=on,acpi=off,auto-kernel-cmdline=off", "-accel", "tcg", "-cpu", "max"])
        .args(["-m", "256", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&assets.vmlinux)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(
            "console=ttyS0 reboot=t panic=1 tsc=reliable acpi=off virtio_mmio.device=512@0xfeb00e00:12 \
             rdinit=/sbin/kiln-agent KILN_AGENT_LOG=debug",
        )
        .args(["-device", "virtio-serial-device"])
        .arg("-chardev")
        .arg(format!("socket,id=agent,path={},server=on,wait=off", sock.display()))
        .args(["-device", "virtserialport,chardev=agent,name=kiln.agent"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 (scripts/install-deps installs it)");
    let console_text = || std::fs::read_to_string(&console).unwrap_or_default();
    let guard = Guard(&mut qemu);

    assert!(wait_until(Duration::from_secs(30), || sock.exists()), "QEMU did not create {sock:?}");
    // The handshake waits in the socket until the guest opens its port: allow for the boot.
    let c = Client::connect_unix(&sock, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\n--- console\n{}", console_text()));
    assert!(c.welcome().pid1);
    let out = c.exec(exec(&["uname", "-a"])).unwrap().output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("Linux kiln-qemu "), "{out:?}");
    let out =
        c.exec(exec(&["sh", "-c", "cat /sys/class/virtio-ports/*/name; exit 6"])).unwrap().output().unwrap();
    assert_eq!(out.status, ExitStatus::Code(6));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "kiln.agent\n");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    c.copy_in("/tmp/data", None, CopyFormat::File, &data[..]).unwrap();
    let mut back = Vec::new();
    c.copy_out("/tmp/data", CopyFormat::File, &mut back).unwrap();
    assert!(back == data, "copy through virtio-serial differs");
    drop(c);

    // The next host on the same port.
    let c = Client::connect_unix(&sock, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("reconnecting: {e}\n--- console\n{}", console_text()));
    c.ping(Duration::from_secs(10)).unwrap();
    c.shutdown(ShutdownAction::Poweroff, Some(Duration::from_secs(2)))
        .unwrap_or_else(|e| panic!("shutdown: {e}\n--- console\n{}", console_text()));
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = guard.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "QEMU still running after Shutdown\n--- console\n{}",
            console_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "QEMU: {status}\n--- console\n{}", console_text());
    assert!(console_text().contains("kiln-agent: rebooting"), "{}", console_text());
}

/// Kills QEMU if the test fails before it exits.
struct Guard<'a>(&'a mut std::process::Child);

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
