// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The legacy devices of tvm-legacy (i8042, CMOS, POST port, ACPI PM1a block, pvpanic) on
//! a real port bus at the ports the VMM gives them, driven by arbitrary port accesses and
//! Ctrl-Alt-Del presses, and checked against a model of each.
//!
//! Input: operations until the input ends. Each starts with a flags byte. When its bits 1
//! to 3 are 0b001 (`flags & 0x0e == 0x02`) the VMM presses Ctrl-Alt-Del
//! (`I8042::trigger_ctrl_alt_del`) and nothing more is read. Otherwise it is a port access:
//! bit 0 of the flags says write, then come a port selector (u8, modulo the port list:
//! every device port plus unclaimed neighbours), a width selector (u8 modulo 3: 1, 2 or 4
//! bytes) and, for a write, the value (u32 LE, the low `width` bytes). (Before the
//! keyboard, only bit 0 of the flags counted; the seeds use flags 0 and 1 and mean what
//! they did.)
//!
//! Invariants, after every operation:
//! - i8042: the status register, the byte at the data port and the result of
//!   `trigger_ctrl_alt_del` are what a model of the controller and its keyboard says
//!   (control register, the controller's byte in front of the keyboard's in the output
//!   buffer, pending parameter; the keyboard's answers to each command, its scancode set,
//!   scanning flag and 16-byte queue, Ctrl-Alt-Del in the set the guest reads); the
//!   output-buffer-full bit is set exactly while a byte waits, and the aux bit only with an
//!   aux-loopback byte in front; the reset EventFd counts exactly the one-byte writes of
//!   0xFE to port 0x64; the keyboard interrupt EventFd (IRQ 1) counts exactly the keyboard
//!   bytes (the keyboard's or loopback) that came to the front of the output buffer while
//!   the control register enabled the keyboard interrupt and port, plus one each time
//!   those got enabled with such a byte in front;
//! - CMOS: the index port reads the last index written without bit 7 (always below 128);
//!   NVRAM bytes read back what was written; the clock reads as BCD with no update in
//!   progress;
//! - PM1a: status reads 0, enable what was written, control always has SCI_EN; the
//!   power-off EventFd counts exactly the bytes landing on the high byte of PM1 control
//!   with SLP_EN and SLP_TYP 5;
//! - pvpanic: reads return PANICKED | CRASH_LOADED; the panic EventFd counts exactly the
//!   one-byte writes with bit 0 set;
//! - the POST port reads 0; accesses nobody claims fail at the bus;
//! - no panic, no `error!`, no repeated `warn!`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tvm_bus::{register_pio_device, IoManager, PioAddress, PioManager};
use tvm_legacy::{AcpiPm, Cmos, DebugPort, Error, Pvpanic, I8042};
use vmm_sys_util::eventfd::EventFd;

use crate::{logger, Input};

/// Where the VMM puts the PM1a block (tvm_arch_x86::acpi::PM1A_EVT_BLK_PORT).
pub const PM1A_PORT: u16 = 0x600;
/// Where the VMM puts pvpanic (tvm_arch_x86::acpi::PVPANIC_PORT).
pub const PVPANIC_PORT: u16 = 0x505;
/// A flags byte whose bits 1 to 3 are `CAD_FLAGS` calls `trigger_ctrl_alt_del`.
const CAD_MASK: u8 = 0x0e;
/// See [`CAD_MASK`].
const CAD_FLAGS: u8 = 0x02;
/// The S5 sleep type the DSDT offers.
const S5: u8 = 5;

/// Ports an access can go to: every device port and a few unclaimed neighbours.
pub const PORTS: [u16; 17] = [
    0x60, 0x64, 0x70, 0x71, 0x80, 0x505, 0x600, 0x601, 0x602, 0x603, 0x604, 0x605, 0x5f, 0x65,
    0x72, 0x504, 0x606,
];

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CTR_KBD_INT: u8 = 0x01;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;
const OBF: u8 = 0x01;
const AUX: u8 = 0x20;

/// Keyboard bytes the i8042 holds at most, the one in the output buffer included.
const KBD_QUEUE: usize = 16;
/// Ctrl, Alt, Delete pressed then released, in scancode sets 1, 2 and 3 (written out by
/// hand rather than built from make codes, to check the device's construction).
const CAD_SET1: &[u8] = &[0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
const CAD_SET2: &[u8] = &[
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];
const CAD_SET3: &[u8] = &[0x11, 0x19, 0x64, 0xf0, 0x64, 0xf0, 0x19, 0xf0, 0x11];

/// What the i8042 should do with the next data byte.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pending {
    Device,
    Ctr,
    KbdLoop,
    AuxLoop,
}

/// A byte at the front of the output buffer, with its serial number: every byte that
/// enters the output buffer gets a new one, so a new byte is told from one still waiting.
#[derive(Clone, Copy, PartialEq, Eq)]
struct OutByte {
    value: u8,
    serial: u64,
}

/// The PS/2 keyboard behind the i8042, as the guest should see it.
struct KbdModel {
    /// Answers to commands, sent before keys.
    answers: VecDeque<u8>,
    /// Ctrl-Alt-Del scancodes.
    keys: VecDeque<u8>,
    /// The keyboard byte in the controller's output buffer (maybe behind a controller byte).
    sent: Option<OutByte>,
    /// The last byte the keyboard put in the output buffer, for Resend (0xFE).
    last: Option<u8>,
    /// The scancode set (1, 2 or 3).
    set: u8,
    /// Cleared by 0xF5, set by 0xF4, 0xF6 and 0xFF.
    scanning: bool,
    /// The command (0xED, 0xF0, 0xF3) whose parameter the next byte may be.
    param: Option<u8>,
}

impl KbdModel {
    fn held(&self) -> usize {
        self.answers.len() + self.keys.len() + usize::from(self.sent.is_some())
    }

    /// Queues an answer; bytes beyond the 16 held are dropped.
    fn answer(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.held() < KBD_QUEUE {
                self.answers.push_back(b);
            }
        }
    }

    /// Enable and the resets: what has not reached the output buffer is gone.
    fn drop_queued(&mut self) {
        self.answers.clear();
        self.keys.clear();
        self.param = None;
    }

    /// A byte the guest wrote to the data port for the keyboard.
    fn write(&mut self, v: u8) {
        if let Some(cmd) = self.param.take() {
            // Bytes from 0xED up are commands even where a parameter is expected.
            if v < 0xed {
                match (cmd, v) {
                    (0xf0, 0) => self.answer(&[0xfa, self.set]),
                    (0xf0, 1..=3) => {
                        self.set = v;
                        self.answer(&[0xfa]);
                    }
                    (0xf0, _) => self.answer(&[0xfe]),
                    _ => self.answer(&[0xfa]),
                }
                return;
            }
        }
        match v {
            0xed | 0xf0 | 0xf3 => {
                self.param = Some(v);
                self.answer(&[0xfa]);
            }
            0xee => self.answer(&[0xee]),
            0xf2 => self.answer(&[0xfa, 0xab, 0x83]),
            0xf4 => {
                self.drop_queued();
                self.scanning = true;
                self.answer(&[0xfa]);
            }
            0xf5 | 0xf6 | 0xff => {
                self.drop_queued();
                self.set = 2;
                self.scanning = v != 0xf5;
                self.answer(if v == 0xff { &[0xfa, 0xaa] } else { &[0xfa] });
            }
            0xf7..=0xfa => self.answer(&[0xfa]),
            0xfe => {
                if let Some(b) = self.last {
                    self.answer(&[b]);
                }
            }
            _ => self.answer(&[0xfe]),
        }
    }
}

/// What `trigger_ctrl_alt_del` returns.
#[derive(Debug, PartialEq, Eq)]
enum CadResult {
    Queued,
    Full { needed: usize, free: usize },
    Disabled,
}

impl CadResult {
    fn of(r: &tvm_legacy::Result<()>) -> Self {
        match r {
            Ok(()) => CadResult::Queued,
            Err(Error::QueueKeysFull { needed, free }) => CadResult::Full {
                needed: *needed,
                free: *free,
            },
            Err(Error::QueueKeysDisabled) => CadResult::Disabled,
            Err(e) => panic!("trigger_ctrl_alt_del: unexpected error {e}"),
        }
    }
}

/// Who made the controller's byte in the output buffer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Maker {
    /// An answer to a controller command.
    Controller,
    /// Keyboard loopback (0xD2): keyboard data.
    KbdLoop,
    /// Aux loopback (0xD3): aux data.
    AuxLoop,
}

/// The i8042 as the guest should see it.
struct I8042Model {
    ctr: u8,
    /// A controller-made byte, read before the keyboard's.
    out: Option<(OutByte, Maker)>,
    pending: Pending,
    kbd: KbdModel,
    /// Serial number of the next byte entering the output buffer.
    next_serial: u64,
    /// The keyboard byte that IRQ 1 was last raised for, while the line is still up.
    irq_for: Option<u64>,
    resets: u64,
    irqs: u64,
}

impl I8042Model {
    fn new() -> Self {
        I8042Model {
            ctr: 0x47,
            out: None,
            pending: Pending::Device,
            kbd: KbdModel {
                answers: VecDeque::new(),
                keys: VecDeque::new(),
                sent: None,
                last: None,
                set: 2,
                scanning: true,
                param: None,
            },
            next_serial: 0,
            irq_for: None,
            resets: 0,
            irqs: 0,
        }
    }

    fn new_byte(&mut self, value: u8) -> OutByte {
        self.next_serial += 1;
        OutByte {
            value,
            serial: self.next_serial,
        }
    }

    fn status(&self) -> u8 {
        // System flag and key lock open, always.
        let mut s = 0x14;
        match self.out {
            Some((_, maker)) => {
                s |= OBF;
                if maker == Maker::AuxLoop {
                    s |= AUX;
                }
            }
            None if self.kbd.sent.is_some() => s |= OBF,
            None => {}
        }
        s
    }

    fn command(&mut self, cmd: u8) {
        self.pending = Pending::Device;
        let answer = match cmd {
            0xfe => {
                self.resets += 1;
                None
            }
            CMD_READ_CTR => Some(self.ctr),
            CMD_WRITE_CTR => {
                self.pending = Pending::Ctr;
                None
            }
            0xaa => Some(0x55),
            0xab | 0xa9 => Some(0),
            0xa7 => {
                self.ctr |= CTR_AUX_DISABLE;
                None
            }
            0xa8 => {
                self.ctr &= !CTR_AUX_DISABLE;
                None
            }
            0xad => {
                self.ctr |= CTR_KBD_DISABLE;
                None
            }
            0xae => {
                self.ctr &= !CTR_KBD_DISABLE;
                None
            }
            0xd2 => {
                self.pending = Pending::KbdLoop;
                None
            }
            0xd3 => {
                self.pending = Pending::AuxLoop;
                None
            }
            _ => None,
        };
        if let Some(v) = answer {
            self.out = Some((self.new_byte(v), Maker::Controller));
        }
    }

    fn data(&mut self, v: u8) {
        match std::mem::replace(&mut self.pending, Pending::Device) {
            Pending::Ctr => self.ctr = v,
            Pending::KbdLoop => self.out = Some((self.new_byte(v), Maker::KbdLoop)),
            Pending::AuxLoop => self.out = Some((self.new_byte(v), Maker::AuxLoop)),
            Pending::Device => self.kbd.write(v),
        }
    }

    /// The byte the guest reads at the data port (0 when none waits).
    fn read(&mut self) -> u8 {
        if let Some((b, _)) = self.out.take() {
            b.value
        } else if let Some(b) = self.kbd.sent.take() {
            b.value
        } else {
            0
        }
    }

    /// `trigger_ctrl_alt_del`: the keys in the set the guest reads, all or nothing.
    fn ctrl_alt_del(&mut self) -> CadResult {
        let set = if self.ctr & CTR_XLATE != 0 {
            1
        } else {
            self.kbd.set
        };
        let keys = match set {
            1 => CAD_SET1,
            2 => CAD_SET2,
            _ => CAD_SET3,
        };
        let free = KBD_QUEUE - self.kbd.held();
        if !self.kbd.scanning {
            CadResult::Disabled
        } else if keys.len() > free {
            CadResult::Full {
                needed: keys.len(),
                free,
            }
        } else {
            self.kbd.keys.extend(keys);
            CadResult::Queued
        }
    }

    /// After every access: the keyboard moves its next byte into an empty output buffer
    /// while its port is enabled, and IRQ 1 is raised once for each keyboard byte (its
    /// own or loopback) that comes to the front of the output buffer while the keyboard
    /// interrupt and port are enabled, or for the one there when they become enabled.
    fn settle(&mut self) {
        let port_on = self.ctr & CTR_KBD_DISABLE == 0;
        if port_on && self.kbd.sent.is_none() {
            let next = self
                .kbd
                .answers
                .pop_front()
                .or_else(|| self.kbd.keys.pop_front());
            if let Some(v) = next {
                self.kbd.last = Some(v);
                self.kbd.sent = Some(self.new_byte(v));
            }
        }
        let front_kbd = match self.out {
            Some((b, Maker::KbdLoop)) => Some(b.serial),
            Some(_) => None,
            None => self.kbd.sent.map(|b| b.serial),
        };
        let line = front_kbd.filter(|_| port_on && self.ctr & CTR_KBD_INT != 0);
        if line.is_some() && line != self.irq_for {
            self.irqs += 1;
        }
        self.irq_for = line;
    }
}

/// CMOS registers that are the clock or its control, not NVRAM.
fn is_clock_register(index: u8) -> bool {
    matches!(index, 0x00 | 0x02 | 0x04 | 0x06..=0x0d | 0x32)
}

fn is_bcd(v: u8) -> bool {
    v >> 4 <= 9 && v & 0xf <= 9
}

/// How many increments `evt` got since the last call.
fn count(evt: &EventFd) -> u64 {
    evt.read().unwrap_or(0)
}

/// The i8042's EventFds count what the model says since the last check.
fn check_signals(kbd: &mut I8042Model, reset_evt: &EventFd, kbd_irq_evt: &EventFd) {
    assert_eq!(count(reset_evt), std::mem::take(&mut kbd.resets), "resets");
    assert_eq!(
        count(kbd_irq_evt),
        std::mem::take(&mut kbd.irqs),
        "keyboard interrupts (IRQ 1)"
    );
}

/// Runs one input.
pub fn run(data: &[u8]) {
    logger::start_input();
    let mut input = Input::new(data);

    let i8042 = I8042::new().expect("eventfd");
    let reset_evt = i8042.reset_evt().try_clone().expect("dup");
    let kbd_irq_evt = i8042.kbd_interrupt_evt().try_clone().expect("dup");
    let pm = AcpiPm::new(u16::from(S5)).expect("eventfd");
    let poweroff_evt = pm.poweroff_evt().try_clone().expect("dup");
    let pvpanic = Pvpanic::new().expect("eventfd");
    let panic_evt = pvpanic.panic_evt().try_clone().expect("dup");
    let i8042 = Arc::new(Mutex::new(i8042));
    let mut io = IoManager::new();
    register_pio_device(&mut io, 0x60, 1, i8042.clone()).expect("free");
    register_pio_device(&mut io, 0x64, 1, i8042.clone()).expect("free");
    register_pio_device(&mut io, 0x70, 2, Arc::new(Mutex::new(Cmos::new()))).expect("free");
    register_pio_device(&mut io, 0x80, 1, Arc::new(Mutex::new(DebugPort))).expect("free");
    register_pio_device(&mut io, PM1A_PORT, 6, Arc::new(Mutex::new(pm))).expect("free");
    register_pio_device(&mut io, PVPANIC_PORT, 1, Arc::new(Mutex::new(pvpanic))).expect("free");

    let mut kbd = I8042Model::new();
    let mut cmos_index = 0u8;
    let mut nvram = [0u8; 128];
    let mut pm1_enable = [0u8; 2];
    let (mut poweroffs, mut panics) = (0u64, 0u64);

    let mut ops = 0;
    while !input.is_empty() && ops < 4096 {
        ops += 1;
        let flags = input.u8();
        if flags & CAD_MASK == CAD_FLAGS {
            let got = i8042.lock().expect("unpoisoned").trigger_ctrl_alt_del();
            assert_eq!(CadResult::of(&got), kbd.ctrl_alt_del(), "ctrl-alt-del");
            kbd.settle();
            check_signals(&mut kbd, &reset_evt, &kbd_irq_evt);
            continue;
        }
        let write = flags & 1 != 0;
        let port = PORTS[usize::from(input.u8()) % PORTS.len()];
        let width = [1usize, 2, 4][usize::from(input.u8() % 3)];
        let fits = |base: u16, len: u16| port >= base && port + width as u16 <= base + len;
        let expect_claimed = fits(0x60, 1)
            || fits(0x64, 1)
            || fits(0x70, 2)
            || fits(0x80, 1)
            || fits(PM1A_PORT, 6)
            || fits(PVPANIC_PORT, 1);
        let pm_range = PM1A_PORT..PM1A_PORT + 6;
        if write {
            let value = input.u32().to_le_bytes();
            let bytes = &value[..width];
            let claimed = io.pio_write(PioAddress(port), bytes).is_ok();
            assert_eq!(claimed, expect_claimed, "write of {width} at {port:#x}");
            if !claimed {
                continue;
            }
            match (port, width) {
                (0x64, 1) => {
                    kbd.command(bytes[0]);
                    kbd.settle();
                }
                (0x60, 1) => {
                    kbd.data(bytes[0]);
                    kbd.settle();
                }
                (0x70, 1) => cmos_index = bytes[0] & 0x7f,
                (0x71, 1) => nvram[usize::from(cmos_index)] = bytes[0],
                (PVPANIC_PORT, 1) => panics += u64::from(bytes[0] & 1),
                (p, _) if pm_range.contains(&p) => {
                    for (i, b) in bytes.iter().enumerate() {
                        match p - PM1A_PORT + i as u16 {
                            2 => pm1_enable[0] = *b,
                            3 => pm1_enable[1] = *b,
                            5 if b & 0x20 != 0 && (b >> 2) & 7 == S5 => poweroffs += 1,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        } else {
            let mut buf = vec![0u8; width];
            let claimed = io.pio_read(PioAddress(port), &mut buf).is_ok();
            assert_eq!(claimed, expect_claimed, "read of {width} at {port:#x}");
            if !claimed {
                continue;
            }
            match (port, width) {
                (0x64, 1) => assert_eq!(buf[0], kbd.status(), "i8042 status"),
                (0x60, 1) => {
                    let want = kbd.read();
                    assert_eq!(buf[0], want, "i8042 data");
                    kbd.settle();
                }
                (0x70, 1) => {
                    assert_eq!(buf[0], cmos_index, "cmos index");
                    assert!(buf[0] < 0x80, "cmos index out of range");
                }
                (0x71, 1) => match cmos_index {
                    0x0a => assert_eq!(buf[0] & 0x80, 0, "update in progress"),
                    0x0b..=0x0d => {}
                    i if is_clock_register(i) => assert!(is_bcd(buf[0]), "clock {buf:?}"),
                    i => assert_eq!(buf[0], nvram[usize::from(i)], "nvram {i:#x}"),
                },
                (0x80, _) => assert!(buf.iter().all(|&b| b == 0), "post port read {buf:?}"),
                (PVPANIC_PORT, 1) => assert_eq!(buf[0], 0x03, "pvpanic events"),
                (p, _) if pm_range.contains(&p) => {
                    for (i, b) in buf.iter().enumerate() {
                        match p - PM1A_PORT + i as u16 {
                            0 | 1 => assert_eq!(*b, 0, "pm1 status"),
                            2 => assert_eq!(*b, pm1_enable[0], "pm1 enable"),
                            3 => assert_eq!(*b, pm1_enable[1], "pm1 enable"),
                            4 => assert_eq!(b & 1, 1, "sci_en"),
                            5 => assert_eq!(b & 0x20, 0, "slp_en reads 0"),
                            _ => {}
                        }
                    }
                }
                // Wide accesses to one-byte registers read as all ones.
                _ => assert!(buf.iter().all(|&b| b == 0xff), "wide read {buf:?}"),
            }
        }
        check_signals(&mut kbd, &reset_evt, &kbd_irq_evt);
        assert_eq!(
            count(&poweroff_evt),
            std::mem::take(&mut poweroffs),
            "power-offs"
        );
        assert_eq!(count(&panic_evt), std::mem::take(&mut panics), "panics");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SeedWriter;

    /// One operation of the input layout.
    #[derive(Clone, Copy)]
    enum Op {
        /// Read the status register.
        St,
        /// Read the data port.
        Rd,
        /// Write the command port.
        Cmd(u8),
        /// Write the data port.
        Wr(u8),
        /// `trigger_ctrl_alt_del`.
        Cad,
    }
    use Op::{Cad, Cmd, Rd, St, Wr};

    fn input(ops: &[Op]) -> Vec<u8> {
        let sel = |port: u16| PORTS.iter().position(|&p| p == port).unwrap() as u8;
        let mut w = SeedWriter::new();
        for &op in ops {
            match op {
                St => w.u8(0).u8(sel(0x64)).u8(0),
                Rd => w.u8(0).u8(sel(0x60)).u8(0),
                Cmd(v) => w.u8(1).u8(sel(0x64)).u8(0).u32(u32::from(v)),
                Wr(v) => w.u8(1).u8(sel(0x60)).u8(0).u32(u32::from(v)),
                // Bits 4 to 7 and bit 0 do not matter.
                Cad => w.u8(0xf3),
            };
        }
        w.finish()
    }

    /// Reads the status and the data port `n` times.
    fn reads(n: usize) -> Vec<Op> {
        [St, Rd].repeat(n)
    }

    #[test]
    fn model_predicts_the_documented_sequences() {
        let mut m = I8042Model::new();
        let drain = |m: &mut I8042Model| {
            let mut got = Vec::new();
            while m.status() & OBF != 0 {
                got.push(m.read());
                m.settle();
            }
            got
        };
        assert_eq!(m.ctrl_alt_del(), CadResult::Queued);
        m.settle();
        assert_eq!(drain(&mut m), CAD_SET1);
        assert_eq!(std::mem::take(&mut m.irqs), 8);
        for (cmd, want) in [
            (&[0xff][..], &[0xfa, 0xaa][..]),
            (&[0xf2], &[0xfa, 0xab, 0x83]),
            (&[0xf0, 0], &[0xfa, 0xfa, 2]),
            (&[0xf0, 4], &[0xfa, 0xfe]),
            (&[0xed, 0xee], &[0xfa, 0xee]),
            (&[0xf2, 0xfe], &[0xfa, 0xab, 0x83, 0x83]),
            (&[0xe8], &[0xfe]),
        ] {
            let mut got = Vec::new();
            for &b in cmd {
                m.data(b);
                m.settle();
                got.extend(drain(&mut m));
            }
            assert_eq!(got, want, "{cmd:02x?}");
            assert_eq!(std::mem::take(&mut m.irqs), want.len() as u64);
        }
        m.data(0xf5);
        m.settle();
        assert_eq!(m.ctrl_alt_del(), CadResult::Disabled);
    }

    #[test]
    fn keyboard_scenarios_agree_with_the_device() {
        let scenarios: Vec<Vec<Op>> = vec![
            // atkbd's probe, then a Ctrl-Alt-Del read as the driver does.
            [
                vec![Wr(0xf2)],
                reads(3),
                vec![Wr(0xf5)],
                reads(1),
                vec![
                    Cad,
                    Wr(0xed),
                    Rd,
                    Wr(0),
                    Rd,
                    Wr(0xf3),
                    Rd,
                    Wr(0),
                    Rd,
                    Wr(0xf4),
                ],
                reads(1),
                vec![Cad],
                reads(9),
            ]
            .concat(),
            // Scancode sets without translation, chosen and queried.
            [
                vec![Cmd(0x60), Wr(0x07), Wr(0xf0), Wr(3), Cad],
                reads(12),
                vec![Wr(0xf0), Wr(1), Cad, Wr(0xf0), Wr(0)],
                reads(14),
                vec![Cmd(0x60), Wr(0x47), Wr(0xf0), Wr(0), Cad],
                reads(12),
            ]
            .concat(),
            // A full queue: refused keys, dropped answers, answers before queued keys.
            [
                vec![Cad, Cad, Cad, Rd, Rd, Rd, Cad, Wr(0xee), Wr(0xee), Wr(0xee)],
                vec![Wr(0xee), Wr(0xf2), Cad],
                reads(18),
            ]
            .concat(),
            // Port and interrupt off and on, controller bytes and loopback in front of a
            // waiting key, resets dropping queued keys.
            [
                vec![Cmd(0xad), Cad, St, Rd, Cmd(0xae), Rd, Cmd(0x60), Wr(0x46)],
                vec![
                    Rd,
                    Cmd(0x60),
                    Wr(0x47),
                    Cmd(0xaa),
                    St,
                    Cmd(0xd2),
                    Wr(0x5a),
                    St,
                    Rd,
                ],
                vec![
                    Cmd(0xd3),
                    Wr(0xa5),
                    St,
                    Rd,
                    Cmd(0x20),
                    Rd,
                    Rd,
                    Wr(0xff),
                    Cad,
                ],
                vec![Cmd(0xad), Rd, Cmd(0x60), Wr(0x56), Cmd(0xae), Rd, Wr(0xf6)],
                reads(10),
                vec![Wr(0xf0), Cmd(0xd2), Wr(0xf0), Wr(2), Wr(0xfe), Wr(0xfe)],
                reads(6),
            ]
            .concat(),
        ];
        for ops in scenarios {
            run(&input(&ops));
        }
    }
}
