//! `kiln-agent`: the in-guest agent.
//!
//! Owns: running the image's main process (entrypoint + cmd, from the host's `Configure` or
//! `/etc/kiln/agent.json`) and
//! whatever the host asks over `kiln-agent-proto` (exec with pipes or a pty, stdin, signals, exit
//! codes, file copies, clock, shutdown), as the guest's PID 1 (mounting /proc, /sys, /dev, /dev/pts,
//! /dev/shm, /run, reaping every zombie, powering the VM off) or under another init. Transports:
//! AF_VSOCK port 1024 and the virtio-serial port `kiln.agent`; `--listen-unix PATH` serves a Unix
//! socket for tests and debugging, without touching the machine. `kiln-agent client ...` is the
//! host side as a command.
//!
//! Must not: depend on anything the guest root filesystem may lack. It is built static
//! (`scripts/build-agent`: glibc with `+crt-static`) and never calls NSS (users and groups are parsed
//! from the guest's /etc/passwd and /etc/group).

mod agent;
mod client_cmd;
mod config;
mod copy;
mod init;
mod reaper;
mod server;
mod spawn;
mod sys;
mod transport;
mod user;

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;

use clap::Parser;
use kiln_agent_proto::{VIRTIO_PORT_NAME, VSOCK_PORT};

use crate::agent::{Agent, Role};
use crate::config::DEFAULT_CONFIG_PATH;

#[derive(Debug, Parser)]
#[command(name = "kiln-agent", version, about = "Kiln's in-guest agent (and, with `client`, its host side)")]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Agent configuration (main process, hostname, power-off method), when the host does not
    /// send one (`Configure`): an agent under another init, or a hand-made guest.
    #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// AF_VSOCK port to listen on.
    #[arg(long, default_value_t = VSOCK_PORT)]
    vsock_port: u32,
    /// Do not listen on vsock.
    #[arg(long)]
    no_vsock: bool,
    /// Name of the virtio-serial port to serve (and `NAME.1`, `NAME.2`, ... when present).
    #[arg(long, default_value = VIRTIO_PORT_NAME)]
    virtio_port: String,
    /// Do not serve a virtio-serial port.
    #[arg(long)]
    no_virtio_port: bool,
    /// For tests and debugging on a host: serve this Unix socket instead of vsock/virtio-serial, as
    /// a normal process (no mounts, no clock changes, no power-off: Shutdown stops only the agent
    /// and its processes).
    #[arg(long, value_name = "PATH")]
    listen_unix: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Host side: talk to an agent (debugging, lab tests).
    Client(client_cmd::ClientArgs),
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn init_logging(pid1: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_AGENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!pid1)
        .with_target(false)
        .try_init();
}

fn main() {
    let pid1 = sys::getpid() == 1;
    let args = if pid1 {
        // The kernel hands init the bare words of its command line: never refuse to boot over them.
        Args::try_parse().unwrap_or_else(|e| {
            eprintln!(
                "kiln-agent: ignoring unusable arguments: {}",
                e.to_string().lines().next().unwrap_or("")
            );
            Args::parse_from(["kiln-agent"])
        })
    } else {
        Args::parse()
    };
    if let Some(Command::Client(c)) = args.command {
        init_logging(false);
        match client_cmd::run(c) {
            Ok(code) => std::process::exit(code),
            Err(e) => {
                eprintln!("kiln-agent client: {}", error_chain(e.as_ref()));
                std::process::exit(125);
            }
        }
    }
    let role = match (&args.listen_unix, pid1) {
        (Some(_), _) => Role::Test,
        (None, true) => Role::Init,
        (None, false) => Role::Service,
    };
    run_agent(args, role);
}

fn run_agent(args: Args, role: Role) -> ! {
    let (config, config_error) = match config::load(&args.config) {
        Ok(c) => (c, None),
        Err(e) => {
            let text = error_chain(&e);
            eprintln!("KILN-AGENT-ERROR {text}");
            // Unconfigured: the host's Configure may still give this boot a configuration.
            (None, Some(text))
        }
    };
    if role == Role::Init {
        init::setup_pid1();
        if let Some(config) = &config {
            init::apply_guest_config(config);
        }
    }
    init_logging(role == Role::Init);
    // Blocked in every thread (they inherit the mask); only the signal thread takes them. Children
    // start with an empty mask (std resets it between fork and exec).
    let signals = sys::SignalSet::new(&[
        libc::SIGCHLD,
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGPWR,
        // A virtio-serial port's host side connected or sent data (transport::serve_virtio_port).
        libc::SIGIO,
    ]);
    if let Err(e) = signals.block() {
        eprintln!("kiln-agent: cannot block signals: {e}");
    }
    let (stop_tx, stop_rx) = mpsc::channel();
    let agent = Arc::new(Agent::new(role, config, config_error, stop_tx));
    tracing::info!("kiln-agent {} started ({role:?}, pid {})", env!("CARGO_PKG_VERSION"), sys::getpid());

    let a = agent.clone();
    std::thread::spawn(move || loop {
        match signals.wait() {
            Ok(libc::SIGCHLD) => a.reaper.reap(),
            Ok(libc::SIGIO) => transport::virtio_host_event(),
            Ok(sig) => {
                if let Some(req) = init::stop_for_signal(a.role, sig) {
                    a.request_stop(req);
                }
            }
            Err(e) => {
                tracing::error!("sigwait: {e}");
                return;
            }
        }
    });
    // A child may have exited before the signal thread existed.
    agent.reaper.reap();

    match &args.listen_unix {
        Some(path) => {
            if let Err(e) = transport::serve_unix(agent.clone(), path.clone()) {
                eprintln!("kiln-agent: cannot listen on {}: {e}", path.display());
                std::process::exit(1);
            }
        }
        None => {
            if !args.no_vsock {
                let a = agent.clone();
                let port = args.vsock_port;
                std::thread::spawn(move || transport::serve_vsock(a, port));
            }
            if !args.no_virtio_port {
                // `kiln.agent` and its siblings `kiln.agent.1`, ...: one host per port at a time.
                let ports = transport::virtio_port_family(&args.virtio_port);
                if ports.is_empty() {
                    tracing::info!("no virtio-serial port named {}", args.virtio_port);
                }
                for (name, path) in ports {
                    let a = agent.clone();
                    std::thread::spawn(move || transport::serve_virtio_port(a, name, path));
                }
            }
        }
    }
    agent.start_detached_main();

    let req = stop_rx.recv().unwrap_or(agent::StopRequest {
        kind: agent::StopKind::AgentOnly,
        grace: agent::DEFAULT_GRACE,
        reason: "internal: stop channel closed".into(),
    });
    init::stop(&agent, req)
}
