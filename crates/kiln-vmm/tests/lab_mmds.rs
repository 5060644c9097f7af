//! MMDS with a real Linux guest on real (nested) KVM, in the lab: the host configures MMDS V2 on
//! a virtio-net interface (a tap the test makes inside the lab VM) and PUTs metadata; the guest
//! routes 169.254.169.254 to eth0, is refused without a token, gets one with a hand-written
//! `PUT /latest/api/token` over busybox `nc`, and reads a key, a listing and the whole tree back.
//! The host then PATCHes the store while the guest runs and the guest sees the change. MMDS
//! frames never reach the tap.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use kiln_test_utils::{guest_assets, rootfs_with_file};
use serde_json::{json, Value};

fn guest_script() -> String {
    r#"M=169.254.169.254
ip route add $M dev eth0
# http METHOD PATH [HEADER...]: one request over TCP with busybox nc; prints the raw answer.
http() {
  m=$1; p=$2; shift 2
  { printf '%s %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n' "$m" "$p" "$M"
    for h in "$@"; do printf '%s\r\n' "$h"; done
    printf '\r\n'; } | timeout 5 nc $M 80
}
body() { tr -d '\r' | sed '1,/^$/d'; }
status() { head -n 1 | tr -d '\r'; }
echo "notoken=$(http GET /latest/meta-data/instance-id | status)"
echo "badtoken=$(http GET /latest/meta-data/instance-id 'X-metadata-token: forged' | status)"
TOKEN=$(http PUT /latest/api/token 'X-metadata-token-ttl-seconds: 300' | body)
T="X-metadata-token: $TOKEN"
echo "token-len=${#TOKEN}"
echo "key=$(http GET /latest/meta-data/instance-id "$T" | body)"
echo "list=$(http GET /latest/meta-data/ "$T" | body | tr '\n' ',')"
echo "tree=$(http GET / "$T" 'Accept: application/json' | body)"
echo "missing=$(http GET /latest/nope "$T" | status)"
n=0
until [ "$(http GET /latest/patched "$T" | body)" = "yes" ]; do
  n=$((n+1)); [ $n -gt 30 ] && break; sleep 0.3
done
echo "patched=$(http GET /latest/patched "$T" | body)"
echo "patched-tree=$(http GET / "$T" 'Accept: application/json' | body)"
sync
reboot -f
"#
    .to_string()
}

/// What the host PUTs.
fn metadata() -> Value {
    json!({
        "latest": {
            "meta-data": {"instance-id": "i-kiln-lab", "local-ipv4": "169.254.100.2"},
            "user-data": "hello from the host"
        }
    })
}

fn lab_script() -> String {
    let data = metadata().to_string();
    format!(
        r#"
set -u
/usr/sbin/ip tuntap add tap0 mode tap && /usr/sbin/ip addr add 169.254.100.1/30 dev tap0 && /usr/sbin/ip link set tap0 up || exit 5
kiln-vmm --level Debug --api-sock /tmp/fc.sock --no-stdin >/tmp/console 2>/tmp/vmm.log &
VMM=$!
# Whatever happens, the VM ends within 300 s and the console is shown.
( sleep 300; echo "guard: killing kiln-vmm" >&2; kill -9 $VMM ) >/dev/null &
GUARD=$!
# The guest's console, live, on stderr (the test prints it as it comes).
tail -f /tmp/console >&2 &
TAIL=$!
finish() {{ kill $GUARD $VMM $TAIL 2>/dev/null; echo "--- console"; cat /tmp/console; echo "--- vmm log"; cat /tmp/vmm.log; exit $1; }}
api() {{ curl -sS --unix-socket /tmp/fc.sock -X "$1" "http://localhost$2" ${{3:+-H 'Content-Type: application/json' -d "$3"}} -w " http=%{{http_code}}\n"; }}
wait_for() {{ n=0; until grep -q "$1" /tmp/console; do n=$((n+1)); [ $n -gt 900 ] && {{ echo "timeout waiting for $1"; return 1; }}; kill -0 $VMM 2>/dev/null || return 1; sleep 0.2; done; }}
n=0; until [ -S /tmp/fc.sock ]; do n=$((n+1)); [ $n -gt 100 ] && finish 9; sleep 0.05; done
IP="ip=169.254.100.2::169.254.100.1:255.255.255.252::eth0:off"
ARGS="console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd $IP -- sh /guest.sh"
echo "boot-source: $(api PUT /boot-source "{{\"kernel_image_path\": \"/lab/vmlinux\", \"boot_args\": \"$ARGS\"}}")"
echo "rootfs: $(api PUT /drives/rootfs '{{"drive_id": "rootfs", "path_on_host": "/dev/vda", "is_root_device": true, "is_read_only": false}}')"
echo "net: $(api PUT /network-interfaces/eth0 '{{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:a9:fe:64:02"}}')"
echo "mmds-config: $(api PUT /mmds/config '{{"network_interfaces": ["eth0"], "version": "V2"}}')"
echo "mmds-put: $(api PUT /mmds '{data}')"
echo "machine-config: $(api PUT /machine-config '{{"vcpu_count": 1, "mem_size_mib": 128}}')"
echo "tap-rx-before=$(cat /sys/class/net/tap0/statistics/rx_packets)"
echo "start: $(api PUT /actions '{{"action_type": "InstanceStart"}}')"
wait_for "tree=" || finish 3
echo "mmds-patch: $(api PATCH /mmds '{{"latest": {{"patched": "yes"}}}}')"
echo "host-get: $(api GET /mmds)"
wait_for "patched-tree=" || finish 4
echo "tap-rx-after=$(cat /sys/class/net/tap0/statistics/rx_packets)"
# The guest reboots itself now; kiln-vmm must exit 0. If it does not, say where it hangs.
n=0; while kill -0 $VMM 2>/dev/null && [ $n -lt 150 ]; do n=$((n+1)); sleep 0.2; done
if kill -0 $VMM 2>/dev/null; then
  echo "vmm-stuck"
  for t in /proc/$VMM/task/*; do
    echo "task $(cat $t/comm) state=$(cut -d' ' -f3 $t/stat) wchan=$(cat $t/wchan)"; head -n 12 $t/stack
  done
  tail -n 30 /tmp/vmm.log
  kill -9 $VMM
fi
wait $VMM; echo "vmm-exit=$?"
/usr/sbin/ip link del tap0
finish 0
"#
    )
}

fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix} line in:\n{out}"))
}

#[test]
fn the_guest_reads_back_what_the_host_put_over_mmds_v2() {
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
        .timeout(Duration::from_secs(500))
        .step("mmds", &lab_script())
        .run_with(kiln_lab::echo_output)
        .unwrap();
    let s = report.step("mmds").unwrap();
    let out = s.stdout_str();
    let ctx = format!("--- stdout\n{out}\n--- stderr\n{}", s.stderr_str());
    assert_eq!(s.exit_code, 0, "{ctx}");
    for step in
        ["boot-source", "rootfs", "net", "mmds-config", "mmds-put", "machine-config", "start", "mmds-patch"]
    {
        assert!(line(&out, &format!("{step}: ")).ends_with("http=204"), "{step} not 204\n{ctx}");
    }
    // V2: no token, or a forged one, is refused.
    assert_eq!(line(&out, "notoken="), "HTTP/1.1 401 Unauthorized", "{ctx}");
    assert_eq!(line(&out, "badtoken="), "HTTP/1.1 401 Unauthorized", "{ctx}");
    assert!(line(&out, "token-len=").parse::<usize>().unwrap() > 20, "{ctx}");
    // With the token: a key as IMDS text, a listing, and the whole tree as JSON, exactly as PUT.
    assert_eq!(line(&out, "key="), "i-kiln-lab", "{ctx}");
    assert_eq!(line(&out, "list="), "instance-id,local-ipv4", "{ctx}");
    let tree: Value = serde_json::from_str(line(&out, "tree=")).unwrap_or_else(|e| panic!("{e}\n{ctx}"));
    assert_eq!(tree, metadata(), "the guest read back something else than the host PUT\n{ctx}");
    assert_eq!(line(&out, "missing="), "HTTP/1.1 404 Not Found", "{ctx}");
    // A PATCH while the guest runs is visible to it, merged into the rest.
    assert_eq!(line(&out, "patched="), "yes", "{ctx}");
    let mut expected = metadata();
    expected["latest"]["patched"] = json!("yes");
    let patched: Value =
        serde_json::from_str(line(&out, "patched-tree=")).unwrap_or_else(|e| panic!("{e}\n{ctx}"));
    assert_eq!(patched, expected, "{ctx}");
    assert!(line(&out, "host-get: ").starts_with(&expected.to_string()), "{ctx}");
    // The exchange took dozens of frames; none went to the tap.
    let before: u64 = line(&out, "tap-rx-before=").parse().unwrap();
    let after: u64 = line(&out, "tap-rx-after=").parse().unwrap();
    assert!(after - before <= 2, "{} frames reached the tap during the MMDS exchange\n{ctx}", after - before);
    assert_eq!(line(&out, "vmm-exit="), "0", "{ctx}");
}
