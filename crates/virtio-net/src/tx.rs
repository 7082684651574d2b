// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Transmit: gathering one guest frame (vnet header + Ethernet frame) out of a descriptor
//! chain, a pure function over guest memory.

use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemory, GuestMemoryMmap, Permissions, VolatileSlice};

use crate::consts::{MAX_PACKET_LEN, UNTERMINATED, VNET_HDR_LEN};

/// Why a transmit chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TxError {
    /// A device-writable descriptor: the chain is not a transmit buffer.
    WriteOnly {
        /// Guest address of the offending descriptor.
        addr: u64,
    },
    /// Fewer bytes than the vnet header.
    TooShort(usize),
    /// More bytes than [`crate::MAX_PACKET_LEN`].
    TooLong,
    /// A descriptor outside guest memory.
    BadAddress {
        /// Guest address of the offending descriptor.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// The last descriptor still has NEXT: the chain loops, or the iterator stopped it
    /// (more descriptors than the queue holds, a next index beyond it, 4 GiB in total).
    Unterminated,
}

impl std::fmt::Display for TxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TxError::WriteOnly { addr } => {
                write!(f, "device-writable descriptor at {addr:#x}")
            }
            TxError::TooShort(len) => write!(f, "{len} bytes, shorter than the vnet header"),
            TxError::TooLong => write!(f, "longer than {MAX_PACKET_LEN} bytes"),
            TxError::BadAddress { addr, len } => {
                write!(f, "descriptor {addr:#x}+{len:#x} outside guest memory")
            }
            TxError::Unterminated => f.write_str(UNTERMINATED),
        }
    }
}

/// Collects the frame in `chain` (vnet header + Ethernet frame) into `out` as slices of
/// guest memory, in order, and returns its length: the frame goes to the backend straight
/// from there, with no copy ([`NetBackend::write_frame_guest`](crate::NetBackend)).
///
/// Every descriptor must be device-readable and inside guest memory (a descriptor across
/// two memory regions gives two slices); the total must be at least the 12-byte header
/// and at most [`MAX_PACKET_LEN`]; the chain must end (a loop, which virtio-queue's
/// iterator cuts after queue-size descriptors, is refused rather than sent as a frame of
/// repeated bytes). `out` is cleared first; after an error its contents mean nothing.
/// Guest memory is not touched here, only mapped: a guest changing its buffers while
/// the frame is sent only changes its own frame.
pub(crate) fn tx_frame_slices<'m>(
    mem: &'m GuestMemoryMmap<()>,
    chain: DescriptorChain<&GuestMemoryMmap<()>>,
    out: &mut Vec<VolatileSlice<'m>>,
) -> Result<usize, TxError> {
    out.clear();
    let mut total = 0usize;
    let mut open = false;
    // The chain iterator stops after queue-size descriptors (or the indirect table's
    // size), so a looping chain ends, with NEXT still set on its last descriptor.
    for desc in chain {
        open = desc.has_next();
        if desc.is_write_only() {
            return Err(TxError::WriteOnly {
                addr: desc.addr().0,
            });
        }
        let len = desc.len() as usize;
        total = total
            .checked_add(len)
            .filter(|&end| end <= MAX_PACKET_LEN)
            .ok_or(TxError::TooLong)?;
        let bad = TxError::BadAddress {
            addr: desc.addr().0,
            len: desc.len(),
        };
        let slices = mem
            .get_slices(desc.addr(), len, Permissions::Read)
            .map_err(|_| bad)?;
        for slice in slices {
            out.push(slice.map_err(|_| bad)?);
        }
    }
    if open {
        return Err(TxError::Unterminated);
    }
    if total < VNET_HDR_LEN {
        return Err(TxError::TooShort(total));
    }
    Ok(total)
}
