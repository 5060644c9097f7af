//! `kiln`: OCI images in, microVMs out. Parses the command line, calls `kiln-manager` and renders
//! what it returns (tables, JSON, progress bars); holds no business logic. Exit codes: the guest
//! command's for `run` (foreground) and `exec`, 125 for kiln's own errors (like `docker`).

mod progress;
mod signals;
mod term;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use kiln_agent_proto::{ExecRequest, ShutdownAction};
use kiln_hypervisor::BackendKind;
use kiln_image::{Reference, RegistryOptions};
use kiln_manager::lifecycle::AttachOptions;
use kiln_manager::{CreateOptions, Manager, ManagerOptions, VmEntry, VmStatus};
use kiln_network::PortMapping;

/// Exit code for kiln's own errors.
const KILN_ERROR: u8 = 125;

/// `println!` for kiln's results on stdout. A reader that went away (`kiln ps | head -1`) ends
/// kiln quietly with 141 (128 + SIGPIPE, as a shell reports it) instead of a panic; any other
/// write error is reported.
macro_rules! outln {
    ($($arg:tt)*) => {
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            stdout_failed(e)
        }
    };
}

#[derive(Parser, Debug)]
#[command(name = "kiln", version, about = "OCI images in, microVMs out")]
struct Cli {
    /// State root (images, kernels, VMs) [env: KILN_ROOT] [default: /var/lib/kiln].
    #[arg(long, global = true, value_name = "DIR")]
    root: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Pull, import, list, inspect and remove images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// List, import, build and remove guest kernels.
    #[command(subcommand)]
    Kernel(KernelCmd),
    /// List, create and remove networks (bridges VMs attach to).
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Create a VM from an image and start it; in the foreground, stream its output and exit with
    /// its exit code.
    Run(RunArgs),
    /// Create a VM without starting it.
    Create(CreateArgs),
    /// Start created or exited VMs (detached).
    Start {
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Stop VMs gracefully (the agent stops every process and powers off), killing them after a timeout.
    Stop {
        /// Seconds to wait before killing.
        #[arg(short = 't', long = "time", default_value_t = 10)]
        time: u64,
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Kill VMs' VMM processes at once.
    Kill {
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Remove VMs and everything of them on disk.
    Rm {
        /// Kill running VMs first.
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// List VMs.
    Ps {
        /// Exited and created ones too.
        #[arg(short, long)]
        all: bool,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// A VM's record as JSON.
    Inspect { vm: String },
    /// A VM's serial console.
    Logs {
        /// Keep following it while the VM runs.
        #[arg(short, long)]
        follow: bool,
        vm: String,
    },
    /// Run a command in a running VM; exits with its exit code.
    Exec {
        #[arg(short, long)]
        interactive: bool,
        #[arg(short, long)]
        tty: bool,
        #[arg(short, long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        #[arg(short, long)]
        user: Option<String>,
        #[arg(short = 'w', long)]
        workdir: Option<String>,
        vm: String,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// ssh into a VM with its generated key (the system ssh client; the image needs sshd).
    Ssh {
        vm: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Copy a file or directory between the host and a VM: `kiln cp VM:/path host-path` (into host-path
    /// when it is a directory) or `kiln cp host-path VM:/path` (a directory's contents into VM:/path).
    Cp { src: String, dst: String },
    /// Pause VMs' vCPUs.
    Pause {
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Resume paused VMs.
    Resume {
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Which hypervisor backends and accelerators this host can use, and why not.
    Info {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Store maintenance.
    #[command(subcommand)]
    System(SystemCmd),
}

#[derive(Subcommand, Debug)]
enum SystemCmd {
    /// Free unused images, root filesystem caches and kernels, and exited `--rm` VMs.
    Prune,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum ImageCmd {
    /// Pull an image from a registry.
    Pull {
        reference: String,
        /// Registries (host:port) that may be reached over plain HTTP, or over HTTPS without verifying
        /// their certificate. A registry's own CA goes in $KILN_CERTS_DIR, /etc/kiln/certs.d or
        /// /etc/docker/certs.d, as HOST/ca.crt.
        #[arg(long, value_name = "HOST")]
        insecure_registry: Vec<String>,
    },
    /// Import an oci-layout directory or tar, or a `docker save` tar.
    Import {
        path: PathBuf,
        /// Name for an archive that carries none.
        #[arg(long)]
        name: Option<String>,
    },
    /// List images.
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Show an image's details as JSON.
    Inspect { image: String },
    /// Remove images (names, or IDs).
    Rm {
        #[arg(required = true)]
        images: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum NetworkCmd {
    /// Networks, their subnets and how many VMs are on each.
    Ls,
    /// Record a network (its bridge appears with its first VM).
    Create {
        name: String,
        /// IPv4 subnet, e.g. 10.78.0.0/24; the gateway is its first address.
        #[arg(long)]
        subnet: kiln_network::Subnet,
    },
    /// Remove networks: bridge, rules, record.
    Rm {
        /// Detach the VMs still on it (they lose their network).
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum KernelCmd {
    /// List kernels.
    Ls,
    /// Import a kernel file (vmlinux or bzImage) or an image carrying /boot/vmlinux.
    Import {
        source: String,
        #[arg(long)]
        name: Option<String>,
        /// Make it the default kernel.
        #[arg(long)]
        default: bool,
    },
    /// Build the guest kernel from the repository's config fragment (scripts/guest-assets).
    Build {
        #[arg(long, default_value = "kiln-guest")]
        name: String,
        /// The Kiln source tree [env: KILN_REPO] [default: the current directory or a parent].
        #[arg(long)]
        repo: Option<PathBuf>,
    },
    /// Remove a kernel no VM uses.
    Rm { name: String },
}

#[derive(Args, Debug)]
struct CreateArgs {
    #[arg(long)]
    name: Option<String>,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Memory, in MiB or with a suffix (512M, 1G).
    #[arg(long, default_value = "256M", value_parser = parse_size_mib)]
    memory: u32,
    /// Disk size (e.g. 2G); default: the image's size plus headroom.
    #[arg(long, value_parser = parse_size_bytes)]
    disk_size: Option<u64>,
    /// Environment, KEY=VALUE (repeatable), over the image's.
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Publish a port: HOST:GUEST[/tcp|udp], reachable on every host address, loopback included.
    #[arg(short, long = "publish", value_name = "HOST:GUEST")]
    publish: Vec<PortMapping>,
    /// Network to attach to (`kiln network ls`), or `none` [env: KILN_NETWORK] [default: kiln0].
    #[arg(long, value_name = "NAME")]
    network: Option<String>,
    /// Remove the VM when it exits.
    #[arg(long)]
    rm: bool,
    /// Hypervisor backend.
    #[arg(long, default_value = "kiln-vmm")]
    hypervisor: BackendKind,
    /// Kernel name (`kiln kernel ls`); default: the default kernel.
    #[arg(long)]
    kernel: Option<String>,
    image: String,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Run in the background; print the VM's name.
    #[arg(short, long)]
    detach: bool,
    /// Keep stdin open and send it to the command.
    #[arg(short, long)]
    interactive: bool,
    /// Give the command a terminal.
    #[arg(short, long)]
    tty: bool,
    #[command(flatten)]
    create: CreateArgs,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let mult = match s[i..].to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                other => return Err(format!("unknown size suffix {other:?} in {s:?}; use K, M, G or T")),
            };
            (&s[..i], mult)
        }
        None => (s, 0),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("{s:?} is not a size like 512M or 2G"))?;
    Ok(if mult == 0 { n } else { n.saturating_mul(mult) })
}

fn parse_size_mib(s: &str) -> Result<u32, String> {
    let has_suffix = s.chars().any(|c| c.is_ascii_alphabetic());
    let n = parse_size(s)?;
    let mib = if has_suffix { n >> 20 } else { n };
    u32::try_from(mib).map_err(|_| format!("{s:?} is too large"))
}

fn parse_size_bytes(s: &str) -> Result<u64, String> {
    let has_suffix = s.chars().any(|c| c.is_ascii_alphabetic());
    let n = parse_size(s)?;
    Ok(if has_suffix { n } else { n << 20 })
}

fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(141);
    }
    eprintln!("kiln: writing to standard output: {e}");
    std::process::exit(i32::from(KILN_ERROR));
}

fn main() -> ExitCode {
    // Before any thread starts: every thread inherits the blocked signals.
    signals::install();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,kiln_hypervisor=error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(KILN_ERROR)),
        Err(e) => {
            eprintln!("kiln: {e:#}");
            ExitCode::from(KILN_ERROR)
        }
    }
}

fn open(cli_root: &Option<PathBuf>) -> anyhow::Result<Manager> {
    let root = kiln_manager::state_root(cli_root.as_deref());
    Manager::open(&root, ManagerOptions::default())
        .with_context(|| format!("opening the state root {}", root.display()))
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let m = open(&cli.root)?;
    match cli.command {
        Cmd::Image(cmd) => image(&m, cmd),
        Cmd::Kernel(cmd) => kernel(&m, cmd),
        Cmd::Network(cmd) => network(&m, cmd),
        Cmd::Run(args) => run_vm(&m, args),
        Cmd::Create(args) => {
            let entry = create(&m, &args)?;
            outln!("{}", entry.name);
            Ok(0)
        }
        Cmd::Start { vms } => each(&vms, |vm| {
            let started = m.start(vm, None)?;
            notice(started.notice.as_deref());
            Ok(())
        }),
        Cmd::Stop { time, vms } => each(&vms, |vm| m.stop(vm, Duration::from_secs(time)).map(drop)),
        Cmd::Kill { vms } => each(&vms, |vm| m.kill(vm).map(drop)),
        Cmd::Rm { force, vms } => each(&vms, |vm| m.remove(vm, force).map(drop)),
        Cmd::Pause { vms } => each(&vms, |vm| m.set_paused(vm, true).map(drop)),
        Cmd::Resume { vms } => each(&vms, |vm| m.set_paused(vm, false).map(drop)),
        Cmd::Ps { all, format } => {
            let vms = m.list(all)?;
            match format {
                Format::Json => outln!("{}", serde_json::to_string_pretty(&vms)?),
                Format::Table => print_ps(&vms),
            }
            Ok(0)
        }
        Cmd::Inspect { vm } => {
            let entry = m.inspect(&vm)?;
            let mut value = serde_json::to_value(&entry)?;
            value["dir"] = serde_json::json!(m.vm_dir(&vm)?);
            outln!("{}", serde_json::to_string_pretty(&value)?);
            Ok(0)
        }
        Cmd::Logs { follow, vm } => logs(&m, &vm, follow),
        Cmd::Exec { interactive, tty, env, user, workdir, vm, command } => {
            let client = m.agent(&vm)?;
            let tty_size = tty
                .then(|| term::window_size().unwrap_or(kiln_agent_proto::WindowSize { rows: 24, cols: 80 }));
            let req =
                ExecRequest { argv: command, env, cwd: workdir, user, tty: tty_size, stdin: interactive };
            let process = client.exec(req).with_context(|| format!("running the command in {vm}"))?;
            let status = term::attach(process, interactive, tty)?;
            Ok(status.shell_code())
        }
        Cmd::Ssh { vm, command } => {
            let exe = std::env::current_exe().context("finding the kiln program for ssh's ProxyCommand")?;
            let root = kiln_manager::state_root(cli.root.as_deref());
            let proxy: Vec<String> = vec![
                exe.to_string_lossy().into_owned(),
                "--root".into(),
                root.to_string_lossy().into_owned(),
                "exec".into(),
                "-i".into(),
                vm.clone(),
            ];
            let status =
                m.ssh_command(&vm, &proxy, &command)?.status().context("running ssh (openssh-client)")?;
            Ok(status.code().unwrap_or(255))
        }
        Cmd::Cp { src, dst } => {
            let split = |s: &str| -> Option<(String, String)> {
                let (vm, path) = s.split_once(':')?;
                (!vm.contains('/') && path.starts_with('/')).then(|| (vm.to_string(), path.to_string()))
            };
            let n = match (split(&src), split(&dst)) {
                (Some((vm, path)), None) => m.copy_out(&vm, &path, std::path::Path::new(&dst))?,
                (None, Some((vm, path))) => m.copy_in(&vm, std::path::Path::new(&src), &path)?,
                _ => bail!("give exactly one side as VM:/absolute/path, e.g. `kiln cp web:/etc/hostname .`"),
            };
            eprintln!("{n} bytes copied");
            Ok(0)
        }
        Cmd::Info { format } => {
            let report = m.host_report();
            match format {
                Format::Json => outln!("{}", serde_json::to_string_pretty(&report)?),
                Format::Table => {
                    outln!("/dev/kvm: {}", m.probe().kvm);
                    for c in report {
                        let accel = c.accelerator.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
                        let usable = if c.usable { "usable" } else { "unusable" };
                        outln!(
                            "{:<9} {usable:<9} accelerator {accel:<4} agent over {:?}",
                            c.backend,
                            c.agent_transport
                        );
                        if let Some(r) = c.reason {
                            outln!("          why not: {r}");
                        }
                        if let Some(n) = c.notice {
                            outln!("          note: {n}");
                        }
                    }
                }
            }
            Ok(0)
        }
        Cmd::System(SystemCmd::Prune) => {
            let s = m.prune()?;
            outln!(
                "removed {} image(s), {} blob(s), {} cache file(s) ({:.1} MB), kernels [{}], VMs [{}]",
                s.images.images,
                s.images.blobs,
                s.images.caches,
                s.images.bytes as f64 / 1e6,
                s.kernels.join(", "),
                s.vms.join(", ")
            );
            Ok(0)
        }
    }
}

fn notice(notice: Option<&str>) {
    if let Some(n) = notice {
        eprintln!("kiln: note: {n}");
    }
}

/// Runs `f` for every VM; reports each failure, fails if any did.
fn each(vms: &[String], mut f: impl FnMut(&str) -> kiln_manager::Result<()>) -> anyhow::Result<i32> {
    let mut failed = 0;
    for vm in vms {
        match f(vm) {
            Ok(()) => outln!("{vm}"),
            Err(e) => {
                failed += 1;
                eprintln!("kiln: {vm}: {:#}", anyhow::Error::from(e));
            }
        }
    }
    Ok(if failed == 0 { 0 } else { i32::from(KILN_ERROR) })
}

fn create(m: &Manager, args: &CreateArgs) -> anyhow::Result<VmEntry> {
    let network = args
        .network
        .clone()
        .or_else(|| std::env::var("KILN_NETWORK").ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| kiln_network::DEFAULT_NETWORK.to_string());
    let opts = CreateOptions {
        image: args.image.clone(),
        name: args.name.clone(),
        command: args.command.clone(),
        env: args.env.clone(),
        kernel: args.kernel.clone(),
        backend: args.hypervisor,
        vcpus: args.cpus,
        memory_mib: args.memory,
        disk_size: args.disk_size,
        auto_remove: args.rm,
        network: None,
        network_name: (network != "none").then_some(network),
        publish: args.publish.clone(),
    };
    Ok(m.create(&opts, &progress::Bars::new())?)
}

fn run_vm(m: &Manager, args: RunArgs) -> anyhow::Result<i32> {
    let entry = create(m, &args.create)?;
    let name = entry.name.clone();
    if args.detach {
        let started = m.start(&name, None).inspect_err(|_| cleanup(m, &name, args.create.rm))?;
        notice(started.notice.as_deref());
        outln!("{name}");
        return Ok(0);
    }
    let tty = args.tty.then(|| term::window_size().map(|w| (w.rows, w.cols)).unwrap_or((24, 80)));
    let attach = AttachOptions { tty, stdin: args.interactive };
    let started = m.start(&name, Some(attach)).inspect_err(|_| cleanup(m, &name, args.create.rm))?;
    notice(started.notice.as_deref());
    let attached = started.attached.ok_or_else(|| kiln_manager::ManagerError::NoAgentChannel(name.clone()));
    let status = match attached {
        Ok((client, process)) => {
            let status = term::attach(process, args.interactive, args.tty);
            if status.is_ok() && !args.create.rm {
                // The main process ended and its code is ours: power the guest off now (a `--rm`
                // VM is killed by finish_attached instead). Left alone,
                // the agent waits until it sees this connection close (up to its exit linger, 3 s;
                // a virtio-serial port reports the close late: bench/kiln measured it).
                let _ = client.shutdown(ShutdownAction::Poweroff, None);
            }
            drop(client);
            Some(status)
        }
        Err(e) => {
            eprintln!("kiln: {:#}", anyhow::Error::from(e));
            let _ = m.kill(&name);
            None
        }
    };
    let status = match status {
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => {
            eprintln!("kiln: {e:#}");
            None
        }
        None => None,
    };
    let code = m.finish_attached(&name, status)?;
    Ok(if status.is_some() { code } else { i32::from(KILN_ERROR) })
}

/// After a failed start: a `--rm` VM goes away.
fn cleanup(m: &Manager, name: &str, auto_remove: bool) {
    if auto_remove {
        let _ = m.remove(name, true);
    }
}

fn ago(secs: u64) -> String {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let d = now.saturating_sub(secs);
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

fn print_ps(vms: &[VmEntry]) {
    outln!("{:<12}  {:<20}  {:<28}  {:<14}  {:<9}  CREATED", "ID", "NAME", "IMAGE", "STATUS", "BACKEND");
    for e in vms {
        let status = match (e.status, e.exit_code()) {
            (VmStatus::Exited, Some(code)) => format!("exited ({code})"),
            (s, _) => s.to_string(),
        };
        let image: String = e.image.chars().take(28).collect();
        outln!(
            "{:<12}  {:<20}  {image:<28}  {status:<14}  {:<9}  {}",
            &e.id[..12.min(e.id.len())],
            e.name,
            e.backend.to_string(),
            ago(e.created_at)
        );
    }
}

fn logs(m: &Manager, vm: &str, follow: bool) -> anyhow::Result<i32> {
    let path = m.console_log(vm)?;
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !follow => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = file.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n > 0 {
            out.write_all(&buf[..n])?;
            continue;
        }
        out.flush()?;
        if !follow || !m.inspect(vm)?.status.is_live() {
            // One last read: the guest's final lines may have landed after the check.
            let pos = file.stream_position()?;
            file.seek(SeekFrom::Start(pos))?;
            let mut rest = Vec::new();
            file.read_to_end(&mut rest)?;
            out.write_all(&rest)?;
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn image(m: &Manager, cmd: ImageCmd) -> anyhow::Result<i32> {
    let images = m.images();
    match cmd {
        ImageCmd::Pull { reference, insecure_registry } => {
            let r = Reference::parse(&reference)?;
            let mut options =
                RegistryOptions { insecure_registries: insecure_registry, ..Default::default() };
            if let Some(dir) = std::env::var_os("KILN_CERTS_DIR").filter(|d| !d.is_empty()) {
                options.certs_dirs.insert(0, PathBuf::from(dir));
            }
            let s = images.pull(&r, &options, &progress::Bars::new())?;
            outln!("{} {}", r.name(), s.id);
        }
        ImageCmd::Import { path, name } => {
            let name = name.map(|n| Reference::parse(&n)).transpose()?;
            for s in images.import(&path, name.as_ref(), &progress::Bars::new())? {
                outln!("{} {}", s.names.join(","), s.id);
            }
        }
        ImageCmd::Ls { format } => {
            let list = images.list()?;
            match format {
                Format::Json => {
                    let rows: Vec<_> = list
                        .iter()
                        .map(|s| serde_json::json!({"names": s.names, "id": s.id.to_string(), "digest": s.digest.to_string(), "size": s.size, "added_at": s.added_at}))
                        .collect();
                    outln!("{}", serde_json::to_string_pretty(&rows)?);
                }
                Format::Table => {
                    outln!("{:<50}  {:<19}  {:>10}  ADDED", "NAME", "ID", "SIZE");
                    for s in list {
                        let id: String = s.id.to_string().chars().skip(7).take(12).collect();
                        let names =
                            if s.names.is_empty() { vec!["<none>".to_string()] } else { s.names.clone() };
                        for n in names {
                            outln!("{n:<50}  {id:<19}  {:>7.1} MB  {}", s.size as f64 / 1e6, ago(s.added_at));
                        }
                    }
                }
            }
        }
        ImageCmd::Inspect { image } => {
            let d = images.inspect(&image)?;
            let value = serde_json::json!({
                "names": d.summary.names, "id": d.summary.id.to_string(), "digest": d.summary.digest.to_string(),
                "size": d.summary.size, "os": d.summary.os, "architecture": d.summary.architecture,
                "created": d.created, "config": d.config,
                "layers": d.layers.iter().map(|l| serde_json::json!({"digest": l.digest.to_string(), "size": l.size, "mediaType": l.media_type})).collect::<Vec<_>>(),
            });
            outln!("{}", serde_json::to_string_pretty(&value)?);
        }
        ImageCmd::Rm { images: names } => {
            let mut failed = false;
            for n in names {
                match images.remove(&n) {
                    Ok(r) => {
                        for u in r.untagged {
                            outln!("untagged {u}");
                        }
                        if let Some(d) = r.deleted {
                            outln!("deleted {d}");
                        }
                    }
                    Err(e) => {
                        failed = true;
                        eprintln!("kiln: {n}: {:#}", anyhow::Error::from(e));
                    }
                }
            }
            return Ok(if failed { i32::from(KILN_ERROR) } else { 0 });
        }
    }
    Ok(0)
}

fn network(m: &Manager, cmd: NetworkCmd) -> anyhow::Result<i32> {
    let nets = m.networks();
    match cmd {
        NetworkCmd::Ls => {
            nets.ensure_default()?;
            outln!("{:<16}  {:<18}  {:<16}  VMS", "NAME", "SUBNET", "GATEWAY");
            for n in nets.list()? {
                let vms = nets.leases(&n.name)?.len();
                outln!("{:<16}  {:<18}  {:<16}  {vms}", n.name, n.subnet.to_string(), n.gateway.to_string());
            }
            Ok(0)
        }
        NetworkCmd::Create { name, subnet } => {
            nets.create(&kiln_network::NetworkConfig::new(&name, subnet)?)?;
            outln!("{name}");
            Ok(0)
        }
        NetworkCmd::Rm { force, names } => {
            each(&names, |name| nets.remove(name, force).map_err(kiln_manager::ManagerError::from))
        }
    }
}

fn kernel(m: &Manager, cmd: KernelCmd) -> anyhow::Result<i32> {
    match cmd {
        KernelCmd::Ls => {
            outln!("{:<24}  {:>10}  {:<8}  SOURCE", "NAME", "SIZE", "DEFAULT");
            for k in m.kernels().list()? {
                let default = if k.default { "yes" } else { "" };
                outln!("{:<24}  {:>7.1} MB  {default:<8}  {}", k.name, k.size as f64 / 1e6, k.source);
            }
        }
        KernelCmd::Import { source, name, default } => {
            let k =
                m.kernels().import(m.images(), &source, name.as_deref(), default, &progress::Bars::new())?;
            outln!("{}{}", k.name, if k.default { " (default)" } else { "" });
        }
        KernelCmd::Build { name, repo } => {
            let repo = match repo.or_else(|| std::env::var_os("KILN_REPO").map(PathBuf::from)) {
                Some(r) => r,
                None => {
                    let cwd = std::env::current_dir()?;
                    cwd.ancestors()
                        .find(|d| d.join("scripts/guest-assets").is_file())
                        .map(|d| d.to_path_buf())
                        .context("not inside a Kiln source tree: give --repo or set KILN_REPO")?
                }
            };
            let vmlinux = kiln_manager::KernelStore::build(&repo)?;
            let k = m.kernels().import(
                m.images(),
                &vmlinux.to_string_lossy(),
                Some(&name),
                false,
                &kiln_image::NoProgress,
            )?;
            outln!("{}{}", k.name, if k.default { " (default)" } else { "" });
        }
        KernelCmd::Rm { name } => {
            m.remove_kernel(&name)?;
            outln!("{name}");
        }
    }
    Ok(0)
}
