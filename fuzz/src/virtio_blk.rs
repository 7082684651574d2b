// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! virtio-blk: a [`Block`] over a temporary image behind the PCI transport, a request
//! queue the input fills (raw descriptors, available ring, headers, data, indirect tables
//! anywhere in memory), one notification.
//!
//! Input: queue size (log2), features wanted (u64), capacity in sectors (u8) and a
//! remainder flag, read-only flag, used_event (u16), the number of descriptors and their
//! raw 16 bytes each, the available index (u16) and that many ring entries (at most the
//! queue size), then blobs (address u32, length u8, bytes) written into guest memory until
//! the input ends.
//!
//! Invariants:
//! - every available chain with a head inside the queue comes back in the used ring, in
//!   order, exactly once; none when the available index is more than a queue size ahead;
//! - each used length is at most the chain's device-writable bytes;
//! - guest memory changes only in the used ring and the writable buffers of those chains
//!   (unless a writable buffer covers a ring or an indirect table: the device then
//!   rewrites the requests it walks, and only the other rules are checked);
//! - a read-only image is never written;
//! - a completed request raises the queue interrupt when the driver did not suppress it;
//! - no panic, no `error!`, no repeated `warn!`.

use std::sync::Arc;

use tvm_virtio::{features, VirtioPciDevice};
use tvm_virtio_blk::{Block, BlockConfig};

use crate::guest::{self, Driver, IrqCall, RecordingSink, Ring, Snapshot, TempFile};
use crate::{logger, Input};

/// Runs one input.
pub fn run(data: &[u8]) {
    logger::start_input();
    let mut input = Input::new(data);
    let size = 1u16 << (input.u8() % 9);
    let wanted = input.u64();
    let capacity = u64::from(input.u8());
    let odd_tail = input.bool();
    let read_only = input.bool();
    let used_event = input.u16();

    let mem = guest::new_mem(0x5a);
    let ring = Ring::at(0, size);
    ring.clear(&mem);
    let mut used_ring = guest::Ranges::new();
    used_ring.add(ring.used, ring.used_len());
    let n_desc = input.u16() % (size + 1);
    for i in 0..n_desc {
        ring.write_desc(&mem, i, &input.array::<16>());
    }
    let avail_idx = input.u16();
    let n_entries = avail_idx.min(size);
    let entries: Vec<u16> = (0..n_entries).map(|_| input.u16()).collect();
    while !input.is_empty() {
        let addr = u64::from(input.u32());
        let len = usize::from(input.u8());
        let bytes = input.bytes(len);
        guest::write_blob(&mem, addr, bytes, &used_ring);
    }

    let image_len = capacity * 512 + if odd_tail { 100 } else { 0 };
    let image = guest::disk_pattern(image_len as usize);
    let file = TempFile::new("blk", &image);
    let block = Block::open(BlockConfig {
        path: file.path().to_path_buf(),
        read_only,
        id: Some("fuzz-disk".into()),
    })
    .expect("a fresh image opens");
    let sink = Arc::new(RecordingSink::default());
    let mut dev = VirtioPciDevice::new(block, mem.clone(), sink.clone()).expect("transport builds");
    let event_idx = wanted & features::RING_EVENT_IDX != 0;
    if !(Driver { dev: &mut dev }).bring_up(wanted, &[ring]) {
        return;
    }
    // Rings after activation, as a driver adds requests to a live queue.
    ring.write_avail(&mem, 0, avail_idx, 0, &entries, used_event);

    let chains = guest::walk(&mem, &ring, 0);
    let mut meta = ring.areas();
    meta.extend(&ring.indirect_tables(&mem));
    let before = Snapshot::take(&mem);
    sink.take();
    dev.process_notification(0);
    let after = Snapshot::take(&mem);

    if read_only {
        let now = std::fs::read(file.path()).expect("image readable");
        assert!(now == image, "a read-only image was written");
    }

    let expected: Vec<&guest::Chain> = chains.iter().flatten().filter(|c| c.head < size).collect();
    // A writable buffer over the rings or an indirect table lets the device rewrite the
    // requests under itself (a hostile driver): each status byte it writes can move the
    // next descriptor, so the buffers it used are not the ones walked before. Such an
    // input is still run (no panic, no error!, the read-only image) but its writes cannot
    // be checked against the walk.
    if expected.iter().any(|c| c.writable().overlaps_any(&meta)) {
        return;
    }
    let mut allowed = guest::Ranges::new();
    allowed.add(ring.used, ring.used_len());
    for c in &expected {
        allowed.extend(&c.writable());
    }
    before.assert_writes_within(&after, &allowed, "virtio-blk");

    let used = ring.used_idx(&mem);
    assert_eq!(
        usize::from(used),
        expected.len(),
        "used idx {used}, but {} chains with a valid head were available (avail idx {avail_idx}, size {size})",
        expected.len()
    );
    for (i, c) in expected.iter().enumerate() {
        let (id, len) = ring.used_elem(&mem, i as u16);
        assert_eq!(
            id,
            u32::from(c.head),
            "used element {i} is not the available chain {i}"
        );
        assert!(
            u64::from(len) <= c.writable_len(),
            "used length {len} of head {} exceeds its {} writable bytes",
            c.head,
            c.writable_len()
        );
    }

    if used > 0 && !event_idx {
        let raised = sink.take().contains(&IrqCall::Intx(true));
        assert!(raised, "{used} requests completed without an interrupt");
    }
}
