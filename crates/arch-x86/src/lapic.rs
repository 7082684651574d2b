//! Local APIC LINT0/LINT1 set the way a PC's firmware leaves them: on the boot CPU LINT0
//! takes the 8259 PIC's ExtINT, and LINT1 takes NMI on every CPU (Intel SDM vol. 3, 10.5.1,
//! "virtual wire mode"; MP spec 3.6.2.2). An application processor's LINT0 stays masked:
//! only one CPU may take the PIC's interrupts.

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

use crate::{Error, Result};

/// LVT LINT0 register offset in the APIC page.
pub const APIC_LVT0: usize = 0x350;
/// LVT LINT1 register offset in the APIC page.
pub const APIC_LVT1: usize = 0x360;
/// Delivery mode: ExtINT.
pub const APIC_MODE_EXTINT: u32 = 0x7;
/// Delivery mode: NMI.
pub const APIC_MODE_NMI: u32 = 0x4;

fn get_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (dst, src) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *dst = src as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LVT mask bit.
pub const APIC_LVT_MASKED: u32 = 1 << 16;

/// Sets LINT1 to NMI and, on the boot CPU (`boot_cpu`), LINT0 to ExtINT; an application
/// processor's LINT0 is masked. The other LVT bits are kept.
pub fn configure_lint(lapic: &mut kvm_lapic_state, boot_cpu: bool) {
    let lvt0 = get_reg(lapic, APIC_LVT0);
    let lvt0 = if boot_cpu {
        with_delivery_mode(lvt0, APIC_MODE_EXTINT)
    } else {
        lvt0 | APIC_LVT_MASKED
    };
    set_reg(lapic, APIC_LVT0, lvt0);
    let lvt1 = get_reg(lapic, APIC_LVT1);
    set_reg(lapic, APIC_LVT1, with_delivery_mode(lvt1, APIC_MODE_NMI));
}

/// Reads the vCPU's LAPIC, configures LINT0/LINT1 ([`configure_lint`]) and writes it back.
/// Needs the in-kernel irqchip.
pub fn setup_lint(vcpu: &VcpuFd, boot_cpu: bool) -> Result<()> {
    let mut lapic = vcpu.get_lapic().map_err(Error::GetLapic)?;
    configure_lint(&mut lapic, boot_cpu);
    vcpu.set_lapic(&lapic).map_err(Error::SetLapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_delivery_modes() {
        let mut l = kvm_lapic_state::default();
        // Masked, with garbage in the delivery-mode bits.
        set_reg(&mut l, APIC_LVT0, 0x0001_0700);
        set_reg(&mut l, APIC_LVT1, 0x0001_0000);
        configure_lint(&mut l, true);
        assert_eq!(get_reg(&l, APIC_LVT0), 0x0001_0700);
        assert_eq!(get_reg(&l, APIC_LVT1), 0x0001_0400);
        // Neighbouring registers untouched.
        assert_eq!(get_reg(&l, 0x340), 0);
        assert_eq!(get_reg(&l, 0x370), 0);
    }

    #[test]
    fn only_the_boot_cpu_takes_extint() {
        let mut l = kvm_lapic_state::default();
        // Unmasked ExtINT, as a stale state might have it.
        set_reg(&mut l, APIC_LVT0, 0x0000_0700);
        set_reg(&mut l, APIC_LVT1, 0x0000_0000);
        configure_lint(&mut l, false);
        assert_eq!(get_reg(&l, APIC_LVT0), 0x0001_0700, "masked on an AP");
        assert_eq!(get_reg(&l, APIC_LVT1), 0x0000_0400, "NMI on every CPU");
    }
}
