// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The i8042 keyboard controller with a minimal PS/2 keyboard behind it (no mouse).
//!
//! The keyboard has no keys of its own: it answers the commands Linux's atkbd sends, and
//! the VMM makes it press Ctrl-Alt-Del ([`I8042::trigger_ctrl_alt_del`]). Its bytes reach
//! the guest through the controller's one-byte output buffer, one byte per IRQ 1 edge.

use std::collections::VecDeque;

use log::{debug, error, info};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vmm_sys_util::eventfd::EventFd;

use crate::{Error, Result};

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

/// Control register: a keyboard byte in the output buffer raises IRQ 1.
const CTR_KBD_INT: u8 = 0x01;
/// Control register: keyboard port disabled (its clock held low, so it sends nothing).
const CTR_KBD_DISABLE: u8 = 0x10;
/// Control register: aux port disabled.
const CTR_AUX_DISABLE: u8 = 0x20;
/// Control register: translate the keyboard's scancode set 2 into set 1 (Linux keeps this
/// on unless booted with `i8042.direct`; atkbd then reads set 1).
const CTR_XLATE: u8 = 0x40;
/// Control register at power-on: keyboard interrupt enabled, system flag, translation.
const CTR_DEFAULT: u8 = 0x47;

// Keyboard commands (written to the data port), as Linux's
// drivers/input/keyboard/atkbd.c names them.
const KBD_CMD_SETLEDS: u8 = 0xed;
const KBD_CMD_ECHO: u8 = 0xee;
const KBD_CMD_SCANSET: u8 = 0xf0;
const KBD_CMD_GETID: u8 = 0xf2;
const KBD_CMD_SETREP: u8 = 0xf3;
const KBD_CMD_ENABLE: u8 = 0xf4;
const KBD_CMD_RESET_DIS: u8 = 0xf5;
const KBD_CMD_RESET_DEF: u8 = 0xf6;
/// Set 3 "all keys typematic / make-break / make / typematic-make-break" (0xF7..=0xFA),
/// each without a parameter; atkbd sends 0xFA (`ATKBD_CMD_SETALL_MBR`) after choosing set 3.
const KBD_CMD_SETALL: std::ops::RangeInclusive<u8> = 0xf7..=0xfa;
const KBD_CMD_RESEND: u8 = 0xfe;
const KBD_CMD_RESET_BAT: u8 = 0xff;
/// The lowest command byte. A byte at least this large while the keyboard waits for a
/// parameter is a new command (no parameter of 0xED, 0xF0 or 0xF3 is that large).
const KBD_CMD_MIN: u8 = 0xed;

/// Keyboard answer: command acknowledged.
const KBD_REPLY_ACK: u8 = 0xfa;
/// Keyboard answer: command not understood, send again (libps2 `PS2_RET_NAK`).
const KBD_REPLY_RESEND: u8 = 0xfe;
/// Keyboard answer after a reset: basic assurance test passed.
const KBD_REPLY_BAT_OK: u8 = 0xaa;
/// Keyboard answer to Echo.
const KBD_REPLY_ECHO: u8 = 0xee;
/// The ID of an MF2 keyboard, what Get ID answers after its ACK.
const KBD_ID: [u8; 2] = [0xab, 0x83];

/// Keyboard bytes held at most: queued plus the one in the controller's output buffer.
///
/// Linux's `i8042_flush` reads at most `I8042_BUFFER_SIZE` (16) bytes and, when the output
/// buffer is still full after that, decides there is no controller; it runs before the
/// driver probes, so a bigger queue filled before the guest's driver loads would hide the
/// controller. 16 bytes hold a Ctrl-Alt-Del in any scancode set (at most 11 bytes) and the
/// longest command answer (3 bytes) with room to spare.
const KBD_BUFFER_LEN: usize = 16;

/// Prefix of an extended key in scancode sets 1 and 2.
const SC_EXTENDED: u8 = 0xe0;
/// Prefix of a key release in scancode sets 2 and 3.
const SC_RELEASE: u8 = 0xf0;
/// Set 1 marks a release by setting bit 7 of the make code.
const SC1_RELEASE_BIT: u8 = 0x80;

/// A key's make code in each scancode set.
#[derive(Clone, Copy, Debug)]
struct Key {
    set1: u8,
    set2: u8,
    set3: u8,
    /// Sets 1 and 2 send [`SC_EXTENDED`] before the code (set 3 never does).
    extended: bool,
}

/// Left Ctrl.
const KEY_LEFT_CTRL: Key = Key {
    set1: 0x1d,
    set2: 0x14,
    set3: 0x11,
    extended: false,
};
/// Left Alt.
const KEY_LEFT_ALT: Key = Key {
    set1: 0x38,
    set2: 0x11,
    set3: 0x19,
    extended: false,
};
/// Delete in the navigation block (not keypad `.`).
const KEY_DELETE: Key = Key {
    set1: 0x53,
    set2: 0x71,
    set3: 0x64,
    extended: true,
};

/// A PS/2 scancode set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ScanSet {
    One = 1,
    Two = 2,
    Three = 3,
}

impl ScanSet {
    fn from_param(param: u8) -> Option<Self> {
        match param {
            1 => Some(ScanSet::One),
            2 => Some(ScanSet::Two),
            3 => Some(ScanSet::Three),
            _ => None,
        }
    }
}

/// Appends the bytes of pressing (or releasing) `key` in `set`.
fn key_bytes(key: Key, set: ScanSet, release: bool, out: &mut Vec<u8>) {
    match set {
        ScanSet::One => {
            if key.extended {
                out.push(SC_EXTENDED);
            }
            out.push(if release {
                key.set1 | SC1_RELEASE_BIT
            } else {
                key.set1
            });
        }
        ScanSet::Two => {
            if key.extended {
                out.push(SC_EXTENDED);
            }
            if release {
                out.push(SC_RELEASE);
            }
            out.push(key.set2);
        }
        ScanSet::Three => {
            if release {
                out.push(SC_RELEASE);
            }
            out.push(key.set3);
        }
    }
}

/// Ctrl, Alt and Delete pressed in that order, then released in the opposite order.
fn ctrl_alt_del_bytes(set: ScanSet) -> Vec<u8> {
    let keys = [KEY_LEFT_CTRL, KEY_LEFT_ALT, KEY_DELETE];
    let mut out = Vec::with_capacity(11);
    for key in keys {
        key_bytes(key, set, false, &mut out);
    }
    for key in keys.into_iter().rev() {
        key_bytes(key, set, true, &mut out);
    }
    out
}

/// The PS/2 keyboard on the controller's keyboard port: what it has to send and the
/// settings a guest can change.
#[derive(Debug)]
struct Keyboard {
    /// Answers to commands; a keyboard answers a command before it sends more keys.
    replies: VecDeque<u8>,
    /// Scancodes of key presses and releases.
    keys: VecDeque<u8>,
    /// The byte handed to the controller's output buffer that the guest has not read yet.
    in_controller: Option<u8>,
    /// The byte handed to the controller last, for Resend.
    last_sent: Option<u8>,
    /// The scancode set the keyboard sends (before the controller translates it).
    set: ScanSet,
    /// Whether the keyboard sends keys (0xF5 stops it, 0xF4 starts it again).
    scanning: bool,
    /// The command whose parameter the next byte is.
    param_for: Option<u8>,
}

impl Keyboard {
    fn new() -> Self {
        Keyboard {
            replies: VecDeque::with_capacity(KBD_BUFFER_LEN),
            keys: VecDeque::with_capacity(KBD_BUFFER_LEN),
            in_controller: None,
            last_sent: None,
            set: ScanSet::Two,
            scanning: true,
            param_for: None,
        }
    }

    /// Bytes the keyboard holds, the one in the controller's output buffer included.
    fn held(&self) -> usize {
        self.replies.len() + self.keys.len() + usize::from(self.in_controller.is_some())
    }

    /// Room for more bytes.
    fn room(&self) -> usize {
        KBD_BUFFER_LEN - self.held()
    }

    /// Queues an answer to a command; what does not fit is dropped, keeping what was queued.
    fn reply(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.room() == 0 {
                debug!("i8042: keyboard queue full, dropped answer {b:#x}");
            } else {
                self.replies.push_back(b);
            }
        }
    }

    /// Queues all of `bytes` as key scancodes, or none of them.
    fn send_keys(&mut self, bytes: &[u8]) -> Result<()> {
        if !self.scanning {
            return Err(Error::QueueKeysDisabled);
        }
        if self.room() < bytes.len() {
            return Err(Error::QueueKeysFull {
                needed: bytes.len(),
                free: self.room(),
            });
        }
        self.keys.extend(bytes);
        Ok(())
    }

    /// Hands the next byte to the controller's output buffer, if that holds none of ours.
    fn transmit(&mut self) {
        if self.in_controller.is_none() {
            self.in_controller = self.replies.pop_front().or_else(|| self.keys.pop_front());
            if self.in_controller.is_some() {
                self.last_sent = self.in_controller;
            }
        }
    }

    /// The guest read our byte from the output buffer.
    fn take(&mut self) -> Option<u8> {
        self.in_controller.take()
    }

    /// Drops what has not reached the controller yet, as a keyboard does on Enable and on
    /// the resets.
    fn clear(&mut self) {
        self.replies.clear();
        self.keys.clear();
        self.param_for = None;
    }

    /// Back to the power-on settings (0xF5, 0xF6, 0xFF): set 2, nothing queued.
    fn set_defaults(&mut self, scanning: bool) {
        self.clear();
        self.set = ScanSet::Two;
        self.scanning = scanning;
    }

    /// A byte the guest sent to the keyboard: a command or the parameter of the last one.
    fn write(&mut self, byte: u8) {
        if let Some(cmd) = self.param_for.take() {
            if byte < KBD_CMD_MIN {
                self.parameter(cmd, byte);
                return;
            }
            debug!("i8042: keyboard command {cmd:#x} got command {byte:#x} as its parameter");
        }
        match byte {
            KBD_CMD_SETLEDS | KBD_CMD_SETREP | KBD_CMD_SCANSET => {
                self.param_for = Some(byte);
                self.reply(&[KBD_REPLY_ACK]);
            }
            KBD_CMD_ECHO => self.reply(&[KBD_REPLY_ECHO]),
            KBD_CMD_GETID => self.reply(&[KBD_REPLY_ACK, KBD_ID[0], KBD_ID[1]]),
            KBD_CMD_ENABLE => {
                self.clear();
                self.scanning = true;
                self.reply(&[KBD_REPLY_ACK]);
            }
            KBD_CMD_RESET_DIS => {
                self.set_defaults(false);
                self.reply(&[KBD_REPLY_ACK]);
            }
            KBD_CMD_RESET_DEF => {
                self.set_defaults(true);
                self.reply(&[KBD_REPLY_ACK]);
            }
            KBD_CMD_RESET_BAT => {
                self.set_defaults(true);
                self.reply(&[KBD_REPLY_ACK, KBD_REPLY_BAT_OK]);
            }
            KBD_CMD_RESEND => {
                if let Some(b) = self.last_sent {
                    self.reply(&[b]);
                }
            }
            b if KBD_CMD_SETALL.contains(&b) => self.reply(&[KBD_REPLY_ACK]),
            other => {
                debug!("i8042: unknown keyboard command {other:#x}");
                self.reply(&[KBD_REPLY_RESEND]);
            }
        }
    }

    /// The parameter byte of `cmd`.
    fn parameter(&mut self, cmd: u8, param: u8) {
        if cmd != KBD_CMD_SCANSET {
            // LEDs and typematic rate: nothing to show or repeat.
            self.reply(&[KBD_REPLY_ACK]);
            return;
        }
        if param == 0 {
            self.reply(&[KBD_REPLY_ACK, self.set as u8]);
        } else if let Some(set) = ScanSet::from_param(param) {
            self.set = set;
            self.reply(&[KBD_REPLY_ACK]);
        } else {
            debug!("i8042: keyboard asked for scancode set {param}");
            self.reply(&[KBD_REPLY_RESEND]);
        }
    }
}

/// What the next write to the data port means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DataWrite {
    /// A byte for the keyboard: a command or its parameter.
    Device,
    /// The new control register (after command 0x60).
    Ctr,
    /// Echo back as keyboard data (after 0xD2).
    KbdLoop,
    /// Echo back as aux data (after 0xD3).
    AuxLoop,
}

/// Whose byte a controller-made output byte claims to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// The controller's answer to its own command.
    Controller,
    /// Keyboard data (keyboard loopback).
    Keyboard,
    /// Aux data (aux loopback).
    Aux,
}

/// An i8042 with a minimal PS/2 keyboard: enough for Linux to probe it without waiting,
/// for `reboot=k`, and for the VMM to press Ctrl-Alt-Del.
///
/// - Command 0xFE (pulse the CPU reset line) writes the reset EventFd
///   ([`I8042::reset_evt`]) once per command; the VMM decides what a reset means.
/// - The controller answers its own commands at once: read/write the control register,
///   self test (0x55), interface tests (0x00), port enable/disable, keyboard and aux
///   loopback. The status register's output-buffer-full bit is set exactly while a byte
///   waits at the data port.
/// - A keyboard sits on the keyboard port. It answers the commands Linux's atkbd sends
///   (reset, Get ID, Echo, scancode set, LEDs, typematic rate, enable, disable, defaults;
///   anything else gets 0xFE, resend) and, on [`I8042::trigger_ctrl_alt_del`], presses and
///   releases Ctrl, Alt and Delete in the scancode set the guest reads: set 1 while the
///   control register asks for translation (bit 6, on at power-on and kept by Linux), else
///   the keyboard's own set (2 unless the guest chose another). Its bytes wait in a queue
///   of at most 16 and enter the one-byte output buffer one at a time, while the keyboard
///   port is enabled; answers to commands go before queued keys. A byte of the controller
///   (a command answer) goes before a keyboard byte waiting in the output buffer, which
///   comes back once the guest has read it.
/// - Each keyboard byte placed in the output buffer writes the keyboard interrupt EventFd
///   ([`I8042::kbd_interrupt_evt`], ISA IRQ 1) once, if the control register enables the
///   keyboard interrupt (bit 0) and the keyboard port (bit 4 clear); so does enabling them
///   while a keyboard byte waits there. The VMM registers it as an edge irqfd: one write per
///   byte, none while a byte just waits.
/// - No mouse is attached: bytes written for the aux port are dropped, and IRQ 12 is never
///   raised. The DSDT lists only the keyboard port (no PS/2 mouse), so Linux skips the aux
///   port, whose probe would otherwise wait 250 ms for an IRQ 12 that never comes.
///
/// Port accesses are one byte wide; other widths read as all ones and writes are ignored.
/// The device is placed at [`I8042_DATA_PORT`] and [`I8042_COMMAND_PORT`] (two one-byte
/// ranges) and tells them apart by the base address.
#[derive(Debug)]
pub struct I8042 {
    reset_evt: EventFd,
    reset_logged: bool,
    kbd_interrupt_evt: EventFd,
    /// Whether IRQ 1 is up: signalled for the keyboard byte now in the output buffer.
    kbd_irq_up: bool,
    ctr: u8,
    /// A byte the controller made; the guest reads it before the keyboard's.
    out: Option<(u8, Origin)>,
    kbd: Keyboard,
    next_write: DataWrite,
}

impl I8042 {
    /// A controller with its power-on control register, an empty output buffer and a
    /// keyboard in its power-on state (scanning, set 2, nothing to send).
    ///
    /// # Errors
    /// The reset or keyboard interrupt EventFd cannot be created.
    pub fn new() -> Result<Self> {
        Ok(I8042 {
            reset_evt: crate::eventfd()?,
            reset_logged: false,
            kbd_interrupt_evt: crate::eventfd()?,
            kbd_irq_up: false,
            ctr: CTR_DEFAULT,
            out: None,
            kbd: Keyboard::new(),
            next_write: DataWrite::Device,
        })
    }

    /// The controller's and keyboard's configuration, for a snapshot.
    pub fn save_state(&self) -> tvm_snapshot::I8042State {
        tvm_snapshot::I8042State {
            ctr: self.ctr,
            scan_set: self.kbd.set as u8,
            scanning: self.kbd.scanning,
        }
    }

    /// Puts a saved configuration (a snapshot's) on this controller; buffers stay empty. A
    /// scancode set no keyboard has leaves the keyboard's as it is.
    pub fn restore_state(&mut self, state: &tvm_snapshot::I8042State) {
        self.ctr = state.ctr;
        if let Some(set) = ScanSet::from_param(state.scan_set) {
            self.kbd.set = set;
        }
        self.kbd.scanning = state.scanning;
    }

    /// Written (incremented by one) each time the guest pulses the reset line.
    pub fn reset_evt(&self) -> &EventFd {
        &self.reset_evt
    }

    /// The keyboard interrupt, ISA IRQ 1: written (incremented by one) each time a keyboard
    /// byte becomes available at the data port while the control register enables the
    /// keyboard interrupt and port, and when they get enabled with such a byte waiting. The
    /// VMM registers it as an edge-triggered irqfd on GSI 1.
    pub fn kbd_interrupt_evt(&self) -> &EventFd {
        &self.kbd_interrupt_evt
    }

    /// Presses Ctrl, Alt and Delete, then releases them, on the keyboard.
    ///
    /// The bytes are in the scancode set the guest reads (see [`I8042`]): with translation
    /// on (the default, and what Linux keeps) `1d 38 e0 53 e0 d3 b8 9d`; without it, in
    /// set 2, `14 11 e0 71 e0 f0 71 f0 11 f0 14`. The set is chosen now: bytes already
    /// queued stay as they are if the guest changes it later.
    ///
    /// # Errors
    /// Nothing is queued, and the error says why, when the keyboard queue lacks room for
    /// all the bytes ([`Error::QueueKeysFull`]; the guest has not read the keys sent
    /// before) or the guest disabled the keyboard with command 0xF5
    /// ([`Error::QueueKeysDisabled`]; atkbd does while it probes).
    pub fn trigger_ctrl_alt_del(&mut self) -> Result<()> {
        let set = if self.ctr & CTR_XLATE != 0 {
            ScanSet::One
        } else {
            self.kbd.set
        };
        let bytes = ctrl_alt_del_bytes(set);
        self.kbd.send_keys(&bytes)?;
        debug!("i8042: ctrl-alt-del queued in scancode set {}", set as u8);
        self.update();
        Ok(())
    }

    /// The status register.
    pub fn status(&self) -> u8 {
        let mut s = SB_SYSTEM_FLAG | SB_KEYLOCK_OPEN;
        match self.out {
            Some((_, origin)) => {
                s |= SB_OUT_DATA_AVAIL;
                if origin == Origin::Aux {
                    s |= SB_AUX_DATA;
                }
            }
            None if self.kbd.in_controller.is_some() => s |= SB_OUT_DATA_AVAIL,
            None => {}
        }
        s
    }

    /// Puts a byte of the controller's in the output buffer, in front of a keyboard byte
    /// waiting there.
    fn output(&mut self, byte: u8, origin: Origin) {
        self.out = Some((byte, origin));
        // A new byte: keyboard loopback data raises IRQ 1 again.
        self.kbd_irq_up = false;
    }

    /// Whether IRQ 1 should be up: a keyboard byte at the data port, the keyboard interrupt
    /// and port enabled.
    fn kbd_irq_level(&self) -> bool {
        let kbd_byte = match self.out {
            Some((_, origin)) => origin == Origin::Keyboard,
            None => self.kbd.in_controller.is_some(),
        };
        kbd_byte && self.ctr & CTR_KBD_INT != 0 && self.ctr & CTR_KBD_DISABLE == 0
    }

    /// Lets the keyboard send its next byte if the port is enabled, and signals IRQ 1 when
    /// its level rises.
    fn update(&mut self) {
        if self.ctr & CTR_KBD_DISABLE == 0 {
            self.kbd.transmit();
        }
        let level = self.kbd_irq_level();
        if level && !self.kbd_irq_up {
            if let Err(e) = self.kbd_interrupt_evt.write(1) {
                // Only a full counter (2^64 - 2 unread interrupts) makes this fail.
                error!("failed to signal the i8042 keyboard interrupt: {e}");
            }
        }
        self.kbd_irq_up = level;
    }

    /// The guest reads the data port.
    fn read_data(&mut self) -> u8 {
        let byte = match self.out.take() {
            Some((b, _)) => Some(b),
            None => self.kbd.take(),
        };
        // The byte is gone: the next one is a new edge.
        self.kbd_irq_up = false;
        self.update();
        byte.unwrap_or(0)
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
            CMD_READ_CTR => self.output(self.ctr, Origin::Controller),
            CMD_WRITE_CTR => self.next_write = DataWrite::Ctr,
            CMD_SELF_TEST => self.output(SELF_TEST_OK, Origin::Controller),
            CMD_KBD_TEST | CMD_AUX_TEST => self.output(INTERFACE_TEST_OK, Origin::Controller),
            CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DISABLE,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUX_DISABLE,
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLE,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBD_DISABLE,
            CMD_KBD_LOOP => self.next_write = DataWrite::KbdLoop,
            CMD_AUX_LOOP => self.next_write = DataWrite::AuxLoop,
            other => debug!("i8042: ignored command {other:#x}"),
        }
    }

    fn write_data(&mut self, byte: u8) {
        match std::mem::replace(&mut self.next_write, DataWrite::Device) {
            DataWrite::Ctr => self.ctr = byte,
            DataWrite::KbdLoop => self.output(byte, Origin::Keyboard),
            DataWrite::AuxLoop => self.output(byte, Origin::Aux),
            DataWrite::Device => self.kbd.write(byte),
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
            _ => self.read_data(),
        };
    }

    fn pio_write(&mut self, base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
        if data.len() != 1 {
            debug!("i8042: ignored {}-byte write", data.len());
            return;
        }
        match base.0 {
            I8042_COMMAND_PORT => self.command(data[0]),
            _ => self.write_data(data[0]),
        }
        self.update();
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

    /// Interrupts signalled since the last call.
    fn irqs(dev: &I8042) -> u64 {
        dev.kbd_interrupt_evt().read().unwrap_or(0)
    }

    fn obf(dev: &mut I8042) -> bool {
        rd(dev, I8042_COMMAND_PORT) & SB_OUT_DATA_AVAIL != 0
    }

    /// Reads the data port while the output buffer is full, checking one interrupt per
    /// byte read after the first (whose interrupt the caller counts).
    fn drain(dev: &mut I8042) -> Vec<u8> {
        let mut got = Vec::new();
        while obf(dev) {
            got.push(rd(dev, I8042_DATA_PORT));
            let want = u64::from(obf(dev));
            assert_eq!(
                irqs(dev),
                want,
                "one interrupt for the byte after {got:02x?}"
            );
        }
        got
    }

    fn write_ctr(dev: &mut I8042, ctr: u8) {
        wr(dev, I8042_COMMAND_PORT, CMD_WRITE_CTR);
        wr(dev, I8042_DATA_PORT, ctr);
    }

    /// Sends keyboard bytes and returns the answer, with one interrupt per byte.
    fn kbd_cmd(dev: &mut I8042, bytes: &[u8]) -> Vec<u8> {
        let mut got = Vec::new();
        for &b in bytes {
            wr(dev, I8042_DATA_PORT, b);
            let first = u64::from(obf(dev));
            assert_eq!(irqs(dev), first, "interrupt for the answer to {b:#x}");
            got.extend(drain(dev));
        }
        got
    }

    const CAD_SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
    const CAD_SET2: [u8; 11] = [
        0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
    ];
    const CAD_SET3: [u8; 9] = [0x11, 0x19, 0x64, 0xf0, 0x64, 0xf0, 0x19, 0xf0, 0x11];

    #[test]
    fn the_configuration_survives_a_snapshot() {
        let mut kbd = I8042::new().unwrap();
        write_ctr(&mut kbd, 0x65);
        // Disable (which also restores the defaults), then set 3.
        kbd_cmd(&mut kbd, &[0xf5]);
        kbd_cmd(&mut kbd, &[0xf0, 3]);
        let saved = kbd.save_state();
        assert_eq!(
            (saved.ctr, saved.scan_set, saved.scanning),
            (0x65, 3, false)
        );
        let mut back = I8042::new().unwrap();
        back.restore_state(&saved);
        assert_eq!(back.save_state(), saved);
        // A set no keyboard has is not taken.
        back.restore_state(&tvm_snapshot::I8042State {
            scan_set: 9,
            ..saved
        });
        assert_eq!(back.save_state().scan_set, 3);
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
        // A command cancels the parameter the previous one waited for: 0x77 goes to the
        // keyboard, which does not know it (resend), instead of coming back as aux data.
        wr(&mut kbd, 0x64, 0xd3);
        wr(&mut kbd, 0x64, 0xa8);
        wr(&mut kbd, 0x60, 0x77);
        assert_eq!(
            rd(&mut kbd, 0x64) & (SB_OUT_DATA_AVAIL | SB_AUX_DATA),
            0x01,
            "0x77 went to the keyboard"
        );
        assert_eq!(rd(&mut kbd, 0x60), KBD_REPLY_RESEND);
        // Wrong-sized accesses are ignored.
        kbd.pio_write(PioAddress(0x64), 0, &[0xfe, 0]);
        assert!(kbd.reset_evt().read().is_err());
        let mut two = [0u8; 2];
        kbd.pio_read(PioAddress(0x64), 0, &mut two);
        assert_eq!(two, [0xff, 0xff]);
    }

    #[test]
    fn kbd_interrupt_once_per_byte_only_when_enabled() {
        let mut kbd = I8042::new().unwrap();
        assert_eq!(irqs(&kbd), 0);

        // Enabled (power-on): one interrupt for the first byte, none while it waits.
        kbd.trigger_ctrl_alt_del().unwrap();
        assert_eq!(irqs(&kbd), 1);
        assert_eq!(rd(&mut kbd, I8042_COMMAND_PORT), 0x15);
        assert_eq!(irqs(&kbd), 0, "status reads raise nothing");
        // Keyboard commands and other writes while a byte waits raise nothing either.
        write_ctr(&mut kbd, CTR_DEFAULT);
        assert_eq!(irqs(&kbd), 0, "a byte just waiting");
        // Then one per byte read while more follow, none after the last.
        assert_eq!(drain(&mut kbd), CAD_SET1);
        assert_eq!(irqs(&kbd), 0);

        // Keyboard interrupt off: the guest polls, no interrupt at all.
        write_ctr(&mut kbd, CTR_DEFAULT & !CTR_KBD_INT);
        kbd.trigger_ctrl_alt_del().unwrap();
        assert!(obf(&mut kbd));
        assert_eq!(irqs(&kbd), 0);
        assert_eq!(rd(&mut kbd, I8042_DATA_PORT), CAD_SET1[0]);
        assert_eq!(irqs(&kbd), 0);
        // Turning it on with a byte waiting raises it once, for that byte.
        write_ctr(&mut kbd, CTR_DEFAULT);
        assert_eq!(irqs(&kbd), 1);
        assert_eq!(drain(&mut kbd), CAD_SET1[1..]);

        // Keyboard port disabled: the keyboard holds its bytes, no interrupt; enabling the
        // port lets the first through, with one interrupt.
        wr(&mut kbd, I8042_COMMAND_PORT, CMD_KBD_DISABLE);
        kbd.trigger_ctrl_alt_del().unwrap();
        assert!(!obf(&mut kbd));
        assert_eq!(irqs(&kbd), 0);
        wr(&mut kbd, I8042_COMMAND_PORT, CMD_KBD_ENABLE);
        assert_eq!(irqs(&kbd), 1);
        assert_eq!(drain(&mut kbd), CAD_SET1);

        // Disabling the port leaves a byte already in the output buffer there, but takes
        // IRQ 1 down: turning the interrupt off and on meanwhile raises nothing, enabling
        // the port raises it again for that byte.
        kbd.trigger_ctrl_alt_del().unwrap();
        assert_eq!(irqs(&kbd), 1);
        wr(&mut kbd, I8042_COMMAND_PORT, CMD_KBD_DISABLE);
        assert!(obf(&mut kbd));
        write_ctr(&mut kbd, (CTR_DEFAULT | CTR_KBD_DISABLE) & !CTR_KBD_INT);
        write_ctr(&mut kbd, CTR_DEFAULT | CTR_KBD_DISABLE);
        assert_eq!(irqs(&kbd), 0);
        wr(&mut kbd, I8042_COMMAND_PORT, CMD_KBD_ENABLE);
        assert_eq!(irqs(&kbd), 1);
        assert_eq!(drain(&mut kbd), CAD_SET1);

        // Controller answers are no keyboard bytes; keyboard loopback is, one per byte.
        wr(&mut kbd, I8042_COMMAND_PORT, CMD_READ_CTR);
        assert_eq!(irqs(&kbd), 0);
        assert_eq!(rd(&mut kbd, I8042_DATA_PORT), CTR_DEFAULT);
        for v in [0x12, 0x34] {
            wr(&mut kbd, I8042_COMMAND_PORT, CMD_KBD_LOOP);
            wr(&mut kbd, I8042_DATA_PORT, v);
            assert_eq!(irqs(&kbd), 1);
        }
        assert_eq!(rd(&mut kbd, I8042_DATA_PORT), 0x34);
        assert_eq!(irqs(&kbd), 0);
    }

    #[test]
    fn controller_answer_goes_before_a_waiting_key() {
        let mut kbd = I8042::new().unwrap();
        kbd.trigger_ctrl_alt_del().unwrap();
        assert_eq!(irqs(&kbd), 1);
        // The guest reads the control register before the key.
        wr(&mut kbd, I8042_COMMAND_PORT, CMD_READ_CTR);
        assert_eq!(rd(&mut kbd, I8042_DATA_PORT), CTR_DEFAULT);
        // The key is back, as a new byte at the data port.
        assert_eq!(irqs(&kbd), 1);
        assert_eq!(drain(&mut kbd), CAD_SET1);
    }

    #[test]
    fn reading_drains_the_queue_in_order() {
        let mut kbd = I8042::new().unwrap();
        // Empty: reads give 0 and change nothing.
        assert_eq!(rd(&mut kbd, I8042_DATA_PORT), 0);
        kbd.trigger_ctrl_alt_del().unwrap();
        kbd.trigger_ctrl_alt_del().unwrap();
        let mut got = Vec::new();
        for _ in 0..16 {
            assert!(obf(&mut kbd));
            got.push(rd(&mut kbd, I8042_DATA_PORT));
        }
        assert_eq!(got, [CAD_SET1, CAD_SET1].concat());
        assert!(!obf(&mut kbd));
        assert_eq!(rd(&mut kbd, I8042_DATA_PORT), 0);
    }

    #[test]
    fn ctrl_alt_del_bytes_per_scancode_set() {
        // Translation on (power-on, and what Linux keeps): set 1, what the controller
        // makes of the keyboard's set 2.
        let mut kbd = I8042::new().unwrap();
        kbd.trigger_ctrl_alt_del().unwrap();
        assert_eq!(irqs(&kbd), 1);
        assert_eq!(drain(&mut kbd), CAD_SET1);

        // Translation off (`i8042.direct`, or firmware that cleared it): the keyboard's set.
        write_ctr(&mut kbd, CTR_DEFAULT & !CTR_XLATE);
        kbd.trigger_ctrl_alt_del().unwrap();
        assert_eq!(irqs(&kbd), 1);
        assert_eq!(drain(&mut kbd), CAD_SET2);
        assert_eq!(kbd_cmd(&mut kbd, &[KBD_CMD_SCANSET, 3]), [0xfa, 0xfa]);
        kbd.trigger_ctrl_alt_del().unwrap();
        assert_eq!(irqs(&kbd), 1);
        assert_eq!(drain(&mut kbd), CAD_SET3);
        assert_eq!(kbd_cmd(&mut kbd, &[KBD_CMD_SCANSET, 1]), [0xfa, 0xfa]);
        kbd.trigger_ctrl_alt_del().unwrap();
        assert_eq!(irqs(&kbd), 1);
        assert_eq!(drain(&mut kbd), CAD_SET1);

        // Translation on again: set 1 whatever the keyboard's set.
        write_ctr(&mut kbd, CTR_DEFAULT);
        assert_eq!(kbd_cmd(&mut kbd, &[KBD_CMD_SCANSET, 2]), [0xfa, 0xfa]);
        kbd.trigger_ctrl_alt_del().unwrap();
        assert_eq!(irqs(&kbd), 1);
        assert_eq!(drain(&mut kbd), CAD_SET1);
    }

    #[test]
    fn keyboard_answers_commands() {
        let mut kbd = I8042::new().unwrap();
        // Reset: ACK, then the self-test result.
        assert_eq!(kbd_cmd(&mut kbd, &[0xff]), [0xfa, 0xaa]);
        // Get ID: ACK and an MF2 keyboard's ID.
        assert_eq!(kbd_cmd(&mut kbd, &[0xf2]), [0xfa, 0xab, 0x83]);
        // Echo.
        assert_eq!(kbd_cmd(&mut kbd, &[0xee]), [0xee]);
        // Scancode set: get answers the current one, set changes it.
        assert_eq!(kbd_cmd(&mut kbd, &[0xf0, 0]), [0xfa, 0xfa, 2]);
        assert_eq!(kbd_cmd(&mut kbd, &[0xf0, 3]), [0xfa, 0xfa]);
        assert_eq!(kbd_cmd(&mut kbd, &[0xf0, 0]), [0xfa, 0xfa, 3]);
        assert_eq!(kbd_cmd(&mut kbd, &[0xf0, 1]), [0xfa, 0xfa]);
        assert_eq!(kbd_cmd(&mut kbd, &[0xf0, 0]), [0xfa, 0xfa, 1]);
        // No set 4; the set stays.
        assert_eq!(kbd_cmd(&mut kbd, &[0xf0, 4]), [0xfa, 0xfe]);
        assert_eq!(kbd_cmd(&mut kbd, &[0xf0, 0]), [0xfa, 0xfa, 1]);
        // LEDs and typematic rate, each with its parameter.
        assert_eq!(kbd_cmd(&mut kbd, &[0xed, 0x07]), [0xfa, 0xfa]);
        assert_eq!(kbd_cmd(&mut kbd, &[0xf3, 0x00]), [0xfa, 0xfa]);
        // A parameter byte that is a command is that command (here Echo).
        assert_eq!(kbd_cmd(&mut kbd, &[0xed, 0xee]), [0xfa, 0xee]);
        // Enable, disable, defaults; the resets go back to set 2.
        assert_eq!(kbd_cmd(&mut kbd, &[0xf4]), [0xfa]);
        assert_eq!(kbd_cmd(&mut kbd, &[0xf5]), [0xfa]);
        assert_eq!(kbd_cmd(&mut kbd, &[0xf6]), [0xfa]);
        assert_eq!(kbd_cmd(&mut kbd, &[0xf0, 0]), [0xfa, 0xfa, 2]);
        // Set 3's all-keys commands (atkbd sends 0xFA after choosing set 3).
        assert_eq!(kbd_cmd(&mut kbd, &[0xf7, 0xf8, 0xf9, 0xfa]), [0xfa; 4]);
        // Resend repeats the last byte sent.
        assert_eq!(kbd_cmd(&mut kbd, &[0xf2, 0xfe]), [0xfa, 0xab, 0x83, 0x83]);
        // Unknown commands (atkbd's 0xE8 and 0xEA probes among them) get resend.
        assert_eq!(kbd_cmd(&mut kbd, &[0xe8, 0xea, 0x00]), [0xfe; 3]);
    }

    #[test]
    fn atkbd_probe_without_dumbkbd() {
        // What Linux's atkbd_connect sends on a translating controller, answered in full
        // and in order, one interrupt per byte: Get ID, deactivate, LEDs off, typematic
        // rate, activate. Then keys arrive.
        let mut kbd = I8042::new().unwrap();
        let seq = [0xf2, 0xf5, 0xed, 0x00, 0xf3, 0x00, 0xf4];
        let want = [0xfa, 0xab, 0x83, 0xfa, 0xfa, 0xfa, 0xfa, 0xfa, 0xfa];
        assert_eq!(kbd_cmd(&mut kbd, &seq), want);
        kbd.trigger_ctrl_alt_del().unwrap();
        assert_eq!(irqs(&kbd), 1);
        assert_eq!(drain(&mut kbd), CAD_SET1);
    }

    #[test]
    fn answers_go_before_queued_keys() {
        let mut kbd = I8042::new().unwrap();
        kbd.trigger_ctrl_alt_del().unwrap();
        assert_eq!(irqs(&kbd), 1);
        // Set LEDs while the first key waits: the key already in the output buffer comes
        // first, then the ACK, then the other keys.
        wr(&mut kbd, I8042_DATA_PORT, KBD_CMD_SETLEDS);
        assert_eq!(irqs(&kbd), 0);
        assert_eq!(rd(&mut kbd, I8042_DATA_PORT), CAD_SET1[0]);
        assert_eq!(irqs(&kbd), 1);
        assert_eq!(rd(&mut kbd, I8042_DATA_PORT), KBD_REPLY_ACK);
        assert_eq!(irqs(&kbd), 1);
        wr(&mut kbd, I8042_DATA_PORT, 0x02);
        assert_eq!(rd(&mut kbd, I8042_DATA_PORT), CAD_SET1[1]);
        assert_eq!(irqs(&kbd), 1);
        assert_eq!(
            drain(&mut kbd),
            [&[KBD_REPLY_ACK][..], &CAD_SET1[2..]].concat()
        );
    }

    #[test]
    fn full_queue_refuses_keys_and_keeps_what_it_has() {
        let mut kbd = I8042::new().unwrap();
        kbd.trigger_ctrl_alt_del().unwrap();
        kbd.trigger_ctrl_alt_del().unwrap();
        // 16 bytes held (one in the output buffer): no room for 8 more.
        match kbd.trigger_ctrl_alt_del() {
            Err(Error::QueueKeysFull { needed: 8, free: 0 }) => {}
            other => panic!("{other:?}"),
        }
        // Room for some but not all: still refused, and nothing queued.
        for _ in 0..3 {
            rd(&mut kbd, I8042_DATA_PORT);
        }
        match kbd.trigger_ctrl_alt_del() {
            Err(Error::QueueKeysFull { needed: 8, free: 3 }) => {}
            other => panic!("{other:?}"),
        }
        // Answers that do not fit are dropped, not the keys before them.
        let more = [0xee; 4];
        for b in more {
            wr(&mut kbd, I8042_DATA_PORT, b);
        }
        irqs(&kbd);
        let mut got = Vec::new();
        while obf(&mut kbd) {
            got.push(rd(&mut kbd, I8042_DATA_PORT));
        }
        // The answers jump the queued keys; the key in the output buffer stays first.
        let want = [&[CAD_SET1[3]][..], &[0xee; 3], &CAD_SET1[4..], &CAD_SET1].concat();
        assert_eq!(got, want);
        kbd.trigger_ctrl_alt_del().unwrap();
    }

    #[test]
    fn disabled_keyboard_refuses_keys() {
        let mut kbd = I8042::new().unwrap();
        assert_eq!(kbd_cmd(&mut kbd, &[KBD_CMD_RESET_DIS]), [0xfa]);
        assert!(matches!(
            kbd.trigger_ctrl_alt_del(),
            Err(Error::QueueKeysDisabled)
        ));
        assert!(!obf(&mut kbd));
        assert_eq!(kbd_cmd(&mut kbd, &[KBD_CMD_ENABLE]), [0xfa]);
        kbd.trigger_ctrl_alt_del().unwrap();
        assert_eq!(irqs(&kbd), 1);
        assert_eq!(drain(&mut kbd), CAD_SET1);
    }

    #[test]
    fn keyboard_enable_and_resets_drop_what_was_not_sent() {
        let cases: [(u8, &[u8]); 4] = [
            (KBD_CMD_ENABLE, &[0xfa]),
            (KBD_CMD_RESET_DIS, &[0xfa]),
            (KBD_CMD_RESET_DEF, &[0xfa]),
            (KBD_CMD_RESET_BAT, &[0xfa, 0xaa]),
        ];
        for (cmd, answer) in cases {
            let mut kbd = I8042::new().unwrap();
            kbd.trigger_ctrl_alt_del().unwrap();
            assert_eq!(irqs(&kbd), 1);
            wr(&mut kbd, I8042_DATA_PORT, cmd);
            // The key already in the controller stays; the rest is gone, the answer
            // follows.
            assert_eq!(rd(&mut kbd, I8042_DATA_PORT), CAD_SET1[0], "{cmd:#x}");
            assert_eq!(irqs(&kbd), 1);
            assert_eq!(drain(&mut kbd), answer, "{cmd:#x}");
        }
    }
}
