//! The in-lab part of the boot benchmark: one lab run in which every VMM boots the same kernel,
//! initramfs and command line N times, interleaved (A B A B …), each boot wrapped by
//! `kiln-bench probe` (see `probe.rs`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::probe::ProbeResult;

/// A VMM under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Vmm {
    Kiln,
    Qemu,
    Firecracker,
}

impl Vmm {
    /// Short name used in step names.
    pub fn key(self) -> &'static str {
        match self {
            Vmm::Kiln => "kiln",
            Vmm::Qemu => "qemu",
            Vmm::Firecracker => "fc",
        }
    }

    /// Name for humans.
    pub fn label(self) -> &'static str {
        match self {
            Vmm::Kiln => "kiln-vmm",
            Vmm::Qemu => "QEMU microvm",
            Vmm::Firecracker => "Firecracker",
        }
    }
}

/// Boot runs run `true`; memory runs keep the guest up with `sleep` while smaps is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Kind {
    Boot,
    Mem,
}

/// Guest assets (from `scripts/guest-assets`).
#[derive(Debug, Clone)]
pub struct Assets {
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
}

/// What the lab part runs.
#[derive(Debug, Clone)]
pub struct LabPlan {
    pub kiln_vmm: PathBuf,
    pub firecracker: Option<PathBuf>,
    pub qemu: PathBuf,
    pub assets: Assets,
    pub runs: usize,
    pub mem_runs: usize,
    pub vcpus: u32,
    pub mem_mib: u64,
    /// Extra kernel parameters (before ` -- `), for every VMM.
    pub kernel_args: Vec<String>,
    /// How long the memory runs' guest sleeps, and when smaps is sampled after the marker.
    pub mem_sleep_secs: u32,
    pub mem_sample_after: Duration,
    /// Per-boot limit (the probe kills the VMM after it).
    pub boot_timeout: Duration,
}

/// The guest's marker line (guest/init/init prints it right after the boot-timer write).
pub const MARKER: &str = "KILN-GUEST-READY";

const KERNEL_ARGS: &str =
    "console=ttyS0 panic=1 pci=off acpi=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

impl LabPlan {
    /// The VMMs, in the order each round runs them.
    pub fn vmms(&self) -> Vec<Vmm> {
        let mut v = vec![Vmm::Kiln, Vmm::Qemu];
        if self.firecracker.is_some() {
            v.push(Vmm::Firecracker);
        }
        v
    }

    /// The kernel command line for `vmm`: identical for all but `reboot=` (QEMU microvm has no i8042:
    /// it resets by triple fault, which `-no-reboot` turns into QEMU exiting).
    pub fn cmdline(&self, vmm: Vmm, kind: Kind) -> String {
        let reboot = if vmm == Vmm::Qemu { "reboot=t" } else { "reboot=k" };
        let mut s = format!("{KERNEL_ARGS} {reboot}");
        for a in &self.kernel_args {
            s.push(' ');
            s.push_str(a);
        }
        s.push_str(" -- ");
        s.push_str(&self.guest_command(kind));
        s
    }

    pub fn guest_command(&self, kind: Kind) -> String {
        match kind {
            Kind::Boot => "true".into(),
            Kind::Mem => format!("sleep {}", self.mem_sleep_secs),
        }
    }

    /// Firecracker-format config for kiln-vmm and Firecracker.
    fn fc_config(&self, vmm: Vmm, kind: Kind) -> Vec<u8> {
        let cfg = serde_json::json!({
            "boot-source": {
                "kernel_image_path": "/lab/vmlinux",
                "initrd_path": "/lab/initramfs.cpio.gz",
                "boot_args": self.cmdline(vmm, kind),
            },
            "drives": [],
            "machine-config": { "vcpu_count": self.vcpus, "mem_size_mib": self.mem_mib, "smt": false },
        });
        cfg.to_string().into_bytes()
    }

    fn config_path(vmm: Vmm, kind: Kind) -> String {
        format!("/lab/{}-{}.json", vmm.key(), kind_key(kind))
    }

    /// The VMM's command line inside the lab.
    pub fn vmm_command(&self, vmm: Vmm, kind: Kind) -> Vec<String> {
        let s = |x: &str| x.to_string();
        match vmm {
            Vmm::Kiln => vec![
                s("/usr/bin/kiln-vmm"),
                s("--no-api"),
                s("--no-stdin"),
                s("--config-file"),
                Self::config_path(vmm, kind),
            ],
            Vmm::Firecracker => vec![
                s("/usr/bin/firecracker"),
                s("--no-api"),
                s("--boot-timer"),
                s("--config-file"),
                Self::config_path(vmm, kind),
            ],
            Vmm::Qemu => qemu_microvm_command(
                "microvm,pit=on,acpi=off,auto-kernel-cmdline=off",
                self.mem_mib,
                self.vcpus,
                &[],
                self.cmdline(vmm, kind),
            ),
        }
    }

    /// The lab step that runs one boot of `vmm` under the probe.
    fn step_command(&self, vmm: Vmm, kind: Kind) -> String {
        let mut words = vec![
            "/usr/bin/kiln-bench".to_string(),
            "probe".into(),
            "--marker".into(),
            MARKER.into(),
            "--guest-mem-mib".into(),
            self.mem_mib.to_string(),
            "--timeout-secs".into(),
            self.boot_timeout.as_secs().to_string(),
        ];
        if kind == Kind::Mem {
            words.push("--mem-sample-after-ms".into());
            words.push(self.mem_sample_after.as_millis().to_string());
        }
        words.push("--".into());
        words.extend(self.vmm_command(vmm, kind));
        words.iter().map(|w| sh_quote(w)).collect::<Vec<_>>().join(" ")
    }

    /// Step names and commands, interleaved: round i runs every VMM's boot, then every VMM's
    /// memory run. The VMM order rotates by one each round (A B, B A, … ; A B C, B C A, …) so no VMM
    /// always goes first (a lab-state or position effect then hits all alike).
    pub fn steps(&self) -> Vec<(String, Vmm, Kind, String)> {
        let mut out = Vec::new();
        let vmms = self.vmms();
        for i in 1..=self.runs.max(self.mem_runs) {
            let mut order = vmms.clone();
            order.rotate_left((i - 1) % vmms.len().max(1));
            for (kind, n) in [(Kind::Boot, self.runs), (Kind::Mem, self.mem_runs)] {
                if i > n {
                    continue;
                }
                for &vmm in &order {
                    let name = format!("{}-{}-{i}", vmm.key(), kind_key(kind));
                    out.push((name, vmm, kind, self.step_command(vmm, kind)));
                }
            }
        }
        out
    }

    /// Boots the lab and runs every step.
    pub fn run(&self, bench_exe: &Path) -> Result<LabOutcome> {
        let steps = self.steps();
        let mut lab = kiln_lab::Lab::new()
            .context("preparing the lab")?
            .binary(bench_exe, "/usr/bin/kiln-bench")
            .binary(&self.kiln_vmm, "/usr/bin/kiln-vmm")
            .binary(&self.qemu, "/usr/bin/qemu-system-x86_64")
            .dir("/usr/share/qemu", "/usr/share/qemu")
            .dir("/usr/share/seabios", "/usr/share/seabios")
            .file(&self.assets.vmlinux, "/lab/vmlinux")
            .file(&self.assets.initramfs, "/lab/initramfs.cpio.gz");
        if let Some(fc) = &self.firecracker {
            lab = lab.binary(fc, "/usr/bin/firecracker");
        }
        for vmm in self.vmms() {
            if vmm == Vmm::Qemu {
                continue;
            }
            for kind in [Kind::Boot, Kind::Mem] {
                lab = lab.file_bytes(self.fc_config(vmm, kind), &Self::config_path(vmm, kind), 0o644);
            }
        }
        for (name, _, _, cmd) in &steps {
            lab = lab.step(name, cmd);
        }
        let per_step = self.boot_timeout + Duration::from_secs(30);
        let steps_u32 = u32::try_from(steps.len()).unwrap_or(u32::MAX);
        lab = lab.timeout(Duration::from_secs(300) + per_step.saturating_mul(steps_u32));
        let report = lab.run_with(echo_live_output).context("running the lab")?;

        let mut runs = Vec::new();
        for (name, vmm, kind, _) in &steps {
            let outcome = match report.step(name) {
                Err(e) => Err(format!("{e}")),
                Ok(s) => match serde_json::from_str::<ProbeResult>(s.stdout_str().trim()) {
                    Ok(p) => Ok(p),
                    Err(e) => Err(format!(
                        "probe output unreadable ({e}); step exit {}\n--- stdout\n{}\n--- stderr\n{}",
                        s.exit_code,
                        s.stdout_str(),
                        s.stderr_str()
                    )),
                },
            };
            runs.push(LabRun { name: name.clone(), vmm: *vmm, kind: *kind, outcome });
        }
        Ok(LabOutcome { runs, lab_boot: report.lab_boot_time, total: report.total_time })
    }
}

fn kind_key(kind: Kind) -> &'static str {
    match kind {
        Kind::Boot => "boot",
        Kind::Mem => "mem",
    }
}

/// QEMU `-M <machine>` (accel kvm, `-cpu host`) booting the lab's `/lab/vmlinux` and
/// `/lab/initramfs.cpio.gz` with `append`, the console on stdio, `devices` (extra arguments) added;
/// the one QEMU command line every benchmark uses.
pub fn qemu_microvm_command(
    machine: &str,
    mem_mib: u64,
    vcpus: u32,
    devices: &[&str],
    append: String,
) -> Vec<String> {
    let mut cmd: Vec<String> = [
        "/usr/bin/qemu-system-x86_64",
        "-M",
        machine,
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        &mem_mib.to_string(),
        "-smp",
        &vcpus.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
    ]
    .iter()
    .map(|w| w.to_string())
    .collect();
    cmd.extend(devices.iter().map(|w| w.to_string()));
    for w in ["-kernel", "/lab/vmlinux", "-initrd", "/lab/initramfs.cpio.gz", "-append"] {
        cmd.push(w.to_string());
    }
    cmd.push(append);
    cmd
}

/// Shows the lab's progress on stderr as it happens (step starts, their stderr), so a run that
/// stalls shows where; the results on stdout stay clean.
pub fn echo_live_output(event: kiln_lab::LabEvent<'_>) {
    match event {
        kiln_lab::LabEvent::StepStarted { name } => eprintln!("lab: step {name}"),
        kiln_lab::LabEvent::Output { stream: kiln_lab::OutputStream::Stderr, data, .. } => {
            eprint!("{}", String::from_utf8_lossy(data))
        }
        _ => {}
    }
}

/// Single-quotes `s` for /bin/sh when it holds anything but plain characters.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=,:@%+".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// One boot in the lab.
#[derive(Debug, Clone)]
pub struct LabRun {
    pub name: String,
    pub vmm: Vmm,
    pub kind: Kind,
    pub outcome: Result<ProbeResult, String>,
}

/// All boots of one lab run.
#[derive(Debug, Clone)]
pub struct LabOutcome {
    pub runs: Vec<LabRun>,
    pub lab_boot: Duration,
    pub total: Duration,
}

impl LabRun {
    /// Why this run does not count, if it does not.
    pub fn problem(&self) -> Option<String> {
        let p = match &self.outcome {
            Err(e) => return Some(e.clone()),
            Ok(p) => p,
        };
        let ctx =
            || format!("\n--- console tail\n{}\n--- VMM stderr tail\n{}", p.console_tail, p.stderr_tail);
        if p.timed_out {
            let last =
                p.console_tail.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or("(nothing)");
            return Some(format!(
                "timed out after {:.0} s and killed; the console's last line: `{last}`{}",
                p.wall_us as f64 / 1e6,
                ctx()
            ));
        }
        if p.exit_code != Some(0) {
            return Some(format!("VMM exited with {:?}{}", p.exit_code, ctx()));
        }
        if p.marker_us.is_none() {
            return Some(format!("no {MARKER} line on the console{}", ctx()));
        }
        if self.kind == Kind::Boot && !p.console_tail.contains("KILN-GUEST-EXIT 0") {
            return Some(format!("the guest command did not report KILN-GUEST-EXIT 0{}", ctx()));
        }
        if self.kind == Kind::Mem && p.mem.is_none() {
            return Some(format!(
                "no memory sample: {}; mappings {:?}",
                p.mem_error.as_deref().unwrap_or("?"),
                p.top_mappings
            ));
        }
        None
    }
}

/// `Guest-boot-time = N us …` → N.
pub fn parse_boot_timer_us(log: &str) -> Option<u64> {
    let rest = log.split("Guest-boot-time =").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// `(Y us after VMM start)` of kiln-vmm's first-KVM_RUN line → Y.
pub fn parse_first_run_after_start_us(log: &str) -> Option<u64> {
    crate::host::parse_first_run(log).and_then(|(_, us)| us)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> LabPlan {
        LabPlan {
            kiln_vmm: "/k".into(),
            firecracker: None,
            qemu: "/q".into(),
            assets: Assets { vmlinux: "/v".into(), initramfs: "/i".into() },
            runs: 2,
            mem_runs: 1,
            vcpus: 1,
            mem_mib: 128,
            kernel_args: vec![],
            mem_sleep_secs: 2,
            mem_sample_after: Duration::from_millis(500),
            boot_timeout: Duration::from_secs(100),
        }
    }

    #[test]
    fn steps_interleave() {
        let names: Vec<String> = plan().steps().into_iter().map(|s| s.0).collect();
        assert_eq!(
            names,
            ["kiln-boot-1", "qemu-boot-1", "kiln-mem-1", "qemu-mem-1", "qemu-boot-2", "kiln-boot-2"]
        );
    }

    #[test]
    fn cmdlines_differ_only_in_reboot() {
        let p = plan();
        let k = p.cmdline(Vmm::Kiln, Kind::Boot);
        let q = p.cmdline(Vmm::Qemu, Kind::Boot);
        assert_eq!(k.replace("reboot=k", "reboot=t"), q);
        assert!(k.ends_with(" -- true"));
        assert!(p.cmdline(Vmm::Kiln, Kind::Mem).ends_with(" -- sleep 2"));
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("abc-1"), "abc-1");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn parses_logs() {
        assert_eq!(
            parse_boot_timer_us("x Guest-boot-time =  12345 us 12 ms, 99 CPU us 0 CPU ms"),
            Some(12345)
        );
        assert_eq!(parse_boot_timer_us("none"), None);
    }
}
