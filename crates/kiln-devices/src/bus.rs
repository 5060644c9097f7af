//! Address-space dispatch: maps guest PIO or MMIO address ranges to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through guest port or memory-mapped I/O.
///
/// `offset` is relative to the start of the range the device was inserted at; `data.len()` is the
/// access size the guest used (1, 2, 4 or 8 bytes). The bus guarantees `offset + data.len()` lies
/// inside the device's range. Reads of registers a device does not implement should leave `data`
/// zeroed (the bus zero-fills before calling `read`).
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared, lockable bus device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("device range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("device range at {base:#x} has zero length or wraps the address space")]
    InvalidRange { base: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Range {
    base: u64,
    len: u64,
}

/// An address space (one for PIO, one for MMIO).
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<u64, (Range, SharedDevice)>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.devices.values().map(|(r, _)| (r.base, r.len)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::InvalidRange { base })?;
        // The nearest device starting at or below the new range's last byte must end before `base`.
        if let Some((_, (r, _))) = self.devices.range(..end).next_back() {
            if r.base + r.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.devices.insert(base, (Range { base, len }, device));
        Ok(())
    }

    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (_, (range, dev)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - range.base;
        let end = offset.checked_add(size as u64)?;
        (end <= range.len).then_some((offset, dev))
    }

    /// Dispatches a guest read. Returns false when nothing is mapped there (the caller then returns
    /// all-ones to the guest, as unpopulated hardware does).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                data.fill(0);
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a guest write. Returns false when nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: device state stays usable because every
/// device method leaves it consistent between guest accesses.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data[0] = self.0;
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    fn dev() -> SharedDevice {
        Arc::new(Mutex::new(Reg(7)))
    }

    #[test]
    fn dispatches_inside_range_only() {
        let mut bus = Bus::new();
        bus.insert(dev(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3f8, &mut b));
        assert_eq!(b[0], 7);
        assert!(bus.write(0x3ff, &[9]));
        assert!(bus.read(0x3f8, &mut b));
        assert_eq!(b[0], 9);
        assert!(!bus.read(0x400, &mut b));
        assert!(!bus.read(0x3f7, &mut b));
        // An access straddling the end of the range is not dispatched.
        let mut w = [0u8; 4];
        assert!(!bus.read(0x3fe, &mut w));
    }

    #[test]
    fn refuses_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        bus.insert(dev(), 0x1000, 0x1000).unwrap();
        assert_eq!(bus.insert(dev(), 0x1fff, 1), Err(BusError::Overlap { base: 0x1fff, len: 1 }));
        assert_eq!(bus.insert(dev(), 0x800, 0x801), Err(BusError::Overlap { base: 0x800, len: 0x801 }));
        assert!(bus.insert(dev(), 0x800, 0x800).is_ok());
        assert!(bus.insert(dev(), 0x2000, 0x10).is_ok());
        assert_eq!(bus.insert(dev(), 5, 0), Err(BusError::InvalidRange { base: 5 }));
        assert_eq!(bus.insert(dev(), u64::MAX, 2), Err(BusError::InvalidRange { base: u64::MAX }));
        // Addresses near u64::MAX do not overflow when resolved.
        let mut b = [0u8; 8];
        assert!(!bus.read(u64::MAX - 3, &mut b));
    }
}
