// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! One entropy request: the driver's writable buffers filled from an [`EntropySource`].

use std::io;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestMemory, Permissions};

/// Most bytes written for one request. Linux's driver asks for at most a page at a time
/// (`virtio_read` hands its buffer, of the size `rng_get_data` wants); the cap keeps a
/// driver that offers gigabytes of buffer from holding the event loop while they fill.
pub const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;

/// Bytes filled from the source per copy into guest memory.
const CHUNK: usize = 4096;

/// Where the random bytes come from.
pub trait EntropySource {
    /// Fills all of `buf`.
    ///
    /// # Errors
    ///
    /// When the source fails; then `buf` is not used.
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()>;
}

/// The host kernel's random number generator through `getrandom(2)` (flags 0: the
/// `urandom` source, which blocks only until the pool is first initialised at host boot).
#[derive(Clone, Copy, Debug, Default)]
pub struct HostRandom;

impl EntropySource for HostRandom {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: getrandom writes at most `rest.len()` bytes to `rest`, a live,
            // exclusively borrowed buffer of that length, and touches no other memory.
            let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            // n >= 0 and at most rest.len(), so the conversion cannot fail.
            done += usize::try_from(n).unwrap_or(0);
        }
        Ok(())
    }
}

/// What serving one request came to.
#[derive(Debug)]
pub struct Filled {
    /// Bytes written into the chain's buffers: the used length.
    pub len: u32,
    /// Why the request broke the rules or could not be served in full, if it did; the
    /// device logs it once per kind.
    pub driver_error: Option<String>,
    /// The source failed (a host problem, not the driver's).
    pub source_error: Option<io::Error>,
}

/// Fills the device-writable buffers of `chain`, in order, from `source`, up to
/// [`MAX_BYTES_PER_REQUEST`] bytes in all.
///
/// A chain with a device-readable buffer, or one that does not end (a loop, or a chain
/// virtio-queue cut short), is refused with nothing written. The buffers are filled in
/// pieces of at most 4 KiB; a piece that is not entirely in guest memory ends the request
/// there, unwritten and without taking anything from the source (the pieces before it
/// count).
pub fn fill_chain<M, S>(mem: &M, chain: DescriptorChain<&M>, source: &mut S) -> Filled
where
    M: GuestMemory,
    S: EntropySource + ?Sized,
{
    let descs: Vec<_> = chain.collect();
    if descs.last().is_some_and(|d| d.has_next()) {
        // virtio-queue stops a chain after queue-size descriptors, so a loop ends here; it
        // also stops before a descriptor past the table or past 4 GiB of buffers.
        return refused("the descriptor chain loops, or is cut short by virtio-queue".into());
    }
    if let Some(d) = descs.iter().find(|d| !d.is_write_only()) {
        return refused(format!(
            "a device-readable buffer ({} bytes at {:#x}) in the request",
            d.len(),
            d.addr().0
        ));
    }
    let mut buf = [0u8; CHUNK];
    let mut len = 0u32;
    for d in descs {
        let mut off = 0u32;
        while off < d.len() && len < MAX_BYTES_PER_REQUEST {
            let n = (d.len() - off)
                .min(MAX_BYTES_PER_REQUEST - len)
                .min(CHUNK as u32);
            let chunk = &mut buf[..n as usize];
            let at = d
                .addr()
                .checked_add(u64::from(off))
                .filter(|&a| mem.check_range(a, chunk.len(), Permissions::Write));
            let Some(at) = at else {
                return Filled {
                    len,
                    driver_error: Some(format!(
                        "a buffer of {} bytes at {:#x} is not in guest memory",
                        d.len(),
                        d.addr().0
                    )),
                    source_error: None,
                };
            };
            if let Err(e) = source.fill(chunk) {
                return Filled {
                    len,
                    driver_error: None,
                    source_error: Some(e),
                };
            }
            if let Err(e) = mem.write_slice(chunk, at) {
                // The range was checked just above: not reached while the memory map
                // stays as it is.
                return Filled {
                    len,
                    driver_error: Some(format!("a write to {:#x} failed: {e}", at.0)),
                    source_error: None,
                };
            }
            off += n;
            len += n;
        }
    }
    Filled {
        len,
        driver_error: None,
        source_error: None,
    }
}

/// A request answered with nothing written, for `why`.
fn refused(why: String) -> Filled {
    Filled {
        len: 0,
        driver_error: Some(why),
        source_error: None,
    }
}
