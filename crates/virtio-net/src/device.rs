// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The network device: features, config space, activation, the receive loop, and the
//! transmit path (a [`QueueDrain`] over the transmit queue).

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use log::{debug, info, warn};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemoryMmap, VolatileSlice};
use vmm_sys_util::eventfd::EventFd;

use tvm_util::warn_once;
use tvm_virtio::{ActivateContext, EventSet, QueueDrain, VirtioDevice, VirtioInterrupt};

use crate::backend::NetBackend;
use crate::consts::{
    CONFIG_LEN, CONFIG_MAC_OFFSET, CONFIG_STATUS_OFFSET, DEVICE_FEATURES, MAX_PACKET_LEN,
    MAX_RX_FRAMES_PER_RUN, MAX_TX_FRAMES_PER_RUN, QUEUE_SIZE, RX_QUEUE, TX_QUEUE, VIRTIO_ID_NET,
    VNET_HDR_LEN,
};
use crate::mac::{format_mac, generated_mac, mac_problem};
use crate::rx::{deliver_frame, RxScratch, RxStatus};
use crate::tap::Tap;
use crate::tx::tx_frame_slices;
use crate::warnings::DriverWarnings;
use crate::{Error, Result};

/// Index of the TAP in [`VirtioDevice::extra_event_sources`].
const TAP_EVENT: usize = 0;

const fn has(features: u64, bit: u32) -> bool {
    features & (1 << bit) != 0
}

/// The TAP receive offloads (`TUN_F_*`) that match the negotiated `features`: GUEST_CSUM
/// -> `TUN_F_CSUM`, GUEST_TSO4 -> `TUN_F_TSO4`, GUEST_TSO6 -> `TUN_F_TSO6`, GUEST_ECN ->
/// `TUN_F_TSO_ECN`. The feature dependencies of virtio 1.2, 5.1.3.1 (TSO needs CSUM, ECN
/// needs TSO) are applied, as the kernel refuses the flags otherwise.
pub fn offload_flags(features: u64) -> u32 {
    if !has(features, VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(features, VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(features, VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 && has(features, VIRTIO_NET_F_GUEST_ECN) {
        flags |= libc::TUN_F_TSO_ECN;
    }
    flags
}

/// Checks a received frame's vnet header against the offloads the guest accepted and
/// clears what it must not see; false when the frame must be dropped (a leftover from
/// offloads set before a reset, or a backend that ignored them).
fn fix_rx_header(hdr: &mut [u8], offloads: u32) -> bool {
    let (Some(&flags), Some(&gso_type)) = (hdr.first(), hdr.get(1)) else {
        return false;
    };
    let csum = offloads & libc::TUN_F_CSUM != 0;
    if u32::from(flags) & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && !csum {
        return false;
    }
    let gso = u32::from(gso_type);
    let ecn = gso & VIRTIO_NET_HDR_GSO_ECN != 0;
    let gso_ok = match gso & !VIRTIO_NET_HDR_GSO_ECN {
        VIRTIO_NET_HDR_GSO_NONE => !ecn,
        VIRTIO_NET_HDR_GSO_TCPV4 => offloads & libc::TUN_F_TSO4 != 0,
        VIRTIO_NET_HDR_GSO_TCPV6 => offloads & libc::TUN_F_TSO6 != 0,
        _ => false,
    };
    if !gso_ok || (ecn && offloads & libc::TUN_F_TSO_ECN == 0) {
        return false;
    }
    if !csum {
        // Without GUEST_CSUM the flags must be 0 (virtio 1.2, 5.1.6.4.1): drop the
        // kernel's DATA_VALID hint.
        hdr[0] = 0;
    }
    true
}

/// What the VMM's `--net tap=NAME[,mac=MAC]` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Name of the TAP interface to create or attach.
    pub tap: String,
    /// The guest's MAC address; default [`generated_mac`] of the TAP name.
    pub mac: Option<[u8; 6]>,
}

/// Packet and error counts since the device was built (resets do not clear them).
///
/// Bytes count Ethernet frames, without the vnet header. An *error* is something the guest
/// got wrong (a malformed chain, returned with nothing done); a *drop* is a well-formed
/// frame that could not be delivered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_packets: u64,
    /// Bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Frames from the backend not delivered: larger than the guest's buffers (without
    /// mergeable buffers), truncated or shorter than the header, or carrying offloads the
    /// guest did not accept.
    pub rx_dropped: u64,
    /// Malformed receive chains (device-readable or out-of-memory descriptors, no room,
    /// chains that do not end, head indices beyond the queue), frames that could not be
    /// copied into checked buffers, and backend read errors other than EAGAIN.
    pub rx_errors: u64,
    /// Frames sent to the backend.
    pub tx_packets: u64,
    /// Bytes sent to the backend.
    pub tx_bytes: u64,
    /// Well-formed frames the backend refused (EAGAIN when the TAP queue is full, EINVAL
    /// for a header the kernel rejects, EIO when the interface is down, short writes).
    pub tx_dropped: u64,
    /// Malformed transmit chains (device-writable or out-of-memory descriptors, shorter
    /// than the header, longer than [`MAX_PACKET_LEN`], chains that do not end) and head
    /// indices beyond the queue.
    pub tx_errors: u64,
}

struct Active {
    mem: GuestMemoryMmap<()>,
    rx: Queue,
    tx: Queue,
    queue_evts: Vec<EventFd>,
    interrupt: Arc<dyn VirtioInterrupt>,
    mergeable: bool,
    /// The receive offloads the guest accepted (`TUN_F_*`).
    offloads: u32,
}

/// A virtio network device over a [`NetBackend`] (a [`Tap`] in production).
///
/// Implements [`VirtioDevice`]; put it in a [`tvm_virtio::VirtioPciDevice`], whose
/// event-manager subscriber watches the backend's descriptor (edge-triggered) and the
/// queue notifications.
///
/// Driver errors (a malformed transmit or receive chain, a broken ring index, a config
/// write) are logged at `warn!` the first time of each kind, prefixed with the device's
/// [`name`](Net::name), and at `debug!` afterwards.
pub struct Net<B: NetBackend> {
    backend: B,
    mac: [u8; 6],
    config: [u8; CONFIG_LEN],
    counters: NetCounters,
    /// The frame read from the backend and not yet delivered: `rx_buf[..rx_len]`; 0 when
    /// none is pending. One byte longer than [`MAX_PACKET_LEN`], to notice truncation.
    rx_buf: Vec<u8>,
    rx_len: usize,
    rx_scratch: RxScratch,
    active: Option<Active>,
    warnings: DriverWarnings,
}

impl<B: NetBackend> std::fmt::Debug for Net<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("mac", &format_mac(&self.mac))
            .field("fd", &self.backend.as_raw_fd())
            .field("counters", &self.counters)
            .field("rx_pending", &self.rx_len)
            .field("active", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

impl Net<Tap> {
    /// Opens the TAP in `cfg` and builds the device with the configured MAC, or the one
    /// [`generated_mac`] derives from the TAP name.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidMac`] for a multicast or all-zero configured MAC, and the errors of
    /// [`Tap::open`].
    pub fn open(cfg: &NetConfig) -> Result<Self> {
        let mac = match cfg.mac {
            Some(mac) => {
                if let Some(reason) = mac_problem(&mac) {
                    return Err(Error::InvalidMac {
                        input: format_mac(&mac),
                        reason,
                    });
                }
                mac
            }
            None => generated_mac(&cfg.tap),
        };
        let tap = Tap::open(&cfg.tap)?;
        info!("net: tap {}, mac {}", tap.name(), format_mac(&mac));
        let mut net = Net::new(tap, mac);
        net.warnings.name = format!("virtio-net {}", cfg.tap);
        Ok(net)
    }

    /// The TAP interface's name.
    pub fn tap_name(&self) -> &str {
        self.backend.name()
    }
}

impl<B: NetBackend> Net<B> {
    /// Builds the device over `backend`, with MAC address `mac` (which should be a unicast
    /// address; see [`parse_mac`](crate::parse_mac)). Its log lines name it
    /// `virtio-net MAC`.
    pub fn new(backend: B, mac: [u8; 6]) -> Self {
        let mut config = [0u8; CONFIG_LEN];
        config[CONFIG_MAC_OFFSET..][..mac.len()].copy_from_slice(&mac);
        // VIRTIO_NET_S_LINK_UP is 1.
        let status = (VIRTIO_NET_S_LINK_UP as u16).to_le_bytes();
        config[CONFIG_STATUS_OFFSET..][..status.len()].copy_from_slice(&status);
        Net {
            backend,
            mac,
            config,
            counters: NetCounters::default(),
            rx_buf: vec![0u8; MAX_PACKET_LEN + 1],
            rx_len: 0,
            rx_scratch: RxScratch::default(),
            active: None,
            warnings: DriverWarnings::new(format!("virtio-net {}", format_mac(&mac))),
        }
    }

    /// How log lines name the device: `virtio-net TAP` for [`Net::open`], `virtio-net MAC`
    /// for [`Net::new`].
    pub fn name(&self) -> &str {
        &self.warnings.name
    }

    /// Bytes of buffers the device holds (the packet buffers and the receive scratch
    /// space): a guest must not be able to make this grow.
    #[cfg(test)]
    pub(crate) fn buffer_bytes(&self) -> usize {
        self.rx_buf.capacity() + self.rx_scratch.capacity_bytes()
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Packet, byte, drop and error counts so far.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Whether a frame read from the backend waits for receive buffers (at most one
    /// does): with the counters, every frame taken from the backend is accounted for.
    pub fn rx_frame_waiting(&self) -> bool {
        self.rx_len > 0
    }

    /// Logs the counters at `info!`; the VMM calls this at shutdown.
    pub fn log_counters(&self) {
        let c = &self.counters;
        info!(
            "net {}: rx {} packets, {} bytes, {} dropped, {} errors; \
             tx {} packets, {} bytes, {} dropped, {} errors",
            format_mac(&self.mac),
            c.rx_packets,
            c.rx_bytes,
            c.rx_dropped,
            c.rx_errors,
            c.tx_packets,
            c.tx_bytes,
            c.tx_dropped,
            c.tx_errors
        );
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Length of the frame read from the backend and waiting for receive buffers (vnet
    /// header included); 0 when none waits.
    pub fn rx_pending_len(&self) -> usize {
        self.rx_len
    }

    /// Receives: delivers the pending frame, then reads and delivers frames until the
    /// backend has none (EAGAIN), the guest's buffers run out (the frame waits, the
    /// backend is not read again until the driver kicks the receive queue), or
    /// [`MAX_RX_FRAMES_PER_RUN`] frames (then the receive queue's EventFd brings us back).
    /// Reading until EAGAIN or a kick is what edge-triggered watching needs.
    ///
    /// Not a [`QueueDrain`]: the frames waiting in the backend drive this loop, not the
    /// chains the driver posts; a frame may take several chains (mergeable buffers), which
    /// are put back when it does not fit; and notifications stay off while buffers last.
    /// The interrupt at the end is the drain's ([`QueueDrain::signal_used`]).
    fn process_rx(&mut self) {
        let Net {
            backend,
            counters,
            rx_buf,
            rx_len,
            rx_scratch,
            active,
            warnings,
            ..
        } = self;
        let Some(active) = active.as_mut() else {
            debug!("virtio-net: rx while inactive");
            return;
        };
        let mem = &active.mem;
        // Kicks are not needed while we have buffers; deliver_frame asks for one when
        // they run out.
        if let Err(e) = active.rx.disable_notification(mem) {
            debug!("virtio-net: rx disable_notification failed: {e}");
        }
        let mut used = false;
        let mut frames = 0usize;
        loop {
            if *rx_len == 0 {
                if frames >= MAX_RX_FRAMES_PER_RUN {
                    // Edge-triggered: the backend may still hold frames and will not
                    // signal again; come back through the event loop.
                    if let Err(e) = active.queue_evts[usize::from(RX_QUEUE)].write(1) {
                        warn!("virtio-net: failed to re-signal the rx queue: {e}");
                    }
                    break;
                }
                let n = match backend.read_frame(rx_buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        counters.rx_errors += 1;
                        warn!("virtio-net: reading from the backend failed: {e}");
                        break;
                    }
                };
                frames += 1;
                if !(VNET_HDR_LEN..=MAX_PACKET_LEN).contains(&n) {
                    counters.rx_dropped += 1;
                    debug!("virtio-net: backend frame of {n} bytes dropped");
                    continue;
                }
                if !fix_rx_header(&mut rx_buf[..n], active.offloads) {
                    counters.rx_dropped += 1;
                    debug!(
                        "virtio-net: backend frame with flags {:#x} gso {:#x} not accepted by \
                         the guest (offloads {:#x}): dropped",
                        rx_buf[0], rx_buf[1], active.offloads
                    );
                    continue;
                }
                *rx_len = n;
            }
            let len = *rx_len;
            let res = deliver_frame(
                mem,
                &mut active.rx,
                &mut rx_buf[..len],
                active.mergeable,
                rx_scratch,
                warnings,
            );
            counters.rx_errors += res.bad_chains;
            used |= res.used;
            match res.status {
                RxStatus::NoBuffers => break,
                RxStatus::Yield => {
                    if let Err(e) = active.queue_evts[usize::from(RX_QUEUE)].write(1) {
                        warn!("virtio-net: failed to re-signal the rx queue: {e}");
                    }
                    break;
                }
                RxStatus::Delivered => {
                    counters.rx_packets += 1;
                    counters.rx_bytes += (len - VNET_HDR_LEN) as u64;
                }
                RxStatus::TooLarge => counters.rx_dropped += 1,
                RxStatus::CopyFailed => {
                    counters.rx_dropped += 1;
                    counters.rx_errors += 1;
                }
            }
            *rx_len = 0;
        }
        if used {
            QueueDrain::signal_used(
                &warnings.name,
                "rx",
                RX_QUEUE,
                &mut active.rx,
                mem,
                active.interrupt.as_ref(),
            );
        }
    }

    /// Transmits every available chain (at most [`MAX_TX_FRAMES_PER_RUN`] per call, the
    /// rest through the transmit queue's EventFd), returning each with used length 0: a
    /// [`QueueDrain`] over the transmit queue.
    ///
    /// A malformed chain is returned unsent. A ring the driver broke is left alone: while
    /// the available index is too far ahead nothing is popped, and a head index beyond the
    /// queue is skipped (there is nothing to send, and it cannot be returned). Each is a
    /// driver error, warned once.
    fn process_tx(&mut self) {
        let Net {
            backend,
            counters,
            active,
            warnings,
            ..
        } = self;
        let Some(active) = active.as_mut() else {
            debug!("virtio-net: tx while inactive");
            return;
        };
        let DriverWarnings {
            name,
            tx_chain,
            ring,
            ..
        } = warnings;
        let mem = &active.mem;
        let size = active.tx.size();
        // The frame's pieces in guest memory, reused from frame to frame.
        let mut frame = Vec::new();
        QueueDrain {
            name,
            index: TX_QUEUE,
            queue: &mut active.tx,
            mem,
            queue_evt: &active.queue_evts[usize::from(TX_QUEUE)],
            interrupt: active.interrupt.as_ref(),
            budget: MAX_TX_FRAMES_PER_RUN,
            ring_warn: ring,
        }
        .run_named("tx", |chain| {
            let head = chain.head_index();
            if head >= size {
                // No such chain: the drain warns (a broken ring) when it cannot return it.
                counters.tx_errors += 1;
                return 0;
            }
            match tx_frame_slices(mem, chain, &mut frame) {
                Ok(len) => transmit(backend, &frame, len, counters),
                Err(e) => {
                    counters.tx_errors += 1;
                    warn_once!(
                        tx_chain,
                        "{name}: malformed tx chain {head} returned unsent: {e}"
                    );
                }
            }
            0
        });
    }
}

/// Writes one well-formed frame of `len` bytes (vnet header included), `frame` in guest
/// memory, to the backend and counts it as sent or dropped.
fn transmit<B: NetBackend>(
    backend: &mut B,
    frame: &[VolatileSlice<'_>],
    len: usize,
    counters: &mut NetCounters,
) {
    match backend.write_frame_guest(frame) {
        Ok(n) if n == len => {
            counters.tx_packets += 1;
            counters.tx_bytes += (len - VNET_HDR_LEN) as u64;
        }
        Ok(n) => {
            counters.tx_dropped += 1;
            debug!("virtio-net: short backend write, {n} of {len} bytes");
        }
        Err(e) => {
            // EAGAIN (the TAP's queue is full) included: a TAP write hardly ever blocks,
            // and waiting would stall the guest.
            counters.tx_dropped += 1;
            debug!("virtio-net: backend refused a {len}-byte frame: {e}");
        }
    }
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        DEVICE_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        tvm_virtio::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is read-only for a VERSION_1 driver, the status always.
        warn_once!(
            self.warnings.config,
            "{}: write of {} bytes to the read-only config at {offset:#x} ignored",
            self.warnings.name,
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> tvm_virtio::Result<()> {
        let ActivateContext {
            mem,
            features,
            queues,
            queue_evts,
            interrupt,
        } = ctx;
        let mut queues = queues.into_iter();
        let rx = queues
            .next()
            .filter(|q| q.ready())
            .ok_or(tvm_virtio::Error::QueueNotReady(RX_QUEUE))?;
        let tx = queues
            .next()
            .filter(|q| q.ready())
            .ok_or(tvm_virtio::Error::QueueNotReady(TX_QUEUE))?;
        if queue_evts.len() < 2 {
            return Err(tvm_virtio::Error::QueueNotReady(TX_QUEUE));
        }
        let offloads = offload_flags(features);
        if let Err(e) = self.backend.set_offload(offloads) {
            // Harmless: the backend then delivers fully checksummed, segmented frames,
            // which every driver accepts.
            warn!("virtio-net: failed to set the backend's offloads to {offloads:#x}: {e}");
        }
        self.rx_len = 0;
        self.active = Some(Active {
            mem,
            rx,
            tx,
            queue_evts,
            interrupt,
            mergeable: has(features, VIRTIO_NET_F_MRG_RXBUF),
            offloads,
        });
        // Frames waiting in the backend since before activation (the edge-triggered watch
        // does not report them again) are delivered by the first RX kick, or on a
        // `Threaded` worker by the pass it makes over the backend after an activation:
        // never here, on the vCPU thread that activates.
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.rx_len = 0;
        // Stop the backend from producing offloaded frames the next driver may not accept.
        if let Err(e) = self.backend.set_offload(0) {
            debug!("virtio-net: failed to clear the backend's offloads: {e}");
        }
    }

    fn process_queue(&mut self, queue: u16) {
        match queue {
            RX_QUEUE => self.process_rx(),
            TX_QUEUE => self.process_tx(),
            q => debug!("virtio-net: notification for missing queue {q}"),
        }
    }

    fn extra_event_sources(&self) -> Vec<(RawFd, EventSet)> {
        vec![(
            self.backend.as_raw_fd(),
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        )]
    }

    fn process_extra_event(&mut self, index: usize, events: EventSet) {
        if index != TAP_EVENT {
            debug!("virtio-net: event for unknown source {index}");
            return;
        }
        if events.intersects(EventSet::ERROR | EventSet::HANG_UP) {
            // Edge-triggered, so this does not repeat until the state changes again.
            warn!("virtio-net: error or hang-up on the backend ({events:?})");
        }
        if self.active.is_some() {
            self.process_rx();
        }
    }
}
