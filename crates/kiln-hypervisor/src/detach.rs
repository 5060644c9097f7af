//! Starting a VMM that outlives us, with a monitor that records how it ends.
//!
//! ```text
//!   caller ── fork ──► A: setsid(); fork; _exit(0)        (reaped by the caller at once)
//!                        └─► M (monitor, orphaned → reparented to init)
//!                              ├─ fork ──► V: setpgid(0, 0); stdio → files; execve(VMM)
//!                              ├─ tells the caller M's and V's pids (pipe), waits for its "go"
//!                              └─ waitpid(V) → writes "<pid> exit N" / "<pid> signal N" atomically
//! ```
//!
//! The caller reads both identities (pid + start time) while V cannot have been reaped yet (M waits
//! for the "go"), so even a VMM that fails at once has a recorded identity and exit status. The
//! children run only async-signal-safe system calls between `fork` and `execve`/`_exit`: everything
//! they need (C strings, pointer arrays, file descriptors) is prepared before the first fork, and
//! nothing is allocated after it.

use std::ffi::{CString, OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use crate::process::{ProcessId, VmmProcess};

/// Message tags on the pipe from the children to the caller.
const MSG_MONITOR_PID: u32 = 1;
const MSG_VMM_PID: u32 = 2;
const MSG_EXEC_ERRNO: u32 = 3;
const MSG_FORK_ERRNO: u32 = 4;

/// File descriptors the children use are moved to this number or above, so that setting up
/// stdio (0, 1, 2) can never overwrite one of them.
const FD_FLOOR: RawFd = 10;

/// What to run detached.
#[derive(Debug, Clone)]
pub(crate) struct DetachedCommand<'a> {
    /// Absolute path of the program (no `PATH` search here).
    pub program: &'a Path,
    /// Arguments after the program name.
    pub args: &'a [OsString],
    /// File the program's stdout is appended to.
    pub stdout: &'a Path,
    /// File the program's stderr is appended to.
    pub stderr: &'a Path,
    /// Where the monitor writes the exit status (atomically, via `<exit_file>.tmp`).
    pub exit_file: &'a Path,
}

/// Why a detached start failed before the program ran.
#[derive(Debug)]
pub(crate) enum DetachError {
    /// Preparing files, pipes or forking failed in the caller.
    Setup(io::Error),
    /// The program could not be executed (errno from `execve`).
    Exec(io::Error),
    /// The intermediate or monitor process failed to fork.
    Monitor(io::Error),
}

impl From<DetachError> for io::Error {
    fn from(e: DetachError) -> Self {
        match e {
            DetachError::Setup(e) | DetachError::Exec(e) | DetachError::Monitor(e) => e,
        }
    }
}

/// Everything the forked children touch, prepared beforehand.
struct ChildPlan {
    program: CString,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    /// `/dev/null` opened read-write: the monitor's own stdio.
    devnull: RawFd,
    msg_write: RawFd,
    go_read: RawFd,
    exit_tmp: CString,
    exit_final: CString,
    empty_mask: libc::sigset_t,
    max_fd: RawFd,
}

fn c_string(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{s:?} contains a NUL byte")))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both are new fds owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `fd` moved to a close-on-exec fd numbered `FD_FLOOR` or above (the original is closed).
fn high_fd(fd: impl Into<OwnedFd>) -> io::Result<OwnedFd> {
    let fd: OwnedFd = fd.into();
    // SAFETY: F_DUPFD_CLOEXEC duplicates a valid fd; no memory is passed.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, FD_FLOOR) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

fn append_file(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Starts `cmd` detached (see the module doc) and returns the identities of the VMM and its monitor.
pub(crate) fn spawn_detached(cmd: &DetachedCommand<'_>) -> Result<VmmProcess, DetachError> {
    use DetachError::Setup;
    let program = c_string(cmd.program.as_os_str()).map_err(Setup)?;
    let mut arg_strings = vec![program.clone()];
    for a in cmd.args {
        arg_strings.push(c_string(a).map_err(Setup)?);
    }
    let env_strings: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend(v.into_vec());
            CString::new(kv).ok()
        })
        .collect();
    let argv = arg_strings.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    let envp = env_strings.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();

    let mut tmp = cmd.exit_file.as_os_str().to_os_string();
    tmp.push(".tmp");
    let exit_tmp = c_string(&tmp).map_err(Setup)?;
    let exit_final = c_string(cmd.exit_file.as_os_str()).map_err(Setup)?;
    // A previous VMM's status must not be read as this one's (records also name the pid).
    match std::fs::remove_file(cmd.exit_file) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(Setup(e)),
        _ => {}
    }

    let stdin = high_fd(File::open("/dev/null").map_err(Setup)?).map_err(Setup)?;
    let devnull = high_fd(OpenOptions::new().read(true).write(true).open("/dev/null").map_err(Setup)?)
        .map_err(Setup)?;
    let stdout = high_fd(append_file(cmd.stdout).map_err(Setup)?).map_err(Setup)?;
    let stderr = high_fd(append_file(cmd.stderr).map_err(Setup)?).map_err(Setup)?;
    // Every fd the children use is moved up (the originals closed): a write end left open in the
    // caller would keep the message pipe from ever reaching EOF.
    let (msg_read, msg_write) = pipe().map_err(Setup)?;
    let msg_write = high_fd(msg_write).map_err(Setup)?;
    let (go_read, go_write) = pipe().map_err(Setup)?;
    let go_read = high_fd(go_read).map_err(Setup)?;

    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut empty_mask: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to our sigset_t.
    unsafe { libc::sigemptyset(&mut empty_mask) };
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills the struct we pass.
    let max_fd = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur.min(65536) as RawFd
    } else {
        4096
    };

    let plan = ChildPlan {
        program,
        argv,
        envp,
        stdin: stdin.as_raw_fd(),
        stdout: stdout.as_raw_fd(),
        stderr: stderr.as_raw_fd(),
        devnull: devnull.as_raw_fd(),
        msg_write: msg_write.as_raw_fd(),
        go_read: go_read.as_raw_fd(),
        exit_tmp,
        exit_final,
        empty_mask,
        max_fd,
    };

    // SAFETY: fork has no memory-safety preconditions; the child only runs `intermediate`, which
    // makes async-signal-safe system calls on data prepared above and never returns.
    let a = unsafe { libc::fork() };
    if a < 0 {
        return Err(Setup(io::Error::last_os_error()));
    }
    if a == 0 {
        // SAFETY: we are the freshly forked child.
        unsafe { intermediate(&plan) }
    }
    // The caller keeps only the read end of the message pipe and the write end of the go pipe.
    drop((msg_write, go_read, stdin, stdout, stderr, devnull));
    reap(a);

    let mut monitor = None;
    let mut vmm = None;
    let mut exec_errno = None;
    let mut fork_errno = None;
    let mut msgs = Vec::new();
    File::from(msg_read).read_to_end(&mut msgs).map_err(Setup)?;
    for m in msgs.chunks_exact(8) {
        let tag = u32::from_le_bytes([m[0], m[1], m[2], m[3]]);
        let value = i32::from_le_bytes([m[4], m[5], m[6], m[7]]);
        match tag {
            MSG_MONITOR_PID => monitor = Some(value),
            MSG_VMM_PID => vmm = Some(value),
            MSG_EXEC_ERRNO => exec_errno = Some(value),
            MSG_FORK_ERRNO => fork_errno = Some(value),
            _ => {}
        }
    }
    // The VMM has exec'd (or failed to) and cannot be reaped before `go_write` closes.
    let identities = match (monitor, vmm) {
        (Some(m), Some(v)) => ProcessId::of(m).and_then(|m| Ok((m, ProcessId::of(v)?))),
        _ => Err(io::Error::other(match fork_errno {
            Some(e) => format!("the monitor process could not fork: {}", io::Error::from_raw_os_error(e)),
            None => "the monitor process ended before starting the program".to_string(),
        })),
    };
    drop(go_write);
    if let Some(e) = exec_errno {
        return Err(DetachError::Exec(io::Error::from_raw_os_error(e)));
    }
    let (monitor, vmm) = identities.map_err(DetachError::Monitor)?;
    Ok(VmmProcess { vmm, monitor, exit_file: cmd.exit_file.to_path_buf() })
}

/// Waits for our direct child `pid`.
fn reap(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: waitpid on our own child with a valid status pointer; retried on EINTR.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 && errno() == libc::EINTR {}
}

// ---- Code that runs between fork and execve/_exit: async-signal-safe system calls only. -------

fn errno() -> i32 {
    // SAFETY: __errno_location returns this thread's errno slot, always valid.
    unsafe { *libc::__errno_location() }
}

fn exit_now(code: i32) -> ! {
    // SAFETY: _exit ends the process without running atexit handlers or unwinding.
    unsafe { libc::_exit(code) }
}

fn send_msg(fd: RawFd, tag: u32, value: i32) {
    let mut buf = [0u8; 8];
    buf[..4].copy_from_slice(&tag.to_le_bytes());
    buf[4..].copy_from_slice(&value.to_le_bytes());
    // 8 bytes to a pipe is atomic (< PIPE_BUF); errors leave the caller without the message,
    // which it reports.
    // SAFETY: writes from a valid stack buffer to an fd.
    unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
}

fn dup_to(from: RawFd, to: RawFd) {
    // SAFETY: dup2 on fds; the new one is not close-on-exec.
    unsafe { libc::dup2(from, to) };
}

/// Closes every fd in `lo..=hi`.
fn close_fds(lo: RawFd, hi: RawFd, max_fd: RawFd) {
    if lo > hi {
        return;
    }
    // SAFETY: close_range takes two fd numbers and flags; no memory.
    if unsafe { libc::syscall(libc::SYS_close_range, lo as u32, hi as u32, 0u32) } == 0 {
        return;
    }
    for fd in lo..=hi.min(max_fd) {
        // SAFETY: closing an fd number; EBADF for unused ones is fine.
        unsafe { libc::close(fd) };
    }
}

/// Writes `n` in decimal at the end of `buf[..end]`, returning the start index.
fn format_decimal(mut n: u32, buf: &mut [u8], end: usize) -> usize {
    let mut i = end;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return i;
        }
    }
}

/// The exit record `<pid> exit <code>\n` / `<pid> signal <n>\n` in `buf`; returns its length.
fn format_exit_record(pid: i32, status: i32, buf: &mut [u8; 64]) -> usize {
    let (kind, value): (&[u8], i32) = if libc::WIFSIGNALED(status) {
        (b" signal ", libc::WTERMSIG(status))
    } else {
        (b" exit ", libc::WEXITSTATUS(status))
    };
    let mut scratch = [0u8; 16];
    let mut len = 0;
    let mut put = |bytes: &[u8], len: &mut usize| {
        buf[*len..*len + bytes.len()].copy_from_slice(bytes);
        *len += bytes.len();
    };
    let start = format_decimal(pid as u32, &mut scratch, 16);
    put(&scratch[start..16], &mut len);
    put(kind, &mut len);
    let start = format_decimal(value as u32, &mut scratch, 16);
    put(&scratch[start..16], &mut len);
    put(b"\n", &mut len);
    len
}

/// The first child: leaves the caller's session and forks the monitor.
///
/// # Safety
/// Only in a child just forked from `spawn_detached`.
unsafe fn intermediate(plan: &ChildPlan) -> ! {
    // SAFETY: setsid and fork take no memory.
    unsafe { libc::setsid() };
    // SAFETY: as above.
    match unsafe { libc::fork() } {
        0 => {
            // SAFETY: we are the freshly forked monitor.
            unsafe { monitor(plan) }
        }
        m if m < 0 => {
            send_msg(plan.msg_write, MSG_FORK_ERRNO, errno());
            exit_now(1)
        }
        _ => exit_now(0),
    }
}

/// The monitor: starts the VMM, reports the pids, waits for the VMM and records its status.
///
/// # Safety
/// Only in the monitor child forked by `intermediate`.
unsafe fn monitor(plan: &ChildPlan) -> ! {
    // Writing to a pipe whose reader is gone must fail with EPIPE, not kill the monitor.
    // SAFETY: signal with a valid signal number and SIG_IGN.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    // SAFETY: fork takes no memory.
    let vmm = unsafe { libc::fork() };
    if vmm == 0 {
        // SAFETY: we are the freshly forked VMM child.
        unsafe { exec_vmm(plan) }
    }
    if vmm < 0 {
        send_msg(plan.msg_write, MSG_FORK_ERRNO, errno());
        exit_now(1);
    }
    // SAFETY: getpid takes nothing.
    send_msg(plan.msg_write, MSG_MONITOR_PID, unsafe { libc::getpid() });
    send_msg(plan.msg_write, MSG_VMM_PID, vmm);
    // Hold nothing of the caller's: no terminal, no sockets, no lock files. Keep only `go_read`.
    for fd in 0..3 {
        dup_to(plan.devnull, fd);
    }
    close_fds(3, plan.go_read - 1, plan.max_fd);
    close_fds(plan.go_read + 1, RawFd::MAX, plan.max_fd);
    // Wait for the caller to have read the VMM's identity (a byte or EOF, e.g. the caller died).
    let mut byte = 0u8;
    // SAFETY: reads at most one byte into a stack variable.
    while unsafe { libc::read(plan.go_read, (&mut byte as *mut u8).cast(), 1) } < 0 && errno() == libc::EINTR
    {
    }
    // SAFETY: closing our own fd.
    unsafe { libc::close(plan.go_read) };

    let mut status = 0;
    loop {
        // SAFETY: waitpid on our child with a valid status pointer.
        let r = unsafe { libc::waitpid(vmm, &mut status, 0) };
        if r == vmm {
            break;
        }
        if r < 0 && errno() != libc::EINTR {
            exit_now(1);
        }
    }
    let mut record = [0u8; 64];
    let len = format_exit_record(vmm, status, &mut record);
    // SAFETY: open with a NUL-terminated path prepared before the fork.
    let fd = unsafe {
        libc::open(
            plan.exit_tmp.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
            0o644,
        )
    };
    if fd < 0 {
        exit_now(1);
    }
    // SAFETY: writes our stack buffer, syncs and closes our fd, renames between prepared paths.
    let ok = unsafe {
        libc::write(fd, record.as_ptr().cast(), len) == len as isize
            && libc::fsync(fd) == 0
            && libc::close(fd) == 0
            && libc::rename(plan.exit_tmp.as_ptr(), plan.exit_final.as_ptr()) == 0
    };
    exit_now(if ok { 0 } else { 1 })
}

/// The VMM child: own process group, default signals, stdio to the files, then the program.
///
/// # Safety
/// Only in the child forked by `monitor`.
unsafe fn exec_vmm(plan: &ChildPlan) -> ! {
    // SAFETY: setpgid(0, 0) puts us in a new process group; no memory.
    unsafe { libc::setpgid(0, 0) };
    for sig in 1..libc::SIGRTMIN() {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: resetting a signal's disposition (ignored ones, e.g. SIGPIPE in Rust
            // programs, would otherwise stay ignored across execve).
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
    // SAFETY: sets the mask from a sigset_t initialised before the fork.
    unsafe { libc::sigprocmask(libc::SIG_SETMASK, &plan.empty_mask, std::ptr::null_mut()) };
    dup_to(plan.stdin, 0);
    dup_to(plan.stdout, 1);
    dup_to(plan.stderr, 2);
    // Every other fd of ours is close-on-exec (Rust opens them so, and so do we).
    // SAFETY: NUL-terminated program path and NULL-terminated pointer arrays prepared before the
    // fork, whose strings outlive this call.
    unsafe { libc::execve(plan.program.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr()) };
    send_msg(plan.msg_write, MSG_EXEC_ERRNO, errno());
    exit_now(127)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::{Liveness, VmExit};
    use std::path::PathBuf;
    use std::time::Duration;

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Self {
            Self { dir: tempfile::tempdir().unwrap() }
        }
        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
        fn spawn(&self, program: &str, args: &[&str]) -> Result<VmmProcess, DetachError> {
            let args: Vec<OsString> = args.iter().map(OsString::from).collect();
            spawn_detached(&DetachedCommand {
                program: Path::new(program),
                args: &args,
                stdout: &self.path("out"),
                stderr: &self.path("err"),
                exit_file: &self.path("exit"),
            })
        }
    }

    #[test]
    fn exit_records_are_formatted_without_allocation() {
        let mut buf = [0u8; 64];
        let exited = 3 << 8; // WEXITSTATUS 3
        let n = format_exit_record(1234, exited, &mut buf);
        assert_eq!(&buf[..n], b"1234 exit 3\n");
        let n = format_exit_record(7, libc::SIGKILL, &mut buf);
        assert_eq!(&buf[..n], b"7 signal 9\n");
        let n = format_exit_record(i32::MAX, 255 << 8, &mut buf);
        assert_eq!(&buf[..n], b"2147483647 exit 255\n");
    }

    #[test]
    fn the_exit_code_and_output_of_a_detached_program_are_recorded() {
        let f = Files::new();
        let p = f.spawn("/bin/sh", &["-c", "echo out; echo err >&2; exit 7"]).unwrap();
        assert_eq!(p.wait(Some(Duration::from_secs(10))).unwrap(), Some(VmExit::Code(7)));
        assert_eq!(std::fs::read_to_string(f.path("out")).unwrap(), "out\n");
        assert_eq!(std::fs::read_to_string(f.path("err")).unwrap(), "err\n");
        assert!(!f.path("exit.tmp").exists());
    }

    #[test]
    fn a_killed_program_is_recorded_with_its_signal() {
        let f = Files::new();
        let p = f.spawn("/bin/sleep", &["100"]).unwrap();
        assert!(p.is_running());
        assert_eq!(p.wait(Some(Duration::from_millis(100))).unwrap(), None, "sleep ended by itself");
        assert!(p.vmm.signal(libc::SIGKILL).unwrap());
        assert_eq!(p.wait(Some(Duration::from_secs(10))).unwrap(), Some(VmExit::Signal(libc::SIGKILL)));
        assert!(!p.vmm.signal(libc::SIGKILL).unwrap(), "a signal reached a process that is gone");
    }

    #[test]
    fn the_program_is_detached_from_us() {
        let f = Files::new();
        let p = f.spawn("/bin/sleep", &["100"]).unwrap();
        let me = crate::process::read_stat(std::process::id() as i32).unwrap();
        let vmm = crate::process::read_stat(p.vmm.pid).unwrap();
        let monitor = crate::process::read_stat(p.monitor.pid).unwrap();
        // Not our child (survives us), its own process group, another session than ours.
        assert_ne!(monitor.ppid, std::process::id() as i32);
        assert_eq!(vmm.ppid, p.monitor.pid);
        assert_eq!(vmm.pgrp, p.vmm.pid);
        assert_ne!(vmm.session, me.session);
        // The monitor holds none of our fds beyond stdio.
        let fd_count = || std::fs::read_dir(format!("/proc/{}/fd", p.monitor.pid)).unwrap().count();
        assert!(
            kiln_test_utils::wait_until(Duration::from_secs(5), || fd_count() == 3),
            "the monitor keeps {} fds open",
            fd_count()
        );
        p.vmm.signal(libc::SIGKILL).unwrap();
        p.wait(Some(Duration::from_secs(10))).unwrap();
        // Once the VMM is recorded, the monitor ends (a zombie where init does not reap orphans).
        assert!(
            kiln_test_utils::wait_until(Duration::from_secs(5), || p.monitor.liveness() != Liveness::Running)
        );
    }

    #[test]
    fn a_missing_program_is_an_exec_error() {
        let f = Files::new();
        match f.spawn("/nonexistent/kiln-vmm", &[]) {
            Err(DetachError::Exec(e)) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT)),
            other => panic!("expected an exec error, got {other:?}"),
        }
    }
}
