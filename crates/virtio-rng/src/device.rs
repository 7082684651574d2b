// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The entropy device: one request queue, nothing to configure.

use std::sync::Arc;

use log::debug;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use tvm_util::{warn_once, WarnOnce};
use tvm_virtio::{ActivateContext, QueueDrain, VirtioDevice, VirtioInterrupt};

use crate::fill::{fill_chain, EntropySource, HostRandom};

/// Virtio device ID of an entropy source (virtio 1.2, 5), from virtio-bindings.
pub const VIRTIO_ID_RNG: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most requests served per notification before yielding to the event loop (the rest is
/// picked up by re-signalling the queue's EventFd).
const MAX_REQUESTS_PER_RUN: usize = 256;
/// The name in log lines.
const NAME: &str = "virtio-rng";

struct Active {
    mem: GuestMemoryMmap<()>,
    queue: Queue,
    queue_evt: EventFd,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// Driver errors (and host failures) the device reports once at `warn!`, then at `debug!`.
#[derive(Debug, Default)]
struct Warnings {
    /// A request that broke the rules.
    request: WarnOnce,
    /// An available index too far ahead, or a head index beyond the queue.
    ring: WarnOnce,
    /// A write to the (empty) config space.
    config: WarnOnce,
    /// The host's source failed.
    source: WarnOnce,
}

/// A virtio entropy device.
///
/// Implements [`VirtioDevice`]; put it in a [`tvm_virtio::VirtioPciDevice`], whose
/// event-manager subscriber calls [`VirtioDevice::process_queue`] when the guest kicks.
pub struct Rng {
    source: Box<dyn EntropySource + Send>,
    active: Option<Active>,
    warnings: Warnings,
    /// Bytes handed to the guest since the device was created.
    bytes: u64,
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng")
            .field("active", &self.active.is_some())
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    /// A device that reads the host's `getrandom(2)`.
    pub fn new() -> Rng {
        Rng::with_source(Box::new(HostRandom))
    }

    /// A device that reads `source` (tests, or another source).
    pub fn with_source(source: Box<dyn EntropySource + Send>) -> Rng {
        Rng {
            source,
            active: None,
            warnings: Warnings::default(),
            bytes: 0,
        }
    }

    /// Bytes handed to the guest so far.
    pub fn bytes_served(&self) -> u64 {
        self.bytes
    }

    fn run_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            debug!("{NAME}: queue notification while inactive");
            return;
        };
        let source = self.source.as_mut();
        let (request_warn, source_warn) = (&mut self.warnings.request, &mut self.warnings.source);
        let bytes = &mut self.bytes;
        let mem = &active.mem;
        QueueDrain {
            name: NAME,
            index: 0,
            queue: &mut active.queue,
            mem,
            queue_evt: &active.queue_evt,
            interrupt: active.interrupt.as_ref(),
            budget: MAX_REQUESTS_PER_RUN,
            ring_warn: &mut self.warnings.ring,
        }
        .run(|chain| {
            let head = chain.head_index();
            let filled = fill_chain(mem, chain, source);
            if let Some(why) = &filled.driver_error {
                warn_once!(
                    request_warn,
                    "{NAME}: request {head} refused after {} bytes: {why}",
                    filled.len
                );
            }
            if let Some(e) = &filled.source_error {
                warn_once!(
                    source_warn,
                    "{NAME}: the host's random source failed after {} bytes: {e}",
                    filled.len
                );
            }
            *bytes += u64::from(filled.len);
            filled.len
        });
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        // virtio-rng has no feature bits of its own; the transport adds VERSION_1,
        // EVENT_IDX and INDIRECT_DESC.
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // No config space: reads are zeros.
        tvm_virtio::read_config_bytes(&[], offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        warn_once!(
            self.warnings.config,
            "{NAME}: write of {} bytes to the config space at {offset:#x} ignored (it has none)",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> tvm_virtio::Result<()> {
        let ActivateContext {
            mem,
            queues,
            queue_evts,
            interrupt,
            ..
        } = ctx;
        let queue = queues
            .into_iter()
            .next()
            .filter(|q| q.ready())
            .ok_or(tvm_virtio::Error::QueueNotReady(0))?;
        let queue_evt = queue_evts
            .into_iter()
            .next()
            .ok_or(tvm_virtio::Error::QueueNotReady(0))?;
        self.active = Some(Active {
            mem,
            queue,
            queue_evt,
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn process_queue(&mut self, queue: u16) {
        if queue != 0 {
            debug!("{NAME}: notification for missing queue {queue}");
            return;
        }
        self.run_queue();
    }
}
