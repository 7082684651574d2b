//! The GSI routing table: the legacy pins of the PIC and IOAPIC, plus MSI routes for
//! MSI-X vectors.
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, so the table keeps KVM's default legacy
//! routes (GSI 0..15 to both the PIC and the IOAPIC, 16..23 to the IOAPIC) and adds one MSI
//! route per allocated GSI (from 24 up). A device's MSI-X vector then becomes an irqfd on
//! that GSI: the device writes an EventFd, KVM delivers the message.

use std::collections::BTreeMap;

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;

use crate::{Error, IrqLine, Result, IOAPIC_PINS};

/// KVM's limit on routing entries (KVM_MAX_IRQ_ROUTES).
pub const MAX_IRQ_ROUTES: u32 = 4096;

/// Where one GSI goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// A pin of an in-kernel interrupt controller (`KVM_IRQCHIP_*`).
    Irqchip {
        /// Which chip.
        chip: u32,
        /// Which pin.
        pin: u32,
    },
    /// An MSI message.
    Msi {
        /// Message address.
        address: u64,
        /// Message data.
        data: u32,
    },
}

/// The routing table and the GSI allocator for MSI routes.
#[derive(Debug)]
pub struct GsiRouting {
    legacy: Vec<(u32, Route)>,
    msi: BTreeMap<u32, Option<Route>>,
    next_gsi: u32,
}

impl Default for GsiRouting {
    fn default() -> Self {
        Self::new()
    }
}

impl GsiRouting {
    /// The default legacy routes and no MSI routes.
    pub fn new() -> Self {
        let mut legacy = Vec::new();
        for gsi in 0..IOAPIC_PINS {
            if gsi < 16 && gsi != 2 {
                let chip = if gsi < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                legacy.push((gsi, Route::Irqchip { chip, pin: gsi % 8 }));
            }
            legacy.push((
                gsi,
                Route::Irqchip {
                    chip: KVM_IRQCHIP_IOAPIC,
                    pin: gsi,
                },
            ));
        }
        GsiRouting {
            legacy,
            msi: BTreeMap::new(),
            next_gsi: IOAPIC_PINS,
        }
    }

    /// Reserves a GSI for an MSI route (not routed until [`GsiRouting::set_msi`]).
    pub fn allocate_msi_gsi(&mut self) -> Result<u32> {
        if self.next_gsi >= MAX_IRQ_ROUTES {
            return Err(Error::GsiExhausted);
        }
        let gsi = self.next_gsi;
        self.next_gsi += 1;
        self.msi.insert(gsi, None);
        Ok(gsi)
    }

    /// Reserves a GSI for an MSI route, as [`GsiRouting::allocate_msi_gsi`] does, and
    /// returns a line on it: an MSI-X vector's irqfd, once [registered](IrqLine::register)
    /// after the table is [applied](GsiRouting::apply).
    pub fn allocate_msi_line(&mut self) -> Result<IrqLine> {
        let gsi = self.allocate_msi_gsi()?;
        IrqLine::on_gsi(gsi)
    }

    /// Routes `gsi` (from [`GsiRouting::allocate_msi_gsi`]) to an MSI message, or unroutes it
    /// with `None` (a masked or unprogrammed vector).
    pub fn set_msi(&mut self, gsi: u32, msg: Option<(u64, u32)>) -> Result<()> {
        let slot = self.msi.get_mut(&gsi).ok_or(Error::UnknownGsi(gsi))?;
        *slot = msg.map(|(address, data)| Route::Msi { address, data });
        Ok(())
    }

    /// Every route, legacy first, in GSI order.
    pub fn routes(&self) -> Vec<(u32, Route)> {
        let mut all = self.legacy.clone();
        all.extend(
            self.msi
                .iter()
                .filter_map(|(gsi, r)| r.map(|route| (*gsi, route))),
        );
        all
    }

    /// The table as `kvm_irq_routing_entry`s.
    pub fn kvm_entries(&self) -> Vec<kvm_irq_routing_entry> {
        self.routes()
            .into_iter()
            .map(|(gsi, route)| match route {
                Route::Irqchip { chip, pin } => kvm_irq_routing_entry {
                    gsi,
                    type_: KVM_IRQ_ROUTING_IRQCHIP,
                    u: kvm_irq_routing_entry__bindgen_ty_1 {
                        irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin },
                    },
                    ..Default::default()
                },
                Route::Msi { address, data } => kvm_irq_routing_entry {
                    gsi,
                    type_: KVM_IRQ_ROUTING_MSI,
                    u: kvm_irq_routing_entry__bindgen_ty_1 {
                        msi: kvm_irq_routing_msi {
                            address_lo: address as u32,
                            address_hi: (address >> 32) as u32,
                            data,
                            ..Default::default()
                        },
                    },
                    ..Default::default()
                },
            })
            .collect()
    }

    /// Installs the table with KVM_SET_GSI_ROUTING.
    pub fn apply(&self, vm: &VmFd) -> Result<()> {
        let entries = self.kvm_entries();
        let table = KvmIrqRouting::from_entries(&entries).map_err(|_| Error::GsiExhausted)?;
        vm.set_gsi_routing(&table).map_err(Error::SetGsiRouting)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_table_matches_kvm() {
        let r = GsiRouting::new();
        let routes = r.routes();
        // 15 PIC routes (GSI 2 is the cascade) + 24 IOAPIC routes.
        assert_eq!(routes.len(), 15 + 24);
        assert!(routes.contains(&(
            4,
            Route::Irqchip {
                chip: KVM_IRQCHIP_PIC_MASTER,
                pin: 4
            }
        )));
        assert!(routes.contains(&(
            4,
            Route::Irqchip {
                chip: KVM_IRQCHIP_IOAPIC,
                pin: 4
            }
        )));
        assert!(routes.contains(&(
            12,
            Route::Irqchip {
                chip: KVM_IRQCHIP_PIC_SLAVE,
                pin: 4
            }
        )));
        assert!(!routes.iter().any(|(g, r)| *g == 2
            && matches!(r, Route::Irqchip { chip, .. } if *chip != KVM_IRQCHIP_IOAPIC)));
        assert!(routes.iter().all(|(g, _)| *g < 24));
    }

    #[test]
    fn msi_routes_come_and_go() {
        let mut r = GsiRouting::new();
        let a = r.allocate_msi_gsi().unwrap();
        let b = r.allocate_msi_gsi().unwrap();
        assert_eq!((a, b), (24, 25));
        // Allocated but unprogrammed: not in the table.
        assert_eq!(r.routes().len(), 39);
        r.set_msi(a, Some((0xfee0_0000, 0x4021))).unwrap();
        r.set_msi(b, Some((0x1_fee0_1000, 0x22))).unwrap();
        let e = r.kvm_entries();
        assert_eq!(e.len(), 41);
        let last = e[e.len() - 1];
        assert_eq!((last.gsi, last.type_), (25, KVM_IRQ_ROUTING_MSI));
        // SAFETY: type_ is KVM_IRQ_ROUTING_MSI, so `msi` is the member that was written.
        let msi = unsafe { last.u.msi };
        assert_eq!(
            (msi.address_lo, msi.address_hi, msi.data),
            (0xfee0_1000, 1, 0x22)
        );
        r.set_msi(a, None).unwrap();
        assert_eq!(r.routes().len(), 40);
        assert!(matches!(r.set_msi(99, None), Err(Error::UnknownGsi(99))));
        assert!(KvmIrqRouting::from_entries(&r.kvm_entries()).is_ok());
    }
}
