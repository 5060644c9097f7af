//! kiln-vmm on this host's own /dev/kvm (PVM here, hardware elsewhere), with small purpose-built
//! guests assembled from `tests/guests/*.S`: VM, vCPU and memory setup, both x86_64 entry
//! protocols, boot structures, PIO/MMIO dispatch to the serial port, boot timer, virtio-mmio and
//! i8042, unmapped accesses, and a hostile guest. Skips loudly only when /dev/kvm is absent.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use kiln_test_utils::{assemble_elf, require_kvm};

const COMMON: &str = include_str!("guests/common.S");

fn guest(dir: &Path, name: &str, source: &str) -> std::path::PathBuf {
    let out = dir.join(name);
    assemble_elf(&format!("{COMMON}\n{source}"), 0x10_0000, &out);
    out
}

fn run_vmm(dir: &Path, config: serde_json::Value) -> Output {
    let cfg = dir.join("vm.json");
    std::fs::write(&cfg, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    Command::new(env!("CARGO_BIN_EXE_kiln-vmm"))
        .args(["--no-api", "--no-stdin", "--allow-pvm", "--config-file"])
        .arg(&cfg)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

/// Runs the VMM and asserts the guest ended it cleanly (exit 0) after printing `marker`.
fn run_expecting(dir: &Path, config: serde_json::Value, marker: &str) -> Output {
    let o = run_vmm(dir, config);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains(marker), "no {marker:?}: {}", describe(&o));
    o
}

fn describe(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn pvh_entry_boot_structures_and_device_dispatch() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest(dir.path(), "pvh.elf", include_str!("guests/pvh.S"));
    let o = run_expecting(
        dir.path(),
        serde_json::json!({
            "boot-source": {"kernel_image_path": kernel, "boot_args": "kiln-test"},
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 64},
            "entropy": {}
        }),
        "pvh:MTVFU\n",
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("Guest-boot-time = "), "boot timer did not log: {}", describe(&o));
    assert!(stderr.contains("via Pvh"), "{}", describe(&o));
}

#[test]
fn linux_64bit_boot_protocol_zero_page_and_cmdline() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest(dir.path(), "lm.elf", include_str!("guests/linux64.S"));
    let o = run_expecting(
        dir.path(),
        serde_json::json!({
            "boot-source": {"kernel_image_path": kernel, "boot_args": "kiln-test console=ttyS0"},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}
        }),
        "lm:ZC\n",
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("via Linux64"), "{}", describe(&o));
}

#[test]
fn hostile_guest_cannot_take_the_vmm_down() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest(dir.path(), "hostile.elf", include_str!("guests/hostile.S"));
    // Give it a drive too, so a block device sits behind the second window.
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    run_expecting(
        dir.path(),
        serde_json::json!({
            "boot-source": {"kernel_image_path": kernel},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
            "entropy": {},
            "drives": [{"drive_id": "d", "path_on_host": disk, "is_root_device": false, "is_read_only": false}]
        }),
        "hostile:ok\n",
    );
    assert_eq!(std::fs::read(&disk).unwrap(), vec![0u8; 1 << 20], "the disk must be untouched");
}

#[test]
fn memory_sizes_across_the_mmio_gap_boot() {
    require_kvm!();
    // 3.5 GiB straddles the MMIO gap at 3 GiB: RAM is split in two KVM slots and the guest still runs.
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest(dir.path(), "lm.elf", include_str!("guests/linux64.S"));
    run_expecting(
        dir.path(),
        serde_json::json!({
            "boot-source": {"kernel_image_path": kernel, "boot_args": "kiln"},
            "machine-config": {"vcpu_count": 4, "mem_size_mib": 3584}
        }),
        "lm:ZC\n",
    );
}

#[test]
fn thirty_two_vcpus_and_serial_output_to_a_file() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest(dir.path(), "pvh.elf", include_str!("guests/pvh.S"));
    let cfg = dir.path().join("vm.json");
    let console = dir.path().join("console.log");
    std::fs::write(
        &cfg,
        serde_json::to_vec(&serde_json::json!({
            "boot-source": {"kernel_image_path": kernel},
            "machine-config": {"vcpu_count": 32, "mem_size_mib": 64},
            "entropy": {}
        }))
        .unwrap(),
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_kiln-vmm"))
        .args(["--no-api", "--no-stdin", "--allow-pvm", "--serial-out"])
        .arg(&console)
        .arg("--config-file")
        .arg(&cfg)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("32 vCPUs"), "{}", describe(&o));
    assert!(o.stdout.is_empty(), "console output belongs in the file: {}", describe(&o));
    assert!(std::fs::read_to_string(&console).unwrap().contains("pvh:MTVFU\n"));
}

#[test]
fn a_triple_fault_ends_the_vm_and_logs_where_the_guest_was() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest(dir.path(), "tf.elf", include_str!("guests/triple_fault.S"));
    // Like Firecracker, a guest-initiated reset (a triple fault is one) ends the VMM with 0; the
    // log says it was a shutdown and where the guest was.
    let o = run_expecting(
        dir.path(),
        serde_json::json!({
            "boot-source": {"kernel_image_path": kernel},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 32}
        }),
        "T\n",
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains("KVM_EXIT_SHUTDOWN; guest state:"))
        .unwrap_or_else(|| panic!("no register dump: {}", describe(&o)));
    assert!(line.contains("rax=0x7a11"), "{line}");
    let rip = line.split("rip=0x").nth(1).and_then(|r| r.split(' ').next()).unwrap();
    let rip = u64::from_str_radix(rip, 16).unwrap();
    assert!((0x10_0000..0x10_1000).contains(&rip), "rip {rip:#x} is not in the guest's code: {line}");
}

#[test]
fn metrics_from_the_config_file_are_flushed_when_the_vm_ends() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest(dir.path(), "pvh.elf", include_str!("guests/pvh.S"));
    let metrics = dir.path().join("metrics.json");
    run_expecting(
        dir.path(),
        serde_json::json!({
            "boot-source": {"kernel_image_path": kernel},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
            "entropy": {},
            "metrics": {"metrics_path": metrics},
            "logger": {"level": "Warning"}
        }),
        "pvh:MTVFU\n",
    );
    // The guest ended the VM long before the first periodic flush: this is the final one.
    let text = std::fs::read_to_string(&metrics).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    let m: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("not a counter: {v}"));
    // "pvh:MTVFU\n" is 10 bytes on the console, each an `out` to COM1.
    assert_eq!(n(&m["uart"]["write_count"]), 10, "{}", m["uart"]);
    assert!(n(&m["vcpu"]["exit_io_out"]) >= 10, "{}", m["vcpu"]);
    assert!(n(&m["vcpu"]["exit_mmio_read"]) > 0, "the guest probed virtio-mmio: {}", m["vcpu"]);
    assert!(n(&m["i8042"]["reset_count"]) >= 1, "the guest reset through the i8042: {}", m["i8042"]);
    assert_eq!(n(&m["vcpu"]["failures"]), 0);
}
