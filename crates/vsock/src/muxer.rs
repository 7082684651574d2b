// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The connection table and the host side: guest packets dispatched to connections, host
//! connections accepted and their `CONNECT` lines read, host streams read into packets for
//! the guest and written with guest data, all through one internal epoll.
//!
//! Every host socket is non-blocking and registered edge-triggered in the internal epoll
//! (`IN | OUT | RDHUP` for streams, `IN` for the listener and the timer), never modified.
//! Readiness is remembered per connection (`host_readable`, cleared by EAGAIN) and acted on
//! when the device can: a stream is read only when the guest has credit and an RX buffer
//! is in hand, and written only while guest data waits for it. Each readiness change is
//! reported once, so an event the device cannot act on yet (no credit, no RX buffer) never
//! comes back, and once [`Muxer::process_events`] drains the internal epoll its fd is not
//! readable: the outer event loop cannot spin on it.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use log::debug;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use tvm_util::{warn_once, WarnOnce};

use crate::conn::{Conn, Recv, RxNext, State};
use crate::counters::VsockCounters;
use crate::host::{parse_connect, UdsHost, MAX_CONNECT_LINE};
use crate::packet::{check_tx, op, Header, Invalid, TxError, HOST_CID, TYPE_STREAM};
use crate::{Error, Result};

/// Most connections at once (established, being requested, or closing); a guest request
/// beyond it gets an RST and a host connection is closed.
pub const MAX_CONNECTIONS: usize = 1024;

/// The first port the device gives a host-initiated connection; the next ones count up
/// from it (wrapping back to it), skipping ports in use.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// How long a host connection may take to send its `CONNECT <port>` line.
pub const CONNECT_LINE_TIMEOUT: Duration = Duration::from_secs(5);

/// Most RSTs for unknown connections waiting for RX buffers; more are dropped.
pub(crate) const MAX_PENDING_RST: usize = 1024;

/// The name in log lines.
pub(crate) const NAME: &str = "virtio-vsock";

const TOKEN_LISTENER: u64 = 0;
const TOKEN_TIMER: u64 = 1;
const FIRST_STREAM_TOKEN: u64 = 2;

/// Events taken from the internal epoll per `epoll_wait`.
const EPOLL_BATCH: usize = 64;
/// Most `epoll_wait` rounds per [`Muxer::process_events`]; what is left keeps the internal
/// epoll readable, so the outer loop comes back after its other work.
const MAX_EPOLL_ROUNDS: usize = 16;

fn stream_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

/// A connection's identity: the device's port and the guest's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ConnKey {
    /// The device's (host) port.
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
}

/// Where host streams come from.
#[derive(Debug)]
pub(crate) enum Host {
    /// Firecracker's hybrid vsock: the listener at `uds_path`, `<uds_path>_<port>` for
    /// guest connects.
    Uds(UdsHost),
    /// No filesystem: each guest connect gets one end of a socket pair, whose other end is
    /// kept (the latest [`MAX_CONNECTIONS`]). For fuzzing.
    Pairs(VecDeque<UnixStream>),
}

/// A connection and its host stream.
#[derive(Debug)]
struct Entry {
    conn: Conn,
    /// None once the device ended the connection (the stream is closed at once).
    stream: Option<UnixStream>,
    token: u64,
    /// In `rx_ready`.
    queued: bool,
}

/// A host connection accepted on the listener, its `CONNECT` line not complete yet.
#[derive(Debug)]
struct Accepting {
    stream: UnixStream,
    line: [u8; MAX_CONNECT_LINE],
    len: usize,
    deadline: Instant,
}

/// An RST for a packet that has no connection: the packet's addresses, swapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Reply {
    src_cid: u64,
    src_port: u32,
    dst_port: u32,
}

/// Guest errors (and host trouble) reported once at `warn!`, then at `debug!`.
#[derive(Debug, Default)]
struct Warnings {
    tx_chain: WarnOnce,
    len: WarnOnce,
    src_cid: WarnOnce,
    dst_cid: WarnOnce,
    type_: WarnOnce,
    op: WarnOnce,
    protocol: WarnOnce,
    limit: WarnOnce,
    rst_queue: WarnOnce,
    host_line: WarnOnce,
    host_io: WarnOnce,
}

/// The connection table, the host listener and streams, and the internal epoll.
#[derive(Debug)]
pub(crate) struct Muxer {
    guest_cid: u64,
    host: Host,
    epoll: Epoll,
    timer: TimerFd,
    /// The deadline the timer is armed for.
    timer_at: Option<Instant>,
    /// A deadline may have changed since the timer was armed.
    dirty: bool,
    /// The device is active: host connections may be forwarded to the guest.
    active: bool,
    /// Most connections at once: [`MAX_CONNECTIONS`] (lower in tests).
    max_conns: usize,
    conns: HashMap<ConnKey, Entry>,
    /// Stream token -> connection.
    tokens: HashMap<u64, ConnKey>,
    accepting: HashMap<u64, Accepting>,
    /// Connections that may have something to send the guest, in turn.
    rx_ready: VecDeque<ConnKey>,
    /// RSTs for packets without a connection.
    rsts: VecDeque<Reply>,
    next_token: u64,
    next_port: u32,
    /// Counts so far; the device adds its own.
    pub(crate) counters: VsockCounters,
    warnings: Warnings,
}

impl Muxer {
    /// A muxer for guest `guest_cid` over `host`, inactive.
    ///
    /// # Errors
    ///
    /// [`Error::CreateEpoll`], [`Error::CreateTimer`], [`Error::RegisterEvent`].
    pub(crate) fn new(guest_cid: u64, host: Host) -> Result<Muxer> {
        let epoll = Epoll::new().map_err(Error::CreateEpoll)?;
        let timer = TimerFd::new()
            .map_err(|e| Error::CreateTimer(io::Error::from_raw_os_error(e.errno())))?;
        let level = EventSet::IN | EventSet::EDGE_TRIGGERED;
        epoll
            .ctl(
                ControlOperation::Add,
                timer.as_raw_fd(),
                EpollEvent::new(level, TOKEN_TIMER),
            )
            .map_err(Error::RegisterEvent)?;
        if let Host::Uds(h) = &host {
            epoll
                .ctl(
                    ControlOperation::Add,
                    h.listener().as_raw_fd(),
                    EpollEvent::new(level, TOKEN_LISTENER),
                )
                .map_err(Error::RegisterEvent)?;
        }
        Ok(Muxer {
            guest_cid,
            host,
            epoll,
            timer,
            timer_at: None,
            dirty: false,
            active: false,
            max_conns: MAX_CONNECTIONS,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            accepting: HashMap::new(),
            rx_ready: VecDeque::new(),
            rsts: VecDeque::new(),
            next_token: FIRST_STREAM_TOKEN,
            next_port: FIRST_LOCAL_PORT,
            counters: VsockCounters::default(),
            warnings: Warnings::default(),
        })
    }

    /// The internal epoll's fd, for the outer event loop.
    pub(crate) fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// The listener's path, if there is a listener.
    pub(crate) fn uds_path(&self) -> Option<&Path> {
        match &self.host {
            Host::Uds(h) => Some(h.path()),
            Host::Pairs(_) => None,
        }
    }

    /// Connections in the table.
    pub(crate) fn conn_count(&self) -> usize {
        self.conns.len()
    }

    /// Host connections waiting for their `CONNECT` line.
    pub(crate) fn accepting_count(&self) -> usize {
        self.accepting.len()
    }

    /// Guest bytes held for the host stream of a connection (allocated bytes), if it exists.
    #[cfg(test)]
    pub(crate) fn buffered(&self, local_port: u32, peer_port: u32) -> Option<(usize, usize)> {
        let key = ConnKey {
            local_port,
            peer_port,
        };
        self.conns
            .get(&key)
            .map(|e| (e.conn.out_len(), e.conn.out_capacity()))
    }

    /// Lowers the connection limit (tests: [`MAX_CONNECTIONS`] sockets would hit the
    /// process's descriptor limit).
    #[cfg(test)]
    pub(crate) fn set_max_connections(&mut self, n: usize) {
        self.max_conns = n;
    }

    /// Whether host connections may be forwarded to the guest.
    pub(crate) fn set_active(&mut self, active: bool) {
        self.active = active;
    }

    /// Drops every connection (closing the host streams) and every packet waiting for the
    /// guest. Host connections still sending their `CONNECT` line stay.
    pub(crate) fn drop_all(&mut self) {
        let n = self.conns.len() as u64;
        self.conns.clear();
        self.tokens.clear();
        self.rx_ready.clear();
        self.rsts.clear();
        self.counters.conns_removed += n;
        self.dirty = true;
    }

    /// Whether there may be a packet for the guest.
    pub(crate) fn has_rx_work(&self) -> bool {
        !self.rsts.is_empty() || !self.rx_ready.is_empty()
    }

    fn queue_rx(&mut self, key: ConnKey) {
        if let Some(e) = self.conns.get_mut(&key) {
            if !e.queued && e.conn.has_rx_work() {
                e.queued = true;
                self.rx_ready.push_back(key);
            }
        }
    }

    /// Queues an RST answering `hdr`, a packet without a connection (never for an RST).
    fn reply_rst(&mut self, hdr: &Header) {
        if hdr.op == op::RST {
            return;
        }
        if self.rsts.len() >= MAX_PENDING_RST {
            self.counters.rst_dropped += 1;
            warn_once!(
                self.warnings.rst_queue,
                "{NAME}: {MAX_PENDING_RST} rsts already wait for rx buffers: rst to port {} dropped",
                hdr.src_port
            );
            return;
        }
        self.rsts.push_back(Reply {
            src_cid: hdr.dst_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
        });
    }

    /// Answers a malformed packet from the guest with an RST: the guest applies it to the
    /// connection the packet's addresses name, so if the device has that connection, it
    /// ends it too.
    fn refuse(&mut self, hdr: &Header) {
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.op != op::RST && hdr.dst_cid == HOST_CID && self.conns.contains_key(&key) {
            self.close_conn(key, true);
        } else {
            self.reply_rst(hdr);
        }
    }

    /// Handles one TX packet: `parsed` from [`crate::packet::read_tx`], its payload in
    /// `data`.
    pub(crate) fn handle_tx(
        &mut self,
        parsed: std::result::Result<Header, TxError>,
        data: &[u8],
        now: Instant,
    ) {
        let hdr = match parsed {
            Ok(h) => h,
            Err(TxError::Chain(why)) => {
                self.counters.tx_errors += 1;
                warn_once!(self.warnings.tx_chain, "{NAME}: tx chain dropped: {why}");
                return;
            }
            Err(e @ TxError::Len { hdr, .. }) => {
                self.counters.tx_errors += 1;
                if hdr.src_cid != self.guest_cid {
                    self.warn_invalid(&hdr, Invalid::SrcCid);
                    return;
                }
                warn_once!(self.warnings.len, "{NAME}: tx packet refused: {e}");
                self.refuse(&hdr);
                return;
            }
        };
        if let Err(why) = check_tx(&hdr, self.guest_cid) {
            self.counters.tx_errors += 1;
            self.warn_invalid(&hdr, why);
            if why.answer_rst(&hdr) {
                self.refuse(&hdr);
            }
            return;
        }
        self.counters.tx_packets += 1;
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        let Some(e) = self.conns.get_mut(&key) else {
            match hdr.op {
                op::REQUEST => self.guest_connect(&hdr),
                op::RST => debug!(
                    "{NAME}: rst from guest port {} for unknown host port {}",
                    hdr.src_port, hdr.dst_port
                ),
                // Usually a packet crossing the device's RST.
                o => {
                    debug!(
                        "{NAME}: op {o} from guest port {} for unknown host port {}: rst",
                        hdr.src_port, hdr.dst_port
                    );
                    self.reply_rst(&hdr);
                }
            }
            return;
        };
        match e.conn.recv(&hdr, now) {
            Recv::Done | Recv::Discard => {}
            Recv::Data => {
                self.counters.tx_bytes += data.len() as u64;
                if let Err(err) = forward(e, data) {
                    self.host_error(key, "write", &err);
                }
            }
            Recv::Reset => {
                debug!(
                    "{NAME}: guest reset the connection {}:{}",
                    key.local_port, key.peer_port
                );
                self.remove(key);
                return;
            }
            Recv::Violation(v) => {
                self.counters.tx_errors += 1;
                warn_once!(
                    self.warnings.protocol,
                    "{NAME}: guest port {} to host port {}: {v}: connection reset",
                    key.peer_port,
                    key.local_port
                );
                self.close_conn(key, true);
                return;
            }
        }
        self.sync(key, now);
    }

    fn warn_invalid(&mut self, hdr: &Header, why: Invalid) {
        let w = &mut self.warnings;
        match why {
            Invalid::SrcCid => warn_once!(
                w.src_cid,
                "{NAME}: tx packet with source cid {}, not the guest's {}: dropped",
                hdr.src_cid,
                self.guest_cid
            ),
            Invalid::DstCid => warn_once!(
                w.dst_cid,
                "{NAME}: tx packet for cid {}, not the host (2): refused",
                hdr.dst_cid
            ),
            Invalid::Type => warn_once!(
                w.type_,
                "{NAME}: tx packet of socket type {}, not stream (1): refused",
                hdr.type_
            ),
            Invalid::Op => warn_once!(
                w.op,
                "{NAME}: tx packet with unknown op {}: refused",
                hdr.op
            ),
        }
    }

    /// A guest REQUEST for host port `hdr.dst_port`: connect to the host listener for it.
    fn guest_connect(&mut self, hdr: &Header) {
        if self.conns.len() >= self.max_conns {
            self.counters.guest_refused += 1;
            warn_once!(
                self.warnings.limit,
                "{NAME}: {} connections open: guest connect to port {} refused",
                self.max_conns,
                hdr.dst_port
            );
            self.reply_rst(hdr);
            return;
        }
        let stream = match &mut self.host {
            Host::Uds(h) => h.connect(hdr.dst_port),
            Host::Pairs(peers) => socket_pair(peers),
        };
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                self.counters.guest_refused += 1;
                debug!(
                    "{NAME}: guest connect from port {} to host port {} refused: {e}",
                    hdr.src_port, hdr.dst_port
                );
                self.reply_rst(hdr);
                return;
            }
        };
        let token = match self.register(&stream) {
            Ok(t) => t,
            Err(e) => {
                self.counters.guest_refused += 1;
                warn_once!(self.warnings.host_io, "{NAME}: epoll_ctl failed: {e}");
                self.reply_rst(hdr);
                return;
            }
        };
        let conn = Conn::new_peer(hdr);
        let key = ConnKey {
            local_port: conn.local_port(),
            peer_port: conn.peer_port(),
        };
        debug!(
            "{NAME}: guest port {} connected to host port {}",
            key.peer_port, key.local_port
        );
        self.insert(key, conn, stream, token);
    }

    fn insert(&mut self, key: ConnKey, conn: Conn, stream: UnixStream, token: u64) {
        self.conns.insert(
            key,
            Entry {
                conn,
                stream: Some(stream),
                token,
                queued: false,
            },
        );
        self.tokens.insert(token, key);
        self.counters.conns_added += 1;
        self.dirty = true;
        self.queue_rx(key);
    }

    fn register(&mut self, stream: &UnixStream) -> io::Result<u64> {
        let token = self.next_token;
        self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(stream_events(), token),
        )?;
        self.next_token += 1;
        Ok(token)
    }

    /// Forgets a connection (its host stream, if still open, is closed).
    fn remove(&mut self, key: ConnKey) {
        if let Some(e) = self.conns.remove(&key) {
            self.tokens.remove(&e.token);
            self.counters.conns_removed += 1;
            self.dirty = true;
        }
    }

    /// Ends a connection from the device's side: the host stream is closed now, an RST
    /// goes to the guest, then the connection is forgotten. `killed` counts it in
    /// `conns_killed` (anything but the answer to a guest's close).
    fn close_conn(&mut self, key: ConnKey, killed: bool) {
        let Some(e) = self.conns.get_mut(&key) else {
            return;
        };
        if e.conn.state() == State::Closing {
            return;
        }
        e.conn.close();
        if e.stream.take().is_some() {
            self.tokens.remove(&e.token);
        }
        if killed {
            self.counters.conns_killed += 1;
        }
        self.dirty = true;
        self.queue_rx(key);
    }

    fn host_error(&mut self, key: ConnKey, what: &str, err: &io::Error) {
        self.counters.host_errors += 1;
        debug!(
            "{NAME}: host stream {what} on {}:{} failed: {err}: connection reset",
            key.local_port, key.peer_port
        );
        self.close_conn(key, true);
    }

    /// Brings the host stream in line with the connection's state (writes what waits for
    /// it, shuts it down as the guest asked, ends the connection when the guest closed it)
    /// and queues the connection if it has something for the guest.
    fn sync(&mut self, key: ConnKey, now: Instant) {
        let Some(e) = self.conns.get_mut(&key) else {
            return;
        };
        self.dirty = true;
        if e.conn.state() != State::Closing {
            if let Err(err) = flush(e, now) {
                self.host_error(key, "write", &err);
                return;
            }
            if let Some(s) = &e.stream {
                if e.conn.wants_host_read_shutdown() {
                    if let Err(err) = s.shutdown(Shutdown::Read) {
                        debug!("{NAME}: shutdown(read) of a host stream failed: {err}");
                    }
                    e.conn.host_read_shut_done();
                }
                if e.conn.wants_host_write_shutdown() {
                    if let Err(err) = s.shutdown(Shutdown::Write) {
                        debug!("{NAME}: shutdown(write) of a host stream failed: {err}");
                    }
                    e.conn.host_write_shut_done(now);
                }
            }
            if e.conn.should_finish() {
                debug!(
                    "{NAME}: guest closed the connection {}:{}",
                    key.local_port, key.peer_port
                );
                self.close_conn(key, false);
                return;
            }
        }
        self.queue_rx(key);
    }

    /// The next packet for the guest, whose payload (RW only) is read from a host stream
    /// into `buf` (the room the RX buffer in hand has): the header, and the payload
    /// length. None when nothing is to be sent; connections that wait for room larger than
    /// `buf` stay queued.
    pub(crate) fn next_rx(&mut self, buf: &mut [u8], now: Instant) -> Option<(Header, usize)> {
        if let Some(r) = self.rsts.pop_front() {
            let hdr = Header {
                src_cid: r.src_cid,
                dst_cid: self.guest_cid,
                src_port: r.src_port,
                dst_port: r.dst_port,
                len: 0,
                type_: TYPE_STREAM,
                op: op::RST,
                flags: 0,
                buf_alloc: 0,
                fwd_cnt: 0,
            };
            return Some((hdr, 0));
        }
        let mut turns = self.rx_ready.len();
        while turns > 0 {
            turns -= 1;
            let Some(key) = self.rx_ready.pop_front() else {
                break;
            };
            let Some(e) = self.conns.get_mut(&key) else {
                continue;
            };
            e.queued = false;
            let mut failed = None;
            loop {
                match e.conn.rx_next() {
                    RxNext::Control { op, flags } => {
                        let mut hdr = conn_header(self.guest_cid, key, op, flags, 0);
                        e.conn.stamp(&mut hdr);
                        if op == op::RST {
                            self.remove(key);
                        } else {
                            self.queue_rx(key);
                        }
                        return Some((hdr, 0));
                    }
                    RxNext::Read(credit) => {
                        let max = (credit as usize).min(buf.len());
                        let Some(s) = e.stream.as_ref().filter(|_| max > 0) else {
                            // A header-only RX buffer: data waits for a larger one.
                            e.queued = true;
                            self.rx_ready.push_back(key);
                            break;
                        };
                        match (&*s).read(&mut buf[..max]) {
                            Ok(0) => {
                                e.conn.host_eof(now);
                                self.dirty = true;
                            }
                            Ok(n) => {
                                let mut hdr = conn_header(self.guest_cid, key, op::RW, 0, n as u32);
                                e.conn.stamp(&mut hdr);
                                e.conn.sent_rw(n as u32);
                                self.queue_rx(key);
                                return Some((hdr, n));
                            }
                            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                                e.conn.host_would_block();
                                break;
                            }
                            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                            Err(err) => {
                                failed = Some(err);
                                break;
                            }
                        }
                    }
                    RxNext::Idle => break,
                }
            }
            if let Some(err) = failed {
                self.host_error(key, "read", &err);
                // The RST is next.
                if let Some(pos) = self.rx_ready.iter().position(|k| *k == key) {
                    self.rx_ready.remove(pos);
                    self.rx_ready.push_front(key);
                    turns += 1;
                }
            }
        }
        None
    }

    /// Handles what the internal epoll reports: new host connections, `CONNECT` lines,
    /// host stream readiness, the timer. Never blocks.
    pub(crate) fn process_events(&mut self, now: Instant) {
        let mut events = [EpollEvent::default(); EPOLL_BATCH];
        for _ in 0..MAX_EPOLL_ROUNDS {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn_once!(self.warnings.host_io, "{NAME}: epoll_wait failed: {e}");
                    break;
                }
            };
            for ev in &events[..n.min(EPOLL_BATCH)] {
                self.handle_event(ev.data(), ev.event_set(), now);
            }
            if n < EPOLL_BATCH {
                break;
            }
        }
    }

    fn handle_event(&mut self, token: u64, set: EventSet, now: Instant) {
        match token {
            TOKEN_LISTENER => self.accept_all(now),
            TOKEN_TIMER => {
                // The timer is re-armed (or cleared), which also resets its expiry count:
                // it is never read.
                self.timer_at = None;
                self.timeout_check(now);
            }
            t if self.accepting.contains_key(&t) => self.read_connect_line(t, now),
            t => {
                let Some(&key) = self.tokens.get(&t) else {
                    // Closed earlier in this batch.
                    return;
                };
                if let Some(e) = self.conns.get_mut(&key) {
                    if set.intersects(
                        EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
                    ) {
                        e.conn.set_host_readable();
                    }
                    if set.contains(EventSet::HANG_UP) {
                        e.conn.set_host_hup(now);
                    }
                }
                self.sync(key, now);
            }
        }
    }

    fn accept_all(&mut self, now: Instant) {
        loop {
            let Host::Uds(h) = &self.host else {
                return;
            };
            match h.listener().accept() {
                Ok((stream, _)) => self.add_accepted(stream, now),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    // EMFILE and the like: the connection stays in the backlog until the
                    // next one arrives.
                    self.counters.host_errors += 1;
                    warn_once!(self.warnings.host_io, "{NAME}: accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn add_accepted(&mut self, stream: UnixStream, now: Instant) {
        if self.conns.len() + self.accepting.len() >= self.max_conns {
            self.counters.host_refused += 1;
            warn_once!(
                self.warnings.limit,
                "{NAME}: {} connections open: host connection closed",
                self.max_conns
            );
            return;
        }
        if let Err(e) = stream.set_nonblocking(true) {
            self.counters.host_errors += 1;
            warn_once!(self.warnings.host_io, "{NAME}: set_nonblocking failed: {e}");
            return;
        }
        let token = match self.register(&stream) {
            Ok(t) => t,
            Err(e) => {
                self.counters.host_errors += 1;
                warn_once!(self.warnings.host_io, "{NAME}: epoll_ctl failed: {e}");
                return;
            }
        };
        self.accepting.insert(
            token,
            Accepting {
                stream,
                line: [0; MAX_CONNECT_LINE],
                len: 0,
                deadline: now + CONNECT_LINE_TIMEOUT,
            },
        );
        self.dirty = true;
        // The line may be there already.
        self.read_connect_line(token, now);
    }

    /// Reads a host connection's `CONNECT` line, a byte at a time so that stream data the
    /// host sends right after it stays in the stream.
    fn read_connect_line(&mut self, token: u64, now: Instant) {
        let Some(a) = self.accepting.get_mut(&token) else {
            return;
        };
        loop {
            if a.len == MAX_CONNECT_LINE {
                self.refuse_host(token, "no newline in the first 32 bytes");
                return;
            }
            let mut b = [0u8; 1];
            match (&a.stream).read(&mut b) {
                Ok(0) => {
                    self.accepting.remove(&token);
                    self.counters.host_refused += 1;
                    debug!("{NAME}: host connection closed before its CONNECT line");
                    self.dirty = true;
                    return;
                }
                Ok(_) => {
                    a.line[a.len] = b[0];
                    a.len += 1;
                    if b[0] == b'\n' {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.accepting.remove(&token);
                    self.counters.host_errors += 1;
                    debug!("{NAME}: reading a CONNECT line failed: {e}");
                    self.dirty = true;
                    return;
                }
            }
        }
        let port = match parse_connect(&a.line[..a.len]) {
            Ok(p) => p,
            Err(why) => {
                self.refuse_host(token, why);
                return;
            }
        };
        let Some(a) = self.accepting.remove(&token) else {
            return;
        };
        self.dirty = true;
        self.host_connect(a.stream, token, port, now);
    }

    fn refuse_host(&mut self, token: u64, why: &str) {
        if let Some(a) = self.accepting.remove(&token) {
            self.counters.host_refused += 1;
            let line = String::from_utf8_lossy(&a.line[..a.len]);
            warn_once!(
                self.warnings.host_line,
                "{NAME}: host connection closed: {why} ({line:?})"
            );
            self.dirty = true;
        }
    }

    /// A host connection asked for guest port `port`: send the guest a REQUEST.
    fn host_connect(&mut self, stream: UnixStream, token: u64, port: u32, now: Instant) {
        if !self.active {
            self.counters.host_refused += 1;
            debug!("{NAME}: device not active: host connection to guest port {port} closed");
            return;
        }
        if self.conns.len() >= self.max_conns {
            self.counters.host_refused += 1;
            warn_once!(
                self.warnings.limit,
                "{NAME}: {} connections open: host connection to guest port {port} closed",
                self.max_conns
            );
            return;
        }
        let Some(local_port) = self.alloc_port() else {
            self.counters.host_refused += 1;
            debug!("{NAME}: no free local port: host connection to guest port {port} closed");
            return;
        };
        let mut conn = Conn::new_local(local_port, port, now);
        // Bytes the host sent after its line are read once the guest accepts.
        conn.set_host_readable();
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        debug!("{NAME}: host connection to guest port {port} from local port {local_port}");
        self.insert(key, conn, stream, token);
    }

    /// The next local port from the counter that no connection uses.
    fn alloc_port(&mut self) -> Option<u32> {
        // At most max_conns ports are in use, so one of max_conns + 1 is free.
        for _ in 0..=self.max_conns {
            let p = self.next_port;
            // u32::MAX is VMADDR_PORT_ANY.
            self.next_port = if p >= u32::MAX - 1 {
                FIRST_LOCAL_PORT
            } else {
                p + 1
            };
            if !self.conns.keys().any(|k| k.local_port == p) {
                return Some(p);
            }
        }
        None
    }

    /// Ends what waited too long at `now`: host connections without a `CONNECT` line,
    /// requests the guest did not answer, connections shut down both ways past their grace.
    pub(crate) fn timeout_check(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .accepting
            .iter()
            .filter(|(_, a)| a.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in late {
            self.accepting.remove(&t);
            self.counters.host_refused += 1;
            debug!(
                "{NAME}: host connection closed: no CONNECT line within {CONNECT_LINE_TIMEOUT:?}"
            );
        }
        let late: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, e)| e.conn.deadline().is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in late {
            if let Some(e) = self.conns.get(&key) {
                debug!(
                    "{NAME}: connection {}:{} timed out in state {:?}: reset",
                    key.local_port,
                    key.peer_port,
                    e.conn.state()
                );
            }
            self.close_conn(key, true);
        }
        self.dirty = true;
    }

    /// Arms the timer for the earliest deadline (or disarms it), if any may have changed.
    pub(crate) fn rearm_timer(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        let next = self
            .accepting
            .values()
            .map(|a| a.deadline)
            .chain(self.conns.values().filter_map(|e| e.conn.deadline()))
            .min();
        if next == self.timer_at {
            return;
        }
        self.timer_at = next;
        let res = match next {
            None => self.timer.clear(),
            Some(at) => {
                let wait = at
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1));
                self.timer.reset(wait, None)
            }
        };
        if let Err(e) = res {
            warn_once!(self.warnings.host_io, "{NAME}: timerfd_settime failed: {e}");
        }
    }

    /// Whether the timer is armed (for tests).
    #[cfg(test)]
    pub(crate) fn timer_armed(&self) -> bool {
        self.timer_at.is_some()
    }
}

/// A header from the device to the guest on connection `key`.
fn conn_header(guest_cid: u64, key: ConnKey, op: u16, flags: u32, len: u32) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: guest_cid,
        src_port: key.local_port,
        dst_port: key.peer_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags,
        buf_alloc: 0,
        fwd_cnt: 0,
    }
}

/// Writes an RW payload to the host stream as far as it takes it, and keeps the rest.
fn forward(e: &mut Entry, data: &[u8]) -> io::Result<()> {
    let mut done = 0;
    if !e.conn.has_out() {
        if let Some(s) = &e.stream {
            while done < data.len() {
                match (&*s).write(&data[done..]) {
                    Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                    Ok(n) => done += n,
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => return Err(err),
                }
            }
        }
    }
    e.conn.forwarded(done);
    if done < data.len() {
        e.conn.buffer(&data[done..]);
    }
    Ok(())
}

/// Writes what waits for the host stream until it is all written or the stream is full.
fn flush(e: &mut Entry, now: Instant) -> io::Result<()> {
    let Some(s) = e.stream.as_ref() else {
        return Ok(());
    };
    while e.conn.has_out() {
        match (&*s).write(e.conn.out_front()) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => e.conn.drained(n, now),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// One end of a fresh socket pair; the other end is kept in `peers`.
fn socket_pair(peers: &mut VecDeque<UnixStream>) -> io::Result<UnixStream> {
    let (a, b) = UnixStream::pair()?;
    a.set_nonblocking(true)?;
    b.set_nonblocking(true)?;
    peers.push_back(b);
    if peers.len() > MAX_CONNECTIONS {
        peers.pop_front();
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const CID: u64 = 3;

    fn gpkt(op: u16, src_port: u32, dst_port: u32, len: u32, buf_alloc: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc,
            fwd_cnt: 0,
        }
    }

    fn muxer() -> Muxer {
        let mut m = Muxer::new(CID, Host::Pairs(VecDeque::new())).unwrap();
        m.set_active(true);
        m
    }

    /// Everything the muxer would send, in RX buffers with `room` payload bytes.
    fn drain(m: &mut Muxer, room: usize) -> Vec<(Header, Vec<u8>)> {
        let mut buf = vec![0u8; room];
        let mut out = Vec::new();
        while let Some((h, n)) = m.next_rx(&mut buf, Instant::now()) {
            out.push((h, buf[..n].to_vec()));
        }
        out
    }

    /// The host end of the latest guest connect.
    fn last_peer(m: &Muxer) -> &UnixStream {
        match &m.host {
            Host::Pairs(p) => p.back().unwrap(),
            Host::Uds(_) => unreachable!(),
        }
    }

    #[test]
    fn a_guest_connection_over_a_socket_pair() {
        let now = Instant::now();
        let mut m = muxer();
        m.handle_tx(Ok(gpkt(op::REQUEST, 1000, 52, 0, 8)), &[], now);
        let out = drain(&mut m, 4096);
        assert_eq!(out.len(), 1);
        let resp = out[0].0;
        assert_eq!(
            (
                resp.op,
                resp.src_cid,
                resp.dst_cid,
                resp.src_port,
                resp.dst_port
            ),
            (op::RESPONSE, HOST_CID, CID, 52, 1000)
        );
        assert_eq!(m.conn_count(), 1);
        // Guest to host, straight into the stream.
        m.handle_tx(Ok(gpkt(op::RW, 1000, 52, 5, 8)), b"hello", now);
        let mut buf = [0u8; 16];
        assert_eq!(last_peer(&m).read(&mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"hello");
        assert_eq!(m.buffered(52, 1000), Some((0, 0)));
        // Host to guest, within the guest's 8 bytes of credit, then a credit request.
        last_peer(&m).write_all(&[7; 20]).unwrap();
        m.process_events(now);
        let out = drain(&mut m, 4096);
        let ops: Vec<_> = out.iter().map(|(h, d)| (h.op, d.len())).collect();
        assert_eq!(ops, [(op::RW, 8), (op::CREDIT_REQUEST, 0)]);
        assert_eq!(out[0].0.fwd_cnt, 5);
        // Room smaller than the credit limits a packet too.
        m.handle_tx(Ok(gpkt(op::CREDIT_UPDATE, 1000, 52, 0, 100)), &[], now);
        let out = drain(&mut m, 3);
        assert!(out.iter().all(|(h, d)| h.op == op::RW && d.len() <= 3));
        assert_eq!(out.iter().map(|(_, d)| d.len()).sum::<usize>(), 12);
    }

    #[test]
    fn local_ports_skip_those_in_use_and_wrap() {
        let now = Instant::now();
        let mut m = muxer();
        // A guest connection whose host port is the first local port.
        m.handle_tx(
            Ok(gpkt(op::REQUEST, 1000, FIRST_LOCAL_PORT, 0, 4096)),
            &[],
            now,
        );
        assert_eq!(m.alloc_port(), Some(FIRST_LOCAL_PORT + 1));
        m.next_port = u32::MAX - 1;
        assert_eq!(m.alloc_port(), Some(u32::MAX - 1));
        // u32::MAX (VMADDR_PORT_ANY) is skipped, and so is the port in use.
        assert_eq!(m.alloc_port(), Some(FIRST_LOCAL_PORT + 1));
    }

    #[test]
    fn rsts_for_unknown_connections_are_bounded() {
        tvm_util::test_log::start();
        let now = Instant::now();
        let mut m = muxer();
        let n = MAX_PENDING_RST + 10;
        for port in 0..n as u32 {
            m.handle_tx(Ok(gpkt(op::RW, port, 9, 1, 4096)), b"x", now);
        }
        assert_eq!(m.counters.rst_dropped, 10);
        let out = drain(&mut m, 0);
        assert_eq!(out.len(), MAX_PENDING_RST);
        assert!(out
            .iter()
            .enumerate()
            .all(|(i, (h, _))| h.op == op::RST && h.src_port == 9 && h.dst_port == i as u32));
        let warns = tvm_util::test_log::lines(log::Level::Warn);
        assert_eq!(warns.len(), 1, "{warns:?}");
        // An RST for an unknown connection is not answered.
        m.handle_tx(Ok(gpkt(op::RST, 1, 9, 0, 0)), &[], now);
        assert!(drain(&mut m, 0).is_empty());
    }

    #[test]
    fn the_timer_is_armed_only_while_a_deadline_waits() {
        let now = Instant::now();
        let mut m = muxer();
        m.rearm_timer();
        assert!(!m.timer_armed());
        m.handle_tx(Ok(gpkt(op::REQUEST, 1000, 52, 0, 4096)), &[], now);
        drain(&mut m, 4096);
        m.rearm_timer();
        assert!(!m.timer_armed());
        // Both directions shut: the grace deadline arms the timer.
        let mut sd = gpkt(op::SHUTDOWN, 1000, 52, 0, 4096);
        sd.flags = crate::packet::SHUTDOWN_SEND;
        m.handle_tx(Ok(sd), &[], now);
        last_peer(&m).shutdown(Shutdown::Write).unwrap();
        let end = Instant::now() + Duration::from_secs(5);
        while !drain(&mut m, 4096)
            .iter()
            .any(|(h, _)| h.op == op::SHUTDOWN)
        {
            assert!(Instant::now() < end);
            m.process_events(Instant::now());
        }
        m.rearm_timer();
        assert!(m.timer_armed());
        m.timeout_check(Instant::now() + crate::SHUTDOWN_GRACE + Duration::from_secs(1));
        let out = drain(&mut m, 4096);
        assert_eq!(out[0].0.op, op::RST);
        m.rearm_timer();
        assert!(!m.timer_armed());
        assert_eq!(m.conn_count(), 0);
        assert_eq!(m.counters.conns_killed, 1);
    }
}
