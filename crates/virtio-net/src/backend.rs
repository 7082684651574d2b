// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The host side of the device: anything that moves whole frames with a vnet header.

use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;

use vm_memory::VolatileSlice;

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

    /// Writes the frame whose bytes are `frame`, slices of guest memory in order, and
    /// returns the bytes written. The default gathers them into one buffer and calls
    /// [`write_frame`](Self::write_frame); a [`Tap`](crate::Tap) hands the slices to the
    /// kernel as they are (`writev`), with no copy.
    ///
    /// # Errors
    ///
    /// Those of [`write_frame`](Self::write_frame).
    fn write_frame_guest(&mut self, frame: &[VolatileSlice<'_>]) -> io::Result<usize> {
        let buf = gather(frame);
        retry_eintr(|| self.write_frame(&[IoSlice::new(&buf)]))
    }

    /// Tells the backend which offloads the guest accepts on receive (`TUN_F_*` flags, see
    /// [`offload_flags`](crate::offload_flags)): with 0 every received frame arrives fully
    /// checksummed and segmented.
    ///
    /// # Errors
    ///
    /// The backend refused the flags.
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
}

/// The bytes of `frame` (slices of guest memory) copied into one buffer, in order.
pub(crate) fn gather(frame: &[VolatileSlice<'_>]) -> Vec<u8> {
    let mut buf = vec![0u8; frame.iter().map(|s| s.len()).sum()];
    let mut at = 0;
    for s in frame {
        s.copy_to(&mut buf[at..at + s.len()]);
        at += s.len();
    }
    buf
}

/// `op` again for as long as it fails with EINTR.
pub(crate) fn retry_eintr<T>(mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}
