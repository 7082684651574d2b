// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What the device counts.

/// Packet, byte, connection and error counts since the device was built (resets do not
/// clear them). Named after Firecracker's vsock metrics (`rx_bytes_count`,
/// `tx_packets_count`, `conns_added`, ...); RX is host to guest, TX guest to host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockCounters {
    /// Packets put in the guest's RX queue, data and control.
    pub rx_packets: u64,
    /// Stream bytes sent to the guest (RW payloads).
    pub rx_bytes: u64,
    /// Well-formed packets taken from the guest's TX queue.
    pub tx_packets: u64,
    /// Stream bytes the guest sent on its connections (RW payloads).
    pub tx_bytes: u64,
    /// Connections added to the table (host- or guest-initiated).
    pub conns_added: u64,
    /// Connections removed from the table (ended, reset, or dropped by a device reset).
    pub conns_removed: u64,
    /// Connections the device ended on its own with an RST: a request the guest did not
    /// answer in time, the grace after both sides shut down, a host stream error, a guest
    /// breaking the protocol. The RST that answers a guest's close is not counted.
    pub conns_killed: u64,
    /// TX chains or packets refused: malformed chains, a bad length, a source that is not
    /// the guest, a destination that is not the host, a type other than stream, an unknown
    /// operation, or a protocol violation on a connection (credit overrun included).
    pub tx_errors: u64,
    /// RX or event chains the device could not write a packet or event into.
    pub rx_errors: u64,
    /// Host socket failures other than EAGAIN: accept, read or write errors (a host peer
    /// that went away while guest data was pending included).
    pub host_errors: u64,
    /// Host connections closed before they reached the guest: a bad, too long or missing
    /// `CONNECT` line, the device not active, the connection limit.
    pub host_refused: u64,
    /// Guest connection requests answered with an RST: no host listener, a full backlog,
    /// the connection limit.
    pub guest_refused: u64,
    /// RSTs for unknown connections dropped because the queue for them was full (the
    /// guest posted no RX buffers for a long time).
    pub rst_dropped: u64,
}
