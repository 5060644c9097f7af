//! Firecracker's boot timer: the guest writes the byte 123 at offset 0 of an MMIO page (the VMM
//! maps it at `0xc000_0000`, length `0x1000`) when it considers itself booted, and the VMM logs how
//! long that took since the VMM process started, in wall-clock and in process CPU time:
//!
//! `Guest-boot-time = {wall_us:>6} us {wall_ms} ms, {cpu_us:>6} CPU us {cpu_ms} CPU ms`
//!
//! Every other access is ignored; reads return 0.

use std::time::Instant;

use crate::bus::BusDevice;

/// Guest-physical base the VMM maps the boot timer at.
pub const BOOT_TIMER_MMIO_BASE: u64 = 0xc000_0000;
/// Length of the boot timer's MMIO range.
pub const BOOT_TIMER_MMIO_LEN: u64 = 0x1000;
/// The value a guest writes to say "booted".
pub const MAGIC_BOOT_COMPLETE: u8 = 123;

/// When the VMM process started, as both clocks saw it.
#[derive(Clone, Copy, Debug)]
pub struct StartTime {
    pub wall: Instant,
    /// Process CPU time already consumed at `wall`, in microseconds.
    pub cpu_us: u64,
}

impl StartTime {
    /// Now. Call it as early as possible in `main`.
    pub fn now() -> Self {
        Self { wall: Instant::now(), cpu_us: process_cpu_time_us() }
    }
}

/// One measurement: time from [`StartTime`] to the guest's signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootTime {
    pub wall_us: u64,
    pub cpu_us: u64,
}

impl std::fmt::Display for BootTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Guest-boot-time = {:>6} us {} ms, {:>6} CPU us {} CPU ms",
            self.wall_us,
            self.wall_us / 1000,
            self.cpu_us,
            self.cpu_us / 1000
        )
    }
}

/// Process CPU time (user + system, all threads) in microseconds; 0 if the clock is unavailable.
pub fn process_cpu_time_us() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec that outlives the call; clock_gettime only
    // writes to it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000).saturating_add(nanos / 1000)
}

/// The boot timer device.
#[derive(Debug)]
pub struct BootTimer {
    start: StartTime,
    last: Option<BootTime>,
}

impl BootTimer {
    pub fn new(start: StartTime) -> Self {
        Self { start, last: None }
    }

    /// The last measurement, if the guest signalled.
    pub fn boot_time(&self) -> Option<BootTime> {
        self.last
    }

    fn measure(&mut self) -> BootTime {
        let wall_us = u64::try_from(self.start.wall.elapsed().as_micros()).unwrap_or(u64::MAX);
        let cpu_us = process_cpu_time_us().saturating_sub(self.start.cpu_us);
        BootTime { wall_us, cpu_us }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data == [MAGIC_BOOT_COMPLETE] {
            let t = self.measure();
            tracing::info!("{t}");
            self.last = Some(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_write_records_and_others_do_not() {
        let mut t = BootTimer::new(StartTime::now());
        t.write(0, &[122]);
        t.write(1, &[123]);
        t.write(0, &[123, 0]);
        t.write(0, &[123, 0, 0, 0]);
        assert_eq!(t.boot_time(), None);
        std::thread::sleep(std::time::Duration::from_millis(2));
        t.write(0, &[123]);
        let bt = t.boot_time().unwrap();
        assert!(bt.wall_us >= 2000, "{bt:?}");
        let mut b = [0xffu8; 4];
        t.read(0, &mut b);
        assert_eq!(b, [0; 4]);
        // A second signal replaces the measurement.
        std::thread::sleep(std::time::Duration::from_millis(1));
        t.write(0, &[123]);
        assert!(t.boot_time().unwrap().wall_us > bt.wall_us);
    }

    #[test]
    fn log_line_format() {
        let bt = BootTime { wall_us: 123_456, cpu_us: 789 };
        assert_eq!(bt.to_string(), "Guest-boot-time = 123456 us 123 ms,    789 CPU us 0 CPU ms");
    }

    #[test]
    fn cpu_clock_advances() {
        let start = StartTime::now();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        assert!(process_cpu_time_us() >= start.cpu_us);
    }
}
