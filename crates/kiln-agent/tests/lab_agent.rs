//! The static kiln-agent as PID 1 of a Linux guest under kiln-vmm on real (nested) KVM, reached over
//! virtio-vsock through kiln-vmm's Firecracker-style Unix socket (`CONNECT 1024`). One lab boot,
//! two microVMs:
//!
//! 1. No main process: the host client (`kiln-agent client` inside the lab) pings, runs `uname -a`,
//!    gets an exit code and separate stderr, checks PID 1, hostname, zombie reaping, the clock,
//!    copies 1 MB in and out, then sends Shutdown: the guest reboots and kiln-vmm exits 0.
//! 2. A main process from /etc/kiln/agent.json (`exit 5` after a while): the host's WaitMain gets
//!    code 5 over vsock, the console has the `KILN-MAIN-EXIT code=5` line, the agent powers the
//!    guest off by itself and kiln-vmm exits 0.
//!
//! Lab tests need only QEMU, so they always run.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kiln_test_utils::{guest_assets, static_agent, workspace_bin};

const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp \
    i8042.dumbkbd init=/sbin/kiln-agent KILN_AGENT_LOG=debug";

/// Puts the agent at /sbin/kiln-agent and `config` at /etc/kiln/agent.json into an ext4 image.
fn inject(root: &Path, agent: &Path, config: &str, dir: &Path) {
    let cfg = dir.join(format!("{}.json", root.file_name().unwrap().to_string_lossy()));
    std::fs::write(&cfg, config).unwrap();
    let cmds = dir.join("debugfs.cmds");
    std::fs::write(
        &cmds,
        format!(
            "mkdir /etc/kiln\nwrite {} /sbin/kiln-agent\nsif /sbin/kiln-agent mode 0100755\nwrite {} /etc/kiln/agent.json\n",
            agent.display(),
            cfg.display()
        ),
    )
    .unwrap();
    let o = Command::new("debugfs").arg("-w").arg("-f").arg(&cmds).arg(root).output().unwrap();
    assert!(o.status.success(), "debugfs: {}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new("debugfs").args(["-R", "stat /sbin/kiln-agent"]).arg(root).output().unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("Mode:  0755"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

fn vm_json(disk: &str, uds: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "boot-source": {"kernel_image_path": "/lab/vmlinux", "boot_args": BOOT_ARGS},
        "drives": [{"drive_id": "rootfs", "path_on_host": disk, "is_root_device": true, "is_read_only": false}],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
        "vsock": {"guest_cid": 3, "uds_path": uds}
    }))
    .unwrap()
}

const LAB_SCRIPT: &str = r#"
set -u
wait_vmm() { n=0; while kill -0 "$1" 2>/dev/null; do n=$((n+1)); if [ $n -gt 900 ]; then kill -9 "$1"; echo "vmm-killed"; fi; sleep 0.1; done; wait "$1"; }
A="kiln-agent client --uds /tmp/v1.sock --timeout 120"
kiln-vmm --no-api --no-stdin --config-file /lab/vm1.json >/tmp/console1 2>/tmp/vmm1.log &
VMM=$!
$A ping; echo "ping-exit=$?"
$A exec -- uname -a; echo "uname-exit=$?"
$A exec -- sh -c 'echo to-stdout; echo to-stderr >&2; exit 3' 2>/tmp/stderr; echo "code-exit=$?"
echo "stderr=$(cat /tmp/stderr)"
echo "pid1=$($A exec -- cat /proc/1/comm)"
echo "hostname=$($A exec -- hostname)"
echo "mounts=$($A exec -- sh -c 'for m in /proc /sys /dev /dev/pts /dev/shm /run; do grep -q " $m " /proc/mounts && printf "%s," $m; done')"
echo "zombies=$($A exec -- sh -c '(sh -c "exit 0" &); (sleep 0.2 &); sleep 1; grep -l "^State:.*Z" /proc/[0-9]*/status 2>/dev/null | wc -l')"
$A set-time; echo "set-time-exit=$?"
echo "clock-skew=$(( $($A exec -- date +%s) - $(date +%s) ))"
head -c 1000000 /dev/urandom > /tmp/rand
$A copy-in --mode 600 /tmp/rand /root/rand; echo "copy-in-exit=$?"
echo "guest-sum=$($A exec -- md5sum /root/rand | cut -d' ' -f1)"
$A copy-out /root/rand /tmp/back; echo "copy-out-exit=$?"
echo "host-sum=$(md5sum /tmp/rand | cut -d' ' -f1) back-sum=$(md5sum /tmp/back | cut -d' ' -f1)"
$A shutdown --grace 2; echo "shutdown-exit=$?"
wait_vmm $VMM; echo "vmm1-exit=$?"

kiln-vmm --no-api --no-stdin --config-file /lab/vm2.json >/tmp/console2 2>/tmp/vmm2.log &
VMM=$!
kiln-agent client --uds /tmp/v2.sock --timeout 120 wait-main; echo "wait-main-exit=$?"
wait_vmm $VMM; echo "vmm2-exit=$?"
echo "--- console1"; cat /tmp/console1; echo "--- vmm1"; cat /tmp/vmm1.log
echo "--- console2"; cat /tmp/console2; echo "--- vmm2"; cat /tmp/vmm2.log
"#;

use kiln_test_utils::key_value as value;

#[test]
fn the_agent_serves_a_linux_guest_over_vsock_in_the_lab() {
    let assets = guest_assets();
    let agent = static_agent();
    let dir = tempfile::tempdir().unwrap();
    let root1 = dir.path().join("root1.ext4");
    let root2 = dir.path().join("root2.ext4");
    std::fs::copy(&assets.rootfs, &root1).unwrap();
    std::fs::copy(&assets.rootfs, &root2).unwrap();
    inject(&root1, agent, r#"{"hostname": "kiln-agent-lab"}"#, dir.path());
    inject(
        &root2,
        agent,
        r#"{"main": {"argv": ["/bin/sh", "-c", "echo main-says-hi; sleep 4; exit 5"]}}"#,
        dir.path(),
    );

    let report = kiln_lab::Lab::new()
        .unwrap()
        .binary(workspace_bin("kiln-vmm", "kiln-vmm"), "/usr/bin/kiln-vmm")
        .binary(agent, "/usr/bin/kiln-agent")
        .file(&assets.vmlinux, "/lab/vmlinux")
        .file_bytes(vm_json("/dev/vda", "/tmp/v1.sock"), "/lab/vm1.json", 0o644)
        .file_bytes(vm_json("/dev/vdb", "/tmp/v2.sock"), "/lab/vm2.json", 0o644)
        .disk(&root1)
        .disk(&root2)
        .timeout(Duration::from_secs(600))
        .step("agent", LAB_SCRIPT)
        .run()
        .unwrap();
    let s = report.step("agent").unwrap();
    let out = s.stdout_str();
    let ctx = format!("--- stdout\n{out}\n--- stderr\n{}", s.stderr_str());
    assert_eq!(value(&out, "ping-exit"), "0", "{ctx}");
    assert!(out.lines().any(|l| l.starts_with("Linux ") && l.contains("x86_64")), "uname -a\n{ctx}");
    assert_eq!(value(&out, "uname-exit"), "0", "{ctx}");
    assert!(out.lines().any(|l| l == "to-stdout"), "{ctx}");
    assert_eq!(value(&out, "stderr"), "to-stderr", "stderr comes back separately\n{ctx}");
    assert_eq!(value(&out, "code-exit"), "3", "the exit code travels through\n{ctx}");
    assert_eq!(value(&out, "pid1"), "kiln-agent", "{ctx}");
    assert_eq!(value(&out, "hostname"), "kiln-agent-lab", "{ctx}");
    assert_eq!(value(&out, "mounts"), "/proc,/sys,/dev,/dev/pts,/dev/shm,/run,", "{ctx}");
    assert_eq!(value(&out, "zombies"), "0", "PID 1 reaps orphans\n{ctx}");
    assert_eq!(value(&out, "set-time-exit"), "0", "{ctx}");
    let skew: i64 = value(&out, "clock-skew").parse().unwrap();
    assert!(skew.abs() <= 5, "guest clock {skew} s off the lab's after SetTime\n{ctx}");
    assert_eq!(value(&out, "copy-in-exit"), "0", "{ctx}");
    assert_eq!(value(&out, "copy-out-exit"), "0", "{ctx}");
    let sums = value(&out, "host-sum");
    let (host_sum, back_sum) = sums.split_once(" back-sum=").unwrap();
    assert_eq!(value(&out, "guest-sum"), host_sum, "copied-in content\n{ctx}");
    assert_eq!(back_sum, host_sum, "copied-out content\n{ctx}");
    assert_eq!(value(&out, "shutdown-exit"), "0", "{ctx}");
    assert_eq!(value(&out, "vmm1-exit"), "0", "Shutdown ends the VMM with 0\n{ctx}");
    assert!(!out.contains("vmm-killed"), "{ctx}");
    // The main process: exit code over vsock and on the console, then the guest goes down alone.
    assert_eq!(value(&out, "wait-main-exit"), "5", "{ctx}");
    assert_eq!(value(&out, "vmm2-exit"), "0", "{ctx}");
    let console2 = out.split("--- console2").nth(1).unwrap_or("");
    assert!(console2.contains("main-says-hi"), "main output on the console\n{ctx}");
    assert!(console2.lines().any(|l| l.trim() == "KILN-MAIN-EXIT code=5"), "{ctx}");
}
