//! Kernel, initrd and command line into guest memory. Formats: ELF `vmlinux` (entered through PVH
//! when it carries the PVH note, else through Linux's 64-bit boot protocol) and `bzImage`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::boot::{initrd_address, InitrdPlacement};
use crate::arch::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use crate::arch::regs::EntryMode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read kernel image {path}")]
    KernelRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "kernel image {0} is neither an x86_64 ELF vmlinux nor a bzImage; point kernel_image_path at one"
    )]
    KernelFormat(PathBuf),
    #[error("cannot load kernel image {path} into guest memory: {reason}")]
    KernelLoad { path: PathBuf, reason: String },
    #[error("cannot read initrd {path}")]
    InitrdRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below the kernel's limit; give the VM more memory")]
    InitrdTooLarge { path: PathBuf, size: u64 },
    #[error("writing the initrd into guest memory failed")]
    InitrdWrite(#[source] vm_memory::GuestMemoryError),
    #[error("the kernel command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
}

/// Reads a kernel image's header and says which format it is.
pub fn detect_format(path: &Path) -> Result<KernelFormat, LoadError> {
    let read_err = |source| LoadError::KernelRead { path: path.to_path_buf(), source };
    let mut f = File::open(path).map_err(read_err)?;
    let mut head = [0u8; 0x210];
    let n = read_up_to(&mut f, &mut head).map_err(read_err)?;
    let head = &head[..n];
    // ELF64, little endian, x86_64 (e_machine 0x3e).
    if head.len() >= 20 && head[..4] == *b"\x7fELF" && head[4] == 2 && head[5] == 1 && head[18] == 0x3e {
        return Ok(KernelFormat::Elf);
    }
    // bzImage: boot flag 0xaa55 at 0x1fe and "HdrS" at 0x202.
    if head.len() >= 0x206 && head[0x1fe..0x200] == [0x55, 0xaa] && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(LoadError::KernelFormat(path.to_path_buf()))
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut total = 0;
    while total < buf.len() {
        match f.read(&mut buf[total..])? {
            0 => break,
            n => total += n,
        }
    }
    Ok(total)
}

/// Where and how the kernel is entered.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    pub mode: EntryMode,
    pub entry: u64,
    pub kernel_end: u64,
    pub setup_header: Option<setup_header>,
}

/// Loads the kernel image into guest memory.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, LoadError> {
    let format = detect_format(path)?;
    let mut f =
        File::open(path).map_err(|source| LoadError::KernelRead { path: path.to_path_buf(), source })?;
    let load_err = |e: linux_loader::loader::Error| LoadError::KernelLoad {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
            let (mode, entry) = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => (EntryMode::Pvh, addr.0),
                _ => (EntryMode::Linux64, r.kernel_load.0),
            };
            Ok(LoadedKernel { format, mode, entry, kernel_end: r.kernel_end, setup_header: None })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
            // The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
            Ok(LoadedKernel {
                format,
                mode: EntryMode::Linux64,
                entry: r.kernel_load.0 + 0x200,
                kernel_end: r.kernel_end,
                setup_header: r.setup_header,
            })
        }
    }
}

/// Loads the initrd as high in low memory as the kernel allows.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<InitrdPlacement, LoadError> {
    let read_err = |source| LoadError::InitrdRead { path: path.to_path_buf(), source };
    let mut f = File::open(path).map_err(read_err)?;
    let size = f.seek(SeekFrom::End(0)).map_err(read_err)?;
    f.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let addr_max = kernel.setup_header.map(|h| u64::from(h.initrd_addr_max));
    let addr = initrd_address(mem_bytes, size, addr_max, kernel.kernel_end)
        .ok_or_else(|| LoadError::InitrdTooLarge { path: path.to_path_buf(), size })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(LoadError::InitrdWrite)?;
    Ok(InitrdPlacement { addr, size })
}

/// Builds the kernel command line and writes it to guest memory; returns its size including NUL.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str, max: usize) -> Result<usize, LoadError> {
    let max = max.min(CMDLINE_MAX_SIZE);
    if cmdline.len() + 1 > max {
        return Err(LoadError::CmdlineTooLong { len: cmdline.len(), max: max - 1 });
    }
    let mut c = Cmdline::new(max).map_err(|e| LoadError::Cmdline(e.to_string()))?;
    c.insert_str(cmdline).map_err(|e| LoadError::Cmdline(e.to_string()))?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &c)
        .map_err(|e| LoadError::Cmdline(e.to_string()))?;
    Ok(cmdline.len() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn detects_formats_and_refuses_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let elf = dir.path().join("vmlinux");
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[18] = 0x3e;
        std::fs::write(&elf, &h).unwrap();
        assert_eq!(detect_format(&elf).unwrap(), KernelFormat::Elf);

        let bz = dir.path().join("bzImage");
        let mut b = vec![0u8; 0x400];
        b[0x1fe] = 0x55;
        b[0x1ff] = 0xaa;
        b[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(&bz, &b).unwrap();
        assert_eq!(detect_format(&bz).unwrap(), KernelFormat::BzImage);

        let junk = dir.path().join("junk");
        std::fs::File::create(&junk).unwrap().write_all(b"hello world").unwrap();
        assert!(matches!(detect_format(&junk), Err(LoadError::KernelFormat(_))));
        // A 32-bit ELF is not a kernel we can boot.
        h[4] = 1;
        std::fs::write(&elf, &h).unwrap();
        assert!(matches!(detect_format(&elf), Err(LoadError::KernelFormat(_))));
        assert!(matches!(detect_format(&dir.path().join("nope")), Err(LoadError::KernelRead { .. })));
    }

    #[test]
    fn garbage_elf_fails_to_load_without_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let elf = dir.path().join("vmlinux");
        let mut h = vec![0xffu8; 200];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[18] = 0x3e;
        std::fs::write(&elf, &h).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        assert!(matches!(load_kernel(&mem, &elf), Err(LoadError::KernelLoad { .. })));
    }

    #[test]
    fn cmdline_limits() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert_eq!(write_cmdline(&mem, "console=ttyS0", 2048).unwrap(), 14);
        let long = "a".repeat(2048);
        assert!(matches!(write_cmdline(&mem, &long, 2048), Err(LoadError::CmdlineTooLong { .. })));
    }
}
