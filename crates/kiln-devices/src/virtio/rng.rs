//! virtio-entropy (virtio-rng): one queue; every chain of device-writable buffers is filled with
//! bytes from the host's `getrandom(2)`, at most [`MAX_BYTES_PER_REQUEST`] per chain. Chains with
//! a device-readable descriptor, or buffers outside guest memory, complete with used length 0.
//!
//! Rate limiting (Firecracker's `entropy.rate_limiter`): each request costs one `ops` token and
//! the bytes it asks for (up to [`MAX_BYTES_PER_REQUEST`]) in `bandwidth` tokens; a refused request
//! stays in the ring until the limiter's timer ([`RATE_LIMITER_TOKEN`]) fires.

use std::io;
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::queue_util::{drain_queue_until, Chain};
use super::{device_type, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::interrupt::VirtioInterrupt;
use crate::metrics::EntropyMetrics;
use crate::rate_limiter::{LimiterSlot, RateLimiterConfig, RateLimiterError};
use crate::GuestMemory;

/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes handed out per request at most; a driver asking for more gets this much (the used
/// length tells it).
pub const MAX_BYTES_PER_REQUEST: usize = 64 << 10;
/// The token the rate limiter's timerfd is listed with in [`VirtioDevice::host_fds`].
pub const RATE_LIMITER_TOKEN: u32 = 0;

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("getrandom failed")]
    Getrandom(#[source] io::Error),
    #[error("rate_limiter: {0}")]
    RateLimiter(#[source] RateLimiterError),
}

/// Fills `buf` from the kernel's CSPRNG.
fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes for the whole call and
        // getrandom writes at most that many bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // n >= 0 and at most rest.len().
        filled += n.unsigned_abs();
    }
    Ok(())
}

struct Active {
    mem: GuestMemory,
    interrupt: VirtioInterrupt,
    queue: Queue,
}

/// The entropy device.
pub struct Rng {
    active: Option<Active>,
    broken: bool,
    buf: Vec<u8>,
    limiter: LimiterSlot,
    metrics: Arc<EntropyMetrics>,
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng")
            .field("activated", &self.active.is_some())
            .field("broken", &self.broken)
            .finish()
    }
}

impl Rng {
    /// Checks the host's getrandom works.
    pub fn new() -> Result<Rng, RngError> {
        let mut probe = [0u8; 16];
        getrandom(&mut probe).map_err(RngError::Getrandom)?;
        Ok(Rng {
            active: None,
            broken: false,
            buf: vec![0; MAX_BYTES_PER_REQUEST],
            limiter: LimiterSlot::default(),
            metrics: Arc::new(EntropyMetrics::default()),
        })
    }

    /// The device's counters, for the VMM's metrics.
    pub fn metrics_handle(&self) -> Arc<EntropyMetrics> {
        Arc::clone(&self.metrics)
    }

    /// The rate limiter's settings (`None`: not limited).
    pub fn rate_limiter(&self) -> Option<RateLimiterConfig> {
        self.limiter.config()
    }

    /// Sets or replaces the rate limiter (`None` or zero-sized buckets: no limit).
    pub fn update_rate_limiter(&mut self, cfg: Option<RateLimiterConfig>) -> Result<(), RngError> {
        self.limiter.update(cfg).map_err(RngError::RateLimiter)
    }

    /// Serves what the ring holds, within the rate limit.
    fn run_queue(&mut self) {
        if self.broken || self.limiter.is_blocked() {
            return;
        }
        let Some(active) = self.active.as_mut() else { return };
        let (buf, limiter, metrics) = (&mut self.buf, &mut self.limiter, &*self.metrics);
        let result = drain_queue_until(&mut active.queue, &active.mem, &active.interrupt, |mem, chain| {
            handle_chain(buf, limiter, metrics, mem, chain)
        });
        if let Err(e) = result {
            tracing::error!("rng: queue broken: {e}");
            metrics.entropy_event_fails.inc();
            self.broken = true;
        }
    }
}

/// Fills one chain; returns the used length, or `None` when the rate limiter says "not now".
fn handle_chain(
    buf: &mut [u8],
    limiter: &mut LimiterSlot,
    metrics: &EntropyMetrics,
    mem: &GuestMemory,
    chain: Chain<'_>,
) -> Option<u32> {
    let descs: Vec<Descriptor> = chain.collect();
    if descs.iter().any(|d| !d.is_write_only()) {
        tracing::debug!("rng: chain with a device-readable descriptor");
        metrics.entropy_event_fails.inc();
        return Some(0);
    }
    // What to fill: the first MAX_BYTES_PER_REQUEST bytes of the chain's buffers.
    let mut budget = MAX_BYTES_PER_REQUEST;
    let mut targets: Vec<(GuestAddress, usize)> = Vec::new();
    for d in &descs {
        if budget == 0 {
            break;
        }
        let n = (d.len() as usize).min(budget);
        if !GuestMemoryBackend::check_range(mem, d.addr(), n) {
            tracing::debug!("rng: buffer outside guest memory");
            metrics.entropy_event_fails.inc();
            return Some(0);
        }
        if n > 0 {
            targets.push((d.addr(), n));
        }
        budget -= n;
    }
    let total = MAX_BYTES_PER_REQUEST - budget;
    if !limiter.consume(total as u64, 1) {
        metrics.entropy_rate_limiter_throttled.inc();
        return None;
    }
    metrics.entropy_event_count.inc();
    let random = &mut buf[..total];
    if let Err(e) = getrandom(random) {
        tracing::warn!("rng: getrandom failed: {e}");
        metrics.host_rng_fails.inc();
        return Some(0);
    }
    let mut at = 0;
    for (addr, n) in targets {
        if mem.write_slice(&random[at..at + n], addr).is_err() {
            metrics.entropy_bytes.add(at as u64);
            return Some(u32::try_from(at).unwrap_or(0));
        }
        at += n;
    }
    metrics.entropy_bytes.add(total as u64);
    // total <= 64 KiB.
    Some(u32::try_from(total).unwrap_or(0))
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    /// virtio-rng has no config space.
    fn read_config(&self, _offset: u64, _data: &mut [u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: VirtioInterrupt,
        _acked_features: u64,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let queue = super::single_queue(queues).inspect_err(|_| self.metrics.activate_fails.inc())?;
        self.broken = false;
        self.active = Some(Active { mem, interrupt, queue });
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        if index == 0 {
            // While the rate limiter holds the queue, its timer resumes it.
            self.run_queue();
        }
    }

    fn host_fds(&self) -> Vec<(std::os::unix::io::RawFd, u32)> {
        match self.active {
            Some(_) => self.limiter.host_fd(RATE_LIMITER_TOKEN).into_iter().collect(),
            None => Vec::new(),
        }
    }

    fn process_host_event(&mut self, token: u32) {
        if token != RATE_LIMITER_TOKEN {
            return;
        }
        self.metrics.rate_limiter_event_count.inc();
        if self.limiter.timer_fired() {
            self.run_queue();
        }
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.broken = false;
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::CountingIrq;
    use crate::virtio::queue_util::test_queue::*;
    use std::sync::Arc;

    fn setup() -> (Rng, GuestMemory, TestQueue, Arc<CountingIrq>) {
        let mut rng = Rng::new().unwrap();
        let mem = memory();
        let tq = TestQueue::new(16);
        let irq = Arc::new(CountingIrq::default());
        rng.activate(
            mem.clone(),
            VirtioInterrupt::new(irq.clone()),
            VIRTIO_F_VERSION_1,
            vec![tq.queue(false)],
        )
        .unwrap();
        (rng, mem, tq, irq)
    }

    fn bytes(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn fills_writable_buffers() {
        let (mut rng, mem, mut tq, irq) = setup();
        tq.add_chain(&mem, &[(DATA, 64, F_WRITE), (DATA + 0x1000, 32, F_WRITE)]);
        rng.process_queue(0);
        assert_eq!(tq.used_idx(&mem), 1);
        assert_eq!(tq.used_elem(&mem, 0), (0, 96));
        // 64 zero bytes from a CSPRNG: probability 2^-512.
        assert_ne!(bytes(&mem, DATA, 64), vec![0u8; 64]);
        assert_ne!(bytes(&mem, DATA + 0x1000, 32), vec![0u8; 32]);
        assert_eq!(bytes(&mem, DATA + 64, 16), vec![0u8; 16], "nothing beyond the buffer");
        assert_eq!(irq.count(), 1);
    }

    #[test]
    fn large_requests_are_bounded() {
        let (mut rng, mem, mut tq, _) = setup();
        tq.add_chain(&mem, &[(DATA, 100_000, F_WRITE), (DATA + 0x20000, 4096, F_WRITE)]);
        rng.process_queue(0);
        assert_eq!(tq.used_elem(&mem, 0).1, MAX_BYTES_PER_REQUEST as u32);
        assert_eq!(bytes(&mem, DATA + 0x20000, 4096), vec![0u8; 4096]);
    }

    #[test]
    fn rejects_readable_and_outside_buffers_and_stays_usable() {
        let (mut rng, mem, mut tq, _) = setup();
        tq.add_chain(&mem, &[(DATA, 64, 0)]);
        tq.add_chain(&mem, &[(DATA, 64, F_WRITE), (DATA + 64, 64, 0)]);
        tq.add_chain(&mem, &[(MEM_SIZE as u64 - 8, 64, F_WRITE)]);
        tq.add_chain(&mem, &[(u64::MAX - 4, 64, F_WRITE)]);
        tq.add_chain(&mem, &[(DATA + 0x1000, 16, F_WRITE)]);
        rng.process_queue(0);
        assert_eq!(tq.used_idx(&mem), 5);
        assert_eq!(bytes(&mem, DATA, 128), vec![0u8; 128]);
        for n in 0..4 {
            assert_eq!(tq.used_elem(&mem, n).1, 0, "chain {n}");
        }
        assert_eq!(tq.used_elem(&mem, 4).1, 16);
        assert!(!rng.needs_reset());
    }

    #[test]
    fn rate_limited_entropy_waits_for_the_timer() {
        use crate::rate_limiter::{wait_readable, TokenBucketConfig};
        use std::time::{Duration, Instant};
        let (mut rng, mem, mut tq, _) = setup();
        // 256 bytes per 100 ms.
        let bw = TokenBucketConfig { size: 256, one_time_burst: 0, refill_time_ms: 100 };
        rng.update_rate_limiter(Some(RateLimiterConfig { bandwidth: Some(bw), ops: None })).unwrap();
        for i in 0..4 {
            tq.add_chain(&mem, &[(DATA + 0x1000 * i, 128, F_WRITE)]);
        }
        let t0 = Instant::now();
        rng.process_queue(0);
        assert_eq!(tq.used_idx(&mem), 2);
        let (fd, token) = rng.host_fds()[0];
        assert_eq!(token, RATE_LIMITER_TOKEN);
        while tq.used_idx(&mem) < 4 {
            assert!(wait_readable(fd, Duration::from_millis(500)), "the timer never fired");
            rng.process_host_event(token);
        }
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(40) && took < Duration::from_millis(500), "{took:?}");
        let m = rng.metrics_handle();
        assert_eq!((m.entropy_event_count.get(), m.entropy_bytes.get()), (4, 512));
        assert!(m.entropy_rate_limiter_throttled.get() >= 1);
        assert_eq!(rng.rate_limiter().and_then(|c| c.bandwidth), Some(bw));
    }

    #[test]
    fn activation_needs_one_queue_and_reset_works() {
        let mut rng = Rng::new().unwrap();
        let irq = Arc::new(CountingIrq::default());
        let err = rng.activate(memory(), VirtioInterrupt::new(irq), VIRTIO_F_VERSION_1, vec![]);
        assert!(matches!(err, Err(ActivateError::QueueCount { expected: 1, got: 0 })));
        let (mut rng, ..) = setup();
        assert!(rng.is_activated());
        assert!(rng.reset());
        assert!(!rng.is_activated());
        // Notifications after reset are ignored.
        rng.process_queue(0);
    }
}
