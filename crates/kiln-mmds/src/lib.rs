//! Kiln's MMDS: Firecracker's microVM metadata service.
//!
//! Owns: the data store ([`store::Mmds`]: a JSON document replaced by `PUT /mmds`, merged by
//! `PATCH /mmds` (RFC 7396), bounded by a size limit), the session tokens of MMDS V2
//! ([`token`]), the HTTP server the guest talks to at the MMDS address ([`http`]: IMDS text or
//! JSON answers, V1/V2 token rules, Firecracker's status codes), and the minimal network stack
//! that carries it ([`stack::MmdsStack`]: answers ARP for the MMDS address and terminates TCP to
//! port 80, frame in, frame out).
//!
//! Must not: touch virtio queues, taps, KVM or the API socket. The virtio-net device hands guest
//! frames to [`stack::MmdsStack::handle_frame`] and asks [`stack::MmdsStack::next_frame`] for
//! frames to deliver; the VMM's API shares the [`store::SharedMmds`]. Everything that comes from
//! the guest is hostile: frames are parsed with bounds checks, connections, buffers and queues
//! are capped, and nothing here panics or grows without bound on guest input.

pub mod http;
pub mod stack;
pub mod store;
pub mod token;
mod wire;

pub use stack::{MmdsStack, MMDS_MAC};
pub use store::{Mmds, MmdsVersion, SharedMmds, StoreError, DEFAULT_SIZE_LIMIT};
