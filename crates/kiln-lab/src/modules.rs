//! Kernel module dependency resolution for the lab's initramfs.
//!
//! Debian's `linux-image-*` package ships no `modules.dep` (its postinst runs `depmod`), so the
//! dependencies are read where `depmod` reads them: the `depends=` entry of each module's `.modinfo`
//! ELF section. Modules listed in `modules.builtin` are built into the kernel and need no loading.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::LabError;

/// Module name as the kernel knows it: file stem with `-` replaced by `_`.
pub(crate) fn module_name(file_name: &str) -> String {
    let stem = file_name.split(".ko").next().unwrap_or(file_name);
    stem.replace('-', "_")
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// The content of the `.modinfo` section of an ELF64 little-endian object.
pub(crate) fn modinfo_section(elf: &[u8]) -> Option<&[u8]> {
    if elf.get(0..4)? != b"\x7fELF" || *elf.get(4)? != 2 || *elf.get(5)? != 1 {
        return None;
    }
    let shoff = usize::try_from(u64_at(elf, 0x28)?).ok()?;
    let shentsize = usize::from(u16_at(elf, 0x3a)?);
    let shnum = usize::from(u16_at(elf, 0x3c)?);
    let shstrndx = usize::from(u16_at(elf, 0x3e)?);
    let section = |i: usize| -> Option<(u32, usize, usize)> {
        let base = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = u32_at(elf, base)?;
        let offset = usize::try_from(u64_at(elf, base + 24)?).ok()?;
        let size = usize::try_from(u64_at(elf, base + 32)?).ok()?;
        Some((name, offset, size))
    };
    let (_, stroff, strsize) = section(shstrndx)?;
    let strtab = elf.get(stroff..stroff.checked_add(strsize)?)?;
    for i in 0..shnum {
        let (name, offset, size) = section(i)?;
        let name = strtab.get(name as usize..)?;
        let end = name.iter().position(|&c| c == 0)?;
        if &name[..end] == b".modinfo" {
            return elf.get(offset..offset.checked_add(size)?);
        }
    }
    None
}

/// Whether an ELF64 image has a Xen `PHYS32_ENTRY` note (type 0x12): the PVH boot entry.
pub(crate) fn has_pvh_note(elf: &[u8]) -> bool {
    pvh_note(elf).unwrap_or(false)
}

fn pvh_note(elf: &[u8]) -> Option<bool> {
    if elf.get(0..4)? != b"\x7fELF" || *elf.get(4)? != 2 || *elf.get(5)? != 1 {
        return None;
    }
    let phoff = usize::try_from(u64_at(elf, 0x20)?).ok()?;
    let phentsize = usize::from(u16_at(elf, 0x36)?);
    let phnum = usize::from(u16_at(elf, 0x38)?);
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(elf, ph)? != 4 {
            continue; // not PT_NOTE
        }
        let off = usize::try_from(u64_at(elf, ph + 8)?).ok()?;
        let size = usize::try_from(u64_at(elf, ph + 32)?).ok()?;
        let notes = elf.get(off..off.checked_add(size)?)?;
        let mut p = 0usize;
        while p + 12 <= notes.len() {
            let namesz = u32_at(notes, p)? as usize;
            let descsz = u32_at(notes, p + 4)? as usize;
            let ntype = u32_at(notes, p + 8)?;
            let name = notes.get(p + 12..p + 12 + namesz)?;
            if name.starts_with(b"Xen") && ntype == 0x12 {
                return Some(true);
            }
            p += 12 + namesz.div_ceil(4) * 4 + descsz.div_ceil(4) * 4;
        }
    }
    Some(false)
}

/// The module names in the `depends=` entry of a `.modinfo` section.
pub(crate) fn depends(modinfo: &[u8]) -> Vec<String> {
    modinfo
        .split(|&c| c == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|v| String::from_utf8_lossy(v).split(',').map(str::to_string).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The modules of one kernel tree (`lib/modules/<version>`).
pub(crate) struct ModuleTree {
    files: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
}

fn walk(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> Result<(), LabError> {
    let entries = std::fs::read_dir(dir).map_err(|e| LabError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| LabError::io(dir, e))?;
        let path = entry.path();
        let ft = entry.file_type().map_err(|e| LabError::io(&path, e))?;
        if ft.is_dir() {
            walk(&path, out)?;
        } else if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            if name.ends_with(".ko") {
                out.insert(module_name(name), path.clone());
            }
        }
    }
    Ok(())
}

impl ModuleTree {
    pub(crate) fn open(root: &Path) -> Result<Self, LabError> {
        let mut files = BTreeMap::new();
        walk(&root.join("kernel"), &mut files)?;
        let builtin_path = root.join("modules.builtin");
        let builtin = std::fs::read_to_string(&builtin_path)
            .map_err(|e| LabError::io(&builtin_path, e))?
            .lines()
            .filter_map(|l| l.rsplit('/').next())
            .map(module_name)
            .collect();
        Ok(Self { files, builtin })
    }

    /// The module files to load for `wanted`, dependencies first. Built-in modules are skipped.
    pub(crate) fn closure(&self, wanted: &[String]) -> Result<Vec<(String, PathBuf)>, LabError> {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for w in wanted {
            self.visit(&module_name(w), &mut seen, &mut order, 0)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<(String, PathBuf)>,
        depth: usize,
    ) -> Result<(), LabError> {
        if depth > 64 {
            return Err(LabError::Modules(format!("module dependency cycle at {name}")));
        }
        if seen.contains(name) || self.builtin.contains(name) {
            return Ok(());
        }
        let Some(path) = self.files.get(name) else {
            return Err(LabError::Modules(format!("module {name} is neither in the package nor built in")));
        };
        let data = std::fs::read(path).map_err(|e| LabError::io(path, e))?;
        let info = modinfo_section(&data)
            .ok_or_else(|| LabError::Modules(format!("{}: no .modinfo section", path.display())))?;
        for dep in depends(info) {
            self.visit(&dep, seen, order, depth + 1)?;
        }
        seen.insert(name.to_string());
        order.push((name.to_string(), path.clone()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_depends() {
        assert_eq!(module_name("kvm-amd.ko"), "kvm_amd");
        assert_eq!(module_name("virtio_blk.ko.xz"), "virtio_blk");
        let info = b"license=GPL\0depends=kvm,ccp\0name=kvm_amd\0";
        assert_eq!(depends(info), vec!["kvm".to_string(), "ccp".to_string()]);
        assert!(depends(b"depends=\0").is_empty());
    }

    #[test]
    fn garbage_is_not_an_elf() {
        assert!(modinfo_section(b"not an elf at all").is_none());
        let mut hdr = vec![0u8; 64];
        hdr[..4].copy_from_slice(b"\x7fELF");
        hdr[4] = 2;
        hdr[5] = 1;
        hdr[0x28] = 0xff; // section headers out of bounds
        hdr[0x3c] = 4;
        assert!(modinfo_section(&hdr).is_none());
    }
}
