//! Port-I/O and MMIO dispatch, and a PCI root complex, for the VMM.
//!
//! This crate does two things:
//!
//! * **Dispatch.** It re-exports vm-device's [`IoManager`], which maps port-I/O and MMIO
//!   ranges to devices, and adds [`register_pio_device`] and [`register_mmio_device`], which
//!   put an `Arc<Mutex<D>>` on the bus and turn vm-device's errors into ours (an overlapping
//!   range is refused with an error naming it). A vCPU exit handler calls
//!   [`PioManager::pio_read`] / [`MmioManager::mmio_write`] and friends on the manager; an
//!   access that hits no device returns an error, which the caller (the VMM's exit
//!   handler) logs, at `trace!` for ports and `debug!` for MMIO, and answers with `0xff`
//!   bytes.
//! * **PCI.** [`PciRoot`] is bus 0 of a PCI root complex reached through configuration
//!   mechanism #1 (ports `0xcf8..=0xcff`). It holds up to 32 [`PciDevice`]s, one per slot,
//!   function 0 only; slot 0 is the [`PciHostBridge`]. [`PciConfigSpace`] is a reusable
//!   256-byte type-0 configuration space with writable masks, BAR sizing and a capability
//!   list, for device crates (virtio-pci) to embed.
//!
//! * **BARs that move.** [`PciMmioWindow`] is one MMIO registration over the addresses
//!   handed to BARs; BARs ([`BarAccess`]) are mapped and unmapped in it while the vCPUs
//!   run, as the guest programs them (inside the window, never over another BAR).
//!
//! It does not talk to KVM or allocate guest addresses for BARs, and it does not decide
//! when a BAR moves: a device crate watches [`PciConfigSpace::bar_addr`] and the command
//! register and moves the mapping (tvm-virtio's `RelocatableBar` does, with the queue-notify
//! ioeventfds).
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use tvm_bus::{
//!     register_pio_device, IoManager, PciRoot, PioAddress, PioManager, PCI_CONFIG_IO_BASE,
//!     PCI_CONFIG_IO_LEN,
//! };
//!
//! let mut io = IoManager::new();
//! let pci = Arc::new(Mutex::new(PciRoot::new()));
//! register_pio_device(&mut io, PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN, pci).unwrap();
//!
//! // The guest selects 00:00.0, register 0, and reads vendor and device ids.
//! let address: u32 = 0x8000_0000;
//! io.pio_write(PioAddress(0xcf8), &address.to_le_bytes()).unwrap();
//! let mut data = [0u8; 4];
//! io.pio_read(PioAddress(0xcfc), &mut data).unwrap();
//! assert_eq!(u32::from_le_bytes(data), 0x0d57_8086);
//!
//! // Nothing is at port 0x80: the VMM logs it and returns 0xff bytes to the guest.
//! assert!(io.pio_read(PioAddress(0x80), &mut data).is_err());
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod config_space;
mod io;
mod pci;
mod root;
mod window;

pub use config_space::{PciBarKind, PciConfigSpace, PciHeaderConfig, NUM_BARS, NUM_CONFIG_REGS};
pub use io::{register_mmio_device, register_pci_window, register_pio_device};
pub use pci::{PciDevice, PciHostBridge, HOST_BRIDGE_DEVICE_ID, PCI_VENDOR_ID_INTEL};
pub use root::{PciRoot, NUM_PCI_SLOTS, PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN};
pub use window::{BarAccess, BarMapError, PciMmioWindow};

pub use vm_device::bus::{
    Error as BusError, MmioAddress, MmioAddressOffset, MmioRange, PioAddress, PioAddressOffset,
    PioRange,
};
pub use vm_device::device_manager::{IoManager, MmioManager, PioManager};
pub use vm_device::{DeviceMmio, DevicePio, MutDeviceMmio, MutDevicePio};

/// Errors of the bus crate.
///
/// Guest accesses never produce these: a bad guest access is logged and ignored. These are
/// errors in how the VMM or a device crate sets things up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A port-I/O range is empty or wraps past 0xffff.
    #[error("invalid port i/o range: base {base:#06x}, length {len:#x}")]
    InvalidPioRange {
        /// First port of the range.
        base: u16,
        /// Length of the range in ports.
        len: u16,
    },
    /// A port-I/O range overlaps one already on the bus.
    #[error("port i/o range {base:#06x}..={last:#06x} overlaps a registered device")]
    PioRangeOverlap {
        /// First port of the refused range.
        base: u16,
        /// Last port of the refused range.
        last: u16,
    },
    /// An MMIO range is empty or wraps past the end of the address space.
    #[error("invalid mmio range: base {base:#x}, length {len:#x}")]
    InvalidMmioRange {
        /// First address of the range.
        base: u64,
        /// Length of the range in bytes.
        len: u64,
    },
    /// An MMIO range overlaps one already on the bus.
    #[error("mmio range {base:#x}..={last:#x} overlaps a registered device")]
    MmioRangeOverlap {
        /// First address of the refused range.
        base: u64,
        /// Last address of the refused range.
        last: u64,
    },
    /// vm-device refused a registration for another reason.
    #[error("failed to register the device on the bus")]
    RegisterDevice(#[source] BusError),
    /// All 32 slots of PCI bus 0 are taken.
    #[error("no free device slot on pci bus 0")]
    NoFreePciSlot,
    /// A BAR index is not 0..=5, or a 64-bit BAR starts at index 5.
    #[error("bar index {0} is out of range")]
    InvalidBarIndex(usize),
    /// A BAR slot (or the upper half of a 64-bit BAR) is already registered.
    #[error("bar {0} is already registered")]
    BarInUse(usize),
    /// A BAR was registered with a size that is not a power of two in the allowed range.
    #[error("invalid size {size:#x} for bar {index}")]
    InvalidBarSize {
        /// BAR index.
        index: usize,
        /// Requested size in bytes.
        size: u64,
    },
    /// A BAR was asked about or programmed without being registered first.
    #[error("bar {0} is not registered")]
    BarNotRegistered(usize),
    /// A BAR address is not aligned to its size or does not fit the BAR kind.
    #[error("address {addr:#x} is not valid for bar {index}")]
    InvalidBarAddress {
        /// BAR index.
        index: usize,
        /// Refused address.
        addr: u64,
    },
    /// A capability is shorter than its 2-byte header.
    #[error("capability of {0} bytes is shorter than its header")]
    InvalidCapability(usize),
    /// No room is left in the 256-byte config space for a capability.
    #[error("no room for a {0}-byte capability in config space")]
    NoCapabilitySpace(usize),
    /// A config register index is not 0..64.
    #[error("config register {0} is out of range")]
    InvalidConfigRegister(usize),
}

/// Result of the bus crate's fallible operations.
pub type Result<T> = std::result::Result<T, Error>;
