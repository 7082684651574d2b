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

/// 0x8000_0001 ECX bit 1, CmpLegacy: more than one logical processor per package.
pub const AMD_ECX_CMP_LEGACY_BIT: u32 = 1 << 1;
/// 0x8000_0001 ECX bit 22, TOPOEXT: leaves 0x8000_001D and 0x8000_001E exist.
pub const AMD_ECX_TOPOEXT_BIT: u32 = 1 << 22;
/// AMD's leaf with the extended APIC id, core and node ids.
const AMD_EXT_APIC_ID_LEAF: u32 = 0x8000_001e;

/// Whether `cpuid` has an entry for `function`/`index` (exactly that index).
fn has_entry(cpuid: &CpuId, function: u32, index: u32) -> bool {
    cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == function && e.index == index)
}

/// Adds the topology entries KVM may have left out, so that the loop in [`filter_cpuid`]
/// can fill them:
///
/// - Leaves 0xB and 0x1F, when present, get subleaves 0 (SMT) and 1 (core). A missing
///   subleaf reads as zeros, which Linux's `detect_extended_topology` takes as the end of
///   the list; without the core level it would put every core in a package of its own.
///   (KVM copies the host's subleaves up to the first invalid one, so normally both are
///   there. Subleaf 2 need not be added: reading zeros is the terminator.)
/// - On AMD, leaf 0x8000_001E when TOPOEXT (0x8000_0001 ECX bit 22) is set and the highest
///   extended leaf (0x8000_0000 EAX) reaches it: Linux reads it whenever TOPOEXT is set
///   (`amd_get_topology_early`: threads per core; `amd_get_topology`: core and node id), and
///   a missing leaf would read as zeros, one thread per core. KVM normally returns the leaf
///   (zeroed since Linux 6.0, the host's before).
/// - On AMD with more than one thread per core (`smt`) and a host CPU without TOPOEXT (an
///   older or emulated one, such as QEMU's TCG `-cpu max`): TOPOEXT is set, the highest
///   extended leaf raised to 0x8000_001E if it was below, and the leaf added, as Firecracker
///   does on every AMD host. Without TOPOEXT Linux on AMD reads SMT from neither 0xB nor
///   0x8000_001E, only the threads per package from 0x8000_0008, and would show every thread
///   as a core. The cost: the leaves between the old top and 0x8000_001E read as zeros
///   (KVM's answer for a leaf it has no entry for on an AMD guest), so with no 0x8000_001D
///   from the host Linux finds no cache description there and the guest's sysfs lists no
///   caches.
/// - Otherwise, if TOPOEXT is set but the highest extended leaf is below 0x8000_001E, the
///   guest could not read the leaf, so TOPOEXT is cleared instead; Linux then takes the
///   cache layout from the legacy leaves 0x8000_0005 and 0x8000_0006 and the topology from
///   0x8000_0008 and 0xB. Without TOPOEXT nothing is added: Linux does not read the leaf
///   then.
fn add_missing_topology_leaves(cpuid: &mut CpuId, amd: bool, smt: bool) -> Result<()> {
    let mut missing = Vec::new();
    for leaf in [0xb, 0x1f] {
        if cpuid.as_slice().iter().any(|e| e.function == leaf) {
            for sub in 0..=1 {
                if !has_entry(cpuid, leaf, sub) {
                    missing.push((leaf, sub, KVM_CPUID_FLAG_SIGNIFCANT_INDEX));
                }
            }
        }
    }
    if amd {
        let mut max_ext = find_entry(cpuid, 0x8000_0000, 0).map_or(0, |e| e.eax);
        let mut topoext =
            find_entry(cpuid, 0x8000_0001, 0).is_some_and(|e| e.ecx & AMD_ECX_TOPOEXT_BIT != 0);
        let can_set = has_entry(cpuid, 0x8000_0000, 0) && has_entry(cpuid, 0x8000_0001, 0);
        if smt && can_set && (!topoext || max_ext < AMD_EXT_APIC_ID_LEAF) {
            for e in cpuid.as_mut_slice().iter_mut() {
                match e.function {
                    0x8000_0000 => e.eax = e.eax.max(AMD_EXT_APIC_ID_LEAF),
                    0x8000_0001 => e.ecx |= AMD_ECX_TOPOEXT_BIT,
                    _ => {}
                }
            }
            (topoext, max_ext) = (true, max_ext.max(AMD_EXT_APIC_ID_LEAF));
        }
        if topoext && max_ext < AMD_EXT_APIC_ID_LEAF {
            for e in cpuid.as_mut_slice().iter_mut() {
                if e.function == 0x8000_0001 {
                    e.ecx &= !AMD_ECX_TOPOEXT_BIT;
                }
            }
        } else if topoext && !has_entry(cpuid, AMD_EXT_APIC_ID_LEAF, 0) {
            missing.push((AMD_EXT_APIC_ID_LEAF, 0, 0));
        }
    }
    for (function, index, flags) in missing {
        cpuid
            .push(kvm_cpuid_entry2 {
                function,
                index,
                flags,
                ..Default::default()
            })
            .map_err(|_| Error::CpuidFull)?;
    }
    Ok(())
}

/// Adjusts `cpuid` for vCPU `index` of the VM's `topology`: its APIC id in leaves 0x1,
/// 0xB, 0x1F and (AMD) 0x8000_001E, and the topology in every leaf Linux reads it from
/// (0x1, 0x4, 0xB, 0x1F; AMD's 0x8000_0001, 0x8000_0008, 0x8000_001D, 0x8000_001E), so
/// that they agree with each other and with the MADT.
///
/// The "how many ids" fields count APIC ids, not vCPUs: each is `1 << width` (or that
/// minus one, as the field says) for the width of the APIC id bits below that level.
/// Linux turns these counts into shifts with `get_count_order` (round up to a power of
/// two), so with a count of vCPUs a non-power-of-two topology would come out wrong: with 3
/// threads x 5 cores a socket is 15 vCPUs but 32 APIC ids (2 thread bits + 3 core bits),
/// and `apicid >> get_count_order(15)` (a shift of 4) would split each socket in two.
/// QEMU encodes these fields from the APIC id widths the same way. Leaves KVM did not
/// return are not made up, except the few `add_missing_topology_leaves` adds and the
/// KVM signature leaf.
pub fn filter_cpuid(cpuid: &mut CpuId, topology: &CpuTopology, index: u8) -> Result<()> {
    let apic_id = u32::from(topology.apic_id(index));
    let (socket, _, _) = topology.position(index);
    let thread_bits = topology.thread_bits();
    let socket_shift = topology.socket_shift();
    let per_socket = topology.threads_per_socket();
    let per_core = u32::from(topology.threads_per_core());
    let amd = is_amd(cpuid);
    add_missing_topology_leaves(cpuid, amd, per_core > 1)?;
    let mut has_signature = false;
    for entry in cpuid.as_mut_slice().iter_mut() {
        match entry.function {
            0x1 => {
                // EBX[31:24] initial APIC id, [23:16] addressable logical processor ids in
                // the package (the SDM: "the nearest power-of-2 integer that is not
                // smaller than EBX[23:16] is the number of unique initial APIC IDs
                // reserved" for the package; Linux's detect_ht shifts the APIC id right by
                // its get_count_order to get the package), capped at the field's 255,
                // [15:8] CLFLUSH line size in 8-byte units.
                let addressable = (1u32 << socket_shift).min(0xff);
                entry.ebx = (apic_id << 24) | (addressable << 16) | (8 << 8) | (entry.ebx & 0xff);
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
                // L2 per core, L3 per package). Linux derives the cache ids from these:
                // apicid >> get_count_order(EAX[25:14] + 1).
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
                    entry.ecx |= AMD_ECX_CMP_LEGACY_BIT;
                } else {
                    entry.ecx &= !AMD_ECX_CMP_LEGACY_BIT;
                }
            }
            0x8000_0008 if amd => {
                // ECX[15:12] ApicIdSize (APIC id bits for the threads of a package: Linux's
                // amd_detect_cmp shifts the APIC id right by it to get the package),
                // [7:0] NC (threads per package - 1); the rest is kept.
                entry.ecx = (entry.ecx & !0xf0ff) | (socket_shift << 12) | (per_socket - 1);
            }
            0x8000_001d if amd => {
                // AMD's cache topology: EAX[25:14] = logical processors sharing this cache
                // - 1, as addressable APIC ids like leaf 4 (see above): Linux's
                // cacheinfo_amd_init_llc_id takes apicid >> get_count_order(EAX[25:14] + 1)
                // as the LLC id. (On family 0x17 models up to 0x1F, Zen 1, Linux ignores
                // this and uses apicid >> 3: a guest on such a host sees an LLC per 8 APIC
                // ids whatever this says.)
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 {
                    id_mask(socket_shift)
                } else {
                    id_mask(thread_bits)
                };
                entry.eax &= !(0xfff << 14);
                if entry.eax & 0x1f != 0 {
                    entry.eax |= sharing << 14;
                }
            }
            AMD_EXT_APIC_ID_LEAF if amd => {
                // EAX extended APIC id; EBX[15:8] threads per core - 1, [7:0] core id
                // (the APIC id without its thread bits: unique in the machine);
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
    let cpuid = vcpu_cpuid(kvm, topology, index, lapic_in_kernel)?;
    vcpu.set_cpuid2(&cpuid).map_err(Error::SetCpuid)
}

/// The CPUID [`setup_cpuid`] gives vCPU `index` of `topology` on this host (also what a
/// restored vCPU's saved CPUID is checked against).
pub fn vcpu_cpuid(
    kvm: &Kvm,
    topology: &CpuTopology,
    index: u8,
    lapic_in_kernel: bool,
) -> Result<CpuId> {
    let mut cpuid = kvm
        .get_supported_cpuid(MAX_CPUID_ENTRIES)
        .map_err(Error::GetSupportedCpuid)?;
    filter_cpuid(&mut cpuid, topology, index)?;
    if lapic_in_kernel && kvm.check_extension(Cap::TscDeadlineTimer) {
        enable_tsc_deadline(&mut cpuid);
    }
    Ok(cpuid)
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

    // ---- Topology across vCPUs, decoded the way Linux 6.1 decodes it. ----

    /// "GenuineIntel" as EAX (max leaf), EBX, ECX, EDX of leaf 0.
    const INTEL_LEAF0: [u32; 4] = [0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69];
    /// "AuthenticAMD" as EAX (max leaf), EBX, ECX, EDX of leaf 0.
    const AMD_LEAF0: [u32; 4] = [0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65];

    /// An Intel-like KVM_GET_SUPPORTED_CPUID answer (a 56-core, 2-thread host): leaf 4's
    /// caches, 0xB, and 0x1F with a die level, which the guest must not see.
    fn intel_input() -> CpuId {
        let sig = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        CpuId::from_entries(&[
            entry(0x0, 0, 0, INTEL_LEAF0),
            entry(
                0x1,
                0,
                0,
                [0x0008_06f8, 0x0070_0800, 0x7ffa_fbff, 0xbfeb_fbff],
            ),
            // L1d, L1i, L2 (2 threads each), L3 (128 ids), end.
            entry(0x4, 0, sig, [0xfc00_4121, 0x02c0_003f, 0x3f, 0]),
            entry(0x4, 1, sig, [0xfc00_4122, 0x01c0_003f, 0x3f, 0]),
            entry(0x4, 2, sig, [0xfc00_4143, 0x03c0_003f, 0x7ff, 0]),
            entry(0x4, 3, sig, [0xfc1f_c163, 0x03c0_003f, 0xdfff, 4]),
            entry(0x4, 4, sig, [0, 0, 0, 0]),
            entry(0x6, 0, 0, [0x4, 0, 0x1, 0]),
            entry(0xa, 0, 0, [0x0760_0001, 0, 0, 0]),
            entry(0xb, 0, sig, [1, 2, 0x100, 7]),
            entry(0xb, 1, sig, [7, 112, 0x201, 7]),
            entry(0xb, 2, sig, [0, 0, 2, 7]),
            entry(0x1f, 0, sig, [1, 2, 0x100, 7]),
            entry(0x1f, 1, sig, [7, 112, 0x201, 7]),
            entry(0x1f, 2, sig, [8, 224, 0x502, 7]),
            entry(0x1f, 3, sig, [0, 0, 3, 7]),
            entry(0x8000_0000, 0, 0, [0x8000_0008, 0, 0, 0]),
            entry(0x8000_0001, 0, 0, [0, 0, 0x121, 0x2c10_0800]),
            entry(0x8000_0008, 0, 0, [0x3934, 0, 0, 0]),
        ])
        .unwrap()
    }

    /// An AMD-like (Zen 3) answer: 0xB, CmpLegacy and TOPOEXT in 0x8000_0001, 0x8000_0008
    /// with NC and ApicIdSize, 0x8000_001D's caches and a zeroed 0x8000_001E, as KVM >= 6.0
    /// returns it.
    fn amd_input() -> CpuId {
        let sig = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        CpuId::from_entries(&[
            entry(0x0, 0, 0, AMD_LEAF0),
            entry(
                0x1,
                0,
                0,
                [0x00a2_0f10, 0x0a10_0800, 0x7ed8_320b, 0x178b_fbff],
            ),
            entry(0x6, 0, 0, [0x4, 0, 0x1, 0]),
            entry(0xb, 0, sig, [1, 2, 0x100, 7]),
            entry(0xb, 1, sig, [7, 16, 0x201, 7]),
            entry(0xb, 2, sig, [0, 0, 2, 7]),
            entry(0x8000_0000, 0, 0, [0x8000_0021, 0, 0, 0]),
            entry(
                0x8000_0001,
                0,
                0,
                [0x00a2_0f10, 0, 0x75c2_37ff, 0x2fd3_fbff],
            ),
            entry(0x8000_0008, 0, 0, [0x3030, 0x0, 0x0001_700f, 0]),
            entry(0x8000_001d, 0, sig, [0x4121, 0x01c0_003f, 0x3f, 0]),
            entry(0x8000_001d, 1, sig, [0x4122, 0x01c0_003f, 0x3f, 0]),
            entry(0x8000_001d, 2, sig, [0x4143, 0x01c0_003f, 0x3ff, 2]),
            entry(0x8000_001d, 3, sig, [0x3_c163, 0x03c0_003f, 0x7fff, 1]),
            entry(0x8000_001d, 4, sig, [0, 0, 0, 0]),
            entry(0x8000_001e, 0, 0, [0, 0, 0, 0]),
        ])
        .unwrap()
    }

    fn topologies() -> Vec<CpuTopology> {
        vec![
            flat(1),
            flat(2),
            flat(4),
            flat(64),
            CpuTopology::new(2, 2, 2).unwrap(),
            CpuTopology::new(3, 5, 2).unwrap(),
        ]
    }

    /// Each vCPU's filtered CPUID.
    fn per_vcpu(input: &CpuId, t: &CpuTopology) -> Vec<CpuId> {
        (0..t.cpu_count())
            .map(|i| {
                let mut c = input.clone();
                filter_cpuid(&mut c, t, i).unwrap();
                c
            })
            .collect()
    }

    /// What the guest reads for `function`/`index`: zeros where there is no entry, as KVM
    /// answers for a missing subleaf.
    fn read(c: &CpuId, function: u32, index: u32) -> [u32; 4] {
        find_entry(c, function, index).map_or([0; 4], |e| [e.eax, e.ebx, e.ecx, e.edx])
    }

    /// Linux's get_count_order: ceil(log2(n)).
    fn get_count_order(n: u32) -> u32 {
        if n <= 1 {
            0
        } else {
            32 - (n - 1).leading_zeros()
        }
    }

    /// Both inputs with a name, and whether they are AMD.
    fn inputs() -> [(&'static str, CpuId, bool); 2] {
        [("intel", intel_input(), false), ("amd", amd_input(), true)]
    }

    #[test]
    fn apic_ids_agree_in_every_leaf_and_are_unique() {
        for (name, input, amd) in inputs() {
            for t in topologies() {
                let mut ids = Vec::new();
                for (i, c) in per_vcpu(&input, &t).iter().enumerate() {
                    let id = read(c, 1, 0)[1] >> 24;
                    assert_eq!(id, u32::from(t.apic_id(i as u8)), "{name} {t} vcpu {i}");
                    assert_eq!(read(c, 0xb, 0)[3], id, "{name} {t} vcpu {i}: 0xB EDX");
                    assert_eq!(read(c, 0xb, 1)[3], id, "{name} {t} vcpu {i}: 0xB.1 EDX");
                    if amd {
                        let e = read(c, 0x8000_001e, 0);
                        assert_eq!(e[0], id, "{name} {t} vcpu {i}: 0x8000_001E EAX");
                    } else {
                        assert_eq!(read(c, 0x1f, 0)[3], id, "{name} {t} vcpu {i}: 0x1F EDX");
                        assert_eq!(read(c, 0x1f, 1)[3], id, "{name} {t} vcpu {i}: 0x1F.1 EDX");
                    }
                    ids.push(id);
                }
                let mut sorted = ids.clone();
                sorted.sort_unstable();
                sorted.dedup();
                assert_eq!(sorted.len(), ids.len(), "{name} {t}: APIC ids not unique");
                let n = u32::from(t.cpu_count());
                let pow2 = [t.threads_per_core(), t.cores_per_socket(), t.sockets()]
                    .iter()
                    .all(|c| c.is_power_of_two());
                if pow2 {
                    assert_eq!(ids, (0..n).collect::<Vec<_>>(), "{name} {t}: not dense");
                }
            }
        }
    }

    /// Linux 6.1's detect_extended_topology on `leaf` (0xB or 0x1F) for one vCPU:
    /// (socket, core, thread) from the initial APIC id, threads per core, cores per
    /// package, and the package shift.
    fn linux_extended_topology(c: &CpuId, leaf: u32) -> ((u32, u32, u32), u32, u32, u32) {
        let s0 = read(c, leaf, 0);
        assert!(
            s0[1] != 0 && (s0[2] >> 8) & 0xff == 1,
            "{leaf:#x}.0 is the SMT level"
        );
        let apic = s0[3];
        let ht_width = s0[0] & 0x1f;
        let smt_siblings = s0[1] & 0xffff;
        let (mut core_siblings, mut pkg_width) = (smt_siblings, ht_width);
        let mut sub = 1;
        loop {
            let r = read(c, leaf, sub);
            let kind = (r[2] >> 8) & 0xff;
            if kind == 2 {
                core_siblings = r[1] & 0xffff;
            }
            if kind == 0 {
                break;
            }
            pkg_width = r[0] & 0x1f;
            sub += 1;
            assert!(sub < 8, "{leaf:#x}: no terminating subleaf");
        }
        let core_select_mask = !(u32::MAX << pkg_width) >> ht_width;
        let pos = (
            apic >> pkg_width,
            (apic >> ht_width) & core_select_mask,
            apic & ((1 << ht_width) - 1),
        );
        (pos, smt_siblings, core_siblings / smt_siblings, pkg_width)
    }

    #[test]
    fn extended_topology_leaves_decode_to_the_position() {
        for (name, input, amd) in inputs() {
            let leaves: &[u32] = if amd { &[0xb] } else { &[0xb, 0x1f] };
            for t in topologies() {
                for (i, c) in per_vcpu(&input, &t).iter().enumerate() {
                    for &leaf in leaves {
                        let (pos, threads, cores, pkg_width) = linux_extended_topology(c, leaf);
                        let what = format!("{name} {t} vcpu {i} leaf {leaf:#x}");
                        assert_eq!(pos, t.position(i as u8), "{what}");
                        assert_eq!(threads, u32::from(t.threads_per_core()), "{what}");
                        assert_eq!(cores, u32::from(t.cores_per_socket()), "{what}");
                        assert_eq!(pkg_width, t.socket_shift(), "{what}");
                    }
                }
            }
        }
    }

    #[test]
    fn leaves_1_and_4_decode_like_linux_without_leaf_b() {
        // Linux 6.1's detect_ht, used where there is no leaf 0xB: the package is the APIC
        // id shifted by get_count_order(leaf 1 EBX[23:16]), cores per package come from
        // leaf 4 EAX[31:26] + 1 (intel_num_cpu_cores).
        for t in topologies() {
            for (i, c) in per_vcpu(&intel_input(), &t).iter().enumerate() {
                let l1 = read(c, 1, 0);
                if l1[3] & EDX_HTT_BIT == 0 {
                    assert_eq!(t.threads_per_socket(), 1, "{t}");
                    continue;
                }
                let apic = l1[1] >> 24;
                let siblings = (l1[1] >> 16) & 0xff;
                let max_cores = (read(c, 4, 0)[0] >> 26) + 1;
                let socket = apic >> get_count_order(siblings);
                let per_core = siblings / max_cores;
                let core =
                    (apic >> get_count_order(per_core)) & ((1 << get_count_order(max_cores)) - 1);
                let (want_socket, want_core, _) = t.position(i as u8);
                assert_eq!((socket, core), (want_socket, want_core), "{t} vcpu {i}");
            }
        }
    }

    #[test]
    fn caches_are_per_core_and_the_llc_per_socket() {
        for (name, input, amd) in inputs() {
            let op = if amd { 0x8000_001d } else { 0x4 };
            for t in topologies() {
                let cpus = per_vcpu(&input, &t);
                let mut levels = Vec::new();
                for sub in 0.. {
                    let eax = read(&cpus[0], op, sub)[0];
                    if eax & 0x1f == 0 {
                        break;
                    }
                    levels.push((sub, (eax >> 5) & 0x7));
                }
                assert_eq!(levels.len(), 4, "{name}: four caches");
                for (sub, level) in levels {
                    // The cache id as Linux computes it (cacheinfo.c: LLC and L2 ids,
                    // cacheinfo_amd_init_llc_id): apicid >> get_count_order(sharing).
                    let ids: Vec<u32> = cpus
                        .iter()
                        .map(|c| {
                            let sharing = ((read(c, op, sub)[0] >> 14) & 0xfff) + 1;
                            (read(c, 1, 0)[1] >> 24) >> get_count_order(sharing)
                        })
                        .collect();
                    for i in 0..cpus.len() {
                        for j in 0..cpus.len() {
                            let (si, ci, _) = t.position(i as u8);
                            let (sj, cj, _) = t.position(j as u8);
                            let same = if level >= 3 {
                                si == sj
                            } else {
                                (si, ci) == (sj, cj)
                            };
                            assert_eq!(
                                ids[i] == ids[j],
                                same,
                                "{name} {t} L{level} (subleaf {sub}): vcpus {i} and {j}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn amd_package_leaves_match_leaf_b() {
        for t in topologies() {
            for (i, c) in per_vcpu(&amd_input(), &t).iter().enumerate() {
                let what = format!("{t} vcpu {i}");
                let (socket, _, _) = t.position(i as u8);
                let apic = read(c, 1, 0)[1] >> 24;
                let ecx = read(c, 0x8000_0008, 0)[2];
                let apic_id_size = (ecx >> 12) & 0xf;
                let nc = ecx & 0xff;
                assert_eq!(
                    apic_id_size,
                    read(c, 0xb, 1)[0] & 0x1f,
                    "{what}: ApicIdSize"
                );
                assert_eq!(nc + 1, t.threads_per_socket(), "{what}: NC");
                assert_eq!(ecx & !0xf0ff, 0x0001_0000, "{what}: other bits kept");
                // amd_detect_cmp: the package is the APIC id shifted by ApicIdSize (or, when
                // 0, by the bits NC + 1 needs).
                let bits = if apic_id_size == 0 {
                    get_count_order(nc + 1)
                } else {
                    apic_id_size
                };
                assert_eq!(apic >> bits, socket, "{what}: amd_detect_cmp");
                // 0x8000_001E: threads per core (amd_get_topology_early), node = socket.
                let e = read(c, 0x8000_001e, 0);
                let threads = ((e[1] >> 8) & 0xff) + 1;
                assert_eq!(threads, u32::from(t.threads_per_core()), "{what}");
                assert_eq!(
                    (e[2] & 0xff, (e[2] >> 8) & 0x7),
                    (socket, 0),
                    "{what}: node"
                );
                // amd_get_topology (family >= 0x17): x86_max_cores = (NC + 1) / threads.
                assert_eq!(
                    (nc + 1) / threads,
                    u32::from(t.cores_per_socket()),
                    "{what}"
                );
                // The core id, with the package, tells cores apart.
                let core_id = e[1] & 0xff;
                for (j, other) in per_vcpu(&amd_input(), &t).iter().enumerate() {
                    let o = read(other, 0x8000_001e, 0);
                    let same_core = {
                        let (a, b, _) = t.position(i as u8);
                        let (x, y, _) = t.position(j as u8);
                        (a, b) == (x, y)
                    };
                    assert_eq!(
                        (o[1] & 0xff, o[2] & 0xff) == (core_id, e[2] & 0xff),
                        same_core,
                        "{what} and vcpu {j}"
                    );
                }
                assert_ne!(
                    read(c, 0x8000_0001, 0)[2] & AMD_ECX_TOPOEXT_BIT,
                    0,
                    "TOPOEXT kept"
                );
            }
        }
    }

    #[test]
    fn htt_and_cmp_legacy_iff_more_than_one_thread_per_socket() {
        for (name, input, amd) in inputs() {
            for t in topologies() {
                let many = t.threads_per_socket() > 1;
                for (i, c) in per_vcpu(&input, &t).iter().enumerate() {
                    let htt = read(c, 1, 0)[3] & EDX_HTT_BIT != 0;
                    assert_eq!(htt, many, "{name} {t} vcpu {i}: HTT");
                    let cmp = read(c, 0x8000_0001, 0)[2] & AMD_ECX_CMP_LEGACY_BIT != 0;
                    if amd {
                        assert_eq!(cmp, many, "{name} {t} vcpu {i}: CmpLegacy");
                    } else {
                        assert!(!cmp, "{name}: 0x8000_0001 untouched on Intel");
                    }
                }
            }
        }
    }

    #[test]
    fn intel_hosts_keep_their_amd_leaves_and_lose_the_die_level() {
        let t = CpuTopology::new(2, 2, 2).unwrap();
        let c = &per_vcpu(&intel_input(), &t)[5];
        assert_eq!(read(c, 0x8000_0008, 0), [0x3934, 0, 0, 0]);
        assert_eq!(read(c, 0x8000_0001, 0), [0, 0, 0x121, 0x2c10_0800]);
        assert!(find_entry(c, 0x8000_001e, 0).is_none(), "no AMD leaf added");
        // The host's die level (0x1F subleaf 2) is gone: the list ends after the core.
        assert_eq!(read(c, 0x1f, 2), [0, 0, 2, 5]);
        assert_eq!(read(c, 0x1f, 3), [0, 0, 3, 5]);
    }

    #[test]
    fn missing_topology_subleaves_and_0x8000_001e_are_added() {
        let t = CpuTopology::new(2, 4, 1).unwrap();
        // KVM without 0x8000_001E (before it returned the leaf), and without 0xB's core
        // level.
        let strip = |c: &CpuId, drop: &[(u32, u32)]| {
            let kept: Vec<_> = c
                .as_slice()
                .iter()
                .filter(|e| !drop.contains(&(e.function, e.index)))
                .copied()
                .collect();
            CpuId::from_entries(&kept).unwrap()
        };
        let mut c = strip(&amd_input(), &[(0x8000_001e, 0), (0xb, 1), (0xb, 2)]);
        filter_cpuid(&mut c, &t, 3).unwrap();
        assert_eq!(read(&c, 0x8000_001e, 0), [3, (1 << 8) | 1, 0, 0]);
        let (pos, threads, cores, _) = linux_extended_topology(&c, 0xb);
        assert_eq!((pos, threads, cores), ((0, 1, 1), 2, 4));
        let sub1 = find_entry(&c, 0xb, 1).unwrap();
        assert_eq!(sub1.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);

        // TOPOEXT, but the extended leaves stop below 0x8000_001E, and one thread per core
        // (with more, see the next test): TOPOEXT goes, and no leaf is added.
        let mut c = strip(&amd_input(), &[(0x8000_001e, 0)]);
        for e in c.as_mut_slice().iter_mut() {
            if e.function == 0x8000_0000 {
                e.eax = 0x8000_001d;
            }
        }
        filter_cpuid(&mut c, &CpuTopology::new(1, 4, 1).unwrap(), 3).unwrap();
        assert!(find_entry(&c, 0x8000_001e, 0).is_none());
        assert_eq!(read(&c, 0x8000_0001, 0)[2] & AMD_ECX_TOPOEXT_BIT, 0);

        // No TOPOEXT and one thread per core: the guest does not read the leaf, none is
        // added.
        let mut c = strip(&amd_input(), &[(0x8000_001e, 0)]);
        for e in c.as_mut_slice().iter_mut() {
            if e.function == 0x8000_0001 {
                e.ecx &= !AMD_ECX_TOPOEXT_BIT;
            }
        }
        filter_cpuid(&mut c, &CpuTopology::new(1, 4, 1).unwrap(), 3).unwrap();
        assert!(find_entry(&c, 0x8000_001e, 0).is_none());
        assert_eq!(read(&c, 0x8000_0001, 0)[2] & AMD_ECX_TOPOEXT_BIT, 0);
    }

    /// An AMD host CPU without TOPOEXT whose extended leaves stop at 0x8000_0008 (what QEMU's
    /// TCG `-cpu max` gives a nested guest), as KVM passes it on.
    fn amd_without_topoext() -> CpuId {
        let kept: Vec<_> = amd_input()
            .as_slice()
            .iter()
            .filter(|e| e.function < 0x8000_001d)
            .map(|e| {
                let mut e = *e;
                match e.function {
                    0x8000_0000 => e.eax = 0x8000_0008,
                    0x8000_0001 => e.ecx &= !AMD_ECX_TOPOEXT_BIT,
                    _ => {}
                }
                e
            })
            .collect();
        CpuId::from_entries(&kept).unwrap()
    }

    #[test]
    fn smt_on_an_amd_host_without_topoext_gets_topoext_and_0x8000_001e() {
        // 2 threads x 2 cores x 2 sockets: vCPU 5 is socket 1, core 0, thread 1, APIC id 5.
        let t = CpuTopology::new(2, 2, 2).unwrap();
        let c = &per_vcpu(&amd_without_topoext(), &t)[5];
        assert_ne!(read(c, 0x8000_0001, 0)[2] & AMD_ECX_TOPOEXT_BIT, 0);
        assert_eq!(read(c, 0x8000_0000, 0)[0], 0x8000_001e);
        // Linux's parse_8000_001e: EBX[15:8] + 1 threads per core, core id without the
        // thread bit, node = socket; the extended APIC id in EAX.
        assert_eq!(read(c, 0x8000_001e, 0), [5, (1 << 8) | 2, 1, 0]);
        // And 0xB still says the same.
        let (pos, threads, cores, _) = linux_extended_topology(c, 0xb);
        assert_eq!((pos, threads, cores), ((1, 0, 1), 2, 2));

        // A host that has TOPOEXT but stops below the leaf: with SMT the leaf is reachable.
        let mut input = amd_input();
        for e in input.as_mut_slice().iter_mut() {
            if e.function == 0x8000_0000 {
                e.eax = 0x8000_001d;
            }
        }
        let c = &per_vcpu(&input, &t)[5];
        assert_ne!(read(c, 0x8000_0001, 0)[2] & AMD_ECX_TOPOEXT_BIT, 0);
        assert_eq!(read(c, 0x8000_0000, 0)[0], 0x8000_001e);
        assert_eq!(read(c, 0x8000_001e, 0)[0], 5);
    }

    #[test]
    fn without_smt_an_amd_host_without_topoext_is_left_alone() {
        for t in [flat(4), CpuTopology::new(1, 2, 2).unwrap()] {
            for c in per_vcpu(&amd_without_topoext(), &t) {
                assert_eq!(read(&c, 0x8000_0001, 0)[2] & AMD_ECX_TOPOEXT_BIT, 0, "{t}");
                assert_eq!(read(&c, 0x8000_0000, 0)[0], 0x8000_0008, "{t}");
                assert!(find_entry(&c, 0x8000_001e, 0).is_none(), "{t}");
            }
        }
        // Nor an Intel host with threads.
        let t = CpuTopology::new(2, 2, 2).unwrap();
        let c = &per_vcpu(&intel_input(), &t)[5];
        assert_eq!(read(c, 0x8000_0000, 0)[0], 0x8000_0008);
    }
}
