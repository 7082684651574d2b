// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The guest's serial console: a 16550A/8250 UART on [`vm_superio::Serial`], placed on the
//! port-I/O bus through [`vm_device::MutDevicePio`], with host input and output that suit a
//! real Linux guest (printk and user space, with THRE and receive interrupts).
//!
//! What it does:
//! - [`SerialDevice`]: the UART registers. Its interrupt is an [`EventFd`] that the VMM
//!   registers as an irqfd on COM1's GSI (4, `tvm_arch_x86::layout::COM1_GSI`); this crate
//!   never touches KVM.
//!
//! [`EventFd`]: vmm_sys_util::eventfd::EventFd
//! - [`NonBlockingWriter`]: where the guest's output goes. The vCPU only copies into a bounded
//!   buffer; a `serial-out` thread does the blocking writes to stdout, and bytes that do not
//!   fit are dropped and counted rather than stalling the guest.
//! - [`SerialInput`]: an event-manager subscriber feeding stdin to the receive FIFO no faster
//!   than the guest reads it, and turning Ctrl-A x into a write of the VMM's exit [`EventFd`].
//!
//! What it does not do: put the terminal in raw mode, register the irqfd or the PIO range,
//! or print anything itself (it logs through `log`).
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//!
//! use tvm_serial::{
//!     NonBlockingWriter, SerialDevice, COM1_PORT_BASE, DEFAULT_OUTPUT_BUFFER_BYTES,
//! };
//! use vm_device::bus::PioAddress;
//! use vm_device::MutDevicePio;
//!
//! # fn main() -> tvm_serial::Result<()> {
//! let (writer, output) = NonBlockingWriter::spawn(std::io::sink(), DEFAULT_OUTPUT_BUFFER_BYTES)?;
//! let serial = Arc::new(Mutex::new(SerialDevice::new(writer)?));
//!
//! // The VMM registers this EventFd as an irqfd on GSI 4 (`tvm_arch_x86::layout::COM1_GSI`).
//! let irq = serial.lock().unwrap().interrupt_evt().try_clone().unwrap();
//!
//! // A vCPU exit on port 0x3F9 (IER): the guest enables the THRE interrupt...
//! serial.lock().unwrap().pio_write(PioAddress(COM1_PORT_BASE), 1, &[0x02]);
//! assert_eq!(irq.read().unwrap(), 1);
//! // ...and writes 'A' to THR (port 0x3F8).
//! serial.lock().unwrap().pio_write(PioAddress(COM1_PORT_BASE), 0, b"A");
//!
//! // At shutdown: flush what the guest wrote, waiting at most a second.
//! drop(serial);
//! assert!(output.shutdown(Duration::from_secs(1)));
//! # Ok(())
//! # }
//! ```
//!
//! Input: `SerialInput::new(serial, stdin_source()?, exit_evt)` added to the VMM's
//! `EventManager` (see [`SerialInput`]).

#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod device;
mod escape;
mod input;
mod output;

use std::io;

pub use device::{EventFdTrigger, SerialDevice, SERIAL_PORT_SIZE};
pub use input::{stdin_source, SerialInput};
pub use output::{NonBlockingWriter, OutputThread, DEFAULT_OUTPUT_BUFFER_BYTES};

/// Base of the COM1 port range (`0x3F8..=0x3FF`), where Linux looks for ttyS0.
pub const COM1_PORT_BASE: u16 = 0x3F8;

/// Errors of the serial console.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An eventfd could not be created.
    #[error("failed to create an eventfd")]
    CreateEventFd(#[source] io::Error),
    /// An eventfd could not be duplicated.
    #[error("failed to clone an eventfd")]
    CloneEventFd(#[source] io::Error),
    /// The `serial-out` thread could not be started.
    #[error("failed to spawn the serial output thread")]
    SpawnOutputThread(#[source] io::Error),
    /// The `serial-out` thread's start hook failed (e.g. it could not install its seccomp
    /// filter); the thread ended without writing anything.
    #[error("the serial output thread failed to start: {0}")]
    OutputThreadInit(String),
    /// A saved UART state that no 16550A can be in (more bytes than its FIFO holds).
    #[error("the saved serial state has {0} bytes in a 64-byte receive fifo")]
    InvalidState(usize),
    /// stdin could not be duplicated.
    #[error("failed to duplicate stdin")]
    DupStdin(#[source] io::Error),
}

/// Result of the serial console's fallible operations.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
pub(crate) mod test_utils {
    use std::io::{self, Write};
    use std::sync::{Arc, Mutex};

    /// A writer whose bytes the test can read back, shared between clones.
    #[derive(Debug, Clone, Default)]
    pub(crate) struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl SharedBuf {
        pub(crate) fn contents(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }
    }

    impl Write for SharedBuf {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}
