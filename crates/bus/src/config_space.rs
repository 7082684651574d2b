//! A 256-byte PCI type-0 configuration space: header fields, per-dword writable masks,
//! BARs with the standard sizing protocol, and a capability list.
//!
//! Layout and bit meanings follow the PCI Local Bus Specification 3.0, section 6.

use log::debug;

use crate::{Error, PciDevice, Result};

/// Number of 32-bit registers in a conventional PCI configuration space (256 bytes).
pub const NUM_CONFIG_REGS: usize = 64;
/// Number of base address registers in a type-0 header.
pub const NUM_BARS: usize = 6;

const CONFIG_SPACE_SIZE: usize = NUM_CONFIG_REGS * 4;

// Dword indices of the type-0 header.
const ID_REG: usize = 0;
const COMMAND_STATUS_REG: usize = 1;
const CLASS_REG: usize = 2;
const HEADER_REG: usize = 3;
const BAR0_REG: usize = 4;
const SUBSYSTEM_REG: usize = 11;
const CAP_PTR_OFFSET: usize = 0x34;
const INTERRUPT_REG: usize = 15;

/// Command bits a guest may set: I/O space, memory space, bus master, parity error
/// response, SERR# enable, interrupt disable.
const COMMAND_WRITABLE: u32 = 0x0547;
/// Cache line size and latency timer; header type and BIST stay read-only.
const HEADER_REG_WRITABLE: u32 = 0x0000_ffff;
/// Interrupt line; interrupt pin, min grant and max latency stay read-only.
const INTERRUPT_REG_WRITABLE: u32 = 0x0000_00ff;
/// Status register bit 4 (bit 20 of the dword): a capability list is present.
const STATUS_CAP_LIST: u32 = 1 << 20;
/// First capability goes right after the 64-byte header.
const FIRST_CAP_OFFSET: usize = 0x40;

const BAR_IO_SPACE: u32 = 0x1;
const BAR_MEM_64: u32 = 0x4;
const BAR_MEM_ADDR_MASK: u32 = !0xf;
const BAR_IO_ADDR_MASK: u32 = !0x3;

const MIN_MEM_BAR_SIZE: u64 = 16;
const MAX_MEM32_BAR_SIZE: u64 = 1 << 31;
const MIN_IO_BAR_SIZE: u64 = 4;
const MAX_IO_BAR_SIZE: u64 = 256;

/// What a base address register maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciBarKind {
    /// 32-bit memory BAR, one slot, below 4 GiB.
    Mmio32,
    /// 64-bit memory BAR, two slots (`index` holds the low half, `index + 1` the high half).
    Mmio64,
    /// I/O-space BAR, one slot, at most 256 ports.
    Io,
}

/// The identity fields of a type-0 header, written once when the config space is created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciHeaderConfig {
    /// Vendor ID (offset 0x00).
    pub vendor_id: u16,
    /// Device ID (offset 0x02).
    pub device_id: u16,
    /// Revision ID (offset 0x08).
    pub revision_id: u8,
    /// Programming interface (offset 0x09).
    pub prog_if: u8,
    /// Subclass (offset 0x0a).
    pub subclass: u8,
    /// Base class (offset 0x0b).
    pub class_code: u8,
    /// Subsystem vendor ID (offset 0x2c).
    pub subsystem_vendor_id: u16,
    /// Subsystem ID (offset 0x2e).
    pub subsystem_id: u16,
    /// Interrupt pin (offset 0x3d): 0 none, 1..=4 INTA#..INTD#.
    pub interrupt_pin: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BarSlot {
    Free,
    Bar {
        size: u64,
        kind: PciBarKind,
    },
    /// The high dword of the 64-bit BAR in the slot below.
    Upper,
}

/// A 256-byte PCI type-0 configuration space.
///
/// Every dword has a mask of the bits a guest may change; writes through [`PciDevice`] touch
/// only those bits, so read-only fields keep their value whatever the guest writes. BARs
/// registered with [`add_bar`](Self::add_bar) get a writable mask of their alignment, which
/// gives the standard sizing protocol for free: writing all ones and reading back returns
/// the size mask and the type bits.
///
/// # Example
///
/// ```
/// use tvm_bus::{PciBarKind, PciConfigSpace, PciDevice, PciHeaderConfig};
///
/// let mut cfg = PciConfigSpace::new(&PciHeaderConfig {
///     vendor_id: 0x1af4,
///     device_id: 0x1042,
///     ..Default::default()
/// });
/// cfg.add_bar(0, 0x4000, PciBarKind::Mmio64).unwrap();
/// cfg.config_write(4, 0, &[0xff; 4]);
/// assert_eq!(cfg.config_read(4), 0xffff_c004);
/// ```
#[derive(Clone, Debug)]
pub struct PciConfigSpace {
    regs: [u32; NUM_CONFIG_REGS],
    writable: [u32; NUM_CONFIG_REGS],
    bars: [BarSlot; NUM_BARS],
    last_cap: Option<usize>,
    next_cap: usize,
}

impl PciConfigSpace {
    /// Creates a type-0 config space carrying the identity fields of `header`.
    ///
    /// The command register (I/O, memory, bus master, parity, SERR#, interrupt disable),
    /// cache line size, latency timer and interrupt line are writable; everything else is
    /// read-only until BARs and capabilities are added.
    pub fn new(header: &PciHeaderConfig) -> Self {
        let mut regs = [0u32; NUM_CONFIG_REGS];
        regs[ID_REG] = u32::from(header.device_id) << 16 | u32::from(header.vendor_id);
        regs[CLASS_REG] = u32::from(header.class_code) << 24
            | u32::from(header.subclass) << 16
            | u32::from(header.prog_if) << 8
            | u32::from(header.revision_id);
        // Header type 0, single function, no BIST: the whole upper half of dword 3 is 0.
        regs[SUBSYSTEM_REG] =
            u32::from(header.subsystem_id) << 16 | u32::from(header.subsystem_vendor_id);
        regs[INTERRUPT_REG] = u32::from(header.interrupt_pin) << 8;

        let mut writable = [0u32; NUM_CONFIG_REGS];
        writable[COMMAND_STATUS_REG] = COMMAND_WRITABLE;
        writable[HEADER_REG] = HEADER_REG_WRITABLE;
        writable[INTERRUPT_REG] = INTERRUPT_REG_WRITABLE;

        PciConfigSpace {
            regs,
            writable,
            bars: [BarSlot::Free; NUM_BARS],
            last_cap: None,
            next_cap: FIRST_CAP_OFFSET,
        }
    }

    /// Reads config register `reg` (dword index `0..64`).
    ///
    /// An out-of-range `reg` reads as all ones.
    pub fn read_reg(&self, reg: usize) -> u32 {
        match self.regs.get(reg) {
            Some(v) => *v,
            None => {
                debug!("pci config read of register {reg} out of range");
                u32::MAX
            }
        }
    }

    /// Applies a guest write of `data` (1, 2 or 4 bytes) at byte `offset` (`0..=3`) of
    /// register `reg`, changing only the writable bits.
    ///
    /// Out-of-range registers, bad lengths and accesses crossing the dword are ignored.
    pub fn write_reg(&mut self, reg: usize, offset: u8, data: &[u8]) {
        let offset = usize::from(offset);
        let len = data.len();
        if reg >= NUM_CONFIG_REGS {
            debug!("pci config write to register {reg} out of range, {len} bytes");
            return;
        }
        if !matches!(len, 1 | 2 | 4) || offset + len > 4 {
            debug!("pci config write to register {reg} with bad offset {offset} or length {len}");
            return;
        }

        let mut value = 0u32;
        for (i, b) in data.iter().enumerate() {
            value |= u32::from(*b) << (8 * (offset + i));
        }
        let byte_mask = if len == 4 {
            u32::MAX
        } else {
            ((1u32 << (8 * len)) - 1) << (8 * offset)
        };
        let mask = byte_mask & self.writable[reg];
        if mask == 0 {
            debug!(
                "pci config write to read-only register {reg} offset {offset}: {value:#x}, {len} bytes"
            );
            return;
        }
        self.regs[reg] = (self.regs[reg] & !mask) | (value & mask);
    }

    /// Sets register `reg` to `value` regardless of the writable mask.
    ///
    /// For the device model itself (a status bit, a capability field); guests go through
    /// [`write_reg`](Self::write_reg).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfigRegister`] if `reg` is not `0..64`.
    pub fn set_reg(&mut self, reg: usize, value: u32) -> Result<()> {
        let r = self
            .regs
            .get_mut(reg)
            .ok_or(Error::InvalidConfigRegister(reg))?;
        *r = value;
        Ok(())
    }

    /// Sets which bits of register `reg` a guest may change (a set bit is writable).
    ///
    /// Use it to open up fields inside a capability, such as the MSI-X message control
    /// enable and mask bits.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfigRegister`] if `reg` is not `0..64`.
    pub fn set_writable_mask(&mut self, reg: usize, mask: u32) -> Result<()> {
        let w = self
            .writable
            .get_mut(reg)
            .ok_or(Error::InvalidConfigRegister(reg))?;
        *w = mask;
        Ok(())
    }

    /// The command register (offset 0x04), for checking the memory/I/O/bus-master enables.
    pub fn command(&self) -> u16 {
        (self.regs[COMMAND_STATUS_REG] & 0xffff) as u16
    }

    /// Registers BAR `index` as a `kind` BAR of `size` bytes, at address 0 until the VMM
    /// ([`set_bar_addr`](Self::set_bar_addr)) or the guest programs it.
    ///
    /// `size` must be a power of two: 16 bytes to 2 GiB for [`PciBarKind::Mmio32`], at
    /// least 16 bytes for [`PciBarKind::Mmio64`] (which also takes slot `index + 1`), and
    /// 4 to 256 bytes for [`PciBarKind::Io`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidBarIndex`], [`Error::BarInUse`] or [`Error::InvalidBarSize`].
    pub fn add_bar(&mut self, index: usize, size: u64, kind: PciBarKind) -> Result<()> {
        let slots = if kind == PciBarKind::Mmio64 { 2 } else { 1 };
        if index + slots > NUM_BARS {
            return Err(Error::InvalidBarIndex(index));
        }
        if let Some(i) = (index..index + slots).find(|&i| self.bars[i] != BarSlot::Free) {
            return Err(Error::BarInUse(i));
        }
        let (min, max) = match kind {
            PciBarKind::Mmio32 => (MIN_MEM_BAR_SIZE, MAX_MEM32_BAR_SIZE),
            PciBarKind::Mmio64 => (MIN_MEM_BAR_SIZE, 1 << 63),
            PciBarKind::Io => (MIN_IO_BAR_SIZE, MAX_IO_BAR_SIZE),
        };
        if !size.is_power_of_two() || size < min || size > max {
            return Err(Error::InvalidBarSize { index, size });
        }

        let addr_mask = !(size - 1);
        let reg = BAR0_REG + index;
        match kind {
            PciBarKind::Mmio32 => {
                self.writable[reg] = addr_mask as u32 & BAR_MEM_ADDR_MASK;
                self.regs[reg] = 0;
            }
            PciBarKind::Mmio64 => {
                self.writable[reg] = addr_mask as u32 & BAR_MEM_ADDR_MASK;
                self.writable[reg + 1] = (addr_mask >> 32) as u32;
                self.regs[reg] = BAR_MEM_64;
                self.regs[reg + 1] = 0;
                self.bars[index + 1] = BarSlot::Upper;
            }
            PciBarKind::Io => {
                self.writable[reg] = addr_mask as u32 & BAR_IO_ADDR_MASK;
                self.regs[reg] = BAR_IO_SPACE;
            }
        }
        self.bars[index] = BarSlot::Bar { size, kind };
        Ok(())
    }

    /// The size and kind of BAR `index`, if one was registered there (the upper half of a
    /// 64-bit BAR gives `None`).
    pub fn bar(&self, index: usize) -> Option<(u64, PciBarKind)> {
        match self.bars.get(index) {
            Some(BarSlot::Bar { size, kind }) => Some((*size, *kind)),
            _ => None,
        }
    }

    /// The base address currently in BAR `index`, as the guest (or the VMM) last programmed
    /// it, without the type bits. During the guest's sizing sequence this is the size mask.
    pub fn bar_addr(&self, index: usize) -> Option<u64> {
        let (_, kind) = self.bar(index)?;
        let reg = BAR0_REG + index;
        Some(match kind {
            PciBarKind::Mmio32 => u64::from(self.regs[reg] & BAR_MEM_ADDR_MASK),
            PciBarKind::Mmio64 => {
                u64::from(self.regs[reg + 1]) << 32 | u64::from(self.regs[reg] & BAR_MEM_ADDR_MASK)
            }
            PciBarKind::Io => u64::from(self.regs[reg] & BAR_IO_ADDR_MASK),
        })
    }

    /// Programs BAR `index` with `addr`, as firmware would before the guest boots.
    ///
    /// # Errors
    ///
    /// [`Error::BarNotRegistered`] if no BAR starts at `index`; [`Error::InvalidBarAddress`]
    /// if `addr` is not aligned to the BAR size or does not fit the BAR kind (4 GiB for
    /// 32-bit memory, 64 KiB for I/O).
    pub fn set_bar_addr(&mut self, index: usize, addr: u64) -> Result<()> {
        let (size, kind) = self.bar(index).ok_or(Error::BarNotRegistered(index))?;
        let max_last = match kind {
            PciBarKind::Mmio32 => u64::from(u32::MAX),
            PciBarKind::Mmio64 => u64::MAX,
            PciBarKind::Io => u64::from(u16::MAX),
        };
        let fits = addr
            .checked_add(size - 1)
            .is_some_and(|last| last <= max_last);
        if addr & (size - 1) != 0 || !fits {
            return Err(Error::InvalidBarAddress { index, addr });
        }
        let reg = BAR0_REG + index;
        match kind {
            PciBarKind::Mmio32 => self.regs[reg] = addr as u32,
            PciBarKind::Mmio64 => {
                self.regs[reg] = addr as u32 | BAR_MEM_64;
                self.regs[reg + 1] = (addr >> 32) as u32;
            }
            PciBarKind::Io => self.regs[reg] = addr as u32 | BAR_IO_SPACE,
        }
        Ok(())
    }

    /// Appends a capability to the capability list and returns its offset in config space.
    ///
    /// `data` is the whole capability, starting with the capability ID; its second byte
    /// (the next pointer) is filled in here. The capability is read-only to the guest; open
    /// individual fields with [`set_writable_mask`](Self::set_writable_mask). Capabilities
    /// are placed from offset 0x40 on, each at a dword boundary.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidCapability`] if `data` is shorter than 2 bytes;
    /// [`Error::NoCapabilitySpace`] if it does not fit in the rest of the 256 bytes.
    pub fn add_capability(&mut self, data: &[u8]) -> Result<usize> {
        if data.len() < 2 {
            return Err(Error::InvalidCapability(data.len()));
        }
        let offset = self.next_cap;
        let end = offset
            .checked_add(data.len())
            .filter(|&end| end <= CONFIG_SPACE_SIZE)
            .ok_or(Error::NoCapabilitySpace(data.len()))?;

        for (i, b) in data.iter().enumerate() {
            self.set_byte(offset + i, *b);
        }
        // End of the list until another capability is appended.
        self.set_byte(offset + 1, 0);
        // Offsets are below 256, so they fit the 8-bit pointers.
        match self.last_cap {
            Some(prev) => self.set_byte(prev + 1, offset as u8),
            None => {
                self.set_byte(CAP_PTR_OFFSET, offset as u8);
                self.regs[COMMAND_STATUS_REG] |= STATUS_CAP_LIST;
            }
        }
        self.last_cap = Some(offset);
        self.next_cap = end.next_multiple_of(4);
        Ok(offset)
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        let reg = offset / 4;
        let shift = (offset % 4) * 8;
        self.regs[reg] = (self.regs[reg] & !(0xff << shift)) | (u32::from(value) << shift);
    }
}

impl PciDevice for PciConfigSpace {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.read_reg(reg)
    }

    fn config_write(&mut self, reg: usize, offset: u8, data: &[u8]) {
        self.write_reg(reg, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PciConfigSpace {
        PciConfigSpace::new(&PciHeaderConfig {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision_id: 1,
            prog_if: 0,
            subclass: 0x00,
            class_code: 0x01,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x0002,
            interrupt_pin: 1,
        })
    }

    fn size_bar(c: &mut PciConfigSpace, reg: usize) -> u32 {
        c.write_reg(reg, 0, &[0xff; 4]);
        c.read_reg(reg)
    }

    #[test]
    fn header_fields() {
        let c = cfg();
        assert_eq!(c.read_reg(0), 0x1042_1af4);
        assert_eq!(c.read_reg(2), 0x0100_0001);
        assert_eq!(c.read_reg(3), 0);
        assert_eq!(c.read_reg(11), 0x0002_1af4);
        assert_eq!(c.read_reg(15), 0x0000_0100);
        assert_eq!(c.read_reg(64), u32::MAX);
        assert_eq!(c.read_reg(usize::MAX), u32::MAX);
    }

    #[test]
    fn read_only_fields_ignore_writes() {
        let mut c = cfg();
        let before = c.clone();
        for reg in [0, 2, 11, 12, 13] {
            c.write_reg(reg, 0, &[0xff; 4]);
            c.write_reg(reg, 1, &[0xaa, 0xbb]);
            c.write_reg(reg, 3, &[0x55]);
        }
        for reg in [0, 2, 11, 12, 13] {
            assert_eq!(c.read_reg(reg), before.read_reg(reg), "register {reg}");
        }
        // Header type and BIST are read-only, cache line size and latency timer are not.
        c.write_reg(3, 0, &[0xff; 4]);
        assert_eq!(c.read_reg(3), 0x0000_ffff);
        // Interrupt line writable, pin is not.
        c.write_reg(15, 0, &[0x0b, 0x04, 0xff, 0xff]);
        assert_eq!(c.read_reg(15), 0x0000_010b);
        // Command bits: only the defined ones stick; status stays 0.
        c.write_reg(1, 0, &[0xff; 4]);
        assert_eq!(c.read_reg(1), COMMAND_WRITABLE);
        assert_eq!(c.command(), 0x0547);
        // Unregistered BARs are read-only zero.
        assert_eq!(size_bar(&mut c, 4), 0);
    }

    #[test]
    fn bogus_writes_are_ignored() {
        let mut c = cfg();
        c.write_reg(1, 0, &[0xff; 4]);
        let before = c.read_reg(1);
        c.write_reg(64, 0, &[0; 4]);
        c.write_reg(usize::MAX, 0, &[0; 4]);
        c.write_reg(1, 0, &[0; 3]);
        c.write_reg(1, 0, &[0; 8]);
        c.write_reg(1, 0, &[]);
        c.write_reg(1, 3, &[0; 2]);
        c.write_reg(1, 2, &[0; 4]);
        c.write_reg(1, 200, &[0]);
        assert_eq!(c.read_reg(1), before);
    }

    #[test]
    fn partial_writes_touch_only_their_bytes() {
        let mut c = cfg();
        c.write_reg(3, 1, &[0x40]);
        assert_eq!(c.read_reg(3), 0x0000_4000);
        c.write_reg(3, 0, &[0x10, 0x20]);
        assert_eq!(c.read_reg(3), 0x0000_2010);
        c.write_reg(1, 0, &[0x06]);
        assert_eq!(c.command(), 0x0006);
    }

    #[test]
    fn mmio32_bar_sizing() {
        let mut c = cfg();
        c.add_bar(0, 0x1000, PciBarKind::Mmio32).unwrap();
        assert_eq!(c.read_reg(4), 0);
        assert_eq!(size_bar(&mut c, 4), 0xffff_f000);
        assert_eq!(c.bar(0), Some((0x1000, PciBarKind::Mmio32)));
        // The guest's base is masked to the BAR alignment.
        c.write_reg(4, 0, &0xc000_1234u32.to_le_bytes());
        assert_eq!(c.read_reg(4), 0xc000_1000);
        assert_eq!(c.bar_addr(0), Some(0xc000_1000));
        // Byte writes to the low byte change nothing (it is all type/alignment bits).
        c.write_reg(4, 0, &[0xff]);
        assert_eq!(c.read_reg(4), 0xc000_1000);
    }

    #[test]
    fn mmio64_bar_sizing() {
        let mut c = cfg();
        c.add_bar(2, 0x4000, PciBarKind::Mmio64).unwrap();
        assert_eq!(c.read_reg(6), 0x4);
        assert_eq!(size_bar(&mut c, 6), 0xffff_c004);
        assert_eq!(size_bar(&mut c, 7), 0xffff_ffff);
        c.write_reg(6, 0, &0x8000_0000u32.to_le_bytes());
        c.write_reg(7, 0, &0x1u32.to_le_bytes());
        assert_eq!(c.read_reg(6), 0x8000_0004);
        assert_eq!(c.bar_addr(2), Some(0x1_8000_0000));
        assert_eq!(c.bar(3), None);
        assert!(matches!(
            c.add_bar(3, 0x1000, PciBarKind::Mmio32),
            Err(Error::BarInUse(3))
        ));

        // A BAR of 8 GiB: the low dword is all alignment, the high one gives the size.
        let mut c = cfg();
        c.add_bar(0, 8 << 30, PciBarKind::Mmio64).unwrap();
        assert_eq!(size_bar(&mut c, 4), 0x0000_0004);
        assert_eq!(size_bar(&mut c, 5), 0xffff_fffe);
    }

    #[test]
    fn io_bar_sizing() {
        let mut c = cfg();
        c.add_bar(5, 0x20, PciBarKind::Io).unwrap();
        assert_eq!(c.read_reg(9), 0x1);
        assert_eq!(size_bar(&mut c, 9), 0xffff_ffe1);
        c.write_reg(9, 0, &0xc03fu32.to_le_bytes());
        assert_eq!(c.read_reg(9), 0xc021);
        assert_eq!(c.bar_addr(5), Some(0xc020));
    }

    #[test]
    fn bar_registration_errors() {
        let mut c = cfg();
        assert!(matches!(
            c.add_bar(6, 0x1000, PciBarKind::Mmio32),
            Err(Error::InvalidBarIndex(6))
        ));
        assert!(matches!(
            c.add_bar(5, 0x1000, PciBarKind::Mmio64),
            Err(Error::InvalidBarIndex(5))
        ));
        for (size, kind) in [
            (0, PciBarKind::Mmio32),
            (0x1800, PciBarKind::Mmio32),
            (8, PciBarKind::Mmio32),
            (1 << 32, PciBarKind::Mmio32),
            (2, PciBarKind::Io),
            (0x200, PciBarKind::Io),
            (3 << 20, PciBarKind::Mmio64),
        ] {
            assert!(
                matches!(c.add_bar(0, size, kind), Err(Error::InvalidBarSize { .. })),
                "{size:#x} {kind:?}"
            );
        }
        c.add_bar(0, 0x1000, PciBarKind::Mmio32).unwrap();
        assert!(matches!(
            c.add_bar(0, 0x1000, PciBarKind::Mmio32),
            Err(Error::BarInUse(0))
        ));
    }

    #[test]
    fn vmm_programs_bar_addresses() {
        let mut c = cfg();
        c.add_bar(0, 0x1000, PciBarKind::Mmio32).unwrap();
        c.add_bar(1, 0x10_0000, PciBarKind::Mmio64).unwrap();
        c.add_bar(3, 0x40, PciBarKind::Io).unwrap();

        c.set_bar_addr(0, 0xc000_0000).unwrap();
        c.set_bar_addr(1, 0x40_0000_0000).unwrap();
        c.set_bar_addr(3, 0x1000).unwrap();
        assert_eq!(c.read_reg(4), 0xc000_0000);
        assert_eq!(c.read_reg(5), 0x0000_0004);
        assert_eq!(c.read_reg(6), 0x40);
        assert_eq!(c.read_reg(7), 0x1001);
        assert_eq!(c.bar_addr(1), Some(0x40_0000_0000));

        assert!(matches!(
            c.set_bar_addr(0, 0xc000_0800),
            Err(Error::InvalidBarAddress { .. })
        ));
        assert!(matches!(
            c.set_bar_addr(0, 1 << 32),
            Err(Error::InvalidBarAddress { .. })
        ));
        assert!(matches!(
            c.set_bar_addr(3, 0xffc0 + 0x40),
            Err(Error::InvalidBarAddress { .. })
        ));
        assert!(matches!(
            c.set_bar_addr(2, 0),
            Err(Error::BarNotRegistered(2))
        ));
        assert!(matches!(
            c.set_bar_addr(9, 0),
            Err(Error::BarNotRegistered(9))
        ));
    }

    #[test]
    fn capability_list_linking() {
        let mut c = cfg();
        assert_eq!(c.read_reg(1) & STATUS_CAP_LIST, 0);
        assert_eq!(c.read_reg(13), 0);

        // A vendor-specific capability of 5 bytes, then an MSI-X one of 12 bytes.
        let first = c.add_capability(&[0x09, 0xee, 5, 0xaa, 0xbb]).unwrap();
        let second = c
            .add_capability(&[0x11, 0xee, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8])
            .unwrap();
        assert_eq!(first, 0x40);
        assert_eq!(second, 0x48);

        assert_ne!(c.read_reg(1) & STATUS_CAP_LIST, 0);
        assert_eq!(c.read_reg(13) & 0xff, 0x40);
        assert_eq!(c.read_reg(0x40 / 4), 0xaa05_4809);
        assert_eq!(c.read_reg(0x44 / 4) & 0xff, 0xbb);
        assert_eq!(c.read_reg(0x48 / 4), 0x0000_0011);
        assert_eq!(c.read_reg(0x4c / 4), 0x0403_0201);

        // Walk the list the way a guest does.
        let mut ptr = (c.read_reg(13) & 0xfc) as usize;
        let mut ids = Vec::new();
        while ptr != 0 {
            let dw = c.read_reg(ptr / 4) >> ((ptr % 4) * 8);
            ids.push(dw & 0xff);
            ptr = ((dw >> 8) & 0xfc) as usize;
        }
        assert_eq!(ids, [0x09, 0x11]);

        // Capabilities are read-only unless opened up, and the guest cannot unlink them.
        c.write_reg(0x40 / 4, 0, &[0; 4]);
        assert_eq!(c.read_reg(0x40 / 4), 0xaa05_4809);
        c.write_reg(13, 0, &[0]);
        assert_eq!(c.read_reg(13) & 0xff, 0x40);
        // The MSI-X message control word made writable by the device model.
        c.set_writable_mask(0x48 / 4, 0xc000_0000).unwrap();
        c.write_reg(0x48 / 4, 2, &[0xff, 0xff]);
        assert_eq!(c.read_reg(0x48 / 4), 0xc000_0011);
    }

    #[test]
    fn capability_errors() {
        let mut c = cfg();
        assert!(matches!(
            c.add_capability(&[0x09]),
            Err(Error::InvalidCapability(1))
        ));
        assert_eq!(c.add_capability(&[0x09; 0xbc]).unwrap(), 0x40);
        assert!(matches!(
            c.add_capability(&[0x09; 8]),
            Err(Error::NoCapabilitySpace(8))
        ));
        assert_eq!(c.add_capability(&[0x09; 4]).unwrap(), 0xfc);
        assert!(matches!(
            c.add_capability(&[0x09; 2]),
            Err(Error::NoCapabilitySpace(2))
        ));
    }

    #[test]
    fn internal_register_access() {
        let mut c = cfg();
        c.set_reg(1, 0x0010_0000).unwrap();
        assert_eq!(c.read_reg(1), 0x0010_0000);
        assert!(matches!(
            c.set_reg(64, 0),
            Err(Error::InvalidConfigRegister(64))
        ));
        assert!(matches!(
            c.set_writable_mask(64, 0),
            Err(Error::InvalidConfigRegister(64))
        ));
    }
}
