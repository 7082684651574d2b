// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The block device: opening and locking the image, config space, queue processing.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::mem::offset_of;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{debug, info, warn};
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use tvm_util::{warn_once, WarnOnce};
use tvm_virtio::{ActivateContext, QueueDrain, VirtioDevice, VirtioInterrupt};

use crate::request::{
    handle_request, BlockBackend, DiskInfo, HostError, Outcome, ID_LEN, SECTOR_SIZE,
};
use crate::{Error, Result};

/// Virtio device ID of a block device (virtio 1.2, 5), from virtio-bindings.
pub const VIRTIO_ID_BLOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments per request (VIRTIO_BLK_F_SEG_MAX): queue size minus the header and
/// the status, as QEMU offers, so Linux can send a 1 MiB request of scattered 4 KiB pages
/// as one request (through an indirect table).
pub const SEG_MAX: u32 = 254;
/// Largest data segment in bytes (VIRTIO_BLK_F_SIZE_MAX).
pub const SIZE_MAX: u32 = 1 << 20;
/// Block size reported to the guest (VIRTIO_BLK_F_BLK_SIZE).
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

/// How to open a disk image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// Path of the image file (or block device).
    pub path: PathBuf,
    /// Open read-only and offer VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// The GET_ID answer, at most 20 bytes; default derived from the file's device and inode.
    pub id: Option<String>,
}

struct Active {
    mem: GuestMemoryMmap<()>,
    queue: Queue,
    queue_evt: EventFd,
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

/// Opens the image at `path` for reading, and writing unless `read_only` (not locked).
fn open_image(path: &Path, read_only: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// Measures the image `file` (`cfg.path`) and fills in what the driver is told about it:
/// the validation parameters and the config space.
fn describe(file: &mut File, cfg: &BlockConfig) -> Result<(DiskInfo, [u8; CONFIG_LEN])> {
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
        &BLK_SIZE.to_le_bytes(),
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
        "disk {}: {capacity_sectors} sectors{}",
        cfg.path.display(),
        if cfg.read_only { ", read-only" } else { "" }
    );
    Ok((info, config))
}

impl Block {
    /// Opens the image in `cfg`, locks it and reads its size.
    ///
    /// # Errors
    ///
    /// [`Error::Open`] (missing or unreadable), [`Error::Locked`] (another process holds
    /// the lock), [`Error::Lock`], [`Error::Size`], [`Error::InvalidId`].
    pub fn open(cfg: BlockConfig) -> Result<Block> {
        let file = open_image(&cfg.path, cfg.read_only)?;
        lock(&file, &cfg.path, !cfg.read_only)?;
        Self::with_file(file, cfg)
    }

    /// The device over `file`, opened and locked the way `cfg` asks.
    fn with_file(mut file: File, cfg: BlockConfig) -> Result<Block> {
        let (info, config) = describe(&mut file, &cfg)?;
        Ok(Block {
            file,
            name: format!("virtio-blk {:?}", cfg.path),
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

    /// Puts the image at `path` in the drive in place of the current one, as a media
    /// change (Firecracker's `PATCH /drives/{id}` with a new `path_on_host`; the same path
    /// again picks up a new size). See [`change_media_to`](Self::change_media_to).
    ///
    /// # Errors
    ///
    /// Those of [`open`](Self::open) for the new image, and [`Error::Flush`] for the old.
    pub fn change_media(&mut self, path: PathBuf) -> Result<()> {
        let file = open_image(&path, self.info.read_only)?;
        self.change_media_to(file, path)
    }

    /// [`change_media`](Self::change_media) with the image already opened (by a thread
    /// that may open files): `file` is `path`, opened for reading, and for writing unless
    /// the drive is read-only. The drive stays read-only or read-write as configured and
    /// keeps a configured id; it locks the new image as [`open`](Self::open) does, and
    /// from now on requests go to it and are checked against its capacity. What was
    /// written to the old image is made durable first. The caller tells the driver through
    /// the transport (`VirtioPciDevice::config_changed`), so that it reads the new capacity.
    ///
    /// On any error the drive keeps its old image, untouched.
    ///
    /// # Errors
    ///
    /// [`Error::Locked`] / [`Error::Lock`] / [`Error::Size`] for the new image,
    /// [`Error::Flush`] for the old.
    pub fn change_media_to(&mut self, mut file: File, path: PathBuf) -> Result<()> {
        let cfg = BlockConfig {
            path,
            read_only: self.info.read_only,
            id: self.configured_id.clone(),
        };
        let same_file = match (file.metadata(), self.file.metadata()) {
            (Ok(new), Ok(old)) => (new.dev(), new.ino()) == (old.dev(), old.ino()),
            _ => false,
        };
        // The same file again: keep the open file that holds the lock (a second
        // exclusive lock from this process would be refused) and measure it anew.
        let (file, (info, config)) = if same_file {
            drop(file);
            let described = describe(&mut self.file, &cfg)?;
            (None, described)
        } else {
            lock(&file, &cfg.path, !cfg.read_only)?;
            let described = describe(&mut file, &cfg)?;
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

    /// Makes everything the guest wrote durable (`fdatasync`); call it on shutdown.
    ///
    /// # Errors
    ///
    /// [`Error::Flush`].
    pub fn flush(&mut self) -> Result<()> {
        if self.info.read_only {
            return Ok(());
        }
        BlockBackend::flush(&mut self.file).map_err(|source| Error::Flush {
            path: self.path.clone(),
            source,
        })
    }

    /// Pops every available request, executes it, adds it to the used ring and signals
    /// the queue interrupt when the driver wants one (EVENT_IDX aware).
    ///
    /// A ring the driver broke (an available index more than a queue size ahead, a head
    /// index beyond the queue) is left alone until the driver fixes it or resets the device;
    /// the chains before the breakage are handled.
    fn run_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            debug!("virtio-blk: queue notification while inactive");
            return;
        };
        let (info, file, name) = (&self.info, &mut self.file, &self.name);
        let request_warn = &mut self.warnings.request;
        let counters = &mut self.counters;
        let host_errors = &mut self.host_errors;
        let mem = &active.mem;
        QueueDrain {
            name,
            index: 0,
            queue: &mut active.queue,
            mem,
            queue_evt: &active.queue_evt,
            interrupt: active.interrupt.as_ref(),
            budget: MAX_REQUESTS_PER_RUN,
            ring_warn: &mut self.warnings.ring,
        }
        .run(|chain| {
            let head = chain.head_index();
            let done = handle_request(mem, chain, info, file);
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
        });
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
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
        let queue = queues
            .into_iter()
            .next()
            .filter(|q| q.ready())
            .ok_or(tvm_virtio::Error::QueueNotReady(0))?;
        let queue_evt = queue_evts
            .into_iter()
            .next()
            .ok_or(tvm_virtio::Error::QueueNotReady(0))?;
        self.active = Some(Active {
            mem,
            queue,
            queue_evt,
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn process_queue(&mut self, queue: u16) {
        if queue != 0 {
            debug!("virtio-blk: notification for missing queue {queue}");
            return;
        }
        self.run_queue();
    }
}
