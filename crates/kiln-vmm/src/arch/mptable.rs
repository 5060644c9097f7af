//! The Intel MultiProcessor Specification (1.4) table: tells a guest without ACPI how many CPUs it
//! has, where the IOAPIC is and how ISA interrupts route to it. Linux finds the floating pointer by
//! scanning the first KiB of the EBDA, where we put it.

use super::layout::{IOAPIC_START, IRQ_MAX, LAPIC_START, MPTABLE_START};

/// Local APIC version reported for each CPU (an integrated APIC).
const APIC_VERSION: u8 = 0x14;
/// IOAPIC version (KVM's in-kernel IOAPIC is an 82093AA-compatible 0x11).
const IOAPIC_VERSION: u8 = 0x11;
/// CPU signature family 6 and feature flags FPU+APIC, as the spec's examples use.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
/// The table must fit the KiB Linux scans.
pub const MPTABLE_MAX_SIZE: usize = 0x400;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit the MP table (at most 254)")]
    TooManyCpus(u8),
    #[error("the MP table for {0} vCPUs is larger than the {MPTABLE_MAX_SIZE}-byte area Linux scans")]
    TooLarge(u8),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the MP floating pointer followed by the configuration table, to be written at
/// [`MPTABLE_START`]. The IOAPIC's id is `num_cpus` (APIC ids 0..num_cpus belong to the CPUs).
pub fn build(num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > 254 {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus;
    let config_addr = MPTABLE_START + 16;

    // Entries of the configuration table.
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        entries.push(0u8); // processor entry
        entries.push(cpu); // local APIC id
        entries.push(APIC_VERSION);
        entries.push(if cpu == 0 { 0b11 } else { 0b01 }); // enabled (| bootstrap processor)
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus entry, bus id 0
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]); // IOAPIC entry, enabled
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..=IRQ_MAX as u8 {
        // I/O interrupt: vectored INT, conforming polarity/trigger, ISA bus irq -> IOAPIC pin irq.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT to LINT0 of the BSP, NMI to LINT1 of every CPU.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"KILN    "); // OEM id
    table.extend_from_slice(b"MICROVM     "); // product id
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(config_addr as u32).to_le_bytes());
    out.push(1); // length in 16-byte paragraphs
    out.push(4); // spec revision
    out.push(0); // checksum, below
    out.extend_from_slice(&[0u8; 5]); // feature bytes: a configuration table is present
    out[10] = checksum(&out[..16]);
    out.extend_from_slice(&table);
    if out.len() > MPTABLE_MAX_SIZE {
        return Err(MptableError::TooLarge(num_cpus));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts_hold() {
        for n in [1u8, 2, 4, 32] {
            let t = build(n).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0);
            let cfg = &t[16..];
            assert_eq!(&cfg[0..4], b"PCMP");
            let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
            assert_eq!(len, cfg.len());
            assert_eq!(sum(cfg), 0);
            let entries = u16::from_le_bytes([cfg[34], cfg[35]]);
            assert_eq!(entries as usize, n as usize + 1 + 1 + 24 + 2);
            // Processor entries come first, APIC ids 0..n, BSP flag on the first only.
            for cpu in 0..n as usize {
                let e = &cfg[44 + cpu * 20..];
                assert_eq!((e[0], e[1]), (0, cpu as u8));
                assert_eq!(e[3] & 2 != 0, cpu == 0);
            }
        }
    }

    #[test]
    fn fits_the_scanned_area_and_rejects_nonsense() {
        assert!(build(32).unwrap().len() <= MPTABLE_MAX_SIZE);
        assert_eq!(build(0), Err(MptableError::TooManyCpus(0)));
        assert_eq!(build(255), Err(MptableError::TooManyCpus(255)));
        assert_eq!(build(64), Err(MptableError::TooLarge(64)));
    }
}
