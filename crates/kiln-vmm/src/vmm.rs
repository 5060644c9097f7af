//! A built VM and its event loop: starts the vCPU threads, then serves device work on this thread
//! (virtio queue notifications from ioeventfds, serial input from stdin, the i8042 reset line,
//! vCPU outcomes) until the guest stops or fails. Stopping kicks every vCPU out of `KVM_RUN`.

use std::os::unix::io::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_devices::bus::{lock, Bus};
use kiln_devices::legacy::i8042::I8042Device;
use kiln_devices::legacy::serial::SerialDevice;
use kiln_devices::rate_limiter::RateLimiterConfig;
use kiln_devices::virtio::mmio::MmioTransport;
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vcpu::{VcpuControl, VcpuOutcome, VcpuRunner};

const TOKEN_RESET: u64 = 0;
const TOKEN_VCPU: u64 = 1;
const TOKEN_SERIAL_DRAINED: u64 = 2;
const TOKEN_STDIN: u64 = 3;
const TOKEN_QUEUE_BASE: u64 = 16;
/// Host fds of virtio devices: this bit, the device index in bits 32..48, the device's token below.
const TOKEN_HOST_FD: u64 = 1 << 62;
/// How often device host-fd sets are re-read even without device activity (covers activation,
/// which happens on a vCPU thread).
const HOST_FD_RESYNC_MS: i32 = 200;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("event loop: {0}")]
    EventLoop(#[source] std::io::Error),
    #[error("cannot start vCPU thread")]
    SpawnVcpu(#[source] std::io::Error),
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest stopped itself: reboot through the i8042, shutdown, triple fault.
    GuestStopped(String),
    /// A vCPU failed (KVM could not run or emulate the guest).
    Failed(String),
}

/// An ioeventfd KVM signals when the guest writes QueueNotify for `queue` of `transport`.
pub struct QueueNotifier {
    pub evt: EventFd,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub queue: u32,
}

/// The devices the event loop serves.
pub struct VmmDevices {
    pub serial: Arc<Mutex<SerialDevice>>,
    pub serial_drained: EventFd,
    pub serial_in: bool,
    pub i8042: Arc<Mutex<I8042Device>>,
    pub reset_evt: EventFd,
    pub notifiers: Vec<QueueNotifier>,
    /// Block devices by drive id, for swapping their backing files at run time.
    pub drives: Vec<(String, Arc<Mutex<MmioTransport>>)>,
    /// Network devices by interface id, for updating their rate limiters at run time.
    pub nets: Vec<(String, Arc<Mutex<MmioTransport>>)>,
    /// Every virtio device, in attach order (index = device index in host-fd tokens).
    pub virtio: Vec<Arc<Mutex<MmioTransport>>>,
    /// The balloon device, if any.
    pub balloon: Option<Arc<Mutex<MmioTransport>>>,
}

/// The host fds each virtio device has registered in the event loop.
#[derive(Default)]
struct HostFdRegistry {
    registered: Vec<std::collections::HashMap<i32, u32>>,
}

impl HostFdRegistry {
    /// Makes epoll watch exactly the fds device `dev` lists now.
    fn resync(&mut self, epoll: &Epoll, dev: usize, transport: &Mutex<MmioTransport>) {
        if self.registered.len() <= dev {
            self.registered.resize_with(dev + 1, Default::default);
        }
        let wanted: std::collections::HashMap<i32, u32> = lock(transport).host_fds().into_iter().collect();
        let have = &mut self.registered[dev];
        have.retain(|fd, token| {
            if wanted.get(fd) == Some(token) {
                return true;
            }
            // The fd may already be closed (then epoll forgot it by itself).
            let _ = epoll.ctl(ControlOperation::Delete, *fd, EpollEvent::default());
            false
        });
        for (fd, token) in wanted {
            if have.contains_key(&fd) {
                continue;
            }
            let data = TOKEN_HOST_FD | ((dev as u64) << 32) | u64::from(token);
            match epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, data)) {
                Ok(()) => {
                    have.insert(fd, token);
                }
                Err(e) => tracing::warn!("virtio device {dev}: cannot watch fd {fd}: {e}"),
            }
        }
    }
}

/// Control of a running VM from other threads (the API): pause, resume, Ctrl-Alt-Del, drives.
#[derive(Clone)]
pub struct VmHandle {
    control: Arc<VcpuControl>,
    threads: Arc<Mutex<Vec<libc::pthread_t>>>,
    i8042: Arc<Mutex<I8042Device>>,
    drives: Vec<(String, Arc<Mutex<MmioTransport>>)>,
    nets: Vec<(String, Arc<Mutex<MmioTransport>>)>,
    balloon: Option<Arc<Mutex<MmioTransport>>>,
}

/// Runs `f` on the device of type `D` registered under `id`.
fn with_named<D: 'static, R>(
    devices: &[(String, Arc<Mutex<MmioTransport>>)],
    id: &str,
    what: &str,
    f: impl FnOnce(&mut D) -> R,
) -> Result<R, String> {
    let (_, transport) = devices.iter().find(|(d, _)| d == id).ok_or_else(|| format!("no {what} '{id}'"))?;
    let mut t = lock(transport);
    let dev = t.device_as_mut::<D>().ok_or_else(|| format!("'{id}' is not a {what}"))?;
    Ok(f(dev))
}

impl VmHandle {
    /// Runs `f` on the balloon device; `None` when the VM has none.
    pub fn with_balloon<R>(
        &self,
        f: impl FnOnce(&mut kiln_devices::virtio::balloon::Balloon) -> R,
    ) -> Option<R> {
        let transport = self.balloon.as_ref()?;
        let mut t = lock(transport);
        t.device_as_mut::<kiln_devices::virtio::balloon::Balloon>().map(f)
    }

    fn kick(&self) {
        for t in lock(&self.threads).iter() {
            // SAFETY: the pthread_t values belong to this VM's vCPU threads, which are only joined
            // after `stop` clears this list; the signal has a no-op handler (install_kick_handler).
            unsafe { libc::pthread_kill(*t, kick_signal()) };
        }
    }

    /// Stops the vCPUs (the guest's clock keeps running; devices keep their state). False if the
    /// vCPUs did not all stop within a second.
    pub fn pause(&self) -> bool {
        self.control.pause(|| self.kick(), Duration::from_secs(1))
    }

    pub fn resume(&self) {
        self.control.resume();
    }

    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    /// Sends Ctrl-Alt-Del through the i8042: a Linux guest shuts down cleanly.
    pub fn send_ctrl_alt_del(&self) -> Result<(), String> {
        lock(&self.i8042).trigger_ctrl_alt_del().map_err(|e| e.to_string())
    }

    /// Points drive `id` at a new backing file; the guest is told its new size.
    pub fn update_drive(&self, id: &str, path: &std::path::Path) -> Result<(), String> {
        with_named(&self.drives, id, "drive", |block: &mut kiln_devices::virtio::block::Block| {
            let read_only = block.is_read_only();
            block.update_backing(path, read_only).map_err(|e| crate::error_chain(&e))
        })?
    }

    /// Replaces drive `id`'s rate limiter (`None`: no limit).
    pub fn update_drive_rate_limiter(&self, id: &str, cfg: Option<RateLimiterConfig>) -> Result<(), String> {
        with_named(&self.drives, id, "drive", |block: &mut kiln_devices::virtio::block::Block| {
            block.update_rate_limiter(cfg).map_err(|e| crate::error_chain(&e))
        })?
    }

    /// Replaces network interface `id`'s receive and transmit rate limiters (`None`: no limit).
    pub fn update_net_rate_limiters(
        &self,
        id: &str,
        rx: Option<RateLimiterConfig>,
        tx: Option<RateLimiterConfig>,
    ) -> Result<(), String> {
        with_named(&self.nets, id, "network interface", |net: &mut kiln_devices::virtio::net::Net| {
            net.update_rate_limiters(rx, tx).map_err(|e| crate::error_chain(&e))
        })?
    }
}

/// A built microVM.
pub struct Vmm {
    // Field order matters on drop: vCPUs go before the VM, and the VM before guest memory.
    vcpus: Vec<VcpuFd>,
    _vm: VmFd,
    _mem: GuestMemoryMmap,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    devices: VmmDevices,
    process_start: Instant,
    control: Arc<VcpuControl>,
    threads: Arc<Mutex<Vec<libc::pthread_t>>>,
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn noop_signal_handler(_: libc::c_int) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: installs a handler that does nothing (async-signal-safe) for a real-time signal
        // no other part of the process uses; no SA_RESTART, so KVM_RUN returns EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = noop_signal_handler as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

impl Vmm {
    pub(crate) fn new(
        vm: VmFd,
        mem: GuestMemoryMmap,
        vcpus: Vec<VcpuFd>,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        devices: VmmDevices,
        process_start: Instant,
    ) -> Self {
        let control = Arc::new(VcpuControl::new(vcpus.len()));
        Self {
            vcpus,
            _vm: vm,
            _mem: mem,
            pio,
            mmio,
            devices,
            process_start,
            control,
            threads: Arc::default(),
        }
    }

    /// A handle for controlling the VM while `run` serves it.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            control: self.control.clone(),
            threads: self.threads.clone(),
            i8042: self.devices.i8042.clone(),
            drives: self.devices.drives.clone(),
            nets: self.devices.nets.clone(),
            balloon: self.devices.balloon.clone(),
        }
    }

    /// Runs the VM until the guest stops or a vCPU fails. All vCPU threads have ended on return.
    pub fn run(mut self) -> Result<VmExit, VmmError> {
        install_kick_handler();
        let (tx, rx) = mpsc::channel();
        let outcome_evt = EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventLoop)?;
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for (id, fd) in self.vcpus.drain(..).enumerate() {
            let runner = VcpuRunner {
                id: id as u8,
                fd,
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                outcome_tx: tx.clone(),
                outcome_evt: outcome_evt.try_clone().map_err(VmmError::EventLoop)?,
                process_start: self.process_start,
                control: self.control.clone(),
            };
            let t = std::thread::Builder::new()
                .name(format!("kiln_vcpu{id}"))
                .spawn(move || runner.run())
                .map_err(VmmError::SpawnVcpu)?;
            lock(&self.threads).push(t.as_pthread_t());
            threads.push(t);
        }
        drop(tx);
        let result = self.event_loop(&outcome_evt, &rx);
        self.control.stop();
        stop_vcpus(threads);
        lock(&self.threads).clear();
        result
    }

    fn event_loop(
        &mut self,
        outcome_evt: &EventFd,
        rx: &mpsc::Receiver<(u8, VcpuOutcome)>,
    ) -> Result<VmExit, VmmError> {
        let epoll = Epoll::new().map_err(VmmError::EventLoop)?;
        let add = |fd: i32, token: u64| {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token))
                .map_err(VmmError::EventLoop)
        };
        add(self.devices.reset_evt.as_raw_fd(), TOKEN_RESET)?;
        add(outcome_evt.as_raw_fd(), TOKEN_VCPU)?;
        add(self.devices.serial_drained.as_raw_fd(), TOKEN_SERIAL_DRAINED)?;
        for (i, n) in self.devices.notifiers.iter().enumerate() {
            add(n.evt.as_raw_fd(), TOKEN_QUEUE_BASE + i as u64)?;
        }
        // Serial input: read stdin only while the UART's FIFO has room; when it is full, stop
        // watching stdin until the guest drains the FIFO.
        let mut stdin_watched = false;
        if self.devices.serial_in {
            stdin_watched = add(libc::STDIN_FILENO, TOKEN_STDIN).is_ok();
        }
        let mut stdin_open = stdin_watched;

        let mut host_fds = HostFdRegistry::default();
        let devices = self.devices.virtio.clone();
        for (d, t) in devices.iter().enumerate() {
            host_fds.resync(&epoll, d, t);
        }

        let mut events = vec![EpollEvent::default(); 32];
        loop {
            // A periodic wake-up covers a FIFO that drained while stdin was unwatched, and device
            // host-fd sets that changed on a vCPU thread (activation).
            let timeout = if stdin_open && !stdin_watched { 50 } else { HOST_FD_RESYNC_MS };
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(VmmError::EventLoop(e)),
            };
            if n == 0 {
                if stdin_open && !stdin_watched && lock(&self.devices.serial).input_space() > 0 {
                    stdin_watched = add(libc::STDIN_FILENO, TOKEN_STDIN).is_ok();
                }
                for (d, t) in devices.iter().enumerate() {
                    host_fds.resync(&epoll, d, t);
                }
            }
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_RESET => {
                        let _ = self.devices.reset_evt.read();
                        return Ok(VmExit::GuestStopped("guest reset through the i8042 controller".into()));
                    }
                    TOKEN_VCPU => {
                        let _ = outcome_evt.read();
                        if let Ok((id, outcome)) = rx.try_recv() {
                            return Ok(match outcome {
                                VcpuOutcome::GuestStopped(why) => {
                                    VmExit::GuestStopped(format!("vCPU {id}: {why}"))
                                }
                                VcpuOutcome::Failed(why) => VmExit::Failed(format!("vCPU {id}: {why}")),
                            });
                        }
                    }
                    TOKEN_SERIAL_DRAINED => {
                        let _ = self.devices.serial_drained.read();
                        if stdin_open && !stdin_watched {
                            stdin_watched = add(libc::STDIN_FILENO, TOKEN_STDIN).is_ok();
                        }
                    }
                    TOKEN_STDIN => {
                        let state = self.feed_serial_from_stdin();
                        if state != StdinState::Fed {
                            let _ = epoll.ctl(
                                ControlOperation::Delete,
                                libc::STDIN_FILENO,
                                EpollEvent::default(),
                            );
                            stdin_watched = false;
                            stdin_open = state == StdinState::FifoFull;
                        }
                    }
                    t if t & TOKEN_HOST_FD != 0 => {
                        let dev = ((t >> 32) & 0xffff) as usize;
                        if let Some(transport) = devices.get(dev) {
                            lock(transport).host_event(t as u32);
                            host_fds.resync(&epoll, dev, transport);
                        }
                    }
                    t => {
                        let i = (t - TOKEN_QUEUE_BASE) as usize;
                        if let Some(n) = self.devices.notifiers.get(i) {
                            let _ = n.evt.read();
                            lock(&n.transport).notify_queue(n.queue);
                            if let Some(dev) = devices.iter().position(|d| Arc::ptr_eq(d, &n.transport)) {
                                host_fds.resync(&epoll, dev, &n.transport);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Moves what stdin has (up to the FIFO's free space) into the serial device.
    fn feed_serial_from_stdin(&mut self) -> StdinState {
        let mut serial = lock(&self.devices.serial);
        let space = serial.input_space();
        if space == 0 {
            return StdinState::FifoFull;
        }
        let mut buf = [0u8; 64];
        let want = space.min(buf.len());
        // SAFETY: reads at most `want` bytes into a buffer of at least that size that we own.
        let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), want) };
        match n {
            0 => StdinState::Closed,
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock => StdinState::Fed,
                    _ => StdinState::Closed,
                }
            }
            n => {
                serial.enqueue_input(&buf[..n as usize]);
                StdinState::Fed
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StdinState {
    Fed,
    FifoFull,
    Closed,
}

/// Asks every vCPU thread to stop and waits for them, kicking them out of KVM_RUN with a signal.
fn stop_vcpus(threads: Vec<JoinHandle<()>>) {
    let deadline = Instant::now() + Duration::from_secs(2);
    for t in threads {
        while !t.is_finished() && Instant::now() < deadline {
            // SAFETY: the thread is alive (not finished) and joinable, so its pthread_t is valid; the
            // signal has a no-op handler installed by install_kick_handler.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
            std::thread::sleep(Duration::from_millis(1));
        }
        if t.is_finished() {
            let _ = t.join();
        } else {
            tracing::warn!("a vCPU thread did not stop within 2 s; leaving it to process exit");
        }
    }
}
