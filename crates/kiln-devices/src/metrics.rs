//! Lock-free counters the devices keep for the VMM's metrics (Firecracker's `PUT /metrics` JSON
//! lines), and the per-device counter sets.
//!
//! A [`Counter`] only ever grows; serializing it reports what it counted since it was last
//! serialized (Firecracker's `SharedIncMetric`), so each flushed line carries one interval's
//! activity. [`Counter::get`] reads the running total without flushing. A [`Gauge`] reports its
//! current value. Field names of the per-device sets are Firecracker's (`docs/metrics.md`,
//! `*/metrics.rs`), so tools that read Firecracker's metrics read these too; fields Firecracker
//! lacks are additions, never renames.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Serialize, Serializer};

/// A monotonically increasing count; serializes as the increase since the previous serialization.
#[derive(Debug, Default)]
pub struct Counter {
    total: AtomicU64,
    flushed: AtomicU64,
}

impl Counter {
    pub const fn new() -> Self {
        Self { total: AtomicU64::new(0), flushed: AtomicU64::new(0) }
    }

    pub fn add(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(&self) {
        self.add(1);
    }

    /// Everything counted since the start.
    pub fn get(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

impl Serialize for Counter {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let now = self.total.load(Ordering::Relaxed);
        // swap: two concurrent flushes never report the same increase twice.
        let before = self.flushed.swap(now, Ordering::Relaxed);
        s.serialize_u64(now.wrapping_sub(before))
    }
}

/// A value that is set, not counted (a duration, a size); serializes as is.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Serialize for Gauge {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.get())
    }
}

/// Minimum, maximum and sum of durations in microseconds (Firecracker's
/// `LatencyAggregateMetrics`): the sum is a [`Counter`]; min and max hold since the start, 0
/// meaning "nothing measured yet".
#[derive(Debug, Default, Serialize)]
pub struct LatencyAgg {
    pub min_us: Gauge,
    pub max_us: Gauge,
    pub sum_us: Counter,
}

impl LatencyAgg {
    pub const fn new() -> Self {
        Self { min_us: Gauge::new(), max_us: Gauge::new(), sum_us: Counter::new() }
    }

    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.add(us);
        let _ = self
            .min_us
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| (m == 0 || us < m).then_some(us));
        self.max_us.0.fetch_max(us, Ordering::Relaxed);
    }

    /// Records the time since `start`.
    pub fn record_since(&self, start: Instant) {
        self.record(start.elapsed());
    }
}

/// One virtio-blk device (Firecracker's `BlockDeviceMetrics`, reported as `block_<drive_id>`).
#[derive(Debug, Default, Serialize)]
pub struct BlockMetrics {
    pub activate_fails: Counter,
    pub cfg_fails: Counter,
    /// Queue notifications that found no request.
    pub no_avail_buffer: Counter,
    pub event_fails: Counter,
    /// Requests that failed (I/O errors, unsupported types).
    pub execute_fails: Counter,
    /// Malformed requests from the guest.
    pub invalid_reqs_count: Counter,
    pub flush_count: Counter,
    pub queue_event_count: Counter,
    pub rate_limiter_event_count: Counter,
    /// Backing file swaps (`PATCH /drives`).
    pub update_count: Counter,
    pub update_fails: Counter,
    pub read_bytes: Counter,
    pub write_bytes: Counter,
    pub read_count: Counter,
    pub write_count: Counter,
    pub read_agg: LatencyAgg,
    pub write_agg: LatencyAgg,
    /// Times the rate limiter stopped the queue.
    pub rate_limiter_throttled_events: Counter,
    pub io_engine_throttled_events: Counter,
    pub remaining_reqs_count: Counter,
}

/// The entropy device (Firecracker's `EntropyDeviceMetrics`, reported as `entropy`).
#[derive(Debug, Default, Serialize)]
pub struct EntropyMetrics {
    pub activate_fails: Counter,
    pub entropy_event_fails: Counter,
    /// Requests served.
    pub entropy_event_count: Counter,
    pub entropy_bytes: Counter,
    pub host_rng_fails: Counter,
    /// Times the rate limiter stopped the queue.
    pub entropy_rate_limiter_throttled: Counter,
    pub rate_limiter_event_count: Counter,
}

/// The vsock device (Firecracker's `VsockDeviceMetrics`, reported as `vsock`).
#[derive(Debug, Default, Serialize)]
pub struct VsockMetrics {
    pub activate_fails: Counter,
    pub cfg_fails: Counter,
    pub rx_queue_event_fails: Counter,
    pub tx_queue_event_fails: Counter,
    pub ev_queue_event_fails: Counter,
    pub muxer_event_fails: Counter,
    pub conn_event_fails: Counter,
    pub rx_queue_event_count: Counter,
    pub tx_queue_event_count: Counter,
    /// Payload bytes delivered to the guest.
    pub rx_bytes_count: Counter,
    /// Payload bytes the guest sent.
    pub tx_bytes_count: Counter,
    pub rx_packets_count: Counter,
    pub tx_packets_count: Counter,
    pub conns_added: Counter,
    pub conns_killed: Counter,
    pub conns_removed: Counter,
    pub killq_resync: Counter,
    pub tx_flush_fails: Counter,
    pub tx_write_fails: Counter,
    pub rx_read_fails: Counter,
}

/// The balloon device (Firecracker's `BalloonDeviceMetrics`, reported as `balloon`).
#[derive(Debug, Default, Serialize)]
pub struct BalloonMetrics {
    pub activate_fails: Counter,
    pub cfg_fails: Counter,
    /// Inflate requests (chains of page numbers) handled.
    pub inflate_count: Counter,
    pub stats_updates_count: Counter,
    pub stats_update_fails: Counter,
    pub deflate_count: Counter,
    pub event_fails: Counter,
    pub free_page_report_count: Counter,
    pub free_page_report_freed: Counter,
    pub free_page_report_fails: Counter,
    pub free_page_hint_count: Counter,
    pub free_page_hint_freed: Counter,
    pub free_page_hint_fails: Counter,
}

/// The serial console (Firecracker's `SerialDeviceMetrics`, reported as `uart`).
#[derive(Debug, Default, Serialize)]
pub struct SerialMetrics {
    pub error_count: Counter,
    /// Output flushes to the host writer.
    pub flush_count: Counter,
    pub missed_read_count: Counter,
    /// Output bytes lost (the host writer failed).
    pub missed_write_count: Counter,
    /// Bytes the guest read from the console.
    pub read_count: Counter,
    /// Bytes the guest wrote to the console.
    pub write_count: Counter,
    /// Output bytes dropped by the serial rate limiter.
    pub rate_limiter_dropped_bytes: Counter,
}

/// The i8042 controller (Firecracker's `I8042DeviceMetrics`, reported as `i8042`).
#[derive(Debug, Default, Serialize)]
pub struct I8042Metrics {
    pub error_count: Counter,
    pub missed_read_count: Counter,
    pub missed_write_count: Counter,
    pub read_count: Counter,
    /// Guest resets through the controller.
    pub reset_count: Counter,
    pub write_count: Counter,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_report_the_increase_since_the_last_flush() {
        let c = Counter::new();
        c.add(5);
        c.inc();
        assert_eq!(serde_json::to_string(&c).unwrap(), "6");
        assert_eq!(serde_json::to_string(&c).unwrap(), "0");
        c.add(2);
        assert_eq!(c.get(), 8, "the total is kept");
        assert_eq!(serde_json::to_string(&c).unwrap(), "2");
    }

    #[test]
    fn latency_aggregates() {
        let l = LatencyAgg::new();
        l.record(Duration::from_micros(30));
        l.record(Duration::from_micros(10));
        l.record(Duration::from_micros(20));
        let v: serde_json::Value = serde_json::to_value(&l).unwrap();
        assert_eq!(v, serde_json::json!({"min_us": 10, "max_us": 30, "sum_us": 60}));
        let v: serde_json::Value = serde_json::to_value(&l).unwrap();
        assert_eq!(v, serde_json::json!({"min_us": 10, "max_us": 30, "sum_us": 0}));
    }

    #[test]
    fn device_sets_use_firecracker_field_names() {
        let b = BlockMetrics::default();
        b.read_bytes.add(512);
        let v = serde_json::to_value(&b).unwrap();
        assert_eq!(v["read_bytes"], 512);
        for f in ["read_count", "write_count", "write_bytes", "flush_count", "rate_limiter_throttled_events"]
        {
            assert_eq!(v[f], 0, "{f}");
        }
        assert!(v["read_agg"]["min_us"].is_u64());
        let e = serde_json::to_value(EntropyMetrics::default()).unwrap();
        assert!(e["entropy_bytes"].is_u64() && e["entropy_rate_limiter_throttled"].is_u64());
        let u = serde_json::to_value(SerialMetrics::default()).unwrap();
        assert!(u["write_count"].is_u64());
    }
}
