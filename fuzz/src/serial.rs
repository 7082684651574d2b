// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The serial console: guest register accesses on the UART interleaved with host input
//! through [`SerialInput`] (the Ctrl-A escape, backpressure, end of input), driven by a
//! real event manager over a Unix socket.
//!
//! Input: operations until the input ends (the first byte picks one, modulo 6): 0 register
//! write (offset u8 modulo 9, value u8); 1 register read (offset); 2 odd-width port access
//! (offset u8, width u8 modulo 4, write flag); 3 host input (length u8, bytes); 4 the event
//! loop runs once; 5 the host closes its end.
//!
//! Invariants:
//! - the output sink gets exactly the bytes the guest wrote to THR with DLAB clear, in
//!   order, while loopback was off;
//! - while loopback was never on, what the guest reads from RBR with data ready is, in
//!   order, the host input after the escape rules (Ctrl-A x ends input and stops the VMM,
//!   Ctrl-A Ctrl-A is one Ctrl-A, Ctrl-A and another byte are both bytes, a final held
//!   Ctrl-A is delivered at end of input), and nothing is lost: the bytes read plus the
//!   bytes in the FIFO never exceed that input, and are all of it once the loop has
//!   drained everything;
//! - the FIFO never holds more than 64 bytes; LSR.DR is set exactly when it holds some;
//! - the exit EventFd fires only after Ctrl-A x;
//! - no panic, no `error!`, no repeated `warn!`.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, PoisonError};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use tvm_serial::{SerialDevice, SerialInput, COM1_PORT_BASE};
use vm_device::bus::PioAddress;
use vm_device::MutDevicePio;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{logger, Input};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

const FIFO_SIZE: usize = 64;
const CTRL_A: u8 = 0x01;
/// Most host input per run.
const MAX_SENT: usize = 16 * 1024;

/// The guest's output, readable by the harness.
#[derive(Debug, Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The escape rules applied to everything the host sent: what the guest must receive, and
/// whether Ctrl-A x came.
fn expected_input(sent: &[u8], closed: bool) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut held = false;
    for &b in sent {
        if held {
            held = false;
            match b {
                b'x' => return (out, true),
                CTRL_A => out.push(CTRL_A),
                other => out.extend_from_slice(&[CTRL_A, other]),
            }
        } else if b == CTRL_A {
            held = true;
        } else {
            out.push(b);
        }
    }
    if held && closed {
        out.push(CTRL_A);
    }
    (out, false)
}

type Manager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// Runs one input.
pub fn run(data: &[u8]) {
    logger::start_input();
    let mut input = Input::new(data);
    let sink = Sink::default();
    let device = Arc::new(Mutex::new(
        SerialDevice::new(sink.clone()).expect("eventfd"),
    ));
    let (mut host, source) = UnixStream::pair().expect("socketpair");
    source.set_nonblocking(true).expect("nonblocking");
    let exit = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let serial_input = Arc::new(Mutex::new(
        SerialInput::new(device.clone(), source, exit.try_clone().expect("dup")).expect("input"),
    ));
    let mut manager = Manager::new().expect("epoll");
    manager.add_subscriber(serial_input);

    let mut dlab = false;
    let mut loopback = false;
    let mut loopback_ever = false;
    let mut written = Vec::new();
    let mut sent = Vec::new();
    let mut received = Vec::new();
    let mut closed = false;
    let mut ops = 0;
    while !input.is_empty() && ops < 1024 {
        ops += 1;
        match input.u8() % 6 {
            0 => {
                let off = input.u8() % 9;
                let v = input.u8();
                lock(&device).pio_write(PioAddress(COM1_PORT_BASE), u16::from(off), &[v]);
                match off {
                    0 if !dlab && !loopback => written.push(v),
                    3 => dlab = v & 0x80 != 0,
                    4 => {
                        loopback = v & 0x10 != 0;
                        loopback_ever |= loopback;
                    }
                    _ => {}
                }
            }
            1 => {
                let off = input.u8() % 9;
                let mut d = lock(&device);
                let ready_before = d.fifo_capacity() < FIFO_SIZE;
                let mut b = [0u8];
                d.pio_read(PioAddress(COM1_PORT_BASE), u16::from(off), &mut b);
                if off == 0 && !dlab && ready_before {
                    received.push(b[0]);
                }
            }
            2 => {
                let off = u16::from(input.u8());
                let width = [0, 2, 4, 8][usize::from(input.u8() % 4)];
                let mut d = lock(&device);
                if input.bool() {
                    d.pio_write(PioAddress(COM1_PORT_BASE), off, &vec![0x41; width]);
                } else {
                    let mut b = vec![0u8; width];
                    d.pio_read(PioAddress(COM1_PORT_BASE), off, &mut b);
                    assert!(b.iter().all(|&x| x == 0xff), "odd-width read returned data");
                }
            }
            3 => {
                let len = usize::from(input.u8());
                let bytes = input.bytes(len);
                // The socket buffer holds far more than this, so the write never blocks.
                if !closed && sent.len() + bytes.len() <= MAX_SENT {
                    host.write_all(bytes).expect("room in the socket buffer");
                    sent.extend_from_slice(bytes);
                }
            }
            4 => {
                manager.run_with_timeout(0).expect("epoll");
            }
            _ => {
                if !closed {
                    host.shutdown(std::net::Shutdown::Write).expect("shutdown");
                    closed = true;
                }
            }
        }

        let mut d = lock(&device);
        let held = FIFO_SIZE - d.fifo_capacity();
        assert!(d.fifo_capacity() <= FIFO_SIZE, "fifo capacity above 64");
        if !loopback {
            let lsr = d.read_register(5);
            assert_eq!(
                lsr & 1 != 0,
                held > 0,
                "LSR.DR {lsr:#x} with {held} bytes held"
            );
        }
        drop(d);
        let out = sink
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        assert_eq!(out, written, "the output is not what the guest transmitted");
        let (expected, exit_sent) = expected_input(&sent, closed);
        if !exit_sent {
            assert!(exit.read().is_err(), "exit requested without Ctrl-A x");
        }
        if !loopback_ever {
            assert!(
                expected.starts_with(&received),
                "the guest read {received:?}, not a prefix of the input {expected:?}"
            );
            assert!(
                received.len() + held <= expected.len(),
                "more bytes reached the guest than the host sent"
            );
        }
    }
    // Drain: the loop runs until the host input is consumed, the guest reading RBR.
    if loopback_ever || !input.is_empty() {
        return;
    }
    let mut idle = 0;
    while idle < 4 {
        manager.run_with_timeout(0).expect("epoll");
        let mut d = lock(&device);
        if dlab {
            d.pio_write(PioAddress(COM1_PORT_BASE), 3, &[0x03]);
            dlab = false;
        }
        let before = received.len();
        while d.fifo_capacity() < FIFO_SIZE {
            let mut b = [0u8];
            d.pio_read(PioAddress(COM1_PORT_BASE), 0, &mut b);
            received.push(b[0]);
        }
        idle = if received.len() == before {
            idle + 1
        } else {
            0
        };
    }
    let (expected, _) = expected_input(&sent, closed);
    assert_eq!(
        received, expected,
        "host input lost or changed on its way to the guest"
    );
}
