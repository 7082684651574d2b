// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The block device: opening and locking the image, config space, queue processing.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::mem::offset_of;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{debug, info, warn};
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::EventFd;

use tvm_util::{warn_once, WarnOnce};
use tvm_virtio::{
    ActivateContext, Coalescer, EventSet, Poll, QueueDrain, VirtioDevice, VirtioInterrupt,
};

use crate::engine::{AlignedBuf, AsyncIo, Op, OpKind, Uring};
use crate::request::{
    finish, guest_slices, handle_request, host_err, prepare, range_op, BlockBackend, Completion,
    DiskInfo, Failed, HostError, Outcome, Prepared, Work, ID_LEN, SECTOR_SIZE,
};
use crate::{Error, Result};

/// Virtio device ID of a block device (virtio 1.2, 5), from virtio-bindings.
pub const VIRTIO_ID_BLOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
/// Size of each request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most request queues a disk offers (`num_queues`).
pub const MAX_QUEUES: u16 = 64;
/// Bytes of zeros written per operation where a file system can neither punch holes nor
/// zero ranges.
const ZERO_CHUNK: usize = 1 << 20;
/// Most data segments per request (VIRTIO_BLK_F_SEG_MAX): queue size minus the header and
/// the status, as QEMU offers, so Linux can send a 1 MiB request of scattered 4 KiB pages
/// as one request (through an indirect table).
pub const SEG_MAX: u32 = 254;
/// Largest data segment in bytes (VIRTIO_BLK_F_SIZE_MAX).
pub const SIZE_MAX: u32 = 1 << 20;
/// Block size reported to the guest (VIRTIO_BLK_F_BLK_SIZE) for a disk through the host
/// page cache; with `cache=none` it is the file's direct-I/O alignment when that is larger.
pub const BLK_SIZE: u32 = 512;
/// Most requests handled per notification before yielding (the rest is picked up by
/// re-signalling the queue's EventFd): half a queue, so that on a worker thread
/// ([`tvm_virtio::Threaded`]) a reset, a pause or a counters read waits for at most that
/// many requests.
const MAX_REQUESTS_PER_RUN: usize = 128;
/// Most segments in one DISCARD / WRITE_ZEROES request.
pub const MAX_DISCARD_SEG: u32 = 16;
/// Most sectors in one DISCARD / WRITE_ZEROES segment (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Bytes of `virtio_blk_config` we fill, up to `write_zeroes_may_unmap` and its padding
/// (the secure-erase and zoned fields after it need features we do not offer).
const CONFIG_LEN: usize = offset_of!(virtio_blk_config, max_secure_erase_sectors);

/// Writes `bytes` at `offset` of the config space, an offset from virtio-bindings'
/// `virtio_blk_config` below [`CONFIG_LEN`].
fn set_config(config: &mut [u8; CONFIG_LEN], offset: usize, bytes: &[u8]) {
    config[offset..offset + bytes.len()].copy_from_slice(bytes);
}

/// Which I/O engine serves a disk's requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoEngine {
    /// io_uring where the kernel offers it, otherwise [`Sync`](Self::Sync) (with one info
    /// line saying why).
    #[default]
    Auto,
    /// One request at a time per disk: `preadv`/`pwritev`/`fdatasync` on the thread that
    /// serves the queue.
    Sync,
    /// io_uring: a queue's worth of requests in flight, completed as they finish; opening
    /// the disk fails where io_uring is not available.
    Uring,
}

/// How the host caches the image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// Through the host page cache; FLUSH is an `fdatasync`.
    #[default]
    Writeback,
    /// `O_DIRECT`: around the host page cache (the disk's own write cache remains, so FLUSH
    /// is still an `fdatasync`). Offsets and lengths follow the file's direct-I/O alignment,
    /// which the driver is told as the block size; guest buffers that are not aligned go
    /// through an aligned bounce buffer.
    None,
}

/// How to open a disk image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockConfig {
    /// Path of the image file (or block device).
    pub path: PathBuf,
    /// Open read-only and offer VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// The GET_ID answer, at most 20 bytes; default derived from the file's device and inode.
    pub id: Option<String>,
    /// The I/O engine.
    pub engine: IoEngine,
    /// The host cache mode.
    pub cache: CacheMode,
    /// Request queues offered (VIRTIO_BLK_F_MQ above 1), 1 to [`MAX_QUEUES`]; 0 means 1.
    pub num_queues: u16,
}

/// One enabled queue of the active device.
struct ActiveQueue {
    queue: Queue,
    evt: EventFd,
}

struct Active {
    mem: GuestMemoryMmap<()>,
    /// By queue index; `None` for a queue the driver did not enable.
    queues: Vec<Option<ActiveQueue>>,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// What the device did since it was opened, request by request (a media change keeps
/// counting). Firecracker's metric names where it has one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockCounters {
    /// Bytes read from the disk into guest memory.
    pub read_bytes: u64,
    /// Bytes written from guest memory to the disk.
    pub write_bytes: u64,
    /// Reads that completed.
    pub read_count: u64,
    /// Writes that completed.
    pub write_count: u64,
    /// FLUSHes that completed.
    pub flush_count: u64,
    /// Other requests that completed (GET_ID, DISCARD, WRITE_ZEROES).
    pub other_count: u64,
    /// Requests answered UNSUPP.
    pub unsupported_count: u64,
    /// Valid requests the host failed (answered IOERR).
    pub execute_fails: u64,
    /// Requests that broke the rules (answered IOERR, or not at all).
    pub invalid_reqs_count: u64,
}

impl BlockCounters {
    fn count(&mut self, outcome: Outcome) {
        let c = match outcome {
            Outcome::Read(bytes) => {
                self.read_bytes += bytes;
                &mut self.read_count
            }
            Outcome::Written(bytes) => {
                self.write_bytes += bytes;
                &mut self.write_count
            }
            Outcome::Flushed => &mut self.flush_count,
            Outcome::Other => &mut self.other_count,
            Outcome::Unsupported => &mut self.unsupported_count,
            Outcome::HostError => &mut self.execute_fails,
            Outcome::DriverError => &mut self.invalid_reqs_count,
        };
        *c += 1;
    }
}

/// How many kinds of host I/O error a device tells apart; more kinds count as `other`.
pub const MAX_HOST_ERROR_KINDS: usize = 16;

/// Host I/O errors by kind (the error's text, `No space left on device (os error 28)`):
/// the first of each kind is logged at `warn!`, the rest at `debug!`, and
/// [`Block::log_counters`] lists them all.
#[derive(Debug, Default)]
struct HostErrors(BTreeMap<String, u64>);

impl HostErrors {
    fn note(&mut self, name: &str, e: HostError) {
        let key = if self.0.contains_key(&e.kind) || self.0.len() < MAX_HOST_ERROR_KINDS {
            e.kind
        } else {
            "other".to_string()
        };
        let count = self.0.entry(key.clone()).or_default();
        *count += 1;
        if *count == 1 {
            warn!(
                "{name}: host i/o error during {}: {key}; the guest got an i/o error \
                 (more of this kind are counted and listed at exit)",
                e.during
            );
        } else {
            debug!("{name}: host i/o error during {}: {key}", e.during);
        }
    }

    /// `kind xN, kind xM`, or `none`.
    fn summary(&self) -> String {
        if self.0.is_empty() {
            return "none".into();
        }
        let parts: Vec<String> = self.0.iter().map(|(k, n)| format!("{k} x{n}")).collect();
        parts.join(", ")
    }
}

/// Driver errors the device reports once at `warn!` (then at `debug!`), one flag per kind.
#[derive(Debug, Default)]
struct DriverWarnings {
    /// A request that broke the rules (answered IOERR, or not at all).
    request: WarnOnce,
    /// An available index too far ahead, or a head index beyond the queue.
    ring: WarnOnce,
    /// A write to the read-only config space.
    config: WarnOnce,
}

/// A virtio block device over a host file.
///
/// Implements [`VirtioDevice`]; put it in a [`tvm_virtio::VirtioPciDevice`], whose
/// event-manager subscriber calls [`VirtioDevice::process_queue`] when the guest kicks.
///
/// Driver errors (a malformed request, a ring index out of range, a config write) are
/// logged at `warn!` the first time of each kind, prefixed with `virtio-blk "PATH"`, and at
/// `debug!` afterwards.
pub struct Block {
    file: File,
    /// `O_DIRECT` (cache=none): the memory alignment direct I/O needs; 0 otherwise.
    mem_align: usize,
    cache: CacheMode,
    queue_sizes: Vec<u16>,
    /// The asynchronous engine and its requests in flight; `None`: synchronous I/O.
    engine: Option<AsyncState>,
    /// No new request is taken from the queues ([`hold`](Block::hold), or while the
    /// requests in flight are being completed): they wait in the rings.
    held: bool,
    path: PathBuf,
    /// `virtio-blk "PATH"`, for log lines.
    name: String,
    info: DiskInfo,
    config: [u8; CONFIG_LEN],
    /// The id asked for at open, kept across media changes.
    configured_id: Option<String>,
    active: Option<Active>,
    warnings: DriverWarnings,
    counters: BlockCounters,
    host_errors: HostErrors,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("path", &self.path)
            .field("info", &self.info)
            .field("active", &self.active.is_some())
            .field("engine", &self.engine_name())
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

/// Takes a non-blocking `flock` on `file`: exclusive for read-write images, shared for
/// read-only ones (so a read-write user and any other user exclude each other).
fn lock(file: &File, path: &Path, exclusive: bool) -> Result<()> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    // SAFETY: flock takes a file descriptor and an operation and touches no memory of
    // ours; the descriptor is valid for the duration of the call because `file` is borrowed.
    let ret = unsafe { libc::flock(file.as_raw_fd(), op) };
    if ret == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(Error::Locked(path.to_path_buf()))
    } else {
        Err(Error::Lock {
            path: path.to_path_buf(),
            source: err,
        })
    }
}

/// Opens the image at `path` for reading, and writing unless `read_only`, with `O_DIRECT`
/// for [`CacheMode::None`] (not locked).
fn open_image(path: &Path, read_only: bool, cache: CacheMode) -> Result<File> {
    let flags = match cache {
        CacheMode::Writeback => 0,
        CacheMode::None => libc::O_DIRECT,
    };
    OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(flags)
        .open(path)
        .map_err(|source| {
            if cache == CacheMode::None && source.raw_os_error() == Some(libc::EINVAL) {
                Error::NoDirectIo(path.to_path_buf())
            } else {
                Error::Open {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })
}

/// Turns `O_DIRECT` on for `file` (opened elsewhere, without it).
fn set_direct(file: &File, path: &Path) -> Result<()> {
    // SAFETY: fcntl(F_GETFL) takes a descriptor, valid while `file` is borrowed, and
    // touches no memory of ours.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(Error::NoDirectIo(path.to_path_buf()));
    }
    if flags & libc::O_DIRECT != 0 {
        return Ok(());
    }
    // SAFETY: as above; F_SETFL takes the new flags as an integer.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_DIRECT) };
    if ret < 0 {
        return Err(Error::NoDirectIo(path.to_path_buf()));
    }
    Ok(())
}

/// Direct-I/O alignment of `file` as `(memory, offset)` in bytes (statx `STATX_DIOALIGN`);
/// 512 for both where the kernel does not say.
fn dio_align(file: &File, path: &Path) -> Result<(u32, u32)> {
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx reads the NUL-terminated empty path and writes one `statx` into `stx`,
    // which lives across the call; the descriptor is valid while `file` is borrowed.
    let ret = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if ret != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return Ok((512, 512));
    }
    if stx.stx_dio_offset_align == 0 {
        return Err(Error::NoDirectIo(path.to_path_buf()));
    }
    let pow2 = |v: u32| v.max(1).next_power_of_two();
    Ok((pow2(stx.stx_dio_mem_align), pow2(stx.stx_dio_offset_align)))
}

/// Measures the image `file` (`cfg.path`) and fills in what the driver is told about it:
/// the validation parameters and the config space.
fn describe(
    file: &mut File,
    cfg: &BlockConfig,
    block_size: u32,
    num_queues: u16,
) -> Result<(DiskInfo, [u8; CONFIG_LEN])> {
    let size = file.seek(SeekFrom::End(0)).map_err(|source| Error::Size {
        path: cfg.path.clone(),
        source,
    })?;
    let meta = file.metadata().map_err(|source| Error::Size {
        path: cfg.path.clone(),
        source,
    })?;
    let mut id = [0u8; ID_LEN];
    let id_src = match cfg.id.clone() {
        Some(s) if s.len() > ID_LEN => return Err(Error::InvalidId(s)),
        Some(s) => s,
        None => format!("tvm{:x}-{:x}", meta.dev(), meta.ino()),
    };
    let n = id_src.len().min(ID_LEN);
    id[..n].copy_from_slice(&id_src.as_bytes()[..n]);

    let capacity_sectors = size / SECTOR_SIZE;
    if size % SECTOR_SIZE != 0 {
        warn!(
            "disk image {} is not a multiple of 512 bytes; the last {} bytes are unused",
            cfg.path.display(),
            size % SECTOR_SIZE
        );
    }
    let info = DiskInfo {
        capacity_sectors,
        read_only: cfg.read_only,
        id,
        seg_max: SEG_MAX,
        size_max: SIZE_MAX,
        discard: !cfg.read_only,
        max_discard_seg: MAX_DISCARD_SEG,
        max_discard_sectors: MAX_DISCARD_SECTORS,
        block_size,
    };
    let mut config = [0u8; CONFIG_LEN];
    let c = &mut config;
    set_config(
        c,
        offset_of!(virtio_blk_config, capacity),
        &capacity_sectors.to_le_bytes(),
    );
    set_config(
        c,
        offset_of!(virtio_blk_config, size_max),
        &SIZE_MAX.to_le_bytes(),
    );
    set_config(
        c,
        offset_of!(virtio_blk_config, seg_max),
        &SEG_MAX.to_le_bytes(),
    );
    set_config(
        c,
        offset_of!(virtio_blk_config, blk_size),
        &block_size.to_le_bytes(),
    );
    set_config(
        c,
        offset_of!(virtio_blk_config, num_queues),
        &num_queues.to_le_bytes(),
    );
    if info.discard {
        let sectors = MAX_DISCARD_SECTORS.to_le_bytes();
        let segs = MAX_DISCARD_SEG.to_le_bytes();
        set_config(
            c,
            offset_of!(virtio_blk_config, max_discard_sectors),
            &sectors,
        );
        set_config(c, offset_of!(virtio_blk_config, max_discard_seg), &segs);
        set_config(
            c,
            offset_of!(virtio_blk_config, discard_sector_alignment),
            &1u32.to_le_bytes(),
        );
        let zeroes_sectors = offset_of!(virtio_blk_config, max_write_zeroes_sectors);
        set_config(c, zeroes_sectors, &sectors);
        set_config(
            c,
            offset_of!(virtio_blk_config, max_write_zeroes_seg),
            &segs,
        );
        set_config(
            c,
            offset_of!(virtio_blk_config, write_zeroes_may_unmap),
            &[1],
        );
    }
    info!(
        "disk {}: {capacity_sectors} sectors{}, {num_queues} queue{}{}",
        cfg.path.display(),
        if cfg.read_only { ", read-only" } else { "" },
        if num_queues == 1 { "" } else { "s" },
        if cfg.cache == CacheMode::None {
            format!(", cache=none ({block_size}-byte blocks)")
        } else {
            String::new()
        }
    );
    Ok((info, config))
}

/// A request of the asynchronous engine, from pop to completion.
#[derive(Debug)]
struct InFlight {
    queue: u16,
    head: u16,
    status: GuestAddress,
    /// Bytes already written into the chain (before the data a read adds).
    written: u32,
    work: Work,
    /// For [`Work::Ranges`]: the range being worked on, the `fallocate` mode being tried
    /// (an index into [`range_modes`]; past them, zeros are written), and the bytes of
    /// zeros written so far.
    range: usize,
    mode: usize,
    zeroed: u64,
    /// Operations of the request still running: more than one for a transfer split into
    /// pieces ([`PIECE_MIN`]).
    pieces: usize,
    /// The first failure of a piece, kept until the last piece ends.
    failure: Option<Failed>,
}

/// The smallest piece of a read or write split to run on several host CPUs at once: a
/// transfer of at least twice this is split, into at most [`MAX_PIECES`] pieces and at
/// most one per host CPU. The first piece runs during the submission, on the disk's
/// worker; the others on the kernel's io_uring workers (`IOSQE_ASYNC`) meanwhile. The
/// copy between the host's page cache (or a RAM-backed device) and guest memory is most
/// of a large transfer's time, and it is not split otherwise.
pub const PIECE_MIN: u64 = 256 << 10;
/// Most pieces one read or write is split into.
pub const MAX_PIECES: usize = 4;
/// Operations the io_uring engine holds beyond one per request slot, for the pieces of
/// split transfers.
const PIECE_ROOM: usize = 64;
/// Pieces are multiples of this many bytes (or of the direct-I/O alignment, if larger).
const PIECE_UNIT: usize = 4096;

/// The `fallocate` modes a DISCARD (punch a hole) or WRITE_ZEROES (zero the range, else
/// punch a hole) tries in turn before writing zeros.
fn range_modes(discard: bool) -> &'static [i32] {
    if discard {
        &[libc::FALLOC_FL_PUNCH_HOLE]
    } else {
        &[libc::FALLOC_FL_ZERO_RANGE, libc::FALLOC_FL_PUNCH_HOLE]
    }
}

/// The host's CPUs online (1 where the kernel does not say).
fn host_cpus() -> usize {
    // SAFETY: sysconf reads a system setting; it has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// Whether a failed `fallocate` (negative errno `res`) means the mode is not supported.
fn mode_unsupported(res: i32) -> bool {
    matches!(-res, libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
}

/// The asynchronous engine of a disk and its requests in flight.
struct AsyncState {
    io: Box<dyn AsyncIo>,
    /// Requests in flight, by slot; an [`Op`]'s token is its request's slot.
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Completions being handled (kept to reuse the allocation).
    reaped: Vec<(Op, i32)>,
    /// Warns once when the kernel refuses a submission.
    submit_warn: WarnOnce,
    /// Holds the queues' interrupts back while more completions are coming; `None`: each
    /// is raised at once.
    coalesce: Option<Coalescer>,
    /// Most pieces a transfer is split into here (host CPUs online, at most
    /// [`MAX_PIECES`]); 1: none is split.
    max_pieces: usize,
    /// The smallest piece ([`PIECE_MIN`]; tests use less).
    piece_min: u64,
}

impl AsyncState {
    fn new(io: Box<dyn AsyncIo>, capacity: usize) -> AsyncState {
        AsyncState {
            io,
            slots: (0..capacity).map(|_| None).collect(),
            free: (0..capacity).rev().collect(),
            reaped: Vec::new(),
            submit_warn: WarnOnce::default(),
            coalesce: None,
            max_pieces: host_cpus().clamp(1, MAX_PIECES),
            piece_min: PIECE_MIN,
        }
    }

    /// How many pieces a transfer of `bytes` is split into: 1 below `2 * PIECE_MIN`, or
    /// where the engine could not take the pieces and still one operation for every free
    /// slot.
    fn pieces_for(&self, bytes: u64) -> usize {
        let by_size = usize::try_from(bytes / self.piece_min.max(1)).unwrap_or(usize::MAX);
        let n = by_size.min(self.max_pieces);
        if n < 2 || self.io.room() < n + self.free.len() {
            1
        } else {
            n
        }
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

/// What became of a completed operation.
enum Step {
    /// The request goes on with this operation (the rest of a short transfer, the next
    /// range, another mode).
    Next(Op),
    /// The request ended.
    Done(std::result::Result<Outcome, Failed>),
}

/// Whether the address and length of every slice are multiples of `mem_align` (0: no
/// alignment needed), as direct I/O asks of its buffers.
fn meets_alignment<B: vm_memory::bitmap::BitmapSlice>(
    bufs: &[vm_memory::VolatileSlice<'_, B>],
    mem_align: usize,
) -> bool {
    mem_align == 0
        || bufs
            .iter()
            .all(|s| (s.ptr_guard().as_ptr() as usize | s.len()) % mem_align == 0)
}

/// Copies `src` into `bufs` in order, until either ends (a bounced read's data into the
/// request's buffers).
fn scatter<B: vm_memory::bitmap::BitmapSlice>(
    mut src: &[u8],
    bufs: &[vm_memory::VolatileSlice<'_, B>],
) {
    for s in bufs {
        let n = s.len().min(src.len());
        s.copy_from(&src[..n]);
        src = &src[n..];
    }
}

/// Copies `bufs` in order into `dst`, until either ends (a request's data into the
/// buffer a bounced write sends).
fn gather<B: vm_memory::bitmap::BitmapSlice>(
    bufs: &[vm_memory::VolatileSlice<'_, B>],
    mut dst: &mut [u8],
) {
    for s in bufs {
        let n = s.len().min(dst.len());
        let (head, rest) = std::mem::take(&mut dst).split_at_mut(n);
        s.copy_to(head);
        dst = rest;
    }
}

/// The image as a [`BlockBackend`] for synchronous I/O, bouncing guest buffers that do not
/// meet the direct-I/O memory alignment `mem_align` (0: no alignment needed).
pub(crate) struct Image<'a> {
    pub(crate) file: &'a mut File,
    pub(crate) mem_align: usize,
}

impl Image<'_> {
    /// Whether every slice meets the memory alignment.
    pub(crate) fn aligned<B: vm_memory::bitmap::BitmapSlice>(
        &self,
        bufs: &[vm_memory::VolatileSlice<'_, B>],
    ) -> bool {
        meets_alignment(bufs, self.mem_align)
    }
}

impl BlockBackend for Image<'_> {
    fn read_vectored_at<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        bufs: &[vm_memory::VolatileSlice<'_, B>],
        offset: u64,
    ) -> io::Result<()> {
        if self.aligned(bufs) {
            return self.file.read_vectored_at(bufs, offset);
        }
        let total = bufs.iter().map(|s| s.len()).sum();
        let mut bounce = AlignedBuf::zeroed(total, self.mem_align);
        BlockBackend::read_exact_at(self.file, bounce.bytes_mut(), offset)?;
        scatter(bounce.bytes(), bufs);
        Ok(())
    }

    fn write_vectored_at<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        bufs: &[vm_memory::VolatileSlice<'_, B>],
        offset: u64,
    ) -> io::Result<()> {
        if self.aligned(bufs) {
            return self.file.write_vectored_at(bufs, offset);
        }
        let total = bufs.iter().map(|s| s.len()).sum();
        let mut bounce = AlignedBuf::zeroed(total, self.mem_align);
        gather(bufs, bounce.bytes_mut());
        BlockBackend::write_all_at(self.file, bounce.bytes(), offset)
    }

    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        BlockBackend::read_exact_at(self.file, buf, offset)
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        BlockBackend::write_all_at(self.file, buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        BlockBackend::flush(self.file)
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.file.discard(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.file.write_zeroes(offset, len)
    }
}

impl Block {
    /// Opens the image in `cfg`, locks it and reads its size, and sets up its I/O engine.
    ///
    /// # Errors
    ///
    /// [`Error::Open`] (missing or unreadable), [`Error::NoDirectIo`] (`cache=none` on a
    /// file system without direct I/O), [`Error::Locked`] (another process holds the
    /// lock), [`Error::Lock`], [`Error::Size`], [`Error::InvalidId`],
    /// [`Error::InvalidQueues`], [`Error::IoUring`] (io_uring asked for and unavailable).
    pub fn open(cfg: BlockConfig) -> Result<Block> {
        if cfg.num_queues > MAX_QUEUES {
            return Err(Error::InvalidQueues(cfg.num_queues));
        }
        let file = open_image(&cfg.path, cfg.read_only, cfg.cache)?;
        lock(&file, &cfg.path, !cfg.read_only)?;
        Self::with_file(file, cfg)
    }

    /// The device over `file`, opened and locked the way `cfg` asks.
    fn with_file(mut file: File, cfg: BlockConfig) -> Result<Block> {
        let num_queues = match cfg.num_queues {
            0 => 1,
            n if n <= MAX_QUEUES => n,
            n => return Err(Error::InvalidQueues(n)),
        };
        let (mem_align, block_size) = match cfg.cache {
            CacheMode::Writeback => (0, BLK_SIZE),
            CacheMode::None => {
                let (mem, offset) = dio_align(&file, &cfg.path)?;
                (mem as usize, offset.max(BLK_SIZE))
            }
        };
        let (info, config) = describe(&mut file, &cfg, block_size, num_queues)?;
        let capacity = usize::from(num_queues) * usize::from(QUEUE_SIZE);
        let name = format!("virtio-blk {:?}", cfg.path);
        let mut engine = match cfg.engine {
            IoEngine::Sync => None,
            IoEngine::Uring | IoEngine::Auto => match Uring::new((capacity + PIECE_ROOM) as u32) {
                Ok(ring) => Some(AsyncState::new(Box::new(ring), capacity)),
                Err(source) if cfg.engine == IoEngine::Uring => {
                    return Err(Error::IoUring {
                        path: cfg.path.clone(),
                        source,
                    })
                }
                Err(e) => {
                    info!("{name}: io_uring unavailable ({e}); synchronous I/O instead");
                    None
                }
            },
        };
        if let Some(engine) = engine.as_mut() {
            info!("{name}: io_uring, up to {capacity} requests in flight");
            match Coalescer::new(usize::from(num_queues)) {
                Ok(c) => engine.coalesce = Some(c),
                Err(e) => info!("{name}: no interrupt coalescing (no timer: {e})"),
            }
        }
        Ok(Block {
            file,
            mem_align,
            cache: cfg.cache,
            queue_sizes: vec![QUEUE_SIZE; usize::from(num_queues)],
            engine,
            held: false,
            name,
            path: cfg.path,
            info,
            config,
            configured_id: cfg.id,
            active: None,
            warnings: DriverWarnings::default(),
            counters: BlockCounters::default(),
            host_errors: HostErrors::default(),
        })
    }

    /// Replaces the asynchronous engine (tests: a fake that completes out of order).
    #[cfg(test)]
    pub(crate) fn set_engine_for_test(&mut self, io: Box<dyn AsyncIo>, capacity: usize) {
        self.engine = Some(AsyncState::new(io, capacity));
    }

    /// Splits transfers of at least `2 * piece_min` bytes into up to `max_pieces` pieces
    /// (tests: whatever the host's CPUs).
    #[cfg(test)]
    pub(crate) fn set_pieces_for_test(&mut self, max_pieces: usize, piece_min: u64) {
        if let Some(engine) = self.engine.as_mut() {
            engine.max_pieces = max_pieces;
            engine.piece_min = piece_min;
        }
    }

    /// Gives the asynchronous engine interrupt coalescing (tests: the fake engine has
    /// none).
    #[cfg(test)]
    pub(crate) fn enable_coalescing_for_test(&mut self) {
        let queues = self.queue_sizes.len();
        if let Some(engine) = self.engine.as_mut() {
            engine.coalesce = Coalescer::new(queues).ok();
        }
    }

    /// `io_uring` or `sync`: the engine serving the requests.
    pub fn engine_name(&self) -> &'static str {
        if self.engine.is_some() {
            "io_uring"
        } else {
            "sync"
        }
    }

    /// Puts the image at `path` in the drive in place of the current one, as a media
    /// change (Firecracker's `PATCH /drives/{id}` with a new `path_on_host`; the same path
    /// again picks up a new size). See [`change_media_to`](Self::change_media_to).
    ///
    /// # Errors
    ///
    /// Those of [`open`](Self::open) for the new image, and [`Error::Flush`] for the old.
    pub fn change_media(&mut self, path: PathBuf) -> Result<()> {
        let file = open_image(&path, self.info.read_only, self.cache)?;
        self.change_media_to(file, path)
    }

    /// [`change_media`](Self::change_media) with the image already opened (by a thread
    /// that may open files): `file` is `path`, opened for reading, and for writing unless
    /// the drive is read-only, with `O_DIRECT` if the drive has `cache=none`. The drive
    /// stays read-only or read-write as configured and keeps a configured id; it locks the
    /// new image as [`open`](Self::open) does, and from now on requests go to it and are
    /// checked against its capacity. Requests in flight complete, and what was written to
    /// the old image is made durable, first. The caller tells the driver through the
    /// transport (`VirtioPciDevice::config_changed`), so that it reads the new capacity.
    ///
    /// On any error the drive keeps its old image, untouched.
    ///
    /// # Errors
    ///
    /// [`Error::Locked`] / [`Error::Lock`] / [`Error::Size`] for the new image,
    /// [`Error::NoDirectIo`] when the new image cannot be used with `cache=none` or has
    /// another direct-I/O alignment, [`Error::Flush`] for the old.
    pub fn change_media_to(&mut self, mut file: File, path: PathBuf) -> Result<()> {
        let cfg = BlockConfig {
            path,
            read_only: self.info.read_only,
            id: self.configured_id.clone(),
            cache: self.cache,
            ..BlockConfig::default()
        };
        if self.cache == CacheMode::None {
            set_direct(&file, &cfg.path)?;
            // The guest keeps the block size it was told at probe time.
            let (mem, offset) = dio_align(&file, &cfg.path)?;
            if offset.max(BLK_SIZE) != self.info.block_size {
                return Err(Error::NoDirectIo(cfg.path));
            }
            self.mem_align = self.mem_align.max(mem as usize);
        }
        let same_file = match (file.metadata(), self.file.metadata()) {
            (Ok(new), Ok(old)) => (new.dev(), new.ino()) == (old.dev(), old.ino()),
            _ => false,
        };
        let num_queues = self.queue_sizes.len() as u16;
        let block_size = self.info.block_size;
        // The same file again: keep the open file that holds the lock (a second
        // exclusive lock from this process would be refused) and measure it anew.
        let (file, (info, config)) = if same_file {
            drop(file);
            let described = describe(&mut self.file, &cfg, block_size, num_queues)?;
            (None, described)
        } else {
            lock(&file, &cfg.path, !cfg.read_only)?;
            let described = describe(&mut file, &cfg, block_size, num_queues)?;
            (Some(file), described)
        };
        self.flush()?;
        info!(
            "{}: media changed to {:?} ({} sectors)",
            self.name, cfg.path, info.capacity_sectors
        );
        if let Some(file) = file {
            self.file = file;
        }
        self.name = format!("virtio-blk {:?}", cfg.path);
        self.path = cfg.path;
        self.info = info;
        self.config = config;
        Ok(())
    }

    /// The validation parameters of this disk (capacity, read-only, id).
    pub fn info(&self) -> &DiskInfo {
        &self.info
    }

    /// What the device did so far.
    pub fn counters(&self) -> BlockCounters {
        self.counters
    }

    /// Host I/O errors by kind (the error's text, `other` beyond
    /// [`MAX_HOST_ERROR_KINDS`] kinds) and how many requests each failed.
    pub fn host_errors(&self) -> Vec<(String, u64)> {
        self.host_errors
            .0
            .iter()
            .map(|(k, n)| (k.clone(), *n))
            .collect()
    }

    /// Swaps the image file behind the device's back (tests: a handle whose writes fail).
    #[cfg(test)]
    pub(crate) fn swap_file_for_test(&mut self, file: File) {
        self.file = file;
    }

    /// Logs the counters at `info!`, the host errors by kind among them (the VMM calls it
    /// at exit).
    pub fn log_counters(&self) {
        let c = &self.counters;
        info!(
            "{}: {} reads ({} bytes), {} writes ({} bytes), {} flushes, {} other, \
             {} unsupported, {} refused as malformed; {} failed on the host: {}",
            self.name,
            c.read_count,
            c.read_bytes,
            c.write_count,
            c.write_bytes,
            c.flush_count,
            c.other_count,
            c.unsupported_count,
            c.invalid_reqs_count,
            c.execute_fails,
            self.host_errors.summary()
        );
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes no new request from the queues (they wait in the rings) and completes the
    /// requests in flight, each into its used ring: afterwards nothing is in flight until
    /// [`release`](Self::release). For a change that must not race with I/O (a media
    /// change) and that the caller may give up on: a hold that took too long is simply
    /// released, nothing else happened.
    pub fn hold(&mut self) {
        self.held = true;
        self.drain_in_flight(true);
    }

    /// Ends a [`hold`](Self::hold): serves what waited in the queues.
    pub fn release(&mut self) {
        self.held = false;
        for q in 0..self.queue_sizes.len() {
            // q < MAX_QUEUES.
            self.process_queue(q as u16);
        }
    }

    /// Completes the requests in flight, then makes everything the guest wrote durable
    /// (`fdatasync`); call it on shutdown.
    ///
    /// # Errors
    ///
    /// [`Error::Flush`].
    pub fn flush(&mut self) -> Result<()> {
        self.drain_in_flight(true);
        if self.info.read_only {
            return Ok(());
        }
        BlockBackend::flush(&mut self.file).map_err(|source| Error::Flush {
            path: self.path.clone(),
            source,
        })
    }

    /// Counts a finished request and logs what was wrong with it.
    fn record(&mut self, head: u16, done: Completion) -> u32 {
        record(
            &self.name,
            &mut self.counters,
            &mut self.host_errors,
            &mut self.warnings.request,
            head,
            done,
        )
    }

    /// Pops every available request of queue `q`, executes it, adds it to the used ring
    /// and signals the queue interrupt when the driver wants one (EVENT_IDX aware).
    ///
    /// A ring the driver broke (an available index more than a queue size ahead, a head
    /// index beyond the queue) is left alone until the driver fixes it or resets the device;
    /// the chains before the breakage are handled.
    fn run_queue(&mut self, q: u16) {
        let Some(active) = self.active.as_mut() else {
            debug!("virtio-blk: queue notification while inactive");
            return;
        };
        let Some(Some(aq)) = active.queues.get_mut(usize::from(q)) else {
            debug!("virtio-blk: notification for queue {q}, not enabled");
            return;
        };
        let (info, name) = (&self.info, &self.name);
        let mut image = Image {
            file: &mut self.file,
            mem_align: self.mem_align,
        };
        let request_warn = &mut self.warnings.request;
        let counters = &mut self.counters;
        let host_errors = &mut self.host_errors;
        let mem = &active.mem;
        QueueDrain {
            name,
            index: q,
            queue: &mut aq.queue,
            mem,
            queue_evt: &aq.evt,
            interrupt: active.interrupt.as_ref(),
            budget: MAX_REQUESTS_PER_RUN,
            ring_warn: &mut self.warnings.ring,
        }
        .run(|chain| {
            let head = chain.head_index();
            let done = handle_request(mem, chain, info, &mut image);
            record(name, counters, host_errors, request_warn, head, done)
        });
    }

    /// [`run_queue`](Self::run_queue) with the asynchronous engine: pops as many requests
    /// as there are free slots, answers those that need nothing from the image and starts
    /// the others; each goes to the used ring when it completes
    /// ([`complete_in_flight`](Self::complete_in_flight)).
    fn run_queue_async(&mut self, q: u16) -> usize {
        let quiet = self.coalescer().is_some_and(|c| c.quiet(q));
        self.run_queue_async_as(q, quiet)
    }

    /// [`run_queue_async`](Self::run_queue_async), leaving the queue's notifications off
    /// (`quiet`: a coalescing window is open) or turning them on. Returns how many
    /// requests it took.
    fn run_queue_async_as(&mut self, q: u16, quiet: bool) -> usize {
        let Some(engine) = self.engine.as_ref() else {
            return 0;
        };
        let free = engine.free.len();
        if free == 0 {
            // A completion frees a slot and comes back here.
            return 0;
        }
        let Some(active) = self.active.as_mut() else {
            debug!("virtio-blk: queue notification while inactive");
            return 0;
        };
        let Some(Some(aq)) = active.queues.get_mut(usize::from(q)) else {
            debug!("virtio-blk: notification for queue {q}, not enabled");
            return 0;
        };
        let mem = &active.mem;
        let mut popped = Vec::new();
        let drain = QueueDrain {
            name: &self.name,
            index: q,
            queue: &mut aq.queue,
            mem,
            queue_evt: &aq.evt,
            interrupt: active.interrupt.as_ref(),
            budget: free.min(MAX_REQUESTS_PER_RUN),
            ring_warn: &mut self.warnings.ring,
        };
        let serve = |chain: virtio_queue::DescriptorChain<&GuestMemoryMmap<()>>| {
            let head = chain.head_index();
            match prepare(mem, chain, &self.info) {
                Prepared::Answered(done) => popped.push((head, Err(done))),
                Prepared::Ready(p) => popped.push((head, Ok(p))),
            }
            None
        };
        let taken = if quiet {
            drain.run_async_quiet(serve)
        } else {
            drain.run_async(serve)
        };
        // Started after the drain (which holds the queue): answered ones go to the used
        // ring here too, in order.
        let mut used = false;
        for (head, req) in popped {
            match req {
                Err(done) => {
                    let len = self.record(head, done);
                    used |= self.add_used(q, head, len);
                }
                Ok(p) => used |= self.start(q, head, p),
            }
        }
        self.submit();
        // What the kernel completed during the submission (page-cache hits) is answered
        // now, with the rest, in one interrupt: no round trip through the completion
        // EventFd and the worker's epoll.
        let mut signal = self.finish_completed();
        if let Some(flag) = signal.get_mut(usize::from(q)) {
            *flag |= used;
        }
        self.signal_queues(&signal);
        taken
    }

    fn coalescer(&mut self) -> Option<&mut Coalescer> {
        self.engine.as_mut().and_then(|e| e.coalesce.as_mut())
    }

    /// The coalescing timer fired: polls the queues whose windows are due, and closes
    /// those that found nothing new (notifications back on, one interrupt).
    fn poll_windows(&mut self) {
        let due = self.coalescer().map(|c| c.due()).unwrap_or_default();
        for q in due {
            let found = if self.held {
                0
            } else {
                self.run_queue_async_as(q, true)
            };
            if self.coalescer().map(|c| c.polled(q, found)) == Some(Poll::Again) {
                continue;
            }
            self.close_window(q);
        }
    }

    /// Closes queue `q`'s window: its notifications back on, then its interrupt. What
    /// the driver added while they were off is served through the queue's EventFd, as if
    /// it had kicked (a held queue waits for `release` as usual).
    fn close_window(&mut self, q: u16) {
        if let Some(active) = self.active.as_mut() {
            let mem = &active.mem;
            if let Some(Some(aq)) = active.queues.get_mut(usize::from(q)) {
                match aq.queue.enable_notification(mem) {
                    Ok(true) => {
                        if let Err(e) = aq.evt.write(1) {
                            warn!("{}: failed to re-signal queue {q}: {e}", self.name);
                        }
                    }
                    Ok(false) => {}
                    Err(e) => debug!("{}: enable_notification failed: {e}", self.name),
                }
            }
        }
        if self.coalescer().is_some_and(|c| c.close(q)) {
            self.signal(q);
        }
    }

    /// Starts request `p` (head `head` of queue `q`) on the engine; a request that needs
    /// nothing from the image, or cannot be started, is finished at once. Returns whether
    /// it went to the used ring already.
    fn start(&mut self, q: u16, head: u16, p: crate::request::Parsed) -> bool {
        if let Work::Done(outcome) = p.work {
            let done = self.finish_on(p.status, p.written, Ok(outcome));
            let len = self.record(head, done);
            return self.add_used(q, head, len);
        }
        let Some(engine) = self.engine.as_mut() else {
            return false;
        };
        let Some(slot) = engine.free.pop() else {
            // The budget was the free slots: not reached.
            return false;
        };
        engine.slots[slot] = Some(InFlight {
            queue: q,
            head,
            status: p.status,
            written: p.written,
            work: p.work,
            range: 0,
            mode: 0,
            zeroed: 0,
            pieces: 1,
            failure: None,
        });
        match self.first_op(slot) {
            Ok(op) => self.push_pieces(slot, op),
            Err(f) => self.end(slot, Err(f)),
        }
    }

    /// Pushes `op`, the first operation of the request in `slot`, split into pieces where
    /// it is a transfer large enough ([`PIECE_MIN`]): the pieces for the kernel's workers
    /// first, then the one that runs during the submission, so that they overlap. Returns
    /// whether the request went to the used ring already.
    fn push_pieces(&mut self, slot: usize, op: Op) -> bool {
        // Buffered writes to one file are serialized by the file system (the inode's
        // lock), so only direct writes gain from pieces.
        let n = if op.kind == OpKind::Write && self.cache != CacheMode::None {
            1
        } else {
            self.engine
                .as_ref()
                .map_or(1, |e| e.pieces_for(op.remaining()))
        };
        // Every cut at a multiple of this from the transfer's start keeps a direct
        // transfer's pieces aligned in memory and in the file.
        let unit = PIECE_UNIT
            .max(self.mem_align)
            .max(self.info.block_size as usize);
        let mut ops = op.split(n, unit);
        if let Some(Some(req)) = self.engine.as_mut().map(|e| &mut e.slots[slot]) {
            req.pieces = ops.len();
        }
        let Some(first) = (!ops.is_empty()).then(|| ops.remove(0)) else {
            return false;
        };
        let mut used = false;
        for mut piece in ops {
            piece.background = true;
            used |= self.push(piece);
        }
        used | self.push(first)
    }

    /// The first operation of the request in `slot`.
    fn first_op(&mut self, slot: usize) -> std::result::Result<Op, Failed> {
        let Some(Some(req)) = self.engine.as_ref().map(|e| &e.slots[slot]) else {
            return Err(host_err(
                format_args!("start"),
                &io::Error::other("no such request"),
            ));
        };
        match &req.work {
            Work::Read { offset, data, .. } | Work::Write { offset, data, .. } => {
                let write = matches!(req.work, Work::Write { .. });
                self.transfer_op(slot, write, *offset, data)
            }
            Work::Flush => Ok(Op::flush(slot)),
            Work::Ranges { discard, ranges } => Ok(range_op_for(
                slot,
                *discard,
                ranges.first().copied(),
                0,
                0,
                self.mem_align,
            )),
            Work::Done(_) => Err(host_err(
                format_args!("start"),
                &io::Error::other("nothing to do"),
            )),
        }
    }

    /// A read or write of the data descriptors `data` at `offset`: straight between the
    /// image and guest memory, or through an aligned buffer for direct I/O from buffers
    /// that are not aligned.
    fn transfer_op(
        &self,
        slot: usize,
        write: bool,
        offset: u64,
        data: &[virtio_queue::desc::split::Descriptor],
    ) -> std::result::Result<Op, Failed> {
        let Some(active) = self.active.as_ref() else {
            return Err(host_err(
                format_args!("start"),
                &io::Error::other("device not active"),
            ));
        };
        let mem = &active.mem;
        let perm = if write {
            Permissions::Read
        } else {
            Permissions::Write
        };
        let slices = guest_slices(mem, data, perm)?;
        if meets_alignment(&slices, self.mem_align) {
            return Ok(Op::guest(slot, write, offset, mem, &slices));
        }
        let total = slices.iter().map(|s| s.len()).sum();
        let mut buf = AlignedBuf::zeroed(total, self.mem_align);
        if write {
            gather(&slices, buf.bytes_mut());
        }
        Ok(Op::bounce(slot, write, offset, buf))
    }

    /// Hands `op` to the engine; ends its request with an error when the engine has no
    /// room (it always has: one operation per slot). Returns whether the request went to
    /// the used ring.
    fn push(&mut self, op: Op) -> bool {
        let fd = self.file.as_raw_fd();
        let Some(engine) = self.engine.as_mut() else {
            return false;
        };
        let op = match engine.io.push(fd, op) {
            Ok(()) => return false,
            Err(op) => op,
        };
        // Make room by handing the queued operations to the kernel, then try once more.
        let _ = engine.io.submit();
        let slot = op.token;
        match engine.io.push(fd, op) {
            Ok(()) => false,
            Err(_) => self.settle(
                slot,
                Err(host_err(
                    format_args!("submit"),
                    &io::Error::other("the I/O engine is full"),
                )),
            ),
        }
    }

    /// One operation of the request in `slot` ended with `result`: the request ends with
    /// it (status, used ring) when it was the last of its pieces, with the first failure
    /// of any piece. Returns whether the request went to the used ring.
    fn settle(&mut self, slot: usize, result: std::result::Result<Outcome, Failed>) -> bool {
        let Some(Some(req)) = self.engine.as_mut().map(|e| &mut e.slots[slot]) else {
            return false;
        };
        if req.pieces > 1 {
            req.pieces -= 1;
            if let Err(f) = result {
                req.failure.get_or_insert(f);
            }
            return false;
        }
        let result = match req.failure.take() {
            Some(f) => Err(f),
            None => result,
        };
        self.end(slot, result)
    }

    /// Hands what was pushed to the kernel.
    fn submit(&mut self) {
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        if let Err(e) = engine.io.submit() {
            warn_once!(
                engine.submit_warn,
                "{}: the kernel refused i/o submissions: {e} (retried on the next request)",
                self.name
            );
        }
    }

    /// Writes the status of a request that ended with `result`.
    fn finish_on(
        &self,
        status: GuestAddress,
        written: u32,
        result: std::result::Result<Outcome, Failed>,
    ) -> Completion {
        match self.active.as_ref() {
            Some(active) => finish(&active.mem, status, written, result),
            None => Completion {
                len: 0,
                driver_error: None,
                host_error: None,
                outcome: Outcome::HostError,
            },
        }
    }

    /// Ends the request in `slot` with `result`: status byte, counters, used ring. Returns
    /// whether it went to the used ring.
    fn end(&mut self, slot: usize, result: std::result::Result<Outcome, Failed>) -> bool {
        let Some(req) = self.engine.as_mut().and_then(|e| {
            let req = e.slots.get_mut(slot)?.take()?;
            e.free.push(slot);
            Some(req)
        }) else {
            return false;
        };
        let written = match &result {
            // total <= seg_max * size_max, far below 4 GiB.
            Ok(Outcome::Read(n)) => req.written.saturating_add(*n as u32),
            _ => req.written,
        };
        let done = self.finish_on(req.status, written, result);
        let len = self.record(req.head, done);
        self.add_used(req.queue, req.head, len)
    }

    /// Puts `head` in queue `q`'s used ring; whether it did.
    fn add_used(&mut self, q: u16, head: u16, len: u32) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let Some(Some(aq)) = active.queues.get_mut(usize::from(q)) else {
            return false;
        };
        match tvm_virtio::add_used(&mut aq.queue, &active.mem, head, len) {
            Ok(()) => {
                if let Some(c) = self.coalescer() {
                    c.added(q);
                }
                true
            }
            Err(e) => {
                warn_once!(self.warnings.ring, "{}: chain not returned: {e}", self.name);
                false
            }
        }
    }

    /// Raises queue `q`'s interrupt if the driver wants one.
    fn signal(&mut self, q: u16) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if let Some(Some(aq)) = active.queues.get_mut(usize::from(q)) {
            QueueDrain::signal_used(
                &self.name,
                "",
                q,
                &mut aq.queue,
                &active.mem,
                active.interrupt.as_ref(),
            );
        }
    }

    /// What the completion of `op` with `res` (bytes, or a negative errno) means for its
    /// request.
    fn step(&mut self, mut op: Op, res: i32) -> Step {
        let slot = op.token;
        let Some(Some(req)) = self.engine.as_mut().map(|e| &mut e.slots[slot]) else {
            return Step::Done(Err(host_err(
                format_args!("complete"),
                &io::Error::other("no such request"),
            )));
        };
        let during = |req: &InFlight, op: &Op| match (&req.work, op.kind) {
            (Work::Read { .. }, _) => format!("read at {}", op.offset),
            (Work::Write { .. }, _) => format!("write at {}", op.offset),
            (Work::Flush, _) => "flush".to_string(),
            (Work::Ranges { discard, .. }, OpKind::Fallocate { len, .. }) => {
                format!("{} at {}+{len}", range_op(*discard), op.offset)
            }
            (Work::Ranges { discard, .. }, _) => {
                format!("{} (zero write) at {}", range_op(*discard), op.offset)
            }
            (Work::Done(_), _) => "request".to_string(),
        };
        if res == -libc::EINTR || res == -libc::EAGAIN {
            return Step::Next(op);
        }
        match op.kind {
            OpKind::Read | OpKind::Write => {
                if res < 0 {
                    let e = io::Error::from_raw_os_error(-res);
                    return Step::Done(Err(host_err(format_args!("{}", during(req, &op)), &e)));
                }
                let n = u64::from(res.unsigned_abs());
                if n == 0 && op.remaining() > 0 {
                    let e = io::Error::from(if op.kind == OpKind::Write {
                        io::ErrorKind::WriteZero
                    } else {
                        io::ErrorKind::UnexpectedEof
                    });
                    return Step::Done(Err(host_err(format_args!("{}", during(req, &op)), &e)));
                }
                if n < op.remaining() {
                    op.advance(n);
                    return Step::Next(op);
                }
                match &req.work {
                    Work::Read { total, data, .. } => {
                        let total = *total;
                        if let Some(buf) = op.take_bounce() {
                            let data = data.clone();
                            if let Err(f) = self.copy_to_guest(&data, buf.bytes()) {
                                return Step::Done(Err(f));
                            }
                        }
                        Step::Done(Ok(Outcome::Read(total)))
                    }
                    Work::Write { total, .. } => Step::Done(Ok(Outcome::Written(*total))),
                    Work::Ranges { .. } => {
                        // A chunk of zeros is written.
                        let len = op.take_bounce().map_or(0, |b| b.bytes().len() as u64);
                        req.zeroed += len;
                        self.next_range_op(slot)
                    }
                    _ => Step::Done(Ok(Outcome::Other)),
                }
            }
            OpKind::Flush => {
                if res < 0 {
                    let e = io::Error::from_raw_os_error(-res);
                    return Step::Done(Err(host_err(format_args!("flush"), &e)));
                }
                Step::Done(Ok(Outcome::Flushed))
            }
            OpKind::Fallocate { .. } => {
                if res < 0 && mode_unsupported(res) {
                    req.mode += 1;
                    return self.next_range_op(slot);
                }
                if res < 0 {
                    let e = io::Error::from_raw_os_error(-res);
                    return Step::Done(Err(host_err(format_args!("{}", during(req, &op)), &e)));
                }
                // The whole range is done.
                req.range += 1;
                req.mode = 0;
                req.zeroed = 0;
                self.next_range_op(slot)
            }
        }
    }

    /// The next operation of the DISCARD / WRITE_ZEROES in `slot`, or its end.
    fn next_range_op(&mut self, slot: usize) -> Step {
        let mem_align = self.mem_align;
        let Some(Some(req)) = self.engine.as_mut().map(|e| &mut e.slots[slot]) else {
            return Step::Done(Ok(Outcome::Other));
        };
        let Work::Ranges { discard, ranges } = &req.work else {
            return Step::Done(Ok(Outcome::Other));
        };
        if let Some(&(_, len)) = ranges.get(req.range) {
            if req.mode >= range_modes(*discard).len() && req.zeroed >= len {
                req.range += 1;
                req.mode = 0;
                req.zeroed = 0;
            }
        }
        match ranges.get(req.range).copied() {
            None => Step::Done(Ok(Outcome::Other)),
            Some(range) => Step::Next(range_op_for(
                slot,
                *discard,
                Some(range),
                req.mode,
                req.zeroed,
                mem_align,
            )),
        }
    }

    /// Copies a bounced read's data into the request's buffers.
    fn copy_to_guest(
        &self,
        data: &[virtio_queue::desc::split::Descriptor],
        src: &[u8],
    ) -> std::result::Result<(), Failed> {
        let Some(active) = self.active.as_ref() else {
            return Ok(());
        };
        scatter(src, &guest_slices(&active.mem, data, Permissions::Write)?);
        Ok(())
    }

    /// Handles the engine's completions: requests that ended go to their used rings (in
    /// the order they completed), the others go on; then queues that waited for a free
    /// slot are served again.
    fn complete_in_flight(&mut self) {
        let signal = self.finish_completed();
        self.signal_queues(&signal);
        if !self.held {
            for q in 0..self.queue_sizes.len() {
                self.run_queue_async(q as u16);
            }
        }
    }

    /// Raises the interrupt of each queue whose flag is set.
    fn signal_queues(&mut self, signal: &[bool]) {
        for (q, flag) in signal.iter().enumerate() {
            // q < MAX_QUEUES.
            let q = q as u16;
            if *flag && self.coalescer().is_none_or(|c| c.signal_now(q)) {
                self.signal(q);
            }
        }
    }

    /// Reaps the engine's completions: requests that ended go to their used rings (in the
    /// order they completed), the others go on. Returns, by queue, whether its used ring
    /// got anything (for the caller to signal).
    fn finish_completed(&mut self) -> Vec<bool> {
        let mut signal = vec![false; self.queue_sizes.len()];
        let Some(engine) = self.engine.as_mut() else {
            return signal;
        };
        let mut reaped = std::mem::take(&mut engine.reaped);
        engine.io.reap(&mut reaped);
        for (op, res) in reaped.drain(..) {
            let slot = op.token;
            let q = self.slot_queue(slot);
            let used = match self.step(op, res) {
                Step::Next(op) => self.push(op),
                Step::Done(result) => self.settle(slot, result),
            };
            if used {
                if let Some(flag) = q.and_then(|q| signal.get_mut(usize::from(q))) {
                    *flag = true;
                }
            }
        }
        if let Some(engine) = self.engine.as_mut() {
            engine.reaped = reaped;
        }
        self.submit();
        signal
    }

    /// The queue of the request in `slot`.
    fn slot_queue(&self, slot: usize) -> Option<u16> {
        self.engine
            .as_ref()
            .and_then(|e| e.slots.get(slot)?.as_ref())
            .map(|r| r.queue)
    }

    /// Waits for every request in flight: with `deliver`, each completes as it would have
    /// (status, used ring, interrupt); without, each is dropped (a reset: nothing reaches
    /// guest memory or the rings after this returns).
    fn drain_in_flight(&mut self, deliver: bool) {
        // No new requests meanwhile; whoever held the queues before still does after.
        let held = std::mem::replace(&mut self.held, true);
        self.drain_loop(deliver);
        self.held = held;
        if deliver {
            // Every interrupt held back is raised.
            for q in self
                .coalescer()
                .map(|c| c.open_windows())
                .unwrap_or_default()
            {
                self.close_window(q);
            }
        } else if let Some(c) = self.coalescer() {
            c.reset();
        }
    }

    fn drain_loop(&mut self, deliver: bool) {
        loop {
            let Some(engine) = self.engine.as_mut() else {
                return;
            };
            if engine.in_flight() == 0 {
                return;
            }
            if let Err(e) = engine.io.wait() {
                warn!("{}: waiting for i/o in flight failed: {e}", self.name);
                return;
            }
            if deliver {
                self.complete_in_flight();
                continue;
            }
            let mut reaped = std::mem::take(&mut engine.reaped);
            engine.io.reap(&mut reaped);
            for (op, _) in reaped.drain(..) {
                let Some(Some(req)) = engine.slots.get_mut(op.token) else {
                    continue;
                };
                // The slot stays taken (and the drain goes on) until its last piece is
                // back from the kernel.
                if req.pieces > 1 {
                    req.pieces -= 1;
                    continue;
                }
                if let Some(req) = engine.slots.get_mut(op.token).and_then(Option::take) {
                    debug!("{}: request {} dropped by a reset", self.name, req.head);
                    engine.free.push(op.token);
                }
            }
            engine.reaped = reaped;
        }
    }
}

/// The operation for a DISCARD / WRITE_ZEROES range: `fallocate` with the `mode`-th of
/// [`range_modes`], or, past them, the next chunk of zeros after `zeroed` bytes.
fn range_op_for(
    slot: usize,
    discard: bool,
    range: Option<(u64, u64)>,
    mode: usize,
    zeroed: u64,
    mem_align: usize,
) -> Op {
    let (offset, len) = range.unwrap_or((0, 0));
    match range_modes(discard).get(mode) {
        Some(&m) => Op::fallocate(slot, m, offset, len),
        None => {
            // At most ZERO_CHUNK.
            let n = (len - zeroed.min(len)).min(ZERO_CHUNK as u64) as usize;
            Op::bounce(
                slot,
                true,
                offset + zeroed,
                AlignedBuf::zeroed(n, mem_align.max(1)),
            )
        }
    }
}

/// Counts a finished request on `counters` and `host_errors` and warns (once) about what
/// was wrong with it; returns its used length.
fn record(
    name: &str,
    counters: &mut BlockCounters,
    host_errors: &mut HostErrors,
    request_warn: &mut WarnOnce,
    head: u16,
    done: Completion,
) -> u32 {
    counters.count(done.outcome);
    if let Some(e) = done.host_error {
        host_errors.note(name, e);
    }
    if let Some(why) = done.driver_error {
        warn_once!(
            request_warn,
            "{name}: request {head} refused ({} bytes answered): {why}",
            done.len
        );
    }
    done.len
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        let mut f = 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX;
        if self.info.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        if self.info.discard {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        if self.queue_sizes.len() > 1 {
            f |= 1 << VIRTIO_BLK_F_MQ;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        tvm_virtio::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // No writable field: VIRTIO_BLK_F_CONFIG_WCE is not offered.
        warn_once!(
            self.warnings.config,
            "{}: write of {} bytes to the read-only config at {offset:#x} ignored",
            self.name,
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> tvm_virtio::Result<()> {
        let ActivateContext {
            mem,
            queues,
            queue_evts,
            interrupt,
            ..
        } = ctx;
        // Queue 0 is required; a driver may leave the others off (Linux uses at most one
        // per vCPU).
        if !queues.first().is_some_and(|q| q.ready()) {
            return Err(tvm_virtio::Error::QueueNotReady(0));
        }
        if queue_evts.len() < queues.len() {
            return Err(tvm_virtio::Error::QueueNotReady(queue_evts.len() as u16));
        }
        let queues = queues
            .into_iter()
            .zip(queue_evts)
            .map(|(queue, evt)| queue.ready().then_some(ActiveQueue { queue, evt }))
            .collect();
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.drain_in_flight(false);
        self.active = None;
    }

    fn process_queue(&mut self, queue: u16) {
        if usize::from(queue) >= self.queue_sizes.len() {
            debug!("virtio-blk: notification for missing queue {queue}");
            return;
        }
        if self.held {
            // The chains wait in the ring; `release` serves them.
            return;
        }
        if self.engine.is_some() {
            if let Some(c) = self.coalescer() {
                c.kicked(queue);
            }
            self.run_queue_async(queue);
        } else {
            self.run_queue(queue);
        }
    }

    /// The engine's completion EventFd.
    fn extra_event_sources(&self) -> Vec<(std::os::fd::RawFd, EventSet)> {
        let Some(engine) = self.engine.as_ref() else {
            return Vec::new();
        };
        let mut sources = vec![(engine.io.event_fd(), EventSet::IN)];
        if let Some(c) = &engine.coalesce {
            sources.push((c.as_raw_fd(), EventSet::IN));
        }
        sources
    }

    fn process_extra_event(&mut self, index: usize, _events: EventSet) {
        match index {
            0 => self.complete_in_flight(),
            1 => self.poll_windows(),
            _ => {}
        }
    }
}
