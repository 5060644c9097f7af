//! I/O rate limiting as Firecracker configures it: a [`RateLimiter`] holds up to two token buckets,
//! one counting bytes (`bandwidth`) and one counting operations (`ops`). Each bucket holds `size`
//! tokens, refills completely in `refill_time` milliseconds (continuously, not in steps), and may
//! grant a `one_time_burst` of extra tokens that never refill. A bucket with size or refill time 0
//! does not limit (Firecracker's rule).
//!
//! A device asks [`RateLimiter::consume`] before each request. When a bucket is short, the request
//! is refused, the limiter becomes *blocked* and arms its timerfd for the moment the tokens will be
//! there; the device stops processing that queue, lists [`RateLimiter::timer_fd`] in its host fds,
//! and on the timer's readiness calls [`RateLimiter::timer_fired`] and resumes. While blocked every
//! `consume` is refused, so requests keep their order. A single request larger than a bucket is
//! granted when the bucket is full and leaves a debt the bucket pays off before granting anything
//! else, so large requests are slowed, never stuck.
//!
//! The bucket arithmetic takes the time as an argument ([`TokenBucket::try_take`]), so it is tested
//! without sleeping.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

const NANOS_PER_MILLI: u128 = 1_000_000;
/// Longest refill time a bucket may have, in milliseconds (the refill time in nanoseconds must fit
/// 64 bits).
pub const MAX_REFILL_TIME_MS: u64 = u64::MAX / 1_000_000;
/// Shortest wait the timer is armed for (a zero timerfd would disarm it).
const MIN_WAIT: Duration = Duration::from_millis(1);

/// One bucket's settings (Firecracker's `TokenBucket` object).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenBucketConfig {
    /// Tokens the bucket holds when full.
    pub size: u64,
    /// Extra tokens granted once, used before the bucket's own.
    pub one_time_burst: u64,
    /// Milliseconds to refill from empty to full.
    pub refill_time_ms: u64,
}

impl TokenBucketConfig {
    /// Whether the bucket limits anything (Firecracker: size 0 or refill time 0 disables it).
    pub fn is_enabled(&self) -> bool {
        self.size > 0 && self.refill_time_ms > 0
    }
}

/// A limiter's settings (Firecracker's `RateLimiter` object); `None` buckets do not limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimiterConfig {
    pub bandwidth: Option<TokenBucketConfig>,
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    /// Whether any bucket limits anything.
    pub fn is_enabled(&self) -> bool {
        self.bandwidth.is_some_and(|b| b.is_enabled()) || self.ops.is_some_and(|b| b.is_enabled())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RateLimiterError {
    #[error("refill_time {0} ms is too long: use at most {MAX_REFILL_TIME_MS} ms")]
    RefillTooLong(u64),
    #[error("cannot create the rate limiter's timer: {0}")]
    Timer(String),
}

/// Checks a bucket's settings (what `TokenBucket::new` would refuse).
pub fn validate_bucket(cfg: &TokenBucketConfig) -> Result<(), RateLimiterError> {
    if cfg.refill_time_ms > MAX_REFILL_TIME_MS {
        return Err(RateLimiterError::RefillTooLong(cfg.refill_time_ms));
    }
    Ok(())
}

/// A token bucket. Times are passed in, so the arithmetic is deterministic.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    size: u64,
    refill_ns: u128,
    /// Tokens available now, at most `size`.
    budget: u64,
    /// Tokens granted beyond an empty bucket (one over-sized request), paid back first.
    debt: u64,
    /// What is left of the one-time burst.
    burst: u64,
    /// The time up to which refills have been credited.
    last: Instant,
}

impl TokenBucket {
    /// A full bucket; `None` when the settings do not limit anything or are invalid.
    pub fn new(cfg: &TokenBucketConfig, now: Instant) -> Option<Self> {
        if !cfg.is_enabled() || validate_bucket(cfg).is_err() {
            return None;
        }
        Some(Self {
            size: cfg.size,
            refill_ns: u128::from(cfg.refill_time_ms) * NANOS_PER_MILLI,
            budget: cfg.size,
            debt: 0,
            burst: cfg.one_time_burst,
            last: now,
        })
    }

    /// Credits the tokens earned since `last`.
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        let size = u128::from(self.size);
        let earned = elapsed.saturating_mul(size) / self.refill_ns;
        if earned == 0 {
            return;
        }
        let earned_u64 = u64::try_from(earned).unwrap_or(u64::MAX);
        let paid = earned_u64.min(self.debt);
        self.debt -= paid;
        self.budget = self.budget.saturating_add(earned_u64 - paid).min(self.size);
        if self.budget == self.size {
            // Full: time beyond this point earns nothing.
            self.last = now;
        } else {
            // Advance by the time those tokens took (rounded up), keeping the fraction of the next.
            let used = (earned * self.refill_ns).div_ceil(size);
            self.last += Duration::from_nanos(u64::try_from(used).unwrap_or(u64::MAX));
        }
    }

    /// Whether `n` tokens can be taken at `now`.
    pub fn can_take(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        if n <= self.burst {
            return true;
        }
        let rest = n - self.burst;
        self.debt == 0 && (rest <= self.budget || (rest > self.size && self.budget == self.size))
    }

    /// Takes `n` tokens (burst first); call only after [`Self::can_take`] said yes.
    fn take(&mut self, n: u64) {
        let from_burst = n.min(self.burst);
        self.burst -= from_burst;
        let rest = n - from_burst;
        if rest <= self.budget {
            self.budget -= rest;
        } else {
            self.debt = rest - self.budget;
            self.budget = 0;
        }
    }

    /// Takes `n` tokens if they are there.
    pub fn try_take(&mut self, n: u64, now: Instant) -> bool {
        let ok = self.can_take(n, now);
        if ok {
            self.take(n);
        }
        ok
    }

    /// How long until `n` tokens can be taken (zero if they can now).
    pub fn wait_for(&mut self, n: u64, now: Instant) -> Duration {
        if self.can_take(n, now) {
            return Duration::ZERO;
        }
        let need = n.saturating_sub(self.burst).min(self.size);
        let missing = u128::from(self.debt.saturating_add(need).saturating_sub(self.budget));
        let total_ns = (missing * self.refill_ns).div_ceil(u128::from(self.size));
        let since_last = now.saturating_duration_since(self.last).as_nanos();
        Duration::from_nanos(u64::try_from(total_ns.saturating_sub(since_last)).unwrap_or(u64::MAX))
    }

    /// Gives back `n` tokens taken for a request that was not carried out.
    pub fn give_back(&mut self, n: u64) {
        self.budget = self.budget.saturating_add(n).min(self.size);
    }

    /// Tokens available now, not counting the burst (after the last refill).
    pub fn budget(&self) -> u64 {
        self.budget
    }
}

/// A timerfd whose reads never block (the event loop calls the device only when it is readable,
/// but a spurious wakeup must not stall the VMM thread).
pub(crate) fn nonblocking_timer() -> io::Result<TimerFd> {
    let timer = TimerFd::new().map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let fd = timer.as_raw_fd();
    // SAFETY: fcntl(F_GETFL) on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl(F_SETFL) on a descriptor we own, with an integer argument; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(timer)
}

/// A bytes bucket and an ops bucket behind one timerfd.
pub struct RateLimiter {
    cfg: RateLimiterConfig,
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter").field("cfg", &self.cfg).field("blocked", &self.blocked).finish()
    }
}

impl RateLimiter {
    pub fn new(cfg: RateLimiterConfig) -> Result<Self, RateLimiterError> {
        for b in [cfg.bandwidth, cfg.ops].iter().flatten() {
            validate_bucket(b)?;
        }
        let timer = nonblocking_timer().map_err(|e| RateLimiterError::Timer(e.to_string()))?;
        let now = Instant::now();
        Ok(Self {
            cfg,
            bandwidth: cfg.bandwidth.and_then(|b| TokenBucket::new(&b, now)),
            ops: cfg.ops.and_then(|b| TokenBucket::new(&b, now)),
            timer,
            blocked: false,
        })
    }

    /// A limiter for `cfg`, or `None` when `cfg` limits nothing.
    pub fn for_config(cfg: Option<RateLimiterConfig>) -> Result<Option<Self>, RateLimiterError> {
        match cfg {
            Some(c) if c.is_enabled() => Self::new(c).map(Some),
            Some(c) => {
                for b in [c.bandwidth, c.ops].iter().flatten() {
                    validate_bucket(b)?;
                }
                Ok(None)
            }
            None => Ok(None),
        }
    }

    pub fn config(&self) -> RateLimiterConfig {
        self.cfg
    }

    /// Takes `bytes` bandwidth tokens and `ops` operation tokens, both or neither. On refusal the
    /// limiter is blocked until its timer fires.
    pub fn consume(&mut self, bytes: u64, ops: u64) -> bool {
        if self.blocked {
            return false;
        }
        let now = Instant::now();
        let bw_ok = self.bandwidth.as_mut().is_none_or(|b| b.can_take(bytes, now));
        let ops_ok = self.ops.as_mut().is_none_or(|b| b.can_take(ops, now));
        if bw_ok && ops_ok {
            if let Some(b) = self.bandwidth.as_mut() {
                b.take(bytes);
            }
            if let Some(b) = self.ops.as_mut() {
                b.take(ops);
            }
            return true;
        }
        let wait = [
            self.bandwidth.as_mut().map(|b| b.wait_for(bytes, now)),
            self.ops.as_mut().map(|b| b.wait_for(ops, now)),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(MIN_WAIT);
        self.block_for(wait);
        false
    }

    fn block_for(&mut self, wait: Duration) {
        self.blocked = true;
        if let Err(e) = self.timer.reset(wait.max(MIN_WAIT), None) {
            // Without the timer nothing would resume the device: stay unblocked instead (the
            // next request is limited again).
            tracing::warn!("rate limiter: cannot arm the timer: {e}");
            self.blocked = false;
        }
    }

    /// Gives back tokens of a request that was consumed but could not be carried out.
    pub fn give_back(&mut self, bytes: u64, ops: u64) {
        if let Some(b) = self.bandwidth.as_mut() {
            b.give_back(bytes);
        }
        if let Some(b) = self.ops.as_mut() {
            b.give_back(ops);
        }
    }

    /// Whether requests are refused until the timer fires.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The timerfd to watch for readability.
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// The timer fired: unblocks. Returns false for a spurious wakeup (nothing to read).
    pub fn timer_fired(&mut self) -> bool {
        let fired = match self.timer.wait() {
            Ok(_) => true,
            Err(e) if e.errno() == libc::EAGAIN => false,
            Err(e) => {
                tracing::warn!("rate limiter: reading the timer failed: {e}");
                false
            }
        };
        if fired {
            self.blocked = false;
        }
        fired
    }

    /// New settings; buckets whose settings did not change keep their state. A blocked limiter
    /// is re-evaluated right away (its timer fires in a millisecond).
    pub fn update(&mut self, cfg: RateLimiterConfig) -> Result<(), RateLimiterError> {
        for b in [cfg.bandwidth, cfg.ops].iter().flatten() {
            validate_bucket(b)?;
        }
        let now = Instant::now();
        if cfg.bandwidth != self.cfg.bandwidth {
            self.bandwidth = cfg.bandwidth.and_then(|b| TokenBucket::new(&b, now));
        }
        if cfg.ops != self.cfg.ops {
            self.ops = cfg.ops.and_then(|b| TokenBucket::new(&b, now));
        }
        self.cfg = cfg;
        if self.blocked {
            self.block_for(MIN_WAIT);
        }
        Ok(())
    }
}

/// A device's optional limiter: `None` until limits are first configured; from then on the
/// limiter stays (possibly without limits), so its timerfd keeps its place in the event loop and a
/// queue stopped by old limits is resumed by it.
#[derive(Debug, Default)]
pub struct LimiterSlot(Option<RateLimiter>);

impl LimiterSlot {
    /// Sets or replaces the limits (`None` or zero-sized buckets: no limit).
    pub fn update(&mut self, cfg: Option<RateLimiterConfig>) -> Result<(), RateLimiterError> {
        let cfg = cfg.unwrap_or_default();
        match self.0.as_mut() {
            Some(l) => l.update(cfg),
            None => {
                self.0 = RateLimiter::for_config(Some(cfg))?;
                Ok(())
            }
        }
    }

    /// The limits in force (`None`: none).
    pub fn config(&self) -> Option<RateLimiterConfig> {
        self.0.as_ref().map(RateLimiter::config).filter(RateLimiterConfig::is_enabled)
    }

    /// Takes the tokens of one request (always granted without a limiter).
    pub fn consume(&mut self, bytes: u64, ops: u64) -> bool {
        self.0.as_mut().is_none_or(|l| l.consume(bytes, ops))
    }

    pub fn give_back(&mut self, bytes: u64, ops: u64) {
        if let Some(l) = self.0.as_mut() {
            l.give_back(bytes, ops);
        }
    }

    pub fn is_blocked(&self) -> bool {
        self.0.as_ref().is_some_and(RateLimiter::is_blocked)
    }

    /// The timerfd to list in the device's host fds, with `token`.
    pub fn host_fd(&self, token: u32) -> Option<(RawFd, u32)> {
        self.0.as_ref().map(|l| (l.timer_fd(), token))
    }

    /// The timer fired: true when the device should resume.
    pub fn timer_fired(&mut self) -> bool {
        self.0.as_mut().is_some_and(RateLimiter::timer_fired)
    }
}

/// Waits up to `timeout` for `fd` to be readable (what the event loop does); for device tests.
#[cfg(test)]
pub(crate) fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: polls one pollfd we own; no other memory is passed.
    unsafe { libc::poll(&mut pfd, 1, ms) == 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, burst: u64, refill_ms: u64) -> (TokenBucket, Instant) {
        let t0 = Instant::now();
        let cfg = TokenBucketConfig { size, one_time_burst: burst, refill_time_ms: refill_ms };
        (TokenBucket::new(&cfg, t0).unwrap(), t0)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn zero_size_or_refill_time_disables_a_bucket() {
        let now = Instant::now();
        for (size, refill) in [(0, 100), (100, 0), (0, 0)] {
            let cfg = TokenBucketConfig { size, one_time_burst: 0, refill_time_ms: refill };
            assert!(!cfg.is_enabled());
            assert!(TokenBucket::new(&cfg, now).is_none());
        }
        let cfg = TokenBucketConfig { size: 1, one_time_burst: 0, refill_time_ms: MAX_REFILL_TIME_MS + 1 };
        assert_eq!(validate_bucket(&cfg), Err(RateLimiterError::RefillTooLong(MAX_REFILL_TIME_MS + 1)));
        assert!(TokenBucket::new(&cfg, now).is_none());
        let cfg = TokenBucketConfig { size: u64::MAX, one_time_burst: 0, refill_time_ms: MAX_REFILL_TIME_MS };
        assert!(TokenBucket::new(&cfg, now).is_some());
    }

    #[test]
    fn starts_full_and_refills_continuously() {
        // 1000 tokens per second.
        let (mut b, t0) = bucket(1000, 0, 1000);
        assert!(b.try_take(1000, t0));
        assert!(!b.try_take(1, t0));
        // 1 ms earns 1 token; 250 ms earns 250.
        assert!(b.try_take(1, t0 + ms(1)));
        assert!(!b.try_take(1, t0 + ms(1)));
        assert!(b.try_take(250, t0 + ms(251)));
        assert_eq!(b.budget(), 0);
        // Never more than full, however long it waits.
        assert!(b.can_take(1000, t0 + ms(100_000)));
        assert_eq!(b.budget(), 1000);
    }

    #[test]
    fn fractions_of_a_token_are_not_lost() {
        // 3 tokens per 10 ms: one token every 3.33 ms.
        let (mut b, t0) = bucket(3, 0, 10);
        assert!(b.try_take(3, t0));
        let mut taken = 0;
        for step in 1..=301u64 {
            // Polled every millisecond for 301 ms: 90.3 tokens earned, none lost to rounding.
            while b.try_take(1, t0 + ms(step)) {
                taken += 1;
            }
        }
        assert_eq!(taken, 90);
    }

    #[test]
    fn one_time_burst_is_used_first_and_never_refills() {
        let (mut b, t0) = bucket(100, 500, 1000);
        assert!(b.try_take(500, t0), "the burst covers it");
        assert_eq!(b.budget(), 100, "the bucket itself is untouched");
        assert!(b.try_take(100, t0));
        assert!(!b.try_take(1, t0));
        // Later, the same request is over-sized for the bucket alone: it passes once the bucket is
        // full, and its debt of 400 tokens takes 4 s to pay back.
        assert!(b.try_take(500, t0 + ms(10_000)));
        assert!(!b.can_take(1, t0 + ms(13_999)));
        assert!(b.can_take(1, t0 + ms(14_010)));
    }

    #[test]
    fn oversized_requests_pass_when_full_and_leave_a_debt() {
        let (mut b, t0) = bucket(100, 0, 1000);
        assert!(b.try_take(250, t0));
        assert_eq!(b.budget(), 0);
        // The debt of 150 is paid first: after 1.5 s nothing is available yet; after 1.51 s, 10.
        assert!(!b.can_take(1, t0 + ms(1500)));
        assert!(b.try_take(10, t0 + ms(1600)));
        // An oversized request on a bucket that is not full waits until it is.
        assert!(!b.can_take(250, t0 + ms(1700)));
        assert_eq!(b.wait_for(250, t0 + ms(1700)), ms(900));
        assert!(b.try_take(250, t0 + ms(2600)));
    }

    #[test]
    fn wait_for_says_when_the_tokens_are_there() {
        let (mut b, t0) = bucket(1000, 0, 1000);
        assert_eq!(b.wait_for(1000, t0), Duration::ZERO);
        assert!(b.try_take(1000, t0));
        assert_eq!(b.wait_for(500, t0), ms(500));
        assert_eq!(b.wait_for(500, t0 + ms(200)), ms(300));
        assert!(!b.can_take(500, t0 + ms(499)));
        assert!(b.can_take(500, t0 + ms(500)));
        b.give_back(10_000);
        assert_eq!(b.budget(), 1000, "giving back never overfills");
    }

    #[test]
    fn limiter_takes_both_buckets_or_neither_and_blocks_until_its_timer() {
        let cfg = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig { size: 4096, one_time_burst: 0, refill_time_ms: 100 }),
            ops: Some(TokenBucketConfig { size: 10, one_time_burst: 0, refill_time_ms: 100 }),
        };
        let mut rl = RateLimiter::new(cfg).unwrap();
        assert!(rl.consume(4000, 1));
        // Bytes are short: refused, and the ops token was not taken either.
        assert!(!rl.consume(4000, 1));
        assert!(rl.is_blocked());
        assert_eq!(rl.ops.as_ref().unwrap().budget(), 9, "the refused request took no op token");
        assert!(!rl.consume(1, 1), "blocked: everything waits, in order");
        assert!(!rl.timer_fired(), "nothing to read before the timer expires");
        let t0 = Instant::now();
        assert!(wait_readable(rl.timer_fd(), ms(1000)), "the timer fires");
        // 3904 bytes short at 40.96 bytes/ms: about 95 ms.
        let waited = t0.elapsed();
        assert!(waited >= ms(80) && waited < ms(400), "{waited:?}");
        assert!(rl.timer_fired());
        assert!(!rl.is_blocked());
        assert!(rl.consume(4000, 1));
    }

    #[test]
    fn update_keeps_unchanged_buckets_and_unblocks_promptly() {
        let slow = TokenBucketConfig { size: 1, one_time_burst: 0, refill_time_ms: 60_000 };
        let mut rl = RateLimiter::new(RateLimiterConfig { bandwidth: None, ops: Some(slow) }).unwrap();
        assert!(rl.consume(0, 1));
        assert!(!rl.consume(0, 1));
        assert!(rl.is_blocked());
        // Lifting the limit wakes the device within milliseconds, not a minute.
        rl.update(RateLimiterConfig::default()).unwrap();
        assert!(wait_readable(rl.timer_fd(), ms(200)));
        assert!(rl.timer_fired());
        assert!(rl.consume(1 << 30, 1000), "no limits any more");
        assert!(rl
            .update(RateLimiterConfig {
                bandwidth: None,
                ops: Some(TokenBucketConfig { size: 1, one_time_burst: 0, refill_time_ms: u64::MAX })
            })
            .is_err());
    }

    #[test]
    fn for_config_builds_nothing_for_disabled_settings() {
        assert!(RateLimiter::for_config(None).unwrap().is_none());
        let off = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig { size: 0, one_time_burst: 0, refill_time_ms: 100 }),
            ops: None,
        };
        assert!(RateLimiter::for_config(Some(off)).unwrap().is_none());
        let on = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig { size: 10, one_time_burst: 0, refill_time_ms: 100 }),
            ops: None,
        };
        assert!(RateLimiter::for_config(Some(on)).unwrap().is_some());
    }
}
