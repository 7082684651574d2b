//! ACPI at boot: the tables (built by `tvm_arch_x86::acpi`) and the one piece of ACPI
//! fixed hardware the FADT declares, the PM1a register block, through which the guest
//! powers off (S5).

use std::sync::Arc;

use log::{debug, info};
use tvm_arch_x86::acpi::{
    AcpiConfig, PciIrq, PM1A_CNT_BLK_PORT, PM1A_EVT_BLK_PORT, PM1_CNT_LEN, PM1_CNT_SCI_EN,
    PM1_CNT_SLP_EN, PM1_CNT_SLP_TYP_MASK, PM1_CNT_SLP_TYP_SHIFT, PM1_EVT_LEN, SLP_TYP_S5,
};
use tvm_bus::{register_pio_device, IoManager};
use tvm_memory::GuestMemoryMmap;
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

use crate::vcpu::{ExitReason, ExitSignal};
use crate::Result;

/// Ports the PM1a block spans: the event block (status, enable), then the control register.
const PM1_PORTS: u16 = PM1_EVT_LEN as u16 + PM1_CNT_LEN as u16;
// The FADT puts the control register right after the event block; one device serves both.
const _: () = assert!(PM1A_CNT_BLK_PORT == PM1A_EVT_BLK_PORT + PM1_EVT_LEN as u16);

/// Byte offsets in the block.
const PM1_EN_OFFSET: u64 = 2;
const PM1_CNT_OFFSET: u64 = 4;

/// The PM1a event and control registers (ACPI 6.5, 4.8.3.1 and 4.8.3.2), as far as this
/// machine has them:
///
/// - PM1 status reads 0: none of its events (timer, buttons, RTC, wake) exists here, so
///   there is nothing to clear.
/// - PM1 enable keeps what the guest writes (ACPICA checks that the global-lock enable bit
///   sticks).
/// - PM1 control reads SCI_EN as 1 (always in ACPI mode) and keeps SLP_TYP. Writing SLP_EN
///   with SLP_TYP = [`SLP_TYP_S5`] (what `\_S5` says) powers the machine off: the VMM
///   stops with [`ExitReason::GuestPowerOff`]. Other sleep types are not offered (the DSDT
///   has no `\_S1`..`\_S4`) and are ignored.
///
/// Registers are 16 bits wide; byte and word accesses both work.
#[derive(Debug)]
pub struct AcpiPm {
    enable: u16,
    control: u16,
    exit: Arc<ExitSignal>,
}

impl AcpiPm {
    /// A PM1a block that reports a power-off to `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        AcpiPm {
            enable: 0,
            control: PM1_CNT_SCI_EN,
            exit,
        }
    }

    fn read_byte(&self, offset: u64) -> u8 {
        let (reg, shift) = match offset {
            0 | 1 => (0, offset),
            2 | 3 => (self.enable, offset - PM1_EN_OFFSET),
            4 | 5 => (self.control, offset - PM1_CNT_OFFSET),
            _ => return 0xff,
        };
        (reg >> (8 * shift)) as u8
    }

    fn write_byte(&mut self, offset: u64, value: u8) {
        let set = |reg: u16, shift: u64| {
            let shift = 8 * shift;
            (reg & !(0xff << shift)) | (u16::from(value) << shift)
        };
        match offset {
            // Status: write 1 to clear, and no bit is ever set.
            0 | 1 => {}
            2 | 3 => self.enable = set(self.enable, offset - PM1_EN_OFFSET),
            4 | 5 => {
                let written = set(self.control, offset - PM1_CNT_OFFSET);
                // SCI_EN is fixed; SLP_EN is write-only and acts now.
                self.control = (written | PM1_CNT_SCI_EN) & !PM1_CNT_SLP_EN;
                if written & PM1_CNT_SLP_EN != 0 {
                    self.sleep((written & PM1_CNT_SLP_TYP_MASK) >> PM1_CNT_SLP_TYP_SHIFT);
                }
            }
            _ => debug!("acpi pm: write past the pm1 block at offset {offset}"),
        }
    }

    fn sleep(&self, slp_typ: u16) {
        if slp_typ == SLP_TYP_S5 {
            info!("guest powered off through acpi (s5)");
            self.exit.request(ExitReason::GuestPowerOff);
        } else {
            debug!("acpi pm: sleep type {slp_typ} is not supported, ignored");
        }
    }
}

impl MutDevicePio for AcpiPm {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.read_byte(u64::from(offset) + i as u64);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        // Low byte first, so a word write sets SLP_TYP before SLP_EN acts.
        for (i, b) in data.iter().enumerate() {
            self.write_byte(u64::from(offset) + i as u64, *b);
        }
    }
}

/// Writes the ACPI tables for `cpu_count` vCPUs and the PCI devices' INTx wiring, and puts
/// the PM1a block on the port bus.
///
/// # Errors
/// The tables do not fit or cannot be written, or the PM1 ports are taken.
pub(crate) fn setup_acpi(
    io: &mut IoManager,
    mem: &GuestMemoryMmap,
    cpu_count: u8,
    pci_irqs: &[PciIrq],
    exit: Arc<ExitSignal>,
) -> Result<()> {
    let tables = tvm_arch_x86::acpi::setup_acpi_tables(
        mem,
        &AcpiConfig {
            cpu_count,
            pci_irqs,
        },
    )?;
    info!(
        "acpi tables: rsdp {:#x}, xsdt {:#x}, fadt {:#x}, madt {:#x}, dsdt {:#x}, end {:#x}",
        tables.rsdp.0, tables.xsdt.0, tables.fadt.0, tables.madt.0, tables.dsdt.0, tables.end.0
    );
    register_pio_device(
        io,
        PM1A_EVT_BLK_PORT,
        PM1_PORTS,
        Arc::new(std::sync::Mutex::new(AcpiPm::new(exit))),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn pm() -> (AcpiPm, Arc<ExitSignal>, EventFd) {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let exit = Arc::new(ExitSignal::new(evt.try_clone().unwrap()));
        (AcpiPm::new(exit.clone()), exit, evt)
    }

    fn rd(pm: &mut AcpiPm, offset: u16, len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len];
        pm.pio_read(PioAddress(PM1A_EVT_BLK_PORT), offset, &mut d);
        d
    }

    fn wr(pm: &mut AcpiPm, offset: u16, data: &[u8]) {
        pm.pio_write(PioAddress(PM1A_EVT_BLK_PORT), offset, data);
    }

    #[test]
    fn status_reads_zero_enable_sticks_sci_en_is_fixed() {
        let (mut pm, exit, evt) = pm();
        assert_eq!(rd(&mut pm, 0, 2), [0, 0]);
        wr(&mut pm, 0, &[0xff, 0xff]);
        assert_eq!(rd(&mut pm, 0, 2), [0, 0]);
        // The global-lock enable (bit 5) and the power-button enable (bit 8) stick.
        wr(&mut pm, 2, &[0x20, 0x01]);
        assert_eq!(rd(&mut pm, 2, 2), [0x20, 0x01]);
        assert_eq!(rd(&mut pm, 3, 1), [0x01]);
        // Control: SCI_EN reads 1 even after a write of 0.
        assert_eq!(rd(&mut pm, 4, 2), [1, 0]);
        wr(&mut pm, 4, &[0, 0]);
        assert_eq!(rd(&mut pm, 4, 2), [1, 0]);
        // A dword read of the event block sees both registers.
        assert_eq!(rd(&mut pm, 0, 4), [0, 0, 0x20, 0x01]);
        // Past the block: all ones.
        assert_eq!(rd(&mut pm, 6, 1), [0xff]);
        assert_eq!(exit.reason(), None);
        assert!(evt.read().is_err(), "nothing signalled");
    }

    #[test]
    fn slp_en_with_s5_powers_off() {
        let (mut pm, exit, evt) = pm();
        // What ACPICA does: SLP_TYP first, then SLP_TYP | SLP_EN, as 16-bit writes.
        let typ = (SLP_TYP_S5 << PM1_CNT_SLP_TYP_SHIFT) | PM1_CNT_SCI_EN;
        wr(&mut pm, 4, &typ.to_le_bytes());
        assert_eq!(exit.reason(), None);
        assert_eq!(
            u16::from_le_bytes(rd(&mut pm, 4, 2).try_into().unwrap()),
            typ
        );
        wr(&mut pm, 4, &(typ | PM1_CNT_SLP_EN).to_le_bytes());
        assert_eq!(exit.reason(), Some(ExitReason::GuestPowerOff));
        assert_eq!(evt.read().unwrap(), 1);
        // SLP_EN reads back as 0.
        assert_eq!(rd(&mut pm, 5, 1)[0] & 0x20, 0);
    }

    #[test]
    fn s5_by_a_single_byte_write_and_other_sleep_types_ignored() {
        let (mut pm, exit, _evt) = pm();
        // SLP_EN with SLP_TYP 1 (S1 is not offered): ignored.
        wr(&mut pm, 5, &[(1 << 2) | 0x20]);
        assert_eq!(exit.reason(), None);
        // High byte alone: SLP_TYP 5 in bits 2..4, SLP_EN in bit 5.
        wr(&mut pm, 5, &[(5 << 2) | 0x20]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestPowerOff));
    }
}
