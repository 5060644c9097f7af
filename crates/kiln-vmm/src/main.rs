//! The `kiln-vmm` binary: parses arguments, loads a Firecracker-format configuration, builds the VM
//! and runs it until the guest stops. Exit codes are in `kiln_vmm::exit_code`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::Parser;
use kiln_devices::legacy::boot_timer::StartTime;
use kiln_fc_api::models::{LogLevel, Logger};
use kiln_vmm::api::VmmApi;
use kiln_vmm::builder::{self, BuildOptions, StartMicrovmError};
use kiln_vmm::controller::{Controller, ControllerOptions, VmmAction};
use kiln_vmm::exit_code;
use kiln_vmm::kvm_host::{self, KvmHost};
use kiln_vmm::logger::{self, LogSettings, LoggerError};
use kiln_vmm::metrics::{self, METRICS};
use kiln_vmm::resources::{self, SerialOutput, VmResources};
use kiln_vmm::vmm::VmExit;

#[derive(Parser, Debug)]
#[command(
    name = "kiln-vmm",
    version,
    about = "Kiln's KVM microVM monitor (Firecracker-compatible configuration)"
)]
struct Args {
    /// Firecracker-format VM configuration file (boot-source, drives, machine-config, ...).
    #[arg(long, value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// Don't serve the API socket; the VM is fully described by --config-file.
    #[arg(long)]
    no_api: bool,
    /// Serve the Firecracker-compatible API on this Unix socket (default /run/firecracker.socket).
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Instance id, shown in logs.
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// Log level: Error, Warning, Info, Debug, Trace or Off (case-insensitive).
    #[arg(long)]
    level: Option<String>,
    /// Write the log here instead of stderr.
    #[arg(long, value_name = "PATH")]
    log_path: Option<PathBuf>,
    /// Include the level in log lines.
    #[arg(long)]
    show_level: bool,
    /// Include the source file and line in log lines.
    #[arg(long)]
    show_log_origin: bool,
    /// Only log events from this module path (e.g. kiln_vmm::api).
    #[arg(long, value_name = "MODULE")]
    module: Option<String>,
    /// Write Firecracker-format metrics (JSON lines) to this file or named pipe.
    #[arg(long, value_name = "PATH")]
    metrics_path: Option<PathBuf>,
    /// Accepted for Firecracker compatibility: the boot timer is always present.
    #[arg(long)]
    boot_timer: bool,
    /// Accepted for Firecracker compatibility: kiln-vmm does not install seccomp filters yet.
    #[arg(long)]
    no_seccomp: bool,
    /// Write the guest's serial console here instead of stdout.
    #[arg(long, value_name = "PATH")]
    serial_out: Option<PathBuf>,
    /// Don't feed stdin to the guest's serial console.
    #[arg(long)]
    no_stdin: bool,
    /// Run even though /dev/kvm is PVM (only PVM-enabled guest kernels boot there).
    #[arg(long)]
    allow_pvm: bool,
    /// Largest MMDS data store, in bytes of JSON (PUT/PATCH /mmds beyond it are refused).
    #[arg(long, value_name = "BYTES", default_value_t = kiln_mmds::DEFAULT_SIZE_LIMIT)]
    mmds_size_limit: usize,
    /// JSON file to fill the MMDS data store with at start (as PUT /mmds would).
    #[arg(long, value_name = "FILE")]
    metadata: Option<PathBuf>,
}

/// An error to report and the exit code that goes with it.
struct Failure {
    code: i32,
    message: String,
}

fn chain(e: &dyn std::error::Error) -> String {
    kiln_vmm::error_chain(e)
}

fn fail(code: i32, message: impl Into<String>) -> Failure {
    Failure { code, message: message.into() }
}

/// The log settings: the config file's `logger` section, then the command line on top.
fn log_settings(args: &Args, cfg: Option<&Logger>) -> Result<LogSettings, Failure> {
    let mut settings = LogSettings::default();
    if let Some(c) = cfg {
        settings.apply(c);
    }
    let level = match &args.level {
        Some(l) => Some(l.parse::<LogLevel>().map_err(|()| {
            fail(
                exit_code::ARG_PARSING,
                format!("unknown log level '{l}': use Error, Warning, Info, Debug, Trace or Off"),
            )
        })?),
        None => None,
    };
    settings.apply(&Logger {
        log_path: args.log_path.clone(),
        level,
        show_level: args.show_level.then_some(true),
        show_log_origin: args.show_log_origin.then_some(true),
        module: args.module.clone(),
    });
    Ok(settings)
}

fn init_logging(args: &Args, cfg: Option<&Logger>) -> Result<(), Failure> {
    logger::init(log_settings(args, cfg)?).map_err(|e| {
        let code = match &e {
            LoggerError::Module { .. } if args.module.is_some() => exit_code::ARG_PARSING,
            LoggerError::Open { .. } | LoggerError::Module { .. } => exit_code::BAD_CONFIGURATION,
            _ => exit_code::VMM_ERROR,
        };
        fail(code, chain(&e))
    })
}

/// Starts the metrics from `--metrics-path` or the config file's `metrics` section.
fn init_metrics(args: &Args, cfg: Option<&kiln_fc_api::models::Metrics>) -> Result<(), Failure> {
    if let Some(path) = args.metrics_path.as_ref().or(cfg.map(|m| &m.metrics_path)) {
        metrics::init(path).map_err(|e| fail(exit_code::BAD_CONFIGURATION, chain(&e)))?;
    }
    if args.metrics_path.is_some() && cfg.is_some() {
        tracing::warn!("--metrics-path overrides the config file's metrics section");
    }
    Ok(())
}

/// Puts a terminal on stdin into raw mode for the guest console and restores it on drop.
struct RawTerminal(Option<libc::termios>);

impl RawTerminal {
    fn enable() -> Self {
        if !std::io::stdin().is_terminal() {
            return Self(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it for fd 0, which is a terminal.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: as above; the pointer is to our local.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } != 0 {
            return Self(None);
        }
        let saved = t;
        // Keep ISIG so Ctrl-C still reaches the VMM; pass everything else through to the guest.
        t.c_lflag &= !(libc::ICANON | libc::ECHO);
        // SAFETY: sets attributes of fd 0 from a termios we initialised from it.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
        Self(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(t) = self.0 {
            // SAFETY: restores the attributes saved from fd 0.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
        }
    }
}

fn start_error_code(e: &StartMicrovmError) -> i32 {
    match e {
        StartMicrovmError::Drive { .. }
        | StartMicrovmError::Rng(_)
        | StartMicrovmError::Net { .. }
        | StartMicrovmError::Vsock(_)
        | StartMicrovmError::Balloon(_)
        | StartMicrovmError::Load(_)
        | StartMicrovmError::TooManyVcpus { .. }
        | StartMicrovmError::MemoryBeyondAddressSpace { .. }
        | StartMicrovmError::MemoryMap { .. } => exit_code::BAD_CONFIGURATION,
        _ => exit_code::VMM_ERROR,
    }
}

/// Reads and validates a config file (exit code 152 on any problem).
fn load_config(path: &std::path::Path) -> Result<kiln_fc_api::models::FullVmConfiguration, Failure> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        fail(exit_code::BAD_CONFIGURATION, format!("cannot read config file {}: {e}", path.display()))
    })?;
    kiln_fc_api::models::parse_config_file(&text)
        .map_err(|e| fail(exit_code::BAD_CONFIGURATION, format!("{}: {}", path.display(), chain(&e))))
}

fn open_serial_out(path: Option<&PathBuf>) -> Result<Box<dyn Write + Send>, Failure> {
    Ok(match path {
        None => Box::new(std::io::stdout()),
        Some(p) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(p).map_err(|e| {
            fail(exit_code::BAD_CONFIGURATION, format!("cannot open serial output {}: {e}", p.display()))
        })?),
    })
}

/// The MMDS store, filled from `--metadata` when given.
fn mmds_store(args: &Args) -> Result<kiln_mmds::SharedMmds, Failure> {
    let store = kiln_mmds::Mmds::shared(args.mmds_size_limit);
    if let Some(path) = &args.metadata {
        let text = std::fs::read_to_string(path).map_err(|e| {
            fail(exit_code::BAD_CONFIGURATION, format!("cannot read metadata file {}: {e}", path.display()))
        })?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            fail(
                exit_code::BAD_CONFIGURATION,
                format!("metadata file {} is not valid JSON: {e}", path.display()),
            )
        })?;
        kiln_devices::bus::lock(&store).put(value).map_err(|e| {
            fail(exit_code::BAD_CONFIGURATION, format!("metadata file {}: {e}", path.display()))
        })?;
    }
    Ok(store)
}

/// Firecracker's default API socket path.
const DEFAULT_API_SOCK: &str = "/run/firecracker.socket";

/// Serves the Firecracker API until the VM it starts ends (or forever, if none is started).
fn run_api(args: &Args, start: StartTime) -> Result<i32, Failure> {
    let mut cfg = args.config_file.as_deref().map(load_config).transpose()?;
    let mmds = mmds_store(args)?;
    init_logging(args, cfg.as_ref().and_then(|c| c.logger.as_ref()))?;
    // Logger and metrics are process settings, applied now rather than kept with the VM's.
    init_metrics(args, cfg.as_mut().and_then(|c| c.metrics.take()).as_ref())?;
    if let Some(c) = cfg.as_mut() {
        c.logger = None;
    }
    let sock = args.api_sock.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_API_SOCK));
    let server = kiln_fc_api::server::ApiServer::bind(&sock).map_err(|e| {
        fail(exit_code::ARG_PARSING, format!("cannot serve the API on {}: {}", sock.display(), chain(&e)))
    })?;
    let (exit_tx, exit_rx) = std::sync::mpsc::channel();
    let controller = std::sync::Arc::new(Controller::new(ControllerOptions {
        start,
        serial_out: kiln_vmm::controller::SharedWriter::new(open_serial_out(args.serial_out.as_ref())?),
        serial_in: !args.no_stdin,
        allow_pvm: args.allow_pvm,
        exit_tx,
        mmds,
    }));
    let handle = server
        .spawn(std::sync::Arc::new(VmmApi { controller: controller.clone(), instance_id: args.id.clone() }))
        .map_err(|e| fail(exit_code::VMM_ERROR, format!("cannot start the API server: {}", chain(&e))))?;
    tracing::info!("serving the API on {}", sock.display());
    METRICS
        .api_server
        .process_startup_time_us
        .set(u64::try_from(start.wall.elapsed().as_micros()).unwrap_or(0));
    METRICS
        .api_server
        .process_startup_time_cpu_us
        .set(kiln_devices::legacy::boot_timer::process_cpu_time_us().saturating_sub(start.cpu_us));
    let _terminal = if args.no_stdin { RawTerminal(None) } else { RawTerminal::enable() };
    if let Some(cfg) = cfg {
        // As Firecracker: a config file given with the API boots the VM right away.
        controller
            .load_config(cfg)
            .and_then(|()| controller.handle(VmmAction::Start))
            .map_err(|e| fail(exit_code::BAD_CONFIGURATION, e.to_string()))?;
    }
    let code = exit_rx.recv().unwrap_or(exit_code::VMM_ERROR);
    metrics::flush_at_exit();
    let _ = std::io::stdout().flush();
    handle.shutdown();
    let _ = std::fs::remove_file(&sock);
    Ok(code)
}

fn run(start: StartTime) -> Result<i32, Failure> {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => exit_code::ARG_PARSING,
            };
            if code == 0 {
                let _ = e.print();
                return Ok(code);
            }
            // One line: clap's first line ("error: ...") without the usage block.
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            return Err(fail(code, format!("{first} (see --help)")));
        }
    };
    if !args.no_api {
        return run_api(&args, start);
    }
    let Some(config_path) = args.config_file.clone() else {
        return Err(fail(exit_code::ARG_PARSING, "--no-api needs --config-file FILE (see --help)"));
    };
    let text = std::fs::read_to_string(&config_path).map_err(|e| {
        fail(exit_code::BAD_CONFIGURATION, format!("cannot read config file {}: {e}", config_path.display()))
    })?;
    let cfg = kiln_fc_api::models::parse_config_file(&text).map_err(|e| {
        fail(exit_code::BAD_CONFIGURATION, format!("{}: {}", config_path.display(), chain(&e)))
    })?;
    let mut res = VmResources::from_config(&cfg, resources::host_memory_mib()).map_err(|e| {
        fail(exit_code::BAD_CONFIGURATION, format!("{}: {}", config_path.display(), chain(&e)))
    })?;
    if let Some(p) = &args.serial_out {
        res.serial = SerialOutput::File(p.clone());
    }
    init_logging(&args, cfg.logger.as_ref())?;
    init_metrics(&args, cfg.metrics.as_ref())?;
    tracing::debug!("kiln-vmm {} starting instance {}", env!("CARGO_PKG_VERSION"), args.id);

    let mut backends = builder::open_backends(&res).map_err(|e| fail(start_error_code(&e), chain(&e)))?;
    let mmds = mmds_store(&args)?;
    builder::attach_mmds(&mut backends, &res, &mmds).map_err(|e| fail(start_error_code(&e), chain(&e)))?;

    if kvm_host::host_is_pvm() && !args.allow_pvm {
        return Err(fail(exit_code::KVM_UNAVAILABLE, kvm_host::PVM_EXPLANATION));
    }
    tracing::debug!("config and backends ready at +{} us", start.wall.elapsed().as_micros());
    let host = KvmHost::open().map_err(|e| fail(exit_code::KVM_UNAVAILABLE, chain(&e)))?;
    tracing::debug!("KVM capabilities read at +{} us", start.wall.elapsed().as_micros());

    let serial_out: Box<dyn Write + Send> = match &res.serial {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::File(p) => {
            Box::new(std::fs::OpenOptions::new().create(true).append(true).open(p).map_err(|e| {
                fail(exit_code::BAD_CONFIGURATION, format!("cannot open serial output {}: {e}", p.display()))
            })?)
        }
    };
    let vmm = builder::build_microvm(
        &res,
        backends,
        &host,
        BuildOptions { serial_out, serial_in: !args.no_stdin, serial_out_limit: None, start },
    )
    .map_err(|e| fail(start_error_code(&e), chain(&e)))?;

    let _terminal = if args.no_stdin { RawTerminal(None) } else { RawTerminal::enable() };
    let exit = vmm.run().map_err(|e| fail(exit_code::VMM_ERROR, chain(&e)));
    metrics::flush_at_exit();
    let exit = exit?;
    let _ = std::io::stdout().flush();
    Ok(match exit {
        VmExit::GuestStopped(why) => {
            tracing::info!("VM stopped: {why}");
            exit_code::OK
        }
        VmExit::Failed(why) => {
            tracing::error!("VM failed: {why}");
            eprintln!("kiln-vmm: the VM failed: {why}");
            exit_code::VM_FAILED
        }
    })
}

fn main() {
    let start = StartTime::now();
    let code = match run(start) {
        Ok(code) => code,
        Err(f) => {
            eprintln!("kiln-vmm: {}", f.message);
            f.code
        }
    };
    std::process::exit(code);
}
