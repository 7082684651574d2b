// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! An entry point for fuzzing what the guest controls, without a Unix socket on the
//! filesystem.

use std::time::{Duration, Instant};

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemory;

use crate::counters::VsockCounters;
use crate::muxer::{Host, Muxer};
use crate::packet::{read_tx, Header, Seg, MAX_PKT_LEN};
use crate::Result;

/// The device's guest-facing logic on its own: TX packet parsing and validation, the
/// connection table, credit accounting and shutdown, and the packets it would put in the
/// RX queue. There is no listener: a guest connect gets one end of a socket pair (the other
/// end is kept, never read), so connections get established and their host streams fill
/// up, and nothing touches the filesystem.
///
/// A fuzz target builds guest memory and chains from its input (virtio-queue's
/// `MockSplitQueue`), feeds them to [`tx_chain`](Self::tx_chain), and interleaves
/// [`rx_packets`](Self::rx_packets), [`poll_host`](Self::poll_host) and
/// [`advance`](Self::advance). Nothing here may panic or grow without bound whatever the
/// chains hold.
///
/// # Example
///
/// ```
/// use virtio_queue::mock::MockSplitQueue;
/// use virtio_queue::{Queue, QueueT};
/// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
/// use tvm_vsock::{FuzzMuxer, Header, HOST_CID};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
/// // A REQUEST from guest port 1000 to host port 52, in one descriptor.
/// let req = Header { src_cid: 3, dst_cid: HOST_CID, src_port: 1000, dst_port: 52,
///                    type_: 1, op: 1, buf_alloc: 4096, ..Header::default() };
/// mem.write_slice(&req.to_bytes(), GuestAddress(0x8000)).unwrap();
/// let vq = MockSplitQueue::new(&mem, 16);
/// vq.add_desc_chains(&[virtio_queue::desc::RawDescriptor::from(
///     virtio_queue::desc::split::Descriptor::new(0x8000, 44, 0, 0))], 0).unwrap();
/// let mut q: Queue = vq.create_queue().unwrap();
///
/// let mut fuzz = FuzzMuxer::new(3).unwrap();
/// while let Some(chain) = q.pop_descriptor_chain(&mem) {
///     fuzz.tx_chain(&mem, chain);
/// }
/// let answers = fuzz.rx_packets(4096, 16);
/// assert_eq!(answers[0].op, 2); // RESPONSE
/// ```
#[derive(Debug)]
pub struct FuzzMuxer {
    muxer: Muxer,
    segs: Vec<Seg>,
    data: Vec<u8>,
    rx: Vec<u8>,
    now: Instant,
}

impl FuzzMuxer {
    /// A muxer for guest `guest_cid`, active, without host sockets.
    ///
    /// # Errors
    ///
    /// When the host is out of descriptors for the epoll or the timer.
    pub fn new(guest_cid: u64) -> Result<FuzzMuxer> {
        let mut muxer = Muxer::new(guest_cid, Host::Pairs(Default::default()))?;
        muxer.set_active(true);
        Ok(FuzzMuxer {
            muxer,
            segs: Vec::new(),
            data: Vec::with_capacity(MAX_PKT_LEN as usize),
            rx: vec![0; MAX_PKT_LEN as usize],
            now: Instant::now(),
        })
    }

    /// Parses one TX chain, as the device does, and handles the packet.
    pub fn tx_chain<M: GuestMemory>(&mut self, mem: &M, chain: DescriptorChain<&M>) {
        let parsed = read_tx(mem, chain, &mut self.segs, &mut self.data);
        self.muxer.handle_tx(parsed, &self.data, self.now);
    }

    /// Takes up to `max` packets the device would put in RX buffers with room for `room`
    /// payload bytes each (capped at 64 KiB), and returns their headers.
    pub fn rx_packets(&mut self, room: usize, max: usize) -> Vec<Header> {
        let room = room.min(self.rx.len());
        let mut out = Vec::new();
        while out.len() < max {
            match self.muxer.next_rx(&mut self.rx[..room], self.now) {
                Some((hdr, _)) => out.push(hdr),
                None => break,
            }
        }
        self.muxer.rearm_timer();
        out
    }

    /// Handles host socket readiness (the socket pairs' ends becoming readable or
    /// writable).
    pub fn poll_host(&mut self) {
        self.muxer.process_events(self.now);
        self.muxer.rearm_timer();
    }

    /// Moves the muxer's clock `by` forward and ends what timed out.
    pub fn advance(&mut self, by: Duration) {
        self.now += by;
        self.muxer.timeout_check(self.now);
        self.muxer.rearm_timer();
    }

    /// Connections in the table.
    pub fn connection_count(&self) -> usize {
        self.muxer.conn_count()
    }

    /// The counts so far.
    pub fn counters(&self) -> VsockCounters {
        self.muxer.counters
    }
}
