// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guest accesses to BAR 0, routed to the region they hit, and queue notifications, from
//! the notify area or the event loop, routed to the device.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, warn};

use super::layout::{
    COMMON_CFG_LEN, COMMON_CFG_OFFSET, DEVICE_CFG_LEN, DEVICE_CFG_OFFSET, ISR_LEN, ISR_OFFSET,
    MSIX_PBA_LEN, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, NOTIFY_LEN, NOTIFY_OFFSET,
    NOTIFY_OFF_MULTIPLIER,
};
use super::VirtioPciDevice;
use crate::interrupt::MSIX_ENTRY_SIZE;
use crate::{status, warn_once, VirtioDevice};

/// Event data of the device's first extra event source; queue notifications use the queue
/// index (below [`MAX_QUEUES`](super::layout::MAX_QUEUES)).
const EXTRA_EVENT_BASE: u32 = 0x1_0000;

/// The end of a guest `kind` ("read" or "write") of `len` bytes at `offset` in BAR 0, or
/// `None` for one the transport ignores: another length than 1, 2, 4 or 8 bytes (logged
/// at debug level), or one that wraps around.
fn access_end(kind: &str, offset: u64, len: u64) -> Option<u64> {
    if !matches!(len, 1 | 2 | 4 | 8) {
        debug!("virtio bar {kind} at {offset:#x} with bad length {len}");
        return None;
    }
    offset.checked_add(len)
}

impl<D: VirtioDevice> VirtioPciDevice<D> {
    /// Handles a guest read of `data.len()` bytes at `offset` in BAR 0.
    pub fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let len = data.len() as u64;
        let Some(end) = access_end("read", offset, len) else {
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
        let Some(end) = access_end("write", offset, len) else {
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
        // A device with its own worker polls its queue EventFds there.
        let queue_evts = if self.device.serves_own_queues() {
            &[][..]
        } else {
            &self.queue_evts[..]
        };
        for (i, evt) in queue_evts.iter().enumerate() {
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
