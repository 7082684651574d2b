// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guards around virtio-queue calls that log at `error!` on guest-controlled input: a guest
//! must not be able to flood the host log, so devices check first and stay at `debug!`.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use log::debug;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

/// Whether the driver's available index is plausible: at most queue-size entries ahead of
/// the device. virtio-queue refuses to pop otherwise and logs an `error!` on every attempt
/// (`pop_descriptor_chain`, "Iterator error"); check this first and pop only when it holds.
/// A queue in that state is left alone until the driver fixes the index or resets the
/// device. `who` names the queue in the `debug!` line ("virtio-blk", "virtio-net rx").
pub fn avail_idx_sane<M: GuestMemory>(queue: &Queue, mem: &M, who: &str) -> bool {
    match queue.avail_idx(mem, Ordering::Acquire) {
        Ok(idx) => {
            let pending = (idx - Wrapping(queue.next_avail())).0;
            if pending > queue.size() {
                debug!(
                    "{who}: avail index {} is {pending} entries ahead of {} (queue size {}): \
                     ignored",
                    idx.0,
                    queue.next_avail(),
                    queue.size()
                );
                false
            } else {
                true
            }
        }
        Err(e) => {
            debug!("{who}: avail index unreadable: {e}");
            false
        }
    }
}

/// Adds `head` to the used ring with `len` bytes written. A head index the driver put in
/// the available ring beyond the queue size cannot be returned (virtio-queue would log an
/// `error!`); it is dropped with a `debug!`.
pub fn add_used<M: GuestMemory>(queue: &mut Queue, mem: &M, head: u16, len: u32, who: &str) {
    if head >= queue.size() {
        debug!(
            "{who}: head index {head} beyond queue size {}: not returned",
            queue.size()
        );
        return;
    }
    if let Err(e) = queue.add_used(mem, head, len) {
        debug!("{who}: add_used for head {head} failed: {e}");
    }
}
