//! Ethernet, ARP, IPv4 and TCP on the wire: bounds-checked parsing of guest frames and
//! building of reply frames (checksums filled in).

use std::net::Ipv4Addr;

pub const ETH_HDR: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ARP_LEN: usize = 28;
pub const IPV4_HDR: usize = 20;
pub const TCP_HDR: usize = 20;
pub const IPPROTO_TCP: u8 = 6;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

pub type Mac = [u8; 6];

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes([*b.get(at)?, *b.get(at + 1)?, *b.get(at + 2)?, *b.get(at + 3)?]))
}

fn ip_at(b: &[u8], at: usize) -> Option<Ipv4Addr> {
    Some(Ipv4Addr::new(*b.get(at)?, *b.get(at + 1)?, *b.get(at + 2)?, *b.get(at + 3)?))
}

fn mac_at(b: &[u8], at: usize) -> Option<Mac> {
    b.get(at..at + 6)?.try_into().ok()
}

/// A TCP segment from the guest to the MMDS address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpIn<'a> {
    pub src_mac: Mac,
    pub src_ip: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// The MSS option (SYN segments).
    pub mss: Option<u16>,
    pub payload: &'a [u8],
}

/// What a guest frame is, as far as MMDS cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Not for the MMDS address: the device forwards it as usual.
    NotOurs,
    /// ARP who-has the MMDS address.
    ArpRequest { sender_mac: Mac, sender_ip: Ipv4Addr },
    /// TCP to the MMDS address.
    Tcp(TcpIn<'a>),
    /// For the MMDS address but nothing MMDS serves (UDP, ICMP, fragments, malformed): dropped.
    Drop,
}

/// Whether a frame (without the virtio-net header) is for `mmds_ip`, judged from its first
/// bytes: ARP with that target, or IPv4 to it. Needs [`CLASSIFY_PREFIX`] bytes at most.
pub fn is_for(prefix: &[u8], mmds_ip: Ipv4Addr) -> bool {
    match be16(prefix, 12) {
        Some(ETHERTYPE_ARP) => ip_at(prefix, ETH_HDR + 24) == Some(mmds_ip),
        Some(ETHERTYPE_IPV4) => ip_at(prefix, ETH_HDR + 16) == Some(mmds_ip),
        _ => false,
    }
}

/// Bytes of a frame [`is_for`] looks at.
pub const CLASSIFY_PREFIX: usize = ETH_HDR + ARP_LEN;

/// Parses a guest frame.
pub fn parse(frame: &[u8], mmds_ip: Ipv4Addr) -> Frame<'_> {
    if !is_for(frame, mmds_ip) {
        return Frame::NotOurs;
    }
    let Some(src_mac) = mac_at(frame, 6) else { return Frame::NotOurs };
    match be16(frame, 12) {
        Some(ETHERTYPE_ARP) => parse_arp(&frame[ETH_HDR..]).unwrap_or(Frame::NotOurs),
        _ => parse_ipv4(&frame[ETH_HDR..], src_mac).unwrap_or(Frame::Drop),
    }
}

fn parse_arp(arp: &[u8]) -> Option<Frame<'_>> {
    // Ethernet/IPv4 request only; anything else about the MMDS address goes to the tap.
    if be16(arp, 0)? != 1
        || be16(arp, 2)? != ETHERTYPE_IPV4
        || arp[4] != 6
        || arp[5] != 4
        || be16(arp, 6)? != 1
    {
        return None;
    }
    Some(Frame::ArpRequest { sender_mac: mac_at(arp, 8)?, sender_ip: ip_at(arp, 14)? })
}

fn parse_ipv4(ip: &[u8], src_mac: Mac) -> Option<Frame<'_>> {
    let version_ihl = *ip.first()?;
    let ihl = usize::from(version_ihl & 0xf) * 4;
    if version_ihl >> 4 != 4 || ihl < IPV4_HDR || ip.len() < ihl {
        return None;
    }
    // Fragments are not reassembled (as Firecracker): MF set or a non-zero offset.
    if be16(ip, 6)? & 0x3fff != 0 {
        return None;
    }
    if ip[9] != IPPROTO_TCP {
        return None;
    }
    // A guest using TSO may leave total length 0 or larger than the frame: use what is there.
    let total = usize::from(be16(ip, 2)?);
    let end = if total >= ihl && total <= ip.len() { total } else { ip.len() };
    let src_ip = ip_at(ip, 12)?;
    let tcp = &ip[ihl..end];
    let data_off = usize::from(*tcp.get(12)? >> 4) * 4;
    if data_off < TCP_HDR || tcp.len() < data_off {
        return None;
    }
    let mut mss = None;
    let mut opts = &tcp[TCP_HDR..data_off];
    while let Some((&kind, rest)) = opts.split_first() {
        match kind {
            0 => break,
            1 => opts = rest,
            _ => {
                let len = usize::from(*rest.first()?);
                if len < 2 || len > opts.len() {
                    break;
                }
                if kind == 2 && len == 4 {
                    mss = be16(opts, 2);
                }
                opts = &opts[len..];
            }
        }
    }
    Some(Frame::Tcp(TcpIn {
        src_mac,
        src_ip,
        src_port: be16(tcp, 0)?,
        dst_port: be16(tcp, 2)?,
        seq: be32(tcp, 4)?,
        ack: be32(tcp, 8)?,
        flags: tcp[13],
        window: be16(tcp, 14)?,
        mss,
        payload: &tcp[data_off..],
    }))
}

/// The Internet checksum of the concatenation of `parts` (each but the last of even length).
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for c in &mut chunks {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u32::from(*last) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn eth(buf: &mut [u8], dst: Mac, src: Mac, ethertype: u16) {
    buf[0..6].copy_from_slice(&dst);
    buf[6..12].copy_from_slice(&src);
    buf[12..14].copy_from_slice(&ethertype.to_be_bytes());
}

/// Writes an ARP reply "`our_ip` is at `our_mac`" to the asker; returns the frame length
/// (`None` if `buf` is too small).
pub fn write_arp_reply(
    buf: &mut [u8],
    our_mac: Mac,
    our_ip: Ipv4Addr,
    to_mac: Mac,
    to_ip: Ipv4Addr,
) -> Option<usize> {
    let frame = buf.get_mut(..ETH_HDR + ARP_LEN)?;
    eth(frame, to_mac, our_mac, ETHERTYPE_ARP);
    let arp = &mut frame[ETH_HDR..];
    arp[0..2].copy_from_slice(&1u16.to_be_bytes());
    arp[2..4].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    arp[4] = 6;
    arp[5] = 4;
    arp[6..8].copy_from_slice(&2u16.to_be_bytes());
    arp[8..14].copy_from_slice(&our_mac);
    arp[14..18].copy_from_slice(&our_ip.octets());
    arp[18..24].copy_from_slice(&to_mac);
    arp[24..28].copy_from_slice(&to_ip.octets());
    Some(ETH_HDR + ARP_LEN)
}

/// One TCP segment to build.
#[derive(Debug, Clone, Copy)]
pub struct TcpOut<'a> {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    pub ip_id: u16,
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// Sent as the MSS option (SYN-ACK).
    pub mss: Option<u16>,
    pub payload: &'a [u8],
}

/// Length of the frame [`write_tcp`] builds for `payload_len` bytes.
pub fn tcp_frame_len(payload_len: usize, with_mss: bool) -> usize {
    ETH_HDR + IPV4_HDR + TCP_HDR + if with_mss { 4 } else { 0 } + payload_len
}

/// Writes an Ethernet/IPv4/TCP frame with valid checksums; returns its length (`None` if `buf`
/// is too small).
pub fn write_tcp(buf: &mut [u8], s: &TcpOut<'_>) -> Option<usize> {
    let opt_len = if s.mss.is_some() { 4 } else { 0 };
    let tcp_len = TCP_HDR + opt_len + s.payload.len();
    let total = IPV4_HDR + tcp_len;
    let ip_total = u16::try_from(total).ok()?;
    let frame = buf.get_mut(..ETH_HDR + total)?;
    eth(frame, s.dst_mac, s.src_mac, ETHERTYPE_IPV4);
    let (ip, tcp) = frame[ETH_HDR..].split_at_mut(IPV4_HDR);
    ip.copy_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, IPPROTO_TCP, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    ip[2..4].copy_from_slice(&ip_total.to_be_bytes());
    ip[4..6].copy_from_slice(&s.ip_id.to_be_bytes());
    ip[12..16].copy_from_slice(&s.src_ip.octets());
    ip[16..20].copy_from_slice(&s.dst_ip.octets());
    let c = checksum(&[ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());

    tcp[0..2].copy_from_slice(&s.src_port.to_be_bytes());
    tcp[2..4].copy_from_slice(&s.dst_port.to_be_bytes());
    tcp[4..8].copy_from_slice(&s.seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&s.ack.to_be_bytes());
    tcp[12] = (((TCP_HDR + opt_len) / 4) as u8) << 4;
    tcp[13] = s.flags;
    tcp[14..16].copy_from_slice(&s.window.to_be_bytes());
    tcp[16..20].fill(0);
    if let Some(mss) = s.mss {
        tcp[20..22].copy_from_slice(&[2, 4]);
        tcp[22..24].copy_from_slice(&mss.to_be_bytes());
    }
    tcp[TCP_HDR + opt_len..].copy_from_slice(s.payload);
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&s.src_ip.octets());
    pseudo[4..8].copy_from_slice(&s.dst_ip.octets());
    pseudo[9] = IPPROTO_TCP;
    pseudo[10..12].copy_from_slice(&(tcp_len as u16).to_be_bytes());
    let c = checksum(&[&pseudo, tcp]);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    Some(ETH_HDR + total)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MMDS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
    const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    #[test]
    fn checksum_known_values() {
        // RFC 1071's example words.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&[&data]), !0xddf2);
        // Odd lengths pad with zero; a header with its checksum filled in sums to 0.
        assert_eq!(checksum(&[&[0xab]]), !0xab00);
    }

    #[test]
    fn built_tcp_frames_parse_back_with_valid_checksums() {
        let mut buf = [0u8; 200];
        let out = TcpOut {
            src_mac: [2; 6],
            dst_mac: [4; 6],
            src_ip: GUEST,
            dst_ip: MMDS,
            ip_id: 7,
            src_port: 40000,
            dst_port: 80,
            seq: 0xdead_beef,
            ack: 5,
            flags: SYN | ACK,
            window: 1000,
            mss: Some(1460),
            payload: b"hello",
        };
        let n = write_tcp(&mut buf, &out).unwrap();
        assert_eq!(n, tcp_frame_len(5, true));
        let frame = &buf[..n];
        assert_eq!(checksum(&[&frame[ETH_HDR..ETH_HDR + IPV4_HDR]]), 0, "IPv4 header checksum");
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&GUEST.octets());
        pseudo[4..8].copy_from_slice(&MMDS.octets());
        pseudo[9] = IPPROTO_TCP;
        pseudo[10..12].copy_from_slice(&((n - ETH_HDR - IPV4_HDR) as u16).to_be_bytes());
        assert_eq!(checksum(&[&pseudo, &frame[ETH_HDR + IPV4_HDR..]]), 0, "TCP checksum");
        match parse(frame, MMDS) {
            Frame::Tcp(t) => {
                assert_eq!(
                    (t.src_ip, t.src_port, t.dst_port, t.seq, t.ack),
                    (GUEST, 40000, 80, 0xdead_beef, 5)
                );
                assert_eq!(
                    (t.flags, t.window, t.mss, t.payload),
                    (SYN | ACK, 1000, Some(1460), &b"hello"[..])
                );
                assert_eq!(t.src_mac, [2; 6]);
            }
            f => panic!("{f:?}"),
        }
        assert_eq!(parse(frame, GUEST), Frame::NotOurs, "another destination");
        assert!(write_tcp(&mut [0u8; 40], &out).is_none(), "too small a buffer");
    }

    #[test]
    fn arp_requests_for_the_address_only() {
        let mut req = [0u8; 42];
        eth(&mut req, [0xff; 6], [2; 6], ETHERTYPE_ARP);
        req[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        req[22..28].copy_from_slice(&[2; 6]);
        req[28..32].copy_from_slice(&GUEST.octets());
        req[38..42].copy_from_slice(&MMDS.octets());
        assert_eq!(parse(&req, MMDS), Frame::ArpRequest { sender_mac: [2; 6], sender_ip: GUEST });
        assert_eq!(parse(&req, Ipv4Addr::new(169, 254, 1, 1)), Frame::NotOurs);
        let mut reply = req;
        reply[21] = 2;
        assert_eq!(parse(&reply, MMDS), Frame::NotOurs, "ARP replies are not answered");
        let mut out = [0u8; 64];
        let n = write_arp_reply(&mut out, [6; 6], MMDS, [2; 6], GUEST).unwrap();
        assert_eq!(&out[..6], &[2; 6]);
        assert_eq!(&out[20..22], &[0, 2]);
        assert_eq!(&out[28..32], &MMDS.octets());
        assert_eq!(n, 42);
    }

    #[test]
    fn truncated_and_odd_frames_never_panic() {
        let mut buf = [0u8; 200];
        let n = write_tcp(
            &mut buf,
            &TcpOut {
                src_mac: [2; 6],
                dst_mac: [4; 6],
                src_ip: GUEST,
                dst_ip: MMDS,
                ip_id: 1,
                src_port: 1,
                dst_port: 80,
                seq: 1,
                ack: 1,
                flags: ACK,
                window: 1,
                mss: None,
                payload: b"abc",
            },
        )
        .unwrap();
        for len in 0..=n {
            let _ = parse(&buf[..len], MMDS);
        }
        // Every byte value at every header position.
        for pos in 12..ETH_HDR + IPV4_HDR + TCP_HDR {
            for v in [0u8, 1, 0x0f, 0x45, 0x4f, 0xf0, 0xff] {
                let mut f = buf;
                f[pos] = v;
                let _ = parse(&f[..n], MMDS);
            }
        }
        // UDP or a fragment to the MMDS address is dropped, not forwarded.
        let mut udp = buf;
        udp[ETH_HDR + 9] = 17;
        assert_eq!(parse(&udp[..n], MMDS), Frame::Drop);
        let mut frag = buf;
        frag[ETH_HDR + 6] = 0x20;
        assert_eq!(parse(&frag[..n], MMDS), Frame::Drop);
    }
}
