//! Glue between the virtio-pci transport (sans KVM) and KVM: MSI-X vectors as irqfds on
//! MSI routes, INTx as an irqfd on a legacy GSI, queue notifications as ioeventfds, the BAR
//! on the MMIO bus.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use log::{debug, warn};
use tvm_bus::{MmioAddress, MmioAddressOffset, MutDeviceMmio, PciDevice};
use tvm_irq::GsiRouting;
use tvm_virtio::{InterruptSink, MsixEntry, VirtioDevice, VirtioPciDevice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{Error, Result};

/// Interrupts of one virtio-pci device, delivered by KVM.
pub struct KvmInterruptSink {
    vm: Arc<VmFd>,
    routing: Arc<Mutex<GsiRouting>>,
    /// (GSI, irqfd) per MSI-X vector.
    vectors: Vec<(u32, EventFd)>,
    intx: EventFd,
}

impl std::fmt::Debug for KvmInterruptSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmInterruptSink")
            .field("vectors", &self.vectors.len())
            .finish_non_exhaustive()
    }
}

impl KvmInterruptSink {
    /// Allocates a GSI and an irqfd for each of `num_vectors` MSI-X vectors and binds INTx to
    /// `intx_gsi`.
    pub fn new(
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
            vm,
            routing,
            vectors,
            intx,
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
        if let Err(e) = routing.set_msi(*gsi, msg) {
            warn!("virtio: cannot route msi-x vector {vector}: {e}");
            return;
        }
        if let Err(e) = routing.apply(&self.vm) {
            warn!("virtio: cannot update the gsi routing: {e}");
        }
    }
}

/// Puts a virtio-pci device's BAR on the MMIO bus.
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

impl<D: VirtioDevice> MutDeviceMmio for BarMmio<D> {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bar_read(offset, data);
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bar_write(offset, data);
    }
}

/// Registers the queue notification EventFds of `dev` as ioeventfds at its BAR.
pub fn register_ioeventfds<D: VirtioDevice>(vm: &VmFd, dev: &VirtioPciDevice<D>) -> Result<()> {
    let bar = dev.bar_addr();
    for q in 0..dev.num_queues() {
        let q = q as u16;
        if let Some(evt) = dev.notify_eventfd(q) {
            let addr = IoEventAddress::Mmio(bar + dev.notify_offset(q));
            vm.register_ioevent(evt, &addr, NoDatamatch)
                .map_err(Error::RegisterIoevent)?;
        }
    }
    Ok(())
}

/// Writes the PCI interrupt line register, as firmware does, so the guest knows its INTx.
pub fn set_interrupt_line<D: VirtioDevice>(dev: &mut VirtioPciDevice<D>, gsi: u32) {
    // Register 15: interrupt line in byte 0.
    dev.config_write(15, 0, &[gsi as u8]);
}
