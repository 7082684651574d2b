// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The ACPI PM1a event and control registers.

use log::{debug, error, info};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vmm_sys_util::eventfd::EventFd;

use crate::Result;

/// Byte offset of PM1 enable in the block (PM1 status is at 0).
pub const PM1_EN_OFFSET: u16 = 2;
/// Byte offset of PM1 control: the FADT puts the control block right after the 4-byte
/// event block, and one device serves both.
pub const PM1_CNT_OFFSET: u16 = 4;
/// Ports the block spans: status, enable, control (2 bytes each).
pub const PM1_BLOCK_LEN: u16 = 6;

/// PM1 control: SCI_EN, the machine is in ACPI mode (ACPI 6.5, table 4.13).
pub const PM1_CNT_SCI_EN: u16 = 1 << 0;
/// PM1 control: the sleep type field, bits 10..12.
pub const PM1_CNT_SLP_TYP_SHIFT: u16 = 10;
/// PM1 control: mask of the sleep type field.
pub const PM1_CNT_SLP_TYP_MASK: u16 = 0x7 << PM1_CNT_SLP_TYP_SHIFT;
/// PM1 control: SLP_EN, enter the sleep state in SLP_TYP (write-only).
pub const PM1_CNT_SLP_EN: u16 = 1 << 13;

/// The PM1a event and control registers (ACPI 6.5, 4.8.3.1 and 4.8.3.2), as far as this
/// machine has them:
///
/// - PM1 status reads 0: none of its events (timer, buttons, RTC, wake) exists here, so
///   there is nothing to clear.
/// - PM1 enable keeps what the guest writes (ACPICA checks that the global-lock enable bit
///   sticks).
/// - PM1 control reads SCI_EN as 1 (always in ACPI mode) and keeps SLP_TYP. Writing SLP_EN
///   with SLP_TYP equal to the soft-off type given to [`AcpiPm::new`] (what the DSDT's
///   `\_S5` says) writes the power-off EventFd ([`AcpiPm::poweroff_evt`]) once per such
///   write. Other sleep types are not offered (the DSDT has no `\_S1`..`\_S4`) and are
///   ignored.
///
/// Registers are 16 bits wide; byte, word and dword accesses all work, low byte first, so
/// a word write sets SLP_TYP before SLP_EN acts. Offsets past the block read as all ones.
#[derive(Debug)]
pub struct AcpiPm {
    enable: u16,
    control: u16,
    s5_slp_typ: u16,
    poweroff_evt: EventFd,
    poweroff_logged: bool,
}

impl AcpiPm {
    /// A PM1a block whose soft-off (S5) sleep type is `s5_slp_typ` (0..=7).
    ///
    /// # Errors
    /// The power-off EventFd cannot be created.
    pub fn new(s5_slp_typ: u16) -> Result<Self> {
        Ok(AcpiPm {
            enable: 0,
            control: PM1_CNT_SCI_EN,
            s5_slp_typ,
            poweroff_evt: crate::eventfd()?,
            poweroff_logged: false,
        })
    }

    /// Written (incremented by one) each time the guest enters S5.
    pub fn poweroff_evt(&self) -> &EventFd {
        &self.poweroff_evt
    }

    /// PM1 control as the guest reads it.
    pub fn control(&self) -> u16 {
        self.control
    }

    fn read_byte(&self, offset: u64) -> u8 {
        let (reg, shift) = match offset {
            0 | 1 => (0, offset),
            2 | 3 => (self.enable, offset - u64::from(PM1_EN_OFFSET)),
            4 | 5 => (self.control, offset - u64::from(PM1_CNT_OFFSET)),
            _ => return 0xff,
        };
        (reg >> (8 * shift)) as u8
    }

    fn write_byte(&mut self, offset: u64, value: u8) {
        let set = |reg: u16, shift: u64| {
            let shift = 8 * shift;
            (reg & !(0xff << shift)) | (u16::from(value) << shift)
        };
        match offset {
            // Status: write 1 to clear, and no bit is ever set.
            0 | 1 => {}
            2 | 3 => self.enable = set(self.enable, offset - u64::from(PM1_EN_OFFSET)),
            4 | 5 => {
                let written = set(self.control, offset - u64::from(PM1_CNT_OFFSET));
                // SCI_EN is fixed; SLP_EN is write-only and acts now.
                self.control = (written | PM1_CNT_SCI_EN) & !PM1_CNT_SLP_EN;
                if written & PM1_CNT_SLP_EN != 0 {
                    self.sleep((written & PM1_CNT_SLP_TYP_MASK) >> PM1_CNT_SLP_TYP_SHIFT);
                }
            }
            _ => debug!("acpi pm: write past the pm1 block at offset {offset}"),
        }
    }

    fn sleep(&mut self, slp_typ: u16) {
        if slp_typ != self.s5_slp_typ {
            debug!("acpi pm: sleep type {slp_typ} is not supported, ignored");
            return;
        }
        if !self.poweroff_logged {
            self.poweroff_logged = true;
            info!("guest powered off through acpi (s5)");
        }
        if let Err(e) = self.poweroff_evt.write(1) {
            // Only a full counter (2^64 - 2 power-offs) makes this fail.
            error!("failed to signal the acpi power-off: {e}");
        }
    }
}

impl MutDevicePio for AcpiPm {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.read_byte(u64::from(offset) + i as u64);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            self.write_byte(u64::from(offset) + i as u64, *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S5: u16 = 5;
    const BASE: u16 = 0x600;

    fn pm() -> (AcpiPm, EventFd) {
        let pm = AcpiPm::new(S5).unwrap();
        let evt = pm.poweroff_evt().try_clone().unwrap();
        (pm, evt)
    }

    fn rd(pm: &mut AcpiPm, offset: u16, len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len];
        pm.pio_read(PioAddress(BASE), offset, &mut d);
        d
    }

    fn wr(pm: &mut AcpiPm, offset: u16, data: &[u8]) {
        pm.pio_write(PioAddress(BASE), offset, data);
    }

    #[test]
    fn status_reads_zero_enable_sticks_sci_en_is_fixed() {
        let (mut pm, evt) = pm();
        assert_eq!(rd(&mut pm, 0, 2), [0, 0]);
        wr(&mut pm, 0, &[0xff, 0xff]);
        assert_eq!(rd(&mut pm, 0, 2), [0, 0]);
        // The global-lock enable (bit 5) and the power-button enable (bit 8) stick.
        wr(&mut pm, 2, &[0x20, 0x01]);
        assert_eq!(rd(&mut pm, 2, 2), [0x20, 0x01]);
        assert_eq!(rd(&mut pm, 3, 1), [0x01]);
        // Control: SCI_EN reads 1 even after a write of 0.
        assert_eq!(rd(&mut pm, 4, 2), [1, 0]);
        wr(&mut pm, 4, &[0, 0]);
        assert_eq!(rd(&mut pm, 4, 2), [1, 0]);
        // A dword read of the event block sees both registers.
        assert_eq!(rd(&mut pm, 0, 4), [0, 0, 0x20, 0x01]);
        // Past the block: all ones.
        assert_eq!(rd(&mut pm, 6, 1), [0xff]);
        assert!(evt.read().is_err(), "nothing signalled");
    }

    #[test]
    fn slp_en_with_s5_powers_off() {
        let (mut pm, evt) = pm();
        // What ACPICA does: SLP_TYP first, then SLP_TYP | SLP_EN, as 16-bit writes.
        let typ = (S5 << PM1_CNT_SLP_TYP_SHIFT) | PM1_CNT_SCI_EN;
        wr(&mut pm, 4, &typ.to_le_bytes());
        assert!(evt.read().is_err());
        assert_eq!(pm.control(), typ);
        wr(&mut pm, 4, &(typ | PM1_CNT_SLP_EN).to_le_bytes());
        assert_eq!(evt.read().unwrap(), 1);
        // SLP_EN reads back as 0.
        assert_eq!(rd(&mut pm, 5, 1)[0] & 0x20, 0);
        // Each request is one more write.
        wr(&mut pm, 4, &(typ | PM1_CNT_SLP_EN).to_le_bytes());
        wr(&mut pm, 4, &(typ | PM1_CNT_SLP_EN).to_le_bytes());
        assert_eq!(evt.read().unwrap(), 2);
    }

    #[test]
    fn s5_by_a_single_byte_write_and_other_sleep_types_ignored() {
        let (mut pm, evt) = pm();
        // SLP_EN with SLP_TYP 1 (S1 is not offered): ignored.
        wr(&mut pm, 5, &[(1 << 2) | 0x20]);
        assert!(evt.read().is_err());
        // High byte alone: SLP_TYP 5 in bits 2..4, SLP_EN in bit 5.
        wr(&mut pm, 5, &[(5 << 2) | 0x20]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
