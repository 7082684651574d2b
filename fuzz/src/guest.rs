// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guest memory for the virtio harnesses: a fixed layout with a hole, canary contents,
//! snapshots and a check that the code under test wrote only where it may; split rings
//! written as a driver would; a walk of the available chains (with virtio-queue, as the
//! devices walk them) to know which buffers each request describes; an interrupt sink that
//! records what it is asked to do; a driver that brings a virtio-pci device up.

use std::io;
use std::sync::{Mutex, PoisonError};

use tvm_virtio::{features, status, InterruptSink, MsixEntry, VirtioDevice, VirtioPciDevice};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// First RAM region: rings and most buffers.
pub const REGION_A: (u64, usize) = (0, 0x2_0000);
/// Second RAM region, after a hole at `0x2_0000..0x2_4000`: buffers that straddle or miss
/// memory.
pub const REGION_B: (u64, usize) = (0x2_4000, 0x4000);
/// Where harnesses put buffers by default (after the rings of queues 0 and 1).
pub const BUFFERS: u64 = 0x8000;

/// Guest memory with the layout above, every byte set to [`canary`]`(addr, seed)`.
///
/// The mapping is made once per thread and reused (refilled) by every call: a fresh
/// mapping per input costs more page faults than the harness itself takes. Whatever held
/// the previous input's clone must be gone by then; the harnesses drop everything at the
/// end of each input.
pub fn new_mem(seed: u8) -> GuestMemoryMmap<()> {
    thread_local! {
        static MEM: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(REGION_A.0), REGION_A.1),
            (GuestAddress(REGION_B.0), REGION_B.1),
        ])
        .expect("fixed, valid ranges");
        static FILLS: std::cell::RefCell<Vec<(u8, Vec<Vec<u8>>)>> = const {
            std::cell::RefCell::new(Vec::new())
        };
    }
    let mem = MEM.with(Clone::clone);
    FILLS.with(|f| {
        let mut f = f.borrow_mut();
        if !f.iter().any(|(s, _)| *s == seed) {
            let fills = [REGION_A, REGION_B]
                .iter()
                .map(|&(base, len)| (base..base + len as u64).map(|a| canary(a, seed)).collect())
                .collect();
            f.push((seed, fills));
        }
        let (_, fills) = f.iter().find(|(s, _)| *s == seed).expect("just added");
        for ((base, _), fill) in [REGION_A, REGION_B].iter().zip(fills) {
            mem.write_slice(fill, GuestAddress(*base))
                .expect("inside the region");
        }
    });
    mem
}

/// The canary byte at `addr`: varies with the address so a shifted copy shows.
pub fn canary(addr: u64, seed: u8) -> u8 {
    (addr as u8).wrapping_mul(0x9d) ^ ((addr >> 8) as u8) ^ seed
}

/// Half-open guest address ranges.
#[derive(Debug, Default, Clone)]
pub struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    /// No range.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `addr..addr + len` (clamped at the end of the address space).
    pub fn add(&mut self, addr: u64, len: u64) {
        if len > 0 {
            self.0.push((addr, addr.saturating_add(len)));
        }
    }

    /// Adds every range of `other`.
    pub fn extend(&mut self, other: &Ranges) {
        self.0.extend_from_slice(&other.0);
    }

    /// Whether `addr` is in one of the ranges.
    pub fn contains(&self, addr: u64) -> bool {
        self.0.iter().any(|&(s, e)| addr >= s && addr < e)
    }

    /// Whether any range of `other` meets one of these.
    pub fn overlaps_any(&self, other: &Ranges) -> bool {
        other.0.iter().any(|&(s, e)| self.overlaps(s, e - s))
    }

    /// Whether `addr..addr + len` meets one of the ranges.
    pub fn overlaps(&self, addr: u64, len: u64) -> bool {
        let end = addr.saturating_add(len);
        len > 0 && self.0.iter().any(|&(s, e)| addr < e && s < end)
    }
}

/// The contents of every region of `mem`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot(Vec<(u64, Vec<u8>)>);

thread_local! {
    /// Buffers of dropped snapshots: reused, because ASan's allocator hands out fresh
    /// pages for every large allocation.
    static POOL: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        POOL.with(|p| p.borrow_mut().extend(self.0.drain(..).map(|(_, v)| v)));
    }
}

impl Snapshot {
    /// Copies `mem`.
    pub fn take(mem: &GuestMemoryMmap<()>) -> Self {
        Snapshot(
            mem.iter()
                .map(|r| {
                    let base = r.start_addr().0;
                    let mut v = POOL.with(|p| p.borrow_mut().pop()).unwrap_or_default();
                    v.resize(r.len() as usize, 0);
                    mem.read_slice(&mut v, GuestAddress(base))
                        .expect("a whole region");
                    (base, v)
                })
                .collect(),
        )
    }

    /// The `len` bytes at `addr`, if they are all RAM (they may span regions).
    pub fn read(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(len.min(1 << 20));
        let mut at = addr;
        while out.len() < len {
            let (base, v) = self
                .0
                .iter()
                .find(|(base, v)| at >= *base && at - base < v.len() as u64)?;
            let off = (at - base) as usize;
            let n = (v.len() - off).min(len - out.len());
            out.extend_from_slice(&v[off..off + n]);
            at = at.checked_add(n as u64)?;
        }
        Some(out)
    }

    /// Writes `data` at `addr`, if it is all RAM (it may span regions): the harness's
    /// model of what the device should write. Returns whether it was.
    pub fn write(&mut self, addr: u64, data: &[u8]) -> bool {
        if !self.is_ram(addr, data.len()) {
            return false;
        }
        let (mut at, mut rest) = (addr, data);
        while let Some((base, v)) = self
            .0
            .iter_mut()
            .find(|(base, v)| !rest.is_empty() && at >= *base && at - *base < v.len() as u64)
        {
            let off = (at - *base) as usize;
            let n = (v.len() - off).min(rest.len());
            v[off..off + n].copy_from_slice(&rest[..n]);
            at += n as u64;
            rest = &rest[n..];
        }
        true
    }

    /// Whether the `len` bytes at `addr` are all RAM (they may span regions).
    pub fn is_ram(&self, addr: u64, len: usize) -> bool {
        let mut at = addr;
        let end = addr.checked_add(len as u64);
        let Some(end) = end else {
            return false;
        };
        while at < end {
            let Some((base, v)) = self
                .0
                .iter()
                .find(|(base, v)| at >= *base && at - *base < v.len() as u64)
            else {
                return false;
            };
            at = base + v.len() as u64;
        }
        true
    }

    /// The first address where `other` differs from `self`, with both bytes.
    pub fn first_difference(&self, other: &Snapshot) -> Option<(u64, u8, u8)> {
        for ((base, mine), (_, theirs)) in self.0.iter().zip(&other.0) {
            if mine == theirs {
                continue;
            }
            let i = mine.iter().zip(theirs).position(|(a, b)| a != b)?;
            return Some((base + i as u64, mine[i], theirs[i]));
        }
        None
    }

    /// Panics, naming `what` and the first offending address, if `after` differs from
    /// `self` anywhere outside `allowed`.
    pub fn assert_writes_within(&self, after: &Snapshot, allowed: &Ranges, what: &str) {
        for ((base, before), (_, now)) in self.0.iter().zip(&after.0) {
            for (c, (bc, nc)) in before.chunks(64).zip(now.chunks(64)).enumerate() {
                if bc == nc {
                    continue;
                }
                for (i, (b, a)) in bc.iter().zip(nc).enumerate() {
                    let addr = base + (64 * c + i) as u64;
                    if b != a && !allowed.contains(addr) {
                        panic!("{what}: guest memory at {addr:#x} changed ({b:#04x} -> {a:#04x}) outside the buffers the guest gave");
                    }
                }
            }
        }
    }
}

/// A split virtqueue's three areas (virtio 1.2, 2.7) as the harness driver lays them out.
#[derive(Debug, Clone, Copy)]
pub struct Ring {
    /// Descriptor table.
    pub desc: u64,
    /// Available (driver) ring.
    pub avail: u64,
    /// Used (device) ring.
    pub used: u64,
    /// Queue size.
    pub size: u16,
}

impl Ring {
    /// The fixed layout of queue `index` (4 KiB per area, 16 KiB per queue) in region A.
    pub fn at(index: u16, size: u16) -> Self {
        let base = u64::from(index) * 0x4000;
        Ring {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            size,
        }
    }

    /// Bytes of the used ring: flags, idx, ring, avail_event.
    pub fn used_len(&self) -> u64 {
        6 + 8 * u64::from(self.size)
    }

    /// Writes descriptor `index` as the raw 16 bytes of a `virtq_desc`.
    pub fn write_desc(&self, mem: &GuestMemoryMmap<()>, index: u16, raw: &[u8; 16]) {
        let addr = self.desc + 16 * u64::from(index % self.size);
        mem.write_slice(raw, GuestAddress(addr))
            .expect("rings are in region A");
    }

    /// Writes the available ring: flags, idx, `entries` from slot `first`, and used_event.
    pub fn write_avail(
        &self,
        mem: &GuestMemoryMmap<()>,
        flags: u16,
        idx: u16,
        first: u16,
        entries: &[u16],
        used_event: u16,
    ) {
        let w = |off: u64, v: u16| {
            mem.write_obj(v.to_le(), GuestAddress(self.avail + off))
                .expect("rings are in region A")
        };
        w(0, flags);
        w(2, idx);
        for (i, &e) in entries.iter().enumerate() {
            let slot = (usize::from(first) + i) % usize::from(self.size);
            w(4 + 2 * slot as u64, e);
        }
        w(4 + 2 * u64::from(self.size), used_event);
    }

    /// Zeroes the descriptor table and both rings, as a driver does before it enables
    /// the queue.
    pub fn clear(&self, mem: &GuestMemoryMmap<()>) {
        let mut all = Ranges::new();
        all.extend(&self.areas());
        for &(s, e) in &all.0 {
            mem.write_slice(&vec![0u8; (e - s) as usize], GuestAddress(s))
                .expect("rings are in region A");
        }
    }

    /// Zeroes the used ring, as a driver does before it enables the queue.
    pub fn clear_used(&self, mem: &GuestMemoryMmap<()>) {
        mem.write_slice(
            &vec![0u8; self.used_len() as usize],
            GuestAddress(self.used),
        )
        .expect("rings are in region A");
    }

    /// The used ring's idx.
    pub fn used_idx(&self, mem: &GuestMemoryMmap<()>) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(self.used + 2)).expect("in RAM"))
    }

    /// Used element number `i` (modulo the size): (id, len).
    pub fn used_elem(&self, mem: &GuestMemoryMmap<()>, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        let id: u32 = mem.read_obj(GuestAddress(at)).expect("in RAM");
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).expect("in RAM");
        (u32::from_le(id), u32::from_le(len))
    }

    /// The descriptor table, the available and the used ring, as ranges.
    pub fn areas(&self) -> Ranges {
        let mut r = Ranges::new();
        r.add(self.desc, 16 * u64::from(self.size));
        r.add(self.avail, 6 + 2 * u64::from(self.size));
        r.add(self.used, self.used_len());
        r
    }

    /// Every indirect table the descriptor table refers to (whether reachable or not).
    pub fn indirect_tables(&self, mem: &GuestMemoryMmap<()>) -> Ranges {
        let mut r = Ranges::new();
        for i in 0..self.size {
            let at = GuestAddress(self.desc + 16 * u64::from(i));
            let addr: u64 = mem.read_obj(at).expect("in RAM");
            let len: u32 = mem.read_obj(GuestAddress(at.0 + 8)).expect("in RAM");
            let flags: u16 = mem.read_obj(GuestAddress(at.0 + 12)).expect("in RAM");
            if u32::from(u16::from_le(flags)) & VRING_DESC_F_INDIRECT != 0 {
                r.add(u64::from_le(addr), u64::from(u32::from_le(len)));
            }
        }
        r
    }
}

/// One descriptor as a device sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
    /// NEXT is set. On the last descriptor of a walked chain this means virtio-queue cut
    /// the walk short (a loop, a next index beyond the table, the length limit): the chain
    /// never ends, and the devices refuse it.
    pub next: bool,
}

/// One available chain, walked.
#[derive(Debug, Clone)]
pub struct Chain {
    /// Its head index (as the available ring gives it).
    pub head: u16,
    /// Its descriptors, indirect tables followed.
    pub descs: Vec<Desc>,
}

impl Chain {
    /// Whether the walk reached a descriptor without NEXT (see [`Desc::next`]).
    pub fn ends(&self) -> bool {
        self.descs.last().is_some_and(|d| !d.next)
    }

    /// Total bytes of its device-writable descriptors.
    pub fn writable_len(&self) -> u64 {
        self.descs
            .iter()
            .filter(|d| d.write)
            .map(|d| u64::from(d.len))
            .sum()
    }

    /// Its device-writable descriptors as ranges.
    pub fn writable(&self) -> Ranges {
        let mut r = Ranges::new();
        for d in self.descs.iter().filter(|d| d.write) {
            r.add(d.addr, u64::from(d.len));
        }
        r
    }
}

/// Walks the chains at available positions `next_avail..avail.idx` of `ring` the way the
/// devices do (virtio-queue). `None` when the available index is more than a queue size
/// ahead (no device may pop then).
pub fn walk(mem: &GuestMemoryMmap<()>, ring: &Ring, next_avail: u16) -> Option<Vec<Chain>> {
    let mut q = Queue::new(ring.size).ok()?;
    q.try_set_desc_table_address(GuestAddress(ring.desc)).ok()?;
    q.try_set_avail_ring_address(GuestAddress(ring.avail))
        .ok()?;
    q.try_set_used_ring_address(GuestAddress(ring.used)).ok()?;
    q.set_ready(true);
    q.set_next_avail(next_avail);
    let iter = q.iter(mem).ok()?;
    Some(
        iter.map(|chain| Chain {
            head: chain.head_index(),
            descs: chain
                .map(|d| Desc {
                    addr: d.addr().0,
                    len: d.len(),
                    write: d.is_write_only(),
                    next: d.has_next(),
                })
                .collect(),
        })
        .collect(),
    )
}

/// Writes a driver's blob into guest memory, unless it leaves RAM or covers one of
/// `used_rings`: a driver has no business there (the device never reads them), and a
/// scribbled used ring would only confuse the checks of what the device wrote.
pub fn write_blob(mem: &GuestMemoryMmap<()>, addr: u64, bytes: &[u8], used_rings: &Ranges) {
    if !used_rings.overlaps(addr, bytes.len() as u64) {
        let _ = mem.write_slice(bytes, GuestAddress(addr));
    }
}

/// The raw 16 bytes of a descriptor.
pub fn raw_desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

/// `VRING_DESC_F_WRITE` as a u16.
pub const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// `VRING_DESC_F_NEXT` as a u16.
pub const F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
/// `VRING_DESC_F_INDIRECT` as a u16.
pub const F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// What the transport asked the interrupt sink to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqCall {
    /// An MSI-X message for this vector.
    Msix(u16),
    /// The INTx line level.
    Intx(bool),
    /// The guest wrote MSI-X table entry `vector`.
    Table(u16, MsixEntry),
}

/// An [`InterruptSink`] that records every call.
#[derive(Debug, Default)]
pub struct RecordingSink {
    calls: Mutex<Vec<IrqCall>>,
}

impl RecordingSink {
    /// The calls since the last `take`.
    pub fn take(&self) -> Vec<IrqCall> {
        std::mem::take(&mut *self.calls.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn push(&self, c: IrqCall) {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(c);
    }
}

impl InterruptSink for RecordingSink {
    fn msix(&self, vector: u16) -> io::Result<()> {
        self.push(IrqCall::Msix(vector));
        Ok(())
    }

    fn intx(&self, level: bool) -> io::Result<()> {
        self.push(IrqCall::Intx(level));
        Ok(())
    }

    fn msix_table_changed(&self, vector: u16, entry: MsixEntry) {
        self.push(IrqCall::Table(vector, entry));
    }
}

/// A guest driver's view of a [`VirtioPciDevice`]: BAR accesses at the common config.
pub struct Driver<'a, D: VirtioDevice> {
    /// The device.
    pub dev: &'a mut VirtioPciDevice<D>,
}

impl<D: VirtioDevice> Driver<'_, D> {
    /// Reads `len` bytes (1, 2, 4 or 8) at BAR offset `off`.
    pub fn read(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.bar_read(off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// Writes the low `len` bytes of `v` at BAR offset `off`.
    pub fn write(&mut self, off: u64, len: usize, v: u64) {
        self.dev.bar_write(off, &v.to_le_bytes()[..len]);
    }

    /// The 64 feature bits the device offers.
    pub fn device_features(&mut self) -> u64 {
        self.write(0x00, 4, 0);
        let lo = self.read(0x04, 4);
        self.write(0x00, 4, 1);
        let hi = self.read(0x04, 4);
        hi << 32 | lo
    }

    /// The status byte.
    pub fn status(&mut self) -> u8 {
        self.read(0x14, 1) as u8
    }

    /// Writes the status byte.
    pub fn set_status(&mut self, s: u8) {
        self.write(0x14, 1, u64::from(s));
    }

    /// ACKNOWLEDGE, DRIVER, the features `wanted & offered` (plus VERSION_1) and
    /// FEATURES_OK; returns the features written.
    pub fn negotiate(&mut self, wanted: u64) -> u64 {
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        let f = (wanted & self.device_features()) | features::VERSION_1;
        self.write(0x08, 4, 0);
        self.write(0x0c, 4, f & 0xffff_ffff);
        self.write(0x08, 4, 1);
        self.write(0x0c, 4, f >> 32);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        f
    }

    /// Configures and enables queue `index` on `ring`.
    pub fn setup_queue(&mut self, index: u16, ring: &Ring) {
        self.write(0x16, 2, u64::from(index));
        self.write(0x18, 2, u64::from(ring.size));
        self.write(0x20, 8, ring.desc);
        self.write(0x28, 8, ring.avail);
        self.write(0x30, 8, ring.used);
        self.write(0x1c, 2, 1);
    }

    /// Sets DRIVER_OK (the device activates).
    pub fn driver_ok(&mut self) {
        self.set_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    /// The whole bring-up: features, one ring per queue, DRIVER_OK. Returns whether the
    /// device is active afterwards.
    pub fn bring_up(&mut self, wanted: u64, rings: &[Ring]) -> bool {
        self.negotiate(wanted);
        for (i, r) in rings.iter().enumerate() {
            self.setup_queue(i as u16, r);
        }
        self.driver_ok();
        self.dev.is_active()
    }
}

/// `len` bytes of the disk pattern (byte `i` is `i % 251`), for images.
pub fn disk_pattern(len: usize) -> Vec<u8> {
    thread_local! {
        static PATTERN: Vec<u8> = (0..256 * 512).map(|i| (i % 251) as u8).collect();
    }
    PATTERN.with(|p| p[..len.min(p.len())].to_vec())
}

/// A temporary file that is removed when dropped (a disk image for virtio-blk).
#[derive(Debug)]
pub struct TempFile {
    path: std::path::PathBuf,
}

impl TempFile {
    /// A file named after `name`, this process and thread, with `content`: in `/dev/shm`
    /// when there is one (memory, so an input costs no disk I/O), else the temp directory.
    pub fn new(name: &str, content: &[u8]) -> Self {
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!(
            "tvm-fuzz-{name}-{}-{:?}.img",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, content).expect("temp dir writable");
        TempFile { path }
    }

    /// Its path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
