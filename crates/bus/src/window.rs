// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The PCI MMIO window: one registration on the MMIO bus that dispatches to whatever BARs
//! are mapped in it right now.
//!
//! vm-device's [`IoManager`](crate::IoManager) is shared immutably with the vCPU threads
//! once they run, but a guest may move a BAR at any time (Linux does when it reassigns
//! resources, and it turns decoding off while it sizes a BAR). So the VMM registers one
//! [`PciMmioWindow`] over the address range it hands to BARs, and maps and unmaps BARs in
//! it as the guest programs them. A BAR may only be mapped inside the window and not over
//! another BAR; an access that hits no mapped BAR reads as all ones and is dropped on write,
//! as on real PCI.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use log::debug;
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::DeviceMmio;

/// Guest accesses to one BAR, at offsets from the BAR's base.
pub trait BarAccess: Send + Sync {
    /// A guest read of `data.len()` bytes at `offset`.
    fn bar_read(&self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset`.
    fn bar_write(&self, offset: u64, data: &[u8]);
}

/// Why a BAR could not be mapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BarMapError {
    /// The BAR would reach outside the window (over RAM, above 4 GiB, over the IOAPIC).
    #[error("{addr:#x}..{end:#x} is outside the pci mmio window {start:#x}..{wend:#x}")]
    OutsideWindow {
        /// BAR base.
        addr: u64,
        /// BAR end (exclusive); `u64::MAX` if it would overflow.
        end: u64,
        /// Window start.
        start: u64,
        /// Window end (exclusive).
        wend: u64,
    },
    /// The BAR would overlap a BAR already mapped.
    #[error("{addr:#x}..{end:#x} overlaps the bar mapped at {other:#x}")]
    Overlap {
        /// BAR base.
        addr: u64,
        /// BAR end (exclusive).
        end: u64,
        /// Base of the BAR in the way.
        other: u64,
    },
    /// The BAR has size 0.
    #[error("a bar of size 0 cannot be mapped")]
    EmptyBar,
}

struct Mapped {
    size: u64,
    dev: Arc<dyn BarAccess>,
}

/// A range of guest-physical addresses holding PCI BARs; see the module docs.
pub struct PciMmioWindow {
    start: u64,
    len: u64,
    /// BARs by base address; they never overlap.
    bars: RwLock<BTreeMap<u64, Mapped>>,
}

impl std::fmt::Debug for PciMmioWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciMmioWindow")
            .field("start", &format_args!("{:#x}", self.start))
            .field("len", &format_args!("{:#x}", self.len))
            .finish_non_exhaustive()
    }
}

impl PciMmioWindow {
    /// A window over `start..start + len` with nothing mapped. Register it on the MMIO bus
    /// at the same range (an `Arc<PciMmioWindow>` is a [`DeviceMmio`]).
    pub fn new(start: u64, len: u64) -> Self {
        PciMmioWindow {
            start,
            len,
            bars: RwLock::new(BTreeMap::new()),
        }
    }

    /// First address of the window.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Length of the window in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the window is empty (length 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Maps `dev` at `addr..addr + size`.
    ///
    /// # Errors
    ///
    /// [`BarMapError`] if the range is empty, leaves the window or overlaps a mapped BAR;
    /// nothing changes then.
    pub fn map(&self, addr: u64, size: u64, dev: Arc<dyn BarAccess>) -> Result<(), BarMapError> {
        if size == 0 {
            return Err(BarMapError::EmptyBar);
        }
        let end = addr.saturating_add(size);
        let wend = self.start + self.len;
        if addr < self.start || end > wend || end == u64::MAX {
            return Err(BarMapError::OutsideWindow {
                addr,
                end,
                start: self.start,
                wend,
            });
        }
        let mut bars = self.bars.write().unwrap_or_else(|e| e.into_inner());
        // The last BAR starting before `end` is the only one that can overlap.
        if let Some((&other, m)) = bars.range(..end).next_back() {
            if other + m.size > addr {
                return Err(BarMapError::Overlap { addr, end, other });
            }
        }
        bars.insert(addr, Mapped { size, dev });
        Ok(())
    }

    /// Unmaps the BAR at `addr`; returns whether one was mapped there.
    pub fn unmap(&self, addr: u64) -> bool {
        self.bars
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&addr)
            .is_some()
    }

    /// The BAR holding guest-physical `addr`: its base and device.
    fn lookup(&self, addr: u64) -> Option<(u64, Arc<dyn BarAccess>)> {
        let bars = self.bars.read().unwrap_or_else(|e| e.into_inner());
        let (&base, m) = bars.range(..=addr).next_back()?;
        (addr - base < m.size).then(|| (base, m.dev.clone()))
    }
}

impl DeviceMmio for PciMmioWindow {
    fn mmio_read(&self, base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        let addr = base.0 + offset;
        // The window lock is released before the device is called.
        match self.lookup(addr) {
            Some((bar, dev)) => dev.bar_read(addr - bar, data),
            None => {
                debug!("pci: read at {addr:#x} hits no mapped bar");
                data.fill(0xff);
            }
        }
    }

    fn mmio_write(&self, base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        let addr = base.0 + offset;
        match self.lookup(addr) {
            Some((bar, dev)) => dev.bar_write(addr - bar, data),
            None => debug!("pci: write at {addr:#x} hits no mapped bar"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Recorder {
        accesses: Mutex<Vec<(char, u64, usize)>>,
    }

    impl BarAccess for Recorder {
        fn bar_read(&self, offset: u64, data: &mut [u8]) {
            self.accesses
                .lock()
                .unwrap()
                .push(('r', offset, data.len()));
            data.fill(0x5a);
        }
        fn bar_write(&self, offset: u64, data: &[u8]) {
            self.accesses
                .lock()
                .unwrap()
                .push(('w', offset, data.len()));
        }
    }

    const START: u64 = 0xc000_0000;

    fn window() -> PciMmioWindow {
        PciMmioWindow::new(START, 0x1000_0000)
    }

    fn read(w: &PciMmioWindow, addr: u64) -> u32 {
        let mut data = [0u8; 4];
        w.mmio_read(MmioAddress(START), addr - START, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn dispatches_at_offsets_from_the_bar_base() {
        let w = window();
        let a = Arc::new(Recorder::default());
        let b = Arc::new(Recorder::default());
        w.map(START, 0x8000, a.clone()).unwrap();
        w.map(START + 0x8000, 0x8000, b.clone()).unwrap();
        assert_eq!(read(&w, START + 0x10), 0x5a5a_5a5a);
        assert_eq!(read(&w, START + 0x8004), 0x5a5a_5a5a);
        w.mmio_write(MmioAddress(START), 0xfff8, &[1, 2]);
        assert_eq!(*a.accesses.lock().unwrap(), [('r', 0x10, 4)]);
        assert_eq!(*b.accesses.lock().unwrap(), [('r', 4, 4), ('w', 0x7ff8, 2)]);
    }

    #[test]
    fn holes_read_all_ones_and_drop_writes() {
        let w = window();
        let a = Arc::new(Recorder::default());
        w.map(START + 0x10000, 0x8000, a.clone()).unwrap();
        assert_eq!(read(&w, START), u32::MAX);
        assert_eq!(read(&w, START + 0x18000), u32::MAX);
        w.mmio_write(MmioAddress(START), 0x18000, &[1]);
        assert!(a.accesses.lock().unwrap().is_empty());
    }

    #[test]
    fn refuses_overlaps_and_ranges_outside_the_window() {
        let w = window();
        let a = Arc::new(Recorder::default());
        w.map(START + 0x10000, 0x8000, a.clone()).unwrap();
        for addr in [START + 0xc000, START + 0x10000, START + 0x14000] {
            assert!(
                matches!(w.map(addr, 0x8000, a.clone()), Err(BarMapError::Overlap { other, .. }) if other == START + 0x10000),
                "{addr:#x}"
            );
        }
        // Just below and just above are fine.
        w.map(START + 0x8000, 0x8000, a.clone()).unwrap();
        w.map(START + 0x18000, 0x8000, a.clone()).unwrap();
        for addr in [
            0,
            START - 0x8000,
            START + 0x1000_0000 - 0x4000,
            u64::MAX - 0x7fff,
            1 << 40,
        ] {
            assert!(
                matches!(
                    w.map(addr, 0x8000, a.clone()),
                    Err(BarMapError::OutsideWindow { .. })
                ),
                "{addr:#x}"
            );
        }
        assert_eq!(w.map(START, 0, a.clone()), Err(BarMapError::EmptyBar));
    }

    #[test]
    fn unmap_and_map_elsewhere() {
        let w = window();
        let a = Arc::new(Recorder::default());
        w.map(START, 0x8000, a.clone()).unwrap();
        assert!(w.unmap(START));
        assert!(!w.unmap(START));
        assert_eq!(read(&w, START), u32::MAX);
        w.map(START + 0x4000_0000 - 0x8000, 0x8000, a.clone())
            .unwrap_err();
        w.map(START + 0x0800_0000, 0x8000, a.clone()).unwrap();
        assert_eq!(read(&w, START + 0x0800_0000), 0x5a5a_5a5a);
    }
}
