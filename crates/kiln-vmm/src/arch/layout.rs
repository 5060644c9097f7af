//! The guest physical address map on x86_64. Guest-visible: changing a value here changes what the
//! guest sees, so keep it in step with docs/architecture.md.

/// Global descriptor table used at boot.
pub const BOOT_GDT_START: u64 = 0x500;
/// Interrupt descriptor table used at boot (empty).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, its module list and its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Room for PVH memory-map entries before the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = ((ZERO_PAGE_START - PVH_MEMMAP_START) / 24) as usize;
/// Linux `boot_params` ("zero page") for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit boot protocol (first GiB, 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line (including the NUL) x86 Linux accepts.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; the MP table lives in its first KiB, which Linux scans.
pub const EBDA_START: u64 = 0x9fc00;
pub const MPTABLE_START: u64 = EBDA_START;
/// Where the kernel is loaded and high memory starts.
pub const HIMEM_START: u64 = 0x10_0000;

/// Guest RAM stops here and resumes at 4 GiB: the gap holds MMIO devices, the IOAPIC and LAPIC.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 1 << 32;
/// Firecracker's boot timer: a 1-byte write of 123 here logs the guest boot time.
pub const BOOT_TIMER_START: u64 = 0xc000_0000;
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// virtio-mmio device windows, one page each, announced on the kernel command line.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (three pages) just below the BIOS area at the top of the 32-bit space.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// Legacy interrupt lines.
pub const IRQ_KEYBOARD: u32 = 1;
pub const IRQ_SERIAL_COM1: u32 = 4;
/// virtio-mmio devices get IRQs from here up to [`IRQ_MAX`].
pub const IRQ_VIRTIO_FIRST: u32 = 5;
/// The in-kernel IOAPIC has 24 pins.
pub const IRQ_MAX: u32 = 23;
/// How many virtio-mmio devices fit the IRQ range.
pub const MAX_VIRTIO_DEVICES: usize = (IRQ_MAX - IRQ_VIRTIO_FIRST + 1) as usize;

/// COM1 and the i8042 controller on the PIO bus.
pub const COM1_PORT: u64 = 0x3f8;
pub const COM_PORT_SIZE: u64 = 8;
pub const I8042_PORT: u64 = 0x60;
pub const I8042_PORT_SIZE: u64 = 5;

// The boot stack sits between the zero page and the page tables; the MP table below 1 MiB.
const _: () = assert!(BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000 && BOOT_STACK_POINTER < PML4_START);
const _: () = assert!(MPTABLE_START + 0x400 <= HIMEM_START);

/// Guest RAM ranges `(start, len)` for `mem_bytes` of memory, split around the MMIO gap.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem_bytes - MMIO_GAP_START)]
    }
}

/// The guest physical address one past the end of RAM.
pub fn ram_end(mem_bytes: u64) -> u64 {
    ram_ranges(mem_bytes).last().map(|(s, l)| s + l).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_mmio_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, MMIO_GAP_START), (1 << 32, (4 << 30) - MMIO_GAP_START)]);
        assert_eq!(ram_end(4 << 30), (1 << 32) + (1 << 30));
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut areas = [
            (BOOT_GDT_START, 0x20),
            (BOOT_IDT_START, 8),
            (PVH_INFO_START, 0x40),
            (PVH_MODLIST_START, 0x20),
            (PVH_MEMMAP_START, PVH_MEMMAP_MAX_ENTRIES as u64 * 24),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (MPTABLE_START, 0x400),
        ];
        areas.sort();
        for w in areas.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{:x?} overlaps {:x?}", w[0], w[1]);
        }
    }
}
