// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The i8042 keyboard controller, without a keyboard or mouse attached.

use log::{debug, error, info};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vmm_sys_util::eventfd::EventFd;

use crate::Result;

/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 status (read) and command (write) port.
pub const I8042_COMMAND_PORT: u16 = 0x64;

// Controller commands (written to the command port), as Linux's drivers/input/serio/i8042.h
// names them.
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_KBD_LOOP: u8 = 0xd2;
const CMD_AUX_LOOP: u8 = 0xd3;
const CMD_RESET_CPU: u8 = 0xfe;

/// The controller self-test passed.
const SELF_TEST_OK: u8 = 0x55;
/// An interface test found no fault.
const INTERFACE_TEST_OK: u8 = 0x00;

/// Status: output buffer full (data for the guest at the data port).
const SB_OUT_DATA_AVAIL: u8 = 0x01;
/// Status: system flag (self test passed).
const SB_SYSTEM_FLAG: u8 = 0x04;
/// Status: keyboard not inhibited (the key lock is open).
const SB_KEYLOCK_OPEN: u8 = 0x10;
/// Status: the byte in the output buffer came from the aux (mouse) port.
const SB_AUX_DATA: u8 = 0x20;

/// Control register: keyboard port disabled.
const CTR_KBD_DISABLE: u8 = 0x10;
/// Control register: aux port disabled.
const CTR_AUX_DISABLE: u8 = 0x20;
/// Control register at power-on: keyboard interrupt enabled, system flag, translation.
const CTR_DEFAULT: u8 = 0x47;

/// What the next write to the data port means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DataWrite {
    /// A byte for the (absent) keyboard.
    Device,
    /// The new control register (after command 0x60).
    Ctr,
    /// Echo back as keyboard data (after 0xD2).
    KbdLoop,
    /// Echo back as aux data (after 0xD3).
    AuxLoop,
}

/// A minimal i8042: enough for Linux to probe it without waiting, and for `reboot=k`.
///
/// - Command 0xFE (pulse the CPU reset line) writes the reset EventFd
///   ([`I8042::reset_evt`]) once per command; the VMM decides what a reset means.
/// - The controller answers its own commands at once: read/write the control register,
///   self test (0x55), interface tests (0x00), port enable/disable, keyboard and aux
///   loopback. The status register's output-buffer-full bit is set exactly while a byte
///   waits at the data port.
/// - No keyboard or mouse is attached: bytes written for them are dropped, and the device
///   raises no interrupts. The DSDT lists only the keyboard port (no PS/2 mouse), so Linux
///   skips the aux port, whose probe would otherwise wait 250 ms for an IRQ 12 that never
///   comes.
///
/// Port accesses are one byte wide; other widths read as all ones and writes are ignored.
/// The device is placed at [`I8042_DATA_PORT`] and [`I8042_COMMAND_PORT`] (two one-byte
/// ranges) and tells them apart by the base address.
#[derive(Debug)]
pub struct I8042 {
    reset_evt: EventFd,
    reset_logged: bool,
    ctr: u8,
    out: Option<u8>,
    out_is_aux: bool,
    next_write: DataWrite,
}

impl I8042 {
    /// A controller with its power-on control register and an empty output buffer.
    ///
    /// # Errors
    /// The reset EventFd cannot be created.
    pub fn new() -> Result<Self> {
        Ok(I8042 {
            reset_evt: crate::eventfd()?,
            reset_logged: false,
            ctr: CTR_DEFAULT,
            out: None,
            out_is_aux: false,
            next_write: DataWrite::Device,
        })
    }

    /// Written (incremented by one) each time the guest pulses the reset line.
    pub fn reset_evt(&self) -> &EventFd {
        &self.reset_evt
    }

    /// The status register.
    pub fn status(&self) -> u8 {
        let mut s = SB_SYSTEM_FLAG | SB_KEYLOCK_OPEN;
        if self.out.is_some() {
            s |= SB_OUT_DATA_AVAIL;
            if self.out_is_aux {
                s |= SB_AUX_DATA;
            }
        }
        s
    }

    fn output(&mut self, byte: u8, aux: bool) {
        self.out = Some(byte);
        self.out_is_aux = aux;
    }

    fn reset(&mut self) {
        if !self.reset_logged {
            self.reset_logged = true;
            info!("guest reset the cpu through the i8042");
        }
        if let Err(e) = self.reset_evt.write(1) {
            // Only a full counter (2^64 - 2 resets) makes this fail.
            error!("failed to signal the i8042 reset: {e}");
        }
    }

    fn command(&mut self, cmd: u8) {
        // A new command cancels a parameter byte the last one was waiting for.
        self.next_write = DataWrite::Device;
        match cmd {
            CMD_RESET_CPU => self.reset(),
            CMD_READ_CTR => self.output(self.ctr, false),
            CMD_WRITE_CTR => self.next_write = DataWrite::Ctr,
            CMD_SELF_TEST => self.output(SELF_TEST_OK, false),
            CMD_KBD_TEST | CMD_AUX_TEST => self.output(INTERFACE_TEST_OK, false),
            CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DISABLE,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUX_DISABLE,
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLE,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBD_DISABLE,
            CMD_KBD_LOOP => self.next_write = DataWrite::KbdLoop,
            CMD_AUX_LOOP => self.next_write = DataWrite::AuxLoop,
            other => debug!("i8042: ignored command {other:#x}"),
        }
    }
}

impl MutDevicePio for I8042 {
    fn pio_read(&mut self, base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = match base.0 {
            I8042_COMMAND_PORT => self.status(),
            _ => self.out.take().unwrap_or(0),
        };
    }

    fn pio_write(&mut self, base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
        if data.len() != 1 {
            debug!("i8042: ignored {}-byte write", data.len());
            return;
        }
        match base.0 {
            I8042_COMMAND_PORT => self.command(data[0]),
            _ => match std::mem::replace(&mut self.next_write, DataWrite::Device) {
                DataWrite::Ctr => self.ctr = data[0],
                DataWrite::KbdLoop => self.output(data[0], false),
                DataWrite::AuxLoop => self.output(data[0], true),
                DataWrite::Device => debug!("i8042: ignored data {:#x} (no keyboard)", data[0]),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(dev: &mut I8042, port: u16) -> u8 {
        let mut b = [0u8];
        dev.pio_read(PioAddress(port), 0, &mut b);
        b[0]
    }

    fn wr(dev: &mut I8042, port: u16, v: u8) {
        dev.pio_write(PioAddress(port), 0, &[v]);
    }

    #[test]
    fn reset_signals_the_eventfd_once_per_command() {
        let mut kbd = I8042::new().unwrap();
        let evt = kbd.reset_evt().try_clone().unwrap();
        assert!(evt.read().is_err(), "nothing before the reset");
        // 0xFE written as data (to the keyboard) is not a reset.
        wr(&mut kbd, I8042_DATA_PORT, 0xfe);
        assert!(evt.read().is_err());
        wr(&mut kbd, I8042_COMMAND_PORT, 0xfe);
        assert_eq!(evt.read().unwrap(), 1);
        wr(&mut kbd, I8042_COMMAND_PORT, 0xfe);
        wr(&mut kbd, I8042_COMMAND_PORT, 0xfe);
        assert_eq!(evt.read().unwrap(), 2);
    }

    #[test]
    fn probe_sequence() {
        let mut kbd = I8042::new().unwrap();
        assert_eq!(rd(&mut kbd, 0x64) & SB_OUT_DATA_AVAIL, 0);
        wr(&mut kbd, 0x64, 0xaa);
        assert_ne!(rd(&mut kbd, 0x64) & SB_OUT_DATA_AVAIL, 0);
        assert_eq!(rd(&mut kbd, 0x60), 0x55);
        assert_eq!(rd(&mut kbd, 0x64) & SB_OUT_DATA_AVAIL, 0);
        wr(&mut kbd, 0x64, 0x60);
        wr(&mut kbd, 0x60, 0x65);
        wr(&mut kbd, 0x64, 0x20);
        assert_eq!(rd(&mut kbd, 0x60), 0x65);
        // Key lock open, so Linux does not warn.
        assert_ne!(rd(&mut kbd, 0x64) & SB_KEYLOCK_OPEN, 0);
        // Disabling the aux port shows in the control register.
        wr(&mut kbd, 0x64, 0xa7);
        wr(&mut kbd, 0x64, 0x20);
        assert_ne!(rd(&mut kbd, 0x60) & CTR_AUX_DISABLE, 0);
        wr(&mut kbd, 0x64, 0xa8);
        wr(&mut kbd, 0x64, 0x20);
        assert_eq!(rd(&mut kbd, 0x60) & CTR_AUX_DISABLE, 0);
        // Aux loopback echoes as aux data.
        wr(&mut kbd, 0x64, 0xd3);
        wr(&mut kbd, 0x60, 0x5a);
        assert_eq!(rd(&mut kbd, 0x64) & (SB_OUT_DATA_AVAIL | SB_AUX_DATA), 0x21);
        assert_eq!(rd(&mut kbd, 0x60), 0x5a);
        // Keyboard loopback echoes as keyboard data.
        wr(&mut kbd, 0x64, 0xd2);
        wr(&mut kbd, 0x60, 0xa5);
        assert_eq!(rd(&mut kbd, 0x64) & (SB_OUT_DATA_AVAIL | SB_AUX_DATA), 0x01);
        assert_eq!(rd(&mut kbd, 0x60), 0xa5);
        // A command cancels the parameter the previous one waited for.
        wr(&mut kbd, 0x64, 0xd3);
        wr(&mut kbd, 0x64, 0xa8);
        wr(&mut kbd, 0x60, 0x77);
        assert_eq!(
            rd(&mut kbd, 0x64) & SB_OUT_DATA_AVAIL,
            0,
            "0x77 went to the keyboard"
        );
        // Wrong-sized accesses are ignored.
        kbd.pio_write(PioAddress(0x64), 0, &[0xfe, 0]);
        assert!(kbd.reset_evt().read().is_err());
        let mut two = [0u8; 2];
        kbd.pio_read(PioAddress(0x64), 0, &mut two);
        assert_eq!(two, [0xff, 0xff]);
    }
}
