// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The MC146818 CMOS real-time clock and NVRAM.

use std::time::{SystemTime, UNIX_EPOCH};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

/// CMOS index port (0x70); the data port follows it.
pub const CMOS_PORT: u16 = 0x70;
/// Ports the CMOS spans: index, then data.
pub const CMOS_PORT_LEN: u16 = 2;

/// Bytes of CMOS (clock registers and NVRAM), addressed by a 7-bit index.
const CMOS_LEN: usize = 128;
/// Bit 7 of the index port masks NMIs; it is not part of the index.
const INDEX_MASK: u8 = 0x7f;

/// The MC146818 CMOS RTC at 0x70/0x71, reporting the host's UTC time in BCD and 24-hour
/// mode.
///
/// - Register A reads with update-in-progress (UIP) clear: the time is computed at each
///   read, so no update cycle is ever under way, and Linux's `mc146818_avoid_UIP` never
///   has to wait and retry.
/// - Register D reads "valid RAM and time"; registers C (no interrupt ever flags) and B
///   (BCD, 24 h, no interrupts enabled) are fixed. The clock cannot be set: writes to the
///   time registers land in the NVRAM behind them and are not read back.
/// - Other bytes are 128 bytes of NVRAM, zero at start, kept as written.
/// - The index is 7 bits: bit 7 of a write to port 0x70 (the NMI mask) is dropped, so every
///   index names a byte of the array.
///
/// Accesses other than one byte wide read as all ones and are ignored as writes.
#[derive(Debug)]
pub struct Cmos {
    index: u8,
    nvram: [u8; CMOS_LEN],
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
    /// A CMOS with a zeroed NVRAM and index 0.
    pub fn new() -> Self {
        Cmos {
            index: 0,
            nvram: [0; CMOS_LEN],
        }
    }

    /// A CMOS in a saved state (a snapshot's): the index register and as much NVRAM as
    /// the state holds (the rest zero); the clock registers read the host clock anyway.
    pub fn from_state(state: &tvm_snapshot::CmosState) -> Self {
        let mut cmos = Cmos::new();
        cmos.index = state.index & 0x7f;
        let n = state.data.len().min(CMOS_LEN);
        cmos.nvram[..n].copy_from_slice(&state.data[..n]);
        cmos
    }

    /// The index register and NVRAM, for a snapshot.
    pub fn save_state(&self) -> tvm_snapshot::CmosState {
        tvm_snapshot::CmosState {
            index: self.index,
            data: self.nvram.to_vec(),
        }
    }

    /// The selected register (always below 128).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Register `index` (below 128) at Unix time `now`.
    pub fn read_reg(&self, index: u8, now: u64) -> u8 {
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
            i => self.nvram[usize::from(i & INDEX_MASK)],
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
            0 => self.index = data[0] & INDEX_MASK,
            _ => self.nvram[usize::from(self.index & INDEX_MASK)] = data[0],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(dev: &mut Cmos, offset: u16) -> u8 {
        let mut b = [0u8];
        dev.pio_read(PioAddress(CMOS_PORT), offset, &mut b);
        b[0]
    }

    fn wr(dev: &mut Cmos, offset: u16, v: u8) {
        dev.pio_write(PioAddress(CMOS_PORT), offset, &[v]);
    }

    #[test]
    fn nvram_and_index_survive_a_snapshot() {
        let mut c = Cmos::new();
        wr(&mut c, 0, 0x40);
        wr(&mut c, 1, 0x99);
        wr(&mut c, 0, 0x41);
        let saved = c.save_state();
        assert_eq!((saved.index, saved.data[0x40]), (0x41, 0x99));
        let mut back = Cmos::from_state(&saved);
        assert_eq!(back.index(), 0x41);
        wr(&mut back, 0, 0x40);
        assert_eq!(rd(&mut back, 1), 0x99);
        // Bits and bytes no CMOS has are dropped.
        let odd = tvm_snapshot::CmosState {
            index: 0xff,
            data: vec![1; 300],
        };
        assert_eq!(Cmos::from_state(&odd).index(), 0x7f);
    }

    #[test]
    fn time_is_bcd() {
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
        assert_eq!(c.read_reg(0x0d, t), 0x80, "valid ram and time");
    }

    #[test]
    fn index_and_nvram() {
        let mut c = Cmos::new();
        wr(&mut c, 0, 0x80 | 0x40);
        assert_eq!(rd(&mut c, 0), 0x40);
        assert_eq!(c.index(), 0x40);
        wr(&mut c, 1, 0xab);
        assert_eq!(rd(&mut c, 1), 0xab);
        // The highest index is a byte of NVRAM too.
        wr(&mut c, 0, 0xff);
        assert_eq!(c.index(), 0x7f);
        wr(&mut c, 1, 0xcd);
        assert_eq!(rd(&mut c, 1), 0xcd);
        // Wide accesses: all ones, no effect.
        c.pio_write(PioAddress(CMOS_PORT), 0, &[1, 2]);
        assert_eq!(c.index(), 0x7f);
        let mut two = [0u8; 2];
        c.pio_read(PioAddress(CMOS_PORT), 1, &mut two);
        assert_eq!(two, [0xff, 0xff]);
    }
}
