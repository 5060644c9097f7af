//! Network and balloon devices with a real Linux guest on real (nested) KVM, in the lab. The test
//! makes its own tap inside the lab VM (which has no NIC of its own: nothing leaves it), gives the
//! guest a link-local address on it, and checks TCP data both ways with byte counts; then it
//! inflates the balloon over the API and checks the guest's memory went down, and reads the
//! balloon statistics. A second drive is rate limited to 1 MiB/s: the guest's `dd` of 3 MiB takes
//! two seconds or more. A FlushMetrics line then carries the guest's traffic (per drive, per
//! interface) and the limiter's throttling. The guest then stops when told over the network, and
//! kiln-vmm exits 0.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use kiln_test_utils::{guest_assets, rootfs_with_file};

const G2H: u64 = 1 << 20;
const H2G: u64 = 2 << 20;
/// Read by the guest from the rate-limited drive: 1 MiB of initial bucket, then 2 MiB at 1 MiB/s.
const DD_BYTES: u64 = 3 << 20;

fn guest_script() -> String {
    format!(
        r#"mem() {{ grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2; }}
echo "memtotal=$(mem)"
echo "dd-start=$(cut -d' ' -f1 /proc/uptime)"
dd if=/dev/vdb of=/dev/null bs=65536 count={dd_blocks} iflag=direct 2>/dev/null
echo "dd-end=$(cut -d' ' -f1 /proc/uptime)"
n=0; until head -c {G2H} /dev/zero | nc 169.254.100.1 5001; do n=$((n+1)); [ $n -gt 100 ] && break; sleep 0.2; done
echo g2h-sent
printf '#!/bin/sh\nhead -c {H2G} | wc -c > /h2g\n' > /recv.sh; chmod +x /recv.sh
nc -l -p 5002 -e /recv.sh
echo "h2g-bytes=$(cat /h2g)"
printf '#!/bin/sh\necho stopping\nsync\nreboot -f\n' > /stop.sh; chmod +x /stop.sh
nc -l -p 5003 -e /stop.sh &
while true; do echo "memtotal=$(mem)"; sleep 0.3; done
"#,
        dd_blocks = DD_BYTES / 65536
    )
}

fn lab_script() -> String {
    format!(
        r#"
set -u
/usr/sbin/ip tuntap add tap0 mode tap && /usr/sbin/ip addr add 169.254.100.1/30 dev tap0 && /usr/sbin/ip link set tap0 up || exit 5
printf '#!/bin/sh\nhead -c {G2H} | wc -c > /tmp/g2h\n' > /tmp/recv.sh; chmod +x /tmp/recv.sh
nc -l -p 5001 -e /tmp/recv.sh &
kiln-vmm --api-sock /tmp/fc.sock --no-stdin >/tmp/console 2>/tmp/vmm.log &
VMM=$!
api() {{ curl -sS --unix-socket /tmp/fc.sock -X "$1" "http://localhost$2" ${{3:+-H 'Content-Type: application/json' -d "$3"}} -w " http=%{{http_code}}\n"; }}
wait_for() {{ n=0; until grep -q "$1" /tmp/console; do n=$((n+1)); [ $n -gt 300 ] && {{ echo "timeout waiting for $1"; return 1; }}; sleep 0.2; done; }}
n=0; until [ -S /tmp/fc.sock ]; do n=$((n+1)); [ $n -gt 100 ] && exit 9; sleep 0.05; done
IP="ip=169.254.100.2::169.254.100.1:255.255.255.252::eth0:off"
ARGS="console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd $IP -- sh /guest.sh"
echo "boot-source: $(api PUT /boot-source "{{\"kernel_image_path\": \"/lab/vmlinux\", \"boot_args\": \"$ARGS\"}}")"
echo "rootfs: $(api PUT /drives/rootfs '{{"drive_id": "rootfs", "path_on_host": "/dev/vda", "is_root_device": true, "is_read_only": false}}')"
head -c 4194304 /dev/zero > /tmp/data.img
echo "data: $(api PUT /drives/data '{{"drive_id": "data", "path_on_host": "/tmp/data.img", "is_root_device": false, "is_read_only": true, "rate_limiter": {{"bandwidth": {{"size": 1048576, "refill_time": 1000}}}}}}')"
echo "metrics: $(api PUT /metrics '{{"metrics_path": "/tmp/metrics.json"}}')"
echo "net: $(api PUT /network-interfaces/eth0 '{{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:a9:fe:64:02"}}')"
echo "machine-config: $(api PUT /machine-config '{{"vcpu_count": 1, "mem_size_mib": 256}}')"
echo "balloon: $(api PUT /balloon '{{"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1}}')"
echo "start: $(api PUT /actions '{{"action_type": "InstanceStart"}}')"
wait_for g2h-sent || exit 3
n=0; until [ -s /tmp/g2h ]; do n=$((n+1)); [ $n -gt 50 ] && break; sleep 0.1; done
echo "g2h=$(cat /tmp/g2h)"
n=0; until head -c {H2G} /dev/zero | nc 169.254.100.2 5002; do n=$((n+1)); [ $n -gt 100 ] && break; sleep 0.2; done
wait_for "h2g-bytes=" || exit 4
sleep 1
echo "before-$(grep -o 'memtotal=[0-9]*' /tmp/console | tail -n 1)"
echo "inflate: $(api PATCH /balloon '{{"amount_mib": 64}}')"
sleep 5
echo "after-$(grep -o 'memtotal=[0-9]*' /tmp/console | tail -n 1)"
echo "balloon-config: $(api GET /balloon)"
echo "stats: $(api GET /balloon/statistics)"
echo "flush: $(api PUT /actions '{{"action_type": "FlushMetrics"}}')"
echo "metrics-line: $(tail -n 1 /tmp/metrics.json)"
# The guest stops itself when told over the network (it reboots: kiln-vmm exits 0).
# (the guest vanishes without closing the connection, so bound nc's wait; its listener is up by now)
timeout 5 sh -c 'echo stop | nc 169.254.100.2 5003'; true
wait $VMM; echo "vmm-exit=$?"
/usr/sbin/ip link del tap0
echo "--- console"; cat /tmp/console; echo "--- vmm log"; cat /tmp/vmm.log
"#
    )
}

use kiln_test_utils::line_starting as line;

fn number(out: &str, prefix: &str) -> u64 {
    line(out, prefix).trim_start_matches(prefix).trim().parse().unwrap_or_else(|_| panic!("{prefix}: {out}"))
}

#[test]
fn network_and_balloon_with_a_linux_guest_in_the_lab() {
    let assets = guest_assets();
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs_with_file(dir.path(), "guest.sh", &guest_script());

    let report = kiln_lab::Lab::new()
        .unwrap()
        .binary(env!("CARGO_BIN_EXE_kiln-vmm"), "/usr/bin/kiln-vmm")
        .binary("/usr/bin/curl", "/usr/bin/curl")
        .binary("/usr/sbin/ip", "/usr/sbin/ip")
        .file(&assets.vmlinux, "/lab/vmlinux")
        .disk(&root)
        .timeout(Duration::from_secs(600))
        .step("devices", &lab_script())
        .run()
        .unwrap();
    let s = report.step("devices").unwrap();
    let out = s.stdout_str();
    let ctx = format!("--- stdout\n{out}\n--- stderr\n{}", s.stderr_str());
    assert_eq!(s.exit_code, 0, "{ctx}");
    for step in [
        "boot-source",
        "rootfs",
        "data",
        "metrics",
        "net",
        "machine-config",
        "balloon",
        "start",
        "inflate",
        "flush",
    ] {
        assert!(line(&out, &format!("{step}: ")).ends_with("http=204"), "{step} not 204\n{ctx}");
    }
    // TCP both ways over virtio-net and the tap, byte counts checked at the receivers.
    assert_eq!(number(&out, "g2h="), G2H, "guest -> host\n{ctx}");
    assert_eq!(number(&out, "h2g-bytes="), H2G, "host -> guest\n{ctx}");
    // Inflating 64 MiB takes it out of the guest (without deflate_on_oom, from MemTotal).
    let before = number(&out, "before-memtotal=");
    let after = number(&out, "after-memtotal=");
    assert!(before >= after + 60 * 1024, "MemTotal {before} kB -> {after} kB after a 64 MiB inflate\n{ctx}");
    assert!(line(&out, "balloon-config: ").contains(r#""amount_mib":64"#), "{ctx}");
    let stats = line(&out, "stats: ");
    assert!(stats.ends_with("http=200") && stats.contains(r#""target_mib":64"#), "{ctx}");
    assert!(stats.contains("free_memory"), "the guest reported no statistics\n{ctx}");
    assert_eq!(line(&out, "vmm-exit="), "vmm-exit=0", "{ctx}");

    // The rate-limited drive: 3 MiB at 1 MiB/s after a full 1 MiB bucket takes two seconds or more.
    let uptime = |prefix: &str| -> f64 {
        let l = line(&out, prefix);
        l.trim_start_matches(prefix).trim().parse().unwrap_or_else(|_| panic!("{l}\n{ctx}"))
    };
    let dd_secs = uptime("dd-end=") - uptime("dd-start=");
    assert!(dd_secs >= 1.8, "3 MiB read in {dd_secs:.2} s through a 1 MiB/s limit\n{ctx}");
    // The metrics line says what the guest did, per device, with Firecracker's names.
    let m: serde_json::Value =
        serde_json::from_str(line(&out, "metrics-line: ").trim_start_matches("metrics-line: ")).unwrap();
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("not a counter: {v}\n{ctx}"));
    eprintln!(
        "rate-limited dd: {} bytes in {dd_secs:.2} s, throttled {} times",
        m["block_data"]["read_bytes"], m["block_data"]["rate_limiter_throttled_events"]
    );
    assert!(n(&m["block_data"]["read_bytes"]) >= DD_BYTES, "{}", m["block_data"]);
    assert!(n(&m["block_data"]["rate_limiter_throttled_events"]) > 0, "{}", m["block_data"]);
    assert!(n(&m["block"]["read_bytes"]) > n(&m["block_data"]["read_bytes"]), "rootfs reads are summed in");
    assert!(n(&m["net_eth0"]["tx_bytes_count"]) >= G2H, "{}", m["net_eth0"]);
    assert!(n(&m["net_eth0"]["rx_bytes_count"]) >= H2G, "{}", m["net_eth0"]);
    assert!(n(&m["balloon"]["inflate_count"]) > 0, "{}", m["balloon"]);
    assert!(n(&m["uart"]["write_count"]) > 0 && n(&m["vcpu"]["exit_mmio_write"]) > 0, "{m}");
}
