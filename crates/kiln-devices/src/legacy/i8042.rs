//! The i8042 PS/2 controller, as much of it as a Linux guest needs: the reset line (`reboot=k`) and
//! a keyboard that can send Ctrl-Alt-Del.
//!
//! One [`BusDevice`] over the PIO range 0x60..=0x64 (length 5): offset 0 is the data port (0x60),
//! offset 4 the command/status port (0x64). Offsets 1..=3 (0x61 is the PC speaker/NMI port on real
//! machines) read 0 and ignore writes.
//!
//! Controller commands implemented: read/write the command byte (0x20/0x60), self-test (0xAA →
//! 0x55), keyboard interface test (0xAB → 0x00), enable/disable the keyboard and aux ports, read/
//! write the output port (0xD0/0xD1, clearing bit 0 resets), write the keyboard output buffer
//! (0xD2), reset pulse (0xFE). There is no mouse: the aux loopback (0xD3) answers without the
//! AUXDATA status bit and the aux test (0xA9) reports a stuck clock, so Linux's probe decides
//! quickly that there is no aux port (no 500 ms timeouts). The keyboard behind the controller
//! ACKs commands and answers identify (0xF2), reset (0xFF), echo (0xEE) and scan-code set
//! (0xF0), so `atkbd` probes without timeouts too, with or without `i8042.dumbkbd`.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::interrupt::IrqTrigger;
use crate::metrics::I8042Metrics;

/// First port of the range.
pub const I8042_PIO_BASE: u64 = 0x60;
/// Length of the range (0x60..=0x64).
pub const I8042_PIO_LEN: u64 = 5;
/// The keyboard's interrupt line.
pub const I8042_KBD_IRQ: u32 = 1;

const OFS_DATA: u64 = 0;
const OFS_STATUS: u64 = 4;

// Status register bits.
const SB_OUT_DATA_AVAIL: u8 = 0x01;
const SB_SYSTEM_FLAG: u8 = 0x04;
const SB_LAST_WAS_CMD: u8 = 0x08;
const SB_KBD_UNLOCKED: u8 = 0x10;

// Command byte (controller configuration) bits.
const CB_KBD_INT: u8 = 0x01;
const CB_POST_OK: u8 = 0x04;
const CB_KBD_DISABLE: u8 = 0x10;
const CB_AUX_DISABLE: u8 = 0x20;
const CB_TRANSLATE: u8 = 0x40;

// Controller commands.
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xA7;
const CMD_AUX_ENABLE: u8 = 0xA8;
const CMD_AUX_TEST: u8 = 0xA9;
const CMD_SELF_TEST: u8 = 0xAA;
const CMD_KBD_TEST: u8 = 0xAB;
const CMD_KBD_DISABLE: u8 = 0xAD;
const CMD_KBD_ENABLE: u8 = 0xAE;
const CMD_READ_INPUT_PORT: u8 = 0xC0;
const CMD_READ_OUTP: u8 = 0xD0;
const CMD_WRITE_OUTP: u8 = 0xD1;
const CMD_WRITE_KBD_OUTBUF: u8 = 0xD2;
const CMD_WRITE_AUX_OUTBUF: u8 = 0xD3;
const CMD_WRITE_AUX: u8 = 0xD4;
const CMD_READ_TEST_INPUTS: u8 = 0xE0;
const CMD_RESET_CPU: u8 = 0xFE;

// Output port bits.
const OUTP_RESET_HIGH: u8 = 0x01;
const OUTP_A20: u8 = 0x02;

// Keyboard (device) commands and replies.
const KBD_CMD_SET_LEDS: u8 = 0xED;
const KBD_CMD_ECHO: u8 = 0xEE;
const KBD_CMD_SCANCODE_SET: u8 = 0xF0;
const KBD_CMD_GET_ID: u8 = 0xF2;
const KBD_CMD_SET_REP: u8 = 0xF3;
const KBD_CMD_RESET: u8 = 0xFF;
const KBD_ACK: u8 = 0xFA;
const KBD_SELF_TEST_OK: u8 = 0xAA;

/// Output buffer size: bounded, a flood of keys drops the newest bytes.
const BUF_SIZE: usize = 32;

/// Make and break codes, scan code set 1 (what the guest sees with translation on).
const CAD_SET1: &[u8] = &[
    0x1D, // Left Ctrl
    0x38, // Left Alt
    0xE0, 0x53, // Delete
    0xE0, 0xD3, // Delete released
    0xB8, // Alt released
    0x9D, // Ctrl released
];
/// Make and break codes, scan code set 2 (no translation; what Firecracker sends).
const CAD_SET2: &[u8] = &[
    0x14, // Left Ctrl
    0x11, // Left Alt
    0xE0, 0x71, // Delete
    0xE0, 0xF0, 0x71, // Delete released
    0xF0, 0x11, // Alt released
    0xF0, 0x14, // Ctrl released
];

#[derive(Debug, thiserror::Error)]
pub enum I8042Error {
    #[error("the i8042 output buffer is full")]
    BufferFull,
    #[error("failed to raise the keyboard interrupt")]
    Irq(#[source] io::Error),
}

/// What a data-port write means, given the previous write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    None,
    /// Controller command waiting for its data byte.
    Ctrl(u8),
    /// Keyboard command waiting for its argument byte.
    Kbd(u8),
}

/// The i8042 controller with its keyboard. Insert it on the PIO bus at [`I8042_PIO_BASE`] with
/// length [`I8042_PIO_LEN`].
pub struct I8042Device {
    reset_evt: EventFd,
    kbd_irq: Arc<dyn IrqTrigger>,
    status: u8,
    control: u8,
    outp: u8,
    pending: Pending,
    /// Scan code set the keyboard was told to use (1, 2 or 3).
    scancode_set: u8,
    buf: VecDeque<u8>,
    /// Reset pulses seen; Linux pulses several times while the VMM is stopping the VM.
    resets: u32,
    metrics: Arc<I8042Metrics>,
}

impl std::fmt::Debug for I8042Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042Device")
            .field("status", &self.status)
            .field("control", &self.control)
            .field("queued", &self.buf.len())
            .finish()
    }
}

impl I8042Device {
    /// A controller that writes 1 to `reset_evt` when the guest pulses the reset line and raises
    /// `kbd_irq` (IRQ 1) when keyboard bytes are queued.
    pub fn new(reset_evt: EventFd, kbd_irq: Arc<dyn IrqTrigger>) -> Self {
        Self {
            reset_evt,
            kbd_irq,
            status: SB_KBD_UNLOCKED,
            // Translation off, as Firecracker's controller: Linux then talks to the keyboard
            // directly (scan code set 2).
            control: CB_POST_OK | CB_KBD_INT,
            outp: OUTP_RESET_HIGH | OUTP_A20,
            pending: Pending::None,
            scancode_set: 2,
            buf: VecDeque::with_capacity(BUF_SIZE),
            resets: 0,
            metrics: Arc::new(I8042Metrics::default()),
        }
    }

    /// The device's counters, for the VMM's metrics.
    pub fn metrics_handle(&self) -> Arc<I8042Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Presses and releases Ctrl+Alt+Del and raises IRQ 1: a Linux guest's keyboard driver turns
    /// it into `ctrl_alt_del()` (SIGINT to init, which shuts down). Fails without queueing
    /// anything if the output buffer has no room for the whole sequence.
    pub fn trigger_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        let seq = if self.translating() || self.scancode_set == 1 { CAD_SET1 } else { CAD_SET2 };
        if BUF_SIZE - self.buf.len() < seq.len() {
            return Err(I8042Error::BufferFull);
        }
        self.buf.extend(seq);
        self.status |= SB_OUT_DATA_AVAIL;
        self.kbd_irq.trigger().map_err(I8042Error::Irq)
    }

    fn translating(&self) -> bool {
        self.control & CB_TRANSLATE != 0
    }

    fn push(&mut self, byte: u8) {
        if self.buf.len() >= BUF_SIZE {
            tracing::debug!("i8042: output buffer full, dropping {byte:#04x}");
            return;
        }
        self.buf.push_back(byte);
        self.status |= SB_OUT_DATA_AVAIL;
    }

    fn pop(&mut self) -> u8 {
        let byte = self.buf.pop_front().unwrap_or(0);
        if self.buf.is_empty() {
            self.status &= !SB_OUT_DATA_AVAIL;
        }
        byte
    }

    /// A controller command's reply: replaces whatever was queued (the guest flushes before
    /// commands anyway) and does not interrupt (Linux polls for command replies).
    fn reply(&mut self, byte: u8) {
        self.buf.clear();
        self.push(byte);
    }

    /// Bytes from the keyboard: queued and announced with IRQ 1 when the guest enabled it.
    fn kbd_reply(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.push(b);
        }
        self.kbd_interrupt();
    }

    fn kbd_interrupt(&self) {
        if self.control & CB_KBD_INT == 0 {
            return;
        }
        if let Err(e) = self.kbd_irq.trigger() {
            tracing::warn!("i8042: failed to raise the keyboard interrupt: {e}");
        }
    }

    fn reset(&mut self) {
        self.resets += 1;
        self.metrics.reset_count.inc();
        if self.resets == 1 {
            tracing::info!("i8042: guest pulsed the reset line");
        } else {
            tracing::debug!("i8042: guest pulsed the reset line again ({} times)", self.resets);
        }
        if let Err(e) = self.reset_evt.write(1) {
            tracing::error!("i8042: failed to signal the reset event: {e}");
        }
    }

    fn write_command(&mut self, cmd: u8) {
        self.status |= SB_LAST_WAS_CMD;
        self.pending = Pending::None;
        match cmd {
            CMD_READ_CTR => self.reply(self.control),
            CMD_WRITE_CTR | CMD_WRITE_OUTP | CMD_WRITE_KBD_OUTBUF | CMD_WRITE_AUX_OUTBUF | CMD_WRITE_AUX => {
                self.pending = Pending::Ctrl(cmd)
            }
            CMD_AUX_DISABLE => self.control |= CB_AUX_DISABLE,
            CMD_AUX_ENABLE => self.control &= !CB_AUX_DISABLE,
            // "Clock line stuck low": there is no aux port.
            CMD_AUX_TEST => self.reply(0x01),
            CMD_SELF_TEST => {
                self.status |= SB_SYSTEM_FLAG;
                self.reply(0x55);
            }
            CMD_KBD_TEST => self.reply(0x00),
            CMD_KBD_DISABLE => self.control |= CB_KBD_DISABLE,
            CMD_KBD_ENABLE => self.control &= !CB_KBD_DISABLE,
            CMD_READ_INPUT_PORT | CMD_READ_TEST_INPUTS => self.reply(0x00),
            CMD_READ_OUTP => self.reply(self.outp),
            CMD_RESET_CPU => self.reset(),
            other => tracing::debug!("i8042: ignoring controller command {other:#04x}"),
        }
    }

    fn write_data(&mut self, byte: u8) {
        self.status &= !SB_LAST_WAS_CMD;
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::Ctrl(CMD_WRITE_CTR) => self.control = byte,
            Pending::Ctrl(CMD_WRITE_OUTP) => {
                self.outp = byte;
                if byte & OUTP_RESET_HIGH == 0 {
                    self.reset();
                }
            }
            Pending::Ctrl(CMD_WRITE_KBD_OUTBUF) => self.kbd_reply(&[byte]),
            // Loop the byte back, but as keyboard data: without the AUXDATA bit Linux concludes
            // at once that there is no aux port.
            Pending::Ctrl(CMD_WRITE_AUX_OUTBUF) => self.reply(byte),
            // Bytes for a mouse that isn't there.
            Pending::Ctrl(_) => {}
            Pending::Kbd(cmd) => self.kbd_argument(cmd, byte),
            Pending::None => self.kbd_command(byte),
        }
    }

    fn kbd_command(&mut self, cmd: u8) {
        match cmd {
            KBD_CMD_SET_LEDS | KBD_CMD_SET_REP | KBD_CMD_SCANCODE_SET => {
                self.pending = Pending::Kbd(cmd);
                self.kbd_reply(&[KBD_ACK]);
            }
            KBD_CMD_ECHO => self.kbd_reply(&[KBD_CMD_ECHO]),
            KBD_CMD_GET_ID => {
                // MF2 keyboard; the controller translates the second byte when translating.
                let id2 = if self.translating() { 0x41 } else { 0x83 };
                self.kbd_reply(&[KBD_ACK, 0xAB, id2]);
            }
            KBD_CMD_RESET => {
                self.scancode_set = 2;
                self.kbd_reply(&[KBD_ACK, KBD_SELF_TEST_OK]);
            }
            // Enable, disable, set defaults, typematic/make/break modes, resend...: ACK.
            _ => self.kbd_reply(&[KBD_ACK]),
        }
    }

    fn kbd_argument(&mut self, cmd: u8, arg: u8) {
        if cmd == KBD_CMD_SCANCODE_SET {
            match arg {
                0 => {
                    // Get the current set; reported translated when translating.
                    let set = match (self.translating(), self.scancode_set) {
                        (true, 1) => 0x43,
                        (true, 2) => 0x41,
                        (true, _) => 0x3f,
                        (false, s) => s,
                    };
                    self.kbd_reply(&[KBD_ACK, set]);
                    return;
                }
                1..=3 => self.scancode_set = arg,
                _ => {}
            }
        }
        self.kbd_reply(&[KBD_ACK]);
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            self.metrics.missed_read_count.inc();
            return;
        }
        self.metrics.read_count.inc();
        data[0] = match offset {
            OFS_DATA => {
                let byte = self.pop();
                // Linux's handler reads one byte per interrupt; announce the next one.
                if !self.buf.is_empty() {
                    self.kbd_interrupt();
                }
                byte
            }
            OFS_STATUS => self.status,
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            self.metrics.missed_write_count.inc();
            return;
        }
        self.metrics.write_count.inc();
        match offset {
            OFS_DATA => self.write_data(data[0]),
            OFS_STATUS => self.write_command(data[0]),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::CountingIrq;

    fn dev() -> (I8042Device, EventFd, Arc<CountingIrq>) {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = Arc::new(CountingIrq::default());
        (I8042Device::new(evt.try_clone().unwrap(), irq.clone()), evt, irq)
    }

    fn read(d: &mut I8042Device, ofs: u64) -> u8 {
        let mut b = [0u8];
        d.read(ofs, &mut b);
        b[0]
    }

    fn drain(d: &mut I8042Device) -> Vec<u8> {
        let mut v = Vec::new();
        while read(d, OFS_STATUS) & SB_OUT_DATA_AVAIL != 0 {
            v.push(read(d, OFS_DATA));
        }
        v
    }

    #[test]
    fn reset_writes_the_eventfd() {
        let (mut d, evt, _) = dev();
        assert!(evt.read().is_err());
        d.write(OFS_STATUS, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
        // Wrong size: ignored.
        d.write(OFS_STATUS, &[CMD_RESET_CPU, 0]);
        assert!(evt.read().is_err());
        // Output port write with the reset bit low resets too.
        d.write(OFS_STATUS, &[CMD_WRITE_OUTP]);
        d.write(OFS_DATA, &[0x02]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn controller_probe_sequence() {
        let (mut d, _, irq) = dev();
        assert_eq!(read(&mut d, OFS_STATUS) & SB_OUT_DATA_AVAIL, 0);
        d.write(OFS_STATUS, &[CMD_SELF_TEST]);
        assert_eq!(drain(&mut d), vec![0x55]);
        assert_ne!(read(&mut d, OFS_STATUS) & SB_SYSTEM_FLAG, 0);
        d.write(OFS_STATUS, &[CMD_READ_CTR]);
        assert_eq!(drain(&mut d), vec![CB_POST_OK | CB_KBD_INT]);
        d.write(OFS_STATUS, &[CMD_WRITE_CTR]);
        d.write(OFS_DATA, &[0x47]);
        d.write(OFS_STATUS, &[CMD_READ_CTR]);
        assert_eq!(drain(&mut d), vec![0x47]);
        d.write(OFS_STATUS, &[CMD_KBD_TEST]);
        assert_eq!(drain(&mut d), vec![0x00]);
        // No aux port: loopback answers as keyboard data, aux test fails.
        d.write(OFS_STATUS, &[CMD_WRITE_AUX_OUTBUF]);
        d.write(OFS_DATA, &[0x5a]);
        assert_eq!(read(&mut d, OFS_STATUS) & 0x20, 0);
        assert_eq!(drain(&mut d), vec![0x5a]);
        d.write(OFS_STATUS, &[CMD_AUX_TEST]);
        assert_eq!(drain(&mut d), vec![0x01]);
        // Controller replies do not interrupt.
        assert_eq!(irq.count(), 0);
        // Unused ports and sizes read 0.
        assert_eq!(read(&mut d, 1), 0);
        let mut w = [0xffu8; 2];
        d.read(OFS_STATUS, &mut w);
        assert_eq!(w, [0xff, 0xff]);
    }

    #[test]
    fn keyboard_commands_are_answered_with_interrupts() {
        let (mut d, _, irq) = dev();
        d.write(OFS_DATA, &[KBD_CMD_GET_ID]);
        assert_eq!(irq.count(), 1);
        assert_eq!(read(&mut d, OFS_DATA), KBD_ACK);
        // Each further byte is announced again.
        assert_eq!(irq.count(), 2);
        assert_eq!(drain(&mut d), vec![0xAB, 0x83]);
        d.write(OFS_DATA, &[KBD_CMD_SET_LEDS]);
        d.write(OFS_DATA, &[0x00]);
        assert_eq!(drain(&mut d), vec![KBD_ACK, KBD_ACK]);
        d.write(OFS_DATA, &[KBD_CMD_SCANCODE_SET]);
        d.write(OFS_DATA, &[0]);
        assert_eq!(drain(&mut d), vec![KBD_ACK, KBD_ACK, 2]);
        d.write(OFS_DATA, &[KBD_CMD_RESET]);
        assert_eq!(drain(&mut d), vec![KBD_ACK, KBD_SELF_TEST_OK]);
        // Interrupts off in the command byte: bytes queue silently.
        d.write(OFS_STATUS, &[CMD_WRITE_CTR]);
        d.write(OFS_DATA, &[CB_POST_OK]);
        let before = irq.count();
        d.write(OFS_DATA, &[0xF4]);
        assert_eq!(irq.count(), before);
        assert_eq!(drain(&mut d), vec![KBD_ACK]);
    }

    #[test]
    fn ctrl_alt_del_queues_set2_and_raises_irq1() {
        let (mut d, evt, irq) = dev();
        d.trigger_ctrl_alt_del().unwrap();
        assert_eq!(irq.count(), 1);
        assert_eq!(drain(&mut d), CAD_SET2.to_vec());
        // It is a key press, not a reset.
        assert!(evt.read().is_err());
    }

    #[test]
    fn ctrl_alt_del_uses_set1_when_translating() {
        let (mut d, _, irq) = dev();
        d.write(OFS_STATUS, &[CMD_WRITE_CTR]);
        d.write(OFS_DATA, &[CB_POST_OK | CB_KBD_INT | CB_TRANSLATE]);
        d.trigger_ctrl_alt_del().unwrap();
        assert_eq!(irq.count(), 1);
        assert_eq!(drain(&mut d), CAD_SET1.to_vec());
    }

    #[test]
    fn output_buffer_is_bounded() {
        let (mut d, _, _) = dev();
        for _ in 0..100 {
            d.write(OFS_DATA, &[KBD_CMD_GET_ID]);
        }
        assert!(matches!(d.trigger_ctrl_alt_del(), Err(I8042Error::BufferFull)));
        assert_eq!(drain(&mut d).len(), BUF_SIZE);
        d.trigger_ctrl_alt_del().unwrap();
    }
}
