// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The virtio 1.x PCI transport (modern only) and the [`VirtioDevice`] trait that device
//! crates (block, net) implement.
//!
//! What it does:
//! - [`VirtioPciDevice`] wraps a [`VirtioDevice`] into a PCI function
//!   ([`tvm_bus::PciDevice`]): vendor 0x1AF4, device 0x1040 + type, one 64-bit memory BAR
//!   holding the common config, ISR, device config, notify area, MSI-X table and PBA (the
//!   layout is in [`VirtioPciDevice`]'s docs), and the matching capability list.
//! - Feature negotiation (VIRTIO_F_VERSION_1 required, EVENT_IDX and INDIRECT_DESC offered by
//!   the transport), the device-status state machine including reset, per-queue
//!   configuration, and activation with [`virtio_queue::Queue`]s checked against guest
//!   memory.
//! - Interrupts through MSI-X (masking and the pending-bit array included) or INTx, both
//!   delivered through an [`InterruptSink`] that the VMM implements with KVM irqfds.
//! - BAR 0 that follows the guest: [`RelocatableBar`] is what the PCI slot holds; it maps
//!   the BAR on a [`tvm_bus::PciMmioWindow`] (through [`BarMmio`]) where it decodes, with
//!   the queue-notify ioeventfds, and moves both when the guest reprograms the BAR.
//!
//! What it does not do: touch KVM. Queue notifications arrive on one [`EventFd`] per queue
//! ([`VirtioPciDevice::notify_eventfd`]) that [`RelocatableBar`] registers as an ioeventfd
//! through an [`IoeventRegistrar`] the VMM implements with KVM_IOEVENTFD; interrupts leave
//! through the [`InterruptSink`]. Everything is therefore unit-testable without
//! /dev/kvm. Legacy (0.9.5) virtio and the `VIRTIO_PCI_CAP_PCI_CFG` window are not
//! implemented.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use tvm_virtio::{
//!     ActivateContext, InterruptSink, MsixEntry, VirtioDevice, VirtioPciDevice, Result,
//! };
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! struct Dummy;
//! impl VirtioDevice for Dummy {
//!     fn device_type(&self) -> u32 { virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK }
//!     fn queue_max_sizes(&self) -> &[u16] { &[256] }
//!     fn device_features(&self) -> u64 { 0 }
//!     fn read_config(&self, _offset: u64, data: &mut [u8]) { data.fill(0) }
//!     fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
//!     fn activate(&mut self, _ctx: ActivateContext) -> Result<()> { Ok(()) }
//!     fn reset(&mut self) {}
//!     fn process_queue(&mut self, _queue: u16) {}
//! }
//!
//! struct NoIrq;
//! impl InterruptSink for NoIrq {
//!     fn msix(&self, _vector: u16) -> std::io::Result<()> { Ok(()) }
//!     fn intx(&self, _level: bool) -> std::io::Result<()> { Ok(()) }
//! }
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
//! let mut dev = VirtioPciDevice::new(Dummy, mem, Arc::new(NoIrq)).unwrap();
//! let mut id = [0u8; 4];
//! dev.bar_read(0x12, &mut id[..2]); // num_queues
//! assert_eq!(u16::from_le_bytes([id[0], id[1]]), 1);
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

pub use event_manager::EventSet;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

mod coalesce;
mod interrupt;
mod pci;
mod ring;
mod threaded;

// Documented by its inner (`//!`) docs, whose links resolve in the module.
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

/// The per-thread log capture for tests, [`tvm_util::test_log`], re-exported for the
/// transport's own tests and for callers that already depend on this crate.
#[cfg(any(test, feature = "test-utils"))]
pub use tvm_util::test_log;

pub use coalesce::{
    Coalescer, Poll, GAP_FACTOR, MAX_BATCH, MAX_GAP, MAX_GAPS, MIN_GAP, MISS_LIMIT, PROBE_EVERY,
};
pub use ring::{add_used, chains_pending, QueueDrain};
pub use threaded::Threaded;
/// Warn-once logging for guest-triggerable paths, re-exported from [`tvm_util`].
pub use tvm_util::{warn_once, WarnOnce};

pub use interrupt::{InterruptSink, MsixEntry, VirtioInterrupt, VIRTIO_MSI_NO_VECTOR};
pub use pci::{
    BarMmio, IoeventRegistrar, RelocatableBar, VirtioPciDevice, BAR_SIZE, COMMON_CFG_OFFSET,
    DEVICE_CFG_OFFSET, ISR_OFFSET, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, NOTIFY_OFFSET,
    NOTIFY_OFF_MULTIPLIER,
};

/// The device status bits (virtio 1.2, 2.1), as the one-byte `device_status` field holds
/// them; the values are virtio-bindings' `VIRTIO_CONFIG_S_*`.
pub mod status {
    use virtio_bindings::virtio_config as cfg;

    /// The guest found the device.
    pub const ACKNOWLEDGE: u8 = cfg::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
    /// The guest knows how to drive the device.
    pub const DRIVER: u8 = cfg::VIRTIO_CONFIG_S_DRIVER as u8;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u8 = cfg::VIRTIO_CONFIG_S_DRIVER_OK as u8;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = cfg::VIRTIO_CONFIG_S_FEATURES_OK as u8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u8 = cfg::VIRTIO_CONFIG_S_NEEDS_RESET as u8;
    /// The guest gave up on the device.
    pub const FAILED: u8 = cfg::VIRTIO_CONFIG_S_FAILED as u8;

    // Every bit fits the byte, so the conversions above keep them.
    const _: () = assert!(cfg::VIRTIO_CONFIG_S_FAILED <= 0x80);
}

/// Feature bits the transport itself offers (virtio 1.2, 6), as masks of virtio-bindings'
/// bit numbers.
pub mod features {
    use virtio_bindings::{virtio_config, virtio_ring};

    /// VIRTIO_F_VERSION_1: the modern interface; required.
    pub const VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;
    /// VIRTIO_RING_F_INDIRECT_DESC: indirect descriptor tables.
    pub const RING_INDIRECT_DESC: u64 = 1 << virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
    /// VIRTIO_RING_F_EVENT_IDX: used_event/avail_event notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << virtio_ring::VIRTIO_RING_F_EVENT_IDX;
    /// Everything the transport adds to a device's own bits.
    pub const TRANSPORT: u64 = VERSION_1 | RING_INDIRECT_DESC | RING_EVENT_IDX;
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory, for the rings and the buffers.
    pub mem: GuestMemoryMmap<()>,
    /// The features both sides agreed on (transport bits included).
    pub features: u64,
    /// One queue per entry of [`VirtioDevice::queue_max_sizes`], in order. A queue the
    /// driver did not enable has `ready() == false`; an enabled one has been checked with
    /// `is_valid` against `mem` and has EVENT_IDX set as negotiated.
    pub queues: Vec<Queue>,
    /// One notification [`EventFd`] per queue, clones of the transport's (the same ones
    /// [`RelocatableBar`] registers as ioeventfds).
    pub queue_evts: Vec<EventFd>,
    /// Raises queue and config interrupts.
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

impl std::fmt::Debug for ActivateContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivateContext")
            .field("features", &format_args!("{:#x}", self.features))
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

/// A virtio device model, independent of the transport.
///
/// Every method is called with the transport's lock held, from a vCPU thread (config
/// accesses, activation, reset) or the event loop ([`process_queue`](Self::process_queue)).
pub trait VirtioDevice: Send {
    /// The virtio device ID (`virtio_bindings::virtio_ids`: 1 net, 2 block, ...).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; the length is the number of queues. Each size must
    /// be a power of two, at most 32768.
    fn queue_max_sizes(&self) -> &[u16];
    /// The device-specific feature bits; the transport adds [`features::TRANSPORT`].
    fn device_features(&self) -> u64;
    /// Reads device-specific config at `offset`; bytes past the end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device-specific config at `offset`; read-only or unknown fields are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues.
    ///
    /// # Errors
    ///
    /// Any error makes the transport set DEVICE_NEEDS_RESET.
    fn activate(&mut self, ctx: ActivateContext) -> Result<()>;
    /// Drops the queues and everything taken in [`activate`](Self::activate) and returns
    /// to the state right after construction.
    fn reset(&mut self);
    /// Handles a notification on queue `queue`. Only called while the device is active;
    /// the transport has already consumed the notification [`EventFd`].
    fn process_queue(&mut self, queue: u16);
    /// Host file descriptors the device wants watched by the event loop besides the queue
    /// notifications (a TAP, for instance), with the events to watch. They are registered
    /// once, when the transport joins the event loop, and stay registered across resets;
    /// use [`EventSet::EDGE_TRIGGERED`] for anything that can stay readable while the device
    /// is not active, or the loop spins. Default: none.
    fn extra_event_sources(&self) -> Vec<(RawFd, EventSet)> {
        Vec::new()
    }
    /// Handles readiness of the `index`-th entry of
    /// [`extra_event_sources`](Self::extra_event_sources). Called whether or not the device
    /// is active; an inactive device must not touch the queues. Default: ignored.
    fn process_extra_event(&mut self, index: usize, events: EventSet) {
        let _ = (index, events);
    }
    /// Whether the device serves its queue notifications itself, on a thread of its own
    /// ([`Threaded`]); the transport then leaves the queue EventFds out of the event loop.
    /// Default: no.
    fn serves_own_queues(&self) -> bool {
        false
    }
}

/// Copies the bytes of a device's config space `config` at `offset` into `data`; bytes
/// past the end read as 0 (the usual [`VirtioDevice::read_config`] for a device whose
/// config is a byte array).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// Errors of the virtio transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A saved transport state that does not fit this device.
    #[error("the saved virtio transport does not fit this device: {0}")]
    StateMismatch(String),
    /// Creating a queue notification EventFd failed.
    #[error("failed to create a queue notification eventfd")]
    CreateEventFd(#[source] io::Error),
    /// Cloning a queue notification EventFd for the device failed.
    #[error("failed to clone a queue notification eventfd")]
    CloneEventFd(#[source] io::Error),
    /// Building the PCI config space (BAR, capabilities) failed.
    #[error("failed to set up the pci config space")]
    SetupConfigSpace(#[source] tvm_bus::Error),
    /// The device has no queues or more than the transport supports.
    #[error("invalid number of queues {0}")]
    InvalidQueueCount(usize),
    /// A queue's maximum size is 0, not a power of two or above 32768.
    #[error("invalid maximum size {size} for queue {index}")]
    InvalidQueueMaxSize {
        /// Queue index.
        index: usize,
        /// Refused size.
        size: u16,
    },
    /// Delivering an interrupt failed.
    #[error("failed to deliver an interrupt")]
    TriggerInterrupt(#[source] io::Error),
    /// An enabled queue has a ring outside guest memory or misaligned, or its available
    /// ring at address 0 (which virtio-queue cannot use).
    #[error(
        "queue {index} (size {size}) has rings outside guest memory or misaligned: \
         desc {desc:#x}, avail {avail:#x}, used {used:#x}"
    )]
    InvalidRings {
        /// Queue index.
        index: u16,
        /// Queue size the driver chose.
        size: u16,
        /// Descriptor table address.
        desc: u64,
        /// Available (driver) ring address.
        avail: u64,
        /// Used (device) ring address.
        used: u64,
    },
    /// The driver set DRIVER_OK without FEATURES_OK.
    #[error("driver_ok set before features were negotiated")]
    FeaturesNotNegotiated,
    /// A queue the device needs was not enabled by the driver.
    #[error("queue {0} was not enabled by the driver")]
    QueueNotReady(u16),
    /// The driver's available index is more than a queue size ahead of the device's.
    #[error("the available index {avail} is more than the queue size {size} ahead of {next}")]
    AvailIndexTooFar {
        /// The driver's available index.
        avail: u16,
        /// The device's next available index.
        next: u16,
        /// The queue size.
        size: u16,
    },
    /// The driver put a head index beyond the queue size in the available ring.
    #[error("head index {head} is beyond the queue size {size}")]
    HeadOutOfRange {
        /// The head index.
        head: u16,
        /// The queue size.
        size: u16,
    },
    /// A ring could not be read or written.
    #[error("failed to access a ring")]
    Ring(#[source] virtio_queue::Error),
    /// The device refused to activate.
    #[error("failed to activate the device")]
    Activate(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A BAR could not be mapped where it decodes: named by the device, with the reason.
    #[error("cannot map the bar of {0}: {1}")]
    MapBar(String, String),
    /// A device worker's epoll could not be set up.
    #[error("failed to set up a device worker's epoll")]
    CreateEpoll(#[source] io::Error),
    /// A device's worker thread could not be started.
    #[error("failed to start a device worker thread")]
    SpawnWorker(#[source] io::Error),
    /// A device's worker thread failed to set itself up (named, with the reason).
    #[error("device worker {0} failed to start: {1}")]
    WorkerInit(String, String),
}

/// Result of the virtio transport's fallible operations.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::{features, status};

    #[test]
    fn constants_from_virtio_bindings_keep_the_spec_values() {
        // virtio 1.2, 2.1 and 6.
        assert_eq!(
            [
                status::ACKNOWLEDGE,
                status::DRIVER,
                status::DRIVER_OK,
                status::FEATURES_OK,
                status::DEVICE_NEEDS_RESET,
                status::FAILED
            ],
            [1, 2, 4, 8, 0x40, 0x80]
        );
        assert_eq!(features::TRANSPORT, 1 << 32 | 1 << 28 | 1 << 29);
    }
}
