// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The socket device: config space, activation, and the RX, TX and event queues around
//! the muxer.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use log::{debug, info, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use tvm_util::{warn_once, WarnOnce};
use tvm_virtio::{
    add_used, chains_pending, ActivateContext, EventSet, QueueDrain, VirtioDevice, VirtioInterrupt,
};

use crate::counters::VsockCounters;
use crate::host::UdsHost;
use crate::muxer::{Host, Muxer, NAME};
use crate::packet::{
    op, read_tx, rx_capacity, write_event, write_rx, Seg, EVENT_TRANSPORT_RESET, MAX_PKT_LEN,
};
use crate::{Error, Result};

/// Virtio device ID of a socket device (virtio 1.2, 5), from virtio-bindings.
pub const VIRTIO_ID_VSOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// The receive queue (device to guest packets).
pub const RX_QUEUE: u16 = 0;
/// The transmit queue (guest to device packets).
pub const TX_QUEUE: u16 = 1;
/// The event queue (transport reset events).
pub const EVENT_QUEUE: u16 = 2;

/// The smallest guest CID: 0 (hypervisor), 1 (loopback) and 2 (host) are reserved.
pub const MIN_GUEST_CID: u64 = 3;
/// The largest guest CID: `u32::MAX` is `VMADDR_CID_ANY`, and Linux keeps CIDs to 32 bits.
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

/// Most RX packets written per run before yielding to the event loop (the RX queue's
/// EventFd brings it back).
pub const MAX_RX_PACKETS_PER_RUN: usize = 256;
/// Most TX chains handled per run before yielding (the TX queue's EventFd brings it back).
pub const MAX_TX_PACKETS_PER_RUN: usize = 256;

/// Index of the internal epoll in [`VirtioDevice::extra_event_sources`].
const EPOLL_SOURCE: usize = 0;

/// What the VMM's `--vsock cid=N,uds=PATH` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context ID, [`MIN_GUEST_CID`] to [`MAX_GUEST_CID`].
    pub guest_cid: u64,
    /// Where the device listens for host connections; guest connections to host port P go
    /// to `<uds_path>_P`. Must not exist; removed when the device is dropped.
    pub uds_path: PathBuf,
}

struct Active {
    mem: GuestMemoryMmap<()>,
    rx: Queue,
    tx: Queue,
    event: Queue,
    rx_evt: EventFd,
    tx_evt: EventFd,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// Driver errors the device itself reports once at `warn!`, then at `debug!` (the muxer
/// has its own for packets).
#[derive(Debug, Default)]
struct Warnings {
    /// An RX chain the device cannot write a packet into.
    rx_chain: WarnOnce,
    /// An event chain the device cannot write an event into.
    event_chain: WarnOnce,
    /// An available index too far ahead, a head index beyond the queue.
    ring: WarnOnce,
    /// A write to the read-only config space.
    config: WarnOnce,
}

/// A virtio socket device with Firecracker's hybrid vsock host side.
///
/// Implements [`VirtioDevice`]; put it in a [`tvm_virtio::VirtioPciDevice`], whose
/// event-manager subscriber calls [`VirtioDevice::process_queue`] when the guest kicks and
/// [`VirtioDevice::process_extra_event`] when the device's internal epoll (its only extra
/// event source) is readable.
pub struct Vsock {
    guest_cid: u64,
    muxer: Muxer,
    active: Option<Active>,
    /// Scratch space for one packet at a time: chain segments, TX and RX payloads.
    segs: Vec<Seg>,
    tx_data: Vec<u8>,
    rx_data: Vec<u8>,
    warnings: Warnings,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("uds_path", &self.muxer.uds_path())
            .field("active", &self.active.is_some())
            .field("connections", &self.muxer.conn_count())
            .field("counters", &self.muxer.counters)
            .finish_non_exhaustive()
    }
}

impl Vsock {
    /// Checks `cfg.guest_cid` and binds the host listener at `cfg.uds_path`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidCid`] for a CID outside [`MIN_GUEST_CID`]..=[`MAX_GUEST_CID`];
    /// [`Error::UdsPathExists`] when the path exists (it is left alone);
    /// [`Error::UdsPathTooLong`]; [`Error::BindUds`]; [`Error::CreateEpoll`],
    /// [`Error::CreateTimer`], [`Error::RegisterEvent`] when the host is out of
    /// descriptors.
    pub fn new(cfg: VsockConfig) -> Result<Vsock> {
        check_cid(cfg.guest_cid)?;
        let host = UdsHost::bind(&cfg.uds_path)?;
        let vsock = Vsock::with_host(cfg.guest_cid, Host::Uds(host))?;
        info!(
            "{NAME}: guest cid {}, host socket {}",
            cfg.guest_cid,
            cfg.uds_path.display()
        );
        Ok(vsock)
    }

    pub(crate) fn with_host(guest_cid: u64, host: Host) -> Result<Vsock> {
        Ok(Vsock {
            guest_cid,
            muxer: Muxer::new(guest_cid, host)?,
            active: None,
            segs: Vec::new(),
            tx_data: Vec::with_capacity(MAX_PKT_LEN as usize),
            rx_data: vec![0; MAX_PKT_LEN as usize],
            warnings: Warnings::default(),
        })
    }

    /// The guest's context ID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Where the device listens for host connections.
    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path().unwrap_or(Path::new(""))
    }

    /// Packet, byte, connection and error counts so far.
    pub fn counters(&self) -> VsockCounters {
        self.muxer.counters
    }

    /// Connections in the table (established, being requested, or closing).
    pub fn connection_count(&self) -> usize {
        self.muxer.conn_count()
    }

    /// Host connections accepted whose `CONNECT` line is not complete yet.
    pub fn pending_host_connections(&self) -> usize {
        self.muxer.accepting_count()
    }

    /// Logs the counters at `info!`; the VMM calls this at shutdown.
    pub fn log_counters(&self) {
        let c = &self.muxer.counters;
        info!(
            "{NAME}: rx {} packets, {} bytes; tx {} packets, {} bytes; connections {} added, \
             {} removed, {} killed; errors: tx {}, rx {}, host {}; refused: host {}, guest {}; \
             rst dropped {}",
            c.rx_packets,
            c.rx_bytes,
            c.tx_packets,
            c.tx_bytes,
            c.conns_added,
            c.conns_removed,
            c.conns_killed,
            c.tx_errors,
            c.rx_errors,
            c.host_errors,
            c.host_refused,
            c.guest_refused,
            c.rst_dropped
        );
    }

    /// Tells the guest its transport was reset (after a snapshot restore): if the device is
    /// active, puts one `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` event in the event queue and
    /// signals it, and drops every connection, closing the host streams (the guest resets
    /// its sockets on the event, so no RSTs are sent). Does nothing while inactive.
    pub fn transport_reset(&mut self) {
        let Some(a) = self.active.as_mut() else {
            debug!("{NAME}: transport reset while inactive: nothing to do");
            return;
        };
        let mem = &a.mem;
        let mut delivered = false;
        match chains_pending(&a.event, mem) {
            Ok(0) => warn!(
                "{NAME}: no event buffer for the transport reset event: the guest will not see it"
            ),
            Ok(_) => {
                if let Some(chain) = a.event.pop_descriptor_chain(mem) {
                    let head = chain.head_index();
                    let len = match write_event(mem, chain, &mut self.segs, EVENT_TRANSPORT_RESET) {
                        Ok(len) => {
                            delivered = true;
                            len
                        }
                        Err(why) => {
                            self.muxer.counters.rx_errors += 1;
                            warn_once!(
                                self.warnings.event_chain,
                                "{NAME}: event chain {head} returned unused: {why}"
                            );
                            0
                        }
                    };
                    match add_used(&mut a.event, mem, head, len) {
                        Ok(()) => QueueDrain::signal_used(
                            NAME,
                            "event",
                            EVENT_QUEUE,
                            &mut a.event,
                            mem,
                            a.interrupt.as_ref(),
                        ),
                        Err(e) => {
                            warn_once!(self.warnings.ring, "{NAME}: event chain not returned: {e}")
                        }
                    }
                }
            }
            Err(e) => warn_once!(self.warnings.ring, "{NAME}: event queue left alone: {e}"),
        }
        let n = self.muxer.conn_count();
        self.muxer.drop_all();
        self.muxer.rearm_timer();
        info!("{NAME}: transport reset: {n} connections dropped, event delivered: {delivered}");
    }

    /// Ends what waited too long at `now`: host connections that sent no `CONNECT` line
    /// within [`CONNECT_LINE_TIMEOUT`](crate::CONNECT_LINE_TIMEOUT), requests the guest did
    /// not answer within [`REQUEST_TIMEOUT`](crate::REQUEST_TIMEOUT), connections shut down
    /// both ways past [`SHUTDOWN_GRACE`](crate::SHUTDOWN_GRACE). The device's timer calls
    /// it through [`VirtioDevice::process_extra_event`]; tests call it with a later `now`.
    pub fn timeout_check(&mut self, now: Instant) {
        self.muxer.timeout_check(now);
        self.process_rx();
        self.muxer.rearm_timer();
    }

    /// Guest bytes held for a connection's host stream, and the bytes allocated for them.
    #[cfg(test)]
    pub(crate) fn buffered(&self, local_port: u32, peer_port: u32) -> Option<(usize, usize)> {
        self.muxer.buffered(local_port, peer_port)
    }

    /// Lowers the connection limit.
    #[cfg(test)]
    pub(crate) fn set_max_connections(&mut self, n: usize) {
        self.muxer.set_max_connections(n);
    }

    /// Whether the device's timer is armed.
    #[cfg(test)]
    pub(crate) fn timer_armed(&self) -> bool {
        self.muxer.timer_armed()
    }

    /// Fills RX buffers with packets for the guest until there are no more packets or no
    /// more buffers (then a kick is asked for), or [`MAX_RX_PACKETS_PER_RUN`].
    fn process_rx(&mut self) {
        let Vsock {
            muxer,
            active,
            segs,
            rx_data,
            warnings,
            ..
        } = self;
        let Some(a) = active.as_mut() else {
            return;
        };
        let now = Instant::now();
        let mem = &a.mem;
        let mut used = false;
        let mut chains = 0usize;
        while muxer.has_rx_work() {
            if chains >= MAX_RX_PACKETS_PER_RUN {
                if let Err(e) = a.rx_evt.write(1) {
                    warn!("{NAME}: failed to re-signal the rx queue: {e}");
                }
                break;
            }
            match chains_pending(&a.rx, mem) {
                Ok(0) => {
                    // Out of buffers: have the driver kick when it adds some, and look
                    // again for any added meanwhile.
                    match a.rx.enable_notification(mem) {
                        Ok(true) => continue,
                        Ok(false) => break,
                        Err(e) => {
                            debug!("{NAME}: rx enable_notification failed: {e}");
                            break;
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    warn_once!(warnings.ring, "{NAME}: rx queue left alone: {e}");
                    break;
                }
            }
            let Some(chain) = a.rx.pop_descriptor_chain(mem) else {
                break;
            };
            chains += 1;
            let head = chain.head_index();
            let len = match rx_capacity(mem, chain, segs) {
                Err(why) => {
                    muxer.counters.rx_errors += 1;
                    warn_once!(
                        warnings.rx_chain,
                        "{NAME}: rx chain {head} returned unused: {why}"
                    );
                    0
                }
                Ok(room) => {
                    let room = room.min(rx_data.len());
                    match muxer.next_rx(&mut rx_data[..room], now) {
                        Some((hdr, n)) => match write_rx(mem, segs, &hdr, &rx_data[..n]) {
                            Ok(len) => {
                                muxer.counters.rx_packets += 1;
                                if hdr.op == op::RW {
                                    muxer.counters.rx_bytes += n as u64;
                                }
                                len
                            }
                            Err(why) => {
                                muxer.counters.rx_errors += 1;
                                warn_once!(warnings.rx_chain, "{NAME}: rx chain {head}: {why}");
                                0
                            }
                        },
                        None if room == 0 && muxer.has_rx_work() => {
                            // Data waits and this buffer holds a header only: returned
                            // empty (Linux drops such a buffer and posts another), or it
                            // would block the buffers behind it.
                            muxer.counters.rx_errors += 1;
                            warn_once!(
                                warnings.rx_chain,
                                "{NAME}: rx chain {head} has no room for data: returned unused"
                            );
                            0
                        }
                        None => {
                            // Nothing to send after all: the buffer stays the driver's.
                            a.rx.go_to_previous_position();
                            break;
                        }
                    }
                }
            };
            match add_used(&mut a.rx, mem, head, len) {
                Ok(()) => used = true,
                Err(e) => warn_once!(warnings.ring, "{NAME}: rx chain not returned: {e}"),
            }
        }
        if used {
            QueueDrain::signal_used(NAME, "rx", RX_QUEUE, &mut a.rx, mem, a.interrupt.as_ref());
        }
    }

    /// Handles the packets in the TX queue (at most [`MAX_TX_PACKETS_PER_RUN`]), then
    /// sends what they call for.
    fn process_tx(&mut self) {
        let Vsock {
            muxer,
            active,
            segs,
            tx_data,
            warnings,
            ..
        } = self;
        let Some(a) = active.as_mut() else {
            return;
        };
        let now = Instant::now();
        let mem = &a.mem;
        QueueDrain {
            name: NAME,
            index: TX_QUEUE,
            queue: &mut a.tx,
            mem,
            queue_evt: &a.tx_evt,
            interrupt: a.interrupt.as_ref(),
            budget: MAX_TX_PACKETS_PER_RUN,
            ring_warn: &mut warnings.ring,
        }
        .run(|chain| {
            let parsed = read_tx(mem, chain, segs, tx_data);
            muxer.handle_tx(parsed, tx_data, now);
            0
        });
        self.process_rx();
    }
}

/// Checks a guest CID.
fn check_cid(cid: u64) -> Result<()> {
    if (MIN_GUEST_CID..=MAX_GUEST_CID).contains(&cid) {
        Ok(())
    } else {
        Err(Error::InvalidCid(cid))
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        // Stream sockets only, which needs no bit (Linux knows VIRTIO_VSOCK_F_SEQPACKET
        // alone); the transport adds VERSION_1, EVENT_IDX and INDIRECT_DESC.
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        tvm_virtio::read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        warn_once!(
            self.warnings.config,
            "{NAME}: write of {} bytes to the read-only config at {offset:#x} ignored",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> tvm_virtio::Result<()> {
        let ActivateContext {
            mem,
            queues,
            queue_evts,
            interrupt,
            ..
        } = ctx;
        let mut queues = queues.into_iter();
        let mut ready = |index| {
            queues
                .next()
                .filter(|q| q.ready())
                .ok_or(tvm_virtio::Error::QueueNotReady(index))
        };
        let rx = ready(RX_QUEUE)?;
        let tx = ready(TX_QUEUE)?;
        let event = ready(EVENT_QUEUE)?;
        let mut evts = queue_evts.into_iter();
        let (Some(rx_evt), Some(tx_evt)) = (evts.next(), evts.next()) else {
            return Err(tvm_virtio::Error::QueueNotReady(TX_QUEUE));
        };
        self.active = Some(Active {
            mem,
            rx,
            tx,
            event,
            rx_evt,
            tx_evt,
            interrupt,
        });
        self.muxer.set_active(true);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.muxer.set_active(false);
        self.muxer.drop_all();
        self.muxer.rearm_timer();
    }

    fn process_queue(&mut self, queue: u16) {
        match queue {
            RX_QUEUE => self.process_rx(),
            TX_QUEUE => self.process_tx(),
            // The driver added event buffers; they are used at a transport reset.
            EVENT_QUEUE => debug!("{NAME}: event queue notification"),
            q => debug!("{NAME}: notification for missing queue {q}"),
        }
        self.muxer.rearm_timer();
    }

    fn extra_event_sources(&self) -> Vec<(RawFd, EventSet)> {
        // Level-triggered is safe: every source inside is edge-triggered, so the internal
        // epoll is readable only while unhandled events wait in it.
        vec![(self.muxer.epoll_fd(), EventSet::IN)]
    }

    fn process_extra_event(&mut self, index: usize, events: EventSet) {
        if index != EPOLL_SOURCE {
            debug!("{NAME}: event for unknown source {index}");
            return;
        }
        if events.intersects(EventSet::ERROR | EventSet::HANG_UP) {
            warn!("{NAME}: error or hang-up on the internal epoll ({events:?})");
        }
        self.muxer.process_events(Instant::now());
        self.process_rx();
        self.muxer.rearm_timer();
    }
}
