// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! One connection's protocol state and credit accounting (virtio 1.2, 5.10.6.3 and
//! 5.10.6.6), without sockets: it is told what the guest sent and what the host stream
//! did, and says which packets to send the guest and what to do with the host stream. The
//! muxer owns the stream and does the I/O.
//!
//! Credit, guest to host: the device advertises [`BUF_ALLOC`] and the bytes it has written
//! to the host stream (`fwd_cnt`) in every packet; guest data the stream cannot take at
//! once is kept in `out`, and a packet that would make `out` hold more than `BUF_ALLOC`
//! counted bytes breaks the guest's credit. Host to guest: the device reads the host stream
//! only while the guest's `buf_alloc - (tx_cnt - fwd_cnt)` is above zero, at most that
//! many bytes, and asks for credit once when it runs out.

use std::collections::VecDeque;
use std::fmt;
use std::num::Wrapping;
use std::time::{Duration, Instant};

use crate::packet::{op, Header, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// Bytes of guest data the device buffers per connection (the `buf_alloc` it advertises):
/// 256 KiB, Linux's default `buffer_size` for a vsock socket.
pub const BUF_ALLOC: u32 = 256 * 1024;

/// The device sends a CREDIT_UPDATE once this many bytes reached the host stream since
/// the `fwd_cnt` the guest last saw: half of [`BUF_ALLOC`], so a guest sending at full
/// speed to a host that keeps up never runs out of credit.
pub(crate) const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 2;

/// How long a host-initiated connection waits for the guest's RESPONSE (Firecracker's
/// `CONN_REQUEST_TIMEOUT_MS`).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a connection whose both directions are shut down lingers before the device
/// ends it with an RST (Firecracker's `CONN_SHUTDOWN_TIMEOUT_MS`).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How long a connection the guest closed (SHUTDOWN with both flags) may take to write
/// the guest data still buffered to the host stream before the device gives up on it with
/// an RST (Linux's `VSOCK_CLOSE_TIMEOUT` for the same wait).
pub const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(8);

/// `out` is given back to the allocator when it empties with more capacity than this.
const KEEP_OUT_CAPACITY: usize = 64 * 1024;

// Control packets waiting for an RX buffer, one bit each.
const P_RST: u8 = 1 << 0;
const P_REQUEST: u8 = 1 << 1;
const P_RESPONSE: u8 = 1 << 2;
const P_CREDIT_UPDATE: u8 = 1 << 3;
const P_CREDIT_REQUEST: u8 = 1 << 4;
const P_SHUTDOWN: u8 = 1 << 5;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// Host-initiated: the REQUEST is sent or queued, the guest's RESPONSE not yet in.
    Requesting,
    /// Data may flow (each direction until shut down).
    Established,
    /// Ended by the device: only its RST remains to be sent, then it is forgotten.
    Closing,
}

/// What a packet from the guest asks of the muxer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Recv {
    /// Nothing for the host stream now (packets for the guest may be pending).
    Done,
    /// An RW payload within the guest's credit: write it to the host stream, and give
    /// [`Conn::buffer`] what the stream does not take.
    Data,
    /// An RW payload after the device said it receives no more (the host closed): dropped.
    Discard,
    /// The guest reset the connection: forget it without an answer.
    Reset,
    /// The guest broke the protocol: end the connection with an RST.
    Violation(Violation),
}

/// How a guest broke the protocol on an existing connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Violation {
    /// More RW bytes than the credit the device gave.
    CreditOverrun {
        /// Payload bytes of the packet.
        len: u32,
        /// Guest bytes the device already held.
        buffered: usize,
    },
    /// RW after the guest's own SHUTDOWN with the SEND flag.
    DataAfterShutdown,
    /// An operation that makes no sense in the connection's state.
    UnexpectedOp {
        /// The operation.
        op: u16,
        /// The state.
        state: State,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::CreditOverrun { len, buffered } => write!(
                f,
                "{len} bytes sent with {buffered} of {BUF_ALLOC} bytes of credit in use"
            ),
            Violation::DataAfterShutdown => f.write_str("data sent after shutting down sending"),
            Violation::UnexpectedOp { op, state } => write!(f, "op {op} in state {state:?}"),
        }
    }
}

/// What [`Conn::rx_next`] wants to send the guest next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RxNext {
    /// A control packet: `op` with `flags`, no payload.
    Control {
        /// The operation.
        op: u16,
        /// Its flags (shutdown flags for SHUTDOWN).
        flags: u32,
    },
    /// Read at most this many bytes (the guest's credit, above 0) from the host stream into
    /// an RW packet, then tell [`Conn::sent_rw`], [`Conn::host_eof`] or
    /// [`Conn::host_would_block`] what happened.
    Read(u32),
    /// Nothing to send.
    Idle,
}

/// One connection, identified by the device's port (`local_port`) and the guest's
/// (`peer_port`).
#[derive(Debug)]
pub(crate) struct Conn {
    local_port: u32,
    peer_port: u32,
    state: State,
    /// `P_*` control packets waiting to be sent.
    pending: u8,

    /// Guest bytes the host stream has not taken yet; the first `out_uncounted` of them are
    /// the device's own (the `OK <port>` line) and do not count against the guest's credit.
    out: VecDeque<u8>,
    out_uncounted: usize,
    /// Guest bytes written to the host stream.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` in the last packet sent to the guest.
    fwd_cnt_sent: Wrapping<u32>,

    /// The guest's `buf_alloc` and `fwd_cnt`, from its latest packet.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    tx_cnt: Wrapping<u32>,
    /// A CREDIT_REQUEST went out since the guest last gave credit.
    credit_requested: bool,

    /// Shutdown flags the guest sent.
    peer_shut: u32,
    /// Shutdown flags the device sent or queued.
    local_shut: u32,
    /// `shutdown(Write)` was done on the host stream.
    host_write_shut: bool,
    /// `shutdown(Read)` was done on the host stream.
    host_read_shut: bool,

    /// The host stream may have bytes (or an EOF) to read: set by readiness, cleared by
    /// EAGAIN.
    host_readable: bool,
    /// The host peer closed its socket (EPOLLHUP): both directions are gone on its side.
    host_hup: bool,

    /// When the device gives up on the connection: the RESPONSE timeout while requesting,
    /// the grace once both directions are shut.
    deadline: Option<Instant>,
}

impl Conn {
    fn new(local_port: u32, peer_port: u32, state: State, pending: u8) -> Conn {
        Conn {
            local_port,
            peer_port,
            state,
            pending,
            out: VecDeque::new(),
            out_uncounted: 0,
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            credit_requested: false,
            peer_shut: 0,
            local_shut: 0,
            host_write_shut: false,
            host_read_shut: false,
            host_readable: false,
            host_hup: false,
            deadline: None,
        }
    }

    /// A host-initiated connection from the device's `local_port` to the guest's
    /// `peer_port`: a REQUEST to send, answered within [`REQUEST_TIMEOUT`] of `now`.
    pub(crate) fn new_local(local_port: u32, peer_port: u32, now: Instant) -> Conn {
        let mut c = Conn::new(local_port, peer_port, State::Requesting, P_REQUEST);
        c.deadline = Some(now + REQUEST_TIMEOUT);
        c
    }

    /// A guest-initiated connection whose host stream is connected: `req` is the guest's
    /// REQUEST, answered with a RESPONSE.
    pub(crate) fn new_peer(req: &Header) -> Conn {
        let mut c = Conn::new(req.dst_port, req.src_port, State::Established, P_RESPONSE);
        c.peer_buf_alloc = req.buf_alloc;
        c.peer_fwd_cnt = Wrapping(req.fwd_cnt);
        c
    }

    /// The device's port.
    pub(crate) fn local_port(&self) -> u32 {
        self.local_port
    }

    /// The guest's port.
    pub(crate) fn peer_port(&self) -> u32 {
        self.peer_port
    }

    /// The connection's state.
    pub(crate) fn state(&self) -> State {
        self.state
    }

    /// When the device gives up on the connection, if it will.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Bytes the guest may still send to the host (the credit the guest sees can be lower:
    /// it knows only the `fwd_cnt` of the last packet).
    fn own_space(&self) -> usize {
        (BUF_ALLOC as usize).saturating_sub(self.counted_out())
    }

    fn counted_out(&self) -> usize {
        self.out.len() - self.out_uncounted
    }

    /// The guest's credit: bytes the device may send it now.
    pub(crate) fn credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Handles a packet the guest sent on this connection (already checked for addressing,
    /// type, op and length), whose payload is `hdr.len` bytes, at `now`.
    pub(crate) fn recv(&mut self, hdr: &Header, now: Instant) -> Recv {
        // Every packet carries the guest's credit (virtio 1.2, 5.10.6.3).
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.credit() > 0 {
            self.credit_requested = false;
        }
        let res = match (self.state, hdr.op) {
            (_, op::RST) => Recv::Reset,
            // The RST is on its way; anything crossing it is moot.
            (State::Closing, _) => Recv::Done,
            (State::Requesting, op::RESPONSE) => {
                self.state = State::Established;
                self.deadline = None;
                let line = format!("OK {}\n", self.local_port);
                self.out.extend(line.as_bytes());
                self.out_uncounted += line.len();
                Recv::Done
            }
            (State::Established, op::RW) => self.recv_rw(hdr.len),
            (State::Established, op::CREDIT_UPDATE) => Recv::Done,
            (State::Established, op::CREDIT_REQUEST) => {
                self.pending |= P_CREDIT_UPDATE;
                Recv::Done
            }
            (State::Established, op::SHUTDOWN) => {
                self.peer_shut |= hdr.flags & SHUTDOWN_BOTH;
                Recv::Done
            }
            (state, op) => Recv::Violation(Violation::UnexpectedOp { op, state }),
        };
        self.update_deadline(now);
        res
    }

    fn recv_rw(&mut self, len: u32) -> Recv {
        if self.peer_shut & SHUTDOWN_SEND != 0 {
            return Recv::Violation(Violation::DataAfterShutdown);
        }
        if len as usize > self.own_space() {
            return Recv::Violation(Violation::CreditOverrun {
                len,
                buffered: self.counted_out(),
            });
        }
        if self.local_shut & SHUTDOWN_RCV != 0 || self.host_write_shut {
            return Recv::Discard;
        }
        if len == 0 {
            return Recv::Done;
        }
        Recv::Data
    }

    /// Whether guest bytes wait for the host stream.
    pub(crate) fn has_out(&self) -> bool {
        !self.out.is_empty()
    }

    /// Bytes of guest data held for the host stream.
    #[cfg(test)]
    pub(crate) fn out_len(&self) -> usize {
        self.out.len()
    }

    /// Bytes allocated for guest data held for the host stream.
    #[cfg(test)]
    pub(crate) fn out_capacity(&self) -> usize {
        self.out.capacity()
    }

    /// The first bytes waiting for the host stream (non-empty when [`has_out`] is true).
    ///
    /// [`has_out`]: Conn::has_out
    pub(crate) fn out_front(&self) -> &[u8] {
        self.out.as_slices().0
    }

    /// Keeps the part of an RW payload the host stream did not take. Only after
    /// [`Recv::Data`], which checked that it fits in [`BUF_ALLOC`].
    pub(crate) fn buffer(&mut self, data: &[u8]) {
        // Exact growth: the allocation never exceeds what is held.
        self.out.reserve_exact(data.len());
        self.out.extend(data);
    }

    /// `n` bytes of an RW payload went straight to the host stream (nothing was waiting).
    pub(crate) fn forwarded(&mut self, n: usize) {
        self.fwd_cnt += n as u32;
        self.check_credit_update();
    }

    /// The host stream took the first `n` bytes of [`out_front`](Conn::out_front).
    pub(crate) fn drained(&mut self, n: usize, now: Instant) {
        let n = n.min(self.out.len());
        self.out.drain(..n);
        let own = n.min(self.out_uncounted);
        self.out_uncounted -= own;
        self.fwd_cnt += (n - own) as u32;
        if self.out.is_empty() && self.out.capacity() > KEEP_OUT_CAPACITY {
            self.out = VecDeque::new();
        }
        self.check_credit_update();
        self.update_deadline(now);
    }

    fn check_credit_update(&mut self) {
        if (self.fwd_cnt - self.fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.pending |= P_CREDIT_UPDATE;
        }
    }

    /// Whether the host stream's read side should be shut now: the guest will read no
    /// more.
    pub(crate) fn wants_host_read_shutdown(&self) -> bool {
        self.state == State::Established
            && self.peer_shut & SHUTDOWN_RCV != 0
            && !self.host_read_shut
    }

    /// `shutdown(Read)` was done on the host stream.
    pub(crate) fn host_read_shut_done(&mut self) {
        self.host_read_shut = true;
    }

    /// Whether the host stream's write side should be shut now: the guest will send no
    /// more and all it sent reached the stream.
    pub(crate) fn wants_host_write_shutdown(&self) -> bool {
        self.state == State::Established
            && self.peer_shut & SHUTDOWN_SEND != 0
            && self.out.is_empty()
            && !self.host_write_shut
    }

    /// `shutdown(Write)` was done on the host stream.
    pub(crate) fn host_write_shut_done(&mut self, now: Instant) {
        self.host_write_shut = true;
        self.update_deadline(now);
    }

    /// Whether the guest closed the connection (SHUTDOWN with both flags) and everything it
    /// sent reached the host: the device answers with the RST Linux waits for.
    pub(crate) fn should_finish(&self) -> bool {
        self.state == State::Established && self.peer_shut == SHUTDOWN_BOTH && self.out.is_empty()
    }

    /// Ends the connection from the device's side: only an RST remains to be sent, and
    /// the guest data held is dropped.
    pub(crate) fn close(&mut self) {
        self.state = State::Closing;
        self.pending = P_RST;
        self.out = VecDeque::new();
        self.out_uncounted = 0;
        self.deadline = None;
        self.host_readable = false;
    }

    /// The host stream became readable (data, EOF or an error to read).
    pub(crate) fn set_host_readable(&mut self) {
        self.host_readable = true;
    }

    /// The host peer closed its socket. If the guest already refused more data there is
    /// nothing left to read for it: the connection is shut down as at an EOF.
    pub(crate) fn set_host_hup(&mut self, now: Instant) {
        self.host_hup = true;
        self.host_readable = true;
        if self.state == State::Established
            && self.peer_shut & SHUTDOWN_RCV != 0
            && self.local_shut & SHUTDOWN_SEND == 0
        {
            self.host_eof(now);
        }
    }

    /// Reading the host stream gave EOF: the device will send no more (and, if the host
    /// peer closed its socket, receive no more), and tells the guest with a SHUTDOWN.
    pub(crate) fn host_eof(&mut self, now: Instant) {
        self.host_readable = false;
        if self.state != State::Established {
            return;
        }
        let mut flags = SHUTDOWN_SEND;
        if self.host_hup {
            flags |= SHUTDOWN_RCV;
        }
        if self.local_shut | flags != self.local_shut {
            self.local_shut |= flags;
            self.pending |= P_SHUTDOWN;
        }
        self.update_deadline(now);
    }

    /// Reading the host stream gave EAGAIN.
    pub(crate) fn host_would_block(&mut self) {
        self.host_readable = false;
    }

    /// `n` bytes read from the host stream were sent to the guest in an RW packet.
    pub(crate) fn sent_rw(&mut self, n: u32) {
        self.tx_cnt += n;
    }

    /// Whether the device would read the host stream if the guest had credit.
    fn may_read(&self) -> bool {
        self.state == State::Established
            && self.host_readable
            && self.local_shut & SHUTDOWN_SEND == 0
            && self.peer_shut & SHUTDOWN_RCV == 0
    }

    /// Whether [`rx_next`](Conn::rx_next) would give something other than
    /// [`RxNext::Idle`].
    pub(crate) fn has_rx_work(&self) -> bool {
        self.pending != 0 || (self.may_read() && (self.credit() > 0 || !self.credit_requested))
    }

    /// What to send the guest next: control packets first (an RST alone once closing),
    /// then data while the guest has credit; a CREDIT_REQUEST, once, when it has none.
    /// A control packet returned is taken off the pending set: the caller sends it.
    pub(crate) fn rx_next(&mut self) -> RxNext {
        const ORDER: [(u8, u16); 6] = [
            (P_RST, op::RST),
            (P_REQUEST, op::REQUEST),
            (P_RESPONSE, op::RESPONSE),
            (P_CREDIT_UPDATE, op::CREDIT_UPDATE),
            (P_CREDIT_REQUEST, op::CREDIT_REQUEST),
            (P_SHUTDOWN, op::SHUTDOWN),
        ];
        for (bit, op) in ORDER {
            if self.pending & bit != 0 {
                self.pending &= !bit;
                let flags = if op == op::SHUTDOWN {
                    self.local_shut
                } else {
                    0
                };
                return RxNext::Control { op, flags };
            }
        }
        if !self.may_read() {
            return RxNext::Idle;
        }
        match self.credit() {
            0 if !self.credit_requested => {
                self.credit_requested = true;
                RxNext::Control {
                    op: op::CREDIT_REQUEST,
                    flags: 0,
                }
            }
            0 => RxNext::Idle,
            credit => RxNext::Read(credit),
        }
    }

    /// Fills in the device's side of a packet header for this connection (addresses
    /// aside): `buf_alloc`, `fwd_cnt`. The guest learns the `fwd_cnt` from it, so a
    /// pending CREDIT_UPDATE is no longer needed.
    pub(crate) fn stamp(&mut self, hdr: &mut Header) {
        hdr.buf_alloc = BUF_ALLOC;
        hdr.fwd_cnt = self.fwd_cnt.0;
        self.fwd_cnt_sent = self.fwd_cnt;
        if hdr.op != op::CREDIT_UPDATE {
            self.pending &= !P_CREDIT_UPDATE;
        }
    }

    /// Sets or clears the shutdown deadline from the shutdown state.
    fn update_deadline(&mut self, now: Instant) {
        if self.state != State::Established {
            return;
        }
        let rx_closed = self.local_shut & SHUTDOWN_SEND != 0 || self.peer_shut & SHUTDOWN_RCV != 0;
        let tx_closed = (self.peer_shut & SHUTDOWN_SEND != 0 && self.out.is_empty())
            || self.local_shut & SHUTDOWN_RCV != 0;
        let grace = if self.peer_shut == SHUTDOWN_BOTH {
            Some(CLOSE_FLUSH_TIMEOUT)
        } else if rx_closed && tx_closed {
            Some(SHUTDOWN_GRACE)
        } else {
            None
        };
        match grace {
            Some(g) => {
                let at = now + g;
                if self.deadline.is_none_or(|d| at < d) {
                    self.deadline = Some(at);
                }
            }
            None => self.deadline = None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: u32 = 1 << 30;
    const PEER: u32 = 52;

    fn pkt(op: u16, len: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: PEER,
            dst_port: LOCAL,
            len,
            type_: 1,
            op,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn shutdown(flags: u32) -> Header {
        Header {
            flags,
            ..pkt(op::SHUTDOWN, 0, 4096, 0)
        }
    }

    fn control(op: u16) -> RxNext {
        RxNext::Control { op, flags: 0 }
    }

    /// An established host-initiated connection, the OK line drained, the guest with 4 KiB
    /// of credit.
    fn established(now: Instant) -> Conn {
        let mut c = Conn::new_local(LOCAL, PEER, now);
        assert_eq!(c.rx_next(), control(op::REQUEST));
        assert_eq!(c.recv(&pkt(op::RESPONSE, 0, 4096, 0), now), Recv::Done);
        assert_eq!(c.out_front(), format!("OK {LOCAL}\n").as_bytes());
        let n = c.out_len();
        c.drained(n, now);
        c
    }

    #[test]
    fn a_host_connect_is_requested_answered_and_times_out() {
        let now = Instant::now();
        let mut c = Conn::new_local(LOCAL, PEER, now);
        assert_eq!(c.state(), State::Requesting);
        assert_eq!(c.deadline(), Some(now + REQUEST_TIMEOUT));
        assert!(c.has_rx_work());
        assert_eq!(c.rx_next(), control(op::REQUEST));
        assert_eq!(c.rx_next(), RxNext::Idle);
        // Nothing but a RESPONSE or an RST is expected.
        let r = c.recv(&pkt(op::RW, 1, 4096, 0), now);
        assert_eq!(
            r,
            Recv::Violation(Violation::UnexpectedOp {
                op: op::RW,
                state: State::Requesting
            })
        );
        assert_eq!(c.recv(&pkt(op::RST, 0, 0, 0), now), Recv::Reset);
        let c = established(now);
        assert_eq!(c.state(), State::Established);
        assert_eq!(c.deadline(), None);
        // The OK line does not count as forwarded guest data.
        assert_eq!(c.fwd_cnt.0, 0);
    }

    #[test]
    fn a_guest_connect_is_answered_with_its_credit_known() {
        let req = pkt(op::REQUEST, 0, 1000, 0);
        let mut c = Conn::new_peer(&req);
        assert_eq!((c.local_port(), c.peer_port()), (LOCAL, PEER));
        assert_eq!(c.rx_next(), control(op::RESPONSE));
        c.set_host_readable();
        assert_eq!(c.rx_next(), RxNext::Read(1000));
        // A REQUEST on an existing connection breaks the protocol.
        assert!(matches!(
            c.recv(&req, Instant::now()),
            Recv::Violation(Violation::UnexpectedOp { op: 1, .. })
        ));
    }

    #[test]
    fn data_to_the_guest_never_exceeds_its_credit() {
        let now = Instant::now();
        let mut c = established(now);
        c.set_host_readable();
        assert_eq!(c.rx_next(), RxNext::Read(4096));
        c.sent_rw(4000);
        assert_eq!(c.rx_next(), RxNext::Read(96));
        c.sent_rw(96);
        // Out of credit: one CREDIT_REQUEST, then nothing until the guest gives credit.
        assert_eq!(c.rx_next(), control(op::CREDIT_REQUEST));
        assert!(!c.has_rx_work());
        assert_eq!(c.rx_next(), RxNext::Idle);
        c.recv(&pkt(op::CREDIT_UPDATE, 0, 4096, 1000), now);
        assert_eq!(c.rx_next(), RxNext::Read(1000));
        // A guest that shrinks its buffer below what is in flight has no credit, and a
        // fwd_cnt beyond what was sent gives none either.
        c.recv(&pkt(op::CREDIT_UPDATE, 0, 100, 1000), now);
        assert_eq!(c.credit(), 0);
        c.recv(&pkt(op::CREDIT_UPDATE, 0, 4096, 5000), now);
        assert_eq!(c.credit(), 0);
        // The counters wrap.
        c.tx_cnt = Wrapping(u32::MAX - 10);
        c.recv(&pkt(op::CREDIT_UPDATE, 0, 4096, u32::MAX - 100), now);
        assert_eq!(c.credit(), 4096 - 90);
        c.sent_rw(20);
        assert_eq!(c.credit(), 4096 - 110);
    }

    #[test]
    fn guest_data_is_bounded_by_buf_alloc() {
        let now = Instant::now();
        let mut c = established(now);
        assert_eq!(c.recv(&pkt(op::RW, 100, 4096, 0), now), Recv::Data);
        c.buffer(&[1; 100]);
        assert_eq!(
            c.recv(&pkt(op::RW, BUF_ALLOC - 100, 4096, 0), now),
            Recv::Data
        );
        c.buffer(&vec![2; (BUF_ALLOC - 100) as usize]);
        assert_eq!(c.out_len(), BUF_ALLOC as usize);
        assert_eq!(c.out_capacity(), BUF_ALLOC as usize);
        assert_eq!(
            c.recv(&pkt(op::RW, 1, 4096, 0), now),
            Recv::Violation(Violation::CreditOverrun {
                len: 1,
                buffered: BUF_ALLOC as usize
            })
        );
        // Draining frees credit; the memory goes back when empty.
        c.drained(BUF_ALLOC as usize, now);
        assert_eq!(c.out_capacity(), 0);
        assert_eq!(c.recv(&pkt(op::RW, 1, 4096, 0), now), Recv::Data);
    }

    #[test]
    fn credit_updates_follow_the_host_stream() {
        let now = Instant::now();
        let mut c = established(now);
        c.forwarded(CREDIT_UPDATE_THRESHOLD as usize - 1);
        assert!(!c.has_rx_work());
        c.forwarded(1);
        assert_eq!(c.rx_next(), control(op::CREDIT_UPDATE));
        let mut h = Header {
            op: op::CREDIT_UPDATE,
            ..Header::default()
        };
        c.stamp(&mut h);
        assert_eq!(
            (h.buf_alloc, h.fwd_cnt),
            (BUF_ALLOC, CREDIT_UPDATE_THRESHOLD)
        );
        // Asked for: sent; any packet carrying the fwd_cnt makes a pending one moot.
        c.recv(&pkt(op::CREDIT_REQUEST, 0, 4096, 0), now);
        assert!(c.has_rx_work());
        let mut rw = Header {
            op: op::RW,
            ..Header::default()
        };
        c.stamp(&mut rw);
        assert!(!c.has_rx_work());
    }

    #[test]
    fn shutdown_half_closes_then_ends_after_the_grace() {
        let now = Instant::now();
        let mut c = established(now);
        // The guest stops sending: the host stream's write side is shut once drained.
        c.recv(&pkt(op::RW, 5, 4096, 0), now);
        c.buffer(b"hello");
        c.recv(&shutdown(SHUTDOWN_SEND), now);
        assert!(!c.wants_host_write_shutdown());
        assert_eq!(
            c.recv(&pkt(op::RW, 1, 4096, 0), now),
            Recv::Violation(Violation::DataAfterShutdown)
        );
        c.drained(5, now);
        assert!(c.wants_host_write_shutdown());
        c.host_write_shut_done(now);
        assert_eq!(c.deadline(), None);
        // The host still sends; its EOF becomes SHUTDOWN(SEND), and both directions are
        // closed: the grace starts.
        c.set_host_readable();
        assert_eq!(c.rx_next(), RxNext::Read(4096));
        c.host_eof(now);
        assert_eq!(
            c.rx_next(),
            RxNext::Control {
                op: op::SHUTDOWN,
                flags: SHUTDOWN_SEND
            }
        );
        assert_eq!(c.rx_next(), RxNext::Idle);
        assert_eq!(c.deadline(), Some(now + SHUTDOWN_GRACE));
        assert!(!c.should_finish());
    }

    #[test]
    fn a_guest_close_is_answered_with_rst_once_flushed() {
        let now = Instant::now();
        let mut c = established(now);
        c.recv(&pkt(op::RW, 3, 4096, 0), now);
        c.buffer(b"bye");
        c.recv(&shutdown(SHUTDOWN_BOTH), now);
        assert!(c.wants_host_read_shutdown());
        c.host_read_shut_done();
        assert!(!c.should_finish());
        assert_eq!(c.deadline(), Some(now + CLOSE_FLUSH_TIMEOUT));
        c.drained(3, now);
        assert!(c.should_finish());
        c.close();
        assert_eq!(c.state(), State::Closing);
        assert_eq!(c.rx_next(), control(op::RST));
        assert_eq!(c.rx_next(), RxNext::Idle);
        // Packets crossing the RST are ignored, an RST from the guest ends it.
        assert_eq!(c.recv(&pkt(op::RW, 1, 4096, 0), now), Recv::Done);
        assert_eq!(c.recv(&pkt(op::RST, 0, 0, 0), now), Recv::Reset);
    }

    #[test]
    fn a_host_hangup_shuts_both_directions() {
        let now = Instant::now();
        let mut c = established(now);
        c.set_host_hup(now);
        assert_eq!(c.rx_next(), RxNext::Read(4096));
        c.host_eof(now);
        assert_eq!(
            c.rx_next(),
            RxNext::Control {
                op: op::SHUTDOWN,
                flags: SHUTDOWN_BOTH
            }
        );
        // Data racing the SHUTDOWN is dropped, not a violation.
        assert_eq!(c.recv(&pkt(op::RW, 1, 4096, 0), now), Recv::Discard);
        assert_eq!(c.deadline(), Some(now + SHUTDOWN_GRACE));
        // After the guest refused data, a hang-up needs no read to end the connection.
        let mut c = established(now);
        c.recv(&shutdown(SHUTDOWN_RCV), now);
        c.set_host_hup(now);
        assert_eq!(
            c.rx_next(),
            RxNext::Control {
                op: op::SHUTDOWN,
                flags: SHUTDOWN_BOTH
            }
        );
    }
}
