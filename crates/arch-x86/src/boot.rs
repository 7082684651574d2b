//! Kernel loading, initrd placement, the e820 map and the zero page (`boot_params`).
//!
//! Follows the Linux x86 boot protocol (`Documentation/arch/x86/boot.rst`): a bzImage is
//! entered at `code32_start` in 32-bit protected mode, an ELF vmlinux at its entry point in
//! 64-bit mode; either way RSI points at `boot_params`, which carries the setup header, the
//! command line pointer, the initrd and the e820 memory map.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr, PT_LOAD};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::KernelLoader;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile};

use crate::gdt::BootMode;
use crate::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, DEFAULT_INITRD_ADDR_MAX, EBDA_START, HIMEM_START,
    MMIO_GAP_START, ZERO_PAGE_START,
};
use crate::{Error, Result};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// `boot_flag` magic at 0x1FE of the setup header.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// "HdrS", the setup header signature.
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` for a boot loader without an assigned id.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// `kernel_alignment` we report for an ELF kernel (the kernel's CONFIG_PHYSICAL_ALIGN default).
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// `loadflags` bit: the protected-mode code is loaded at 0x100000.
const LOADED_HIGH: u8 = 0x01;

/// What loading the kernel produced: where to enter it and how.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// Entry point (RIP).
    pub entry: GuestAddress,
    /// The CPU mode the entry point expects.
    pub mode: BootMode,
    /// First byte after the loaded image.
    pub kernel_end: u64,
    /// The bzImage setup header, when the kernel is a bzImage.
    pub setup_header: Option<setup_header>,
}

/// The kind of kernel image a file holds, from its magic numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF vmlinux (0x7F 'E' 'L' 'F').
    Elf,
    /// A bzImage ("HdrS" at 0x202).
    BzImage,
}

/// Tells an ELF vmlinux from a bzImage by their magic numbers.
pub fn detect_kernel_format<R: Read + Seek>(image: &mut R) -> Result<KernelFormat> {
    let mut head = [0u8; 0x206];
    image.seek(SeekFrom::Start(0)).map_err(Error::ReadKernel)?;
    let mut read = 0;
    while read < head.len() {
        match image.read(&mut head[read..]).map_err(Error::ReadKernel)? {
            0 => break,
            n => read += n,
        }
    }
    if read >= 4 && head[..4] == [0x7f, b'E', b'L', b'F'] {
        return Ok(KernelFormat::Elf);
    }
    if read >= 0x206 && head[0x202..0x206] == KERNEL_HDR_MAGIC.to_le_bytes() {
        return Ok(KernelFormat::BzImage);
    }
    Err(Error::UnknownKernelFormat)
}

/// Checks what can be checked of a kernel image without guest memory: its format and,
/// for an ELF vmlinux, that its file header reads and that [`load_kernel`] would not
/// refuse its segments. The VMM calls it before it opens `/dev/kvm`, so that a file that
/// can never load is one error on any machine.
///
/// # Errors
/// [`Error::UnknownKernelFormat`], [`Error::ReadKernel`], [`Error::LoadKernel`] (the
/// loader's own "Unable to read elf header") or [`Error::InvalidElfSegment`].
pub fn check_kernel<R: Read + Seek>(image: &mut R) -> Result<KernelFormat> {
    let format = detect_kernel_format(image)?;
    if format == KernelFormat::Elf {
        let mut ehdr = Elf64_Ehdr::default();
        image
            .seek(SeekFrom::Start(0))
            .and_then(|_| image.read_exact(ehdr.as_mut_slice()))
            .map_err(|_| {
                Error::LoadKernel(linux_loader::loader::Error::Elf(
                    linux_loader::loader::elf::Error::ReadElfHeader,
                ))
            })?;
        check_elf_segments(image)?;
    }
    Ok(format)
}

/// Loads a bzImage or an ELF vmlinux from `image` (a [`File`] in the VMM, any seekable
/// reader in tests and fuzzing) into `mem`.
pub fn load_kernel<M, F>(mem: &M, image: &mut F) -> Result<LoadedKernel>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    match detect_kernel_format(image)? {
        KernelFormat::Elf => {
            check_elf_segments(image)?;
            let r = Elf::load(mem, None, image, Some(HIMEM_START)).map_err(Error::LoadKernel)?;
            Ok(LoadedKernel {
                entry: r.kernel_load,
                mode: BootMode::Long64,
                kernel_end: r.kernel_end,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let r =
                BzImage::load(mem, None, image, Some(HIMEM_START)).map_err(Error::LoadKernel)?;
            Ok(LoadedKernel {
                // linux-loader loads the protected-mode part at `code32_start`, our entry.
                entry: r.kernel_load,
                mode: BootMode::Protected32,
                kernel_end: r.kernel_end,
                setup_header: r.setup_header,
            })
        }
    }
}

/// Checks the program headers of an ELF kernel before linux-loader copies it, which
/// checks only the entry point against 1 MiB (found by the `kernel_loader` fuzz target).
/// Every segment it loads (PT_LOAD with file bytes) must start at or above
/// [`HIMEM_START`]: below it the VMM writes the zero page, the command line, the GDT and
/// the page tables after the kernel, over it. And it must not copy more bytes than its
/// memory size: linux-loader copies `p_filesz` bytes but reports the kernel's end from
/// `p_memsz`, and the initrd is placed from that end on. Headers that cannot be read are
/// left to linux-loader, which reports them.
fn check_elf_segments<F: Read + Seek>(image: &mut F) -> Result<()> {
    let mut ehdr = Elf64_Ehdr::default();
    let read_ehdr = image
        .seek(SeekFrom::Start(0))
        .and_then(|_| image.read_exact(ehdr.as_mut_slice()));
    if read_ehdr.is_err() || image.seek(SeekFrom::Start(ehdr.e_phoff)).is_err() {
        return Ok(());
    }
    for _ in 0..ehdr.e_phnum {
        let mut phdr = Elf64_Phdr::default();
        if image.read_exact(phdr.as_mut_slice()).is_err() {
            return Ok(());
        }
        // linux-loader skips the others (and a PT_LOAD without file bytes) too.
        if phdr.p_type != PT_LOAD || phdr.p_filesz == 0 {
            continue;
        }
        if phdr.p_paddr < HIMEM_START.raw_value() || phdr.p_filesz > phdr.p_memsz {
            return Err(Error::InvalidElfSegment {
                paddr: phdr.p_paddr,
                filesz: phdr.p_filesz,
                memsz: phdr.p_memsz,
            });
        }
    }
    Ok(())
}

/// Where an initrd of `size` bytes goes: as high as possible below both the end of low RAM
/// and the kernel's `initrd_addr_max`, page aligned, above the kernel.
///
/// # Errors
/// [`Error::InitrdTooLarge`] when it does not fit between the kernel and that limit.
pub fn initrd_load_addr(
    ram: &[(GuestAddress, u64)],
    header: Option<&setup_header>,
    kernel_end: u64,
    size: u64,
) -> Result<GuestAddress> {
    let low_ram_end = ram
        .first()
        .map(|(start, len)| start.raw_value() + len)
        .unwrap_or(0)
        .min(MMIO_GAP_START);
    let addr_max = match header {
        Some(h) if h.version >= 0x0203 && h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
        Some(_) => DEFAULT_INITRD_ADDR_MAX,
        // An ELF kernel has no header; its 64-bit entry can reach the whole low RAM.
        None => u64::MAX - 1,
    };
    let limit = low_ram_end.min(addr_max + 1);
    let floor = kernel_end.max(HIMEM_START.raw_value());
    let available = limit.saturating_sub(floor);
    let too_large = Error::InitrdTooLarge {
        size,
        available: available & !0xfff,
    };
    let start = limit.checked_sub(size).ok_or(too_large)? & !0xfff;
    if start < floor {
        return Err(Error::InitrdTooLarge {
            size,
            available: available & !0xfff,
        });
    }
    Ok(GuestAddress(start))
}

/// Copies the initrd file into guest memory at the address [`initrd_load_addr`] picks.
/// Returns the address and size.
pub fn load_initrd<M: GuestMemoryBackend>(
    mem: &M,
    ram: &[(GuestAddress, u64)],
    kernel: &LoadedKernel,
    initrd: &mut File,
) -> Result<(GuestAddress, u64)> {
    let size = initrd.seek(SeekFrom::End(0)).map_err(Error::ReadInitrd)?;
    initrd.seek(SeekFrom::Start(0)).map_err(Error::ReadInitrd)?;
    let addr = initrd_load_addr(ram, kernel.setup_header.as_ref(), kernel.kernel_end, size)?;
    let len = usize::try_from(size).map_err(|_| Error::InitrdTooLarge { size, available: 0 })?;
    mem.read_exact_volatile_from(addr, initrd, len)
        .map_err(|_| Error::CopyInitrd)?;
    Ok((addr, size))
}

/// Builds a kernel command line from `text`, refusing one longer than the kernel accepts
/// (its `cmdline_size`, when the header says) or than our own buffer.
pub fn build_cmdline(text: &str, header: Option<&setup_header>) -> Result<Cmdline> {
    let kernel_max = match header {
        Some(h) if h.version >= 0x0206 && h.cmdline_size != 0 => h.cmdline_size as usize,
        // Boot protocol < 2.06: 255 bytes.
        Some(_) => 255,
        None => CMDLINE_MAX_SIZE - 1,
    };
    let max = kernel_max.min(CMDLINE_MAX_SIZE - 1);
    if text.len() > max {
        return Err(Error::CmdlineTooLong {
            len: text.len(),
            max,
        });
    }
    // Capacity counts the NUL.
    let cmdline = Cmdline::try_from(text, max + 1).map_err(Error::Cmdline)?;
    // `try_from` checks only the length; `load_cmdline` needs the C string, which a NUL
    // in the text or init args without boot args (" -- init=/bin/sh") cannot give. Refuse
    // those here, as an invalid command line, rather than as a failed write into guest
    // memory later (found by the `cmdline` fuzz target).
    cmdline.as_cstring().map_err(Error::Cmdline)?;
    Ok(cmdline)
}

/// Writes `cmdline` at [`CMDLINE_START`].
pub fn load_cmdline<M: GuestMemoryBackend>(mem: &M, cmdline: &Cmdline) -> Result<()> {
    linux_loader::loader::load_cmdline(mem, CMDLINE_START, cmdline).map_err(Error::LoadCmdline)
}

/// The e820 map for the RAM ranges of [`crate::layout::ram_ranges`]: low RAM up to the
/// EBDA, the legacy hole reserved (EBDA, VGA, BIOS ROM), then RAM from 1 MiB up to the
/// 32-bit hole and any RAM above 4 GiB.
pub fn e820_entries(ram: &[(GuestAddress, u64)]) -> Vec<boot_e820_entry> {
    let mut out = vec![
        boot_e820_entry {
            addr: 0,
            size: EBDA_START,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: EBDA_START,
            size: HIMEM_START.raw_value() - EBDA_START,
            r#type: E820_RESERVED,
        },
    ];
    for (start, len) in ram {
        let begin = start.raw_value().max(HIMEM_START.raw_value());
        let end = start.raw_value() + len;
        if end > begin {
            out.push(boot_e820_entry {
                addr: begin,
                size: end - begin,
                r#type: E820_RAM,
            });
        }
    }
    out
}

/// Everything [`build_boot_params`] needs.
#[derive(Debug)]
pub struct BootParamsConfig<'a> {
    /// Guest RAM ranges.
    pub ram: &'a [(GuestAddress, u64)],
    /// The loaded kernel.
    pub kernel: &'a LoadedKernel,
    /// Length of the command line without its NUL.
    pub cmdline_len: usize,
    /// Address and size of the initrd, if any.
    pub initrd: Option<(GuestAddress, u64)>,
    /// Where the ACPI RSDP is, if there are ACPI tables (`boot_params.acpi_rsdp_addr`,
    /// read by kernels of boot protocol 2.14 and newer; older ones scan the BIOS area).
    pub acpi_rsdp: Option<GuestAddress>,
}

/// Fills the zero page: the kernel's own setup header (bzImage) or a minimal one (ELF),
/// with our loader id, the command line, the initrd and the e820 map.
pub fn build_boot_params(cfg: &BootParamsConfig<'_>) -> Result<boot_params> {
    let mut params = boot_params::default();
    if let Some(hdr) = cfg.kernel.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.cmd_line_ptr = CMDLINE_START.raw_value() as u32;
    params.hdr.cmdline_size = (cfg.cmdline_len + 1) as u32;
    if let Some((addr, size)) = cfg.initrd {
        params.hdr.ramdisk_image =
            u32::try_from(addr.raw_value()).map_err(|_| Error::InitrdAddress(addr.raw_value()))?;
        params.hdr.ramdisk_size = u32::try_from(size).map_err(|_| Error::InitrdTooLarge {
            size,
            available: u64::from(u32::MAX),
        })?;
    }
    if let Some(rsdp) = cfg.acpi_rsdp {
        params.acpi_rsdp_addr = rsdp.raw_value();
    }
    let entries = e820_entries(cfg.ram);
    if entries.len() > params.e820_table.len() {
        return Err(Error::E820Full);
    }
    for (slot, e) in params.e820_table.iter_mut().zip(entries.iter()) {
        *slot = *e;
    }
    params.e820_entries = entries.len() as u8;
    Ok(params)
}

/// Writes `params` at [`ZERO_PAGE_START`].
pub fn write_boot_params<M: GuestMemoryBackend>(mem: &M, params: &boot_params) -> Result<()> {
    LinuxBootConfigurator::write_bootparams::<M>(
        &BootParams::new::<boot_params>(params, ZERO_PAGE_START),
        mem,
    )
    .map_err(Error::WriteBootParams)?;
    // The configurator checks the zero page fits; read one field back as a cheap sanity check
    // that it landed where RSI will point.
    let hdr_magic: u32 = mem
        .read_obj(ZERO_PAGE_START.unchecked_add(0x202))
        .map_err(|_| Error::ZeroPageMissing)?;
    if hdr_magic != KERNEL_HDR_MAGIC {
        return Err(Error::ZeroPageMissing);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::ram_ranges;
    use crate::test_mem;
    use std::io::{Cursor, Write};

    fn elf_kernel() -> LoadedKernel {
        LoadedKernel {
            entry: GuestAddress(0x100_0000),
            mode: BootMode::Long64,
            kernel_end: 0x200_0000,
            setup_header: None,
        }
    }

    fn bz_header() -> setup_header {
        setup_header {
            version: 0x020f,
            initrd_addr_max: 0x7fff_ffff,
            cmdline_size: 2047,
            header: KERNEL_HDR_MAGIC,
            boot_flag: KERNEL_BOOT_FLAG_MAGIC,
            code32_start: 0x10_0000,
            ..Default::default()
        }
    }

    #[test]
    fn e820_below_the_hole() {
        for mib in [128u64, 512, 2048, 3072] {
            let ram = ram_ranges(mib << 20);
            let e = e820_entries(&ram);
            assert_eq!(e.len(), 3, "{mib} MiB");
            assert_eq!((e[0].addr, e[0].size, e[0].r#type), (0, 0x9fc00, E820_RAM));
            assert_eq!({ e[1].r#type }, E820_RESERVED);
            assert_eq!(e[1].addr + e[1].size, 0x10_0000);
            assert_eq!(
                (e[2].addr, e[2].size, e[2].r#type),
                (0x10_0000, (mib << 20) - 0x10_0000, E820_RAM)
            );
        }
    }

    #[test]
    fn e820_above_the_hole() {
        let ram = ram_ranges(6 << 30);
        let e = e820_entries(&ram);
        assert_eq!(e.len(), 4);
        assert_eq!((e[2].addr, e[2].size), (0x10_0000, 0xc000_0000 - 0x10_0000));
        assert_eq!(
            (e[3].addr, e[3].size, e[3].r#type),
            (1 << 32, (6 << 30) - 0xc000_0000, E820_RAM)
        );
        // Nothing of the hole is RAM.
        assert!(e
            .iter()
            .all(|x| x.addr + x.size <= 0xc000_0000 || x.addr >= 1 << 32));
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram() {
        let ram = ram_ranges(512 << 20);
        let hdr = bz_header();
        let addr = initrd_load_addr(&ram, Some(&hdr), 0x80_0000, 10 << 20).unwrap();
        assert_eq!(addr.raw_value(), (512 << 20) - (10 << 20));
        // Page aligned even for odd sizes.
        let addr = initrd_load_addr(&ram, Some(&hdr), 0x80_0000, 12345).unwrap();
        assert_eq!(addr.raw_value() & 0xfff, 0);
        assert!(addr.raw_value() + 12345 <= 512 << 20);
    }

    #[test]
    fn initrd_respects_initrd_addr_max_and_the_hole() {
        let ram = ram_ranges(4 << 30);
        let mut hdr = bz_header();
        hdr.initrd_addr_max = 0x37ff_ffff;
        let addr = initrd_load_addr(&ram, Some(&hdr), 0x80_0000, 1 << 20).unwrap();
        assert_eq!(addr.raw_value(), 0x3800_0000 - (1 << 20));
        // With no header limit, the hole is the limit.
        let addr = initrd_load_addr(&ram, None, 0x80_0000, 1 << 20).unwrap();
        assert_eq!(addr.raw_value(), 0xc000_0000 - (1 << 20));
    }

    #[test]
    fn too_large_an_initrd_is_a_clear_error() {
        let ram = ram_ranges(64 << 20);
        let err = initrd_load_addr(&ram, Some(&bz_header()), 0x100_0000, 60 << 20).unwrap_err();
        match err {
            Error::InitrdTooLarge { size, available } => {
                assert_eq!(size, 60 << 20);
                assert_eq!(available, (64 << 20) - 0x100_0000);
            }
            e => panic!("unexpected {e:?}"),
        }
        assert!(err_text(&ram).contains("initrd"));
        // Larger than all of RAM.
        assert!(initrd_load_addr(&ram, None, 0, 1 << 30).is_err());
    }

    fn err_text(ram: &[(GuestAddress, u64)]) -> String {
        initrd_load_addr(ram, None, 0x100_0000, 1 << 30)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn boot_params_for_a_bzimage() {
        let ram = ram_ranges(1 << 30);
        let kernel = LoadedKernel {
            entry: GuestAddress(0x10_0000),
            mode: BootMode::Protected32,
            kernel_end: 0x90_0000,
            setup_header: Some(bz_header()),
        };
        let cfg = BootParamsConfig {
            ram: &ram,
            kernel: &kernel,
            cmdline_len: 37,
            initrd: Some((GuestAddress(0x3000_0000), 4096)),
            acpi_rsdp: Some(crate::layout::RSDP_START),
        };
        let p = build_boot_params(&cfg).unwrap();
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.cmdline_size }, 38);
        assert_eq!({ p.hdr.ramdisk_image }, 0x3000_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 4096);
        assert_eq!({ p.hdr.version }, 0x020f);
        assert_eq!(p.hdr.loadflags & LOADED_HIGH, LOADED_HIGH);
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.e820_table[2].size }, (1 << 30) - 0x10_0000);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe_0000);

        let mem = test_mem(0x10_0000);
        write_boot_params(&mem, &p).unwrap();
        let back: boot_params = mem.read_obj(ZERO_PAGE_START).unwrap();
        assert_eq!({ back.hdr.ramdisk_image }, 0x3000_0000);
        assert_eq!(back.e820_entries, 3);
    }

    #[test]
    fn boot_params_for_an_elf_kernel() {
        let ram = ram_ranges(6 << 30);
        let kernel = elf_kernel();
        let cfg = BootParamsConfig {
            ram: &ram,
            kernel: &kernel,
            cmdline_len: 10,
            initrd: None,
            acpi_rsdp: None,
        };
        let p = build_boot_params(&cfg).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.kernel_alignment }, 0x100_0000);
        assert_eq!(({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size }), (0, 0));
        assert_eq!({ p.acpi_rsdp_addr }, 0);
        assert_eq!(p.e820_entries, 4);
    }

    #[test]
    fn cmdline_limits() {
        let hdr = bz_header();
        let c = build_cmdline("console=ttyS0 reboot=k", Some(&hdr)).unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 reboot=k"
        );
        let long = "a".repeat(2048);
        assert!(matches!(
            build_cmdline(&long, Some(&hdr)),
            Err(Error::CmdlineTooLong {
                len: 2048,
                max: 2047
            })
        ));
        assert!(build_cmdline(&"a".repeat(2047), Some(&hdr)).is_ok());
        let mem = test_mem(0x10_0000);
        load_cmdline(&mem, &c).unwrap();
        let mut buf = [0u8; 23];
        mem.read_slice(&mut buf, CMDLINE_START).unwrap();
        assert_eq!(&buf, b"console=ttyS0 reboot=k\0");
    }

    #[test]
    fn kernel_format_detection() {
        let mut elf = Cursor::new(b"\x7fELF\x02\x01\x01".to_vec());
        assert_eq!(detect_kernel_format(&mut elf).unwrap(), KernelFormat::Elf);
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(
            detect_kernel_format(&mut Cursor::new(bz)).unwrap(),
            KernelFormat::BzImage
        );
        let mut junk = Cursor::new(vec![0u8; 10]);
        assert!(matches!(
            detect_kernel_format(&mut junk),
            Err(Error::UnknownKernelFormat)
        ));
    }

    #[test]
    fn corrupt_bzimage_is_refused() {
        // "HdrS" but a version too old and no LOADED_HIGH flag.
        let mut bz = vec![0u8; 0x1000];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let mut f = tempfile();
        f.write_all(&bz).unwrap();
        let mem = test_mem(0x40_0000);
        assert!(matches!(
            load_kernel(&mem, &mut f),
            Err(Error::LoadKernel(_))
        ));
    }

    /// An ELF64 vmlinux entered at 2 MiB with one PT_LOAD of `filesz` bytes (from file
    /// offset 0x1000) at `paddr`, `memsz` in memory.
    fn elf_with_segment(paddr: u64, filesz: u64, memsz: u64) -> Vec<u8> {
        let mut e = vec![0u8; 0x1000 + filesz as usize];
        e[0..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
        e[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[0x12..0x14].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
        e[0x18..0x20].copy_from_slice(&0x20_0000u64.to_le_bytes()); // entry
        e[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes()); // phoff
        e[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes()); // phentsize
        e[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let ph = 0x40;
        e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        e[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes());
        e[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        e[ph + 32..ph + 40].copy_from_slice(&filesz.to_le_bytes());
        e[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
        e[0x1000..].fill(0x90);
        e
    }

    #[test]
    fn kernels_that_cannot_load_are_refused_without_guest_memory() {
        let good = elf_with_segment(0x20_0000, 0x100, 0x100);
        assert_eq!(
            check_kernel(&mut Cursor::new(good)).unwrap(),
            KernelFormat::Elf
        );
        // The magic alone, and a header cut short: the loader's own message.
        for short in [
            &b"\x7fELF"[..],
            &elf_with_segment(0x20_0000, 0x100, 0x100)[..0x3f],
        ] {
            let e = check_kernel(&mut Cursor::new(short.to_vec())).unwrap_err();
            assert!(matches!(e, Error::LoadKernel(_)), "{e:?}");
            let cause = std::error::Error::source(&e).unwrap().to_string();
            assert!(cause.contains("Unable to read elf header"), "{cause}");
        }
        assert!(matches!(
            check_kernel(&mut Cursor::new(elf_with_segment(0, 0x20, 0x20))),
            Err(Error::InvalidElfSegment { paddr: 0, .. })
        ));
        assert!(matches!(
            check_kernel(&mut Cursor::new(b"neither".to_vec())),
            Err(Error::UnknownKernelFormat)
        ));
    }

    /// Regression (fuzz target `kernel_loader`,
    /// fuzz/regressions/kernel_loader/elf-segment-below-1mib): linux-loader checks only
    /// an ELF kernel's entry point against 1 MiB, so a segment at 0 loaded (over where
    /// the zero page, command line, GDT and page tables go next), and a segment larger in
    /// the file than in memory wrote past the `kernel_end` the initrd is placed after.
    #[test]
    fn elf_segments_below_1mib_or_larger_than_memory_are_refused() {
        // The minimized fuzz input: entry 0x6c..., one PT_LOAD of 0x20 file bytes at
        // physical 0 with memsz 0.
        const FUZZ_ELF: [u8; 120] = [
            0x7f, 0x45, 0x4c, 0x46, 0x02, 0x01, 0x01, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0xff, 0x6c, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x20, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x6d, 0x00, 0x00, 0x00, 0x00, 0x00, 0x40, 0x00, 0x38, 0x00,
            0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x20, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x20, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x90, 0x00, 0x00, 0x90,
        ];
        let mem = test_mem(0x40_0000);
        let low = |mem: &vm_memory::GuestMemoryMmap<()>| {
            let mut b = vec![0u8; 0x100];
            mem.read_slice(&mut b, GuestAddress(0)).unwrap();
            b
        };
        assert!(matches!(
            load_kernel(&mem, &mut Cursor::new(FUZZ_ELF.to_vec())),
            Err(Error::InvalidElfSegment {
                paddr: 0,
                filesz: 0x20,
                memsz: 0
            })
        ));
        assert_eq!(
            low(&mem),
            vec![0u8; 0x100],
            "nothing was copied below 1 MiB"
        );

        let below = elf_with_segment(0xf_f000, 0x2000, 0x2000);
        assert!(matches!(
            load_kernel(&mem, &mut Cursor::new(below)),
            Err(Error::InvalidElfSegment {
                paddr: 0xf_f000,
                ..
            })
        ));
        let too_big = elf_with_segment(0x20_0000, 0x2000, 0x1000);
        assert!(matches!(
            load_kernel(&mem, &mut Cursor::new(too_big)),
            Err(Error::InvalidElfSegment { memsz: 0x1000, .. })
        ));
        let good = elf_with_segment(0x20_0000, 0x1000, 0x3000);
        let k = load_kernel(&mem, &mut Cursor::new(good)).unwrap();
        assert_eq!((k.entry.0, k.kernel_end), (0x20_0000, 0x20_3000));
    }

    /// Regression (fuzz target `cmdline`, fuzz/regressions/cmdline/nul-byte): linux-loader's
    /// `Cmdline::try_from` checks only the length, so a NUL in the text or init args
    /// without boot args passed `build_cmdline` and failed later as "failed to write the
    /// kernel command line into guest memory".
    #[test]
    fn cmdline_that_cannot_be_loaded_is_refused() {
        for text in [
            "\0",
            "console=ttyS0\0quiet",
            " -- init=/bin/sh",
            "   --   x",
        ] {
            assert!(
                matches!(build_cmdline(text, None), Err(Error::Cmdline(_))),
                "{text:?}"
            );
        }
        let mem = test_mem(0x10_0000);
        let c = build_cmdline("console=ttyS0 -- init=/bin/sh", None).unwrap();
        load_cmdline(&mem, &c).unwrap();
        let c = build_cmdline("", None).unwrap();
        load_cmdline(&mem, &c).unwrap();
    }

    fn tempfile() -> File {
        let path = std::env::temp_dir().join(format!(
            "tvm-arch-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }
}
