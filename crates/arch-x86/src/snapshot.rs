//! Saving and restoring what KVM holds of an x86_64 VM: each vCPU's state (CPUID, MSRs,
//! registers, XSAVE, XCRs, debug registers, LAPIC, MP state, pending events, TSC
//! frequency) and the VM's in-kernel PIC, IOAPIC, PIT and kvmclock.
//!
//! [`save_vcpu`] runs on a vCPU that is out of `KVM_RUN`, after one `KVM_RUN` with
//! `immediate_exit` set has completed any port or MMIO read the last exit left pending
//! (the caller's job: the vCPU's `kvm_run` belongs to its thread). [`restore_vcpu`] sets
//! the state on a newly created vCPU in the order KVM needs: CPUID first (it decides
//! which MSRs and XSAVE components exist), the LAPIC before the MSRs (the TSC-deadline
//! MSR lives in it), pending events last.

use kvm_bindings::{
    kvm_irqchip, kvm_msr_entry, Msrs, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use log::debug;
use tvm_snapshot::{VcpuState, VmState};

use crate::cpuid::MAX_CPUID_ENTRIES;
use crate::{Error, Result};

fn save_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::SaveState { what, source }
}

fn restore_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::RestoreState { what, source }
}

/// Reads every MSR in `indices` that the vCPU lets us read (KVM_GET_MSRS stops at the
/// first it cannot; that one is left out and the rest are read on).
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<_> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| Error::MsrsFull)?;
        let n = vcpu.get_msrs(&mut msrs).map_err(save_err("msrs"))?;
        out.extend_from_slice(&msrs.as_slice()[..n.min(chunk.len())]);
        if n < chunk.len() {
            debug!("msr {:#x} cannot be read; not saved", chunk[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[chunk.len()..];
        }
    }
    Ok(out)
}

/// The MSRs a snapshot saves: those KVM lists as saveable (KVM_GET_MSR_INDEX_LIST).
///
/// # Errors
///
/// [`Error::SaveState`] if KVM does not give the list.
pub fn saveable_msrs(kvm: &Kvm) -> Result<Vec<u32>> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(save_err("msr index list"))?
        .as_slice()
        .to_vec())
}

/// Reads the state of a vCPU that is out of `KVM_RUN` (see the module documentation).
/// `msr_indices`: [`saveable_msrs`].
///
/// # Errors
///
/// [`Error::SaveState`] naming the part KVM would not give.
pub fn save_vcpu(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState> {
    // The MP state first: KVM_GET_MP_STATE also settles pending INIT/SIPI and APIC events
    // into the state read after it.
    let mp_state = vcpu.get_mp_state().map_err(save_err("mp state"))?;
    Ok(VcpuState {
        cpuid: vcpu
            .get_cpuid2(MAX_CPUID_ENTRIES)
            .map_err(save_err("cpuid"))?
            .as_slice()
            .to_vec(),
        msrs: read_msrs(vcpu, msr_indices)?,
        regs: vcpu.get_regs().map_err(save_err("registers"))?,
        sregs: vcpu.get_sregs().map_err(save_err("special registers"))?,
        xsave: vcpu.get_xsave().map_err(save_err("xsave"))?,
        xcrs: vcpu.get_xcrs().map_err(save_err("xcrs"))?,
        debugregs: vcpu.get_debug_regs().map_err(save_err("debug registers"))?,
        lapic: vcpu.get_lapic().map_err(save_err("lapic"))?,
        mp_state,
        events: vcpu.get_vcpu_events().map_err(save_err("vcpu events"))?,
        tsc_khz: vcpu.get_tsc_khz().ok(),
    })
}

/// The CPUID a new vCPU `index` of `topology` has on this host, read back the way
/// [`save_vcpu`] reads it (KVM_GET_CPUID2 after the VMM's KVM_SET_CPUID2): what a saved
/// vCPU's CPUID is checked against before a restore
/// ([`tvm_snapshot::check_cpu_features`]). Leaves `vcpu` with that CPUID; the restore
/// sets the saved one over it.
///
/// # Errors
///
/// Those of [`crate::setup_cpuid`], [`Error::SaveState`] if KVM does not give it back.
pub fn cpuid_here(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    topology: &crate::CpuTopology,
    index: u8,
) -> Result<Vec<kvm_bindings::kvm_cpuid_entry2>> {
    crate::setup_cpuid(kvm, vcpu, topology, index, true)?;
    Ok(vcpu
        .get_cpuid2(MAX_CPUID_ENTRIES)
        .map_err(save_err("cpuid"))?
        .as_slice()
        .to_vec())
}

/// Sets `state` on a newly created vCPU (one that has not run).
///
/// # Errors
///
/// [`Error::RestoreState`] naming the part KVM refused, [`Error::MsrRefused`] for an MSR
/// it would not take.
pub fn restore_vcpu(vcpu: &VcpuFd, state: &VcpuState) -> Result<()> {
    let cpuid = kvm_bindings::CpuId::from_entries(&state.cpuid).map_err(|_| Error::CpuidFull)?;
    vcpu.set_cpuid2(&cpuid).map_err(restore_err("cpuid"))?;
    if let Some(khz) = state.tsc_khz {
        // The guest calibrated against this frequency; where the host differs KVM scales.
        match vcpu.get_tsc_khz() {
            Ok(now) if now == khz => {}
            _ => vcpu
                .set_tsc_khz(khz)
                .map_err(restore_err("tsc frequency"))?,
        }
    }
    vcpu.set_mp_state(state.mp_state)
        .map_err(restore_err("mp state"))?;
    vcpu.set_regs(&state.regs)
        .map_err(restore_err("registers"))?;
    vcpu.set_sregs(&state.sregs)
        .map_err(restore_err("special registers"))?;
    // The one unsafe call of this crate (KVM_SET_XSAVE's wrapper is unsafe).
    #[allow(unsafe_code)]
    // SAFETY: `state.xsave` is a whole `kvm_xsave` (4 KiB). KVM_SET_XSAVE reads more only
    // for a process that asked for dynamically enabled XSTATE features (AMX, through
    // arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM)), which this VMM never does.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(restore_err("xsave"))?;
    vcpu.set_xcrs(&state.xcrs).map_err(restore_err("xcrs"))?;
    vcpu.set_debug_regs(&state.debugregs)
        .map_err(restore_err("debug registers"))?;
    vcpu.set_lapic(&state.lapic).map_err(restore_err("lapic"))?;
    for chunk in state.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk).map_err(|_| Error::MsrsFull)?;
        let n = vcpu.set_msrs(&msrs).map_err(restore_err("msrs"))?;
        if n < chunk.len() {
            return Err(Error::MsrRefused(chunk[n].index));
        }
    }
    vcpu.set_vcpu_events(&state.events)
        .map_err(restore_err("vcpu events"))?;
    Ok(())
}

/// The host's CLOCK_REALTIME in ns since the epoch (0 if the clock is before it).
fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(save_err("irqchip"))?;
    Ok(chip)
}

/// Reads the VM's in-kernel PIC, IOAPIC, PIT and kvmclock (vCPUs paused).
///
/// # Errors
///
/// [`Error::SaveState`] naming the part KVM would not give.
pub fn save_vm(vm: &VmFd) -> Result<VmState> {
    Ok(VmState {
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(save_err("pit"))?,
        clock: vm.get_clock().map_err(save_err("kvmclock"))?,
        host_realtime_ns: realtime_ns(),
    })
}

/// Sets the VM's in-kernel PIC, IOAPIC, PIT and kvmclock (after the vCPUs are restored).
///
/// The clock goes on from its saved value; with `realtime`, from the saved value plus the
/// wall-clock time that passed since the snapshot, so that the time of day of a guest on
/// kvmclock stays right: by KVM (`KVM_CLOCK_REALTIME`, Linux 5.16+) where the saved clock
/// carries KVM's wall-clock time (it does when KVM runs its master clock), otherwise by
/// the host wall-clock time recorded with it. A guest whose clock source is the TSC does
/// not see the gap either way (its TSC goes on from the saved value).
///
/// # Errors
///
/// [`Error::RestoreState`] naming the part KVM refused, or one whose chip id is wrong.
pub fn restore_vm(vm: &VmFd, state: &VmState, realtime: bool) -> Result<()> {
    for (chip, id) in [
        (&state.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&state.ioapic, KVM_IRQCHIP_IOAPIC),
    ] {
        if chip.chip_id != id {
            return Err(Error::WrongIrqchip {
                found: chip.chip_id,
                expected: id,
            });
        }
        vm.set_irqchip(chip).map_err(restore_err("irqchip"))?;
    }
    vm.set_pit2(&state.pit).map_err(restore_err("pit"))?;
    let mut clock = state.clock;
    let by_kvm = realtime && clock.flags & KVM_CLOCK_REALTIME != 0;
    clock.flags = 0;
    if by_kvm {
        clock.flags = KVM_CLOCK_REALTIME;
        match vm.set_clock(&clock) {
            Ok(()) => return Ok(()),
            Err(e) => {
                debug!("KVM_SET_CLOCK with KVM_CLOCK_REALTIME: {e}; moving the clock here");
                clock.flags = 0;
            }
        }
    }
    if realtime {
        let gap = realtime_ns().saturating_sub(state.host_realtime_ns);
        clock.clock = clock.clock.saturating_add(gap);
    }
    vm.set_clock(&clock).map_err(restore_err("kvmclock"))
}
