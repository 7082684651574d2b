// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A virtio entropy device (virtio 1.2, 5.4: virtio-rng) filled from the host kernel's
//! random number generator.
//!
//! [`Rng`] implements [`tvm_virtio::VirtioDevice`] with its one request queue, no feature
//! bits and no config space. Each buffer the driver makes available is filled with bytes
//! from `getrandom(2)` ([`HostRandom`]), the source Firecracker's entropy device uses: no
//! file descriptor to keep open, and it never blocks once the host's pool is initialised.
//!
//! Serving one request is the pure function [`fill_chain`] over guest memory and an
//! [`EntropySource`], so every validation rule is unit-tested without KVM:
//! - a chain with a device-readable buffer breaks the spec ("the driver MUST NOT place
//!   driver-readable buffers into the queue") and is returned with nothing written;
//! - a buffer outside guest memory ends the request where it starts (the bytes before it
//!   are counted);
//! - at most [`MAX_BYTES_PER_REQUEST`] bytes are written per request, however long the
//!   buffers (the used length tells the driver how many it got).
//!
//! Driver errors are logged at `warn!` once per kind, then at `debug!`.
//!
//! # Example
//!
//! ```
//! use tvm_virtio::VirtioDevice;
//! use tvm_virtio_rng::Rng;
//!
//! let rng = Rng::new();
//! assert_eq!(rng.device_type(), tvm_virtio_rng::VIRTIO_ID_RNG);
//! assert_eq!(rng.queue_max_sizes(), [256]);
//! ```

#![deny(missing_docs)]

mod device;
mod fill;

pub use device::{Rng, QUEUE_SIZE, VIRTIO_ID_RNG};
pub use fill::{fill_chain, EntropySource, Filled, HostRandom, MAX_BYTES_PER_REQUEST};

#[cfg(test)]
mod tests;
