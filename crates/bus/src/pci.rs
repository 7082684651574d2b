//! The `PciDevice` trait and the host bridge at 00:00.0.

use crate::config_space::{PciConfigSpace, PciHeaderConfig};

/// Intel's PCI vendor ID.
pub const PCI_VENDOR_ID_INTEL: u16 = 0x8086;
/// Device ID of the host bridge, the one Cloud Hypervisor uses.
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0d57;

/// Base class 0x06: bridge device.
const PCI_CLASS_BRIDGE: u8 = 0x06;
/// Subclass 0x00 of the bridge class: host bridge.
const PCI_SUBCLASS_HOST_BRIDGE: u8 = 0x00;

/// A function on the PCI bus, as seen through its configuration space.
///
/// Both methods are called from a vCPU thread with guest-chosen arguments, so they must not
/// panic on any input: an out-of-range register or a bad write is logged at `debug!` and
/// ignored. [`PciConfigSpace`] implements this trait and does exactly that; device models
/// usually embed one and forward to it.
pub trait PciDevice: Send {
    /// Reads the 32-bit config register `reg` (dword index, `0..64` for the 256-byte space).
    fn config_read(&mut self, reg: usize) -> u32;

    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` (`0..=3`) within config register
    /// `reg`.
    fn config_write(&mut self, reg: usize, offset: u8, data: &[u8]);
}

/// The host bridge at 00:00.0: Intel vendor, device 0x0d57, class "bridge / host bridge",
/// header type 0, no BARs.
#[derive(Clone, Debug)]
pub struct PciHostBridge {
    config: PciConfigSpace,
}

impl PciHostBridge {
    /// Creates the host bridge.
    pub fn new() -> Self {
        PciHostBridge {
            config: PciConfigSpace::new(&PciHeaderConfig {
                vendor_id: PCI_VENDOR_ID_INTEL,
                device_id: HOST_BRIDGE_DEVICE_ID,
                class_code: PCI_CLASS_BRIDGE,
                subclass: PCI_SUBCLASS_HOST_BRIDGE,
                ..Default::default()
            }),
        }
    }
}

impl Default for PciHostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for PciHostBridge {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }

    fn config_write(&mut self, reg: usize, offset: u8, data: &[u8]) {
        self.config.write_reg(reg, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_bridge_identity() {
        let mut hb = PciHostBridge::new();
        assert_eq!(hb.config_read(0), 0x0d57_8086);
        // Class 06, subclass 00, prog-if 00, revision 00.
        assert_eq!(hb.config_read(2), 0x0600_0000);
        // Header type 0, single function.
        assert_eq!((hb.config_read(3) >> 16) & 0xff, 0);
        // No BARs, no capabilities.
        for reg in 4..10 {
            hb.config_write(reg, 0, &[0xff; 4]);
            assert_eq!(hb.config_read(reg), 0);
        }
        assert_eq!(hb.config_read(13), 0);
        hb.config_write(0, 0, &[0; 4]);
        assert_eq!(hb.config_read(0), 0x0d57_8086);
    }
}
