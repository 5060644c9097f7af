//! How devices raise interrupts without knowing about KVM.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// Raises one guest interrupt line (an edge). The VMM implements it with an irqfd; tests with a counter.
pub trait IrqTrigger: Send + Sync {
    fn trigger(&self) -> io::Result<()>;
}

impl IrqTrigger for vmm_sys_util::eventfd::EventFd {
    fn trigger(&self) -> io::Result<()> {
        self.write(1)
    }
}

/// virtio-mmio InterruptStatus bit: a used buffer was added to a queue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x01;
/// virtio-mmio InterruptStatus bit: the device configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x02;

/// The interrupt a virtio device uses to tell its driver about used buffers or config changes.
/// Shared between the device (which signals) and the transport (which exposes and acknowledges
/// the status register).
#[derive(Clone)]
pub struct VirtioInterrupt {
    status: Arc<AtomicU32>,
    irq: Arc<dyn IrqTrigger>,
}

impl std::fmt::Debug for VirtioInterrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioInterrupt").field("status", &self.status()).finish()
    }
}

impl VirtioInterrupt {
    pub fn new(irq: Arc<dyn IrqTrigger>) -> Self {
        Self { status: Arc::new(AtomicU32::new(0)), irq }
    }

    /// Tells the driver a queue has new used buffers.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.status.fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
        self.irq.trigger()
    }

    /// Like [`Self::signal_used_queue`], but leaves the line alone while an earlier used-buffer
    /// interrupt is still unacknowledged (its InterruptStatus bit set): the driver has that one
    /// coming or is in its handler, which reads the status, acknowledges it and only then looks
    /// at every queue, so it will see what was just used (the status bit is set after the used
    /// ring was written, and the acknowledgement that clears it comes after). Returns whether the
    /// line was raised. Saves the guest a second round of handler exits per burst.
    pub fn signal_used_queue_coalesced(&self) -> io::Result<bool> {
        let before = self.status.fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
        if before & VIRTIO_MMIO_INT_VRING != 0 {
            return Ok(false);
        }
        self.irq.trigger().map(|()| true)
    }

    /// Tells the driver the device configuration space changed.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.status.fetch_or(VIRTIO_MMIO_INT_CONFIG, Ordering::SeqCst);
        self.irq.trigger()
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// An [`IrqTrigger`] that counts edges; for tests.
#[derive(Debug, Default)]
pub struct CountingIrq(pub AtomicU32);

impl CountingIrq {
    pub fn count(&self) -> u32 {
        self.0.load(Ordering::SeqCst)
    }
}

impl IrqTrigger for CountingIrq {
    fn trigger(&self) -> io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}
