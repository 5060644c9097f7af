//! virtio-vsock with a real Linux guest on real (nested) KVM, in the lab, with Firecracker's host
//! side: the guest connects to host port 5000 and the VMM connects that to `<uds_path>_5000`; the
//! host connects to `uds_path`, says `CONNECT 6000`, gets `OK <port>` and talks to the guest's
//! listener. Echoes checked both ways. Each side then streams 1 MiB (many credit windows)
//! and checks it comes back intact. `tests/guests/vsock-probe.c` is both ends (built static here).
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use kiln_test_utils::guest_assets;

const GUEST_SCRIPT: &str = r#"timeout 60 /vsock-probe connect 2 5000 hello-from-guest > /g2h.out
echo "g2h-exit=$?"
sed 's/^/g2h: /' /g2h.out
timeout 60 /vsock-probe listen 6000
echo "h2g-served=$?"
"#;

const LAB_SCRIPT: &str = r#"
vsock-probe uds-serve /tmp/v.sock_5000 >/tmp/uds-serve.out 2>&1 &
serve=$!
# The console goes to a file (not through `tee`) so it cannot interleave with this script's lines.
timeout 200 kiln-vmm --no-api --no-stdin --level debug --config-file /lab/vm.json >/tmp/console 2>/tmp/vmm.log &
n=0; until grep -q vsock-listening /tmp/console; do n=$((n+1)); [ $n -gt 600 ] && { echo "timeout"; break; }; sleep 0.2; done
echo "h2g-out: $(timeout 60 vsock-probe uds-connect /tmp/v.sock 6000 hello-from-host 2>&1 | tr '\n' ' ')"
# The guest reboots once its listener is done; kiln-vmm must then exit by itself. Poll rather than
# `wait`: a step only ends when every process in it has, so anything still alive is reported and killed.
n=0; while pidof kiln-vmm >/dev/null && [ $n -lt 150 ]; do n=$((n+1)); sleep 0.2; done
if pid=$(pidof kiln-vmm); then
  echo "vmm-still-running"
  for t in /proc/$pid/task/*; do echo "thread $(cat $t/comm) state=$(cut -d' ' -f3 $t/stat) wchan=$(cat $t/wchan)"; done
  kill -9 $pid
fi
kill -0 $serve 2>/dev/null && { kill -9 $serve; echo "uds-serve-still-running"; }
echo "vmm-exit=$(grep -c 'VM stopped: guest reset' /tmp/vmm.log)"
echo "--- console"; grep -v '^\[' /tmp/console
echo "--- uds-serve"; cat /tmp/uds-serve.out
echo "--- vmm log"; tail -20 /tmp/vmm.log
"#;

use kiln_test_utils::line_starting as line;

#[test]
fn vsock_both_ways_with_a_linux_guest_in_the_lab() {
    let assets = guest_assets();
    let dir = tempfile::tempdir().unwrap();
    let probe = dir.path().join("vsock-probe");
    let o = Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(&probe)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/guests/vsock-probe.c"))
        .output()
        .unwrap();
    assert!(o.status.success(), "gcc: {}", String::from_utf8_lossy(&o.stderr));
    let root = kiln_test_utils::rootfs_with_file(dir.path(), "guest.sh", GUEST_SCRIPT);
    // debugfs writes files without the execute bit; `sif` sets it.
    let cmds = format!("write {} /vsock-probe\nsif /vsock-probe mode 0100755\n", probe.display());
    std::fs::write(dir.path().join("probe.cmds"), cmds).unwrap();
    let o = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(dir.path().join("probe.cmds"))
        .arg(&root)
        .output()
        .unwrap();
    assert!(o.status.success(), "debugfs: {}", String::from_utf8_lossy(&o.stderr));

    let vm = serde_json::json!({
        "boot-source": {
            "kernel_image_path": "/lab/vmlinux",
            "boot_args": "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd -- sh /guest.sh"
        },
        "drives": [{"drive_id": "rootfs", "path_on_host": "/dev/vda", "is_root_device": true, "is_read_only": false}],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "vsock": {"guest_cid": 3, "uds_path": "/tmp/v.sock"}
    });
    let report = kiln_lab::Lab::new()
        .unwrap()
        .binary(env!("CARGO_BIN_EXE_kiln-vmm"), "/usr/bin/kiln-vmm")
        .file_bytes(std::fs::read(&probe).unwrap(), "/usr/bin/vsock-probe", 0o755)
        .file(&assets.vmlinux, "/lab/vmlinux")
        .file_bytes(serde_json::to_vec(&vm).unwrap(), "/lab/vm.json", 0o644)
        .disk(&root)
        .timeout(Duration::from_secs(300))
        .step("vsock", LAB_SCRIPT)
        .run_with(kiln_lab::echo_output)
        .unwrap();
    let s = report.step("vsock").unwrap();
    let out = s.stdout_str();
    let ctx = format!("--- stdout\n{out}\n--- stderr\n{}", s.stderr_str());
    assert_eq!(s.exit_code, 0, "{ctx}");
    // Guest-initiated: the VMM connected port 5000 to <uds_path>_5000, whose server echoed.
    assert_eq!(line(&out, "g2h-exit="), "g2h-exit=0", "{ctx}");
    assert!(out.lines().any(|l| l == "g2h: echo:hello-from-guest"), "{ctx}");
    assert!(out.lines().any(|l| l == "g2h: bulk=1048576"), "1 MiB echoed guest->host->guest\n{ctx}");
    // Host-initiated: CONNECT 6000 -> OK <port>, then the guest's listener echoed.
    let h2g = line(&out, "h2g-out: ");
    assert!(h2g.contains("OK ") && h2g.contains("echo:hello-from-host"), "{ctx}");
    assert!(h2g.contains("bulk=1048576"), "1 MiB echoed host->guest->host\n{ctx}");
    assert_eq!(line(&out, "h2g-served="), "h2g-served=0", "{ctx}");
    assert_eq!(line(&out, "vmm-exit="), "vmm-exit=1", "the guest's reboot must end kiln-vmm\n{ctx}");
    assert!(!out.contains("vmm-still-running"), "kiln-vmm must exit after the guest's reboot\n{ctx}");
    assert!(!out.contains("uds-serve-still-running"), "the guest's connection must have been closed\n{ctx}");
}
