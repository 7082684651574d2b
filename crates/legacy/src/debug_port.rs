// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The POST code port.

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

/// The POST code port (one byte).
pub const DEBUG_PORT: u16 = 0x80;

/// The POST code port: Linux writes it for I/O delays (`outb_p`); writes are accepted and
/// ignored, reads return 0. Handling it here keeps those writes off the unhandled-port path.
#[derive(Debug, Default)]
pub struct DebugPort;

impl MutDevicePio for DebugPort {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&mut self, _base: PioAddress, _offset: PioAddressOffset, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_zero_and_ignores_writes() {
        let mut p = DebugPort;
        p.pio_write(PioAddress(DEBUG_PORT), 0, &[0x42]);
        let mut d = [0xffu8; 2];
        p.pio_read(PioAddress(DEBUG_PORT), 0, &mut d);
        assert_eq!(d, [0, 0]);
    }
}
