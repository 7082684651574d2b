// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The PC legacy devices a Linux guest touches besides the UART, as small state machines
//! on the port-I/O bus ([`vm_device::MutDevicePio`]) that never touch KVM:
//!
//! - [`I8042`]: the keyboard controller, with a minimal PS/2 keyboard and no mouse. Linux
//!   probes it at boot, and `reboot=k` (or the FADT reset register) resets the machine
//!   through it (command 0xFE), which the device reports on its reset [`EventFd`]. The
//!   keyboard answers atkbd's commands and presses Ctrl-Alt-Del when the VMM asks
//!   ([`I8042::trigger_ctrl_alt_del`]); its bytes raise IRQ 1 on the keyboard interrupt
//!   [`EventFd`], which the VMM registers as an irqfd.
//! - [`Cmos`]: the MC146818 real-time clock and its NVRAM at 0x70/0x71, reading the host's
//!   UTC time.
//! - [`DebugPort`]: the POST code port 0x80, which Linux writes for I/O delays.
//! - [`AcpiPm`]: the ACPI PM1a event and control registers the FADT declares; the guest
//!   powers off (S5) through them, which the device reports on its power-off [`EventFd`].
//! - [`Pvpanic`]: QEMU's ISA pvpanic port; the guest's pvpanic driver writes it when the
//!   kernel panics, which the device reports on its panic [`EventFd`].
//!
//! What it does not do: place the devices on a bus, watch the EventFds, or decide what a
//! reset, a power-off or a panic means for the VM. The VMM registers the ports, adds the
//! EventFds to its event loop and maps each to its own exit reason. Nothing here prints; it
//! logs through `log`, and what a guest can repeat is logged at `debug!` or once.
//!
//! [`EventFd`]: vmm_sys_util::eventfd::EventFd
//!
//! # Example
//!
//! ```
//! use tvm_legacy::{I8042, I8042_COMMAND_PORT};
//! use vm_device::bus::PioAddress;
//! use vm_device::MutDevicePio;
//!
//! # fn main() -> tvm_legacy::Result<()> {
//! let mut i8042 = I8042::new()?;
//! // The VMM adds this to its event loop; a write means "reset the machine".
//! let reset = i8042.reset_evt().try_clone().map_err(tvm_legacy::Error::CreateEventFd)?;
//!
//! // A vCPU exit: the guest writes 0xFE (pulse the reset line) to port 0x64.
//! i8042.pio_write(PioAddress(I8042_COMMAND_PORT), 0, &[0xfe]);
//! assert_eq!(reset.read().unwrap(), 1);
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod cmos;
mod debug_port;
mod i8042;
mod pm;
mod pvpanic;

pub use cmos::{Cmos, CMOS_PORT, CMOS_PORT_LEN};
pub use debug_port::{DebugPort, DEBUG_PORT};
pub use i8042::{I8042, I8042_COMMAND_PORT, I8042_DATA_PORT};
pub use pm::{
    AcpiPm, PM1_BLOCK_LEN, PM1_CNT_OFFSET, PM1_CNT_SCI_EN, PM1_CNT_SLP_EN, PM1_CNT_SLP_TYP_MASK,
    PM1_CNT_SLP_TYP_SHIFT, PM1_EN_OFFSET,
};
pub use pvpanic::{Pvpanic, PVPANIC_CRASH_LOADED, PVPANIC_PANICKED};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Errors of the legacy devices.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A device's EventFd could not be created.
    #[error("failed to create an eventfd")]
    CreateEventFd(#[source] std::io::Error),
    /// The i8042 keyboard queue lacks room for all the bytes of a key sequence (the guest
    /// has not read the keys sent before); none were queued.
    #[error(
        "failed to queue {needed} keyboard bytes, the i8042 keyboard queue has room for {free}"
    )]
    QueueKeysFull {
        /// Bytes the key sequence needs.
        needed: usize,
        /// Bytes the queue has room for.
        free: usize,
    },
    /// The guest disabled the keyboard (PS/2 command 0xF5), which sends no keys until the
    /// guest enables it again (0xF4); none were queued.
    #[error("failed to queue keys, the guest has disabled the i8042 keyboard")]
    QueueKeysDisabled,
}

/// Result of the legacy devices.
pub type Result<T> = std::result::Result<T, Error>;

/// A non-blocking EventFd, for a device's signal.
fn eventfd() -> Result<EventFd> {
    EventFd::new(EFD_NONBLOCK).map_err(Error::CreateEventFd)
}
