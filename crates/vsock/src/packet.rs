// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The packet header (virtio 1.2, 5.10.6, `struct virtio_vsock_hdr`) and the moves between
//! descriptor chains and the device: a TX chain read into a header and a payload, an RX
//! chain written with one, an event written into an event-queue chain.
//!
//! Any chain layout is accepted: the header may be split over descriptors and the payload
//! spread over many of them. Linux puts the header and the payload in one descriptor since
//! 6.2 (RX and TX), in two before, and sends a header plus one descriptor per page fragment
//! for `MSG_ZEROCOPY` (6.7); `virtio_vsock::packet::VsockPacket` handles the first two only,
//! so this module reads the chain itself and keeps that crate's header size and layout
//! (checked against it in the tests).

use std::fmt;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// Bytes of the packet header (`virtio_vsock_hdr`, packed): 44.
pub const HEADER_LEN: usize = virtio_vsock::packet::PKT_HEADER_SIZE;

/// The host's context ID: every packet from the guest must be for it (virtio 1.2, 5.10.4).
pub const HOST_CID: u64 = 2;

/// Largest payload of one packet in either direction, the Linux driver's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`; a TX packet with a longer `len` is refused.
pub const MAX_PKT_LEN: u32 = 64 * 1024;

/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type the device supports.
pub(crate) const TYPE_STREAM: u16 = 1;

/// `VIRTIO_VSOCK_SHUTDOWN_RCV`: the sender will receive no more data.
pub(crate) const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_SEND`: the sender will send no more data.
pub(crate) const SHUTDOWN_SEND: u32 = 2;
/// Both shutdown flags.
pub(crate) const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, the one event id (virtio 1.2, 5.10.6.5).
pub(crate) const EVENT_TRANSPORT_RESET: u32 = 0;
/// Bytes of `struct virtio_vsock_event` (one le32 id).
pub(crate) const EVENT_LEN: usize = 4;

/// Packet operations (`VIRTIO_VSOCK_OP_*`).
pub(crate) mod op {
    /// Connect.
    pub const REQUEST: u16 = 1;
    /// Accept a connect.
    pub const RESPONSE: u16 = 2;
    /// Refuse or end a connection.
    pub const RST: u16 = 3;
    /// Half-close, flags say which halves.
    pub const SHUTDOWN: u16 = 4;
    /// Stream data.
    pub const RW: u16 = 5;
    /// "Here is my buf_alloc and fwd_cnt."
    pub const CREDIT_UPDATE: u16 = 6;
    /// "Send me your buf_alloc and fwd_cnt."
    pub const CREDIT_REQUEST: u16 = 7;

    /// Whether `op` is one of the above.
    pub fn is_known(op: u16) -> bool {
        (REQUEST..=CREDIT_REQUEST).contains(&op)
    }
}

/// The packet header, fields in host order (they are little endian in guest memory).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context ID.
    pub src_cid: u64,
    /// Destination context ID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload bytes after the header.
    pub len: u32,
    /// Socket type (`VIRTIO_VSOCK_TYPE_*`).
    pub type_: u16,
    /// Operation (`VIRTIO_VSOCK_OP_*`).
    pub op: u16,
    /// Shutdown flags for SHUTDOWN; 0 otherwise.
    pub flags: u32,
    /// Receive buffer space of the sender for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from this connection.
    pub fwd_cnt: u32,
}

fn le16(b: &[u8; HEADER_LEN], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8; HEADER_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8; HEADER_LEN], at: usize) -> u64 {
    u64::from(le32(b, at)) | u64::from(le32(b, at + 4)) << 32
}

impl Header {
    /// Decodes the header's wire form.
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Header {
        Header {
            src_cid: le64(b, 0),
            dst_cid: le64(b, 8),
            src_port: le32(b, 16),
            dst_port: le32(b, 20),
            len: le32(b, 24),
            type_: le16(b, 28),
            op: le16(b, 30),
            flags: le32(b, 32),
            buf_alloc: le32(b, 36),
            fwd_cnt: le32(b, 40),
        }
    }

    /// The header's wire form.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// One buffer of a chain: guest address and length.
pub(crate) type Seg = (GuestAddress, usize);

/// Collects the descriptors of `chain` into `segs` (cleared first) and returns their total
/// length. They must all be device-writable (`write`) or all device-readable, each inside
/// guest memory, and the chain must end.
pub(crate) fn gather<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    write: bool,
    segs: &mut Vec<Seg>,
) -> Result<usize, String> {
    segs.clear();
    let mut total = 0usize;
    let mut last_has_next = false;
    let perm = if write {
        Permissions::Write
    } else {
        Permissions::Read
    };
    for d in chain {
        last_has_next = d.has_next();
        if d.is_write_only() != write {
            return Err(format!(
                "a device-{} buffer ({} bytes at {:#x}) where only device-{} ones belong",
                if write { "readable" } else { "writable" },
                d.len(),
                d.addr().0,
                if write { "writable" } else { "readable" },
            ));
        }
        let len = d.len() as usize;
        if len == 0 {
            continue;
        }
        if !mem.check_range(d.addr(), len, perm) {
            return Err(format!(
                "a buffer of {len} bytes at {:#x} is not in guest memory",
                d.addr().0
            ));
        }
        total = total.saturating_add(len);
        segs.push((d.addr(), len));
    }
    if last_has_next {
        // virtio-queue stops a chain after a queue size of descriptors (a loop) and before
        // a descriptor it cannot read.
        return Err("the descriptor chain loops, or is cut short by virtio-queue".into());
    }
    Ok(total)
}

/// Runs `f(address, range in buf)` for each piece of the `buf.len()` bytes at logical
/// `offset` of the chain `segs`; false when the chain is too short.
fn for_pieces(
    segs: &[Seg],
    mut offset: usize,
    len: usize,
    mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> bool,
) -> bool {
    let mut done = 0usize;
    for &(addr, seg_len) in segs {
        if done == len {
            break;
        }
        if offset >= seg_len {
            offset -= seg_len;
            continue;
        }
        let n = (seg_len - offset).min(len - done);
        // The segment was checked to lie in guest memory, so the sum does not overflow.
        let Some(at) = addr.checked_add(offset as u64) else {
            return false;
        };
        if !f(at, done..done + n) {
            return false;
        }
        done += n;
        offset = 0;
    }
    done == len
}

/// Reads `buf.len()` bytes at logical `offset` of the chain `segs`.
fn read_at<M: GuestMemory>(mem: &M, segs: &[Seg], offset: usize, buf: &mut [u8]) -> bool {
    let len = buf.len();
    for_pieces(segs, offset, len, |at, r| {
        mem.read_slice(&mut buf[r], at).is_ok()
    })
}

/// Writes `buf` at logical `offset` of the chain `segs`.
fn write_at<M: GuestMemory>(mem: &M, segs: &[Seg], offset: usize, buf: &[u8]) -> bool {
    for_pieces(segs, offset, buf.len(), |at, r| {
        mem.write_slice(&buf[r], at).is_ok()
    })
}

/// Why a TX chain is not a packet the device can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum TxError {
    /// Not a packet: a bad descriptor or a chain shorter than the header. Nothing in it
    /// can be trusted, so nothing is answered.
    Chain(String),
    /// A header whose `len` is above [`MAX_PKT_LEN`] or above the bytes the chain carries
    /// after the header (`have`).
    Len {
        /// The header as read.
        hdr: Header,
        /// Payload bytes in the chain.
        have: usize,
    },
}

impl fmt::Display for TxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TxError::Chain(why) => f.write_str(why),
            TxError::Len { hdr, have } => write!(
                f,
                "packet op {} len {} with {have} payload bytes in the chain (at most {MAX_PKT_LEN})",
                hdr.op, hdr.len
            ),
        }
    }
}

/// Reads the packet in TX chain `chain`: returns its header, with its `len` payload bytes
/// in `data` (resized to fit, which never allocates when its capacity is at least
/// [`MAX_PKT_LEN`]). Bytes in the chain past `len` are ignored.
pub(crate) fn read_tx<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    segs: &mut Vec<Seg>,
    data: &mut Vec<u8>,
) -> Result<Header, TxError> {
    data.clear();
    let total = gather(mem, chain, false, segs).map_err(TxError::Chain)?;
    if total < HEADER_LEN {
        return Err(TxError::Chain(format!(
            "a chain of {total} bytes, shorter than the {HEADER_LEN}-byte header"
        )));
    }
    let mut raw = [0u8; HEADER_LEN];
    if !read_at(mem, segs, 0, &mut raw) {
        // Every segment was checked against guest memory: not reached while the memory
        // map stays as it is.
        return Err(TxError::Chain("the header could not be read".into()));
    }
    let hdr = Header::from_bytes(&raw);
    let have = total - HEADER_LEN;
    if hdr.len > MAX_PKT_LEN || hdr.len as usize > have {
        return Err(TxError::Len { hdr, have });
    }
    data.resize(hdr.len as usize, 0);
    if !read_at(mem, segs, HEADER_LEN, data) {
        data.clear();
        return Err(TxError::Chain("the payload could not be read".into()));
    }
    Ok(hdr)
}

/// Collects the device-writable buffers of RX chain `chain` into `segs` and returns how
/// many payload bytes fit after the header (at most [`MAX_PKT_LEN`]).
pub(crate) fn rx_capacity<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    segs: &mut Vec<Seg>,
) -> Result<usize, String> {
    let total = gather(mem, chain, true, segs)?;
    if total < HEADER_LEN {
        return Err(format!(
            "an rx chain of {total} bytes, shorter than the {HEADER_LEN}-byte header"
        ));
    }
    Ok((total - HEADER_LEN).min(MAX_PKT_LEN as usize))
}

/// Writes `hdr` (whose `len` must be `payload.len()`) and `payload` into the RX chain
/// `segs` from [`rx_capacity`]; returns the used length.
pub(crate) fn write_rx<M: GuestMemory>(
    mem: &M,
    segs: &[Seg],
    hdr: &Header,
    payload: &[u8],
) -> Result<u32, String> {
    if !write_at(mem, segs, 0, &hdr.to_bytes()) || !write_at(mem, segs, HEADER_LEN, payload) {
        // Checked by rx_capacity: not reached while the memory map stays as it is.
        return Err(format!(
            "a packet of {} bytes could not be written into the rx chain",
            HEADER_LEN + payload.len()
        ));
    }
    // At most HEADER_LEN + MAX_PKT_LEN.
    Ok((HEADER_LEN + payload.len()) as u32)
}

/// Writes a `virtio_vsock_event` with id `id` into the event-queue chain `chain`; returns
/// the used length.
pub(crate) fn write_event<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    segs: &mut Vec<Seg>,
    id: u32,
) -> Result<u32, String> {
    let total = gather(mem, chain, true, segs)?;
    if total < EVENT_LEN {
        return Err(format!(
            "an event chain of {total} bytes, shorter than the {EVENT_LEN}-byte event"
        ));
    }
    if !write_at(mem, segs, 0, &id.to_le_bytes()) {
        return Err("the event could not be written".into());
    }
    Ok(EVENT_LEN as u32)
}

/// Why a TX packet with a readable header is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Invalid {
    /// `src_cid` is not the guest's: dropped (an answer could not be addressed).
    SrcCid,
    /// `dst_cid` is not the host's.
    DstCid,
    /// A socket type other than stream.
    Type,
    /// An operation the protocol does not define.
    Op,
}

impl Invalid {
    /// Whether the refusal is answered with an RST (never for an RST, nor when the
    /// source is not the guest).
    pub(crate) fn answer_rst(self, hdr: &Header) -> bool {
        self != Invalid::SrcCid && hdr.op != op::RST
    }
}

/// Checks the addressing, type and operation of a TX packet from guest `guest_cid`, in
/// that order.
pub(crate) fn check_tx(hdr: &Header, guest_cid: u64) -> Result<(), Invalid> {
    if hdr.src_cid != guest_cid {
        return Err(Invalid::SrcCid);
    }
    if hdr.dst_cid != HOST_CID {
        return Err(Invalid::DstCid);
    }
    if hdr.type_ != TYPE_STREAM {
        return Err(Invalid::Type);
    }
    if !op::is_known(hdr.op) {
        return Err(Invalid::Op);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use virtio_vsock::packet::VsockPacket;
    use vm_memory::GuestMemoryMmap;

    use super::*;
    use tvm_virtio::test_utils::desc;

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const BUF: u64 = 0x1_0000;
    const MEM_SIZE: usize = 0x10_0000;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn hdr(op: u16, len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 52,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    /// Runs `f` on the first chain of `descs`.
    fn with_chain<T>(
        mem: &GuestMemoryMmap<()>,
        descs: &[virtio_queue::desc::RawDescriptor],
        f: impl FnOnce(DescriptorChain<&GuestMemoryMmap<()>>) -> T,
    ) -> T {
        let mock = MockSplitQueue::new(mem, 16);
        mock.add_desc_chains(descs, 0).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(mem).unwrap();
        f(chain)
    }

    fn tx(
        mem: &GuestMemoryMmap<()>,
        descs: &[virtio_queue::desc::RawDescriptor],
    ) -> Result<(Header, Vec<u8>), TxError> {
        with_chain(mem, descs, |chain| {
            let mut data = Vec::with_capacity(MAX_PKT_LEN as usize);
            let h = read_tx(mem, chain, &mut Vec::new(), &mut data)?;
            Ok((h, data))
        })
    }

    #[test]
    fn the_header_layout_is_virtio_vsock_s() {
        let mem = mem();
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0x1122_3344,
            dst_port: 0x5566_7788,
            len: 3,
            type_: 1,
            op: 5,
            flags: 0x99aa_bbcc,
            buf_alloc: 0xddee_ff00,
            fwd_cnt: 0x1234_5678,
        };
        mem.write_slice(&h.to_bytes(), GuestAddress(BUF)).unwrap();
        mem.write_slice(b"abc", GuestAddress(BUF + HEADER_LEN as u64))
            .unwrap();
        with_chain(&mem, &[desc(BUF, 47, 0, 0)], |mut chain| {
            let p = VsockPacket::from_tx_virtq_chain(&mem, &mut chain, MAX_PKT_LEN).unwrap();
            assert_eq!(
                (
                    p.src_cid(),
                    p.dst_cid(),
                    p.src_port(),
                    p.dst_port(),
                    p.len()
                ),
                (h.src_cid, h.dst_cid, h.src_port, h.dst_port, h.len)
            );
            assert_eq!(
                (p.type_(), p.op(), p.flags(), p.buf_alloc(), p.fwd_cnt()),
                (h.type_, h.op, h.flags, h.buf_alloc, h.fwd_cnt)
            );
        });
        assert_eq!(Header::from_bytes(&h.to_bytes()), h);
        assert_eq!(HEADER_LEN, 44);
    }

    #[test]
    fn any_tx_layout_gives_the_same_packet() {
        let mem = mem();
        let h = hdr(op::RW, 10);
        let payload = b"0123456789";
        // One descriptor (Linux >= 6.2).
        mem.write_slice(&h.to_bytes(), GuestAddress(BUF)).unwrap();
        mem.write_slice(payload, GuestAddress(BUF + 44)).unwrap();
        let one = tx(&mem, &[desc(BUF, 54, 0, 0)]).unwrap();
        assert_eq!(one, (h, payload.to_vec()));
        // Header and payload apart (older Linux), then a header split in two and the payload
        // in three fragments (MSG_ZEROCOPY).
        mem.write_slice(payload, GuestAddress(BUF + 0x1000))
            .unwrap();
        let two = tx(
            &mem,
            &[desc(BUF, 44, NEXT, 1), desc(BUF + 0x1000, 10, 0, 0)],
        )
        .unwrap();
        assert_eq!(two, one);
        let b = h.to_bytes();
        mem.write_slice(&b[..20], GuestAddress(BUF + 0x2000))
            .unwrap();
        mem.write_slice(&b[20..], GuestAddress(BUF + 0x3000))
            .unwrap();
        mem.write_slice(&payload[..3], GuestAddress(BUF + 0x4000))
            .unwrap();
        mem.write_slice(&payload[3..4], GuestAddress(BUF + 0x5000))
            .unwrap();
        mem.write_slice(&payload[4..], GuestAddress(BUF + 0x6000))
            .unwrap();
        let many = tx(
            &mem,
            &[
                desc(BUF + 0x2000, 20, NEXT, 1),
                desc(BUF + 0x3000, 24, NEXT, 2),
                desc(BUF + 0x4000, 3, NEXT, 3),
                desc(BUF + 0x5000, 1, NEXT, 4),
                desc(BUF + 0x6000, 6, 0, 0),
            ],
        )
        .unwrap();
        assert_eq!(many, one);
        // Extra bytes after `len` are ignored.
        let longer = tx(&mem, &[desc(BUF, 200, 0, 0)]).unwrap();
        assert_eq!(longer, one);
    }

    #[test]
    fn bad_tx_chains_are_refused() {
        let mem = mem();
        let h = hdr(op::RW, 10);
        mem.write_slice(&h.to_bytes(), GuestAddress(BUF)).unwrap();
        // Short header.
        let e = tx(&mem, &[desc(BUF, 43, 0, 0)]).unwrap_err();
        assert!(matches!(&e, TxError::Chain(w) if w.contains("shorter than the 44-byte header")));
        // A device-writable descriptor.
        let e = tx(&mem, &[desc(BUF, 54, W, 0)]).unwrap_err();
        assert!(matches!(&e, TxError::Chain(w) if w.contains("device-writable buffer")));
        // Outside guest memory.
        let e = tx(&mem, &[desc(MEM_SIZE as u64 - 10, 54, 0, 0)]).unwrap_err();
        assert!(matches!(&e, TxError::Chain(w) if w.contains("not in guest memory")));
        // A loop.
        let e = tx(&mem, &[desc(BUF, 44, NEXT, 1), desc(BUF, 10, NEXT, 0)]).unwrap_err();
        assert!(matches!(&e, TxError::Chain(w) if w.contains("loops")));
        // len bigger than the data in the chain.
        let e = tx(&mem, &[desc(BUF, 53, 0, 0)]).unwrap_err();
        assert_eq!(e, TxError::Len { hdr: h, have: 9 });
        assert_eq!(
            e.to_string(),
            "packet op 5 len 10 with 9 payload bytes in the chain (at most 65536)"
        );
        // len above the maximum, even with the bytes there.
        let big = hdr(op::RW, MAX_PKT_LEN + 1);
        mem.write_slice(&big.to_bytes(), GuestAddress(BUF)).unwrap();
        let e = tx(&mem, &[desc(BUF, 44 + MAX_PKT_LEN + 1, 0, 0)]).unwrap_err();
        assert!(matches!(e, TxError::Len { hdr, .. } if hdr == big));
    }

    #[test]
    fn addressing_type_and_op_are_checked_in_order() {
        let good = hdr(op::REQUEST, 0);
        assert_eq!(check_tx(&good, 3), Ok(()));
        let bad_src = Header {
            src_cid: 4,
            dst_cid: 7,
            ..good
        };
        assert_eq!(check_tx(&bad_src, 3), Err(Invalid::SrcCid));
        assert!(!Invalid::SrcCid.answer_rst(&bad_src));
        let bad_dst = Header {
            dst_cid: 1,
            type_: 2,
            ..good
        };
        assert_eq!(check_tx(&bad_dst, 3), Err(Invalid::DstCid));
        assert!(Invalid::DstCid.answer_rst(&bad_dst));
        let seqpacket = Header { type_: 2, ..good };
        assert_eq!(check_tx(&seqpacket, 3), Err(Invalid::Type));
        for bad_op in [0, 8, 0xffff] {
            let h = Header { op: bad_op, ..good };
            assert_eq!(check_tx(&h, 3), Err(Invalid::Op));
        }
        // An RST is never answered with an RST.
        let rst = Header {
            op: op::RST,
            type_: 2,
            ..good
        };
        assert_eq!(check_tx(&rst, 3), Err(Invalid::Type));
        assert!(!Invalid::Type.answer_rst(&rst));
    }

    #[test]
    fn rx_chains_take_header_and_payload_across_descriptors() {
        let mem = mem();
        mem.write_slice(&[0xee; 0x8000], GuestAddress(BUF)).unwrap();
        let h = hdr(op::RW, 5);
        let mut segs = Vec::new();
        // Header split over two descriptors, payload in the second and a third.
        let used = with_chain(
            &mem,
            &[
                desc(BUF, 30, W | NEXT, 1),
                desc(BUF + 0x1000, 16, W | NEXT, 2),
                desc(BUF + 0x2000, 100, W, 0),
            ],
            |chain| {
                assert_eq!(rx_capacity(&mem, chain, &mut segs).unwrap(), 146 - 44);
                write_rx(&mem, &segs, &h, b"hello").unwrap()
            },
        );
        assert_eq!(used, 49);
        let mut b = [0u8; 44];
        mem.read_slice(&mut b[..30], GuestAddress(BUF)).unwrap();
        mem.read_slice(&mut b[30..], GuestAddress(BUF + 0x1000))
            .unwrap();
        assert_eq!(Header::from_bytes(&b), h);
        let mut p = [0u8; 6];
        mem.read_slice(&mut p[..2], GuestAddress(BUF + 0x1000 + 14))
            .unwrap();
        mem.read_slice(&mut p[2..], GuestAddress(BUF + 0x2000))
            .unwrap();
        assert_eq!(&p, b"hello\xee");
        // Capacity is capped, and a chain without room for a header is refused.
        with_chain(&mem, &[desc(BUF, 0x2_0000, W, 0)], |chain| {
            assert_eq!(
                rx_capacity(&mem, chain, &mut segs).unwrap(),
                MAX_PKT_LEN as usize
            );
        });
        with_chain(&mem, &[desc(BUF, 43, W, 0)], |chain| {
            assert!(rx_capacity(&mem, chain, &mut segs).is_err());
        });
        with_chain(&mem, &[desc(BUF, 100, 0, 0)], |chain| {
            assert!(rx_capacity(&mem, chain, &mut segs)
                .unwrap_err()
                .contains("device-readable"));
        });
    }

    #[test]
    fn events_need_four_writable_bytes() {
        let mem = mem();
        mem.write_slice(&[0xee; 8], GuestAddress(BUF)).unwrap();
        let mut segs = Vec::new();
        let used = with_chain(&mem, &[desc(BUF, 8, W, 0)], |chain| {
            write_event(&mem, chain, &mut segs, EVENT_TRANSPORT_RESET).unwrap()
        });
        assert_eq!(used, 4);
        let got: [u8; 8] = mem.read_obj(GuestAddress(BUF)).unwrap();
        assert_eq!(got, [0, 0, 0, 0, 0xee, 0xee, 0xee, 0xee]);
        with_chain(&mem, &[desc(BUF, 3, W, 0)], |chain| {
            assert!(write_event(&mem, chain, &mut segs, 0).is_err());
        });
    }
}
