//! The local terminal: raw mode for `-t`, its size, stdin forwarding and flushing output.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use kiln_agent_proto::{ExitStatus, Process, WindowSize};

/// The terminal size of stdin, when it is a terminal.
pub fn window_size() -> Option<WindowSize> {
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we pass; fd 0 is ours to query.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the pointer is valid for the duration of the call.
    let rc = unsafe { libc::ioctl(std::io::stdin().as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0).then_some(WindowSize { rows: ws.ws_row, cols: ws.ws_col })
}

pub fn stdin_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(0) == 1 }
}

pub fn stderr_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(2) == 1 }
}

/// Puts the terminal on stdin in raw mode until dropped.
pub struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    pub fn enter() -> Option<RawMode> {
        // SAFETY: tcgetattr fills the termios we pass for fd 0.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct; tcsetattr reads it.
        unsafe {
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(0, libc::TCSANOW, &raw);
        }
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the attributes saved from the same descriptor.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.saved);
        }
    }
}

/// A writer that flushes after every write (interactive output shows at once).
struct Flushing<W: Write>(W);

impl<W: Write> Write for Flushing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(buf)?;
        self.0.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Streams a guest process's stdio to ours (stdin too with `stdin`; with `tty`, the terminal in raw
/// mode and its size kept in sync), forwards the signals `kiln` gets to it, and returns how it
/// ended.
pub fn attach(process: Process, stdin: bool, tty: bool) -> anyhow::Result<ExitStatus> {
    let process = Arc::new(process);
    let _signals = crate::signals::Forwarding::to(&process);
    let _raw = if tty && stdin_is_tty() { RawMode::enter() } else { None };
    if stdin {
        Process::forward_stdin(&process, std::io::stdin());
    }
    if tty {
        let p = Arc::downgrade(&process);
        std::thread::spawn(move || {
            let mut last = window_size();
            while let Some(p) = p.upgrade() {
                let now = window_size();
                if now != last {
                    if let Some(size) = now {
                        let _ = p.resize(size);
                    }
                    last = now;
                }
                drop(p);
                std::thread::sleep(Duration::from_millis(250));
            }
        });
    }
    let status = process.pump(&mut Flushing(std::io::stdout()), &mut Flushing(std::io::stderr()))?;
    Ok(status)
}
