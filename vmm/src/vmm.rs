//! Building the VM from the crates below, running it, and tearing it down.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{Cap, Kvm, VmFd};
use log::{debug, error, info, warn};
use tvm_arch_x86::{layout, BootParamsConfig, VcpuBootConfig};
use tvm_bus::{
    register_pio_device, IoManager, PciMmioWindow, PciRoot, PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN,
};
use tvm_irq::IrqLine;
use tvm_legacy::{
    Cmos, DebugPort, Pvpanic, CMOS_PORT, CMOS_PORT_LEN, DEBUG_PORT, I8042, I8042_COMMAND_PORT,
    I8042_DATA_PORT,
};
use tvm_memory::GuestMemoryMmap;
use tvm_serial::{
    stdin_source, NonBlockingWriter, OutputThread, SerialDevice, SerialInput, COM1_PORT_BASE,
    DEFAULT_OUTPUT_BUFFER_BYTES, SERIAL_PORT_SIZE,
};
use tvm_virtio::{Threaded, VirtioPciDevice};
use tvm_virtio_blk::{Block, BlockConfig, MAX_QUEUES};
use tvm_virtio_net::{Net, Tap};
use tvm_virtio_rng::Rng;
use tvm_vsock::{Vsock, VsockConfig};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::Killable;

use crate::commands::{Command, CommandReceiver, CommandSender, VmCounters};
use crate::config::VmConfig;
use crate::dump::SymbolMap;
use crate::pause::PauseGate;
use crate::seccomp::{Filters, SeccompLevel, ThreadKind};
use crate::signal_evt;
use crate::terminal::RawTerminal;
use crate::timing::{BootTimes, ConsoleTap, Phase};
use crate::vcpu::{install_kick_handler, kick_signal, ExitReason, ExitSignal, Vcpu, VcpuMonitor};
use crate::virtio::VirtioPciWiring;
use crate::{Error, Result};

/// A virtio-blk device on the PCI bus, its queue served by a worker thread of its own.
type BlockDevice = Arc<Mutex<VirtioPciDevice<Threaded<Block>>>>;
/// A virtio-net device on the PCI bus.
type NetDevice = Arc<Mutex<VirtioPciDevice<Threaded<Net<Tap>>>>>;
/// The entropy device behind its transport.
type RngDevice = Arc<Mutex<VirtioPciDevice<Rng>>>;
/// The socket device behind its transport.
type VsockDevice = Arc<Mutex<VirtioPciDevice<Vsock>>>;

type ConsoleWriter = ConsoleTap<NonBlockingWriter>;
type Serial = SerialDevice<ConsoleWriter>;

/// Limit for the swap of a media change once the disk holds its queues (an `fdatasync` of
/// the old image and a few system calls on the new one).
const MEDIA_SWAP_LIMIT: Duration = Duration::from_secs(10);

/// How long shutdown waits for vCPU threads and for the console to drain.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How long the event loop waits for a disk's worker to finish the requests it is serving
/// (for a pause, a media change, the counters, the flush at exit) before it gives up on a
/// request that is stuck.
const DISK_BUSY_GRACE: Duration = Duration::from_secs(2);
/// How long a state dump waits for each vCPU thread to answer.
const DUMP_GRACE: Duration = Duration::from_secs(1);

/// The last termination signal received (0: none).
pub(crate) fn last_signal() -> i32 {
    LAST_SIGNAL.load(Ordering::Relaxed)
}

/// The raw fd of the EventFd that termination signals write (-1 until installed).
static SIGNAL_EVT_FD: signal_evt::Slot = signal_evt::Slot::new(-1);
/// The last termination signal received.
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn handle_termination(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    LAST_SIGNAL.store(num, Ordering::Relaxed);
    signal_evt::wake(&SIGNAL_EVT_FD);
}

/// Makes SIGTERM, SIGINT, SIGHUP and SIGQUIT write `evt` (and record the signal for
/// [`last_signal`]); the VM's event loop installs its own on [`Vmm::run`].
pub(crate) fn install_termination_handlers(evt: &EventFd) -> Result<()> {
    signal_evt::install(
        evt,
        &SIGNAL_EVT_FD,
        &[libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT],
        handle_termination,
    )
}

const EXIT_EVT: u32 = 1;
const RESET_EVT: u32 = 2;
const ESCAPE_EVT: u32 = 3;
const SIGNAL_EVT: u32 = 4;
const DUMP_EVT: u32 = 5;
const POWEROFF_EVT: u32 = 6;
const PANIC_EVT: u32 = 7;
const COMMAND_EVT: u32 = 8;
const SNAPSHOT_EVT: u32 = 9;

/// The raw fd of the EventFd that SIGUSR1 writes (-1 until installed).
static SNAPSHOT_EVT_FD: signal_evt::Slot = signal_evt::Slot::new(-1);

extern "C" fn handle_snapshot_signal(
    _: libc::c_int,
    _: *mut libc::siginfo_t,
    _: *mut libc::c_void,
) {
    signal_evt::wake(&SNAPSHOT_EVT_FD);
}

/// Numbers the state saves of snapshots (each vCPU answers the number it was asked).
static SAVE_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The event-loop subscriber that turns stop requests into an exit reason.
#[derive(Debug)]
struct Control {
    exit: Arc<ExitSignal>,
    exit_evt: EventFd,
    reset_evt: EventFd,
    escape_evt: EventFd,
    signal_evt: EventFd,
    /// Written by the SIGUSR2 handler.
    dump_evt: EventFd,
    /// The ACPI PM1a block's S5 signal.
    poweroff_evt: EventFd,
    /// The pvpanic device's signal.
    panic_evt: EventFd,
    done: Arc<AtomicBool>,
    /// Set when a state dump was asked for; `Vmm::run` does it between two event batches.
    dump: Arc<AtomicBool>,
    /// Written when a request from another thread waits ([`crate::commands`]).
    command_evt: EventFd,
    /// Set when requests wait; `Vmm::run` carries them out between two event batches.
    commands: Arc<AtomicBool>,
    /// Written by the SIGUSR1 handler (`--snapshot-on-signal`).
    snapshot_evt: EventFd,
    /// Set when a snapshot was asked for; `Vmm::run` takes it between two event batches.
    snapshot: Arc<AtomicBool>,
}

impl MutEventSubscriber for Control {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let data = events.data();
        // A panicking guest goes on to reboot, power off or triple-fault (panic=N,
        // reboot=t), and a vCPU may have recorded that before this loop saw the panic: a
        // pending panic is the reason whichever of them woke the loop.
        if matches!(data, EXIT_EVT | RESET_EVT | POWEROFF_EVT | PANIC_EVT)
            && self.panic_evt.read().is_ok()
        {
            for evt in [&self.exit_evt, &self.reset_evt, &self.poweroff_evt] {
                let _ = evt.read();
            }
            self.exit.request_panic();
            self.done.store(true, Ordering::Release);
            return;
        }
        let (evt, reason) = match data {
            EXIT_EVT => (&self.exit_evt, None),
            RESET_EVT => (&self.reset_evt, Some(ExitReason::GuestReset)),
            POWEROFF_EVT => (&self.poweroff_evt, Some(ExitReason::GuestPowerOff)),
            PANIC_EVT => (&self.panic_evt, Some(ExitReason::GuestPanic)),
            ESCAPE_EVT => (&self.escape_evt, Some(ExitReason::ConsoleEscape)),
            SIGNAL_EVT => (
                &self.signal_evt,
                Some(ExitReason::Signal(LAST_SIGNAL.load(Ordering::Relaxed))),
            ),
            DUMP_EVT => {
                let _ = self.dump_evt.read();
                self.dump.store(true, Ordering::Release);
                return;
            }
            COMMAND_EVT => {
                let _ = self.command_evt.read();
                self.commands.store(true, Ordering::Release);
                return;
            }
            SNAPSHOT_EVT => {
                let _ = self.snapshot_evt.read();
                self.snapshot.store(true, Ordering::Release);
                return;
            }
            other => {
                warn!("unexpected event data {other}");
                return;
            }
        };
        let _ = evt.read();
        if let Some(reason) = reason {
            self.exit.request(reason);
        }
        self.done.store(true, Ordering::Release);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (evt, data) in [
            (&self.exit_evt, EXIT_EVT),
            (&self.reset_evt, RESET_EVT),
            (&self.escape_evt, ESCAPE_EVT),
            (&self.signal_evt, SIGNAL_EVT),
            (&self.dump_evt, DUMP_EVT),
            (&self.poweroff_evt, POWEROFF_EVT),
            (&self.panic_evt, PANIC_EVT),
            (&self.command_evt, COMMAND_EVT),
            (&self.snapshot_evt, SNAPSHOT_EVT),
        ] {
            if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                error!("failed to watch control event {data}: {e}");
            }
        }
    }
}

/// A built VM, ready to run.
pub struct Vmm {
    _kvm: Kvm,
    vm: Arc<VmFd>,
    /// The CMOS (its NVRAM goes into snapshots).
    cmos: Arc<Mutex<Cmos>>,
    /// The machine's shape, for snapshots.
    machine: tvm_snapshot::Machine,
    /// The virtio devices and their backing, in bus order (disks, nets, rng, vsock).
    kinds: Vec<tvm_snapshot::VirtioKind>,
    /// Where SIGUSR1 writes a snapshot (`--snapshot-on-signal`), opened at start.
    signal_snapshot: Option<crate::snapshot::SnapshotFiles>,
    /// Whether [`run`](Self::run) leaves the vCPUs parked (a snapshot loaded without
    /// `resume_vm`).
    start_paused: bool,
    /// The pages written since the last snapshot (`track_dirty_pages`), or why diff
    /// snapshots cannot be taken.
    dirty: std::result::Result<tvm_memory::DirtyTracker, String>,
    /// Snapshots written on SIGUSR1 so far (the first is full, later ones diffs when
    /// dirty pages are tracked).
    signal_snapshots: u64,
    disks: Vec<BlockDevice>,
    nets: Vec<NetDevice>,
    rng: Option<RngDevice>,
    vsock: Option<VsockDevice>,
    mem: GuestMemoryMmap,
    vcpus: Vec<Vcpu>,
    /// Each vCPU's statistics and dump handshake, in vCPU order.
    monitors: Vec<Arc<VcpuMonitor>>,
    exit: Arc<ExitSignal>,
    /// The control subscriber; the event loop gets this same instance.
    control: Arc<Mutex<Control>>,
    serial: Arc<Mutex<Serial>>,
    output: Option<OutputThread>,
    dropped_output: NonBlockingWriter,
    stop: Arc<AtomicBool>,
    /// Where the vCPU threads park while the VM is paused.
    gate: Arc<PauseGate>,
    /// Requests from other threads, and the sending side until someone takes it.
    commands: CommandReceiver,
    command_sender: Option<CommandSender>,
    /// The keyboard controller (for Ctrl-Alt-Del).
    i8042: Arc<Mutex<I8042>>,
    times: Arc<BootTimes>,
    seccomp: Filters,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("vcpus", &self.vcpus)
            .field("exit", &self.exit)
            .finish_non_exhaustive()
    }
}

fn eventfd() -> Result<EventFd> {
    EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)
}

fn check_capabilities(kvm: &Kvm) -> Result<()> {
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::MissingCapability(name));
        }
    }
    Ok(())
}

/// Refuses a topology this host's KVM cannot create: more vCPUs than KVM_CAP_MAX_VCPUS
/// (`max`), or an APIC id (the KVM vCPU id) not below KVM_CAP_MAX_VCPU_ID (`max_id`).
fn check_vcpu_limits(cpus: &tvm_arch_x86::CpuTopology, max: usize, max_id: usize) -> Result<()> {
    let highest_id = cpus.apic_ids().into_iter().max().unwrap_or(0);
    if usize::from(cpus.cpu_count()) > max || usize::from(highest_id) >= max_id {
        return Err(Error::TooManyVcpus {
            asked: cpus.cpu_count(),
            highest_id,
            max,
            max_id,
        });
    }
    Ok(())
}

impl Vmm {
    /// Builds the VM described by `cfg`: KVM, memory, irqchip, kernel, devices, vCPUs.
    pub fn build(cfg: &VmConfig, times: Arc<BootTimes>) -> Result<Vmm> {
        Self::build_with(cfg, times, None)
    }

    /// Builds the VM a snapshot saved, in the state it was saved in: `cfg` comes from
    /// [`crate::snapshot::restore_config`] (the saved machine and devices, interfaces
    /// perhaps on other TAPs). Guest RAM is the memory file, mapped privately; nothing is
    /// loaded. The VM runs from where it was when [`run`](Self::run) starts it (paused
    /// first if the caller pauses it, as the API's `resume_vm: false` does).
    pub fn restore(
        cfg: &VmConfig,
        times: Arc<BootTimes>,
        restore: crate::snapshot::Restore,
    ) -> Result<Vmm> {
        Self::build_with(cfg, times, Some(restore))
    }

    /// Opens (creates) the two files SIGUSR1 writes a snapshot to while the VM runs
    /// (`--snapshot-on-signal`): the VM pauses, the snapshot is written, the VM resumes.
    pub fn snapshot_on_signal(&mut self, files: crate::snapshot::SnapshotFiles) {
        self.signal_snapshot = Some(files);
    }

    /// Makes [`run`](Self::run) start with the VM paused: the vCPUs park before they
    /// first enter the guest, the devices serve nothing, until a resume.
    pub fn start_paused(&mut self) {
        self.start_paused = true;
    }

    fn build_with(
        cfg: &VmConfig,
        times: Arc<BootTimes>,
        restore: Option<crate::snapshot::Restore>,
    ) -> Result<Vmm> {
        let open = |what, path: &std::path::PathBuf| {
            File::open(path).map_err(|source| Error::OpenFile {
                what,
                path: path.clone(),
                source,
            })
        };
        let (mut kernel_file, mut initrd_file) = if restore.is_none() {
            cfg.validate()?;
            (
                Some(open("kernel", &cfg.kernel)?),
                cfg.initrd.as_ref().map(|p| open("initrd", p)).transpose()?,
            )
        } else {
            (None, None)
        };

        // Disks and TAPs first: a missing, unreadable or locked image, or a TAP we may not
        // use, is a clear error before boot.
        let mut blocks = Vec::with_capacity(cfg.disks.len());
        for d in &cfg.disks {
            blocks.push(Block::open(BlockConfig {
                path: d.path.clone(),
                read_only: d.read_only,
                id: d.id.clone(),
                engine: d.engine,
                cache: d.cache,
                // One queue per vCPU unless asked otherwise.
                num_queues: match d.num_queues {
                    0 => u16::from(cfg.cpus.cpu_count()).clamp(1, MAX_QUEUES),
                    n => n,
                },
            })?);
        }
        let mut taps = Vec::with_capacity(cfg.nets.len());
        for n in &cfg.nets {
            taps.push(Net::open(&tvm_virtio_net::NetConfig {
                tap: n.tap.clone(),
                mac: n.mac,
            })?);
        }
        // The vsock listener too: a socket path already taken is refused before boot.
        let vsock = cfg
            .vsock
            .as_ref()
            .map(|v| {
                Vsock::new(VsockConfig {
                    guest_cid: u64::from(v.cid),
                    uds_path: v.uds.clone(),
                })
            })
            .transpose()?;

        let symbols = match &cfg.system_map {
            Some(path) => {
                let map = SymbolMap::load(path)?;
                info!("{} symbols from {path:?}", map.len());
                Some(Arc::new(map))
            }
            None => None,
        };

        // Dirty-page tracking opens its /proc files before any filter is on.
        let dirty = if cfg.track_dirty_pages {
            tvm_memory::DirtyTracker::open().map_err(|e| {
                warn!("{}; diff snapshots will be refused", crate::error_chain(&e));
                crate::error_chain(&e)
            })
        } else {
            Err(
                "dirty pages are not tracked: start the vm with track_dirty_pages \
                 (--track-dirty-pages)"
                    .to_string(),
            )
        };
        let seccomp = Filters::new(cfg.seccomp)?;
        if cfg.seccomp == SeccompLevel::On {
            crate::seccomp::install_sigsys_handler()?;
        }

        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        check_capabilities(&kvm)?;
        check_vcpu_limits(&cfg.cpus, kvm.get_max_vcpus(), kvm.get_max_vcpu_id())?;
        let vm = kvm.create_vm().map_err(Error::CreateVm)?;
        vm.set_tss_address(layout::KVM_TSS_ADDRESS.0 as usize)
            .map_err(Error::SetTssAddress)?;
        vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_START.0)
            .map_err(Error::SetIdentityMapAddress)?;
        tvm_irq::setup_irqchip(&vm)?;

        // Guest RAM: new, or the snapshot's memory file mapped copy-on-write.
        let ram = layout::ram_ranges(cfg.mem_size);
        let mem = match &restore {
            None => tvm_memory::create_guest_memory(&ram)?,
            Some(r) => {
                let saved: Vec<_> = r
                    .snapshot
                    .memory
                    .iter()
                    .map(|m| (vm_memory::GuestAddress(m.guest_addr), m.size))
                    .collect();
                if saved != ram {
                    return Err(Error::InvalidSnapshotConfig(format!(
                        "the saved memory regions {saved:?} are not this vmm's layout for {}                          bytes {ram:?}",
                        cfg.mem_size
                    )));
                }
                tvm_memory::map_memory_file(&r.mem, &r.snapshot.memory)?
            }
        };
        if let Ok(t) = &dirty {
            // Small pages, so that a diff holds the 4 KiB pages written, not their 2 MiB.
            t.use_small_pages(&mem)?;
        }
        // SAFETY: `register_memory_slots` needs `mem`'s regions mapped for as long as the VM
        // can use the slots. `mem` moves into the returned `Vmm` (its clones into the
        // devices), which lives until `run` returns; the guest only touches its memory from
        // a vCPU in KVM_RUN, and `run` joins every vCPU thread before it returns, except a
        // thread that does not stop in time: then `stop_vcpus` keeps a clone of `mem` for
        // the rest of the process.
        unsafe { tvm_memory::register_memory_slots(&vm, &mem)? };

        // Kernel, command line, initrd, zero page (a restored guest has them in memory).
        let kernel = match kernel_file.as_mut() {
            Some(kernel_file) => {
                let kernel = tvm_arch_x86::load_kernel(&mem, kernel_file)?;
                info!(
                    "kernel loaded: entry {:#x}, {:?}, ends at {:#x}",
                    kernel.entry.0, kernel.mode, kernel.kernel_end
                );
                let cmdline =
                    tvm_arch_x86::build_cmdline(&cfg.cmdline, kernel.setup_header.as_ref())?;
                tvm_arch_x86::load_cmdline(&mem, &cmdline)?;
                let initrd = match initrd_file.as_mut() {
                    Some(f) => {
                        let (addr, size) = tvm_arch_x86::load_initrd(&mem, &ram, &kernel, f)?;
                        info!("initrd loaded at {:#x}, {size} bytes", addr.0);
                        Some((addr, size))
                    }
                    None => None,
                };
                let params = tvm_arch_x86::build_boot_params(&BootParamsConfig {
                    ram: &ram,
                    kernel: &kernel,
                    cmdline_len: cfg.cmdline.len(),
                    initrd,
                    acpi_rsdp: Some(layout::RSDP_START),
                })?;
                tvm_arch_x86::write_boot_params(&mem, &params)?;
                Some(kernel)
            }
            None => None,
        };

        // Why the VM stops, recorded by the vCPUs (and by the event loop for the devices'
        // signals).
        let exit_evt = eventfd()?;
        let exit = Arc::new(ExitSignal::new(
            exit_evt.try_clone().map_err(Error::EventFd)?,
        ));

        // Devices on the port bus.
        let mut io = IoManager::new();
        let com1 = IrqLine::new(tvm_arch_x86::layout::COM1_GSI)?;
        com1.register(&vm)?;
        // The serial-out thread installs its filter before it writes anything.
        let install = seccomp.installer(ThreadKind::SerialOut);
        let (writer, output) = NonBlockingWriter::spawn_with_init(
            std::io::stdout(),
            DEFAULT_OUTPUT_BUFFER_BYTES,
            move || install().map_err(|e| crate::error_chain(&e)),
        )?;
        let console = ConsoleTap::new(writer.clone(), times.clone());
        let serial = Arc::new(Mutex::new(match &restore {
            None => SerialDevice::with_interrupt_evt(com1.eventfd()?, console)?,
            Some(r) => {
                SerialDevice::from_state(com1.eventfd()?, console, &r.snapshot.devices.serial)?
            }
        }));
        register_pio_device(&mut io, COM1_PORT_BASE, SERIAL_PORT_SIZE, serial.clone())?;

        let mut i8042 = I8042::new()?;
        if let Some(r) = &restore {
            i8042.restore_state(&r.snapshot.devices.i8042);
        }
        let reset_evt = i8042.reset_evt().try_clone().map_err(Error::EventFd)?;
        // The keyboard's IRQ 1, for the keys the VMM presses (Ctrl-Alt-Del).
        let kbd_gsi = tvm_arch_x86::layout::I8042_KBD_GSI;
        vm.register_irqfd(i8042.kbd_interrupt_evt(), kbd_gsi)
            .map_err(|e| tvm_irq::Error::RegisterIrqfd(kbd_gsi, e))?;
        let i8042 = Arc::new(Mutex::new(i8042));
        register_pio_device(&mut io, I8042_DATA_PORT, 1, i8042.clone())?;
        register_pio_device(&mut io, I8042_COMMAND_PORT, 1, i8042.clone())?;
        let cmos = Arc::new(Mutex::new(match &restore {
            None => Cmos::new(),
            Some(r) => Cmos::from_state(&r.snapshot.devices.cmos),
        }));
        register_pio_device(&mut io, CMOS_PORT, CMOS_PORT_LEN, cmos.clone())?;
        register_pio_device(&mut io, DEBUG_PORT, 1, Arc::new(Mutex::new(DebugPort)))?;
        let pvpanic = Pvpanic::new()?;
        let panic_evt = pvpanic.panic_evt().try_clone().map_err(Error::EventFd)?;
        let pvpanic = Arc::new(Mutex::new(pvpanic));
        register_pio_device(&mut io, tvm_arch_x86::acpi::PVPANIC_PORT, 1, pvpanic)?;
        let pci = Arc::new(Mutex::new(PciRoot::new()));
        register_pio_device(&mut io, PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN, pci.clone())?;

        // virtio devices on the PCI bus, BARs placed the way firmware would, in a window
        // on the MMIO bus so that they can follow the guest.
        let vm = Arc::new(vm);
        let window = Arc::new(PciMmioWindow::new(
            layout::MMIO_GAP_START,
            layout::PCI_MMIO_END - layout::MMIO_GAP_START,
        ));
        tvm_bus::register_pci_window(&mut io, window.clone())?;
        let allocator = tvm_memory::MmioAllocator::new(
            vm_memory::GuestAddress(layout::MMIO_GAP_START),
            layout::PCI_MMIO_END - layout::MMIO_GAP_START,
        )?;
        let mut wiring = VirtioPciWiring::new(vm.clone(), &mem, pci, allocator, window);
        // A restore brings each transport back to its saved state as it is wired.
        let mut saved = restore
            .as_ref()
            .map(|r| r.snapshot.devices.virtio.iter().map(|d| &d.transport));
        let mut next_saved = move || saved.as_mut().and_then(Iterator::next);
        let mut disks = Vec::with_capacity(blocks.len());
        for (i, (block, d)) in blocks.into_iter().zip(&cfg.disks).enumerate() {
            // The worker exists before any filter (it would inherit the creator's) and
            // installs its own first thing.
            let install = seccomp.installer(ThreadKind::Io);
            let block = Threaded::spawn(block, &format!("virtio-blk{i}"), move || {
                install().map_err(|e| crate::error_chain(&e))
            })?;
            disks.push(wiring.add_restored(
                block,
                &format!("virtio-blk {:?}", d.path),
                next_saved(),
            )?);
        }
        let mut nets = Vec::with_capacity(taps.len());
        for (i, net) in taps.into_iter().enumerate() {
            let name = format!("virtio-net {}", net.tap_name());
            // RX and TX on a worker of its own, as for the disks.
            let install = seccomp.installer(ThreadKind::Io);
            let net = Threaded::spawn(net, &format!("virtio-net{i}"), move || {
                install().map_err(|e| crate::error_chain(&e))
            })?;
            nets.push(wiring.add_restored(net, &name, next_saved())?);
        }
        let rng = if cfg.rng {
            Some(wiring.add_restored(Rng::new(), "virtio-rng", next_saved())?)
        } else {
            None
        };
        let vsock = match vsock {
            Some(v) => Some(wiring.add_restored(v, "virtio-vsock", next_saved())?),
            None => None,
        };
        let pci_irqs = wiring.pci_irqs().to_vec();
        wiring.finish()?;
        let apic_ids = cfg.cpus.apic_ids();
        let poweroff_evt =
            crate::acpi::setup_acpi(&mut io, &mem, &apic_ids, &pci_irqs, restore.is_none())?;
        let io = Arc::new(io);

        // vCPUs: KVM's vCPU id is the APIC id. With the in-kernel irqchip KVM creates
        // every vCPU but the boot CPU (id 0) waiting for INIT and SIPI, which the guest
        // sends through its local APIC when it brings the application processors up.
        let stop = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(PauseGate::new());
        let cpu_count = cfg.cpus.cpu_count();
        let msrs = Arc::new(tvm_arch_x86::snapshot::saveable_msrs(&kvm)?);
        let mut vcpus = Vec::with_capacity(usize::from(cpu_count));
        let mut monitors = Vec::with_capacity(usize::from(cpu_count));
        for (index, apic_id) in (0..cpu_count).zip(apic_ids.iter().copied()) {
            let fd = vm
                .create_vcpu(u64::from(apic_id))
                .map_err(|e| Error::CreateVcpu(index, e))?;
            match (&kernel, &restore) {
                (Some(kernel), _) => tvm_arch_x86::configure_vcpu(
                    &kvm,
                    &fd,
                    &mem,
                    &VcpuBootConfig {
                        index,
                        topology: cfg.cpus,
                        entry: kernel.entry,
                        mode: kernel.mode,
                        irqchip: true,
                    },
                )?,
                (None, Some(r)) => {
                    let state = &r.snapshot.vcpus[usize::from(index)];
                    let here = tvm_arch_x86::snapshot::cpuid_here(&kvm, &fd, &cfg.cpus, index)?;
                    tvm_snapshot::check_cpu_features(&state.cpuid, &here)
                        .map_err(|source| Error::SnapshotCpu(index, source))?;
                    tvm_arch_x86::snapshot::restore_vcpu(&fd, state)?;
                }
                // A build without a kernel is a restore; this arm is never taken.
                (None, None) => {
                    return Err(Error::InvalidSnapshotConfig(
                        "neither a kernel nor a snapshot to build from".into(),
                    ))
                }
            }
            vcpus.push(Vcpu {
                fd,
                id: index,
                io: io.clone(),
                mem: mem.clone(),
                exit: exit.clone(),
                stop: stop.clone(),
                times: times.clone(),
                seccomp: seccomp.get(ThreadKind::Vcpu),
                monitor: Arc::new(VcpuMonitor::default()),
                symbols: symbols.clone(),
                gate: gate.clone(),
                msrs: msrs.clone(),
            });
            monitors.extend(vcpus.last().map(|v| v.monitor.clone()));
        }
        if let Some(r) = &restore {
            // The in-kernel PIC, IOAPIC, PIT and clock, once every LAPIC is back.
            tvm_arch_x86::snapshot::restore_vm(&vm, &r.snapshot.vm, r.clock_realtime)?;
            // Queues served once and interrupts raised again (nothing held back at the
            // snapshot is lost), and vsock's connections reset as Firecracker does.
            for d in &disks {
                d.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .kick_after_restore()?;
            }
            for n in &nets {
                n.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .kick_after_restore()?;
            }
            if let Some(rng) = &rng {
                rng.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .kick_after_restore()?;
            }
            if let Some(v) = &vsock {
                let mut v = v.lock().unwrap_or_else(|e| e.into_inner());
                v.kick_after_restore()?;
                v.device_mut().transport_reset();
            }
            info!(
                "vm restored: {} MiB, {} vcpu(s) ({})",
                cfg.mem_size >> 20,
                cpu_count,
                cfg.cpus
            );
        } else {
            info!(
                "vm built: {} MiB, {} vcpu(s) ({}), kernel {:?}",
                cfg.mem_size >> 20,
                cpu_count,
                cfg.cpus,
                cfg.kernel
            );
        }
        let machine = tvm_snapshot::Machine {
            vcpu_count: cpu_count,
            threads_per_core: cfg.cpus.threads_per_core(),
            cores_per_socket: cfg.cpus.cores_per_socket(),
            sockets: cfg.cpus.sockets(),
            mem_size: cfg.mem_size,
        };
        let macs: Vec<[u8; 6]> = nets
            .iter()
            .map(|n| {
                n.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .device()
                    .lock()
                    .mac()
            })
            .collect();
        let disk_queues: Vec<u16> = disks
            .iter()
            .map(|d| {
                let queues = d.lock().unwrap_or_else(|e| e.into_inner()).num_queues();
                u16::try_from(queues).unwrap_or(u16::MAX)
            })
            .collect();
        let kinds = crate::snapshot::virtio_kinds(cfg, &disk_queues, &macs);

        let (command_sender, commands) =
            crate::commands::channel(eventfd()?).map_err(Error::EventFd)?;
        let control = Control {
            exit: exit.clone(),
            exit_evt,
            reset_evt,
            escape_evt: eventfd()?,
            signal_evt: eventfd()?,
            dump_evt: eventfd()?,
            poweroff_evt,
            panic_evt,
            done: Arc::new(AtomicBool::new(false)),
            dump: Arc::new(AtomicBool::new(false)),
            command_evt: commands.wake_evt().try_clone().map_err(Error::EventFd)?,
            commands: Arc::new(AtomicBool::new(false)),
            snapshot_evt: eventfd()?,
            snapshot: Arc::new(AtomicBool::new(false)),
        };
        Ok(Vmm {
            _kvm: kvm,
            vm,
            cmos,
            machine,
            kinds,
            signal_snapshot: None,
            start_paused: false,
            dirty,
            signal_snapshots: 0,
            disks,
            nets,
            rng,
            vsock,
            mem,
            vcpus,
            monitors,
            exit,
            control: Arc::new(Mutex::new(control)),
            serial,
            output: Some(output),
            dropped_output: writer,
            stop,
            gate,
            commands,
            command_sender: Some(command_sender),
            i8042,
            times,
            seccomp,
        })
    }

    /// The handle through which another thread asks the running VM to pause, resume or
    /// press Ctrl-Alt-Del; there is one, and the first call takes it.
    pub fn take_command_sender(&mut self) -> Option<CommandSender> {
        self.command_sender.take()
    }

    /// The guest memory (for tests and diagnostics).
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Runs the VM until it stops; returns why.
    pub fn run(mut self) -> Result<ExitReason> {
        let (escape_evt, done, dump, commands, snapshot) = {
            let control = self.control.lock().unwrap_or_else(|e| e.into_inner());
            install_termination_handlers(&control.signal_evt)?;
            crate::dump::install_dump_handler(&control.dump_evt)?;
            if self.signal_snapshot.is_some() {
                signal_evt::install(
                    &control.snapshot_evt,
                    &SNAPSHOT_EVT_FD,
                    &[libc::SIGUSR1],
                    handle_snapshot_signal,
                )?;
            }
            let escape = control.escape_evt.try_clone().map_err(Error::EventFd)?;
            (
                escape,
                control.done.clone(),
                control.dump.clone(),
                control.commands.clone(),
                control.snapshot.clone(),
            )
        };
        install_kick_handler().map_err(Error::Signals)?;

        let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().map_err(Error::EventManager)?;
        let input = SerialInput::new(self.serial.clone(), stdin_source()?, escape_evt)?;
        em.add_subscriber(Arc::new(Mutex::new(input)));
        em.add_subscriber(self.control.clone());
        let mut devices = DeviceSubscribers::default();
        for disk in &self.disks {
            devices.add(&mut em, disk.clone());
        }
        for net in &self.nets {
            devices.add(&mut em, net.clone());
        }
        if let Some(rng) = &self.rng {
            devices.add(&mut em, rng.clone());
        }
        if let Some(vsock) = &self.vsock {
            devices.add(&mut em, vsock.clone());
        }

        // The terminal goes raw only now, after every fallible set-up step.
        let raw = RawTerminal::enter().map_err(Error::Terminal)?;

        if self.start_paused {
            // Closed before any vCPU thread exists: each parks before its first KVM_RUN.
            self.gate.close();
        }
        // A diff snapshot holds what was written since this point (or the last snapshot).
        if let Ok(t) = &self.dirty {
            if let Err(e) = t.reset() {
                warn!("{}", crate::error_chain(&e));
            }
        }
        let barrier = Arc::new(Barrier::new(self.vcpus.len() + 1));
        let mut threads = Vec::new();
        for vcpu in self.vcpus.drain(..) {
            match vcpu.start(barrier.clone()) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    // Threads already started are waiting on the barrier: stop them first.
                    self.stop.store(true, Ordering::Release);
                    barrier.wait();
                    stop_vcpus(threads, &self.stop, &self.gate, &self.mem);
                    drop(raw);
                    return Err(Error::SpawnVcpu(e));
                }
            }
        }
        // Every other thread exists now (each has installed its own filter), so the main
        // thread's filter is inherited by none of them. The vCPUs wait on the barrier until
        // it is in place.
        let filtered = crate::seccomp::apply(
            ThreadKind::EventLoop,
            self.seccomp.get(ThreadKind::EventLoop).as_deref(),
        );
        if let Err(e) = filtered {
            self.stop.store(true, Ordering::Release);
            barrier.wait();
            stop_vcpus(threads, &self.stop, &self.gate, &self.mem);
            drop(raw);
            return Err(e);
        }
        barrier.wait();
        if self.start_paused {
            let vm = self.running(&threads);
            if let Err(e) = carry_out(Command::Pause, &vm, &mut devices, &mut em) {
                warn!("the devices could not be paused: {e}");
            }
            info!("vm paused until resumed");
        }

        let mut loop_error = None;
        let mut dumps = 0u64;
        while !done.load(Ordering::Acquire) {
            if let Err(e) = em.run() {
                loop_error = Some(e);
                break;
            }
            if dump.swap(false, Ordering::AcqRel) && !done.load(Ordering::Acquire) {
                dumps += 1;
                self.dump_state(dumps, &threads);
            }
            let on_signal = snapshot.swap(false, Ordering::AcqRel);
            if on_signal && !done.load(Ordering::Acquire) {
                let kind = if self.dirty.is_ok() && self.signal_snapshots > 0 {
                    tvm_snapshot::SnapshotType::Diff
                } else {
                    tvm_snapshot::SnapshotType::Full
                };
                if let Some(files) = self.signal_snapshot.as_mut() {
                    files.kind = kind;
                }
                if let Some(files) = &self.signal_snapshot {
                    let vm = self.running(&threads);
                    let was_paused = self.gate.is_closed();
                    let r = carry_out(Command::Pause, &vm, &mut devices, &mut em)
                        .and_then(|()| create_snapshot(&vm, files));
                    if !was_paused {
                        let _ = carry_out(Command::Resume, &vm, &mut devices, &mut em);
                    }
                    if r.is_ok() {
                        self.signal_snapshots += 1;
                    }
                    match r {
                        Ok(w) => warn!(
                            "snapshot on SIGUSR1 written: state {} bytes, memory {} bytes of page data, in {:?}",
                            w.state_bytes, w.mem_bytes, w.took
                        ),
                        Err(e) => error!("snapshot on SIGUSR1 failed: {e}"),
                    }
                }
            }
            if commands.swap(false, Ordering::AcqRel) {
                if done.load(Ordering::Acquire) {
                    self.commands
                        .drain(|_| Err("the vm is shutting down".to_string()));
                } else {
                    let vm = self.running(&threads);
                    self.commands
                        .drain(|c| carry_out(c, &vm, &mut devices, &mut em));
                }
            }
        }
        self.times.mark(Phase::Exit);
        let reason = self.exit.reason();
        info!("shutting down: {reason:?}");
        stop_vcpus(threads, &self.stop, &self.gate, &self.mem);
        let flush_failed = self.flush_disks();
        for net in &self.nets {
            net.lock()
                .unwrap_or_else(|e| e.into_inner())
                .device()
                .lock()
                .log_counters();
        }
        if let Some(vsock) = &self.vsock {
            vsock
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .device()
                .log_counters();
        }
        self.finish_output();
        drop(raw);
        if let Some(e) = loop_error {
            return Err(Error::EventManager(e));
        }
        let mut reason =
            reason.unwrap_or(ExitReason::Error("the vm stopped without a reason".into()));
        let mut flush_failed = flush_failed.into_iter();
        if reason.exit_code() == 0 {
            // What the guest wrote may be lost: not a clean exit, whatever the guest did.
            // The first failure becomes the run's error (the binary prints it).
            if let Some(why) = flush_failed.next() {
                reason = ExitReason::Error(why);
            }
        }
        for why in flush_failed {
            error!("{why}");
        }
        Ok(reason)
    }

    /// What a request to the running VM can reach.
    fn running<'a>(&'a self, threads: &'a [JoinHandle<()>]) -> Running<'a> {
        Running {
            gate: &self.gate,
            threads,
            i8042: &self.i8042,
            disks: &self.disks,
            nets: &self.nets,
            rng: self.rng.as_ref(),
            vsock: self.vsock.as_ref(),
            monitors: &self.monitors,
            dirty: self.dirty.as_ref(),
            vm: &self.vm,
            mem: &self.mem,
            serial: &self.serial,
            cmos: &self.cmos,
            machine: self.machine,
            kinds: &self.kinds,
        }
    }

    /// Logs dump number `seq` (see [`crate::dump`]): asks each vCPU thread for its part
    /// and kicks it out of KVM_RUN, waits up to [`DUMP_GRACE`] for the answers, then logs
    /// the UART and every virtio device. The guest runs on.
    fn dump_state(&self, seq: u64, threads: &[JoinHandle<()>]) {
        warn!(
            "dump {seq}: state of the vm on SIGUSR2 ({} vcpu(s)); the guest keeps running",
            self.monitors.len()
        );
        for m in &self.monitors {
            m.request_dump(seq);
        }
        let deadline = Instant::now() + DUMP_GRACE;
        loop {
            let mut waiting = false;
            for (m, t) in self.monitors.iter().zip(threads) {
                if !m.answered(seq) && !t.is_finished() {
                    waiting = true;
                    // immediate_exit makes a kick stick, but one could still race a vCPU
                    // thread between two checks; kicking again is cheap.
                    if let Err(e) = t.kill(kick_signal()) {
                        debug!("failed to kick a vcpu thread: {e}");
                    }
                }
            }
            if !waiting || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        for (id, m) in self.monitors.iter().enumerate() {
            if !m.answered(seq) {
                warn!(
                    "dump {seq}: vcpu{id}: did not answer within {DUMP_GRACE:?} (blocked outside \
                     KVM_RUN, or stopped); {}",
                    m.stats.summary()
                );
            }
        }
        match self.serial.lock() {
            Ok(serial) => warn!("dump {seq}: serial: {}", serial.debug_state()),
            Err(_) => warn!("dump {seq}: serial: lock poisoned"),
        }
        for disk in &self.disks {
            for line in disk.lock().unwrap_or_else(|e| e.into_inner()).debug_state() {
                warn!("dump {seq}: {line}");
            }
        }
        for net in &self.nets {
            let net = net.lock().unwrap_or_else(|e| e.into_inner());
            for line in net.debug_state() {
                warn!("dump {seq}: {line}");
            }
            let (c, rx_pending) = {
                let dev = net.device().lock();
                (dev.counters(), dev.rx_pending_len())
            };
            warn!(
                "dump {seq}: {}: rx {} packets, {} dropped, {} errors, {} bytes waiting for \
                 buffers; tx {} packets, {} dropped, {} errors",
                net.name(),
                c.rx_packets,
                c.rx_dropped,
                c.rx_errors,
                rx_pending,
                c.tx_packets,
                c.tx_dropped,
                c.tx_errors
            );
        }
        if let Some(rng) = &self.rng {
            let rng = rng.lock().unwrap_or_else(|e| e.into_inner());
            for line in rng.debug_state() {
                warn!("dump {seq}: {line}");
            }
            warn!(
                "dump {seq}: virtio-rng: {} bytes handed to the guest",
                rng.device().bytes_served()
            );
        }
        if let Some(vsock) = &self.vsock {
            let vsock = vsock.lock().unwrap_or_else(|e| e.into_inner());
            for line in vsock.debug_state() {
                warn!("dump {seq}: {line}");
            }
            warn!("dump {seq}: {:?}", vsock.device().counters());
        }
        warn!("dump {seq}: end");
    }

    /// Flushes every disk and logs its counters; returns the failures, for the caller to
    /// report (a run whose flush failed must not end with exit code 0).
    fn flush_disks(&self) -> Vec<String> {
        let mut failed = Vec::new();
        for disk in &self.disks {
            let mut d = disk.lock().unwrap_or_else(|e| e.into_inner());
            let name = d.name().to_string();
            // On the disk's worker: completing the requests in flight needs its engine's
            // system calls.
            let flushed = d.device_mut().with_mut_on_worker(DISK_BUSY_GRACE, |block| {
                let r = block.flush().map_err(|e| crate::error_chain(&e));
                block.log_counters();
                r
            });
            match flushed {
                Some(Ok(())) => {}
                Some(Err(e)) => failed.push(e),
                None => failed.push(format!(
                    "{name}: a request still had not completed after {DISK_BUSY_GRACE:?}; the \
                     disk was not flushed"
                )),
            }
        }
        failed
    }

    fn finish_output(&mut self) {
        if let Some(output) = self.output.take() {
            if !output.shutdown(SHUTDOWN_GRACE) {
                warn!("console output still blocked after {SHUTDOWN_GRACE:?}; dropping the rest");
            }
        }
        let dropped = self.dropped_output.dropped_bytes();
        if dropped > 0 {
            warn!(
                "{dropped} bytes of console output were dropped because stdout was not keeping up"
            );
        }
        let lost = self
            .serial
            .lock()
            .map(|s| s.tx_lost_bytes())
            .unwrap_or_default();
        if lost > 0 {
            warn!("{lost} bytes of console output could not be written");
        }
    }
}

/// How long a pause waits for every vCPU thread to park.
const PAUSE_GRACE: Duration = Duration::from_secs(2);

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The virtio devices' event-loop subscribers, which leave the loop while the VM is
/// paused: no queue is served and no device interrupt raised until it resumes (console
/// input, Ctrl-A x and the stop requests stay live).
#[derive(Default)]
struct DeviceSubscribers {
    /// Each device, and its id in the loop while it is there.
    subs: Vec<(Subscriber, Option<event_manager::SubscriberId>)>,
}

impl DeviceSubscribers {
    fn add(&mut self, em: &mut EventManager<Subscriber>, sub: Subscriber) {
        let id = em.add_subscriber(sub.clone());
        self.subs.push((sub, Some(id)));
    }

    /// Takes every device out of the loop; what they were notified of stays pending in
    /// their (level-triggered) EventFds.
    fn quiesce(&mut self, em: &mut EventManager<Subscriber>) {
        for (_, id) in &mut self.subs {
            if let Some(i) = id.take() {
                if let Err(e) = em.remove_subscriber(i) {
                    warn!("failed to take a device out of the event loop: {e:?}");
                }
            }
        }
    }

    /// Puts every device back; pending notifications are served on the next round.
    fn resume(&mut self, em: &mut EventManager<Subscriber>) {
        for (sub, id) in &mut self.subs {
            if id.is_none() {
                *id = Some(em.add_subscriber(sub.clone()));
            }
        }
    }

    fn in_loop(&self) -> usize {
        self.subs.iter().filter(|(_, id)| id.is_some()).count()
    }
}

/// What a request to the running VM can reach.
struct Running<'a> {
    gate: &'a PauseGate,
    threads: &'a [JoinHandle<()>],
    i8042: &'a Mutex<I8042>,
    disks: &'a [BlockDevice],
    nets: &'a [NetDevice],
    rng: Option<&'a RngDevice>,
    vsock: Option<&'a VsockDevice>,
    monitors: &'a [Arc<VcpuMonitor>],
    /// Dirty-page tracking, or why there is none.
    dirty: std::result::Result<&'a tvm_memory::DirtyTracker, &'a String>,
    vm: &'a VmFd,
    mem: &'a GuestMemoryMmap,
    serial: &'a Mutex<Serial>,
    cmos: &'a Mutex<Cmos>,
    machine: tvm_snapshot::Machine,
    kinds: &'a [tvm_snapshot::VirtioKind],
}

impl Running<'_> {
    /// The VM's counters now.
    fn counters(&self) -> VmCounters {
        VmCounters {
            exits: crate::dump::KINDS
                .iter()
                .map(|k| {
                    (
                        k.name(),
                        self.monitors.iter().map(|m| m.stats.count(*k)).sum(),
                    )
                })
                .collect(),
            disks: self
                .disks
                .iter()
                .map(|d| {
                    let d = d.lock().unwrap_or_else(|e| e.into_inner());
                    let counters = d
                        .device()
                        .lock_within(DISK_BUSY_GRACE)
                        .map(|b| b.counters());
                    // A disk stuck in a request is left out of this line (zeros).
                    counters.unwrap_or_else(|| {
                        warn!("{}: busy, its counters are left out", d.name());
                        Default::default()
                    })
                })
                .collect(),
            nets: self
                .nets
                .iter()
                .map(|n| {
                    n.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .device()
                        .lock()
                        .counters()
                })
                .collect(),
            entropy_bytes: self.rng.map(|r| {
                r.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .device()
                    .bytes_served()
            }),
            vsock: self.vsock.map(|v| {
                v.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .device()
                    .counters()
            }),
        }
    }
}

/// Carries out one request of another thread (see [`crate::commands`]).
fn carry_out(
    command: Command,
    vm: &Running<'_>,
    devices: &mut DeviceSubscribers,
    em: &mut EventManager<Subscriber>,
) -> crate::commands::Answer {
    let gate = vm.gate;
    match command {
        Command::Pause => {
            pause_vcpus(gate, vm.threads)?;
            devices.quiesce(em);
            // The disks' workers finish the batch they serve and take no more.
            for disk in vm.disks {
                let disk = disk.lock().unwrap_or_else(|e| e.into_inner());
                if !disk.device().pause(DISK_BUSY_GRACE) {
                    warn!(
                        "{}: a request is still running after {DISK_BUSY_GRACE:?}; the disk \
                         stops once it completes",
                        disk.name()
                    );
                }
            }
            // The network workers stop moving frames (a snapshot must not see guest
            // memory change under it).
            for net in vm.nets {
                let net = net.lock().unwrap_or_else(|e| e.into_inner());
                if !net.device().pause(DISK_BUSY_GRACE) {
                    warn!("{}: still busy after {DISK_BUSY_GRACE:?}", net.name());
                }
            }
            debug!(
                "paused: {} device(s) left in the event loop",
                devices.in_loop()
            );
            Ok(())
        }
        Command::Resume => {
            devices.resume(em);
            for disk in vm.disks {
                disk.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .device()
                    .resume();
            }
            for net in vm.nets {
                net.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .device()
                    .resume();
            }
            if gate.is_closed() {
                gate.open();
                info!("vm resumed");
            }
            Ok(())
        }
        Command::CreateSnapshot(files) => {
            let started = Instant::now();
            let w = create_snapshot(vm, &files)?;
            crate::snapshot::log_written(&w, files.kind, started);
            Ok(())
        }
        Command::CtrlAltDel => vm
            .i8042
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .trigger_ctrl_alt_del()
            .map_err(|e| crate::error_chain(&e)),
        Command::Metrics(reply) => {
            // The asker waits for this command's answer, so the slot is free.
            reply
                .try_send(vm.counters())
                .map_err(|e| format!("the counters could not be handed over: {e}"))
        }
        Command::ChangeMedia { disk, path, file } => {
            let dev = vm
                .disks
                .get(disk)
                .ok_or_else(|| format!("there is no disk {disk}"))?;
            let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
            let worker = dev.device_mut();
            // First the disk stops taking requests and completes those in flight, on its
            // worker; a disk that cannot within the limit refuses the change, and its hold
            // is released whenever that ends, so a refused change never happens later.
            if worker
                .with_mut_on_worker(DISK_BUSY_GRACE, |b| b.hold())
                .is_none()
            {
                let _ = worker.with_mut_on_worker(Duration::ZERO, |b| b.release());
                return Err(format!(
                    "the drive is busy: a request did not complete within {DISK_BUSY_GRACE:?}"
                ));
            }
            // Nothing in flight: the swap does no I/O but the old image's fdatasync.
            worker
                .with_mut_on_worker(MEDIA_SWAP_LIMIT, move |b| {
                    let r = b.change_media_to(file.0, path);
                    b.release();
                    r.map_err(|e| crate::error_chain(&e))
                })
                .ok_or_else(|| {
                    format!("the media change took longer than {MEDIA_SWAP_LIMIT:?}")
                })??;
            // The new medium is in; a lost interrupt only delays the guest noticing.
            if let Err(e) = dev.config_changed() {
                warn!(
                    "{}: the configuration-change interrupt failed: {}",
                    dev.name(),
                    crate::error_chain(&e)
                );
            }
            Ok(())
        }
    }
}

/// Writes a snapshot of the paused VM (see [`crate::snapshot`]) into `files`.
fn create_snapshot(
    vm: &Running<'_>,
    files: &crate::snapshot::SnapshotFiles,
) -> std::result::Result<crate::snapshot::Written, String> {
    if !vm.gate.is_closed() {
        return Err("the vm is not paused; pause it first".into());
    }
    if files.kind == tvm_snapshot::SnapshotType::Diff {
        if let Err(why) = vm.dirty {
            return Err(format!("a diff snapshot needs dirty page tracking: {why}"));
        }
    }
    let started = Instant::now();
    // Each disk completes what it has in flight and takes nothing new until released.
    let mut held = Vec::new();
    let mut result = Ok(());
    for disk in vm.disks {
        let mut d = disk.lock().unwrap_or_else(|e| e.into_inner());
        let worker = d.device_mut();
        if worker
            .with_mut_on_worker(DISK_BUSY_GRACE, |b| b.hold())
            .is_none()
        {
            result = Err(format!(
                "{}: a request did not complete within {DISK_BUSY_GRACE:?}",
                d.name()
            ));
            // Released below with the others, whenever the hold comes through.
            held.push(disk);
            break;
        }
        held.push(disk);
    }
    let result = result.and_then(|()| write_snapshot(vm, files));
    for disk in held {
        let mut d = disk.lock().unwrap_or_else(|e| e.into_inner());
        let _ = d
            .device_mut()
            .with_mut_on_worker(Duration::ZERO, |b| b.release());
    }
    result.map(|(state_bytes, mem_bytes)| crate::snapshot::Written {
        state_bytes,
        mem_bytes,
        took: started.elapsed(),
    })
}

/// The body of [`create_snapshot`], with the disks held: (state bytes, memory bytes).
fn write_snapshot(
    vm: &Running<'_>,
    files: &crate::snapshot::SnapshotFiles,
) -> std::result::Result<(u64, u64), String> {
    // Every parked vCPU thread saves its own state.
    let seq = SAVE_SEQ.fetch_add(1, Ordering::Relaxed) + 1;
    for m in vm.monitors {
        m.request_save(seq);
    }
    vm.gate.wake_parked();
    let deadline = Instant::now() + crate::snapshot::VCPU_SAVE_GRACE;
    let mut vcpus: Vec<Option<tvm_snapshot::VcpuState>> =
        vm.monitors.iter().map(|_| None).collect();
    while vcpus.iter().any(Option::is_none) {
        for (i, m) in vm.monitors.iter().enumerate() {
            if vcpus[i].is_none() {
                if let Some(state) = m.take_saved(seq) {
                    vcpus[i] = Some(state?);
                }
            }
        }
        if vcpus.iter().any(Option::is_none) {
            if Instant::now() >= deadline {
                let missing: Vec<_> = vcpus
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_none())
                    .map(|(i, _)| format!("vcpu{i}"))
                    .collect();
                return Err(format!(
                    "{} did not save its state within {:?}",
                    missing.join(", "),
                    crate::snapshot::VCPU_SAVE_GRACE
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let vcpus: Vec<_> = vcpus.into_iter().flatten().collect();
    let vm_state = tvm_arch_x86::snapshot::save_vm(vm.vm).map_err(|e| crate::error_chain(&e))?;
    let mut transports = Vec::with_capacity(vm.kinds.len());
    for d in vm.disks {
        transports.push(d.lock().unwrap_or_else(|e| e.into_inner()).save_state());
    }
    for n in vm.nets {
        transports.push(n.lock().unwrap_or_else(|e| e.into_inner()).save_state());
    }
    if let Some(r) = vm.rng {
        transports.push(r.lock().unwrap_or_else(|e| e.into_inner()).save_state());
    }
    if let Some(v) = vm.vsock {
        transports.push(v.lock().unwrap_or_else(|e| e.into_inner()).save_state());
    }
    let dirty = match (files.kind, vm.dirty) {
        (tvm_snapshot::SnapshotType::Diff, Ok(t)) => Some(
            t.dirty_bitmaps(vm.mem)
                .map_err(|e| crate::error_chain(&e))?,
        ),
        _ => None,
    };
    let memory = tvm_memory::save_memory(vm.mem, &files.mem, dirty.as_deref())
        .map_err(|e| crate::error_chain(&e))?;
    let snapshot = tvm_snapshot::Snapshot {
        vmm_version: env!("CARGO_PKG_VERSION").to_string(),
        snapshot_type: files.kind,
        machine: vm.machine,
        memory: memory.regions,
        vcpus,
        vm: vm_state,
        devices: tvm_snapshot::Devices {
            serial: vm
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .save_state(),
            cmos: vm
                .cmos
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .save_state(),
            i8042: vm
                .i8042
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .save_state(),
            virtio: vm
                .kinds
                .iter()
                .cloned()
                .zip(transports)
                .map(|(kind, transport)| tvm_snapshot::VirtioState { kind, transport })
                .collect(),
        },
    };
    let state_bytes = crate::snapshot::write_state(&files.state, &snapshot)?;
    // The next diff holds what is written from here on.
    if let Ok(t) = vm.dirty {
        t.reset().map_err(|e| crate::error_chain(&e))?;
    }
    Ok((state_bytes, memory.bytes_written))
}

/// Closes the pause gate and kicks every vCPU thread out of KVM_RUN until each has
/// parked; gives up (and opens the gate again) after [`PAUSE_GRACE`].
fn pause_vcpus(gate: &PauseGate, threads: &[JoinHandle<()>]) -> crate::commands::Answer {
    if gate.is_closed() {
        return Ok(());
    }
    gate.close();
    let deadline = Instant::now() + PAUSE_GRACE;
    let running = || threads.iter().filter(|t| !t.is_finished()).count();
    loop {
        // A kick that lands before a thread enters KVM_RUN sets immediate_exit, and one
        // that lands on a parked thread is harmless: kick them all, every round.
        for t in threads.iter().filter(|t| !t.is_finished()) {
            if let Err(e) = t.kill(kick_signal()) {
                debug!("failed to kick {}: {e}", thread_name(t));
            }
        }
        let round = (Instant::now() + Duration::from_millis(10)).min(deadline);
        if gate.wait_parked(round, &running) {
            info!("vm paused: {} vcpu(s) parked", gate.parked());
            return Ok(());
        }
        if Instant::now() >= deadline {
            gate.open();
            return Err(format!(
                "{} of {} vcpu(s) did not park within {PAUSE_GRACE:?}",
                running().saturating_sub(gate.parked()),
                running()
            ));
        }
    }
}

/// Asks every vCPU thread to stop, kicks it out of KVM_RUN until it does, and joins it.
///
/// A thread that does not stop may still run the guest, so guest memory must stay mapped
/// (the contract of [`tvm_memory::register_memory_slots`]): a clone of `mem` is then kept
/// until the process exits.
fn stop_vcpus(
    threads: Vec<JoinHandle<()>>,
    stop: &AtomicBool,
    gate: &PauseGate,
    mem: &GuestMemoryMmap,
) {
    stop.store(true, Ordering::Release);
    // Threads parked by a pause see the stop once woken.
    gate.wake_for_stop();
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    // Every round kicks every thread still running: a kick that lands before a thread
    // enters KVM_RUN is lost, and waiting on one thread must not leave the others unkicked
    // until the shared deadline has passed.
    while Instant::now() < deadline && threads.iter().any(|t| !t.is_finished()) {
        for t in threads.iter().filter(|t| !t.is_finished()) {
            if let Err(e) = t.kill(kick_signal()) {
                debug!("failed to kick {}: {e}", thread_name(t));
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut leaked = false;
    for t in threads {
        if t.is_finished() {
            let name = thread_name(&t);
            if t.join().is_err() {
                error!("{name} panicked");
            }
        } else {
            warn!("{} did not stop within {SHUTDOWN_GRACE:?}", thread_name(&t));
            leaked = true;
        }
    }
    if leaked {
        // Leaking the mapping is the only way to keep it valid for a thread we cannot
        // join; the process is about to exit anyway.
        std::mem::forget(mem.clone());
    }
}

fn thread_name(t: &JoinHandle<()>) -> String {
    t.thread().name().unwrap_or("a vcpu thread").to_string()
}

/// Builds and runs the VM; returns why it stopped.
pub fn run_vm(cfg: &VmConfig, times: Arc<BootTimes>) -> Result<ExitReason> {
    let start = Instant::now();
    let vmm = Vmm::build(cfg, times)?;
    debug!("vm built in {:?}", start.elapsed());
    vmm.run()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nonblocking() -> EventFd {
        EventFd::new(EFD_NONBLOCK).unwrap()
    }

    /// A `Control` on a real event loop; the events it watches are written by the test.
    fn control() -> (Arc<Mutex<Control>>, EventManager<Arc<Mutex<Control>>>) {
        let exit_evt = nonblocking();
        let control = Control {
            exit: Arc::new(ExitSignal::new(exit_evt.try_clone().unwrap())),
            exit_evt,
            reset_evt: nonblocking(),
            escape_evt: nonblocking(),
            signal_evt: nonblocking(),
            dump_evt: nonblocking(),
            poweroff_evt: nonblocking(),
            panic_evt: nonblocking(),
            done: Arc::new(AtomicBool::new(false)),
            dump: Arc::new(AtomicBool::new(false)),
            command_evt: nonblocking(),
            commands: Arc::new(AtomicBool::new(false)),
            snapshot_evt: nonblocking(),
            snapshot: Arc::new(AtomicBool::new(false)),
        };
        let control = Arc::new(Mutex::new(control));
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(control.clone());
        (control, em)
    }

    fn run_until_done(control: &Arc<Mutex<Control>>, em: &mut EventManager<Arc<Mutex<Control>>>) {
        for _ in 0..10 {
            em.run_with_timeout(100).unwrap();
            if control.lock().unwrap().done.load(Ordering::Acquire) {
                return;
            }
        }
        panic!("the control subscriber never finished");
    }

    /// A device stand-in: counts the notifications of its EventFd it served.
    struct Counter {
        evt: EventFd,
        served: Arc<std::sync::atomic::AtomicU64>,
    }

    impl MutEventSubscriber for Counter {
        fn process(&mut self, _: Events, _: &mut EventOps) {
            if self.evt.read().is_ok() {
                self.served.fetch_add(1, Ordering::SeqCst);
            }
        }

        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
    }

    #[test]
    fn a_quiesced_device_serves_nothing_until_it_resumes_and_then_what_was_pending() {
        let mut em: EventManager<Subscriber> = EventManager::new().unwrap();
        let evt = nonblocking();
        let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut devices = DeviceSubscribers::default();
        devices.add(
            &mut em,
            Arc::new(Mutex::new(Counter {
                evt: evt.try_clone().unwrap(),
                served: served.clone(),
            })),
        );
        evt.write(1).unwrap();
        em.run_with_timeout(100).unwrap();
        assert_eq!(served.load(Ordering::SeqCst), 1);

        devices.quiesce(&mut em);
        assert_eq!(devices.in_loop(), 0);
        evt.write(1).unwrap();
        for _ in 0..3 {
            em.run_with_timeout(20).unwrap();
        }
        assert_eq!(served.load(Ordering::SeqCst), 1, "served while quiesced");

        devices.resume(&mut em);
        assert_eq!(devices.in_loop(), 1);
        em.run_with_timeout(100).unwrap();
        assert_eq!(
            served.load(Ordering::SeqCst),
            2,
            "the pending notification was lost"
        );
        // Resuming twice adds nothing twice.
        devices.resume(&mut em);
        assert_eq!(devices.in_loop(), 1);
    }

    #[test]
    fn vcpu_limits_of_kvm_are_checked_by_count_and_by_apic_id() {
        use tvm_arch_x86::CpuTopology;
        let flat4 = CpuTopology::flat(4).unwrap();
        check_vcpu_limits(&flat4, 4, 4).unwrap();
        assert!(matches!(
            check_vcpu_limits(&flat4, 3, 1024),
            Err(Error::TooManyVcpus {
                asked: 4,
                max: 3,
                ..
            })
        ));
        // 3 threads x 2 cores: 6 vCPUs, but APIC ids up to 6 (2 bits for the thread).
        let sparse = CpuTopology::new(3, 2, 1).unwrap();
        check_vcpu_limits(&sparse, 6, 7).unwrap();
        let e = check_vcpu_limits(&sparse, 6, 6).unwrap_err();
        assert!(
            matches!(e, Error::TooManyVcpus { highest_id: 6, .. }),
            "{e}"
        );
    }

    #[test]
    fn a_pending_panic_outranks_what_a_vcpu_or_a_device_recorded_first() {
        // A vCPU recorded the triple fault (or a device signalled a reset or power-off)
        // before the loop saw the panic that caused it.
        for first in ["triple fault", "reset", "poweroff"] {
            let (c, mut em) = control();
            {
                let c = c.lock().unwrap();
                match first {
                    "triple fault" => c.exit.request(ExitReason::TripleFault),
                    "reset" => c.reset_evt.write(1).unwrap(),
                    _ => c.poweroff_evt.write(1).unwrap(),
                }
                c.panic_evt.write(1).unwrap();
            }
            run_until_done(&c, &mut em);
            let reason = c.lock().unwrap().exit.reason();
            assert_eq!(reason, Some(ExitReason::GuestPanic), "after a {first}");
        }
        // Without a panic, each is its own reason.
        let (c, mut em) = control();
        c.lock().unwrap().reset_evt.write(1).unwrap();
        run_until_done(&c, &mut em);
        assert_eq!(
            c.lock().unwrap().exit.reason(),
            Some(ExitReason::GuestReset)
        );
    }
}
