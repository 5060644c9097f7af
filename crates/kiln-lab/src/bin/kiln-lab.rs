//! `kiln-lab`: run one shell command inside the nested-KVM lab, or check that the lab works.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

/// Runs a shell command inside the lab (a QEMU/TCG VM with Debian's kernel and kvm_amd, i.e. a
/// real /dev/kvm) and exits with its exit code.
#[derive(Parser, Debug)]
#[command(name = "kiln-lab", version)]
struct Args {
    /// Carry an executable and its ldd closure: SRC[:DST] (DST defaults to /usr/bin/<name>).
    #[arg(long, value_name = "SRC[:DST]")]
    binary: Vec<String>,
    /// Carry a file: SRC:DST.
    #[arg(long, value_name = "SRC:DST")]
    file: Vec<String>,
    /// Carry a directory recursively: SRC:DST.
    #[arg(long, value_name = "SRC:DST")]
    dir: Vec<String>,
    /// Attach a host file as a virtio-blk disk (/dev/vda, /dev/vdb, ... in order).
    #[arg(long, value_name = "PATH")]
    disk: Vec<PathBuf>,
    /// Extra kernel modules to load in the lab (with dependencies), e.g. ext4.
    #[arg(long, value_name = "NAME")]
    module: Vec<String>,
    /// Extra argument for the lab kernel's command line (e.g. `loglevel=7`).
    #[arg(long, value_name = "ARG")]
    kernel_arg: Vec<String>,
    /// Lab timeout in seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// vCPUs of the lab VM.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Also print the lab's console (kernel log and init output) to stderr.
    #[arg(long)]
    console: bool,
    /// Print the whole report as JSON on stdout instead of the step's output.
    #[arg(long)]
    json: bool,
    /// Boot the lab without payload, check /dev/kvm works inside and print timings.
    #[arg(long, conflicts_with = "command")]
    check: bool,
    /// The shell command to run in the lab (`/bin/sh -c`).
    #[arg(last = true)]
    command: Vec<String>,
}

fn split_pair(s: &str, what: &str) -> Result<(PathBuf, String)> {
    let (src, dst) = s.split_once(':').with_context(|| format!("--{what} {s}: expected SRC:DST"))?;
    Ok((PathBuf::from(src), dst.to_string()))
}

fn lab(args: &Args) -> Result<kiln_lab::Lab> {
    let modules: Vec<&str> = args.module.iter().map(String::as_str).collect();
    let mut lab = kiln_lab::Lab::with_modules(&modules).context("preparing the lab")?;
    if let Some(t) = lab.base_build_time() {
        eprintln!("kiln-lab: built the lab base in {:.1}s ({})", t.as_secs_f64(), lab.base_dir().display());
    }
    for b in &args.binary {
        let (src, dst) = match b.split_once(':') {
            Some((s, d)) => (PathBuf::from(s), d.to_string()),
            None => {
                let src = PathBuf::from(b);
                let name = src.file_name().with_context(|| format!("--binary {b}: no file name"))?;
                let dst = format!("/usr/bin/{}", name.to_string_lossy());
                (src, dst)
            }
        };
        lab = lab.binary(src, &dst);
    }
    for f in &args.file {
        let (src, dst) = split_pair(f, "file")?;
        lab = lab.file(src, &dst);
    }
    for d in &args.dir {
        let (src, dst) = split_pair(d, "dir")?;
        lab = lab.dir(src, &dst);
    }
    for d in &args.disk {
        lab = lab.disk(d);
    }
    for a in &args.kernel_arg {
        lab = lab.kernel_arg(a);
    }
    Ok(lab.timeout(Duration::from_secs(args.timeout)).cpus(args.cpus))
}

fn step_json(s: &kiln_lab::StepResult) -> serde_json::Value {
    serde_json::json!({
        "name": s.name,
        "exit_code": s.exit_code,
        "signal": s.signal,
        "stdout": s.stdout_str(),
        "stderr": s.stderr_str(),
        "wall_us": s.wall.as_micros() as u64,
        "user_us": s.user.as_micros() as u64,
        "sys_us": s.system.as_micros() as u64,
        "max_rss_kib": s.max_rss_kib,
        "background": s.background,
        "killed": s.killed,
    })
}

fn check(args: &Args) -> Result<i32> {
    let report = lab(args)?
        .step("kvm", "/lab/runner kvm-check && ls -l /dev/kvm")
        .step("dmesg", "dmesg | grep -iE 'svm|kvm|nested' || true")
        .run()
        .context("running the lab")?;
    if args.console {
        eprintln!("{}", report.console);
    }
    let kvm = report.step("kvm")?;
    let dmesg = report.step("dmesg")?;
    print!("{}{}", kvm.stdout_str(), dmesg.stdout_str());
    println!(
        "lab boot (QEMU start -> step runner): {:.2}s host, {:.2}s guest uptime; total run {:.2}s",
        report.lab_boot_time.as_secs_f64(),
        report.guest_boot_time.as_secs_f64(),
        report.total_time.as_secs_f64()
    );
    let nested = dmesg.stdout_str().contains("Nested Paging enabled");
    if kvm.success() && nested {
        println!("ok: /dev/kvm works in the lab (nested paging enabled)");
        Ok(0)
    } else {
        eprint!("{}", kvm.stderr_str());
        println!("FAILED: /dev/kvm check exit code {}, nested paging line found: {nested}", kvm.exit_code);
        Ok(1)
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let code = if args.check {
        check(&args)?
    } else {
        if args.command.is_empty() {
            bail!("nothing to run: give a command after `--`, or --check");
        }
        let command = args.command.join(" ");
        let lab = lab(&args)?.step("cmd", &command);
        let report = if args.json {
            lab.run()
        } else {
            lab.run_with(|ev| {
                if let kiln_lab::LabEvent::Output { stream, data, .. } = ev {
                    // Best effort: a closed stdout must not abort the lab run.
                    let _ = match stream {
                        kiln_lab::OutputStream::Stdout => {
                            std::io::stdout().write_all(data).and_then(|_| std::io::stdout().flush())
                        }
                        kiln_lab::OutputStream::Stderr => std::io::stderr().write_all(data),
                    };
                }
            })
        }
        .context("running the lab")?;
        if args.console {
            eprintln!("{}", report.console);
        }
        let step = report.step("cmd")?;
        if args.json {
            let json = serde_json::json!({
                "lab_boot_us": report.lab_boot_time.as_micros() as u64,
                "guest_boot_us": report.guest_boot_time.as_micros() as u64,
                "total_us": report.total_time.as_micros() as u64,
                "steps": report.steps.iter().map(step_json).collect::<Vec<_>>(),
            });
            println!("{json:#}");
        } else {
            if step.stderr.last().is_some_and(|&b| b != b'\n') {
                eprintln!();
            }
            eprintln!(
                "kiln-lab: exit {} in {:.6}s, max RSS {} KiB (lab boot {:.2}s)",
                step.exit_code,
                step.wall.as_secs_f64(),
                step.max_rss_kib,
                report.lab_boot_time.as_secs_f64()
            );
        }
        step.exit_code
    };
    std::process::exit(code);
}
