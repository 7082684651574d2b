// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Where everything sits: the regions of BAR 0, the PCI identity of a virtio function, and
//! the capability list that points the driver at the regions (virtio 1.2, 4.1.4).

use tvm_bus::{PciBarKind, PciConfigSpace, PciHeaderConfig};
use virtio_bindings::virtio_ids::{VIRTIO_ID_BLOCK, VIRTIO_ID_NET};

use crate::{Error, Result};

/// Size of BAR 0 (64-bit, prefetchable not set): every region below lives in it.
pub const BAR_SIZE: u64 = 0x8000;
/// Offset of the common configuration structure in BAR 0.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
/// Length of the common configuration structure (up to `queue_device`).
pub(super) const COMMON_CFG_LEN: u64 = 0x38;
/// Offset of the ISR status byte in BAR 0.
pub const ISR_OFFSET: u64 = 0x1000;
pub(super) const ISR_LEN: u64 = 1;
/// Offset of the device-specific configuration in BAR 0.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
pub(super) const DEVICE_CFG_LEN: u64 = 0x1000;
/// Offset of the notification area in BAR 0; queue `i` is notified at
/// `NOTIFY_OFFSET + NOTIFY_OFF_MULTIPLIER * i`.
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub(super) const NOTIFY_LEN: u64 = 0x1000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Offset of the MSI-X table in BAR 0 (room for 512 vectors).
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// Offset of the MSI-X pending-bit array in BAR 0.
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
pub(super) const MSIX_PBA_LEN: u64 = 0x1000;

/// Most queues a device may have: one MSI-X vector each plus the config vector must fit
/// the table, and each notify address the notify area.
pub(super) const MAX_QUEUES: usize = 256;

const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Subsystem IDs as QEMU gives modern virtio devices.
const VIRTIO_PCI_SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x1100;

pub(super) const PCI_CAP_ID_VNDR: u8 = 0x09;
pub(super) const PCI_CAP_ID_MSIX: u8 = 0x11;
pub(super) const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
pub(super) const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
pub(super) const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
pub(super) const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
/// MSI-X message control, bit 15: MSI-X enable.
pub(super) const MSIX_CTRL_ENABLE: u16 = 1 << 15;
/// MSI-X message control, bit 14: function mask.
pub(super) const MSIX_CTRL_FUNCTION_MASK: u16 = 1 << 14;
/// Command register bit 1: memory-space decoding enabled.
pub(super) const PCI_COMMAND_MEMORY: u16 = 1 << 1;
/// Command register bit 10: INTx disable.
pub(super) const PCI_COMMAND_INTX_DISABLE: u16 = 1 << 10;
pub(super) const COMMAND_REG: usize = 1;

fn vendor_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let cap_len: u8 = if extra.is_some() { 20 } else { 16 };
    let mut cap = vec![PCI_CAP_ID_VNDR, 0, cap_len, cfg_type, 0, 0, 0, 0];
    // Offsets and lengths are constants below BAR_SIZE.
    cap.extend_from_slice(&(offset as u32).to_le_bytes());
    cap.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(x) = extra {
        cap.extend_from_slice(&x.to_le_bytes());
    }
    cap
}

/// The config space of a virtio function of type `device_type` with `num_vectors` MSI-X
/// vectors (at least 1): its identity, BAR 0 of [`BAR_SIZE`], the four virtio capabilities
/// and the MSI-X capability. Returns it with the register index of the MSI-X capability.
pub(super) fn config_space(device_type: u32, num_vectors: u16) -> Result<(PciConfigSpace, usize)> {
    let (class_code, subclass) = match device_type {
        // Network controller, ethernet.
        VIRTIO_ID_NET => (0x02, 0x00),
        // Mass storage controller, other.
        VIRTIO_ID_BLOCK => (0x01, 0x80),
        // Unclassified.
        _ => (0xff, 0x00),
    };
    let mut config = PciConfigSpace::new(&PciHeaderConfig {
        vendor_id: VIRTIO_PCI_VENDOR_ID,
        device_id: VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(device_type as u16),
        revision_id: 1,
        prog_if: 0,
        subclass,
        class_code,
        subsystem_vendor_id: VIRTIO_PCI_SUBSYSTEM_VENDOR_ID,
        subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
        interrupt_pin: 1,
    });
    config
        .add_bar(0, BAR_SIZE, PciBarKind::Mmio64)
        .map_err(Error::SetupConfigSpace)?;
    let caps = [
        vendor_cap(
            VIRTIO_PCI_CAP_COMMON_CFG,
            COMMON_CFG_OFFSET,
            COMMON_CFG_LEN,
            None,
        ),
        vendor_cap(
            VIRTIO_PCI_CAP_NOTIFY_CFG,
            NOTIFY_OFFSET,
            NOTIFY_LEN,
            Some(NOTIFY_OFF_MULTIPLIER),
        ),
        vendor_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, ISR_LEN, None),
        vendor_cap(
            VIRTIO_PCI_CAP_DEVICE_CFG,
            DEVICE_CFG_OFFSET,
            DEVICE_CFG_LEN,
            None,
        ),
    ];
    for cap in caps {
        config
            .add_capability(&cap)
            .map_err(Error::SetupConfigSpace)?;
    }
    let msg_ctrl = num_vectors - 1;
    let mut msix = vec![PCI_CAP_ID_MSIX, 0];
    msix.extend_from_slice(&msg_ctrl.to_le_bytes());
    // BIR 0 in the low 3 bits; the offsets are 8-byte aligned.
    msix.extend_from_slice(&(MSIX_TABLE_OFFSET as u32).to_le_bytes());
    msix.extend_from_slice(&(MSIX_PBA_OFFSET as u32).to_le_bytes());
    let msix_off = config
        .add_capability(&msix)
        .map_err(Error::SetupConfigSpace)?;
    let msix_cap_reg = msix_off / 4;
    // Message control is the upper half of the capability's first dword: open the
    // enable and function-mask bits.
    config
        .set_writable_mask(
            msix_cap_reg,
            u32::from(MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK) << 16,
        )
        .map_err(Error::SetupConfigSpace)?;
    Ok((config, msix_cap_reg))
}
