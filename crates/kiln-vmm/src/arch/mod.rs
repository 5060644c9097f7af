//! x86_64 specifics: the guest address map, boot structures, MP table, CPUID, MSRs and registers.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
