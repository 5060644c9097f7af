//! `VmResources` → a ready-to-run `Vmm`: opens device backends (before touching KVM, so file errors
//! come first and cheaply), creates the VM and its memory, loads the kernel, writes the boot
//! structures, wires devices to the buses, irqfds and ioeventfds, and configures the vCPUs.

use std::io::Write;
use std::sync::{Arc, Mutex};

use kiln_devices::bus::{lock, Bus, BusError, SharedDevice};
use kiln_devices::interrupt::{IrqTrigger, VirtioInterrupt};
use kiln_devices::legacy::boot_timer::{BootTimer, StartTime};
use kiln_devices::legacy::i8042::I8042Device;
use kiln_devices::legacy::serial::SerialDevice;
use kiln_devices::rate_limiter::TokenBucketConfig;
use kiln_devices::virtio::balloon::{Balloon, BalloonConfig, BalloonError};
use kiln_devices::virtio::block::{Block, BlockConfig, BlockError};
use kiln_devices::virtio::mmio::MmioTransport;
use kiln_devices::virtio::net::{Net, NetConfig, NetError};
use kiln_devices::virtio::rng::{Rng, RngError};
use kiln_devices::virtio::vsock::{Vsock, VsockConfig, VsockError};
use kiln_devices::virtio::VirtioDevice;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::boot::{self, BootError};
use crate::arch::cpuid::Topology;
use crate::arch::layout::{self, ram_end, ram_ranges};
use crate::arch::mptable::{self, MptableError};
use crate::arch::regs::EntryMode;
use crate::kvm_host::KvmHost;
use crate::loader::{self, KernelFormat, LoadError};
use crate::metrics::{self, DeviceMetrics};
use crate::resources::VmResources;
use crate::vcpu::{self, VcpuError};
use crate::vmm::{QueueNotifier, Vmm};

/// virtio-mmio QueueNotify register offset.
const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x50;

/// Why a microVM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartMicrovmError {
    #[error("drive '{id}'")]
    Drive {
        id: String,
        #[source]
        source: BlockError,
    },
    #[error("entropy device")]
    Rng(#[source] RngError),
    #[error("network interface '{id}'")]
    Net {
        id: String,
        #[source]
        source: NetError,
    },
    #[error("vsock device")]
    Vsock(#[source] VsockError),
    #[error("balloon device")]
    Balloon(#[source] BalloonError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{requested} vCPUs requested but this KVM allows at most {max} per VM")]
    TooManyVcpus { requested: u8, max: usize },
    #[error(
        "{mib} MiB of guest memory ends beyond the {bits}-bit guest physical address space of this host"
    )]
    MemoryBeyondAddressSpace { mib: u64, bits: u8 },
    #[error("cannot map {mib} MiB of guest memory ({reason}): lower mem_size_mib{hint}")]
    MemoryMap { mib: u64, reason: String, hint: &'static str },
    #[error("KVM {ioctl} failed")]
    Kvm {
        ioctl: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("placing a device on the bus failed")]
    Bus(#[source] BusError),
    #[error("building the MP table failed")]
    Mptable(#[source] MptableError),
    #[error("writing boot information failed")]
    Boot(#[source] BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
}

fn kvm_err(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StartMicrovmError {
    move |source| StartMicrovmError::Kvm { ioctl, source }
}

/// Device backends opened from the host before the VM exists.
pub struct Backends {
    pub drives: Vec<Block>,
    pub nets: Vec<Net>,
    pub vsock: Option<Vsock>,
    pub balloon: Option<Balloon>,
    pub rng: Option<Rng>,
}

/// Opens every drive and device backend and checks the kernel and initrd, so configuration and file
/// errors surface before KVM is touched.
pub fn open_backends(res: &VmResources) -> Result<Backends, StartMicrovmError> {
    loader::detect_format(&res.kernel)?;
    if let Some(initrd) = &res.initrd {
        std::fs::File::open(initrd)
            .map_err(|source| LoadError::InitrdRead { path: initrd.clone(), source })?;
    }
    let mut drives = Vec::with_capacity(res.drives.len());
    for d in &res.drives {
        let cfg =
            BlockConfig { id: d.id.clone(), path: d.path.clone(), read_only: d.read_only, cache: d.cache };
        let err = |source| StartMicrovmError::Drive { id: d.id.clone(), source };
        let mut block = Block::new(cfg).map_err(err)?;
        block.update_rate_limiter(d.rate_limiter).map_err(err)?;
        drives.push(block);
    }
    let mut nets = Vec::with_capacity(res.nets.len());
    for n in &res.nets {
        let cfg = NetConfig { id: n.id.clone(), tap_name: n.tap.clone(), guest_mac: n.guest_mac, mtu: n.mtu };
        let err = |source| StartMicrovmError::Net { id: n.id.clone(), source };
        let mut net = Net::new(cfg).map_err(err)?;
        net.update_rate_limiters(n.rx_rate_limiter, n.tx_rate_limiter).map_err(err)?;
        nets.push(net);
    }
    let vsock = match &res.vsock {
        Some(v) => Some(
            Vsock::new(VsockConfig { guest_cid: v.guest_cid, uds_path: v.uds_path.clone() })
                .map_err(StartMicrovmError::Vsock)?,
        ),
        None => None,
    };
    let balloon = match &res.balloon {
        Some(b) => Some(
            Balloon::new(BalloonConfig {
                amount_mib: b.amount_mib,
                deflate_on_oom: b.deflate_on_oom,
                stats_polling_interval_s: b.stats_polling_interval_s,
            })
            .map_err(StartMicrovmError::Balloon)?,
        ),
        None => None,
    };
    let rng = match res.entropy {
        true => {
            let mut rng = Rng::new().map_err(StartMicrovmError::Rng)?;
            rng.update_rate_limiter(res.entropy_rate_limiter).map_err(StartMicrovmError::Rng)?;
            Some(rng)
        }
        false => None,
    };
    Ok(Backends { drives, nets, vsock, balloon, rng })
}

/// Points the interfaces named in the MMDS configuration at `store` (and gives the store the
/// configured version and format). Without an MMDS configuration nothing changes.
pub fn attach_mmds(
    backends: &mut Backends,
    res: &VmResources,
    store: &kiln_mmds::SharedMmds,
) -> Result<(), StartMicrovmError> {
    let Some(spec) = &res.mmds else { return Ok(()) };
    {
        let mut m = kiln_devices::bus::lock(store);
        m.set_version(spec.version);
        m.set_imds_compat(spec.imds_compat);
    }
    for net in backends.nets.iter_mut().filter(|n| spec.network_interfaces.iter().any(|id| id == n.id())) {
        let stack = kiln_mmds::MmdsStack::new(spec.ipv4_address, store.clone());
        net.attach_mmds(stack)
            .map_err(|source| StartMicrovmError::Net { id: net.id().to_string(), source })?;
        tracing::info!("net {}: MMDS answers at {}", net.id(), spec.ipv4_address);
    }
    Ok(())
}

/// Host-side choices that are not part of the VM's configuration.
pub struct BuildOptions {
    /// Where the guest's serial console output goes.
    pub serial_out: Box<dyn Write + Send>,
    /// Whether the VMM's stdin feeds the guest's serial console.
    pub serial_in: bool,
    /// Output bandwidth of the serial console (bytes); what exceeds it is dropped.
    pub serial_out_limit: Option<TokenBucketConfig>,
    pub start: StartTime,
}

/// Creates guest memory: anonymous, private, not reserved up front (touched lazily), optionally on
/// 2 MiB huge pages.
pub fn create_guest_memory(mem_bytes: u64, huge_pages: bool) -> Result<GuestMemoryMmap, StartMicrovmError> {
    let mib = mem_bytes >> 20;
    let mut flags = libc::MAP_ANONYMOUS | libc::MAP_PRIVATE;
    if huge_pages {
        // Reserved up front (no MAP_NORESERVE): a host without enough free 2 MiB pages fails here,
        // clearly, rather than with SIGBUS or failed guest-memory writes later.
        flags |= libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
    } else {
        flags |= libc::MAP_NORESERVE;
    }
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(mem_bytes) {
        let region = MmapRegionBuilder::new(len as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .build()
            .map_err(|e| StartMicrovmError::MemoryMap {
                mib,
                reason: e.to_string(),
                hint: if huge_pages { " or reserve more 2 MiB huge pages (vm.nr_hugepages)" } else { "" },
            })?;
        let region =
            GuestRegionMmap::new(region, GuestAddress(start)).ok_or(StartMicrovmError::MemoryMap {
                mib,
                reason: "region wraps the address space".into(),
                hint: "",
            })?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| StartMicrovmError::MemoryMap {
        mib,
        reason: e.to_string(),
        hint: "",
    })
}

fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), StartMicrovmError> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping of exactly `memory_size` bytes owned by `mem`, which
        // the Vmm keeps alive for as long as the VM (and so KVM's use of the mapping) exists.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

fn irq_eventfd(vm: &VmFd, irq: u32) -> Result<EventFd, StartMicrovmError> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(StartMicrovmError::EventFd)?;
    vm.register_irqfd(&evt, irq).map_err(kvm_err("KVM_IRQFD"))?;
    Ok(evt)
}

/// A virtio device the API addresses by id.
enum Named {
    Drive(String),
    Net(String),
}

/// Builds the VM described by `res`. The vCPUs are configured but not running: `Vmm::run` starts them.
pub fn build_microvm(
    res: &VmResources,
    backends: Backends,
    host: &KvmHost,
    opts: BuildOptions,
) -> Result<Vmm, StartMicrovmError> {
    if usize::from(res.vcpu_count) > host.max_vcpus {
        return Err(StartMicrovmError::TooManyVcpus { requested: res.vcpu_count, max: host.max_vcpus });
    }
    let mem_bytes = res.mem_size_mib << 20;
    if let Some(bits) = host.phys_addr_bits {
        if ram_end(mem_bytes) > 1u64 << bits {
            return Err(StartMicrovmError::MemoryBeyondAddressSpace { mib: res.mem_size_mib, bits });
        }
    }

    let t0 = std::time::Instant::now();
    let phase = |what: &str| tracing::debug!("build: {what} at +{} us", t0.elapsed().as_micros());
    let vm = host.kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    phase("KVM_CREATE_VM");
    vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    phase("irqchip and PIT");

    let mem = create_guest_memory(mem_bytes, res.huge_pages_2m)?;
    register_memory(&vm, &mem)?;
    phase("guest memory");

    // Legacy devices.
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let serial_irq = irq_eventfd(&vm, layout::IRQ_SERIAL_COM1)?;
    let serial_drained = EventFd::new(EFD_NONBLOCK).map_err(StartMicrovmError::EventFd)?;
    let serial = Arc::new(Mutex::new(SerialDevice::with_input_drained_evt(
        Arc::new(serial_irq) as Arc<dyn IrqTrigger>,
        opts.serial_out,
        serial_drained.try_clone().map_err(StartMicrovmError::EventFd)?,
    )));
    {
        let mut dev = lock(&serial);
        dev.limit_output(opts.serial_out_limit);
        metrics::register(DeviceMetrics::Uart(dev.metrics_handle()));
    }
    pio.insert(serial.clone() as SharedDevice, layout::COM1_PORT, layout::COM_PORT_SIZE)
        .map_err(StartMicrovmError::Bus)?;
    let reset_evt = EventFd::new(EFD_NONBLOCK).map_err(StartMicrovmError::EventFd)?;
    let kbd_irq = irq_eventfd(&vm, layout::IRQ_KEYBOARD)?;
    let i8042 = Arc::new(Mutex::new(I8042Device::new(
        reset_evt.try_clone().map_err(StartMicrovmError::EventFd)?,
        Arc::new(kbd_irq),
    )));
    metrics::register(DeviceMetrics::I8042(lock(&i8042).metrics_handle()));
    pio.insert(i8042.clone() as SharedDevice, layout::I8042_PORT, layout::I8042_PORT_SIZE)
        .map_err(StartMicrovmError::Bus)?;
    let boot_timer = Arc::new(Mutex::new(BootTimer::new(opts.start)));
    mmio.insert(boot_timer as SharedDevice, layout::BOOT_TIMER_START, layout::BOOT_TIMER_SIZE)
        .map_err(StartMicrovmError::Bus)?;

    // virtio-mmio devices, in attach order: drives (root first), network interfaces, vsock,
    // balloon, entropy.
    // Drives and interfaces are remembered by id for the API's PATCH requests.
    let mut virtio: Vec<(Option<Named>, Box<dyn VirtioDevice>)> = Vec::new();
    for b in backends.drives {
        let drive_id = b.id().to_string();
        metrics::register(DeviceMetrics::Block { drive_id: drive_id.clone(), metrics: b.metrics_handle() });
        virtio.push((Some(Named::Drive(drive_id)), Box::new(b)));
    }
    for n in backends.nets {
        let iface_id = n.id().to_string();
        metrics::register(DeviceMetrics::Net { iface_id: iface_id.clone(), metrics: n.metrics_handle() });
        virtio.push((Some(Named::Net(iface_id)), Box::new(n)));
    }
    if let Some(v) = backends.vsock {
        metrics::register(DeviceMetrics::Vsock(v.metrics_handle()));
        virtio.push((None, Box::new(v)));
    }
    let balloon_index = backends.balloon.is_some().then_some(virtio.len());
    if let Some(b) = backends.balloon {
        metrics::register(DeviceMetrics::Balloon(b.metrics_handle()));
        virtio.push((None, Box::new(b)));
    }
    if let Some(rng) = backends.rng {
        metrics::register(DeviceMetrics::Entropy(rng.metrics_handle()));
        virtio.push((None, Box::new(rng)));
    }
    let mut announced = Vec::new();
    let mut notifiers = Vec::new();
    let mut drives = Vec::new();
    let mut nets = Vec::new();
    let mut transports = Vec::new();
    for (i, (named, dev)) in virtio.into_iter().enumerate() {
        let addr = layout::VIRTIO_MMIO_START + i as u64 * layout::VIRTIO_MMIO_SIZE;
        let irq = layout::IRQ_VIRTIO_FIRST + i as u32;
        let irq_evt = irq_eventfd(&vm, irq)?;
        let transport = MmioTransport::new(mem.clone(), dev, VirtioInterrupt::new(Arc::new(irq_evt)));
        let queues = transport.num_queues();
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone() as SharedDevice, addr, layout::VIRTIO_MMIO_SIZE)
            .map_err(StartMicrovmError::Bus)?;
        for q in 0..queues as u32 {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(StartMicrovmError::EventFd)?;
            vm.register_ioevent(&evt, &IoEventAddress::Mmio(addr + VIRTIO_MMIO_QUEUE_NOTIFY), q)
                .map_err(kvm_err("KVM_IOEVENTFD"))?;
            notifiers.push(QueueNotifier { evt, transport: transport.clone(), queue: q });
        }
        match named {
            Some(Named::Drive(id)) => drives.push((id, transport.clone())),
            Some(Named::Net(id)) => nets.push((id, transport.clone())),
            None => {}
        }
        transports.push(transport.clone());
        announced.push((addr, layout::VIRTIO_MMIO_SIZE, irq));
    }

    phase("devices");
    // Kernel, initrd, command line, boot structures.
    let kernel = loader::load_kernel(&mem, &res.kernel)?;
    let initrd = match &res.initrd {
        Some(p) => Some(loader::load_initrd(&mem, mem_bytes, p, &kernel)?),
        None => None,
    };
    let cmdline = res.kernel_cmdline(&announced);
    let cmdline_max = match (kernel.format, kernel.setup_header) {
        (KernelFormat::BzImage, Some(h)) if h.cmdline_size > 0 => h.cmdline_size as usize + 1,
        _ => layout::CMDLINE_MAX_SIZE,
    };
    let cmdline_size = loader::write_cmdline(&mem, &cmdline, cmdline_max)?;
    tracing::debug!("kernel command line: {cmdline}");
    let mp = mptable::build(res.vcpu_count).map_err(StartMicrovmError::Mptable)?;
    mem.write_slice(&mp, GuestAddress(layout::MPTABLE_START))
        .map_err(|e| StartMicrovmError::Boot(BootError::GuestMemory(e)))?;
    match kernel.mode {
        EntryMode::Pvh => boot::write_pvh_start_info(&mem, mem_bytes, initrd),
        EntryMode::Linux64 => {
            boot::write_zero_page(&mem, mem_bytes, kernel.setup_header, cmdline_size, initrd)
        }
    }
    .map_err(StartMicrovmError::Boot)?;
    tracing::info!(
        "booting {:?} kernel via {:?} at {:#x}: {} vCPUs, {} MiB",
        kernel.format,
        kernel.mode,
        kernel.entry,
        res.vcpu_count,
        res.mem_size_mib
    );

    phase("kernel and boot structures");
    let topo = Topology { vcpus: res.vcpu_count, threads_per_core: if res.smt { 2 } else { 1 } };
    let mut vcpus = Vec::with_capacity(res.vcpu_count.into());
    for id in 0..res.vcpu_count {
        let fd = vm.create_vcpu(u64::from(id)).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        vcpu::configure(&fd, id, host, topo, &mem, kernel.mode, kernel.entry)?;
        vcpus.push(fd);
    }

    phase("vCPUs");
    Ok(Vmm::new(
        vm,
        mem,
        vcpus,
        Arc::new(pio),
        Arc::new(mmio),
        crate::vmm::VmmDevices {
            serial,
            serial_drained,
            serial_in: opts.serial_in,
            i8042,
            reset_evt,
            notifiers,
            drives,
            nets,
            balloon: balloon_index.and_then(|i| transports.get(i).cloned()),
            virtio: transports,
        },
        opts.start.wall,
    ))
}
