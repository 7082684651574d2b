// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! virtio-rng: an [`Rng`] with a counting source (byte `i` of everything it ever gives is
//! `i as u8`) behind the PCI transport, a request queue the input fills (raw descriptors,
//! available ring, indirect tables anywhere in memory), one notification.
//!
//! Input: queue size (log2), features wanted (u64), used_event (u16), the number of
//! descriptors and their raw 16 bytes each, the available index (u16) and that many ring
//! entries (at most the queue size), then blobs (address u32, length u8, bytes) written
//! into guest memory until the input ends.
//!
//! Invariants (all but the last two skipped when a writable buffer covers a ring or an
//! indirect table: the device then rewrites the requests it walks, the available index
//! included, so what it completes is not what the harness walked before):
//! - every available chain with a head inside the queue comes back in the used ring, in
//!   order, exactly once; none when the available index is more than a queue size ahead;
//! - each used length is at most the chain's device-writable bytes and at most
//!   [`MAX_BYTES_PER_REQUEST`];
//! - guest memory changes only in the used ring and the writable buffers of those chains;
//! - the device does what a model says, request by request in ring order: a chain that
//!   does not end or has a device-readable buffer gets nothing; otherwise its writable
//!   buffers get the next bytes of the stream in order, in pieces of at most 4 KiB up to
//!   the cap, until a piece that is not entirely in RAM; used lengths and guest memory
//!   (used ring aside) are the model's byte for byte;
//! - a completed request raises the queue interrupt when the driver did not suppress it;
//! - no panic, no `error!`, no repeated `warn!`.

use std::io;
use std::sync::Arc;

use tvm_virtio::{features, VirtioPciDevice};
use tvm_virtio_rng::{EntropySource, Rng, MAX_BYTES_PER_REQUEST};

use crate::guest::{self, Chain, IrqCall, RecordingSink, Ring, Snapshot};
use crate::{logger, Input};

/// The piece size of `fill_chain` (`CHUNK` in `crates/virtio-rng/src/fill.rs`).
const PIECE: u32 = 4096;

/// Byte `i` of the stream is `i as u8`.
struct Counting(u64);

impl EntropySource for Counting {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
        for b in buf {
            *b = self.0 as u8;
            self.0 += 1;
        }
        Ok(())
    }
}

/// Applies one walked chain to the model memory; returns its used length. `stream` is
/// the position in the source's stream.
fn model_request(mem: &mut Snapshot, c: &Chain, stream: &mut u64) -> u32 {
    if !c.ends() || c.descs.iter().any(|d| !d.write) {
        return 0;
    }
    let mut len = 0u32;
    for d in &c.descs {
        let mut off = 0u32;
        while off < d.len && len < MAX_BYTES_PER_REQUEST {
            let n = (d.len - off).min(MAX_BYTES_PER_REQUEST - len).min(PIECE);
            let Some(at) = d.addr.checked_add(u64::from(off)) else {
                return len;
            };
            if !mem.is_ram(at, n as usize) {
                return len;
            }
            let bytes: Vec<u8> = (0..u64::from(n)).map(|i| (*stream + i) as u8).collect();
            mem.write(at, &bytes);
            *stream += u64::from(n);
            off += n;
            len += n;
        }
    }
    len
}

/// Runs one input.
pub fn run(data: &[u8]) {
    logger::start_input();
    let mut input = Input::new(data);
    let size = 1u16 << (input.u8() % 9);
    let wanted = input.u64();
    let used_event = input.u16();

    let mem = guest::new_mem(0x3c);
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

    let rng = Rng::with_source(Box::new(Counting(0)));
    let sink = Arc::new(RecordingSink::default());
    let mut dev = VirtioPciDevice::new(rng, mem.clone(), sink.clone()).expect("transport builds");
    let event_idx = wanted & features::RING_EVENT_IDX != 0;
    if !(guest::Driver { dev: &mut dev }).bring_up(wanted, &[ring]) {
        return;
    }
    ring.write_avail(&mem, 0, avail_idx, 0, &entries, used_event);

    let chains = guest::walk(&mem, &ring, 0);
    let mut meta = ring.areas();
    meta.extend(&ring.indirect_tables(&mem));
    let before = Snapshot::take(&mem);
    sink.take();
    dev.process_notification(0);
    let after = Snapshot::take(&mem);

    let expected: Vec<&Chain> = chains.iter().flatten().filter(|c| c.head < size).collect();
    let used = ring.used_idx(&mem);
    if used > 0 && !event_idx {
        let raised = sink.take().contains(&IrqCall::Intx(true));
        assert!(raised, "{used} requests completed without an interrupt");
    }
    // A writable buffer over the rings or an indirect table lets the device rewrite the
    // requests under itself (the available index included): the chains it completes are
    // not the ones walked before. Such an input still runs (no panic, no error!) but its
    // used ring and writes cannot be checked against the walk.
    if expected.iter().any(|c| c.writable().overlaps_any(&meta)) {
        return;
    }
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
            u64::from(len) <= c.writable_len() && len <= MAX_BYTES_PER_REQUEST,
            "used length {len} of head {} exceeds its {} writable bytes or the cap",
            c.head,
            c.writable_len()
        );
    }
    let mut allowed = guest::Ranges::new();
    allowed.add(ring.used, ring.used_len());
    for c in &expected {
        allowed.extend(&c.writable());
    }
    before.assert_writes_within(&after, &allowed, "virtio-rng");

    let mut model = before;
    let mut stream = 0u64;
    for (i, c) in expected.iter().enumerate() {
        let want = model_request(&mut model, c, &mut stream);
        let (_, len) = ring.used_elem(&mem, i as u16);
        assert_eq!(
            len, want,
            "used length of request {i} (head {}): the model says {want}",
            c.head
        );
    }
    let used_bytes = after
        .read(ring.used, ring.used_len() as usize)
        .expect("the used ring is in RAM");
    model.write(ring.used, &used_bytes);
    if let Some((addr, want, got)) = model.first_difference(&after) {
        panic!("guest memory at {addr:#x} is {got:#04x}, the model says {want:#04x}");
    }
}
