// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! PCI configuration mechanism #1 ([`PciRoot`] at 0xcf8..0xcff) over the host bridge, a
//! [`PciConfigSpace`] with a 32-bit, an I/O and a 64-bit BAR and two capabilities, and a
//! virtio-pci device; plus the [`PciMmioWindow`] that BARs are mapped in.
//!
//! Input: operations until the input ends (the first byte picks one, modulo 7):
//! 0 port write (offset u8 modulo 9, width index u8, value u32); 1 port read (offset,
//! width index); 2 latch write of a config address (u32, biased towards enabled, bus 0,
//! function 0); 3 window map (address u32, size log2 u8, which device u8); 4 window
//! unmap (address u32); 5 window read and 6 window write (address u32, width index).
//!
//! Invariants, after every operation:
//! - every bit of every function's config space that the PCI spec makes read-only keeps
//!   its value (ids, class, header type, status, capability list, interrupt pin, BAR type
//!   bits), and a BAR's address bits below its size stay 0;
//! - the CONFIG_ADDRESS latch changes only on a dword write at 0xcf8 and reads back as
//!   written; CONFIG_DATA reads the selected function's register (the bytes the access
//!   covers), or all ones when nothing is selected or the access is malformed;
//! - BARs mapped in the window stay inside it and never overlap; an access reaches the BAR
//!   it falls in, at an offset inside it;
//! - no panic, no `error!`, no repeated `warn!`.

use std::sync::{Arc, Mutex, PoisonError};

use tvm_bus::{
    BarAccess, PciBarKind, PciConfigSpace, PciDevice, PciHeaderConfig, PciMmioWindow, PciRoot,
    NUM_CONFIG_REGS, PCI_CONFIG_IO_BASE,
};
use tvm_virtio::VirtioPciDevice;
use tvm_virtio_net::Net;
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::{DeviceMmio, MutDevicePio};

use crate::guest::{self, RecordingSink};
use crate::net::MemBackend;
use crate::{logger, Input};

const WIDTHS: [usize; 6] = [1, 2, 4, 8, 3, 0];
const WINDOW_START: u64 = 0xc000_0000;
const WINDOW_LEN: u64 = 0x3ec0_0000;

/// A function on the bus, its register contents when created, and the bits a guest may
/// change in each register.
struct Function {
    dev: Arc<Mutex<dyn PciDevice>>,
    initial: Vec<u32>,
    mutable: [u32; NUM_CONFIG_REGS],
    /// (register, size) of each BAR's low dword, for the alignment rule.
    bars: Vec<(usize, u64, u32)>,
}

impl Function {
    fn new(dev: Arc<Mutex<dyn PciDevice>>) -> Self {
        let initial = (0..NUM_CONFIG_REGS)
            .map(|r| lock(&dev).config_read(r))
            .collect();
        let mut mutable = [0u32; NUM_CONFIG_REGS];
        // PCI 3.0, 6.2: command bits (I/O, memory, master, parity, SERR#, INTx disable),
        // cache line size and latency timer, interrupt line.
        mutable[1] = 0x0547;
        mutable[3] = 0x0000_ffff;
        mutable[15] = 0x0000_00ff;
        Function {
            dev,
            initial,
            mutable,
            bars: Vec::new(),
        }
    }

    /// A BAR at `reg` of `size` bytes: the address bits at and above the size change.
    fn bar(&mut self, reg: usize, size: u64, kind: PciBarKind) {
        let type_bits = match kind {
            PciBarKind::Io => 0x3,
            _ => 0xf,
        };
        let addr_mask = !(size - 1);
        self.mutable[reg] = addr_mask as u32 & !type_bits;
        if kind == PciBarKind::Mmio64 {
            self.mutable[reg + 1] = (addr_mask >> 32) as u32;
        }
        self.bars.push((reg, size, type_bits));
    }

    fn check(&self, slot: usize) {
        let mut dev = lock(&self.dev);
        for reg in 0..NUM_CONFIG_REGS {
            let now = dev.config_read(reg);
            let changed = now ^ self.initial[reg];
            assert_eq!(
                changed & !self.mutable[reg],
                0,
                "slot {slot} register {reg:#x}: read-only bits changed, {:#010x} -> {now:#010x}",
                self.initial[reg]
            );
        }
        for &(reg, size, type_bits) in &self.bars {
            let v = dev.config_read(reg);
            let low = (size - 1) as u32 & !type_bits;
            assert_eq!(
                v & low,
                0,
                "slot {slot} BAR register {reg}: {v:#x} not aligned to {size:#x}"
            );
        }
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A BAR in the window that records the offsets it is accessed at.
#[derive(Default)]
struct Recorder {
    accesses: Mutex<Vec<u64>>,
}

impl BarAccess for Recorder {
    fn bar_read(&self, offset: u64, data: &mut [u8]) {
        lock(&self.accesses).push(offset);
        data.fill(0x5a);
    }

    fn bar_write(&self, offset: u64, _data: &[u8]) {
        lock(&self.accesses).push(offset);
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    logger::start_input();
    let mut input = Input::new(data);
    let mut root = PciRoot::new();
    let mut functions = vec![Function::new(
        root.device(0).expect("host bridge in slot 0"),
    )];

    let mut cfg = PciConfigSpace::new(&PciHeaderConfig {
        vendor_id: 0x1234,
        device_id: 0x5678,
        revision_id: 2,
        prog_if: 1,
        subclass: 0x80,
        class_code: 0xff,
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 0x4321,
        interrupt_pin: 2,
    });
    let bars = [
        (0, 0x1000, PciBarKind::Mmio32),
        (1, 0x20, PciBarKind::Io),
        (2, 0x10_0000, PciBarKind::Mmio64),
    ];
    for (i, size, kind) in bars {
        cfg.add_bar(i, size, kind).expect("valid BAR");
    }
    cfg.add_capability(&[0x09, 0, 12, 1, 2, 3, 4, 5, 6, 7, 8, 9])
        .expect("room");
    let msix = cfg
        .add_capability(&[0x11, 0, 3, 0, 0, 0x40, 0, 0, 0, 0x60, 0, 0])
        .expect("room");
    cfg.set_writable_mask(msix / 4, 0xc000_0000)
        .expect("register");
    let test_dev: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(cfg));
    let slot = root.add_device(test_dev.clone()).expect("free slot");
    assert_eq!(slot, 1);
    let mut f = Function::new(test_dev);
    for (i, size, kind) in bars {
        f.bar(4 + i, size, kind);
    }
    f.mutable[msix / 4] = 0xc000_0000;
    functions.push(f);

    let (backend, _state) = MemBackend::new();
    let mem = guest::new_mem(0);
    let virtio = VirtioPciDevice::new(
        Net::new(backend, [2, 0, 0, 0, 0, 9]),
        mem,
        Arc::new(RecordingSink::default()),
    )
    .expect("transport");
    let virtio: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(virtio));
    root.add_device(virtio.clone()).expect("free slot");
    let mut f = Function::new(virtio);
    f.bar(4, tvm_virtio::BAR_SIZE, PciBarKind::Mmio64);
    // The MSI-X capability's enable and function-mask bits.
    let mut ptr = (f.initial[13] & 0xfc) as usize;
    while ptr >= 0x40 {
        let reg = f.initial[ptr / 4];
        if reg & 0xff == 0x11 {
            f.mutable[ptr / 4] = 0xc000_0000;
        }
        ptr = ((reg >> 8) & 0xfc) as usize;
    }
    functions.push(f);

    let window = PciMmioWindow::new(WINDOW_START, WINDOW_LEN);
    let recorders: Vec<Arc<Recorder>> = (0..3).map(|_| Arc::new(Recorder::default())).collect();
    // What the window should hold: (base, size, recorder).
    let mut mapped: Vec<(u64, u64, usize)> = Vec::new();

    let base = PioAddress(PCI_CONFIG_IO_BASE);
    let mut ops = 0;
    while !input.is_empty() && ops < 512 {
        ops += 1;
        match input.u8() % 7 {
            0 => {
                let off = u16::from(input.u8() % 9);
                let len = WIDTHS[usize::from(input.u8() % 6)];
                let v = input.u32();
                let latch = root.config_address();
                let data = &v.to_le_bytes()[..len.min(4)];
                root.pio_write(base, off, data);
                let expected = if off == 0 && data.len() == 4 {
                    v
                } else {
                    latch
                };
                assert_eq!(
                    root.config_address(),
                    expected,
                    "CONFIG_ADDRESS after a write at {off}"
                );
            }
            1 => {
                let off = u16::from(input.u8() % 9);
                let len = WIDTHS[usize::from(input.u8() % 6)];
                let mut data = vec![0u8; len.min(8)];
                root.pio_read(base, off, &mut data);
                let start = usize::from(off % 4);
                let good = matches!(len, 1 | 2 | 4) && start + len <= 4 && off < 8;
                let expected: Vec<u8> = if !good {
                    vec![0xff; data.len()]
                } else {
                    let dword = if off < 4 {
                        root.config_address()
                    } else {
                        selected_register(&root)
                    };
                    dword.to_le_bytes()[start..start + len].to_vec()
                };
                assert_eq!(data, expected, "port read at offset {off}, {len} bytes");
            }
            2 => {
                let raw = input.u32();
                let v = if raw & 1 == 0 {
                    // Enabled, bus 0, function 0: the register and slot from the rest.
                    0x8000_0000 | (raw & 0x0000_f8fc)
                } else {
                    raw
                };
                root.pio_write(base, 0, &v.to_le_bytes());
            }
            3 => {
                let addr = u64::from(input.u32());
                let size = 1u64 << (input.u8() % 32);
                let which = usize::from(input.u8() % 3);
                let ok = window.map(addr, size, recorders[which].clone()).is_ok();
                let end = addr.checked_add(size);
                let inside =
                    addr >= WINDOW_START && end.is_some_and(|e| e <= WINDOW_START + WINDOW_LEN);
                let free = mapped
                    .iter()
                    .all(|&(b, s, _)| end.is_some_and(|e| e <= b) || b + s <= addr);
                assert_eq!(ok, inside && free, "map {addr:#x}+{size:#x}: {ok}");
                if ok {
                    mapped.push((addr, size, which));
                }
            }
            4 => {
                let addr = u64::from(input.u32());
                let was = mapped.iter().position(|&(b, _, _)| b == addr);
                assert_eq!(window.unmap(addr), was.is_some(), "unmap {addr:#x}");
                if let Some(i) = was {
                    mapped.remove(i);
                }
            }
            op => {
                let addr = u64::from(input.u32());
                let len = WIDTHS[usize::from(input.u8() % 6)];
                for r in &recorders {
                    lock(&r.accesses).clear();
                }
                if (WINDOW_START..WINDOW_START + WINDOW_LEN).contains(&addr) {
                    let mut data = vec![0u8; len];
                    let offset = addr - WINDOW_START;
                    if op == 5 {
                        window.mmio_read(MmioAddress(WINDOW_START), offset, &mut data);
                    } else {
                        window.mmio_write(MmioAddress(WINDOW_START), offset, &data);
                    }
                }
                let hit = mapped.iter().find(|&&(b, s, _)| addr >= b && addr - b < s);
                for (i, r) in recorders.iter().enumerate() {
                    let got = lock(&r.accesses).clone();
                    match hit {
                        Some(&(b, _, w)) if w == i => {
                            assert_eq!(got, vec![addr - b], "window access at {addr:#x}")
                        }
                        _ => assert!(got.is_empty(), "window access at {addr:#x} reached BAR {i}"),
                    }
                }
            }
        }
        for (slot, f) in functions.iter().enumerate() {
            f.check(slot);
        }
    }
}

/// The register CONFIG_DATA reads now: the selected function's, or all ones.
fn selected_register(root: &PciRoot) -> u32 {
    let a = root.config_address();
    let enabled = a & 0x8000_0000 != 0;
    let bus = (a >> 16) & 0xff;
    let slot = ((a >> 11) & 0x1f) as u8;
    let function = (a >> 8) & 0x7;
    let reg = ((a >> 2) & 0x3f) as usize;
    if !enabled || bus != 0 || function != 0 {
        return u32::MAX;
    }
    root.device(slot)
        .map_or(u32::MAX, |d| lock(&d).config_read(reg))
}
