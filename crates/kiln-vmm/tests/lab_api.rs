//! kiln-vmm's Firecracker API with a real Linux guest on real (nested) KVM, in the lab: configure
//! over curl, start, read the serial console, pause (a guest counter stops) and resume (it goes on),
//! swap a drive's backing file (the guest reads the new content and size), Ctrl-Alt-Del (or, if the
//! guest did not react within 10 s, a swap to an image saying STOP) makes the guest reboot: kiln-vmm
//! exits 0.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use kiln_test_utils::{guest_assets, rootfs_with_file};

/// Runs in the guest (injected into its root image): a tick counter with the first bytes and size of
/// the data drive, read past the page cache.
const GUEST_LOOP: &str = r#"i=0
while true; do
  i=$((i+1))
  d=$(dd if=/dev/vdb bs=512 count=1 iflag=direct 2>/dev/null | head -c 11)
  echo "tick=$i data=$d size=$(cat /sys/block/vdb/size)"
  case "$d" in STOP*) sync; reboot -f ;; esac
  sleep 0.2
done
"#;

/// Runs in the lab: drives kiln-vmm over its socket with curl, like Firecracker's getting-started guide.
const LAB_SCRIPT: &str = r#"
set -u
kiln-vmm --api-sock /tmp/fc.sock --no-stdin >/tmp/console 2>/tmp/vmm.log &
VMM=$!
api() { curl -sS --unix-socket /tmp/fc.sock -X "$1" "http://localhost$2" ${3:+-H 'Content-Type: application/json' -d "$3"} -w " http=%{http_code}\n"; }
wait_for() { n=0; until grep -q "$1" /tmp/console; do n=$((n+1)); [ $n -gt 300 ] && { echo "timeout waiting for $1"; return 1; }; sleep 0.2; done; }
n=0; until [ -S /tmp/fc.sock ]; do n=$((n+1)); [ $n -gt 100 ] && exit 9; sleep 0.05; done
ARGS="console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd -- sh /guest-loop.sh"
echo "boot-source: $(api PUT /boot-source "{\"kernel_image_path\": \"/lab/vmlinux\", \"boot_args\": \"$ARGS\"}")"
echo "rootfs: $(api PUT /drives/rootfs '{"drive_id": "rootfs", "path_on_host": "/dev/vda", "is_root_device": true, "is_read_only": false}')"
echo "data: $(api PUT /drives/data '{"drive_id": "data", "path_on_host": "/dev/vdb", "is_root_device": false, "is_read_only": true}')"
echo "machine-config: $(api PUT /machine-config '{"vcpu_count": 2, "mem_size_mib": 256}')"
echo "start: $(api PUT /actions '{"action_type": "InstanceStart"}')"
wait_for "tick=3 " || exit 3
echo "pause: $(api PATCH /vm '{"state": "Paused"}')"
echo "info-paused: $(api GET /)"
sleep 0.5; a=$(grep -c tick= /tmp/console); sleep 2; b=$(grep -c tick= /tmp/console)
echo "paused-ticks=$a,$b"
echo "resume: $(api PATCH /vm '{"state": "Resumed"}')"
sleep 2; c=$(grep -c tick= /tmp/console)
echo "resumed-ticks=$c"
echo "swap: $(api PATCH /drives/data '{"drive_id": "data", "path_on_host": "/dev/vdc"}')"
wait_for "data=CONTENT-TWO" || exit 4
grep "data=CONTENT-TWO" /tmp/console | tail -n 1
echo "config: $(api GET /vm/config)"
echo "cad: $(api PUT /actions '{"action_type": "SendCtrlAltDel"}')"
# Ctrl-Alt-Del restarts this guest (its init leaves the kernel's immediate C_A_D reboot on); if
# the VM is still up after 10 s, swapping the data drive to an image saying STOP makes it reboot.
n=0; while kill -0 $VMM 2>/dev/null && [ $n -lt 50 ]; do n=$((n+1)); sleep 0.2; done
if kill -0 $VMM 2>/dev/null; then
  echo "ended-by=stop-image $(api PATCH /drives/data '{"drive_id": "data", "path_on_host": "/dev/vdd"}')"
else
  echo "ended-by=ctrl-alt-del"
fi
wait $VMM; echo "vmm-exit=$?"
echo "--- console"; cat /tmp/console; echo "--- vmm log"; cat /tmp/vmm.log
"#;

use kiln_test_utils::line_starting as line;

#[test]
fn api_drives_a_linux_guest_in_the_lab() {
    let assets = guest_assets();
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs_with_file(dir.path(), "guest-loop.sh", GUEST_LOOP);
    let data1 = dir.path().join("data1.img");
    let data2 = dir.path().join("data2.img");
    let mut one = b"CONTENT-ONE".to_vec();
    one.resize(1 << 20, 0);
    let mut two = b"CONTENT-TWO".to_vec();
    two.resize(2 << 20, 0);
    std::fs::write(&data1, one).unwrap();
    std::fs::write(&data2, two).unwrap();
    let stop = dir.path().join("stop.img");
    let mut s = b"STOP-NOW...".to_vec();
    s.resize(1 << 20, 0);
    std::fs::write(&stop, s).unwrap();

    let report = kiln_lab::Lab::new()
        .unwrap()
        .binary(env!("CARGO_BIN_EXE_kiln-vmm"), "/usr/bin/kiln-vmm")
        .binary("/usr/bin/curl", "/usr/bin/curl")
        .file(&assets.vmlinux, "/lab/vmlinux")
        .disk(&root)
        .disk(&data1)
        .disk(&data2)
        .disk(&stop)
        .timeout(Duration::from_secs(600))
        .step("api", LAB_SCRIPT)
        .run()
        .unwrap();
    let s = report.step("api").unwrap();
    let out = s.stdout_str();
    let ctx = format!("--- stdout\n{out}\n--- stderr\n{}", s.stderr_str());
    assert_eq!(s.exit_code, 0, "{ctx}");
    for step in ["boot-source", "rootfs", "data", "machine-config", "start", "pause", "resume", "swap", "cad"]
    {
        assert!(line(&out, &format!("{step}: ")).ends_with("http=204"), "{step} not 204\n{ctx}");
    }
    assert!(line(&out, "info-paused: ").contains(r#""state":"Paused""#), "{ctx}");
    let (a, b) = line(&out, "paused-ticks=").trim_start_matches("paused-ticks=").split_once(',').unwrap();
    assert_eq!(a, b, "the guest ticked while paused\n{ctx}");
    let c: u32 = line(&out, "resumed-ticks=").trim_start_matches("resumed-ticks=").parse().unwrap();
    assert!(c > b.parse::<u32>().unwrap() + 2, "the guest did not resume\n{ctx}");
    // The new backing file: new content, and 2 MiB = 4096 sectors.
    assert!(
        out.lines().any(|l| l.starts_with("tick=") && l.ends_with("data=CONTENT-ONE size=2048")),
        "{ctx}"
    );
    let swapped = out.lines().find(|l| l.contains("data=CONTENT-TWO")).unwrap();
    assert!(swapped.ends_with("size=4096"), "{swapped}\n{ctx}");
    let config = line(&out, "config: ");
    assert!(config.contains("/dev/vdc") && config.ends_with("http=200"), "{ctx}");
    let ended = line(&out, "ended-by=");
    assert!(ended == "ended-by=ctrl-alt-del" || ended.ends_with("http=204"), "{ctx}");
    eprintln!("lab_api: the guest {ended}");
    assert_eq!(line(&out, "vmm-exit="), "vmm-exit=0", "{ctx}");
}
