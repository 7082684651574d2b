// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A virtio block device (virtio 1.2, 5.2) over a host file.
//!
//! [`Block`] implements [`tvm_virtio::VirtioDevice`] with 1 to 64 request queues and the
//! requests IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES; it offers
//! VIRTIO_BLK_F_FLUSH, SEG_MAX, SIZE_MAX, BLK_SIZE, MQ (more than one queue), and DISCARD +
//! WRITE_ZEROES (`fallocate` punch hole / zero range, with a zero-writing fallback) for
//! read-write images or RO for read-only ones.
//! Images are opened with a non-blocking `flock` (exclusive when read-write) so that two
//! VMMs never write one image; [`CacheMode::None`] opens them with `O_DIRECT`.
//!
//! Request validation is the pure function [`handle_request`] over guest memory and a
//! [`BlockBackend`], so every validation rule is unit-tested without KVM. Two engines
//! ([`IoEngine`]) execute requests: synchronous (`preadv`/`pwritev` straight between the
//! file and guest memory, `fdatasync` for FLUSH), one request at a time, and io_uring,
//! with up to a queue's worth in flight, completed in the order they finish. Both run on
//! whatever thread calls [`VirtioDevice::process_queue`](tvm_virtio::VirtioDevice::process_queue)
//! and [`VirtioDevice::process_extra_event`](tvm_virtio::VirtioDevice::process_extra_event):
//! in the VMM a worker thread of the disk's own ([`tvm_virtio::Threaded`]), so that a slow
//! or stuck image stalls nothing else; the event loop, through
//! [`tvm_virtio::VirtioPciDevice`]'s event-manager subscriber, for a bare `Block`.
//!
//! # Example
//!
//! ```no_run
//! use tvm_virtio_blk::{Block, BlockConfig};
//!
//! let disk = Block::open(BlockConfig {
//!     path: "disk.ext4".into(),
//!     read_only: false,
//!     id: Some("root".into()),
//!     ..BlockConfig::default()
//! })?;
//! assert!(!disk.info().read_only);
//! # Ok::<(), tvm_virtio_blk::Error>(())
//! ```

#![deny(missing_docs)]

use std::io;
use std::path::PathBuf;

mod device;
mod engine;
mod request;

pub use device::{
    Block, BlockConfig, BlockCounters, CacheMode, IoEngine, BLK_SIZE, MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEG, MAX_HOST_ERROR_KINDS, MAX_QUEUES, QUEUE_SIZE, SEG_MAX, SIZE_MAX,
    VIRTIO_ID_BLOCK,
};
pub use request::{
    handle_request, BlockBackend, Completion, DiskInfo, HostError, Outcome, ID_LEN, SECTOR_SIZE,
};

/// Errors of the block device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The image could not be opened (missing, unreadable, not writable).
    #[error("failed to open disk image {}", .path.display())]
    Open {
        /// The image path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another process holds the image's lock.
    #[error("disk image {} is locked by another process", .0.display())]
    Locked(PathBuf),
    /// `flock` failed for another reason.
    #[error("failed to lock disk image {}", .path.display())]
    Lock {
        /// The image path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The image size could not be read.
    #[error("failed to get the size of disk image {}", .path.display())]
    Size {
        /// The image path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The configured serial (GET_ID) is longer than 20 bytes.
    #[error("disk id {0:?} is longer than 20 bytes")]
    InvalidId(String),
    /// `cache=none` asked for an image whose file system has no direct I/O (or, for a
    /// media change, another direct-I/O alignment than the drive was started with).
    #[error("disk image {}: direct i/o (cache=none) is not possible there", .0.display())]
    NoDirectIo(PathBuf),
    /// `num_queues` out of range.
    #[error("num_queues={0}: a disk has 1 to 64 queues")]
    InvalidQueues(u16),
    /// io_uring was asked for and the kernel does not offer it.
    #[error("disk image {}: io_uring is not available", .path.display())]
    IoUring {
        /// The image path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `fdatasync` failed.
    #[error("failed to flush disk image {}", .path.display())]
    Flush {
        /// The image path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Result of the block device's fallible operations.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests;
