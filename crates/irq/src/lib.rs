//! Interrupt controllers and interrupt lines of a KVM VM on x86_64.
//!
//! [`setup_irqchip`] creates the in-kernel irqchip (two 8259 PICs, the IOAPIC and one LAPIC
//! per vCPU) and the in-kernel i8254 PIT. Devices never see KVM: a device raises an
//! interrupt by writing an [`EventFd`], and [`IrqLine::register`] binds that EventFd to a GSI
//! with `KVM_IRQFD`, so the interrupt is injected without a round trip through the VMM.
//!
//! With the default routing KVM installs, GSIs 0..15 reach both the PIC and the IOAPIC and
//! GSIs 16..23 the IOAPIC only. [`GsiRouting`] keeps that table and adds MSI routes (GSI
//! 24 and up) for MSI-X vectors; an MSI vector is then an irqfd on its GSI.

#![deny(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod routing;

pub use routing::{GsiRouting, Route, MAX_IRQ_ROUTES};

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// Number of IOAPIC pins (KVM's IOAPIC has 24).
pub const IOAPIC_PINS: u32 = 24;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM_CREATE_IRQCHIP failed.
    #[error("failed to create the in-kernel irqchip")]
    CreateIrqChip(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_PIT2 failed.
    #[error("failed to create the in-kernel pit")]
    CreatePit(#[source] kvm_ioctls::Error),
    /// The GSI is not an IOAPIC pin.
    #[error("gsi {0} is not an ioapic pin (0..{IOAPIC_PINS})")]
    InvalidGsi(u32),
    /// Creating the EventFd failed.
    #[error("failed to create an eventfd for gsi {0}")]
    CreateEventFd(u32, #[source] std::io::Error),
    /// No GSI left for another MSI route.
    #[error("no free gsi for another msi route (kvm allows {MAX_IRQ_ROUTES})")]
    GsiExhausted,
    /// The GSI was never allocated for MSI.
    #[error("gsi {0} is not an allocated msi gsi")]
    UnknownGsi(u32),
    /// KVM_SET_GSI_ROUTING failed.
    #[error("failed to set the gsi routing table")]
    SetGsiRouting(#[source] kvm_ioctls::Error),
    /// KVM_IRQFD failed.
    #[error("failed to register an irqfd for gsi {0}")]
    RegisterIrqfd(u32, #[source] kvm_ioctls::Error),
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// The PIT configuration: the speaker port (0x61) is emulated as a dummy, as Firecracker and
/// Cloud Hypervisor do, so the guest can probe it.
pub fn pit_config() -> kvm_pit_config {
    kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    }
}

/// Creates the in-kernel irqchip and PIT. Call before creating vCPUs.
pub fn setup_irqchip(vm: &VmFd) -> Result<()> {
    vm.create_irq_chip().map_err(Error::CreateIrqChip)?;
    vm.create_pit2(pit_config()).map_err(Error::CreatePit)?;
    Ok(())
}

/// An edge-triggered interrupt line: an EventFd a device writes, bound to a GSI.
///
/// The GSI is an IOAPIC pin ([`IrqLine::new`]) or one with an MSI route, for an MSI-X
/// vector ([`GsiRouting::allocate_msi_line`]).
#[derive(Debug)]
pub struct IrqLine {
    gsi: u32,
    evt: EventFd,
}

impl IrqLine {
    /// A new line for `gsi`, not yet bound to KVM.
    pub fn new(gsi: u32) -> Result<Self> {
        if gsi >= IOAPIC_PINS {
            return Err(Error::InvalidGsi(gsi));
        }
        Self::on_gsi(gsi)
    }

    /// A new line for any `gsi`: an IOAPIC pin checked by [`IrqLine::new`], or an MSI GSI
    /// from the routing table.
    fn on_gsi(gsi: u32) -> Result<Self> {
        let evt = EventFd::new(libc_efd_nonblock()).map_err(|e| Error::CreateEventFd(gsi, e))?;
        Ok(IrqLine { gsi, evt })
    }

    /// The GSI.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// The EventFd to hand to the device (a clone; both refer to one counter).
    pub fn eventfd(&self) -> Result<EventFd> {
        self.evt
            .try_clone()
            .map_err(|e| Error::CreateEventFd(self.gsi, e))
    }

    /// Raises an edge on the line, as the device would through [`eventfd`](Self::eventfd):
    /// for a VMM that delivers the interrupt itself (a virtio transport's sink).
    ///
    /// # Errors
    ///
    /// The EventFd write's (its counter is full, which takes 2^64 - 1 writes unread).
    pub fn trigger(&self) -> std::io::Result<()> {
        self.evt.write(1)
    }

    /// Binds the line to its GSI with KVM_IRQFD: each write to the EventFd injects an edge.
    pub fn register(&self, vm: &VmFd) -> Result<()> {
        vm.register_irqfd(&self.evt, self.gsi)
            .map_err(|e| Error::RegisterIrqfd(self.gsi, e))
    }
}

fn libc_efd_nonblock() -> i32 {
    vmm_sys_util::eventfd::EFD_NONBLOCK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pit_speaker_is_dummy() {
        assert_eq!(pit_config().flags, KVM_PIT_SPEAKER_DUMMY);
    }

    #[test]
    fn irq_line_shares_its_eventfd() {
        // COM1's GSI.
        let line = IrqLine::new(4).unwrap();
        assert_eq!(line.gsi(), 4);
        let dev_side = line.eventfd().unwrap();
        dev_side.write(1).unwrap();
        dev_side.write(1).unwrap();
        assert_eq!(line.evt.read().unwrap(), 2);
    }

    #[test]
    fn trigger_writes_the_shared_eventfd() {
        let line = IrqLine::new(10).unwrap();
        let dev_side = line.eventfd().unwrap();
        line.trigger().unwrap();
        line.trigger().unwrap();
        assert_eq!(dev_side.read().unwrap(), 2);
    }

    #[test]
    fn msi_lines_take_gsis_from_the_routing_table() {
        let mut routing = GsiRouting::new();
        let a = routing.allocate_msi_line().unwrap();
        let b = routing.allocate_msi_line().unwrap();
        assert_eq!((a.gsi(), b.gsi()), (IOAPIC_PINS, IOAPIC_PINS + 1));
        // Allocated, so the table knows them.
        routing.set_msi(b.gsi(), Some((0xfee0_0000, 0x41))).unwrap();
    }

    #[test]
    fn gsi_out_of_range_is_refused() {
        assert!(matches!(IrqLine::new(24), Err(Error::InvalidGsi(24))));
    }
}
