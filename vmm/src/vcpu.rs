//! vCPU threads and VM-exit dispatch.
//!
//! [`handle_exit`] is a free function from a `VcpuExit` to the bus, so tests can feed it
//! exits. [`Vcpu::start`] runs KVM_RUN in a loop on its own thread (`vcpu{N}`) until the guest stops
//! or the VMM asks it to; either way it reports through the shared [`ExitSignal`].

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use log::{debug, error, info, trace, warn, Level};
use tvm_bus::{IoManager, MmioAddress, MmioManager, PioAddress, PioManager};
use tvm_memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::dump::{ExitKind, ExitStats, SymbolMap, VcpuSnapshot};
use crate::pause::PauseGate;
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

    /// A short, stable name: the `exit_reason=` of the `TVM-BOOT-TIMES` line.
    ///
    /// A new reason adds one arm here, in [`describe`](Self::describe) and in
    /// [`log_level`](Self::log_level).
    pub fn name(&self) -> &'static str {
        match self {
            ExitReason::GuestReset => "reboot",
            ExitReason::GuestPowerOff => "poweroff",
            ExitReason::GuestPanic => "panic",
            ExitReason::TripleFault => "triple_fault",
            ExitReason::Halted => "halted",
            ExitReason::ConsoleEscape => "console_escape",
            ExitReason::Signal(_) => "signal",
            ExitReason::Error(_) => "error",
        }
    }

    /// What happened, in words, for the log line `guest stopped: ...`.
    pub fn describe(&self) -> String {
        match self {
            ExitReason::GuestReset => {
                "the guest rebooted (cpu reset through the i8042, or a kvm reset event)".into()
            }
            ExitReason::GuestPowerOff => "the guest powered off (acpi s5)".into(),
            ExitReason::GuestPanic => {
                format!("the guest panicked (pvpanic); exit code {GUEST_PANIC_EXIT_CODE}")
            }
            ExitReason::TripleFault => "the guest triple-faulted (KVM_EXIT_SHUTDOWN): a crash, \
                 unless it rebooted with reboot=t; its state is in the warning above"
                .into(),
            ExitReason::Halted => "the guest halted with no way to wake up".into(),
            ExitReason::ConsoleEscape => "Ctrl-A x on the console".into(),
            ExitReason::Signal(n) => format!("the vmm got signal {n}"),
            ExitReason::Error(text) => text.clone(),
        }
    }

    /// The level at which the end of the run is logged: `info` for an orderly end, `warn`
    /// for one that may hide a crash (a triple fault), `error` for a failure.
    pub fn log_level(&self) -> Level {
        match self {
            ExitReason::TripleFault => Level::Warn,
            ExitReason::Error(_) | ExitReason::GuestPanic => Level::Error,
            ExitReason::GuestReset
            | ExitReason::GuestPowerOff
            | ExitReason::Halted
            | ExitReason::ConsoleEscape
            | ExitReason::Signal(_) => Level::Info,
        }
    }

    /// Whether the vCPU that saw this reason logs its registers and instruction bytes at
    /// `warn!` as it stops (a triple fault is a crash as often as a reboot).
    pub fn wants_diagnosis(&self) -> bool {
        matches!(self, ExitReason::TripleFault)
    }
}

/// Logs the end of the run at the reason's level: `guest stopped: ...`.
pub fn log_stop(reason: &ExitReason) {
    log::log!(reason.log_level(), "guest stopped: {}", reason.describe());
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

    /// Records `reason` unless one is already there, and wakes the event loop. Says at
    /// debug level which thread raised it (a vCPU's is `vcpuN`) and whether it was first.
    pub fn request(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        let me = std::thread::current();
        let who = me.name().unwrap_or("an unnamed thread");
        match &*r {
            None => {
                debug!("{who} raised the stop: {reason:?}");
                *r = Some(reason);
            }
            Some(first) => debug!("{who} raised {reason:?} after {first:?}: {first:?} stays"),
        }
        drop(r);
        if let Err(e) = self.evt.write(1) {
            error!("failed to wake the event loop: {e}");
        }
    }

    /// Records a guest panic, also over a reboot, power-off or triple fault recorded
    /// before it: a panicking kernel goes on to one of those (`panic=N`, `reboot=t`), so
    /// they are its consequence, and a vCPU may record it before the event loop has seen
    /// the panic. A VMM error, a signal or Ctrl-A x recorded first stays the reason.
    pub fn request_panic(&self) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        match *r {
            None
            | Some(ExitReason::GuestReset)
            | Some(ExitReason::GuestPowerOff)
            | Some(ExitReason::TripleFault) => *r = Some(ExitReason::GuestPanic),
            Some(_) => {}
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
    /// Exit statistics and dump requests, shared with the event loop.
    pub monitor: Arc<VcpuMonitor>,
    /// The guest's symbols, to name RIP in dumps.
    pub symbols: Option<Arc<SymbolMap>>,
    /// Where the thread parks while the VM is paused.
    pub gate: Arc<PauseGate>,
    /// The MSRs a snapshot saves (KVM's saveable list).
    pub msrs: Arc<Vec<u32>>,
}

/// What a vCPU thread shares with the event loop for diagnostics: its exit statistics and
/// the dump handshake (the loop asks with [`request_dump`](Self::request_dump) and a kick,
/// the vCPU thread answers between two `KVM_RUN`s).
#[derive(Debug, Default)]
pub struct VcpuMonitor {
    /// Exits so far, by kind, and the last few.
    pub stats: ExitStats,
    dump_requested: AtomicU64,
    dump_answered: AtomicU64,
    /// The state-save handshake of a snapshot: the loop asks for save number N with
    /// [`request_save`](Self::request_save) and wakes the parked threads; the vCPU thread
    /// leaves its state (or why it could not) in `saved` and answers N.
    save_requested: AtomicU64,
    save_answered: AtomicU64,
    saved: Mutex<Option<std::result::Result<tvm_snapshot::VcpuState, String>>>,
}

impl VcpuMonitor {
    /// Asks for dump number `seq` (numbers grow from 1); kick the thread afterwards.
    pub fn request_dump(&self, seq: u64) {
        self.dump_requested.store(seq, Ordering::Release);
    }

    /// Whether dump `seq` was answered.
    pub fn answered(&self, seq: u64) -> bool {
        self.dump_answered.load(Ordering::Acquire) >= seq
    }

    /// Asks for state save number `seq` (numbers grow from 1); wake the parked threads
    /// afterwards ([`PauseGate::wake_parked`]).
    pub fn request_save(&self, seq: u64) {
        self.save_requested.store(seq, Ordering::Release);
    }

    /// The state of save `seq`, once the vCPU thread has answered it.
    pub fn take_saved(
        &self,
        seq: u64,
    ) -> Option<std::result::Result<tvm_snapshot::VcpuState, String>> {
        if self.save_answered.load(Ordering::Acquire) < seq {
            return None;
        }
        self.saved.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn pending_save(&self) -> Option<u64> {
        let want = self.save_requested.load(Ordering::Acquire);
        (want > self.save_answered.load(Ordering::Relaxed)).then_some(want)
    }

    /// The dump number asked for and not yet answered, if any.
    fn pending_dump(&self) -> Option<u64> {
        let want = self.dump_requested.load(Ordering::Acquire);
        (want > self.dump_answered.load(Ordering::Relaxed)).then_some(want)
    }
}

/// Reads what a dump shows from the vCPU (on its own thread).
fn snapshot(fd: &VcpuFd) -> VcpuSnapshot {
    VcpuSnapshot {
        regs: fd.get_regs().ok(),
        sregs: fd.get_sregs().ok(),
        mp_state: fd.get_mp_state().ok().map(|m| m.mp_state),
        events: fd.get_vcpu_events().ok(),
        lapic: fd.get_lapic().ok(),
    }
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

thread_local! {
    /// This thread's `kvm_run.immediate_exit` byte while it runs a vCPU (null otherwise).
    /// A `const` thread local without a destructor: the kick handler reads it without
    /// allocating or locking.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let flag = IMMEDIATE_EXIT.with(Cell::get);
    if !flag.is_null() {
        // SAFETY: `flag` points into this thread's own vCPU's kvm_run mapping, set by
        // `Vcpu::run` and reset to null by its `ClearImmediateExit` guard (on return or
        // unwind) before that mapping goes away; the signal was sent to this thread, so
        // the vCPU is alive. A volatile byte store is async-signal-safe.
        unsafe { flag.write_volatile(1) };
    }
}

/// Installs the handler for [`kick_signal`]. A kick makes KVM_RUN return EINTR; one that
/// lands just before KVM_RUN is entered sets `kvm_run.immediate_exit`, so the next KVM_RUN
/// returns EINTR at once instead of the kick being lost.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Resets this thread's [`IMMEDIATE_EXIT`] pointer to null when dropped.
struct ClearImmediateExit;

impl Drop for ClearImmediateExit {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|f| f.set(std::ptr::null_mut()));
    }
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
        let flag = std::ptr::addr_of_mut!(self.fd.get_kvm_run().immediate_exit);
        IMMEDIATE_EXIT.with(|f| f.set(flag));
        // Cleared when this guard drops: on return and on unwinding alike, and before
        // `self` (the vCPU and its kvm_run mapping), which is dropped after the locals.
        let _clear = ClearImmediateExit;
        self.run_loop();
        debug!("vcpu{} left its run loop", self.id);
    }

    fn run_loop(&mut self) {
        loop {
            // Clear a kick's immediate_exit first, then look at what the kick was for: a
            // kick after this point finds its flag already set, or re-arms immediate_exit.
            self.fd.set_kvm_immediate_exit(0);
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            let (gate, stop) = (self.gate.clone(), self.stop.clone());
            if gate.park_if_closed(&stop, || self.run_errands()) {
                // Tell the guest's kvmclock that the vCPU was stopped, so that its
                // soft-lockup watchdog does not count the pause. EINVAL: the guest does
                // not use kvmclock.
                if let Err(e) = self.fd.kvmclock_ctrl() {
                    debug!("vcpu{}: KVM_KVMCLOCK_CTRL: {e}", self.id);
                }
                // Back to the top: a stop may have come while parked.
                continue;
            }
            if let Some(seq) = self.monitor.pending_dump() {
                self.answer_dump(seq);
            }
            if self.id == 0 {
                self.times.mark(Phase::FirstKvmRun);
            }
            let stats = &self.monitor.stats;
            let action = match self.fd.run() {
                Ok(exit) => {
                    let (kind, detail) = ExitKind::of(&exit);
                    stats.record(kind, detail);
                    handle_exit(exit, &self.io)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    stats.record(ExitKind::Interrupted, e.errno() as u64);
                    VcpuAction::Continue
                }
                Err(e) => VcpuAction::Fail(format!("KVM_RUN failed: {e}")),
            };
            match action {
                VcpuAction::Continue => {}
                VcpuAction::Stop(reason) => {
                    if reason.wants_diagnosis() {
                        warn!(
                            "{}",
                            diagnose(&mut self.fd, &self.mem, self.id, reason.name())
                        );
                    } else {
                        info!("vcpu{}: {reason:?}", self.id);
                    }
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
    }

    /// What a parked vCPU thread is asked to do: save its state for a snapshot.
    fn run_errands(&mut self) {
        if let Some(seq) = self.monitor.pending_save() {
            let state = self.save_state();
            if let Err(e) = &state {
                warn!("vcpu{}: {e}", self.id);
            }
            *self.monitor.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(state);
            self.monitor.save_answered.store(seq, Ordering::Release);
        }
    }

    /// Completes what the last exit left for KVM to finish (the data of a port or MMIO
    /// read goes into the registers on the next `KVM_RUN`) with `KVM_RUN`s that return at
    /// once (`immediate_exit`), then reads the vCPU's state.
    fn save_state(&mut self) -> std::result::Result<tvm_snapshot::VcpuState, String> {
        // A string instruction may need several round trips; each is an exit handled here.
        const MAX_ROUND_TRIPS: usize = 64;
        let mut settled = false;
        for _ in 0..MAX_ROUND_TRIPS {
            self.fd.set_kvm_immediate_exit(1);
            let r = match self.fd.run() {
                Ok(exit) => match handle_exit(exit, &self.io) {
                    VcpuAction::Continue => Ok(false),
                    other => Err(format!(
                        "an exit while settling for the snapshot: {other:?}"
                    )),
                },
                Err(e) if e.errno() == libc::EINTR => Ok(true),
                Err(e) => Err(format!("KVM_RUN to settle for the snapshot failed: {e}")),
            };
            self.fd.set_kvm_immediate_exit(0);
            if r? {
                settled = true;
                break;
            }
        }
        if !settled {
            return Err(format!(
                "vcpu{} still had port or mmio work after {MAX_ROUND_TRIPS} round trips",
                self.id
            ));
        }
        tvm_arch_x86::snapshot::save_vcpu(&self.fd, &self.msrs)
            .map_err(|e| format!("vcpu{}: {}", self.id, crate::error_chain(&e)))
    }

    /// Logs this vCPU's part of dump `seq` and marks it answered.
    fn answer_dump(&mut self, seq: u64) {
        let snap = snapshot(&self.fd);
        for line in crate::dump::vcpu_lines(
            seq,
            self.id,
            &snap,
            &self.monitor.stats,
            self.symbols.as_deref(),
        ) {
            warn!("{line}");
        }
        self.monitor.dump_answered.store(seq, Ordering::Release);
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
    fn a_panic_outranks_the_reboot_or_crash_it_causes_but_not_the_vmm_or_the_user() {
        let signal = |first: Option<ExitReason>| {
            let s = ExitSignal::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
            if let Some(first) = first {
                s.request(first);
            }
            s.request_panic();
            s.reason()
        };
        for first in [
            None,
            Some(ExitReason::GuestReset),
            Some(ExitReason::GuestPowerOff),
            Some(ExitReason::TripleFault),
        ] {
            assert_eq!(signal(first), Some(ExitReason::GuestPanic));
        }
        for first in [
            ExitReason::Error("boom".into()),
            ExitReason::Signal(15),
            ExitReason::ConsoleEscape,
        ] {
            assert_eq!(signal(Some(first.clone())), Some(first));
        }
        // And a plain request never replaces a recorded panic.
        let s = ExitSignal::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        s.request_panic();
        s.request(ExitReason::TripleFault);
        assert_eq!(s.reason(), Some(ExitReason::GuestPanic));
    }

    #[test]
    fn each_way_out_has_its_own_name_level_and_text() {
        let all = [
            (ExitReason::GuestReset, "reboot", Level::Info, "rebooted"),
            (
                ExitReason::GuestPowerOff,
                "poweroff",
                Level::Info,
                "powered off",
            ),
            (
                ExitReason::GuestPanic,
                "panic",
                Level::Error,
                "the guest panicked (pvpanic); exit code 3",
            ),
            (
                ExitReason::TripleFault,
                "triple_fault",
                Level::Warn,
                "triple-faulted (KVM_EXIT_SHUTDOWN): a crash",
            ),
            (ExitReason::Halted, "halted", Level::Info, "halted"),
            (
                ExitReason::ConsoleEscape,
                "console_escape",
                Level::Info,
                "Ctrl-A x",
            ),
            (ExitReason::Signal(15), "signal", Level::Info, "signal 15"),
            (
                ExitReason::Error("vcpu0 stopped: boom".into()),
                "error",
                Level::Error,
                "vcpu0 stopped: boom",
            ),
        ];
        let mut names = std::collections::HashSet::new();
        for (reason, name, level, text) in all {
            assert_eq!(reason.name(), name);
            assert!(names.insert(name), "{name} twice");
            tvm_virtio::test_log::start();
            log_stop(&reason);
            let lines = tvm_virtio::test_log::lines(level);
            assert_eq!(lines.len(), 1, "{reason:?}: {lines:?}");
            assert!(lines[0].starts_with("guest stopped: "), "{lines:?}");
            assert!(lines[0].contains(text), "{reason:?}: {lines:?}");
            // Only a triple fault is worth a diagnosis on the vcpu thread.
            assert_eq!(reason.wants_diagnosis(), name == "triple_fault");
        }
        // A reboot and a crash are told apart at the default level (warn).
        assert!(ExitReason::GuestReset.log_level() > Level::Warn);
        assert!(ExitReason::TripleFault.log_level() <= Level::Warn);
        assert_eq!(ExitReason::TripleFault.exit_code(), 0);
    }

    #[test]
    fn kvm_shutdown_and_reset_events_are_different_stops() {
        let io = IoManager::new();
        let stops: Vec<_> = [
            VcpuExit::Shutdown,
            VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[]),
            VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, &[]),
        ]
        .into_iter()
        .map(|e| match handle_exit(e, &io) {
            VcpuAction::Stop(r) => r.name(),
            other => panic!("{other:?}"),
        })
        .collect();
        assert_eq!(stops, ["triple_fault", "reboot", "poweroff"]);
    }

    #[test]
    fn a_kick_sets_immediate_exit_so_that_it_is_not_lost() {
        install_kick_handler().unwrap();
        let mut flag = 0u8;
        IMMEDIATE_EXIT.with(|f| f.set(&mut flag));
        // SAFETY: the kick handler is installed; a signal sent to this very thread runs
        // it before pthread_kill returns. `flag` outlives the call.
        let rc = unsafe { libc::pthread_kill(libc::pthread_self(), kick_signal()) };
        IMMEDIATE_EXIT.with(|f| f.set(std::ptr::null_mut()));
        assert_eq!(rc, 0);
        // SAFETY: reading a local byte the handler may have written.
        assert_eq!(unsafe { std::ptr::read_volatile(&flag) }, 1);
        // A thread that runs no vCPU takes a kick harmlessly.
        // SAFETY: the handler is installed and finds no flag to set.
        let rc = unsafe { libc::pthread_kill(libc::pthread_self(), kick_signal()) };
        assert_eq!(rc, 0);
    }

    #[test]
    fn a_dump_is_pending_until_answered() {
        let m = VcpuMonitor::default();
        assert_eq!(m.pending_dump(), None);
        m.request_dump(1);
        assert_eq!(m.pending_dump(), Some(1));
        assert!(!m.answered(1));
        m.dump_answered.store(1, Ordering::Release);
        assert!(m.answered(1));
        assert_eq!(m.pending_dump(), None);
        m.request_dump(2);
        assert_eq!(m.pending_dump(), Some(2));
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
