//! Device models for Kiln microVMs.
//!
//! Owns: the address-space dispatch (`Bus`, `BusDevice`), the legacy devices a Linux guest needs on
//! x86_64 (8250 serial on top of vm-superio, i8042 for reset and Ctrl-Alt-Del, the boot timer), the
//! virtio-mmio transport, virtio devices (block, net, vsock, rng, balloon) built on virtio-queue, the
//! token-bucket rate limiters those devices enforce, and the counters they keep for the VMM's metrics.
//!
//! Must not: touch KVM. Devices raise interrupts through the [`interrupt::IrqTrigger`] trait and are
//! reached through [`bus::BusDevice`]; the VMM wires those to irqfds/ioeventfds. Every value a guest
//! controls (register offsets, access sizes, queue indices, descriptor addresses and lengths) is checked
//! here: a misbehaving guest may fail its own requests or break its own device, never panic the VMM.

pub mod bus;
pub mod interrupt;
pub mod legacy;
pub mod metrics;
pub mod rate_limiter;
pub mod virtio;

/// Guest memory as the devices see it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;
