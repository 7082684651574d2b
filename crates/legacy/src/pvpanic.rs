// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! QEMU's pvpanic device, ISA flavour: one I/O port.

use log::{debug, error, info};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vmm_sys_util::eventfd::EventFd;

use crate::Result;

/// Event bit: the guest kernel panicked (QEMU `include/hw/misc/pvpanic.h`,
/// Linux `include/uapi/misc/pvpanic.h`).
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// Event bit: the guest loaded a crash kernel and is about to run it (kdump).
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// The events this device reports, as a read of its port returns them.
const SUPPORTED: u8 = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;

/// The pvpanic port, as QEMU's `pvpanic` ISA device has it: the guest finds it through an
/// ACPI device with `_HID` `QEMU0001` (Linux's `pvpanic-mmio` driver binds to that, I/O or
/// memory resource alike).
///
/// - A read returns the events the device supports: [`PVPANIC_PANICKED`] |
///   [`PVPANIC_CRASH_LOADED`]; the driver only sends those.
/// - A write with [`PVPANIC_PANICKED`] set writes the panic EventFd
///   ([`Pvpanic::panic_evt`]) once per such write. [`PVPANIC_CRASH_LOADED`] alone is
///   logged once and changes nothing (the guest goes on into its crash kernel). Other bits
///   are ignored.
///
/// Accesses other than one byte wide read as all ones and are ignored as writes.
#[derive(Debug)]
pub struct Pvpanic {
    panic_evt: EventFd,
    panic_logged: bool,
    crash_loaded_logged: bool,
}

impl Pvpanic {
    /// A pvpanic device.
    ///
    /// # Errors
    /// The panic EventFd cannot be created.
    pub fn new() -> Result<Self> {
        Ok(Pvpanic {
            panic_evt: crate::eventfd()?,
            panic_logged: false,
            crash_loaded_logged: false,
        })
    }

    /// Written (incremented by one) each time the guest reports a panic.
    pub fn panic_evt(&self) -> &EventFd {
        &self.panic_evt
    }
}

impl MutDevicePio for Pvpanic {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = SUPPORTED;
    }

    fn pio_write(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
        let [event] = data else {
            debug!("pvpanic: ignored {}-byte write", data.len());
            return;
        };
        if event & PVPANIC_PANICKED != 0 {
            if !self.panic_logged {
                self.panic_logged = true;
                info!("guest reported a panic through pvpanic");
            }
            if let Err(e) = self.panic_evt.write(1) {
                // Only a full counter (2^64 - 2 panics) makes this fail.
                error!("failed to signal the guest panic: {e}");
            }
        } else if event & PVPANIC_CRASH_LOADED != 0 {
            if !self.crash_loaded_logged {
                self.crash_loaded_logged = true;
                info!("guest loaded a crash kernel (pvpanic crash-loaded)");
            }
        } else {
            debug!("pvpanic: ignored event {event:#x}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORT: u16 = 0x505;

    #[test]
    fn read_offers_panicked_and_crash_loaded() {
        let mut p = Pvpanic::new().unwrap();
        let mut b = [0u8];
        p.pio_read(PioAddress(PORT), 0, &mut b);
        assert_eq!(b, [0x03]);
        let mut two = [0u8; 2];
        p.pio_read(PioAddress(PORT), 0, &mut two);
        assert_eq!(two, [0xff, 0xff]);
    }

    #[test]
    fn panicked_bit_signals_each_time() {
        let mut p = Pvpanic::new().unwrap();
        let evt = p.panic_evt().try_clone().unwrap();
        for nothing in [&[0u8][..], &[PVPANIC_CRASH_LOADED], &[0x04], &[1, 0]] {
            p.pio_write(PioAddress(PORT), 0, nothing);
            assert!(evt.read().is_err(), "{nothing:?} is not a panic");
        }
        p.pio_write(PioAddress(PORT), 0, &[PVPANIC_PANICKED]);
        assert_eq!(evt.read().unwrap(), 1);
        p.pio_write(
            PioAddress(PORT),
            0,
            &[PVPANIC_PANICKED | PVPANIC_CRASH_LOADED],
        );
        p.pio_write(PioAddress(PORT), 0, &[0xff]);
        assert_eq!(evt.read().unwrap(), 2);
    }
}
