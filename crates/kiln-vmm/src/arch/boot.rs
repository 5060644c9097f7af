//! Boot information handed to the kernel: the memory map, and either Linux's zero page
//! (`boot_params`, for the 64-bit boot protocol and bzImage) or PVH's `hvm_start_info`.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    ram_ranges, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_START, PVH_INFO_START,
    PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};

pub const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// `boot_params.e820_table` has 128 entries.
const E820_MAX_ENTRIES: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("writing boot information into guest memory failed")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    #[error("the guest memory map has more entries than the boot protocol allows")]
    TooManyMemoryRegions,
}

/// A loaded initrd.
#[derive(Debug, Clone, Copy)]
pub struct InitrdPlacement {
    pub addr: u64,
    pub size: u64,
}

/// Guest RAM as the kernel should see it: `(start, len)` usable ranges. The first 640 KiB stop at
/// the EBDA (which holds the MP table); the legacy hole up to 1 MiB is not RAM.
pub fn memory_map(mem_bytes: u64) -> Vec<(u64, u64)> {
    let mut map = vec![(0, EBDA_START)];
    for (start, len) in ram_ranges(mem_bytes) {
        let s = start.max(HIMEM_START);
        let e = start + len;
        if e > s {
            map.push((s, e - s));
        }
    }
    map
}

/// Where an initrd of `size` bytes goes: as high in low memory as allowed, page aligned.
pub fn initrd_address(mem_bytes: u64, size: u64, addr_max: Option<u64>, kernel_end: u64) -> Option<u64> {
    let lowmem_end = mem_bytes.min(MMIO_GAP_START);
    let limit = match addr_max {
        Some(max) if max > 0 => lowmem_end.min(max.saturating_add(1)),
        _ => lowmem_end,
    };
    let addr = limit.checked_sub(size)? & !0xfff;
    (addr >= kernel_end).then_some(addr)
}

/// Writes the zero page for the 64-bit boot protocol. `header` is the bzImage's setup header, if any.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    header: Option<setup_header>,
    cmdline_size: usize,
    initrd: Option<InitrdPlacement>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some(i) = initrd {
        params.hdr.ramdisk_image = i.addr as u32;
        params.hdr.ramdisk_size = i.size as u32;
    }
    let map = memory_map(mem_bytes);
    if map.len() > E820_MAX_ENTRIES {
        return Err(BootError::TooManyMemoryRegions);
    }
    for (i, (addr, size)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry { addr: *addr, size: *size, r#type: E820_RAM };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START)).map_err(BootError::GuestMemory)
}

/// Writes PVH's `hvm_start_info`, module list (the initrd) and memory map.
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    initrd: Option<InitrdPlacement>,
) -> Result<(), BootError> {
    let map = memory_map(mem_bytes);
    if map.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::TooManyMemoryRegions);
    }
    let w = |bytes: &[u8], at: u64| mem.write_slice(bytes, GuestAddress(at)).map_err(BootError::GuestMemory);

    // struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h), 56 bytes.
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&XEN_HVM_START_MAGIC_VALUE.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&u32::from(initrd.is_some()).to_le_bytes()); // nr_modules
    info.extend_from_slice(&(if initrd.is_some() { PVH_MODLIST_START } else { 0 }).to_le_bytes());
    info.extend_from_slice(&CMDLINE_START.to_le_bytes());
    info.extend_from_slice(&0u64.to_le_bytes()); // rsdp_paddr: no ACPI tables
    info.extend_from_slice(&PVH_MEMMAP_START.to_le_bytes());
    info.extend_from_slice(&(map.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes()); // reserved
    w(&info, PVH_INFO_START)?;

    if let Some(i) = initrd {
        // struct hvm_modlist_entry: paddr, size, cmdline_paddr, reserved.
        let mut m = Vec::with_capacity(32);
        for v in [i.addr, i.size, 0, 0] {
            m.extend_from_slice(&v.to_le_bytes());
        }
        w(&m, PVH_MODLIST_START)?;
    }
    // struct hvm_memmap_table_entry: addr, size, type, reserved (24 bytes).
    let mut mm = Vec::with_capacity(map.len() * 24);
    for (addr, size) in map {
        mm.extend_from_slice(&addr.to_le_bytes());
        mm.extend_from_slice(&size.to_le_bytes());
        mm.extend_from_slice(&E820_RAM.to_le_bytes());
        mm.extend_from_slice(&0u32.to_le_bytes());
    }
    w(&mm, PVH_MEMMAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::MMIO_GAP_END;

    #[test]
    fn memory_map_skips_ebda_legacy_hole_and_gap() {
        assert_eq!(memory_map(256 << 20), vec![(0, EBDA_START), (HIMEM_START, (256 << 20) - HIMEM_START)]);
        let big = memory_map(4 << 30);
        assert_eq!(big.len(), 3);
        assert_eq!(big[1], (HIMEM_START, MMIO_GAP_START - HIMEM_START));
        assert_eq!(big[2], (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START));
    }

    #[test]
    fn initrd_goes_high_and_never_over_the_kernel() {
        let a = initrd_address(256 << 20, 0x1234, None, 0x200_0000).unwrap();
        assert_eq!(a, ((256 << 20) - 0x1234) & !0xfff);
        assert!(a + 0x1234 <= 256 << 20);
        let capped = initrd_address(4 << 30, 0x1000, Some(0x7fff_ffff), 0).unwrap();
        assert_eq!(capped, 0x8000_0000 - 0x1000);
        assert_eq!(initrd_address(64 << 20, 63 << 20, None, 0x200_0000), None);
    }

    #[test]
    fn pvh_start_info_layout() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_pvh_start_info(&mem, 512 << 20, Some(InitrdPlacement { addr: 0x100_0000, size: 77 })).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(magic, XEN_HVM_START_MAGIC_VALUE);
        let nr_modules: u32 = mem.read_obj(GuestAddress(PVH_INFO_START + 12)).unwrap();
        assert_eq!(nr_modules, 1);
        let entries: u32 = mem.read_obj(GuestAddress(PVH_INFO_START + 48)).unwrap();
        assert_eq!(entries, 2);
        let size: u64 = mem.read_obj(GuestAddress(PVH_MODLIST_START + 8)).unwrap();
        assert_eq!(size, 77);
        let second_start: u64 = mem.read_obj(GuestAddress(PVH_MEMMAP_START + 24)).unwrap();
        assert_eq!(second_start, HIMEM_START);
    }

    #[test]
    fn zero_page_has_magic_cmdline_and_e820() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_zero_page(&mem, 128 << 20, None, 42, None).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let (flag, hdr, ptr, size) = (p.hdr.boot_flag, p.hdr.header, p.hdr.cmd_line_ptr, p.hdr.cmdline_size);
        assert_eq!((flag, hdr, ptr, size), (0xaa55, KERNEL_HDR_MAGIC, CMDLINE_START as u32, 42));
        assert_eq!(p.e820_entries, 2);
    }
}
