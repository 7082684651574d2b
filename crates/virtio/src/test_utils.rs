// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Fakes and a guest-driver harness for tests that drive a device behind
//! [`VirtioPciDevice`] the way a guest driver would: the register offsets by name, a
//! [`NullDevice`] and a [`NullSink`] for tests that need a device or a sink but never look
//! at it, an [`InterruptSink`] that records what it is asked to do ([`RecordingSink`]), a
//! [`VirtioInterrupt`] that records the queues a device signals when it runs without a
//! transport ([`RecordingInterrupt`]),
//! MSI-X programming, feature negotiation and queue set-up through the BAR, and driver
//! rings whose used ring can be read back.
//!
//! Test code only (this crate's unit tests, and other crates' tests through the
//! `test-utils` feature): the helpers panic on anything unexpected.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use tvm_virtio::test_utils::{
//!     self, common_cfg, DriverRing, NullDevice, QueueSetup, RecordingSink,
//! };
//! use tvm_virtio::{features, VirtioPciDevice};
//! use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
//! let sink = Arc::new(RecordingSink::default());
//! let device = NullDevice::new(VIRTIO_ID_BLOCK, &[256]);
//! let dev = Mutex::new(VirtioPciDevice::new(device, mem.clone(), sink.clone()).unwrap());
//! let ring = DriverRing::new(&mem, 0, 16);
//! let negotiated = test_utils::init_driver(
//!     &dev,
//!     features::VERSION_1,
//!     &[QueueSetup::new(&ring, 1)],
//! );
//! assert_eq!(negotiated.queue_max_sizes, [256]);
//! assert_eq!(test_utils::bar_read(&dev, common_cfg::NUM_QUEUES, 2), 1);
//! // MSI-X is off: the device would raise INTx, and has raised nothing yet.
//! assert!(sink.take().is_empty());
//! ```

use std::io;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tvm_bus::PciDevice;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{
    features, status, ActivateContext, InterruptSink, MsixEntry, VirtioDevice, VirtioInterrupt,
    VirtioPciDevice, NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER,
};

/// BAR offsets of the common configuration fields (`virtio_pci_common_cfg`, virtio 1.2,
/// 4.1.4.3), [`COMMON_CFG_OFFSET`](crate::COMMON_CFG_OFFSET) included.
pub mod common_cfg {
    use crate::COMMON_CFG_OFFSET;

    /// `device_feature_select` (4 bytes): which 32 bits `device_feature` shows.
    pub const DEVICE_FEATURE_SELECT: u64 = COMMON_CFG_OFFSET;
    /// `device_feature` (4 bytes, read-only).
    pub const DEVICE_FEATURE: u64 = COMMON_CFG_OFFSET + 0x04;
    /// `driver_feature_select` (4 bytes): which 32 bits `driver_feature` takes.
    pub const DRIVER_FEATURE_SELECT: u64 = COMMON_CFG_OFFSET + 0x08;
    /// `driver_feature` (4 bytes).
    pub const DRIVER_FEATURE: u64 = COMMON_CFG_OFFSET + 0x0c;
    /// `config_msix_vector` (2 bytes).
    pub const CONFIG_MSIX_VECTOR: u64 = COMMON_CFG_OFFSET + 0x10;
    /// `num_queues` (2 bytes, read-only).
    pub const NUM_QUEUES: u64 = COMMON_CFG_OFFSET + 0x12;
    /// `device_status` (1 byte).
    pub const DEVICE_STATUS: u64 = COMMON_CFG_OFFSET + 0x14;
    /// `config_generation` (1 byte, read-only).
    pub const CONFIG_GENERATION: u64 = COMMON_CFG_OFFSET + 0x15;
    /// `queue_select` (2 bytes): which queue the `queue_*` fields below show.
    pub const QUEUE_SELECT: u64 = COMMON_CFG_OFFSET + 0x16;
    /// `queue_size` (2 bytes): the maximum on reset, the driver's choice after.
    pub const QUEUE_SIZE: u64 = COMMON_CFG_OFFSET + 0x18;
    /// `queue_msix_vector` (2 bytes).
    pub const QUEUE_MSIX_VECTOR: u64 = COMMON_CFG_OFFSET + 0x1a;
    /// `queue_enable` (2 bytes).
    pub const QUEUE_ENABLE: u64 = COMMON_CFG_OFFSET + 0x1c;
    /// `queue_notify_off` (2 bytes, read-only).
    pub const QUEUE_NOTIFY_OFF: u64 = COMMON_CFG_OFFSET + 0x1e;
    /// `queue_desc` (8 bytes): the descriptor table's guest address.
    pub const QUEUE_DESC: u64 = COMMON_CFG_OFFSET + 0x20;
    /// `queue_driver` (8 bytes): the available ring's guest address.
    pub const QUEUE_DRIVER: u64 = COMMON_CFG_OFFSET + 0x28;
    /// `queue_device` (8 bytes): the used ring's guest address.
    pub const QUEUE_DEVICE: u64 = COMMON_CFG_OFFSET + 0x30;
}

/// PCI config space and MSI-X table offsets and values the harness uses (PCI Local Bus
/// 3.0, 6.7 and 6.8.2).
pub mod pci_cfg {
    use crate::MSIX_TABLE_OFFSET;

    /// Byte offset of the capabilities pointer.
    pub const CAPABILITIES_POINTER: usize = 0x34;
    /// Capability ID of MSI-X.
    pub const CAP_ID_MSIX: u32 = 0x11;
    /// MSI-X Enable, bit 15 of the MSI-X message control word.
    pub const MSIX_CTRL_ENABLE: u16 = 1 << 15;
    /// Bytes of one MSI-X table entry: address low, address high, data, vector control.
    pub const MSIX_ENTRY_SIZE: u64 = 16;
    /// Offset of the message address (low 32 bits) in an MSI-X table entry.
    pub const MSIX_ENTRY_ADDR_LO: u64 = 0;
    /// Offset of the message address (high 32 bits) in an MSI-X table entry.
    pub const MSIX_ENTRY_ADDR_HI: u64 = 4;
    /// Offset of the message data in an MSI-X table entry.
    pub const MSIX_ENTRY_DATA: u64 = 8;
    /// Offset of the vector control word in an MSI-X table entry (bit 0: masked).
    pub const MSIX_ENTRY_VECTOR_CTRL: u64 = 12;
    /// The x86 MSI address every programmed vector gets (the LAPIC window).
    pub const MSI_ADDRESS: u32 = 0xfee0_0000;
    /// Data of vector `v` is `MSI_DATA_BASE + v`.
    pub const MSI_DATA_BASE: u32 = 0x30;

    /// BAR offset of MSI-X table entry `vector` ([`MSIX_TABLE_OFFSET`] included).
    pub fn msix_entry(vector: u16) -> u64 {
        MSIX_TABLE_OFFSET + MSIX_ENTRY_SIZE * u64::from(vector)
    }
}

/// A [`VirtioDevice`] that does nothing: it offers no device features, reads its config
/// space as zeros, ignores config writes, activates, resets and processes queues without
/// doing anything. For transport tests that need a device of some type with some queues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NullDevice {
    device_type: u32,
    queue_max_sizes: Vec<u16>,
}

impl NullDevice {
    /// A device of virtio type `device_type` (`VIRTIO_ID_*`) with one queue of each of
    /// `queue_max_sizes`.
    pub fn new(device_type: u32, queue_max_sizes: &[u16]) -> Self {
        NullDevice {
            device_type,
            queue_max_sizes: queue_max_sizes.to_vec(),
        }
    }
}

impl VirtioDevice for NullDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn device_features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, _ctx: ActivateContext) -> crate::Result<()> {
        Ok(())
    }

    fn reset(&mut self) {}

    fn process_queue(&mut self, _queue: u16) {}
}

/// An [`InterruptSink`] that delivers nothing and always succeeds, for tests that never
/// look at interrupts; [`RecordingSink`] is the one to read them back from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NullSink;

impl InterruptSink for NullSink {
    fn msix(&self, _vector: u16) -> io::Result<()> {
        Ok(())
    }

    fn intx(&self, _level: bool) -> io::Result<()> {
        Ok(())
    }
}

/// A [`VirtioInterrupt`] that records every queue a device signals, in order, and takes
/// configuration interrupts without recording them: for tests that activate a device
/// directly, without a transport.
#[derive(Debug, Default)]
pub struct RecordingInterrupt {
    queues: Mutex<Vec<u16>>,
}

impl RecordingInterrupt {
    /// The queues signalled since the last [`take`](Self::take), in order.
    pub fn queues(&self) -> Vec<u16> {
        lock(&self.queues).clone()
    }

    /// The queues signalled since the last call, in order; forgets them.
    pub fn take(&self) -> Vec<u16> {
        std::mem::take(&mut *lock(&self.queues))
    }
}

impl VirtioInterrupt for RecordingInterrupt {
    fn signal_queue(&self, queue: u16) -> crate::Result<()> {
        lock(&self.queues).push(queue);
        Ok(())
    }

    fn signal_config(&self) -> crate::Result<()> {
        Ok(())
    }
}

/// One call a [`RecordingSink`] recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkCall {
    /// [`InterruptSink::msix`]: this MSI-X vector was delivered.
    Msix(u16),
    /// [`InterruptSink::intx`]: the INTx line was set to this level.
    Intx(bool),
    /// [`InterruptSink::msix_table_changed`]: the guest wrote this MSI-X table entry.
    Table(u16, MsixEntry),
}

/// An [`InterruptSink`] that records every MSI-X vector and INTx level it is asked to
/// deliver and every MSI-X table change it is told of, in order.
#[derive(Debug, Default)]
pub struct RecordingSink {
    calls: Mutex<Vec<SinkCall>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RecordingSink {
    /// The MSI-X vectors delivered since the last [`take`](Self::take).
    pub fn msix(&self) -> Vec<u16> {
        self.filter(|c| match c {
            SinkCall::Msix(vector) => Some(vector),
            _ => None,
        })
    }

    /// The INTx levels set since the last [`take`](Self::take).
    pub fn intx(&self) -> Vec<bool> {
        self.filter(|c| match c {
            SinkCall::Intx(level) => Some(level),
            _ => None,
        })
    }

    /// What `pick` takes from each call since the last `take`, in order.
    fn filter<T>(&self, pick: impl Fn(SinkCall) -> Option<T>) -> Vec<T> {
        lock(&self.calls).iter().copied().filter_map(pick).collect()
    }

    /// Every call since the last `take`, in order; forgets them.
    pub fn take(&self) -> Vec<SinkCall> {
        std::mem::take(&mut *lock(&self.calls))
    }

    fn push(&self, call: SinkCall) {
        lock(&self.calls).push(call);
    }
}

impl InterruptSink for RecordingSink {
    fn msix(&self, vector: u16) -> io::Result<()> {
        self.push(SinkCall::Msix(vector));
        Ok(())
    }

    fn intx(&self, level: bool) -> io::Result<()> {
        self.push(SinkCall::Intx(level));
        Ok(())
    }

    fn msix_table_changed(&self, vector: u16, entry: MsixEntry) {
        self.push(SinkCall::Table(vector, entry));
    }
}

/// Reads `len` (at most 8) bytes at BAR offset `offset`, little endian.
pub fn bar_read<D: VirtioDevice>(dev: &Mutex<VirtioPciDevice<D>>, offset: u64, len: usize) -> u64 {
    let mut data = [0u8; 8];
    lock(dev).bar_read(offset, &mut data[..len]);
    u64::from_le_bytes(data)
}

/// Writes the low `len` (at most 8) bytes of `value` at BAR offset `offset`.
pub fn bar_write<D: VirtioDevice>(
    dev: &Mutex<VirtioPciDevice<D>>,
    offset: u64,
    len: usize,
    value: u64,
) {
    lock(dev).bar_write(offset, &value.to_le_bytes()[..len]);
}

/// Kicks queue `queue` through the notify area, as the guest's write that the VMM's
/// ioeventfd would catch.
pub fn notify<D: VirtioDevice>(dev: &Mutex<VirtioPciDevice<D>>, queue: u16) {
    let offset = NOTIFY_OFFSET + u64::from(queue) * u64::from(NOTIFY_OFF_MULTIPLIER);
    bar_write(dev, offset, 2, u64::from(queue));
}

/// Writes `value` to the device status (0 resets the device).
pub fn set_status<D: VirtioDevice>(dev: &Mutex<VirtioPciDevice<D>>, value: u8) {
    bar_write(dev, common_cfg::DEVICE_STATUS, 1, u64::from(value));
}

/// Finds the MSI-X capability, enables MSI-X and programs and unmasks each of `vectors`
/// (address [`pci_cfg::MSI_ADDRESS`], data [`pci_cfg::MSI_DATA_BASE`] + vector); returns
/// the table size (number of vectors) the capability advertises.
///
/// # Panics
///
/// When the device has no MSI-X capability.
pub fn enable_msix<D: VirtioDevice>(dev: &mut VirtioPciDevice<D>, vectors: &[u16]) -> u16 {
    let mut ptr = (dev.config_read(pci_cfg::CAPABILITIES_POINTER / 4) & 0xff) as usize;
    while ptr != 0 && (dev.config_read(ptr / 4) & 0xff) != pci_cfg::CAP_ID_MSIX {
        ptr = ((dev.config_read(ptr / 4) >> 8) & 0xff) as usize;
    }
    assert_ne!(ptr, 0, "no MSI-X capability");
    // Message control is the upper half of the capability's first dword; the table size
    // field holds the number of vectors minus one.
    let table_size = ((dev.config_read(ptr / 4) >> 16) & 0x7ff) as u16 + 1;
    dev.config_write(ptr / 4, 2, &pci_cfg::MSIX_CTRL_ENABLE.to_le_bytes());
    for &v in vectors {
        let entry = pci_cfg::msix_entry(v);
        let data = pci_cfg::MSI_DATA_BASE + u32::from(v);
        for (off, val) in [
            (pci_cfg::MSIX_ENTRY_ADDR_LO, pci_cfg::MSI_ADDRESS),
            (pci_cfg::MSIX_ENTRY_ADDR_HI, 0),
            (pci_cfg::MSIX_ENTRY_DATA, data),
            // 0: unmasked.
            (pci_cfg::MSIX_ENTRY_VECTOR_CTRL, 0),
        ] {
            dev.bar_write(entry + off, &val.to_le_bytes());
        }
    }
    table_size
}

/// A driver's split ring: descriptor table and available ring from virtio-queue's
/// [`MockSplitQueue`], the used ring placed after the available ring's `used_event`
/// (virtio-queue 0.18's `MockSplitQueue::create` puts it too early, overlapping them:
/// rust-vmm/vm-virtio#400).
pub struct DriverRing<'a> {
    /// The descriptor table and available ring; add chains through it.
    pub mock: MockSplitQueue<'a, GuestMemoryMmap<()>>,
    mem: &'a GuestMemoryMmap<()>,
    size: u16,
    used_addr: u64,
}

impl std::fmt::Debug for DriverRing<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriverRing")
            .field("desc", &self.mock.desc_table_addr())
            .field("avail", &self.mock.avail_addr())
            .field("used", &format_args!("{:#x}", self.used_addr))
            .field("size", &self.size)
            .finish()
    }
}

impl<'a> DriverRing<'a> {
    /// A ring of `size` entries at guest address `base`, with a zeroed used ring.
    pub fn new(mem: &'a GuestMemoryMmap<()>, base: u64, size: u16) -> Self {
        let mock = MockSplitQueue::create(mem, GuestAddress(base), size);
        // flags, idx, ring[size], used_event; the used ring is 4-byte aligned.
        let used_addr = (mock.avail_addr().0 + 6 + 2 * u64::from(size) + 3) & !3;
        // flags, idx, ring[size] of (id, len), avail_event.
        mem.write_slice(
            &vec![0u8; 6 + 8 * usize::from(size)],
            GuestAddress(used_addr),
        )
        .expect("the used ring lies in guest memory");
        DriverRing {
            mock,
            mem,
            size,
            used_addr,
        }
    }

    /// Guest address of the descriptor table.
    pub fn desc_addr(&self) -> u64 {
        self.mock.desc_table_addr().0
    }

    /// Guest address of the available ring.
    pub fn avail_addr(&self) -> u64 {
        self.mock.avail_addr().0
    }

    /// Guest address of the used ring.
    pub fn used_addr(&self) -> u64 {
        self.used_addr
    }

    /// The number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The used ring's `idx`.
    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.used_addr + 2))
            .expect("the used ring lies in guest memory")
    }

    /// Used entry `i` (modulo the ring size) as (head, len).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let addr = self.used_addr + 4 + 8 * u64::from(i % self.size);
        let read = |a| {
            self.mem
                .read_obj(GuestAddress(a))
                .expect("the used ring lies in guest memory")
        };
        (read(addr), read(addr + 4))
    }

    /// Sets `used_event` to the used index, as a driver with EVENT_IDX does when it wants
    /// an interrupt after the next used entry.
    pub fn want_interrupt(&self) {
        let addr = self.mock.avail_addr().0 + 4 + 2 * u64::from(self.size);
        self.mem
            .write_obj(self.used_idx(), GuestAddress(addr))
            .expect("the available ring lies in guest memory");
    }
}

/// A split descriptor for [`MockSplitQueue::add_desc_chains`]: `addr`, `len`, `flags`
/// (`VRING_DESC_F_*`) and the `next` index.
pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// How [`init_driver`] sets up one queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueSetup {
    /// The size the driver chooses.
    pub size: u16,
    /// The MSI-X vector of the queue.
    pub msix_vector: u16,
    /// Guest address of the descriptor table.
    pub desc: u64,
    /// Guest address of the available ring.
    pub avail: u64,
    /// Guest address of the used ring.
    pub used: u64,
}

impl QueueSetup {
    /// The set-up of `ring`, on MSI-X vector `msix_vector`.
    pub fn new(ring: &DriverRing<'_>, msix_vector: u16) -> Self {
        QueueSetup {
            size: ring.size(),
            msix_vector,
            desc: ring.desc_addr(),
            avail: ring.avail_addr(),
            used: ring.used_addr(),
        }
    }
}

/// What [`init_driver`] saw on the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The features the device offered (transport bits included).
    pub offered: u64,
    /// The maximum size each queue advertised before the driver chose its own.
    pub queue_max_sizes: Vec<u16>,
}

/// Initialises the device the way a driver does (virtio 1.2, 3.1.1): ACKNOWLEDGE and
/// DRIVER, reads the offered features and accepts `want` (which must all be offered and
/// include VERSION_1), FEATURES_OK, sets up `queues` in order (queue *i* from
/// `queues[i]`), then DRIVER_OK; checks that the device is active.
///
/// # Panics
///
/// When the device does not offer `want`, refuses FEATURES_OK, has another number of
/// queues than `queues`, or does not come up.
pub fn init_driver<D: VirtioDevice>(
    dev: &Mutex<VirtioPciDevice<D>>,
    want: u64,
    queues: &[QueueSetup],
) -> Negotiated {
    use common_cfg::*;

    set_status(dev, status::ACKNOWLEDGE);
    set_status(dev, status::ACKNOWLEDGE | status::DRIVER);
    bar_write(dev, DEVICE_FEATURE_SELECT, 4, 0);
    let lo = bar_read(dev, DEVICE_FEATURE, 4);
    bar_write(dev, DEVICE_FEATURE_SELECT, 4, 1);
    let hi = bar_read(dev, DEVICE_FEATURE, 4);
    let offered = hi << 32 | lo;
    assert_ne!(
        want & features::VERSION_1,
        0,
        "a modern driver wants VERSION_1"
    );
    assert_eq!(offered & want, want, "offered {offered:#x}");
    bar_write(dev, DRIVER_FEATURE_SELECT, 4, 0);
    bar_write(dev, DRIVER_FEATURE, 4, want & 0xffff_ffff);
    bar_write(dev, DRIVER_FEATURE_SELECT, 4, 1);
    bar_write(dev, DRIVER_FEATURE, 4, want >> 32);
    let features_ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    set_status(dev, features_ok);
    assert_eq!(
        bar_read(dev, DEVICE_STATUS, 1),
        u64::from(features_ok),
        "FEATURES_OK accepted"
    );
    assert_eq!(
        bar_read(dev, NUM_QUEUES, 2),
        queues.len() as u64,
        "num_queues"
    );
    let mut queue_max_sizes = Vec::with_capacity(queues.len());
    for (q, setup) in queues.iter().enumerate() {
        bar_write(dev, QUEUE_SELECT, 2, q as u64);
        queue_max_sizes.push(bar_read(dev, QUEUE_SIZE, 2) as u16);
        bar_write(dev, QUEUE_SIZE, 2, u64::from(setup.size));
        bar_write(dev, QUEUE_MSIX_VECTOR, 2, u64::from(setup.msix_vector));
        bar_write(dev, QUEUE_DESC, 8, setup.desc);
        bar_write(dev, QUEUE_DRIVER, 8, setup.avail);
        bar_write(dev, QUEUE_DEVICE, 8, setup.used);
        bar_write(dev, QUEUE_ENABLE, 2, 1);
    }
    let driver_ok = features_ok | status::DRIVER_OK;
    set_status(dev, driver_ok);
    assert_eq!(
        bar_read(dev, DEVICE_STATUS, 1),
        u64::from(driver_ok),
        "DRIVER_OK without DEVICE_NEEDS_RESET"
    );
    assert!(lock(dev).is_active());
    Negotiated {
        offered,
        queue_max_sizes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::COMMON_CFG_OFFSET;

    #[test]
    fn common_cfg_offsets_follow_the_spec_layout() {
        // virtio_pci_common_cfg is 0x38 bytes; queue_device is its last field.
        assert_eq!(common_cfg::QUEUE_DEVICE + 8 - COMMON_CFG_OFFSET, 0x38);
        assert_eq!(common_cfg::DEVICE_STATUS - COMMON_CFG_OFFSET, 0x14);
    }
}
