//! Thin helpers that put `Arc<Mutex<D>>` devices on vm-device's `IoManager`.

use std::sync::{Arc, Mutex};

use vm_device::bus::{Error as BusError, MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{DeviceMmio, MutDeviceMmio, MutDevicePio};

use crate::{Error, Result};

/// Registers `dev` for the ports `base..base + len` on `io`.
///
/// The device receives the range base and the offset of each access into the range.
///
/// # Errors
///
/// [`Error::InvalidPioRange`] if `len` is 0 or the range passes port 0xffff;
/// [`Error::PioRangeOverlap`] if any port of the range already belongs to a device.
pub fn register_pio_device(
    io: &mut IoManager,
    base: u16,
    len: u16,
    dev: Arc<Mutex<impl MutDevicePio + Send + 'static>>,
) -> Result<()> {
    let range =
        PioRange::new(PioAddress(base), len).map_err(|_| Error::InvalidPioRange { base, len })?;
    io.register_pio(range, dev).map_err(|e| match e {
        BusError::DeviceOverlap => Error::PioRangeOverlap {
            base,
            last: range.last().0,
        },
        other => Error::RegisterDevice(other),
    })
}

/// Registers `dev` for the guest-physical addresses `base..base + len` on `io`.
///
/// The device receives the range base and the offset of each access into the range.
///
/// # Errors
///
/// [`Error::InvalidMmioRange`] if `len` is 0 or the range passes the end of the address
/// space; [`Error::MmioRangeOverlap`] if any byte of the range already belongs to a device.
pub fn register_mmio_device(
    io: &mut IoManager,
    base: u64,
    len: u64,
    dev: Arc<Mutex<impl MutDeviceMmio + Send + 'static>>,
) -> Result<()> {
    register_mmio(io, base, len, dev)
}

fn register_mmio(
    io: &mut IoManager,
    base: u64,
    len: u64,
    dev: Arc<dyn DeviceMmio + Send + Sync>,
) -> Result<()> {
    let range = MmioRange::new(MmioAddress(base), len)
        .map_err(|_| Error::InvalidMmioRange { base, len })?;
    io.register_mmio(range, dev).map_err(|e| match e {
        BusError::DeviceOverlap => Error::MmioRangeOverlap {
            base,
            last: range.last().0,
        },
        other => Error::RegisterDevice(other),
    })
}

/// Registers `window` on `io` for its whole range ([`crate::PciMmioWindow::start`],
/// [`crate::PciMmioWindow::len`]).
///
/// # Errors
///
/// As [`register_mmio_device`].
pub fn register_pci_window(io: &mut IoManager, window: Arc<crate::PciMmioWindow>) -> Result<()> {
    register_mmio(io, window.start(), window.len(), window)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_device::bus::{MmioAddressOffset, PioAddressOffset};

    /// Records the last access and answers reads with `offset + i`.
    #[derive(Debug, Default)]
    struct Recorder {
        last_write: Option<(u64, u64, Vec<u8>)>,
        reads: usize,
    }

    impl MutDevicePio for Recorder {
        fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
            self.reads += 1;
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as usize + i) as u8;
            }
        }

        fn pio_write(&mut self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
            self.last_write = Some((u64::from(base.0), u64::from(offset), data.to_vec()));
        }
    }

    impl MutDeviceMmio for Recorder {
        fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
            self.reads += 1;
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as usize + i) as u8;
            }
        }

        fn mmio_write(&mut self, base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
            self.last_write = Some((base.0, offset, data.to_vec()));
        }
    }

    #[test]
    fn pio_dispatch_reaches_the_right_device_and_offset() {
        let mut io = IoManager::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        register_pio_device(&mut io, 0x3f8, 8, a.clone()).unwrap();
        register_pio_device(&mut io, 0x2f8, 8, b.clone()).unwrap();

        io.pio_write(PioAddress(0x3fb), &[0x80]).unwrap();
        assert_eq!(a.lock().unwrap().last_write, Some((0x3f8, 3, vec![0x80])));
        assert_eq!(b.lock().unwrap().last_write, None);

        let mut data = [0u8; 2];
        io.pio_read(PioAddress(0x2fd), &mut data).unwrap();
        assert_eq!(data, [5, 6]);
        assert_eq!(b.lock().unwrap().reads, 1);
        assert_eq!(a.lock().unwrap().reads, 0);
    }

    #[test]
    fn pio_unregistered_port_is_an_error() {
        let mut io = IoManager::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        register_pio_device(&mut io, 0x3f8, 8, a).unwrap();

        let mut data = [0u8; 1];
        assert_eq!(
            io.pio_read(PioAddress(0x80), &mut data),
            Err(BusError::DeviceNotFound)
        );
        assert_eq!(
            io.pio_write(PioAddress(0x400), &[1]),
            Err(BusError::DeviceNotFound)
        );
        // An access that starts inside the range but runs past its end is refused too.
        let mut wide = [0u8; 4];
        assert_eq!(
            io.pio_read(PioAddress(0x3fe), &mut wide),
            Err(BusError::DeviceNotFound)
        );
    }

    #[test]
    fn pio_overlap_is_refused_with_the_range_named() {
        let mut io = IoManager::new();
        register_pio_device(&mut io, 0x60, 8, Arc::new(Mutex::new(Recorder::default()))).unwrap();

        for (base, len) in [(0x60, 1), (0x5c, 8), (0x67, 4), (0x50, 0x40)] {
            let err = register_pio_device(
                &mut io,
                base,
                len,
                Arc::new(Mutex::new(Recorder::default())),
            )
            .unwrap_err();
            assert!(
                matches!(err, Error::PioRangeOverlap { base: b, last } if b == base && last == base + len - 1)
            );
        }
        let err = register_pio_device(&mut io, 0x64, 1, Arc::new(Mutex::new(Recorder::default())))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "port i/o range 0x0064..=0x0064 overlaps a registered device"
        );

        // Adjacent ranges are fine.
        register_pio_device(&mut io, 0x68, 8, Arc::new(Mutex::new(Recorder::default()))).unwrap();
        register_pio_device(&mut io, 0x58, 8, Arc::new(Mutex::new(Recorder::default()))).unwrap();
    }

    #[test]
    fn pio_invalid_ranges_are_refused() {
        let mut io = IoManager::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        assert!(matches!(
            register_pio_device(&mut io, 0x10, 0, dev.clone()),
            Err(Error::InvalidPioRange { base: 0x10, len: 0 })
        ));
        assert!(matches!(
            register_pio_device(&mut io, 0xfffe, 4, dev.clone()),
            Err(Error::InvalidPioRange { .. })
        ));
        // The very last port is a valid one-port range.
        register_pio_device(&mut io, 0xffff, 1, dev).unwrap();
    }

    #[test]
    fn mmio_dispatch_and_overlap() {
        let mut io = IoManager::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        register_mmio_device(&mut io, 0xd000_0000, 0x1000, a.clone()).unwrap();

        io.mmio_write(MmioAddress(0xd000_0010), &[1, 2, 3, 4])
            .unwrap();
        assert_eq!(
            a.lock().unwrap().last_write,
            Some((0xd000_0000, 0x10, vec![1, 2, 3, 4]))
        );
        let mut data = [0u8; 4];
        io.mmio_read(MmioAddress(0xd000_0ffc), &mut data).unwrap();
        assert_eq!(data, [0xfc, 0xfd, 0xfe, 0xff]);
        assert_eq!(
            io.mmio_read(MmioAddress(0xd000_1000), &mut data),
            Err(BusError::DeviceNotFound)
        );

        let err = register_mmio_device(
            &mut io,
            0xd000_0800,
            0x1000,
            Arc::new(Mutex::new(Recorder::default())),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "mmio range 0xd0000800..=0xd00017ff overlaps a registered device"
        );
        assert!(matches!(
            register_mmio_device(&mut io, u64::MAX, 2, a.clone()),
            Err(Error::InvalidMmioRange { .. })
        ));
        register_mmio_device(&mut io, 0xd000_1000, 0x1000, a).unwrap();
    }
}
