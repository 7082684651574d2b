// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Receive: placing one frame (vnet header + Ethernet frame) into the guest's receive
//! buffers, over guest memory and the receive [`Queue`].

use std::ops::Range;

use log::debug;
use tvm_util::warn_once;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::consts::{NUM_BUFFERS_OFFSET, UNTERMINATED, VNET_HDR_LEN};
use crate::warnings::DriverWarnings;

/// One receive chain taken for the frame being placed.
#[derive(Debug)]
struct RxChain {
    head: u16,
    /// Its descriptors in [`RxScratch::descs`].
    descs: Range<usize>,
    /// Bytes of the frame written into it.
    written: usize,
}

/// Buffers reused from frame to frame, so that receiving allocates nothing.
#[derive(Debug, Default)]
pub(crate) struct RxScratch {
    chains: Vec<RxChain>,
    descs: Vec<(GuestAddress, usize)>,
}

impl RxScratch {
    /// Bytes the two vectors hold.
    #[cfg(test)]
    pub(crate) fn capacity_bytes(&self) -> usize {
        self.chains.capacity() * std::mem::size_of::<RxChain>()
            + self.descs.capacity() * std::mem::size_of::<(GuestAddress, usize)>()
    }
}

/// What became of the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RxStatus {
    /// Written and added to the used ring.
    Delivered,
    /// The available buffers cannot hold it: nothing was written or added to the used
    /// ring, the chains taken were put back, and notifications are enabled so that the
    /// driver kicks the queue when it adds buffers. The frame should wait.
    NoBuffers,
    /// Without mergeable buffers, the next chain is too small for it: the frame should be
    /// dropped; the chain was put back for the next frame.
    TooLarge,
    /// The driver kept adding chains faster than the frame could be placed (at most twice
    /// the queue size are taken per frame): the chains taken were put back; the caller
    /// should come back later through the queue's EventFd. The frame should wait.
    Yield,
    /// Writing into guest memory failed after the checks (cannot happen with memory that
    /// does not change); the chains were returned with length 0 and the frame is lost.
    CopyFailed,
}

/// The outcome of [`deliver_frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RxResult {
    /// What became of the frame.
    pub status: RxStatus,
    /// Malformed chains returned to the driver with length 0.
    pub bad_chains: u64,
    /// Whether anything was added to the used ring (the driver may need an interrupt).
    pub used: bool,
}

/// Why a receive chain is unusable.
#[derive(Debug)]
enum BadChain {
    ReadOnly { addr: u64 },
    OutsideMemory { addr: u64, len: u32 },
    TooSmall { capacity: usize },
    Unterminated,
    HeadBeyondQueue { head: u16, size: u16 },
}

impl std::fmt::Display for BadChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadChain::ReadOnly { addr } => write!(f, "device-readable descriptor at {addr:#x}"),
            BadChain::OutsideMemory { addr, len } => {
                write!(f, "descriptor {addr:#x}+{len:#x} outside guest memory")
            }
            BadChain::TooSmall { capacity } => write!(f, "only {capacity} bytes"),
            BadChain::Unterminated => f.write_str(UNTERMINATED),
            BadChain::HeadBeyondQueue { head, size } => {
                write!(f, "head index {head} is beyond the queue size {size}")
            }
        }
    }
}

/// Appends the descriptors of `chain` to `descs` and returns the chain's capacity; on
/// error `descs` is left as it was.
fn collect_writable<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    descs: &mut Vec<(GuestAddress, usize)>,
) -> Result<usize, BadChain> {
    let start = descs.len();
    let mut capacity = 0usize;
    let mut open = false;
    // The chain iterator stops after queue-size descriptors (or the indirect table's
    // size) and before 4 GiB in total, so this ends and `capacity` cannot overflow. A
    // chain it stopped early (a loop, say) is refused, not filled: its last descriptor
    // still has NEXT.
    for desc in chain {
        open = desc.has_next();
        let addr = desc.addr();
        let err = if !desc.is_write_only() {
            Some(BadChain::ReadOnly { addr: addr.0 })
        } else if !mem.check_range(addr, desc.len() as usize, Permissions::Write) {
            Some(BadChain::OutsideMemory {
                addr: addr.0,
                len: desc.len(),
            })
        } else {
            None
        };
        if let Some(e) = err {
            descs.truncate(start);
            return Err(e);
        }
        if desc.len() > 0 {
            descs.push((addr, desc.len() as usize));
            capacity += desc.len() as usize;
        }
    }
    if open {
        descs.truncate(start);
        return Err(BadChain::Unterminated);
    }
    Ok(capacity)
}

/// Returns `head` to the driver with `len` bytes written; a used ring that cannot take it
/// is the driver's error, reported once.
fn give_back<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    head: u16,
    len: usize,
    warn: &mut DriverWarnings,
) {
    // A chain is below 4 GiB, and `len` at most its capacity.
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    if let Err(e) = tvm_virtio::add_used(queue, mem, head, len) {
        warn_once!(
            warn.ring,
            "{}: rx chain {head} not returned: {e}",
            warn.name
        );
    }
}

/// Undoes the pops of the chains taken for the current frame.
fn put_back(queue: &mut Queue, scratch: &mut RxScratch) {
    for _ in 0..scratch.chains.len() {
        queue.go_to_previous_position();
    }
    scratch.chains.clear();
    scratch.descs.clear();
}

/// Places `frame` into the receive queue.
///
/// With `mergeable` (VIRTIO_NET_F_MRG_RXBUF) the frame is spread over as many chains as
/// it needs and `num_buffers` in its header says how many; without it, one chain must hold
/// it all and `num_buffers` is 1. `frame` must be at least [`VNET_HDR_LEN`] bytes; its
/// `num_buffers` field is overwritten.
///
/// Chains are checked before anything is written: every descriptor device-writable and
/// inside guest memory, some room, and room for the whole header in the frame's first
/// chain. A chain that fails is returned at once with used length 0 together with the
/// chains already taken for this frame (so that the frame's own used entries stay
/// consecutive, as the driver expects for mergeable buffers), and the frame moves on to
/// the next chains. Data is written only into checked descriptors, only up to the frame's
/// length.
///
/// Driver errors (a malformed chain, a head index beyond the queue, an available index
/// too far ahead) are logged once per kind through `warn`, then at `debug!`. A chain whose
/// head is beyond the queue cannot be returned: it is skipped and counted. While the
/// available index is too far ahead the ring is left alone, as if empty.
pub(crate) fn deliver_frame<M: GuestMemory>(
    mem: &M,
    queue: &mut Queue,
    frame: &mut [u8],
    mergeable: bool,
    scratch: &mut RxScratch,
    warn: &mut DriverWarnings,
) -> RxResult {
    let mut result = RxResult {
        status: RxStatus::Delivered,
        bad_chains: 0,
        used: false,
    };
    scratch.chains.clear();
    scratch.descs.clear();
    let need = frame.len();
    let mut have = 0usize;
    // A driver adding chains as fast as we take them (bad ones, say) must not keep us
    // here: a frame never needs more than the ring holds.
    let max_pops = 2 * usize::from(queue.size());
    let mut pops = 0usize;
    // Whether a chain was taken since notifications were last enabled.
    let mut progress = true;

    while have < need {
        if pops >= max_pops {
            put_back(queue, scratch);
            result.status = RxStatus::Yield;
            return result;
        }
        let popped = match tvm_virtio::chains_pending(queue, mem) {
            Ok(0) => None,
            Ok(_) => queue.pop_descriptor_chain(mem),
            Err(e) => {
                warn_once!(warn.ring, "{}: rx queue left alone: {e}", warn.name);
                None
            }
        };
        let Some(chain) = popped else {
            if progress {
                progress = false;
                // Ask for a kick, then look again: buffers added meanwhile would
                // otherwise come with no notification. (With EVENT_IDX this writes
                // avail_event = the current position, so it is redone after any
                // progress; an older value would be behind the driver and never fire.)
                match queue.enable_notification(mem) {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => debug!("virtio-net: rx enable_notification failed: {e}"),
                }
            }
            // Put back what this frame took (nothing was written or used); avail_event
            // is past them, so the driver kicks when it adds a buffer.
            put_back(queue, scratch);
            result.status = RxStatus::NoBuffers;
            return result;
        };
        pops += 1;
        progress = true;
        let head = chain.head_index();
        let start = scratch.descs.len();
        let checked = if head >= queue.size() {
            Err(BadChain::HeadBeyondQueue {
                head,
                size: queue.size(),
            })
        } else {
            collect_writable(mem, chain, &mut scratch.descs)
        };
        let checked = checked.and_then(|capacity| {
            let min = if scratch.chains.is_empty() {
                VNET_HDR_LEN
            } else {
                1
            };
            if capacity < min {
                scratch.descs.truncate(start);
                Err(BadChain::TooSmall { capacity })
            } else {
                Ok(capacity)
            }
        });
        match checked {
            Ok(capacity) if !mergeable && capacity < need => {
                debug!(
                    "virtio-net: rx frame of {need} bytes does not fit the {capacity}-byte buffer \
                     (no mergeable buffers): dropped"
                );
                scratch.descs.truncate(start);
                queue.go_to_previous_position();
                result.status = RxStatus::TooLarge;
                return result;
            }
            Ok(capacity) => {
                scratch.chains.push(RxChain {
                    head,
                    descs: start..scratch.descs.len(),
                    written: 0,
                });
                have = have.saturating_add(capacity);
            }
            Err(e) => {
                let beyond = matches!(e, BadChain::HeadBeyondQueue { .. });
                if beyond {
                    // A broken ring rather than a bad chain: there is no such chain,
                    // nothing to read and nowhere to return it (virtio-queue would log an
                    // error); it is skipped.
                    warn_once!(warn.ring, "{}: rx chain skipped: {e}", warn.name);
                } else {
                    warn_once!(
                        warn.rx_chain,
                        "{}: malformed rx chain {head} returned unused: {e}",
                        warn.name
                    );
                }
                // The chains taken for this frame go back with it, so that the frame's own
                // used entries stay consecutive and `put_back` only ever undoes the
                // frame's chains.
                for c in scratch.chains.drain(..) {
                    give_back(queue, mem, c.head, 0, warn);
                }
                scratch.descs.clear();
                if !beyond {
                    give_back(queue, mem, head, 0, warn);
                }
                result.bad_chains += 1;
                result.used = true;
                have = 0;
            }
        }
    }

    // At most queue-size chains: the available ring never holds more.
    let num_buffers = u16::try_from(scratch.chains.len()).unwrap_or(u16::MAX);
    if let Some(field) = frame.get_mut(NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2) {
        field.copy_from_slice(&num_buffers.to_le_bytes());
    }
    let mut offset = 0usize;
    let mut copy_failed = false;
    for c in &mut scratch.chains {
        for &(addr, len) in &scratch.descs[c.descs.clone()] {
            let n = len.min(need - offset);
            if n == 0 {
                break;
            }
            if let Err(e) = mem.write_slice(&frame[offset..offset + n], addr) {
                debug!("virtio-net: rx write at {:#x} failed: {e}", addr.0);
                copy_failed = true;
            }
            offset += n;
            c.written += n;
        }
    }
    for c in &scratch.chains {
        let len = if copy_failed { 0 } else { c.written };
        give_back(queue, mem, c.head, len, warn);
    }
    result.used = true;
    if copy_failed {
        result.status = RxStatus::CopyFailed;
    }
    result
}
