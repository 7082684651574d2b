// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! BAR 0 on the PCI MMIO window, following the guest: [`BarMmio`] puts a transport's BAR
//! on a [`PciMmioWindow`], [`RelocatableBar`] maps it (and registers its queue-notify
//! ioeventfds through an [`IoeventRegistrar`]) where the BAR decodes, and moves both when
//! the guest reprograms the BAR or turns memory decoding off and on.

use std::io;
use std::sync::{Arc, Mutex};

use log::{debug, warn};
use tvm_bus::{BarAccess, PciDevice, PciMmioWindow};
use vmm_sys_util::eventfd::EventFd;

use super::VirtioPciDevice;
use crate::{warn_once, Error, Result, VirtioDevice, WarnOnce};

/// A virtio-pci device's BAR as a [`BarAccess`] for the [`PciMmioWindow`].
pub struct BarMmio<D: VirtioDevice> {
    dev: Arc<Mutex<VirtioPciDevice<D>>>,
}

impl<D: VirtioDevice> std::fmt::Debug for BarMmio<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BarMmio").finish_non_exhaustive()
    }
}

impl<D: VirtioDevice> BarMmio<D> {
    /// The BAR of `dev`.
    pub fn new(dev: Arc<Mutex<VirtioPciDevice<D>>>) -> Self {
        BarMmio { dev }
    }
}

impl<D: VirtioDevice> BarAccess for BarMmio<D> {
    fn bar_read(&self, offset: u64, data: &mut [u8]) {
        self.dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bar_read(offset, data);
    }

    fn bar_write(&self, offset: u64, data: &[u8]) {
        self.dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bar_write(offset, data);
    }
}

/// Registers and unregisters ioeventfds: KVM_IOEVENTFD in the VMM, a fake in tests.
pub trait IoeventRegistrar: Send + Sync {
    /// Makes a guest write to MMIO address `addr` signal `evt` (no exit to user space).
    ///
    /// # Errors
    ///
    /// The error of the underlying mechanism (for KVM, the ioctl's errno).
    fn register(&self, evt: &EventFd, addr: u64) -> io::Result<()>;
    /// Undoes [`register`](Self::register).
    ///
    /// # Errors
    ///
    /// The error of the underlying mechanism.
    fn unregister(&self, evt: &EventFd, addr: u64) -> io::Result<()>;
}

/// A virtio-pci device on the PCI bus whose BAR follows the guest.
///
/// It is what the [`tvm_bus::PciRoot`] holds for the device: config accesses go to the
/// device, and after each write the BAR's decode address
/// ([`VirtioPciDevice::bar_decode_addr`]) is compared with where the BAR is mapped. When it
/// differs (memory decoding turned off or on, the BAR reprogrammed), the BAR is unmapped
/// from the [`PciMmioWindow`] and its queue-notify ioeventfds unregistered, then both are
/// set up at the new address. A new address outside the window or over another BAR is
/// refused: the BAR stays unmapped (reads all ones) until the guest puts it somewhere
/// valid; the device and the other devices keep working. The first refusal is a warning,
/// later ones are logged at debug level.
pub struct RelocatableBar<D: VirtioDevice> {
    name: String,
    dev: Arc<Mutex<VirtioPciDevice<D>>>,
    window: Arc<PciMmioWindow>,
    ioevents: Arc<dyn IoeventRegistrar>,
    /// Where the BAR is mapped (and its ioeventfds registered) now.
    mapped: Option<u64>,
    /// A move refused.
    refused: WarnOnce,
}

impl<D: VirtioDevice> std::fmt::Debug for RelocatableBar<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelocatableBar")
            .field("name", &self.name)
            .field("mapped", &self.mapped)
            .finish_non_exhaustive()
    }
}

impl<D: VirtioDevice + 'static> RelocatableBar<D> {
    /// Maps the BAR of `dev` where it decodes now (the VMM has placed it with
    /// [`VirtioPciDevice::set_bar_addr`]) and registers its ioeventfds; `name` is for logs.
    ///
    /// # Errors
    ///
    /// [`Error::MapBar`] if the BAR does not decode or cannot be mapped there (the
    /// ioeventfds included).
    pub fn new(
        name: String,
        dev: Arc<Mutex<VirtioPciDevice<D>>>,
        window: Arc<PciMmioWindow>,
        ioevents: Arc<dyn IoeventRegistrar>,
    ) -> Result<Self> {
        let mut bar = RelocatableBar {
            name,
            dev,
            window,
            ioevents,
            mapped: None,
            refused: WarnOnce::new(),
        };
        let Some(addr) = bar.lock().bar_decode_addr() else {
            return Err(Error::MapBar(bar.name, "memory decoding is off".into()));
        };
        if let Err(why) = bar.map_at(addr) {
            return Err(Error::MapBar(bar.name, why));
        }
        Ok(bar)
    }

    /// Where the BAR is mapped now.
    pub fn mapped(&self) -> Option<u64> {
        self.mapped
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VirtioPciDevice<D>> {
        self.dev.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The (queue, notify address) pairs of the device's queues for a BAR at `addr`.
    fn notify_addrs(dev: &VirtioPciDevice<D>, addr: u64) -> impl Iterator<Item = (u16, u64)> {
        // num_queues() is at most 256, so every index fits a u16.
        let offsets: Vec<(u16, u64)> = (0..dev.num_queues() as u16)
            .map(|q| (q, addr + dev.notify_offset(q)))
            .collect();
        offsets.into_iter()
    }

    /// Maps the BAR at `addr` and registers the ioeventfds there; on failure nothing is
    /// left mapped or registered.
    fn map_at(&mut self, addr: u64) -> std::result::Result<(), String> {
        let size = self.lock().bar_size();
        self.window
            .map(addr, size, Arc::new(BarMmio::new(self.dev.clone())))
            .map_err(|e| e.to_string())?;
        let dev = self.lock();
        let mut done = Vec::new();
        for (q, at) in Self::notify_addrs(&dev, addr) {
            let Some(evt) = dev.notify_eventfd(q) else {
                continue;
            };
            if let Err(e) = self.ioevents.register(evt, at) {
                for (evt, at) in done {
                    let _ = self.ioevents.unregister(evt, at);
                }
                drop(dev);
                self.window.unmap(addr);
                return Err(format!("cannot register the ioeventfd of queue {q}: {e}"));
            }
            done.push((evt, at));
        }
        drop(dev);
        self.mapped = Some(addr);
        Ok(())
    }

    fn unmap(&mut self) {
        let Some(addr) = self.mapped.take() else {
            return;
        };
        self.window.unmap(addr);
        let dev = self.lock();
        for (q, at) in Self::notify_addrs(&dev, addr) {
            if let Some(evt) = dev.notify_eventfd(q) {
                if let Err(e) = self.ioevents.unregister(evt, at) {
                    warn!(
                        "{}: cannot unregister the ioeventfd of queue {q}: {e}",
                        self.name
                    );
                }
            }
        }
    }

    /// Follows the BAR to where it decodes now.
    fn sync(&mut self, want: Option<u64>) {
        if want == self.mapped {
            return;
        }
        self.unmap();
        match want {
            Some(addr) => match self.map_at(addr) {
                Ok(()) => debug!("{}: bar mapped at {addr:#x}", self.name),
                Err(why) => warn_once!(
                    self.refused,
                    "{}: the guest moved the bar to {addr:#x}, which cannot be mapped ({why}); \
                     it stays unmapped until moved again",
                    self.name
                ),
            },
            None => debug!("{}: bar decoding off", self.name),
        }
    }
}

impl<D: VirtioDevice + 'static> PciDevice for RelocatableBar<D> {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.lock().config_read(reg)
    }

    fn config_write(&mut self, reg: usize, offset: u8, data: &[u8]) {
        // The device lock is released before the window's is taken: MMIO accesses take the
        // window's lock, release it, then take the device's.
        let want = {
            let mut dev = self.lock();
            dev.config_write(reg, offset, data);
            dev.bar_decode_addr()
        };
        self.sync(want);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::fd::AsRawFd;

    use tvm_bus::{DeviceMmio, MmioAddress};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::test_utils::{common_cfg, NullDevice, NullSink};
    use crate::NOTIFY_OFFSET;

    /// Registered (fd, address) pairs; refuses addresses in `refuse`.
    #[derive(Default)]
    struct FakeIoevents {
        registered: Mutex<Vec<(i32, u64)>>,
        refuse: Mutex<Option<u64>>,
    }

    impl FakeIoevents {
        fn addrs(&self) -> Vec<u64> {
            let mut a: Vec<u64> = self
                .registered
                .lock()
                .unwrap()
                .iter()
                .map(|r| r.1)
                .collect();
            a.sort_unstable();
            a
        }
    }

    impl IoeventRegistrar for FakeIoevents {
        fn register(&self, evt: &EventFd, addr: u64) -> io::Result<()> {
            if *self.refuse.lock().unwrap() == Some(addr) {
                return Err(io::Error::other("no room for another ioeventfd"));
            }
            let mut r = self.registered.lock().unwrap();
            assert!(!r.contains(&(evt.as_raw_fd(), addr)), "registered twice");
            r.push((evt.as_raw_fd(), addr));
            Ok(())
        }
        fn unregister(&self, evt: &EventFd, addr: u64) -> io::Result<()> {
            let mut r = self.registered.lock().unwrap();
            let i = r
                .iter()
                .position(|e| *e == (evt.as_raw_fd(), addr))
                .ok_or(io::ErrorKind::NotFound)?;
            r.remove(i);
            Ok(())
        }
    }

    const WINDOW: u64 = 0xc000_0000;
    const A: u64 = WINDOW;
    const B: u64 = WINDOW + 0x10_0000;

    struct Setup {
        window: Arc<PciMmioWindow>,
        ioevents: Arc<FakeIoevents>,
        first: RelocatableBar<NullDevice>,
        second: RelocatableBar<NullDevice>,
    }

    fn device(
        at: u64,
        window: &Arc<PciMmioWindow>,
        io: &Arc<FakeIoevents>,
    ) -> RelocatableBar<NullDevice> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        // Two queues, nothing else.
        let device = NullDevice::new(virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK, &[16, 16]);
        let mut dev = VirtioPciDevice::new(device, mem, Arc::new(NullSink)).unwrap();
        dev.set_bar_addr(GuestAddress(at)).unwrap();
        let io: Arc<dyn IoeventRegistrar> = io.clone();
        RelocatableBar::new(
            format!("dev@{at:#x}"),
            Arc::new(Mutex::new(dev)),
            window.clone(),
            io,
        )
        .unwrap()
    }

    fn setup() -> Setup {
        let window = Arc::new(PciMmioWindow::new(WINDOW, 0x1000_0000));
        let ioevents = Arc::new(FakeIoevents::default());
        let first = device(A, &window, &ioevents);
        let second = device(B, &window, &ioevents);
        Setup {
            window,
            ioevents,
            first,
            second,
        }
    }

    /// num_queues from the common config at `bar`, through the window.
    fn num_queues_at(window: &PciMmioWindow, bar: u64) -> u16 {
        let mut data = [0u8; 2];
        window.mmio_read(
            MmioAddress(WINDOW),
            bar + common_cfg::NUM_QUEUES - WINDOW,
            &mut data,
        );
        u16::from_le_bytes(data)
    }

    fn write_bar(dev: &mut RelocatableBar<NullDevice>, addr: u64) {
        dev.config_write(4, 0, &(addr as u32).to_le_bytes());
        dev.config_write(5, 0, &((addr >> 32) as u32).to_le_bytes());
    }

    fn set_memory_decode(dev: &mut RelocatableBar<NullDevice>, on: bool) {
        let cmd = dev.config_read(1) as u16;
        let cmd = if on { cmd | 2 } else { cmd & !2 };
        dev.config_write(1, 0, &cmd.to_le_bytes());
    }

    fn notify(bar: u64) -> Vec<u64> {
        vec![bar + NOTIFY_OFFSET, bar + NOTIFY_OFFSET + 4]
    }

    #[test]
    fn placed_bars_are_mapped_with_their_ioeventfds() {
        let s = setup();
        assert_eq!(num_queues_at(&s.window, A), 2);
        assert_eq!(num_queues_at(&s.window, B), 2);
        assert_eq!(s.ioevents.addrs(), [notify(A), notify(B)].concat());
    }

    #[test]
    fn sizing_unmaps_then_restores_the_same_mapping() {
        let mut s = setup();
        set_memory_decode(&mut s.first, false);
        assert_eq!(s.first.mapped(), None);
        assert_eq!(num_queues_at(&s.window, A), u16::MAX);
        assert_eq!(s.ioevents.addrs(), notify(B));
        write_bar(&mut s.first, u64::MAX);
        assert_eq!(s.first.mapped(), None);
        write_bar(&mut s.first, A);
        set_memory_decode(&mut s.first, true);
        assert_eq!(s.first.mapped(), Some(A));
        assert_eq!(num_queues_at(&s.window, A), 2);
        assert_eq!(s.ioevents.addrs(), [notify(A), notify(B)].concat());
    }

    #[test]
    fn a_moved_bar_and_its_ioeventfds_follow_the_guest() {
        let mut s = setup();
        let c = WINDOW + 0x800_0000;
        write_bar(&mut s.first, c);
        assert_eq!(s.first.mapped(), Some(c));
        assert_eq!(num_queues_at(&s.window, A), u16::MAX);
        assert_eq!(num_queues_at(&s.window, c), 2);
        assert_eq!(s.ioevents.addrs(), [notify(B), notify(c)].concat());
    }

    #[test]
    fn a_bar_moved_over_another_or_out_of_the_window_is_left_unmapped() {
        let mut s = setup();
        // Over the second device's BAR: refused, the second keeps working.
        write_bar(&mut s.first, B);
        assert_eq!(s.first.mapped(), None);
        assert_eq!(num_queues_at(&s.window, B), 2);
        assert_eq!(s.ioevents.addrs(), notify(B));
        // Over RAM (below the window) and above 4 GiB: refused.
        for bad in [0x10_0000, 1 << 36] {
            write_bar(&mut s.first, bad);
            assert_eq!(s.first.mapped(), None, "{bad:#x}");
        }
        // Back to a free place: mapped again.
        write_bar(&mut s.first, A);
        assert_eq!(s.first.mapped(), Some(A));
        assert_eq!(num_queues_at(&s.window, A), 2);
        assert_eq!(s.ioevents.addrs(), [notify(A), notify(B)].concat());
        // The second device moves too and nothing is left behind.
        let c = WINDOW + 0x20_0000;
        write_bar(&mut s.second, c);
        assert_eq!(s.ioevents.addrs(), [notify(A), notify(c)].concat());
    }

    #[test]
    fn refused_moves_are_one_warning() {
        crate::test_log::start();
        let mut s = setup();
        for _ in 0..3 {
            write_bar(&mut s.first, 0x10_0000);
            write_bar(&mut s.first, B);
        }
        assert_eq!(s.first.mapped(), None);
        let w = crate::test_log::lines(log::Level::Warn);
        assert_eq!(w.len(), 1, "{w:#?}");
        assert!(
            w[0].starts_with("dev@0xc0000000: the guest moved the bar to 0x100000"),
            "{}",
            w[0]
        );
        write_bar(&mut s.first, A);
        assert_eq!(s.first.mapped(), Some(A));
    }

    #[test]
    fn a_failed_ioeventfd_registration_leaves_nothing_behind() {
        let mut s = setup();
        let c = WINDOW + 0x40_0000;
        *s.ioevents.refuse.lock().unwrap() = Some(c + NOTIFY_OFFSET + 4);
        write_bar(&mut s.first, c);
        assert_eq!(s.first.mapped(), None);
        assert_eq!(num_queues_at(&s.window, c), u16::MAX);
        assert_eq!(s.ioevents.addrs(), notify(B));
    }
}
