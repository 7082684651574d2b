// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The common configuration structure (virtio 1.2, 4.1.4.3): feature windows, queue
//! selection and per-queue configuration, MSI-X vector mapping. Status writes go to
//! [`write_status`](VirtioPciDevice::write_status), in the activation module.

use log::debug;

use super::{QueueConfig, VirtioPciDevice};
use crate::{features, status, warn_once, VirtioDevice};

impl<D: VirtioDevice> VirtioPciDevice<D> {
    pub(super) fn offered_features(&self) -> u64 {
        self.device.device_features() | features::TRANSPORT
    }

    fn selected_queue(&self) -> Option<&QueueConfig> {
        self.queues.get(usize::from(self.queue_select))
    }

    pub(super) fn common_read(&mut self, offset: u64, data: &mut [u8]) {
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
            (0x15, 1) => u64::from(self.config_generation),
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

    pub(super) fn common_write(&mut self, offset: u64, data: &[u8]) {
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
}
