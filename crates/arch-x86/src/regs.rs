//! General-purpose registers, special registers (segments, control registers, EFER), the
//! FPU, the boot GDT/IDT and the identity-mapping page tables.
//!
//! Compute, then apply: `configure_sregs`, `boot_regs` and `boot_fpu` are pure functions
//! over guest memory and `kvm_bindings` structs; `setup_*` are the thin ioctl wrappers.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::gdt::{boot_gdt, kvm_segment_from_gdt, BootMode, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use crate::layout::{
    BOOT_GDT_MAX, BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START,
    PML4_START,
};
use crate::{Error, Result};

/// CR0.PE: protected mode.
pub const X86_CR0_PE: u64 = 0x1;
/// CR0.ET: extension type (always 1 on modern CPUs).
pub const X86_CR0_ET: u64 = 0x10;
/// CR0.PG: paging.
pub const X86_CR0_PG: u64 = 0x8000_0000;
/// CR4.PAE: physical address extension, required for long mode.
pub const X86_CR4_PAE: u64 = 0x20;
/// EFER.LME: long mode enable.
pub const EFER_LME: u64 = 0x100;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 0x400;

/// Writes the boot GDT for `mode` at [`BOOT_GDT_START`] and a zero IDT entry at
/// [`BOOT_IDT_START`].
pub fn write_gdt_idt<M: GuestMemoryBackend>(mem: &M, mode: BootMode) -> Result<()> {
    for (i, entry) in boot_gdt(mode).iter().enumerate() {
        let addr = BOOT_GDT_START
            .checked_add(i as u64 * 8)
            .ok_or(Error::WriteGdt)?;
        mem.write_obj(*entry, addr).map_err(|_| Error::WriteGdt)?;
    }
    mem.write_obj(0u64, BOOT_IDT_START)
        .map_err(|_| Error::WriteIdt)?;
    Ok(())
}

/// Writes 4-level page tables that identity-map the first GiB with 2 MiB pages:
/// `PML4[0] -> PDPT`, `PDPT[0] -> PD`, `PD[i] = i * 2 MiB` (present, writable, page size).
pub fn write_identity_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<()> {
    // Present | writable.
    mem.write_obj(PDPTE_START.raw_value() | 0x03, PML4_START)
        .map_err(|_| Error::WritePageTables)?;
    mem.write_obj(PDE_START.raw_value() | 0x03, PDPTE_START)
        .map_err(|_| Error::WritePageTables)?;
    for i in 0..512u64 {
        // Present | writable | page size (2 MiB).
        mem.write_obj((i << 21) | 0x83, PDE_START.unchecked_add(i * 8))
            .map_err(|_| Error::WritePageTables)?;
    }
    Ok(())
}

/// Fills `sregs` for entry in `mode` and writes what the registers point at (GDT, IDT and,
/// for long mode, the page tables) into `mem`.
pub fn configure_sregs<M: GuestMemoryBackend>(
    mem: &M,
    sregs: &mut kvm_sregs,
    mode: BootMode,
) -> Result<()> {
    write_gdt_idt(mem, mode)?;
    let gdt = boot_gdt(mode);
    let code = kvm_segment_from_gdt(gdt[usize::from(CODE_INDEX)], CODE_INDEX);
    let data = kvm_segment_from_gdt(gdt[usize::from(DATA_INDEX)], DATA_INDEX);
    let tss = kvm_segment_from_gdt(gdt[usize::from(TSS_INDEX)], TSS_INDEX);

    sregs.gdt.base = BOOT_GDT_START.raw_value();
    sregs.gdt.limit = (std::mem::size_of::<u64>() * BOOT_GDT_MAX) as u16 - 1;
    sregs.idt.base = BOOT_IDT_START.raw_value();
    sregs.idt.limit = std::mem::size_of::<u64>() as u16 - 1;

    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.cr0 = (sregs.cr0 | X86_CR0_PE | X86_CR0_ET) & !X86_CR0_PG;
    match mode {
        BootMode::Protected32 => {
            sregs.cr3 = 0;
            sregs.cr4 &= !X86_CR4_PAE;
            sregs.efer &= !(EFER_LME | EFER_LMA);
        }
        BootMode::Long64 => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START.raw_value();
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    Ok(())
}

/// General-purpose registers at kernel entry: RIP at `entry`, RSI at the zero page
/// (both boot protocols pass `boot_params` there), interrupts off (RFLAGS bit 1 is reserved
/// and must be set).
pub fn boot_regs(entry: GuestAddress, boot_params: GuestAddress) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.raw_value(),
        rsp: BOOT_STACK_POINTER.raw_value(),
        rbp: BOOT_STACK_POINTER.raw_value(),
        rsi: boot_params.raw_value(),
        ..Default::default()
    }
}

/// The FPU state after FNINIT, with the default MXCSR (all SSE exceptions masked).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Sets the special registers of `vcpu` for `mode` (see [`configure_sregs`]).
pub fn setup_sregs<M: GuestMemoryBackend>(vcpu: &VcpuFd, mem: &M, mode: BootMode) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(Error::GetSregs)?;
    configure_sregs(mem, &mut sregs, mode)?;
    vcpu.set_sregs(&sregs).map_err(Error::SetSregs)
}

/// Sets the general-purpose registers of `vcpu` (see [`boot_regs`]).
pub fn setup_regs(vcpu: &VcpuFd, entry: GuestAddress, boot_params: GuestAddress) -> Result<()> {
    vcpu.set_regs(&boot_regs(entry, boot_params))
        .map_err(Error::SetRegs)
}

/// Sets the FPU of `vcpu` (see [`boot_fpu`]).
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<()> {
    vcpu.set_fpu(&boot_fpu()).map_err(Error::SetFpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_mem;

    #[test]
    fn protected_mode_sregs() {
        let mem = test_mem(0x10_0000);
        let mut sregs = kvm_sregs {
            cr0: X86_CR0_PG,
            cr4: X86_CR4_PAE,
            efer: EFER_LME,
            ..Default::default()
        };
        configure_sregs(&mem, &mut sregs, BootMode::Protected32).unwrap();
        assert_eq!(sregs.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE);
        assert_eq!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), 0);
        assert_eq!((sregs.cs.selector, sregs.cs.db, sregs.cs.l), (0x10, 1, 0));
        assert_eq!(sregs.ds.selector, 0x18);
        assert_eq!(sregs.ss.selector, 0x18);
        assert_eq!(sregs.tr.selector, 0x08);
        assert_eq!(sregs.gdt.base, 0x500);
        assert_eq!(sregs.gdt.limit, 31);
        // The GDT in memory is the one the segments were derived from.
        let cs: u64 = mem.read_obj(GuestAddress(0x510)).unwrap();
        assert_eq!(cs, 0x00cf_9b00_0000_ffff);
        let ds: u64 = mem.read_obj(GuestAddress(0x518)).unwrap();
        assert_eq!(ds, 0x00cf_9300_0000_ffff);
        // No page tables were written.
        let pml4: u64 = mem.read_obj(PML4_START).unwrap();
        assert_eq!(pml4, 0);
    }

    #[test]
    fn long_mode_sregs_and_page_tables() {
        let mem = test_mem(0x10_0000);
        let mut sregs = kvm_sregs::default();
        configure_sregs(&mem, &mut sregs, BootMode::Long64).unwrap();
        assert_eq!(
            sregs.cr0 & (X86_CR0_PE | X86_CR0_PG),
            X86_CR0_PE | X86_CR0_PG
        );
        assert_eq!(sregs.cr4 & X86_CR4_PAE, X86_CR4_PAE);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr3, 0x9000);
        assert_eq!((sregs.cs.l, sregs.cs.db), (1, 0));
        let cs: u64 = mem.read_obj(GuestAddress(0x510)).unwrap();
        assert_eq!(cs, 0x00af_9b00_0000_ffff);

        let pml4: u64 = mem.read_obj(GuestAddress(0x9000)).unwrap();
        assert_eq!(pml4, 0xa003);
        let pdpt: u64 = mem.read_obj(GuestAddress(0xa000)).unwrap();
        assert_eq!(pdpt, 0xb003);
        for i in [0u64, 1, 255, 511] {
            let pde: u64 = mem.read_obj(GuestAddress(0xb000 + i * 8)).unwrap();
            assert_eq!(pde, (i << 21) | 0x83, "pd entry {i}");
        }
    }

    #[test]
    fn entry_registers() {
        let regs = boot_regs(GuestAddress(0x10_0000), GuestAddress(0x7000));
        assert_eq!(regs.rip, 0x10_0000);
        assert_eq!(regs.rsi, 0x7000);
        assert_eq!(regs.rflags, 2);
        assert_eq!(regs.rsp, BOOT_STACK_POINTER.raw_value());
        let fpu = boot_fpu();
        assert_eq!((fpu.fcw, fpu.mxcsr), (0x37f, 0x1f80));
    }

    #[test]
    fn too_small_memory_is_an_error() {
        let mem = test_mem(0x1000);
        let mut sregs = kvm_sregs::default();
        assert!(matches!(
            configure_sregs(&mem, &mut sregs, BootMode::Long64),
            Err(Error::WritePageTables)
        ));
    }
}
