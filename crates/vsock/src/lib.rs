// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A virtio socket device (virtio 1.2, 5.10: virtio-vsock) whose host side is
//! Firecracker's "hybrid vsock": guest `AF_VSOCK` stream sockets meet host processes on
//! Unix sockets.
//!
//! [`Vsock`] implements [`tvm_virtio::VirtioDevice`] with three queues of 256 entries (0
//! RX, 1 TX, 2 event), no feature bits of its own (stream sockets only, no SEQPACKET) and
//! an 8-byte config space holding the guest's CID (le64, read-only).
//!
//! # The host side
//!
//! - The device listens on the Unix socket `uds_path` ([`VsockConfig`]); the path must not
//!   exist (an existing file is refused and left alone) and the socket file is removed
//!   when the device is dropped.
//! - **Host to guest:** a host process connects to `uds_path` and writes `CONNECT
//!   <port>\n` (at most 32 bytes, within [`CONNECT_LINE_TIMEOUT`]; anything else closes
//!   the connection). The device sends the guest a REQUEST from host CID 2 and a local
//!   port it allocates (counting up from [`FIRST_LOCAL_PORT`], skipping ports in use) to
//!   `port`. When the guest answers RESPONSE, the host process reads `OK <local port>\n`
//!   and the stream is connected; when it answers RST, or not within [`REQUEST_TIMEOUT`],
//!   the host stream is closed (the guest gets an RST on the timeout). While the device is
//!   not active the listener still accepts and reads lines, but closes them.
//! - **Guest to host:** a guest connect to CID 2, port `P` makes the device connect to the
//!   Unix socket `<uds_path>_P` (non-blocking: a Unix connect succeeds or fails at once).
//!   Success is answered with RESPONSE, failure (nobody listening, a full backlog) with RST.
//! - **Streams:** bytes flow both ways as RW packets. SHUTDOWN half-closes: the host
//!   stream's EOF becomes SHUTDOWN(SEND) to the guest (SEND and RCV when the host process
//!   closed its socket), a guest SHUTDOWN(SEND) becomes `shutdown(Write)` on the host
//!   stream once the data before it is written, SHUTDOWN(RCV) `shutdown(Read)`. A guest
//!   close (both flags) is answered with RST once its data reached the host stream; a
//!   connection shut down both ways by half-closes ends with an RST after
//!   [`SHUTDOWN_GRACE`], or earlier when the guest sends one. Either side's RST ends the
//!   connection at once.
//!
//! # Flow control and memory
//!
//! Credit-based both ways (virtio 1.2, 5.10.6.3). Each packet the device sends carries
//! `buf_alloc` = [`BUF_ALLOC`] (256 KiB) and the bytes it has written to the host stream
//! (`fwd_cnt`); a CREDIT_UPDATE goes out when half of `BUF_ALLOC` was written since the
//! guest last heard, or when the guest sends CREDIT_REQUEST. The device reads a host stream
//! only when the guest has credit and an RX buffer is in hand, at most the credit and the
//! buffer's room, straight into that buffer: host-to-guest data is never buffered, and a
//! guest that stops reading makes the host writer block. Out of credit, the device sends
//! one CREDIT_REQUEST and waits for the guest's update. Guest data the host stream cannot
//! take at once (EAGAIN) is kept until the stream is writable; a guest sending beyond its
//! credit gets an RST on that connection.
//!
//! Memory per connection is bounded by [`BUF_ALLOC`] bytes of guest data (allocated
//! exactly, released when drained) plus the `OK <port>\n` line and a fixed-size state of
//! a few hundred bytes. The device as a whole adds one packet of scratch space each way
//! ([`MAX_PKT_LEN`], 64 KiB), at most [`MAX_CONNECTIONS`] connections (1024: beyond it
//! guest requests get RST and host connections are closed) and at most 1024 queued RSTs for
//! unknown connections.
//!
//! # Event loop
//!
//! All host I/O is non-blocking. The device owns an internal epoll in which the listener,
//! every host stream and a timerfd are registered edge-triggered;
//! [`VirtioDevice::extra_event_sources`](tvm_virtio::VirtioDevice::extra_event_sources)
//! returns its fd (`EventSet::IN`) and
//! [`VirtioDevice::process_extra_event`](tvm_virtio::VirtioDevice::process_extra_event)
//! drains it with a zero timeout. The timer is armed only while something waits for a
//! timeout (a `CONNECT` line, a RESPONSE, a shutdown grace). Queue kicks arrive through
//! [`VirtioDevice::process_queue`](tvm_virtio::VirtioDevice::process_queue): a TX kick
//! handles the guest's packets, an RX kick (new buffers) resumes sending. Everything runs
//! on the event-loop thread, whose seccomp filter must allow what it calls there:
//! `epoll_wait` (`epoll_pwait` where libc maps it so), `epoll_ctl`, `accept4`,
//! `ioctl(FIONBIO)` (making accepted streams non-blocking), `socket(AF_UNIX, SOCK_STREAM |
//! SOCK_NONBLOCK | SOCK_CLOEXEC)`, `connect`, `recvfrom` and `sendto` (std reads and writes
//! sockets with `recv` and `send(MSG_NOSIGNAL)`, so a vanished host peer is EPIPE, never
//! SIGPIPE), `shutdown`, `close`, `timerfd_settime`, `write` on the queues' EventFds, and
//! the allocator's `mmap`/`munmap`/`mremap`/`madvise` for the per-connection buffers.
//! Construction (`socket`, `bind`, `listen`, `epoll_create1`, `timerfd_create`,
//! `epoll_ctl`, `statx`) and drop (`statx`, `unlink`) happen wherever the device is built
//! and dropped.
//!
//! # What it does not do
//!
//! SEQPACKET sockets, guest-to-guest or loopback traffic (only the host CID is reachable),
//! vhost-vsock, snapshotting connections (a restore drops them: see
//! [`Vsock::transport_reset`]).
//!
//! # Example
//!
//! ```
//! use tvm_virtio::VirtioDevice;
//! use tvm_vsock::{Vsock, VsockConfig};
//!
//! let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vsock-doc").unwrap();
//! let uds_path = dir.as_path().join("v.sock");
//! let vsock = Vsock::new(VsockConfig { guest_cid: 3, uds_path: uds_path.clone() })?;
//! assert_eq!(vsock.device_type(), tvm_vsock::VIRTIO_ID_VSOCK);
//! assert_eq!(vsock.queue_max_sizes(), [256, 256, 256]);
//! assert!(uds_path.exists());
//! // Hand `vsock` to tvm_virtio::VirtioPciDevice::new; the event loop watches
//! // `vsock.extra_event_sources()`.
//! drop(vsock);
//! assert!(!uds_path.exists());
//! # Ok::<(), tvm_vsock::Error>(())
//! ```

#![deny(missing_docs)]

use std::io;
use std::path::PathBuf;

mod conn;
mod counters;
mod device;
mod fuzz;
mod host;
mod muxer;
mod packet;

pub use conn::{BUF_ALLOC, CLOSE_FLUSH_TIMEOUT, REQUEST_TIMEOUT, SHUTDOWN_GRACE};
pub use counters::VsockCounters;
pub use device::{
    Vsock, VsockConfig, EVENT_QUEUE, MAX_GUEST_CID, MAX_RX_PACKETS_PER_RUN, MAX_TX_PACKETS_PER_RUN,
    MIN_GUEST_CID, QUEUE_SIZE, RX_QUEUE, TX_QUEUE, VIRTIO_ID_VSOCK,
};
pub use fuzz::FuzzMuxer;
pub use host::{MAX_CONNECT_LINE, MAX_UDS_PATH_LEN};
pub use muxer::{CONNECT_LINE_TIMEOUT, FIRST_LOCAL_PORT, MAX_CONNECTIONS};
pub use packet::{Header, HEADER_LEN, HOST_CID, MAX_PKT_LEN};

/// Errors of the socket device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A guest CID that is reserved (0, 1, 2, `u32::MAX`) or does not fit 32 bits.
    #[error("invalid guest cid {0}: it must be {MIN_GUEST_CID} to {MAX_GUEST_CID}")]
    InvalidCid(u64),
    /// The Unix socket path is empty, or too long for `<path>_<port>` to fit a
    /// `sockaddr_un`.
    #[error(
        "vsock unix socket path {path:?} is {len} bytes long: it must be 1 to \
         {MAX_UDS_PATH_LEN}, to leave room for the _<port> suffix"
    )]
    UdsPathTooLong {
        /// The refused path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// Something already exists at the Unix socket path; it is left alone.
    #[error("vsock unix socket path {0:?} already exists (remove it if it is stale)")]
    UdsPathExists(PathBuf),
    /// Binding or setting up the listener failed.
    #[error("failed to listen on the vsock unix socket {0:?}")]
    BindUds(PathBuf, #[source] io::Error),
    /// Creating the internal epoll failed.
    #[error("failed to create the vsock epoll")]
    CreateEpoll(#[source] io::Error),
    /// Creating the timerfd failed.
    #[error("failed to create the vsock timerfd")]
    CreateTimer(#[source] io::Error),
    /// Registering the listener or the timer in the internal epoll failed.
    #[error("failed to register a vsock event source")]
    RegisterEvent(#[source] io::Error),
}

/// Result of the socket device's fallible operations.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests;
