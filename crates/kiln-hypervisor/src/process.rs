//! VMM processes that are not our children: identity (pid + start time), liveness, signals,
//! waiting for the end, and the exit status their monitor recorded.
//!
//! A pid alone is not an identity: once a process is reaped its pid can be reused. Every VMM is
//! recorded as its pid plus its start time (field 22 of `/proc/PID/stat`, clock ticks since boot);
//! a process with that pid and another start time is someone else, and ours is gone. Signals go
//! through a pidfd opened and then re-checked against the start time, so they cannot hit a process
//! that took over the pid in between.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How long to give a monitor to write the exit status after its VMM ended.
const EXIT_FILE_GRACE: Duration = Duration::from_secs(3);

/// Poll interval where a pidfd cannot be used.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// How a VMM process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmExit {
    /// It exited with this code. kiln-vmm exits 0 when the guest reboots (`reboot=k`) and QEMU does
    /// on a guest reset (`-no-reboot`): that is how a Kiln guest ends itself.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
    /// It is gone, but how it ended is not known: its monitor ended before recording it.
    Unknown,
}

impl VmExit {
    /// True for exit code 0.
    pub fn success(&self) -> bool {
        *self == VmExit::Code(0)
    }
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExit::Code(c) => write!(f, "exit code {c}"),
            VmExit::Signal(s) => match signal_name(*s) {
                Some(name) => write!(f, "killed by signal {s} ({name})"),
                None => write!(f, "killed by signal {s}"),
            },
            VmExit::Unknown => write!(f, "exit status unknown: its monitor process ended too"),
        }
    }
}

fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSYS => "SIGSYS",
        _ => return None,
    })
}

/// The fields of `/proc/PID/stat` we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// State letter (`R`, `S`, `Z`, ...).
    pub state: u8,
    /// Parent pid.
    pub ppid: i32,
    /// Process group.
    pub pgrp: i32,
    /// Session.
    pub session: i32,
    /// Start time, clock ticks after boot.
    pub start_time: u64,
}

/// Parses `/proc/PID/stat`. The command name (field 2) may hold spaces and parentheses, so the
/// fields are counted from its last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state); field N is f[N - 3].
    Some(ProcStat {
        state: *f.first()?.as_bytes().first()?,
        ppid: f.get(1)?.parse().ok()?,
        pgrp: f.get(2)?.parse().ok()?,
        session: f.get(3)?.parse().ok()?,
        start_time: f.get(19)?.parse().ok()?,
    })
}

/// Reads `/proc/<pid>/stat`.
pub(crate) fn read_stat(pid: i32) -> io::Result<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad /proc/{pid}/stat")))
}

/// Whether a recorded process still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// It runs (or sleeps, or is stopped).
    Running,
    /// It has exited and waits for its parent to reap it.
    Zombie,
    /// It is gone: no such pid, or the pid belongs to a newer process.
    Gone,
}

/// A process identified by pid and start time (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    /// Process id.
    pub pid: i32,
    /// Start time in clock ticks after boot (`/proc/PID/stat` field 22).
    pub start_time: u64,
}

impl ProcessId {
    /// The identity of the live process `pid`.
    pub fn of(pid: i32) -> io::Result<Self> {
        Ok(Self { pid, start_time: read_stat(pid)?.start_time })
    }

    /// Whether this process still runs.
    pub fn liveness(&self) -> Liveness {
        match read_stat(self.pid) {
            Ok(s) if s.start_time != self.start_time => Liveness::Gone,
            Ok(s) if matches!(s.state, b'Z' | b'X') => Liveness::Zombie,
            Ok(_) => Liveness::Running,
            Err(_) => Liveness::Gone,
        }
    }

    /// A pidfd for this process, checked against the start time after opening. `Ok(None)`: the
    /// process is gone. `Err` with `ENOSYS`: the kernel has no pidfds (before 5.3).
    fn pidfd(&self) -> io::Result<Option<OwnedFd>> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid, 0) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ESRCH) => Ok(None),
                _ => Err(e),
            };
        }
        // SAFETY: the syscall returned a new fd that nothing else owns; fds fit in i32.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // The pidfd pins the process it was opened for; if that is still ours, so is the fd.
        Ok(match self.liveness() {
            Liveness::Gone => None,
            _ => Some(fd),
        })
    }

    /// Sends `sig`. `Ok(false)` when the process is already gone.
    pub fn signal(&self, sig: i32) -> io::Result<bool> {
        match self.pidfd() {
            Ok(None) => Ok(false),
            Ok(Some(fd)) => {
                // SAFETY: a valid pidfd, a signal number, no siginfo (NULL) and no flags.
                let r = unsafe {
                    libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), sig, std::ptr::null::<u8>(), 0)
                };
                match r {
                    0 => Ok(true),
                    _ => match io::Error::last_os_error() {
                        e if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
                        e => Err(e),
                    },
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                if self.liveness() == Liveness::Gone {
                    return Ok(false);
                }
                // SAFETY: kill takes a pid and a signal; the identity was checked just above (a
                // small race remains without pidfds).
                if unsafe { libc::kill(self.pid, sig) } == 0 {
                    Ok(true)
                } else {
                    match io::Error::last_os_error() {
                        e if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
                        e => Err(e),
                    }
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Waits until the process has exited (zombie or gone), at most `timeout` (`None`: forever).
    /// Returns whether it has.
    pub fn wait_exited(&self, timeout: Option<Duration>) -> io::Result<bool> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let fd = match self.pidfd() {
            Ok(None) => return Ok(true),
            Ok(Some(fd)) => Some(fd),
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => None,
            Err(e) => return Err(e),
        };
        loop {
            if self.liveness() != Liveness::Running {
                return Ok(true);
            }
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return Ok(false),
                },
                None => None,
            };
            match &fd {
                Some(fd) => {
                    // A pidfd polls readable once the process has exited.
                    let ms = left.map_or(-1, |l| l.as_millis().clamp(1, i32::MAX as u128) as i32);
                    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                    // SAFETY: one valid pollfd on our stack, count 1.
                    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
                    if r < 0 {
                        let e = io::Error::last_os_error();
                        if e.kind() != io::ErrorKind::Interrupted {
                            return Err(e);
                        }
                    }
                }
                None => std::thread::sleep(left.map_or(POLL_INTERVAL, |l| l.min(POLL_INTERVAL))),
            }
        }
    }
}

/// A VMM process and the monitor that waits for it (see the crate doc): what a record needs to
/// find the process again and learn how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmProcess {
    /// The VMM.
    pub vmm: ProcessId,
    /// Its monitor (parent), which writes `exit_file` when the VMM ends.
    pub monitor: ProcessId,
    /// Where the monitor records the VMM's exit status.
    pub exit_file: std::path::PathBuf,
}

impl VmmProcess {
    /// True while the VMM runs.
    pub fn is_running(&self) -> bool {
        self.vmm.liveness() == Liveness::Running
    }

    /// How the VMM ended, or `None` while it runs. Once it has exited, waits up to a few seconds for
    /// the monitor to record the status; `Unknown` if the monitor is gone without recording it.
    pub fn exit_status(&self) -> Option<VmExit> {
        if self.is_running() {
            return None;
        }
        let deadline = Instant::now() + EXIT_FILE_GRACE;
        loop {
            if let Some(status) = read_exit_file(&self.exit_file, self.vmm.pid) {
                return Some(status);
            }
            if self.monitor.liveness() == Liveness::Gone {
                // It may have written the file just before going.
                return Some(read_exit_file(&self.exit_file, self.vmm.pid).unwrap_or(VmExit::Unknown));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Some(VmExit::Unknown);
            }
            // The monitor exits right after writing the file: wake up when it does.
            if self.monitor.wait_exited(Some(left.min(POLL_INTERVAL))).is_err() {
                std::thread::sleep(POLL_INTERVAL);
            }
        }
    }

    /// Waits for the VMM to end, at most `timeout` (`None`: forever); `Ok(None)` on timeout.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<Option<VmExit>> {
        if self.vmm.wait_exited(timeout)? {
            Ok(self.exit_status())
        } else {
            Ok(None)
        }
    }
}

/// The text a monitor writes: `<pid> exit <code>` or `<pid> signal <number>`.
pub(crate) fn parse_exit_record(text: &str, pid: i32) -> Option<VmExit> {
    let mut words = text.split_whitespace();
    if words.next()?.parse::<i32>().ok()? != pid {
        return None;
    }
    let kind = words.next()?;
    let value: i32 = words.next()?.parse().ok()?;
    match kind {
        "exit" => Some(VmExit::Code(value)),
        "signal" => Some(VmExit::Signal(value)),
        _ => None,
    }
}

fn read_exit_file(path: &Path, pid: i32) -> Option<VmExit> {
    parse_exit_record(&std::fs::read_to_string(path).ok()?, pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        let line = "4242 (a b) (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 987654 1000 10 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let s = parse_stat(line).unwrap();
        assert_eq!(s, ProcStat { state: b'S', ppid: 1, pgrp: 4242, session: 4242, start_time: 987654 });
        assert_eq!(parse_stat("12 (x) R 1"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn our_own_identity_is_running_and_a_wrong_start_time_is_gone() {
        let me = ProcessId::of(std::process::id() as i32).unwrap();
        assert_eq!(me.liveness(), Liveness::Running);
        let impostor = ProcessId { start_time: me.start_time + 1, ..me };
        assert_eq!(impostor.liveness(), Liveness::Gone);
        assert!(!impostor.signal(0).unwrap(), "a signal reached a process that is not the recorded one");
        assert!(me.signal(0).unwrap());
    }

    #[test]
    fn exit_records_name_the_pid_they_belong_to() {
        assert_eq!(parse_exit_record("77 exit 3\n", 77), Some(VmExit::Code(3)));
        assert_eq!(parse_exit_record("77 signal 9\n", 77), Some(VmExit::Signal(9)));
        assert_eq!(parse_exit_record("78 exit 0\n", 77), None, "a previous VMM's record");
        assert_eq!(parse_exit_record("77 exit", 77), None);
        assert_eq!(parse_exit_record("", 77), None);
    }

    #[test]
    fn exits_read_as_a_user_would_say_them() {
        assert_eq!(VmExit::Code(0).to_string(), "exit code 0");
        assert_eq!(VmExit::Signal(9).to_string(), "killed by signal 9 (SIGKILL)");
        assert!(VmExit::Code(0).success() && !VmExit::Signal(15).success());
    }
}
