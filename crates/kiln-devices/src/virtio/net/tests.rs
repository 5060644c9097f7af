//! virtio-net tests: crafted queues against a datagram socket standing in for the tap (no
//! privileges needed), then a real tap in a private network namespace (root only; skipped
//! loudly otherwise).

use std::fs::File;
use std::os::unix::io::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::interrupt::{CountingIrq, VIRTIO_MMIO_INT_VRING};
use kiln_mmds::MmdsStack;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const MEM_SIZE: usize = 0x40_0000;
const RX_BASE: u64 = 0x1000;
const TX_BASE: u64 = 0x4000;
/// Where tests put buffers.
const DATA: u64 = 0x10_0000;
const MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x02];

/// Where one guest memory region ends and the next begins.
const REGION_EDGE: u64 = 0x20_0000;
/// A hole in guest memory.
const HOLE: u64 = 0x30_0000;

/// Three regions: two adjacent ones (a buffer may span both), then a hole, then the last.
fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[
        (GuestAddress(0), REGION_EDGE as usize),
        (GuestAddress(REGION_EDGE), (HOLE - REGION_EDGE) as usize),
        (GuestAddress(HOLE + 0x8_0000), MEM_SIZE - (HOLE + 0x8_0000) as usize),
    ])
    .unwrap()
}

/// The driver side of one split queue: descriptor table at `base`, available ring at
/// `base + 0x1000`, used ring at `base + 0x2000`.
struct Ring {
    base: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    seen_used: u16,
}

impl Ring {
    fn new(base: u64, size: u16) -> Self {
        Ring { base, size, next_desc: 0, avail_idx: 0, seen_used: 0 }
    }

    fn desc(&self) -> u64 {
        self.base
    }
    fn avail(&self) -> u64 {
        self.base + 0x1000
    }
    fn used(&self) -> u64 {
        self.base + 0x2000
    }

    fn queue(&self, event_idx: bool) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.try_set_desc_table_address(GuestAddress(self.desc())).unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail())).unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used())).unwrap();
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }

    fn write_desc(&self, mem: &GuestMemory, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc() + 16 * u64::from(idx);
        mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
        mem.write_obj(len.to_le(), GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
        mem.write_obj(next.to_le(), GuestAddress(at + 14)).unwrap();
    }

    fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(self.avail() + 4 + 2 * slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail() + 2)).unwrap();
    }

    fn set_avail_idx(&mut self, mem: &GuestMemory, idx: u16) {
        self.avail_idx = idx;
        mem.write_obj(idx.to_le(), GuestAddress(self.avail() + 2)).unwrap();
    }

    /// Writes a chain of `(addr, len, flags)` descriptors and publishes it; returns the head.
    fn add_chain(&mut self, mem: &GuestMemory, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let last = i + 1 == descs.len();
            let next = (idx + 1) % self.size;
            let flags = if last { flags } else { flags | F_NEXT };
            self.write_desc(mem, idx, addr, len, flags, if last { 0 } else { next });
        }
        self.next_desc = (head + descs.len() as u16) % self.size;
        self.publish(mem, head);
        head
    }

    fn used_idx(&self, mem: &GuestMemory) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(self.used() + 2)).unwrap())
    }

    fn used_elem(&self, mem: &GuestMemory, n: u16) -> (u32, u32) {
        let at = self.used() + 4 + 8 * u64::from(n % self.size);
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }

    /// Used elements added since the last call.
    fn take_used(&mut self, mem: &GuestMemory) -> Vec<(u32, u32)> {
        let end = self.used_idx(mem);
        let mut out = Vec::new();
        while self.seen_used != end {
            out.push(self.used_elem(mem, self.seen_used));
            self.seen_used = self.seen_used.wrapping_add(1);
        }
        out
    }
}

fn bytes(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn config(mac: Option<[u8; 6]>, mtu: Option<u16>) -> NetConfig {
    NetConfig { id: "eth0".into(), tap_name: "faketap".into(), guest_mac: mac, mtu }
}

/// A device on a datagram socket pair: the test holds the "host" end.
struct H {
    net: Net,
    mem: GuestMemory,
    rx: Ring,
    tx: Ring,
    irq: Arc<CountingIrq>,
    host: UnixDatagram,
}

fn harness_with(features: u64, size: u16) -> H {
    let (dev_end, host) = UnixDatagram::pair().unwrap();
    dev_end.set_nonblocking(true).unwrap();
    host.set_nonblocking(true).unwrap();
    let file = File::from(OwnedFd::from(dev_end));
    let mut net = Net::with_fake_tap(config(Some(MAC), Some(1500)), file).unwrap();
    let mem = memory();
    let (rx, tx) = (Ring::new(RX_BASE, size), Ring::new(TX_BASE, size));
    let irq = Arc::new(CountingIrq::default());
    let acked = net.avail_features() & features;
    let event_idx = acked & VIRTIO_RING_F_EVENT_IDX != 0;
    net.activate(
        mem.clone(),
        VirtioInterrupt::new(irq.clone()),
        acked,
        vec![rx.queue(event_idx), tx.queue(event_idx)],
    )
    .unwrap();
    H { net, mem, rx, tx, irq, host }
}

/// Everything but EVENT_IDX and MRG_RXBUF.
fn plain() -> u64 {
    !(VIRTIO_RING_F_EVENT_IDX | VIRTIO_NET_F_MRG_RXBUF)
}

fn vnet_hdr(num_buffers: u16) -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    h[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    h
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

impl H {
    fn tap_listed(&self) -> bool {
        self.net.host_fds().iter().any(|&(_, t)| t == TAP_TOKEN)
    }

    fn tap_fd(&self) -> RawFd {
        self.net.tap.raw_fd()
    }

    /// Kicks are off: the device looks at the tx ring again when its poll timer fires.
    fn tx_polling(&self) -> bool {
        let listed = self.net.host_fds().iter().any(|&(_, t)| t == TX_POLL_TOKEN);
        let armed = self.net.tx_poll.is_armed().unwrap();
        assert_eq!(self.net.tx_polling, armed, "the flag follows the timer");
        listed && armed
    }

    /// The poll timer fires (the test does not wait for it).
    fn tx_poll_fires(&mut self) {
        self.net.process_host_event(TX_POLL_TOKEN);
    }

    /// The host sends a frame towards the guest (vnet header + frame).
    fn host_send(&self, frame: &[u8]) -> Vec<u8> {
        let mut msg = vnet_hdr(0).to_vec();
        msg.extend_from_slice(frame);
        self.host.send(&msg).unwrap();
        msg
    }

    fn host_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70_000];
        match self.host.recv(&mut buf) {
            Ok(n) => Some(buf[..n].to_vec()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("recv: {e}"),
        }
    }
}

#[test]
fn parse_and_format_mac() {
    assert_eq!(parse_mac("06:00:ac:10:00:02").unwrap(), MAC);
    assert_eq!(parse_mac("06-00-AC-10-00-02").unwrap(), MAC);
    assert_eq!(format_mac(&MAC), "06:00:ac:10:00:02");
    for bad in [
        "",
        "06:00:ac:10:00",
        "06:00:ac:10:00:02:03",
        "6:00:ac:10:00:02",
        "06:00:ac:10:00:0g",
        "060:0:ac:10:00:02",
    ] {
        assert!(matches!(parse_mac(bad), Err(NetError::InvalidMac { .. })), "{bad:?}");
    }
}

#[test]
fn config_is_checked() {
    let sock = || File::from(OwnedFd::from(UnixDatagram::pair().unwrap().0));
    assert!(matches!(
        Net::with_fake_tap(config(Some([1, 0, 0, 0, 0, 1]), None), sock()),
        Err(NetError::InvalidMac { .. })
    ));
    assert!(matches!(
        Net::with_fake_tap(config(Some([0; 6]), None), sock()),
        Err(NetError::InvalidMac { .. })
    ));
    assert!(matches!(Net::with_fake_tap(config(None, Some(67)), sock()), Err(NetError::InvalidMtu(67))));
    for name in ["", "0123456789abcdef", "a/b", "a b", ".."] {
        assert!(matches!(tap::check_name(name), Err(NetError::InvalidTapName { .. })), "{name:?}");
    }
    tap::check_name("tap0").unwrap();
    tap::check_name("0123456789abcde").unwrap();
}

#[test]
fn features_and_config_space() {
    let sock = || File::from(OwnedFd::from(UnixDatagram::pair().unwrap().0));
    let net = Net::with_fake_tap(config(Some(MAC), Some(9000)), sock()).unwrap();
    assert_eq!(net.device_type(), device_type::NET);
    assert_eq!(net.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    let f = net.avail_features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
    ] {
        assert_ne!(f & bit, 0, "feature {bit:#x}");
    }
    let mut cfg = [0xffu8; 16];
    net.read_config(0, &mut cfg);
    assert_eq!(&cfg[0..6], &MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), VIRTIO_NET_S_LINK_UP);
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1, "max_virtqueue_pairs");
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 9000);
    assert_eq!(&cfg[12..], &[0xff; 4], "bytes past the config space are left alone");
    // Partial and out-of-range reads.
    let mut two = [0u8; 2];
    net.read_config(10, &mut two);
    assert_eq!(u16::from_le_bytes(two), 9000);
    let mut one = [0x55u8; 1];
    net.read_config(12, &mut one);
    net.read_config(u64::MAX, &mut one);
    assert_eq!(one, [0x55]);

    let net = Net::with_fake_tap(config(None, None), sock()).unwrap();
    assert_eq!(net.avail_features() & (VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU), 0);
    let mut cfg = [0xffu8; 12];
    net.read_config(0, &mut cfg);
    assert_eq!(&cfg[0..6], &[0; 6]);
    assert_eq!(&cfg[10..12], &[0; 2]);
}

#[test]
fn offloads_follow_the_guest() {
    let sock = File::from(OwnedFd::from(UnixDatagram::pair().unwrap().0));
    let net = Net::with_fake_tap(config(None, None), sock).unwrap();
    assert_eq!(net.offloads_for(0), 0);
    // TSO without GUEST_CSUM is not allowed.
    assert_eq!(net.offloads_for(VIRTIO_NET_F_GUEST_TSO4), 0);
    assert_eq!(
        net.offloads_for(VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6),
        tap::TUN_F_CSUM | tap::TUN_F_TSO4 | tap::TUN_F_TSO6
    );
}

#[test]
fn tx_frames_reach_the_tap_and_batch_one_interrupt() {
    let mut h = harness_with(plain(), 16);
    let f1 = frame(60, 1);
    let f2 = frame(1514, 2);
    // Header and frame in separate descriptors; then header+frame in one; then a frame split
    // across three descriptors with the header split too.
    h.mem.write_slice(&vnet_hdr(0), GuestAddress(DATA)).unwrap();
    h.mem.write_slice(&f1, GuestAddress(DATA + 0x100)).unwrap();
    h.tx.add_chain(&h.mem, &[(DATA, 12, 0), (DATA + 0x100, 60, 0)]);
    let mut whole = vnet_hdr(0).to_vec();
    whole.extend_from_slice(&f2);
    h.mem.write_slice(&whole, GuestAddress(DATA + 0x1000)).unwrap();
    h.tx.add_chain(&h.mem, &[(DATA + 0x1000, whole.len() as u32, 0)]);
    h.tx.add_chain(&h.mem, &[(DATA + 0x1000, 5, 0), (DATA + 0x1005, 100, 0), (DATA + 0x1069, 1421, 0)]);
    h.net.process_queue(TX_QUEUE);
    assert_eq!(h.tx.take_used(&h.mem), vec![(0, 0), (2, 0), (3, 0)]);
    assert_eq!(h.irq.count(), 1, "one interrupt for the batch");
    let mut expect1 = vnet_hdr(0).to_vec();
    expect1.extend_from_slice(&f1);
    assert_eq!(h.host_recv().unwrap(), expect1);
    assert_eq!(h.host_recv().unwrap(), whole);
    assert_eq!(h.host_recv().unwrap(), whole);
    assert!(h.host_recv().is_none());
    let m = h.net.metrics().snapshot();
    assert_eq!((m.tx_packets, m.tx_bytes, m.tx_dropped), (3, 60 + 1514 * 2, 0));
}

#[test]
fn a_tx_pass_delivers_the_hosts_answers_under_the_same_interrupt() {
    // With event-idx both queues want an interrupt for their next used buffer (used_event 0).
    let mut h = harness_with(u64::MAX, 16);
    h.rx.add_chain(&h.mem, &[(DATA, 2048, F_WRITE)]);
    let mut msg = vnet_hdr(0).to_vec();
    msg.extend_from_slice(&frame(1514, 5));
    h.mem.write_slice(&msg, GuestAddress(DATA + 0x1000)).unwrap();
    h.tx.add_chain(&h.mem, &[(DATA + 0x1000, msg.len() as u32, 0)]);
    // The host's answer (an ACK) is queued on the tap by the time the guest's frame is written.
    let ack = frame(54, 6);
    h.host_send(&ack);
    h.net.process_queue(TX_QUEUE);
    assert_eq!(h.host_recv().unwrap(), msg);
    assert_eq!(h.tx.take_used(&h.mem), vec![(0, 0)]);
    assert_eq!(h.rx.take_used(&h.mem), vec![(0, (VNET_HDR_LEN + ack.len()) as u32)], "answer delivered");
    assert_eq!(bytes(&h.mem, DATA + VNET_HDR_LEN as u64, ack.len()), ack);
    assert_eq!(h.irq.count(), 1, "one interrupt for both queues");
    // Nothing is left for the tap event that follows.
    h.net.process_host_event(TAP_TOKEN);
    assert_eq!(h.irq.count(), 1);
    // A tx pass that sent nothing leaves the tap alone.
    h.rx.add_chain(&h.mem, &[(DATA + 0x2000, 2048, F_WRITE)]);
    h.host_send(&frame(54, 7));
    h.net.process_queue(TX_QUEUE);
    assert_eq!(h.rx.take_used(&h.mem), vec![]);
    assert_eq!(h.irq.count(), 1);
}

/// The driver's avail_event (event-idx): it notifies when it publishes the chain at that index.
fn avail_event(h: &H) -> u16 {
    u16::from_le(h.mem.read_obj(GuestAddress(h.tx.used() + 4 + 8 * u64::from(h.tx.size))).unwrap())
}

#[test]
fn tx_keeps_kicks_off_and_polls_the_ring_while_the_guest_keeps_sending() {
    let mut h = harness_with(u64::MAX, 16);
    let mut msg = vnet_hdr(0).to_vec();
    msg.extend_from_slice(&frame(1514, 8));
    h.mem.write_slice(&msg, GuestAddress(DATA)).unwrap();
    // The driver publishes chain 0 and kicks (avail_event 0 asked for it).
    assert_eq!(avail_event(&h), 0);
    h.tx.add_chain(&h.mem, &[(DATA, msg.len() as u32, 0)]);
    h.net.process_queue(TX_QUEUE);
    assert_eq!(h.tx.take_used(&h.mem), vec![(0, 0)]);
    assert_eq!(h.host_recv().unwrap(), msg);
    // Kicks stay off: avail_event was not moved on, so chain 1 comes without a kick...
    assert!(h.tx_polling());
    assert_eq!(avail_event(&h), 0);
    h.tx.add_chain(&h.mem, &[(DATA, msg.len() as u32, 0)]);
    h.tx.add_chain(&h.mem, &[(DATA, msg.len() as u32, 0)]);
    // ...and the poll takes both.
    h.tx_poll_fires();
    assert_eq!(h.tx.take_used(&h.mem), vec![(1, 0), (2, 0)]);
    assert_eq!((h.host_recv().unwrap(), h.host_recv().unwrap()), (msg.clone(), msg.clone()));
    assert!(h.tx_polling());
    assert_eq!(avail_event(&h), 0);
    // A poll that finds nothing turns kicks back on: the next chain (3) will notify.
    h.tx_poll_fires();
    assert!(!h.tx_polling());
    assert_eq!(avail_event(&h), 3);
    assert!(h.host_recv().is_none());
    let m = h.net.metrics();
    assert_eq!(m.no_tx_avail_buffer.get(), 0, "polls are not kicks");
    assert_eq!(m.tx_packets.get(), 3);
    // A stale timer expiry after that does nothing.
    h.tx.add_chain(&h.mem, &[(DATA, msg.len() as u32, 0)]);
    h.tx_poll_fires();
    assert_eq!(h.tx.take_used(&h.mem), vec![]);
    h.net.process_queue(TX_QUEUE);
    assert_eq!(h.tx.take_used(&h.mem), vec![(3, 0)]);
    assert!(h.tx_polling());
}

#[test]
fn tx_buffers_spanning_memory_regions() {
    let mut h = harness_with(plain(), 16);
    let mut msg = vnet_hdr(0).to_vec();
    msg.extend_from_slice(&frame(3000, 8));
    let start = REGION_EDGE - 1000;
    h.mem.write_slice(&msg, GuestAddress(start)).unwrap();
    h.tx.add_chain(&h.mem, &[(start, msg.len() as u32, 0)]);
    // Running into the hole after the second region.
    h.tx.add_chain(&h.mem, &[(HOLE - 100, 200, 0)]);
    h.net.process_queue(TX_QUEUE);
    assert_eq!(h.tx.take_used(&h.mem), vec![(0, 0), (1, 0)]);
    assert_eq!(h.host_recv().unwrap(), msg);
    assert!(h.host_recv().is_none());
    let m = h.net.metrics().snapshot();
    assert_eq!((m.tx_packets, m.tx_invalid_chains), (1, 1));
    // rx the other way round: a buffer across the region edge, one running into the hole.
    h.rx.add_chain(&h.mem, &[(HOLE - 100, 2000, F_WRITE)]);
    h.rx.add_chain(&h.mem, &[(start, 4000, F_WRITE)]);
    let f = frame(3000, 9);
    h.host_send(&f);
    h.net.process_host_event(TAP_TOKEN);
    assert_eq!(h.rx.take_used(&h.mem), vec![(0, 0), (1, 3012)]);
    assert_eq!(bytes(&h.mem, start + 12, 3000), f);
}

#[test]
fn malformed_tx_chains_complete_without_sending() {
    let mut h = harness_with(plain(), 16);
    h.mem.write_slice(&vnet_hdr(0), GuestAddress(DATA)).unwrap();
    // Device-writable descriptor.
    h.tx.add_chain(&h.mem, &[(DATA, 12, 0), (DATA + 0x100, 60, F_WRITE)]);
    // Outside guest memory, and wrapping around the address space.
    h.tx.add_chain(&h.mem, &[(DATA, 12, 0), (MEM_SIZE as u64 - 10, 60, 0)]);
    h.tx.add_chain(&h.mem, &[(u64::MAX - 4, 60, 0)]);
    // Header only; empty.
    h.tx.add_chain(&h.mem, &[(DATA, 12, 0)]);
    h.tx.add_chain(&h.mem, &[(DATA, 0, 0)]);
    // Too long: 12 + 65562 + 1.
    h.tx.add_chain(&h.mem, &[(DATA, 12, 0), (DATA + 0x100, 65_563, 0)]);
    h.net.process_queue(TX_QUEUE);
    assert_eq!(h.tx.take_used(&h.mem).len(), 6);
    assert!(h.host_recv().is_none());
    // A looping chain: descriptor 15 points at itself.
    h.tx.write_desc(&h.mem, 15, DATA, 100, F_NEXT, 15);
    h.tx.publish(&h.mem, 15);
    // The longest allowed frame passes.
    h.tx.add_chain(&h.mem, &[(DATA, 12, 0), (DATA + 0x100, 65_562, 0)]);
    h.net.process_queue(TX_QUEUE);
    let used = h.tx.take_used(&h.mem);
    assert_eq!(used.len(), 2);
    assert!(used.iter().all(|&(_, len)| len == 0));
    let got = h.host_recv();
    // The looping chain gathers 16 x 100 bytes and is sent as garbage or refused; either way
    // nothing hangs. The big frame comes through.
    let mut got = got.into_iter().chain(std::iter::from_fn(|| h.host_recv())).collect::<Vec<_>>();
    got.retain(|m| m.len() == 12 + 65_562);
    assert_eq!(got.len(), 1);
    assert!(!h.net.needs_reset());
    let m = h.net.metrics().snapshot();
    assert!(m.tx_invalid_chains >= 6, "{m:?}");
    assert_eq!(m.tx_dropped, m.tx_invalid_chains + m.tx_tap_errors);
}

#[test]
fn rx_delivers_into_one_chain() {
    let mut h = harness_with(plain(), 16);
    h.rx.add_chain(&h.mem, &[(DATA, 12, F_WRITE), (DATA + 0x100, 1514, F_WRITE)]);
    h.rx.add_chain(&h.mem, &[(DATA + 0x1000, 1526, F_WRITE)]);
    let f1 = frame(100, 3);
    let f2 = frame(1514, 4);
    h.host_send(&f1);
    h.host_send(&f2);
    assert!(h.tap_listed());
    h.net.process_host_event(TAP_TOKEN);
    assert_eq!(h.rx.take_used(&h.mem), vec![(0, 112), (2, 1526)]);
    assert_eq!(h.irq.count(), 1);
    assert_eq!(bytes(&h.mem, DATA, 12), vnet_hdr(1), "num_buffers is 1");
    assert_eq!(bytes(&h.mem, DATA + 0x100, 100), f1);
    assert_eq!(bytes(&h.mem, DATA + 0x1000, 12), vnet_hdr(1));
    assert_eq!(bytes(&h.mem, DATA + 0x100c, 1514), f2);
    let m = h.net.metrics().snapshot();
    assert_eq!((m.rx_packets, m.rx_bytes, m.rx_dropped), (2, 1614, 0));
    assert!(h.tap_listed());
}

#[test]
fn rx_frame_larger_than_the_chain_is_dropped_and_the_chain_reused() {
    let mut h = harness_with(plain(), 16);
    h.rx.add_chain(&h.mem, &[(DATA, 200, F_WRITE)]);
    h.host_send(&frame(500, 1));
    let small = frame(150, 2);
    h.host_send(&small);
    h.net.process_host_event(TAP_TOKEN);
    assert_eq!(h.rx.take_used(&h.mem), vec![(0, 162)]);
    assert_eq!(bytes(&h.mem, DATA + 12, 150), small);
    let m = h.net.metrics().snapshot();
    assert_eq!((m.rx_packets, m.rx_dropped), (1, 1));
}

#[test]
fn rx_mergeable_buffers() {
    let mut h = harness_with(u64::MAX, 16);
    assert_ne!(h.net.acked_features() & VIRTIO_NET_F_MRG_RXBUF, 0);
    for i in 0..4 {
        h.rx.add_chain(&h.mem, &[(DATA + i * 0x1000, 100, F_WRITE)]);
    }
    let f = frame(238, 9); // 250 bytes with the header: 100 + 100 + 50.
    h.host_send(&f);
    h.net.process_host_event(TAP_TOKEN);
    assert_eq!(h.rx.take_used(&h.mem), vec![(0, 100), (1, 100), (2, 50)]);
    let mut got = bytes(&h.mem, DATA, 100);
    got.extend(bytes(&h.mem, DATA + 0x1000, 100));
    got.extend(bytes(&h.mem, DATA + 0x2000, 50));
    assert_eq!(&got[..12], &vnet_hdr(3));
    assert_eq!(&got[12..], &f[..]);
    // Needs two buffers, only one is left: the frame waits, the chain is given back, the tap
    // is no longer watched.
    h.host_send(&frame(150, 1));
    h.net.process_host_event(TAP_TOKEN);
    assert!(h.rx.take_used(&h.mem).is_empty());
    assert!(!h.tap_listed());
    h.rx.add_chain(&h.mem, &[(DATA + 0x4000, 100, F_WRITE)]);
    h.net.process_queue(RX_QUEUE);
    assert_eq!(h.rx.take_used(&h.mem), vec![(3, 100), (4, 62)]);
    assert_eq!(&bytes(&h.mem, DATA + 0x3000, 12), &vnet_hdr(2));
    assert!(h.tap_listed());
}

#[test]
fn rx_without_buffers_stops_watching_the_tap_until_notified() {
    let mut h = harness_with(u64::MAX, 16);
    assert!(h.tap_listed());
    let f = frame(80, 5);
    h.host_send(&f);
    h.net.process_host_event(TAP_TOKEN);
    assert!(!h.tap_listed(), "no rx buffers: the tap is not watched");
    assert_eq!(h.net.metrics().snapshot().rx_no_buffers, 1);
    // Spurious host events while waiting do nothing.
    h.net.process_host_event(TAP_TOKEN);
    assert_eq!(h.net.metrics().snapshot().rx_no_buffers, 1);
    // With EVENT_IDX the device asked to be told about the next buffer: avail_event = 0.
    let avail_event: u16 = h.mem.read_obj(GuestAddress(h.rx.used() + 4 + 8 * 16)).unwrap();
    assert_eq!(avail_event, 0);
    h.rx.add_chain(&h.mem, &[(DATA, 2048, F_WRITE)]);
    // A second frame arrived meanwhile: the one buffer takes the first, the second waits.
    let f2 = frame(90, 6);
    h.host_send(&f2);
    h.net.process_queue(RX_QUEUE);
    assert_eq!(h.rx.take_used(&h.mem), vec![(0, 92)]);
    assert_eq!(bytes(&h.mem, DATA + 12, 80), f);
    assert!(!h.tap_listed());
    assert_eq!(h.net.metrics().snapshot().rx_no_buffers, 2);
    h.rx.add_chain(&h.mem, &[(DATA + 0x1000, 2048, F_WRITE)]);
    h.net.process_queue(RX_QUEUE);
    assert!(h.tap_listed());
    assert_eq!(h.rx.take_used(&h.mem), vec![(1, 102)]);
    assert_eq!(bytes(&h.mem, DATA + 0x100c, 90), f2);
    // Nothing pending any more: a notify with no new frames is harmless.
    h.net.process_queue(RX_QUEUE);
    assert!(h.tap_listed());
    assert_eq!(h.net.metrics().snapshot().rx_packets, 2);
}

#[test]
fn invalid_rx_chains_are_returned_empty() {
    let mut h = harness_with(plain(), 16);
    h.rx.add_chain(&h.mem, &[(DATA, 2048, 0)]); // device-readable
    h.rx.add_chain(&h.mem, &[(MEM_SIZE as u64 - 100, 2048, F_WRITE)]); // outside memory
    h.rx.add_chain(&h.mem, &[(DATA, 8, F_WRITE)]); // shorter than the header
    h.rx.add_chain(&h.mem, &[(DATA + 0x1000, 2048, F_WRITE)]);
    let f = frame(64, 7);
    h.host_send(&f);
    h.net.process_host_event(TAP_TOKEN);
    assert_eq!(h.rx.take_used(&h.mem), vec![(0, 0), (1, 0), (2, 0), (3, 76)]);
    assert_eq!(bytes(&h.mem, DATA + 0x100c, 64), f);
    assert_eq!(h.net.metrics().snapshot().rx_invalid_chains, 3);
    assert!(!h.net.needs_reset());
}

#[test]
fn bogus_avail_index_breaks_the_device_without_hanging() {
    let mut h = harness_with(plain(), 16);
    h.rx.set_avail_idx(&h.mem, 1000);
    h.host_send(&frame(64, 0));
    h.net.process_host_event(TAP_TOKEN);
    assert!(h.net.needs_reset());
    assert!(h.net.host_fds().is_empty());

    let mut h = harness_with(plain(), 16);
    h.tx.set_avail_idx(&h.mem, 1000);
    h.net.process_queue(TX_QUEUE);
    assert!(h.net.needs_reset());
    assert!(h.net.reset());
    assert!(!h.net.needs_reset());
}

#[test]
fn event_idx_suppresses_interrupts() {
    let mut h = harness_with(u64::MAX, 16);
    // The driver wants an interrupt only after the second used rx buffer: used_event = 1.
    h.mem.write_obj(1u16.to_le(), GuestAddress(h.rx.avail() + 4 + 2 * 16)).unwrap();
    for i in 0..3 {
        h.rx.add_chain(&h.mem, &[(DATA + i * 0x1000, 2048, F_WRITE)]);
    }
    h.host_send(&frame(64, 0));
    h.net.process_host_event(TAP_TOKEN);
    assert_eq!(h.irq.count(), 0);
    h.host_send(&frame(64, 1));
    h.net.process_host_event(TAP_TOKEN);
    assert_eq!(h.irq.count(), 1);
}

#[test]
fn activation_needs_two_queues_and_reset_works() {
    let sock = File::from(OwnedFd::from(UnixDatagram::pair().unwrap().0));
    let mut net = Net::with_fake_tap(config(None, None), sock).unwrap();
    let irq = Arc::new(CountingIrq::default());
    let one = vec![Ring::new(RX_BASE, 16).queue(false)];
    let err = net.activate(memory(), VirtioInterrupt::new(irq), VIRTIO_F_VERSION_1, one);
    assert!(matches!(err, Err(ActivateError::QueueCount { expected: 2, got: 1 })));
    assert!(!net.is_activated());
    assert!(net.host_fds().is_empty());

    let mut h = harness_with(u64::MAX, 16);
    h.host_send(&frame(64, 0));
    h.net.process_host_event(TAP_TOKEN);
    assert!(!h.tap_listed());
    assert!(h.net.reset());
    assert!(!h.net.is_activated());
    assert_eq!(h.net.acked_features(), 0);
    // Notifications and host events after reset are ignored.
    h.net.process_queue(RX_QUEUE);
    h.net.process_queue(TX_QUEUE);
    h.net.process_queue(7);
    h.net.process_host_event(TAP_TOKEN);
    assert!(h.net.host_fds().is_empty());
}

#[test]
fn through_the_mmio_transport() {
    use crate::bus::BusDevice;
    use crate::virtio::mmio::{status::*, MmioTransport};
    let (dev_end, host) = UnixDatagram::pair().unwrap();
    dev_end.set_nonblocking(true).unwrap();
    let net = Net::with_fake_tap(config(Some(MAC), Some(1500)), File::from(OwnedFd::from(dev_end))).unwrap();
    let mem = memory();
    let irq = Arc::new(CountingIrq::default());
    let mut t = MmioTransport::new(mem.clone(), Box::new(net), VirtioInterrupt::new(irq.clone()));
    let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
    let r = |t: &mut MmioTransport, off: u64| {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    };
    assert_eq!(r(&mut t, 0x8), device_type::NET);
    assert_eq!(r(&mut t, 0x100), u32::from_le_bytes([MAC[0], MAC[1], MAC[2], MAC[3]]));
    assert_eq!(r(&mut t, 0x108), 1 | (1500 << 16), "max_virtqueue_pairs, mtu");
    assert!(t.host_fds().is_empty(), "nothing watched before activation");
    w(&mut t, 0x70, ACKNOWLEDGE);
    w(&mut t, 0x70, ACKNOWLEDGE | DRIVER);
    for sel in 0..2 {
        w(&mut t, 0x14, sel);
        let f = r(&mut t, 0x10);
        w(&mut t, 0x24, sel);
        w(&mut t, 0x20, f);
    }
    w(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(r(&mut t, 0x70), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    let (mut rx, mut tx) = (Ring::new(RX_BASE, 16), Ring::new(TX_BASE, 16));
    for (sel, ring) in [(0, &rx), (1, &tx)] {
        w(&mut t, 0x30, sel);
        assert_eq!(r(&mut t, 0x34), u32::from(QUEUE_SIZE));
        w(&mut t, 0x38, 16);
        w(&mut t, 0x80, ring.desc() as u32);
        w(&mut t, 0x90, ring.avail() as u32);
        w(&mut t, 0xa0, ring.used() as u32);
        w(&mut t, 0x44, 1);
    }
    w(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(t.is_activated());
    assert_ne!(t.acked_features() & VIRTIO_NET_F_MRG_RXBUF, 0);
    let mut tokens: Vec<u32> = t.host_fds().iter().map(|&(_, t)| t).collect();
    tokens.sort();
    assert_eq!(tokens, [TAP_TOKEN, TX_POLL_TOKEN]);

    // tx through the notify register.
    let mut msg = vnet_hdr(0).to_vec();
    msg.extend_from_slice(&frame(60, 1));
    mem.write_slice(&msg, GuestAddress(DATA)).unwrap();
    tx.add_chain(&mem, &[(DATA, msg.len() as u32, 0)]);
    w(&mut t, 0x50, 1);
    assert_eq!(tx.take_used(&mem), vec![(0, 0)]);
    let mut buf = [0u8; 100];
    let n = host.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &msg[..]);
    assert_eq!(irq.count(), 1);
    assert_eq!(r(&mut t, 0x60), VIRTIO_MMIO_INT_VRING);

    // rx through a host event, before the driver acknowledged the interrupt: the pending one
    // covers it (the driver looks at every queue after acknowledging).
    rx.add_chain(&mem, &[(DATA + 0x1000, 1526, F_WRITE)]);
    host.send(&msg).unwrap();
    t.host_event(TAP_TOKEN);
    assert_eq!(rx.take_used(&mem), vec![(0, msg.len() as u32)]);
    assert_eq!(irq.count(), 1);
    // Acknowledged: the next used buffer raises the line again.
    w(&mut t, 0x64, VIRTIO_MMIO_INT_VRING);
    assert_eq!(r(&mut t, 0x60), 0);
    // (With event-idx the driver asks for an interrupt at the next used rx buffer: used_event 1.)
    mem.write_obj(1u16.to_le(), GuestAddress(rx.avail() + 4 + 2 * 16)).unwrap();
    rx.add_chain(&mem, &[(DATA + 0x2000, 1526, F_WRITE)]);
    host.send(&msg).unwrap();
    t.host_event(TAP_TOKEN);
    assert_eq!(rx.take_used(&mem), vec![(1, msg.len() as u32)]);
    assert_eq!(irq.count(), 2);
    assert_eq!(r(&mut t, 0x60), VIRTIO_MMIO_INT_VRING);
    assert_eq!(t.device_as_mut::<Net>().unwrap().metrics().snapshot().rx_packets, 2);

    // Driver reset: nothing is watched any more.
    w(&mut t, 0x70, 0);
    assert!(!t.is_activated());
    assert!(t.host_fds().is_empty());
}

/// Real taps, in a network namespace of their own.
mod real_tap {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
    use std::process::Command;
    use std::time::Duration;

    const TAP: &str = "kilntap0";
    const TAP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
    const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
    const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 2);

    /// Runs `f` on a thread in a fresh network namespace (gone when the thread ends, with the
    /// taps in it). Returns false, after saying why, when that is not possible here.
    fn in_netns(f: impl FnOnce() + Send + 'static) -> bool {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: real tap tests need root");
            return false;
        }
        if !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("SKIPPED: no /dev/net/tun");
            return false;
        }
        std::thread::spawn(move || {
            // SAFETY: unshare only changes this thread's namespaces; no memory is passed.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!("SKIPPED: unshare(CLONE_NEWNET): {}", io::Error::last_os_error());
                return false;
            }
            f();
            true
        })
        .join()
        .unwrap()
    }

    fn ip(args: &[&str]) {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A tap with an address and a static neighbour entry for the guest, IPv6 off (no
    /// router solicitations in the way).
    fn make_tap() {
        tap::create_persistent_tap(TAP).unwrap();
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{TAP}/disable_ipv6"), "1");
        ip(&["link", "set", TAP, "address", &format_mac(&TAP_MAC), "up"]);
        ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);
        ip(&[
            "neigh",
            "replace",
            &GUEST_IP.to_string(),
            "lladdr",
            &format_mac(&MAC),
            "dev",
            TAP,
            "nud",
            "permanent",
        ]);
    }

    /// Attaching turns the tap's carrier on; until the kernel's link watch has acted on that,
    /// the tap has no queueing discipline and drops what the host sends.
    fn wait_for_carrier() {
        for _ in 0..100 {
            let out = Command::new("ip").args(["link", "show", TAP]).output().expect("run ip");
            let text = String::from_utf8_lossy(&out.stdout);
            if text.contains("LOWER_UP") && !text.contains("qdisc noop") {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("tap {TAP} has no carrier after 2 s");
    }

    fn net_on_tap(features: u64) -> H {
        let (_, host) = UnixDatagram::pair().unwrap();
        let mut net = Net::new(NetConfig {
            id: "eth0".into(),
            tap_name: TAP.into(),
            guest_mac: Some(MAC),
            mtu: Some(1500),
        })
        .unwrap();
        wait_for_carrier();
        let mem = memory();
        let (rx, tx) = (Ring::new(RX_BASE, 64), Ring::new(TX_BASE, 64));
        let irq = Arc::new(CountingIrq::default());
        let acked = net.avail_features() & features;
        net.activate(
            mem.clone(),
            VirtioInterrupt::new(irq.clone()),
            acked,
            vec![rx.queue(true), tx.queue(true)],
        )
        .unwrap();
        H { net, mem, rx, tx, irq, host }
    }

    fn checksum(data: &[u8]) -> u16 {
        let mut sum = 0u32;
        for pair in data.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// Ethernet + IPv4 + UDP (no UDP checksum) from the guest to the host.
    fn udp_frame(dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&TAP_MAC);
        f.extend_from_slice(&MAC);
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let total = (20 + 8 + payload.len()) as u16;
        let mut iph = vec![0x45, 0];
        iph.extend_from_slice(&total.to_be_bytes());
        iph.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
        iph.extend_from_slice(&GUEST_IP.octets());
        iph.extend_from_slice(&HOST_IP.octets());
        let c = checksum(&iph);
        iph[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&iph);
        f.extend_from_slice(&40000u16.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(payload);
        f
    }

    fn wait_readable(fd: RawFd) -> bool {
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 3000) };
        n == 1
    }

    #[test]
    fn open_errors() {
        in_netns(|| {
            let cfg =
                |name: &str| NetConfig { id: "x".into(), tap_name: name.into(), guest_mac: None, mtu: None };
            let err = Net::new(cfg("nosuchtap0")).unwrap_err();
            assert!(matches!(err, NetError::TapMissing { .. }), "{err:?}");
            assert!(err.to_string().contains("ip tuntap add nosuchtap0 mode tap"), "{err}");
            let err = Net::new(cfg("lo")).unwrap_err();
            assert!(matches!(err, NetError::NotATap { .. }), "{err:?}");
            let err = Net::new(cfg("bad/name")).unwrap_err();
            assert!(matches!(err, NetError::InvalidTapName { .. }), "{err:?}");
            make_tap();
            let first = Net::new(cfg(TAP)).unwrap();
            let err = Net::new(cfg(TAP)).unwrap_err();
            assert!(matches!(err, NetError::TapBusy { .. }), "{err:?}");
            drop(first);
            // Free again once the first device is gone.
            Net::new(cfg(TAP)).unwrap();
        });
    }

    #[test]
    fn traffic_both_ways() {
        in_netns(|| {
            make_tap();
            let mut h = net_on_tap(u64::MAX);
            let features = h.net.acked_features();
            assert_ne!(features & VIRTIO_NET_F_GUEST_TSO4, 0, "the tap takes TSO offloads");

            // Guest -> host: a UDP datagram put on tx arrives at a socket on the tap's address.
            let sock = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0)).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let port = sock.local_addr().unwrap().port();
            let payload = b"hello from the guest";
            let mut msg = vnet_hdr(0).to_vec();
            msg.extend_from_slice(&udp_frame(port, payload));
            h.mem.write_slice(&msg, GuestAddress(DATA)).unwrap();
            h.tx.add_chain(&h.mem, &[(DATA, 12, 0), (DATA + 12, (msg.len() - 12) as u32, 0)]);
            h.net.process_queue(TX_QUEUE);
            assert_eq!(h.tx.take_used(&h.mem), vec![(0, 0)]);
            let mut buf = [0u8; 100];
            let (n, from) = sock.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], payload);
            assert_eq!(from, std::net::SocketAddr::from((GUEST_IP, 40000)));
            let m = h.net.metrics().snapshot();
            assert_eq!((m.tx_packets, m.tx_dropped), (1, 0), "{m:?}");

            // Checksum offload: a partial checksum (pseudo-header sum) with NEEDS_CSUM, which
            // the tap accepts because the guest was offered VIRTIO_NET_F_CSUM.
            let mut frame = udp_frame(port, b"offloaded");
            let udp_len = (8 + 9) as u16;
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&GUEST_IP.octets());
            pseudo.extend_from_slice(&HOST_IP.octets());
            pseudo.extend_from_slice(&[0, 17]);
            pseudo.extend_from_slice(&udp_len.to_be_bytes());
            let partial = !checksum(&pseudo);
            frame[40..42].copy_from_slice(&partial.to_be_bytes());
            let mut hdr = vnet_hdr(0);
            hdr[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
            hdr[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start: the UDP header
            hdr[8..10].copy_from_slice(&6u16.to_le_bytes()); // csum_offset: its checksum field
            let mut msg2 = hdr.to_vec();
            msg2.extend_from_slice(&frame);
            h.mem.write_slice(&msg2, GuestAddress(DATA)).unwrap();
            h.tx.add_chain(&h.mem, &[(DATA, msg2.len() as u32, 0)]);
            h.net.process_queue(TX_QUEUE);
            assert_eq!(h.tx.take_used(&h.mem), vec![(2, 0)]);
            let (n, _) = sock.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"offloaded");

            // A frame the tap refuses (bad GSO type) is counted, not fatal.
            let mut bad = msg.clone();
            bad[1] = 0x7f;
            h.mem.write_slice(&bad, GuestAddress(DATA)).unwrap();
            h.tx.add_chain(&h.mem, &[(DATA, bad.len() as u32, 0)]);
            h.net.process_queue(TX_QUEUE);
            assert_eq!(h.tx.take_used(&h.mem), vec![(3, 0)]);
            assert_eq!(h.net.metrics().snapshot().tx_tap_errors, 1);
            assert!(!h.net.needs_reset());

            // Host -> guest, with no rx buffers yet: the frame waits, the tap is not watched.
            let tap_fd = h.tap_fd();
            let guest_port = 5555;
            sock.send_to(b"hello guest", SocketAddrV4::new(GUEST_IP, guest_port)).unwrap();
            assert!(wait_readable(tap_fd), "the tap became readable");
            h.net.process_host_event(TAP_TOKEN);
            assert!(!h.tap_listed());
            assert_eq!(h.net.metrics().snapshot().rx_no_buffers, 1);

            // Buffers arrive (mergeable, 1526 bytes each as Linux posts them).
            for i in 0..8 {
                h.rx.add_chain(&h.mem, &[(DATA + 0x1_0000 + i * 0x1000, 1526, F_WRITE)]);
            }
            h.net.process_queue(RX_QUEUE);
            assert!(h.tap_listed());
            let used = h.rx.take_used(&h.mem);
            assert_eq!(used.len(), 1, "{used:?}");
            let (id, len) = used[0];
            let got = bytes(&h.mem, DATA + 0x1_0000 + u64::from(id) * 0x1000, len as usize);
            let hdr = &got[..12];
            assert!(hdr[0] & !3 == 0, "flags: only NEEDS_CSUM/DATA_VALID: {hdr:?}");
            if hdr[0] & 1 != 0 {
                // Checksum left to the guest (it accepted GUEST_CSUM): it must point at UDP's.
                assert_eq!(u16::from_le_bytes([hdr[6], hdr[7]]), 34, "csum_start");
                assert_eq!(u16::from_le_bytes([hdr[8], hdr[9]]), 6, "csum_offset");
            }
            assert_eq!(hdr[1], 0, "no GSO for a small datagram");
            assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1, "num_buffers");
            let eth = &got[12..];
            assert_eq!(&eth[0..6], &MAC);
            assert_eq!(&eth[6..12], &TAP_MAC);
            assert_eq!(&eth[12..14], &[0x08, 0x00]);
            assert_eq!(&eth[14 + 16..14 + 20], &GUEST_IP.octets());
            assert_eq!(u16::from_be_bytes([eth[36], eth[37]]), guest_port);
            assert_eq!(&eth[42..], b"hello guest");
            assert!(h.irq.count() >= 1);

            // A burst lands in order while the tap stays watched.
            for i in 0..5u8 {
                sock.send_to(&[i; 32], SocketAddrV4::new(GUEST_IP, guest_port)).unwrap();
            }
            assert!(wait_readable(tap_fd));
            std::thread::sleep(Duration::from_millis(50));
            h.net.process_host_event(TAP_TOKEN);
            let used = h.rx.take_used(&h.mem);
            assert_eq!(used.len(), 5, "{used:?}");
            for (i, (id, len)) in used.into_iter().enumerate() {
                assert_eq!(len, 12 + 42 + 32);
                let got = bytes(&h.mem, DATA + 0x1_0000 + u64::from(id) * 0x1000 + 12 + 42, 32);
                assert_eq!(got, vec![i as u8; 32]);
            }
            let m = h.net.metrics().snapshot();
            assert_eq!(m.rx_packets, 6, "{m:?}");
            assert_eq!(m.rx_dropped, 0, "{m:?}");
        });
    }

    #[test]
    fn large_datagram_arrives_whole() {
        in_netns(|| {
            make_tap();
            let mut h = net_on_tap(u64::MAX);
            for i in 0..60 {
                h.rx.add_chain(&h.mem, &[(DATA + i * 0x1000, 1526, F_WRITE)]);
            }
            // A 20 KB datagram: as IP fragments, or as one UFO frame spread over mergeable
            // buffers; either way all the bytes come through and nothing is dropped.
            let sock = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0)).unwrap();
            sock.send_to(&vec![0xab; 20_000], SocketAddrV4::new(GUEST_IP, 7)).unwrap();
            let tap_fd = h.tap_fd();
            if !wait_readable(tap_fd) {
                let out = Command::new("ip").args(["-s", "link", "show", TAP]).output().unwrap();
                panic!("{}", String::from_utf8_lossy(&out.stdout));
            }
            std::thread::sleep(Duration::from_millis(50));
            h.net.process_host_event(TAP_TOKEN);
            let m = h.net.metrics().snapshot();
            assert!(m.rx_bytes >= 20_000, "{m:?}");
            assert_eq!(m.rx_dropped, 0, "{m:?}");
        });
    }
}

const MMDS_IP: [u8; 4] = [169, 254, 169, 254];
const GUEST_IP: [u8; 4] = [169, 254, 0, 2];

fn arp_who_has(target: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&GUEST_IP);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f
}

fn tcp_syn(dst: [u8; 4], port: u16) -> Vec<u8> {
    let mut f = kiln_mmds::MMDS_MAC.to_vec();
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&[0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0]);
    f.extend_from_slice(&GUEST_IP);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&40_000u16.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    f
}

#[test]
fn mmds_frames_are_answered_in_the_device_and_never_reach_the_tap() {
    let mut h = harness_with(plain(), 16);
    let store = kiln_mmds::Mmds::shared(kiln_mmds::DEFAULT_SIZE_LIMIT);
    store.lock().unwrap().put(serde_json::json!({"k": "v"})).unwrap();
    h.net.attach_mmds(MmdsStack::new(MMDS_IP.into(), store)).unwrap();
    assert_eq!(h.net.mmds_address(), Some(MMDS_IP.into()));
    assert!(h.net.host_fds().iter().any(|&(_, t)| t == MMDS_TIMER_TOKEN));
    for i in 0..4 {
        h.rx.add_chain(&h.mem, &[(DATA + 0x8000 + i * 0x1000, 1526, F_WRITE)]);
    }

    // ARP who-has the MMDS address, header and frame in separate descriptors: answered.
    h.mem.write_slice(&vnet_hdr(0), GuestAddress(DATA)).unwrap();
    let arp = arp_who_has(MMDS_IP);
    h.mem.write_slice(&arp, GuestAddress(DATA + 0x100)).unwrap();
    h.tx.add_chain(&h.mem, &[(DATA, 12, 0), (DATA + 0x100, arp.len() as u32, 0)]);
    h.net.process_queue(TX_QUEUE);
    assert_eq!(h.tx.take_used(&h.mem), vec![(0, 0)]);
    assert!(h.host_recv().is_none(), "the tap saw an MMDS frame");
    assert_eq!(h.rx.take_used(&h.mem), vec![(0, 12 + 42)]);
    assert_eq!(bytes(&h.mem, DATA + 0x8000, 12), vnet_hdr(1), "no offloads, one buffer");
    let reply = bytes(&h.mem, DATA + 0x800c, 42);
    assert_eq!(&reply[0..6], &MAC, "to the guest");
    assert_eq!(&reply[20..22], &[0, 2], "an ARP reply");
    assert_eq!(&reply[22..28], &kiln_mmds::MMDS_MAC);
    assert_eq!(&reply[28..32], &MMDS_IP);

    // A SYN to port 80 in one descriptor: a SYN-ACK comes back.
    let mut msg = vnet_hdr(0).to_vec();
    msg.extend_from_slice(&tcp_syn(MMDS_IP, 80));
    h.mem.write_slice(&msg, GuestAddress(DATA + 0x1000)).unwrap();
    h.tx.add_chain(&h.mem, &[(DATA + 0x1000, msg.len() as u32, 0)]);
    h.net.process_queue(TX_QUEUE);
    assert!(h.host_recv().is_none());
    let used = h.rx.take_used(&h.mem);
    assert_eq!(used.len(), 1);
    let synack = bytes(&h.mem, DATA + 0x9000 + 12, used[0].1 as usize - 12);
    assert_eq!(&synack[12..14], &[0x08, 0x00]);
    assert_eq!(synack[14 + 20 + 13], 0x12, "SYN|ACK");
    assert_eq!(&synack[14 + 20 + 8..14 + 20 + 12], &2u32.to_be_bytes(), "acknowledges the SYN");

    // ARP for another address and IPv4 to another host go to the tap as before.
    for f in [arp_who_has([169, 254, 0, 1]), tcp_syn([10, 0, 0, 1], 80)] {
        let mut msg = vnet_hdr(0).to_vec();
        msg.extend_from_slice(&f);
        h.mem.write_slice(&msg, GuestAddress(DATA + 0x2000)).unwrap();
        h.tx.add_chain(&h.mem, &[(DATA + 0x2000, msg.len() as u32, 0)]);
        h.net.process_queue(TX_QUEUE);
        assert_eq!(h.host_recv().unwrap(), msg);
    }
    // A malformed chain for MMDS is refused like any other.
    h.tx.add_chain(&h.mem, &[(DATA, 12, 0), (DATA + 0x100, arp.len() as u32, F_WRITE)]);
    h.net.process_queue(TX_QUEUE);
    assert!(h.host_recv().is_none());
    assert!(h.rx.take_used(&h.mem).is_empty());
    assert!(!h.net.needs_reset());
    let m = h.net.metrics().snapshot();
    assert_eq!((m.tx_packets, m.rx_packets, m.tx_invalid_chains), (2, 2, 1));
    // A timer event before the retransmission timeout sends nothing again.
    h.net.process_host_event(MMDS_TIMER_TOKEN);
    assert!(h.rx.take_used(&h.mem).is_empty());
}

fn bucket_limit(size: u64, refill_time_ms: u64, ops: bool) -> Option<RateLimiterConfig> {
    use crate::rate_limiter::TokenBucketConfig;
    let b = Some(TokenBucketConfig { size, one_time_burst: 0, refill_time_ms });
    Some(if ops {
        RateLimiterConfig { bandwidth: None, ops: b }
    } else {
        RateLimiterConfig { bandwidth: b, ops: None }
    })
}

/// Waits for the timer listed with `token` and hands its event to the device.
fn fire(h: &mut H, token: u32) {
    use crate::rate_limiter::wait_readable;
    let fd = h.net.host_fds().into_iter().find(|&(_, t)| t == token).expect("timer listed").0;
    assert!(wait_readable(fd, std::time::Duration::from_millis(500)), "the limiter's timer never fired");
    h.net.process_host_event(token);
}

#[test]
fn tx_rate_limit_holds_chains_in_the_ring_until_the_timer() {
    let mut h = harness_with(plain(), 16);
    // Two frames per 100 ms.
    h.net.update_rate_limiters(None, bucket_limit(2, 100, true)).unwrap();
    assert_eq!(h.net.rate_limiters().1.and_then(|c| c.ops).map(|b| b.size), Some(2));
    let mut msg = vnet_hdr(0).to_vec();
    msg.extend_from_slice(&frame(100, 3));
    h.mem.write_slice(&msg, GuestAddress(DATA)).unwrap();
    for _ in 0..5 {
        h.tx.add_chain(&h.mem, &[(DATA, msg.len() as u32, 0)]);
    }
    let t0 = std::time::Instant::now();
    h.net.process_queue(TX_QUEUE);
    assert_eq!(h.tx.take_used(&h.mem).len(), 2);
    // Kicks while throttled do nothing.
    h.net.process_queue(TX_QUEUE);
    assert!(h.tx.take_used(&h.mem).is_empty());
    let mut sent = 2;
    while sent < 5 {
        fire(&mut h, TX_RATE_LIMITER_TOKEN);
        sent += h.tx.take_used(&h.mem).len();
    }
    let took = t0.elapsed();
    // Three more frames at 20 per second: at least ~100 ms.
    assert!(
        took >= std::time::Duration::from_millis(90) && took < std::time::Duration::from_millis(600),
        "{took:?}"
    );
    let mut got = 0;
    while let Some(m) = h.host_recv() {
        assert_eq!(m, msg);
        got += 1;
    }
    assert_eq!(got, 5, "every frame reached the tap, none twice");
    let m = h.net.metrics();
    assert!(m.tx_rate_limiter_throttled.get() >= 1);
    assert_eq!(m.tx_packets.get(), 5);
}

#[test]
fn rx_rate_limit_keeps_the_frame_and_unlists_the_tap_until_the_timer() {
    let mut h = harness_with(plain(), 16);
    // 1000 bytes per 100 ms: one 800-byte frame fits, the next waits ~80 ms.
    h.net.update_rate_limiters(bucket_limit(1000, 100, false), None).unwrap();
    for i in 0..4 {
        h.rx.add_chain(&h.mem, &[(DATA + 0x1000 * i, 2048, F_WRITE)]);
    }
    let (f1, f2) = (frame(800, 1), frame(800, 2));
    h.host_send(&f1);
    h.host_send(&f2);
    h.net.process_host_event(TAP_TOKEN);
    assert_eq!(h.rx.take_used(&h.mem), vec![(0, 812)]);
    assert!(!h.tap_listed(), "the tap is not watched while the frame waits for tokens");
    assert_eq!(h.net.metrics().rx_rate_limiter_throttled.get(), 1);
    // New rx buffers do not bypass the limit.
    h.rx.add_chain(&h.mem, &[(DATA + 0x8000, 2048, F_WRITE)]);
    h.net.process_queue(RX_QUEUE);
    assert!(h.rx.take_used(&h.mem).is_empty());
    fire(&mut h, RX_RATE_LIMITER_TOKEN);
    assert_eq!(h.rx.take_used(&h.mem), vec![(1, 812)]);
    assert_eq!(bytes(&h.mem, DATA + 0x1000 + 12, 800), f2);
    assert!(h.tap_listed());
    // Lifting the limit (PATCH with zero-sized buckets) lets traffic flow freely.
    h.net.update_rate_limiters(bucket_limit(0, 0, false), None).unwrap();
    assert_eq!(h.net.rate_limiters(), (None, None));
    for seed in 3..6 {
        h.host_send(&frame(800, seed));
    }
    h.net.process_host_event(TAP_TOKEN);
    assert_eq!(h.rx.take_used(&h.mem).len(), 3);
    assert_eq!(h.net.metrics().rx_packets.get(), 5);
}

#[test]
fn invalid_rate_limits_are_refused_and_change_nothing() {
    let mut h = harness_with(plain(), 16);
    h.net.update_rate_limiters(bucket_limit(10, 100, true), None).unwrap();
    let err = h.net.update_rate_limiters(None, bucket_limit(1, u64::MAX, false)).unwrap_err();
    assert!(err.to_string().contains("tx_rate_limiter") && err.to_string().contains("refill_time"), "{err}");
    assert_eq!(h.net.rate_limiters().0.and_then(|c| c.ops).map(|b| b.size), Some(10));
}

#[test]
fn metrics_serialize_under_firecracker_names() {
    let h = harness_with(plain(), 16);
    h.net.metrics().rx_packets.add(3);
    h.net.metrics().tx_dropped.add(1);
    let v = serde_json::to_value(h.net.metrics()).unwrap();
    assert_eq!(v["rx_packets_count"], 3);
    assert_eq!(v["tx_fails"], 1);
    for name in [
        "rx_bytes_count",
        "tx_bytes_count",
        "tx_packets_count",
        "no_rx_avail_buffer",
        "tap_read_fails",
        "tap_write_fails",
        "tx_malformed_frames",
        "rx_rate_limiter_throttled",
        "tx_rate_limiter_throttled",
    ] {
        assert!(v[name].is_u64(), "{name} missing: {v}");
    }
    assert!(v.get("rx_packets").is_none(), "no kiln-only spellings of Firecracker's fields");
}

#[test]
fn mmds_frames_spend_no_tx_rate_limiter_tokens() {
    let mut h = harness_with(plain(), 16);
    let store = kiln_mmds::Mmds::shared(kiln_mmds::DEFAULT_SIZE_LIMIT);
    h.net.attach_mmds(MmdsStack::new(MMDS_IP.into(), store)).unwrap();
    // One frame per second to the tap.
    h.net.update_rate_limiters(None, bucket_limit(1, 1000, true)).unwrap();
    let tokens: Vec<u32> = h.net.host_fds().iter().map(|&(_, t)| t).collect();
    assert!(tokens.contains(&TX_RATE_LIMITER_TOKEN) && tokens.contains(&MMDS_TIMER_TOKEN), "{tokens:?}");
    for i in 0..4 {
        h.rx.add_chain(&h.mem, &[(DATA + 0x8000 + i * 0x1000, 1526, F_WRITE)]);
    }
    let mut arp = vnet_hdr(0).to_vec();
    arp.extend_from_slice(&arp_who_has(MMDS_IP));
    h.mem.write_slice(&arp, GuestAddress(DATA)).unwrap();
    let mut other = vnet_hdr(0).to_vec();
    other.extend_from_slice(&tcp_syn([10, 0, 0, 1], 80));
    h.mem.write_slice(&other, GuestAddress(DATA + 0x1000)).unwrap();
    // Two MMDS frames, the tap frame the bucket pays for, then another that must wait.
    for (addr, len) in
        [(DATA, arp.len()), (DATA, arp.len()), (DATA + 0x1000, other.len()), (DATA + 0x1000, other.len())]
    {
        h.tx.add_chain(&h.mem, &[(addr, len as u32, 0)]);
    }
    h.net.process_queue(TX_QUEUE);
    assert_eq!(h.tx.take_used(&h.mem).len(), 3, "both MMDS frames and one tap frame went");
    assert_eq!(h.host_recv().unwrap(), other);
    assert!(h.host_recv().is_none(), "the second tap frame waits for tokens");
    assert_eq!(h.rx.take_used(&h.mem).len(), 2, "both ARP requests were answered");
    assert_eq!(h.net.metrics().tx_rate_limiter_throttled.get(), 1);
}
