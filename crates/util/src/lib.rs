// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Small helpers that every tvm device crate shares, so that none of them keeps its own copy.
//!
//! What it does:
//! - [`WarnOnce`] and [`warn_once!`]: log lines a guest can trigger go out at `warn!` the
//!   first time and at `debug!` on every repeat, so a misbehaving driver is seen by the host
//!   but cannot flood the log.
//! - `test_log` (with the `test-utils` feature): a logger for unit tests that records what
//!   each thread logged, so a test can assert that a hostile input gives exactly one warning.
//!
//! What it does not do: install a logger for production (the `vmm` binary does that), or
//! depend on anything of ours; it sits below every device crate.
//!
//! # Example
//!
//! ```
//! use tvm_util::{warn_once, WarnOnce};
//!
//! let mut bad_offset = WarnOnce::new();
//! for offset in [0x40u64, 0x40, 0x40] {
//!     // One `warn!`, then two `debug!` lines.
//!     warn_once!(bad_offset, "write at unknown offset {offset:#x}");
//! }
//! assert!(bad_offset.warned());
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod warn_once;

#[cfg(any(test, feature = "test-utils"))]
pub mod test_log;

#[doc(hidden)]
pub use log as __log;
pub use warn_once::WarnOnce;
