//! Where host connections come from: AF_VSOCK (kiln-vmm, Firecracker, QEMU vhost-vsock), a
//! virtio-serial port (QEMU without vhost-vsock), or a Unix socket (`--listen-unix`, tests).

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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

/// The `/dev` node of the virtio-serial port called `name` (udev's /dev/virtio-ports/<name>
/// symlink is not there without udev, so sysfs is searched).
pub fn find_virtio_port(name: &str) -> Option<PathBuf> {
    let link = Path::new("/dev/virtio-ports").join(name);
    if link.exists() {
        return Some(link);
    }
    let dir = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    dir.flatten().find_map(|e| {
        let port_name = std::fs::read_to_string(e.path().join("name")).ok()?;
        (port_name.trim() == name).then(|| Path::new("/dev").join(e.file_name()))
    })
}

/// Serves the virtio-serial port `name`: one host at a time; when the host side closes, waits
/// for it to connect again.
pub fn serve_virtio_port(agent: Arc<Agent>, name: String) {
    let Some(path) = find_virtio_port(&name) else {
        tracing::info!("no virtio-serial port named {name}");
        return;
    };
    let port = match OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open(&path) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!("cannot open {}: {e}", path.display());
            return;
        }
    };
    tracing::info!("serving on virtio-serial port {} ({name})", path.display());
    loop {
        // POLLHUP while no host is connected; POLLIN once one has sent something.
        match sys::poll_events(port.as_raw_fd(), 1000) {
            Ok(ev) if ev & libc::POLLIN != 0 => match port.try_clone() {
                Ok(f) => server::serve(&agent, f, true),
                Err(e) => {
                    tracing::warn!("virtio port: {e}");
                    return;
                }
            },
            Ok(ev) if ev & libc::POLLHUP != 0 => std::thread::sleep(Duration::from_millis(200)),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("poll on {}: {e}", path.display());
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}
