//! PCI bus 0 behind configuration mechanism #1 (ports 0xcf8..=0xcff).
//!
//! 0xcf8 is the 32-bit CONFIG_ADDRESS latch: enable (bit 31), bus (23:16), device (15:11),
//! function (10:8), register (7:2). 0xcfc..=0xcff is CONFIG_DATA, a window on the selected
//! dword that takes byte, word and dword accesses at any offset that stays inside it
//! (PCI Local Bus Specification 3.0, section 3.2.2.3.2).

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use log::{debug, trace};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

use crate::pci::{PciDevice, PciHostBridge};
use crate::{Error, Result};

/// First port of the configuration mechanism #1 window (CONFIG_ADDRESS).
pub const PCI_CONFIG_IO_BASE: u16 = 0xcf8;
/// Length of the window: CONFIG_ADDRESS (4 ports) and CONFIG_DATA (4 ports).
pub const PCI_CONFIG_IO_LEN: u16 = 8;
/// Device slots on one PCI bus.
pub const NUM_PCI_SLOTS: usize = 32;

const CONFIG_ENABLE: u32 = 1 << 31;
const DATA_OFFSET: u16 = 4;

/// The fields of a CONFIG_ADDRESS value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ConfigAddress {
    enabled: bool,
    bus: u8,
    device: usize,
    function: u8,
    register: usize,
}

impl ConfigAddress {
    fn parse(value: u32) -> Self {
        ConfigAddress {
            enabled: value & CONFIG_ENABLE != 0,
            bus: ((value >> 16) & 0xff) as u8,
            device: ((value >> 11) & 0x1f) as usize,
            function: ((value >> 8) & 0x7) as u8,
            register: ((value >> 2) & 0x3f) as usize,
        }
    }
}

/// PCI bus 0 with configuration mechanism #1, to be registered at
/// [`PCI_CONFIG_IO_BASE`] for [`PCI_CONFIG_IO_LEN`] ports.
///
/// Holds up to 32 devices, one per slot, function 0 only; [`PciRoot::new`] puts the
/// [`PciHostBridge`] in slot 0. Reads that select nothing (enable bit clear, another bus,
/// an empty slot, a function other than 0) return all ones, and writes there are dropped.
pub struct PciRoot {
    config_address: u32,
    slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>>,
}

impl PciRoot {
    /// Creates bus 0 with the host bridge in slot 0.
    pub fn new() -> Self {
        let mut slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>> = vec![None; NUM_PCI_SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(PciHostBridge::new())));
        PciRoot {
            config_address: 0,
            slots,
        }
    }

    /// Puts `dev` in the lowest free slot and returns the slot (device) number.
    ///
    /// # Errors
    ///
    /// [`Error::NoFreePciSlot`] when all 32 slots are taken.
    pub fn add_device(&mut self, dev: Arc<Mutex<dyn PciDevice>>) -> Result<u8> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(Error::NoFreePciSlot)?;
        self.slots[slot] = Some(dev);
        // Fewer than 32 slots, so the index fits.
        Ok(slot as u8)
    }

    /// The device in `slot`, if any.
    pub fn device(&self, slot: u8) -> Option<Arc<Mutex<dyn PciDevice>>> {
        self.slots.get(usize::from(slot)).cloned().flatten()
    }

    /// The current CONFIG_ADDRESS latch value.
    pub fn config_address(&self) -> u32 {
        self.config_address
    }

    /// The device the latch selects, or `None` when it selects nothing.
    fn selected(&self) -> Option<(ConfigAddress, &Arc<Mutex<dyn PciDevice>>)> {
        let addr = ConfigAddress::parse(self.config_address);
        if !addr.enabled || addr.bus != 0 || addr.function != 0 {
            return None;
        }
        self.slots[addr.device].as_ref().map(|dev| (addr, dev))
    }

    fn config_data_read(&self) -> u32 {
        match self.selected() {
            Some((addr, dev)) => dev
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .config_read(addr.register),
            None => {
                trace!(
                    "pci config read with nothing selected, address {:#010x}",
                    self.config_address
                );
                u32::MAX
            }
        }
    }

    fn config_data_write(&self, offset: u8, data: &[u8]) {
        match self.selected() {
            Some((addr, dev)) => dev
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .config_write(addr.register, offset, data),
            None => debug!(
                "pci config write with nothing selected, address {:#010x}, {} bytes",
                self.config_address,
                data.len()
            ),
        }
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let used: Vec<usize> = (0..NUM_PCI_SLOTS)
            .filter(|&i| self.slots[i].is_some())
            .collect();
        f.debug_struct("PciRoot")
            .field(
                "config_address",
                &format_args!("{:#010x}", self.config_address),
            )
            .field("used_slots", &used)
            .finish()
    }
}

impl MutDevicePio for PciRoot {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let start = usize::from(offset % 4);
        let len = data.len();
        if !matches!(len, 1 | 2 | 4) || start + len > 4 || offset >= PCI_CONFIG_IO_LEN {
            debug!("bad pci config read at offset {offset}, {len} bytes");
            data.fill(0xff);
            return;
        }
        let value = if offset < DATA_OFFSET {
            self.config_address
        } else {
            self.config_data_read()
        };
        let bytes = value.to_le_bytes();
        data.copy_from_slice(&bytes[start..start + len]);
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let len = data.len();
        if offset < DATA_OFFSET {
            // Only a dword write at 0xcf8 sets the latch. Byte writes land here too (0xcf9
            // is the reset control register on real chipsets, 0xcfb a mechanism #2 probe);
            // they are dropped, as QEMU and Cloud Hypervisor do.
            match <[u8; 4]>::try_from(data) {
                Ok(bytes) if offset == 0 => self.config_address = u32::from_le_bytes(bytes),
                _ => debug!("ignored pci config address write at offset {offset}, {len} bytes"),
            }
            return;
        }
        let start = offset - DATA_OFFSET;
        if !matches!(len, 1 | 2 | 4) || usize::from(start) + len > 4 {
            debug!("bad pci config data write at offset {offset}, {len} bytes");
            return;
        }
        // `start` is below 4 here.
        self.config_data_write(start as u8, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config_space::{PciBarKind, PciConfigSpace, PciHeaderConfig};

    const BASE: PioAddress = PioAddress(PCI_CONFIG_IO_BASE);

    fn addr(device: u32, function: u32, register: u32) -> u32 {
        CONFIG_ENABLE | device << 11 | function << 8 | register << 2
    }

    fn select(root: &mut PciRoot, value: u32) {
        root.pio_write(BASE, 0, &value.to_le_bytes());
    }

    fn read(root: &mut PciRoot, offset: u16, len: usize) -> u32 {
        let mut data = [0u8; 4];
        root.pio_read(BASE, offset, &mut data[..len]);
        u32::from_le_bytes(data)
    }

    fn read_dword(root: &mut PciRoot, a: u32) -> u32 {
        select(root, a);
        read(root, 4, 4)
    }

    fn write_dword(root: &mut PciRoot, a: u32, value: u32) {
        select(root, a);
        root.pio_write(BASE, 4, &value.to_le_bytes());
    }

    fn virtio_like() -> PciConfigSpace {
        let mut c = PciConfigSpace::new(&PciHeaderConfig {
            vendor_id: 0x1af4,
            device_id: 0x1041,
            class_code: 0x02,
            interrupt_pin: 1,
            ..Default::default()
        });
        c.add_bar(0, 0x80, PciBarKind::Io).unwrap();
        c.add_bar(1, 0x1000, PciBarKind::Mmio32).unwrap();
        c.add_bar(2, 0x8000, PciBarKind::Mmio64).unwrap();
        c.add_capability(&[0x09, 0, 16, 1, 0, 0, 0, 0]).unwrap();
        c.add_capability(&[0x11, 0, 0, 0]).unwrap();
        c
    }

    #[test]
    fn host_bridge_readable_through_ports() {
        let mut root = PciRoot::new();
        assert_eq!(read_dword(&mut root, addr(0, 0, 0)), 0x0d57_8086);
        // Word reads of vendor and device id.
        assert_eq!(read(&mut root, 4, 2), 0x8086);
        assert_eq!(read(&mut root, 6, 2), 0x0d57);
        // Class code, subclass, header type.
        select(&mut root, addr(0, 0, 2));
        assert_eq!(read(&mut root, 7, 1), 0x06);
        assert_eq!(read(&mut root, 6, 1), 0x00);
        select(&mut root, addr(0, 0, 3));
        assert_eq!(read(&mut root, 6, 1), 0x00);
    }

    #[test]
    fn byte_and_word_reads_at_every_offset() {
        let mut root = PciRoot::new();
        select(&mut root, addr(0, 0, 0));
        assert_eq!(read(&mut root, 4, 1), 0x86);
        assert_eq!(read(&mut root, 5, 1), 0x80);
        assert_eq!(read(&mut root, 6, 1), 0x57);
        assert_eq!(read(&mut root, 7, 1), 0x0d);
        assert_eq!(read(&mut root, 5, 2), 0x5780);
        assert_eq!(read(&mut root, 6, 2), 0x0d57);
        // Crossing the end of the dword: all ones, nothing read past it.
        let mut data = [0u8; 2];
        root.pio_read(BASE, 7, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        let mut data = [0u8; 4];
        root.pio_read(BASE, 5, &mut data);
        assert_eq!(data, [0xff; 4]);
        let mut data = [0u8; 3];
        root.pio_read(BASE, 4, &mut data);
        assert_eq!(data, [0xff; 3]);
    }

    #[test]
    fn address_latch_reads_back() {
        let mut root = PciRoot::new();
        assert_eq!(read(&mut root, 0, 4), 0);
        select(&mut root, 0x8000_0000);
        assert_eq!(read(&mut root, 0, 4), 0x8000_0000);
        assert_eq!(root.config_address(), 0x8000_0000);
        select(&mut root, 0x8001_2344);
        assert_eq!(read(&mut root, 2, 2), 0x8001);
        assert_eq!(read(&mut root, 1, 1), 0x23);
    }

    #[test]
    fn partial_address_writes_are_ignored() {
        let mut root = PciRoot::new();
        select(&mut root, addr(0, 0, 0));
        root.pio_write(BASE, 3, &[0x01]);
        root.pio_write(BASE, 1, &[0x06]);
        root.pio_write(BASE, 0, &[0x00, 0x00]);
        root.pio_write(BASE, 2, &[0x00, 0x00]);
        root.pio_write(BASE, 0, &[0x00, 0x00, 0x00]);
        root.pio_write(BASE, 1, &[0x00; 4]);
        assert_eq!(root.config_address(), 0x8000_0000);
    }

    #[test]
    fn empty_slots_read_all_ones() {
        let mut root = PciRoot::new();
        assert_eq!(read_dword(&mut root, addr(5, 0, 0)), 0xffff_ffff);
        assert_eq!(read(&mut root, 4, 2), 0xffff);
        assert_eq!(read(&mut root, 6, 2), 0xffff);
        assert_eq!(read(&mut root, 7, 1), 0xff);
        assert_eq!(read_dword(&mut root, addr(31, 0, 0)), 0xffff_ffff);
        // Function 1..7 of a present device.
        assert_eq!(read_dword(&mut root, addr(0, 1, 0)), 0xffff_ffff);
        assert_eq!(read_dword(&mut root, addr(0, 7, 0)), 0xffff_ffff);
        // Another bus.
        assert_eq!(read_dword(&mut root, addr(0, 0, 0) | 1 << 16), 0xffff_ffff);
        // Writes there go nowhere and do not disturb the host bridge.
        write_dword(&mut root, addr(0, 1, 15), 0x0000_000a);
        write_dword(&mut root, addr(0, 0, 15) | 3 << 16, 0x0000_000a);
        assert_eq!(read_dword(&mut root, addr(0, 0, 15)), 0);
    }

    #[test]
    fn enable_bit_clear_reads_all_ones() {
        let mut root = PciRoot::new();
        select(&mut root, addr(0, 0, 0) & !CONFIG_ENABLE);
        assert_eq!(read(&mut root, 4, 4), 0xffff_ffff);
        assert_eq!(read(&mut root, 4, 2), 0xffff);
        // A write with the enable bit clear is dropped.
        select(&mut root, addr(0, 0, 15) & !CONFIG_ENABLE);
        root.pio_write(BASE, 4, &[0x0a]);
        assert_eq!(read_dword(&mut root, addr(0, 0, 15)), 0);
    }

    #[test]
    fn add_device_fills_slots_in_order() {
        let mut root = PciRoot::new();
        assert!(root.device(0).is_some());
        assert!(root.device(1).is_none());
        assert!(root.device(200).is_none());
        for expected in 1..32u8 {
            let dev = Arc::new(Mutex::new(virtio_like()));
            assert_eq!(root.add_device(dev).unwrap(), expected);
        }
        assert!(matches!(
            root.add_device(Arc::new(Mutex::new(virtio_like()))),
            Err(Error::NoFreePciSlot)
        ));
        assert_eq!(read_dword(&mut root, addr(31, 0, 0)), 0x1041_1af4);
        let dbg = format!("{root:?}");
        assert!(dbg.contains("used_slots"), "{dbg}");
    }

    #[test]
    fn bar_sizing_through_ports() {
        let mut root = PciRoot::new();
        let dev = Arc::new(Mutex::new(virtio_like()));
        let slot = u32::from(root.add_device(dev.clone()).unwrap());
        assert_eq!(slot, 1);

        // I/O BAR 0: 0x80 ports.
        write_dword(&mut root, addr(slot, 0, 4), u32::MAX);
        assert_eq!(read_dword(&mut root, addr(slot, 0, 4)), 0xffff_ff81);
        write_dword(&mut root, addr(slot, 0, 4), 0xc080);
        assert_eq!(read_dword(&mut root, addr(slot, 0, 4)), 0xc081);

        // 32-bit memory BAR 1: 4 KiB.
        write_dword(&mut root, addr(slot, 0, 5), u32::MAX);
        assert_eq!(read_dword(&mut root, addr(slot, 0, 5)), 0xffff_f000);
        write_dword(&mut root, addr(slot, 0, 5), 0xc000_0fff);
        assert_eq!(read_dword(&mut root, addr(slot, 0, 5)), 0xc000_0000);

        // 64-bit memory BAR 2/3: 32 KiB.
        write_dword(&mut root, addr(slot, 0, 6), u32::MAX);
        write_dword(&mut root, addr(slot, 0, 7), u32::MAX);
        assert_eq!(read_dword(&mut root, addr(slot, 0, 6)), 0xffff_8004);
        assert_eq!(read_dword(&mut root, addr(slot, 0, 7)), 0xffff_ffff);
        write_dword(&mut root, addr(slot, 0, 6), 0xe000_0000);
        write_dword(&mut root, addr(slot, 0, 7), 0x0000_0002);
        assert_eq!(dev.lock().unwrap().bar_addr(2), Some(0x2_e000_0000));

        // Unused BARs and the expansion ROM read as zero, even after sizing.
        for reg in [8, 9, 12] {
            write_dword(&mut root, addr(slot, 0, reg), u32::MAX);
            assert_eq!(read_dword(&mut root, addr(slot, 0, reg)), 0);
        }
    }

    #[test]
    fn read_only_fields_unchanged_through_ports() {
        let mut root = PciRoot::new();
        let slot = u32::from(
            root.add_device(Arc::new(Mutex::new(virtio_like())))
                .unwrap(),
        );
        for reg in [0, 2, 11, 13] {
            let before = read_dword(&mut root, addr(slot, 0, reg));
            write_dword(&mut root, addr(slot, 0, reg), 0x1234_5678);
            select(&mut root, addr(slot, 0, reg));
            root.pio_write(BASE, 6, &[0xaa, 0xbb]);
            root.pio_write(BASE, 5, &[0xcc]);
            assert_eq!(read_dword(&mut root, addr(slot, 0, reg)), before);
        }
        // Interrupt line is writable byte-wise, pin is not.
        select(&mut root, addr(slot, 0, 15));
        root.pio_write(BASE, 4, &[0x0b]);
        root.pio_write(BASE, 5, &[0x03]);
        assert_eq!(read(&mut root, 4, 2), 0x010b);
        // Command through a word write at 0xcfc, status untouched (cap list bit set).
        select(&mut root, addr(slot, 0, 1));
        root.pio_write(BASE, 4, &[0x07, 0x00]);
        root.pio_write(BASE, 6, &[0xff, 0xff]);
        assert_eq!(read(&mut root, 4, 4), 0x0010_0007);
        // Bad data accesses are dropped.
        root.pio_write(BASE, 7, &[0, 0]);
        root.pio_write(BASE, 4, &[0, 0, 0]);
        root.pio_write(BASE, 4, &[0; 8]);
        root.pio_write(BASE, 100, &[0]);
        assert_eq!(read(&mut root, 4, 4), 0x0010_0007);
    }

    #[test]
    fn capability_list_through_ports() {
        let mut root = PciRoot::new();
        let slot = u32::from(
            root.add_device(Arc::new(Mutex::new(virtio_like())))
                .unwrap(),
        );
        select(&mut root, addr(slot, 0, 1));
        assert_ne!(read(&mut root, 6, 2) & 0x10, 0);
        select(&mut root, addr(slot, 0, 0x34 / 4));
        let mut ptr = read(&mut root, 4, 1);
        let mut ids = Vec::new();
        while ptr != 0 {
            select(&mut root, addr(slot, 0, ptr / 4));
            let off = 4 + (ptr % 4) as u16;
            ids.push(read(&mut root, off, 1));
            ptr = read(&mut root, off + 1, 1) & 0xfc;
        }
        assert_eq!(ids, [0x09, 0x11]);
    }

    #[test]
    fn registered_on_io_manager() {
        use crate::{register_pio_device, IoManager, PioManager};

        let mut io = IoManager::new();
        let root = Arc::new(Mutex::new(PciRoot::new()));
        register_pio_device(&mut io, PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN, root).unwrap();
        io.pio_write(PioAddress(0xcf8), &addr(0, 0, 2).to_le_bytes())
            .unwrap();
        let mut data = [0u8; 1];
        io.pio_read(PioAddress(0xcfe), &mut data).unwrap();
        assert_eq!(data, [0x00]);
        io.pio_read(PioAddress(0xcff), &mut data).unwrap();
        assert_eq!(data, [0x06]);
        io.pio_write(PioAddress(0xcf8), &addr(3, 0, 0).to_le_bytes())
            .unwrap();
        let mut data = [0u8; 2];
        io.pio_read(PioAddress(0xcfc), &mut data).unwrap();
        assert_eq!(data, [0xff, 0xff]);
        assert!(io.pio_read(PioAddress(0xd00), &mut data).is_err());
    }
}
