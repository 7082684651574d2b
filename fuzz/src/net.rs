// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! virtio-net: a [`Net`] over an in-memory [`NetBackend`] behind the PCI transport.
//!
//! [`run_tx`]: the transmit queue filled by the input, one notification. Invariants: every
//! available chain with a valid head is returned, in order, with used length 0; guest
//! memory changes only in the used rings (transmit never writes buffers); the frames the
//! backend gets are exactly the well-formed chains' bytes (device-readable descriptors in
//! RAM, 12 to `MAX_PACKET_LEN` bytes), in order; the counters agree.
//!
//! [`run_rx`]: frames from the input waiting in the backend, receive buffers added in
//! rounds, each round ending with a notification. Invariants: the used ring holds the
//! available chains in order, each at most once, with lengths within their writable
//! bytes; guest memory changes only in the used rings and in writable buffers of chains
//! made available; the frames rebuilt from the used ring are, in order, a subsequence of
//! the backend's frames, each with `num_buffers` right (1 without mergeable buffers) and
//! the flags byte cleared when the guest took no checksum offload; `rx_packets` counts
//! them. Drops are accounted for: after every round, each frame the device took from the
//! backend was delivered (`rx_packets`), dropped (`rx_dropped`) or is the one frame it
//! holds until buffers come (`rx_frame_waiting`); the frames the rebuilt subsequence
//! skips are drops the device counted; and a well-sized frame with a plain header (no
//! flags, no GSO), which every guest accepts, is never dropped when mergeable buffers are
//! on (nothing but a failed copy into guest memory could drop it, and that cannot happen
//! here).
//!
//! Both: no panic, no `error!`, no repeated `warn!`.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};

use tvm_virtio::VirtioPciDevice;
use tvm_virtio_net::{Net, NetBackend, MAX_PACKET_LEN, RX_QUEUE, TX_QUEUE, VNET_HDR_LEN};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MRG_RXBUF};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::guest::{self, Chain, Driver, RecordingSink, Ring, Snapshot};
use crate::{logger, Input};

/// What the backend saw and holds, shared with the harness.
#[derive(Debug, Default)]
pub struct BackendState {
    /// Frames waiting to be read (vnet header included).
    pub rx: VecDeque<Vec<u8>>,
    /// Frames written, in order.
    pub tx: Vec<Vec<u8>>,
    /// Every `set_offload` call.
    pub offloads: Vec<u32>,
    /// Refuse every `n`-th write with EAGAIN (0: never).
    pub refuse_every: usize,
    writes: usize,
}

/// A [`NetBackend`] over [`BackendState`]; its file descriptor is an idle EventFd (the
/// harness drives the device directly, not through epoll).
#[derive(Debug)]
pub struct MemBackend {
    state: Arc<Mutex<BackendState>>,
    fd: EventFd,
}

impl MemBackend {
    /// A backend and the handle to look into it.
    pub fn new() -> (Self, Arc<Mutex<BackendState>>) {
        let state = Arc::new(Mutex::new(BackendState::default()));
        (
            MemBackend {
                state: state.clone(),
                fd: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            },
            state,
        )
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BackendState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl AsRawFd for MemBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl NetBackend for MemBackend {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self
            .state()
            .rx
            .pop_front()
            .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
        // A TAP truncates a frame longer than the buffer.
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }

    fn write_frame(&mut self, iov: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut st = self.state();
        st.writes += 1;
        if st.refuse_every != 0 && st.writes.is_multiple_of(st.refuse_every) {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        let frame: Vec<u8> = iov.iter().flat_map(|s| s.iter().copied()).collect();
        let n = frame.len();
        st.tx.push(frame);
        Ok(n)
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.state().offloads.push(flags);
        Ok(())
    }
}

const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

struct Setup {
    mem: GuestMemoryMmap<()>,
    dev: VirtioPciDevice<Net<MemBackend>>,
    backend: Arc<Mutex<BackendState>>,
    rx: Ring,
    tx: Ring,
    features: u64,
}

/// Builds the device on fresh memory and brings it up with `wanted` features; `None` when
/// the device did not activate (a wanted feature set the device refuses is not an error).
fn setup(wanted: u64, rx_size: u16, tx_size: u16, frames: Vec<Vec<u8>>) -> Option<Setup> {
    let mem = guest::new_mem(0xa5);
    let (backend, state) = MemBackend::new();
    state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .rx
        .extend(frames);
    let sink = Arc::new(RecordingSink::default());
    let mut dev =
        VirtioPciDevice::new(Net::new(backend, MAC), mem.clone(), sink).expect("transport builds");
    let rx = Ring::at(RX_QUEUE, rx_size);
    let tx = Ring::at(TX_QUEUE, tx_size);
    for r in [rx, tx] {
        r.clear(&mem);
    }
    let mut drv = Driver { dev: &mut dev };
    let features = drv.negotiate(wanted);
    drv.setup_queue(RX_QUEUE, &rx);
    drv.setup_queue(TX_QUEUE, &tx);
    drv.driver_ok();
    if !dev.is_active() {
        return None;
    }
    Some(Setup {
        mem,
        dev,
        backend: state,
        rx,
        tx,
        features,
    })
}

/// Reads raw descriptors into `ring`: a count, then (index, 16 bytes) each.
fn read_descs(input: &mut Input<'_>, mem: &GuestMemoryMmap<()>, ring: &Ring) {
    let n = input.u16() % (ring.size + 1);
    for i in 0..n {
        ring.write_desc(mem, i, &input.array::<16>());
    }
}

/// Reads blobs (address u32, length u16, bytes) into guest memory: `count` of them, or
/// until the input ends when `count` is `None`.
fn read_blobs(input: &mut Input<'_>, s: &Setup, count: Option<u8>) {
    let mut used_rings = guest::Ranges::new();
    used_rings.add(s.rx.used, s.rx.used_len());
    used_rings.add(s.tx.used, s.tx.used_len());
    let mut left = count.map(usize::from);
    while !input.is_empty() && left != Some(0) {
        let addr = u64::from(input.u32());
        let len = usize::from(input.u16() % 2048);
        let bytes = input.bytes(len);
        guest::write_blob(&s.mem, addr, bytes, &used_rings);
        left = left.map(|l| l - 1);
    }
}

/// The bytes of `descs` in guest memory (a snapshot), `None` where one leaves RAM.
fn gather(snap: &Snapshot, descs: &[guest::Desc]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for d in descs {
        // Longer than any packet: not well-formed, whatever the bytes.
        if out.len() + d.len as usize > MAX_PACKET_LEN {
            return None;
        }
        out.extend(snap.read(d.addr, d.len as usize)?);
    }
    Some(out)
}

/// Runs one transmit input.
///
/// Input: TX queue size (log2), features wanted (u64), refuse-every (u8), the number of
/// descriptors and their raw bytes, the available index (u16) and that many ring entries
/// (at most the size), then blobs until the end.
pub fn run_tx(data: &[u8]) {
    logger::start_input();
    let mut input = Input::new(data);
    let size = 1u16 << (input.u8() % 9);
    let wanted = input.u64();
    let refuse_every = usize::from(input.u8() % 4);
    let Some(mut s) = setup(wanted, 16, size, Vec::new()) else {
        return;
    };
    s.backend
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .refuse_every = refuse_every;
    read_descs(&mut input, &s.mem, &s.tx);
    let avail_idx = input.u16();
    let entries: Vec<u16> = (0..avail_idx.min(size)).map(|_| input.u16()).collect();
    read_blobs(&mut input, &s, None);
    s.tx.write_avail(&s.mem, 0, avail_idx, 0, &entries, 0);

    let chains = guest::walk(&s.mem, &s.tx, 0);
    let before = Snapshot::take(&s.mem);
    // Transmit buffers or indirect tables inside a used ring change while the device
    // works: then only counts are compared, not contents.
    let mut used_rings = guest::Ranges::new();
    used_rings.add(s.rx.used, s.rx.used_len());
    used_rings.add(s.tx.used, s.tx.used_len());
    let moving = s.tx.indirect_tables(&s.mem).overlaps_any(&used_rings)
        || chains
            .iter()
            .flatten()
            .flat_map(|c| &c.descs)
            .any(|d| used_rings.overlaps(d.addr, u64::from(d.len)));

    s.dev.process_notification(TX_QUEUE);
    let after = Snapshot::take(&s.mem);
    before.assert_writes_within(&after, &used_rings, "virtio-net tx");

    let expected: Vec<&Chain> = chains.iter().flatten().filter(|c| c.head < size).collect();
    let used = s.tx.used_idx(&s.mem);
    assert_eq!(
        usize::from(used),
        expected.len(),
        "tx used idx {used}, but {} chains with a valid head were available (avail idx {avail_idx}, size {size})",
        expected.len()
    );
    for (i, c) in expected.iter().enumerate() {
        let (id, len) = s.tx.used_elem(&s.mem, i as u16);
        assert_eq!(
            id,
            u32::from(c.head),
            "tx used element {i} is not available chain {i}"
        );
        assert_eq!(len, 0, "tx used length must be 0");
    }

    // Well-formed: a chain that ends, only device-readable descriptors, all in RAM, a
    // header's worth of bytes and no more than the largest packet.
    let well_formed: Vec<Vec<u8>> = expected
        .iter()
        .filter(|c| c.ends())
        .filter(|c| c.descs.iter().all(|d| !d.write))
        .filter_map(|c| gather(&before, &c.descs))
        .filter(|f| (VNET_HDR_LEN..=MAX_PACKET_LEN).contains(&f.len()))
        .collect();
    let st = s.backend.lock().unwrap_or_else(PoisonError::into_inner);
    let counters = s.dev.device().counters();
    assert_eq!(
        counters.tx_packets as usize + counters.tx_dropped as usize,
        well_formed.len(),
        "tx counted {} sent and {} dropped of {} well-formed chains",
        counters.tx_packets,
        counters.tx_dropped,
        well_formed.len()
    );
    // A head beyond the queue is a chain without descriptors: malformed, and counted,
    // though it cannot be returned.
    let popped = chains.iter().flatten().count();
    assert_eq!(
        counters.tx_errors as usize,
        popped - well_formed.len(),
        "tx errors must count the malformed chains"
    );
    assert_eq!(st.tx.len(), counters.tx_packets as usize);
    if refuse_every == 0 {
        assert_eq!(st.tx.len(), well_formed.len());
        if !moving {
            assert!(
                st.tx == well_formed,
                "the backend got other bytes than the chains held"
            );
        }
    }
}

/// One receive frame from the input: the 12-byte header, then a length and a pattern.
fn read_frame(input: &mut Input<'_>) -> Vec<u8> {
    let hdr = input.array::<VNET_HDR_LEN>();
    // Any length up to one past the largest packet, so short, huge and truncated frames
    // all occur.
    let len = input.u32() as usize % (MAX_PACKET_LEN + 2);
    let seed = input.u8();
    let mut f: Vec<u8> = hdr.to_vec();
    f.extend((0..len.saturating_sub(VNET_HDR_LEN)).map(|i| (i as u8).wrapping_mul(13) ^ seed));
    f.truncate(len);
    f
}

/// Runs one receive input.
///
/// Input: RX queue size (log2), features wanted (u64), the number of frames (u8, at most
/// 8) and each frame ([`read_frame`]), the number of descriptors and their raw bytes, then
/// rounds until the input ends: a number of new available entries (u8) and the entries
/// (u16 each), a number of blobs (u8) and the blobs, then a notification.
pub fn run_rx(data: &[u8]) {
    logger::start_input();
    let mut input = Input::new(data);
    let size = 1u16 << (input.u8() % 9);
    let wanted = input.u64();
    let n_frames = input.u8() % 9;
    let frames: Vec<Vec<u8>> = (0..n_frames).map(|_| read_frame(&mut input)).collect();
    let Some(mut s) = setup(wanted, size, 16, frames.clone()) else {
        return;
    };
    let mergeable = s.features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
    let csum = s.features & (1 << VIRTIO_NET_F_GUEST_CSUM) != 0;
    read_descs(&mut input, &s.mem, &s.rx);

    let mut avail_idx = 0u16;
    // The available position the device has reached, as far as the used ring tells (an
    // invalid head consumed after the last used entry is not counted), and the used idx.
    let mut pos = 0u16;
    let mut used_prev = 0u16;
    let mut frame_cursor = 0usize;
    let mut delivered = 0u64;
    let mut dropped_seen = 0u64;
    let mut track_frames = true;
    let mut checking = true;
    let mut rounds = 0;
    while !input.is_empty() && rounds < 16 {
        rounds += 1;
        let n = input.u8();
        let new: Vec<u16> = (0..n).map(|_| input.u16()).collect();
        let blobs = input.u8() % 8;
        read_blobs(&mut input, &s, Some(blobs));
        s.rx.write_avail(
            &s.mem,
            0,
            avail_idx.wrapping_add(u16::from(n)),
            avail_idx,
            &new,
            0,
        );
        avail_idx = avail_idx.wrapping_add(u16::from(n));

        // Every chain from the first not yet used on may be written to. When they cannot be
        // walked from there (the driver made more than a queue size available, counting
        // positions whose invalid head left no used entry), or when a writable buffer
        // covers a ring or an indirect table (the device then rewrites the requests under
        // itself), the rest of the input runs unchecked but for panics and logs.
        let walked = guest::walk(&s.mem, &s.rx, pos);
        let chains: Vec<Chain> = walked.clone().unwrap_or_default();
        let mut meta = s.rx.areas();
        meta.extend(&s.tx.areas());
        meta.extend(&s.rx.indirect_tables(&s.mem));
        checking &= walked.is_some() && !chains.iter().any(|c| c.writable().overlaps_any(&meta));
        let mut allowed = guest::Ranges::new();
        allowed.add(s.rx.used, s.rx.used_len());
        allowed.add(s.tx.used, s.tx.used_len());
        for c in &chains {
            allowed.extend(&c.writable());
        }
        let before = Snapshot::take(&s.mem);
        s.dev.process_notification(RX_QUEUE);
        let after = Snapshot::take(&s.mem);
        // Every frame taken from the backend is delivered, dropped, or the one waiting.
        let taken = (frames.len() - lock(&s.backend).rx.len()) as u64;
        let counters = s.dev.device().counters();
        let waiting = u64::from(s.dev.device().rx_frame_waiting());
        assert_eq!(
            counters.rx_packets + counters.rx_dropped + waiting,
            taken,
            "rx took {taken} frames from the backend: {} delivered, {} dropped, {waiting} \
             waiting: a frame was lost without being counted",
            counters.rx_packets,
            counters.rx_dropped
        );
        if !checking {
            continue;
        }
        before.assert_writes_within(&after, &allowed, "virtio-net rx");

        let used = s.rx.used_idx(&s.mem);
        let new_used = used.wrapping_sub(used_prev);
        assert!(
            usize::from(new_used) <= chains.len(),
            "rx used {new_used} chains, only {} were available",
            chains.len()
        );
        // Used entries in order: each is the next available chain with a valid head.
        let valid: Vec<&Chain> = chains.iter().filter(|c| c.head < size).collect();
        let mut entries = Vec::new();
        for k in 0..new_used {
            let (id, len) = s.rx.used_elem(&s.mem, used_prev.wrapping_add(k));
            let c = valid
                .get(usize::from(k))
                .unwrap_or_else(|| panic!("rx used entry {k} has no available chain"));
            assert_eq!(id, u32::from(c.head), "rx used entry {k} out of order");
            assert!(
                u64::from(len) <= c.writable_len(),
                "rx used length {len} exceeds the chain's {} writable bytes",
                c.writable_len()
            );
            entries.push((*c, len as usize));
        }
        // Positions whose head is invalid are consumed without a used entry: skip them so
        // the next round walks from the first position not consumed.
        let consumed = chains
            .iter()
            .scan(0usize, |seen_valid, c| {
                if *seen_valid >= entries.len() {
                    return None;
                }
                if c.head < size {
                    *seen_valid += 1;
                }
                Some(())
            })
            .count();
        pos = pos.wrapping_add(consumed as u16);
        used_prev = used;

        // Rebuild the delivered frames and find them, in order, among the backend's; not
        // when buffers overlap, in one chain or across chains (later bytes overwrote
        // earlier ones).
        let mut seen = guest::Ranges::new();
        let mut shared = false;
        for d in entries
            .iter()
            .flat_map(|(c, _)| &c.descs)
            .filter(|d| d.write)
        {
            shared |= seen.overlaps(d.addr, u64::from(d.len));
            seen.add(d.addr, u64::from(d.len));
        }
        track_frames &= !shared;
        if !track_frames {
            continue;
        }
        let mut i = 0;
        while i < entries.len() {
            let (c, len) = entries[i];
            if len == 0 {
                i += 1;
                continue;
            }
            let first = gather_written(&after, c, len);
            assert!(
                first.len() >= VNET_HDR_LEN,
                "rx frame starts with a short buffer"
            );
            let num_buffers = usize::from(u16::from_le_bytes([first[10], first[11]]));
            if !mergeable {
                assert_eq!(num_buffers, 1, "num_buffers must be 1 without MRG_RXBUF");
            }
            let mut frame = first;
            for k in 1..num_buffers {
                let (c, len) = *entries
                    .get(i + k)
                    .unwrap_or_else(|| panic!("rx frame says {num_buffers} buffers, fewer used"));
                assert!(len > 0, "an empty used entry inside a frame");
                frame.extend(gather_written(&after, c, len));
            }
            i += num_buffers.max(1);
            let pos = frames[frame_cursor..]
                .iter()
                .position(|f| same_frame(f, &frame, csum))
                .unwrap_or_else(|| {
                    panic!(
                        "rx delivered a frame of {} bytes the backend never had in that order",
                        frame.len()
                    )
                });
            // The frames skipped on the way were dropped: each must be one the device may
            // drop.
            for (k, f) in frames[frame_cursor..frame_cursor + pos].iter().enumerate() {
                assert!(
                    !(mergeable && always_accepted(f)),
                    "rx dropped frame {} ({} bytes, plain header) with mergeable buffers on",
                    frame_cursor + k,
                    f.len()
                );
            }
            dropped_seen += pos as u64;
            frame_cursor += pos + 1;
            delivered += 1;
        }
        assert!(
            dropped_seen <= s.dev.device().counters().rx_dropped,
            "rx skipped {dropped_seen} of the backend's frames but counted {} as dropped",
            s.dev.device().counters().rx_dropped
        );
        assert_eq!(
            s.dev.device().counters().rx_packets,
            delivered,
            "rx_packets must count the frames in the used ring"
        );
    }
}

/// Whether every guest takes `frame` from the backend as it is: a length the device
/// accepts and a vnet header without flags or GSO.
fn always_accepted(frame: &[u8]) -> bool {
    (VNET_HDR_LEN..=MAX_PACKET_LEN).contains(&frame.len()) && frame[0] == 0 && frame[1] == 0
}

/// The backend's state, even after a panic elsewhere.
fn lock(state: &Mutex<BackendState>) -> std::sync::MutexGuard<'_, BackendState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The first `len` bytes written into `chain`'s writable descriptors.
fn gather_written(snap: &Snapshot, chain: &Chain, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for d in chain.descs.iter().filter(|d| d.write) {
        let n = (d.len as usize).min(len - out.len());
        out.extend(snap.read(d.addr, n).expect("the device checked it is RAM"));
        if out.len() == len {
            break;
        }
    }
    out
}

/// Whether `got` is `sent` as the guest must see it: `num_buffers` filled in, the flags
/// byte cleared without GUEST_CSUM.
fn same_frame(sent: &[u8], got: &[u8], csum: bool) -> bool {
    sent.len() == got.len()
        && got[0] == if csum { sent[0] } else { 0 }
        && got[1..10] == sent[1..10]
        && got[12..] == sent[12..]
}
