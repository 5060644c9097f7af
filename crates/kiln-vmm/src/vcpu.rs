//! vCPUs: per-vCPU configuration (CPUID, MSRs, registers, LAPIC) and the thread that runs `KVM_RUN`
//! and dispatches the guest's port and memory-mapped I/O to the device buses.

use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use kiln_devices::bus::Bus;
use kvm_bindings::{CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{cpuid, msr, regs};
use crate::kvm_host::KvmHost;
use crate::metrics::METRICS;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {id}: {ioctl} failed")]
    Ioctl {
        id: u8,
        ioctl: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: KVM accepted {set} of {wanted} boot MSRs")]
    Msrs { id: u8, set: usize, wanted: usize },
    #[error("vCPU {id}: building the MSR list failed")]
    MsrList { id: u8 },
    #[error("vCPU {id}: setting up boot registers failed")]
    Regs {
        id: u8,
        #[source]
        source: regs::RegsError,
    },
}

/// How a vCPU thread ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuOutcome {
    /// The guest stopped itself (reset, triple fault, shutdown, halt): a normal end.
    GuestStopped(String),
    /// The guest or KVM failed: the VM cannot continue.
    Failed(String),
}

/// Sets up one vCPU for boot.
pub fn configure(
    vcpu: &VcpuFd,
    id: u8,
    host: &KvmHost,
    topo: cpuid::Topology,
    mem: &GuestMemoryMmap,
    mode: regs::EntryMode,
    entry: u64,
) -> Result<(), VcpuError> {
    let io = |ioctl| move |source| VcpuError::Ioctl { id, ioctl, source };

    let mut entries = host.supported_cpuid.as_slice().to_vec();
    cpuid::fixup(&mut entries, id, topo, host.cap_features);
    let cpuid = CpuId::from_entries(&entries).map_err(|_| VcpuError::MsrList { id })?;
    vcpu.set_cpuid2(&cpuid).map_err(io("KVM_SET_CPUID2"))?;

    let boot_msrs = msr::boot_msrs(&host.msr_index_list);
    if !boot_msrs.is_empty() {
        let msrs = Msrs::from_entries(&boot_msrs).map_err(|_| VcpuError::MsrList { id })?;
        let set = vcpu.set_msrs(&msrs).map_err(io("KVM_SET_MSRS"))?;
        if set != boot_msrs.len() {
            return Err(VcpuError::Msrs { id, set, wanted: boot_msrs.len() });
        }
    }

    let sregs = vcpu.get_sregs().map_err(io("KVM_GET_SREGS"))?;
    let sregs = regs::setup_sregs(mem, mode, sregs).map_err(|source| VcpuError::Regs { id, source })?;
    vcpu.set_sregs(&sregs).map_err(io("KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs::boot_regs(mode, entry)).map_err(io("KVM_SET_REGS"))?;
    vcpu.set_fpu(&regs::boot_fpu()).map_err(io("KVM_SET_FPU"))?;

    let mut lapic = vcpu.get_lapic().map_err(io("KVM_GET_LAPIC"))?;
    regs::configure_lint(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(io("KVM_SET_LAPIC"))?;
    Ok(())
}

/// Monotonic clock in nanoseconds (CLOCK_MONOTONIC), comparable across processes.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Everything a vCPU thread needs.
pub struct VcpuRunner {
    pub id: u8,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    /// Where the thread reports how it ended.
    pub outcome_tx: Sender<(u8, VcpuOutcome)>,
    /// Written after reporting, to wake the event loop.
    pub outcome_evt: EventFd,
    /// The VMM's start, for the first-KVM_RUN timing line.
    pub process_start: Instant,
    /// Run state shared with the VMM (pause, resume, stop).
    pub control: Arc<VcpuControl>,
}

/// What the VMM asks of its vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    Running,
    Paused,
    Stopping,
}

/// Pause, resume and stop for a VM's vCPUs. The requester sets the state and kicks the vCPU threads
/// out of KVM_RUN; each vCPU checks the state before every KVM_RUN and parks while paused.
#[derive(Debug)]
pub struct VcpuControl {
    state: Mutex<(RunState, usize)>,
    changed: Condvar,
    vcpus: usize,
}

impl VcpuControl {
    pub fn new(vcpus: usize) -> Self {
        Self { state: Mutex::new((RunState::Running, 0)), changed: Condvar::new(), vcpus }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (RunState, usize)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by a vCPU before KVM_RUN: parks while paused; false when the vCPU must stop.
    fn may_run(&self) -> bool {
        let mut g = self.lock();
        if g.0 == RunState::Paused {
            g.1 += 1;
            self.changed.notify_all();
            while g.0 == RunState::Paused {
                g = self.changed.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            g.1 -= 1;
        }
        g.0 != RunState::Stopping
    }

    /// Asks the vCPUs to pause; `kick` forces them out of KVM_RUN. Returns once all are parked (or
    /// after `timeout`, returning false).
    pub fn pause(&self, kick: impl Fn(), timeout: std::time::Duration) -> bool {
        let deadline = Instant::now() + timeout;
        {
            let mut g = self.lock();
            if g.0 == RunState::Stopping {
                return false;
            }
            g.0 = RunState::Paused;
        }
        loop {
            kick();
            let g = self.lock();
            if g.1 >= self.vcpus {
                return true;
            }
            let (g, _) = self
                .changed
                .wait_timeout(g, std::time::Duration::from_millis(5))
                .unwrap_or_else(|e| e.into_inner());
            if g.1 >= self.vcpus {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }

    pub fn resume(&self) {
        let mut g = self.lock();
        if g.0 == RunState::Paused {
            g.0 = RunState::Running;
            self.changed.notify_all();
        }
    }

    pub fn stop(&self) {
        let mut g = self.lock();
        g.0 = RunState::Stopping;
        self.changed.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        self.lock().0 == RunState::Paused
    }
}

impl VcpuRunner {
    /// Runs the vCPU until the guest stops or fails, then reports.
    pub fn run(mut self) {
        if self.id == 0 {
            tracing::info!(
                "vCPU 0 first KVM_RUN at monotonic_ns={} ({} us after VMM start)",
                monotonic_ns(),
                self.process_start.elapsed().as_micros()
            );
        }
        let outcome = loop {
            if !self.control.may_run() {
                break VcpuOutcome::GuestStopped("stopped by the VMM".into());
            }
            if let Some(outcome) = self.run_once() {
                break outcome;
            }
        };
        match &outcome {
            VcpuOutcome::GuestStopped(why) => tracing::info!("vCPU {}: guest stopped: {why}", self.id),
            VcpuOutcome::Failed(why) => {
                METRICS.vcpu.failures.inc();
                tracing::error!("vCPU {}: {why}", self.id);
            }
        }
        // The receiver lives as long as the VMM; if it is gone the process is exiting anyway.
        let _ = self.outcome_tx.send((self.id, outcome));
        let _ = self.outcome_evt.write(1);
    }

    /// The registers that say where a guest was when it died, on one line.
    fn guest_state(&self) -> String {
        let regs = match self.fd.get_regs() {
            Ok(r) => format!(
                "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x}",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx
            ),
            Err(e) => format!("KVM_GET_REGS failed: {e}"),
        };
        let sregs = match self.fd.get_sregs() {
            Ok(s) => format!(
                "cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}/l{}/dpl{} ss={:#x} \
                 idt={:#x}+{:#x} gdt={:#x}+{:#x} tr={:#x}",
                s.cr0,
                s.cr2,
                s.cr3,
                s.cr4,
                s.efer,
                s.cs.selector,
                s.cs.l,
                s.cs.dpl,
                s.ss.selector,
                s.idt.base,
                s.idt.limit,
                s.gdt.base,
                s.gdt.limit,
                s.tr.selector
            ),
            Err(e) => format!("KVM_GET_SREGS failed: {e}"),
        };
        let events = match self.fd.get_vcpu_events() {
            Ok(e) => format!(
                "exception(injected={} nr={} has_error={} error={:#x}) interrupt(injected={} nr={}) nmi(injected={} \
                 pending={})",
                e.exception.injected,
                e.exception.nr,
                e.exception.has_error_code,
                e.exception.error_code,
                e.interrupt.injected,
                e.interrupt.nr,
                e.nmi.injected,
                e.nmi.pending
            ),
            Err(e) => format!("KVM_GET_VCPU_EVENTS failed: {e}"),
        };
        format!("{regs} {sregs} {events}")
    }

    /// One `KVM_RUN`; `Some` when the vCPU must stop.
    fn run_once(&mut self) -> Option<VcpuOutcome> {
        let m = &METRICS.vcpu;
        match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    let t = Instant::now();
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                        tracing::trace!("unhandled PIO read at {port:#x}");
                    }
                    m.exit_io_in.inc();
                    m.exit_io_in_agg.record_since(t);
                    None
                }
                VcpuExit::IoOut(port, data) => {
                    let t = Instant::now();
                    if !self.pio.write(u64::from(port), data) {
                        tracing::trace!("unhandled PIO write at {port:#x}");
                    }
                    m.exit_io_out.inc();
                    m.exit_io_out_agg.record_since(t);
                    None
                }
                VcpuExit::MmioRead(addr, data) => {
                    let t = Instant::now();
                    if !self.mmio.read(addr, data) {
                        data.fill(0xff);
                        tracing::trace!("unhandled MMIO read at {addr:#x}");
                    }
                    m.exit_mmio_read.inc();
                    m.exit_mmio_read_agg.record_since(t);
                    None
                }
                VcpuExit::MmioWrite(addr, data) => {
                    let t = Instant::now();
                    if !self.mmio.write(addr, data) {
                        tracing::trace!("unhandled MMIO write at {addr:#x}");
                    }
                    m.exit_mmio_write.inc();
                    m.exit_mmio_write_agg.record_since(t);
                    None
                }
                VcpuExit::Hlt => Some(VcpuOutcome::GuestStopped("halted".into())),
                VcpuExit::Shutdown => {
                    // A guest that resets through a triple fault leaves no message of its own; its
                    // registers are the only clue to why (a reset requested on purpose goes through
                    // the i8042 and never gets here).
                    tracing::warn!("vCPU {}: KVM_EXIT_SHUTDOWN; guest state: {}", self.id, self.guest_state());
                    Some(VcpuOutcome::GuestStopped("shutdown (reset or triple fault)".into()))
                }
                VcpuExit::SystemEvent(kind, _) => match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                        Some(VcpuOutcome::GuestStopped("system event: shutdown".into()))
                    }
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => Some(VcpuOutcome::GuestStopped("system event: reset".into())),
                    other => Some(VcpuOutcome::Failed(format!("guest crashed (KVM system event {other})"))),
                },
                VcpuExit::FailEntry(reason, cpu) => Some(VcpuOutcome::Failed(format!(
                    "KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x}, cpu {cpu})"
                ))),
                VcpuExit::InternalError => {
                    // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member is the active one.
                    let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    Some(VcpuOutcome::Failed(format!(
                        "KVM_EXIT_INTERNAL_ERROR (suberror {suberror}): KVM could not emulate a guest instruction"
                    )))
                }
                VcpuExit::Intr => None,
                other => Some(VcpuOutcome::Failed(format!("unexpected KVM exit {other:?}"))),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(VcpuOutcome::Failed(format!("KVM_RUN failed: {e}"))),
        }
    }
}
