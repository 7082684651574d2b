// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The virtio-pci transport (virtio 1.2, 4.1): config space, capability list and BAR 0.

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, warn};
use tvm_bus::{PciBarKind, PciConfigSpace, PciDevice, PciHeaderConfig};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::interrupt::{TransportInterrupt, MSIX_ENTRY_SIZE};
use crate::{
    features, status, warn_once, ActivateContext, Error, InterruptSink, Result, VirtioDevice,
    VirtioInterrupt, WarnOnce,
};

/// Size of BAR 0 (64-bit, prefetchable not set): every region below lives in it.
pub const BAR_SIZE: u64 = 0x8000;
/// Offset of the common configuration structure in BAR 0.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
/// Length of the common configuration structure (up to `queue_device`).
const COMMON_CFG_LEN: u64 = 0x38;
/// Offset of the ISR status byte in BAR 0.
pub const ISR_OFFSET: u64 = 0x1000;
const ISR_LEN: u64 = 1;
/// Offset of the device-specific configuration in BAR 0.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
/// Offset of the notification area in BAR 0; queue `i` is notified at
/// `NOTIFY_OFFSET + NOTIFY_OFF_MULTIPLIER * i`.
pub const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_LEN: u64 = 0x1000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Offset of the MSI-X table in BAR 0 (room for 512 vectors).
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// Offset of the MSI-X pending-bit array in BAR 0.
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
const MSIX_PBA_LEN: u64 = 0x1000;

/// Most queues a device may have: one MSI-X vector each plus the config vector must fit
/// the table, and each notify address the notify area.
const MAX_QUEUES: usize = 256;
/// Event data of the device's first extra event source; queue notifications use the queue
/// index (below [`MAX_QUEUES`]).
const EXTRA_EVENT_BASE: u32 = 0x1_0000;
/// Largest queue size of the split ring (virtio 1.2, 2.7).
const MAX_QUEUE_SIZE: u16 = 32768;

const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Subsystem IDs as QEMU gives modern virtio devices.
const VIRTIO_PCI_SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x1100;

const PCI_CAP_ID_VNDR: u8 = 0x09;
const PCI_CAP_ID_MSIX: u8 = 0x11;
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
/// MSI-X message control, bit 15: MSI-X enable.
const MSIX_CTRL_ENABLE: u16 = 1 << 15;
/// MSI-X message control, bit 14: function mask.
const MSIX_CTRL_FUNCTION_MASK: u16 = 1 << 14;
/// Command register bit 1: memory-space decoding enabled.
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
/// Command register bit 10: INTx disable.
const PCI_COMMAND_INTX_DISABLE: u16 = 1 << 10;
const COMMAND_REG: usize = 1;

/// Per-queue configuration as the driver writes it, before activation.
#[derive(Clone, Copy, Debug)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: max_size,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

/// Driver errors the transport reports once at `warn!` (then at `debug!`), one flag per
/// kind.
#[derive(Debug, Default)]
struct DriverWarnings {
    /// DRIVER_OK refused: the device now needs a reset.
    activation: WarnOnce,
    /// A queue size or queue address write refused.
    queue_config: WarnOnce,
    /// A write to a read-only or unknown common config field.
    common_write: WarnOnce,
    /// A queue notification while the device is not live.
    notify: WarnOnce,
}

/// A [`VirtioDevice`] behind the virtio 1.x PCI transport.
///
/// # BAR 0 layout
///
/// One 64-bit memory BAR of [`BAR_SIZE`] (32 KiB) bytes:
///
/// | offset | what |
/// | --- | --- |
/// | `0x0000` | common configuration (`virtio_pci_common_cfg`, 0x38 bytes) |
/// | `0x1000` | ISR status (1 byte, read clears) |
/// | `0x2000` | device-specific configuration (4 KiB window) |
/// | `0x3000` | notifications: queue `i` at `0x3000 + 4 * i` |
/// | `0x4000` | MSI-X table (16 bytes per vector; vector 0 .. num_queues) |
/// | `0x6000` | MSI-X pending-bit array |
///
/// The MSI-X table has `num_queues + 1` vectors. Accesses with an unsupported size or
/// offset read as 0 and are ignored on write (logged at `debug!`).
///
/// # Driver errors
///
/// A refused activation (the device then sets DEVICE_NEEDS_RESET), a refused queue size or
/// queue address, a write to a read-only common config field and a queue notification
/// while the device is not live are each logged at `warn!` the first time, prefixed with
/// the device's [`name`](Self::name), and at `debug!` afterwards.
///
/// # Wiring
///
/// The VMM places the BAR with [`set_bar_addr`](Self::set_bar_addr) and routes MMIO in
/// `bar_addr() .. bar_addr() + bar_size()` to [`bar_read`](Self::bar_read) /
/// [`bar_write`](Self::bar_write); after any config-space write it compares
/// [`bar_addr`](Self::bar_addr) with the old value and moves the MMIO range and the
/// ioeventfds when the guest reprogrammed the BAR. Each [`notify_eventfd`](Self::notify_eventfd)
/// is registered as an ioeventfd at `bar_addr() + notify_offset(i)`. The transport is its own
/// event-manager subscriber: it watches those EventFds and calls
/// [`VirtioDevice::process_queue`] on the active device.
pub struct VirtioPciDevice<D: VirtioDevice> {
    device: D,
    name: String,
    warnings: DriverWarnings,
    mem: GuestMemoryMmap<()>,
    config: PciConfigSpace,
    msix_cap_reg: usize,
    interrupt: Arc<TransportInterrupt>,
    queue_evts: Vec<EventFd>,
    queues: Vec<QueueConfig>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    active: bool,
}

impl<D: VirtioDevice> std::fmt::Debug for VirtioPciDevice<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

fn vendor_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let cap_len: u8 = if extra.is_some() { 20 } else { 16 };
    let mut cap = vec![PCI_CAP_ID_VNDR, 0, cap_len, cfg_type, 0, 0, 0, 0];
    // Offsets and lengths are constants below BAR_SIZE.
    cap.extend_from_slice(&(offset as u32).to_le_bytes());
    cap.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(x) = extra {
        cap.extend_from_slice(&x.to_le_bytes());
    }
    cap
}

impl<D: VirtioDevice> VirtioPciDevice<D> {
    /// Wraps `device` in the PCI transport.
    ///
    /// `mem` is the guest memory the rings are checked against at activation; `sink`
    /// delivers the interrupts.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidQueueCount`] / [`Error::InvalidQueueMaxSize`] for a device with bad
    /// queue sizes, [`Error::CreateEventFd`], [`Error::SetupConfigSpace`].
    pub fn new(device: D, mem: GuestMemoryMmap<()>, sink: Arc<dyn InterruptSink>) -> Result<Self> {
        let max_sizes = device.queue_max_sizes().to_vec();
        if max_sizes.is_empty() || max_sizes.len() > MAX_QUEUES {
            return Err(Error::InvalidQueueCount(max_sizes.len()));
        }
        for (index, &size) in max_sizes.iter().enumerate() {
            if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
                return Err(Error::InvalidQueueMaxSize { index, size });
            }
        }
        let num_queues = max_sizes.len();
        // Checked above: at most MAX_QUEUES + 1 vectors.
        let num_vectors = (num_queues + 1) as u16;

        let device_type = device.device_type();
        let (class_code, subclass) = match device_type {
            // Network controller, ethernet.
            1 => (0x02, 0x00),
            // Mass storage controller, other.
            2 => (0x01, 0x80),
            // Unclassified.
            _ => (0xff, 0x00),
        };
        let mut config = PciConfigSpace::new(&PciHeaderConfig {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(device_type as u16),
            revision_id: 1,
            prog_if: 0,
            subclass,
            class_code,
            subsystem_vendor_id: VIRTIO_PCI_SUBSYSTEM_VENDOR_ID,
            subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
            interrupt_pin: 1,
        });
        config
            .add_bar(0, BAR_SIZE, PciBarKind::Mmio64)
            .map_err(Error::SetupConfigSpace)?;
        let caps = [
            vendor_cap(
                VIRTIO_PCI_CAP_COMMON_CFG,
                COMMON_CFG_OFFSET,
                COMMON_CFG_LEN,
                None,
            ),
            vendor_cap(
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                NOTIFY_LEN,
                Some(NOTIFY_OFF_MULTIPLIER),
            ),
            vendor_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, ISR_LEN, None),
            vendor_cap(
                VIRTIO_PCI_CAP_DEVICE_CFG,
                DEVICE_CFG_OFFSET,
                DEVICE_CFG_LEN,
                None,
            ),
        ];
        for cap in caps {
            config
                .add_capability(&cap)
                .map_err(Error::SetupConfigSpace)?;
        }
        let msg_ctrl = num_vectors - 1;
        let mut msix = vec![PCI_CAP_ID_MSIX, 0];
        msix.extend_from_slice(&msg_ctrl.to_le_bytes());
        // BIR 0 in the low 3 bits; the offsets are 8-byte aligned.
        msix.extend_from_slice(&(MSIX_TABLE_OFFSET as u32).to_le_bytes());
        msix.extend_from_slice(&(MSIX_PBA_OFFSET as u32).to_le_bytes());
        let msix_off = config
            .add_capability(&msix)
            .map_err(Error::SetupConfigSpace)?;
        let msix_cap_reg = msix_off / 4;
        // Message control is the upper half of the capability's first dword: open the
        // enable and function-mask bits.
        config
            .set_writable_mask(
                msix_cap_reg,
                u32::from(MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK) << 16,
            )
            .map_err(Error::SetupConfigSpace)?;

        let queue_evts = (0..num_queues)
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(Error::CreateEventFd))
            .collect::<Result<Vec<_>>>()?;
        let interrupt = Arc::new(TransportInterrupt::new(sink, num_vectors, num_queues));

        Ok(VirtioPciDevice {
            device,
            name: format!("virtio device type {device_type}"),
            warnings: DriverWarnings::default(),
            mem,
            config,
            msix_cap_reg,
            interrupt,
            queue_evts,
            queues: max_sizes.into_iter().map(QueueConfig::new).collect(),
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            active: false,
        })
    }

    /// Names the device in log lines (default: `virtio device type N`); the VMM uses the
    /// name it gives the device elsewhere, e.g. `virtio-blk "disk.img"`.
    pub fn set_name(&mut self, name: impl Into<String>) {
        self.name = name.into();
    }

    /// The name used in log lines.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The wrapped device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The wrapped device, mutably (for the VMM's shutdown flush, for instance).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device status byte as the driver last left it (with DEVICE_NEEDS_RESET).
    pub fn status(&self) -> u8 {
        self.status
    }

    /// Whether the device was activated and not reset since.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Size of BAR 0 in bytes.
    pub fn bar_size(&self) -> u64 {
        BAR_SIZE
    }

    /// Guest physical address of BAR 0, as the guest (or [`set_bar_addr`](Self::set_bar_addr))
    /// last programmed it.
    pub fn bar_addr(&self) -> u64 {
        self.config.bar_addr(0).unwrap_or(0)
    }

    /// Where BAR 0 decodes now: [`bar_addr`](Self::bar_addr) while memory-space decoding
    /// is enabled in the command register, `None` while it is off (a guest turns it off
    /// while it sizes or moves the BAR).
    pub fn bar_decode_addr(&self) -> Option<u64> {
        (self.config.command() & PCI_COMMAND_MEMORY != 0).then(|| self.bar_addr())
    }

    /// Programs BAR 0 with `addr` and enables memory-space decoding, as firmware would
    /// (the VMM's BAR allocation).
    ///
    /// # Errors
    ///
    /// [`Error::SetupConfigSpace`] if `addr` is not aligned to [`BAR_SIZE`].
    pub fn set_bar_addr(&mut self, addr: GuestAddress) -> Result<()> {
        self.config
            .set_bar_addr(0, addr.0)
            .map_err(Error::SetupConfigSpace)?;
        let cmd_status = self.config.read_reg(COMMAND_REG);
        self.config
            .set_reg(COMMAND_REG, cmd_status | u32::from(PCI_COMMAND_MEMORY))
            .map_err(Error::SetupConfigSpace)
    }

    /// The notification EventFd of queue `queue`, to register as an ioeventfd at
    /// `bar_addr() + notify_offset(queue)`; `None` for a queue that does not exist.
    pub fn notify_eventfd(&self, queue: u16) -> Option<&EventFd> {
        self.queue_evts.get(usize::from(queue))
    }

    /// Offset of queue `queue`'s notification address in BAR 0.
    pub fn notify_offset(&self, queue: u16) -> u64 {
        NOTIFY_OFFSET + u64::from(NOTIFY_OFF_MULTIPLIER) * u64::from(queue)
    }

    fn offered_features(&self) -> u64 {
        self.device.device_features() | features::TRANSPORT
    }

    /// Handles a guest read of `data.len()` bytes at `offset` in BAR 0.
    pub fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let len = data.len() as u64;
        if !matches!(len, 1 | 2 | 4 | 8) {
            debug!("virtio bar read at {offset:#x} with bad length {len}");
            return;
        }
        let Some(end) = offset.checked_add(len) else {
            return;
        };
        let inside = |base: u64, size: u64| offset >= base && end <= base + size;
        if inside(COMMON_CFG_OFFSET, COMMON_CFG_LEN) {
            self.common_read(offset - COMMON_CFG_OFFSET, data);
        } else if inside(ISR_OFFSET, ISR_LEN) {
            data[0] = self.interrupt.read_isr();
        } else if inside(DEVICE_CFG_OFFSET, DEVICE_CFG_LEN) {
            self.device.read_config(offset - DEVICE_CFG_OFFSET, data);
        } else if inside(MSIX_TABLE_OFFSET, self.msix_table_len()) {
            self.interrupt.table_read(offset - MSIX_TABLE_OFFSET, data);
        } else if inside(MSIX_PBA_OFFSET, MSIX_PBA_LEN) {
            self.interrupt.pba_read(offset - MSIX_PBA_OFFSET, data);
        } else {
            debug!("virtio bar read at {offset:#x}, {len} bytes: nothing there");
        }
    }

    /// Handles a guest write of `data` at `offset` in BAR 0.
    pub fn bar_write(&mut self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        if !matches!(len, 1 | 2 | 4 | 8) {
            debug!("virtio bar write at {offset:#x} with bad length {len}");
            return;
        }
        let Some(end) = offset.checked_add(len) else {
            return;
        };
        let inside = |base: u64, size: u64| offset >= base && end <= base + size;
        if inside(COMMON_CFG_OFFSET, COMMON_CFG_LEN) {
            self.common_write(offset - COMMON_CFG_OFFSET, data);
        } else if inside(DEVICE_CFG_OFFSET, DEVICE_CFG_LEN) {
            self.device.write_config(offset - DEVICE_CFG_OFFSET, data);
        } else if inside(NOTIFY_OFFSET, NOTIFY_LEN) {
            self.notify_write(offset - NOTIFY_OFFSET, len);
        } else if inside(MSIX_TABLE_OFFSET, self.msix_table_len()) {
            self.interrupt.table_write(offset - MSIX_TABLE_OFFSET, data);
        } else {
            debug!("virtio bar write at {offset:#x}, {len} bytes ignored");
        }
    }

    fn msix_table_len(&self) -> u64 {
        (self.queues.len() as u64 + 1) * MSIX_ENTRY_SIZE
    }

    fn notify_write(&mut self, offset: u64, len: u64) {
        let mult = u64::from(NOTIFY_OFF_MULTIPLIER);
        let queue = offset / mult;
        let evt = usize::try_from(queue)
            .ok()
            .and_then(|q| self.queue_evts.get(q));
        match evt {
            Some(evt) if offset % mult == 0 && matches!(len, 2 | 4) => {
                if let Err(e) = evt.write(1) {
                    warn!("failed to signal the notification eventfd of queue {queue}: {e}");
                }
            }
            _ => debug!("virtio notify write at {offset:#x}, {len} bytes ignored"),
        }
    }

    fn selected_queue(&self) -> Option<&QueueConfig> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        let q = self.selected_queue().copied();
        let value: u64 = match (offset, data.len()) {
            (0x00, 4) => u64::from(self.device_feature_select),
            (0x04, 4) => match self.device_feature_select {
                0 => self.offered_features() & 0xffff_ffff,
                1 => self.offered_features() >> 32,
                _ => 0,
            },
            (0x08, 4) => u64::from(self.driver_feature_select),
            (0x0c, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (0x10, 2) => u64::from(self.interrupt.config_vector()),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => u64::from(self.status),
            // config_generation: the device config never changes under the driver.
            (0x15, 1) => 0,
            (0x16, 2) => u64::from(self.queue_select),
            (0x18, 2) => q.map_or(0, |q| u64::from(q.size)),
            (0x1a, 2) => {
                if q.is_some() {
                    u64::from(self.interrupt.queue_vector(usize::from(self.queue_select)))
                } else {
                    0
                }
            }
            (0x1c, 2) => q.map_or(0, |q| u64::from(q.enabled)),
            (0x1e, 2) => q.map_or(0, |_| u64::from(self.queue_select)),
            (0x20, 4) => q.map_or(0, |q| q.desc & 0xffff_ffff),
            (0x24, 4) => q.map_or(0, |q| q.desc >> 32),
            (0x28, 4) => q.map_or(0, |q| q.driver & 0xffff_ffff),
            (0x2c, 4) => q.map_or(0, |q| q.driver >> 32),
            (0x30, 4) => q.map_or(0, |q| q.device & 0xffff_ffff),
            (0x34, 4) => q.map_or(0, |q| q.device >> 32),
            (0x20, 8) => q.map_or(0, |q| q.desc),
            (0x28, 8) => q.map_or(0, |q| q.driver),
            (0x30, 8) => q.map_or(0, |q| q.device),
            (off, len) => {
                debug!("virtio common config read at {off:#x}, {len} bytes ignored");
                0
            }
        };
        let bytes = value.to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        // Every arm matches the access width, so `value` fits the field.
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = value as u32,
            (0x08, 4) => self.driver_feature_select = value as u32,
            (0x0c, 4) => self.write_driver_features(value as u32),
            (0x10, 2) => self.interrupt.set_config_vector(value as u16),
            (0x14, 1) => self.write_status(value as u8),
            (0x16, 2) => self.queue_select = value as u16,
            (0x1a, 2) => {
                let q = usize::from(self.queue_select);
                if q < self.queues.len() {
                    self.interrupt.set_queue_vector(q, value as u16);
                } else {
                    debug!("virtio queue_msix_vector write for missing queue {q}");
                }
            }
            (0x18, 2) => {
                let size = value as u16;
                if let Some(q) = self.queue_config_mut() {
                    if size == 0 || !size.is_power_of_two() || size > q.max_size {
                        let max = q.max_size;
                        warn_once!(
                            self.warnings.queue_config,
                            "{}: queue size {size} refused (not a power of two from 1 to \
                             {max}); queue_size keeps its value",
                            self.name
                        );
                    } else {
                        q.size = size;
                    }
                }
            }
            (0x1c, 2) => {
                if value == 1 {
                    if let Some(q) = self.queue_config_mut() {
                        q.enabled = true;
                    }
                } else {
                    debug!("virtio queue_enable write of {value} ignored");
                }
            }
            (0x20..=0x34, 4) if offset % 4 == 0 => {
                let value = value as u32;
                if let Some(q) = self.queue_config_mut() {
                    let field = match offset {
                        0x20 | 0x24 => &mut q.desc,
                        0x28 | 0x2c => &mut q.driver,
                        _ => &mut q.device,
                    };
                    *field = if offset % 8 == 0 {
                        (*field & !0xffff_ffff) | u64::from(value)
                    } else {
                        (*field & 0xffff_ffff) | u64::from(value) << 32
                    };
                }
            }
            (0x20 | 0x28 | 0x30, 8) => {
                if let Some(q) = self.queue_config_mut() {
                    match offset {
                        0x20 => q.desc = value,
                        0x28 => q.driver = value,
                        _ => q.device = value,
                    }
                }
            }
            (off, len) => warn_once!(
                self.warnings.common_write,
                "{}: write of {len} bytes to read-only or unknown common config offset \
                 {off:#x} ignored",
                self.name
            ),
        }
    }

    /// The selected queue, if it exists and may still be configured (not enabled, device
    /// not live).
    fn queue_config_mut(&mut self) -> Option<&mut QueueConfig> {
        let live = self.status & status::DRIVER_OK != 0;
        let sel = self.queue_select;
        let Some(q) = self.queues.get(usize::from(sel)) else {
            debug!("{}: config write for missing queue {sel}", self.name);
            return None;
        };
        if q.enabled || live {
            warn_once!(
                self.warnings.queue_config,
                "{}: queue {sel} config write while the queue is enabled or the device live \
                 ignored",
                self.name
            );
            return None;
        }
        self.queues.get_mut(usize::from(sel))
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & status::FEATURES_OK != 0 {
            debug!("virtio driver_feature write after FEATURES_OK ignored");
            return;
        }
        let value = u64::from(value);
        match self.driver_feature_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | value << 32,
            sel => debug!("virtio driver_feature write to window {sel} ignored"),
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // DEVICE_NEEDS_RESET belongs to the device.
        let mut new = (value & !status::DEVICE_NEEDS_RESET) | (old & status::DEVICE_NEEDS_RESET);
        if new & old != old {
            debug!("virtio status write {value:#x} clears bits of {old:#x}: ignored");
            return;
        }
        let set = new & !old;
        if set & status::FEATURES_OK != 0 {
            let offered = self.offered_features();
            let unknown = self.driver_features & !offered;
            if self.driver_features & features::VERSION_1 == 0 || unknown != 0 {
                debug!(
                    "virtio FEATURES_OK refused: driver features {:#x}, offered {offered:#x}",
                    self.driver_features
                );
                new &= !status::FEATURES_OK;
            }
        }
        self.status = new;
        if set & status::DRIVER_OK != 0 && !self.active {
            if let Err(e) = self.activate() {
                warn_once!(
                    self.warnings.activation,
                    "{}: DRIVER_OK refused, the device needs a reset: {e}",
                    self.name
                );
                self.status |= status::DEVICE_NEEDS_RESET;
                if let Err(e) = self.interrupt.signal_config() {
                    warn!("failed to signal DEVICE_NEEDS_RESET: {e}");
                }
            }
        }
    }

    fn ring_in_memory(&self, addr: u64, len: u64, access: Permissions) -> bool {
        usize::try_from(len).is_ok_and(|len| self.mem.check_range(GuestAddress(addr), len, access))
    }

    fn build_queue(&self, index: usize, cfg: &QueueConfig, event_idx: bool) -> Result<Queue> {
        let err = || Error::InvalidRings {
            // Index < MAX_QUEUES, fits u16.
            index: index as u16,
            size: cfg.size,
            desc: cfg.desc,
            avail: cfg.driver,
            used: cfg.device,
        };
        let mut q = Queue::new(cfg.max_size).map_err(|_| err())?;
        if !cfg.enabled {
            return Ok(q);
        }
        let size = u64::from(cfg.size);
        // Split ring sizes, virtio 1.2 2.7: 16 bytes per descriptor; flags, idx, ring,
        // used_event/avail_event. virtio-queue takes an available ring at address 0 for
        // one never set and logs an error on every pop, so the driver may not put it there.
        if cfg.driver == 0
            || !self.ring_in_memory(cfg.desc, 16 * size, Permissions::Read)
            || !self.ring_in_memory(cfg.driver, 6 + 2 * size, Permissions::Read)
            || !self.ring_in_memory(cfg.device, 6 + 8 * size, Permissions::Write)
        {
            return Err(err());
        }
        q.try_set_size(cfg.size).map_err(|_| err())?;
        q.try_set_desc_table_address(GuestAddress(cfg.desc))
            .map_err(|_| err())?;
        q.try_set_avail_ring_address(GuestAddress(cfg.driver))
            .map_err(|_| err())?;
        q.try_set_used_ring_address(GuestAddress(cfg.device))
            .map_err(|_| err())?;
        q.set_ready(true);
        q.set_event_idx(event_idx);
        if !q.is_valid(&self.mem) {
            return Err(err());
        }
        Ok(q)
    }

    fn activate(&mut self) -> Result<()> {
        if self.status & status::FEATURES_OK == 0 {
            return Err(Error::FeaturesNotNegotiated);
        }
        let features = self.driver_features;
        let event_idx = features & features::RING_EVENT_IDX != 0;
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, cfg)| self.build_queue(i, cfg, event_idx))
            .collect::<Result<Vec<_>>>()?;
        let queue_evts = self
            .queue_evts
            .iter()
            .map(|e| e.try_clone().map_err(Error::CloneEventFd))
            .collect::<Result<Vec<_>>>()?;
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        self.device.activate(ActivateContext {
            mem: self.mem.clone(),
            features,
            queues,
            queue_evts,
            interrupt,
        })?;
        self.active = true;
        // debug!, not info!: a guest can reset and re-activate in a loop.
        debug!(
            "virtio device type {} activated, features {features:#x}",
            self.device.device_type()
        );
        Ok(())
    }

    /// Device reset (status 0): the device drops its queues, the transport returns to its
    /// initial state, vector mappings go back to NO_VECTOR.
    fn reset(&mut self) {
        debug!("virtio device type {} reset", self.device.device_type());
        self.device.reset();
        self.interrupt.reset();
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        // Drop kicks that arrived before the reset; EAGAIN just means there were none.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
        self.active = false;
    }

    fn sync_interrupt_control(&self) {
        let msg_ctrl = (self.config.read_reg(self.msix_cap_reg) >> 16) as u16;
        let command = self.config.command();
        self.interrupt.set_control(
            msg_ctrl & MSIX_CTRL_ENABLE != 0,
            msg_ctrl & MSIX_CTRL_FUNCTION_MASK != 0,
            command & PCI_COMMAND_INTX_DISABLE != 0,
        );
    }

    /// Handles a notification on queue `queue`: consumes its EventFd and, if the device is
    /// live, lets it process the queue. The event-manager subscriber calls this.
    ///
    /// A kick while the device is not live (before DRIVER_OK, or while it needs a reset) is
    /// dropped: the device must not consume buffers before DRIVER_OK (virtio 1.2, 3.1.2).
    pub fn process_notification(&mut self, queue: u16) {
        // Err (EAGAIN): a spurious wakeup or a kick already consumed by a reset.
        let kicked = self
            .queue_evts
            .get(usize::from(queue))
            .is_some_and(|evt| evt.read().is_ok());
        if self.active && self.status & status::DEVICE_NEEDS_RESET == 0 {
            self.device.process_queue(queue);
        } else if kicked {
            warn_once!(
                self.warnings.notify,
                "{}: queue {queue} notified while the device is not live (status {:#x}): \
                 ignored",
                self.name,
                self.status
            );
        }
    }
}

impl<D: VirtioDevice> PciDevice for VirtioPciDevice<D> {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }

    fn config_write(&mut self, reg: usize, offset: u8, data: &[u8]) {
        self.config.write_reg(reg, offset, data);
        if reg == self.msix_cap_reg || reg == COMMAND_REG {
            self.sync_interrupt_control();
        }
    }
}

/// The transport watches its queue notification EventFds (event data = queue index) and
/// hands notifications to [`VirtioPciDevice::process_notification`].
impl<D: VirtioDevice> MutEventSubscriber for VirtioPciDevice<D> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let data = events.data();
        if data >= EXTRA_EVENT_BASE {
            let index = (data - EXTRA_EVENT_BASE) as usize;
            self.device.process_extra_event(index, events.event_set());
            return;
        }
        let Ok(queue) = u16::try_from(data) else {
            warn!("virtio: event for unknown data {data}");
            return;
        };
        if events
            .event_set()
            .intersects(EventSet::ERROR | EventSet::HANG_UP)
        {
            warn!("virtio: error on the notification eventfd of queue {queue}; unwatching it");
            if let Some(evt) = self.queue_evts.get(usize::from(queue)) {
                let _ = ops.remove(Events::empty(evt));
            }
            return;
        }
        self.process_notification(queue);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            // i < MAX_QUEUES.
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                warn!("virtio: failed to watch the notification eventfd of queue {i}: {e}");
            }
        }
        for (i, (fd, set)) in self.device.extra_event_sources().into_iter().enumerate() {
            // A device has a handful of extra sources; `i` stays far below u32::MAX - BASE.
            let data = EXTRA_EVENT_BASE + i as u32;
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, set)) {
                warn!("virtio: failed to watch extra event source {i} (fd {fd}): {e}");
            }
        }
    }
}

mod debug;
#[cfg(test)]
mod tests;
