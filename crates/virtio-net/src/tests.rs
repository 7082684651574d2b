// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use tvm_virtio::test_utils::RecordingInterrupt;
use tvm_virtio::{features, ActivateContext, EventSet, VirtioDevice};

use crate::*;

const W: u16 = VRING_DESC_F_WRITE as u16;
const R: u16 = 0;

const MEM_SIZE: usize = 0x80_0000;
const RX_RING: u64 = 0x0;
const TX_RING: u64 = 0x4000;
/// Guest buffers live from here.
const BUF: u64 = 0x10_0000;
/// Sentinel in guest memory the device must not touch.
const FILL: u8 = 0xee;

const MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;

/// A descriptor as the test driver writes it: address, length, flags (R or W).
type Desc = (u64, u32, u16);

fn test_mem() -> GuestMemoryMmap<()> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    mem.write_slice(&vec![FILL; MEM_SIZE - BUF as usize], GuestAddress(BUF))
        .unwrap();
    mem
}

fn guest(mem: &GuestMemoryMmap<()>, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// A vnet header (flags, gso_type, rest 0) followed by `payload_len` bytes of a pattern
/// seeded by `seed`.
fn frame_with(flags: u8, gso_type: u8, payload_len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f[0] = flags;
    f[1] = gso_type;
    f.extend((0..payload_len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

fn frame(payload_len: usize, seed: u8) -> Vec<u8> {
    frame_with(0, 0, payload_len, seed)
}

/// `f` as the guest must see it: num_buffers set.
fn with_num_buffers(f: &[u8], n: u16) -> Vec<u8> {
    let mut f = f.to_vec();
    f[10..12].copy_from_slice(&n.to_le_bytes());
    f
}

#[derive(Default)]
struct FakeState {
    /// Successful reads.
    reads: AtomicUsize,
    /// errno every write fails with; 0 for none.
    write_errno: AtomicI32,
    offloads: Mutex<Vec<u32>>,
    /// Frames read before the socket's (lets a test queue more than a socket buffer holds).
    injected: Mutex<VecDeque<Vec<u8>>>,
}

/// The TAP stand-in: one end of a datagram socket pair, which keeps frame boundaries.
struct Fake {
    sock: UnixDatagram,
    state: Arc<FakeState>,
}

impl AsRawFd for Fake {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl NetBackend for Fake {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let injected = self.state.injected.lock().unwrap().pop_front();
        let n = match injected {
            Some(f) => {
                buf[..f.len()].copy_from_slice(&f);
                f.len()
            }
            None => self.sock.recv(buf)?,
        };
        self.state.reads.fetch_add(1, Ordering::SeqCst);
        Ok(n)
    }

    fn write_frame(&mut self, iov: &[IoSlice<'_>]) -> io::Result<usize> {
        let errno = self.state.write_errno.load(Ordering::SeqCst);
        if errno != 0 {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let data: Vec<u8> = iov.iter().flat_map(|s| s.iter().copied()).collect();
        self.sock.send(&data)
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.state.offloads.lock().unwrap().push(flags);
        Ok(())
    }
}

/// A driver's view of one split ring: chains are written at consecutive descriptor
/// indices (wrapping) and made available.
///
/// The descriptor table and the available ring come from [`MockSplitQueue`]; the used ring
/// is placed here, after the available ring's `used_event`, because `MockSplitQueue::create`
/// in virtio-queue 0.18 places it too early, overlapping the available ring and its
/// `used_event` (rust-vmm/vm-virtio#400).
struct Ring<'a> {
    mock: MockSplitQueue<'a, GuestMemoryMmap<()>>,
    mem: &'a GuestMemoryMmap<()>,
    used_addr: GuestAddress,
    size: u16,
    next_desc: u16,
}

impl<'a> Ring<'a> {
    fn new(mem: &'a GuestMemoryMmap<()>, base: u64, size: u16) -> Self {
        let mock = MockSplitQueue::create(mem, GuestAddress(base), size);
        // flags, idx, ring, used_event; 4-byte aligned.
        let used = (mock.avail_addr().0 + 6 + 2 * u64::from(size) + 3) & !3;
        // Zero the used ring: flags, idx, ring, avail_event.
        mem.write_slice(&vec![0u8; 6 + 8 * usize::from(size)], GuestAddress(used))
            .unwrap();
        Ring {
            mock,
            mem,
            used_addr: GuestAddress(used),
            size,
            next_desc: 0,
        }
    }

    /// Writes the chain of `(addr, len, flags)` descriptors and makes it available.
    fn add(&mut self, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = self.next_desc;
            let next = (idx + 1) % self.size;
            let last = i + 1 == descs.len();
            let (flags, next_field) = if last {
                (flags, 0)
            } else {
                (flags | VRING_DESC_F_NEXT as u16, next)
            };
            let desc = SplitDescriptor::new(addr, len, flags, next_field);
            self.mock
                .desc_table()
                .store(idx, RawDescriptor::from(desc))
                .unwrap();
            self.next_desc = next;
        }
        let avail = self.mock.avail();
        let idx = avail.idx().load();
        avail
            .ring()
            .ref_at(usize::from(idx % self.size))
            .unwrap()
            .store(head);
        avail.idx().store(idx.wrapping_add(1));
        head
    }

    /// Writes descriptors `(addr, len, flags, next)` as they are at consecutive indices,
    /// `next` counted from the first of them (so `(.., F_NEXT, 0)` points back at the
    /// head), and makes the first available.
    fn add_linked(&mut self, descs: &[Linked]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let next = (head + next) % self.size;
            let desc = SplitDescriptor::new(addr, len, flags, next);
            self.mock
                .desc_table()
                .store(idx, RawDescriptor::from(desc))
                .unwrap();
        }
        self.next_desc = (head + descs.len() as u16) % self.size;
        self.add_raw_head(head);
        head
    }

    /// Makes `head` available as is, whatever it is.
    fn add_raw_head(&self, head: u16) {
        let avail = self.mock.avail();
        let idx = avail.idx().load();
        avail
            .ring()
            .ref_at(usize::from(idx % self.size))
            .unwrap()
            .store(head);
        avail.idx().store(idx.wrapping_add(1));
    }

    fn avail_idx(&self) -> u16 {
        self.mock.avail().idx().load()
    }

    fn set_avail_idx(&self, idx: u16) {
        self.mock.avail().idx().store(idx);
    }

    fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.used_addr.0 + 2))
            .unwrap()
    }

    /// The used entries so far (the last `size` of them), as (head, len).
    fn used(&self) -> Vec<(u32, u32)> {
        let idx = self.used_idx();
        let first = idx.saturating_sub(self.size);
        (first..idx)
            .map(|i| {
                let addr = self.used_addr.0 + 4 + 8 * u64::from(i % self.size);
                let id: u32 = self.mem.read_obj(GuestAddress(addr)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(addr + 4)).unwrap();
                (id, len)
            })
            .collect()
    }

    fn used_flags(&self) -> u16 {
        self.mem.read_obj(self.used_addr).unwrap()
    }

    fn avail_event(&self) -> u16 {
        let addr = self.used_addr.0 + 4 + 8 * u64::from(self.size);
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// Sets `used_event` to the current used index, as a driver with EVENT_IDX does to
    /// get an interrupt for the next used entry.
    fn want_interrupt(&self) {
        let addr = self.mock.avail_addr().0 + 4 + 2 * u64::from(self.size);
        self.mem
            .write_obj(self.used_idx(), GuestAddress(addr))
            .unwrap();
    }

    fn queue(&self, event_idx: bool) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.try_set_desc_table_address(self.mock.desc_table_addr())
            .unwrap();
        q.try_set_avail_ring_address(self.mock.avail_addr())
            .unwrap();
        q.try_set_used_ring_address(self.used_addr).unwrap();
        q.set_ready(true);
        q.set_event_idx(event_idx);
        assert!(q.is_valid(self.mem));
        q
    }
}

struct Harness<'a> {
    mem: &'a GuestMemoryMmap<()>,
    rx: Ring<'a>,
    tx: Ring<'a>,
    net: Net<Fake>,
    /// The far end of the fake TAP: what the host network would see.
    peer: UnixDatagram,
    state: Arc<FakeState>,
    irq: Arc<RecordingInterrupt>,
    evts: Vec<EventFd>,
}

const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];

fn fake() -> (Fake, UnixDatagram, Arc<FakeState>) {
    let (a, b) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    let state = Arc::new(FakeState::default());
    (
        Fake {
            sock: a,
            state: state.clone(),
        },
        b,
        state,
    )
}

impl<'a> Harness<'a> {
    /// An inactive device and rings of `size`.
    fn inactive(mem: &'a GuestMemoryMmap<()>, size: u16) -> Self {
        let (backend, peer, state) = fake();
        Harness {
            mem,
            rx: Ring::new(mem, RX_RING, size),
            tx: Ring::new(mem, TX_RING, size),
            net: Net::new(backend, MAC),
            peer,
            state,
            irq: Arc::new(RecordingInterrupt::default()),
            evts: (0..2)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect(),
        }
    }

    /// A device activated with `device_features` (VERSION_1 added), rings of 16.
    fn new(mem: &'a GuestMemoryMmap<()>, device_features: u64) -> Self {
        Self::with_size(mem, device_features, 16)
    }

    /// A device activated with `device_features` (VERSION_1 added), rings of `size`.
    fn with_size(mem: &'a GuestMemoryMmap<()>, device_features: u64, size: u16) -> Self {
        let mut h = Self::inactive(mem, size);
        h.activate(device_features, false);
        h
    }

    fn activate(&mut self, device_features: u64, event_idx: bool) {
        let mut f = features::VERSION_1 | device_features;
        if event_idx {
            f |= features::RING_EVENT_IDX;
        }
        self.net
            .activate(ActivateContext {
                mem: self.mem.clone(),
                features: f,
                queues: vec![self.rx.queue(event_idx), self.tx.queue(event_idx)],
                queue_evts: self.evts.iter().map(|e| e.try_clone().unwrap()).collect(),
                interrupt: self.irq.clone(),
            })
            .unwrap();
    }

    /// The host sends `f` towards the guest.
    fn host_send(&self, f: &[u8]) {
        assert_eq!(self.peer.send(f).unwrap(), f.len());
    }

    /// Everything the guest sent to the host so far.
    fn host_recv(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; MAX_PACKET_LEN + 1];
        loop {
            match self.peer.recv(&mut buf) {
                Ok(n) => out.push(buf[..n].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return out,
                Err(e) => panic!("recv: {e}"),
            }
        }
    }

    /// The TAP became readable.
    fn tap_event(&mut self) {
        self.net.process_extra_event(0, EventSet::IN);
    }

    fn kick_rx(&mut self) {
        self.net.process_queue(RX_QUEUE);
    }

    fn kick_tx(&mut self) {
        self.net.process_queue(TX_QUEUE);
    }

    fn offloads(&self) -> Vec<u32> {
        self.state.offloads.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------- TX

#[test]
fn tx_single_descriptor() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, 1 << VIRTIO_NET_F_CSUM);
    let f = frame(100, 1);
    mem.write_slice(&f, GuestAddress(BUF)).unwrap();
    let head = h.tx.add(&[(BUF, f.len() as u32, R)]);
    h.kick_tx();
    assert_eq!(h.host_recv(), vec![f.clone()]);
    assert_eq!(h.tx.used(), vec![(u32::from(head), 0)]);
    assert_eq!(h.irq.take(), vec![TX_QUEUE]);
    let c = h.net.counters();
    assert_eq!(
        (c.tx_packets, c.tx_bytes, c.tx_errors, c.tx_dropped),
        (1, 100, 0, 0)
    );
    // The guest's buffer is unchanged.
    assert_eq!(guest(&mem, BUF, f.len()), f);
}

#[test]
fn tx_frame_over_three_descriptors() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, 0);
    let f = frame(1000, 2);
    // Header alone, then the payload split unevenly over two distant buffers.
    mem.write_slice(&f[..12], GuestAddress(BUF)).unwrap();
    mem.write_slice(&f[12..712], GuestAddress(BUF + 0x1000))
        .unwrap();
    mem.write_slice(&f[712..], GuestAddress(BUF + 0x3000))
        .unwrap();
    // One chain before it, so the head is not 0.
    let f0 = frame(20, 3);
    mem.write_slice(&f0, GuestAddress(BUF + 0x8000)).unwrap();
    let h0 = h.tx.add(&[(BUF + 0x8000, f0.len() as u32, R)]);
    let head =
        h.tx.add(&[(BUF, 12, R), (BUF + 0x1000, 700, R), (BUF + 0x3000, 300, R)]);
    assert_eq!(head, 1);
    h.kick_tx();
    assert_eq!(h.host_recv(), vec![f0, f]);
    assert_eq!(h.tx.used(), vec![(u32::from(h0), 0), (u32::from(head), 0)]);
    // Both used in one pass: one interrupt.
    assert_eq!(h.irq.take(), vec![TX_QUEUE]);
    assert_eq!(h.net.counters().tx_packets, 2);
    assert_eq!(h.net.counters().tx_bytes, 1020);
}

#[test]
fn tx_malformed_chains_are_returned_and_counted() {
    let mem = test_mem();
    let mut h = Harness::with_size(&mem, 0, 64);
    let good = frame(60, 4);
    mem.write_slice(&good, GuestAddress(BUF)).unwrap();
    let far = MEM_SIZE as u64;
    let cases: Vec<(&str, Vec<Desc>)> = vec![
        (
            "device-writable descriptor",
            vec![(BUF, 12, R), (BUF + 0x1_0000, 100, W)],
        ),
        ("shorter than the header", vec![(BUF, 8, R)]),
        ("only writable", vec![(BUF + 0x1_0000, 100, W)]),
        (
            "longer than MAX_PACKET_LEN",
            vec![(BUF, 40_000, R), (BUF + 0x2_0000, 40_000, R)],
        ),
        ("outside guest memory", vec![(BUF, 12, R), (far, 100, R)]),
        ("straddling the end of memory", vec![(far - 10, 100, R)]),
        ("huge address", vec![(u64::MAX - 4, 64, R)]),
    ];
    let mut expected_used = Vec::new();
    for (i, (what, chain)) in cases.iter().enumerate() {
        let bad = h.tx.add(chain);
        let ok = h.tx.add(&[(BUF, good.len() as u32, R)]);
        h.kick_tx();
        expected_used.push((u32::from(bad), 0));
        expected_used.push((u32::from(ok), 0));
        assert_eq!(h.tx.used(), expected_used, "{what}");
        assert_eq!(
            h.host_recv(),
            vec![good.clone()],
            "{what}: only the good frame"
        );
        let c = h.net.counters();
        assert_eq!(c.tx_errors, i as u64 + 1, "{what}");
        assert_eq!(c.tx_packets, i as u64 + 1, "{what}");
        assert_eq!(c.tx_dropped, 0, "{what}");
    }
    // The device-writable buffer was not written to.
    assert_eq!(guest(&mem, BUF + 0x1_0000, 100), vec![FILL; 100]);
}

#[test]
fn tx_backend_full_drops_and_counts() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, 0);
    let f = frame(60, 5);
    mem.write_slice(&f, GuestAddress(BUF)).unwrap();
    h.state.write_errno.store(libc::EAGAIN, Ordering::SeqCst);
    let a = h.tx.add(&[(BUF, f.len() as u32, R)]);
    h.kick_tx();
    assert_eq!(h.tx.used(), vec![(u32::from(a), 0)]);
    assert!(h.host_recv().is_empty());
    assert_eq!(h.net.counters().tx_dropped, 1);
    assert_eq!(h.net.counters().tx_errors, 0);
    h.state.write_errno.store(0, Ordering::SeqCst);
    h.tx.add(&[(BUF, f.len() as u32, R)]);
    h.kick_tx();
    assert_eq!(h.host_recv(), vec![f]);
    assert_eq!(h.net.counters().tx_packets, 1);
}

#[test]
fn tx_more_than_a_run_reschedules_itself() {
    let mem = test_mem();
    let mut h = Harness::inactive(&mem, 256);
    h.activate(0, false);
    let f = frame(20, 6);
    mem.write_slice(&f, GuestAddress(BUF)).unwrap();
    for _ in 0..256 {
        h.tx.add(&[(BUF, f.len() as u32, R)]);
    }
    // Half of them now, the rest after the ring wraps.
    h.kick_tx();
    assert_eq!(h.tx.used_idx(), 256);
    assert!(h.evts[1].read().is_ok(), "the tx queue was re-signalled");
    for _ in 0..10 {
        h.tx.add(&[(BUF, f.len() as u32, R)]);
    }
    h.kick_tx();
    assert_eq!(h.tx.used_idx(), 266);
    assert!(
        h.evts[1].read().is_err(),
        "not re-signalled below the limit"
    );
    assert_eq!(h.host_recv().len(), 266);
}

// ---------------------------------------------------------------- RX

#[test]
fn rx_mergeable_frame_spans_chains_and_descriptors() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, MRG);
    // Chain A has two descriptors (1000 + 500), B and C one of 1500 each, D is spare.
    let a = h.rx.add(&[(BUF, 1000, W), (BUF + 0x1000, 500, W)]);
    let b = h.rx.add(&[(BUF + 0x2000, 1500, W)]);
    let c = h.rx.add(&[(BUF + 0x3000, 1500, W)]);
    let d = h.rx.add(&[(BUF + 0x4000, 1500, W)]);
    // 3012 bytes: 1500 + 1500 + 12.
    let f = frame(3000, 7);
    h.host_send(&f);
    h.tap_event();
    assert_eq!(
        h.rx.used(),
        vec![
            (u32::from(a), 1500),
            (u32::from(b), 1500),
            (u32::from(c), 12)
        ]
    );
    let expect = with_num_buffers(&f, 3);
    let mut got = guest(&mem, BUF, 1000);
    got.extend(guest(&mem, BUF + 0x1000, 500));
    got.extend(guest(&mem, BUF + 0x2000, 1500));
    got.extend(guest(&mem, BUF + 0x3000, 12));
    assert_eq!(got, expect);
    // Nothing past the frame's bytes.
    assert_eq!(guest(&mem, BUF + 1000, 16), vec![FILL; 16]);
    assert_eq!(guest(&mem, BUF + 0x3000 + 12, 1488), vec![FILL; 1488]);
    assert_eq!(guest(&mem, BUF + 0x4000, 1500), vec![FILL; 1500]);
    assert_eq!(h.irq.take(), vec![RX_QUEUE]);
    let cnt = h.net.counters();
    assert_eq!((cnt.rx_packets, cnt.rx_bytes), (1, 3000));

    // 2012 bytes: D and one more chain.
    let e = h.rx.add(&[(BUF + 0x5000, 1500, W)]);
    let f2 = frame(2000, 8);
    h.host_send(&f2);
    h.tap_event();
    assert_eq!(
        h.rx.used()[3..],
        [(u32::from(d), 1500), (u32::from(e), 512)]
    );
    let mut got = guest(&mem, BUF + 0x4000, 1500);
    got.extend(guest(&mem, BUF + 0x5000, 512));
    assert_eq!(got, with_num_buffers(&f2, 2));
    assert_eq!(h.net.rx_pending_len(), 0);
}

#[test]
fn rx_without_mergeable_buffers_uses_one_chain() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, 0);
    // A "big packets" chain: header descriptor plus page-sized ones.
    let a = h.rx.add(&[
        (BUF, 12, W),
        (BUF + 0x1000, 4096, W),
        (BUF + 0x2000, 4096, W),
    ]);
    let f = frame(5000, 9);
    h.host_send(&f);
    h.tap_event();
    assert_eq!(h.rx.used(), vec![(u32::from(a), 5012)]);
    let mut got = guest(&mem, BUF, 12);
    got.extend(guest(&mem, BUF + 0x1000, 4096));
    got.extend(guest(&mem, BUF + 0x2000, 904));
    assert_eq!(got, with_num_buffers(&f, 1));
    assert_eq!(guest(&mem, BUF + 0x2000 + 904, 8), vec![FILL; 8]);
}

#[test]
fn rx_waits_for_buffers_without_losing_frames() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, MRG);
    let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(100 + 50 * i, i as u8)).collect();
    for f in &frames {
        h.host_send(f);
    }
    h.tap_event();
    // One frame was read and waits; the backend is not read further.
    assert_eq!(h.state.reads.load(Ordering::SeqCst), 1);
    assert_eq!(h.net.rx_pending_len(), frames[0].len());
    assert_eq!(h.rx.used_idx(), 0);
    assert!(h.irq.take().is_empty());
    // Notifications are on, so the driver will kick when it adds buffers.
    assert_eq!(h.rx.used_flags() & VRING_USED_F_NO_NOTIFY as u16, 0);
    // More readiness and spurious kicks change nothing and read nothing.
    h.tap_event();
    h.kick_rx();
    assert_eq!(h.state.reads.load(Ordering::SeqCst), 1);
    assert_eq!(h.rx.used_idx(), 0);
    let c = h.net.counters();
    assert_eq!((c.rx_packets, c.rx_dropped, c.rx_errors), (0, 0, 0));

    // The driver posts buffers and kicks: everything arrives, in order.
    let heads: Vec<u16> = (0..3)
        .map(|i| h.rx.add(&[(BUF + 0x1000 * i, 1500, W)]))
        .collect();
    h.kick_rx();
    let used = h.rx.used();
    assert_eq!(used.len(), 3);
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(used[i], (u32::from(heads[i]), f.len() as u32));
        assert_eq!(
            guest(&mem, BUF + 0x1000 * i as u64, f.len()),
            with_num_buffers(f, 1)
        );
    }
    assert_eq!(h.irq.take(), vec![RX_QUEUE]);
    assert_eq!(h.net.rx_pending_len(), 0);
    assert_eq!(h.net.counters().rx_packets, 3);
    // Buffers ran out exactly with the frames; the backend was drained to EAGAIN, and
    // kicks are off again until buffers run short.
    assert_eq!(h.state.reads.load(Ordering::SeqCst), 3);
    assert_ne!(h.rx.used_flags() & VRING_USED_F_NO_NOTIFY as u16, 0);
}

#[test]
fn rx_partial_buffers_are_put_back_with_event_idx() {
    let mem = test_mem();
    let mut h = Harness::inactive(&mem, 16);
    h.activate(MRG, true);
    // Needs three 1500-byte buffers; only two are there.
    let a = h.rx.add(&[(BUF, 1500, W)]);
    let b = h.rx.add(&[(BUF + 0x1000, 1500, W)]);
    let f = frame(3100, 10);
    h.host_send(&f);
    h.tap_event();
    assert_eq!(h.rx.used_idx(), 0, "no used entry for unfilled chains");
    assert_eq!(h.net.rx_pending_len(), f.len());
    // avail_event asks for a kick when the third buffer comes.
    assert_eq!(h.rx.avail_event(), 2);
    assert_eq!(guest(&mem, BUF, 16), vec![FILL; 16], "nothing written yet");
    let c = h.rx.add(&[(BUF + 0x2000, 1500, W)]);
    h.kick_rx();
    assert_eq!(
        h.rx.used(),
        vec![
            (u32::from(a), 1500),
            (u32::from(b), 1500),
            (u32::from(c), 112)
        ]
    );
    let mut got = guest(&mem, BUF, 1500);
    got.extend(guest(&mem, BUF + 0x1000, 1500));
    got.extend(guest(&mem, BUF + 0x2000, 112));
    assert_eq!(got, with_num_buffers(&f, 3));
}

#[test]
fn interrupts_follow_used_event_with_event_idx() {
    let mem = test_mem();
    let mut h = Harness::inactive(&mem, 16);
    h.activate(MRG, true);
    // used_event 0: the driver wants an interrupt once entry 0 is used.
    h.rx.want_interrupt();
    h.rx.add(&[(BUF, 1500, W)]);
    h.rx.add(&[(BUF + 0x1000, 1500, W)]);
    h.host_send(&frame(10, 1));
    h.tap_event();
    assert_eq!(h.irq.take(), vec![RX_QUEUE]);
    // used_event still 0: no interrupt for entry 1.
    h.host_send(&frame(10, 2));
    h.tap_event();
    assert_eq!(h.rx.used_idx(), 2);
    assert!(h.irq.take().is_empty());
    // TX the same way.
    let f = frame(20, 3);
    mem.write_slice(&f, GuestAddress(BUF + 0x8000)).unwrap();
    h.tx.want_interrupt();
    h.tx.add(&[(BUF + 0x8000, f.len() as u32, R)]);
    h.kick_tx();
    assert_eq!(h.irq.take(), vec![TX_QUEUE]);
    h.tx.add(&[(BUF + 0x8000, f.len() as u32, R)]);
    h.kick_tx();
    assert!(h.irq.take().is_empty());
    h.tx.want_interrupt();
    h.tx.add(&[(BUF + 0x8000, f.len() as u32, R)]);
    h.kick_tx();
    assert_eq!(h.irq.take(), vec![TX_QUEUE]);
    assert_eq!(h.host_recv().len(), 3);
}

#[test]
fn rx_malformed_chains_are_returned_and_counted() {
    let mem = test_mem();
    let mut h = Harness::with_size(&mem, MRG, 64);
    let far = MEM_SIZE as u64;
    let cases: Vec<(&str, Vec<Desc>)> = vec![
        ("device-readable descriptor", vec![(BUF, 1500, R)]),
        (
            "readable after writable",
            vec![(BUF, 100, W), (BUF + 0x100, 1400, R)],
        ),
        ("outside guest memory", vec![(far, 1500, W)]),
        ("straddling the end of memory", vec![(far - 100, 1500, W)]),
        (
            "second descriptor outside memory",
            vec![(BUF, 100, W), (u64::MAX - 8, 1400, W)],
        ),
        ("smaller than the header", vec![(BUF, 11, W)]),
        ("empty", vec![(BUF, 0, W)]),
    ];
    let mut expected = Vec::new();
    for (i, (what, chain)) in cases.iter().enumerate() {
        let bad = h.rx.add(chain);
        let good = h.rx.add(&[(BUF + 0x10_0000, 1500, W)]);
        let f = frame(200, i as u8);
        h.host_send(&f);
        h.tap_event();
        expected.push((u32::from(bad), 0));
        expected.push((u32::from(good), f.len() as u32));
        assert_eq!(h.rx.used(), expected, "{what}");
        assert_eq!(
            guest(&mem, BUF + 0x10_0000, f.len()),
            with_num_buffers(&f, 1),
            "{what}"
        );
        let c = h.net.counters();
        assert_eq!(
            (c.rx_errors, c.rx_packets),
            (i as u64 + 1, i as u64 + 1),
            "{what}"
        );
        // Nothing was written into the bad chains' buffers.
        assert_eq!(guest(&mem, BUF, 0x1000), vec![FILL; 0x1000], "{what}");
    }
    assert_eq!(h.net.counters().rx_dropped, 0);
}

#[test]
fn bogus_avail_index_and_head_index_are_survived() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, MRG);
    let f = frame(30, 1);
    mem.write_slice(&f, GuestAddress(BUF)).unwrap();

    // TX: an avail index far ahead of the ring is left alone.
    let good = h.tx.avail_idx();
    h.tx.set_avail_idx(good.wrapping_add(100));
    h.kick_tx();
    assert_eq!(h.tx.used_idx(), 0);
    assert!(h.host_recv().is_empty());
    // The driver fixes it: the queue works.
    h.tx.set_avail_idx(good);
    h.tx.add(&[(BUF, f.len() as u32, R)]);
    h.kick_tx();
    assert_eq!(h.host_recv(), vec![f.clone()]);

    // RX: the same; the frame waits instead of being lost.
    let good = h.rx.avail_idx();
    h.rx.set_avail_idx(good.wrapping_add(100));
    h.host_send(&f);
    h.tap_event();
    assert_eq!(h.rx.used_idx(), 0);
    assert_eq!(h.net.rx_pending_len(), f.len());
    h.rx.set_avail_idx(good);

    // A head index beyond the queue size: a chain with no descriptors, counted and
    // skipped (it cannot be returned); the next chain takes the frame.
    h.rx.add_raw_head(200);
    let ok = h.rx.add(&[(BUF + 0x1000, 1500, W)]);
    h.kick_rx();
    assert_eq!(h.rx.used(), vec![(u32::from(ok), f.len() as u32)]);
    assert_eq!(h.net.counters().rx_errors, 1);
    assert_eq!(h.net.counters().rx_packets, 1);
}

#[test]
fn rx_bad_chain_inside_a_mergeable_frame() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, MRG);
    let a = h.rx.add(&[(BUF, 1500, W)]);
    let bad = h.rx.add(&[(BUF + 0x1000, 1500, R)]);
    let c = h.rx.add(&[(BUF + 0x2000, 1500, W)]);
    let d = h.rx.add(&[(BUF + 0x3000, 1500, W)]);
    let e = h.rx.add(&[(BUF + 0x4000, 1500, W)]);
    let f = frame(3000, 11);
    h.host_send(&f);
    h.tap_event();
    // A was taken for the frame when the bad chain showed up: both go back unused, ahead
    // of the frame's own entries, which stay consecutive.
    assert_eq!(
        h.rx.used(),
        vec![
            (u32::from(a), 0),
            (u32::from(bad), 0),
            (u32::from(c), 1500),
            (u32::from(d), 1500),
            (u32::from(e), 12)
        ]
    );
    assert_eq!(guest(&mem, BUF, 1500), vec![FILL; 1500]);
    assert_eq!(guest(&mem, BUF + 0x1000, 1500), vec![FILL; 1500]);
    let mut got = guest(&mem, BUF + 0x2000, 1500);
    got.extend(guest(&mem, BUF + 0x3000, 1500));
    got.extend(guest(&mem, BUF + 0x4000, 12));
    assert_eq!(got, with_num_buffers(&f, 3));
    let cnt = h.net.counters();
    assert_eq!((cnt.rx_errors, cnt.rx_packets, cnt.rx_dropped), (1, 1, 0));
}

#[test]
fn rx_without_mergeable_buffers_drops_frames_too_large_for_the_buffer() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, 0);
    let small = h.rx.add(&[(BUF, 100, W)]);
    let big = frame(1000, 12);
    let next = frame(50, 13);
    h.host_send(&big);
    h.host_send(&next);
    h.tap_event();
    // The big frame is dropped; the buffer stays for the next frame.
    assert_eq!(h.rx.used(), vec![(u32::from(small), next.len() as u32)]);
    assert_eq!(guest(&mem, BUF, next.len()), with_num_buffers(&next, 1));
    assert_eq!(
        guest(&mem, BUF + next.len() as u64, 100 - next.len()),
        vec![FILL; 100 - next.len()]
    );
    let c = h.net.counters();
    assert_eq!((c.rx_dropped, c.rx_packets, c.rx_errors), (1, 1, 0));
}

#[test]
fn rx_backend_frames_of_bad_size_are_dropped() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, MRG);
    h.rx.add(&[(BUF, 1500, W)]);
    h.host_send(&[0u8; 11]);
    h.host_send(&vec![0u8; MAX_PACKET_LEN + 1]);
    let f = frame(10, 14);
    h.host_send(&f);
    h.tap_event();
    assert_eq!(h.rx.used(), vec![(0, f.len() as u32)]);
    assert_eq!(h.net.counters().rx_dropped, 2);
}

#[test]
fn rx_offload_metadata_must_match_negotiated_features() {
    let mem = test_mem();
    let needs_csum = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    let data_valid = VIRTIO_NET_HDR_F_DATA_VALID as u8;
    let tcpv4 = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
    let tcpv6 = VIRTIO_NET_HDR_GSO_TCPV6 as u8;
    let ecn = VIRTIO_NET_HDR_GSO_ECN as u8;
    let udp = VIRTIO_NET_HDR_GSO_UDP as u8;

    // No offloads accepted: only plain frames, and DATA_VALID is cleared.
    let mut h = Harness::new(&mem, MRG);
    for i in 0..4 {
        h.rx.add(&[(BUF + 0x1000 * i, 1500, W)]);
    }
    h.host_send(&frame_with(needs_csum, 0, 100, 1));
    h.host_send(&frame_with(0, tcpv4, 100, 2));
    h.host_send(&frame_with(0, ecn, 100, 3));
    let dv = frame_with(data_valid, 0, 100, 4);
    h.host_send(&dv);
    h.tap_event();
    assert_eq!(h.net.counters().rx_dropped, 3);
    assert_eq!(h.rx.used(), vec![(0, dv.len() as u32)]);
    let mut expect = with_num_buffers(&dv, 1);
    expect[0] = 0;
    assert_eq!(guest(&mem, BUF, dv.len()), expect);

    // CSUM + TSO4 (no TSO6, no ECN) accepted.
    let mem = test_mem();
    let mut h = Harness::new(
        &mem,
        MRG | 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4,
    );
    for i in 0..8 {
        h.rx.add(&[(BUF + 0x1000 * i, 1500, W)]);
    }
    let ok = [
        frame_with(needs_csum, tcpv4, 100, 5),
        frame_with(needs_csum | data_valid, 0, 100, 6),
    ];
    let bad = [
        frame_with(needs_csum, tcpv6, 100, 7),
        frame_with(needs_csum, tcpv4 | ecn, 100, 8),
        frame_with(needs_csum, udp, 100, 9),
        frame_with(0, 0x42, 100, 10),
    ];
    for f in ok.iter().chain(bad.iter()) {
        h.host_send(f);
    }
    h.tap_event();
    assert_eq!(h.net.counters().rx_dropped, 4);
    assert_eq!(h.net.counters().rx_packets, 2);
    assert_eq!(guest(&mem, BUF, ok[0].len()), with_num_buffers(&ok[0], 1));
    assert_eq!(
        guest(&mem, BUF + 0x1000, ok[1].len()),
        with_num_buffers(&ok[1], 1)
    );
}

#[test]
fn rx_more_than_a_run_reschedules_itself() {
    let mem = test_mem();
    let mut h = Harness::inactive(&mem, 256);
    h.activate(MRG, false);
    for i in 0..256 {
        h.rx.add(&[(BUF + 0x100 * i, 0x100, W)]);
    }
    {
        let mut injected = h.state.injected.lock().unwrap();
        for i in 0..MAX_RX_FRAMES_PER_RUN + 4 {
            injected.push_back(frame(40, i as u8));
        }
    }
    h.tap_event();
    assert_eq!(h.rx.used_idx(), 256);
    assert!(h.evts[0].read().is_ok(), "the rx queue was re-signalled");
    for i in 0..4 {
        h.rx.add(&[(BUF + 0x100 * i, 0x100, W)]);
    }
    // What the transport does when the EventFd fires.
    h.kick_rx();
    assert_eq!(h.rx.used_idx(), 260);
    assert!(h.evts[0].read().is_err());
    assert_eq!(h.net.counters().rx_packets, 260);
}

// ---------------------------------------------------------------- lifecycle

#[test]
fn activation_sets_offloads_and_leaves_waiting_frames_to_the_worker() {
    let mem = test_mem();
    let mut h = Harness::inactive(&mem, 16);
    h.rx.add(&[(BUF, 1500, W)]);
    let f = frame(64, 15);
    h.host_send(&f);
    // Inactive: the TAP event reads nothing.
    h.tap_event();
    h.kick_rx();
    assert_eq!(h.state.reads.load(Ordering::SeqCst), 0);
    let all = DEVICE_FEATURES;
    h.activate(all, false);
    assert_eq!(
        h.offloads(),
        vec![libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN]
    );
    // Activation runs no RX on the activating (vCPU) thread ...
    assert!(h.rx.used().is_empty());
    assert_eq!(h.state.reads.load(Ordering::SeqCst), 0);
    // ... the pass a `Threaded` worker makes over the backend after it does: the waiting
    // frame is in.
    h.tap_event();
    assert_eq!(h.rx.used(), vec![(0, f.len() as u32)]);
    assert_eq!(h.irq.take(), vec![RX_QUEUE]);
}

#[test]
fn activation_needs_both_queues() {
    let mem = test_mem();
    let h = Harness::inactive(&mem, 16);
    let (backend, _peer, _state) = fake();
    let mut net = Net::new(backend, MAC);
    let ctx = |ready_tx: bool| {
        let mut tx = h.tx.queue(false);
        tx.set_ready(ready_tx);
        ActivateContext {
            mem: mem.clone(),
            features: features::VERSION_1,
            queues: vec![h.rx.queue(false), tx],
            queue_evts: h.evts.iter().map(|e| e.try_clone().unwrap()).collect(),
            interrupt: h.irq.clone(),
        }
    };
    assert!(matches!(
        net.activate(ctx(false)),
        Err(tvm_virtio::Error::QueueNotReady(1))
    ));
    assert!(net.activate(ctx(true)).is_ok());
}

#[test]
fn reset_drops_the_pending_frame_and_keeps_the_backend() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, MRG);
    let old = frame(100, 16);
    h.host_send(&old);
    h.tap_event();
    assert_eq!(h.net.rx_pending_len(), old.len());
    h.net.reset();
    assert_eq!(h.net.rx_pending_len(), 0);
    assert_eq!(h.offloads().last(), Some(&0));
    // Inactive: notifications do nothing.
    h.kick_rx();
    h.kick_tx();
    h.tap_event();
    assert_eq!(h.state.reads.load(Ordering::SeqCst), 1);

    // The same backend works after re-activation on fresh rings.
    h.rx = Ring::new(&mem, 0x8000, 16);
    h.tx = Ring::new(&mem, 0xc000, 16);
    h.rx.add(&[(BUF, 1500, W)]);
    let new = frame(80, 17);
    h.host_send(&new);
    h.activate(MRG, false);
    // The RX kick of a driver that adds buffers.
    h.kick_rx();
    assert_eq!(h.rx.used(), vec![(0, new.len() as u32)]);
    assert_eq!(guest(&mem, BUF, new.len()), with_num_buffers(&new, 1));
    let out = frame(30, 18);
    mem.write_slice(&out, GuestAddress(BUF + 0x1000)).unwrap();
    h.tx.add(&[(BUF + 0x1000, out.len() as u32, R)]);
    h.kick_tx();
    assert_eq!(h.host_recv(), vec![out]);
}

#[test]
fn extra_event_source_is_the_backend_edge_triggered() {
    let (backend, _peer, _state) = fake();
    let fd = backend.as_raw_fd();
    let net = Net::new(backend, MAC);
    assert_eq!(
        net.extra_event_sources(),
        vec![(fd, EventSet::IN | EventSet::EDGE_TRIGGERED)]
    );
}

// ---------------------------------------------------------------- config, features, MAC

#[test]
fn config_space() {
    let (backend, _peer, _state) = fake();
    let mut net = Net::new(backend, MAC);
    let read = |net: &Net<Fake>, offset: u64, len: usize| {
        let mut data = vec![0xffu8; len];
        net.read_config(offset, &mut data);
        data
    };
    assert_eq!(read(&net, 0, 6), MAC);
    assert_eq!(read(&net, 0, 4), MAC[..4]);
    assert_eq!(read(&net, 4, 4), [MAC[4], MAC[5], 1, 0]);
    assert_eq!(read(&net, 6, 2), [1, 0], "status: link up");
    assert_eq!(read(&net, 3, 1), [MAC[3]]);
    assert_eq!(read(&net, 8, 8), [0; 8], "max_virtqueue_pairs, mtu, ...: 0");
    assert_eq!(read(&net, 0xffc, 4), [0; 4]);
    assert_eq!(read(&net, u64::MAX, 2), [0; 2]);
    net.write_config(0, &[0, 0, 0, 0]);
    net.write_config(6, &[0, 0]);
    assert_eq!(
        read(&net, 0, 8),
        [MAC[0], MAC[1], MAC[2], MAC[3], MAC[4], MAC[5], 1, 0]
    );
    assert_eq!(net.mac(), MAC);
    assert_eq!(net.device_type(), 1);
    assert_eq!(net.queue_max_sizes(), [256, 256]);
}

#[test]
fn feature_bits() {
    let (backend, _peer, _state) = fake();
    let net = Net::new(backend, MAC);
    let want = [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_STATUS,
    ]
    .iter()
    .fold(0u64, |acc, b| acc | 1 << b);
    assert_eq!(net.device_features(), want);
    assert_eq!(DEVICE_FEATURES, want);
    for absent in [
        VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_MQ,
        VIRTIO_NET_F_GUEST_UFO,
    ] {
        assert_eq!(want & 1 << absent, 0);
    }
    // The transport's bits are not ours to offer.
    assert_eq!(want & features::TRANSPORT, 0);
}

#[test]
fn offload_flags_follow_features_and_their_dependencies() {
    let csum = 1u64 << VIRTIO_NET_F_GUEST_CSUM;
    let tso4 = 1u64 << VIRTIO_NET_F_GUEST_TSO4;
    let tso6 = 1u64 << VIRTIO_NET_F_GUEST_TSO6;
    let ecn = 1u64 << VIRTIO_NET_F_GUEST_ECN;
    let host = 1u64 << VIRTIO_NET_F_HOST_TSO4 | 1 << VIRTIO_NET_F_CSUM;
    let (c, t4, t6, e) = (
        libc::TUN_F_CSUM,
        libc::TUN_F_TSO4,
        libc::TUN_F_TSO6,
        libc::TUN_F_TSO_ECN,
    );
    for (features, want) in [
        (0, 0),
        (host, 0),
        (csum, c),
        (csum | tso4, c | t4),
        (csum | tso6, c | t6),
        (csum | tso4 | tso6 | ecn, c | t4 | t6 | e),
        (csum | tso6 | ecn, c | t6 | e),
        // Dependencies the driver broke: never flags the kernel refuses.
        (tso4 | tso6 | ecn, 0),
        (csum | ecn, c),
    ] {
        assert_eq!(offload_flags(features), want, "features {features:#x}");
    }
}

#[test]
fn generated_mac_is_stable_local_and_unicast() {
    let a = generated_mac("tap0");
    assert_eq!(a, generated_mac("tap0"));
    // Pinned: the same name gives the same address on every run and every release.
    assert_eq!(format_mac(&a), format_mac(&generated_mac("tap0")));
    assert_eq!(a, [0x02, 0xd9, 0x63, 0xfc, 0xef, 0x07]);
    let names = ["tap0", "tap1", "tap10", "vm-net", "a", "tvmt123456789"];
    let macs: Vec<[u8; 6]> = names.iter().map(|n| generated_mac(n)).collect();
    for (i, m) in macs.iter().enumerate() {
        assert_eq!(m[0], 0x02, "{}: locally administered, unicast", names[i]);
        assert!(parse_mac(&format_mac(m)).is_ok());
        for other in &macs[i + 1..] {
            assert_ne!(m, other);
        }
    }
}

#[test]
fn parse_mac_table() {
    let good = [
        ("52:54:00:12:34:56", [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]),
        ("02:AB:cd:Ef:00:ff", [0x02, 0xab, 0xcd, 0xef, 0x00, 0xff]),
        ("00:00:00:00:00:01", [0, 0, 0, 0, 0, 1]),
        ("fe:ff:ff:ff:ff:ff", [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff]),
    ];
    for (s, want) in good {
        assert_eq!(parse_mac(s).unwrap(), want, "{s}");
        assert_eq!(parse_mac(&format_mac(&want)).unwrap(), want);
    }
    let bad = [
        "",
        "52:54:00:12:34",
        "52:54:00:12:34:56:78",
        "52:54:00:12:34:5",
        "52:54:00:12:34:567",
        "52-54-00-12-34-56",
        "5254.0012.3456",
        "52:54:00:12:34:5g",
        "52:54:00:12:34:+5",
        " 52:54:00:12:34:56",
        "52:54:00:12:34:56 ",
        "52::54:00:12:34:56",
        "52:54:00:12:34:56:",
        "01:00:5e:00:00:01",
        "ff:ff:ff:ff:ff:ff",
        "00:00:00:00:00:00",
        "５2:54:00:12:34:56",
    ];
    for s in bad {
        match parse_mac(s) {
            Err(Error::InvalidMac { input, .. }) => assert_eq!(input, s),
            other => panic!("{s:?}: {other:?}"),
        }
    }
}

#[test]
fn tap_name_validation() {
    for good in ["tap0", "t", "vm-net_1.2", "fifteen-chars-x"] {
        assert!(validate_tap_name(good).is_ok(), "{good}");
    }
    for bad in [
        "",
        "sixteen-chars-xx",
        ".",
        "..",
        "a/b",
        "a:b",
        "a b",
        "a\tb",
        "a\nb",
        "a\0b",
        "tap%d",
    ] {
        assert!(
            matches!(validate_tap_name(bad), Err(Error::InvalidTapName { .. })),
            "{bad:?}"
        );
        assert!(matches!(Tap::open(bad), Err(Error::InvalidTapName { .. })));
    }
}

#[test]
fn net_open_refuses_a_multicast_mac_before_touching_the_tap() {
    let cfg = NetConfig {
        tap: "tvm-never".into(),
        mac: Some([0x01, 0, 0x5e, 0, 0, 1]),
    };
    assert!(matches!(Net::open(&cfg), Err(Error::InvalidMac { .. })));
}

#[test]
fn error_messages() {
    let e = Error::TapPermission {
        name: "tap0".into(),
        source: io::Error::from_raw_os_error(libc::EPERM),
    };
    assert_eq!(
        e.to_string(),
        "no permission to create/attach TAP tap0 (needs CAP_NET_ADMIN)"
    );
    let e = Error::TunMissing(io::Error::from_raw_os_error(libc::ENOENT));
    assert!(e.to_string().contains("/dev/net/tun is missing"));
    let e = Error::TapBusy {
        name: "tap0".into(),
        source: io::Error::from_raw_os_error(libc::EBUSY),
    };
    assert!(e.to_string().contains("in use"));
}

#[test]
fn counters_are_logged() {
    let (backend, _peer, _state) = fake();
    let net = Net::new(backend, MAC);
    assert_eq!(net.counters(), NetCounters::default());
    // Only checks that it does not panic without a logger.
    net.log_counters();
    assert!(format!("{net:?}").contains("02:11:22:33:44:55"));
}

// ---------------------------------------------------------------- driver errors

const N: u16 = VRING_DESC_F_NEXT as u16;

/// A descriptor with its own flags and next index: address, length, flags, next (counted
/// from the chain's head).
type Linked = (u64, u32, u16, u16);

/// This thread's log lines at `level` since `test_log::start()`.
fn logged(level: log::Level) -> Vec<String> {
    tvm_util::test_log::lines(level)
}

#[test]
fn tx_loops_and_chains_that_do_not_end_are_refused() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, 0);
    // A valid-looking frame in the buffer every bad chain points at: were a chain sent,
    // it would reach the host.
    let f = frame(48, 20);
    mem.write_slice(&f, GuestAddress(BUF)).unwrap();
    let len = f.len() as u32;
    let cases: Vec<(&str, Vec<Linked>)> = vec![
        ("its own successor", vec![(BUF, len, R | N, 0)]),
        (
            "a cycle of two",
            vec![(BUF, 12, R | N, 1), (BUF + 12, len - 12, R | N, 0)],
        ),
        // Index 16 is beyond the queue of 16: the iterator stops after the header.
        ("a next index beyond the queue", vec![(BUF, len, R | N, 16)]),
    ];
    for (i, (what, descs)) in cases.iter().enumerate() {
        let head = h.tx.add_linked(descs);
        h.kick_tx();
        assert_eq!(h.tx.used().last(), Some(&(u32::from(head), 0)), "{what}");
        assert_eq!(h.host_recv(), Vec::<Vec<u8>>::new(), "{what}: nothing sent");
        assert_eq!(h.net.counters().tx_errors, i as u64 + 1, "{what}");
    }
    // The queue still works.
    h.tx.add(&[(BUF, len, R)]);
    h.kick_tx();
    assert_eq!(h.host_recv(), vec![f]);
    assert_eq!(h.net.counters().tx_packets, 1);
}

#[test]
fn rx_loops_are_returned_unused() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, MRG);
    let looped = h.rx.add_linked(&[(BUF, 1500, W | N, 0)]);
    let good = h.rx.add(&[(BUF + 0x1000, 1500, W)]);
    let f = frame(2000, 21);
    h.host_send(&f);
    let small = frame(100, 22);
    h.host_send(&small);
    h.tap_event();
    // The loop would have held the 2012 bytes (1500 bytes over and over); it goes back
    // unused, and the big frame waits for buffers.
    assert_eq!(h.rx.used(), vec![(u32::from(looped), 0)]);
    assert_eq!(guest(&mem, BUF, 1500), vec![FILL; 1500]);
    assert_eq!(h.net.rx_pending_len(), f.len());
    let more = h.rx.add(&[(BUF + 0x2000, 1500, W)]);
    h.kick_rx();
    assert_eq!(
        h.rx.used()[1..],
        [(u32::from(good), 1500), (u32::from(more), 512)]
    );
    let c = h.net.counters();
    assert_eq!((c.rx_errors, c.rx_packets), (1, 1));
}

#[test]
fn each_kind_of_driver_error_is_one_warning_naming_the_device() {
    tvm_util::test_log::start();
    let mem = test_mem();
    let mut h = Harness::with_size(&mem, MRG, 64);
    assert_eq!(h.net.name(), "virtio-net 02:11:22:33:44:55");
    let good = frame(60, 23);
    mem.write_slice(&good, GuestAddress(BUF)).unwrap();
    let far = MEM_SIZE as u64;
    for round in 0..3u64 {
        // TX: every kind of malformed chain.
        for chain in [
            vec![(BUF, 12, R), (BUF + 0x1_0000, 100, W)],
            vec![(BUF, 8, R)],
            vec![(BUF, 40_000, R), (BUF + 0x2_0000, 40_000, R)],
            vec![(far, 100, R)],
        ] {
            h.tx.add(&chain);
        }
        h.tx.add_linked(&[(BUF, 60, R | N, 0)]);
        h.kick_tx();
        // RX: every kind of malformed chain, each met by a frame.
        for chain in [
            vec![(BUF + 0x3_0000, 1500, R)],
            vec![(far, 1500, W)],
            vec![(BUF + 0x3_0000, 11, W)],
        ] {
            h.rx.add(&chain);
        }
        h.rx.add_linked(&[(BUF + 0x3_0000, 1500, W | N, 0)]);
        h.rx.add(&[(BUF + 0x4_0000, 1500, W)]);
        h.host_send(&frame(100, round as u8));
        h.tap_event();
        // Rings: a head beyond the queue on both queues, then an available index too far
        // ahead, fixed again.
        h.tx.add_raw_head(300);
        h.kick_tx();
        h.rx.add_raw_head(64);
        h.rx.add(&[(BUF + 0x4_0000, 1500, W)]);
        h.host_send(&frame(100, 0x40 + round as u8));
        h.tap_event();
        for ring in [&h.tx, &h.rx] {
            let idx = ring.avail_idx();
            ring.set_avail_idx(idx.wrapping_add(65));
        }
        h.kick_tx();
        h.host_send(&frame(100, 0x80 + round as u8));
        h.tap_event();
        h.kick_rx();
        assert_eq!(h.net.rx_pending_len(), 112, "the frame waits");
        for ring in [&h.tx, &h.rx] {
            let idx = ring.avail_idx();
            ring.set_avail_idx(idx.wrapping_sub(65));
        }
        h.rx.add(&[(BUF + 0x4_0000, 1500, W)]);
        h.kick_rx();
        assert_eq!(h.net.rx_pending_len(), 0);
        // Config writes.
        h.net.write_config(0, &[0; 6]);
    }
    // The device kept working: only good frames moved, the bad chains were counted.
    assert_eq!(h.host_recv(), Vec::<Vec<u8>>::new());
    let c = h.net.counters();
    assert_eq!((c.tx_errors, c.tx_packets), (3 * 6, 0));
    assert_eq!((c.rx_errors, c.rx_packets), (3 * 5, 3 * 3));
    let w = logged(log::Level::Warn);
    assert_eq!(w.len(), 4, "{w:#?}");
    for (line, what) in w.iter().zip([
        "malformed tx chain 0 returned unsent: device-writable descriptor at 0x110000",
        "malformed rx chain 0 returned unused: device-readable descriptor at 0x130000",
        "tx chain not returned: head index 300 is beyond the queue size 64",
        "write of 6 bytes to the read-only config at 0x0 ignored",
    ]) {
        assert!(line.starts_with("virtio-net 02:11:22:33:44:55: "), "{line}");
        assert!(line.contains(what), "{line} lacks {what}");
        assert!(
            line.ends_with("(repeats are logged at debug level)"),
            "{line}"
        );
    }
    // virtio-queue never got to log its own errors.
    assert_eq!(logged(log::Level::Error), Vec::<String>::new());
    // The repeats went to debug, the other kinds too.
    let debug = logged(log::Level::Debug);
    for what in [
        "returned unsent: 8 bytes, shorter than the vnet header",
        "returned unsent: longer than 65803 bytes",
        "returned unsent: descriptor 0x800000+0x64 outside guest memory",
        "returned unsent: the chain does not end",
        "returned unused: descriptor 0x800000+0x5dc outside guest memory",
        "returned unused: only 11 bytes",
        "returned unused: the chain does not end",
        "rx chain skipped: head index 64 is beyond the queue size 64",
        "tx queue left alone: the available index",
        "rx queue left alone: the available index",
    ] {
        assert!(
            debug.iter().any(|l| l.contains(what)),
            "no {what} in {debug:#?}"
        );
    }
}

/// Kicks in each flood test.
const FLOOD: u32 = 5000;

#[test]
fn a_tx_flood_of_malformed_chains_is_one_warning_and_allocates_nothing() {
    tvm_util::test_log::start();
    let mem = test_mem();
    let mut h = Harness::new(&mem, 0);
    let f = frame(48, 24);
    mem.write_slice(&f, GuestAddress(BUF)).unwrap();
    let bytes = h.net.buffer_bytes();
    for i in 0..FLOOD {
        // A loop, then a chain with a device-writable descriptor, in turn.
        if i % 2 == 0 {
            h.tx.add_linked(&[(BUF, 60, R | N, 0)]);
        } else {
            h.tx.add(&[(BUF, 60, W)]);
        }
        h.kick_tx();
    }
    assert_eq!(u32::from(h.tx.used_idx()), FLOOD % 0x1_0000);
    assert_eq!(h.net.counters().tx_errors, u64::from(FLOOD));
    assert_eq!(h.host_recv(), Vec::<Vec<u8>>::new());
    assert_eq!(h.net.buffer_bytes(), bytes);
    assert_eq!(logged(log::Level::Warn).len(), 1);
    assert_eq!(logged(log::Level::Error), Vec::<String>::new());
    // Still working.
    h.tx.add(&[(BUF, 60, R)]);
    h.kick_tx();
    assert_eq!(h.host_recv(), vec![f]);
}

#[test]
fn an_rx_flood_of_malformed_chains_is_one_warning_and_queues_no_frames() {
    tvm_util::test_log::start();
    let mem = test_mem();
    let mut h = Harness::new(&mem, MRG);
    let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(200, 30 + i)).collect();
    for f in &frames {
        h.host_send(f);
    }
    h.tap_event();
    // One frame read and pending, the others still in the backend.
    assert_eq!(h.net.rx_pending_len(), frames[0].len());
    let bytes = h.net.buffer_bytes();
    for i in 0..FLOOD {
        // Outside guest memory, or device-readable, in turn.
        if i % 2 == 0 {
            h.rx.add(&[(MEM_SIZE as u64, 1500, W)]);
        } else {
            h.rx.add(&[(BUF, 1500, R)]);
        }
        h.kick_rx();
        h.tap_event();
    }
    assert_eq!(u32::from(h.rx.used_idx()), FLOOD);
    assert!(h.rx.used().iter().all(|&(_, len)| len == 0));
    assert_eq!(h.net.counters().rx_errors, u64::from(FLOOD));
    // Nothing more was read from the backend, nothing was queued in the device.
    assert_eq!(h.state.reads.load(Ordering::SeqCst), 1);
    assert_eq!(h.net.rx_pending_len(), frames[0].len());
    assert_eq!(h.net.buffer_bytes(), bytes);
    assert_eq!(logged(log::Level::Warn).len(), 1);
    assert_eq!(logged(log::Level::Error), Vec::<String>::new());
    // Good buffers: the three frames arrive in order.
    for i in 0..3 {
        h.rx.add(&[(BUF + 0x1000 * i, 1500, W)]);
    }
    h.kick_rx();
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(
            guest(&mem, BUF + 0x1000 * i as u64, f.len()),
            with_num_buffers(f, 1)
        );
    }
    assert_eq!(h.net.counters().rx_packets, 3);
}

#[test]
fn a_kick_flood_on_a_broken_ring_is_one_warning_and_no_virtio_queue_error() {
    tvm_util::test_log::start();
    let mem = test_mem();
    let mut h = Harness::new(&mem, MRG);
    let f = frame(48, 25);
    mem.write_slice(&f, GuestAddress(BUF)).unwrap();
    h.host_send(&f);
    let bytes = h.net.buffer_bytes();
    // Available indices far ahead on both queues.
    let (tx_idx, rx_idx) = (h.tx.avail_idx(), h.rx.avail_idx());
    h.tx.set_avail_idx(tx_idx.wrapping_add(1000));
    h.rx.set_avail_idx(rx_idx.wrapping_add(1000));
    for _ in 0..FLOOD {
        h.kick_tx();
        h.kick_rx();
        h.tap_event();
    }
    assert_eq!((h.tx.used_idx(), h.rx.used_idx()), (0, 0));
    assert_eq!(h.net.rx_pending_len(), f.len());
    // Sane indices, but every head beyond the queue (16).
    h.tx.set_avail_idx(tx_idx);
    h.rx.set_avail_idx(rx_idx);
    for i in 0..FLOOD {
        h.tx.add_raw_head(16 + (i % 100) as u16);
        h.kick_tx();
        h.rx.add_raw_head(16);
        h.kick_rx();
    }
    assert_eq!((h.tx.used_idx(), h.rx.used_idx()), (0, 0));
    let c = h.net.counters();
    assert_eq!(
        (c.tx_errors, c.rx_errors),
        (u64::from(FLOOD), u64::from(FLOOD))
    );
    assert_eq!(h.net.buffer_bytes(), bytes);
    let w = logged(log::Level::Warn);
    assert_eq!(w.len(), 1, "{w:#?}");
    assert!(
        w[0].contains(
            "queue left alone: the available index 1000 is more than the queue \
             size 16 ahead of 0"
        ),
        "{w:#?}"
    );
    assert_eq!(logged(log::Level::Error), Vec::<String>::new());
    // Both queues still work.
    h.tx.add(&[(BUF, f.len() as u32, R)]);
    h.kick_tx();
    h.rx.add(&[(BUF + 0x1000, 1500, W)]);
    h.kick_rx();
    assert_eq!(h.host_recv(), vec![f.clone()]);
    assert_eq!(guest(&mem, BUF + 0x1000, f.len()), with_num_buffers(&f, 1));
}

#[test]
fn rx_head_beyond_the_queue_inside_a_mergeable_frame() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, MRG);
    let a = h.rx.add(&[(BUF, 1500, W)]);
    h.rx.add_raw_head(200);
    let f = frame(3000, 26);
    h.host_send(&f);
    h.tap_event();
    // A was taken for the frame when the bad head came: A goes back unused (the bad head
    // cannot), and the frame waits for more buffers.
    assert_eq!(h.rx.used(), vec![(u32::from(a), 0)]);
    assert_eq!(h.net.rx_pending_len(), f.len());
    let more: Vec<u16> = (1..=3)
        .map(|i| h.rx.add(&[(BUF + 0x1000 * i, 1500, W)]))
        .collect();
    h.kick_rx();
    assert_eq!(
        h.rx.used()[1..],
        [
            (u32::from(more[0]), 1500),
            (u32::from(more[1]), 1500),
            (u32::from(more[2]), 12)
        ]
    );
    let mut got = guest(&mem, BUF + 0x1000, 1500);
    got.extend(guest(&mem, BUF + 0x2000, 1500));
    got.extend(guest(&mem, BUF + 0x3000, 12));
    assert_eq!(got, with_num_buffers(&f, 3));
    let c = h.net.counters();
    assert_eq!((c.rx_errors, c.rx_packets), (1, 1));
}
