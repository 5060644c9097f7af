//! `kiln-bench kiln`: the `kiln` CLI against the bare hypervisor it drives, each pair measured in one
//! run, interleaved:
//!
//! - **lab** (kiln-vmm on real nested KVM): `kiln run --rm busybox:1 true` (warm cache) against a bare
//!   `kiln-vmm --no-api --config-file` boot of the same kernel, the same image's root filesystem (a copy
//!   of the ext4 kiln built for it) and the same machine size, whose init is `busybox reboot -f` (the
//!   guest resets at once; no agent, no vsock, no API socket). A third series, `kiln create` + `kiln rm`
//!   (no boot), and `kiln run`'s own phase marks (`KILN_LOG=kiln::phase=debug`) break the overhead down.
//!   Density, in a lab of its own: `kiln run -d` of 128 MiB VMs, each answering `kiln exec VM true`
//!   before the next starts, until the lab's memory (or `--density-max`) is reached,
//!   all answering `kiln exec VM true`, with each kiln-vmm's RSS and PSS.
//! - **host, QEMU backend** (TCG here): `kiln run --rm --hypervisor qemu` against a bare
//!   `qemu-system-x86_64 -M microvm` boot with kiln's machine options and the same guest, init
//!   `busybox reboot -f`.
//! - **host, pull**: a cold `kiln image pull` of a 5-layer ~100 MB image from a local `docker-registry`
//!   against `skopeo copy` of the same image to a `dir:`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::lab::{echo_live_output, sh_quote};
use crate::probe::ProbeResult;
use crate::stats::{median_difference_interval, percentile, summarize, Summary};

/// The overhead target of issue 4: `kiln run --rm IMAGE true` over the bare VMM boot.
pub const OVERHEAD_TARGET_MS: f64 = 100.0;
/// The image every VM runs (built from the host's busybox by kiln-test-utils).
pub const IMAGE: &str = "busybox:1";
/// A marker the guest never prints: the probe then measures spawn -> exit only.
const NO_MARKER: &str = "KILN-BENCH-NO-MARKER";
/// Lab paths.
const LAB_ROOT: &str = "/tmp/kiln";
const LAB_BARE_DISK: &str = "/tmp/bare.ext4";
const LAB_BARE_CONFIG: &str = "/lab/bare.json";

/// kiln's kernel command line for kiln-vmm (kiln-manager's `guest::kernel_cmdline`) without `init=`.
const KILN_VMM_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 tsc=reliable pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";
/// The same for QEMU.
const QEMU_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 tsc=reliable acpi=off";
/// The bare peers' init: reset at once, as kiln's agent does after `true` (`reboot=k`).
const BARE_INIT: &str = "init=/bin/busybox -- reboot -f";

/// The series a round measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Series {
    KilnRun,
    Bare,
    CreateRm,
}

impl Series {
    pub fn key(self) -> &'static str {
        match self {
            Series::KilnRun => "kiln-run",
            Series::Bare => "bare",
            Series::CreateRm => "create-rm",
        }
    }
}

/// Everything the benchmark needs from the host.
#[derive(Debug, Clone)]
pub struct KilnPlan {
    pub kiln: PathBuf,
    pub kiln_vmm: PathBuf,
    pub agent: PathBuf,
    pub vmlinux: PathBuf,
    /// An oci-layout directory holding `busybox:1`.
    pub busybox_layout: PathBuf,
    pub runs: usize,
    pub memory_mib: u32,
    pub density_max: usize,
    pub density_memory_mib: u32,
    pub density_lab_mib: u32,
    /// The density run stops adding VMs when the lab's MemAvailable falls below this.
    pub density_reserve_mib: u64,
    pub boot_timeout: Duration,
}

/// One timed command.
#[derive(Debug, Clone, Serialize)]
pub struct Timed {
    pub series: Series,
    pub round: usize,
    pub result: std::result::Result<ProbeResult, String>,
}

impl Timed {
    pub fn ms(&self) -> Option<f64> {
        match &self.result {
            Ok(p) if p.exit_code == Some(0) && !p.timed_out => Some(p.wall_us as f64 / 1000.0),
            _ => None,
        }
    }
}

/// One VM of the density run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DensityVm {
    pub pid: u32,
    pub rss_kib: u64,
    pub pss_kib: u64,
}

/// What the density run found (`kiln-bench density`, in the lab).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DensityResult {
    pub started: usize,
    pub answered: usize,
    pub stop_reason: String,
    pub start_ms: Vec<f64>,
    pub exec_ms: Vec<f64>,
    pub vmms: Vec<DensityVm>,
    pub mem_total_kib: u64,
    pub mem_available_before_kib: u64,
    pub mem_available_after_kib: u64,
}

/// What the lab part produced.
#[derive(Debug, Serialize)]
pub struct LabPart {
    pub timed: Vec<Timed>,
    pub setup_log: String,
    pub lab_boot: Duration,
    pub total: Duration,
}

impl KilnPlan {
    fn bare_config(&self) -> Vec<u8> {
        serde_json::json!({
            "boot-source": {
                "kernel_image_path": "/lab/vmlinux",
                "boot_args": format!("{KILN_VMM_CMDLINE} {BARE_INIT}"),
            },
            "drives": [{"drive_id": "rootfs", "path_on_host": LAB_BARE_DISK,
                        "is_root_device": true, "is_read_only": false}],
            "machine-config": {"vcpu_count": 1, "mem_size_mib": self.memory_mib, "smt": false},
        })
        .to_string()
        .into_bytes()
    }

    fn probe(&self, command: &[String]) -> String {
        let mut words: Vec<String> = [
            "/usr/bin/kiln-bench",
            "probe",
            "--marker",
            NO_MARKER,
            "--timeout-secs",
            &self.boot_timeout.as_secs().to_string(),
            "--echo-stderr",
            "--",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        words.extend(command.iter().cloned());
        words.iter().map(|w| sh_quote(w)).collect::<Vec<_>>().join(" ")
    }

    fn series_command(&self, series: Series) -> String {
        let s = |x: &str| x.to_string();
        let memory = format!("{}M", self.memory_mib);
        match series {
            Series::KilnRun => {
                self.probe(&[s("kiln"), s("run"), s("--rm"), s("--memory"), memory, s(IMAGE), s("true")])
            }
            Series::Bare => self.probe(&[
                s("/usr/bin/kiln-vmm"),
                s("--no-api"),
                s("--no-stdin"),
                s("--config-file"),
                s(LAB_BARE_CONFIG),
            ]),
            Series::CreateRm => self.probe(&[
                s("sh"),
                s("-c"),
                format!("kiln create --name cr --memory {memory} {IMAGE} true >/dev/null && kiln rm cr"),
            ]),
        }
    }

    /// The interleaved rounds: the series order rotates by one each round.
    pub fn rounds(&self) -> Vec<(String, Series, usize)> {
        let all = [Series::KilnRun, Series::Bare, Series::CreateRm];
        let mut out = Vec::new();
        for round in 1..=self.runs {
            let mut order = all.to_vec();
            order.rotate_left((round - 1) % all.len());
            for s in order {
                out.push((format!("{}-{round}", s.key()), s, round));
            }
        }
        out
    }

    /// A lab carrying kiln, the image and the kernel, whose `setup` step imports both and warms the
    /// image's root filesystem cache.
    fn lab_with_setup(&self, bench_exe: &Path) -> Result<kiln_lab::Lab> {
        let setup = format!(
            "set -e\nkiln image import /lab/oci --name {IMAGE} >/dev/null\nkiln kernel import /lab/vmlinux \
             --name guest >/dev/null\nkiln run --rm --memory {m}M {IMAGE} echo warm\n\
             cache=$(find {LAB_ROOT}/images -name '*.ext4' | head -n 1)\necho \"rootfs cache: $cache\"\n\
             cp \"$cache\" {LAB_BARE_DISK}\n\
             echo \"bare boot, for reference: $(kiln-vmm --no-api --no-stdin --config-file {LAB_BARE_CONFIG} \
             | tail -n 3 | tr '\\n' ' ')\"\n",
            m = self.memory_mib
        );
        Ok(kiln_lab::Lab::new()
            .context("preparing the lab")?
            .binary(bench_exe, "/usr/bin/kiln-bench")
            .kiln_cli(&self.kiln, &self.kiln_vmm, &self.agent)
            .file(&self.vmlinux, "/lab/vmlinux")
            .dir(&self.busybox_layout, "/lab/oci")
            .file_bytes(self.bare_config(), LAB_BARE_CONFIG, 0o644)
            .env("KILN_ROOT", LAB_ROOT)
            // Measured without networking (the bare peer has none either).
            .env("KILN_NETWORK", "none")
            .env("KILN_AGENT_BIN", "/usr/bin/kiln-agent-static")
            .env("KILN_LOG", "warn,kiln::phase=debug")
            .memory_mib(self.density_lab_mib)
            .step("setup", &setup))
    }

    /// Boots a lab and runs setup and the interleaved rounds.
    pub fn run_rounds_lab(&self, bench_exe: &Path) -> Result<LabPart> {
        let rounds = self.rounds();
        let mut lab = self.lab_with_setup(bench_exe)?;
        // After each step, anything left behind shows in the live output.
        let leftovers = "left=$(for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = kiln-vmm ] && \
                         echo -n \"${p#/proc/} \"; done); [ -z \"$left\" ] || echo \"kiln-vmm left running: $left\" >&2";
        for (name, series, _) in &rounds {
            lab = lab.step(name, &format!("{}; {leftovers}", self.series_command(*series)));
        }
        let per_step = self.boot_timeout + Duration::from_secs(30);
        let steps = u32::try_from(rounds.len()).unwrap_or(u32::MAX);
        lab = lab.timeout(Duration::from_secs(400) + per_step.saturating_mul(steps));
        let report = lab.run_with(echo_live_output).context("running the lab")?;

        let setup = report.step("setup").context("the lab's setup step")?;
        let setup_log = format!("{}{}", setup.stdout_str(), setup.stderr_str());
        if !setup.success() {
            bail!("the lab's setup (import, kernel import, warm-up run) failed:\n{setup_log}");
        }
        let mut timed = Vec::new();
        for (name, series, round) in rounds {
            let result = match report.step(&name) {
                Err(e) => Err(e.to_string()),
                Ok(s) => serde_json::from_str::<ProbeResult>(s.stdout_str().trim()).map_err(|e| {
                    format!("probe output unreadable ({e}): {}{}", s.stdout_str(), s.stderr_str())
                }),
            };
            timed.push(Timed { series, round, result });
        }
        Ok(LabPart { timed, setup_log, lab_boot: report.lab_boot_time, total: report.total_time })
    }

    /// Boots a lab of `density_lab_mib` and runs the density step (its own lab: a lab that runs out
    /// of memory takes only this part with it).
    pub fn run_density_lab(&self, bench_exe: &Path) -> std::result::Result<DensityResult, String> {
        let density = format!(
            "rm -f {LAB_BARE_DISK}; /usr/bin/kiln-bench density --max {} --memory-mib {} --reserve-mib {}",
            self.density_max, self.density_memory_mib, self.density_reserve_mib
        );
        let budget = Duration::from_secs(60).saturating_mul(self.density_max as u32 + 2);
        let report = self
            .lab_with_setup(bench_exe)
            .map_err(|e| format!("{e:#}"))?
            .step("density", &density)
            .timeout(Duration::from_secs(400) + budget)
            .run_with(echo_live_output)
            .map_err(|e| format!("the density lab failed: {e:#}"))?;
        match report.step("density") {
            Err(e) => Err(e.to_string()),
            Ok(s) => serde_json::from_str::<DensityResult>(s.stdout_str().trim()).map_err(|e| {
                format!("density output unreadable ({e}): {}{}", s.stdout_str(), s.stderr_str())
            }),
        }
    }
}

/// `kiln run`'s phase marks in a `KILN_LOG=kiln::phase=debug` log: (label, seconds of the day).
pub fn phase_marks(log: &str) -> Vec<(String, f64)> {
    log.lines()
        .filter_map(|line| {
            let line = strip_ansi(line);
            let (time, rest) = line.split_once(' ')?;
            let label = rest.split_once("kiln::phase:")?.1.trim().to_string();
            let clock = time.split_once('T')?.1.trim_end_matches('Z');
            let mut parts = clock.split(':');
            let h: f64 = parts.next()?.parse().ok()?;
            let m: f64 = parts.next()?.parse().ok()?;
            let s: f64 = parts.next()?.parse().ok()?;
            Some((label, h * 3600.0 + m * 60.0 + s))
        })
        .collect()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Per phase (from one mark to the next, in order), the durations in ms over all runs.
pub fn phase_durations(logs: &[&str]) -> Vec<(String, Vec<f64>)> {
    let mut out: Vec<(String, Vec<f64>)> = Vec::new();
    for log in logs {
        let marks = phase_marks(log);
        for pair in marks.windows(2) {
            let label = format!("{} -> {}", pair[0].0, pair[1].0);
            let ms = (pair[1].1 - pair[0].1) * 1000.0;
            match out.iter_mut().find(|(l, _)| *l == label) {
                Some((_, v)) => v.push(ms),
                None => out.push((label, vec![ms])),
            }
        }
    }
    out
}

fn meminfo_kib(key: &str) -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.trim().strip_suffix(" kB")?.trim().parse().ok())
        .with_context(|| format!("no {key} in /proc/meminfo"))
}

fn rollup_kib(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.trim().strip_suffix(" kB")?.trim().parse().ok())
}

fn kiln_vmm_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "kiln-vmm")
        })
        .collect()
}

/// (In the lab.) Starts 128 MiB VMs with `kiln run -d` until `max`, a failed start, or MemAvailable
/// below `reserve_mib`; then `kiln exec VM true` on each; then each kiln-vmm's RSS and PSS.
pub fn density(max: usize, memory_mib: u32, reserve_mib: u64) -> Result<DensityResult> {
    let mem_total_kib = meminfo_kib("MemTotal")?;
    let mem_available_before_kib = meminfo_kib("MemAvailable")?;
    let mut start_ms = Vec::new();
    let mut exec_ms = Vec::new();
    let mut stop_reason = format!("--density-max {max} reached");
    let exec_true = |i: usize| {
        let t = Instant::now();
        let ok = Command::new("kiln")
            .args(["exec", &format!("d{i}"), "true"])
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        (ok, t.elapsed().as_secs_f64() * 1000.0)
    };
    for i in 0..max {
        // Each VM has booted and answered before the next starts, so MemAvailable counts what the
        // running ones really use.
        let available = meminfo_kib("MemAvailable")?;
        if available < reserve_mib * 1024 {
            stop_reason =
                format!("MemAvailable {} MiB < {reserve_mib} MiB before VM {}", available / 1024, i + 1);
            break;
        }
        let t = Instant::now();
        let out = Command::new("kiln")
            .args(["run", "-d", "--name", &format!("d{i}"), "--memory", &format!("{memory_mib}M")])
            .args([IMAGE, "sleep", "1000000"])
            .stdin(Stdio::null())
            .output()
            .context("running kiln")?;
        if !out.status.success() {
            stop_reason = format!(
                "kiln run -d of VM {} failed: {}",
                i + 1,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            break;
        }
        start_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        let (ok, ms) = exec_true(i);
        exec_ms.push(ms);
        eprintln!(
            "density: VM {} started in {:.0} ms, answered exec: {ok} ({ms:.0} ms); MemAvailable {} MiB",
            i + 1,
            start_ms[i],
            meminfo_kib("MemAvailable")? / 1024
        );
        if !ok {
            stop_reason = format!("VM {} did not answer `kiln exec VM true`", i + 1);
            break;
        }
    }
    let started = start_ms.len();
    // With all of them up: every one must still answer.
    let answered = (0..started).filter(|&i| exec_true(i).0).count();
    let vmms = kiln_vmm_pids()
        .into_iter()
        .filter_map(|pid| {
            Some(DensityVm { pid, rss_kib: rollup_kib(pid, "Rss")?, pss_kib: rollup_kib(pid, "Pss")? })
        })
        .collect();
    let mem_available_after_kib = meminfo_kib("MemAvailable")?;
    for i in 0..started {
        let _ = Command::new("kiln").args(["rm", "-f", &format!("d{i}")]).stdin(Stdio::null()).output();
    }
    Ok(DensityResult {
        started,
        answered,
        stop_reason,
        start_ms,
        exec_ms,
        vmms,
        mem_total_kib,
        mem_available_before_kib,
        mem_available_after_kib,
    })
}

/// A row: label, min / median / p95 / max, n.
pub fn row(label: &str, values: &[f64]) -> String {
    match summarize(values) {
        Some(Summary { min, median, max, n }) => format!(
            "| {label} | {min:.0} | {median:.0} | {:.0} | {max:.0} | {n} |",
            percentile(values, 95.0).unwrap_or(f64::NAN)
        ),
        None => format!("| {label} | - | - | - | - | 0 |"),
    }
}

pub const TABLE_HEAD: &str = "| series [ms] | min | median | p95 | max | n |\n|---|---|---|---|---|---|";

/// The overhead line: `kiln` median minus the peer's median, and their ratio.
pub fn overhead_line(what: &str, kiln: &[f64], peer: &[f64], target_ms: Option<f64>) -> String {
    match (summarize(kiln), summarize(peer)) {
        (Some(k), Some(p)) => {
            let over = k.median - p.median;
            let p95 = percentile(kiln, 95.0).unwrap_or(f64::NAN) - percentile(peer, 95.0).unwrap_or(f64::NAN);
            // The verdict follows the 90 % bootstrap interval of the median difference, so boot-time
            // noise larger than the target cannot pass (or fail) it by luck.
            let interval = median_difference_interval(kiln, peer, 0.9, 4000);
            let verdict = match (target_ms, interval) {
                (Some(t), Some((lo, hi))) if hi <= t => {
                    format!("; 90% interval [{lo:.0}, {hi:.0}] ms; target <= {t:.0} ms: MET")
                }
                (Some(t), Some((lo, hi))) if lo > t => {
                    format!("; 90% interval [{lo:.0}, {hi:.0}] ms; target <= {t:.0} ms: NOT MET")
                }
                (Some(t), Some((lo, hi))) => format!(
                    "; 90% interval [{lo:.0}, {hi:.0}] ms; target <= {t:.0} ms: NOT SHOWN (the interval \
                     contains the target: the runs' spread is larger than the difference)"
                ),
                (Some(t), None) => format!("; target <= {t:.0} ms: not judged"),
                (None, _) => String::new(),
            };
            format!(
                "{what}: median {:.0} ms vs {:.0} ms: overhead {over:.0} ms (p95 difference {p95:.0} ms), \
                 ratio {:.2}x{verdict}",
                k.median,
                p.median,
                k.median / p.median
            )
        }
        _ => format!("{what}: not measured for both (target not judged)"),
    }
}

/// `kiln run`'s phases as a Markdown table (empty when the logs carry no marks).
pub fn phase_table(logs: &[&str]) -> String {
    let phases = phase_durations(logs);
    let mut r = String::new();
    if phases.is_empty() {
        return r;
    }
    let _ = writeln!(
        r,
        "\n`kiln run`'s phases (`KILN_LOG=kiln::phase=debug` marks, over {} runs):\n",
        logs.len()
    );
    let _ = writeln!(r, "| phase | min ms | median ms | max ms |\n|---|---|---|---|");
    for (label, v) in &phases {
        if let Some(s) = summarize(v) {
            let _ = writeln!(r, "| {label} | {:.0} | {:.0} | {:.0} |", s.min, s.median, s.max);
        }
    }
    r
}

/// The lab part's report (Markdown, also readable as text).
pub fn lab_report(part: &LabPart) -> String {
    let values =
        |s: Series| part.timed.iter().filter(|t| t.series == s).filter_map(Timed::ms).collect::<Vec<_>>();
    let (kiln, bare, create) = (values(Series::KilnRun), values(Series::Bare), values(Series::CreateRm));
    let mut r = String::new();
    let _ = writeln!(r, "{TABLE_HEAD}");
    let _ = writeln!(r, "{}", row(&format!("`kiln run --rm {IMAGE} true` (kiln-vmm)"), &kiln));
    let _ = writeln!(r, "{}", row("bare `kiln-vmm --config-file`, init `busybox reboot -f`", &bare));
    let _ = writeln!(r, "{}", row(&format!("`kiln create {IMAGE} true` + `kiln rm` (no boot)"), &create));
    let _ = writeln!(r);
    let _ = writeln!(
        r,
        "- **{}.**",
        overhead_line("kiln run vs bare kiln-vmm", &kiln, &bare, Some(OVERHEAD_TARGET_MS))
    );
    let logs: Vec<&str> = part
        .timed
        .iter()
        .filter(|t| t.series == Series::KilnRun)
        .filter_map(|t| t.result.as_ref().ok().map(|p| p.stderr_tail.as_str()))
        .collect();
    r.push_str(&phase_table(&logs));
    let failed: Vec<String> = part
        .timed
        .iter()
        .filter(|t| t.ms().is_none())
        .map(|t| match &t.result {
            Ok(p) => format!(
                "{}-{}: exit {:?}{}; stderr: {}",
                t.series.key(),
                t.round,
                p.exit_code,
                if p.timed_out { " (timed out)" } else { "" },
                p.stderr_tail.lines().rev().take(3).collect::<Vec<_>>().join(" / ")
            ),
            Err(e) => format!("{}-{}: {}", t.series.key(), t.round, e.lines().next().unwrap_or("")),
        })
        .collect();
    if !failed.is_empty() {
        let _ = writeln!(r, "\nRuns that did not count:\n");
        for f in failed {
            let _ = writeln!(r, "- {f}");
        }
    }
    let _ = writeln!(
        r,
        "\nLab booted in {:.1} s; the whole lab run took {:.0} s.",
        part.lab_boot.as_secs_f64(),
        part.total.as_secs_f64()
    );
    r
}

/// The density run's report.
pub fn density_report(plan: &KilnPlan, density: &std::result::Result<DensityResult, String>) -> String {
    let mut r = String::new();
    let _ = writeln!(
        r,
        "\nDensity ({} MiB VMs, lab of {} MiB):\n",
        plan.density_memory_mib, plan.density_lab_mib
    );
    match density {
        Ok(d) => {
            let rss: Vec<f64> = d.vmms.iter().map(|v| v.rss_kib as f64 / 1024.0).collect();
            let pss: Vec<f64> = d.vmms.iter().map(|v| v.pss_kib as f64 / 1024.0).collect();
            let fmt = |v: &[f64]| {
                summarize(v).map_or("-".into(), |s| format!("{:.1} / {:.1} / {:.1}", s.min, s.median, s.max))
            };
            let _ = writeln!(
                r,
                "- **{} VMs started, {} answered `kiln exec VM true`**; stopped by: {}.",
                d.started, d.answered, d.stop_reason
            );
            let _ = writeln!(
                r,
                "- per kiln-vmm (guest RAM included) RSS {} MiB, PSS {} MiB (min / median / max over {} VMMs).",
                fmt(&rss),
                fmt(&pss),
                d.vmms.len()
            );
            let _ = writeln!(
                r,
                "- lab MemTotal {} MiB; MemAvailable {} MiB before, {} MiB with all VMs up ({:.1} MiB per VM).",
                d.mem_total_kib / 1024,
                d.mem_available_before_kib / 1024,
                d.mem_available_after_kib / 1024,
                (d.mem_available_before_kib.saturating_sub(d.mem_available_after_kib)) as f64
                    / 1024.0
                    / d.started.max(1) as f64
            );
            let _ = writeln!(
                r,
                "- `kiln run -d` per VM: {} ms; `kiln exec VM true`: {} ms (min / median / max).",
                fmt(&d.start_ms),
                fmt(&d.exec_ms)
            );
        }
        Err(e) => {
            let _ = writeln!(r, "- not measured: {}", e.lines().take(5).collect::<Vec<_>>().join(" / "));
        }
    }
    r
}

/// Runs `cmd` and times it from spawn to exit (ms); fails with its stderr when it fails.
pub fn time_command(cmd: &mut Command) -> Result<f64> {
    time_command_log(cmd).map(|(ms, _)| ms)
}

/// As [`time_command`], also returning the command's stderr.
pub fn time_command_log(cmd: &mut Command) -> Result<(f64, String)> {
    let t = Instant::now();
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {cmd:?}"))?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, stderr.trim());
    }
    Ok((ms, stderr))
}

/// The bare QEMU peer: kiln's QEMU machine (docs/hypervisors.md) with the same kernel, disk and size,
/// without QMP, agent channel or `-S`.
pub fn bare_qemu_command(qemu: &Path, vmlinux: &Path, disk: &Path, memory_mib: u32, accel: &str) -> Command {
    let mut c = Command::new(qemu);
    let cpu = if accel == "kvm" { "host" } else { "max" };
    c.args([
        "-M",
        "microvm,pit=on,acpi=off,auto-kernel-cmdline=off,ioapic2=off",
        "-accel",
        accel,
        "-cpu",
        cpu,
    ])
    .args(["-smp", "1", "-m", &format!("{memory_mib}M")])
    .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
    .args(["-serial", "null", "-device", "i8042", "-kernel"])
    .arg(vmlinux)
    .arg("-append")
    .arg(format!(
        "{QEMU_CMDLINE} root=/dev/vda rw {} {BARE_INIT}",
        kiln_hypervisor::qemu::virtio_mmio_param(0)
    ))
    .arg("-drive")
    .arg(format!("file={},format=raw,if=none,id=disk0", disk.display()))
    .args(["-device", "virtio-blk-device,drive=disk0"]);
    c
}

/// A `kiln` command against a state root.
fn kiln_cmd(plan: &KilnPlan, root: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(&plan.kiln);
    // Without networking: the bare peer has none, and the host's bridges and firewall stay as they are.
    c.args(args)
        .env("KILN_ROOT", root)
        .env("KILN_AGENT_BIN", &plan.agent)
        .env("KILN_LOG", "warn")
        .env("KILN_NETWORK", "none");
    c
}

/// The first cached root filesystem (ext4) under a kiln state root.
fn cached_rootfs(root: &Path) -> Result<PathBuf> {
    let out = Command::new("find").arg(root.join("images")).args(["-name", "*.ext4"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().context("no cached root filesystem under the state root")?;
    Ok(PathBuf::from(first))
}

/// Two series measured interleaved (the order alternates each round).
#[derive(Debug, Default, Serialize)]
pub struct Pair {
    pub kiln: Vec<f64>,
    pub peer: Vec<f64>,
    pub failures: Vec<String>,
}

impl Pair {
    fn measure(
        runs: usize,
        mut kiln: impl FnMut() -> Result<f64>,
        mut peer: impl FnMut() -> Result<f64>,
    ) -> Pair {
        let mut pair = Pair::default();
        for round in 0..runs {
            for first in [round % 2 == 0, round % 2 != 0] {
                let (label, result) = if first { ("kiln", kiln()) } else { ("peer", peer()) };
                match result {
                    Ok(ms) if first => pair.kiln.push(ms),
                    Ok(ms) => pair.peer.push(ms),
                    Err(e) => pair.failures.push(format!("{label} run {}: {e:#}", round + 1)),
                }
            }
        }
        pair
    }

    pub fn table(&self, kiln: &str, peer: &str) -> String {
        let mut r = format!("{TABLE_HEAD}\n{}\n{}\n", row(kiln, &self.kiln), row(peer, &self.peer));
        for f in &self.failures {
            let _ = writeln!(r, "- did not count: {}", f.lines().next().unwrap_or(""));
        }
        r
    }
}

/// `kiln run --rm --hypervisor qemu IMAGE true` against the bare QEMU boot, on this host.
pub fn host_qemu(
    plan: &KilnPlan,
    qemu: &Path,
    runs: usize,
    accel: &str,
) -> Result<(Pair, String, Vec<String>)> {
    let root = tempfile::tempdir().context("making a state root")?;
    let r = root.path();
    let layout = plan.busybox_layout.to_string_lossy().into_owned();
    let vmlinux = plan.vmlinux.to_string_lossy().into_owned();
    let memory = format!("{}M", plan.memory_mib);
    time_command(&mut kiln_cmd(plan, r, &["image", "import", &layout, "--name", IMAGE]))?;
    time_command(&mut kiln_cmd(plan, r, &["kernel", "import", &vmlinux, "--name", "guest"]))?;
    let run = ["run", "--rm", "--hypervisor", "qemu", "--memory", &memory, IMAGE, "true"];
    time_command(&mut kiln_cmd(plan, r, &run)).context("the warm-up kiln run")?;
    let disk = r.join("bare.ext4");
    let cache = cached_rootfs(r)?;
    time_command(Command::new("cp").arg("--sparse=always").arg(&cache).arg(&disk))?;
    let bare = || bare_qemu_command(qemu, &plan.vmlinux, &disk, plan.memory_mib, accel);
    time_command(&mut bare()).context("the warm-up bare QEMU boot")?;
    let logs = std::cell::RefCell::new(Vec::new());
    let timed_run = || {
        let (ms, log) = time_command_log(kiln_cmd(plan, r, &run).env("KILN_LOG", "warn,kiln::phase=debug"))?;
        logs.borrow_mut().push(log);
        Ok(ms)
    };
    let pair = Pair::measure(runs, timed_run, || time_command(&mut bare()));
    let peer = format!("{:?}", bare()).replace('"', "");
    Ok((pair, peer, logs.into_inner()))
}

/// Cold `kiln image pull` of a 5-layer image of `mb` MB from a local registry against `skopeo copy`
/// of it to a `dir:`. Returns the pair and a description of the image.
pub fn pull(plan: &KilnPlan, runs: usize, mb: usize) -> Result<(Pair, String)> {
    use kiln_test_utils::oci::{five_layer_image, OciLayout};
    let work = tempfile::tempdir().context("making a work dir")?;
    let registry = kiln_test_utils::registry::LocalRegistry::start();
    let layers = five_layer_image(mb);
    let tar_mb = layers.iter().map(Vec::len).sum::<usize>() as f64 / 1e6;
    let mut layout = OciLayout::create(&work.path().join("layout"));
    layout.add_image(&layers, true, serde_json::json!({"Cmd": ["/bin/sh"]}), "latest");
    drop(layers);
    registry.push_oci(&layout.dir, "latest", "bench/five-layers:latest");
    let image = format!("{}/bench/five-layers:latest", registry.host());
    let n = std::cell::Cell::new(0);
    let fresh = |what: &str| {
        n.set(n.get() + 1);
        work.path().join(format!("{what}{}", n.get()))
    };
    let pair = Pair::measure(
        runs,
        || {
            let root = fresh("root");
            let ms = time_command(&mut kiln_cmd(plan, &root, &["image", "pull", &image]));
            let _ = std::fs::remove_dir_all(&root);
            ms
        },
        || {
            let dir = fresh("skopeo");
            let ms = time_command(
                Command::new("skopeo")
                    .args(["--insecure-policy", "copy", "--quiet", "--src-tls-verify=false"])
                    .arg(format!("docker://{image}"))
                    .arg(format!("dir:{}", dir.display())),
            );
            let _ = std::fs::remove_dir_all(&dir);
            ms
        },
    );
    Ok((pair, format!("5 layers, {tar_mb:.1} MB of tar (gzip ~2:1), registry {}", registry.host())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_marks_are_read_from_tracing_lines_with_or_without_colour() {
        let log = "2026-11-25T08:00:01.500000Z DEBUG kiln::phase: create: begin\n\
                   noise\n\
                   \u{1b}[2m2026-11-25T08:00:01.750000Z\u{1b}[0m \u{1b}[34mDEBUG\u{1b}[0m \u{1b}[2mkiln::phase\u{1b}[0m\u{1b}[2m:\u{1b}[0m create: disk copied\n\
                   2026-11-25T08:00:02.000000Z  WARN kiln_manager: something\n";
        let marks = phase_marks(log);
        assert_eq!(marks.len(), 2, "{marks:?}");
        assert_eq!(marks[0].0, "create: begin");
        assert_eq!(marks[1].0, "create: disk copied");
        let d = phase_durations(&[log, log]);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].0, "create: begin -> create: disk copied");
        assert!((d[0].1[0] - 250.0).abs() < 0.01 && d[0].1.len() == 2);
    }

    #[test]
    fn rounds_rotate_the_series_order() {
        let plan = KilnPlan {
            kiln: "k".into(),
            kiln_vmm: "v".into(),
            agent: "a".into(),
            vmlinux: "l".into(),
            busybox_layout: "o".into(),
            runs: 2,
            memory_mib: 256,
            density_max: 1,
            density_memory_mib: 128,
            density_lab_mib: 1024,
            density_reserve_mib: 128,
            boot_timeout: Duration::from_secs(60),
        };
        let names: Vec<String> = plan.rounds().into_iter().map(|(n, _, _)| n).collect();
        assert_eq!(names, ["kiln-run-1", "bare-1", "create-rm-1", "bare-2", "create-rm-2", "kiln-run-2"]);
        assert!(plan.series_command(Series::Bare).contains("--config-file /lab/bare.json"));
        let cfg: serde_json::Value = serde_json::from_slice(&plan.bare_config()).unwrap();
        assert!(cfg["boot-source"]["boot_args"]
            .as_str()
            .unwrap()
            .ends_with("init=/bin/busybox -- reboot -f"));
    }
}
