//! Queue processing shared by the virtio devices: the pop/complete/notify loop with notification
//! suppression (and event-idx), guarded against a driver that lies about its available index.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

use crate::interrupt::VirtioInterrupt;
use crate::GuestMemory;

/// Why a queue can no longer be used until the driver resets the device.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("virtqueue access failed: {0}")]
    Queue(virtio_queue::Error),
    #[error("the driver's available index is {ahead} entries ahead, more than the queue size {size}")]
    AvailOverrun { ahead: u16, size: u16 },
}

/// A descriptor chain as devices see it.
pub type Chain<'a> = DescriptorChain<&'a GuestMemory>;

/// Completes every available chain with `handle` (which returns the used length), then raises
/// the used-buffer interrupt if the driver wants one. Returns how many chains were completed.
pub fn drain_queue<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemory,
    interrupt: &VirtioInterrupt,
    mut handle: impl FnMut(&'a GuestMemory, Chain<'a>) -> u32,
) -> Result<usize, QueueError> {
    drain_queue_until(queue, mem, interrupt, |mem, chain| Some(handle(mem, chain))).map(|d| d.completed)
}

/// What [`drain_queue_until`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Chains completed.
    pub completed: usize,
    /// The handler deferred a chain: it is back in the ring, first in line, and the queue is left
    /// with notifications disabled (the device resumes on its own, e.g. from a rate-limiter timer).
    pub deferred: bool,
}

/// Like [`drain_queue`], but `handle` may answer `None` for "not now": that chain is put back
/// and processing stops.
pub fn drain_queue_until<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemory,
    interrupt: &VirtioInterrupt,
    handle: impl FnMut(&'a GuestMemory, Chain<'a>) -> Option<u32>,
) -> Result<Drained, QueueError> {
    let (drained, wants_interrupt) = drain_queue_quietly(queue, mem, handle)?;
    if wants_interrupt {
        if let Err(e) = interrupt.signal_used_queue() {
            tracing::warn!("virtio: failed to raise the used-buffer interrupt: {e}");
        }
    }
    Ok(drained)
}

/// [`drain_queue_until`] without the interrupt: also returns whether the driver wants a
/// used-buffer interrupt for what was completed (`needs_notification`, so with event-idx the
/// answer is consumed: raise it). For devices that batch several queues' completions into one
/// interrupt.
pub fn drain_queue_quietly<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemory,
    handle: impl FnMut(&'a GuestMemory, Chain<'a>) -> Option<u32>,
) -> Result<(Drained, bool), QueueError> {
    drain(queue, mem, true, handle)
}

/// [`drain_queue_quietly`] that leaves the driver's notifications off: it keeps adding chains
/// without notifying, so the device must come back to the ring by itself (poll it) and finish
/// with [`drain_queue_quietly`], which turns them back on and looks once more (race-free).
pub fn drain_queue_polling<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemory,
    handle: impl FnMut(&'a GuestMemory, Chain<'a>) -> Option<u32>,
) -> Result<(Drained, bool), QueueError> {
    drain(queue, mem, false, handle)
}

fn drain<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemory,
    notifications_back_on: bool,
    mut handle: impl FnMut(&'a GuestMemory, Chain<'a>) -> Option<u32>,
) -> Result<(Drained, bool), QueueError> {
    let mut completed = 0usize;
    let mut deferred = false;
    'passes: loop {
        queue.disable_notification(mem).map_err(QueueError::Queue)?;
        let mut popped = 0usize;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let Some(len) = handle(mem, chain) else {
                queue.go_to_previous_position();
                completed += popped;
                deferred = true;
                break 'passes;
            };
            queue.add_used(mem, head, len).map_err(QueueError::Queue)?;
            popped += 1;
        }
        completed += popped;
        if !notifications_back_on || !queue.enable_notification(mem).map_err(QueueError::Queue)? {
            break;
        }
        if popped == 0 {
            // More is available, yet nothing could be popped: either the driver published a
            // chain right after we looked (go round again), or its available index is bogus,
            // which would make this loop spin forever.
            let avail = queue.avail_idx(mem, Ordering::Acquire).map_err(QueueError::Queue)?;
            let ahead = (avail - Wrapping(queue.next_avail())).0;
            if ahead > queue.size() {
                return Err(QueueError::AvailOverrun { ahead, size: queue.size() });
            }
        }
    }
    let wants_interrupt = completed > 0 && queue.needs_notification(mem).map_err(QueueError::Queue)?;
    Ok((Drained { completed, deferred }, wants_interrupt))
}

/// Hand-built split virtqueues in guest memory, for device tests.
#[cfg(test)]
pub mod test_queue {
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress};

    use crate::GuestMemory;

    pub const F_NEXT: u16 = 1;
    pub const F_WRITE: u16 = 2;

    pub const DESC: u64 = 0x1000;
    pub const AVAIL: u64 = 0x2000;
    pub const USED: u64 = 0x3000;
    /// Where tests put buffers.
    pub const DATA: u64 = 0x10_0000;
    pub const MEM_SIZE: usize = 0x40_0000;

    pub fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    /// The driver side of one split queue.
    pub struct TestQueue {
        pub size: u16,
        next_desc: u16,
        avail_idx: u16,
    }

    impl TestQueue {
        pub fn new(size: u16) -> Self {
            Self { size, next_desc: 0, avail_idx: 0 }
        }

        /// The device side, configured like a transport would after DRIVER_OK.
        pub fn queue(&self, event_idx: bool) -> Queue {
            let mut q = Queue::new(self.size).unwrap();
            q.set_size(self.size);
            q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
            q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
            q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
            q.set_event_idx(event_idx);
            q.set_ready(true);
            q
        }

        pub fn write_desc(&self, mem: &GuestMemory, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let base = GuestAddress(DESC + 16 * u64::from(idx));
            mem.write_obj(addr.to_le(), base).unwrap();
            mem.write_obj(len.to_le(), GuestAddress(base.0 + 8)).unwrap();
            mem.write_obj(flags.to_le(), GuestAddress(base.0 + 12)).unwrap();
            mem.write_obj(next.to_le(), GuestAddress(base.0 + 14)).unwrap();
        }

        /// Publishes `head` in the available ring.
        pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
            let slot = u64::from(self.avail_idx % self.size);
            mem.write_obj(head.to_le(), GuestAddress(AVAIL + 4 + 2 * slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            mem.write_obj(self.avail_idx.to_le(), GuestAddress(AVAIL + 2)).unwrap();
        }

        /// Sets the available index directly (to fake a lying driver).
        pub fn set_avail_idx(&mut self, mem: &GuestMemory, idx: u16) {
            self.avail_idx = idx;
            mem.write_obj(idx.to_le(), GuestAddress(AVAIL + 2)).unwrap();
        }

        /// Writes a chain of `(addr, len, flags)` descriptors (NEXT added) and publishes it.
        /// Returns the head index.
        pub fn add_chain(&mut self, mem: &GuestMemory, descs: &[(u64, u32, u16)]) -> u16 {
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

        pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
            u16::from_le(mem.read_obj(GuestAddress(USED + 2)).unwrap())
        }

        /// The used element `n` (id, len).
        pub fn used_elem(&self, mem: &GuestMemory, n: u16) -> (u32, u32) {
            let base = USED + 4 + 8 * u64::from(n % self.size);
            let id: u32 = mem.read_obj(GuestAddress(base)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(base + 4)).unwrap();
            (u32::from_le(id), u32::from_le(len))
        }
    }
}
