//! Boot-time x86_64 state for a Linux guest on KVM.
//!
//! Everything the VMM must set before the first `KVM_RUN` so that a Linux kernel starts the
//! way the x86 boot protocol promises: the guest memory map ([`layout`]), the GDT and
//! segment registers, CR0/CR4/EFER and identity-mapping page tables for the 64-bit entry,
//! the CPUID the vCPU reports, its boot MSRs, LAPIC LINT0/LINT1, the FPU, the kernel and
//! initrd loaded into memory, the zero page with its e820 map, and the ACPI tables
//! ([`acpi`]).
//!
//! Each piece is a pure function over guest memory and `kvm_bindings` structs (testable
//! without /dev/kvm) plus a thin `setup_*` wrapper that issues the ioctl. This crate does not
//! create VMs, vCPUs or memory slots; the caller does.
//!
//! ```
//! use tvm_arch_x86::{layout, BootMode};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! let ram = layout::ram_ranges(64 << 20);
//! let ranges: Vec<_> = ram.iter().map(|(a, l)| (*a, *l as usize)).collect();
//! let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
//! let mut sregs = kvm_bindings::kvm_sregs::default();
//! tvm_arch_x86::configure_sregs(&mem, &mut sregs, BootMode::Long64).unwrap();
//! assert_eq!(sregs.cr3, layout::PML4_START.0);
//! ```

#![deny(missing_docs)]
#![deny(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod acpi;
mod boot;
mod cpuid;
mod gdt;
mod lapic;
pub mod layout;
mod msr;
mod regs;
pub mod snapshot;
mod topology;

pub use boot::{
    build_boot_params, build_cmdline, check_kernel, detect_kernel_format, e820_entries,
    initrd_load_addr, load_cmdline, load_initrd, load_kernel, write_boot_params, BootParamsConfig,
    KernelFormat, LoadedKernel, E820_RAM, E820_RESERVED,
};
pub use cpuid::{
    enable_tsc_deadline, filter_cpuid, find_entry, setup_cpuid, vcpu_cpuid, KVM_CPUID_FEATURES,
    KVM_CPUID_SIGNATURE,
};
pub use gdt::{boot_gdt, gdt_entry, kvm_segment_from_gdt, BootMode};
pub use lapic::{configure_lint, setup_lint};
pub use msr::{boot_msr_entries, setup_msrs};
pub use regs::{
    boot_fpu, boot_regs, configure_sregs, setup_fpu, setup_regs, setup_sregs,
    write_identity_page_tables, EFER_LMA, EFER_LME, X86_CR0_ET, X86_CR0_PE, X86_CR0_PG,
    X86_CR4_PAE,
};
pub use topology::{CpuTopology, MAX_XAPIC_ID};

use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The GDT does not fit in guest memory.
    #[error("failed to write the boot GDT into guest memory")]
    WriteGdt,
    /// The IDT does not fit in guest memory.
    #[error("failed to write the boot IDT into guest memory")]
    WriteIdt,
    /// The page tables do not fit in guest memory.
    #[error("failed to write the identity-mapping page tables into guest memory")]
    WritePageTables,
    /// KVM_GET_SREGS failed.
    #[error("failed to get the vcpu's special registers")]
    GetSregs(#[source] kvm_ioctls::Error),
    /// KVM_SET_SREGS failed.
    #[error("failed to set the vcpu's special registers")]
    SetSregs(#[source] kvm_ioctls::Error),
    /// KVM_SET_REGS failed.
    #[error("failed to set the vcpu's general-purpose registers")]
    SetRegs(#[source] kvm_ioctls::Error),
    /// KVM_SET_FPU failed.
    #[error("failed to set the vcpu's fpu state")]
    SetFpu(#[source] kvm_ioctls::Error),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("failed to get the cpuid kvm supports")]
    GetSupportedCpuid(#[source] kvm_ioctls::Error),
    /// KVM_SET_CPUID2 failed.
    #[error("failed to set the vcpu's cpuid")]
    SetCpuid(#[source] kvm_ioctls::Error),
    /// No room for another CPUID entry.
    #[error("too many cpuid entries")]
    CpuidFull,
    /// The MSR list does not fit a `kvm_msrs`.
    #[error("too many boot msrs")]
    MsrsFull,
    /// KVM_SET_MSRS failed.
    #[error("failed to set the vcpu's boot msrs")]
    SetMsrs(#[source] kvm_ioctls::Error),
    /// KVM accepted only part of the MSR list.
    #[error("kvm refused msr {0:#x}")]
    MsrRefused(u32),
    /// Reading part of a vCPU's or the VM's state for a snapshot failed.
    #[error("failed to save the {what}")]
    SaveState {
        /// Which part.
        what: &'static str,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM refused part of a snapshot's vCPU or VM state.
    #[error("kvm refused the saved {what}")]
    RestoreState {
        /// Which part.
        what: &'static str,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A saved irqchip is not the chip it stands for.
    #[error("saved irqchip {found} stands where chip {expected} belongs")]
    WrongIrqchip {
        /// The chip id in the snapshot.
        found: u32,
        /// The one expected there.
        expected: u32,
    },
    /// KVM_GET_LAPIC failed.
    #[error("failed to get the vcpu's local apic state")]
    GetLapic(#[source] kvm_ioctls::Error),
    /// KVM_SET_LAPIC failed.
    #[error("failed to set the vcpu's local apic state")]
    SetLapic(#[source] kvm_ioctls::Error),
    /// The kernel image could not be read.
    #[error("failed to read the kernel image")]
    ReadKernel(#[source] std::io::Error),
    /// Neither an ELF vmlinux nor a bzImage.
    #[error("the kernel image is neither an ELF vmlinux nor a bzImage")]
    UnknownKernelFormat,
    /// An ELF kernel segment would be loaded below 1 MiB, where the boot structures go, or
    /// copies more bytes than its memory size.
    #[error("the ELF kernel has a segment at {paddr:#x} of {filesz:#x} bytes ({memsz:#x} in memory): segments must start at or above 1 MiB and not be larger in the file than in memory")]
    InvalidElfSegment {
        /// Its physical address.
        paddr: u64,
        /// Bytes in the file.
        filesz: u64,
        /// Bytes in memory.
        memsz: u64,
    },
    /// linux-loader refused or failed to load the kernel.
    #[error("failed to load the kernel image into guest memory")]
    LoadKernel(#[source] linux_loader::loader::Error),
    /// The initrd could not be read.
    #[error("failed to read the initrd")]
    ReadInitrd(#[source] std::io::Error),
    /// The initrd could not be copied into guest memory.
    #[error("failed to copy the initrd into guest memory")]
    CopyInitrd,
    /// The initrd does not fit.
    #[error("the initrd ({size} bytes) does not fit in guest memory: {available} bytes are free between the kernel and the initrd limit; give the guest more memory")]
    InitrdTooLarge {
        /// Size of the initrd.
        size: u64,
        /// Room there was.
        available: u64,
    },
    /// The initrd ended up above 4 GiB, which boot_params cannot express.
    #[error("initrd address {0:#x} does not fit the 32-bit boot_params field")]
    InitrdAddress(u64),
    /// The command line is longer than the kernel accepts.
    #[error("the kernel command line is {len} bytes, longer than the kernel's limit of {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// linux-loader refused the command line.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line could not be written into guest memory.
    #[error("failed to write the kernel command line into guest memory")]
    LoadCmdline(#[source] linux_loader::loader::Error),
    /// More e820 entries than boot_params holds.
    #[error("too many e820 entries")]
    E820Full,
    /// The zero page could not be written.
    #[error("failed to write boot_params into guest memory")]
    WriteBootParams(#[source] linux_loader::configurator::Error),
    /// The zero page did not read back.
    #[error("boot_params did not read back from guest memory")]
    ZeroPageMissing,
    /// A vCPU topology that cannot be built.
    #[error("invalid vcpu topology: {0}")]
    InvalidTopology(String),
    /// The ACPI tables do not fit in the room reserved for them.
    #[error("the acpi tables need {size} bytes, more than the {room} bytes reserved for them")]
    AcpiTablesTooLarge {
        /// Bytes needed.
        size: u64,
        /// Bytes available.
        room: u64,
    },
    /// An ACPI table could not be written into guest memory.
    #[error("failed to write an acpi table into guest memory at {0:#x}")]
    WriteAcpiTables(u64),
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What [`configure_vcpu`] needs.
#[derive(Clone, Copy, Debug)]
pub struct VcpuBootConfig {
    /// Index of this vCPU (0 is the boot CPU); its APIC id comes from `topology`.
    pub index: u8,
    /// The VM's vCPU topology.
    pub topology: CpuTopology,
    /// Kernel entry point (used by the boot CPU only).
    pub entry: GuestAddress,
    /// Entry mode (the boot CPU's).
    pub mode: BootMode,
    /// Whether the in-kernel irqchip exists (LINT0/LINT1 need it).
    pub irqchip: bool,
}

impl VcpuBootConfig {
    /// Whether this is the boot CPU.
    pub fn is_boot_cpu(&self) -> bool {
        self.index == 0
    }
}

/// Sets all boot state of `vcpu`: CPUID for its place in the topology (with the
/// TSC-deadline timer when there is an irqchip), MSRs, the FPU and, with an irqchip,
/// LINT0/LINT1 (ExtINT on LINT0 for the boot CPU only, NMI on LINT1 for all).
///
/// Only the boot CPU gets the entry registers and segments. The application processors
/// keep KVM's reset state: with the in-kernel irqchip KVM creates them in
/// `KVM_MP_STATE_UNINITIALIZED`, and they start when the guest sends them INIT and
/// SIPI through its local APIC, as on hardware.
pub fn configure_vcpu<M: GuestMemoryBackend>(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    mem: &M,
    cfg: &VcpuBootConfig,
) -> Result<()> {
    setup_cpuid(kvm, vcpu, &cfg.topology, cfg.index, cfg.irqchip)?;
    setup_msrs(vcpu)?;
    if cfg.is_boot_cpu() {
        setup_regs(vcpu, cfg.entry, layout::ZERO_PAGE_START)?;
        setup_sregs(vcpu, mem, cfg.mode)?;
    }
    setup_fpu(vcpu)?;
    if cfg.irqchip {
        setup_lint(vcpu, cfg.is_boot_cpu())?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) fn test_mem(size: usize) -> vm_memory::GuestMemoryMmap<()> {
    vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}
