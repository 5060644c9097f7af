//! `kiln` with its default backend, kiln-vmm, on real (nested) KVM in the lab: import an image and a
//! kernel, `run --rm` (output and exit codes), `run -d` → `exec` → `stop` → `rm`. The lab carries the
//! kiln and kiln-vmm binaries, the static agent and the e2fsprogs/ssh-keygen tools kiln calls.
//! Lab tests need only QEMU, so they always run.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use kiln_test_utils::oci::{busybox_layers, OciLayout};
use kiln_test_utils::{echo_lab_retries, guest_assets, static_agent, workspace_bin};
use serde_json::json;

const LAB_SCRIPT: &str = r#"
set -u
export KILN_ROOT=/tmp/kiln KILN_AGENT_BIN=/usr/bin/kiln-agent-static KILN_NETWORK=none
kiln image import /lab/oci --name busybox:1; echo "import-exit=$?"
kiln kernel import /lab/vmlinux --name guest; echo "kernel-exit=$?"
kiln info
# The lab's emulated nesting occasionally freezes a guest mid-boot (docs/testing.md). A kiln run
# whose guest never answered is run once more, loudly: its first stderr goes out as lab-retry:
# lines. CLEANUP is run between the two (a named VM is kept after a failed start).
retry_frozen() {
  err=$(mktemp)
  "$@" 2>"$err"; rc=$?
  if [ "$rc" = 125 ] && grep -q "cannot reach the agent" "$err"; then
    sed 's/^/lab-retry: /' "$err" >&2
    echo "lab-retry: the guest never answered; running once more: $*" >&2
    [ -n "${CLEANUP:-}" ] && sh -c "$CLEANUP"
    "$@" 2>"$err"; rc=$?
  fi
  cat "$err" >&2; rm -f "$err"
  return "$rc"
}
out=$(retry_frozen kiln run --rm busybox:1 echo hi); echo "run-exit=$?"; echo "run-out=$out"
retry_frozen kiln run --rm busybox:1 sh -c 'exit 3'; echo "code-exit=$?"
CLEANUP="kiln rm -f keep" retry_frozen kiln run -d --name keep busybox:1 sleep 3600; echo "detach-exit=$?"
echo "exec-out=$(kiln exec keep sh -c 'echo kept > /root/f; cat /root/f; hostname' | tr '\n' ' ')"
kiln ps
kiln stop -t 5 keep; echo "stop-exit=$?"
echo "ps-after-stop=$(kiln ps -a --format json | grep -c '"status": "exited"')"
kiln rm keep; echo "rm-exit=$?"
echo "vm-dirs-left=$(ls /tmp/kiln/vms | wc -l)"
echo "vmm-left=$(for p in /proc/[0-9]*; do [ "$(cat $p/comm 2>/dev/null)" = kiln-vmm ] && echo x; done | wc -l)"
"#;

use kiln_test_utils::key_value as value;

#[test]
fn kiln_runs_execs_stops_and_removes_vms_on_kiln_vmm_in_the_lab() {
    let assets = guest_assets();
    let dir = tempfile::tempdir().unwrap();
    let mut layout = OciLayout::create(&dir.path().join("oci"));
    layout.add_image(&busybox_layers(), true, json!({"Cmd": ["sh"], "Env": ["PATH=/bin"]}), "busybox:1");

    let report = kiln_lab::Lab::new()
        .unwrap()
        .kiln_cli(env!("CARGO_BIN_EXE_kiln"), workspace_bin("kiln-vmm", "kiln-vmm"), static_agent())
        .file(&assets.vmlinux, "/lab/vmlinux")
        .dir(&layout.dir, "/lab/oci")
        .memory_mib(1024)
        .timeout(Duration::from_secs(600))
        .step("kiln", LAB_SCRIPT)
        .run()
        .unwrap();
    let s = report.step("kiln").unwrap();
    let out = s.stdout_str();
    let ctx = format!("--- stdout\n{out}\n--- stderr\n{}", s.stderr_str());
    echo_lab_retries(&s.stderr_str());
    assert_eq!(value(&out, "import-exit"), "0", "{ctx}");
    assert_eq!(value(&out, "kernel-exit"), "0", "{ctx}");
    assert_eq!(value(&out, "run-exit"), "0", "{ctx}");
    assert_eq!(value(&out, "run-out"), "hi", "{ctx}");
    assert_eq!(value(&out, "code-exit"), "3", "{ctx}");
    assert_eq!(value(&out, "detach-exit"), "0", "{ctx}");
    assert_eq!(value(&out, "exec-out"), "kept keep", "{ctx}");
    assert_eq!(value(&out, "stop-exit"), "0", "{ctx}");
    assert_eq!(value(&out, "ps-after-stop"), "1", "{ctx}");
    assert_eq!(value(&out, "rm-exit"), "0", "{ctx}");
    assert_eq!(value(&out, "vm-dirs-left"), "0", "{ctx}");
    assert_eq!(value(&out, "vmm-left"), "0", "{ctx}");
}
