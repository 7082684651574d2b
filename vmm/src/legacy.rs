//! The PC legacy devices a Linux guest touches besides the UART: the i8042 keyboard
//! controller (its reset line is how `reboot=k` reboots), the CMOS real-time clock, and the
//! POST debug port. Each is a small sans-KVM state machine on the port bus.

use std::time::{SystemTime, UNIX_EPOCH};

use log::{debug, info};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vmm_sys_util::eventfd::EventFd;

/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 status/command port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// CMOS index/data ports (0x70, 0x71).
pub const CMOS_PORT: u16 = 0x70;
/// POST code port.
pub const DEBUG_PORT: u16 = 0x80;

const I8042_CMD_READ_CTR: u8 = 0x20;
const I8042_CMD_WRITE_CTR: u8 = 0x60;
const I8042_CMD_SELF_TEST: u8 = 0xaa;
const I8042_CMD_KBD_TEST: u8 = 0xab;
const I8042_CMD_AUX_TEST: u8 = 0xa9;
const I8042_CMD_RESET_CPU: u8 = 0xfe;
const I8042_CMD_AUX_DISABLE: u8 = 0xa7;
const I8042_CMD_AUX_ENABLE: u8 = 0xa8;
const I8042_CMD_KBD_DISABLE: u8 = 0xad;
const I8042_CMD_KBD_ENABLE: u8 = 0xae;
const I8042_CMD_KBD_LOOP: u8 = 0xd2;
const I8042_CMD_AUX_LOOP: u8 = 0xd3;
/// Status: data in the output buffer came from the aux (mouse) port.
const SB_AUX_DATA: u8 = 0x20;
/// Status: keyboard not inhibited (the key lock is open).
const SB_KEYLOCK_OPEN: u8 = 0x10;
/// Control register: keyboard port disabled.
const CTR_KBD_DISABLE: u8 = 0x10;
/// Control register: aux port disabled.
const CTR_AUX_DISABLE: u8 = 0x20;
/// Status: output buffer full.
const SB_OUT_DATA_AVAIL: u8 = 0x01;
/// Status: system flag (self test passed).
const SB_SYSTEM_FLAG: u8 = 0x04;
/// Control register: keyboard interrupt enabled, system flag, translation.
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

/// A minimal i8042: enough for Linux to probe it without timeouts and for `reboot=k`
/// (command 0xFE pulses the CPU reset line, which we report through `reset_evt`). No
/// keyboard or mouse is attached.
#[derive(Debug)]
pub struct I8042 {
    reset_evt: EventFd,
    ctr: u8,
    out: Option<u8>,
    out_is_aux: bool,
    next_write: DataWrite,
}

impl I8042 {
    /// A controller that writes `reset_evt` when the guest resets the CPU through it.
    pub fn new(reset_evt: EventFd) -> Self {
        I8042 {
            reset_evt,
            ctr: CTR_DEFAULT,
            out: None,
            out_is_aux: false,
            next_write: DataWrite::Device,
        }
    }

    fn status(&self) -> u8 {
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

    fn command(&mut self, cmd: u8) {
        match cmd {
            I8042_CMD_RESET_CPU => {
                info!("guest reset the cpu through the i8042");
                if let Err(e) = self.reset_evt.write(1) {
                    log::error!("failed to signal the i8042 reset: {e}");
                }
            }
            I8042_CMD_READ_CTR => self.output(self.ctr, false),
            I8042_CMD_WRITE_CTR => self.next_write = DataWrite::Ctr,
            I8042_CMD_SELF_TEST => self.output(0x55, false),
            I8042_CMD_KBD_TEST | I8042_CMD_AUX_TEST => self.output(0x00, false),
            I8042_CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DISABLE,
            I8042_CMD_AUX_ENABLE => self.ctr &= !CTR_AUX_DISABLE,
            I8042_CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLE,
            I8042_CMD_KBD_ENABLE => self.ctr &= !CTR_KBD_DISABLE,
            I8042_CMD_KBD_LOOP => self.next_write = DataWrite::KbdLoop,
            I8042_CMD_AUX_LOOP => self.next_write = DataWrite::AuxLoop,
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

/// The MC146818 CMOS RTC at 0x70/0x71, reporting the host's UTC time in BCD, never in an
/// update cycle. Other CMOS bytes read as zero and writes to them are kept.
#[derive(Debug)]
pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

fn bcd(v: u64) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

/// (year, month, day, hour, minute, second, weekday 1 = Sunday) in UTC for a Unix time.
fn civil_from_unix(secs: u64) -> (u64, u64, u64, u64, u64, u64, u64) {
    let days = secs / 86400;
    let rem = secs % 86400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    // 1970-01-01 was a Thursday (5 with Sunday = 1).
    let wday = (days + 4) % 7 + 1;
    (
        y as u64,
        m as u64,
        d as u64,
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        wday,
    )
}

impl Cmos {
    /// A CMOS with a zeroed NVRAM.
    pub fn new() -> Self {
        Cmos {
            index: 0,
            nvram: [0; 128],
        }
    }

    fn read_reg(&self, index: u8, now: u64) -> u8 {
        let (y, mo, d, h, mi, s, wd) = civil_from_unix(now);
        match index {
            0x00 => bcd(s),
            0x02 => bcd(mi),
            0x04 => bcd(h),
            0x06 => bcd(wd),
            0x07 => bcd(d),
            0x08 => bcd(mo),
            0x09 => bcd(y % 100),
            0x32 => bcd(y / 100),
            // Register A: 32.768 kHz time base, 1024 Hz rate, update-in-progress clear.
            0x0a => 0x26,
            // Register B: 24-hour mode, BCD.
            0x0b => 0x02,
            0x0c => 0,
            // Register D: valid RAM and time.
            0x0d => 0x80,
            i => self.nvram[usize::from(i & 0x7f)],
        }
    }
}

impl MutDevicePio for Cmos {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = match offset {
            0 => self.index,
            _ => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                self.read_reg(self.index, now)
            }
        };
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        match offset {
            // Bit 7 of the index port is the NMI mask; the index is 7 bits.
            0 => self.index = data[0] & 0x7f,
            _ => self.nvram[usize::from(self.index)] = data[0],
        }
    }
}

/// The POST code port: Linux writes it for I/O delays; we accept and ignore.
#[derive(Debug, Default)]
pub struct DebugPort;

impl MutDevicePio for DebugPort {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&mut self, _base: PioAddress, _offset: PioAddressOffset, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(dev: &mut impl MutDevicePio, port: u16, offset: u16) -> u8 {
        let mut b = [0u8];
        dev.pio_read(PioAddress(port - offset), offset, &mut b);
        b[0]
    }

    fn wr(dev: &mut impl MutDevicePio, port: u16, offset: u16, v: u8) {
        dev.pio_write(PioAddress(port - offset), offset, &[v]);
    }

    #[test]
    fn i8042_reset_signals_the_eventfd() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut kbd = I8042::new(evt.try_clone().unwrap());
        assert!(evt.read().is_err(), "nothing before the reset");
        wr(&mut kbd, 0x64, 0, 0xfe);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn i8042_probe_sequence() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut kbd = I8042::new(evt);
        assert_eq!(rd(&mut kbd, 0x64, 0) & SB_OUT_DATA_AVAIL, 0);
        wr(&mut kbd, 0x64, 0, 0xaa);
        assert_ne!(rd(&mut kbd, 0x64, 0) & SB_OUT_DATA_AVAIL, 0);
        assert_eq!(rd(&mut kbd, 0x60, 0), 0x55);
        assert_eq!(rd(&mut kbd, 0x64, 0) & SB_OUT_DATA_AVAIL, 0);
        wr(&mut kbd, 0x64, 0, 0x60);
        wr(&mut kbd, 0x60, 0, 0x65);
        wr(&mut kbd, 0x64, 0, 0x20);
        assert_eq!(rd(&mut kbd, 0x60, 0), 0x65);
        // Key lock open, so Linux does not warn.
        assert_ne!(rd(&mut kbd, 0x64, 0) & SB_KEYLOCK_OPEN, 0);
        // Disabling the aux port shows in the control register.
        wr(&mut kbd, 0x64, 0, 0xa7);
        wr(&mut kbd, 0x64, 0, 0x20);
        assert_ne!(rd(&mut kbd, 0x60, 0) & CTR_AUX_DISABLE, 0);
        wr(&mut kbd, 0x64, 0, 0xa8);
        wr(&mut kbd, 0x64, 0, 0x20);
        assert_eq!(rd(&mut kbd, 0x60, 0) & CTR_AUX_DISABLE, 0);
        // Aux loopback echoes as aux data.
        wr(&mut kbd, 0x64, 0, 0xd3);
        wr(&mut kbd, 0x60, 0, 0x5a);
        assert_eq!(
            rd(&mut kbd, 0x64, 0) & (SB_OUT_DATA_AVAIL | SB_AUX_DATA),
            0x21
        );
        assert_eq!(rd(&mut kbd, 0x60, 0), 0x5a);
        // Wrong-sized accesses are ignored.
        kbd.pio_write(PioAddress(0x64), 0, &[0xfe, 0]);
        let mut two = [0u8; 2];
        kbd.pio_read(PioAddress(0x64), 0, &mut two);
        assert_eq!(two, [0xff, 0xff]);
    }

    #[test]
    fn cmos_time_is_bcd() {
        let c = Cmos::new();
        // 2026-11-25 13:56:33 UTC, a Wednesday.
        let t = 1_795_614_993;
        assert_eq!(c.read_reg(0x00, t), 0x33);
        assert_eq!(c.read_reg(0x02, t), 0x56);
        assert_eq!(c.read_reg(0x04, t), 0x13);
        assert_eq!(c.read_reg(0x07, t), 0x25);
        assert_eq!(c.read_reg(0x08, t), 0x11);
        assert_eq!(c.read_reg(0x09, t), 0x26);
        assert_eq!(c.read_reg(0x32, t), 0x20);
        assert_eq!(c.read_reg(0x06, t), 4);
        assert_eq!(c.read_reg(0x0a, t) & 0x80, 0, "never in an update cycle");
    }

    #[test]
    fn cmos_index_and_nvram() {
        let mut c = Cmos::new();
        wr(&mut c, 0x70, 0, 0x80 | 0x40);
        assert_eq!(rd(&mut c, 0x70, 0), 0x40);
        wr(&mut c, 0x71, 1, 0xab);
        assert_eq!(rd(&mut c, 0x71, 1), 0xab);
    }
}
