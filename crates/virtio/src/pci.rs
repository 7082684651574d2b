// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The virtio-pci transport (virtio 1.2, 4.1): config space, capability list and BAR 0.
//!
//! The transport's state is [`VirtioPciDevice`], here; what it does with it is split by
//! concern: `layout` (BAR 0 regions, PCI identity, capability list), `common` (the common
//! configuration structure), `activation` (the device status state machine: feature
//! negotiation, activation, reset) and `dispatch` (BAR accesses and queue notifications,
//! the event-manager subscriber).

use std::sync::Arc;

use tvm_bus::{PciConfigSpace, PciDevice};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::interrupt::TransportInterrupt;
use crate::{Error, InterruptSink, Result, VirtioDevice, VirtioInterrupt, WarnOnce};

mod activation;
mod common;
mod debug;
mod dispatch;
mod layout;
mod relocation;
mod state;

pub use layout::{
    BAR_SIZE, COMMON_CFG_OFFSET, DEVICE_CFG_OFFSET, ISR_OFFSET, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET,
    NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER,
};
use layout::{
    COMMAND_REG, MAX_QUEUES, MSIX_CTRL_ENABLE, MSIX_CTRL_FUNCTION_MASK, PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_MEMORY,
};
pub use relocation::{BarMmio, IoeventRegistrar, RelocatableBar};

/// Largest queue size of the split ring (virtio 1.2, 2.7).
const MAX_QUEUE_SIZE: u16 = 32768;

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
/// The VMM places the BAR with [`set_bar_addr`](Self::set_bar_addr), as firmware would,
/// and puts the device in a PCI slot behind a [`RelocatableBar`]. That maps BAR 0 on a
/// [`tvm_bus::PciMmioWindow`] where it decodes ([`bar_decode_addr`](Self::bar_decode_addr)),
/// so that guest accesses reach [`bar_read`](Self::bar_read) /
/// [`bar_write`](Self::bar_write) through a [`BarMmio`], and registers each queue's
/// [`notify_eventfd`](Self::notify_eventfd) as an ioeventfd at the BAR's address plus
/// [`notify_offset`](Self::notify_offset) through an [`IoeventRegistrar`]. After every
/// config-space write it compares the decode address with where the BAR is mapped, and
/// moves the mapping and the ioeventfds when the guest reprogrammed the BAR or turned memory
/// decoding off or on. Interrupts leave through the [`InterruptSink`] given to
/// [`new`](Self::new). The transport is its own event-manager subscriber: it watches the
/// notification EventFds and calls [`VirtioDevice::process_queue`] on the active device.
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
    /// `config_generation`: moves on each time the device config changes under the driver
    /// ([`config_changed`](Self::config_changed)).
    config_generation: u8,
    /// Set while a restore activates the device: queues start at their used ring's index.
    resume_positions: bool,
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
        let (config, msix_cap_reg) = layout::config_space(device_type, num_vectors)?;

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
            config_generation: 0,
            resume_positions: false,
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

    /// Tells the driver that the device config changed (a block device's new medium, for
    /// instance): `config_generation` moves on, so that a driver reading the config across
    /// the change reads it again, and a configuration-change interrupt is raised when the
    /// device is live (a driver that is not live reads the config when it starts).
    ///
    /// # Errors
    ///
    /// [`Error::TriggerInterrupt`] when the interrupt could not be delivered.
    pub fn config_changed(&mut self) -> Result<()> {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.active {
            self.interrupt.signal_config()?;
        }
        Ok(())
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

    fn sync_interrupt_control(&self) {
        let msg_ctrl = (self.config.read_reg(self.msix_cap_reg) >> 16) as u16;
        let command = self.config.command();
        self.interrupt.set_control(
            msg_ctrl & MSIX_CTRL_ENABLE != 0,
            msg_ctrl & MSIX_CTRL_FUNCTION_MASK != 0,
            command & PCI_COMMAND_INTX_DISABLE != 0,
        );
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

#[cfg(test)]
mod tests;
