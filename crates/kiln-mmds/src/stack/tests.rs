//! The stack against a scripted guest: crafted ARP and TCP frames in, frames out parsed back.

use serde_json::json;

use super::*;
use crate::store::{Mmds, MmdsVersion};

const MMDS_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 2);
const GUEST_MAC: Mac = [0x06, 0, 0xac, 0x10, 0, 2];

fn stack_with(data: serde_json::Value, version: MmdsVersion) -> MmdsStack {
    let store = Mmds::shared(crate::DEFAULT_SIZE_LIMIT);
    store.lock().unwrap().put(data).unwrap();
    store.lock().unwrap().set_version(version);
    MmdsStack::new(MMDS_IP, store)
}

fn stack() -> MmdsStack {
    stack_with(json!({"latest": {"meta-data": {"instance-id": "i-1234"}}}), MmdsVersion::V2)
}

/// A segment the stack sent, parsed as the guest's kernel would.
#[derive(Debug, Clone)]
struct Out {
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    mss: Option<u16>,
    payload: Vec<u8>,
    src_port: u16,
    dst_port: u16,
}

fn drain(s: &mut MmdsStack, now: Instant) -> Vec<Out> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; MAX_OUT_FRAME];
    while let Some(n) = s.next_frame(&mut buf, now) {
        let frame = &buf[..n];
        assert_eq!(&frame[0..6], &GUEST_MAC, "addressed to the guest");
        assert_eq!(&frame[6..12], &MMDS_MAC);
        match wire::parse(frame, GUEST_IP) {
            Frame::Tcp(t) => {
                assert_eq!(t.src_ip, MMDS_IP);
                out.push(Out {
                    seq: t.seq,
                    ack: t.ack,
                    flags: t.flags,
                    window: t.window,
                    mss: t.mss,
                    payload: t.payload.to_vec(),
                    src_port: t.src_port,
                    dst_port: t.dst_port,
                });
            }
            f => panic!("unexpected frame {f:?}"),
        }
        assert!(out.len() < 10_000, "the stack keeps producing frames");
    }
    assert!(!s.has_frames());
    out
}

/// The guest side of one connection.
struct Client {
    port: u16,
    seq: u32,
    ack: u32,
    window: u16,
}

impl Client {
    fn new(port: u16) -> Self {
        Self { port, seq: 1000, ack: 0, window: 64_000 }
    }

    fn frame(&self, flags: u8, payload: &[u8]) -> Vec<u8> {
        self.frame_to(HTTP_PORT, flags, payload, None)
    }

    fn frame_to(&self, dst_port: u16, flags: u8, payload: &[u8], mss: Option<u16>) -> Vec<u8> {
        let mut buf = vec![0u8; 70_000];
        let n = wire::write_tcp(
            &mut buf,
            &TcpOut {
                src_mac: GUEST_MAC,
                dst_mac: MMDS_MAC,
                src_ip: GUEST_IP,
                dst_ip: MMDS_IP,
                ip_id: 1,
                src_port: self.port,
                dst_port,
                seq: self.seq,
                ack: self.ack,
                flags,
                window: self.window,
                mss,
                payload,
            },
        )
        .unwrap();
        buf.truncate(n);
        buf
    }

    fn connect(&mut self, s: &mut MmdsStack, now: Instant) {
        assert!(s.handle_frame(&self.frame_to(HTTP_PORT, SYN, &[], Some(1460)), now));
        let out = drain(s, now);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!((out[0].flags, out[0].src_port, out[0].dst_port), (SYN | ACK, HTTP_PORT, self.port));
        assert_eq!(out[0].ack, self.seq + 1);
        assert_eq!(out[0].mss, Some(OUR_MSS));
        assert_eq!(usize::from(out[0].window), RECV_CAPACITY);
        self.seq += 1;
        self.ack = out[0].seq.wrapping_add(1);
        assert!(s.handle_frame(&self.frame(ACK, &[]), now));
        assert!(drain(s, now).is_empty(), "nothing to say after the handshake");
    }

    /// Sends `data`, collects the answer (acknowledging as it comes) until `want` bytes came.
    fn exchange(&mut self, s: &mut MmdsStack, data: &[u8], now: Instant) -> (Vec<u8>, Vec<Out>) {
        assert!(s.handle_frame(&self.frame(ACK | PSH, data), now));
        self.seq += data.len() as u32;
        let mut got = Vec::new();
        let mut all = Vec::new();
        loop {
            let out = drain(s, now);
            if out.is_empty() {
                break;
            }
            for o in &out {
                if o.seq == self.ack {
                    got.extend_from_slice(&o.payload);
                    self.ack = self.ack.wrapping_add(o.payload.len() as u32);
                    if o.flags & FIN != 0 {
                        self.ack = self.ack.wrapping_add(1);
                    }
                }
            }
            all.extend(out);
            assert!(s.handle_frame(&self.frame(ACK, &[]), now));
        }
        (got, all)
    }
}

fn body(response: &[u8]) -> (String, String) {
    let text = String::from_utf8(response.to_vec()).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

#[test]
fn arp_who_has_is_answered_and_other_frames_pass() {
    let mut s = stack();
    let now = Instant::now();
    let mut req = vec![0xff; 6];
    req.extend_from_slice(&GUEST_MAC);
    req.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    req.extend_from_slice(&GUEST_MAC);
    req.extend_from_slice(&GUEST_IP.octets());
    req.extend_from_slice(&[0; 6]);
    req.extend_from_slice(&MMDS_IP.octets());
    assert!(s.is_for_mmds(&req));
    assert!(s.handle_frame(&req, now));
    let mut buf = [0u8; MAX_OUT_FRAME];
    let n = s.next_frame(&mut buf, now).unwrap();
    assert_eq!(&buf[0..6], &GUEST_MAC);
    assert_eq!(&buf[12..14], &[0x08, 0x06]);
    assert_eq!(&buf[20..22], &[0, 2], "an ARP reply");
    assert_eq!(&buf[22..28], &MMDS_MAC, "MMDS is at MMDS_MAC");
    assert_eq!(&buf[28..32], &MMDS_IP.octets());
    assert_eq!(&buf[32..38], &GUEST_MAC);
    assert_eq!(n, 42);
    assert!(s.next_frame(&mut buf, now).is_none());

    // ARP for another address, and traffic to another host, are the tap's.
    let mut other = req.clone();
    other[38..42].copy_from_slice(&[169, 254, 169, 253]);
    assert!(!s.is_for_mmds(&other));
    assert!(!s.handle_frame(&other, now));
    let mut c = Client::new(5000);
    let mut to_other = c.frame(SYN, &[]);
    to_other[14 + 16..14 + 20].copy_from_slice(&[10, 0, 0, 1]);
    assert!(!s.handle_frame(&to_other, now));
    assert!(!s.handle_frame(&[], now));
    assert!(!s.handle_frame(&[0u8; 13], now));
    // A frame for MMDS is consumed even when it is not TCP (dropped, never forwarded).
    let mut udp = c.frame(SYN, &[]);
    udp[14 + 9] = 17;
    assert!(s.handle_frame(&udp, now));
    assert!(s.next_frame(&mut buf, now).is_none());
    c.connect(&mut s, now);
}

#[test]
fn v2_token_then_get_over_tcp() {
    let mut s = stack();
    let now = Instant::now();
    let mut c = Client::new(40_000);
    c.connect(&mut s, now);
    let (resp, _) = c.exchange(
        &mut s,
        b"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
        now,
    );
    let (head, token) = body(&resp);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (resp, _) = c.exchange(&mut s, b"GET /latest/meta-data/instance-id HTTP/1.1\r\n\r\n", now);
    let (head, text) = body(&resp);
    assert!(head.starts_with("HTTP/1.1 401"), "no token: {head}");
    assert!(text.starts_with("No MMDS token provided"));
    let req = format!("GET /latest/meta-data/instance-id HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n");
    let (resp, _) = c.exchange(&mut s, req.as_bytes(), now);
    assert_eq!(body(&resp).1, "i-1234");
    let req = format!("GET / HTTP/1.1\r\nAccept: application/json\r\nX-metadata-token: {token}\r\n\r\n");
    let (resp, _) = c.exchange(&mut s, req.as_bytes(), now);
    assert_eq!(body(&resp).1, r#"{"latest":{"meta-data":{"instance-id":"i-1234"}}}"#);
    assert_eq!(s.connection_count(), 1, "keep-alive");
}

#[test]
fn a_request_in_pieces_and_pipelined_requests() {
    let mut s = stack_with(json!({"a": "1", "b": "2"}), MmdsVersion::V1);
    let now = Instant::now();
    let mut c = Client::new(40_001);
    c.connect(&mut s, now);
    let (resp, _) = c.exchange(&mut s, b"GET /a HT", now);
    assert!(resp.is_empty(), "half a request: only an ACK");
    let (resp, _) = c.exchange(&mut s, b"TP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n", now);
    let text = String::from_utf8(resp).unwrap();
    assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{text}");
    assert!(text.contains("\r\n\r\n1HTTP/1.1") && text.ends_with("\r\n\r\n2"), "{text}");
}

#[test]
fn big_answers_are_segmented_within_the_guests_window() {
    let value = "x".repeat(20_000);
    let mut s = stack_with(json!({"big": value}), MmdsVersion::V1);
    let now = Instant::now();
    let mut c = Client::new(40_002);
    c.window = 3000;
    c.connect(&mut s, now);
    assert!(s.handle_frame(&c.frame(ACK | PSH, b"GET /big HTTP/1.1\r\n\r\n"), now));
    c.seq += 22;
    let out = drain(&mut s, now);
    let sent: usize = out.iter().map(|o| o.payload.len()).sum();
    assert!(sent <= 3000, "{sent} bytes in flight with a 3000-byte window");
    assert!(out.iter().all(|o| o.payload.len() <= 1460));
    // Acknowledge as we go: the whole answer arrives, in order, intact.
    let mut got: Vec<u8> = Vec::new();
    let mut pending = out;
    for _ in 0..100 {
        for o in &pending {
            assert_eq!(o.seq, c.ack.wrapping_add(0), "in order, no gaps");
            got.extend_from_slice(&o.payload);
            c.ack = c.ack.wrapping_add(o.payload.len() as u32);
        }
        assert!(s.handle_frame(&c.frame(ACK, &[]), now));
        pending = drain(&mut s, now);
        if pending.is_empty() {
            break;
        }
    }
    let (_, b) = body(&got);
    assert_eq!(b, value);
}

#[test]
fn lost_segments_are_retransmitted_then_the_connection_is_given_up() {
    let mut s = stack_with(json!({"k": "v"}), MmdsVersion::V1);
    let t0 = Instant::now();
    let mut c = Client::new(40_003);
    c.connect(&mut s, t0);
    assert!(s.handle_frame(&c.frame(ACK | PSH, b"GET /k HTTP/1.1\r\n\r\n"), t0));
    let first = drain(&mut s, t0);
    assert_eq!(first.len(), 1);
    assert!(s.next_deadline().is_some());
    // Not acknowledged: after the timeout the same bytes come again.
    let again = drain(&mut s, t0 + Duration::from_secs(1));
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].seq, &again[0].payload), (first[0].seq, &first[0].payload));
    // A guest that never answers is reset eventually.
    let mut t = t0 + Duration::from_secs(1);
    for _ in 0..20 {
        t += Duration::from_secs(60);
        let _ = drain(&mut s, t);
    }
    assert_eq!(s.connection_count(), 0);
    assert_eq!(s.next_deadline(), None);
}

#[test]
fn closing_either_way() {
    let now = Instant::now();
    // The guest asks to close: our FIN follows the answer; its FIN is acknowledged; gone.
    let mut s = stack_with(json!({"k": "v"}), MmdsVersion::V1);
    let mut c = Client::new(40_004);
    c.connect(&mut s, now);
    let (resp, out) = c.exchange(&mut s, b"GET /k HTTP/1.1\r\nConnection: close\r\n\r\n", now);
    assert_eq!(body(&resp).1, "v");
    assert!(out.iter().any(|o| o.flags & FIN != 0), "{out:?}");
    assert!(s.handle_frame(&c.frame(FIN | ACK, &[]), now));
    let last = drain(&mut s, now);
    assert_eq!(last.len(), 1);
    assert_eq!((last[0].flags, last[0].ack), (ACK, c.seq + 1));
    assert_eq!(s.connection_count(), 0);

    // The guest closes first: we finish and close too.
    let mut c = Client::new(40_005);
    c.connect(&mut s, now);
    assert!(s.handle_frame(&c.frame(FIN | ACK, &[]), now));
    c.seq += 1;
    let out = drain(&mut s, now);
    assert!(out.iter().any(|o| o.flags & FIN != 0), "{out:?}");
    c.ack = c.ack.wrapping_add(1);
    assert!(s.handle_frame(&c.frame(ACK, &[]), now));
    assert_eq!(s.connection_count(), 0);

    // RST drops the connection at once.
    let mut c = Client::new(40_006);
    c.connect(&mut s, now);
    assert!(s.handle_frame(&c.frame(RST, &[]), now));
    assert_eq!(s.connection_count(), 0);
    assert!(drain(&mut s, now).is_empty(), "no answer to a RST");
}

#[test]
fn refusals_are_resets() {
    let mut s = stack();
    let now = Instant::now();
    let c = Client::new(40_007);
    // Another port.
    assert!(s.handle_frame(&c.frame_to(22, SYN, &[], None), now));
    let out = drain(&mut s, now);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].flags, out[0].ack), (RST | ACK, c.seq + 1));
    assert_eq!((out[0].src_port, out[0].dst_port), (22, 40_007));
    // An ACK for no connection.
    assert!(s.handle_frame(&c.frame(ACK, b"data"), now));
    let out = drain(&mut s, now);
    assert_eq!((out[0].flags, out[0].seq), (RST, c.ack));
    // A RST for no connection gets nothing.
    assert!(s.handle_frame(&c.frame(RST, &[]), now));
    assert!(drain(&mut s, now).is_empty());
}

#[test]
fn connections_and_queues_are_bounded() {
    let mut s = stack();
    let now = Instant::now();
    let mut buf = vec![0u8; MAX_OUT_FRAME];
    for port in 0..200u16 {
        let c = Client::new(10_000 + port);
        assert!(
            s.handle_frame(&c.frame_to(HTTP_PORT, SYN, &[], None), now + Duration::from_millis(port.into()))
        );
        assert!(s.connection_count() <= MAX_CONNECTIONS);
        assert!(s.control.len() <= MAX_CONTROL_FRAMES);
    }
    assert_eq!(s.connection_count(), MAX_CONNECTIONS);
    // Frames come out one per call, and stop.
    let mut frames = 0;
    while s.next_frame(&mut buf, now).is_some() {
        frames += 1;
        assert!(frames <= MAX_CONNECTIONS + MAX_CONTROL_FRAMES);
    }
    // The most recent connections survived eviction.
    let ports: Vec<u16> = s.conns.iter().map(|c| c.port).collect();
    assert!(ports.contains(&(10_000 + 199)), "{ports:?}");
}

#[test]
fn oversized_requests_are_refused_and_the_window_is_honoured() {
    let mut s = stack();
    let now = Instant::now();
    let mut c = Client::new(40_008);
    c.connect(&mut s, now);
    // More than the window at once: the excess is not taken (the guest must resend it).
    let flood = vec![b'a'; RECV_CAPACITY + 1000];
    assert!(s.handle_frame(&c.frame(ACK, &flood), now));
    let out = drain(&mut s, now);
    assert!(s.conns.iter().all(|c| c.recv_buf.len() <= RECV_CAPACITY));
    // The buffer filled without a request end: 400, and the connection closes.
    let all: Vec<u8> = out.iter().flat_map(|o| o.payload.clone()).collect();
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(out.iter().any(|o| o.flags & FIN != 0));
    assert_eq!(out.last().map(|o| o.ack), Some(c.seq + RECV_CAPACITY as u32), "only the window was taken");
}

#[test]
fn hostile_frames_never_panic() {
    let mut s = stack();
    let now = Instant::now();
    let mut c = Client::new(40_009);
    c.connect(&mut s, now);
    let base = c.frame(ACK | PSH, b"GET / HTTP/1.1\r\n\r\n");
    let mut seed: u64 = 0x1234_5678;
    let mut buf = vec![0u8; MAX_OUT_FRAME];
    for i in 0..20_000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut f = base.clone();
        // Flip bytes past the Ethernet header so most frames still reach the parser.
        for k in 0..(seed % 4 + 1) {
            let pos = 14 + ((seed >> (8 * k)) as usize % (f.len() - 14));
            f[pos] = (seed >> (3 * k)) as u8;
        }
        let cut = (seed as usize >> 20) % (f.len() + 1);
        let f = if i % 3 == 0 { &f[..cut] } else { &f[..] };
        s.handle_frame(f, now);
        let mut n = 0;
        while s.next_frame(&mut buf, now).is_some() {
            n += 1;
            assert!(n < 1000);
        }
        assert!(s.connection_count() <= MAX_CONNECTIONS);
    }
}
