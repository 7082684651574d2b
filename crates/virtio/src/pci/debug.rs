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
