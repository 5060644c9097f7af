//! virtio-balloon (device type 5): the host asks the guest to give memory back, and the guest
//! reports memory statistics.
//!
//! Queues: 0 inflate, 1 deflate, 2 statistics (only when statistics are enabled, i.e. a non-zero
//! polling interval; then VIRTIO_BALLOON_F_STATS_VQ is offered). VIRTIO_BALLOON_F_DEFLATE_ON_OOM
//! is offered when asked for. MUST_TELL_HOST, free page hinting and reporting are not offered.
//!
//! Config space (8 bytes, little endian): `num_pages` (the target, in 4 KiB pages; set by the
//! host) and `actual` (the pages the guest has in its balloon; written by the guest, the only
//! writable field).
//!
//! - Inflate: every chain carries arrays of little-endian u32 page frame numbers (4 KiB pages).
//!   Each PFN whose page lies wholly inside guest RAM is released on the host through its host
//!   address; contiguous pages of one region (in guest and host address space) are released with
//!   one call. How depends on the region's mapping: private anonymous memory (what the VMM
//!   allocates) gets `madvise(MADV_DONTNEED)`; a private file mapping (a restored snapshot) gets
//!   fresh anonymous memory mapped over the pages (`MAP_FIXED`), since MADV_DONTNEED would bring
//!   the file's contents back; a shared mapping gets `MADV_REMOVE`, which frees the backing store
//!   too; hugetlbfs memory cannot be released 4 KiB at a time and is left alone (one warning). In
//!   all released cases the page reads back as zeros and is faulted in again when the guest
//!   touches it. PFNs outside guest RAM, write-only descriptors and descriptors whose length is not
//!   a multiple of 4 are skipped; at most [`MAX_PFNS_PER_CHAIN`] PFNs are taken from one chain
//!   (Linux sends at most 256). Every chain completes with used length 0.
//! - Deflate: nothing to do on the host (pages fault back in on access); chains complete at once.
//! - Statistics (the virtio protocol): the driver posts one buffer of `{tag: u16, val: u64}`
//!   entries (packed, 10 bytes each, little endian) at start. The device parses it and keeps the
//!   buffer; every `stats_polling_interval_s` seconds (a non-blocking timerfd listed in
//!   [`VirtioDevice::host_fds`]) it hands the buffer back (used ring + interrupt), and the driver
//!   refills it with fresh values and posts it again. At most [`MAX_STATS`] entries are read per
//!   buffer; unknown tags are ignored.
//!
//! Host-side control, following Firecracker's balloon API (`PUT`/`PATCH /balloon`,
//! `GET /balloon/statistics`, `PATCH /balloon/statistics`): [`Balloon::update_target`] changes
//! `num_pages` and raises a configuration change interrupt; [`Balloon::latest_stats`] returns the
//! latest values with Firecracker's field names; [`Balloon::update_stats_interval`] changes the
//! polling interval, but, as in Firecracker, statistics cannot be turned on or off once the device
//! exists (the statistics queue and feature bit are fixed at creation).

use std::io;
use std::num::Wrapping;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::timerfd::TimerFd;

use super::queue_util::{drain_queue, Chain};
use super::{device_type, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::interrupt::VirtioInterrupt;
use crate::metrics::BalloonMetrics;
use crate::rate_limiter::nonblocking_timer;
use crate::GuestMemory;

/// Queue size offered to the driver (all queues).
pub const QUEUE_SIZE: u16 = 256;
/// Index of the inflate queue.
pub const INFLATE_QUEUE: usize = 0;
/// Index of the deflate queue.
pub const DEFLATE_QUEUE: usize = 1;
/// Index of the statistics queue (present only when statistics are enabled).
pub const STATS_QUEUE: usize = 2;
/// Token of the statistics timerfd in [`VirtioDevice::host_fds`].
pub const STATS_TIMER_TOKEN: u32 = 0;

/// Feature bit: the statistics virtqueue is present.
pub const VIRTIO_BALLOON_F_STATS_VQ: u64 = 1 << 1;
/// Feature bit: the guest deflates the balloon when it runs out of memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u64 = 1 << 2;

/// The balloon protocol's page size (PFNs are in these units, whatever the guest's page size).
pub const BALLOON_PAGE_SIZE: u64 = 1 << 12;
const PFN_SHIFT: u32 = 12;
/// 4 KiB pages per MiB.
pub const PAGES_PER_MIB: u32 = 256;
/// PFNs taken from one inflate chain at most; the rest of the chain is ignored.
pub const MAX_PFNS_PER_CHAIN: usize = 4096;
/// Statistics entries read from one buffer at most (Linux 6.x sends 16).
pub const MAX_STATS: usize = 64;
/// Size of one statistics entry: a packed `{ tag: le16, val: le64 }`.
pub const STAT_ENTRY_SIZE: usize = 10;
/// Size of the config space: `num_pages` and `actual`.
pub const CONFIG_SPACE_SIZE: usize = 8;

/// Statistics tags (virtio 1.2 section 5.5.6.3, plus the Linux 6.x extensions 10..=15).
pub mod stat_tag {
    pub const SWAP_IN: u16 = 0;
    pub const SWAP_OUT: u16 = 1;
    pub const MAJFLT: u16 = 2;
    pub const MINFLT: u16 = 3;
    pub const MEMFREE: u16 = 4;
    pub const MEMTOT: u16 = 5;
    pub const AVAIL: u16 = 6;
    pub const CACHES: u16 = 7;
    pub const HTLB_PGALLOC: u16 = 8;
    pub const HTLB_PGFAIL: u16 = 9;
    pub const OOM_KILL: u16 = 10;
    pub const ALLOC_STALL: u16 = 11;
    pub const ASYNC_SCAN: u16 = 12;
    pub const DIRECT_SCAN: u16 = 13;
    pub const ASYNC_RECLAIM: u16 = 14;
    pub const DIRECT_RECLAIM: u16 = 15;
}

/// Pre-boot configuration (Firecracker's `Balloon` body, without free page hinting/reporting).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Target balloon size in MiB.
    pub amount_mib: u32,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// Seconds between statistics refreshes; 0 disables statistics (no statistics queue).
    pub stats_polling_interval_s: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    #[error("balloon size of {amount_mib} MiB is too large: at most {} MiB", u32::MAX / PAGES_PER_MIB)]
    TooLarge { amount_mib: u32 },
    #[error("statistics cannot be enabled or disabled after the balloon device was created")]
    StatisticsStateChange,
    #[error("failed to set up the statistics timer")]
    Timer(#[source] io::Error),
    #[error("failed to signal the guest")]
    Signal(#[source] io::Error),
}

/// What `GET /balloon/statistics` reports (Firecracker's `BalloonStats`, same field names). A
/// statistic is `None` until the guest reported it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalloonStatsSnapshot {
    /// Target balloon size, in 4 KiB pages.
    pub target_pages: u32,
    /// Pages the guest says it holds in the balloon.
    pub actual_pages: u32,
    pub target_mib: u32,
    pub actual_mib: u32,
    /// Bytes swapped in.
    pub swap_in: Option<u64>,
    /// Bytes swapped out.
    pub swap_out: Option<u64>,
    pub major_faults: Option<u64>,
    pub minor_faults: Option<u64>,
    /// Bytes of free memory.
    pub free_memory: Option<u64>,
    /// Bytes of memory in total.
    pub total_memory: Option<u64>,
    /// Bytes available for new applications without swapping (MemAvailable).
    pub available_memory: Option<u64>,
    /// Bytes of disk caches.
    pub disk_caches: Option<u64>,
    pub hugetlb_allocations: Option<u64>,
    pub hugetlb_failures: Option<u64>,
    pub oom_kill: Option<u64>,
    pub alloc_stall: Option<u64>,
    pub async_scan: Option<u64>,
    pub direct_scan: Option<u64>,
    pub async_reclaim: Option<u64>,
    pub direct_reclaim: Option<u64>,
}

impl BalloonStatsSnapshot {
    /// Records one statistic; returns false for an unknown tag.
    fn record(&mut self, tag: u16, val: u64) -> bool {
        use stat_tag::*;
        let field = match tag {
            SWAP_IN => &mut self.swap_in,
            SWAP_OUT => &mut self.swap_out,
            MAJFLT => &mut self.major_faults,
            MINFLT => &mut self.minor_faults,
            MEMFREE => &mut self.free_memory,
            MEMTOT => &mut self.total_memory,
            AVAIL => &mut self.available_memory,
            CACHES => &mut self.disk_caches,
            HTLB_PGALLOC => &mut self.hugetlb_allocations,
            HTLB_PGFAIL => &mut self.hugetlb_failures,
            OOM_KILL => &mut self.oom_kill,
            ALLOC_STALL => &mut self.alloc_stall,
            ASYNC_SCAN => &mut self.async_scan,
            DIRECT_SCAN => &mut self.direct_scan,
            ASYNC_RECLAIM => &mut self.async_reclaim,
            DIRECT_RECLAIM => &mut self.direct_reclaim,
            _ => return false,
        };
        *field = Some(val);
        true
    }
}

fn mib_to_pages(amount_mib: u32) -> Result<u32, BalloonError> {
    amount_mib.checked_mul(PAGES_PER_MIB).ok_or(BalloonError::TooLarge { amount_mib })
}

fn pages_to_mib(pages: u32) -> u32 {
    pages / PAGES_PER_MIB
}

fn errno_to_io(e: vmm_sys_util::errno::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

struct Active {
    mem: GuestMemory,
    interrupt: VirtioInterrupt,
    queues: Vec<Queue>,
    /// The driver negotiated the statistics queue.
    stats: bool,
}

/// Scratch space and counters for inflate processing.
#[derive(Default)]
struct Inflater {
    pfns: Vec<u32>,
    bytes: Vec<u8>,
    /// Pages released with madvise since the device was created.
    released_pages: u64,
    /// PFNs skipped because they are not guest RAM.
    invalid_pfns: u64,
    /// A madvise failure was already logged as a warning (later ones go to debug).
    warned: bool,
}

/// How a guest memory region is mapped, which decides how its pages are released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backing {
    /// Private anonymous memory (what the VMM allocates): MADV_DONTNEED frees the pages and the
    /// next access faults in zero pages.
    PrivateAnon,
    /// A private file mapping (a restored snapshot's memory file): MADV_DONTNEED would bring the
    /// file's contents back, so the pages are replaced by fresh anonymous memory (mmap MAP_FIXED
    /// over them, as Firecracker does for restored guests).
    PrivateFile,
    /// A shared mapping (shmem, memfd or a file): MADV_REMOVE frees the backing store too.
    Shared,
    /// hugetlbfs pages cannot be released 4 KiB at a time: nothing is done.
    HugeTlb,
}

impl Backing {
    fn of(region: &vm_memory::GuestRegionMmap<()>) -> Backing {
        let flags = region.flags();
        if flags & libc::MAP_HUGETLB != 0 {
            Backing::HugeTlb
        } else if flags & libc::MAP_SHARED != 0 {
            Backing::Shared
        } else if region.file_offset().is_some() {
            Backing::PrivateFile
        } else {
            Backing::PrivateAnon
        }
    }
}

/// One 4 KiB guest page as the host maps it.
struct HostPage {
    host: *mut u8,
    /// Start of the guest memory region holding the page (runs never cross regions).
    region: GuestAddress,
    backing: Backing,
    prot: i32,
}

/// A run of contiguous pages of one region, released together.
struct Run {
    page: HostPage,
    len: usize,
    last_pfn: u32,
}

/// The host mapping of 4 KiB guest page `pfn`, if the whole page is guest RAM inside one region
/// and its host address is page aligned (madvise and mmap need that).
fn host_page(mem: &GuestMemory, pfn: u32) -> Option<HostPage> {
    let gpa = GuestAddress(u64::from(pfn) << PFN_SHIFT);
    let (region, offset) = GuestMemoryBackend::to_region_addr(mem, gpa)?;
    let end = offset.raw_value().checked_add(BALLOON_PAGE_SIZE)?;
    if end > region.len() {
        return None;
    }
    let host = region.get_host_address(offset).ok()?;
    if !(host as usize).is_multiple_of(BALLOON_PAGE_SIZE as usize) {
        return None;
    }
    Some(HostPage { host, region: region.start_addr(), backing: Backing::of(region), prot: region.prot() })
}

impl Inflater {
    /// Handles one inflate chain; returns the used length (always 0).
    fn handle_chain(&mut self, mem: &GuestMemory, chain: Chain<'_>) -> u32 {
        self.pfns.clear();
        // The chain iterator stops after queue-size descriptors (loops).
        let descs: Vec<Descriptor> = chain.collect();
        for d in &descs {
            if d.is_write_only() {
                tracing::debug!("balloon: inflate descriptor is device-writable; skipped");
                continue;
            }
            let len = d.len() as usize;
            if !len.is_multiple_of(4) {
                tracing::debug!("balloon: inflate descriptor of {len} bytes is not a PFN array; skipped");
                continue;
            }
            let room = MAX_PFNS_PER_CHAIN - self.pfns.len();
            let n = (len / 4).min(room);
            if n < len / 4 {
                tracing::debug!(
                    "balloon: inflate chain has more than {MAX_PFNS_PER_CHAIN} PFNs; the rest is ignored"
                );
            }
            if n == 0 {
                continue;
            }
            self.bytes.resize(n * 4, 0);
            if mem.read_slice(&mut self.bytes, d.addr()).is_err() {
                tracing::debug!("balloon: inflate descriptor outside guest memory; skipped");
                continue;
            }
            self.pfns
                .extend(self.bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        }
        self.release(mem);
        0
    }

    /// Releases the pages in `self.pfns`, coalescing contiguous ones.
    fn release(&mut self, mem: &GuestMemory) {
        self.pfns.sort_unstable();
        self.pfns.dedup();
        let pfns = std::mem::take(&mut self.pfns);
        let mut run: Option<Run> = None;
        for &pfn in &pfns {
            let Some(page) = host_page(mem, pfn) else {
                self.invalid_pfns += 1;
                tracing::debug!("balloon: PFN {pfn:#x} is not guest RAM; skipped");
                continue;
            };
            if let Some(r) = run.as_mut() {
                if pfn.checked_sub(1) == Some(r.last_pfn)
                    && r.page.region == page.region
                    && r.page.host.wrapping_add(r.len) == page.host
                {
                    r.len += BALLOON_PAGE_SIZE as usize;
                    r.last_pfn = pfn;
                    continue;
                }
            }
            if let Some(done) = run.replace(Run { page, len: BALLOON_PAGE_SIZE as usize, last_pfn: pfn }) {
                self.discard(&done);
            }
        }
        if let Some(done) = run {
            self.discard(&done);
        }
        self.pfns = pfns;
    }

    fn discard(&mut self, run: &Run) {
        let (host, len) = (run.page.host, run.len);
        let result = match run.page.backing {
            Backing::PrivateAnon => madvise(host, len, libc::MADV_DONTNEED),
            Backing::Shared => madvise(host, len, libc::MADV_REMOVE),
            Backing::PrivateFile => replace_with_anon(host, len, run.page.prot),
            Backing::HugeTlb => Err(io::Error::other("guest memory is on huge pages")),
        };
        if let Err(err) = result {
            if self.warned {
                tracing::debug!("balloon: releasing {len} bytes of guest memory failed: {err}");
            } else {
                self.warned = true;
                tracing::warn!(
                    "balloon: releasing {len} bytes of guest memory failed: {err}; inflated memory is \
                     not returned to the host (further failures are logged at debug level)"
                );
            }
            return;
        }
        self.released_pages += (len as u64) / BALLOON_PAGE_SIZE;
    }
}

/// `madvise(2)` on whole pages of guest memory.
fn madvise(host: *mut u8, len: usize, advice: i32) -> io::Result<()> {
    // SAFETY: [host, host + len) is whole pages of one guest memory region (checked by
    // `host_page`), which stays mapped while the `GuestMemory` the caller holds lives.
    // MADV_DONTNEED / MADV_REMOVE do not unmap anything: they drop the pages' contents and the
    // next access faults in zero pages. Guest memory is only accessed through volatile accessors
    // and raw pointers, never through Rust references that could observe the change.
    if unsafe { libc::madvise(host.cast(), len, advice) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Maps fresh private anonymous memory over whole pages of a private file-backed region.
fn replace_with_anon(host: *mut u8, len: usize, prot: i32) -> io::Result<()> {
    let flags = libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: [host, host + len) is whole pages of one guest memory region (checked by
    // `host_page`), a mapping the guest memory object owns and unmaps as a whole on drop, which
    // also covers this replacement. MAP_FIXED swaps the pages atomically for zero pages with the
    // region's protection, so the range stays mapped and valid; KVM follows the change through
    // its MMU notifiers. Guest memory is only accessed through volatile accessors and raw
    // pointers, never through Rust references that could observe the change.
    let ret = unsafe { libc::mmap(host.cast(), len, prot, flags, -1, 0) };
    if ret == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    if ret.cast::<u8>() != host {
        // MAP_FIXED either maps at `host` or fails; anything else is a kernel bug.
        return Err(io::Error::other("mmap(MAP_FIXED) mapped elsewhere"));
    }
    Ok(())
}

/// Reads the statistics entries of one buffer into `stats`. Returns how many entries were read.
fn parse_stats(mem: &GuestMemory, chain: Chain<'_>, stats: &mut BalloonStatsSnapshot) -> usize {
    let mut buf = [0u8; MAX_STATS * STAT_ENTRY_SIZE];
    let mut filled = 0usize;
    for d in chain {
        if filled == buf.len() {
            break;
        }
        if d.is_write_only() {
            tracing::debug!("balloon: device-writable descriptor in the statistics buffer; skipped");
            continue;
        }
        let n = (d.len() as usize).min(buf.len() - filled);
        if mem.read_slice(&mut buf[filled..filled + n], d.addr()).is_err() {
            tracing::debug!("balloon: statistics buffer outside guest memory");
            break;
        }
        filled += n;
    }
    let mut count = 0;
    for e in buf[..filled].chunks_exact(STAT_ENTRY_SIZE) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let val = u64::from_le_bytes([e[2], e[3], e[4], e[5], e[6], e[7], e[8], e[9]]);
        if stats.record(tag, val) {
            count += 1;
        } else {
            tracing::debug!("balloon: unknown statistics tag {tag}");
        }
    }
    count
}

/// The balloon device.
pub struct Balloon {
    avail_features: u64,
    queue_sizes: Vec<u16>,
    num_pages: u32,
    actual_pages: u32,
    config_generation: u32,
    stats_interval_s: u16,
    /// Present iff statistics are enabled.
    stats_timer: Option<TimerFd>,
    /// Head of the statistics buffer the device holds until the next poll.
    stats_head: Option<u16>,
    stats: BalloonStatsSnapshot,
    inflater: Inflater,
    active: Option<Active>,
    broken: bool,
    metrics: Arc<BalloonMetrics>,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("num_pages", &self.num_pages)
            .field("actual_pages", &self.actual_pages)
            .field("deflate_on_oom", &self.deflate_on_oom())
            .field("stats_polling_interval_s", &self.stats_interval_s)
            .field("activated", &self.active.is_some())
            .field("broken", &self.broken)
            .finish()
    }
}

impl Balloon {
    /// Creates the device; with statistics enabled, also its (disarmed) polling timer.
    pub fn new(cfg: BalloonConfig) -> Result<Balloon, BalloonError> {
        let num_pages = mib_to_pages(cfg.amount_mib)?;
        let mut avail_features = VIRTIO_F_VERSION_1;
        if cfg.deflate_on_oom {
            avail_features |= VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        let mut queue_sizes = vec![QUEUE_SIZE, QUEUE_SIZE];
        let mut stats_timer = None;
        if cfg.stats_polling_interval_s > 0 {
            avail_features |= VIRTIO_BALLOON_F_STATS_VQ;
            queue_sizes.push(QUEUE_SIZE);
            stats_timer = Some(nonblocking_timer().map_err(BalloonError::Timer)?);
        }
        Ok(Balloon {
            avail_features,
            queue_sizes,
            num_pages,
            actual_pages: 0,
            config_generation: 0,
            stats_interval_s: cfg.stats_polling_interval_s,
            stats_timer,
            stats_head: None,
            stats: BalloonStatsSnapshot::default(),
            inflater: Inflater::default(),
            active: None,
            broken: false,
            metrics: Arc::new(BalloonMetrics::default()),
        })
    }

    /// The device's counters, for the VMM's metrics.
    pub fn metrics_handle(&self) -> Arc<BalloonMetrics> {
        Arc::clone(&self.metrics)
    }

    /// The configuration as it stands now (for `GET /balloon`).
    pub fn config(&self) -> BalloonConfig {
        BalloonConfig {
            amount_mib: self.target_mib(),
            deflate_on_oom: self.deflate_on_oom(),
            stats_polling_interval_s: self.stats_interval_s,
        }
    }

    pub fn deflate_on_oom(&self) -> bool {
        self.avail_features & VIRTIO_BALLOON_F_DEFLATE_ON_OOM != 0
    }

    /// Whether statistics were enabled at creation (a non-zero polling interval).
    pub fn stats_enabled(&self) -> bool {
        self.stats_timer.is_some()
    }

    pub fn stats_polling_interval_s(&self) -> u16 {
        self.stats_interval_s
    }

    /// Target size in 4 KiB pages (config space `num_pages`).
    pub fn target_pages(&self) -> u32 {
        self.num_pages
    }

    pub fn target_mib(&self) -> u32 {
        pages_to_mib(self.num_pages)
    }

    /// Pages the guest says it holds (config space `actual`).
    pub fn actual_pages(&self) -> u32 {
        self.actual_pages
    }

    pub fn actual_mib(&self) -> u32 {
        pages_to_mib(self.actual_pages)
    }

    /// Host pages released by inflation (madvise) since the device was created.
    pub fn released_pages(&self) -> u64 {
        self.inflater.released_pages
    }

    /// Sets the target size (Firecracker's `PATCH /balloon`). An active driver is told with a
    /// configuration change interrupt; a driver that is not up yet reads the target when it
    /// starts.
    pub fn update_target(&mut self, amount_mib: u32) -> Result<(), BalloonError> {
        let pages = mib_to_pages(amount_mib)?;
        tracing::info!("balloon: target {amount_mib} MiB ({pages} pages)");
        self.num_pages = pages;
        self.config_generation = self.config_generation.wrapping_add(1);
        if let Some(active) = &self.active {
            active.interrupt.signal_config_change().map_err(BalloonError::Signal)?;
        }
        Ok(())
    }

    /// The latest statistics with the current target and actual sizes (for
    /// `GET /balloon/statistics`; answer it only when [`Self::stats_enabled`]).
    pub fn latest_stats(&self) -> BalloonStatsSnapshot {
        BalloonStatsSnapshot {
            target_pages: self.num_pages,
            actual_pages: self.actual_pages,
            target_mib: self.target_mib(),
            actual_mib: self.actual_mib(),
            ..self.stats
        }
    }

    /// Changes the statistics polling interval (Firecracker's `PATCH /balloon/statistics`).
    /// Statistics cannot be turned on or off: going from or to 0 fails with
    /// [`BalloonError::StatisticsStateChange`] (the same interval is accepted). On an active device
    /// the buffer the device holds goes back to the guest at once, so fresh values arrive now, and
    /// the timer restarts with the new interval.
    pub fn update_stats_interval(&mut self, secs: u16) -> Result<(), BalloonError> {
        if secs == self.stats_interval_s {
            return Ok(());
        }
        if secs == 0 || self.stats_interval_s == 0 {
            return Err(BalloonError::StatisticsStateChange);
        }
        self.stats_interval_s = secs;
        if self.active.as_ref().is_some_and(|a| a.stats) {
            self.return_stats_buffer();
            self.arm_timer().map_err(BalloonError::Timer)?;
        }
        Ok(())
    }

    fn arm_timer(&mut self) -> io::Result<()> {
        let period = Duration::from_secs(u64::from(self.stats_interval_s));
        match self.stats_timer.as_mut() {
            Some(t) if !period.is_zero() => t.reset(period, Some(period)).map_err(errno_to_io),
            _ => Ok(()),
        }
    }

    fn disarm_timer(&mut self) {
        if let Some(t) = self.stats_timer.as_mut() {
            if let Err(e) = t.clear() {
                tracing::warn!("balloon: failed to stop the statistics timer: {e}");
            }
        }
    }

    fn config_space(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut cfg = [0u8; CONFIG_SPACE_SIZE];
        cfg[0..4].copy_from_slice(&self.num_pages.to_le_bytes());
        cfg[4..8].copy_from_slice(&self.actual_pages.to_le_bytes());
        cfg
    }

    fn process_inflate(&mut self) {
        let Some(active) = self.active.as_mut() else { return };
        let Some(queue) = active.queues.get_mut(INFLATE_QUEUE) else { return };
        let inflater = &mut self.inflater;
        let result = drain_queue(queue, &active.mem, &active.interrupt, |mem, chain| {
            inflater.handle_chain(mem, chain)
        });
        match result {
            Ok(n) => self.metrics.inflate_count.add(n as u64),
            Err(e) => {
                tracing::error!("balloon: inflate queue broken: {e}");
                self.metrics.event_fails.inc();
                self.broken = true;
            }
        }
    }

    fn process_deflate(&mut self) {
        let Some(active) = self.active.as_mut() else { return };
        let Some(queue) = active.queues.get_mut(DEFLATE_QUEUE) else { return };
        match drain_queue(queue, &active.mem, &active.interrupt, |_, _| 0) {
            Ok(n) => self.metrics.deflate_count.add(n as u64),
            Err(e) => {
                tracing::error!("balloon: deflate queue broken: {e}");
                self.metrics.event_fails.inc();
                self.broken = true;
            }
        }
    }

    /// The driver posted a statistics buffer: read it and keep it until the next poll.
    fn process_stats(&mut self) {
        let Some(active) = self.active.as_mut() else { return };
        if !active.stats {
            return;
        }
        let Some(queue) = active.queues.get_mut(STATS_QUEUE) else { return };
        let mem = &active.mem;
        let mut returned = false;
        // Bounded: each pop advances next_avail, and popping stops once it reaches the available
        // index, which virtio-queue refuses to trust when it is more than a queue size ahead.
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let n = parse_stats(mem, chain, &mut self.stats);
            self.metrics.stats_updates_count.inc();
            tracing::trace!("balloon: {n} statistics from the guest");
            if head >= queue.size() {
                tracing::debug!("balloon: statistics buffer with invalid head {head}");
                continue;
            }
            if let Some(prev) = self.stats_head.replace(head) {
                // A driver keeps one buffer in flight; give back the older one if it sent two.
                tracing::debug!("balloon: driver posted a second statistics buffer");
                if let Err(e) = queue.add_used(mem, prev, 0) {
                    tracing::error!("balloon: statistics queue broken: {e}");
                    self.broken = true;
                    return;
                }
                returned = true;
            }
        }
        let ahead = queue.avail_idx(mem, Ordering::Acquire).map(|a| (a - Wrapping(queue.next_avail())).0);
        match ahead {
            Ok(ahead) if ahead <= queue.size() => {}
            Ok(ahead) => {
                tracing::error!(
                    "balloon: statistics queue broken: available index {ahead} entries ahead, \
                     queue size {}",
                    queue.size()
                );
                self.broken = true;
            }
            Err(e) => {
                tracing::error!("balloon: statistics queue broken: {e}");
                self.broken = true;
            }
        }
        if returned {
            notify(queue, mem, &active.interrupt);
        }
    }

    /// Hands the held statistics buffer back to the driver so it refills it.
    fn return_stats_buffer(&mut self) {
        let Some(active) = self.active.as_mut() else { return };
        let Some(queue) = active.queues.get_mut(STATS_QUEUE) else { return };
        let Some(head) = self.stats_head.take() else {
            tracing::debug!("balloon: statistics poll, but the driver has not posted a buffer");
            return;
        };
        if let Err(e) = queue.add_used(&active.mem, head, 0) {
            tracing::error!("balloon: statistics queue broken: {e}");
            self.broken = true;
            return;
        }
        notify(queue, &active.mem, &active.interrupt);
    }
}

/// Raises the used-buffer interrupt if the driver wants one.
fn notify(queue: &mut Queue, mem: &GuestMemory, interrupt: &VirtioInterrupt) {
    match queue.needs_notification(mem) {
        Ok(false) => {}
        Ok(true) | Err(_) => {
            if let Err(e) = interrupt.signal_used_queue() {
                tracing::warn!("balloon: failed to raise the used-buffer interrupt: {e}");
            }
        }
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_space(), offset, data);
    }

    /// Only `actual` (bytes 4..8) is writable; other writes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let range = usize::try_from(offset).ok().and_then(|s| Some(s..s.checked_add(data.len())?));
        match range {
            Some(r) if r.start >= 4 && r.end <= CONFIG_SPACE_SIZE => {
                let mut actual = self.actual_pages.to_le_bytes();
                actual[r.start - 4..r.end - 4].copy_from_slice(data);
                self.actual_pages = u32::from_le_bytes(actual);
                tracing::debug!("balloon: guest holds {} pages", self.actual_pages);
            }
            _ => tracing::debug!("balloon: config write at {offset:#x} ({} bytes) ignored", data.len()),
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: VirtioInterrupt,
        acked_features: u64,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let expected = self.queue_sizes.len();
        if queues.len() != expected {
            self.metrics.activate_fails.inc();
            return Err(ActivateError::QueueCount { expected, got: queues.len() });
        }
        let stats = self.stats_enabled() && acked_features & VIRTIO_BALLOON_F_STATS_VQ != 0;
        self.broken = false;
        self.stats_head = None;
        self.active = Some(Active { mem, interrupt, queues, stats });
        if stats {
            if let Err(e) = self.arm_timer() {
                self.active = None;
                return Err(ActivateError::Other(format!("statistics timer: {e}")));
            }
        }
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        if self.broken {
            return;
        }
        match index {
            INFLATE_QUEUE => self.process_inflate(),
            DEFLATE_QUEUE => self.process_deflate(),
            STATS_QUEUE => self.process_stats(),
            _ => tracing::debug!("balloon: notify for queue {index}"),
        }
    }

    fn reset(&mut self) -> bool {
        self.disarm_timer();
        self.active = None;
        self.stats_head = None;
        self.actual_pages = 0;
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

    fn host_fds(&self) -> Vec<(RawFd, u32)> {
        match (&self.active, &self.stats_timer) {
            (Some(a), Some(t)) if a.stats => vec![(t.as_raw_fd(), STATS_TIMER_TOKEN)],
            _ => Vec::new(),
        }
    }

    fn process_host_event(&mut self, token: u32) {
        if token != STATS_TIMER_TOKEN || self.broken {
            return;
        }
        let Some(timer) = self.stats_timer.as_mut() else { return };
        match timer.wait() {
            Ok(_) => self.return_stats_buffer(),
            Err(e) if e.errno() == libc::EAGAIN => {}
            Err(e) => tracing::warn!("balloon: reading the statistics timer failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::{CountingIrq, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
    use std::sync::Arc;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const QSIZE: u16 = 16;
    /// Rings live below 1 MiB; buffers at DATA and above.
    const RING_BASE: [u64; 3] = [0x1000, 0x3000, 0x5000];
    const DATA: u64 = 0x10_0000;
    /// Pages the tests inflate (well above the rings and buffers).
    const PAGES: u64 = 0x20_0000;
    const MEM_SIZE: usize = 0x40_0000;

    /// The driver side of one split queue at `base`: descriptor table, then the available ring,
    /// then the used ring (4-byte aligned).
    struct DriverQueue {
        base: u64,
        next_desc: u16,
        avail_idx: u16,
    }

    impl DriverQueue {
        fn new(base: u64) -> Self {
            Self { base, next_desc: 0, avail_idx: 0 }
        }
        fn avail(&self) -> u64 {
            self.base + 16 * u64::from(QSIZE)
        }
        fn used(&self) -> u64 {
            (self.avail() + 6 + 2 * u64::from(QSIZE) + 3) & !3
        }
        fn queue(&self) -> Queue {
            let mut q = Queue::new(QSIZE).unwrap();
            q.set_size(QSIZE);
            q.try_set_desc_table_address(GuestAddress(self.base)).unwrap();
            q.try_set_avail_ring_address(GuestAddress(self.avail())).unwrap();
            q.try_set_used_ring_address(GuestAddress(self.used())).unwrap();
            q.set_ready(true);
            q
        }
        /// Writes a chain of `(addr, len, flags)` descriptors and publishes it; returns its head.
        fn add_chain(&mut self, mem: &GuestMemory, descs: &[(u64, u32, u16)]) -> u16 {
            let head = self.next_desc;
            for (i, &(addr, len, flags)) in descs.iter().enumerate() {
                let idx = (head + i as u16) % QSIZE;
                let last = i + 1 == descs.len();
                let d = GuestAddress(self.base + 16 * u64::from(idx));
                mem.write_obj(addr.to_le(), d).unwrap();
                mem.write_obj(len.to_le(), d.unchecked_add(8)).unwrap();
                mem.write_obj((if last { flags } else { flags | F_NEXT }).to_le(), d.unchecked_add(12))
                    .unwrap();
                mem.write_obj(((idx + 1) % QSIZE).to_le(), d.unchecked_add(14)).unwrap();
            }
            self.next_desc = (head + descs.len() as u16) % QSIZE;
            let slot = u64::from(self.avail_idx % QSIZE);
            mem.write_obj(head.to_le(), GuestAddress(self.avail() + 4 + 2 * slot)).unwrap();
            self.set_avail_idx(mem, self.avail_idx.wrapping_add(1));
            head
        }
        fn set_avail_idx(&mut self, mem: &GuestMemory, idx: u16) {
            self.avail_idx = idx;
            mem.write_obj(idx.to_le(), GuestAddress(self.avail() + 2)).unwrap();
        }
        fn used_idx(&self, mem: &GuestMemory) -> u16 {
            u16::from_le(mem.read_obj(GuestAddress(self.used() + 2)).unwrap())
        }
        /// Used element `n`: (id, len).
        fn used_elem(&self, mem: &GuestMemory, n: u16) -> (u32, u32) {
            let at = self.used() + 4 + 8 * u64::from(n % QSIZE);
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            (u32::from_le(id), u32::from_le(len))
        }
    }

    struct Harness {
        dev: Balloon,
        mem: GuestMemory,
        qs: Vec<DriverQueue>,
        irq: Arc<CountingIrq>,
        interrupt: VirtioInterrupt,
    }

    fn harness_with(cfg: BalloonConfig, mem: GuestMemory) -> Harness {
        let mut dev = Balloon::new(cfg).unwrap();
        let n = dev.queue_max_sizes().len();
        let qs: Vec<DriverQueue> = RING_BASE[..n].iter().map(|&b| DriverQueue::new(b)).collect();
        let irq = Arc::new(CountingIrq::default());
        let interrupt = VirtioInterrupt::new(irq.clone());
        let features = dev.avail_features();
        dev.activate(mem.clone(), interrupt.clone(), features, qs.iter().map(DriverQueue::queue).collect())
            .unwrap();
        Harness { dev, mem, qs, irq, interrupt }
    }

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn harness(stats_polling_interval_s: u16) -> Harness {
        let cfg = BalloonConfig { amount_mib: 0, deflate_on_oom: false, stats_polling_interval_s };
        harness_with(cfg, memory())
    }

    impl Harness {
        fn fill_page(&self, pfn: u64, byte: u8) {
            self.mem.write_slice(&[byte; 4096], GuestAddress(pfn << 12)).unwrap();
        }
        /// The byte every byte of page `pfn` holds, or None if they differ.
        fn page(&self, pfn: u64) -> Option<u8> {
            let mut v = vec![0u8; 4096];
            self.mem.read_slice(&mut v, GuestAddress(pfn << 12)).unwrap();
            v.iter().all(|&b| b == v[0]).then_some(v[0])
        }
        /// Writes `pfns` as a little-endian u32 array at `addr`.
        fn write_pfns(&self, addr: u64, pfns: &[u32]) {
            let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
            self.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
        }
        /// Sends one inflate request holding `pfns` and checks it completed with length 0.
        fn inflate(&mut self, pfns: &[u32]) {
            self.write_pfns(DATA, pfns);
            let before = self.qs[INFLATE_QUEUE].used_idx(&self.mem);
            self.qs[INFLATE_QUEUE].add_chain(&self.mem, &[(DATA, 4 * pfns.len() as u32, 0)]);
            self.dev.process_queue(INFLATE_QUEUE);
            let q = &self.qs[INFLATE_QUEUE];
            assert_eq!(q.used_idx(&self.mem), before.wrapping_add(1));
            assert_eq!(q.used_elem(&self.mem, before).1, 0);
            assert!(!self.dev.needs_reset());
        }
        /// Posts a statistics buffer of `(tag, val)` entries at `addr`; returns its head.
        fn post_stats(&mut self, addr: u64, entries: &[(u16, u64)]) -> u16 {
            let bytes = stats_bytes(entries);
            self.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
            let head = self.qs[STATS_QUEUE].add_chain(&self.mem, &[(addr, bytes.len() as u32, 0)]);
            self.dev.process_queue(STATS_QUEUE);
            head
        }
    }

    fn stats_bytes(entries: &[(u16, u64)]) -> Vec<u8> {
        entries.iter().flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes())).collect()
    }

    #[test]
    fn features_queues_and_errors() {
        for (oom, interval) in [(false, 0u16), (true, 0), (false, 5), (true, 1)] {
            let cfg =
                BalloonConfig { amount_mib: 1, deflate_on_oom: oom, stats_polling_interval_s: interval };
            let dev = Balloon::new(cfg).unwrap();
            assert_eq!(dev.device_type(), 5);
            let mut want = VIRTIO_F_VERSION_1;
            if oom {
                want |= 1 << 2;
            }
            if interval > 0 {
                want |= 1 << 1;
            }
            assert_eq!(dev.avail_features(), want);
            assert_eq!(dev.queue_max_sizes().len(), if interval > 0 { 3 } else { 2 });
            assert_eq!(dev.stats_enabled(), interval > 0);
            assert_eq!(dev.config(), cfg);
            assert!(dev.host_fds().is_empty(), "nothing to watch before activation");
        }
        let max = u32::MAX / PAGES_PER_MIB;
        let cfg = BalloonConfig { amount_mib: max, ..Default::default() };
        assert_eq!(Balloon::new(cfg).unwrap().target_pages(), max * 256);
        let cfg = BalloonConfig { amount_mib: max + 1, ..Default::default() };
        let err = Balloon::new(cfg).unwrap_err();
        assert!(matches!(err, BalloonError::TooLarge { .. }), "{err}");

        let mut dev =
            Balloon::new(BalloonConfig { stats_polling_interval_s: 1, ..Default::default() }).unwrap();
        let irq = Arc::new(CountingIrq::default());
        let err = dev.activate(memory(), VirtioInterrupt::new(irq), VIRTIO_F_VERSION_1, vec![]);
        assert!(matches!(err, Err(ActivateError::QueueCount { expected: 3, got: 0 })));
        assert!(!dev.is_activated());
    }

    #[test]
    fn inflate_releases_pages_and_keeps_neighbours() {
        let mut h = harness(0);
        let base = PAGES >> 12;
        for (i, pfn) in (base..base + 6).enumerate() {
            h.fill_page(pfn, 0x10 + i as u8);
        }
        // Pages base+1, base+2 (contiguous, one madvise) and base+4; base, base+3 and base+5 stay.
        h.inflate(&[base as u32 + 4, base as u32 + 1, base as u32 + 2, base as u32 + 1]);
        assert_eq!(h.dev.released_pages(), 3);
        for (i, pfn) in (base..base + 6).enumerate() {
            let want = if [1, 2, 4].contains(&i) { 0 } else { 0x10 + i as u8 };
            assert_eq!(h.page(pfn), Some(want), "page {i}");
        }
        assert_eq!(h.irq.count(), 1);
        // A released page is usable again: it faults back in.
        h.fill_page(base + 1, 0x77);
        assert_eq!(h.page(base + 1), Some(0x77));
        // Deflate only completes.
        h.qs[DEFLATE_QUEUE].add_chain(&h.mem, &[(DATA, 8, 0)]);
        h.dev.process_queue(DEFLATE_QUEUE);
        assert_eq!(h.qs[DEFLATE_QUEUE].used_idx(&h.mem), 1);
        assert_eq!(h.qs[DEFLATE_QUEUE].used_elem(&h.mem, 0), (0, 0));
        assert_eq!(h.page(base + 1), Some(0x77));
        assert_eq!(h.irq.count(), 2);
    }

    #[test]
    fn invalid_pfns_and_descriptors_are_skipped() {
        let mut h = harness(0);
        let pfn = (PAGES >> 12) as u32;
        h.fill_page(u64::from(pfn), 0xab);
        let last = (MEM_SIZE as u32 >> 12) - 1;
        h.fill_page(u64::from(last), 0xcd);
        // Out of range PFNs (just past the end, far away, the largest) around a valid one.
        h.inflate(&[MEM_SIZE as u32 >> 12, 0x00ff_ffff, u32::MAX, last]);
        assert_eq!(h.page(u64::from(last)), Some(0));
        assert_eq!(h.dev.released_pages(), 1);
        assert_eq!(h.dev.inflater.invalid_pfns, 3);

        let mut chains = 1u16;
        let mut submit = |h: &mut Harness, descs: &[(u64, u32, u16)]| {
            h.qs[INFLATE_QUEUE].add_chain(&h.mem, descs);
            h.dev.process_queue(INFLATE_QUEUE);
            chains += 1;
            assert_eq!(h.qs[INFLATE_QUEUE].used_idx(&h.mem), chains);
            assert!(!h.dev.needs_reset());
        };
        h.write_pfns(DATA, &[pfn, pfn]);
        // Odd length: not a PFN array.
        submit(&mut h, &[(DATA, 5, 0)]);
        submit(&mut h, &[(DATA, 7, 0)]);
        // Device-writable.
        submit(&mut h, &[(DATA, 4, F_WRITE)]);
        // Outside guest memory, straddling its end, wrapping the address space.
        submit(&mut h, &[(MEM_SIZE as u64, 4, 0)]);
        submit(&mut h, &[(MEM_SIZE as u64 - 4, 8, 0)]);
        submit(&mut h, &[(u64::MAX - 1, 4, 0)]);
        // Huge length: bounded to MAX_PFNS_PER_CHAIN, whose read fails here (beyond memory).
        submit(&mut h, &[(MEM_SIZE as u64 - 8, !3, 0)]);
        // Empty.
        submit(&mut h, &[(DATA, 0, 0)]);
        assert_eq!(h.page(u64::from(pfn)), Some(0xab));
        assert_eq!(h.dev.released_pages(), 1);
        // A bad descriptor does not spoil the good one in the same chain.
        h.write_pfns(DATA + 0x100, &[pfn]);
        submit(&mut h, &[(DATA, 3, 0), (DATA + 0x100, 4, 0)]);
        assert_eq!(h.page(u64::from(pfn)), Some(0));
        assert_eq!(h.dev.released_pages(), 2);
    }

    #[test]
    fn inflate_chain_is_bounded() {
        let mut h = harness(0);
        let base = (PAGES >> 12) as u32;
        // MAX_PFNS_PER_CHAIN copies of an invalid PFN, then a valid one that must be ignored.
        let mut pfns = vec![u32::MAX; MAX_PFNS_PER_CHAIN];
        pfns.push(base);
        h.fill_page(u64::from(base), 0x5a);
        h.inflate(&pfns);
        assert_eq!(h.page(u64::from(base)), Some(0x5a));
        assert_eq!(h.dev.released_pages(), 0);
    }

    #[test]
    fn inflate_across_regions_and_holes() {
        // Two regions with a hole between them, and a third adjacent to the second.
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), 0x20_0000),
            (GuestAddress(0x30_0000), 0x1_0000),
            (GuestAddress(0x31_0000), 0x1_0000),
        ])
        .unwrap();
        let mut h = harness_with(BalloonConfig::default(), mem);
        let (a, b) = (0x30f_u64, 0x310_u64); // last page of region 2, first of region 3
        h.fill_page(a, 1);
        h.fill_page(b, 2);
        h.fill_page(0x1ff, 3);
        h.inflate(&[0x1ff, 0x200, 0x2ff, a as u32, b as u32, 0x320]);
        assert_eq!(h.page(a), Some(0));
        assert_eq!(h.page(b), Some(0));
        assert_eq!(h.page(0x1ff), Some(0));
        assert_eq!(h.dev.released_pages(), 3);
        assert_eq!(h.dev.inflater.invalid_pfns, 3);
    }

    /// Guest memory: private anonymous RAM below 2 MiB (rings and buffers), then 1 MiB at
    /// `PAGES` mapped with `flags` (from `file` when given).
    fn memory_with(flags: i32, file: Option<&std::fs::File>) -> GuestMemory {
        use vm_memory::mmap::MmapRegion;
        use vm_memory::{FileOffset, GuestRegionMmap};
        let low = MmapRegion::<()>::new(PAGES as usize).unwrap();
        let fo = file.map(|f| FileOffset::new(f.try_clone().unwrap(), 0));
        let high = MmapRegion::<()>::build(fo, 0x10_0000, libc::PROT_READ | libc::PROT_WRITE, flags).unwrap();
        GuestMemory::from_regions(vec![
            GuestRegionMmap::new(low, GuestAddress(0)).unwrap(),
            GuestRegionMmap::new(high, GuestAddress(PAGES)).unwrap(),
        ])
        .unwrap()
    }

    fn file_of(byte: u8) -> std::fs::File {
        use std::io::Write;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[byte; 0x10_0000]).unwrap();
        f
    }

    fn file_page(f: &std::fs::File, page: u64) -> Option<u8> {
        use std::os::unix::fs::FileExt;
        let mut v = vec![0u8; 4096];
        f.read_exact_at(&mut v, page << 12).unwrap();
        v.iter().all(|&b| b == v[0]).then_some(v[0])
    }

    #[test]
    fn inflate_private_file_backed_memory_gets_anonymous_zero_pages() {
        // A restored snapshot maps its memory file privately: MADV_DONTNEED would bring the
        // file's contents back.
        let f = file_of(0x11);
        let mem = memory_with(libc::MAP_PRIVATE | libc::MAP_NORESERVE, Some(&f));
        let mut h = harness_with(BalloonConfig::default(), mem);
        let base = PAGES >> 12;
        h.fill_page(base + 1, 0x22);
        h.fill_page(base + 2, 0x22);
        h.inflate(&[base as u32 + 1, base as u32 + 2]);
        assert_eq!(h.dev.released_pages(), 2);
        assert_eq!(h.page(base + 1), Some(0), "zero, not the file's contents");
        assert_eq!(h.page(base + 2), Some(0));
        assert_eq!(h.page(base), Some(0x11));
        assert_eq!(h.page(base + 3), Some(0x11));
        // The file is untouched, and the replaced pages work as memory.
        assert_eq!(file_page(&f, 1), Some(0x11));
        h.fill_page(base + 1, 0x44);
        assert_eq!(h.page(base + 1), Some(0x44));
        assert_eq!(file_page(&f, 1), Some(0x11));
    }

    #[test]
    fn inflate_shared_memory_frees_the_backing() {
        // Shared anonymous (shmem): MADV_DONTNEED would keep the data; MADV_REMOVE frees it.
        let mem = memory_with(libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, None);
        let mut h = harness_with(BalloonConfig::default(), mem);
        let base = PAGES >> 12;
        h.fill_page(base, 0x55);
        h.fill_page(base + 1, 0x66);
        h.inflate(&[base as u32 + 1]);
        assert_eq!((h.page(base), h.page(base + 1)), (Some(0x55), Some(0)));
        assert_eq!(h.dev.released_pages(), 1);

        // A shared file: the page becomes a hole in the file.
        let f = file_of(0x33);
        let mem = memory_with(libc::MAP_SHARED | libc::MAP_NORESERVE, Some(&f));
        let mut h = harness_with(BalloonConfig::default(), mem);
        h.inflate(&[base as u32 + 5]);
        assert_eq!((h.page(base + 4), h.page(base + 5)), (Some(0x33), Some(0)));
        assert_eq!((file_page(&f, 4), file_page(&f, 5)), (Some(0x33), Some(0)));
        assert_eq!(h.dev.released_pages(), 1);
    }

    #[test]
    fn config_space_target_and_actual() {
        let cfg = BalloonConfig { amount_mib: 16, deflate_on_oom: true, stats_polling_interval_s: 0 };
        let mut dev = Balloon::new(cfg).unwrap();
        let mut buf = [0u8; 8];
        dev.read_config(0, &mut buf);
        assert_eq!(buf, [0x00, 0x10, 0, 0, 0, 0, 0, 0]);
        // The guest writes actual.
        dev.write_config(4, &0x1234u32.to_le_bytes());
        assert_eq!(dev.actual_pages(), 0x1234);
        dev.write_config(5, &[0x05]);
        assert_eq!(dev.actual_pages(), 0x0534);
        dev.write_config(4, &(3 * 256u32).to_le_bytes());
        assert_eq!(dev.actual_mib(), 3);
        // num_pages is not writable, nor is anything straddling it or beyond the end.
        dev.write_config(0, &7u32.to_le_bytes());
        dev.write_config(2, &[0xff; 4]);
        dev.write_config(6, &[0xff; 4]);
        dev.write_config(8, &[0xff; 4]);
        dev.write_config(u64::MAX, &[0xff; 4]);
        dev.write_config(u64::MAX - 1, &[0xff; 4]);
        dev.read_config(0, &mut buf);
        assert_eq!(u32::from_le_bytes(buf[0..4].try_into().unwrap()), 16 * 256);
        assert_eq!(u32::from_le_bytes(buf[4..8].try_into().unwrap()), 3 * 256);
        // Partial and out-of-range reads.
        let mut two = [0xeeu8; 2];
        dev.read_config(1, &mut two);
        assert_eq!(two, [0x10, 0]);
        let mut tail = [0xeeu8; 4];
        dev.read_config(6, &mut tail);
        assert_eq!(tail, [0, 0, 0xee, 0xee]);
        let mut beyond = [0xeeu8; 4];
        dev.read_config(8, &mut beyond);
        dev.read_config(u64::MAX, &mut beyond);
        assert_eq!(beyond, [0xee; 4]);
        // Reset forgets what the driver wrote, not the target.
        assert!(dev.reset());
        assert_eq!(dev.actual_pages(), 0);
        assert_eq!(dev.target_mib(), 16);
    }

    #[test]
    fn update_target_raises_config_interrupt() {
        let mut dev = Balloon::new(BalloonConfig::default()).unwrap();
        // Before activation: stored, no interrupt to raise.
        dev.update_target(2).unwrap();
        assert_eq!(dev.target_pages(), 512);
        assert!(dev.update_target(u32::MAX).is_err());
        assert_eq!(dev.target_pages(), 512, "a failed update changes nothing");

        let mut h = harness(0);
        let gen = h.dev.config_generation();
        h.dev.update_target(64).unwrap();
        assert_eq!(h.irq.count(), 1);
        assert_eq!(h.interrupt.status() & VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_CONFIG);
        assert_ne!(h.dev.config_generation(), gen);
        let mut buf = [0u8; 4];
        h.dev.read_config(0, &mut buf);
        assert_eq!(u32::from_le_bytes(buf), 64 * 256);
        assert_eq!((h.dev.target_mib(), h.dev.target_pages()), (64, 16384));
        let s = h.dev.latest_stats();
        assert_eq!((s.target_pages, s.target_mib, s.actual_pages, s.actual_mib), (16384, 64, 0, 0));
        // The guest inflates and reports actual.
        h.dev.write_config(4, &16384u32.to_le_bytes());
        assert_eq!(h.dev.actual_mib(), 64);
        assert_eq!(h.dev.latest_stats().actual_pages, 16384);
    }

    #[test]
    fn stats_buffer_is_parsed_and_held() {
        let mut h = harness(1);
        use stat_tag::*;
        let entries = [
            (SWAP_IN, 1),
            (SWAP_OUT, 2),
            (MAJFLT, 3),
            (MINFLT, 4),
            (MEMFREE, 5 << 20),
            (MEMTOT, 256 << 20),
            (AVAIL, 7),
            (CACHES, 8),
            (HTLB_PGALLOC, 9),
            (HTLB_PGFAIL, 10),
            (OOM_KILL, 11),
            (ALLOC_STALL, 12),
            (ASYNC_SCAN, 13),
            (DIRECT_SCAN, 14),
            (ASYNC_RECLAIM, 15),
            (DIRECT_RECLAIM, u64::MAX),
            (99, 1234), // unknown: ignored
        ];
        assert_eq!(h.dev.latest_stats().free_memory, None);
        h.post_stats(DATA, &entries);
        // Held, not returned.
        assert_eq!(h.qs[STATS_QUEUE].used_idx(&h.mem), 0);
        assert_eq!(h.irq.count(), 0);
        let s = h.dev.latest_stats();
        let want = BalloonStatsSnapshot {
            swap_in: Some(1),
            swap_out: Some(2),
            major_faults: Some(3),
            minor_faults: Some(4),
            free_memory: Some(5 << 20),
            total_memory: Some(256 << 20),
            available_memory: Some(7),
            disk_caches: Some(8),
            hugetlb_allocations: Some(9),
            hugetlb_failures: Some(10),
            oom_kill: Some(11),
            alloc_stall: Some(12),
            async_scan: Some(13),
            direct_scan: Some(14),
            async_reclaim: Some(15),
            direct_reclaim: Some(u64::MAX),
            ..Default::default()
        };
        assert_eq!(s, want);
    }

    #[test]
    fn stats_buffers_are_bounded_and_checked() {
        let mut h = harness(1);
        // A short tail (not a whole entry) is ignored; entries split across descriptors count.
        let bytes = stats_bytes(&[(stat_tag::MEMFREE, 42), (stat_tag::MEMTOT, 43)]);
        h.mem.write_slice(&bytes[..7], GuestAddress(DATA)).unwrap();
        h.mem.write_slice(&bytes[7..], GuestAddress(DATA + 0x100)).unwrap();
        h.qs[STATS_QUEUE].add_chain(&h.mem, &[(DATA, 7, 0), (DATA + 0x100, 13 + 5, 0)]);
        h.dev.process_queue(STATS_QUEUE);
        assert_eq!(h.dev.latest_stats().free_memory, Some(42));
        assert_eq!(h.dev.latest_stats().total_memory, Some(43));
        // More than MAX_STATS entries: only the first MAX_STATS are read.
        let mut many = vec![(stat_tag::SWAP_IN, 1u64); MAX_STATS];
        many.push((stat_tag::SWAP_OUT, 2));
        h.post_stats(DATA + 0x1000, &many);
        assert_eq!(h.dev.latest_stats().swap_in, Some(1));
        assert_eq!(h.dev.latest_stats().swap_out, None);
        // The driver sent a second buffer while the device held one: the older one went back.
        assert_eq!(h.qs[STATS_QUEUE].used_idx(&h.mem), 1);
        assert_eq!(h.qs[STATS_QUEUE].used_elem(&h.mem, 0), (0, 0));
        // Buffers outside memory, huge or device-writable are harmless.
        h.qs[STATS_QUEUE].add_chain(&h.mem, &[(MEM_SIZE as u64 - 5, 10, 0)]);
        h.qs[STATS_QUEUE].add_chain(&h.mem, &[(DATA, u32::MAX, 0)]);
        h.qs[STATS_QUEUE].add_chain(&h.mem, &[(DATA, 10, F_WRITE)]);
        h.dev.process_queue(STATS_QUEUE);
        assert!(!h.dev.needs_reset());
        assert_eq!(h.dev.latest_stats().swap_out, None);
        // A lying available index breaks the queue instead of hanging.
        let idx = h.qs[STATS_QUEUE].avail_idx;
        h.qs[STATS_QUEUE].set_avail_idx(&h.mem, idx.wrapping_add(1000));
        h.dev.process_queue(STATS_QUEUE);
        assert!(h.dev.needs_reset());
        assert!(h.dev.reset());
        assert!(!h.dev.needs_reset());
        assert!(h.dev.host_fds().is_empty());
    }

    #[test]
    fn timer_returns_the_stats_buffer() {
        let mut h = harness(1);
        let fds = h.dev.host_fds();
        assert_eq!(fds.len(), 1);
        assert_eq!(fds[0].1, STATS_TIMER_TOKEN);
        // A poll before the guest posted a buffer does nothing.
        h.dev.process_host_event(STATS_TIMER_TOKEN);
        let head = h.post_stats(DATA, &[(stat_tag::MEMFREE, 1)]);
        // Not expired yet: the read does not block, and nothing is returned.
        h.dev.process_host_event(STATS_TIMER_TOKEN);
        assert_eq!(h.qs[STATS_QUEUE].used_idx(&h.mem), 0);
        std::thread::sleep(Duration::from_millis(1100));
        h.dev.process_host_event(STATS_TIMER_TOKEN);
        assert_eq!(h.qs[STATS_QUEUE].used_idx(&h.mem), 1);
        assert_eq!(h.qs[STATS_QUEUE].used_elem(&h.mem, 0), (u32::from(head), 0));
        assert_eq!(h.irq.count(), 1);
        assert_eq!(h.interrupt.status() & VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_INT_VRING);
        // The guest refills and reposts; the values are updated.
        h.post_stats(DATA, &[(stat_tag::MEMFREE, 2)]);
        assert_eq!(h.dev.latest_stats().free_memory, Some(2));
        // Unknown tokens are ignored; the timer fd stays listed.
        h.dev.process_host_event(77);
        assert_eq!(h.dev.host_fds().len(), 1);
        // Reset stops the timer and drops the held buffer.
        assert!(h.dev.reset());
        assert!(h.dev.host_fds().is_empty());
    }

    #[test]
    fn stats_interval_updates_follow_firecracker() {
        // Disabled at creation: cannot be enabled.
        let mut dev = Balloon::new(BalloonConfig::default()).unwrap();
        assert!(dev.update_stats_interval(0).is_ok());
        assert!(matches!(dev.update_stats_interval(5), Err(BalloonError::StatisticsStateChange)));
        // Enabled: cannot be disabled, but the interval can change.
        let mut h = harness(10);
        assert!(matches!(h.dev.update_stats_interval(0), Err(BalloonError::StatisticsStateChange)));
        assert_eq!(h.dev.stats_polling_interval_s(), 10);
        h.dev.update_stats_interval(10).unwrap();
        let head = h.post_stats(DATA, &[(stat_tag::MEMTOT, 9)]);
        assert_eq!(h.qs[STATS_QUEUE].used_idx(&h.mem), 0);
        // A change hands the held buffer back at once.
        h.dev.update_stats_interval(1).unwrap();
        assert_eq!(h.dev.stats_polling_interval_s(), 1);
        assert_eq!(h.dev.config().stats_polling_interval_s, 1);
        assert_eq!(h.qs[STATS_QUEUE].used_elem(&h.mem, 0), (u32::from(head), 0));
        assert_eq!(h.irq.count(), 1);
        // And the timer runs at the new interval.
        h.post_stats(DATA, &[(stat_tag::MEMTOT, 10)]);
        std::thread::sleep(Duration::from_millis(1100));
        h.dev.process_host_event(STATS_TIMER_TOKEN);
        assert_eq!(h.qs[STATS_QUEUE].used_idx(&h.mem), 2);
    }

    #[test]
    fn guest_without_stats_feature() {
        // Statistics offered, but the driver did not accept them: no timer, stats queue unused.
        let mut dev =
            Balloon::new(BalloonConfig { stats_polling_interval_s: 1, ..Default::default() }).unwrap();
        let mem = memory();
        let qs: Vec<DriverQueue> = RING_BASE.iter().map(|&b| DriverQueue::new(b)).collect();
        let irq = Arc::new(CountingIrq::default());
        dev.activate(
            mem,
            VirtioInterrupt::new(irq),
            VIRTIO_F_VERSION_1,
            qs.iter().map(DriverQueue::queue).collect(),
        )
        .unwrap();
        assert!(dev.host_fds().is_empty());
        dev.process_queue(STATS_QUEUE);
        dev.process_queue(7);
        assert!(!dev.needs_reset());
    }

    #[test]
    fn through_the_mmio_transport() {
        use crate::bus::BusDevice;
        use crate::virtio::mmio::{status::*, MmioTransport};
        let mem = memory();
        let irq = Arc::new(CountingIrq::default());
        let cfg = BalloonConfig { amount_mib: 4, deflate_on_oom: true, stats_polling_interval_s: 1 };
        let mut t = MmioTransport::new(
            mem.clone(),
            Box::new(Balloon::new(cfg).unwrap()),
            VirtioInterrupt::new(irq.clone()),
        );
        let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
        let r = |t: &mut MmioTransport, off: u64| {
            let mut b = [0u8; 4];
            t.read(off, &mut b);
            u32::from_le_bytes(b)
        };
        assert_eq!(r(&mut t, 0x8), device_type::BALLOON);
        assert_eq!(r(&mut t, 0x100), 4 * 256);
        w(&mut t, 0x70, ACKNOWLEDGE);
        w(&mut t, 0x70, ACKNOWLEDGE | DRIVER);
        w(&mut t, 0x14, 0);
        assert_eq!(r(&mut t, 0x10), 0b110);
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, 0b110);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        let qs: Vec<DriverQueue> = RING_BASE.iter().map(|&b| DriverQueue::new(b)).collect();
        for (i, q) in qs.iter().enumerate() {
            w(&mut t, 0x30, i as u32);
            w(&mut t, 0x38, u32::from(QSIZE));
            w(&mut t, 0x80, q.base as u32);
            w(&mut t, 0x90, q.avail() as u32);
            w(&mut t, 0xa0, q.used() as u32);
            w(&mut t, 0x44, 1);
        }
        w(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert!(t.is_activated());
        assert_eq!(t.host_fds().len(), 1);
        // The guest reports actual through config space.
        w(&mut t, 0x104, 512);
        assert_eq!(t.device_as_mut::<Balloon>().unwrap().actual_mib(), 2);
        // A target change shows up in config space with a config interrupt.
        t.device_as_mut::<Balloon>().unwrap().update_target(8).unwrap();
        assert_eq!(r(&mut t, 0x100), 8 * 256);
        assert_eq!(r(&mut t, 0x60) & VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(r(&mut t, 0xfc), 1);
    }
}
