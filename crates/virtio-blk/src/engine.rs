// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Asynchronous I/O engines: [`Op`], one operation on the image that owns everything the
//! kernel touches while it runs, and [`AsyncIo`], something that runs many of them at once
//! and says when each completes. [`Uring`] is the real one (the `io-uring` crate); tests
//! use a fake that completes operations in whatever order they choose.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use log::warn;
use vm_memory::{GuestMemoryMmap, VolatileSlice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How long dropping an engine waits for the operations still running; past it their
/// buffers are leaked rather than freed under the kernel.
const DROP_GRACE: Duration = Duration::from_secs(2);

/// A byte buffer whose start is aligned (for `O_DIRECT`), owned by the operation that
/// reads into it or writes from it.
#[derive(Debug)]
pub(crate) struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes starting at a multiple of `align` (a power of two).
    pub(crate) fn zeroed(len: usize, align: usize) -> AlignedBuf {
        let storage = vec![0u8; len + align];
        // align_offset of a u8 pointer to a power of two is below `align`.
        let start = storage.as_ptr().align_offset(align).min(align);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    /// The buffer's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// The buffer's bytes, to fill.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// What an [`Op`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpKind {
    /// `preadv` into the operation's buffers.
    Read,
    /// `pwritev` from the operation's buffers.
    Write,
    /// `fdatasync`.
    Flush,
    /// `fallocate(mode | FALLOC_FL_KEEP_SIZE)` of `len` bytes.
    Fallocate {
        /// `FALLOC_FL_*` bits.
        mode: i32,
        /// Bytes from the operation's offset.
        len: u64,
    },
}

/// The iovecs of an operation: guest memory or the operation's own buffer.
struct Iovecs(Box<[libc::iovec]>);

// SAFETY: the iovecs are plain pointers and lengths; what they point to (guest memory kept
// mapped by the operation's clone of it, or the operation's own buffer) is shared memory
// that any thread may read or write, and nothing here dereferences them: only the kernel
// does, while the operation runs.
unsafe impl Send for Iovecs {}

impl std::fmt::Debug for Iovecs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} iovecs", self.0.len())
    }
}

/// One operation on the image, with everything the kernel reads or writes while it runs:
/// the iovec array, a clone of the guest memory the iovecs point into (which keeps it
/// mapped), or the operation's own aligned buffer. An engine keeps the operation until it
/// completes, so none of that goes away under the kernel.
#[derive(Debug)]
pub(crate) struct Op {
    /// Which request this operation belongs to (the device's slot).
    pub(crate) token: usize,
    pub(crate) kind: OpKind,
    /// Byte offset in the image (reads, writes, fallocate).
    pub(crate) offset: u64,
    iovecs: Iovecs,
    /// Bytes the iovecs still cover.
    remaining: u64,
    /// Boxed: an operation moves through the engine by value, and few have one.
    bounce: Option<Box<AlignedBuf>>,
    /// Keeps guest memory mapped while the kernel uses the iovecs.
    mem: Option<GuestMemoryMmap<()>>,
    /// Run by one of the kernel's workers rather than during the submission (io_uring's
    /// `IOSQE_ASYNC`): a piece of a transfer split to run beside the others.
    pub(crate) background: bool,
}

impl Op {
    fn new(token: usize, kind: OpKind, offset: u64) -> Op {
        Op {
            token,
            kind,
            offset,
            iovecs: Iovecs(Box::new([])),
            remaining: 0,
            bounce: None,
            mem: None,
            background: false,
        }
    }

    /// A read or write (`write`) at `offset` straight into or out of `slices` of `mem`.
    pub(crate) fn guest(
        token: usize,
        write: bool,
        offset: u64,
        mem: &GuestMemoryMmap<()>,
        slices: &[VolatileSlice<'_, ()>],
    ) -> Op {
        let kind = if write { OpKind::Write } else { OpKind::Read };
        let mut op = Op::new(token, kind, offset);
        op.iovecs = Iovecs(
            slices
                .iter()
                .map(|s| libc::iovec {
                    iov_base: s.ptr_guard_mut().as_ptr().cast(),
                    iov_len: s.len(),
                })
                .collect(),
        );
        op.remaining = slices.iter().map(|s| s.len() as u64).sum();
        op.mem = Some(mem.clone());
        op
    }

    /// A read or write (`write`) at `offset` into or out of `buf`, which the operation
    /// owns until it completes ([`take_bounce`](Self::take_bounce)).
    pub(crate) fn bounce(token: usize, write: bool, offset: u64, mut buf: AlignedBuf) -> Op {
        let kind = if write { OpKind::Write } else { OpKind::Read };
        let mut op = Op::new(token, kind, offset);
        let bytes = buf.bytes_mut();
        op.iovecs = Iovecs(Box::new([libc::iovec {
            iov_base: bytes.as_mut_ptr().cast(),
            iov_len: bytes.len(),
        }]));
        op.remaining = bytes.len() as u64;
        op.bounce = Some(Box::new(buf));
        op
    }

    /// `fdatasync`.
    pub(crate) fn flush(token: usize) -> Op {
        Op::new(token, OpKind::Flush, 0)
    }

    /// `fallocate(mode | FALLOC_FL_KEEP_SIZE, offset, len)`.
    pub(crate) fn fallocate(token: usize, mode: i32, offset: u64, len: u64) -> Op {
        Op::new(token, OpKind::Fallocate { mode, len }, offset)
    }

    /// Bytes a read or write still has to move.
    pub(crate) fn remaining(&self) -> u64 {
        self.remaining
    }

    /// After a short read or write of `n` bytes: the rest, at the offset after them.
    pub(crate) fn advance(&mut self, n: u64) {
        let mut n = n.min(self.remaining);
        self.offset += n;
        self.remaining -= n;
        let mut first = 0;
        let iovs = &mut self.iovecs.0;
        while n > 0 && first < iovs.len() {
            let cur = &mut iovs[first];
            let len = cur.iov_len as u64;
            if n >= len {
                n -= len;
                cur.iov_len = 0;
                first += 1;
            } else {
                // n < iov_len: the advanced pointer stays inside the same buffer. Only the
                // address changes, nothing is dereferenced here.
                cur.iov_base = cur.iov_base.cast::<u8>().wrapping_add(n as usize).cast();
                cur.iov_len -= n as usize;
                n = 0;
            }
        }
        let rest: Vec<libc::iovec> = iovs.iter().filter(|v| v.iov_len > 0).copied().collect();
        self.iovecs = Iovecs(rest.into_boxed_slice());
    }

    /// Splits a read or write straight between the image and guest memory into at most
    /// `pieces` operations on consecutive ranges, of about the same size, each a multiple
    /// of `unit` bytes (a power of two; the last takes the rest): the parts of one
    /// transfer that the kernel can run at the same time. Cuts fall between iovecs or
    /// inside one at a multiple of `unit` from the transfer's start, so pieces of a direct
    /// transfer whose iovecs are all multiples of `unit` stay aligned. An operation with
    /// its own buffer, another kind, or one too short for two pieces, comes back whole.
    pub(crate) fn split(self, pieces: usize, unit: usize) -> Vec<Op> {
        let unit = unit.max(1) as u64;
        let splittable = matches!(self.kind, OpKind::Read | OpKind::Write)
            && self.bounce.is_none()
            && self.mem.is_some();
        // Each piece a multiple of `unit`, rounded up: fewer pieces where that leaves
        // nothing for the last.
        let per = self.remaining.div_ceil(pieces.max(1) as u64).div_ceil(unit) * unit;
        if !splittable || pieces < 2 || per == 0 || per >= self.remaining {
            return vec![self];
        }
        let mut out = Vec::with_capacity(pieces);
        let mut cur: Vec<libc::iovec> = Vec::new();
        let (mut filled, mut offset) = (0u64, self.offset);
        for iov in self.iovecs.0.iter() {
            let (mut base, mut len) = (iov.iov_base.cast::<u8>(), iov.iov_len as u64);
            while len > 0 {
                let last = out.len() + 1 == pieces;
                let take = if last { len } else { len.min(per - filled) };
                cur.push(libc::iovec {
                    iov_base: base.cast(),
                    // take <= len, an iov_len.
                    iov_len: take as usize,
                });
                // take <= len: the pointer stays inside the same buffer; only the address
                // changes, nothing is dereferenced here.
                base = base.wrapping_add(take as usize);
                len -= take;
                filled += take;
                if !last && filled == per {
                    let mut op = Op::new(self.token, self.kind, offset);
                    op.iovecs = Iovecs(std::mem::take(&mut cur).into_boxed_slice());
                    op.remaining = filled;
                    op.mem.clone_from(&self.mem);
                    out.push(op);
                    offset += filled;
                    filled = 0;
                }
            }
        }
        if filled > 0 {
            let mut op = Op::new(self.token, self.kind, offset);
            op.iovecs = Iovecs(cur.into_boxed_slice());
            op.remaining = filled;
            op.mem = self.mem;
            out.push(op);
        }
        out
    }

    /// The operation's own buffer, once it completed (a bounced read's data).
    pub(crate) fn take_bounce(&mut self) -> Option<AlignedBuf> {
        self.iovecs = Iovecs(Box::new([]));
        self.bounce.take().map(|b| *b)
    }

    /// The iovecs, for a fake engine that copies through them.
    #[cfg(test)]
    pub(crate) fn iovecs(&self) -> &[libc::iovec] {
        &self.iovecs.0
    }
}

/// Something that runs many [`Op`]s at once on one file and says when each completes.
pub(crate) trait AsyncIo: Send {
    /// Queues `op` on `fd`; it starts at the next [`submit`](Self::submit). Gives the
    /// operation back when there is no room.
    fn push(&mut self, fd: RawFd, op: Op) -> Result<(), Op>;
    /// Starts everything queued.
    ///
    /// # Errors
    ///
    /// The kernel's refusal; the operations stay queued.
    fn submit(&mut self) -> io::Result<()>;
    /// Appends the operations that completed, each with its result (bytes moved, or a
    /// negative errno), to `out`.
    fn reap(&mut self, out: &mut Vec<(Op, i32)>);
    /// Waits until an operation completes (returns at once when none is running).
    ///
    /// # Errors
    ///
    /// The kernel's.
    fn wait(&mut self) -> io::Result<()>;
    /// Operations queued or running.
    fn in_flight(&self) -> usize;
    /// Operations it can still take.
    fn room(&self) -> usize;
    /// Readable when operations completed (for the device's worker to poll).
    fn event_fd(&self) -> RawFd;
}

/// The io_uring engine.
pub(crate) struct Uring {
    ring: IoUring,
    /// Operations queued or running, by their `user_data`.
    ops: Vec<Option<Op>>,
    free: Vec<usize>,
    /// Pushed but not yet handed to the kernel.
    unsubmitted: usize,
    evt: EventFd,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl Uring {
    /// A ring for up to `entries` operations at once (rounded up to a power of two by the
    /// kernel), with an EventFd that becomes readable on completions. Fails when io_uring
    /// is not there (an old kernel, `kernel.io_uring_disabled`, a seccomp filter) or lacks
    /// an operation the device needs.
    ///
    /// # Errors
    ///
    /// The reason, as the kernel gave it.
    pub(crate) fn new(entries: u32) -> io::Result<Uring> {
        let ring = IoUring::new(entries)?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::Readv::CODE, "readv"),
            (opcode::Writev::CODE, "writev"),
            (opcode::Fsync::CODE, "fsync"),
            (opcode::Fallocate::CODE, "fallocate"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::other(format!(
                    "the kernel's io_uring has no {name}"
                )));
            }
        }
        let evt = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(evt.as_raw_fd())?;
        let capacity = ring.params().sq_entries() as usize;
        Ok(Uring {
            ring,
            ops: (0..capacity).map(|_| None).collect(),
            free: (0..capacity).rev().collect(),
            unsubmitted: 0,
            evt,
        })
    }
}

impl AsyncIo for Uring {
    fn push(&mut self, fd: RawFd, op: Op) -> Result<(), Op> {
        let Some(slot) = self.free.pop() else {
            return Err(op);
        };
        let fd = types::Fd(fd);
        let iovs = &op.iovecs.0;
        // At most SEG_MAX + 1 iovecs per request, far below u32::MAX.
        let n_iovs = iovs.len() as u32;
        let entry = match op.kind {
            OpKind::Read => opcode::Readv::new(fd, iovs.as_ptr(), n_iovs)
                .offset(op.offset)
                .build(),
            OpKind::Write => opcode::Writev::new(fd, iovs.as_ptr(), n_iovs)
                .offset(op.offset)
                .build(),
            OpKind::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            OpKind::Fallocate { mode, len } => opcode::Fallocate::new(fd, len)
                .offset(op.offset)
                .mode(mode | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        }
        .user_data(slot as u64);
        let entry = if op.background {
            entry.flags(squeue::Flags::ASYNC)
        } else {
            entry
        };
        // SAFETY: everything the entry points to (the iovec array, and the guest memory or
        // buffer the iovecs cover) is owned or kept alive by `op`, which is stored in
        // `self.ops` below and leaves it only when its completion is reaped; `Drop` waits
        // for running operations and leaks them if they do not finish. The boxed iovec
        // array does not move when `op` does.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            self.free.push(slot);
            return Err(op);
        }
        self.ops[slot] = Some(op);
        self.unsubmitted += 1;
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(n) => {
                    self.unsubmitted = self.unsubmitted.saturating_sub(n);
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn reap(&mut self, out: &mut Vec<(Op, i32)>) {
        // Clear the notification before looking, so a completion after the look wakes the
        // worker again.
        let _ = self.evt.read();
        for cqe in self.ring.completion() {
            let slot = usize::try_from(cqe.user_data()).unwrap_or(usize::MAX);
            match self.ops.get_mut(slot).and_then(Option::take) {
                Some(op) => {
                    self.free.push(slot);
                    out.push((op, cqe.result()));
                }
                None => warn!("io_uring: completion for unknown operation {slot}"),
            }
        }
    }

    /// Polls the completion ring (no system call but sleeps: it runs on vCPU threads and
    /// the event loop too, whose seccomp filters have no io_uring).
    fn wait(&mut self) -> io::Result<()> {
        loop {
            if self.in_flight() == 0 || !self.ring.completion().is_empty() {
                return Ok(());
            }
            if self.unsubmitted >= self.in_flight() {
                return Err(io::Error::other(
                    "the operations left were never handed to the kernel",
                ));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    fn in_flight(&self) -> usize {
        self.ops.len() - self.free.len()
    }

    fn room(&self) -> usize {
        self.free.len()
    }

    fn event_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        let deadline = Instant::now() + DROP_GRACE;
        let mut done = Vec::new();
        while self.in_flight() > self.unsubmitted && Instant::now() < deadline {
            self.reap(&mut done);
            done.clear();
            if self.in_flight() > 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if self.in_flight() > 0 {
            warn!(
                "io_uring: {} operations still running after {DROP_GRACE:?}; their buffers \
                 are left allocated",
                self.in_flight()
            );
            // The kernel may still write into them: never free them.
            std::mem::forget(std::mem::take(&mut self.ops));
        }
    }
}
