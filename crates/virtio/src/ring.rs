// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Checks in front of the virtio-queue calls that log at `error!` when the guest's ring
//! holds nonsense (an available index too far ahead, a head index beyond the queue), so
//! that a device can report such a driver once instead of on every kick.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

use crate::{Error, Result};

/// How many descriptor chains the driver made available that the device has not popped.
///
/// # Errors
///
/// [`Error::AvailIndexTooFar`] when the driver's available index is more than the queue
/// size ahead of the device (virtio-queue would refuse to pop, logging an error each time);
/// [`Error::Ring`] when the index cannot be read.
pub fn chains_pending<M: GuestMemory>(queue: &Queue, mem: &M) -> Result<u16> {
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(Error::Ring)?;
    let next = queue.next_avail();
    let pending = (avail - Wrapping(next)).0;
    if pending > queue.size() {
        return Err(Error::AvailIndexTooFar {
            avail: avail.0,
            next,
            size: queue.size(),
        });
    }
    Ok(pending)
}

/// Puts `head` in the used ring with `len` bytes written.
///
/// # Errors
///
/// [`Error::HeadOutOfRange`] when the driver put a head index beyond the queue size in the
/// available ring (such a chain cannot be returned; virtio-queue would log an error);
/// [`Error::Ring`] when the used ring cannot be written.
pub fn add_used<M: GuestMemory>(queue: &mut Queue, mem: &M, head: u16, len: u32) -> Result<()> {
    if head >= queue.size() {
        return Err(Error::HeadOutOfRange {
            head,
            size: queue.size(),
        });
    }
    queue.add_used(mem, head, len).map_err(Error::Ring)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;

    #[test]
    fn pending_chains_and_an_index_too_far_ahead() {
        crate::test_log::start();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        assert_eq!(chains_pending(&q, &mem).unwrap(), 0);
        let descs = [RawDescriptor::from(Descriptor::new(0x8000, 16, 0, 0))];
        vq.add_desc_chains(&descs, 0).unwrap();
        assert_eq!(chains_pending(&q, &mem).unwrap(), 1);
        let head = q.pop_descriptor_chain(&mem).unwrap().head_index();
        assert_eq!(chains_pending(&q, &mem).unwrap(), 0);
        add_used(&mut q, &mem, head, 7).unwrap();
        // The driver claims 17 chains in a queue of 16.
        let avail_idx = vq.avail_addr().checked_add(2).unwrap();
        mem.write_obj(18u16, avail_idx).unwrap();
        let e = chains_pending(&q, &mem).unwrap_err();
        assert!(matches!(
            e,
            Error::AvailIndexTooFar {
                avail: 18,
                next: 1,
                size: 16
            }
        ));
        assert_eq!(
            e.to_string(),
            "the available index 18 is more than the queue size 16 ahead of 1"
        );
        // Exactly a queue size ahead is fine, also across the wrap.
        mem.write_obj(17u16, avail_idx).unwrap();
        assert_eq!(chains_pending(&q, &mem).unwrap(), 16);
        // A head beyond the queue is refused before virtio-queue sees it.
        let e = add_used(&mut q, &mem, 16, 0).unwrap_err();
        assert!(matches!(e, Error::HeadOutOfRange { head: 16, size: 16 }));
        // Neither reached virtio-queue's error! lines.
        assert!(crate::test_log::lines(log::Level::Error).is_empty());
    }
}
