//! Glue between the virtio-pci transport (sans KVM) and KVM: MSI-X vectors as irqfds on
//! MSI routes, INTx as an irqfd on a legacy GSI, queue notifications as ioeventfds, the BAR
//! on the MMIO bus.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use log::{debug, info, warn};
use tvm_bus::{BarAccess, PciDevice, PciMmioWindow};
use tvm_irq::GsiRouting;
use tvm_virtio::{warn_once, InterruptSink, MsixEntry, VirtioDevice, VirtioPciDevice, WarnOnce};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{Error, Result};

/// Interrupts of one virtio-pci device, delivered by KVM.
///
/// A guest write to the MSI-X table updates the vector's route. Should the table or KVM
/// refuse it, that is logged at `warn!` once per kind and device, then at `debug!`: the
/// guest can rewrite the table as often as it likes.
pub struct KvmInterruptSink {
    /// The device, for log lines.
    name: String,
    vm: Arc<VmFd>,
    routing: Arc<Mutex<GsiRouting>>,
    /// (GSI, irqfd) per MSI-X vector.
    vectors: Vec<(u32, EventFd)>,
    intx: EventFd,
    warnings: Mutex<RouteWarnings>,
}

/// Route updates that failed, each kind warned once.
#[derive(Debug, Default)]
struct RouteWarnings {
    /// The routing table refused the vector's route.
    route: WarnOnce,
    /// KVM refused the table.
    apply: WarnOnce,
}

/// Routes `gsi` (vector `vector` of device `name`) to `msg`, or unroutes it, in `routing`,
/// then installs the table with `apply`. A refusal is logged through `warnings`; the
/// vector then keeps its old route (or none), and the device goes on.
fn update_msi_route(
    routing: &mut GsiRouting,
    gsi: u32,
    msg: Option<(u64, u32)>,
    apply: impl FnOnce(&GsiRouting) -> tvm_irq::Result<()>,
    warnings: &mut RouteWarnings,
    name: &str,
    vector: u16,
) {
    if let Err(e) = routing.set_msi(gsi, msg) {
        warn_once!(
            warnings.route,
            "{name}: cannot route msi-x vector {vector}: {e}"
        );
        return;
    }
    if let Err(e) = apply(routing) {
        warn_once!(
            warnings.apply,
            "{name}: cannot update the gsi routing for msi-x vector {vector}: {e}"
        );
    }
}

impl std::fmt::Debug for KvmInterruptSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmInterruptSink")
            .field("name", &self.name)
            .field("vectors", &self.vectors.len())
            .finish_non_exhaustive()
    }
}

impl KvmInterruptSink {
    /// Allocates a GSI and an irqfd for each of `num_vectors` MSI-X vectors and binds INTx to
    /// `intx_gsi`; `name` is the device's, for log lines.
    pub fn new(
        name: &str,
        vm: Arc<VmFd>,
        routing: Arc<Mutex<GsiRouting>>,
        num_vectors: usize,
        intx_gsi: u32,
    ) -> Result<Self> {
        let mut vectors = Vec::with_capacity(num_vectors);
        {
            let mut r = routing.lock().unwrap_or_else(|e| e.into_inner());
            for _ in 0..num_vectors {
                let gsi = r.allocate_msi_gsi()?;
                let evt = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
                vectors.push((gsi, evt));
            }
        }
        let intx = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm.register_irqfd(&intx, intx_gsi)
            .map_err(|e| Error::Irq(tvm_irq::Error::RegisterIrqfd(intx_gsi, e)))?;
        Ok(KvmInterruptSink {
            name: name.to_string(),
            vm,
            routing,
            vectors,
            intx,
            warnings: Mutex::new(RouteWarnings::default()),
        })
    }

    /// Binds each vector's irqfd to its GSI (call after the routing table is applied).
    pub fn register_irqfds(&self) -> Result<()> {
        for (gsi, evt) in &self.vectors {
            self.vm
                .register_irqfd(evt, *gsi)
                .map_err(|e| Error::Irq(tvm_irq::Error::RegisterIrqfd(*gsi, e)))?;
        }
        Ok(())
    }
}

impl InterruptSink for KvmInterruptSink {
    fn msix(&self, vector: u16) -> std::io::Result<()> {
        match self.vectors.get(usize::from(vector)) {
            Some((_, evt)) => evt.write(1),
            None => {
                debug!("virtio: msi-x vector {vector} out of range");
                Ok(())
            }
        }
    }

    fn intx(&self, level: bool) -> std::io::Result<()> {
        // The PIC in virtual-wire mode takes edges: assert on the rising edge only.
        if level {
            self.intx.write(1)
        } else {
            Ok(())
        }
    }

    fn msix_table_changed(&self, vector: u16, entry: MsixEntry) {
        let Some((gsi, _)) = self.vectors.get(usize::from(vector)) else {
            return;
        };
        let msg = (!entry.masked()).then(|| (entry.msg_addr(), entry.msg_data));
        let mut routing = self.routing.lock().unwrap_or_else(|e| e.into_inner());
        let mut warnings = self.warnings.lock().unwrap_or_else(|e| e.into_inner());
        update_msi_route(
            &mut routing,
            *gsi,
            msg,
            |r| r.apply(&self.vm),
            &mut warnings,
            &self.name,
            vector,
        );
    }
}

/// A virtio-pci device's BAR as a [`BarAccess`] for the [`PciMmioWindow`].
pub struct BarMmio<D: VirtioDevice> {
    dev: Arc<Mutex<VirtioPciDevice<D>>>,
}

impl<D: VirtioDevice> std::fmt::Debug for BarMmio<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BarMmio").finish_non_exhaustive()
    }
}

impl<D: VirtioDevice> BarMmio<D> {
    /// The BAR of `dev`.
    pub fn new(dev: Arc<Mutex<VirtioPciDevice<D>>>) -> Self {
        BarMmio { dev }
    }
}

impl<D: VirtioDevice> BarAccess for BarMmio<D> {
    fn bar_read(&self, offset: u64, data: &mut [u8]) {
        self.dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bar_read(offset, data);
    }

    fn bar_write(&self, offset: u64, data: &[u8]) {
        self.dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bar_write(offset, data);
    }
}

/// Registers and unregisters ioeventfds ([`VmFd`] in the VMM; a fake in tests).
pub trait IoeventRegistrar: Send + Sync {
    /// Makes a guest write to MMIO address `addr` signal `evt` (no exit to user space).
    fn register(&self, evt: &EventFd, addr: u64) -> std::result::Result<(), kvm_ioctls::Error>;
    /// Undoes [`register`](Self::register).
    fn unregister(&self, evt: &EventFd, addr: u64) -> std::result::Result<(), kvm_ioctls::Error>;
}

impl IoeventRegistrar for VmFd {
    fn register(&self, evt: &EventFd, addr: u64) -> std::result::Result<(), kvm_ioctls::Error> {
        self.register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
    }

    fn unregister(&self, evt: &EventFd, addr: u64) -> std::result::Result<(), kvm_ioctls::Error> {
        self.unregister_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
    }
}

/// A virtio-pci device on the PCI bus whose BAR follows the guest.
///
/// It is what the [`tvm_bus::PciRoot`] holds for the device: config accesses go to the
/// device, and after each write the BAR's decode address
/// ([`VirtioPciDevice::bar_decode_addr`]) is compared with where the BAR is mapped. When it
/// differs (memory decoding turned off or on, the BAR reprogrammed), the BAR is unmapped
/// from the [`PciMmioWindow`] and its queue-notify ioeventfds unregistered, then both are
/// set up at the new address. A new address outside the window or over another BAR is
/// refused: the BAR stays unmapped (reads all ones) until the guest puts it somewhere
/// valid; the device and the other devices keep working. The first refusal is a warning,
/// later ones are logged at debug level.
pub struct RelocatableBar<D: VirtioDevice> {
    name: String,
    dev: Arc<Mutex<VirtioPciDevice<D>>>,
    window: Arc<PciMmioWindow>,
    ioevents: Arc<dyn IoeventRegistrar>,
    /// Where the BAR is mapped (and its ioeventfds registered) now.
    mapped: Option<u64>,
    /// A move refused.
    refused: WarnOnce,
}

impl<D: VirtioDevice> std::fmt::Debug for RelocatableBar<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelocatableBar")
            .field("name", &self.name)
            .field("mapped", &self.mapped)
            .finish_non_exhaustive()
    }
}

impl<D: VirtioDevice + 'static> RelocatableBar<D> {
    /// Maps the BAR of `dev` where it decodes now (the VMM has placed it with
    /// [`VirtioPciDevice::set_bar_addr`]) and registers its ioeventfds; `name` is for logs.
    ///
    /// # Errors
    ///
    /// [`Error::MapBar`] if the BAR does not decode or cannot be mapped there (the
    /// ioeventfds included).
    pub fn new(
        name: String,
        dev: Arc<Mutex<VirtioPciDevice<D>>>,
        window: Arc<PciMmioWindow>,
        ioevents: Arc<dyn IoeventRegistrar>,
    ) -> Result<Self> {
        let mut bar = RelocatableBar {
            name,
            dev,
            window,
            ioevents,
            mapped: None,
            refused: WarnOnce::new(),
        };
        let Some(addr) = bar.lock().bar_decode_addr() else {
            return Err(Error::MapBar(bar.name, "memory decoding is off".into()));
        };
        if let Err(why) = bar.map_at(addr) {
            return Err(Error::MapBar(bar.name, why));
        }
        Ok(bar)
    }

    /// Where the BAR is mapped now.
    pub fn mapped(&self) -> Option<u64> {
        self.mapped
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VirtioPciDevice<D>> {
        self.dev.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The (queue, notify address) pairs of the device's queues for a BAR at `addr`.
    fn notify_addrs(dev: &VirtioPciDevice<D>, addr: u64) -> impl Iterator<Item = (u16, u64)> {
        // num_queues() is at most 256, so every index fits a u16.
        let offsets: Vec<(u16, u64)> = (0..dev.num_queues() as u16)
            .map(|q| (q, addr + dev.notify_offset(q)))
            .collect();
        offsets.into_iter()
    }

    /// Maps the BAR at `addr` and registers the ioeventfds there; on failure nothing is
    /// left mapped or registered.
    fn map_at(&mut self, addr: u64) -> std::result::Result<(), String> {
        let size = self.lock().bar_size();
        self.window
            .map(addr, size, Arc::new(BarMmio::new(self.dev.clone())))
            .map_err(|e| e.to_string())?;
        let dev = self.lock();
        let mut done = Vec::new();
        for (q, at) in Self::notify_addrs(&dev, addr) {
            let Some(evt) = dev.notify_eventfd(q) else {
                continue;
            };
            if let Err(e) = self.ioevents.register(evt, at) {
                for (evt, at) in done {
                    let _ = self.ioevents.unregister(evt, at);
                }
                drop(dev);
                self.window.unmap(addr);
                return Err(format!("cannot register the ioeventfd of queue {q}: {e}"));
            }
            done.push((evt, at));
        }
        drop(dev);
        self.mapped = Some(addr);
        Ok(())
    }

    fn unmap(&mut self) {
        let Some(addr) = self.mapped.take() else {
            return;
        };
        self.window.unmap(addr);
        let dev = self.lock();
        for (q, at) in Self::notify_addrs(&dev, addr) {
            if let Some(evt) = dev.notify_eventfd(q) {
                if let Err(e) = self.ioevents.unregister(evt, at) {
                    warn!(
                        "{}: cannot unregister the ioeventfd of queue {q}: {e}",
                        self.name
                    );
                }
            }
        }
    }

    /// Follows the BAR to where it decodes now.
    fn sync(&mut self, want: Option<u64>) {
        if want == self.mapped {
            return;
        }
        self.unmap();
        match want {
            Some(addr) => match self.map_at(addr) {
                Ok(()) => debug!("{}: bar mapped at {addr:#x}", self.name),
                Err(why) => warn_once!(
                    self.refused,
                    "{}: the guest moved the bar to {addr:#x}, which cannot be mapped ({why}); \
                     it stays unmapped until moved again",
                    self.name
                ),
            },
            None => debug!("{}: bar decoding off", self.name),
        }
    }
}

impl<D: VirtioDevice + 'static> PciDevice for RelocatableBar<D> {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.lock().config_read(reg)
    }

    fn config_write(&mut self, reg: usize, offset: u8, data: &[u8]) {
        // The device lock is released before the window's is taken: MMIO accesses take the
        // window's lock, release it, then take the device's.
        let want = {
            let mut dev = self.lock();
            dev.config_write(reg, offset, data);
            dev.bar_decode_addr()
        };
        self.sync(want);
    }
}

/// Writes the PCI interrupt line register, as firmware does, so the guest knows its INTx.
fn set_interrupt_line<D: VirtioDevice>(dev: &mut VirtioPciDevice<D>, gsi: u32) {
    // Register 15: interrupt line in byte 0.
    dev.config_write(15, 0, &[gsi as u8]);
}

/// Legacy GSIs handed to virtio devices' INTx, in order.
const VIRTIO_INTX_GSIS: [u32; 4] = [10, 11, 5, 9];

/// Puts virtio devices on the PCI bus the way firmware would, and wires them to KVM: a
/// slot, a BAR in the PCI MMIO window (followed when the guest moves it), ioeventfds for
/// the queue notifications, MSI-X vectors as irqfds on GSI routes, INTx on a legacy GSI.
/// Call [`finish`](Self::finish) once every device is added.
pub struct VirtioPciWiring<'a> {
    /// The VM.
    pub vm: Arc<VmFd>,
    /// Guest memory, for the devices.
    pub mem: &'a vm_memory::GuestMemoryMmap<()>,
    /// PCI bus 0.
    pub pci: Arc<Mutex<tvm_bus::PciRoot>>,
    /// Where BARs are placed.
    pub allocator: tvm_memory::MmioAllocator,
    /// Where BARs are mapped.
    pub window: Arc<PciMmioWindow>,
    /// The GSI routing table, shared with the interrupt sinks.
    pub routing: Arc<Mutex<GsiRouting>>,
    sinks: Vec<Arc<KvmInterruptSink>>,
    pci_irqs: Vec<tvm_arch_x86::acpi::PciIrq>,
}

impl std::fmt::Debug for VirtioPciWiring<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciWiring")
            .field("devices", &self.sinks.len())
            .finish_non_exhaustive()
    }
}

impl<'a> VirtioPciWiring<'a> {
    /// Wiring over `window` (registered on the MMIO bus by the caller), placing BARs with
    /// `allocator`.
    pub fn new(
        vm: Arc<VmFd>,
        mem: &'a vm_memory::GuestMemoryMmap<()>,
        pci: Arc<Mutex<tvm_bus::PciRoot>>,
        allocator: tvm_memory::MmioAllocator,
        window: Arc<PciMmioWindow>,
    ) -> Self {
        VirtioPciWiring {
            vm,
            mem,
            pci,
            allocator,
            window,
            routing: Arc::new(Mutex::new(GsiRouting::new())),
            sinks: Vec::new(),
            pci_irqs: Vec::new(),
        }
    }

    /// Adds `device` in the next free slot; `name` is for logs.
    ///
    /// # Errors
    ///
    /// No slot, no BAR space, no GSI, or KVM refusing an irqfd or ioeventfd.
    pub fn add<D: VirtioDevice + 'static>(
        &mut self,
        device: D,
        name: &str,
    ) -> Result<Arc<Mutex<VirtioPciDevice<D>>>> {
        let num_vectors = device.queue_max_sizes().len() + 1;
        let intx_gsi = VIRTIO_INTX_GSIS[self.sinks.len() % VIRTIO_INTX_GSIS.len()];
        let sink = Arc::new(KvmInterruptSink::new(
            name,
            self.vm.clone(),
            self.routing.clone(),
            num_vectors,
            intx_gsi,
        )?);
        let mut dev = VirtioPciDevice::new(device, self.mem.clone(), sink.clone())?;
        dev.set_name(name);
        let bar = self.allocator.allocate(dev.bar_size())?;
        dev.set_bar_addr(bar)?;
        set_interrupt_line(&mut dev, intx_gsi);
        let dev = Arc::new(Mutex::new(dev));
        let ioevents: Arc<dyn IoeventRegistrar> = self.vm.clone();
        let slot_dev =
            RelocatableBar::new(name.to_string(), dev.clone(), self.window.clone(), ioevents)?;
        let slot = self
            .pci
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add_device(Arc::new(Mutex::new(slot_dev)))?;
        info!(
            "{name} at pci 00:{slot:02x}.0, bar {:#x}, intx gsi {intx_gsi}",
            bar.0
        );
        self.sinks.push(sink);
        // The transport's interrupt pin is INTA.
        self.pci_irqs.push(tvm_arch_x86::acpi::PciIrq {
            slot,
            pin: 0,
            gsi: intx_gsi,
        });
        Ok(dev)
    }

    /// Each device's INTx wiring so far, for the ACPI `_PRT`.
    pub fn pci_irqs(&self) -> &[tvm_arch_x86::acpi::PciIrq] {
        &self.pci_irqs
    }

    /// Applies the routing table and binds every MSI-X irqfd.
    ///
    /// # Errors
    ///
    /// KVM refusing the routing table or an irqfd.
    pub fn finish(self) -> Result<()> {
        if self.sinks.is_empty() {
            return Ok(());
        }
        self.routing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .apply(&self.vm)?;
        for sink in &self.sinks {
            sink.register_irqfds()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::fd::AsRawFd;

    use tvm_bus::{DeviceMmio, MmioAddress};
    use tvm_virtio::{ActivateContext, COMMON_CFG_OFFSET, NOTIFY_OFFSET};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;

    /// Two queues, nothing else.
    struct Dummy;

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn device_features(&self) -> u64 {
            0
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(&mut self, _ctx: ActivateContext) -> tvm_virtio::Result<()> {
            Ok(())
        }
        fn reset(&mut self) {}
        fn process_queue(&mut self, _queue: u16) {}
    }

    struct NoIrq;

    impl InterruptSink for NoIrq {
        fn msix(&self, _vector: u16) -> std::io::Result<()> {
            Ok(())
        }
        fn intx(&self, _level: bool) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Registered (fd, address) pairs; refuses addresses in `refuse`.
    #[derive(Default)]
    struct FakeIoevents {
        registered: Mutex<Vec<(i32, u64)>>,
        refuse: Mutex<Option<u64>>,
    }

    impl FakeIoevents {
        fn addrs(&self) -> Vec<u64> {
            let mut a: Vec<u64> = self
                .registered
                .lock()
                .unwrap()
                .iter()
                .map(|r| r.1)
                .collect();
            a.sort_unstable();
            a
        }
    }

    impl IoeventRegistrar for FakeIoevents {
        fn register(&self, evt: &EventFd, addr: u64) -> std::result::Result<(), kvm_ioctls::Error> {
            if *self.refuse.lock().unwrap() == Some(addr) {
                return Err(kvm_ioctls::Error::new(libc::ENOSPC));
            }
            let mut r = self.registered.lock().unwrap();
            assert!(!r.contains(&(evt.as_raw_fd(), addr)), "registered twice");
            r.push((evt.as_raw_fd(), addr));
            Ok(())
        }
        fn unregister(
            &self,
            evt: &EventFd,
            addr: u64,
        ) -> std::result::Result<(), kvm_ioctls::Error> {
            let mut r = self.registered.lock().unwrap();
            let i = r
                .iter()
                .position(|e| *e == (evt.as_raw_fd(), addr))
                .ok_or(kvm_ioctls::Error::new(libc::ENOENT))?;
            r.remove(i);
            Ok(())
        }
    }

    const WINDOW: u64 = 0xc000_0000;
    const A: u64 = WINDOW;
    const B: u64 = WINDOW + 0x10_0000;

    struct Setup {
        window: Arc<PciMmioWindow>,
        ioevents: Arc<FakeIoevents>,
        first: RelocatableBar<Dummy>,
        second: RelocatableBar<Dummy>,
    }

    fn device(
        at: u64,
        window: &Arc<PciMmioWindow>,
        io: &Arc<FakeIoevents>,
    ) -> RelocatableBar<Dummy> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut dev = VirtioPciDevice::new(Dummy, mem, Arc::new(NoIrq)).unwrap();
        dev.set_bar_addr(GuestAddress(at)).unwrap();
        let io: Arc<dyn IoeventRegistrar> = io.clone();
        RelocatableBar::new(
            format!("dev@{at:#x}"),
            Arc::new(Mutex::new(dev)),
            window.clone(),
            io,
        )
        .unwrap()
    }

    fn setup() -> Setup {
        let window = Arc::new(PciMmioWindow::new(WINDOW, 0x1000_0000));
        let ioevents = Arc::new(FakeIoevents::default());
        let first = device(A, &window, &ioevents);
        let second = device(B, &window, &ioevents);
        Setup {
            window,
            ioevents,
            first,
            second,
        }
    }

    /// num_queues from the common config at `bar`, through the window.
    fn num_queues_at(window: &PciMmioWindow, bar: u64) -> u16 {
        let mut data = [0u8; 2];
        window.mmio_read(
            MmioAddress(WINDOW),
            bar + COMMON_CFG_OFFSET + 0x12 - WINDOW,
            &mut data,
        );
        u16::from_le_bytes(data)
    }

    fn write_bar(dev: &mut RelocatableBar<Dummy>, addr: u64) {
        dev.config_write(4, 0, &(addr as u32).to_le_bytes());
        dev.config_write(5, 0, &((addr >> 32) as u32).to_le_bytes());
    }

    fn set_memory_decode(dev: &mut RelocatableBar<Dummy>, on: bool) {
        let cmd = dev.config_read(1) as u16;
        let cmd = if on { cmd | 2 } else { cmd & !2 };
        dev.config_write(1, 0, &cmd.to_le_bytes());
    }

    fn notify(bar: u64) -> Vec<u64> {
        vec![bar + NOTIFY_OFFSET, bar + NOTIFY_OFFSET + 4]
    }

    #[test]
    fn placed_bars_are_mapped_with_their_ioeventfds() {
        let s = setup();
        assert_eq!(num_queues_at(&s.window, A), 2);
        assert_eq!(num_queues_at(&s.window, B), 2);
        assert_eq!(s.ioevents.addrs(), [notify(A), notify(B)].concat());
    }

    #[test]
    fn sizing_unmaps_then_restores_the_same_mapping() {
        let mut s = setup();
        set_memory_decode(&mut s.first, false);
        assert_eq!(s.first.mapped(), None);
        assert_eq!(num_queues_at(&s.window, A), u16::MAX);
        assert_eq!(s.ioevents.addrs(), notify(B));
        write_bar(&mut s.first, u64::MAX);
        assert_eq!(s.first.mapped(), None);
        write_bar(&mut s.first, A);
        set_memory_decode(&mut s.first, true);
        assert_eq!(s.first.mapped(), Some(A));
        assert_eq!(num_queues_at(&s.window, A), 2);
        assert_eq!(s.ioevents.addrs(), [notify(A), notify(B)].concat());
    }

    #[test]
    fn a_moved_bar_and_its_ioeventfds_follow_the_guest() {
        let mut s = setup();
        let c = WINDOW + 0x800_0000;
        write_bar(&mut s.first, c);
        assert_eq!(s.first.mapped(), Some(c));
        assert_eq!(num_queues_at(&s.window, A), u16::MAX);
        assert_eq!(num_queues_at(&s.window, c), 2);
        assert_eq!(s.ioevents.addrs(), [notify(B), notify(c)].concat());
    }

    #[test]
    fn a_bar_moved_over_another_or_out_of_the_window_is_left_unmapped() {
        let mut s = setup();
        // Over the second device's BAR: refused, the second keeps working.
        write_bar(&mut s.first, B);
        assert_eq!(s.first.mapped(), None);
        assert_eq!(num_queues_at(&s.window, B), 2);
        assert_eq!(s.ioevents.addrs(), notify(B));
        // Over RAM (below the window) and above 4 GiB: refused.
        for bad in [0x10_0000, 1 << 36] {
            write_bar(&mut s.first, bad);
            assert_eq!(s.first.mapped(), None, "{bad:#x}");
        }
        // Back to a free place: mapped again.
        write_bar(&mut s.first, A);
        assert_eq!(s.first.mapped(), Some(A));
        assert_eq!(num_queues_at(&s.window, A), 2);
        assert_eq!(s.ioevents.addrs(), [notify(A), notify(B)].concat());
        // The second device moves too and nothing is left behind.
        let c = WINDOW + 0x20_0000;
        write_bar(&mut s.second, c);
        assert_eq!(s.ioevents.addrs(), [notify(A), notify(c)].concat());
    }

    #[test]
    fn refused_moves_are_one_warning() {
        tvm_virtio::test_log::start();
        let mut s = setup();
        for _ in 0..3 {
            write_bar(&mut s.first, 0x10_0000);
            write_bar(&mut s.first, B);
        }
        assert_eq!(s.first.mapped(), None);
        let w = tvm_virtio::test_log::lines(log::Level::Warn);
        assert_eq!(w.len(), 1, "{w:#?}");
        assert!(
            w[0].starts_with("dev@0xc0000000: the guest moved the bar to 0x100000"),
            "{}",
            w[0]
        );
        write_bar(&mut s.first, A);
        assert_eq!(s.first.mapped(), Some(A));
    }

    #[test]
    fn refused_msix_routes_are_one_warning_per_kind() {
        tvm_virtio::test_log::start();
        let mut routing = GsiRouting::new();
        let gsi = routing.allocate_msi_gsi().unwrap();
        let mut warnings = RouteWarnings::default();
        let applied = std::cell::Cell::new(0);
        for i in 0..3u32 {
            // A GSI the table does not know: refused before KVM is asked.
            update_msi_route(
                &mut routing,
                gsi + 1,
                Some((0xfee0_0000, i)),
                |_| panic!("applied a refused route"),
                &mut warnings,
                "disk-b",
                1,
            );
            // KVM refusing the table.
            update_msi_route(
                &mut routing,
                gsi,
                Some((0xfee0_0000, i)),
                |_| {
                    applied.set(applied.get() + 1);
                    Err(tvm_irq::Error::GsiExhausted)
                },
                &mut warnings,
                "disk-b",
                0,
            );
        }
        assert_eq!(applied.get(), 3);
        let w = tvm_virtio::test_log::lines(log::Level::Warn);
        assert_eq!(w.len(), 2, "{w:#?}");
        assert!(
            w[0].starts_with("disk-b: cannot route msi-x vector 1: "),
            "{}",
            w[0]
        );
        assert!(
            w[1].starts_with("disk-b: cannot update the gsi routing for msi-x vector 0: "),
            "{}",
            w[1]
        );
        assert!(w
            .iter()
            .all(|l| l.ends_with("(repeats are logged at debug level)")));
        let debug = tvm_virtio::test_log::lines(log::Level::Debug);
        assert_eq!(debug.len(), 4, "{debug:#?}");
        // A route KVM takes is no warning, and the table holds it.
        let mut fresh = RouteWarnings::default();
        update_msi_route(
            &mut routing,
            gsi,
            Some((0xfee0_0000, 0x41)),
            |_| Ok(()),
            &mut fresh,
            "disk-b",
            0,
        );
        assert!(!fresh.route.warned() && !fresh.apply.warned());
        assert!(routing.routes().contains(&(
            gsi,
            tvm_irq::Route::Msi {
                address: 0xfee0_0000,
                data: 0x41
            }
        )));
    }

    #[test]
    fn a_failed_ioeventfd_registration_leaves_nothing_behind() {
        let mut s = setup();
        let c = WINDOW + 0x40_0000;
        *s.ioevents.refuse.lock().unwrap() = Some(c + NOTIFY_OFFSET + 4);
        write_bar(&mut s.first, c);
        assert_eq!(s.first.mapped(), None);
        assert_eq!(num_queues_at(&s.window, c), u16::MAX);
        assert_eq!(s.ioevents.addrs(), notify(B));
    }
}
