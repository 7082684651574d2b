// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Host input (stdin) to the guest's receive FIFO, through event-manager, with
//! backpressure and the Ctrl-A x escape.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, info, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::escape::EscapeParser;
use crate::{Error, Result, SerialDevice};

/// Event data: the input source is readable (or hung up).
const PROCESS_INPUT: u32 = 0;
/// Event data: the guest read the receive FIFO empty.
const PROCESS_RX_DRAINED: u32 = 1;

/// Most bytes read from the host and not yet taken by the FIFO; also the largest read.
const MAX_PENDING: usize = 64;

/// Where the input source stands in the epoll set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InputState {
    /// Registered: readable input is read as the FIFO has room.
    Watching,
    /// Taken out of epoll while the FIFO is full; `rx_drained` puts it back.
    Paused,
    /// End of input, an error, or an exit request: never read again.
    Closed,
}

/// Returns a duplicate of the process's stdin as a plain [`File`], the input source to
/// give [`SerialInput`] in production.
///
/// [`std::io::Stdin`] reads through an 8 KiB user-space buffer; bytes it pulled in ahead
/// would sit there, invisible to epoll, and never reach the guest. The duplicate shares the
/// terminal's open file description (raw mode set on fd 0 applies) and stays blocking:
/// [`SerialInput`] reads only after epoll reports it readable.
///
/// # Errors
///
/// [`Error::DupStdin`] when `dup` fails.
pub fn stdin_source() -> Result<File> {
    io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map(File::from)
        .map_err(Error::DupStdin)
}

/// Feeds the guest's receive FIFO from a host input source, as an event-manager subscriber.
///
/// - Reads only as much as the FIFO has room for: what the guest has not taken stays in
///   the kernel's pipe or tty buffer, so nothing is lost and the host buffers nothing
///   beyond a few pending bytes.
/// - When the FIFO is full the source leaves the epoll set (no busy loop) and comes back
///   when the device's `rx_drained` EventFd says the guest read the FIFO empty.
/// - Ctrl-A x writes `exit_evt`; Ctrl-A Ctrl-A sends one Ctrl-A; Ctrl-A and any other byte
///   sends both.
/// - End of input, a hang-up or a read error stops input only; the guest keeps running.
#[derive(Debug)]
pub struct SerialInput<W: Write + Send, R: Read + AsRawFd + Send> {
    device: Arc<Mutex<SerialDevice<W>>>,
    input: R,
    rx_drained: EventFd,
    exit_evt: EventFd,
    escape: EscapeParser,
    /// Bytes for the guest that the FIFO has not taken yet; at most `MAX_PENDING`.
    pending: Vec<u8>,
    state: InputState,
}

impl<W: Write + Send, R: Read + AsRawFd + Send> SerialInput<W, R> {
    /// Creates the subscriber.
    ///
    /// # Arguments
    ///
    /// * `device` - the UART, shared with the vCPU threads' bus.
    /// * `input` - the host source: [`stdin_source`] in production (put the terminal in raw
    ///   mode first), a pipe or socket in tests.
    /// * `exit_evt` - written with 1 on Ctrl-A x; the VMM watches it and shuts down.
    ///
    /// # Errors
    ///
    /// [`Error::CloneEventFd`] when the device's `rx_drained` EventFd cannot be duplicated.
    pub fn new(device: Arc<Mutex<SerialDevice<W>>>, input: R, exit_evt: EventFd) -> Result<Self> {
        let rx_drained = lock(&device)
            .rx_drained_evt()
            .try_clone()
            .map_err(Error::CloneEventFd)?;
        Ok(Self {
            device,
            input,
            rx_drained,
            exit_evt,
            escape: EscapeParser::default(),
            pending: Vec::with_capacity(MAX_PENDING),
            state: InputState::Watching,
        })
    }

    /// Whether host input is still being read (false after end of input or Ctrl-A x).
    pub fn is_input_open(&self) -> bool {
        self.state != InputState::Closed
    }

    fn input_events(&self) -> Events {
        Events::with_data(&self.input, PROCESS_INPUT, EventSet::IN)
    }

    /// Hands pending bytes to the FIFO; returns whether the FIFO can take more input now.
    fn deliver_pending(&mut self) -> bool {
        let mut device = lock(&self.device);
        let taken = device.enqueue_input(&self.pending);
        self.pending.drain(..taken);
        self.pending.is_empty() && device.fifo_capacity() > 0
    }

    fn on_input(&mut self, event_set: EventSet, ops: &mut EventOps) {
        if self.state != InputState::Watching {
            return;
        }
        // With IN, read first: a pipe whose writer left reports IN | HUP while data remains,
        // and the read of 0 bytes then tells the end.
        if event_set.contains(EventSet::IN) {
            self.read_input(ops);
        } else if event_set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            self.close_input(ops, "hang-up or error on the input");
        }
    }

    fn read_input(&mut self, ops: &mut EventOps) {
        if !self.deliver_pending() {
            self.pause(ops);
            return;
        }
        let free = lock(&self.device).fifo_capacity();
        // A held Ctrl-A may come out as two bytes: keep the output within `MAX_PENDING`.
        let limit = free.min(MAX_PENDING - usize::from(self.escape.is_holding()));
        let mut buf = [0u8; MAX_PENDING];
        match self.input.read(&mut buf[..limit]) {
            Ok(0) => {
                self.pending.extend(self.escape.finish());
                self.deliver_pending();
                self.close_input(ops, "end of input");
            }
            Ok(n) => {
                let exit = self.escape.feed(&buf[..n], &mut self.pending);
                let more = self.deliver_pending();
                if exit {
                    info!("serial: Ctrl-A x pressed, requesting exit");
                    if let Err(e) = self.exit_evt.write(1) {
                        warn!("serial: cannot signal the exit request: {e}");
                    }
                    self.close_input(ops, "exit requested");
                } else if !more {
                    self.pause(ops);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) => {}
            Err(e) => {
                warn!("serial: cannot read input: {e}");
                self.close_input(ops, "read error");
            }
        }
    }

    fn on_rx_drained(&mut self, ops: &mut EventOps) {
        // Clear the counter; EAGAIN (already read) is fine.
        let _ = self.rx_drained.read();
        if self.pending.is_empty() && self.state != InputState::Paused {
            return;
        }
        if self.deliver_pending() && self.state == InputState::Paused {
            match ops.add(self.input_events()) {
                Ok(()) => {
                    debug!("serial: receive FIFO drained, resuming input");
                    self.state = InputState::Watching;
                }
                Err(e) => {
                    warn!("serial: cannot resume input: {e}");
                    self.state = InputState::Closed;
                }
            }
        }
    }

    fn pause(&mut self, ops: &mut EventOps) {
        if self.state != InputState::Watching {
            return;
        }
        debug!("serial: receive FIFO full, pausing input");
        match ops.remove(self.input_events()) {
            Ok(()) => self.state = InputState::Paused,
            Err(e) => {
                warn!("serial: cannot pause input: {e}");
                self.state = InputState::Closed;
            }
        }
    }

    fn close_input(&mut self, ops: &mut EventOps, why: &str) {
        if self.state == InputState::Watching {
            if let Err(e) = ops.remove(self.input_events()) {
                debug!("serial: cannot unregister input: {e}");
            }
        }
        self.state = InputState::Closed;
        debug!("serial: {why}, console input stopped");
    }
}

impl<W: Write + Send, R: Read + AsRawFd + Send> MutEventSubscriber for SerialInput<W, R> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            PROCESS_INPUT => self.on_input(events.event_set(), ops),
            PROCESS_RX_DRAINED => self.on_rx_drained(ops),
            other => debug!("serial: unexpected event data {other}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.rx_drained,
            PROCESS_RX_DRAINED,
            EventSet::IN,
        )) {
            warn!("serial: cannot watch rx_drained, input will stop once the FIFO fills: {e}");
        }
        // A regular file or /dev/null cannot be polled (EPERM): no console input then.
        if let Err(e) = ops.add(self.input_events()) {
            debug!("serial: input cannot be polled, console input disabled: {e}");
            self.state = InputState::Closed;
        }
    }
}

fn lock<W: Write + Send>(device: &Mutex<SerialDevice<W>>) -> MutexGuard<'_, SerialDevice<W>> {
    // Register state is valid after any panic of a holder: each access is one register.
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::net::UnixStream;

    use event_manager::{EventManager, SubscriberOps};
    use vm_device::bus::PioAddress;
    use vm_device::MutDevicePio;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use crate::escape::CTRL_A;
    use crate::test_utils::SharedBuf;
    use crate::COM1_PORT_BASE;

    type Manager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;
    type Input = SerialInput<SharedBuf, UnixStream>;

    const LSR: u16 = 5;
    const LSR_DR: u8 = 0x01;

    struct Harness {
        manager: Manager,
        device: Arc<Mutex<SerialDevice<SharedBuf>>>,
        input: Arc<Mutex<Input>>,
        host: UnixStream,
        exit: EventFd,
    }

    impl Harness {
        fn new() -> Self {
            let device = Arc::new(Mutex::new(SerialDevice::new(SharedBuf::default()).unwrap()));
            let (host, source) = UnixStream::pair().unwrap();
            let exit = EventFd::new(EFD_NONBLOCK).unwrap();
            let input = Arc::new(Mutex::new(
                SerialInput::new(Arc::clone(&device), source, exit.try_clone().unwrap()).unwrap(),
            ));
            let mut manager = Manager::new().unwrap();
            manager.add_subscriber(input.clone());
            Self {
                manager,
                device,
                input,
                host,
                exit,
            }
        }

        fn pio_write(&self, offset: u16, value: u8) {
            self.device
                .lock()
                .unwrap()
                .pio_write(PioAddress(COM1_PORT_BASE), offset, &[value]);
        }

        fn pio_read(&self, offset: u16) -> u8 {
            let mut data = [0u8];
            self.device
                .lock()
                .unwrap()
                .pio_read(PioAddress(COM1_PORT_BASE), offset, &mut data);
            data[0]
        }

        /// What the guest's driver does: read RBR while LSR says data is ready.
        fn guest_drain(&self) -> Vec<u8> {
            let mut got = Vec::new();
            while self.pio_read(LSR) & LSR_DR != 0 {
                got.push(self.pio_read(0));
            }
            got
        }

        fn run(&mut self) -> usize {
            self.manager.run_with_timeout(50).unwrap()
        }

        fn state(&self) -> InputState {
            self.input.lock().unwrap().state
        }

        fn fifo_capacity(&self) -> usize {
            self.device.lock().unwrap().fifo_capacity()
        }
    }

    #[test]
    fn test_backpressure_nothing_lost() {
        let mut h = Harness::new();
        // The guest enables the receive interrupt.
        h.pio_write(1, 0x01);
        let data: Vec<u8> = (0..1000).map(|i| b'a' + (i % 26) as u8).collect();
        h.host.write_all(&data).unwrap();

        for _ in 0..4 {
            h.run();
        }
        assert_eq!(h.fifo_capacity(), 0);
        assert_eq!(h.state(), InputState::Paused);
        assert!(h.input.lock().unwrap().pending.is_empty());
        assert!(h.device.lock().unwrap().interrupt_evt().read().unwrap() >= 1);
        // The source is out of epoll: no spinning on a readable fd we do not read.
        assert_eq!(h.run(), 0);

        let mut got = Vec::new();
        let mut rounds = 0;
        while got.len() < data.len() {
            let chunk = h.guest_drain();
            assert!(chunk.len() <= 64);
            got.extend(chunk);
            // rx_drained fires, input comes back, the FIFO refills.
            h.run();
            h.run();
            rounds += 1;
            assert!(rounds < 100, "no progress after {} bytes", got.len());
        }
        assert_eq!(got, data);
        assert_eq!(h.state(), InputState::Watching);
        assert!(h.input.lock().unwrap().is_input_open());
    }

    #[test]
    fn test_input_raises_interrupt() {
        let mut h = Harness::new();
        h.pio_write(1, 0x01);
        h.host.write_all(b"ok").unwrap();
        h.run();
        assert_eq!(h.device.lock().unwrap().interrupt_evt().read().unwrap(), 1);
        // IIR: receive data available, FIFOs enabled.
        assert_eq!(h.pio_read(2), 0xC4);
        assert_eq!(h.guest_drain(), b"ok");
    }

    #[test]
    fn test_ctrl_a_x_requests_exit() {
        let mut h = Harness::new();
        h.host.write_all(b"ab\x01xcd").unwrap();
        h.run();
        assert_eq!(h.exit.read().unwrap(), 1);
        assert_eq!(h.state(), InputState::Closed);
        assert!(!h.input.lock().unwrap().is_input_open());
        // Input is no longer watched, though "cd" is still readable.
        assert_eq!(h.run(), 0);
        assert_eq!(h.guest_drain(), b"ab");
    }

    #[test]
    fn test_escaped_ctrl_a_reaches_guest() {
        let mut h = Harness::new();
        h.host.write_all(b"\x01\x01\x01c").unwrap();
        h.run();
        assert_eq!(h.guest_drain(), [CTRL_A, CTRL_A, b'c']);
        assert!(h.exit.read().is_err());
    }

    #[test]
    fn test_eof_stops_input_only() {
        let mut h = Harness::new();
        // A trailing Ctrl-A at the end of input goes to the guest as is.
        h.host.write_all(b"bye\x01").unwrap();
        h.host.shutdown(std::net::Shutdown::Write).unwrap();
        for _ in 0..3 {
            h.run();
        }
        assert_eq!(h.state(), InputState::Closed);
        assert_eq!(h.guest_drain(), [b'b', b'y', b'e', CTRL_A]);
        assert!(h.exit.read().is_err());
        // No hang-up spin, and the device still works.
        assert_eq!(h.run(), 1); // rx_drained from the drain above
        assert_eq!(h.run(), 0);
        h.pio_write(7, 0x42);
        assert_eq!(h.pio_read(7), 0x42);
    }

    #[test]
    fn test_hang_up_stops_input() {
        let mut h = Harness::new();
        let host = std::mem::replace(&mut h.host, UnixStream::pair().unwrap().0);
        drop(host);
        h.run();
        assert_eq!(h.state(), InputState::Closed);
        assert_eq!(h.run(), 0);
    }

    #[test]
    fn test_unpollable_input_disables_input() {
        let device = Arc::new(Mutex::new(SerialDevice::new(SharedBuf::default()).unwrap()));
        let exit = EventFd::new(EFD_NONBLOCK).unwrap();
        let null = File::open("/dev/null").unwrap();
        let input = Arc::new(Mutex::new(
            SerialInput::new(Arc::clone(&device), null, exit).unwrap(),
        ));
        let mut manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        manager.add_subscriber(input.clone());
        assert!(!input.lock().unwrap().is_input_open());
        assert_eq!(manager.run_with_timeout(10).unwrap(), 0);
    }

    #[test]
    fn test_stdin_source() {
        // Under the test harness stdin may be anything, even closed.
        match stdin_source() {
            Ok(file) => assert_ne!(file.as_raw_fd(), 0),
            Err(e) => assert!(matches!(e, Error::DupStdin(_))),
        }
    }
}
