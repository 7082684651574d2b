//! Guest RAM: creation and registration with KVM.
//!
//! [`create_guest_memory`] maps anonymous, private, `MAP_NORESERVE` regions for the RAM
//! ranges the architecture code chose (on x86_64, below and above the 32-bit MMIO hole).
//! [`register_memory_slots`] (an `unsafe fn`: the caller keeps the mapping alive while the
//! VM can use it) hands each region to KVM as one memory slot. The layout itself
//! (where the holes are) is not decided here; see `tvm-arch-x86`'s `layout::ram_ranges`.
//! [`MmioAllocator`] hands out device MMIO ranges (PCI BARs) inside such a hole.
//!
//! ```
//! use vm_memory::{GuestAddress, GuestMemoryBackend};
//! let mem = tvm_memory::create_guest_memory(&[(GuestAddress(0), 1 << 20)]).unwrap();
//! assert_eq!(mem.num_regions(), 1);
//! ```

#![deny(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod allocator;
mod dirty;
mod file;

pub use allocator::MmioAllocator;
pub use dirty::DirtyTracker;
pub use file::{map_memory_file, save_memory, DirtyBitmaps, SavedMemory};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use log::debug;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// The guest memory type used across the VMM.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Smallest amount of RAM we accept: enough for the boot structures below 1 MiB and a
/// kernel above it.
pub const MIN_MEM_SIZE: u64 = 16 << 20;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A range has zero length, is not page aligned, or overlaps another.
    #[error("invalid guest memory range at {start:#x}, {len:#x} bytes")]
    InvalidRange {
        /// Start of the range.
        start: u64,
        /// Its length.
        len: u64,
    },
    /// Mapping the memory failed (usually not enough host memory or address space).
    #[error("failed to map {total_bytes} bytes of guest memory")]
    Mmap {
        /// Total size requested.
        total_bytes: u64,
        /// What vm-memory said.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// An MMIO allocation request that cannot be met by any allocator (zero or not a power of
    /// two).
    #[error("invalid mmio allocation of {0:#x} bytes")]
    InvalidAllocation(u64),
    /// The range overlaps one already handed out.
    #[error("mmio range {start:#x}+{size:#x} overlaps an allocated range")]
    MmioOverlap {
        /// Start of the range.
        start: u64,
        /// Its size.
        size: u64,
    },
    /// vm-allocator refused.
    #[error("failed to {what}")]
    Allocator {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: vm_allocator::Error,
    },
    /// Writing or reading a snapshot's memory file failed.
    #[error("failed to write or read the memory file")]
    SaveMemory(#[source] std::io::Error),
    /// Dirty-page tracking cannot be used.
    #[error("dirty page tracking is not available: {0}")]
    DirtyTracking(String),
    /// Dirty bitmaps that do not match the memory regions.
    #[error("{bitmaps} dirty bitmaps for {regions} memory regions")]
    DirtyBitmaps {
        /// Bitmaps given.
        bitmaps: usize,
        /// Regions there are.
        regions: usize,
    },
    /// The memory file is shorter than the regions it should hold.
    #[error("the memory file has {len} bytes, the snapshot's memory needs {need}")]
    MemoryFileTooShort {
        /// Its length.
        len: u64,
        /// The end of the last region in it.
        need: u64,
    },
    /// Mapping the memory file failed.
    #[error("failed to map the memory file")]
    MapMemoryFile(#[source] vm_memory::mmap::MmapRegionError),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("failed to register memory slot {slot} at {guest_addr:#x} with kvm")]
    SetUserMemoryRegion {
        /// Slot number.
        slot: u32,
        /// Guest physical address of the slot.
        guest_addr: u64,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;

const PAGE_SIZE: u64 = 4096;

/// Maps guest RAM for `ranges` (`(start, length)`, ascending, page aligned, not
/// overlapping).
pub fn create_guest_memory(ranges: &[(GuestAddress, u64)]) -> Result<GuestMemoryMmap> {
    let mut prev_end = 0u64;
    let mut regions = Vec::with_capacity(ranges.len());
    for (i, (start, len)) in ranges.iter().enumerate() {
        let bad = Error::InvalidRange {
            start: start.raw_value(),
            len: *len,
        };
        let end = start.raw_value().checked_add(*len);
        if *len == 0
            || start.raw_value() % PAGE_SIZE != 0
            || len % PAGE_SIZE != 0
            || end.is_none()
            || (i > 0 && start.raw_value() < prev_end)
        {
            return Err(bad);
        }
        prev_end = end.unwrap_or(u64::MAX);
        let len = usize::try_from(*len).map_err(|_| bad)?;
        regions.push((*start, len));
    }
    let total_bytes = ranges.iter().map(|(_, l)| l).sum();
    GuestMemoryMmap::from_ranges(&regions).map_err(|source| Error::Mmap {
        total_bytes,
        source,
    })
}

/// The `kvm_userspace_memory_region`s for `mem`, slot numbers from 0.
pub fn memory_slots(mem: &GuestMemoryMmap) -> Vec<kvm_userspace_memory_region> {
    mem.iter()
        .enumerate()
        .map(|(slot, region)| kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        })
        .collect()
}

/// Registers every region of `mem` with KVM, as slots 0, 1, ... in region order.
///
/// # Safety
///
/// KVM keeps the host addresses of `mem`'s regions, and the guest reads and writes them
/// behind Rust's back. The caller must keep the regions mapped (`mem`, or a clone of it,
/// alive: clones share the mappings) for as long as the VM can use the slots, that is
/// until the slots are removed or every file descriptor of the VM (the `VmFd`, its vCPUs
/// and devices) is closed. Otherwise the host range could be unmapped and reused for other
/// memory, which the guest could then read and write. The VMM keeps its `GuestMemoryMmap`
/// until the process exits.
///
/// # Errors
///
/// [`Error::SetUserMemoryRegion`] when KVM refuses a slot (slots registered before it
/// stay registered).
pub unsafe fn register_memory_slots(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
    for region in memory_slots(mem) {
        debug!(
            "memory slot {}: guest {:#x}..{:#x}",
            region.slot,
            region.guest_phys_addr,
            region.guest_phys_addr + region.memory_size
        );
        // SAFETY: `userspace_addr` and `memory_size` come from a live mmap region of `mem`
        // (`as_ptr()`/`len()`), so the host range is valid and mapped for the whole slot; the
        // regions of a GuestMemoryMmap never overlap, and each gets its own slot number. The
        // caller keeps `mem`'s mappings alive for as long as the VM can use the slots (this
        // function's safety contract).
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| {
            Error::SetUserMemoryRegion {
                slot: region.slot,
                guest_addr: region.guest_phys_addr,
                source,
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn regions_and_slots_match_the_ranges() {
        let ranges = [(GuestAddress(0), 2 << 20), (GuestAddress(1 << 32), 1 << 20)];
        let mem = create_guest_memory(&ranges).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let slots = memory_slots(&mem);
        assert_eq!(slots.len(), 2);
        assert_eq!((slots[0].slot, slots[0].guest_phys_addr), (0, 0));
        assert_eq!(slots[0].memory_size, 2 << 20);
        assert_eq!((slots[1].slot, slots[1].guest_phys_addr), (1, 1 << 32));
        assert_ne!(slots[0].userspace_addr, 0);
        // Memory is usable on both sides of the gap.
        mem.write_obj(0xdead_beefu32, GuestAddress((1 << 32) + 16))
            .unwrap();
        let v: u32 = mem.read_obj(GuestAddress((1 << 32) + 16)).unwrap();
        assert_eq!(v, 0xdead_beef);
        assert!(mem.write_obj(1u8, GuestAddress(3 << 20)).is_err());
    }

    #[test]
    fn bad_ranges_are_refused() {
        for ranges in [
            vec![(GuestAddress(0), 0)],
            vec![(GuestAddress(0), 4095)],
            vec![(GuestAddress(1), 4096)],
            vec![(GuestAddress(0), 8192), (GuestAddress(4096), 4096)],
            vec![(GuestAddress(u64::MAX - 4095), 8192)],
        ] {
            assert!(
                matches!(
                    create_guest_memory(&ranges),
                    Err(Error::InvalidRange { .. })
                ),
                "{ranges:?}"
            );
        }
    }
}
