//! On the host's own /dev/kvm (no lab): kiln-vmm process start → vCPU 0's first `KVM_RUN`.
//!
//! The host KVM may be PVM, where Linux cannot boot, so the guest is the purpose-built PVH test
//! guest of kiln-vmm's tests (`crates/kiln-vmm/tests/guests/{common,pvh}.S`), assembled and linked
//! here the way `kiln_test_utils::assemble_elf` does. It prints a few letters, writes the boot
//! timer and resets through the i8042, so kiln-vmm exits 0 right away.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

const COMMON_S: &str = include_str!("../../kiln-vmm/tests/guests/common.S");
const PVH_S: &str = include_str!("../../kiln-vmm/tests/guests/pvh.S");

/// One host run.
#[derive(Debug, Clone, Copy)]
pub struct HostRun {
    /// CLOCK_MONOTONIC just before spawn → `first KVM_RUN at monotonic_ns=X`, µs.
    pub first_run_us: f64,
    /// kiln-vmm's own figure ("Y us after VMM start", from its `main`).
    pub first_run_self_us: Option<f64>,
    /// spawn → exit, µs.
    pub wall_us: f64,
}

/// Why the host part was skipped, if it was.
pub fn unavailable() -> Option<String> {
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm is missing on this host".into());
    }
    None
}

fn monotonic_ns() -> Result<u64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec that outlives the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        bail!("clock_gettime(CLOCK_MONOTONIC): {}", std::io::Error::last_os_error());
    }
    let s = u64::try_from(ts.tv_sec).context("negative tv_sec")?;
    let ns = u64::try_from(ts.tv_nsec).context("negative tv_nsec")?;
    Ok(s * 1_000_000_000 + ns)
}

/// Assembles and links the PVH test guest into `dir`; returns the ELF's path.
fn build_guest(dir: &Path) -> Result<PathBuf> {
    let src = dir.join("guest.S");
    let obj = dir.join("guest.o");
    let elf = dir.join("pvh.elf");
    let script = dir.join("guest.ld");
    std::fs::write(&src, format!("{COMMON_S}\n{PVH_S}"))
        .with_context(|| format!("writing {}", src.display()))?;
    std::fs::write(
        &script,
        "ENTRY(_start)\nSECTIONS {\n  . = 0x100000;\n  .text : { *(.text) }\n  .note.Xen : { *(.note.Xen) }\n}\n",
    )
    .with_context(|| format!("writing {}", script.display()))?;
    let st = Command::new("as")
        .args(["--64", "-o"])
        .arg(&obj)
        .arg(&src)
        .status()
        .context("running `as` (binutils; scripts/install-deps installs it)")?;
    if !st.success() {
        bail!("assembling the PVH test guest failed ({st})");
    }
    let st = Command::new("ld")
        .args(["-m", "elf_x86_64", "-static", "-nostdlib", "--build-id=none", "-T"])
        .arg(&script)
        .arg("-o")
        .arg(&elf)
        .arg(&obj)
        .status()
        .context("running `ld` (binutils)")?;
    if !st.success() {
        bail!("linking the PVH test guest failed ({st})");
    }
    Ok(elf)
}

/// Extracts `X` and `Y` from `vCPU 0 first KVM_RUN at monotonic_ns=X (Y us after VMM start)`.
pub fn parse_first_run(log: &str) -> Option<(u64, Option<u64>)> {
    let line = log.lines().find(|l| l.contains("first KVM_RUN at monotonic_ns="))?;
    let rest = line.split("monotonic_ns=").nth(1)?;
    let ns = rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
    let us = rest.split('(').nth(1).and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok());
    Some((ns, us))
}

/// Runs kiln-vmm `runs` times on the host and measures each start → first KVM_RUN.
pub fn run(kiln_vmm: &Path, runs: usize) -> Result<Vec<HostRun>> {
    let dir = tempfile::tempdir().context("creating a temp dir")?;
    let elf = build_guest(dir.path())?;
    let cfg = serde_json::json!({
        "boot-source": { "kernel_image_path": elf, "boot_args": "" },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": 16 },
        "entropy": {}
    });
    let cfg_path = dir.path().join("vm.json");
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg)?).context("writing vm.json")?;
    let mut out = Vec::with_capacity(runs);
    for i in 0..runs {
        let mut cmd = Command::new(kiln_vmm);
        cmd.args(["--no-api", "--no-stdin", "--allow-pvm", "--config-file"])
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let t0 = monotonic_ns()?;
        let o = cmd.output().with_context(|| format!("running {}", kiln_vmm.display()))?;
        let t1 = monotonic_ns()?;
        let log = String::from_utf8_lossy(&o.stderr);
        let console = String::from_utf8_lossy(&o.stdout);
        if !o.status.success() {
            bail!(
                "host run {}: kiln-vmm exited with {}\n--- stderr\n{log}\n--- console\n{console}",
                i + 1,
                o.status
            );
        }
        let Some((at_ns, self_us)) = parse_first_run(&log) else {
            bail!("host run {}: no `first KVM_RUN at monotonic_ns=` line in kiln-vmm's log:\n{log}", i + 1);
        };
        if at_ns < t0 {
            bail!("host run {}: first KVM_RUN at {at_ns} ns is before the spawn at {t0} ns", i + 1);
        }
        #[allow(clippy::cast_precision_loss)]
        out.push(HostRun {
            first_run_us: (at_ns - t0) as f64 / 1000.0,
            first_run_self_us: self_us.map(|u| u as f64),
            wall_us: t1.saturating_sub(t0) as f64 / 1000.0,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_first_run_line() {
        let log = "2026-11-25T02:00:00Z  INFO vCPU 0 first KVM_RUN at monotonic_ns=123456789 (1500 us after VMM start)\n";
        assert_eq!(parse_first_run(log), Some((123_456_789, Some(1500))));
        assert_eq!(parse_first_run("nothing"), None);
    }
}
