// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A TAP interface opened through `/dev/net/tun` (Linux
//! `Documentation/networking/tuntap.rst`).

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::raw::{c_int, c_short, c_uint, c_ulong};
use std::os::unix::fs::OpenOptionsExt;

use log::debug;
use vm_memory::volatile_memory::PtrGuard;
use vm_memory::VolatileSlice;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::ioctl_iow_nr;

use crate::backend::{gather, retry_eintr, NetBackend};
use crate::consts::VNET_HDR_LEN;
use crate::{Error, Result};

/// The clone device every TAP is created or attached through.
const TUN_PATH: &str = "/dev/net/tun";
/// Length of an interface name buffer, terminating NUL included (`IFNAMSIZ`).
const IFNAMSIZ: usize = 16;
/// The ioctl type of the tun driver (`TUNSETIFF` is `_IOW('T', 202, int)`).
const TUNTAP: c_uint = b'T' as c_uint;

ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, c_uint);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, c_int);

/// `struct ifreq` as TUNSETIFF reads and writes it: the name, then the `ifr_flags` member
/// of the union, padded to the union's 24 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: c_short,
    pad: [u8; 22],
}

// The kernel copies sizeof(struct ifreq) = 40 bytes in and out; ours must be as large.
const _: () = assert!(std::mem::size_of::<IfReq>() == 40);

/// Checks that `name` can be a Linux interface name (the rules of the kernel's
/// `dev_valid_name`) that we can derive a stable MAC from: 1 to 15 bytes, not `.` or
/// `..`, no `/`, `:`, whitespace or NUL, and no `%` (the kernel would pick a name from a
/// `tap%d` template, so the interface would differ from run to run).
///
/// # Errors
///
/// [`Error::InvalidTapName`] saying which rule failed.
pub fn validate_tap_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() >= IFNAMSIZ {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("not an interface name")
    } else if name.contains('/') || name.contains(':') {
        Some("contains '/' or ':'")
    } else if name.chars().any(|c| c.is_whitespace() || c == '\0') {
        Some("contains whitespace or NUL")
    } else if name.contains('%') {
        Some("name templates (%d) are not supported")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidTapName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// A TAP interface: an Ethernet device whose other end is this file descriptor.
///
/// Opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a 12-byte vnet header, non-blocking
/// and close-on-exec. An interface that did not exist is created and disappears when the
/// `Tap` is dropped; an existing persistent one (`ip tuntap add dev NAME mode tap`) is
/// attached to and stays. Setting the interface up, addresses and bridging are left to the
/// host's configuration.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates or attaches the TAP interface `name`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidTapName`]; [`Error::TunMissing`], [`Error::TunPermission`] or
    /// [`Error::OpenTun`] when `/dev/net/tun` cannot be opened; [`Error::TapPermission`]
    /// without CAP_NET_ADMIN (or not owning a persistent TAP); [`Error::TapBusy`] when
    /// another process has it attached; [`Error::CreateTap`] otherwise (for instance an
    /// existing TUN or non-vnet-header TAP of that name); [`Error::SetVnetHdrSize`].
    pub fn open(name: &str) -> Result<Tap> {
        validate_tap_name(name)?;
        // std opens with O_CLOEXEC.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(TUN_PATH)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => Error::TunMissing(e),
                Some(libc::EACCES | libc::EPERM) => Error::TunPermission(e),
                _ => Error::OpenTun(e),
            })?;

        let mut ifr = IfReq {
            name: [0; IFNAMSIZ],
            // The flags are small positive constants that fit a short.
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as c_short,
            pad: [0; 22],
        };
        // validate_tap_name: at most IFNAMSIZ - 1 bytes, so a NUL terminator remains.
        ifr.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes) at the pointer;
        // `ifr` is a live, exclusively borrowed, 40-byte repr(C) value with that layout
        // (name, then the flags of the union) and a NUL-terminated name. The kernel touches
        // no other memory of ours, and `file` is an open /dev/net/tun descriptor for the
        // whole call.
        let ret = unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut ifr) };
        if ret < 0 {
            let source = io::Error::last_os_error();
            let name = name.to_string();
            return Err(match source.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => Error::TapPermission { name, source },
                Some(libc::EBUSY) => Error::TapBusy { name, source },
                _ => Error::CreateTap { name, source },
            });
        }
        // The kernel writes back the interface's name; templates are refused above, so it
        // is the one we asked for, but report what the kernel says.
        let len = ifr.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        let tap = Tap {
            file,
            name: String::from_utf8_lossy(&ifr.name[..len]).into_owned(),
        };

        // VNET_HDR_LEN is 12.
        let hdr_len = VNET_HDR_LEN as c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int at the pointer; `hdr_len` is a live int for
        // the whole call and the kernel does not keep the pointer. `tap.file` is the open
        // tun descriptor.
        let ret = unsafe { ioctl_with_ref(&tap.file, TUNSETVNETHDRSZ(), &hdr_len) };
        if ret < 0 {
            return Err(Error::SetVnetHdrSize {
                name: tap.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        debug!("tap {}: opened, fd {}", tap.name, tap.file.as_raw_fd());
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the receive offloads (`TUN_F_CSUM`, `TUN_F_TSO4`, `TUN_F_TSO6`,
    /// `TUN_F_TSO_ECN`): which partially checksummed or GSO frames the kernel may hand us.
    /// The kernel refuses TSO without CSUM and ECN without TSO (EINVAL); see
    /// [`offload_flags`](crate::offload_flags).
    ///
    /// # Errors
    ///
    /// The ioctl's error.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value, not through a pointer, so no
        // memory of ours is involved; `self.file` is the open tun descriptor.
        let ret = unsafe { ioctl_with_val(&self.file, TUNSETOFFLOAD(), c_ulong::from(flags)) };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // One read(2) on a tun descriptor returns exactly one frame.
        self.file.read(buf)
    }

    fn write_frame(&mut self, iov: &[IoSlice<'_>]) -> io::Result<usize> {
        // One writev(2) on a tun descriptor is exactly one frame.
        self.file.write_vectored(iov)
    }

    fn write_frame_guest(&mut self, frame: &[VolatileSlice<'_>]) -> io::Result<usize> {
        // One writev(2) on a tun descriptor is exactly one frame.
        writev_guest(&self.file, frame)
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        Tap::set_offload(self, flags)
    }
}

/// Most slices one frame is sent from without a copy; a frame in more pieces (a guest's
/// odd choice: Linux uses at most MAX_SKB_FRAGS + 2) is gathered into one buffer first.
const MAX_FRAME_IOVECS: usize = 64;

/// One `writev(2)` of `frame` (slices of guest memory) to `file`, retried on EINTR.
fn writev_guest(file: &File, frame: &[VolatileSlice<'_>]) -> io::Result<usize> {
    if frame.len() > MAX_FRAME_IOVECS {
        let buf = gather(frame);
        return retry_eintr(|| (&*file).write(&buf));
    }
    // On the stack: nothing is allocated per frame. The guards keep the pointers valid
    // (vm-memory's contract for a slice's memory) until the call returns.
    let mut guards: [Option<PtrGuard>; MAX_FRAME_IOVECS] = std::array::from_fn(|_| None);
    let mut iovs = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_FRAME_IOVECS];
    for ((slice, guard), iov) in frame.iter().zip(&mut guards).zip(&mut iovs) {
        let g = guard.insert(slice.ptr_guard());
        *iov = libc::iovec {
            iov_base: g.as_ptr().cast_mut().cast(),
            iov_len: slice.len(),
        };
    }
    let count = frame.len();
    retry_eintr(|| {
        // SAFETY: the first `count` (at most 64) entries of `iovs` are initialised, each
        // covering one VolatileSlice of mapped guest memory, which stays mapped while
        // `frame` and `guards` are borrowed, i.e. for the whole call; writev only reads
        // through them (a guest changing them meanwhile changes only the bytes sent).
        // The descriptor is valid while `file` is borrowed.
        let n = unsafe { libc::writev(file.as_raw_fd(), iovs.as_ptr(), count as c_int) };
        // n < 0 exactly when writev failed, with errno set.
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixDatagram;

    use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

    use super::*;

    /// Sends `pieces` (guest address, length) of `mem` through `writev_guest` on one end
    /// of a datagram pair and returns the datagram the other end got.
    fn send(mem: &GuestMemoryMmap<()>, pieces: &[(u64, usize)]) -> (usize, Vec<u8>) {
        let (tx, rx) = UnixDatagram::pair().unwrap();
        let file = File::from(OwnedFd::from(tx));
        let mut frame = Vec::new();
        for &(addr, len) in pieces {
            for s in mem
                .get_slices(GuestAddress(addr), len, Permissions::Read)
                .unwrap()
            {
                frame.push(s.unwrap());
            }
        }
        let n = writev_guest(&file, &frame).unwrap();
        let mut buf = vec![0u8; 4096];
        let got = rx.recv(&mut buf).unwrap();
        buf.truncate(got);
        (n, buf)
    }

    #[test]
    fn a_frame_goes_from_guest_memory_in_one_write_without_a_copy_or_with_one() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        let pattern: Vec<u8> = (0..0x2000u32).map(|i| (i * 7 % 251) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(0)).unwrap();
        // A piece across the two regions (two slices), then one elsewhere.
        let (n, got) = send(&mem, &[(0xff0, 0x20), (0x100, 0x10)]);
        let mut want = pattern[0xff0..0x1010].to_vec();
        want.extend_from_slice(&pattern[0x100..0x110]);
        assert_eq!(n, want.len());
        assert_eq!(got, want);
        // More slices than one writev takes here: gathered first, the same bytes.
        let many: Vec<(u64, usize)> = (0..(MAX_FRAME_IOVECS as u64 + 5))
            .map(|i| (i * 3, 2))
            .collect();
        let (n, got) = send(&mem, &many);
        let want: Vec<u8> = many
            .iter()
            .flat_map(|&(a, l)| pattern[a as usize..a as usize + l].to_vec())
            .collect();
        assert_eq!(n, want.len());
        assert_eq!(got, want);
    }
}
