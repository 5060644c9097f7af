//! One host connection: handshake, then a reader loop that dispatches messages to streams, and a
//! writer thread fed by a bounded queue.
//!
//! Bounds: the reader holds at most one frame; per stream, buffered stdin and copy-in data are
//! bounded by the credit the agent grants (a host exceeding it is a protocol error that closes the
//! connection); output is read from a process only within the host's credit, so a slow host stalls
//! the process (as a full pipe would), never the agent's memory. The writer queue holds at most
//! [`WRITE_QUEUE`] frames; producers wait when it is full.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kiln_agent_proto::handshake::{check_hello, serve_handshake};
use kiln_agent_proto::message::{read_envelope, Envelope, Welcome};
use kiln_agent_proto::window::{RecvWindow, SendWindow};
use kiln_agent_proto::{
    Channel, ExecRequest, ExitStatus, Message, MAX_DATA_CHUNK, MAX_STREAMS, PROTOCOL_MAJOR,
};

use crate::agent::{Agent, Role, StopKind, StopRequest, DEFAULT_GRACE};
use crate::spawn::{self, Spawned, StdioMode};
use crate::{copy, error_chain, sys};

/// Frames queued for the writer thread at most.
const WRITE_QUEUE: usize = 16;
/// After a process exited, its output is drained until the pipe stays empty this long (a
/// background child may keep the pipe open forever).
const DRAIN_IDLE_MS: i32 = 100;

/// Frames queued for any connection and not written yet (so stopping can let replies out first).
static UNSENT: AtomicUsize = AtomicUsize::new(0);

/// Waits until every queued frame was written (or `timeout` passed).
pub fn wait_flushed(timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while UNSENT.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The sending side of a connection, shared by every thread that answers the host.
#[derive(Clone)]
pub struct Sink {
    tx: SyncSender<Vec<u8>>,
    /// This session ended (a new host took over the stream).
    dead: Arc<AtomicBool>,
    /// The connection ended.
    conn_dead: Arc<AtomicBool>,
}

impl Sink {
    /// Queues a message; false when the connection is gone (the caller then stops producing).
    pub fn send(&self, stream: u32, msg: &Message) -> bool {
        if self.is_dead() {
            return false;
        }
        match msg.encode(stream) {
            Ok(frame) => {
                UNSENT.fetch_add(1, Ordering::SeqCst);
                let sent = self.tx.send(frame).is_ok();
                if !sent {
                    UNSENT.fetch_sub(1, Ordering::SeqCst);
                }
                sent
            }
            Err(e) => {
                tracing::error!("cannot encode {}: {e}", msg.name());
                false
            }
        }
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst) || self.conn_dead.load(Ordering::SeqCst)
    }

    pub fn error(&self, stream: u32, message: String) -> bool {
        self.send(stream, &Message::Error { message })
    }
}

enum StdinItem {
    Data(Vec<u8>),
    Eof,
}

/// A running process attached to a stream.
struct ExecSession {
    pid: u32,
    main: bool,
    tty: bool,
    stdin: Mutex<Option<mpsc::Sender<StdinItem>>>,
    stdin_window: Mutex<RecvWindow>,
    /// Credit for stdout and stderr.
    out: [SendWindow; 2],
    pty: Option<File>,
}

impl ExecSession {
    fn disconnect(&self) {
        self.out.iter().for_each(SendWindow::close);
        lock(&self.stdin).take();
        if !self.main {
            // Like a terminal hangup: the process group learns its controller went away.
            let _ = sys::kill(-(self.pid as i32), libc::SIGHUP);
        }
    }
}

enum Session {
    Exec(Arc<ExecSession>),
    CopyIn(Arc<copy::CopyInSession>),
    CopyOut(Arc<SendWindow>),
    WaitMain,
}

/// One connection's shared state.
pub struct Conn {
    agent: Arc<Agent>,
    sink: Sink,
    sessions: Mutex<HashMap<u32, Session>>,
}

/// Serves one host connection until it ends. `io` is a connected stream (vsock, Unix socket or
/// virtio-serial port). `rehello`: the transport is one long-lived stream that hosts take over one
/// after another (a virtio-serial port, where the guest may never see the first host leave), so a
/// Hello in the middle of a session starts a new session: the old one's processes are hung up and
/// its streams forgotten, as if its connection had closed.
pub fn serve(agent: &Arc<Agent>, mut io: File, rehello: bool) {
    let _guard = agent.connection();
    match serve_handshake(&mut io, welcome(agent)) {
        Ok((hello, _)) => tracing::info!("host connected: {}", hello.software),
        Err(e) => {
            tracing::warn!("handshake failed: {}", error_chain(&e));
            return;
        }
    }
    let mut writer = match io.try_clone() {
        Ok(w) => w,
        Err(e) => {
            tracing::error!("cannot duplicate the connection: {e}");
            return;
        }
    };
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(WRITE_QUEUE);
    let conn_dead = Arc::new(AtomicBool::new(false));
    let writer_dead = conn_dead.clone();
    let writer_thread = std::thread::spawn(move || write_loop(&mut writer, rx, &writer_dead));
    let new_session = || {
        Arc::new(Conn {
            agent: agent.clone(),
            sink: Sink {
                tx: tx.clone(),
                dead: Arc::new(AtomicBool::new(false)),
                conn_dead: conn_dead.clone(),
            },
            sessions: Mutex::new(HashMap::new()),
        })
    };
    let mut conn = new_session();

    loop {
        match read_envelope(&mut io) {
            Ok(Some(Envelope { msg: Message::Hello(hello), .. })) if rehello => {
                tracing::info!("a new host took over the port: {}", hello.software);
                conn.close();
                conn = new_session();
                match check_hello(&hello) {
                    Ok(minor) => {
                        conn.sink.send(
                            0,
                            &Message::Welcome(Welcome { major: PROTOCOL_MAJOR, minor, ..welcome(agent) }),
                        );
                    }
                    Err(refused) => {
                        tracing::warn!("refusing the new host: {}", refused.reason);
                        conn.sink.send(0, &Message::Refused(refused));
                        break;
                    }
                }
            }
            Ok(Some(env)) => {
                if let Err(reason) = conn.handle(env.stream, env.msg) {
                    tracing::warn!("closing the connection: {reason}");
                    conn.sink.error(0, reason);
                    break;
                }
            }
            Ok(None) => {
                tracing::info!("host disconnected");
                break;
            }
            Err(e) => {
                let reason = error_chain(&e);
                tracing::warn!("closing the connection: {reason}");
                conn.sink.error(0, reason);
                break;
            }
        }
    }
    conn_dead.store(true, Ordering::SeqCst);
    conn.close();
    // Wakes the writer now rather than at its next timeout: on a virtio-serial port the next host
    // is served only once this returns. What was queued before still goes out first.
    let _ = tx.try_send(Vec::new());
    let _ = writer_thread.join();
    sys::shutdown_socket(io.as_raw_fd());
}

/// Our Welcome; the handshake fills in the version.
fn welcome(agent: &Agent) -> Welcome {
    Welcome {
        major: 0,
        minor: 0,
        software: software(),
        pid1: agent.role == Role::Init,
        has_main: agent.has_main(),
        configured: agent.is_configured(),
    }
}

fn software() -> String {
    concat!("kiln-agent ", env!("CARGO_PKG_VERSION")).to_string()
}

fn write_loop(w: &mut File, rx: Receiver<Vec<u8>>, dead: &AtomicBool) {
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            // The wake-up `serve` sends when the connection ended (not a frame: nothing to count).
            Ok(frame) if frame.is_empty() => {
                if dead.load(Ordering::SeqCst) {
                    break;
                }
            }
            Ok(frame) => {
                let written = w.write_all(&frame);
                UNSENT.fetch_sub(1, Ordering::SeqCst);
                if let Err(e) = written {
                    tracing::debug!("writing to the host failed: {e}");
                    dead.store(true, Ordering::SeqCst);
                    sys::shutdown_socket(w.as_raw_fd());
                    break;
                }
            }
            Err(RecvTimeoutError::Timeout) if dead.load(Ordering::SeqCst) => break,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
    // What is still queued will never be written.
    while rx.try_recv().is_ok() {
        UNSENT.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Conn {
    /// Ends this session: nothing more is sent for it, its processes are hung up.
    fn close(&self) {
        self.sink.dead.store(true, Ordering::SeqCst);
        let sessions: Vec<Session> = lock(&self.sessions).drain().map(|(_, s)| s).collect();
        for s in sessions {
            match s {
                Session::Exec(e) => e.disconnect(),
                Session::CopyIn(c) => c.abort(),
                Session::CopyOut(w) => w.close(),
                Session::WaitMain => {}
            }
        }
    }

    fn session_exec(&self, stream: u32) -> Option<Arc<ExecSession>> {
        match lock(&self.sessions).get(&stream) {
            Some(Session::Exec(e)) => Some(e.clone()),
            _ => None,
        }
    }

    pub fn remove(&self, stream: u32) {
        lock(&self.sessions).remove(&stream);
    }

    /// Checks that `stream` may start a request. `Ok(false)`: refused with an Error on the stream.
    fn new_stream(&self, stream: u32) -> Result<bool, String> {
        if stream == 0 {
            return Err("requests need a stream id other than 0".into());
        }
        let sessions = lock(&self.sessions);
        if sessions.contains_key(&stream) {
            return Err(format!("stream {stream} is already in use"));
        }
        if sessions.len() >= MAX_STREAMS {
            drop(sessions);
            self.sink.error(
                stream,
                format!("too many concurrent requests on one connection (limit {MAX_STREAMS})"),
            );
            return Ok(false);
        }
        drop(sessions);
        if self.agent.is_stopping() {
            self.sink.error(stream, "the guest is shutting down".into());
            return Ok(false);
        }
        Ok(true)
    }

    /// Handles one host message. `Err` is a protocol violation: the connection is closed.
    fn handle(self: &Arc<Self>, stream: u32, msg: Message) -> Result<(), String> {
        match msg {
            Message::Ping => {
                if self.new_stream(stream)? {
                    self.sink.send(stream, &Message::Pong);
                }
            }
            Message::SetTime { secs, nanos } => {
                if self.new_stream(stream)? {
                    let reply = if self.agent.role == Role::Test {
                        Message::Error {
                            message: "SetTime is disabled in --listen-unix test mode (it would set the host's clock)"
                                .into(),
                        }
                    } else {
                        match sys::set_realtime(secs, nanos) {
                            Ok(()) => Message::Ok,
                            Err(e) => {
                                Message::Error { message: format!("setting the guest clock failed: {e}") }
                            }
                        }
                    };
                    self.sink.send(stream, &reply);
                }
            }
            Message::Configure(config) => {
                if self.new_stream(stream)? {
                    let reply = match self.agent.configure(*config) {
                        Ok(()) => Message::Ok,
                        Err(message) => Message::Error { message },
                    };
                    self.sink.send(stream, &reply);
                }
            }
            Message::Shutdown(s) => {
                if self.new_stream(stream)? {
                    self.sink.send(stream, &Message::Ok);
                    self.agent.request_stop(StopRequest {
                        kind: StopKind::Guest(s.action),
                        grace: s.grace_ms.map(Duration::from_millis).unwrap_or(DEFAULT_GRACE),
                        reason: "requested by the host".into(),
                    });
                }
            }
            Message::Exec(req) => {
                if self.new_stream(stream)? {
                    self.start_exec(stream, req, false);
                }
            }
            Message::AttachMain => {
                if self.new_stream(stream)? {
                    match self.agent.take_main_for_attach() {
                        Ok(req) => self.start_exec(stream, req, true),
                        Err(message) => {
                            self.sink.error(stream, message);
                        }
                    }
                }
            }
            Message::WaitMain => {
                if self.new_stream(stream)? {
                    lock(&self.sessions).insert(stream, Session::WaitMain);
                    let conn = self.clone();
                    std::thread::spawn(move || {
                        let reply = match conn.agent.wait_main() {
                            Ok(s) => Message::Exited(s),
                            Err(message) => Message::Error { message },
                        };
                        conn.sink.send(stream, &reply);
                        conn.remove(stream);
                    });
                }
            }
            Message::Stdin(data) => {
                let Some(s) = self.session_exec(stream) else { return Ok(()) };
                lock(&s.stdin_window).received(data.len()).map_err(|e| {
                    format!(
                        "the host sent {} bytes of stdin on stream {stream} with {} bytes of credit",
                        e.outstanding, e.window
                    )
                })?;
                let tx = lock(&s.stdin).clone();
                if let Some(tx) = tx {
                    let _ = tx.send(StdinItem::Data(data));
                }
            }
            Message::StdinEof => {
                if let Some(s) = self.session_exec(stream) {
                    if let Some(tx) = lock(&s.stdin).take() {
                        let _ = tx.send(StdinItem::Eof);
                        if s.tty {
                            // A terminal stays open after ^D; keep the channel for more input.
                            *lock(&s.stdin) = Some(tx);
                        }
                    }
                }
            }
            Message::Resize(size) => {
                if let Some(pty) =
                    self.session_exec(stream).and_then(|s| s.pty.as_ref().map(|p| p.as_raw_fd()))
                {
                    if let Err(e) = sys::set_window_size(pty, size) {
                        tracing::warn!("resizing the terminal of stream {stream}: {e}");
                    }
                }
            }
            Message::Signal { signal } => {
                if let Some(s) = self.session_exec(stream) {
                    if !(1..=64).contains(&signal) {
                        tracing::warn!("ignoring invalid signal {signal} for stream {stream}");
                    } else if let Err(e) = sys::kill(s.pid as i32, signal) {
                        tracing::warn!("signal {signal} to pid {}: {e}", s.pid);
                    }
                }
            }
            Message::Credit { channel, bytes } => match (lock(&self.sessions).get(&stream), channel) {
                (Some(Session::Exec(s)), Channel::Stdout) => s.out[0].add(bytes as u64),
                (Some(Session::Exec(s)), Channel::Stderr) => s.out[1].add(bytes as u64),
                (Some(Session::CopyOut(w)), Channel::Copy) => w.add(bytes as u64),
                _ => {}
            },
            Message::CopyIn(req) => {
                if self.new_stream(stream)? {
                    let session = copy::start_copy_in(self.clone(), stream, req);
                    lock(&self.sessions).insert(stream, Session::CopyIn(session));
                }
            }
            Message::CopyData(data) => {
                let session = match lock(&self.sessions).get(&stream) {
                    Some(Session::CopyIn(c)) => c.clone(),
                    _ => return Ok(()),
                };
                session.push(stream, data)?;
            }
            Message::CopyEnd => {
                if let Some(Session::CopyIn(c)) = lock(&self.sessions).get(&stream) {
                    c.end();
                }
            }
            Message::CopyOut(req) => {
                if self.new_stream(stream)? {
                    let window = Arc::new(SendWindow::default());
                    lock(&self.sessions).insert(stream, Session::CopyOut(window.clone()));
                    copy::start_copy_out(self.clone(), stream, req, window);
                }
            }
            other => {
                return Err(format!("unexpected {} from the host (only the agent sends it)", other.name()));
            }
        }
        Ok(())
    }

    pub fn sink(&self) -> &Sink {
        &self.sink
    }

    /// Starts a process for `stream` and the threads that serve it.
    fn start_exec(self: &Arc<Self>, stream: u32, req: ExecRequest, main: bool) {
        let mode = match req.tty {
            Some(size) => StdioMode::Pty(size),
            None => StdioMode::Pipes { stdin: req.stdin },
        };
        let sp = match spawn::spawn(&self.agent.reaper, &req, mode, &self.agent.etc) {
            Ok(sp) => sp,
            Err(e) => {
                self.sink.error(stream, error_chain(&e));
                if main {
                    self.agent.main_failed(&e);
                }
                return;
            }
        };
        tracing::debug!(stream, pid = sp.pid, main, "started {:?}", req.argv);
        if let Err(e) = self.serve_process(stream, sp, req.stdin, main) {
            tracing::error!("cannot serve the process of stream {stream}: {e}");
        }
    }

    fn serve_process(
        self: &Arc<Self>,
        stream: u32,
        sp: Spawned,
        want_stdin: bool,
        main: bool,
    ) -> std::io::Result<()> {
        let Spawned { pid, exit, stdin, stdout, stderr, pty } = sp;
        let tty = pty.is_some();
        let (outputs, stdin_dst) = match &pty {
            Some(master) => (
                vec![(master.try_clone()?, Channel::Stdout)],
                if want_stdin { Some(master.try_clone()?) } else { None },
            ),
            None => {
                let outs = [(stdout, Channel::Stdout), (stderr, Channel::Stderr)]
                    .into_iter()
                    .filter_map(|(f, c)| f.map(|f| (f, c)))
                    .collect();
                (outs, stdin)
            }
        };
        let (stdin_tx, stdin_rx) = mpsc::channel();
        let session = Arc::new(ExecSession {
            pid,
            main,
            tty,
            stdin: Mutex::new(stdin_dst.as_ref().map(|_| stdin_tx)),
            stdin_window: Mutex::new(RecvWindow::default()),
            out: [SendWindow::default(), SendWindow::default()],
            pty,
        });
        lock(&self.sessions).insert(stream, Session::Exec(session.clone()));
        self.sink.send(stream, &Message::Started { pid });

        if let Some(dst) = stdin_dst {
            let (s, sink) = (session.clone(), self.sink.clone());
            std::thread::spawn(move || stdin_loop(dst, stdin_rx, &s, &sink, stream));
        }
        let exited = Arc::new(AtomicBool::new(false));
        let pumps: Vec<_> = outputs
            .into_iter()
            .map(|(src, channel)| {
                let (s, sink, exited) = (session.clone(), self.sink.clone(), exited.clone());
                std::thread::spawn(move || {
                    let window = &s.out[if channel == Channel::Stderr { 1 } else { 0 }];
                    pump(src, window, &sink, stream, channel, &exited, s.main)
                })
            })
            .collect();
        let conn = self.clone();
        std::thread::spawn(move || {
            let status = exit.recv().unwrap_or(ExitStatus::Code(255));
            exited.store(true, Ordering::SeqCst);
            for p in pumps {
                let _ = p.join();
            }
            conn.sink.send(stream, &Message::Exited(status));
            conn.remove(stream);
            if main {
                conn.agent.main_exited(status);
            }
        });
        Ok(())
    }
}

fn stdin_loop(mut dst: File, rx: Receiver<StdinItem>, s: &ExecSession, sink: &Sink, stream: u32) {
    for item in rx {
        match item {
            StdinItem::Data(d) => {
                if dst.write_all(&d).is_err() {
                    return;
                }
                if let Some(bytes) = lock(&s.stdin_window).consumed(d.len()) {
                    sink.send(stream, &Message::Credit { channel: Channel::Stdin, bytes });
                }
            }
            StdinItem::Eof if s.tty => {
                // VEOF (^D) in canonical mode; the terminal itself stays open.
                let _ = dst.write_all(&[4]);
            }
            StdinItem::Eof => return,
        }
    }
}

/// Copies a process's output to the host within the host's credit. Once the connection is gone
/// the output is drained (to the console for the main process, else dropped) so the process never
/// blocks on a full pipe.
fn pump(
    mut src: File,
    window: &SendWindow,
    sink: &Sink,
    stream: u32,
    channel: Channel,
    exited: &AtomicBool,
    to_console: bool,
) {
    let mut buf = vec![0u8; MAX_DATA_CHUNK];
    loop {
        match sys::poll_readable(src.as_raw_fd(), DRAIN_IDLE_MS) {
            Ok(true) => {}
            Ok(false) if exited.load(Ordering::SeqCst) => return,
            Ok(false) => continue,
            Err(e) => {
                tracing::debug!("poll on stream {stream} output: {e}");
                return;
            }
        }
        let credit = if sink.is_dead() { None } else { window.take(buf.len()) };
        let want = credit.unwrap_or(buf.len());
        let give_back = |n: usize| {
            if let Some(c) = credit {
                window.add((c - n) as u64);
            }
        };
        let n = match src.read(&mut buf[..want]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                give_back(0);
                continue;
            }
            // EIO: the pty's last slave fd closed.
            Err(_) => 0,
        };
        give_back(n);
        if n == 0 {
            // End of file: every writer closed the pipe (or the terminal).
            return;
        }
        match credit {
            Some(_) => {
                let msg = match channel {
                    Channel::Stderr => Message::Stderr(buf[..n].to_vec()),
                    _ => Message::Stdout(buf[..n].to_vec()),
                };
                sink.send(stream, &msg);
            }
            None if to_console => {
                let _ = std::io::stderr().write_all(&buf[..n]);
            }
            None => {}
        }
    }
}
