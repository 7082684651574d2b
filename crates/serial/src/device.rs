// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The UART itself: vm-superio's 16550A model behind vm-device's `MutDevicePio`.

use std::io::{self, Write};
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};

use log::debug;
use tvm_util::{warn_once, WarnOnce};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::serial::{Error as SerialError, SerialEvents};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{Error, Result};

/// Number of I/O ports the UART decodes (offsets 0 to 7 from its base).
pub const SERIAL_PORT_SIZE: u16 = 8;

/// Value a read returns when the access is not one the UART honours (wrong width, bad
/// offset): what an unclaimed ISA bus floats to.
const UNHANDLED_READ: u8 = 0xFF;

/// An [`EventFd`] that acts as the UART's interrupt line.
///
/// `trigger` writes 1 to the EventFd; the VMM registers the same EventFd as a KVM irqfd on
/// the serial GSI, so the write becomes an interrupt without a trip through user space.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt` as an interrupt line.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// Returns a new trigger on the same underlying eventfd.
    ///
    /// # Errors
    ///
    /// [`Error::CloneEventFd`] when `dup` fails.
    pub fn try_clone(&self) -> Result<Self> {
        self.0.try_clone().map(Self).map_err(Error::CloneEventFd)
    }
}

impl Deref for EventFdTrigger {
    type Target = EventFd;

    fn deref(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Hooks vm-superio calls on receive/transmit events.
#[derive(Debug)]
pub(crate) struct SerialEventsImpl {
    /// Written when the guest has read the receive FIFO empty, so the input side can accept
    /// more bytes from the host.
    rx_drained: EventFd,
    /// Bytes the guest wrote that could not be handed to the output sink.
    tx_lost_bytes: AtomicU64,
}

impl SerialEventsImpl {
    fn new() -> Result<Self> {
        Ok(Self {
            rx_drained: EventFd::new(EFD_NONBLOCK).map_err(Error::CreateEventFd)?,
            tx_lost_bytes: AtomicU64::new(0),
        })
    }
}

impl SerialEvents for SerialEventsImpl {
    fn buffer_read(&self) {}

    fn out_byte(&self) {}

    fn tx_lost_byte(&self) {
        self.tx_lost_bytes.fetch_add(1, Ordering::Relaxed);
    }

    fn in_buffer_empty(&self) {
        // Fails only if the counter would overflow, which means the reader is gone; the
        // input side then simply stays paused, which is harmless.
        if let Err(e) = self.rx_drained.write(1) {
            debug!("serial: cannot signal rx_drained: {e}");
        }
    }
}

/// A 16550A UART for the guest console, ready to sit on the port-I/O bus (usually at
/// [`COM1_PORT_BASE`](crate::COM1_PORT_BASE)).
///
/// The guest's transmitted bytes go to `W`; use a
/// [`NonBlockingWriter`](crate::NonBlockingWriter) so a stalled terminal never stalls the
/// vCPU. Host input reaches the guest through [`SerialDevice::enqueue_input`], normally
/// called by [`SerialInput`](crate::SerialInput).
#[derive(Debug)]
pub struct SerialDevice<W: Write + Send> {
    serial: Serial<EventFdTrigger, SerialEventsImpl, W>,
    /// Whether a failed interrupt trigger was already reported, so a guest cannot flood the log.
    trigger_error: WarnOnce,
}

impl<W: Write + Send> SerialDevice<W> {
    /// Creates a UART writing the guest's output to `out`, with a fresh non-blocking
    /// interrupt EventFd (see [`SerialDevice::interrupt_evt`]).
    ///
    /// # Errors
    ///
    /// [`Error::CreateEventFd`] when an eventfd cannot be created.
    pub fn new(out: W) -> Result<Self> {
        let interrupt = EventFd::new(EFD_NONBLOCK).map_err(Error::CreateEventFd)?;
        Self::with_interrupt_evt(interrupt, out)
    }

    /// Creates a UART that raises its interrupt by writing `interrupt_evt`, for a VMM that
    /// already owns the irqfd of the serial line.
    ///
    /// # Errors
    ///
    /// [`Error::CreateEventFd`] when the `rx_drained` eventfd cannot be created.
    pub fn with_interrupt_evt(interrupt_evt: EventFd, out: W) -> Result<Self> {
        Ok(Self {
            serial: Serial::with_events(
                EventFdTrigger::new(interrupt_evt),
                SerialEventsImpl::new()?,
                out,
            ),
            trigger_error: WarnOnce::new(),
        })
    }

    /// A UART in a saved state (a snapshot's), raising its interrupt through
    /// `interrupt_evt`; an interrupt the state has pending is raised at once.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidState`] for more received bytes than the FIFO holds,
    /// [`Error::CreateEventFd`] when an eventfd cannot be created.
    pub fn from_state(
        interrupt_evt: EventFd,
        out: W,
        state: &tvm_snapshot::SerialState,
    ) -> Result<Self> {
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let serial = Serial::from_state(
            &s,
            EventFdTrigger::new(interrupt_evt),
            SerialEventsImpl::new()?,
            out,
        )
        .map_err(|e| match e {
            vm_superio::serial::Error::Trigger(e) => Error::CreateEventFd(e),
            _ => Error::InvalidState(state.in_buffer.len()),
        })?;
        Ok(Self {
            serial,
            trigger_error: WarnOnce::new(),
        })
    }

    /// The UART's registers and unread input, for a snapshot.
    pub fn save_state(&self) -> tvm_snapshot::SerialState {
        let s = self.serial.state();
        tvm_snapshot::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// The interrupt line: register it as an irqfd on the serial GSI (4 for COM1).
    pub fn interrupt_evt(&self) -> &EventFd {
        self.serial.interrupt_evt()
    }

    /// Written each time the guest reads the receive FIFO empty.
    pub fn rx_drained_evt(&self) -> &EventFd {
        &self.serial.events().rx_drained
    }

    /// Free space in the receive FIFO, in bytes.
    pub fn fifo_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// Puts as many of `bytes` as fit into the receive FIFO, raising the receive interrupt
    /// when the guest enabled it, and returns how many were taken.
    ///
    /// Bytes that do not fit are the caller's to keep. Nothing is taken while the guest
    /// has the UART in loopback mode.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let free_before = self.serial.fifo_capacity();
        if bytes.is_empty() || free_before == 0 {
            return 0;
        }
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            // vm-superio queues the bytes before it raises the interrupt, so they are in
            // the FIFO; the guest still sees them at its next poll of LSR.
            Err(SerialError::Trigger(e)) => {
                self.report_trigger_error(&e);
                free_before - self.serial.fifo_capacity()
            }
            Err(e) => {
                debug!("serial: cannot enqueue input: {e}");
                0
            }
        }
    }

    /// Bytes the guest transmitted that the output sink refused.
    pub fn tx_lost_bytes(&self) -> u64 {
        self.serial.events().tx_lost_bytes.load(Ordering::Relaxed)
    }

    /// The UART's registers and receive FIFO fill in words, for a diagnostic dump, e.g.
    /// `ier 0x02 iir 0x02 (thr empty pending) lcr 0x03 mcr 0x0b lsr 0x60 msr 0xb0, rx fifo
    /// 0 of 64 bytes, 0 tx bytes lost`. Unlike a guest read, looking does not acknowledge
    /// an interrupt or take a byte. `iir` is the identification without the FIFO bits
    /// (0x01: nothing pending, 0x02: transmitter empty, 0x04: data received).
    pub fn debug_state(&self) -> String {
        let s = self.serial.state();
        let iir = s.interrupt_identification;
        let pending = if iir & 0x01 != 0 {
            "nothing pending".to_string()
        } else {
            let mut what = Vec::new();
            if iir & 0x04 != 0 {
                what.push("rx data");
            }
            if iir & 0x02 != 0 {
                what.push("thr empty");
            }
            format!("{} pending", what.join(" and "))
        };
        format!(
            "ier {:#04x} iir {iir:#04x} ({pending}) lcr {:#04x} mcr {:#04x} lsr {:#04x} \
             msr {:#04x}, rx fifo {} of {} bytes, {} tx bytes lost",
            s.interrupt_enable,
            s.line_control,
            s.modem_control,
            s.line_status,
            s.modem_status,
            s.in_buffer.len(),
            s.in_buffer.len() + self.serial.fifo_capacity(),
            self.tx_lost_bytes()
        )
    }

    /// The output sink.
    pub fn writer(&self) -> &W {
        self.serial.writer()
    }

    /// Reads the register at `offset` (0..=7) as the guest would.
    pub fn read_register(&mut self, offset: u8) -> u8 {
        if u16::from(offset) >= SERIAL_PORT_SIZE {
            debug!("serial: read at bad offset {offset:#x}");
            return UNHANDLED_READ;
        }
        self.serial.read(offset)
    }

    /// Writes `value` to the register at `offset` (0..=7) as the guest would. Failures
    /// (a refused output byte, a failed interrupt) are logged and counted, never returned:
    /// they are not the guest's fault and must not stop it.
    pub fn write_register(&mut self, offset: u8, value: u8) {
        if u16::from(offset) >= SERIAL_PORT_SIZE {
            debug!("serial: write of {value:#x} at bad offset {offset:#x}");
            return;
        }
        match self.serial.write(offset, value) {
            Ok(()) => {}
            Err(SerialError::Trigger(e)) => self.report_trigger_error(&e),
            // Counted by `tx_lost_byte`; per byte, so debug only.
            Err(e) => debug!("serial: guest write at offset {offset:#x} failed: {e}"),
        }
    }

    fn report_trigger_error(&mut self, e: &io::Error) {
        warn_once!(
            self.trigger_error,
            "serial: cannot raise the interrupt: {e}"
        );
    }
}

impl<W: Write + Send> MutDevicePio for SerialDevice<W> {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match (data.len(), u8::try_from(offset)) {
            (1, Ok(offset)) => data[0] = self.read_register(offset),
            _ => {
                debug!(
                    "serial: unhandled {}-byte read at offset {offset:#x}",
                    data.len()
                );
                data.fill(UNHANDLED_READ);
            }
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        match (data, u8::try_from(offset)) {
            (&[value], Ok(offset)) => self.write_register(offset, value),
            _ => debug!(
                "serial: unhandled {}-byte write at offset {offset:#x}",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_utils::SharedBuf;
    use crate::COM1_PORT_BASE;

    const THR: u16 = 0;
    const IER: u16 = 1;
    const IIR: u16 = 2;
    const LCR: u16 = 3;
    const LSR: u16 = 5;
    const SCR: u16 = 7;

    const LSR_DR: u8 = 0x01;
    const LSR_THRE: u8 = 0x20;
    const LSR_TEMT: u8 = 0x40;
    const IIR_NONE: u8 = 0xC1;
    const IIR_THRE: u8 = 0xC2;
    const IIR_RDA: u8 = 0xC4;

    fn device() -> SerialDevice<SharedBuf> {
        SerialDevice::new(SharedBuf::default()).unwrap()
    }

    fn rd(dev: &mut SerialDevice<SharedBuf>, offset: u16) -> u8 {
        let mut data = [0u8];
        dev.pio_read(PioAddress(COM1_PORT_BASE), offset, &mut data);
        data[0]
    }

    fn wr(dev: &mut SerialDevice<SharedBuf>, offset: u16, value: u8) {
        dev.pio_write(PioAddress(COM1_PORT_BASE), offset, &[value]);
    }

    /// Reads and clears the interrupt EventFd; 0 when it was not written.
    fn interrupts(dev: &SerialDevice<SharedBuf>) -> u64 {
        dev.interrupt_evt().read().unwrap_or(0)
    }

    #[test]
    fn test_thr_write_reaches_writer() {
        let mut dev = device();
        assert_eq!(rd(&mut dev, LSR), LSR_THRE | LSR_TEMT);
        for &b in b"hi\n" {
            wr(&mut dev, THR, b);
            // The transmitter is always ready again at once.
            assert_ne!(rd(&mut dev, LSR) & LSR_THRE, 0);
        }
        assert_eq!(dev.writer().contents(), b"hi\n");
        assert_eq!(dev.tx_lost_bytes(), 0);
        // No interrupt while IER is 0.
        assert_eq!(interrupts(&dev), 0);
        assert_eq!(rd(&mut dev, IIR), IIR_NONE);
    }

    #[test]
    fn test_thre_interrupt() {
        let mut dev = device();
        // Enabling THRI with an empty transmitter raises the interrupt at once: the 8250
        // driver relies on it to start transmitting.
        wr(&mut dev, IER, 0x02);
        assert_eq!(rd(&mut dev, IER), 0x02);
        assert_eq!(interrupts(&dev), 1);
        // Reading IIR identifies and acknowledges it.
        assert_eq!(rd(&mut dev, IIR), IIR_THRE);
        assert_eq!(rd(&mut dev, IIR), IIR_NONE);
        // Every transmitted byte raises it again.
        wr(&mut dev, THR, b'a');
        assert_eq!(interrupts(&dev), 1);
        assert_eq!(rd(&mut dev, IIR), IIR_THRE);
        // Only the 16550A bits of IER are kept.
        wr(&mut dev, IER, 0xFF);
        assert_eq!(rd(&mut dev, IER), 0x0F);
    }

    #[test]
    fn test_divisor_latch() {
        let mut dev = device();
        wr(&mut dev, LCR, 0x80);
        wr(&mut dev, 0, 0x01);
        wr(&mut dev, 1, 0x00);
        assert_eq!(rd(&mut dev, 0), 0x01);
        assert_eq!(rd(&mut dev, 1), 0x00);
        // With DLAB set, offsets 0 and 1 are the latch, not THR/IER.
        assert!(dev.writer().contents().is_empty());
        assert_eq!(interrupts(&dev), 0);
        wr(&mut dev, LCR, 0x03);
        assert_eq!(rd(&mut dev, LCR), 0x03);
        assert_eq!(rd(&mut dev, IER), 0x00);
        wr(&mut dev, LCR, 0x83);
        assert_eq!(rd(&mut dev, 0), 0x01);
    }

    #[test]
    fn test_scratch_register() {
        let mut dev = device();
        wr(&mut dev, SCR, 0x5A);
        assert_eq!(rd(&mut dev, SCR), 0x5A);
        wr(&mut dev, SCR, 0xA5);
        assert_eq!(rd(&mut dev, SCR), 0xA5);
    }

    #[test]
    fn test_receive_sets_dr_and_interrupt() {
        let mut dev = device();
        // Without RDI enabled: data ready, no interrupt.
        assert_eq!(dev.enqueue_input(b"x"), 1);
        assert_ne!(rd(&mut dev, LSR) & LSR_DR, 0);
        assert_eq!(interrupts(&dev), 0);
        assert_eq!(rd(&mut dev, THR), b'x');
        assert_eq!(rd(&mut dev, LSR) & LSR_DR, 0);
        assert_eq!(dev.rx_drained_evt().read().unwrap(), 1);

        wr(&mut dev, IER, 0x01);
        assert_eq!(dev.enqueue_input(b"abc"), 3);
        assert_eq!(interrupts(&dev), 1);
        assert_eq!(rd(&mut dev, IIR), IIR_RDA);
        let mut got = Vec::new();
        while rd(&mut dev, LSR) & LSR_DR != 0 {
            got.push(rd(&mut dev, THR));
        }
        assert_eq!(got, b"abc");
        assert_eq!(dev.rx_drained_evt().read().unwrap(), 1);
    }

    #[test]
    fn test_enabling_rdi_with_pending_data_interrupts() {
        let mut dev = device();
        dev.enqueue_input(b"q");
        assert_eq!(interrupts(&dev), 0);
        wr(&mut dev, IER, 0x01);
        assert_eq!(interrupts(&dev), 1);
    }

    #[test]
    fn test_fifo_capacity() {
        let mut dev = device();
        assert_eq!(dev.fifo_capacity(), 64);
        assert_eq!(dev.enqueue_input(&[b'z'; 100]), 64);
        assert_eq!(dev.fifo_capacity(), 0);
        assert_eq!(dev.enqueue_input(b"more"), 0);
        assert_eq!(dev.enqueue_input(b""), 0);
        rd(&mut dev, THR);
        assert_eq!(dev.fifo_capacity(), 1);
    }

    #[test]
    fn test_loopback_takes_no_host_input() {
        let mut dev = device();
        wr(&mut dev, 4, 0x10);
        assert_eq!(dev.enqueue_input(b"a"), 0);
        wr(&mut dev, THR, b'L');
        assert_eq!(rd(&mut dev, THR), b'L');
        assert!(dev.writer().contents().is_empty());
    }

    #[test]
    fn test_odd_accesses_are_ignored() {
        let mut dev = device();
        wr(&mut dev, SCR, 0x11);
        let mut wide = [0u8; 2];
        dev.pio_read(PioAddress(COM1_PORT_BASE), SCR, &mut wide);
        assert_eq!(wide, [0xFF, 0xFF]);
        dev.pio_write(PioAddress(COM1_PORT_BASE), SCR, &[0x22, 0x33]);
        dev.pio_write(PioAddress(COM1_PORT_BASE), SCR, &[]);
        assert_eq!(rd(&mut dev, SCR), 0x11);
        assert_eq!(rd(&mut dev, 8), 0xFF);
        assert_eq!(rd(&mut dev, 0x300), 0xFF);
        wr(&mut dev, 8, b'!');
        assert!(dev.writer().contents().is_empty());
    }

    #[test]
    fn test_writer_error_is_counted_not_fatal() {
        #[derive(Debug)]
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut dev = SerialDevice::new(Broken).unwrap();
        dev.write_register(1, 0x02);
        assert_eq!(dev.interrupt_evt().read().unwrap(), 1);
        assert_eq!(dev.read_register(2), IIR_THRE);
        dev.write_register(0, b'a');
        // THRE is still signalled so the driver does not hang.
        assert_eq!(dev.interrupt_evt().read().unwrap(), 1);
        dev.write_register(0, b'b');
        assert_eq!(dev.tx_lost_bytes(), 2);
    }

    #[test]
    fn test_debug_state_looks_without_side_effects() {
        let mut dev = device();
        assert_eq!(
            dev.debug_state(),
            "ier 0x00 iir 0x01 (nothing pending) lcr 0x03 mcr 0x08 lsr 0x60 msr 0xb0, \
             rx fifo 0 of 64 bytes, 0 tx bytes lost"
        );
        wr(&mut dev, IER, 0x03);
        dev.enqueue_input(b"ab");
        let state = dev.debug_state();
        assert!(
            state.starts_with("ier 0x03 iir 0x06 (rx data and thr empty pending)"),
            "{state}"
        );
        assert!(state.contains("lsr 0x61"), "{state}");
        assert!(state.contains("rx fifo 2 of 64 bytes"), "{state}");
        // Looking acknowledged nothing: the guest still sees both.
        assert_eq!(rd(&mut dev, IIR), 0xC6);
        assert_eq!(rd(&mut dev, THR), b'a');
    }

    #[test]
    fn test_external_interrupt_evt_and_trigger() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev =
            SerialDevice::with_interrupt_evt(evt.try_clone().unwrap(), SharedBuf::default())
                .unwrap();
        dev.write_register(1, 0x02);
        assert_eq!(evt.read().unwrap(), 1);

        let trigger = EventFdTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let clone = trigger.try_clone().unwrap();
        trigger.trigger().unwrap();
        assert_eq!(clone.read().unwrap(), 1);
    }

    #[test]
    fn test_failed_interrupt_is_one_warning() {
        tvm_util::test_log::start();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev =
            SerialDevice::with_interrupt_evt(evt.try_clone().unwrap(), SharedBuf::default())
                .unwrap();
        // A full eventfd counter: every further write fails with EAGAIN.
        evt.write(u64::MAX - 1).unwrap();
        // Enabling THRI raises the interrupt at once, or tries to...
        dev.write_register(1, 0x02);
        // ...and so does every transmitted byte, once the last one was acknowledged.
        for b in *b"ab" {
            dev.read_register(2);
            dev.write_register(0, b);
        }
        assert_eq!(dev.writer().contents(), b"ab");
        let warnings = tvm_util::test_log::lines(log::Level::Warn);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("serial: cannot raise the interrupt: "),
            "{warnings:?}"
        );
        assert!(
            warnings[0].ends_with("(repeats are logged at debug level)"),
            "{warnings:?}"
        );
        let debug = tvm_util::test_log::lines(log::Level::Debug);
        assert_eq!(
            debug
                .iter()
                .filter(|l| l.starts_with("serial: cannot raise the interrupt"))
                .count(),
            2,
            "{debug:?}"
        );
    }
}

#[cfg(test)]
mod state_tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_saved_uart_comes_back_with_its_registers_and_unread_input() {
        let mut uart = SerialDevice::new(Vec::new()).unwrap();
        // 8N1 at another divisor, the scratch register, interrupts on received data.
        uart.write_register(3, 0x80);
        uart.write_register(0, 0x03);
        uart.write_register(3, 0x03);
        uart.write_register(7, 0x5a);
        uart.write_register(1, 0x01);
        assert_eq!(uart.enqueue_input(b"hi"), 2);
        let saved = uart.save_state();
        assert_eq!(saved.in_buffer, b"hi");
        assert_eq!(saved.scratch, 0x5a);

        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut back =
            SerialDevice::from_state(evt.try_clone().unwrap(), Vec::new(), &saved).unwrap();
        assert_eq!(back.save_state(), saved);
        // The pending received-data interrupt is raised again.
        assert_eq!(evt.read().unwrap(), 1);
        assert_eq!(back.read_register(7), 0x5a);
        assert_eq!(back.read_register(0), b'h');
        assert_eq!(back.read_register(0), b'i');

        let mut too_much = saved.clone();
        too_much.in_buffer = vec![0; 65];
        assert!(matches!(
            SerialDevice::from_state(evt, Vec::new(), &too_much),
            Err(Error::InvalidState(65))
        ));
    }
}
