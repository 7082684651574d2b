// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ids::{VIRTIO_ID_BLOCK, VIRTIO_ID_NET};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;
use super::*;
use crate::test_utils::common_cfg::*;
use crate::test_utils::{pci_cfg, NullSink, RecordingSink, SinkCall};
use crate::{
    features, status, ActivateContext, EventSet, MsixEntry, VirtioInterrupt, VIRTIO_MSI_NO_VECTOR,
};

/// ready, size, desc, avail, used, event_idx of one queue as activated.
type QueueSnapshot = (bool, u16, u64, u64, u64, bool);

#[derive(Default)]
struct FakeLog {
    activations: Vec<(u64, Vec<QueueSnapshot>)>,
    resets: usize,
    processed: Vec<u16>,
    /// Each activation's queues' next available index.
    next_avail: Vec<Vec<u16>>,
}

struct FakeDevice {
    log: Arc<Mutex<FakeLog>>,
    ctx: Option<ActivateContext>,
    fail_activate: bool,
    config: [u8; 8],
}

const FAKE_FEATURES: u64 = 1 << 9 | 1 << 6;

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 16]
    }
    fn device_features(&self) -> u64 {
        FAKE_FEATURES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| self.config.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, ctx: ActivateContext) -> Result<()> {
        if self.fail_activate {
            return Err(Error::QueueNotReady(0));
        }
        let queues = ctx
            .queues
            .iter()
            .map(|q| {
                (
                    q.ready(),
                    q.size(),
                    q.desc_table(),
                    q.avail_ring(),
                    q.used_ring(),
                    q.event_idx_enabled(),
                )
            })
            .collect();
        let next_avail = ctx.queues.iter().map(|q| q.next_avail()).collect();
        let mut log = self.log.lock().unwrap();
        log.activations.push((ctx.features, queues));
        log.next_avail.push(next_avail);
        drop(log);
        self.ctx = Some(ctx);
        Ok(())
    }
    fn reset(&mut self) {
        self.ctx = None;
        self.log.lock().unwrap().resets += 1;
    }
    fn process_queue(&mut self, queue: u16) {
        self.log.lock().unwrap().processed.push(queue);
    }
}

struct Harness {
    dev: VirtioPciDevice<FakeDevice>,
    sink: Arc<RecordingSink>,
    log: Arc<Mutex<FakeLog>>,
}

fn test_mem(size: usize) -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

fn harness_with(fail_activate: bool) -> Harness {
    let log = Arc::new(Mutex::new(FakeLog::default()));
    let sink = Arc::new(RecordingSink::default());
    let device = FakeDevice {
        log: log.clone(),
        ctx: None,
        fail_activate,
        config: [1, 2, 3, 4, 5, 6, 7, 8],
    };
    let dev = VirtioPciDevice::new(device, test_mem(0x10_0000), sink.clone()).unwrap();
    Harness { dev, sink, log }
}

fn harness() -> Harness {
    harness_with(false)
}

impl Harness {
    fn r(&mut self, offset: u64, len: usize) -> u64 {
        let mut data = [0u8; 8];
        self.dev.bar_read(offset, &mut data[..len]);
        u64::from_le_bytes(data)
    }
    fn w(&mut self, offset: u64, len: usize, value: u64) {
        self.dev.bar_write(offset, &value.to_le_bytes()[..len]);
    }
    fn status(&mut self) -> u8 {
        self.r(DEVICE_STATUS, 1) as u8
    }
    fn set_status(&mut self, s: u8) {
        self.w(DEVICE_STATUS, 1, u64::from(s));
    }
    fn set_driver_features(&mut self, f: u64) {
        self.w(DRIVER_FEATURE_SELECT, 4, 0);
        self.w(DRIVER_FEATURE, 4, f & 0xffff_ffff);
        self.w(DRIVER_FEATURE_SELECT, 4, 1);
        self.w(DRIVER_FEATURE, 4, f >> 32);
    }
    fn negotiate(&mut self, f: u64) -> u8 {
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        self.set_driver_features(f);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        self.status()
    }
    fn setup_queue(&mut self, q: u16, size: u16, desc: u64, avail: u64, used: u64) {
        self.w(QUEUE_SELECT, 2, u64::from(q));
        self.w(QUEUE_SIZE, 2, u64::from(size));
        for (off, v) in [
            (QUEUE_DESC, desc),
            (QUEUE_DRIVER, avail),
            (QUEUE_DEVICE, used),
        ] {
            self.w(off, 4, v & 0xffff_ffff);
            self.w(off + 4, 4, v >> 32);
        }
        self.w(QUEUE_ENABLE, 2, 1);
    }
    /// A driver that accepts VERSION_1 only and sets up queue 0 (256 entries) with its
    /// rings at `desc`, `avail` and `used`, then DRIVER_OK.
    fn init_queue_0(&mut self, desc: u64, avail: u64, used: u64) {
        self.negotiate(features::VERSION_1);
        self.setup_queue(0, 256, desc, avail, used);
        self.driver_ok();
    }
    fn driver_ok(&mut self) {
        self.set_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }
    fn full_init(&mut self) {
        let s = self.negotiate(features::VERSION_1 | features::RING_EVENT_IDX | FAKE_FEATURES);
        assert_ne!(s & status::FEATURES_OK, 0);
        self.setup_queue(0, 128, 0x1000, 0x3000, 0x4000);
        self.driver_ok();
    }
    fn msix_cap(&mut self) -> usize {
        caps(&mut self.dev)
            .into_iter()
            .find(|c| c.1 == PCI_CAP_ID_MSIX)
            .unwrap()
            .0
    }
    fn enable_msix(&mut self, function_mask: bool) {
        let reg = self.msix_cap() / 4;
        let ctrl = MSIX_CTRL_ENABLE
            | if function_mask {
                MSIX_CTRL_FUNCTION_MASK
            } else {
                0
            };
        self.dev.config_write(reg, 2, &ctrl.to_le_bytes());
    }
    fn program_vector(&mut self, v: u16, masked: bool) {
        let base = pci_cfg::msix_entry(v);
        self.w(
            base + pci_cfg::MSIX_ENTRY_ADDR_LO,
            4,
            u64::from(pci_cfg::MSI_ADDRESS),
        );
        self.w(base + pci_cfg::MSIX_ENTRY_ADDR_HI, 4, 0);
        self.w(base + pci_cfg::MSIX_ENTRY_DATA, 4, 0x40 + u64::from(v));
        self.w(base + pci_cfg::MSIX_ENTRY_VECTOR_CTRL, 4, u64::from(masked));
    }
    fn interrupt(&self) -> Arc<dyn VirtioInterrupt> {
        self.dev.device().ctx.as_ref().unwrap().interrupt.clone()
    }
}

/// Walks the capability list from the capabilities pointer (0x34): (offset, id, first
/// dword after the header...).
fn caps(dev: &mut VirtioPciDevice<FakeDevice>) -> Vec<(usize, u8, [u32; 5])> {
    let byte = |dev: &mut VirtioPciDevice<FakeDevice>, off: usize| {
        (dev.config_read(off / 4) >> ((off % 4) * 8)) as u8
    };
    let mut out = Vec::new();
    let mut ptr = usize::from(byte(dev, pci_cfg::CAPABILITIES_POINTER));
    while ptr != 0 && out.len() < 48 {
        let id = byte(dev, ptr);
        let regs = [0, 1, 2, 3, 4].map(|i| dev.config_read(ptr / 4 + i));
        out.push((ptr, id, regs));
        ptr = usize::from(byte(dev, ptr + 1));
    }
    out
}

#[test]
fn pci_identity() {
    let mut h = harness();
    assert_eq!(h.dev.config_read(0), 0x1042_1af4);
    // Class 01 / subclass 80 / prog-if 0 / revision 1.
    assert_eq!(h.dev.config_read(2), 0x0180_0001);
    assert_eq!(h.dev.config_read(11), 0x1100_1af4);
    assert_eq!((h.dev.config_read(15) >> 8) & 0xff, 1);
    // Status register: capability list present.
    assert_ne!(h.dev.config_read(1) & (1 << 20), 0);
}

#[test]
fn capability_list_walk() {
    let mut h = harness();
    let list = caps(&mut h.dev);
    assert_eq!(list.len(), 5);
    let mut vendor = Vec::new();
    for (_, id, regs) in &list {
        if *id == PCI_CAP_ID_VNDR {
            let cap_len = (regs[0] >> 16) & 0xff;
            let cfg_type = (regs[0] >> 24) as u8;
            let bar = regs[1] & 0xff;
            assert_eq!(bar, 0);
            vendor.push((cfg_type, cap_len, regs[2], regs[3], regs[4]));
        }
    }
    assert_eq!(
        vendor,
        vec![
            (VIRTIO_PCI_CAP_COMMON_CFG, 16, 0, 0x38, vendor[0].4),
            (VIRTIO_PCI_CAP_NOTIFY_CFG, 20, 0x3000, 0x1000, 4),
            (VIRTIO_PCI_CAP_ISR_CFG, 16, 0x1000, 1, vendor[2].4),
            (VIRTIO_PCI_CAP_DEVICE_CFG, 16, 0x2000, 0x1000, vendor[3].4),
        ]
    );
    let (_, _, msix) = list.iter().find(|c| c.1 == PCI_CAP_ID_MSIX).unwrap();
    // Table size field N-1 = 2 (two queues + config); disabled, unmasked.
    assert_eq!(msix[0] >> 16, 2);
    assert_eq!(msix[1], 0x4000);
    assert_eq!(msix[2], 0x6000);
    // Only enable and function mask are writable in message control.
    let reg = h.msix_cap() / 4;
    h.dev.config_write(reg, 2, &[0xff, 0xff]);
    assert_eq!(h.dev.config_read(reg) >> 16, 0xc002);
    h.dev.config_write(reg, 0, &[0xff, 0xff]);
    // Last capability: next pointer 0; id and pointer stay read-only.
    assert_eq!(h.dev.config_read(reg) & 0xffff, u32::from(PCI_CAP_ID_MSIX));
}

#[test]
fn bar_sizing_and_address() {
    let mut h = harness();
    h.dev.config_write(4, 0, &[0xff; 4]);
    h.dev.config_write(5, 0, &[0xff; 4]);
    assert_eq!(h.dev.config_read(4), 0xffff_8004);
    assert_eq!(h.dev.config_read(5), 0xffff_ffff);
    h.dev.config_write(4, 0, &0xe000_0000u32.to_le_bytes());
    h.dev.config_write(5, 0, &1u32.to_le_bytes());
    assert_eq!(h.dev.bar_addr(), 0x1_e000_0000);
    h.dev.set_bar_addr(GuestAddress(0xc000_8000)).unwrap();
    assert_eq!(h.dev.bar_addr(), 0xc000_8000);
    assert!(h.dev.set_bar_addr(GuestAddress(0xc000_1000)).is_err());
    assert_eq!(h.dev.bar_size(), 0x8000);
    assert_eq!(h.dev.notify_offset(1), 0x3004);
}

#[test]
fn feature_windows() {
    let mut h = harness();
    h.w(DEVICE_FEATURE_SELECT, 4, 0);
    assert_eq!(
        h.r(DEVICE_FEATURE, 4),
        FAKE_FEATURES | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    );
    h.w(DEVICE_FEATURE_SELECT, 4, 1);
    assert_eq!(h.r(DEVICE_FEATURE, 4), 1);
    assert_eq!(h.r(DEVICE_FEATURE_SELECT, 4), 1);
    h.w(DEVICE_FEATURE_SELECT, 4, 7);
    assert_eq!(h.r(DEVICE_FEATURE, 4), 0);
    // Driver feature windows read back; window 2 is ignored.
    h.set_driver_features(features::VERSION_1 | 1 << 9);
    h.w(DRIVER_FEATURE_SELECT, 4, 0);
    assert_eq!(h.r(DRIVER_FEATURE, 4), 1 << 9);
    h.w(DRIVER_FEATURE_SELECT, 4, 1);
    assert_eq!(h.r(DRIVER_FEATURE, 4), 1);
    h.w(DRIVER_FEATURE_SELECT, 4, 2);
    h.w(DRIVER_FEATURE, 4, 0xffff_ffff);
    assert_eq!(h.r(DRIVER_FEATURE, 4), 0);
    assert_eq!(h.r(NUM_QUEUES, 2), 2);
}

#[test]
fn features_ok_refused_without_version_1() {
    let mut h = harness();
    let s = h.negotiate(FAKE_FEATURES);
    assert_eq!(s & status::FEATURES_OK, 0);
    assert_eq!(s, status::ACKNOWLEDGE | status::DRIVER);
    // DRIVER_OK without FEATURES_OK does not activate.
    h.set_status(status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK);
    assert!(h.log.lock().unwrap().activations.is_empty());
    assert_ne!(h.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn features_ok_refused_for_unoffered_bits() {
    let mut h = harness();
    let s = h.negotiate(features::VERSION_1 | 1 << 3);
    assert_eq!(s & status::FEATURES_OK, 0);
    h.set_status(0);
    let s = h.negotiate(features::VERSION_1 | FAKE_FEATURES);
    assert_ne!(s & status::FEATURES_OK, 0);
    // Feature writes after FEATURES_OK are ignored.
    h.set_driver_features(features::VERSION_1);
    h.w(DRIVER_FEATURE_SELECT, 4, 0);
    assert_eq!(h.r(DRIVER_FEATURE, 4), FAKE_FEATURES);
}

#[test]
fn full_init_activates_with_queues() {
    let mut h = harness();
    h.full_init();
    assert!(h.dev.is_active());
    assert_eq!(
        h.status(),
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK
    );
    {
        let log = h.log.lock().unwrap();
        assert_eq!(log.activations.len(), 1);
        let (f, queues) = &log.activations[0];
        assert_eq!(
            *f,
            features::VERSION_1 | features::RING_EVENT_IDX | FAKE_FEATURES
        );
        assert_eq!(queues[0], (true, 128, 0x1000, 0x3000, 0x4000, true));
        assert!(!queues[1].0);
    }
    // Read back the queue registers.
    h.w(QUEUE_SELECT, 2, 0);
    assert_eq!(h.r(QUEUE_SIZE, 2), 128);
    assert_eq!(h.r(QUEUE_ENABLE, 2), 1);
    assert_eq!(h.r(QUEUE_DESC, 8), 0x1000);
    assert_eq!(h.r(QUEUE_DRIVER, 4), 0x3000);
    h.w(QUEUE_SELECT, 2, 1);
    assert_eq!(h.r(QUEUE_NOTIFY_OFF, 2), 1);
    assert_eq!(h.r(QUEUE_SIZE, 2), 16);
    // Queue config is frozen once live.
    h.w(QUEUE_SELECT, 2, 0);
    h.w(QUEUE_SIZE, 2, 64);
    assert_eq!(h.r(QUEUE_SIZE, 2), 128);
    // A second DRIVER_OK write does not activate again.
    h.driver_ok();
    assert_eq!(h.log.lock().unwrap().activations.len(), 1);
    // Device config window.
    assert_eq!(h.r(DEVICE_CFG_OFFSET, 4), 0x0403_0201);
    assert_eq!(h.r(DEVICE_CFG_OFFSET + 6, 2), 0x0807);
    // A write to the notify area signals the queue's EventFd; the subscriber path processes.
    h.w(NOTIFY_OFFSET + 4, 2, 1);
    assert_eq!(h.dev.notify_eventfd(1).unwrap().read().unwrap(), 1);
    h.w(NOTIFY_OFFSET, 2, 0);
    h.dev.process_notification(0);
    assert!(h.dev.notify_eventfd(0).unwrap().read().is_err());
    assert_eq!(h.log.lock().unwrap().processed, vec![0]);
    // Misaligned or unknown notify writes are ignored.
    h.w(NOTIFY_OFFSET + 2, 2, 0);
    h.w(NOTIFY_OFFSET + 8, 2, 0);
    assert!(h.dev.notify_eventfd(0).unwrap().read().is_err());
}

#[test]
fn reset_in_the_middle_of_io() {
    let mut h = harness();
    h.full_init();
    h.w(QUEUE_SELECT, 2, 0);
    h.w(QUEUE_MSIX_VECTOR, 2, 1);
    // Kick pending and an interrupt raised (INTx, MSI-X off) when the driver resets.
    h.w(NOTIFY_OFFSET, 2, 0);
    h.interrupt().signal_queue(0).unwrap();
    assert_eq!(h.sink.take(), vec![SinkCall::Intx(true)]);
    h.set_status(0);
    assert_eq!(h.sink.take(), vec![SinkCall::Intx(false)]);
    assert!(!h.dev.is_active());
    assert!(h.dev.device().ctx.is_none());
    assert_eq!(h.log.lock().unwrap().resets, 1);
    assert_eq!(h.status(), 0);
    assert_eq!(h.r(QUEUE_MSIX_VECTOR, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    assert_eq!(h.r(QUEUE_ENABLE, 2), 0);
    assert_eq!(h.r(QUEUE_SIZE, 2), 256);
    assert_eq!(h.r(ISR_OFFSET, 1), 0);
    // The stale kick was dropped and is not processed.
    h.dev.process_notification(0);
    assert!(h.log.lock().unwrap().processed.is_empty());
    // Re-initialisation works.
    h.full_init();
    assert!(h.dev.is_active());
    assert_eq!(h.log.lock().unwrap().activations.len(), 2);
}

#[test]
fn queue_size_must_be_power_of_two() {
    let mut h = harness();
    h.w(QUEUE_SELECT, 2, 0);
    h.w(QUEUE_SIZE, 2, 100);
    assert_eq!(h.r(QUEUE_SIZE, 2), 256);
    h.w(QUEUE_SIZE, 2, 0);
    assert_eq!(h.r(QUEUE_SIZE, 2), 256);
    h.w(QUEUE_SIZE, 2, 512);
    assert_eq!(h.r(QUEUE_SIZE, 2), 256);
    h.w(QUEUE_SIZE, 2, 64);
    assert_eq!(h.r(QUEUE_SIZE, 2), 64);
    // A missing queue reads as zeros and ignores writes.
    h.w(QUEUE_SELECT, 2, 9);
    h.w(QUEUE_SIZE, 2, 8);
    assert_eq!(h.r(QUEUE_SIZE, 2), 0);
    h.w(QUEUE_MSIX_VECTOR, 2, 0);
    assert_eq!(h.r(QUEUE_MSIX_VECTOR, 2), 0);
}

#[test]
fn queue_outside_memory_needs_reset() {
    let mut h = harness();
    h.init_queue_0(0xff800, 0x3000, 0x4000);
    assert!(!h.dev.is_active());
    assert!(h.log.lock().unwrap().activations.is_empty());
    assert_ne!(h.status() & status::DEVICE_NEEDS_RESET, 0);
    // Config interrupt through INTx, ISR bit 1.
    assert_eq!(h.sink.take(), vec![SinkCall::Intx(true)]);
    assert_eq!(h.r(ISR_OFFSET, 1), 2);
    // Kicks are not processed while the device needs a reset; the driver can reset.
    h.dev.process_notification(0);
    assert!(h.log.lock().unwrap().processed.is_empty());
    h.set_status(0);
    h.full_init();
    assert!(h.dev.is_active());
}

#[test]
fn misaligned_ring_needs_reset() {
    let mut h = harness();
    h.init_queue_0(0x1001, 0x3000, 0x4000);
    assert_ne!(h.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn available_ring_at_zero_needs_reset() {
    crate::test_log::start();
    let mut h = harness();
    // Address 0 is guest RAM, but virtio-queue would refuse to pop from it on every kick,
    // logging an error each time.
    h.init_queue_0(0x1000, 0, 0x4000);
    assert!(!h.dev.is_active());
    assert_ne!(h.status() & status::DEVICE_NEEDS_RESET, 0);
    let w = crate::test_log::lines(log::Level::Warn);
    assert_eq!(w.len(), 1, "{w:#?}");
    assert!(w[0].contains("avail 0x0"), "{w:#?}");
    // The descriptor table and the used ring may sit at 0.
    h.set_status(0);
    h.init_queue_0(0, 0x3000, 0x4000);
    assert!(h.dev.is_active());
    assert!(crate::test_log::lines(log::Level::Error).is_empty());
}

#[test]
fn failed_activation_needs_reset() {
    let mut h = harness_with(true);
    h.enable_msix(false);
    h.program_vector(0, false);
    h.sink.take();
    h.w(CONFIG_MSIX_VECTOR, 2, 0);
    h.full_init();
    assert!(!h.dev.is_active());
    assert_ne!(h.status() & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(h.sink.take(), vec![SinkCall::Msix(0)]);
}

#[test]
fn msix_vector_programming_and_masking() {
    let mut h = harness();
    h.enable_msix(false);
    h.program_vector(1, false);
    let entry = MsixEntry {
        msg_addr_lo: 0xfee0_0000,
        msg_addr_hi: 0,
        msg_data: 0x41,
        vector_ctrl: 0,
    };
    let calls = h.sink.take();
    assert_eq!(calls.len(), 4);
    assert_eq!(calls[3], SinkCall::Table(1, entry));
    // Table reads back, 4 and 8 bytes.
    assert_eq!(
        h.r(pci_cfg::msix_entry(1) + pci_cfg::MSIX_ENTRY_ADDR_LO, 8),
        0xfee0_0000
    );
    assert_eq!(
        h.r(pci_cfg::msix_entry(1) + pci_cfg::MSIX_ENTRY_DATA, 4),
        0x41
    );
    // Vector 0 is still masked (reset state).
    assert_eq!(
        h.r(pci_cfg::msix_entry(0) + pci_cfg::MSIX_ENTRY_VECTOR_CTRL, 4),
        1
    );

    h.full_init();
    h.w(QUEUE_SELECT, 2, 0);
    h.w(QUEUE_MSIX_VECTOR, 2, 1);
    assert_eq!(h.r(QUEUE_MSIX_VECTOR, 2), 1);
    // Out-of-range vectors read back as NO_VECTOR.
    h.w(CONFIG_MSIX_VECTOR, 2, 3);
    assert_eq!(h.r(CONFIG_MSIX_VECTOR, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    h.w(CONFIG_MSIX_VECTOR, 2, 0);
    assert_eq!(h.r(CONFIG_MSIX_VECTOR, 2), 0);

    let irq = h.interrupt();
    irq.signal_queue(0).unwrap();
    assert_eq!(h.sink.take(), vec![SinkCall::Msix(1)]);

    // Masked vector: pending bit, delivered on unmask.
    h.w(
        pci_cfg::msix_entry(1) + pci_cfg::MSIX_ENTRY_VECTOR_CTRL,
        4,
        1,
    );
    h.sink.take();
    irq.signal_queue(0).unwrap();
    assert!(h.sink.take().is_empty());
    assert_eq!(h.r(MSIX_PBA_OFFSET, 8), 0b10);
    h.w(
        pci_cfg::msix_entry(1) + pci_cfg::MSIX_ENTRY_VECTOR_CTRL,
        4,
        0,
    );
    assert_eq!(
        h.sink.take(),
        vec![SinkCall::Table(1, entry), SinkCall::Msix(1)]
    );
    assert_eq!(h.r(MSIX_PBA_OFFSET, 8), 0);

    // Function mask: pending, delivered when the mask is cleared.
    h.enable_msix(true);
    irq.signal_queue(0).unwrap();
    assert!(h.sink.take().is_empty());
    assert_eq!(h.r(MSIX_PBA_OFFSET, 4), 0b10);
    h.enable_msix(false);
    assert_eq!(h.sink.take(), vec![SinkCall::Msix(1)]);

    // Config vector 0 is masked: pending only.
    irq.signal_config().unwrap();
    assert!(h.sink.take().is_empty());
    assert_eq!(h.r(MSIX_PBA_OFFSET, 8), 0b01);

    // NO_VECTOR: nothing is delivered.
    h.interrupt();
    let mut h2 = harness();
    h2.enable_msix(false);
    h2.program_vector(1, false);
    h2.full_init();
    h2.sink.take();
    h2.interrupt().signal_queue(0).unwrap();
    assert!(h2.sink.take().is_empty());
    assert_eq!(h2.r(MSIX_PBA_OFFSET, 8), 0);
}

#[test]
fn isr_read_clears_and_lowers_intx() {
    let mut h = harness();
    h.full_init();
    let irq = h.interrupt();
    irq.signal_queue(0).unwrap();
    irq.signal_config().unwrap();
    assert_eq!(
        h.sink.take(),
        vec![SinkCall::Intx(true), SinkCall::Intx(true)]
    );
    assert_eq!(h.r(ISR_OFFSET, 1), 3);
    assert_eq!(h.sink.take(), vec![SinkCall::Intx(false)]);
    assert_eq!(h.r(ISR_OFFSET, 1), 0);
    assert!(h.sink.take().is_empty());
    // INTx disabled in the command register: no line change.
    h.dev.config_write(1, 1, &[0x04]);
    irq.signal_queue(0).unwrap();
    assert!(h.sink.take().is_empty());
    assert_eq!(h.r(ISR_OFFSET, 1), 1);
    // Wrong-sized ISR reads see nothing and do not clear.
    irq.signal_queue(0).unwrap();
    assert_eq!(h.r(ISR_OFFSET, 4), 0);
    assert_eq!(h.r(ISR_OFFSET, 1), 1);
}

#[test]
fn odd_accesses_do_not_panic() {
    let mut h = harness();
    h.full_init();
    for offset in (0..BAR_SIZE + 16).step_by(3) {
        for len in [0usize, 1, 2, 3, 4, 5, 8] {
            let mut data = vec![0xaa; len];
            h.dev.bar_read(offset, &mut data);
            if offset % 8 != 0 && !(DEVICE_STATUS..=CONFIG_GENERATION).contains(&offset) {
                h.dev.bar_write(offset, &vec![0xff; len]);
            }
        }
    }
    h.dev.bar_read(u64::MAX - 1, &mut [0; 4]);
    h.dev.bar_write(u64::MAX - 1, &[0; 4]);
    let mut data = [0xaa; 3];
    h.dev.bar_read(0, &mut data);
    assert_eq!(data, [0; 3]);
    for reg in 0..70 {
        h.dev.config_write(reg, 3, &[0xff, 0xff]);
    }
}

/// A device with one extra event source (an EventFd standing in for a TAP).
struct ExtraSourceDevice {
    evt: EventFd,
    seen: Arc<Mutex<Vec<(usize, bool)>>>,
}

impl VirtioDevice for ExtraSourceDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn device_features(&self) -> u64 {
        0
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, _ctx: ActivateContext) -> Result<()> {
        Ok(())
    }
    fn reset(&mut self) {}
    fn process_queue(&mut self, _queue: u16) {}
    fn extra_event_sources(&self) -> Vec<(std::os::fd::RawFd, EventSet)> {
        use std::os::fd::AsRawFd;
        vec![(
            self.evt.as_raw_fd(),
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        )]
    }
    fn process_extra_event(&mut self, index: usize, events: EventSet) {
        let _ = self.evt.read();
        self.seen
            .lock()
            .unwrap()
            .push((index, events.contains(EventSet::IN)));
    }
}

#[test]
fn extra_event_sources_reach_the_device_through_the_event_loop() {
    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    let seen = Arc::new(Mutex::new(Vec::new()));
    let evt = EventFd::new(EFD_NONBLOCK).unwrap();
    let trigger = evt.try_clone().unwrap();
    let dev = ExtraSourceDevice {
        evt,
        seen: seen.clone(),
    };
    let pci = VirtioPciDevice::new(dev, test_mem(0x10_0000), Arc::new(NullSink)).unwrap();
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    let pci: Arc<Mutex<dyn MutEventSubscriber + Send>> = Arc::new(Mutex::new(pci));
    em.add_subscriber(pci);

    trigger.write(1).unwrap();
    assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
    assert_eq!(*seen.lock().unwrap(), vec![(0, true)]);
    // Nothing pending: the loop times out instead of dispatching again.
    assert_eq!(em.run_with_timeout(10).unwrap(), 0);
}

#[test]
fn bar_decodes_only_while_memory_space_is_enabled() {
    let mut h = harness();
    let dev = &mut h.dev;
    // As built: not placed, decoding off.
    assert_eq!(dev.bar_decode_addr(), None);
    dev.set_bar_addr(GuestAddress(0xc000_0000)).unwrap();
    assert_eq!(dev.bar_decode_addr(), Some(0xc000_0000));
    // A guest sizing the BAR: decoding off, all ones, restore, decoding on.
    let cmd = dev.config_read(1) & 0xffff;
    dev.config_write(1, 0, &((cmd & !2) as u16).to_le_bytes());
    assert_eq!(dev.bar_decode_addr(), None);
    dev.config_write(4, 0, &u32::MAX.to_le_bytes());
    dev.config_write(5, 0, &u32::MAX.to_le_bytes());
    assert_eq!(dev.config_read(4) & !0xf, !(BAR_SIZE as u32 - 1));
    dev.config_write(4, 0, &0xc000_0000u32.to_le_bytes());
    dev.config_write(5, 0, &0u32.to_le_bytes());
    dev.config_write(1, 0, &(cmd as u16).to_le_bytes());
    assert_eq!(dev.bar_decode_addr(), Some(0xc000_0000));
    // A move.
    dev.config_write(4, 0, &0xd000_0000u32.to_le_bytes());
    assert_eq!(dev.bar_decode_addr(), Some(0xd000_0000));
}

/// This thread's `warn!` lines since `test_log::start()`.
fn warnings() -> Vec<String> {
    crate::test_log::lines(log::Level::Warn)
}

#[test]
fn each_kind_of_driver_error_is_one_warning_naming_the_device() {
    crate::test_log::start();
    let mut h = harness();
    h.dev.set_name("disk-b");
    assert_eq!(h.dev.name(), "disk-b");
    let features_lo = h.r(DEVICE_FEATURE, 4);
    for _ in 0..3 {
        // Read-only fields: device_feature, num_queues, queue_notify_off.
        h.w(DEVICE_FEATURE, 4, 0xffff_ffff);
        h.w(NUM_QUEUES, 2, 7);
        h.w(QUEUE_NOTIFY_OFF, 2, 5);
        // A queue size that is not a power of two.
        h.w(QUEUE_SIZE, 2, 100);
        // Kicks before DRIVER_OK.
        h.dev.notify_eventfd(0).unwrap().write(1).unwrap();
        h.dev.process_notification(0);
        // Rings outside guest memory, then a reset.
        h.init_queue_0(0x1_0000_0000, 0x3000, 0x4000);
        assert_ne!(h.status() & status::DEVICE_NEEDS_RESET, 0);
        h.set_status(0);
    }
    assert_eq!(h.r(DEVICE_FEATURE, 4), features_lo);
    assert_eq!(h.r(NUM_QUEUES, 2), 2);
    assert_eq!(h.r(QUEUE_NOTIFY_OFF, 2), 0);
    assert_eq!(h.r(QUEUE_SIZE, 2), 256);
    assert!(h.log.lock().unwrap().processed.is_empty());
    let w = warnings();
    assert_eq!(w.len(), 4, "{w:#?}");
    for (line, what) in w.iter().zip([
        "write of 4 bytes to read-only or unknown common config offset 0x4 ignored",
        "queue size 100 refused",
        "queue 0 notified while the device is not live (status 0x0): ignored",
        "DRIVER_OK refused, the device needs a reset: queue 0 (size 256) has rings outside \
         guest memory or misaligned: desc 0x100000000, avail 0x3000, used 0x4000",
    ]) {
        assert!(line.starts_with("disk-b: "), "{line}");
        assert!(line.contains(what), "{line} lacks {what}");
        assert!(
            line.ends_with("(repeats are logged at debug level)"),
            "{line}"
        );
    }
    // The repeats went to debug.
    let debug = crate::test_log::lines(log::Level::Debug);
    assert!(
        debug
            .iter()
            .filter(|l| l.contains("queue size 100"))
            .count()
            == 2,
        "{debug:#?}"
    );
}

#[test]
fn a_spurious_wakeup_or_a_live_device_is_no_warning() {
    crate::test_log::start();
    let mut h = harness();
    // No kick behind the wakeup.
    h.dev.process_notification(0);
    h.full_init();
    h.dev.notify_eventfd(0).unwrap().write(1).unwrap();
    h.dev.process_notification(0);
    assert_eq!(h.log.lock().unwrap().processed, vec![0]);
    assert_eq!(warnings(), Vec::<String>::new());
}

#[test]
fn a_config_change_moves_the_generation_and_interrupts_only_a_live_driver() {
    let mut h = harness();
    assert_eq!(h.r(CONFIG_GENERATION, 1), 0);
    // Not live yet: the generation moves, no interrupt (the driver reads the config when it
    // starts).
    h.dev.config_changed().unwrap();
    assert_eq!(h.r(CONFIG_GENERATION, 1), 1);
    assert!(h.sink.take().is_empty());
    h.full_init();
    h.dev.config_changed().unwrap();
    assert_eq!(h.r(CONFIG_GENERATION, 1), 2);
    // INTx (MSI-X is off): the line goes up and the ISR says "config".
    assert_eq!(h.sink.take(), vec![SinkCall::Intx(true)]);
    assert_eq!(h.r(ISR_OFFSET, 1), 2);
    // Through the config vector once MSI-X is on.
    h.enable_msix(false);
    h.program_vector(0, false);
    h.w(CONFIG_MSIX_VECTOR, 2, 0);
    h.sink.take();
    h.dev.config_changed().unwrap();
    assert_eq!(h.sink.take(), vec![SinkCall::Msix(0)]);
    // The generation wraps.
    for _ in 0..256 {
        h.dev.config_changed().unwrap();
    }
    assert_eq!(h.r(CONFIG_GENERATION, 1), 3);
}

#[test]
fn a_device_with_its_own_worker_keeps_its_queues_and_sources_out_of_the_event_loop() {
    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    let seen = Arc::new(Mutex::new(Vec::new()));
    let evt = EventFd::new(EFD_NONBLOCK).unwrap();
    let trigger = evt.try_clone().unwrap();
    let dev = ExtraSourceDevice {
        evt,
        seen: seen.clone(),
    };
    let dev = crate::Threaded::spawn(dev, "tvm-test-io", || Ok(())).unwrap();
    let pci = VirtioPciDevice::new(dev, test_mem(0x10_0000), Arc::new(NullSink)).unwrap();
    let notify = pci.notify_eventfd(0).unwrap().try_clone().unwrap();
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    let pci: Arc<Mutex<dyn MutEventSubscriber + Send>> = Arc::new(Mutex::new(pci));
    em.add_subscriber(pci);
    // A queue notification is the worker's: the loop does not see it (nor consume it).
    notify.write(1).unwrap();
    assert_eq!(em.run_with_timeout(50).unwrap(), 0);
    assert_eq!(notify.read().unwrap(), 1);
    // So are the device's extra sources: the worker polls them, not the loop.
    trigger.write(1).unwrap();
    assert_eq!(em.run_with_timeout(50).unwrap(), 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while seen.lock().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker did not serve it"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(*seen.lock().unwrap(), vec![(0, true)]);
}

#[test]
fn a_saved_transport_comes_back_live_where_its_queues_were() {
    let mut h = harness();
    h.dev.set_bar_addr(GuestAddress(0xd000_0000)).unwrap();
    h.enable_msix(false);
    h.program_vector(0, false);
    h.program_vector(1, false);
    h.program_vector(2, true);
    h.negotiate(features::VERSION_1 | features::RING_EVENT_IDX);
    h.w(CONFIG_MSIX_VECTOR, 2, 2);
    h.setup_queue(0, 128, 0x1000, 0x3000, 0x4000);
    h.w(QUEUE_MSIX_VECTOR, 2, 0);
    h.setup_queue(1, 16, 0x8000, 0x9000, 0xa000);
    h.w(QUEUE_MSIX_VECTOR, 2, 1);
    h.driver_ok();
    assert!(h.dev.is_active());
    // The device had completed 5 chains of queue 0 and 300 (wrapped) of queue 1.
    h.dev.mem.write_obj(5u16, GuestAddress(0x4002)).unwrap();
    h.dev.mem.write_obj(300u16, GuestAddress(0xa002)).unwrap();
    let saved = h.dev.save_state();
    assert_eq!(saved.queues[1].vector, 1);
    assert_eq!(saved.config_vector, 2);
    assert_eq!(saved.msix_table[2][3], 1, "vector 2 masked");

    // A new transport on the same memory, as a restore builds it.
    let log = Arc::new(Mutex::new(FakeLog::default()));
    let sink = Arc::new(RecordingSink::default());
    let device = FakeDevice {
        log: log.clone(),
        ctx: None,
        fail_activate: false,
        config: [0; 8],
    };
    let mut back = VirtioPciDevice::new(device, h.dev.mem.clone(), sink.clone()).unwrap();
    back.restore_state(&saved).unwrap();
    assert!(back.is_active());
    assert_eq!(back.save_state(), saved);
    assert_eq!(back.bar_decode_addr(), Some(0xd000_0000));
    let log = log.lock().unwrap();
    assert_eq!(log.activations.len(), 1);
    assert_eq!(
        log.activations[0].1[1],
        (true, 16, 0x8000, 0x9000, 0xa000, true)
    );
    assert_eq!(log.next_avail[0], vec![5, 300]);
    drop(log);
    // The MSI-X routes were replayed: the sink saw every entry.
    let tables = sink
        .take()
        .into_iter()
        .filter(|c| matches!(c, SinkCall::Table(..)))
        .count();
    assert_eq!(tables, 3 * 4);
    // After the wiring: every queue is served once and its vector signalled.
    back.kick_after_restore().unwrap();
    let msix: Vec<_> = sink
        .take()
        .into_iter()
        .filter(|c| matches!(c, SinkCall::Msix(_)))
        .collect();
    assert_eq!(msix, vec![SinkCall::Msix(0), SinkCall::Msix(1)]);
    for q in 0..2 {
        assert_eq!(back.notify_eventfd(q).unwrap().read().unwrap(), 1);
    }
}

#[test]
fn a_saved_transport_for_another_device_or_not_yet_live_is_handled() {
    let mut h = harness();
    let mut saved = h.dev.save_state();
    // Never initialised: restored as such, not activated.
    let mut fresh = harness();
    fresh.dev.restore_state(&saved).unwrap();
    assert!(!fresh.dev.is_active());
    assert_eq!(fresh.dev.status(), 0);
    // Another device type, or another queue count.
    saved.device_type = 1;
    assert!(matches!(
        harness().dev.restore_state(&saved),
        Err(Error::StateMismatch(_))
    ));
    let mut saved = h.dev.save_state();
    saved.queues.pop();
    assert!(matches!(
        harness().dev.restore_state(&saved),
        Err(Error::StateMismatch(_))
    ));
    // Rings outside guest memory: the activation fails, the restore says so.
    h.negotiate(features::VERSION_1);
    h.setup_queue(0, 128, 0x1000, 0x3000, 0x4000);
    h.driver_ok();
    let mut saved = h.dev.save_state();
    saved.queues[0].device = 0x7fff_f000_0000;
    assert!(harness().dev.restore_state(&saved).is_err());
}
