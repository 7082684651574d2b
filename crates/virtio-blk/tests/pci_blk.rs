// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The block device behind the PCI transport, driven like a guest driver would: config
//! space, BAR writes, a kick, the event loop, the MSI-X interrupt; then a reset in the
//! middle and a second initialisation.

#![allow(clippy::unwrap_used)]

use std::mem::{offset_of, size_of};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use tvm_bus::PciDevice;
use tvm_virtio::test_utils::{
    desc, enable_msix, init_driver, notify, set_status, DriverRing, QueueSetup, RecordingSink,
};
use tvm_virtio::{features, VirtioPciDevice, NOTIFY_OFFSET};
use tvm_virtio_blk::{Block, BlockConfig, IoEngine};
use virtio_bindings::virtio_blk::{
    virtio_blk_outhdr, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Dev = VirtioPciDevice<Block>;

const QSIZE: u16 = 16;

/// Features the driver accepts: the transport's VERSION_1 and EVENT_IDX, and FLUSH.
const WANT: u64 = features::VERSION_1 | features::RING_EVENT_IDX | 1 << VIRTIO_BLK_F_FLUSH;

/// The one request queue on `ring`, MSI-X vector 1.
fn setup_queue(dev: &Mutex<Dev>, ring: &DriverRing<'_>) {
    init_driver(dev, WANT, &[QueueSetup::new(ring, 1)]);
}

/// Writes a request header (`virtio_blk_outhdr`) at `addr`.
fn header(mem: &GuestMemoryMmap<()>, addr: u64, req_type: u32, sector: u64) {
    let mut hdr = [0u8; size_of::<virtio_blk_outhdr>()];
    let type_at = offset_of!(virtio_blk_outhdr, type_);
    hdr[type_at..type_at + 4].copy_from_slice(&req_type.to_le_bytes());
    let sector_at = offset_of!(virtio_blk_outhdr, sector);
    hdr[sector_at..sector_at + 8].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&hdr, GuestAddress(addr)).unwrap();
}

#[test]
fn guest_driver_round_trip_with_reset() {
    tvm_util::test_log::start();
    let path: PathBuf =
        std::env::temp_dir().join(format!("tvm-pci-blk-{}.img", std::process::id()));
    std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let block = Block::open(BlockConfig {
        path: path.clone(),
        read_only: false,
        id: None,
        engine: IoEngine::Sync,
        ..BlockConfig::default()
    })
    .unwrap();
    let sink = Arc::new(RecordingSink::default());
    let dev = Arc::new(Mutex::new(
        VirtioPciDevice::new(block, mem.clone(), sink.clone()).unwrap(),
    ));
    {
        let mut d = dev.lock().unwrap();
        assert_eq!(d.config_read(0), 0x1042_1af4);
        d.set_bar_addr(GuestAddress(0xc000_0000)).unwrap();
        assert_eq!(d.bar_addr(), 0xc000_0000);
        assert_eq!(d.notify_offset(0), NOTIFY_OFFSET);
        // MSI-X on, vector 1 programmed and unmasked.
        enable_msix(&mut d, &[1]);
    }

    let mut manager = EventManager::<Arc<Mutex<Dev>>>::new().unwrap();
    manager.add_subscriber(dev.clone());

    let ring = DriverRing::new(&mem, 0, QSIZE);
    setup_queue(&dev, &ring);

    // Write 1 KiB at sector 4.
    let payload: Vec<u8> = (0..1024).map(|i| (i % 251) as u8).collect();
    mem.write_slice(&payload, GuestAddress(0x20_0000)).unwrap();
    header(&mem, 0x10_0000, VIRTIO_BLK_T_OUT, 4);
    let next = VRING_DESC_F_NEXT as u16;
    let wr = VRING_DESC_F_WRITE as u16;
    ring.mock
        .add_desc_chains(
            &[
                desc(0x10_0000, 16, next, 1),
                desc(0x20_0000, 1024, next, 2),
                desc(0x30_0000, 1, wr, 0),
            ],
            0,
        )
        .unwrap();
    // The kick: what the ioeventfd would catch, here through the BAR.
    notify(&dev, 0);
    assert!(manager.run_with_timeout(100).unwrap() >= 1);
    assert_eq!(ring.used_idx(), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(), 0);
    assert_eq!(sink.msix(), vec![1]);
    let file = std::fs::read(&path).unwrap();
    assert_eq!(&file[4 * 512..6 * 512], &payload[..]);

    // Reset in the middle of I/O: a request is queued and kicked, then the driver resets.
    header(&mem, 0x10_0000, VIRTIO_BLK_T_OUT, 0);
    ring.mock
        .add_desc_chains(
            &[
                desc(0x10_0000, 16, next, 4),
                desc(0x20_0000, 512, next, 5),
                desc(0x30_0000, 1, wr, 0),
            ],
            3,
        )
        .unwrap();
    notify(&dev, 0);
    set_status(&dev, 0);
    assert!(!dev.lock().unwrap().is_active());
    let _ = manager.run_with_timeout(50).unwrap();
    assert_eq!(ring.used_idx(), 1);
    assert_eq!(std::fs::read(&path).unwrap(), file);

    // Re-initialisation on fresh rings, then a read of what was written.
    let ring2 = DriverRing::new(&mem, 0x8000, QSIZE);
    setup_queue(&dev, &ring2);
    header(&mem, 0x10_0000, VIRTIO_BLK_T_IN, 4);
    ring2
        .mock
        .add_desc_chains(
            &[
                desc(0x10_0000, 16, next, 1),
                desc(0x28_0000, 1024, next | wr, 2),
                desc(0x30_0000, 1, wr, 0),
            ],
            0,
        )
        .unwrap();
    notify(&dev, 0);
    assert!(manager.run_with_timeout(100).unwrap() >= 1);
    assert_eq!(ring2.used_idx(), 1);
    let mut back = vec![0u8; 1024];
    mem.read_slice(&mut back, GuestAddress(0x28_0000)).unwrap();
    assert_eq!(back, payload);
    assert_eq!(ring2.used(0), (0, 1025));
    dev.lock().unwrap().device_mut().flush().unwrap();
    std::fs::remove_file(&path).unwrap();
    // A driver that follows the rules is never warned about.
    for level in [log::Level::Warn, log::Level::Error] {
        assert_eq!(tvm_util::test_log::lines(level), Vec::<String>::new());
    }
}
