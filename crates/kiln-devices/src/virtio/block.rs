//! virtio-blk backed by a host file, one request queue, synchronous `pread`/`pwrite`.
//!
//! Requests: IN, OUT, FLUSH, GET_ID; anything else completes with UNSUPP. Each descriptor chain
//! is checked before any I/O: the header is readable and at least 16 bytes, data descriptors are
//! writable for IN/GET_ID and readable for OUT and lie inside guest memory, the last descriptor is
//! a writable status byte, IN/OUT lengths are whole sectors, the total is bounded and the sector
//! range is inside the disk (overflow-checked). A bad chain completes with IOERR, or with used
//! length 0 when it has no usable status byte; the next request is served normally.
//!
//! Rate limiting (Firecracker's `Drive.rate_limiter`): every request costs one `ops` token, reads
//! and writes also their data length in `bandwidth` tokens. When the limiter refuses, the request
//! stays in the ring and the queue is left alone until the limiter's timer ([`RATE_LIMITER_TOKEN`]
//! in [`VirtioDevice::host_fds`]) fires. Counters are in [`BlockMetrics`] (`metrics_handle`).
//!
//! Cache modes follow Firecracker (`Drive.cache_type`, default `Unsafe`):
//! - `Writeback`: VIRTIO_BLK_F_FLUSH is offered, so Linux treats the disk as having a volatile
//!   write cache and sends flushes (fsync, journal commits); each FLUSH does `fdatasync` on the
//!   backing file, so data the guest flushed survives a host crash.
//! - `Unsafe`: FLUSH is not offered (Firecracker's `VirtioBlock::new` only sets it for Writeback),
//!   so Linux assumes a write-through disk and sends no flushes; writes live in the host page cache
//!   until the host kernel writes them back. A FLUSH that arrives anyway is acknowledged without
//!   syncing, as Firecracker's documentation describes for Unsafe.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::queue_util::{drain_queue_until, Chain};
use super::{device_type, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::interrupt::VirtioInterrupt;
use crate::metrics::BlockMetrics;
use crate::rate_limiter::{LimiterSlot, RateLimiterConfig, RateLimiterError};
use crate::GuestMemory;

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;
/// Upper bound on one request's data (Linux's default is 1.25 MiB; it only goes above that when
/// someone raises `max_sectors_kb`).
pub const MAX_REQUEST_BYTES: u64 = 128 << 20;
/// Bounce buffer size: requests are copied through it in pieces of at most this much.
const CHUNK: usize = 64 << 10;

// Feature bits (virtio 1.2, 5.2.3).
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

// Request types.
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;

// Status values.
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

const HEADER_LEN: u32 = 16;

/// The token the rate limiter's timerfd is listed with in [`VirtioDevice::host_fds`].
pub const RATE_LIMITER_TOKEN: u32 = 0;

/// Firecracker's `Drive.cache_type`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheType {
    /// No flush offered, none performed (the default).
    #[default]
    Unsafe,
    /// Flush offered; a FLUSH request `fdatasync`s the backing file.
    Writeback,
}

/// What the VMM knows about a drive before boot.
#[derive(Clone, Debug)]
pub struct BlockConfig {
    /// Drive id (Firecracker `drive_id`); the guest reads its first 20 bytes with GET_ID.
    pub id: String,
    pub path: PathBuf,
    pub read_only: bool,
    pub cache: CacheType,
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error(
        "cannot open {} for writing; set is_read_only or fix the file's permissions",
        path.display()
    )]
    NotWritable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot get the size of {}", path.display())]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to signal the configuration change")]
    Signal(#[source] io::Error),
    #[error("rate_limiter: {0}")]
    RateLimiter(#[source] RateLimiterError),
}

/// An opened backing file.
struct Disk {
    file: File,
    path: PathBuf,
    read_only: bool,
    nsectors: u64,
}

impl Disk {
    fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path).map_err(|source| {
            // Distinguish "exists but not writable" (tell the user what to do) from the rest.
            if !read_only && OpenOptions::new().read(true).open(path).is_ok() {
                BlockError::NotWritable { path: path.to_owned(), source }
            } else {
                BlockError::Open { path: path.to_owned(), source }
            }
        })?;
        // Seeking works for regular files and block devices alike (metadata size is 0 for the
        // latter).
        let size = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size { path: path.to_owned(), source })?;
        let nsectors = size / SECTOR_SIZE;
        if size % SECTOR_SIZE != 0 {
            tracing::warn!(
                "block: {} is {size} bytes, not a multiple of {SECTOR_SIZE}; the last {} bytes are \
                 not visible to the guest",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        Ok(Self { file, path: path.to_owned(), read_only, nsectors })
    }
}

/// Why a request failed, as the guest will see it.
#[derive(Debug)]
enum ReqError {
    /// Malformed request (guest's fault): IOERR, logged at debug level.
    Invalid(&'static str),
    /// The host I/O failed: IOERR, logged as a warning.
    Io(io::Error),
    /// Unknown request type: UNSUPP.
    Unsupported(u32),
}

impl ReqError {
    fn status(&self) -> u8 {
        match self {
            ReqError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

struct Active {
    mem: GuestMemory,
    interrupt: VirtioInterrupt,
    queue: Queue,
}

/// A virtio-blk device.
pub struct Block {
    id: String,
    id_bytes: [u8; ID_BYTES],
    cache: CacheType,
    disk: Disk,
    avail_features: u64,
    acked_features: u64,
    config_generation: u32,
    active: Option<Active>,
    broken: bool,
    buf: Vec<u8>,
    limiter: LimiterSlot,
    metrics: Arc<BlockMetrics>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("id", &self.id)
            .field("path", &self.disk.path)
            .field("read_only", &self.disk.read_only)
            .field("nsectors", &self.disk.nsectors)
            .field("cache", &self.cache)
            .field("activated", &self.active.is_some())
            .finish()
    }
}

impl Block {
    /// Opens the backing file (read-only when `cfg.read_only`).
    pub fn new(cfg: BlockConfig) -> Result<Block, BlockError> {
        let disk = Disk::open(&cfg.path, cfg.read_only)?;
        let mut avail_features = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_BLK_F_SEG_MAX;
        if cfg.cache == CacheType::Writeback {
            avail_features |= VIRTIO_BLK_F_FLUSH;
        }
        if cfg.read_only {
            avail_features |= VIRTIO_BLK_F_RO;
        }
        let mut id_bytes = [0u8; ID_BYTES];
        let n = cfg.id.len().min(ID_BYTES);
        id_bytes[..n].copy_from_slice(&cfg.id.as_bytes()[..n]);
        Ok(Block {
            id: cfg.id,
            id_bytes,
            cache: cfg.cache,
            disk,
            avail_features,
            acked_features: 0,
            config_generation: 0,
            active: None,
            broken: false,
            buf: vec![0; CHUNK],
            limiter: LimiterSlot::default(),
            metrics: Arc::new(BlockMetrics::default()),
        })
    }

    /// The device's counters, for the VMM's metrics.
    pub fn metrics_handle(&self) -> Arc<BlockMetrics> {
        Arc::clone(&self.metrics)
    }

    /// The rate limiter's settings (`None`: not limited).
    pub fn rate_limiter(&self) -> Option<RateLimiterConfig> {
        self.limiter.config()
    }

    /// Sets or replaces the rate limiter (`None` or zero-sized buckets: no limit), before boot or
    /// while the guest runs (`PATCH /drives`). A queue stopped by the old limits is looked at again
    /// within a millisecond.
    pub fn update_rate_limiter(&mut self, cfg: Option<RateLimiterConfig>) -> Result<(), BlockError> {
        self.limiter.update(cfg).map_err(BlockError::RateLimiter)
    }

    /// Serves what the ring holds, within the rate limit.
    fn run_queue(&mut self) {
        if self.broken || self.limiter.is_blocked() {
            return;
        }
        let Some(active) = self.active.as_mut() else { return };
        let mut req = Requests {
            disk: &self.disk,
            cache: self.cache,
            id: &self.id_bytes,
            buf: &mut self.buf,
            limiter: &mut self.limiter,
            metrics: &self.metrics,
        };
        match drain_queue_until(&mut active.queue, &active.mem, &active.interrupt, |mem, chain| {
            req.handle_chain(mem, chain)
        }) {
            Ok(d) if d.completed == 0 && !d.deferred => self.metrics.no_avail_buffer.inc(),
            Ok(_) => {}
            Err(e) => {
                tracing::error!("block {}: queue broken: {e}", self.id);
                self.metrics.event_fails.inc();
                self.broken = true;
            }
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn path(&self) -> &Path {
        &self.disk.path
    }

    pub fn is_read_only(&self) -> bool {
        self.disk.read_only
    }

    pub fn cache_type(&self) -> CacheType {
        self.cache
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.nsectors
    }

    /// Features the driver accepted (0 before activation).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Swaps the backing file (Firecracker's PATCH /drives) and tells the guest about the new
    /// capacity with a configuration change interrupt. The RO feature was negotiated at boot and
    /// cannot change; switching a writable drive to a read-only file makes writes fail with IOERR.
    /// On error the old file stays in place.
    pub fn update_backing(&mut self, path: impl AsRef<Path>, read_only: bool) -> Result<(), BlockError> {
        self.metrics.update_count.inc();
        let disk = Disk::open(path.as_ref(), read_only).inspect_err(|_| self.metrics.update_fails.inc())?;
        tracing::info!(
            "block {}: backing file now {} ({} sectors{})",
            self.id,
            disk.path.display(),
            disk.nsectors,
            if read_only { ", read-only" } else { "" }
        );
        self.disk = disk;
        self.config_generation = self.config_generation.wrapping_add(1);
        if let Some(active) = &self.active {
            active.interrupt.signal_config_change().map_err(BlockError::Signal)?;
        }
        Ok(())
    }

    fn config_space(&self) -> [u8; 16] {
        let mut cfg = [0u8; 16];
        cfg[0..8].copy_from_slice(&self.disk.nsectors.to_le_bytes());
        // size_max (8..12) stays 0: not offered. seg_max: the ring holds the header and status too.
        cfg[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        cfg
    }
}

/// What serving requests needs, borrowed from the device for one pass over the queue.
struct Requests<'d> {
    disk: &'d Disk,
    cache: CacheType,
    id: &'d [u8; ID_BYTES],
    buf: &'d mut [u8],
    limiter: &'d mut LimiterSlot,
    metrics: &'d BlockMetrics,
}

/// A request's header, parsed.
#[derive(Clone, Copy)]
struct Header {
    req_type: u32,
    sector: u64,
}

impl Requests<'_> {
    /// Completes one chain and returns the used length, or `None` when the rate limiter says
    /// "not now".
    fn handle_chain(&mut self, mem: &GuestMemory, chain: Chain<'_>) -> Option<u32> {
        // The chain iterator stops at queue-size descriptors (loops) and at 4 GiB in total.
        let descs: Vec<Descriptor> = chain.collect();
        let Some((status, rest)) = descs.split_last() else {
            tracing::debug!("block: empty descriptor chain");
            self.metrics.invalid_reqs_count.inc();
            return Some(0);
        };
        // The status byte is the last byte of the last descriptor, which must be device-writable.
        let status_addr = match (status.is_write_only(), status.len().checked_sub(1)) {
            (true, Some(last)) => status.addr().checked_add(u64::from(last)),
            _ => None,
        };
        let Some(status_addr) = status_addr.filter(|a| GuestMemoryBackend::check_range(mem, *a, 1)) else {
            tracing::debug!("block: request without a usable status descriptor");
            self.metrics.invalid_reqs_count.inc();
            return Some(0);
        };
        let header = parse_header(mem, rest);
        let data = rest.get(1..).unwrap_or_default();
        let data_len: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        let req_type = header.as_ref().map_or(u32::MAX, |h| h.req_type);
        let is_io = req_type == VIRTIO_BLK_T_IN || req_type == VIRTIO_BLK_T_OUT;
        if !self.limiter.consume(if is_io { data_len } else { 0 }, 1) {
            self.metrics.rate_limiter_throttled_events.inc();
            return None;
        }
        let started = Instant::now();
        let result = header.and_then(|h| execute(self.disk, self.cache, self.id, self.buf, mem, &h, data));
        let (code, written) = match result {
            Ok(written) => {
                let m = self.metrics;
                match req_type {
                    VIRTIO_BLK_T_IN => {
                        m.read_count.inc();
                        m.read_bytes.add(data_len);
                        m.read_agg.record_since(started);
                    }
                    VIRTIO_BLK_T_OUT => {
                        m.write_count.inc();
                        m.write_bytes.add(data_len);
                        m.write_agg.record_since(started);
                    }
                    VIRTIO_BLK_T_FLUSH => m.flush_count.inc(),
                    _ => {}
                }
                (VIRTIO_BLK_S_OK, written)
            }
            Err(e) => {
                match &e {
                    ReqError::Invalid(why) => {
                        tracing::debug!("block: invalid request: {why}");
                        self.metrics.invalid_reqs_count.inc();
                    }
                    ReqError::Io(err) => {
                        tracing::warn!("block: I/O error on {}: {err}", self.disk.path.display());
                        self.metrics.execute_fails.inc();
                    }
                    ReqError::Unsupported(t) => {
                        tracing::debug!("block: unsupported request type {t}");
                        self.metrics.execute_fails.inc();
                    }
                }
                (e.status(), 0)
            }
        };
        if mem.write_obj(code, status_addr).is_err() {
            return Some(0);
        }
        Some(written.saturating_add(1))
    }
}

/// Reads the request header (the first descriptor of a chain whose status was split off).
fn parse_header(mem: &GuestMemory, descs: &[Descriptor]) -> Result<Header, ReqError> {
    let header = descs.first().ok_or(ReqError::Invalid("no header"))?;
    if header.is_write_only() || header.len() < HEADER_LEN {
        return Err(ReqError::Invalid("header not readable or shorter than 16 bytes"));
    }
    let mut hdr = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut hdr, header.addr()).map_err(|_| ReqError::Invalid("header outside memory"))?;
    let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15]]);
    Ok(Header { req_type, sector })
}

/// Runs a request whose header was parsed; `data` are the descriptors between the header and the
/// status. Returns the number of bytes written into guest memory.
fn execute(
    disk: &Disk,
    cache: CacheType,
    id: &[u8; ID_BYTES],
    buf: &mut [u8],
    mem: &GuestMemory,
    header: &Header,
    data: &[Descriptor],
) -> Result<u32, ReqError> {
    let Header { req_type, sector } = *header;
    match req_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let is_read = req_type == VIRTIO_BLK_T_IN;
            if !is_read && disk.read_only {
                return Err(ReqError::Invalid("write to a read-only disk"));
            }
            let total = check_data(mem, data, is_read)?;
            if total == 0 {
                return Err(ReqError::Invalid("no data"));
            }
            if total % SECTOR_SIZE != 0 {
                return Err(ReqError::Invalid("data length not a multiple of 512"));
            }
            let offset = sector.checked_mul(SECTOR_SIZE).ok_or(ReqError::Invalid("sector overflows"))?;
            let end = offset.checked_add(total).ok_or(ReqError::Invalid("sector range overflows"))?;
            if end > disk.nsectors.saturating_mul(SECTOR_SIZE) {
                return Err(ReqError::Invalid("sector range beyond the end of the disk"));
            }
            if is_read {
                read_into_guest(disk, buf, mem, data, offset)?;
                // `total` <= MAX_REQUEST_BYTES, so it fits in u32.
                Ok(u32::try_from(total).unwrap_or(u32::MAX))
            } else {
                write_from_guest(disk, buf, mem, data, offset)?;
                Ok(0)
            }
        }
        VIRTIO_BLK_T_FLUSH => {
            if cache == CacheType::Writeback && !disk.read_only {
                disk.file.sync_data().map_err(ReqError::Io)?;
            }
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            let total = check_data(mem, data, true)?;
            if total == 0 {
                return Err(ReqError::Invalid("no buffer for the id"));
            }
            let mut src: &[u8] = &id[..usize::try_from(total).unwrap_or(ID_BYTES).min(ID_BYTES)];
            let mut written = 0u32;
            for d in data {
                if src.is_empty() {
                    break;
                }
                let n = src.len().min(d.len() as usize);
                mem.write_slice(&src[..n], d.addr())
                    .map_err(|_| ReqError::Invalid("id buffer outside memory"))?;
                src = &src[n..];
                written += n as u32;
            }
            Ok(written)
        }
        other => Err(ReqError::Unsupported(other)),
    }
}

/// Checks the data descriptors' direction and that they lie inside guest memory; returns their
/// total length.
fn check_data(mem: &GuestMemory, data: &[Descriptor], device_writes: bool) -> Result<u64, ReqError> {
    let mut total = 0u64;
    for d in data {
        if d.is_write_only() != device_writes {
            return Err(ReqError::Invalid("data descriptor has the wrong direction"));
        }
        total += u64::from(d.len());
        if total > MAX_REQUEST_BYTES {
            return Err(ReqError::Invalid("request too large"));
        }
        if !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
            return Err(ReqError::Invalid("data descriptor outside guest memory"));
        }
    }
    Ok(total)
}

/// Splits each descriptor into bounce-buffer sized pieces: (guest address, file offset, length).
fn pieces(data: &[Descriptor], mut offset: u64) -> impl Iterator<Item = (GuestAddress, u64, usize)> + '_ {
    data.iter().flat_map(move |d| {
        let start = offset;
        offset += u64::from(d.len());
        let len = d.len() as usize;
        (0..len).step_by(CHUNK).map(move |at| {
            // In range: check_data verified addr..addr+len lies in guest memory.
            (GuestAddress(d.addr().0 + at as u64), start + at as u64, (len - at).min(CHUNK))
        })
    })
}

fn read_into_guest(
    disk: &Disk,
    buf: &mut [u8],
    mem: &GuestMemory,
    data: &[Descriptor],
    offset: u64,
) -> Result<(), ReqError> {
    for (addr, file_off, n) in pieces(data, offset) {
        let chunk = &mut buf[..n];
        disk.file.read_exact_at(chunk, file_off).map_err(ReqError::Io)?;
        mem.write_slice(chunk, addr).map_err(|_| ReqError::Invalid("data outside memory"))?;
    }
    Ok(())
}

fn write_from_guest(
    disk: &Disk,
    buf: &mut [u8],
    mem: &GuestMemory,
    data: &[Descriptor],
    offset: u64,
) -> Result<(), ReqError> {
    for (addr, file_off, n) in pieces(data, offset) {
        let chunk = &mut buf[..n];
        mem.read_slice(chunk, addr).map_err(|_| ReqError::Invalid("data outside memory"))?;
        disk.file.write_all_at(chunk, file_off).map_err(ReqError::Io)?;
    }
    Ok(())
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_space(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: VirtioInterrupt,
        acked_features: u64,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let queue = super::single_queue(queues).inspect_err(|_| self.metrics.activate_fails.inc())?;
        self.acked_features = acked_features;
        self.broken = false;
        self.active = Some(Active { mem, interrupt, queue });
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        if index != 0 {
            return;
        }
        self.metrics.queue_event_count.inc();
        // While the rate limiter holds the queue, its timer resumes it.
        self.run_queue();
    }

    fn host_fds(&self) -> Vec<(std::os::unix::io::RawFd, u32)> {
        match self.active {
            Some(_) => self.limiter.host_fd(RATE_LIMITER_TOKEN).into_iter().collect(),
            None => Vec::new(),
        }
    }

    fn process_host_event(&mut self, token: u32) {
        if token != RATE_LIMITER_TOKEN {
            return;
        }
        self.metrics.rate_limiter_event_count.inc();
        if self.limiter.timer_fired() {
            self.run_queue();
        }
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.acked_features = 0;
        self.broken = false;
        true
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn needs_reset(&self) -> bool {
        self.broken
    }

    fn config_generation(&self) -> u32 {
        self.config_generation
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::{CountingIrq, VIRTIO_MMIO_INT_CONFIG};
    use crate::virtio::queue_util::test_queue::*;
    use std::io::Write;
    use std::sync::Arc;

    const HDR: u64 = 0x10_0000;
    const BUF: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const NSECT: u64 = 8;

    struct H {
        blk: Block,
        mem: GuestMemory,
        tq: TestQueue,
        irq: Arc<CountingIrq>,
        file: tempfile::NamedTempFile,
        used: u16,
    }

    fn disk_image(nbytes: usize) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..nbytes).map(|i| (i / 512) as u8 ^ (i as u8)).collect();
        f.write_all(&data).unwrap();
        f.flush().unwrap();
        f
    }

    fn expected(offset: usize, len: usize) -> Vec<u8> {
        (offset..offset + len).map(|i| (i / 512) as u8 ^ (i as u8)).collect()
    }

    fn harness_with(read_only: bool, cache: CacheType, event_idx: bool, id: &str) -> H {
        let file = disk_image(NSECT as usize * 512);
        let cfg = BlockConfig { id: id.into(), path: file.path().to_owned(), read_only, cache };
        let mut blk = Block::new(cfg).unwrap();
        let mem = memory();
        let tq = TestQueue::new(16);
        let irq = Arc::new(CountingIrq::default());
        let features = blk.avail_features() & if event_idx { u64::MAX } else { !VIRTIO_RING_F_EVENT_IDX };
        blk.activate(mem.clone(), VirtioInterrupt::new(irq.clone()), features, vec![tq.queue(event_idx)])
            .unwrap();
        H { blk, mem, tq, irq, file, used: 0 }
    }

    fn harness() -> H {
        harness_with(false, CacheType::Writeback, false, "rootfs")
    }

    impl H {
        fn header(&self, typ: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&typ.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        }

        /// Submits a chain and returns (used len, status byte at STATUS).
        fn submit(&mut self, descs: &[(u64, u32, u16)]) -> (u32, u8) {
            let head = self.tq.add_chain(&self.mem, descs);
            self.blk.process_queue(0);
            assert!(!self.blk.needs_reset());
            self.used += 1;
            assert_eq!(self.tq.used_idx(&self.mem), self.used, "request not completed");
            let (id, len) = self.tq.used_elem(&self.mem, self.used - 1);
            assert_eq!(id, u32::from(head));
            (len, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
        }

        fn request(&mut self, typ: u32, sector: u64, data: &[(u64, u32, u16)]) -> (u32, u8) {
            self.header(typ, sector);
            let mut descs = vec![(HDR, 16, 0)];
            descs.extend_from_slice(data);
            descs.push((STATUS, 1, F_WRITE));
            self.submit(&descs)
        }

        fn guest_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }

        fn file_bytes(&self) -> Vec<u8> {
            std::fs::read(self.file.path()).unwrap()
        }

        /// A plain valid read still works.
        fn assert_usable(&mut self) {
            assert_eq!(self.request(VIRTIO_BLK_T_IN, 0, &[(BUF, 512, F_WRITE)]), (513, VIRTIO_BLK_S_OK));
            assert_eq!(self.guest_bytes(BUF, 512), expected(0, 512));
        }
    }

    fn limit(bandwidth: Option<(u64, u64)>, ops: Option<(u64, u64)>) -> Option<RateLimiterConfig> {
        use crate::rate_limiter::TokenBucketConfig;
        let bucket = |(size, refill_time_ms)| TokenBucketConfig { size, one_time_burst: 0, refill_time_ms };
        Some(RateLimiterConfig { bandwidth: bandwidth.map(bucket), ops: ops.map(bucket) })
    }

    #[test]
    fn rate_limited_reads_wait_for_the_timer_and_then_complete_in_order() {
        use crate::rate_limiter::wait_readable;
        use std::time::Duration;
        let mut h = harness();
        // 1 KiB of bandwidth, refilled in 150 ms.
        h.blk.update_rate_limiter(limit(Some((1024, 150)), None)).unwrap();
        let fds = h.blk.host_fds();
        assert_eq!(fds.len(), 1, "the limiter's timer is listed");
        assert_eq!(fds[0].1, RATE_LIMITER_TOKEN);
        // Four 512-byte reads of sectors 0..4 at once: two fit the bucket.
        for i in 0..4u64 {
            let hdr = HDR + 0x100 * i;
            let mut b = [0u8; 16];
            b[8..16].copy_from_slice(&i.to_le_bytes());
            h.mem.write_slice(&b, GuestAddress(hdr)).unwrap();
            h.tq.add_chain(
                &h.mem,
                &[(hdr, 16, 0), (BUF + 0x1000 * i, 512, F_WRITE), (STATUS + i, 1, F_WRITE)],
            );
        }
        let t0 = Instant::now();
        h.blk.process_queue(0);
        assert_eq!(h.tq.used_idx(&h.mem), 2, "only what the bucket allows is served");
        let m = h.blk.metrics_handle();
        assert_eq!((m.read_count.get(), m.read_bytes.get()), (2, 1024));
        assert_eq!(m.rate_limiter_throttled_events.get(), 1);
        // A guest kick while throttled changes nothing.
        h.blk.process_queue(0);
        assert_eq!(h.tq.used_idx(&h.mem), 2);
        // The timer fires once the next 512 bytes are there (~75 ms), and the device resumes.
        let mut served_at = Vec::new();
        while h.tq.used_idx(&h.mem) < 4 {
            assert!(
                wait_readable(h.blk.host_fds()[0].0, Duration::from_millis(500)),
                "the timer never fired"
            );
            h.blk.process_host_event(RATE_LIMITER_TOKEN);
            served_at.push((h.tq.used_idx(&h.mem), t0.elapsed()));
        }
        let total = t0.elapsed();
        assert!(total >= Duration::from_millis(130) && total < Duration::from_millis(450), "{served_at:?}");
        // In order, each with its own data.
        for i in 0..4u16 {
            assert_eq!(h.tq.used_elem(&h.mem, i), (u32::from(i) * 3, 513));
            let sector = usize::from(i);
            assert_eq!(h.guest_bytes(BUF + 0x1000 * u64::from(i), 512), expected(sector * 512, 512));
        }
        assert_eq!((m.read_count.get(), m.read_bytes.get()), (4, 2048));
        assert!(m.rate_limiter_event_count.get() >= 2);
    }

    #[test]
    fn ops_limit_counts_every_request_and_lifting_it_resumes_at_once() {
        use crate::rate_limiter::wait_readable;
        use std::time::Duration;
        let mut h = harness();
        // One request per minute: the second waits...
        h.blk.update_rate_limiter(limit(None, Some((1, 60_000)))).unwrap();
        h.header(VIRTIO_BLK_T_FLUSH, 0);
        h.tq.add_chain(&h.mem, &[(HDR, 16, 0), (STATUS, 1, F_WRITE)]);
        h.tq.add_chain(&h.mem, &[(HDR, 16, 0), (STATUS, 1, F_WRITE)]);
        h.blk.process_queue(0);
        assert_eq!(h.tq.used_idx(&h.mem), 1);
        assert_eq!(h.blk.rate_limiter().and_then(|c| c.ops).map(|b| b.size), Some(1));
        // ...until PATCH /drives lifts the limit: served within milliseconds, not a minute.
        h.blk.update_rate_limiter(None).unwrap();
        assert_eq!(h.blk.rate_limiter(), None);
        assert!(wait_readable(h.blk.host_fds()[0].0, Duration::from_millis(200)));
        h.blk.process_host_event(RATE_LIMITER_TOKEN);
        assert_eq!(h.tq.used_idx(&h.mem), 2);
        assert_eq!(h.blk.metrics_handle().flush_count.get(), 2);
        h.used = 2;
        h.assert_usable();
    }

    #[test]
    fn read_round_trip() {
        let mut h = harness();
        let (len, st) = h.request(VIRTIO_BLK_T_IN, 1, &[(BUF, 1024, F_WRITE), (BUF + 0x10000, 512, F_WRITE)]);
        assert_eq!((len, st), (1537, VIRTIO_BLK_S_OK));
        assert_eq!(h.guest_bytes(BUF, 1024), expected(512, 1024));
        assert_eq!(h.guest_bytes(BUF + 0x10000, 512), expected(1536, 512));
        // Without event idx every completion interrupts.
        assert_eq!(h.irq.count(), 1);
    }

    #[test]
    fn large_read_spans_bounce_buffer_chunks() {
        let file = disk_image(1 << 20);
        let cfg = BlockConfig {
            id: "big".into(),
            path: file.path().to_owned(),
            read_only: true,
            cache: CacheType::Unsafe,
        };
        let mut blk = Block::new(cfg).unwrap();
        let mem = memory();
        let mut tq = TestQueue::new(16);
        let irq = Arc::new(CountingIrq::default());
        blk.activate(mem.clone(), VirtioInterrupt::new(irq), VIRTIO_F_VERSION_1, vec![tq.queue(false)])
            .unwrap();
        let mut h = [0u8; 16];
        h[8..16].copy_from_slice(&3u64.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        tq.add_chain(&mem, &[(HDR, 16, 0), (BUF, 200 * 1024, F_WRITE), (STATUS, 1, F_WRITE)]);
        blk.process_queue(0);
        assert_eq!(tq.used_elem(&mem, 0).1, 200 * 1024 + 1);
        let mut got = vec![0u8; 200 * 1024];
        mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(got, expected(3 * 512, 200 * 1024));
    }

    #[test]
    fn write_round_trip() {
        let mut h = harness();
        let pattern: Vec<u8> = (0..1024).map(|i| (i % 251) as u8).collect();
        h.mem.write_slice(&pattern, GuestAddress(BUF)).unwrap();
        let (len, st) = h.request(VIRTIO_BLK_T_OUT, 2, &[(BUF, 512, 0), (BUF + 512, 512, 0)]);
        assert_eq!((len, st), (1, VIRTIO_BLK_S_OK));
        assert_eq!(&h.file_bytes()[1024..2048], &pattern[..]);
        // Neighbours untouched.
        assert_eq!(&h.file_bytes()[512..1024], &expected(512, 512)[..]);
        assert_eq!(&h.file_bytes()[2048..2560], &expected(2048, 512)[..]);
        // Read back through the device.
        let (len, st) = h.request(VIRTIO_BLK_T_IN, 2, &[(BUF + 0x8000, 1024, F_WRITE)]);
        assert_eq!((len, st), (1025, VIRTIO_BLK_S_OK));
        assert_eq!(h.guest_bytes(BUF + 0x8000, 1024), pattern);
    }

    #[test]
    fn flush_per_cache_type() {
        let mut h = harness_with(false, CacheType::Writeback, false, "wb");
        assert_ne!(h.blk.avail_features() & VIRTIO_BLK_F_FLUSH, 0);
        assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (1, VIRTIO_BLK_S_OK));
        let mut h = harness_with(false, CacheType::Unsafe, false, "unsafe");
        assert_eq!(h.blk.avail_features() & VIRTIO_BLK_F_FLUSH, 0);
        // Not offered, but acknowledged if sent anyway.
        assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (1, VIRTIO_BLK_S_OK));
    }

    #[test]
    fn get_id() {
        let mut h = harness();
        let (len, st) = h.request(VIRTIO_BLK_T_GET_ID, 0, &[(BUF, 20, F_WRITE)]);
        assert_eq!((len, st), (21, VIRTIO_BLK_S_OK));
        let mut want = [0u8; 20];
        want[..6].copy_from_slice(b"rootfs");
        assert_eq!(h.guest_bytes(BUF, 20), want);

        let mut h = harness_with(false, CacheType::Unsafe, false, "a-very-long-drive-identifier");
        h.mem.write_slice(&[0xee; 32], GuestAddress(BUF)).unwrap();
        let (len, st) = h.request(VIRTIO_BLK_T_GET_ID, 0, &[(BUF, 32, F_WRITE)]);
        assert_eq!((len, st), (21, VIRTIO_BLK_S_OK));
        assert_eq!(h.guest_bytes(BUF, 20), b"a-very-long-drive-id");
        assert_eq!(h.guest_bytes(BUF + 20, 12), [0xee; 12]);
        // A readable buffer is refused, and so is no buffer.
        assert_eq!(h.request(VIRTIO_BLK_T_GET_ID, 0, &[(BUF, 20, 0)]), (1, VIRTIO_BLK_S_IOERR));
        assert_eq!(h.request(VIRTIO_BLK_T_GET_ID, 0, &[]), (1, VIRTIO_BLK_S_IOERR));
        // A short buffer gets what fits, across descriptors.
        let (len, st) =
            h.request(VIRTIO_BLK_T_GET_ID, 0, &[(BUF + 0x100, 4, F_WRITE), (BUF + 0x200, 4, F_WRITE)]);
        assert_eq!((len, st), (9, VIRTIO_BLK_S_OK));
        assert_eq!(h.guest_bytes(BUF + 0x100, 4), b"a-ve");
        assert_eq!(h.guest_bytes(BUF + 0x200, 4), b"ry-l");
    }

    #[test]
    fn out_of_range_sectors() {
        let mut h = harness();
        assert_eq!(h.request(VIRTIO_BLK_T_IN, NSECT - 1, &[(BUF, 1024, F_WRITE)]), (1, VIRTIO_BLK_S_IOERR));
        assert_eq!(h.request(VIRTIO_BLK_T_IN, NSECT, &[(BUF, 512, F_WRITE)]), (1, VIRTIO_BLK_S_IOERR));
        assert_eq!(h.request(VIRTIO_BLK_T_IN, u64::MAX, &[(BUF, 512, F_WRITE)]), (1, VIRTIO_BLK_S_IOERR));
        assert_eq!(h.request(VIRTIO_BLK_T_OUT, u64::MAX / 512, &[(BUF, 512, 0)]), (1, VIRTIO_BLK_S_IOERR));
        // The last sector is fine.
        assert_eq!(h.request(VIRTIO_BLK_T_IN, NSECT - 1, &[(BUF, 512, F_WRITE)]), (513, VIRTIO_BLK_S_OK));
        h.assert_usable();
    }

    #[test]
    fn write_to_read_only_disk() {
        let mut h = harness_with(true, CacheType::Unsafe, false, "ro");
        assert_ne!(h.blk.avail_features() & VIRTIO_BLK_F_RO, 0);
        let before = h.file_bytes();
        h.mem.write_slice(&[0x55; 512], GuestAddress(BUF)).unwrap();
        assert_eq!(h.request(VIRTIO_BLK_T_OUT, 0, &[(BUF, 512, 0)]), (1, VIRTIO_BLK_S_IOERR));
        assert_eq!(h.file_bytes(), before);
        h.assert_usable();
    }

    #[test]
    fn descriptor_outside_guest_memory() {
        let mut h = harness();
        let outside = MEM_SIZE as u64;
        assert_eq!(h.request(VIRTIO_BLK_T_IN, 0, &[(outside, 512, F_WRITE)]), (1, VIRTIO_BLK_S_IOERR));
        // Straddling the end of memory.
        assert_eq!(h.request(VIRTIO_BLK_T_IN, 0, &[(outside - 512, 1024, F_WRITE)]), (1, VIRTIO_BLK_S_IOERR));
        let before = h.file_bytes();
        assert_eq!(h.request(VIRTIO_BLK_T_OUT, 0, &[(outside - 512, 1024, 0)]), (1, VIRTIO_BLK_S_IOERR));
        assert_eq!(h.file_bytes(), before, "nothing written before the check");
        // Header outside memory.
        let (len, st) = h.submit(&[(outside, 16, 0), (STATUS, 1, F_WRITE)]);
        assert_eq!((len, st), (1, VIRTIO_BLK_S_IOERR));
        // Status outside memory: no status can be written.
        h.header(VIRTIO_BLK_T_IN, 0);
        let (len, _) = h.submit(&[(HDR, 16, 0), (BUF, 512, F_WRITE), (outside + 5, 1, F_WRITE)]);
        assert_eq!(len, 0);
        h.assert_usable();
    }

    #[test]
    fn descriptor_length_overflow() {
        let mut h = harness();
        // Address + length wraps the address space.
        assert_eq!(h.request(VIRTIO_BLK_T_IN, 0, &[(u64::MAX - 100, 512, F_WRITE)]), (1, VIRTIO_BLK_S_IOERR));
        // Total chain length beyond 4 GiB: the chain is cut short and has no status.
        h.header(VIRTIO_BLK_T_IN, 0);
        let (len, _) = h.submit(&[(HDR, 16, 0), (BUF, u32::MAX - 8, F_WRITE), (STATUS, 1, F_WRITE)]);
        assert_eq!(len, 0);
        // Huge but representable: bounded.
        let (len, st) = h.request(VIRTIO_BLK_T_IN, 0, &[(BUF, 0x8000_0000, F_WRITE)]);
        assert_eq!((len, st), (1, VIRTIO_BLK_S_IOERR));
        h.assert_usable();
    }

    #[test]
    fn looping_chain() {
        let mut h = harness();
        h.header(VIRTIO_BLK_T_IN, 0);
        // 0 -> 1 -> 0 -> ...
        h.tq.write_desc(&h.mem, 0, HDR, 16, F_NEXT, 1);
        h.tq.write_desc(&h.mem, 1, BUF, 512, F_NEXT | F_WRITE, 0);
        h.tq.publish(&h.mem, 0);
        h.blk.process_queue(0);
        assert!(!h.blk.needs_reset());
        assert_eq!(h.tq.used_idx(&h.mem), 1);
        // The chain ends after queue-size descriptors; its mixed-direction data fails.
        assert!(h.tq.used_elem(&h.mem, 0).1 <= 1);
        h.used = 1;
        // Point the test queue past the descriptors used above.
        h.tq.add_chain(&h.mem, &[(0, 0, 0), (0, 0, 0)]);
        h.blk.process_queue(0);
        h.used += 1;
        h.assert_usable();
    }

    #[test]
    fn missing_or_bad_status_descriptor() {
        let mut h = harness();
        h.header(VIRTIO_BLK_T_IN, 0);
        // Header only.
        assert_eq!(h.submit(&[(HDR, 16, 0)]).0, 0);
        // Status readable.
        assert_eq!(h.submit(&[(HDR, 16, 0), (BUF, 512, F_WRITE), (STATUS, 1, 0)]).0, 0);
        // Status of length 0.
        assert_eq!(h.submit(&[(HDR, 16, 0), (BUF, 512, F_WRITE), (STATUS, 0, F_WRITE)]).0, 0);
        // Data buffer taken as status: the request has no data and fails.
        h.mem.write_obj(0xffu8, GuestAddress(BUF + 511)).unwrap();
        assert_eq!(h.submit(&[(HDR, 16, 0), (BUF, 512, F_WRITE)]).0, 1);
        assert_eq!(h.guest_bytes(BUF + 511, 1), [VIRTIO_BLK_S_IOERR]);
        h.assert_usable();
    }

    #[test]
    fn wrong_direction_and_bad_headers() {
        let mut h = harness();
        assert_eq!(h.request(VIRTIO_BLK_T_IN, 0, &[(BUF, 512, 0)]), (1, VIRTIO_BLK_S_IOERR));
        let before = h.file_bytes();
        assert_eq!(h.request(VIRTIO_BLK_T_OUT, 0, &[(BUF, 512, F_WRITE)]), (1, VIRTIO_BLK_S_IOERR));
        assert_eq!(h.file_bytes(), before);
        // Not whole sectors.
        assert_eq!(h.request(VIRTIO_BLK_T_IN, 0, &[(BUF, 100, F_WRITE)]), (1, VIRTIO_BLK_S_IOERR));
        // No data at all.
        assert_eq!(h.request(VIRTIO_BLK_T_IN, 0, &[]), (1, VIRTIO_BLK_S_IOERR));
        // Header too short, header writable.
        h.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            h.submit(&[(HDR, 8, 0), (BUF, 512, F_WRITE), (STATUS, 1, F_WRITE)]),
            (1, VIRTIO_BLK_S_IOERR)
        );
        assert_eq!(
            h.submit(&[(HDR, 16, F_WRITE), (BUF, 512, F_WRITE), (STATUS, 1, F_WRITE)]),
            (1, VIRTIO_BLK_S_IOERR)
        );
        // Unknown type.
        assert_eq!(h.request(11, 0, &[(BUF, 512, 0)]), (1, VIRTIO_BLK_S_UNSUPP));
        h.assert_usable();
    }

    #[test]
    fn bogus_avail_index_breaks_the_queue_without_hanging() {
        let mut h = harness();
        h.tq.set_avail_idx(&h.mem, 1000);
        h.blk.process_queue(0);
        assert!(h.blk.needs_reset());
        // Further notifications are ignored until reset.
        h.blk.process_queue(0);
        assert!(h.blk.reset());
        assert!(!h.blk.is_activated());
        assert!(!h.blk.needs_reset());
    }

    #[test]
    fn event_idx_suppresses_interrupts() {
        let mut h = harness_with(false, CacheType::Unsafe, true, "e");
        // used_event (after the avail ring) = 1: interrupt only once the second chain is used.
        h.mem.write_obj(1u16.to_le(), GuestAddress(AVAIL + 4 + 2 * 16)).unwrap();
        h.assert_usable();
        assert_eq!(h.irq.count(), 0);
        h.assert_usable();
        assert_eq!(h.irq.count(), 1);
        // avail_event tells the driver where to kick next.
        let avail_event: u16 = h.mem.read_obj(GuestAddress(USED + 4 + 8 * 16)).unwrap();
        assert_eq!(avail_event, 2);
    }

    #[test]
    fn capacity_rounds_down_and_config_space() {
        let file = disk_image(3 * 512 + 100);
        let cfg = BlockConfig {
            id: "odd".into(),
            path: file.path().to_owned(),
            read_only: true,
            cache: CacheType::Unsafe,
        };
        let blk = Block::new(cfg).unwrap();
        assert_eq!(blk.capacity(), 3);
        let mut cap = [0u8; 8];
        blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 3);
        let mut hi = [0u8; 4];
        blk.read_config(4, &mut hi);
        assert_eq!(hi, [0; 4]);
        let mut seg = [0u8; 4];
        blk.read_config(12, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), 254);
        let mut beyond = [0xaau8; 4];
        blk.read_config(100, &mut beyond);
        assert_eq!(beyond, [0xaa; 4]);
        blk.read_config(u64::MAX, &mut beyond);
    }

    #[test]
    fn open_errors() {
        let missing = BlockConfig {
            id: "x".into(),
            path: "/nonexistent/kiln/disk.img".into(),
            read_only: false,
            cache: CacheType::Unsafe,
        };
        assert!(matches!(Block::new(missing), Err(BlockError::Open { .. })));

        // A file that can be read but not written. As root, mode bits don't stop writes, so fall
        // back to a sysfs attribute that is read-only for everyone.
        use std::os::unix::fs::PermissionsExt;
        let img = disk_image(512);
        std::fs::set_permissions(img.path(), std::fs::Permissions::from_mode(0o444)).unwrap();
        let mut path = img.path().to_owned();
        if OpenOptions::new().write(true).open(&path).is_ok() {
            path = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size".into();
            if OpenOptions::new().write(true).open(&path).is_ok() || !path.exists() {
                return;
            }
        }
        let cfg =
            BlockConfig { id: "x".into(), path: path.clone(), read_only: false, cache: CacheType::Unsafe };
        let err = Block::new(cfg).unwrap_err();
        assert!(matches!(err, BlockError::NotWritable { .. }), "{err:?}");
        assert!(err.to_string().contains("is_read_only"), "{err}");
        // Read-only open of the same file works.
        let cfg = BlockConfig { id: "x".into(), path, read_only: true, cache: CacheType::Unsafe };
        Block::new(cfg).unwrap();
    }

    #[test]
    fn update_backing_changes_capacity_and_interrupts() {
        let mut h = harness();
        let bigger = disk_image(16 * 512);
        assert_eq!(h.blk.config_generation(), 0);
        h.blk.update_backing(bigger.path(), false).unwrap();
        assert_eq!(h.blk.capacity(), 16);
        assert_eq!(h.blk.config_generation(), 1);
        assert_eq!(h.irq.count(), 1);
        let mut cap = [0u8; 8];
        h.blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 16);
        // The new file is used.
        assert_eq!(h.request(VIRTIO_BLK_T_IN, 15, &[(BUF, 512, F_WRITE)]), (513, VIRTIO_BLK_S_OK));
        assert_eq!(h.guest_bytes(BUF, 512), expected(15 * 512, 512));
        // Swapping to a read-only file makes writes fail.
        h.blk.update_backing(bigger.path(), true).unwrap();
        assert!(h.blk.is_read_only());
        assert_eq!(h.request(VIRTIO_BLK_T_OUT, 0, &[(BUF, 512, 0)]), (1, VIRTIO_BLK_S_IOERR));
        // A failing swap keeps the old file.
        assert!(h.blk.update_backing("/nonexistent/x", true).is_err());
        assert_eq!(h.blk.capacity(), 16);
    }

    #[test]
    fn through_the_mmio_transport() {
        use crate::bus::BusDevice;
        use crate::virtio::mmio::{status::*, MmioTransport};
        let file = disk_image(NSECT as usize * 512);
        let cfg = BlockConfig {
            id: "t".into(),
            path: file.path().to_owned(),
            read_only: false,
            cache: CacheType::Writeback,
        };
        let mem = memory();
        let irq = Arc::new(CountingIrq::default());
        let mut t = MmioTransport::new(
            mem.clone(),
            Box::new(Block::new(cfg).unwrap()),
            VirtioInterrupt::new(irq.clone()),
        );
        let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
        let r = |t: &mut MmioTransport, off: u64| {
            let mut b = [0u8; 4];
            t.read(off, &mut b);
            u32::from_le_bytes(b)
        };
        assert_eq!(r(&mut t, 0x8), device_type::BLOCK);
        assert_eq!(r(&mut t, 0x100), NSECT as u32);
        w(&mut t, 0x70, ACKNOWLEDGE);
        w(&mut t, 0x70, ACKNOWLEDGE | DRIVER);
        w(&mut t, 0x14, 0);
        let lo = r(&mut t, 0x10);
        w(&mut t, 0x14, 1);
        let hi = r(&mut t, 0x10);
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, lo);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, hi);
        w(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(r(&mut t, 0x70), ACKNOWLEDGE | DRIVER | FEATURES_OK);
        w(&mut t, 0x30, 0);
        w(&mut t, 0x38, 16);
        w(&mut t, 0x80, DESC as u32);
        w(&mut t, 0x90, AVAIL as u32);
        w(&mut t, 0xa0, USED as u32);
        w(&mut t, 0x44, 1);
        w(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert!(t.is_activated());

        let mut tq = TestQueue::new(16);
        let mut h = [0u8; 16];
        h[8..16].copy_from_slice(&2u64.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        tq.add_chain(&mem, &[(HDR, 16, 0), (BUF, 512, F_WRITE), (STATUS, 1, F_WRITE)]);
        w(&mut t, 0x50, 0);
        assert_eq!(tq.used_idx(&mem), 1);
        assert_eq!(tq.used_elem(&mem, 0).1, 513);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), VIRTIO_BLK_S_OK);
        // Event idx was negotiated: the driver's used_event is 0, so the first completion interrupts.
        assert_eq!(irq.count(), 1);
        assert_eq!(r(&mut t, 0x60), 1);

        // Swap the backing file through the transport.
        let bigger = disk_image(32 * 512);
        t.device_as_mut::<Block>().unwrap().update_backing(bigger.path(), false).unwrap();
        assert_eq!(r(&mut t, 0x100), 32);
        assert_eq!(r(&mut t, 0xfc), 1);
        assert_eq!(r(&mut t, 0x60) & VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_CONFIG);
    }
}
