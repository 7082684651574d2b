// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! One client connection: a bounded read buffer, the request being received, at most one
//! request waiting for the handler, and the bytes still to be written.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use log::debug;
use vmm_sys_util::epoll::EventSet;

use crate::request::{parse_head, Head, HeadStatus};
use crate::response::{serialize, CONTINUE};
use crate::{Limits, Request, RequestError, Response};

/// Bytes asked of the socket per `read`.
const READ_CHUNK: usize = 16 * 1024;

/// Output buffer capacity kept after a large response has been written.
const KEEP_OUT_CAPACITY: usize = 64 * 1024;

/// A complete request (or the error that replaced it) waiting for the handler.
#[derive(Debug)]
pub(crate) struct Ready {
    /// Arrival order across all connections.
    pub seq: u64,
    pub item: Result<Request, RequestError>,
    /// Whether the connection may stay open after the response.
    pub keep_alive: bool,
    /// The request was `HEAD`: the response goes without its body.
    pub head_request: bool,
}

/// Which timer a connection is waiting on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    /// Output is pending and the client is not reading it.
    Write,
    /// A request has started and is not complete.
    Request,
    /// Nothing is happening on a keep-alive connection.
    Idle,
}

#[derive(Debug)]
pub(crate) struct Connection {
    pub stream: UnixStream,
    /// What the epoll set holds for this connection now.
    pub interest: EventSet,
    /// Received bytes not yet turned into a request.
    buf: Vec<u8>,
    /// The head of the request at the start of `buf`, once complete.
    head: Option<Head>,
    /// `100 Continue` was queued for `head`.
    continue_sent: bool,
    ready: Option<Ready>,
    out: Vec<u8>,
    out_pos: usize,
    /// The client shut down its side; nothing more will arrive.
    read_closed: bool,
    /// Read nothing more; close once `ready` is answered and `out` is written.
    closing: bool,
    /// Close now.
    broken: bool,
    /// When the first byte of the request in `buf` arrived.
    request_started: Option<Instant>,
    /// Last time output was queued on an empty buffer or some of it was written.
    write_progress: Instant,
    /// Last time anything was read or written.
    last_activity: Instant,
}

impl Connection {
    pub fn new(stream: UnixStream, now: Instant) -> Self {
        Connection {
            stream,
            interest: EventSet::IN,
            buf: Vec::new(),
            head: None,
            continue_sent: false,
            ready: None,
            out: Vec::new(),
            out_pos: 0,
            read_closed: false,
            closing: false,
            broken: false,
            request_started: None,
            write_progress: now,
            last_activity: now,
        }
    }

    fn has_output(&self) -> bool {
        self.out_pos < self.out.len()
    }

    /// Reacts to the epoll events `events`.
    pub fn on_event(&mut self, events: EventSet, limits: &Limits, now: Instant, seq: &mut u64) {
        if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            self.fill(limits.read_cap(), now);
        }
        if events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
            self.flush(now);
        }
        self.parse(limits, now, seq);
    }

    /// Reads what the socket has, up to `cap` buffered bytes.
    fn fill(&mut self, cap: usize, now: Instant) {
        if self.read_closed || self.closing || self.broken {
            return;
        }
        let mut chunk = [0u8; READ_CHUNK];
        while self.buf.len() < cap {
            let want = (cap - self.buf.len()).min(READ_CHUNK);
            match (&self.stream).read(&mut chunk[..want]) {
                Ok(0) => {
                    self.read_closed = true;
                    break;
                }
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    self.last_activity = now;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("http connection read failed: {e}");
                    self.broken = true;
                    break;
                }
            }
        }
    }

    /// Writes pending output until the socket would block.
    pub fn flush(&mut self, now: Instant) {
        while self.has_output() && !self.broken {
            match (&self.stream).write(&self.out[self.out_pos..]) {
                Ok(0) => self.broken = true,
                Ok(n) => {
                    self.out_pos += n;
                    self.write_progress = now;
                    self.last_activity = now;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("http connection write failed: {e}");
                    self.broken = true;
                }
            }
        }
        if !self.has_output() {
            self.out.clear();
            self.out_pos = 0;
            self.out.shrink_to(KEEP_OUT_CAPACITY);
        }
    }

    fn queue(&mut self, bytes: &[u8], now: Instant) {
        if !self.has_output() {
            self.out.clear();
            self.out_pos = 0;
            self.write_progress = now;
        }
        self.out.extend_from_slice(bytes);
    }

    /// Replaces whatever was being received with `err`, to be answered before closing.
    fn fail(&mut self, err: RequestError, seq: &mut u64) {
        debug!("http request error: {err}");
        self.buf = Vec::new();
        self.head = None;
        self.request_started = None;
        self.closing = true;
        self.ready = Some(Ready {
            seq: next(seq),
            item: Err(err),
            keep_alive: false,
            head_request: false,
        });
    }

    fn drop_partial(&mut self) {
        debug!(
            "http client closed the connection with {} bytes of an incomplete request",
            self.buf.len()
        );
        self.buf = Vec::new();
        self.head = None;
        self.request_started = None;
    }

    /// Looks for the next complete request in the buffer, unless one is already waiting.
    pub fn parse(&mut self, limits: &Limits, now: Instant, seq: &mut u64) {
        if self.ready.is_some() || self.closing || self.broken {
            return;
        }
        if self.head.is_none() {
            if self.buf.is_empty() {
                self.request_started = None;
                return;
            }
            self.request_started.get_or_insert(now);
            match parse_head(&self.buf, limits) {
                Ok(HeadStatus::Partial) => {
                    if self.read_closed {
                        self.drop_partial();
                    }
                    return;
                }
                Ok(HeadStatus::Complete(head)) => {
                    self.head = Some(head);
                    self.continue_sent = false;
                }
                Err(e) => return self.fail(e, seq),
            }
        }
        let Some(head) = &self.head else {
            return;
        };
        // Both terms are bounded by the limits, whose sum `Limits::validate` checked.
        let total = head.header_len + head.content_length;
        if self.buf.len() >= total {
            let Some(head) = self.head.take() else {
                return;
            };
            let body = self.buf[head.header_len..total].to_vec();
            self.buf.drain(..total);
            self.request_started = if self.buf.is_empty() { None } else { Some(now) };
            let head_request = head.method == "HEAD";
            self.ready = Some(Ready {
                seq: next(seq),
                item: Ok(Request {
                    method: head.method,
                    path: head.path,
                    headers: head.headers,
                    body,
                }),
                keep_alive: head.keep_alive,
                head_request,
            });
        } else if self.read_closed {
            self.drop_partial();
        } else if head.expect_continue && !self.continue_sent {
            self.continue_sent = true;
            self.queue(CONTINUE, now);
        }
    }

    /// The arrival number of the waiting request, if it can be handled now (earlier output
    /// is written, so at most one response is ever buffered).
    pub fn ready_seq(&self) -> Option<u64> {
        match &self.ready {
            Some(ready) if !self.has_output() && !self.broken => Some(ready.seq),
            _ => None,
        }
    }

    pub fn take_ready(&mut self) -> Option<Ready> {
        self.ready.take()
    }

    /// Queues `resp` as the answer to the request taken with [`Connection::take_ready`].
    pub fn respond(&mut self, resp: &Response, keep_alive: bool, head_request: bool, now: Instant) {
        let keep_alive = keep_alive && !resp.close && !self.closing;
        let mut bytes = Vec::new();
        serialize(resp, head_request, keep_alive, &mut bytes);
        self.queue(&bytes, now);
        self.last_activity = now;
        if !keep_alive {
            self.closing = true;
            self.buf = Vec::new();
            self.head = None;
            self.request_started = None;
        }
    }

    /// The next deadline and what it is for.
    pub fn deadline(&self, limits: &Limits) -> Option<(Timer, Instant)> {
        if self.broken {
            return None;
        }
        if self.has_output() {
            return Some((
                Timer::Write,
                self.write_progress.checked_add(limits.request_timeout)?,
            ));
        }
        if self.ready.is_some() || self.closing || self.read_closed {
            return None;
        }
        if let Some(start) = self.request_started {
            return Some((Timer::Request, start.checked_add(limits.request_timeout)?));
        }
        let idle = limits.idle_timeout?;
        Some((Timer::Idle, self.last_activity.checked_add(idle)?))
    }

    /// Acts on a deadline that has passed: a stalled request is answered with
    /// [`RequestError::Timeout`]; a client that does not read, or an idle one, is dropped.
    pub fn expire(&mut self, limits: &Limits, now: Instant, seq: &mut u64) {
        match self.deadline(limits) {
            Some((Timer::Write, at)) if now >= at => {
                debug!("http client stopped reading its responses, closing");
                self.broken = true;
            }
            Some((Timer::Request, at)) if now >= at => {
                self.fail(RequestError::Timeout(limits.request_timeout), seq);
            }
            Some((Timer::Idle, at)) if now >= at => {
                debug!("closing an idle http connection");
                self.broken = true;
            }
            _ => {}
        }
    }

    /// The epoll events this connection needs.
    pub fn wants(&self, limits: &Limits) -> EventSet {
        let mut events = EventSet::empty();
        if !self.read_closed && !self.closing && !self.broken && self.buf.len() < limits.read_cap()
        {
            events |= EventSet::IN;
        }
        if self.has_output() && !self.broken {
            events |= EventSet::OUT;
        }
        events
    }

    /// Nothing received, nothing to send: the connection may be evicted.
    pub fn is_idle(&self) -> bool {
        !self.broken
            && !self.closing
            && self.ready.is_none()
            && self.head.is_none()
            && self.buf.is_empty()
            && !self.has_output()
    }

    pub fn last_activity(&self) -> Instant {
        self.last_activity
    }

    /// The connection can be dropped.
    pub fn finished(&self) -> bool {
        self.broken
            || (!self.has_output() && self.ready.is_none() && (self.closing || self.read_closed))
    }
}

fn next(seq: &mut u64) -> u64 {
    *seq = seq.wrapping_add(1);
    *seq
}
