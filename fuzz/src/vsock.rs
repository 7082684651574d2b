// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! virtio-vsock: the device's guest-facing logic through [`FuzzMuxer`] (TX packet parsing
//! and validation, the connection table, credit accounting, shutdown and RST, the packets
//! it would put in the RX queue), each guest connect getting one end of a socket pair. TX
//! chains are laid out in guest memory and popped from a split ring with virtio-queue, as
//! the device pops them.
//!
//! Input: operations until the input ends, at most [`MAX_OPS`]; see [`Op`] for their
//! encoding. A TX packet the harness lays out has a header of any field values (the
//! guest's CID, the host's, stream type, a known op and a few ports unless its mode byte
//! asks for raw values), a payload of a pattern, and any chain shape (see [`shape`]); a
//! raw TX chain is descriptors of any bytes over whatever is in memory.
//!
//! Invariants:
//! - after every operation, every counter is at least what it was; `conns_added -
//!   conns_removed` is the connection count, at most [`MAX_CONNECTIONS`]; each TX chain
//!   adds to `tx_packets` or `tx_errors` (every chain is taken or refused) and at most
//!   [`MAX_PKT_LEN`] to `tx_bytes`; connections are added by TX chains only, one at most
//!   each (there is no listener), and `tx_*` counts change only with TX chains;
//! - RX: at most `max` packets, each for the guest's CID, of stream type, with a known op
//!   other than REQUEST (no listener: the device never connects to the guest), a payload
//!   within the room given (and the 64 KiB cap) and only for RW, shutdown flags (non-zero,
//!   within SEND | RCV) only on SHUTDOWN; every packet but an RST is from the host's CID
//!   with `buf_alloc` = [`BUF_ALLOC`], and, unless a raw chain (whose header the harness
//!   does not know) was sent, on a connection the guest asked for with a REQUEST;
//! - guest memory is only read: at the end it holds exactly what the harness wrote;
//! - no panic, no `error!`, no repeated `warn!`.

use std::collections::HashSet;
use std::time::Duration;

use tvm_vsock::{
    FuzzMuxer, Header, VsockCounters, BUF_ALLOC, HOST_CID, MAX_CONNECTIONS, MAX_PKT_LEN, TX_QUEUE,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::guest::{self, raw_desc, Ring, Snapshot, F_INDIRECT, F_NEXT, F_WRITE};
use crate::{logger, Input};

/// The guest's CID.
pub const GUEST_CID: u64 = 3;
/// TX queue size.
pub const QUEUE_SIZE: u16 = 16;
/// Where the harness lays out TX packets (header, payload, tail: at most 64 KiB + 108).
pub const PACKET: u64 = guest::BUFFERS;
/// Where an indirect table goes (after the TX ring's used ring).
pub const TABLE: u64 = 0x7000;
/// An address in the hole between the RAM regions.
pub const HOLE: u64 = 0x2_0000;
/// Most operations per input.
pub const MAX_OPS: usize = 256;
/// Bytes after the payload with [`shape::TAIL`].
pub const TAIL_LEN: usize = 64;

/// Bits of a laid-out TX packet's mode byte: which header fields the input gives raw.
pub mod mode {
    /// `src_cid` (u64) instead of the guest's.
    pub const RAW_SRC_CID: u8 = 1 << 0;
    /// `dst_cid` (u64) instead of the host's.
    pub const RAW_DST_CID: u8 = 1 << 1;
    /// `type` (u16) instead of stream.
    pub const RAW_TYPE: u8 = 1 << 2;
    /// `op` (u16) instead of a byte modulo 8 (0, unknown, and the seven ops).
    pub const RAW_OP: u8 = 1 << 3;
    /// Both ports (u32 each) instead of a byte modulo 8 each.
    pub const RAW_PORTS: u8 = 1 << 4;
    /// `len` (u32) instead of the payload length.
    pub const RAW_LEN: u8 = 1 << 5;
}

/// Bits of a laid-out TX packet's shape byte: how its chain looks.
pub mod shape {
    /// Bits 0 and 1: descriptors over the packet's bytes, minus one (1 to 4 descriptors,
    /// cut at the split positions, so some may be empty).
    pub const PIECES: u8 = 0b11;
    /// The descriptors in an indirect table; the ring's descriptor points at it.
    pub const INDIRECT: u8 = 1 << 2;
    /// The last descriptor is device-writable.
    pub const WRITABLE: u8 = 1 << 3;
    /// The last descriptor points into the hole between the RAM regions.
    pub const HOLE: u8 = 1 << 4;
    /// [`TAIL_LEN`](super::TAIL_LEN) bytes after the payload, in the chain.
    pub const TAIL: u8 = 1 << 5;
    /// The chain ends one byte before the packet does.
    pub const SHORT: u8 = 1 << 6;
    /// The last descriptor chains back to the first: the chain never ends.
    pub const LOOP: u8 = 1 << 7;
}

/// The operations; the first byte of each picks one (modulo the count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// A TX packet the harness lays out: mode (u8, [`mode`]), then src_cid (u64), dst_cid
    /// (u64), type (u16) where the mode makes them raw; op (u16 raw, else u8 modulo 8);
    /// src_port and dst_port (u32 each raw, else u8 modulo 8 each); payload length (u16);
    /// len (u32) if raw; flags (u8); buf_alloc (u32); fwd_cnt (u32); shape (u8,
    /// [`shape`]); and a split position (u16, modulo the chain's length plus one) per
    /// descriptor after the first.
    Tx = 0,
    /// A raw TX chain: count (u8, modulo 4, plus one), that many raw descriptors (16 bytes
    /// each) written from the start of the table, the head (u8, modulo twice the queue
    /// size: half of them beyond it).
    RawTx,
    /// The RX packets for buffers with room (u32, modulo 128 KiB) payload bytes, at most
    /// max (u8) of them.
    Rx,
    /// Host socket readiness is handled.
    Poll,
    /// The clock moves by (u16) milliseconds.
    Advance,
}

const OPS: u8 = Op::Advance as u8 + 1;

impl Op {
    /// The op a byte selects.
    pub fn from_byte(b: u8) -> Op {
        match b % OPS {
            0 => Op::Tx,
            1 => Op::RawTx,
            2 => Op::Rx,
            3 => Op::Poll,
            _ => Op::Advance,
        }
    }
}

/// `VIRTIO_VSOCK_OP_*` (virtio 1.2, 5.10.6).
pub mod vsock_op {
    /// Connect.
    pub const REQUEST: u16 = 1;
    /// Accept a connect.
    pub const RESPONSE: u16 = 2;
    /// Refuse or end a connection.
    pub const RST: u16 = 3;
    /// Half-close.
    pub const SHUTDOWN: u16 = 4;
    /// Stream data.
    pub const RW: u16 = 5;
    /// Credit given.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Credit asked for.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `VIRTIO_VSOCK_TYPE_STREAM`.
pub const TYPE_STREAM: u16 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND`.
const SHUTDOWN_BOTH: u32 = 3;

/// Guest memory and the harness's record of everything it wrote there.
struct Guest {
    mem: GuestMemoryMmap<()>,
    model: Snapshot,
    ring: Ring,
    queue: Queue,
    avail_idx: u16,
}

impl Guest {
    fn new() -> Guest {
        let mem = guest::new_mem(0x3c);
        let ring = Ring::at(TX_QUEUE, QUEUE_SIZE);
        ring.clear(&mem);
        let mut queue = Queue::new(QUEUE_SIZE).expect("power of two");
        queue
            .try_set_desc_table_address(GuestAddress(ring.desc))
            .expect("aligned");
        queue
            .try_set_avail_ring_address(GuestAddress(ring.avail))
            .expect("aligned");
        queue
            .try_set_used_ring_address(GuestAddress(ring.used))
            .expect("aligned");
        queue.set_ready(true);
        let model = Snapshot::take(&mem);
        Guest {
            mem,
            model,
            ring,
            queue,
            avail_idx: 0,
        }
    }

    /// Writes `bytes` at `addr` (always RAM here), in memory and in the model.
    fn put(&mut self, addr: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .expect("the harness writes in RAM");
        assert!(self.model.write(addr, bytes), "the model is RAM too");
    }

    /// Makes the chain at `head` available and pops it, as the device does.
    fn send(&mut self, fuzz: &mut FuzzMuxer, head: u16) {
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        self.put(self.ring.avail + 4 + 2 * slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.put(self.ring.avail + 2, &self.avail_idx.to_le_bytes());
        let chain = self
            .queue
            .pop_descriptor_chain(&self.mem)
            .expect("one chain is pending");
        fuzz.tx_chain(&self.mem, chain);
    }
}

/// Reads a laid-out TX packet's header and chain from `input`, writes them into guest
/// memory and sends the chain. Returns the header.
fn tx(input: &mut Input<'_>, g: &mut Guest, fuzz: &mut FuzzMuxer, n: usize) -> Header {
    let m = input.u8();
    let raw = |bit: u8| m & bit != 0;
    let src_cid = if raw(mode::RAW_SRC_CID) {
        input.u64()
    } else {
        GUEST_CID
    };
    let dst_cid = if raw(mode::RAW_DST_CID) {
        input.u64()
    } else {
        HOST_CID
    };
    let type_ = if raw(mode::RAW_TYPE) {
        input.u16()
    } else {
        TYPE_STREAM
    };
    let op = if raw(mode::RAW_OP) {
        input.u16()
    } else {
        u16::from(input.u8() % 8)
    };
    let (src_port, dst_port) = if raw(mode::RAW_PORTS) {
        (input.u32(), input.u32())
    } else {
        (u32::from(input.u8() % 8), u32::from(input.u8() % 8))
    };
    let payload = usize::from(input.u16());
    let len = if raw(mode::RAW_LEN) {
        input.u32()
    } else {
        payload as u32
    };
    let hdr = Header {
        src_cid,
        dst_cid,
        src_port,
        dst_port,
        len,
        type_,
        op,
        flags: u32::from(input.u8()),
        buf_alloc: input.u32(),
        fwd_cnt: input.u32(),
    };
    let s = input.u8();
    let pieces = usize::from(s & shape::PIECES) + 1;

    let mut bytes = hdr.to_bytes().to_vec();
    bytes.extend((0..payload).map(|i| (i as u8).wrapping_mul(31) ^ n as u8));
    if s & shape::TAIL != 0 {
        bytes.extend_from_slice(&[0xa5; TAIL_LEN]);
    }
    g.put(PACKET, &bytes);
    let total = bytes.len() - usize::from(s & shape::SHORT != 0);
    let mut cuts: Vec<usize> = (1..pieces)
        .map(|_| usize::from(input.u16()) % (total + 1))
        .collect();
    cuts.sort_unstable();
    cuts.insert(0, 0);
    cuts.push(total);
    let mut descs: Vec<[u8; 16]> = cuts
        .windows(2)
        .enumerate()
        .map(|(i, w)| {
            let last = i + 1 == pieces;
            let flags = if last { 0 } else { F_NEXT };
            raw_desc(
                PACKET + w[0] as u64,
                (w[1] - w[0]) as u32,
                flags,
                i as u16 + 1,
            )
        })
        .collect();
    let last = descs.last_mut().expect("one descriptor at least");
    if s & shape::WRITABLE != 0 {
        let f = u16::from_le_bytes([last[12], last[13]]) | F_WRITE;
        last[12..14].copy_from_slice(&f.to_le_bytes());
    }
    if s & shape::HOLE != 0 {
        last[0..8].copy_from_slice(&HOLE.to_le_bytes());
    }
    if s & shape::LOOP != 0 {
        let f = u16::from_le_bytes([last[12], last[13]]) | F_NEXT;
        last[12..14].copy_from_slice(&f.to_le_bytes());
        last[14..16].copy_from_slice(&0u16.to_le_bytes());
    }
    if s & shape::INDIRECT != 0 {
        let table: Vec<u8> = descs.iter().flatten().copied().collect();
        g.put(TABLE, &table);
        let d = raw_desc(TABLE, table.len() as u32, F_INDIRECT, 0);
        g.put(g.ring.desc, &d);
    } else {
        for (i, d) in descs.iter().enumerate() {
            g.put(g.ring.desc + 16 * i as u64, d);
        }
    }
    g.send(fuzz, 0);
    hdr
}

/// Checks what the counters did over one operation.
fn check_counters(before: &VsockCounters, fuzz: &FuzzMuxer, op: Op) {
    let c = fuzz.counters();
    let pairs = [
        ("rx_packets", before.rx_packets, c.rx_packets),
        ("rx_bytes", before.rx_bytes, c.rx_bytes),
        ("tx_packets", before.tx_packets, c.tx_packets),
        ("tx_bytes", before.tx_bytes, c.tx_bytes),
        ("conns_added", before.conns_added, c.conns_added),
        ("conns_removed", before.conns_removed, c.conns_removed),
        ("conns_killed", before.conns_killed, c.conns_killed),
        ("tx_errors", before.tx_errors, c.tx_errors),
        ("rx_errors", before.rx_errors, c.rx_errors),
        ("host_errors", before.host_errors, c.host_errors),
        ("host_refused", before.host_refused, c.host_refused),
        ("guest_refused", before.guest_refused, c.guest_refused),
        ("rst_dropped", before.rst_dropped, c.rst_dropped),
    ];
    for (name, was, now) in pairs {
        assert!(
            now >= was,
            "counter {name} went from {was} to {now} ({op:?})"
        );
    }
    assert!(
        c.conns_removed <= c.conns_added,
        "{} connections removed, {} added",
        c.conns_removed,
        c.conns_added
    );
    let count = fuzz.connection_count();
    assert_eq!(
        (c.conns_added - c.conns_removed) as usize,
        count,
        "{} connections added, {} removed, {count} in the table",
        c.conns_added,
        c.conns_removed
    );
    assert!(count <= MAX_CONNECTIONS, "{count} connections");
    let txs = |c: &VsockCounters| c.tx_packets + c.tx_errors;
    if matches!(op, Op::Tx | Op::RawTx) {
        assert!(
            txs(&c) > txs(before),
            "a tx chain neither taken nor refused"
        );
        assert!(
            c.tx_bytes - before.tx_bytes <= u64::from(MAX_PKT_LEN),
            "one chain added {} tx bytes",
            c.tx_bytes - before.tx_bytes
        );
        assert!(
            c.conns_added - before.conns_added <= 1,
            "one chain added {} connections",
            c.conns_added - before.conns_added
        );
    } else {
        assert_eq!(
            (txs(&c), c.tx_bytes, c.conns_added),
            (txs(before), before.tx_bytes, before.conns_added),
            "tx counts or connections added outside a tx chain ({op:?})"
        );
    }
}

/// Checks the headers `rx_packets(room, max)` returned.
fn check_rx(out: &[Header], room: usize, max: usize, requested: Option<&HashSet<(u32, u32)>>) {
    assert!(
        out.len() <= max,
        "{} rx packets, at most {max} asked",
        out.len()
    );
    let room = room.min(MAX_PKT_LEN as usize);
    for h in out {
        assert_eq!(h.dst_cid, GUEST_CID, "rx packet not for the guest: {h:?}");
        assert_eq!(h.type_, TYPE_STREAM, "rx packet not of stream type: {h:?}");
        assert!(
            (vsock_op::RESPONSE..=vsock_op::CREDIT_REQUEST).contains(&h.op),
            "rx packet with op {} (no listener: never a REQUEST): {h:?}",
            h.op
        );
        assert!(
            h.len as usize <= room,
            "rx payload of {} bytes in a buffer with room for {room}: {h:?}",
            h.len
        );
        if h.op != vsock_op::RW {
            assert_eq!(h.len, 0, "a payload on a control packet: {h:?}");
        }
        if h.op == vsock_op::SHUTDOWN {
            assert!(
                h.flags != 0 && h.flags & !SHUTDOWN_BOTH == 0,
                "shutdown flags {:#x}: {h:?}",
                h.flags
            );
        } else {
            assert_eq!(h.flags, 0, "flags on a packet other than SHUTDOWN: {h:?}");
        }
        if h.op == vsock_op::RST {
            continue;
        }
        assert_eq!(h.src_cid, HOST_CID, "rx packet not from the host: {h:?}");
        assert_eq!(h.buf_alloc, BUF_ALLOC, "rx packet's buf_alloc: {h:?}");
        if let Some(req) = requested {
            assert!(
                req.contains(&(h.src_port, h.dst_port)),
                "rx packet on a connection the guest never asked for: {h:?}"
            );
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    logger::start_input();
    let mut input = Input::new(data);
    let mut g = Guest::new();
    let mut fuzz = FuzzMuxer::new(GUEST_CID).expect("epoll and timerfd");
    // (host port, guest port) of every REQUEST laid out; None once a raw chain went.
    let mut requested = Some(HashSet::new());
    let mut ops = 0;
    while !input.is_empty() && ops < MAX_OPS {
        ops += 1;
        let before = fuzz.counters();
        let op = Op::from_byte(input.u8());
        match op {
            Op::Tx => {
                let h = tx(&mut input, &mut g, &mut fuzz, ops);
                if h.op == vsock_op::REQUEST {
                    if let Some(r) = requested.as_mut() {
                        r.insert((h.dst_port, h.src_port));
                    }
                }
            }
            Op::RawTx => {
                let n = u64::from(input.u8() % 4) + 1;
                for i in 0..n {
                    let d = input.array::<16>();
                    g.put(g.ring.desc + 16 * i, &d);
                }
                let head = u16::from(input.u8()) % (2 * QUEUE_SIZE);
                g.send(&mut fuzz, head);
                requested = None;
            }
            Op::Rx => {
                let room = input.u32() as usize % (2 * MAX_PKT_LEN as usize);
                let max = usize::from(input.u8());
                let out = fuzz.rx_packets(room, max);
                check_rx(&out, room, max, requested.as_ref());
            }
            Op::Poll => fuzz.poll_host(),
            Op::Advance => fuzz.advance(Duration::from_millis(u64::from(input.u16()))),
        }
        check_counters(&before, &fuzz, op);
    }
    drop(fuzz);
    let after = Snapshot::take(&g.mem);
    if let Some((addr, want, got)) = g.model.first_difference(&after) {
        panic!("guest memory at {addr:#x} is {got:#04x}, but the harness wrote {want:#04x}: the device wrote there");
    }
}
