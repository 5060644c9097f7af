//! The CPUID a vCPU sees: what this host's KVM reports as supported (`KVM_GET_SUPPORTED_CPUID`),
//! with the per-vCPU topology fixed up so the guest counts exactly the vCPUs it was given and
//! each vCPU reports its own APIC id. Nothing here assumes a CPU model: the lab's nested KVM, a
//! PVM host and bare metal all report different leaves.

use kvm_bindings::kvm_cpuid_entry2;

/// CPUID leaf 1 ECX bit 31: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID leaf 1 ECX bit 24: TSC-deadline LAPIC timer. KVM never reports it in
/// KVM_GET_SUPPORTED_CPUID; it is offered through KVM_CAP_TSC_DEADLINE_TIMER instead.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID leaf 1 EDX bit 28: the logical-processor count in EBX[23:16] is valid.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// CPUID 0x8000_0001 ECX bit 1 (AMD CmpLegacy) and bit 22 (TOPOEXT).
const EXT1_ECX_CMP_LEGACY: u32 = 1 << 1;
const EXT1_ECX_TOPOEXT: u32 = 1 << 22;
/// Level types in leaves 0xB / 0x1F.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
    Other,
}

/// The vendor named by leaf 0.
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    let Some(l0) = entries.iter().find(|e| e.function == 0) else { return Vendor::Other };
    let mut id = [0u8; 12];
    id[0..4].copy_from_slice(&l0.ebx.to_le_bytes());
    id[4..8].copy_from_slice(&l0.edx.to_le_bytes());
    id[8..12].copy_from_slice(&l0.ecx.to_le_bytes());
    match &id {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// Bits needed to number `n` things (ceil(log2(n))).
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// The vCPU topology: `vcpus` logical CPUs on one socket, `threads_per_core` each (1 or 2).
#[derive(Debug, Clone, Copy)]
pub struct Topology {
    pub vcpus: u8,
    pub threads_per_core: u8,
}

/// CPU features KVM offers through capabilities rather than in the supported CPUID.
#[derive(Debug, Clone, Copy, Default)]
pub struct CapabilityFeatures {
    /// KVM_CAP_TSC_DEADLINE_TIMER: the in-kernel LAPIC emulates TSC-deadline mode.
    pub tsc_deadline: bool,
}

/// Rewrites `entries` (a copy of the supported CPUID) for vCPU `cpu_id`.
pub fn fixup(entries: &mut [kvm_cpuid_entry2], cpu_id: u8, topo: Topology, caps: CapabilityFeatures) {
    let vendor = vendor(entries);
    let n = u32::from(topo.vcpus.max(1));
    let tpc = u32::from(topo.threads_per_core.clamp(1, 2));
    let cores = n.div_ceil(tpc);
    let apic_id = u32::from(cpu_id);
    let smt_bits = bits_for(tpc);
    let core_bits = smt_bits + bits_for(cores);

    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((n.min(255)) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if caps.tsc_deadline {
                    e.ecx |= LEAF1_ECX_TSC_DEADLINE;
                }
                if n > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 if vendor == Vendor::Intel => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level <= 2 { tpc } else { n };
                e.eax &= !((0x3f << 26) | (0xfff << 14));
                e.eax |= ((cores - 1) & 0x3f) << 26;
                e.eax |= ((sharing - 1) & 0xfff) << 14;
            }
            0xb | 0x1f => {
                match e.index {
                    0 => {
                        e.eax = smt_bits;
                        e.ebx = tpc;
                        e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = n;
                        e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
                e.edx = apic_id;
            }
            0x8000_0001 if vendor == Vendor::Amd => {
                // Without TOPOEXT the guest takes its topology from 0x8000_0008, which we control.
                e.ecx &= !EXT1_ECX_TOPOEXT;
                if n > 1 {
                    e.ecx |= EXT1_ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !EXT1_ECX_CMP_LEGACY;
                }
            }
            0x8000_0008 if vendor == Vendor::Amd => {
                e.ecx = (e.ecx & !0xf0ff) | ((n - 1) & 0xff) | (bits_for(n) << 12);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, eax, ebx, ecx, edx, ..Default::default() }
    }

    fn vendor_leaf(id: &[u8; 12]) -> kvm_cpuid_entry2 {
        let w = |i: usize| u32::from_le_bytes([id[i], id[i + 1], id[i + 2], id[i + 3]]);
        leaf(0, 0, 0xd, w(0), w(8), w(4))
    }

    #[test]
    fn detects_vendors() {
        assert_eq!(vendor(&[vendor_leaf(b"GenuineIntel")]), Vendor::Intel);
        assert_eq!(vendor(&[vendor_leaf(b"AuthenticAMD")]), Vendor::Amd);
        assert_eq!(vendor(&[]), Vendor::Other);
    }

    #[test]
    fn each_vcpu_reports_its_apic_id_and_the_count() {
        let base = vec![
            vendor_leaf(b"GenuineIntel"),
            leaf(1, 0, 0, 0xff00_0800, 0, 0),
            leaf(0xb, 0, 0, 0, 0, 0),
            leaf(0xb, 1, 0, 0, 0, 0),
            leaf(0xb, 2, 9, 9, 9, 9),
            leaf(4, 0, (1 << 5) | (7 << 26), 0, 0, 0),
        ];
        let topo = Topology { vcpus: 4, threads_per_core: 1 };
        for cpu in 0..4u8 {
            let mut e = base.clone();
            fixup(&mut e, cpu, topo, CapabilityFeatures::default());
            assert_eq!(e[1].ebx >> 24, u32::from(cpu));
            assert_eq!((e[1].ebx >> 16) & 0xff, 4);
            assert_eq!(e[1].ebx & 0xffff, 0x0800, "CLFLUSH size kept");
            assert!(e[1].ecx & LEAF1_ECX_HYPERVISOR != 0 && e[1].edx & LEAF1_EDX_HTT != 0);
            assert_eq!((e[2].eax, e[2].ebx, e[2].ecx >> 8, e[2].edx), (0, 1, LEVEL_TYPE_SMT, u32::from(cpu)));
            assert_eq!((e[3].eax, e[3].ebx, e[3].ecx >> 8), (2, 4, LEVEL_TYPE_CORE));
            assert_eq!((e[4].eax, e[4].ebx, e[4].ecx), (0, 0, 2));
            assert_eq!(e[5].eax >> 26, 3, "4 cores per package");
        }
    }

    #[test]
    fn amd_core_count_and_no_topoext() {
        let mut e = vec![
            vendor_leaf(b"AuthenticAMD"),
            leaf(1, 0, 0, 0, 0, 0),
            leaf(0x8000_0001, 0, 0, 0, EXT1_ECX_TOPOEXT, 0),
            leaf(0x8000_0008, 0, 0x3030, 0, 0xff, 0),
        ];
        fixup(&mut e, 1, Topology { vcpus: 3, threads_per_core: 1 }, CapabilityFeatures::default());
        assert_eq!(e[2].ecx & EXT1_ECX_TOPOEXT, 0);
        assert!(e[2].ecx & EXT1_ECX_CMP_LEGACY != 0);
        assert_eq!(e[3].ecx & 0xff, 2);
        assert_eq!((e[3].ecx >> 12) & 0xf, 2);
        assert_eq!(e[3].eax, 0x3030, "address sizes untouched");
    }

    #[test]
    fn tsc_deadline_follows_the_capability() {
        let base = vec![vendor_leaf(b"AuthenticAMD"), leaf(1, 0, 0, 0, 0, 0)];
        let topo = Topology { vcpus: 1, threads_per_core: 1 };
        let mut e = base.clone();
        fixup(&mut e, 0, topo, CapabilityFeatures { tsc_deadline: true });
        assert!(e[1].ecx & LEAF1_ECX_TSC_DEADLINE != 0);
        let mut e = base;
        fixup(&mut e, 0, topo, CapabilityFeatures::default());
        assert_eq!(e[1].ecx & LEAF1_ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut e = vec![vendor_leaf(b"GenuineIntel"), leaf(1, 0, 0, 0, 0, LEAF1_EDX_HTT)];
        fixup(&mut e, 0, Topology { vcpus: 1, threads_per_core: 1 }, CapabilityFeatures::default());
        assert_eq!(e[1].edx & LEAF1_EDX_HTT, 0);
    }
}
