//! Guest RAM to a snapshot's memory file and back.
//!
//! [`save_memory`] writes the regions one after the other, each at a page-aligned offset,
//! and only the pages that matter: a full snapshot leaves pages of zeros as holes in a
//! sparse file, a diff snapshot writes only the pages a dirty bitmap names.
//! [`map_memory_file`] maps such a file privately (`MAP_PRIVATE`, copy on write): nothing
//! is read at restore, pages come in as the guest touches them, and what the guest writes
//! afterwards never reaches the file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use tvm_snapshot::MemoryRegion;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::{Error, GuestMemoryMmap, Result, PAGE_SIZE};

/// Bytes copied out of guest memory at a time.
const CHUNK: usize = 1 << 20;

/// Dirty pages of each region, one bit per page (bit `i % 64` of word `i / 64` is page
/// `i`), in region order: KVM_GET_DIRTY_LOG's layout.
pub type DirtyBitmaps = [Vec<u64>];

fn page_dirty(bitmap: &[u64], page: usize) -> bool {
    bitmap
        .get(page / 64)
        .is_some_and(|word| word & (1 << (page % 64)) != 0)
}

/// What [`save_memory`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedMemory {
    /// Each region and where it is in the file.
    pub regions: Vec<MemoryRegion>,
    /// Bytes of page data written (the rest of the file is holes).
    pub bytes_written: u64,
}

/// Writes guest RAM to `file` (see the module documentation). `dirty`: `None` for a full
/// snapshot (the file is truncated first; pages of zeros are skipped), or the dirty
/// bitmaps of a diff snapshot (exactly the pages they name are written, zeros or not, and
/// the rest of the file is left as it is: a new file holds only those pages, holes
/// elsewhere; the previous snapshot's memory file is brought up to date in place).
///
/// # Errors
///
/// [`Error::SaveMemory`] for a failed write, [`Error::DirtyBitmaps`] when the bitmaps
/// do not match the regions.
pub fn save_memory(
    mem: &GuestMemoryMmap,
    file: &File,
    dirty: Option<&DirtyBitmaps>,
) -> Result<SavedMemory> {
    if let Some(d) = dirty {
        if d.len() != mem.num_regions() {
            return Err(Error::DirtyBitmaps {
                bitmaps: d.len(),
                regions: mem.num_regions(),
            });
        }
    }
    let mut regions = Vec::with_capacity(mem.num_regions());
    let mut offset = 0u64;
    for region in mem.iter() {
        regions.push(MemoryRegion {
            guest_addr: region.start_addr().raw_value(),
            size: region.len(),
            file_offset: offset,
        });
        offset += region.len().div_ceil(PAGE_SIZE) * PAGE_SIZE;
    }
    if dirty.is_none() {
        file.set_len(0).map_err(Error::SaveMemory)?;
    }
    let len = file.metadata().map_err(Error::SaveMemory)?.len();
    if len != offset {
        file.set_len(offset).map_err(Error::SaveMemory)?;
    }

    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    let page = PAGE_SIZE as usize;
    for (index, r) in regions.iter().enumerate() {
        let bitmap = dirty.map(|d| d[index].as_slice());
        let mut done = 0u64;
        while done < r.size {
            let len = (r.size - done).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..len];
            mem.read_slice(chunk, GuestAddress(r.guest_addr + done))
                .map_err(|e| Error::SaveMemory(std::io::Error::other(e)))?;
            // Runs of pages to write, each in one pwrite.
            let first_page = (done / PAGE_SIZE) as usize;
            let mut run: Option<usize> = None;
            for p in 0..=len.div_ceil(page) {
                let keep = p * page < len
                    && match bitmap {
                        Some(b) => page_dirty(b, first_page + p),
                        None => chunk[p * page..((p + 1) * page).min(len)]
                            .iter()
                            .any(|&b| b != 0),
                    };
                match (keep, run) {
                    (true, None) => run = Some(p),
                    (false, Some(start)) => {
                        let bytes = &chunk[start * page..(p * page).min(len)];
                        file.write_all_at(bytes, r.file_offset + done + (start * page) as u64)
                            .map_err(Error::SaveMemory)?;
                        written += bytes.len() as u64;
                        run = None;
                    }
                    _ => {}
                }
            }
            done += len as u64;
        }
    }
    Ok(SavedMemory {
        regions,
        bytes_written: written,
    })
}

/// Maps `file` as guest RAM laid out as `regions` (a snapshot's), privately: pages are
/// read from the file when the guest first touches them, and the guest's writes stay in
/// this process.
///
/// # Errors
///
/// [`Error::MemoryFileTooShort`] when the file does not hold every region,
/// [`Error::MapMemoryFile`] when a mapping fails, [`Error::InvalidRange`] for regions that
/// are not page aligned or overlap.
pub fn map_memory_file(file: &File, regions: &[MemoryRegion]) -> Result<GuestMemoryMmap> {
    let len = file.metadata().map_err(Error::SaveMemory)?.len();
    let file = Arc::new(file.try_clone().map_err(Error::SaveMemory)?);
    let mut mapped = Vec::with_capacity(regions.len());
    let mut prev_end = 0u64;
    for (i, r) in regions.iter().enumerate() {
        let bad = || Error::InvalidRange {
            start: r.guest_addr,
            len: r.size,
        };
        let end = r.guest_addr.checked_add(r.size).ok_or_else(bad)?;
        if r.size == 0
            || r.guest_addr % PAGE_SIZE != 0
            || r.size % PAGE_SIZE != 0
            || (i > 0 && r.guest_addr < prev_end)
        {
            return Err(bad());
        }
        prev_end = end;
        let need = r.file_offset.saturating_add(r.size);
        if need > len {
            return Err(Error::MemoryFileTooShort { len, need });
        }
        let size = usize::try_from(r.size).map_err(|_| bad())?;
        let mmap = MmapRegionBuilder::new(size)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(FileOffset::from_arc(file.clone(), r.file_offset))
            .build()
            .map_err(Error::MapMemoryFile)?;
        mapped.push(
            vm_memory::GuestRegionMmap::new(mmap, GuestAddress(r.guest_addr)).ok_or_else(bad)?,
        );
    }
    GuestMemoryMmap::from_regions(mapped).map_err(|_| Error::InvalidRange {
        start: regions.first().map_or(0, |r| r.guest_addr),
        len: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn two_regions() -> GuestMemoryMmap {
        crate::create_guest_memory(&[(GuestAddress(0), 4 << 20), (GuestAddress(1 << 32), 1 << 20)])
            .unwrap()
    }

    fn tmpfile(name: &str) -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!("tvm-memfile-{}-{name}", std::process::id()));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        (path, f)
    }

    #[test]
    fn a_full_save_is_sparse_and_maps_back_with_the_same_bytes_copy_on_write() {
        let mem = two_regions();
        mem.write_obj(0x1122_3344_5566_7788u64, GuestAddress(0x1000))
            .unwrap();
        mem.write_slice(&[0xab; 8192], GuestAddress((3 << 20) + 4096))
            .unwrap();
        mem.write_obj(0xfeedu16, GuestAddress((1 << 32) + 0xf_fffe))
            .unwrap();
        let (path, file) = tmpfile("full");
        let saved = save_memory(&mem, &file, None).unwrap();
        assert_eq!(
            saved.regions,
            vec![
                MemoryRegion {
                    guest_addr: 0,
                    size: 4 << 20,
                    file_offset: 0
                },
                MemoryRegion {
                    guest_addr: 1 << 32,
                    size: 1 << 20,
                    file_offset: 4 << 20
                },
            ]
        );
        // Four pages of data: one, two, one.
        assert_eq!(saved.bytes_written, 4 * 4096);
        let meta = file.metadata().unwrap();
        assert_eq!(meta.len(), 5 << 20);
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "{} bytes allocated: the file is not sparse",
            meta.blocks() * 512
        );

        let back = map_memory_file(&file, &saved.regions).unwrap();
        let v: u64 = back.read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(v, 0x1122_3344_5566_7788);
        let mut buf = [0u8; 8192];
        back.read_slice(&mut buf, GuestAddress((3 << 20) + 4096))
            .unwrap();
        assert_eq!(buf, [0xab; 8192]);
        let v: u16 = back.read_obj(GuestAddress((1 << 32) + 0xf_fffe)).unwrap();
        assert_eq!(v, 0xfeed);
        // The guest's writes stay in the process.
        back.write_obj(0u64, GuestAddress(0x1000)).unwrap();
        let mut on_disk = [0u8; 8];
        file.read_exact_at(&mut on_disk, 0x1000).unwrap();
        assert_eq!(u64::from_le_bytes(on_disk), 0x1122_3344_5566_7788);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_diff_save_writes_exactly_the_dirty_pages() {
        let mem = two_regions();
        mem.write_slice(&[1; 4096], GuestAddress(0x5000)).unwrap();
        mem.write_slice(&[2; 4096], GuestAddress(0x9000)).unwrap();
        let mut low = vec![0u64; (4 << 20) / 4096 / 64];
        low[0] |= 1 << 5; // dirty, data
        low[0] |= 1 << 7; // dirty, zeros: written too
        let high = vec![0u64; (1 << 20) / 4096 / 64];
        let (path, file) = tmpfile("diff");
        let saved = save_memory(&mem, &file, Some(&[low, high])).unwrap();
        assert_eq!(saved.bytes_written, 2 * 4096);
        let mut page = [0u8; 4096];
        file.read_exact_at(&mut page, 0x5000).unwrap();
        assert_eq!(page, [1; 4096]);
        // Page 9 was not dirty: a hole.
        file.read_exact_at(&mut page, 0x9000).unwrap();
        assert_eq!(page, [0; 4096]);
        // Onto a full snapshot's file: the dirty page is brought up to date, the others
        // keep what the full snapshot wrote.
        let (full_path, full) = tmpfile("diff-onto-full");
        save_memory(&mem, &full, None).unwrap();
        mem.write_slice(&[3; 4096], GuestAddress(0x5000)).unwrap();
        mem.write_slice(&[4; 4096], GuestAddress(0x9000)).unwrap();
        let mut only5 = vec![0u64; (4 << 20) / 4096 / 64];
        only5[0] = 1 << 5;
        let high = vec![0u64; (1 << 20) / 4096 / 64];
        let saved = save_memory(&mem, &full, Some(&[only5, high])).unwrap();
        assert_eq!(saved.bytes_written, 4096);
        full.read_exact_at(&mut page, 0x5000).unwrap();
        assert_eq!(page, [3; 4096]);
        full.read_exact_at(&mut page, 0x9000).unwrap();
        assert_eq!(page, [2; 4096], "a page not named was rewritten");
        assert_eq!(full.metadata().unwrap().len(), 5 << 20);
        std::fs::remove_file(full_path).unwrap();
        assert!(matches!(
            save_memory(&mem, &file, Some(&[vec![]])),
            Err(Error::DirtyBitmaps { .. })
        ));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_file_too_short_for_its_regions_is_refused() {
        let (path, file) = tmpfile("short");
        file.set_len(1 << 20).unwrap();
        let regions = [MemoryRegion {
            guest_addr: 0,
            size: 2 << 20,
            file_offset: 0,
        }];
        assert!(matches!(
            map_memory_file(&file, &regions),
            Err(Error::MemoryFileTooShort { need, .. }) if need == 2 << 20
        ));
        std::fs::remove_file(path).unwrap();
    }
}
