// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The host side of the device: anything that moves whole frames with a vnet header.

use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;

/// Where the device's frames go and come from: a [`Tap`](crate::Tap) in production, a
/// datagram socket pair in tests.
///
/// Every frame, in both directions, starts with the 12-byte `virtio_net_hdr_v1`
/// ([`VNET_HDR_LEN`](crate::VNET_HDR_LEN)), the way a TAP with `IFF_VNET_HDR` and
/// `TUNSETVNETHDRSZ` 12 delivers and accepts them. Frame boundaries are preserved: one
/// call moves one frame.
///
/// The file descriptor must be non-blocking: the device reads until
/// [`io::ErrorKind::WouldBlock`] and watches the descriptor edge-triggered.
pub trait NetBackend: AsRawFd + Send {
    /// Reads one frame into `buf` and returns its length.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::WouldBlock`] when no frame is waiting; any other I/O error.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Writes the frame gathered from `iov` and returns the bytes written.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::WouldBlock`] when the backend's queue is full; any other I/O error
    /// (for a TAP, `EINVAL` on a vnet header the kernel refuses, `EIO` when the interface
    /// is down).
    fn write_frame(&mut self, iov: &[IoSlice<'_>]) -> io::Result<usize>;

    /// Tells the backend which offloads the guest accepts on receive (`TUN_F_*` flags, see
    /// [`offload_flags`](crate::offload_flags)): with 0 every received frame arrives fully
    /// checksummed and segmented.
    ///
    /// # Errors
    ///
    /// The backend refused the flags.
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
}
