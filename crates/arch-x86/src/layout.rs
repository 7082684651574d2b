//! The guest physical memory map used at boot.
//!
//! Every fixed address the VMM places something at lives here, with where the number comes
//! from. The Linux x86 boot protocol is `Documentation/arch/x86/boot.rst` in the kernel tree;
//! the low addresses follow the layout Firecracker and Cloud Hypervisor use.

use vm_memory::GuestAddress;

/// Where the GDT is written.
pub const BOOT_GDT_START: GuestAddress = GuestAddress(0x500);
/// Number of GDT entries we write (null, TSS, code, data).
pub const BOOT_GDT_MAX: usize = 4;
/// Where the (empty) IDT is placed; with its 8-byte limit and a zero entry any exception is a
/// triple fault, which is what the kernel expects before it installs its own.
pub const BOOT_IDT_START: GuestAddress = GuestAddress(0x520);
/// The zero page (`struct boot_params`), handed to the kernel in RSI: 0x10000, the seed
/// design's value (docs/boot.md has the table), above the page tables.
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x1_0000);
/// Initial stack pointer, below the page tables.
pub const BOOT_STACK_POINTER: GuestAddress = GuestAddress(0x8ff0);
/// Page-map level 4 table for the 64-bit entry.
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
/// Page-directory-pointer table for the 64-bit entry.
pub const PDPTE_START: GuestAddress = GuestAddress(0xa000);
/// Page directory (512 x 2 MiB pages = the first GiB identity-mapped).
pub const PDE_START: GuestAddress = GuestAddress(0xb000);
/// Kernel command line.
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
/// Largest command line we accept, including the NUL; the kernel's own limit
/// (`setup_header.cmdline_size`) may be lower and is checked as well.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the Extended BIOS Data Area: usable low RAM ends here (e820).
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI Root System Description Pointer. Linux scans 0xE_0000..0x10_0000 on 16-byte
/// boundaries for it (ACPI 6.5, 5.2.5.1), and `boot_params.acpi_rsdp_addr` points here too.
/// It lies in the e820-reserved area below 1 MiB.
pub const RSDP_START: GuestAddress = GuestAddress(0xe_0000);
/// The other ACPI tables (FACS, DSDT, FADT, MADT, XSDT) follow the RSDP, in the same
/// reserved area; 64-byte aligned, as the FACS must be.
pub const ACPI_TABLES_START: GuestAddress = GuestAddress(0xe_0040);
/// End (exclusive) of the room for ACPI tables: 1 MiB, the end of the reserved area.
pub const ACPI_TABLES_END: u64 = 0x10_0000;
/// Start of high memory, where a bzImage's protected-mode kernel is loaded (`code32_start`).
pub const HIMEM_START: GuestAddress = GuestAddress(0x10_0000);
/// Start of the 32-bit MMIO hole: guest RAM stops here and resumes at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit hole (4 GiB), where RAM above the hole starts.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The part of the hole handed to PCI BARs: up to the IOAPIC.
pub const PCI_MMIO_END: u64 = 0xfec0_0000;
/// IOAPIC base address (Intel 82093AA datasheet default).
pub const IOAPIC_START: GuestAddress = GuestAddress(0xfec0_0000);
/// Local APIC base address (Intel SDM vol. 3, 10.4.1: IA32_APIC_BASE default).
pub const APIC_START: GuestAddress = GuestAddress(0xfee0_0000);
/// KVM_SET_TSS_ADDR: the three pages KVM uses for the real-mode TSS on Intel without
/// unrestricted guest, at the seed design's 0xFFFF_D000: the top 12 KiB below 4 GiB, in
/// the hole, where no RAM, PCI BAR or APIC is (nothing else is mapped above the LAPIC page).
/// Firecracker uses 0xFFFB_D000 and QEMU 0xFEFF_D000; any works, as long as the pages are
/// in no memory slot and clash with no device.
pub const KVM_TSS_ADDRESS: GuestAddress = GuestAddress(0xffff_d000);
/// Pages KVM_SET_TSS_ADDR takes.
pub const KVM_TSS_PAGES: u64 = 3;
/// KVM_SET_IDENTITY_MAP_ADDR: one page, just below the TSS (the seed's 0xFFFF_C000).
pub const KVM_IDENTITY_MAP_START: GuestAddress = GuestAddress(0xffff_c000);
/// Default guest RAM when `--memory` is not given: 1 GiB, the seed design's value.
pub const DEFAULT_MEM_SIZE: u64 = 1 << 30;
/// Highest address an initrd may end at when the kernel does not say (boot protocol < 2.03).
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

// Interrupt lines. With the GSI routing KVM installs by default, which tvm-irq keeps, GSI n
// below 16 is ISA IRQ n on both the PIC and the IOAPIC, so these are the PC's IRQ numbers.
// Device crates do not depend on this crate: the VMM hands each device its line.

/// GSI of COM1 (ISA IRQ 4), where Linux expects ttyS0's interrupt on a PC
/// (`SERIAL_PORT_DFNS` in the kernel's `arch/x86/include/asm/serial.h`).
pub const COM1_GSI: u32 = 4;
/// GSI of the i8042 keyboard port (ISA IRQ 1; `I8042_KBD_IRQ` in the kernel's
/// `drivers/input/serio/i8042-io.h`), as the DSDT describes it.
pub const I8042_KBD_GSI: u32 = 1;
/// GSI of the i8042 aux (mouse) port (ISA IRQ 12; `I8042_AUX_IRQ`, same file), as the DSDT
/// describes it.
pub const I8042_AUX_GSI: u32 = 12;
/// GSI of the CMOS RTC (ISA IRQ 8; `RTC_IRQ` in the kernel's
/// `arch/x86/include/asm/mc146818rtc.h`), as the DSDT describes it.
pub const RTC_GSI: u32 = 8;
/// GSI of the ACPI System Control Interrupt: ISA IRQ 9, as on PC chipsets (the FADT's
/// `SCI_INT`, with a level-triggered override in the MADT).
pub const SCI_GSI: u32 = 9;
/// GSIs of the virtio-pci devices' INTx (pin A), handed out round robin in the order the
/// devices are added: the ISA IRQs a PC BIOS leaves to PCI (10, 11, then 5), as QEMU's
/// PIIX link devices offer them. Not 9: the SCI is there, level-triggered but active high
/// (the MADT override), and Linux refuses to share a pin between two polarities, so a
/// device given GSI 9 fails to probe ("PCI INT A: failed to register GSI", EBUSY). The
/// ACPI `_PRT` tells the guest which device has which.
pub const VIRTIO_INTX_GSIS: [u32; 3] = [10, 11, 5];

/// The guest RAM ranges for `mem_size` bytes of RAM: below the 32-bit MMIO hole, and the
/// rest moved above 4 GiB.
///
/// Returns `(start, length)` pairs in ascending order.
pub fn ram_ranges(mem_size: u64) -> Vec<(GuestAddress, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), mem_size - MMIO_GAP_START),
        ]
    }
}

// The fixed addresses must not overlap; checked at compile time.
const _: () = {
    assert!(BOOT_GDT_START.0 + (BOOT_GDT_MAX as u64) * 8 <= BOOT_IDT_START.0);
    assert!(BOOT_IDT_START.0 + 8 <= BOOT_STACK_POINTER.0);
    assert!(BOOT_STACK_POINTER.0 < PML4_START.0);
    assert!(PDE_START.0 + 4096 <= ZERO_PAGE_START.0);
    assert!(ZERO_PAGE_START.0 + 4096 <= CMDLINE_START.0);
    assert!(CMDLINE_START.0 + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(EBDA_START <= RSDP_START.0);
    // The RSDP (36 bytes) before the tables, which start 64-byte aligned.
    assert!(RSDP_START.0 + 36 <= ACPI_TABLES_START.0);
    assert!(ACPI_TABLES_START.0 % 64 == 0);
    assert!(ACPI_TABLES_END <= HIMEM_START.0);
    assert!(KVM_IDENTITY_MAP_START.0 + 4096 <= KVM_TSS_ADDRESS.0);
    assert!(KVM_TSS_ADDRESS.0 + KVM_TSS_PAGES * 4096 <= MMIO_GAP_END);
    assert!(KVM_IDENTITY_MAP_START.0 >= APIC_START.0 + 4096);
    assert!(PCI_MMIO_END <= IOAPIC_START.0);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsis_are_pinned_to_the_pc_irqs() {
        // The guest sees these numbers (ACPI tables, drivers' defaults): a change here is a
        // change of the virtual hardware, not a refactor.
        assert_eq!(COM1_GSI, 4);
        assert_eq!(I8042_KBD_GSI, 1);
        assert_eq!(I8042_AUX_GSI, 12);
        assert_eq!(RTC_GSI, 8);
        assert_eq!(SCI_GSI, 9);
        assert_eq!(VIRTIO_INTX_GSIS, [10, 11, 5]);
        let isa = [COM1_GSI, I8042_KBD_GSI, I8042_AUX_GSI, RTC_GSI, SCI_GSI];
        for gsi in isa.iter().chain(&VIRTIO_INTX_GSIS) {
            // On the PIC with the default routing, and neither the PIT's (0) nor the
            // cascade (2).
            assert!(*gsi < 16 && *gsi != 0 && *gsi != 2, "gsi {gsi}");
        }
        // PCI INTx (level, active low) shares no line with an edge-triggered ISA device,
        // nor with the SCI (level, active high): Linux cannot register a GSI with two
        // polarities.
        for gsi in VIRTIO_INTX_GSIS {
            assert!(!isa.contains(&gsi), "gsi {gsi}");
        }
    }

    #[test]
    fn the_seed_designs_values_are_pinned() {
        // The "key configuration values" of the design this VMM re-creates
        // (docs/boot.md shows them side by side with ours). A change here changes what the
        // guest sees: make it on purpose, with the docs.
        assert_eq!(KVM_TSS_ADDRESS, GuestAddress(0xffff_d000));
        assert_eq!(KVM_IDENTITY_MAP_START, GuestAddress(0xffff_c000));
        assert_eq!(ZERO_PAGE_START, GuestAddress(0x1_0000));
        // A bzImage's protected-mode kernel is loaded, and entered, at code32_start.
        assert_eq!(HIMEM_START, GuestAddress(0x10_0000));
        assert_eq!(DEFAULT_MEM_SIZE, 1 << 30);
        // And the rest of the map the design fixes.
        assert_eq!(BOOT_GDT_START, GuestAddress(0x500));
        assert_eq!(BOOT_IDT_START, GuestAddress(0x520));
        assert_eq!(
            (PML4_START, PDPTE_START, PDE_START),
            (
                GuestAddress(0x9000),
                GuestAddress(0xa000),
                GuestAddress(0xb000)
            )
        );
        assert_eq!(CMDLINE_START, GuestAddress(0x2_0000));
        assert_eq!((IOAPIC_START.0, APIC_START.0), (0xfec0_0000, 0xfee0_0000));
        assert_eq!((MMIO_GAP_START, MMIO_GAP_END), (0xc000_0000, 1 << 32));
    }

    #[test]
    fn ram_below_the_hole_is_one_range() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        assert_eq!(
            ram_ranges(MMIO_GAP_START),
            vec![(GuestAddress(0), MMIO_GAP_START)]
        );
    }

    #[test]
    fn ram_over_the_hole_moves_above_4g() {
        let r = ram_ranges(4 << 30);
        assert_eq!(
            r,
            vec![
                (GuestAddress(0), MMIO_GAP_START),
                (GuestAddress(1 << 32), (4 << 30) - MMIO_GAP_START)
            ]
        );
        let total: u64 = r.iter().map(|(_, l)| l).sum();
        assert_eq!(total, 4 << 30);
    }
}
