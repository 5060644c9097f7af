//! COM1: a 16550A UART (vm-superio's `Serial`) on an 8-byte PIO range (0x3f8, IRQ 4).
//!
//! Output goes to a host writer and is flushed after every byte so interactive consoles work. A
//! failing writer (closed stdout, full pipe) loses bytes but never stops the guest. Input is
//! bounded by the UART FIFO: the VMM asks [`SerialDevice::input_space`] before reading from its
//! input source and hands over at most that much with [`SerialDevice::enqueue_input`].
//!
//! Output may be rate limited ([`SerialDevice::limit_output`], Firecracker's `serial.rate_limiter`):
//! bytes beyond the bucket are dropped, never delayed, so a chatty guest cannot stall its vCPU.
//! Counters are in [`SerialMetrics`] (Firecracker's `uart` section).

use std::io::{self, Write};
use std::sync::Arc;
use std::time::Instant;

use vm_superio::serial::{Error as SerialError, SerialEvents};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::interrupt::IrqTrigger;
use crate::metrics::SerialMetrics;
use crate::rate_limiter::{TokenBucket, TokenBucketConfig};

/// Length of the UART's PIO range.
pub const SERIAL_PIO_LEN: u64 = 8;
/// COM1's base port.
pub const COM1_PIO_BASE: u64 = 0x3f8;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;

/// Adapts an [`IrqTrigger`] to vm-superio's `Trigger`.
struct IrqAdapter(Arc<dyn IrqTrigger>);

impl Trigger for IrqAdapter {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// Serial events: counts bytes, and tells the VMM (optionally) when the guest drained the input
/// FIFO, so it can resume reading its input source.
struct InputEvents {
    input_drained: Option<EventFd>,
    metrics: Arc<SerialMetrics>,
}

impl SerialEvents for InputEvents {
    fn buffer_read(&self) {
        self.metrics.read_count.inc();
    }
    fn out_byte(&self) {
        self.metrics.write_count.inc();
    }
    fn tx_lost_byte(&self) {
        self.metrics.missed_write_count.inc();
    }
    fn in_buffer_empty(&self) {
        if let Some(evt) = &self.input_drained {
            if let Err(e) = evt.write(1) {
                tracing::warn!("serial: failed to signal drained input FIFO: {e}");
            }
        }
    }
}

/// Register offsets and bits tracked here (the rest is vm-superio's).
const REG_IER: u64 = 1;
const REG_LCR: u64 = 3;
const LCR_DLAB: u8 = 0x80;
const IER_RDI: u8 = 0x01;

/// The host side of the console output: the VMM's writer, behind an optional byte bucket.
struct Output {
    out: Box<dyn Write + Send>,
    limit: Option<TokenBucket>,
    metrics: Arc<SerialMetrics>,
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(bucket) = self.limit.as_mut() {
            if !bucket.try_take(buf.len() as u64, Instant::now()) {
                // Dropped, as Firecracker does: the guest is never held up by its console.
                self.metrics.rate_limiter_dropped_bytes.add(buf.len() as u64);
                return Ok(buf.len());
            }
        }
        self.out.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.metrics.flush_count.inc();
        self.out.flush()
    }
}

type Uart = Serial<IrqAdapter, InputEvents, Output>;

/// COM1 as a [`BusDevice`]. Insert it on the PIO bus at [`COM1_PIO_BASE`] with length
/// [`SERIAL_PIO_LEN`].
pub struct SerialDevice {
    uart: Uart,
    /// Whether the last output write failed; used to log a failing writer once, not per byte.
    out_broken: bool,
    /// Line control and interrupt enable registers as the guest last wrote them. Input is only
    /// accepted once the guest's driver listens (IER "received data available" set): Linux's 8250
    /// driver clears the FIFO when it starts the port, so bytes queued earlier would be lost.
    lcr: u8,
    ier: u8,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("input_space", &self.input_space())
            .field("out_broken", &self.out_broken)
            .finish()
    }
}

impl SerialDevice {
    /// A UART raising `irq` and writing guest output to `out`.
    pub fn new(irq: Arc<dyn IrqTrigger>, out: Box<dyn Write + Send>) -> Self {
        Self::build(irq, out, None)
    }

    /// Like [`Self::new`], and also signals `input_drained` whenever the guest empties the input
    /// FIFO (lets the VMM stop reading its input source while the FIFO is full and resume once
    /// there is room again).
    pub fn with_input_drained_evt(
        irq: Arc<dyn IrqTrigger>,
        out: Box<dyn Write + Send>,
        input_drained: EventFd,
    ) -> Self {
        Self::build(irq, out, Some(input_drained))
    }

    fn build(irq: Arc<dyn IrqTrigger>, out: Box<dyn Write + Send>, evt: Option<EventFd>) -> Self {
        let metrics = Arc::new(SerialMetrics::default());
        let events = InputEvents { input_drained: evt, metrics: metrics.clone() };
        let out = Output { out, limit: None, metrics };
        Self { uart: Serial::with_events(IrqAdapter(irq), events, out), out_broken: false, lcr: 0, ier: 0 }
    }

    /// The device's counters, for the VMM's metrics.
    pub fn metrics_handle(&self) -> Arc<SerialMetrics> {
        Arc::clone(&self.uart.writer().metrics)
    }

    /// Limits the output bandwidth to a byte bucket (`None`, zero size or zero refill time: no
    /// limit); output beyond it is dropped and counted.
    pub fn limit_output(&mut self, cfg: Option<TokenBucketConfig>) {
        self.uart.writer_mut().limit = cfg.and_then(|c| TokenBucket::new(&c, Instant::now()));
    }

    /// Queues bytes for the guest to read. Returns how many were accepted: at most
    /// [`Self::input_space`], so the FIFO never grows past the UART's 64 bytes.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.input_space());
        if n == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..n]) {
            Ok(accepted) => accepted,
            // The bytes are in the FIFO; only raising the interrupt failed.
            Err(SerialError::Trigger(e)) => {
                tracing::warn!("serial: failed to raise the interrupt: {e}");
                n
            }
            Err(e) => {
                tracing::debug!("serial: input not accepted: {e}");
                0
            }
        }
    }

    /// Free space in the input FIFO, in bytes; 0 until the guest enables the receive interrupt, so
    /// input waits on the host side instead of being cleared away by the guest's driver.
    pub fn input_space(&self) -> usize {
        if self.ier & IER_RDI == 0 {
            return 0;
        }
        self.uart.fifo_capacity()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset >= SERIAL_PIO_LEN {
            return;
        }
        // `offset < 8`, so the cast is lossless.
        data[0] = self.uart.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset >= SERIAL_PIO_LEN {
            return;
        }
        match offset {
            REG_LCR => self.lcr = data[0],
            REG_IER if self.lcr & LCR_DLAB == 0 => self.ier = data[0],
            _ => {}
        }
        match self.uart.write(offset as u8, data[0]) {
            Ok(()) => {
                if self.out_broken {
                    tracing::info!("serial: output writer works again");
                    self.out_broken = false;
                }
            }
            Err(SerialError::IOError(e)) => {
                if !self.out_broken {
                    tracing::warn!("serial: guest output lost, writing it failed: {e}");
                    self.out_broken = true;
                }
            }
            Err(e) => tracing::warn!("serial: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::CountingIrq;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct BrokenPipe;

    impl Write for BrokenPipe {
        fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
    }

    const IER: u64 = 1;
    const LSR: u64 = 5;

    #[test]
    fn output_reaches_writer() {
        let irq = Arc::new(CountingIrq::default());
        let buf = SharedBuf::default();
        let mut dev = SerialDevice::new(irq.clone(), Box::new(buf.clone()));
        for b in b"hello" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*buf.0.lock().unwrap(), b"hello");
        // Wrong sizes and offsets are ignored.
        dev.write(0, b"xy");
        dev.write(8, b"z");
        let mut w = [0u8; 2];
        dev.read(0, &mut w);
        assert_eq!(w, [0, 0]);
        assert_eq!(&*buf.0.lock().unwrap(), b"hello");
    }

    #[test]
    fn output_is_counted_and_a_rate_limit_drops_the_excess() {
        let buf = SharedBuf::default();
        let mut dev = SerialDevice::new(Arc::new(CountingIrq::default()), Box::new(buf.clone()));
        let m = dev.metrics_handle();
        // 10 bytes, refilled over a minute: the rest of a burst is dropped.
        dev.limit_output(Some(TokenBucketConfig { size: 10, one_time_burst: 0, refill_time_ms: 60_000 }));
        for b in b"0123456789abcdefghij" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*buf.0.lock().unwrap(), b"0123456789");
        assert_eq!(m.write_count.get(), 20, "the guest wrote 20 bytes");
        assert_eq!(m.rate_limiter_dropped_bytes.get(), 10);
        dev.limit_output(None);
        dev.write(0, b"!");
        assert_eq!(&*buf.0.lock().unwrap(), b"0123456789!");
    }

    #[test]
    fn broken_writer_does_not_stop_the_guest() {
        let irq = Arc::new(CountingIrq::default());
        let mut dev = SerialDevice::new(irq.clone(), Box::new(BrokenPipe));
        dev.write(IER, &[0x02]); // THR empty interrupt
        let before = irq.count();
        let mut iir = [0u8];
        for _ in 0..100 {
            dev.read(2, &mut iir); // acknowledges the THR empty interrupt
            dev.write(0, b"a");
        }
        // The transmitter still reports empty and the interrupt still comes.
        let mut lsr = [0u8];
        dev.read(LSR, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        assert_eq!(irq.count(), before + 100);
        assert!(dev.out_broken);
    }

    #[test]
    fn input_is_bounded_and_raises_interrupt() {
        let irq = Arc::new(CountingIrq::default());
        let mut dev = SerialDevice::new(irq.clone(), Box::new(io::sink()));
        dev.write(IER, &[0x01]); // received data available interrupt
        assert_eq!(dev.input_space(), 64);
        let input = [b'k'; 100];
        assert_eq!(dev.enqueue_input(&input), 64);
        assert_eq!(dev.input_space(), 0);
        assert_eq!(dev.enqueue_input(&input), 0);
        assert_eq!(dev.enqueue_input(&[]), 0);
        assert!(irq.count() >= 1);
        let mut lsr = [0u8];
        dev.read(LSR, &mut lsr);
        assert_eq!(lsr[0] & 0x01, 0x01);
        let mut b = [0u8];
        for _ in 0..64 {
            dev.read(0, &mut b);
            assert_eq!(b[0], b'k');
        }
        dev.read(LSR, &mut lsr);
        assert_eq!(lsr[0] & 0x01, 0);
        assert_eq!(dev.input_space(), 64);
    }

    #[test]
    fn input_waits_until_the_guest_listens() {
        let irq = Arc::new(CountingIrq::default());
        let mut dev = SerialDevice::new(irq, Box::new(io::sink()));
        assert_eq!(dev.input_space(), 0, "no driver yet: input stays on the host");
        assert_eq!(dev.enqueue_input(b"early"), 0);
        // With DLAB set, offset 1 is the divisor latch, not IER.
        dev.write(3, &[0x80]);
        dev.write(IER, &[0x01]);
        assert_eq!(dev.input_space(), 0);
        dev.write(3, &[0x03]);
        dev.write(IER, &[0x01]);
        assert_eq!(dev.input_space(), 64);
        assert_eq!(dev.enqueue_input(b"now"), 3);
        // The driver masking receive interrupts stops input again.
        dev.write(IER, &[0x02]);
        assert_eq!(dev.input_space(), 0);
    }

    #[test]
    fn drained_fifo_signals_event() {
        let irq = Arc::new(CountingIrq::default());
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev =
            SerialDevice::with_input_drained_evt(irq, Box::new(io::sink()), evt.try_clone().unwrap());
        dev.write(IER, &[0x01]);
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert!(evt.read().is_err(), "not drained yet");
        dev.read(0, &mut b);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
