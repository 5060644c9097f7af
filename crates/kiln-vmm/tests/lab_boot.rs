//! kiln-vmm boots real Linux on a real (nested, hardware-style) KVM: the lab (docs/testing.md).
//! One lab boot carries kiln-vmm and the guest assets and runs two microVMs:
//!
//! - ELF vmlinux via PVH, 4 vCPUs, 256 MiB, an ext4 root on virtio-blk (a host file the lab sees as
//!   /dev/vda), a read-only second drive, virtio-rng. The guest counts its CPUs and memory, writes a
//!   file the host then reads out of the image, fails to write the read-only drive, reads the hwrng,
//!   reads the drive's serial (device ID), and reboots: kiln-vmm exits 0.
//! - bzImage + initramfs, 1 vCPU, 128 MiB: same checks of CPU and memory, reboot, exit 0.
//! - the same without a command: the guest's shell reads what is typed into kiln-vmm's stdin.
//!
//! Lab tests need only QEMU, so they always run.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kiln_test_utils::{guest_assets, LAB_RETRY_ON_SILENT_RESET};

const BOOT_ARGS: &str =
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// The checks the PVH guest runs, put into its root image (the kernel hands init at most 32
/// arguments, so a long command does not fit on the command line).
const PVH_GUEST_SCRIPT: &str = r#"echo cpus=$(grep -c ^processor /proc/cpuinfo)
grep MemTotal /proc/meminfo
echo written-by-guest > /guest-file
sync
echo junk | dd of=/dev/vdb bs=512 count=1 conv=notrunc,fsync 2>/dev/null
echo ro-write=$?
echo rng=$(head -c 16 /dev/hwrng | od -An -tx1 | tr -d ' \n')
echo vda-serial=$(cat /sys/block/vda/serial)
echo vdb-ro=$(cat /sys/block/vdb/ro)
"#;

const BZ_GUEST_CMD: &str = "echo cpus=$(grep -c ^processor /proc/cpuinfo); grep MemTotal /proc/meminfo";

fn mem_total_kib(out: &str) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in guest output:\n{out}"))
}

use kiln_test_utils::key_value as value;

fn sha(path: &Path) -> String {
    let o = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&o.stdout).split_whitespace().next().unwrap_or_default().to_string()
}

#[test]
fn kiln_vmm_boots_linux_in_the_lab() {
    let assets = guest_assets();
    let dir = tempfile::tempdir().unwrap();
    // Each VM gets its own copy; the cached images stay pristine.
    let root = dir.path().join("root.ext4");
    let scratch = dir.path().join("scratch.ext4");
    std::fs::copy(&assets.rootfs, &root).unwrap();
    std::fs::copy(&assets.scratch, &scratch).unwrap();
    let scratch_before = sha(&scratch);
    let script = dir.path().join("check.sh");
    std::fs::write(&script, PVH_GUEST_SCRIPT).unwrap();
    let o = Command::new("debugfs")
        .arg("-w")
        .arg("-R")
        .arg(format!("write {} /check.sh", script.display()))
        .arg(&root)
        .output()
        .unwrap();
    assert!(o.status.success(), "debugfs write: {}", String::from_utf8_lossy(&o.stderr));

    let pvh = serde_json::json!({
        "boot-source": {
            "kernel_image_path": "/lab/vmlinux",
            "boot_args": format!("{BOOT_ARGS} -- sh /check.sh")
        },
        "drives": [
            {"drive_id": "rootfs", "path_on_host": "/dev/vda", "is_root_device": true,
             "is_read_only": false, "cache_type": "Writeback"},
            {"drive_id": "scratch", "path_on_host": "/dev/vdb", "is_root_device": false, "is_read_only": true}
        ],
        "machine-config": {"vcpu_count": 4, "mem_size_mib": 256},
        "entropy": {}
    });
    let bz = serde_json::json!({
        "boot-source": {
            "kernel_image_path": "/lab/bzImage",
            "initrd_path": "/lab/initramfs.cpio.gz",
            "boot_args": format!("{BOOT_ARGS} -- {BZ_GUEST_CMD}")
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}
    });

    let interactive = serde_json::json!({
        "boot-source": {
            "kernel_image_path": "/lab/bzImage",
            "initrd_path": "/lab/initramfs.cpio.gz",
            "boot_args": BOOT_ARGS
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}
    });

    // Each VM runs under the lab's retry-once-on-a-silent-reset wrapper (kiln_test_utils docs).
    let vmm = "/lab/retry-on-silent-reset kiln-vmm --no-api --no-stdin --config-file";
    let report = kiln_lab::Lab::new()
        .unwrap()
        .binary(env!("CARGO_BIN_EXE_kiln-vmm"), "/usr/bin/kiln-vmm")
        .file(&assets.vmlinux, "/lab/vmlinux")
        .file(&assets.bzimage, "/lab/bzImage")
        .file(&assets.initramfs, "/lab/initramfs.cpio.gz")
        .file_bytes(serde_json::to_vec(&pvh).unwrap(), "/lab/pvh.json", 0o644)
        .file_bytes(serde_json::to_vec(&bz).unwrap(), "/lab/bz.json", 0o644)
        .file_bytes(serde_json::to_vec(&interactive).unwrap(), "/lab/interactive.json", 0o644)
        .file_bytes(LAB_RETRY_ON_SILENT_RESET.as_bytes().to_vec(), "/lab/retry-on-silent-reset", 0o755)
        .disk(&root)
        .disk(&scratch)
        .timeout(Duration::from_secs(900))
        .step("pvh", &format!("{vmm} /lab/pvh.json"))
        .step("bzimage", &format!("{vmm} /lab/bz.json"))
        // Typed input, more than the UART's 64-byte FIFO, reaches the guest's shell in order. The
        // shell discards what was typed before it set up its terminal, so the line (command and
        // `exit`) is typed once a second until the shell runs it and the VM ends.
        .step(
            "stdin",
            "/lab/retry-on-silent-reset sh -c \"(for i in \\$(seq 1 60); do \
             printf 'echo typed-\\$((6*7))-%s; exit\\\\n' \\$(seq -s - 1 40) || break; sleep 1; done) \
             | kiln-vmm --no-api --config-file /lab/interactive.json\"",
        )
        .run()
        .unwrap();

    // ELF vmlinux through PVH, 4 vCPUs, 256 MiB, ext4 root, read-only drive, rng, device ID.
    let s = report.step("pvh").unwrap();
    let (out, err) = (s.stdout_str(), s.stderr_str());
    let ctx = format!("--- stdout\n{out}\n--- stderr\n{err}");
    assert_eq!(s.exit_code, 0, "guest reboot must end kiln-vmm with 0\n{ctx}");
    assert!(err.contains("via Pvh"), "{ctx}");
    assert!(err.contains("Guest-boot-time = "), "boot timer not written\n{ctx}");
    assert!(out.contains("KILN-GUEST-READY") && out.contains("KILN-GUEST-EXIT 0"), "{ctx}");
    assert!(out.contains("reboot: Restarting system"), "{ctx}");
    assert_eq!(value(&out, "cpus"), "4", "{ctx}");
    let mem = mem_total_kib(&out);
    assert!((200 * 1024..=256 * 1024).contains(&mem), "MemTotal {mem} kB for a 256 MiB VM\n{ctx}");
    assert_ne!(value(&out, "ro-write"), "0", "a write to the read-only drive succeeded\n{ctx}");
    assert_eq!(value(&out, "vdb-ro"), "1", "{ctx}");
    let rng = value(&out, "rng");
    assert_eq!(rng.len(), 32, "16 bytes from /dev/hwrng expected\n{ctx}");
    assert_ne!(rng, "0".repeat(32), "{ctx}");
    assert_eq!(value(&out, "vda-serial"), "rootfs", "GET_ID must report the drive id\n{ctx}");

    // The host reads back what the guest wrote, from the image file itself.
    let o = Command::new("debugfs").args(["-R", "cat /guest-file"]).arg(&root).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "written-by-guest",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(sha(&scratch), scratch_before, "the read-only drive changed");

    // bzImage + initramfs, 1 vCPU, 128 MiB.
    let s = report.step("bzimage").unwrap();
    let (out, err) = (s.stdout_str(), s.stderr_str());
    let ctx = format!("--- stdout\n{out}\n--- stderr\n{err}");
    assert_eq!(s.exit_code, 0, "{ctx}");
    assert!(err.contains("BzImage kernel via Linux64"), "{ctx}");
    assert_eq!(value(&out, "cpus"), "1", "{ctx}");
    let mem = mem_total_kib(&out);
    assert!((90 * 1024..=128 * 1024).contains(&mem), "MemTotal {mem} kB for a 128 MiB VM\n{ctx}");
    assert!(out.contains("KILN-GUEST-EXIT 0"), "{ctx}");

    // Serial input: the shell ran what was typed (the echo of the command line shows the literal
    // `$((6*7))`; only the shell's output has 42) and exited, and the guest rebooted.
    let s = report.step("stdin").unwrap();
    let (out, err) = (s.stdout_str(), s.stderr_str());
    let ctx = format!("--- stdout\n{out}\n--- stderr\n{err}");
    assert_eq!(s.exit_code, 0, "{ctx}");
    let expected = format!("typed-42-{}", (1..=40).map(|i| i.to_string()).collect::<Vec<_>>().join("-"));
    assert!(out.lines().any(|l| l.trim() == expected), "{ctx}");
}
