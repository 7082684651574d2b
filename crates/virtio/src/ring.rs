// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Checks in front of the virtio-queue calls that log at `error!` when the guest's ring
//! holds nonsense (an available index too far ahead, a head index beyond the queue), so
//! that a device can report such a driver once instead of on every kick.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use log::{debug, warn};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use tvm_util::{warn_once, WarnOnce};

use crate::{Error, Result, VirtioInterrupt};

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

/// One pass over a queue by [`QueueDrain::run`]: the queue, what it needs, and its limits.
///
/// The loop every request/response device writes the same way: notifications off, pop
/// each available chain, serve it, put it in the used ring, turn notifications back on and
/// go round again if more arrived meanwhile, then signal the queue interrupt if the driver
/// wants one (EVENT_IDX aware).
pub struct QueueDrain<'a> {
    /// The device's name for log lines (`virtio-rng`, `virtio-blk "PATH"`).
    pub name: &'a str,
    /// The queue's index, for its interrupt.
    pub index: u16,
    /// The queue.
    pub queue: &'a mut Queue,
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap<()>,
    /// The queue's notification EventFd, written when the budget runs out so that the
    /// event loop comes back to the rest after its other work.
    pub queue_evt: &'a EventFd,
    /// Where the used-buffer interrupt goes.
    pub interrupt: &'a dyn VirtioInterrupt,
    /// Most chains served in one pass.
    pub budget: usize,
    /// Warns once when the driver broke the ring (an available index too far ahead, a head
    /// index beyond the queue); the queue is then left alone until the driver fixes it or
    /// resets the device, and the chains before the breakage are served.
    pub ring_warn: &'a mut WarnOnce,
}

impl std::fmt::Debug for QueueDrain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueDrain")
            .field("name", &self.name)
            .field("index", &self.index)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl QueueDrain<'_> {
    /// Serves every available chain with `serve`, which returns how many bytes it wrote
    /// into the chain's device-writable buffers (the used length). Returns how many chains
    /// were served.
    pub fn run<F>(self, mut serve: F) -> usize
    where
        F: FnMut(DescriptorChain<&GuestMemoryMmap<()>>) -> u32,
    {
        let QueueDrain {
            name,
            index,
            queue,
            mem,
            queue_evt,
            interrupt,
            budget,
            ring_warn,
        } = self;
        let mut served = 0usize;
        let mut used_any = false;
        'outer: loop {
            if let Err(e) = queue.disable_notification(mem) {
                debug!("{name}: disable_notification failed: {e}");
                break;
            }
            let mut popped = false;
            loop {
                match chains_pending(queue, mem) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        warn_once!(ring_warn, "{name}: queue left alone: {e}");
                        // Leave the inner loop only: notifications are re-enabled below, so
                        // a driver without EVENT_IDX that fixes its index can kick again.
                        break;
                    }
                }
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                popped = true;
                let head = chain.head_index();
                let len = serve(chain);
                match add_used(queue, mem, head, len) {
                    Ok(()) => used_any = true,
                    Err(e) => warn_once!(ring_warn, "{name}: chain not returned: {e}"),
                }
                served += 1;
                if served >= budget {
                    if let Err(e) = queue_evt.write(1) {
                        warn!("{name}: failed to re-signal the queue: {e}");
                    }
                    break 'outer;
                }
            }
            match queue.enable_notification(mem) {
                // More arrived while notifications were off; an invalid avail index
                // (nothing poppable) also reads as "more", so stop then.
                Ok(true) if popped => continue,
                Ok(_) => break,
                Err(e) => {
                    debug!("{name}: enable_notification failed: {e}");
                    break;
                }
            }
        }
        if used_any {
            match queue.needs_notification(mem) {
                Ok(true) => {
                    if let Err(e) = interrupt.signal_queue(index) {
                        warn!("{name}: failed to signal the queue interrupt: {e}");
                    }
                }
                Ok(false) => {}
                Err(e) => debug!("{name}: needs_notification failed: {e}"),
            }
        }
        served
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;

    #[derive(Default)]
    struct CountingIrq(std::sync::Mutex<Vec<u16>>);

    impl VirtioInterrupt for CountingIrq {
        fn signal_queue(&self, queue: u16) -> Result<()> {
            self.0.lock().unwrap().push(queue);
            Ok(())
        }
        fn signal_config(&self) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_drain_serves_up_to_its_budget_then_resignals_the_queue() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        let descs: Vec<_> = (0..3)
            .map(|i| RawDescriptor::from(Descriptor::new(0x8000 + 0x100 * i, 16, 2, 0)))
            .collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        let evt = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let irq = CountingIrq::default();
        let mut warn = WarnOnce::new();
        let mut drain = |q: &mut Queue, budget| {
            let mut heads = Vec::new();
            let served = QueueDrain {
                name: "test",
                index: 3,
                queue: q,
                mem: &mem,
                queue_evt: &evt,
                interrupt: &irq,
                budget,
                ring_warn: &mut warn,
            }
            .run(|chain| {
                heads.push(chain.head_index());
                7
            });
            (served, heads)
        };
        // Two of three, then the EventFd says there is more.
        assert_eq!(drain(&mut q, 2), (2, vec![0, 1]));
        assert_eq!(vq.used().idx().load(), 2);
        assert_eq!(evt.read().unwrap(), 1);
        assert_eq!(*irq.0.lock().unwrap(), [3]);
        // The rest, with the used length the closure gave; nothing left to signal.
        assert_eq!(drain(&mut q, 2), (1, vec![2]));
        let e = vq.used().ring().ref_at(2).unwrap().load();
        assert_eq!((e.id(), e.len()), (2, 7));
        assert!(evt.read().is_err(), "no re-signal under the budget");
        assert_eq!(*irq.0.lock().unwrap(), [3, 3]);
        // Nothing available: nothing served, no interrupt.
        assert_eq!(drain(&mut q, 2), (0, vec![]));
        assert_eq!(irq.0.lock().unwrap().len(), 2);
        assert!(!warn.warned());
    }

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
