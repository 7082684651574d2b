// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A virtio network device (virtio 1.2, 5.1) over a Linux TAP interface.
//!
//! [`Net`] implements [`tvm_virtio::VirtioDevice`] with one receive queue (0) and one
//! transmit queue (1), 256 entries each, no control queue and no multiqueue. It offers
//! checksum offload and TSO in both directions (CSUM, GUEST_CSUM, GUEST_TSO4/6,
//! GUEST_ECN, HOST_TSO4/6, HOST_ECN), mergeable receive buffers (MRG_RXBUF), a MAC
//! address and the link status; the transport adds VERSION_1, EVENT_IDX and INDIRECT_DESC.
//!
//! The host side is a [`NetBackend`]: a [`Tap`] opened with `IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR` and a 12-byte vnet header, so every frame on the backend starts with the
//! `virtio_net_hdr_v1` the guest sees. TX passes the guest's header through to the kernel;
//! RX takes the kernel's header, drops a frame whose header asks for offloads the guest did
//! not negotiate, clears the flags without GUEST_CSUM, and fills in `num_buffers`. Tests
//! use a datagram socket pair instead of a TAP, so nothing here needs root or KVM.
//!
//! The TAP is an extra event source of the device
//! ([`VirtioDevice::extra_event_sources`](tvm_virtio::VirtioDevice::extra_event_sources)),
//! watched edge-triggered by the transport's event-manager subscriber; queue notifications
//! arrive through [`VirtioDevice::process_queue`](tvm_virtio::VirtioDevice::process_queue).
//! All packet work runs on the event-loop thread, except one receive attempt at activation.
//! The transmit queue is served by [`tvm_virtio::QueueDrain`], the queue loop the other
//! virtio devices share; the receive loop is the device's own, driven by the frames the TAP
//! holds rather than by the chains the driver posts.
//!
//! What it does not do: the control queue (promiscuous mode, MAC filters, VLAN filters,
//! announce), multiqueue, UFO/USO, `VIRTIO_NET_F_MTU`, rate limiting, vhost.
//!
//! # Example
//!
//! ```no_run
//! use tvm_virtio_net::{parse_mac, Net, NetConfig};
//!
//! let net = Net::open(&NetConfig {
//!     tap: "tap0".into(),
//!     mac: Some(parse_mac("52:54:00:12:34:56")?),
//! })?;
//! assert_eq!(net.mac(), [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
//! // Hand `net` to tvm_virtio::VirtioPciDevice::new; at shutdown:
//! net.log_counters();
//! # Ok::<(), tvm_virtio_net::Error>(())
//! ```

#![deny(missing_docs)]

use std::io;

mod backend;
mod consts;
mod device;
mod mac;
mod rx;
mod tap;
mod tx;
mod warnings;

pub use backend::NetBackend;
pub use consts::{
    DEVICE_FEATURES, MAX_PACKET_LEN, MAX_RX_FRAMES_PER_RUN, MAX_TX_FRAMES_PER_RUN, QUEUE_SIZE,
    RX_QUEUE, TX_QUEUE, VIRTIO_ID_NET, VNET_HDR_LEN,
};
pub use device::{offload_flags, Net, NetConfig, NetCounters};
pub use mac::{format_mac, generated_mac, parse_mac};
pub use tap::{validate_tap_name, Tap};

/// Errors of the network device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The TAP name cannot be an interface name.
    #[error("invalid tap name {name:?}: {reason}")]
    InvalidTapName {
        /// The refused name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `/dev/net/tun` does not exist or has no driver behind it.
    #[error("/dev/net/tun is missing (load the tun module, or create the node: mknod /dev/net/tun c 10 200)")]
    TunMissing(#[source] io::Error),
    /// `/dev/net/tun` exists but we may not open it.
    #[error("no permission to open /dev/net/tun")]
    TunPermission(#[source] io::Error),
    /// Opening `/dev/net/tun` failed for another reason.
    #[error("failed to open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    /// TUNSETIFF was refused with EPERM or EACCES.
    #[error("no permission to create/attach TAP {name} (needs CAP_NET_ADMIN)")]
    TapPermission {
        /// The interface name.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// TUNSETIFF was refused with EBUSY.
    #[error("TAP {name} is in use (attached to another process, or created with other flags)")]
    TapBusy {
        /// The interface name.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// TUNSETIFF failed for another reason (EINVAL: an existing interface of another type).
    #[error("failed to create/attach TAP {name}")]
    CreateTap {
        /// The interface name.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// TUNSETVNETHDRSZ failed.
    #[error("failed to set the vnet header size of TAP {name}")]
    SetVnetHdrSize {
        /// The interface name.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A MAC address that does not parse or cannot be a NIC's address.
    #[error("invalid mac address {input:?}: {reason}")]
    InvalidMac {
        /// The refused input, as given.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Result of the network device's fallible operations.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests;
