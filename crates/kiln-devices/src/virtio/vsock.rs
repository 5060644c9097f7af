//! virtio-vsock with Firecracker's host side: guest AF_VSOCK stream connections are carried over
//! host AF_UNIX stream sockets.
//!
//! - Host-initiated: the device listens on `uds_path`. A host process connects, writes
//!   `CONNECT <port>\n`, the device sends the guest a REQUEST from a host-side ephemeral port
//!   (allocated round robin in `[1 << 30, 1 << 31)`), and when the guest answers RESPONSE it writes
//!   `OK <host_port>\n` to the Unix socket; from then on bytes flow both ways. An RST (or no
//!   answer within [`REQUEST_TIMEOUT`]) closes the Unix socket. Bytes the host wrote after the
//!   command line are delivered to the guest as the first data.
//! - Guest-initiated: a REQUEST to CID 2 port `P` connects (non-blocking) to `<uds_path>_<P>`;
//!   success answers RESPONSE, failure (no socket, nobody listening, backlog full) answers RST.
//!
//! Flow control follows the virtio-vsock credit scheme. Towards the host, each connection
//! advertises `buf_alloc` = [`CONN_BUF_ALLOC`] and counts as forwarded (`fwd_cnt`) only bytes that
//! reached the Unix socket; bytes the socket could not take wait in a per-connection buffer that
//! is never larger than `buf_alloc`, so a guest that overruns its credit gets its connection
//! reset. Credit updates go out once [`CREDIT_UPDATE_THRESHOLD`] bytes were forwarded since the
//! guest last heard from us, or on CREDIT_REQUEST. Towards the guest, the device reads the Unix
//! socket into a per-connection staging buffer of at most [`CONN_RX_STAGE`] bytes, stops watching
//! the socket while it is full, and sends data only within the guest's advertised credit
//! (`buf_alloc - (sent - fwd_cnt)`), asking with CREDIT_REQUEST when it has none. Connections
//! (including ones still waiting for their `CONNECT` line) are capped at [`MAX_CONNECTIONS`] and
//! RSTs for unknown connections at [`MAX_PENDING_RSTS`], so memory is bounded per connection and
//! in total; every socket is non-blocking.
//!
//! Event-loop integration ([`VirtioDevice::host_fds`]): the listener, every connection that wants
//! to read, a nested epoll fd that reports connections whose buffered guest data can now be
//! written, and (while any deadline is pending) a timerfd. The VMM only watches readability; the
//! nested epoll turns writability into readability.
//!
//! Shutdown: a guest SHUTDOWN with SEND shuts down the Unix socket's write side once the buffered
//! data is out; with both RCV and SEND, the device answers RST and closes the socket (after the
//! buffer drained, or after [`SHUTDOWN_TIMEOUT`]). End of file on the Unix socket sends the
//! guest SHUTDOWN(RCV|SEND) after the staged data; the guest's RST (or the timeout) ends it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::queue_util::{drain_queue, Chain, QueueError};
use super::{device_type, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::interrupt::VirtioInterrupt;
use crate::metrics::VsockMetrics;
use crate::GuestMemory;

/// Queue size offered for each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Queue indices.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;

/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Length of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// Largest payload accepted from or sent to the guest in one packet.
pub const MAX_PKT_DATA: u32 = 64 << 10;
/// Receive buffer each connection advertises to the guest (`buf_alloc`); also the bound on the
/// guest data a connection buffers while its Unix socket is not writable.
pub const CONN_BUF_ALLOC: u32 = 64 << 10;
/// Bytes read from a Unix socket and not yet delivered to the guest, per connection, at most.
pub const CONN_RX_STAGE: usize = 64 << 10;
/// A CREDIT_UPDATE goes out once this many bytes were forwarded since the guest last heard our
/// `fwd_cnt`.
pub const CREDIT_UPDATE_THRESHOLD: u32 = 16 << 10;
/// Connections, including accepted Unix sockets that have not sent their `CONNECT` line yet.
pub const MAX_CONNECTIONS: usize = 256;
/// RSTs for packets that belong to no connection, waiting for guest receive buffers.
pub const MAX_PENDING_RSTS: usize = 256;
/// How long the guest has to answer a host-initiated REQUEST.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a shutting-down connection may wait for the final RST or for its buffer to drain.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an accepted host connection has to send its `CONNECT <port>\n` line.
pub const CONNECT_LINE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest accepted `CONNECT <port>\n` line.
const CONNECT_LINE_MAX: usize = 32;
/// First host-side port for host-initiated connections.
const LOCAL_PORT_BASE: u32 = 1 << 30;
/// How often deadlines are checked while any is pending.
const TIMER_PERIOD: Duration = Duration::from_millis(250);
/// Accepts per listener event at most (the listener stays readable if more are waiting).
const ACCEPTS_PER_EVENT: usize = 16;

// Tokens for `host_fds`.
const TOKEN_LISTENER: u32 = 0;
const TOKEN_WRITABLE: u32 = 1;
const TOKEN_TIMER: u32 = 2;
const FIRST_CONN_TOKEN: u32 = 16;

/// Packet type: stream.
pub const TYPE_STREAM: u16 = 1;
// Operations.
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
// SHUTDOWN flags.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// Firecracker's `Vsock` body, as the device needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID (3 or more).
    pub guest_cid: u32,
    /// Path of the Unix socket the device listens on; guest-initiated connections go to
    /// `<uds_path>_<port>`.
    pub uds_path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved; use 3 or more (and less than 2^32 - 1)")]
    InvalidCid(u32),
    #[error("the directory of the vsock socket {} does not exist", path.display())]
    MissingDir { path: PathBuf },
    #[error("{} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot remove the stale socket {}", path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the vsock event fds")]
    EventFd(#[source] io::Error),
}

/// `struct virtio_vsock_hdr` (all fields little endian on the wire).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl PacketHeader {
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        PacketHeader {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// `send(2)` with MSG_NOSIGNAL: a peer that went away gives EPIPE, not SIGPIPE.
fn send_nosignal(stream: &UnixStream, data: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the fd is owned by `stream` and open for the whole call; `data` is a valid
        // readable buffer of `data.len()` bytes that the kernel only reads.
        let n =
            unsafe { libc::send(stream.as_raw_fd(), data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        return Ok(n.unsigned_abs());
    }
}

/// Connects a non-blocking Unix stream socket to `path`. Unlike `UnixStream::connect` this never
/// waits: a full backlog is an error (EAGAIN), like a missing socket.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "socket path too long or not a C string"));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain syscall with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    loop {
        // SAFETY: `addr` is a valid sockaddr_un that lives across the call and `len` does not
        // exceed its size (the path is shorter than sun_path); `fd` is an open socket.
        let ret = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
                len as libc::socklen_t,
            )
        };
        if ret == 0 {
            return Ok(UnixStream::from(fd));
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Writes `data` into the chain's buffers starting `offset` bytes in. The descriptors were checked
/// to lie in guest memory. Returns false if the chain is too short or a write failed.
fn write_chain(mem: &GuestMemory, descs: &[Descriptor], mut offset: usize, mut data: &[u8]) -> bool {
    for d in descs {
        if data.is_empty() {
            break;
        }
        let len = d.len() as usize;
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = (len - offset).min(data.len());
        let Some(addr) = d.addr().0.checked_add(offset as u64) else { return false };
        if mem.write_slice(&data[..n], GuestAddress(addr)).is_err() {
            return false;
        }
        data = &data[n..];
        offset = 0;
    }
    data.is_empty()
}

/// Reads `buf.len()` bytes from the chain's buffers starting `offset` bytes in.
fn read_chain(mem: &GuestMemory, descs: &[Descriptor], mut offset: usize, buf: &mut [u8]) -> bool {
    let mut at = 0;
    for d in descs {
        if at == buf.len() {
            break;
        }
        let len = d.len() as usize;
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = (len - offset).min(buf.len() - at);
        let Some(addr) = d.addr().0.checked_add(offset as u64) else { return false };
        if mem.read_slice(&mut buf[at..at + n], GuestAddress(addr)).is_err() {
            return false;
        }
        at += n;
        offset = 0;
    }
    at == buf.len()
}

/// Collects a chain whose descriptors all go one way (`device_writes`) and lie in guest memory;
/// returns them with their total length.
fn checked_descs(mem: &GuestMemory, chain: Chain<'_>, device_writes: bool) -> Option<(Vec<Descriptor>, u64)> {
    let descs: Vec<Descriptor> = chain.collect();
    let mut total = 0u64;
    for d in &descs {
        if d.is_write_only() != device_writes {
            return None;
        }
        if !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
            return None;
        }
        total += u64::from(d.len());
    }
    Some((descs, total))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnState {
    /// Host-initiated, REQUEST not yet answered.
    LocalInit,
    /// Guest-initiated, RESPONSE not yet sent.
    PeerInit,
    Established,
    /// An RST is due; then the connection goes away.
    Killed,
}

/// One vsock stream connection and its Unix socket.
struct Conn {
    token: u32,
    local_port: u32,
    peer_port: u32,
    /// Host-initiated (its local port is ours to free).
    local_init: bool,
    stream: UnixStream,
    state: ConnState,
    // Guest -> host.
    tx_buf: VecDeque<u8>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    out_watched: bool,
    // Host -> guest.
    rx_buf: VecDeque<u8>,
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// We asked for credit and have not heard back since.
    credit_requested: bool,
    /// The Unix socket reached end of file.
    host_eof: bool,
    shutdown_sent: bool,
    peer_shut_rcv: bool,
    peer_shut_send: bool,
    host_write_shut: bool,
    // Control packets due.
    pend_request: bool,
    pend_response: bool,
    pend_rst: bool,
    pend_credit_update: bool,
    /// In the muxer's RX schedule.
    scheduled: bool,
    deadline: Option<Instant>,
}

impl Conn {
    fn new(token: u32, local_port: u32, peer_port: u32, stream: UnixStream, state: ConnState) -> Self {
        Conn {
            token,
            local_port,
            peer_port,
            local_init: state == ConnState::LocalInit,
            stream,
            state,
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            out_watched: false,
            rx_buf: VecDeque::new(),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            credit_requested: false,
            host_eof: false,
            shutdown_sent: false,
            peer_shut_rcv: false,
            peer_shut_send: false,
            host_write_shut: false,
            pend_request: state == ConnState::LocalInit,
            pend_response: state == ConnState::PeerInit,
            pend_rst: false,
            pend_credit_update: false,
            scheduled: false,
            deadline: None,
        }
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wants_read(&self) -> bool {
        self.state == ConnState::Established
            && !self.pend_rst
            && !self.host_eof
            && !self.peer_shut_rcv
            && self.rx_buf.len() < CONN_RX_STAGE
    }

    fn needs_credit_update(&self) -> bool {
        (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD
    }

    /// Whether `next_packet` would produce something (given a buffer with room for data).
    fn has_pending(&self) -> bool {
        if self.pend_rst || self.pend_response || self.pend_request {
            return true;
        }
        if self.state == ConnState::Established {
            if !self.rx_buf.is_empty() && (self.peer_credit() > 0 || !self.credit_requested) {
                return true;
            }
            if self.rx_buf.is_empty() && self.host_eof && !self.shutdown_sent {
                return true;
            }
        }
        self.pend_credit_update
    }

    fn header(&self, guest_cid: u64, op: u16) -> PacketHeader {
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The next packet for the guest; for RW, the caller copies `len` bytes from the front of
    /// `rx_buf` and removes them. `room` (at least 1) is the buffer's data capacity.
    fn next_packet(&mut self, guest_cid: u64, room: u32, now: Instant) -> Option<PacketHeader> {
        let mut hdr = if self.pend_rst {
            self.pend_rst = false;
            self.state = ConnState::Killed;
            self.header(guest_cid, OP_RST)
        } else if self.pend_response {
            self.pend_response = false;
            self.state = ConnState::Established;
            self.deadline = None;
            self.header(guest_cid, OP_RESPONSE)
        } else if self.pend_request {
            self.pend_request = false;
            self.deadline = Some(now + REQUEST_TIMEOUT);
            self.header(guest_cid, OP_REQUEST)
        } else if self.state == ConnState::Established && !self.rx_buf.is_empty() && self.peer_credit() > 0 {
            let n = (self.rx_buf.len().min(MAX_PKT_DATA as usize) as u32).min(self.peer_credit()).min(room);
            self.rx_cnt += Wrapping(n);
            let mut h = self.header(guest_cid, OP_RW);
            h.len = n;
            h
        } else if self.state == ConnState::Established && !self.rx_buf.is_empty() && !self.credit_requested {
            self.credit_requested = true;
            self.header(guest_cid, OP_CREDIT_REQUEST)
        } else if self.state == ConnState::Established
            && self.rx_buf.is_empty()
            && self.host_eof
            && !self.shutdown_sent
        {
            self.shutdown_sent = true;
            self.deadline = Some(now + SHUTDOWN_TIMEOUT);
            let mut h = self.header(guest_cid, OP_SHUTDOWN);
            h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
            h
        } else if self.pend_credit_update {
            self.header(guest_cid, OP_CREDIT_UPDATE)
        } else {
            return None;
        };
        // Every packet carries our credit.
        hdr.fwd_cnt = self.fwd_cnt.0;
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pend_credit_update = false;
        Some(hdr)
    }

    /// Schedules an RST to the guest and drops whatever is buffered; the host side sees EOF.
    fn kill(&mut self) {
        self.state = ConnState::Killed;
        self.pend_rst = true;
        self.pend_request = false;
        self.pend_response = false;
        self.tx_buf = VecDeque::new();
        self.rx_buf = VecDeque::new();
        // If the guest never takes the RST, the connection goes away when this passes.
        self.deadline = Some(Instant::now() + SHUTDOWN_TIMEOUT);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// After guest data reached the socket (or the guest shut down): credit update when due, RST
    /// when both directions are done, half-close the socket when the guest will send no more.
    fn after_tx_progress(&mut self) {
        if self.state == ConnState::Killed {
            return;
        }
        if self.needs_credit_update() && !self.peer_shut_send {
            self.pend_credit_update = true;
        }
        if !self.tx_buf.is_empty() {
            return;
        }
        if self.peer_shut_rcv && self.peer_shut_send {
            // Both directions are done: RST and close, like Firecracker.
            self.kill();
        } else if self.peer_shut_send && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
    }
}

/// An accepted host connection that has not sent its `CONNECT <port>\n` line yet.
struct Handshake {
    stream: UnixStream,
    buf: [u8; CONNECT_LINE_MAX],
    len: usize,
    deadline: Instant,
}

/// Parses `CONNECT <port>` (keyword case-insensitive, like Firecracker).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("connect") {
        return None;
    }
    words.next()?.parse().ok()
}

/// The host side: listener, connections, and what is due to the guest.
struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    conns: HashMap<u32, Conn>,
    /// (local port, peer port) -> token.
    by_ports: HashMap<(u32, u32), u32>,
    handshakes: HashMap<u32, Handshake>,
    local_ports: HashSet<u32>,
    next_local_port: u32,
    next_token: u32,
    /// Connections that may have something for the guest, round robin.
    rx_sched: VecDeque<u32>,
    /// RSTs for packets of unknown connections: (local port, peer port).
    rsts: VecDeque<(u32, u32)>,
    /// Connections with buffered guest data, registered for EPOLLOUT.
    writable: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    scratch: Vec<u8>,
    metrics: Arc<VsockMetrics>,
}

impl Muxer {
    fn alloc_token(&mut self) -> u32 {
        loop {
            let t = self.next_token;
            self.next_token = self.next_token.wrapping_add(1).max(FIRST_CONN_TOKEN);
            if t >= FIRST_CONN_TOKEN && !self.conns.contains_key(&t) && !self.handshakes.contains_key(&t) {
                return t;
            }
        }
    }

    /// A free host-side port for a connection to guest port `peer_port`.
    fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        // At most MAX_CONNECTIONS ports are in use, out of 2^30: this ends quickly.
        loop {
            let p = self.next_local_port;
            self.next_local_port = ((p.wrapping_add(1)) & !(1 << 31)) | LOCAL_PORT_BASE;
            // A guest-initiated connection may use the same pair (the guest picks host ports).
            if !self.local_ports.contains(&p) && !self.by_ports.contains_key(&(p, peer_port)) {
                self.local_ports.insert(p);
                return p;
            }
        }
    }

    fn at_capacity(&self) -> bool {
        self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS
    }

    fn schedule(&mut self, token: u32) {
        if let Some(c) = self.conns.get_mut(&token) {
            if !c.scheduled && c.has_pending() {
                c.scheduled = true;
                self.rx_sched.push_back(token);
            }
        }
    }

    fn enqueue_rst(&mut self, local_port: u32, peer_port: u32) {
        if self.rsts.len() >= MAX_PENDING_RSTS {
            tracing::debug!("vsock: RST queue full; dropping RST {local_port} -> {peer_port}");
            return;
        }
        self.rsts.push_back((local_port, peer_port));
    }

    fn watch_writable(&mut self, token: u32) {
        let Some(c) = self.conns.get_mut(&token) else { return };
        if c.out_watched || c.tx_buf.is_empty() {
            return;
        }
        let ev = EpollEvent::new(EventSet::OUT, u64::from(token));
        match self.writable.ctl(ControlOperation::Add, c.stream.as_raw_fd(), ev) {
            Ok(()) => c.out_watched = true,
            Err(e) => {
                tracing::warn!("vsock: cannot watch a connection for writability: {e}");
                c.kill();
            }
        }
    }

    fn unwatch_writable(writable: &Epoll, c: &mut Conn) {
        if c.out_watched {
            let _ = writable.ctl(ControlOperation::Delete, c.stream.as_raw_fd(), EpollEvent::default());
            c.out_watched = false;
        }
    }

    fn remove_conn(&mut self, token: u32) {
        if let Some(mut c) = self.conns.remove(&token) {
            self.metrics.conns_removed.inc();
            Self::unwatch_writable(&self.writable, &mut c);
            self.by_ports.remove(&(c.local_port, c.peer_port));
            if c.local_init {
                self.local_ports.remove(&c.local_port);
            }
            tracing::debug!("vsock: connection {} <-> {} closed", c.local_port, c.peer_port);
        }
    }

    fn kill(&mut self, token: u32) {
        if let Some(c) = self.conns.get_mut(&token) {
            c.kill();
            self.metrics.conns_killed.inc();
            Self::unwatch_writable(&self.writable, c);
        }
        self.schedule(token);
    }

    // ---- Guest -> host ----

    /// One packet from the TX queue (`payload` is its data, for RW).
    fn handle_guest_packet(&mut self, hdr: &PacketHeader, payload: &[u8], now: Instant) {
        if hdr.type_ != TYPE_STREAM {
            tracing::debug!("vsock: packet of unsupported type {}", hdr.type_);
            if hdr.op != OP_RST {
                self.enqueue_rst(hdr.dst_port, hdr.src_port);
            }
            return;
        }
        if hdr.dst_cid != HOST_CID || hdr.src_cid != self.guest_cid {
            tracing::debug!("vsock: dropping packet {} -> {}", hdr.src_cid, hdr.dst_cid);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        let Some(&token) = self.by_ports.get(&key) else {
            match hdr.op {
                OP_REQUEST => self.connect_to_host(hdr),
                OP_RST => {}
                _ => self.enqueue_rst(hdr.dst_port, hdr.src_port),
            }
            return;
        };
        if hdr.op == OP_RST {
            self.remove_conn(token);
            return;
        }
        let Some(c) = self.conns.get_mut(&token) else { return };
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if c.peer_credit() > 0 {
            c.credit_requested = false;
        }
        match (hdr.op, c.state) {
            (OP_RESPONSE, ConnState::LocalInit) => {
                c.state = ConnState::Established;
                c.deadline = None;
                let msg = format!("OK {}\n", c.local_port);
                match send_nosignal(&c.stream, msg.as_bytes()) {
                    Ok(n) if n == msg.len() => {}
                    Ok(_) => {
                        tracing::warn!("vsock: could not write the whole OK line; resetting");
                        c.kill();
                    }
                    Err(e) => {
                        tracing::debug!("vsock: host side of port {} went away: {e}", c.local_port);
                        c.kill();
                    }
                }
            }
            (OP_RW, ConnState::Established) if !c.peer_shut_send => {
                if !payload.is_empty() {
                    Self::write_to_host(c, payload);
                    c.after_tx_progress();
                }
            }
            (OP_SHUTDOWN, ConnState::Established) => {
                c.peer_shut_rcv |= hdr.flags & SHUTDOWN_RCV != 0;
                c.peer_shut_send |= hdr.flags & SHUTDOWN_SEND != 0;
                if c.peer_shut_rcv {
                    c.rx_buf = VecDeque::new();
                }
                if c.peer_shut_rcv && c.peer_shut_send && !c.tx_buf.is_empty() && c.deadline.is_none() {
                    c.deadline = Some(now + SHUTDOWN_TIMEOUT);
                }
                c.after_tx_progress();
            }
            (OP_CREDIT_UPDATE, _) => {}
            (OP_CREDIT_REQUEST, ConnState::Established | ConnState::PeerInit) => c.pend_credit_update = true,
            (op, state) => {
                tracing::debug!("vsock: dropping op {op} for a connection in state {state:?}");
            }
        }
        if c.state == ConnState::Killed {
            Self::unwatch_writable(&self.writable, c);
        }
        self.watch_writable(token);
        self.schedule(token);
    }

    /// Forwards guest data to the Unix socket, buffering what it cannot take now.
    fn write_to_host(c: &mut Conn, payload: &[u8]) {
        let mut written = 0;
        if c.tx_buf.is_empty() {
            match send_nosignal(&c.stream, payload) {
                Ok(n) => written = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    tracing::debug!("vsock: write to the host side of port {} failed: {e}", c.local_port);
                    c.kill();
                    return;
                }
            }
        }
        let rest = &payload[written.min(payload.len())..];
        if c.tx_buf.len() + rest.len() > CONN_BUF_ALLOC as usize {
            tracing::debug!("vsock: the guest overran its credit on port {}; resetting", c.local_port);
            c.kill();
            return;
        }
        c.tx_buf.extend(rest);
        c.fwd_cnt += Wrapping(written as u32);
    }

    /// A guest REQUEST for `<uds_path>_<port>`.
    fn connect_to_host(&mut self, hdr: &PacketHeader) {
        if self.at_capacity() {
            tracing::warn!("vsock: connection limit reached; refusing guest port {}", hdr.src_port);
            self.enqueue_rst(hdr.dst_port, hdr.src_port);
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", hdr.dst_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("vsock: cannot connect to {}: {e}", Path::new(&path).display());
                self.enqueue_rst(hdr.dst_port, hdr.src_port);
                return;
            }
        };
        let token = self.alloc_token();
        let mut c = Conn::new(token, hdr.dst_port, hdr.src_port, stream, ConnState::PeerInit);
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        // Until the RESPONSE is out (the guest may never give a receive buffer).
        c.deadline = Some(Instant::now() + REQUEST_TIMEOUT);
        self.by_ports.insert((hdr.dst_port, hdr.src_port), token);
        self.conns.insert(token, c);
        self.metrics.conns_added.inc();
        self.schedule(token);
        tracing::debug!("vsock: guest port {} connected to {}", hdr.src_port, Path::new(&path).display());
    }

    // ---- Host events ----

    fn accept(&mut self, now: Instant) {
        for _ in 0..ACCEPTS_PER_EVENT {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock: accept on {} failed: {e}", self.uds_path.display());
                    return;
                }
            };
            if self.at_capacity() {
                tracing::warn!("vsock: connection limit reached; refusing a host connection");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                tracing::warn!("vsock: cannot make a host connection non-blocking: {e}");
                continue;
            }
            let token = self.alloc_token();
            let hs = Handshake {
                stream,
                buf: [0; CONNECT_LINE_MAX],
                len: 0,
                deadline: now + CONNECT_LINE_TIMEOUT,
            };
            self.handshakes.insert(token, hs);
        }
    }

    fn handshake_readable(&mut self, token: u32, now: Instant) {
        let Some(hs) = self.handshakes.get_mut(&token) else { return };
        let len = hs.len;
        let n = match (&hs.stream).read(&mut hs.buf[len..]) {
            Ok(0) => {
                self.handshakes.remove(&token);
                return;
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => return,
            Err(e) => {
                tracing::debug!("vsock: read of a CONNECT line failed: {e}");
                self.handshakes.remove(&token);
                return;
            }
        };
        hs.len += n;
        let Some(nl) = hs.buf[..hs.len].iter().position(|&b| b == b'\n') else {
            if hs.len == CONNECT_LINE_MAX {
                tracing::debug!("vsock: CONNECT line too long");
                self.handshakes.remove(&token);
            }
            return;
        };
        let Some(hs) = self.handshakes.remove(&token) else { return };
        let Some(peer_port) = parse_connect(&hs.buf[..nl]) else {
            tracing::debug!("vsock: invalid CONNECT line {:?}", String::from_utf8_lossy(&hs.buf[..nl]));
            return;
        };
        let local_port = self.alloc_local_port(peer_port);
        let token = self.alloc_token();
        let mut c = Conn::new(token, local_port, peer_port, hs.stream, ConnState::LocalInit);
        c.deadline = Some(now + REQUEST_TIMEOUT);
        // Bytes after the line are the first data for the guest.
        c.rx_buf.extend(&hs.buf[nl + 1..hs.len]);
        self.by_ports.insert((local_port, peer_port), token);
        self.conns.insert(token, c);
        self.metrics.conns_added.inc();
        self.schedule(token);
        tracing::debug!("vsock: host connection to guest port {peer_port} from port {local_port}");
    }

    fn conn_readable(&mut self, token: u32) {
        let Some(c) = self.conns.get_mut(&token) else { return };
        if !c.wants_read() {
            return;
        }
        let room = CONN_RX_STAGE - c.rx_buf.len();
        let buf = &mut self.scratch[..room];
        match (&c.stream).read(buf) {
            Ok(0) => c.host_eof = true,
            Ok(n) => c.rx_buf.extend(&buf[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            Err(e) => {
                tracing::debug!("vsock: read from the host side of port {} failed: {e}", c.local_port);
                self.metrics.rx_read_fails.inc();
                c.kill();
                Self::unwatch_writable(&self.writable, c);
            }
        }
        self.schedule(token);
    }

    fn flush_writable(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        let n = match self.writable.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("vsock: epoll_wait failed: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let Ok(token) = u32::try_from(ev.data()) else { continue };
            let Some(c) = self.conns.get_mut(&token) else { continue };
            while !c.tx_buf.is_empty() {
                let (front, _) = c.tx_buf.as_slices();
                match send_nosignal(&c.stream, front) {
                    Ok(n) => {
                        c.tx_buf.drain(..n.min(front.len()));
                        c.fwd_cnt += Wrapping(n as u32);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::debug!("vsock: write to the host side of port {} failed: {e}", c.local_port);
                        c.kill();
                        break;
                    }
                }
            }
            if c.tx_buf.is_empty() {
                Self::unwatch_writable(&self.writable, c);
                c.after_tx_progress();
            }
            self.schedule(token);
        }
    }

    /// Ends connections and handshakes whose deadline passed.
    fn expire(&mut self, now: Instant) {
        self.handshakes.retain(|_, hs| hs.deadline > now);
        let expired: Vec<u32> =
            self.conns.values().filter(|c| c.deadline.is_some_and(|d| d <= now)).map(|c| c.token).collect();
        for token in expired {
            if self.conns.get(&token).is_some_and(|c| c.state == ConnState::Killed) {
                // The guest did not take the RST in time.
                self.remove_conn(token);
            } else {
                tracing::debug!("vsock: connection timed out");
                self.kill(token);
            }
        }
    }

    fn has_deadlines(&self) -> bool {
        !self.handshakes.is_empty() || self.conns.values().any(|c| c.deadline.is_some())
    }

    fn update_timer(&mut self) {
        let want = self.has_deadlines();
        if want == self.timer_armed {
            return;
        }
        let res = if want { self.timer.reset(TIMER_PERIOD, Some(TIMER_PERIOD)) } else { self.timer.clear() };
        match res {
            Ok(()) => self.timer_armed = want,
            Err(e) => tracing::warn!("vsock: cannot set the timer: {e}"),
        }
    }

    // ---- Host -> guest ----

    /// Whether a packet is waiting for a guest receive buffer (drops stale schedule entries).
    fn has_rx(&mut self) -> bool {
        if !self.rsts.is_empty() {
            return true;
        }
        while let Some(&token) = self.rx_sched.front() {
            match self.conns.get_mut(&token) {
                Some(c) if c.has_pending() => return true,
                Some(c) => c.scheduled = false,
                None => {}
            }
            self.rx_sched.pop_front();
        }
        false
    }

    /// Fills one receive chain. `None`: nothing to send (the chain was not used).
    fn fill_rx_chain(&mut self, mem: &GuestMemory, chain: Chain<'_>, now: Instant) -> Option<u32> {
        let Some((descs, total)) = checked_descs(mem, chain, true) else {
            tracing::debug!("vsock: receive buffer not writable or outside guest memory");
            return Some(0);
        };
        if total <= HDR_LEN as u64 {
            tracing::debug!("vsock: receive buffer of {total} bytes is too small");
            return Some(0);
        }
        let room = u32::try_from(total - HDR_LEN as u64).unwrap_or(u32::MAX).min(MAX_PKT_DATA);
        if let Some((local_port, peer_port)) = self.rsts.pop_front() {
            let hdr = PacketHeader {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: local_port,
                dst_port: peer_port,
                type_: TYPE_STREAM,
                op: OP_RST,
                ..Default::default()
            };
            return Some(if write_chain(mem, &descs, 0, &hdr.to_bytes()) { HDR_LEN as u32 } else { 0 });
        }
        while let Some(token) = self.rx_sched.pop_front() {
            let Some(c) = self.conns.get_mut(&token) else { continue };
            c.scheduled = false;
            let Some(hdr) = c.next_packet(self.guest_cid, room, now) else { continue };
            let mut ok = write_chain(mem, &descs, 0, &hdr.to_bytes());
            if hdr.op == OP_RW {
                let n = hdr.len as usize;
                let (a, b) = c.rx_buf.as_slices();
                let na = n.min(a.len());
                ok = ok && write_chain(mem, &descs, HDR_LEN, &a[..na]);
                ok = ok && write_chain(mem, &descs, HDR_LEN + na, &b[..n - na]);
                c.rx_buf.drain(..n);
            }
            if hdr.op == OP_RST {
                self.remove_conn(token);
            } else {
                self.schedule(token);
            }
            return Some(if ok { HDR_LEN as u32 + hdr.len } else { 0 });
        }
        None
    }
}

struct Active {
    mem: GuestMemory,
    interrupt: VirtioInterrupt,
    queues: Vec<Queue>,
}

/// The vsock device.
pub struct Vsock {
    cfg: VsockConfig,
    mux: Muxer,
    active: Option<Active>,
    broken: bool,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.cfg.guest_cid)
            .field("uds_path", &self.cfg.uds_path)
            .field("connections", &self.mux.conns.len())
            .field("activated", &self.active.is_some())
            .finish()
    }
}

impl Vsock {
    /// Checks the CID and starts listening on `cfg.uds_path` (replacing a stale socket there).
    pub fn new(cfg: VsockConfig) -> Result<Vsock, VsockError> {
        if cfg.guest_cid < 3 || cfg.guest_cid == u32::MAX {
            return Err(VsockError::InvalidCid(cfg.guest_cid));
        }
        let path = cfg.uds_path.clone();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                return Err(VsockError::MissingDir { path });
            }
        }
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if !meta.file_type().is_socket() {
                return Err(VsockError::NotASocket { path });
            }
            std::fs::remove_file(&path)
                .map_err(|source| VsockError::RemoveStale { path: path.clone(), source })?;
        }
        let listener = UnixListener::bind(&path)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| VsockError::Bind { path: path.clone(), source })?;
        let writable = Epoll::new().map_err(VsockError::EventFd)?;
        let timer =
            TimerFd::new().map_err(|e| VsockError::EventFd(io::Error::from_raw_os_error(e.errno())))?;
        tracing::info!("vsock: guest CID {}, listening on {}", cfg.guest_cid, path.display());
        Ok(Vsock {
            mux: Muxer {
                guest_cid: u64::from(cfg.guest_cid),
                uds_path: path,
                listener,
                conns: HashMap::new(),
                by_ports: HashMap::new(),
                handshakes: HashMap::new(),
                local_ports: HashSet::new(),
                next_local_port: LOCAL_PORT_BASE,
                next_token: FIRST_CONN_TOKEN,
                rx_sched: VecDeque::new(),
                rsts: VecDeque::new(),
                writable,
                timer,
                timer_armed: false,
                scratch: vec![0; CONN_RX_STAGE.max(MAX_PKT_DATA as usize)],
                metrics: Arc::new(VsockMetrics::default()),
            },
            cfg,
            active: None,
            broken: false,
        })
    }

    pub fn guest_cid(&self) -> u32 {
        self.cfg.guest_cid
    }

    pub fn uds_path(&self) -> &Path {
        &self.cfg.uds_path
    }

    /// The device's counters, for the VMM's metrics.
    pub fn metrics_handle(&self) -> Arc<VsockMetrics> {
        Arc::clone(&self.mux.metrics)
    }

    /// Open connections (established or being set up, not counting `CONNECT` handshakes).
    pub fn connection_count(&self) -> usize {
        self.mux.conns.len()
    }

    /// Consumes the TX queue.
    fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else { return };
        let mux = &mut self.mux;
        let now = Instant::now();
        let Some(queue) = active.queues.get_mut(TX_QUEUE) else { return };
        let mut payload = std::mem::take(&mut mux.scratch);
        let result = drain_queue(queue, &active.mem, &active.interrupt, |mem, chain| {
            let Some((descs, total)) = checked_descs(mem, chain, false) else {
                tracing::debug!("vsock: TX chain not readable or outside guest memory");
                return 0;
            };
            let mut hb = [0u8; HDR_LEN];
            if total < HDR_LEN as u64 || !read_chain(mem, &descs, 0, &mut hb) {
                tracing::debug!("vsock: TX chain shorter than a header");
                return 0;
            }
            let hdr = PacketHeader::from_bytes(&hb);
            if hdr.len > MAX_PKT_DATA {
                tracing::debug!("vsock: TX packet length {} too large", hdr.len);
                return 0;
            }
            let len = if hdr.op == OP_RW { hdr.len as usize } else { 0 };
            if total < (HDR_LEN + len) as u64 || !read_chain(mem, &descs, HDR_LEN, &mut payload[..len]) {
                tracing::debug!("vsock: TX chain shorter than its packet");
                return 0;
            }
            mux.metrics.tx_packets_count.inc();
            mux.metrics.tx_bytes_count.add(len as u64);
            mux.handle_guest_packet(&hdr, &payload[..len], now);
            0
        });
        mux.scratch = payload;
        if let Err(e) = result {
            tracing::error!("vsock: TX queue broken: {e}");
            mux.metrics.tx_queue_event_fails.inc();
            self.broken = true;
        }
    }

    /// Moves pending packets into the RX queue's buffers.
    fn process_rx(&mut self) {
        if self.broken {
            return;
        }
        let Some(active) = self.active.as_mut() else { return };
        let mux = &mut self.mux;
        let mem = &active.mem;
        let Some(queue) = active.queues.get_mut(RX_QUEUE) else { return };
        let now = Instant::now();
        let mut used = 0usize;
        let result = (|| -> Result<(), QueueError> {
            while mux.has_rx() {
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    // Out of buffers: ask to be notified, and look again if some just arrived.
                    if !queue.enable_notification(mem).map_err(QueueError::Queue)? {
                        break;
                    }
                    let avail = queue.avail_idx(mem, Ordering::Acquire).map_err(QueueError::Queue)?;
                    let ahead = (avail - Wrapping(queue.next_avail())).0;
                    if ahead > queue.size() {
                        return Err(QueueError::AvailOverrun { ahead, size: queue.size() });
                    }
                    if ahead == 0 {
                        break;
                    }
                    continue;
                };
                let head = chain.head_index();
                let Some(len) = mux.fill_rx_chain(mem, chain, now) else {
                    queue.go_to_previous_position();
                    break;
                };
                queue.add_used(mem, head, len).map_err(QueueError::Queue)?;
                mux.metrics.rx_packets_count.inc();
                mux.metrics.rx_bytes_count.add(u64::from(len).saturating_sub(HDR_LEN as u64));
                used += 1;
            }
            Ok(())
        })();
        let result = result.and_then(|()| {
            if used > 0 && queue.needs_notification(mem).map_err(QueueError::Queue)? {
                if let Err(e) = active.interrupt.signal_used_queue() {
                    tracing::warn!("vsock: failed to raise the used-buffer interrupt: {e}");
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            tracing::error!("vsock: RX queue broken: {e}");
            mux.metrics.rx_queue_event_fails.inc();
            self.broken = true;
        }
    }

    fn config_space(&self) -> [u8; 8] {
        u64::from(self.cfg.guest_cid).to_le_bytes()
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_space(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: VirtioInterrupt,
        _acked_features: u64,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 3 {
            self.mux.metrics.activate_fails.inc();
            return Err(ActivateError::QueueCount { expected: 3, got: queues.len() });
        }
        self.broken = false;
        self.active = Some(Active { mem, interrupt, queues });
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        if self.broken || self.active.is_none() {
            return;
        }
        match index {
            TX_QUEUE => {
                self.mux.metrics.tx_queue_event_count.inc();
                self.process_tx();
                self.process_rx();
            }
            RX_QUEUE => {
                self.mux.metrics.rx_queue_event_count.inc();
                self.process_rx();
            }
            // The event queue only carries TRANSPORT_RESET, which this device never sends.
            _ => {}
        }
        self.mux.update_timer();
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.broken = false;
        let m = &mut self.mux;
        for (_, mut c) in m.conns.drain() {
            Muxer::unwatch_writable(&m.writable, &mut c);
        }
        m.by_ports.clear();
        m.handshakes.clear();
        m.local_ports.clear();
        m.rx_sched.clear();
        m.rsts.clear();
        m.update_timer();
        true
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn needs_reset(&self) -> bool {
        self.broken
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }

    fn host_fds(&self) -> Vec<(RawFd, u32)> {
        let m = &self.mux;
        let mut fds =
            vec![(m.listener.as_raw_fd(), TOKEN_LISTENER), (m.writable.as_raw_fd(), TOKEN_WRITABLE)];
        if m.timer_armed {
            fds.push((m.timer.as_raw_fd(), TOKEN_TIMER));
        }
        fds.extend(m.handshakes.iter().map(|(t, hs)| (hs.stream.as_raw_fd(), *t)));
        fds.extend(m.conns.values().filter(|c| c.wants_read()).map(|c| (c.stream.as_raw_fd(), c.token)));
        fds
    }

    fn process_host_event(&mut self, token: u32) {
        if self.active.is_none() || self.broken {
            return;
        }
        let now = Instant::now();
        match token {
            TOKEN_LISTENER => self.mux.accept(now),
            TOKEN_WRITABLE => self.mux.flush_writable(),
            TOKEN_TIMER => {
                // Re-arming below (or the periodic interval) resets the expiration count; no
                // read needed.
                self.mux.expire(now);
                if self.mux.timer_armed {
                    let _ = self.mux.timer.reset(TIMER_PERIOD, Some(TIMER_PERIOD));
                }
            }
            t if self.mux.handshakes.contains_key(&t) => self.mux.handshake_readable(t, now),
            t => self.mux.conn_readable(t),
        }
        self.process_rx();
        self.mux.update_timer();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::CountingIrq;
    use std::io::Write;
    use std::sync::Arc;

    const CID: u32 = 3;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const MEM_SIZE: usize = 16 << 20;
    const RX_BUF_BASE: u64 = 0x10_0000;
    const RX_SLOT: u64 = 0x2000;
    const TX_BUF_BASE: u64 = 0x40_0000;
    const TX_SLOT: u64 = 0x2_0000;
    const TX_SLOTS: u64 = 8;

    /// The driver side of one split queue at `base` (descriptors, then avail and used rings).
    struct Dq {
        base: u64,
        size: u16,
        next_desc: u16,
        avail_idx: u16,
        used_seen: u16,
    }

    impl Dq {
        fn new(base: u64, size: u16) -> Self {
            Dq { base, size, next_desc: 0, avail_idx: 0, used_seen: 0 }
        }
        fn avail(&self) -> u64 {
            self.base + 0x1000 * (u64::from(self.size) / 256 + 1)
        }
        fn used(&self) -> u64 {
            self.avail() + 0x1000
        }
        fn queue(&self, event_idx: bool) -> Queue {
            let mut q = Queue::new(self.size).unwrap();
            q.set_event_idx(event_idx);
            q.set_size(self.size);
            q.try_set_desc_table_address(GuestAddress(self.base)).unwrap();
            q.try_set_avail_ring_address(GuestAddress(self.avail())).unwrap();
            q.try_set_used_ring_address(GuestAddress(self.used())).unwrap();
            q.set_ready(true);
            q
        }
        fn add_chain(&mut self, mem: &GuestMemory, descs: &[(u64, u32, u16)]) -> u16 {
            let head = self.next_desc;
            for (i, &(addr, len, flags)) in descs.iter().enumerate() {
                let idx = (head + i as u16) % self.size;
                let last = i + 1 == descs.len();
                let next = (idx + 1) % self.size;
                let flags = if last { flags } else { flags | F_NEXT };
                let d = GuestAddress(self.base + 16 * u64::from(idx));
                mem.write_obj(addr.to_le(), d).unwrap();
                mem.write_obj(len.to_le(), GuestAddress(d.0 + 8)).unwrap();
                mem.write_obj(flags.to_le(), GuestAddress(d.0 + 12)).unwrap();
                mem.write_obj(if last { 0u16 } else { next }.to_le(), GuestAddress(d.0 + 14)).unwrap();
            }
            self.next_desc = (head + descs.len() as u16) % self.size;
            let slot = u64::from(self.avail_idx % self.size);
            mem.write_obj(head.to_le(), GuestAddress(self.avail() + 4 + 2 * slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail() + 2)).unwrap();
            head
        }
        /// New used elements (id, len).
        fn take_used(&mut self, mem: &GuestMemory) -> Vec<(u32, u32)> {
            let idx = u16::from_le(mem.read_obj(GuestAddress(self.used() + 2)).unwrap());
            let mut out = Vec::new();
            while self.used_seen != idx {
                let base = self.used() + 4 + 8 * u64::from(self.used_seen % self.size);
                let id: u32 = mem.read_obj(GuestAddress(base)).unwrap();
                let len: u32 = mem.read_obj(GuestAddress(base + 4)).unwrap();
                out.push((u32::from_le(id), u32::from_le(len)));
                self.used_seen = self.used_seen.wrapping_add(1);
            }
            out
        }
    }

    struct H {
        dev: Vsock,
        mem: GuestMemory,
        rx: Dq,
        tx: Dq,
        irq: Arc<CountingIrq>,
        _dir: tempfile::TempDir,
        path: PathBuf,
        rx_bufs: HashMap<u32, Vec<(u64, u32)>>,
        rx_slot: u64,
        tx_slot: u64,
    }

    fn ghdr(src_port: u32, dst_port: u32, op: u16) -> PacketHeader {
        PacketHeader {
            src_cid: u64::from(CID),
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 256 << 10,
            ..Default::default()
        }
    }

    impl H {
        fn new() -> H {
            H::with_event_idx(false)
        }

        fn with_event_idx(event_idx: bool) -> H {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("v.sock");
            let mut dev = Vsock::new(VsockConfig { guest_cid: CID, uds_path: path.clone() }).unwrap();
            let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
            let (rx, tx, ev) = (Dq::new(0x1_0000, 256), Dq::new(0x2_0000, 256), Dq::new(0x3_0000, 256));
            let irq = Arc::new(CountingIrq::default());
            dev.activate(
                mem.clone(),
                VirtioInterrupt::new(irq.clone()),
                VIRTIO_F_VERSION_1,
                vec![rx.queue(event_idx), tx.queue(event_idx), ev.queue(event_idx)],
            )
            .unwrap();
            H { dev, mem, rx, tx, irq, _dir: dir, path, rx_bufs: HashMap::new(), rx_slot: 0, tx_slot: 0 }
        }

        /// Queues a TX chain (header and data in one descriptor, or split) without notifying.
        fn queue_tx(&mut self, hdr: &PacketHeader, data: &[u8], split: bool) {
            let addr = TX_BUF_BASE + (self.tx_slot % TX_SLOTS) * TX_SLOT;
            self.tx_slot += 1;
            let mut bytes = hdr.to_bytes().to_vec();
            bytes.extend_from_slice(data);
            self.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
            if split && !data.is_empty() {
                self.tx.add_chain(
                    &self.mem,
                    &[(addr, HDR_LEN as u32, 0), (addr + HDR_LEN as u64, data.len() as u32, 0)],
                );
            } else {
                self.tx.add_chain(&self.mem, &[(addr, bytes.len() as u32, 0)]);
            }
        }

        fn send_data(&mut self, hdr: PacketHeader, data: &[u8]) {
            let mut hdr = hdr;
            hdr.len = data.len() as u32;
            self.queue_tx(&hdr, data, false);
            self.dev.process_queue(TX_QUEUE);
            assert!(!self.dev.needs_reset());
        }

        fn send(&mut self, hdr: PacketHeader) {
            self.send_data(hdr, &[]);
        }

        fn add_rx(&mut self, n: usize, split: bool) {
            for _ in 0..n {
                let addr = RX_BUF_BASE + (self.rx_slot % 256) * RX_SLOT;
                self.rx_slot += 1;
                let descs: Vec<(u64, u32, u16)> = if split {
                    vec![(addr, HDR_LEN as u32, F_WRITE), (addr + 0x100, 4096, F_WRITE)]
                } else {
                    vec![(addr, HDR_LEN as u32 + 4096, F_WRITE)]
                };
                let head = self.rx.add_chain(&self.mem, &descs);
                self.rx_bufs.insert(u32::from(head), descs.iter().map(|d| (d.0, d.1)).collect());
            }
        }

        /// Gives the device `n` receive buffers and notifies.
        fn give_rx(&mut self, n: usize) {
            self.add_rx(n, false);
            self.dev.process_queue(RX_QUEUE);
        }

        /// Packets the device put in receive buffers since last asked.
        fn recv(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
            let mut out = Vec::new();
            for (id, len) in self.rx.take_used(&self.mem) {
                let bufs = self.rx_bufs.remove(&id).unwrap();
                let mut bytes = Vec::new();
                for (addr, blen) in bufs {
                    let mut b = vec![0u8; blen as usize];
                    self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                    bytes.extend(b);
                }
                assert!(len as usize >= HDR_LEN, "used length {len}");
                let hdr = PacketHeader::from_bytes(bytes[..HDR_LEN].try_into().unwrap());
                assert_eq!(len as usize, HDR_LEN + hdr.len as usize);
                out.push((hdr, bytes[HDR_LEN..len as usize].to_vec()));
            }
            out
        }

        fn recv_one(&mut self) -> (PacketHeader, Vec<u8>) {
            let mut p = self.recv();
            assert_eq!(p.len(), 1, "{p:?}");
            p.remove(0)
        }

        /// Plays the VMM's event loop until no listed fd is readable.
        fn poll(&mut self) {
            for _ in 0..1000 {
                let fds = self.dev.host_fds();
                let mut pfds: Vec<libc::pollfd> = fds
                    .iter()
                    .map(|&(fd, _)| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
                    .collect();
                // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs.
                let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 0) };
                assert!(n >= 0);
                if n == 0 {
                    return;
                }
                for (p, &(_, token)) in pfds.iter().zip(&fds) {
                    if p.revents != 0 {
                        self.dev.process_host_event(token);
                    }
                }
            }
            panic!("host fds stay readable: the device busy-loops");
        }

        fn listed(&self, token: u32) -> bool {
            self.dev.host_fds().iter().any(|&(_, t)| t == token)
        }

        /// Host-initiated connection to guest `port`, accepted by the guest. Returns the host
        /// socket and the host-side port.
        fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
            let mut host = UnixStream::connect(&self.path).unwrap();
            host.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
            self.poll();
            self.give_rx(1);
            let (req, _) = self.recv_one();
            assert_eq!(req.op, OP_REQUEST);
            self.send(ghdr(port, req.src_port, OP_RESPONSE));
            let line = read_line(&mut host);
            assert_eq!(line, format!("OK {}\n", req.src_port));
            (host, req.src_port)
        }

        /// Guest-initiated connection from `gport` to host `port` (a listener must exist).
        fn guest_connect(
            &mut self,
            listener: &UnixListener,
            gport: u32,
            port: u32,
            buf_alloc: u32,
        ) -> UnixStream {
            self.give_rx(1);
            let mut h = ghdr(gport, port, OP_REQUEST);
            h.buf_alloc = buf_alloc;
            self.send(h);
            let (resp, _) = self.recv_one();
            assert_eq!(resp.op, OP_RESPONSE);
            assert_eq!((resp.src_port, resp.dst_port), (port, gport));
            let (s, _) = listener.accept().unwrap();
            s
        }
    }

    fn read_line(s: &mut UnixStream) -> String {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = Vec::new();
        let mut b = [0u8; 1];
        while !out.ends_with(b"\n") {
            assert_eq!(s.read(&mut b).unwrap(), 1, "EOF before the end of the line");
            out.push(b[0]);
        }
        String::from_utf8(out).unwrap()
    }

    /// Reads what is there right now (non-blocking).
    fn read_now(s: &mut UnixStream) -> (Vec<u8>, bool) {
        s.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf) {
                // A socket closed with unread data resets its peer: also the end.
                Ok(0) => return (out, true),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return (out, true),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (out, false),
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn pattern(start: usize, len: usize) -> Vec<u8> {
        (start..start + len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn header_round_trip() {
        let h = PacketHeader {
            src_cid: 2,
            dst_cid: 0x1122_3344_5566_7788,
            src_port: 1,
            dst_port: 0xdead_beef,
            len: 7,
            type_: 1,
            op: 5,
            flags: 3,
            buf_alloc: 65536,
            fwd_cnt: 99,
        };
        let b = h.to_bytes();
        assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&b[28..32], &[1, 0, 5, 0]);
        assert_eq!(PacketHeader::from_bytes(&b), h);
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"connect   7 "), Some(7));
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"LISTEN 5"), None);
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
    }

    #[test]
    fn config_and_construction() {
        let h = H::new();
        assert_eq!(h.dev.device_type(), 19);
        assert_eq!(h.dev.queue_max_sizes(), &[256, 256, 256]);
        let mut cfg = [0xffu8; 8];
        h.dev.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), 3);
        let mut hi = [0xffu8; 4];
        h.dev.read_config(4, &mut hi);
        assert_eq!(hi, [0, 0, 0, 0]);

        let dir = tempfile::tempdir().unwrap();
        let cfg = |cid, p: PathBuf| VsockConfig { guest_cid: cid, uds_path: p };
        assert!(matches!(Vsock::new(cfg(2, dir.path().join("a"))), Err(VsockError::InvalidCid(2))));
        assert!(matches!(
            Vsock::new(cfg(3, dir.path().join("missing/v.sock"))),
            Err(VsockError::MissingDir { .. })
        ));
        let file = dir.path().join("file");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(matches!(Vsock::new(cfg(3, file.clone())), Err(VsockError::NotASocket { .. })));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        // A stale socket is replaced.
        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        let dev = Vsock::new(cfg(3, stale.clone())).unwrap();
        assert!(UnixStream::connect(&stale).is_ok());
        drop(dev);
        // Activation needs three queues.
        let mut dev = Vsock::new(cfg(4, dir.path().join("b"))).unwrap();
        let irq = Arc::new(CountingIrq::default());
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let err = dev.activate(mem, VirtioInterrupt::new(irq), VIRTIO_F_VERSION_1, vec![]);
        assert!(matches!(err, Err(ActivateError::QueueCount { expected: 3, got: 0 })));
    }

    #[test]
    fn host_initiated_connection() {
        let mut h = H::new();
        let mut host = UnixStream::connect(&h.path).unwrap();
        host.write_all(b"CONNECT 52\n").unwrap();
        h.poll();
        // No receive buffers yet: the REQUEST waits.
        assert!(h.recv().is_empty());
        h.give_rx(4);
        assert!(h.irq.count() > 0);
        let (req, data) = h.recv_one();
        assert!(data.is_empty());
        assert_eq!(req.op, OP_REQUEST);
        assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, u64::from(CID)));
        assert_eq!((req.src_port, req.dst_port), (1 << 30, 52));
        assert_eq!(req.type_, TYPE_STREAM);
        assert_eq!(req.buf_alloc, CONN_BUF_ALLOC);
        let hp = req.src_port;

        h.send(ghdr(52, hp, OP_RESPONSE));
        assert_eq!(read_line(&mut host), "OK 1073741824\n");

        // Host -> guest.
        host.write_all(b"hello").unwrap();
        h.poll();
        let (p, data) = h.recv_one();
        assert_eq!((p.op, p.src_port, p.dst_port, p.len), (OP_RW, hp, 52, 5));
        assert_eq!(data, b"hello");

        // Guest -> host, header and data in separate descriptors.
        let mut w = ghdr(52, hp, OP_RW);
        w.len = 5;
        h.queue_tx(&w, b"world", true);
        h.dev.process_queue(TX_QUEUE);
        let (got, eof) = read_now(&mut host);
        assert_eq!((got.as_slice(), eof), (&b"world"[..], false));

        // The guest shuts down both ways: RST, and the host sees EOF.
        let mut s = ghdr(52, hp, OP_SHUTDOWN);
        s.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        h.send(s);
        let (p, _) = h.recv_one();
        assert_eq!((p.op, p.src_port, p.dst_port), (OP_RST, hp, 52));
        assert_eq!(read_now(&mut host), (vec![], true));
        assert_eq!(h.dev.connection_count(), 0);
        assert_eq!(h.dev.host_fds().len(), 2, "only the listener and the writability epoll");

        // The next host connection gets the next port.
        let (_host2, hp2) = h.host_connect(53);
        assert_eq!(hp2, hp + 1);
    }

    #[test]
    fn connect_line_variants() {
        let mut h = H::new();
        // Lower case, data right behind the line, the line in two pieces.
        let mut host = UnixStream::connect(&h.path).unwrap();
        host.write_all(b"conn").unwrap();
        h.poll();
        host.write_all(b"ect 7\nearly").unwrap();
        h.poll();
        h.give_rx(4);
        let (req, _) = h.recv_one();
        assert_eq!((req.op, req.dst_port), (OP_REQUEST, 7));
        h.send(ghdr(7, req.src_port, OP_RESPONSE));
        let (p, data) = h.recv_one();
        assert_eq!((p.op, data.as_slice()), (OP_RW, &b"early"[..]));
        assert_eq!(read_line(&mut host), format!("OK {}\n", req.src_port));

        // Garbage, a line that never ends: closed.
        for bad in [&b"HELLO 5\n"[..], b"CONNECT x\n", b"CONNECT 00000000000000000000000000000001"] {
            let mut s = UnixStream::connect(&h.path).unwrap();
            s.write_all(bad).unwrap();
            h.poll();
            assert_eq!(read_now(&mut s), (vec![], true), "{bad:?}");
        }
        // EOF before the line.
        drop(UnixStream::connect(&h.path).unwrap());
        h.poll();
        assert!(h.dev.mux.handshakes.is_empty());
        assert!(h.recv().is_empty());

        // The guest refuses: the host socket is closed and the port freed.
        let mut s = UnixStream::connect(&h.path).unwrap();
        s.write_all(b"CONNECT 9\n").unwrap();
        h.poll();
        h.give_rx(1);
        let (req, _) = h.recv_one();
        h.send(ghdr(9, req.src_port, OP_RST));
        assert_eq!(read_now(&mut s), (vec![], true));
        assert_eq!(h.dev.connection_count(), 1);
        assert!(!h.dev.mux.local_ports.contains(&req.src_port));
    }

    #[test]
    fn guest_initiated_connection() {
        guest_initiated_connection_with(false);
        guest_initiated_connection_with(true);
    }

    fn guest_initiated_connection_with(event_idx: bool) {
        let mut h = H::with_event_idx(event_idx);
        let listener = UnixListener::bind(format!("{}_5000", h.path.display())).unwrap();
        let mut s = h.guest_connect(&listener, 1234, 5000, 64 << 10);
        h.give_rx(8);

        h.send_data(ghdr(1234, 5000, OP_RW), b"ping");
        assert_eq!(read_now(&mut s), (b"ping".to_vec(), false));
        h.send(ghdr(1234, 5000, OP_CREDIT_REQUEST));
        let (p, _) = h.recv_one();
        assert_eq!((p.op, p.buf_alloc, p.fwd_cnt), (OP_CREDIT_UPDATE, CONN_BUF_ALLOC, 4));

        s.write_all(b"pong").unwrap();
        h.poll();
        let (p, data) = h.recv_one();
        assert_eq!((p.op, p.src_port, p.dst_port, p.src_cid, p.dst_cid), (OP_RW, 5000, 1234, 2, 3));
        assert_eq!(data, b"pong");

        // Guest half-close: the host reads EOF but can still write.
        let mut sh = ghdr(1234, 5000, OP_SHUTDOWN);
        sh.flags = SHUTDOWN_SEND;
        h.send(sh);
        assert_eq!(read_now(&mut s), (vec![], true));
        s.write_all(b"more").unwrap();
        h.poll();
        let (p, data) = h.recv_one();
        assert_eq!((p.op, data.as_slice()), (OP_RW, &b"more"[..]));

        // The host writes and closes: the data, then SHUTDOWN to the guest, whose RST ends the
        // connection.
        s.write_all(b"bye").unwrap();
        drop(s);
        h.poll();
        let pkts = h.recv();
        assert_eq!(pkts.len(), 2);
        assert_eq!((pkts[0].0.op, pkts[0].1.as_slice()), (OP_RW, &b"bye"[..]));
        assert_eq!((pkts[1].0.op, pkts[1].0.flags), (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND));
        assert_eq!(h.dev.connection_count(), 1);
        h.send(ghdr(1234, 5000, OP_RST));
        assert_eq!(h.dev.connection_count(), 0);
        assert!(h.recv().is_empty(), "no answer to an RST");
    }

    #[test]
    fn guest_connect_without_listener_gets_rst() {
        let mut h = H::new();
        h.give_rx(2);
        h.send(ghdr(1234, 6000, OP_REQUEST));
        let (p, _) = h.recv_one();
        assert_eq!((p.op, p.src_port, p.dst_port, p.src_cid, p.dst_cid), (OP_RST, 6000, 1234, 2, 3));
        assert_eq!(h.dev.connection_count(), 0);
        // A socket file nobody listens on: same.
        let path = format!("{}_6001", h.path.display());
        drop(UnixListener::bind(&path).unwrap());
        h.send(ghdr(1234, 6001, OP_REQUEST));
        assert_eq!(h.recv_one().0.op, OP_RST);
    }

    #[test]
    fn host_to_guest_respects_guest_credit_and_stays_bounded() {
        let mut h = H::new();
        let listener = UnixListener::bind(format!("{}_7000", h.path.display())).unwrap();
        let mut s = h.guest_connect(&listener, 1000, 7000, 8192);
        s.set_nonblocking(true).unwrap();
        // The host writes until its socket is full; the guest never forwards anything.
        let mut written = 0usize;
        for _ in 0..200 {
            h.poll();
            match s.write(&pattern(written, 32 << 10)) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(written > CONN_RX_STAGE, "wrote {written}");
        // No receive buffers: the device holds one staging buffer's worth and stops reading.
        let token = h.dev.mux.by_ports[&(7000, 1000)];
        assert_eq!(h.dev.mux.conns[&token].rx_buf.len(), CONN_RX_STAGE);
        assert!(!h.listed(token));
        h.add_rx(64, true);
        h.dev.process_queue(RX_QUEUE);
        h.poll();
        let pkts = h.recv();
        let data: Vec<u8> = pkts.iter().filter(|p| p.0.op == OP_RW).flat_map(|p| p.1.clone()).collect();
        assert_eq!(data, pattern(0, 8192), "exactly the guest's credit");
        assert_eq!(pkts.last().unwrap().0.op, OP_CREDIT_REQUEST);
        assert_eq!(pkts.iter().filter(|p| p.0.op == OP_CREDIT_REQUEST).count(), 1);
        assert_eq!(h.dev.mux.conns[&token].rx_buf.len(), CONN_RX_STAGE);
        assert!(!h.listed(token), "a full staging buffer stops reading the socket");

        // The guest forwards 8 KiB: 8 KiB more arrive.
        let mut cu = ghdr(1000, 7000, OP_CREDIT_UPDATE);
        cu.buf_alloc = 8192;
        cu.fwd_cnt = 8192;
        h.send(cu);
        assert!(h.listed(token), "room in the staging buffer again");
        h.poll();
        let data: Vec<u8> = h.recv().into_iter().filter(|p| p.0.op == OP_RW).flat_map(|p| p.1).collect();
        assert_eq!(data, pattern(8192, 8192));
        // A larger window drains the rest, in order.
        cu.buf_alloc = 1 << 30;
        h.send(cu);
        let mut got = pattern(0, 16384);
        for _ in 0..1000 {
            h.poll();
            h.add_rx(32, false);
            h.dev.process_queue(RX_QUEUE);
            for (p, d) in h.recv() {
                assert_eq!(p.op, OP_RW);
                got.extend(d);
            }
            if got.len() == written {
                break;
            }
        }
        assert_eq!(got.len(), written);
        assert!(got == pattern(0, written));
    }

    /// Shrinks the device-side send buffer of a connection, so the host socket fills quickly.
    fn shrink_sndbuf(h: &H, ports: (u32, u32)) {
        let token = h.dev.mux.by_ports[&ports];
        let fd = h.dev.mux.conns[&token].stream.as_raw_fd();
        let size: libc::c_int = 4096;
        // SAFETY: valid socket fd and a pointer to a c_int of the given size.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                std::ptr::addr_of!(size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
    }

    #[test]
    fn guest_to_host_buffering_is_bounded_and_flushes_when_writable() {
        let mut h = H::new();
        let listener = UnixListener::bind(format!("{}_8000", h.path.display())).unwrap();
        let mut s = h.guest_connect(&listener, 2000, 8000, 64 << 10);
        shrink_sndbuf(&h, (8000, 2000));
        h.give_rx(16);
        let token = h.dev.mux.by_ports[&(8000, 2000)];
        // 32 KiB, within credit; the socket takes only part of it.
        for i in 0..2 {
            h.send_data(ghdr(2000, 8000, OP_RW), &pattern(i * 16384, 16384));
        }
        let buffered = h.dev.mux.conns[&token].tx_buf.len();
        assert!(buffered > 0 && buffered <= CONN_BUF_ALLOC as usize, "buffered {buffered}");
        let fwd = h.dev.mux.conns[&token].fwd_cnt.0;
        assert_eq!(fwd as usize + buffered, 32768, "only bytes that reached the socket are credited");
        // The host reads; the device flushes when the socket is writable again.
        let mut got = Vec::new();
        for _ in 0..1000 {
            got.extend(read_now(&mut s).0);
            h.poll();
            if got.len() == 32768 {
                break;
            }
        }
        assert!(got == pattern(0, 32768));
        assert!(h.dev.mux.conns[&token].tx_buf.is_empty());
        assert!(!h.dev.mux.conns[&token].out_watched);
        // The guest heard it can send again.
        let last = h.recv().into_iter().last().unwrap().0;
        assert_eq!((last.op, last.fwd_cnt), (OP_CREDIT_UPDATE, 32768));
    }

    #[test]
    fn guest_overrunning_its_credit_is_reset() {
        let mut h = H::new();
        let listener = UnixListener::bind(format!("{}_8001", h.path.display())).unwrap();
        let mut s = h.guest_connect(&listener, 2001, 8001, 64 << 10);
        shrink_sndbuf(&h, (8001, 2001));
        h.give_rx(4);
        let token = h.dev.mux.by_ports[&(8001, 2001)];
        // The host never reads. The guest ignores its credit.
        let mut sent = 0;
        while h.dev.mux.conns.contains_key(&token) && h.dev.mux.conns[&token].state != ConnState::Killed {
            assert!(h.dev.mux.conns[&token].tx_buf.len() <= CONN_BUF_ALLOC as usize);
            h.send_data(ghdr(2001, 8001, OP_RW), &pattern(sent, 16384));
            sent += 16384;
            assert!(sent < 1 << 20, "never reset");
        }
        let pkts = h.recv();
        assert_eq!(pkts.last().unwrap().0.op, OP_RST);
        assert_eq!(h.dev.connection_count(), 0);
        // The host gets what made it into the socket, then EOF.
        let (got, eof) = read_now(&mut s);
        assert!(eof && got.len() < sent);
        assert!(got == pattern(0, got.len()));
    }

    #[test]
    fn garbage_from_the_guest() {
        let mut h = H::new();
        h.give_rx(16);
        let used_before = h.tx.used_seen;
        // Too short for a header.
        h.mem.write_slice(&[1u8; 10], GuestAddress(TX_BUF_BASE)).unwrap();
        h.tx.add_chain(&h.mem, &[(TX_BUF_BASE, 10, 0)]);
        // Device-writable descriptor.
        h.tx.add_chain(&h.mem, &[(TX_BUF_BASE, 64, F_WRITE)]);
        // Outside guest memory.
        h.tx.add_chain(&h.mem, &[(MEM_SIZE as u64 - 8, 64, 0)]);
        h.tx.add_chain(&h.mem, &[(u64::MAX - 8, 64, 0)]);
        h.dev.process_queue(TX_QUEUE);
        assert!(h.recv().is_empty());
        // Length beyond the maximum, and beyond the chain.
        let mut rw = ghdr(1, 2, OP_RW);
        rw.len = MAX_PKT_DATA + 1;
        h.queue_tx(&rw, &[], false);
        rw.len = 100;
        h.queue_tx(&rw, &[0; 10], false);
        // Another CID, spoofed source CID.
        let mut other = ghdr(1, 2, OP_REQUEST);
        other.dst_cid = 7;
        h.queue_tx(&other, &[], false);
        other.dst_cid = HOST_CID;
        other.src_cid = 9;
        h.queue_tx(&other, &[], false);
        h.dev.process_queue(TX_QUEUE);
        assert!(h.recv().is_empty());
        // RST (no answer), then unknown op, data, credit ops and a wrong type: RST each.
        h.send(ghdr(1, 2, OP_RST));
        assert!(h.recv().is_empty());
        for op in [99, OP_RW, OP_RESPONSE, OP_SHUTDOWN, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST] {
            h.send_data(ghdr(11, 12, op), if op == OP_RW { b"x" } else { b"" });
            let (p, _) = h.recv_one();
            assert_eq!((p.op, p.src_port, p.dst_port), (OP_RST, 12, 11), "op {op}");
        }
        let mut dgram = ghdr(11, 12, OP_REQUEST);
        dgram.type_ = 2;
        h.send(dgram);
        assert_eq!(h.recv_one().0.op, OP_RST);
        assert_eq!(h.tx.used_seen, used_before);
        assert_eq!(h.tx.take_used(&h.mem).len(), 16);
        // A bad receive buffer is returned empty; the next one gets the packet.
        h.recv();
        h.rx.add_chain(&h.mem, &[(RX_BUF_BASE, 4096, 0)]);
        h.dev.process_queue(RX_QUEUE);
        h.rx.take_used(&h.mem);
        h.send(ghdr(13, 14, OP_RW));
        assert_eq!(h.recv_one().0.op, OP_RST);
        assert!(!h.dev.needs_reset());
        assert_eq!(h.dev.connection_count(), 0);
    }

    #[test]
    fn pending_rsts_are_bounded() {
        let mut h = H::new();
        for i in 0..(MAX_PENDING_RSTS as u32 + 50) {
            h.send(ghdr(i, 1, OP_RW));
        }
        assert_eq!(h.dev.mux.rsts.len(), MAX_PENDING_RSTS);
        h.give_rx(200);
        assert_eq!(h.recv().len(), 200);
        h.give_rx(100);
        assert_eq!(h.recv().len(), MAX_PENDING_RSTS - 200);
        assert!(h.dev.mux.rsts.is_empty());
    }

    #[test]
    fn connection_limit() {
        let mut h = H::new();
        let mut socks = Vec::new();
        for _ in 0..MAX_CONNECTIONS + 10 {
            socks.push(UnixStream::connect(&h.path).unwrap());
        }
        h.poll();
        assert_eq!(h.dev.mux.handshakes.len(), MAX_CONNECTIONS);
        // The refused ones were closed.
        let closed = socks.iter_mut().filter_map(|s| read_now(s).1.then_some(())).count();
        assert_eq!(closed, 10);
        // A guest connection is refused too.
        let _l = UnixListener::bind(format!("{}_9", h.path.display())).unwrap();
        h.give_rx(1);
        h.send(ghdr(5, 9, OP_REQUEST));
        assert_eq!(h.recv_one().0.op, OP_RST);
    }

    #[test]
    fn timeouts() {
        let mut h = H::new();
        // The guest never answers a REQUEST.
        let mut host = UnixStream::connect(&h.path).unwrap();
        host.write_all(b"CONNECT 52\n").unwrap();
        h.poll();
        h.give_rx(4);
        let (req, _) = h.recv_one();
        assert!(h.listed(TOKEN_TIMER));
        let token = h.dev.mux.by_ports[&(req.src_port, 52)];
        h.dev.mux.conns.get_mut(&token).unwrap().deadline = Some(Instant::now());
        h.dev.process_host_event(TOKEN_TIMER);
        assert_eq!(h.recv_one().0.op, OP_RST);
        assert_eq!(read_now(&mut host), (vec![], true));
        assert_eq!(h.dev.connection_count(), 0);
        // A host connection that never sends its line.
        let mut idle = UnixStream::connect(&h.path).unwrap();
        h.poll();
        assert_eq!(h.dev.mux.handshakes.len(), 1);
        for hs in h.dev.mux.handshakes.values_mut() {
            hs.deadline = Instant::now();
        }
        h.dev.process_host_event(TOKEN_TIMER);
        assert_eq!(read_now(&mut idle), (vec![], true));
        // Nothing pending: the timer is off.
        assert!(!h.listed(TOKEN_TIMER));
        // The guest never takes the RST of a killed connection: it goes away anyway.
        let (_host, hp) = h.host_connect(53);
        let token = h.dev.mux.by_ports[&(hp, 53)];
        h.dev.mux.kill(token);
        h.dev.mux.conns.get_mut(&token).unwrap().deadline = Some(Instant::now());
        h.dev.process_host_event(TOKEN_TIMER);
        assert_eq!(h.dev.connection_count(), 0);
    }

    /// A guest that behaves like Linux (respects the device's credit, tells its own, returns
    /// buffers) moves 1 MiB each way through a host peer with a tiny socket buffer: everything
    /// arrives intact and in order, and neither side ever exceeds its bounds.
    #[test]
    fn bulk_transfer_both_ways() {
        const TOTAL: usize = 1 << 20;
        const GUEST_BUF: u32 = 64 << 10;
        let mut h = H::new();
        let listener = UnixListener::bind(format!("{}_4000", h.path.display())).unwrap();
        let mut s = h.guest_connect(&listener, 3000, 4000, GUEST_BUF);
        s.set_nonblocking(true).unwrap();
        shrink_sndbuf(&h, (4000, 3000));
        let token = h.dev.mux.by_ports[&(4000, 3000)];
        let host_out = pattern(0, TOTAL);
        let guest_out = pattern(7, TOTAL);
        let (mut host_sent, mut host_got) = (0usize, Vec::new());
        let (mut guest_sent, mut guest_got) = (0usize, Vec::new());
        // The guest's view of the device's credit, and its own counters.
        let (mut dev_buf_alloc, mut dev_fwd_cnt) = (0u32, 0u32);
        let (mut guest_fwd, mut guest_fwd_told) = (0u32, 0u32);
        let mut outstanding_rx = 0usize;
        let mut rounds = 0;
        while host_got.len() < TOTAL || guest_got.len() < TOTAL {
            rounds += 1;
            assert!(rounds < 20_000, "stalled: host got {}, guest got {}", host_got.len(), guest_got.len());
            // Host peer.
            if host_sent < TOTAL {
                match s.write(&host_out[host_sent..(host_sent + 8192).min(TOTAL)]) {
                    Ok(n) => host_sent += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
            host_got.extend(read_now(&mut s).0);
            h.poll();
            // Guest driver: keep receive buffers posted, consume what arrived.
            if outstanding_rx < 32 {
                h.add_rx(32 - outstanding_rx, rounds % 2 == 0);
                outstanding_rx = 32;
                h.dev.process_queue(RX_QUEUE);
            }
            let mut credit_asked = false;
            for (p, d) in h.recv() {
                outstanding_rx -= 1;
                assert_eq!((p.src_port, p.dst_port), (4000, 3000));
                dev_buf_alloc = p.buf_alloc;
                dev_fwd_cnt = p.fwd_cnt;
                match p.op {
                    OP_RW => {
                        guest_got.extend_from_slice(&d);
                        guest_fwd = guest_fwd.wrapping_add(d.len() as u32);
                    }
                    OP_CREDIT_UPDATE => {}
                    OP_CREDIT_REQUEST => credit_asked = true,
                    op => panic!("unexpected op {op}"),
                }
                let in_flight = guest_got.len() as u32 - guest_fwd;
                assert!(in_flight <= GUEST_BUF, "the device overran the guest's buffer");
            }
            if credit_asked || guest_fwd.wrapping_sub(guest_fwd_told) >= 16 << 10 {
                let mut cu = ghdr(3000, 4000, OP_CREDIT_UPDATE);
                cu.buf_alloc = GUEST_BUF;
                cu.fwd_cnt = guest_fwd;
                h.send(cu);
                guest_fwd_told = guest_fwd;
            }
            // Guest sends within the device's credit.
            let credit = dev_buf_alloc.wrapping_sub((guest_sent as u32).wrapping_sub(dev_fwd_cnt));
            let n = (credit as usize).min(4096).min(TOTAL - guest_sent);
            if n > 0 {
                let mut rw = ghdr(3000, 4000, OP_RW);
                rw.buf_alloc = GUEST_BUF;
                rw.fwd_cnt = guest_fwd;
                guest_fwd_told = guest_fwd;
                h.send_data(rw, &guest_out[guest_sent..guest_sent + n]);
                guest_sent += n;
            }
            let c = &h.dev.mux.conns[&token];
            assert!(c.tx_buf.len() <= CONN_BUF_ALLOC as usize && c.rx_buf.len() <= CONN_RX_STAGE);
        }
        assert!(host_got == guest_out, "guest -> host data corrupted");
        assert!(guest_got == host_out, "host -> guest data corrupted");
        assert!(!h.dev.needs_reset());
        let m = h.dev.metrics_handle();
        assert_eq!((m.tx_bytes_count.get(), m.rx_bytes_count.get()), (TOTAL as u64, TOTAL as u64));
        assert_eq!(m.conns_added.get(), 1);
        assert!(m.tx_packets_count.get() >= (TOTAL / 4096) as u64 && m.rx_packets_count.get() > 0);
    }

    #[test]
    fn reset_drops_connections() {
        let mut h = H::new();
        let (mut host, _) = h.host_connect(52);
        assert!(h.dev.reset());
        assert!(!h.dev.is_activated());
        assert_eq!(read_now(&mut host), (vec![], true));
        assert_eq!(h.dev.connection_count(), 0);
        // Notifications after reset are ignored; the listener stays.
        h.dev.process_queue(TX_QUEUE);
        assert!(UnixStream::connect(&h.path).is_ok());
    }
}
