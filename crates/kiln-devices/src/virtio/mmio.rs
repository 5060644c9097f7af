//! The virtio-mmio transport, version 2 ("modern", virtio 1.2 section 4.2.2).
//!
//! Owns the register file a driver sees (magic, version, ids, feature negotiation, queue setup,
//! status state machine, interrupt status/ack, config space at 0x100+) and hands a
//! [`VirtioDevice`] its negotiated features and ready queues on DRIVER_OK. Queue notifications
//! arrive either as QueueNotify writes or, when the VMM registered an ioeventfd on
//! [`NOTIFY_REG_OFFSET`], through [`MmioTransport::notify_queue`].
//!
//! Everything here is guest-controlled: registers below 0x100 only take 4-byte accesses (others
//! read 0 and are ignored), queue registers only change between FEATURES_OK and DRIVER_OK,
//! out-of-range QueueSel reads 0 and ignores writes, and features the device did not offer are
//! refused (FEATURES_OK stays clear).

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::{VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::bus::BusDevice;
use crate::interrupt::{VirtioInterrupt, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use crate::GuestMemory;

/// Size of one virtio-mmio device's MMIO window.
pub const MMIO_LEN: u64 = 0x1000;
/// Offset of QueueNotify, where the VMM may register an ioeventfd (datamatch = queue index).
pub const NOTIFY_REG_OFFSET: u64 = 0x50;
/// Offset where device config space starts.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// "virt", little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (virtio 1.0+) register layout.
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest.
pub const MMIO_VENDOR_ID: u32 = 0;

// Register offsets.
const REG_MAGIC_VALUE: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = NOTIFY_REG_OFFSET;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_SHM_BASE_LOW: u64 = 0x0b8;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;

/// Device status bits (virtio 1.2 section 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 0x01;
    pub const DRIVER: u32 = 0x02;
    pub const DRIVER_OK: u32 = 0x04;
    pub const FEATURES_OK: u32 = 0x08;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}
use status::*;

/// What the driver wrote for one queue; turned into a [`Queue`] on activation.
#[derive(Clone, Copy, Debug)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        Self { max_size, size: max_size, ready: false, desc: 0, driver: 0, device: 0 }
    }

    fn build(&self, event_idx: bool) -> Result<Queue, String> {
        let mut q = Queue::new(self.max_size).map_err(|e| format!("queue max size: {e}"))?;
        q.try_set_size(self.size).map_err(|e| format!("queue size {}: {e}", self.size))?;
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|e| format!("descriptor table {:#x}: {e}", self.desc))?;
        q.try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(|e| format!("available ring {:#x}: {e}", self.driver))?;
        q.try_set_used_ring_address(GuestAddress(self.device))
            .map_err(|e| format!("used ring {:#x}: {e}", self.device))?;
        q.set_event_idx(event_idx);
        q.set_ready(true);
        Ok(q)
    }
}

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

/// One virtio device behind a virtio-mmio register window. Insert it on the MMIO bus with length
/// [`MMIO_LEN`] and announce it to Linux with `virtio_mmio.device=4K@<base>:<irq>`.
pub struct MmioTransport {
    mem: GuestMemory,
    device: Box<dyn VirtioDevice>,
    interrupt: VirtioInterrupt,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    queues: Vec<QueueConfig>,
    /// The device refused a reset: it stays failed.
    broken: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("acked_features", &self.acked_features)
            .field("queues", &self.queues)
            .field("broken", &self.broken)
            .finish()
    }
}

impl MmioTransport {
    pub fn new(mem: GuestMemory, device: Box<dyn VirtioDevice>, interrupt: VirtioInterrupt) -> Self {
        let queues = device.queue_max_sizes().iter().map(|&m| QueueConfig::new(m)).collect();
        Self {
            mem,
            device,
            interrupt,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            queues,
            broken: false,
        }
    }

    /// Number of queues the device has (ioeventfds to register: datamatch 0..num_queues).
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The driver notified queue `index`: QueueNotify writes and the VMM's ioeventfds both end
    /// here. Ignored unless the device is active and the index valid.
    pub fn notify_queue(&mut self, index: u32) {
        let Ok(idx) = usize::try_from(index) else { return };
        if idx >= self.queues.len() {
            tracing::debug!("virtio-mmio: notify for invalid queue {index}");
            return;
        }
        if self.broken || self.status & DEVICE_NEEDS_RESET != 0 || !self.device.is_activated() {
            tracing::debug!("virtio-mmio: notify for queue {index} of an inactive device");
            return;
        }
        self.device.process_queue(idx);
        if self.device.needs_reset() {
            self.mark_needs_reset("the device reported an unrecoverable queue error");
        }
    }

    /// A host fd the device listed in [`VirtioDevice::host_fds`] is readable: forwards to the
    /// device if it is active, with the same needs-reset handling as queue notifications.
    pub fn host_event(&mut self, token: u32) {
        if self.broken || self.status & DEVICE_NEEDS_RESET != 0 || !self.device.is_activated() {
            return;
        }
        self.device.process_host_event(token);
        if self.device.needs_reset() {
            self.mark_needs_reset("the device reported an unrecoverable error");
        }
    }

    /// The host fds the device wants watched (empty while it is not active).
    pub fn host_fds(&self) -> Vec<(std::os::unix::io::RawFd, u32)> {
        if self.device.is_activated() {
            self.device.host_fds()
        } else {
            Vec::new()
        }
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Features the driver acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether the device is active (DRIVER_OK was accepted).
    pub fn is_activated(&self) -> bool {
        self.device.is_activated()
    }

    /// The interrupt shared with the device.
    pub fn interrupt(&self) -> &VirtioInterrupt {
        &self.interrupt
    }

    /// The device behind this transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device behind this transport, mutably.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The device as its concrete type, e.g. `transport.device_as_mut::<Block>()`.
    pub fn device_as_mut<T: 'static>(&mut self) -> Option<&mut T> {
        self.device.as_any_mut()?.downcast_mut::<T>()
    }

    fn selected_queue(&self) -> Option<&QueueConfig> {
        self.queues.get(usize::try_from(self.queue_sel).ok()?)
    }

    fn queue_config_allowed(&self) -> bool {
        !self.broken
            && self.status & FEATURES_OK != 0
            && self.status & (DRIVER_OK | FAILED | DEVICE_NEEDS_RESET) == 0
    }

    /// Applies `f` to the selected queue if queue registers may change now.
    fn update_queue(&mut self, f: impl FnOnce(&mut QueueConfig)) {
        if !self.queue_config_allowed() {
            tracing::debug!("virtio-mmio: queue register write in status {:#x} ignored", self.status);
            return;
        }
        let sel = self.queue_sel;
        match usize::try_from(sel).ok().and_then(|i| self.queues.get_mut(i)) {
            Some(q) => f(q),
            None => tracing::debug!("virtio-mmio: write to invalid queue {sel} ignored"),
        }
    }

    fn mark_needs_reset(&mut self, why: &str) {
        tracing::error!("virtio-mmio: device type {} needs reset: {why}", self.device.device_type());
        self.status |= DEVICE_NEEDS_RESET;
        if self.status & DRIVER_OK != 0 {
            if let Err(e) = self.interrupt.signal_config_change() {
                tracing::warn!("virtio-mmio: failed to raise the config interrupt: {e}");
            }
        }
    }

    fn reset(&mut self) {
        if self.device.is_activated() && !self.device.reset() {
            tracing::error!(
                "virtio-mmio: device type {} cannot be reset; it stays failed",
                self.device.device_type()
            );
            self.broken = true;
            self.status = FAILED;
            return;
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        self.interrupt.ack(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
    }

    fn activate(&mut self) -> Result<(), String> {
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, qc) in self.queues.iter().enumerate() {
            if !qc.ready {
                return Err(format!("queue {i} is not ready"));
            }
            let q = qc.build(event_idx).map_err(|e| format!("queue {i}: {e}"))?;
            if !q.is_valid(&self.mem) {
                return Err(format!("queue {i} does not fit in guest memory"));
            }
            queues.push(q);
        }
        self.device
            .activate(self.mem.clone(), self.interrupt.clone(), self.acked_features, queues)
            .map_err(|e| e.to_string())
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if self.broken {
            return;
        }
        // DEVICE_NEEDS_RESET is the device's bit; a driver echoing it back changes nothing.
        let new = value & !DEVICE_NEEDS_RESET;
        let old = self.status & !DEVICE_NEEDS_RESET;
        if new & FAILED != 0 {
            tracing::debug!("virtio-mmio: driver set FAILED");
            self.status |= FAILED;
            return;
        }
        if new & old != old {
            tracing::debug!("virtio-mmio: status {value:#x} clears bits of {old:#x}; ignored");
            return;
        }
        const AD: u32 = ACKNOWLEDGE | DRIVER;
        const ADF: u32 = AD | FEATURES_OK;
        match (old, new) {
            (0, ACKNOWLEDGE) | (ACKNOWLEDGE, AD) => self.status = new | (self.status & DEVICE_NEEDS_RESET),
            (AD, ADF) => {
                let avail = self.device.avail_features();
                let unoffered = self.acked_features & !avail;
                if unoffered != 0 {
                    tracing::warn!(
                        "virtio-mmio: driver accepted features {unoffered:#x} the device did not offer"
                    );
                } else if self.acked_features & VIRTIO_F_VERSION_1 == 0 {
                    tracing::warn!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1");
                } else {
                    self.status = new | (self.status & DEVICE_NEEDS_RESET);
                }
            }
            (ADF, n) if n == ADF | DRIVER_OK => {
                self.status = new | (self.status & DEVICE_NEEDS_RESET);
                if self.status & DEVICE_NEEDS_RESET != 0 {
                    return;
                }
                match self.activate() {
                    Ok(()) => tracing::debug!(
                        "virtio-mmio: device type {} activated with features {:#x}",
                        self.device.device_type(),
                        self.acked_features
                    ),
                    Err(e) => self.mark_needs_reset(&format!("activation failed: {e}")),
                }
            }
            _ if new == old => {}
            _ => tracing::debug!("virtio-mmio: invalid status transition {old:#x} -> {new:#x}"),
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => MMIO_VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let f = self.device.avail_features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            // No shared memory regions: a length of -1 says "no such region".
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.device.config_generation(),
            _ => {
                tracing::debug!("virtio-mmio: read of register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => {
                if self.broken || self.status & (DRIVER | FEATURES_OK) != DRIVER {
                    tracing::debug!("virtio-mmio: DriverFeatures write in status {:#x}", self.status);
                    return;
                }
                match self.driver_features_sel {
                    0 => set_low(&mut self.acked_features, v),
                    1 => set_high(&mut self.acked_features, v),
                    sel => tracing::debug!("virtio-mmio: DriverFeatures write with sel {sel}"),
                }
            }
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => self.update_queue(|q| match u16::try_from(v) {
                Ok(n) if n.is_power_of_two() && n <= q.max_size => q.size = n,
                _ => tracing::debug!("virtio-mmio: invalid queue size {v} (max {})", q.max_size),
            }),
            REG_QUEUE_READY => self.update_queue(|q| q.ready = v == 1),
            REG_QUEUE_DESC_LOW => self.update_queue(|q| set_low(&mut q.desc, v)),
            REG_QUEUE_DESC_HIGH => self.update_queue(|q| set_high(&mut q.desc, v)),
            REG_QUEUE_DRIVER_LOW => self.update_queue(|q| set_low(&mut q.driver, v)),
            REG_QUEUE_DRIVER_HIGH => self.update_queue(|q| set_high(&mut q.driver, v)),
            REG_QUEUE_DEVICE_LOW => self.update_queue(|q| set_low(&mut q.device, v)),
            REG_QUEUE_DEVICE_HIGH => self.update_queue(|q| set_high(&mut q.device, v)),
            REG_QUEUE_NOTIFY => self.notify_queue(v),
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.write_status(v),
            _ => tracing::debug!("virtio-mmio: write of {v:#x} to register {offset:#x} ignored"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(data) {
            Ok(out) => *out = self.read_reg(offset).to_le_bytes(),
            Err(_) => tracing::debug!("virtio-mmio: non 4-byte read at {offset:#x}"),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if !self.broken {
                self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            }
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) => self.write_reg(offset, u32::from_le_bytes(bytes)),
            Err(_) => tracing::debug!("virtio-mmio: non 4-byte write at {offset:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::CountingIrq;
    use crate::virtio::ActivateError;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct DummyState {
        activated: bool,
        acked: u64,
        queues: Vec<(u16, bool, u64)>,
        processed: Vec<usize>,
        resets: u32,
        fail_activate: bool,
        fail_reset: bool,
        needs_reset: bool,
        config_writes: Vec<(u64, Vec<u8>)>,
    }

    struct Dummy {
        sizes: Vec<u16>,
        features: u64,
        state: Arc<Mutex<DummyState>>,
        interrupt: Option<VirtioInterrupt>,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            crate::virtio::device_type::RNG
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn avail_features(&self) -> u64 {
            self.features
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let cfg = [0x11u8, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88];
            for (i, b) in data.iter_mut().enumerate() {
                if let Some(v) = cfg.get(offset as usize + i) {
                    *b = *v;
                }
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.state.lock().unwrap().config_writes.push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            _mem: GuestMemory,
            interrupt: VirtioInterrupt,
            acked_features: u64,
            queues: Vec<Queue>,
        ) -> Result<(), ActivateError> {
            let mut s = self.state.lock().unwrap();
            if s.fail_activate {
                return Err(ActivateError::Other("nope".into()));
            }
            s.activated = true;
            s.acked = acked_features;
            s.queues = queues.iter().map(|q| (q.size(), q.event_idx_enabled(), q.desc_table())).collect();
            self.interrupt = Some(interrupt);
            Ok(())
        }
        fn process_queue(&mut self, index: usize) {
            self.state.lock().unwrap().processed.push(index);
            if let Some(i) = &self.interrupt {
                i.signal_used_queue().unwrap();
            }
        }
        fn reset(&mut self) -> bool {
            let mut s = self.state.lock().unwrap();
            s.resets += 1;
            if s.fail_reset {
                return false;
            }
            s.activated = false;
            true
        }
        fn is_activated(&self) -> bool {
            self.state.lock().unwrap().activated
        }
        fn needs_reset(&self) -> bool {
            self.state.lock().unwrap().needs_reset
        }
        fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
            Some(self)
        }
    }

    const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 1;

    fn transport() -> (MmioTransport, Arc<Mutex<DummyState>>, Arc<CountingIrq>) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let state = Arc::new(Mutex::new(DummyState::default()));
        let dev = Dummy { sizes: vec![256, 16], features: FEATURES, state: state.clone(), interrupt: None };
        let irq = Arc::new(CountingIrq::default());
        let t = MmioTransport::new(mem, Box::new(dev), VirtioInterrupt::new(irq.clone()));
        (t, state, irq)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features: u64) {
        w(t, REG_STATUS, ACKNOWLEDGE);
        w(t, REG_STATUS, ACKNOWLEDGE | DRIVER);
        w(t, REG_DRIVER_FEATURES_SEL, 0);
        w(t, REG_DRIVER_FEATURES, features as u32);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
        w(t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    }

    fn setup_queue(t: &mut MmioTransport, sel: u32, size: u32, base: u64) {
        w(t, REG_QUEUE_SEL, sel);
        w(t, REG_QUEUE_NUM, size);
        w(t, REG_QUEUE_DESC_LOW, base as u32);
        w(t, REG_QUEUE_DESC_HIGH, (base >> 32) as u32);
        w(t, REG_QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        w(t, REG_QUEUE_DRIVER_HIGH, 0);
        w(t, REG_QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        w(t, REG_QUEUE_DEVICE_HIGH, 0);
        w(t, REG_QUEUE_READY, 1);
    }

    fn bring_up(t: &mut MmioTransport, features: u64) {
        negotiate(t, features);
        setup_queue(t, 0, 128, 0x1_0000);
        setup_queue(t, 1, 16, 0x2_0000);
        w(t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _, _) = transport();
        assert_eq!(r(&mut t, REG_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 4);
        assert_eq!(r(&mut t, REG_VENDOR_ID), 0);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), FEATURES as u32);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), (FEATURES >> 32) as u32);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 2);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 0);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 256);
        w(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 16);
        assert_eq!(t.num_queues(), 2);
        assert_eq!(r(&mut t, REG_CONFIG_GENERATION), 0);
        assert_eq!(r(&mut t, REG_SHM_LEN_LOW), u32::MAX);
    }

    #[test]
    fn wrong_access_sizes_are_ignored() {
        let (mut t, _, _) = transport();
        let mut b2 = [0u8; 2];
        t.read(REG_MAGIC_VALUE, &mut b2);
        assert_eq!(b2, [0, 0]);
        let mut b8 = [0u8; 8];
        t.read(REG_MAGIC_VALUE, &mut b8);
        assert_eq!(b8, [0; 8]);
        t.write(REG_STATUS, &[ACKNOWLEDGE as u8]);
        assert_eq!(t.status(), 0);
        t.write(REG_STATUS, &u64::from(ACKNOWLEDGE).to_le_bytes());
        assert_eq!(t.status(), 0);
        // Unaligned 4-byte access: not a register.
        assert_eq!(r(&mut t, 2), 0);
        // Config space takes any size.
        let mut b1 = [0u8; 1];
        t.read(CONFIG_SPACE_OFFSET + 1, &mut b1);
        assert_eq!(b1, [0x22]);
        t.read(CONFIG_SPACE_OFFSET + 6, &mut b2);
        assert_eq!(b2, [0x77, 0x88]);
        // Beyond the device's config: left zero.
        assert_eq!(r(&mut t, CONFIG_SPACE_OFFSET + 6), 0x8877);
    }

    #[test]
    fn feature_negotiation_refuses_unoffered_features() {
        let (mut t, _, _) = transport();
        negotiate(&mut t, FEATURES | (1 << 5));
        assert_eq!(t.status(), ACKNOWLEDGE | DRIVER, "FEATURES_OK must stay clear");
        // The driver may retry with a valid set... after a reset.
        w(&mut t, REG_STATUS, 0);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        assert_eq!(t.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(t.acked_features(), VIRTIO_F_VERSION_1);
        // Features are frozen after FEATURES_OK.
        w(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        w(&mut t, REG_DRIVER_FEATURES, 1);
        assert_eq!(t.acked_features(), VIRTIO_F_VERSION_1);
    }

    #[test]
    fn version_1_is_required() {
        let (mut t, _, _) = transport();
        negotiate(&mut t, 1);
        assert_eq!(t.status(), ACKNOWLEDGE | DRIVER);
    }

    #[test]
    fn status_transitions_must_be_in_order() {
        let (mut t, _, _) = transport();
        w(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER);
        assert_eq!(t.status(), 0);
        w(&mut t, REG_STATUS, ACKNOWLEDGE);
        w(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(t.status(), ACKNOWLEDGE);
        // Features before DRIVER are ignored.
        w(&mut t, REG_DRIVER_FEATURES, 1);
        assert_eq!(t.acked_features(), 0);
    }

    #[test]
    fn queue_setup_and_activation() {
        let (mut t, state, _) = transport();
        // Queue registers are read-only before FEATURES_OK.
        w(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        bring_up(&mut t, FEATURES);
        assert!(t.is_activated());
        assert_eq!(t.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        let s = state.lock().unwrap();
        assert_eq!(s.acked, FEATURES);
        assert_eq!(s.queues, vec![(128, true, 0x1_0000), (16, true, 0x2_0000)]);
        drop(s);
        // Queue registers are frozen after DRIVER_OK.
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_READY, 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
        assert!(t.device_as_mut::<Dummy>().is_some());
    }

    #[test]
    fn event_idx_follows_negotiation() {
        let (mut t, state, _) = transport();
        bring_up(&mut t, VIRTIO_F_VERSION_1);
        assert!(!state.lock().unwrap().queues[0].1);
    }

    #[test]
    fn bad_queue_values_are_ignored() {
        let (mut t, _, _) = transport();
        negotiate(&mut t, FEATURES);
        w(&mut t, REG_QUEUE_SEL, 7);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        w(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        w(&mut t, REG_QUEUE_SEL, u32::MAX);
        w(&mut t, REG_QUEUE_NUM, 4);
        w(&mut t, REG_QUEUE_SEL, 0);
        for bad in [0, 3, 100, 512, 0x1_0000 + 64] {
            w(&mut t, REG_QUEUE_NUM, bad);
            assert_eq!(t.queues[0].size, 256, "size {bad}");
        }
        w(&mut t, REG_QUEUE_NUM, 64);
        assert_eq!(t.queues[0].size, 64);
    }

    #[test]
    fn failed_activation_sets_needs_reset() {
        let (mut t, state, irq) = transport();
        state.lock().unwrap().fail_activate = true;
        bring_up(&mut t, FEATURES);
        assert!(!t.is_activated());
        assert_ne!(t.status() & DEVICE_NEEDS_RESET, 0);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(irq.count(), 1);
        // Reset clears it and the device can come up.
        w(&mut t, REG_STATUS, 0);
        assert_eq!(t.status(), 0);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
        state.lock().unwrap().fail_activate = false;
        bring_up(&mut t, FEATURES);
        assert!(t.is_activated());
    }

    #[test]
    fn queue_outside_memory_fails_activation() {
        let (mut t, _, _) = transport();
        negotiate(&mut t, FEATURES);
        setup_queue(&mut t, 0, 256, 0xff_f000);
        setup_queue(&mut t, 1, 16, 0x2_0000);
        w(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert!(!t.is_activated());
        assert_ne!(t.status() & DEVICE_NEEDS_RESET, 0);
        // Notifications to a failed device go nowhere.
        t.notify_queue(0);
    }

    #[test]
    fn unready_queue_fails_activation() {
        let (mut t, _, _) = transport();
        negotiate(&mut t, FEATURES);
        setup_queue(&mut t, 0, 256, 0x1_0000);
        w(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert!(!t.is_activated());
        assert_ne!(t.status() & DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn misaligned_ring_fails_activation() {
        let (mut t, _, _) = transport();
        negotiate(&mut t, FEATURES);
        setup_queue(&mut t, 0, 256, 0x1_0001);
        setup_queue(&mut t, 1, 16, 0x2_0000);
        w(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert!(!t.is_activated());
    }

    #[test]
    fn notify_and_interrupt_ack() {
        let (mut t, state, irq) = transport();
        // Before activation: nothing happens.
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        assert!(state.lock().unwrap().processed.is_empty());
        bring_up(&mut t, FEATURES);
        w(&mut t, REG_QUEUE_NOTIFY, 1);
        t.notify_queue(0);
        t.notify_queue(2);
        t.notify_queue(u32::MAX);
        assert_eq!(state.lock().unwrap().processed, vec![1, 0]);
        assert_eq!(irq.count(), 2);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        w(&mut t, REG_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn device_error_sets_needs_reset() {
        let (mut t, state, _) = transport();
        bring_up(&mut t, FEATURES);
        state.lock().unwrap().needs_reset = true;
        t.notify_queue(0);
        assert_ne!(t.status() & DEVICE_NEEDS_RESET, 0);
        assert_ne!(r(&mut t, REG_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG, 0);
        t.notify_queue(0);
        assert_eq!(state.lock().unwrap().processed, vec![0]);
    }

    #[test]
    fn reset_returns_to_initial_state() {
        let (mut t, state, _) = transport();
        bring_up(&mut t, FEATURES);
        w(&mut t, REG_STATUS, 0);
        assert_eq!(t.status(), 0);
        assert_eq!(t.acked_features(), 0);
        assert!(!t.is_activated());
        assert_eq!(state.lock().unwrap().resets, 1);
        w(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        assert_eq!(t.queues[0].size, 256);
        // And it comes back up.
        bring_up(&mut t, FEATURES);
        assert!(t.is_activated());
    }

    #[test]
    fn failed_reset_leaves_device_failed() {
        let (mut t, state, _) = transport();
        bring_up(&mut t, FEATURES);
        state.lock().unwrap().fail_reset = true;
        w(&mut t, REG_STATUS, 0);
        assert_eq!(t.status(), FAILED);
        w(&mut t, REG_STATUS, ACKNOWLEDGE);
        assert_eq!(t.status(), FAILED);
    }

    #[test]
    fn driver_failed_bit() {
        let (mut t, _, _) = transport();
        w(&mut t, REG_STATUS, ACKNOWLEDGE);
        w(&mut t, REG_STATUS, ACKNOWLEDGE | FAILED);
        assert_eq!(t.status(), ACKNOWLEDGE | FAILED);
        w(&mut t, REG_STATUS, 0);
        assert_eq!(t.status(), 0);
    }

    #[test]
    fn config_writes_reach_device() {
        let (mut t, state, _) = transport();
        t.write(CONFIG_SPACE_OFFSET + 4, &[1, 2]);
        assert_eq!(state.lock().unwrap().config_writes, vec![(4, vec![1, 2])]);
    }
}
