//! Host-side client (synchronous, one reader thread per connection).
//!
//! ```no_run
//! use kiln_agent_proto::{Client, ExecRequest};
//! # fn main() -> Result<(), kiln_agent_proto::ClientError> {
//! // Firecracker-style vsock (kiln-vmm, Firecracker): the VM's `uds_path` and the agent's port.
//! let client = Client::connect_vsock_uds("/run/vm/v.sock".as_ref(), 1024, std::time::Duration::from_secs(30))?;
//! let out = client.exec(ExecRequest { argv: vec!["uname".into(), "-a".into()], ..Default::default() })?.output()?;
//! println!("{} -> {}", String::from_utf8_lossy(&out.stdout), out.status);
//! # Ok(()) }
//! ```
//!
//! The reader thread owns the socket's read side: it hands data to per-stream buffers bounded by the
//! credit this side grants (see [`crate::window`]), credit goes back as the caller reads, and a guest
//! that sends beyond its credit, floods control messages or breaks the framing gets the connection
//! closed. A guest is hostile: nothing it sends can make this side allocate without bound or panic.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::frame::{ProtoError, MAX_DATA_CHUNK};
use crate::handshake::{client_handshake, hello};
use crate::message::{
    read_envelope, write_envelope, Channel, CopyFormat, CopyIn, CopyOut, ExecRequest, ExitStatus,
    GuestConfig, Message, Shutdown, ShutdownAction, Welcome, WindowSize,
};
use crate::window::{RecvWindow, SendWindow};

/// Control messages (non-data) one stream may have queued; more is a misbehaving agent.
const MAX_QUEUED_CONTROL: usize = 64;
/// Longest `OK <port>\n` line accepted from a Firecracker-style vsock host side.
const MAX_OK_LINE: usize = 64;

/// Errors of the host-side client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the agent socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the VMM at {path} did not open vsock port {port}: {detail} \
         (is the guest booted and kiln-agent listening on vsock port {port}?)"
    )]
    VsockConnect { path: PathBuf, port: u32, detail: String },
    #[error("agent protocol error")]
    Proto(#[from] ProtoError),
    #[error("the agent connection is closed: {0}")]
    Closed(String),
    #[error("the agent reported an error: {0}")]
    Remote(String),
    #[error("unexpected {got} from the agent while waiting for {expected}")]
    Unexpected { expected: &'static str, got: &'static str },
    #[error("reading or writing local data failed")]
    Local(#[source] io::Error),
    #[error("timed out after {0:?} waiting for the agent")]
    Timeout(Duration),
    #[error(
        "the guest's agent ({software}, protocol {major}.{minor}) is too old for {what}; rebuild it \
         with scripts/build-agent and create the VM again"
    )]
    TooOld { software: String, major: u16, minor: u16, what: &'static str },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Index of the receive buffers of a stream.
fn recv_index(c: Channel) -> Option<usize> {
    match c {
        Channel::Stdout => Some(0),
        Channel::Stderr => Some(1),
        Channel::Copy => Some(2),
        Channel::Stdin => None,
    }
}

#[derive(Debug, Default)]
struct ChanBuf {
    data: VecDeque<u8>,
    window: RecvWindow,
}

#[derive(Debug, Default)]
struct Inbox {
    chans: [ChanBuf; 3],
    control: VecDeque<Message>,
    /// No more data will arrive: a terminal message came, or the connection ended.
    finished: bool,
    conn_error: Option<String>,
    /// The owner is gone: data is dropped and credited at once, the stream removed when it ends.
    detached: bool,
}

#[derive(Debug, Default)]
struct StreamState {
    inbox: Mutex<Inbox>,
    cond: Condvar,
    stdin: SendWindow,
    copy: SendWindow,
}

impl StreamState {
    fn close_send(&self) {
        self.stdin.close();
        self.copy.close();
    }
}

struct Shared {
    writer: Mutex<UnixStream>,
    streams: Mutex<HashMap<u32, Arc<StreamState>>>,
    next_id: AtomicU32,
    dead: Mutex<Option<String>>,
    /// Whatever must live as long as the connection (see [`Client::hold`]).
    held: Mutex<Vec<Box<dyn std::any::Any + Send>>>,
}

impl Shared {
    fn send(&self, stream: u32, msg: &Message) -> Result<(), ClientError> {
        if let Some(reason) = lock(&self.dead).clone() {
            return Err(ClientError::Closed(reason));
        }
        let mut w = lock(&self.writer);
        write_envelope(&mut *w, stream, msg).map_err(|e| match e {
            ProtoError::Io(io) => ClientError::Closed(format!("sending {} failed: {io}", msg.name())),
            other => ClientError::Proto(other),
        })
    }

    fn open_stream(&self) -> Result<(u32, Arc<StreamState>), ClientError> {
        let mut streams = lock(&self.streams);
        if let Some(reason) = lock(&self.dead).clone() {
            return Err(ClientError::Closed(reason));
        }
        loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 && !streams.contains_key(&id) {
                let st = Arc::new(StreamState::default());
                streams.insert(id, st.clone());
                return Ok((id, st));
            }
        }
    }

    fn fail_all(&self, reason: String) {
        tracing::debug!("agent connection ended: {reason}");
        *lock(&self.dead) = Some(reason.clone());
        let streams: Vec<_> = lock(&self.streams).drain().map(|(_, s)| s).collect();
        for st in streams {
            let mut ib = lock(&st.inbox);
            ib.finished = true;
            ib.conn_error.get_or_insert_with(|| reason.clone());
            st.close_send();
            st.cond.notify_all();
        }
        // Unblock anyone writing, and the agent.
        let _ = lock(&self.writer).shutdown(std::net::Shutdown::Both);
    }

    /// Buffers received data within the credit granted for it (or drops and credits it at once when
    /// the stream is detached).
    fn data(&self, st: &StreamState, stream: u32, channel: Channel, d: Vec<u8>) -> Result<(), String> {
        let Some(idx) = recv_index(channel) else { return Ok(()) };
        let mut ib = lock(&st.inbox);
        let detached = ib.detached;
        let chan = &mut ib.chans[idx];
        chan.window.received(d.len()).map_err(|e| {
            format!(
                "the agent sent {} bytes of {channel:?} on stream {stream} with only {} bytes of credit",
                e.outstanding, e.window
            )
        })?;
        if detached {
            chan.window.consumed(d.len());
            let credit = chan.window.flush_credit();
            drop(ib);
            if credit > 0 {
                let _ = self.send(stream, &Message::Credit { channel, bytes: credit });
            }
        } else {
            chan.data.extend(d);
            st.cond.notify_all();
        }
        Ok(())
    }

    /// Handles one message from the agent; `Err` closes the connection.
    fn dispatch(&self, stream: u32, msg: Message) -> Result<(), String> {
        if stream == 0 {
            return match msg {
                Message::Error { message } => Err(format!("the agent closed the connection: {message}")),
                other => {
                    tracing::debug!("ignoring {} on stream 0", other.name());
                    Ok(())
                }
            };
        }
        let Some(st) = lock(&self.streams).get(&stream).cloned() else {
            tracing::trace!("ignoring {} for unknown stream {stream}", msg.name());
            return Ok(());
        };
        match msg {
            Message::Credit { channel: Channel::Stdin, bytes } => st.stdin.add(bytes as u64),
            Message::Credit { channel: Channel::Copy, bytes } => st.copy.add(bytes as u64),
            Message::Credit { .. } => {}
            Message::Stdout(d) => self.data(&st, stream, Channel::Stdout, d)?,
            Message::Stderr(d) => self.data(&st, stream, Channel::Stderr, d)?,
            Message::CopyData(d) => self.data(&st, stream, Channel::Copy, d)?,
            other => {
                let terminal = matches!(
                    other,
                    Message::Exited(_)
                        | Message::CopyEnd
                        | Message::CopyDone { .. }
                        | Message::Error { .. }
                        | Message::Ok
                        | Message::Pong
                );
                let mut ib = lock(&st.inbox);
                if ib.finished {
                    return Err(format!("the agent sent {} on stream {stream} after it ended", other.name()));
                }
                if ib.detached {
                    if terminal {
                        ib.finished = true;
                        drop(ib);
                        st.close_send();
                        lock(&self.streams).remove(&stream);
                    }
                    return Ok(());
                }
                if ib.control.len() >= MAX_QUEUED_CONTROL {
                    return Err(format!("the agent flooded stream {stream} with control messages"));
                }
                ib.control.push_back(other);
                if terminal {
                    ib.finished = true;
                    st.close_send();
                }
                st.cond.notify_all();
            }
        }
        Ok(())
    }
}

/// A handle on one stream; detaches it (see [`Inbox::detached`]) when dropped unfinished.
struct StreamHandle {
    shared: Arc<Shared>,
    id: u32,
    st: Arc<StreamState>,
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        let mut ib = lock(&self.st.inbox);
        if ib.finished {
            drop(ib);
            lock(&self.shared.streams).remove(&self.id);
            return;
        }
        ib.detached = true;
        // Hand back everything buffered, so the agent can finish the stream.
        let credits: Vec<_> = [Channel::Stdout, Channel::Stderr, Channel::Copy]
            .into_iter()
            .filter_map(|c| {
                let chan = &mut ib.chans[recv_index(c)?];
                let n = chan.data.len();
                chan.data.clear();
                chan.window.consumed(n);
                Some((c, chan.window.flush_credit()))
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        drop(ib);
        for (channel, bytes) in credits {
            let _ = self.shared.send(self.id, &Message::Credit { channel, bytes });
        }
    }
}

impl StreamHandle {
    fn send(&self, msg: &Message) -> Result<(), ClientError> {
        self.shared.send(self.id, msg)
    }

    /// Next control message; an error when the connection ended first.
    fn next_control(&self, timeout: Option<Duration>) -> Result<Message, ClientError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut ib = lock(&self.st.inbox);
        loop {
            if let Some(m) = ib.control.pop_front() {
                return Ok(m);
            }
            if ib.finished {
                let reason = ib.conn_error.clone().unwrap_or_else(|| "the stream ended".into());
                return Err(ClientError::Closed(reason));
            }
            ib = match deadline {
                None => self.st.cond.wait(ib).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(ClientError::Timeout(timeout.unwrap_or_default()));
                    }
                    self.st.cond.wait_timeout(ib, d - now).unwrap_or_else(|p| p.into_inner()).0
                }
            };
        }
    }

    /// Reads received data of `channel`; `Ok(0)` at its end.
    fn read_data(&self, channel: Channel, buf: &mut [u8]) -> io::Result<usize> {
        let Some(idx) = recv_index(channel) else { return Ok(0) };
        if buf.is_empty() {
            return Ok(0);
        }
        let mut ib = lock(&self.st.inbox);
        loop {
            let chan = &mut ib.chans[idx];
            if !chan.data.is_empty() {
                let n = buf.len().min(chan.data.len());
                for (dst, src) in buf.iter_mut().zip(chan.data.drain(..n)) {
                    *dst = src;
                }
                let credit = chan.window.consumed(n);
                drop(ib);
                if let Some(bytes) = credit {
                    // A dead connection shows up on the next read; the data read now is good.
                    let _ = self.send(&Message::Credit { channel, bytes });
                }
                return Ok(n);
            }
            if ib.finished {
                return match &ib.conn_error {
                    Some(e) => Err(io::Error::new(io::ErrorKind::ConnectionAborted, e.clone())),
                    None => Ok(0),
                };
            }
            ib = self.st.cond.wait(ib).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Sends `data` as data messages of `channel` within the credit of `window`. `Ok(false)` when
    /// the stream ended before everything was sent.
    fn send_data(&self, window: &SendWindow, channel: Channel, mut data: &[u8]) -> Result<bool, ClientError> {
        while !data.is_empty() {
            let Some(n) = window.take(data.len().min(MAX_DATA_CHUNK)) else { return Ok(false) };
            let msg = match channel {
                Channel::Stdin => Message::Stdin(data[..n].to_vec()),
                _ => Message::CopyData(data[..n].to_vec()),
            };
            self.send(&msg)?;
            data = &data[n..];
        }
        Ok(true)
    }
}

/// What a finished process left: its exit and all its output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// A connection to one agent.
pub struct Client {
    shared: Arc<Shared>,
    welcome: Welcome,
    reader: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("welcome", &self.welcome).finish()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = lock(&self.shared.writer).shutdown(std::net::Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// Connects to a Firecracker-style vsock host side once: `CONNECT <port>\n`, then `OK <n>\n`.
fn vsock_connect_once(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, ClientError> {
    let mut s = UnixStream::connect(uds)
        .map_err(|source| ClientError::Connect { path: uds.to_path_buf(), source })?;
    let fail = |detail: String| ClientError::VsockConnect { path: uds.to_path_buf(), port, detail };
    s.set_read_timeout(Some(timeout)).map_err(ClientError::Local)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(|e| fail(format!("writing CONNECT: {e}")))?;
    // Byte by byte: what follows the line is already the agent's stream.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(0) => {
                return Err(fail("the VMM closed the connection (no listener on that port yet?)".into()))
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() >= MAX_OK_LINE => return Err(fail("over-long answer line".into())),
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(fail(format!("reading the OK line: {e}"))),
        }
    }
    let line = String::from_utf8_lossy(&line);
    if !line.starts_with("OK ") {
        return Err(fail(format!("expected `OK <port>`, got {line:?}")));
    }
    s.set_read_timeout(None).map_err(ClientError::Local)?;
    Ok(s)
}

impl Client {
    /// Handshakes over an already connected stream (e.g. a QEMU virtio-serial chardev socket) and
    /// starts the reader thread. `timeout` bounds the handshake.
    pub fn from_stream(stream: UnixStream, timeout: Duration) -> Result<Client, ClientError> {
        let mut s = stream;
        s.set_read_timeout(Some(timeout)).map_err(ClientError::Local)?;
        let welcome =
            client_handshake(&mut s, &hello(concat!("kiln-agent-proto ", env!("CARGO_PKG_VERSION"))))
                .map_err(|e| match e {
                    ProtoError::Io(io)
                        if matches!(io.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
                    {
                        ClientError::Timeout(timeout)
                    }
                    other => ClientError::Proto(other),
                })?;
        s.set_read_timeout(None).map_err(ClientError::Local)?;
        let mut reader = s.try_clone().map_err(ClientError::Local)?;
        let shared = Arc::new(Shared {
            writer: Mutex::new(s),
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            dead: Mutex::new(None),
            held: Mutex::new(Vec::new()),
        });
        let sh = shared.clone();
        let reader = std::thread::Builder::new()
            .name("agent-client-reader".into())
            .spawn(move || {
                let reason = loop {
                    match read_envelope(&mut reader) {
                        Ok(Some(env)) => {
                            if let Err(reason) = sh.dispatch(env.stream, env.msg) {
                                break reason;
                            }
                        }
                        Ok(None) => break "the agent closed the connection".to_string(),
                        Err(e) => break format!("{e}"),
                    }
                };
                sh.fail_all(reason);
            })
            .map_err(ClientError::Local)?;
        Ok(Client { shared, welcome, reader: Some(reader) })
    }

    /// Connects to a plain Unix stream socket (QEMU `-chardev socket,path=...` of a virtio-serial
    /// port, or `kiln-agent --listen-unix PATH` in tests).
    pub fn connect_unix(path: &Path, timeout: Duration) -> Result<Client, ClientError> {
        let s = UnixStream::connect(path)
            .map_err(|source| ClientError::Connect { path: path.to_path_buf(), source })?;
        Client::from_stream(s, timeout)
    }

    /// Connects through a Firecracker-style vsock host side (kiln-vmm, Firecracker): the VM's
    /// `uds_path` and the guest port. Retries until `timeout` while the guest is not listening yet
    /// (booting), so it can be called right after the VM starts.
    pub fn connect_vsock_uds(uds: &Path, port: u32, timeout: Duration) -> Result<Client, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = vsock_connect_once(uds, port, left.max(Duration::from_millis(100)))
                .and_then(|s| Client::from_stream(s, left.max(Duration::from_secs(1))));
            match attempt {
                Ok(c) => return Ok(c),
                Err(e @ (ClientError::Connect { .. } | ClientError::VsockConnect { .. }))
                    if Instant::now() + Duration::from_millis(100) < deadline =>
                {
                    tracing::debug!("agent not reachable yet: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Keeps `guard` until the connection and every process on it are dropped (e.g. the lock on the
    /// transport port this connection uses).
    pub fn hold(&self, guard: impl std::any::Any + Send) {
        lock(&self.shared.held).push(Box::new(guard));
    }

    /// What the agent said in the handshake.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    fn open(&self, msg: &Message) -> Result<StreamHandle, ClientError> {
        let (id, st) = self.shared.open_stream()?;
        let h = StreamHandle { shared: self.shared.clone(), id, st };
        h.send(msg)?;
        Ok(h)
    }

    /// A request answered by one message: returns it, or the agent's error.
    fn call(&self, msg: &Message, timeout: Option<Duration>) -> Result<Message, ClientError> {
        Self::reply(&self.open(msg)?, timeout)
    }

    /// The one message answering the request sent on `h`, or the agent's error.
    fn reply(h: &StreamHandle, timeout: Option<Duration>) -> Result<Message, ClientError> {
        match h.next_control(timeout)? {
            Message::Error { message } => Err(ClientError::Remote(message)),
            m => Ok(m),
        }
    }

    fn expect_ok(&self, msg: &Message) -> Result<(), ClientError> {
        Self::ok_reply(&self.open(msg)?)
    }

    /// Ok as the answer to the request sent on `h`.
    fn ok_reply(h: &StreamHandle) -> Result<(), ClientError> {
        match Self::reply(h, None)? {
            Message::Ok => Ok(()),
            m => Err(ClientError::Unexpected { expected: "Ok", got: m.name() }),
        }
    }

    /// Round trip time to the agent.
    pub fn ping(&self, timeout: Duration) -> Result<Duration, ClientError> {
        let start = Instant::now();
        match self.call(&Message::Ping, Some(timeout))? {
            Message::Pong => Ok(start.elapsed()),
            m => Err(ClientError::Unexpected { expected: "Pong", got: m.name() }),
        }
    }

    /// Sets the guest's CLOCK_REALTIME to `time`.
    pub fn set_time(&self, time: SystemTime) -> Result<(), ClientError> {
        let d = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        self.expect_ok(&Message::SetTime { secs: d.as_secs() as i64, nanos: d.subsec_nanos() })
    }

    /// Gives the agent its configuration for this boot (clock, hostname, ssh key, name servers, the
    /// main process). Once per boot: the agent refuses a second one.
    pub fn configure(&self, config: GuestConfig) -> Result<(), ClientError> {
        self.require_minor(1, "Configure")?;
        self.expect_ok(&Message::Configure(Box::new(config)))
    }

    /// Fails when the agent's protocol is older than `minor` (what it lacks: `what`).
    fn require_minor(&self, minor: u16, what: &'static str) -> Result<(), ClientError> {
        if self.welcome.minor >= minor {
            return Ok(());
        }
        Err(ClientError::TooOld {
            software: self.welcome.software.clone(),
            major: self.welcome.major,
            minor: self.welcome.minor,
            what,
        })
    }

    /// [`Client::configure`] and [`Client::attach_main`] in one round trip: both requests go out
    /// before either answer is read (the agent handles a connection's requests in order).
    pub fn configure_and_attach(&self, config: GuestConfig) -> Result<Process, ClientError> {
        self.require_minor(1, "Configure")?;
        let configure = self.open(&Message::Configure(Box::new(config)))?;
        let attach = self.open(&Message::AttachMain)?;
        Self::ok_reply(&configure)?;
        Self::started(attach)
    }

    /// Asks the agent to stop everything and power off or reboot the guest. Returns once the agent
    /// accepted; the connection then ends when the guest goes down.
    pub fn shutdown(&self, action: ShutdownAction, grace: Option<Duration>) -> Result<(), ClientError> {
        let grace_ms = grace.map(|g| g.as_millis().min(u64::MAX as u128) as u64);
        self.expect_ok(&Message::Shutdown(Shutdown { action, grace_ms }))
    }

    /// Starts a process.
    pub fn exec(&self, req: ExecRequest) -> Result<Process, ClientError> {
        self.start(&Message::Exec(req))
    }

    /// Attaches to the main process's stdio (starting it when the agent waits for an attach).
    pub fn attach_main(&self) -> Result<Process, ClientError> {
        self.start(&Message::AttachMain)
    }

    fn start(&self, msg: &Message) -> Result<Process, ClientError> {
        Self::started(self.open(msg)?)
    }

    /// The answer to an Exec or AttachMain sent on `h`.
    fn started(h: StreamHandle) -> Result<Process, ClientError> {
        match h.next_control(None)? {
            Message::Started { pid } => Ok(Process { h, pid }),
            Message::Error { message } => Err(ClientError::Remote(message)),
            m => Err(ClientError::Unexpected { expected: "Started", got: m.name() }),
        }
    }

    /// Waits until the main process ends; immediately when it already has.
    pub fn wait_main(&self) -> Result<ExitStatus, ClientError> {
        match self.call(&Message::WaitMain, None)? {
            Message::Exited(s) => Ok(s),
            m => Err(ClientError::Unexpected { expected: "Exited", got: m.name() }),
        }
    }

    /// Copies `data` into the guest at `path` (a file, or with [`CopyFormat::Tar`] a tar stream
    /// unpacked into the directory `path`). Returns the bytes the agent wrote.
    pub fn copy_in(
        &self,
        path: &str,
        mode: Option<u32>,
        format: CopyFormat,
        mut data: impl Read,
    ) -> Result<u64, ClientError> {
        let h = self.open(&Message::CopyIn(CopyIn { path: path.to_string(), mode, format }))?;
        let mut buf = vec![0u8; MAX_DATA_CHUNK];
        loop {
            let n = match data.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ClientError::Local(e)),
            };
            if !h.send_data(&h.st.copy, Channel::Copy, &buf[..n])? {
                break; // the agent ended the stream (an error): read it below
            }
        }
        if !h.st.copy.is_closed() {
            h.send(&Message::CopyEnd)?;
        }
        match h.next_control(None)? {
            Message::CopyDone { bytes } => Ok(bytes),
            Message::Error { message } => Err(ClientError::Remote(message)),
            m => Err(ClientError::Unexpected { expected: "CopyDone", got: m.name() }),
        }
    }

    /// Copies `path` out of the guest into `out` (the file's bytes, or with [`CopyFormat::Tar`] a
    /// tar stream of it). Returns the bytes written to `out`. The data comes from the guest: unpack a
    /// tar stream only with an unpacker that refuses path escapes.
    pub fn copy_out(&self, path: &str, format: CopyFormat, mut out: impl Write) -> Result<u64, ClientError> {
        let h = self.open(&Message::CopyOut(CopyOut { path: path.to_string(), format }))?;
        let mut buf = vec![0u8; MAX_DATA_CHUNK];
        let mut total = 0u64;
        loop {
            let n = h.read_data(Channel::Copy, &mut buf).map_err(|e| ClientError::Closed(e.to_string()))?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).map_err(ClientError::Local)?;
            total += n as u64;
        }
        out.flush().map_err(ClientError::Local)?;
        match h.next_control(None)? {
            Message::CopyEnd => Ok(total),
            Message::Error { message } => Err(ClientError::Remote(message)),
            m => Err(ClientError::Unexpected { expected: "CopyEnd", got: m.name() }),
        }
    }
}

/// A process started by [`Client::exec`] or [`Client::attach_main`].
pub struct Process {
    h: StreamHandle,
    pid: u32,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process").field("stream", &self.h.id).field("pid", &self.pid).finish()
    }
}

impl Process {
    /// The process's pid in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its stdout (with a tty: the terminal's output). Reading returns credit to the agent; data not
    /// read holds the process up once [`crate::INITIAL_WINDOW`] bytes are buffered.
    pub fn stdout(&self) -> OutputReader<'_> {
        OutputReader { p: self, channel: Channel::Stdout }
    }

    /// Its stderr (nothing with a tty).
    pub fn stderr(&self) -> OutputReader<'_> {
        OutputReader { p: self, channel: Channel::Stderr }
    }

    /// Writes to its stdin (when the exec asked for stdin), blocking while the agent has no room.
    pub fn write_stdin(&self, data: &[u8]) -> Result<(), ClientError> {
        if self.h.send_data(&self.h.st.stdin, Channel::Stdin, data)? {
            Ok(())
        } else {
            Err(ClientError::Closed("the process ended before it read all of its stdin".into()))
        }
    }

    /// Closes its stdin (with a tty: sends the terminal's EOF character).
    pub fn close_stdin(&self) -> Result<(), ClientError> {
        self.h.send(&Message::StdinEof)
    }

    /// Copies `input` to the process's stdin on a thread of its own until `input` ends (then
    /// closes the process's stdin) or the process stops reading.
    pub fn forward_stdin(
        process: &Arc<Process>,
        mut input: impl Read + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        let p = process.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 32 << 10];
            while let Ok(n) = input.read(&mut buf) {
                if n == 0 || p.write_stdin(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = p.close_stdin();
        })
    }

    /// Resizes its terminal (tty execs only; the process gets SIGWINCH).
    pub fn resize(&self, size: WindowSize) -> Result<(), ClientError> {
        self.h.send(&Message::Resize(size))
    }

    /// Sends it a signal (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: i32) -> Result<(), ClientError> {
        self.h.send(&Message::Signal { signal })
    }

    /// Waits for its exit. Its output must be read (or dropped with the process) meanwhile, else
    /// the agent waits for credit and the exit never comes, as with pipes.
    pub fn wait(&self) -> Result<ExitStatus, ClientError> {
        loop {
            match self.h.next_control(None)? {
                Message::Exited(s) => return Ok(s),
                Message::Error { message } => return Err(ClientError::Remote(message)),
                m => tracing::debug!("ignoring {} while waiting for the exit", m.name()),
            }
        }
    }

    /// Copies stdout and stderr to the writers as they come, then waits for the exit.
    pub fn pump(
        &self,
        stdout: &mut (impl Write + Send),
        stderr: &mut (impl Write + Send),
    ) -> Result<ExitStatus, ClientError> {
        std::thread::scope(|s| {
            let err = s.spawn(|| io::copy(&mut self.stderr(), stderr));
            let out = io::copy(&mut self.stdout(), stdout);
            let err = err.join().unwrap_or_else(|_| Err(io::Error::other("stderr copy panicked")));
            out.and(err).map_err(ClientError::Local)
        })?;
        self.wait()
    }

    /// Collects all output and the exit (bounded by what the process writes: use [`Process::pump`]
    /// for unbounded output).
    pub fn output(self) -> Result<Output, ClientError> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let status = self.pump(&mut stdout, &mut stderr)?;
        Ok(Output { status, stdout, stderr })
    }
}

/// Reads one output channel of a [`Process`].
pub struct OutputReader<'a> {
    p: &'a Process,
    channel: Channel,
}

impl std::fmt::Debug for OutputReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputReader").field("channel", &self.channel).finish()
    }
}

impl Read for OutputReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.p.h.read_data(self.channel, buf)
    }
}
