//! Guest-physical address space for device MMIO (PCI BARs), on vm-allocator.

use std::collections::BTreeMap;

use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};
use vm_memory::GuestAddress;

use crate::{Error, Result};

/// Hands out naturally aligned MMIO ranges from a window of guest-physical address space
/// that holds no RAM (on x86_64, the 32-bit PCI hole).
///
/// It also keeps its own record of what it handed out: vm-allocator 0.1.4's `ExactMatch`
/// policy accepts a range inside an already allocated node, so [`MmioAllocator::reserve`]
/// checks for overlap itself.
#[derive(Debug)]
pub struct MmioAllocator {
    inner: AddressAllocator,
    /// start -> size of every live allocation.
    live: BTreeMap<u64, u64>,
}

impl MmioAllocator {
    /// An allocator for `[start, start + len)`.
    pub fn new(start: GuestAddress, len: u64) -> Result<Self> {
        let inner = AddressAllocator::new(start.0, len).map_err(|source| Error::Allocator {
            what: "create the mmio window",
            source,
        })?;
        Ok(MmioAllocator {
            inner,
            live: BTreeMap::new(),
        })
    }

    fn overlaps(&self, start: u64, size: u64) -> bool {
        let end = start.saturating_add(size);
        // The last allocation starting before `end` is the only one that can overlap.
        self.live
            .range(..end)
            .next_back()
            .is_some_and(|(s, len)| s.saturating_add(*len) > start)
    }

    /// Allocates `size` bytes aligned to `size` (PCI BARs are naturally aligned); `size`
    /// must be a power of two.
    pub fn allocate(&mut self, size: u64) -> Result<GuestAddress> {
        if size == 0 || !size.is_power_of_two() {
            return Err(Error::InvalidAllocation(size));
        }
        let range = self
            .inner
            .allocate(size, size, AllocPolicy::FirstMatch)
            .map_err(|source| Error::Allocator {
                what: "allocate an mmio range",
                source,
            })?;
        self.live.insert(range.start(), size);
        Ok(GuestAddress(range.start()))
    }

    /// Reserves exactly `[addr, addr + size)` (for a BAR the guest moved there).
    pub fn reserve(&mut self, addr: GuestAddress, size: u64) -> Result<()> {
        if size == 0 {
            return Err(Error::InvalidAllocation(size));
        }
        if self.overlaps(addr.0, size) {
            return Err(Error::MmioOverlap {
                start: addr.0,
                size,
            });
        }
        self.inner
            .allocate(size, 1, AllocPolicy::ExactMatch(addr.0))
            .map_err(|source| Error::Allocator {
                what: "reserve an mmio range",
                source,
            })?;
        self.live.insert(addr.0, size);
        Ok(())
    }

    /// Gives back a range from [`MmioAllocator::allocate`] or [`MmioAllocator::reserve`].
    pub fn free(&mut self, addr: GuestAddress, size: u64) -> Result<()> {
        let end = addr
            .0
            .checked_add(size.saturating_sub(1))
            .ok_or(Error::InvalidAllocation(size))?;
        let range = RangeInclusive::new(addr.0, end).map_err(|source| Error::Allocator {
            what: "describe an mmio range",
            source,
        })?;
        self.inner.free(&range).map_err(|source| Error::Allocator {
            what: "free an mmio range",
            source,
        })?;
        self.live.remove(&addr.0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_alignment_and_no_overlap() {
        let mut a = MmioAllocator::new(GuestAddress(0xc000_0000), 0x3ec0_0000).unwrap();
        let x = a.allocate(0x4000).unwrap();
        let y = a.allocate(0x10_0000).unwrap();
        let z = a.allocate(0x4000).unwrap();
        assert_eq!(x.0 % 0x4000, 0);
        assert_eq!(y.0 % 0x10_0000, 0);
        for (p, q, ps) in [(x, y, 0x4000u64), (x, z, 0x4000), (z, y, 0x4000)] {
            assert!(p.0 + ps <= q.0 || q.0 + 0x4000 <= p.0, "{p:?} {q:?}");
        }
        assert!(x.0 >= 0xc000_0000 && y.0 + 0x10_0000 <= 0xfec0_0000);
    }

    #[test]
    fn bad_sizes_and_exhaustion() {
        let mut a = MmioAllocator::new(GuestAddress(0x1000_0000), 0x8000).unwrap();
        assert!(matches!(a.allocate(0), Err(Error::InvalidAllocation(0))));
        assert!(matches!(
            a.allocate(0x3000),
            Err(Error::InvalidAllocation(_))
        ));
        a.allocate(0x8000).unwrap();
        assert!(a.allocate(0x1000).is_err(), "window is full");
    }

    #[test]
    fn reserve_and_free() {
        let mut a = MmioAllocator::new(GuestAddress(0x1000_0000), 0x10_0000).unwrap();
        a.reserve(GuestAddress(0x1000_4000), 0x4000).unwrap();
        assert!(matches!(
            a.reserve(GuestAddress(0x1000_6000), 0x1000),
            Err(Error::MmioOverlap { .. })
        ));
        assert!(
            a.reserve(GuestAddress(0x1000_3000), 0x2000).is_err(),
            "overlaps the start"
        );
        a.reserve(GuestAddress(0x1000_8000), 0x1000).unwrap();
        a.free(GuestAddress(0x1000_4000), 0x4000).unwrap();
        a.reserve(GuestAddress(0x1000_6000), 0x1000).unwrap();
        // Outside the window.
        assert!(a.reserve(GuestAddress(0x2000_0000), 0x1000).is_err());
    }
}
