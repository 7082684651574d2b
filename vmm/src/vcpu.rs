//! vCPU threads and VM-exit dispatch.
//!
//! [`handle_exit`] is a free function from a `VcpuExit` to the bus, so tests can feed it
//! exits. [`Vcpu::start`] runs KVM_RUN in a loop on its own thread (`vcpu{N}`) until the guest stops
//! or the VMM asks it to; either way it reports through the shared [`ExitSignal`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use log::{debug, error, info, trace};
use tvm_bus::{IoManager, MmioAddress, MmioManager, PioAddress, PioManager};
use tvm_memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::seccomp::ThreadKind;
use crate::timing::{BootTimes, Phase};

/// The process exit code of a run that ended in a guest panic (1 is a VMM error, 2 is
/// clap's command-line syntax error).
pub const GUEST_PANIC_EXIT_CODE: i32 = 3;

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042 0xFE, or a KVM reset event).
    GuestReset,
    /// The guest powered off (ACPI S5, or a KVM shutdown system event).
    GuestPowerOff,
    /// The guest kernel panicked and said so through the pvpanic device.
    GuestPanic,
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN), how a reboot without reset hardware ends.
    TripleFault,
    /// The guest halted with no way to wake up (only without the in-kernel irqchip).
    Halted,
    /// Ctrl-A x on the console.
    ConsoleEscape,
    /// The VMM got a termination signal.
    Signal(i32),
    /// Something went wrong; the text is the diagnosis.
    Error(String),
}

impl ExitReason {
    /// The process exit code for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::Error(_) => 1,
            ExitReason::GuestPanic => GUEST_PANIC_EXIT_CODE,
            _ => 0,
        }
    }
}

/// The first exit reason wins; whoever records it also wakes the event loop.
#[derive(Debug)]
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

impl ExitSignal {
    /// A signal that writes `evt` when a reason is recorded.
    pub fn new(evt: EventFd) -> Self {
        ExitSignal {
            reason: Mutex::new(None),
            evt,
        }
    }

    /// Records `reason` unless one is already there, and wakes the event loop.
    pub fn request(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        drop(r);
        if let Err(e) = self.evt.write(1) {
            error!("failed to wake the event loop: {e}");
        }
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What the run loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum VcpuAction {
    /// Enter the guest again.
    Continue,
    /// Stop this vCPU and the VM.
    Stop(ExitReason),
    /// Stop with a diagnosis that needs the vCPU's state (filled in by the caller).
    Fail(String),
}

/// Dispatches one VM exit. Port and MMIO accesses go to the bus; an access nothing claims
/// reads as all ones and is logged at trace (ports) or debug (MMIO) level: guests probe
/// absent hardware all the time.
pub fn handle_exit(exit: VcpuExit<'_>, io: &IoManager) -> VcpuAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if let Err(e) = io.pio_read(PioAddress(port), data) {
                trace!("unhandled pio read at {port:#x}, {} bytes: {e}", data.len());
                data.fill(0xff);
            }
            VcpuAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            if let Err(e) = io.pio_write(PioAddress(port), data) {
                trace!(
                    "unhandled pio write at {port:#x}, {} bytes: {e}",
                    data.len()
                );
            }
            VcpuAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if let Err(e) = io.mmio_read(MmioAddress(addr), data) {
                debug!(
                    "unhandled mmio read at {addr:#x}, {} bytes: {e}",
                    data.len()
                );
                data.fill(0xff);
            }
            VcpuAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if let Err(e) = io.mmio_write(MmioAddress(addr), data) {
                debug!(
                    "unhandled mmio write at {addr:#x}, {} bytes: {e}",
                    data.len()
                );
            }
            VcpuAction::Continue
        }
        VcpuExit::Hlt => VcpuAction::Stop(ExitReason::Halted),
        VcpuExit::Shutdown => VcpuAction::Stop(ExitReason::TripleFault),
        VcpuExit::SystemEvent(kind, _) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => VcpuAction::Stop(ExitReason::GuestPowerOff),
            KVM_SYSTEM_EVENT_RESET => VcpuAction::Stop(ExitReason::GuestReset),
            KVM_SYSTEM_EVENT_CRASH => VcpuAction::Fail("KVM_EXIT_SYSTEM_EVENT (crash)".into()),
            other => VcpuAction::Fail(format!("KVM_EXIT_SYSTEM_EVENT (type {other})")),
        },
        VcpuExit::FailEntry(reason, cpu) => VcpuAction::Fail(format!(
            "KVM_EXIT_FAIL_ENTRY (hardware entry failure reason {reason:#x} on host cpu {cpu})"
        )),
        VcpuExit::InternalError => VcpuAction::Fail("KVM_EXIT_INTERNAL_ERROR".into()),
        VcpuExit::IrqWindowOpen | VcpuExit::Intr => VcpuAction::Continue,
        VcpuExit::Unsupported(n) => VcpuAction::Fail(format!("unsupported exit reason {n}")),
        other => VcpuAction::Fail(format!("unexpected exit {other:?}")),
    }
}

fn internal_error_detail(vcpu: &mut VcpuFd) -> String {
    let run = vcpu.get_kvm_run();
    if run.exit_reason != kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
        return String::new();
    }
    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the union member the
    // kernel filled in.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let name = match internal.suberror {
        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
        kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
        kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
        kvm_bindings::KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason",
        _ => "unknown",
    };
    let n = (internal.ndata as usize).min(internal.data.len());
    format!(
        ", suberror {} ({name}), data [{}]",
        internal.suberror,
        internal.data[..n]
            .iter()
            .map(|d| format!("{d:#x}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// One paragraph naming the exit, RIP and the instruction bytes there.
pub fn diagnose(vcpu: &mut VcpuFd, mem: &GuestMemoryMmap, id: u8, what: &str) -> String {
    let detail = internal_error_detail(vcpu);
    let mut text = format!("vcpu{id} stopped: {what}{detail}");
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(regs), Ok(sregs)) => {
            let rip = sregs.cs.base.wrapping_add(regs.rip);
            text.push_str(&format!(
                "; rip {:#x} (cs {:#x} base {:#x}), rsp {:#x}, cr0 {:#x}, cr3 {:#x}, cr4 {:#x}, efer {:#x}",
                regs.rip, sregs.cs.selector, sregs.cs.base, regs.rsp, sregs.cr0, sregs.cr3,
                sregs.cr4, sregs.efer
            ));
            let gpa = if sregs.cr0 & tvm_arch_x86::X86_CR0_PG != 0 {
                vcpu.translate_gva(rip)
                    .ok()
                    .filter(|t| t.valid != 0)
                    .map(|t| t.physical_address)
            } else {
                Some(rip)
            };
            let mut bytes = [0u8; 16];
            match gpa.map(|g| mem.read_slice(&mut bytes, GuestAddress(g))) {
                Some(Ok(())) => text.push_str(&format!(
                    ", instruction bytes at {:#x}: {}",
                    gpa.unwrap_or(0),
                    bytes
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                )),
                _ => text.push_str(", instruction bytes unavailable (rip not in guest ram)"),
            }
        }
        _ => text.push_str("; registers unavailable"),
    }
    text
}

/// A configured vCPU, ready to run on its own thread.
pub struct Vcpu {
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Its index.
    pub id: u8,
    /// The bus its exits go to.
    pub io: Arc<IoManager>,
    /// Guest memory (for diagnostics).
    pub mem: GuestMemoryMmap,
    /// Where it reports why it stopped.
    pub exit: Arc<ExitSignal>,
    /// Set by the VMM to make the thread leave its loop.
    pub stop: Arc<AtomicBool>,
    /// Boot-phase clock.
    pub times: Arc<BootTimes>,
    /// The seccomp filter this vCPU's thread installs before it first enters the guest.
    pub seccomp: Option<Arc<seccompiler::BpfProgram>>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler for [`kick_signal`]: its only job is to make KVM_RUN return
/// EINTR.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

impl Vcpu {
    /// Starts the vCPU on a thread named `vcpu{N}` that enters the guest once `barrier` opens.
    pub fn start(self, barrier: Arc<Barrier>) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || {
                let filtered = crate::seccomp::apply(ThreadKind::Vcpu, self.seccomp.as_deref());
                // Wait even on failure: the main thread counts on every vCPU at the barrier.
                barrier.wait();
                match filtered {
                    Ok(()) => self.run(),
                    Err(e) => self.exit.request(ExitReason::Error(crate::error_chain(&e))),
                }
            })
    }

    fn run(mut self) {
        info!("vcpu{} started", self.id);
        loop {
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            if self.id == 0 {
                self.times.mark(Phase::FirstKvmRun);
            }
            let action = match self.fd.run() {
                Ok(exit) => handle_exit(exit, &self.io),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    VcpuAction::Continue
                }
                Err(e) => VcpuAction::Fail(format!("KVM_RUN failed: {e}")),
            };
            match action {
                VcpuAction::Continue => {}
                VcpuAction::Stop(reason) => {
                    info!("vcpu{}: {reason:?}", self.id);
                    self.exit.request(reason);
                    break;
                }
                VcpuAction::Fail(what) => {
                    let text = diagnose(&mut self.fd, &self.mem, self.id, &what);
                    self.exit.request(ExitReason::Error(text));
                    break;
                }
            }
        }
        debug!("vcpu{} left its run loop", self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tvm_bus::{register_pio_device, MutDevicePio, PioAddressOffset};

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u16, Vec<u8>)>,
    }

    impl MutDevicePio for Recorder {
        fn pio_read(&mut self, _b: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
            data.fill(offset as u8 + 0x10);
        }
        fn pio_write(&mut self, _b: PioAddress, offset: PioAddressOffset, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn port_io_reaches_the_bus() {
        let mut io = IoManager::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        register_pio_device(&mut io, 0x3f8, 8, dev.clone()).unwrap();
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x3f9, &[0x42]), &io),
            VcpuAction::Continue
        );
        assert_eq!(dev.lock().unwrap().writes, vec![(1, vec![0x42])]);
        let mut data = [0u8; 1];
        handle_exit(VcpuExit::IoIn(0x3fa, &mut data), &io);
        assert_eq!(data, [0x12]);
        // Nobody at 0x2f8: all ones.
        let mut data = [0u8; 2];
        handle_exit(VcpuExit::IoIn(0x2f8, &mut data), &io);
        assert_eq!(data, [0xff, 0xff]);
        let mut data = [0u8; 4];
        handle_exit(VcpuExit::MmioRead(0xd000_0000, &mut data), &io);
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn stops_and_failures() {
        let io = IoManager::new();
        assert_eq!(
            handle_exit(VcpuExit::Shutdown, &io),
            VcpuAction::Stop(ExitReason::TripleFault)
        );
        assert_eq!(
            handle_exit(VcpuExit::Hlt, &io),
            VcpuAction::Stop(ExitReason::Halted)
        );
        assert_eq!(
            handle_exit(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[]), &io),
            VcpuAction::Stop(ExitReason::GuestReset)
        );
        assert!(matches!(
            handle_exit(VcpuExit::InternalError, &io),
            VcpuAction::Fail(_)
        ));
        assert!(matches!(
            handle_exit(VcpuExit::FailEntry(0x80000021, 1), &io),
            VcpuAction::Fail(s) if s.contains("0x80000021")
        ));
    }

    #[test]
    fn exit_signal_keeps_the_first_reason() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let sig = ExitSignal::new(evt.try_clone().unwrap());
        assert_eq!(sig.reason(), None);
        sig.request(ExitReason::GuestReset);
        sig.request(ExitReason::Error("late".into()));
        assert_eq!(sig.reason(), Some(ExitReason::GuestReset));
        assert_eq!(evt.read().unwrap(), 2);
        assert_eq!(ExitReason::GuestReset.exit_code(), 0);
        assert_eq!(ExitReason::Error("x".into()).exit_code(), 1);
        assert_eq!(ExitReason::GuestPanic.exit_code(), 3);
    }
}
