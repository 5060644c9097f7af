//! `kiln-agent client`: the host-side client as a command, for debugging and lab tests. The real
//! host user is kiln-manager, through `kiln_agent_proto::Client`.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use kiln_agent_proto::{Client, CopyFormat, ExecRequest, ShutdownAction, WindowSize, VSOCK_PORT};

use crate::sys;

#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// Firecracker-style vsock host side: the VM's `uds_path` (kiln-vmm, Firecracker).
    #[arg(long, value_name = "PATH", required_unless_present = "unix", conflicts_with = "unix")]
    uds: Option<PathBuf>,
    /// Guest vsock port of the agent.
    #[arg(long, default_value_t = VSOCK_PORT)]
    port: u32,
    /// A plain Unix stream socket instead: QEMU virtio-serial chardev, or `kiln-agent --listen-unix`.
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Seconds to wait for the agent to answer (the guest may still be booting).
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Runs a command; exits with its exit code (128+N when killed by signal N).
    Exec {
        /// Send our stdin to it.
        #[arg(short, long)]
        interactive: bool,
        /// Run it on a terminal (our terminal's size, else 24x80; our terminal is not put in raw mode).
        #[arg(short, long)]
        tty: bool,
        /// KEY=VALUE, repeatable.
        #[arg(short, long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// name, uid, name:group or uid:gid.
        #[arg(short, long)]
        user: Option<String>,
        /// Working directory in the guest.
        #[arg(short = 'w', long)]
        cwd: Option<String>,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        argv: Vec<String>,
    },
    /// Checks the agent answers; prints the round trip time.
    Ping,
    /// Stops every guest process and powers the guest off (or reboots it).
    Shutdown {
        #[arg(long)]
        reboot: bool,
        /// Seconds between SIGTERM and SIGKILL.
        #[arg(long)]
        grace: Option<u64>,
    },
    /// Sets the guest clock to this host's.
    SetTime,
    /// Copies a host file (or with --tar a tar stream, `-` for stdin) into the guest.
    CopyIn {
        #[arg(long)]
        tar: bool,
        /// Octal permission bits of the created file.
        #[arg(long, value_parser = parse_mode)]
        mode: Option<u32>,
        src: PathBuf,
        dst: String,
    },
    /// Copies a guest file (or with --tar a tar stream of a path) to a host file (`-`: stdout).
    CopyOut {
        #[arg(long)]
        tar: bool,
        src: String,
        dst: PathBuf,
    },
    /// Waits for the main process to end; exits with its exit code.
    WaitMain,
    /// Attaches to the main process's output (when it waits for an attach); exits with its code.
    AttachMain,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8).map_err(|e| format!("{s:?} is not an octal mode: {e}"))
}

fn connect(args: &ClientArgs) -> anyhow::Result<Client> {
    let timeout = Duration::from_secs(args.timeout);
    Ok(match (&args.uds, &args.unix) {
        (Some(uds), _) => Client::connect_vsock_uds(uds, args.port, timeout)?,
        (None, Some(path)) => Client::connect_unix(path, timeout)?,
        (None, None) => anyhow::bail!("give --uds PATH (vsock) or --unix PATH"),
    })
}

fn format(tar: bool) -> CopyFormat {
    if tar {
        CopyFormat::Tar
    } else {
        CopyFormat::File
    }
}

/// Runs the client; returns the process exit code.
pub fn run(args: ClientArgs) -> anyhow::Result<i32> {
    let client = connect(&args)?;
    match args.action {
        Action::Exec { interactive, tty, env, user, cwd, argv } => {
            let tty = tty.then(|| {
                sys::window_size(std::io::stdin().as_raw_fd()).unwrap_or(WindowSize { rows: 24, cols: 80 })
            });
            let req = ExecRequest { argv, env, cwd, user, tty, stdin: interactive };
            let p = Arc::new(client.exec(req)?);
            if interactive {
                kiln_agent_proto::Process::forward_stdin(&p, std::io::stdin());
            }
            let status = p.pump(&mut std::io::stdout(), &mut std::io::stderr())?;
            Ok(status.shell_code())
        }
        Action::AttachMain => {
            let p = client.attach_main()?;
            Ok(p.pump(&mut std::io::stdout(), &mut std::io::stderr())?.shell_code())
        }
        Action::WaitMain => {
            let status = client.wait_main()?;
            eprintln!("main process: {status}");
            Ok(status.shell_code())
        }
        Action::Ping => {
            let rtt = client.ping(Duration::from_secs(args.timeout))?;
            let w = client.welcome();
            println!(
                "pong from {} (protocol {}.{}, pid1={}) in {rtt:?}",
                w.software, w.major, w.minor, w.pid1
            );
            Ok(0)
        }
        Action::Shutdown { reboot, grace } => {
            let action = if reboot { ShutdownAction::Reboot } else { ShutdownAction::Poweroff };
            client.shutdown(action, grace.map(Duration::from_secs))?;
            Ok(0)
        }
        Action::SetTime => {
            client.set_time(SystemTime::now())?;
            Ok(0)
        }
        Action::CopyIn { tar, mode, src, dst } => {
            let input: Box<dyn Read> = if src.as_os_str() == "-" {
                Box::new(std::io::stdin())
            } else {
                Box::new(std::fs::File::open(&src).with_context(|| format!("opening {}", src.display()))?)
            };
            let n = client.copy_in(&dst, mode, format(tar), input)?;
            eprintln!("{n} bytes copied to {dst}");
            Ok(0)
        }
        Action::CopyOut { tar, src, dst } => {
            let out: Box<dyn Write> = if dst.as_os_str() == "-" {
                Box::new(std::io::stdout())
            } else {
                Box::new(std::fs::File::create(&dst).with_context(|| format!("creating {}", dst.display()))?)
            };
            let n = client.copy_out(&src, format(tar), out)?;
            eprintln!("{n} bytes copied from {src}");
            Ok(0)
        }
    }
}
