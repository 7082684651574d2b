// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Kernel images: format detection, the bzImage and ELF loaders, initrd placement and the
//! zero page, on any file content (the `--kernel` file is the user's, but it is also the
//! first thing the VMM parses).
//!
//! Input: RAM size for placement (u16, in MiB, at least 16), initrd size (u32, in 4 KiB
//! pages), command line length (u8) and bytes, then the kernel image (the rest).
//!
//! Invariants:
//! - a kernel that loads was written nowhere below 1 MiB (the zero page, command line, GDT and page
//!   tables live there and are written after the kernel) and nothing at or beyond the
//!   `kernel_end` they report (the initrd goes above it); the entry point is above 1 MiB;
//!   the boot mode matches the format;
//! - an initrd placed by `initrd_load_addr` is page aligned, above the kernel and 1 MiB,
//!   and ends within low RAM and the kernel's `initrd_addr_max`;
//! - `build_boot_params` keeps the command line and initrd it was given, the e820 map is
//!   sorted and non-overlapping, and writing the zero page touches only that page;
//! - no panic, no `error!`, no repeated `warn!`.

use std::io::Cursor;

use tvm_arch_x86::{
    build_boot_params, build_cmdline, detect_kernel_format, initrd_load_addr, layout, load_kernel,
    write_boot_params, BootMode, BootParamsConfig, KernelFormat,
};
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

use crate::{logger, Input};

/// Guest memory the loaders write into: 16 MiB with a dirty-page bitmap.
pub type TrackedMem = GuestMemoryMmap<AtomicBitmap>;
const MEM_SIZE: usize = 16 << 20;
const PAGE: u64 = 4096;

thread_local! {
    static MEM: TrackedMem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("16 MiB");
}

/// Runs `f` on the shared memory with a clean dirty bitmap.
pub fn with_mem<R>(f: impl FnOnce(&TrackedMem) -> R) -> R {
    MEM.with(|mem| {
        clear_dirty(mem);
        f(mem)
    })
}

/// Forgets which pages were written.
pub fn clear_dirty(mem: &TrackedMem) {
    for r in mem.iter() {
        // The region's own bitmap (the trait's `bitmap()` is a read-only slice of it).
        MmapRegion::bitmap(r).reset();
    }
}

/// The guest addresses of the pages written since the last [`clear_dirty`].
pub fn dirty_pages(mem: &TrackedMem) -> Vec<u64> {
    let mut out = Vec::new();
    for r in mem.iter() {
        let base = r.start_addr().0;
        for off in (0..r.len()).step_by(PAGE as usize) {
            if r.bitmap().dirty_at(off as usize) {
                out.push(base + off);
            }
        }
    }
    out
}

/// Runs one input.
pub fn run(data: &[u8]) {
    logger::start_input();
    let mut input = Input::new(data);
    let ram_mib = u64::from(input.u16()).max(16);
    let initrd_size = u64::from(input.u32()) * PAGE;
    let cmd_len = usize::from(input.u8());
    let cmdline_text = String::from_utf8_lossy(input.bytes(cmd_len)).into_owned();
    let image = input.rest();

    let format = detect_kernel_format(&mut Cursor::new(image));
    with_mem(|mem| {
        // A refused image may have been partly copied: the VMM stops then, so only what a
        // loaded kernel wrote matters.
        let Ok(kernel) = load_kernel(mem, &mut Cursor::new(image)) else {
            return;
        };
        let dirty = dirty_pages(mem);
        if let Some(&low) = dirty.first() {
            assert!(
                low >= layout::HIMEM_START.0,
                "the kernel loader wrote at {low:#x}, below 1 MiB ({format:?})"
            );
        }
        let format = format.expect("a loaded kernel has a known format");
        let last = dirty.last().copied().unwrap_or(0);
        assert!(
            dirty.is_empty() || last < kernel.kernel_end.next_multiple_of(PAGE),
            "the kernel loader wrote the page at {last:#x}, past kernel_end {:#x}",
            kernel.kernel_end
        );
        assert!(
            kernel.entry.0 >= layout::HIMEM_START.0,
            "entry {:#x}",
            kernel.entry.0
        );
        match format {
            KernelFormat::Elf => {
                assert_eq!(kernel.mode, BootMode::Long64);
                assert!(kernel.setup_header.is_none());
            }
            KernelFormat::BzImage => {
                assert_eq!(kernel.mode, BootMode::Protected32);
                assert!(kernel.setup_header.is_some());
            }
        }

        let header = kernel.setup_header.as_ref();
        let ram = layout::ram_ranges(ram_mib << 20);
        let initrd = initrd_load_addr(&ram, header, kernel.kernel_end, initrd_size).ok();
        if let Some(addr) = initrd {
            let low_ram_end = (ram[0].0 .0 + ram[0].1).min(layout::MMIO_GAP_START);
            let addr_max = match header {
                Some(h) if h.version >= 0x0203 && h.initrd_addr_max != 0 => {
                    u64::from(h.initrd_addr_max)
                }
                Some(_) => layout::DEFAULT_INITRD_ADDR_MAX,
                None => u64::MAX - 1,
            };
            assert_eq!(addr.0 % PAGE, 0, "initrd at {:#x} not page aligned", addr.0);
            assert!(
                addr.0 >= kernel.kernel_end && addr.0 >= layout::HIMEM_START.0,
                "initrd at {:#x} under the kernel (end {:#x})",
                addr.0,
                kernel.kernel_end
            );
            let end = addr.0 + initrd_size;
            assert!(end <= low_ram_end, "initrd ends at {end:#x}, past low RAM");
            assert!(
                end - 1 <= addr_max,
                "initrd ends at {end:#x}, past initrd_addr_max"
            );
        }

        let cmdline_len = build_cmdline(&cmdline_text, header)
            .map(|_| cmdline_text.len())
            .unwrap_or(0);
        let Ok(params) = build_boot_params(&BootParamsConfig {
            ram: &ram,
            kernel: &kernel,
            cmdline_len,
            initrd: initrd.map(|a| (a, initrd_size)),
            acpi_rsdp: Some(layout::RSDP_START),
        }) else {
            return;
        };
        assert_eq!(params.hdr.cmd_line_ptr as u64, layout::CMDLINE_START.0);
        assert_eq!({ params.acpi_rsdp_addr }, layout::RSDP_START.0);
        assert_eq!(params.hdr.cmdline_size as usize, cmdline_len + 1);
        if let Some(a) = initrd {
            assert_eq!(u64::from(params.hdr.ramdisk_image), a.0);
            assert_eq!(u64::from(params.hdr.ramdisk_size), initrd_size);
        }
        let n = usize::from(params.e820_entries);
        let e820 = params.e820_table;
        for w in e820[..n].windows(2) {
            let (a, b) = (w[0], w[1]);
            assert!(
                a.addr + a.size <= b.addr,
                "e820 entries overlap or are unsorted"
            );
        }
        clear_dirty(mem);
        if write_boot_params(mem, &params).is_ok() {
            let dirty = dirty_pages(mem);
            assert!(
                dirty.iter().all(|&p| p == layout::ZERO_PAGE_START.0),
                "writing the zero page dirtied {dirty:x?}"
            );
        }
    });
}
