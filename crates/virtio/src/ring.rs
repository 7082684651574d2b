// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Checks in front of the virtio-queue calls that log at `error!` when the guest's ring
//! holds nonsense (an available index too far ahead, a head index beyond the queue), so
//! that a device can report such a driver once instead of on every kick; and
//! [`QueueDrain`], the queue-serving loop built on them.

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

/// How a drain's log lines name its queue: `tx ` for a device with several, nothing for a
/// device with one (`virtio-net tap0: tx queue left alone: …`, `virtio-rng: queue left
/// alone: …`).
struct QueueLabel<'a>(&'a str);

impl std::fmt::Display for QueueLabel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, "{} ", self.0)
        }
    }
}

impl QueueDrain<'_> {
    /// Serves every available chain with `serve`, which returns how many bytes it wrote
    /// into the chain's device-writable buffers (the used length). Returns how many chains
    /// were served.
    pub fn run<F>(self, serve: F) -> usize
    where
        F: FnMut(DescriptorChain<&GuestMemoryMmap<()>>) -> u32,
    {
        self.run_named("", serve)
    }

    /// [`run`](Self::run) for one of a device's several queues: its log lines name the
    /// queue after the device (`virtio-net tap0: tx queue left alone: …`).
    pub fn run_named<F>(self, queue_name: &str, mut serve: F) -> usize
    where
        F: FnMut(DescriptorChain<&GuestMemoryMmap<()>>) -> u32,
    {
        self.drain(queue_name, true, |chain| Some(serve(chain)))
    }

    /// [`run`](Self::run) for a device that completes some chains later (an asynchronous
    /// I/O engine): `serve` returns the used length of a chain it finished at once, or
    /// `None` for one it keeps, which the device puts in the used ring itself when it
    /// completes ([`add_used`], then [`signal_used`](Self::signal_used)). Keep `budget` at
    /// most the chains the device can still hold; when it is reached the queue is
    /// re-signalled as by [`run`](Self::run). Returns how many chains were popped.
    pub fn run_async<F>(self, serve: F) -> usize
    where
        F: FnMut(DescriptorChain<&GuestMemoryMmap<()>>) -> Option<u32>,
    {
        self.drain("", true, serve)
    }

    /// [`run_async`](Self::run_async) that leaves the queue's notifications off when it
    /// is done: the driver adds requests without kicking, and the device must come back
    /// to the queue by itself (with [`run_async`](Self::run_async), which turns them back
    /// on). For a device that polls the ring for a while, as [`Coalescer`](crate::Coalescer)
    /// windows do.
    pub fn run_async_quiet<F>(self, serve: F) -> usize
    where
        F: FnMut(DescriptorChain<&GuestMemoryMmap<()>>) -> Option<u32>,
    {
        self.drain("", false, serve)
    }

    fn drain<F>(self, queue_name: &str, rearm: bool, mut serve: F) -> usize
    where
        F: FnMut(DescriptorChain<&GuestMemoryMmap<()>>) -> Option<u32>,
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
        let q = QueueLabel(queue_name);
        let mut served = 0usize;
        let mut used_any = false;
        'outer: loop {
            if let Err(e) = queue.disable_notification(mem) {
                debug!("{name}: {q}disable_notification failed: {e}");
                break;
            }
            let mut popped = false;
            loop {
                match chains_pending(queue, mem) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        warn_once!(ring_warn, "{name}: {q}queue left alone: {e}");
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
                if let Some(len) = serve(chain) {
                    match add_used(queue, mem, head, len) {
                        Ok(()) => used_any = true,
                        Err(e) => warn_once!(ring_warn, "{name}: {q}chain not returned: {e}"),
                    }
                }
                served += 1;
                if served >= budget {
                    if let Err(e) = queue_evt.write(1) {
                        warn!("{name}: failed to re-signal the {q}queue: {e}");
                    }
                    break 'outer;
                }
            }
            if !rearm {
                break;
            }
            match queue.enable_notification(mem) {
                // More arrived while notifications were off; an invalid avail index
                // (nothing poppable) also reads as "more", so stop then.
                Ok(true) if popped => continue,
                Ok(_) => break,
                Err(e) => {
                    debug!("{name}: {q}enable_notification failed: {e}");
                    break;
                }
            }
        }
        if used_any {
            Self::signal_used(name, queue_name, index, queue, mem, interrupt);
        }
        served
    }

    /// Raises queue `index`'s interrupt if the driver wants one for what was just added
    /// to its used ring (EVENT_IDX aware): how [`run`](Self::run) ends, for a queue that a
    /// device fills its own way (virtio-net's receive queue, frame by frame from the TAP).
    /// `name` and `queue_name` as in [`run_named`](Self::run_named).
    pub fn signal_used(
        name: &str,
        queue_name: &str,
        index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap<()>,
        interrupt: &dyn VirtioInterrupt,
    ) {
        let q = QueueLabel(queue_name);
        match queue.needs_notification(mem) {
            Ok(true) => {
                if let Err(e) = interrupt.signal_queue(index) {
                    warn!("{name}: failed to signal the {q}queue interrupt: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => debug!("{name}: {q}needs_notification failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::test_utils::RecordingInterrupt;

    /// 1 MiB of guest memory for a mock queue.
    fn guest_mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// What a test drain needs besides its queue and memory.
    struct Ends {
        evt: EventFd,
        irq: RecordingInterrupt,
        warn: WarnOnce,
    }

    impl Ends {
        fn new() -> Self {
            Ends {
                evt: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap(),
                irq: RecordingInterrupt::default(),
                warn: WarnOnce::new(),
            }
        }

        /// A drain named `test`, of queue 3.
        fn drain<'a>(
            &'a mut self,
            queue: &'a mut Queue,
            mem: &'a GuestMemoryMmap<()>,
            budget: usize,
        ) -> QueueDrain<'a> {
            QueueDrain {
                name: "test",
                index: 3,
                queue,
                mem,
                queue_evt: &self.evt,
                interrupt: &self.irq,
                budget,
                ring_warn: &mut self.warn,
            }
        }
    }

    #[test]
    fn a_drain_serves_up_to_its_budget_then_resignals_the_queue() {
        let mem = guest_mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        let descs: Vec<_> = (0..3)
            .map(|i| RawDescriptor::from(Descriptor::new(0x8000 + 0x100 * i, 16, 2, 0)))
            .collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut ends = Ends::new();
        let drain = |ends: &mut Ends, q: &mut Queue| {
            let mut heads = Vec::new();
            let served = ends.drain(q, &mem, 2).run(|chain| {
                heads.push(chain.head_index());
                7
            });
            (served, heads)
        };
        // Two of three, then the EventFd says there is more.
        assert_eq!(drain(&mut ends, &mut q), (2, vec![0, 1]));
        assert_eq!(vq.used().idx().load(), 2);
        assert_eq!(ends.evt.read().unwrap(), 1);
        assert_eq!(ends.irq.queues(), [3]);
        // The rest, with the used length the closure gave; nothing left to signal.
        assert_eq!(drain(&mut ends, &mut q), (1, vec![2]));
        let e = vq.used().ring().ref_at(2).unwrap().load();
        assert_eq!((e.id(), e.len()), (2, 7));
        assert!(ends.evt.read().is_err(), "no re-signal under the budget");
        assert_eq!(ends.irq.queues(), [3, 3]);
        // Nothing available: nothing served, no interrupt.
        assert_eq!(drain(&mut ends, &mut q), (0, vec![]));
        assert_eq!(ends.irq.queues().len(), 2);
        assert!(!ends.warn.warned());
    }

    #[test]
    fn a_named_drain_names_its_queue_in_its_log_lines() {
        crate::test_log::start();
        let mem = guest_mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        // One available entry whose head is beyond the queue of 16.
        vq.avail().ring().ref_at(0).unwrap().store(16);
        vq.avail().idx().store(1);
        let mut ends = Ends::new();
        // Served (the device sees it) but not returned, so no interrupt either.
        assert_eq!(ends.drain(&mut q, &mem, 16).run_named("tx", |_| 0), 1);
        assert_eq!(vq.used().idx().load(), 0);
        assert!(ends.irq.queues().is_empty());
        // Then an available index too far ahead: left alone, named or not.
        vq.avail().idx().store(1 + 17);
        assert_eq!(ends.drain(&mut q, &mem, 16).run_named("tx", |_| 0), 0);
        assert_eq!(ends.drain(&mut q, &mem, 16).run(|_| 0), 0);
        let warned = "test: tx chain not returned: head index 16 is beyond the queue size 16 \
                      (repeats are logged at debug level)";
        assert_eq!(crate::test_log::lines(log::Level::Warn), [warned]);
        let debug = crate::test_log::lines(log::Level::Debug);
        let far = "queue left alone: the available index 18 is more than the queue size 16 \
                   ahead of 1";
        assert_eq!(
            debug,
            [format!("test: tx {far}"), format!("test: {far}")],
            "{debug:#?}"
        );
        assert!(crate::test_log::lines(log::Level::Error).is_empty());
    }

    #[test]
    fn pending_chains_and_an_index_too_far_ahead() {
        crate::test_log::start();
        let mem = guest_mem();
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
