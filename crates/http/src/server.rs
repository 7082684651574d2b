// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The listening socket and the single-threaded epoll loop over it and its connections.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use log::{debug, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::conn::Connection;
use crate::response::serialize;
use crate::socket::{self, SocketFile};
use crate::{Error, Limits, Request, RequestError, Response, Result};

/// Epoll data of the listening socket.
const LISTENER: u64 = 0;
/// Epoll data of the stop fd.
const STOP: u64 = 1;
/// Epoll data of the first connection; ids are never reused.
const FIRST_CONNECTION: u64 = 2;
/// Events taken per `epoll_wait`, and connections accepted per round.
const EVENT_BATCH: usize = 64;
/// How long to stop accepting after `accept` failed (out of fds, for example).
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// The function that answers requests, and the protocol errors that replace requests.
///
/// It is called once per complete request, in arrival order, with `Ok(request)`, or with
/// `Err(error)` when bytes received could not become a request (the connection is closed
/// after that response). [`Response::from_error`] renders an error with the suggested status.
pub type Handler<'a> = dyn FnMut(std::result::Result<Request, RequestError>) -> Response + 'a;

/// An HTTP/1.1 server on a Unix domain socket.
///
/// Created with [`Server::bind`], run with [`Server::serve`]; dropping it closes every
/// connection and removes the socket file.
#[derive(Debug)]
pub struct Server {
    // Declared first so the socket file goes away before the listener is closed.
    socket: SocketFile,
    listener: UnixListener,
    limits: Limits,
    epoll: Epoll,
    connections: BTreeMap<u64, Connection>,
    next_id: u64,
    next_seq: u64,
    accept_paused_until: Option<Instant>,
}

impl Server {
    /// Creates a listening socket at `path`, with mode 0600 from the start.
    ///
    /// # Errors
    ///
    /// [`Error::PathExists`] when anything exists at `path` (nothing is replaced), a bind or
    /// file-system error otherwise, or [`Error::InvalidLimits`].
    ///
    /// # Example
    ///
    /// ```
    /// # let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    /// # let path = dir.as_path().join("api.sock");
    /// use tvm_http::{Limits, Server};
    ///
    /// let server = Server::bind(&path, Limits::default()).unwrap();
    /// assert!(path.exists());
    /// drop(server);
    /// assert!(!path.exists());
    /// ```
    pub fn bind(path: &Path, limits: Limits) -> Result<Server> {
        limits.validate()?;
        let (listener, socket) = socket::bind(path)?;
        let epoll = Epoll::new().map_err(Error::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER),
            )
            .map_err(Error::Epoll)?;
        Ok(Server {
            socket,
            listener,
            limits,
            epoll,
            connections: BTreeMap::new(),
            next_id: FIRST_CONNECTION,
            next_seq: 0,
            accept_paused_until: None,
        })
    }

    /// The path of the socket file.
    pub fn path(&self) -> &Path {
        self.socket.path()
    }

    /// The limits the server was bound with.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The number of client connections open now.
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Serves clients until `stop` becomes readable.
    ///
    /// `stop` is an eventfd, a pipe or a socket; it is only polled, never read, so it stays
    /// readable after `serve` returns. Connections stay open across calls. `handler` is
    /// called on this thread, one request at a time, in the order requests became complete.
    ///
    /// Writes to a client that has gone away fail with `EPIPE`; the process must not have the
    /// default `SIGPIPE` action (Rust programs ignore `SIGPIPE` before `main`).
    ///
    /// # Errors
    ///
    /// [`Error::Epoll`] when `stop` cannot be polled, [`Error::Wait`] when `epoll_wait` fails.
    /// Client misbehaviour is never an error here.
    pub fn serve(&mut self, handler: &mut Handler<'_>, stop: &dyn AsRawFd) -> Result<()> {
        let stop_fd = stop.as_raw_fd();
        self.epoll
            .ctl(
                ControlOperation::Add,
                stop_fd,
                EpollEvent::new(EventSet::IN, STOP),
            )
            .map_err(Error::Epoll)?;
        let result = self.run(handler);
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Delete, stop_fd, EpollEvent::default())
        {
            debug!("failed to remove the stop fd from the http epoll set: {e}");
        }
        result
    }

    fn run(&mut self, handler: &mut Handler<'_>) -> Result<()> {
        let mut events = vec![EpollEvent::default(); EVENT_BATCH];
        let mut active = Vec::with_capacity(EVENT_BATCH);
        loop {
            let timeout = self.wait_timeout(Instant::now());
            let count = match self.epoll.wait(timeout, &mut events) {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(e) => return Err(Error::Wait(e)),
            };
            let now = Instant::now();
            let mut accept = false;
            active.clear();
            for event in &events[..count] {
                match event.data() {
                    STOP => return Ok(()),
                    LISTENER => accept = true,
                    id => {
                        if let Some(conn) = self.connections.get_mut(&id) {
                            conn.on_event(event.event_set(), &self.limits, now, &mut self.next_seq);
                            active.push(id);
                        }
                    }
                }
            }
            if accept {
                self.accept_all(handler, now);
            }
            self.resume_accept(now);
            for (id, conn) in self.connections.iter_mut() {
                if !active.contains(id) {
                    conn.expire(&self.limits, now, &mut self.next_seq);
                }
            }
            self.dispatch(handler);
            self.reap_and_rearm();
        }
    }

    /// Milliseconds until the earliest deadline, rounded up; -1 for none.
    fn wait_timeout(&self, now: Instant) -> i32 {
        let earliest = self
            .connections
            .values()
            .filter_map(|c| c.deadline(&self.limits).map(|(_, at)| at))
            .chain(self.accept_paused_until)
            .min();
        match earliest {
            None => -1,
            Some(at) => {
                let nanos = at.saturating_duration_since(now).as_nanos();
                i32::try_from(nanos.div_ceil(1_000_000)).unwrap_or(i32::MAX)
            }
        }
    }

    fn accept_all(&mut self, handler: &mut Handler<'_>, now: Instant) {
        for _ in 0..EVENT_BATCH {
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(stream, handler, now),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    warn!("failed to accept an http connection: {e}");
                    self.pause_accept(now);
                    break;
                }
            }
        }
    }

    fn pause_accept(&mut self, now: Instant) {
        let paused = self.epoll.ctl(
            ControlOperation::Modify,
            self.listener.as_raw_fd(),
            EpollEvent::new(EventSet::empty(), LISTENER),
        );
        match paused {
            Ok(()) => self.accept_paused_until = Some(now + ACCEPT_PAUSE),
            Err(e) => warn!("failed to pause accepting http connections: {e}"),
        }
    }

    fn resume_accept(&mut self, now: Instant) {
        let Some(until) = self.accept_paused_until else {
            return;
        };
        if now < until {
            return;
        }
        let resumed = self.epoll.ctl(
            ControlOperation::Modify,
            self.listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        );
        match resumed {
            Ok(()) => self.accept_paused_until = None,
            Err(e) => {
                warn!("failed to resume accepting http connections: {e}");
                self.accept_paused_until = Some(now + ACCEPT_PAUSE);
            }
        }
    }

    fn admit(&mut self, stream: UnixStream, handler: &mut Handler<'_>, now: Instant) {
        if let Err(e) = stream.set_nonblocking(true) {
            debug!("failed to make an http connection non-blocking: {e}");
            return;
        }
        if self.connections.len() >= self.limits.max_connections && !self.evict_idle() {
            debug!(
                "refusing an http connection, {} are busy",
                self.connections.len()
            );
            let response = handler(Err(RequestError::TooManyConnections));
            let mut bytes = Vec::new();
            serialize(&response, false, false, &mut bytes);
            // Best effort: the new socket's send buffer is empty, so a short answer fits.
            if let Err(e) = (&stream).write(&bytes) {
                debug!("failed to answer a refused http connection: {e}");
            }
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let added = self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(EventSet::IN, id),
        );
        if let Err(e) = added {
            warn!("failed to poll an http connection: {e}");
            return;
        }
        self.connections.insert(id, Connection::new(stream, now));
    }

    /// Closes the connection that has been idle longest; false when none is idle.
    fn evict_idle(&mut self) -> bool {
        let oldest = self
            .connections
            .iter()
            .filter(|(_, c)| c.is_idle())
            .min_by_key(|(_, c)| c.last_activity())
            .map(|(id, _)| *id);
        match oldest {
            Some(id) => {
                debug!("closing the longest idle http connection to make room");
                self.remove(id);
                true
            }
            None => false,
        }
    }

    /// Hands waiting requests to `handler`, oldest first, one at a time.
    fn dispatch(&mut self, handler: &mut Handler<'_>) {
        loop {
            let next = self
                .connections
                .iter()
                .filter_map(|(id, c)| c.ready_seq().map(|seq| (seq, *id)))
                .min();
            let Some((_, id)) = next else {
                return;
            };
            let Some(conn) = self.connections.get_mut(&id) else {
                return;
            };
            let Some(ready) = conn.take_ready() else {
                return;
            };
            let response = handler(ready.item);
            let now = Instant::now();
            conn.respond(&response, ready.keep_alive, ready.head_request, now);
            conn.flush(now);
            conn.parse(&self.limits, now, &mut self.next_seq);
        }
    }

    fn remove(&mut self, id: u64) {
        if let Some(conn) = self.connections.remove(&id) {
            let removed = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            if let Err(e) = removed {
                debug!("failed to remove an http connection from epoll: {e}");
            }
        }
    }

    /// Drops finished connections and updates the epoll interest of the others.
    fn reap_and_rearm(&mut self) {
        let finished: Vec<u64> = self
            .connections
            .iter()
            .filter(|(_, c)| c.finished())
            .map(|(id, _)| *id)
            .collect();
        for id in finished {
            self.remove(id);
        }
        let mut failed = Vec::new();
        for (id, conn) in self.connections.iter_mut() {
            let wants = conn.wants(&self.limits);
            if wants == conn.interest {
                continue;
            }
            let modified = self.epoll.ctl(
                ControlOperation::Modify,
                conn.stream.as_raw_fd(),
                EpollEvent::new(wants, *id),
            );
            match modified {
                Ok(()) => conn.interest = wants,
                Err(e) => {
                    warn!("failed to update the epoll interest of an http connection: {e}");
                    failed.push(*id);
                }
            }
        }
        for id in failed {
            self.remove(id);
        }
    }
}

#[cfg(test)]
mod tests;
