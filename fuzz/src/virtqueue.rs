// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The split-virtqueue walk every device relies on (virtio-queue's `Queue`,
//! `AvailIter` and `DescriptorChain`): any descriptor table, indirect tables, available
//! ring and starting positions, and any sequence of pops, returns, rewinds and
//! notification-suppression calls, as a device makes them.
//!
//! Input: queue size (log2), EVENT_IDX (bool), the starting next_avail and next_used
//! (u16 each), the number of descriptors and their raw bytes, the available flags, idx and
//! used_event (u16 each) and the ring entries from next_avail (at most the size), a count
//! of blobs (u8, modulo 16) and the blobs (address u32, length u16 modulo 1024, bytes), then
//! operations until the input ends (first byte modulo 6): 0 pop and walk a chain; 1 return
//! the oldest popped chain (len u32); 2 rewind one position; 3 enable or disable
//! notifications (bool); 4 ask whether the driver needs an interrupt; 5 the driver makes
//! more entries available (count u8, entries u16 each).
//!
//! Invariants:
//! - a pop fails exactly when the available index is more than a queue size ahead; it
//!   yields nothing exactly when nothing is pending; the head is the ring's entry;
//! - a walk ends, after at most the queue size plus the largest indirect table
//!   descriptors; every descriptor it yields is one the driver wrote (in the table or in an
//!   indirect table the table refers to), never an indirect one, and they total at most
//!   4 GiB;
//! - returning a chain writes its used element and the used index, and nothing but the used
//!   ring (flags, elements, idx, avail_event) ever changes in guest memory;
//! - no panic.

use std::collections::{HashSet, VecDeque};
use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::guest::{self, Ranges, Ring, Snapshot, F_INDIRECT};
use crate::{logger, Input};

/// (addr, len, flags, next) of a descriptor.
type RawDesc = (u64, u32, u16, u16);

fn read_raw(mem: &GuestMemoryMmap<()>, at: u64) -> Option<RawDesc> {
    let mut b = [0u8; 16];
    mem.read_slice(&mut b, GuestAddress(at)).ok()?;
    Some((
        u64::from_le_bytes(b[0..8].try_into().ok()?),
        u32::from_le_bytes(b[8..12].try_into().ok()?),
        u16::from_le_bytes([b[12], b[13]]),
        u16::from_le_bytes([b[14], b[15]]),
    ))
}

/// Every descriptor the driver wrote: the table and the indirect tables it names; and the
/// largest indirect table's entry count.
fn written_descs(mem: &GuestMemoryMmap<()>, ring: &Ring) -> (HashSet<RawDesc>, u64) {
    let mut set = HashSet::new();
    let mut max_indirect = 0;
    for i in 0..u64::from(ring.size) {
        let Some(d) = read_raw(mem, ring.desc + 16 * i) else {
            continue;
        };
        set.insert(d);
        if d.2 & F_INDIRECT != 0 {
            let n = u64::from(d.1) / 16;
            max_indirect = max_indirect.max(n);
            for j in 0..n {
                match d.0.checked_add(16 * j).and_then(|a| read_raw(mem, a)) {
                    Some(e) => {
                        set.insert(e);
                    }
                    None => break,
                }
            }
        }
    }
    (set, max_indirect)
}

/// Runs one input.
pub fn run(data: &[u8]) {
    logger::start_input();
    let mut input = Input::new(data);
    let size = 1u16 << (input.u8() % 9);
    let event_idx = input.bool();
    let next_avail0 = input.u16();
    let next_used0 = input.u16();
    let mem = guest::new_mem(0x77);
    let ring = Ring::at(0, size);
    ring.clear(&mem);
    let n_desc = input.u16() % (size + 1);
    for i in 0..n_desc {
        ring.write_desc(&mem, i, &input.array::<16>());
    }
    let flags = input.u16();
    let mut avail_idx = input.u16();
    let used_event = input.u16();
    let pending = avail_idx.wrapping_sub(next_avail0).min(size);
    let entries: Vec<u16> = (0..pending).map(|_| input.u16()).collect();
    ring.write_avail(
        &mem,
        flags,
        avail_idx,
        next_avail0 % size,
        &entries,
        used_event,
    );
    let blobs = input.u8() % 16;
    for _ in 0..blobs {
        let addr = u64::from(input.u32());
        let len = usize::from(input.u16() % 1024);
        let bytes = input.bytes(len);
        // Over the used ring too: a driver may scribble there; only the device's own
        // writes are checked below.
        let _ = mem.write_slice(bytes, GuestAddress(addr));
    }
    mem.write_obj(next_used0.to_le(), GuestAddress(ring.used + 2))
        .expect("in RAM");

    let mut q = Queue::new(size).expect("power of two");
    q.try_set_desc_table_address(GuestAddress(ring.desc))
        .expect("aligned");
    q.try_set_avail_ring_address(GuestAddress(ring.avail))
        .expect("aligned");
    q.try_set_used_ring_address(GuestAddress(ring.used))
        .expect("aligned");
    q.set_ready(true);
    q.set_event_idx(event_idx);
    q.set_next_avail(next_avail0);
    q.set_next_used(next_used0);
    assert!(q.is_valid(&mem));

    let (written, max_indirect) = written_descs(&mem, &ring);
    // An indirect table inside the used ring changes as chains are returned: then the
    // descriptors yielded cannot be compared with what the driver wrote.
    let mut used_ring = Ranges::new();
    used_ring.add(ring.used, ring.used_len());
    let tables_move = ring.indirect_tables(&mem).overlaps_any(&used_ring);
    let limit = usize::from(size) + max_indirect as usize;
    let mut allowed = Ranges::new();
    allowed.add(ring.used, ring.used_len());
    let before = Snapshot::take(&mem);

    let mut popped: VecDeque<u16> = VecDeque::new();
    let mut returned = 0u16;
    let mut ops = 0;
    while !input.is_empty() && ops < 128 {
        ops += 1;
        match input.u8() % 6 {
            0 => {
                let next = q.next_avail();
                let idx = q.avail_idx(&mem, Ordering::Acquire).expect("in RAM").0;
                let pending = idx.wrapping_sub(next);
                match q.iter(&mem) {
                    Err(_) => assert!(pending > size, "pop refused with {pending} pending"),
                    Ok(mut it) => match it.next() {
                        None => {
                            assert!(pending <= size, "pop with {pending} pending (size {size})");
                            assert_eq!(pending, 0, "nothing popped with {pending} pending");
                        }
                        Some(chain) => {
                            assert!(pending > 0 && pending <= size);
                            let slot = u64::from(next % size);
                            let head: u16 = mem
                                .read_obj(GuestAddress(ring.avail + 4 + 2 * slot))
                                .map(u16::from_le)
                                .expect("in RAM");
                            assert_eq!(chain.head_index(), head, "head is not the ring's entry");
                            let mut total = 0u64;
                            let mut n = 0usize;
                            for d in chain {
                                n += 1;
                                assert!(n <= limit, "walk did not end after {limit} descriptors");
                                let raw = (d.addr().0, d.len(), d.flags(), d.next());
                                assert!(
                                    tables_move || written.contains(&raw),
                                    "descriptor {raw:x?} never written"
                                );
                                assert_eq!(
                                    d.flags() & F_INDIRECT,
                                    0,
                                    "indirect descriptor yielded"
                                );
                                total += u64::from(d.len());
                            }
                            assert!(total <= u64::from(u32::MAX), "chain of {total} bytes");
                            popped.push_back(head);
                        }
                    },
                }
            }
            1 => {
                let len = input.u32();
                let Some(head) = popped.pop_front() else {
                    continue;
                };
                if head >= size {
                    // A device must not return it (virtio-queue refuses, with error!).
                    continue;
                }
                let slot = q.next_used();
                q.add_used(&mem, head, len)
                    .expect("valid head, ring in RAM");
                returned = returned.wrapping_add(1);
                assert_eq!(ring.used_elem(&mem, slot), (u32::from(head), len));
                assert_eq!(ring.used_idx(&mem), q.next_used(), "used idx in memory");
            }
            2 => {
                if popped.pop_back().is_some() {
                    q.go_to_previous_position();
                }
            }
            3 => {
                if input.bool() {
                    q.enable_notification(&mem).expect("ring in RAM");
                } else {
                    q.disable_notification(&mem).expect("ring in RAM");
                }
            }
            4 => {
                q.needs_notification(&mem).expect("ring in RAM");
            }
            _ => {
                let n = input.u8();
                let new: Vec<u16> = (0..n).map(|_| input.u16()).collect();
                ring.write_avail(
                    &mem,
                    flags,
                    avail_idx.wrapping_add(u16::from(n)),
                    avail_idx % size,
                    &new,
                    used_event,
                );
                avail_idx = avail_idx.wrapping_add(u16::from(n));
                allowed.add(ring.avail, 6 + 2 * u64::from(size));
            }
        }
    }
    let after = Snapshot::take(&mem);
    before.assert_writes_within(&after, &allowed, "virtio-queue");
    assert_eq!(
        Wrapping(q.next_used()),
        Wrapping(next_used0) + Wrapping(returned),
        "next_used does not count the returned chains"
    );
}
