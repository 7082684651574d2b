//! CPUID for a vCPU: KVM's supported set, adjusted per vCPU.
//!
//! Start from `KVM_GET_SUPPORTED_CPUID`, then set what only the VMM knows: the APIC id and
//! topology, the hypervisor bit, and the KVM signature leaf (Linux looks for "KVMKVMKV" at
//! 0x4000_0000 to enable kvmclock and the other paravirt features), and the LAPIC's
//! TSC-deadline mode when KVM emulates it.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use kvm_ioctls::{Cap, Kvm, VcpuFd};

use crate::{CpuTopology, Error, Result};

/// Leaf 0x1 ECX bit 31: running under a hypervisor.
pub const ECX_HYPERVISOR_BIT: u32 = 1 << 31;
/// Leaf 0x1 ECX bit 24: the local APIC timer has TSC-deadline mode.
pub const ECX_TSC_DEADLINE_BIT: u32 = 1 << 24;
/// Leaf 0x1 EDX bit 28: HTT (more than one logical processor per package).
pub const EDX_HTT_BIT: u32 = 1 << 28;
/// The KVM signature leaf.
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// The KVM paravirt features leaf (the highest hypervisor leaf we expose).
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// Most entries KVM returns (KVM_MAX_CPUID_ENTRIES).
pub const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;

/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX: the 12 bytes Linux's `hypervisor_cpuid_base`
/// compares with KVM_SIGNATURE (include/uapi/linux/kvm_para.h).
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// Whether leaf 0 names an AMD (or Hygon, AMD's licensee) CPU: AMD's topology leaves apply.
fn is_amd(cpuid: &CpuId) -> bool {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .is_some_and(|e| {
            let vendor = [e.ebx, e.edx, e.ecx];
            vendor == AMD_VENDOR || vendor == HYGON_VENDOR
        })
}

/// "AuthenticAMD" as EBX, EDX, ECX of leaf 0.
const AMD_VENDOR: [u32; 3] = [0x6874_7541, 0x6974_6e65, 0x444d_4163];
/// "HygonGenuine" as EBX, EDX, ECX of leaf 0.
const HYGON_VENDOR: [u32; 3] = [0x6f67_7948, 0x6e65_476e, 0x656e_6975];

/// `(1 << bits) - 1`, for the "maximum addressable ids - 1" fields.
fn id_mask(bits: u32) -> u32 {
    (1u32 << bits) - 1
}

/// Adjusts `cpuid` for vCPU `index` of the VM's `topology`: its APIC id in leaves 0x1,
/// 0xB, 0x1F and (AMD) 0x8000_001E, and the topology in every leaf Linux reads it from
/// (0x1, 0x4, 0xB, 0x1F; AMD's 0x8000_0001, 0x8000_0008, 0x8000_001D, 0x8000_001E), so
/// that they agree with each other and with the MADT.
pub fn filter_cpuid(cpuid: &mut CpuId, topology: &CpuTopology, index: u8) -> Result<()> {
    let apic_id = u32::from(topology.apic_id(index));
    let (socket, _, _) = topology.position(index);
    let thread_bits = topology.thread_bits();
    let socket_shift = topology.socket_shift();
    let per_socket = topology.threads_per_socket();
    let per_core = u32::from(topology.threads_per_core());
    let amd = is_amd(cpuid);
    let mut has_signature = false;
    for entry in cpuid.as_mut_slice().iter_mut() {
        match entry.function {
            0x1 => {
                // EBX[31:24] initial APIC id, [23:16] logical processors per package,
                // [15:8] CLFLUSH line size in 8-byte units.
                entry.ebx = (apic_id << 24) | (per_socket << 16) | (8 << 8) | (entry.ebx & 0xff);
                entry.ecx |= ECX_HYPERVISOR_BIT;
                if per_socket > 1 {
                    entry.edx |= EDX_HTT_BIT;
                } else {
                    entry.edx &= !EDX_HTT_BIT;
                }
            }
            0x4 => {
                // Deterministic cache parameters: EAX[31:26] = addressable core ids in the
                // package - 1, EAX[25:14] = addressable ids sharing this cache - 1 (L1 and
                // L2 per core, L3 per package). Linux derives the cache ids from these.
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 {
                    id_mask(socket_shift)
                } else {
                    id_mask(thread_bits)
                };
                entry.eax &= 0x3fff;
                if entry.eax & 0x1f != 0 {
                    entry.eax |= (id_mask(topology.core_bits()) << 26) | (sharing << 14);
                }
            }
            0x6 => {
                // Thermal and power management: nothing of it is emulated.
                entry.eax = 0;
                entry.ecx &= 0x1; // keep only "hardware coordination feedback" capability bit 0
            }
            0xa => {
                // Architectural performance monitoring: no vPMU.
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            0xb | 0x1f => {
                // Extended topology: level 0 is SMT, level 1 is the core, then nothing
                // (no dies). EAX = APIC id bits below the next level, EBX = logical
                // processors at this level, ECX = level type << 8 | level, EDX = x2APIC id.
                entry.edx = apic_id;
                match entry.index {
                    0 => {
                        entry.eax = thread_bits;
                        entry.ebx = per_core;
                        entry.ecx = (1 << 8) | entry.index;
                    }
                    1 => {
                        entry.eax = socket_shift;
                        entry.ebx = per_socket;
                        entry.ecx = (2 << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            0x8000_0001 if amd => {
                // ECX bit 1, CmpLegacy: more than one logical processor per package.
                if per_socket > 1 {
                    entry.ecx |= 1 << 1;
                } else {
                    entry.ecx &= !(1 << 1);
                }
            }
            0x8000_0008 if amd => {
                // ECX[15:12] ApicIdSize (APIC id bits for the threads of a package),
                // [7:0] NC (threads per package - 1); the rest is kept.
                entry.ecx = (entry.ecx & !0xf0ff) | (socket_shift << 12) | (per_socket - 1);
            }
            0x8000_001d if amd => {
                // AMD's cache topology: EAX[25:14] = threads sharing this cache - 1.
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 { per_socket } else { per_core };
                entry.eax &= !(0xfff << 14);
                if entry.eax & 0x1f != 0 {
                    entry.eax |= (sharing - 1) << 14;
                }
            }
            0x8000_001e if amd => {
                // EAX extended APIC id; EBX[15:8] threads per core - 1, [7:0] core id;
                // ECX[10:8] nodes per package - 1 (one), [7:0] node id (the socket).
                entry.eax = apic_id;
                entry.ebx = ((per_core - 1) << 8) | ((apic_id >> thread_bits) & 0xff);
                entry.ecx = socket & 0xff;
                entry.edx = 0;
            }
            KVM_CPUID_SIGNATURE => {
                entry.eax = KVM_CPUID_FEATURES;
                entry.ebx = KVM_SIGNATURE[0];
                entry.ecx = KVM_SIGNATURE[1];
                entry.edx = KVM_SIGNATURE[2];
                has_signature = true;
            }
            _ => {}
        }
    }
    if !has_signature {
        cpuid
            .push(kvm_cpuid_entry2 {
                function: KVM_CPUID_SIGNATURE,
                index: 0,
                flags: 0,
                eax: KVM_CPUID_FEATURES,
                ebx: KVM_SIGNATURE[0],
                ecx: KVM_SIGNATURE[1],
                edx: KVM_SIGNATURE[2],
                ..Default::default()
            })
            .map_err(|_| Error::CpuidFull)?;
    }
    Ok(())
}

/// Advertises the local APIC timer's TSC-deadline mode in leaf 0x1.
///
/// KVM emulates it in its in-kernel LAPIC whenever it has `KVM_CAP_TSC_DEADLINE_TIMER`,
/// but leaves the bit out of `KVM_GET_SUPPORTED_CPUID` because it depends on that LAPIC;
/// the VMM sets it, as QEMU and Firecracker do. With it Linux uses the LAPIC timer without
/// calibrating it against the PIT first: that calibration's verification fails now and
/// then under nested TCG, and the kernel then falls back to the PIT's periodic tick.
pub fn enable_tsc_deadline(cpuid: &mut CpuId) {
    for entry in cpuid.as_mut_slice().iter_mut() {
        if entry.function == 0x1 {
            entry.ecx |= ECX_TSC_DEADLINE_BIT;
        }
    }
}

/// Looks up leaf `function`/`index` in `cpuid`.
pub fn find_entry(cpuid: &CpuId, function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    cpuid.as_slice().iter().find(|e| {
        e.function == function
            && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == index)
    })
}

/// Reads KVM's supported CPUID, filters it for vCPU `index` of `topology` and sets it on
/// `vcpu`. With an
/// in-kernel LAPIC (`lapic_in_kernel`) and KVM's support, the TSC-deadline timer is
/// advertised too ([`enable_tsc_deadline`]).
pub fn setup_cpuid(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    topology: &CpuTopology,
    index: u8,
    lapic_in_kernel: bool,
) -> Result<()> {
    let mut cpuid = kvm
        .get_supported_cpuid(MAX_CPUID_ENTRIES)
        .map_err(Error::GetSupportedCpuid)?;
    filter_cpuid(&mut cpuid, topology, index)?;
    if lapic_in_kernel && kvm.check_extension(Cap::TscDeadlineTimer) {
        enable_tsc_deadline(&mut cpuid);
    }
    vcpu.set_cpuid2(&cpuid).map_err(Error::SetCpuid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(n: u8) -> CpuTopology {
        CpuTopology::flat(n).unwrap()
    }

    fn entry(function: u32, index: u32, flags: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// A fixed, trimmed-down KVM_GET_SUPPORTED_CPUID answer.
    fn fixed_input() -> CpuId {
        let sig = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        CpuId::from_entries(&[
            entry(0x0, 0, 0, [0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
            entry(
                0x1,
                0,
                0,
                [0x00a0_0f11, 0x0a10_0800, 0x7ed8_320b, 0x178b_fbff],
            ),
            entry(0x6, 0, 0, [0x4, 0, 0x1, 0]),
            entry(0xa, 0, 0, [0x0760_0001, 0, 0, 0]),
            entry(0xb, 0, sig, [1, 2, 0x100, 7]),
            entry(0xb, 1, sig, [4, 16, 0x201, 7]),
            entry(0x8000_0000, 0, 0, [0x8000_0021, 0, 0, 0]),
        ])
        .unwrap()
    }

    #[test]
    fn leaf1_apic_id_and_hypervisor_bit() {
        let mut c = fixed_input();
        filter_cpuid(&mut c, &flat(1), 0).unwrap();
        let l1 = find_entry(&c, 1, 0).unwrap();
        assert_eq!(l1.ebx >> 24, 0);
        assert_eq!((l1.ebx >> 16) & 0xff, 1);
        assert_eq!((l1.ebx >> 8) & 0xff, 8);
        assert_ne!(l1.ecx & ECX_HYPERVISOR_BIT, 0);
        assert_eq!(l1.edx & EDX_HTT_BIT, 0);
        // Other feature bits are untouched.
        assert_eq!(l1.ecx & !ECX_HYPERVISOR_BIT, 0x7ed8_320b);
        assert_eq!(l1.eax, 0x00a0_0f11);

        let mut c = fixed_input();
        filter_cpuid(&mut c, &flat(4), 3).unwrap();
        let l1 = find_entry(&c, 1, 0).unwrap();
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.edx & EDX_HTT_BIT, 0);
    }

    #[test]
    fn topology_leaf_carries_x2apic_id() {
        let mut c = fixed_input();
        filter_cpuid(&mut c, &flat(4), 2).unwrap();
        let smt = find_entry(&c, 0xb, 0).unwrap();
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let core = find_entry(&c, 0xb, 1).unwrap();
        assert_eq!((core.ebx, core.ecx, core.edx), (4, 0x201, 2));
        assert_eq!(core.eax, 2, "4 cores need 2 bits of APIC id");
    }

    #[test]
    fn kvm_signature_added_when_missing() {
        let mut c = fixed_input();
        filter_cpuid(&mut c, &flat(1), 0).unwrap();
        let sig = find_entry(&c, KVM_CPUID_SIGNATURE, 0).unwrap();
        assert_eq!(sig.eax, KVM_CPUID_FEATURES);
        let mut bytes = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            bytes.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&bytes, b"KVMKVMKVM\0\0\0");
        assert_eq!(
            c.as_slice()
                .iter()
                .filter(|e| e.function == KVM_CPUID_SIGNATURE)
                .count(),
            1
        );
    }

    #[test]
    fn no_pmu_and_no_power_management() {
        let mut c = fixed_input();
        filter_cpuid(&mut c, &flat(1), 0).unwrap();
        let pm = find_entry(&c, 0xa, 0).unwrap();
        assert_eq!((pm.eax, pm.ebx, pm.ecx, pm.edx), (0, 0, 0, 0));
        assert_eq!(find_entry(&c, 0x6, 0).unwrap().eax, 0);
    }

    #[test]
    fn tsc_deadline_sets_only_its_bit() {
        let mut c = fixed_input();
        filter_cpuid(&mut c, &flat(1), 0).unwrap();
        let before = *find_entry(&c, 1, 0).unwrap();
        assert_eq!(before.ecx & ECX_TSC_DEADLINE_BIT, 0);
        enable_tsc_deadline(&mut c);
        let after = find_entry(&c, 1, 0).unwrap();
        assert_eq!(after.ecx, before.ecx | ECX_TSC_DEADLINE_BIT);
        assert_eq!(
            (after.eax, after.ebx, after.edx),
            (before.eax, before.ebx, before.edx)
        );
        // Other leaves unchanged.
        assert_eq!(find_entry(&c, 0x6, 0).unwrap().ecx, 0x1);
    }

    #[test]
    fn filtering_twice_is_stable() {
        let mut a = fixed_input();
        filter_cpuid(&mut a, &flat(2), 1).unwrap();
        let mut b = a.clone();
        filter_cpuid(&mut b, &flat(2), 1).unwrap();
        assert_eq!(a.as_slice(), b.as_slice());
    }
}
