// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The network device behind the PCI transport, driven like a guest driver would: config
//! space, feature negotiation, both queues, DRIVER_OK, kicks through the notify area, the
//! TAP (a datagram socket pair here) watched by a real event manager, MSI-X and INTx.

#![allow(clippy::unwrap_used)]

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use tvm_bus::PciDevice;
use tvm_virtio::{features, InterruptSink, VirtioPciDevice};
use tvm_virtio_net::{Net, NetBackend, VNET_HDR_LEN};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
const QSIZE: u16 = 16;

/// The TAP stand-in: a datagram socket keeps frame boundaries like a TAP descriptor.
struct Fake(UnixDatagram);

impl AsRawFd for Fake {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for Fake {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }
    fn write_frame(&mut self, iov: &[IoSlice<'_>]) -> io::Result<usize> {
        let data: Vec<u8> = iov.iter().flat_map(|s| s.iter().copied()).collect();
        self.0.send(&data)
    }
    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Default)]
struct Sink {
    msix: Mutex<Vec<u16>>,
    intx: Mutex<Vec<bool>>,
}

impl InterruptSink for Sink {
    fn msix(&self, vector: u16) -> io::Result<()> {
        self.msix.lock().unwrap().push(vector);
        Ok(())
    }
    fn intx(&self, level: bool) -> io::Result<()> {
        self.intx.lock().unwrap().push(level);
        Ok(())
    }
}

type Dev = VirtioPciDevice<Net<Fake>>;

/// A driver's ring: descriptor table and available ring from [`MockSplitQueue`], the used
/// ring placed after the available ring's `used_event` (virtio-queue 0.18's
/// `MockSplitQueue::create` puts it too early, overlapping them: rust-vmm/vm-virtio#400).
struct Ring<'a> {
    mock: MockSplitQueue<'a, GuestMemoryMmap<()>>,
    mem: &'a GuestMemoryMmap<()>,
    used_addr: u64,
}

impl<'a> Ring<'a> {
    fn new(mem: &'a GuestMemoryMmap<()>, base: u64) -> Self {
        let mock = MockSplitQueue::create(mem, GuestAddress(base), QSIZE);
        let used_addr = (mock.avail_addr().0 + 6 + 2 * u64::from(QSIZE) + 3) & !3;
        mem.write_slice(
            &vec![0u8; 6 + 8 * usize::from(QSIZE)],
            GuestAddress(used_addr),
        )
        .unwrap();
        Ring {
            mock,
            mem,
            used_addr,
        }
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used_addr + 2)).unwrap()
    }

    /// Used entry `i` as (head, len).
    fn used(&self, i: u16) -> (u32, u32) {
        let addr = self.used_addr + 4 + 8 * u64::from(i % QSIZE);
        (
            self.mem.read_obj(GuestAddress(addr)).unwrap(),
            self.mem.read_obj(GuestAddress(addr + 4)).unwrap(),
        )
    }

    /// Sets used_event to the used index, as a driver with EVENT_IDX does when it wants
    /// an interrupt after the next used entry.
    fn want_interrupt(&self) {
        let addr = self.mock.avail_addr().0 + 4 + 2 * u64::from(QSIZE);
        self.mem
            .write_obj(self.used_idx(), GuestAddress(addr))
            .unwrap();
    }
}

fn r(dev: &Mutex<Dev>, offset: u64, len: usize) -> u64 {
    let mut data = [0u8; 8];
    dev.lock().unwrap().bar_read(offset, &mut data[..len]);
    u64::from_le_bytes(data)
}

fn w(dev: &Mutex<Dev>, offset: u64, len: usize, value: u64) {
    dev.lock()
        .unwrap()
        .bar_write(offset, &value.to_le_bytes()[..len]);
}

struct Setup {
    dev: Arc<Mutex<Dev>>,
    sink: Arc<Sink>,
    peer: UnixDatagram,
    manager: EventManager<Arc<Mutex<Dev>>>,
}

fn setup(mem: &GuestMemoryMmap<()>, msix: bool) -> Setup {
    let (a, b) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    let sink = Arc::new(Sink::default());
    let dev = Arc::new(Mutex::new(
        VirtioPciDevice::new(Net::new(Fake(a), MAC), mem.clone(), sink.clone()).unwrap(),
    ));
    {
        let mut d = dev.lock().unwrap();
        // Vendor 0x1af4, device 0x1041 (0x1040 + net); class: network, ethernet.
        assert_eq!(d.config_read(0), 0x1041_1af4);
        assert_eq!(d.config_read(2) >> 16, 0x0200);
        d.set_bar_addr(GuestAddress(0xc000_0000)).unwrap();
        if msix {
            let mut ptr = (d.config_read(0x34 / 4) & 0xff) as usize;
            while ptr != 0 && (d.config_read(ptr / 4) & 0xff) != 0x11 {
                ptr = ((d.config_read(ptr / 4) >> 8) & 0xff) as usize;
            }
            assert_ne!(ptr, 0);
            // Table size: 3 vectors (config + 2 queues).
            assert_eq!((d.config_read(ptr / 4) >> 16) & 0x7ff, 2);
            d.config_write(ptr / 4, 2, &0x8000u16.to_le_bytes());
            // Vectors 1 (rx) and 2 (tx) programmed and unmasked.
            for v in 1..3u64 {
                for (off, val) in [
                    (0u64, 0xfee0_0000u32),
                    (4, 0),
                    (8, 0x30 + v as u32),
                    (12, 0),
                ] {
                    d.bar_write(0x4000 + 16 * v + off, &val.to_le_bytes());
                }
            }
        }
    }
    let mut manager = EventManager::<Arc<Mutex<Dev>>>::new().unwrap();
    manager.add_subscriber(dev.clone());
    Setup {
        dev,
        sink,
        peer: b,
        manager,
    }
}

/// Negotiates features and sets up both queues (queue i on MSI-X vector i + 1), then
/// DRIVER_OK.
fn init_driver(dev: &Mutex<Dev>, rx: &Ring<'_>, tx: &Ring<'_>) {
    w(dev, 0x14, 1, 1);
    w(dev, 0x14, 1, 3);
    w(dev, 0x00, 4, 0);
    let lo = r(dev, 0x04, 4);
    w(dev, 0x00, 4, 1);
    let hi = r(dev, 0x04, 4);
    let offered = hi << 32 | lo;
    let want = features::VERSION_1
        | features::RING_EVENT_IDX
        | 1 << VIRTIO_NET_F_MRG_RXBUF
        | 1 << VIRTIO_NET_F_MAC
        | 1 << VIRTIO_NET_F_STATUS
        | 1 << VIRTIO_NET_F_CSUM
        | 1 << VIRTIO_NET_F_GUEST_CSUM;
    assert_eq!(offered & want, want, "offered {offered:#x}");
    w(dev, 0x08, 4, 0);
    w(dev, 0x0c, 4, want & 0xffff_ffff);
    w(dev, 0x08, 4, 1);
    w(dev, 0x0c, 4, want >> 32);
    w(dev, 0x14, 1, 0xb);
    assert_eq!(r(dev, 0x14, 1), 0xb, "FEATURES_OK accepted");
    assert_eq!(r(dev, 0x12, 2), 2, "num_queues");
    for (q, ring) in [rx, tx].into_iter().enumerate() {
        w(dev, 0x16, 2, q as u64);
        assert_eq!(r(dev, 0x18, 2), 256, "queue {q} max size");
        w(dev, 0x18, 2, u64::from(QSIZE));
        w(dev, 0x1a, 2, q as u64 + 1);
        w(dev, 0x20, 8, ring.mock.desc_table_addr().0);
        w(dev, 0x28, 8, ring.mock.avail_addr().0);
        w(dev, 0x30, 8, ring.used_addr);
        w(dev, 0x1c, 2, 1);
    }
    w(dev, 0x14, 1, 0xf);
    assert_eq!(r(dev, 0x14, 1), 0xf);
    assert!(dev.lock().unwrap().is_active());
}

fn frame(payload_len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend((0..payload_len).map(|i| (i as u8).wrapping_mul(3).wrapping_add(seed)));
    f
}

#[test]
fn guest_driver_tx_and_rx_with_msix() {
    tvm_util::test_log::start();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let mut s = setup(&mem, true);
    let rx = Ring::new(&mem, 0x0);
    let tx = Ring::new(&mem, 0x4000);
    let wr = VRING_DESC_F_WRITE as u16;
    let next = VRING_DESC_F_NEXT as u16;

    // The device config through the BAR: MAC and link up.
    let mut cfg = [0u8; 8];
    for (i, b) in cfg.iter_mut().enumerate() {
        *b = r(&s.dev, 0x2000 + i as u64, 1) as u8;
    }
    assert_eq!(cfg[..6], MAC);
    assert_eq!(r(&s.dev, 0x2006, 2), 1);

    // A frame arrives before the driver is up: the event is seen while inactive and
    // ignored, and the frame stays in the TAP.
    let early = frame(60, 1);
    s.peer.send(&early).unwrap();
    s.manager.run_with_timeout(50).unwrap();
    assert!(s.sink.msix.lock().unwrap().is_empty());

    init_driver(&s.dev, &rx, &tx);
    // Activation read the early frame; no RX buffers yet, so it waits.
    assert_eq!(s.dev.lock().unwrap().device().rx_pending_len(), early.len());

    // The driver fills the RX ring (two 2 KiB buffers) and kicks queue 0.
    rx.want_interrupt();
    rx.mock
        .add_desc_chains(
            &[
                RawDescriptor::from(SplitDescriptor::new(0x10_0000, 2048, wr, 0)),
                RawDescriptor::from(SplitDescriptor::new(0x10_0800, 2048, wr, 0)),
            ],
            0,
        )
        .unwrap();
    w(&s.dev, 0x3000, 2, 0);
    assert!(s.manager.run_with_timeout(100).unwrap() >= 1);
    assert_eq!(rx.used_idx(), 1);
    assert_eq!(rx.used(0), (0, early.len() as u32));
    let mut got = vec![0u8; early.len()];
    mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
    let mut expect = early.clone();
    expect[10] = 1; // num_buffers
    assert_eq!(got, expect);
    assert_eq!(*s.sink.msix.lock().unwrap(), vec![1]);

    // TX: header and payload in two descriptors, kick queue 1 at notify offset 4.
    let out = frame(1000, 2);
    mem.write_slice(&out[..VNET_HDR_LEN], GuestAddress(0x20_0000))
        .unwrap();
    mem.write_slice(&out[VNET_HDR_LEN..], GuestAddress(0x21_0000))
        .unwrap();
    tx.want_interrupt();
    tx.mock
        .add_desc_chains(
            &[
                RawDescriptor::from(SplitDescriptor::new(0x20_0000, 12, next, 1)),
                RawDescriptor::from(SplitDescriptor::new(0x21_0000, 1000, 0, 0)),
            ],
            0,
        )
        .unwrap();
    w(&s.dev, 0x3004, 2, 1);
    assert!(s.manager.run_with_timeout(100).unwrap() >= 1);
    let mut buf = vec![0u8; 4096];
    let n = s.peer.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &out[..]);
    assert_eq!(tx.used_idx(), 1);
    assert_eq!(tx.used(0), (0, 0));
    assert_eq!(*s.sink.msix.lock().unwrap(), vec![1, 2]);

    // RX driven by the TAP: a frame arrives, the event loop sees the descriptor readable.
    let incoming = frame(1500, 3);
    rx.want_interrupt();
    s.peer.send(&incoming).unwrap();
    assert!(s.manager.run_with_timeout(100).unwrap() >= 1);
    assert_eq!(rx.used_idx(), 2);
    assert_eq!(rx.used(1), (1, incoming.len() as u32));
    let mut got = vec![0u8; incoming.len()];
    mem.read_slice(&mut got, GuestAddress(0x10_0800)).unwrap();
    let mut expect = incoming.clone();
    expect[10] = 1;
    assert_eq!(got, expect);
    assert_eq!(*s.sink.msix.lock().unwrap(), vec![1, 2, 1]);

    let c = s.dev.lock().unwrap().device().counters();
    assert_eq!((c.rx_packets, c.tx_packets), (2, 1));
    assert_eq!(
        (c.rx_errors, c.tx_errors, c.rx_dropped, c.tx_dropped),
        (0, 0, 0, 0)
    );

    // Reset: the device goes inactive, a frame arriving now waits in the TAP.
    w(&s.dev, 0x14, 1, 0);
    assert!(!s.dev.lock().unwrap().is_active());
    s.peer.send(&frame(10, 4)).unwrap();
    s.manager.run_with_timeout(50).unwrap();
    assert_eq!(rx.used_idx(), 2);
    assert_no_warning();
}

/// A driver that follows the rules is never warned about.
fn assert_no_warning() {
    for level in [log::Level::Warn, log::Level::Error] {
        assert_eq!(tvm_util::test_log::lines(level), Vec::<String>::new());
    }
}

#[test]
fn guest_driver_rx_with_intx() {
    tvm_util::test_log::start();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let mut s = setup(&mem, false);
    let rx = Ring::new(&mem, 0x0);
    let tx = Ring::new(&mem, 0x4000);
    init_driver(&s.dev, &rx, &tx);
    rx.mock
        .add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(
                0x10_0000,
                4096,
                VRING_DESC_F_WRITE as u16,
                0,
            ))],
            0,
        )
        .unwrap();
    rx.want_interrupt();
    let f = frame(3000, 5);
    s.peer.send(&f).unwrap();
    assert!(s.manager.run_with_timeout(100).unwrap() >= 1);
    assert_eq!(rx.used_idx(), 1);
    assert_eq!(rx.used(0), (0, f.len() as u32));
    assert_eq!(*s.sink.intx.lock().unwrap(), vec![true]);
    assert!(s.sink.msix.lock().unwrap().is_empty());
    // The driver reads the ISR: queue interrupt, line deasserted.
    assert_eq!(r(&s.dev, 0x1000, 1), 1);
    assert_eq!(*s.sink.intx.lock().unwrap(), vec![true, false]);
    assert_no_warning();
}
