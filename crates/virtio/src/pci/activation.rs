// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The device status state machine (virtio 1.2, 2.1 and 3.1): feature negotiation,
//! activation with queues checked against guest memory, and reset.

use std::sync::Arc;

use log::{debug, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, Permissions};

use super::{QueueConfig, VirtioPciDevice};
use crate::{
    features, status, warn_once, ActivateContext, Error, Result, VirtioDevice, VirtioInterrupt,
};

impl<D: VirtioDevice> VirtioPciDevice<D> {
    pub(super) fn write_status(&mut self, value: u8) {
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
        if let Some(idx) = self.resumed_position(cfg.device) {
            q.set_next_avail(idx);
            q.set_next_used(idx);
        }
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
}
