// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The virtio-pci transport: any sequence of BAR and PCI config accesses (common config,
//! notify, ISR, device config, MSI-X table, command register, MSI-X message control),
//! notifications and reset at any point, on a real device (net over an in-memory backend,
//! or block over a temporary image).
//!
//! Input: the device kind (bit 0: block), then operations until the input ends; see
//! [`Op`] for their encoding.
//!
//! Invariants, after every operation:
//! - the status the transport keeps is the one the BAR reads; a live device has
//!   FEATURES_OK and DRIVER_OK and not DEVICE_NEEDS_RESET; with FEATURES_OK the driver's
//!   features are a subset of the offered ones and include VERSION_1;
//! - num_queues is the device's; every queue size reads as a power of two no larger than
//!   the maximum; every vector reads as NO_VECTOR or an existing one;
//! - after a reset (status 0): status 0, not live, every queue disabled with its maximum
//!   size, no addresses, no vectors, ISR 0;
//! - an MSI-X message goes only to an existing vector while MSI-X is enabled, the function
//!   is not masked and the vector is not masked; INTx is raised only while MSI-X is off
//!   and INTx is not disabled in the command register;
//! - a device that is not live does not touch guest memory;
//! - no panic, no `error!`, no repeated `warn!`.

use std::sync::{Arc, PoisonError};

use tvm_bus::PciDevice;
use tvm_virtio::{
    features, status, MsixEntry, VirtioDevice, VirtioPciDevice, MSIX_TABLE_OFFSET, NOTIFY_OFFSET,
    VIRTIO_MSI_NO_VECTOR,
};
use tvm_virtio_blk::{Block, BlockConfig, IoEngine};
use tvm_virtio_net::Net;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::guest::{self, Driver, IrqCall, RecordingSink, Ring, Snapshot, TempFile};
use crate::net::{BackendState, MemBackend};
use crate::{logger, Input};

const PCI_CAP_ID_MSIX: u32 = 0x11;
const MSIX_ENABLE: u32 = 1 << 31;
const MSIX_FUNCTION_MASK: u32 = 1 << 30;
const COMMAND_INTX_DISABLE: u32 = 1 << 10;

/// The operations; the first byte of each picks one (modulo the count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Common config write: offset (u8, modulo 0x40), width index (u8), value (u64).
    CommonWrite = 0,
    /// Common config read: offset, width index.
    CommonRead,
    /// Status write: value (u8); 0 is a reset.
    Status,
    /// Whole bring-up: features wanted (u64), queue size log2 (u8) for every queue.
    BringUp,
    /// One queue's set-up: queue (u8, modulo 3), size log2 (u8).
    SetupQueue,
    /// The event loop handles a notification: queue (u8, modulo 3).
    Process,
    /// A notify-area write: offset (u8), width index (u8); then the event loop runs.
    Notify,
    /// PCI config write: register (u8, modulo 64), offset (u8, modulo 4), width index,
    /// value (u32).
    ConfigWrite,
    /// PCI config read: register (u8).
    ConfigRead,
    /// MSI-X table write: offset (u8, modulo 0x40), width index, value (u64).
    MsixWrite,
    /// Any BAR write: offset (u16, modulo 0x8000), width index, value (u64).
    BarWrite,
    /// Any BAR read: offset (u16, modulo 0x8000), width index.
    BarRead,
    /// Guest memory write: address (u16, in the rings and first buffers), length (u8),
    /// bytes.
    Memory,
    /// A frame arrives on the net backend: length (u8), bytes (net only).
    Frame,
}

const OPS: u8 = Op::Frame as u8 + 1;
/// Access widths, indexed by a byte modulo 6 (3 and 0 are invalid widths).
const WIDTHS: [usize; 6] = [1, 2, 4, 8, 3, 0];

impl Op {
    /// The op a byte selects.
    pub fn from_byte(b: u8) -> Op {
        match b % OPS {
            0 => Op::CommonWrite,
            1 => Op::CommonRead,
            2 => Op::Status,
            3 => Op::BringUp,
            4 => Op::SetupQueue,
            5 => Op::Process,
            6 => Op::Notify,
            7 => Op::ConfigWrite,
            8 => Op::ConfigRead,
            9 => Op::MsixWrite,
            10 => Op::BarWrite,
            11 => Op::BarRead,
            12 => Op::Memory,
            _ => Op::Frame,
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    logger::start_input();
    let mut input = Input::new(data);
    let mem = guest::new_mem(0x3c);
    let sink = Arc::new(RecordingSink::default());
    if input.u8() & 1 == 1 {
        let image = guest::disk_pattern(64 * 512);
        let file = TempFile::new("pci-blk", &image);
        let block = Block::open(BlockConfig {
            path: file.path().to_path_buf(),
            read_only: false,
            id: None,
            engine: IoEngine::Sync,
            ..BlockConfig::default()
        })
        .expect("a fresh image opens");
        let dev = VirtioPciDevice::new(block, mem.clone(), sink.clone()).expect("transport");
        Harness::new(dev, mem, sink, None).run(&mut input);
    } else {
        let (backend, state) = MemBackend::new();
        let net = Net::new(backend, [2, 0, 0, 0, 0, 7]);
        let dev = VirtioPciDevice::new(net, mem.clone(), sink.clone()).expect("transport");
        Harness::new(dev, mem, sink, Some(state)).run(&mut input);
    }
}

struct Harness<D: VirtioDevice> {
    dev: VirtioPciDevice<D>,
    mem: GuestMemoryMmap<()>,
    sink: Arc<RecordingSink>,
    backend: Option<Arc<std::sync::Mutex<BackendState>>>,
    msix_cap_reg: usize,
    /// MSI-X table entries as last reported to the sink (all masked after reset).
    table: Vec<MsixEntry>,
    max_sizes: Vec<u16>,
}

impl<D: VirtioDevice> Harness<D> {
    fn new(
        dev: VirtioPciDevice<D>,
        mem: GuestMemoryMmap<()>,
        sink: Arc<RecordingSink>,
        backend: Option<Arc<std::sync::Mutex<BackendState>>>,
    ) -> Self {
        let max_sizes = dev.device().queue_max_sizes().to_vec();
        let mut h = Harness {
            dev,
            mem,
            sink,
            backend,
            msix_cap_reg: 0,
            table: vec![
                MsixEntry {
                    vector_ctrl: 1,
                    ..Default::default()
                };
                max_sizes.len() + 1
            ],
            max_sizes,
        };
        h.msix_cap_reg = h.find_msix_cap();
        h
    }

    /// Follows the capability list to the MSI-X capability.
    fn find_msix_cap(&mut self) -> usize {
        let mut ptr = (self.dev.config_read(13) & 0xfc) as usize;
        for _ in 0..48 {
            let reg = self.dev.config_read(ptr / 4);
            if reg & 0xff == PCI_CAP_ID_MSIX {
                return ptr / 4;
            }
            ptr = ((reg >> 8) & 0xfc) as usize;
            assert!(ptr >= 0x40, "capability list ends without MSI-X");
        }
        panic!("capability list loops");
    }

    fn drv(&mut self) -> Driver<'_, D> {
        Driver { dev: &mut self.dev }
    }

    fn run(&mut self, input: &mut Input<'_>) {
        let mut ops = 0;
        while !input.is_empty() && ops < 256 {
            ops += 1;
            let op = Op::from_byte(input.u8());
            let was_active = self.dev.is_active();
            let before = matches!(op, Op::Process | Op::Notify | Op::Frame)
                .then(|| Snapshot::take(&self.mem));
            let mut reset = false;
            match op {
                Op::CommonWrite => {
                    let off = u64::from(input.u8() % 0x40);
                    let len = WIDTHS[usize::from(input.u8() % 6)];
                    let v = input.u64();
                    reset = off == 0x14 && len == 1 && v & 0xff == 0;
                    self.dev.bar_write(off, &v.to_le_bytes()[..len]);
                }
                Op::CommonRead => {
                    let off = u64::from(input.u8() % 0x40);
                    let len = WIDTHS[usize::from(input.u8() % 6)];
                    let mut b = [0u8; 8];
                    self.dev.bar_read(off, &mut b[..len]);
                }
                Op::Status => {
                    let v = input.u8();
                    reset = v == 0;
                    self.drv().set_status(v);
                }
                Op::BringUp => {
                    let wanted = input.u64();
                    let rings: Vec<Ring> = (0..self.max_sizes.len() as u16)
                        .map(|q| Ring::at(q, 1 << (input.u8() % 9)))
                        .collect();
                    for r in &rings {
                        r.clear_used(&self.mem);
                    }
                    self.drv().bring_up(wanted, &rings);
                }
                Op::SetupQueue => {
                    let q = u16::from(input.u8() % 3);
                    let r = Ring::at(q, 1 << (input.u8() % 9));
                    self.drv().setup_queue(q, &r);
                }
                Op::Process => {
                    let q = u16::from(input.u8() % 3);
                    self.dev.process_notification(q);
                }
                Op::Notify => {
                    let off = u64::from(input.u8());
                    let len = WIDTHS[usize::from(input.u8() % 6)];
                    self.dev
                        .bar_write(NOTIFY_OFFSET + off, &1u64.to_le_bytes()[..len]);
                    // The event loop: every queue whose EventFd fired.
                    for q in 0..self.max_sizes.len() as u16 {
                        let fired = self.dev.notify_eventfd(q).is_some_and(|e| e.read().is_ok());
                        if fired {
                            self.dev.process_notification(q);
                        }
                    }
                }
                Op::ConfigWrite => {
                    let reg = usize::from(input.u8() % 64);
                    let off = input.u8() % 4;
                    let len = [1, 2, 4][usize::from(input.u8() % 3)];
                    let v = input.u32();
                    self.dev.config_write(reg, off, &v.to_le_bytes()[..len]);
                }
                Op::ConfigRead => {
                    let reg = usize::from(input.u8());
                    self.dev.config_read(reg);
                }
                Op::MsixWrite => {
                    let off = u64::from(input.u8() % 0x40);
                    let len = WIDTHS[usize::from(input.u8() % 6)];
                    let v = input.u64();
                    self.dev
                        .bar_write(MSIX_TABLE_OFFSET + off, &v.to_le_bytes()[..len]);
                }
                Op::BarWrite => {
                    let off = u64::from(input.u16() % 0x8000);
                    let len = WIDTHS[usize::from(input.u8() % 6)];
                    let v = input.u64();
                    reset = off == 0x14 && len == 1 && v & 0xff == 0;
                    self.dev.bar_write(off, &v.to_le_bytes()[..len]);
                }
                Op::BarRead => {
                    let off = u64::from(input.u16() % 0x8000);
                    let len = WIDTHS[usize::from(input.u8() % 6)];
                    let mut b = [0u8; 8];
                    self.dev.bar_read(off, &mut b[..len]);
                }
                Op::Memory => {
                    let addr = u64::from(input.u16());
                    let len = usize::from(input.u8());
                    let bytes = input.bytes(len);
                    let _ = self.mem.write_slice(bytes, GuestAddress(addr));
                }
                Op::Frame => {
                    let len = usize::from(input.u8());
                    let bytes = input.bytes(len).to_vec();
                    if let Some(b) = &self.backend {
                        b.lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .rx
                            .push_back(bytes);
                    }
                    // The TAP became readable: the device's extra event. Through the
                    // transport's queue path, as the harness has no event loop.
                    self.dev.process_notification(0);
                }
            }
            self.check_interrupts();
            if let Some(before) = before {
                if !was_active && !self.dev.is_active() {
                    let after = Snapshot::take(&self.mem);
                    before.assert_writes_within(
                        &after,
                        &guest::Ranges::new(),
                        "an inactive device",
                    );
                }
            }
            self.check_state(reset);
        }
    }

    fn config_bits(&mut self) -> (bool, bool, bool) {
        let ctrl = self.dev.config_read(self.msix_cap_reg);
        let cmd = self.dev.config_read(1);
        (
            ctrl & MSIX_ENABLE != 0,
            ctrl & MSIX_FUNCTION_MASK != 0,
            cmd & COMMAND_INTX_DISABLE != 0,
        )
    }

    fn check_interrupts(&mut self) {
        let calls = self.sink.take();
        let (msix_on, fn_masked, intx_off) = self.config_bits();
        // Table updates first: a write that unmasks a vector delivers its pending message.
        for c in &calls {
            if let IrqCall::Table(v, e) = *c {
                let slot = self
                    .table
                    .get_mut(usize::from(v))
                    .unwrap_or_else(|| panic!("table change reported for vector {v}"));
                *slot = e;
            }
        }
        for c in calls {
            match c {
                IrqCall::Msix(v) => {
                    let e = self
                        .table
                        .get(usize::from(v))
                        .unwrap_or_else(|| panic!("msi-x message for missing vector {v}"));
                    assert!(msix_on, "msi-x message {v} while msi-x is disabled");
                    assert!(!fn_masked, "msi-x message {v} while the function is masked");
                    assert!(!e.masked(), "msi-x message for masked vector {v}");
                }
                IrqCall::Intx(true) => {
                    assert!(!msix_on, "intx raised while msi-x is enabled");
                    assert!(
                        !intx_off,
                        "intx raised while disabled in the command register"
                    );
                }
                IrqCall::Intx(false) | IrqCall::Table(..) => {}
            }
        }
    }

    fn check_state(&mut self, reset: bool) {
        let nq = self.max_sizes.len();
        let nvec = nq as u64 + 1;
        let status = self.dev.status();
        let active = self.dev.is_active();
        let mut d = self.drv();
        assert_eq!(
            u64::from(status),
            d.read(0x14, 1),
            "status register and state disagree"
        );
        if active {
            let need = status::FEATURES_OK | status::DRIVER_OK;
            assert_eq!(status & need, need, "live device with status {status:#x}");
            assert_eq!(
                status & status::DEVICE_NEEDS_RESET,
                0,
                "live device needs reset"
            );
        }
        assert_eq!(d.read(0x12, 2), nq as u64, "num_queues");
        let config_vector = d.read(0x10, 2);
        assert!(
            config_vector == u64::from(VIRTIO_MSI_NO_VECTOR) || config_vector < nvec,
            "config vector {config_vector}"
        );

        // Feature windows and the queue select are restored afterwards.
        let dsel = d.read(0x00, 4);
        let gsel = d.read(0x08, 4);
        let qsel = d.read(0x16, 2);
        d.write(0x00, 4, 0);
        let off_lo = d.read(0x04, 4);
        d.write(0x00, 4, 1);
        let offered = d.read(0x04, 4) << 32 | off_lo;
        d.write(0x08, 4, 0);
        let drv_lo = d.read(0x0c, 4);
        d.write(0x08, 4, 1);
        let driver = d.read(0x0c, 4) << 32 | drv_lo;
        if status & status::FEATURES_OK != 0 {
            assert_eq!(
                driver & !offered,
                0,
                "accepted features {driver:#x} not offered"
            );
            assert_ne!(
                driver & features::VERSION_1,
                0,
                "FEATURES_OK without VERSION_1"
            );
        }
        for (q, &max) in self.max_sizes.iter().enumerate() {
            let mut d = Driver { dev: &mut self.dev };
            d.write(0x16, 2, q as u64);
            let size = d.read(0x18, 2);
            assert!(
                size.is_power_of_two() && size <= u64::from(max),
                "queue {q} size {size} (max {max})"
            );
            let vector = d.read(0x1a, 2);
            assert!(
                vector == u64::from(VIRTIO_MSI_NO_VECTOR) || vector < nvec,
                "queue {q} vector {vector}"
            );
            if reset {
                assert_eq!(d.read(0x1c, 2), 0, "queue {q} enabled after reset");
                assert_eq!(size, u64::from(max), "queue {q} size after reset");
                for off in [0x20, 0x28, 0x30] {
                    assert_eq!(d.read(off, 8), 0, "queue {q} address after reset");
                }
                assert_eq!(
                    vector,
                    u64::from(VIRTIO_MSI_NO_VECTOR),
                    "queue {q} vector after reset"
                );
            }
        }
        let mut d = Driver { dev: &mut self.dev };
        d.write(0x00, 4, dsel);
        d.write(0x08, 4, gsel);
        d.write(0x16, 2, qsel);
        if reset {
            assert_eq!(status, 0, "status after reset");
            assert!(!active, "live after reset");
            assert_eq!(
                config_vector,
                u64::from(VIRTIO_MSI_NO_VECTOR),
                "config vector after reset"
            );
            assert_eq!(d.read(0x1000, 1), 0, "ISR after reset");
        }
    }
}
