//! kiln-vmm: one KVM microVM.
//!
//! Owns: KVM setup (asked of the host's KVM, never assumed), guest memory, kernel loading (ELF via PVH
//! or the 64-bit boot protocol, bzImage, initrd, command line), boot structures (zero page, PVH start
//! info, MP table), CPUID/MSR/register state, vCPU threads, the device manager that wires
//! `kiln-devices` models to irqfds and ioeventfds, and the event loop. `VmResources` (pre-boot
//! configuration) goes through `builder` to a running `Vmm`.
//!
//! Must not: parse HTTP or own the Firecracker wire format (that is `kiln-fc-api`; this crate maps its
//! types to `VmResources`), or trust anything the guest controls: every guest access is dispatched
//! through bounds-checked buses, and a misbehaving guest can only stop its own VM.

pub mod arch;
pub mod builder;
pub mod kvm_host;
pub mod loader;
pub mod resources;
pub mod vcpu;
pub mod vmm;

/// The process exit codes of the `kiln-vmm` binary (documented in docs/kiln-vmm.md).
pub mod exit_code {
    /// The guest stopped itself (reboot through the i8042, shutdown): a normal end.
    pub const OK: i32 = 0;
    /// The VM failed while running (a vCPU could not run or KVM could not emulate the guest).
    pub const VM_FAILED: i32 = 1;
    /// Something about the VMM itself failed (KVM ioctls, event loop).
    pub const VMM_ERROR: i32 = 2;
    /// The configuration is invalid: bad JSON, out-of-range values, missing or unusable files.
    pub const BAD_CONFIGURATION: i32 = 152;
    /// The command line is invalid.
    pub const ARG_PARSING: i32 = 153;
    /// KVM cannot be used here: `/dev/kvm` missing or not permitted, lacking capabilities, or PVM.
    pub const KVM_UNAVAILABLE: i32 = 154;
}

pub mod api;
pub mod controller;
pub mod logger;
pub mod metrics;
pub mod output;

/// An error and its sources on one line: "what failed: why: root cause".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
