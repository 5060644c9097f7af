//! Where host connections come from: AF_VSOCK (kiln-vmm, Firecracker, QEMU vhost-vsock), a
//! virtio-serial port (QEMU without vhost-vsock), or a Unix socket (`--listen-unix`, tests).

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::agent::Agent;
use crate::{server, sys};

/// Accepts vsock connections on `port` forever, one thread per connection. Returns at once when
/// the kernel has no vsock (then the other transports serve).
pub fn serve_vsock(agent: Arc<Agent>, port: u32) {
    let listener: OwnedFd = match sys::vsock_listen(port) {
        Ok(l) => l,
        Err(e) => {
            tracing::info!("not listening on vsock port {port}: {e}");
            return;
        }
    };
    tracing::info!("listening on vsock port {port}");
    loop {
        match sys::accept(listener.as_raw_fd()) {
            Ok(conn) => {
                let agent = agent.clone();
                std::thread::spawn(move || server::serve(&agent, conn, false));
            }
            Err(e) => {
                tracing::warn!("vsock accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Serves on a Unix socket (tests and debugging).
pub fn serve_unix(agent: Arc<Agent>, path: PathBuf) -> std::io::Result<()> {
    // Bound under a temporary name and renamed once listening: the path exists only when ready.
    let mut tmp = path.clone().into_os_string();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    std::fs::rename(&tmp, &path)?;
    tracing::info!("listening on {}", path.display());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            match conn {
                Ok(s) => {
                    let agent = agent.clone();
                    let f = File::from(OwnedFd::from(s));
                    std::thread::spawn(move || server::serve(&agent, f, false));
                }
                Err(e) => tracing::warn!("accept on {}: {e}", path.display()),
            }
        }
    });
    Ok(())
}

/// How long to wait for the host between checks when SIGIO tells when it comes (a safety net).
const HOST_WAIT_WITH_SIGIO: Duration = Duration::from_secs(1);
/// How often to look for the host without SIGIO.
const HOST_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Counts SIGIOs from virtio-serial ports; waiters sleep on the condvar.
static HOST_EVENTS: (Mutex<u64>, Condvar) = (Mutex::new(0), Condvar::new());

fn host_events() -> u64 {
    *HOST_EVENTS.0.lock().unwrap_or_else(|p| p.into_inner())
}

/// A virtio-serial port signalled (SIGIO): its host connected, left or sent data.
pub fn virtio_host_event() {
    let (count, cond) = &HOST_EVENTS;
    *count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    cond.notify_all();
}

/// Waits until a SIGIO came after the count `seen` was read, at most `timeout`.
fn wait_for_host_event(seen: u64, timeout: Duration) {
    let (count, cond) = &HOST_EVENTS;
    let guard = count.lock().unwrap_or_else(|p| p.into_inner());
    let _ = cond.wait_timeout_while(guard, timeout, |n| *n == seen);
}

/// The guest's virtio-serial ports called `base` or `base.N`, sorted by name, with their `/dev`
/// nodes: one look at sysfs (udev's /dev/virtio-ports links are not there without udev).
pub fn virtio_port_family(base: &str) -> Vec<(String, PathBuf)> {
    let mut ports: Vec<(String, PathBuf)> = std::fs::read_dir("/sys/class/virtio-ports")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| {
                    let name = std::fs::read_to_string(e.path().join("name")).ok()?.trim().to_string();
                    is_in_family(&name, base).then(|| (name, Path::new("/dev").join(e.file_name())))
                })
                .collect()
        })
        .unwrap_or_default();
    ports.sort();
    ports
}

fn is_in_family(name: &str, base: &str) -> bool {
    name == base
        || name
            .strip_prefix(base)
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Serves the virtio-serial port `name` (its `/dev` node `path`): one host at a time; when the
/// host side closes, waits for it to connect again.
pub fn serve_virtio_port(agent: Arc<Agent>, name: String, path: PathBuf) {
    let port = match OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open(&path) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!("cannot open {}: {e}", path.display());
            return;
        }
    };
    tracing::info!("serving on virtio-serial port {} ({name})", path.display());
    // The port reports POLLHUP at once while no host is connected, so poll cannot wait for one;
    // SIGIO (the signal thread calls virtio_host_event) says when one connects or writes. Without
    // it, a slow re-poll.
    let woken_by_sigio = match sys::signal_io_to_self(port.as_raw_fd(), true) {
        Ok(()) => true,
        Err(e) => {
            tracing::info!("no SIGIO from {}: {e}; polling for the host instead", path.display());
            false
        }
    };
    loop {
        let seen = host_events();
        // POLLHUP while no host is connected — with POLLIN too, since a read would not block (it
        // returns end-of-file): so POLLHUP is looked at first. POLLIN alone: a host sent something.
        match sys::poll_events(port.as_raw_fd(), 1000) {
            Ok(ev) if ev & libc::POLLHUP != 0 => {
                let wait = if woken_by_sigio { HOST_WAIT_WITH_SIGIO } else { HOST_POLL_INTERVAL };
                wait_for_host_event(seen, wait);
            }
            Ok(ev) if ev & libc::POLLIN != 0 => match port.try_clone() {
                Ok(f) => {
                    // No SIGIO per message while serving (it would wake every port's thread).
                    if woken_by_sigio {
                        let _ = sys::signal_io_to_self(port.as_raw_fd(), false);
                    }
                    server::serve(&agent, f, true);
                    if woken_by_sigio {
                        let _ = sys::signal_io_to_self(port.as_raw_fd(), true);
                    }
                }
                Err(e) => {
                    tracing::warn!("virtio port: {e}");
                    return;
                }
            },
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("poll on {}: {e}", path.display());
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_family_is_the_base_name_and_numbered_siblings() {
        for yes in ["kiln.agent", "kiln.agent.1", "kiln.agent.12"] {
            assert!(is_in_family(yes, "kiln.agent"), "{yes}");
        }
        for no in ["kiln.agentx", "kiln.agent.", "kiln.agent.1a", "org.qemu.guest_agent.0", "kiln"] {
            assert!(!is_in_family(no, "kiln.agent"), "{no}");
        }
    }
}
