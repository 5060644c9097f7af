//! Virtio devices and the virtio-mmio transport that exposes them to the guest.

pub mod balloon;
pub mod block;
pub mod mmio;
pub mod net;
pub mod queue_util;
pub mod rng;
pub mod vsock;

use crate::interrupt::VirtioInterrupt;
use crate::GuestMemory;
use virtio_queue::Queue;

/// Feature bit every device offers: the device is virtio 1.0+ (no legacy interface).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bit: used/avail event indices, which let both sides suppress notifications.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Virtio device type numbers (virtio 1.2, section 5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const RNG: u32 = 4;
    pub const BALLOON: u32 = 5;
    pub const VSOCK: u32 = 19;
}

/// Copies the part of `config` at `offset` into `data` (a guest config-space read): bytes past the
/// end of the config space, or an offset beyond it, are left as they are.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    let Ok(start) = usize::try_from(offset) else { return };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// The one queue of a single-queue device (block, rng), or the error saying how many came.
pub fn single_queue(mut queues: Vec<Queue>) -> Result<Queue, ActivateError> {
    match (queues.len(), queues.pop()) {
        (1, Some(queue)) => Ok(queue),
        (got, _) => Err(ActivateError::QueueCount { expected: 1, got }),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver set up {got} queues, the device needs {expected}")]
    QueueCount { expected: usize, got: usize },
    #[error("failed to activate the device: {0}")]
    Other(String),
}

/// What a virtio device implements; the transport does the rest (feature negotiation, queue setup,
/// status state machine, interrupt status).
pub trait VirtioDevice: Send {
    /// Virtio device type (see [`device_type`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers (including [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;
    /// Reads device config space. Out-of-range parts of `data` are left as they are (zero).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space. Writes outside the writable fields are ignored.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Called once the driver set DRIVER_OK, with the negotiated features and the ready queues.
    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: VirtioInterrupt,
        acked_features: u64,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;
    /// The driver notified queue `index` (via the notify register or an ioeventfd). Process what is
    /// available and signal the interrupt as needed. Errors mark the device as needing reset.
    fn process_queue(&mut self, index: usize);
    /// Driver reset: drop the queues and go back to the pre-activation state. Returns false if the
    /// device cannot be reset (the transport then leaves it failed).
    fn reset(&mut self) -> bool;
    /// Whether the device has been activated.
    fn is_activated(&self) -> bool;
    /// Whether the device hit an error it cannot recover from without a driver reset (a broken
    /// queue). The transport checks it after [`Self::process_queue`] and then sets
    /// DEVICE_NEEDS_RESET and raises a configuration change interrupt.
    fn needs_reset(&self) -> bool {
        false
    }
    /// ConfigGeneration: changes whenever the device changes its config space on its own (for
    /// example a block device's capacity after a backing file swap), so the driver can detect
    /// torn multi-word config reads.
    fn config_generation(&self) -> u32 {
        0
    }
    /// Access to the concrete device type (the VMM downcasts to reach, e.g.,
    /// `Block::update_backing`). Devices return `Some(self)`.
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        None
    }
    /// Host-side file descriptors this device wants watched for readability (a tap, a listening
    /// socket, connections, a timerfd), each with a device-chosen token. The VMM's event loop
    /// re-reads this set after every call into the device (activation, queue notifications, host
    /// events) and adds/removes fds to match, so the set may change at any of those points. The
    /// device keeps ownership of the fds; a listed fd must stay open until it is no longer listed.
    fn host_fds(&self) -> Vec<(std::os::unix::io::RawFd, u32)> {
        Vec::new()
    }
    /// The fd listed with `token` is readable (or hung up). Must not block: fds should be
    /// non-blocking. Called only while activated.
    fn process_host_event(&mut self, _token: u32) {}
}
