//! Every raw syscall the agent makes, each behind a small safe function. No other module uses
//! `unsafe` except the `pre_exec` hook in `spawn.rs` (it must run between fork and exec).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use kiln_agent_proto::{ExitStatus, WindowSize};

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "string contains a NUL byte"))
}

pub fn getpid() -> u32 {
    // SAFETY: getpid has no preconditions and cannot fail.
    unsafe { libc::getpid() as u32 }
}

/// A set of signals, for blocking them in every thread and waiting for them in one.
pub struct SignalSet(libc::sigset_t);

impl SignalSet {
    pub fn new(signals: &[i32]) -> Self {
        // SAFETY: sigemptyset initialises the zeroed set; sigaddset only fails for invalid
        // numbers, which then just are not in the set.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for &s in signals {
                libc::sigaddset(&mut set, s);
            }
            SignalSet(set)
        }
    }

    /// Blocks the set in the calling thread (and threads it creates later).
    pub fn block(&self) -> io::Result<()> {
        // SAFETY: a valid, initialised set; the old mask is not wanted.
        let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &self.0, std::ptr::null_mut()) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(())
    }

    /// Waits for one of the (blocked) signals.
    pub fn wait(&self) -> io::Result<i32> {
        let mut sig = 0;
        // SAFETY: a valid set and a valid out pointer.
        let r = unsafe { libc::sigwait(&self.0, &mut sig) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(sig)
    }
}

fn decode_status(status: libc::c_int) -> Option<ExitStatus> {
    if libc::WIFEXITED(status) {
        Some(ExitStatus::Code(libc::WEXITSTATUS(status)))
    } else if libc::WIFSIGNALED(status) {
        Some(ExitStatus::Signal(libc::WTERMSIG(status)))
    } else {
        None
    }
}

/// Reaps one exited child, if any: `Ok(None)` when none has exited (or there are none).
pub fn reap_one() -> io::Result<Option<(u32, ExitStatus)>> {
    loop {
        let mut status = 0;
        // SAFETY: valid out pointer; WNOHANG never blocks.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ECHILD) {
                return Ok(None);
            }
            return Err(e);
        }
        if pid == 0 {
            return Ok(None);
        }
        if let Some(s) = decode_status(status) {
            return Ok(Some((pid as u32, s)));
        }
    }
}

/// True when this process has any child (running or zombie). Does not reap.
pub fn has_children() -> bool {
    // SAFETY: a zeroed siginfo_t is a valid out buffer; WNOWAIT leaves children as they are.
    let r = unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT)
    };
    !(r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD))
}

/// kill(2). `pid` -1 means every process but PID 1 and the caller; negative: a process group.
pub fn kill(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill has no memory arguments.
    check(unsafe { libc::kill(pid, signal) }).map(|_| ())
}

pub fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> io::Result<()> {
    let (s, t, f, d) = (cstr(source)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
    // SAFETY: NUL-terminated strings that outlive the call.
    check(unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) }).map(|_| ())
}

/// Remounts `/` read-only (before powering off).
pub fn remount_root_read_only() -> io::Result<()> {
    let t = cstr("/")?;
    // SAFETY: NUL-terminated target; null source, type and data are allowed for MS_REMOUNT.
    check(unsafe {
        libc::mount(
            std::ptr::null(),
            t.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        )
    })
    .map(|_| ())
}

/// True when the filesystem holding `path` is mounted read-only.
pub fn is_read_only(path: &str) -> io::Result<bool> {
    let p = cstr(path)?;
    // SAFETY: a zeroed statvfs is a valid out buffer; NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    check(unsafe { libc::statvfs(p.as_ptr(), &mut st) })?;
    Ok(st.f_flag & libc::ST_RDONLY != 0)
}

pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: pointer and length of a live byte slice.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(|_| ())
}

pub fn sync() {
    // SAFETY: no arguments.
    unsafe { libc::sync() }
}

/// reboot(2) with `libc::RB_*`; returns only on failure.
pub fn reboot(cmd: libc::c_int) -> io::Error {
    // SAFETY: no memory arguments.
    unsafe { libc::reboot(cmd) };
    io::Error::last_os_error()
}

/// Turns Ctrl-Alt-Del into SIGINT for PID 1 instead of an immediate reboot.
pub fn disable_ctrl_alt_del() -> io::Result<()> {
    // SAFETY: no memory arguments.
    check(unsafe { libc::reboot(libc::RB_DISABLE_CAD) }).map(|_| ())
}

pub fn set_realtime(secs: i64, nanos: u32) -> io::Result<()> {
    if nanos >= 1_000_000_000 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "nanoseconds must be below 1e9"));
    }
    let ts = libc::timespec { tv_sec: secs as libc::time_t, tv_nsec: nanos as libc::c_long };
    // SAFETY: a valid timespec.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }).map(|_| ())
}

/// Waits up to `timeout_ms` for `fd` to be readable (or hung up). `Ok(false)` on timeout.
pub fn poll_readable(fd: RawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(r > 0);
    }
}

/// poll(2) revents of `fd` for POLLIN after waiting up to `timeout_ms`.
pub fn poll_events(fd: RawFd, timeout_ms: i32) -> io::Result<i16> {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    check(unsafe { libc::poll(&mut p, 1, timeout_ms) })?;
    Ok(p.revents)
}

/// With `on`, asks for SIGIO to this process when `fd` changes state (O_ASYNC with us as the
/// owner: a virtio-serial port signals its host connecting and data arriving); without, stops it.
pub fn signal_io_to_self(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: fcntl on a caller-owned fd with integer arguments only.
    unsafe {
        check(libc::fcntl(fd, libc::F_SETOWN, libc::getpid()))?;
        let flags = check(libc::fcntl(fd, libc::F_GETFL))?;
        let flags = if on { flags | libc::O_ASYNC } else { flags & !libc::O_ASYNC };
        check(libc::fcntl(fd, libc::F_SETFL, flags))?;
    }
    Ok(())
}

/// shutdown(2) both directions; ignored for non-sockets.
pub fn shutdown_socket(fd: RawFd) {
    // SAFETY: no memory arguments; errors (ENOTSOCK, ENOTCONN) do not matter here.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// A new pseudo-terminal: (master, slave), both close-on-exec, the slave opened through the master
/// (TIOCGPTPEER), sized `size`.
pub fn open_pty(size: WindowSize) -> io::Result<(File, File)> {
    let path = cstr("/dev/ptmx")?;
    // SAFETY: NUL-terminated path; the returned fd is owned below.
    let master =
        check(unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
    // SAFETY: a fresh fd we own.
    let master = unsafe { File::from_raw_fd(master) };
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK takes a pointer to an int.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) })?;
    // SAFETY: TIOCGPTPEER takes open flags and returns a new fd.
    let slave = check(unsafe {
        libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC)
    })?;
    // SAFETY: a fresh fd we own.
    let slave = unsafe { File::from_raw_fd(slave) };
    set_window_size(master.as_raw_fd(), size)?;
    Ok((master, slave))
}

pub fn set_window_size(fd: RawFd, size: WindowSize) -> io::Result<()> {
    let ws = libc::winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ takes a pointer to a winsize.
    check(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) }).map(|_| ())
}

/// The terminal size of `fd`, if it is a terminal.
pub fn window_size(fd: RawFd) -> Option<WindowSize> {
    // SAFETY: a zeroed winsize is a valid out buffer.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ takes a pointer to a winsize.
    let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0).then_some(WindowSize { rows: ws.ws_row, cols: ws.ws_col })
}

/// A listening AF_VSOCK stream socket on `port` (any CID).
pub fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: no memory arguments; the fd is owned below.
    let fd = check(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; zero is valid for the reserved fields.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: a valid sockaddr_vm and its size.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })?;
    // SAFETY: no memory arguments.
    check(unsafe { libc::listen(fd.as_raw_fd(), 16) })?;
    Ok(fd)
}

/// accept4(2) with close-on-exec.
pub fn accept(listener: RawFd) -> io::Result<File> {
    loop {
        // SAFETY: null address pointers are allowed; the fd is owned below.
        let fd = unsafe {
            libc::accept4(listener, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC)
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: a fresh fd we own.
        return Ok(unsafe { File::from_raw_fd(fd) });
    }
}

/// Brings the loopback interface up (SIOCSIFFLAGS), as a container runtime does.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: no memory arguments; the fd is owned below.
    let fd = check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS / SIOCSIFFLAGS take a pointer to an ifreq.
    unsafe {
        check(libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req))?;
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        check(libc::ioctl(fd.as_raw_fd(), libc::SIOCSIFFLAGS, &req))?;
    }
    Ok(())
}

/// True when `fd` is open.
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD has no memory arguments.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// dup2(2).
pub fn dup2(from: RawFd, to: RawFd) -> io::Result<()> {
    // SAFETY: no memory arguments.
    check(unsafe { libc::dup2(from, to) }).map(|_| ())
}
