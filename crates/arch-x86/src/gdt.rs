//! GDT entries and the `kvm_segment`s derived from them.
//!
//! The Linux boot protocol wants `__BOOT_CS` = 0x10 and `__BOOT_DS` = 0x18 with flat 4 GiB
//! segments (boot.rst, "32-bit boot protocol"); the 64-bit entry wants a long-mode code
//! segment at the same selector.

use kvm_bindings::kvm_segment;

/// Selector index of the code segment (selector 0x10).
pub const CODE_INDEX: u8 = 2;
/// Selector index of the data segment (selector 0x18).
pub const DATA_INDEX: u8 = 3;
/// Selector index of the TSS (selector 0x08), in the slot the boot protocol leaves free.
pub const TSS_INDEX: u8 = 1;

/// Builds a GDT descriptor from its flags (the access byte in bits 0..8 and the
/// granularity nibble in bits 12..16, the layout Firecracker and CH use), base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn get_base(entry: u64) -> u64 {
    (((entry) & 0xff00_0000_0000_0000) >> 32)
        | (((entry) & 0x0000_00ff_0000_0000) >> 16)
        | (((entry) & 0x0000_0000_ffff_0000) >> 16)
}

fn get_limit(entry: u64) -> u32 {
    let limit =
        ((((entry) & 0x000f_0000_0000_0000) >> 32) | ((entry) & 0x0000_0000_0000_ffff)) as u32;
    // With the granularity bit set the limit counts 4 KiB pages.
    if get_g(entry) == 1 {
        (limit << 12) | 0xfff
    } else {
        limit
    }
}

fn get_g(entry: u64) -> u8 {
    ((entry & 0x0080_0000_0000_0000) >> 55) as u8
}
fn get_db(entry: u64) -> u8 {
    ((entry & 0x0040_0000_0000_0000) >> 54) as u8
}
fn get_l(entry: u64) -> u8 {
    ((entry & 0x0020_0000_0000_0000) >> 53) as u8
}
fn get_avl(entry: u64) -> u8 {
    ((entry & 0x0010_0000_0000_0000) >> 52) as u8
}
fn get_p(entry: u64) -> u8 {
    ((entry & 0x0000_8000_0000_0000) >> 47) as u8
}
fn get_dpl(entry: u64) -> u8 {
    ((entry & 0x0000_6000_0000_0000) >> 45) as u8
}
fn get_s(entry: u64) -> u8 {
    ((entry & 0x0000_1000_0000_0000) >> 44) as u8
}
fn get_type(entry: u64) -> u8 {
    ((entry & 0x0000_0f00_0000_0000) >> 40) as u8
}

/// The `kvm_segment` that loading selector `table_index * 8` with descriptor `entry` gives.
pub fn kvm_segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    kvm_segment {
        base: get_base(entry),
        limit: get_limit(entry),
        selector: u16::from(table_index) * 8,
        type_: get_type(entry),
        present: get_p(entry),
        dpl: get_dpl(entry),
        db: get_db(entry),
        s: get_s(entry),
        l: get_l(entry),
        g: get_g(entry),
        avl: get_avl(entry),
        padding: 0,
        unusable: u8::from(get_p(entry) == 0),
    }
}

/// Which entry path the vCPU starts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootMode {
    /// 32-bit protected mode, paging off (bzImage `code32_start`).
    Protected32,
    /// 64-bit long mode with the first GiB identity-mapped (ELF vmlinux, `startup_64`).
    Long64,
}

/// The boot GDT for `mode`: null, TSS (0x08), code (0x10), data (0x18); 32 bytes, so it fits
/// between [`crate::layout::BOOT_GDT_START`] and the IDT.
pub fn boot_gdt(mode: BootMode) -> [u64; crate::layout::BOOT_GDT_MAX] {
    let code = match mode {
        // Present, ring 0, code execute/read accessed; 4 KiB granularity; D = 1 (32-bit).
        BootMode::Protected32 => gdt_entry(0xc09b, 0, 0xfffff),
        // As above with L = 1 and D = 0 (64-bit code).
        BootMode::Long64 => gdt_entry(0xa09b, 0, 0xfffff),
    };
    [
        0,
        // Present, 32/64-bit busy TSS.
        gdt_entry(0x808b, 0, 0xfffff),
        code,
        // Present, ring 0, data read/write accessed; 4 KiB granularity; B = 1.
        gdt_entry(0xc093, 0, 0xfffff),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_32bit_code_descriptor() {
        let gdt = boot_gdt(BootMode::Protected32);
        assert_eq!(gdt[2], 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt[3], 0x00cf_9300_0000_ffff);
        let cs = kvm_segment_from_gdt(gdt[2], CODE_INDEX);
        assert_eq!(cs.selector, 0x10);
        assert_eq!((cs.base, cs.limit), (0, 0xffff_ffff));
        assert_eq!((cs.type_, cs.s, cs.present, cs.dpl), (0xb, 1, 1, 0));
        assert_eq!((cs.db, cs.l, cs.g, cs.unusable), (1, 0, 1, 0));
    }

    #[test]
    fn long_mode_code_descriptor() {
        let gdt = boot_gdt(BootMode::Long64);
        assert_eq!(gdt[2], 0x00af_9b00_0000_ffff);
        let cs = kvm_segment_from_gdt(gdt[2], CODE_INDEX);
        assert_eq!((cs.l, cs.db), (1, 0));
        let ds = kvm_segment_from_gdt(gdt[3], DATA_INDEX);
        assert_eq!((ds.selector, ds.type_, ds.db, ds.l), (0x18, 0x3, 1, 0));
    }

    #[test]
    fn tss_descriptor() {
        let tss = kvm_segment_from_gdt(boot_gdt(BootMode::Long64)[1], TSS_INDEX);
        assert_eq!(
            (tss.selector, tss.type_, tss.s, tss.present),
            (0x08, 0xb, 0, 1)
        );
        assert_eq!((tss.g, tss.limit), (1, 0xffff_ffff));
    }

    #[test]
    fn base_and_limit_round_trip() {
        let e = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        let s = kvm_segment_from_gdt(e, 1);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcde);
        assert_eq!(s.g, 0);
    }

    #[test]
    fn null_descriptor_is_unusable() {
        assert_eq!(kvm_segment_from_gdt(0, 0).unusable, 1);
    }
}
