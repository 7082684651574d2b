// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Well-formed inputs for every harness, in the layout each one reads, so that a short
//! fuzzing run starts from requests that work. `fuzz/corpus/<target>/seed-*` are these,
//! written by `cargo test --test replay -- --ignored write_seeds` (and checked against
//! this file by `seeds_on_disk_are_current`).

use tvm_virtio::{features, NOTIFY_OFFSET};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};

use crate::guest::{raw_desc, F_INDIRECT, F_NEXT, F_WRITE};
use crate::{vsock, SeedWriter};

/// The fuzz targets, by name (the files in `fuzz_targets/`).
pub const TARGETS: [&str; 13] = [
    "virtqueue",
    "virtio_blk",
    "virtio_rng",
    "virtio_net_tx",
    "virtio_net_rx",
    "vsock",
    "virtio_pci",
    "pci_config",
    "serial",
    "legacy",
    "kernel_loader",
    "cmdline",
    "snapshot",
];

/// Runs the harness of `target` on `data`.
///
/// # Panics
///
/// When an invariant breaks, and for an unknown target.
pub fn run_target(target: &str, data: &[u8]) {
    match target {
        "virtqueue" => crate::virtqueue::run(data),
        "virtio_blk" => crate::virtio_blk::run(data),
        "virtio_rng" => crate::virtio_rng::run(data),
        "virtio_net_tx" => crate::net::run_tx(data),
        "virtio_net_rx" => crate::net::run_rx(data),
        "vsock" => crate::vsock::run(data),
        "virtio_pci" => crate::virtio_pci::run(data),
        "pci_config" => crate::pci::run(data),
        "serial" => crate::serial::run(data),
        "legacy" => crate::legacy::run(data),
        "kernel_loader" => crate::kernel::run(data),
        "cmdline" => crate::cmdline::run(data),
        "snapshot" => crate::snapshot::run(data),
        other => panic!("unknown fuzz target {other}"),
    }
}

/// The seeds of `target`: (file name, contents).
pub fn seeds(target: &str) -> Vec<(&'static str, Vec<u8>)> {
    match target {
        "virtqueue" => virtqueue(),
        "virtio_blk" => virtio_blk(),
        "virtio_rng" => virtio_rng(),
        "virtio_net_tx" => virtio_net_tx(),
        "virtio_net_rx" => virtio_net_rx(),
        "vsock" => vsock(),
        "virtio_pci" => virtio_pci(),
        "pci_config" => pci_config(),
        "serial" => serial(),
        "legacy" => legacy(),
        "kernel_loader" => kernel_loader(),
        "cmdline" => cmdline(),
        "snapshot" => snapshot(),
        _ => Vec::new(),
    }
}

const HDR: u64 = 0x8000;
const DATA: u64 = 0x9000;
const STATUS: u64 = 0xa000;
const TABLE: u64 = 0xb000;

fn descs(w: &mut SeedWriter, d: &[[u8; 16]]) {
    w.u16(d.len() as u16);
    for x in d {
        w.bytes(x);
    }
}

fn blk_header(req: u32, sector: u64) -> Vec<u8> {
    let mut h = req.to_le_bytes().to_vec();
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

/// One blk request per descriptor triple: header, data, status.
fn blk_seed(read_only: bool, reqs: &[(u32, u64, u32, u16)], indirect: bool) -> Vec<u8> {
    let mut w = SeedWriter::new();
    w.u8(4)
        .u64(u64::MAX)
        .u8(64)
        .bool(false)
        .bool(read_only)
        .u16(0);
    let mut table = Vec::new();
    let mut blobs: Vec<(u64, Vec<u8>)> = Vec::new();
    for (i, &(req, sector, len, data_flags)) in reqs.iter().enumerate() {
        let i = i as u64;
        let (hdr, data, status) = (HDR + 0x20 * i, DATA + 0x1000 * i, STATUS + 0x10 * i);
        let base = 3 * i as u16;
        if len > 0 {
            table.push(raw_desc(hdr, 16, F_NEXT, base + 1));
            table.push(raw_desc(data, len, data_flags | F_NEXT, base + 2));
        } else {
            table.push(raw_desc(hdr, 16, F_NEXT, base + 2));
            table.push(raw_desc(data, 0, 0, 0));
        }
        table.push(raw_desc(status, 1, F_WRITE, 0));
        blobs.push((hdr, blk_header(req, sector)));
    }
    if indirect {
        // The whole first request through an indirect table; descriptor 0 points at it.
        let mut t = Vec::new();
        for (k, d) in table[..3].iter().enumerate() {
            let mut d = *d;
            let next = if k < 2 { k as u16 + 1 } else { 0 };
            d[14..16].copy_from_slice(&next.to_le_bytes());
            t.extend_from_slice(&d);
        }
        blobs.push((TABLE, t));
        table[0] = raw_desc(TABLE, 48, F_INDIRECT, 0);
    }
    descs(&mut w, &table);
    let n = reqs.len() as u16;
    w.u16(n);
    for i in 0..n {
        w.u16(3 * i);
    }
    for (addr, b) in blobs {
        w.u32(addr as u32).u8(b.len() as u8).bytes(&b);
    }
    w.finish()
}

fn virtio_blk() -> Vec<(&'static str, Vec<u8>)> {
    let discard_segment = {
        let mut s = 8u64.to_le_bytes().to_vec();
        s.extend_from_slice(&4u32.to_le_bytes());
        s.extend_from_slice(&0u32.to_le_bytes());
        s
    };
    let mut discard = blk_seed(false, &[(VIRTIO_BLK_T_DISCARD, 0, 16, 0)], false);
    // The segment goes where the data descriptor points.
    SeedWriter::new()
        .u32(DATA as u32)
        .u8(16)
        .bytes(&discard_segment)
        .finish()
        .into_iter()
        .for_each(|b| discard.push(b));
    vec![
        (
            "seed-read-write-flush-id",
            blk_seed(
                false,
                &[
                    (VIRTIO_BLK_T_IN, 2, 1024, F_WRITE),
                    (VIRTIO_BLK_T_OUT, 4, 512, 0),
                    (VIRTIO_BLK_T_FLUSH, 0, 0, 0),
                    (VIRTIO_BLK_T_GET_ID, 0, 20, F_WRITE),
                ],
                false,
            ),
        ),
        (
            "seed-indirect-read",
            blk_seed(false, &[(VIRTIO_BLK_T_IN, 0, 4096, F_WRITE)], true),
        ),
        (
            "seed-read-only-write",
            blk_seed(true, &[(VIRTIO_BLK_T_OUT, 0, 512, 0)], false),
        ),
        ("seed-discard", discard),
    ]
}

/// Three requests for the entropy device: one buffer; two buffers in a chain, the second
/// two pieces long and running into the hole after the first RAM region (one piece
/// written); two buffers through an indirect table.
fn virtio_rng() -> Vec<(&'static str, Vec<u8>)> {
    let mut w = SeedWriter::new();
    w.u8(4).u64(u64::MAX).u16(0);
    let indirect = [
        raw_desc(DATA + 0x3000, 32, F_WRITE | F_NEXT, 1),
        raw_desc(DATA + 0x3100, 16, F_WRITE, 0),
    ];
    descs(
        &mut w,
        &[
            raw_desc(DATA, 64, F_WRITE, 0),
            raw_desc(DATA + 0x1000, 100, F_WRITE | F_NEXT, 2),
            raw_desc(0x1_f000, 8192, F_WRITE, 0),
            raw_desc(TABLE, 32, F_INDIRECT, 0),
        ],
    );
    w.u16(3).u16(0).u16(1).u16(3);
    let table: Vec<u8> = indirect.iter().flatten().copied().collect();
    w.u32(TABLE as u32).u8(table.len() as u8).bytes(&table);
    vec![("seed-three-requests", w.finish())]
}

/// A frame for the backend or the guest: vnet header (flags, gso) and a payload.
fn frame(flags: u8, gso: u8, payload: usize) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f[0] = flags;
    f[1] = gso;
    f.extend((0..payload).map(|i| (i * 7) as u8));
    f
}

fn virtio_net_tx() -> Vec<(&'static str, Vec<u8>)> {
    let f1 = frame(0, 0, 60);
    let f2 = frame(1, 0, 1000);
    let mut w = SeedWriter::new();
    w.u8(4).u64(u64::MAX).u8(0);
    descs(
        &mut w,
        &[
            raw_desc(DATA, f1.len() as u32, 0, 0),
            raw_desc(DATA + 0x1000, 12, F_NEXT, 2),
            raw_desc(DATA + 0x1100, 500, F_NEXT, 3),
            raw_desc(DATA + 0x1400, 500, 0, 0),
            raw_desc(DATA + 0x2000, 64, F_WRITE, 0),
        ],
    );
    w.u16(3).u16(0).u16(1).u16(4);
    w.u32(DATA as u32).u16(f1.len() as u16).bytes(&f1);
    w.u32((DATA + 0x1000) as u32).u16(12).bytes(&f2[..12]);
    w.u32((DATA + 0x1100) as u32).u16(500).bytes(&f2[12..512]);
    w.u32((DATA + 0x1400) as u32).u16(500).bytes(&f2[512..]);
    let simple = w.finish();

    let mut w = SeedWriter::new();
    w.u8(3).u64(u64::MAX).u8(2);
    let mut table = Vec::new();
    table.extend_from_slice(&raw_desc(DATA, 12, F_NEXT, 1));
    table.extend_from_slice(&raw_desc(DATA + 0x100, 100, 0, 0));
    descs(
        &mut w,
        &[
            raw_desc(TABLE, 32, F_INDIRECT, 0),
            raw_desc(DATA, 112, 0, 0),
        ],
    );
    w.u16(2).u16(0).u16(1);
    w.u32(TABLE as u32).u16(32).bytes(&table);
    vec![
        ("seed-three-frames", simple),
        ("seed-indirect-refused", w.finish()),
    ]
}

fn virtio_net_rx() -> Vec<(&'static str, Vec<u8>)> {
    let one = |w: &mut SeedWriter, hdr_flags: u8, gso: u8, len: u32, seed: u8| {
        let mut h = [0u8; 12];
        h[0] = hdr_flags;
        h[1] = gso;
        w.bytes(&h).u32(len).u8(seed);
    };
    let mut seeds = Vec::new();
    for (name, size_log2, mergeable, buf_len) in [
        ("seed-mergeable", 4u8, true, 1024u32),
        ("seed-big-buffers", 3, false, 4096),
    ] {
        let wanted = if mergeable {
            u64::MAX
        } else {
            !(1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF)
        };
        let mut w = SeedWriter::new();
        w.u8(size_log2).u64(wanted).u8(3);
        one(&mut w, 0, 0, 74, 1);
        one(&mut w, 1, 0, 1526, 2);
        one(&mut w, 0, 1, 3000, 3);
        let n = 1u16 << size_log2;
        let list: Vec<[u8; 16]> = (0..n)
            .map(|i| {
                raw_desc(
                    DATA + u64::from(buf_len) * u64::from(i),
                    buf_len,
                    F_WRITE,
                    0,
                )
            })
            .collect();
        descs(&mut w, &list);
        // Round 1: two buffers; round 2: the rest.
        w.u8(2).u16(0).u16(1).u8(0);
        w.u8(4);
        for i in 2..6u16 {
            w.u16(i);
        }
        w.u8(0);
        seeds.push((name, w.finish()));
    }
    seeds
}

/// A TX packet in `tvm_fuzz::vsock`'s layout: from the guest's CID to the host's, of
/// stream type, unless `mode` makes fields raw.
#[derive(Debug, Clone, Copy, Default)]
struct VsockTx {
    mode: u8,
    src_cid: u64,
    dst_cid: u64,
    type_: u16,
    op: u16,
    src_port: u32,
    dst_port: u32,
    payload: u16,
    len: u32,
    flags: u8,
    buf_alloc: u32,
    fwd_cnt: u32,
    shape: u8,
    splits: [u16; 3],
}

impl VsockTx {
    /// `op` from guest port `src` to host port `dst` (each below 8), with the device's
    /// own `buf_alloc` as the guest's credit.
    fn new(op: u16, src: u32, dst: u32) -> Self {
        VsockTx {
            op,
            src_port: src,
            dst_port: dst,
            buf_alloc: tvm_vsock::BUF_ALLOC,
            ..Self::default()
        }
    }

    fn payload(self, payload: u16) -> Self {
        VsockTx { payload, ..self }
    }

    fn flags(self, flags: u8) -> Self {
        VsockTx { flags, ..self }
    }

    /// The chain's shape and the split positions after its first descriptor.
    fn shape(self, shape: u8, splits: &[u16]) -> Self {
        let mut s = [0; 3];
        s[..splits.len()].copy_from_slice(splits);
        VsockTx {
            shape: shape | (splits.len() as u8 & vsock::shape::PIECES),
            splits: s,
            ..self
        }
    }

    fn write(&self, w: &mut SeedWriter) {
        use vsock::mode::*;
        w.u8(vsock::Op::Tx as u8).u8(self.mode);
        if self.mode & RAW_SRC_CID != 0 {
            w.u64(self.src_cid);
        }
        if self.mode & RAW_DST_CID != 0 {
            w.u64(self.dst_cid);
        }
        if self.mode & RAW_TYPE != 0 {
            w.u16(self.type_);
        }
        if self.mode & RAW_OP != 0 {
            w.u16(self.op);
        } else {
            w.u8(self.op as u8);
        }
        if self.mode & RAW_PORTS != 0 {
            w.u32(self.src_port).u32(self.dst_port);
        } else {
            w.u8(self.src_port as u8).u8(self.dst_port as u8);
        }
        w.u16(self.payload);
        if self.mode & RAW_LEN != 0 {
            w.u32(self.len);
        }
        w.u8(self.flags)
            .u32(self.buf_alloc)
            .u32(self.fwd_cnt)
            .u8(self.shape);
        for s in &self.splits[..usize::from(self.shape & vsock::shape::PIECES)] {
            w.u16(*s);
        }
    }
}

fn vsock_rx(w: &mut SeedWriter, room: u32, max: u8) {
    w.u8(vsock::Op::Rx as u8).u32(room).u8(max);
}

fn vsock_advance(w: &mut SeedWriter, ms: u16) {
    w.u8(vsock::Op::Advance as u8).u16(ms);
}

fn vsock_poll(w: &mut SeedWriter) {
    w.u8(vsock::Op::Poll as u8);
}

fn vsock_raw(w: &mut SeedWriter, descs: &[[u8; 16]], head: u8) {
    w.u8(vsock::Op::RawTx as u8).u8(descs.len() as u8 - 1);
    for d in descs {
        w.bytes(d);
    }
    w.u8(head);
}

/// A connection's life (data, credit, half and full shutdown, RSTs); the host stream
/// filled past the device's buffer (a credit overrun) and a close whose data never drains
/// (the flush timeout); every kind of malformed packet and chain.
fn vsock() -> Vec<(&'static str, Vec<u8>)> {
    use vsock::shape::{HOLE, INDIRECT, LOOP, SHORT, TAIL, WRITABLE};
    use vsock::vsock_op::*;

    let mut w = SeedWriter::new();
    VsockTx::new(REQUEST, 1, 2).write(&mut w);
    vsock_rx(&mut w, 4096, 16);
    VsockTx::new(RW, 1, 2)
        .payload(1000)
        .shape(0, &[20, 500])
        .write(&mut w);
    VsockTx::new(CREDIT_REQUEST, 1, 2).write(&mut w);
    vsock_rx(&mut w, 4096, 16);
    VsockTx::new(CREDIT_UPDATE, 1, 2).write(&mut w);
    VsockTx::new(RW, 1, 2)
        .payload(300)
        .shape(INDIRECT, &[44])
        .write(&mut w);
    // A second connection: data after its own SHUTDOWN(SEND) resets it.
    VsockTx::new(REQUEST, 3, 4).write(&mut w);
    VsockTx::new(SHUTDOWN, 3, 4).flags(2).write(&mut w);
    VsockTx::new(RW, 3, 4).payload(10).write(&mut w);
    vsock_rx(&mut w, 4096, 16);
    // The first: half-closed, then closed (answered with an RST), then unknown.
    VsockTx::new(SHUTDOWN, 1, 2).flags(1).write(&mut w);
    vsock_poll(&mut w);
    VsockTx::new(SHUTDOWN, 1, 2).flags(3).write(&mut w);
    vsock_rx(&mut w, 4096, 16);
    VsockTx::new(RW, 1, 2).payload(5).write(&mut w);
    VsockTx::new(RST, 1, 2).write(&mut w);
    vsock_rx(&mut w, 0, 255);
    vsock_advance(&mut w, 3000);
    vsock_poll(&mut w);
    vsock_rx(&mut w, 4096, 16);
    let life = w.finish();

    let mut w = SeedWriter::new();
    VsockTx::new(REQUEST, 5, 6).write(&mut w);
    vsock_rx(&mut w, 4096, 16);
    for i in 0..9 {
        let p = VsockTx::new(RW, 5, 6).payload(u16::MAX);
        let p = if i % 2 == 0 {
            p
        } else {
            p.shape(INDIRECT, &[44, 30000, 60000])
        };
        p.write(&mut w);
        vsock_poll(&mut w);
        vsock_rx(&mut w, 65536, 4);
    }
    VsockTx::new(REQUEST, 7, 0).write(&mut w);
    for _ in 0..4 {
        VsockTx::new(RW, 7, 0).payload(u16::MAX).write(&mut w);
    }
    VsockTx::new(SHUTDOWN, 7, 0).flags(3).write(&mut w);
    vsock_rx(&mut w, 4096, 16);
    vsock_advance(&mut w, 9000);
    vsock_rx(&mut w, 4096, 16);
    vsock_poll(&mut w);
    let full = w.finish();

    use vsock::mode::{RAW_DST_CID, RAW_LEN, RAW_OP, RAW_PORTS, RAW_SRC_CID, RAW_TYPE};
    let mut w = SeedWriter::new();
    let base = VsockTx::new(REQUEST, 1, 2);
    for p in [
        VsockTx {
            mode: RAW_SRC_CID,
            src_cid: 7,
            ..base
        },
        VsockTx {
            mode: RAW_DST_CID,
            dst_cid: 9,
            ..base
        },
        VsockTx {
            mode: RAW_TYPE,
            type_: 2,
            ..base
        },
        VsockTx {
            mode: RAW_OP,
            op: 0x100,
            ..base
        },
        VsockTx { op: 0, ..base },
        VsockTx {
            mode: RAW_LEN,
            len: 100,
            ..base.payload(10)
        },
        VsockTx {
            mode: RAW_LEN,
            len: tvm_vsock::MAX_PKT_LEN + 1,
            ..base.payload(u16::MAX)
        },
        VsockTx {
            mode: RAW_PORTS,
            src_port: u32::MAX,
            dst_port: tvm_vsock::FIRST_LOCAL_PORT,
            ..base
        },
        VsockTx {
            mode: RAW_PORTS,
            op: RW,
            src_port: u32::MAX,
            dst_port: tvm_vsock::FIRST_LOCAL_PORT,
            ..base.payload(100)
        },
        base.payload(8).shape(WRITABLE, &[44]),
        base.shape(HOLE, &[]),
        base.shape(SHORT, &[]),
        base.payload(4).shape(SHORT, &[20]),
        base.shape(LOOP, &[22]),
        base.shape(INDIRECT | LOOP, &[22]),
        VsockTx::new(RW, 1, 2)
            .payload(50)
            .shape(TAIL | INDIRECT, &[0, 0, 44]),
    ] {
        p.write(&mut w);
    }
    vsock_rx(&mut w, 0, 255);
    vsock_rx(&mut w, 0x1_ffff, 4);
    let pkt = vsock::PACKET;
    vsock_raw(
        &mut w,
        &[
            raw_desc(pkt, 44, F_NEXT, 1),
            raw_desc(pkt + 44, 16, F_NEXT, 0),
        ],
        0,
    );
    vsock_raw(&mut w, &[raw_desc(pkt, 44, 0, 0)], 20);
    vsock_raw(&mut w, &[raw_desc(vsock::TABLE, 17, F_INDIRECT, 0)], 0);
    vsock_rx(&mut w, 4096, 255);
    vsock_advance(&mut w, u16::MAX);
    vsock_poll(&mut w);
    vsock_rx(&mut w, 4096, 255);

    vec![
        ("seed-connection-life", life),
        ("seed-fill-host-stream", full),
        ("seed-malformed", w.finish()),
    ]
}

/// The dword index of the MSI-X capability of a virtio-pci device (the transport's fixed
/// capability layout).
fn msix_cap_reg() -> u8 {
    use tvm_bus::PciDevice;
    let (backend, _) = crate::net::MemBackend::new();
    let mut dev = tvm_virtio::VirtioPciDevice::new(
        tvm_virtio_net::Net::new(backend, [2, 0, 0, 0, 0, 1]),
        crate::guest::new_mem(0),
        std::sync::Arc::new(crate::guest::RecordingSink::default()),
    )
    .expect("transport");
    let mut ptr = dev.config_read(13) & 0xfc;
    loop {
        let reg = dev.config_read(ptr as usize / 4);
        if reg & 0xff == 0x11 {
            return (ptr / 4) as u8;
        }
        ptr = (reg >> 8) & 0xfc;
    }
}

fn virtio_pci() -> Vec<(&'static str, Vec<u8>)> {
    use crate::virtio_pci::Op;
    let msix = msix_cap_reg();
    let op = |w: &mut SeedWriter, o: Op| {
        w.u8(o as u8);
    };
    let mut seeds = Vec::new();
    for (name, kind) in [("seed-net", 0u8), ("seed-blk", 1)] {
        let mut w = SeedWriter::new();
        w.u8(kind);
        let queues = if kind == 0 { 2 } else { 1 };
        op(&mut w, Op::BringUp);
        w.u64(u64::MAX);
        for _ in 0..queues {
            w.u8(4);
        }
        // MSI-X on, vectors: config 0, queue 0 -> 1, queue 1 -> 2, all unmasked.
        op(&mut w, Op::ConfigWrite);
        w.u8(msix).u8(2).u8(1).u32(0x8000);
        for v in 0..3u8 {
            op(&mut w, Op::MsixWrite);
            w.u8(16 * v + 12).u8(2).u64(0);
        }
        op(&mut w, Op::CommonWrite);
        w.u8(0x10).u8(1).u64(0);
        for q in 0..queues as u64 {
            op(&mut w, Op::CommonWrite);
            w.u8(0x16).u8(1).u64(q);
            op(&mut w, Op::CommonWrite);
            w.u8(0x1a).u8(1).u64(q + 1);
        }
        // A transmit frame (net) or a flush request (blk) on the last queue, kicked.
        let q = if kind == 0 { 1u16 } else { 0 };
        let ring = 0x4000 * u64::from(q);
        op(&mut w, Op::Memory);
        let mut table = raw_desc(HDR, 16, F_NEXT, 1).to_vec();
        table.extend_from_slice(&raw_desc(STATUS, 1, F_WRITE, 0));
        if kind == 0 {
            table = raw_desc(HDR, 60, 0, 0).to_vec();
        }
        w.u16(ring as u16).u8(table.len() as u8).bytes(&table);
        op(&mut w, Op::Memory);
        w.u16(HDR as u16)
            .u8(16)
            .bytes(&blk_header(VIRTIO_BLK_T_FLUSH, 0));
        op(&mut w, Op::Memory);
        w.u16((ring + 0x1000) as u16)
            .u8(6)
            .bytes(&[0, 0, 1, 0, 0, 0]);
        op(&mut w, Op::Notify);
        w.u8((NOTIFY_OFFSET as u8).wrapping_add(4 * q as u8)).u8(1);
        op(&mut w, Op::Frame);
        let f = frame(0, 0, 50);
        w.u8(f.len() as u8).bytes(&f);
        // Reset in the middle, then again from the start.
        op(&mut w, Op::Status);
        w.u8(0);
        op(&mut w, Op::BringUp);
        w.u64(features::VERSION_1);
        for s in [8, 0].iter().take(queues) {
            w.u8(*s);
        }
        op(&mut w, Op::Process);
        w.u8(0);
        seeds.push((name, w.finish()));
    }
    seeds
}

fn pci_config() -> Vec<(&'static str, Vec<u8>)> {
    let latch = |w: &mut SeedWriter, slot: u32, reg: u32| {
        w.u8(2).u32(0x8000_0000 | slot << 11 | reg << 2);
    };
    let mut w = SeedWriter::new();
    for slot in 0..4 {
        latch(&mut w, slot, 0);
        w.u8(1).u8(4).u8(2);
    }
    // Size and program every BAR of slot 1 and the virtio BAR of slot 2.
    for (slot, reg) in [(1, 4), (1, 5), (1, 6), (1, 7), (2, 4), (2, 5)] {
        latch(&mut w, slot, reg);
        w.u8(0).u8(4).u8(2).u32(u32::MAX);
        w.u8(1).u8(4).u8(2);
        w.u8(0).u8(4).u8(2).u32(0xc000_0000);
    }
    // Command register, byte and word writes.
    latch(&mut w, 2, 1);
    w.u8(0).u8(4).u8(1).u32(0x0406);
    w.u8(0).u8(6).u8(0).u32(0xff);
    // The window: map, access, move, unmap.
    w.u8(3).u32(0xc000_0000).u8(15).u8(0);
    w.u8(3).u32(0xc000_8000).u8(12).u8(1);
    w.u8(5).u32(0xc000_0010).u8(2);
    w.u8(6).u32(0xc000_8ffc).u8(3);
    w.u8(4).u32(0xc000_0000);
    w.u8(5).u32(0xc000_0010).u8(2);
    vec![("seed-bars-and-window", w.finish())]
}

fn serial() -> Vec<(&'static str, Vec<u8>)> {
    let mut w = SeedWriter::new();
    // IER: receive and THRE interrupts; LCR 8N1; "hi" out.
    w.u8(0).u8(1).u8(0x03);
    w.u8(0).u8(3).u8(0x03);
    for &b in b"hi\n" {
        w.u8(0).u8(0).u8(b);
    }
    // Input with escapes, the loop, then the guest reads LSR and RBR.
    let input = b"ls\r\x01\x01a\x01b";
    w.u8(3).u8(input.len() as u8).bytes(input);
    w.u8(4);
    for _ in 0..8 {
        w.u8(1).u8(5);
        w.u8(1).u8(0);
    }
    w.u8(1).u8(2);
    // Divisor latch access, odd widths, then close.
    w.u8(0).u8(3).u8(0x83);
    w.u8(0).u8(0).u8(0x01);
    w.u8(0).u8(3).u8(0x03);
    w.u8(2).u8(0).u8(1).u8(1);
    w.u8(5);
    w.u8(4);
    let plain = w.finish();

    let mut w = SeedWriter::new();
    let big: Vec<u8> = (0..200u8).map(|i| b'a' + i % 26).collect();
    w.u8(3).u8(200).bytes(&big);
    w.u8(4).u8(4);
    w.u8(3).u8(3).bytes(b"\x01x!");
    w.u8(4);
    vec![
        ("seed-registers-and-input", plain),
        ("seed-fill-and-exit", w.finish()),
    ]
}

/// One port access in `tvm_fuzz::legacy`'s layout (a one-byte access unless `width` says).
fn port_access(w: &mut SeedWriter, port: u16, width: u8, write: Option<u32>) {
    let sel = crate::legacy::PORTS
        .iter()
        .position(|&p| p == port)
        .expect("a listed port") as u8;
    let width_sel = match width {
        1 => 0,
        2 => 1,
        _ => 2,
    };
    w.u8(u8::from(write.is_some())).u8(sel).u8(width_sel);
    if let Some(v) = write {
        w.u32(v);
    }
}

fn legacy() -> Vec<(&'static str, Vec<u8>)> {
    // Linux's i8042 probe: flush, self test, read and write the control register, the aux
    // loopback with its status bit, the mux probe, then a reset.
    let mut w = SeedWriter::new();
    let (data, cmd) = (0x60, 0x64);
    port_access(&mut w, cmd, 1, None);
    port_access(&mut w, data, 1, None);
    for (c, param) in [(0xaa, None), (0x20, None), (0x60, Some(0x65)), (0x20, None)] {
        port_access(&mut w, cmd, 1, Some(c));
        if let Some(p) = param {
            port_access(&mut w, data, 1, Some(p));
        }
        port_access(&mut w, cmd, 1, None);
        port_access(&mut w, data, 1, None);
    }
    for v in [0x5a, 0xf0, 0x56, 0xa4] {
        port_access(&mut w, cmd, 1, Some(0xd3));
        port_access(&mut w, data, 1, Some(v));
        port_access(&mut w, cmd, 1, None);
        port_access(&mut w, data, 1, None);
    }
    for c in [0xa7, 0xa8, 0xad, 0xae, 0xa9, 0xab, 0xd2] {
        port_access(&mut w, cmd, 1, Some(c));
        port_access(&mut w, cmd, 1, None);
    }
    port_access(&mut w, data, 1, Some(0x42));
    port_access(&mut w, data, 1, None);
    port_access(&mut w, cmd, 1, Some(0xfe));
    let i8042 = w.finish();

    // rtc-cmos: the clock registers with the NMI bit set, NVRAM, then the PM1 block as
    // ACPICA drives it (enable, SLP_TYP, SLP_TYP | SLP_EN as a word), and pvpanic.
    let mut w = SeedWriter::new();
    for reg in [
        0x0d, 0x0a, 0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32, 0x0b, 0x0c,
    ] {
        port_access(&mut w, 0x70, 1, Some(0x80 | reg));
        port_access(&mut w, 0x71, 1, None);
    }
    port_access(&mut w, 0x70, 1, Some(0x40));
    port_access(&mut w, 0x71, 1, Some(0xab));
    port_access(&mut w, 0x71, 1, None);
    port_access(&mut w, 0x70, 1, None);
    port_access(&mut w, 0x80, 1, Some(0));
    port_access(&mut w, 0x600, 4, None);
    port_access(&mut w, 0x602, 2, Some(0x0120));
    port_access(&mut w, 0x604, 2, Some(0x1401));
    port_access(&mut w, 0x604, 2, None);
    port_access(&mut w, 0x604, 2, Some(0x3401));
    port_access(&mut w, 0x605, 1, Some(0x34));
    port_access(&mut w, 0x505, 1, None);
    port_access(&mut w, 0x505, 1, Some(2));
    port_access(&mut w, 0x505, 1, Some(1));
    port_access(&mut w, 0x606, 1, Some(0));
    port_access(&mut w, 0x604, 4, Some(0));
    vec![
        ("seed-i8042-probe", i8042),
        ("seed-rtc-pm-pvpanic", w.finish()),
    ]
}

/// A minimal bzImage: the setup header at 0x1f1 and 4 KiB of "kernel".
fn bzimage() -> Vec<u8> {
    let mut img = vec![0u8; 5 * 512 + 4096];
    img[0x1f1] = 4; // setup_sects
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x211] = 1; // loadflags: LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    img[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
    img[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
    img
}

/// A minimal ELF64 vmlinux: one PT_LOAD of 4 KiB at 2 MiB, entered there.
fn elf() -> Vec<u8> {
    let mut e = vec![0u8; 0x78];
    e[0..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // 64-bit
    e[5] = 1; // little endian
    e[6] = 1; // version
    e[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[0x12..0x14].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    e[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
    e[0x18..0x20].copy_from_slice(&0x20_0000u64.to_le_bytes()); // entry
    e[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes()); // phoff
    e[0x34..0x36].copy_from_slice(&0x40u16.to_le_bytes()); // ehsize
    e[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes()); // phentsize
    e[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let ph = 0x40;
    e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes()); // offset
    e[ph + 16..ph + 24].copy_from_slice(&0x20_0000u64.to_le_bytes()); // vaddr
    e[ph + 24..ph + 32].copy_from_slice(&0x20_0000u64.to_le_bytes()); // paddr
    e[ph + 32..ph + 40].copy_from_slice(&0x1000u64.to_le_bytes()); // filesz
    e[ph + 40..ph + 48].copy_from_slice(&0x2000u64.to_le_bytes()); // memsz
    e.resize(0x2000, 0x90);
    e
}

fn kernel_loader() -> Vec<(&'static str, Vec<u8>)> {
    let cmd = b"console=ttyS0 reboot=k panic=1 pci=conf1";
    let with = |img: Vec<u8>, ram_mib: u16, initrd_pages: u32| {
        SeedWriter::new()
            .u16(ram_mib)
            .u32(initrd_pages)
            .u8(cmd.len() as u8)
            .bytes(cmd)
            .bytes(&img)
            .finish()
    };
    vec![
        ("seed-bzimage", with(bzimage(), 512, 256)),
        ("seed-elf", with(elf(), 4096, 1)),
        ("seed-elf-huge-initrd", with(elf(), 16, 4000)),
    ]
}

fn snapshot() -> Vec<(&'static str, Vec<u8>)> {
    let example = tvm_snapshot::Snapshot::example();
    let file = tvm_snapshot::encode(&example).expect("the example encodes");
    let with = |fixup: bool, file: &[u8]| SeedWriter::new().bool(fixup).bytes(file).finish();
    let second = tvm_snapshot::encode(&tvm_snapshot::Snapshot::example_with(2)).expect("encodes");
    vec![
        ("seed-example", with(false, &file)),
        ("seed-example-fixup", with(true, &file)),
        ("seed-two-vcpus-fixup", with(true, &second)),
    ]
}

fn cmdline() -> Vec<(&'static str, Vec<u8>)> {
    let with = |header: bool, version: u16, size: u32, text: &[u8]| {
        SeedWriter::new()
            .bool(header)
            .u16(version)
            .u32(size)
            .bytes(text)
            .finish()
    };
    vec![
        (
            "seed-default",
            with(false, 0, 0, b"console=ttyS0 reboot=k panic=1 pci=conf1"),
        ),
        (
            "seed-header-init-args",
            with(
                true,
                0x020f,
                64,
                b"console=ttyS0 quiet -- init=/bin/sh \"a -- b\"",
            ),
        ),
        ("seed-old-protocol", with(true, 0x0205, 0, &[b'x'; 255])),
    ]
}

fn virtqueue() -> Vec<(&'static str, Vec<u8>)> {
    let mut w = SeedWriter::new();
    w.u8(4).bool(true).u16(0xfffe).u16(0xfffe);
    descs(
        &mut w,
        &[
            raw_desc(DATA, 100, F_NEXT, 1),
            raw_desc(DATA + 0x100, 200, F_WRITE, 0),
            raw_desc(TABLE, 48, F_INDIRECT, 0),
            raw_desc(DATA + 0x200, 10, F_NEXT, 2),
        ],
    );
    // flags, idx (three pending from 0xfffe), used_event; entries 0, 2, 3.
    w.u16(0).u16(1).u16(0).u16(0).u16(2).u16(3);
    let mut table = Vec::new();
    table.extend_from_slice(&raw_desc(DATA + 0x300, 16, F_NEXT, 1));
    table.extend_from_slice(&raw_desc(DATA + 0x400, 32, F_WRITE | F_NEXT, 2));
    table.extend_from_slice(&raw_desc(DATA + 0x500, 64, F_WRITE, 0));
    w.u8(1).u32(TABLE as u32).u16(48).bytes(&table);
    // pop x3, return x2, rewind, pop, notifications, more entries, pop, return.
    w.u8(0).u8(0).u8(0);
    w.u8(1).u32(300).u8(1).u32(0);
    w.u8(2).u8(0);
    w.u8(3).bool(true).u8(4).u8(3).bool(false);
    w.u8(5).u8(2).u16(1).u16(0);
    w.u8(0).u8(0).u8(1).u32(7).u8(1).u32(8).u8(4);
    vec![("seed-wrap-indirect", w.finish())]
}
