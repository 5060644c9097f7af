//! Turns measurements into the human table and the Markdown section for docs/benchmarks.md.

use std::fmt::Write as _;

use crate::host::HostRun;
use crate::lab::{self, Kind, LabOutcome, LabPlan, Vmm};
use crate::stats::{summarize, Summary};

/// One metric: a summary per VMM (same order as `Results::vmms`).
#[derive(Debug, Clone)]
pub struct Metric {
    pub name: &'static str,
    pub unit: &'static str,
    pub per_vmm: Vec<Option<Summary>>,
    /// The target, in words, and whether it is met (None: not applicable / not measurable).
    pub target: Option<(String, Option<bool>)>,
}

/// The host part.
#[derive(Debug, Clone)]
pub enum HostPart {
    Skipped(String),
    Failed(String),
    Done { runs: usize, first_run: Summary, self_reported: Option<Summary>, wall: Option<Summary> },
}

/// Everything the benchmark reports.
#[derive(Debug, Clone)]
pub struct Results {
    pub vmms: Vec<Vmm>,
    pub metrics: Vec<Metric>,
    /// Runs that did not count, with why.
    pub failures: Vec<(String, String)>,
    pub host: HostPart,
    pub lab_boot_s: Option<f64>,
    pub lab_total_s: Option<f64>,
    pub setup: Vec<(String, String)>,
}

#[allow(clippy::cast_precision_loss)]
fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Builds the metrics from the lab runs.
pub fn lab_metrics(plan: &LabPlan, out: &LabOutcome) -> (Vec<Vmm>, Vec<Metric>, Vec<(String, String)>) {
    let vmms = plan.vmms();
    let mut failures = Vec::new();
    let good: Vec<_> = out
        .runs
        .iter()
        .filter(|r| match r.problem() {
            Some(p) => {
                failures.push((r.name.clone(), p));
                false
            }
            None => true,
        })
        .filter_map(|r| r.outcome.as_ref().ok().map(|p| (r, p)))
        .collect();
    let series =
        |kind: Kind, f: &dyn Fn(&crate::probe::ProbeResult) -> Option<f64>| -> Vec<Option<Summary>> {
            vmms.iter()
                .map(|v| {
                    let vals: Vec<f64> = good
                        .iter()
                        .filter(|(r, _)| r.vmm == *v && r.kind == kind)
                        .filter_map(|(_, p)| f(p))
                        .collect();
                    summarize(&vals)
                })
                .collect()
        };
    let idx = |v: Vmm| vmms.iter().position(|x| *x == v);
    let med = |s: &[Option<Summary>], v: Vmm| idx(v).and_then(|i| s[i]).map(|x| x.median);

    let boot = series(Kind::Boot, &|p| p.marker_us.map(ms));
    let boot_ok = match (med(&boot, Vmm::Kiln), med(&boot, Vmm::Qemu)) {
        (Some(k), Some(q)) => Some(k <= q),
        _ => None,
    };
    // The memory runs boot the same way up to the marker (only the command after ` -- ` differs), so
    // their boot-to-init times are samples too.
    let boot_all: Vec<Option<Summary>> = vmms
        .iter()
        .map(|v| {
            let vals: Vec<f64> =
                good.iter().filter(|(r, _)| r.vmm == *v).filter_map(|(_, p)| p.marker_us.map(ms)).collect();
            summarize(&vals)
        })
        .collect();
    let wall = series(Kind::Boot, &|p| Some(ms(p.wall_us)));
    #[allow(clippy::cast_precision_loss)]
    let overhead = series(Kind::Mem, &|p| p.mem.map(|m| m.overhead_kib as f64 / 1024.0));
    let over_ok = med(&overhead, Vmm::Kiln).map(|k| k <= 5.0);
    #[allow(clippy::cast_precision_loss)]
    let total_rss = series(Kind::Mem, &|p| p.mem.map(|m| m.total_rss_kib as f64 / 1024.0));
    let timer = series(Kind::Boot, &|p| {
        lab::parse_boot_timer_us(&p.stderr_tail).or_else(|| lab::parse_boot_timer_us(&p.console_tail)).map(ms)
    });
    let first = series(Kind::Boot, &|p| lab::parse_first_run_after_start_us(&p.stderr_tail).map(ms));

    let metrics = vec![
        Metric {
            name: "boot to init (spawn -> KILN-GUEST-READY on console)",
            unit: "ms",
            per_vmm: boot,
            target: Some(("kiln-vmm median <= QEMU microvm median".into(), boot_ok)),
        },
        Metric {
            name: "boot to init, boot + memory runs together",
            unit: "ms",
            per_vmm: boot_all,
            target: None,
        },
        Metric { name: "process start -> exit (guest runs `true`)", unit: "ms", per_vmm: wall, target: None },
        Metric {
            name: "VMM overhead memory (RSS minus guest RAM)",
            unit: "MiB",
            per_vmm: overhead,
            target: Some(("kiln-vmm <= 5 MiB".into(), over_ok)),
        },
        Metric { name: "RSS incl. guest RAM (same sample)", unit: "MiB", per_vmm: total_rss, target: None },
        Metric { name: "boot timer (VMM's own Guest-boot-time)", unit: "ms", per_vmm: timer, target: None },
        Metric {
            name: "VMM start -> vCPU 0 first KVM_RUN (own log)",
            unit: "ms",
            per_vmm: first,
            target: None,
        },
    ];
    (vmms, metrics, failures)
}

/// Summarises the host runs.
pub fn host_part(runs: &[HostRun]) -> HostPart {
    let first: Vec<f64> = runs.iter().map(|r| r.first_run_us).collect();
    let own: Vec<f64> = runs.iter().filter_map(|r| r.first_run_self_us).collect();
    let wall: Vec<f64> = runs.iter().map(|r| r.wall_us).collect();
    match summarize(&first) {
        Some(first_run) => HostPart::Done {
            runs: runs.len(),
            first_run,
            self_reported: summarize(&own),
            wall: summarize(&wall),
        },
        None => HostPart::Failed("no host runs".into()),
    }
}

fn num(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn triple(s: &Option<Summary>) -> String {
    match s {
        Some(s) => format!("{} / {} / {}", num(s.min), num(s.median), num(s.max)),
        None => "-".into(),
    }
}

impl Results {
    /// `kiln-vmm median / other median` for metric `m`.
    fn ratio(&self, m: &Metric, other: Vmm) -> Option<f64> {
        let k = self.vmms.iter().position(|v| *v == Vmm::Kiln)?;
        let o = self.vmms.iter().position(|v| *v == other)?;
        let (k, o) = (m.per_vmm[k]?, m.per_vmm[o]?);
        (o.median > 0.0).then(|| k.median / o.median)
    }

    fn others(&self) -> Vec<Vmm> {
        self.vmms.iter().copied().filter(|v| *v != Vmm::Kiln).collect()
    }

    fn target_text(m: &Metric) -> String {
        match &m.target {
            None => String::new(),
            Some((t, Some(true))) => format!("{t}: MET"),
            Some((t, Some(false))) => format!("{t}: NOT MET"),
            Some((t, None)) => format!("{t}: not measured"),
        }
    }

    fn host_text(&self) -> String {
        match &self.host {
            HostPart::Skipped(why) => format!("skipped: {why}"),
            HostPart::Failed(why) => format!("FAILED: {why}"),
            HostPart::Done { runs, first_run, self_reported, wall } => {
                let verdict = if first_run.median <= 5000.0 { "MET" } else { "NOT MET" };
                let mut s = format!(
                    "N={runs}: {} us (min / median / max); target median <= 5 ms: {verdict}",
                    triple(&Some(*first_run))
                );
                if let Some(o) = self_reported {
                    let _ = write!(s, "; kiln-vmm's own figure from main(): {} us", triple(&Some(*o)));
                }
                if let Some(w) = wall {
                    let _ = write!(s, "; whole run (spawn -> exit): {} us", triple(&Some(*w)));
                }
                s
            }
        }
    }

    /// The metrics as an aligned text table.
    fn table(&self) -> String {
        let mut s = String::new();
        let mut header = vec!["metric (min / median / max)".to_string()];
        header.extend(self.vmms.iter().map(|v| v.label().to_string()));
        header.extend(self.others().iter().map(|o| format!("kiln/{}", o.label())));
        header.push("target".into());
        let mut rows = vec![header];
        for m in &self.metrics {
            let mut r = vec![format!("{} [{}]", m.name, m.unit)];
            r.extend(m.per_vmm.iter().map(triple));
            r.extend(
                self.others().iter().map(|o| self.ratio(m, *o).map_or("-".into(), |x| format!("{x:.2}"))),
            );
            r.push(Self::target_text(m));
            rows.push(r);
        }
        let cols = rows[0].len();
        let widths: Vec<usize> = (0..cols)
            .map(|c| rows.iter().map(|r| r.get(c).map_or(0, |x| x.chars().count())).max().unwrap_or(0))
            .collect();
        for (i, r) in rows.iter().enumerate() {
            let line: Vec<String> = r.iter().zip(&widths).map(|(x, w)| format!("{x:<w$}")).collect();
            let _ = writeln!(s, "{}", line.join("  ").trim_end());
            if i == 0 {
                let _ =
                    writeln!(s, "{}", widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("  "));
            }
        }
        s
    }

    /// The human report: setup, table, host part, runs that did not count.
    pub fn human(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.setup {
            let _ = writeln!(s, "{k}: {v}");
        }
        let _ = writeln!(s);
        if self.metrics.is_empty() {
            let _ = writeln!(s, "(lab part skipped)");
        } else {
            s.push_str(&self.table());
        }
        let _ = writeln!(s, "\nhost /dev/kvm, kiln-vmm start -> first KVM_RUN: {}", self.host_text());
        if let (Some(b), Some(t)) = (self.lab_boot_s, self.lab_total_s) {
            let _ = writeln!(s, "lab: booted in {b:.1} s, whole lab run {t:.0} s");
        }
        for (name, why) in &self.failures {
            let _ = writeln!(s, "\nRUN {name} DID NOT COUNT: {why}");
        }
        s
    }

    /// The Markdown section for docs/benchmarks.md.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.setup {
            let _ = writeln!(s, "- **{k}**: {v}");
        }
        let _ = writeln!(s);
        let mut head = vec!["metric (min / median / max)".to_string()];
        head.extend(self.vmms.iter().map(|v| v.label().to_string()));
        head.extend(self.others().iter().map(|o| format!("kiln-vmm / {} (medians)", o.label())));
        head.push("target".into());
        let _ = writeln!(s, "| {} |", head.join(" | "));
        let _ = writeln!(s, "|{}", "---|".repeat(head.len()));
        for m in &self.metrics {
            let mut r = vec![format!("{} [{}]", m.name, m.unit)];
            r.extend(m.per_vmm.iter().map(triple));
            r.extend(
                self.others().iter().map(|o| self.ratio(m, *o).map_or("-".into(), |x| format!("{x:.2}"))),
            );
            r.push(Self::target_text(m));
            let _ = writeln!(s, "| {} |", r.join(" | "));
        }
        let _ = writeln!(
            s,
            "\nHost `/dev/kvm` (no lab), kiln-vmm process start → vCPU 0 first `KVM_RUN`: {}",
            self.host_text()
        );
        if let (Some(b), Some(t)) = (self.lab_boot_s, self.lab_total_s) {
            let _ = writeln!(s, "\nLab booted in {b:.1} s; the whole lab run took {t:.0} s.");
        }
        if !self.failures.is_empty() {
            let _ = writeln!(s, "\nRuns that did not count:");
            for (name, why) in &self.failures {
                let first = why.lines().next().unwrap_or("");
                let _ = writeln!(s, "- `{name}`: {first}");
            }
        }
        s
    }
}
