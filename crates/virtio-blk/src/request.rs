// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Parsing, validating and executing one virtio-blk request (virtio 1.2, 5.2.6): a pure
//! function over guest memory and a [`BlockBackend`].

use std::fs::File;
use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use log::debug;
use virtio_bindings::virtio_blk::{
    virtio_blk_discard_write_zeroes, virtio_blk_outhdr, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::{BitmapSlice, BS};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions, VolatileSlice};

/// Bytes per virtio-blk sector, whatever the block size.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID answer (VIRTIO_BLK_ID_BYTES).
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Length of one `virtio_blk_discard_write_zeroes` segment: sector, num_sectors, flags.
const SEGMENT_LEN: u64 = size_of::<virtio_blk_discard_write_zeroes>() as u64;
/// Length of the request header (`virtio_blk_outhdr`): type, ioprio (reserved), sector.
const HEADER_LEN: u32 = size_of::<virtio_blk_outhdr>() as u32;
/// Bytes moved between the disk and guest memory per copy.
const BOUNCE_LEN: usize = 64 * 1024;

const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// Most iovecs per `preadv`/`pwritev` (Linux's IOV_MAX).
const IOV_MAX: usize = 1024;

/// The little-endian `u32` at `offset` of `bytes`, which the caller sized from the
/// virtio-bindings layout the offset comes from.
fn le_u32(bytes: &[u8], offset: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(v)
}

/// The little-endian `u64` at `offset` of `bytes`, as [`le_u32`].
fn le_u64(bytes: &[u8], offset: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(v)
}

/// The storage behind a block device: positional reads and writes and a data sync.
///
/// Implemented for [`File`] (`preadv`/`pwritev` straight into and out of guest memory,
/// `fdatasync`); tests may use anything.
pub trait BlockBackend {
    /// Fills `bufs` (guest memory), in order, from byte `offset`.
    ///
    /// The default goes through a bounce buffer and [`read_exact_at`](Self::read_exact_at).
    ///
    /// # Errors
    ///
    /// Any I/O error, including a short read; the buffers may be partly filled then.
    fn read_vectored_at<B: BitmapSlice>(
        &mut self,
        bufs: &[VolatileSlice<'_, B>],
        offset: u64,
    ) -> io::Result<()> {
        let mut offset = offset;
        for s in bufs {
            let mut bounce = vec![0u8; s.len()];
            self.read_exact_at(&mut bounce, offset)?;
            s.copy_from(&bounce);
            offset += s.len() as u64;
        }
        Ok(())
    }
    /// Writes `bufs` (guest memory), in order, at byte `offset`.
    ///
    /// The default goes through a bounce buffer and [`write_all_at`](Self::write_all_at).
    ///
    /// # Errors
    ///
    /// Any I/O error; part of the data may be written then.
    fn write_vectored_at<B: BitmapSlice>(
        &mut self,
        bufs: &[VolatileSlice<'_, B>],
        offset: u64,
    ) -> io::Result<()> {
        let mut offset = offset;
        for s in bufs {
            let mut bounce = vec![0u8; s.len()];
            s.copy_to(&mut bounce);
            self.write_all_at(&bounce, offset)?;
            offset += s.len() as u64;
        }
        Ok(())
    }
    /// Fills `buf` from byte `offset`.
    ///
    /// # Errors
    ///
    /// Any I/O error, including a short read.
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at byte `offset`.
    ///
    /// # Errors
    ///
    /// Any I/O error.
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes written data durable.
    ///
    /// # Errors
    ///
    /// Any I/O error.
    fn flush(&mut self) -> io::Result<()>;
    /// Deallocates `len` bytes at `offset`; they read back as zeros afterwards.
    ///
    /// # Errors
    ///
    /// Any I/O error.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes `len` bytes at `offset` read as zeros.
    ///
    /// # Errors
    ///
    /// Any I/O error.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()>;
}

/// `fallocate(fd, mode | FALLOC_FL_KEEP_SIZE, offset, len)`.
fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: fallocate only takes integers: a file descriptor, valid while `file` is
    // borrowed, a mode and a range. It changes the file, not our memory.
    let ret =
        unsafe { libc::fallocate(file.as_raw_fd(), mode | libc::FALLOC_FL_KEEP_SIZE, off, len) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Writes `len` zero bytes at `offset`, for files that cannot zero a range in place.
fn write_zeroes_slow(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; BOUNCE_LEN];
    let mut done = 0u64;
    while done < len {
        // Bounded by BOUNCE_LEN.
        let n = (len - done).min(BOUNCE_LEN as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

/// `preadv`/`pwritev` of `bufs` at `offset` until every byte is moved.
fn file_vectored<B: BitmapSlice>(
    file: &File,
    bufs: &[VolatileSlice<'_, B>],
    mut offset: u64,
    write: bool,
) -> io::Result<()> {
    for group in bufs.chunks(IOV_MAX) {
        // The guards keep the slices' memory valid (and, with a dirty bitmap, accounted)
        // while the kernel uses the pointers.
        let guards: Vec<_> = group.iter().map(|s| s.ptr_guard_mut()).collect();
        let mut iovs: Vec<libc::iovec> = guards
            .iter()
            .zip(group)
            .map(|(g, s)| libc::iovec {
                iov_base: g.as_ptr().cast(),
                iov_len: s.len(),
            })
            .collect();
        let mut first = 0;
        while first < iovs.len() {
            let off = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // At most IOV_MAX entries.
            let cnt = (iovs.len() - first) as libc::c_int;
            let iov = iovs[first..].as_ptr();
            // SAFETY: `iov` points to `cnt` initialised iovecs, each covering a VolatileSlice
            // of guest memory that stays mapped while `guards` lives (the whole loop); the
            // kernel reads or writes only inside those ranges. The descriptor is valid while
            // `file` is borrowed. Guest memory may change under the kernel's copy, which is
            // what the guest asked for and cannot hurt us.
            let n = unsafe {
                if write {
                    libc::pwritev(file.as_raw_fd(), iov, cnt, off)
                } else {
                    libc::preadv(file.as_raw_fd(), iov, cnt, off)
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(if write {
                    io::Error::from(io::ErrorKind::WriteZero)
                } else {
                    io::Error::from(io::ErrorKind::UnexpectedEof)
                });
            }
            // n > 0 and at most the sum of the iovec lengths.
            let mut n = n as usize;
            offset += n as u64;
            while n > 0 {
                let cur = &mut iovs[first];
                if n >= cur.iov_len {
                    n -= cur.iov_len;
                    first += 1;
                } else {
                    // SAFETY: n < iov_len, so the advanced pointer stays inside the slice.
                    cur.iov_base = unsafe { cur.iov_base.cast::<u8>().add(n) }.cast();
                    cur.iov_len -= n;
                    n = 0;
                }
            }
            // Skip empty iovecs left at the front.
            while first < iovs.len() && iovs[first].iov_len == 0 {
                first += 1;
            }
        }
        if !write {
            for s in group {
                s.bitmap().mark_dirty(0, s.len());
            }
        }
    }
    Ok(())
}

impl BlockBackend for File {
    fn read_vectored_at<B: BitmapSlice>(
        &mut self,
        bufs: &[VolatileSlice<'_, B>],
        offset: u64,
    ) -> io::Result<()> {
        file_vectored(self, bufs, offset, false)
    }

    fn write_vectored_at<B: BitmapSlice>(
        &mut self,
        bufs: &[VolatileSlice<'_, B>],
        offset: u64,
    ) -> io::Result<()> {
        file_vectored(self, bufs, offset, true)
    }

    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sync_data()
    }

    /// Punches a hole; where the file system cannot, writes zeros, so that a discarded
    /// range always reads back as zeros (what Linux assumes of a discard).
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        match fallocate(self, libc::FALLOC_FL_PUNCH_HOLE, offset, len) {
            Err(e) if unsupported(&e) => write_zeroes_slow(self, offset, len),
            r => r,
        }
    }

    /// `FALLOC_FL_ZERO_RANGE`, then a hole punch, then plain zero writes, whichever the
    /// file system supports first.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        match fallocate(self, libc::FALLOC_FL_ZERO_RANGE, offset, len) {
            Err(e) if unsupported(&e) => {
                match fallocate(self, libc::FALLOC_FL_PUNCH_HOLE, offset, len) {
                    Err(e) if unsupported(&e) => write_zeroes_slow(self, offset, len),
                    r => r,
                }
            }
            r => r,
        }
    }
}

/// What request validation needs to know about the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// Size in 512-byte sectors.
    pub capacity_sectors: u64,
    /// OUT requests are refused with IOERR.
    pub read_only: bool,
    /// The GET_ID answer, NUL-padded.
    pub id: [u8; ID_LEN],
    /// Most data descriptors in one request (VIRTIO_BLK_F_SEG_MAX).
    pub seg_max: u32,
    /// Largest data descriptor in bytes (VIRTIO_BLK_F_SIZE_MAX).
    pub size_max: u32,
    /// DISCARD and WRITE_ZEROES are offered (never on a read-only disk).
    pub discard: bool,
    /// Most segments in one DISCARD or WRITE_ZEROES request.
    pub max_discard_seg: u32,
    /// Most sectors in one DISCARD or WRITE_ZEROES segment.
    pub max_discard_sectors: u32,
    /// The logical block size the driver was told (VIRTIO_BLK_F_BLK_SIZE): a multiple of
    /// 512; reads and writes must be aligned to it in offset and length (more than 512
    /// only where the host's direct I/O asks for it).
    pub block_size: u32,
}

/// What [`handle_request`] did with a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Bytes written to guest memory (data and status byte), for the used ring.
    pub len: u32,
    /// What was wrong with the request when the driver broke the rules (a malformed chain,
    /// a buffer outside guest memory, a transfer beyond the capacity, a write to a
    /// read-only disk, ...): the device answered IOERR, or nothing at all when it had no
    /// usable status byte. `None` for a request that succeeded, one refused as
    /// unsupported, or one that failed on the host side.
    pub driver_error: Option<String>,
    /// The host's error when it failed a valid request (answered IOERR); `None` otherwise.
    pub host_error: Option<HostError>,
    /// What became of the request, for the device's counters.
    pub outcome: Outcome,
}

/// What became of one request (see [`Completion`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Read from the disk into guest memory: that many bytes.
    Read(u64),
    /// Written from guest memory to the disk: that many bytes.
    Written(u64),
    /// A FLUSH that completed.
    Flushed,
    /// Any other request that completed (GET_ID, DISCARD, WRITE_ZEROES).
    Other,
    /// A request type or flag the device does not offer (UNSUPP).
    Unsupported,
    /// A valid request the host failed (IOERR).
    HostError,
    /// A request that broke the rules (IOERR, or no answer at all).
    DriverError,
}

/// A host I/O error that failed a valid request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostError {
    /// The error itself, as the OS puts it (`No space left on device (os error 28)`): one
    /// kind per text, whatever the request.
    pub kind: String,
    /// What the device was doing: `write at 4096`, `flush`, ...
    pub during: String,
}

/// Why a request failed: the status to answer, and the driver's or the host's error.
#[derive(Debug)]
pub(crate) struct Failed {
    status: u8,
    driver_error: Option<String>,
    host_error: Option<HostError>,
}

/// The driver broke the rules: IOERR.
fn ioerr(msg: std::fmt::Arguments<'_>) -> Failed {
    debug!("virtio-blk: bad request: {msg}");
    Failed {
        status: STATUS_IOERR,
        driver_error: Some(msg.to_string()),
        host_error: None,
    }
}

/// The host failed a valid request with `err` while doing `during`: IOERR.
pub(crate) fn host_err(during: std::fmt::Arguments<'_>, err: &io::Error) -> Failed {
    debug!("virtio-blk: i/o error: {during}: {err}");
    Failed {
        status: STATUS_IOERR,
        driver_error: None,
        host_error: Some(HostError {
            kind: err.to_string(),
            during: during.to_string(),
        }),
    }
}

/// A request type or flag the device does not offer: UNSUPP.
fn unsupp(msg: std::fmt::Arguments<'_>) -> Failed {
    debug!("virtio-blk: {msg}");
    Failed {
        status: STATUS_UNSUPP,
        driver_error: None,
        host_error: None,
    }
}

/// A request answered with nothing at all (no usable status descriptor).
fn unanswered(msg: String) -> Completion {
    debug!("virtio-blk: bad request: {msg}");
    Completion {
        len: 0,
        driver_error: Some(msg),
        host_error: None,
        outcome: Outcome::DriverError,
    }
}

/// A request that validated, with what is left to do.
#[derive(Debug)]
pub(crate) struct Parsed {
    /// Where the status byte goes.
    pub(crate) status: GuestAddress,
    /// Bytes the device already wrote into the chain (a GET_ID's answer); a read adds its
    /// data when it completes.
    pub(crate) written: u32,
    pub(crate) work: Work,
}

/// What a validated request asks of the image.
#[derive(Debug)]
pub(crate) enum Work {
    /// Read `total` bytes at `offset` into the data descriptors (checked: device-writable,
    /// in guest memory).
    Read {
        offset: u64,
        total: u64,
        data: Vec<Descriptor>,
    },
    /// Write the data descriptors (checked: device-readable, in guest memory), `total`
    /// bytes, at `offset`.
    Write {
        offset: u64,
        total: u64,
        data: Vec<Descriptor>,
    },
    /// Make written data durable.
    Flush,
    /// Discard (or zero, `discard == false`) each `(offset, len)` byte range, in order.
    Ranges {
        discard: bool,
        ranges: Vec<(u64, u64)>,
    },
    /// Nothing left to do (GET_ID, answered while parsing).
    Done(Outcome),
}

/// What [`prepare`] made of a chain.
#[derive(Debug)]
pub(crate) enum Prepared {
    /// Valid: execute it, then [`finish`] it.
    Ready(Parsed),
    /// Answered already (refused, or no usable status byte).
    Answered(Completion),
}

/// Parses, validates and executes the request in `chain`, writes its status byte and
/// returns the number of bytes written to guest memory (for the used ring) and, for a
/// request that broke the rules, what was wrong.
///
/// The layout accepted is the one every known driver uses: the 16-byte header alone in
/// the first, device-readable descriptor; data descriptors; the status in the last
/// descriptor, device-writable, at its first byte. Every descriptor must lie in guest
/// memory. A chain with no usable status descriptor, or one that loops (virtio-queue ends
/// a chain after queue-size descriptors; we also stop after `seg_max + 3`), is answered
/// with nothing written at all (used length 0). Data
/// reaches guest memory only through the request's own device-writable descriptors, and the
/// backend is touched only after the whole request validated.
pub fn handle_request<M: GuestMemory, B: BlockBackend>(
    mem: &M,
    chain: DescriptorChain<&M>,
    disk: &DiskInfo,
    backend: &mut B,
) -> Completion {
    match prepare(mem, chain, disk) {
        Prepared::Answered(done) => done,
        Prepared::Ready(p) => {
            let result = execute(mem, &p.work, backend);
            let written = match &result {
                // total <= seg_max * size_max, far below 4 GiB.
                Ok(Outcome::Read(n)) => p.written.saturating_add(*n as u32),
                _ => p.written,
            };
            finish(mem, p.status, written, result)
        }
    }
}

/// Parses and validates the request in `chain` (see [`handle_request`]); answers one that
/// fails validation, and executes a GET_ID (it needs nothing from the image).
pub(crate) fn prepare<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    disk: &DiskInfo,
) -> Prepared {
    // Header + data + status; one more to notice a chain that is too long.
    let limit = disk.seg_max as usize + 3;
    let descs: Vec<Descriptor> = chain.take(limit).collect();
    let Some((status, rest)) = descs.split_last() else {
        return Prepared::Answered(unanswered("empty descriptor chain".into()));
    };
    if status.has_next() {
        // virtio-queue stops a chain after queue-size descriptors, so a loop ends here;
        // it also stops before a descriptor that takes the chain past 4 GiB.
        return Prepared::Answered(unanswered(format!(
            "descriptor chain loops, or is longer than {} descriptors or 4 GiB",
            limit - 1
        )));
    }
    if !status.is_write_only()
        || status.len() == 0
        || !mem.check_range(status.addr(), 1, Permissions::Write)
    {
        return Prepared::Answered(unanswered(format!(
            "unusable status descriptor at {:#x}, {} bytes, flags {:#x}",
            status.addr().0,
            status.len(),
            status.flags()
        )));
    }
    let mut written = 0u32;
    match parse(mem, rest, disk, &mut written) {
        Ok(work) => Prepared::Ready(Parsed {
            status: status.addr(),
            written,
            work,
        }),
        Err(f) => Prepared::Answered(finish(mem, status.addr(), written, Err(f))),
    }
}

/// Writes the status byte of a request that ended with `result` at `status` and says what
/// became of it; `written` is what the device put in the chain's data buffers.
pub(crate) fn finish<M: GuestMemory>(
    mem: &M,
    status: GuestAddress,
    written: u32,
    result: Result<Outcome, Failed>,
) -> Completion {
    let (code, driver_error, host_error, outcome) = match result {
        Ok(outcome) => (STATUS_OK, None, None, outcome),
        Err(f) => {
            let outcome = match (&f.driver_error, f.status) {
                (Some(_), _) => Outcome::DriverError,
                (None, STATUS_UNSUPP) => Outcome::Unsupported,
                (None, _) => Outcome::HostError,
            };
            (f.status, f.driver_error, f.host_error, outcome)
        }
    };
    let len = match mem.write_obj(code, status) {
        Ok(()) => written.saturating_add(1),
        Err(e) => {
            debug!("virtio-blk: failed to write the status byte: {e}");
            written
        }
    };
    Completion {
        len,
        driver_error,
        host_error,
        outcome,
    }
}

/// Checks that every data descriptor has the direction `write` (device-writable or not),
/// is at most `size_max` and lies in guest memory; returns the total length.
fn check_data<M: GuestMemory>(
    mem: &M,
    data: &[Descriptor],
    write: bool,
    size_max: u32,
) -> Result<u64, Failed> {
    let perm = if write {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let mut total = 0u64;
    for d in data {
        if d.is_write_only() != write {
            return Err(ioerr(format_args!(
                "data descriptor at {:#x} has the wrong direction",
                d.addr().0
            )));
        }
        if d.len() > size_max {
            return Err(ioerr(format_args!("data descriptor of {} bytes", d.len())));
        }
        let fits = usize::try_from(d.len()).is_ok_and(|len| mem.check_range(d.addr(), len, perm));
        if !fits {
            return Err(ioerr(format_args!(
                "data descriptor {:#x}+{:#x} outside guest memory",
                d.addr().0,
                d.len()
            )));
        }
        total += u64::from(d.len());
    }
    Ok(total)
}

/// The host memory behind the data descriptors (checked by [`check_data`]), in order.
pub(crate) fn guest_slices<'a, M: GuestMemory>(
    mem: &'a M,
    data: &[Descriptor],
    perm: Permissions,
) -> Result<Vec<VolatileSlice<'a, BS<'a, M::Bitmap>>>, Failed> {
    let mut slices = Vec::with_capacity(data.len());
    for d in data {
        let iter = mem
            .get_slices(d.addr(), d.len() as usize, perm)
            .map_err(|e| ioerr(format_args!("guest buffer {:#x}: {e}", d.addr().0)))?;
        for s in iter {
            slices.push(s.map_err(|e| ioerr(format_args!("guest buffer {:#x}: {e}", d.addr().0)))?);
        }
    }
    Ok(slices)
}

/// Validates the request whose header and data descriptors are `descs`; answers a
/// GET_ID (adding its bytes to `written`).
fn parse<M: GuestMemory>(
    mem: &M,
    descs: &[Descriptor],
    disk: &DiskInfo,
    written: &mut u32,
) -> Result<Work, Failed> {
    let (hdr, data) = descs
        .split_first()
        .ok_or_else(|| ioerr(format_args!("no header descriptor")))?;
    if hdr.is_write_only() || hdr.len() < HEADER_LEN {
        return Err(ioerr(format_args!(
            "header descriptor of {} bytes, flags {:#x}",
            hdr.len(),
            hdr.flags()
        )));
    }
    if data.len() > disk.seg_max as usize {
        return Err(ioerr(format_args!("{} data descriptors", data.len())));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut header, hdr.addr())
        .map_err(|e| ioerr(format_args!("header unreadable: {e}")))?;
    let req_type = le_u32(&header, offset_of!(virtio_blk_outhdr, type_));
    let sector = le_u64(&header, offset_of!(virtio_blk_outhdr, sector));

    match req_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let write_to_guest = req_type == VIRTIO_BLK_T_IN;
            if !write_to_guest && disk.read_only {
                return Err(ioerr(format_args!("write to a read-only disk")));
            }
            let total = check_data(mem, data, write_to_guest, disk.size_max)?;
            if total == 0 {
                return Err(ioerr(format_args!("transfer without data")));
            }
            let align = u64::from(disk.block_size.max(SECTOR_SIZE as u32));
            if total % align != 0 {
                return Err(ioerr(format_args!(
                    "data length {total} not a multiple of {align}"
                )));
            }
            let end = sector.checked_add(total / SECTOR_SIZE);
            if end.is_none_or(|end| end > disk.capacity_sectors) {
                return Err(ioerr(format_args!(
                    "sectors {sector}+{} beyond capacity {}",
                    total / SECTOR_SIZE,
                    disk.capacity_sectors
                )));
            }
            // sector + len <= capacity <= u64::MAX / 512: no overflow.
            let offset = sector * SECTOR_SIZE;
            if offset % align != 0 {
                return Err(ioerr(format_args!(
                    "sector {sector} not aligned to the {align}-byte block size"
                )));
            }
            let data = data.to_vec();
            Ok(if write_to_guest {
                Work::Read {
                    offset,
                    total,
                    data,
                }
            } else {
                Work::Write {
                    offset,
                    total,
                    data,
                }
            })
        }
        VIRTIO_BLK_T_FLUSH => Ok(Work::Flush),
        VIRTIO_BLK_T_GET_ID => {
            if data.is_empty() {
                return Err(ioerr(format_args!("get-id without a buffer")));
            }
            check_data(mem, data, true, u32::MAX)?;
            let mut id = &disk.id[..];
            for d in data {
                let n = id.len().min(d.len() as usize);
                mem.write_slice(&id[..n], d.addr())
                    .map_err(|e| ioerr(format_args!("guest write: {e}")))?;
                // n <= 20.
                *written = written.saturating_add(n as u32);
                id = &id[n..];
            }
            Ok(Work::Done(Outcome::Other))
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if !disk.discard || disk.read_only {
                return Err(unsupp(format_args!("discard/write-zeroes not offered")));
            }
            let discard = req_type == VIRTIO_BLK_T_DISCARD;
            let ranges = discard_ranges(mem, data, disk, discard)?;
            Ok(Work::Ranges { discard, ranges })
        }
        other => Err(unsupp(format_args!("unsupported request type {other}"))),
    }
}

/// Executes validated `work` on `backend`, synchronously.
fn execute<M: GuestMemory, B: BlockBackend>(
    mem: &M,
    work: &Work,
    backend: &mut B,
) -> Result<Outcome, Failed> {
    match work {
        Work::Read {
            offset,
            total,
            data,
        } => {
            let slices = guest_slices(mem, data, Permissions::Write)?;
            backend
                .read_vectored_at(&slices, *offset)
                .map_err(|e| host_err(format_args!("read at {offset}"), &e))?;
            Ok(Outcome::Read(*total))
        }
        Work::Write {
            offset,
            total,
            data,
        } => {
            let slices = guest_slices(mem, data, Permissions::Read)?;
            backend
                .write_vectored_at(&slices, *offset)
                .map_err(|e| host_err(format_args!("write at {offset}"), &e))?;
            Ok(Outcome::Written(*total))
        }
        Work::Flush => backend
            .flush()
            .map(|()| Outcome::Flushed)
            .map_err(|e| host_err(format_args!("flush"), &e)),
        Work::Ranges { discard, ranges } => {
            for &(offset, len) in ranges {
                let res = if *discard {
                    backend.discard(offset, len)
                } else {
                    backend.write_zeroes(offset, len)
                };
                res.map_err(|e| {
                    host_err(format_args!("{} at {offset}+{len}", range_op(*discard)), &e)
                })?;
            }
            Ok(Outcome::Other)
        }
        Work::Done(outcome) => Ok(*outcome),
    }
}

/// The name of a DISCARD or WRITE_ZEROES operation, for errors.
pub(crate) fn range_op(discard: bool) -> &'static str {
    if discard {
        "discard"
    } else {
        "write-zeroes"
    }
}

/// DISCARD / WRITE_ZEROES (virtio 1.2, 5.2.6): reads and checks every segment; returns
/// their byte ranges.
fn discard_ranges<M: GuestMemory>(
    mem: &M,
    data: &[Descriptor],
    disk: &DiskInfo,
    discard: bool,
) -> Result<Vec<(u64, u64)>, Failed> {
    let max_total = u64::from(disk.max_discard_seg) * SEGMENT_LEN;
    let total = check_data(mem, data, false, u32::MAX)?;
    if total == 0 || total % SEGMENT_LEN != 0 || total > max_total {
        return Err(ioerr(format_args!(
            "discard/write-zeroes data of {total} bytes"
        )));
    }
    // total <= max_discard_seg * 16: small.
    let mut raw = Vec::with_capacity(total as usize);
    for d in data {
        let mut buf = vec![0u8; d.len() as usize];
        mem.read_slice(&mut buf, d.addr())
            .map_err(|e| ioerr(format_args!("guest read: {e}")))?;
        raw.extend_from_slice(&buf);
    }
    let mut ranges = Vec::with_capacity(raw.len() / SEGMENT_LEN as usize);
    for seg in raw.chunks_exact(SEGMENT_LEN as usize) {
        let sector = le_u64(seg, offset_of!(virtio_blk_discard_write_zeroes, sector));
        let num = le_u32(
            seg,
            offset_of!(virtio_blk_discard_write_zeroes, num_sectors),
        );
        let flags = le_u32(seg, offset_of!(virtio_blk_discard_write_zeroes, flags));
        let known = if discard {
            0
        } else {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        };
        if flags & !known != 0 {
            return Err(unsupp(format_args!(
                "discard/write-zeroes flags {flags:#x} unsupported"
            )));
        }
        if num > disk.max_discard_sectors {
            return Err(ioerr(format_args!("segment of {num} sectors")));
        }
        let end = sector.checked_add(u64::from(num));
        if end.is_none_or(|end| end > disk.capacity_sectors) {
            return Err(ioerr(format_args!(
                "segment {sector}+{num} beyond capacity {}",
                disk.capacity_sectors
            )));
        }
        ranges.push((sector * SECTOR_SIZE, u64::from(num) * SECTOR_SIZE));
    }
    Ok(ranges)
}
