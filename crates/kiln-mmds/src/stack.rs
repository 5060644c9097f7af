//! The network stack in front of MMDS on one virtio-net interface: frames in from the guest,
//! frames out to the guest, nothing to or from the tap.
//!
//! - ARP: a who-has for the MMDS address is answered with [`MMDS_MAC`].
//! - IPv4 to the MMDS address: TCP is served; everything else (UDP, ICMP, fragments) is
//!   dropped. TCP to a port other than 80 is refused with a RST.
//! - TCP: a passive endpoint per connection (SYN → SYN-ACK, in-order data only, go-back-N
//!   retransmission on a timeout, FIN both ways, RST). The link is a point-to-point virtio ring
//!   that neither loses nor reorders frames, so there is no congestion control; the guest's
//!   advertised window is respected and ours is the free space of the request buffer.
//! - HTTP: one request answered at a time per connection ([`crate::http::serve`]); pipelined
//!   requests wait in the request buffer.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections (a new one evicts the least recently active,
//! which is reset); a request buffer of [`RECV_CAPACITY`] bytes each (a request that does not
//! fit is refused); one pending answer each (at most the store's size limit plus headers);
//! at most [`MAX_CONTROL_FRAMES`] queued ARP replies and RSTs (more are dropped, the guest
//! retries). Output is pulled: [`MmdsStack::next_frame`] builds a frame only when the device
//! has a receive buffer for it, so nothing queues up while the guest is not reading.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::http::{self, Outcome};
use crate::store::SharedMmds;
use crate::wire::{self, Frame, Mac, TcpIn, TcpOut, ACK, FIN, PSH, RST, SYN};

/// The MAC the MMDS address answers ARP with (Firecracker's).
pub const MMDS_MAC: Mac = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
/// The port MMDS serves.
pub const HTTP_PORT: u16 = 80;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Bytes of requests buffered per connection (and so the window we advertise).
pub const RECV_CAPACITY: usize = 4096;
/// ARP replies and RSTs waiting to be delivered.
pub const MAX_CONTROL_FRAMES: usize = 32;
/// Largest segment we send and the MSS we announce (a 1500-byte MTU).
pub const OUR_MSS: u16 = 1460;
/// First retransmission timeout; doubled per retry.
const INITIAL_RTO: Duration = Duration::from_millis(500);
/// Retransmissions before a connection is given up (reset).
const MAX_RETRIES: u32 = 7;

/// Largest frame [`MmdsStack::next_frame`] builds.
pub const MAX_OUT_FRAME: usize = wire::ETH_HDR + wire::IPV4_HDR + wire::TCP_HDR + 4 + OUR_MSS as usize;

#[derive(Debug, Clone, Copy)]
enum Control {
    ArpReply { mac: Mac, ip: Ipv4Addr },
    Rst { mac: Mac, ip: Ipv4Addr, src_port: u16, dst_port: u16, seq: u32, ack: Option<u32> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// SYN received, our SYN-ACK not yet acknowledged.
    SynReceived,
    Established,
}

#[derive(Debug)]
struct Conn {
    mac: Mac,
    ip: Ipv4Addr,
    port: u16,
    state: State,
    /// The guest's initial sequence number (to recognise a retransmitted SYN).
    irs: u32,
    iss: u32,
    snd_una: u32,
    snd_nxt: u32,
    /// Bytes from `snd_una` on (our SYN excluded).
    send_buf: VecDeque<u8>,
    /// Close once `send_buf` is sent: a FIN follows the data.
    fin_queued: bool,
    fin_acked: bool,
    rcv_nxt: u32,
    recv_buf: Vec<u8>,
    /// The guest sent FIN (counted in `rcv_nxt`).
    peer_fin: bool,
    peer_window: u32,
    peer_mss: u16,
    ack_due: bool,
    synack_due: bool,
    last_activity: Instant,
    /// When the oldest unacknowledged segment went out, and how often it was retried.
    rto_started: Option<Instant>,
    retries: u32,
}

/// What a connection sends next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Emit {
    SynAck,
    Data { offset: usize, len: usize, push: bool },
    Fin,
    Ack,
}

fn seq_diff(a: u32, b: u32) -> i64 {
    // a - b in sequence space, as a signed distance.
    i64::from(a.wrapping_sub(b) as i32)
}

impl Conn {
    fn in_flight(&self) -> u32 {
        self.snd_nxt.wrapping_sub(self.snd_una)
    }

    fn window(&self) -> u16 {
        u16::try_from(RECV_CAPACITY.saturating_sub(self.recv_buf.len())).unwrap_or(u16::MAX)
    }

    /// Done: both FINs exchanged, ours acknowledged and theirs too.
    fn finished(&self) -> bool {
        self.fin_acked && self.peer_fin && !self.ack_due
    }

    fn next_emit(&self) -> Option<Emit> {
        match self.state {
            State::SynReceived => self.synack_due.then_some(Emit::SynAck),
            State::Established => {
                let offset = self.in_flight() as usize;
                let usable = self.send_buf.len().min(self.peer_window as usize);
                if offset < usable {
                    let len = (usable - offset).min(usize::from(self.peer_mss.min(OUR_MSS)));
                    let push = offset + len == self.send_buf.len();
                    return Some(Emit::Data { offset, len, push });
                }
                if self.fin_queued && offset == self.send_buf.len() && !self.fin_acked {
                    return Some(Emit::Fin);
                }
                self.ack_due.then_some(Emit::Ack)
            }
        }
    }

    fn rto(&self) -> Duration {
        INITIAL_RTO.saturating_mul(1 << self.retries.min(6))
    }
}

/// The MMDS network stack of one interface.
#[derive(Debug)]
pub struct MmdsStack {
    ip: Ipv4Addr,
    store: SharedMmds,
    conns: Vec<Conn>,
    control: VecDeque<Control>,
    /// Round-robin start for output.
    next_conn: usize,
    ip_id: u16,
    scratch: Vec<u8>,
}

impl MmdsStack {
    /// A stack answering at `ip` from `store`.
    pub fn new(ip: Ipv4Addr, store: SharedMmds) -> Self {
        Self {
            ip,
            store,
            conns: Vec::new(),
            control: VecDeque::new(),
            next_conn: 0,
            ip_id: 0,
            scratch: Vec::with_capacity(OUR_MSS as usize),
        }
    }

    pub fn ipv4_address(&self) -> Ipv4Addr {
        self.ip
    }

    /// Connections currently open.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether a guest frame starting with `prefix` (at least [`wire::CLASSIFY_PREFIX`] bytes
    /// or the whole frame) is for MMDS. Frames that are not must go to the tap unchanged.
    pub fn is_for_mmds(&self, prefix: &[u8]) -> bool {
        wire::is_for(prefix, self.ip)
    }

    /// How many bytes of a frame [`Self::is_for_mmds`] needs.
    pub const CLASSIFY_PREFIX: usize = wire::CLASSIFY_PREFIX;

    /// Takes a guest frame (Ethernet, no virtio-net header). Returns false if it is not for
    /// MMDS (the caller forwards it); true if it was consumed (answered or dropped).
    pub fn handle_frame(&mut self, frame: &[u8], now: Instant) -> bool {
        match wire::parse(frame, self.ip) {
            Frame::NotOurs => return false,
            Frame::Drop => {}
            Frame::ArpRequest { sender_mac, sender_ip } => {
                self.push_control(Control::ArpReply { mac: sender_mac, ip: sender_ip })
            }
            Frame::Tcp(seg) => self.handle_tcp(&seg, now),
        }
        true
    }

    fn push_control(&mut self, c: Control) {
        if self.control.len() < MAX_CONTROL_FRAMES {
            self.control.push_back(c);
        } else {
            tracing::debug!("mmds: control queue full; dropping {c:?}");
        }
    }

    /// RST in answer to a segment that belongs to no connection (RFC 793, "reset generation").
    fn refuse(&mut self, seg: &TcpIn<'_>) {
        if seg.flags & RST != 0 {
            return;
        }
        let c = if seg.flags & ACK != 0 {
            Control::Rst {
                mac: seg.src_mac,
                ip: seg.src_ip,
                src_port: seg.dst_port,
                dst_port: seg.src_port,
                seq: seg.ack,
                ack: None,
            }
        } else {
            let len =
                seg.payload.len() as u32 + u32::from(seg.flags & SYN != 0) + u32::from(seg.flags & FIN != 0);
            Control::Rst {
                mac: seg.src_mac,
                ip: seg.src_ip,
                src_port: seg.dst_port,
                dst_port: seg.src_port,
                seq: 0,
                ack: Some(seg.seq.wrapping_add(len)),
            }
        };
        self.push_control(c);
    }

    fn reset_conn(&mut self, i: usize) {
        let c = self.conns.swap_remove(i);
        self.push_control(Control::Rst {
            mac: c.mac,
            ip: c.ip,
            src_port: HTTP_PORT,
            dst_port: c.port,
            seq: c.snd_nxt,
            ack: Some(c.rcv_nxt),
        });
    }

    fn handle_tcp(&mut self, seg: &TcpIn<'_>, now: Instant) {
        if seg.dst_port != HTTP_PORT {
            self.refuse(seg);
            return;
        }
        let found = self.conns.iter().position(|c| c.ip == seg.src_ip && c.port == seg.src_port);
        let syn = seg.flags & SYN != 0;
        let i = match found {
            Some(i) if syn && self.conns[i].irs != seg.seq => {
                // The guest reuses the port for a new connection.
                self.conns.swap_remove(i);
                return self.accept(seg, now);
            }
            Some(i) => i,
            None if syn && seg.flags & (ACK | RST) == 0 => return self.accept(seg, now),
            None => return self.refuse(seg),
        };
        let conn = &mut self.conns[i];
        conn.mac = seg.src_mac;
        conn.last_activity = now;
        if seg.flags & RST != 0 {
            let off = seq_diff(seg.seq, conn.rcv_nxt);
            if (0..RECV_CAPACITY as i64).contains(&off) {
                self.conns.swap_remove(i);
            }
            return;
        }
        if syn {
            // A retransmitted SYN: our SYN-ACK (or, later, an ACK) did not arrive.
            if conn.state == State::SynReceived {
                conn.synack_due = true;
            } else {
                conn.ack_due = true;
            }
            return;
        }
        if seg.flags & ACK == 0 {
            return;
        }
        // Acknowledgement.
        match conn.state {
            State::SynReceived => {
                if seg.ack != conn.iss.wrapping_add(1) {
                    self.refuse(seg);
                    return;
                }
                conn.state = State::Established;
                conn.snd_una = seg.ack;
                conn.snd_nxt = seg.ack;
                conn.rto_started = None;
                conn.retries = 0;
            }
            State::Established => {
                let acked = seg.ack.wrapping_sub(conn.snd_una);
                if acked > conn.in_flight() {
                    // Acknowledges what we never sent.
                    conn.ack_due = true;
                    return;
                }
                if acked > 0 {
                    let data = (acked as usize).min(conn.send_buf.len());
                    conn.send_buf.drain(..data);
                    if acked as usize > data {
                        conn.fin_acked = true;
                    }
                    conn.snd_una = seg.ack;
                    conn.retries = 0;
                    conn.rto_started = (conn.in_flight() > 0).then_some(now);
                }
            }
        }
        conn.peer_window = u32::from(seg.window);
        // Data, in order only.
        if !seg.payload.is_empty() || seg.flags & FIN != 0 {
            let off = seq_diff(conn.rcv_nxt, seg.seq);
            if off < 0 {
                // A gap (cannot happen on a ring): ask for what is missing.
                conn.ack_due = true;
            } else {
                let off = off as usize;
                if off < seg.payload.len() {
                    let new = &seg.payload[off..];
                    let room = RECV_CAPACITY - conn.recv_buf.len();
                    let take = new.len().min(room);
                    if !conn.fin_queued && !conn.peer_fin {
                        conn.recv_buf.extend_from_slice(&new[..take]);
                    }
                    conn.rcv_nxt = conn.rcv_nxt.wrapping_add(take as u32);
                    if take == new.len() && seg.flags & FIN != 0 && !conn.peer_fin {
                        conn.peer_fin = true;
                        conn.rcv_nxt = conn.rcv_nxt.wrapping_add(1);
                    }
                } else if off == seg.payload.len() && seg.flags & FIN != 0 && !conn.peer_fin {
                    conn.peer_fin = true;
                    conn.rcv_nxt = conn.rcv_nxt.wrapping_add(1);
                }
                conn.ack_due = true;
            }
        }
        self.serve(i, now);
        if self.conns[i].finished() {
            self.conns.swap_remove(i);
        }
    }

    fn accept(&mut self, seg: &TcpIn<'_>, now: Instant) {
        if self.conns.len() >= MAX_CONNECTIONS {
            // Make room: the least recently active connection goes.
            if let Some(oldest) =
                self.conns.iter().enumerate().min_by_key(|(_, c)| c.last_activity).map(|(i, _)| i)
            {
                tracing::debug!("mmds: {MAX_CONNECTIONS} connections open; resetting the least active");
                self.reset_conn(oldest);
            }
        }
        let mut isn = [0u8; 4];
        if crate::token::fill_random(&mut isn).is_err() {
            isn = (now.elapsed().subsec_nanos() ^ 0x5eed_1234).to_le_bytes();
        }
        let iss = u32::from_le_bytes(isn);
        self.conns.push(Conn {
            mac: seg.src_mac,
            ip: seg.src_ip,
            port: seg.src_port,
            state: State::SynReceived,
            irs: seg.seq,
            iss,
            snd_una: iss,
            snd_nxt: iss,
            send_buf: VecDeque::new(),
            fin_queued: false,
            fin_acked: false,
            rcv_nxt: seg.seq.wrapping_add(1),
            recv_buf: Vec::new(),
            peer_fin: false,
            peer_window: u32::from(seg.window),
            // RFC 1122: 536 when the peer names none.
            peer_mss: seg.mss.unwrap_or(536).max(64),
            ack_due: false,
            synack_due: true,
            last_activity: now,
            rto_started: None,
            retries: 0,
        });
    }

    /// Answers the next buffered request once the previous answer is out and acknowledged.
    fn serve(&mut self, i: usize, now: Instant) {
        let conn = &mut self.conns[i];
        if conn.state != State::Established || conn.fin_queued {
            return;
        }
        while conn.send_buf.is_empty() && !conn.recv_buf.is_empty() && !conn.fin_queued {
            match http::serve(&self.store, &conn.recv_buf, RECV_CAPACITY, now) {
                Outcome::Incomplete => break,
                Outcome::Respond { consumed, response, close } => {
                    conn.recv_buf.drain(..consumed.min(conn.recv_buf.len()));
                    conn.send_buf.extend(response);
                    conn.ack_due = true;
                    if close {
                        conn.fin_queued = true;
                        conn.recv_buf.clear();
                    }
                }
            }
        }
        if conn.peer_fin && conn.send_buf.is_empty() {
            // The guest is done sending; a partial request will never complete.
            conn.recv_buf.clear();
            conn.fin_queued = true;
        }
    }

    /// Retransmits what timed out and gives up on connections that stopped answering.
    pub fn poll_timers(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.conns.len() {
            let c = &mut self.conns[i];
            let outstanding = c.state == State::SynReceived || c.in_flight() > 0;
            match c.rto_started {
                Some(t) if outstanding && now.saturating_duration_since(t) >= c.rto() => {
                    if c.retries >= MAX_RETRIES {
                        tracing::debug!("mmds: connection from {}:{} stopped answering; reset", c.ip, c.port);
                        self.reset_conn(i);
                        continue;
                    }
                    c.retries += 1;
                    c.rto_started = Some(now);
                    // Go back: resend from the oldest unacknowledged byte.
                    if c.state == State::SynReceived {
                        c.synack_due = true;
                    } else {
                        c.snd_nxt = c.snd_una;
                    }
                }
                _ => {}
            }
            i += 1;
        }
    }

    /// When [`Self::poll_timers`] next has something to do, if ever.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns
            .iter()
            .filter(|c| c.state == State::SynReceived || c.in_flight() > 0)
            .filter_map(|c| c.rto_started.map(|t| t + c.rto()))
            .min()
    }

    /// Whether [`Self::next_frame`] has a frame to give.
    pub fn has_frames(&self) -> bool {
        !self.control.is_empty() || self.conns.iter().any(|c| c.next_emit().is_some())
    }

    /// Builds the next frame for the guest into `buf` (which should hold [`MAX_OUT_FRAME`]
    /// bytes); returns its length, or `None` when there is nothing to send.
    pub fn next_frame(&mut self, buf: &mut [u8], now: Instant) -> Option<usize> {
        self.poll_timers(now);
        while let Some(c) = self.control.pop_front() {
            let n = match c {
                Control::ArpReply { mac, ip } => wire::write_arp_reply(buf, MMDS_MAC, self.ip, mac, ip),
                Control::Rst { mac, ip, src_port, dst_port, seq, ack } => {
                    self.ip_id = self.ip_id.wrapping_add(1);
                    wire::write_tcp(
                        buf,
                        &TcpOut {
                            src_mac: MMDS_MAC,
                            dst_mac: mac,
                            src_ip: self.ip,
                            dst_ip: ip,
                            ip_id: self.ip_id,
                            src_port,
                            dst_port,
                            seq,
                            ack: ack.unwrap_or(0),
                            flags: RST | if ack.is_some() { ACK } else { 0 },
                            window: 0,
                            mss: None,
                            payload: &[],
                        },
                    )
                }
            };
            if n.is_some() {
                return n;
            }
        }
        let count = self.conns.len();
        for k in 0..count {
            let i = (self.next_conn + k) % count;
            if let Some(emit) = self.conns[i].next_emit() {
                self.next_conn = (i + 1) % count;
                let n = self.emit(i, emit, buf, now);
                if self.conns[i].finished() {
                    self.conns.swap_remove(i);
                }
                return n;
            }
        }
        None
    }

    fn emit(&mut self, i: usize, emit: Emit, buf: &mut [u8], now: Instant) -> Option<usize> {
        self.ip_id = self.ip_id.wrapping_add(1);
        let c = &mut self.conns[i];
        let (seq, flags, mss) = match emit {
            Emit::SynAck => (c.iss, SYN | ACK, Some(OUR_MSS)),
            Emit::Data { push, .. } => (c.snd_nxt, ACK | if push { PSH } else { 0 }, None),
            Emit::Fin => (c.snd_nxt, FIN | ACK, None),
            Emit::Ack => (c.snd_nxt, ACK, None),
        };
        self.scratch.clear();
        if let Emit::Data { offset, len, .. } = emit {
            // Never more than fits the caller's buffer.
            let room = buf.len().saturating_sub(wire::tcp_frame_len(0, false));
            if room == 0 {
                return None;
            }
            let len = len.min(room);
            self.scratch.extend(c.send_buf.range(offset..offset + len));
        }
        let n = wire::write_tcp(
            buf,
            &TcpOut {
                src_mac: MMDS_MAC,
                dst_mac: c.mac,
                src_ip: self.ip,
                dst_ip: c.ip,
                ip_id: self.ip_id,
                src_port: HTTP_PORT,
                dst_port: c.port,
                seq,
                ack: c.rcv_nxt,
                flags,
                window: c.window(),
                mss,
                payload: &self.scratch,
            },
        )?;
        match emit {
            Emit::SynAck => c.synack_due = false,
            Emit::Data { .. } => c.snd_nxt = c.snd_nxt.wrapping_add(self.scratch.len() as u32),
            Emit::Fin => c.snd_nxt = c.snd_nxt.wrapping_add(1),
            Emit::Ack => {}
        }
        c.ack_due = false;
        if c.rto_started.is_none() && !matches!(emit, Emit::Ack) {
            c.rto_started = Some(now);
        }
        Some(n)
    }
}

#[cfg(test)]
mod tests;
