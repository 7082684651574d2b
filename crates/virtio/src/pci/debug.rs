// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A read-only view of the transport for diagnostics: what the VMM logs when asked to
//! explain a guest that seems stuck (a lost interrupt, a queue the device stopped
//! serving). Nothing here changes the device or the rings.

use vm_memory::{Bytes, GuestAddress};

use super::VirtioPciDevice;
use crate::features::RING_EVENT_IDX;
use crate::VirtioDevice;

/// Reads the little-endian u16 at `base + offset` in guest memory.
fn read_u16(mem: &vm_memory::GuestMemoryMmap<()>, base: u64, offset: u64) -> Option<u16> {
    let addr = base.checked_add(offset)?;
    mem.read_obj::<u16>(GuestAddress(addr))
        .ok()
        .map(u16::from_le)
}

fn or_unreadable(v: Option<u16>) -> String {
    v.map_or_else(|| "unreadable".to_string(), |v| v.to_string())
}

impl<D: VirtioDevice> VirtioPciDevice<D> {
    /// The transport's state in words, for a diagnostic dump: one line for the device
    /// (status, interrupt mode, ISR) and one per queue (size, the driver's available index
    /// and the device's used index as they are in guest memory, the notification
    /// suppression fields, the queue's MSI-X vector with its mask and pending bits).
    ///
    /// `avail - used` is the number of chains the driver handed over that the device has
    /// not returned yet; with EVENT_IDX, `avail_event` is where the device last asked to
    /// be notified (its position in the available ring then) and `used_event` is where the
    /// driver asked for its next interrupt.
    pub fn debug_state(&self) -> Vec<String> {
        let event_idx = self.driver_features & RING_EVENT_IDX != 0;
        let mut lines = vec![format!(
            "{}: status {:#04x} ({}), event_idx {}, {}",
            self.name,
            self.status,
            if self.active { "active" } else { "not active" },
            if event_idx { "on" } else { "off" },
            self.interrupt.debug_summary()
        )];
        for (i, q) in self.queues.iter().enumerate() {
            if !q.enabled {
                lines.push(format!("{}: queue {i}: not enabled", self.name));
                continue;
            }
            let size = u64::from(q.size);
            // virtio 1.2, 2.7.6 and 2.7.8: flags, idx, ring[size], then used_event /
            // avail_event.
            let avail_flags = read_u16(&self.mem, q.driver, 0);
            let avail_idx = read_u16(&self.mem, q.driver, 2);
            let used_event = read_u16(&self.mem, q.driver, 4 + 2 * size);
            let used_flags = read_u16(&self.mem, q.device, 0);
            let used_idx = read_u16(&self.mem, q.device, 2);
            let avail_event = read_u16(&self.mem, q.device, 4 + 8 * size);
            let outstanding = match (avail_idx, used_idx) {
                (Some(a), Some(u)) => a.wrapping_sub(u).to_string(),
                _ => "?".to_string(),
            };
            lines.push(format!(
                "{}: queue {i}: size {}, avail idx {} (flags {}, used_event {}), used idx {} \
                 (flags {}, avail_event {}), {outstanding} outstanding, {}",
                self.name,
                q.size,
                or_unreadable(avail_idx),
                or_unreadable(avail_flags),
                or_unreadable(used_event),
                or_unreadable(used_idx),
                or_unreadable(used_flags),
                or_unreadable(avail_event),
                self.interrupt.debug_queue_vector(i)
            ));
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::{Arc, Mutex};

    use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use crate::test_utils::common_cfg::*;
    use crate::test_utils::{bar_write, set_status, NullDevice, NullSink};
    use crate::{features, status};

    use super::VirtioPciDevice;

    #[test]
    fn debug_state_shows_ring_indices_events_and_vectors_without_touching_them() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let device = NullDevice::new(VIRTIO_ID_BLOCK, &[16, 16]);
        let dev =
            Mutex::new(VirtioPciDevice::new(device, mem.clone(), Arc::new(NullSink)).unwrap());
        dev.lock().unwrap().set_name("virtio-blk test");
        let debug_state = || dev.lock().unwrap().debug_state();
        assert_eq!(
            debug_state(),
            [
                "virtio-blk test: status 0x00 (not active), event_idx off, msi-x off, intx low, \
                 isr 0x00, config vector none",
                "virtio-blk test: queue 0: not enabled",
                "virtio-blk test: queue 1: not enabled",
            ]
        );

        // A driver: features with EVENT_IDX, queue 0 of 16 at 0x1000/0x2000/0x3000 on
        // MSI-X vector 1, DRIVER_OK.
        let f = features::VERSION_1 | features::RING_EVENT_IDX;
        set_status(&dev, status::ACKNOWLEDGE | status::DRIVER);
        for (sel, bits) in [(0, f & 0xffff_ffff), (1, f >> 32)] {
            bar_write(&dev, DRIVER_FEATURE_SELECT, 4, sel);
            bar_write(&dev, DRIVER_FEATURE, 4, bits);
        }
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        set_status(&dev, s);
        bar_write(&dev, QUEUE_SELECT, 2, 0);
        bar_write(&dev, QUEUE_SIZE, 2, 16);
        bar_write(&dev, QUEUE_MSIX_VECTOR, 2, 1);
        for (off, addr) in [
            (QUEUE_DESC, 0x1000u64),
            (QUEUE_DRIVER, 0x2000),
            (QUEUE_DEVICE, 0x3000),
        ] {
            bar_write(&dev, off, 4, addr);
            bar_write(&dev, off + 4, 4, 0);
        }
        bar_write(&dev, QUEUE_ENABLE, 2, 1);
        set_status(&dev, s | status::DRIVER_OK);
        assert!(dev.lock().unwrap().is_active());

        // The rings: avail idx 7 with used_event 4; used idx 5 with NO_NOTIFY and
        // avail_event 6.
        let u16_at = |addr: u64, v: u16| mem.write_obj(v.to_le(), GuestAddress(addr)).unwrap();
        u16_at(0x2002, 7);
        u16_at(0x2000 + 4 + 2 * 16, 4);
        u16_at(0x3000, 1);
        u16_at(0x3002, 5);
        u16_at(0x3000 + 4 + 8 * 16, 6);
        let lines = debug_state();
        assert_eq!(
            lines,
            [
                "virtio-blk test: status 0x0f (active), event_idx on, msi-x off, intx low, \
                 isr 0x00, config vector none",
                "virtio-blk test: queue 0: size 16, avail idx 7 (flags 0, used_event 4), used \
                 idx 5 (flags 1, avail_event 6), 2 outstanding, vector 1 (masked, not pending)",
                "virtio-blk test: queue 1: not enabled",
            ]
        );
        // Looking changed nothing.
        assert_eq!(debug_state(), lines);
        let mut v = [0u8; 2];
        mem.read_slice(&mut v, GuestAddress(0x3002)).unwrap();
        assert_eq!(u16::from_le_bytes(v), 5);
    }
}
