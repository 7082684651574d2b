// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Fuzz harnesses for every parser a guest or a file can reach.
//!
//! Each module has a `run(data: &[u8])` that decodes the fuzzer's bytes into a scenario,
//! runs it against the real code (the devices built with `GuestMemoryMmap`, the loaders on
//! in-memory images) and panics when an invariant breaks. The libFuzzer targets in
//! `fuzz_targets/` only call these, so the same code replays committed inputs in plain
//! `cargo test` (`tests/replay.rs`), without nightly or sanitizers.
//!
//! The input of every harness is a flat sequence of little-endian fields read through
//! [`arbitrary::Unstructured`] ([`Input`]); a missing field reads as 0. [`seeds`] writes
//! well-formed inputs with the same layout ([`SeedWriter`]) so that a short run starts from
//! deep paths.
//!
//! Every harness also installs [`logger`]: an `error!` record from the code under test
//! fails the run (a guest must not be able to reach `error!`), and so does a `warn!`
//! record repeated from one place within one input (guest-triggered warnings are "once").

#![forbid(unsafe_code)]

pub mod cmdline;
pub mod guest;
pub mod kernel;
pub mod legacy;
pub mod logger;
pub mod net;
pub mod pci;
pub mod seeds;
pub mod serial;
pub mod snapshot;
pub mod virtio_blk;
pub mod virtio_pci;
pub mod virtio_rng;
pub mod virtqueue;
pub mod vsock;

use arbitrary::Unstructured;

/// The fuzzer's bytes as a stream of fields. Reads past the end give zeros, so every
/// harness must stop its loops on [`Input::is_empty`].
#[derive(Debug)]
pub struct Input<'a> {
    u: Unstructured<'a>,
}

impl<'a> Input<'a> {
    /// Wraps `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input {
            u: Unstructured::new(data),
        }
    }

    /// Whether every byte was consumed.
    pub fn is_empty(&self) -> bool {
        self.u.is_empty()
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.u.arbitrary().unwrap_or(0)
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        self.u.arbitrary().unwrap_or(0)
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        self.u.arbitrary().unwrap_or(0)
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        self.u.arbitrary().unwrap_or(0)
    }

    /// Bit 0 of one byte.
    pub fn bool(&mut self) -> bool {
        self.u.arbitrary().unwrap_or(false)
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.u.len());
        self.u.bytes(n).unwrap_or(&[])
    }

    /// Exactly `N` bytes, zero-padded at the end of the input.
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        let n = self.u.len();
        self.bytes(n)
    }
}

/// Writes inputs in the layout [`Input`] reads, for seed corpora and regression tests.
#[derive(Debug, Default, Clone)]
pub struct SeedWriter {
    buf: Vec<u8>,
}

impl SeedWriter {
    /// An empty input.
    pub fn new() -> Self {
        Self::default()
    }

    /// One byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    /// A little-endian u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A little-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A bool as one byte.
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }

    /// Raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }

    /// The input written so far.
    pub fn finish(&self) -> Vec<u8> {
        self.buf.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_reads_what_seed_writer_writes() {
        let data = SeedWriter::new()
            .u8(7)
            .u16(0x1234)
            .u32(0xdead_beef)
            .u64(u64::MAX - 1)
            .bool(true)
            .bytes(b"abc")
            .finish();
        let mut i = Input::new(&data);
        assert_eq!(i.u8(), 7);
        assert_eq!(i.u16(), 0x1234);
        assert_eq!(i.u32(), 0xdead_beef);
        assert_eq!(i.u64(), u64::MAX - 1);
        assert!(i.bool());
        assert_eq!(i.bytes(5), b"abc");
        assert!(i.is_empty());
        assert_eq!(i.u32(), 0);
    }
}
