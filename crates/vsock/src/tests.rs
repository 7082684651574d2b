// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The whole device driven as a guest driver would (rings in guest memory, kicks through
//! `process_queue`) against host processes on real Unix sockets in a temporary directory.
//! Every wait has a time limit.

#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

use tvm_virtio::test_utils::{desc, DriverRing, RecordingInterrupt};
use tvm_virtio::{ActivateContext, EventSet, VirtioDevice};

use crate::packet::{op, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND};
use crate::*;

const W: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;

const CID: u64 = 3;
const MEM_SIZE: usize = 0x100_0000;
const RING_SIZE: u16 = 256;
const RX_RING: u64 = 0x0;
const TX_RING: u64 = 0x4000;
const EV_RING: u64 = 0x8000;
/// RX buffers: 256 slots of 8 KiB.
const RX_BASE: u64 = 0x10_0000;
const RX_SLOT: u64 = 0x2000;
/// TX buffers: 64 slots of 68 KiB (a header and 64 KiB).
const TX_BASE: u64 = 0x40_0000;
const TX_SLOT: u64 = 0x1_1000;
/// Event buffers.
const EV_BASE: u64 = 0xf0_0000;
/// A Linux RX buffer: a header and 4 KiB.
const RX_BUF_LEN: u32 = 4096 + HEADER_LEN as u32;
/// The buf_alloc the test guest advertises unless a test says otherwise.
const GUEST_BUF: u32 = 1 << 20;
/// How long any wait may take.
const WAIT: Duration = Duration::from_secs(10);

fn test_mem() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A packet from the guest's port `src_port` to host port `dst_port`.
fn gpkt(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: 1,
        op,
        flags: 0,
        buf_alloc: GUEST_BUF,
        fwd_cnt: 0,
    }
}

/// Bytes 0, 1, ... 250, 0, ...: each byte says where in the stream it came from.
fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len).map(|i| ((i + seed) % 251) as u8).collect()
}

/// A driver's split ring: chains at consecutive descriptor indices, used entries read in
/// order.
struct Ring<'a> {
    drv: DriverRing<'a>,
    next_desc: u16,
    seen: u16,
}

impl<'a> Ring<'a> {
    fn new(mem: &'a GuestMemoryMmap<()>, base: u64) -> Self {
        Ring {
            drv: DriverRing::new(mem, base, RING_SIZE),
            next_desc: 0,
            seen: 0,
        }
    }

    /// Writes the chain of `(addr, len, flags)` descriptors and makes it available.
    fn add(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = self.next_desc;
            let next = (idx + 1) % RING_SIZE;
            let (flags, next_field) = if i + 1 == descs.len() {
                (flags, 0)
            } else {
                (flags | NEXT, next)
            };
            self.drv
                .mock
                .desc_table()
                .store(idx, desc(addr, len, flags, next_field))
                .unwrap();
            self.next_desc = next;
        }
        let avail = self.drv.mock.avail();
        let idx = avail.idx().load();
        avail
            .ring()
            .ref_at(usize::from(idx % RING_SIZE))
            .unwrap()
            .store(head);
        avail.idx().store(idx.wrapping_add(1));
        head
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(RING_SIZE).unwrap();
        q.try_set_desc_table_address(GuestAddress(self.drv.desc_addr()))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.drv.avail_addr()))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.drv.used_addr()))
            .unwrap();
        q.set_ready(true);
        q
    }

    /// Used entries not seen yet, as (head, len).
    fn take_used(&mut self) -> Vec<(u32, u32)> {
        let idx = self.drv.used_idx();
        let mut v = Vec::new();
        while self.seen != idx {
            v.push(self.drv.used(self.seen));
            self.seen = self.seen.wrapping_add(1);
        }
        v
    }
}

/// The test's guest: memory, the three rings, the device, and what the device sent.
struct Guest<'a> {
    mem: &'a GuestMemoryMmap<()>,
    rx: Ring<'a>,
    tx: Ring<'a>,
    ev: Ring<'a>,
    dev: Vsock,
    irq: Arc<RecordingInterrupt>,
    /// Watches the device's event source, as the VMM's event loop does.
    outer: Epoll,
    /// RX head -> buffer address.
    rx_bufs: HashMap<u32, u64>,
    rx_slot: u64,
    tx_slot: u64,
    /// Post a new RX buffer (and kick) for each one the device used.
    auto_repost: bool,
    /// RX buffers the device returned with nothing written.
    returned_unused: usize,
    inbox: VecDeque<(Header, Vec<u8>)>,
    uds: PathBuf,
    _dir: TempDir,
}

impl<'a> Guest<'a> {
    /// A device, not activated.
    fn inactive(mem: &'a GuestMemoryMmap<()>) -> Self {
        let dir = TempDir::new_with_prefix("/tmp/tvm-vsock").unwrap();
        let uds = dir.as_path().join("v.sock");
        let dev = Vsock::new(VsockConfig {
            guest_cid: CID,
            uds_path: uds.clone(),
        })
        .unwrap();
        let outer = Epoll::new().unwrap();
        let sources = dev.extra_event_sources();
        assert_eq!(sources.len(), 1);
        assert_eq!(sources[0].1, EventSet::IN);
        outer
            .ctl(
                ControlOperation::Add,
                sources[0].0,
                EpollEvent::new(EventSet::IN, 0),
            )
            .unwrap();
        Guest {
            mem,
            rx: Ring::new(mem, RX_RING),
            tx: Ring::new(mem, TX_RING),
            ev: Ring::new(mem, EV_RING),
            dev,
            irq: Arc::new(RecordingInterrupt::default()),
            outer,
            rx_bufs: HashMap::new(),
            rx_slot: 0,
            tx_slot: 0,
            auto_repost: true,
            returned_unused: 0,
            inbox: VecDeque::new(),
            uds,
            _dir: dir,
        }
    }

    /// An active device with 32 RX buffers.
    fn new(mem: &'a GuestMemoryMmap<()>) -> Self {
        let mut g = Guest::inactive(mem);
        g.post_rx(32, RX_BUF_LEN);
        g.activate();
        g
    }

    fn activate(&mut self) {
        self.dev
            .activate(ActivateContext {
                mem: self.mem.clone(),
                features: tvm_virtio::features::VERSION_1,
                queues: vec![self.rx.queue(), self.tx.queue(), self.ev.queue()],
                queue_evts: (0..3)
                    .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                    .collect(),
                interrupt: self.irq.clone(),
            })
            .unwrap();
    }

    /// Re-activates after a reset, with fresh rings.
    fn reactivate(&mut self) {
        self.mem
            .write_slice(&[0u8; 0xc000], GuestAddress(RX_RING))
            .unwrap();
        self.rx = Ring::new(self.mem, RX_RING);
        self.tx = Ring::new(self.mem, TX_RING);
        self.ev = Ring::new(self.mem, EV_RING);
        self.rx_bufs.clear();
        self.inbox.clear();
        self.post_rx(32, RX_BUF_LEN);
        self.activate();
    }

    fn post_rx(&mut self, n: usize, len: u32) {
        for _ in 0..n {
            let addr = RX_BASE + (self.rx_slot % 256) * RX_SLOT;
            self.rx_slot += 1;
            let head = self.rx.add(&[(addr, len, W)]);
            self.rx_bufs.insert(u32::from(head), addr);
        }
    }

    fn kick_rx(&mut self) {
        self.dev.process_queue(RX_QUEUE);
    }

    /// Sends `hdr` (its len set from `payload`) in one descriptor and kicks TX.
    fn send(&mut self, mut hdr: Header, payload: &[u8]) {
        hdr.len = payload.len() as u32;
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        self.send_raw(&bytes);
    }

    /// Sends `bytes` as one TX descriptor, whatever they hold, and kicks TX.
    fn send_raw(&mut self, bytes: &[u8]) {
        let addr = TX_BASE + (self.tx_slot % 64) * TX_SLOT;
        self.tx_slot += 1;
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        self.tx.add(&[(addr, bytes.len() as u32, 0)]);
        self.dev.process_queue(TX_QUEUE);
        assert!(self.tx.take_used().iter().all(|&(_, len)| len == 0));
    }

    /// Moves what the device put in the RX queue to the inbox (reposting buffers).
    fn collect(&mut self) {
        let used = self.rx.take_used();
        let n = used.len();
        for (head, len) in used {
            let addr = self.rx_bufs.remove(&head).unwrap();
            if len == 0 {
                self.returned_unused += 1;
                continue;
            }
            let mut raw = [0u8; HEADER_LEN];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let hdr = Header::from_bytes(&raw);
            assert_eq!(len as usize, HEADER_LEN + hdr.len as usize, "{hdr:?}");
            assert_eq!((hdr.dst_cid, hdr.type_), (CID, 1));
            // Only an RST answering a packet for another CID comes from elsewhere.
            assert!(hdr.src_cid == HOST_CID || hdr.op == op::RST, "{hdr:?}");
            let mut data = vec![0u8; hdr.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(addr + HEADER_LEN as u64))
                .unwrap();
            self.inbox.push_back((hdr, data));
        }
        if self.auto_repost && n > 0 {
            self.post_rx(n, RX_BUF_LEN);
            self.kick_rx();
        }
    }

    /// Lets the device handle host events (waiting up to 10 ms for one).
    fn pump(&mut self) {
        let mut ev = [EpollEvent::default(); 1];
        self.outer.wait(10, &mut ev).unwrap();
        self.dev.process_extra_event(0, EventSet::IN);
        self.collect();
    }

    /// Pumps until `done` holds.
    fn pump_until(&mut self, what: &str, mut done: impl FnMut(&mut Self) -> bool) {
        let end = Instant::now() + WAIT;
        while !done(self) {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            self.pump();
        }
    }

    /// Waits for the first packet matching `want`, which is taken out of the inbox.
    fn wait_packet(&mut self, mut want: impl FnMut(&Header) -> bool) -> (Header, Vec<u8>) {
        let end = Instant::now() + WAIT;
        loop {
            self.collect();
            if let Some(i) = self.inbox.iter().position(|(h, _)| want(h)) {
                return self.inbox.remove(i).unwrap();
            }
            assert!(
                Instant::now() < end,
                "timed out; inbox {:?}",
                self.inbox.iter().map(|(h, _)| h).collect::<Vec<_>>()
            );
            self.pump();
        }
    }

    /// Everything received so far.
    fn take_inbox(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.collect();
        self.inbox.drain(..).collect()
    }

    /// Pumps for `ms` and returns what arrived.
    fn settle(&mut self, ms: u64) -> Vec<(Header, Vec<u8>)> {
        let end = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < end {
            self.pump();
        }
        self.take_inbox()
    }

    fn host_stream(&self) -> UnixStream {
        let s = UnixStream::connect(&self.uds).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s
    }

    fn port_path(&self, port: u32) -> PathBuf {
        PathBuf::from(format!("{}_{port}", self.uds.display()))
    }

    /// A host-initiated connection to guest port `port`, accepted by the guest with
    /// `buf_alloc`: the host stream (past its OK line) and the device's port.
    fn host_connect(&mut self, port: u32, buf_alloc: u32) -> (UnixStream, u32) {
        let mut h = self.host_stream();
        h.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let (req, _) = self.wait_packet(|p| p.op == op::REQUEST && p.dst_port == port);
        let local = req.src_port;
        self.send(
            Header {
                buf_alloc,
                ..gpkt(op::RESPONSE, port, local)
            },
            &[],
        );
        assert_eq!(read_line(&mut h), format!("OK {local}\n"));
        (h, local)
    }

    /// Waits until the device has sent `len` RW bytes from `local` (answering nothing),
    /// and returns them.
    fn read_rw(&mut self, local: u32, len: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < len {
            let (h, d) = self.wait_packet(|p| p.op == op::RW && p.src_port == local);
            assert!(got.len() + d.len() <= len, "more than {len} bytes");
            assert_eq!(h.len as usize, d.len());
            got.extend(d);
        }
        got
    }
}

/// Reads one line, byte by byte.
fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') && line.len() < 64 {
        s.read_exact(&mut b).unwrap();
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

/// Whether the host end sees EOF (within the read timeout), skipping data first.
fn host_sees_eof(s: &mut UnixStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn config_space_holds_the_cid_and_is_read_only() {
    tvm_util::test_log::start();
    let mem = test_mem();
    let mut g = Guest::inactive(&mem);
    assert_eq!(g.dev.device_type(), 19);
    assert_eq!(g.dev.queue_max_sizes(), [256, 256, 256]);
    assert_eq!(g.dev.device_features(), 0);
    let mut cfg = [0xffu8; 12];
    g.dev.read_config(0, &mut cfg);
    assert_eq!(cfg, [3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    // Linux reads the le64 as two le32.
    let mut hi = [0xffu8; 4];
    g.dev.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
    for _ in 0..3 {
        g.dev.write_config(0, &[9, 9, 9, 9]);
    }
    g.dev.read_config(0, &mut cfg[..8]);
    assert_eq!(cfg[..8], [3, 0, 0, 0, 0, 0, 0, 0]);
    let warns = tvm_util::test_log::lines(log::Level::Warn);
    assert_eq!(warns.len(), 1, "{warns:?}");
    assert!(warns[0].contains("read-only config"));
    assert_eq!(g.dev.guest_cid(), 3);
}

#[test]
fn new_refuses_reserved_cids_and_existing_paths_and_cleans_up() {
    let dir = TempDir::new_with_prefix("/tmp/tvm-vsock").unwrap();
    let uds = dir.as_path().join("v.sock");
    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 32] {
        let e = Vsock::new(VsockConfig {
            guest_cid: cid,
            uds_path: uds.clone(),
        })
        .unwrap_err();
        assert!(matches!(e, Error::InvalidCid(c) if c == cid));
        assert!(!uds.exists());
    }
    let max = Vsock::new(VsockConfig {
        guest_cid: MAX_GUEST_CID,
        uds_path: uds.clone(),
    })
    .unwrap();
    assert_eq!(max.uds_path(), uds.as_path());
    assert!(uds.exists());
    // The path is taken now.
    let e = Vsock::new(VsockConfig {
        guest_cid: 3,
        uds_path: uds.clone(),
    })
    .unwrap_err();
    assert!(matches!(e, Error::UdsPathExists(ref p) if *p == uds));
    assert_eq!(
        e.to_string(),
        format!("vsock unix socket path {uds:?} already exists (remove it if it is stale)")
    );
    drop(max);
    assert!(!uds.exists());
    // A file that is not ours is refused and left alone.
    std::fs::write(&uds, b"x").unwrap();
    assert!(matches!(
        Vsock::new(VsockConfig {
            guest_cid: 3,
            uds_path: uds.clone()
        }),
        Err(Error::UdsPathExists(_))
    ));
    assert_eq!(std::fs::read(&uds).unwrap(), b"x");
}

#[test]
fn host_initiated_connection_carries_bytes_both_ways() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    let mut h = g.host_stream();
    // Bytes sent right after the line wait for the guest to accept.
    h.write_all(b"CONNECT 52\nearly").unwrap();
    let (req, _) = g.wait_packet(|p| p.op == op::REQUEST);
    assert_eq!(
        (req.src_port, req.dst_port, req.len, req.flags),
        (FIRST_LOCAL_PORT, 52, 0, 0)
    );
    assert_eq!((req.buf_alloc, req.fwd_cnt), (BUF_ALLOC, 0));
    assert_eq!(g.dev.connection_count(), 1);
    let local = req.src_port;
    g.send(gpkt(op::RESPONSE, 52, local), &[]);
    assert_eq!(read_line(&mut h), format!("OK {local}\n"));
    assert_eq!(g.read_rw(local, 5), b"early");
    // Host to guest.
    h.write_all(b"hello guest").unwrap();
    let (rw, data) = g.wait_packet(|p| p.op == op::RW);
    assert_eq!(data, b"hello guest");
    assert_eq!((rw.src_port, rw.dst_port), (local, 52));
    assert_eq!((rw.buf_alloc, rw.fwd_cnt), (BUF_ALLOC, 0));
    // Guest to host.
    g.send(gpkt(op::RW, 52, local), b"hello host");
    let mut buf = [0u8; 10];
    h.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");
    // The next packet tells the guest what reached the host.
    g.send(gpkt(op::CREDIT_REQUEST, 52, local), &[]);
    let (cu, _) = g.wait_packet(|p| p.op == op::CREDIT_UPDATE);
    assert_eq!((cu.buf_alloc, cu.fwd_cnt), (BUF_ALLOC, 10));
    // A second host connection gets the next port.
    let (_h2, local2) = g.host_connect(53, GUEST_BUF);
    assert_eq!(local2, FIRST_LOCAL_PORT + 1);
    let c = g.dev.counters();
    assert_eq!((c.conns_added, c.conns_removed, c.conns_killed), (2, 0, 0));
    assert_eq!((c.rx_bytes, c.tx_bytes), (16, 10));
    // REQUEST, RW x2, CREDIT_UPDATE, REQUEST.
    assert_eq!(c.rx_packets, 5);
    // RESPONSE, RW, CREDIT_REQUEST, RESPONSE.
    assert_eq!(c.tx_packets, 4);
    assert_eq!((c.tx_errors, c.rx_errors, c.host_errors), (0, 0, 0));
    // Interrupts went to the RX queue (and TX, for the used TX chains).
    let irqs = g.irq.take();
    assert!(irqs.contains(&RX_QUEUE) && irqs.contains(&TX_QUEUE));
}

#[test]
fn guest_connects_to_a_listener_or_gets_rst() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    let listener = UnixListener::bind(g.port_path(1234)).unwrap();
    g.send(gpkt(op::REQUEST, 5000, 1234), &[]);
    let (resp, _) = g.wait_packet(|p| p.dst_port == 5000);
    assert_eq!(resp.op, op::RESPONSE);
    assert_eq!(resp.src_port, 1234);
    assert_eq!(resp.buf_alloc, BUF_ALLOC);
    let (mut h, _) = listener.accept().unwrap();
    h.set_read_timeout(Some(WAIT)).unwrap();
    h.write_all(b"from host").unwrap();
    let (_, data) = g.wait_packet(|p| p.op == op::RW && p.dst_port == 5000);
    assert_eq!(data, b"from host");
    g.send(gpkt(op::RW, 5000, 1234), b"from guest");
    let mut buf = [0u8; 10];
    h.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"from guest");
    // Nobody listens on port 1235.
    g.send(gpkt(op::REQUEST, 5001, 1235), &[]);
    let (rst, _) = g.wait_packet(|p| p.dst_port == 5001);
    assert_eq!((rst.op, rst.src_port), (op::RST, 1235));
    let c = g.dev.counters();
    assert_eq!((c.conns_added, c.guest_refused), (1, 1));
    assert_eq!(g.dev.connection_count(), 1);
}

#[test]
fn bad_connect_lines_close_the_host_stream() {
    tvm_util::test_log::start();
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    for (i, line) in [&b"HELLO 52\n"[..], b"CONNECT x\n", &[b'7'; 40]]
        .into_iter()
        .enumerate()
    {
        let mut h = g.host_stream();
        h.write_all(line).unwrap();
        g.pump_until("the line to be read", |g| {
            g.dev.counters().host_refused == i as u64 + 1
        });
        assert!(host_sees_eof(&mut h), "{line:?}");
    }
    assert_eq!(g.dev.counters().host_refused, 3);
    // One warning for the kind, then debug.
    let warns = tvm_util::test_log::lines(log::Level::Warn);
    assert_eq!(warns.len(), 1, "{warns:?}");
    assert!(
        warns[0].contains("does not start with CONNECT"),
        "{warns:?}"
    );
    // No line at all: closed after the timeout, and the timer is armed meanwhile.
    let mut h = g.host_stream();
    h.write_all(b"CONN").unwrap();
    g.pump_until("the connection to be accepted", |g| {
        g.dev.pending_host_connections() == 1
    });
    assert!(g.dev.timer_armed());
    g.dev.timeout_check(Instant::now() + Duration::from_secs(1));
    assert_eq!(g.dev.pending_host_connections(), 1);
    g.dev
        .timeout_check(Instant::now() + CONNECT_LINE_TIMEOUT + Duration::from_secs(1));
    assert_eq!(g.dev.pending_host_connections(), 0);
    assert!(!g.dev.timer_armed());
    assert!(host_sees_eof(&mut h));
    // The guest never heard of any of them.
    assert!(g.take_inbox().is_empty());
    assert_eq!(g.dev.counters().conns_added, 0);
}

#[test]
fn an_inactive_device_closes_host_connections_after_their_line() {
    let mem = test_mem();
    let mut g = Guest::inactive(&mem);
    let mut h = g.host_stream();
    h.write_all(b"CONNECT 52\n").unwrap();
    g.pump_until("the line to be read", |g| {
        g.dev.counters().host_refused == 1
    });
    assert!(host_sees_eof(&mut h));
    assert_eq!(g.dev.connection_count(), 0);
    // Once active, the same works.
    g.post_rx(32, RX_BUF_LEN);
    g.activate();
    let (_h, local) = g.host_connect(52, GUEST_BUF);
    assert_eq!(local, FIRST_LOCAL_PORT);
}

#[test]
fn a_request_without_answer_times_out() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    let mut h = g.host_stream();
    h.write_all(b"CONNECT 52\n").unwrap();
    let (req, _) = g.wait_packet(|p| p.op == op::REQUEST);
    assert!(g.dev.timer_armed());
    g.dev
        .timeout_check(Instant::now() + REQUEST_TIMEOUT + Duration::from_millis(100));
    let (rst, _) = g.wait_packet(|p| p.op == op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (req.src_port, 52));
    assert!(host_sees_eof(&mut h));
    assert_eq!(g.dev.connection_count(), 0);
    let c = g.dev.counters();
    assert_eq!((c.conns_killed, c.conns_removed), (1, 1));
    // A late RESPONSE finds no connection: RST.
    g.send(gpkt(op::RESPONSE, 52, req.src_port), &[]);
    let (rst, _) = g.wait_packet(|p| p.op == op::RST);
    assert_eq!(rst.src_port, req.src_port);
}

#[test]
fn the_guest_refusing_a_host_connect_closes_the_host_stream() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    let mut h = g.host_stream();
    h.write_all(b"CONNECT 52\n").unwrap();
    let (req, _) = g.wait_packet(|p| p.op == op::REQUEST);
    g.send(gpkt(op::RST, 52, req.src_port), &[]);
    assert!(host_sees_eof(&mut h));
    assert_eq!(g.dev.connection_count(), 0);
    assert!(g.settle(30).is_empty());
    assert_eq!(g.dev.counters().conns_killed, 0);
}

#[test]
fn rst_from_either_side_ends_the_connection() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    // The guest resets: the host sees EOF, nothing is answered.
    let (mut h, local) = g.host_connect(52, GUEST_BUF);
    g.send(gpkt(op::RST, 52, local), &[]);
    assert!(host_sees_eof(&mut h));
    assert_eq!(g.dev.connection_count(), 0);
    assert!(g.settle(30).is_empty());
    // A host process that closes with guest data unread: the stream is reset, and so is
    // the connection.
    let (h, local) = g.host_connect(53, GUEST_BUF);
    g.send(gpkt(op::RW, 53, local), b"never read");
    drop(h);
    let (rst, _) = g.wait_packet(|p| p.op == op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (local, 53));
    assert_eq!(g.dev.connection_count(), 0);
    let c = g.dev.counters();
    assert_eq!((c.conns_killed, c.host_errors), (1, 1));
    // A clean close by the host: SHUTDOWN both ways; the guest's RST ends it.
    let (h, local) = g.host_connect(54, GUEST_BUF);
    drop(h);
    let (sd, _) = g.wait_packet(|p| p.op == op::SHUTDOWN);
    assert_eq!((sd.src_port, sd.flags), (local, SHUTDOWN_BOTH));
    g.send(gpkt(op::RST, 54, local), &[]);
    assert_eq!(g.dev.connection_count(), 0);
    assert_eq!(g.dev.counters().conns_killed, 1);
}

#[test]
fn shutdown_half_closes_each_direction() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    // The host stops sending first: the guest sees SHUTDOWN(SEND) and may still send.
    let (mut h, local) = g.host_connect(52, GUEST_BUF);
    h.write_all(b"last words").unwrap();
    h.shutdown(Shutdown::Write).unwrap();
    assert_eq!(g.read_rw(local, 10), b"last words");
    let (sd, _) = g.wait_packet(|p| p.op == op::SHUTDOWN);
    assert_eq!(sd.flags, SHUTDOWN_SEND);
    g.send(gpkt(op::RW, 52, local), b"reply");
    let mut buf = [0u8; 5];
    h.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"reply");
    // Then the guest stops sending: the host reads EOF, both directions are closed, and
    // the device ends the connection after the grace.
    g.send(gpkt(op::RW, 52, local), b"bye");
    g.send(
        Header {
            flags: SHUTDOWN_SEND,
            ..gpkt(op::SHUTDOWN, 52, local)
        },
        &[],
    );
    h.read_exact(&mut buf[..3]).unwrap();
    assert_eq!(&buf[..3], b"bye");
    assert!(host_sees_eof(&mut h));
    assert_eq!(g.dev.connection_count(), 1);
    assert!(g.dev.timer_armed());
    g.dev
        .timeout_check(Instant::now() + Duration::from_millis(500));
    assert_eq!(g.dev.connection_count(), 1);
    g.dev
        .timeout_check(Instant::now() + SHUTDOWN_GRACE + Duration::from_millis(100));
    let (rst, _) = g.wait_packet(|p| p.op == op::RST);
    assert_eq!(rst.src_port, local);
    assert_eq!(g.dev.connection_count(), 0);
    assert_eq!(g.dev.counters().conns_killed, 1);

    // The guest stops sending first: the host reads EOF and may still send.
    let (mut h, local) = g.host_connect(53, GUEST_BUF);
    g.send(
        Header {
            flags: SHUTDOWN_SEND,
            ..gpkt(op::SHUTDOWN, 53, local)
        },
        &[],
    );
    assert!(host_sees_eof(&mut h));
    h.write_all(b"still here").unwrap();
    assert_eq!(g.read_rw(local, 10), b"still here");
    // Data after the guest's own SHUTDOWN(SEND) breaks the protocol.
    g.send(gpkt(op::RW, 53, local), b"x");
    let (rst, _) = g.wait_packet(|p| p.op == op::RST);
    assert_eq!(rst.src_port, local);

    // The guest refuses more data: the host's writes fail.
    let (h, local) = g.host_connect(54, GUEST_BUF);
    g.send(
        Header {
            flags: SHUTDOWN_RCV,
            ..gpkt(op::SHUTDOWN, 54, local)
        },
        &[],
    );
    let e = (&h).write_all(b"unwanted").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BrokenPipe);
    assert!(g.settle(20).iter().all(|(p, _)| p.op != op::RW));
    // The guest closes: the host sees EOF and the guest gets the RST it waits for.
    let (mut h, local) = g.host_connect(55, GUEST_BUF);
    g.send(gpkt(op::RW, 55, local), b"done");
    g.send(
        Header {
            flags: SHUTDOWN_BOTH,
            ..gpkt(op::SHUTDOWN, 55, local)
        },
        &[],
    );
    let (rst, _) = g.wait_packet(|p| p.op == op::RST && p.dst_port == 55);
    assert_eq!(rst.src_port, local);
    h.read_exact(&mut buf[..4]).unwrap();
    assert_eq!(&buf[..4], b"done");
    assert!(host_sees_eof(&mut h));
    // Ended at the guest's request, not killed.
    assert_eq!(g.dev.counters().conns_killed, 2);
}

#[test]
fn the_device_never_sends_more_than_the_guest_credit() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    let (mut h, local) = g.host_connect(52, 8192);
    let data = pattern(20_000, 0);
    h.write_all(&data).unwrap();
    // 8 KiB, then a CREDIT_REQUEST, then nothing.
    let mut got = Vec::new();
    let (cr, _) = g.wait_packet(|p| p.op == op::CREDIT_REQUEST);
    assert_eq!(cr.src_port, local);
    for (p, d) in g.take_inbox() {
        assert_eq!(p.op, op::RW);
        got.extend(d);
    }
    assert_eq!(got.len(), 8192);
    assert!(g.settle(50).is_empty());
    // The guest read 8 KiB and says so: 8 KiB more, and another request.
    g.send(
        Header {
            buf_alloc: 8192,
            fwd_cnt: 8192,
            ..gpkt(op::CREDIT_UPDATE, 52, local)
        },
        &[],
    );
    got.extend(g.read_rw(local, 8192));
    let (cr, _) = g.wait_packet(|p| p.op == op::CREDIT_REQUEST);
    assert_eq!(cr.src_port, local);
    assert!(g.settle(30).is_empty());
    // Any packet carries the credit: an RW with fwd_cnt 16384 lets the rest through.
    g.send(
        Header {
            buf_alloc: 8192,
            fwd_cnt: 16384,
            ..gpkt(op::RW, 52, local)
        },
        b"ack",
    );
    got.extend(g.read_rw(local, 20_000 - 16384));
    assert_eq!(got, data);
    assert!(g.settle(30).is_empty());
}

#[test]
fn a_guest_overrunning_its_credit_gets_rst_and_memory_stays_bounded() {
    tvm_util::test_log::start();
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    let (h, local) = g.host_connect(52, GUEST_BUF);
    // The host does not read; the guest ignores the credit it was given.
    let chunk = pattern(MAX_PKT_LEN as usize, 1);
    let mut sent = 0usize;
    let mut reset = false;
    for _ in 0..64 {
        g.send(gpkt(op::RW, 52, local), &chunk);
        sent += chunk.len();
        if let Some((len, cap)) = g.dev.buffered(local, 52) {
            assert!(len <= BUF_ALLOC as usize, "{len} buffered");
            assert!(cap <= BUF_ALLOC as usize + 16, "{cap} allocated");
        }
        if g.take_inbox().iter().any(|(p, _)| p.op == op::RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "{sent} bytes sent without an rst");
    assert!(sent > BUF_ALLOC as usize);
    let c = g.dev.counters();
    assert_eq!((c.conns_killed, c.tx_errors), (1, 1));
    let warns = tvm_util::test_log::lines(log::Level::Warn);
    assert_eq!(warns.len(), 1, "{warns:?}");
    assert!(
        warns[0].contains("of 262144 bytes of credit in use"),
        "{warns:?}"
    );
    drop(h);
}

#[test]
fn a_slow_host_reader_gets_everything_with_bounded_buffering() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    let (h, local) = g.host_connect(52, GUEST_BUF);
    h.set_nonblocking(true).unwrap();
    let total = 2 << 20;
    let data = pattern(total, 7);
    let mut sent = 0usize;
    let mut dev_fwd = 0u32;
    let mut received = Vec::new();
    let mut max_buffered = 0usize;
    let mut asked = false;
    let end = Instant::now() + Duration::from_secs(60);
    while received.len() < total {
        assert!(Instant::now() < end, "stuck at {} bytes", received.len());
        // The guest sends within its credit (64 KiB packets).
        let credit = BUF_ALLOC as usize - (sent - dev_fwd as usize);
        let n = credit.min(MAX_PKT_LEN as usize).min(total - sent);
        if n > 0 {
            g.send(gpkt(op::RW, 52, local), &data[sent..sent + n]);
            sent += n;
            asked = false;
        } else if !asked && sent < total {
            g.send(gpkt(op::CREDIT_REQUEST, 52, local), &[]);
            asked = true;
        }
        if let Some((len, cap)) = g.dev.buffered(local, 52) {
            assert!(len <= BUF_ALLOC as usize && cap <= BUF_ALLOC as usize + 16);
            max_buffered = max_buffered.max(len);
        }
        // The host reads only once the device had to buffer, then slowly.
        if max_buffered > 0 {
            let mut buf = vec![0u8; 64 * 1024];
            match (&h).read(&mut buf) {
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        g.pump();
        for (p, _) in g.take_inbox() {
            assert_eq!(p.src_port, local);
            assert!(matches!(p.op, op::CREDIT_UPDATE), "{p:?}");
            dev_fwd = p.fwd_cnt;
        }
    }
    assert_eq!(received, data);
    assert!(max_buffered > 0, "the device never had to buffer");
    let c = g.dev.counters();
    assert_eq!(c.tx_bytes, total as u64);
    assert_eq!((c.conns_killed, c.tx_errors), (0, 0));
}

#[test]
fn a_large_host_stream_arrives_whole_with_credit_updates() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    let (h, local) = g.host_connect(52, 64 * 1024);
    let total = 1 << 20;
    let data = pattern(total, 3);
    let writer = {
        let data = data.clone();
        let mut h = h.try_clone().unwrap();
        std::thread::spawn(move || {
            h.write_all(&data).unwrap();
            h.shutdown(Shutdown::Write).unwrap();
        })
    };
    let mut got = Vec::new();
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < end, "stuck at {} bytes", got.len());
        g.pump();
        let mut eof = false;
        let mut credit_request = false;
        for (p, d) in g.take_inbox() {
            match p.op {
                op::RW => got.extend(d),
                op::SHUTDOWN => eof = true,
                op::CREDIT_REQUEST => credit_request = true,
                o => panic!("op {o}"),
            }
        }
        // The guest's reader consumes everything at once and tells the device.
        if credit_request || !got.is_empty() {
            g.send(
                Header {
                    buf_alloc: 64 * 1024,
                    fwd_cnt: got.len() as u32,
                    ..gpkt(op::CREDIT_UPDATE, 52, local)
                },
                &[],
            );
        }
        if eof {
            break;
        }
    }
    writer.join().unwrap();
    assert_eq!(got.len(), total);
    assert!(got == data);
    assert_eq!(g.dev.counters().rx_bytes, total as u64);
}

#[test]
fn without_rx_buffers_the_device_stops_reading_until_the_guest_posts() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    let (mut h, local) = g.host_connect(52, GUEST_BUF);
    g.auto_repost = false;
    // Use up the buffers but one.
    g.take_inbox();
    let spare = g.rx_bufs.len();
    let data = pattern(spare * 4096 + 10_000, 5);
    h.write_all(&data).unwrap();
    let got = g.read_rw(local, spare * 4096);
    assert_eq!(got, data[..spare * 4096]);
    assert!(g.rx_bufs.is_empty());
    // Nothing more arrives, and the outer loop is not kept busy.
    g.pump();
    let mut ev = [EpollEvent::default(); 1];
    assert_eq!(g.outer.wait(0, &mut ev).unwrap(), 0);
    assert!(g.take_inbox().is_empty());
    // The guest posts buffers and kicks: the rest comes.
    g.auto_repost = true;
    g.post_rx(8, RX_BUF_LEN);
    g.kick_rx();
    let rest = g.read_rw(local, 10_000);
    assert_eq!(rest, data[spare * 4096..]);
}

#[test]
fn the_outer_loop_does_not_spin_on_data_the_device_cannot_send() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    // A guest with no buffer space: the host's bytes wait in the host stream.
    let (mut h, local) = g.host_connect(52, 0);
    h.write_all(&[1; 1000]).unwrap();
    let (cr, _) = g.wait_packet(|p| p.op == op::CREDIT_REQUEST);
    assert_eq!(cr.src_port, local);
    let mut ev = [EpollEvent::default(); 1];
    for _ in 0..3 {
        h.write_all(&[2; 100]).unwrap();
        // Each new write wakes the loop once; handled, the epoll is quiet again.
        assert_eq!(g.outer.wait(1000, &mut ev).unwrap(), 1);
        g.dev.process_extra_event(0, EventSet::IN);
        assert_eq!(g.outer.wait(0, &mut ev).unwrap(), 0);
    }
    assert!(g.take_inbox().is_empty());
    // A host connection closing while nothing can be read: one wake-up, then quiet.
    drop(h);
    assert_eq!(g.outer.wait(1000, &mut ev).unwrap(), 1);
    g.dev.process_extra_event(0, EventSet::IN);
    assert_eq!(g.outer.wait(0, &mut ev).unwrap(), 0);
}

#[test]
fn the_connection_limit_refuses_requests_beyond_it() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    g.dev.set_max_connections(2);
    let listener = UnixListener::bind(g.port_path(1234)).unwrap();
    for port in [5000, 5001, 5002] {
        g.send(gpkt(op::REQUEST, port, 1234), &[]);
    }
    let (r, _) = g.wait_packet(|p| p.dst_port == 5002);
    assert_eq!(r.op, op::RST);
    for port in [5000, 5001] {
        let (r, _) = g.wait_packet(|p| p.dst_port == port);
        assert_eq!(r.op, op::RESPONSE);
    }
    assert_eq!(g.dev.connection_count(), 2);
    // A host connection is closed too.
    let mut h = g.host_stream();
    h.write_all(b"CONNECT 52\n").unwrap();
    assert!({
        g.pump_until("the host connection to be refused", |g| {
            g.dev.counters().host_refused == 1
        });
        host_sees_eof(&mut h)
    });
    // One connection ends: room again.
    g.send(gpkt(op::RST, 5000, 1234), &[]);
    g.send(gpkt(op::REQUEST, 5003, 1234), &[]);
    let (r, _) = g.wait_packet(|p| p.dst_port == 5003);
    assert_eq!(r.op, op::RESPONSE);
    assert_eq!(g.dev.counters().guest_refused, 1);
    drop(listener);
}

#[test]
fn a_device_reset_drops_connections_and_closes_host_streams() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    let listener = UnixListener::bind(g.port_path(1234)).unwrap();
    let (mut h1, _) = g.host_connect(52, GUEST_BUF);
    g.send(gpkt(op::REQUEST, 5000, 1234), &[]);
    g.wait_packet(|p| p.op == op::RESPONSE);
    let (mut h2, _) = listener.accept().unwrap();
    h2.set_read_timeout(Some(WAIT)).unwrap();
    // One more waiting for its line survives (it is not a connection yet).
    let mut pending = g.host_stream();
    pending.write_all(b"CONN").unwrap();
    g.pump_until("the pending connection", |g| {
        g.dev.pending_host_connections() == 1
    });
    g.dev.reset();
    assert_eq!(g.dev.connection_count(), 0);
    assert!(host_sees_eof(&mut h1));
    assert!(host_sees_eof(&mut h2));
    assert_eq!(g.dev.counters().conns_removed, 2);
    // Notifications while inactive are ignored.
    g.dev.process_queue(TX_QUEUE);
    g.dev.process_queue(RX_QUEUE);
    // The driver comes back; the pending host connection finishes its line.
    g.reactivate();
    pending.write_all(b"ECT 77\n").unwrap();
    let (req, _) = g.wait_packet(|p| p.op == op::REQUEST);
    assert_eq!(req.dst_port, 77);
}

#[test]
fn transport_reset_sends_the_event_and_drops_connections() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    // Inactive: nothing happens.
    let other_mem = test_mem();
    let mut inactive = Guest::inactive(&other_mem);
    inactive.dev.transport_reset();
    // Without an event buffer the connections still go.
    let (mut h, _) = g.host_connect(52, GUEST_BUF);
    g.dev.transport_reset();
    assert!(host_sees_eof(&mut h));
    assert_eq!(g.dev.connection_count(), 0);
    // With one: the event, an interrupt on the event queue.
    mem.write_slice(&[0xee; 8], GuestAddress(EV_BASE)).unwrap();
    g.ev.add(&[(EV_BASE, 8, W)]);
    g.dev.process_queue(EVENT_QUEUE);
    let (mut h, _) = g.host_connect(53, GUEST_BUF);
    g.irq.take();
    g.dev.transport_reset();
    assert_eq!(g.ev.take_used(), [(0, 4)]);
    let ev: [u8; 8] = mem.read_obj(GuestAddress(EV_BASE)).unwrap();
    assert_eq!(ev, [0, 0, 0, 0, 0xee, 0xee, 0xee, 0xee]);
    assert_eq!(g.irq.take(), [EVENT_QUEUE]);
    assert!(host_sees_eof(&mut h));
    assert_eq!(g.dev.connection_count(), 0);
    // No RST for the dropped connections: the guest resets its sockets itself.
    assert!(g.settle(20).is_empty());
    assert_eq!(g.dev.counters().conns_removed, 2);
}

#[test]
fn invalid_guest_packets_are_refused_with_one_warning_per_kind() {
    tvm_util::test_log::start();
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    for _ in 0..2 {
        // Short header: dropped.
        g.send_raw(&[0u8; 20]);
        // Not from the guest's CID: dropped, not answered.
        g.send(
            Header {
                src_cid: 4,
                ..gpkt(op::REQUEST, 1, 2)
            },
            &[],
        );
        // Not to the host: RST from the CID it was for.
        g.send(
            Header {
                dst_cid: 7,
                ..gpkt(op::REQUEST, 10, 20)
            },
            &[],
        );
        let (r, _) = g.wait_packet(|p| p.dst_port == 10);
        assert_eq!((r.op, r.src_cid, r.src_port), (op::RST, 7, 20));
        // SEQPACKET: RST.
        g.send(
            Header {
                type_: 2,
                ..gpkt(op::REQUEST, 11, 20)
            },
            &[],
        );
        let (r, _) = g.wait_packet(|p| p.dst_port == 11);
        assert_eq!((r.op, r.src_cid), (op::RST, 2));
        // Unknown op: RST.
        g.send(gpkt(9, 12, 20), &[]);
        let (r, _) = g.wait_packet(|p| p.dst_port == 12);
        assert_eq!(r.op, op::RST);
        // len above the maximum, and len above the data: RST.
        let mut big = gpkt(op::RW, 13, 20);
        big.len = MAX_PKT_LEN + 1;
        let mut bytes = big.to_bytes().to_vec();
        bytes.resize(HEADER_LEN + MAX_PKT_LEN as usize + 1, 0);
        g.send_raw(&bytes);
        let (r, _) = g.wait_packet(|p| p.dst_port == 13);
        assert_eq!(r.op, op::RST);
        let mut short = gpkt(op::RW, 14, 20);
        short.len = 100;
        let mut bytes = short.to_bytes().to_vec();
        bytes.extend_from_slice(&[0; 99]);
        g.send_raw(&bytes);
        let (r, _) = g.wait_packet(|p| p.dst_port == 14);
        assert_eq!(r.op, op::RST);
        // A packet for no connection: RST, not a guest error; an RST for none: dropped.
        g.send(gpkt(op::RW, 15, 20), b"x");
        let (r, _) = g.wait_packet(|p| p.dst_port == 15);
        assert_eq!(r.op, op::RST);
        g.send(gpkt(op::RST, 16, 20), &[]);
        assert!(g.settle(10).is_empty());
    }
    let warns = tvm_util::test_log::lines(log::Level::Warn);
    let kinds = [
        "shorter than the 44-byte header",
        "source cid 4",
        "for cid 7",
        "socket type 2",
        "unknown op 9",
        "len 65537",
    ];
    assert_eq!(warns.len(), kinds.len(), "{warns:?}");
    for (w, k) in warns.iter().zip(kinds) {
        assert!(w.contains(k), "{w:?} lacks {k:?}");
    }
    assert!(tvm_util::test_log::lines(log::Level::Error).is_empty());
    let c = g.dev.counters();
    assert_eq!(c.tx_errors, 2 * 7);
    assert_eq!(c.conns_added, 0);
}

#[test]
fn a_malformed_packet_on_a_connection_ends_it() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    let (mut h, local) = g.host_connect(52, GUEST_BUF);
    let mut bad = gpkt(op::RW, 52, local);
    bad.len = 100;
    let mut bytes = bad.to_bytes().to_vec();
    bytes.extend_from_slice(&[0; 10]);
    g.send_raw(&bytes);
    let (rst, _) = g.wait_packet(|p| p.op == op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (local, 52));
    assert!(host_sees_eof(&mut h));
    assert_eq!(g.dev.connection_count(), 0);
    let c = g.dev.counters();
    assert_eq!((c.conns_killed, c.tx_errors), (1, 1));
    // The same for an unknown op.
    let (mut h, local) = g.host_connect(53, GUEST_BUF);
    g.send(gpkt(0, 53, local), &[]);
    let (rst, _) = g.wait_packet(|p| p.op == op::RST);
    assert_eq!(rst.src_port, local);
    assert!(host_sees_eof(&mut h));
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn bad_rx_chains_are_returned_unused_and_the_device_goes_on() {
    tvm_util::test_log::start();
    let mem = test_mem();
    let mut g = Guest::inactive(&mem);
    // A device-readable RX buffer, then one too short for a header, then a good one.
    let a = g.rx.add(&[(RX_BASE, RX_BUF_LEN, 0)]);
    let b = g.rx.add(&[(RX_BASE + RX_SLOT, 20, W)]);
    g.rx_bufs.insert(u32::from(a), RX_BASE);
    g.rx_bufs.insert(u32::from(b), RX_BASE + RX_SLOT);
    g.rx_slot = 2;
    g.post_rx(1, RX_BUF_LEN);
    g.activate();
    g.auto_repost = false;
    let mut h = g.host_stream();
    h.write_all(b"CONNECT 52\n").unwrap();
    let (req, _) = g.wait_packet(|p| p.op == op::REQUEST);
    assert_eq!(req.dst_port, 52);
    assert_eq!(g.returned_unused, 2);
    assert_eq!(g.dev.counters().rx_errors, 2);
    let warns = tvm_util::test_log::lines(log::Level::Warn);
    assert_eq!(warns.len(), 1, "{warns:?}");
    assert!(warns[0].contains("device-readable"));
}

#[test]
fn header_only_rx_buffers_carry_control_packets_and_data_waits() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    let (mut h, local) = g.host_connect(52, GUEST_BUF);
    g.auto_repost = false;
    g.take_inbox();
    // Use up the buffers with credit updates.
    let n = g.rx_bufs.len();
    for _ in 0..n {
        g.send(gpkt(op::CREDIT_REQUEST, 52, local), &[]);
    }
    assert_eq!(g.take_inbox().len(), n);
    assert!(g.rx_bufs.is_empty());
    // Buffers with room for a header only.
    g.post_rx(2, HEADER_LEN as u32);
    g.kick_rx();
    assert!(g.take_inbox().is_empty() && g.returned_unused == 0);
    h.write_all(b"data").unwrap();
    g.send(gpkt(op::CREDIT_REQUEST, 52, local), &[]);
    // The control packet fits the first; the second is handed back empty once data waits,
    // rather than block the larger buffer posted behind it.
    let (cu, _) = g.wait_packet(|p| p.op == op::CREDIT_UPDATE);
    assert_eq!(cu.len, 0);
    g.pump_until("the header-only buffer to come back", |g| {
        g.returned_unused == 1
    });
    g.post_rx(1, RX_BUF_LEN);
    g.kick_rx();
    assert_eq!(g.read_rw(local, 4), b"data");
    assert!(g.settle(20).is_empty());
}

#[test]
fn the_fuzz_entry_point_survives_garbage() {
    let mem = test_mem();
    let mut fuzz = FuzzMuxer::new(CID).unwrap();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut ring = Ring::new(&mem, TX_RING);
    let mut q = ring.queue();
    for i in 0..3000u64 {
        let r = next();
        let mut h = gpkt(
            (r % 9) as u16,
            (r >> 8) as u32 % 4,
            1 + (r >> 16) as u32 % 4,
        );
        if r % 17 == 0 {
            h.src_cid = r >> 32;
        }
        if r % 19 == 0 {
            h.type_ = 2;
        }
        h.buf_alloc = (r >> 20) as u32 % 70_000;
        h.fwd_cnt = (r >> 40) as u32 % 70_000;
        h.flags = (r >> 50) as u32 % 4;
        let payload = (r >> 24) as usize % 3000;
        h.len = if r % 23 == 0 {
            (r >> 30) as u32
        } else {
            payload as u32
        };
        let addr = TX_BASE + (i % 64) * TX_SLOT;
        mem.write_slice(&h.to_bytes(), GuestAddress(addr)).unwrap();
        let len = (HEADER_LEN + payload) as u32;
        if r % 29 == 0 {
            ring.add(&[(addr, 20, 0), (addr + 20, len - 20, W)]);
        } else if r % 31 == 0 {
            ring.add(&[(addr, 30, 0), (addr + 30, len - 30, 0)]);
        } else {
            ring.add(&[(addr, len, 0)]);
        }
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        fuzz.tx_chain(&mem, chain);
        if r % 3 == 0 {
            let room = (r >> 12) as usize % 5000;
            assert!(fuzz.rx_packets(room, 8).len() <= 8);
        }
        if r % 101 == 0 {
            fuzz.poll_host();
        }
        if r % 211 == 0 {
            fuzz.advance(Duration::from_secs(3));
        }
        assert!(fuzz.connection_count() <= MAX_CONNECTIONS);
    }
    let c = fuzz.counters();
    assert!(c.tx_packets > 0 && c.tx_errors > 0 && c.conns_added > 0);
}

#[test]
fn log_counters_and_debug_do_not_panic() {
    let mem = test_mem();
    let g = Guest::new(&mem);
    g.dev.log_counters();
    let s = format!("{:?}", g.dev);
    assert!(s.contains("guest_cid: 3"), "{s}");
}
