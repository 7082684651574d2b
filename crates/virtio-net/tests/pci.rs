// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The network device behind the PCI transport, driven like a guest driver would: config
//! space, feature negotiation, both queues, DRIVER_OK, kicks through the notify area, the
//! TAP (a datagram socket pair here) watched by a real event manager, MSI-X and INTx.

#![allow(clippy::unwrap_used)]

use std::io::{self, IoSlice};
use std::mem::offset_of;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use tvm_bus::PciDevice;
use tvm_virtio::test_utils::{
    bar_read, desc, enable_msix, init_driver, notify, set_status, DriverRing, QueueSetup,
    RecordingSink,
};
use tvm_virtio::{features, VirtioPciDevice, DEVICE_CFG_OFFSET, ISR_OFFSET};
use tvm_virtio_net::{Net, NetBackend, QUEUE_SIZE, RX_QUEUE, TX_QUEUE, VNET_HDR_LEN};
use virtio_bindings::virtio_net::{
    virtio_net_config, virtio_net_hdr_v1, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
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

type Dev = VirtioPciDevice<Net<Fake>>;

/// Offset of `num_buffers` in the vnet header.
const NUM_BUFFERS: usize = offset_of!(virtio_net_hdr_v1, num_buffers);

/// Reads `len` bytes of the BAR.
fn r(dev: &Mutex<Dev>, offset: u64, len: usize) -> u64 {
    bar_read(dev, offset, len)
}

struct Setup {
    dev: Arc<Mutex<Dev>>,
    sink: Arc<RecordingSink>,
    peer: UnixDatagram,
    manager: EventManager<Arc<Mutex<Dev>>>,
}

fn setup(mem: &GuestMemoryMmap<()>, msix: bool) -> Setup {
    let (a, b) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    let sink = Arc::new(RecordingSink::default());
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
            // Vectors 1 (rx) and 2 (tx) programmed and unmasked; the table has 3 vectors
            // (config + 2 queues).
            assert_eq!(enable_msix(&mut d, &[1, 2]), 3);
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
fn setup_queues(dev: &Mutex<Dev>, rx: &DriverRing<'_>, tx: &DriverRing<'_>) {
    let want = features::VERSION_1
        | features::RING_EVENT_IDX
        | 1 << VIRTIO_NET_F_MRG_RXBUF
        | 1 << VIRTIO_NET_F_MAC
        | 1 << VIRTIO_NET_F_STATUS
        | 1 << VIRTIO_NET_F_CSUM
        | 1 << VIRTIO_NET_F_GUEST_CSUM;
    let queues = [
        QueueSetup::new(rx, RX_QUEUE + 1),
        QueueSetup::new(tx, TX_QUEUE + 1),
    ];
    let negotiated = init_driver(dev, want, &queues);
    assert_eq!(negotiated.queue_max_sizes, [QUEUE_SIZE, QUEUE_SIZE]);
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
    let rx = DriverRing::new(&mem, 0x0, QSIZE);
    let tx = DriverRing::new(&mem, 0x4000, QSIZE);
    let wr = VRING_DESC_F_WRITE as u16;
    let next = VRING_DESC_F_NEXT as u16;

    // The device config through the BAR: MAC and link up.
    let mut cfg = [0u8; 8];
    for (i, b) in cfg.iter_mut().enumerate() {
        *b = r(&s.dev, DEVICE_CFG_OFFSET + i as u64, 1) as u8;
    }
    assert_eq!(cfg[..6], MAC);
    let status_at = DEVICE_CFG_OFFSET + offset_of!(virtio_net_config, status) as u64;
    assert_eq!(r(&s.dev, status_at, 2), u64::from(VIRTIO_NET_S_LINK_UP));

    // A frame arrives before the driver is up: the event is seen while inactive and
    // ignored, and the frame stays in the TAP.
    let early = frame(60, 1);
    s.peer.send(&early).unwrap();
    s.manager.run_with_timeout(50).unwrap();
    assert!(s.sink.msix().is_empty());

    setup_queues(&s.dev, &rx, &tx);
    // Activation (on the vCPU thread) reads nothing: the frame waits in the TAP for the
    // first RX kick.
    assert_eq!(s.dev.lock().unwrap().device().rx_pending_len(), 0);

    // The driver fills the RX ring (two 2 KiB buffers) and kicks queue 0.
    rx.want_interrupt();
    rx.mock
        .add_desc_chains(
            &[desc(0x10_0000, 2048, wr, 0), desc(0x10_0800, 2048, wr, 0)],
            0,
        )
        .unwrap();
    notify(&s.dev, RX_QUEUE);
    assert!(s.manager.run_with_timeout(100).unwrap() >= 1);
    assert_eq!(rx.used_idx(), 1);
    assert_eq!(rx.used(0), (0, early.len() as u32));
    let mut got = vec![0u8; early.len()];
    mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
    let mut expect = early.clone();
    expect[NUM_BUFFERS] = 1;
    assert_eq!(got, expect);
    assert_eq!(s.sink.msix(), vec![1]);

    // TX: header and payload in two descriptors, kick queue 1 (at notify offset 4).
    let out = frame(1000, 2);
    mem.write_slice(&out[..VNET_HDR_LEN], GuestAddress(0x20_0000))
        .unwrap();
    mem.write_slice(&out[VNET_HDR_LEN..], GuestAddress(0x21_0000))
        .unwrap();
    tx.want_interrupt();
    tx.mock
        .add_desc_chains(
            &[desc(0x20_0000, 12, next, 1), desc(0x21_0000, 1000, 0, 0)],
            0,
        )
        .unwrap();
    notify(&s.dev, TX_QUEUE);
    assert!(s.manager.run_with_timeout(100).unwrap() >= 1);
    let mut buf = vec![0u8; 4096];
    let n = s.peer.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &out[..]);
    assert_eq!(tx.used_idx(), 1);
    assert_eq!(tx.used(0), (0, 0));
    assert_eq!(s.sink.msix(), vec![1, 2]);

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
    expect[NUM_BUFFERS] = 1;
    assert_eq!(got, expect);
    assert_eq!(s.sink.msix(), vec![1, 2, 1]);

    let c = s.dev.lock().unwrap().device().counters();
    assert_eq!((c.rx_packets, c.tx_packets), (2, 1));
    assert_eq!(
        (c.rx_errors, c.tx_errors, c.rx_dropped, c.tx_dropped),
        (0, 0, 0, 0)
    );

    // Reset: the device goes inactive, a frame arriving now waits in the TAP.
    set_status(&s.dev, 0);
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
    let rx = DriverRing::new(&mem, 0x0, QSIZE);
    let tx = DriverRing::new(&mem, 0x4000, QSIZE);
    setup_queues(&s.dev, &rx, &tx);
    rx.mock
        .add_desc_chains(&[desc(0x10_0000, 4096, VRING_DESC_F_WRITE as u16, 0)], 0)
        .unwrap();
    rx.want_interrupt();
    let f = frame(3000, 5);
    s.peer.send(&f).unwrap();
    assert!(s.manager.run_with_timeout(100).unwrap() >= 1);
    assert_eq!(rx.used_idx(), 1);
    assert_eq!(rx.used(0), (0, f.len() as u32));
    assert_eq!(s.sink.intx(), vec![true]);
    assert!(s.sink.msix().is_empty());
    // The driver reads the ISR: queue interrupt, line deasserted.
    assert_eq!(r(&s.dev, ISR_OFFSET, 1), 1);
    assert_eq!(s.sink.intx(), vec![true, false]);
    assert_no_warning();
}
