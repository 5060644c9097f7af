//! virtio-entropy (virtio-rng): one queue; every chain of device-writable buffers is filled with
//! bytes from the host's `getrandom(2)`, at most [`MAX_BYTES_PER_REQUEST`] per chain. Chains with
//! a device-readable descriptor, or buffers outside guest memory, complete with used length 0.

use std::io;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::queue_util::{drain_queue, Chain};
use super::{device_type, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::interrupt::VirtioInterrupt;
use crate::GuestMemory;

/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes handed out per request at most; a driver asking for more gets this much (the used
/// length tells it).
pub const MAX_BYTES_PER_REQUEST: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("getrandom failed")]
    Getrandom(#[source] io::Error),
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
        Ok(Rng { active: None, broken: false, buf: vec![0; MAX_BYTES_PER_REQUEST] })
    }
}

/// Fills one chain; returns the used length.
fn handle_chain(buf: &mut [u8], mem: &GuestMemory, chain: Chain<'_>) -> u32 {
    let descs: Vec<Descriptor> = chain.collect();
    if descs.iter().any(|d| !d.is_write_only()) {
        tracing::debug!("rng: chain with a device-readable descriptor");
        return 0;
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
            return 0;
        }
        if n > 0 {
            targets.push((d.addr(), n));
        }
        budget -= n;
    }
    let total = MAX_BYTES_PER_REQUEST - budget;
    let random = &mut buf[..total];
    if let Err(e) = getrandom(random) {
        tracing::warn!("rng: getrandom failed: {e}");
        return 0;
    }
    let mut at = 0;
    for (addr, n) in targets {
        if mem.write_slice(&random[at..at + n], addr).is_err() {
            return u32::try_from(at).unwrap_or(0);
        }
        at += n;
    }
    // total <= 64 KiB.
    u32::try_from(total).unwrap_or(0)
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
        let queue = super::single_queue(queues)?;
        self.broken = false;
        self.active = Some(Active { mem, interrupt, queue });
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        if index != 0 || self.broken {
            return;
        }
        let Some(active) = self.active.as_mut() else { return };
        let buf = &mut self.buf;
        let result = drain_queue(&mut active.queue, &active.mem, &active.interrupt, |mem, chain| {
            handle_chain(buf, mem, chain)
        });
        if let Err(e) = result {
            tracing::error!("rng: queue broken: {e}");
            self.broken = true;
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
