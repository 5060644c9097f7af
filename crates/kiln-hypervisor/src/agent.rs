//! How the host reaches the guest agent: a byte stream over a Unix socket, whatever carries it.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Longest reply line accepted from a vsock `CONNECT` (Firecracker answers `OK <port>\n`).
const MAX_HANDSHAKE_REPLY: usize = 32;

/// Pause between attempts while the guest agent is not listening yet.
const RETRY_INTERVAL: Duration = Duration::from_millis(20);

/// The agent channel of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AgentChannel {
    /// A virtio-vsock device with Firecracker's host side: connect to `uds_path`, send
    /// `CONNECT <port>\n`, read `OK <host port>\n`; then the stream is the guest's vsock connection
    /// to `port`. Many connections may be open at once.
    Vsock {
        /// The device's Unix socket.
        uds_path: PathBuf,
        /// The guest port the agent listens on.
        port: u32,
    },
    /// A virtio-serial port (`name` visible in the guest as `/sys/class/virtio-ports/*/name`,
    /// usually `/dev/vport0p1`) whose other end is this Unix socket (QEMU serves it). One stream:
    /// one connection at a time, no per-connection handshake.
    VirtioSerial {
        /// The socket QEMU listens on.
        socket: PathBuf,
        /// The port's name.
        port_name: String,
        /// The sockets of further ports (`kiln.agent.1` ...), each one more host connection at a
        /// time. Hosts take a port with an exclusive `flock` on `<socket>.lock`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        more_sockets: Vec<PathBuf>,
    },
}

/// An open stream to the agent. On virtio-serial it holds the port's lock: keep it as long as
/// the stream.
#[derive(Debug)]
pub struct AgentStream {
    pub stream: UnixStream,
    /// The `flock`ed `<socket>.lock` of the port in use (virtio-serial only).
    pub port_lock: Option<std::fs::File>,
}

/// Why the agent channel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The socket could not be reached before the deadline.
    #[error("cannot connect to the agent socket {path} within {waited:?}: is the VM running?")]
    Connect {
        /// Socket.
        path: PathBuf,
        /// How long we tried.
        waited: Duration,
        /// The last error.
        #[source]
        source: io::Error,
    },
    /// Every virtio-serial port is held by another host until the deadline.
    #[error(
        "all {ports} agent ports of the VM ({path}) stayed in use by other kiln commands for {waited:?}; \
         wait for one of them to end"
    )]
    PortsBusy {
        /// The first port's socket.
        path: PathBuf,
        /// How many ports there are.
        ports: usize,
        /// How long we tried.
        waited: Duration,
    },
    /// The guest did not accept the vsock connection before the deadline.
    #[error(
        "the guest did not accept a vsock connection to port {port} through {path} within {waited:?} \
         (last answer: {last_reply:?}): is the agent running in the guest and listening on that port?"
    )]
    NotListening {
        /// Socket.
        path: PathBuf,
        /// Guest port.
        port: u32,
        /// How long we tried.
        waited: Duration,
        /// The last thing the VMM answered (empty: it closed the connection).
        last_reply: String,
    },
}

impl AgentError {
    /// The same error, saying the caller tried for `total` in all: for callers that
    /// [`AgentChannel::connect`] in slices (to check the VM between them), so the message names
    /// the whole wait, not the last slice.
    pub fn tried_for(mut self, total: Duration) -> Self {
        match &mut self {
            AgentError::Connect { waited, .. }
            | AgentError::PortsBusy { waited, .. }
            | AgentError::NotListening { waited, .. } => *waited = total,
        }
        self
    }
}

impl AgentChannel {
    /// The host-side socket.
    pub fn socket_path(&self) -> &std::path::Path {
        match self {
            AgentChannel::Vsock { uds_path, .. } => uds_path,
            AgentChannel::VirtioSerial { socket, .. } => socket,
        }
    }

    /// Opens a stream to the guest agent, retrying until `timeout` while the VM or the agent is
    /// not ready (or, on virtio-serial, while every port is in use). The stream has no read/write
    /// timeout.
    pub fn connect(&self, timeout: Duration) -> Result<AgentStream, AgentError> {
        let start = Instant::now();
        let path = self.socket_path().to_path_buf();
        loop {
            let timed_out = start.elapsed() >= timeout;
            match self {
                AgentChannel::VirtioSerial { socket, more_sockets, .. } => {
                    let ports: Vec<&PathBuf> = std::iter::once(socket).chain(more_sockets).collect();
                    match connect_free_port(&ports) {
                        Ok(Some(stream)) => return Ok(stream),
                        Ok(None) if timed_out => {
                            return Err(AgentError::PortsBusy { path, ports: ports.len(), waited: timeout })
                        }
                        Ok(None) => {}
                        Err(source) if timed_out => {
                            return Err(AgentError::Connect { path, waited: timeout, source })
                        }
                        Err(_) => {}
                    }
                }
                AgentChannel::Vsock { port, .. } => match UnixStream::connect(&path) {
                    Ok(stream) => {
                        match vsock_handshake(stream, *port, timeout.saturating_sub(start.elapsed())) {
                            Ok(stream) => return Ok(AgentStream { stream, port_lock: None }),
                            Err(last_reply) if timed_out || start.elapsed() >= timeout => {
                                return Err(AgentError::NotListening {
                                    path,
                                    port: *port,
                                    waited: timeout,
                                    last_reply,
                                })
                            }
                            Err(_) => {}
                        }
                    }
                    Err(source) if timed_out => {
                        return Err(AgentError::Connect { path, waited: timeout, source })
                    }
                    Err(_) => {}
                },
            }
            std::thread::sleep(RETRY_INTERVAL);
        }
    }
}

/// Connects to the first virtio-serial port no other host holds: QEMU serves one client per port
/// and leaves a second one waiting unseen, so hosts take turns by `flock`ing `<socket>.lock`.
/// `Ok(None)`: all are held.
fn connect_free_port(ports: &[&PathBuf]) -> io::Result<Option<AgentStream>> {
    use std::os::fd::AsRawFd as _;
    let mut last_error = None;
    for socket in ports {
        let mut lock_path = socket.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock = match std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path)
        {
            Ok(f) => f,
            Err(e) => {
                last_error = Some(e);
                continue;
            }
        };
        // SAFETY: flock on a file descriptor we own; no memory arguments.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue;
        }
        match UnixStream::connect(socket) {
            Ok(stream) => return Ok(Some(AgentStream { stream, port_lock: Some(lock) })),
            Err(e) => last_error = Some(e),
        }
    }
    match last_error {
        Some(e) => Err(e),
        None => Ok(None),
    }
}

/// Firecracker's host-initiated vsock handshake, waiting at most `wait` for the answer. `Err`
/// carries the reply (empty when the VMM closed the connection: nobody listens on that guest port).
fn vsock_handshake(mut stream: UnixStream, port: u32, wait: Duration) -> Result<UnixStream, String> {
    let io_err = |e: io::Error| e.to_string();
    stream.set_read_timeout(Some(wait.max(Duration::from_millis(1)))).map_err(io_err)?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(io_err)?;
    // Byte by byte: whatever follows the newline is the guest's data and must stay in the stream.
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while reply.len() < MAX_HANDSHAKE_REPLY {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => {
                let text = String::from_utf8_lossy(&reply).to_string();
                if text.starts_with("OK ") {
                    stream.set_read_timeout(None).map_err(io_err)?;
                    return Ok(stream);
                }
                return Err(text);
            }
            Ok(_) => reply.push(byte[0]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err("no answer".into())
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(String::from_utf8_lossy(&reply).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    #[test]
    fn a_sliced_wait_reports_the_whole_wait() {
        let e = AgentError::NotListening {
            path: "/run/vm/agent.vsock".into(),
            port: 1024,
            waited: Duration::from_millis(181),
            last_reply: "no answer".into(),
        };
        let text = e.tried_for(Duration::from_secs(120)).to_string();
        assert!(text.contains("within 120s"), "{text}");
    }

    /// A Firecracker-style vsock host socket: refuses the first `refusals` connections (closes
    /// them, as when the guest does not listen), then accepts, answers OK and echoes one line.
    fn fake_vsock(path: PathBuf, refusals: usize) -> std::thread::JoinHandle<String> {
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for _ in 0..refusals {
                let (s, _) = listener.accept().unwrap();
                let mut line = String::new();
                io::BufReader::new(&s).read_line(&mut line).unwrap();
                drop(s);
            }
            let (mut s, _) = listener.accept().unwrap();
            let mut r = io::BufReader::new(s.try_clone().unwrap());
            let mut connect = String::new();
            r.read_line(&mut connect).unwrap();
            s.write_all(b"OK 1073741824\nhello from the guest\n").unwrap();
            let mut echo = String::new();
            r.read_line(&mut echo).unwrap();
            connect + &echo
        })
    }

    #[test]
    fn vsock_channel_retries_until_the_guest_listens_and_keeps_the_guest_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let server = fake_vsock(path.clone(), 2);
        let chan = AgentChannel::Vsock { uds_path: path, port: 1024 };
        let mut s = chan.connect(Duration::from_secs(5)).unwrap().stream;
        let mut line = String::new();
        io::BufReader::new(s.try_clone().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line, "hello from the guest\n");
        s.write_all(b"ping\n").unwrap();
        assert_eq!(server.join().unwrap(), "CONNECT 1024\nping\n");
    }

    #[test]
    fn vsock_channel_reports_a_guest_that_never_listens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let _server = fake_vsock(path.clone(), usize::MAX);
        let chan = AgentChannel::Vsock { uds_path: path, port: 52 };
        let err = chan.connect(Duration::from_millis(300)).unwrap_err().to_string();
        assert!(err.contains("port 52") && err.contains("agent running"), "{err}");
    }

    #[test]
    fn virtio_serial_hosts_take_free_ports_and_wait_when_all_are_held() {
        let dir = tempfile::tempdir().unwrap();
        let sockets: Vec<PathBuf> = (0..2).map(|i| dir.path().join(format!("agent-{i}.sock"))).collect();
        // Like QEMU's chardevs: listening; whether a connection is served does not matter here.
        let _listeners: Vec<UnixListener> = sockets.iter().map(|p| UnixListener::bind(p).unwrap()).collect();
        let chan = AgentChannel::VirtioSerial {
            socket: sockets[0].clone(),
            port_name: "kiln.agent".into(),
            more_sockets: vec![sockets[1].clone()],
        };
        let first = chan.connect(Duration::from_secs(1)).unwrap();
        let second = chan.connect(Duration::from_secs(1)).unwrap();
        let peer = |s: &AgentStream| s.stream.peer_addr().unwrap().as_pathname().unwrap().to_path_buf();
        assert_eq!((peer(&first), peer(&second)), (sockets[0].clone(), sockets[1].clone()));
        let err = chan.connect(Duration::from_millis(200)).unwrap_err().to_string();
        assert!(err.contains("all 2 agent ports") && err.contains("in use"), "{err}");
        // A host that is done frees its port for the next.
        drop(first);
        assert_eq!(peer(&chan.connect(Duration::from_secs(1)).unwrap()), sockets[0]);
    }

    #[test]
    fn a_missing_socket_is_a_connect_error_naming_it() {
        let chan = AgentChannel::VirtioSerial {
            socket: "/nonexistent/agent.sock".into(),
            port_name: "x".into(),
            more_sockets: Vec::new(),
        };
        let err = chan.connect(Duration::from_millis(100)).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/agent.sock"), "{err}");
    }
}
