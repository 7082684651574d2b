// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

#![allow(clippy::unwrap_used)]

use std::io;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use tvm_virtio::test_utils::{self, DriverRing, QueueSetup, RecordingInterrupt, RecordingSink};
use tvm_virtio::{features, ActivateContext, VirtioDevice, VirtioPciDevice};

use crate::*;

const W: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const MEM_SIZE: usize = 0x40_0000;
const BUF: u64 = 0x10_0000;
/// Sentinel in guest memory the device must not touch.
const FILL: u8 = 0xee;

fn test_mem() -> GuestMemoryMmap<()> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    mem.write_slice(&vec![FILL; 0x30_0000], GuestAddress(BUF))
        .unwrap();
    mem
}

fn guest(mem: &GuestMemoryMmap<()>, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// 0, 1, 2, ... 255, 0, ...: each byte says where in the stream it came from.
#[derive(Default)]
struct Counting {
    next: u8,
    calls: usize,
}

impl EntropySource for Counting {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.calls += 1;
        for b in buf {
            *b = self.next;
            self.next = self.next.wrapping_add(1);
        }
        Ok(())
    }
}

/// Fails from the `fail_at`-th call on.
struct Failing {
    calls: usize,
    fail_at: usize,
}

impl EntropySource for Failing {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.calls += 1;
        if self.calls >= self.fail_at {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        buf.fill(0x5a);
        Ok(())
    }
}

fn stream(len: usize) -> Vec<u8> {
    (0..len).map(|i| i as u8).collect()
}

/// Puts `descs` (one chain from index 0) in a fresh queue and serves it.
fn serve(
    mem: &GuestMemoryMmap<()>,
    descs: &[RawDescriptor],
    source: &mut dyn EntropySource,
) -> Filled {
    let mock = MockSplitQueue::new(mem, 16);
    mock.add_desc_chains(descs, 0).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let chain = q.pop_descriptor_chain(mem).unwrap();
    fill_chain(mem, chain, source)
}

#[test]
fn writable_buffers_are_filled_in_order_and_nothing_else() {
    let mem = test_mem();
    let mut src = Counting::default();
    let f = serve(
        &mem,
        &[desc(BUF, 100, W | NEXT, 1), desc(BUF + 0x1000, 5000, W, 0)],
        &mut src,
    );
    assert_eq!(f.len, 5100);
    assert!(f.driver_error.is_none() && f.source_error.is_none());
    let s = stream(5100);
    assert_eq!(guest(&mem, BUF, 100), s[..100]);
    assert_eq!(guest(&mem, BUF + 100, 1), [FILL]);
    assert_eq!(guest(&mem, BUF + 0x1000, 5000), s[100..]);
    assert_eq!(guest(&mem, BUF + 0x1000 + 5000, 1), [FILL]);
    // In chunks of at most a page.
    assert_eq!(src.calls, 3);
}

#[test]
fn a_device_readable_buffer_refuses_the_request_untouched() {
    let mem = test_mem();
    let f = serve(
        &mem,
        &[desc(BUF, 64, W | NEXT, 1), desc(BUF + 0x1000, 64, 0, 0)],
        &mut Counting::default(),
    );
    assert_eq!(f.len, 0);
    assert!(f
        .driver_error
        .unwrap()
        .contains("device-readable buffer (64 bytes at 0x101000)"));
    assert_eq!(guest(&mem, BUF, 64), [FILL; 64]);
}

#[test]
fn a_chain_that_does_not_end_is_refused_untouched() {
    let mem = test_mem();
    // 0 -> 1 -> 0 -> ...: virtio-queue stops after a queue size of descriptors.
    let f = serve(
        &mem,
        &[
            desc(BUF, 64, W | NEXT, 1),
            desc(BUF + 0x1000, 64, W | NEXT, 0),
        ],
        &mut Counting::default(),
    );
    assert_eq!(f.len, 0);
    assert!(f.driver_error.unwrap().contains("loops"));
    assert_eq!(guest(&mem, BUF, 64), [FILL; 64]);
    assert_eq!(guest(&mem, BUF + 0x1000, 64), [FILL; 64]);
}

#[test]
fn a_buffer_outside_guest_memory_ends_the_request_there() {
    let mem = test_mem();
    let outside = MEM_SIZE as u64 + 0x1000;
    let f = serve(
        &mem,
        &[
            desc(BUF, 64, W | NEXT, 1),
            desc(outside, 64, W | NEXT, 2),
            desc(BUF + 0x1000, 64, W, 0),
        ],
        &mut Counting::default(),
    );
    assert_eq!(f.len, 64);
    assert!(f.driver_error.unwrap().contains("not in guest memory"));
    assert_eq!(guest(&mem, BUF, 64), stream(64));
    assert_eq!(guest(&mem, BUF + 0x1000, 64), [FILL; 64]);
    // A buffer that runs off the end of memory: the piece inside is written, the one
    // across the end is not.
    let end = MEM_SIZE as u64;
    let f = serve(
        &mem,
        &[desc(end - 4096 - 100, 8192, W, 0)],
        &mut Counting::default(),
    );
    assert_eq!(f.len, 4096);
    assert_eq!(guest(&mem, end - 4096 - 100, 4096), stream(4096));
    assert_eq!(guest(&mem, end - 100, 100), [FILL; 100]);
    // A buffer that wraps the address space.
    let f = serve(
        &mem,
        &[desc(u64::MAX - 8, 64, W, 0)],
        &mut Counting::default(),
    );
    assert_eq!(f.len, 0);
    assert!(f.driver_error.is_some());
}

#[test]
fn a_request_gets_at_most_the_cap() {
    let mem = test_mem();
    let f = serve(&mem, &[desc(BUF, 1 << 20, W, 0)], &mut Counting::default());
    assert_eq!(f.len, MAX_BYTES_PER_REQUEST);
    let cap = MAX_BYTES_PER_REQUEST as usize;
    assert_eq!(guest(&mem, BUF, cap), stream(cap));
    assert_eq!(guest(&mem, BUF + cap as u64, 16), [FILL; 16]);
}

#[test]
fn a_failing_source_ends_the_request_with_what_it_gave() {
    let mem = test_mem();
    let mut src = Failing {
        calls: 0,
        fail_at: 2,
    };
    let f = serve(&mem, &[desc(BUF, 3 * 4096, W, 0)], &mut src);
    assert_eq!(f.len, 4096);
    assert!(f.driver_error.is_none());
    assert_eq!(f.source_error.unwrap().raw_os_error(), Some(libc::EIO));
    assert_eq!(guest(&mem, BUF, 4096), [0x5a; 4096]);
    assert_eq!(guest(&mem, BUF + 4096, 16), [FILL; 16]);
}

#[test]
fn host_random_fills_every_byte() {
    // 4 KiB of zeros from getrandom has probability 2^-32768.
    let mut buf = [0u8; 4096];
    HostRandom.fill(&mut buf).unwrap();
    assert!(buf.iter().any(|&b| b != 0));
    let mut other = [0u8; 4096];
    HostRandom.fill(&mut other).unwrap();
    assert_ne!(buf, other);
}

/// A counting device activated on a mock queue of 16 entries.
fn active_device<'a>(
    mem: &'a GuestMemoryMmap<()>,
) -> (
    Rng,
    MockSplitQueue<'a, GuestMemoryMmap<()>>,
    Arc<RecordingInterrupt>,
) {
    let mock = MockSplitQueue::new(mem, 16);
    let mut rng = Rng::with_source(Box::new(Counting::default()));
    let irq = Arc::new(RecordingInterrupt::default());
    rng.activate(ActivateContext {
        mem: mem.clone(),
        features: 0,
        queues: vec![mock.create_queue().unwrap()],
        queue_evts: vec![EventFd::new(0).unwrap()],
        interrupt: irq.clone(),
    })
    .unwrap();
    (rng, mock, irq)
}

#[test]
fn requests_are_returned_with_their_lengths_and_one_interrupt() {
    let mem = test_mem();
    let (mut rng, mock, irq) = active_device(&mem);
    mock.add_desc_chains(
        &[
            desc(BUF, 32, W, 0),
            desc(BUF + 0x1000, 64, W, 0),
            desc(BUF + 0x2000, 16, 0, 0),
        ],
        0,
    )
    .unwrap();
    rng.process_queue(0);
    assert_eq!(mock.used().idx().load(), 3);
    let used: Vec<(u32, u32)> = (0..3)
        .map(|i| {
            let e = mock.used().ring().ref_at(i).unwrap().load();
            (e.id(), e.len())
        })
        .collect();
    assert_eq!(used, [(0, 32), (1, 64), (2, 0)]);
    assert_eq!(guest(&mem, BUF + 0x1000, 64), stream(96)[32..]);
    assert_eq!(rng.bytes_served(), 96);
    assert_eq!(irq.queues(), [0]);
    // Nothing new: no interrupt.
    rng.process_queue(0);
    assert_eq!(irq.queues().len(), 1);
    // After a reset notifications are ignored.
    rng.reset();
    mock.add_desc_chains(&[desc(BUF, 8, W, 0)], 3).unwrap();
    rng.process_queue(0);
    assert_eq!(mock.used().idx().load(), 3);
}

#[test]
fn driver_errors_are_one_warning_each_and_the_device_goes_on() {
    tvm_util::test_log::start();
    let mem = test_mem();
    let (mut rng, mock, _irq) = active_device(&mem);
    for _ in 0..3 {
        let next = mock.used().idx().load();
        mock.add_desc_chains(&[desc(BUF, 16, 0, 0)], next).unwrap();
        rng.process_queue(0);
        rng.write_config(0, &[1, 2, 3, 4]);
    }
    rng.process_queue(7);
    assert_eq!(mock.used().idx().load(), 3);
    let mut cfg = [0xffu8; 8];
    rng.read_config(0, &mut cfg);
    assert_eq!(cfg, [0; 8]);
    // An available index more than a queue size ahead: left alone, warned once.
    mock.avail().idx().store(3 + 17);
    rng.process_queue(0);
    rng.process_queue(0);
    assert_eq!(mock.used().idx().load(), 3);
    let warnings = tvm_util::test_log::lines(log::Level::Warn);
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert!(warnings[0]
        .contains("virtio-rng: request 0 refused after 0 bytes: a device-readable buffer"));
    assert!(warnings[1].contains("virtio-rng: write of 4 bytes to the config space at 0x0 ignored"));
    assert!(warnings[2].contains("virtio-rng: queue left alone: the available index 20"));
    assert!(tvm_util::test_log::lines(log::Level::Error).is_empty());
    // The driver fixes its index and asks properly: served.
    mock.avail().idx().store(3);
    let next = mock.used().idx().load();
    mock.add_desc_chains(&[desc(BUF, 16, W, 0)], next).unwrap();
    rng.process_queue(0);
    assert_eq!(mock.used().idx().load(), 4);
}

#[test]
fn activate_requires_a_ready_queue() {
    let mem = test_mem();
    let mut rng = Rng::new();
    let res = rng.activate(ActivateContext {
        mem,
        features: 0,
        queues: vec![Queue::new(QUEUE_SIZE).unwrap()],
        queue_evts: vec![EventFd::new(0).unwrap()],
        interrupt: Arc::new(RecordingInterrupt::default()),
    });
    assert!(matches!(res, Err(tvm_virtio::Error::QueueNotReady(0))));
}

#[test]
fn a_driver_through_the_pci_transport_gets_host_random_bytes() {
    let mem = test_mem();
    let sink = Arc::new(RecordingSink::default());
    let dev = Mutex::new(VirtioPciDevice::new(Rng::new(), mem.clone(), sink.clone()).unwrap());
    test_utils::enable_msix(&mut dev.lock().unwrap(), &[0, 1]);
    let ring = DriverRing::new(&mem, 0x8000, 16);
    let negotiated =
        test_utils::init_driver(&dev, features::VERSION_1, &[QueueSetup::new(&ring, 1)]);
    assert_eq!(negotiated.queue_max_sizes, [QUEUE_SIZE]);
    // Only the transport's bits are offered.
    assert_eq!(negotiated.offered, features::TRANSPORT);
    ring.mock
        .add_desc_chains(&[desc(BUF, 64, W, 0)], 0)
        .unwrap();
    dev.lock().unwrap().device_mut().process_queue(0);
    assert_eq!(ring.used_idx(), 1);
    assert_eq!(ring.used(0), (0, 64));
    let got = guest(&mem, BUF, 64);
    assert_ne!(got, [FILL; 64]);
    assert_ne!(got, [0; 64]);
    assert_eq!(sink.msix(), [1]);
}
