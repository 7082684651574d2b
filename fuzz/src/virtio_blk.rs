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
//! - the device does what a model of the image and of guest memory says, request by
//!   request in ring order (virtio 1.2, 5.2.6, and the device's own limits): a read
//!   returns the bytes of the sectors asked for, scattered over its buffers; a write
//!   lands at its sector and nowhere else; DISCARD and WRITE_ZEROES zero their segments;
//!   GET_ID writes the ID; each status byte and used length is the model's (OK, IOERR,
//!   UNSUPP, or no answer at all), and at the end the image file equals the model image
//!   and guest memory the model memory (used ring aside) byte for byte (inputs whose
//!   writable buffers overlap the rings or indirect tables, that read from the used ring,
//!   or with a data descriptor of 0 bytes, are left out of this comparison);
//! - a read-only image is never written;
//! - a completed request raises the queue interrupt when the driver did not suppress it;
//! - no panic, no `error!`, no repeated `warn!`.

use std::sync::Arc;

use tvm_virtio::{features, VirtioPciDevice};
use tvm_virtio_blk::{
    Block, BlockConfig, IoEngine, ID_LEN, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SECTOR_SIZE,
    SEG_MAX, SIZE_MAX,
};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

use crate::guest::{self, Chain, Desc, Driver, IrqCall, RecordingSink, Ring, Snapshot, TempFile};
use crate::{logger, Input};

/// The disk ID the harness gives the device.
const DISK_ID: &str = "fuzz-disk";

/// The harness's model of the disk and of guest memory, updated request by request.
struct Model {
    image: Vec<u8>,
    capacity_sectors: u64,
    read_only: bool,
    mem: Snapshot,
}

/// The model cannot tell what the device does with this request (a data descriptor of
/// 0 bytes: whether it counts as inside guest memory is virtio-queue's and vm-memory's
/// business, not the spec's).
struct Unsure;

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

impl Model {
    /// Applies one walked chain; returns the used length the device must report.
    fn request(&mut self, c: &Chain) -> Result<u32, Unsure> {
        // The device takes at most SEG_MAX + 3 descriptors; a chain that goes on, or
        // that virtio-queue cut short, is returned unanswered.
        if !c.ends() || c.descs.len() > SEG_MAX as usize + 3 {
            return Ok(0);
        }
        let Some((status, rest)) = c.descs.split_last() else {
            return Ok(0);
        };
        if !status.write || status.len == 0 || !self.mem.is_ram(status.addr, 1) {
            return Ok(0);
        }
        let (code, written) = match self.execute(rest)? {
            Ok(written) => (OK, written),
            Err(code) => (code, 0),
        };
        self.mem.write(status.addr, &[code]);
        Ok(written + 1)
    }

    /// Checks data descriptors as the device must: direction, size, inside RAM.
    /// Returns their total length.
    fn check_data(
        &self,
        data: &[Desc],
        write: bool,
        size_max: u32,
    ) -> Result<Result<u64, u8>, Unsure> {
        let mut total = 0;
        for d in data {
            if d.len == 0 {
                return Err(Unsure);
            }
            if d.write != write || d.len > size_max || !self.mem.is_ram(d.addr, d.len as usize) {
                return Ok(Err(IOERR));
            }
            total += u64::from(d.len);
        }
        Ok(Ok(total))
    }

    /// The request without its status descriptor: `Ok(bytes written to the guest)` or
    /// `Err(status)`.
    fn execute(&mut self, descs: &[Desc]) -> Result<Result<u32, u8>, Unsure> {
        let Some((hdr, data)) = descs.split_first() else {
            return Ok(Err(IOERR));
        };
        if hdr.write || hdr.len < 16 || data.len() > SEG_MAX as usize {
            return Ok(Err(IOERR));
        }
        let Some(header) = self.mem.read(hdr.addr, 16) else {
            return Ok(Err(IOERR));
        };
        let req_type = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        match req_type {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let read = req_type == VIRTIO_BLK_T_IN;
                if !read && self.read_only {
                    return Ok(Err(IOERR));
                }
                let total = match self.check_data(data, read, SIZE_MAX)? {
                    Ok(t) => t,
                    Err(code) => return Ok(Err(code)),
                };
                let sectors = total / SECTOR_SIZE;
                let in_disk = sector
                    .checked_add(sectors)
                    .is_some_and(|end| end <= self.capacity_sectors);
                if total == 0 || total % SECTOR_SIZE != 0 || !in_disk {
                    return Ok(Err(IOERR));
                }
                let mut at = (sector * SECTOR_SIZE) as usize;
                for d in data {
                    let len = d.len as usize;
                    if read {
                        let bytes = self.image[at..at + len].to_vec();
                        self.mem.write(d.addr, &bytes);
                    } else {
                        let bytes = self.mem.read(d.addr, len).expect("checked in RAM");
                        self.image[at..at + len].copy_from_slice(&bytes);
                    }
                    at += len;
                }
                Ok(Ok(if read { total as u32 } else { 0 }))
            }
            VIRTIO_BLK_T_FLUSH => Ok(Ok(0)),
            VIRTIO_BLK_T_GET_ID => {
                if data.is_empty() {
                    return Ok(Err(IOERR));
                }
                if let Err(code) = self.check_data(data, true, u32::MAX)? {
                    return Ok(Err(code));
                }
                let mut id = [0u8; ID_LEN];
                id[..DISK_ID.len()].copy_from_slice(DISK_ID.as_bytes());
                let mut id = &id[..];
                let mut written = 0;
                for d in data {
                    let n = id.len().min(d.len as usize);
                    self.mem.write(d.addr, &id[..n]);
                    written += n as u32;
                    id = &id[n..];
                }
                Ok(Ok(written))
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.read_only {
                    return Ok(Err(UNSUPP));
                }
                let total = match self.check_data(data, false, u32::MAX)? {
                    Ok(t) => t,
                    Err(code) => return Ok(Err(code)),
                };
                if total == 0 || total % 16 != 0 || total > u64::from(MAX_DISCARD_SEG) * 16 {
                    return Ok(Err(IOERR));
                }
                let mut raw = Vec::new();
                for d in data {
                    raw.extend(
                        self.mem
                            .read(d.addr, d.len as usize)
                            .expect("checked in RAM"),
                    );
                }
                let known = if req_type == VIRTIO_BLK_T_DISCARD {
                    0
                } else {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                };
                let mut ranges = Vec::new();
                for seg in raw.chunks_exact(16) {
                    let sector = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
                    let num = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
                    let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4 bytes"));
                    if flags & !known != 0 {
                        return Ok(Err(UNSUPP));
                    }
                    let in_disk = sector
                        .checked_add(u64::from(num))
                        .is_some_and(|end| end <= self.capacity_sectors);
                    if num > MAX_DISCARD_SECTORS || !in_disk {
                        return Ok(Err(IOERR));
                    }
                    ranges.push((sector * SECTOR_SIZE, u64::from(num) * SECTOR_SIZE));
                }
                for (at, len) in ranges {
                    self.image[at as usize..(at + len) as usize].fill(0);
                }
                Ok(Ok(0))
            }
            _ => Ok(Err(UNSUPP)),
        }
    }
}

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
        id: Some(DISK_ID.into()),
        engine: IoEngine::Sync,
        ..BlockConfig::default()
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
    // The device serves at most its budget per notification and signals its own queue
    // again for the rest, which the event loop then delivers: do the same until it stops
    // (a queue holds at most 256 chains, so a few rounds).
    for _ in 0..16 {
        dev.process_notification(0);
        let again = dev.notify_eventfd(0).is_some_and(|evt| evt.read().is_ok());
        if !again {
            break;
        }
        dev.notify_eventfd(0)
            .expect("queue 0 has an eventfd")
            .write(1)
            .expect("eventfd writable");
    }
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

    // The data: replay the requests on the model, compare status, used lengths, memory
    // and the image. A request that reads from the used ring reads what the device
    // wrote there for the requests before it, which the model does not follow.
    let reads_used_ring = expected.iter().any(|c| {
        c.descs
            .iter()
            .any(|d| !d.write && used_ring.overlaps(d.addr, u64::from(d.len)))
    });
    if reads_used_ring {
        return;
    }
    let mut model = Model {
        image: image.clone(),
        capacity_sectors: capacity,
        read_only,
        mem: before,
    };
    let mut lens = Vec::with_capacity(expected.len());
    for c in &expected {
        match model.request(c) {
            Ok(len) => lens.push(len),
            Err(Unsure) => return,
        }
    }
    for (i, (c, want)) in expected.iter().zip(&lens).enumerate() {
        let (_, len) = ring.used_elem(&mem, i as u16);
        assert_eq!(
            len, *want,
            "used length of request {i} (head {}): the model says {want}",
            c.head
        );
    }
    let used_bytes = after
        .read(ring.used, ring.used_len() as usize)
        .expect("the used ring is in RAM");
    model.mem.write(ring.used, &used_bytes);
    if let Some((addr, want, got)) = model.mem.first_difference(&after) {
        panic!("guest memory at {addr:#x} is {got:#04x}, the model says {want:#04x}");
    }
    let now = std::fs::read(file.path()).expect("image readable");
    if let Some(at) = now.iter().zip(&model.image).position(|(a, b)| a != b) {
        panic!(
            "image byte {at} (sector {}) is {:#04x}, the model says {:#04x}",
            at / 512,
            now[at],
            model.image[at]
        );
    }
    assert_eq!(now.len(), model.image.len(), "the image changed size");

    if used > 0 && !event_idx {
        let raised = sink.take().contains(&IrqCall::Intx(true));
        assert!(raised, "{used} requests completed without an interrupt");
    }
}
