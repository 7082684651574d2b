//! Glue between the virtio-pci transport (sans KVM) and KVM: MSI-X vectors and INTx as
//! tvm-irq [`IrqLine`]s (irqfds on MSI routes and on a legacy GSI), queue notifications as
//! ioeventfds ([`KvmIoevents`], for the transport's [`RelocatableBar`]), and
//! [`VirtioPciWiring`], which puts the devices on the PCI bus as firmware would.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use log::{debug, info};
use tvm_arch_x86::layout::VIRTIO_INTX_GSIS;
use tvm_bus::{PciDevice, PciMmioWindow};
use tvm_irq::{GsiRouting, IrqLine};
use tvm_virtio::{
    warn_once, InterruptSink, IoeventRegistrar, MsixEntry, RelocatableBar, VirtioDevice,
    VirtioPciDevice, WarnOnce,
};
use vmm_sys_util::eventfd::EventFd;

use crate::Result;

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
    /// One line per MSI-X vector, on a GSI with an MSI route.
    vectors: Vec<IrqLine>,
    /// INTx, on a legacy GSI.
    intx: IrqLine,
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
        let vectors = {
            let mut r = routing.lock().unwrap_or_else(|e| e.into_inner());
            (0..num_vectors)
                .map(|_| r.allocate_msi_line())
                .collect::<tvm_irq::Result<Vec<_>>>()?
        };
        let intx = IrqLine::new(intx_gsi)?;
        intx.register(&vm)?;
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
        for line in &self.vectors {
            line.register(&self.vm)?;
        }
        Ok(())
    }
}

impl InterruptSink for KvmInterruptSink {
    fn msix(&self, vector: u16) -> std::io::Result<()> {
        match self.vectors.get(usize::from(vector)) {
            Some(line) => line.trigger(),
            None => {
                debug!("virtio: msi-x vector {vector} out of range");
                Ok(())
            }
        }
    }

    fn intx(&self, level: bool) -> std::io::Result<()> {
        // The PIC in virtual-wire mode takes edges: assert on the rising edge only.
        if level {
            self.intx.trigger()
        } else {
            Ok(())
        }
    }

    fn msix_table_changed(&self, vector: u16, entry: MsixEntry) {
        let Some(gsi) = self.vectors.get(usize::from(vector)).map(IrqLine::gsi) else {
            return;
        };
        let msg = (!entry.masked()).then(|| (entry.msg_addr(), entry.msg_data));
        let mut routing = self.routing.lock().unwrap_or_else(|e| e.into_inner());
        let mut warnings = self.warnings.lock().unwrap_or_else(|e| e.into_inner());
        update_msi_route(
            &mut routing,
            gsi,
            msg,
            |r| r.apply(&self.vm),
            &mut warnings,
            &self.name,
            vector,
        );
    }
}

/// Queue-notify ioeventfds through KVM_IOEVENTFD: any write of any length to the address
/// signals the EventFd (no datamatch).
#[derive(Debug)]
pub struct KvmIoevents(pub Arc<VmFd>);

impl IoeventRegistrar for KvmIoevents {
    fn register(&self, evt: &EventFd, addr: u64) -> std::io::Result<()> {
        self.0
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(std::io::Error::from)
    }

    fn unregister(&self, evt: &EventFd, addr: u64) -> std::io::Result<()> {
        self.0
            .unregister_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(std::io::Error::from)
    }
}

/// Writes the PCI interrupt line register, as firmware does, so the guest knows its INTx.
fn set_interrupt_line<D: VirtioDevice>(dev: &mut VirtioPciDevice<D>, gsi: u32) {
    // Register 15: interrupt line in byte 0.
    dev.config_write(15, 0, &[gsi as u8]);
}

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
        self.add_restored(device, name, None)
    }

    /// [`add`](Self::add), with the transport brought to `saved` (a snapshot's) before
    /// its BAR is mapped, so that the BAR and its notifications go where the guest had
    /// them.
    ///
    /// # Errors
    ///
    /// Those of [`add`](Self::add), and a saved state that does not fit the device.
    pub fn add_restored<D: VirtioDevice + 'static>(
        &mut self,
        device: D,
        name: &str,
        saved: Option<&tvm_snapshot::TransportState>,
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
        if let Some(saved) = saved {
            dev.restore_state(saved)?;
        }
        let dev = Arc::new(Mutex::new(dev));
        let ioevents: Arc<dyn IoeventRegistrar> = Arc::new(KvmIoevents(self.vm.clone()));
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

    use super::*;

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
}
