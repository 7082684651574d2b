//! The MSRs a vCPU gets at boot: the SYSENTER/SYSCALL set and the TSC zeroed, fast strings
//! enabled in IA32_MISC_ENABLE, and MTRRs defaulting to write-back.
//!
//! Every vCPU gets the same list ([`setup_msrs`] takes no vCPU index), so it holds no MSR
//! whose value must differ between vCPUs: IA32_APIC_BASE (its BSP flag is set by KVM, on
//! the vCPU with id 0), IA32_TSC_AUX (Linux writes each CPU's number there itself) and the
//! x2APIC registers stay KVM's and the guest's. IA32_TSC is written 0 on every vCPU: KVM
//! takes a host write of 0 as a request to synchronize (`kvm_synchronize_tsc`, "force
//! synchronization when creating a vCPU, or when userspace explicitly writes a zero
//! value"), so all vCPUs share one TSC offset and their TSCs run in step, which Linux
//! checks as it brings each AP up (`check_tsc_sync_source`) before it trusts the TSC.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use crate::{Error, Result};

/// IA32_TSC.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_SYSENTER_CS.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// IA32_SYSENTER_ESP.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// IA32_SYSENTER_EIP.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// IA32_MISC_ENABLE.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MISC_ENABLE bit 0: fast-string operations (REP MOVS/STOS) enabled.
pub const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 0x1;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled (bit 11), default type write-back (6).
pub const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 0x6;
/// STAR: SYSCALL segment selectors.
pub const MSR_STAR: u32 = 0xc000_0081;
/// LSTAR: 64-bit SYSCALL target.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// CSTAR: compatibility-mode SYSCALL target.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// SFMASK: SYSCALL RFLAGS mask.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// KERNEL_GS_BASE: the GS base SWAPGS exchanges.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// The boot MSR entries, in the order they are set.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
}

/// Sets the boot MSRs on `vcpu`; all of them must be accepted.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<()> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(|_| Error::MsrsFull)?;
    let set = vcpu.set_msrs(&msrs).map_err(Error::SetMsrs)?;
    if set != entries.len() {
        let failed = entries.get(set).map(|e| e.index).unwrap_or(0);
        return Err(Error::MsrRefused(failed));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msr_list() {
        let list = boot_msr_entries();
        let get = |i| list.iter().find(|e| e.index == i).map(|e| e.data);
        assert_eq!(get(MSR_IA32_MISC_ENABLE), Some(1));
        assert_eq!(get(MSR_MTRR_DEF_TYPE), Some(0x806));
        for msr in [
            MSR_IA32_SYSENTER_CS,
            MSR_IA32_SYSENTER_ESP,
            MSR_IA32_SYSENTER_EIP,
            MSR_STAR,
            MSR_LSTAR,
            MSR_CSTAR,
            MSR_SYSCALL_MASK,
            MSR_KERNEL_GS_BASE,
            MSR_IA32_TSC,
        ] {
            assert_eq!(get(msr), Some(0), "msr {msr:#x}");
        }
        // No duplicates.
        let mut idx: Vec<u32> = list.iter().map(|e| e.index).collect();
        idx.sort_unstable();
        idx.dedup();
        assert_eq!(idx.len(), list.len());
        assert!(Msrs::from_entries(&list).is_ok());
    }

    #[test]
    fn boot_msrs_hold_no_per_vcpu_value() {
        // The one list goes to every vCPU, so an MSR whose value must differ between vCPUs
        // would be wrong on all but one of them.
        const IA32_APIC_BASE: u32 = 0x1b; // BSP flag: the boot CPU only
        const IA32_TSC_AUX: u32 = 0xc000_0103; // the CPU number, for RDTSCP/RDPID
        const X2APIC_MSRS: std::ops::RangeInclusive<u32> = 0x800..=0x8ff; // x2APIC id, LVTs
        for e in boot_msr_entries() {
            assert!(
                e.index != IA32_APIC_BASE
                    && e.index != IA32_TSC_AUX
                    && !X2APIC_MSRS.contains(&e.index),
                "per-vCPU msr {:#x} in the shared boot list",
                e.index
            );
        }
        // The TSC is written, and 0: KVM synchronizes the vCPUs' TSCs on a zero write, any
        // other value written vCPU by vCPU would leave them apart.
        let tsc: Vec<_> = boot_msr_entries()
            .into_iter()
            .filter(|e| e.index == MSR_IA32_TSC)
            .map(|e| e.data)
            .collect();
        assert_eq!(tsc, vec![0]);
    }
}
