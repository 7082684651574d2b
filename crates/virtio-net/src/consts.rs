// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The device's numbers: its ID, queues, header and packet sizes, per-run limits, and the
//! feature bits it offers. Layouts and bits come from virtio-bindings; the rest is ours.

use std::mem::{offset_of, size_of};

use virtio_bindings::virtio_net::{
    virtio_net_config, virtio_net_hdr_v1, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
};

/// Virtio device ID of a network device (virtio 1.2, 5), from virtio-bindings.
pub const VIRTIO_ID_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
/// Size of each of the two queues.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: u16 = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: u16 = 1;
/// Length of `virtio_net_hdr_v1`, the header in front of every frame of a VERSION_1
/// device (virtio 1.2, 5.1.6), `num_buffers` included; also the TAP's vnet header size.
pub const VNET_HDR_LEN: usize = size_of::<virtio_net_hdr_v1>();
/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
pub(crate) const NUM_BUFFERS_OFFSET: usize = offset_of!(virtio_net_hdr_v1, num_buffers);
/// Largest packet (vnet header + Ethernet frame) moved in either direction: the header, a
/// 64 KiB GSO frame, and 256 bytes of room for its Ethernet and VLAN headers.
pub const MAX_PACKET_LEN: usize = VNET_HDR_LEN + 65535 + 256;
/// Most frames received (delivered or dropped) per event before the device yields to the
/// event loop; it continues through the receive queue's EventFd.
pub const MAX_RX_FRAMES_PER_RUN: usize = 256;
/// Most transmit chains handled per notification before the device yields to the event
/// loop; it continues through the transmit queue's EventFd.
pub const MAX_TX_FRAMES_PER_RUN: usize = 256;

/// Why a chain whose last descriptor still has NEXT was refused: virtio-queue's iterator
/// stopped it rather than follow it further.
pub(crate) const UNTERMINATED: &str = "the chain does not end: it loops, or has more \
     descriptors than the queue (or indirect table) holds, a next index beyond it, or more \
     than 4 GiB";

/// Feature bits the device offers (the transport adds VERSION_1, EVENT_IDX and
/// INDIRECT_DESC).
pub const DEVICE_FEATURES: u64 = 1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_MAC
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_GUEST_ECN
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6
    | 1 << VIRTIO_NET_F_HOST_ECN
    | 1 << VIRTIO_NET_F_MRG_RXBUF
    | 1 << VIRTIO_NET_F_STATUS;

/// Offset of `mac` in `virtio_net_config`.
pub(crate) const CONFIG_MAC_OFFSET: usize = offset_of!(virtio_net_config, mac);
/// Offset of `status` in `virtio_net_config`.
pub(crate) const CONFIG_STATUS_OFFSET: usize = offset_of!(virtio_net_config, status);
/// Bytes of `virtio_net_config` we fill: `mac[6]` and `status`, up to
/// `max_virtqueue_pairs` (which needs VIRTIO_NET_F_MQ, not offered).
pub(crate) const CONFIG_LEN: usize = offset_of!(virtio_net_config, max_virtqueue_pairs);
