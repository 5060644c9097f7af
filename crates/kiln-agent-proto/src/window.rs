//! Credit-based flow control, the same on both ends.
//!
//! Each flow-controlled channel of a stream starts with [`INITIAL_WINDOW`] bytes of credit for its
//! sender. The sender takes credit before sending data ([`SendWindow::take`] blocks until there is
//! some); the receiver counts what arrived ([`RecvWindow::received`], which refuses data beyond the
//! credit it granted: the peer broke the protocol) and returns credit as its consumer drains the
//! data ([`RecvWindow::consumed`] says when a [`crate::Message::Credit`] is worth sending). So a
//! receiver never buffers more than [`INITIAL_WINDOW`] bytes per channel, whatever the peer does.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::INITIAL_WINDOW;

/// Credit is returned once at least this much was consumed (fewer, larger Credit messages).
pub const CREDIT_BATCH: u32 = INITIAL_WINDOW / 4;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug)]
struct SendState {
    credit: u64,
    closed: bool,
}

/// The sender's side of one channel: how much it may still send.
#[derive(Debug)]
pub struct SendWindow {
    state: Mutex<SendState>,
    cond: Condvar,
}

impl Default for SendWindow {
    fn default() -> Self {
        Self::new(INITIAL_WINDOW)
    }
}

impl SendWindow {
    pub fn new(initial: u32) -> Self {
        SendWindow {
            state: Mutex::new(SendState { credit: initial as u64, closed: false }),
            cond: Condvar::new(),
        }
    }

    /// Waits until some credit is available and takes up to `max` bytes of it. `None` once the
    /// window is closed (the stream or the connection ended).
    pub fn take(&self, max: usize) -> Option<usize> {
        self.take_until(max, None)
    }

    /// Like [`SendWindow::take`] but gives up after `timeout` with `Some(0)`.
    pub fn take_timeout(&self, max: usize, timeout: Duration) -> Option<usize> {
        self.take_until(max, Some(Instant::now() + timeout))
    }

    fn take_until(&self, max: usize, deadline: Option<Instant>) -> Option<usize> {
        let mut s = lock(&self.state);
        loop {
            if s.closed {
                return None;
            }
            if s.credit > 0 {
                let n = (max as u64).min(s.credit);
                s.credit -= n;
                return Some(n as usize);
            }
            s = match deadline {
                None => self.cond.wait(s).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Some(0);
                    }
                    self.cond.wait_timeout(s, d - now).unwrap_or_else(|p| p.into_inner()).0
                }
            };
        }
    }

    /// Adds credit granted by the receiver (or returns credit taken but not used). Saturates: a peer
    /// granting absurd amounts only lets us send faster, it cannot overflow anything.
    pub fn add(&self, bytes: u64) {
        let mut s = lock(&self.state);
        s.credit = s.credit.saturating_add(bytes);
        self.cond.notify_all();
    }

    /// Wakes every waiter; later takes return `None`.
    pub fn close(&self) {
        lock(&self.state).closed = true;
        self.cond.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }
}

/// The receiver's side of one channel: what it granted and what is outstanding. Not thread-safe by
/// itself; keep it under the lock that guards the buffered data.
#[derive(Debug, Clone)]
pub struct RecvWindow {
    /// Bytes received and not yet returned as credit (buffered, or consumed but not credited).
    outstanding: u64,
    /// Consumed and not yet credited.
    unreported: u64,
    window: u64,
}

impl Default for RecvWindow {
    fn default() -> Self {
        Self::new(INITIAL_WINDOW)
    }
}

/// The peer sent more than the credit it had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditExceeded {
    pub outstanding: u64,
    pub window: u64,
}

impl RecvWindow {
    pub fn new(window: u32) -> Self {
        RecvWindow { outstanding: 0, unreported: 0, window: window as u64 }
    }

    /// Accounts `len` received bytes; an error when the peer exceeded its credit.
    pub fn received(&mut self, len: usize) -> Result<(), CreditExceeded> {
        let next = self.outstanding + len as u64;
        if next > self.window {
            return Err(CreditExceeded { outstanding: next, window: self.window });
        }
        self.outstanding = next;
        Ok(())
    }

    /// Accounts `len` consumed bytes; returns the credit to send now, if a batch is due.
    pub fn consumed(&mut self, len: usize) -> Option<u32> {
        self.unreported += len as u64;
        if self.unreported >= CREDIT_BATCH as u64 {
            Some(self.flush_credit())
        } else {
            None
        }
    }

    /// Returns all consumed-but-unreported credit (e.g. when the consumer is about to wait).
    pub fn flush_credit(&mut self) -> u32 {
        let n = self.unreported.min(u32::MAX as u64);
        self.unreported -= n;
        self.outstanding = self.outstanding.saturating_sub(n);
        n as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn send_window_blocks_until_credit_and_wakes_on_close() {
        let w = Arc::new(SendWindow::new(10));
        assert_eq!(w.take(4), Some(4));
        assert_eq!(w.take(100), Some(6));
        assert_eq!(w.take_timeout(1, Duration::from_millis(10)), Some(0));
        let w2 = w.clone();
        let t = std::thread::spawn(move || w2.take(100));
        std::thread::sleep(Duration::from_millis(20));
        w.add(7);
        assert_eq!(t.join().unwrap(), Some(7));
        let w2 = w.clone();
        let t = std::thread::spawn(move || w2.take(100));
        std::thread::sleep(Duration::from_millis(20));
        w.close();
        assert_eq!(t.join().unwrap(), None);
        w.add(u64::MAX);
        w.add(u64::MAX);
    }

    #[test]
    fn recv_window_refuses_overrun_and_batches_credit() {
        let mut r = RecvWindow::new(100);
        r.received(60).unwrap();
        r.received(40).unwrap();
        assert_eq!(r.received(1), Err(CreditExceeded { outstanding: 101, window: 100 }));
        // Batches are a quarter of the initial window; this tiny window credits on flush.
        assert_eq!(r.consumed(10), None);
        assert_eq!(r.flush_credit(), 10);
        r.received(10).unwrap();
        assert!(r.received(1).is_err());
        let mut big = RecvWindow::default();
        big.received(CREDIT_BATCH as usize).unwrap();
        assert_eq!(big.consumed(CREDIT_BATCH as usize - 1), None);
        assert_eq!(big.consumed(1), Some(CREDIT_BATCH));
        assert_eq!(big.flush_credit(), 0);
    }
}
