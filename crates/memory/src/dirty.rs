//! Which guest pages were written since a point in time, for diff snapshots.
//!
//! KVM's dirty log sees only what the vCPUs write. Guest memory is also written by the VMM
//! itself: a disk's reads land in it straight from io_uring, a network device copies
//! frames into it, every device writes its used rings. [`DirtyTracker`] uses the kernel's
//! soft-dirty page-table bits instead, which see every write to the process's memory
//! whoever makes it: a vCPU (KVM faults guest pages in through the same page tables), a
//! VMM thread, or the kernel on the VMM's behalf. [`DirtyTracker::reset`] clears the bits
//! (`/proc/self/clear_refs`, `4`); [`DirtyTracker::dirty_bitmaps`] reads them back for the
//! guest's regions (`/proc/self/pagemap`, bit 55). It needs a kernel built with
//! `CONFIG_MEM_SOFT_DIRTY` (Debian's is); [`DirtyTracker::open`] checks that the bits work
//! before anything relies on them.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::{Error, GuestMemoryMmap, Result, PAGE_SIZE};

/// `/proc/self/pagemap`: one u64 per page; bit 55 is soft-dirty, bit 63 present.
const SOFT_DIRTY: u64 = 1 << 55;
/// Pagemap entries read at a time.
const CHUNK_PAGES: usize = 1 << 16;

/// The soft-dirty bits of this process; see the module documentation.
#[derive(Debug)]
pub struct DirtyTracker {
    clear_refs: File,
    pagemap: File,
}

fn tracking_err(what: &str, e: std::io::Error) -> Error {
    Error::DirtyTracking(format!("{what}: {e}"))
}

impl DirtyTracker {
    /// Opens the two files (before a seccomp filter forbids it) and checks that a page
    /// written after a reset reads back as dirty.
    ///
    /// # Errors
    ///
    /// [`Error::DirtyTracking`] when the files cannot be opened or the kernel does not
    /// track soft-dirty bits.
    pub fn open() -> Result<DirtyTracker> {
        let clear_refs = File::options()
            .write(true)
            .open("/proc/self/clear_refs")
            .map_err(|e| tracking_err("/proc/self/clear_refs", e))?;
        let pagemap =
            File::open("/proc/self/pagemap").map_err(|e| tracking_err("/proc/self/pagemap", e))?;
        let t = DirtyTracker {
            clear_refs,
            pagemap,
        };
        // A page of our own: written, reset, written again.
        let probe = crate::create_guest_memory(&[(GuestAddress(0), PAGE_SIZE)])?;
        probe
            .write_obj(1u8, GuestAddress(0))
            .map_err(|e| Error::DirtyTracking(format!("probe page: {e}")))?;
        t.reset()?;
        let clean = t.dirty_bitmaps(&probe)?;
        probe
            .write_obj(2u8, GuestAddress(0))
            .map_err(|e| Error::DirtyTracking(format!("probe page: {e}")))?;
        let dirty = t.dirty_bitmaps(&probe)?;
        if clean[0][0] & 1 != 0 || dirty[0][0] & 1 == 0 {
            return Err(Error::DirtyTracking(
                "this kernel does not track soft-dirty pages (it needs CONFIG_MEM_SOFT_DIRTY)"
                    .into(),
            ));
        }
        Ok(t)
    }

    /// Has the kernel back `mem` with small pages from now on (`MADV_NOHUGEPAGE`): the
    /// soft-dirty bit of a transparent huge page covers all of its 2 MiB, so one write
    /// would put 512 pages into the next diff.
    ///
    /// # Errors
    ///
    /// [`Error::DirtyTracking`] when the kernel refuses the advice.
    pub fn use_small_pages(&self, mem: &GuestMemoryMmap) -> Result<()> {
        for region in mem.iter() {
            let len = usize::try_from(region.len())
                .map_err(|_| Error::DirtyTracking("a region too large".into()))?;
            // SAFETY: the range is exactly one of `mem`'s mappings, alive while `mem` is
            // borrowed; MADV_NOHUGEPAGE only changes how the kernel may back it from now
            // on (no page is dropped, moved or changed), so nothing that points into it
            // is affected.
            let rc = unsafe { libc::madvise(region.as_ptr().cast(), len, libc::MADV_NOHUGEPAGE) };
            if rc != 0 {
                return Err(tracking_err(
                    "madvise(MADV_NOHUGEPAGE)",
                    std::io::Error::last_os_error(),
                ));
            }
        }
        Ok(())
    }

    /// Forgets every write so far: from now on a page is dirty once written again.
    ///
    /// # Errors
    ///
    /// [`Error::DirtyTracking`] when the kernel refuses.
    pub fn reset(&self) -> Result<()> {
        (&self.clear_refs)
            .write_all(b"4")
            .map_err(|e| tracking_err("clearing the soft-dirty bits", e))
    }

    /// The pages of each region of `mem` written since the last [`reset`](Self::reset),
    /// one bit per page (bit `i % 64` of word `i / 64` is page `i`), in region order: what
    /// [`crate::save_memory`] takes.
    ///
    /// # Errors
    ///
    /// [`Error::DirtyTracking`] when the page map cannot be read.
    pub fn dirty_bitmaps(&self, mem: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>> {
        let mut out = Vec::with_capacity(mem.num_regions());
        let mut entries = vec![0u8; CHUNK_PAGES * 8];
        for region in mem.iter() {
            let first = region.as_ptr() as u64 / PAGE_SIZE;
            let pages = usize::try_from(region.len().div_ceil(PAGE_SIZE))
                .map_err(|_| Error::DirtyTracking("a region too large".into()))?;
            let mut bitmap = vec![0u64; pages.div_ceil(64)];
            let mut done = 0usize;
            while done < pages {
                let n = (pages - done).min(CHUNK_PAGES);
                let buf = &mut entries[..n * 8];
                self.pagemap
                    .read_exact_at(buf, (first + done as u64) * 8)
                    .map_err(|e| tracking_err("reading /proc/self/pagemap", e))?;
                for (i, e) in buf.chunks_exact(8).enumerate() {
                    let mut v = [0u8; 8];
                    v.copy_from_slice(e);
                    if u64::from_le_bytes(v) & SOFT_DIRTY != 0 {
                        let page = done + i;
                        bitmap[page / 64] |= 1 << (page % 64);
                    }
                }
                done += n;
            }
            out.push(bitmap);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_pages_and_only_they_are_dirty_where_the_kernel_tracks_them() {
        let t = match DirtyTracker::open() {
            Ok(t) => t,
            Err(e) => {
                // This kernel cannot: the error says why, and nothing else is claimed.
                assert!(e.to_string().contains("soft-dirty"), "{e}");
                return;
            }
        };
        let mem = crate::create_guest_memory(&[(GuestAddress(0), 64 * PAGE_SIZE)]).unwrap();
        mem.write_slice(&[1u8; 64 * 4096], GuestAddress(0)).unwrap();
        t.reset().unwrap();
        mem.write_obj(7u32, GuestAddress(3 * PAGE_SIZE + 8))
            .unwrap();
        mem.write_obj(7u32, GuestAddress(40 * PAGE_SIZE)).unwrap();
        let b = t.dirty_bitmaps(&mem).unwrap();
        assert_eq!(b, vec![vec![(1 << 3) | (1 << 40)]]);
        // Reading is not writing.
        t.reset().unwrap();
        let _: u32 = mem.read_obj(GuestAddress(5 * PAGE_SIZE)).unwrap();
        assert_eq!(t.dirty_bitmaps(&mem).unwrap(), vec![vec![0]]);
    }
}
