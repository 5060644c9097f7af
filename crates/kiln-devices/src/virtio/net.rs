//! virtio-net backed by a host tap device: one rx/tx queue pair, checksum and segmentation
//! offloads passed through the tap's virtio-net header, mergeable rx buffers.
//!
//! The tap must exist (the network setup creates it: `ip tuntap add NAME mode tap`); the device
//! attaches to it with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a 12-byte header
//! (`virtio_net_hdr_v1`, the layout every VERSION_1 driver uses) and a non-blocking fd. Because
//! the tap and the guest share the header format, frames pass through unchanged in both
//! directions; the offloads the guest accepts decide which offloads the tap may hand us
//! (`TUNSETOFFLOAD`, set on activation).
//!
//! - TX (queue 1): on notify, every available chain is checked (device-readable descriptors
//!   only, at most [`MAX_FRAME_LEN`] plus the header, inside guest memory) and written to the tap
//!   as one frame with `writev` straight from guest memory. A bad chain or a frame the tap refuses is counted and completed; every chain
//!   completes with used length 0. After a pass that sent something, kicks stay off and the ring
//!   is polled again [`TX_POLL_INTERVAL`] later (a timerfd listed with [`TX_POLL_TOKEN`]) for as
//!   long as each look finds new frames; the first empty look turns kicks back on and checks once
//!   more (race-free). A guest streaming data thus exits to kick about once per burst.
//! - RX (queue 0): when the tap is readable ([`VirtioDevice::host_fds`] lists it with
//!   [`TAP_TOKEN`]) or the driver adds buffers, frames are read from the tap into available
//!   chains until the tap is drained. A frame that does not fit (without MRG_RXBUF: in one
//!   chain) is dropped and counted. When the ring has no buffers the frame is kept, the tap is
//!   no longer listed (so a level-triggered loop does not spin) and notifications are enabled;
//!   the driver's next rx notify delivers it and lists the tap again.
//! - Rate limiting (Firecracker's `rx_rate_limiter`/`tx_rate_limiter`): each frame costs one
//!   `ops` token and its length in `bandwidth` tokens. A refused tx chain stays in the ring; a
//!   refused rx frame stays pending and the tap is not listed. Either resumes when its limiter's
//!   timer ([`RX_RATE_LIMITER_TOKEN`], [`TX_RATE_LIMITER_TOKEN`]) fires.
//! - Interrupts: each pass completes everything it can and signals at most once, subject to
//!   `needs_notification` (VIRTIO_RING_F_EVENT_IDX is offered). A tx pass that sent frames also
//!   delivers what is then waiting on the tap (the host's answers, TCP ACKs above all, are queued
//!   within the write), so one interrupt covers both queues: under nested virtualization each
//!   interrupt costs the guest several exits.
//!
//! - MMDS: with [`Net::attach_mmds`], guest frames for the MMDS address (ARP who-has it, IPv4
//!   to it) are copied out of the tx chain and handed to a [`kiln_mmds::MmdsStack`] instead of
//!   the tap; the frames it answers with go into the rx queue ahead of tap frames, pulled one
//!   per free rx buffer. Its retransmission timer is a timerfd listed with [`MMDS_TIMER_TOKEN`].
//!   Other frames take the usual zero-copy path. MMDS-bound tx frames never reach the tap, so
//!   they spend no tx rate-limiter tokens (but wait behind a throttled chain, the ring being in
//!   order); MMDS answers are received frames and spend rx tokens like tap frames (as in
//!   Firecracker). Timer tokens: [`TAP_TOKEN`] 0, [`RX_RATE_LIMITER_TOKEN`] 1,
//!   [`TX_RATE_LIMITER_TOKEN`] 2, [`MMDS_TIMER_TOKEN`] 3, [`TX_POLL_TOKEN`] 4.
//!
//! Everything the guest controls is checked; nothing here panics on guest or tap input.
//!
//! Wiring in the VMM: `Net::new(cfg)?`, keep `net.metrics_handle()` for the metrics endpoint,
//! then `MmioTransport::new(mem, Box::new(net), interrupt)` with ioeventfds for queues 0 and 1.
//! After every call into the transport (register writes, `notify_queue`, `host_event`) re-read
//! `transport.host_fds()` and make the event loop's set match it (EPOLLIN, level-triggered is
//! fine: the tap is only listed while frames can be taken); on readiness call
//! `transport.host_event(token)`. The tap fd stays open for the device's lifetime, across
//! resets.

mod tap;
#[cfg(test)]
mod tests;

use std::io;
use std::num::Wrapping;
use std::ops::Range;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use kiln_mmds::MmdsStack;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::volatile_memory::PtrGuard;
use vm_memory::{Bytes, GuestMemoryBackend};
use vmm_sys_util::timerfd::TimerFd;

use super::queue_util::{drain_queue_polling, drain_queue_quietly, Chain, Drained, QueueError};
use super::{device_type, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::interrupt::VirtioInterrupt;
use crate::metrics::{Counter, LatencyAgg};
use crate::rate_limiter::{LimiterSlot, RateLimiterConfig, RateLimiterError};
use crate::GuestMemory;
use tap::Tap;

/// Queue size offered for both queues.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// The token the tap fd is listed with in [`VirtioDevice::host_fds`].
pub const TAP_TOKEN: u32 = 0;
/// The token of the receive rate limiter's timerfd.
pub const RX_RATE_LIMITER_TOKEN: u32 = 1;
/// The token of the transmit rate limiter's timerfd.
pub const TX_RATE_LIMITER_TOKEN: u32 = 2;
/// The token of the MMDS stack's retransmission timer in [`VirtioDevice::host_fds`].
pub const MMDS_TIMER_TOKEN: u32 = 3;
/// The token of the tx poll timer (kicks are off while it runs; see [`TX_POLL_INTERVAL`]).
pub const TX_POLL_TOKEN: u32 = 4;
/// After a tx pass that sent frames, kicks stay off and the ring is looked at again this much
/// later; a look that finds nothing turns kicks back on. A kick costs the guest an exit, which
/// under nested virtualization is dear; this is far below TCP's timers.
pub const TX_POLL_INTERVAL: Duration = Duration::from_micros(250);
/// `struct virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame (without the vnet header) either way: a 64 KiB GSO packet plus Ethernet and
/// VLAN headers (the 65562 bytes virtio 1.2, 5.1.6.3.1 asks big rx buffers to hold).
pub const MAX_FRAME_LEN: usize = 65562;

// Feature bits (virtio 1.2, 5.1.3).
pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
pub const VIRTIO_NET_F_GUEST_UFO: u64 = 1 << 10;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
pub const VIRTIO_NET_F_HOST_UFO: u64 = 1 << 14;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;

/// Config space `status` bit: the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// Size of the config space the device exposes: mac, status, max_virtqueue_pairs, mtu.
pub const CONFIG_SPACE_LEN: usize = 12;

/// Smallest MTU the virtio spec allows a device to advertise.
pub const MIN_MTU: u16 = 68;

/// What the VMM knows about a network interface before boot (Firecracker's
/// `NetworkInterfaceConfig`: `iface_id`, `host_dev_name`, `guest_mac`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Interface id (for logs and the API).
    pub id: String,
    /// Name of an existing host tap device.
    pub tap_name: String,
    /// MAC the guest is told to use (VIRTIO_NET_F_MAC); without it the guest picks a random one.
    pub guest_mac: Option<[u8; 6]>,
    /// MTU the guest is told to use (VIRTIO_NET_F_MTU). Set the tap's MTU to match on the host.
    pub mtu: Option<u16>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid tap device name {name:?}: {why}")]
    InvalidTapName { name: String, why: &'static str },
    #[error("tap device {name} does not exist; create it first: ip tuntap add {name} mode tap")]
    TapMissing { name: String },
    #[error("no permission to open /dev/net/tun")]
    TunPermission {
        #[source]
        source: io::Error,
    },
    #[error("cannot open /dev/net/tun (is the tun module loaded?)")]
    OpenTun {
        #[source]
        source: io::Error,
    },
    #[error(
        "no permission to attach to tap {name}: run with CAP_NET_ADMIN or create the tap for this \
         user (ip tuntap add {name} mode tap user USER)"
    )]
    TapPermission {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("tap {name} is busy: another process (another VM?) has it attached")]
    TapBusy {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("{name} is not a single-queue tap device (not a tap, or created as tun or multi_queue)")]
    NotATap {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot attach to tap {name}")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot configure tap {name}: {what}")]
    Configure {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("invalid MAC address {text:?}: {why}")]
    InvalidMac { text: String, why: &'static str },
    #[error("MTU {0} is out of range ({MIN_MTU}..=65535)")]
    InvalidMtu(u16),
    #[error("cannot create the tx poll timer (a timerfd)")]
    TxPollTimer(#[source] io::Error),
    #[error("cannot create the MMDS retransmission timer")]
    MmdsTimer(#[source] io::Error),
    #[error("{which}: {source}")]
    RateLimiter {
        which: &'static str,
        #[source]
        source: RateLimiterError,
    },
}

/// Parses a MAC address written as six two-digit hex bytes separated by `:` (or `-`), such as
/// `06:00:ac:10:00:02`.
pub fn parse_mac(text: &str) -> Result<[u8; 6], NetError> {
    let err = |why| NetError::InvalidMac { text: text.to_owned(), why };
    let mut mac = [0u8; 6];
    let mut parts = text.split([':', '-']);
    for byte in &mut mac {
        let part = parts.next().ok_or_else(|| err("expected six bytes like 06:00:ac:10:00:02"))?;
        if part.len() != 2 {
            return Err(err("each byte must be two hex digits"));
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| err("not a hex digit"))?;
    }
    if parts.next().is_some() {
        return Err(err("expected six bytes like 06:00:ac:10:00:02"));
    }
    Ok(mac)
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// Traffic counters (Firecracker's `NetDeviceMetrics`, reported as `net_<iface_id>`; fields are
/// serialized under Firecracker's names). Frame byte counts exclude the vnet header.
#[derive(Debug, Default, Serialize)]
pub struct NetMetrics {
    pub activate_fails: Counter,
    pub cfg_fails: Counter,
    pub mac_address_updates: Counter,
    /// Times a frame waited because the guest had no receive buffers.
    #[serde(rename = "no_rx_avail_buffer")]
    pub rx_no_buffers: Counter,
    pub no_tx_avail_buffer: Counter,
    pub event_fails: Counter,
    pub rx_queue_event_count: Counter,
    pub rx_event_rate_limiter_count: Counter,
    /// Times the receive rate limiter held a frame back.
    pub rx_rate_limiter_throttled: Counter,
    pub rx_tap_event_count: Counter,
    /// Frames delivered to the guest.
    #[serde(rename = "rx_bytes_count")]
    pub rx_bytes: Counter,
    #[serde(rename = "rx_packets_count")]
    pub rx_packets: Counter,
    /// Frames read from the tap and dropped: too large for the guest's buffers, or malformed.
    #[serde(rename = "rx_fails")]
    pub rx_dropped: Counter,
    /// Successful tap reads delivered to the guest.
    pub rx_count: Counter,
    /// Receive chains the guest got back unused because they were malformed (kiln addition).
    pub rx_invalid_chains: Counter,
    /// Errors reading the tap.
    #[serde(rename = "tap_read_fails")]
    pub rx_tap_errors: Counter,
    /// Of the dropped transmit chains, frames the tap refused (full queue, bad GSO header, ...).
    #[serde(rename = "tap_write_fails")]
    pub tx_tap_errors: Counter,
    pub tap_write_agg: LatencyAgg,
    /// Frames written to the tap.
    #[serde(rename = "tx_bytes_count")]
    pub tx_bytes: Counter,
    /// Of the dropped transmit chains, those that were malformed (wrong direction, outside
    /// memory, too long/short).
    #[serde(rename = "tx_malformed_frames")]
    pub tx_invalid_chains: Counter,
    /// Transmit chains not sent: malformed, too long, or refused by the tap.
    #[serde(rename = "tx_fails")]
    pub tx_dropped: Counter,
    /// Successful tap writes.
    pub tx_count: Counter,
    #[serde(rename = "tx_packets_count")]
    pub tx_packets: Counter,
    pub tx_partial_reads: Counter,
    pub tx_queue_event_count: Counter,
    pub tx_rate_limiter_event_count: Counter,
    /// Times the transmit rate limiter held a chain back.
    pub tx_rate_limiter_throttled: Counter,
    pub tx_spoofed_mac_count: Counter,
    pub tx_remaining_reqs_count: Counter,
}

/// A plain copy of [`NetMetrics`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetMetricsSnapshot {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub rx_invalid_chains: u64,
    pub rx_no_buffers: u64,
    pub rx_tap_errors: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
    pub tx_invalid_chains: u64,
    pub tx_tap_errors: u64,
}

impl NetMetrics {
    pub fn snapshot(&self) -> NetMetricsSnapshot {
        let g = Counter::get;
        NetMetricsSnapshot {
            rx_packets: g(&self.rx_packets),
            rx_bytes: g(&self.rx_bytes),
            rx_dropped: g(&self.rx_dropped),
            rx_invalid_chains: g(&self.rx_invalid_chains),
            rx_no_buffers: g(&self.rx_no_buffers),
            rx_tap_errors: g(&self.rx_tap_errors),
            tx_packets: g(&self.tx_packets),
            tx_bytes: g(&self.tx_bytes),
            tx_dropped: g(&self.tx_dropped),
            tx_invalid_chains: g(&self.tx_invalid_chains),
            tx_tap_errors: g(&self.tx_tap_errors),
        }
    }
}

fn inc(c: &Counter, by: u64) {
    c.add(by);
}

struct Active {
    mem: GuestMemory,
    interrupt: VirtioInterrupt,
    rx: Queue,
    tx: Queue,
    mergeable: bool,
}

/// Receive-side state that survives between passes.
struct RxState {
    /// One frame from the tap, with its vnet header.
    buf: Vec<u8>,
    /// Length of a frame in `buf` not yet delivered (the guest had no buffers).
    pending: Option<usize>,
    /// Waiting for the driver to add buffers: the tap is not listed meanwhile.
    waiting: bool,
    /// Scratch: descriptors of the chains one frame goes into, and per chain (head, range in
    /// `descs`, capacity).
    descs: Vec<Descriptor>,
    parts: Vec<(u16, Range<usize>, usize)>,
}

/// The MMDS path of an interface: the stack, its timer and a frame copy buffer.
struct MmdsPath {
    stack: MmdsStack,
    timer: TimerFd,
    /// One guest frame (vnet header included) copied out of a tx chain.
    frame: Vec<u8>,
    /// Scratch: the descriptors of the tx chain being looked at.
    descs: Vec<Descriptor>,
}

impl MmdsPath {
    /// Arms the timer for the stack's next deadline (or disarms it). Setting a timerfd also
    /// clears its expirations, so it stops being readable.
    fn rearm(&mut self) {
        let result = match self.stack.next_deadline() {
            Some(at) => {
                let wait = at.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                self.timer.reset(wait, None)
            }
            None => self.timer.clear(),
        };
        if let Err(e) = result {
            tracing::warn!("net: cannot set the MMDS timer: {e}");
        }
    }

    /// Sends one tx chain: to the MMDS stack if it is for MMDS, to the tap otherwise. Only frames
    /// for the tap spend `limiter` tokens (and may be held back: `None`); MMDS frames never leave
    /// the VMM, so the tap's rate limit does not apply to them.
    fn transmit(
        &mut self,
        tap: &Tap,
        metrics: &NetMetrics,
        limiter: &mut LimiterSlot,
        mem: &GuestMemory,
        chain: Chain<'_>,
    ) -> Option<u32> {
        self.descs.clear();
        self.descs.extend(chain);
        let mut prefix = [0u8; VNET_HDR_LEN + MmdsStack::CLASSIFY_PREFIX];
        let seen = gather(mem, &self.descs, &mut prefix);
        let for_mmds = seen > VNET_HDR_LEN && self.stack.is_for_mmds(&prefix[VNET_HDR_LEN..seen]);
        if !for_mmds {
            return transmit_descs(tap, metrics, limiter, mem, &self.descs);
        }
        let total = self.descs.iter().map(|d| d.len() as usize).fold(0usize, usize::saturating_add);
        if total > VNET_HDR_LEN + MAX_FRAME_LEN || self.descs.iter().any(|d| d.is_write_only()) {
            tracing::debug!("net: invalid tx chain for MMDS");
            inc(&metrics.tx_dropped, 1);
            inc(&metrics.tx_invalid_chains, 1);
            return Some(0);
        }
        self.frame.resize(total, 0);
        if gather(mem, &self.descs, &mut self.frame) != total {
            inc(&metrics.tx_dropped, 1);
            inc(&metrics.tx_invalid_chains, 1);
            return Some(0);
        }
        self.stack.handle_frame(&self.frame[VNET_HDR_LEN..], Instant::now());
        Some(0)
    }
}

/// Reads a fired timerfd's expirations so the (level-triggered) fd stops being readable.
fn consume_expirations(timer: &mut TimerFd, iface: &str, which: &str) {
    match timer.wait() {
        Ok(_) => {}
        Err(e) if e.errno() == libc::EAGAIN => {}
        Err(e) => tracing::warn!("net {iface}: reading the {which} timer failed: {e}"),
    }
}

/// Copies the start of a chain's buffers into `out`; returns how many bytes it got (fewer
/// when the chain is shorter or leaves guest memory).
fn gather(mem: &GuestMemory, descs: &[Descriptor], out: &mut [u8]) -> usize {
    let mut at = 0usize;
    for d in descs {
        if at == out.len() {
            break;
        }
        let n = (d.len() as usize).min(out.len() - at);
        if mem.read_slice(&mut out[at..at + n], d.addr()).is_err() {
            break;
        }
        at += n;
    }
    at
}

/// A virtio-net device.
pub struct Net {
    id: String,
    tap: Tap,
    mac: Option<[u8; 6]>,
    mtu: Option<u16>,
    /// Offloads (TUN_F_*) the tap accepted when probed.
    tap_offloads: u32,
    avail_features: u64,
    acked_features: u64,
    active: Option<Active>,
    broken: bool,
    rx: RxState,
    rx_limiter: LimiterSlot,
    tx_limiter: LimiterSlot,
    metrics: Arc<NetMetrics>,
    mmds: Option<MmdsPath>,
    /// Fires when the tx ring is due another look ([`TX_POLL_INTERVAL`]).
    tx_poll: TimerFd,
    /// Kicks are off and `tx_poll` is armed.
    tx_polling: bool,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("id", &self.id)
            .field("tap", &self.tap.name())
            .field("mac", &self.mac.as_ref().map(format_mac))
            .field("mtu", &self.mtu)
            .field("activated", &self.active.is_some())
            .field("broken", &self.broken)
            .field("mmds", &self.mmds.as_ref().map(|m| m.stack.ipv4_address()))
            .finish()
    }
}

impl Net {
    /// Attaches to the tap `cfg.tap_name` (which must exist) and works out the features to offer.
    pub fn new(cfg: NetConfig) -> Result<Net, NetError> {
        Self::check_config(&cfg)?;
        let tap = Tap::open(&cfg.tap_name, VNET_HDR_LEN as u32)?;
        // Probe which offloads the host kernel's tun accepts (UFO went away for a while), then
        // allow none until the guest has said which it takes.
        let mut tap_offloads = tap::TUN_F_CSUM | tap::TUN_F_TSO4 | tap::TUN_F_TSO6 | tap::TUN_F_UFO;
        if tap.set_offload(tap_offloads).is_err() {
            tap_offloads &= !tap::TUN_F_UFO;
            if tap.set_offload(tap_offloads).is_err() {
                tracing::warn!("net {}: tap {} takes no offloads", cfg.id, cfg.tap_name);
                tap_offloads = 0;
            }
        }
        tap.set_offload(0).map_err(|source| NetError::Configure {
            name: cfg.tap_name.clone(),
            what: "clear offloads",
            source,
        })?;
        Self::with_tap(cfg, tap, tap_offloads)
    }

    fn check_config(cfg: &NetConfig) -> Result<(), NetError> {
        if let Some(mac) = cfg.guest_mac {
            let why = if mac == [0; 6] {
                Some("all zeroes")
            } else if mac[0] & 1 != 0 {
                Some("a multicast address (the first byte is odd)")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(NetError::InvalidMac { text: format_mac(&mac), why });
            }
        }
        if let Some(mtu) = cfg.mtu {
            if mtu < MIN_MTU {
                return Err(NetError::InvalidMtu(mtu));
            }
        }
        Ok(())
    }

    fn with_tap(cfg: NetConfig, tap: Tap, tap_offloads: u32) -> Result<Net, NetError> {
        let tx_poll = crate::rate_limiter::nonblocking_timer().map_err(NetError::TxPollTimer)?;
        let mut avail_features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_NET_F_STATUS
            | VIRTIO_NET_F_MRG_RXBUF
            // Guest to host: the tap takes partial checksums and GSO frames whatever TUNSETOFFLOAD
            // says.
            | VIRTIO_NET_F_CSUM
            | VIRTIO_NET_F_HOST_TSO4
            | VIRTIO_NET_F_HOST_TSO6
            | VIRTIO_NET_F_HOST_UFO;
        if tap_offloads & tap::TUN_F_CSUM != 0 {
            avail_features |= VIRTIO_NET_F_GUEST_CSUM;
            if tap_offloads & tap::TUN_F_TSO4 != 0 {
                avail_features |= VIRTIO_NET_F_GUEST_TSO4;
            }
            if tap_offloads & tap::TUN_F_TSO6 != 0 {
                avail_features |= VIRTIO_NET_F_GUEST_TSO6;
            }
            if tap_offloads & tap::TUN_F_UFO != 0 {
                avail_features |= VIRTIO_NET_F_GUEST_UFO;
            }
        }
        if cfg.guest_mac.is_some() {
            avail_features |= VIRTIO_NET_F_MAC;
        }
        if cfg.mtu.is_some() {
            avail_features |= VIRTIO_NET_F_MTU;
        }
        Ok(Net {
            id: cfg.id,
            tap,
            mac: cfg.guest_mac,
            mtu: cfg.mtu,
            tap_offloads,
            avail_features,
            acked_features: 0,
            active: None,
            broken: false,
            rx: RxState {
                buf: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN],
                pending: None,
                waiting: false,
                descs: Vec::new(),
                parts: Vec::new(),
            },
            rx_limiter: LimiterSlot::default(),
            tx_limiter: LimiterSlot::default(),
            metrics: Arc::new(NetMetrics::default()),
            mmds: None,
            tx_poll,
            tx_polling: false,
        })
    }

    /// Routes this interface's frames for the MMDS address to `stack` instead of the tap.
    pub fn attach_mmds(&mut self, stack: MmdsStack) -> Result<(), NetError> {
        let timer = crate::rate_limiter::nonblocking_timer().map_err(NetError::MmdsTimer)?;
        self.mmds = Some(MmdsPath { stack, timer, frame: Vec::new(), descs: Vec::new() });
        Ok(())
    }

    /// The MMDS address this interface answers, if MMDS is attached.
    pub fn mmds_address(&self) -> Option<std::net::Ipv4Addr> {
        self.mmds.as_ref().map(|m| m.stack.ipv4_address())
    }

    /// A device on a stand-in for a tap (any non-blocking packet fd), for unit tests.
    #[cfg(test)]
    fn with_fake_tap(cfg: NetConfig, file: std::fs::File) -> Result<Net, NetError> {
        Self::check_config(&cfg)?;
        let tap = Tap::from_file(file, &cfg.tap_name);
        let offloads = tap::TUN_F_CSUM | tap::TUN_F_TSO4 | tap::TUN_F_TSO6 | tap::TUN_F_UFO;
        Self::with_tap(cfg, tap, offloads)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    pub fn guest_mac(&self) -> Option<[u8; 6]> {
        self.mac
    }

    pub fn mtu(&self) -> Option<u16> {
        self.mtu
    }

    /// Features the driver accepted (0 before activation).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The traffic counters.
    pub fn metrics(&self) -> &NetMetrics {
        &self.metrics
    }

    /// A handle on the counters that outlives borrows of the device (for a metrics thread).
    pub fn metrics_handle(&self) -> Arc<NetMetrics> {
        Arc::clone(&self.metrics)
    }

    /// The receive and transmit limits in force (`None`: not limited).
    pub fn rate_limiters(&self) -> (Option<RateLimiterConfig>, Option<RateLimiterConfig>) {
        (self.rx_limiter.config(), self.tx_limiter.config())
    }

    /// Sets or replaces both rate limiters (`None` or zero-sized buckets: no limit), before boot or
    /// while the guest runs (`PATCH /network-interfaces`). Traffic stopped by the old limits is
    /// looked at again within a millisecond. On error nothing changed.
    pub fn update_rate_limiters(
        &mut self,
        rx: Option<RateLimiterConfig>,
        tx: Option<RateLimiterConfig>,
    ) -> Result<(), NetError> {
        let err = |which| move |source| NetError::RateLimiter { which, source };
        for (cfg, which) in [(rx, "rx_rate_limiter"), (tx, "tx_rate_limiter")] {
            for b in cfg.iter().flat_map(|c| [c.bandwidth, c.ops]).flatten() {
                crate::rate_limiter::validate_bucket(&b).map_err(err(which))?;
            }
        }
        self.rx_limiter.update(rx).map_err(err("rx_rate_limiter"))?;
        self.tx_limiter.update(tx).map_err(err("tx_rate_limiter"))
    }

    fn config_space(&self) -> [u8; CONFIG_SPACE_LEN] {
        let mut cfg = [0u8; CONFIG_SPACE_LEN];
        if let Some(mac) = self.mac {
            cfg[0..6].copy_from_slice(&mac);
        }
        cfg[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        cfg[10..12].copy_from_slice(&self.mtu.unwrap_or(0).to_le_bytes());
        cfg
    }

    /// Offloads the tap may hand us given what the guest accepted.
    fn offloads_for(&self, acked: u64) -> u32 {
        let mut flags = 0;
        if acked & VIRTIO_NET_F_GUEST_CSUM != 0 {
            flags |= tap::TUN_F_CSUM;
            if acked & VIRTIO_NET_F_GUEST_TSO4 != 0 {
                flags |= tap::TUN_F_TSO4;
            }
            if acked & VIRTIO_NET_F_GUEST_TSO6 != 0 {
                flags |= tap::TUN_F_TSO6;
            }
            if acked & VIRTIO_NET_F_GUEST_UFO != 0 {
                flags |= tap::TUN_F_UFO;
            }
        }
        flags & self.tap_offloads
    }

    /// Sends what the guest queued. `kicked`: the driver notified (else the poll timer fired or
    /// the rate limiter let go).
    fn process_tx(&mut self, kicked: bool) {
        if self.tx_limiter.is_blocked() {
            return;
        }
        let Some(active) = self.active.as_mut() else { return };
        let (tap, metrics, limiter) = (&self.tap, &*self.metrics, &mut self.tx_limiter);
        let mut mmds = self.mmds.as_mut();
        let mut send = |mem: &GuestMemory, chain: Chain<'_>| match mmds.as_deref_mut() {
            Some(m) => m.transmit(tap, metrics, limiter, mem, chain),
            None => transmit(tap, metrics, limiter, mem, chain),
        };
        // Kicks stay off while the guest keeps queueing frames: the ring is looked at again
        // after TX_POLL_INTERVAL instead, which saves the guest an exit per burst. A look that
        // finds nothing (or no timer) turns them back on, race-free.
        let was_polling = std::mem::replace(&mut self.tx_polling, false);
        let result = match drain_queue_polling(&mut active.tx, &active.mem, &mut send) {
            Ok((d, wants)) if d.completed > 0 && !d.deferred => {
                match self.tx_poll.reset(TX_POLL_INTERVAL, None) {
                    Ok(()) => {
                        self.tx_polling = true;
                        Ok((d, wants))
                    }
                    Err(e) => {
                        tracing::warn!("net {}: cannot arm the tx poll timer: {e}", self.id);
                        drain_queue_quietly(&mut active.tx, &active.mem, &mut send).map(|(more, w)| {
                            (Drained { completed: d.completed + more.completed, ..more }, wants || w)
                        })
                    }
                }
            }
            Ok((d, _)) if d.completed == 0 && !d.deferred => {
                drain_queue_quietly(&mut active.tx, &active.mem, &mut send)
            }
            other => other,
        };
        if was_polling && !self.tx_polling {
            // (It fired already when the poll called us; not when a kick came first.)
            if let Err(e) = self.tx_poll.clear() {
                tracing::warn!("net {}: cannot disarm the tx poll timer: {e}", self.id);
            }
        }
        let (sent, tx_wants_interrupt) = match result {
            Ok((d, wants)) => {
                if kicked && d.completed == 0 && !d.deferred {
                    metrics.no_tx_avail_buffer.inc();
                }
                (d.completed, wants)
            }
            Err(e) => {
                tracing::error!("net {}: tx queue broken: {e}", self.id);
                metrics.event_fails.inc();
                self.broken = true;
                return;
            }
        };
        // A tap hands what the guest sent to the host's stack within the write, so the answers
        // (TCP ACKs above all, and MMDS replies) are usually queued by now: deliver them in this
        // pass, so one interrupt covers both queues instead of one each (under nested
        // virtualization an interrupt costs the guest several exits).
        let rx_wants_interrupt = ((sent > 0 && self.tap_readable_now())
            || self.mmds.as_ref().is_some_and(|m| m.stack.has_frames()))
            && self.receive_quietly();
        if tx_wants_interrupt || rx_wants_interrupt {
            self.signal_used();
        }
        self.rearm_mmds();
    }

    fn stop_tx_polling(&mut self) {
        self.tx_polling = false;
        if let Err(e) = self.tx_poll.clear() {
            tracing::warn!("net {}: cannot disarm the tx poll timer: {e}", self.id);
        }
    }

    /// Whether rx may take frames from the tap now (it has buffers and tokens).
    fn tap_readable_now(&self) -> bool {
        !self.rx.waiting && !self.rx_limiter.is_blocked()
    }

    fn rearm_mmds(&mut self) {
        if let Some(m) = self.mmds.as_mut() {
            m.rearm();
        }
    }

    fn signal_used(&self) {
        if let Some(active) = &self.active {
            if let Err(e) = active.interrupt.signal_used_queue_coalesced() {
                tracing::warn!("net {}: failed to raise the used-buffer interrupt: {e}", self.id);
            }
        }
    }

    fn process_rx(&mut self) {
        if self.receive_quietly() {
            self.signal_used();
        }
    }

    /// Delivers what the tap (and MMDS) has into the rx ring; returns whether the driver wants an
    /// interrupt for it (raising it is the caller's job).
    fn receive_quietly(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else { return false };
        let stack = self.mmds.as_mut().map(|m| &mut m.stack);
        let delivered = receive(&self.tap, stack, &mut self.rx, &mut self.rx_limiter, &self.metrics, active);
        let wants = match delivered {
            Ok(0) => Ok(false),
            Ok(_) => active.rx.needs_notification(&active.mem).map_err(QueueError::Queue),
            Err(e) => Err(e),
        };
        wants.unwrap_or_else(|e| {
            tracing::error!("net {}: rx queue broken: {e}", self.id);
            self.broken = true;
            false
        })
    }
}

/// Writes one tx chain to the tap, straight from guest memory, counting the outcome. Returns the
/// used length, or `None` when the rate limiter holds the chain back.
fn transmit(
    tap: &Tap,
    metrics: &NetMetrics,
    limiter: &mut LimiterSlot,
    mem: &GuestMemory,
    chain: Chain<'_>,
) -> Option<u32> {
    write_to_tap(tap, metrics, limiter, mem, chain)
}

/// [`transmit`] for a chain whose descriptors were already collected.
fn transmit_descs(
    tap: &Tap,
    metrics: &NetMetrics,
    limiter: &mut LimiterSlot,
    mem: &GuestMemory,
    descs: &[Descriptor],
) -> Option<u32> {
    write_to_tap(tap, metrics, limiter, mem, descs.iter().copied())
}

fn write_to_tap(
    tap: &Tap,
    metrics: &NetMetrics,
    limiter: &mut LimiterSlot,
    mem: &GuestMemory,
    descs: impl IntoIterator<Item = Descriptor>,
) -> Option<u32> {
    let mut pieces = Vec::with_capacity(4);
    match tx_pieces(mem, descs, &mut pieces) {
        Ok(len) if !limiter.consume((len - VNET_HDR_LEN) as u64, 1) => {
            inc(&metrics.tx_rate_limiter_throttled, 1);
            return None;
        }
        Ok(len) => {
            let started = Instant::now();
            let written = tap.write_pieces(&pieces, len);
            metrics.tap_write_agg.record_since(started);
            match written {
                Ok(()) => {
                    inc(&metrics.tx_packets, 1);
                    inc(&metrics.tx_count, 1);
                    inc(&metrics.tx_bytes, (len - VNET_HDR_LEN) as u64);
                }
                Err(e) => {
                    tracing::debug!("net: tap refused a {len}-byte frame: {e}");
                    inc(&metrics.tx_dropped, 1);
                    inc(&metrics.tx_tap_errors, 1);
                }
            }
        }
        Err(why) => {
            tracing::debug!("net: invalid tx chain: {why}");
            inc(&metrics.tx_dropped, 1);
            inc(&metrics.tx_invalid_chains, 1);
        }
    }
    Some(0)
}

/// Checks a tx chain (vnet header + frame: device-readable, inside guest memory, at most
/// [`MAX_FRAME_LEN`] after the header) and collects the host mappings of its buffers. Returns
/// the total length.
fn tx_pieces(
    mem: &GuestMemory,
    descs: impl IntoIterator<Item = Descriptor>,
    pieces: &mut Vec<PtrGuard>,
) -> Result<usize, &'static str> {
    let mut total = 0usize;
    for d in descs {
        if d.is_write_only() {
            return Err("device-writable descriptor");
        }
        let len = d.len() as usize;
        total =
            total.checked_add(len).filter(|t| *t <= VNET_HDR_LEN + MAX_FRAME_LEN).ok_or("frame too long")?;
        // One slice per guest memory region the buffer touches; an error if it leaves memory.
        for slice in mem.get_slices(d.addr(), len) {
            let slice = slice.map_err(|_| "descriptor outside guest memory")?;
            pieces.push(slice.ptr_guard());
        }
        if pieces.len() > tap::MAX_PIECES {
            return Err("too many pieces");
        }
    }
    if total <= VNET_HDR_LEN {
        return Err("no frame after the vnet header");
    }
    Ok(total)
}

/// Pops the next rx chain; `Ok(None)` when the ring is empty, in which case notifications are
/// enabled so the driver tells us when it adds buffers.
fn pop_rx<'a>(queue: &mut Queue, mem: &'a GuestMemory) -> Result<Option<Chain<'a>>, QueueError> {
    for _ in 0..2 {
        if let Some(chain) = queue.pop_descriptor_chain(mem) {
            return Ok(Some(chain));
        }
        if !queue.enable_notification(mem).map_err(QueueError::Queue)? {
            return Ok(None);
        }
        // The driver added buffers while we looked: try again.
    }
    // More is available, yet nothing pops: the available index is bogus.
    let avail = queue.avail_idx(mem, Ordering::Acquire).map_err(QueueError::Queue)?;
    let ahead = (avail - Wrapping(queue.next_avail())).0;
    if ahead > queue.size() {
        Err(QueueError::AvailOverrun { ahead, size: queue.size() })
    } else {
        Err(QueueError::Queue(virtio_queue::Error::InvalidAvailRingIndex))
    }
}

/// Checks an rx chain: device-writable descriptors inside guest memory. Appends them to
/// `descs` and returns their total capacity (capped at what a frame can use).
fn check_rx_chain(
    mem: &GuestMemory,
    chain: Chain<'_>,
    descs: &mut Vec<Descriptor>,
) -> Result<usize, &'static str> {
    let start = descs.len();
    let mut cap = 0usize;
    for d in chain {
        if !d.is_write_only() {
            descs.truncate(start);
            return Err("device-readable descriptor");
        }
        if !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
            descs.truncate(start);
            return Err("descriptor outside guest memory");
        }
        cap = cap.saturating_add(d.len() as usize);
        descs.push(d);
    }
    if cap < VNET_HDR_LEN {
        descs.truncate(start);
        return Err("shorter than the vnet header");
    }
    Ok(cap)
}

/// Copies `data` into the descriptors in order; they were checked to be in guest memory and to
/// hold it.
fn scatter(
    mem: &GuestMemory,
    descs: &[Descriptor],
    mut data: &[u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    for d in descs {
        if data.is_empty() {
            break;
        }
        let n = data.len().min(d.len() as usize);
        mem.write_slice(&data[..n], d.addr())?;
        data = &data[n..];
    }
    Ok(())
}

/// What happened to one frame.
enum Delivery {
    /// Delivered (in one chain, or several with MRG_RXBUF).
    Delivered,
    /// Dropped (did not fit, or could not be written).
    Dropped,
    /// The ring ran out of buffers; the frame stays pending.
    NoBuffers,
}

/// Reads frames from the tap into rx chains until the tap is drained or the ring is empty.
/// Returns how many frames were delivered.
fn receive(
    tap: &Tap,
    mut mmds: Option<&mut MmdsStack>,
    rx: &mut RxState,
    limiter: &mut LimiterSlot,
    metrics: &NetMetrics,
    active: &mut Active,
) -> Result<usize, QueueError> {
    // Kicks are only needed once the ring runs dry (pop_rx enables them then); a no-op with
    // EVENT_IDX, where the avail_event pop_rx sets does the same.
    active.rx.disable_notification(&active.mem).map_err(QueueError::Queue)?;
    let mut delivered = 0usize;
    loop {
        // MMDS answers go first; they are built only now that a buffer may take them.
        let mmds_frame = match (rx.pending, mmds.as_deref_mut()) {
            (None, Some(stack)) => stack.next_frame(&mut rx.buf[VNET_HDR_LEN..], Instant::now()),
            _ => None,
        };
        let len = match (rx.pending.take(), mmds_frame) {
            (Some(len), _) => len,
            (None, Some(n)) => {
                // No offloads: checksums are complete, no GSO.
                rx.buf[..VNET_HDR_LEN].fill(0);
                VNET_HDR_LEN + n
            }
            (None, None) => match tap.read_frame(&mut rx.buf) {
                Ok(Some(len)) => len,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("net: reading tap {} failed: {e}", tap.name());
                    inc(&metrics.rx_tap_errors, 1);
                    break;
                }
            },
        };
        if len <= VNET_HDR_LEN {
            tracing::debug!("net: {len}-byte read from the tap, not a frame");
            inc(&metrics.rx_dropped, 1);
            continue;
        }
        let bytes = (len - VNET_HDR_LEN) as u64;
        if !limiter.consume(bytes, 1) {
            // Held until the limiter's timer fires; the tap is not listed meanwhile.
            rx.pending = Some(len);
            inc(&metrics.rx_rate_limiter_throttled, 1);
            break;
        }
        match deliver(rx, len, metrics, active)? {
            Delivery::Delivered => {
                delivered += 1;
                inc(&metrics.rx_packets, 1);
                inc(&metrics.rx_count, 1);
                inc(&metrics.rx_bytes, bytes);
            }
            Delivery::Dropped => inc(&metrics.rx_dropped, 1),
            Delivery::NoBuffers => {
                limiter.give_back(bytes, 1);
                rx.pending = Some(len);
                rx.waiting = true;
                inc(&metrics.rx_no_buffers, 1);
                tracing::trace!("net: no rx buffers; waiting for the driver");
                break;
            }
        }
    }
    Ok(delivered)
}

/// Puts the frame `rx.buf[..len]` into one chain (or, with MRG_RXBUF, as many as it takes).
fn deliver(
    rx: &mut RxState,
    len: usize,
    metrics: &NetMetrics,
    active: &mut Active,
) -> Result<Delivery, QueueError> {
    let Active { mem, rx: queue, mergeable, .. } = active;
    let mem: &GuestMemory = mem;
    rx.descs.clear();
    rx.parts.clear();
    let mut cap = 0usize;
    // Whether the chains in `parts` are the last ones popped, so they can be given back.
    let mut contiguous = true;
    while cap < len {
        let Some(chain) = pop_rx(queue, mem)? else {
            // Give the chains back for when the driver adds more, unless the whole ring is too
            // small for this frame.
            let popped = rx.parts.len();
            if contiguous && popped < usize::from(queue.size()) {
                for _ in 0..popped {
                    queue.go_to_previous_position();
                }
                return Ok(Delivery::NoBuffers);
            }
            for (head, ..) in &rx.parts {
                queue.add_used(mem, *head, 0).map_err(QueueError::Queue)?;
            }
            tracing::debug!("net: a {len}-byte frame does not fit the rx ring; dropped");
            return Ok(Delivery::Dropped);
        };
        let head = chain.head_index();
        let start = rx.descs.len();
        match check_rx_chain(mem, chain, &mut rx.descs) {
            Ok(c) => {
                if !*mergeable && c < len {
                    // Without MRG_RXBUF the frame must fit one chain; the chain stays for the next.
                    queue.go_to_previous_position();
                    tracing::debug!("net: a {len}-byte frame does not fit a {c}-byte rx buffer; dropped");
                    return Ok(Delivery::Dropped);
                }
                rx.parts.push((head, start..rx.descs.len(), c));
                cap = cap.saturating_add(c);
            }
            Err(why) => {
                tracing::debug!("net: invalid rx chain: {why}");
                inc(&metrics.rx_invalid_chains, 1);
                queue.add_used(mem, head, 0).map_err(QueueError::Queue)?;
                if !rx.parts.is_empty() {
                    contiguous = false;
                }
            }
        }
    }
    // The header's num_buffers (the tap leaves those two bytes alone).
    let nbufs = u16::try_from(rx.parts.len()).unwrap_or(u16::MAX);
    rx.buf[VNET_HDR_LEN - 2..VNET_HDR_LEN].copy_from_slice(&nbufs.to_le_bytes());
    let mut at = 0usize;
    let mut ok = true;
    for (_, range, c) in &rx.parts {
        let n = (len - at).min(*c);
        if scatter(mem, &rx.descs[range.clone()], &rx.buf[at..at + n]).is_err() {
            ok = false;
            break;
        }
        at += n;
    }
    // Completed in order, so a mergeable frame's chains are adjacent in the used ring. A frame
    // that could not be written completes its chains empty (the driver counts a length error).
    let mut at = 0usize;
    for (head, _, c) in &rx.parts {
        let n = (len - at).min(*c);
        at += n;
        let used = if ok { u32::try_from(n).unwrap_or(0) } else { 0 };
        queue.add_used(mem, *head, used).map_err(QueueError::Queue)?;
    }
    Ok(if ok { Delivery::Delivered } else { Delivery::Dropped })
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_space(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: VirtioInterrupt,
        acked_features: u64,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let Ok([rx, tx]) = <[Queue; 2]>::try_from(queues) else {
            self.metrics.activate_fails.inc();
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        let offloads = self.offloads_for(acked_features);
        if let Err(e) = self.tap.set_offload(offloads) {
            self.metrics.activate_fails.inc();
            return Err(ActivateError::Other(format!(
                "net {}: cannot set offloads {offloads:#x} on tap {}: {e}",
                self.id,
                self.tap.name()
            )));
        }
        let mergeable = acked_features & VIRTIO_NET_F_MRG_RXBUF != 0;
        tracing::debug!(
            "net {}: activated on tap {}, features {acked_features:#x}, tap offloads {offloads:#x}",
            self.id,
            self.tap.name()
        );
        self.acked_features = acked_features;
        self.broken = false;
        self.rx.pending = None;
        self.rx.waiting = false;
        self.stop_tx_polling();
        self.active = Some(Active { mem, interrupt, rx, tx, mergeable });
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        if self.broken {
            return;
        }
        match index {
            RX_QUEUE => {
                // New buffers: deliver what waits and watch the tap again.
                self.metrics.rx_queue_event_count.inc();
                self.rx.waiting = false;
                self.process_rx();
                self.rearm_mmds();
            }
            TX_QUEUE => {
                self.metrics.tx_queue_event_count.inc();
                self.process_tx(true);
            }
            _ => {}
        }
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.stop_tx_polling();
        self.acked_features = 0;
        self.broken = false;
        self.rx.pending = None;
        self.rx.waiting = false;
        if let Err(e) = self.tap.set_offload(0) {
            tracing::warn!("net {}: cannot clear offloads on tap {}: {e}", self.id, self.tap.name());
        }
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
        if self.active.is_none() || self.broken {
            return Vec::new();
        }
        let mut fds = Vec::with_capacity(4);
        if !self.rx.waiting && !self.rx_limiter.is_blocked() {
            fds.push((self.tap.raw_fd(), TAP_TOKEN));
        }
        fds.extend(self.rx_limiter.host_fd(RX_RATE_LIMITER_TOKEN));
        fds.extend(self.tx_limiter.host_fd(TX_RATE_LIMITER_TOKEN));
        // Listed while active (readable only when armed), so the set does not churn per pass.
        fds.push((self.tx_poll.as_raw_fd(), TX_POLL_TOKEN));
        if let Some(m) = &self.mmds {
            fds.push((m.timer.as_raw_fd(), MMDS_TIMER_TOKEN));
        }
        fds
    }

    fn process_host_event(&mut self, token: u32) {
        if self.broken {
            return;
        }
        match token {
            TAP_TOKEN if !self.rx.waiting && !self.rx_limiter.is_blocked() => {
                self.metrics.rx_tap_event_count.inc();
                self.process_rx();
            }
            RX_RATE_LIMITER_TOKEN => {
                self.metrics.rx_event_rate_limiter_count.inc();
                if self.rx_limiter.timer_fired() {
                    self.process_rx();
                }
            }
            TX_RATE_LIMITER_TOKEN => {
                self.metrics.tx_rate_limiter_event_count.inc();
                if self.tx_limiter.timer_fired() {
                    self.process_tx(false);
                }
            }
            TX_POLL_TOKEN => {
                consume_expirations(&mut self.tx_poll, &self.id, "tx poll");
                if self.tx_polling {
                    self.process_tx(false);
                }
            }
            MMDS_TIMER_TOKEN => {
                if let Some(m) = self.mmds.as_mut() {
                    consume_expirations(&mut m.timer, &self.id, "MMDS");
                    m.stack.poll_timers(Instant::now());
                }
                self.process_rx();
            }
            _ => {}
        }
        self.rearm_mmds();
    }
}
