//! `kiln-bench`: Kiln's benchmarks (run through the `bench/` wrappers).
//!
//! Owns: measuring kiln-vmm side by side with other VMMs — QEMU `-M microvm` and, when
//! `FIRECRACKER_BIN` is set, Firecracker — on the same kernel, initramfs, command line, vCPUs and
//! memory, inside one lab run (`kiln-lab`), interleaved so drift hits every VMM alike; summarising
//! (min / median / max, ratios of medians) and printing a table or the Markdown section for
//! `docs/benchmarks.md`. `boot` is the boot benchmark; `probe` is its helper that runs inside the lab
//! around one VMM process.
//!
//! Must not: link or drive kiln-vmm's internals (it runs the release binary like a user would),
//! compare absolute lab times with hardware numbers (only same-run ratios mean anything there), or
//! change what it measures per VMM (every VMM goes through the same probe code).

mod api_ready;
mod host;
mod kiln;
mod lab;
mod net;
mod probe;
mod report;
mod smaps;
mod stats;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "kiln-bench", about = "Kiln benchmarks (see docs/benchmarks.md)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Boot benchmark: kiln-vmm vs QEMU microvm (vs Firecracker) in one lab run, plus kiln-vmm's
    /// start -> first KVM_RUN on the host's /dev/kvm.
    Boot(BootArgs),
    /// API readiness on the host: process start -> the API socket answering `GET /` (kiln-vmm,
    /// Firecracker when FIRECRACKER_BIN is set), QEMU's QMP answering as the peer always measured.
    Api(ApiArgs),
    /// Network benchmark: host<->guest TCP throughput over virtio-net on a tap, kiln-vmm vs QEMU
    /// microvm, in one lab run.
    Net(NetArgs),
    /// The `kiln` CLI against the bare hypervisor it drives: `kiln run --rm IMAGE true` vs a bare
    /// kiln-vmm boot (lab) and vs a bare QEMU microvm boot (host), VM density (lab), cold
    /// `kiln image pull` vs `skopeo copy` (host).
    Kiln(KilnArgs),
    /// (Runs inside the lab.) Starts VMs with `kiln run -d` until memory runs short; prints JSON.
    #[command(hide = true)]
    Density(DensityArgs),
    /// (Runs inside the lab.) The lab side of the network benchmark's transfers; prints JSON.
    #[command(hide = true)]
    Netpump(NetpumpArgs),
    /// (Runs inside the lab.) Runs one VMM, timestamps the guest's marker line, samples smaps.
    #[command(hide = true)]
    Probe(ProbeArgs),
}

#[derive(Args, Debug)]
struct BootArgs {
    /// Boots per VMM (boot-time runs).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Memory runs per VMM (guest sleeps while smaps is sampled); default: same as --runs.
    #[arg(long)]
    mem_runs: Option<usize>,
    /// Host runs of the start -> first KVM_RUN measurement.
    #[arg(long, default_value_t = 20)]
    host_runs: usize,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    /// Extra kernel parameter for every VMM (repeatable), e.g. `--kernel-arg quiet`.
    #[arg(long = "kernel-arg", value_name = "ARG")]
    kernel_args: Vec<String>,
    /// kiln-vmm binary (default: `kiln-vmm` next to this program, i.e. target/release).
    #[arg(long, value_name = "PATH")]
    kiln_vmm: Option<PathBuf>,
    /// QEMU binary carried into the lab.
    #[arg(long, value_name = "PATH", default_value = "/usr/bin/qemu-system-x86_64")]
    qemu: PathBuf,
    /// Kill one VMM run after this many seconds (a lab boot takes ~3-10 s; the run then counts as
    /// failed and is listed).
    #[arg(long, default_value_t = 90)]
    boot_timeout_secs: u64,
    /// Skip the host part.
    #[arg(long)]
    no_host: bool,
    /// Skip the lab part.
    #[arg(long)]
    no_lab: bool,
    /// Print the Markdown section for docs/benchmarks.md on stdout (the table then goes to stderr).
    #[arg(long)]
    markdown: bool,
    /// Also write every run's raw probe output (JSON) here.
    #[arg(long, value_name = "PATH")]
    raw: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ApiArgs {
    /// Runs per program.
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// kiln-vmm binary (default: `kiln-vmm` next to this program, i.e. target/release).
    #[arg(long, value_name = "PATH")]
    kiln_vmm: Option<PathBuf>,
    /// QEMU binary (the peer measured in every run).
    #[arg(long, value_name = "PATH", default_value = "/usr/bin/qemu-system-x86_64")]
    qemu: PathBuf,
    /// Print the Markdown section for docs/benchmarks.md on stdout (the table then goes to stderr).
    #[arg(long)]
    markdown: bool,
}

#[derive(Args, Debug)]
struct NetArgs {
    /// Boots per VMM.
    #[arg(long, default_value_t = 2)]
    boots: usize,
    /// Transfers each way per boot.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Bytes per transfer, MiB.
    #[arg(long, default_value_t = 32)]
    mib: u64,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 256)]
    mem_mib: u64,
    /// kiln-vmm binary (default: `kiln-vmm` next to this program, i.e. target/release).
    #[arg(long, value_name = "PATH")]
    kiln_vmm: Option<PathBuf>,
    /// QEMU binary carried into the lab.
    #[arg(long, value_name = "PATH", default_value = "/usr/bin/qemu-system-x86_64")]
    qemu: PathBuf,
    /// Print the Markdown section for docs/benchmarks.md on stdout (the table then goes to stderr).
    #[arg(long)]
    markdown: bool,
}

#[derive(Args, Debug)]
struct KilnArgs {
    /// `kiln run` / bare boot pairs in the lab (each round also runs `kiln create` + `kiln rm`).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Pairs on the host with the QEMU backend.
    #[arg(long, default_value_t = 5)]
    qemu_runs: usize,
    /// Cold pull pairs.
    #[arg(long, default_value_t = 5)]
    pull_runs: usize,
    /// Size of the pulled 5-layer image (uncompressed MB).
    #[arg(long, default_value_t = 100)]
    pull_mb: usize,
    /// Guest memory of the `kiln run` VMs and their bare peers, MiB (kiln's default).
    #[arg(long, default_value_t = 256)]
    memory_mib: u32,
    /// Most VMs the density run starts.
    #[arg(long, default_value_t = 40)]
    density_max: usize,
    /// Memory of each density VM, MiB.
    #[arg(long, default_value_t = 128)]
    density_memory_mib: u32,
    /// The lab's memory, MiB (bounds the density run).
    #[arg(long, default_value_t = 1024)]
    lab_mib: u32,
    /// The density run stops adding VMs when the lab's MemAvailable falls below this, MiB.
    #[arg(long, default_value_t = 128)]
    reserve_mib: u64,
    /// kiln-vmm binary (default: `kiln-vmm` next to this program, i.e. target/release).
    #[arg(long, value_name = "PATH")]
    kiln_vmm: Option<PathBuf>,
    /// QEMU binary for the host part.
    #[arg(long, value_name = "PATH", default_value = "/usr/bin/qemu-system-x86_64")]
    qemu: PathBuf,
    /// Kill one lab run after this many seconds.
    #[arg(long, default_value_t = 120)]
    boot_timeout_secs: u64,
    #[arg(long)]
    no_lab: bool,
    #[arg(long)]
    no_qemu: bool,
    #[arg(long)]
    no_pull: bool,
    /// Skip the density lab.
    #[arg(long)]
    no_density: bool,
    /// Print the Markdown section for docs/benchmarks.md on stdout (progress goes to stderr).
    #[arg(long)]
    markdown: bool,
    /// Also write every lab run's raw probe output (JSON) here.
    #[arg(long, value_name = "PATH")]
    raw: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct DensityArgs {
    #[arg(long)]
    max: usize,
    #[arg(long)]
    memory_mib: u32,
    #[arg(long)]
    reserve_mib: u64,
}

#[derive(Args, Debug)]
struct NetpumpArgs {
    #[arg(long)]
    guest: String,
    #[arg(long)]
    rounds: usize,
    #[arg(long)]
    bytes: u64,
    #[arg(long, default_value_t = 180)]
    timeout_secs: u64,
}

#[derive(Args, Debug)]
struct ProbeArgs {
    #[arg(long, default_value = lab::MARKER)]
    marker: String,
    #[arg(long, default_value_t = 128)]
    guest_mem_mib: u64,
    #[arg(long)]
    mem_sample_after_ms: Option<u64>,
    #[arg(long, default_value_t = 240)]
    timeout_secs: u64,
    /// Copy the program's stderr to ours as it arrives.
    #[arg(long)]
    echo_stderr: bool,
    /// The VMM's command line.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Probe(a) => {
            let r = probe::run(&probe::ProbeOptions {
                marker: a.marker,
                mem_sample_after: a.mem_sample_after_ms.map(Duration::from_millis),
                guest_mem_mib: a.guest_mem_mib,
                timeout: Duration::from_secs(a.timeout_secs),
                echo_stderr: a.echo_stderr,
                command: a.command,
            })?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Cmd::Boot(a) => boot(&a),
        Cmd::Api(a) => api(&a),
        Cmd::Net(a) => net_bench(&a),
        Cmd::Kiln(a) => kiln_bench(&a),
        Cmd::Density(a) => {
            let r = kiln::density(a.max, a.memory_mib, a.reserve_mib)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Cmd::Netpump(a) => {
            let (listener, guest) = net::lab_sockets(&a.guest)?;
            let t = net::pump(listener, guest, a.rounds, a.bytes, Duration::from_secs(a.timeout_secs))?;
            println!("{}", serde_json::to_string(&t)?);
            Ok(())
        }
    }
}

fn net_bench(a: &NetArgs) -> Result<()> {
    if a.mib.saturating_mul(4) > a.mem_mib {
        bail!(
            "--mib {} is more than a quarter of --mem-mib {}: the guest keeps what it sends in tmpfs; \
             raise --mem-mib or lower --mib",
            a.mib,
            a.mem_mib
        );
    }
    let assets = guest_assets()?;
    let plan = net::NetPlan {
        kiln_vmm: kiln_vmm_binary(a.kiln_vmm.as_ref())?,
        qemu: a.qemu.clone(),
        vmlinux: assets.vmlinux,
        initramfs: assets.initramfs,
        boots: a.boots,
        rounds: a.rounds,
        bytes: a.mib << 20,
        mem_mib: a.mem_mib,
    };
    eprintln!(
        "kiln-bench: net: {} boots x 2 VMMs, {} x {} MiB each way per boot, in one lab run",
        a.boots, a.rounds, a.mib
    );
    let exe = std::env::current_exe().context("finding this program")?;
    let out = plan.run(&exe)?;
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| direction | VMM | min MiB/s | median MiB/s | max MiB/s | transfers | median / QEMU |"
    );
    let _ = writeln!(table, "|---|---|---|---|---|---|---|");
    let mut verdicts = Vec::new();
    for (dir, label) in [("h2g", "host -> guest"), ("g2h", "guest -> host")] {
        let qemu = out.summary(lab::Vmm::Qemu, dir);
        for vmm in net::NetPlan::vmms() {
            let Some(s) = out.summary(vmm, dir) else {
                let _ = writeln!(table, "| {label} | {} | - | - | - | 0 | - |", vmm.label());
                continue;
            };
            let ratio = qemu.map_or("-".to_string(), |q| format!("{:.2}x", s.median / q.median));
            let _ = writeln!(
                table,
                "| {label} | {} | {:.1} | {:.1} | {:.1} | {} | {ratio} |",
                vmm.label(),
                s.min,
                s.median,
                s.max,
                s.n
            );
        }
        let kiln = out.summary(lab::Vmm::Kiln, dir);
        verdicts.push(match (kiln, qemu) {
            (Some(k), Some(q)) if k.median >= q.median => {
                format!("{label}: kiln-vmm {:.1} MiB/s >= QEMU {:.1} MiB/s: target met", k.median, q.median)
            }
            (Some(k), Some(q)) => {
                format!(
                    "{label}: kiln-vmm {:.1} MiB/s < QEMU {:.1} MiB/s: target NOT met",
                    k.median, q.median
                )
            }
            _ => format!("{label}: not measured for both VMMs: target NOT judged"),
        });
    }
    let mut failures = String::new();
    for (name, why) in &out.failures {
        let _ = writeln!(failures, "- {name}: {}", why.trim());
    }
    let human = format!("{table}\n{}\n{failures}", verdicts.join("\n"));
    if a.markdown {
        eprint!("{human}");
        print_results_header("net", &format!("guest: 1 vCPU, {} MiB", a.mem_mib));
        println!("{table}");
        for v in &verdicts {
            println!("- **{v}.**");
        }
        if !failures.is_empty() {
            println!("\nBoots that did not count:\n{failures}");
        }
    } else {
        print!("{human}");
    }
    Ok(())
}

fn kiln_bench(a: &KilnArgs) -> Result<()> {
    let exe = std::env::current_exe().context("finding this program")?;
    let kiln = exe.parent().context("program has no directory")?.join("kiln");
    if !kiln.is_file() {
        bail!("{} not found: build it (cargo build --release -p kiln-cli)", kiln.display());
    }
    let dir = tempfile::tempdir().context("making a work dir")?;
    let mut layout = kiln_test_utils::oci::OciLayout::create(&dir.path().join("oci"));
    layout.add_image(
        &kiln_test_utils::oci::busybox_layers(),
        true,
        serde_json::json!({"Cmd": ["sh"], "Env": ["PATH=/bin"]}),
        kiln::IMAGE,
    );
    let plan = kiln::KilnPlan {
        kiln,
        kiln_vmm: kiln_vmm_binary(a.kiln_vmm.as_ref())?,
        agent: kiln_test_utils::static_agent().to_path_buf(),
        vmlinux: guest_assets()?.vmlinux,
        busybox_layout: layout.dir.clone(),
        runs: a.runs,
        memory_mib: a.memory_mib,
        density_max: a.density_max,
        density_memory_mib: a.density_memory_mib,
        density_lab_mib: a.lab_mib,
        density_reserve_mib: a.reserve_mib,
        boot_timeout: Duration::from_secs(a.boot_timeout_secs),
    };
    let mut sections = Vec::new();
    if !a.no_pull {
        eprintln!("kiln-bench: kiln: cold pull vs skopeo copy, {} pairs", a.pull_runs);
        let (pair, image) = kiln::pull(&plan, a.pull_runs, a.pull_mb)?;
        let mut s = format!("**Cold pull** (host; image: {image}; each run into a fresh store / dir):\n\n");
        s.push_str(
            &pair.table("`kiln image pull` (fresh state root)", "`skopeo copy docker://... dir:` (peer)"),
        );
        let _ =
            writeln!(s, "\n- {}.", kiln::overhead_line("kiln pull vs skopeo", &pair.kiln, &pair.peer, None));
        eprintln!("{s}");
        sections.push(s);
    }
    if !a.no_qemu {
        let accel = if Path::new("/dev/kvm").exists() && !Path::new("/sys/module/kvm_pvm").exists() {
            "kvm"
        } else {
            "tcg"
        };
        eprintln!("kiln-bench: kiln: QEMU backend on the host ({accel}), {} pairs", a.qemu_runs);
        let (pair, peer, logs) = kiln::host_qemu(&plan, &a.qemu, a.qemu_runs, accel)?;
        let mut s = format!(
            "**QEMU backend on the host** (`-accel {accel}`; {} MiB, 1 vCPU, warm cache):\n\n",
            a.memory_mib
        );
        s.push_str(&pair.table(
            &format!("`kiln run --rm --hypervisor qemu {} true`", kiln::IMAGE),
            "bare QEMU microvm, init `busybox reboot -f` (peer)",
        ));
        let _ = writeln!(
            s,
            "\n- **{}.**\n- peer: `{peer}`",
            kiln::overhead_line(
                "kiln run (qemu) vs bare QEMU",
                &pair.kiln,
                &pair.peer,
                Some(kiln::OVERHEAD_TARGET_MS)
            )
        );
        s.push_str(&kiln::phase_table(&logs.iter().map(String::as_str).collect::<Vec<_>>()));
        eprintln!("{s}");
        sections.push(s);
    }
    if !a.no_lab {
        eprintln!("kiln-bench: kiln: lab: {} rounds", a.runs);
        let part = plan.run_rounds_lab(&exe)?;
        if let Some(raw) = &a.raw {
            std::fs::write(raw, serde_json::to_vec_pretty(&part)?)
                .with_context(|| format!("writing {}", raw.display()))?;
        }
        let mut s = format!(
            "**kiln-vmm in the lab** ({} MiB, 1 vCPU, warm cache; lab of {} MiB; setup: {}):\n\n",
            a.memory_mib,
            a.lab_mib,
            part.setup_log
                .lines()
                .filter(|l| l.starts_with("bare boot"))
                .collect::<Vec<_>>()
                .join(" ")
                .trim()
        );
        s.push_str(&kiln::lab_report(&part));
        eprintln!("{s}");
        sections.push(s);
    }
    if !a.no_density {
        eprintln!("kiln-bench: kiln: density in a lab of {} MiB, up to {} VMs", a.lab_mib, a.density_max);
        let density = plan.run_density_lab(&exe);
        if let Some(raw) = &a.raw {
            std::fs::write(raw.with_extension("density.json"), serde_json::to_vec_pretty(&density)?)
                .with_context(|| format!("writing {}", raw.display()))?;
        }
        let s = kiln::density_report(&plan, &density);
        eprintln!("{s}");
        sections.push(s);
    }
    if a.markdown {
        print_results_header("kiln", "kiln, kiln-vmm release builds");
        for s in sections {
            println!("{s}");
        }
    }
    Ok(())
}

/// The kiln-vmm binary to measure: `--kiln-vmm`, else the one next to this program.
fn kiln_vmm_binary(arg: Option<&PathBuf>) -> Result<PathBuf> {
    let p = match arg {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("finding this program")?
            .parent()
            .context("program has no directory")?
            .join("kiln-vmm"),
    };
    if !p.is_file() {
        bail!("{} not found: build it (cargo build --release -p kiln-vmm) or pass --kiln-vmm", p.display());
    }
    Ok(p)
}

/// The optional Firecracker binary from `FIRECRACKER_BIN`.
fn firecracker_binary() -> Result<Option<PathBuf>> {
    let Some(fc) = std::env::var_os("FIRECRACKER_BIN").map(PathBuf::from) else { return Ok(None) };
    if !fc.is_file() {
        bail!("FIRECRACKER_BIN={} is not a file", fc.display());
    }
    Ok(Some(fc))
}

/// Prints the Markdown heading and the line that says how and where a `bench/NAME` run was made.
fn print_results_header(bench: &str, extra: &str) {
    let args: Vec<String> = std::env::args().skip(2).map(|w| lab::sh_quote(&w)).collect();
    println!("### Results ({})\n", cmd_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default());
    println!(
        "Command: `bench/{bench}{}{}`; host: {} x {}; {extra}; git {}.\n",
        if args.is_empty() { "" } else { " " },
        args.join(" "),
        cmd_line("nproc", &[]).unwrap_or_default(),
        cpu_model(),
        cmd_line("git", &["-C", &repo_root().to_string_lossy(), "describe", "--always", "--dirty"])
            .unwrap_or_else(|| "?".into())
    );
}

/// The API readiness target (issue 3): median at most this many ms for kiln-vmm.
const API_READY_TARGET_MS: f64 = 5.0;

fn api(a: &ApiArgs) -> Result<()> {
    let mut peers = vec![api_ready::Peer::FirecrackerApi {
        label: "kiln-vmm".into(),
        bin: kiln_vmm_binary(a.kiln_vmm.as_ref())?,
    }];
    if let Some(fc) = firecracker_binary()? {
        peers.push(api_ready::Peer::FirecrackerApi { label: "Firecracker".into(), bin: fc });
    }
    peers.push(api_ready::Peer::Qmp { bin: a.qemu.clone() });
    eprintln!("kiln-bench: api: {} rounds over {} programs", a.runs, peers.len());
    let results = api_ready::run(&peers, a.runs)?;
    let kiln_median = results[0].summary.map(|s| s.median);
    let mut table = String::new();
    let _ = writeln!(table, "| program | min ms | median ms | max ms | runs | median / kiln-vmm |");
    let _ = writeln!(table, "|---|---|---|---|---|---|");
    for r in &results {
        match r.summary {
            Some(s) => {
                let ratio = kiln_median.map_or("-".to_string(), |k| format!("{:.2}x", s.median / k));
                let _ = writeln!(
                    table,
                    "| {} | {:.2} | {:.2} | {:.2} | {} | {ratio} |",
                    r.label,
                    s.min / 1000.0,
                    s.median / 1000.0,
                    s.max / 1000.0,
                    s.n
                );
            }
            None => {
                let _ = writeln!(table, "| {} | - | - | - | 0 | - |", r.label);
            }
        }
    }
    let met = kiln_median.map(|m| m / 1000.0 <= API_READY_TARGET_MS);
    let verdict = match (kiln_median, met) {
        (Some(m), Some(true)) => {
            format!("kiln-vmm median {:.2} ms <= {API_READY_TARGET_MS} ms: target met", m / 1000.0)
        }
        (Some(m), _) => {
            format!("kiln-vmm median {:.2} ms > {API_READY_TARGET_MS} ms: target NOT met", m / 1000.0)
        }
        (None, _) => "kiln-vmm never answered: target NOT met".to_string(),
    };
    let mut failures = String::new();
    for r in &results {
        for f in &r.failures {
            let _ = writeln!(failures, "- {}: {f}", r.label);
        }
    }
    let human = format!("{table}\n{verdict}\n{failures}");
    if a.markdown {
        eprint!("{human}");
        print_results_header("api", &format!("Linux {}", cmd_line("uname", &["-r"]).unwrap_or_default()));
        println!("{table}");
        for r in &results {
            println!("- {}: `{}`", r.label, r.command);
        }
        println!("\n**{verdict}.**");
        if !failures.is_empty() {
            println!("\nRuns that did not count:\n{failures}");
        }
    } else {
        print!("{human}");
    }
    Ok(())
}

/// The repository root (this crate lives in `crates/kiln-bench`).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `scripts/guest-assets` and reads `KILN_VMLINUX=` / `KILN_INITRAMFS=` from its stdout.
fn guest_assets() -> Result<lab::Assets> {
    let script = repo_root().join("scripts/guest-assets");
    let o = Command::new(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !o.status.success() {
        bail!("{} failed ({})", script.display(), o.status);
    }
    let text = String::from_utf8_lossy(&o.stdout);
    let get = |key: &str| -> Result<PathBuf> {
        let v = text
            .lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
            .with_context(|| format!("no {key}= line in the output of {}", script.display()))?;
        Ok(PathBuf::from(unquote(v.trim())))
    };
    Ok(lab::Assets { vmlinux: get("KILN_VMLINUX")?, initramfs: get("KILN_INITRAMFS")? })
}

/// Undoes shell single-quoting (`'a'\''b'` → `a'b`); plain words pass through.
fn unquote(v: &str) -> String {
    if !v.contains('\'') {
        return v.to_string();
    }
    let mut out = String::new();
    let mut in_quote = false;
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => in_quote = !in_quote,
            '\\' if !in_quote => {
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            }
            c => out.push(c),
        }
    }
    out
}

fn cmd_line(prog: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(prog).args(args).output().ok()?;
    o.status.success().then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "?".into())
}

fn boot(a: &BootArgs) -> Result<()> {
    let exe = std::env::current_exe().context("finding this program")?;
    let kiln_vmm = kiln_vmm_binary(a.kiln_vmm.as_ref())?;
    let firecracker = firecracker_binary()?;
    let mem_runs = a.mem_runs.unwrap_or(a.runs);

    // Host part first: it is quick and needs no lab.
    let host = if a.no_host {
        report::HostPart::Skipped("--no-host".into())
    } else if let Some(why) = host::unavailable() {
        eprintln!("kiln-bench: host part skipped: {why}");
        report::HostPart::Skipped(why)
    } else {
        eprintln!("kiln-bench: host: {} x kiln-vmm start -> first KVM_RUN", a.host_runs);
        match host::run(&kiln_vmm, a.host_runs) {
            Ok(runs) => report::host_part(&runs),
            Err(e) => {
                eprintln!("kiln-bench: host part failed: {e:#}");
                report::HostPart::Failed(format!("{e:#}"))
            }
        }
    };

    let args: Vec<String> = std::env::args().skip(2).map(|w| lab::sh_quote(&w)).collect();
    let mut setup = vec![
        (
            "command".to_string(),
            format!("`bench/boot{}{}`", if args.is_empty() { "" } else { " " }, args.join(" ")),
        ),
        ("date".into(), cmd_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default()),
        (
            "host".into(),
            format!(
                "{} x {}, Linux {}, /dev/kvm = {}",
                cmd_line("nproc", &[]).unwrap_or_default(),
                cpu_model(),
                cmd_line("uname", &["-r"]).unwrap_or_default(),
                if Path::new("/sys/module/kvm_pvm").exists() { "PVM" } else { "hardware KVM" }
            ),
        ),
        (
            "kiln".into(),
            format!(
                "git {}, kiln-vmm release build",
                cmd_line("git", &["-C", &repo_root().to_string_lossy(), "describe", "--always", "--dirty"])
                    .unwrap_or_else(|| "?".into())
            ),
        ),
    ];

    let (vmms, metrics, failures, lab_boot_s, lab_total_s, raw_runs) = if a.no_lab {
        (vec![], vec![], vec![], None, None, vec![])
    } else {
        let assets = guest_assets()?;
        let plan = lab::LabPlan {
            kiln_vmm: kiln_vmm.clone(),
            firecracker,
            qemu: a.qemu.clone(),
            assets,
            runs: a.runs,
            mem_runs,
            vcpus: a.vcpus,
            mem_mib: a.mem_mib,
            kernel_args: a.kernel_args.clone(),
            mem_sleep_secs: 3,
            mem_sample_after: Duration::from_millis(1000),
            boot_timeout: Duration::from_secs(a.boot_timeout_secs),
        };
        setup.push((
            "lab".into(),
            "QEMU/TCG `-M pc -cpu max -smp 2` (nested SVM, nested paging) with Debian's kernel + kvm_amd; \
             absolute lab times are ~50-100x hardware, only same-run ratios mean anything"
                .into(),
        ));
        setup.push((
            "guest".into(),
            format!(
                "{} (PVH ELF) + {} (busybox), {} vCPU, {} MiB, same for every VMM",
                plan.assets.vmlinux.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
                plan.assets
                    .initramfs
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                a.vcpus,
                a.mem_mib
            ),
        ));
        setup.push((
            "kernel cmdline".into(),
            format!("`{}` (QEMU: `reboot=t`, no i8042)", plan.cmdline(lab::Vmm::Kiln, lab::Kind::Boot)),
        ));
        setup.push((
            "VMMs".into(),
            plan.vmms()
                .iter()
                .map(|v| {
                    format!(
                        "{}: `{}`",
                        v.label(),
                        plan.vmm_command(*v, lab::Kind::Boot)
                            .iter()
                            .map(|w| lab::sh_quote(w))
                            .collect::<Vec<_>>()
                            .join(" ")
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        ));
        setup.push((
            "runs".into(),
            format!(
                "{} boots + {} memory runs per VMM, interleaved ({}; the order rotates each round), in one lab run",
                a.runs,
                mem_runs,
                plan.vmms().iter().map(|v| v.label()).collect::<Vec<_>>().join(", ")
            ),
        ));
        eprintln!(
            "kiln-bench: lab: {} steps ({} boots + {} memory runs x {} VMMs); this takes a few minutes",
            plan.steps().len(),
            a.runs,
            mem_runs,
            plan.vmms().len()
        );
        let out = plan.run(&exe)?;
        let (vmms, metrics, failures) = report::lab_metrics(&plan, &out);
        let raw: Vec<serde_json::Value> = out
            .runs
            .iter()
            .map(|r| match &r.outcome {
                Ok(p) => serde_json::json!({"name": r.name, "vmm": r.vmm, "kind": r.kind, "probe": p}),
                Err(e) => serde_json::json!({"name": r.name, "vmm": r.vmm, "kind": r.kind, "error": e}),
            })
            .collect();
        (vmms, metrics, failures, Some(out.lab_boot.as_secs_f64()), Some(out.total.as_secs_f64()), raw)
    };
    if let Some(p) = &a.raw {
        std::fs::write(p, serde_json::to_vec_pretty(&raw_runs)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let results = report::Results { vmms, metrics, failures, host, lab_boot_s, lab_total_s, setup };
    if a.markdown {
        // The table goes to stderr too, for whoever watches the run.
        eprint!("{}", results.human());
        print!("{}", results.markdown());
    } else {
        print!("{}", results.human());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unquotes() {
        assert_eq!(unquote("/a/b"), "/a/b");
        assert_eq!(unquote("'/a b/c'"), "/a b/c");
        assert_eq!(unquote(r"'it'\''s'"), "it's");
    }
}
