// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The block device behind the PCI transport, driven like a guest driver would: config
//! space, BAR writes, a kick, the event loop, the MSI-X interrupt; then a reset in the
//! middle and a second initialisation.

#![allow(clippy::unwrap_used)]

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use tvm_bus::PciDevice;
use tvm_virtio::{features, status, InterruptSink, VirtioPciDevice};
use tvm_virtio_blk::{Block, BlockConfig};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

#[derive(Default)]
struct Sink {
    msix: Mutex<Vec<u16>>,
}

impl InterruptSink for Sink {
    fn msix(&self, vector: u16) -> io::Result<()> {
        self.msix.lock().unwrap().push(vector);
        Ok(())
    }
    fn intx(&self, _level: bool) -> io::Result<()> {
        Ok(())
    }
}

type Dev = VirtioPciDevice<Block>;

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

fn init_driver(dev: &Mutex<Dev>, mock: &MockSplitQueue<'_, GuestMemoryMmap<()>>) {
    w(dev, 0x14, 1, 1);
    w(dev, 0x14, 1, 3);
    w(dev, 0x00, 4, 0);
    let lo = r(dev, 0x04, 4);
    w(dev, 0x00, 4, 1);
    let hi = r(dev, 0x04, 4);
    let offered = hi << 32 | lo;
    assert_ne!(offered & features::VERSION_1, 0);
    let accept = offered & (features::VERSION_1 | features::RING_EVENT_IDX | 1 << 9);
    w(dev, 0x08, 4, 0);
    w(dev, 0x0c, 4, accept & 0xffff_ffff);
    w(dev, 0x08, 4, 1);
    w(dev, 0x0c, 4, accept >> 32);
    w(dev, 0x14, 1, 0xb);
    assert_eq!(r(dev, 0x14, 1), 0xb);
    w(dev, 0x16, 2, 0);
    w(dev, 0x18, 2, 16);
    w(dev, 0x1a, 2, 1);
    w(dev, 0x20, 8, mock.desc_table_addr().0);
    w(dev, 0x28, 8, mock.avail_addr().0);
    w(dev, 0x30, 8, mock.used_addr().0);
    w(dev, 0x1c, 2, 1);
    w(dev, 0x14, 1, 0xf);
    assert_eq!(
        r(dev, 0x14, 1),
        u64::from(0xf & !status::DEVICE_NEEDS_RESET)
    );
    assert!(dev.lock().unwrap().is_active());
}

fn header(mem: &GuestMemoryMmap<()>, addr: u64, req_type: u32, sector: u64) {
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&req_type.to_le_bytes());
    hdr[8..].copy_from_slice(&sector.to_le_bytes());
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
    })
    .unwrap();
    let sink = Arc::new(Sink::default());
    let dev = Arc::new(Mutex::new(
        VirtioPciDevice::new(block, mem.clone(), sink.clone()).unwrap(),
    ));
    {
        let mut d = dev.lock().unwrap();
        assert_eq!(d.config_read(0), 0x1042_1af4);
        d.set_bar_addr(GuestAddress(0xc000_0000)).unwrap();
        assert_eq!(d.bar_addr(), 0xc000_0000);
        assert_eq!(d.notify_offset(0), 0x3000);
        // MSI-X on, vector 1 programmed and unmasked.
        let mut ptr = (d.config_read(0x34 / 4) & 0xff) as usize;
        while ptr != 0 && (d.config_read(ptr / 4) & 0xff) != 0x11 {
            ptr = ((d.config_read(ptr / 4) >> 8) & 0xff) as usize;
        }
        assert_ne!(ptr, 0);
        d.config_write(ptr / 4, 2, &0x8000u16.to_le_bytes());
        for (off, v) in [(0u64, 0xfee0_0000u32), (4, 0), (8, 0x31), (12, 0)] {
            d.bar_write(0x4000 + 16 + off, &v.to_le_bytes());
        }
    }

    let mut manager = EventManager::<Arc<Mutex<Dev>>>::new().unwrap();
    manager.add_subscriber(dev.clone());

    let mock = MockSplitQueue::new(&mem, 16);
    init_driver(&dev, &mock);

    // Write 1 KiB at sector 4.
    let payload: Vec<u8> = (0..1024).map(|i| (i % 251) as u8).collect();
    mem.write_slice(&payload, GuestAddress(0x20_0000)).unwrap();
    header(&mem, 0x10_0000, VIRTIO_BLK_T_OUT, 4);
    let next = VRING_DESC_F_NEXT as u16;
    let wr = VRING_DESC_F_WRITE as u16;
    mock.add_desc_chains(
        &[
            RawDescriptor::from(SplitDescriptor::new(0x10_0000, 16, next, 1)),
            RawDescriptor::from(SplitDescriptor::new(0x20_0000, 1024, next, 2)),
            RawDescriptor::from(SplitDescriptor::new(0x30_0000, 1, wr, 0)),
        ],
        0,
    )
    .unwrap();
    // The kick: what the ioeventfd would catch, here through the BAR.
    w(&dev, 0x3000, 2, 0);
    assert!(manager.run_with_timeout(100).unwrap() >= 1);
    assert_eq!(mock.used().idx().load(), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(), 0);
    assert_eq!(*sink.msix.lock().unwrap(), vec![1]);
    let file = std::fs::read(&path).unwrap();
    assert_eq!(&file[4 * 512..6 * 512], &payload[..]);

    // Reset in the middle of I/O: a request is queued and kicked, then the driver resets.
    header(&mem, 0x10_0000, VIRTIO_BLK_T_OUT, 0);
    mock.add_desc_chains(
        &[
            RawDescriptor::from(SplitDescriptor::new(0x10_0000, 16, next, 4)),
            RawDescriptor::from(SplitDescriptor::new(0x20_0000, 512, next, 5)),
            RawDescriptor::from(SplitDescriptor::new(0x30_0000, 1, wr, 0)),
        ],
        3,
    )
    .unwrap();
    w(&dev, 0x3000, 2, 0);
    w(&dev, 0x14, 1, 0);
    assert!(!dev.lock().unwrap().is_active());
    let _ = manager.run_with_timeout(50).unwrap();
    assert_eq!(mock.used().idx().load(), 1);
    assert_eq!(std::fs::read(&path).unwrap(), file);

    // Re-initialisation on fresh rings, then a read of what was written.
    let mock2 = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
    init_driver(&dev, &mock2);
    header(&mem, 0x10_0000, VIRTIO_BLK_T_IN, 4);
    mock2
        .add_desc_chains(
            &[
                RawDescriptor::from(SplitDescriptor::new(0x10_0000, 16, next, 1)),
                RawDescriptor::from(SplitDescriptor::new(0x28_0000, 1024, next | wr, 2)),
                RawDescriptor::from(SplitDescriptor::new(0x30_0000, 1, wr, 0)),
            ],
            0,
        )
        .unwrap();
    w(&dev, 0x3000, 2, 0);
    assert!(manager.run_with_timeout(100).unwrap() >= 1);
    assert_eq!(mock2.used().idx().load(), 1);
    let mut back = vec![0u8; 1024];
    mem.read_slice(&mut back, GuestAddress(0x28_0000)).unwrap();
    assert_eq!(back, payload);
    assert_eq!(mock2.used().ring().ref_at(0).unwrap().load().len(), 1025);
    dev.lock().unwrap().device_mut().flush().unwrap();
    std::fs::remove_file(&path).unwrap();
    // A driver that follows the rules is never warned about.
    for level in [log::Level::Warn, log::Level::Error] {
        assert_eq!(tvm_util::test_log::lines(level), Vec::<String>::new());
    }
}
