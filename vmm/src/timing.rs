//! Boot-phase timing without touching the guest.
//!
//! The VMM already sees every byte the guest writes to its console, so it can timestamp the
//! moments a Linux boot passes through: the first `KVM_RUN`, the first serial byte, the
//! kernel banner ("Linux version"), and the start of user space ("Run /init", which the
//! kernel prints right before it executes init). [`ConsoleTap`] wraps the serial output
//! writer and marks the console phases; the vCPU thread marks the first run.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use log::info;

/// The phases, in boot order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The first KVM_RUN ioctl of the boot vCPU.
    FirstKvmRun = 0,
    /// The first byte the guest wrote to the serial port.
    FirstSerialByte = 1,
    /// The kernel banner ("Linux version").
    KernelBanner = 2,
    /// The kernel started user space ("Run /init").
    Userspace = 3,
    /// The VMM began to shut down.
    Exit = 4,
}

const PHASES: [(Phase, &str); 5] = [
    (Phase::FirstKvmRun, "first_kvm_run_ms"),
    (Phase::FirstSerialByte, "first_serial_byte_ms"),
    (Phase::KernelBanner, "kernel_banner_ms"),
    (Phase::Userspace, "userspace_ms"),
    (Phase::Exit, "exit_ms"),
];

/// Timestamps of the boot phases relative to VMM start, in microseconds (0 = not reached).
#[derive(Debug)]
pub struct BootTimes {
    start: Instant,
    marks: [AtomicU64; 5],
}

impl BootTimes {
    /// Starts the clock (call first thing in `main`).
    pub fn new(start: Instant) -> Self {
        BootTimes {
            start,
            marks: Default::default(),
        }
    }

    /// Records `phase` now, unless it was already recorded.
    pub fn mark(&self, phase: Phase) {
        // Never 0, so that 0 keeps meaning "not reached".
        let us = (self.start.elapsed().as_micros() as u64).max(1);
        if self.marks[phase as usize]
            .compare_exchange(0, us, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            info!(
                "boot phase {}: {:.1} ms",
                PHASES[phase as usize].1.trim_end_matches("_ms"),
                us as f64 / 1000.0
            );
        }
    }

    /// When `phase` was reached, in microseconds since start.
    pub fn get(&self, phase: Phase) -> Option<u64> {
        match self.marks[phase as usize].load(Ordering::Relaxed) {
            0 => None,
            us => Some(us),
        }
    }

    /// The machine-readable summary line printed at exit:
    /// `TVM-BOOT-TIMES vmm_start_ms=0.0 first_kvm_run_ms=12.3 ... exit_ms=4567.8
    /// exit_reason=reboot`, with `-` for a phase never reached. `exit_reason` is
    /// [`ExitReason::name`](crate::vcpu::ExitReason::name) (`reboot`, `poweroff`,
    /// `triple_fault`, ...), so that a crash never reads like a clean reboot here either.
    pub fn summary_line(&self, exit_reason: &str) -> String {
        let mut line = String::from("TVM-BOOT-TIMES vmm_start_ms=0.0");
        for (phase, name) in PHASES {
            match self.get(phase) {
                Some(us) => line.push_str(&format!(" {name}={:.1}", us as f64 / 1000.0)),
                None => line.push_str(&format!(" {name}=-")),
            }
        }
        line.push_str(&format!(" exit_reason={exit_reason}"));
        line
    }
}

const BANNER: &[u8] = b"Linux version";
const USERSPACE: &[u8] = b"Run /init";

/// A `Write` adapter in front of the console output that marks the console boot phases.
#[derive(Debug)]
pub struct ConsoleTap<W> {
    inner: W,
    times: Arc<BootTimes>,
    window: Vec<u8>,
}

impl<W: Write> ConsoleTap<W> {
    /// Wraps `inner`.
    pub fn new(inner: W, times: Arc<BootTimes>) -> Self {
        ConsoleTap {
            inner,
            times,
            window: Vec::with_capacity(32),
        }
    }

    fn scan(&mut self, buf: &[u8]) {
        if self.times.get(Phase::Userspace).is_some() {
            return;
        }
        if !buf.is_empty() {
            self.times.mark(Phase::FirstSerialByte);
        }
        for &b in buf {
            if self.window.len() == USERSPACE.len().max(BANNER.len()) {
                self.window.remove(0);
            }
            self.window.push(b);
            if self.window.ends_with(BANNER) {
                self.times.mark(Phase::KernelBanner);
            } else if self.window.ends_with(USERSPACE) {
                self.times.mark(Phase::Userspace);
                return;
            }
        }
    }
}

impl<W: Write> Write for ConsoleTap<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        let written = &buf[..n];
        self.scan(written);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_found_across_write_boundaries() {
        let times = Arc::new(BootTimes::new(Instant::now()));
        let mut tap = ConsoleTap::new(Vec::new(), times.clone());
        assert!(times.get(Phase::FirstSerialByte).is_none());
        tap.write_all(b"early con").unwrap();
        assert!(times.get(Phase::FirstSerialByte).is_some());
        assert!(times.get(Phase::KernelBanner).is_none());
        // The 8250 gets one byte per register write: feed byte by byte.
        for b in b"[    0.000000] Linux vers" {
            tap.write_all(&[*b]).unwrap();
        }
        assert!(times.get(Phase::KernelBanner).is_none());
        tap.write_all(b"ion 6.1.0 (gcc)\n...Run ").unwrap();
        assert!(times.get(Phase::KernelBanner).is_some());
        assert!(times.get(Phase::Userspace).is_none());
        tap.write_all(b"/init as init process\n").unwrap();
        assert!(times.get(Phase::Userspace).is_some());
        assert_eq!(
            tap.inner,
            b"early con[    0.000000] Linux version 6.1.0 (gcc)\n...Run /init as init process\n"
        );
        assert!(times.get(Phase::FirstSerialByte) <= times.get(Phase::KernelBanner));
    }

    #[test]
    fn summary_line_format() {
        let times = BootTimes::new(Instant::now());
        times.mark(Phase::FirstKvmRun);
        let first = times.get(Phase::FirstKvmRun);
        times.mark(Phase::FirstKvmRun);
        assert_eq!(times.get(Phase::FirstKvmRun), first, "first mark wins");
        let line = times.summary_line("reboot");
        assert!(line.starts_with("TVM-BOOT-TIMES vmm_start_ms=0.0 first_kvm_run_ms="));
        assert!(line.contains(" first_serial_byte_ms=- "));
        assert!(line.ends_with(" exit_ms=- exit_reason=reboot"));
        assert_eq!(line.split(' ').count(), 8);
    }

    #[test]
    fn summary_line_names_each_way_out() {
        use crate::vcpu::ExitReason;
        let times = BootTimes::new(Instant::now());
        let mut seen = Vec::new();
        for reason in [
            ExitReason::GuestReset,
            ExitReason::GuestPowerOff,
            ExitReason::TripleFault,
            ExitReason::Halted,
            ExitReason::ConsoleEscape,
            ExitReason::Signal(libc::SIGTERM),
            ExitReason::Error("x".into()),
        ] {
            let line = times.summary_line(reason.name());
            let field = line.rsplit(' ').next().unwrap().to_string();
            assert!(!seen.contains(&field), "{field} twice");
            seen.push(field);
        }
        assert_eq!(
            seen,
            [
                "exit_reason=reboot",
                "exit_reason=poweroff",
                "exit_reason=triple_fault",
                "exit_reason=halted",
                "exit_reason=console_escape",
                "exit_reason=signal",
                "exit_reason=error",
            ]
        );
    }
}
