//! ACPI at boot: the tables (built by `tvm_arch_x86::acpi`) and the one piece of ACPI
//! fixed hardware the FADT declares, the PM1a register block ([`tvm_legacy::AcpiPm`]),
//! through which the guest powers off (S5).

use std::sync::{Arc, Mutex};

use log::info;
use tvm_arch_x86::acpi::{
    AcpiConfig, PciIrq, PM1A_CNT_BLK_PORT, PM1A_EVT_BLK_PORT, PM1_CNT_LEN, PM1_EVT_LEN, SLP_TYP_S5,
};
use tvm_bus::{register_pio_device, IoManager};
use tvm_legacy::{AcpiPm, PM1_BLOCK_LEN, PM1_CNT_OFFSET};
use tvm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::{Error, Result};

// The FADT puts the control register right after the event block, where the device has it.
const _: () = assert!(PM1A_CNT_BLK_PORT == PM1A_EVT_BLK_PORT + PM1_CNT_OFFSET);
const _: () = assert!(PM1_EVT_LEN as u16 + PM1_CNT_LEN as u16 == PM1_BLOCK_LEN);

/// Writes the ACPI tables for the vCPUs with `apic_ids` and the PCI devices' INTx wiring
/// (unless `write_tables` is false: a restored guest has its tables in memory), and puts
/// the PM1a block on the port bus. Returns the block's power-off EventFd, for the event
/// loop.
///
/// # Errors
/// The tables do not fit or cannot be written, the PM1 ports are taken, or an EventFd
/// cannot be created.
pub(crate) fn setup_acpi(
    io: &mut IoManager,
    mem: &GuestMemoryMmap,
    apic_ids: &[u8],
    pci_irqs: &[PciIrq],
    write_tables: bool,
) -> Result<EventFd> {
    if write_tables {
        let tables =
            tvm_arch_x86::acpi::setup_acpi_tables(mem, &AcpiConfig { apic_ids, pci_irqs })?;
        info!(
            "acpi tables: rsdp {:#x}, xsdt {:#x}, fadt {:#x}, madt {:#x}, dsdt {:#x}, end {:#x}",
            tables.rsdp.0, tables.xsdt.0, tables.fadt.0, tables.madt.0, tables.dsdt.0, tables.end.0
        );
    }
    let pm = AcpiPm::new(SLP_TYP_S5)?;
    let poweroff_evt = pm.poweroff_evt().try_clone().map_err(Error::EventFd)?;
    register_pio_device(
        io,
        PM1A_EVT_BLK_PORT,
        PM1_BLOCK_LEN,
        Arc::new(Mutex::new(pm)),
    )?;
    Ok(poweroff_evt)
}
