// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The legacy devices of tvm-legacy (i8042, CMOS, POST port, ACPI PM1a block, pvpanic) on
//! a real port bus at the ports the VMM gives them, driven by arbitrary port accesses and
//! checked against a model of each.
//!
//! Input: accesses until the input ends. Each is a flags byte (bit 0: write), a port
//! selector (u8, modulo the port list: every device port plus unclaimed neighbours), a
//! width selector (u8 modulo 3: 1, 2 or 4 bytes) and, for a write, the value (u32 LE, the
//! low `width` bytes).
//!
//! Invariants, after every access:
//! - i8042: the status register and the byte at the data port are what a model of the
//!   controller (control register, one-byte output buffer, pending parameter) says; the
//!   output-buffer-full bit is set exactly while a byte waits, and the aux bit only with
//!   it; the reset EventFd counts exactly the one-byte writes of 0xFE to port 0x64;
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

use std::sync::{Arc, Mutex};

use tvm_bus::{register_pio_device, IoManager, PioAddress, PioManager};
use tvm_legacy::{AcpiPm, Cmos, DebugPort, Pvpanic, I8042};
use vmm_sys_util::eventfd::EventFd;

use crate::{logger, Input};

/// Where the VMM puts the PM1a block (tvm_arch_x86::acpi::PM1A_EVT_BLK_PORT).
pub const PM1A_PORT: u16 = 0x600;
/// Where the VMM puts pvpanic (tvm_arch_x86::acpi::PVPANIC_PORT).
pub const PVPANIC_PORT: u16 = 0x505;
/// The S5 sleep type the DSDT offers.
const S5: u8 = 5;

/// Ports an access can go to: every device port and a few unclaimed neighbours.
pub const PORTS: [u16; 17] = [
    0x60, 0x64, 0x70, 0x71, 0x80, 0x505, 0x600, 0x601, 0x602, 0x603, 0x604, 0x605, 0x5f, 0x65,
    0x72, 0x504, 0x606,
];

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const OBF: u8 = 0x01;
const AUX: u8 = 0x20;

/// What the i8042 should do with the next data byte.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pending {
    Device,
    Ctr,
    KbdLoop,
    AuxLoop,
}

/// The i8042 as the guest should see it.
struct I8042Model {
    ctr: u8,
    out: Option<(u8, bool)>,
    pending: Pending,
    resets: u64,
}

impl I8042Model {
    fn status(&self) -> u8 {
        // System flag and key lock open, always.
        let mut s = 0x14;
        if let Some((_, aux)) = self.out {
            s |= OBF;
            if aux {
                s |= AUX;
            }
        }
        s
    }

    fn command(&mut self, cmd: u8) {
        self.pending = Pending::Device;
        match cmd {
            0xfe => self.resets += 1,
            CMD_READ_CTR => self.out = Some((self.ctr, false)),
            CMD_WRITE_CTR => self.pending = Pending::Ctr,
            0xaa => self.out = Some((0x55, false)),
            0xab | 0xa9 => self.out = Some((0, false)),
            0xa7 => self.ctr |= CTR_AUX_DISABLE,
            0xa8 => self.ctr &= !CTR_AUX_DISABLE,
            0xad => self.ctr |= CTR_KBD_DISABLE,
            0xae => self.ctr &= !CTR_KBD_DISABLE,
            0xd2 => self.pending = Pending::KbdLoop,
            0xd3 => self.pending = Pending::AuxLoop,
            _ => {}
        }
    }

    fn data(&mut self, v: u8) {
        match std::mem::replace(&mut self.pending, Pending::Device) {
            Pending::Ctr => self.ctr = v,
            Pending::KbdLoop => self.out = Some((v, false)),
            Pending::AuxLoop => self.out = Some((v, true)),
            Pending::Device => {}
        }
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

/// Runs one input.
pub fn run(data: &[u8]) {
    logger::start_input();
    let mut input = Input::new(data);

    let i8042 = I8042::new().expect("eventfd");
    let reset_evt = i8042.reset_evt().try_clone().expect("dup");
    let pm = AcpiPm::new(u16::from(S5)).expect("eventfd");
    let poweroff_evt = pm.poweroff_evt().try_clone().expect("dup");
    let pvpanic = Pvpanic::new().expect("eventfd");
    let panic_evt = pvpanic.panic_evt().try_clone().expect("dup");
    let i8042 = Arc::new(Mutex::new(i8042));
    let mut io = IoManager::new();
    register_pio_device(&mut io, 0x60, 1, i8042.clone()).expect("free");
    register_pio_device(&mut io, 0x64, 1, i8042).expect("free");
    register_pio_device(&mut io, 0x70, 2, Arc::new(Mutex::new(Cmos::new()))).expect("free");
    register_pio_device(&mut io, 0x80, 1, Arc::new(Mutex::new(DebugPort))).expect("free");
    register_pio_device(&mut io, PM1A_PORT, 6, Arc::new(Mutex::new(pm))).expect("free");
    register_pio_device(&mut io, PVPANIC_PORT, 1, Arc::new(Mutex::new(pvpanic))).expect("free");

    let mut kbd = I8042Model {
        ctr: 0x47,
        out: None,
        pending: Pending::Device,
        resets: 0,
    };
    let mut cmos_index = 0u8;
    let mut nvram = [0u8; 128];
    let mut pm1_enable = [0u8; 2];
    let (mut poweroffs, mut panics) = (0u64, 0u64);

    let mut ops = 0;
    while !input.is_empty() && ops < 4096 {
        ops += 1;
        let write = input.u8() & 1 != 0;
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
                (0x64, 1) => kbd.command(bytes[0]),
                (0x60, 1) => kbd.data(bytes[0]),
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
                    let want = kbd.out.take().map_or(0, |(b, _)| b);
                    assert_eq!(buf[0], want, "i8042 data");
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
        assert_eq!(count(&reset_evt), std::mem::take(&mut kbd.resets), "resets");
        assert_eq!(
            count(&poweroff_evt),
            std::mem::take(&mut poweroffs),
            "power-offs"
        );
        assert_eq!(count(&panic_evt), std::mem::take(&mut panics), "panics");
    }
}
