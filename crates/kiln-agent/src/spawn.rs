//! Starting a process the way an OCI runtime would: exact env (plus PATH/HOME/TERM defaults), the
//! user's uid/gid/supplementary groups from the guest's files, working directory, its own session
//! (so signals and hangups reach its whole process group), stdio on pipes, a pty, or the console.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;

use kiln_agent_proto::{ExecRequest, ExitStatus, WindowSize};

use crate::reaper::Reaper;
use crate::sys;
use crate::user::{self, UserError};

/// PATH given to processes whose env has none (the OCI/Docker default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where the process's stdio goes.
#[derive(Debug, Clone, Copy)]
pub enum StdioMode {
    /// Pipes to the agent; stdin is /dev/null unless `stdin`.
    Pipes { stdin: bool },
    /// A new pseudo-terminal of this size, the process's controlling terminal.
    Pty(WindowSize),
    /// stdin /dev/null, stdout and stderr the agent's own (the console when PID 1).
    Console,
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("the command is empty")]
    EmptyArgv,
    #[error("environment entry {0:?} has no '=' (expected KEY=VALUE)")]
    BadEnv(String),
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
    #[error(transparent)]
    User(#[from] UserError),
    #[error("working directory {0:?} does not exist in the guest or is not a directory")]
    Cwd(String),
    #[error("cannot allocate a pseudo-terminal")]
    Pty(#[source] io::Error),
    #[error("cannot run {program:?} in the guest")]
    Exec {
        program: String,
        #[source]
        source: io::Error,
    },
}

/// A started process and its ends of the stdio.
#[derive(Debug)]
pub struct Spawned {
    pub pid: u32,
    pub exit: Receiver<ExitStatus>,
    pub stdin: Option<File>,
    pub stdout: Option<File>,
    pub stderr: Option<File>,
    /// The pty master (Pty mode): read for output, written for input, resized.
    pub pty: Option<File>,
}

/// Starts `req` with `mode` stdio. `etc` is where passwd/group are read (`/etc` in the guest).
pub fn spawn(reaper: &Reaper, req: &ExecRequest, mode: StdioMode, etc: &Path) -> Result<Spawned, SpawnError> {
    let program = req.argv.first().ok_or(SpawnError::EmptyArgv)?;
    let identity = match &req.user {
        Some(spec) => Some(user::resolve_in(spec, etc)?),
        None => None,
    };
    let cwd = req.cwd.clone().unwrap_or_else(|| "/".to_string());
    if !Path::new(&cwd).is_dir() {
        return Err(SpawnError::Cwd(cwd));
    }
    let cwd_c = CString::new(cwd.clone()).map_err(|_| SpawnError::Nul(cwd.clone()))?;

    let mut cmd = Command::new(program);
    cmd.args(&req.argv[1..]).env_clear();
    let mut has = (false, false, false);
    for kv in &req.env {
        let (k, v) = kv.split_once('=').ok_or_else(|| SpawnError::BadEnv(kv.clone()))?;
        if k.is_empty() {
            return Err(SpawnError::BadEnv(kv.clone()));
        }
        match k {
            "PATH" => has.0 = true,
            "HOME" => has.1 = true,
            "TERM" => has.2 = true,
            _ => {}
        }
        cmd.env(k, v);
    }
    if !has.0 {
        cmd.env("PATH", DEFAULT_PATH);
    }
    if !has.1 {
        cmd.env("HOME", identity.as_ref().map(|i| i.home.as_str()).unwrap_or("/root"));
    }
    let tty = matches!(mode, StdioMode::Pty(_));
    if tty && !has.2 {
        cmd.env("TERM", "xterm");
    }

    let mut pty = None;
    match mode {
        StdioMode::Pipes { stdin } => {
            cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() });
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        StdioMode::Pty(size) => {
            let (master, slave) = sys::open_pty(size).map_err(SpawnError::Pty)?;
            let dup = |f: &File| f.try_clone().map_err(SpawnError::Pty);
            cmd.stdin(dup(&slave)?).stdout(dup(&slave)?).stderr(slave);
            pty = Some(master);
        }
        StdioMode::Console => {
            cmd.stdin(Stdio::null()).stdout(Stdio::inherit()).stderr(Stdio::inherit());
        }
    }

    let ids =
        identity.map(|i| (i.uid, i.gid, i.groups.iter().map(|&g| g as libc::gid_t).collect::<Vec<_>>()));
    // SAFETY: the hook runs in the child between fork and exec and only makes async-signal-safe
    // syscalls on data prepared before the fork (no allocation, no locks).
    unsafe {
        cmd.pre_exec(move || {
            let err = io::Error::last_os_error;
            // The agent blocks signals for its signal thread (and may have inherited ignored ones):
            // the process starts with an empty mask and default dispositions.
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            if libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
                return Err(err());
            }
            for sig in 1..libc::SIGRTMIN() {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            if libc::setsid() < 0 {
                return Err(err());
            }
            if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(err());
            }
            if let Some((uid, gid, groups)) = &ids {
                if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(*gid) < 0
                    || libc::setuid(*uid) < 0
                {
                    return Err(err());
                }
            }
            if libc::chdir(cwd_c.as_ptr()) < 0 {
                return Err(err());
            }
            Ok(())
        });
    }
    let (mut child, exit) =
        reaper.spawn(&mut cmd).map_err(|source| SpawnError::Exec { program: program.clone(), source })?;
    // Drop our copies of the slave side so the master reads EIO once the process tree closed it.
    drop(cmd);
    Ok(Spawned {
        pid: child.id(),
        exit,
        stdin: child.stdin.take().map(|s| File::from(std::os::fd::OwnedFd::from(s))),
        stdout: child.stdout.take().map(|s| File::from(std::os::fd::OwnedFd::from(s))),
        stderr: child.stderr.take().map(|s| File::from(std::os::fd::OwnedFd::from(s))),
        pty,
    })
}
